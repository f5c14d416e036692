//! The node-facing QUIC service (ALPN `hopmesh-verifier/1`), and the budgets that keep it
//! available under a flood.
//!
//! One bidirectional stream per request. The node is the key its TLS handshake proved; the
//! TLS layer admits any Ed25519 key ([`hopmesh_transport::tls::AnyKey`]) and the
//! [`Authority`] decides what that key may do.
//!
//! # Budgets
//! The verifier accepts handshakes from anyone, so everything an unauthenticated party can make
//! it hold is bounded, and an enrolled node always finds room:
//! - per connection ([`transport`]): no unidirectional streams, at most
//!   [`MAX_STREAMS_PER_CONNECTION`] request streams, receive windows sized for requests
//!   ([`REQUEST_STREAM_WINDOW`], [`REQUEST_CONNECTION_WINDOW`]), send window
//!   [`SEND_WINDOW`];
//! - handshakes ([`BudgetState::admit_handshake`]): at most
//!   [`ConnectionBudgets::max_handshakes`] in flight and
//!   [`ConnectionBudgets::max_handshakes_per_source`] per source IP; above
//!   [`ConnectionBudgets::retry_above`] in flight, an attempt from an address not yet validated
//!   gets a QUIC Retry (it must prove it receives at its address before it costs any state);
//!   a handshake not done within [`ConnectionBudgets::handshake_deadline`] is dropped;
//! - connections ([`BudgetState::admit_connection`]), once the key is known: keys that are
//!   not enrolled (no compiled table: unknown, revoked, banned, or out of policy) share a small
//!   pool ([`ConnectionBudgets::max_unauthenticated`], at most
//!   [`ConnectionBudgets::max_unauthenticated_per_source`] per source IP) and are closed after
//!   [`ConnectionBudgets::unauthenticated_deadline`] unless the key enrolled meanwhile;
//!   enrolled nodes have their own pool ([`ConnectionBudgets::max_enrolled`]), and a node at
//!   [`ConnectionBudgets::max_connections_per_node`] gets in by closing its own oldest
//!   connection, never by being refused.
//!
//! Nothing of this is persisted: after a restart the pools start empty, and an attacker's
//! reconnections compete only for the unauthenticated pool. Every refusal is counted in
//! `hopmesh_verifier_connection_refusals{reason}` and logged at most once per
//! [`REFUSAL_LOG_INTERVAL`] (a count, never one line or audit record per attempt).
//!
//! # Subscriptions
//! One live subscription per node: a new one replaces the old (the old stream is reset with
//! `SHUTDOWN`). A subscriber that cannot keep up ([`crate::authority::PUSH_QUEUE`]) gets a
//! resync: what is still queued is discarded and a fresh snapshot follows on the same stream;
//! one whose stream takes no push for [`PUSH_WRITE_DEADLINE`] is closed (`CONTROL_STALLED`)
//! and resynchronises when it reconnects.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{
    NodeRequest, PUSH_CAP, Push, REQUEST_CAP, Refusal, VerifierResponse,
};
use hopmesh_protocol::frame::LEN_PREFIX;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::quic::{codes, peer_spki, read_frame_within, transport_config, write_frame};
use quinn::{Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::sync::{mpsc, watch};

use crate::Shared;
use crate::authority::{Authority, Enrollment, Issued};
use crate::metrics::Metrics;

/// How long a node has to send its request once it opened a stream.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for one push to be written to a subscriber; past it the subscriber's
/// connection is closed (`CONTROL_STALLED`, counted as `refusals{reason="push_stalled"}`).
pub const PUSH_WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Request streams a connection may have open at once (a node needs three: refresh, report,
/// subscribe).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;
/// Receive window of one request stream: one request frame (`REQUEST_CAP` and its length
/// prefix), rounded up.
pub const REQUEST_STREAM_WINDOW: u32 = 8 << 10;
/// Receive window of a connection: every allowed stream's window.
pub const REQUEST_CONNECTION_WINDOW: u32 = MAX_STREAMS_PER_CONNECTION * REQUEST_STREAM_WINDOW;
/// Send window of a connection (unacknowledged response and push bytes held per connection).
pub const SEND_WINDOW: u64 = 2 << 20;
/// Idle timeout of node connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval of node connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// At most one log line about refused connection attempts per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

const _: () = assert!(REQUEST_STREAM_WINDOW as usize >= REQUEST_CAP + LEN_PREFIX);

/// Default of [`ConnectionBudgets::max_handshakes`].
pub const MAX_HANDSHAKES: usize = 256;
/// Default of [`ConnectionBudgets::max_handshakes_per_source`].
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// Default of [`ConnectionBudgets::retry_above`].
pub const RETRY_ABOVE: usize = 32;
/// Default of [`ConnectionBudgets::handshake_deadline`].
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Default of [`ConnectionBudgets::max_unauthenticated`].
pub const MAX_UNAUTHENTICATED: usize = 128;
/// Default of [`ConnectionBudgets::max_unauthenticated_per_source`].
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// Default of [`ConnectionBudgets::unauthenticated_deadline`].
pub const UNAUTHENTICATED_DEADLINE: Duration = Duration::from_secs(10);
/// Default of [`ConnectionBudgets::max_enrolled`].
pub const MAX_ENROLLED: usize = 10_000;
/// Default of [`ConnectionBudgets::max_connections_per_node`].
pub const MAX_CONNECTIONS_PER_NODE: usize = 4;

/// The node connections' transport: [`transport_config`] (no uni streams, no datagrams) with
/// request-sized windows and at most [`MAX_STREAMS_PER_CONNECTION`] streams.
pub fn transport() -> TransportConfig {
    let mut t = transport_config(IDLE_TIMEOUT, KEEP_ALIVE);
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.stream_receive_window(VarInt::from_u32(REQUEST_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(REQUEST_CONNECTION_WINDOW));
    t.send_window(SEND_WINDOW);
    t
}

/// Connection budgets (defaults: the constants of this module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionBudgets {
    /// Handshakes in flight at once ([`MAX_HANDSHAKES`] = 256); past it attempts are refused
    /// (`handshakes_full`).
    pub max_handshakes: usize,
    /// Handshakes in flight from one source IP ([`MAX_HANDSHAKES_PER_SOURCE`] = 32;
    /// `source_handshakes_full`).
    pub max_handshakes_per_source: usize,
    /// Handshakes in flight above which an attempt from an unvalidated address gets a QUIC
    /// Retry ([`RETRY_ABOVE`] = 32; counted in `retries`).
    pub retry_above: usize,
    /// A handshake not done within this is dropped ([`HANDSHAKE_DEADLINE`] = 5 s;
    /// `handshake_timeout`).
    pub handshake_deadline: Duration,
    /// Connections of keys that are not enrolled ([`MAX_UNAUTHENTICATED`] = 128;
    /// `unauthenticated_full`).
    pub max_unauthenticated: usize,
    /// Such connections per source IP ([`MAX_UNAUTHENTICATED_PER_SOURCE`] = 16;
    /// `source_unauthenticated_full`).
    pub max_unauthenticated_per_source: usize,
    /// Such a connection is closed this long after its handshake unless its key enrolled
    /// meanwhile ([`UNAUTHENTICATED_DEADLINE`] = 10 s; `unauthenticated_deadline`).
    pub unauthenticated_deadline: Duration,
    /// Connections of enrolled nodes ([`MAX_ENROLLED`] = 10 000; `enrolled_full`).
    pub max_enrolled: usize,
    /// Connections of one enrolled node; a newer one closes its oldest
    /// ([`MAX_CONNECTIONS_PER_NODE`] = 4; counted as `node_oldest_closed`).
    pub max_connections_per_node: usize,
}

impl Default for ConnectionBudgets {
    fn default() -> Self {
        Self {
            max_handshakes: MAX_HANDSHAKES,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            retry_above: RETRY_ABOVE,
            handshake_deadline: HANDSHAKE_DEADLINE,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: MAX_UNAUTHENTICATED_PER_SOURCE,
            unauthenticated_deadline: UNAUTHENTICATED_DEADLINE,
            max_enrolled: MAX_ENROLLED,
            max_connections_per_node: MAX_CONNECTIONS_PER_NODE,
        }
    }
}

/// Why a connection attempt or a connection was refused or closed by the budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Too many handshakes in flight.
    HandshakesFull,
    /// Too many handshakes in flight from this source IP.
    SourceHandshakesFull,
    /// The handshake did not finish within the deadline.
    HandshakeTimeout,
    /// The client presented no certificate.
    NoCertificate,
    /// The unauthenticated pool is full.
    UnauthenticatedFull,
    /// This source IP holds its share of the unauthenticated pool.
    SourceUnauthenticatedFull,
    /// A key that is not enrolled held its connection past the deadline.
    UnauthenticatedDeadline,
    /// The enrolled pool is full.
    EnrolledFull,
}

impl ConnRefusal {
    /// The stable metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::HandshakesFull => "handshakes_full",
            Self::SourceHandshakesFull => "source_handshakes_full",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NoCertificate => "no_certificate",
            Self::UnauthenticatedFull => "unauthenticated_full",
            Self::SourceUnauthenticatedFull => "source_unauthenticated_full",
            Self::UnauthenticatedDeadline => "unauthenticated_deadline",
            Self::EnrolledFull => "enrolled_full",
        }
    }
}

/// What to do with a connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeAdmit {
    /// Run the handshake (it holds a handshake slot until done).
    Accept,
    /// Answer with a QUIC Retry: no state is kept until the client proves its address.
    Retry,
}

/// Who a connection belongs to, once its handshake proved the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerClass {
    /// An enrolled node with a compiled table.
    Enrolled(NodeId),
    /// Any other key.
    Unauthenticated,
}

/// A connection admitted by [`BudgetState::admit_connection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    /// The source IP it counts against.
    pub source: IpAddr,
    /// Its pool.
    pub class: PeerClass,
    /// The node is at its per-node cap: close its oldest connection.
    pub evict_oldest: bool,
}

/// What the budgets hold now (in memory only; a restart starts empty). Every decision is a
/// pure method; the service calls [`take`](Self::take) / [`release`](Self::release) around
/// each connection's life.
#[derive(Debug, Default)]
pub struct BudgetState {
    handshakes: usize,
    handshakes_by_source: HashMap<IpAddr, usize>,
    unauthenticated: usize,
    unauthenticated_by_source: HashMap<IpAddr, usize>,
    enrolled: usize,
    by_node: HashMap<NodeId, usize>,
}

fn inc<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K) {
    *map.entry(k).or_default() += 1;
}

fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(k);
        }
    }
}

impl BudgetState {
    /// Handshakes in flight.
    pub fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// Open connections of keys that are not enrolled.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated
    }

    /// Open connections of enrolled nodes.
    pub fn enrolled(&self) -> usize {
        self.enrolled
    }

    /// Decides a connection attempt from `source`; `validated` when QUIC already validated
    /// its address (a Retry round trip). Under load an unvalidated attempt gets a Retry, which
    /// costs no state, before any cap is looked at.
    pub fn admit_handshake(
        &self,
        b: &ConnectionBudgets,
        source: IpAddr,
        validated: bool,
    ) -> Result<HandshakeAdmit, ConnRefusal> {
        if !validated && self.handshakes >= b.retry_above {
            return Ok(HandshakeAdmit::Retry);
        }
        if self.handshakes >= b.max_handshakes {
            return Err(ConnRefusal::HandshakesFull);
        }
        if self.handshakes_by_source.get(&source).copied().unwrap_or(0)
            >= b.max_handshakes_per_source
        {
            return Err(ConnRefusal::SourceHandshakesFull);
        }
        Ok(HandshakeAdmit::Accept)
    }

    /// A handshake from `source` started.
    pub fn begin_handshake(&mut self, source: IpAddr) {
        self.handshakes += 1;
        inc(&mut self.handshakes_by_source, source);
    }

    /// A handshake from `source` ended (either way).
    pub fn end_handshake(&mut self, source: IpAddr) {
        self.handshakes = self.handshakes.saturating_sub(1);
        dec(&mut self.handshakes_by_source, &source);
    }

    /// Decides a connection whose handshake proved a key of `class`, from `source`. Enrolled
    /// nodes and other keys have separate pools, so unauthenticated connections can never
    /// keep a node out; a node at its own cap gets in by closing its oldest connection.
    pub fn admit_connection(
        &self,
        b: &ConnectionBudgets,
        source: IpAddr,
        class: PeerClass,
    ) -> Result<Permit, ConnRefusal> {
        match class {
            PeerClass::Enrolled(node) => {
                let own = self.by_node.get(&node).copied().unwrap_or(0);
                let evict_oldest = own >= b.max_connections_per_node;
                if !evict_oldest && self.enrolled >= b.max_enrolled {
                    return Err(ConnRefusal::EnrolledFull);
                }
                Ok(Permit {
                    source,
                    class,
                    evict_oldest,
                })
            }
            PeerClass::Unauthenticated => {
                if self.unauthenticated >= b.max_unauthenticated {
                    return Err(ConnRefusal::UnauthenticatedFull);
                }
                if self
                    .unauthenticated_by_source
                    .get(&source)
                    .copied()
                    .unwrap_or(0)
                    >= b.max_unauthenticated_per_source
                {
                    return Err(ConnRefusal::SourceUnauthenticatedFull);
                }
                Ok(Permit {
                    source,
                    class,
                    evict_oldest: false,
                })
            }
        }
    }

    /// Counts an admitted connection.
    pub fn take(&mut self, p: &Permit) {
        match p.class {
            PeerClass::Enrolled(node) => {
                self.enrolled += 1;
                inc(&mut self.by_node, node);
            }
            PeerClass::Unauthenticated => {
                self.unauthenticated += 1;
                inc(&mut self.unauthenticated_by_source, p.source);
            }
        }
    }

    /// Releases what [`take`](Self::take) counted.
    pub fn release(&mut self, p: &Permit) {
        match p.class {
            PeerClass::Enrolled(node) => {
                self.enrolled = self.enrolled.saturating_sub(1);
                dec(&mut self.by_node, &node);
            }
            PeerClass::Unauthenticated => {
                self.unauthenticated = self.unauthenticated.saturating_sub(1);
                dec(&mut self.unauthenticated_by_source, &p.source);
            }
        }
    }
}

/// The budgets in force and the connections they hold; one per running service.
#[derive(Debug)]
struct Gate {
    budgets: ConnectionBudgets,
    metrics: Arc<Metrics>,
    inner: Mutex<GateInner>,
    log_at: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

#[derive(Debug, Default)]
struct GateInner {
    state: BudgetState,
    /// Enrolled nodes' connections, oldest first (for the per-node cap).
    open: HashMap<NodeId, VecDeque<Connection>>,
    /// The live subscription of each node (its id).
    subscriptions: HashMap<NodeId, u64>,
    next_subscription: u64,
}

/// How a subscription ended when the authority closed its channel.
enum Ended {
    /// A newer subscription of the node replaced it.
    Replaced,
    /// The node is no longer live (revoked, banned, out of policy).
    NotLive,
    /// It could not keep up: here is a fresh one (snapshot first).
    Resubscribed(mpsc::Receiver<Push>),
}

impl Gate {
    fn new(budgets: ConnectionBudgets, metrics: Arc<Metrics>) -> Self {
        Self {
            budgets,
            metrics,
            inner: Mutex::default(),
            log_at: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn gauges(&self, g: &GateInner) {
        let m = &self.metrics;
        m.handshakes.set(g.state.handshakes() as i64);
        m.connections
            .get_or_create(&[("class", "enrolled")])
            .set(g.state.enrolled() as i64);
        m.connections
            .get_or_create(&[("class", "unauthenticated")])
            .set(g.state.unauthenticated() as i64);
    }

    /// Counts a refusal; logs at most once per [`REFUSAL_LOG_INTERVAL`].
    fn refused(&self, r: ConnRefusal) {
        self.metrics.refused_connection(r.reason());
        let n = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut at = self
            .log_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if at.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            *at = Some(Instant::now());
            self.unlogged.fetch_sub(n, Ordering::Relaxed);
            tracing::warn!(
                refused = n,
                last = r.reason(),
                "connection budgets refused attempts since the last report \
                 (by reason: hopmesh_verifier_connection_refusals)"
            );
        }
    }

    /// Admits `conn` of `class` from `source`, closing the node's oldest connection if it is
    /// at its cap. The permit is released by the returned slot's drop.
    fn admit(
        self: &Arc<Self>,
        conn: &Connection,
        source: IpAddr,
        class: PeerClass,
    ) -> Result<ConnectionSlot, ConnRefusal> {
        let mut g = self.lock();
        let permit = g.state.admit_connection(&self.budgets, source, class)?;
        g.state.take(&permit);
        let evicted = self.track(&mut g, conn, &permit);
        self.gauges(&g);
        drop(g);
        if let Some(old) = evicted {
            self.metrics.refused_connection("node_oldest_closed");
            old.close(codes::SHUTDOWN, b"superseded by a newer connection");
        }
        Ok(ConnectionSlot {
            gate: self.clone(),
            permit,
            id: conn.stable_id(),
        })
    }

    fn track(&self, g: &mut GateInner, conn: &Connection, permit: &Permit) -> Option<Connection> {
        let PeerClass::Enrolled(node) = permit.class else {
            return None;
        };
        let open = g.open.entry(node).or_default();
        let evicted = if permit.evict_oldest {
            open.pop_front()
        } else {
            None
        };
        open.push_back(conn.clone());
        evicted
    }

    /// Moves an unauthenticated connection whose key enrolled into the enrolled pool.
    fn promote(&self, slot: &mut ConnectionSlot, conn: &Connection, node: NodeId) -> bool {
        let mut g = self.lock();
        let Ok(permit) =
            g.state
                .admit_connection(&self.budgets, slot.permit.source, PeerClass::Enrolled(node))
        else {
            return false;
        };
        g.state.release(&slot.permit);
        g.state.take(&permit);
        let evicted = self.track(&mut g, conn, &permit);
        slot.permit = permit;
        self.gauges(&g);
        drop(g);
        if let Some(old) = evicted {
            old.close(codes::SHUTDOWN, b"superseded by a newer connection");
        }
        true
    }

    /// Subscribes `node` and makes this its one live subscription.
    fn subscribe(
        &self,
        shared: &Shared,
        node: &NodeId,
        now: UnixTime,
    ) -> Result<(mpsc::Receiver<Push>, u64), Refusal> {
        let mut authority = shared.authority();
        let rx = authority.subscribe(node, now)?;
        let mut g = self.lock();
        g.next_subscription += 1;
        let id = g.next_subscription;
        g.subscriptions.insert(*node, id);
        Ok((rx, id))
    }

    /// The authority closed subscription `id` of `node`: find out why, resubscribing it if it
    /// only fell behind.
    fn ended(&self, shared: &Shared, node: &NodeId, id: u64, now: UnixTime) -> Ended {
        let mut authority = shared.authority();
        let mut g = self.lock();
        if g.subscriptions.get(node) != Some(&id) {
            return Ended::Replaced;
        }
        if authority.table(node).is_some()
            && let Ok(rx) = authority.subscribe(node, now)
        {
            return Ended::Resubscribed(rx);
        }
        g.subscriptions.remove(node);
        Ended::NotLive
    }

    /// Subscription `id` of `node` is gone (its stream or connection ended).
    fn forget(&self, node: &NodeId, id: u64) {
        let mut g = self.lock();
        if g.subscriptions.get(node) == Some(&id) {
            g.subscriptions.remove(node);
        }
    }
}

/// A handshake slot, released on drop.
struct HandshakeSlot {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.state.end_handshake(self.source);
        self.gate.gauges(&g);
    }
}

/// An admitted connection's place in its pool, released on drop.
struct ConnectionSlot {
    gate: Arc<Gate>,
    permit: Permit,
    id: usize,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.state.release(&self.permit);
        if let PeerClass::Enrolled(node) = self.permit.class
            && let Some(open) = g.open.get_mut(&node)
        {
            open.retain(|c| c.stable_id() != self.id);
            if open.is_empty() {
                g.open.remove(&node);
            }
        }
        self.gate.gauges(&g);
    }
}

/// Accepts node connections until `shutdown` flips to true.
pub async fn serve(endpoint: Endpoint, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let (budgets, metrics) = {
        let a = shared.authority();
        (a.settings().connections.clone(), a.metrics().clone())
    };
    let gate = Arc::new(Gate::new(budgets, metrics));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let source = incoming.remote_address().ip().to_canonical();
        let validated = incoming.remote_address_validated();
        let slot = {
            let mut g = gate.lock();
            match g.state.admit_handshake(&gate.budgets, source, validated) {
                Ok(HandshakeAdmit::Accept) => {
                    g.state.begin_handshake(source);
                    gate.gauges(&g);
                    Ok(HandshakeSlot {
                        gate: gate.clone(),
                        source,
                    })
                }
                Ok(HandshakeAdmit::Retry) => Err(None),
                Err(r) => Err(Some(r)),
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(None) => {
                gate.metrics.retries.inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Err(Some(r)) => {
                gate.refused(r);
                incoming.refuse();
                continue;
            }
        };
        let (shared, gate) = (shared.clone(), gate.clone());
        tokio::spawn(async move {
            let deadline = gate.budgets.handshake_deadline;
            // Never `into_0rtt()` (docs/design.md, pitfall 2): await the full handshake.
            let conn = match tokio::time::timeout(deadline, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return tracing::debug!(error = %e, "handshake failed"),
                Err(_) => return gate.refused(ConnRefusal::HandshakeTimeout),
            };
            drop(slot);
            handle_connection(conn, source, shared, gate).await;
        });
    }
    endpoint.close(codes::SHUTDOWN, b"verifier shutting down");
    // Let every connection task see the close and release the socket.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
}

async fn handle_connection(conn: Connection, source: IpAddr, shared: Arc<Shared>, gate: Arc<Gate>) {
    let Some(spki) = peer_spki(&conn) else {
        gate.refused(ConnRefusal::NoCertificate);
        conn.close(codes::BAD_REQUEST, b"no client certificate");
        return;
    };
    let node = NodeId::from_spki(&spki);
    let enrolled = |shared: &Shared| shared.authority().table(&node).is_some();
    let class = if enrolled(&shared) {
        PeerClass::Enrolled(node)
    } else {
        PeerClass::Unauthenticated
    };
    let mut slot = match gate.admit(&conn, source, class) {
        Ok(slot) => slot,
        Err(r) => {
            gate.refused(r);
            conn.close(codes::BAD_REQUEST, r.reason().as_bytes());
            return;
        }
    };
    let spki: Arc<[u8]> = spki.into();
    let mut deadline = (class == PeerClass::Unauthenticated)
        .then(|| tokio::time::Instant::now() + gate.budgets.unauthenticated_deadline);
    loop {
        tokio::select! {
            s = conn.accept_bi() => {
                let Ok((send, recv)) = s else { break };
                let (shared, gate, spki, conn) =
                    (shared.clone(), gate.clone(), spki.clone(), conn.clone());
                tokio::spawn(async move {
                    handle_stream(conn, &spki, send, recv, shared, gate).await
                });
            }
            _ = sleep_until_some(deadline) => {
                if enrolled(&shared) && gate.promote(&mut slot, &conn, node) {
                    deadline = None;
                } else {
                    gate.refused(ConnRefusal::UnauthenticatedDeadline);
                    conn.close(codes::BAD_REQUEST, b"not enrolled");
                    break;
                }
            }
        }
    }
    drop(slot);
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn respond(mut send: SendStream, resp: &VerifierResponse) {
    if write_frame(&mut send, resp, REQUEST_CAP).await.is_ok() {
        let _ = send.finish();
    }
}

/// Runs an admission under the authority lock: `issuance_seconds` times the check and the
/// signing (not the recompile and pushes of [`Authority::publish`]), as the authority reads no
/// clock.
fn timed_admission(
    shared: &Shared,
    now: hopmesh_protocol::time::UnixTime,
    admit: impl FnOnce(&mut Authority) -> Result<Issued, Refusal>,
) -> Result<Vec<u8>, Refusal> {
    let mut authority = shared.authority();
    let started = Instant::now();
    let issued = admit(&mut authority)?;
    authority
        .metrics()
        .issuance_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(authority.publish(issued, now))
}

fn attested(result: Result<Vec<u8>, Refusal>) -> VerifierResponse {
    match result.and_then(|env| BoundedVec::new(env).map_err(|_| Refusal::Internal)) {
        Ok(attestation) => VerifierResponse::Attested { attestation },
        Err(r) => VerifierResponse::Refused(r),
    }
}

async fn handle_stream(
    conn: Connection,
    spki: &[u8],
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
) {
    let node_id = NodeId::from_spki(spki);
    let req = match read_frame_within::<NodeRequest>(&mut recv, REQUEST_CAP, REQUEST_DEADLINE).await
    {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(node = %node_id.short(), error = %e, "bad request stream");
            // Counted and audited (aggregated per key) by the authority.
            shared.authority().bad_request(&node_id, shared.now());
            let _ = send.reset(codes::BAD_REQUEST);
            return;
        }
    };
    let now = shared.now();
    match req {
        NodeRequest::Enroll {
            join_secret,
            measurement,
            facts,
            addresses,
        } => {
            let e = Enrollment {
                spki,
                join_secret: &join_secret,
                measurement,
                addresses: &addresses,
                hostname: facts.hostname.as_str(),
            };
            let result = timed_admission(&shared, now, |a| a.admit_enrollment(&e, now));
            respond(send, &attested(result)).await;
        }
        NodeRequest::Refresh {
            measurement,
            addresses,
        } => {
            let result = timed_admission(&shared, now, |a| {
                a.admit_refresh(&node_id, &measurement, &addresses, now)
            });
            respond(send, &attested(result)).await;
        }
        NodeRequest::Report(report) => {
            let resp = match shared.authority().report(&node_id, &report, now) {
                Ok(()) => VerifierResponse::Ack,
                Err(r) => VerifierResponse::Refused(r),
            };
            respond(send, &resp).await;
        }
        NodeRequest::Subscribe => {
            let (rx, id) = match gate.subscribe(&shared, &node_id, now) {
                Ok(sub) => sub,
                Err(r) => return respond(send, &VerifierResponse::Refused(r)).await,
            };
            if write_frame(&mut send, &VerifierResponse::Ack, REQUEST_CAP)
                .await
                .is_ok()
            {
                push_loop(&conn, send, rx, (node_id, id), &shared, &gate).await;
            }
            gate.forget(&node_id, id);
        }
    }
}

/// Writes pushes to a subscriber until the subscription or the connection ends. When the
/// authority closes the channel (replaced, not live, or queue full), what is still queued is
/// discarded and [`Gate::ended`] says what comes next.
async fn push_loop(
    conn: &Connection,
    mut send: SendStream,
    mut rx: mpsc::Receiver<Push>,
    (node, id): (NodeId, u64),
    shared: &Shared,
    gate: &Gate,
) {
    loop {
        if rx.is_closed() {
            match gate.ended(shared, &node, id, shared.now()) {
                Ended::Resubscribed(fresh) => {
                    tracing::info!(node = %node.short(), "subscriber fell behind: resynchronised");
                    rx = fresh;
                    continue;
                }
                Ended::Replaced => {
                    let _ = send.reset(codes::SHUTDOWN);
                    return;
                }
                Ended::NotLive => {
                    // Revoked or out of policy: the node must reconnect (and will be refused).
                    let _ = send.reset(codes::REVOKED);
                    conn.close(codes::REVOKED, b"unsubscribed");
                    return;
                }
            }
        }
        let push = tokio::select! {
            p = rx.recv() => p,
            // The connection went away (node gone, or verifier shutting down).
            _ = conn.closed() => return,
        };
        // `None`: closed and drained; the check above says why.
        let Some(push) = push else { continue };
        match tokio::time::timeout(PUSH_WRITE_DEADLINE, write_frame(&mut send, &push, PUSH_CAP))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(node = %node.short(), error = %e, "push stream closed");
                return;
            }
            Err(_) => {
                shared.authority().metrics().refused("push_stalled");
                let _ = send.reset(codes::CONTROL_STALLED);
                conn.close(codes::CONTROL_STALLED, b"push not taken in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use hopmesh_protocol::ids::NodeId;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    fn small() -> ConnectionBudgets {
        ConnectionBudgets {
            max_handshakes: 4,
            max_handshakes_per_source: 2,
            retry_above: 3,
            max_unauthenticated: 3,
            max_unauthenticated_per_source: 2,
            max_enrolled: 2,
            max_connections_per_node: 2,
            ..ConnectionBudgets::default()
        }
    }

    #[test]
    fn defaults_are_the_documented_constants() {
        let b = ConnectionBudgets::default();
        assert_eq!(b.max_handshakes, 256);
        assert_eq!(b.max_handshakes_per_source, 32);
        assert_eq!(b.retry_above, 32);
        assert_eq!(b.handshake_deadline, Duration::from_secs(5));
        assert_eq!(b.max_unauthenticated, 128);
        assert_eq!(b.max_unauthenticated_per_source, 16);
        assert_eq!(b.unauthenticated_deadline, Duration::from_secs(10));
        assert_eq!(b.max_enrolled, 10_000);
        assert_eq!(b.max_connections_per_node, 4);
    }

    #[test]
    fn handshakes_are_capped_per_source_and_in_total_and_retried_under_load() {
        let b = small();
        let mut s = BudgetState::default();
        assert_eq!(
            s.admit_handshake(&b, ip(1), false),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(1));
        s.begin_handshake(ip(1));
        // Per source: the third from ip 1 is refused, another source is not.
        assert_eq!(
            s.admit_handshake(&b, ip(1), true),
            Err(ConnRefusal::SourceHandshakesFull)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(2), false),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(2));
        // At retry_above (3) in flight: unvalidated attempts get a Retry, validated ones go on.
        assert_eq!(
            s.admit_handshake(&b, ip(3), false),
            Ok(HandshakeAdmit::Retry)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(3), true),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(3));
        // At max_handshakes (4): validated attempts are refused; unvalidated still retried
        // (a Retry costs no state).
        assert_eq!(
            s.admit_handshake(&b, ip(4), true),
            Err(ConnRefusal::HandshakesFull)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(4), false),
            Ok(HandshakeAdmit::Retry)
        );
        // Ending handshakes frees the slots; no source entry is left behind.
        for src in [ip(1), ip(1), ip(2), ip(3)] {
            s.end_handshake(src);
        }
        assert_eq!(s.handshakes(), 0);
        assert!(s.handshakes_by_source.is_empty());
        s.end_handshake(ip(9));
        assert_eq!(s.handshakes(), 0, "never below zero");
    }

    #[test]
    fn unauthenticated_keys_have_their_own_pool_and_per_source_share() {
        let b = small();
        let mut s = BudgetState::default();
        let u = PeerClass::Unauthenticated;
        for src in [ip(1), ip(1), ip(2)] {
            let p = s.admit_connection(&b, src, u).expect("room");
            s.take(&p);
        }
        assert_eq!(
            s.admit_connection(&b, ip(3), u),
            Err(ConnRefusal::UnauthenticatedFull)
        );
        let p = Permit {
            source: ip(2),
            class: u,
            evict_oldest: false,
        };
        s.release(&p);
        assert_eq!(
            s.admit_connection(&b, ip(1), u),
            Err(ConnRefusal::SourceUnauthenticatedFull),
            "ip 1 already holds its 2"
        );
        assert!(s.admit_connection(&b, ip(3), u).is_ok());
        // The full unauthenticated pool never keeps an enrolled node out.
        let p = s.admit_connection(&b, ip(3), u).expect("room");
        s.take(&p);
        assert_eq!(
            s.admit_connection(&b, ip(4), u),
            Err(ConnRefusal::UnauthenticatedFull)
        );
        let node = PeerClass::Enrolled(NodeId::from_bytes([1; 32]));
        assert_eq!(
            s.admit_connection(&b, ip(1), node),
            Ok(Permit {
                source: ip(1),
                class: node,
                evict_oldest: false
            })
        );
    }

    #[test]
    fn a_node_at_its_cap_closes_its_oldest_and_the_enrolled_pool_is_capped() {
        let b = small();
        let mut s = BudgetState::default();
        let a = PeerClass::Enrolled(NodeId::from_bytes([1; 32]));
        let c = PeerClass::Enrolled(NodeId::from_bytes([2; 32]));
        let p = s.admit_connection(&b, ip(1), a).expect("room");
        assert!(!p.evict_oldest);
        s.take(&p);
        s.take(&p);
        assert_eq!(s.enrolled(), 2);
        // The pool (2) is full: another node is refused ...
        assert_eq!(
            s.admit_connection(&b, ip(2), c),
            Err(ConnRefusal::EnrolledFull)
        );
        // ... but the node at its own cap gets in by closing its oldest.
        let again = s.admit_connection(&b, ip(1), a).expect("node gets in");
        assert!(again.evict_oldest);
        s.take(&again);
        s.release(&p);
        s.release(&p);
        s.release(&again);
        assert_eq!(s.enrolled(), 0);
        assert!(s.by_node.is_empty());
        assert!(s.admit_connection(&b, ip(2), c).is_ok());
    }

    #[test]
    fn refusal_reasons_are_stable() {
        let all = [
            (ConnRefusal::HandshakesFull, "handshakes_full"),
            (ConnRefusal::SourceHandshakesFull, "source_handshakes_full"),
            (ConnRefusal::HandshakeTimeout, "handshake_timeout"),
            (ConnRefusal::NoCertificate, "no_certificate"),
            (ConnRefusal::UnauthenticatedFull, "unauthenticated_full"),
            (
                ConnRefusal::SourceUnauthenticatedFull,
                "source_unauthenticated_full",
            ),
            (
                ConnRefusal::UnauthenticatedDeadline,
                "unauthenticated_deadline",
            ),
            (ConnRefusal::EnrolledFull, "enrolled_full"),
        ];
        for (r, s) in all {
            assert_eq!(r.reason(), s);
        }
    }

    #[test]
    fn the_transport_takes_no_uni_streams_and_request_sized_windows() {
        let t = format!("{:?}", transport());
        assert!(t.contains("max_concurrent_uni_streams: 0"), "{t}");
        assert!(t.contains("max_concurrent_bidi_streams: 8"), "{t}");
        assert!(t.contains("stream_receive_window: 8192"), "{t}");
        assert!(t.contains(" receive_window: 65536"), "{t}");
        assert!(t.contains("datagram_receive_buffer_size: None"), "{t}");
    }
}
