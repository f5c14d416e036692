//! Signed envelopes, attestations and revocation lists (docs/design.md,
//! "Identity, enrolment, attestation").
//!
//! Envelope layout (fixed, outside postcard):
//!
//! ```text
//! [0]      envelope version (1)
//! [1..9]   verifier key id
//! [9..73]  Ed25519 signature
//! [73..75] payload length, u16 big-endian
//! [75..]   postcard payload
//! ```
//!
//! The signature covers `domain ‖ version ‖ key id ‖ length ‖ payload`, where the domain
//! string differs per kind of document, so an attestation can never be passed off as a
//! revocation list or the other way round. **The signature is checked over the raw bytes
//! before the payload is decoded**; the decoder never sees unsigned bytes, and it then
//! requires the canonical encoding.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, Measurement, NodeId, NodeName, SegmentName};
use crate::secret::SigningSeed;
use crate::time::UnixTime;
use crate::wire::{BoundedVec, DecodeError, EncodeError, decode_canonical, encode_capped};

/// Envelope format version.
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the fixed envelope header.
pub const ENVELOPE_HEADER_LEN: usize = 75;
/// Cap on an attestation payload: it must fit, with its envelope, in one 4 KiB control frame.
pub const MAX_ATTESTATION_PAYLOAD: usize = 3 * 1024;
/// Cap on a revocation-list payload. Entries leave the list once the revoked node's last
/// attestation has expired, so the list holds only recent revocations.
pub const MAX_REVOCATION_PAYLOAD: usize = 60 * 1024;
/// Most segments one node may be in.
pub const MAX_SEGMENTS_PER_NODE: usize = 16;
/// Most entries in one revocation list.
pub const MAX_REVOKED: usize = 1024;
/// Longest SPKI accepted (an Ed25519 SPKI is 44 bytes).
pub const MAX_SPKI_LEN: usize = 256;
/// Attestation payload format version.
pub const ATTESTATION_VERSION: u8 = 1;
/// Seconds the verifier backdates an attestation's `not_before` by, so that a node whose
/// clock is a little behind the verifier's can use a fresh attestation at once.
pub const ATTESTATION_BACKDATE: u64 = 30;

/// The kind of signed document, fixing the signature's domain separation string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentKind {
    /// A node attestation.
    Attestation,
    /// A revocation list.
    RevocationList,
}

impl DocumentKind {
    fn domain(self) -> &'static [u8] {
        match self {
            Self::Attestation => b"hopmesh/attestation/v1\0",
            Self::RevocationList => b"hopmesh/revocation/v1\0",
        }
    }

    fn cap(self) -> usize {
        match self {
            Self::Attestation => MAX_ATTESTATION_PAYLOAD,
            Self::RevocationList => MAX_REVOCATION_PAYLOAD,
        }
    }
}

/// An Ed25519 signing key (verifier signing key or node key).
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: KeyId,
}

impl SigningKey {
    /// The key with the given 32-byte seed. Seeds come from the OS RNG in the IO crates and
    /// from fixed bytes in tests.
    pub fn from_seed(seed: &SigningSeed) -> Self {
        // Invariant: any 32 bytes are a valid Ed25519 seed; `from_seed_unchecked` only fails
        // on a wrong length, which the type rules out.
        #[allow(clippy::expect_used)]
        let pair = Ed25519KeyPair::from_seed_unchecked(seed.expose()).expect("32-byte seed");
        let key_id = KeyId::of_public_key(pair.public_key().as_ref());
        Self { pair, key_id }
    }

    /// The key in a PKCS#8 document (v1 or v2), as stored in key files.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, BadKey> {
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| BadKey(e.to_string()))?;
        let key_id = KeyId::of_public_key(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(pk)
    }

    /// The key id (`SHA-256(public key)[..8]`).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Signs raw bytes (no domain separation; prefer [`seal`]).
    pub fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(self.pair.sign(msg).as_ref());
        sig
    }
}

/// A key file did not hold an Ed25519 PKCS#8 document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an Ed25519 PKCS#8 key: {0}")]
pub struct BadKey(pub String);

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VerifyingKey(pub [u8; 32]);

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", hex::encode(self.0))
    }
}

impl VerifyingKey {
    /// Its key id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of_public_key(&self.0)
    }

    /// Checks an Ed25519 signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }

    /// The DER SubjectPublicKeyInfo of this key (RFC 8410 §4), as it appears in certificates.
    pub fn to_spki_der(&self) -> Vec<u8> {
        const PREFIX: [u8; 12] = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let mut der = PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        der
    }

    /// The key inside an Ed25519 SPKI, or `None` if `spki` is not exactly one.
    pub fn from_spki_der(spki: &[u8]) -> Option<Self> {
        let key: [u8; 32] = spki.get(12..)?.try_into().ok()?;
        let candidate = Self(key);
        (candidate.to_spki_der() == spki).then_some(candidate)
    }
}

/// The verifier signing keys a node pins: current and next, so rotation needs no flag day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    keys: BoundedVec<VerifyingKey, 4>,
}

impl KeySet {
    /// A set of up to 4 keys.
    pub fn new(keys: Vec<VerifyingKey>) -> Result<Self, crate::wire::TooMany> {
        Ok(Self {
            keys: BoundedVec::new(keys)?,
        })
    }

    /// The key with id `id`, if pinned.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.key_id() == *id)
    }
}

/// Why a signed document was refused. Each variant is a distinct local reason (docs/testing.md,
/// case 6); peers only ever see a generic refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedRefusal {
    /// Larger than the cap for its kind; checked before anything else.
    #[error("document of {len} bytes exceeds the cap of {cap}")]
    Oversized {
        /// Length seen.
        len: usize,
        /// Cap for the kind.
        cap: usize,
    },
    /// Shorter than the envelope header, or than the declared payload.
    #[error("truncated envelope")]
    Truncated,
    /// Bytes after the declared payload.
    #[error("{0} trailing bytes after the envelope")]
    TrailingBytes(usize),
    /// Unknown envelope version.
    #[error("unsupported envelope version {0}")]
    UnknownVersion(u8),
    /// Signed by a key that is not pinned.
    #[error("unknown signing key {0}")]
    UnknownKeyId(KeyId),
    /// The signature does not verify over these bytes.
    #[error("bad signature")]
    BadSignature,
    /// Signed, but the payload does not decode canonically (a verifier bug, or a stolen key).
    #[error("signed payload does not decode: {0}")]
    Payload(DecodeError),
    /// The key id inside the payload differs from the envelope's.
    #[error("payload names key {inner}, envelope key {outer}")]
    KeyIdMismatch {
        /// In the payload.
        inner: KeyId,
        /// On the envelope.
        outer: KeyId,
    },
    /// Payload version unknown.
    #[error("unsupported payload version {0}")]
    UnknownPayloadVersion(u8),
    /// `not_before` is in the future beyond the leeway.
    #[error("not valid before {not_before}")]
    NotYetValid {
        /// Start of validity.
        not_before: UnixTime,
    },
    /// `not_after` has passed (beyond the leeway).
    #[error("expired at {not_after}")]
    Expired {
        /// End of validity.
        not_after: UnixTime,
    },
    /// The attestation's node id is not the hash of its SPKI.
    #[error("node id does not match the SPKI")]
    NodeIdMismatch,
    /// The attestation is for another key than the TLS peer presented.
    #[error("attested key is not the TLS peer's key")]
    SpkiMismatch,
    /// A lower serial or version than one already accepted (rollback).
    #[error("serial {got} is below {highest} already accepted")]
    Rollback {
        /// Serial or version received.
        got: u64,
        /// Highest accepted so far.
        highest: u64,
    },
}

impl SignedRefusal {
    /// A stable snake_case name for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::Truncated => "truncated",
            Self::TrailingBytes(_) => "trailing_bytes",
            Self::UnknownVersion(_) => "unknown_version",
            Self::UnknownKeyId(_) => "unknown_key_id",
            Self::BadSignature => "bad_signature",
            Self::Payload(_) => "bad_payload",
            Self::KeyIdMismatch { .. } => "key_id_mismatch",
            Self::UnknownPayloadVersion(_) => "unknown_payload_version",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Expired { .. } => "expired",
            Self::NodeIdMismatch => "node_id_mismatch",
            Self::SpkiMismatch => "spki_mismatch",
            Self::Rollback { .. } => "rollback",
        }
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn signed_message(kind: DocumentKind, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let domain = kind.domain();
    let mut msg = Vec::with_capacity(domain.len() + 11 + payload.len());
    msg.extend_from_slice(domain);
    msg.push(header[0]);
    msg.extend_from_slice(&header[1..9]);
    msg.extend_from_slice(&header[73..75]);
    msg.extend_from_slice(payload);
    msg
}

/// Signs `payload` (already postcard-encoded) into an envelope of `kind`.
pub fn seal(kind: DocumentKind, key: &SigningKey, payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let cap = kind.cap();
    let len = u16::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= cap)
        .ok_or(EncodeError::TooLarge {
            len: payload.len(),
            cap,
        })?;
    let mut out = vec![0u8; ENVELOPE_HEADER_LEN];
    out[0] = ENVELOPE_VERSION;
    out[1..9].copy_from_slice(&key.key_id().0);
    out[73..75].copy_from_slice(&len.to_be_bytes());
    let sig = key.sign_raw(&signed_message(kind, &out, payload));
    out[9..73].copy_from_slice(&sig);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks an envelope's structure and signature against a single key and returns the signed
/// payload bytes. Only the returned bytes may be decoded.
pub fn open_with<'a>(
    kind: DocumentKind,
    bytes: &'a [u8],
    key: &VerifyingKey,
) -> Result<(&'a [u8], KeyId), SignedRefusal> {
    open_inner(kind, bytes, |id| (*id == key.key_id()).then_some(key))
}

/// Checks an envelope's structure and signature against a pinned key set and returns the
/// signed payload bytes and the signer. Only the returned bytes may be decoded.
pub fn open<'a>(
    kind: DocumentKind,
    bytes: &'a [u8],
    keys: &KeySet,
) -> Result<(&'a [u8], KeyId), SignedRefusal> {
    open_inner(kind, bytes, |id| keys.get(id))
}

fn open_inner<'a, 'k>(
    kind: DocumentKind,
    bytes: &'a [u8],
    lookup: impl Fn(&KeyId) -> Option<&'k VerifyingKey>,
) -> Result<(&'a [u8], KeyId), SignedRefusal> {
    let cap = kind.cap() + ENVELOPE_HEADER_LEN;
    if bytes.len() > cap {
        return Err(SignedRefusal::Oversized {
            len: bytes.len(),
            cap,
        });
    }
    let (header, rest) = bytes
        .split_at_checked(ENVELOPE_HEADER_LEN)
        .ok_or(SignedRefusal::Truncated)?;
    if header[0] != ENVELOPE_VERSION {
        return Err(SignedRefusal::UnknownVersion(header[0]));
    }
    let len = usize::from(u16::from_be_bytes([header[73], header[74]]));
    let payload = rest.get(..len).ok_or(SignedRefusal::Truncated)?;
    if rest.len() > len {
        return Err(SignedRefusal::TrailingBytes(rest.len() - len));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&header[1..9]);
    let key_id = KeyId(id);
    let key = lookup(&key_id).ok_or(SignedRefusal::UnknownKeyId(key_id))?;
    if !key.verify(&signed_message(kind, header, payload), &header[9..73]) {
        return Err(SignedRefusal::BadSignature);
    }
    Ok((payload, key_id))
}

/// The payload of an attestation: who a node is, as vouched for by the verifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    /// Payload version, [`ATTESTATION_VERSION`].
    pub version: u8,
    /// `SHA-256(spki)`.
    pub node_id: NodeId,
    /// The node's public key, DER SPKI.
    pub spki: BoundedVec<u8, MAX_SPKI_LEN>,
    /// Name bound at enrollment.
    pub name: NodeName,
    /// Segments the node is in.
    pub segments: BoundedVec<SegmentName, MAX_SEGMENTS_PER_NODE>,
    /// Measurement of the node binary at the last (re)attestation.
    pub measurement: Measurement,
    /// Increases with every attestation issued for this node.
    pub serial: u64,
    /// Start of validity.
    pub not_before: UnixTime,
    /// End of validity (exclusive).
    pub not_after: UnixTime,
    /// The signing key; must equal the envelope's.
    pub verifier_key_id: KeyId,
}

impl Attestation {
    /// Encodes and signs. The caller (the verifier) fills every field.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, EncodeError> {
        let payload = encode_capped(self, MAX_ATTESTATION_PAYLOAD)?;
        seal(DocumentKind::Attestation, key, &payload)
    }
}

/// An attestation whose signature, encoding, key binding and validity were checked at some
/// `now`. Only [`verify_attestation`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedAttestation {
    attestation: Attestation,
}

impl VerifiedAttestation {
    /// The checked payload.
    pub fn get(&self) -> &Attestation {
        &self.attestation
    }

    /// Checks that the TLS peer presented the attested key. Call at connect with the SPKI of
    /// the peer's certificate.
    pub fn check_peer(&self, tls_spki: &[u8]) -> Result<(), SignedRefusal> {
        if crate::secret::ct_eq(&self.attestation.spki, tls_spki)
            && self.attestation.spki.len() == tls_spki.len()
        {
            Ok(())
        } else {
            Err(SignedRefusal::SpkiMismatch)
        }
    }

    /// Checks that this attestation does not go back behind one already accepted for the same
    /// node (pass the highest serial seen, if any).
    pub fn check_serial(&self, highest: Option<u64>) -> Result<(), SignedRefusal> {
        match highest {
            Some(h) if self.attestation.serial < h => Err(SignedRefusal::Rollback {
                got: self.attestation.serial,
                highest: h,
            }),
            _ => Ok(()),
        }
    }

    /// Still valid at `now` (with `leeway` seconds)? Call periodically on held attestations.
    pub fn check_validity(&self, now: UnixTime, leeway: u64) -> Result<(), SignedRefusal> {
        check_window(&self.attestation, now, leeway)
    }
}

fn check_window(a: &Attestation, now: UnixTime, leeway: u64) -> Result<(), SignedRefusal> {
    if now.plus(leeway) < a.not_before {
        return Err(SignedRefusal::NotYetValid {
            not_before: a.not_before,
        });
    }
    if now >= a.not_after.plus(leeway) {
        return Err(SignedRefusal::Expired {
            not_after: a.not_after,
        });
    }
    Ok(())
}

/// Verifies an attestation envelope: size, structure, pinned key, signature over the raw
/// bytes, then (only then) canonical decoding, key-id binding, node id = SHA-256(SPKI), and
/// validity at `now` with `leeway` seconds.
pub fn verify_attestation(
    bytes: &[u8],
    keys: &KeySet,
    now: UnixTime,
    leeway: u64,
) -> Result<VerifiedAttestation, SignedRefusal> {
    let (payload, key_id) = open(DocumentKind::Attestation, bytes, keys)?;
    let a: Attestation =
        decode_canonical(payload, MAX_ATTESTATION_PAYLOAD).map_err(SignedRefusal::Payload)?;
    if a.version != ATTESTATION_VERSION {
        return Err(SignedRefusal::UnknownPayloadVersion(a.version));
    }
    if a.verifier_key_id != key_id {
        return Err(SignedRefusal::KeyIdMismatch {
            inner: a.verifier_key_id,
            outer: key_id,
        });
    }
    if NodeId::from_spki(&a.spki) != a.node_id {
        return Err(SignedRefusal::NodeIdMismatch);
    }
    check_window(&a, now, leeway)?;
    Ok(VerifiedAttestation { attestation: a })
}

/// One revoked node. It stays on the list until `until`, the end of the last attestation
/// the verifier issued it; after that the attestation is dead anyway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedNode {
    /// The node.
    pub node_id: NodeId,
    /// When it was revoked.
    pub revoked_at: UnixTime,
    /// When it may leave the list.
    pub until: UnixTime,
}

/// A signed, versioned revocation list. Nodes persist the last one and refuse lower
/// versions (anti-rollback).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// Increases with every change.
    pub version: u64,
    /// When the verifier issued it.
    pub issued_at: UnixTime,
    /// The signing key; must equal the envelope's.
    pub verifier_key_id: KeyId,
    /// Revoked nodes.
    pub revoked: BoundedVec<RevokedNode, MAX_REVOKED>,
}

impl RevocationList {
    /// Encodes and signs.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, EncodeError> {
        let payload = encode_capped(self, MAX_REVOCATION_PAYLOAD)?;
        seal(DocumentKind::RevocationList, key, &payload)
    }

    /// True when `node` is on the list.
    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.revoked.iter().any(|r| r.node_id == *node)
    }
}

/// What a node should do with a verified revocation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationUpdate {
    /// Newer than what we hold: persist it, then apply it.
    Newer(RevocationList),
    /// The same version we hold: nothing to do.
    Same,
}

/// Verifies a revocation list envelope and refuses versions below `current` (the version
/// the node holds, if any). A list with the same version but different content is refused
/// as a rollback too: versions are never reused.
pub fn verify_revocation_list(
    bytes: &[u8],
    keys: &KeySet,
    current: Option<(u64, &[u8])>,
) -> Result<RevocationUpdate, SignedRefusal> {
    let (payload, key_id) = open(DocumentKind::RevocationList, bytes, keys)?;
    let list: RevocationList =
        decode_canonical(payload, MAX_REVOCATION_PAYLOAD).map_err(SignedRefusal::Payload)?;
    if list.verifier_key_id != key_id {
        return Err(SignedRefusal::KeyIdMismatch {
            inner: list.verifier_key_id,
            outer: key_id,
        });
    }
    match current {
        Some((v, held)) if list.version < v || (list.version == v && held != bytes) => {
            Err(SignedRefusal::Rollback {
                got: list.version,
                highest: v,
            })
        }
        Some((v, _)) if list.version == v => Ok(RevocationUpdate::Same),
        _ => Ok(RevocationUpdate::Newer(list)),
    }
}

#[cfg(test)]
mod tests;
