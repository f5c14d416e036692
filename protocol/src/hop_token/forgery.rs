//! The forged-token limit of a connection: the sliding-window meter and its error.

use std::collections::VecDeque;

use crate::time::UnixTime;

/// More than this many forged tokens within [`FORGERY_WINDOW_SECS`] on one connection closes
/// it (docs/design.md, "Verification order").
pub const MAX_FORGED_PER_WINDOW: usize = 3;
/// The sliding window for [`MAX_FORGED_PER_WINDOW`].
pub const FORGERY_WINDOW_SECS: u64 = 60;

/// Counts forged tokens on one connection in a sliding window.
#[derive(Debug, Default, Clone)]
pub struct ForgeryMeter {
    seen: VecDeque<UnixTime>,
}

/// The connection passed the forged-token limit and must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_FORGED_PER_WINDOW} forged tokens within {FORGERY_WINDOW_SECS} s")]
pub struct ForgeryLimitExceeded;

impl ForgeryMeter {
    /// Records one forged token at `now`; call for each refusal where
    /// [`TokenRefusal::is_forgery`](super::TokenRefusal::is_forgery) holds.
    pub fn record(&mut self, now: UnixTime) -> Result<(), ForgeryLimitExceeded> {
        while self
            .seen
            .front()
            .is_some_and(|t| now.secs_since(*t) >= FORGERY_WINDOW_SECS)
        {
            self.seen.pop_front();
        }
        self.seen.push_back(now);
        if self.seen.len() > MAX_FORGED_PER_WINDOW {
            Err(ForgeryLimitExceeded)
        } else {
            Ok(())
        }
    }
}
