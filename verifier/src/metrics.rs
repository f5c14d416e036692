//! Prometheus metrics of the verifier, served at `/metrics` on the admin listener.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labeled = Family<[(&'static str, &'static str); 1], Counter>;

/// All verifier metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Attestations issued, by kind (`enroll`, `refresh`).
    pub attested: Labeled,
    /// Refused requests, by reason.
    pub refusals: Labeled,
    /// Push messages sent, by kind.
    pub pushes: Labeled,
    /// Node reports, by kind.
    pub reports: Labeled,
    /// Revocations committed.
    pub revocations: Counter,
    /// Pair reissues.
    pub reissues: Counter,
    /// Nodes with an open push stream.
    pub subscribed: Gauge,
    /// Time to check and sign one attestation.
    pub issuance_seconds: Histogram,
    /// Audit writes that failed, by kind: `best_effort` (the record is lost, the operation
    /// went on), `durable` (the operation was refused), `anchor`, `checkpoint`
    /// (`authority/journal.rs`).
    pub audit_write_failures: Labeled,
    /// `/v1/audit` answers cut at `MAX_PAGE_RECORDS` / `MAX_PAGE_BYTES` (more records follow).
    pub audit_pages_capped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hopmesh_verifier");
        let attested = Labeled::default();
        let refusals = Labeled::default();
        let pushes = Labeled::default();
        let reports = Labeled::default();
        let revocations = Counter::default();
        let reissues = Counter::default();
        let subscribed = Gauge::default();
        let issuance_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register(
            "attestations_issued",
            "Attestations issued, by kind",
            attested.clone(),
        );
        registry.register("refusals", "Refused requests, by reason", refusals.clone());
        registry.register(
            "pushes",
            "Push messages sent to nodes, by kind",
            pushes.clone(),
        );
        registry.register(
            "reports",
            "Security reports received from nodes, by kind",
            reports.clone(),
        );
        registry.register("revocations", "Revocations committed", revocations.clone());
        registry.register("reissues", "Pair-seed reissues", reissues.clone());
        registry.register(
            "subscribed_nodes",
            "Nodes with an open push stream",
            subscribed.clone(),
        );
        registry.register(
            "issuance_seconds",
            "Time to check and sign one attestation",
            issuance_seconds.clone(),
        );
        let audit_write_failures = Labeled::default();
        let audit_pages_capped = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit writes that failed, by kind (best_effort, durable, anchor, checkpoint)",
            audit_write_failures.clone(),
        );
        registry.register(
            "audit_pages_capped",
            "Admin audit answers cut at the page cap",
            audit_pages_capped.clone(),
        );
        Self {
            registry,
            audit_write_failures,
            audit_pages_capped,
            attested,
            refusals,
            pushes,
            reports,
            revocations,
            reissues,
            subscribed,
            issuance_seconds,
        }
    }
}

impl Metrics {
    /// Counts one refusal.
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts one failed audit write of `kind`.
    pub fn audit_failed(&self, kind: &'static str) {
        self.audit_write_failures
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
