//! Identifiers: node ids, service ids, verifier key ids and validated names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

/// A node's identity: `SHA-256(SPKI DER)` of its Ed25519 key (docs/design.md, "Identity, enrolment, attestation").
///
/// It is computed from the key the TLS handshake authenticated, never taken from a field a
/// peer wrote.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// The id of the node whose public key is `spki_der` (a DER SubjectPublicKeyInfo).
    pub fn from_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// Wraps raw id bytes (as read from the wire).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex digits, for logs read by people.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = NameError;

    /// Parses 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| NameError::BadNodeId)?;
        Ok(Self(out))
    }
}

/// The id of a service: the first 8 bytes of `SHA-256("hopmesh/service/v1" ‖ segment ‖ 0 ‖
/// service)`, big-endian.
///
/// Derived rather than allocated so that it is stable across policy reloads and verifier
/// restarts with nothing stored; policy compilation refuses a (astronomically unlikely)
/// collision.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceId(u64);

impl ServiceId {
    const LABEL: &'static [u8] = b"hopmesh/service/v1";

    /// The id of service `service` in segment `segment`.
    pub fn derive(segment: &SegmentName, service: &ServiceName) -> Self {
        let digest = Sha256::new()
            .chain_update(Self::LABEL)
            .chain_update(segment.as_str())
            .chain_update([0u8])
            .chain_update(service.as_str())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self(u64::from_be_bytes(first))
    }

    /// Wraps a raw id (as read from the wire).
    pub const fn from_u64(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw id.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceId({:016x})", self.0)
    }
}

/// The id of a verifier signing key: the first 8 bytes of `SHA-256(public key)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of the Ed25519 public key `public_key`.
    pub fn of_public_key(public_key: &[u8]) -> Self {
        let digest = Sha256::digest(public_key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// SHA-256 of a node's executable, as measured at enrollment and refresh.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Measurement(pub [u8; 32]);

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Measurement({})", hex::encode(&self.0[..4]))
    }
}

impl FromStr for Measurement {
    type Err = NameError;

    /// Parses 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| NameError::BadMeasurement)?;
        Ok(Self(out))
    }
}

/// Why a name or id string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Names are 1 to 63 characters.
    #[error("name must be 1 to 63 characters, got {0}")]
    Length(usize),
    /// Names use lowercase ASCII letters, digits and inner hyphens only (a DNS label).
    #[error("name `{0}` may only contain a-z, 0-9 and inner '-' (a DNS label)")]
    Charset(String),
    /// A node id is 64 hex digits.
    #[error("node id must be 64 hex digits")]
    BadNodeId,
    /// A measurement is 64 hex digits.
    #[error("measurement must be 64 hex digits (SHA-256)")]
    BadMeasurement,
}

/// Longest name: one DNS label (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 63;

fn check_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(NameError::Length(s.len()));
    }
    let bytes = s.as_bytes();
    let good_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    if !bytes.iter().all(good_char) || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(NameError::Charset(s.to_owned()));
    }
    Ok(())
}

/// Declares a name newtype that can only hold a valid DNS label, also when deserialized.
macro_rules! label_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks `s` and wraps it.
            pub fn new(s: &str) -> Result<Self, NameError> {
                check_label(s)?;
                Ok(Self(s.to_owned()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A segment name, e.g. `payments`.
    SegmentName
);
label_type!(
    /// A service name within a segment, e.g. `api`.
    ServiceName
);
label_type!(
    /// A node's name, bound to its key at enrollment.
    NodeName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_sha256_of_spki() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let id = NodeId::from_spki(b"abc");
        assert_eq!(
            id.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.short(), "ba7816bf");
        assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        assert_eq!("zz".parse::<NodeId>(), Err(NameError::BadNodeId));
    }

    #[test]
    fn service_id_is_stable_and_distinct() {
        let seg = SegmentName::new("payments").expect("valid");
        let api = ServiceId::derive(&seg, &ServiceName::new("api").expect("valid"));
        let web = ServiceId::derive(&seg, &ServiceName::new("web").expect("valid"));
        assert_ne!(api, web);
        // Golden value: changing the derivation breaks every deployed routing table.
        assert_eq!(api.to_string(), golden_service_id());
        // The separator keeps ("ab","c") and ("a","bc") apart.
        let x = ServiceId::derive(
            &SegmentName::new("ab").expect("valid"),
            &ServiceName::new("c").expect("valid"),
        );
        let y = ServiceId::derive(
            &SegmentName::new("a").expect("valid"),
            &ServiceName::new("bc").expect("valid"),
        );
        assert_ne!(x, y);
    }

    fn golden_service_id() -> String {
        let digest = Sha256::new()
            .chain_update(b"hopmesh/service/v1payments\0api")
            .finalize();
        hex::encode(&digest[..8])
    }

    #[test]
    fn labels_are_dns_labels() {
        for good in ["a", "payments", "web-1", "0", &"x".repeat(63)] {
            assert!(SegmentName::new(good).is_ok(), "{good}");
        }
        assert_eq!(SegmentName::new(""), Err(NameError::Length(0)));
        assert_eq!(
            SegmentName::new(&"x".repeat(64)),
            Err(NameError::Length(64))
        );
        for bad in ["-a", "a-", "A", "a.b", "a b", "é", "a_b"] {
            assert!(
                matches!(SegmentName::new(bad), Err(NameError::Charset(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn labels_are_checked_when_deserialized() {
        let ok: ServiceName = postcard::from_bytes(&[3, b'a', b'p', b'i']).expect("valid");
        assert_eq!(ok.as_str(), "api");
        assert!(postcard::from_bytes::<ServiceName>(&[3, b'A', b'P', b'I']).is_err());
        assert!(postcard::from_bytes::<ServiceName>(&[0]).is_err());
    }

    #[test]
    fn key_id_is_prefix_of_sha256() {
        let id = KeyId::of_public_key(b"abc");
        assert_eq!(id.to_string(), "ba7816bf8f01cfea");
    }
}
