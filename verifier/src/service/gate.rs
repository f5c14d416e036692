//! The service's gate: the [`BudgetState`](super::BudgetState) in force, the connections and
//! subscriptions it holds, and the slots that release them on drop.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hopmesh_protocol::enrollment::{Push, Refusal};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::quic::codes;
use quinn::Connection;
use tokio::sync::mpsc;

use super::{BudgetState, ConnRefusal, ConnectionBudgets, PeerClass, Permit, REFUSAL_LOG_INTERVAL};
use crate::Shared;
use crate::metrics::Metrics;

/// The budgets in force and the connections they hold; one per running service.
#[derive(Debug)]
pub(super) struct Gate {
    pub(super) budgets: ConnectionBudgets,
    pub(super) metrics: Arc<Metrics>,
    pub(super) inner: Mutex<GateInner>,
    pub(super) log_at: Mutex<Option<Instant>>,
    pub(super) unlogged: AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct GateInner {
    pub(super) state: BudgetState,
    /// Enrolled nodes' connections, oldest first (for the per-node cap).
    pub(super) open: HashMap<NodeId, VecDeque<Connection>>,
    /// The live subscription of each node (its id).
    pub(super) subscriptions: HashMap<NodeId, u64>,
    pub(super) next_subscription: u64,
}

/// How a subscription ended when the authority closed its channel.
pub(super) enum Ended {
    /// A newer subscription of the node replaced it.
    Replaced,
    /// The node is no longer live (revoked, banned, out of policy).
    NotLive,
    /// It could not keep up: here is a fresh one (snapshot first).
    Resubscribed(mpsc::Receiver<Push>),
}

impl Gate {
    pub(super) fn new(budgets: ConnectionBudgets, metrics: Arc<Metrics>) -> Self {
        Self {
            budgets,
            metrics,
            inner: Mutex::default(),
            log_at: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, GateInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn gauges(&self, g: &GateInner) {
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
    pub(super) fn refused(&self, r: ConnRefusal) {
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
    pub(super) fn admit(
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

    pub(super) fn track(
        &self,
        g: &mut GateInner,
        conn: &Connection,
        permit: &Permit,
    ) -> Option<Connection> {
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
    pub(super) fn promote(
        &self,
        slot: &mut ConnectionSlot,
        conn: &Connection,
        node: NodeId,
    ) -> bool {
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
    pub(super) fn subscribe(
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
    pub(super) fn ended(&self, shared: &Shared, node: &NodeId, id: u64, now: UnixTime) -> Ended {
        let mut authority = shared.authority();
        let mut g = self.lock();
        if g.subscriptions.get(node) != Some(&id) {
            return Ended::Replaced;
        }
        if authority.has_table(node)
            && let Ok(rx) = authority.subscribe(node, now)
        {
            return Ended::Resubscribed(rx);
        }
        g.subscriptions.remove(node);
        Ended::NotLive
    }

    /// Subscription `id` of `node` is gone (its stream or connection ended).
    pub(super) fn forget(&self, node: &NodeId, id: u64) {
        let mut g = self.lock();
        if g.subscriptions.get(node) == Some(&id) {
            g.subscriptions.remove(node);
        }
    }
}

/// A handshake slot, released on drop.
pub(super) struct HandshakeSlot {
    pub(super) gate: Arc<Gate>,
    pub(super) source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.state.end_handshake(self.source);
        self.gate.gauges(&g);
    }
}

/// An admitted connection's place in its pool, released on drop.
pub(super) struct ConnectionSlot {
    pub(super) gate: Arc<Gate>,
    pub(super) permit: Permit,
    pub(super) id: usize,
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
