//! Counters for `ctl show` and metrics: lock-free on the hot path, a small map for refusal
//! reasons.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Node counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams accepted by the gate.
    pub streams_accepted: AtomicU64,
    /// Streams opened for SOCKS clients.
    pub streams_opened: AtomicU64,
    /// SOCKS connections that got success.
    pub socks_ok: AtomicU64,
    /// Bytes from apps into the mesh.
    pub bytes_out: AtomicU64,
    /// Bytes from the mesh to apps or backends.
    pub bytes_in: AtomicU64,
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

/// A snapshot for JSON.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CountersView {
    /// Streams accepted.
    pub streams_accepted: u64,
    /// Streams opened.
    pub streams_opened: u64,
    /// SOCKS successes.
    pub socks_ok: u64,
    /// Bytes out.
    pub bytes_out: u64,
    /// Bytes in.
    pub bytes_in: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counts one refusal.
    pub fn refused(&self, reason: &'static str) {
        let mut m = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(reason).or_default() += 1;
    }

    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn view(&self) -> CountersView {
        CountersView {
            streams_accepted: self.streams_accepted.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            socks_ok: self.socks_ok.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            refused: self
                .refusals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}
