//! The inbound streams a node is serving, so that a policy change can end exactly the ones it
//! no longer allows (the decision is [`crate::state::NodeState::disallowed`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hopmesh_protocol::ids::{NodeId, ServiceId};
use tokio::sync::oneshot;

use crate::refusal::CloseReason;

/// What an admitted stream is: who sent it, whose flow it is, to which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The TLS peer the stream arrived from.
    pub peer: NodeId,
    /// The node whose app opened it (the peer itself, or the origin behind a relay).
    pub origin: NodeId,
    /// The service it reaches.
    pub service: ServiceId,
}

#[derive(Debug)]
struct Tracked {
    flow: Flow,
    stop: Option<oneshot::Sender<CloseReason>>,
}

/// Every served stream, by a local id.
#[derive(Debug, Default)]
pub struct Streams {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tracks `flow` until the ticket drops.
    pub fn track(self: &Arc<Self>, flow: Flow) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            id,
            Tracked {
                flow,
                stop: Some(tx),
            },
        );
        Ticket {
            id,
            streams: self.clone(),
            stop: Some(rx),
        }
    }

    /// The live streams.
    pub fn snapshot(&self) -> Vec<(u64, Flow)> {
        self.lock().iter().map(|(id, t)| (*id, t.flow)).collect()
    }

    /// Tells stream `id` to end with `why`; false if it had ended or was told already.
    pub fn stop(&self, id: u64, why: CloseReason) -> bool {
        let tx = self.lock().get_mut(&id).and_then(|t| t.stop.take());
        tx.is_some_and(|tx| tx.send(why).is_ok())
    }

    /// How many are live.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// None live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tracked stream; dropping it forgets the stream.
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    streams: Arc<Streams>,
    stop: Option<oneshot::Receiver<CloseReason>>,
}

impl Ticket {
    /// Resolves when the stream must end (never, if nobody stops it).
    pub async fn stopped(&mut self) -> CloseReason {
        match self.stop.take() {
            Some(rx) => match rx.await {
                Ok(why) => why,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_stream_hears_why_and_a_dropped_one_is_forgotten() {
        let streams = Arc::new(Streams::default());
        let flow = Flow {
            peer: NodeId::from_bytes([1; 32]),
            origin: NodeId::from_bytes([1; 32]),
            service: hopmesh_protocol::ids::ServiceId::from_u64(7),
        };
        let mut t1 = streams.track(flow);
        let t2 = streams.track(flow);
        assert_eq!(streams.len(), 2);
        let (id1, _) = *streams
            .snapshot()
            .iter()
            .min_by_key(|(id, _)| *id)
            .expect("two");
        assert!(streams.stop(id1, CloseReason::PolicyChanged));
        assert!(!streams.stop(id1, CloseReason::PolicyChanged), "told once");
        assert_eq!(t1.stopped().await, CloseReason::PolicyChanged);
        drop(t2);
        drop(t1);
        assert!(streams.is_empty());
    }
}
