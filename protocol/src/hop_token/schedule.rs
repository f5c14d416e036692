//! The key schedule: epochs and their length, seed generations, the node pair, and the
//! derivations `S(a,b,g)`, `K(a,b,g,e)`, the exporter context and the stream key.

use hkdf::{Hkdf, HkdfExtract};
use sha2::Sha256;

use crate::ids::NodeId;
use crate::secret::{ConnectionBinding, EpochKey, MasterSecret, PairSeed, StreamKey};
use crate::time::UnixTime;

/// Label for `export_keying_material` (RFC 5705 / RFC 8446 §7.5 reserve the
/// `EXPERIMENTAL` prefix for labels not registered with IANA).
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-hopmesh-hop-v1";
/// HKDF info label of the epoch key.
pub const EPOCH_KEY_LABEL: &[u8] = b"hopmesh/epoch/v1";

/// The epoch length `E`: 1 to 60 seconds, default 10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochLength(u64);

/// An epoch length outside 1–60 s was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("epoch length must be 1 to 60 seconds, got {0}")]
pub struct BadEpochLength(pub u64);

impl EpochLength {
    /// The default, 10 s: short enough that a stolen token dies within half a minute, long
    /// enough that the per-epoch key derivation is noise.
    pub const DEFAULT: EpochLength = EpochLength(10);

    /// Checks that `secs` is within 1–60.
    pub fn from_secs(secs: u64) -> Result<Self, BadEpochLength> {
        if (1..=60).contains(&secs) {
            Ok(Self(secs))
        } else {
            Err(BadEpochLength(secs))
        }
    }

    /// The length in seconds.
    pub fn as_secs(self) -> u64 {
        self.0
    }

    /// `floor(now / E)`.
    pub fn epoch_at(self, now: UnixTime) -> Epoch {
        Epoch(now.as_secs() / self.0)
    }
}

impl Default for EpochLength {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// An epoch number `e = floor(unix_time / E)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// A pair-seed generation number; increases with every rotation or reissue.
///
/// The verifier composes it as `time slot << 16 | reissue epoch of the pair`, so scheduled
/// rotation and selective reissue never produce the same number twice for a pair.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation for time slot `slot` (`floor(now / generation length)`) after `reissues`
    /// selective reissues of the pair.
    pub fn compose(slot: u64, reissues: u16) -> Self {
        Self(slot << 16 | u64::from(reissues))
    }

    /// The time slot.
    pub fn slot(self) -> u64 {
        self.0 >> 16
    }

    /// The pair's reissue count when this generation was made.
    pub fn reissues(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }
}

/// HKDF info label of pair seeds.
pub const PAIR_SEED_LABEL: &[u8] = b"hopmesh/pair-seed/v1";

impl PairSeed {
    /// `S(a,b,g) = HKDF(master, "hopmesh/pair-seed/v1" ‖ lo ‖ hi ‖ g)`: the verifier derives
    /// seeds instead of storing them, so its cost stays flat as the mesh grows; only
    /// reissue counts and compromised generations are stored.
    pub fn derive(master: &MasterSecret, pair: &PairIds, generation: Generation) -> Self {
        let mut info = Vec::with_capacity(PAIR_SEED_LABEL.len() + 72);
        info.extend_from_slice(PAIR_SEED_LABEL);
        info.extend_from_slice(pair.lo.as_bytes());
        info.extend_from_slice(pair.hi.as_bytes());
        info.extend_from_slice(&generation.0.to_be_bytes());
        let mut out = [0u8; 32];
        // Invariant: 32 bytes is far below HKDF-SHA256's output limit.
        #[allow(clippy::expect_used)]
        Hkdf::<Sha256>::new(None, master.expose())
            .expand(&info, &mut out)
            .expect("32-byte HKDF output is always valid");
        Self::from_bytes(out)
    }
}

/// An unordered node pair, stored in canonical order so both ends derive the same keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairIds {
    lo: NodeId,
    hi: NodeId,
}

impl PairIds {
    /// The pair `{a, b}`.
    pub fn new(a: NodeId, b: NodeId) -> Self {
        if a <= b {
            Self { lo: a, hi: b }
        } else {
            Self { lo: b, hi: a }
        }
    }

    /// The smaller id.
    pub fn lo(&self) -> NodeId {
        self.lo
    }

    /// The larger id.
    pub fn hi(&self) -> NodeId {
        self.hi
    }

    /// True when `id` is one of the pair.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.lo == *id || self.hi == *id
    }
}

impl EpochKey {
    /// `K(a,b,g,e)`: call once per pair, generation and epoch (the result may be cached for
    /// the epoch).
    pub fn derive(seed: &PairSeed, pair: &PairIds, epoch: Epoch) -> Self {
        let mut info = [0u8; EPOCH_KEY_LABEL.len() + 8 + 64];
        let (label, rest) = info.split_at_mut(EPOCH_KEY_LABEL.len());
        label.copy_from_slice(EPOCH_KEY_LABEL);
        rest[..8].copy_from_slice(&epoch.0.to_be_bytes());
        rest[8..40].copy_from_slice(pair.lo.as_bytes());
        rest[40..].copy_from_slice(pair.hi.as_bytes());
        let mut out = [0u8; 32];
        // Invariant: 32 bytes is far below HKDF-SHA256's 255 * 32 byte limit.
        #[allow(clippy::expect_used)]
        Hkdf::<Sha256>::new(None, seed.expose())
            .expand(&info, &mut out)
            .expect("32-byte HKDF output is always valid");
        Self::from_bytes(out)
    }
}

/// The exporter context for a connection between `pair` speaking `alpn`.
///
/// Call on both ends with the negotiated ALPN, then pass the 32 exported bytes to
/// [`ConnectionBinding::from_bytes`].
pub fn exporter_context(alpn: &[u8], pair: &PairIds) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(alpn.len() + 64);
    ctx.extend_from_slice(alpn);
    ctx.extend_from_slice(pair.lo.as_bytes());
    ctx.extend_from_slice(pair.hi.as_bytes());
    ctx
}

impl StreamKey {
    /// `HKDF-Extract(salt = X, ikm = K)`: the MAC key for one connection and epoch.
    pub fn derive(binding: &ConnectionBinding, epoch_key: &EpochKey) -> Self {
        let mut extract = HkdfExtract::<Sha256>::new(Some(binding.expose()));
        extract.input_ikm(epoch_key.expose());
        let (prk, _) = extract.finalize();
        let mut out = [0u8; 32];
        out.copy_from_slice(&prk);
        Self::from_bytes(out)
    }
}
