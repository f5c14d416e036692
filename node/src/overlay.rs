//! The QUIC overlay: the endpoint, dialing and accepting peers, the Hello exchange, each
//! connection's control reader and stream acceptor, the watchdog, and the TLS authorizer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use hopmesh_protocol::control::{MAX_ENVELOPE, PeerMessage};
use hopmesh_protocol::frame::CONTROL_CAP;
use hopmesh_protocol::hop_token::PairIds;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::Clock;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::fields;
use hopmesh_transport::identity::SNI;
use hopmesh_transport::quic::{
    connection_binding, peer_spki, quinn_client, read_frame, read_frame_within,
};
use hopmesh_transport::tls::{self, ALPN_DATA, PeerAuthorizer, ServerExpectation};
use quinn::{Connection, Endpoint};
use tokio::sync::watch;

use crate::NodeError;
use crate::counters::Counters;
use crate::path::{PathKind, Transports};
use crate::peer::{Dial, DialFuture, PeerConn, Pool};
use crate::refusal::CloseReason;
use crate::shared::Shared;
use crate::state::NodeState;

/// Deadline for the Hello exchange on a new connection.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for dialing one address.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for writing one control message (a renewal) to a peer.
pub const CONTROL_WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Inbound handshakes (TLS and Hello) in progress at once; one more is refused at once
/// (`incoming.refuse()`, counted `handshake_limit`) instead of queued.
pub const MAX_INFLIGHT_HANDSHAKES: usize = 256;
/// Inbound handshakes in progress at once from one source IP address (counted
/// `handshake_source_limit` past it): one host cannot take every slot.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Deadline for an inbound QUIC/TLS handshake (counted `handshake_timeout`); the Hello
/// exchange that follows has its own (2 × [`HELLO_DEADLINE`]).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The accept loop's handshake slots: [`MAX_INFLIGHT_HANDSHAKES`] in all,
/// [`MAX_HANDSHAKES_PER_SOURCE`] per source address. Pure bookkeeping.
#[derive(Debug, Default)]
pub struct HandshakeSlots {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl HandshakeSlots {
    /// Takes a slot for a handshake from `ip`, or the refusal reason (counter label).
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), &'static str> {
        if self.total >= MAX_INFLIGHT_HANDSHAKES {
            return Err("handshake_limit");
        }
        let n = self.per_source.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return Err("handshake_source_limit");
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back the slot of a handshake from `ip` (finished, failed or timed out).
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    /// Handshakes in progress.
    pub fn in_flight(&self) -> usize {
        self.total
    }
}

/// How often the watchdog re-checks every connection.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_millis(250);

/// The TLS authorizer: a snapshot check against the node state, no IO.
#[derive(Debug)]
pub struct StateAuthorizer {
    state: Arc<RwLock<NodeState>>,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
}

impl StateAuthorizer {
    /// An authorizer reading `shared`'s state.
    pub fn new(shared: &Shared) -> Self {
        Self {
            state: shared.state.clone(),
            clock: shared.clock.clone(),
            counters: shared.counters.clone(),
        }
    }
}

impl PeerAuthorizer for StateAuthorizer {
    fn authorize(&self, node: &NodeId, _spki: &[u8]) -> Result<(), String> {
        let st = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.authorize_peer(node, self.clock.now()).map_err(|e| {
            self.counters.refused(e.reason());
            e.to_string()
        })
    }
}

/// The overlay of a running node.
#[derive(Debug)]
pub struct Overlay {
    /// What every task reads.
    pub shared: Arc<Shared>,
    /// The QUIC endpoint (peers and the verifier).
    pub endpoint: Endpoint,
    /// Every live peer connection.
    pub pool: Pool,
    authorizer: Arc<StateAuthorizer>,
    transports: Transports,
    /// Server settings for loopback peers (the endpoint's default serves every other peer).
    loopback_server: Arc<quinn::ServerConfig>,
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    me: Weak<Overlay>,
}

/// What [`Overlay::new`] needs.
#[derive(Debug)]
pub struct OverlayParts {
    /// The endpoint, bound and serving.
    pub endpoint: Endpoint,
    /// The authorizer its server config uses.
    pub authorizer: Arc<StateAuthorizer>,
    /// Per-path transport settings.
    pub transports: Transports,
    /// Server settings for loopback peers.
    pub loopback_server: Arc<quinn::ServerConfig>,
}

impl Overlay {
    /// The overlay over `shared`.
    pub fn new(shared: Arc<Shared>, p: OverlayParts) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            shared,
            endpoint: p.endpoint,
            pool: Pool::default(),
            authorizer: p.authorizer,
            transports: p.transports,
            loopback_server: p.loopback_server,
            dial_locks: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    fn dialer(&self) -> Arc<dyn Dial> {
        // Invariant: `me` upgrades while any task holds an `Arc<Overlay>` (the caller does).
        match self.me.upgrade() {
            Some(me) => me,
            None => Arc::new(Gone),
        }
    }

    async fn connect(self: Arc<Self>, peer: NodeId) -> Result<Arc<PeerConn>, NodeError> {
        if let Some(pc) = self.pool.usable(&peer) {
            return Ok(pc);
        }
        let lock = self
            .dial_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(peer)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(pc) = self.pool.usable(&peer) {
            return Ok(pc);
        }
        self.dial(peer).await
    }

    async fn dial(self: &Arc<Self>, peer: NodeId) -> Result<Arc<PeerConn>, NodeError> {
        let now = self.shared.now();
        let addresses: Vec<String> = {
            let st = self.shared.state_read();
            st.authorize_peer(&peer, now)
                .map_err(|e| NodeError::Peer(e.to_string()))?;
            st.peers
                .get(&peer)
                .map(|p| p.addresses.iter().map(|a| a.as_str().to_owned()).collect())
                .unwrap_or_default()
        };
        let tls = tls::client_config(
            &self.shared.identity,
            ALPN_DATA,
            ServerExpectation::Node(peer, self.authorizer.clone()),
        )?;
        let mut last = String::from("no address");
        for a in addresses {
            for addr in self.shared.resolve_hostport(&a).await.unwrap_or_default() {
                let cfg = quinn_client(tls.clone(), self.transports.for_peer(addr))?;
                let attempt = async {
                    let conn = self
                        .endpoint
                        .connect_with(cfg, addr, SNI)
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                    self.clone()
                        .establish(conn, true)
                        .await
                        .map_err(|e| e.to_string())
                };
                match tokio::time::timeout(DIAL_DEADLINE, attempt).await {
                    Ok(Ok(pc)) => return Ok(pc),
                    Ok(Err(e)) => last = format!("{addr}: {e}"),
                    Err(_) => last = format!("{addr}: timed out"),
                }
            }
        }
        Err(NodeError::Peer(format!(
            "cannot reach {}: {last}",
            peer.short()
        )))
    }

    /// The Hello exchange, then pool and serve the connection. The dialer treats the
    /// connection as accepted only once the acceptor's Hello arrived (docs/design.md,
    /// pitfall 1).
    async fn establish(
        self: Arc<Self>,
        conn: Connection,
        dialer: bool,
    ) -> Result<Arc<PeerConn>, NodeError> {
        let node = &self.shared;
        let spki = peer_spki(&conn).ok_or_else(|| NodeError::Peer("no peer certificate".into()))?;
        let peer = NodeId::from_spki(&spki);
        let own = node
            .state_read()
            .attestation
            .as_ref()
            .map(|(b, _)| b.clone())
            .ok_or_else(|| NodeError::Peer("no own attestation".into()))?;
        let hello = PeerMessage::Hello {
            attestation: BoundedVec::<u8, MAX_ENVELOPE>::new(own)
                .map_err(|e| NodeError::Peer(e.to_string()))?,
        };
        let (mut send, mut recv) = if dialer {
            conn.open_bi()
                .await
                .map_err(|e| NodeError::Peer(e.to_string()))?
        } else {
            tokio::time::timeout(HELLO_DEADLINE, conn.accept_bi())
                .await
                .map_err(|_| NodeError::Peer("no control stream".into()))?
                .map_err(|e| NodeError::Peer(e.to_string()))?
        };
        hopmesh_transport::quic::write_frame(&mut send, &hello, CONTROL_CAP)
            .await
            .map_err(|e| NodeError::Peer(e.to_string()))?;
        let theirs = read_frame_within::<PeerMessage>(&mut recv, CONTROL_CAP, HELLO_DEADLINE)
            .await
            .map_err(|e| NodeError::Peer(e.to_string()))?;
        let Some(PeerMessage::Hello { attestation }) = theirs else {
            let why = CloseReason::ExpectedHello;
            conn.close(why.code(), why.reason().as_bytes());
            return Err(NodeError::Peer("peer did not say hello".into()));
        };
        let now = node.now();
        let checked = node
            .state_read()
            .check_peer_attestation(&attestation, &spki, now);
        let pa = match checked {
            Ok(pa) => pa,
            Err(e) => {
                node.counters.refused("peer_attestation");
                node.audit(
                    "peer_refused",
                    fields! {"peer" => peer.to_string(), "reason" => e.reason()},
                );
                let why = CloseReason::AttestationRefused;
                conn.close(why.code(), why.reason().as_bytes());
                return Err(NodeError::Peer(format!("peer attestation refused: {e}")));
            }
        };
        node.state_write().peer_attestations.insert(peer, pa);
        let binding = connection_binding(&conn, ALPN_DATA, &PairIds::new(node.local, peer))?;
        let (pc, renewals) = PeerConn::new(peer, conn, binding, send);
        let pc = Arc::new(pc);
        for old in self.pool.insert(pc.clone()) {
            let why = CloseReason::Replaced;
            node.counters.refused("peer_connection_replaced");
            old.close(why);
            node.audit(
                "peer_closed",
                fields! {"peer" => peer.to_string(), "reason" => why.reason()},
            );
        }
        node.audit(
            "peer_connected",
            fields! {"peer" => peer.to_string(), "dialer" => dialer},
        );
        tokio::spawn(self.clone().control_reader(pc.clone(), recv, spki));
        tokio::spawn(self.clone().serve_streams(pc.clone()));
        tokio::spawn(self.clone().control_writer(pc.clone(), renewals));
        Ok(pc)
    }

    /// Closes every connection to `peer`.
    pub fn close_peer(&self, peer: &NodeId, why: CloseReason) {
        let removed = self.pool.remove(peer);
        for pc in &removed {
            pc.close(why);
        }
        if !removed.is_empty() {
            self.shared.audit(
                "peer_closed",
                fields! {"peer" => peer.to_string(), "reason" => why.reason()},
            );
        }
    }

    async fn serve_streams(self: Arc<Self>, pc: Arc<PeerConn>) {
        while let Ok((send, recv)) = pc.conn.accept_bi().await {
            let guard = self.shared.stream_guard();
            let (node, dial, pc) = (self.shared.clone(), self.dialer(), pc.clone());
            tokio::spawn(async move {
                crate::gate::handle(node, dial, pc, send, recv).await;
                drop(guard);
            });
        }
    }

    async fn control_reader(
        self: Arc<Self>,
        pc: Arc<PeerConn>,
        mut recv: quinn::RecvStream,
        spki: Vec<u8>,
    ) {
        let node = &self.shared;
        loop {
            match read_frame::<PeerMessage>(&mut recv, CONTROL_CAP).await {
                Ok(Some(PeerMessage::Renewal { attestation })) => {
                    let now = node.now();
                    let checked =
                        node.state_read()
                            .check_peer_attestation(&attestation, &spki, now);
                    match checked {
                        Ok(pa) => {
                            node.state_write().peer_attestations.insert(pc.peer, pa);
                        }
                        Err(e) => {
                            node.audit(
                                "peer_refused",
                                fields! {"peer" => pc.peer.to_string(), "reason" => e.reason()},
                            );
                            self.close_peer(&pc.peer, CloseReason::BadRenewal);
                            return;
                        }
                    }
                }
                Ok(Some(PeerMessage::Goodbye { reason })) => {
                    // The peer is leaving: open streams finish, new ones go elsewhere (or fail).
                    // Kept in the pool (revocation still closes it) but not used for new streams.
                    pc.set_leaving();
                    node.audit(
                        "peer_goodbye",
                        fields! {"peer" => pc.peer.to_string(), "reason" => format!("{reason:?}")},
                    );
                    return;
                }
                Ok(None) => return,
                Ok(Some(PeerMessage::Hello { .. })) | Err(_) => {
                    pc.close(CloseReason::ControlStream);
                    return;
                }
            }
        }
    }

    /// Accepts peer connections until shutdown, within [`HandshakeSlots`] and
    /// [`HANDSHAKE_DEADLINE`].
    pub async fn accept_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Mutex::new(HandshakeSlots::default()));
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => i,
                _ = shutdown.changed() => return,
            };
            let Some(incoming) = incoming else { return };
            let ip = incoming.remote_address().ip();
            let admitted = slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .admit(ip);
            if let Err(reason) = admitted {
                self.shared.counters.refused(reason);
                incoming.refuse();
                continue;
            }
            let slot = SlotGuard(slots.clone(), ip);
            let overlay = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let connecting = match PathKind::of(incoming.remote_address()) {
                    PathKind::Loopback => incoming.accept_with(overlay.loopback_server.clone()),
                    PathKind::Network => incoming.accept(),
                };
                // Never `into_0rtt()` (docs/design.md, pitfall 2): wait for the full handshake.
                let handshake = async { connecting?.await };
                let Ok(handshake) = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake).await
                else {
                    overlay.shared.counters.refused("handshake_timeout");
                    return;
                };
                match handshake {
                    Ok(conn) => {
                        // The whole Hello exchange, our write included, within the deadline:
                        // a peer that gives no credit cannot hold this task.
                        let established = tokio::time::timeout(
                            2 * HELLO_DEADLINE,
                            overlay.establish(conn.clone(), false),
                        )
                        .await;
                        match established {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "inbound connection refused"),
                            Err(_) => {
                                let why = CloseReason::ControlStalled;
                                conn.close(why.code(), why.reason().as_bytes());
                                tracing::debug!("inbound Hello exchange timed out");
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "inbound handshake failed"),
                }
            });
        }
    }

    /// Closes connections whose peer is revoked, no longer allowed, or whose attestation
    /// expired; closes everything while our own attestation is invalid (fail closed). The
    /// selection is [`NodeState::doomed`].
    pub async fn watchdog(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(WATCHDOG_INTERVAL);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = self.shared.now();
            self.shared.flush_refusal_audit(false);
            // A refreshed attestation that was not valid yet on our clock may be now.
            let promoted = {
                let mut st = self.shared.state_write();
                st.forgeries.prune(now);
                st.promote_pending(now)
            };
            if let Some(envelope) = promoted {
                self.renew_all(envelope);
            }
            let doomed = self.shared.state_read().doomed(self.pool.peers(), now);
            for (peer, why) in doomed {
                self.close_peer(&peer, why);
            }
            self.stop_disallowed_streams();
            self.pool.prune();
        }
    }

    /// Resets the served streams that the current table no longer allows (a policy change
    /// that kept their peer: removing the peer closes its connections instead).
    fn stop_disallowed_streams(&self) {
        let node = &self.shared;
        let flows = node.streams.snapshot();
        let stale = node.state_read().disallowed(flows);
        for (id, flow) in stale {
            let why = CloseReason::PolicyChanged;
            if node.streams.stop(id, why) {
                node.counters.refused("stream_policy_changed");
                node.audit(
                    "stream_closed",
                    fields! {"peer" => flow.peer.to_string(), "origin" => flow.origin.to_string(), "reason" => why.reason()},
                );
            }
        }
    }

    /// Queues a renewal of our attestation for every connection; never waits.
    pub fn renew_all(&self, envelope: Vec<u8>) {
        let Ok(attestation) = BoundedVec::new(envelope) else {
            return;
        };
        let msg = Arc::new(PeerMessage::Renewal { attestation });
        for pc in self.pool.snapshot() {
            pc.renew(msg.clone());
        }
    }

    /// One per connection: writes the newest queued renewal, each within
    /// [`CONTROL_WRITE_DEADLINE`]. A write that misses it leaves a partial frame behind, and
    /// means the peer gives no credit or does not read: the connection is closed.
    async fn control_writer(
        self: Arc<Self>,
        pc: Arc<PeerConn>,
        mut renewals: watch::Receiver<Option<Arc<PeerMessage>>>,
    ) {
        loop {
            tokio::select! {
                changed = renewals.changed() => if changed.is_err() { return },
                _ = pc.conn.closed() => return,
            }
            let Some(msg) = renewals.borrow_and_update().clone() else {
                continue;
            };
            match tokio::time::timeout(CONTROL_WRITE_DEADLINE, pc.send_control(&msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    // This connection only: the peer's other connections have their own
                    // writers (and the same key may be in use by an honest process).
                    let why = CloseReason::ControlStalled;
                    self.shared.counters.refused("control_stalled");
                    pc.close(why);
                    self.shared.audit(
                        "peer_closed",
                        fields! {"peer" => pc.peer.to_string(), "reason" => why.reason()},
                    );
                    return;
                }
            }
        }
    }
}

impl Dial for Overlay {
    fn connection_to(&self, peer: NodeId) -> DialFuture {
        match self.me.upgrade() {
            Some(me) => Box::pin(me.connect(peer)),
            None => Gone.connection_to(peer),
        }
    }
}

/// A handshake slot, given back when the handshake task ends however it ends.
struct SlotGuard(Arc<Mutex<HandshakeSlots>>, IpAddr);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .release(self.1);
    }
}

/// The dialer of an overlay that has shut down.
#[derive(Debug)]
struct Gone;

impl Dial for Gone {
    fn connection_to(&self, _peer: NodeId) -> DialFuture {
        Box::pin(async { Err(NodeError::Peer("the node is shutting down".into())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_slots_cap_each_source_and_the_total_and_come_back() {
        let mut s = HandshakeSlots::default();
        let one: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            assert_eq!(s.admit(one), Ok(()));
        }
        assert_eq!(s.admit(one), Err("handshake_source_limit"));
        s.release(one);
        assert_eq!(s.admit(one), Ok(()));
        // Other sources fill the rest, up to the total.
        let mut n = 0u32;
        while s.in_flight() < MAX_INFLIGHT_HANDSHAKES {
            n += 1;
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(n)));
            assert_eq!(s.admit(ip), Ok(()));
        }
        let fresh: IpAddr = "198.51.100.7".parse().expect("ip");
        assert_eq!(s.admit(fresh), Err("handshake_limit"));
        s.release(one);
        assert_eq!(s.admit(fresh), Ok(()));
        // Releasing an unknown source changes nothing.
        s.release("203.0.113.9".parse().expect("ip"));
        assert_eq!(s.in_flight(), MAX_INFLIGHT_HANDSHAKES);
    }
}
