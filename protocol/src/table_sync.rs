//! Routing tables on the push stream: a node's table as keyed entries ([`entry`]), sent as a
//! versioned snapshot or a delta against the version the node holds.

mod entry;

pub use self::entry::{Entries, TableChange, TableEntry, TableKey, entries_of, table_of};
