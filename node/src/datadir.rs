//! The node's data directory: `node.key` (0600), `pins.json`, `attestation.bin`,
//! `revocations.bin` (last verified list, for anti-rollback), `audit.jsonl` (the active audit
//! file; rotated ones are `audit.jsonl.<first seq>`), `audit.anchor` (the audit log's anchored
//! head), `ctl.sock`.
//!
//! # The audit anchor
//! `audit.anchor` holds `{"seq", "hash"}` of an audit record already fsynced, replaced
//! atomically ([`write_atomic`]) after a durable record, at most every
//! [`AUDIT_ANCHOR_INTERVAL_SECS`] when the log grew, and at shutdown (`shared.rs`). Start-up
//! refuses a log that ends before the anchored seq or holds another hash there, and
//! `hopmesh-node audit verify` checks the whole chain against it ([`verify_audit`]), so cutting
//! records from the tail or rewriting the log with recomputed hashes is detected, except for
//! the records written since the last anchor. It is not signed: whoever can write the whole
//! data directory can rewrite both (the verifier's log is anchored in its store and signed).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hopmesh_transport::audit::{self, ChainSummary, Head};

use crate::NodeError;

/// Most seconds between audit anchors while the log grows (10 s): the window in which the
/// newest records can be cut without `audit verify` noticing.
pub const AUDIT_ANCHOR_INTERVAL_SECS: u64 = 10;

/// Paths in a node data directory.
#[derive(Debug, Clone)]
pub struct NodeDir {
    root: PathBuf,
}

impl NodeDir {
    /// The directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The node key.
    pub fn key(&self) -> PathBuf {
        self.file("node.key")
    }

    /// The control socket.
    pub fn ctl(&self) -> PathBuf {
        self.file("ctl.sock")
    }

    /// The audit log's active file.
    pub fn audit_log(&self) -> PathBuf {
        self.file("audit.jsonl")
    }

    /// The audit log's anchor.
    pub fn audit_anchor(&self) -> PathBuf {
        self.file("audit.anchor")
    }

    /// The anchored audit head, if one was written. A file that does not parse is an error:
    /// never run as if nothing had been anchored.
    pub fn read_audit_anchor(&self) -> Result<Option<Head>, NodeError> {
        let path = self.audit_anchor();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(NodeError::io(format!("read {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    }

    /// Replaces the anchor atomically. `head` must already be on disk in the log.
    pub fn write_audit_anchor(&self, head: &Head) -> std::io::Result<()> {
        let json = serde_json::to_vec(head).map_err(std::io::Error::other)?;
        write_atomic(&self.audit_anchor(), &json)
    }
}

/// `hopmesh-node audit verify`: the whole audit chain (every rotated file) and that it reaches
/// the anchored head with the anchored hash. Fails on an edited, reordered or missing record
/// or file, a tail cut below the anchor, or a rewritten (even re-chained) log.
pub fn verify_audit(dir: &NodeDir) -> Result<(ChainSummary, Option<Head>), NodeError> {
    let anchor = dir.read_audit_anchor()?;
    let summary = audit::verify_anchored(&dir.audit_log(), anchor.as_ref(), &mut |_, _| Ok(()))?;
    Ok((summary, anchor))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory. A
/// crash leaves either the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// SHA-256 of this process's executable: the measurement presented to the verifier.
pub fn self_measurement() -> std::io::Result<hopmesh_protocol::ids::Measurement> {
    let exe = std::env::current_exe()?;
    let bytes = fs::read(exe)?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(hopmesh_protocol::ids::Measurement(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(log: &mut hopmesh_transport::audit::AuditLog, n: u64) {
        log.record(n, "peer_connected", hopmesh_transport::fields! {"n" => n})
            .expect("record");
    }

    #[test]
    fn the_anchor_catches_a_truncated_tail_and_a_rewritten_log() {
        use hopmesh_transport::audit::{AuditError, AuditLog, AuditOptions};
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = NodeDir::new(tmp.path());
        let (mut log, _) = AuditLog::open(&dir.audit_log()).expect("open");
        for n in 0..6 {
            record(&mut log, n);
        }
        log.sync().expect("sync");
        dir.write_audit_anchor(&log.head()).expect("anchor");
        drop(log);
        let (summary, anchor) = verify_audit(&dir).expect("valid");
        assert_eq!((summary.records, anchor.map(|a| a.seq)), (6, Some(6)));
        let original = fs::read_to_string(dir.audit_log()).expect("read");

        // The last two records cut: a valid chain, but short of the anchor.
        let kept: String = original.lines().take(4).map(|l| format!("{l}\n")).collect();
        fs::write(dir.audit_log(), kept).expect("write");
        audit::verify(&dir.audit_log()).expect("the chain alone cannot tell");
        match verify_audit(&dir) {
            Err(NodeError::Audit(AuditError::Anchor { reason, .. })) => {
                assert!(reason.contains("removed from the tail"), "{reason}");
            }
            other => panic!("truncation not detected: {other:?}"),
        }
        let opts = AuditOptions {
            anchor: dir.read_audit_anchor().expect("anchor"),
            ..AuditOptions::default()
        };
        assert!(
            AuditLog::open_with(&dir.audit_log(), &opts).is_err(),
            "start-up refuses it"
        );

        // Rewritten from scratch with a valid chain (record 3 edited, every hash recomputed).
        fs::remove_file(dir.audit_log()).expect("rm");
        let (mut forged, _) = AuditLog::open(&dir.audit_log()).expect("open");
        for n in 0..6 {
            record(&mut forged, if n == 2 { 99 } else { n });
        }
        drop(forged);
        audit::verify(&dir.audit_log()).expect("the forged chain is valid");
        match verify_audit(&dir) {
            Err(NodeError::Audit(AuditError::Anchor { reason, .. })) => {
                assert!(reason.contains("rewritten"), "{reason}");
            }
            other => panic!("rewrite not detected: {other:?}"),
        }
        fs::write(dir.audit_log(), &original).expect("restore");
        verify_audit(&dir).expect("the true log verifies");
        // A damaged anchor file is an error, never "nothing anchored".
        fs::write(dir.audit_anchor(), b"{").expect("write");
        assert!(verify_audit(&dir).is_err());
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.bin");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}
