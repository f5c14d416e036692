//! Durable state behind a trait: embedded SQLite by default (WAL, `synchronous=FULL`).
//!
//! The verifier keeps its working state in memory and writes every change here **before**
//! acknowledging it; a revoke is acknowledged only after its transaction committed. The trait
//! exists so that a PostgreSQL backend can serve several verifier replicas later.
//!
//! Secrets are never stored here: join secrets only as SHA-256 hashes; keys live in 0600
//! files beside the store.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::{AuditError, SignedHead};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// Schema version this build reads and writes. Version 2 added `audit_anchor`; a version 1
/// store is migrated on open (one transaction).
pub const SCHEMA_VERSION: i64 = 2;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store does not exist and was not to be created.
    #[error("store {0} does not exist; run `hopmesh-verifier init` first")]
    Missing(String),
    /// The store exists but is damaged or not a hopmesh store.
    #[error("store {path} is corrupt or not a hopmesh store: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What was found.
        detail: String,
    },
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not parse.
    #[error("store holds a bad value: {0}")]
    BadValue(String),
    /// The audit log, the other half of the verifier's durable record, failed: the operation
    /// was not committed (and not acknowledged).
    #[error("the audit log failed, so nothing was committed: {0}")]
    Audit(#[from] AuditError),
    /// A revocation list whose version is not above the stored one: refused, nothing written.
    #[error("revocation list version {offered} is not above the stored version {stored}")]
    StaleVersion {
        /// The version in the store.
        stored: u64,
        /// The version offered.
        offered: u64,
    },
    /// This store does not implement an operation.
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
}

/// An enrolled node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// `SHA-256(spki)`.
    pub node_id: NodeId,
    /// Name bound at enrollment.
    pub name: NodeName,
    /// The key.
    pub spki: Vec<u8>,
    /// Last measurement seen.
    pub measurement: Measurement,
    /// Advertised addresses.
    pub addresses: Vec<String>,
    /// When it enrolled.
    pub enrolled_at: UnixTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<UnixTime>,
}

/// A one-time join secret (stored as its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// The node name it enrolls.
    pub name: NodeName,
    /// Segments the operator bound it to, if any (must match policy at enrollment).
    pub segments: Option<Vec<String>>,
    /// Creation time.
    pub created_at: UnixTime,
    /// Expiry.
    pub expires_at: UnixTime,
}

/// Outcome of trying to use a join secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinTokenUse {
    /// Valid: now marked used, in the same transaction.
    Valid(JoinTokenRecord),
    /// No such secret.
    Unknown,
    /// Already used.
    Used,
    /// Past its expiry.
    Expired,
}

/// Who a ban applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BanSubject {
    /// A key.
    Node(NodeId),
    /// A name: no key may enroll under it again.
    Name(NodeName),
}

/// A stored revocation list: its version and the exact signed bytes served to nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredList {
    /// Version.
    pub version: u64,
    /// Signed envelope.
    pub bytes: Vec<u8>,
}

/// Reissue state of a pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairState {
    /// The pair.
    pub pair: PairIds,
    /// Reissues so far.
    pub reissues: u16,
    /// Generations marked compromised.
    pub compromised: Vec<Generation>,
}

/// The store, shared by the authority and the commits the service makes outside the
/// authority's lock (an enrolment's join secret and record, a refresh's changed record). Lock
/// order: the authority's lock, then this one; code holding this lock never takes the
/// authority's.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

/// Locks `store`. A panic inside a call cannot leave a half-written commit (each method is one
/// transaction, rolled back unless committed), so a poisoned lock is still used.
pub fn lock(store: &SharedStore) -> MutexGuard<'_, Box<dyn Store>> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Durable verifier state. Every method commits before it returns.
pub trait Store: Send + std::fmt::Debug {
    /// Records a new join secret.
    fn put_join_token(&mut self, t: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Consumes a join secret atomically (check and mark used in one transaction).
    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<JoinTokenUse, StoreError>;
    /// Inserts or replaces a node record; a stored revocation mark is kept (never cleared).
    fn put_node(&mut self, n: &NodeRecord) -> Result<(), StoreError>;
    /// All node records.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// All bans (never pruned).
    fn bans(&self) -> Result<Vec<BanSubject>, StoreError>;
    /// Adds bans.
    fn put_bans(
        &mut self,
        bans: &[BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), StoreError>;
    /// Revokes a node: marks it, bans it and stores the new list, in one transaction. Refused
    /// whole ([`StoreError::StaleVersion`]) unless the list's version is above the stored one.
    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[BanSubject],
        list: &StoredList,
    ) -> Result<(), StoreError>;
    /// The current revocation list.
    fn revocation_list(&self) -> Result<Option<StoredList>, StoreError>;
    /// Replaces the revocation list (pruning); the version must be higher.
    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), StoreError>;
    /// Reserves `n` attestation serials and returns the first.
    fn reserve_serials(&mut self, n: u64) -> Result<u64, StoreError>;
    /// Reissue states of all pairs that have one.
    fn pair_states(&self) -> Result<Vec<PairState>, StoreError>;
    /// Records a reissue: the new count and the generations now compromised.
    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), StoreError>;
    /// Replaces the audit anchor: the signed head of the audit log, stored once that record is
    /// on disk. Refuses a lower seq, or the same seq with another hash (the anchor only moves
    /// forward). A store that keeps no anchor fails this, so durable operations fail closed.
    fn put_audit_anchor(&mut self, anchor: &SignedHead) -> Result<(), StoreError> {
        let _ = anchor;
        Err(StoreError::Unsupported("an audit anchor"))
    }
    /// The audit anchor, if one was stored.
    fn audit_anchor(&self) -> Result<Option<SignedHead>, StoreError> {
        Ok(None)
    }
}

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
CREATE TABLE join_tokens (
    secret_hash BLOB PRIMARY KEY, name TEXT NOT NULL, segments TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER) STRICT;
CREATE TABLE nodes (
    node_id BLOB PRIMARY KEY, name TEXT NOT NULL, spki BLOB NOT NULL, measurement BLOB NOT NULL,
    addresses TEXT NOT NULL, enrolled_at INTEGER NOT NULL, revoked_at INTEGER) STRICT;
CREATE TABLE bans (kind TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (kind, subject)) STRICT;
CREATE TABLE revocation_list (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, bytes BLOB NOT NULL) STRICT;
CREATE TABLE pairs (lo BLOB NOT NULL, hi BLOB NOT NULL, reissues INTEGER NOT NULL, PRIMARY KEY (lo, hi)) STRICT;
CREATE TABLE compromised (lo BLOB NOT NULL, hi BLOB NOT NULL, generation INTEGER NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (lo, hi, generation)) STRICT;
";

/// Added by schema version 2: the audit log's signed head (one row).
const SCHEMA_V2: &str = "
CREATE TABLE audit_anchor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL,
    hash TEXT NOT NULL, key_id TEXT NOT NULL, sig TEXT NOT NULL) STRICT;
";

fn i64_of(v: u64) -> i64 {
    // Times, serials and generations stay far below 2^63 in practice; saturate rather than wrap.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn id_of(blob: Vec<u8>) -> Result<NodeId, StoreError> {
    let bytes: [u8; 32] = blob
        .try_into()
        .map_err(|_| StoreError::BadValue("node id".into()))?;
    Ok(NodeId::from_bytes(bytes))
}

impl SqliteStore {
    /// Opens an existing store, checking its integrity and schema; refuses a missing one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.display().to_string(),
            detail,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt(e.to_string()))?;
        if check != "ok" {
            return Err(corrupt(check));
        }
        let version: Option<i64> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| corrupt(e.to_string()))?;
        let mut conn = conn;
        match version {
            Some(SCHEMA_VERSION) => {}
            Some(1) => {
                let tx = conn.transaction()?;
                tx.execute_batch(SCHEMA_V2)?;
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    params![SCHEMA_VERSION],
                )?;
                tx.commit()?;
                tracing::info!("store migrated from schema version 1 to {SCHEMA_VERSION}");
            }
            Some(v) => {
                return Err(corrupt(format!(
                    "schema version {v}, this build reads {SCHEMA_VERSION}"
                )));
            }
            None => return Err(corrupt("no schema version".into())),
        }
        Self::tune(&conn)?;
        Ok(Self { conn })
    }

    /// Creates a new store; refuses to touch an existing file.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                detail: "already exists; refusing to overwrite".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::tune(&conn)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(SCHEMA_V2)?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1), ('next_serial', 1)",
            params![SCHEMA_VERSION],
        )?;
        Ok(Self { conn })
    }

    fn tune(conn: &Connection) -> Result<(), StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(())
    }
}

fn ban_row(b: &BanSubject) -> (&'static str, String) {
    match b {
        BanSubject::Node(id) => ("node", id.to_string()),
        BanSubject::Name(n) => ("name", n.to_string()),
    }
}

/// Writes `list` inside `tx` unless its version is not above the stored one. The list's version
/// is the one counter of revocations: a writer working from a stale list is refused (and its
/// transaction rolls back whole), so a version is never reused and never goes back.
fn write_newer_list(tx: &rusqlite::Transaction<'_>, list: &StoredList) -> Result<(), StoreError> {
    let current: Option<i64> = tx
        .query_row(
            "SELECT version FROM revocation_list WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(v) = current.map(u64_of).filter(|v| *v >= list.version) {
        return Err(StoreError::StaleVersion {
            stored: v,
            offered: list.version,
        });
    }
    tx.execute(
        "INSERT OR REPLACE INTO revocation_list (id, version, bytes) VALUES (1, ?1, ?2)",
        params![i64_of(list.version), &list.bytes],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn put_join_token(&mut self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        let segments = t.segments.as_ref().map(|s| s.join(","));
        self.conn.execute(
            "INSERT INTO join_tokens (secret_hash, name, segments, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![&t.secret_hash[..], t.name.as_str(), segments, i64_of(t.created_at.as_secs()), i64_of(t.expires_at.as_secs())],
        )?;
        Ok(())
    }

    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<JoinTokenUse, StoreError> {
        let tx = self.conn.transaction()?;
        let row = tx
            .query_row(
                "SELECT name, segments, created_at, expires_at, used_at FROM join_tokens WHERE secret_hash = ?1",
                params![&secret_hash[..]],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((name, segments, created, expires, used)) = row else {
            return Ok(JoinTokenUse::Unknown);
        };
        if used.is_some() {
            return Ok(JoinTokenUse::Used);
        }
        if now.as_secs() >= u64_of(expires) {
            return Ok(JoinTokenUse::Expired);
        }
        tx.execute(
            "UPDATE join_tokens SET used_at = ?1 WHERE secret_hash = ?2",
            params![i64_of(now.as_secs()), &secret_hash[..]],
        )?;
        tx.commit()?;
        Ok(JoinTokenUse::Valid(JoinTokenRecord {
            secret_hash: *secret_hash,
            name: NodeName::new(&name).map_err(|e| StoreError::BadValue(e.to_string()))?,
            segments: segments.map(|s| {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            created_at: UnixTime::from_secs(u64_of(created)),
            expires_at: UnixTime::from_secs(u64_of(expires)),
        }))
    }

    fn put_node(&mut self, n: &NodeRecord) -> Result<(), StoreError> {
        self.conn.execute(
            // A revocation mark is never cleared by a record write: a refresh committed
            // outside the authority lock may land after the node's revocation.
            "INSERT INTO nodes (node_id, name, spki, measurement, addresses, enrolled_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (node_id) DO UPDATE SET name = excluded.name, spki = excluded.spki,
                measurement = excluded.measurement, addresses = excluded.addresses,
                enrolled_at = excluded.enrolled_at,
                revoked_at = COALESCE(nodes.revoked_at, excluded.revoked_at)",
            params![
                &n.node_id.as_bytes()[..],
                n.name.as_str(),
                &n.spki,
                &n.measurement.0[..],
                n.addresses.join(","),
                i64_of(n.enrolled_at.as_secs()),
                n.revoked_at.map(|t| i64_of(t.as_secs())),
            ],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT node_id, name, spki, measurement, addresses, enrolled_at, revoked_at FROM nodes ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, spki, m, addrs, enrolled, revoked) = row?;
            out.push(NodeRecord {
                node_id: id_of(id)?,
                name: NodeName::new(&name).map_err(|e| StoreError::BadValue(e.to_string()))?,
                spki,
                measurement: Measurement(
                    m.try_into()
                        .map_err(|_| StoreError::BadValue("measurement".into()))?,
                ),
                addresses: addrs
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect(),
                enrolled_at: UnixTime::from_secs(u64_of(enrolled)),
                revoked_at: revoked.map(|t| UnixTime::from_secs(u64_of(t))),
            });
        }
        Ok(out)
    }

    fn bans(&self) -> Result<Vec<BanSubject>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT kind, subject FROM bans")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, subject) = row?;
            out.push(match kind.as_str() {
                "node" => BanSubject::Node(
                    subject
                        .parse()
                        .map_err(|_| StoreError::BadValue("banned node id".into()))?,
                ),
                "name" => BanSubject::Name(
                    NodeName::new(&subject).map_err(|e| StoreError::BadValue(e.to_string()))?,
                ),
                other => return Err(StoreError::BadValue(format!("ban kind {other}"))),
            });
        }
        Ok(out)
    }

    fn put_bans(
        &mut self,
        bans: &[BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for b in bans {
            let (kind, subject) = ban_row(b);
            tx.execute(
                "INSERT OR IGNORE INTO bans (kind, subject, reason, at) VALUES (?1, ?2, ?3, ?4)",
                params![kind, subject, reason, i64_of(at.as_secs())],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[BanSubject],
        list: &StoredList,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        write_newer_list(&tx, list)?;
        tx.execute(
            "UPDATE nodes SET revoked_at = ?1 WHERE node_id = ?2 AND revoked_at IS NULL",
            params![i64_of(at.as_secs()), &node.as_bytes()[..]],
        )?;
        for b in bans {
            let (kind, subject) = ban_row(b);
            tx.execute(
                "INSERT OR IGNORE INTO bans (kind, subject, reason, at) VALUES (?1, ?2, 'revoked', ?3)",
                params![kind, subject, i64_of(at.as_secs())],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revocation_list(&self) -> Result<Option<StoredList>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT version, bytes FROM revocation_list WHERE id = 1",
                [],
                |r| {
                    Ok(StoredList {
                        version: u64_of(r.get(0)?),
                        bytes: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        write_newer_list(&tx, list)?;
        tx.commit()?;
        Ok(())
    }

    fn reserve_serials(&mut self, n: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let next: i64 = tx.query_row(
            "SELECT value FROM meta WHERE key = 'next_serial'",
            [],
            |r| r.get(0),
        )?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_serial'",
            params![next.saturating_add(i64_of(n))],
        )?;
        tx.commit()?;
        Ok(u64_of(next))
    }

    fn pair_states(&self) -> Result<Vec<PairState>, StoreError> {
        let mut out: std::collections::BTreeMap<(NodeId, NodeId), PairState> = Default::default();
        let mut stmt = self.conn.prepare("SELECT lo, hi, reissues FROM pairs")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })? {
            let (lo, hi, n) = row?;
            let pair = PairIds::new(id_of(lo)?, id_of(hi)?);
            let reissues =
                u16::try_from(n).map_err(|_| StoreError::BadValue("reissue count".into()))?;
            out.insert(
                (pair.lo(), pair.hi()),
                PairState {
                    pair,
                    reissues,
                    compromised: Vec::new(),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare("SELECT lo, hi, generation FROM compromised ORDER BY generation")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })? {
            let (lo, hi, g) = row?;
            let pair = PairIds::new(id_of(lo)?, id_of(hi)?);
            out.entry((pair.lo(), pair.hi()))
                .or_insert(PairState {
                    pair,
                    reissues: 0,
                    compromised: Vec::new(),
                })
                .compromised
                .push(Generation(u64_of(g)));
        }
        Ok(out.into_values().collect())
    }

    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let (lo_id, hi_id) = (pair.lo(), pair.hi());
        let (lo, hi) = (&lo_id.as_bytes()[..], &hi_id.as_bytes()[..]);
        tx.execute(
            "INSERT OR REPLACE INTO pairs (lo, hi, reissues) VALUES (?1, ?2, ?3)",
            params![lo, hi, i64::from(reissues)],
        )?;
        for g in compromised {
            tx.execute(
                "INSERT OR IGNORE INTO compromised (lo, hi, generation, at) VALUES (?1, ?2, ?3, ?4)",
                params![lo, hi, i64_of(g.0), i64_of(at.as_secs())],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_audit_anchor(&mut self, anchor: &SignedHead) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let current: Option<(i64, String)> = tx
            .query_row("SELECT seq, hash FROM audit_anchor WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((seq, hash)) = current {
            let seq = u64_of(seq);
            if seq > anchor.seq || (seq == anchor.seq && hash != anchor.hash) {
                return Err(StoreError::BadValue(format!(
                    "audit anchor would move back from seq {seq} to {}",
                    anchor.seq
                )));
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO audit_anchor (id, seq, hash, key_id, sig) VALUES (1, ?1, ?2, ?3, ?4)",
            params![i64_of(anchor.seq), anchor.hash, anchor.key_id, anchor.sig],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn audit_anchor(&self) -> Result<Option<SignedHead>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq, hash, key_id, sig FROM audit_anchor WHERE id = 1",
                [],
                |r| {
                    Ok(SignedHead {
                        seq: u64_of(r.get(0)?),
                        hash: r.get(1)?,
                        key_id: r.get(2)?,
                        sig: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).expect("valid")
    }

    #[test]
    fn missing_existing_and_corrupt_stores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.db");
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Missing(_))
        ));
        drop(SqliteStore::create(&path).expect("create"));
        assert!(SqliteStore::create(&path).is_err(), "must not overwrite");
        SqliteStore::open(&path).expect("reopen");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x42; 8192]).expect("write");
        assert!(matches!(
            SqliteStore::open(&junk),
            Err(StoreError::Corrupt { .. })
        ));
        let empty = dir.path().join("empty.db");
        drop(Connection::open(&empty).expect("sqlite"));
        std::fs::write(&empty, b"").expect("truncate");
        assert!(matches!(
            SqliteStore::open(&empty),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn join_tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::create(&dir.path().join("s.db")).expect("create");
        let t = JoinTokenRecord {
            secret_hash: [1; 32],
            name: name("a"),
            segments: Some(vec!["s1".into()]),
            created_at: UnixTime::from_secs(100),
            expires_at: UnixTime::from_secs(200),
        };
        s.put_join_token(&t).expect("put");
        s.put_join_token(&JoinTokenRecord {
            secret_hash: [2; 32],
            ..t.clone()
        })
        .expect("put");
        assert_eq!(
            s.take_join_token(&[9; 32], UnixTime::from_secs(150))
                .expect("take"),
            JoinTokenUse::Unknown
        );
        assert_eq!(
            s.take_join_token(&[2; 32], UnixTime::from_secs(200))
                .expect("take"),
            JoinTokenUse::Expired
        );
        assert_eq!(
            s.take_join_token(&[1; 32], UnixTime::from_secs(150))
                .expect("take"),
            JoinTokenUse::Valid(t)
        );
        assert_eq!(
            s.take_join_token(&[1; 32], UnixTime::from_secs(151))
                .expect("take"),
            JoinTokenUse::Used
        );
    }

    #[test]
    fn a_record_write_updates_a_node_but_never_clears_its_revocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::create(&dir.path().join("s.db")).expect("create");
        let id = NodeId::from_bytes([7; 32]);
        let rec = NodeRecord {
            node_id: id,
            name: name("a"),
            spki: vec![1],
            measurement: Measurement([4; 32]),
            addresses: vec!["127.0.0.1:1".into()],
            enrolled_at: UnixTime::from_secs(5),
            revoked_at: None,
        };
        s.put_node(&rec).expect("node");
        let list = StoredList {
            version: 1,
            bytes: vec![1],
        };
        s.commit_revocation(&id, UnixTime::from_secs(9), &[], &list)
            .expect("revoke");
        // A refresh decided before the revocation and committed after it.
        let mut late = rec.clone();
        late.addresses = vec!["127.0.0.1:2".into()];
        s.put_node(&late).expect("late refresh");
        let stored = s.nodes().expect("nodes");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].addresses, late.addresses, "the write landed");
        assert_eq!(stored[0].revoked_at, Some(UnixTime::from_secs(9)));
    }

    #[test]
    fn revocations_bans_serials_and_pairs_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        let id = NodeId::from_bytes([7; 32]);
        {
            let mut s = SqliteStore::create(&path).expect("create");
            s.put_node(&NodeRecord {
                node_id: id,
                name: name("a"),
                spki: vec![1, 2, 3],
                measurement: Measurement([4; 32]),
                addresses: vec!["127.0.0.1:1".into(), "[::1]:2".into()],
                enrolled_at: UnixTime::from_secs(5),
                revoked_at: None,
            })
            .expect("node");
            s.commit_revocation(
                &id,
                UnixTime::from_secs(9),
                &[BanSubject::Node(id)],
                &StoredList {
                    version: 1,
                    bytes: vec![1],
                },
            )
            .expect("revoke");
            s.put_bans(
                &[BanSubject::Name(name("a"))],
                "operator",
                UnixTime::from_secs(10),
            )
            .expect("ban");
            assert_eq!(s.reserve_serials(100).expect("reserve"), 1);
            assert_eq!(s.reserve_serials(100).expect("reserve"), 101);
            let pair = PairIds::new(id, NodeId::from_bytes([8; 32]));
            s.commit_reissue(
                &pair,
                1,
                &[Generation(3), Generation(4)],
                UnixTime::from_secs(11),
            )
            .expect("reissue");
            assert!(
                s.put_revocation_list(&StoredList {
                    version: 1,
                    bytes: vec![2]
                })
                .is_err(),
                "versions never repeat"
            );
        }
        let s = SqliteStore::open(&path).expect("reopen");
        let nodes = s.nodes().expect("nodes");
        assert_eq!(nodes[0].revoked_at, Some(UnixTime::from_secs(9)));
        assert_eq!(nodes[0].addresses, vec!["127.0.0.1:1", "[::1]:2"]);
        let mut bans = s.bans().expect("bans");
        bans.sort();
        assert_eq!(
            bans,
            vec![BanSubject::Node(id), BanSubject::Name(name("a"))]
        );
        assert_eq!(
            s.revocation_list().expect("list"),
            Some(StoredList {
                version: 1,
                bytes: vec![1]
            })
        );
        let pairs = s.pair_states().expect("pairs");
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].reissues, 1);
        assert_eq!(pairs[0].compromised, vec![Generation(3), Generation(4)]);
        let mut s = s;
        assert_eq!(
            s.reserve_serials(1).expect("reserve"),
            201,
            "serials never go back"
        );
    }

    #[test]
    fn a_revocation_with_a_stale_list_version_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::create(&dir.path().join("s.db")).expect("create");
        let (a, b) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        for (id, n) in [(a, "a"), (b, "b")] {
            s.put_node(&NodeRecord {
                node_id: id,
                name: name(n),
                spki: vec![1],
                measurement: Measurement([4; 32]),
                addresses: vec![],
                enrolled_at: UnixTime::from_secs(5),
                revoked_at: None,
            })
            .expect("node");
        }
        let list = |version| StoredList {
            version,
            bytes: vec![u8::try_from(version).expect("small")],
        };
        s.commit_revocation(&a, UnixTime::from_secs(9), &[BanSubject::Node(a)], &list(2))
            .expect("first");
        // A writer that read version 1 (or 2) before that commit offers a stale version.
        for stale in [1, 2] {
            let e = s
                .commit_revocation(
                    &b,
                    UnixTime::from_secs(10),
                    &[BanSubject::Node(b)],
                    &list(stale),
                )
                .expect_err("stale");
            assert!(
                matches!(e, StoreError::StaleVersion { stored: 2, offered } if offered == stale),
                "{e}"
            );
        }
        assert_eq!(s.revocation_list().expect("list"), Some(list(2)));
        let nodes = s.nodes().expect("nodes");
        let b_rec = nodes.iter().find(|n| n.node_id == b).expect("b");
        assert_eq!(
            b_rec.revoked_at, None,
            "nothing of the refused commit landed"
        );
        assert_eq!(s.bans().expect("bans"), vec![BanSubject::Node(a)]);
        s.commit_revocation(
            &b,
            UnixTime::from_secs(10),
            &[BanSubject::Node(b)],
            &list(3),
        )
        .expect("the next version");
        assert_eq!(s.revocation_list().expect("list"), Some(list(3)));
    }

    fn anchor(seq: u64, hash: &str) -> SignedHead {
        SignedHead {
            seq,
            hash: hash.into(),
            key_id: "00".repeat(8),
            sig: "00".repeat(64),
        }
    }

    #[test]
    fn the_audit_anchor_persists_and_only_moves_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        {
            let mut s = SqliteStore::create(&path).expect("create");
            assert_eq!(s.audit_anchor().expect("read"), None);
            s.put_audit_anchor(&anchor(5, "aa")).expect("put");
            s.put_audit_anchor(&anchor(5, "aa"))
                .expect("the same head again");
            assert!(s.put_audit_anchor(&anchor(4, "bb")).is_err(), "backwards");
            assert!(
                s.put_audit_anchor(&anchor(5, "bb")).is_err(),
                "same seq, other hash"
            );
            s.put_audit_anchor(&anchor(9, "cc")).expect("forward");
        }
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.audit_anchor().expect("read"), Some(anchor(9, "cc")));
    }

    #[test]
    fn a_version_1_store_is_migrated_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        {
            let conn = Connection::open(&path).expect("sqlite");
            conn.execute_batch(SCHEMA).expect("v1 schema");
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', 1), ('next_serial', 7)",
                [],
            )
            .expect("meta");
        }
        let mut s = SqliteStore::open(&path).expect("a v1 store opens");
        s.put_audit_anchor(&anchor(1, "aa"))
            .expect("the new table exists");
        assert_eq!(s.reserve_serials(1).expect("serials kept"), 7);
        drop(s);
        let conn = Connection::open(&path).expect("sqlite");
        let v: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
    }
}
