//! Hardened postcard decoding and bounded collections (docs/design.md, "Wire hardening").
//!
//! postcard's `from_bytes` ignores trailing bytes and accepts overlong varints
//! (`[0x80, 0x00]` decodes as `0u32`), so two different byte strings can mean the same
//! message. Signed and MAC'd bytes must have exactly one encoding, so every decode here
//! goes through [`decode_canonical`]: `take_from_bytes`, an empty remainder, and
//! `encode(decode(b)) == b`. The re-encoding costs one allocation per message; control and
//! header messages are small and rare next to data, so we pay it everywhere instead of
//! reasoning per type about which bytes are signed.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why bytes were refused by a decoder of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A declared or actual length is over the cap for this kind of message; checked before
    /// anything is allocated or decoded.
    #[error("message of {len} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The cap that applies.
        cap: usize,
    },
    /// The input ended inside a fixed-size field or a frame.
    #[error("truncated input")]
    Truncated,
    /// Bytes were left after a complete message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The bytes decode, but are not the one canonical encoding of the value (e.g. an
    /// overlong varint).
    #[error("non-canonical encoding")]
    NonCanonical,
    /// The version byte outside the payload is not one this build speaks.
    #[error("unsupported version {0}")]
    UnknownVersion(u8),
    /// A frame declared a zero length, which cannot even hold the version byte.
    #[error("empty frame")]
    EmptyFrame,
    /// postcard rejected the payload (bad tag, bad UTF-8, bounded collection overflow...).
    #[error("malformed payload: {0}")]
    Malformed(String),
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed the cap its receiver enforces.
    #[error("encoded message of {len} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The cap that applies.
        cap: usize,
    },
    /// postcard failed to serialize the value.
    #[error("serialization failed: {0}")]
    Serialize(String),
}

/// Encodes `value` with postcard, refusing results over `cap` bytes.
pub fn encode_capped<T: Serialize>(value: &T, cap: usize) -> Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_allocvec(value).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if bytes.len() > cap {
        return Err(EncodeError::TooLarge {
            len: bytes.len(),
            cap,
        });
    }
    Ok(bytes)
}

/// Decodes exactly one `T` from all of `bytes`, which must be at most `cap` long and be
/// the canonical encoding of the value.
pub fn decode_canonical<T>(bytes: &[u8], cap: usize) -> Result<T, DecodeError>
where
    T: Serialize + DeserializeOwned,
{
    if bytes.len() > cap {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            cap,
        });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(map_postcard)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    let again = postcard::to_allocvec(&value).map_err(|_| DecodeError::NonCanonical)?;
    if again != bytes {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

fn map_postcard(e: postcard::Error) -> DecodeError {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        other => DecodeError::Malformed(other.to_string()),
    }
}

/// A `Vec<T>` that holds at most `N` elements, also when deserialized: a peer cannot make
/// the decoder build a longer one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

/// A collection was given more elements than its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many elements: {len} > {max}")]
pub struct TooMany {
    /// Elements offered.
    pub len: usize,
    /// The bound.
    pub max: usize,
}

impl<T, const N: usize> BoundedVec<T, N> {
    /// The bound.
    pub const MAX: usize = N;

    /// Wraps `items` if there are at most `N`.
    pub fn new(items: Vec<T>) -> Result<Self, TooMany> {
        if items.len() > N {
            return Err(TooMany {
                len: items.len(),
                max: N,
            });
        }
        Ok(Self(items))
    }

    /// An empty collection.
    pub const fn empty() -> Self {
        Self(Vec::new())
    }

    /// The elements as a plain vector.
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }
}

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<T, const N: usize> Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<T, const N: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for BoundedVisitor<T, N> {
            type Value = BoundedVec<T, N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} elements")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // Checked before allocating: the declared length is the peer's word.
                if let Some(len) = seq.size_hint().filter(|len| *len > N) {
                    return Err(serde::de::Error::invalid_length(len, &self));
                }
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N));
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(serde::de::Error::invalid_length(N + 1, &self));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }

        d.deserialize_seq(BoundedVisitor::<T, N>(PhantomData))
    }
}

/// A UTF-8 string of at most `N` bytes, also when deserialized.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BoundedString<const N: usize>(String);

impl<const N: usize> BoundedString<N> {
    /// Wraps `s` if it is at most `N` bytes.
    pub fn new(s: &str) -> Result<Self, TooMany> {
        if s.len() > N {
            return Err(TooMany {
                len: s.len(),
                max: N,
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// `s` cut to at most `N` bytes at a character boundary (for informational fields).
    pub fn truncated(s: &str) -> Self {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(s[..end].to_owned())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const N: usize> fmt::Display for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const N: usize> Serialize for BoundedString<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedString<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        n: u32,
        items: BoundedVec<u16, 3>,
    }

    #[test]
    fn decode_rejects_trailing_bytes_and_overlong_varints() {
        let good = [5u8, 1, 7];
        let v: Sample = decode_canonical(&good, 64).expect("good");
        assert_eq!(v.n, 5);
        assert_eq!(&*v.items, &[7]);
        assert_eq!(
            decode_canonical::<Sample>(&[5, 1, 7, 0], 64),
            Err(DecodeError::TrailingBytes(1))
        );
        // 5 as an overlong varint: postcard accepts it, we must not.
        assert_eq!(
            decode_canonical::<Sample>(&[0x85, 0x00, 1, 7], 64),
            Err(DecodeError::NonCanonical)
        );
        assert_eq!(
            decode_canonical::<Sample>(&[5, 1], 64),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_canonical::<Sample>(&good, 2),
            Err(DecodeError::TooLarge { len: 3, cap: 2 })
        );
    }

    #[test]
    fn bounded_vec_refuses_long_sequences() {
        assert!(matches!(
            decode_canonical::<Sample>(&[5, 4, 1, 2, 3, 4], 64),
            Err(DecodeError::Malformed(_))
        ));
        // A length bomb: declares 2^32-1 elements in 6 bytes; refused before allocation.
        let bomb = decode_canonical::<Sample>(&[5, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F], 64);
        // postcard itself refuses a length beyond the remaining input; either way nothing
        // was allocated for 4 billion elements.
        assert!(
            matches!(
                bomb,
                Err(DecodeError::Truncated | DecodeError::Malformed(_))
            ),
            "{bomb:?}"
        );
        assert_eq!(
            BoundedVec::<u8, 2>::new(vec![1, 2, 3]).map(|_| ()),
            Err(TooMany { len: 3, max: 2 })
        );
    }

    #[test]
    fn bounded_string_limits() {
        assert!(BoundedString::<3>::new("abc").is_ok());
        assert_eq!(
            BoundedString::<3>::new("abcd").map(|_| ()),
            Err(TooMany { len: 4, max: 3 })
        );
        assert_eq!(BoundedString::<4>::truncated("aé€").as_str(), "aé");
        assert!(decode_canonical::<BoundedString<3>>(&[4, b'a', b'b', b'c', b'd'], 64).is_err());
        assert_eq!(
            decode_canonical::<BoundedString<3>>(&[2, b'h', b'i'], 64).map(|s| s.0),
            Ok("hi".to_owned())
        );
    }

    #[test]
    fn encode_respects_cap() {
        let v = Sample {
            n: 1,
            items: BoundedVec::new(vec![1, 2]).expect("fits"),
        };
        assert_eq!(encode_capped(&v, 64).expect("fits"), vec![1, 2, 1, 2]);
        assert_eq!(
            encode_capped(&v, 3),
            Err(EncodeError::TooLarge { len: 4, cap: 3 })
        );
    }
}
