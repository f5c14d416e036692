//! Incremental compilation (`hopmesh_protocol::policy::MeshTables`), pure, no network: the
//! enrolment rate as the mesh grows, against the full recompile every enrolment used to cost.
//!
//! Shapes (issue "The control plane at 10 000 nodes"):
//! - `segments`: 100 segments of 100 nodes, every node serves one service, `allow sK -> sK`
//!   (10 000 nodes, 100 peers each), enrolled round-robin across segments;
//! - `all-to-all`: one segment of 2 000 nodes all serving a service (tables of ~2 000 peers).
//!
//! For each, at a small and a large size of the same shape: enrolments per second over the
//! whole run (round-robin, so the same mean table growth per enrolment at both sizes) and over
//! the last window, the ratio large/small (target for `segments`: 10 000 >= 0.8x 100), the
//! cost per entry change, a policy reload (one rule changed), and the baseline from the same
//! run: one full `Policy::compile` of the directory (what every enrolment cost before) at 100 and
//! 1 000 nodes of the shape. `cargo bench --bench mesh_tables` runs the full sizes;
//! `-- --quick` (and `cargo test`) a tenth. Timings need a quiet machine.
//!
//! Memory (the process's resident set, as the simulator measures the verifier; the workspace
//! forbids `unsafe`, so no counting allocator): the growth of RSS per live node while
//! `MeshTables` enrols them all, against the same tables held as `Entries` (one
//! `BTreeMap<TableKey, TableEntry>` per node, every `Peer` entry its own copy of the peer's
//! name and addresses: what the verifier kept before), measured in the same run by
//! materialising up to [`ENTRIES_SAMPLE`] nodes' entries at once. The run fails if `segments`
//! (99 peers per node) grows by more than [`MAX_TABLE_BYTES_PER_NODE`] per node. That shape
//! runs first, on a fresh heap; every later figure is a lower bound (it reuses memory that
//! earlier shapes freed).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{Address, PeerInfo};
use hopmesh_protocol::ids::{NodeId, NodeName};
use hopmesh_protocol::policy::{MeshTables, NodeDirectory, Policy, PolicyDiff};
use hopmesh_protocol::wire::BoundedVec;

/// The most `MeshTables` may hold per live node in the `segments` shape (99 peers, 99 routes,
/// 99 `Allowed`, one service per node): measured 2026-12 at ~37 KiB, against ~110 KiB as
/// `Entries` (the representation before). The verifier's RSS target is 100 KiB per node in
/// all (issue #13).
const MAX_TABLE_BYTES_PER_NODE: usize = 48 * 1024;

/// How many nodes' entries are materialised at once for the `Entries` comparison (all of a
/// 10 000-node mesh would need gigabytes).
const ENTRIES_SAMPLE: usize = 1_000;

/// This process's resident set (`VmRSS` of /proc/self/status), in bytes; 0 where there is
/// none (not Linux), which fails the limit check rather than passing it silently.
fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// `segments` x `per` nodes `n{s}x{i}`, node i of segment s serving `v{i}.s{s}`.
fn policy(segments: usize, per: usize, allow_segment: bool) -> String {
    let mut t = String::from("[attestation]\nallow_any_measurement = true\n");
    for s in 0..segments {
        let to = if allow_segment {
            format!("s{s}")
        } else {
            format!("v0.s{s}")
        };
        let _ = writeln!(
            t,
            "[[segment]]\nname = \"s{s}\"\n[[allow]]\nfrom = \"s{s}\"\nto = \"{to}\""
        );
        for i in 0..per {
            let _ = writeln!(
                t,
                "[[node]]\nname = \"n{s}x{i}\"\nsegments = [\"s{s}\"]\n[[service]]\nname = \"v{i}\"\nsegment = \"s{s}\"\nnode = \"n{s}x{i}\"\nbackend = \"127.0.0.1:8080\""
            );
        }
    }
    t
}

fn node(k: usize, name: &str) -> PeerInfo {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(k as u64).to_be_bytes());
    PeerInfo {
        node_id: NodeId::from_bytes(b),
        name: NodeName::new(name).expect("valid"),
        addresses: BoundedVec::new(vec![Address::truncated("127.0.0.1:20000")]).expect("one"),
    }
}

/// Names in enrolment order: round-robin across segments.
fn order(segments: usize, per: usize) -> Vec<String> {
    (0..per)
        .flat_map(|i| (0..segments).map(move |s| format!("n{s}x{i}")))
        .collect()
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

/// One run's figures.
struct Run {
    rate_all: f64,
    rate_last: f64,
    ns_per_change: f64,
    /// RSS growth per live node while `MeshTables` enrolled them all.
    bytes_per_node: usize,
}

fn shape(label: &str, segments: usize, per: usize, window: usize, baseline_sizes: &[usize]) -> Run {
    let text = policy(segments, per, true);
    let p = Policy::parse(&text).expect("valid");
    let names = order(segments, per);
    let total = names.len();
    let mut mesh = MeshTables::new(p.clone());
    let empty = rss_bytes();
    let mut last = Duration::ZERO;
    let mut changes = 0usize;
    let mut busy = Duration::ZERO;
    for (k, name) in names.iter().enumerate() {
        let info = node(k, name);
        let t = Instant::now();
        let deltas = mesh.enrol(info).expect("free name");
        let took = t.elapsed();
        busy += took;
        changes += deltas.iter().map(|d| d.changes.len()).sum::<usize>();
        if k >= total - window {
            last += took;
        }
    }
    let held = rss_bytes().saturating_sub(empty);
    let entries: usize = names
        .iter()
        .enumerate()
        .map(|(k, name)| mesh.entry_count(&node(k, name).node_id))
        .sum();
    // The same tables as `Entries`, for a sample of nodes held at once.
    let sample = total.min(ENTRIES_SAMPLE);
    let before = rss_bytes();
    let held_entries: Vec<_> = names
        .iter()
        .take(sample)
        .enumerate()
        .filter_map(|(k, name)| mesh.entries(&node(k, name).node_id))
        .collect();
    let sample_entries: usize = held_entries.iter().map(|e| e.len()).sum();
    let as_entries = rss_bytes().saturating_sub(before);
    drop(held_entries);
    let run = Run {
        rate_all: rate(total, busy),
        rate_last: rate(window, last),
        ns_per_change: busy.as_nanos() as f64 / changes.max(1) as f64,
        bytes_per_node: held / total.max(1),
    };
    println!(
        "{label}: memory (RSS growth): MeshTables {:.1} KiB per node ({:.0} B per entry, {entries} entries); the same tables as Entries {:.1} KiB per node ({:.0} B per entry, {sample} nodes)",
        run.bytes_per_node as f64 / 1024.0,
        held as f64 / entries.max(1) as f64,
        as_entries as f64 / sample.max(1) as f64 / 1024.0,
        as_entries as f64 / sample_entries.max(1) as f64,
    );
    println!(
        "{label}: {total} nodes enrolled in {:.2} s ({changes} entry changes, {:.0} ns each); {:.0} enrolments/s over all, {:.0}/s over the last {window}",
        busy.as_secs_f64(),
        run.ns_per_change,
        run.rate_all,
        run.rate_last
    );
    let closed = Policy::parse(&policy(segments, per, false)).expect("valid");
    let t = Instant::now();
    let deltas = mesh.reload(closed);
    let took = t.elapsed();
    let diff = PolicyDiff::of(&deltas);
    println!(
        "{label}: reload (allow sK -> v0.sK) in {:.3} s: {} nodes changed, {} pairs added, {} removed",
        took.as_secs_f64(),
        deltas.len(),
        diff.pairs_added.len(),
        diff.pairs_removed.len()
    );
    // Baseline, same run: the full compile each enrolment used to run.
    for &n in baseline_sizes {
        let dir: NodeDirectory = names
            .iter()
            .take(n)
            .enumerate()
            .map(|(k, name)| {
                let i = node(k, name);
                (i.name, i.node_id)
            })
            .collect();
        let t = Instant::now();
        let compiled = p.compile(&dir);
        let took = t.elapsed();
        println!(
            "{label}: baseline Policy::compile of {n} nodes ({} tables): {:.3} s, i.e. {:.1} enrolments/s at that size",
            compiled.len(),
            took.as_secs_f64(),
            1.0 / took.as_secs_f64().max(1e-9)
        );
    }
    run
}

/// The same shape at two sizes: the enrolment rate (over the whole run: round-robin, so the
/// same mean table growth per enrolment at both sizes) and over each run's last window (each
/// enrolment completing full tables), large against small.
fn compare(label: &str, small: &Run, large: &Run) {
    println!(
        "{label}: rate ratio large/small over all {:.2}, over the last window {:.2}; ns per entry change {:.0} vs {:.0}",
        large.rate_all / small.rate_all,
        large.rate_last / small.rate_last,
        small.ns_per_change,
        large.ns_per_change
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--quick");
    let (segments, per, all) = if full {
        (100, 100, 2_000)
    } else {
        (10, 100, 200)
    };
    // The large run first: its RSS growth is measured on a fresh heap (later shapes reuse
    // memory earlier ones freed, so theirs is a lower bound).
    let large = shape(
        &format!("segments x{segments}"),
        segments,
        per,
        per,
        &[per, 1_000.min(segments * per)],
    );
    let small = shape("segments x1", 1, per, per / 5, &[per]);
    compare("segments", &small, &large);
    assert!(
        large.bytes_per_node > 0 && large.bytes_per_node <= MAX_TABLE_BYTES_PER_NODE,
        "segments: MeshTables grew RSS by {} B per node at 99 peers: 0 (no /proc) or over MAX_TABLE_BYTES_PER_NODE = {}",
        large.bytes_per_node,
        MAX_TABLE_BYTES_PER_NODE
    );
    if args.iter().any(|a| a == "--segments-only") {
        return;
    }
    let small = shape("all-to-all 100", 1, 100, 20, &[100]);
    let large = shape(&format!("all-to-all {all}"), 1, all, 100, &[1_000.min(all)]);
    compare("all-to-all (tables grow with the segment)", &small, &large);
}
