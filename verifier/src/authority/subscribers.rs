//! Push channels of subscribed nodes and push delivery.

use std::collections::HashMap;

use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::ids::NodeId;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Push messages queued per subscriber beyond its snapshot (a subscription's queue holds its
/// whole snapshot plus this many changes, so a snapshot larger than the queue, as in a
/// segment of thousands, never leaves a fresh subscriber without room for the next change).
/// A subscriber whose queue is full is not silently
/// dropped: its channel is closed (counted in `subscriber_resyncs`) and the QUIC service
/// discards what is still queued and resubscribes it at once, so it gets one fresh snapshot
/// (the full state: config, revocation list, routes, every pair's compromised generations and
/// seeds) on the same stream, then every later change (`verifier/src/service.rs`, `push_loop`).
pub const PUSH_QUEUE: usize = 1024;

/// Open push streams by node: at most one per node. A new subscription of a node replaces
/// (closes) its old one (counted in `subscriptions_replaced`), so a reconnect while the old
/// connection lingers, or a second connection of the same key, never doubles the pushes.
#[derive(Debug, Default)]
pub(super) struct Subscribers {
    channels: HashMap<NodeId, mpsc::Sender<Push>>,
}

/// The metric label of a push.
pub(super) fn push_kind(p: &Push) -> &'static str {
    match p {
        Push::Config(_) => "config",
        Push::TablePart(_) => "table_part",
        Push::Seeds { .. } => "seeds",
        Push::Compromised { .. } => "compromised",
        Push::Revocations { .. } => "revocations",
    }
}

impl Subscribers {
    /// Opens the stream for `node` that first yields `snapshot`, closing any older one.
    pub(super) fn open(
        &mut self,
        node: NodeId,
        snapshot: Vec<Push>,
        metrics: &Metrics,
    ) -> mpsc::Receiver<Push> {
        let (tx, rx) = mpsc::channel(snapshot.len() + PUSH_QUEUE);
        for m in snapshot {
            // The queue holds the whole snapshot; a failure only means the subscriber already
            // went away.
            let _ = tx.try_send(m);
        }
        if self.channels.insert(node, tx).is_some() {
            metrics.subscriptions_replaced.inc();
        }
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

    /// Closes every stream; returns how many.
    pub(super) fn close_all(&mut self, metrics: &Metrics) -> usize {
        let n = self.channels.len();
        self.channels.clear();
        metrics.subscribed.set(0);
        n
    }

    /// Closes the stream of `node` (its receiver sees the end).
    pub(super) fn close(&mut self, node: &NodeId) {
        self.channels.remove(node);
    }

    /// Queues `msgs` on the stream of `node`. A stream that cannot take them all is closed for
    /// a resync (see [`PUSH_QUEUE`]); a stream whose receiver is gone is forgotten. Nothing
    /// happens for a node without a stream.
    pub(super) fn push(&mut self, node: &NodeId, msgs: &[Push], metrics: &Metrics) {
        let Some(tx) = self.channels.get(node) else {
            return;
        };
        let mut full = false;
        let mut gone = false;
        for m in msgs {
            match tx.try_send(m.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => full = true,
                Err(mpsc::error::TrySendError::Closed(_)) => gone = true,
            }
            if full || gone {
                break;
            }
        }
        if full || gone {
            self.channels.remove(node);
        }
        if full {
            metrics.subscriber_resyncs.inc();
        }
        for m in msgs {
            metrics
                .pushes
                .get_or_create(&[("kind", push_kind(m))])
                .inc();
        }
        metrics.subscribed.set(self.channels.len() as i64);
    }

    /// Queues `msg` on every stream, with the rule of [`Subscribers::push`] for each (a full
    /// stream is closed for a resync, a gone one forgotten). One pass over the streams under
    /// the authority lock: no list of nodes, one lookup of the push counter for all of them.
    pub(super) fn broadcast(&mut self, msg: &Push, metrics: &Metrics) {
        let mut queued = 0u64;
        let mut full = 0u64;
        self.channels.retain(|_, tx| {
            queued += 1;
            match tx.try_send(msg.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    full += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        metrics.subscriber_resyncs.inc_by(full);
        metrics
            .pushes
            .get_or_create(&[("kind", push_kind(msg))])
            .inc_by(queued);
        metrics.subscribed.set(self.channels.len() as i64);
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
    fn a_subscriber_that_cannot_keep_up_is_closed_for_resync_and_others_keep_theirs() {
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
        assert_eq!(metrics.subscriber_resyncs.get(), 0);
        // The queue is full: the next push closes the stream for a resync, and says so.
        subs.push(&slow, &[revocations()], &metrics);
        assert!(!subs.is_connected(&slow));
        assert!(
            slow_rx.is_closed(),
            "the service must see the close at once"
        );
        assert_eq!(metrics.subscriber_resyncs.get(), 1);
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

#[cfg(test)]
mod one_subscription_per_node {
    use hopmesh_protocol::enrollment::Push;
    use hopmesh_protocol::ids::NodeId;

    use super::{PUSH_QUEUE, Subscribers};
    use crate::metrics::Metrics;

    fn list(n: u8) -> Push {
        Push::Revocations {
            list: hopmesh_protocol::wire::BoundedVec::new(vec![n]).expect("small list"),
        }
    }

    #[test]
    fn a_new_subscription_of_the_same_node_replaces_the_old_one() {
        let metrics = Metrics::default();
        let mut subs = Subscribers::default();
        let node = NodeId::from_bytes([7; 32]);
        let mut old = subs.open(node, vec![list(1)], &metrics);
        let mut new = subs.open(node, vec![list(2)], &metrics);
        assert!(old.is_closed(), "the old subscription must be closed");
        assert!(!new.is_closed());
        assert_eq!(metrics.subscriptions_replaced.get(), 1);
        assert_eq!(metrics.subscribed.get(), 1, "one live subscription");
        subs.push(&node, &[list(3)], &metrics);
        // The old one keeps only its snapshot, then ends; the change goes to the new one only.
        assert_eq!(old.try_recv().ok(), Some(list(1)));
        assert!(old.try_recv().is_err());
        assert_eq!(new.try_recv().ok(), Some(list(2)));
        assert_eq!(new.try_recv().ok(), Some(list(3)));
        assert!(new.try_recv().is_err());
        // A third replaces the second; still one.
        let _third = subs.open(node, Vec::new(), &metrics);
        assert!(new.is_closed());
        assert_eq!(metrics.subscriptions_replaced.get(), 2);
        assert_eq!(metrics.subscribed.get(), 1);
    }

    #[test]
    fn a_snapshot_larger_than_the_queue_is_queued_whole_with_room_for_changes() {
        let metrics = Metrics::default();
        let mut subs = Subscribers::default();
        let node = NodeId::from_bytes([8; 32]);
        let snapshot: Vec<Push> = (0..PUSH_QUEUE + 5).map(|i| list(i as u8)).collect();
        let mut rx = subs.open(node, snapshot, &metrics);
        // Before the node has read any of its snapshot, PUSH_QUEUE changes still fit (a
        // queue sized to the snapshot alone made every change after a large snapshot a
        // resync, and every resync another large snapshot).
        for _ in 0..PUSH_QUEUE {
            subs.push(&node, &[list(0)], &metrics);
        }
        assert!(subs.is_connected(&node));
        assert_eq!(metrics.subscriber_resyncs.get(), 0);
        // One past the edge is a resync; what was queued is all still there.
        subs.push(&node, &[list(0)], &metrics);
        assert!(!subs.is_connected(&node));
        assert_eq!(metrics.subscriber_resyncs.get(), 1);
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2 * PUSH_QUEUE + 5);
    }

    #[test]
    fn a_broadcast_closes_a_full_stream_for_resync_forgets_a_gone_one_and_reaches_the_rest() {
        let metrics = Metrics::default();
        let mut subs = Subscribers::default();
        let (slow, gone, fast) = (
            NodeId::from_bytes([10; 32]),
            NodeId::from_bytes([11; 32]),
            NodeId::from_bytes([12; 32]),
        );
        let mut slow_rx = subs.open(slow, Vec::new(), &metrics);
        drop(subs.open(gone, Vec::new(), &metrics));
        let mut fast_rx = subs.open(fast, Vec::new(), &metrics);
        for _ in 0..PUSH_QUEUE {
            subs.push(&slow, &[list(0)], &metrics);
        }
        // `gone` was never pushed to since its receiver went: the broadcast finds it gone.
        assert!(subs.is_connected(&gone));
        subs.broadcast(&list(5), &metrics);
        assert!(
            !subs.is_connected(&slow),
            "a full stream is closed for a resync"
        );
        assert!(slow_rx.is_closed());
        assert!(!subs.is_connected(&gone), "a gone stream is forgotten");
        assert!(subs.is_connected(&fast));
        assert_eq!(
            metrics.subscriber_resyncs.get(),
            1,
            "only the full one is a resync"
        );
        assert_eq!(metrics.subscribed.get(), 1);
        assert_eq!(fast_rx.try_recv().ok(), Some(list(5)));
        assert!(fast_rx.try_recv().is_err());
        let mut n = 0;
        while let Ok(p) = slow_rx.try_recv() {
            assert_eq!(
                p,
                list(0),
                "what was queued stays, the broadcast is not in it"
            );
            n += 1;
        }
        assert_eq!(n, PUSH_QUEUE);
        // Counted as `push` counts: every message addressed, for each of the three.
        assert_eq!(
            metrics
                .pushes
                .get_or_create(&[("kind", "revocations")])
                .get(),
            PUSH_QUEUE as u64 + 3
        );
        // A later broadcast reaches only the one still subscribed.
        subs.broadcast(&list(6), &metrics);
        assert_eq!(fast_rx.try_recv().ok(), Some(list(6)));
        assert_eq!(metrics.subscriber_resyncs.get(), 1);
    }

    #[test]
    fn a_subscriber_whose_receiver_is_gone_is_forgotten_without_a_resync() {
        let metrics = Metrics::default();
        let mut subs = Subscribers::default();
        let node = NodeId::from_bytes([9; 32]);
        drop(subs.open(node, Vec::new(), &metrics));
        subs.push(&node, &[list(1)], &metrics);
        assert!(!subs.is_connected(&node));
        assert_eq!(metrics.subscriber_resyncs.get(), 0);
        assert_eq!(metrics.subscribed.get(), 0);
    }
}
