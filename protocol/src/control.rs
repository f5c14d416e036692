//! Control-stream messages between peers, and the request header that follows a hop token.
//!
//! Every type here travels inside a [`crate::frame`] and is decoded canonically. Enum tags
//! are postcard varints; new variants are only ever appended so older peers refuse them as
//! malformed instead of misreading them.

use serde::{Deserialize, Serialize};

use crate::attestation::{ENVELOPE_HEADER_LEN, MAX_ATTESTATION_PAYLOAD};
use crate::frame::{CONTROL_CAP, HEADER_CAP};
use crate::ids::{NodeId, ServiceId};
use crate::socks5::Reply;
use crate::wire::{BoundedVec, DecodeError, EncodeError};

/// Largest attestation envelope carried in a control message.
pub const MAX_ENVELOPE: usize = ENVELOPE_HEADER_LEN + MAX_ATTESTATION_PAYLOAD;
/// Longest relay path a stream may take (origin and final node excluded).
pub const MAX_RELAY_HOPS: usize = 4;

/// A message on the control stream of a peer connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message each side sends: its current attestation envelope. The dialer treats the
    /// connection as accepted only once the acceptor's `Hello` arrived (DESIGN.md pitfall 1).
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
        };
        let bytes = h.encode().expect("encode");
        let mut want = vec![1u8; 32];
        want.extend_from_slice(&[0x82, 0x02, 0]);
        assert_eq!(bytes, want);
        assert_eq!(StreamHeader::decode(&bytes), Ok(h));
        assert!(StreamHeader::decode(&bytes[..34]).is_err());
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
