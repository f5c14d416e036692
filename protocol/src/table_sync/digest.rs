//! The digest of a table: what the node checks its table against after every update.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::entry::{Entries, TableEntry};

/// Domain separation of an entry's hash.
const ENTRY_DOMAIN: &[u8] = b"hopmesh/table-entry/v1\0";

/// The digest of a table: the sum modulo 2^256 of `SHA-256(domain || postcard(entry))` over
/// its entries (the 32 bytes little-endian).
///
/// A sum, not one hash over the sorted entries, so that it is incremental: a delta of `k`
/// changes costs `k` entry hashes at the verifier and the node, not a rehash of the whole
/// table (2 000 peers change on one enrolment in a 2 000-node segment). Entries are keyed
/// (one per key), so the sum is over a set. It is a consistency check between the verifier
/// and the node (the push stream is already authenticated by TLS to the pinned verifier),
/// not a signature: it detects a lost, reordered or misapplied update.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableDigest(pub [u8; 32]);

impl TableDigest {
    /// The digest of the empty table.
    pub const EMPTY: Self = Self([0; 32]);

    /// The digest with `entry` added (it must not be in the table yet).
    #[must_use]
    pub fn with(self, entry: &TableEntry) -> Self {
        self.add(&entry_hash(entry))
    }

    /// The digest with `entry` taken out (it must be in the table).
    #[must_use]
    pub fn without(self, entry: &TableEntry) -> Self {
        self.sub(&entry_hash(entry))
    }

    fn add(self, h: &[u8; 32]) -> Self {
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let s = u16::from(self.0[i]) + u16::from(h[i]) + carry;
            out[i] = s as u8;
            carry = s >> 8;
        }
        Self(out)
    }

    fn sub(self, h: &[u8; 32]) -> Self {
        let mut out = [0u8; 32];
        let mut borrow = 0i16;
        for i in 0..32 {
            let mut d = i16::from(self.0[i]) - i16::from(h[i]) - borrow;
            borrow = 0;
            if d < 0 {
                d += 256;
                borrow = 1;
            }
            out[i] = d as u8;
        }
        Self(out)
    }
}

impl fmt::Debug for TableDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableDigest({})", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for TableDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Feeds postcard's output straight into a hasher (no buffer per entry).
struct HashFlavor(Sha256);

impl postcard::ser_flavors::Flavor for HashFlavor {
    type Output = Sha256;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.update(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.update([data]);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Sha256> {
        Ok(self.0)
    }
}

/// `SHA-256(domain || postcard(entry))`.
fn entry_hash(entry: &TableEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    // Serializing a TableEntry into a flavor that never fails cannot fail (no maps, no
    // custom errors); were it to, both ends would still hash the same bytes.
    match postcard::serialize_with_flavor(entry, HashFlavor(h.clone())) {
        Ok(done) => done.finalize().into(),
        Err(_) => h.finalize().into(),
    }
}

/// The digest of `entries`.
pub fn digest(entries: &Entries) -> TableDigest {
    entries.values().fold(TableDigest::EMPTY, |d, e| d.with(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_sub_are_inverse_with_carries() {
        let a = TableDigest([0xFF; 32]);
        let one = {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        };
        // 2^256 - 1 + 1 wraps to zero through every carry.
        assert_eq!(a.add(&one), TableDigest::EMPTY);
        assert_eq!(TableDigest::EMPTY.sub(&one), a);
        let h = entry_hash(&TableEntry::Allowed {
            service: crate::ids::ServiceId::from_u64(1),
            peer: crate::ids::NodeId::from_bytes([2; 32]),
        });
        assert_eq!(a.add(&h).sub(&h), a);
        assert_ne!(a.add(&h), a);
    }
}
