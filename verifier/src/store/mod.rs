//! Durable state behind a trait, with two backends: embedded SQLite (the default: one verifier
//! on one machine; WAL, `synchronous=FULL`) and PostgreSQL (`--store postgres://…`).
//!
//! The verifier keeps its working state in memory and writes every change here **before**
//! acknowledging it; a revoke is acknowledged only after its transaction committed. The same
//! contract suite (`contract.rs`) runs against both backends.
//!
//! Secrets are never stored here: join secrets only as SHA-256 hashes; keys live in 0600
//! files beside the store.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::{AuditError, SignedHead};

mod counted;
mod postgres;
mod spec;
mod sqlite;

pub use counted::{Counted, failure_kind};
pub use postgres::{
    FEED_READ_TIMEOUT, FEED_STALE_BOUND, PG_CALL_TIMEOUT, PG_CONNECT_TIMEOUT, PG_ISSUE_TIMEOUT,
    PG_LOAD_TIMEOUT, PG_POOL_SIZE, PG_RELOCK_INTERVAL, PG_SCHEMA_VERSION, PostgresStore,
};
pub use spec::{PG_IDLE_IN_TRANSACTION, PgTarget, StoreSpec, TlsPlan, plan_tls};
pub use sqlite::{SCHEMA_VERSION, SqliteStore};

#[cfg(test)]
mod contract;
#[cfg(test)]
pub(crate) mod pg_cluster;

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
    /// PostgreSQL failed (the server's message, or why the connection failed).
    #[error("store (PostgreSQL): {0}")]
    Postgres(String),
    /// A PostgreSQL call did not finish within its bound; whether it committed is unknown,
    /// so it was not acknowledged.
    #[error("store (PostgreSQL): no answer within {0:?}; the operation was not acknowledged")]
    Timeout(std::time::Duration),
    /// The database holds another mesh's state (another signing key).
    #[error("the store belongs to another mesh: {0}")]
    WrongMesh(String),
    /// This verifier lost its serve lock (and, if another verifier served meanwhile, for
    /// good): nothing is issued or acknowledged.
    #[error("store (PostgreSQL): fenced: {0}")]
    Fenced(String),
    /// Another process already serves this database as the same replica (the same TLS key).
    #[error(
        "another process is serving this database as this replica ({0}); each replica runs once (make another with `init --replica-of`)"
    )]
    InUse(String),
    /// The store location or its TLS settings are not usable.
    #[error("store settings: {0}")]
    Config(String),
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

/// One entry of a shared store's change feed: what another verifier changed, to be read
/// again from the store and applied (`authority/follow.rs`). Entries are numbered from one
/// locked counter in the writing transaction, so they commit in `seq` order: a reader that
/// has seen `seq` has seen everything before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed (1, 2, ...; no gaps).
    pub seq: u64,
    /// Written by this verifier (already applied here).
    pub mine: bool,
    /// What changed.
    pub kind: ChangeKind,
    /// When the change committed (the database's clock, milliseconds since the epoch).
    pub at_ms: u64,
}

/// What a [`Change`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A node record (enrolled, re-addressed, revoked).
    Node(NodeId),
    /// The revocation list.
    List,
    /// A ban.
    Ban(BanSubject),
    /// A pair's reissue state.
    Pair(PairIds),
    /// The mesh's policy.
    Policy,
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
    /// May this verifier issue now? A shared store refuses ([`StoreError::Fenced`]) while
    /// this verifier does not hold its serve lock, or has not read the change feed to its head
    /// within [`FEED_STALE_BOUND`]: it checks it before every attestation.
    fn check_serving(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Do other verifiers write this store too (then the authority follows its change feed)?
    fn is_shared(&self) -> bool {
        false
    }
    /// Attestation serials to reserve at once. One for a shared store: each serial is then
    /// taken from the shared counter when it is issued, so a node's serials increase across
    /// verifiers (a block reserved earlier elsewhere would hand out lower ones).
    fn serial_block(&self) -> u64 {
        1024
    }
    /// The last entry of the change feed (0: none). Read before the state is loaded, so
    /// nothing committed in between is missed.
    fn change_head(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Up to `limit` entries after `after`, written by other verifiers, in order.
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let _ = (after, limit);
        Ok(Vec::new())
    }
    /// The follower read the feed to its head: the store may serve (see
    /// [`Self::check_serving`]).
    fn feed_current(&mut self) {}
    /// Called by the follower before it reads the feed: a store that lost its serve lock tries
    /// to take it again (rate-limited, never waiting), so it is back, caught up, without
    /// waiting for a write. `Err` while the lock is not held: the feed is not read then (the
    /// database is gone or restarting; a read would only wait).
    fn relock(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Woken when another verifier wrote a change (a lost wake-up only delays: the follower
    /// also polls).
    fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// The mesh's policy text and its version, on a shared store (every replica serves the
    /// same policy): `None` on a store of one verifier (it reads its policy file) or before
    /// any was stored.
    fn policy(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(None)
    }
    /// Stores `text` as the mesh's next policy version and returns it (0: this store keeps no
    /// policy). Every replica applies it from the change feed.
    fn put_policy(&mut self, text: &str) -> Result<u64, StoreError> {
        let _ = text;
        Ok(0)
    }
    /// One node record.
    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.nodes()?.into_iter().find(|n| n.node_id == *id))
    }
    /// One pair's reissue state.
    fn pair_state(&self, pair: &PairIds) -> Result<Option<PairState>, StoreError> {
        Ok(self.pair_states()?.into_iter().find(|p| p.pair == *pair))
    }
}

pub(crate) fn i64_of(v: u64) -> i64 {
    // Times, serials and generations stay far below 2^63 in practice; saturate rather than wrap.
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn id_of(blob: Vec<u8>) -> Result<NodeId, StoreError> {
    let bytes: [u8; 32] = blob
        .try_into()
        .map_err(|_| StoreError::BadValue("node id".into()))?;
    Ok(NodeId::from_bytes(bytes))
}

pub(crate) fn ban_row(b: &BanSubject) -> (&'static str, String) {
    match b {
        BanSubject::Node(id) => ("node", id.to_string()),
        BanSubject::Name(n) => ("name", n.to_string()),
    }
}
