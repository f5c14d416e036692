//! Revocation push latency, normally and during a seed rotation: a verifier in process, a mesh
//! segment where every node serves a service and pairs with every other (so each slot's
//! rotation pushes `n x (n - 1)` seeds), 20 subscribers over QUIC on 127.0.0.1 and the rest
//! subscribed in process (the same authority push queues, without a QUIC connection each); then
//! a series of revocations of nodes outside the mesh (no table changes), each timed from the
//! revoke call until EVERY subscriber holds the new signed list. Three scenarios in one run:
//!
//! - `normal`: no rotation round in progress (the rotation backlog is empty);
//! - `rotation (spread)`: the clock is put just before a slot edge, revocations run across the
//!   edge and the spread window (`ROTATION_SPREAD_PERCENT` of the slot) while the round's
//!   nodes are served at their offsets;
//! - `rotation (catch-up)`: the clock jumps past a whole slot, so every node is due at once
//!   (what the verifier did at every edge before rotations were spread) and the backlog is
//!   served back to back in batches; revocations run until it is empty.
//!
//! A sample counts as "during a rotation" when the round's backlog was not empty when the
//! revoke was called; the report says how many also overlapped a batch. It also reports the
//! rotation's batches: their mean and total lock time per round (the total is what one lock
//! hold at the edge cost before the rotation was spread).
//!
//! `cargo bench -p hopmesh-benches --bench revocation_push` (under `cargo test` it runs a
//! short smoke version). Numbers need a quiet machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{Address, Push};
use hopmesh_protocol::ids::NodeId;
use hopmesh_tests::{GOOD_MEASUREMENT, VerifierHarness, standard_policy};
use hopmesh_verifier::authority::{Enrollment, NodeRef, ROTATION_SPREAD_PERCENT, Settings};
use hopmesh_verifier::metrics::Metrics;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Subscribers over QUIC (each a real verifier connection and push stream).
const QUIC_SUBSCRIBERS: usize = 20;
/// Longest wait for every subscriber to hold one revocation list.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(20);

/// The size of one run.
struct Shape {
    /// Mesh nodes subscribed in process.
    in_process: usize,
    /// Generation length (seconds).
    generation: u64,
    /// Revocations per scenario (at most; the rotation scenarios stop when the round ends).
    per_scenario: usize,
    /// Slot jumps of the catch-up scenario.
    jumps: usize,
}

impl Shape {
    fn mesh(&self) -> usize {
        self.in_process + QUIC_SUBSCRIBERS
    }

    /// Victims: enough for every scenario.
    fn victims(&self) -> usize {
        self.per_scenario * (2 + self.jumps)
    }
}

/// The standard test policy, plus segment `m` with nodes `m0`, `m1`, … each serving `svc<i>`
/// and `m -> m` (every pair), plus segment `v` with the victims `v0`, … (no allow rule: revoking
/// one changes no table).
fn policy(mesh: usize, victims: usize) -> String {
    let mut p = standard_policy() + "\n[[segment]]\nname = \"m\"\n[[segment]]\nname = \"v\"\n";
    for i in 0..mesh {
        p += &format!(
            "[[node]]\nname = \"m{i}\"\nsegments = [\"m\"]\n[[service]]\nname = \"svc{i}\"\n\
             segment = \"m\"\nnode = \"m{i}\"\nbackend = \"127.0.0.1:{}\"\n",
            20_000 + i
        );
    }
    for i in 0..victims {
        p += &format!("[[node]]\nname = \"v{i}\"\nsegments = [\"v\"]\n");
    }
    p + "[[allow]]\nfrom = \"m\"\nto = \"m\"\n"
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The version of a pushed signed revocation list.
fn version_of(list: &[u8]) -> u64 {
    let payload = &list[hopmesh_protocol::attestation::ENVELOPE_HEADER_LEN..];
    let l: hopmesh_protocol::attestation::RevocationList =
        postcard::from_bytes(payload).expect("list");
    l.version
}

/// Enrolls `name` in process under a synthetic key (the authority's enrolment, without QUIC).
fn enroll_in_process(h: &VerifierHarness, name: &str) -> NodeId {
    let spki = format!("revocation-bench-key-{name}").into_bytes();
    let secret = h.join_token(name, 3600);
    let addresses = [Address::truncated("127.0.0.1:4433")];
    let now = h.now();
    h.shared()
        .authority()
        .enroll(
            &Enrollment {
                spki: &spki,
                join_secret: &secret,
                measurement: GOOD_MEASUREMENT,
                addresses: &addresses,
                hostname: "bench",
            },
            now,
        )
        .expect("enroll");
    NodeId::from_spki(&spki)
}

/// Moves the verifier's clock forward, in one step, to `edges` slot edges from now (`generation`
/// long slots) plus `delta` seconds (negative: before it); returns that edge.
fn jump(h: &VerifierHarness, generation: u64, edges: u64, delta: i64) -> u64 {
    let now = h.now().as_secs();
    let edge = (now / generation + edges) * generation;
    let target = edge.saturating_add_signed(delta).max(now);
    h.clock.advance(i64::try_from(target - now).expect("fits"));
    edge
}

/// Waits (bounded) until the rotation backlog is empty.
async fn until_no_backlog(m: &Metrics) {
    let started = Instant::now();
    while m.rotation_backlog.get() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the rotation backlog never emptied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until a rotation batch after the first `batches` was served.
async fn until_batch(m: &Metrics, batches: u64) {
    let started = Instant::now();
    while m.rotation_batches.get() <= batches {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no rotation batch"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One timed revocation.
struct Sample {
    /// Per subscriber: revoke call -> holds the list.
    latencies: Vec<Duration>,
    /// The rotation backlog when the revoke was called.
    backlog: i64,
    /// Rotation batches served while it was in flight.
    batches: u64,
}

/// The bench state: the verifier, where arrivals come in, the victims left.
struct Bench {
    h: VerifierHarness,
    metrics: Arc<Metrics>,
    arrivals: mpsc::UnboundedReceiver<(u64, Instant)>,
    subscribers: usize,
    victims: std::vec::IntoIter<String>,
}

impl Bench {
    /// Revokes the next victim and waits until every subscriber holds the new list.
    async fn revoke_one(&mut self) -> Sample {
        let victim = self.victims.next().expect("enough victims");
        let target = NodeRef::Name(victim.parse().expect("name"));
        let backlog = self.metrics.rotation_backlog.get();
        let batches = self.metrics.rotation_batches.get();
        let shared = self.h.shared().clone();
        let now = self.h.now();
        let started = Instant::now();
        // As the admin API does: the call takes the authority lock (waiting for whatever holds
        // it, e.g. a rotation batch), commits, pushes to every subscriber's queue.
        let version = tokio::task::spawn_blocking(move || {
            shared
                .authority()
                .revoke(&target, now)
                .expect("revoke")
                .revocation_version
        })
        .await
        .expect("revoke task");
        let mut latencies = Vec::with_capacity(self.subscribers);
        while latencies.len() < self.subscribers {
            match tokio::time::timeout(ARRIVAL_TIMEOUT, self.arrivals.recv()).await {
                Ok(Some((v, at))) if v == version => latencies.push(at - started),
                Ok(Some(_)) => {}
                other => panic!(
                    "revocation {version}: {} of {} subscribers got it ({other:?})",
                    latencies.len(),
                    self.subscribers
                ),
            }
        }
        Sample {
            latencies,
            backlog,
            batches: self.metrics.rotation_batches.get() - batches,
        }
    }
}

/// Rotation batch statistics from the metrics text: (batches, seconds summed).
fn batch_totals(m: &Metrics) -> (u64, f64) {
    let text = m.render();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        field("hopmesh_verifier_rotation_batch_seconds_count") as u64,
        field("hopmesh_verifier_rotation_batch_seconds_sum"),
    )
}

/// One line of the report.
struct Row {
    scenario: &'static str,
    revocations: usize,
    overlapping: usize,
    latencies: Vec<Duration>,
    /// (rounds, batches, lock seconds) of the rotation in this scenario.
    rotation: Option<(usize, u64, f64)>,
}

fn row(scenario: &'static str, samples: &[Sample], rotation: Option<(usize, u64, f64)>) -> Row {
    let mut latencies: Vec<Duration> = samples
        .iter()
        .flat_map(|s| s.latencies.iter().copied())
        .collect();
    latencies.sort();
    Row {
        scenario,
        revocations: samples.len(),
        overlapping: samples.iter().filter(|s| s.batches > 0).count(),
        latencies,
        rotation,
    }
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let shape = if bench {
        Shape {
            in_process: 380,
            generation: 10,
            per_scenario: 40,
            jumps: 4,
        }
    } else {
        Shape {
            in_process: 60,
            generation: 4,
            per_scenario: 3,
            jumps: 1,
        }
    };
    let settings = Settings {
        generation_secs: shape.generation,
        ..Settings::default()
    };
    let h = VerifierHarness::start(&policy(shape.mesh(), shape.victims()), settings).await;
    let metrics = h.shared().authority().metrics().clone();
    let (arrive_tx, arrivals) = mpsc::unbounded_channel();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut keep = Vec::new();
    let setup = Instant::now();
    for i in 0..QUIC_SUBSCRIBERS {
        let node = h.node().await;
        node.enroll(
            h.join_token(&format!("m{i}"), 3600),
            GOOD_MEASUREMENT,
            h.now(),
        )
        .await
        .expect("enroll");
        let mut s = node.subscribe().await.expect("subscribe");
        // Wait (bounded) until the verifier counts it enrolled: one source has a small quota of
        // unauthenticated connections.
        let waited = Instant::now();
        while metrics
            .connections
            .get_or_create(&[("class", "unauthenticated")])
            .get()
            > 0
        {
            assert!(waited.elapsed() < Duration::from_secs(10), "never promoted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let tx = arrive_tx.clone();
        tasks.push(tokio::spawn(async move {
            // Ends when the verifier closes the stream (shutdown) or the bench aborts it.
            while let Ok(Some(p)) = s.next().await {
                if let Push::Revocations { list } = p {
                    let _ = tx.send((version_of(&list), Instant::now()));
                }
            }
        }));
        keep.push(node);
    }
    eprintln!(
        "{QUIC_SUBSCRIBERS} QUIC subscribers in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    let mut ids = Vec::new();
    for i in QUIC_SUBSCRIBERS..shape.mesh() {
        ids.push(enroll_in_process(&h, &format!("m{i}")));
    }
    let victims: Vec<String> = (0..shape.victims()).map(|i| format!("v{i}")).collect();
    for v in &victims {
        enroll_in_process(&h, v);
    }
    for id in &ids {
        let now = h.now();
        let mut rx = h
            .shared()
            .authority()
            .subscribe(id, now)
            .expect("subscribe");
        let tx = arrive_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                if let Push::Revocations { list } = p {
                    let _ = tx.send((version_of(&list), Instant::now()));
                }
            }
        }));
    }
    drop(arrive_tx);
    let setup = setup.elapsed();
    eprintln!("set up in {:.1} s", setup.as_secs_f64());
    let mut b = Bench {
        h,
        metrics,
        arrivals,
        subscribers: shape.mesh(),
        victims: victims.into_iter(),
    };
    let g = shape.generation;
    let window = (g * ROTATION_SPREAD_PERCENT / 100).max(1);

    // Normal: after the spread window of a slot, the backlog empty, before the next edge.
    let mut normal = Vec::new();
    for attempt in 0.. {
        assert!(attempt < 20, "no quiet time for the normal scenario");
        if normal.len() >= shape.per_scenario {
            break;
        }
        // Past every offset of the next slot: that round is served at once, then nothing is due
        // until the edge after.
        let batches = b.metrics.rotation_batches.get();
        let edge = jump(&b.h, g, 1, i64::try_from(window).expect("fits"));
        until_batch(&b.metrics, batches).await;
        until_no_backlog(&b.metrics).await;
        while normal.len() < shape.per_scenario && b.h.now().as_secs() < edge + g {
            let s = b.revoke_one().await;
            if s.backlog == 0 && s.batches == 0 {
                normal.push(s);
            }
        }
    }

    eprintln!("normal: {} revocations", normal.len());
    // A spread rotation: from just before an edge until the round's backlog is empty.
    let (batches0, secs0) = batch_totals(&b.metrics);
    let mut spread = Vec::new();
    let edge = jump(&b.h, g, 1, -1);
    let started = Instant::now();
    while b.h.now().as_secs() < edge {
        assert!(started.elapsed() < Duration::from_secs(5), "no edge");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Paced across the spread window.
    let started = Instant::now();
    let pace = Duration::from_secs(window) / u32::try_from(shape.per_scenario).expect("fits");
    for i in 0..shape.per_scenario {
        tokio::time::sleep_until((started + pace * u32::try_from(i).expect("fits")).into()).await;
        let s = b.revoke_one().await;
        let ended = s.backlog == 0 && b.metrics.rotation_backlog.get() == 0;
        if s.backlog > 0 {
            spread.push(s);
        }
        if ended && !spread.is_empty() {
            break;
        }
    }
    until_no_backlog(&b.metrics).await;
    let (batches1, secs1) = batch_totals(&b.metrics);

    eprintln!("spread rotation: {} revocations", spread.len());
    // Catch-up: the clock jumps over a whole slot; every node is due at once.
    let mut catch_up = Vec::new();
    for _ in 0..shape.jumps {
        until_no_backlog(&b.metrics).await;
        // From slot s straight into slot s + 2.
        let batches = b.metrics.rotation_batches.get();
        jump(&b.h, g, 2, 0);
        // Revocations from the moment the first batch of the round was served.
        until_batch(&b.metrics, batches).await;
        let mut n = 0;
        while n < shape.per_scenario {
            let s = b.revoke_one().await;
            n += 1;
            if s.backlog > 0 || s.batches > 0 {
                catch_up.push(s);
            } else {
                break;
            }
        }
    }
    until_no_backlog(&b.metrics).await;
    let (batches2, secs2) = batch_totals(&b.metrics);

    let rows = [
        row("normal", &normal, None),
        row(
            "rotation (spread)",
            &spread,
            Some((1, batches1 - batches0, secs1 - secs0)),
        ),
        row(
            "rotation (catch-up)",
            &catch_up,
            Some((shape.jumps, batches2 - batches1, secs2 - secs1)),
        ),
    ];
    let m = shape.mesh();
    println!(
        "mesh: {m} subscribers ({QUIC_SUBSCRIBERS} over QUIC), {} pairs each, {} seeds pushes per \
         rotation; generation {g} s (spread over {window} s); setup {:.1} s",
        m - 1,
        m * (m - 1),
        setup.as_secs_f64()
    );
    println!(
        "| scenario | revocations | overlapping a batch | samples | p50 | p99 | max | rotation batches per round | mean batch | lock time per round |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (per_round, mean, total) = match r.rotation {
            Some((rounds, batches, secs)) if batches > 0 => (
                format!("{:.0}", batches as f64 / rounds as f64),
                format!("{:.2} ms", secs / batches as f64 * 1e3),
                format!("{:.1} ms", secs / rounds as f64 * 1e3),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {per_round} | {mean} | {total} |",
            r.scenario,
            r.revocations,
            r.overlapping,
            r.latencies.len(),
            ms(percentile(&r.latencies, 0.5)),
            ms(percentile(&r.latencies, 0.99)),
            ms(r.latencies.last().copied().unwrap_or_default()),
        );
    }
    // The smoke run's rotation is one or two batches: a revocation may miss it.
    for r in rows.iter().filter(|r| bench || r.rotation.is_none()) {
        assert!(r.revocations > 0, "no samples in scenario {}", r.scenario);
    }
    let Bench { mut h, .. } = b;
    h.stop().await;
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    drop(keep);
}
