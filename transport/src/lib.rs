//! TLS and QUIC plumbing shared by the hopmesh node and verifier.
//!
//! Both daemons must build their rustls configs identically and safely (TLS 1.3 only, no
//! resumption, no 0-RTT, verifiers that check handshake signatures), so that code lives once,
//! here, instead of in two crates that must never depend on each other. This crate holds no
//! policy: who may connect is decided by a [`tls::PeerAuthorizer`] the caller supplies.
//!
//! # Layout
//! - [`audit`]: the hash-chained JSON-lines audit log.
//! - [`clock`]: the system clock with a test offset.
//! - [`identity`]: Ed25519 key files (0600), self-signed certificates, SPKI extraction.
//! - [`pins`]: the verifier pins a node trusts.
//! - [`tls`]: rustls server and client configs and the custom certificate verifiers.
//! - [`verifier_client`]: the node side of the verifier protocol.
//! - [`quic`]: quinn endpoints, peer identity, exporter binding, capped frame IO, error codes.

#![forbid(unsafe_code)]

pub mod audit;
pub mod clock;
pub mod identity;
pub mod pins;
pub mod quic;
pub mod tls;
pub mod verifier_cert;
pub mod verifier_client;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being accessed.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file does not hold a usable Ed25519 PKCS#8 key.
    #[error("bad key: {0}")]
    Key(String),
    /// A key file is readable by group or others.
    #[error("{0}: key file must not be readable by group or others (chmod 600)")]
    KeyPermissions(String),
    /// The OS random generator failed.
    #[error("random number generator failed")]
    Rng,
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The crypto provider lacks the QUIC initial suite.
    #[error("no QUIC initial cipher suite")]
    NoInitialSuite,
    /// The TLS exporter was unavailable (it is, once the handshake completed).
    #[error("TLS exporter unavailable")]
    Exporter,
}

impl TransportError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
