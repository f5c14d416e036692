//! Aggregation of repeatable refusals for the audit log.
//!
//! A refusal that an unauthenticated or repeating caller can trigger (a bad join secret, a
//! refresh with an unknown key, a flood of bogus reports) must never cost one disk write per
//! request. An [`Aggregator`] decides, per `(source, reason)` key, whether an event is the first
//! of its interval (the caller writes an audit record now: [`Decision::Write`]) or a repeat
//! (the caller only counts it: [`Decision::Count`]). [`Aggregator::flush`] returns, for every key
//! whose interval has passed, one [`Summary`] with the number of events, the first and the last;
//! the caller writes one record per summary. So an attacker repeating a refusal costs at most
//! two records per key per interval, whatever the rate.
//!
//! Memory is bounded: at most `max_keys` keys are tracked at once; events of further keys go to
//! one shared [`Bucket::Other`] bucket (so a flood from many sources also costs O(1) records).
//!
//! The aggregator is pure: it never reads a clock (every method takes `now`) and does no IO.
//! Flushing is lazy: [`Aggregator::flush`] is O(1) while no interval is due, so a caller may call
//! it before every `observe`, plus [`Aggregator::drain`] on shutdown.
//!
//! Attacker-chosen text that goes into an audit record is cut with [`bounded_text`].

use std::collections::HashMap;
use std::hash::Hash;

use crate::time::UnixTime;

/// Default aggregation interval: one record per key per this many seconds (plus one summary).
pub const DEFAULT_AGGREGATION_INTERVAL_SECS: u64 = 60;

/// Default bound on distinct keys tracked at once; past it, events go to [`Bucket::Other`].
pub const DEFAULT_MAX_AGGREGATION_KEYS: usize = 1024;

/// Longest attacker-chosen text (bytes) written into one audit field; see [`bounded_text`].
pub const MAX_AUDIT_TEXT_LEN: usize = 128;

/// Which bucket an event was counted in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Bucket<K> {
    /// The event's own key.
    Key(K),
    /// The shared overflow bucket: the key bound was reached when the event's key was new.
    Other,
}

/// What the caller does with one observed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The first event of its key in this interval: write an audit record now.
    Write,
    /// The first event of this interval that overflowed the key bound: write one record saying
    /// that further distinct keys are aggregated under "other".
    WriteOther,
    /// A repeat: count it (metrics); it appears in a later [`Summary`], no record now.
    Count,
}

/// The aggregate of one key over one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary<K> {
    /// The key (or the overflow bucket).
    pub key: Bucket<K>,
    /// Events in the interval, including the first one (which was written at once).
    pub count: u64,
    /// Time of the first event.
    pub first: UnixTime,
    /// Time of the last event.
    pub last: UnixTime,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    count: u64,
    first: UnixTime,
    last: UnixTime,
}

impl Entry {
    fn new(now: UnixTime) -> Self {
        Self {
            count: 1,
            first: now,
            last: now,
        }
    }

    fn bump(&mut self, now: UnixTime) {
        self.count = self.count.saturating_add(1);
        self.last = self.last.max(now);
    }
}

/// Counts repeated events per key and interval; see the module documentation.
#[derive(Debug)]
pub struct Aggregator<K> {
    interval_secs: u64,
    max_keys: usize,
    entries: HashMap<K, Entry>,
    other: Option<Entry>,
    /// Earliest time an entry's interval ends (`None`: nothing tracked), so `flush` is O(1)
    /// while nothing is due.
    next_due: Option<UnixTime>,
    overflowed: u64,
}

impl<K: Eq + Hash + Clone> Aggregator<K> {
    /// An aggregator with one interval of `interval_secs` (at least 1) per key, tracking at most
    /// `max_keys` keys (at least 1) before the overflow bucket.
    pub fn new(interval_secs: u64, max_keys: usize) -> Self {
        Self {
            interval_secs: interval_secs.max(1),
            max_keys: max_keys.max(1),
            entries: HashMap::new(),
            other: None,
            next_due: None,
            overflowed: 0,
        }
    }

    /// An aggregator with [`DEFAULT_AGGREGATION_INTERVAL_SECS`] and
    /// [`DEFAULT_MAX_AGGREGATION_KEYS`].
    pub fn with_defaults() -> Self {
        Self::new(
            DEFAULT_AGGREGATION_INTERVAL_SECS,
            DEFAULT_MAX_AGGREGATION_KEYS,
        )
    }

    /// Records one event of `key` at `now` and says whether to write a record now.
    ///
    /// An entry whose interval has passed but that was not flushed yet keeps counting (nothing is
    /// lost; the next [`flush`](Self::flush) reports it), so call `flush` first.
    pub fn observe(&mut self, key: K, now: UnixTime) -> Decision {
        let due = now.plus(self.interval_secs);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.bump(now);
            return Decision::Count;
        }
        if self.entries.len() < self.max_keys {
            self.entries.insert(key, Entry::new(now));
            self.note_due(due);
            return Decision::Write;
        }
        self.overflowed = self.overflowed.saturating_add(1);
        match &mut self.other {
            Some(entry) => {
                entry.bump(now);
                Decision::Count
            }
            None => {
                self.other = Some(Entry::new(now));
                self.note_due(due);
                Decision::WriteOther
            }
        }
    }

    /// The summaries of every key whose interval has ended by `now` (those keys are forgotten,
    /// so their next event is written again). Keys seen only once give no summary: their one
    /// record was written at once. O(1) while nothing is due.
    pub fn flush(&mut self, now: UnixTime) -> Vec<Summary<K>> {
        match self.next_due {
            Some(due) if due <= now => {}
            _ => return Vec::new(),
        }
        let interval = self.interval_secs;
        let ended = |e: &Entry| e.first.plus(interval) <= now;
        let mut out = Vec::new();
        let done: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, e)| ended(e))
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            if let Some(e) = self.entries.remove(&k) {
                push_summary(&mut out, Bucket::Key(k), e);
            }
        }
        if let Some(e) = self.other.filter(ended) {
            self.other = None;
            push_summary(&mut out, Bucket::Other, e);
        }
        self.recompute_due();
        out
    }

    /// Every pending summary, due or not (on shutdown). Leaves the aggregator empty.
    pub fn drain(&mut self) -> Vec<Summary<K>> {
        let mut out = Vec::new();
        for (k, e) in self.entries.drain() {
            push_summary(&mut out, Bucket::Key(k), e);
        }
        if let Some(e) = self.other.take() {
            push_summary(&mut out, Bucket::Other, e);
        }
        self.next_due = None;
        out
    }

    /// Keys tracked now (at most `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.entries.len()
    }

    /// Events counted in the overflow bucket since creation (for a metric).
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    fn note_due(&mut self, due: UnixTime) {
        self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
    }

    fn recompute_due(&mut self) {
        let interval = self.interval_secs;
        self.next_due = self
            .entries
            .values()
            .chain(self.other.iter())
            .map(|e| e.first.plus(interval))
            .min();
    }
}

fn push_summary<K>(out: &mut Vec<Summary<K>>, key: Bucket<K>, e: Entry) {
    if e.count > 1 {
        out.push(Summary {
            key,
            count: e.count,
            first: e.first,
            last: e.last,
        });
    }
}

/// `s` made safe for one audit field: control characters (newlines, escapes) replaced by
/// `?`, cut to at most [`MAX_AUDIT_TEXT_LEN`] bytes at a character boundary, with `…` appended
/// when cut.
pub fn bounded_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_AUDIT_TEXT_LEN + 3));
    for c in s.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_AUDIT_TEXT_LEN {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    #[test]
    fn first_is_written_repeats_are_counted_and_summarised() {
        let mut a = Aggregator::new(60, 8);
        assert_eq!(a.observe("k", t(100)), Decision::Write);
        for i in 0..9_999 {
            assert_eq!(a.observe("k", t(100 + i % 50)), Decision::Count);
        }
        assert!(
            a.flush(t(159)).is_empty(),
            "not due before the interval ends"
        );
        let s = a.flush(t(160));
        assert_eq!(
            s,
            vec![Summary {
                key: Bucket::Key("k"),
                count: 10_000,
                first: t(100),
                last: t(149),
            }]
        );
        assert!(a.flush(t(1_000)).is_empty(), "a summary is given once");
        assert_eq!(a.observe("k", t(161)), Decision::Write, "a new interval");
    }

    #[test]
    fn single_events_give_no_summary() {
        let mut a = Aggregator::new(10, 8);
        assert_eq!(a.observe(1u32, t(0)), Decision::Write);
        assert_eq!(a.observe(2u32, t(5)), Decision::Write);
        assert!(a.flush(t(10)).is_empty());
        assert_eq!(a.tracked_keys(), 1, "key 1 forgotten, key 2 not yet due");
        assert!(a.flush(t(15)).is_empty());
        assert_eq!(a.tracked_keys(), 0);
    }

    #[test]
    fn keys_are_independent_and_due_separately() {
        let mut a = Aggregator::new(10, 8);
        a.observe(("ip1", "bad secret"), t(0));
        a.observe(("ip1", "bad secret"), t(1));
        a.observe(("ip1", "unknown key"), t(5));
        a.observe(("ip1", "unknown key"), t(6));
        let s = a.flush(t(10));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].key, Bucket::Key(("ip1", "bad secret")));
        assert_eq!(s[0].count, 2);
        let s = a.flush(t(15));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].key, Bucket::Key(("ip1", "unknown key")));
    }

    #[test]
    fn past_the_key_bound_events_go_to_other() {
        let mut a = Aggregator::new(60, 3);
        for k in 0..3u32 {
            assert_eq!(a.observe(k, t(0)), Decision::Write);
        }
        assert_eq!(a.observe(3, t(1)), Decision::WriteOther, "first overflow");
        for k in 4..10_000u32 {
            assert_eq!(a.observe(k, t(2)), Decision::Count);
        }
        assert_eq!(a.tracked_keys(), 3, "memory stays bounded");
        assert_eq!(a.overflowed(), 9_997);
        // A tracked key still counts under its own key.
        assert_eq!(a.observe(0, t(3)), Decision::Count);
        let s = a.flush(t(61));
        let other = s.iter().find(|s| s.key == Bucket::Other).expect("other");
        assert_eq!(other.count, 9_997);
        assert_eq!((other.first, other.last), (t(1), t(2)));
        let zero = s.iter().find(|s| s.key == Bucket::Key(0)).expect("key 0");
        assert_eq!(zero.count, 2);
        assert_eq!(s.len(), 2, "keys 1 and 2 were seen once");
        assert_eq!(a.observe(4, t(62)), Decision::Write, "room again");
    }

    #[test]
    fn unflushed_entries_keep_counting_and_lose_nothing() {
        let mut a = Aggregator::new(10, 4);
        a.observe("k", t(0));
        assert_eq!(a.observe("k", t(100)), Decision::Count);
        let s = a.flush(t(100));
        assert_eq!(s[0].count, 2);
        assert_eq!(s[0].last, t(100));
    }

    #[test]
    fn drain_returns_everything_pending() {
        let mut a = Aggregator::new(60, 1);
        a.observe("a", t(0));
        a.observe("a", t(1));
        a.observe("b", t(1));
        a.observe("c", t(2));
        let mut s = a.drain();
        s.sort_by_key(|s| s.first);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].key, Bucket::Key("a"));
        assert_eq!(s[1].key, Bucket::Other);
        assert_eq!(s[1].count, 2);
        assert!(a.drain().is_empty());
        assert!(a.flush(t(1_000)).is_empty());
    }

    #[test]
    fn zero_limits_are_raised_to_one() {
        let mut a = Aggregator::new(0, 0);
        assert_eq!(a.observe(1u8, t(0)), Decision::Write);
        assert_eq!(a.observe(2u8, t(0)), Decision::WriteOther);
        assert_eq!(a.flush(t(1)).len(), 0);
    }

    #[test]
    fn bounded_text_cuts_and_neutralises() {
        assert_eq!(bounded_text("host-1"), "host-1");
        assert_eq!(bounded_text("a\nb\u{1b}[31m"), "a?b?[31m");
        let long = "é".repeat(200);
        let b = bounded_text(&long);
        assert!(b.len() <= MAX_AUDIT_TEXT_LEN + '…'.len_utf8());
        assert!(b.ends_with('…'));
        assert!(b.starts_with("éé"));
        let exact = "x".repeat(MAX_AUDIT_TEXT_LEN);
        assert_eq!(bounded_text(&exact), exact);
    }
}
