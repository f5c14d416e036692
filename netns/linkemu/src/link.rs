//! The link model, pure: when a packet that arrives now leaves the link, or that the queue drops
//! it. One direction per destination address; a capped direction serializes at the rate behind
//! a drop-tail queue of packets, then every packet is held the one-way delay.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What the link does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Written back at this instant.
    Release(Instant),
    /// The direction's queue is full: dropped, as a router's tail drop.
    QueueFull,
}

/// One direction's line: when it is free again, and the serialization end times still queued.
#[derive(Debug)]
struct Line {
    free_at: Instant,
    queued: VecDeque<Instant>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Link {
    delay: Duration,
    /// Nanoseconds per byte; `None`: uncapped (no serialization, no queue).
    ns_per_byte: Option<f64>,
    queue_limit: usize,
    lines: HashMap<[u8; 16], Line>,
}

impl Link {
    /// A link holding packets `delay` each way; `rate_mbit` 0 is uncapped.
    pub(crate) fn new(delay: Duration, rate_mbit: f64, queue_limit: usize) -> Self {
        Link {
            delay,
            ns_per_byte: (rate_mbit > 0.0).then(|| 8_000.0 / rate_mbit),
            queue_limit,
            lines: HashMap::new(),
        }
    }

    /// The fate of a `len`-byte packet to `dst` arriving at `now` (`now` never decreases).
    pub(crate) fn admit(&mut self, now: Instant, len: usize, dst: [u8; 16]) -> Fate {
        let Some(ns_per_byte) = self.ns_per_byte else {
            return Fate::Release(now + self.delay);
        };
        let line = self.lines.entry(dst).or_insert_with(|| Line {
            free_at: now,
            queued: VecDeque::new(),
        });
        while line.queued.front().is_some_and(|&done| done <= now) {
            line.queued.pop_front();
        }
        if line.queued.len() >= self.queue_limit {
            return Fate::QueueFull;
        }
        let start = line.free_at.max(now);
        let done = start + Duration::from_nanos((len as f64 * ns_per_byte) as u64);
        line.free_at = done;
        line.queued.push_back(done);
        Fate::Release(done + self.delay)
    }
}

/// The destination address of an IP packet (IPv4 in the first 4 bytes), or zeros if it is
/// neither IPv4 nor IPv6 or too short.
pub(crate) fn destination(packet: &[u8]) -> [u8; 16] {
    let mut dst = [0u8; 16];
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => dst[..4].copy_from_slice(&packet[16..20]),
        Some(6) if packet.len() >= 40 => dst.copy_from_slice(&packet[24..40]),
        _ => {}
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn uncapped_holds_every_packet_the_delay_and_never_queues() {
        let mut link = Link::new(10 * MS, 0.0, 1);
        let t = Instant::now();
        for i in 0..1000 {
            assert_eq!(
                link.admit(t, 1500, [i as u8; 16]),
                Fate::Release(t + 10 * MS)
            );
        }
    }

    #[test]
    fn capped_serializes_per_direction_then_tail_drops() {
        // 100 Mbit/s: 1250 bytes take 100 µs.
        let mut link = Link::new(10 * MS, 100.0, 2);
        let t = Instant::now();
        let us = Duration::from_micros(1);
        let a = [1u8; 16];
        assert_eq!(
            link.admit(t, 1250, a),
            Fate::Release(t + 100 * us + 10 * MS)
        );
        assert_eq!(
            link.admit(t, 1250, a),
            Fate::Release(t + 200 * us + 10 * MS)
        );
        assert_eq!(
            link.admit(t, 1250, a),
            Fate::QueueFull,
            "two queued already"
        );
        // The other direction has its own line.
        assert_eq!(
            link.admit(t, 1250, [2u8; 16]),
            Fate::Release(t + 100 * us + 10 * MS)
        );
        // Once the first left the line there is room again, behind the second.
        let later = t + 150 * us;
        assert_eq!(
            link.admit(later, 1250, a),
            Fate::Release(t + 300 * us + 10 * MS)
        );
        // An idle line starts serializing at the arrival.
        let idle = t + 10 * MS;
        assert_eq!(
            link.admit(idle, 1250, a),
            Fate::Release(idle + 100 * us + 10 * MS)
        );
    }

    #[test]
    fn destinations_of_both_families_and_of_garbage() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[198, 51, 100, 2]);
        assert_eq!(destination(&v4)[..4], [198, 51, 100, 2]);
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(&[7u8; 16]);
        assert_eq!(destination(&v6), [7u8; 16]);
        assert_eq!(destination(&v4[..19]), [0u8; 16], "short");
        assert_eq!(destination(&[]), [0u8; 16], "empty");
        assert_eq!(destination(&[0x10; 64]), [0u8; 16], "not IP");
    }
}
