//! The seeds a node holds for one peer: generation grants, the pair keyring with its pruning
//! and compromise marks, and why a grant is refused.

use std::collections::BTreeMap;

use super::schedule::{Generation, PairIds};
use crate::secret::PairSeed;
use crate::time::UnixTime;

/// One generation of a pair seed with its validity, as pushed by the verifier.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationGrant {
    /// Generation number.
    pub generation: Generation,
    /// The seed.
    pub seed: PairSeed,
    /// First second at which tokens may be minted with it.
    pub valid_from: UnixTime,
    /// Tokens minted from this second on are refused (with one epoch of grace on receive).
    pub valid_until: UnixTime,
}

#[derive(Clone, Debug)]
struct KeyringEntry {
    grant: GenerationGrant,
    compromised: bool,
}

/// Most live (not compromised) generations kept per pair: previous, current, next and
/// room for a reissue.
pub const MAX_LIVE_GENERATIONS: usize = 4;
/// Most compromised generations remembered per pair for detection; the oldest are forgotten
/// first (they are long past their validity and cannot verify anyway).
pub const MAX_COMPROMISED_GENERATIONS: usize = 16;

/// The seeds a node holds for one peer: pure data, owned by the IO layer.
#[derive(Clone, Debug)]
pub struct PairKeyring {
    pair: PairIds,
    entries: BTreeMap<Generation, KeyringEntry>,
}

/// Why a grant was not added to a keyring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    /// The generation is known as compromised; it can never become valid again.
    #[error("generation {0} is compromised")]
    Compromised(u64),
    /// The same generation number arrived with a different seed or validity.
    #[error("generation {0} already holds a different seed")]
    Conflicting(u64),
    /// `valid_until` is not after `valid_from`.
    #[error("generation {0} has an empty validity window")]
    EmptyWindow(u64),
}

impl PairKeyring {
    /// An empty keyring for `pair`.
    pub fn new(pair: PairIds) -> Self {
        Self {
            pair,
            entries: BTreeMap::new(),
        }
    }

    /// The pair this keyring is for.
    pub fn pair(&self) -> PairIds {
        self.pair
    }

    /// Adds a generation. Re-adding an identical grant is a no-op. When more than
    /// [`MAX_LIVE_GENERATIONS`] are live, the oldest live ones are dropped.
    pub fn insert(&mut self, grant: GenerationGrant) -> Result<(), GrantRefusal> {
        let g = grant.generation;
        if grant.valid_until <= grant.valid_from {
            return Err(GrantRefusal::EmptyWindow(g.0));
        }
        if let Some(existing) = self.entries.get(&g) {
            if existing.compromised {
                return Err(GrantRefusal::Compromised(g.0));
            }
            if existing.grant != grant {
                return Err(GrantRefusal::Conflicting(g.0));
            }
            return Ok(());
        }
        self.entries.insert(
            g,
            KeyringEntry {
                grant,
                compromised: false,
            },
        );
        self.prune();
        Ok(())
    }

    /// Marks `generation` compromised (revocation or leak). Any later use with a valid MAC is
    /// reported as `compromised_key_use`. Returns false if the generation was not held.
    pub fn mark_compromised(&mut self, generation: Generation) -> bool {
        let Some(entry) = self.entries.get_mut(&generation) else {
            return false;
        };
        entry.compromised = true;
        self.prune();
        true
    }

    /// Marks every held generation compromised (the peer was revoked).
    pub fn mark_all_compromised(&mut self) {
        for entry in self.entries.values_mut() {
            entry.compromised = true;
        }
        self.prune();
    }

    /// The generation to mint with at `now`: the newest good one whose window contains now.
    pub fn minting(&self, now: UnixTime) -> Option<&GenerationGrant> {
        self.entries
            .values()
            .rev()
            .find(|e| !e.compromised && e.grant.valid_from <= now && now < e.grant.valid_until)
            .map(|e| &e.grant)
    }

    /// The seed for `generation` as seen by a receiver at `now`: usable within its window
    /// widened by `grace` seconds on both ends (clock skew and epoch boundaries).
    pub fn lookup(&self, generation: Generation, now: UnixTime, grace: u64) -> SeedLookup<'_> {
        let Some(entry) = self.entries.get(&generation) else {
            return SeedLookup::Unknown;
        };
        if entry.compromised {
            return SeedLookup::Compromised(&entry.grant.seed);
        }
        let g = &entry.grant;
        if now.plus(grace) < g.valid_from || now >= g.valid_until.plus(grace) {
            return SeedLookup::Unknown;
        }
        SeedLookup::Valid(&entry.grant.seed)
    }

    /// Generations held, newest last, with their compromised flag (for introspection).
    pub fn generations(&self) -> impl Iterator<Item = (Generation, bool)> + '_ {
        self.entries.iter().map(|(g, e)| (*g, e.compromised))
    }

    fn prune(&mut self) {
        let live: Vec<Generation> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.compromised)
            .map(|(g, _)| *g)
            .collect();
        for g in live
            .iter()
            .take(live.len().saturating_sub(MAX_LIVE_GENERATIONS))
        {
            self.entries.remove(g);
        }
        let bad: Vec<Generation> = self
            .entries
            .iter()
            .filter(|(_, e)| e.compromised)
            .map(|(g, _)| *g)
            .collect();
        for g in bad
            .iter()
            .take(bad.len().saturating_sub(MAX_COMPROMISED_GENERATIONS))
        {
            self.entries.remove(g);
        }
    }
}

/// A seed found by [`PairKeyring::lookup`].
#[derive(Debug)]
pub enum SeedLookup<'a> {
    /// Not held or not valid now.
    Unknown,
    /// Good.
    Valid(&'a PairSeed),
    /// Held for detection only.
    Compromised(&'a PairSeed),
}
