//! Verification on the receiving end: the gate context, key lookup, the refusal reasons,
//! the two-step permits, `verify_token`, and `ConnectionKeys` (keys from a keyring, through a
//! cache).

use hmac::Mac;
use sha2::{Digest, Sha256};

use super::key_cache::StreamKeyCache;
use super::keyring::{PairKeyring, SeedLookup};
use super::schedule::{Epoch, EpochLength, Generation};
use super::token::{
    ALG_HMAC_SHA256, HopToken, MAX_HEADER_LEN, TAG_OFFSET, TOKEN_LEN, TOKEN_VERSION, TokenFields,
    mac,
};
use crate::ids::NodeId;
use crate::routing::{Admission, IngressTable, ServeRefusal};
use crate::secret::{ConnectionBinding, EpochKey, PairSeed, StreamKey};
use crate::time::UnixTime;

/// How many epochs either side of the receiver's current epoch are accepted: ±1 absorbs an
/// epoch boundary between mint and verify plus clock skew up to one epoch.
pub const EPOCH_WINDOW: u64 = 1;
/// QUIC application error code used to reset a refused stream. One generic code for every
/// reason: the precise reason goes to the audit log and metrics, never to the peer.
/// Same value as [`crate::codes::STREAM_REFUSED`], kept under this name.
pub const STREAM_REFUSED_CODE: u32 = crate::codes::STREAM_REFUSED;

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

/// Verifies a token in the order of docs/design.md ("Verification order"), cheap checks first; no byte of the stream
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
        let pair = &self.keyring.pair();
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
