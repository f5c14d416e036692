//! Time as a value: the protocol never reads the system clock.
//!
//! Every time-dependent function in this crate takes `now: UnixTime`; the node and
//! the verifier read their clock (possibly with a test offset) and pass it in.

use serde::{Deserialize, Serialize};

/// Whole seconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixTime(u64);

impl UnixTime {
    /// The time `secs` seconds after the Unix epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since the Unix epoch.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// `self + secs`, saturating at the far future instead of wrapping.
    pub const fn plus(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }

    /// `self - secs`, saturating at the epoch instead of wrapping.
    pub const fn minus(self, secs: u64) -> Self {
        Self(self.0.saturating_sub(secs))
    }

    /// Seconds from `earlier` to `self`, or 0 when `earlier` is later.
    pub const fn secs_since(self, earlier: UnixTime) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::fmt::Display for UnixTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// A source of the current time. The IO crates implement it over the system clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> UnixTime;
}

/// A clock that always says the same time; for tests and deterministic replays.
#[derive(Clone, Copy, Debug)]
pub struct FixedClock(pub UnixTime);

impl Clock for FixedClock {
    fn now(&self) -> UnixTime {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(UnixTime::from_secs(u64::MAX).plus(5).as_secs(), u64::MAX);
        assert_eq!(UnixTime::from_secs(3).minus(5).as_secs(), 0);
        assert_eq!(
            UnixTime::from_secs(10).secs_since(UnixTime::from_secs(4)),
            6
        );
        assert_eq!(
            UnixTime::from_secs(4).secs_since(UnixTime::from_secs(10)),
            0
        );
        assert_eq!(
            FixedClock(UnixTime::from_secs(7)).now(),
            UnixTime::from_secs(7)
        );
    }
}
