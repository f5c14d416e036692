//! The PostgreSQL backend: tokio-postgres through a deadpool pool, TLS through rustls (ring).
//!
//! The [`Store`] trait is synchronous (the authority calls it under its lock, as it calls
//! SQLite), so this store owns a small tokio runtime of its own: each call runs there as one
//! task, bounded by [`PG_CALL_TIMEOUT`], and the caller waits on a channel. That works from any
//! thread, inside or outside another runtime. Every method is one transaction.
//!
//! Tables live in the schema `hopmesh`, so the database may hold other things. The schema is
//! versioned (`hopmesh.meta`), created and migrated by [`PostgresStore::init`] only, and bound
//! to one mesh: `hopmesh.mesh` holds the signing key of the verifier that created it, and
//! [`PostgresStore::open`] refuses a database of another mesh.
//!
//! Several verifiers (replicas) serve one database at once. Each write that the others must
//! apply also appends to `hopmesh.changes`, numbered from one locked counter in the same
//! transaction (so entries commit in order and a reader never skips one that commits later),
//! and notifies `hopmesh_changes`; each replica follows the feed (`authority/follow.rs`). A
//! serving replica holds a session advisory lock of its own (two processes with one TLS key
//! are refused) on a connection that also listens for the notifications.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::SignedHead;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Connection, GenericClient, NoTls, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::spec::{PgTarget, TlsPlan};
use super::{
    BanSubject, Change, ChangeKind, JoinTokenRecord, JoinTokenUse, NodeRecord, PairState, Store,
    StoreError, StoredList, ban_row, i64_of, id_of, u64_of,
};

/// Schema version this build reads and writes in PostgreSQL (1: the first PostgreSQL schema;
/// 2: the change feed, several serving replicas).
pub const PG_SCHEMA_VERSION: i64 = 2;
/// Connections in the pool (each call holds one for its transaction).
pub const PG_POOL_SIZE: usize = 8;
/// Longest a store call may take, waiting for a pooled connection included. Past it the call
/// fails with [`StoreError::Timeout`] and is not acknowledged. Short, because the authority
/// makes its calls under its lock: while one waits on a database that stopped answering,
/// nothing else at this replica (refreshes included) goes on; a control-plane commit on a
/// healthy database takes milliseconds.
pub const PG_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the calls made at start may take (opening: the first connections and the serve
/// lock; `init` and its migrations; the loads of whole tables: nodes, bans, pair states):
/// their size grows with the mesh, and nothing waits behind them.
pub const PG_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a new connection (TCP, TLS, authentication) may take.
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Advisory lock taken by `init` (in its transaction) so that concurrent inits serialise.
const INIT_LOCK: i64 = 0x686f_706d_6573_6801;
/// The channel a change notifies.
const CHANGE_CHANNEL: &str = "hopmesh_changes";
/// Longest a serving replica may go without reading the change feed to its head before it
/// stops issuing attestations (its follower reads at least every second): the bound on how
/// stale the state it issues from may be.
pub const FEED_STALE_BOUND: Duration = Duration::from_secs(5);

/// The advisory lock a serving replica holds for as long as it has the store open: one per
/// replica (its TLS key), so two processes of one replica are refused.
fn serve_lock_key(replica: &str) -> i64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("hopmesh serve lock\0{replica}").as_bytes(),
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

/// The migrations, in order: entry `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE hopmesh.meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE hopmesh.mesh (id INT PRIMARY KEY CHECK (id = 1), signing_key BYTEA NOT NULL);
CREATE TABLE hopmesh.join_tokens (
    secret_hash BYTEA PRIMARY KEY, name TEXT NOT NULL, segments TEXT,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT);
CREATE TABLE hopmesh.nodes (
    node_id BYTEA PRIMARY KEY, name TEXT NOT NULL, spki BYTEA NOT NULL, measurement BYTEA NOT NULL,
    addresses TEXT NOT NULL, enrolled_at BIGINT NOT NULL, revoked_at BIGINT);
CREATE TABLE hopmesh.bans (kind TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL,
    at BIGINT NOT NULL, PRIMARY KEY (kind, subject));
CREATE TABLE hopmesh.revocation_list (id INT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL,
    bytes BYTEA NOT NULL);
CREATE TABLE hopmesh.pairs (lo BYTEA NOT NULL, hi BYTEA NOT NULL, reissues INT NOT NULL,
    PRIMARY KEY (lo, hi));
CREATE TABLE hopmesh.compromised (lo BYTEA NOT NULL, hi BYTEA NOT NULL, generation BIGINT NOT NULL,
    at BIGINT NOT NULL, PRIMARY KEY (lo, hi, generation));
CREATE TABLE hopmesh.audit_anchor (replica TEXT PRIMARY KEY CHECK (replica <> ''),
    seq BIGINT NOT NULL, hash TEXT NOT NULL, key_id TEXT NOT NULL, sig TEXT NOT NULL);
INSERT INTO hopmesh.meta (key, value) VALUES ('next_serial', 1), ('serve_epoch', 0);
",
    "
CREATE TABLE hopmesh.changes (seq BIGINT PRIMARY KEY, replica TEXT NOT NULL, kind TEXT NOT NULL,
    subject BYTEA NOT NULL, at_ms BIGINT NOT NULL);
INSERT INTO hopmesh.meta (key, value) VALUES ('change_seq', 0);
DELETE FROM hopmesh.meta WHERE key = 'serve_epoch';
CREATE TABLE hopmesh.policy (id INT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL,
    text TEXT NOT NULL);
",
];

/// What [`PostgresStore::init`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// The schema was created.
    Created,
    /// The schema of this mesh was migrated from the given version.
    Migrated(i64),
    /// The schema of this mesh was already current.
    Current,
}

/// The serve lock of a serving store: the session holding its replica's advisory lock (and
/// listening for changes), and whether that session ended (`lost`). A store whose lock is lost
/// refuses every write and every issuance (fenced) until it has taken the lock again *and*
/// its follower has read the change feed to the head (`stale` until then): whatever other
/// replicas did meanwhile is applied before this one acts again.
struct ServeLock {
    target: PgTarget,
    key: i64,
    client: Option<tokio_postgres::Client>,
    lost: Arc<AtomicBool>,
    /// Taken again after a loss; the feed not yet read to the head since.
    stale: bool,
    /// An attempt to take the lock again, in flight on the store's runtime.
    retake: Option<std::sync::mpsc::Receiver<Retaken>>,
    /// When the follower last read the feed to its head.
    fresh_at: Instant,
    next_try: Instant,
}

/// What an attempt to take the serve lock again gives: the session and its `lost` flag, or
/// `None` when another session holds the lock.
type Retaken = Result<Option<(tokio_postgres::Client, Arc<AtomicBool>)>, StoreError>;

/// Longest a read of the change feed may take: shorter than [`PG_CALL_TIMEOUT`], since the
/// follower reads under the authority lock; a database that stops answering makes the feed
/// stale (and the replica fenced, [`FEED_STALE_BOUND`]) rather than holding the lock long.
pub const FEED_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest the serial reservation behind one attestation may take: it runs under the
/// authority lock, so a database that stops answering would otherwise hold every refresh at
/// this replica for [`PG_CALL_TIMEOUT`]; a refresh refused sooner lets its node move on.
pub const PG_ISSUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest time between two attempts of a fenced store to take its serve lock again.
pub const PG_RELOCK_INTERVAL: Duration = Duration::from_secs(1);

/// The PostgreSQL store.
pub struct PostgresStore {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// The serve lock, when opened to serve.
    serve: Option<ServeLock>,
    /// Notified when another replica wrote a change.
    signal: Arc<Notify>,
    /// Whose audit anchor this handle reads and writes: each verifier keeps its own audit
    /// log, so each has its own anchor (the hex of `SHA-256` of its TLS key's SPKI).
    replica: String,
    server: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Longest a dropped store waits to release its serve lock (the server releases it anyway
/// when the connection closes; this makes an immediate restart find it free).
const PG_UNLOCK_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let client = self
            .serve
            .as_mut()
            .and_then(|l| Some((l.client.take()?, l.key)));
        if let (Some((lock, key)), Some(rt)) = (client, self.rt.as_ref()) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                let _ = tokio::time::timeout(
                    PG_UNLOCK_TIMEOUT,
                    lock.execute("SELECT pg_advisory_unlock($1)", &[&key]),
                )
                .await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(PG_UNLOCK_TIMEOUT + Duration::from_millis(100));
        }
        // Dropping a runtime blocks, which panics inside another runtime: stop it in the
        // background instead (its tasks are this store's calls, all answered or timed out).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The server's message and SQLSTATE, or the connection failure with its causes.
pub(crate) fn pg_err(e: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Postgres(format!(
            "{} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        ));
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    StoreError::Postgres(text)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(&e),
        deadpool_postgres::PoolError::Timeout(_) => StoreError::Timeout(PG_CALL_TIMEOUT),
        other => StoreError::Postgres(other.to_string()),
    }
}

fn name_of(s: &str) -> Result<NodeName, StoreError> {
    NodeName::new(s).map_err(|e| StoreError::BadValue(e.to_string()))
}

/// The TLS connector for `target`, reading its CA file.
fn rustls_connector(target: &PgTarget) -> Result<MakeRustlsConnect, StoreError> {
    let path = target
        .ca
        .as_deref()
        .ok_or_else(|| StoreError::Config("TLS needs --store-ca".into()))?;
    let bad = |detail: String| StoreError::Config(format!("{}: {detail}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Drives a connection of its own: forwards notifications to `signal` and sets `lost` when
/// the connection ends, for whatever reason (the session lock ends with it).
async fn drive<S, T>(mut conn: Connection<S, T>, lost: Arc<AtomicBool>, signal: Arc<Notify>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => signal.notify_one(),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::error!(error = %e, "the store's serve-lock connection ended");
                break;
            }
            None => break,
        }
    }
    lost.store(true, Ordering::SeqCst);
}

/// Connects once outside the pool (the serve lock needs a connection of its own).
async fn connect_one(
    target: &PgTarget,
    lost: Arc<AtomicBool>,
    signal: Arc<Notify>,
) -> Result<tokio_postgres::Client, StoreError> {
    let (cfg, plan) = target.config()?;
    let client = match plan {
        TlsPlan::Plain => {
            let (client, conn) = cfg.connect(NoTls).await.map_err(|e| pg_err(&e))?;
            tokio::spawn(drive(conn, lost, signal));
            client
        }
        TlsPlan::Verify => {
            let (client, conn) = cfg
                .connect(rustls_connector(target)?)
                .await
                .map_err(|e| pg_err(&e))?;
            tokio::spawn(drive(conn, lost, signal));
            client
        }
    };
    Ok(client)
}

/// Takes the serve lock `key` on a connection of its own, which then listens for changes:
/// `Ok(None)` when another session holds it.
async fn take_serve_lock(
    target: &PgTarget,
    key: i64,
    lost: Arc<AtomicBool>,
    signal: Arc<Notify>,
) -> Result<Option<tokio_postgres::Client>, StoreError> {
    let c = connect_one(target, lost, signal).await?;
    let got: bool = c
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(|e| pg_err(&e))?
        .get(0);
    if !got {
        return Ok(None);
    }
    c.batch_execute(&format!("LISTEN {CHANGE_CHANNEL}"))
        .await
        .map_err(|e| pg_err(&e))?;
    Ok(Some(c))
}

/// Appends `changes` to the feed in `tx`, numbered from the locked counter row, and notifies
/// the other replicas (delivered at commit). Called last in a transaction, so the counter's
/// row lock is held only until the commit and always taken after every other row lock.
async fn record_changes(
    tx: &Transaction<'_>,
    replica: &str,
    changes: &[ChangeKind],
) -> Result<(), StoreError> {
    let n = i64::try_from(changes.len()).unwrap_or(i64::MAX);
    if n == 0 {
        return Ok(());
    }
    let last: i64 = tx
        .query_one(
            "UPDATE hopmesh.meta SET value = value + $1 WHERE key = 'change_seq' RETURNING value",
            &[&n],
        )
        .await
        .map_err(|e| pg_err(&e))?
        .get(0);
    for (seq, c) in (last - n + 1..).zip(changes) {
        let (kind, subject) = change_row(c);
        tx.execute(
            "INSERT INTO hopmesh.changes (seq, replica, kind, subject, at_ms)
             VALUES ($1, $2, $3, $4, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
            &[&seq, &replica, &kind, &subject],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    }
    tx.execute("SELECT pg_notify($1, '')", &[&CHANGE_CHANNEL])
        .await
        .map_err(|e| pg_err(&e))?;
    Ok(())
}

/// How a change is stored: its kind and subject bytes.
fn change_row(c: &ChangeKind) -> (&'static str, Vec<u8>) {
    match c {
        ChangeKind::Node(id) => ("node", id.as_bytes().to_vec()),
        ChangeKind::List => ("list", Vec::new()),
        ChangeKind::Policy => ("policy", Vec::new()),
        ChangeKind::Ban(BanSubject::Node(id)) => ("ban_node", id.as_bytes().to_vec()),
        ChangeKind::Ban(BanSubject::Name(n)) => ("ban_name", n.as_str().as_bytes().to_vec()),
        ChangeKind::Pair(p) => {
            let mut b = p.lo().as_bytes().to_vec();
            b.extend_from_slice(p.hi().as_bytes());
            ("pair", b)
        }
    }
}

/// The change a stored row names; a row no build writes is a [`StoreError::BadValue`].
pub(crate) fn change_of(kind: &str, subject: Vec<u8>) -> Result<ChangeKind, StoreError> {
    let bad = || {
        StoreError::BadValue(format!(
            "change feed entry {kind} of {} bytes",
            subject.len()
        ))
    };
    Ok(match kind {
        "node" => ChangeKind::Node(id_of(subject.clone()).map_err(|_| bad())?),
        "list" if subject.is_empty() => ChangeKind::List,
        "policy" if subject.is_empty() => ChangeKind::Policy,
        "ban_node" => ChangeKind::Ban(BanSubject::Node(id_of(subject.clone()).map_err(|_| bad())?)),
        "ban_name" => {
            let text = std::str::from_utf8(&subject).map_err(|_| bad())?;
            ChangeKind::Ban(BanSubject::Name(name_of(text)?))
        }
        "pair" if subject.len() == 64 => ChangeKind::Pair(PairIds::new(
            id_of(subject[..32].to_vec())?,
            id_of(subject[32..].to_vec())?,
        )),
        _ => return Err(bad()),
    })
}

/// The schema version, or `None` when the database holds no hopmesh schema.
async fn schema_version(c: &impl GenericClient) -> Result<Option<i64>, StoreError> {
    let exists: Option<String> = c
        .query_one("SELECT to_regclass('hopmesh.meta')::text", &[])
        .await
        .map_err(|e| pg_err(&e))?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let row = c
        .query_opt(
            "SELECT value FROM hopmesh.meta WHERE key = 'schema_version'",
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    Ok(Some(row.map_or(0, |r| r.get(0))))
}

/// Checks that the database belongs to the mesh whose signing key is `key`.
async fn check_mesh(c: &impl GenericClient, key: &[u8]) -> Result<(), StoreError> {
    let row = c
        .query_opt("SELECT signing_key FROM hopmesh.mesh WHERE id = 1", &[])
        .await
        .map_err(|e| pg_err(&e))?;
    match row {
        Some(r) if r.get::<_, Vec<u8>>(0) == key => Ok(()),
        Some(r) => Err(StoreError::WrongMesh(format!(
            "its signing key is {}, this verifier's is {}",
            hex::encode(r.get::<_, Vec<u8>>(0)),
            hex::encode(key)
        ))),
        None => Err(StoreError::WrongMesh("it names no mesh".into())),
    }
}

impl PostgresStore {
    fn connect(target: &PgTarget) -> Result<Self, StoreError> {
        let (cfg, plan) = target.config()?;
        let mgr_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match plan {
            TlsPlan::Plain => Manager::from_config(cfg, NoTls, mgr_config),
            TlsPlan::Verify => Manager::from_config(cfg, rustls_connector(target)?, mgr_config),
        };
        let pool = Pool::builder(mgr)
            .max_size(PG_POOL_SIZE)
            .wait_timeout(Some(PG_CALL_TIMEOUT))
            .create_timeout(Some(PG_CONNECT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hopmesh-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("store runtime: {e}")))?;
        Ok(Self {
            rt: Some(rt),
            pool,
            serve: None,
            signal: Arc::new(Notify::new()),
            replica: String::new(),
            server: target.describe(),
        })
    }

    /// Creates the schema in an empty database and binds it to the mesh whose signing key is
    /// `mesh_key`, or migrates this mesh's older schema. Refuses another mesh's database and a
    /// schema newer than this build. Concurrent inits serialise on an advisory lock.
    pub fn init(target: &PgTarget, mesh_key: &[u8]) -> Result<InitOutcome, StoreError> {
        Self::init_with(target, mesh_key, true)
    }

    /// [`Self::init`] that never creates: a database without this mesh's schema is refused
    /// ([`StoreError::Missing`]), so a re-run `init` pointed at the wrong (or an emptied)
    /// database cannot start the mesh over on an empty store.
    pub fn migrate(target: &PgTarget, mesh_key: &[u8]) -> Result<InitOutcome, StoreError> {
        Self::init_with(target, mesh_key, false)
    }

    fn init_with(
        target: &PgTarget,
        mesh_key: &[u8],
        create: bool,
    ) -> Result<InitOutcome, StoreError> {
        let store = Self::connect(target)?;
        let server = store.server.clone();
        let key = mesh_key.to_vec();
        store.run_within(PG_LOAD_TIMEOUT, |pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK])
                .await
                .map_err(|e| pg_err(&e))?;
            let found = schema_version(&*tx).await?;
            if found.is_none() && !create {
                return Err(StoreError::Missing(format!(
                    "{server} holds no hopmesh schema, and this data directory's store was \
                     made elsewhere: refusing to start the mesh over on an empty store"
                )));
            }
            if found.is_some() {
                check_mesh(&*tx, &key).await?;
            }
            let from = found.unwrap_or(0);
            if from > PG_SCHEMA_VERSION {
                return Err(newer(from));
            }
            if found.is_none() {
                tx.batch_execute("CREATE SCHEMA IF NOT EXISTS hopmesh")
                    .await
                    .map_err(|e| pg_err(&e))?;
            }
            for step in MIGRATIONS.iter().skip(usize::try_from(from).unwrap_or(0)) {
                tx.batch_execute(step).await.map_err(|e| pg_err(&e))?;
            }
            if found.is_none() {
                tx.execute(
                    "INSERT INTO hopmesh.mesh (id, signing_key) VALUES (1, $1)",
                    &[&key],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            }
            tx.execute(
                "INSERT INTO hopmesh.meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&PG_SCHEMA_VERSION],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(match found {
                None => InitOutcome::Created,
                Some(v) if v < PG_SCHEMA_VERSION => InitOutcome::Migrated(v),
                Some(_) => InitOutcome::Current,
            })
        })
    }

    /// Opens the store of the mesh whose signing key is `mesh_key` as verifier `replica` (the
    /// owner of the audit anchor it reads and writes; not empty): the schema must exist and
    /// be exactly this build's version. With `exclusive` (a serving verifier), also takes the
    /// replica's serve lock, held until the store is dropped: a second process serving as the
    /// same replica is refused ([`StoreError::InUse`]); other replicas serve beside it.
    pub fn open(
        target: &PgTarget,
        mesh_key: &[u8],
        replica: &str,
        exclusive: bool,
    ) -> Result<Self, StoreError> {
        if replica.is_empty() {
            return Err(StoreError::Config(
                "a store handle needs its replica's name".into(),
            ));
        }
        let mut store = Self::connect(target)?;
        store.replica = replica.to_owned();
        let key = mesh_key.to_vec();
        let server = store.server.clone();
        // At start: the first connection is made here, and nothing waits behind it.
        store.run_within(PG_LOAD_TIMEOUT, |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            match schema_version(&**c).await? {
                None => Err(StoreError::Missing(format!(
                    "{server} (no hopmesh schema); run `hopmesh-verifier init --store URL`"
                ))),
                Some(v) if v > PG_SCHEMA_VERSION => Err(newer(v)),
                Some(v) if v < PG_SCHEMA_VERSION => Err(StoreError::Corrupt {
                    path: server,
                    detail: format!(
                        "schema version {v}, this build needs {PG_SCHEMA_VERSION}: run \
                         `hopmesh-verifier init --store URL` to migrate it"
                    ),
                }),
                Some(_) => check_mesh(&**c, &key).await,
            }
        })?;
        if exclusive {
            let key = serve_lock_key(replica);
            let (t, lost, signal) = (
                target.clone(),
                Arc::new(AtomicBool::new(false)),
                store.signal.clone(),
            );
            let lost2 = lost.clone();
            let taken = store.run_within(PG_LOAD_TIMEOUT, |_| async move {
                take_serve_lock(&t, key, lost2, signal).await
            })?;
            let Some(client) = taken else {
                return Err(StoreError::InUse(store.server.clone()));
            };
            store.serve = Some(ServeLock {
                target: target.clone(),
                key,
                client: Some(client),
                lost,
                stale: false,
                retake: None,
                fresh_at: Instant::now(),
                next_try: Instant::now(),
            });
        }
        Ok(store)
    }

    /// For a serving store: `Ok` while it holds its serve lock and is not catching up; when
    /// the lock was lost, one attempt (at most every [`PG_RELOCK_INTERVAL`]) to take it again,
    /// after which it is fenced until the follower read the change feed to its head
    /// ([`Store::feed_current`]); [`StoreError::Fenced`] otherwise.
    fn check_lock(&mut self) -> Result<(), StoreError> {
        let Some(lock) = self.serve.as_mut() else {
            return Ok(());
        };
        if !lock.lost.load(Ordering::SeqCst) {
            return if lock.stale {
                Err(StoreError::Fenced(
                    "the serve lock was taken again; nothing is issued or acknowledged until the \
                     change feed is read to its head"
                        .into(),
                ))
            } else {
                Ok(())
            };
        }
        let fenced = |why: &str| {
            StoreError::Fenced(format!(
                "the serve lock was lost (the database restarted or is unreachable){why}; \
                 nothing is issued or acknowledged until it is taken again"
            ))
        };
        // An attempt in flight: never waited for here (the caller may hold the authority
        // lock, and a database that does not answer would hold it for the connect timeout).
        if let Some(rx) = &lock.retake {
            let got = match rx.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => return Err(fenced("")),
                Ok(got) => got,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Err(StoreError::Postgres("the attempt ended".into()))
                }
            };
            lock.retake = None;
            return match got {
                Ok(Some((client, lost))) => {
                    tracing::warn!("the store's serve lock was taken again; catching up");
                    lock.client = Some(client);
                    lock.lost = lost;
                    lock.stale = true;
                    // Whatever was notified while the lock was lost is read now.
                    self.signal.notify_one();
                    Err(fenced(
                        ", and was taken again: catching up on the change feed",
                    ))
                }
                Ok(None) => Err(fenced(
                    " and is held by another session of this replica (the old session may not \
                     have ended yet)",
                )),
                Err(_) => Err(fenced("")),
            };
        }
        if Instant::now() < lock.next_try {
            return Err(fenced(""));
        }
        lock.next_try = Instant::now() + PG_RELOCK_INTERVAL;
        let (target, key, signal) = (lock.target.clone(), lock.key, self.signal.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        lock.retake = Some(rx);
        if let Some(rt) = self.rt.as_ref() {
            rt.spawn(async move {
                let lost = Arc::new(AtomicBool::new(false));
                let attempt = take_serve_lock(&target, key, lost.clone(), signal);
                // In the background, so it may take a whole connect and a call.
                let bound = PG_CONNECT_TIMEOUT + PG_CALL_TIMEOUT;
                let got = match tokio::time::timeout(bound, attempt).await {
                    Ok(Ok(Some(client))) => Ok(Some((client, lost))),
                    Ok(Ok(None)) => Ok(None),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::Timeout(bound)),
                };
                let _ = tx.send(got);
            });
        }
        Err(fenced(""))
    }

    /// Test only: a server setting as this store's sessions see it (`SHOW`).
    #[cfg(test)]
    pub(crate) fn show(&self, setting: &'static str) -> Result<String, StoreError> {
        self.run(move |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.get(0))
        })
    }

    /// Runs one call on the store's runtime and waits for its answer (bounded by
    /// [`PG_CALL_TIMEOUT`]).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.run_within(PG_CALL_TIMEOUT, f)
    }

    /// [`Self::run`] bounded by `bound` instead.
    fn run_within<T, F, Fut>(&self, bound: Duration, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Postgres("the store runtime stopped".into()))?;
        let fut = f(self.pool.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let out = tokio::time::timeout(bound, fut)
                .await
                .unwrap_or(Err(StoreError::Timeout(bound)));
            let _ = tx.send(out);
        });
        rx.recv()
            .map_err(|_| StoreError::Postgres("a store call ended without an answer".into()))?
    }
}

fn newer(v: i64) -> StoreError {
    StoreError::Corrupt {
        path: "the PostgreSQL store".into(),
        detail: format!(
            "schema version {v} is newer than this build's {PG_SCHEMA_VERSION}; run a newer \
             hopmesh-verifier"
        ),
    }
}

/// Writes `list` in `tx` unless its version is not above the stored one, in one statement:
/// the upsert's `WHERE` is evaluated on the latest committed row (a concurrent writer, even
/// of the very first list, waits for the other's commit and then matches nothing), so a
/// version is never reused and never goes back, across replicas. (A `SELECT … FOR UPDATE`
/// first would lock nothing while no list exists: two first revokes both got version 1.)
async fn write_newer_list(tx: &Transaction<'_>, list: &StoredList) -> Result<(), StoreError> {
    let written = tx
        .execute(
            "INSERT INTO hopmesh.revocation_list AS l (id, version, bytes) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, bytes = EXCLUDED.bytes
             WHERE l.version < EXCLUDED.version",
            &[&i64_of(list.version), &list.bytes],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    if written == 1 {
        return Ok(());
    }
    let stored: i64 = tx
        .query_one(
            "SELECT version FROM hopmesh.revocation_list WHERE id = 1",
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?
        .get(0);
    Err(StoreError::StaleVersion {
        stored: u64_of(stored),
        offered: list.version,
    })
}

async fn insert_bans(
    tx: &Transaction<'_>,
    bans: &[BanSubject],
    reason: &str,
    at: i64,
) -> Result<(), StoreError> {
    for b in bans {
        let (kind, subject) = ban_row(b);
        tx.execute(
            "INSERT INTO hopmesh.bans (kind, subject, reason, at) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&kind, &subject, &reason, &at],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    }
    Ok(())
}

/// A node record from a row of `node_id, name, spki, measurement, addresses, enrolled_at,
/// revoked_at`.
fn node_of_row(r: &tokio_postgres::Row) -> Result<NodeRecord, StoreError> {
    let addrs: String = r.get(4);
    Ok(NodeRecord {
        node_id: id_of(r.get(0))?,
        name: name_of(r.get(1))?,
        spki: r.get(2),
        measurement: Measurement(
            r.get::<_, Vec<u8>>(3)
                .try_into()
                .map_err(|_| StoreError::BadValue("measurement".into()))?,
        ),
        addresses: addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        enrolled_at: UnixTime::from_secs(u64_of(r.get(5))),
        revoked_at: r
            .get::<_, Option<i64>>(6)
            .map(|t| UnixTime::from_secs(u64_of(t))),
    })
}

fn segments_of(s: Option<String>) -> Option<Vec<String>> {
    s.map(|s| {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

impl Store for PostgresStore {
    fn check_serving(&mut self) -> Result<(), StoreError> {
        self.check_lock()?;
        match &self.serve {
            Some(lock) if lock.fresh_at.elapsed() > FEED_STALE_BOUND => {
                Err(StoreError::Fenced(format!(
                    "the change feed was last read to its head {:?} ago (bound {FEED_STALE_BOUND:?}): \
                     this replica's state may be stale",
                    lock.fresh_at.elapsed()
                )))
            }
            _ => Ok(()),
        }
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn serial_block(&self) -> u64 {
        1
    }

    fn change_head(&self) -> Result<u64, StoreError> {
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_one(
                    "SELECT value FROM hopmesh.meta WHERE key = 'change_seq'",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(u64_of(row.get(0)))
        })
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let replica = self.replica.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run_within(FEED_READ_TIMEOUT, |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let rows = c
                .query(
                    "SELECT seq, replica, kind, subject, at_ms FROM hopmesh.changes
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&i64_of(after), &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.into_iter()
                .map(|r| {
                    Ok(Change {
                        seq: u64_of(r.get(0)),
                        mine: r.get::<_, &str>(1) == replica,
                        kind: change_of(r.get(2), r.get(3))?,
                        at_ms: u64_of(r.get(4)),
                    })
                })
                .collect()
        })
    }

    fn relock(&mut self) -> Result<(), StoreError> {
        match self.check_lock() {
            // Held again but stale: reading the feed is what makes it current.
            Err(StoreError::Fenced(_))
                if self
                    .serve
                    .as_ref()
                    .is_some_and(|l| l.stale && !l.lost.load(Ordering::SeqCst)) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    fn feed_current(&mut self) {
        if let Some(lock) = self.serve.as_mut()
            && !lock.lost.load(Ordering::SeqCst)
        {
            if lock.stale {
                tracing::warn!("caught up on the change feed: serving again");
            }
            lock.stale = false;
            lock.fresh_at = Instant::now();
        }
    }

    fn change_signal(&self) -> Option<Arc<Notify>> {
        Some(self.signal.clone())
    }

    fn policy(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_opt("SELECT version, text FROM hopmesh.policy WHERE id = 1", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.map(|r| (u64_of(r.get(0)), r.get(1))))
        })
    }

    fn put_policy(&mut self, text: &str) -> Result<u64, StoreError> {
        self.check_lock()?;
        let (text, replica) = (text.to_owned(), self.replica.clone());
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let version: i64 = tx
                .query_one(
                    "INSERT INTO hopmesh.policy AS p (id, version, text) VALUES (1, 1, $1)
                     ON CONFLICT (id) DO UPDATE SET version = p.version + 1, text = EXCLUDED.text
                     RETURNING version",
                    &[&text],
                )
                .await
                .map_err(|e| pg_err(&e))?
                .get(0);
            record_changes(&tx, &replica, &[ChangeKind::Policy]).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(u64_of(version))
        })
    }

    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let id = *id;
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_opt(
                    "SELECT node_id, name, spki, measurement, addresses, enrolled_at, revoked_at
                     FROM hopmesh.nodes WHERE node_id = $1",
                    &[&&id.as_bytes()[..]],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.as_ref().map(node_of_row).transpose()
        })
    }

    fn pair_state(&self, pair: &PairIds) -> Result<Option<PairState>, StoreError> {
        let pair = *pair;
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| pg_err(&e))?;
            let (lo, hi) = (pair.lo().as_bytes().to_vec(), pair.hi().as_bytes().to_vec());
            let reissues = tx
                .query_opt(
                    "SELECT reissues FROM hopmesh.pairs WHERE lo = $1 AND hi = $2",
                    &[&lo, &hi],
                )
                .await
                .map_err(|e| pg_err(&e))?
                .map(|r| u16::try_from(r.get::<_, i32>(0)))
                .transpose()
                .map_err(|_| StoreError::BadValue("reissue count".into()))?;
            let compromised: Vec<Generation> = tx
                .query(
                    "SELECT generation FROM hopmesh.compromised WHERE lo = $1 AND hi = $2
                     ORDER BY generation",
                    &[&lo, &hi],
                )
                .await
                .map_err(|e| pg_err(&e))?
                .iter()
                .map(|r| Generation(u64_of(r.get(0))))
                .collect();
            tx.commit().await.map_err(|e| pg_err(&e))?;
            if reissues.is_none() && compromised.is_empty() {
                return Ok(None);
            }
            Ok(Some(PairState {
                pair,
                reissues: reissues.unwrap_or(0),
                compromised,
            }))
        })
    }

    fn put_join_token(&mut self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        self.check_lock()?;
        let t = t.clone();
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            c.execute(
                "INSERT INTO hopmesh.join_tokens (secret_hash, name, segments, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &&t.secret_hash[..],
                    &t.name.as_str(),
                    &t.segments.as_ref().map(|s| s.join(",")),
                    &i64_of(t.created_at.as_secs()),
                    &i64_of(t.expires_at.as_secs()),
                ],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            Ok(())
        })
    }

    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<JoinTokenUse, StoreError> {
        self.check_lock()?;
        let hash = *secret_hash;
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let now_s = i64_of(now.as_secs());
            // One statement: the row lock makes a second, concurrent use (at any replica)
            // wait, re-check `used_at IS NULL` on the committed row, and match nothing.
            let taken = c
                .query_opt(
                    "UPDATE hopmesh.join_tokens SET used_at = $1
                     WHERE secret_hash = $2 AND used_at IS NULL AND expires_at > $1
                     RETURNING name, segments, created_at, expires_at",
                    &[&now_s, &&hash[..]],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if let Some(r) = taken {
                return Ok(JoinTokenUse::Valid(JoinTokenRecord {
                    secret_hash: hash,
                    name: name_of(r.get(0))?,
                    segments: segments_of(r.get(1)),
                    created_at: UnixTime::from_secs(u64_of(r.get(2))),
                    expires_at: UnixTime::from_secs(u64_of(r.get(3))),
                }));
            }
            let row = c
                .query_opt(
                    "SELECT used_at FROM hopmesh.join_tokens WHERE secret_hash = $1",
                    &[&&hash[..]],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(match row {
                None => JoinTokenUse::Unknown,
                Some(r) if r.get::<_, Option<i64>>(0).is_some() => JoinTokenUse::Used,
                Some(_) => JoinTokenUse::Expired,
            })
        })
    }

    fn put_node(&mut self, n: &NodeRecord) -> Result<(), StoreError> {
        self.check_lock()?;
        let (n, replica) = (n.clone(), self.replica.clone());
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            tx.execute(
                // A revocation mark is never cleared by a record write (see SqliteStore).
                "INSERT INTO hopmesh.nodes AS n
                    (node_id, name, spki, measurement, addresses, enrolled_at, revoked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (node_id) DO UPDATE SET name = EXCLUDED.name, spki = EXCLUDED.spki,
                    measurement = EXCLUDED.measurement, addresses = EXCLUDED.addresses,
                    enrolled_at = EXCLUDED.enrolled_at,
                    revoked_at = COALESCE(n.revoked_at, EXCLUDED.revoked_at)",
                &[
                    &&n.node_id.as_bytes()[..],
                    &n.name.as_str(),
                    &n.spki,
                    &&n.measurement.0[..],
                    &n.addresses.join(","),
                    &i64_of(n.enrolled_at.as_secs()),
                    &n.revoked_at.map(|t| i64_of(t.as_secs())),
                ],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            record_changes(&tx, &replica, &[ChangeKind::Node(n.node_id)]).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.run_within(PG_LOAD_TIMEOUT, |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let rows = c
                .query(
                    "SELECT node_id, name, spki, measurement, addresses, enrolled_at, revoked_at
                     FROM hopmesh.nodes ORDER BY name",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter().map(node_of_row).collect()
        })
    }

    fn bans(&self) -> Result<Vec<BanSubject>, StoreError> {
        self.run_within(PG_LOAD_TIMEOUT, |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let rows = c
                .query("SELECT kind, subject FROM hopmesh.bans", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let (kind, subject): (&str, &str) = (r.get(0), r.get(1));
                    Ok(match kind {
                        "node" => BanSubject::Node(
                            subject
                                .parse()
                                .map_err(|_| StoreError::BadValue("banned node id".into()))?,
                        ),
                        "name" => BanSubject::Name(name_of(subject)?),
                        other => return Err(StoreError::BadValue(format!("ban kind {other}"))),
                    })
                })
                .collect()
        })
    }

    fn put_bans(
        &mut self,
        bans: &[BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.check_lock()?;
        let (bans, reason) = (bans.to_vec(), reason.to_owned());
        let replica = self.replica.clone();
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            insert_bans(&tx, &bans, &reason, i64_of(at.as_secs())).await?;
            let changes: Vec<_> = bans.into_iter().map(ChangeKind::Ban).collect();
            record_changes(&tx, &replica, &changes).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[BanSubject],
        list: &StoredList,
    ) -> Result<(), StoreError> {
        self.check_lock()?;
        let (node, bans, list) = (*node, bans.to_vec(), list.clone());
        let replica = self.replica.clone();
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            write_newer_list(&tx, &list).await?;
            let at = i64_of(at.as_secs());
            tx.execute(
                "UPDATE hopmesh.nodes SET revoked_at = $1 WHERE node_id = $2 AND revoked_at IS NULL",
                &[&at, &&node.as_bytes()[..]],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            insert_bans(&tx, &bans, "revoked", at).await?;
            let mut changes = vec![ChangeKind::List, ChangeKind::Node(node)];
            changes.extend(bans.into_iter().map(ChangeKind::Ban));
            record_changes(&tx, &replica, &changes).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn revocation_list(&self) -> Result<Option<StoredList>, StoreError> {
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_opt(
                    "SELECT version, bytes FROM hopmesh.revocation_list WHERE id = 1",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.map(|r| StoredList {
                version: u64_of(r.get(0)),
                bytes: r.get(1),
            }))
        })
    }

    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), StoreError> {
        self.check_lock()?;
        let (list, replica) = (list.clone(), self.replica.clone());
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            write_newer_list(&tx, &list).await?;
            record_changes(&tx, &replica, &[ChangeKind::List]).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn reserve_serials(&mut self, n: u64) -> Result<u64, StoreError> {
        self.check_lock()?;
        self.run_within(PG_ISSUE_TIMEOUT, |pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            // One statement under the row lock: concurrent reservations never overlap.
            let row = c
                .query_one(
                    "UPDATE hopmesh.meta SET value = value + $1 WHERE key = 'next_serial'
                     RETURNING value - $1",
                    &[&i64_of(n)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(u64_of(row.get(0)))
        })
    }

    fn pair_states(&self) -> Result<Vec<PairState>, StoreError> {
        self.run_within(PG_LOAD_TIMEOUT, |pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            // One snapshot for both tables.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| pg_err(&e))?;
            let mut out: std::collections::BTreeMap<(NodeId, NodeId), PairState> =
                Default::default();
            for r in tx
                .query("SELECT lo, hi, reissues FROM hopmesh.pairs", &[])
                .await
                .map_err(|e| pg_err(&e))?
            {
                let pair = PairIds::new(id_of(r.get(0))?, id_of(r.get(1))?);
                let reissues = u16::try_from(r.get::<_, i32>(2))
                    .map_err(|_| StoreError::BadValue("reissue count".into()))?;
                out.insert(
                    (pair.lo(), pair.hi()),
                    PairState {
                        pair,
                        reissues,
                        compromised: Vec::new(),
                    },
                );
            }
            for r in tx
                .query(
                    "SELECT lo, hi, generation FROM hopmesh.compromised ORDER BY generation",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?
            {
                let pair = PairIds::new(id_of(r.get(0))?, id_of(r.get(1))?);
                out.entry((pair.lo(), pair.hi()))
                    .or_insert(PairState {
                        pair,
                        reissues: 0,
                        compromised: Vec::new(),
                    })
                    .compromised
                    .push(Generation(u64_of(r.get(2))));
            }
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(out.into_values().collect())
        })
    }

    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.check_lock()?;
        let (pair, compromised) = (*pair, compromised.to_vec());
        let replica = self.replica.clone();
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let (lo, hi) = (pair.lo().as_bytes().to_vec(), pair.hi().as_bytes().to_vec());
            // The count only moves up (a lower one would hand out seeds of generations
            // already marked compromised): a stale writer is refused, in one statement.
            let written = tx
                .execute(
                    "INSERT INTO hopmesh.pairs AS p (lo, hi, reissues) VALUES ($1, $2, $3)
                     ON CONFLICT (lo, hi) DO UPDATE SET reissues = EXCLUDED.reissues
                     WHERE p.reissues < EXCLUDED.reissues",
                    &[&lo, &hi, &i32::from(reissues)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if written != 1 {
                return Err(StoreError::BadValue(format!(
                    "reissue count {reissues} is not above the stored one"
                )));
            }
            for g in compromised {
                tx.execute(
                    "INSERT INTO hopmesh.compromised (lo, hi, generation, at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&lo, &hi, &i64_of(g.0), &i64_of(at.as_secs())],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            }
            record_changes(&tx, &replica, &[ChangeKind::Pair(pair)]).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn put_audit_anchor(&mut self, anchor: &SignedHead) -> Result<(), StoreError> {
        self.check_lock()?;
        let anchor = anchor.clone();
        let replica = self.replica.clone();
        self.run(|pool| async move {
            let mut c = pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            // Forward only, decided on the latest committed row (one statement).
            let written = tx
                .execute(
                    "INSERT INTO hopmesh.audit_anchor (replica, seq, hash, key_id, sig)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (replica) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,
                    key_id = EXCLUDED.key_id, sig = EXCLUDED.sig
                 WHERE hopmesh.audit_anchor.seq < EXCLUDED.seq
                    OR (hopmesh.audit_anchor.seq = EXCLUDED.seq
                        AND hopmesh.audit_anchor.hash = EXCLUDED.hash)",
                    &[
                        &replica,
                        &i64_of(anchor.seq),
                        &anchor.hash,
                        &anchor.key_id,
                        &anchor.sig,
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if written != 1 {
                return Err(StoreError::BadValue(format!(
                    "audit anchor would move back to seq {}",
                    anchor.seq
                )));
            }
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn audit_anchor(&self) -> Result<Option<SignedHead>, StoreError> {
        let replica = self.replica.clone();
        self.run(|pool| async move {
            let c = pool.get().await.map_err(pool_err)?;
            let row = c
                .query_opt(
                    "SELECT seq, hash, key_id, sig FROM hopmesh.audit_anchor WHERE replica = $1",
                    &[&replica],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.map(|r| SignedHead {
                seq: u64_of(r.get(0)),
                hash: r.get(1),
                key_id: r.get(2),
                sig: r.get(3),
            }))
        })
    }
}
