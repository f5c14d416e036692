//! Attestation issuance: the signing key and the block of reserved serials.

use hopmesh_protocol::attestation::{
    ATTESTATION_BACKDATE, ATTESTATION_VERSION, Attestation, SigningKey,
};
use hopmesh_protocol::ids::SegmentName;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;

use super::refusals::AdminError;
use crate::store::{NodeRecord, Store, StoreError};

/// Attestation serials reserved per store commit at most (a shared store reserves one).
pub const SERIAL_BLOCK: u64 = 1024;

/// Signs attestations (and, through [`key`](Self::key), revocation lists).
pub(super) struct Issuer {
    signing: SigningKey,
    /// Reserved serials: next, end (exclusive).
    serials: (u64, u64),
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("serials", &self.serials)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// No serials reserved yet.
    pub(super) fn new(signing: SigningKey) -> Self {
        Self {
            signing,
            serials: (0, 0),
        }
    }

    pub(super) fn key(&self) -> &SigningKey {
        &self.signing
    }

    fn next_serial(&mut self, store: &mut dyn Store) -> Result<u64, StoreError> {
        if self.serials.0 >= self.serials.1 {
            // A shared store hands out one at a time (`Store::serial_block`).
            let n = store.serial_block().clamp(1, SERIAL_BLOCK);
            let first = store.reserve_serials(n)?;
            self.serials = (first, first + n);
        }
        let s = self.serials.0;
        self.serials.0 += 1;
        Ok(s)
    }

    /// Signs an attestation of `rec` with `segments`, valid from `now` for `ttl` seconds.
    pub(super) fn attest(
        &mut self,
        rec: &NodeRecord,
        segments: Vec<SegmentName>,
        ttl: u64,
        store: &mut dyn Store,
        now: UnixTime,
    ) -> Result<Vec<u8>, AdminError> {
        // A verifier that lost a shared store's serve lock issues nothing (fencing).
        store.check_serving()?;
        let attestation = Attestation {
            version: ATTESTATION_VERSION,
            node_id: rec.node_id,
            spki: BoundedVec::new(rec.spki.clone())
                .map_err(|e| AdminError::Internal(e.to_string()))?,
            name: rec.name.clone(),
            segments: BoundedVec::new(segments).map_err(|e| AdminError::Internal(e.to_string()))?,
            measurement: rec.measurement,
            serial: self.next_serial(store)?,
            // Backdated: a node whose clock is a little behind ours can use it at once.
            not_before: now.minus(ATTESTATION_BACKDATE),
            not_after: now.plus(ttl),
            verifier_key_id: self.signing.key_id(),
        };
        attestation
            .sign(&self.signing)
            .map_err(|e| AdminError::Internal(e.to_string()))
    }
}
