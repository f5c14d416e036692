//! Hop tokens: the per-stream credential that changes every epoch (DESIGN.md "Hop tokens").
//!
//! Key schedule, all pure and clock-free:
//!
//! ```text
//! S(a,b,g)    32-byte pair seed from the verifier          (PairSeed)
//! K(a,b,g,e)  HKDF-SHA256(ikm = S, info = "hopmesh/epoch/v1" ‖ e ‖ lo ‖ hi)   (EpochKey)
//! X           TLS exporter, label EXPORTER_LABEL, context ALPN ‖ lo ‖ hi     (ConnectionBinding)
//! key         HKDF-Extract(salt = X, ikm = K)                                 (StreamKey)
//! tag         HMAC-SHA256(key, token[..TAG_OFFSET])
//! ```
//!
//! Token layout (big-endian, fixed, [`TOKEN_LEN`] bytes):
//!
//! ```text
//! off len field
//!   0   1 version (1)
//!   1   1 alg (1 = HMAC-SHA256)
//!   2   8 generation
//!  10   8 epoch
//!  18  32 src node id
//!  50  32 dst node id
//!  82   8 dst service id
//!  90   8 QUIC stream id (raw u64)
//!  98   4 header length
//! 102  32 SHA-256(request header)
//! 134  32 tag
//! ```
//!
//! **Deviation from DESIGN.md, on purpose:** the design MACs `fields ‖ SHA-256(header)`
//! without carrying the hash. We carry the hash inside the token, under the MAC. The receiver
//! can then authenticate the token from its fixed 162 bytes *before* it reads up to 64 KiB of
//! header, and a header that does not match is a distinct, final refusal
//! (`HeaderHashMismatch`) instead of an indistinguishable bad MAC. The security argument is
//! unchanged: the tag still covers the header through its hash.
//!
//! Why single use without a replay cache: QUIC never reuses a stream id within a connection
//! and the exporter differs per connection; both are under the MAC.

use std::collections::{BTreeMap, VecDeque};

use hkdf::{Hkdf, HkdfExtract};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::ids::{NodeId, ServiceId};
use crate::routing::{Admission, IngressTable, ServeRefusal};
use crate::secret::{ConnectionBinding, EpochKey, MasterSecret, PairSeed, StreamKey};
use crate::time::UnixTime;

/// Token format version this build mints and accepts.
pub const TOKEN_VERSION: u8 = 1;
/// Algorithm byte for HMAC-SHA256 tags.
pub const ALG_HMAC_SHA256: u8 = 1;
/// Offset of the tag: everything before it is MAC'd.
pub const TAG_OFFSET: usize = 134;
/// Length of an encoded token.
pub const TOKEN_LEN: usize = TAG_OFFSET + 32;
/// Largest request header a token may announce (DESIGN.md: 64 KiB data-plane headers).
pub const MAX_HEADER_LEN: u32 = 64 * 1024;
/// Label for `export_keying_material` (RFC 5705 / RFC 8446 §7.5 reserve the
/// `EXPERIMENTAL` prefix for labels not registered with IANA).
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-hopmesh-hop-v1";
/// HKDF info label of the epoch key.
pub const EPOCH_KEY_LABEL: &[u8] = b"hopmesh/epoch/v1";
/// How many epochs either side of the receiver's current epoch are accepted: ±1 absorbs an
/// epoch boundary between mint and verify plus clock skew up to one epoch.
pub const EPOCH_WINDOW: u64 = 1;
/// QUIC application error code used to reset a refused stream. One generic code for every
/// reason: the precise reason goes to the audit log and metrics, never to the peer.
pub const STREAM_REFUSED_CODE: u32 = 0x4801;
/// More than this many forged tokens within [`FORGERY_WINDOW_SECS`] on one connection closes
/// it (DESIGN.md "Compromise").
pub const MAX_FORGED_PER_WINDOW: usize = 3;
/// The sliding window for [`MAX_FORGED_PER_WINDOW`].
pub const FORGERY_WINDOW_SECS: u64 = 60;

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

/// The fields of a token, as minted or as decoded (before any check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFields {
    /// Seed generation the key came from.
    pub generation: Generation,
    /// Epoch the key belongs to.
    pub epoch: Epoch,
    /// The minting node (must be the TLS peer).
    pub src: NodeId,
    /// The verifying node (must be the receiver).
    pub dst: NodeId,
    /// The service the stream is for.
    pub service: ServiceId,
    /// The raw QUIC stream id, `u64::from(stream.id())`.
    pub stream_id: u64,
    /// Length of the request header following the token.
    pub header_len: u32,
    /// SHA-256 of the request header.
    pub header_hash: [u8; 32],
}

/// A decoded token: fields plus tag. Decoding checks nothing but the length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopToken {
    /// Version byte as received.
    pub version: u8,
    /// Algorithm byte as received.
    pub alg: u8,
    /// The fields.
    pub fields: TokenFields,
    /// The MAC tag.
    pub tag: [u8; 32],
}

impl HopToken {
    /// Parses the fixed layout. Never fails on content; [`verify_token`] judges it.
    pub fn decode(raw: &[u8; TOKEN_LEN]) -> Self {
        let u32_at = |o: usize| u32::from_be_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_be_bytes(b)
        };
        let id_at = |o: usize| {
            let mut b = [0u8; 32];
            b.copy_from_slice(&raw[o..o + 32]);
            b
        };
        Self {
            version: raw[0],
            alg: raw[1],
            fields: TokenFields {
                generation: Generation(u64_at(2)),
                epoch: Epoch(u64_at(10)),
                src: NodeId::from_bytes(id_at(18)),
                dst: NodeId::from_bytes(id_at(50)),
                service: ServiceId::from_u64(u64_at(82)),
                stream_id: u64_at(90),
                header_len: u32_at(98),
                header_hash: id_at(102),
            },
            tag: id_at(TAG_OFFSET),
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; TOKEN_LEN] {
        let mut out = encode_unsigned(self.version, self.alg, &self.fields);
        out[TAG_OFFSET..].copy_from_slice(&self.tag);
        out
    }
}

fn encode_unsigned(version: u8, alg: u8, f: &TokenFields) -> [u8; TOKEN_LEN] {
    let mut out = [0u8; TOKEN_LEN];
    out[0] = version;
    out[1] = alg;
    out[2..10].copy_from_slice(&f.generation.0.to_be_bytes());
    out[10..18].copy_from_slice(&f.epoch.0.to_be_bytes());
    out[18..50].copy_from_slice(f.src.as_bytes());
    out[50..82].copy_from_slice(f.dst.as_bytes());
    out[82..90].copy_from_slice(&f.service.as_u64().to_be_bytes());
    out[90..98].copy_from_slice(&f.stream_id.to_be_bytes());
    out[98..102].copy_from_slice(&f.header_len.to_be_bytes());
    out[102..TAG_OFFSET].copy_from_slice(&f.header_hash);
    out
}

fn mac(key: &StreamKey) -> Hmac<Sha256> {
    // Invariant: HMAC accepts keys of any length.
    #[allow(clippy::expect_used)]
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).expect("HMAC takes any key length")
}

/// What a sender needs to mint a token for one stream.
#[derive(Clone, Debug)]
pub struct MintRequest<'a> {
    /// Generation of the key.
    pub generation: Generation,
    /// Epoch of the key.
    pub epoch: Epoch,
    /// This node.
    pub src: NodeId,
    /// The peer that will verify.
    pub dst: NodeId,
    /// Target service.
    pub service: ServiceId,
    /// Raw QUIC stream id the token will travel on.
    pub stream_id: u64,
    /// The request header that follows the token.
    pub header: &'a [u8],
}

/// A header longer than [`MAX_HEADER_LEN`] cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request header of {0} bytes exceeds the 64 KiB cap")]
pub struct HeaderTooLong(pub usize);

/// Mints the token for one stream. Call with the stream key for `req.generation` and
/// `req.epoch` on this connection; write the result, then the header, as the stream's first
/// bytes.
pub fn mint_token(
    req: &MintRequest<'_>,
    key: &StreamKey,
) -> Result<[u8; TOKEN_LEN], HeaderTooLong> {
    let header_len = u32::try_from(req.header.len())
        .ok()
        .filter(|len| *len <= MAX_HEADER_LEN)
        .ok_or(HeaderTooLong(req.header.len()))?;
    let fields = TokenFields {
        generation: req.generation,
        epoch: req.epoch,
        src: req.src,
        dst: req.dst,
        service: req.service,
        stream_id: req.stream_id,
        header_len,
        header_hash: Sha256::digest(req.header).into(),
    };
    let mut out = encode_unsigned(TOKEN_VERSION, ALG_HMAC_SHA256, &fields);
    let mut m = mac(key);
    m.update(&out[..TAG_OFFSET]);
    out[TAG_OFFSET..].copy_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

/// What the receiving end knows for certain about the stream being checked.
#[derive(Clone, Copy, Debug)]
pub struct GateContext {
    /// This node.
    pub local: NodeId,
    /// The peer's node id, computed from the key the TLS handshake authenticated.
    pub peer: NodeId,
    /// The raw id of the QUIC stream the token arrived on.
    pub stream_id: u64,
    /// The epoch length in force.
    pub epoch_len: EpochLength,
    /// Now, from the receiver's clock.
    pub now: UnixTime,
}

/// Result of looking up the key for a (generation, epoch) on one connection.
#[derive(Debug)]
pub enum KeyLookup {
    /// No usable seed for that generation (never issued, retired, or not valid now).
    Unknown,
    /// The stream key of a good generation.
    Valid(StreamKey),
    /// The stream key of a generation marked compromised; kept so that use is recognised.
    Compromised(StreamKey),
}

/// Supplies stream keys for one connection. [`ConnectionKeys`] derives them on every call;
/// the node may put a per-epoch cache in front.
pub trait StreamKeySource {
    /// The stream key for `generation` in `epoch` on this connection.
    fn stream_key(&self, generation: Generation, epoch: Epoch) -> KeyLookup;
}

/// Why a stream's token was refused. Each variant is a distinct audit reason; on the wire
/// they all become [`STREAM_REFUSED_CODE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// The version byte is not [`TOKEN_VERSION`].
    #[error("unsupported token version {0}")]
    WrongVersion(u8),
    /// The algorithm byte is not [`ALG_HMAC_SHA256`].
    #[error("unsupported token algorithm {0}")]
    UnknownAlgorithm(u8),
    /// The announced header exceeds [`MAX_HEADER_LEN`].
    #[error("announced header of {0} bytes exceeds the cap")]
    HeaderTooLong(u32),
    /// The token names another stream than the one it arrived on (replay on another stream).
    #[error("token for stream {token} arrived on stream {actual}")]
    StreamIdMismatch {
        /// Stream id in the token.
        token: u64,
        /// Stream it arrived on.
        actual: u64,
    },
    /// The token's src is not the TLS-authenticated peer (impersonation).
    #[error("token src {claimed:?} is not the authenticated peer {peer:?}")]
    SrcNotPeer {
        /// Claimed src.
        claimed: NodeId,
        /// Authenticated peer.
        peer: NodeId,
    },
    /// The token is addressed to another node.
    #[error("token dst {0:?} is not this node")]
    DstNotSelf(NodeId),
    /// The token's epoch is more than [`EPOCH_WINDOW`] away from ours (stale, or clock skew).
    #[error("epoch {token} out of window around {now}")]
    EpochOutOfWindow {
        /// Epoch in the token.
        token: u64,
        /// Receiver's current epoch.
        now: u64,
    },
    /// No usable seed for the generation.
    #[error("unknown generation {0}")]
    UnknownGeneration(u64),
    /// The MAC is valid under a generation marked compromised: a leaked seed is in use.
    #[error("valid MAC under compromised generation {0}")]
    CompromisedKeyUse(u64),
    /// The MAC does not verify (forgery, bit flip, replay on another connection).
    #[error("bad MAC")]
    BadMac,
    /// The MAC is good but policy does not let the peer use the service.
    #[error("policy refused: {0}")]
    PolicyRefused(ServeRefusal),
    /// The header that followed does not hash to the value under the MAC.
    #[error("request header does not match its hash")]
    HeaderHashMismatch,
}

impl TokenRefusal {
    /// A stable snake_case name for metrics labels and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WrongVersion(_) => "wrong_version",
            Self::UnknownAlgorithm(_) => "unknown_algorithm",
            Self::HeaderTooLong(_) => "header_too_long",
            Self::StreamIdMismatch { .. } => "stream_id_mismatch",
            Self::SrcNotPeer { .. } => "src_not_peer",
            Self::DstNotSelf(_) => "dst_not_self",
            Self::EpochOutOfWindow { .. } => "epoch_out_of_window",
            Self::UnknownGeneration(_) => "unknown_generation",
            Self::CompromisedKeyUse(_) => "compromised_key_use",
            Self::BadMac => "bad_mac",
            Self::PolicyRefused(_) => "policy_refused",
            Self::HeaderHashMismatch => "header_hash_mismatch",
        }
    }

    /// True for refusals that count towards the forged-token limit of a connection: tokens a
    /// well-behaved peer with the right keys never sends.
    pub fn is_forgery(&self) -> bool {
        matches!(
            self,
            Self::BadMac
                | Self::SrcNotPeer { .. }
                | Self::StreamIdMismatch { .. }
                | Self::HeaderHashMismatch
        )
    }

    /// True when the connection must be closed at once and the verifier told.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::CompromisedKeyUse(_) | Self::SrcNotPeer { .. })
    }
}

/// A token that passed every check but the header hash. Read exactly `header_len()` bytes,
/// then call [`TokenPermit::check_header`].
#[derive(Debug)]
#[must_use = "the header must still be checked"]
pub struct TokenPermit {
    fields: TokenFields,
    admission: Admission,
}

impl TokenPermit {
    /// How many header bytes follow the token (at most [`MAX_HEADER_LEN`]).
    pub fn header_len(&self) -> usize {
        self.fields.header_len as usize
    }

    /// Last step of verification: the header must hash to the value under the MAC.
    pub fn check_header(self, header: &[u8]) -> Result<StreamPermit, TokenRefusal> {
        let digest: [u8; 32] = Sha256::digest(header).into();
        if header.len() != self.header_len()
            || !crate::secret::ct_eq(&digest, &self.fields.header_hash)
        {
            return Err(TokenRefusal::HeaderHashMismatch);
        }
        Ok(StreamPermit {
            fields: self.fields,
            admission: self.admission,
        })
    }
}

/// A fully verified stream: only [`TokenPermit::check_header`] makes one.
#[derive(Debug)]
pub struct StreamPermit {
    fields: TokenFields,
    admission: Admission,
}

impl StreamPermit {
    /// The verified token fields.
    pub fn fields(&self) -> &TokenFields {
        &self.fields
    }

    /// The policy decision: serve locally (with the backend) or forward as a relay.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Takes the policy decision (when the permit is no longer needed).
    pub fn into_admission(self) -> Admission {
        self.admission
    }
}

/// Verifies a token in the order of DESIGN.md, cheap checks first; no byte of the stream
/// beyond the token is needed. Call as soon as [`TOKEN_LEN`] bytes have arrived.
pub fn verify_token(
    raw: &[u8; TOKEN_LEN],
    gate: &GateContext,
    keys: &impl StreamKeySource,
    ingress: &IngressTable,
) -> Result<TokenPermit, TokenRefusal> {
    let token = HopToken::decode(raw);
    let f = &token.fields;
    if token.version != TOKEN_VERSION {
        return Err(TokenRefusal::WrongVersion(token.version));
    }
    if token.alg != ALG_HMAC_SHA256 {
        return Err(TokenRefusal::UnknownAlgorithm(token.alg));
    }
    if f.header_len > MAX_HEADER_LEN {
        return Err(TokenRefusal::HeaderTooLong(f.header_len));
    }
    if f.stream_id != gate.stream_id {
        return Err(TokenRefusal::StreamIdMismatch {
            token: f.stream_id,
            actual: gate.stream_id,
        });
    }
    if f.src != gate.peer {
        return Err(TokenRefusal::SrcNotPeer {
            claimed: f.src,
            peer: gate.peer,
        });
    }
    if f.dst != gate.local {
        return Err(TokenRefusal::DstNotSelf(f.dst));
    }
    let now = gate.epoch_len.epoch_at(gate.now);
    if f.epoch.0.abs_diff(now.0) > EPOCH_WINDOW {
        return Err(TokenRefusal::EpochOutOfWindow {
            token: f.epoch.0,
            now: now.0,
        });
    }
    let (key, compromised) = match keys.stream_key(f.generation, f.epoch) {
        KeyLookup::Unknown => return Err(TokenRefusal::UnknownGeneration(f.generation.0)),
        KeyLookup::Valid(key) => (key, false),
        KeyLookup::Compromised(key) => (key, true),
    };
    let mut m = mac(&key);
    m.update(&raw[..TAG_OFFSET]);
    // `verify_slice` compares in constant time (subtle).
    if m.verify_slice(&raw[TAG_OFFSET..]).is_err() {
        return Err(TokenRefusal::BadMac);
    }
    if compromised {
        return Err(TokenRefusal::CompromisedKeyUse(f.generation.0));
    }
    let admission = ingress
        .admit(&f.src, f.service)
        .map_err(TokenRefusal::PolicyRefused)?;
    Ok(TokenPermit {
        fields: token.fields,
        admission,
    })
}

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

/// Stream keys of one connection, remembered per (generation, epoch).
///
/// A stream key is a pure function of the connection (binding, pair), the seed and the epoch.
/// So one derivation (HKDF expand + extract, ≈ 1 µs) per epoch serves every stream of the
/// epoch, instead of one per stream. A slot matches on generation, epoch *and* seed (compared
/// in constant time), so even a seed replaced under a known generation number (which the
/// keyring refuses anyway, [`GrantRefusal`]) could never be served a stale key. The cache holds
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

/// Derives stream keys for one connection from a keyring, through a [`StreamKeyCache`] when
/// one is given.
#[derive(Debug)]
pub struct ConnectionKeys<'a> {
    /// The seeds for the pair this connection joins.
    pub keyring: &'a PairKeyring,
    /// The connection's exporter bytes.
    pub binding: &'a ConnectionBinding,
    /// Receiver's now.
    pub now: UnixTime,
    /// Seconds of grace around a generation's window; use one epoch length.
    pub grace: u64,
    /// This connection's key cache (`None`: derive on every call).
    pub cache: Option<&'a std::sync::Mutex<StreamKeyCache>>,
}

impl ConnectionKeys<'_> {
    fn derive(&self, seed: &PairSeed, generation: Generation, epoch: Epoch) -> StreamKey {
        let pair = &self.keyring.pair;
        match self.cache {
            Some(cache) => cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .stream_key(self.binding, pair, seed, generation, epoch),
            None => StreamKey::derive(self.binding, &EpochKey::derive(seed, pair, epoch)),
        }
    }
}

impl StreamKeySource for ConnectionKeys<'_> {
    fn stream_key(&self, generation: Generation, epoch: Epoch) -> KeyLookup {
        match self.keyring.lookup(generation, self.now, self.grace) {
            SeedLookup::Unknown => KeyLookup::Unknown,
            SeedLookup::Valid(seed) => KeyLookup::Valid(self.derive(seed, generation, epoch)),
            SeedLookup::Compromised(seed) => {
                KeyLookup::Compromised(self.derive(seed, generation, epoch))
            }
        }
    }
}

/// Counts forged tokens on one connection in a sliding window.
#[derive(Debug, Default, Clone)]
pub struct ForgeryMeter {
    seen: VecDeque<UnixTime>,
}

/// The connection passed the forged-token limit and must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_FORGED_PER_WINDOW} forged tokens within {FORGERY_WINDOW_SECS} s")]
pub struct ForgeryLimitExceeded;

impl ForgeryMeter {
    /// Records one forged token at `now`; call for each refusal where
    /// [`TokenRefusal::is_forgery`] holds.
    pub fn record(&mut self, now: UnixTime) -> Result<(), ForgeryLimitExceeded> {
        while self
            .seen
            .front()
            .is_some_and(|t| now.secs_since(*t) >= FORGERY_WINDOW_SECS)
        {
            self.seen.pop_front();
        }
        self.seen.push_back(now);
        if self.seen.len() > MAX_FORGED_PER_WINDOW {
            Err(ForgeryLimitExceeded)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
