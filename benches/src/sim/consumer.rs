//! What a simulated node does with each push, as a node does it, and the checker of the push
//! stream: every revocation list is verified against the pinned keys and must not go back
//! (node/src/state.rs `Push::Revocations`); table parts are reassembled ([`TableAssembler`])
//! and applied atomically ([`SyncedTable`]: a delta must be on the version held, the digest
//! must match), and versions never go back. Pure (no network): the session loop in
//! [`super::node`] feeds it.
//!
//! A violation (a push lost, truncated or reordered) is recorded, never a panic: the run's
//! checker fails on any.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use hopmesh_protocol::attestation::{KeySet, RevocationUpdate, verify_revocation_list};
use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::table_sync::{
    SyncedTable, TableAssembler, TableChange, TableEntry, TableKey, TableUpdate,
};
use serde::{Deserialize, Serialize};

/// Push kinds, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// Mesh parameters.
    Config,
    /// A part of a routing-table update.
    Table,
    /// Pair seed grants.
    Seeds,
    /// Compromised generations.
    Compromised,
    /// A signed revocation list.
    Revocations,
}

impl Kind {
    /// The kind of a push.
    pub fn of(push: &Push) -> Self {
        match push {
            Push::Config(_) => Self::Config,
            Push::TablePart(_) => Self::Table,
            Push::Seeds { .. } => Self::Seeds,
            Push::Compromised { .. } => Self::Compromised,
            Push::Revocations { .. } => Self::Revocations,
        }
    }
}

/// Pushes and their encoded bytes (frame included), per kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Count per kind.
    pub count: BTreeMap<Kind, u64>,
    /// Bytes per kind.
    pub bytes: BTreeMap<Kind, u64>,
}

impl Tally {
    fn add(&mut self, kind: Kind, bytes: usize) {
        *self.count.entry(kind).or_default() += 1;
        *self.bytes.entry(kind).or_default() += bytes as u64;
    }

    /// Adds another tally.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.count {
            *self.count.entry(*k).or_default() += v;
        }
        for (k, v) in &other.bytes {
            *self.bytes.entry(*k).or_default() += v;
        }
    }

    /// Bytes of one kind.
    pub fn bytes_of(&self, kind: Kind) -> u64 {
        self.bytes.get(&kind).copied().unwrap_or(0)
    }

    /// Count of one kind.
    pub fn count_of(&self, kind: Kind) -> u64 {
        self.count.get(&kind).copied().unwrap_or(0)
    }
}

/// One simulated node's view of its push stream.
#[derive(Debug)]
pub struct Consumer {
    keys: KeySet,
    /// The revocation list held: version and envelope.
    revocation: Option<(u64, Vec<u8>)>,
    /// When a list naming each revoked node was first applied.
    pub revoked_seen: BTreeMap<NodeId, Instant>,
    /// Reassembles table parts.
    assembler: TableAssembler,
    /// The table held.
    table: Option<SyncedTable>,
    /// The peers of the table held (`None`: no table yet), kept from the changes applied.
    pub peers: Option<BTreeSet<NodeId>>,
    /// When the table held last changed.
    pub table_changed_at: Option<Instant>,
    /// Table updates applied (snapshots and deltas).
    pub tables: u64,
    /// Snapshots among them.
    pub snapshots: u64,
    /// A table update did not apply: the node must resubscribe for a fresh snapshot (as
    /// node/src/verifier_link.rs does); cleared by [`Self::resubscribed`].
    pub needs_resync: bool,
    /// Everything received.
    pub tally: Tally,
    /// Pushes lost, truncated or reordered, in words.
    pub violations: Vec<String>,
    /// Fault injection for the checker's own test: the next push of this kind is dropped
    /// unseen, as a lossy stream would (`hopmesh-bench sim --fault`).
    pub drop_next: Option<Kind>,
    /// Pushes dropped by [`Self::drop_next`].
    pub dropped: u64,
}

impl Consumer {
    /// A node that trusts `keys` (its pins) and holds nothing yet.
    pub fn new(keys: KeySet) -> Self {
        Self {
            keys,
            revocation: None,
            revoked_seen: BTreeMap::new(),
            assembler: TableAssembler::new(),
            table: None,
            peers: None,
            table_changed_at: None,
            tables: 0,
            snapshots: 0,
            needs_resync: false,
            tally: Tally::default(),
            violations: Vec::new(),
            drop_next: None,
            dropped: 0,
        }
    }

    /// The version of the revocation list held (0: none).
    pub fn revocation_version(&self) -> u64 {
        self.revocation.as_ref().map_or(0, |(v, _)| *v)
    }

    /// The version of the table held (0: none).
    pub fn table_version(&self) -> u64 {
        self.table.as_ref().map_or(0, SyncedTable::version)
    }

    /// A new session starts (the node resubscribed): a half-assembled update is dropped; the
    /// table held stays until the new snapshot replaces it.
    pub fn resubscribed(&mut self) {
        self.assembler.reset();
        self.needs_resync = false;
    }

    fn table_update(&mut self, update: &TableUpdate, now: Instant) {
        let held = self.table_version();
        if update.is_snapshot() && update.version < held {
            self.violations.push(format!(
                "table snapshot v{} older than the v{held} held (reordered)",
                update.version
            ));
            self.needs_resync = true;
            return;
        }
        // In place and atomic (a copy of a 6 000-entry table per delta would make the
        // simulator, not the verifier, the bottleneck of a 2 000-node segment).
        let applied = match self.table.as_mut() {
            Some(t) => t.apply_in_place(update),
            None => SyncedTable::from_update(update).map(|t| self.table = Some(t)),
        };
        match applied {
            Ok(()) => {
                let before = self.peers.as_ref().map(BTreeSet::len);
                let peers = self.peers.get_or_insert_with(BTreeSet::new);
                if update.is_snapshot() {
                    peers.clear();
                }
                let mut changed = update.is_snapshot() || before.is_none();
                for c in update.changes.iter() {
                    match c {
                        TableChange::Put(TableEntry::Peer(p)) => changed |= peers.insert(p.node_id),
                        TableChange::Remove(TableKey::Peer(id)) => changed |= peers.remove(id),
                        _ => {}
                    }
                }
                if changed {
                    self.table_changed_at = Some(now);
                }
                self.tables += 1;
                self.snapshots += u64::from(update.is_snapshot());
            }
            Err(e) => {
                // A delta lost before this one (wrong base), or the table cut or changed in
                // flight (digest): the node would resubscribe.
                self.violations.push(format!(
                    "table update v{} (held v{held}) refused: {e}",
                    update.version
                ));
                self.needs_resync = true;
            }
        }
    }

    /// Takes one push of `bytes` encoded bytes, received at `now`.
    pub fn apply(&mut self, push: Push, bytes: usize, now: Instant) {
        let kind = Kind::of(&push);
        self.tally.add(kind, bytes);
        if self.drop_next == Some(kind) {
            self.drop_next = None;
            self.dropped += 1;
            return;
        }
        match push {
            Push::Config(_) | Push::Seeds { .. } | Push::Compromised { .. } => {}
            Push::TablePart(part) => match self.assembler.push(&part) {
                Ok(None) => {}
                Ok(Some(update)) => self.table_update(&update, now),
                Err(e) => {
                    // A part lost, repeated, reordered or cut: the update is gone.
                    self.violations.push(format!(
                        "table part {}/{} of v{} refused: {e}",
                        part.part, part.parts, part.version
                    ));
                    self.needs_resync = true;
                }
            },
            Push::Revocations { list } => {
                let current = self.revocation.as_ref().map(|(v, b)| (*v, b.as_slice()));
                match verify_revocation_list(&list, &self.keys, current) {
                    Ok(RevocationUpdate::Newer(l)) => {
                        for r in l.revoked.iter() {
                            self.revoked_seen.entry(r.node_id).or_insert(now);
                        }
                        self.revocation = Some((l.version, list.to_vec()));
                    }
                    Ok(RevocationUpdate::Same) => {}
                    Err(e) => self.violations.push(format!(
                        "revocation list refused (held version {}): {e}",
                        self.revocation_version()
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use hopmesh_protocol::attestation::{RevocationList, RevokedNode, SigningKey};
    use hopmesh_protocol::enrollment::PeerInfo;
    use hopmesh_protocol::ids::NodeName;
    use hopmesh_protocol::secret::SigningSeed;
    use hopmesh_protocol::table_sync::{Entries, diff, digest, split};
    use hopmesh_protocol::time::UnixTime;
    use hopmesh_protocol::wire::{BoundedString, BoundedVec};

    pub(crate) fn key() -> SigningKey {
        SigningKey::from_seed(&SigningSeed::from_bytes([7; 32]))
    }

    pub(crate) fn consumer() -> Consumer {
        Consumer::new(KeySet::new(vec![key().verifying_key()]).expect("keys"))
    }

    pub(crate) fn list(version: u64, revoked: &[NodeId]) -> Push {
        let k = key();
        let l = RevocationList {
            version,
            issued_at: UnixTime::from_secs(1_800_000_000),
            verifier_key_id: k.key_id(),
            revoked: BoundedVec::new(
                revoked
                    .iter()
                    .map(|id| RevokedNode {
                        node_id: *id,
                        revoked_at: UnixTime::from_secs(1_800_000_000),
                        until: UnixTime::from_secs(1_900_000_000),
                    })
                    .collect(),
            )
            .expect("fits"),
        };
        Push::Revocations {
            list: BoundedVec::new(l.sign(&k).expect("sign")).expect("fits"),
        }
    }

    pub(crate) fn id(i: u8) -> NodeId {
        NodeId::from_spki(&[i])
    }

    fn peer(i: u16) -> TableEntry {
        let addr = BoundedString::truncated(&format!("127.0.0.1:{i}{}", "0".repeat(300)));
        TableEntry::Peer(PeerInfo {
            node_id: NodeId::from_spki(&i.to_be_bytes()),
            name: NodeName::new(&format!("n{i}")).expect("name"),
            addresses: BoundedVec::new(vec![addr; 4]).expect("fits"),
        })
    }

    fn entries(peers: std::ops::Range<u16>) -> Entries {
        peers.map(peer).map(|e| (e.key(), e)).collect()
    }

    fn pid(i: u16) -> NodeId {
        NodeId::from_spki(&i.to_be_bytes())
    }

    fn snapshot(version: u64, e: &Entries) -> Vec<Push> {
        split(&TableUpdate::snapshot(version, e).expect("snapshot")).expect("split")
    }

    /// The delta from `old` to `new`, `base` to `base + 1`.
    fn delta(base: u64, old: &Entries, new: &Entries) -> Vec<Push> {
        split(&TableUpdate::delta(base, base + 1, diff(old, new), digest(new)).expect("delta"))
            .expect("split")
    }

    fn feed(c: &mut Consumer, pushes: Vec<Push>) {
        for p in pushes {
            c.apply(p, 1, Instant::now());
        }
    }

    #[test]
    fn snapshots_and_deltas_keep_the_peers_and_version() {
        let mut c = consumer();
        let (e0, e1, e2) = (entries(0..3), entries(0..5), entries(1..5));
        feed(&mut c, snapshot(7, &e0));
        assert_eq!(c.table_version(), 7);
        assert_eq!(c.peers, Some((0..3).map(pid).collect()));
        feed(&mut c, delta(7, &e0, &e1));
        feed(&mut c, delta(8, &e1, &e2));
        assert_eq!(c.table_version(), 9);
        assert_eq!(c.peers, Some((1..5).map(pid).collect()));
        assert_eq!((c.tables, c.snapshots), (3, 1));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert!(!c.needs_resync);
    }

    #[test]
    fn a_lost_delta_is_caught_by_the_next_ones_base_and_asks_for_a_resync() {
        let mut c = consumer();
        let (e0, e1, e2) = (entries(0..3), entries(0..5), entries(1..5));
        feed(&mut c, snapshot(1, &e0));
        let _lost = delta(1, &e0, &e1);
        feed(&mut c, delta(2, &e1, &e2));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert!(c.needs_resync);
        assert_eq!(c.table_version(), 1, "nothing applied");
        c.resubscribed();
        feed(&mut c, snapshot(3, &e2));
        assert_eq!(c.peers, Some((1..5).map(pid).collect()));
        assert!(!c.needs_resync);
    }

    #[test]
    fn a_part_lost_from_a_large_update_is_caught() {
        let big = entries(0..400);
        let mut parts = snapshot(1, &big);
        assert!(parts.len() > 2, "{} parts", parts.len());
        let mut c = consumer();
        feed(&mut c, parts.clone());
        assert_eq!(c.peers.as_ref().map(BTreeSet::len), Some(400));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        let mut c = consumer();
        parts.remove(1);
        feed(&mut c, parts);
        assert!(!c.violations.is_empty());
        assert_eq!(c.peers, None, "no table from a cut update");
    }

    #[test]
    fn an_older_snapshot_is_a_reordered_push() {
        let mut c = consumer();
        feed(&mut c, snapshot(5, &entries(0..2)));
        feed(&mut c, snapshot(4, &entries(0..3)));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert_eq!(c.table_version(), 5);
        feed(&mut c, snapshot(5, &entries(0..2)));
        assert_eq!(
            c.violations.len(),
            1,
            "the same version again (a resync) is fine"
        );
    }

    #[test]
    fn newer_lists_are_applied_and_record_when_each_revocation_arrived() {
        let mut c = consumer();
        let t0 = Instant::now();
        c.apply(list(1, &[id(1)]), 100, t0);
        let t1 = Instant::now();
        c.apply(list(2, &[id(1), id(2)]), 120, t1);
        c.apply(list(2, &[id(1), id(2)]), 120, t1);
        assert_eq!(c.revocation_version(), 2);
        assert_eq!(c.revoked_seen[&id(1)], t0);
        assert_eq!(c.revoked_seen[&id(2)], t1);
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.tally.count_of(Kind::Revocations), 3);
        assert_eq!(c.tally.bytes_of(Kind::Revocations), 340);
    }

    #[test]
    fn an_older_list_is_a_reordered_push() {
        let mut c = consumer();
        c.apply(list(2, &[id(1)]), 1, Instant::now());
        c.apply(list(1, &[]), 1, Instant::now());
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert_eq!(c.revocation_version(), 2);
    }

    #[test]
    fn a_list_signed_by_another_key_is_refused() {
        let mut c = Consumer::new(
            KeySet::new(vec![
                SigningKey::from_seed(&SigningSeed::from_bytes([8; 32])).verifying_key(),
            ])
            .expect("keys"),
        );
        c.apply(list(1, &[id(1)]), 1, Instant::now());
        assert_eq!(c.violations.len(), 1);
        assert_eq!(c.revocation_version(), 0);
    }

    #[test]
    fn the_fault_drops_exactly_the_next_push_of_its_kind() {
        let mut c = consumer();
        c.drop_next = Some(Kind::Revocations);
        feed(&mut c, snapshot(1, &entries(0..1)));
        c.apply(list(1, &[id(1)]), 1, Instant::now());
        assert_eq!(c.revocation_version(), 0);
        assert_eq!(c.dropped, 1);
        c.apply(list(2, &[id(1)]), 1, Instant::now());
        assert_eq!(c.revocation_version(), 2);
        assert_eq!(c.tables, 1);
    }
}
