//! Push channels of subscribed nodes and push delivery.

use std::collections::HashMap;

use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::ids::NodeId;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Push messages queued per subscriber before it is considered stuck and dropped (it
/// reconnects and resynchronises).
pub const PUSH_QUEUE: usize = 1024;

/// Open push streams by node.
#[derive(Debug, Default)]
pub(super) struct Subscribers {
    channels: HashMap<NodeId, Vec<mpsc::Sender<Push>>>,
}

/// The metric label of a push.
pub(super) fn push_kind(p: &Push) -> &'static str {
    match p {
        Push::Config(_) => "config",
        Push::Routes { .. } => "routes",
        Push::Seeds { .. } => "seeds",
        Push::Compromised { .. } => "compromised",
        Push::Revocations { .. } => "revocations",
    }
}

impl Subscribers {
    /// Opens a stream for `node` that first yields `snapshot`.
    pub(super) fn open(
        &mut self,
        node: NodeId,
        snapshot: Vec<Push>,
        metrics: &Metrics,
    ) -> mpsc::Receiver<Push> {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        for m in snapshot {
            // The queue is larger than any snapshot of a node with ≤ 1000 peers; a failure here
            // only means the subscriber already went away.
            let _ = tx.try_send(m);
        }
        self.channels.entry(node).or_default().push(tx);
        metrics.subscribed.set(self.channels.len() as i64);
        rx
    }

    /// Subscribed nodes.
    pub(super) fn nodes(&self) -> Vec<NodeId> {
        self.channels.keys().copied().collect()
    }

    pub(super) fn is_connected(&self, node: &NodeId) -> bool {
        self.channels.contains_key(node)
    }

    /// Closes every stream of `node` (its receivers see the end).
    pub(super) fn close(&mut self, node: &NodeId) {
        self.channels.remove(node);
    }

    /// Queues `msgs` on every stream of `node`; a stream that cannot take them all is dropped.
    /// Nothing happens for a node without a stream.
    pub(super) fn push(&mut self, node: &NodeId, msgs: &[Push], metrics: &Metrics) {
        let Some(senders) = self.channels.get_mut(node) else {
            return;
        };
        senders.retain(|tx| msgs.iter().all(|m| tx.try_send(m.clone()).is_ok()));
        if senders.is_empty() {
            self.channels.remove(node);
        }
        for m in msgs {
            metrics
                .pushes
                .get_or_create(&[("kind", push_kind(m))])
                .inc();
        }
        metrics.subscribed.set(self.channels.len() as i64);
    }

    /// Queues `msg` on every stream.
    pub(super) fn broadcast(&mut self, msg: &Push, metrics: &Metrics) {
        for id in self.nodes() {
            self.push(&id, std::slice::from_ref(msg), metrics);
        }
    }
}
