//! The embedded SQLite backend: one file beside the keys, WAL, `synchronous=FULL`.

use std::path::Path;

use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::SignedHead;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{
    BanSubject, JoinTokenRecord, JoinTokenUse, NodeRecord, PairState, Store, StoreError,
    StoredList, ban_row, i64_of, id_of, u64_of,
};

/// Schema version this build reads and writes. Version 2 added `audit_anchor`; a version 1
/// store is migrated on open (one transaction).
pub const SCHEMA_VERSION: i64 = 2;

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
        // The count only moves up (see PostgresStore::commit_reissue).
        let written = tx.execute(
            "INSERT INTO pairs (lo, hi, reissues) VALUES (?1, ?2, ?3)
             ON CONFLICT (lo, hi) DO UPDATE SET reissues = excluded.reissues
             WHERE pairs.reissues < excluded.reissues",
            params![lo, hi, i64::from(reissues)],
        )?;
        if written != 1 {
            return Err(StoreError::BadValue(format!(
                "reissue count {reissues} is not above the stored one"
            )));
        }
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

    fn anchor(seq: u64, hash: &str) -> SignedHead {
        SignedHead {
            seq,
            hash: hash.into(),
            key_id: "00".repeat(8),
            sig: "00".repeat(64),
        }
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
