//! Cross-replica revocation propagation on PostgreSQL: three verifier replicas in process serving
//! one database of a throwaway cluster (`fsync = on`, reached over its unix socket), subscribers
//! over QUIC on 127.0.0.1 spread over the three (`SUBSCRIBERS_PER_REPLICA` each), victims
//! enrolled in process spread over the three too; every replica is waited for until it holds
//! every node and its own subscribers' push streams. Then a series of revocations, all issued at
//! replica 0, each timed from the revoke call returning until the new signed list arrives at
//! every subscriber:
//!
//! - same replica (the baseline of the same run): a subscriber of replica 0, which pushes the
//!   list from the revoke call itself;
//! - other replicas: a subscriber of replica 1 or 2, which learns of the list through the
//!   change feed (`hopmesh.changes`, woken by `NOTIFY hopmesh_changes`, read at least every
//!   `FEED_POLL_INTERVAL`) and pushes it from there.
//!
//! Reported: p50/p99/max of both, per other replica, their ratio to the baseline, and the
//! revoke call itself (the durable commit). Two warm-up revocations before the timed ones are
//! not counted.
//!
//! `cargo bench -p hopmesh-benches --bench replicas` (30 revocations; `HOPMESH_BENCH_REVOKES=N`
//! for another count, 1..=1000); under `cargo test` a smoke run of 3. Needs Debian's
//! `postgresql` (`HOPMESH_SKIP_POSTGRES=1` skips it). Numbers need a quiet machine.

#[path = "../../verifier/src/store/pg_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg_cluster;

use std::time::{Duration, Instant};

use hopmesh_protocol::attestation::{KeySet, RevocationUpdate, verify_revocation_list};
use hopmesh_protocol::enrollment::{Address, Push};
use hopmesh_protocol::ids::NodeName;
use hopmesh_tests::{GOOD_MEASUREMENT, TestNode, VerifierHarness, standard_policy};
use hopmesh_verifier::FEED_POLL_INTERVAL;
use hopmesh_verifier::authority::{Enrollment, NodeRef, Settings};
use hopmesh_verifier::store::{PgTarget, StoreSpec};
use pg_cluster::PgCluster;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Verifier replicas on the one database.
const REPLICAS: usize = 3;
/// QUIC subscribers at each replica.
const SUBSCRIBERS_PER_REPLICA: usize = 2;
/// Revocations before the timed ones (connections, pools and caches warm).
const WARMUP: usize = 2;
/// Revocations of a bench run unless `HOPMESH_BENCH_REVOKES` says otherwise.
const DEFAULT_REVOKES: usize = 30;
/// Revocations of the smoke run under `cargo test`.
const SMOKE_REVOKES: usize = 3;
/// Most revocations one run may ask for.
const MAX_REVOKES: usize = 1000;
/// Longest wait for every subscriber to hold one list.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the replicas to agree on the nodes before the revocations.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The standard test policy, plus segment `r` with the subscribers `r0`, … and segment `v`
/// with the victims `v0`, … (no allow rule: revoking one changes no table).
fn policy(subscribers: usize, victims: usize) -> String {
    let mut p = standard_policy() + "\n[[segment]]\nname = \"r\"\n[[segment]]\nname = \"v\"\n";
    for i in 0..subscribers {
        p += &format!("[[node]]\nname = \"r{i}\"\nsegments = [\"r\"]\n");
    }
    for i in 0..victims {
        p += &format!("[[node]]\nname = \"v{i}\"\nsegments = [\"v\"]\n");
    }
    p
}

/// How many timed revocations: `HOPMESH_BENCH_REVOKES` in a bench run, else the default.
fn revokes(bench: bool) -> usize {
    if !bench {
        return SMOKE_REVOKES;
    }
    match std::env::var("HOPMESH_BENCH_REVOKES") {
        Ok(v) => {
            let n: usize = v
                .parse()
                .unwrap_or_else(|_| panic!("HOPMESH_BENCH_REVOKES={v}: not a count"));
            assert!(
                (1..=MAX_REVOKES).contains(&n),
                "HOPMESH_BENCH_REVOKES={n}: 1..={MAX_REVOKES}"
            );
            n
        }
        Err(_) => DEFAULT_REVOKES,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The version of a revocation-list push, verified under the mesh's keys.
fn list_version(keys: &KeySet, p: &Push) -> Option<u64> {
    let Push::Revocations { list } = p else {
        return None;
    };
    match verify_revocation_list(list, keys, None).expect("a list signed by the mesh") {
        RevocationUpdate::Newer(l) => Some(l.version),
        RevocationUpdate::Same => None,
    }
}

/// Enrolls `name` at `h` in process under a synthetic key (the authority's enrolment, without
/// QUIC).
fn enroll_in_process(h: &VerifierHarness, name: &str) {
    let spki = format!("replicas-bench-key-{name}").into_bytes();
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
}

/// Waits (bounded) until every replica holds every node named in `names` and shows the push
/// streams of its own subscribers (`own[i]`: the names subscribed at replica `i`) open.
async fn settle(replicas: &[VerifierHarness], names: &[String], own: &[Vec<String>]) {
    let started = Instant::now();
    loop {
        let ready = replicas.iter().zip(own).all(|(h, own)| {
            let view = h.shared().authority().nodes_view();
            names.iter().all(|n| view.iter().any(|v| &v.name == n))
                && own
                    .iter()
                    .all(|n| view.iter().any(|v| &v.name == n && v.connected))
        });
        if ready {
            return;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "the replicas did not agree on the {} nodes within {SETTLE_TIMEOUT:?}",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One arrival: (replica, subscriber, list version, when).
type Arrival = (usize, usize, u64, Instant);

/// One timed revocation.
struct Sample {
    /// The revoke call itself.
    call: Duration,
    /// Per subscriber: (its replica, revoke call returned -> it holds the list).
    latencies: Vec<(usize, Duration)>,
}

/// Revokes `victim` at `h` and waits (bounded) until each of the `subscribers` holds the list.
async fn revoke_one(
    h: &VerifierHarness,
    victim: &str,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    subscribers: usize,
) -> Sample {
    let target = NodeRef::Name(NodeName::new(victim).expect("name"));
    let shared = h.shared().clone();
    let now = h.now();
    // As the admin API does: the call takes the authority lock, commits to the store (which
    // appends to the change feed and notifies), pushes to this replica's subscribers' queues.
    let (version, called, returned) = tokio::task::spawn_blocking(move || {
        let called = Instant::now();
        let out = shared.authority().revoke(&target, now).expect("revoke");
        (out.revocation_version, called, Instant::now())
    })
    .await
    .expect("revoke task");
    let mut got: Vec<Option<(usize, Duration)>> = vec![None; subscribers];
    let mut left = subscribers;
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    while left > 0 {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some((replica, sub, v, at))) if v == version => {
                if got[sub].is_none() {
                    // Saturates at zero should a push be read before the call has returned.
                    got[sub] = Some((replica, at.saturating_duration_since(returned)));
                    left -= 1;
                }
            }
            Ok(Some(_)) => {}
            other => {
                let missing: Vec<usize> = (0..subscribers).filter(|&s| got[s].is_none()).collect();
                panic!(
                    "revocation {version} of {victim}: subscribers {missing:?} never got it \
                     within {ARRIVAL_TIMEOUT:?} ({other:?})"
                )
            }
        }
    }
    Sample {
        call: returned - called,
        latencies: got.into_iter().flatten().collect(),
    }
}

/// One line of the report; `baseline` is the same-replica row's (p50, p99).
fn row(
    what: &str,
    revocations: usize,
    sorted: &[Duration],
    baseline: Option<(Duration, Duration)>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99) = (percentile(sorted, 0.5), percentile(sorted, 0.99));
    let ratio = match baseline {
        Some((b50, b99)) => format!(
            "{:.1}× / {:.1}×",
            p50.as_secs_f64() / b50.as_secs_f64().max(1e-9),
            p99.as_secs_f64() / b99.as_secs_f64().max(1e-9)
        ),
        None => "-".into(),
    };
    println!(
        "| {what} | {revocations} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {ratio} |",
        sorted.len(),
        ms(p50),
        ms(p99),
        ms(sorted.last().copied().unwrap_or_default()),
    );
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let timed = revokes(bench);
    let run = Instant::now();
    let Some(cluster) = PgCluster::start_durable() else {
        println!("replicas: skipped (HOPMESH_SKIP_POSTGRES=1)");
        return;
    };
    let subscribers = REPLICAS * SUBSCRIBERS_PER_REPLICA;
    let victims: Vec<String> = (0..WARMUP + timed).map(|i| format!("v{i}")).collect();
    let store = StoreSpec::Postgres(PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    });
    let first = VerifierHarness::start_on(
        &policy(subscribers, victims.len()),
        Settings::default(),
        store,
    )
    .await;
    let mut replicas = vec![first];
    while replicas.len() < REPLICAS {
        let next = replicas[0].replica().await;
        replicas.push(next);
    }
    let keys = KeySet::new(replicas[0].pins.signing_keys().expect("signing keys")).expect("keys");

    // Subscribers r0, r1, … round robin over the replicas, each enrolled and subscribed at its
    // own, one at a time (one source has a small quota of unauthenticated connections).
    let (arrive_tx, mut arrivals) = mpsc::unbounded_channel::<Arrival>();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut keep: Vec<TestNode> = Vec::new();
    let mut own: Vec<Vec<String>> = vec![Vec::new(); REPLICAS];
    let mut names: Vec<String> = Vec::new();
    for sub in 0..subscribers {
        let r = sub % REPLICAS;
        let h = &replicas[r];
        let name = format!("r{sub}");
        let node = h.node().await;
        node.enroll(h.join_token(&name, 3600), GOOD_MEASUREMENT, h.now())
            .await
            .expect("enroll a subscriber");
        let mut stream = node.subscribe().await.expect("subscribe");
        let metrics = h.shared().authority().metrics().clone();
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
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            // Ends when the verifier closes the stream (shutdown) or the bench aborts it.
            while let Ok(Some(p)) = stream.next().await {
                if let Some(v) = list_version(&keys, &p) {
                    let _ = tx.send((r, sub, v, Instant::now()));
                }
            }
        }));
        keep.push(node);
        own[r].push(name.clone());
        names.push(name);
    }
    drop(arrive_tx);
    // Victims enrolled in process, round robin over the replicas.
    for (i, v) in victims.iter().enumerate() {
        enroll_in_process(&replicas[i % REPLICAS], v);
        names.push(v.clone());
    }
    settle(&replicas, &names, &own).await;
    let setup = run.elapsed();
    eprintln!(
        "replicas: {REPLICAS} replicas, {subscribers} subscribers, {} victims set up in {:.1} s",
        victims.len(),
        setup.as_secs_f64()
    );

    let mut samples = Vec::with_capacity(timed);
    for (i, v) in victims.iter().enumerate() {
        let s = revoke_one(&replicas[0], v, &mut arrivals, subscribers).await;
        if i >= WARMUP {
            samples.push(s);
        }
    }
    let measured = run.elapsed() - setup;

    let mut same: Vec<Duration> = Vec::new();
    let mut other: Vec<Duration> = Vec::new();
    let mut per_replica: Vec<Vec<Duration>> = vec![Vec::new(); REPLICAS];
    for s in &samples {
        for &(r, d) in &s.latencies {
            per_replica[r].push(d);
            if r == 0 { &mut same } else { &mut other }.push(d);
        }
    }
    let mut calls: Vec<Duration> = samples.iter().map(|s| s.call).collect();
    for v in [&mut same, &mut other, &mut calls]
        .into_iter()
        .chain(per_replica.iter_mut())
    {
        v.sort();
    }
    let baseline = Some((percentile(&same, 0.5), percentile(&same, 0.99)));
    println!(
        "replicas: {REPLICAS} verifier replicas on one PostgreSQL database (fsync on, unix \
         socket), {SUBSCRIBERS_PER_REPLICA} QUIC subscribers at each; {timed} revocations at \
         replica 0 ({WARMUP} warm-up before), each timed from the revoke call returning to the \
         list at a subscriber; feed poll fallback {FEED_POLL_INTERVAL:?}; setup {:.1} s, \
         revocations {:.1} s",
        setup.as_secs_f64(),
        measured.as_secs_f64()
    );
    println!("| path | revocations | samples | p50 | p99 | max | vs same replica (p50 / p99) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    row("same replica (baseline)", timed, &same, None);
    row("other replicas", timed, &other, baseline);
    for (r, lat) in per_replica.iter().enumerate().skip(1) {
        row(&format!("replica {r}"), timed, lat, baseline);
    }
    row("revoke call (commit + local pushes)", timed, &calls, None);
    assert_eq!(same.len(), timed * SUBSCRIBERS_PER_REPLICA);
    assert_eq!(
        other.len(),
        timed * SUBSCRIBERS_PER_REPLICA * (REPLICAS - 1)
    );

    // Replicas stopped before the cluster (dropped last).
    for h in replicas.iter_mut().rev() {
        h.stop().await;
    }
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    drop(keep);
    drop(replicas);
    drop(cluster);
    eprintln!("replicas: done in {:.1} s", run.elapsed().as_secs_f64());
}
