//! Table updates, their parts on the push stream, and reassembly.

use serde::{Deserialize, Serialize};

use super::digest::TableDigest;
use super::entry::{Entries, TableChange};
use super::synced::check_entries;
use super::{
    MAX_TABLE_BYTES, MAX_TABLE_CHANGES, MAX_TABLE_PARTS, TABLE_PART_BYTES, TableSyncError,
};
use crate::enrollment::Push;
use crate::wire::{BoundedVec, EncodeError, decode_canonical, encode_capped};

/// One update of a node's table: a snapshot (`base: None`, every change a `Put`, replaces
/// the table) or a delta (`base: Some(v)`, applies only to version `v`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableUpdate {
    /// The version the table has after this update.
    pub version: u64,
    /// The version a delta applies to; `None` for a snapshot.
    pub base: Option<u64>,
    /// The digest of the table after this update.
    pub digest: TableDigest,
    /// The changes, in order.
    pub changes: BoundedVec<TableChange, MAX_TABLE_CHANGES>,
}

impl TableUpdate {
    /// The snapshot of `entries` at `version`. Refused (never cut) when the table is over
    /// [`super::MAX_TABLE_PEERS`] or [`MAX_TABLE_CHANGES`].
    pub fn snapshot(version: u64, entries: &Entries) -> Result<Self, TableSyncError> {
        check_entries(entries)?;
        let changes = entries.values().cloned().map(TableChange::Put).collect();
        Ok(Self {
            version,
            base: None,
            digest: super::digest(entries),
            changes: BoundedVec::new(changes)
                .map_err(|e| TableSyncError::TooManyChanges { changes: e.len })?,
        })
    }

    /// The delta from `base` to `version` with `changes`, after which the table's digest is
    /// `digest`. More than [`MAX_TABLE_CHANGES`] changes is refused: send a snapshot.
    pub fn delta(
        base: u64,
        version: u64,
        changes: Vec<TableChange>,
        digest: TableDigest,
    ) -> Result<Self, TableSyncError> {
        if version <= base {
            return Err(TableSyncError::NotNewer { base, version });
        }
        Ok(Self {
            version,
            base: Some(base),
            digest,
            changes: BoundedVec::new(changes)
                .map_err(|e| TableSyncError::TooManyChanges { changes: e.len })?,
        })
    }

    /// Is this a snapshot?
    pub fn is_snapshot(&self) -> bool {
        self.base.is_none()
    }
}

/// One chunk of an encoded [`TableUpdate`] on the push stream (`Push::TablePart`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePart {
    /// The update's version (the same in every part of it).
    pub version: u64,
    /// This part's index, from 0.
    pub part: u32,
    /// How many parts the update has (the same in every part of it), at most
    /// [`MAX_TABLE_PARTS`].
    pub parts: u32,
    /// The bytes: exactly [`TABLE_PART_BYTES`] in every part but the last, which has 1 to
    /// [`TABLE_PART_BYTES`].
    pub bytes: BoundedVec<u8, TABLE_PART_BYTES>,
}

/// Encodes `update` and cuts it into the pushes of its parts, in order. Refused whole when it
/// encodes to more than [`MAX_TABLE_BYTES`].
pub fn split(update: &TableUpdate) -> Result<Vec<Push>, TableSyncError> {
    Ok(split_parts(update, TABLE_PART_BYTES, MAX_TABLE_BYTES)?
        .into_iter()
        .map(Push::TablePart)
        .collect())
}

fn split_parts(
    update: &TableUpdate,
    part_bytes: usize,
    max_bytes: usize,
) -> Result<Vec<TablePart>, TableSyncError> {
    let bytes = encode_capped(update, max_bytes).map_err(|e| match e {
        EncodeError::TooLarge { len, .. } => TableSyncError::TooLarge { len },
        // postcard cannot fail on these types; were it to, the update is not sendable.
        EncodeError::Serialize(_) => TableSyncError::TooLarge { len: 0 },
    })?;
    let chunks: Vec<&[u8]> = bytes.chunks(part_bytes).collect();
    let parts =
        u32::try_from(chunks.len()).map_err(|_| TableSyncError::TooLarge { len: bytes.len() })?;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(TablePart {
                version: update.version,
                part: i as u32,
                parts,
                bytes: BoundedVec::new(c.to_vec())
                    .map_err(|_| TableSyncError::TooLarge { len: bytes.len() })?,
            })
        })
        .collect()
}

/// The limits an assembler enforces (the constants; smaller ones in tests).
#[derive(Clone, Copy, Debug)]
struct Limits {
    part_bytes: usize,
    max_bytes: usize,
    max_parts: u32,
}

const LIMITS: Limits = Limits {
    part_bytes: TABLE_PART_BYTES,
    max_bytes: MAX_TABLE_BYTES,
    max_parts: MAX_TABLE_PARTS,
};

#[derive(Debug)]
struct Pending {
    version: u64,
    parts: u32,
    next: u32,
    bytes: Vec<u8>,
}

/// Reassembles [`TablePart`]s into [`TableUpdate`]s. Pure: takes parts strictly in order
/// (0, 1, ... `parts - 1`, all of one version) and yields the decoded update with the last.
/// Any other sequence is a [`TableSyncError`] and drops what was buffered (the next update
/// must start at part 0 again). It never buffers more than [`MAX_TABLE_BYTES`]: a part that
/// would take it past is refused before its bytes are copied.
#[derive(Debug)]
pub struct TableAssembler {
    limits: Limits,
    pending: Option<Pending>,
}

impl Default for TableAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl TableAssembler {
    /// An idle assembler with the crate's limits.
    pub fn new() -> Self {
        Self {
            limits: LIMITS,
            pending: None,
        }
    }

    #[cfg(test)]
    fn with_limits(part_bytes: usize, max_bytes: usize, max_parts: u32) -> Self {
        Self {
            limits: Limits {
                part_bytes,
                max_bytes,
                max_parts,
            },
            pending: None,
        }
    }

    /// Bytes buffered of the update being assembled.
    pub fn buffered(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.bytes.len())
    }

    /// Is an update half assembled?
    pub fn is_assembling(&self) -> bool {
        self.pending.is_some()
    }

    /// Drops a half-assembled update (after a resubscribe: the new stream starts afresh).
    pub fn reset(&mut self) {
        self.pending = None;
    }

    /// Takes the next part: `Ok(Some(update))` when it was the last of its update,
    /// `Ok(None)` when more are due. On an error the buffered parts are dropped.
    pub fn push(&mut self, part: &TablePart) -> Result<Option<TableUpdate>, TableSyncError> {
        let r = self.take(part);
        if !matches!(r, Ok(None)) {
            self.pending = None;
        }
        r
    }

    fn take(&mut self, part: &TablePart) -> Result<Option<TableUpdate>, TableSyncError> {
        let l = self.limits;
        let bad = || TableSyncError::BadPart {
            part: part.part,
            parts: part.parts,
            len: part.bytes.len(),
        };
        if part.parts > l.max_parts {
            return Err(TableSyncError::TooManyParts { parts: part.parts });
        }
        let last = part.part.checked_add(1) == Some(part.parts);
        if part.part >= part.parts
            || part.bytes.len() > l.part_bytes
            || (!last && part.bytes.len() != l.part_bytes)
            || part.bytes.is_empty()
        {
            return Err(bad());
        }
        match &self.pending {
            None if part.part != 0 => {
                return Err(TableSyncError::Gap {
                    expected: 0,
                    got: part.part,
                });
            }
            None => {}
            Some(p) if p.version != part.version || p.parts != part.parts => {
                return Err(TableSyncError::MixedVersion {
                    expected: p.version,
                    got: part.version,
                });
            }
            Some(p) if part.part > p.next => {
                return Err(TableSyncError::Gap {
                    expected: p.next,
                    got: part.part,
                });
            }
            Some(p) if part.part < p.next => {
                return Err(TableSyncError::Duplicate {
                    expected: p.next,
                    got: part.part,
                });
            }
            Some(_) => {}
        }
        let p = self.pending.get_or_insert_with(|| Pending {
            version: part.version,
            parts: part.parts,
            next: 0,
            bytes: Vec::new(),
        });
        let len = p.bytes.len() + part.bytes.len();
        if len > l.max_bytes {
            return Err(TableSyncError::TooLarge { len });
        }
        p.bytes.extend_from_slice(&part.bytes);
        p.next += 1;
        if !last {
            return Ok(None);
        }
        let update: TableUpdate =
            decode_canonical(&p.bytes, l.max_bytes).map_err(TableSyncError::BadBytes)?;
        if update.version != p.version {
            return Err(TableSyncError::PartVersionMismatch {
                outer: p.version,
                inner: update.version,
            });
        }
        Ok(Some(update))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Parts of `update` with small limits.
    pub(crate) fn small_parts(update: &TableUpdate, part_bytes: usize) -> Vec<TablePart> {
        split_parts(update, part_bytes, usize::MAX).expect("split")
    }

    pub(crate) fn small_assembler(
        part_bytes: usize,
        max_bytes: usize,
        max_parts: u32,
    ) -> TableAssembler {
        TableAssembler::with_limits(part_bytes, max_bytes, max_parts)
    }

    pub(crate) fn split_small(
        update: &TableUpdate,
        part_bytes: usize,
        max_bytes: usize,
    ) -> Result<Vec<TablePart>, TableSyncError> {
        split_parts(update, part_bytes, max_bytes)
    }
}
