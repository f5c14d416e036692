//! The verifier's state and every decision it makes: enrollment, refresh, revocation, bans,
//! selective reissue, policy compilation and what to push to whom.
//!
//! IO-free apart from the [`Store`] (committed before anything is acknowledged) and the
//! audit log; the QUIC service and the admin API call in here under one lock. The store has
//! its own lock ([`SharedStore`]): an enrollment and a refresh that changed a record are
//! split in steps so their commits run outside the authority lock
//! ([`Authority::reserve_enrollment`] → commit → [`Authority::complete_enrollment`];
//! [`Authority::begin_refresh`] → commit → [`Authority::complete_refresh`]; the key is marked
//! in flight between them). Time is passed in: nothing here reads a clock.
//!
//! # Layout
//! One owner, [`Authority`], holds the store, the audit log, the metrics and five named
//! substates, each a struct with its own methods:
//! - `registry`: node records, names, bans; the pure admission decisions (join-token
//!   requests, enrollment, refresh, the measurement allowlist).
//! - `seeds`: generation slots, per-pair reissues, grants, compromised generations.
//! - `revocations`: the signed revocation list (live entries, signing, pruning).
//! - `tables`: the policy and its compiled routing tables and peer infos.
//! - `subscribers`: push channels and push delivery.
//!
//! plus `issuer` (the signing key and attestation serials). Public operations live in
//! `admission` (enroll, refresh) and `operator` (join tokens, revoke, ban, reissue, report,
//! policy reload); pushes and the periodic tick are here; the audit plumbing is `journal`.
//! Each operation runs decide → commit (store) → apply (in memory) → audit → push, except the
//! durable ones (revoke, ban, reissue, reports), whose fsynced audit record and its anchor come
//! before the commit and gate it (`journal`). Each admission decision is a
//! function returning a permit or a refusal with a precise reason; the reason is audited and
//! counted, and the node only sees a coarse [`Refusal`].

mod admission;
mod follow;
mod issuer;
mod journal;
mod operator;
mod refusals;
mod registry;
mod revocations;
mod rotation;
mod seeds;
mod settings;
mod subscribers;
mod tables;
mod views;

#[cfg(test)]
mod audit_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use hopmesh_protocol::attestation::SigningKey;
use hopmesh_protocol::enrollment::{MeshConfig, Push, Refusal};
use hopmesh_protocol::hop_token::{GenerationGrant, PairIds};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::routing::RoutingTable;
use hopmesh_protocol::secret::MasterSecret;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedString;

/// How far behind the verifier's a node's clock may run and still find a seed for its own
/// generation on a pair that formed just after a generation edge: for this long after an edge
/// (at most half a generation) a pair's grants include the previous generation too.
pub const BEHIND_CLOCK_GRACE_SECS: u64 = 60;
use hopmesh_transport::audit::AuditLog;
use tokio::sync::mpsc;

pub use self::admission::{
    Issued, PendingEnrollment, PendingRefresh, RefreshStep, commit_refresh, enroll_outside_lock,
    join_secret_hash, lock_authority, refresh_outside_lock, try_lock_authority,
};
pub use self::follow::FEED_BATCH;
pub use self::issuer::SERIAL_BLOCK;
pub use self::journal::CHECKPOINT_INTERVAL_SECS;
pub use self::operator::{PolicyReload, RELOAD_REPORTED, REVOKE_ATTEMPTS};
pub use self::refusals::{AdminError, EnrollRefusal, RefreshRefusal, ReportRefusal};
pub use self::revocations::PRUNE_RETRY_SECS;
pub use self::rotation::{
    ROTATION_BATCH, ROTATION_BATCH_PAIRS, ROTATION_OFFSET_LABEL, ROTATION_SPREAD_PERCENT, Rotated,
};
pub use self::settings::{
    ADDRESS_CHANGE_WINDOW_SECS, ADDRESS_CHANGES_PER_WINDOW, CompromiseMode, Limits,
    REPORT_WINDOW_SECS, REPORTS_PER_WINDOW, Settings,
};
pub use self::subscribers::PUSH_QUEUE;
pub use self::views::{Enrollment, NodeRef, NodeView, ReissueOutcome, RevokeOutcome};

use self::issuer::Issuer;
use self::refusals::RefusalAudit;
use self::registry::Registry;
use self::revocations::Revocations;
use self::seeds::Seeds;
use self::subscribers::Subscribers;
use self::tables::{TableChanged, Tables};
use crate::metrics::Metrics;
use crate::store::{SharedStore, Store, StoredList, lock};

/// What [`Authority::new`] is built from.
#[derive(Debug)]
pub struct Parts {
    /// Settings.
    pub settings: Settings,
    /// Attestation and revocation-list signing key.
    pub signing: SigningKey,
    /// Pair-seed master secret.
    pub master: MasterSecret,
    /// The durable store.
    pub store: Box<dyn Store>,
    /// The audit log.
    pub audit: AuditLog,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The policy.
    pub policy: Policy,
}

/// The verifier.
pub struct Authority {
    settings: Settings,
    store: SharedStore,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    issuer: Issuer,
    registry: Registry,
    seeds: Seeds,
    revocations: Revocations,
    tables: Tables,
    subscribers: Subscribers,
    /// One audit record per (node key, event, reason) and interval for repeatable refusals
    /// (`refusals.rs`).
    refusal_audit: RefusalAudit,
    /// Signed audit checkpoints (`journal.rs`).
    checkpoints: self::journal::Checkpoints,
    /// Where this verifier is in a shared store's change feed (`follow.rs`).
    feed: self::follow::Feed,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("nodes", &self.registry.len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads state from the store and compiles the policy.
    pub fn new(parts: Parts, now: UnixTime) -> Result<Self, AdminError> {
        let Parts {
            settings,
            signing,
            master,
            store,
            audit,
            metrics,
            policy,
        } = parts;
        let settings_limits = settings.limits.clone();
        // Before the state is loaded: a change committed meanwhile is applied again, never missed.
        let feed = self::follow::Feed {
            seq: store.change_head()?,
            fenced_since: None,
            failing: false,
            policy_version: 0,
            policy_synced: false,
        };
        metrics
            .feed_seq
            .set(i64::try_from(feed.seq).unwrap_or(i64::MAX));
        let registry = Registry::load(store.as_ref())?;
        let seeds = Seeds::load(master, settings.generation_secs, store.as_ref(), now)?;
        let revocations = Revocations::load(store.as_ref(), &signing)?;
        metrics
            .revocation_version
            .set(i64::try_from(revocations.version()).unwrap_or(i64::MAX));
        let tables = Tables::new(policy, &registry);
        let me = Self {
            settings,
            store: Arc::new(std::sync::Mutex::new(store)),
            audit,
            metrics,
            issuer: Issuer::new(signing),
            registry,
            seeds,
            revocations,
            tables,
            subscribers: Subscribers::default(),
            refusal_audit: RefusalAudit::new(&settings_limits, now),
            checkpoints: self::journal::Checkpoints::default(),
            feed,
        };
        Ok(me)
    }

    /// Woken when another replica wrote to a shared store; `None` on a store of its own.
    pub fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        lock(&self.store).change_signal()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Brings the tables in line with `node`'s registry record (enrolled, re-addressed,
    /// revoked) and pushes the nodes whose table changed: work proportional to the entries
    /// that change, not to the mesh (`tables.rs`).
    fn node_changed(&mut self, node: &NodeId, now: UnixTime) {
        let changed = self.tables.node_changed(&self.registry, node);
        self.push_changed(changed, now);
    }

    /// The grants (current and next generation) for a pair at `now`.
    pub fn grants(&self, pair: &PairIds, now: UnixTime) -> Vec<GenerationGrant> {
        self.seeds.grants(pair, now)
    }

    fn push(&mut self, node: &NodeId, msgs: &[Push]) {
        self.subscribers.push(node, msgs, &self.metrics);
    }

    /// Sets the `revocation_list_version` gauge after a list was installed.
    fn revocation_version_changed(&self) {
        self.metrics
            .revocation_version
            .set(i64::try_from(self.revocations.version()).unwrap_or(i64::MAX));
    }

    fn broadcast_revocations(&mut self) {
        if let Some(p) = self.revocations.push() {
            self.subscribers.broadcast(&p, &self.metrics);
        }
    }

    /// Pushes each changed node its table delta (all its parts in one `push`) and, for each
    /// pair it did not have before only, the pair's seeds (and compromised generations).
    fn push_changed(&mut self, changed: Vec<TableChanged>, now: UnixTime) {
        for c in changed {
            let mut msgs = match c.parts {
                Ok(parts) => parts,
                Err(e) => {
                    self.table_refused(&c.node, &e, now);
                    continue;
                }
            };
            for peer in &c.added_peers {
                if let Some(pair) = self.tables.allowed_pair(&c.node, peer) {
                    msgs.extend(self.seeds.pair_pushes(&pair, now));
                }
            }
            self.push(&c.node, &msgs);
        }
    }

    /// The parts of `node`'s table update, or `None` when its table cannot be sent (over a
    /// `table_sync` limit): counted in `table_refused` and audited (aggregated per node and
    /// reason), never sent cut.
    fn routes_push(&mut self, node: &NodeId, now: UnixTime) -> Option<Vec<Push>> {
        match self.tables.routes_push(node) {
            Ok(parts) => Some(parts),
            Err(e) => {
                self.table_refused(node, &e, now);
                None
            }
        }
    }

    /// A table that cannot be sent: counted in `table_refused` and audited (aggregated per
    /// node and reason).
    fn table_refused(
        &mut self,
        node: &NodeId,
        e: &hopmesh_protocol::table_sync::TableSyncError,
        now: UnixTime,
    ) {
        let reason = e.reason();
        self.metrics
            .table_refused
            .get_or_create(&[("reason", reason)])
            .inc();
        let detail = hopmesh_transport::fields! {"detail" => e.to_string()};
        self.refuse(now, "table_refused", node, reason, detail);
    }

    /// Everything a freshly subscribed node needs, in order.
    pub fn snapshot(&mut self, node: &NodeId, now: UnixTime) -> Vec<Push> {
        let mut out = vec![Push::Config(MeshConfig {
            epoch_secs: self.settings.epoch.as_secs(),
            generation_secs: self.settings.generation_secs,
            suffix: BoundedString::truncated(&self.tables.policy().suffix),
        })];
        out.extend(self.revocations.push());
        out.extend(self.routes_push(node, now).into_iter().flatten());
        for p in &self.tables.allowed_pairs_of(node) {
            out.extend(self.seeds.pair_pushes(p, now));
        }
        out
    }

    /// Opens a push stream for an enrolled, live node: the receiver yields the snapshot, then
    /// every change. Dropping it unsubscribes.
    pub fn subscribe(
        &mut self,
        node: &NodeId,
        now: UnixTime,
    ) -> Result<mpsc::Receiver<Push>, Refusal> {
        if !self.registry.is_live(node) {
            self.refuse(
                now,
                "subscribe_refused",
                node,
                "subscribe_not_live",
                serde_json::Map::new(),
            );
            return Err(if self.registry.contains(node) {
                Refusal::Revoked
            } else {
                Refusal::NotEnrolled
            });
        }
        // A fenced replica's state may be stale: its nodes subscribe at another one.
        if self.feed.fenced_since.is_some() {
            self.refuse(
                now,
                "subscribe_refused",
                node,
                "subscribe_not_serving",
                serde_json::Map::new(),
            );
            return Err(Refusal::Internal);
        }
        let snapshot = self.snapshot(node, now);
        Ok(self.subscribers.open(*node, snapshot, &self.metrics))
    }

    /// Periodic work: prune expired revocations, then one step of the seed rotation (at most
    /// one batch of nodes due their next generation, `rotation.rs`). Call every 100 ms or so,
    /// and again (after releasing the lock) while the answer says more is due.
    pub fn tick(&mut self, now: UnixTime) -> Rotated {
        self.flush_refusal_audit(now);
        // A fenced replica writes nothing (another replica prunes, and this one follows),
        // and one whose last feed read failed does not wait on the database for work that
        // can wait.
        let store_ok = self.feed.fenced_since.is_none() && !self.feed.failing;
        if store_ok {
            self.checkpoint_if_due(now);
        }
        if store_ok && self.revocations.prune_due(now) {
            match self.prune_revocations(now) {
                Ok(()) => self.revocations.prune_done(),
                Err(e) => {
                    if self.revocations.prune_failed(now) {
                        tracing::error!(error = %e, retry_secs = revocations::PRUNE_RETRY_SECS, "pruning the revocation list failed; retrying every few seconds (logged once)");
                    }
                }
            }
        }
        self.rotate(now)
    }

    fn prune_revocations(&mut self, now: UnixTime) -> Result<(), AdminError> {
        let list = self.revocations.pruned(self.issuer.key(), now)?;
        let put = lock(&self.store).put_revocation_list(&list.0);
        if let Err(crate::store::StoreError::StaleVersion { .. }) = put {
            // Another replica pruned (or revoked) first: take its list.
            self.sync_revocations()?;
            return Ok(());
        }
        put?;
        self.revocations.install(list);
        self.revocation_version_changed();
        self.broadcast_revocations();
        Ok(())
    }

    /// Nodes for operators.
    pub fn nodes_view(&self) -> Vec<NodeView> {
        self.registry
            .records()
            .map(|n| NodeView {
                node_id: n.node_id.to_string(),
                name: n.name.to_string(),
                segments: self
                    .tables
                    .segments_of(&n.name)
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect(),
                addresses: n.addresses.clone(),
                measurement: n.measurement.to_string(),
                enrolled_at: n.enrolled_at.as_secs(),
                revoked_at: n.revoked_at.map(UnixTime::as_secs),
                connected: self.subscribers.is_connected(&n.node_id),
            })
            .collect()
    }

    /// A node's compiled table (for tests and introspection: built from its entries, O(table)).
    pub fn table(&self, node: &NodeId) -> Option<RoutingTable> {
        self.tables.table(node)
    }

    /// Does `node` have a table (live and named in policy)? O(log n).
    pub fn has_table(&self, node: &NodeId) -> bool {
        self.tables.has_table(node)
    }

    /// The current signed revocation list.
    pub fn revocation_list(&self) -> Option<&StoredList> {
        self.revocations.stored()
    }

    /// The audit log path.
    pub fn audit_path(&self) -> &std::path::Path {
        self.audit.path()
    }
}
