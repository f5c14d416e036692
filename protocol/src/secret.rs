//! Secret byte strings: redacted in `Debug`, zeroized on drop, compared in constant time.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Declares a fixed-size secret newtype. Each secret gets its own type so a pair seed
/// can never be passed where an epoch key is expected.
macro_rules! secret_type {
    ($(#[$meta:meta])* $name:ident, $len:expr) => {
        $(#[$meta])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length of the secret in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw secret bytes. The caller should zeroize its own copy.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// The raw bytes; call only to feed a cryptographic primitive.
            pub fn expose(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(redacted)"))
            }
        }

        /// Constant-time: the time taken does not depend on where the bytes differ.
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <[u8; $len]>::deserialize(d).map(Self)
            }
        }
    };
}

secret_type!(
    /// A verifier-issued 32-byte seed for one node pair and generation (docs/design.md, "Key schedule").
    PairSeed,
    32
);
secret_type!(
    /// `K(a,b,g,e)`: the key for one pair, generation and epoch.
    EpochKey,
    32
);
secret_type!(
    /// `X`: 32 bytes exported from one QUIC connection's TLS session.
    ConnectionBinding,
    32
);
secret_type!(
    /// `HKDF-Extract(salt = X, ikm = K)`: the MAC key for tokens on one connection in one epoch.
    StreamKey,
    32
);
secret_type!(
    /// A one-time join secret an operator hands to a node for enrollment.
    JoinSecret,
    32
);
secret_type!(
    /// The verifier's master secret from which every pair seed is derived.
    MasterSecret,
    32
);
secret_type!(
    /// The 32-byte seed of an Ed25519 signing key.
    SigningSeed,
    32
);

/// Compares two byte strings in constant time (for equal lengths; the length itself is
/// not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let seed = PairSeed::from_bytes([0xAB; 32]);
        let shown = format!("{seed:?}");
        assert_eq!(shown, "PairSeed(redacted)");
        assert!(!shown.to_lowercase().contains("ab"));
    }

    #[test]
    fn equality_is_by_value() {
        let a = EpochKey::from_bytes([1; 32]);
        let mut other = [1; 32];
        assert_eq!(a, EpochKey::from_bytes(other));
        other[31] ^= 1;
        assert_ne!(a, EpochKey::from_bytes(other));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn zeroize_clears_bytes() {
        let mut key = StreamKey::from_bytes([9; 32]);
        key.zeroize();
        assert_eq!(key.expose(), &[0u8; 32]);
    }

    #[test]
    fn serde_round_trip_is_raw_bytes() {
        let seed = PairSeed::from_bytes([7; 32]);
        let bytes = postcard::to_allocvec(&seed).expect("encode");
        assert_eq!(bytes, vec![7u8; 32]);
        let back: PairSeed = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, seed);
    }
}
