//! Routing tables on the push stream: a node's table as keyed entries ([`TableEntry`]), sent as a
//! versioned snapshot or a delta against the version the node holds.
//!
//! # Shape
//! - A [`TableUpdate`] is a snapshot (`base: None`, every change a `Put`) or a delta
//!   (`base: Some(v)`: valid only on version `v`), with the [`TableDigest`] of the table it
//!   yields.
//! - [`split`] encodes an update (at most [`MAX_TABLE_BYTES`]) and cuts it into
//!   [`TablePart`]s of [`TABLE_PART_BYTES`] (at most [`MAX_TABLE_PARTS`]), each sent as one
//!   `Push::TablePart`. The verifier queues all parts of one update in one go, so parts of two
//!   updates never interleave.
//! - At the node a [`TableAssembler`] takes the parts strictly in order and yields the update
//!   when the last one arrives; any gap, duplicate, mixed version, over-size or undecodable
//!   update is a [`TableSyncError`] and drops what was buffered.
//! - [`SyncedTable::apply`] applies an update atomically: on any error nothing changes.
//!
//! Every error means the node's table may differ from the verifier's: the node keeps the table
//! it holds (it is still a table the verifier sent) and resubscribes, which makes the verifier
//! send a fresh snapshot. Nothing is ever truncated: a table over a limit is refused whole, on
//! either side.

mod digest;
mod entry;
mod synced;
mod update;

pub use self::digest::{TableDigest, digest};
pub use self::entry::{Entries, TableChange, TableEntry, TableKey, entries_of, table_of};
pub use self::synced::{SyncedTable, check_entries, diff};
pub use self::update::{TableAssembler, TablePart, TableUpdate, split};

use crate::wire::DecodeError;

/// Payload bytes of one [`TablePart`] (32 KiB): a part with its header fits one push frame
/// (`PUSH_CAP`, 64 KiB) with room to spare. Every part of an update but the last carries
/// exactly this many bytes.
pub const TABLE_PART_BYTES: usize = 32 * 1024;

/// Largest encoded [`TableUpdate`] (16 MiB). The 2 000-peer target table (about 6 000
/// entries) encodes to about 400 KB and a table of [`MAX_TABLE_PEERS`] peers with one
/// service each to a few MB, so this leaves room for long names and four addresses per peer.
/// A larger table is refused by [`split`] (`TooLarge`, counted by the verifier as
/// `table_refused`) and by the [`TableAssembler`], never sent or kept in part.
pub const MAX_TABLE_BYTES: usize = 16 * 1024 * 1024;

/// Most parts of one update: [`MAX_TABLE_BYTES`] / [`TABLE_PART_BYTES`] = 512. A first part
/// declaring more is refused before anything is buffered.
pub const MAX_TABLE_PARTS: u32 = (MAX_TABLE_BYTES / TABLE_PART_BYTES) as u32;

/// Most changes in one update (131 072); a snapshot has one `Put` per entry, so this is also
/// the most entries a table may have. The decoder refuses a longer list before allocating it.
/// A delta that would need more is sent as a snapshot instead (which must fit too).
pub const MAX_TABLE_CHANGES: usize = 128 * 1024;

/// Most peers in one node's table (16 384, above the 10 000-node target mesh): a table over
/// it is refused whole by the verifier (`table_refused`) and by [`SyncedTable::apply`].
pub const MAX_TABLE_PEERS: usize = 16 * 1024;

/// Why a table update could not be built, split, assembled or applied. Every one of them at
/// the node means "resubscribe for a fresh snapshot".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableSyncError {
    /// The encoded update is over [`MAX_TABLE_BYTES`].
    #[error("table update of {len} bytes exceeds {MAX_TABLE_BYTES}")]
    TooLarge {
        /// Its length (as far as counted).
        len: usize,
    },
    /// A part declares more than [`MAX_TABLE_PARTS`] parts.
    #[error("table update of {parts} parts exceeds {MAX_TABLE_PARTS}")]
    TooManyParts {
        /// The declared count.
        parts: u32,
    },
    /// More changes than [`MAX_TABLE_CHANGES`].
    #[error("table update of {changes} changes exceeds {MAX_TABLE_CHANGES}")]
    TooManyChanges {
        /// The count.
        changes: usize,
    },
    /// More peers than [`MAX_TABLE_PEERS`].
    #[error("table of {peers} peers exceeds {MAX_TABLE_PEERS}")]
    TooManyPeers {
        /// The count.
        peers: usize,
    },
    /// A part arrived after a missing one (or a first part that is not part 0).
    #[error("table part {got} arrived where part {expected} was due")]
    Gap {
        /// The part due.
        expected: u32,
        /// The part that came.
        got: u32,
    },
    /// A part arrived again (or an earlier one after a later one).
    #[error("table part {got} arrived again (part {expected} was due)")]
    Duplicate {
        /// The part due.
        expected: u32,
        /// The part that came.
        got: u32,
    },
    /// A part of another update (version or part count) arrived before the current one was
    /// complete.
    #[error("table part of version {got} inside the update of version {expected}")]
    MixedVersion {
        /// The version being assembled.
        expected: u64,
        /// The part's version.
        got: u64,
    },
    /// A part that cannot be: `part >= parts`, no parts, a part other than the last that is not
    /// full, or an empty last part.
    #[error("malformed table part {part} of {parts} ({len} bytes)")]
    BadPart {
        /// Its index.
        part: u32,
        /// The declared count.
        parts: u32,
        /// Its payload length.
        len: usize,
    },
    /// The reassembled bytes are not one canonical [`TableUpdate`].
    #[error("table update does not decode: {0}")]
    BadBytes(DecodeError),
    /// The decoded update's version differs from its parts'.
    #[error("table update says version {inner}, its parts {outer}")]
    PartVersionMismatch {
        /// The parts' version.
        outer: u64,
        /// The update's.
        inner: u64,
    },
    /// A delta whose base is not the version held (or with nothing held).
    #[error("table delta on version {base} but version {held:?} is held")]
    WrongBase {
        /// The delta's base.
        base: u64,
        /// The version held, if any.
        held: Option<u64>,
    },
    /// A delta whose version is not above its base.
    #[error("table delta to version {version} is not above its base {base}")]
    NotNewer {
        /// The delta's base.
        base: u64,
        /// Its version.
        version: u64,
    },
    /// A snapshot carries a `Remove`.
    #[error("table snapshot carries a removal")]
    RemoveInSnapshot,
    /// A delta removes a key the table does not have.
    #[error("table delta removes missing entry {0:?}")]
    RemoveMissing(TableKey),
    /// The table after the update does not have the digest the update announced.
    #[error("table digest mismatch after the update")]
    DigestMismatch {
        /// The update's digest.
        expected: TableDigest,
        /// The resulting table's.
        got: TableDigest,
    },
}

impl TableSyncError {
    /// A stable snake_case name, for metrics and the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::TooManyParts { .. } => "too_many_parts",
            Self::TooManyChanges { .. } => "too_many_changes",
            Self::TooManyPeers { .. } => "too_many_peers",
            Self::Gap { .. } => "part_gap",
            Self::Duplicate { .. } => "part_duplicate",
            Self::MixedVersion { .. } => "mixed_version",
            Self::BadPart { .. } => "bad_part",
            Self::BadBytes(_) => "bad_bytes",
            Self::PartVersionMismatch { .. } => "part_version_mismatch",
            Self::WrongBase { .. } => "wrong_base",
            Self::NotNewer { .. } => "not_newer",
            Self::RemoveInSnapshot => "remove_in_snapshot",
            Self::RemoveMissing(_) => "remove_missing",
            Self::DigestMismatch { .. } => "digest_mismatch",
        }
    }
}

#[cfg(test)]
mod tests;
