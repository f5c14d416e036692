//! The node's data directory: `node.key` (0600), `pins.json`, `attestation.bin`,
//! `revocations.bin` (last verified list, for anti-rollback), `audit.jsonl`, `ctl.sock`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
