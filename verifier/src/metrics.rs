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
    /// Version of the current signed revocation list (0: none ever signed): set at start from
    /// the store and on every list installed (a revoke, a prune). Nodes report the version
    /// they hold as `hopmesh_node_revocation_version`.
    pub revocation_version: Gauge,
    /// Pair reissues.
    pub reissues: Counter,
    /// Nodes with an open push stream.
    pub subscribed: Gauge,
    /// Time to check and sign one attestation (an enrolment's or a changed refresh's store
    /// commits, and any wait for the authority lock between its steps, included; the
    /// recompile and pushes that follow excluded).
    pub issuance_seconds: Histogram,
    /// Audit writes that failed, by kind: `best_effort` (the record is lost, the operation
    /// went on), `durable` (the operation was refused), `anchor`, `checkpoint`
    /// (`authority/journal.rs`).
    pub audit_write_failures: Labeled,
    /// `/v1/audit` answers cut at `MAX_PAGE_RECORDS` / `MAX_PAGE_BYTES` (more records follow).
    pub audit_pages_capped: Counter,
    /// Store calls that failed, by kind: `timeout` (no answer within `PG_CALL_TIMEOUT`: not
    /// acknowledged), `postgres` (the server refused, or the connection failed), `sqlite`,
    /// `stale_version` (a revocation list offered below the stored one), `fenced` (the serve
    /// lock is lost: nothing issued or acknowledged), `other`. Counted by
    /// `store::Counted` around whichever store the verifier runs on.
    pub store_failures: Labeled,
    /// Changes of other replicas applied from a shared store's change feed, by kind (`node`,
    /// `list`, `ban`, `pair`; `authority/follow.rs`).
    pub feed_applied: Labeled,
    /// The last change-feed entry this verifier has read (0 on SQLite).
    pub feed_seq: Gauge,
    /// Version of the stored policy served (0: the policy file, on SQLite).
    pub policy_version: Gauge,
    /// Connection attempts and connections refused or closed by the connection budgets
    /// (`verifier/src/service.rs`), by reason.
    pub connection_refusals: Labeled,
    /// Connection attempts answered with a QUIC Retry (address validation under load).
    pub retries: Counter,
    /// Handshakes in flight.
    pub handshakes: Gauge,
    /// Open connections by class (`enrolled`, `unauthenticated`).
    pub connections: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Push subscriptions replaced by a newer one of the same node.
    pub subscriptions_replaced: Counter,
    /// Subscribers that could not keep up and were given a full resync.
    pub subscriber_resyncs: Counter,
    /// Routing-table updates refused whole instead of sent (a node's table over
    /// `MAX_TABLE_PEERS` or `MAX_TABLE_BYTES`, `hopmesh_protocol::table_sync`), by reason
    /// (`too_many_peers`, `too_large`, ...). Each one is also audited (`table_refused`,
    /// aggregated per node and reason).
    pub table_refused: Labeled,
    /// Refusals folded into an aggregated audit summary instead of written one by one
    /// (`authority/refusals.rs`); each is still counted in `refusals`.
    pub audit_aggregated: Counter,
    /// Refusals aggregated in the shared "other" bucket because the bound on distinct keys
    /// (`Limits::audit_max_keys`) was reached.
    pub audit_overflow: Counter,
    /// Nodes of the current seed-rotation round not yet pushed their next generation
    /// (`authority/rotation.rs`).
    pub rotation_backlog: Gauge,
    /// Seed-rotation batches served (each one lock hold of at most `ROTATION_BATCH` nodes).
    pub rotation_batches: Counter,
    /// Wall time of each ticker step that did rotation work (a round built or a batch served):
    /// the longest the authority lock is held for the rotation.
    pub rotation_batch_seconds: Histogram,
    /// Nodes still unserved when the next slot began (the rotation fell behind): they are
    /// served first, at once, in the new round.
    pub rotation_carried_over: Counter,
    /// Node-service authority calls waiting for a blocking slot (`AUTHORITY_TASKS`, or
    /// `ENROLLMENT_TASKS` for enrolments).
    pub authority_waiting: Gauge,
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
        let revocation_version = Gauge::default();
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
        registry.register(
            "revocation_list_version",
            "Version of the current signed revocation list (0: none signed yet)",
            revocation_version.clone(),
        );
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
        let store_failures = Labeled::default();
        registry.register(
            "store_failures",
            "Store calls that failed, by kind (timeout, postgres, sqlite, stale_version, fenced, other)",
            store_failures.clone(),
        );
        let feed_applied = Labeled::default();
        registry.register(
            "feed_applied",
            "Changes of other replicas applied from the change feed, by kind",
            feed_applied.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Version of the stored policy served (0: the policy file of a verifier on SQLite)",
            policy_version.clone(),
        );
        let feed_seq = Gauge::default();
        registry.register("feed_seq", "Last change-feed entry read", feed_seq.clone());
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
        let connection_refusals = Labeled::default();
        let retries = Counter::default();
        let handshakes = Gauge::default();
        let connections = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        let subscriptions_replaced = Counter::default();
        let subscriber_resyncs = Counter::default();
        registry.register(
            "connection_refusals",
            "Connection attempts and connections refused or closed by the connection budgets, by reason",
            connection_refusals.clone(),
        );
        registry.register(
            "retries",
            "Connection attempts answered with a QUIC Retry",
            retries.clone(),
        );
        registry.register("handshakes", "Handshakes in flight", handshakes.clone());
        registry.register(
            "connections",
            "Open node connections, by class",
            connections.clone(),
        );
        registry.register(
            "subscriptions_replaced",
            "Push subscriptions replaced by a newer one of the same node",
            subscriptions_replaced.clone(),
        );
        registry.register(
            "subscriber_resyncs",
            "Subscribers that could not keep up and got a full resync",
            subscriber_resyncs.clone(),
        );
        let table_refused = Labeled::default();
        registry.register(
            "table_refused",
            "Routing-table updates refused whole (table over a table_sync limit), by reason",
            table_refused.clone(),
        );
        let audit_aggregated = Counter::default();
        let audit_overflow = Counter::default();
        registry.register(
            "audit_aggregated",
            "Refusals counted into an aggregated audit summary instead of written one by one",
            audit_aggregated.clone(),
        );
        registry.register(
            "audit_aggregation_overflow",
            "Refusals aggregated in the shared other bucket (distinct-key bound reached)",
            audit_overflow.clone(),
        );
        let rotation_backlog = Gauge::default();
        let rotation_batches = Counter::default();
        let rotation_batch_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        let rotation_carried_over = Counter::default();
        let authority_waiting = Gauge::default();
        registry.register(
            "authority_waiting",
            "Node-service authority calls waiting for a blocking slot",
            authority_waiting.clone(),
        );
        registry.register(
            "rotation_backlog",
            "Nodes of the current seed-rotation round not yet pushed their next generation",
            rotation_backlog.clone(),
        );
        registry.register(
            "rotation_batches",
            "Seed-rotation batches served",
            rotation_batches.clone(),
        );
        registry.register(
            "rotation_batch_seconds",
            "Wall time of each ticker step that did seed-rotation work (one lock hold)",
            rotation_batch_seconds.clone(),
        );
        registry.register(
            "rotation_carried_over",
            "Nodes still unserved by the seed rotation when the next slot began",
            rotation_carried_over.clone(),
        );
        Self {
            registry,
            rotation_backlog,
            rotation_batches,
            rotation_batch_seconds,
            rotation_carried_over,
            authority_waiting,
            audit_aggregated,
            audit_overflow,
            connection_refusals,
            retries,
            handshakes,
            connections,
            subscriptions_replaced,
            subscriber_resyncs,
            table_refused,
            audit_write_failures,
            audit_pages_capped,
            store_failures,
            feed_applied,
            feed_seq,
            policy_version,
            attested,
            refusals,
            pushes,
            reports,
            revocations,
            revocation_version,
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

    /// Counts one refusal by the connection budgets.
    pub fn refused_connection(&self, reason: &'static str) {
        self.connection_refusals
            .get_or_create(&[("reason", reason)])
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
