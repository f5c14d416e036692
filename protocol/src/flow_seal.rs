//! End-to-end protection of relayed flows: what a relay forwards and cannot read or alter.
//!
//! A relayed flow's origin puts a fresh X25519 public key in its signed [`FlowAssertion`]; the
//! serving node answers with its own fresh key in a [`FlowAnswer`] signed by its attested node
//! key. Both derive the flow's keys from the X25519 secret and the transcript (both signed
//! messages: both attested node keys, the service, the serving node, the epoch, the nonce and
//! both public keys), so no relay on the path can compute them, and a relay that presents a
//! captured assertion on a stream of its own cannot produce the first record that proves the
//! flow (the serving node connects no backend before it, [`Opener::open`]).
//!
//! The flow's bytes then travel as records:
//!
//! ```text
//! [u16 BE ciphertext length][AES-128-GCM(payload || kind byte) || 16-byte tag]
//! ```
//!
//! with the two length bytes as associated data and the nonce the direction's IV XOR the
//! record's sequence number (as in TLS 1.3). Each direction has its own key. A sender moves to
//! the next key ([`RecordKind::KeyUpdate`]) when its caller asks (the node does at least every
//! epoch) and before [`SealLimits::records_per_key`] records; the old key is then forgotten. A
//! half-close is a [`RecordKind::End`] record: a stream that ends without one was truncated,
//! and the node resets it instead of closing cleanly.
//!
//! Direct (zero-hop) flows do not use this: QUIC's TLS already protects them end to end.

use hkdf::Hkdf;
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::attestation::{KeySet, SignedRefusal, SigningKey, VerifyingKey, verify_attestation};
use crate::control::{FlowAssertion, MAX_ENVELOPE};
use crate::frame::CONTROL_CAP;
use crate::ids::NodeId;
use crate::time::UnixTime;
use crate::wire::{BoundedVec, DecodeError, EncodeError};

#[cfg(test)]
mod tests;

/// Domain separation for the serving node's answer signature.
pub const ANSWER_DOMAIN: &[u8] = b"hopmesh/flow-answer/v1\0";
/// Domain separation for the flow transcript hash (the HKDF salt).
pub const TRANSCRIPT_DOMAIN: &[u8] = b"hopmesh/flow-transcript/v1\0";
/// Largest payload of one record (as TLS: 16 KiB).
pub const MAX_RECORD_PAYLOAD: usize = 16 * 1024;
/// Bytes of a record's length prefix.
pub const RECORD_HEADER_LEN: usize = 2;
/// Bytes of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its payload (length, kind byte, tag).
pub const RECORD_OVERHEAD: usize = RECORD_HEADER_LEN + 1 + TAG_LEN;
/// Most records one key protects by default: below AES-GCM's confidentiality bound for
/// full-size records (TLS 1.3 uses 2^24.5).
pub const RECORDS_PER_KEY: u64 = 1 << 24;
/// Bytes of an X25519 public key.
pub const PUBLIC_LEN: usize = 32;

/// The limits of one direction (the default everywhere but tests, which shrink them to
/// reach the edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealLimits {
    /// Records under one key: the sender moves to the next key before it, the receiver
    /// refuses the record past it.
    pub records_per_key: u64,
}

impl Default for SealLimits {
    fn default() -> Self {
        SealLimits {
            records_per_key: RECORDS_PER_KEY,
        }
    }
}

/// What a record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Flow bytes (possibly none: the origin's first record proves the flow even when its app
    /// has not spoken yet).
    Data,
    /// The sender's half-close; nothing may follow it.
    End,
    /// The sender's next records use its next key.
    KeyUpdate,
    /// The serving node's one status byte (its first record): the backend connect's outcome.
    Status,
}

impl RecordKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Data => 0,
            Self::End => 1,
            Self::KeyUpdate => 2,
            Self::Status => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Data,
            1 => Self::End,
            2 => Self::KeyUpdate,
            3 => Self::Status,
            _ => return None,
        })
    }
}

/// Why a flow could not be set up or a record was refused. Every one ends the stream with a
/// reset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The serving node's attestation in the answer does not verify.
    #[error("answer attestation: {0}")]
    AnswerAttestation(SignedRefusal),
    /// The answer comes from another node than the flow's serving node.
    #[error("answer from another node")]
    AnswerWrongNode,
    /// The answer's signature does not verify under the attested key.
    #[error("bad answer signature")]
    AnswerBadSignature,
    /// The answer could not be decoded.
    #[error("answer: {0}")]
    AnswerMalformed(DecodeError),
    /// The peer's public key was refused by X25519 (or randomness failed).
    #[error("key agreement failed")]
    Agreement,
    /// A record failed authentication: modified, reordered, or not from the flow's peer.
    #[error("record failed authentication")]
    BadRecord,
    /// A record's length is outside 1 + tag ..= the largest record.
    #[error("record length {0} out of range")]
    BadLength(usize),
    /// A record's kind byte is unknown, or its payload does not fit its kind.
    #[error("malformed record")]
    MalformedRecord,
    /// A record came after the peer's `End`.
    #[error("record after end")]
    AfterEnd,
    /// More records under one key than [`SealLimits::records_per_key`].
    #[error("key used past its record limit")]
    KeyExhausted,
}

impl SealError {
    /// Stable reason name (counters and audit).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AnswerAttestation(_) => "flow_answer_attestation",
            Self::AnswerWrongNode => "flow_answer_wrong_node",
            Self::AnswerBadSignature => "flow_answer_bad_signature",
            Self::AnswerMalformed(_) => "flow_answer_malformed",
            Self::Agreement => "flow_agreement",
            Self::BadRecord => "flow_record_bad",
            Self::BadLength(_) => "flow_record_length",
            Self::MalformedRecord => "flow_record_malformed",
            Self::AfterEnd => "flow_record_after_end",
            Self::KeyExhausted => "flow_key_exhausted",
        }
    }
}

/// One side's fresh X25519 key for one flow; used once.
pub struct Ephemeral {
    private: EphemeralPrivateKey,
    public: [u8; PUBLIC_LEN],
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ephemeral")
            .field("public", &hex::encode(&self.public[..4]))
            .finish_non_exhaustive()
    }
}

impl Ephemeral {
    /// A fresh key from `rng`.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, SealError> {
        let private =
            EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| SealError::Agreement)?;
        let public = private
            .compute_public_key()
            .map_err(|_| SealError::Agreement)?;
        let public: [u8; PUBLIC_LEN] = public
            .as_ref()
            .try_into()
            .map_err(|_| SealError::Agreement)?;
        Ok(Ephemeral { private, public })
    }

    /// The public half, for the assertion or the answer.
    pub fn public(&self) -> [u8; PUBLIC_LEN] {
        self.public
    }

    /// Agrees with `peer` and derives both directions' keys for `transcript`: ours to seal,
    /// theirs to open. `origin` says which direction is ours.
    pub fn agree(
        self,
        peer: &[u8; PUBLIC_LEN],
        transcript: &[u8; 32],
        origin: bool,
        limits: SealLimits,
    ) -> Result<(Sealer, Opener), SealError> {
        let peer = UnparsedPublicKey::new(&X25519, peer);
        let (up, down) = agree_ephemeral(self.private, &peer, |shared| {
            let hk = Hkdf::<Sha256>::new(Some(transcript), shared);
            let mut up = Zeroizing::new([0u8; 32]);
            let mut down = Zeroizing::new([0u8; 32]);
            // Invariant: 32 bytes is far below HKDF-SHA256's 8 160-byte limit.
            let _ = hk.expand(b"hopmesh seal up", up.as_mut());
            let _ = hk.expand(b"hopmesh seal down", down.as_mut());
            (up, down)
        })
        .map_err(|_| SealError::Agreement)?;
        let (mine, theirs) = if origin { (up, down) } else { (down, up) };
        Ok((
            Sealer {
                dir: Direction::new(mine, limits),
            },
            Opener {
                dir: Direction::new(theirs, limits),
                ended: false,
            },
        ))
    }
}

/// The serving node's answer to a relayed flow: its attestation and fresh public key, signed
/// over the flow's transcript. Travels as one control-size frame, in clear (a relay sees it,
/// and can change nothing in it without the signature failing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowAnswer {
    /// The serving node's attestation envelope.
    pub serving_attestation: BoundedVec<u8, MAX_ENVELOPE>,
    /// Its fresh X25519 public key.
    pub ephemeral: [u8; PUBLIC_LEN],
    /// Ed25519 signature by its node key over [`ANSWER_DOMAIN`] and the transcript.
    pub signature: BoundedVec<u8, 64>,
}

/// The flow's transcript: the origin's signed assertion, the serving node's attestation and
/// its public key. It salts the key derivation and is what the answer signs.
pub fn transcript(
    assertion: &FlowAssertion,
    serving_attestation: &[u8],
    answer_ephemeral: &[u8; PUBLIC_LEN],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSCRIPT_DOMAIN);
    h.update(assertion.digest());
    h.update(crate::attestation::sha256(serving_attestation));
    h.update(answer_ephemeral);
    h.finalize().into()
}

impl FlowAnswer {
    /// Signs an answer to `assertion` as the serving node.
    pub fn sign(
        key: &SigningKey,
        serving_attestation: &[u8],
        assertion: &FlowAssertion,
        ephemeral: [u8; PUBLIC_LEN],
    ) -> Result<Self, EncodeError> {
        let th = transcript(assertion, serving_attestation, &ephemeral);
        let sig = key.sign_raw(&[ANSWER_DOMAIN, &th].concat());
        Ok(FlowAnswer {
            serving_attestation: BoundedVec::new(serving_attestation.to_vec()).map_err(|_| {
                EncodeError::TooLarge {
                    len: serving_attestation.len(),
                    cap: MAX_ENVELOPE,
                }
            })?,
            ephemeral,
            signature: BoundedVec::new(sig.to_vec())
                .map_err(|_| EncodeError::TooLarge { len: 64, cap: 64 })?,
        })
    }

    /// Verifies the answer to our `assertion` as the origin: the attestation verifies under
    /// the pinned keys, names `serving_node`, and its key signed this flow's transcript.
    /// Returns the transcript.
    pub fn verify(
        &self,
        keys: &KeySet,
        assertion: &FlowAssertion,
        serving_node: &NodeId,
        now: UnixTime,
    ) -> Result<[u8; 32], SealError> {
        let att = verify_attestation(&self.serving_attestation, keys, now, 5)
            .map_err(SealError::AnswerAttestation)?;
        if att.get().node_id != *serving_node {
            return Err(SealError::AnswerWrongNode);
        }
        let key =
            VerifyingKey::from_spki_der(&att.get().spki).ok_or(SealError::AnswerBadSignature)?;
        let th = transcript(assertion, &self.serving_attestation, &self.ephemeral);
        if !key.verify(&[ANSWER_DOMAIN, &th].concat(), &self.signature) {
            return Err(SealError::AnswerBadSignature);
        }
        Ok(th)
    }

    /// Encodes as one frame (control-stream cap).
    pub fn to_frame(&self) -> Result<Vec<u8>, EncodeError> {
        crate::frame::encode_frame(self, CONTROL_CAP)
    }

    /// Decodes a frame body (after its length prefix, checked with [`Self::body_len`]).
    pub fn from_body(body: &[u8]) -> Result<Self, SealError> {
        crate::frame::decode_body(body, CONTROL_CAP).map_err(SealError::AnswerMalformed)
    }

    /// The body length a frame prefix announces, checked against the cap.
    pub fn body_len(prefix: [u8; crate::frame::LEN_PREFIX]) -> Result<usize, SealError> {
        crate::frame::body_len(prefix, CONTROL_CAP).map_err(SealError::AnswerMalformed)
    }
}

/// One direction's key state: the traffic secret of the current generation, its AEAD key
/// and IV, and the next record's sequence number.
struct Direction {
    secret: Zeroizing<[u8; 32]>,
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    generation: u64,
    limits: SealLimits,
}

impl Direction {
    fn new(secret: Zeroizing<[u8; 32]>, limits: SealLimits) -> Self {
        let (key, iv) = Self::keys(&secret);
        Direction {
            secret,
            key,
            iv,
            seq: 0,
            generation: 0,
            limits,
        }
    }

    fn keys(secret: &[u8; 32]) -> (LessSafeKey, [u8; 12]) {
        // Invariant: a 32-byte PRK is a valid HKDF-SHA256 PRK, and 16 and 12 bytes are
        // valid output lengths; 16 bytes is AES-128's key length.
        let hk = Hkdf::<Sha256>::from_prk(secret).expect("32-byte PRK");
        let mut key = Zeroizing::new([0u8; 16]);
        let mut iv = [0u8; 12];
        hk.expand(b"key", key.as_mut()).expect("16 bytes");
        hk.expand(b"iv", &mut iv).expect("12 bytes");
        let key = UnboundKey::new(&AES_128_GCM, key.as_ref()).expect("16-byte key");
        (LessSafeKey::new(key), iv)
    }

    /// Moves to the next generation; the old secret and key are gone.
    fn advance(&mut self) {
        let hk = Hkdf::<Sha256>::from_prk(self.secret.as_ref()).expect("32-byte PRK");
        let mut next = Zeroizing::new([0u8; 32]);
        hk.expand(b"next", next.as_mut()).expect("32 bytes");
        let (key, iv) = Self::keys(&next);
        self.secret = next;
        self.key = key;
        self.iv = iv;
        self.seq = 0;
        self.generation += 1;
    }

    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// Seals our direction of a flow.
pub struct Sealer {
    dir: Direction,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("generation", &self.dir.generation)
            .field("seq", &self.dir.seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// The key generation in use (0 first; one more per [`RecordKind::KeyUpdate`]).
    pub fn generation(&self) -> u64 {
        self.dir.generation
    }

    /// Appends one record of `kind` carrying `payload` (at most [`MAX_RECORD_PAYLOAD`]) to
    /// `out`. Moves to the next key first when this key has room for only its key update.
    pub fn seal(
        &mut self,
        kind: RecordKind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if payload.len() > MAX_RECORD_PAYLOAD {
            return Err(SealError::MalformedRecord);
        }
        if self.dir.seq + 1 >= self.dir.limits.records_per_key {
            self.key_update(out);
        }
        self.seal_one(kind, payload, out);
        Ok(())
    }

    /// Appends `data` as data records of up to [`MAX_RECORD_PAYLOAD`] each (one empty record
    /// for empty `data`).
    pub fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) {
        out.reserve(data.len() + data.len().div_ceil(MAX_RECORD_PAYLOAD).max(1) * RECORD_OVERHEAD);
        let mut chunks = data.chunks(MAX_RECORD_PAYLOAD);
        let first = chunks.next().unwrap_or_default();
        for chunk in std::iter::once(first).chain(chunks) {
            // Invariant: chunks are at most MAX_RECORD_PAYLOAD.
            let _ = self.seal(RecordKind::Data, chunk, out);
        }
    }

    /// Appends a key update record and moves to the next key.
    pub fn key_update(&mut self, out: &mut Vec<u8>) {
        self.seal_one(RecordKind::KeyUpdate, &[], out);
        self.dir.advance();
    }

    fn seal_one(&mut self, kind: RecordKind, payload: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let len = payload.len() + 1 + TAG_LEN;
        // Invariant: len <= MAX_RECORD_PAYLOAD + 17 < u16::MAX.
        let header = (len as u16).to_be_bytes();
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out.push(kind.to_byte());
        let nonce = self.dir.nonce();
        let body = &mut out[start + RECORD_HEADER_LEN..];
        // Invariant: AES-GCM sealing fails only past 2^36 bytes per record.
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .expect("record within AES-GCM limits");
        out.extend_from_slice(tag.as_ref());
        self.dir.seq += 1;
    }
}

/// One record opened in place: its kind, where its payload is in the buffer, and how many
/// bytes of the buffer it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// What it carries.
    pub kind: RecordKind,
    /// The payload's range in the buffer given to [`Opener::open`].
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer the record took (drop them before the next call).
    pub used: usize,
}

/// Opens the peer's direction of a flow.
pub struct Opener {
    dir: Direction,
    ended: bool,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("generation", &self.dir.generation)
            .field("seq", &self.dir.seq)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// Bytes of the record at the front of `buf` (length prefix included), once its prefix has
/// arrived; checked against the record size limits before anything is buffered for it.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, SealError> {
    let Some(prefix) = buf.first_chunk::<RECORD_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes(*prefix));
    if !(1 + TAG_LEN..=MAX_RECORD_PAYLOAD + 1 + TAG_LEN).contains(&len) {
        return Err(SealError::BadLength(len));
    }
    Ok(Some(RECORD_HEADER_LEN + len))
}

impl Opener {
    /// Whether the peer's `End` arrived.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The peer's key generation (0 first).
    pub fn generation(&self) -> u64 {
        self.dir.generation
    }

    /// Opens the record at the front of `buf` in place. `Ok(None)`: it has not fully arrived.
    /// A key update is applied here (and returned, with an empty payload). Any error is final:
    /// the stream must be reset.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, SealError> {
        let Some(total) = record_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        if self.ended {
            return Err(SealError::AfterEnd);
        }
        if self.dir.seq >= self.dir.limits.records_per_key {
            return Err(SealError::KeyExhausted);
        }
        let (header, body) = buf[..total].split_at_mut(RECORD_HEADER_LEN);
        let nonce = self.dir.nonce();
        let header: [u8; RECORD_HEADER_LEN] = [header[0], header[1]];
        let plain = self
            .dir
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| SealError::BadRecord)?;
        self.dir.seq += 1;
        let (&kind, payload) = plain.split_last().ok_or(SealError::MalformedRecord)?;
        let kind = RecordKind::from_byte(kind).ok_or(SealError::MalformedRecord)?;
        let len = payload.len();
        match kind {
            RecordKind::Data => {}
            RecordKind::Status if len == 1 => {}
            RecordKind::End if len == 0 => self.ended = true,
            RecordKind::KeyUpdate if len == 0 => self.dir.advance(),
            _ => return Err(SealError::MalformedRecord),
        }
        Ok(Some(Opened {
            kind,
            payload: RECORD_HEADER_LEN..RECORD_HEADER_LEN + len,
            used: total,
        }))
    }
}

/// A sealer and the opener of its direction under one fixed secret (fuzzing only).
#[doc(hidden)]
pub fn fuzzing_pair(secret: [u8; 32]) -> (Sealer, Opener) {
    (
        Sealer {
            dir: Direction::new(Zeroizing::new(secret), SealLimits::default()),
        },
        Opener {
            dir: Direction::new(Zeroizing::new(secret), SealLimits::default()),
            ended: false,
        },
    )
}
