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

#[cfg(test)]
mod tests {
    use hopmesh_protocol::enrollment::Push;
    use hopmesh_protocol::ids::NodeId;

    use super::{PUSH_QUEUE, Subscribers};
    use crate::metrics::Metrics;

    fn revocations() -> Push {
        Push::Revocations {
            list: hopmesh_protocol::wire::BoundedVec::new(vec![1, 2, 3]).expect("small list"),
        }
    }

    #[test]
    fn a_subscriber_that_cannot_keep_up_is_dropped_and_others_keep_theirs() {
        let metrics = Metrics::default();
        let mut subs = Subscribers::default();
        let (slow, fast) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let mut slow_rx = subs.open(slow, Vec::new(), &metrics);
        let mut fast_rx = subs.open(fast, Vec::new(), &metrics);
        assert_eq!(metrics.subscribed.get(), 2);
        for _ in 0..PUSH_QUEUE {
            subs.push(&slow, &[revocations()], &metrics);
        }
        assert!(subs.is_connected(&slow));
        // The queue is full: the next push drops the stream.
        subs.push(&slow, &[revocations()], &metrics);
        assert!(!subs.is_connected(&slow));
        assert_eq!(metrics.subscribed.get(), 1);
        let mut queued = 0;
        while slow_rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, PUSH_QUEUE);
        assert!(slow_rx.try_recv().is_err());
        subs.broadcast(&revocations(), &metrics);
        assert_eq!(fast_rx.try_recv().ok(), Some(revocations()));
        assert_eq!(
            metrics
                .pushes
                .get_or_create(&[("kind", "revocations")])
                .get(),
            PUSH_QUEUE as u64 + 2
        );
    }
}
