//! Enrollment and refresh: decide, commit the node record, sign, apply, audit; then
//! ([`Authority::publish`]) recompile and push.

use hopmesh_protocol::audit_aggregate::bounded_text;
use hopmesh_protocol::enrollment::{Address, Refusal};
use hopmesh_protocol::ids::{Measurement, NodeId, SegmentName};
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::fields;
use ring::digest::{SHA256, digest};

use super::Authority;
use super::refusals::{AdminError, EnrollRefusal, RefreshRefusal};
use super::registry::AddressChange;
use super::views::Enrollment;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::store::{JoinTokenUse, NodeRecord, SharedStore, StoreError, lock};

/// SHA-256, as join secrets are stored.
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

/// Locks the authority. A panic while holding the lock cannot leave it half-updated in a way
/// that matters more than stopping service would: every change is committed before it is
/// applied in memory.
pub fn lock_authority(authority: &Mutex<Authority>) -> MutexGuard<'_, Authority> {
    authority.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Enrolls with the store commits outside `authority`'s lock: the join secret is consumed
/// under the store lock only, the decision taken under the authority lock (the key and name
/// reserved), the record committed under the store lock only, then the decision re-checked
/// and the attestation signed under the authority lock, which is returned held so that the
/// caller publishes in the same hold. A commit's fsync never holds up a revocation, a refresh
/// or a push.
pub fn enroll_outside_lock<'a>(
    authority: &'a Mutex<Authority>,
    e: &Enrollment<'_>,
    now: UnixTime,
) -> Result<(MutexGuard<'a, Authority>, Issued), Refusal> {
    let store = lock_authority(authority).store_handle();
    let token = lock(&store).take_join_token(&join_secret_hash(e), now);
    let pending = lock_authority(authority).reserve_enrollment(e, token, now)?;
    let stored = lock(&store).put_node(pending.record());
    let mut guard = lock_authority(authority);
    let issued = guard.complete_enrollment(pending, stored, now)?;
    Ok((guard, issued))
}

/// Refreshes with a changed record's commit outside `authority`'s lock (an unchanged record,
/// the common case, is signed in one hold). Returns the lock held, as
/// [`enroll_outside_lock`].
pub fn refresh_outside_lock<'a>(
    authority: &'a Mutex<Authority>,
    node: &NodeId,
    measurement: &Measurement,
    addresses: &[Address],
    now: UnixTime,
) -> Result<(MutexGuard<'a, Authority>, Issued), Refusal> {
    let mut guard = lock_authority(authority);
    match guard.begin_refresh(node, measurement, addresses, now)? {
        RefreshStep::Attested(issued) => Ok((guard, issued)),
        RefreshStep::Commit(pending) => {
            drop(guard);
            commit_refresh(authority, pending, now)
        }
    }
}

/// The rest of a refresh whose record changed ([`RefreshStep::Commit`]): commits the record
/// under the store lock only, then completes it under `authority`'s lock, returned held.
pub fn commit_refresh(
    authority: &Mutex<Authority>,
    pending: PendingRefresh,
    now: UnixTime,
) -> Result<(MutexGuard<'_, Authority>, Issued), Refusal> {
    let store = lock_authority(authority).store_handle();
    let stored = lock(&store).put_node(pending.record());
    let mut guard = lock_authority(authority);
    let issued = guard.complete_refresh(pending, stored, now)?;
    Ok((guard, issued))
}

/// The authority if its lock is free now (a poisoned lock is used as [`lock_authority`] does).
pub fn try_lock_authority(authority: &Mutex<Authority>) -> Option<MutexGuard<'_, Authority>> {
    match authority.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// The store key of an enrollment's join secret.
pub fn join_secret_hash(e: &Enrollment<'_>) -> [u8; 32] {
    sha256(e.join_secret.expose())
}

/// An enrollment decided, its key and name reserved, its record not committed yet: commit
/// [`record`](Self::record) (the service does, outside the authority lock), then hand the
/// result to [`Authority::complete_enrollment`], which releases the reservation.
#[derive(Debug)]
#[must_use = "complete_enrollment() releases the reservation"]
pub struct PendingEnrollment {
    rec: NodeRecord,
    hostname: String,
}

impl PendingEnrollment {
    /// The record to commit.
    pub fn record(&self) -> &NodeRecord {
        &self.rec
    }
}

/// What [`Authority::begin_refresh`] decided.
#[derive(Debug)]
#[must_use]
pub enum RefreshStep {
    /// The record is unchanged: signed in the same lock hold.
    Attested(Issued),
    /// The record changed: commit it, then [`Authority::complete_refresh`].
    Commit(PendingRefresh),
}

/// A refresh whose changed record is not committed yet (its key marked in flight).
#[derive(Debug)]
#[must_use = "complete_refresh() ends the commit in flight"]
pub struct PendingRefresh {
    rec: NodeRecord,
}

impl PendingRefresh {
    /// The record to commit.
    pub fn record(&self) -> &NodeRecord {
        &self.rec
    }
}

/// An attestation signed for a committed node record, whose routing consequences are not
/// pushed yet: hand it to [`Authority::publish`].
#[derive(Debug)]
#[must_use = "publish() pushes the routing changes and yields the attestation"]
pub struct Issued {
    envelope: Vec<u8>,
    node: NodeId,
    changed: bool,
}

impl Authority {
    /// Signs an attestation for `rec` with its policy segments.
    fn attest(&mut self, rec: &NodeRecord, now: UnixTime) -> Result<Vec<u8>, AdminError> {
        let segments: Vec<SegmentName> = self
            .tables
            .segments_of(&rec.name)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let ttl = self.settings.attestation_ttl;
        self.issuer
            .attest(rec, segments, ttl, lock(&self.store).as_mut(), now)
    }

    /// Decides an enrollment, given the lookup of its join secret (which consumed it: a
    /// refused attempt burns it, and a secret can never be tried twice), then checks bans,
    /// policy and measurement.
    pub fn check_enrollment(
        &self,
        e: &Enrollment<'_>,
        token: Result<JoinTokenUse, StoreError>,
        now: UnixTime,
    ) -> Result<NodeRecord, EnrollRefusal> {
        let token = match token {
            Ok(JoinTokenUse::Valid(t)) => t,
            Ok(JoinTokenUse::Unknown) => return Err(EnrollRefusal::JoinSecretUnknown),
            Ok(JoinTokenUse::Used) => return Err(EnrollRefusal::JoinSecretUsed),
            Ok(JoinTokenUse::Expired) => return Err(EnrollRefusal::JoinSecretExpired),
            Err(err) => {
                tracing::error!(error = %err, "join secret lookup failed");
                return Err(EnrollRefusal::Internal);
            }
        };
        self.registry
            .decide_enrollment(self.tables.policy(), token, e, now)
    }

    /// The store shared with the commits made outside the authority lock.
    pub fn store_handle(&self) -> SharedStore {
        Arc::clone(&self.store)
    }

    /// Enrolls the TLS-proven key and returns its first attestation: every step of an
    /// enrollment in one call (tests and tools; the service runs the steps with the store
    /// commits outside the authority lock).
    pub fn enroll(&mut self, e: &Enrollment<'_>, now: UnixTime) -> Result<Vec<u8>, Refusal> {
        let token = lock(&self.store).take_join_token(&join_secret_hash(e), now);
        let pending = self.reserve_enrollment(e, token, now)?;
        let stored = lock(&self.store).put_node(pending.record());
        let issued = self.complete_enrollment(pending, stored, now)?;
        Ok(self.publish(issued, now))
    }

    /// Decides an enrollment (the join secret already looked up and consumed by the caller,
    /// under the store lock only) and reserves its key and name while its record is committed.
    /// A refusal is audited (aggregated) and counted.
    pub fn reserve_enrollment(
        &mut self,
        e: &Enrollment<'_>,
        token: Result<JoinTokenUse, StoreError>,
        now: UnixTime,
    ) -> Result<PendingEnrollment, Refusal> {
        let node_id = NodeId::from_spki(e.spki);
        let rec = match self.check_enrollment(e, token, now) {
            Ok(rec) => rec,
            Err(r) => {
                // Repeatable without any secret: aggregated, the hostname bounded.
                self.refuse_enrollment(now, &node_id, r, bounded_text(e.hostname));
                return Err(r.to_wire());
            }
        };
        // Checked by the decision; a second admission of the key is refused above.
        if !self.registry.begin_commit(&rec) {
            self.refuse_enrollment(now, &node_id, EnrollRefusal::CommitInFlight, String::new());
            return Err(Refusal::Internal);
        }
        Ok(PendingEnrollment {
            rec,
            hostname: bounded_text(e.hostname),
        })
    }

    /// Completes an enrollment whose record commit returned `stored`: releases the
    /// reservation, decides again what may have changed meanwhile (bans, policy), then signs,
    /// applies and audits. Hand the result to [`Authority::publish`].
    pub fn complete_enrollment(
        &mut self,
        pending: PendingEnrollment,
        stored: Result<(), StoreError>,
        now: UnixTime,
    ) -> Result<Issued, Refusal> {
        let PendingEnrollment { rec, hostname } = pending;
        let node_id = rec.node_id;
        self.registry.end_commit(&node_id);
        if let Err(err) = stored {
            tracing::error!(error = %err, "enrollment failed to store");
            self.metrics.refused("internal");
            return Err(Refusal::Internal);
        }
        if let Err(r) = self.registry.recheck_enrollment(self.tables.policy(), &rec) {
            self.refuse_enrollment(now, &node_id, r, hostname);
            return Err(r.to_wire());
        }
        let envelope = match self.attest(&rec, now) {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "enrollment failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        let audit = fields! {"node" => node_id.to_string(), "name" => rec.name.as_str(), "measurement" => rec.measurement.to_string(), "hostname" => hostname};
        self.registry.insert(rec);
        self.audit(now, "enroll", audit);
        self.metrics
            .attested
            .get_or_create(&[("kind", "enroll")])
            .inc();
        Ok(Issued {
            envelope,
            node: node_id,
            changed: true,
        })
    }

    fn refuse_enrollment(
        &mut self,
        now: UnixTime,
        node_id: &NodeId,
        r: EnrollRefusal,
        hostname: String,
    ) {
        self.refuse(
            now,
            "enroll_refused",
            node_id,
            r.reason(),
            fields! {"hostname" => hostname},
        );
    }

    /// Decides a refresh for the TLS-proven key.
    pub fn check_refresh(
        &self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
    ) -> Result<NodeRecord, RefreshRefusal> {
        self.registry
            .decide_refresh(self.tables.policy(), node_id, measurement, addresses)
    }

    /// Re-attests an enrolled key (possession proven by the TLS handshake); re-measures. Every
    /// step in one call (tests and tools; the service commits a changed record outside the
    /// authority lock).
    pub fn refresh(
        &mut self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
        now: UnixTime,
    ) -> Result<Vec<u8>, Refusal> {
        let issued = match self.begin_refresh(node_id, measurement, addresses, now)? {
            RefreshStep::Attested(issued) => issued,
            RefreshStep::Commit(pending) => {
                let stored = lock(&self.store).put_node(pending.record());
                self.complete_refresh(pending, stored, now)?
            }
        };
        Ok(self.publish(issued, now))
    }

    /// Decides a refresh. An unchanged record (the common case) is signed in the same call;
    /// a changed one (measurement, addresses) is marked in flight and returned for its commit,
    /// then [`Authority::complete_refresh`]. A refusal is audited (aggregated) and counted.
    pub fn begin_refresh(
        &mut self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
        now: UnixTime,
    ) -> Result<RefreshStep, Refusal> {
        let mut rec = match self.check_refresh(node_id, measurement, addresses) {
            Ok(rec) => rec,
            Err(r) => {
                self.refuse_refresh(now, node_id, r);
                return Err(r.to_wire());
            }
        };
        let limits = &self.settings.limits;
        let (max, window) = (
            limits.address_changes_per_window,
            limits.address_change_window_secs,
        );
        match self
            .registry
            .decide_address_change(node_id, &rec.addresses, now, max, window)
        {
            AddressChange::Unchanged | AddressChange::Permitted => {}
            AddressChange::Deferred => {
                // The refresh still attests; the old addresses stay (and with them the peers'
                // tables) until a refresh in a later window.
                let wanted: Vec<String> = rec.addresses.iter().map(|a| bounded_text(a)).collect();
                if let Some(old) = self.registry.get(node_id) {
                    rec.addresses.clone_from(&old.addresses);
                }
                self.refuse(
                    now,
                    "address_change_deferred",
                    node_id,
                    "address_change_rate_limited",
                    fields! {"addresses" => wanted},
                );
            }
        }
        if self.registry.get(node_id) == Some(&rec) {
            return self
                .sign_refresh(rec, false, now)
                .map(RefreshStep::Attested);
        }
        // Checked by the decision (a refresh in flight is refused there).
        if !self.registry.begin_commit(&rec) {
            self.refuse_refresh(now, node_id, RefreshRefusal::CommitInFlight);
            return Err(Refusal::Internal);
        }
        Ok(RefreshStep::Commit(PendingRefresh { rec }))
    }

    /// Completes a refresh whose changed record's commit returned `stored`: ends the commit,
    /// decides again what may have changed meanwhile (a revocation, ban or reload), then signs,
    /// applies and audits. Hand the result to [`Authority::publish`].
    pub fn complete_refresh(
        &mut self,
        pending: PendingRefresh,
        stored: Result<(), StoreError>,
        now: UnixTime,
    ) -> Result<Issued, Refusal> {
        let PendingRefresh { rec } = pending;
        self.registry.end_commit(&rec.node_id);
        if let Err(err) = stored {
            tracing::error!(error = %err, "refresh failed to store");
            self.metrics.refused("internal");
            return Err(Refusal::Internal);
        }
        if let Err(r) = self.registry.recheck_refresh(self.tables.policy(), &rec) {
            self.refuse_refresh(now, &rec.node_id, r);
            return Err(r.to_wire());
        }
        self.sign_refresh(rec, true, now)
    }

    fn sign_refresh(
        &mut self,
        rec: NodeRecord,
        changed: bool,
        now: UnixTime,
    ) -> Result<Issued, Refusal> {
        let envelope = match self.attest(&rec, now) {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "refresh failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        let node = rec.node_id;
        let audit = fields! {"node" => node.to_string(), "name" => rec.name.as_str()};
        self.registry.insert(rec);
        self.audit(now, "attest", audit);
        self.metrics
            .attested
            .get_or_create(&[("kind", "refresh")])
            .inc();
        Ok(Issued {
            envelope,
            node,
            changed,
        })
    }

    fn refuse_refresh(&mut self, now: UnixTime, node_id: &NodeId, r: RefreshRefusal) {
        self.refuse(
            now,
            "refresh_refused",
            node_id,
            r.reason(),
            serde_json::Map::new(),
        );
    }

    /// The second half of an admission: if the node record changed, updates the tables it
    /// touches and pushes their deltas. Returns the attestation.
    pub fn publish(&mut self, issued: Issued, now: UnixTime) -> Vec<u8> {
        if issued.changed {
            self.node_changed(&issued.node, now);
        }
        issued.envelope
    }
}
