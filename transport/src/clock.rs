//! The system clock, with an optional offset for skew tests.

use std::time::{SystemTime, UNIX_EPOCH};

use hopmesh_protocol::time::{Clock, UnixTime};

/// Reads the system clock and adds `offset_secs` (0 in production; the `--clock-offset`
/// test flag sets it to simulate skew).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock {
    /// Seconds added to the real time (may be negative).
    pub offset_secs: i64,
}

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        // A clock before 1970 reads as the epoch rather than panicking.
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        UnixTime::from_secs(real.saturating_add_signed(self.offset_secs))
    }
}
