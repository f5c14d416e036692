//! The hopmesh verifier: attests nodes, compiles policy into per-node routing tables, issues
//! pair seeds only for allowed pairs, revokes, and reports.
//!
//! A library with a thin `main.rs`: [`start`] takes an already bound UDP socket and TCP
//! listener, so tests run a verifier in process on 127.0.0.1 port 0.
//!
//! It does **not** see traffic: it never learns the QUIC connection secrets (the hop-token
//! stream key is bound to each connection's TLS exporter), so it cannot decrypt or forge
//! data-plane streams.
//!
//! # Layout
//! - [`authority`]: state and every decision (enroll, refresh, revoke, ban, reissue, pushes).
//! - [`store`]: the durable store trait and its SQLite implementation.
//! - [`datadir`]: the data directory (keys, token, store, pins).
//! - [`service`]: the node-facing QUIC service.
//! - [`admin`]: the admin HTTP API and its client.
//! - [`admin_addr`]: where the admin API listens (Unix socket 0600 or loopback TCP) and how
//!   the client knows it reached this verifier.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the crate's error type.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_addr;
pub mod authority;
pub mod datadir;
pub mod error;
pub mod metrics;
pub mod service;
pub mod store;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::time::{Clock, UnixTime};
use hopmesh_transport::quic::{endpoint, quinn_server};
use hopmesh_transport::tls::{self, ALPN_CONTROL, AnyKey};
use hopmesh_transport::verifier_cert::CertifiedTlsKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_addr::{AdminAddr, AdminListener};
use crate::authority::{Authority, Parts, Settings};
use crate::datadir::DataDir;
use crate::error::VerifierError;
use crate::metrics::Metrics;
use crate::store::{Counted, StoreSpec};

/// State shared by the QUIC service, the admin API and the ticker.
pub struct Shared {
    authority: Mutex<Authority>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    admin_token: String,
    policy_path: PathBuf,
    /// The [`AUTHORITY_TASKS`] blocking slots of [`Shared::blocking`].
    tasks: tokio::sync::Semaphore,
    /// The [`ENROLLMENT_TASKS`] blocking slots of [`Shared::blocking_enrollment`].
    enrollments: tokio::sync::Semaphore,
}

/// Most node-service authority calls on the blocking pool at once ([`Shared::blocking`]); more
/// wait, asynchronously and in order, counted in `authority_waiting`. The authority is one lock:
/// two slots keep one thread on it and one ready behind it; more only add threads parked on the
/// lock, and their hand-offs cost CPU (8 slots: 4 600 attestations per verifier CPU-s at 10 000
/// nodes against 6 100 with 2, in the simulator).
pub const AUTHORITY_TASKS: usize = 2;

/// Most enrolments on the blocking pool at once ([`Shared::blocking_enrollment`]): an
/// enrolment spends most of its time in its two store commits, outside the authority lock, so
/// these slots are separate and more (with the 2 of [`AUTHORITY_TASKS`], enrolment at 10 000
/// nodes fell to 0.68x the rate at 100).
pub const ENROLLMENT_TASKS: usize = 8;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// The authority, locked. Operations under the lock are short (no network IO).
    pub fn authority(&self) -> MutexGuard<'_, Authority> {
        authority::lock_authority(&self.authority)
    }

    /// Runs `f` on the blocking pool, at most [`AUTHORITY_TASKS`] at once. Waiting for the
    /// authority lock (held by a seed-rotation batch, a reload, an operator's commit) then
    /// never holds up a runtime worker, and with it the handshakes, connections and push
    /// writes it drives: with two workers, two requests parked on the lock froze them all.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> T {
        self.queued(&self.tasks, f).await
    }

    /// As [`blocking`](Self::blocking), in the [`ENROLLMENT_TASKS`] slots.
    pub async fn blocking_enrollment<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> T {
        self.queued(&self.enrollments, f).await
    }

    async fn queued<T: Send + 'static>(
        self: &Arc<Self>,
        slots: &tokio::sync::Semaphore,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> T {
        let waiting = Waiting::new(&self.metrics.authority_waiting);
        // Never closed: `ok()` only drops the impossible error.
        let permit = slots.acquire().await.ok();
        drop(waiting);
        let done = self.unqueued(f).await;
        drop(permit);
        done
    }

    /// Runs `f` on the blocking pool without waiting for a slot: the admin API's calls, which
    /// are authenticated and rare, so a revocation never queues behind node requests; and the
    /// commit of a refresh already decided, which must run to its end (a blocking task is
    /// never cancelled once spawned, a wait for a slot could be).
    pub async fn unqueued<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> T {
        let shared = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&shared)).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down and drops this task too.
            Err(_) => std::future::pending().await,
        }
    }

    /// The metrics (they need no lock).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Now, from the verifier's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Re-reads the policy file and pushes the routing tables that changed.
    pub fn reload_policy(&self) -> Result<authority::PolicyReload, VerifierError> {
        let text = std::fs::read_to_string(&self.policy_path)
            .map_err(|e| VerifierError::io(format!("read {}", self.policy_path.display()), e))?;
        // Parsed before the lock: a large policy's parse never holds up the mesh.
        let policy =
            hopmesh_protocol::policy::Policy::parse(&text).map_err(authority::AdminError::from)?;
        let now = self.now();
        Ok(self.authority().reload_stored(policy, &text, now)?)
    }
}

/// Counts one waiter in a gauge while it lives (also when its future is dropped while waiting).
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How to run.
#[derive(Clone)]
pub struct ServeOptions {
    /// Settings.
    pub settings: Settings,
    /// The policy file.
    pub policy_path: PathBuf,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Where the store is.
    pub store: StoreSpec,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("settings", &self.settings)
            .field("policy", &self.policy_path)
            .field("store", &self.store)
            .finish()
    }
}

/// A running verifier.
#[derive(Debug)]
pub struct Running {
    /// The node-facing QUIC address.
    pub node_addr: SocketAddr,
    /// The admin API address.
    pub admin_addr: AdminAddr,
    /// Shared state (tests drive the authority directly).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, closes connections and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// How often the ticker calls [`Authority::tick`] (audit summaries and checkpoints, revocation
/// pruning, the seed rotation's due nodes).
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Pause between two seed-rotation batches while more are due, with the authority lock
/// released: whoever waits for the lock (a revocation, an enrolment, a refresh) takes it here, so
/// nothing waits longer than one batch (`authority/rotation.rs`).
pub const ROTATION_PAUSE: Duration = Duration::from_millis(1);

/// The periodic work: every [`TICK_INTERVAL`] one tick, then further rotation batches while
/// nodes are due, each its own lock hold ([`ROTATION_PAUSE`] between), each timed in
/// `rotation_batch_seconds`. Ends at shutdown, also between batches.
async fn ticker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(TICK_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        loop {
            let now = shared.now();
            // On a blocking thread: waiting for the lock, and the batch itself, never hold up
            // a runtime worker (and with it the QUIC connections it drives).
            let batch = Arc::clone(&shared);
            let (rotated, held) = match tokio::task::spawn_blocking(move || {
                let mut authority = batch.authority();
                // Timed from the lock taken to the lock released: how long others wait at most.
                let started = std::time::Instant::now();
                let rotated = authority.tick(now);
                (rotated, started.elapsed())
            })
            .await
            {
                Ok(done) => done,
                // A bug; the next tick tries again (the lock recovers from poisoning).
                Err(e) if e.is_panic() => {
                    tracing::error!("verifier tick panicked");
                    break;
                }
                // The runtime is shutting down.
                Err(_) => return,
            };
            if rotated.worked() {
                shared
                    .metrics
                    .rotation_batch_seconds
                    .observe(held.as_secs_f64());
            }
            if !rotated.more_due {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(ROTATION_PAUSE) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Longest the follower waits for a change notification before it reads the change feed
/// anyway: a lost notification delays a change by at most this long, never loses it.
pub const FEED_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// On a shared store, applies the other replicas' changes ([`Authority::follow`]): woken by
/// their notifications, and at least every [`FEED_POLL_INTERVAL`]. Ends at shutdown.
async fn follower(
    shared: Arc<Shared>,
    signal: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = signal.notified() => {}
            () = tokio::time::sleep(FEED_POLL_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let s = Arc::clone(&shared);
        let followed = tokio::task::spawn_blocking(move || {
            let now = s.now();
            let mut authority = s.authority();
            let followed = authority.follow(now);
            authority.check_fenced(now);
            followed
        })
        .await;
        match followed {
            Ok(Ok(_)) if failing => {
                tracing::info!("the change feed is read again");
                failing = false;
            }
            Ok(Ok(_)) => {}
            // Logged when it starts failing, not every second; counted in `store_failures`.
            Ok(Err(e)) if !failing => {
                tracing::error!(error = %e, "reading the change feed failed; this replica stops issuing once it is behind");
                failing = true;
            }
            Ok(Err(_)) => {}
            Err(e) if e.is_panic() => tracing::error!("the change-feed follower panicked"),
            Err(_) => return,
        }
    }
}

/// Opens the data directory and starts the QUIC service, the admin API and the ticker.
pub async fn start(
    dir: &Path,
    opts: ServeOptions,
    node_socket: UdpSocket,
    admin: impl Into<AdminListener>,
) -> Result<Running, VerifierError> {
    let admin = admin.into();
    let data = DataDir::with_store(dir, opts.store.clone());
    let opened = data.open()?;
    let text = std::fs::read_to_string(&opts.policy_path)
        .map_err(|e| VerifierError::io(format!("read {}", opts.policy_path.display()), e))?;
    let mut policy = Policy::parse(&text)?;
    let mut store = opened.store;
    // Replicas serve one policy: the one stored in the shared database. The file becomes it
    // on the first start and on every reload.
    let mut policy_version = 0;
    if store.is_shared() {
        match store.policy()? {
            Some((version, stored)) => {
                if stored != text {
                    tracing::warn!(
                        version,
                        file = %opts.policy_path.display(),
                        "the policy file differs from the mesh's policy in the database; serving the database's (reload to make the file the mesh's policy)"
                    );
                    policy = Policy::parse(&stored)?;
                }
                policy_version = version;
            }
            None => policy_version = store.put_policy(&text)?,
        }
    }
    if !policy.allow_any_measurement && policy.measurements.is_empty() {
        tracing::warn!("policy allows no measurement: no node can enroll or refresh");
    }
    let metrics = Arc::new(Metrics::default());
    let now = opts.clock.now();
    // The node-facing TLS key, certified by the signing key (renewed while serving): nodes
    // accept it by its pin or by that certification (`hopmesh_transport::verifier_cert`).
    let certs = Arc::new(CertifiedTlsKey::new(
        opened.signing.try_clone()?,
        opened.tls,
        opts.clock.clone(),
    )?);
    let parts = Parts {
        settings: opts.settings.clone(),
        signing: opened.signing.into_signing_key(),
        master: opened.master,
        store: Box::new(Counted::new(store, metrics.clone())),
        audit: opened.audit,
        metrics: metrics.clone(),
        policy,
    };
    let mut authority = Authority::new(parts, now)?;
    authority.policy_loaded(policy_version);
    let shared = Arc::new(Shared {
        authority: Mutex::new(authority),
        metrics,
        clock: opts.clock.clone(),
        admin_token: opened.admin_token,
        policy_path: opts.policy_path.clone(),
        tasks: tokio::sync::Semaphore::new(AUTHORITY_TASKS),
        enrollments: tokio::sync::Semaphore::new(ENROLLMENT_TASKS),
    });

    let tls = tls::server_config_with(certs, ALPN_CONTROL, Arc::new(AnyKey))?;
    let transport = Arc::new(service::transport());
    let _ = hopmesh_transport::quic::log_if_capped(&node_socket);
    let ep = endpoint(node_socket, Some(quinn_server(tls, transport)?))?;
    let node_addr = ep
        .local_addr()
        .map_err(|e| VerifierError::io("udp local address", e))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| VerifierError::io("admin local address", e))?;
    std::fs::write(data.file("admin.addr"), admin_addr.to_string())
        .map_err(|e| VerifierError::io("write admin.addr", e))?;

    let (tx, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(service::serve(ep, shared.clone(), rx.clone())));
    let router = admin::router(shared.clone(), admin_addr.clone());
    let mut admin_rx = rx.clone();
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = admin_rx.changed().await;
        };
        let served = match admin {
            AdminListener::Tcp(l) => axum::serve(l, router).with_graceful_shutdown(stop).await,
            AdminListener::Unix(l, path) => {
                let r = axum::serve(l, router).with_graceful_shutdown(stop).await;
                let _ = std::fs::remove_file(path);
                r
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API failed");
        }
    }));
    let signal = shared.authority().change_signal();
    if let Some(signal) = signal {
        tasks.push(tokio::spawn(follower(shared.clone(), signal, rx.clone())));
    }
    tasks.push(tokio::spawn(ticker(shared.clone(), rx)));
    tracing::info!(%node_addr, %admin_addr, "verifier serving");
    Ok(Running {
        node_addr,
        admin_addr,
        shared,
        shutdown: tx,
        tasks,
    })
}
