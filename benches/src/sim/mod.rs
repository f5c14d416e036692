//! The control-plane simulator (`hopmesh-bench sim`): N simulated nodes against one real
//! `hopmesh-verifier` process (the release binary, loopback only).
//!
//! Each simulated node has its own Ed25519 key, enrolls with a join secret created through the
//! verifier's admin API, connects over real QUIC (all nodes share one quinn endpoint: one UDP
//! socket, one connection per node, so the verifier's per-node work is what real nodes cost
//! it), refreshes at the node's cadence (half-life with jitter, TTL compressed by
//! `--attestation-ttl`), subscribes and checks every push as a node does ([`consumer`]).
//!
//! Phases, one verifier per mesh size: join tokens; enrolment (rate per bucket of the mesh
//! size); steady refreshing across seed rotations (attestations/s, verifier CPU per refresh,
//! push bytes per node per rotation); a refresh burst (attestations/s at saturation); revocations
//! (propagation to **every** subscriber, also at a seed-rotation edge); a policy reload
//! (`allow s0 -> s1`: time until every affected node holds its new table); and the final
//! check of every node's table against the policy's oracle ([`shape`]). Any lost, truncated or
//! reordered push, revocation or table update that did not reach a subscriber, or session that
//! ended unexpectedly fails the run ([`SizeResult::failures`]).

pub mod consumer;
pub mod node;
pub mod real;
pub mod report;
pub mod shape;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_transport::pins::Pins;
use hopmesh_verifier::admin::AdminClient;
use hopmesh_verifier::datadir::DataDir;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use tokio::sync::{Semaphore, watch};

use crate::procs::{Proc, clock_ticks, cpu_time, rss_bytes};
use crate::stats::percentile;
use consumer::{Consumer, Kind, Tally};
use node::{Ctx, Slot};
use shape::Shape;

/// How often the orchestrator looks at the nodes while waiting for something to reach all
/// of them (latencies come from the nodes' own receive instants, not from this poll).
const POLL: Duration = Duration::from_millis(10);

/// Join tokens created at once through the admin API.
const TOKEN_CONCURRENCY: usize = 8;

/// A fault injected to prove the checker fails a broken run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Fault {
    /// Node 0 drops the first revocation-list push after the first revoke.
    DropRevocation,
    /// Node 0 drops the first table push after the policy reload.
    DropTable,
}

/// One simulator run at one mesh size.
#[derive(Clone, Debug)]
pub struct Params {
    /// Directory with `hopmesh-verifier`.
    pub bin: PathBuf,
    /// Simulated nodes.
    pub nodes: usize,
    /// Peers per node (segments of `peers + 1`).
    pub peers: usize,
    /// Attestation TTL, seconds (nodes refresh at half of it).
    pub ttl: u64,
    /// Seed generation, seconds.
    pub generation: u64,
    /// Hop-token epoch, seconds.
    pub epoch: u64,
    /// Enrolments in flight at once.
    pub concurrency: usize,
    /// Steady phase length, seconds.
    pub steady_secs: u64,
    /// Refreshes per node in the burst phase (0: no burst).
    pub burst: u64,
    /// Revocations (one at a time).
    pub revocations: usize,
    /// Also revoke one node just after a seed-rotation edge.
    pub rotation_revocation: bool,
    /// Run the policy-reload phase (needs two segments).
    pub reload: bool,
    /// How long a revocation or table update may take to reach every node before the run
    /// fails.
    pub propagation_timeout: Duration,
    /// How long enrolment of the whole mesh may take.
    pub enroll_timeout: Duration,
    /// Fault injection.
    pub fault: Option<Fault>,
}

/// Enrolments per second over one bucket of the mesh size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RateBucket {
    /// Enrolled nodes at the end of the bucket.
    pub mesh_size: usize,
    /// Enrolments per second within the bucket.
    pub per_sec: f64,
}

/// Latencies from an admin action until a set of nodes held its effect.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Propagation {
    /// Actions timed.
    pub actions: usize,
    /// (node, action) samples that arrived.
    pub samples: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// (node, action) pairs that never arrived within the timeout.
    pub missing: usize,
    /// Admin call round trip, ms (median).
    pub admin_call_ms: f64,
}

impl Propagation {
    fn from(mut ms: Vec<f64>, actions: usize, missing: usize, calls: &mut [f64]) -> Self {
        ms.sort_by(f64::total_cmp);
        calls.sort_by(f64::total_cmp);
        Self {
            actions,
            samples: ms.len(),
            p50_ms: percentile(&ms, 50.0).unwrap_or(0.0),
            p99_ms: percentile(&ms, 99.0).unwrap_or(0.0),
            max_ms: ms.last().copied().unwrap_or(0.0),
            missing,
            admin_call_ms: percentile(calls, 50.0).unwrap_or(0.0),
        }
    }
}

/// Everything one size measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SizeResult {
    /// Simulated nodes.
    pub nodes: usize,
    /// Peers per node.
    pub peers: usize,
    /// Attestation TTL, s.
    pub ttl: u64,
    /// Seed generation, s.
    pub generation: u64,
    /// Hop-token epoch, s.
    pub epoch: u64,
    /// Enrolments in flight.
    pub concurrency: usize,
    /// Join tokens created per second through the admin API.
    pub tokens_per_sec: f64,
    /// Enrolment rate per bucket of mesh size.
    pub enrol_buckets: Vec<RateBucket>,
    /// Enrolment rate over the whole mesh.
    pub enrol_per_sec: f64,
    /// From the last enrolment until every node held its whole table, s.
    pub converge_s: f64,
    /// Steady phase: seconds, refreshes, verifier CPU.
    pub steady_secs: f64,
    /// Refreshes in the steady phase.
    pub steady_refreshes: u64,
    /// Attestations per second in the steady phase (the cadence's demand).
    pub steady_attestations_per_sec: f64,
    /// Verifier CPU seconds in the steady phase.
    pub steady_cpu_s: f64,
    /// Verifier CPU per refresh in the steady phase (rotation work included), ms.
    pub steady_cpu_ms_per_refresh: f64,
    /// Seed-rotation edges crossed in the steady phase.
    pub rotations: u64,
    /// Push bytes per node per rotation (all pushes of the steady phase / nodes / rotations).
    pub push_bytes_per_node_per_rotation: f64,
    /// Seed-push bytes per node per rotation.
    pub seed_bytes_per_node_per_rotation: f64,
    /// Burst: refreshes done.
    pub burst_refreshes: u64,
    /// Burst: attestations per second (wall clock).
    pub burst_attestations_per_sec: f64,
    /// Burst: verifier CPU per refresh, ms.
    pub burst_cpu_ms_per_refresh: f64,
    /// Burst: attestations per verifier CPU second (≈ per core).
    pub burst_attestations_per_cpu_s: f64,
    /// Verifier RSS before any node, bytes.
    pub rss_start: u64,
    /// Verifier RSS with every node enrolled and subscribed, bytes.
    pub rss_enrolled: u64,
    /// (rss_enrolled − rss_start) / nodes, bytes.
    pub rss_per_node: f64,
    /// Revocations propagated to every subscriber.
    pub revocation: Propagation,
    /// The revocation timed just after a seed-rotation edge.
    pub revocation_in_rotation: Option<Propagation>,
    /// Policy reload: until every affected node held its new table.
    pub reload: Option<Propagation>,
    /// Nodes the reload affected.
    pub reload_affected: usize,
    /// Unaffected nodes that still got a table push after the reload.
    pub reload_unaffected_pushes: u64,
    /// Pushes received by kind, whole run, all nodes.
    pub pushes: Tally,
    /// Pushes lost, truncated or reordered (must be 0).
    pub violations: usize,
    /// The first few, in words.
    pub violation_samples: Vec<String>,
    /// Enrolments that failed.
    pub enroll_failures: usize,
    /// Sessions that ended unexpectedly.
    pub session_errors: u64,
    /// The first few, in words.
    pub error_samples: Vec<String>,
    /// Live nodes whose final table is not what the policy says.
    pub final_table_mismatches: usize,
    /// Live nodes not holding the newest revocation list at the end.
    pub final_revocation_behind: usize,
    /// Pushes dropped by the injected fault.
    pub dropped_by_fault: u64,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
    /// Simulator CPU seconds in all (it shares the machine with the verifier).
    pub sim_cpu_s: f64,
    /// Wall seconds of the whole size.
    pub wall_s: f64,
}

impl SizeResult {
    /// Why the run failed (empty: it passed).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                f.push(what);
            }
        };
        check(
            self.violations > 0,
            format!("{} pushes lost, truncated or reordered", self.violations),
        );
        check(
            self.enroll_failures > 0,
            format!("{} enrolments failed", self.enroll_failures),
        );
        check(
            self.session_errors > 0,
            format!("{} sessions ended unexpectedly", self.session_errors),
        );
        check(
            self.revocation.missing > 0,
            format!(
                "{} (subscriber, revocation) pairs never arrived",
                self.revocation.missing
            ),
        );
        if let Some(r) = &self.revocation_in_rotation {
            check(
                r.missing > 0,
                format!(
                    "{} subscribers missed the revocation at a rotation edge",
                    r.missing
                ),
            );
        }
        if let Some(r) = &self.reload {
            check(
                r.missing > 0,
                format!("{} affected nodes missed the reloaded table", r.missing),
            );
        }
        check(
            self.final_table_mismatches > 0,
            format!(
                "{} nodes hold a table other than the policy's",
                self.final_table_mismatches
            ),
        );
        check(
            self.final_revocation_behind > 0,
            format!(
                "{} nodes do not hold the newest revocation list",
                self.final_revocation_behind
            ),
        );
        f
    }
}

/// A whole simulator run (one or more sizes).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimResults {
    /// One entry per mesh size.
    pub runs: Vec<SizeResult>,
    /// Notes on how to read the numbers.
    pub notes: Vec<String>,
    /// Stage 2: real nodes in a segment of simulated ones.
    #[serde(default)]
    pub real: Vec<real::RealResult>,
}

fn unix_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The measurement every simulated node presents.
pub fn sim_measurement() -> Measurement {
    Measurement(sha2::Sha256::digest(b"hopmesh-bench sim node").into())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A running verifier for the simulator.
struct Verifier {
    proc: Proc,
    node_addr: SocketAddr,
    admin: AdminClient,
    pins: Pins,
    policy_path: PathBuf,
}

impl Verifier {
    fn start(p: &Params, work: &Path, shape: &Shape) -> Result<Self> {
        let vbin = p.bin.join("hopmesh-verifier");
        if !vbin.exists() {
            bail!(
                "{} not found: build with `cargo build --release --bins`",
                vbin.display()
            );
        }
        let vdir = work.join("verifier");
        let policy_path = work.join("policy.toml");
        std::fs::write(&policy_path, shape.policy())?;
        let pins_text = run_ok(Command::new(&vbin).arg("--data-dir").arg(&vdir).arg("init"))?;
        let pins: Pins = serde_json::from_str(&pins_text).context("verifier init pins")?;
        let mut proc = Proc::spawn(
            "verifier",
            Command::new(&vbin)
                .arg("--data-dir")
                .arg(&vdir)
                .arg("serve")
                .arg("--policy")
                .arg(&policy_path)
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .args(["--epoch", &p.epoch.to_string()])
                .args(["--generation", &p.generation.to_string()])
                .args(["--attestation-ttl", &p.ttl.to_string()])
                .env("HOPMESH_LOG", "warn"),
            &work.join("verifier.log"),
        )?;
        let out = proc.stdout().context("verifier stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.is_empty() {
            bail!(
                "the verifier printed nothing (see {})",
                work.join("verifier.log").display()
            );
        }
        let started: serde_json::Value = serde_json::from_str(&line)?;
        let node_addr = started["node_addr"]
            .as_str()
            .context("verifier did not print node_addr")?
            .parse()?;
        let admin_addr = started["admin_addr"]
            .as_str()
            .context("verifier did not print admin_addr")?;
        let token = DataDir::new(&vdir).admin_token()?;
        Ok(Self {
            proc,
            node_addr,
            admin: AdminClient::new(admin_addr, &token),
            pins,
            policy_path,
        })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.admin
            .call(method, path, Some(body))
            .await
            .map_err(anyhow::Error::msg)
    }
}

/// Creates one join token per node; returns the secrets in node order and tokens/s.
async fn join_tokens(v: &Arc<Verifier>, nodes: usize) -> Result<(Vec<JoinSecret>, f64)> {
    let start = Instant::now();
    let mut out: Vec<Option<JoinSecret>> = (0..nodes).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while set.len() < TOKEN_CONCURRENCY && next < nodes {
            let v = v.clone();
            let i = next;
            next += 1;
            set.spawn(async move {
                let r = v
                    .call(
                        "POST",
                        "/v1/join-tokens",
                        json!({"name": Shape::name(i), "ttl_secs": 7200}),
                    )
                    .await;
                (i, r)
            });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, r) = done?;
        let hex_secret = r?["secret"]
            .as_str()
            .map(str::to_owned)
            .context("no join secret in the answer")?;
        let bytes: [u8; 32] = hex::decode(&hex_secret)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("join secret is not 32 bytes"))?;
        out[i] = Some(JoinSecret::from_bytes(bytes));
    }
    let rate = nodes as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok((
        out.into_iter()
            .map(|s| s.expect("every token created"))
            .collect(),
        rate,
    ))
}

/// Waits until `done` holds (polled every [`POLL`], or four times as long as the check takes)
/// or `timeout` passes; returns whether it held.
async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let t = Instant::now();
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        // A check over 10 000 nodes is not free: never spend more than a fifth of a core on it
        // (the nodes' tasks share the runtime).
        tokio::time::sleep(POLL.max(4 * t.elapsed())).await;
    }
}

/// The nodes, their shape and which are live.
struct Mesh {
    shape: Shape,
    slots: Vec<Slot>,
    revoked: BTreeSet<usize>,
}

impl Mesh {
    fn live(&self, i: usize) -> bool {
        !self.revoked.contains(&i) && !self.slots[i].lock().stopped
    }

    fn ids(&self) -> Vec<Option<NodeId>> {
        self.slots.iter().map(|s| s.lock().node_id).collect()
    }

    /// Live nodes whose table is not the oracle's.
    fn table_mismatches(&self, among: &[usize]) -> Vec<usize> {
        let ids = self.ids();
        let revoked = &self.revoked;
        let live = |j: usize| !revoked.contains(&j);
        among
            .iter()
            .copied()
            .filter(|&i| self.live(i))
            .filter(|&i| {
                let want: Option<BTreeSet<NodeId>> = self
                    .shape
                    .expected_peers(i, &live)
                    .into_iter()
                    .map(|j| ids[j])
                    .collect();
                self.slots[i].lock().consumer.peers != want
            })
            .collect()
    }

    fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for s in &self.slots {
            t.merge(&s.lock().consumer.tally);
        }
        t
    }

    fn sum(&self, f: impl Fn(&node::NodeState) -> u64) -> u64 {
        self.slots.iter().map(|s| f(&s.lock())).sum()
    }
}

/// Runs the simulator at one size.
pub async fn run_size(p: &Params) -> Result<SizeResult> {
    if p.nodes < 2 || p.peers < 1 {
        bail!("need at least 2 nodes and 1 peer per node");
    }
    let wall = Instant::now();
    let me = std::process::id();
    let ticks = clock_ticks();
    let sim_cpu0 = cpu_time(&[me], ticks);
    let work = tempfile::tempdir()?;
    let shape = Shape {
        nodes: p.nodes,
        peers: p.peers,
        extra_allows: Vec::new(),
        measurements: vec![hex::encode(sim_measurement().0)],
        backend_port_base: 30_000,
        backends: BTreeMap::new(),
    };
    let v = Arc::new(Verifier::start(p, work.path(), &shape)?);
    let vpid = v.proc.pid();
    let verifier_cpu0 = cpu_time(&[vpid], ticks);
    let mut r = SizeResult {
        nodes: p.nodes,
        peers: p.peers,
        ttl: p.ttl,
        generation: p.generation,
        epoch: p.epoch,
        concurrency: p.concurrency,
        fault: p.fault,
        ..SizeResult::default()
    };
    r.rss_start = rss_bytes(vpid)?;

    // 1. Join tokens.
    let (secrets, tokens_per_sec) = join_tokens(&v, p.nodes).await?;
    r.tokens_per_sec = tokens_per_sec;
    eprintln!(
        "sim {}: {} join tokens at {tokens_per_sec:.0}/s",
        p.nodes, p.nodes
    );

    // 2. Enrolment: every node starts, at most `concurrency` enrol at once.
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (burst_tx, burst) = watch::channel(0u64);
    let keys = v.pins.key_set()?;
    let ctx = Arc::new(Ctx {
        endpoints: node::endpoints(p.nodes)?,
        burst_gate: Semaphore::new(node::BURST_CONCURRENCY),
        verifier: v.node_addr,
        pins: v.pins.clone(),
        measurement: sim_measurement(),
        enroll_gate: Semaphore::new(p.concurrency.max(1)),
        shutdown,
        burst,
        burst_refreshes: p.burst,
    });
    let mut mesh = Mesh {
        shape,
        slots: (0..p.nodes)
            .map(|_| Slot::new(Consumer::new(keys.clone())))
            .collect(),
        revoked: BTreeSet::new(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let enrol_start = Instant::now();
    for (i, secret) in secrets.into_iter().enumerate() {
        tasks.spawn(node::run(ctx.clone(), i, secret, mesh.slots[i].clone()));
    }
    let all_subscribed = wait_for(p.enroll_timeout, || {
        mesh.slots.iter().all(|s| {
            let s = s.lock();
            s.subscribed_at.is_some() || s.stopped
        })
    })
    .await;
    r.enroll_failures = mesh
        .slots
        .iter()
        .filter(|s| s.lock().subscribed_at.is_none())
        .count();
    let mut enrolled: Vec<Instant> = mesh
        .slots
        .iter()
        .filter_map(|s| s.lock().enrolled_at)
        .collect();
    enrolled.sort();
    r.enrol_buckets = buckets(enrol_start, &enrolled);
    if let Some(last) = enrolled.last() {
        r.enrol_per_sec =
            enrolled.len() as f64 / last.duration_since(enrol_start).as_secs_f64().max(1e-9);
    }
    eprintln!(
        "sim {}: enrolled {} at {:.1}/s{}",
        p.nodes,
        enrolled.len(),
        r.enrol_per_sec,
        if all_subscribed { "" } else { " (timed out)" }
    );
    let everyone: Vec<usize> = (0..p.nodes).collect();
    let converged = wait_for(p.enroll_timeout, || {
        mesh.table_mismatches(&everyone).is_empty()
    })
    .await;
    r.converge_s = enrolled.last().map_or(0.0, |l| l.elapsed().as_secs_f64());
    if !converged {
        eprintln!("sim {}: tables did not converge", p.nodes);
    }
    r.rss_enrolled = rss_bytes(vpid)?;
    r.rss_per_node = r.rss_enrolled.saturating_sub(r.rss_start) as f64 / p.nodes as f64;

    // 3. Steady refreshing across seed rotations.
    let t0 = Instant::now();
    let u0 = unix_secs_f64();
    let cpu0 = cpu_time(&[vpid], ticks);
    let refreshes0 = mesh.sum(|s| s.refreshes);
    let tally0 = mesh.tally();
    tokio::time::sleep(Duration::from_secs(p.steady_secs)).await;
    let cpu1 = cpu_time(&[vpid], ticks);
    let refreshes1 = mesh.sum(|s| s.refreshes);
    let tally1 = mesh.tally();
    let u1 = unix_secs_f64();
    r.steady_secs = t0.elapsed().as_secs_f64();
    r.steady_refreshes = refreshes1 - refreshes0;
    r.steady_attestations_per_sec = r.steady_refreshes as f64 / r.steady_secs;
    r.steady_cpu_s = cpu1.since(cpu0);
    r.steady_cpu_ms_per_refresh = 1e3 * r.steady_cpu_s / (r.steady_refreshes.max(1) as f64);
    let g = p.generation as f64;
    r.rotations = ((u1 / g).floor() - (u0 / g).floor()).max(0.0) as u64;
    let all_bytes = |t: &Tally| t.bytes.values().sum::<u64>();
    if r.rotations > 0 {
        let per = (p.nodes as f64) * (r.rotations as f64);
        r.push_bytes_per_node_per_rotation =
            all_bytes(&tally1).saturating_sub(all_bytes(&tally0)) as f64 / per;
        r.seed_bytes_per_node_per_rotation = tally1
            .bytes_of(Kind::Seeds)
            .saturating_sub(tally0.bytes_of(Kind::Seeds))
            as f64
            / per;
    }

    // 4. Refresh burst.
    if p.burst > 0 {
        let b0 = mesh.sum(|s| s.burst_refreshes);
        let live = (0..p.nodes).filter(|&i| mesh.live(i)).count() as u64;
        let cpu0 = cpu_time(&[vpid], ticks);
        let t0 = Instant::now();
        burst_tx.send_modify(|n| *n += 1);
        wait_for(p.propagation_timeout.max(Duration::from_secs(60)), || {
            mesh.sum(|s| s.burst_refreshes) - b0 >= live * p.burst
        })
        .await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_time(&[vpid], ticks).since(cpu0);
        r.burst_refreshes = mesh.sum(|s| s.burst_refreshes) - b0;
        r.burst_attestations_per_sec = r.burst_refreshes as f64 / wall;
        r.burst_cpu_ms_per_refresh = 1e3 * cpu / r.burst_refreshes.max(1) as f64;
        r.burst_attestations_per_cpu_s = r.burst_refreshes as f64 / cpu.max(1e-9);
    }

    // 5. Revocations: to every live subscriber.
    if p.fault == Some(Fault::DropRevocation) {
        mesh.slots[0].lock().consumer.drop_next = Some(Kind::Revocations);
    }
    let victims = victims(
        &mesh.shape,
        p.revocations + usize::from(p.rotation_revocation),
    );
    let mut ms = Vec::new();
    let mut calls = Vec::new();
    let mut missing = 0;
    let mut actions = 0;
    for (n, &victim) in victims.iter().enumerate() {
        let in_rotation = p.rotation_revocation && n == victims.len() - 1;
        if in_rotation {
            // Just after the next seed-rotation edge, while the ticker does its bulk work.
            let now = unix_secs_f64();
            let edge = ((now / g).floor() + 1.0) * g + 0.1;
            tokio::time::sleep(Duration::from_secs_f64(edge - now)).await;
        }
        let (got, miss, call) = revoke(&v, &mut mesh, victim, p.propagation_timeout).await?;
        if in_rotation {
            let mut c = vec![call];
            r.revocation_in_rotation = Some(Propagation::from(got, 1, miss, &mut c));
        } else {
            ms.extend(got);
            missing += miss;
            actions += 1;
            calls.push(call);
        }
    }
    r.revocation = Propagation::from(ms, actions, missing, &mut calls);
    eprintln!(
        "sim {}: revocation p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {} missing",
        p.nodes,
        r.revocation.p50_ms,
        r.revocation.p99_ms,
        r.revocation.max_ms,
        r.revocation.missing
    );

    // 6. Policy reload: allow s0 -> s1.
    if p.reload && mesh.shape.segments() >= 2 {
        if p.fault == Some(Fault::DropTable) {
            mesh.slots[0].lock().consumer.drop_next = Some(Kind::Table);
        }
        let (prop, affected, unaffected) = reload(&v, &mut mesh, p.propagation_timeout).await?;
        r.reload = Some(prop);
        r.reload_affected = affected;
        r.reload_unaffected_pushes = unaffected;
    }

    // 7. The final check: every table is the policy's, every node holds the newest list.
    wait_for(p.propagation_timeout, || {
        mesh.table_mismatches(&everyone).is_empty()
    })
    .await;
    r.final_table_mismatches = mesh.table_mismatches(&everyone).len();
    let newest = mesh
        .slots
        .iter()
        .map(|s| s.lock().consumer.revocation_version())
        .max()
        .unwrap_or(0);
    r.final_revocation_behind = (0..p.nodes)
        .filter(|&i| mesh.live(i) && mesh.slots[i].lock().consumer.revocation_version() < newest)
        .count();
    for s in &mesh.slots {
        let s = s.lock();
        r.violations += s.consumer.violations.len();
        r.dropped_by_fault += s.consumer.dropped;
        r.session_errors += s.error_count;
        for v in &s.consumer.violations {
            if r.violation_samples.len() < 8 {
                r.violation_samples.push(v.clone());
            }
        }
        for e in &s.errors {
            if r.error_samples.len() < 8 {
                r.error_samples.push(e.clone());
            }
        }
    }
    // Enrolment failures are counted once, not again as session errors.
    r.session_errors = r.session_errors.saturating_sub(r.enroll_failures as u64);
    r.pushes = mesh.tally();

    // Stop everything.
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    ctx.close();
    // Our process tree includes the verifier: take its share out.
    r.sim_cpu_s = (cpu_time(&[me], ticks).since(sim_cpu0)
        - cpu_time(&[vpid], ticks).since(verifier_cpu0))
    .max(0.0);
    r.wall_s = wall.elapsed().as_secs_f64();
    drop(v);
    Ok(r)
}

/// Runs every size in turn (a fresh verifier each), writes the report into `out`, and fails
/// if any size failed its checks (the report is written either way).
pub fn run_all(
    rt: &tokio::runtime::Runtime,
    p: &Params,
    sizes: &[usize],
    real_nodes: Option<usize>,
    out: &Path,
) -> Result<()> {
    let mut all = SimResults {
        runs: Vec::new(),
        notes: vec![
            "Numbers need a quiet machine: 2 cores shared by the verifier and the simulator."
                .into(),
            "One QUIC connection per simulated node, from one quinn endpoint per 200 nodes (each \
             on its own loopback address 127.0.1.k, as real nodes come from many hosts); the \
             verifier's per-node work (handshake, enrol, refresh, subscription, pushes) is a \
             real node's."
                .into(),
            "The burst phase keeps at most 256 refreshes in flight.".into(),
        ],
        real: Vec::new(),
    };
    let mut failed = Vec::new();
    if let Some(real_nodes) = real_nodes {
        // Stage 2 only, at each size.
        for &n in sizes {
            let params = Params {
                nodes: n,
                ..p.clone()
            };
            let r = rt.block_on(real::run(&params, real_nodes))?;
            eprintln!(
                "sim stage 2, {n} nodes: real nodes list {:?} peers, reached: {}",
                r.peers_listed, r.reached
            );
            for f in &r.failures {
                eprintln!("sim stage 2 {n}: FAILED: {f}");
                failed.push(format!("stage 2 {n} nodes: {f}"));
            }
            all.real.push(r);
        }
        report::write(&all, out)?;
        return if failed.is_empty() {
            Ok(())
        } else {
            bail!("stage 2 failed: {}", failed.join("; "))
        };
    }
    for &n in sizes {
        let params = Params {
            nodes: n,
            ..p.clone()
        };
        let r = rt.block_on(run_size(&params))?;
        for f in r.failures() {
            eprintln!("sim {n}: FAILED: {f}");
            failed.push(format!("{n} nodes: {f}"));
        }
        for v in r.violation_samples.iter().chain(&r.error_samples) {
            eprintln!("sim {n}:   {v}");
        }
        all.runs.push(r);
        report::write(&all, out)?;
    }
    eprintln!("sim: report in {}", out.join("sim.md").display());
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("the simulator's checks failed: {}", failed.join("; "))
    }
}

/// Enrolment rate per tenth of the mesh (buckets of at least 10 nodes).
fn buckets(start: Instant, enrolled: &[Instant]) -> Vec<RateBucket> {
    let size = (enrolled.len() / 10).max(10);
    let mut out = Vec::new();
    let mut prev = start;
    for (b, chunk) in enrolled.chunks(size).enumerate() {
        let Some(last) = chunk.last() else { continue };
        let secs = last.duration_since(prev).as_secs_f64().max(1e-9);
        out.push(RateBucket {
            mesh_size: b * size + chunk.len(),
            per_sec: chunk.len() as f64 / secs,
        });
        prev = *last;
    }
    out
}

/// `n` nodes to revoke: the last node of successive segments, never node 0 (the fault's node).
fn victims(shape: &Shape, n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut k = 0;
    while out.len() < n && k < shape.segments() * shape.segment_size() {
        let seg = k % shape.segments();
        let round = k / shape.segments();
        let members = shape.members(seg);
        if let Some(v) = members.clone().rev().nth(round)
            && v != 0
            && !out.contains(&v)
        {
            out.push(v);
        }
        k += 1;
    }
    out
}

/// Revokes `victim`; returns each live subscriber's latency (ms), how many never got it, and
/// the admin call's round trip (ms).
async fn revoke(
    v: &Verifier,
    mesh: &mut Mesh,
    victim: usize,
    timeout: Duration,
) -> Result<(Vec<f64>, usize, f64)> {
    mesh.revoked.insert(victim);
    mesh.slots[victim].lock().revoked = true;
    let id = mesh.slots[victim]
        .lock()
        .node_id
        .context("victim has no key")?;
    let subscribers: Vec<usize> = (0..mesh.slots.len())
        .filter(|&i| mesh.live(i) && mesh.slots[i].lock().subscribed_at.is_some())
        .collect();
    let t0 = Instant::now();
    v.call("POST", "/v1/revoke", json!({"node": Shape::name(victim)}))
        .await
        .context("revoke")?;
    let call = t0.elapsed().as_secs_f64() * 1e3;
    let slots = &mesh.slots;
    wait_for(timeout, || {
        subscribers
            .iter()
            .all(|&i| slots[i].lock().consumer.revoked_seen.contains_key(&id))
    })
    .await;
    let mut got = Vec::new();
    let mut missing = 0;
    for &i in &subscribers {
        match slots[i].lock().consumer.revoked_seen.get(&id) {
            Some(at) => got.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3),
            None => missing += 1,
        }
    }
    Ok((got, missing, call))
}

/// Reloads the policy with `allow s0 -> s1` added; returns the propagation to the affected
/// nodes, how many were affected, and the table pushes unaffected nodes got.
async fn reload(
    v: &Verifier,
    mesh: &mut Mesh,
    timeout: Duration,
) -> Result<(Propagation, usize, u64)> {
    mesh.shape.extra_allows.push((0, 1));
    std::fs::write(&v.policy_path, mesh.shape.policy())?;
    let affected: Vec<usize> = mesh
        .shape
        .members(0)
        .chain(mesh.shape.members(1))
        .filter(|&i| mesh.live(i))
        .collect();
    let before: BTreeMap<usize, u64> = (0..mesh.slots.len())
        .map(|i| (i, mesh.slots[i].lock().consumer.tables))
        .collect();
    let t0 = Instant::now();
    v.call("POST", "/v1/policy/reload", json!({}))
        .await
        .context("policy reload")?;
    let call = t0.elapsed().as_secs_f64() * 1e3;
    wait_for(timeout, || mesh.table_mismatches(&affected).is_empty()).await;
    let wrong: BTreeSet<usize> = mesh.table_mismatches(&affected).into_iter().collect();
    let mut ms = Vec::new();
    for &i in affected.iter().filter(|i| !wrong.contains(i)) {
        if let Some(at) = mesh.slots[i].lock().consumer.table_changed_at {
            ms.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3);
        }
    }
    let affected_set: BTreeSet<usize> = affected.iter().copied().collect();
    let unaffected: u64 = (0..mesh.slots.len())
        .filter(|i| !affected_set.contains(i) && mesh.live(*i))
        .map(|i| mesh.slots[i].lock().consumer.tables - before[&i])
        .sum();
    let mut c = vec![call];
    Ok((
        Propagation::from(ms, 1, wrong.len(), &mut c),
        affected.len(),
        unaffected,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> SizeResult {
        SizeResult {
            nodes: 10,
            ..SizeResult::default()
        }
    }

    #[test]
    fn a_clean_run_passes_and_each_defect_fails_it() {
        assert!(result().failures().is_empty());
        let defects: Vec<fn(&mut SizeResult)> = vec![
            |r| r.violations = 1,
            |r| r.enroll_failures = 1,
            |r| r.session_errors = 1,
            |r| r.revocation.missing = 1,
            |r| r.final_table_mismatches = 1,
            |r| r.final_revocation_behind = 1,
            |r| {
                r.reload = Some(Propagation {
                    missing: 1,
                    ..Propagation::default()
                })
            },
            |r| {
                r.revocation_in_rotation = Some(Propagation {
                    missing: 1,
                    ..Propagation::default()
                })
            },
        ];
        for (n, d) in defects.into_iter().enumerate() {
            let mut r = result();
            d(&mut r);
            assert_eq!(r.failures().len(), 1, "defect {n}");
        }
    }

    #[test]
    fn buckets_cover_every_enrolment() {
        let t0 = Instant::now();
        let times: Vec<Instant> = (1..=25)
            .map(|i| t0 + Duration::from_millis(100 * i))
            .collect();
        let b = buckets(t0, &times);
        assert_eq!(
            b.iter().map(|b| b.mesh_size).collect::<Vec<_>>(),
            vec![10, 20, 25]
        );
        assert!((b[0].per_sec - 10.0).abs() < 0.01, "{}", b[0].per_sec);
    }

    #[test]
    fn victims_are_distinct_and_never_node_0() {
        let s = Shape {
            nodes: 9,
            peers: 2,
            extra_allows: Vec::new(),
            measurements: Vec::new(),
            backend_port_base: 1,
            backends: BTreeMap::new(),
        };
        let v = victims(&s, 5);
        assert_eq!(v, vec![2, 5, 8, 1, 4]);
        assert_eq!(victims(&s, 100).len(), 8);
    }
}
