//! Why a request was refused: precise reasons for the audit log and metrics, coarse
//! [`Refusal`]s for the node, and the admin API's errors; and how repeatable refusals are
//! audited: aggregated ([`RefusalAudit`], one record per key and interval with a count).

use hopmesh_protocol::audit_aggregate::{Aggregator, Bucket, Decision, Summary};
use hopmesh_protocol::enrollment::Refusal;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::policy::PolicyError;
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::fields;

use super::Authority;
use super::settings::Limits;
use crate::store::StoreError;

/// Errors of admin operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such node.
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    /// The node is already revoked.
    #[error("node `{0}` is already revoked")]
    AlreadyRevoked(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The new policy does not parse or check.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The store failed: nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pair has been reissued 65535 times.
    #[error("pair reissue limit reached; revoke and re-enroll one of the nodes")]
    ReissueLimit,
    /// Signing or encoding failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Why an enrollment was refused: precise, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No such join secret.
    JoinSecretUnknown,
    /// Used before.
    JoinSecretUsed,
    /// Expired.
    JoinSecretExpired,
    /// The key is banned.
    KeyBanned,
    /// The name is banned.
    NameBanned,
    /// The name is not a node in policy.
    NameNotInPolicy,
    /// The join secret's segments differ from policy.
    SegmentsMismatch,
    /// The measurement is not allowed.
    Measurement,
    /// Another live key holds the name.
    NameTaken,
    /// An advertised address is not host:port.
    BadAddress,
    /// Another admission of this key is committing its record: retry.
    CommitInFlight,
    /// The store failed.
    Internal,
}

impl EnrollRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::JoinSecretUnknown => "join_secret_unknown",
            Self::JoinSecretUsed => "join_secret_used",
            Self::JoinSecretExpired => "join_secret_expired",
            Self::KeyBanned => "key_banned",
            Self::NameBanned => "name_banned",
            Self::NameNotInPolicy => "name_not_in_policy",
            Self::SegmentsMismatch => "segments_mismatch",
            Self::Measurement => "measurement_not_allowed",
            Self::NameTaken => "name_taken",
            Self::BadAddress => "bad_address",
            Self::CommitInFlight => "commit_in_flight",
            Self::Internal => "internal",
        }
    }

    /// What the node is told.
    pub fn to_wire(self) -> Refusal {
        match self {
            Self::JoinSecretUnknown | Self::JoinSecretUsed | Self::JoinSecretExpired => {
                Refusal::JoinSecret
            }
            Self::KeyBanned | Self::NameBanned => Refusal::Revoked,
            Self::NameNotInPolicy | Self::SegmentsMismatch => Refusal::NotInPolicy,
            Self::Measurement => Refusal::Measurement,
            Self::NameTaken => Refusal::NameTaken,
            Self::BadAddress => Refusal::BadRequest,
            Self::CommitInFlight | Self::Internal => Refusal::Internal,
        }
    }
}

/// Why a refresh (or another request by an enrolled key) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshRefusal {
    /// The key never enrolled.
    NotEnrolled,
    /// The node is revoked.
    Revoked,
    /// The key or name is banned.
    Banned,
    /// The measurement is not allowed.
    Measurement,
    /// Policy no longer names the node.
    NotInPolicy,
    /// An advertised address is not host:port.
    BadAddress,
    /// Another refresh of this key is committing its changed record: retry.
    CommitInFlight,
    /// Signing or the store failed.
    Internal,
}

impl RefreshRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotEnrolled => "not_enrolled",
            Self::Revoked => "revoked",
            Self::Banned => "banned",
            Self::Measurement => "measurement_not_allowed",
            Self::NotInPolicy => "name_not_in_policy",
            Self::BadAddress => "bad_address",
            Self::CommitInFlight => "commit_in_flight",
            Self::Internal => "internal",
        }
    }

    /// What the node is told.
    pub fn to_wire(self) -> Refusal {
        match self {
            Self::NotEnrolled => Refusal::NotEnrolled,
            Self::Revoked | Self::Banned => Refusal::Revoked,
            Self::Measurement => Refusal::Measurement,
            Self::NotInPolicy => Refusal::NotInPolicy,
            Self::BadAddress => Refusal::BadRequest,
            Self::CommitInFlight | Self::Internal => Refusal::Internal,
        }
    }
}

/// Why a node's security report was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportRefusal {
    /// The reporter is not enrolled, or revoked.
    NotLive,
    /// The reporter is past its report limit ([`Limits::reports_per_window`]).
    RateLimited,
    /// The report names the reporter itself.
    AboutSelf,
    /// The named peer is not in the reporter's current routing table: a node may not get
    /// arbitrary pairs reissued or arbitrary nodes flagged.
    PeerNotInTable,
}

impl ReportRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotLive => "report_not_live",
            Self::RateLimited => "report_rate_limited",
            Self::AboutSelf => "report_about_self",
            Self::PeerNotInTable => "report_peer_not_in_table",
        }
    }

    /// What the node is told.
    pub fn to_wire(self) -> Refusal {
        match self {
            Self::NotLive => Refusal::NotEnrolled,
            Self::RateLimited | Self::AboutSelf | Self::PeerNotInTable => Refusal::BadRequest,
        }
    }
}

/// Key of one aggregated refusal: the TLS-proven key, the audit event, the reason.
type RefusalKey = (NodeId, &'static str, &'static str);

/// Aggregation of refusal audit records: a refusal a caller can repeat (a bogus enrollment, a
/// refresh of an unknown key, a flood of reports) costs one record per key and interval plus
/// one summary, never a write per request. Every refusal is still counted in
/// `hopmesh_verifier_refusals` by reason.
#[derive(Debug)]
pub(super) struct RefusalAudit {
    agg: Aggregator<RefusalKey>,
    /// The latest time seen, for the drain on drop.
    last_now: UnixTime,
}

impl RefusalAudit {
    pub(super) fn new(limits: &Limits, now: UnixTime) -> Self {
        Self {
            agg: Aggregator::new(limits.audit_interval_secs, limits.audit_max_keys),
            last_now: now,
        }
    }
}

impl Authority {
    /// Counts and audits (aggregated) one refusal of a request by `node`'s key. `extra`
    /// fields go into the first record of an interval only; attacker-chosen text in them must
    /// be cut with
    /// [`bounded_text`](hopmesh_protocol::audit_aggregate::bounded_text).
    pub(super) fn refuse(
        &mut self,
        now: UnixTime,
        event: &'static str,
        node: &NodeId,
        reason: &'static str,
        extra: serde_json::Map<String, serde_json::Value>,
    ) {
        self.metrics.refused(reason);
        self.flush_refusal_audit(now);
        let overflowed = self.refusal_audit.agg.overflowed();
        let decision = self.refusal_audit.agg.observe((*node, event, reason), now);
        if self.refusal_audit.agg.overflowed() > overflowed {
            self.metrics.audit_overflow.inc();
        }
        if decision == Decision::Count {
            self.metrics.audit_aggregated.inc();
            return;
        }
        let mut f = fields! {"node" => node.to_string(), "reason" => reason};
        f.extend(extra);
        if decision == Decision::WriteOther {
            // Further refusals of keys not tracked yet are summarised as `node: "other"`.
            f.insert("aggregated".into(), "other".into());
        }
        self.audit(now, event, f);
    }

    /// Writes a `refusals_aggregated` record for every refusal key whose interval ended.
    /// Called by [`refuse`](Self::refuse) and [`tick`](Self::tick).
    pub(super) fn flush_refusal_audit(&mut self, now: UnixTime) {
        self.refusal_audit.last_now = self.refusal_audit.last_now.max(now);
        let summaries = self.refusal_audit.agg.flush(now);
        self.write_refusal_summaries(now, summaries);
    }

    fn write_refusal_summaries(&mut self, now: UnixTime, summaries: Vec<Summary<RefusalKey>>) {
        for s in summaries {
            let (node, event, reason) = match &s.key {
                Bucket::Key((node, event, reason)) => (node.to_string(), *event, *reason),
                Bucket::Other => ("other".to_owned(), "other", "other"),
            };
            self.audit(
                now,
                "refusals_aggregated",
                fields! {"refused_event" => event, "node" => node, "reason" => reason, "count" => s.count,
                "first" => s.first.as_secs(), "last" => s.last.as_secs()},
            );
        }
    }

    /// A node request that did not parse or arrive in time (the service calls this): counted
    /// as `bad_request` and audited aggregated.
    pub fn bad_request(&mut self, node: &NodeId, now: UnixTime) {
        self.refuse(
            now,
            "request_refused",
            node,
            "bad_request",
            serde_json::Map::new(),
        );
    }
}

impl Drop for Authority {
    /// Writes the pending refusal summaries (shutdown), due or not.
    fn drop(&mut self) {
        let now = self.refusal_audit.last_now;
        let summaries = self.refusal_audit.agg.drain();
        self.write_refusal_summaries(now, summaries);
    }
}
