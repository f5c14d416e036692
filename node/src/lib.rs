//! The hopmesh node: QUIC overlay, hop-token stream gate, SOCKS5 endpoint.
//!
//! A library with a thin `main.rs`: [`runtime::start`] takes already-bound sockets and a
//! clock, so tests run many nodes in one process on 127.0.0.1 port 0.
//!
//! What it does not do (yet): relay chains longer than one hop. See the issue notes.
//!
//! # Layout
//! Acyclic: `runtime` wires the others together and nothing imports it.
//! - [`state`]: the node's view of the mesh and every admission decision (no IO).
//! - [`refusal`]: every refusal and close reason, with its stable string and wire code.
//! - [`shared`]: what every task reads (identity, config, state, clock, counters, audit).
//! - [`peer`]: peer connections, the pool, and the [`peer::Dial`] trait.
//! - [`overlay`]: the QUIC endpoint: dial, accept, Hello exchange, control reader, watchdog.
//! - [`verifier_link`]: refresh, pushes and reports over the verifier session.
//! - [`runtime`]: start, the handle and graceful shutdown, the metrics endpoint.
//! - [`gate`]: inbound streams: token, header, backend, relaying.
//! - [`socks`]: the local SOCKS5 endpoint and outbound streams.
//! - [`show`]: `ctl show`, the exact state as JSON.
//! - [`streams`]: the streams being served, so a policy change can end the ones it forbids.
//! - [`splice`]: TCP ⇄ QUIC with half-close and reset on error.
//! - [`sealed`]: both ends of a relayed flow sealed end to end (relays forward records blind).
//! - [`path`]: per-path QUIC transport settings (loopback peers get 64 KiB datagrams).
//! - [`ctl`]: the control socket (`ctl show`).
//! - [`relay_tap`]: test-only relay instrumentation from the environment (netns suite).
//! - [`enroll`]: first contact with the verifier.
//! - [`config`], [`datadir`], [`counters`].

#![forbid(unsafe_code)]

pub mod config;
pub mod counters;
pub mod ctl;
pub mod datadir;
pub mod enroll;
pub mod gate;
pub mod overlay;
pub mod path;
pub mod peer;
pub mod refusal;
pub mod relay_tap;
pub mod runtime;
pub mod sealed;
pub mod shared;
pub mod show;
pub mod socks;
pub mod splice;
pub mod state;
pub mod streams;
pub mod verifier_link;

/// Errors that stop a node command.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    Transport(#[from] hopmesh_transport::TransportError),
    /// The audit log is broken.
    #[error(transparent)]
    Audit(#[from] hopmesh_transport::audit::AuditError),
    /// Talking to the verifier failed.
    #[error(transparent)]
    Verifier(#[from] hopmesh_transport::verifier_client::ClientError),
    /// A setting or file is invalid.
    #[error("{0}")]
    Config(String),
    /// A peer could not be reached or was refused.
    #[error("{0}")]
    Peer(String),
}

impl NodeError {
    /// An IO error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
