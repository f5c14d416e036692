//! The verifier's error type.

use hopmesh_protocol::policy::PolicyError;
use hopmesh_transport::TransportError;
use hopmesh_transport::audit::AuditError;

use crate::authority::AdminError;
use crate::store::StoreError;

/// Errors that stop a verifier command.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// A file or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Keys, TLS or QUIC setup failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store is missing, corrupt or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log is broken or failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// An admin operation failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A setting or file content is invalid.
    #[error("{0}")]
    Config(String),
}

impl VerifierError {
    /// An IO error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
