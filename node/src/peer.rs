//! Peer connections: [`PeerConn`] (one connection that completed the Hello exchange), the
//! [`Pool`] of every live connection per peer, and [`Dial`], the one way the gate (as a
//! relay) and the SOCKS endpoint reach a peer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hopmesh_protocol::control::PeerMessage;
use hopmesh_protocol::frame::CONTROL_CAP;
use hopmesh_protocol::hop_token::{Epoch, Generation, PairIds, StreamKeyCache};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::secret::{ConnectionBinding, PairSeed, StreamKey};
use hopmesh_transport::quic::{FrameIoError, write_frame};
use quinn::{Connection, SendStream};
use tokio::sync::watch;

use crate::NodeError;
use crate::refusal::CloseReason;

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
    /// The peer said goodbye: finish open streams, open no new ones here.
    leaving: AtomicBool,
    /// Stream keys of this connection per (generation, epoch): one derivation per epoch.
    pub keys: Mutex<StreamKeyCache>,
    /// The newest renewal for this peer; the connection's control writer sends it.
    renewal: watch::Sender<Option<Arc<PeerMessage>>>,
}

impl PeerConn {
    /// A connection whose Hello exchange succeeded; `control` is our side of its control
    /// stream. The receiver is for the connection's control writer (see [`Self::renew`]).
    pub fn new(
        peer: NodeId,
        conn: Connection,
        binding: ConnectionBinding,
        control: SendStream,
    ) -> (Self, watch::Receiver<Option<Arc<PeerMessage>>>) {
        let (renewal, pending) = watch::channel(None);
        let pc = Self {
            peer,
            conn,
            binding,
            control: tokio::sync::Mutex::new(control),
            leaving: AtomicBool::new(false),
            keys: Mutex::new(StreamKeyCache::default()),
            renewal,
        };
        (pc, pending)
    }

    /// Queues `msg` (a renewal) for the control writer; a newer one replaces one not yet
    /// sent, so the peer never sees serials go backwards and the caller never waits.
    pub fn renew(&self, msg: Arc<PeerMessage>) {
        self.renewal.send_replace(Some(msg));
    }

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

    /// Writes one message on our control stream.
    pub async fn send_control(&self, msg: &PeerMessage) -> Result<(), FrameIoError> {
        let mut control = self.control.lock().await;
        write_frame(&mut control, msg, CONTROL_CAP).await
    }

    /// Marks the connection as leaving (the peer said goodbye).
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    /// Open, and the peer has not said goodbye: usable for new streams.
    pub fn usable(&self) -> bool {
        self.conn.close_reason().is_none() && !self.leaving.load(Ordering::SeqCst)
    }

    /// Closes the connection with `why`'s code and reason.
    pub fn close(&self, why: CloseReason) {
        self.conn.close(why.code(), why.reason().as_bytes());
    }
}

/// Open connections kept per peer node id, both directions together. Honest nodes reuse one
/// connection (two when both dial at once, a few more across address changes until the old
/// ones time out); a peer that opens more displaces its own oldest: a new connection always
/// gets in (a rebooted peer is never locked out by its stale ones), and the peer's cost to us
/// stays bounded. Counted `peer_connection_replaced`.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// Every live connection per peer (both directions): revocation must close them all.
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<HashMap<NodeId, Vec<Arc<PeerConn>>>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Vec<Arc<PeerConn>>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A usable connection to `peer`, if any.
    pub fn usable(&self, peer: &NodeId) -> Option<Arc<PeerConn>> {
        self.lock()
            .get(peer)
            .into_iter()
            .flatten()
            .find(|pc| pc.usable())
            .cloned()
    }

    /// Adds an established connection; returns the connections it displaces: past
    /// [`MAX_CONNECTIONS_PER_PEER`] open ones, the oldest go (closed ones are forgotten first).
    /// The caller closes them with [`CloseReason::Replaced`].
    pub fn insert(&self, pc: Arc<PeerConn>) -> Vec<Arc<PeerConn>> {
        let mut pool = self.lock();
        let conns = pool.entry(pc.peer).or_default();
        conns.retain(|c| c.conn.close_reason().is_none());
        conns.push(pc);
        let excess = conns.len().saturating_sub(MAX_CONNECTIONS_PER_PEER);
        conns.drain(..excess).collect()
    }

    /// Removes every connection to `peer` and returns them.
    pub fn remove(&self, peer: &NodeId) -> Vec<Arc<PeerConn>> {
        self.lock().remove(peer).unwrap_or_default()
    }

    /// Every connection.
    pub fn snapshot(&self) -> Vec<Arc<PeerConn>> {
        self.lock().values().flatten().cloned().collect()
    }

    /// The peers with at least one connection.
    pub fn peers(&self) -> Vec<NodeId> {
        self.lock().keys().copied().collect()
    }

    /// The connections to `peer`.
    pub fn of(&self, peer: &NodeId) -> Vec<Arc<PeerConn>> {
        self.lock().get(peer).cloned().unwrap_or_default()
    }

    /// Forgets closed connections.
    pub fn prune(&self) {
        let mut pool = self.lock();
        for conns in pool.values_mut() {
            conns.retain(|pc| pc.conn.close_reason().is_none());
        }
        pool.retain(|_, conns| !conns.is_empty());
    }
}

/// A future that yields a pooled or freshly dialed connection.
pub type DialFuture = Pin<Box<dyn Future<Output = Result<Arc<PeerConn>, NodeError>> + Send>>;

/// Reaches a peer: a pooled connection, or a new one after the Hello exchange.
///
/// The future is boxed on purpose: relaying makes the call graph recursive (gate → dial →
/// establish → gate), and a named future type breaks the cycle that would otherwise defeat
/// the compiler's `Send` inference.
pub trait Dial: Send + Sync + std::fmt::Debug {
    /// A connection to `peer`, dialing if needed.
    fn connection_to(&self, peer: NodeId) -> DialFuture;
}
