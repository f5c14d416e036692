//! Pair seeds: generation slots, per-pair reissue counts, grants and compromised generations.

use std::collections::BTreeMap;

use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::hop_token::{Generation, GenerationGrant, PairIds};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::secret::{MasterSecret, PairSeed};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;

use super::BEHIND_CLOCK_GRACE_SECS;
use super::refusals::AdminError;
use super::rotation::Rotation;
use super::tables::AllowedPair;
use crate::store::{PairState, Store, StoreError};

/// Compromised generations of a pair repeated in a snapshot or reissue push.
const RECENT_COMPROMISED: usize = 16;

/// The master secret, the generation clock and every pair's reissue state.
pub(super) struct Seeds {
    master: MasterSecret,
    generation_secs: u64,
    pairs: BTreeMap<PairIds, PairState>,
    /// When each subscriber gets its next generation (`rotation.rs`).
    rotation: Rotation,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeds")
            .field("generation_secs", &self.generation_secs)
            .field("pairs", &self.pairs.len())
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// A decided reissue, not yet committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ReissuePlan {
    /// The pair.
    pub(super) pair: PairIds,
    /// Its reissue count after the commit.
    pub(super) next: u16,
    /// The generations that become compromised.
    pub(super) compromised: Vec<Generation>,
}

impl Seeds {
    /// Loads the pair states; the slot clock starts at `now`.
    pub(super) fn load(
        master: MasterSecret,
        generation_secs: u64,
        store: &dyn Store,
        now: UnixTime,
    ) -> Result<Self, StoreError> {
        let pairs = store
            .pair_states()?
            .into_iter()
            .map(|p| (p.pair, p))
            .collect();
        let rotation = Rotation::new(&Rotation::offset_key(master.expose()), generation_secs, now);
        Ok(Self {
            master,
            generation_secs,
            pairs,
            rotation,
        })
    }

    /// The generation slot `now` falls in.
    pub(super) fn slot(&self, now: UnixTime) -> u64 {
        now.as_secs() / self.generation_secs.max(1)
    }

    /// The rotation schedule.
    pub(super) fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// The rotation schedule, to advance it and take batches.
    pub(super) fn rotation_mut(&mut self) -> &mut Rotation {
        &mut self.rotation
    }

    pub(super) fn reissues_of(&self, pair: &PairIds) -> u16 {
        self.pairs.get(pair).map_or(0, |p| p.reissues)
    }

    /// The previous, current and next generation of a pair at `now` under its current reissue
    /// count: what a revoke or reissue marks compromised.
    pub(super) fn recent_generations(&self, pair: &PairIds, now: UnixTime) -> Vec<Generation> {
        let r = self.reissues_of(pair);
        let slot = self.slot(now);
        (slot.saturating_sub(1)..=slot + 1)
            .map(|s| Generation::compose(s, r))
            .collect()
    }

    /// The grants for a pair at `now` (current and next generation): what rotation hands out.
    pub(super) fn grants(&self, pair: &PairIds, now: UnixTime) -> Vec<GenerationGrant> {
        let slot = self.slot(now);
        self.grants_from(pair, slot, slot)
    }

    /// The grants for a pair that formed or changed at `now`: [`Self::grants`], and during the
    /// first [`BEHIND_CLOCK_GRACE_SECS`](super::BEHIND_CLOCK_GRACE_SECS) of a generation (at
    /// most half of it) the previous one too, so that a node whose clock runs behind the
    /// verifier's can mint for its own generation on a pair that formed just after an edge.
    /// (A pair that existed before the edge already holds it, so rotation sends two.)
    pub(super) fn pair_grants(&self, pair: &PairIds, now: UnixTime) -> Vec<GenerationGrant> {
        let g = self.generation_secs.max(1);
        let slot = self.slot(now);
        let into_slot = now.as_secs().saturating_sub(slot * g);
        let first = if slot > 0 && into_slot < BEHIND_CLOCK_GRACE_SECS.min(g / 2) {
            slot - 1
        } else {
            slot
        };
        self.grants_from(pair, first, slot)
    }

    /// Grants for the generations `first..=slot + 1` under the pair's reissue count.
    fn grants_from(&self, pair: &PairIds, first: u64, slot: u64) -> Vec<GenerationGrant> {
        let g = self.generation_secs.max(1);
        let r = self.reissues_of(pair);
        (first..=slot + 1)
            .map(|s| {
                let generation = Generation::compose(s, r);
                GenerationGrant {
                    generation,
                    seed: PairSeed::derive(&self.master, pair, generation),
                    valid_from: UnixTime::from_secs(s * g),
                    valid_until: UnixTime::from_secs((s + 1) * g),
                }
            })
            .collect()
    }

    /// A node's seeds for its pair with a peer. Only for a pair policy allows: the permit
    /// comes from the compiled tables.
    pub(super) fn seeds_push(&self, pair: &AllowedPair, now: UnixTime) -> Push {
        Self::push_of(
            pair,
            self.grants(&PairIds::new(*pair.me(), *pair.peer()), now),
        )
    }

    fn push_of(pair: &AllowedPair, grants: Vec<GenerationGrant>) -> Push {
        Push::Seeds {
            peer: *pair.peer(),
            // Invariant: grants() returns two or three (the wire holds four).
            grants: BoundedVec::new(grants).unwrap_or_default(),
        }
    }

    /// The pair's most recent compromised generations, if it has any.
    fn compromised_push(&self, node: &NodeId, peer: &NodeId) -> Option<Push> {
        let state = self.pairs.get(&PairIds::new(*node, *peer))?;
        let skip = state.compromised.len().saturating_sub(RECENT_COMPROMISED);
        let recent: Vec<Generation> = state.compromised[skip..].to_vec();
        (!recent.is_empty()).then(|| Push::Compromised {
            peer: *peer,
            generations: BoundedVec::new(recent).unwrap_or_default(),
        })
    }

    /// What `node` gets when its pair with `peer` changed: recent compromised generations (if
    /// any), then fresh seeds.
    pub(super) fn pair_pushes(&self, pair: &AllowedPair, now: UnixTime) -> Vec<Push> {
        let mut out: Vec<Push> = self
            .compromised_push(pair.me(), pair.peer())
            .into_iter()
            .collect();
        let grants = self.pair_grants(&PairIds::new(*pair.me(), *pair.peer()), now);
        out.push(Self::push_of(pair, grants));
        out
    }

    /// Decides a reissue of `pair` at `now`.
    pub(super) fn plan_reissue(
        &self,
        pair: PairIds,
        now: UnixTime,
    ) -> Result<ReissuePlan, AdminError> {
        let next = self
            .reissues_of(&pair)
            .checked_add(1)
            .ok_or(AdminError::ReissueLimit)?;
        Ok(ReissuePlan {
            pair,
            next,
            compromised: self.recent_generations(&pair, now),
        })
    }

    /// Replaces a pair's reissue state with one another replica committed.
    pub(super) fn set_state(&mut self, state: PairState) {
        self.pairs.insert(state.pair, state);
    }

    /// Applies a committed reissue.
    pub(super) fn apply_reissue(&mut self, plan: &ReissuePlan) {
        let state = self.pairs.entry(plan.pair).or_insert(PairState {
            pair: plan.pair,
            reissues: 0,
            compromised: Vec::new(),
        });
        state.reissues = plan.next;
        state.compromised.extend(plan.compromised.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use hopmesh_protocol::hop_token::{Generation, PairIds};
    use hopmesh_protocol::ids::NodeId;
    use hopmesh_protocol::secret::MasterSecret;
    use hopmesh_protocol::time::UnixTime;

    use super::Seeds;
    use crate::store::SqliteStore;

    fn seeds(now: u64) -> (tempfile::TempDir, Seeds) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::create(&dir.path().join("store.db")).expect("store");
        let seeds = Seeds::load(
            MasterSecret::from_bytes([2; 32]),
            300,
            &store,
            UnixTime::from_secs(now),
        )
        .expect("seeds load");
        (dir, seeds)
    }

    #[test]
    fn a_reissue_plan_compromises_the_last_current_and_next_generation() {
        let (_dir, mut s) = seeds(1_000);
        let pair = PairIds::new(NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let now = UnixTime::from_secs(1_000);
        let plan = s.plan_reissue(pair, now).expect("plan");
        assert_eq!(plan.next, 1);
        assert_eq!(
            plan.compromised,
            [2, 3, 4].map(|slot| Generation::compose(slot, 0))
        );
        // Deciding changed nothing; applying does.
        assert_eq!(s.reissues_of(&pair), 0);
        s.apply_reissue(&plan);
        assert_eq!(s.reissues_of(&pair), 1);
        let grants = s.grants(&pair, now);
        assert_eq!(
            grants.iter().map(|g| g.generation).collect::<Vec<_>>(),
            [Generation::compose(3, 1), Generation::compose(4, 1)]
        );
        assert_eq!(grants[0].valid_from, UnixTime::from_secs(900));
        assert_eq!(grants[1].valid_until, UnixTime::from_secs(1_500));
    }
}
