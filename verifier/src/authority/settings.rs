//! Verifier settings.

use hopmesh_protocol::hop_token::EpochLength;

/// What to do when a node reports `compromised_key_use`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompromiseMode {
    /// Mark the generation compromised and reissue the affected pair (default).
    AutoReissue,
    /// Only record and alert.
    AlertOnly,
}

/// Verifier settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Attestation lifetime in seconds (default 300).
    pub attestation_ttl: u64,
    /// Mesh epoch length.
    pub epoch: EpochLength,
    /// Pair-seed generation lifetime in seconds (default 300).
    pub generation_secs: u64,
    /// Reaction to compromised key use.
    pub on_compromise: CompromiseMode,
    /// Connection budgets of the node-facing QUIC service (`verifier/src/service.rs`).
    pub connections: crate::service::ConnectionBudgets,
    /// Per-node rate limits and refusal-audit aggregation of the authority.
    pub limits: Limits,
}

/// Default [`Limits::reports_per_window`]: security reports one node may send per window.
pub const REPORTS_PER_WINDOW: u32 = 20;
/// Default [`Limits::report_window_secs`].
pub const REPORT_WINDOW_SECS: u64 = 60;
/// Default [`Limits::address_changes_per_window`]: changes of its advertised addresses one
/// node may make per window (each recompiles the policy and pushes routes to its peers).
pub const ADDRESS_CHANGES_PER_WINDOW: u32 = 4;
/// Default [`Limits::address_change_window_secs`].
pub const ADDRESS_CHANGE_WINDOW_SECS: u64 = 600;

/// Per-node rate limits and the aggregation of refusal audit records.
///
/// A window starts at the first event after the previous window ended (a fixed window per
/// node), so at most `N` events pass per window and at most `2 N` in any span of one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Reports (`NodeRequest::Report`) accepted per reporter per window; past it a report is
    /// refused (`report_rate_limited`), counted and audited aggregated. Default
    /// [`REPORTS_PER_WINDOW`].
    pub reports_per_window: u32,
    /// The report window in seconds. Default [`REPORT_WINDOW_SECS`].
    pub report_window_secs: u64,
    /// Changes of a node's advertised addresses applied per window; past it the refresh still
    /// attests but keeps the old addresses (`address_change_rate_limited`, counted, audited
    /// aggregated) until a refresh in a later window. Default [`ADDRESS_CHANGES_PER_WINDOW`].
    pub address_changes_per_window: u32,
    /// The address-change window in seconds. Default [`ADDRESS_CHANGE_WINDOW_SECS`].
    pub address_change_window_secs: u64,
    /// Refusal audit records: one per (node key, event, reason) per this many seconds, then one
    /// summary with the count. Default
    /// [`DEFAULT_AGGREGATION_INTERVAL_SECS`](hopmesh_protocol::audit_aggregate::DEFAULT_AGGREGATION_INTERVAL_SECS).
    pub audit_interval_secs: u64,
    /// Distinct (node key, event, reason) keys aggregated at once; refusals of further keys
    /// share one "other" bucket. Default
    /// [`DEFAULT_MAX_AGGREGATION_KEYS`](hopmesh_protocol::audit_aggregate::DEFAULT_MAX_AGGREGATION_KEYS).
    pub audit_max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            reports_per_window: REPORTS_PER_WINDOW,
            report_window_secs: REPORT_WINDOW_SECS,
            address_changes_per_window: ADDRESS_CHANGES_PER_WINDOW,
            address_change_window_secs: ADDRESS_CHANGE_WINDOW_SECS,
            audit_interval_secs:
                hopmesh_protocol::audit_aggregate::DEFAULT_AGGREGATION_INTERVAL_SECS,
            audit_max_keys: hopmesh_protocol::audit_aggregate::DEFAULT_MAX_AGGREGATION_KEYS,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            attestation_ttl: 300,
            epoch: EpochLength::DEFAULT,
            generation_secs: 300,
            on_compromise: CompromiseMode::AutoReissue,
            connections: crate::service::ConnectionBudgets::default(),
            limits: Limits::default(),
        }
    }
}
