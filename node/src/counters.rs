//! Counters for `ctl show` and Prometheus `/metrics`: lock-free on the hot path, a small map
//! for refusal reasons. The text exposition is produced by `prometheus-client` from a
//! snapshot, so the two views can never disagree. The gauges ([`Gauges`]) are read from the
//! node's state at each scrape (`show.rs`, the same reads as `ctl show`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Upper bounds (seconds) of the [`Counters::revocation_propagation`] buckets. The delay is
/// a difference of whole seconds, so the first bucket holds "within the same second".
pub const REVOCATION_PROPAGATION_BUCKETS: [f64; 10] =
    [0.5, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0];

/// Node counters.
#[derive(Debug)]
pub struct Counters {
    /// Streams accepted by the gate.
    pub streams_accepted: AtomicU64,
    /// Streams opened for SOCKS clients.
    pub streams_opened: AtomicU64,
    /// SOCKS connections that got success.
    pub socks_ok: AtomicU64,
    /// Outbound streams whose token and header left alone: the app sent nothing within
    /// [`crate::splice::FIRST_BYTES_WAIT`] of the early SOCKS reply (a server-speaks-first
    /// protocol, or a busy app), so they did not share a packet with its first bytes.
    pub header_sent_alone: AtomicU64,
    /// Inbound streams whose "connected" status left alone: the origin had sent its app's
    /// bytes behind the header, but the backend sent nothing within
    /// [`crate::splice::STATUS_WAIT`] to share a packet with.
    pub status_sent_alone: AtomicU64,
    /// Relayed flows whose bytes travelled sealed end to end (counted at the origin and at the
    /// serving node, once the flow's keys were agreed; `crate::sealed`).
    pub sealed_flows: AtomicU64,
    /// Key updates sent on sealed flows (at least one per epoch per direction of a long flow).
    pub seal_key_updates: AtomicU64,
    /// Bytes from apps into the mesh.
    pub bytes_out: AtomicU64,
    /// Bytes from the mesh to apps or backends.
    pub bytes_in: AtomicU64,
    /// Refusal audit records not written because an earlier one of the same (peer, event,
    /// reason) in the interval was (they are in the interval's `refusals_aggregated` count).
    pub audit_aggregated: AtomicU64,
    /// Resubscribes for a fresh table snapshot after a table update that did not assemble or
    /// apply (`verifier_link.rs`, audited as `table_resync`).
    pub table_resyncs: AtomicU64,
    /// Moves of the verifier link to another listed verifier after the one it used failed,
    /// refused or ended its session (`verifier_link::Failover`).
    pub verifier_failovers: AtomicU64,
    /// Seconds from a revocation list's `issued_at` (signed by the verifier, on its clock) to
    /// the node applying it (on the node's clock), observed once per newer list applied
    /// (`verifier_link.rs`, `apply_push`). Whole seconds on both ends; a list that arrives when
    /// the node reconnects after an outage counts the outage too.
    pub revocation_propagation: Histogram,
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            streams_accepted: AtomicU64::default(),
            streams_opened: AtomicU64::default(),
            socks_ok: AtomicU64::default(),
            header_sent_alone: AtomicU64::default(),
            status_sent_alone: AtomicU64::default(),
            sealed_flows: AtomicU64::default(),
            seal_key_updates: AtomicU64::default(),
            bytes_out: AtomicU64::default(),
            bytes_in: AtomicU64::default(),
            audit_aggregated: AtomicU64::default(),
            table_resyncs: AtomicU64::default(),
            verifier_failovers: AtomicU64::default(),
            revocation_propagation: Histogram::new(REVOCATION_PROPAGATION_BUCKETS),
            refusals: Mutex::default(),
        }
    }
}

/// What the node's state says at a scrape, as gauges (read by `show::gauges`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// `not_after` (unix seconds) of this node's own attestation, if it holds one.
    pub attestation_not_after: Option<u64>,
    /// Seconds from now (the node's clock) to `not_after`; negative once expired.
    pub attestation_remaining: Option<i64>,
    /// Whether the attestation is valid now (`state::own_validity`); false without one.
    pub attestation_valid: bool,
    /// Version of the revocation list held (0: none received yet; versions start at 1).
    pub revocation_version: u64,
    /// Whether the verifier link is up (subscribed to pushes).
    pub verifier_connected: bool,
}

/// A snapshot for JSON.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CountersView {
    /// Streams accepted.
    pub streams_accepted: u64,
    /// Streams opened.
    pub streams_opened: u64,
    /// SOCKS successes.
    pub socks_ok: u64,
    /// See [`Counters::header_sent_alone`].
    pub header_sent_alone: u64,
    /// See [`Counters::status_sent_alone`].
    pub status_sent_alone: u64,
    /// See [`Counters::sealed_flows`].
    pub sealed_flows: u64,
    /// See [`Counters::seal_key_updates`].
    pub seal_key_updates: u64,
    /// Bytes out.
    pub bytes_out: u64,
    /// Bytes in.
    pub bytes_in: u64,
    /// Refusal audit records aggregated instead of written.
    pub audit_aggregated: u64,
    /// Table resyncs.
    pub table_resyncs: u64,
    /// See [`Counters::verifier_failovers`].
    pub verifier_failovers: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counts one refusal.
    pub fn refused(&self, reason: &'static str) {
        let mut m = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(reason).or_default() += 1;
    }

    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of a snapshot, with the state's `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let v = self.view();
        let mut registry = Registry::with_prefix("hopmesh_node");
        for (name, help, value) in [
            (
                "streams_accepted",
                "Inbound streams that passed the gate",
                v.streams_accepted,
            ),
            (
                "streams_opened",
                "Outbound streams opened for SOCKS clients",
                v.streams_opened,
            ),
            (
                "socks_ok",
                "SOCKS requests answered with success",
                v.socks_ok,
            ),
            (
                "header_sent_alone",
                "Outbound streams whose token and header left without the app's first bytes (none came within the wait)",
                v.header_sent_alone,
            ),
            (
                "status_sent_alone",
                "Inbound streams whose connected status left without the backend's first bytes (none came within the wait)",
                v.status_sent_alone,
            ),
            (
                "sealed_flows",
                "Relayed flows whose bytes travelled sealed end to end (origin and serving node)",
                v.sealed_flows,
            ),
            (
                "seal_key_updates",
                "Key updates sent on sealed relayed flows",
                v.seal_key_updates,
            ),
            (
                "bytes_out",
                "Bytes from local apps into the mesh",
                v.bytes_out,
            ),
            (
                "bytes_in",
                "Bytes from the mesh to local apps and backends",
                v.bytes_in,
            ),
            (
                "audit_aggregated",
                "Refusal audit records aggregated into a later summary instead of written",
                v.audit_aggregated,
            ),
            (
                "table_resyncs",
                "Resubscribes for a fresh routing-table snapshot after an update that did not apply",
                v.table_resyncs,
            ),
            (
                "verifier_failovers",
                "Moves of the verifier link to another listed verifier",
                v.verifier_failovers,
            ),
        ] {
            registry.register(name, help, ConstCounter::new(value));
        }
        let refused = Family::<[(&'static str, &'static str); 1], Counter>::default();
        for (reason, n) in &v.refused {
            refused.get_or_create(&[("reason", reason)]).inc_by(*n);
        }
        registry.register("refusals", "Refusals by reason", refused);
        registry.register(
            "revocation_propagation_seconds",
            "Seconds from a revocation list's signed issued_at (verifier clock) to this node \
             applying it (node clock), whole seconds on both ends, once per newer list; a list \
             received on reconnecting counts the time the node was disconnected",
            self.revocation_propagation.clone(),
        );
        let flag = |b: bool| ConstGauge::new(i64::from(b));
        if let Some(not_after) = gauges.attestation_not_after {
            registry.register(
                "attestation_expires_at_seconds",
                "Unix time (seconds) of this node's own attestation not_after",
                ConstGauge::new(i64::try_from(not_after).unwrap_or(i64::MAX)),
            );
        }
        if let Some(left) = gauges.attestation_remaining {
            registry.register(
                "attestation_remaining_seconds",
                "Seconds left on this node's own attestation, on the node's clock (negative: expired)",
                ConstGauge::new(left),
            );
        }
        registry.register(
            "attestation_valid",
            "1 if this node's own attestation is valid now (0: none, expired, or not yet valid)",
            flag(gauges.attestation_valid),
        );
        registry.register(
            "revocation_version",
            "Version of the revocation list this node holds (0: none received yet)",
            ConstGauge::new(i64::try_from(gauges.revocation_version).unwrap_or(i64::MAX)),
        );
        registry.register(
            "verifier_connected",
            "1 while this node's verifier link is up (subscribed to pushes)",
            flag(gauges.verifier_connected),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    /// A snapshot.
    pub fn view(&self) -> CountersView {
        CountersView {
            streams_accepted: self.streams_accepted.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            socks_ok: self.socks_ok.load(Ordering::Relaxed),
            header_sent_alone: self.header_sent_alone.load(Ordering::Relaxed),
            status_sent_alone: self.status_sent_alone.load(Ordering::Relaxed),
            sealed_flows: self.sealed_flows.load(Ordering::Relaxed),
            seal_key_updates: self.seal_key_updates.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            audit_aggregated: self.audit_aggregated.load(Ordering::Relaxed),
            table_resyncs: self.table_resyncs.load(Ordering::Relaxed),
            verifier_failovers: self.verifier_failovers.load(Ordering::Relaxed),
            refused: self
                .refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_matches_the_snapshot() {
        let c = Counters::default();
        Counters::add(&c.bytes_in, 42);
        c.refused("bad_mac");
        c.refused("bad_mac");
        let text = c.render(&Gauges::default());
        assert!(text.contains("hopmesh_node_bytes_in_total 42"), "{text}");
        assert!(
            text.contains("hopmesh_node_refusals_total{reason=\"bad_mac\"} 2"),
            "{text}"
        );
        assert_eq!(c.view().refused["bad_mac"], 2);
        // No attestation: valid 0, no expiry samples; no revocation list: version 0.
        assert!(
            text.contains("\nhopmesh_node_attestation_valid 0\n"),
            "{text}"
        );
        assert!(!text.contains("attestation_expires_at_seconds"), "{text}");
        assert!(!text.contains("attestation_remaining_seconds"), "{text}");
        assert!(
            text.contains("\nhopmesh_node_revocation_version 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\nhopmesh_node_verifier_connected 0\n"),
            "{text}"
        );
    }

    #[test]
    fn gauges_and_the_propagation_histogram_carry_their_values() {
        let c = Counters::default();
        c.revocation_propagation.observe(0.0);
        c.revocation_propagation.observe(7.0);
        let text = c.render(&Gauges {
            attestation_not_after: Some(1_700_000_300),
            attestation_remaining: Some(-5),
            attestation_valid: true,
            revocation_version: 3,
            verifier_connected: true,
        });
        for line in [
            "hopmesh_node_attestation_expires_at_seconds 1700000300",
            "hopmesh_node_attestation_remaining_seconds -5",
            "hopmesh_node_attestation_valid 1",
            "hopmesh_node_revocation_version 3",
            "hopmesh_node_verifier_connected 1",
            "hopmesh_node_revocation_propagation_seconds_count 2",
            "hopmesh_node_revocation_propagation_seconds_sum 7.0",
            "hopmesh_node_revocation_propagation_seconds_bucket{le=\"0.5\"} 1",
            "hopmesh_node_revocation_propagation_seconds_bucket{le=\"5.0\"} 1",
            "hopmesh_node_revocation_propagation_seconds_bucket{le=\"10.0\"} 2",
            "# TYPE hopmesh_node_attestation_remaining_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
