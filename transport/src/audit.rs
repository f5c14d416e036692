//! A JSON-lines audit log of security events, hash-chained so tampering is detectable.
//!
//! Each line is a JSON object with `seq` (from 1), `ts` (unix seconds), `event`, the event's
//! own fields, `prev` (the previous record's hash, 64 zeros for the first) and `hash`:
//! `SHA-256` of the line's compact JSON without `hash`, keys sorted. Editing, inserting,
//! deleting or reordering any record breaks the chain at that line.
//!
//! Records are flushed to the OS on every write; [`AuditLog::record_durable`] also fsyncs
//! (revocations and other events whose loss would matter).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be read or written.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The chain is broken: the log was edited, truncated in the middle or reordered.
    #[error("audit log {path} is broken at line {line}: {reason}")]
    Broken {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Summary of a verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of records.
    pub records: u64,
    /// Hash of the last record (or [`GENESIS`]).
    pub last_hash: String,
}

/// An open audit log, appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    last_hash: String,
}

fn hash_of(record: &Value) -> String {
    let text = record.to_string();
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    hex_lower(d.as_ref())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies the whole chain of the log at `path`.
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut prev = GENESIS.to_owned();
    let mut seq = 0u64;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let broken = |reason: String| AuditError::Broken {
            path: path.display().to_string(),
            line: i + 1,
            reason,
        };
        let mut v: Value =
            serde_json::from_str(&line).map_err(|e| broken(format!("not JSON: {e}")))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| broken("not an object".into()))?;
        let claimed = match obj.remove("hash") {
            Some(Value::String(h)) => h,
            _ => return Err(broken("no hash".into())),
        };
        if obj.get("prev").and_then(Value::as_str) != Some(prev.as_str()) {
            return Err(broken("prev does not match the previous record".into()));
        }
        if obj.get("seq").and_then(Value::as_u64) != Some(seq + 1) {
            return Err(broken(format!("expected seq {}", seq + 1)));
        }
        let actual = hash_of(&v);
        if actual != claimed {
            return Err(broken("hash does not match the record (edited)".into()));
        }
        prev = claimed;
        seq += 1;
    }
    Ok(ChainSummary {
        records: seq,
        last_hash: prev,
    })
}

/// Reads records with `seq > since` (for the admin API).
pub fn read_since(path: &Path, since: u64) -> Result<Vec<Value>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io)?;
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v.get("seq")
                .and_then(Value::as_u64)
                .is_some_and(|s| s > since)
        {
            out.push(v);
        }
    }
    Ok(out)
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log and verifies its chain. A final line without a
    /// newline is a write cut short by a crash; it is dropped and reported by the caller via
    /// the returned flag.
    pub fn open(path: &Path) -> Result<(Self, bool), AuditError> {
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut repaired = false;
        if let Ok(bytes) = std::fs::read(path)
            && !bytes.is_empty()
            && !bytes.ends_with(b"\n")
        {
            let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            let f = OpenOptions::new().write(true).open(path).map_err(io)?;
            f.set_len(keep as u64).map_err(io)?;
            f.sync_all().map_err(io)?;
            repaired = true;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let summary = verify(path)?;
        Ok((
            Self {
                path: path.to_owned(),
                file,
                seq: summary.records,
                last_hash: summary.last_hash,
            },
            repaired,
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record and flushes it to the OS. Returns its seq.
    pub fn record(
        &mut self,
        ts: u64,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        self.append(ts, event, fields, false)
    }

    /// Appends a record and fsyncs the file.
    pub fn record_durable(
        &mut self,
        ts: u64,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        self.append(ts, event, fields, true)
    }

    fn append(
        &mut self,
        ts: u64,
        event: &str,
        mut fields: Map<String, Value>,
        durable: bool,
    ) -> Result<u64, AuditError> {
        let seq = self.seq + 1;
        fields.insert("seq".into(), Value::from(seq));
        fields.insert("ts".into(), Value::from(ts));
        fields.insert("event".into(), Value::from(event));
        fields.insert("prev".into(), Value::from(self.last_hash.clone()));
        let mut record = Value::Object(fields);
        let hash = hash_of(&record);
        if let Some(obj) = record.as_object_mut() {
            obj.insert("hash".into(), Value::from(hash.clone()));
        }
        let mut line = record.to_string();
        line.push('\n');
        let io = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)?;
        if durable {
            self.file.sync_data().map_err(io)?;
        }
        self.seq = seq;
        self.last_hash = hash;
        Ok(seq)
    }
}

/// Builds a field map: `fields!{"node" => id, "reason" => r}`.
#[macro_export]
macro_rules! fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut m = serde_json::Map::new();
        $( m.insert(String::from($k), serde_json::Value::from($v)); )*
        m
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_detects_edits_deletions_and_reordering() {
        let dir = std::env::temp_dir().join(format!("hopmesh-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        {
            let (mut log, repaired) = AuditLog::open(&path).expect("open");
            assert!(!repaired);
            for i in 0..5u64 {
                log.record(
                    100 + i,
                    "enroll",
                    fields! {"node" => format!("n{i}"), "n" => i},
                )
                .expect("record");
            }
        }
        assert_eq!(verify(&path).expect("valid").records, 5);
        let (mut log, _) = AuditLog::open(&path).expect("reopen continues the chain");
        assert_eq!(
            log.record_durable(200, "revoke", fields! {"node" => "n1"})
                .expect("record"),
            6
        );
        drop(log);
        assert_eq!(read_since(&path, 4).expect("read").len(), 2);

        let original = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = original.lines().collect();
        let check = |text: String, want_line: usize| {
            std::fs::write(&path, text).expect("write");
            match verify(&path) {
                Err(AuditError::Broken { line, .. }) => assert_eq!(line, want_line),
                other => panic!("tampering not detected: {other:?}"),
            }
        };
        check(original.replace("\"n3\"", "\"n9\""), 4);
        check(
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, l)| format!("{l}\n"))
                .collect(),
            3,
        );
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        check(swapped.iter().map(|l| format!("{l}\n")).collect(), 2);
        check(original.replace("\"ts\":101", "\"ts\":102"), 2);

        // A crash mid-write leaves a partial line: dropped on open, the chain stays valid.
        std::fs::write(&path, format!("{original}{{\"seq\":7,")).expect("write");
        let (_, repaired) = AuditLog::open(&path).expect("open repairs the tail");
        assert!(repaired);
        assert_eq!(verify(&path).expect("valid").records, 6);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
