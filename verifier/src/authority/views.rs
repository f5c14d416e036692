//! What callers hand in and get back: node references, enrollment requests, operator views
//! and outcomes.

use hopmesh_protocol::enrollment::Address;
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::secret::JoinSecret;
use serde::Serialize;

/// A node named by an operator: a 64-hex node id or a node name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRef {
    /// By id.
    Id(NodeId),
    /// By name.
    Name(NodeName),
}

impl std::str::FromStr for NodeRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() == 64
            && let Ok(id) = s.parse()
        {
            return Ok(Self::Id(id));
        }
        NodeName::new(s)
            .map(Self::Name)
            .map_err(|e| format!("`{s}` is neither a node id nor a node name: {e}"))
    }
}

/// An enrollment request as the service hands it over.
#[derive(Debug)]
pub struct Enrollment<'a> {
    /// The TLS-proven key.
    pub spki: &'a [u8],
    /// The join secret.
    pub join_secret: &'a JoinSecret,
    /// Measurement.
    pub measurement: Measurement,
    /// Advertised addresses.
    pub addresses: &'a [Address],
    /// Host facts, for the audit log.
    pub hostname: &'a str,
}

/// A node as shown to operators.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// Id (hex).
    pub node_id: String,
    /// Name.
    pub name: String,
    /// Segments in policy.
    pub segments: Vec<String>,
    /// Advertised addresses.
    pub addresses: Vec<String>,
    /// Measurement (hex).
    pub measurement: String,
    /// Enrollment time.
    pub enrolled_at: u64,
    /// Revocation time.
    pub revoked_at: Option<u64>,
    /// Push stream open.
    pub connected: bool,
}

/// Result of a revoke.
#[derive(Clone, Debug, Serialize)]
pub struct RevokeOutcome {
    /// The node.
    pub node_id: String,
    /// New revocation-list version.
    pub revocation_version: u64,
    /// Nodes notified.
    pub notified: usize,
}

/// Result of a reissue.
#[derive(Clone, Debug, Serialize)]
pub struct ReissueOutcome {
    /// The pair's reissue count now.
    pub reissues: u16,
    /// Generations now compromised.
    pub compromised: Vec<u64>,
}
