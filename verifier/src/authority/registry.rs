//! The registry: enrolled node records, names, bans, and the pure admission decisions that
//! read them with the policy (join-token requests, enrollment, refresh, measurement
//! allowlist).

use std::collections::{BTreeMap, BTreeSet};

use hopmesh_protocol::enrollment::Address;
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName, SegmentName};
#[cfg(test)]
use hopmesh_protocol::policy::NodeDirectory;
use hopmesh_protocol::policy::{Policy, parse_backend};
use hopmesh_protocol::time::UnixTime;

use super::refusals::{AdminError, EnrollRefusal, RefreshRefusal};
use super::views::{Enrollment, NodeRef};
use crate::store::{BanSubject, JoinTokenRecord, NodeRecord, Store, StoreError};

/// Longest join-secret lifetime an operator may ask for.
pub(super) const MAX_JOIN_TTL: u64 = 7 * 24 * 3600;

/// Every node record (live and revoked) and every ban, and the per-node rate-limit windows
/// (in memory only: a restart gives every node a fresh window).
#[derive(Debug, Default)]
pub(super) struct Registry {
    nodes: BTreeMap<NodeId, NodeRecord>,
    bans: BTreeSet<BanSubject>,
    /// Report windows of enrolled, unrevoked reporters only (so bounded by the registry).
    reports: BTreeMap<NodeId, Window>,
    /// Address-change windows of live nodes only.
    address_changes: BTreeMap<NodeId, Window>,
    /// Records being committed outside the authority lock (an enrolment, or a refresh that
    /// changed the record), by key, with the name each holds meanwhile: at most one per key,
    /// and an enrolling name is taken. Bounded by the admissions in flight.
    committing: BTreeMap<NodeId, NodeName>,
}

/// A fixed rate-limit window: at most `max` events from the first event of the window until
/// `window_secs` later; the next event after that opens a new window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Window {
    start: UnixTime,
    used: u32,
}

impl Window {
    /// Takes one event at `now` from `window` (created if absent): true if within `max`.
    /// A refused event takes nothing. A clock that steps back never reopens a window early.
    pub(super) fn take(
        window: &mut Option<Window>,
        now: UnixTime,
        max: u32,
        window_secs: u64,
    ) -> bool {
        // `secs_since` is 0 for a clock behind the window's start: the window stays.
        if window.is_some_and(|w| now.secs_since(w.start) >= window_secs.max(1)) {
            *window = None;
        }
        let w = window.get_or_insert(Window {
            start: now,
            used: 0,
        });
        if w.used >= max {
            return false;
        }
        w.used += 1;
        true
    }
}

/// What a refresh does with the node's advertised addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AddressChange {
    /// The same addresses: nothing to recompile or push.
    Unchanged,
    /// Changed, within the node's address-change limit: applied.
    Permitted,
    /// Changed past the limit: the old addresses stay until a later window.
    Deferred,
}

/// Whether `m` may attest under `policy`.
pub(super) fn measurement_allowed(policy: &Policy, m: &Measurement) -> bool {
    policy.allow_any_measurement || policy.measurements.contains(m)
}

/// Whether every advertised address is `host:port`.
pub(super) fn addresses_ok(addresses: &[Address]) -> bool {
    addresses.iter().all(|a| parse_backend(a.as_str()).is_ok())
}

impl Registry {
    /// Loads the records and bans from the store.
    pub(super) fn load(store: &dyn Store) -> Result<Self, StoreError> {
        Ok(Self {
            nodes: store.nodes()?.into_iter().map(|n| (n.node_id, n)).collect(),
            bans: store.bans()?.into_iter().collect(),
            reports: BTreeMap::new(),
            address_changes: BTreeMap::new(),
            committing: BTreeMap::new(),
        })
    }

    pub(super) fn get(&self, id: &NodeId) -> Option<&NodeRecord> {
        self.nodes.get(id)
    }

    pub(super) fn contains(&self, id: &NodeId) -> bool {
        self.nodes.contains_key(id)
    }

    pub(super) fn records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(super) fn is_banned(&self, id: &NodeId, name: &NodeName) -> bool {
        self.bans.contains(&BanSubject::Node(*id))
            || self.bans.contains(&BanSubject::Name(name.clone()))
    }

    pub(super) fn name_banned(&self, name: &NodeName) -> bool {
        self.bans.contains(&BanSubject::Name(name.clone()))
    }

    /// Enrolled, not revoked, not banned.
    pub(super) fn is_live(&self, id: &NodeId) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|n| n.revoked_at.is_none() && !self.is_banned(id, &n.name))
    }

    /// Enrolled and not revoked (bans not considered).
    pub(super) fn is_unrevoked(&self, id: &NodeId) -> bool {
        self.nodes.get(id).is_some_and(|n| n.revoked_at.is_none())
    }

    /// Marks `rec`'s commit in flight; false if one is already in flight for its key.
    pub(super) fn begin_commit(&mut self, rec: &NodeRecord) -> bool {
        if self.committing.contains_key(&rec.node_id) {
            return false;
        }
        self.committing.insert(rec.node_id, rec.name.clone());
        true
    }

    /// The commit of `id`'s record ended (committed or failed).
    pub(super) fn end_commit(&mut self, id: &NodeId) {
        self.committing.remove(id);
    }

    /// Records being committed outside the lock.
    #[cfg(test)]
    pub(super) fn commits_in_flight(&self) -> usize {
        self.committing.len()
    }

    /// Whether an enrolment of another key holds `name` while its record is committed.
    fn name_committing(&self, name: &NodeName, except: &NodeId) -> bool {
        self.committing
            .iter()
            .any(|(id, n)| n == name && id != except)
    }

    /// Decides again, after its record was committed outside the lock, an enrolment decided
    /// before: a ban or a policy reload meanwhile refuses it.
    pub(super) fn recheck_enrollment(
        &self,
        policy: &Policy,
        rec: &NodeRecord,
    ) -> Result<(), EnrollRefusal> {
        if self.bans.contains(&BanSubject::Node(rec.node_id)) {
            return Err(EnrollRefusal::KeyBanned);
        }
        if self.name_banned(&rec.name) {
            return Err(EnrollRefusal::NameBanned);
        }
        if !policy.nodes.contains_key(&rec.name) {
            return Err(EnrollRefusal::NameNotInPolicy);
        }
        if !measurement_allowed(policy, &rec.measurement) {
            return Err(EnrollRefusal::Measurement);
        }
        Ok(())
    }

    /// Decides again, after its changed record was committed outside the lock, a refresh
    /// decided before: a revocation, ban or policy reload meanwhile refuses it.
    pub(super) fn recheck_refresh(
        &self,
        policy: &Policy,
        rec: &NodeRecord,
    ) -> Result<(), RefreshRefusal> {
        let current = self
            .nodes
            .get(&rec.node_id)
            .ok_or(RefreshRefusal::NotEnrolled)?;
        if current.revoked_at.is_some() {
            return Err(RefreshRefusal::Revoked);
        }
        if self.is_banned(&rec.node_id, &rec.name) {
            return Err(RefreshRefusal::Banned);
        }
        if !policy.nodes.contains_key(&rec.name) {
            return Err(RefreshRefusal::NotInPolicy);
        }
        if !measurement_allowed(policy, &rec.measurement) {
            return Err(RefreshRefusal::Measurement);
        }
        Ok(())
    }

    fn live_node_named(&self, name: &NodeName) -> Option<&NodeRecord> {
        self.nodes
            .values()
            .find(|n| n.name == *name && n.revoked_at.is_none())
    }

    /// The record an operator means: by id, or the live (else the latest) node of a name.
    pub(super) fn resolve(&self, r: &NodeRef) -> Result<NodeRecord, AdminError> {
        let found = match r {
            NodeRef::Id(id) => self.nodes.get(id),
            NodeRef::Name(n) => self
                .nodes
                .values()
                .filter(|rec| rec.name == *n)
                .max_by_key(|rec| (rec.revoked_at.is_none(), rec.enrolled_at)),
        };
        found.cloned().ok_or_else(|| {
            AdminError::UnknownNode(match r {
                NodeRef::Id(id) => id.to_string(),
                NodeRef::Name(n) => n.to_string(),
            })
        })
    }

    /// Live, unbanned nodes by name: what the policy compiles against (the reference
    /// `Policy::compile` in tests; `tables.rs` keeps the tables incrementally).
    #[cfg(test)]
    pub(super) fn directory(&self) -> NodeDirectory {
        self.nodes
            .values()
            .filter(|n| n.revoked_at.is_none() && !self.is_banned(&n.node_id, &n.name))
            .map(|n| (n.name.clone(), n.node_id))
            .collect()
    }

    /// Applies a committed node record.
    pub(super) fn insert(&mut self, rec: NodeRecord) {
        self.nodes.insert(rec.node_id, rec);
    }

    /// Applies a committed revocation.
    pub(super) fn mark_revoked(&mut self, id: &NodeId, at: UnixTime) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.revoked_at = Some(at);
        }
        self.reports.remove(id);
        self.address_changes.remove(id);
    }

    /// Takes one report of `reporter` (enrolled and unrevoked: the caller checked) from its
    /// window: false past `max` per `window_secs`.
    pub(super) fn take_report(
        &mut self,
        reporter: &NodeId,
        now: UnixTime,
        max: u32,
        window_secs: u64,
    ) -> bool {
        let mut w = self.reports.get(reporter).copied();
        let ok = Window::take(&mut w, now, max, window_secs);
        if let Some(w) = w {
            self.reports.insert(*reporter, w);
        }
        ok
    }

    /// Decides whether a refresh of `node` (a live record) may change its addresses from the
    /// stored ones to `new`: unchanged, permitted (and counted in its window), or deferred.
    pub(super) fn decide_address_change(
        &mut self,
        node: &NodeId,
        new: &[String],
        now: UnixTime,
        max: u32,
        window_secs: u64,
    ) -> AddressChange {
        if self.nodes.get(node).is_none_or(|n| n.addresses == new) {
            return AddressChange::Unchanged;
        }
        let mut w = self.address_changes.get(node).copied();
        let ok = Window::take(&mut w, now, max, window_secs);
        if let Some(w) = w {
            self.address_changes.insert(*node, w);
        }
        if ok {
            AddressChange::Permitted
        } else {
            AddressChange::Deferred
        }
    }

    /// Is exactly this ban in force?
    pub(super) fn has_ban(&self, ban: &BanSubject) -> bool {
        self.bans.contains(ban)
    }

    /// Applies committed bans.
    pub(super) fn add_bans(&mut self, bans: impl IntoIterator<Item = BanSubject>) {
        self.bans.extend(bans);
    }

    /// Decides an operator's join-token request.
    pub(super) fn check_join_token_request(
        &self,
        policy: &Policy,
        name: &NodeName,
        segments: Option<&[String]>,
        ttl: u64,
    ) -> Result<(), AdminError> {
        if ttl == 0 || ttl > MAX_JOIN_TTL {
            return Err(AdminError::BadRequest("ttl must be 1 s to 7 days".into()));
        }
        if !policy.nodes.contains_key(name) {
            return Err(AdminError::BadRequest(format!(
                "node `{name}` is not in the policy"
            )));
        }
        if self.name_banned(name) {
            return Err(AdminError::BadRequest(format!(
                "node name `{name}` is banned"
            )));
        }
        for s in segments.into_iter().flatten() {
            SegmentName::new(s)
                .map_err(|e| AdminError::BadRequest(format!("segment `{s}`: {e}")))?;
        }
        Ok(())
    }

    /// Decides an enrollment whose join secret was valid (and is now consumed): bans, policy,
    /// segments, measurement, name, addresses. The permit is the record to commit.
    pub(super) fn decide_enrollment(
        &self,
        policy: &Policy,
        token: JoinTokenRecord,
        e: &Enrollment<'_>,
        now: UnixTime,
    ) -> Result<NodeRecord, EnrollRefusal> {
        let node_id = NodeId::from_spki(e.spki);
        if self.bans.contains(&BanSubject::Node(node_id)) {
            return Err(EnrollRefusal::KeyBanned);
        }
        if self.name_banned(&token.name) {
            return Err(EnrollRefusal::NameBanned);
        }
        let Some(policy_segments) = policy.nodes.get(&token.name) else {
            return Err(EnrollRefusal::NameNotInPolicy);
        };
        if let Some(bound) = &token.segments {
            let bound: BTreeSet<&str> = bound.iter().map(String::as_str).collect();
            let policy: BTreeSet<&str> = policy_segments.iter().map(SegmentName::as_str).collect();
            if bound != policy {
                return Err(EnrollRefusal::SegmentsMismatch);
            }
        }
        if !measurement_allowed(policy, &e.measurement) {
            return Err(EnrollRefusal::Measurement);
        }
        if self
            .live_node_named(&token.name)
            .is_some_and(|n| n.node_id != node_id)
            || self.name_committing(&token.name, &node_id)
        {
            return Err(EnrollRefusal::NameTaken);
        }
        if self.committing.contains_key(&node_id) {
            return Err(EnrollRefusal::CommitInFlight);
        }
        if !addresses_ok(e.addresses) {
            return Err(EnrollRefusal::BadAddress);
        }
        Ok(NodeRecord {
            node_id,
            name: token.name,
            spki: e.spki.to_vec(),
            measurement: e.measurement,
            addresses: e.addresses.iter().map(|a| a.as_str().to_owned()).collect(),
            enrolled_at: now,
            revoked_at: None,
        })
    }

    /// Decides a refresh of an enrolled key. The permit is the updated record.
    pub(super) fn decide_refresh(
        &self,
        policy: &Policy,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
    ) -> Result<NodeRecord, RefreshRefusal> {
        let rec = self.nodes.get(node_id).ok_or(RefreshRefusal::NotEnrolled)?;
        if rec.revoked_at.is_some() {
            return Err(RefreshRefusal::Revoked);
        }
        if self.committing.contains_key(node_id) {
            return Err(RefreshRefusal::CommitInFlight);
        }
        if self.is_banned(node_id, &rec.name) {
            return Err(RefreshRefusal::Banned);
        }
        if !policy.nodes.contains_key(&rec.name) {
            return Err(RefreshRefusal::NotInPolicy);
        }
        if !measurement_allowed(policy, measurement) {
            return Err(RefreshRefusal::Measurement);
        }
        if !addresses_ok(addresses) {
            return Err(RefreshRefusal::BadAddress);
        }
        let mut rec = rec.clone();
        rec.measurement = *measurement;
        rec.addresses = addresses.iter().map(|a| a.as_str().to_owned()).collect();
        Ok(rec)
    }
}
