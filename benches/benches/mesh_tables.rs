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

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{Address, PeerInfo};
use hopmesh_protocol::ids::{NodeId, NodeName};
use hopmesh_protocol::policy::{MeshTables, NodeDirectory, Policy, PolicyDiff};
use hopmesh_protocol::wire::BoundedVec;

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
}

fn shape(label: &str, segments: usize, per: usize, window: usize, baseline_sizes: &[usize]) -> Run {
    let text = policy(segments, per, true);
    let p = Policy::parse(&text).expect("valid");
    let names = order(segments, per);
    let total = names.len();
    let mut mesh = MeshTables::new(p.clone());
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
    let run = Run {
        rate_all: rate(total, busy),
        rate_last: rate(window, last),
        ns_per_change: busy.as_nanos() as f64 / changes.max(1) as f64,
    };
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
    let small = shape("segments x1", 1, per, per / 5, &[per]);
    let large = shape(
        &format!("segments x{segments}"),
        segments,
        per,
        per,
        &[per, 1_000.min(segments * per)],
    );
    compare("segments", &small, &large);
    if args.iter().any(|a| a == "--segments-only") {
        return;
    }
    let small = shape("all-to-all 100", 1, 100, 20, &[100]);
    let large = shape(&format!("all-to-all {all}"), 1, all, 100, &[1_000.min(all)]);
    compare("all-to-all (tables grow with the segment)", &small, &large);
}
