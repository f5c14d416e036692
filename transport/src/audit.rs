//! A JSON-lines audit log of security events, hash-chained so tampering is detectable, rotated
//! by size, and anchorable so that a truncated tail or a rewritten file is detected too.
//!
//! Each line is a JSON object with `seq` (from 1), `ts` (unix seconds), `event`, the event's
//! own fields, `prev` (the previous record's hash, 64 zeros for the first) and `hash`:
//! `SHA-256` of the line's compact JSON without `hash`, keys sorted. Editing, inserting,
//! deleting or reordering any record breaks the chain at that line.
//!
//! # Files
//! The active file is `PATH` (e.g. `audit.jsonl`). When appending a record would take it past
//! [`AuditOptions::max_file_bytes`] (default [`DEFAULT_MAX_FILE_BYTES`]), it is renamed
//! `PATH.<first seq, 20 digits>` and a new `PATH` begins; the chain continues across files (the
//! first record of the new file has the next `seq` and the last hash of the previous file as its
//! `prev`). [`verify`] walks every file in order: a missing file (middle or oldest) is a gap in
//! `seq` and is reported. Rotated files are never deleted here (archiving them is the
//! operator's business; `verify` needs them all).
//!
//! # Bounded memory and start-up
//! Nothing reads a whole file into memory: every reader streams lines of at most
//! [`MAX_RECORD_BYTES`] (a longer record is written as a stub naming its size), and reads a file
//! only up to the length it had when opened. [`AuditLog::open`] verifies only the active file
//! (at most about `max_file_bytes`) and the last record of the previous file; [`verify`] checks
//! everything. [`read_page`] answers at most [`MAX_PAGE_RECORDS`] records / [`MAX_PAGE_BYTES`].
//!
//! # Writes that fail
//! Records are flushed to the OS on every write; [`AuditLog::record_durable`] also fsyncs. A
//! failed write or fsync (a full disk: `ENOSPC`) returns the error and leaves the chain as it
//! was: bytes of a partial line are cut off again, and if that is impossible the log refuses
//! every later write ([`AuditError::Poisoned`]) until it is reopened (which drops a partial
//! final line). Callers decide what a failure means: durable records gate the operation they
//! record (the verifier's revoke fails), best-effort ones are counted and logged.
//!
//! # Anchors and checkpoints
//! The chain alone cannot show that records were cut from the tail, or that the whole file
//! was rewritten with recomputed hashes. [`AuditLog::head`] is the `(seq, hash)` of the last
//! record; an owner stores it elsewhere (the verifier in its SQLite store, a node in a state
//! file) once the record is on disk, and [`verify_anchored`] fails when the log does not reach
//! that head with that hash. [`SignedHead`] is a head signed with the verifier's signing key
//! (domain-separated from attestations and revocation lists); the verifier stores it and also
//! writes it into the log as a [`CHECKPOINT_EVENT`] record, which [`check_checkpoints`] checks
//! against the pinned keys.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hopmesh_protocol::attestation::{KeySet, SigningKey};
use hopmesh_protocol::ids::KeyId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Default size at which the active file is rotated: 64 MiB. Start-up verifies at most about
/// this much.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Smallest accepted rotation size (smaller settings are raised to it).
pub const MIN_MAX_FILE_BYTES: u64 = 1024;

/// Longest record line, newline excluded: 256 KiB. A record that would be longer is written as
/// a stub (`event`, `oversized_bytes`) instead; readers refuse (`verify`) or skip (`read_page`)
/// longer lines, so no reader ever buffers more than this for one line.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// Most records [`read_page`] returns at once (the admin API's `/v1/audit` page).
pub const MAX_PAGE_RECORDS: usize = 1000;

/// Most record bytes [`read_page`] returns at once (at least one record is always returned).
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// The event name of a signed checkpoint record.
pub const CHECKPOINT_EVENT: &str = "audit_checkpoint";

/// Domain separation of checkpoint signatures: differs from every other signed document.
const CHECKPOINT_DOMAIN: &[u8] = b"hopmesh/audit-checkpoint/v1\0";

/// Digits of the first-seq suffix of a rotated file's name.
const ROTATED_DIGITS: usize = 20;

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
    /// The chain is broken: the log was edited, truncated in the middle or reordered, or a
    /// file is missing.
    #[error("audit log {path} is broken at line {line}: {reason}")]
    Broken {
        /// The file.
        path: String,
        /// 1-based line number in that file (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The chain is intact but does not reach the anchored head: records were cut from the
    /// tail, or the log was rewritten.
    #[error("audit log {path} does not match its anchor: {reason}")]
    Anchor {
        /// The active file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An earlier failed write could not be undone; nothing more is written until the log is
    /// reopened.
    #[error("audit log {path}: an earlier write failed and could not be undone; reopen the log")]
    Poisoned {
        /// The file.
        path: String,
    },
}

/// The last record of a chain: what an anchor holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Its seq (0: empty log).
    pub seq: u64,
    /// Its hash ([`GENESIS`] for an empty log).
    pub hash: String,
}

impl Head {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Summary of a verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of records.
    pub records: u64,
    /// Hash of the last record (or [`GENESIS`]).
    pub last_hash: String,
    /// Files walked (rotated ones and the active one).
    pub files: usize,
    /// [`CHECKPOINT_EVENT`] records seen.
    pub checkpoints: u64,
}

/// How a log is opened.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Rotate the active file before a record would take it past this size (at least
    /// [`MIN_MAX_FILE_BYTES`]; default [`DEFAULT_MAX_FILE_BYTES`]).
    pub max_file_bytes: u64,
    /// The head last anchored elsewhere: opening fails if the log ends before it, or if the
    /// anchored record is in the active file (or is the previous file's last) with another hash.
    pub anchor: Option<Head>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            anchor: None,
        }
    }
}

/// An open audit log, appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    last_hash: String,
    /// Bytes in the active file.
    len: u64,
    /// Seq of the active file's first record (the next record's if it is empty).
    first_seq: u64,
    max_file_bytes: u64,
    poisoned: bool,
}

fn hash_of(record: &Value) -> String {
    let text = record.to_string();
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    hex_lower(d.as_ref())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The name a rotated file whose first record is `first_seq` gets.
pub fn rotated_path(path: &Path, first_seq: u64) -> PathBuf {
    path.with_file_name(format!("{}.{first_seq:0ROTATED_DIGITS$}", file_name(path)))
}

fn temp_path(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}.new", file_name(path)))
}

/// The rotated files of the log at `path`, oldest first, with their first seq.
pub fn rotated_files(path: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{}.", file_name(path));
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.len() == ROTATED_DIGITS
            && rest.bytes().all(|b| b.is_ascii_digit())
            && let Ok(first) = rest.parse::<u64>()
        {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What one bounded line read found.
enum LineRead {
    /// End of input.
    Eof,
    /// A complete line is in the buffer (newline removed).
    Line,
    /// A line longer than the cap (skipped up to its newline, or to the end).
    TooLong,
    /// Bytes without a final newline are in the buffer.
    Partial,
}

/// Reads one line of at most `max` bytes into `buf` (cleared first), never buffering more.
fn read_bounded_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(if too_long {
                LineRead::TooLong
            } else if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Partial
            });
        }
        let (chunk, found) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&avail[..chunk]);
            }
        }
        r.consume(if found { chunk + 1 } else { chunk });
        if found {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// A reader of a file up to the length it has now (a file being appended to, or a device that
/// never ends, is read only that far).
fn bounded_reader(path: &Path) -> Result<BufReader<io::Take<File>>, AuditError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    Ok(BufReader::with_capacity(64 * 1024, file.take(len)))
}

/// Checks one line against the chain: returns the record (without `hash`) and its hash.
fn check_line(line: &[u8], prev: &Head) -> Result<(Value, String), String> {
    let mut v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("not an object")?;
    let claimed = match obj.remove("hash") {
        Some(Value::String(h)) => h,
        _ => return Err("no hash".into()),
    };
    if obj.get("prev").and_then(Value::as_str) != Some(prev.hash.as_str()) {
        return Err("prev does not match the previous record".into());
    }
    if obj.get("seq").and_then(Value::as_u64) != Some(prev.seq + 1) {
        return Err(format!("expected seq {}", prev.seq + 1));
    }
    if hash_of(&v) != claimed {
        return Err("hash does not match the record (edited)".into());
    }
    Ok((v, claimed))
}

/// What walking one file found.
struct Walked {
    records: u64,
    checkpoints: u64,
    /// The hash of the anchored seq, if it is in this file.
    anchored_hash: Option<String>,
}

/// Walks the chain through one file, advancing `head`. `partial_ok`: a final line without a
/// newline (a write in progress, or a crash) is ignored rather than an error.
fn walk_file(
    path: &Path,
    head: &mut Head,
    partial_ok: bool,
    anchor_seq: Option<u64>,
    check: &mut dyn FnMut(&Value, &Head) -> Result<(), String>,
) -> Result<Walked, AuditError> {
    let mut r = bounded_reader(path)?;
    let mut buf = Vec::new();
    let mut out = Walked {
        records: 0,
        checkpoints: 0,
        anchored_hash: None,
    };
    let mut line_no = 0usize;
    loop {
        let read = read_bounded_line(&mut r, &mut buf, MAX_RECORD_BYTES).map_err(io_err(path))?;
        line_no += 1;
        let broken = |reason: String| AuditError::Broken {
            path: path.display().to_string(),
            line: line_no,
            reason,
        };
        match read {
            LineRead::Eof => return Ok(out),
            LineRead::Partial if partial_ok => return Ok(out),
            LineRead::Partial => return Err(broken("final record has no newline".into())),
            LineRead::TooLong => {
                return Err(broken(format!("line longer than {MAX_RECORD_BYTES} bytes")));
            }
            LineRead::Line => {}
        }
        let (record, hash) = check_line(&buf, head).map_err(&broken)?;
        check(&record, head).map_err(&broken)?;
        if record.get("event").and_then(Value::as_str) == Some(CHECKPOINT_EVENT) {
            out.checkpoints += 1;
        }
        head.seq += 1;
        head.hash = hash;
        if anchor_seq == Some(head.seq) {
            out.anchored_hash = Some(head.hash.clone());
        }
        out.records += 1;
    }
}

fn anchor_error(path: &Path, anchor: &Head, end: &Head, found: Option<&str>) -> Option<AuditError> {
    let reason = if anchor.seq > end.seq {
        format!(
            "the log ends at seq {} but seq {} was anchored: records were removed from the tail",
            end.seq, anchor.seq
        )
    } else if found.is_some_and(|h| h != anchor.hash) {
        format!(
            "record {} does not have the anchored hash {}: the log was rewritten",
            anchor.seq, anchor.hash
        )
    } else {
        return None;
    };
    Some(AuditError::Anchor {
        path: path.display().to_string(),
        reason,
    })
}

/// Verifies the whole chain of the log at `path` (every rotated file, then the active one).
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    verify_anchored(path, None, &mut |_, _| Ok(()))
}

/// Verifies the whole chain and that it reaches `anchor` with the anchored hash; `check` sees
/// every record (without `hash`) with the head before it, and may refuse it (see
/// [`check_checkpoints`]).
pub fn verify_anchored(
    path: &Path,
    anchor: Option<&Head>,
    check: &mut dyn FnMut(&Value, &Head) -> Result<(), String>,
) -> Result<ChainSummary, AuditError> {
    let rotated = rotated_files(path)?;
    let active_exists = path.exists();
    if rotated.is_empty() && !active_exists {
        // The same error as before rotation existed: no log at all.
        File::open(path).map_err(io_err(path))?;
    }
    let mut head = Head::genesis();
    let mut summary = ChainSummary {
        records: 0,
        last_hash: GENESIS.to_owned(),
        files: 0,
        checkpoints: 0,
    };
    let anchor_seq = anchor.map(|a| a.seq);
    let mut found = None;
    for (i, (first, file)) in rotated.iter().enumerate() {
        if *first != head.seq + 1 {
            return Err(AuditError::Broken {
                path: file.display().to_string(),
                line: 0,
                reason: if i == 0 {
                    format!("the oldest file starts at seq {first}: earlier files are missing")
                } else {
                    format!(
                        "expected a file starting at seq {}, found one starting at {first}: a file is missing",
                        head.seq + 1
                    )
                },
            });
        }
        let w = walk_file(file, &mut head, false, anchor_seq, check)?;
        if w.records == 0 {
            return Err(AuditError::Broken {
                path: file.display().to_string(),
                line: 0,
                reason: "a rotated file is empty".into(),
            });
        }
        summary.files += 1;
        summary.checkpoints += w.checkpoints;
        found = found.or(w.anchored_hash);
    }
    if active_exists {
        let w = walk_file(path, &mut head, true, anchor_seq, check)?;
        summary.files += 1;
        summary.checkpoints += w.checkpoints;
        found = found.or(w.anchored_hash);
    }
    if let Some(a) = anchor
        && let Some(e) = anchor_error(path, a, &head, found.as_deref())
    {
        return Err(e);
    }
    summary.records = head.seq;
    summary.last_hash = head.hash;
    Ok(summary)
}

/// One page of records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Records with `seq > since`, in order.
    pub records: Vec<Value>,
    /// True when more records follow the last one returned (ask again with its seq).
    pub more: bool,
}

/// Reads at most `max_records` records (and about `max_bytes` of them, at least one) with
/// `seq > since`, streaming; files wholly before `since` are skipped unread. Lines that do not
/// parse or are too long are skipped (use [`verify`] to check the chain).
pub fn read_page(
    path: &Path,
    since: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Page, AuditError> {
    let mut files = rotated_files(path)?;
    let active_exists = path.exists();
    if active_exists || files.is_empty() {
        // The active file's first seq, from its first line (None: empty or unreadable).
        let first = first_seq_of(path).unwrap_or(u64::MAX);
        files.push((first, path.to_owned()));
    }
    let mut page = Page::default();
    let mut bytes = 0usize;
    let mut buf = Vec::new();
    for (i, (_, file)) in files.iter().enumerate() {
        // Every record of this file is at or below `since` when the next file starts at or
        // before since + 1: skip it unread.
        if files
            .get(i + 1)
            .is_some_and(|(next_first, _)| *next_first <= since.saturating_add(1))
        {
            continue;
        }
        let mut r = bounded_reader(file)?;
        loop {
            match read_bounded_line(&mut r, &mut buf, MAX_RECORD_BYTES).map_err(io_err(file))? {
                LineRead::Eof | LineRead::Partial => break,
                LineRead::TooLong => continue,
                LineRead::Line => {}
            }
            let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
                continue;
            };
            if v.get("seq")
                .and_then(Value::as_u64)
                .is_none_or(|s| s <= since)
            {
                continue;
            }
            if page.records.len() >= max_records
                || (!page.records.is_empty() && bytes.saturating_add(buf.len()) > max_bytes)
            {
                page.more = true;
                return Ok(page);
            }
            bytes = bytes.saturating_add(buf.len());
            page.records.push(v);
        }
    }
    Ok(page)
}

/// Every record with `seq > since`, across all files (tests and small logs; the admin API
/// pages with [`read_page`]).
pub fn read_since(path: &Path, since: u64) -> Result<Vec<Value>, AuditError> {
    Ok(read_page(path, since, usize::MAX, usize::MAX)?.records)
}

/// The seq of a file's first record, if it has a readable one.
fn first_seq_of(path: &Path) -> Option<u64> {
    let mut r = bounded_reader(path).ok()?;
    let mut buf = Vec::new();
    match read_bounded_line(&mut r, &mut buf, MAX_RECORD_BYTES).ok()? {
        LineRead::Line => serde_json::from_slice::<Value>(&buf)
            .ok()?
            .get("seq")
            .and_then(Value::as_u64),
        _ => None,
    }
}

/// The last record of a complete file, read from its end (at most [`MAX_RECORD_BYTES`]).
fn tail_head(path: &Path, first_seq: u64) -> Result<Head, AuditError> {
    let broken = |reason: String| AuditError::Broken {
        path: path.display().to_string(),
        line: 0,
        reason,
    };
    let mut f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let window = (MAX_RECORD_BYTES as u64 + 2).min(len);
    f.seek(SeekFrom::Start(len - window))
        .map_err(io_err(path))?;
    let mut tail = Vec::new();
    f.take(window)
        .read_to_end(&mut tail)
        .map_err(io_err(path))?;
    if tail.last() != Some(&b'\n') {
        return Err(broken(
            "a rotated file does not end with a complete record".into(),
        ));
    }
    let body = &tail[..tail.len() - 1];
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    if start == 0 && window < len {
        return Err(broken(format!(
            "last line longer than {MAX_RECORD_BYTES} bytes"
        )));
    }
    let line = &body[start..];
    let v: Value = serde_json::from_slice(line).map_err(|e| broken(format!("not JSON: {e}")))?;
    let seq = v
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| broken("no seq".into()))?;
    let prev = v
        .get("prev")
        .and_then(Value::as_str)
        .ok_or_else(|| broken("no prev".into()))?
        .to_owned();
    let (_, hash) = check_line(
        line,
        &Head {
            seq: seq - 1,
            hash: prev,
        },
    )
    .map_err(|r| broken(format!("last record: {r}")))?;
    if seq < first_seq {
        return Err(broken(format!(
            "last seq {seq} is below the file's first {first_seq}"
        )));
    }
    Ok(Head { seq, hash })
}

/// Cuts a final line without a newline (a write cut short by a crash), scanning back from the
/// end in bounded chunks. Returns whether it cut anything. Only regular files are touched.
fn repair_tail(path: &Path) -> Result<bool, AuditError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(false);
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = meta.len();
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1)).map_err(io_err(path))?;
    f.read_exact(&mut last).map_err(io_err(path))?;
    if last[0] == b'\n' {
        return Ok(false);
    }
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut keep = 0u64;
    let mut chunk = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let n = usize::try_from(end - start).unwrap_or(0);
        f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        f.read_exact(&mut chunk[..n]).map_err(io_err(path))?;
        if let Some(p) = chunk[..n].iter().rposition(|b| *b == b'\n') {
            keep = start + p as u64 + 1;
            break;
        }
        end = start;
    }
    f.set_len(keep).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(true)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => File::open(d)?.sync_all(),
        _ => Ok(()),
    }
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log with the default options. See
    /// [`AuditLog::open_with`].
    pub fn open(path: &Path) -> Result<(Self, bool), AuditError> {
        Self::open_with(path, &AuditOptions::default())
    }

    /// Opens (or creates, mode 0600) the log: verifies the active file's chain, continuing from
    /// the last record of the newest rotated file, and the anchor (see [`AuditOptions`]). A
    /// final line without a newline is a write cut short by a crash; it is dropped and reported
    /// by the caller via the returned flag. Reads at most the active file and one record of
    /// the previous file, streaming.
    pub fn open_with(path: &Path, opts: &AuditOptions) -> Result<(Self, bool), AuditError> {
        match fs::remove_file(temp_path(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&temp_path(path))(e)),
        }
        let rotated = rotated_files(path)?;
        let mut head = match rotated.last() {
            Some((first, last)) => tail_head(last, *first)?,
            None => Head::genesis(),
        };
        let previous = head.clone();
        let repaired = repair_tail(path)?;
        let file = open_append(path)?;
        let first_seq = head.seq + 1;
        let anchor_seq = opts.anchor.as_ref().map(|a| a.seq);
        let walked = walk_file(path, &mut head, false, anchor_seq, &mut |_, _| Ok(()))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        if let Some(a) = &opts.anchor {
            let found = walked
                .anchored_hash
                .or_else(|| (a.seq == previous.seq).then(|| previous.hash.clone()));
            if let Some(e) = anchor_error(path, a, &head, found.as_deref()) {
                return Err(e);
            }
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
                seq: head.seq,
                last_hash: head.hash,
                len,
                first_seq,
                max_file_bytes: opts.max_file_bytes.max(MIN_MAX_FILE_BYTES),
                poisoned: false,
            },
            repaired,
        ))
    }

    /// The active file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last record written: what an anchor holds once it is on disk (after
    /// [`AuditLog::record_durable`] or [`AuditLog::sync`]).
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.last_hash.clone(),
        }
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

    /// Appends a record and fsyncs the file: when this returns `Ok`, the record is on disk.
    pub fn record_durable(
        &mut self,
        ts: u64,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<u64, AuditError> {
        self.append(ts, event, fields, true)
    }

    /// Fsyncs everything written so far (before anchoring [`AuditLog::head`]).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.display().to_string(),
            });
        }
        self.file.sync_data().map_err(io_err(&self.path))
    }

    fn line_for(
        &self,
        seq: u64,
        ts: u64,
        event: &str,
        mut fields: Map<String, Value>,
    ) -> (String, String) {
        let prev = self.last_hash.clone();
        let build = |mut fields: Map<String, Value>| {
            fields.insert("seq".into(), Value::from(seq));
            fields.insert("ts".into(), Value::from(ts));
            fields.insert("event".into(), Value::from(event));
            fields.insert("prev".into(), Value::from(prev.clone()));
            let mut record = Value::Object(fields);
            let hash = hash_of(&record);
            if let Some(obj) = record.as_object_mut() {
                obj.insert("hash".into(), Value::from(hash.clone()));
            }
            (record.to_string(), hash)
        };
        let (line, hash) = build(std::mem::take(&mut fields));
        if line.len() <= MAX_RECORD_BYTES {
            return (line, hash);
        }
        let mut stub = Map::new();
        stub.insert("oversized_bytes".into(), Value::from(line.len()));
        build(stub)
    }

    fn append(
        &mut self,
        ts: u64,
        event: &str,
        fields: Map<String, Value>,
        durable: bool,
    ) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.display().to_string(),
            });
        }
        let seq = self.seq + 1;
        // Event names come from code, but keep the stub bounded whatever they are.
        let event: String = event.chars().take(128).collect();
        let (mut line, hash) = self.line_for(seq, ts, &event, fields);
        line.push('\n');
        if self.len > 0 && self.len.saturating_add(line.len() as u64) > self.max_file_bytes {
            self.rotate()?;
        }
        let before = self.len;
        let written = self.file.write_all(line.as_bytes()).and_then(|()| {
            if durable {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            self.undo(before);
            return Err(io_err(&self.path)(e));
        }
        self.len += line.len() as u64;
        self.seq = seq;
        self.last_hash = hash;
        Ok(seq)
    }

    /// After a failed write: cut the file back to `before` bytes so that no partial line stays
    /// in the chain; if that is impossible, refuse every later write.
    fn undo(&mut self, before: u64) {
        if self.file.metadata().is_ok_and(|m| m.len() == before) {
            return;
        }
        if self.file.set_len(before).is_err() {
            tracing::error!(path = %self.path.display(), "a failed audit write could not be undone; the log refuses writes until reopened");
            self.poisoned = true;
        }
    }

    /// Renames the active file `PATH.<first seq>` and starts a new one. The new file is
    /// created first, so a failure to create it changes nothing; a crash between the renames
    /// leaves no active file, and the next open starts one from the newest rotated file.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let io = io_err(&self.path);
        self.file.sync_all().map_err(&io)?;
        let tmp = temp_path(&self.path);
        let new = open_append(&tmp)?;
        let rotated = rotated_path(&self.path, self.first_seq);
        if let Err(e) = fs::rename(&self.path, &rotated) {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        if let Err(e) = fs::rename(&tmp, &self.path) {
            if fs::rename(&rotated, &self.path).is_err() {
                self.poisoned = true;
            }
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        if let Err(e) = sync_dir(&self.path) {
            tracing::warn!(error = %e, "audit log rotated but the directory could not be fsynced");
        }
        self.file = new;
        self.len = 0;
        self.first_seq = self.seq + 1;
        Ok(())
    }
}

/// A head signed with the verifier's signing key: stored as the verifier's audit anchor and
/// written into the log as [`CHECKPOINT_EVENT`] records. The signature covers
/// `"hopmesh/audit-checkpoint/v1\0" ‖ seq (u64 big-endian) ‖ hash (64 hex digits)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// The head's seq.
    pub seq: u64,
    /// The head's hash.
    pub hash: String,
    /// Hex key id of the signing key.
    pub key_id: String,
    /// Hex Ed25519 signature.
    pub sig: String,
}

fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + hash.len());
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

impl SignedHead {
    /// Signs `head` with `key`.
    pub fn sign(head: &Head, key: &SigningKey) -> Self {
        Self {
            seq: head.seq,
            hash: head.hash.clone(),
            key_id: key.key_id().to_string(),
            sig: hex_lower(&key.sign_raw(&checkpoint_message(head.seq, &head.hash))),
        }
    }

    /// The head.
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// Checks the signature against the pinned keys.
    pub fn check(&self, keys: &KeySet) -> Result<(), String> {
        let id: [u8; 8] = hex_decode(&self.key_id)
            .and_then(|b| b.try_into().ok())
            .ok_or("checkpoint key id is not 16 hex digits")?;
        let key = keys
            .get(&KeyId(id))
            .ok_or_else(|| format!("checkpoint signed by unknown key {}", self.key_id))?;
        let sig = hex_decode(&self.sig).ok_or("checkpoint signature is not hex")?;
        if key.verify(&checkpoint_message(self.seq, &self.hash), &sig) {
            Ok(())
        } else {
            Err(format!(
                "checkpoint of seq {} has a bad signature",
                self.seq
            ))
        }
    }

    /// The fields of a [`CHECKPOINT_EVENT`] record naming this head (the record before it).
    pub fn to_fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("at_seq".into(), Value::from(self.seq));
        m.insert("at_hash".into(), Value::from(self.hash.clone()));
        m.insert("key_id".into(), Value::from(self.key_id.clone()));
        m.insert("sig".into(), Value::from(self.sig.clone()));
        m
    }

    /// Reads a [`CHECKPOINT_EVENT`] record's fields.
    pub fn from_record(v: &Value) -> Option<Self> {
        Some(Self {
            seq: v.get("at_seq")?.as_u64()?,
            hash: v.get("at_hash")?.as_str()?.to_owned(),
            key_id: v.get("key_id")?.as_str()?.to_owned(),
            sig: v.get("sig")?.as_str()?.to_owned(),
        })
    }
}

/// A record check for [`verify_anchored`]: every [`CHECKPOINT_EVENT`] record must name the
/// record just before it, with that record's hash, signed by a key in `keys`. A file rewritten
/// with recomputed hashes keeps no valid checkpoint after the first edited record.
pub fn check_checkpoints(keys: &KeySet) -> impl FnMut(&Value, &Head) -> Result<(), String> + '_ {
    move |record, prev| {
        if record.get("event").and_then(Value::as_str) != Some(CHECKPOINT_EVENT) {
            return Ok(());
        }
        let signed = SignedHead::from_record(record).ok_or("checkpoint record lacks fields")?;
        if signed.head() != *prev {
            return Err(format!(
                "checkpoint names seq {} but follows seq {}, or with another hash",
                signed.seq, prev.seq
            ));
        }
        signed.check(keys)
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
    use hopmesh_protocol::secret::SigningSeed;

    /// A temp directory removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("hopmesh-audit-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }
        fn log(&self) -> PathBuf {
            self.0.join("audit.jsonl")
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn small(max: u64) -> AuditOptions {
        AuditOptions {
            max_file_bytes: max,
            anchor: None,
        }
    }

    fn write_n(log: &mut AuditLog, from: u64, n: u64) {
        for i in from..from + n {
            log.record(i, "event", fields! {"n" => i, "pad" => "x".repeat(100)})
                .expect("record");
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_seed(&SigningSeed::from_bytes([7; 32]))
    }

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

    #[test]
    fn rotation_continues_the_chain_across_files_and_reopen_continues_it() {
        let tmp = Tmp::new("rotate");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open_with(&path, &small(1024)).expect("open");
        write_n(&mut log, 0, 40);
        let rotated = rotated_files(&path).expect("list");
        assert!(
            rotated.len() >= 4,
            "about 7 records per 1 KiB file: {rotated:?}"
        );
        assert_eq!(rotated[0].0, 1);
        for (first, file) in &rotated {
            assert!(fs::metadata(file).expect("meta").len() <= 1024);
            assert_eq!(first_seq_of(file), Some(*first));
        }
        drop(log);
        // Reopening continues from the active file (and the newest rotated file's tail).
        let (mut log, repaired) = AuditLog::open_with(&path, &small(1024)).expect("reopen");
        assert!(!repaired);
        assert_eq!(log.head().seq, 40);
        write_n(&mut log, 40, 10);
        let s = verify(&path).expect("the chain spans every file");
        assert_eq!(s.records, 50);
        assert_eq!(s.files, rotated_files(&path).expect("list").len() + 1);
        assert_eq!(s.last_hash, log.head().hash);
        // The first record of each file chains to the last of the previous one.
        let all = read_since(&path, 0).expect("read");
        assert_eq!(all.len(), 50);
        for w in all.windows(2) {
            assert_eq!(w[1]["prev"], w[0]["hash"]);
            assert_eq!(w[1]["seq"].as_u64(), w[0]["seq"].as_u64().map(|s| s + 1));
        }
        // Crash between the two renames of a rotation: no active file; open starts a new one.
        fs::rename(
            &path,
            rotated_path(&path, first_seq_of(&path).expect("first")),
        )
        .expect("mv");
        let (mut log, _) = AuditLog::open_with(&path, &small(1024)).expect("open without active");
        assert_eq!(log.head().seq, 50);
        write_n(&mut log, 50, 1);
        assert_eq!(verify(&path).expect("valid").records, 51);
    }

    #[test]
    fn a_missing_middle_or_oldest_file_is_detected() {
        let tmp = Tmp::new("missing");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open_with(&path, &small(1024)).expect("open");
        write_n(&mut log, 0, 40);
        drop(log);
        let rotated = rotated_files(&path).expect("list");
        let middle = &rotated[1].1;
        let saved = fs::read(middle).expect("read");
        fs::remove_file(middle).expect("rm");
        match verify(&path) {
            Err(AuditError::Broken { reason, .. }) => {
                assert!(reason.contains("a file is missing"), "{reason}");
            }
            other => panic!("missing middle file not detected: {other:?}"),
        }
        fs::write(middle, saved).expect("restore");
        verify(&path).expect("whole again");
        fs::remove_file(&rotated[0].1).expect("rm oldest");
        match verify(&path) {
            Err(AuditError::Broken { reason, .. }) => {
                assert!(reason.contains("earlier files are missing"), "{reason}");
            }
            other => panic!("missing oldest file not detected: {other:?}"),
        }
    }

    #[test]
    fn open_reads_only_the_active_file_and_the_previous_tail() {
        let tmp = Tmp::new("startup");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open_with(&path, &small(1024)).expect("open");
        write_n(&mut log, 0, 40);
        drop(log);
        // Damage the middle of the oldest file: start-up does not read it, verify does.
        let oldest = rotated_files(&path).expect("list")[0].1.clone();
        let text = fs::read_to_string(&oldest).expect("read");
        fs::write(&oldest, text.replacen("\"n\":1,", "\"n\":9,", 1)).expect("write");
        let (log, _) = AuditLog::open_with(&path, &small(1024)).expect("start-up is bounded");
        assert_eq!(log.head().seq, 40);
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 2, .. })
        ));
    }

    #[test]
    fn a_record_longer_than_the_cap_is_written_as_a_stub() {
        let tmp = Tmp::new("oversized");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open(&path).expect("open");
        let big = "y".repeat(MAX_RECORD_BYTES + 1);
        log.record(1, "big", fields! {"detail" => big})
            .expect("record");
        log.record(
            2,
            "fits",
            fields! {"detail" => "z".repeat(MAX_RECORD_BYTES - 200)},
        )
        .expect("record");
        let all = read_since(&path, 0).expect("read");
        assert_eq!(all[0]["event"], "big");
        assert!(all[0]["oversized_bytes"].as_u64().expect("size") > MAX_RECORD_BYTES as u64);
        assert!(all[0].get("detail").is_none());
        assert!(all[1]["detail"].is_string());
        assert_eq!(verify(&path).expect("valid").records, 2);
        // A hand-made line past the cap is refused by verify and skipped by readers.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(format!("{}\n", "q".repeat(MAX_RECORD_BYTES + 1)).as_bytes())
            .expect("write");
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 3, .. })
        ));
        assert_eq!(read_since(&path, 0).expect("read").len(), 2);
    }

    #[test]
    fn pages_are_capped_past_their_edge_and_skip_old_files() {
        let tmp = Tmp::new("page");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open_with(&path, &small(1024)).expect("open");
        write_n(&mut log, 0, 30);
        let p = read_page(&path, 0, 10, usize::MAX).expect("page");
        assert_eq!(p.records.len(), 10);
        assert!(p.more);
        assert_eq!(p.records[9]["seq"], 10);
        let p = read_page(&path, 20, 10, usize::MAX).expect("page");
        assert_eq!(p.records.len(), 10, "exactly at the cap");
        assert!(!p.more, "nothing after seq 30");
        let p = read_page(&path, 19, 10, usize::MAX).expect("page");
        assert_eq!(p.records.len(), 10);
        assert!(p.more, "one past the cap");
        // The byte cap: two and a half records hold two; at least one always comes back.
        let one = read_page(&path, 0, 1, usize::MAX).expect("page").records[0]
            .to_string()
            .len();
        let p = read_page(&path, 0, 100, one * 5 / 2).expect("page");
        assert_eq!(p.records.len(), 2);
        assert!(p.more);
        assert_eq!(read_page(&path, 0, 100, 1).expect("page").records.len(), 1);
        // Files wholly before `since` are not read: damage one, the page is unaffected.
        let oldest = rotated_files(&path).expect("list")[0].1.clone();
        fs::write(&oldest, "not json\n").expect("write");
        let p = read_page(&path, 25, 10, usize::MAX).expect("page");
        assert_eq!(
            p.records.first().map(|r| r["seq"].clone()),
            Some(Value::from(26))
        );
    }

    #[test]
    fn a_full_disk_fails_the_write_and_leaves_the_chain_intact() {
        let tmp = Tmp::new("full");
        let path = tmp.log();
        std::os::unix::fs::symlink("/dev/full", &path).expect("symlink");
        // Opening reads the device only as far as its length (0): it never ends otherwise.
        let (mut log, _) = AuditLog::open(&path).expect("open /dev/full");
        for durable in [false, true, false] {
            let r = if durable {
                log.record_durable(1, "revoke", fields! {})
            } else {
                log.record(1, "enroll", fields! {})
            };
            match r {
                Err(AuditError::Io { source, .. }) => {
                    assert_eq!(source.raw_os_error(), Some(28), "ENOSPC: {source}");
                }
                other => panic!("a write to a full disk succeeded: {other:?}"),
            }
            assert_eq!(log.head(), Head::genesis(), "the head does not move");
        }
    }

    #[test]
    fn a_partial_write_is_cut_back_so_the_chain_continues() {
        let tmp = Tmp::new("undo");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open(&path).expect("open");
        write_n(&mut log, 0, 2);
        // Simulate the bytes a failed write left behind, then undo them.
        let len = fs::metadata(&path).expect("meta").len();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open")
            .write_all(b"{\"seq\":3,\"ts\"")
            .expect("write");
        log.undo(len);
        assert!(!log.poisoned);
        write_n(&mut log, 2, 1);
        assert_eq!(verify(&path).expect("valid").records, 3);
    }

    #[test]
    fn the_anchor_catches_a_truncated_tail_and_a_rechained_rewrite() {
        let tmp = Tmp::new("anchor");
        let path = tmp.log();
        let (mut log, _) = AuditLog::open(&path).expect("open");
        write_n(&mut log, 0, 5);
        log.record_durable(5, "revoke", fields! {"node" => "n1"})
            .expect("record");
        let anchor = log.head();
        write_n(&mut log, 6, 2);
        drop(log);
        let original = fs::read_to_string(&path).expect("read");
        let anchored = |p: &Path| verify_anchored(p, Some(&anchor), &mut |_, _| Ok(()));
        assert_eq!(anchored(&path).expect("valid").records, 8);

        // Truncated below the anchored head: the chain itself is fine.
        let lines: Vec<&str> = original.lines().collect();
        fs::write(
            &path,
            lines[..4]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .expect("write");
        verify(&path).expect("a cut tail is a valid chain");
        match anchored(&path) {
            Err(AuditError::Anchor { reason, .. }) => {
                assert!(reason.contains("removed from the tail"), "{reason}")
            }
            other => panic!("truncation not detected: {other:?}"),
        }
        let opts = AuditOptions {
            anchor: Some(anchor.clone()),
            ..AuditOptions::default()
        };
        assert!(matches!(
            AuditLog::open_with(&path, &opts),
            Err(AuditError::Anchor { .. })
        ));

        // Rewritten and re-chained: edit record 3 and recompute every hash after it.
        fs::remove_file(&path).expect("rm");
        let (mut forged, _) = AuditLog::open(&path).expect("open");
        for (i, l) in lines.iter().enumerate() {
            let mut v: Value = serde_json::from_str(l).expect("json");
            let obj = v.as_object_mut().expect("object");
            let event = obj["event"].as_str().expect("event").to_owned();
            let ts = obj["ts"].as_u64().expect("ts");
            for k in ["seq", "ts", "event", "prev", "hash"] {
                obj.remove(k);
            }
            if i == 2 {
                obj.insert("n".into(), Value::from(99));
            }
            forged.record(ts, &event, obj.clone()).expect("record");
        }
        drop(forged);
        verify(&path).expect("the forger's chain is valid");
        match anchored(&path) {
            Err(AuditError::Anchor { reason, .. }) => {
                assert!(reason.contains("rewritten"), "{reason}")
            }
            other => panic!("rewrite not detected: {other:?}"),
        }
        assert!(matches!(
            AuditLog::open_with(&path, &opts),
            Err(AuditError::Anchor { .. })
        ));
        fs::write(&path, &original).expect("restore");
        AuditLog::open_with(&path, &opts).expect("the true log opens");
    }

    #[test]
    fn checkpoints_are_signed_and_a_rechained_file_cannot_keep_them() {
        let tmp = Tmp::new("checkpoint");
        let path = tmp.log();
        let key = key();
        let keys = KeySet::new(vec![key.verifying_key()]).expect("keys");
        let (mut log, _) = AuditLog::open(&path).expect("open");
        write_n(&mut log, 0, 3);
        let signed = SignedHead::sign(&log.head(), &key);
        signed.check(&keys).expect("verifies");
        log.record(3, CHECKPOINT_EVENT, signed.to_fields())
            .expect("checkpoint");
        write_n(&mut log, 4, 2);
        drop(log);
        let s = verify_anchored(&path, None, &mut check_checkpoints(&keys)).expect("valid");
        assert_eq!(s.checkpoints, 1);
        // Another key, another head, or a tampered signature: refused.
        let other = KeySet::new(vec![
            SigningKey::from_seed(&SigningSeed::from_bytes([8; 32])).verifying_key(),
        ])
        .expect("keys");
        assert!(verify_anchored(&path, None, &mut check_checkpoints(&other)).is_err());
        let mut moved = signed.clone();
        moved.seq = 2;
        assert!(moved.check(&keys).is_err());
        // A forger who edits record 2 and re-chains keeps the checkpoint record, whose signed
        // hash no longer matches record 3.
        let original = fs::read_to_string(&path).expect("read");
        fs::remove_file(&path).expect("rm");
        let (mut forged, _) = AuditLog::open(&path).expect("open");
        for (i, l) in original.lines().enumerate() {
            let mut v: Value = serde_json::from_str(l).expect("json");
            let obj = v.as_object_mut().expect("object");
            let event = obj["event"].as_str().expect("event").to_owned();
            for k in ["seq", "ts", "event", "prev", "hash"] {
                obj.remove(k);
            }
            if i == 1 {
                obj.insert("n".into(), Value::from(77));
            }
            forged.record(1, &event, obj.clone()).expect("record");
        }
        drop(forged);
        verify(&path).expect("a valid chain");
        match verify_anchored(&path, None, &mut check_checkpoints(&keys)) {
            Err(AuditError::Broken {
                line: 4, reason, ..
            }) => assert!(reason.contains("checkpoint"), "{reason}"),
            other => panic!("forged chain kept its checkpoint: {other:?}"),
        }
    }
}
