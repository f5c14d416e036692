//! What every task of a running node reads: identity, config, state, clock, counters, audit
//! log, the report queue to the verifier, the flow-nonce cache and the resolver.
//!
//! No QUIC endpoint here: tasks that open connections get a [`crate::peer::Dial`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hickory_resolver::TokioResolver;
use hopmesh_protocol::audit_aggregate::{Aggregator, Bucket, Decision, Summary};
use hopmesh_protocol::control::NonceCache;
use hopmesh_protocol::enrollment::Report;
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::time::{Clock, UnixTime};
use hopmesh_transport::audit::AuditLog;
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::config::NodeConfig;
use crate::counters::Counters;
use crate::datadir::{AUDIT_ANCHOR_INTERVAL_SECS, NodeDir};
use crate::state::NodeState;
use crate::streams::Streams;

/// What aggregates a repeatable refusal: (peer, event, reason).
type RefusalKey = (NodeId, &'static str, &'static str);

/// The node's shared context.
pub struct Shared {
    /// This node's id.
    pub local: NodeId,
    /// Its identity.
    pub identity: Identity,
    /// Configuration.
    pub config: NodeConfig,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The node's view of the mesh; read by the TLS authorizer too.
    pub state: Arc<RwLock<NodeState>>,
    /// The clock every decision reads.
    pub clock: Arc<dyn Clock>,
    /// The data directory.
    pub dir: NodeDir,
    /// The verifier pins.
    pub pins: Pins,
    /// SHA-256 of this node's executable.
    pub measurement: Measurement,
    /// The inbound streams being served.
    pub streams: Arc<Streams>,
    /// Test instrumentation of relayed streams (never set by the node itself).
    pub relay_tap: std::sync::OnceLock<Arc<dyn crate::splice::RelayTap>>,
    audit: Mutex<NodeAudit>,
    refusal_audit: Mutex<Aggregator<RefusalKey>>,
    reports: mpsc::Sender<Report>,
    resolver: Option<TokioResolver>,
    nonces: Mutex<NonceCache>,
    verifier_connected: AtomicBool,
    active: AtomicUsize,
    draining: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The parts of [`Shared`] that `start` builds.
#[derive(Debug)]
pub struct SharedParts {
    /// Identity.
    pub identity: Identity,
    /// Configuration.
    pub config: NodeConfig,
    /// Initial state.
    pub state: NodeState,
    /// Clock.
    pub clock: Arc<dyn Clock>,
    /// Data directory.
    pub dir: NodeDir,
    /// Verifier pins.
    pub pins: Pins,
    /// Own measurement.
    pub measurement: Measurement,
    /// The opened audit log.
    pub audit: AuditLog,
    /// Where reports for the verifier go.
    pub reports: mpsc::Sender<Report>,
}

impl Shared {
    /// Builds the shared context.
    pub fn new(p: SharedParts) -> Self {
        let resolver = TokioResolver::builder_tokio()
            .ok()
            .and_then(|b| b.build().ok());
        Self {
            local: p.identity.node_id(),
            identity: p.identity,
            config: p.config,
            counters: Arc::new(Counters::default()),
            state: Arc::new(RwLock::new(p.state)),
            clock: p.clock,
            dir: p.dir,
            pins: p.pins,
            measurement: p.measurement,
            streams: Arc::new(Streams::default()),
            audit: Mutex::new(NodeAudit {
                log: p.audit,
                anchored_seq: None,
                anchored_at: 0,
            }),
            refusal_audit: Mutex::new(Aggregator::with_defaults()),
            reports: p.reports,
            resolver,
            nonces: Mutex::new(NonceCache::default()),
            relay_tap: std::sync::OnceLock::new(),
            verifier_connected: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// Now on the node's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// The state, read-locked (keep the guard short; never across an await).
    pub fn state_read(&self) -> RwLockReadGuard<'_, NodeState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state, write-locked (keep the guard short; never across an await).
    pub fn state_write(&self) -> RwLockWriteGuard<'_, NodeState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an audit event. [`DURABLE_EVENTS`] are fsynced and anchored at once; the
    /// others are anchored at most every [`AUDIT_ANCHOR_INTERVAL_SECS`] (the next record after
    /// the interval) and at shutdown ([`Shared::anchor_audit`]). A failed write is logged and
    /// the event goes on; it never panics.
    pub fn audit(&self, event: &str, fields: Map<String, Value>) {
        let now = self.now().as_secs();
        let durable = DURABLE_EVENTS.contains(&event);
        let mut a = self
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = if durable {
            a.log.record_durable(now, event, fields)
        } else {
            a.log.record(now, event, fields)
        };
        if let Err(e) = written {
            tracing::error!(error = %e, event, "audit log write failed; the record is lost");
            return;
        }
        if durable || now >= a.anchored_at.saturating_add(AUDIT_ANCHOR_INTERVAL_SECS) {
            self.anchor_locked(&mut a, now);
        }
    }

    /// Audits a refusal a peer can repeat at will (a refused stream): the first of each
    /// (peer, event, reason) per [`DEFAULT_AGGREGATION_INTERVAL_SECS`] is written with its
    /// fields, the repeats are counted (`audit_aggregated`) and summarised in one
    /// `refusals_aggregated` record when the interval ends ([`Self::flush_refusal_audit`]);
    /// past [`DEFAULT_MAX_AGGREGATION_KEYS`] keys they share one "other" bucket. So a peer's
    /// flood of refused streams costs O(1) audit records per interval; the refusal counters
    /// stay exact (the caller counts every refusal).
    ///
    /// [`DEFAULT_AGGREGATION_INTERVAL_SECS`]: hopmesh_protocol::audit_aggregate::DEFAULT_AGGREGATION_INTERVAL_SECS
    /// [`DEFAULT_MAX_AGGREGATION_KEYS`]: hopmesh_protocol::audit_aggregate::DEFAULT_MAX_AGGREGATION_KEYS
    pub fn audit_refusal(
        &self,
        event: &'static str,
        peer: NodeId,
        reason: &'static str,
        mut fields: Map<String, Value>,
    ) {
        let now = self.now();
        let (decision, due) = {
            let mut agg = self
                .refusal_audit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = agg.flush(now);
            (agg.observe((peer, event, reason), now), due)
        };
        self.write_refusal_summaries(due);
        match decision {
            Decision::Count => Counters::add(&self.counters.audit_aggregated, 1),
            Decision::Write => self.audit(event, fields),
            Decision::WriteOther => {
                fields.insert("aggregated".into(), "other".into());
                self.audit(event, fields);
            }
        }
    }

    /// Writes the summaries of refusal keys whose interval ended (`drain`: all of them, at
    /// shutdown). Called on every [`Self::audit_refusal`] and by the watchdog.
    pub fn flush_refusal_audit(&self, drain: bool) {
        let due = {
            let mut agg = self
                .refusal_audit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if drain {
                agg.drain()
            } else {
                agg.flush(self.now())
            }
        };
        self.write_refusal_summaries(due);
    }

    fn write_refusal_summaries(&self, summaries: Vec<Summary<RefusalKey>>) {
        for s in summaries {
            let (peer, event, reason) = match &s.key {
                Bucket::Key((peer, event, reason)) => (peer.to_string(), *event, *reason),
                Bucket::Other => ("other".to_owned(), "other", "other"),
            };
            self.audit(
                "refusals_aggregated",
                hopmesh_transport::fields! {"refused_event" => event, "peer" => peer, "reason" => reason,
                "count" => s.count, "first" => s.first.as_secs(), "last" => s.last.as_secs()},
            );
        }
    }

    /// Fsyncs the audit log and anchors its head in `audit.anchor` (at shutdown; `audit`
    /// does it on its own otherwise).
    pub fn anchor_audit(&self) {
        let now = self.now().as_secs();
        let mut a = self
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.anchor_locked(&mut a, now);
    }

    fn anchor_locked(&self, a: &mut NodeAudit, now: u64) {
        a.anchored_at = now;
        let head = a.log.head();
        if a.anchored_seq == Some(head.seq) {
            return;
        }
        let done = a.log.sync().map_err(|e| e.to_string()).and_then(|()| {
            self.dir
                .write_audit_anchor(&head)
                .map_err(|e| e.to_string())
        });
        match done {
            Ok(()) => a.anchored_seq = Some(head.seq),
            Err(e) => tracing::error!(error = %e, "anchoring the audit log failed"),
        }
    }

    /// Queues a report for the verifier (dropped with a log line if the queue is full).
    pub fn report(&self, r: Report) {
        if self.reports.try_send(r).is_err() {
            tracing::warn!("report queue full; report dropped (it is in the audit log)");
        }
    }

    /// Resolves `host:port` (IP literals directly, names with hickory).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let resolver = self.resolver.as_ref().ok_or("no DNS resolver configured")?;
        let ips = resolver.lookup_ip(host).await.map_err(|e| e.to_string())?;
        Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }

    /// Resolves a `host:port` string.
    pub async fn resolve_hostport(&self, hostport: &str) -> Result<Vec<SocketAddr>, String> {
        let b = hopmesh_protocol::policy::parse_backend(hostport)?;
        self.resolve(&b.host, b.port).await
    }

    /// Runs `f` on the flow-nonce replay cache.
    pub fn flow_nonces<T>(&self, f: impl FnOnce(&mut NonceCache) -> T) -> T {
        f(&mut self
            .nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// True once shutdown began: new streams are refused, open ones finish.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the verifier link is up.
    pub fn verifier_connected(&self) -> bool {
        self.verifier_connected.load(Ordering::SeqCst)
    }

    /// Marks the verifier link up or down.
    pub fn set_verifier_connected(&self, up: bool) {
        self.verifier_connected.store(up, Ordering::SeqCst);
    }

    /// Inbound streams still being handled.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Counts an inbound stream for the drain until the guard drops.
    pub fn stream_guard(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveStream(self.clone())
    }
}

/// Node audit events fsynced and anchored as soon as they are written: signed pushes from the
/// verifier (not something a peer can make a node repeat).
pub const DURABLE_EVENTS: &[&str] = &["revocation_list_applied"];

/// The audit log and its anchoring state, under one lock.
#[derive(Debug)]
struct NodeAudit {
    log: AuditLog,
    /// The seq last written to `audit.anchor` (None: not yet this run).
    anchored_seq: Option<u64>,
    /// When it was last attempted (unix seconds).
    anchored_at: u64,
}

/// One inbound stream being handled (see [`Shared::stream_guard`]).
#[derive(Debug)]
pub struct ActiveStream(Arc<Shared>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}
