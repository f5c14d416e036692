//! Messages between a node and the verifier (ALPN `hopmesh-verifier/1`).
//!
//! The node opens one bidirectional stream per request and writes one [`NodeRequest`]
//! frame; the verifier answers with one [`VerifierResponse`] frame. A `Subscribe` request
//! keeps its stream open and the verifier writes [`Push`] frames on it for as long as the
//! connection lives.
//!
//! The node is identified by the key its TLS handshake proved (never by a field here). Key
//! possession on refresh is proven by that handshake: the TLS 1.3 `CertificateVerify` is the
//! node's signature over a transcript that includes the verifier's fresh random, so a separate
//! application-level nonce signature would prove nothing more.

use serde::{Deserialize, Serialize};

use crate::control::MAX_ENVELOPE;
use crate::frame::CONTROL_CAP;
use crate::hop_token::{Generation, GenerationGrant};
use crate::ids::{Measurement, NodeId, NodeName};
use crate::secret::JoinSecret;
use crate::table_sync::TablePart;
use crate::wire::{BoundedString, BoundedVec};

/// Cap on request and response frames.
pub const REQUEST_CAP: usize = CONTROL_CAP;
/// Cap on push frames: a revocation list can be large, and a routing table comes in parts of
/// [`crate::table_sync::TABLE_PART_BYTES`] (with no ceiling of this cap on the whole table).
/// The collections inside a push are bounded by this cap (the decoder allocates at most in
/// proportion to the input), and pushes come only from the pinned verifier.
pub const PUSH_CAP: usize = 64 * 1024;
/// Most addresses a node advertises.
pub const MAX_ADDRESSES: usize = 4;
/// Longest advertised address (`host:port`, host a DNS name or IP).
pub const MAX_ADDRESS_LEN: usize = 261;

/// An advertised `host:port` where peers can reach a node.
pub type Address = BoundedString<MAX_ADDRESS_LEN>;

/// Informational facts a node reports about its host (audited, not trusted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Host name.
    pub hostname: BoundedString<253>,
    /// OS and architecture, e.g. `linux/x86_64`.
    pub platform: BoundedString<64>,
    /// Node software version.
    pub version: BoundedString<32>,
}

/// A node's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// First contact: trade a one-time join secret for an attestation of the TLS key.
    Enroll {
        /// The operator-issued secret.
        join_secret: JoinSecret,
        /// SHA-256 of the node executable.
        measurement: Measurement,
        /// Host facts.
        facts: HostFacts,
        /// Where peers can reach this node.
        addresses: BoundedVec<Address, MAX_ADDRESSES>,
    },
    /// Renew the attestation of an enrolled key; re-measures.
    Refresh {
        /// SHA-256 of the node executable, measured again.
        measurement: Measurement,
        /// Where peers can reach this node now.
        addresses: BoundedVec<Address, MAX_ADDRESSES>,
    },
    /// Open the push stream.
    Subscribe,
    /// Report a security event seen on the data plane.
    Report(Report),
}

/// What a node saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportKind {
    /// A token with a valid MAC under a compromised generation.
    CompromisedKeyUse,
    /// A connection passed the forged-token limit.
    ForgedTokens,
    /// A peer's token claimed another node as its source.
    Impersonation,
}

impl ReportKind {
    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CompromisedKeyUse => "compromised_key_use",
            Self::ForgedTokens => "forged_tokens",
            Self::Impersonation => "impersonation",
        }
    }
}

/// A security report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// What happened.
    pub kind: ReportKind,
    /// The peer (TLS-authenticated) that did it.
    pub peer: NodeId,
    /// The generation involved, if any.
    pub generation: Option<Generation>,
    /// Free text for the audit log.
    pub detail: BoundedString<256>,
}

/// Why the verifier refused a request. Coarse on purpose: the precise reason is in the
/// verifier's audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The join secret is unknown, used or expired.
    #[error("join secret refused (unknown, already used or expired)")]
    JoinSecret,
    /// The measurement is not on the allowlist.
    #[error("binary measurement not allowed by policy")]
    Measurement,
    /// The key or name is revoked or banned.
    #[error("node is revoked or banned")]
    Revoked,
    /// The key is not enrolled.
    #[error("node is not enrolled")]
    NotEnrolled,
    /// The name is not in policy, or its segments disagree with the join secret.
    #[error("node name not in policy or segments mismatch")]
    NotInPolicy,
    /// The name is already enrolled with another live key.
    #[error("name already enrolled with another key")]
    NameTaken,
    /// The request was malformed.
    #[error("bad request")]
    BadRequest,
    /// The verifier failed internally; retry later.
    #[error("verifier internal error")]
    Internal,
}

/// The verifier's answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifierResponse {
    /// A fresh attestation envelope.
    Attested {
        /// Signed envelope.
        attestation: BoundedVec<u8, MAX_ENVELOPE>,
    },
    /// The request was refused.
    Refused(Refusal),
    /// Accepted (reports, subscribe).
    Ack,
}

/// Mesh-wide parameters every node must share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshConfig {
    /// Epoch length `E` in seconds.
    pub epoch_secs: u64,
    /// Pair-seed generation length in seconds.
    pub generation_secs: u64,
    /// Mesh-name suffix.
    pub suffix: BoundedString<253>,
}

/// How to reach a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer.
    pub node_id: NodeId,
    /// Its name.
    pub name: NodeName,
    /// Its advertised addresses.
    pub addresses: BoundedVec<Address, MAX_ADDRESSES>,
}

/// A message on the push stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// Mesh parameters (first push).
    Config(MeshConfig),
    /// One part of an update of this node's routing table and peers: a snapshot or a delta
    /// against the version the node holds, cut into parts of
    /// [`crate::table_sync::TABLE_PART_BYTES`] ([`crate::table_sync`]). The parts of one
    /// update are sent in order, never interleaved with another update's.
    TablePart(TablePart),
    /// Seed generations for the pair with `peer`.
    Seeds {
        /// The peer.
        peer: NodeId,
        /// Generations (current and next, or a reissue).
        grants: BoundedVec<GenerationGrant, 4>,
    },
    /// Generations of the pair with `peer` that must now be treated as compromised.
    Compromised {
        /// The peer.
        peer: NodeId,
        /// Generations.
        generations: BoundedVec<Generation, 16>,
    },
    /// The current signed revocation list.
    Revocations {
        /// Signed envelope.
        list: BoundedVec<
            u8,
            {
                crate::attestation::ENVELOPE_HEADER_LEN + crate::attestation::MAX_REVOCATION_PAYLOAD
            },
        >,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};
    use crate::secret::PairSeed;
    use crate::time::UnixTime;

    fn round_trip<T>(v: &T, cap: usize) -> Vec<u8>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Clone,
    {
        let f = encode_frame(v, cap).expect("encode");
        assert_eq!(decode_frame::<T>(&f, cap), Ok(Some((v.clone(), f.len()))));
        f
    }

    #[test]
    fn requests_golden_and_round_trip() {
        let enroll = NodeRequest::Enroll {
            join_secret: JoinSecret::from_bytes([1; 32]),
            measurement: Measurement([2; 32]),
            facts: HostFacts {
                hostname: BoundedString::truncated("h"),
                platform: BoundedString::truncated("linux/x86_64"),
                version: BoundedString::truncated("0.1.0"),
            },
            addresses: BoundedVec::new(vec![BoundedString::truncated("127.0.0.1:4433")])
                .expect("fits"),
        };
        let f = round_trip(&enroll, REQUEST_CAP);
        assert_eq!(
            &f[4..7],
            &[1, 0, 1],
            "version byte, Enroll tag, first secret byte"
        );
        assert_eq!(
            round_trip(&NodeRequest::Subscribe, REQUEST_CAP),
            [0, 0, 0, 2, 1, 2]
        );
        let report = NodeRequest::Report(Report {
            kind: ReportKind::CompromisedKeyUse,
            peer: NodeId::from_bytes([3; 32]),
            generation: Some(Generation(5)),
            detail: BoundedString::truncated("x"),
        });
        round_trip(&report, REQUEST_CAP);
        assert_eq!(
            round_trip(&VerifierResponse::Refused(Refusal::Revoked), REQUEST_CAP),
            [0, 0, 0, 3, 1, 1, 2]
        );
        assert_eq!(
            round_trip(&VerifierResponse::Ack, REQUEST_CAP),
            [0, 0, 0, 2, 1, 2]
        );
    }

    #[test]
    fn pushes_round_trip() {
        round_trip(
            &Push::Config(MeshConfig {
                epoch_secs: 10,
                generation_secs: 300,
                suffix: BoundedString::truncated("mesh"),
            }),
            PUSH_CAP,
        );
        round_trip(
            &Push::Seeds {
                peer: NodeId::from_bytes([4; 32]),
                grants: BoundedVec::new(vec![GenerationGrant {
                    generation: Generation(9),
                    seed: PairSeed::from_bytes([5; 32]),
                    valid_from: UnixTime::from_secs(1),
                    valid_until: UnixTime::from_secs(2),
                }])
                .expect("fits"),
            },
            PUSH_CAP,
        );
    }

    #[test]
    fn table_part_golden_bytes_and_a_full_part_fits_a_push_frame() {
        let part = Push::TablePart(TablePart {
            version: 5,
            part: 1,
            parts: 3,
            bytes: BoundedVec::new(vec![0xAA, 0xBB]).expect("fits"),
        });
        assert_eq!(
            round_trip(&part, PUSH_CAP),
            [0, 0, 0, 8, 1, 1, 5, 1, 3, 2, 0xAA, 0xBB],
            "length, frame version, TablePart tag, version, part, parts, byte count, bytes"
        );
        // The largest part (every varint at its longest) still fits one push frame.
        let full = Push::TablePart(TablePart {
            version: u64::MAX,
            part: u32::MAX,
            parts: u32::MAX,
            bytes: BoundedVec::new(vec![0xFF; crate::table_sync::TABLE_PART_BYTES]).expect("fits"),
        });
        assert!(round_trip(&full, PUSH_CAP).len() < PUSH_CAP);
    }

    #[test]
    fn oversized_fields_are_refused() {
        let mut bytes = vec![0u8, 0]; // Refresh tag, then measurement...
        bytes[0] = 1;
        bytes.truncate(1);
        bytes.extend_from_slice(&[7; 32]);
        bytes.push(5); // five addresses: over MAX_ADDRESSES
        bytes.extend(std::iter::repeat_n([1u8, b'a'], 5).flatten());
        assert!(crate::wire::decode_canonical::<NodeRequest>(&bytes, REQUEST_CAP).is_err());
        bytes[33] = 4;
        bytes.truncate(34 + 8);
        assert!(crate::wire::decode_canonical::<NodeRequest>(&bytes, REQUEST_CAP).is_ok());
    }
}
