//! The forged-token limit: the sliding-window meter, and the per-peer ledger that keeps it
//! across connections and escalates to a temporary refusal of the peer.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::NodeId;
use crate::time::UnixTime;

/// More than this many forged tokens from one peer within [`FORGERY_WINDOW_SECS`] (over all
/// its connections) closes the connection and suspends the peer (docs/design.md,
/// "Verification order").
pub const MAX_FORGED_PER_WINDOW: usize = 3;
/// The sliding window for [`MAX_FORGED_PER_WINDOW`].
pub const FORGERY_WINDOW_SECS: u64 = 60;
/// The first suspension of a peer that passed the limit: its handshakes and streams are
/// refused, its connections closed, for this long. Each further strike within
/// [`STRIKE_MEMORY_SECS`] doubles it, up to [`MAX_SUSPENSION_SECS`].
pub const FORGERY_SUSPENSION_SECS: u64 = 60;
/// Longest suspension for forged tokens.
pub const MAX_SUSPENSION_SECS: u64 = 3600;
/// A peer's strikes are forgotten this long after its last suspension ended (the escalation
/// decays; counted from the end so that a long suspension does not erase its own strike).
pub const STRIKE_MEMORY_SECS: u64 = 3600;
/// Peers the ledger remembers at most. Only authenticated table peers reach the gate, so this
/// is never reached in practice; past it, entries with nothing left to remember go first,
/// then the one suspended for the shortest time (never an unbounded map).
pub const MAX_TRACKED_PEERS: usize = 4096;

/// Counts forged tokens in a sliding window.
#[derive(Debug, Default, Clone)]
pub struct ForgeryMeter {
    seen: VecDeque<UnixTime>,
}

/// The limit was passed: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_FORGED_PER_WINDOW} forged tokens within {FORGERY_WINDOW_SECS} s")]
pub struct ForgeryLimitExceeded;

impl ForgeryMeter {
    /// Records one forged token at `now`; call for each refusal where
    /// [`TokenRefusal::is_forgery`](super::TokenRefusal::is_forgery) holds.
    pub fn record(&mut self, now: UnixTime) -> Result<(), ForgeryLimitExceeded> {
        self.expire(now);
        self.seen.push_back(now);
        if self.seen.len() > MAX_FORGED_PER_WINDOW {
            Err(ForgeryLimitExceeded)
        } else {
            Ok(())
        }
    }

    fn expire(&mut self, now: UnixTime) {
        while self
            .seen
            .front()
            .is_some_and(|t| now.secs_since(*t) >= FORGERY_WINDOW_SECS)
        {
            self.seen.pop_front();
        }
    }

    /// Forged tokens still inside the window at `now`.
    pub fn in_window(&self, now: UnixTime) -> usize {
        self.seen
            .iter()
            .filter(|t| now.secs_since(**t) < FORGERY_WINDOW_SECS)
            .count()
    }
}

/// What one forged token from a peer leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeryVerdict {
    /// Counted; the peer is still under the limit.
    Counted,
    /// The peer passed the limit: close its connections, report it, refuse it until `until`.
    Suspend {
        /// End of the suspension.
        until: UnixTime,
        /// Strikes remembered ([`STRIKE_MEMORY_SECS`]), this one included (1 for the first).
        strikes: u32,
    },
}

#[derive(Debug, Default, Clone)]
struct PeerRecord {
    meter: ForgeryMeter,
    strikes: u32,
    suspended_until: Option<UnixTime>,
}

impl PeerRecord {
    /// Nothing left to remember at `now`: no forgery in the window, no live strike.
    fn idle(&self, now: UnixTime) -> bool {
        self.meter.in_window(now) == 0 && !self.remembers_strikes(now)
    }

    /// The strikes still count at `now` (within [`STRIKE_MEMORY_SECS`] of the last
    /// suspension's end, or during it).
    fn remembers_strikes(&self, now: UnixTime) -> bool {
        self.suspended_until
            .is_some_and(|u| now.secs_since(u) < STRIKE_MEMORY_SECS)
    }
}

/// Forged tokens per peer node id, whatever connection they came on: reconnecting resets
/// nothing. Pure; the node keeps one in its state.
#[derive(Debug, Default, Clone)]
pub struct ForgeryLedger {
    peers: BTreeMap<NodeId, PeerRecord>,
}

impl ForgeryLedger {
    /// Records one forged token from `peer` at `now`.
    pub fn record(&mut self, peer: NodeId, now: UnixTime) -> ForgeryVerdict {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_TRACKED_PEERS {
            self.make_room(now);
        }
        let r = self.peers.entry(peer).or_default();
        if r.meter.record(now).is_ok() {
            return ForgeryVerdict::Counted;
        }
        // Past the limit: a strike. The window starts over (the suspension is the penalty).
        r.meter = ForgeryMeter::default();
        if !r.remembers_strikes(now) {
            r.strikes = 0;
        }
        r.strikes = r.strikes.saturating_add(1);
        let doublings = (r.strikes - 1).min(16);
        let secs = (FORGERY_SUSPENSION_SECS << doublings).min(MAX_SUSPENSION_SECS);
        let until = now.plus(secs);
        r.suspended_until = Some(until);
        ForgeryVerdict::Suspend {
            until,
            strikes: r.strikes,
        }
    }

    /// When `peer` is suspended at `now`: the end of its suspension.
    pub fn suspended_until(&self, peer: &NodeId, now: UnixTime) -> Option<UnixTime> {
        self.peers
            .get(peer)
            .and_then(|r| r.suspended_until)
            .filter(|u| now < *u)
    }

    /// Peers remembered (for tests and `show`).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when no peer is remembered.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Forgets peers with nothing left to remember at `now`.
    pub fn prune(&mut self, now: UnixTime) {
        self.peers.retain(|_, r| !r.idle(now));
    }

    fn make_room(&mut self, now: UnixTime) {
        self.prune(now);
        if self.peers.len() < MAX_TRACKED_PEERS {
            return;
        }
        let shortest = self
            .peers
            .iter()
            .min_by_key(|(_, r)| r.suspended_until.unwrap_or(UnixTime::from_secs(0)))
            .map(|(id, _)| *id);
        if let Some(id) = shortest {
            self.peers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_spki(&[n; 44])
    }

    fn at(s: u64) -> UnixTime {
        UnixTime::from_secs(1_000_000 + s)
    }

    #[test]
    fn the_limit_holds_per_peer_and_suspends_on_the_first_past_it() {
        let mut l = ForgeryLedger::default();
        for i in 0..MAX_FORGED_PER_WINDOW as u64 {
            assert_eq!(l.record(id(1), at(i)), ForgeryVerdict::Counted);
            // Another peer's forgeries never count towards this one's.
            assert_eq!(l.record(id(2), at(i)), ForgeryVerdict::Counted);
        }
        assert_eq!(l.suspended_until(&id(1), at(3)), None);
        assert_eq!(
            l.record(id(1), at(3)),
            ForgeryVerdict::Suspend {
                until: at(3 + FORGERY_SUSPENSION_SECS),
                strikes: 1
            }
        );
        assert_eq!(
            l.suspended_until(&id(1), at(4)),
            Some(at(3 + FORGERY_SUSPENSION_SECS))
        );
        assert_eq!(l.suspended_until(&id(2), at(4)), None);
        // The suspension ends exactly at its end.
        assert_eq!(
            l.suspended_until(&id(1), at(3 + FORGERY_SUSPENSION_SECS)),
            None
        );
    }

    #[test]
    fn the_window_slides_and_forgeries_decay() {
        let mut l = ForgeryLedger::default();
        for i in 0..10u64 {
            // One forgery every 20 s: never more than 3 in 60 s.
            assert_eq!(l.record(id(1), at(i * 20)), ForgeryVerdict::Counted, "{i}");
        }
        // Long quiet: the peer is forgotten.
        l.prune(at(10 * 20 + FORGERY_WINDOW_SECS));
        assert!(l.is_empty());
    }

    #[test]
    fn repeated_strikes_double_the_suspension_up_to_the_cap_and_are_forgotten() {
        let mut l = ForgeryLedger::default();
        let mut t = 0;
        let mut lengths = Vec::new();
        for _ in 0..10 {
            let mut verdict = ForgeryVerdict::Counted;
            for _ in 0..=MAX_FORGED_PER_WINDOW {
                verdict = l.record(id(1), at(t));
            }
            let ForgeryVerdict::Suspend { until, .. } = verdict else {
                panic!("the fourth forgery suspends: {verdict:?}");
            };
            lengths.push(until.secs_since(at(t)));
            t = until.secs_since(at(0)) + 1;
        }
        assert_eq!(lengths[..4], [60, 120, 240, 480]);
        assert_eq!(*lengths.last().expect("some"), MAX_SUSPENSION_SECS);
        assert!(lengths.iter().all(|l| *l <= MAX_SUSPENSION_SECS));
        // STRIKE_MEMORY_SECS after the last suspension ended, the escalation starts over.
        t += STRIKE_MEMORY_SECS;
        let mut verdict = ForgeryVerdict::Counted;
        for _ in 0..=MAX_FORGED_PER_WINDOW {
            verdict = l.record(id(1), at(t));
        }
        assert_eq!(
            verdict,
            ForgeryVerdict::Suspend {
                until: at(t + FORGERY_SUSPENSION_SECS),
                strikes: 1
            }
        );
    }

    #[test]
    fn the_ledger_is_bounded_and_keeps_suspensions_it_can() {
        let mut l = ForgeryLedger::default();
        for _ in 0..=MAX_FORGED_PER_WINDOW {
            l.record(id(0), at(0));
        }
        assert!(l.suspended_until(&id(0), at(1)).is_some());
        for n in 0..(MAX_TRACKED_PEERS as u32 + 100) {
            let spki: Vec<u8> = n.to_be_bytes().iter().copied().cycle().take(44).collect();
            l.record(NodeId::from_spki(&spki), at(1));
        }
        assert!(l.len() <= MAX_TRACKED_PEERS, "{}", l.len());
        assert!(
            l.suspended_until(&id(0), at(2)).is_some(),
            "a suspended peer outlives peers with one forgery"
        );
    }
}
