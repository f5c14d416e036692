//! Verifier failover on PostgreSQL: two verifier replicas in process serving one database of a
//! throwaway cluster (`fsync = on`, reached over its unix socket), the standard mesh's nodes a,
//! b, c and `EXTRA_NODES` more, each listing as its `verifiers` the two replicas behind a UDP
//! forwarder of this bench (one per replica, on 127.0.0.1). A node is subscribed at one replica
//! (picked by its id, later wherever it moved); a failure of that replica is timed, for every
//! node that was on it (its `verifier_failovers` rises), from the failure until the node is
//! subscribed again at the other replica (`verifier_connected` in its `ctl show`, polled every
//! `POLL`):
//!
//! - black-holed: the replica's forwarder drops every datagram both ways, as a replica killed
//!   with `kill -9` or cut off by a partition looks to a node: nothing closes the connection,
//!   the node's heartbeat (`Heartbeat::NODE`) notices the silence;
//! - stopped gracefully (the baseline of the same run): `VerifierHarness::stop`, which closes
//!   every connection, so the nodes move at once (`FAILOVER_PAUSE`).
//!
//! After each failure the replica comes back (forwarder restored, or `restart`), and before the
//! next every node is waited for until it is subscribed and sends to one forwarder only. All
//! nodes are on one replica after the first failure, so the failures alternate between the
//! replicas. The node's link counts a session that ended before `HEALTHY_SESSION` as a failed
//! attempt and, after one at every listed verifier in a row, waits its backoff instead of
//! `FAILOVER_PAUSE`; a replica failing after long service never meets that, so the failures
//! come in cycles of two, a black-hole and a graceful stop (in turns which first), each cycle
//! starting once every node has been subscribed for `HEALTHY_SESSION`: its first failure ends
//! a healthy session, its second the first short one, and both wait `FAILOVER_PAUSE`.
//!
//! Reported: p50/p99/max of both, and the black-holed's ratio to the graceful stop. Any node
//! that does not move within `EVENT_TIMEOUT`, a node that moves though its replica did not
//! fail, or one not seen at the other replica afterwards ends the run with an error (exit
//! status 1), not a number.
//!
//! `cargo bench -p hopmesh-benches --bench failover` (10 cycles: 10 black-holes and 10
//! graceful stops, about 40 s a cycle as each waits `HEALTHY_SESSION`;
//! `HOPMESH_BENCH_FAILOVERS=N` for another count of cycles, 1..=100); under `cargo test` a
//! smoke run of 1. Needs Debian's `postgresql` (`HOPMESH_SKIP_POSTGRES=1` skips it). Numbers
//! need a quiet machine.

#[path = "../../verifier/src/store/pg_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg_cluster;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hopmesh_node::config::NodeConfig;
use hopmesh_node::runtime::Node;
use hopmesh_node::verifier_link::{FAILOVER_PAUSE, HEALTHY_SESSION};
use hopmesh_tests::VerifierHarness;
use hopmesh_tests::mesh::{Mesh, TestMeshNode};
use hopmesh_transport::verifier_client::Heartbeat;
use hopmesh_verifier::authority::Settings;
use hopmesh_verifier::store::{PgTarget, StoreSpec};
use pg_cluster::PgCluster;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};

/// Verifiers on the one database (the mesh's first and one replica).
const VERIFIERS: usize = 2;
/// Nodes besides a, b, c (`f0`, …, in segment `f` of the policy).
const EXTRA_NODES: usize = 8;
/// Cycles (one black-hole and one graceful stop each) unless `HOPMESH_BENCH_FAILOVERS` says
/// otherwise.
const DEFAULT_CYCLES: usize = 10;
/// Cycles of the smoke run under `cargo test`.
const SMOKE_CYCLES: usize = 1;
/// Most cycles one run may ask for.
const MAX_CYCLES: usize = 100;
/// How often the nodes' `ctl show` is read while they move (the resolution of a sample).
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for every node of a failed replica to be subscribed at the other.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for every node to be subscribed, at one replica, before a failure.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// A node sends to the forwarder of its replica at least every keep-alive (1 s,
/// `Heartbeat::NODE`): one that sent within this is on that replica.
const FRESH: Duration = Duration::from_millis(1500);
/// Added to `HEALTHY_SESSION` (after the last node moved) before a cycle starts.
const HEALTHY_MARGIN: Duration = Duration::from_secs(2);
/// Most nodes one forwarder relays for (datagrams of others are dropped).
const MAX_CLIENTS: usize = 64;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// The state one forwarder shares with its relay tasks.
#[derive(Debug, Default)]
struct Relay {
    /// The verifier it forwards to (set once, before any node starts).
    target: OnceLock<SocketAddr>,
    /// Drop every datagram, both ways.
    holed: AtomicBool,
    /// When each client (a node's QUIC address) last sent a datagram here, dropped or not.
    seen: Mutex<HashMap<SocketAddr, Instant>>,
}

/// A UDP forwarder in front of one verifier: each client gets an upstream socket of its own
/// (so the verifier tells the nodes apart), and the verifier's datagrams go back to it. Stops
/// when dropped.
#[derive(Debug)]
struct Forwarder {
    /// Where nodes send.
    addr: SocketAddr,
    relay: Arc<Relay>,
    task: JoinHandle<()>,
}

impl Forwarder {
    async fn start() -> Self {
        let front = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind a forwarder"),
        );
        let addr = front.local_addr().expect("forwarder address");
        let relay = Arc::new(Relay::default());
        let task = tokio::spawn(forward(front, relay.clone()));
        Self { addr, relay, task }
    }

    /// Forwards to `target` (the same every time it is called).
    fn aim(&self, target: SocketAddr) {
        let set = *self.relay.target.get_or_init(|| target);
        assert_eq!(set, target, "forwarder {} aimed elsewhere", self.addr);
    }

    /// Drops every datagram from now on, both ways.
    fn black_hole(&self) {
        self.relay.holed.store(true, Ordering::SeqCst);
    }

    /// Forwards again.
    fn restore(&self) {
        self.relay.holed.store(false, Ordering::SeqCst);
    }

    /// When `client` last sent here.
    fn seen(&self, client: SocketAddr) -> Option<Instant> {
        self.relay.seen.lock().expect("seen").get(&client).copied()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The relay tasks back to the clients are in its JoinSet: they stop with it.
        self.task.abort();
    }
}

/// Clients to the verifier; runs until aborted.
async fn forward(front: Arc<UdpSocket>, relay: Arc<Relay>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut back = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        {
            let mut seen = relay.seen.lock().expect("seen");
            if seen.len() < MAX_CLIENTS || seen.contains_key(&from) {
                seen.insert(from, Instant::now());
            }
        }
        if relay.holed.load(Ordering::SeqCst) {
            continue;
        }
        let Some(&target) = relay.target.get() else {
            continue;
        };
        let up = match upstreams.get(&from) {
            Some(up) => up.clone(),
            None => {
                if upstreams.len() >= MAX_CLIENTS {
                    continue;
                }
                let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let up = Arc::new(up);
                back.spawn(backward(
                    up.clone(),
                    front.clone(),
                    from,
                    target,
                    relay.clone(),
                ));
                upstreams.insert(from, up.clone());
                up
            }
        };
        let _ = up.send_to(&buf[..n], target).await;
    }
}

/// The verifier to one client; runs until aborted.
async fn backward(
    up: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    relay: Arc<Relay>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = up.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        if from != target || relay.holed.load(Ordering::SeqCst) {
            continue;
        }
        let _ = front.send_to(&buf[..n], client).await;
    }
}

/// How a replica fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Its forwarder drops everything.
    BlackHole,
    /// `VerifierHarness::stop`.
    Stop,
}

/// One failure.
#[derive(Debug)]
struct Event {
    failure: Failure,
    /// Per node that was on the replica: failure -> subscribed at the other.
    samples: Vec<Duration>,
    /// When the last of them was seen subscribed again.
    last_move: Instant,
}

/// The standard mesh policy's extra: segment `f` with the nodes `f0`, … (no allow rule).
fn policy() -> String {
    let mut p = "\n[[segment]]\nname = \"f\"\n".to_owned();
    for i in 0..EXTRA_NODES {
        p += &format!("[[node]]\nname = \"f{i}\"\nsegments = [\"f\"]\n");
    }
    p
}

/// How many cycles: `HOPMESH_BENCH_FAILOVERS` in a bench run, else the default.
fn cycles(bench: bool) -> usize {
    if !bench {
        return SMOKE_CYCLES;
    }
    match std::env::var("HOPMESH_BENCH_FAILOVERS") {
        Ok(v) => {
            let n: usize = v
                .parse()
                .unwrap_or_else(|_| panic!("HOPMESH_BENCH_FAILOVERS={v}: not a count"));
            assert!(
                (1..=MAX_CYCLES).contains(&n),
                "HOPMESH_BENCH_FAILOVERS={n}: 1..={MAX_CYCLES}"
            );
            n
        }
        Err(_) => DEFAULT_CYCLES,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn failovers(show: &Value) -> u64 {
    show["counters"]["verifier_failovers"].as_u64().unwrap_or(0)
}

fn quic_addr(node: &TestMeshNode) -> SocketAddr {
    node.handle.as_ref().expect("node running").quic_addr
}

/// Verifier `i` of the mesh: 0 the first, 1 the replica.
fn harness(mesh: &mut Mesh, i: usize) -> &mut VerifierHarness {
    if i == 0 {
        &mut mesh.verifier
    } else {
        &mut mesh.replicas[i - 1]
    }
}

/// Waits (bounded) until every node is subscribed and sent to exactly one forwarder within
/// `FRESH`; returns, per forwarder, the names of the nodes on it.
async fn settle(mesh: &Mesh, fwds: &[Forwarder]) -> anyhow::Result<Vec<Vec<String>>> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let now = Instant::now();
        let mut at = vec![Vec::new(); fwds.len()];
        let mut unsettled = Vec::new();
        for (name, node) in &mesh.nodes {
            let show = node.show();
            let fresh: Vec<usize> = (0..fwds.len())
                .filter(|&i| {
                    fwds[i]
                        .seen(quic_addr(node))
                        .is_some_and(|t| now.saturating_duration_since(t) < FRESH)
                })
                .collect();
            match fresh[..] {
                [i] if show["verifier_connected"] == true => at[i].push(name.clone()),
                _ => unsettled.push(format!(
                    "{name} (connected {}, sending to {fresh:?}, self_permit {})",
                    show["verifier_connected"], show["self_permit"]
                )),
            }
        }
        if unsettled.is_empty() {
            return Ok(at);
        }
        if now >= deadline {
            bail!("not subscribed at one replica within {SETTLE_TIMEOUT:?}: {unsettled:?}");
        }
        tokio::time::sleep(POLL * 4).await;
    }
}

/// Waits (bounded: `t0 + EVENT_TIMEOUT`) until each of `movers` (name, node, its failovers
/// before) counted a failover and is subscribed again; returns, per mover, the time since
/// `t0`. Spawned: the failure's own work (`stop` of a replica) never delays a sample.
fn wait_moved(
    movers: Vec<(String, Arc<Node>, u64)>,
    t0: Instant,
) -> JoinHandle<anyhow::Result<BTreeMap<String, Duration>>> {
    tokio::spawn(async move {
        let deadline = t0 + EVENT_TIMEOUT;
        let mut took = BTreeMap::new();
        loop {
            for (name, node, before) in &movers {
                if took.contains_key(name) {
                    continue;
                }
                let show = node.show();
                if failovers(&show) > *before && show["verifier_connected"] == true {
                    took.insert(name.clone(), t0.elapsed());
                }
            }
            if took.len() == movers.len() {
                return Ok(took);
            }
            if Instant::now() >= deadline {
                let missing: Vec<String> = movers
                    .iter()
                    .filter(|(n, _, _)| !took.contains_key(n))
                    .map(|(n, node, before)| {
                        let show = node.show();
                        format!(
                            "{n} (failovers {before} -> {}, connected {})",
                            failovers(&show),
                            show["verifier_connected"]
                        )
                    })
                    .collect();
                bail!("not subscribed again within {EVENT_TIMEOUT:?}: {missing:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// The poller's outcome.
async fn joined(
    task: JoinHandle<anyhow::Result<BTreeMap<String, Duration>>>,
) -> anyhow::Result<BTreeMap<String, Duration>> {
    task.await.context("the poller task")?
}

/// Fails the replica the nodes are on (the one with the most, before the first failure) by
/// `failure`, times every node on it until it is subscribed at the other, brings the replica
/// back, and checks that only its nodes moved and that they are at the other now.
async fn fail_one(
    mesh: &mut Mesh,
    fwds: &[Forwarder],
    failure: Failure,
    first: bool,
) -> anyhow::Result<Event> {
    let at = settle(mesh, fwds).await?;
    let x = (0..VERIFIERS)
        .max_by_key(|&i| at[i].len())
        .expect("verifiers");
    let y = (x + 1) % VERIFIERS;
    let movers = at[x].clone();
    ensure!(!movers.is_empty(), "no node on replica {x}");
    ensure!(
        first || movers.len() == mesh.nodes.len(),
        "nodes on both replicas after a failure: {at:?}"
    );
    let before: BTreeMap<String, u64> = mesh
        .nodes
        .iter()
        .map(|(n, node)| (n.clone(), failovers(&node.show())))
        .collect();
    let polled: Vec<(String, Arc<Node>, u64)> = movers
        .iter()
        .map(|n| {
            let node = mesh.nodes[n].handle.as_ref().expect("node running");
            (n.clone(), node.node.clone(), before[n])
        })
        .collect();
    let t0 = Instant::now();
    let moved = match failure {
        Failure::BlackHole => {
            fwds[x].black_hole();
            let moved = joined(wait_moved(polled, t0)).await;
            fwds[x].restore();
            moved
        }
        Failure::Stop => {
            let poller = wait_moved(polled, t0);
            let h = harness(mesh, x);
            h.stop().await;
            let moved = joined(poller).await;
            h.restart()
                .await
                .with_context(|| format!("restart replica {x}"))?;
            moved
        }
    };
    let moved = moved.with_context(|| format!("{failure:?} of replica {x}"))?;
    for (name, node) in &mesh.nodes {
        if !movers.contains(name) {
            let now = failovers(&node.show());
            ensure!(
                now == before[name],
                "{name} was on replica {y} yet moved ({} -> {now}) when {x} failed",
                before[name]
            );
        }
    }
    let view = harness(mesh, y).shared().authority().nodes_view();
    for name in &movers {
        let sent = fwds[y].seen(quic_addr(&mesh.nodes[name]));
        ensure!(
            sent.is_some_and(|t| t > t0),
            "{name} moved but sent nothing to replica {y}"
        );
        ensure!(
            view.iter().any(|v| &v.name == name && v.connected),
            "{name} moved but replica {y} holds no push stream of it"
        );
    }
    let slowest = moved.values().max().copied().unwrap_or_default();
    Ok(Event {
        failure,
        samples: moved.into_values().collect(),
        last_move: t0 + slowest,
    })
}

/// `cycles` cycles of two failures, each cycle once every node was subscribed for
/// `HEALTHY_SESSION` (see the module comment).
async fn measure(
    mesh: &mut Mesh,
    fwds: &[Forwarder],
    cycles: usize,
    ready: Instant,
) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut last_move = ready;
    for c in 0..cycles {
        tokio::time::sleep_until((last_move + HEALTHY_SESSION + HEALTHY_MARGIN).into()).await;
        let order = if c % 2 == 0 {
            [Failure::BlackHole, Failure::Stop]
        } else {
            [Failure::Stop, Failure::BlackHole]
        };
        for failure in order {
            let e = fail_one(mesh, fwds, failure, events.is_empty()).await?;
            let slowest = e.samples.iter().max().copied().unwrap_or_default();
            eprintln!(
                "failover: cycle {c}: {failure:?}: {} nodes moved, slowest {:.0} ms",
                e.samples.len(),
                slowest.as_secs_f64() * 1e3
            );
            last_move = e.last_move;
            events.push(e);
        }
    }
    Ok(events)
}

/// One line of the report; `baseline` is the graceful stop's (p50, p99).
fn row(what: &str, events: usize, sorted: &[Duration], baseline: Option<(Duration, Duration)>) {
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
        "| {what} | {events} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {ratio} |",
        sorted.len(),
        ms(p50),
        ms(p99),
        ms(sorted.last().copied().unwrap_or_default()),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let cycles = cycles(bench);
    let run = Instant::now();
    let Some(cluster) = PgCluster::start_durable() else {
        println!("failover: skipped (HOPMESH_SKIP_POSTGRES=1)");
        return;
    };
    let store = StoreSpec::Postgres(PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    });
    let mut fwds = Vec::new();
    for _ in 0..VERIFIERS {
        fwds.push(Forwarder::start().await);
    }
    let extra: Vec<String> = (0..EXTRA_NODES).map(|i| format!("f{i}")).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // Each node lists the forwarders in place of the verifiers, in the same order.
    let tweak = |_: &str, c: &mut NodeConfig| {
        assert_eq!(c.verifiers.len(), VERIFIERS, "{:?}", c.verifiers);
        for (f, real) in fwds.iter().zip(&c.verifiers) {
            f.aim(real.parse().expect("a verifier address"));
        }
        c.verifiers = fwds.iter().map(|f| f.addr.to_string()).collect();
    };
    let mut mesh = Mesh::start_replicated_with(
        Settings::default(),
        store,
        VERIFIERS - 1,
        &policy(),
        &extra,
        tweak,
    )
    .await;
    let ready = Instant::now();
    let setup = run.elapsed();
    eprintln!(
        "failover: {VERIFIERS} replicas, {} nodes set up in {:.1} s; {cycles} cycles",
        mesh.nodes.len(),
        setup.as_secs_f64()
    );

    let result = measure(&mut mesh, &fwds, cycles, ready).await;
    let measured = run.elapsed() - setup;
    mesh.shutdown().await;
    drop(fwds);
    drop(cluster);
    let events = match result {
        Ok(events) => events,
        Err(e) => {
            eprintln!("failover: error: {e:#}");
            std::process::exit(1);
        }
    };

    let mut holed: Vec<Duration> = Vec::new();
    let mut stopped: Vec<Duration> = Vec::new();
    for e in &events {
        match e.failure {
            Failure::BlackHole => &mut holed,
            Failure::Stop => &mut stopped,
        }
        .extend(&e.samples);
    }
    holed.sort();
    stopped.sort();
    let baseline = Some((percentile(&stopped, 0.5), percentile(&stopped, 0.99)));
    println!(
        "failover: {VERIFIERS} verifier replicas on one PostgreSQL database (fsync on, unix \
         socket), {} nodes listing both behind UDP forwarders; {cycles} cycles of a black-hole \
         and a graceful stop, each cycle after every node was subscribed for {HEALTHY_SESSION:?}; \
         timed per node on the failed replica from the failure to subscribed at the other \
         (polled every {POLL:?}); node heartbeat {:?} keep-alive, dead after {:?}; failover \
         pause {FAILOVER_PAUSE:?}; setup {:.1} s, failures {:.1} s",
        events
            .iter()
            .map(|e| e.samples.len())
            .max()
            .unwrap_or_default(),
        Heartbeat::NODE.keep_alive,
        Heartbeat::NODE.idle,
        setup.as_secs_f64(),
        measured.as_secs_f64()
    );
    println!("| failure | events | samples | p50 | p99 | max | vs graceful stop (p50 / p99) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    row("graceful stop (baseline)", cycles, &stopped, None);
    row("black-holed (kill -9, partition)", cycles, &holed, baseline);
    eprintln!("failover: done in {:.1} s", run.elapsed().as_secs_f64());
}
