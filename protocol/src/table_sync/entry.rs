//! A node's routing table as a set of flat entries, each with a unique key: the unit of a
//! delta. A [`RoutingTable`] plus its peer infos converts to entries and back without loss.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::enrollment::PeerInfo;
use crate::ids::{NodeId, ServiceId};
use crate::routing::{
    Backend, EgressRoute, EgressTable, IngressEntry, IngressTable, MeshName, RoutingTable,
};

/// One fact of a node's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableEntry {
    /// A peer this node may hold a connection with (either direction), and how to reach it.
    Peer(PeerInfo),
    /// A name this node's apps may reach.
    Route(EgressRoute),
    /// A service this node serves.
    Service {
        /// Its id.
        service: ServiceId,
        /// Its name.
        name: MeshName,
        /// Where streams for it go.
        backend: Backend,
    },
    /// `peer` may open streams for `service` (served here) directly.
    Allowed {
        /// The service.
        service: ServiceId,
        /// The peer.
        peer: NodeId,
    },
    /// `origin` may use `service` (served here) through `relay`.
    Relayed {
        /// The service.
        service: ServiceId,
        /// The relay.
        relay: NodeId,
        /// The origin.
        origin: NodeId,
    },
    /// As a relay: `origin`'s streams for `service` go on to `next`.
    Transit {
        /// The origin.
        origin: NodeId,
        /// The service.
        service: ServiceId,
        /// The next node (the serving node).
        next: NodeId,
    },
}

/// The unique key of a [`TableEntry`]: a delta removes by key, and a put replaces the entry
/// with the same key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TableKey {
    /// [`TableEntry::Peer`].
    Peer(NodeId),
    /// [`TableEntry::Route`].
    Route(MeshName),
    /// [`TableEntry::Service`].
    Service(ServiceId),
    /// [`TableEntry::Allowed`]: service, peer.
    Allowed(ServiceId, NodeId),
    /// [`TableEntry::Relayed`]: service, relay, origin.
    Relayed(ServiceId, NodeId, NodeId),
    /// [`TableEntry::Transit`]: origin, service.
    Transit(NodeId, ServiceId),
}

impl TableEntry {
    /// The entry's key.
    pub fn key(&self) -> TableKey {
        match self {
            Self::Peer(p) => TableKey::Peer(p.node_id),
            Self::Route(r) => TableKey::Route(r.name.clone()),
            Self::Service { service, .. } => TableKey::Service(*service),
            Self::Allowed { service, peer } => TableKey::Allowed(*service, *peer),
            Self::Relayed {
                service,
                relay,
                origin,
            } => TableKey::Relayed(*service, *relay, *origin),
            Self::Transit {
                origin, service, ..
            } => TableKey::Transit(*origin, *service),
        }
    }
}

/// One change of a delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableChange {
    /// Adds the entry, or replaces the one with its key.
    Put(TableEntry),
    /// Removes the entry with this key (which must exist).
    Remove(TableKey),
}

/// A table as entries by key.
pub type Entries = BTreeMap<TableKey, TableEntry>;

/// The entries of `table` with the peer infos `peers` (a peer of the table without an info
/// gets none: the verifier always sends both).
pub fn entries_of(table: &RoutingTable, peers: &[PeerInfo]) -> Entries {
    let mut out = Entries::new();
    let mut put = |e: TableEntry| {
        out.insert(e.key(), e);
    };
    for p in peers.iter().filter(|p| table.peers.contains(&p.node_id)) {
        put(TableEntry::Peer(p.clone()));
    }
    for r in table.egress.routes() {
        put(TableEntry::Route(r.clone()));
    }
    for e in table.ingress.entries() {
        put(TableEntry::Service {
            service: e.service,
            name: e.name.clone(),
            backend: e.backend.clone(),
        });
        for peer in &e.allowed_peers {
            put(TableEntry::Allowed {
                service: e.service,
                peer: *peer,
            });
        }
        for (relay, origin) in &e.relayed {
            put(TableEntry::Relayed {
                service: e.service,
                relay: *relay,
                origin: *origin,
            });
        }
    }
    for (origin, service, next) in table.ingress.transit() {
        put(TableEntry::Transit {
            origin,
            service,
            next,
        });
    }
    out
}

/// The routing table and peer infos the entries describe. `Allowed` and `Relayed` entries
/// of a service without its `Service` entry are dropped (a consistent table has none).
pub fn table_of(entries: &Entries) -> (RoutingTable, Vec<PeerInfo>) {
    let mut peers = Vec::new();
    let mut routes = Vec::new();
    let mut services: BTreeMap<ServiceId, IngressEntry> = BTreeMap::new();
    let mut allowed = Vec::new();
    let mut relayed = Vec::new();
    let mut transit = Vec::new();
    for e in entries.values() {
        match e {
            TableEntry::Peer(p) => peers.push(p.clone()),
            TableEntry::Route(r) => routes.push(r.clone()),
            TableEntry::Service {
                service,
                name,
                backend,
            } => {
                services.insert(
                    *service,
                    IngressEntry {
                        service: *service,
                        name: name.clone(),
                        backend: backend.clone(),
                        allowed_peers: BTreeSet::new(),
                        relayed: BTreeSet::new(),
                    },
                );
            }
            TableEntry::Allowed { service, peer } => allowed.push((*service, *peer)),
            TableEntry::Relayed {
                service,
                relay,
                origin,
            } => relayed.push((*service, *relay, *origin)),
            TableEntry::Transit {
                origin,
                service,
                next,
            } => transit.push((*origin, *service, *next)),
        }
    }
    for (s, p) in allowed {
        if let Some(e) = services.get_mut(&s) {
            e.allowed_peers.insert(p);
        }
    }
    for (s, r, o) in relayed {
        if let Some(e) = services.get_mut(&s) {
            e.relayed.insert((r, o));
        }
    }
    let table = RoutingTable {
        egress: EgressTable::from_routes(routes),
        ingress: IngressTable::from_entries(services.into_values()).with_transit(transit),
        peers: peers.iter().map(|p| p.node_id).collect(),
    };
    (table, peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeName;
    use crate::routing::DEFAULT_MESH_SUFFIX;
    use crate::wire::BoundedVec;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    fn info(b: u8) -> PeerInfo {
        PeerInfo {
            node_id: id(b),
            name: NodeName::new(&format!("n{b}")).expect("name"),
            addresses: BoundedVec::empty(),
        }
    }

    #[test]
    fn a_table_survives_entries_and_back() {
        let api = MeshName::parse("api.payments.mesh", DEFAULT_MESH_SUFFIX).expect("name");
        let db = MeshName::parse("db.payments.mesh", DEFAULT_MESH_SUFFIX).expect("name");
        let table = RoutingTable {
            egress: EgressTable::from_routes([EgressRoute {
                name: db.clone(),
                service: db.service_id(),
                serving_node: id(2),
                via: Some(id(3)),
            }]),
            ingress: IngressTable::from_entries([IngressEntry {
                service: api.service_id(),
                name: api.clone(),
                backend: Backend {
                    host: "127.0.0.1".into(),
                    port: 80,
                },
                allowed_peers: [id(2)].into(),
                relayed: [(id(3), id(4))].into(),
            }])
            .with_transit([(id(4), db.service_id(), id(2))]),
            peers: [id(2), id(3), id(4)].into(),
        };
        let peers = vec![info(2), info(3), info(4)];
        let entries = entries_of(&table, &peers);
        assert_eq!(entries.len(), 3 + 1 + 1 + 1 + 1 + 1);
        for (k, e) in &entries {
            assert_eq!(*k, e.key());
        }
        assert_eq!(table_of(&entries), (table, peers));
    }
}
