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

/// The current list, if one was ever signed.
#[derive(Debug, Default)]
pub(super) struct Revocations {
    current: Option<SignedList>,
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
