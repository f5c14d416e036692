//! The running node: its state, the overlay (dial, accept, Hello exchange, watchdog), the
//! verifier link (refresh and pushes), the audit log and shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hopmesh_protocol::attestation::verify_attestation;
use hopmesh_protocol::control::{GoodbyeReason, MAX_ENVELOPE, NonceCache, PeerMessage};
use hopmesh_protocol::enrollment::{Address, Refusal, Report};
use hopmesh_protocol::frame::CONTROL_CAP;
use hopmesh_protocol::hop_token::{
    Epoch, ForgeryLimitExceeded, ForgeryMeter, Generation, PairIds, StreamKeyCache,
};
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::secret::ConnectionBinding;
use hopmesh_protocol::secret::{PairSeed, StreamKey};
use hopmesh_protocol::time::{Clock, UnixTime};
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::audit::AuditLog;
use hopmesh_transport::fields;
use hopmesh_transport::identity::{Identity, SNI};
use hopmesh_transport::pins::Pins;
use hopmesh_transport::quic::{
    self, codes, connection_binding, peer_spki, quinn_client, quinn_server, read_frame,
    read_frame_within, write_frame,
};
use hopmesh_transport::tls::{self, ALPN_DATA, PeerAuthorizer, ServerExpectation};
use hopmesh_transport::verifier_client::{ClientError, VerifierClient};
use quinn::{Connection, Endpoint, SendStream, VarInt};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::NodeError;
use crate::config::NodeConfig;
use crate::counters::Counters;
use crate::datadir::{NodeDir, write_atomic};
use crate::path::{MAX_UDP_PAYLOAD, PathKind, Transports};
use crate::state::{ATTESTATION_LEEWAY, NodeState};

/// Deadline for the Hello exchange on a new connection.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline for dialing one address.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait between verifier reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Time given to open streams to finish on shutdown.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A peer connection that completed the Hello exchange.
#[derive(Debug)]
pub struct PeerConn {
    /// The TLS-authenticated peer.
    pub peer: NodeId,
    /// The connection.
    pub conn: Connection,
    /// Exporter bytes binding tokens to this connection.
    pub binding: ConnectionBinding,
    control: tokio::sync::Mutex<SendStream>,
    forgeries: Mutex<ForgeryMeter>,
    /// The peer said goodbye: finish open streams, open no new ones here.
    leaving: AtomicBool,
    /// Stream keys of this connection per (generation, epoch): one derivation per epoch.
    pub keys: Mutex<StreamKeyCache>,
}

impl PeerConn {
    /// The stream key for minting on this connection, derived once per (generation, epoch).
    pub fn stream_key(
        &self,
        seed: &PairSeed,
        pair: &PairIds,
        generation: Generation,
        epoch: Epoch,
    ) -> StreamKey {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stream_key(&self.binding, pair, seed, generation, epoch)
    }

    /// Records a forged token; `Err` when the connection passed the limit.
    pub fn record_forgery(&self, now: UnixTime) -> Result<(), ForgeryLimitExceeded> {
        self.forgeries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(now)
    }
}

/// The TLS authorizer: a snapshot check against the node state, no IO.
#[derive(Debug)]
struct StateAuthorizer {
    state: Arc<RwLock<NodeState>>,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
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

/// A running node.
pub struct Node {
    /// This node's id.
    pub local: NodeId,
    /// Its identity.
    pub identity: Identity,
    /// Configuration.
    pub config: NodeConfig,
    /// Counters.
    pub counters: Arc<Counters>,
    state: Arc<RwLock<NodeState>>,
    clock: Arc<dyn Clock>,
    dir: NodeDir,
    pins: Pins,
    endpoint: Endpoint,
    authorizer: Arc<StateAuthorizer>,
    transports: Transports,
    /// Server settings for loopback peers (the endpoint's default serves every other peer).
    loopback_server: Arc<quinn::ServerConfig>,
    /// Every live connection per peer (both directions): revocation must close them all.
    pool: Mutex<HashMap<NodeId, Vec<Arc<PeerConn>>>>,
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    audit: Mutex<AuditLog>,
    reports: mpsc::Sender<Report>,
    resolver: Option<TokioResolver>,
    measurement: Measurement,
    verifier_connected: AtomicBool,
    active: AtomicUsize,
    draining: AtomicBool,
    nonces: Mutex<NonceCache>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Already-bound sockets (tests bind port 0).
#[derive(Debug)]
pub struct Sockets {
    /// The QUIC overlay socket.
    pub quic: UdpSocket,
    /// The SOCKS listener.
    pub socks: TcpListener,
}

/// A started node.
#[derive(Debug)]
pub struct NodeHandle {
    /// The node.
    pub node: Arc<Node>,
    /// The QUIC address.
    pub quic_addr: SocketAddr,
    /// The SOCKS address.
    pub socks_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// Graceful shutdown: stop accepting, say goodbye, drain open streams, close.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.node.draining.store(true, Ordering::SeqCst);
        self.node.endpoint.set_server_config(None);
        let pcs: Vec<Arc<PeerConn>> = self.node.pool_snapshot();
        for pc in &pcs {
            let mut control = pc.control.lock().await;
            let _ = write_frame(
                &mut control,
                &PeerMessage::Goodbye {
                    reason: GoodbyeReason::Shutdown,
                },
                CONTROL_CAP,
            )
            .await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while self.node.active.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.node.endpoint.close(codes::SHUTDOWN, b"shutdown");
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.node.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(self.node.dir.ctl());
    }
}

/// Starts a node from its data directory and config on already-bound sockets.
pub async fn start(
    config: NodeConfig,
    sockets: Sockets,
    clock: Arc<dyn Clock>,
) -> Result<NodeHandle, NodeError> {
    let dir = NodeDir::new(&config.data_dir);
    let identity = Identity::load(&dir.key())?;
    let pins: Pins = serde_json::from_str(
        &std::fs::read_to_string(dir.file("pins.json"))
            .map_err(|e| NodeError::io("read pins.json", e))?,
    )
    .map_err(|e| NodeError::Config(format!("pins.json: {e}")))?;
    let keys = pins
        .key_set()
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let local = identity.node_id();
    let mut st = NodeState::new(local, keys.clone());
    if let Ok(bytes) = std::fs::read(dir.file("revocations.bin")) {
        st.load_revocations(&bytes)
            .map_err(|e| NodeError::Config(format!("revocations.bin does not verify ({e}); refusing to start with an unknown revocation state")))?;
    }
    let now = clock.now();
    if let Ok(bytes) = std::fs::read(dir.file("attestation.bin"))
        && let Ok(v) = verify_attestation(&bytes, &keys, now, 0)
        && v.get().node_id == local
    {
        st.set_attestation(bytes, v);
    }
    let measurement = crate::datadir::self_measurement()
        .map_err(|e| NodeError::io("measure own executable", e))?;
    let (audit, repaired) = AuditLog::open(&dir.file("audit.jsonl"))?;
    if repaired {
        tracing::warn!("audit log ended in a partial record (crash mid-write); it was dropped");
    }
    let state = Arc::new(RwLock::new(st));
    let counters = Arc::new(Counters::default());
    let authorizer = Arc::new(StateAuthorizer {
        state: state.clone(),
        clock: clock.clone(),
        counters: counters.clone(),
    });
    let (udp_recv_buffer, _) = quic::log_if_capped(&sockets.quic);
    let transports = Transports::new(config.congestion, udp_recv_buffer);
    let server_for = |kind| {
        quinn_server(
            tls::server_config(&identity, ALPN_DATA, authorizer.clone())?,
            transports.for_kind(kind),
        )
    };
    let server = server_for(PathKind::Network)?;
    let loopback_server = Arc::new(server_for(PathKind::Loopback)?);
    let mut endpoint_config = quinn::EndpointConfig::default();
    // Invariant: MAX_UDP_PAYLOAD is within quinn's accepted 1200..=65527.
    let _ = endpoint_config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    let endpoint = quic::endpoint_with(sockets.quic, Some(server), endpoint_config)?;
    let quic_addr = endpoint
        .local_addr()
        .map_err(|e| NodeError::io("quic local address", e))?;
    let socks_addr = sockets
        .socks
        .local_addr()
        .map_err(|e| NodeError::io("socks local address", e))?;
    let resolver = TokioResolver::builder_tokio()
        .ok()
        .and_then(|b| b.build().ok());
    let (reports_tx, reports_rx) = mpsc::channel(256);
    let node = Arc::new(Node {
        local,
        identity,
        config,
        counters,
        state,
        clock,
        dir,
        pins,
        endpoint,
        authorizer,
        transports,
        loopback_server,
        pool: Mutex::new(HashMap::new()),
        dial_locks: Mutex::new(HashMap::new()),
        audit: Mutex::new(audit),
        reports: reports_tx,
        resolver,
        measurement,
        verifier_connected: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        nonces: Mutex::new(NonceCache::default()),
    });
    let (tx, rx) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(accept_loop(node.clone(), rx.clone())),
        tokio::spawn(crate::socks::serve(node.clone(), sockets.socks, rx.clone())),
        tokio::spawn(verifier_link(node.clone(), reports_rx, rx.clone())),
        tokio::spawn(watchdog(node.clone(), rx.clone())),
        tokio::spawn(crate::ctl::serve(node.clone(), rx.clone())),
    ];
    let mut tasks = tasks;
    if let Some(addr) = node.config.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| NodeError::io(format!("bind metrics {addr}"), e))?;
        tasks.push(tokio::spawn(serve_metrics(node.clone(), listener, rx)));
    }
    tracing::info!(node = %local, %quic_addr, %socks_addr, "node running");
    Ok(NodeHandle {
        node,
        quic_addr,
        socks_addr,
        shutdown: tx,
        tasks,
    })
}

impl Node {
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

    /// Records an audit event.
    pub fn audit(&self, event: &str, fields: Map<String, Value>) {
        let now = self.now().as_secs();
        if let Err(e) = self
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(now, event, fields)
        {
            tracing::error!(error = %e, "audit log write failed");
        }
    }

    /// Queues a report for the verifier (dropped with a log line if the queue is full).
    pub fn report(&self, r: Report) {
        if self.reports.try_send(r).is_err() {
            tracing::warn!("report queue full; report dropped (it is in the audit log)");
        }
    }

    fn pool_snapshot(&self) -> Vec<Arc<PeerConn>> {
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .flatten()
            .cloned()
            .collect()
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

    async fn resolve_hostport(&self, hostport: &str) -> Result<Vec<SocketAddr>, String> {
        let b = hopmesh_protocol::policy::parse_backend(hostport)?;
        self.resolve(&b.host, b.port).await
    }

    /// A pooled connection to `peer`, dialing if needed.
    ///
    /// Returns a boxed future on purpose: relaying makes the call graph recursive (gate →
    /// forward → dial → establish → gate), and a named `Send` future type breaks the cycle
    /// that would otherwise defeat the compiler's `Send` inference.
    pub fn connection_to(
        self: &Arc<Self>,
        peer: NodeId,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<PeerConn>, NodeError>> + Send + 'static>> {
        let node = self.clone();
        Box::pin(async move {
            if let Some(pc) = node.pooled(&peer) {
                return Ok(pc);
            }
            let lock = node
                .dial_locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(peer)
                .or_default()
                .clone();
            let _guard = lock.lock().await;
            if let Some(pc) = node.pooled(&peer) {
                return Ok(pc);
            }
            node.dial(peer).await
        })
    }

    fn pooled(&self, peer: &NodeId) -> Option<Arc<PeerConn>> {
        let pool = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pool.get(peer)
            .into_iter()
            .flatten()
            .find(|pc| pc.conn.close_reason().is_none() && !pc.leaving.load(Ordering::SeqCst))
            .cloned()
    }

    async fn dial(self: &Arc<Self>, peer: NodeId) -> Result<Arc<PeerConn>, NodeError> {
        let now = self.now();
        let addresses: Vec<String> = {
            let st = self.state_read();
            st.authorize_peer(&peer, now)
                .map_err(|e| NodeError::Peer(e.to_string()))?;
            st.peers
                .get(&peer)
                .map(|p| p.addresses.iter().map(|a| a.as_str().to_owned()).collect())
                .unwrap_or_default()
        };
        let tls = tls::client_config(
            &self.identity,
            ALPN_DATA,
            ServerExpectation::Node(peer, self.authorizer.clone()),
        )?;
        let mut last = String::from("no address");
        for a in addresses {
            for addr in self.resolve_hostport(&a).await.unwrap_or_default() {
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
    /// connection as accepted only once the acceptor's Hello arrived (pitfall 1).
    async fn establish(
        self: Arc<Self>,
        conn: Connection,
        dialer: bool,
    ) -> Result<Arc<PeerConn>, NodeError> {
        let spki = peer_spki(&conn).ok_or_else(|| NodeError::Peer("no peer certificate".into()))?;
        let peer = NodeId::from_spki(&spki);
        let own = self
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
        write_frame(&mut send, &hello, CONTROL_CAP)
            .await
            .map_err(|e| NodeError::Peer(e.to_string()))?;
        let theirs = read_frame_within::<PeerMessage>(&mut recv, CONTROL_CAP, HELLO_DEADLINE)
            .await
            .map_err(|e| NodeError::Peer(e.to_string()))?;
        let Some(PeerMessage::Hello { attestation }) = theirs else {
            conn.close(codes::BAD_REQUEST, b"expected hello");
            return Err(NodeError::Peer("peer did not say hello".into()));
        };
        let now = self.now();
        let checked = self
            .state_read()
            .check_peer_attestation(&attestation, &spki, now);
        let pa = match checked {
            Ok(pa) => pa,
            Err(e) => {
                self.counters.refused("peer_attestation");
                self.audit(
                    "peer_refused",
                    fields! {"peer" => peer.to_string(), "reason" => e.reason()},
                );
                conn.close(codes::REVOKED, b"attestation refused");
                return Err(NodeError::Peer(format!("peer attestation refused: {e}")));
            }
        };
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peer_attestations
            .insert(peer, pa);
        let binding = connection_binding(&conn, ALPN_DATA, &PairIds::new(self.local, peer))?;
        let pc = Arc::new(PeerConn {
            peer,
            conn: conn.clone(),
            binding,
            control: tokio::sync::Mutex::new(send),
            forgeries: Mutex::new(ForgeryMeter::default()),
            leaving: AtomicBool::new(false),
            keys: Mutex::new(StreamKeyCache::default()),
        });
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(peer)
            .or_default()
            .push(pc.clone());
        self.audit(
            "peer_connected",
            fields! {"peer" => peer.to_string(), "dialer" => dialer},
        );
        tokio::spawn(control_reader(self.clone(), pc.clone(), recv, spki));
        tokio::spawn(serve_streams(self.clone(), pc.clone()));
        Ok(pc)
    }

    /// Closes every connection to `peer`.
    pub fn close_peer(&self, peer: &NodeId, code: VarInt, reason: &'static str) {
        let removed = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(peer)
            .unwrap_or_default();
        for pc in &removed {
            pc.conn.close(code, reason.as_bytes());
        }
        if !removed.is_empty() {
            self.audit(
                "peer_closed",
                fields! {"peer" => peer.to_string(), "reason" => reason},
            );
        }
    }

    fn apply_push(&self, push: hopmesh_protocol::enrollment::Push) {
        let now = self.now();
        let fx = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(push, now);
        if let Some(bytes) = fx.persist_revocations {
            if let Err(e) = write_atomic(&self.dir.file("revocations.bin"), &bytes) {
                tracing::error!(error = %e, "could not persist the revocation list");
            }
            let (version, entries) = self
                .state_read()
                .revocations
                .as_ref()
                .map_or((0, 0), |(v, _, l)| (*v, l.revoked.len()));
            // Wall-clock milliseconds besides the log's own seconds: propagation time is measured
            // from these (benches/, scale workload).
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.audit(
                "revocation_list_applied",
                fields! {"version" => version, "entries" => entries, "unix_ms" => unix_ms},
            );
        }
        if let Some(why) = fx.refused {
            self.counters.refused("push_refused");
            self.audit("push_refused", fields! {"reason" => why});
        }
        for (peer, reason) in fx.close {
            let code = if reason == "revoked" {
                codes::REVOKED
            } else {
                codes::POLICY
            };
            self.close_peer(&peer, code, reason);
        }
    }

    async fn set_attestation(
        &self,
        envelope: Vec<u8>,
        v: hopmesh_protocol::attestation::VerifiedAttestation,
    ) {
        if let Err(e) = write_atomic(&self.dir.file("attestation.bin"), &envelope) {
            tracing::warn!(error = %e, "could not persist the attestation");
        }
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_attestation(envelope.clone(), v);
        let renewal = match BoundedVec::new(envelope) {
            Ok(attestation) => PeerMessage::Renewal { attestation },
            Err(_) => return,
        };
        for pc in self.pool_snapshot() {
            let mut control = pc.control.lock().await;
            let _ = write_frame(&mut control, &renewal, CONTROL_CAP).await;
        }
    }

    fn addresses(&self) -> BoundedVec<Address, 4> {
        BoundedVec::new(
            self.config
                .advertise
                .iter()
                .take(4)
                .map(|a| BoundedString::truncated(a))
                .collect(),
        )
        .unwrap_or_default()
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

    /// Whether the verifier link is up.
    pub fn verifier_connected(&self) -> bool {
        self.verifier_connected.load(Ordering::SeqCst)
    }

    /// The exact state as JSON (`hopmesh-node ctl show`). Keys are stable.
    pub fn show(&self) -> Value {
        let now = self.now();
        let st = self.state_read();
        let pool = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let own = st.attestation.as_ref().map(|(_, v)| {
            let a = v.get();
            serde_json::json!({"serial": a.serial, "not_after": a.not_after.as_secs(), "valid": v.check_validity(now, 0).is_ok(),
                               "name": a.name.as_str(), "segments": a.segments.iter().map(|s| s.as_str()).collect::<Vec<_>>()})
        });
        let peers: Vec<Value> = st
            .peers
            .values()
            .map(|p| {
                let att = st.peer_attestations.get(&p.node_id);
                let generation = st.keyrings.get(&p.node_id).and_then(|k| k.minting(now)).map(|g| g.generation.0);
                serde_json::json!({
                    "node_id": p.node_id.to_string(),
                    "name": p.name.as_str(),
                    "addresses": p.addresses.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                    "segments": att.map(|a| a.segments.clone()),
                    "attestation_not_after": att.map(|a| a.not_after.as_secs()),
                    "connected": pool.get(&p.node_id).is_some_and(|v| v.iter().any(|pc| pc.conn.close_reason().is_none() && !pc.leaving.load(Ordering::SeqCst))),
                    "generation": generation,
                    "connections": pool.get(&p.node_id).map(|v| v.iter().map(|pc| {
                        let st = pc.conn.stats();
                        serde_json::json!({"side": format!("{:?}", pc.conn.side()), "mtu": st.path.current_mtu, "rtt_us": st.path.rtt.as_micros() as u64,
                                           "cwnd": st.path.cwnd, "lost_packets": st.path.lost_packets, "mtu_probes": [st.path.sent_plpmtud_probes, st.path.lost_plpmtud_probes], "black_holes": st.path.black_holes_detected, "sent_packets": st.path.sent_packets,
                                           "udp_tx": {"datagrams": st.udp_tx.datagrams, "bytes": st.udp_tx.bytes, "ios": st.udp_tx.ios},
                                           "udp_rx": {"datagrams": st.udp_rx.datagrams, "bytes": st.udp_rx.bytes, "ios": st.udp_rx.ios}})
                    }).collect::<Vec<_>>()),
                })
            })
            .collect();
        serde_json::json!({
            "node_id": self.local.to_string(),
            "now": now.as_secs(),
            "attestation": own,
            "self_permit": st.self_permit(now).err().map(|e| e.to_string()),
            "verifier_connected": self.verifier_connected(),
            "epoch_secs": st.epoch.as_secs(),
            "revocation_version": st.revocations.as_ref().map(|(v, _, _)| *v),
            "routes": st.table.as_ref().map(|t| t.egress.routes().map(|r| r.name.with_suffix(&st.suffix)).collect::<Vec<_>>()),
            "serves": st.table.as_ref().map(|t| t.ingress.entries().map(|e| e.name.with_suffix(&st.suffix)).collect::<Vec<_>>()),
            "peers": peers,
            "counters": self.counters.view(),
        })
    }
}

async fn serve_metrics(
    node: Arc<Node>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let node = node.clone();
            async move { node.counters.render() }
        }),
    );
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

async fn serve_streams(node: Arc<Node>, pc: Arc<PeerConn>) {
    while let Ok((send, recv)) = pc.conn.accept_bi().await {
        let (node, pc) = (node.clone(), pc.clone());
        node.active.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            crate::gate::handle(node.clone(), pc, send, recv).await;
            node.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn control_reader(
    node: Arc<Node>,
    pc: Arc<PeerConn>,
    mut recv: quinn::RecvStream,
    spki: Vec<u8>,
) {
    loop {
        match read_frame::<PeerMessage>(&mut recv, CONTROL_CAP).await {
            Ok(Some(PeerMessage::Renewal { attestation })) => {
                let now = node.now();
                let checked = node
                    .state_read()
                    .check_peer_attestation(&attestation, &spki, now);
                match checked {
                    Ok(pa) => {
                        node.state
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .peer_attestations
                            .insert(pc.peer, pa);
                    }
                    Err(e) => {
                        node.audit(
                            "peer_refused",
                            fields! {"peer" => pc.peer.to_string(), "reason" => e.reason()},
                        );
                        node.close_peer(&pc.peer, codes::REVOKED, "bad renewal");
                        return;
                    }
                }
            }
            Ok(Some(PeerMessage::Goodbye { reason })) => {
                // The peer is leaving: open streams finish, new ones go elsewhere (or fail).
                // Kept in the pool (revocation still closes it) but not used for new streams.
                pc.leaving.store(true, Ordering::SeqCst);
                node.audit(
                    "peer_goodbye",
                    fields! {"peer" => pc.peer.to_string(), "reason" => format!("{reason:?}")},
                );
                return;
            }
            Ok(None) => return,
            Ok(Some(PeerMessage::Hello { .. })) | Err(_) => {
                pc.conn.close(codes::BAD_REQUEST, b"control stream");
                return;
            }
        }
    }
}

async fn accept_loop(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = node.endpoint.accept() => i,
            _ = shutdown.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let node = node.clone();
        tokio::spawn(async move {
            let connecting = match PathKind::of(incoming.remote_address()) {
                PathKind::Loopback => incoming.accept_with(node.loopback_server.clone()),
                PathKind::Network => incoming.accept(),
            };
            // Never `into_0rtt()` (pitfall 2): wait for the full handshake.
            let handshake = async { connecting?.await };
            match handshake.await {
                Ok(conn) => {
                    if let Err(e) = node.clone().establish(conn, false).await {
                        tracing::debug!(error = %e, "inbound connection refused");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "inbound handshake failed"),
            }
        });
    }
}

/// Closes connections whose peer is revoked, no longer allowed, or whose attestation
/// expired; closes everything while our own attestation is invalid (fail closed).
async fn watchdog(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = node.now();
        let doomed: Vec<(NodeId, VarInt, &'static str)> = {
            let st = node.state_read();
            let self_ok = st.self_permit(now).is_ok();
            node.pool_snapshot()
                .iter()
                .filter_map(|pc| {
                    if !self_ok {
                        return Some((pc.peer, codes::REVOKED, "own attestation invalid"));
                    }
                    if let Err(e) = st.authorize_peer(&pc.peer, now) {
                        return Some((pc.peer, codes::REVOKED, e.reason()));
                    }
                    match st.peer_attestations.get(&pc.peer) {
                        Some(a) if now < a.not_after.plus(ATTESTATION_LEEWAY) => None,
                        _ => Some((pc.peer, codes::REVOKED, "peer attestation expired")),
                    }
                })
                .collect()
        };
        for (peer, code, why) in doomed {
            node.close_peer(&peer, code, why);
        }
        let mut pool = node
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for conns in pool.values_mut() {
            conns.retain(|pc| pc.conn.close_reason().is_none());
        }
        pool.retain(|_, conns| !conns.is_empty());
    }
}

/// Keeps the verifier link up: refresh at half-life with jitter, apply pushes, send reports,
/// reconnect with backoff.
async fn verifier_link(
    node: Arc<Node>,
    mut reports: mpsc::Receiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let session = async {
            let addrs = node
                .resolve_hostport(&node.config.verifier)
                .await
                .map_err(ClientError::Connect)?;
            let addr = *addrs
                .first()
                .ok_or_else(|| ClientError::Connect("verifier name has no address".into()))?;
            let client =
                VerifierClient::connect(&node.endpoint, addr, &node.identity, &node.pins).await?;
            run_session(&node, &client, &mut reports).await
        };
        let result = tokio::select! {
            r = session => r,
            _ = shutdown.changed() => return,
        };
        node.verifier_connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(ClientError::Refused(r @ (Refusal::Revoked | Refusal::NotEnrolled))) => {
                node.audit("verifier_refused", fields! {"reason" => r.to_string()});
                tracing::error!(reason = %r, "the verifier refuses this node; failing closed when the attestation expires");
                backoff = MAX_BACKOFF;
            }
            Err(e) => tracing::warn!(error = %e, "verifier link down"),
        }
        let jitter =
            Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 4 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn refresh(node: &Node, client: &VerifierClient) -> Result<Duration, ClientError> {
    let (env, v) = client
        .refresh(node.measurement, node.addresses(), node.now())
        .await?;
    let ttl = v.get().not_after.secs_since(v.get().not_before).max(2);
    node.set_attestation(env, v).await;
    // Refresh at half-life with ±10 % jitter.
    let fraction = rand::random_range(0.4..=0.6);
    Ok(Duration::from_secs_f64(ttl as f64 * fraction))
}

async fn run_session(
    node: &Arc<Node>,
    client: &VerifierClient,
    reports: &mut mpsc::Receiver<Report>,
) -> Result<(), ClientError> {
    // A fixed deadline: a `sleep(next)` inside the select would restart on every push and
    // never fire while pushes arrive faster than the refresh interval.
    let mut next = tokio::time::Instant::now() + refresh(node, client).await?;
    let mut pushes = client.subscribe().await?;
    node.verifier_connected.store(true, Ordering::SeqCst);
    node.audit("verifier_connected", fields! {});
    loop {
        tokio::select! {
            p = pushes.next() => match p {
                Ok(Some(push)) => node.apply_push(push),
                Ok(None) => return Ok(()),
                Err(e) => return Err(ClientError::Frame(e)),
            },
            _ = tokio::time::sleep_until(next) => next = tokio::time::Instant::now() + refresh(node, client).await?,
            Some(r) = reports.recv() => {
                if let Err(e) = client.report(r).await {
                    tracing::warn!(error = %e, "report not delivered");
                }
            }
        }
    }
}
