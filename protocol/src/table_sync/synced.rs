//! The table a node holds, and the pure, atomic application of an update to it.

use crate::enrollment::PeerInfo;
use crate::routing::RoutingTable;

use super::digest::TableDigest;
use super::entry::{Entries, TableChange, TableEntry, TableKey, table_of};
use super::update::TableUpdate;
use super::{MAX_TABLE_CHANGES, MAX_TABLE_PEERS, TableSyncError};

/// Checks that `entries` is a table that may be sent and held: at most [`MAX_TABLE_PEERS`]
/// peers and [`MAX_TABLE_CHANGES`] entries.
pub fn check_entries(entries: &Entries) -> Result<(), TableSyncError> {
    let peers = peer_count(entries);
    if peers > MAX_TABLE_PEERS {
        return Err(TableSyncError::TooManyPeers { peers });
    }
    if entries.len() > MAX_TABLE_CHANGES {
        return Err(TableSyncError::TooManyChanges {
            changes: entries.len(),
        });
    }
    Ok(())
}

fn peer_count(entries: &Entries) -> usize {
    entries
        .keys()
        .take_while(|k| matches!(k, TableKey::Peer(_)))
        .count()
}

/// The changes that turn `old` into `new`: a `Remove` for every key only in `old`, then a
/// `Put` for every entry that is new or differs, in key order.
pub fn diff(old: &Entries, new: &Entries) -> Vec<TableChange> {
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .cloned()
        .map(TableChange::Remove);
    let put = new
        .iter()
        .filter(|(k, e)| old.get(k) != Some(e))
        .map(|(_, e)| TableChange::Put(e.clone()));
    removed.chain(put).collect()
}

/// The table a node holds: the version and entries of the last update applied, and their
/// digest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncedTable {
    version: u64,
    entries: Entries,
    digest: TableDigest,
    peers: usize,
}

/// What an applied change replaced, to undo it.
enum Undo {
    Restore(TableEntry),
    Delete(TableKey),
}

impl SyncedTable {
    /// The table a snapshot describes (a delta is refused: there is nothing to apply it to).
    pub fn from_update(update: &TableUpdate) -> Result<Self, TableSyncError> {
        match update.base {
            None => Self::snapshot(update),
            Some(base) => Err(TableSyncError::WrongBase { base, held: None }),
        }
    }

    /// Applies `update` to `held` (`None`: nothing held yet, so only a snapshot applies).
    pub fn apply_to(held: Option<&Self>, update: &TableUpdate) -> Result<Self, TableSyncError> {
        match held {
            Some(t) => t.apply(update),
            None => Self::from_update(update),
        }
    }

    /// The table after `update`, or why it does not apply; `self` is unchanged either way.
    /// A snapshot replaces the table; a delta needs `base == self.version()` and a version
    /// above it, and each `Remove` must hit an entry. The result must have the update's
    /// digest and at most [`MAX_TABLE_PEERS`] peers.
    pub fn apply(&self, update: &TableUpdate) -> Result<Self, TableSyncError> {
        if update.is_snapshot() {
            return Self::snapshot(update);
        }
        let mut next = self.clone();
        next.apply_in_place(update)?;
        Ok(next)
    }

    /// As [`Self::apply`], in place and atomic: on an error the table is exactly as before.
    /// Costs O(changes) for a delta (plus the undo on failure), not a copy of the table.
    pub fn apply_in_place(&mut self, update: &TableUpdate) -> Result<(), TableSyncError> {
        let Some(base) = update.base else {
            *self = Self::snapshot(update)?;
            return Ok(());
        };
        if base != self.version {
            return Err(TableSyncError::WrongBase {
                base,
                held: Some(self.version),
            });
        }
        if update.version <= base {
            return Err(TableSyncError::NotNewer {
                base,
                version: update.version,
            });
        }
        let before = (self.digest, self.peers);
        let mut undo = Vec::with_capacity(update.changes.len());
        let result = self.run(update, &mut undo);
        let result = result.and_then(|()| self.check(update));
        match result {
            Ok(()) => {
                self.version = update.version;
                Ok(())
            }
            Err(e) => {
                for u in undo.into_iter().rev() {
                    match u {
                        Undo::Restore(e) => {
                            self.entries.insert(e.key(), e);
                        }
                        Undo::Delete(k) => {
                            self.entries.remove(&k);
                        }
                    }
                }
                (self.digest, self.peers) = before;
                Err(e)
            }
        }
    }

    fn run(&mut self, update: &TableUpdate, undo: &mut Vec<Undo>) -> Result<(), TableSyncError> {
        for c in update.changes.iter() {
            match c {
                TableChange::Put(e) => {
                    let key = e.key();
                    let is_peer = matches!(key, TableKey::Peer(_));
                    self.digest = self.digest.with(e);
                    match self.entries.insert(key.clone(), e.clone()) {
                        Some(old) => {
                            self.digest = self.digest.without(&old);
                            undo.push(Undo::Restore(old));
                        }
                        None => {
                            self.peers += usize::from(is_peer);
                            undo.push(Undo::Delete(key));
                        }
                    }
                }
                TableChange::Remove(key) => {
                    let old = self
                        .entries
                        .remove(key)
                        .ok_or_else(|| TableSyncError::RemoveMissing(key.clone()))?;
                    self.digest = self.digest.without(&old);
                    self.peers -= usize::from(matches!(key, TableKey::Peer(_)));
                    undo.push(Undo::Restore(old));
                }
            }
        }
        Ok(())
    }

    fn check(&self, update: &TableUpdate) -> Result<(), TableSyncError> {
        if self.peers > MAX_TABLE_PEERS {
            return Err(TableSyncError::TooManyPeers { peers: self.peers });
        }
        if self.entries.len() > MAX_TABLE_CHANGES {
            return Err(TableSyncError::TooManyChanges {
                changes: self.entries.len(),
            });
        }
        if self.digest != update.digest {
            return Err(TableSyncError::DigestMismatch {
                expected: update.digest,
                got: self.digest,
            });
        }
        Ok(())
    }

    fn snapshot(update: &TableUpdate) -> Result<Self, TableSyncError> {
        let mut t = Self {
            version: update.version,
            ..Self::default()
        };
        for c in update.changes.iter() {
            let TableChange::Put(e) = c else {
                return Err(TableSyncError::RemoveInSnapshot);
            };
            let key = e.key();
            t.digest = t.digest.with(e);
            match t.entries.insert(key.clone(), e.clone()) {
                Some(old) => t.digest = t.digest.without(&old),
                None => t.peers += usize::from(matches!(key, TableKey::Peer(_))),
            }
        }
        t.check(update)?;
        Ok(t)
    }

    /// The version of the last update applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The digest of the entries.
    pub fn digest(&self) -> TableDigest {
        self.digest
    }

    /// The entries.
    pub fn entries(&self) -> &Entries {
        &self.entries
    }

    /// Peers in the table.
    pub fn peer_count(&self) -> usize {
        self.peers
    }

    /// The routing table and peer infos the entries describe ([`table_of`]).
    pub fn table(&self) -> (RoutingTable, Vec<PeerInfo>) {
        table_of(&self.entries)
    }
}
