//! Incremental compilation: every live node's table as [`Entries`], kept up to date by
//! enrolment, removal and address changes with work proportional to the entries that change
//! (not to the mesh), and a policy reload that recompiles only the nodes the policy change
//! can touch.
//!
//! A node's table is the union of *relationships*, each owning entries no other relationship
//! has (docs/design.md, "Segments, services, routing, relays"):
//! - the node's own services: one `Service` entry each;
//! - direct: `user` may use `service` of `server` and no `[[route]]` goes from `user` to
//!   `server`: `user` gets `Route(service -> server)` and peer `server`; `server` gets
//!   `Allowed { service, user }` and peer `user`;
//! - relayed: `[[route]] from = origin, to = server, via = relay`, `origin` may use
//!   `service` of `server`, all three live: `origin` gets `Route(service -> server via
//!   relay)` and peer `relay`; `relay` gets `Transit { origin, service, server }` and peers
//!   `origin` and `server`; `server` gets `Relayed { service, relay, origin }` and peer
//!   `relay`. With the relay not live there is no route at all (never a direct fallback).
//!
//! A peer may be one for several reasons (relationships): each table counts the reasons per
//! peer and holds the `Peer` entry while the count is above zero. Peering is symmetric, so
//! the nodes holding `X` as a peer are `X`'s own peers (an address change touches only them).
//!
//! [`Policy::compile_for`] is the reference: the tests check that the entries here equal
//! `entries_of(compile_for(..))` for every node after every step of random sequences of
//! enrolments, removals, address changes and reloads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::enrollment::PeerInfo;
use crate::ids::{NodeId, NodeName, SegmentName, ServiceId};
use crate::routing::{Backend, EgressRoute, MeshName};
use crate::table_sync::{Entries, TableChange, TableEntry, TableKey};

use super::{Policy, RuleTarget};

/// Why an operation was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// Another live node holds the name (the registry never lets two live nodes share one).
    #[error("name `{0}` is held by another live node")]
    NameHeld(NodeName),
}

/// Whether a node's table appeared, disappeared, or was there before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableState {
    /// It had a table before and has one after.
    Kept,
    /// It has a table now (it enrolled, or a reload named it).
    Created,
    /// It has none now (it was removed, or a reload dropped its name).
    Dropped,
}

/// What one operation changed in one node's table. A node without a table counts as one
/// with no entries, so `changes` applied to the entries before give the entries after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDelta {
    /// The node.
    pub node: NodeId,
    /// Whether its table appeared or disappeared.
    pub state: TableState,
    /// In key order, each key once.
    pub changes: Vec<TableChange>,
    /// The entries before that `changes` replace or remove (to update an order-free digest
    /// without rehashing the table).
    pub old: Vec<TableEntry>,
    /// Peers it did not have before, in order.
    pub added_peers: Vec<NodeId>,
    /// Peers it no longer has, in order.
    pub removed_peers: Vec<NodeId>,
}

/// The pairs (`a < b`) that `deltas` add and remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Pairs that now exist and did not before.
    pub pairs_added: BTreeSet<(NodeId, NodeId)>,
    /// Pairs that no longer exist.
    pub pairs_removed: BTreeSet<(NodeId, NodeId)>,
}

impl PolicyDiff {
    /// The pairs added and removed across `deltas` (each pair once, whichever end reports it).
    pub fn of(deltas: &[NodeDelta]) -> Self {
        let pair = |a: NodeId, b: NodeId| if a < b { (a, b) } else { (b, a) };
        let mut out = Self::default();
        for d in deltas {
            out.pairs_added
                .extend(d.added_peers.iter().map(|p| pair(d.node, *p)));
            out.pairs_removed
                .extend(d.removed_peers.iter().map(|p| pair(d.node, *p)));
        }
        out
    }
}

/// The policy indexed for incremental compilation.
#[derive(Clone, Debug)]
struct Index {
    policy: Policy,
    /// Per service: the segments whose members may use it.
    allowed: BTreeMap<MeshName, BTreeSet<SegmentName>>,
    /// Per segment: the services its members may use.
    usable: BTreeMap<SegmentName, BTreeSet<MeshName>>,
    /// Per node: the services it serves.
    serves: BTreeMap<NodeName, Vec<MeshName>>,
    /// Per relay node: the routes `(from, to)` through it.
    relays: BTreeMap<NodeName, Vec<(NodeName, NodeName)>>,
    /// Per service: the one copy of its name that every `Route` to it shares.
    names: BTreeMap<MeshName, Arc<MeshName>>,
}

impl Index {
    fn new(policy: Policy) -> Self {
        let mut in_segment: BTreeMap<&SegmentName, Vec<&MeshName>> = BTreeMap::new();
        for mesh in policy.services.keys() {
            in_segment.entry(&mesh.segment).or_default().push(mesh);
        }
        let mut allowed: BTreeMap<MeshName, BTreeSet<SegmentName>> = BTreeMap::new();
        let mut usable: BTreeMap<SegmentName, BTreeSet<MeshName>> = BTreeMap::new();
        for rule in &policy.rules {
            let targets: Vec<&MeshName> = match &rule.to {
                RuleTarget::Service(m) => policy
                    .services
                    .get_key_value(m)
                    .map(|(k, _)| k)
                    .into_iter()
                    .collect(),
                RuleTarget::Segment(seg) => in_segment.get(seg).cloned().unwrap_or_default(),
            };
            for mesh in targets {
                allowed
                    .entry(mesh.clone())
                    .or_default()
                    .insert(rule.from.clone());
                usable
                    .entry(rule.from.clone())
                    .or_default()
                    .insert(mesh.clone());
            }
        }
        let mut serves: BTreeMap<NodeName, Vec<MeshName>> = BTreeMap::new();
        for (mesh, spec) in &policy.services {
            serves
                .entry(spec.node.clone())
                .or_default()
                .push(mesh.clone());
        }
        let mut relays: BTreeMap<NodeName, Vec<(NodeName, NodeName)>> = BTreeMap::new();
        for ((from, to), via) in &policy.routes {
            relays
                .entry(via.clone())
                .or_default()
                .push((from.clone(), to.clone()));
        }
        let names = policy
            .services
            .keys()
            .map(|m| (m.clone(), Arc::new(m.clone())))
            .collect();
        Self {
            policy,
            allowed,
            usable,
            serves,
            relays,
            names,
        }
    }

    /// [`Policy::node_may_use`], through the index.
    fn may_use(&self, user: &NodeName, mesh: &MeshName) -> bool {
        let (Some(spec), Some(segments), Some(allowed)) = (
            self.policy.services.get(mesh),
            self.policy.nodes.get(user),
            self.allowed.get(mesh),
        ) else {
            return false;
        };
        spec.node != *user && segments.iter().any(|s| allowed.contains(s))
    }

    /// The node names whose relationships may differ between `self` and `next`: every
    /// relationship that involves none of them is the same under both. A relationship
    /// `(user, service, server, relay)` depends on the user's segments, the service's spec
    /// (id, serving node, backend) and the segments allowed to use it, and the route from
    /// user to server; so the names are the nodes whose segments changed, the old and new
    /// serving nodes of every service whose spec or allowed segments changed, and the origin
    /// of every route that changed.
    fn touched_by(&self, next: &Self) -> BTreeSet<NodeName> {
        let mut out = BTreeSet::new();
        let (a, b) = (&self.policy, &next.policy);
        for name in a.nodes.keys().chain(b.nodes.keys()) {
            if a.nodes.get(name) != b.nodes.get(name) {
                out.insert(name.clone());
            }
        }
        for mesh in a.services.keys().chain(b.services.keys()) {
            let (sa, sb) = (a.services.get(mesh), b.services.get(mesh));
            if sa != sb || self.allowed.get(mesh) != next.allowed.get(mesh) {
                out.extend(sa.into_iter().chain(sb).map(|s| s.node.clone()));
            }
        }
        for key in a.routes.keys().chain(b.routes.keys()) {
            if a.routes.get(key) != b.routes.get(key) {
                out.insert(key.0.clone());
            }
        }
        out
    }
}

/// One relationship: `user` may use `service` of `server`, through `relay` if one.
#[derive(Clone, Debug)]
struct Rel {
    name: MeshName,
    service: ServiceId,
    server: NodeId,
    user: NodeId,
    relay: Option<NodeId>,
}

/// A live node's table, stored compactly, and why each peer is one. Its entries
/// ([`NodeTable::entries`]) are materialised on demand: a `Peer` entry from the live map (one
/// `PeerInfo` per live node, not one copy per table listing it), a `Route`'s name from the
/// one `Arc<MeshName>` per service, every other entry from ids alone. At 99 peers this is a
/// fifth of the memory of the table as [`Entries`] (benches/benches/mesh_tables.rs measures it).
#[derive(Clone, Debug, Default)]
struct NodeTable {
    /// Per peer: how many relationships make it one (never 0). The `Peer` entries.
    reasons: BTreeMap<NodeId, u32>,
    /// `Service` entries.
    services: BTreeMap<ServiceId, (MeshName, Backend)>,
    /// `Route` entries by name: service, serving node, relay.
    routes: BTreeMap<Arc<MeshName>, (ServiceId, NodeId, Option<NodeId>)>,
    /// `Allowed` entries.
    allowed: BTreeSet<(ServiceId, NodeId)>,
    /// `Relayed` entries: service, relay, origin.
    relayed: BTreeSet<(ServiceId, NodeId, NodeId)>,
    /// `Transit` entries: (origin, service) to next.
    transit: BTreeMap<(NodeId, ServiceId), NodeId>,
}

impl NodeTable {
    /// The entry with `key`, if any (a `Peer` entry needs the peer live).
    fn get(&self, key: &TableKey, live: &BTreeMap<NodeId, PeerInfo>) -> Option<TableEntry> {
        match key {
            TableKey::Peer(p) => {
                if self.reasons.contains_key(p) {
                    live.get(p).cloned().map(TableEntry::Peer)
                } else {
                    None
                }
            }
            TableKey::Route(name) => self.routes.get_key_value(name).map(route_entry),
            TableKey::Service(s) => {
                self.services
                    .get(s)
                    .map(|(name, backend)| TableEntry::Service {
                        service: *s,
                        name: name.clone(),
                        backend: backend.clone(),
                    })
            }
            TableKey::Allowed(service, peer) => self
                .allowed
                .contains(&(*service, *peer))
                .then_some(TableEntry::Allowed {
                    service: *service,
                    peer: *peer,
                }),
            TableKey::Relayed(service, relay, origin) => self
                .relayed
                .contains(&(*service, *relay, *origin))
                .then_some(TableEntry::Relayed {
                    service: *service,
                    relay: *relay,
                    origin: *origin,
                }),
            TableKey::Transit(origin, service) => {
                self.transit
                    .get(&(*origin, *service))
                    .map(|next| TableEntry::Transit {
                        origin: *origin,
                        service: *service,
                        next: *next,
                    })
            }
        }
    }

    /// Stores a non-`Peer` entry (peers are counted in `reasons`), `name` the shared copy of
    /// a route's name.
    fn put(&mut self, entry: TableEntry, name: impl FnOnce(&MeshName) -> Arc<MeshName>) {
        match entry {
            TableEntry::Peer(_) => debug_assert!(false, "peers are counted, not stored"),
            TableEntry::Route(r) => {
                let name = name(&r.name);
                // Replace the key too: a reload may hand out a new shared copy.
                self.routes.remove(&r.name);
                self.routes.insert(name, (r.service, r.serving_node, r.via));
            }
            TableEntry::Service {
                service,
                name,
                backend,
            } => {
                self.services.insert(service, (name, backend));
            }
            TableEntry::Allowed { service, peer } => {
                self.allowed.insert((service, peer));
            }
            TableEntry::Relayed {
                service,
                relay,
                origin,
            } => {
                self.relayed.insert((service, relay, origin));
            }
            TableEntry::Transit {
                origin,
                service,
                next,
            } => {
                self.transit.insert((origin, service), next);
            }
        }
    }

    /// Drops a non-`Peer` entry.
    fn drop_key(&mut self, key: &TableKey) {
        match key {
            TableKey::Peer(_) => debug_assert!(false, "peers are counted, not stored"),
            TableKey::Route(name) => {
                self.routes.remove(name);
            }
            TableKey::Service(s) => {
                self.services.remove(s);
            }
            TableKey::Allowed(s, p) => {
                self.allowed.remove(&(*s, *p));
            }
            TableKey::Relayed(s, r, o) => {
                self.relayed.remove(&(*s, *r, *o));
            }
            TableKey::Transit(o, s) => {
                self.transit.remove(&(*o, *s));
            }
        }
    }

    /// Every entry, materialised.
    fn entries(&self, live: &BTreeMap<NodeId, PeerInfo>) -> Entries {
        let mut out = Entries::new();
        let mut put = |e: TableEntry| {
            out.insert(e.key(), e);
        };
        for p in self.reasons.keys() {
            if let Some(info) = live.get(p) {
                put(TableEntry::Peer(info.clone()));
            }
        }
        for r in &self.routes {
            put(route_entry(r));
        }
        for (service, (name, backend)) in &self.services {
            put(TableEntry::Service {
                service: *service,
                name: name.clone(),
                backend: backend.clone(),
            });
        }
        for (service, peer) in &self.allowed {
            put(TableEntry::Allowed {
                service: *service,
                peer: *peer,
            });
        }
        for (service, relay, origin) in &self.relayed {
            put(TableEntry::Relayed {
                service: *service,
                relay: *relay,
                origin: *origin,
            });
        }
        for ((origin, service), next) in &self.transit {
            put(TableEntry::Transit {
                origin: *origin,
                service: *service,
                next: *next,
            });
        }
        out
    }

    /// How many entries (a `Peer` entry per counted peer: they are all live).
    fn len(&self) -> usize {
        self.reasons.len()
            + self.routes.len()
            + self.services.len()
            + self.allowed.len()
            + self.relayed.len()
            + self.transit.len()
    }
}

fn route_entry(
    (name, (service, server, via)): (&Arc<MeshName>, &(ServiceId, NodeId, Option<NodeId>)),
) -> TableEntry {
    TableEntry::Route(EgressRoute {
        name: MeshName::clone(name),
        service: *service,
        serving_node: *server,
        via: *via,
    })
}

/// What an operation touched: each key's value and each table's existence before it.
#[derive(Debug, Default)]
struct Journal {
    on: bool,
    before: BTreeMap<NodeId, BTreeMap<TableKey, Option<TableEntry>>>,
    had_table: BTreeMap<NodeId, bool>,
}

impl Journal {
    fn recording() -> Self {
        Self {
            on: true,
            ..Self::default()
        }
    }

    fn touch(&mut self, node: NodeId, key: TableKey, before: Option<TableEntry>) {
        if self.on {
            self.before
                .entry(node)
                .or_default()
                .entry(key)
                .or_insert(before);
        }
    }

    fn table(&mut self, node: NodeId, had: bool) {
        if self.on {
            self.had_table.entry(node).or_insert(had);
        }
    }
}

/// Every live node's table, kept incrementally.
#[derive(Clone, Debug)]
pub struct MeshTables {
    index: Index,
    /// Live nodes and what their peers are told about them.
    live: BTreeMap<NodeId, PeerInfo>,
    by_name: BTreeMap<NodeName, NodeId>,
    /// Per segment: its live members.
    members: BTreeMap<SegmentName, BTreeSet<NodeName>>,
    /// Live nodes named in policy.
    tables: BTreeMap<NodeId, NodeTable>,
}

impl MeshTables {
    /// No live node yet.
    pub fn new(policy: Policy) -> Self {
        Self {
            index: Index::new(policy),
            live: BTreeMap::new(),
            by_name: BTreeMap::new(),
            members: BTreeMap::new(),
            tables: BTreeMap::new(),
        }
    }

    /// The policy compiled.
    pub fn policy(&self) -> &Policy {
        &self.index.policy
    }

    /// Live nodes.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// No live node.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// `node`'s entries, materialised (O(table)); `None` if it is not live or not named in
    /// policy.
    pub fn entries(&self, node: &NodeId) -> Option<Entries> {
        self.tables.get(node).map(|t| t.entries(&self.live))
    }

    /// Does `node` have a table (live and named in policy)?
    pub fn has_table(&self, node: &NodeId) -> bool {
        self.tables.contains_key(node)
    }

    /// How many entries `node`'s table has (0 without one).
    pub fn entry_count(&self, node: &NodeId) -> usize {
        self.tables.get(node).map_or(0, NodeTable::len)
    }

    /// `node`'s peers, in order (none without a table).
    pub fn peers(&self, node: &NodeId) -> impl Iterator<Item = &NodeId> {
        self.tables
            .get(node)
            .into_iter()
            .flat_map(|t| t.reasons.keys())
    }

    /// Is `peer` in `me`'s table?
    pub fn is_peer(&self, me: &NodeId, peer: &NodeId) -> bool {
        self.tables
            .get(me)
            .is_some_and(|t| t.reasons.contains_key(peer))
    }

    /// Adds a live node, or updates one (its addresses, or its name: as a removal and an
    /// enrolment). Returns what changed, per node in order.
    pub fn enrol(&mut self, info: PeerInfo) -> Result<Vec<NodeDelta>, MeshError> {
        let id = info.node_id;
        if let Some(held) = self.by_name.get(&info.name)
            && *held != id
        {
            return Err(MeshError::NameHeld(info.name));
        }
        let mut journal = Journal::recording();
        match self.live.get(&id) {
            Some(old) if *old == info => return Ok(Vec::new()),
            Some(old) if old.name == info.name => self.readdress(&mut journal, info),
            Some(_) => {
                self.remove_node(&mut journal, &id);
                self.add_node(&mut journal, info);
            }
            None => self.add_node(&mut journal, info),
        }
        Ok(self.finish(journal))
    }

    /// Removes a live node (revoked or banned). Returns what changed, per node in order.
    pub fn remove(&mut self, node: &NodeId) -> Vec<NodeDelta> {
        let mut journal = Journal::recording();
        self.remove_node(&mut journal, node);
        self.finish(journal)
    }

    /// Replaces the policy and returns each changed node's delta. Only the live nodes the
    /// change can touch (`Index::touched_by`) are recompiled: each is removed under the old
    /// policy and enrolled again under the new one, so the work is proportional to their
    /// relationships, not to the mesh.
    pub fn reload(&mut self, policy: Policy) -> Vec<NodeDelta> {
        let next = Index::new(policy);
        let touched: Vec<PeerInfo> = self
            .index
            .touched_by(&next)
            .iter()
            .filter_map(|name| self.by_name.get(name))
            .filter_map(|id| self.live.get(id).cloned())
            .collect();
        let mut journal = Journal::recording();
        for info in &touched {
            self.remove_node(&mut journal, &info.node_id);
        }
        self.index = next;
        for info in touched {
            self.add_node(&mut journal, info);
        }
        self.finish(journal)
    }

    fn readdress(&mut self, journal: &mut Journal, info: PeerInfo) {
        let id = info.node_id;
        // Every table holding `id` as a peer shows `live[id]`: record the old value for each.
        let old = self.live.get(&id).cloned();
        for p in self.peers(&id) {
            if self.tables.contains_key(p) {
                journal.touch(*p, TableKey::Peer(id), old.clone().map(TableEntry::Peer));
            }
        }
        self.live.insert(id, info);
    }

    fn add_node(&mut self, journal: &mut Journal, info: PeerInfo) {
        let id = info.node_id;
        let name = info.name.clone();
        self.by_name.insert(name.clone(), id);
        self.live.insert(id, info);
        let Some(segments) = self.index.policy.nodes.get(&name) else {
            return;
        };
        for seg in segments {
            self.members
                .entry(seg.clone())
                .or_default()
                .insert(name.clone());
        }
        journal.table(id, false);
        let mut table = NodeTable::default();
        for mesh in self.index.serves.get(&name).into_iter().flatten() {
            let spec = &self.index.policy.services[mesh];
            let entry = TableEntry::Service {
                service: spec.id,
                name: mesh.clone(),
                backend: spec.backend.clone(),
            };
            journal.touch(id, entry.key(), None);
            table.put(entry, |_| Arc::new(mesh.clone()));
        }
        self.tables.insert(id, table);
        for rel in self.relationships_of(&name) {
            self.apply(journal, &rel, true);
        }
    }

    fn remove_node(&mut self, journal: &mut Journal, id: &NodeId) {
        let Some(info) = self.live.get(id) else {
            return;
        };
        let name = info.name.clone();
        for rel in self.relationships_of(&name) {
            self.apply(journal, &rel, false);
        }
        if let Some(table) = self.tables.remove(id) {
            journal.table(*id, true);
            // Its own services are what is left (every relationship was undone).
            for (key, entry) in table.entries(&self.live) {
                journal.touch(*id, key, Some(entry));
            }
        }
        for seg in self.index.policy.nodes.get(&name).into_iter().flatten() {
            if let Some(m) = self.members.get_mut(seg) {
                m.remove(&name);
            }
        }
        self.by_name.remove(&name);
        self.live.remove(id);
    }

    /// Every relationship of live node `name` whose other parties are live.
    fn relationships_of(&self, name: &NodeName) -> Vec<Rel> {
        let ix = &self.index;
        let live = |n: &NodeName| self.by_name.get(n).copied();
        let (Some(me), Some(segments)) = (live(name), ix.policy.nodes.get(name)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let rel = |mesh: &MeshName, user, server, relay| Rel {
            name: mesh.clone(),
            service: ix.policy.services[mesh].id,
            server,
            user,
            relay,
        };
        // As a user (an origin where a route says so).
        let mut usable = BTreeSet::new();
        for seg in segments {
            usable.extend(ix.usable.get(seg).into_iter().flatten());
        }
        for mesh in usable {
            let serving = &ix.policy.services[mesh].node;
            if serving == name {
                continue;
            }
            let Some(server) = live(serving) else {
                continue;
            };
            match ix.policy.routes.get(&(name.clone(), serving.clone())) {
                None => out.push(rel(mesh, me, server, None)),
                Some(via) => {
                    if let Some(relay) = live(via) {
                        out.push(rel(mesh, me, server, Some(relay)));
                    }
                }
            }
        }
        // As the serving node.
        for mesh in ix.serves.get(name).into_iter().flatten() {
            let mut users = BTreeSet::new();
            for seg in ix.allowed.get(mesh).into_iter().flatten() {
                users.extend(self.members.get(seg).into_iter().flatten());
            }
            users.remove(name);
            for user in users {
                let Some(uid) = live(user) else {
                    continue;
                };
                match ix.policy.routes.get(&(user.clone(), name.clone())) {
                    None => out.push(rel(mesh, uid, me, None)),
                    Some(via) => {
                        if let Some(relay) = live(via) {
                            out.push(rel(mesh, uid, me, Some(relay)));
                        }
                    }
                }
            }
        }
        // As a relay.
        for (from, to) in ix.relays.get(name).into_iter().flatten() {
            let (Some(origin), Some(server)) = (live(from), live(to)) else {
                continue;
            };
            for mesh in ix.serves.get(to).into_iter().flatten() {
                if ix.may_use(from, mesh) {
                    out.push(rel(mesh, origin, server, Some(me)));
                }
            }
        }
        out
    }

    /// Adds (or removes) `rel`'s entries and peer reasons.
    fn apply(&mut self, journal: &mut Journal, rel: &Rel, add: bool) {
        let route = TableEntry::Route(EgressRoute {
            name: rel.name.clone(),
            service: rel.service,
            serving_node: rel.server,
            via: rel.relay,
        });
        self.set(journal, rel.user, route, add);
        match rel.relay {
            None => {
                self.reason(journal, rel.user, rel.server, add);
                let allowed = TableEntry::Allowed {
                    service: rel.service,
                    peer: rel.user,
                };
                self.set(journal, rel.server, allowed, add);
                self.reason(journal, rel.server, rel.user, add);
            }
            Some(relay) => {
                self.reason(journal, rel.user, relay, add);
                let transit = TableEntry::Transit {
                    origin: rel.user,
                    service: rel.service,
                    next: rel.server,
                };
                self.set(journal, relay, transit, add);
                self.reason(journal, relay, rel.user, add);
                self.reason(journal, relay, rel.server, add);
                let relayed = TableEntry::Relayed {
                    service: rel.service,
                    relay,
                    origin: rel.user,
                };
                self.set(journal, rel.server, relayed, add);
                self.reason(journal, rel.server, relay, add);
            }
        }
    }

    fn set(&mut self, journal: &mut Journal, node: NodeId, entry: TableEntry, add: bool) {
        let Some(t) = self.tables.get_mut(&node) else {
            debug_assert!(false, "a relationship's parties all have tables");
            return;
        };
        let key = entry.key();
        let before = t.get(&key, &self.live);
        if add {
            let names = &self.index.names;
            t.put(entry, |m| {
                names.get(m).cloned().unwrap_or_else(|| Arc::new(m.clone()))
            });
        } else {
            t.drop_key(&key);
        }
        journal.touch(node, key, before);
    }

    fn reason(&mut self, journal: &mut Journal, node: NodeId, peer: NodeId, add: bool) {
        let Some(t) = self.tables.get_mut(&node) else {
            debug_assert!(false, "a relationship's parties all have tables");
            return;
        };
        let key = TableKey::Peer(peer);
        if add {
            let n = t.reasons.entry(peer).or_insert(0);
            *n += 1;
            if *n == 1 {
                journal.touch(node, key, None);
            }
        } else if let Some(n) = t.reasons.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                t.reasons.remove(&peer);
                let before = self.live.get(&peer).cloned().map(TableEntry::Peer);
                journal.touch(node, key, before);
            }
        }
    }

    /// Each touched node's delta: the touched keys whose value differs from before.
    fn finish(&self, journal: Journal) -> Vec<NodeDelta> {
        let mut nodes: BTreeSet<NodeId> = journal.before.keys().copied().collect();
        nodes.extend(journal.had_table.keys().copied());
        let mut out = Vec::new();
        for node in nodes {
            let now = self.tables.get(&node);
            let state = match (journal.had_table.get(&node), now.is_some()) {
                (Some(false), true) => TableState::Created,
                (Some(true), false) => TableState::Dropped,
                _ => TableState::Kept,
            };
            let mut delta = NodeDelta {
                node,
                state,
                changes: Vec::new(),
                old: Vec::new(),
                added_peers: Vec::new(),
                removed_peers: Vec::new(),
            };
            for (key, before) in journal.before.get(&node).into_iter().flatten() {
                let after = now.and_then(|t| t.get(key, &self.live));
                delta.record(key, before.as_ref(), after.as_ref());
            }
            if state != TableState::Kept || !delta.changes.is_empty() {
                out.push(delta);
            }
        }
        out
    }
}

impl NodeDelta {
    fn record(&mut self, key: &TableKey, before: Option<&TableEntry>, after: Option<&TableEntry>) {
        if before == after {
            return;
        }
        if let TableKey::Peer(p) = key {
            match (before, after) {
                (None, Some(_)) => self.added_peers.push(*p),
                (Some(_), None) => self.removed_peers.push(*p),
                _ => {}
            }
        }
        self.old.extend(before.cloned());
        self.changes.push(match after {
            Some(e) => TableChange::Put(e.clone()),
            None => TableChange::Remove(key.clone()),
        });
    }
}

#[cfg(test)]
mod tests;
