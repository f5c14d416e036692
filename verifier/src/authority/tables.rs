//! Compiled policy: the policy, every live node's routing table and peer infos, recompiling.

use std::collections::{BTreeMap, BTreeSet};

use hopmesh_protocol::enrollment::{PeerInfo, Push};
use hopmesh_protocol::ids::{NodeId, NodeName, SegmentName};
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::routing::RoutingTable;
use hopmesh_protocol::table_sync::{TableSyncError, TableUpdate, entries_of, split};
use hopmesh_protocol::wire::{BoundedString, BoundedVec};

use super::registry::Registry;

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

/// The policy and what it compiles to.
#[derive(Debug)]
pub(super) struct Tables {
    policy: Policy,
    compiled: BTreeMap<NodeId, (RoutingTable, Vec<PeerInfo>)>,
}

impl Tables {
    /// Nothing compiled yet: call [`recompile`](Self::recompile).
    pub(super) fn new(policy: Policy) -> Self {
        Self {
            policy,
            compiled: BTreeMap::new(),
        }
    }

    pub(super) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy (not yet recompiled).
    pub(super) fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The segments policy gives `name`.
    pub(super) fn segments_of(&self, name: &NodeName) -> Option<&BTreeSet<SegmentName>> {
        self.policy.nodes.get(name)
    }

    pub(super) fn table(&self, node: &NodeId) -> Option<&RoutingTable> {
        self.compiled.get(node).map(|(t, _)| t)
    }

    /// The nodes `node` pairs with.
    pub(super) fn peers_of(&self, node: &NodeId) -> Vec<NodeId> {
        self.compiled
            .get(node)
            .map(|(t, _)| t.peers.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The permit for `me` to hold seeds with `peer`, if `peer` is in `me`'s current table.
    pub(super) fn allowed_pair(&self, me: &NodeId, peer: &NodeId) -> Option<AllowedPair> {
        self.compiled
            .get(me)
            .is_some_and(|(t, _)| t.peers.contains(peer))
            .then_some(AllowedPair {
                me: *me,
                peer: *peer,
            })
    }

    /// A permit for each of `me`'s current peers.
    pub(super) fn allowed_pairs_of(&self, me: &NodeId) -> Vec<AllowedPair> {
        self.peers_of(me)
            .into_iter()
            .map(|peer| AllowedPair { me: *me, peer })
            .collect()
    }

    fn peer_infos(table: &RoutingTable, registry: &Registry) -> Vec<PeerInfo> {
        table
            .peers
            .iter()
            .filter_map(|id| registry.get(id))
            .map(|n| PeerInfo {
                node_id: n.node_id,
                name: n.name.clone(),
                addresses: BoundedVec::new(
                    n.addresses
                        .iter()
                        .take(PEER_ADDRESSES)
                        .map(|a| BoundedString::truncated(a))
                        .collect(),
                )
                .unwrap_or_default(),
            })
            .collect()
    }

    /// Recompiles every table against the registry's directory. Returns the nodes whose table
    /// or peer infos changed (including nodes that lost their table).
    pub(super) fn recompile(&mut self, registry: &Registry) -> Vec<NodeId> {
        let compiled = self.policy.compile(&registry.directory());
        let mut changed = Vec::new();
        let mut next = BTreeMap::new();
        for (id, table) in compiled {
            let peers = Self::peer_infos(&table, registry);
            if self.compiled.get(&id) != Some(&(table.clone(), peers.clone())) {
                changed.push(id);
            }
            next.insert(id, (table, peers));
        }
        changed.extend(
            self.compiled
                .keys()
                .filter(|id| !next.contains_key(id))
                .copied(),
        );
        self.compiled = next;
        changed
    }

    /// The parts of a snapshot of `node`'s table and peers (empty if it has none), or why it
    /// cannot be sent (over `MAX_TABLE_PEERS` or `MAX_TABLE_BYTES`): never a cut table.
    /// Version 0 for now: every change is sent as a new snapshot.
    pub(super) fn routes_push(&self, node: &NodeId) -> Result<Vec<Push>, TableSyncError> {
        let entries = self
            .compiled
            .get(node)
            .map(|(table, peers)| entries_of(table, peers))
            .unwrap_or_default();
        split(&TableUpdate::snapshot(0, &entries)?)
    }
}
