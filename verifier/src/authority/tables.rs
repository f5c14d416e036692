//! Compiled policy: every live node's table, kept incrementally ([`MeshTables`]), and per
//! node the version and digest of its table as sent, so that a change goes out as a delta
//! against the version the node holds (a subscribe gets a snapshot of the current version).
//!
//! An enrolment, revocation or address change costs work proportional to the entries that
//! change, not to the mesh; a policy reload compiles once and yields only the nodes whose
//! entries differ.

use std::collections::{BTreeSet, HashMap};

use hopmesh_protocol::enrollment::{PeerInfo, Push};
use hopmesh_protocol::ids::{NodeId, NodeName, SegmentName};
use hopmesh_protocol::policy::{MeshTables, NodeDelta, Policy, PolicyDiff};
use hopmesh_protocol::routing::RoutingTable;
use hopmesh_protocol::table_sync::{
    TableChange, TableDigest, TableSyncError, TableUpdate, digest, split, table_of,
};
use hopmesh_protocol::wire::{BoundedString, BoundedVec};

use super::registry::Registry;
use crate::store::NodeRecord;

/// Advertised addresses of a peer sent to a node.
const PEER_ADDRESSES: usize = 4;

/// A permit to hand `me` the seeds of its pair with `peer`: `peer` is in `me`'s current
/// compiled routing table. Only [`Tables`] makes one, so no seed push can be built for a pair
/// that policy forbids (`seeds.rs` takes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AllowedPair {
    me: NodeId,
    peer: NodeId,
}

impl AllowedPair {
    /// The node the seeds go to.
    pub(super) fn me(&self) -> &NodeId {
        &self.me
    }

    /// Its peer.
    pub(super) fn peer(&self) -> &NodeId {
        &self.peer
    }
}

/// The version and digest of a node's table as last sent (a node never sent one holds
/// version 0, empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    version: u64,
    digest: TableDigest,
}

impl Default for Sent {
    fn default() -> Self {
        Self {
            version: 0,
            digest: TableDigest::EMPTY,
        }
    }
}

/// One node's table changed: what to push it.
#[derive(Debug)]
pub(super) struct TableChanged {
    /// The node.
    pub(super) node: NodeId,
    /// The parts of its delta (a snapshot when the delta has too many changes), or why its
    /// table cannot be sent (it is over a `table_sync` limit): never a cut table.
    pub(super) parts: Result<Vec<Push>, TableSyncError>,
    /// Peers it did not have before: only these pairs need seeds.
    pub(super) added_peers: Vec<NodeId>,
}

/// What a policy reload changed.
#[derive(Debug)]
pub(super) struct Reloaded {
    /// Per changed node, its push.
    pub(super) changed: Vec<TableChanged>,
    /// Pairs added and removed.
    pub(super) diff: PolicyDiff,
}

/// The policy and what it compiles to.
#[derive(Debug)]
pub(super) struct Tables {
    mesh: MeshTables,
    sent: HashMap<NodeId, Sent>,
}

/// What `rec`'s peers are told about it.
pub(super) fn peer_info(rec: &NodeRecord) -> PeerInfo {
    PeerInfo {
        node_id: rec.node_id,
        name: rec.name.clone(),
        addresses: BoundedVec::new(
            rec.addresses
                .iter()
                .take(PEER_ADDRESSES)
                .map(|a| BoundedString::truncated(a))
                .collect(),
        )
        .unwrap_or_default(),
    }
}

impl Tables {
    /// Compiles `policy` for the registry's live nodes (each table at version 1).
    pub(super) fn new(policy: Policy, registry: &Registry) -> Self {
        let mut mesh = MeshTables::new(policy);
        for rec in registry.records() {
            if registry.is_live(&rec.node_id)
                && let Err(e) = mesh.enrol(peer_info(rec))
            {
                tracing::error!(error = %e, node = %rec.node_id, "live node left out of the tables");
            }
        }
        let mut sent = HashMap::new();
        for rec in registry.records() {
            if let Some(entries) = &mesh.entries(&rec.node_id) {
                let s = Sent {
                    version: 1,
                    digest: digest(entries),
                };
                sent.insert(rec.node_id, s);
            }
        }
        Self { mesh, sent }
    }

    pub(super) fn policy(&self) -> &Policy {
        self.mesh.policy()
    }

    /// The segments policy gives `name`.
    pub(super) fn segments_of(&self, name: &NodeName) -> Option<&BTreeSet<SegmentName>> {
        self.policy().nodes.get(name)
    }

    /// Does `node` have a table (live and named in policy)?
    pub(super) fn has_table(&self, node: &NodeId) -> bool {
        self.mesh.has_table(node)
    }

    /// `node`'s table, built from its entries (for tests and introspection: O(table)).
    pub(super) fn table(&self, node: &NodeId) -> Option<RoutingTable> {
        self.mesh.entries(node).map(|e| table_of(&e).0)
    }

    /// The nodes `node` pairs with.
    pub(super) fn peers_of(&self, node: &NodeId) -> Vec<NodeId> {
        self.mesh.peers(node).copied().collect()
    }

    /// The permit for `me` to hold seeds with `peer`, if `peer` is in `me`'s current table.
    pub(super) fn allowed_pair(&self, me: &NodeId, peer: &NodeId) -> Option<AllowedPair> {
        self.mesh.is_peer(me, peer).then_some(AllowedPair {
            me: *me,
            peer: *peer,
        })
    }

    /// A permit for each of `me`'s current peers.
    pub(super) fn allowed_pairs_of(&self, me: &NodeId) -> Vec<AllowedPair> {
        self.mesh
            .peers(me)
            .map(|peer| AllowedPair {
                me: *me,
                peer: *peer,
            })
            .collect()
    }

    /// Brings the tables in line with `node`'s registry record (enrolled, re-addressed,
    /// renamed, revoked or banned). Returns the nodes whose table changed.
    pub(super) fn node_changed(&mut self, registry: &Registry, node: &NodeId) -> Vec<TableChanged> {
        let deltas = match registry.get(node) {
            Some(rec) if registry.is_live(node) => match self.mesh.enrol(peer_info(rec)) {
                Ok(d) => d,
                Err(e) => {
                    // The registry never lets two live nodes share a name.
                    tracing::error!(error = %e, node = %node, "node left out of the tables");
                    Vec::new()
                }
            },
            _ => self.mesh.remove(node),
        };
        self.send(deltas)
    }

    /// Replaces the policy: compiles it once and returns what changed.
    pub(super) fn reload(&mut self, policy: Policy) -> Reloaded {
        let deltas = self.mesh.reload(policy);
        let diff = PolicyDiff::of(&deltas);
        Reloaded {
            changed: self.send(deltas),
            diff,
        }
    }

    /// Advances each changed node's version and builds its delta. A node whose table was
    /// dropped keeps its version (a live node a reload left out of policy keeps its stream
    /// and gets the delta to empty).
    fn send(&mut self, deltas: Vec<NodeDelta>) -> Vec<TableChanged> {
        let mut out = Vec::with_capacity(deltas.len());
        for d in deltas {
            let before = self.sent.get(&d.node).copied().unwrap_or_default();
            let mut after = Sent {
                version: before.version + 1,
                digest: before.digest,
            };
            for e in &d.old {
                after.digest = after.digest.without(e);
            }
            for c in &d.changes {
                if let TableChange::Put(e) = c {
                    after.digest = after.digest.with(e);
                }
            }
            let update = TableUpdate::delta(before.version, after.version, d.changes, after.digest)
                .or_else(|_| self.snapshot(&d.node, after.version));
            self.sent.insert(d.node, after);
            out.push(TableChanged {
                node: d.node,
                parts: update.and_then(|u| split(&u)),
                added_peers: d.added_peers,
            });
        }
        out
    }

    fn snapshot(&self, node: &NodeId, version: u64) -> Result<TableUpdate, TableSyncError> {
        TableUpdate::snapshot(version, &self.mesh.entries(node).unwrap_or_default())
    }

    /// The parts of a snapshot of `node`'s table at its current version (empty if it has
    /// none), or why it cannot be sent (over `MAX_TABLE_PEERS` or `MAX_TABLE_BYTES`): never
    /// a cut table.
    pub(super) fn routes_push(&self, node: &NodeId) -> Result<Vec<Push>, TableSyncError> {
        let version = self.sent.get(node).map_or(0, |s| s.version);
        split(&self.snapshot(node, version)?)
    }

    /// The digest the node was last sent, and the digest of its current entries (equal
    /// unless something is broken; for tests).
    #[cfg(test)]
    pub(super) fn digests(&self, node: &NodeId) -> (TableDigest, TableDigest) {
        (
            self.sent.get(node).copied().unwrap_or_default().digest,
            digest(&self.mesh.entries(node).unwrap_or_default()),
        )
    }
}
