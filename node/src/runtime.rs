//! The running node: start (load the data dir, build the shared context and the overlay,
//! spawn the tasks), the handle with graceful shutdown, and the metrics endpoint.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::attestation::verify_attestation;
use hopmesh_protocol::control::{GoodbyeReason, PeerMessage};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::Clock;
use hopmesh_transport::audit::{AuditLog, AuditOptions};
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::quic::{self, quinn_server};
use hopmesh_transport::tls::{self, ALPN_DATA};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::NodeError;
use crate::config::NodeConfig;
use crate::datadir::NodeDir;
use crate::overlay::{Overlay, OverlayParts, StateAuthorizer};
use crate::path::{MAX_UDP_PAYLOAD, PathKind, Transports};
use crate::refusal::CloseReason;
use crate::shared::{Shared, SharedParts};
use crate::state::{ATTESTATION_LEEWAY, NodeState};

pub use crate::overlay::{DIAL_DEADLINE, HELLO_DEADLINE};
pub use crate::verifier_link::MAX_BACKOFF;

/// Time given to open streams to finish on shutdown.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for each Goodbye written on shutdown.
pub const GOODBYE_DEADLINE: Duration = Duration::from_secs(1);
/// Depth of the queue of reports waiting for the verifier link.
pub const REPORT_QUEUE: usize = 256;

/// A running node, as its owner sees it.
#[derive(Debug)]
pub struct Node {
    /// This node's id.
    pub local: NodeId,
    overlay: Arc<Overlay>,
}

impl Node {
    /// The exact state as JSON (`hopmesh-node ctl show`). Keys are stable.
    pub fn show(&self) -> Value {
        crate::show::show(&self.overlay.shared, &self.overlay.pool)
    }

    /// Instruments the streams this node relays (tests only: what a compromised relay can
    /// and cannot do). Only the first tap set is kept; `false` if one was set already.
    pub fn set_relay_tap(&self, tap: Arc<dyn crate::splice::RelayTap>) -> bool {
        self.overlay.shared.relay_tap.set(tap).is_ok()
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
    /// The address `/metrics` is served on (the config's `metrics`, its port resolved).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// Graceful shutdown: stop accepting, say goodbye, drain open streams, close.
    pub async fn shutdown(self) {
        let overlay = &self.node.overlay;
        let shared = &overlay.shared;
        let _ = self.shutdown.send(true);
        shared.start_draining();
        overlay.endpoint.set_server_config(None);
        let goodbye = PeerMessage::Goodbye {
            reason: GoodbyeReason::Shutdown,
        };
        for pc in overlay.pool.snapshot() {
            let _ = tokio::time::timeout(GOODBYE_DEADLINE, pc.send_control(&goodbye)).await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while shared.active_streams() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let why = CloseReason::Shutdown;
        overlay.endpoint.close(why.code(), why.reason().as_bytes());
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), overlay.endpoint.wait_idle()).await;
        shared.flush_refusal_audit(true);
        shared.anchor_audit();
        let _ = std::fs::remove_file(shared.dir.ctl());
    }
}

/// Loads what the data directory holds: identity, pins, the persisted revocation list and
/// attestation. A revocation list that does not verify stops the start (never run with an
/// unknown revocation state).
fn load_state(dir: &NodeDir, clock: &dyn Clock) -> Result<(Identity, Pins, NodeState), NodeError> {
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
    if let Ok(bytes) = std::fs::read(dir.file("attestation.bin"))
        && let Ok(v) = verify_attestation(&bytes, &keys, clock.now(), ATTESTATION_LEEWAY)
        && v.get().node_id == local
    {
        st.set_attestation(bytes, v);
    }
    Ok((identity, pins, st))
}

/// Starts a node from its data directory and config on already-bound sockets.
pub async fn start(
    config: NodeConfig,
    sockets: Sockets,
    clock: Arc<dyn Clock>,
) -> Result<NodeHandle, NodeError> {
    let dir = NodeDir::new(&config.data_dir);
    let (identity, pins, state) = load_state(&dir, clock.as_ref())?;
    let measurement = crate::datadir::self_measurement()
        .map_err(|e| NodeError::io("measure own executable", e))?;
    // Refuses a log cut below, or rewritten since, the head anchored in `audit.anchor`.
    let audit_opts = AuditOptions {
        anchor: dir.read_audit_anchor()?,
        ..AuditOptions::default()
    };
    let (audit, repaired) = AuditLog::open_with(&dir.audit_log(), &audit_opts)?;
    if repaired {
        tracing::warn!("audit log ended in a partial record (crash mid-write); it was dropped");
    }
    let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE);
    let shared = Arc::new(Shared::new(SharedParts {
        identity,
        config,
        state,
        clock,
        dir,
        pins,
        measurement,
        audit,
        reports: reports_tx,
    }));
    let authorizer = Arc::new(StateAuthorizer::new(&shared));
    let (udp_recv_buffer, _) = quic::log_if_capped(&sockets.quic);
    let transports = Transports::new(shared.config.congestion, udp_recv_buffer);
    let server_for = |kind| {
        quinn_server(
            tls::server_config(&shared.identity, ALPN_DATA, authorizer.clone())?,
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
    let overlay = Overlay::new(
        shared.clone(),
        OverlayParts {
            endpoint,
            authorizer,
            transports,
            loopback_server,
        },
    );
    let show: crate::ctl::ShowFn = {
        let overlay = overlay.clone();
        Arc::new(move || crate::show::show(&overlay.shared, &overlay.pool))
    };
    let (tx, rx) = watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(overlay.clone().accept_loop(rx.clone())),
        tokio::spawn(crate::socks::serve(
            shared.clone(),
            overlay.clone(),
            sockets.socks,
            rx.clone(),
        )),
        tokio::spawn(crate::verifier_link::run(
            overlay.clone(),
            reports_rx,
            rx.clone(),
        )),
        tokio::spawn(overlay.clone().watchdog(rx.clone())),
        tokio::spawn(crate::ctl::serve(
            shared.config.data_dir.clone(),
            show,
            rx.clone(),
        )),
    ];
    let mut metrics_addr = None;
    if let Some(addr) = shared.config.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| NodeError::io(format!("bind metrics {addr}"), e))?;
        metrics_addr = Some(
            listener
                .local_addr()
                .map_err(|e| NodeError::io("metrics local address", e))?,
        );
        tasks.push(tokio::spawn(serve_metrics(shared.clone(), listener, rx)));
    }
    let local = shared.local;
    tracing::info!(node = %local, %quic_addr, %socks_addr, "node running");
    Ok(NodeHandle {
        node: Arc::new(Node { local, overlay }),
        quic_addr,
        socks_addr,
        metrics_addr,
        shutdown: tx,
        tasks,
    })
}

async fn serve_metrics(
    node: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let node = node.clone();
            async move { crate::show::metrics(&node) }
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
