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
use crate::store::{JoinTokenUse, NodeRecord};

/// SHA-256, as join secrets are stored.
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
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
            .attest(rec, segments, ttl, self.store.as_mut(), now)
    }

    /// Decides an enrollment. Consumes the join secret first (so a refused attempt burns it,
    /// and a secret can never be tried twice), then checks bans, policy and measurement.
    pub fn check_enrollment(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixTime,
    ) -> Result<NodeRecord, EnrollRefusal> {
        let token = match self
            .store
            .take_join_token(&sha256(e.join_secret.expose()), now)
        {
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

    /// Enrolls the TLS-proven key and returns its first attestation.
    pub fn enroll(&mut self, e: &Enrollment<'_>, now: UnixTime) -> Result<Vec<u8>, Refusal> {
        let issued = self.admit_enrollment(e, now)?;
        Ok(self.publish(issued, now))
    }

    /// The first half of [`enroll`](Self::enroll): decide, commit, sign, apply, audit. The
    /// service measures `issuance_seconds` over this call.
    pub fn admit_enrollment(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixTime,
    ) -> Result<Issued, Refusal> {
        let node_id = NodeId::from_spki(e.spki);
        let rec = match self.check_enrollment(e, now) {
            Ok(rec) => rec,
            Err(r) => {
                // Repeatable without any secret: aggregated, the hostname bounded.
                self.refuse(
                    now,
                    "enroll_refused",
                    &node_id,
                    r.reason(),
                    fields! {"hostname" => bounded_text(e.hostname)},
                );
                return Err(r.to_wire());
            }
        };
        let envelope = self
            .store
            .put_node(&rec)
            .map_err(AdminError::from)
            .and_then(|()| self.attest(&rec, now));
        let envelope = match envelope {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "enrollment failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        let audit = fields! {"node" => node_id.to_string(), "name" => rec.name.as_str(), "measurement" => rec.measurement.to_string(), "hostname" => bounded_text(e.hostname)};
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

    /// Re-attests an enrolled key (possession proven by the TLS handshake); re-measures.
    pub fn refresh(
        &mut self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
        now: UnixTime,
    ) -> Result<Vec<u8>, Refusal> {
        let issued = self.admit_refresh(node_id, measurement, addresses, now)?;
        Ok(self.publish(issued, now))
    }

    /// The first half of [`refresh`](Self::refresh): decide, commit (if the record changed),
    /// sign, apply, audit. The service measures `issuance_seconds` over this call.
    pub fn admit_refresh(
        &mut self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
        now: UnixTime,
    ) -> Result<Issued, Refusal> {
        let mut rec = match self.check_refresh(node_id, measurement, addresses) {
            Ok(rec) => rec,
            Err(r) => {
                self.refuse(
                    now,
                    "refresh_refused",
                    node_id,
                    r.reason(),
                    serde_json::Map::new(),
                );
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
        let changed = self.registry.get(node_id) != Some(&rec);
        if changed && let Err(err) = self.store.put_node(&rec) {
            tracing::error!(error = %err, "refresh failed to store");
            self.metrics.refused("internal");
            return Err(Refusal::Internal);
        }
        let envelope = match self.attest(&rec, now) {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "refresh failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        let audit = fields! {"node" => node_id.to_string(), "name" => rec.name.as_str()};
        self.registry.insert(rec);
        self.audit(now, "attest", audit);
        self.metrics
            .attested
            .get_or_create(&[("kind", "refresh")])
            .inc();
        Ok(Issued {
            envelope,
            node: *node_id,
            changed,
        })
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
