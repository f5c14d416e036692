//! A store wrapper that counts failed calls in `store_failures{kind}`, whatever the backend.

use std::sync::Arc;

use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::SignedHead;

use super::{
    BanSubject, Change, JoinTokenRecord, JoinTokenUse, NodeRecord, PairState, Store, StoreError,
    StoredList,
};
use crate::metrics::Metrics;

/// `inner`, each failure counted.
#[derive(Debug)]
pub struct Counted {
    inner: Box<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Counted {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn count<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r {
            let kind = failure_kind(e);
            self.metrics
                .store_failures
                .get_or_create(&[("kind", kind)])
                .inc();
        }
        r
    }
}

/// The `kind` label of a failure.
pub fn failure_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Timeout(_) => "timeout",
        StoreError::Postgres(_) => "postgres",
        StoreError::Sqlite(_) => "sqlite",
        StoreError::StaleVersion { .. } => "stale_version",
        StoreError::Fenced(_) => "fenced",
        _ => "other",
    }
}

impl Store for Counted {
    fn put_join_token(&mut self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        let r = self.inner.put_join_token(t);
        self.count(r)
    }
    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<JoinTokenUse, StoreError> {
        let r = self.inner.take_join_token(secret_hash, now);
        self.count(r)
    }
    fn put_node(&mut self, n: &NodeRecord) -> Result<(), StoreError> {
        let r = self.inner.put_node(n);
        self.count(r)
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.count(self.inner.nodes())
    }
    fn bans(&self) -> Result<Vec<BanSubject>, StoreError> {
        self.count(self.inner.bans())
    }
    fn put_bans(
        &mut self,
        bans: &[BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        let r = self.inner.put_bans(bans, reason, at);
        self.count(r)
    }
    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[BanSubject],
        list: &StoredList,
    ) -> Result<(), StoreError> {
        let r = self.inner.commit_revocation(node, at, bans, list);
        self.count(r)
    }
    fn revocation_list(&self) -> Result<Option<StoredList>, StoreError> {
        self.count(self.inner.revocation_list())
    }
    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), StoreError> {
        let r = self.inner.put_revocation_list(list);
        self.count(r)
    }
    fn reserve_serials(&mut self, n: u64) -> Result<u64, StoreError> {
        let r = self.inner.reserve_serials(n);
        self.count(r)
    }
    fn pair_states(&self) -> Result<Vec<PairState>, StoreError> {
        self.count(self.inner.pair_states())
    }
    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), StoreError> {
        let r = self.inner.commit_reissue(pair, reissues, compromised, at);
        self.count(r)
    }
    fn put_audit_anchor(&mut self, anchor: &SignedHead) -> Result<(), StoreError> {
        let r = self.inner.put_audit_anchor(anchor);
        self.count(r)
    }
    fn audit_anchor(&self) -> Result<Option<SignedHead>, StoreError> {
        self.count(self.inner.audit_anchor())
    }
    fn check_serving(&mut self) -> Result<(), StoreError> {
        let r = self.inner.check_serving();
        self.count(r)
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    fn serial_block(&self) -> u64 {
        self.inner.serial_block()
    }
    fn change_head(&self) -> Result<u64, StoreError> {
        self.count(self.inner.change_head())
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.count(self.inner.changes_since(after, limit))
    }
    fn feed_current(&mut self) {
        self.inner.feed_current();
    }
    fn relock(&mut self) -> Result<(), StoreError> {
        let r = self.inner.relock();
        self.count(r)
    }
    fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.change_signal()
    }
    fn policy(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.count(self.inner.policy())
    }
    fn put_policy(&mut self, text: &str) -> Result<u64, StoreError> {
        let r = self.inner.put_policy(text);
        self.count(r)
    }
    fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.count(self.inner.node(id))
    }
    fn pair_state(&self, pair: &PairIds) -> Result<Option<PairState>, StoreError> {
        self.count(self.inner.pair_state(pair))
    }
}
