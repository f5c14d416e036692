//! Control-stream messages between peers, and the request header that follows a hop token.
//!
//! Every type here travels inside a [`crate::frame`] and is decoded canonically. Enum tags
//! are postcard varints; new variants are only ever appended so older peers refuse them as
//! malformed instead of misreading them.

use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, BTreeSet};

use crate::attestation::{
    ENVELOPE_HEADER_LEN, KeySet, MAX_ATTESTATION_PAYLOAD, SignedRefusal, SigningKey, VerifyingKey,
    verify_attestation,
};
use crate::frame::{CONTROL_CAP, HEADER_CAP};
use crate::hop_token::{EPOCH_WINDOW, Epoch, EpochLength};
use crate::ids::{NodeId, ServiceId};
use crate::socks5::Reply;
use crate::time::UnixTime;
use crate::wire::{BoundedVec, DecodeError, EncodeError};

/// Largest attestation envelope carried in a control message.
pub const MAX_ENVELOPE: usize = ENVELOPE_HEADER_LEN + MAX_ATTESTATION_PAYLOAD;
/// Longest relay path a stream may take (origin and final node excluded).
pub const MAX_RELAY_HOPS: usize = 4;

/// A message on the control stream of a peer connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message each side sends: its current attestation envelope. The dialer treats the
    /// connection as accepted only once the acceptor's `Hello` arrived (docs/design.md, pitfall 1).
    Hello {
        /// Signed attestation envelope.
        attestation: BoundedVec<u8, MAX_ENVELOPE>,
    },
    /// A renewed attestation; replaces the previous one if the serial is not lower.
    Renewal {
        /// Signed attestation envelope.
        attestation: BoundedVec<u8, MAX_ENVELOPE>,
    },
    /// The sender is closing the connection on purpose.
    Goodbye {
        /// Why.
        reason: GoodbyeReason,
    },
}

/// Why a peer says goodbye.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoodbyeReason {
    /// Graceful shutdown.
    Shutdown,
    /// The sender's own attestation expired (fail closed).
    AttestationExpired,
    /// Policy no longer allows this pair.
    PolicyChanged,
}

impl PeerMessage {
    /// Encodes as a control frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, EncodeError> {
        crate::frame::encode_frame(self, CONTROL_CAP)
    }

    /// Decodes a control frame from the front of `buf` (`Ok(None)`: need more bytes).
    pub fn from_frame(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        crate::frame::decode_frame(buf, CONTROL_CAP)
    }
}

/// The request header: the postcard body that follows the token on a data stream. Its
/// SHA-256 is under the token's MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The node whose app opened the flow (equals the token's src on a direct route).
    pub origin: NodeId,
    /// The final service.
    pub service: ServiceId,
    /// Relays still to traverse after the receiver, in order (empty on a direct route).
    pub route: BoundedVec<NodeId, MAX_RELAY_HOPS>,
    /// On a relayed route: the origin's signed statement of this flow, checked by every hop
    /// so that a relay can neither invent an origin nor bridge segments.
    pub assertion: Option<FlowAssertion>,
}

/// Domain separation for flow-assertion signatures.
pub const FLOW_DOMAIN: &[u8] = b"hopmesh/flow/v1\0";

/// The origin's signed statement "I, holder of this attestation, open a flow to `service` on
/// `final_node` in `epoch`", carried end to end through relays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowAssertion {
    /// The origin's attestation envelope (proves its key, name and segments).
    pub origin_attestation: BoundedVec<u8, MAX_ENVELOPE>,
    /// The node that serves the service.
    pub final_node: NodeId,
    /// The service.
    pub service: ServiceId,
    /// Epoch at signing (valid ±1 epoch, like tokens).
    pub epoch: u64,
    /// Fresh random bytes; the final node refuses a nonce it has seen (replay by a relay).
    pub nonce: [u8; 16],
    /// The origin's fresh X25519 public key for this flow ([`crate::flow_seal`]): the flow's
    /// bytes are sealed under keys only the origin and the final node can derive.
    pub ephemeral: [u8; 32],
    /// Ed25519 signature by the origin's node key.
    pub signature: BoundedVec<u8, 64>,
}

/// Why a flow assertion was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowRefusal {
    /// The origin's attestation does not verify.
    #[error("origin attestation: {0}")]
    Attestation(SignedRefusal),
    /// The signature does not verify under the attested key.
    #[error("bad flow signature")]
    BadSignature,
    /// Signed for another node or service than this stream's.
    #[error("flow assertion is for another node or service")]
    WrongTarget,
    /// Outside ±1 epoch.
    #[error("flow assertion epoch out of window")]
    EpochOutOfWindow,
    /// The nonce was seen before (replay).
    #[error("flow assertion replayed")]
    Replayed,
}

impl FlowRefusal {
    /// Stable reason name.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Attestation(_) => "flow_attestation",
            Self::BadSignature => "flow_bad_signature",
            Self::WrongTarget => "flow_wrong_target",
            Self::EpochOutOfWindow => "flow_epoch_out_of_window",
            Self::Replayed => "flow_replayed",
        }
    }
}

impl FlowAssertion {
    fn signed_bytes(
        origin_attestation: &[u8],
        final_node: &NodeId,
        service: ServiceId,
        epoch: u64,
        nonce: &[u8; 16],
        ephemeral: &[u8; 32],
    ) -> Vec<u8> {
        let mut msg = FLOW_DOMAIN.to_vec();
        msg.extend_from_slice(&crate::attestation::sha256(origin_attestation));
        msg.extend_from_slice(final_node.as_bytes());
        msg.extend_from_slice(&service.as_u64().to_be_bytes());
        msg.extend_from_slice(&epoch.to_be_bytes());
        msg.extend_from_slice(nonce);
        msg.extend_from_slice(ephemeral);
        msg
    }

    /// Signs a flow as the origin. `nonce` must be fresh random bytes and `ephemeral` the
    /// public half of a fresh [`crate::flow_seal::Ephemeral`].
    pub fn sign(
        key: &SigningKey,
        origin_attestation: &[u8],
        final_node: NodeId,
        service: ServiceId,
        epoch: Epoch,
        nonce: [u8; 16],
        ephemeral: [u8; 32],
    ) -> Option<Self> {
        let sig = key.sign_raw(&Self::signed_bytes(
            origin_attestation,
            &final_node,
            service,
            epoch.0,
            &nonce,
            &ephemeral,
        ));
        Some(Self {
            origin_attestation: BoundedVec::new(origin_attestation.to_vec()).ok()?,
            final_node,
            service,
            epoch: epoch.0,
            nonce,
            ephemeral,
            signature: BoundedVec::new(sig.to_vec()).ok()?,
        })
    }

    /// SHA-256 of everything the origin signed and its signature: the assertion's part of
    /// the flow transcript ([`crate::flow_seal::transcript`]).
    pub fn digest(&self) -> [u8; 32] {
        let mut msg = Self::signed_bytes(
            &self.origin_attestation,
            &self.final_node,
            self.service,
            self.epoch,
            &self.nonce,
            &self.ephemeral,
        );
        msg.extend_from_slice(&self.signature);
        crate::attestation::sha256(&msg)
    }

    /// Verifies against the pinned verifier keys and this hop's view of the stream, and
    /// returns the proven origin. Call on every hop; the final node also checks the nonce.
    pub fn verify(
        &self,
        keys: &KeySet,
        final_node: &NodeId,
        service: ServiceId,
        epoch_len: EpochLength,
        now: UnixTime,
    ) -> Result<NodeId, FlowRefusal> {
        let att = verify_attestation(&self.origin_attestation, keys, now, 5)
            .map_err(FlowRefusal::Attestation)?;
        let key = VerifyingKey::from_spki_der(&att.get().spki).ok_or(FlowRefusal::BadSignature)?;
        let msg = Self::signed_bytes(
            &self.origin_attestation,
            &self.final_node,
            self.service,
            self.epoch,
            &self.nonce,
            &self.ephemeral,
        );
        if !key.verify(&msg, &self.signature) {
            return Err(FlowRefusal::BadSignature);
        }
        if self.final_node != *final_node || self.service != service {
            return Err(FlowRefusal::WrongTarget);
        }
        if self.epoch.abs_diff(epoch_len.epoch_at(now).0) > EPOCH_WINDOW {
            return Err(FlowRefusal::EpochOutOfWindow);
        }
        Ok(att.get().node_id)
    }
}

/// Flow nonces seen recently, by epoch; older epochs are forgotten (their assertions are
/// refused by the epoch window anyway). Bounded per epoch.
#[derive(Debug, Default)]
pub struct NonceCache {
    by_epoch: BTreeMap<u64, BTreeSet<[u8; 16]>>,
}

/// Most nonces remembered per epoch; past it new flows are refused rather than memory grown.
pub const MAX_NONCES_PER_EPOCH: usize = 1 << 20;

impl NonceCache {
    /// Records `nonce` of an assertion signed in `epoch`, seen at current epoch `now`.
    /// `Err(Replayed)` if seen before (or the cache is full).
    pub fn insert(&mut self, epoch: u64, nonce: [u8; 16], now: Epoch) -> Result<(), FlowRefusal> {
        let oldest = now.0.saturating_sub(EPOCH_WINDOW + 1);
        self.by_epoch.retain(|e, _| *e >= oldest);
        if self.by_epoch.values().any(|s| s.contains(&nonce)) {
            return Err(FlowRefusal::Replayed);
        }
        let set = self.by_epoch.entry(epoch).or_default();
        if set.len() >= MAX_NONCES_PER_EPOCH {
            return Err(FlowRefusal::Replayed);
        }
        set.insert(nonce);
        Ok(())
    }
}

impl StreamHeader {
    /// Encodes the header body (no length prefix: the token carries the length).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        crate::wire::encode_capped(self, HEADER_CAP)
    }

    /// Decodes a header body of exactly the announced length.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        crate::wire::decode_canonical(bytes, HEADER_CAP)
    }
}

/// The one status byte the serving node writes back after trying the backend; the origin
/// node turns it into the SOCKS reply, so apps get a true REP code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStatus {
    /// Backend connected; data follows.
    Connected,
    /// Policy refused the stream (never sent for token refusals: those reset the stream).
    NotAllowed,
    /// The backend could not be reached (resolution failed, no route).
    HostUnreachable,
    /// The backend refused the connection.
    ConnectionRefused,
    /// The backend connect timed out.
    TimedOut,
    /// Anything else.
    GeneralFailure,
}

impl StreamStatus {
    /// The byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Connected => 0,
            Self::GeneralFailure => 1,
            Self::NotAllowed => 2,
            Self::HostUnreachable => 4,
            Self::ConnectionRefused => 5,
            Self::TimedOut => 6,
        }
    }

    /// Parses the byte; unknown values are a general failure, never a success.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Connected,
            2 => Self::NotAllowed,
            4 => Self::HostUnreachable,
            5 => Self::ConnectionRefused,
            6 => Self::TimedOut,
            _ => Self::GeneralFailure,
        }
    }

    /// The SOCKS5 reply for this status: the single place the mapping is made.
    pub fn socks_reply(self) -> Reply {
        match self {
            Self::Connected => Reply::Succeeded,
            Self::NotAllowed => Reply::NotAllowed,
            Self::HostUnreachable => Reply::HostUnreachable,
            Self::ConnectionRefused => Reply::ConnectionRefused,
            Self::TimedOut => Reply::TtlExpired,
            Self::GeneralFailure => Reply::GeneralFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_message_golden_bytes() {
        let hello = PeerMessage::Hello {
            attestation: BoundedVec::new(vec![0xAA, 0xBB]).expect("fits"),
        };
        let frame = hello.to_frame().expect("encode");
        assert_eq!(frame, [0, 0, 0, 5, 1, 0, 2, 0xAA, 0xBB]);
        assert_eq!(
            PeerMessage::from_frame(&frame),
            Ok(Some((hello, frame.len())))
        );
        let bye = PeerMessage::Goodbye {
            reason: GoodbyeReason::AttestationExpired,
        };
        assert_eq!(bye.to_frame().expect("encode"), [0, 0, 0, 3, 1, 2, 1]);
    }

    #[test]
    fn unknown_tags_are_refused() {
        assert!(matches!(
            PeerMessage::from_frame(&[0, 0, 0, 2, 1, 3]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            PeerMessage::from_frame(&[0, 0, 0, 3, 1, 2, 9]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn stream_header_golden_bytes() {
        let h = StreamHeader {
            origin: NodeId::from_bytes([1; 32]),
            service: ServiceId::from_u64(0x0102),
            route: BoundedVec::empty(),
            assertion: None,
        };
        let bytes = h.encode().expect("encode");
        let mut want = vec![1u8; 32];
        want.extend_from_slice(&[0x82, 0x02, 0, 0]);
        assert_eq!(bytes, want);
        assert_eq!(StreamHeader::decode(&bytes), Ok(h));
        assert!(StreamHeader::decode(&bytes[..34]).is_err());
    }

    #[test]
    fn flow_assertions_prove_the_origin_and_are_single_use() {
        use crate::attestation::{ATTESTATION_VERSION, Attestation};
        use crate::ids::{Measurement, NodeName, SegmentName};
        use crate::secret::SigningSeed;
        let verifier = SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]));
        let origin_key = SigningKey::from_seed(&SigningSeed::from_bytes([2; 32]));
        let spki = origin_key.verifying_key().to_spki_der();
        let now = UnixTime::from_secs(1_800_000_000);
        let att = Attestation {
            version: ATTESTATION_VERSION,
            node_id: NodeId::from_spki(&spki),
            spki: BoundedVec::new(spki.clone()).expect("fits"),
            name: NodeName::new("a").expect("n"),
            segments: BoundedVec::new(vec![SegmentName::new("s").expect("s")]).expect("fits"),
            measurement: Measurement([0; 32]),
            serial: 1,
            not_before: now.minus(10),
            not_after: now.plus(300),
            verifier_key_id: verifier.key_id(),
        }
        .sign(&verifier)
        .expect("sign");
        let keys = KeySet::new(vec![verifier.verifying_key()]).expect("keys");
        let (t, s) = (NodeId::from_bytes([9; 32]), ServiceId::from_u64(5));
        let e = EpochLength::DEFAULT;
        let fa = FlowAssertion::sign(&origin_key, &att, t, s, e.epoch_at(now), [7; 16], [4; 32])
            .expect("sign");
        assert_eq!(
            fa.verify(&keys, &t, s, e, now),
            Ok(NodeId::from_spki(&spki))
        );
        assert_eq!(
            fa.verify(&keys, &NodeId::from_bytes([8; 32]), s, e, now),
            Err(FlowRefusal::WrongTarget)
        );
        assert_eq!(
            fa.verify(&keys, &t, ServiceId::from_u64(6), e, now),
            Err(FlowRefusal::WrongTarget)
        );
        assert_eq!(
            fa.verify(&keys, &t, s, e, now.plus(25)),
            Err(FlowRefusal::EpochOutOfWindow)
        );
        let mut forged = fa.clone();
        forged.service = ServiceId::from_u64(6);
        assert_eq!(
            forged.verify(&keys, &t, ServiceId::from_u64(6), e, now),
            Err(FlowRefusal::BadSignature)
        );
        // A relay's own key cannot sign for the origin.
        let relay_key = SigningKey::from_seed(&SigningSeed::from_bytes([3; 32]));
        let stolen = FlowAssertion::sign(&relay_key, &att, t, s, e.epoch_at(now), [8; 16], [4; 32])
            .expect("sign");
        assert_eq!(
            stolen.verify(&keys, &t, s, e, now),
            Err(FlowRefusal::BadSignature)
        );
        // Nonces are single use.
        let mut cache = NonceCache::default();
        assert_eq!(cache.insert(fa.epoch, fa.nonce, e.epoch_at(now)), Ok(()));
        assert_eq!(
            cache.insert(fa.epoch, fa.nonce, e.epoch_at(now)),
            Err(FlowRefusal::Replayed)
        );
        let h = StreamHeader {
            origin: NodeId::from_spki(&spki),
            service: s,
            route: BoundedVec::empty(),
            assertion: Some(fa),
        };
        assert_eq!(StreamHeader::decode(&h.encode().expect("encode")), Ok(h));
    }

    #[test]
    fn status_bytes_map_to_socks_replies() {
        for b in 0..=255u8 {
            let s = StreamStatus::from_byte(b);
            if s != StreamStatus::GeneralFailure {
                assert_eq!(s.to_byte(), b);
            }
            // Only byte 0 may ever become a SOCKS success.
            assert_eq!(s.socks_reply() == Reply::Succeeded, b == 0, "byte {b}");
        }
    }
}
