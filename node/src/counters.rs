//! Counters for `ctl show` and Prometheus `/metrics`: lock-free on the hot path, a small map
//! for refusal reasons. The text exposition is produced by `prometheus-client` from a
//! snapshot, so the two views can never disagree.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Node counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams accepted by the gate.
    pub streams_accepted: AtomicU64,
    /// Streams opened for SOCKS clients.
    pub streams_opened: AtomicU64,
    /// SOCKS connections that got success.
    pub socks_ok: AtomicU64,
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
    refusals: Mutex<BTreeMap<&'static str, u64>>,
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
    /// Bytes out.
    pub bytes_out: u64,
    /// Bytes in.
    pub bytes_in: u64,
    /// Refusal audit records aggregated instead of written.
    pub audit_aggregated: u64,
    /// Table resyncs.
    pub table_resyncs: u64,
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

    /// The Prometheus text exposition of a snapshot.
    pub fn render(&self) -> String {
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
        ] {
            registry.register(name, help, ConstCounter::new(value));
        }
        let refused = Family::<[(&'static str, &'static str); 1], Counter>::default();
        for (reason, n) in &v.refused {
            refused.get_or_create(&[("reason", reason)]).inc_by(*n);
        }
        registry.register("refusals", "Refusals by reason", refused);
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
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            audit_aggregated: self.audit_aggregated.load(Ordering::Relaxed),
            table_resyncs: self.table_resyncs.load(Ordering::Relaxed),
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
        let text = c.render();
        assert!(text.contains("hopmesh_node_bytes_in_total 42"), "{text}");
        assert!(
            text.contains("hopmesh_node_refusals_total{reason=\"bad_mac\"} 2"),
            "{text}"
        );
        assert_eq!(c.view().refused["bad_mac"], 2);
    }
}
