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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            attestation_ttl: 300,
            epoch: EpochLength::DEFAULT,
            generation_secs: 300,
            on_compromise: CompromiseMode::AutoReissue,
            connections: crate::service::ConnectionBudgets::default(),
        }
    }
}
