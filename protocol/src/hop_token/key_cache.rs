//! The per-connection cache of stream keys, one derivation per (generation, epoch).

use super::schedule::{Epoch, Generation, PairIds};
use crate::secret::{ConnectionBinding, EpochKey, PairSeed, StreamKey};

/// Stream keys of one connection, remembered per (generation, epoch).
///
/// A stream key is a pure function of the connection (binding, pair), the seed and the epoch.
/// So one derivation (HKDF expand + extract, ≈ 1 µs) per epoch serves every stream of the
/// epoch, instead of one per stream. A slot matches on generation, epoch *and* seed (compared
/// in constant time), so even a seed replaced under a known generation number (which the
/// keyring refuses anyway, [`GrantRefusal`](super::GrantRefusal)) could never be served a stale key. The cache holds
/// keys only: whether a generation is valid, unknown or compromised is looked up in the keyring
/// on every stream, so a revocation or a compromise mark takes effect at once.
///
/// Four slots cover the epochs a receiver accepts (e − 1, e, e + 1) plus a generation change;
/// the oldest slot is replaced first. Seeds and keys are zeroized when replaced or dropped.
#[derive(Debug, Default)]
pub struct StreamKeyCache {
    slots: [Option<(Generation, Epoch, PairSeed, StreamKey)>; 4],
    next: usize,
    derivations: u64,
}

impl StreamKeyCache {
    /// The cached key for `(generation, epoch)` under `seed`, or `derive()` stored and
    /// returned.
    pub fn get_or_derive(
        &mut self,
        generation: Generation,
        epoch: Epoch,
        seed: &PairSeed,
        derive: impl FnOnce() -> StreamKey,
    ) -> StreamKey {
        if let Some((_, _, _, key)) = self
            .slots
            .iter()
            .flatten()
            .find(|(g, e, s, _)| *g == generation && *e == epoch && s == seed)
        {
            return key.clone();
        }
        let key = derive();
        self.derivations += 1;
        self.slots[self.next] = Some((generation, epoch, seed.clone(), key.clone()));
        self.next = (self.next + 1) % self.slots.len();
        key
    }

    /// The stream key of this connection (`binding`, `pair`) for `seed`'s `generation` in
    /// `epoch`, derived only on a miss: the one derivation both minting and verifying use.
    pub fn stream_key(
        &mut self,
        binding: &ConnectionBinding,
        pair: &PairIds,
        seed: &PairSeed,
        generation: Generation,
        epoch: Epoch,
    ) -> StreamKey {
        self.get_or_derive(generation, epoch, seed, || {
            StreamKey::derive(binding, &EpochKey::derive(seed, pair, epoch))
        })
    }

    /// How many keys were derived (not served from the cache) so far.
    pub fn derivations(&self) -> u64 {
        self.derivations
    }
}
