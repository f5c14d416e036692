//! Seed rotation spread across the generation slot, in bounded batches.
//!
//! A node holds the grants of the current and the next generation (its snapshot at subscribe
//! time, then one rotation per slot). When slot `s` begins it already holds generation `s`
//! (it got it as "next" during slot `s - 1`) and needs generation `s + 1` before slot `s` ends.
//! So nothing has to happen AT the edge: each subscribed node is due its rotation (the grants of
//! `s` and `s + 1`, one `Push::Seeds` per pair) at its own offset inside the first
//! [`ROTATION_SPREAD_PERCENT`] % of the slot, a keyed hash of its id (an enrolling attacker
//! cannot pick ids that land together, and the offsets are stable across restarts). The
//! authority serves due nodes in batches of at most [`ROTATION_BATCH`] nodes and
//! [`ROTATION_BATCH_PAIRS`] pairs per lock hold and releases the lock between batches
//! (`verifier/src/lib.rs`, the ticker), so a revocation, an enrolment or a refresh waits for at
//! most one batch, never for the whole mesh.
//!
//! A round is the set of nodes subscribed when the verifier notices the slot edge; each is
//! served at most once per round (exactly once if it stays subscribed). A node that subscribes
//! later in the slot is not in the round: its snapshot already carries the current and the next
//! generation. A node that resubscribes before its offset is served again: identical grants,
//! which the node's keyring takes as a no-op.
//!
//! Clock and scheduling faults:
//! - The next slot begins before a round is finished (a backlog, a verifier paused): the
//!   unserved nodes lack the now-current generation, so they are due at once in the new round,
//!   ahead of the offsets (counted in `rotation_carried_over`).
//! - A slot is skipped (the verifier was paused or its clock stepped forward past a whole
//!   slot) or the clock stepped back across an edge: nobody is known to hold the generations of
//!   the new slot, so every subscribed node is due at once (still in bounded batches).
//! - A clock step within a slot only moves when the offsets come due.
//!
//! Pure: time is passed in, the subscriber list and the pair counts too.

use std::collections::BTreeSet;

use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use ring::hmac;

/// The share of a generation slot, from its start, over which the nodes' rotations are spread
/// (percent, default 50): every node holds its next generation by the middle of the slot,
/// leaving the second half as margin for a backlog, a slow subscriber or a reconnect.
pub const ROTATION_SPREAD_PERCENT: u64 = 50;

/// Most nodes served per rotation batch (one lock hold). Default 64: at 100 peers each, a batch
/// derives 12 800 grants (a few milliseconds).
pub const ROTATION_BATCH: usize = 64;

/// Most pairs (one `Push::Seeds` each, two seed derivations) per rotation batch; a batch ends
/// before the node that would pass it, but always holds at least one node (whose pairs are
/// bounded by the table limits). Default 8 192: nodes with 2 000 peers go four to a batch.
pub const ROTATION_BATCH_PAIRS: usize = 8_192;

/// HMAC label of the key of the rotation offsets, derived from the pair-seed master secret.
pub const ROTATION_OFFSET_LABEL: &[u8] = b"hopmesh/rotation-offset/v1";

/// How a round began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RoundStart {
    /// The slot of the new round.
    pub(super) slot: u64,
    /// Nodes in it.
    pub(super) nodes: usize,
    /// Nodes of the previous round still unserved (due at once).
    pub(super) carried: usize,
    /// False when every node is due at once: a skipped slot or a clock step back.
    pub(super) spread: bool,
}

/// The rotation schedule: the current round's unserved nodes by due time.
pub(super) struct Rotation {
    key: hmac::Key,
    generation_secs: u64,
    slot: u64,
    /// (due second, node), served in this order.
    pending: BTreeSet<(u64, NodeId)>,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("generation_secs", &self.generation_secs)
            .field("slot", &self.slot)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Rotation {
    /// A schedule whose offsets are keyed by `key`; the slot clock starts at `now` with an empty
    /// round (whoever subscribes from now on gets both generations in its snapshot).
    pub(super) fn new(key: &[u8; 32], generation_secs: u64, now: UnixTime) -> Self {
        let generation_secs = generation_secs.max(1);
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            generation_secs,
            slot: now.as_secs() / generation_secs,
            pending: BTreeSet::new(),
        }
    }

    /// The offset key for the mesh with pair-seed master secret `master` (domain-separated).
    pub(super) fn offset_key(master: &[u8; 32]) -> [u8; 32] {
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, master),
            ROTATION_OFFSET_LABEL,
        );
        let mut out = [0; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The length of the spread window in seconds (at least 1).
    pub(super) fn window(&self) -> u64 {
        (self.generation_secs * ROTATION_SPREAD_PERCENT / 100).max(1)
    }

    /// `node`'s offset from the slot start, in `[0, window)`.
    pub(super) fn offset(&self, node: &NodeId) -> u64 {
        let tag = hmac::sign(&self.key, node.as_bytes());
        let mut b = [0; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(b) % self.window()
    }

    /// The slot of the current round.
    pub(super) fn slot(&self) -> u64 {
        self.slot
    }

    /// Unserved nodes of the current round.
    pub(super) fn backlog(&self) -> usize {
        self.pending.len()
    }

    /// True when a node is due at `now`.
    pub(super) fn due(&self, now: UnixTime) -> bool {
        self.pending
            .first()
            .is_some_and(|(at, _)| *at <= now.as_secs())
    }

    /// Moves the slot clock to `now`. On a slot change, starts a new round over `subscribed`
    /// (the nodes subscribed now) and says how; `None` within the same slot.
    pub(super) fn advance(
        &mut self,
        now: UnixTime,
        subscribed: impl IntoIterator<Item = NodeId>,
    ) -> Option<RoundStart> {
        let slot = now.as_secs() / self.generation_secs;
        if slot == self.slot {
            return None;
        }
        let spread = Some(slot) == self.slot.checked_add(1);
        let start = slot.saturating_mul(self.generation_secs);
        let carried: BTreeSet<NodeId> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        self.slot = slot;
        for node in subscribed {
            let due = if spread && !carried.contains(&node) {
                start.saturating_add(self.offset(&node))
            } else {
                start
            };
            self.pending.insert((due, node));
        }
        Some(RoundStart {
            slot,
            nodes: self.pending.len(),
            carried: carried.len(),
            spread,
        })
    }

    /// Takes the next batch due at `now`, in due order: at most [`ROTATION_BATCH`] nodes and
    /// [`ROTATION_BATCH_PAIRS`] pairs by `pairs` (a node's pair count), at least one node when
    /// one is due. The caller serves each (skipping nodes no longer subscribed).
    pub(super) fn next_batch(
        &mut self,
        now: UnixTime,
        mut pairs: impl FnMut(&NodeId) -> usize,
    ) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut total = 0usize;
        while out.len() < ROTATION_BATCH {
            let Some(&(at, node)) = self.pending.first() else {
                break;
            };
            if at > now.as_secs() {
                break;
            }
            let cost = pairs(&node);
            if !out.is_empty() && total.saturating_add(cost) > ROTATION_BATCH_PAIRS {
                break;
            }
            total = total.saturating_add(cost);
            self.pending.pop_first();
            out.push(node);
        }
        out
    }
}

/// What one rotation step ([`Authority::tick`](super::Authority::tick)) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rotated {
    /// A new round began: the slot edge was noticed and the round's schedule built.
    pub round_started: bool,
    /// Nodes served in this step (at most [`ROTATION_BATCH`]).
    pub served: usize,
    /// `Push::Seeds` queued in this step (about [`ROTATION_BATCH_PAIRS`] at most).
    pub pairs: usize,
    /// Nodes of the round still unserved.
    pub backlog: usize,
    /// More nodes are due now: call again, after releasing the lock.
    pub more_due: bool,
}

impl Rotated {
    /// True when the step did rotation work (a round began or a batch was served).
    pub fn worked(&self) -> bool {
        self.round_started || self.served > 0
    }
}

impl super::Authority {
    /// One rotation step at `now`: at a slot edge a new round over the subscribed nodes, then at
    /// most one batch of the nodes due, each pushed the seeds (current and next generation) of
    /// every pair it has, through the [`AllowedPair`](super::tables::AllowedPair) permits of
    /// its compiled table.
    pub(super) fn rotate(&mut self, now: UnixTime) -> Rotated {
        let mut out = Rotated::default();
        if self.seeds.slot(now) != self.seeds.rotation().slot() {
            let subscribed = self.subscribers.nodes();
            if let Some(round) = self.seeds.rotation_mut().advance(now, subscribed) {
                out.round_started = true;
                self.metrics
                    .rotation_carried_over
                    .inc_by(round.carried as u64);
                if round.carried > 0 || !round.spread {
                    tracing::warn!(
                        slot = round.slot,
                        nodes = round.nodes,
                        carried = round.carried,
                        spread = round.spread,
                        "seed rotation: nodes due at once (a round unfinished, a slot skipped \
                         or the clock stepped back)"
                    );
                }
            }
        }
        let tables = &self.tables;
        let batch = self
            .seeds
            .rotation_mut()
            .next_batch(now, |id| tables.allowed_pairs_of(id).len());
        for id in &batch {
            if !self.subscribers.is_connected(id) {
                continue;
            }
            let msgs: Vec<hopmesh_protocol::enrollment::Push> = self
                .tables
                .allowed_pairs_of(id)
                .iter()
                .map(|p| self.seeds.seeds_push(p, now))
                .collect();
            out.served += 1;
            out.pairs += msgs.len();
            if !msgs.is_empty() {
                self.push(id, &msgs);
            }
        }
        if !batch.is_empty() {
            self.metrics.rotation_batches.inc();
        }
        let rotation = self.seeds.rotation();
        out.backlog = rotation.backlog();
        out.more_due = rotation.due(now);
        self.metrics.rotation_backlog.set(out.backlog as i64);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use hopmesh_protocol::ids::NodeId;
    use hopmesh_protocol::time::UnixTime;

    use super::{ROTATION_BATCH, ROTATION_BATCH_PAIRS, ROTATION_SPREAD_PERCENT, Rotation};

    const GEN: u64 = 300;
    /// Slot 6 000 000 starts here.
    const EDGE: u64 = 1_800_000_000;

    fn t(s: u64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    fn node(i: u32) -> NodeId {
        let mut b = [0; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        NodeId::from_bytes(b)
    }

    fn nodes(n: u32) -> Vec<NodeId> {
        (0..n).map(node).collect()
    }

    fn rotation(at: u64) -> Rotation {
        Rotation::new(&Rotation::offset_key(&[2; 32]), GEN, t(at))
    }

    /// Serves every batch due from `from` to `to` (one call per second), at `pairs` per node;
    /// returns when each node was served.
    fn run(
        r: &mut Rotation,
        subscribed: &[NodeId],
        from: u64,
        to: u64,
        pairs: usize,
    ) -> Vec<(u64, NodeId)> {
        let mut served = Vec::new();
        for now in from..=to {
            r.advance(t(now), subscribed.iter().copied());
            loop {
                let batch = r.next_batch(t(now), |_| pairs);
                if batch.is_empty() {
                    break;
                }
                assert!(batch.len() <= ROTATION_BATCH);
                assert!(batch.len() == 1 || batch.len() * pairs <= ROTATION_BATCH_PAIRS);
                served.extend(batch.into_iter().map(|n| (now, n)));
            }
        }
        served
    }

    #[test]
    fn every_node_is_served_exactly_once_per_slot_within_the_spread_window() {
        let mut r = rotation(EDGE - 10);
        let all = nodes(1_000);
        let window = GEN * ROTATION_SPREAD_PERCENT / 100;
        assert_eq!(r.window(), window);
        // Nothing before the edge: the round of the starting slot is empty.
        assert!(run(&mut r, &all, EDGE - 10, EDGE - 1, 10).is_empty());
        for round in 0..3 {
            let start = EDGE + round * GEN;
            let served = run(&mut r, &all, start, start + GEN - 1, 10);
            let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
            for (at, n) in &served {
                *count.entry(*n).or_default() += 1;
                assert!(*at < start + window, "served at {at}, past the window");
                assert_eq!(*at, start + r.offset(n), "served at its own offset");
            }
            assert_eq!(count.len(), all.len(), "round {round}");
            assert!(count.values().all(|c| *c == 1), "round {round}");
            assert_eq!(r.backlog(), 0);
        }
    }

    #[test]
    fn offsets_spread_over_the_window_and_depend_on_the_key() {
        let r = rotation(EDGE);
        let other = Rotation::new(&Rotation::offset_key(&[3; 32]), GEN, t(EDGE));
        let all = nodes(10_000);
        let seconds: BTreeSet<u64> = all.iter().map(|n| r.offset(n)).collect();
        // 10 000 nodes over 150 one-second buckets: every bucket used, none crowded.
        assert_eq!(seconds.len() as u64, r.window());
        let mut per: BTreeMap<u64, usize> = BTreeMap::new();
        for n in &all {
            *per.entry(r.offset(n)).or_default() += 1;
        }
        let busiest = per.values().max().copied().unwrap_or_default();
        assert!(busiest < 3 * 10_000 / 150, "busiest second has {busiest}");
        let same = all
            .iter()
            .filter(|n| r.offset(n) == other.offset(n))
            .count();
        assert!(same < 500, "another key gives other offsets ({same} equal)");
        // A one-second window (generation 2 s) puts everyone at the edge: still batched.
        let short = Rotation::new(&[0; 32], 2, t(EDGE));
        assert_eq!(short.window(), 1);
        assert!(all.iter().all(|n| short.offset(n) == 0));
    }

    #[test]
    fn batches_are_bounded_by_nodes_and_by_pairs_and_never_empty_when_due() {
        let mut r = rotation(EDGE - 1);
        let all = nodes(1_000);
        // Skip a slot: everyone due at once.
        let start = r
            .advance(t(EDGE + GEN), all.iter().copied())
            .expect("round");
        assert!(!start.spread);
        let now = t(EDGE + GEN);
        assert!(r.due(now));
        assert_eq!(r.next_batch(now, |_| 1).len(), ROTATION_BATCH);
        // 2 000 pairs a node: four fit the pair budget.
        assert_eq!(r.next_batch(now, |_| 2_000).len(), 4);
        // A node past the pair budget alone still goes, alone.
        assert_eq!(r.next_batch(now, |_| ROTATION_BATCH_PAIRS + 1).len(), 1);
        assert_eq!(r.backlog(), 1_000 - ROTATION_BATCH - 4 - 1);
        // Exactly at the budget fits; one past does not.
        let exact = r.next_batch(now, |_| ROTATION_BATCH_PAIRS / 8);
        assert_eq!(exact.len(), 8);
    }

    #[test]
    fn a_node_that_subscribes_after_the_edge_is_not_in_the_round() {
        let mut r = rotation(EDGE - 1);
        let early = nodes(100);
        let start = r.advance(t(EDGE), early.iter().copied()).expect("round");
        assert_eq!((start.nodes, start.carried, start.spread), (100, 0, true));
        // Later subscribers are not added within the slot (their snapshot has both generations).
        let mut later = early.clone();
        later.push(node(5_000));
        let served = run(&mut r, &later, EDGE, EDGE + GEN - 1, 1);
        assert_eq!(served.len(), 100);
        assert!(served.iter().all(|(_, n)| *n != node(5_000)));
        // It is in the next round.
        let served = run(&mut r, &later, EDGE + GEN, EDGE + 2 * GEN - 1, 1);
        assert_eq!(served.len(), 101);
    }

    #[test]
    fn an_unfinished_round_is_carried_first_into_the_next_slot() {
        let mut r = rotation(EDGE - 1);
        let all = nodes(1_000);
        r.advance(t(EDGE), all.iter().copied()).expect("round");
        // Nobody served during the slot (e.g. the ticker stalled): at the next edge all 1 000
        // lack the current generation and are due at once, not at their offsets.
        let next = EDGE + GEN;
        let start = r.advance(t(next), all.iter().copied()).expect("round");
        assert_eq!(
            (start.nodes, start.carried, start.spread),
            (1_000, 1_000, true)
        );
        assert!(r.due(t(next)));
        let served = run(&mut r, &all, next, next, 1);
        assert_eq!(served.len(), 1_000);
        // Half served, then the edge: the other half are carried, the served half spread.
        r.advance(t(next + GEN), all.iter().copied())
            .expect("round");
        let first = r.next_batch(t(next + 2 * GEN - 1), |_| 1);
        assert_eq!(first.len(), ROTATION_BATCH);
        let mut served: BTreeSet<NodeId> = first.into_iter().collect();
        while served.len() < 500 {
            served.extend(r.next_batch(t(next + 2 * GEN - 1), |_| 1));
        }
        let e3 = next + 2 * GEN;
        let start = r.advance(t(e3), all.iter().copied()).expect("round");
        assert_eq!(start.carried, 1_000 - served.len());
        let at_edge: BTreeSet<NodeId> = run(&mut r, &all, e3, e3, 1)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        for n in &all {
            if !served.contains(n) {
                assert!(at_edge.contains(n), "a carried node is due at the edge");
            } else if r.offset(n) > 0 {
                assert!(!at_edge.contains(n), "a served node waits for its offset");
            }
        }
    }

    #[test]
    fn a_skipped_slot_or_a_clock_step_back_makes_everyone_due_at_once() {
        let all = nodes(200);
        // The verifier paused for two slots.
        let mut r = rotation(EDGE - 1);
        let start = r.advance(t(EDGE + 2 * GEN + 7), all.iter().copied());
        assert_eq!(
            start.map(|s| (s.slot, s.spread)),
            Some(((EDGE + 2 * GEN) / GEN, false))
        );
        assert_eq!(
            run(&mut r, &all, EDGE + 2 * GEN + 7, EDGE + 2 * GEN + 7, 1).len(),
            200
        );
        // The clock steps back across an edge: a round of the earlier slot, all due at once.
        let mut r = rotation(EDGE + 5);
        let back = r.advance(t(EDGE - 3), all.iter().copied()).expect("round");
        assert!(!back.spread);
        assert_eq!(run(&mut r, &all, EDGE - 3, EDGE - 3, 1).len(), 200);
        // And forward again into the slot it came from: a fresh round, spread.
        let fwd = r.advance(t(EDGE + 6), all.iter().copied()).expect("round");
        assert!(fwd.spread);
        assert_eq!(fwd.carried, 0);
        // Time standing still or stepping back within the slot starts nothing and serves
        // nobody twice.
        let served = run(&mut r, &all, EDGE + 6, EDGE + GEN - 1, 1);
        assert_eq!(served.len(), 200);
        let again = run(&mut r, &all, EDGE + 6, EDGE + GEN - 1, 1);
        assert!(again.is_empty(), "served twice: {again:?}");
    }

    #[test]
    fn a_clock_step_forward_within_the_slot_makes_the_remaining_offsets_due() {
        let all = nodes(300);
        let mut r = rotation(EDGE - 1);
        r.advance(t(EDGE), all.iter().copied()).expect("round");
        let early = run(&mut r, &all, EDGE, EDGE + 10, 1).len();
        assert!(early < 300);
        // A jump to the last second of the slot: no new round, the rest due now.
        assert!(r.advance(t(EDGE + GEN - 1), all.iter().copied()).is_none());
        let rest = run(&mut r, &all, EDGE + GEN - 1, EDGE + GEN - 1, 1).len();
        assert_eq!(early + rest, 300);
    }
}
