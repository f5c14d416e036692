//! The signed revocation list: the live entries, signing a new version, pruning.

use hopmesh_protocol::attestation::{
    KeySet, MAX_REVOKED, RevocationList, RevocationUpdate, RevokedNode, SigningKey,
    verify_revocation_list,
};
use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;

use super::refusals::AdminError;
use crate::store::{Store, StoreError, StoredList};

/// A signed list: what is stored and served, and what it says.
pub(super) type SignedList = (StoredList, RevocationList);

/// Seconds after a failed prune before the next attempt: each attempt is a store call under
/// the authority lock, and a database that stopped answering would otherwise be asked again
/// at every tick (100 ms), each time for a whole call bound.
pub const PRUNE_RETRY_SECS: u64 = 5;

/// The current list, if one was ever signed.
#[derive(Debug, Default)]
pub(super) struct Revocations {
    current: Option<SignedList>,
    /// No prune before this, after one failed.
    prune_retry_at: Option<UnixTime>,
}

impl Revocations {
    /// Loads the stored list, which must verify under our own key: anything else means the
    /// store was swapped or tampered with.
    pub(super) fn load(store: &dyn Store, key: &SigningKey) -> Result<Self, AdminError> {
        let Some(stored) = store.revocation_list()? else {
            return Ok(Self::default());
        };
        Ok(Self {
            current: Some(Self::verified(stored, key)?),
            prune_retry_at: None,
        })
    }

    /// A stored list, which must verify under `key` and say the version it is stored under.
    pub(super) fn verified(stored: StoredList, key: &SigningKey) -> Result<SignedList, AdminError> {
        let keys = KeySet::new(vec![key.verifying_key()])
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        match verify_revocation_list(&stored.bytes, &keys, None) {
            Ok(RevocationUpdate::Newer(list)) if list.version == stored.version => {
                Ok((stored, list))
            }
            other => Err(AdminError::Store(StoreError::BadValue(format!(
                "stored revocation list does not verify under this verifier's key: {other:?}"
            )))),
        }
    }

    /// The stored form of the current list.
    pub(super) fn stored(&self) -> Option<&StoredList> {
        self.current.as_ref().map(|(s, _)| s)
    }

    /// Entries still in force at `now`.
    pub(super) fn live(&self, now: UnixTime) -> Vec<RevokedNode> {
        self.current
            .as_ref()
            .map(|(_, l)| {
                l.revoked
                    .iter()
                    .filter(|r| r.until > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether some entry has run out at `now` (the list should be pruned).
    pub(super) fn has_expired(&self, now: UnixTime) -> bool {
        self.current
            .as_ref()
            .is_some_and(|(_, l)| l.revoked.iter().any(|r| r.until <= now))
    }

    /// Is a prune due at `now`: an entry expired, and no failed prune in the last
    /// [`PRUNE_RETRY_SECS`]?
    pub(super) fn prune_due(&self, now: UnixTime) -> bool {
        self.has_expired(now) && self.prune_retry_at.is_none_or(|at| now >= at)
    }

    /// A prune failed at `now`: the next waits [`PRUNE_RETRY_SECS`]. Returns whether this is
    /// the first failure in a row (logged; the rest are counted only).
    pub(super) fn prune_failed(&mut self, now: UnixTime) -> bool {
        let first = self.prune_retry_at.is_none();
        self.prune_retry_at = Some(now.plus(PRUNE_RETRY_SECS));
        first
    }

    /// A prune succeeded (or was not needed): the next may come at once.
    pub(super) fn prune_done(&mut self) {
        self.prune_retry_at = None;
    }

    /// Signs the next version holding `entries`.
    pub(super) fn sign(
        &self,
        entries: Vec<RevokedNode>,
        key: &SigningKey,
        now: UnixTime,
    ) -> Result<SignedList, AdminError> {
        let version = self.current.as_ref().map_or(0, |(s, _)| s.version) + 1;
        let list = RevocationList {
            version,
            issued_at: now,
            verifier_key_id: key.key_id(),
            revoked: BoundedVec::new(entries).map_err(|_| {
                AdminError::Internal(format!("more than {MAX_REVOKED} live revocations"))
            })?,
        };
        let bytes = list
            .sign(key)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        Ok((StoredList { version, bytes }, list))
    }

    /// The next version: the live entries plus `node`, revoked at `now` for `ttl` seconds
    /// (until every attestation it may hold has expired).
    pub(super) fn with_revoked(
        &self,
        node: NodeId,
        ttl: u64,
        key: &SigningKey,
        now: UnixTime,
    ) -> Result<SignedList, AdminError> {
        let mut entries = self.live(now);
        entries.push(RevokedNode {
            node_id: node,
            revoked_at: now,
            until: now.plus(ttl),
        });
        self.sign(entries, key, now)
    }

    /// The next version without the entries that ran out.
    pub(super) fn pruned(&self, key: &SigningKey, now: UnixTime) -> Result<SignedList, AdminError> {
        self.sign(self.live(now), key, now)
    }

    /// Version of the current list (0: none).
    pub(super) fn version(&self) -> u64 {
        self.stored().map_or(0, |s| s.version)
    }

    /// Applies a committed list.
    pub(super) fn install(&mut self, list: SignedList) {
        self.current = Some(list);
    }

    /// The push carrying the current list.
    pub(super) fn push(&self) -> Option<Push> {
        let (stored, _) = self.current.as_ref()?;
        BoundedVec::new(stored.bytes.clone())
            .ok()
            .map(|list| Push::Revocations { list })
    }
}

#[cfg(test)]
mod tests {
    use hopmesh_protocol::secret::SigningSeed;

    use super::*;

    #[test]
    fn a_failed_prune_waits_before_the_next_attempt_and_a_good_one_clears_the_wait() {
        let key = SigningKey::from_seed(&SigningSeed::from_bytes([5; 32]));
        let t = UnixTime::from_secs;
        let mut r = Revocations::default();
        assert!(!r.prune_due(t(1_000)), "nothing to prune without a list");
        let list = r
            .with_revoked(NodeId::from_bytes([9; 32]), 10, &key, t(1_000))
            .expect("sign");
        r.install(list);
        assert!(!r.prune_due(t(1_009)), "the entry is still in force");
        assert!(r.prune_due(t(1_010)), "the entry ran out");
        assert!(
            r.prune_failed(t(1_010)),
            "the first failure in a row is logged"
        );
        assert!(!r.prune_due(t(1_010)));
        assert!(!r.prune_due(t(1_010 + PRUNE_RETRY_SECS - 1)));
        assert!(r.prune_due(t(1_010 + PRUNE_RETRY_SECS)));
        assert!(
            !r.prune_failed(t(1_015)),
            "a second failure in a row is not logged again"
        );
        r.prune_done();
        assert!(r.prune_due(t(1_015)), "after a success no wait");
    }
}
