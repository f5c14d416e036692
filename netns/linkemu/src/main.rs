//! hopmesh-linkemu: a WAN link emulator on a TUN device, for kernels without netem (the netns
//! benchmark's lossy links, `netns/run.sh bench_lossy`).
//!
//! `hopmesh-linkemu TUN DELAY_MS RATE_MBIT QUEUE_PACKETS SECONDS` creates TUN (no packet info
//! header). Every IP packet the kernel routes into it is serialized at RATE_MBIT per direction
//! (direction = destination address) behind a drop-tail queue of QUEUE_PACKETS, held DELAY_MS,
//! then written back, so the kernel receives it again from TUN and forwards it by its normal
//! routes: QUIC and kernel TCP cross the same link. RATE_MBIT 0 is uncapped: the link is then
//! as fast as this forwards (one thread reads, one writes), which `bench_lossy` measures and
//! reports. Loss is added by nftables on the packets leaving TUN. At most [`HELD_LIMIT`]
//! packets are held at once (beyond it they are dropped and counted). Exits after SECONDS (or
//! on SIGTERM), printing what it forwarded and dropped every [`REPORT_EVERY`] while it changes.

mod link;
mod tun;

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use crate::link::{Fate, Link, destination};

/// Most packets held (queued or delayed) at once: 100 000 packets of at most 64 KiB, a memory
/// bound, and above any bandwidth-delay product of the benchmark (1 GB/s at 50 ms is 35 000
/// packets of 1 500 bytes).
const HELD_LIMIT: usize = 100_000;
/// How often the counts are printed while they change.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Largest packet read from TUN (its MTU is far below).
const MAX_PACKET: usize = 65_536;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A WAN link emulator on a TUN device (delay, rate, queue)"
)]
struct Args {
    /// TUN device to create.
    tun: String,
    /// One-way delay in milliseconds (each direction).
    delay_ms: f64,
    /// Rate per direction in Mbit/s; 0: uncapped.
    rate_mbit: f64,
    /// Drop-tail queue per direction, in packets (capped links only).
    queue_packets: usize,
    /// Exit after this many seconds.
    seconds: f64,
}

/// What the two threads count.
#[derive(Debug, Default)]
struct Counts {
    forwarded: AtomicU64,
    queue_drops: AtomicU64,
    held_drops: AtomicU64,
    write_errors: AtomicU64,
    held: AtomicUsize,
}

/// A packet waiting for its release time (earliest first; arrival order among equals).
#[derive(Debug)]
struct Held {
    at: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // Reversed: BinaryHeap is a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.delay_ms.is_finite() && args.delay_ms >= 0.0,
        "DELAY_MS must be a number ≥ 0"
    );
    anyhow::ensure!(
        args.rate_mbit.is_finite() && args.rate_mbit >= 0.0,
        "RATE_MBIT must be a number ≥ 0 (0: uncapped)"
    );
    anyhow::ensure!(args.queue_packets > 0, "QUEUE_PACKETS must be at least 1");
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "SECONDS must be a number > 0"
    );
    let reader = tun::create(&args.tun).with_context(|| format!("create TUN {}", args.tun))?;
    let writer = reader.try_clone().context("dup the TUN descriptor")?;
    let rate = if args.rate_mbit > 0.0 {
        format!("{} Mbit/s", args.rate_mbit)
    } else {
        "uncapped".into()
    };
    println!(
        "hopmesh-linkemu: {}: {rate}, {} ms each way, queue {}",
        args.tun, args.delay_ms, args.queue_packets
    );
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    let link = Link::new(delay, args.rate_mbit, args.queue_packets);
    let counts = Arc::new(Counts::default());
    let (tx, rx) = mpsc::channel();
    {
        let counts = counts.clone();
        std::thread::spawn(move || read_loop(reader, link, tx, &counts));
    }
    {
        let counts = counts.clone();
        std::thread::spawn(move || write_loop(writer, rx, &counts));
    }
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut last = String::new();
    while Instant::now() < end {
        std::thread::sleep(REPORT_EVERY.min(end.saturating_duration_since(Instant::now())));
        let line = report(&counts);
        if line != last {
            println!("{line}");
            last = line;
        }
    }
    Ok(())
}

fn report(c: &Counts) -> String {
    format!(
        "hopmesh-linkemu: forwarded {}, queue drops {}, held-limit drops {}, write errors {}",
        c.forwarded.load(Ordering::Relaxed),
        c.queue_drops.load(Ordering::Relaxed),
        c.held_drops.load(Ordering::Relaxed),
        c.write_errors.load(Ordering::Relaxed),
    )
}

/// Reads packets, decides each one's fate and hands the kept ones to the writer.
fn read_loop(mut tun: std::fs::File, mut link: Link, tx: mpsc::Sender<Held>, counts: &Counts) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut seq = 0u64;
    loop {
        let n = match tun.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("hopmesh-linkemu: read: {e}");
                std::process::exit(1);
            }
        };
        if counts.held.load(Ordering::Relaxed) >= HELD_LIMIT {
            counts.held_drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let packet = &buf[..n];
        match link.admit(Instant::now(), n, destination(packet)) {
            Fate::QueueFull => {
                counts.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Release(at) => {
                seq += 1;
                counts.held.fetch_add(1, Ordering::Relaxed);
                let held = Held {
                    at,
                    seq,
                    packet: packet.to_vec(),
                };
                if tx.send(held).is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes every held packet back at its release time, earliest first.
fn write_loop(mut tun: std::fs::File, rx: mpsc::Receiver<Held>, counts: &Counts) {
    let mut heap = BinaryHeap::new();
    loop {
        let next = match heap.peek() {
            Some(Held { at, .. }) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(held) => {
                heap.push(held);
                heap.extend(rx.try_iter());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|h| h.at <= now) {
            let Some(held) = heap.pop() else { break };
            counts.held.fetch_sub(1, Ordering::Relaxed);
            // One write is one packet; a refused (or short) one is a lost packet, as on a wire.
            match tun.write(&held.packet) {
                Ok(n) if n == held.packet.len() => counts.forwarded.fetch_add(1, Ordering::Relaxed),
                _ => counts.write_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_leave_earliest_first_then_in_arrival_order() {
        let t = Instant::now();
        let mut heap = BinaryHeap::new();
        for (dt, seq) in [(3, 1), (1, 2), (1, 3), (2, 4)] {
            heap.push(Held {
                at: t + Duration::from_millis(dt),
                seq,
                packet: Vec::new(),
            });
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|h| h.seq)).collect();
        assert_eq!(order, [2, 3, 4, 1]);
    }

    #[test]
    fn bad_arguments_are_refused_by_the_parser() {
        assert!(Args::try_parse_from(["linkemu", "t0", "10", "0", "200"]).is_err());
        assert!(Args::try_parse_from(["linkemu", "t0", "ten", "0", "200", "5"]).is_err());
        let ok = Args::try_parse_from(["linkemu", "t0", "10", "0", "200", "5"]).expect("valid");
        assert_eq!(ok.rate_mbit, 0.0);
    }
}
