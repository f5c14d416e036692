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
//!
//! With `--replicas R` (R > 1) each size runs twice in the same invocation: first the baseline,
//! one verifier on its SQLite store as above, then R verifier replicas on one PostgreSQL
//! database of a throwaway cluster (verifier/src/store/pg_cluster.rs, `fsync` on, reached over
//! its unix socket), made with the verifier's own commands (`init --store`, `replica export`,
//! `init --replica-of`, `serve`). Node `i` talks to replica `i % R` with replica 0's pins;
//! join tokens, revocations and the policy reload go through replica 0's admin API, and
//! propagation is reported for the subscribers at replica 0 and at the other replicas apart.
//! Every check above holds at every replica. The verifiers and the cluster are stopped at the
//! end, on an error, and on a signal ([`stop_on_signal`]).

pub mod consumer;
pub mod node;
pub mod real;
pub mod report;
pub mod shape;

mod deploy;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::secret::JoinSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use tokio::sync::{Semaphore, watch};

use crate::procs::{clock_ticks, cpu_time};
use crate::stats::percentile;
use consumer::{Consumer, Kind, Tally};
pub use deploy::stop_on_signal;
use deploy::{Deployment, Verifier, WorkDir};
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
    /// The fault's node ([`fault_node`]) drops the first revocation-list push after the first
    /// revoke.
    DropRevocation,
    /// The fault's node drops the first table push after the policy reload.
    DropTable,
    /// Replicas: every node talks to replica 0 instead of its own (the replicas' node views
    /// must then show the sessions misplaced).
    OneReplica,
}

/// The node that drops a push under a [`Fault`]: node 0 with one verifier; with replicas the
/// first node of the last replica (`replicas - 1`), so the fault hits a subscriber the
/// revocation reaches across replicas.
pub fn fault_node(p: &Params) -> usize {
    (p.replicas.max(1) - 1).min(p.nodes.saturating_sub(1))
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
    /// Verifier replicas on one PostgreSQL database (1: one verifier on its SQLite store).
    pub replicas: usize,
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
    /// (rss_enrolled − rss_start) / nodes, bytes (all verifiers together).
    pub rss_per_node: f64,
    /// The same of each replica alone (each holds every node's state, and its own nodes'
    /// sessions), bytes; replicas only.
    #[serde(default)]
    pub replica_rss_per_node: Vec<f64>,
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
    /// Verifiers serving the mesh (1: one verifier on SQLite; more: replicas on PostgreSQL).
    #[serde(default)]
    pub replicas: usize,
    /// Their store: `sqlite` or `postgresql`.
    #[serde(default)]
    pub store: String,
    /// Revocations, subscribers at the replica that took the revoke (replica 0; replicas only).
    #[serde(default)]
    pub revocation_same_replica: Option<Propagation>,
    /// Revocations, subscribers at the other replicas (replicas only).
    #[serde(default)]
    pub revocation_other_replicas: Option<Propagation>,
    /// Policy reload, affected nodes at the replica that took the reload (replicas only).
    #[serde(default)]
    pub reload_same_replica: Option<Propagation>,
    /// Policy reload, affected nodes at the other replicas (replicas only).
    #[serde(default)]
    pub reload_other_replicas: Option<Propagation>,
    /// PostgreSQL server CPU seconds in the steady phase (replicas only).
    #[serde(default)]
    pub steady_db_cpu_s: f64,
    /// PostgreSQL server CPU seconds in the burst (replicas only).
    #[serde(default)]
    pub burst_db_cpu_s: f64,
    /// Burst: attestations per CPU second of the verifiers and the database server together.
    #[serde(default)]
    pub burst_attestations_per_total_cpu_s: f64,
    /// ERROR lines in the verifiers' logs (run at `warn`).
    #[serde(default)]
    pub verifier_log_errors: usize,
    /// Replicas only, once every table converged: live nodes a replica's `GET /v1/nodes`
    /// shows with a push stream open at it other than its own (node `i` at replica `i % R`), or
    /// not open at their own (must be 0).
    #[serde(default)]
    pub replica_sessions_misplaced: usize,
    /// Replicas only: (replica, live node) pairs the replica's nodes view lacks (must be 0:
    /// every replica holds every node).
    #[serde(default)]
    pub replica_nodes_missing: usize,
    /// WARN lines in the verifiers' logs.
    #[serde(default)]
    pub verifier_log_warnings: usize,
    /// The first few of each.
    #[serde(default)]
    pub verifier_log_samples: Vec<String>,
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
        let other = self
            .revocation_other_replicas
            .as_ref()
            .map_or(String::new(), |o| {
                format!(" ({} at subscribers of other replicas)", o.missing)
            });
        check(
            self.revocation.missing > 0,
            format!(
                "{} (subscriber, revocation) pairs never arrived{other}",
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
            self.replica_sessions_misplaced > 0,
            format!(
                "{} sessions not at (only) their own replica",
                self.replica_sessions_misplaced
            ),
        );
        check(
            self.replica_nodes_missing > 0,
            format!(
                "{} (replica, node) pairs missing from the replicas' node views",
                self.replica_nodes_missing
            ),
        );
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

    /// What ran: `300 nodes`, or `300 nodes, PostgreSQL ×3`.
    pub fn label(&self) -> String {
        if self.replicas > 1 {
            format!("{} nodes, PostgreSQL ×{}", self.nodes, self.replicas)
        } else {
            format!("{} nodes", self.nodes)
        }
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
    let work = WorkDir::new()?;
    let shape = Shape {
        nodes: p.nodes,
        peers: p.peers,
        extra_allows: Vec::new(),
        measurements: vec![hex::encode(sim_measurement().0)],
        backend_port_base: 30_000,
        backends: BTreeMap::new(),
    };
    let tag = if p.replicas > 1 {
        format!("{} pg×{}", p.nodes, p.replicas)
    } else {
        p.nodes.to_string()
    };
    let dep = if p.replicas > 1 {
        Deployment::replicas(p, work.path(), &shape)?
    } else {
        Deployment::sqlite(p, work.path(), &shape)?
    };
    let v = dep.verifiers[0].clone();
    let vpids = dep.pids();
    let verifier_cpu0 = cpu_time(&vpids, ticks);
    let mut r = SizeResult {
        nodes: p.nodes,
        peers: p.peers,
        ttl: p.ttl,
        generation: p.generation,
        epoch: p.epoch,
        concurrency: p.concurrency,
        fault: p.fault,
        replicas: p.replicas.max(1),
        store: if p.replicas > 1 {
            "postgresql"
        } else {
            "sqlite"
        }
        .into(),
        ..SizeResult::default()
    };
    r.rss_start = dep.rss()?;
    let replica_rss0 = dep.each_rss()?;

    // 1. Join tokens.
    let (secrets, tokens_per_sec) = join_tokens(&v, p.nodes).await?;
    r.tokens_per_sec = tokens_per_sec;
    eprintln!(
        "sim {tag}: {} join tokens at {tokens_per_sec:.0}/s",
        p.nodes
    );

    // 2. Enrolment: every node starts, at most `concurrency` enrol at once.
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (burst_tx, burst) = watch::channel(0u64);
    let keys = v.pins.key_set()?;
    let ctx = Arc::new(Ctx {
        endpoints: node::endpoints(p.nodes)?,
        burst_gate: Semaphore::new(node::BURST_CONCURRENCY),
        verifiers: if p.fault == Some(Fault::OneReplica) {
            vec![v.node_addr]
        } else {
            dep.node_addrs()
        },
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
        "sim {tag}: enrolled {} at {:.1}/s{}",
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
        eprintln!("sim {tag}: tables did not converge");
    }
    r.rss_enrolled = dep.rss()?;
    r.rss_per_node = r.rss_enrolled.saturating_sub(r.rss_start) as f64 / p.nodes as f64;
    if p.replicas > 1 {
        r.replica_rss_per_node = dep
            .each_rss()?
            .iter()
            .zip(&replica_rss0)
            .map(|(b, a)| b.saturating_sub(*a) as f64 / p.nodes as f64)
            .collect();
    }

    if p.replicas > 1 {
        // Every replica knows every node and holds exactly its own nodes' sessions.
        let end = Instant::now() + p.propagation_timeout;
        loop {
            let (misplaced, missing) = replica_views(&dep, &mesh).await?;
            r.replica_sessions_misplaced = misplaced;
            r.replica_nodes_missing = missing;
            if (misplaced == 0 && missing == 0) || Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "sim {tag}: replicas' node views: {} sessions misplaced, {} nodes missing",
            r.replica_sessions_misplaced, r.replica_nodes_missing
        );
    }

    // 3. Steady refreshing across seed rotations.
    let t0 = Instant::now();
    let u0 = unix_secs_f64();
    let cpu0 = cpu_time(&vpids, ticks);
    let db0 = dep.db_cpu(ticks);
    let refreshes0 = mesh.sum(|s| s.refreshes);
    let tally0 = mesh.tally();
    tokio::time::sleep(Duration::from_secs(p.steady_secs)).await;
    let cpu1 = cpu_time(&vpids, ticks);
    r.steady_db_cpu_s = dep.db_cpu(ticks).since(db0);
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
        let cpu0 = cpu_time(&vpids, ticks);
        let db0 = dep.db_cpu(ticks);
        let t0 = Instant::now();
        burst_tx.send_modify(|n| *n += 1);
        wait_for(p.propagation_timeout.max(Duration::from_secs(60)), || {
            mesh.sum(|s| s.burst_refreshes) - b0 >= live * p.burst
        })
        .await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_time(&vpids, ticks).since(cpu0);
        r.burst_db_cpu_s = dep.db_cpu(ticks).since(db0);
        r.burst_refreshes = mesh.sum(|s| s.burst_refreshes) - b0;
        r.burst_attestations_per_sec = r.burst_refreshes as f64 / wall;
        r.burst_cpu_ms_per_refresh = 1e3 * cpu / r.burst_refreshes.max(1) as f64;
        r.burst_attestations_per_cpu_s = r.burst_refreshes as f64 / cpu.max(1e-9);
        r.burst_attestations_per_total_cpu_s =
            r.burst_refreshes as f64 / (cpu + r.burst_db_cpu_s).max(1e-9);
        eprintln!(
            "sim {tag}: burst {:.0} attestations/s ({:.0} per verifier CPU-s)",
            r.burst_attestations_per_sec, r.burst_attestations_per_cpu_s
        );
    }

    // 5. Revocations: to every live subscriber (through replica 0's admin API).
    let faulty = fault_node(p);
    if p.fault == Some(Fault::DropRevocation) {
        mesh.slots[faulty].lock().consumer.drop_next = Some(Kind::Revocations);
    }
    let victims = victims(
        &mesh.shape,
        p.revocations + usize::from(p.rotation_revocation),
        faulty,
    );
    let mut ms = Vec::new();
    let mut calls = Vec::new();
    let mut missing = 0;
    let mut actions = 0;
    let mut split = Split::new(p.replicas);
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
            let ms: Vec<f64> = got.iter().map(|&(_, d)| d).collect();
            r.revocation_in_rotation = Some(Propagation::from(ms, 1, miss.len(), &mut c));
        } else {
            ms.extend(got.iter().map(|&(_, d)| d));
            missing += miss.len();
            actions += 1;
            calls.push(call);
            split.add(&got, &miss);
        }
    }
    r.revocation = Propagation::from(ms, actions, missing, &mut calls.clone());
    (r.revocation_same_replica, r.revocation_other_replicas) = split.finish(actions, &calls);
    eprintln!(
        "sim {tag}: revocation p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {} missing; admin call {:.1} ms",
        r.revocation.p50_ms,
        r.revocation.p99_ms,
        r.revocation.max_ms,
        r.revocation.missing,
        r.revocation.admin_call_ms
    );
    for (what, x) in [
        ("same replica", &r.revocation_same_replica),
        ("other replicas", &r.revocation_other_replicas),
    ] {
        if let Some(x) = x {
            eprintln!(
                "sim {tag}:   {what}: p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {} missing",
                x.p50_ms, x.p99_ms, x.max_ms, x.missing
            );
        }
    }

    // 6. Policy reload: allow s0 -> s1.
    if p.reload && mesh.shape.segments() >= 2 {
        if p.fault == Some(Fault::DropTable) {
            mesh.slots[faulty].lock().consumer.drop_next = Some(Kind::Table);
        }
        let (prop, affected, unaffected, got, wrong) =
            reload(&v, &mut mesh, p.propagation_timeout).await?;
        let mut split = Split::new(p.replicas);
        split.add(&got, &wrong);
        (r.reload_same_replica, r.reload_other_replicas) = split.finish(1, &[prop.admin_call_ms]);
        eprintln!(
            "sim {tag}: policy reload p50 {:.1} ms p99 {:.1} ms, {} missing",
            prop.p50_ms, prop.p99_ms, prop.missing
        );
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
        - cpu_time(&vpids, ticks).since(verifier_cpu0))
    .max(0.0);
    (
        r.verifier_log_errors,
        r.verifier_log_warnings,
        r.verifier_log_samples,
    ) = dep.log_lines();
    drop(v);
    // The verifiers, then the database.
    drop(dep);
    r.wall_s = wall.elapsed().as_secs_f64();
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
    if p.replicas > 1 {
        all.notes.push(format!(
            "PostgreSQL ×{r}: {r} verifier replicas on one database of a throwaway PostgreSQL \
             cluster (fsync on, unix socket, on this machine), made with the verifier's own \
             commands (init --store, replica export, init --replica-of, serve); node i talks to \
             replica i % {r} with replica 0's pins; join tokens, revocations and the policy \
             reload go through replica 0's admin API. Each size runs first on one verifier on \
             SQLite (the baseline, same invocation), then on the replicas. Verifier CPU and RSS \
             are all replicas' together; the database server's CPU is shown apart.",
            r = p.replicas
        ));
        all.notes.push(
            "Propagation is timed from just before the admin call to each node's receipt; \
             'same replica' are the subscribers of replica 0 (pushed from the call itself), \
             'other replicas' those of the others (through the database's change feed)."
                .into(),
        );
    }
    let mut failed = Vec::new();
    if let Some(real_nodes) = real_nodes {
        if p.replicas > 1 {
            bail!("stage 2 (--real) runs against one verifier: drop --replicas");
        }
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
    // With replicas: the SQLite baseline of each size, then the replicas.
    let kinds: Vec<usize> = if p.replicas > 1 {
        vec![1, p.replicas]
    } else {
        vec![1]
    };
    for &n in sizes {
        for &replicas in &kinds {
            let params = Params {
                nodes: n,
                replicas,
                ..p.clone()
            };
            let r = rt.block_on(run_size(&params))?;
            let label = r.label();
            for f in r.failures() {
                eprintln!("sim {label}: FAILED: {f}");
                failed.push(format!("{label}: {f}"));
            }
            for v in r
                .violation_samples
                .iter()
                .chain(&r.error_samples)
                .chain(&r.verifier_log_samples)
            {
                eprintln!("sim {label}:   {v}");
            }
            all.runs.push(r);
            report::write(&all, out)?;
        }
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

/// `n` nodes to revoke: the last node of successive segments, never `spare` (the fault's node).
fn victims(shape: &Shape, n: usize, spare: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut k = 0;
    while out.len() < n && k < shape.segments() * shape.segment_size() {
        let seg = k % shape.segments();
        let round = k / shape.segments();
        let members = shape.members(seg);
        if let Some(v) = members.clone().rev().nth(round)
            && v != spare
            && !out.contains(&v)
        {
            out.push(v);
        }
        k += 1;
    }
    out
}

/// Asks every replica for its nodes (`GET /v1/nodes`); returns the live subscribed nodes shown
/// with a push stream open at a replica other than their own or not at their own (node `i` at
/// replica `i % R`), and the (replica, live node) pairs a replica does not list.
async fn replica_views(dep: &Deployment, mesh: &Mesh) -> Result<(usize, usize)> {
    let replicas = dep.verifiers.len();
    let live: Vec<usize> = (0..mesh.slots.len())
        .filter(|&i| mesh.live(i) && mesh.slots[i].lock().subscribed_at.is_some())
        .collect();
    let (mut misplaced, mut missing) = (0, 0);
    for (k, v) in dep.verifiers.iter().enumerate() {
        let view = v
            .admin
            .call("GET", "/v1/nodes", None)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("nodes of replica {k}"))?;
        let shown: BTreeMap<&str, bool> = view
            .as_array()
            .context("the nodes view is not a list")?
            .iter()
            .filter_map(|n| Some((n["name"].as_str()?, n["connected"].as_bool()?)))
            .collect();
        for &i in &live {
            match shown.get(Shape::name(i).as_str()) {
                None => missing += 1,
                Some(&open) if open != (i % replicas == k) => misplaced += 1,
                Some(_) => {}
            }
        }
    }
    Ok((misplaced, missing))
}

/// Propagation samples apart by where the node is: at replica 0, which took the admin call, or
/// at another replica, which learns of it from the database's change feed. Node `i` is at
/// replica `i % replicas` ([`Ctx::verifier`]).
struct Split {
    replicas: usize,
    same: Vec<f64>,
    other: Vec<f64>,
    missing_same: usize,
    missing_other: usize,
}

impl Split {
    fn new(replicas: usize) -> Self {
        Self {
            replicas: replicas.max(1),
            same: Vec::new(),
            other: Vec::new(),
            missing_same: 0,
            missing_other: 0,
        }
    }

    /// (node, ms) samples that arrived and the nodes that never got it.
    fn add(&mut self, got: &[(usize, f64)], missing: &[usize]) {
        for &(i, ms) in got {
            if i % self.replicas == 0 {
                self.same.push(ms);
            } else {
                self.other.push(ms);
            }
        }
        for &i in missing {
            if i % self.replicas == 0 {
                self.missing_same += 1;
            } else {
                self.missing_other += 1;
            }
        }
    }

    /// (same replica, other replicas); none with one verifier.
    fn finish(self, actions: usize, calls: &[f64]) -> (Option<Propagation>, Option<Propagation>) {
        if self.replicas <= 1 {
            return (None, None);
        }
        let same = Propagation::from(self.same, actions, self.missing_same, &mut calls.to_vec());
        let other = Propagation::from(self.other, actions, self.missing_other, &mut calls.to_vec());
        (Some(same), Some(other))
    }
}

/// Revokes `victim`; returns each live subscriber's latency as (node, ms), the subscribers
/// that never got it, and the admin call's round trip (ms).
async fn revoke(
    v: &Verifier,
    mesh: &mut Mesh,
    victim: usize,
    timeout: Duration,
) -> Result<(Vec<(usize, f64)>, Vec<usize>, f64)> {
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
    let mut missing = Vec::new();
    for &i in &subscribers {
        match slots[i].lock().consumer.revoked_seen.get(&id) {
            Some(at) => got.push((i, at.saturating_duration_since(t0).as_secs_f64() * 1e3)),
            None => missing.push(i),
        }
    }
    Ok((got, missing, call))
}

/// Reloads the policy with `allow s0 -> s1` added (the file, then the admin call at `v`);
/// returns the propagation to the affected nodes, how many were affected, the table pushes
/// unaffected nodes got, and the samples as (node, ms) with the nodes that missed it.
async fn reload(
    v: &Verifier,
    mesh: &mut Mesh,
    timeout: Duration,
) -> Result<(Propagation, usize, u64, Vec<(usize, f64)>, Vec<usize>)> {
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
    let mut got = Vec::new();
    for &i in affected.iter().filter(|i| !wrong.contains(i)) {
        if let Some(at) = mesh.slots[i].lock().consumer.table_changed_at {
            got.push((i, at.saturating_duration_since(t0).as_secs_f64() * 1e3));
        }
    }
    let ms: Vec<f64> = got.iter().map(|&(_, d)| d).collect();
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
        got,
        wrong.into_iter().collect(),
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
            |r| r.replica_sessions_misplaced = 1,
            |r| r.replica_nodes_missing = 1,
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
    fn samples_split_by_the_replica_of_their_node() {
        let mut s = Split::new(3);
        // Nodes 0 and 3 are at replica 0, 1 and 5 at others; 4 (replica 1) and 6 missed it.
        s.add(&[(0, 1.0), (3, 2.0), (1, 10.0), (5, 20.0)], &[4, 6]);
        let (same, other) = s.finish(1, &[5.0]);
        let (same, other) = (same.expect("same"), other.expect("other"));
        assert_eq!((same.samples, same.missing), (2, 1));
        assert_eq!((other.samples, other.missing), (2, 1));
        assert!((same.max_ms - 2.0).abs() < 1e-9 && (other.max_ms - 20.0).abs() < 1e-9);
        assert!((other.admin_call_ms - 5.0).abs() < 1e-9);
        let mut one = Split::new(1);
        one.add(&[(1, 1.0)], &[]);
        assert!(matches!(one.finish(1, &[1.0]), (None, None)));
    }

    #[test]
    fn the_faults_node_is_at_the_last_replica() {
        let p = |replicas, nodes| Params {
            bin: PathBuf::new(),
            nodes,
            peers: 1,
            ttl: 10,
            generation: 10,
            epoch: 10,
            concurrency: 1,
            steady_secs: 0,
            burst: 0,
            revocations: 0,
            rotation_revocation: false,
            reload: false,
            propagation_timeout: Duration::ZERO,
            enroll_timeout: Duration::ZERO,
            fault: None,
            replicas,
        };
        assert_eq!(fault_node(&p(1, 10)), 0);
        assert_eq!(fault_node(&p(3, 10)), 2);
        assert_eq!(fault_node(&p(3, 10)) % 3, 2, "not at replica 0");
        assert_eq!(fault_node(&p(3, 2)), 1);
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
    fn victims_are_distinct_and_never_the_faults_node() {
        let s = Shape {
            nodes: 9,
            peers: 2,
            extra_allows: Vec::new(),
            measurements: Vec::new(),
            backend_port_base: 1,
            backends: BTreeMap::new(),
        };
        let v = victims(&s, 5, 0);
        assert_eq!(v, vec![2, 5, 8, 1, 4]);
        assert_eq!(victims(&s, 100, 0).len(), 8);
        // With replicas the fault's node is another: it is spared, node 0 may be revoked.
        assert!(!victims(&s, 100, 2).contains(&2));
        assert_eq!(victims(&s, 100, 2).len(), 8);
    }
}
