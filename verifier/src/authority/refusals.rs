//! Why a request was refused: precise reasons for the audit log and metrics, coarse
//! [`Refusal`]s for the node, and the admin API's errors.

use hopmesh_protocol::enrollment::Refusal;
use hopmesh_protocol::policy::PolicyError;

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
            Self::Internal => Refusal::Internal,
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
            Self::Internal => Refusal::Internal,
        }
    }
}
