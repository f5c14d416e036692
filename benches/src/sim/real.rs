//! Stage 2 of the simulator (`hopmesh-bench sim --real 2`): real `hopmesh-node` processes in
//! one segment with simulated nodes, every node serving a service. The check: `ctl show` on
//! each real node lists every other node as a peer, and the first real node reaches the
//! second's service through its SOCKS endpoint (loopback).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{Semaphore, watch};

use super::consumer::Consumer;
use super::node::{self, Ctx, Slot};
use super::shape::Shape;
use super::{Params, Verifier, join_tokens, run_ok, sim_measurement, wait_for};
use crate::load::{self, Via};
use crate::procs::{Proc, rss_bytes};
use crate::systems::{Backend, free_tcp, free_udp};

/// Bytes fetched through the mesh from the second real node's service.
const FETCH_BYTES: u64 = 1 << 20;

/// What stage 2 found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RealResult {
    /// Nodes in the segment (real and simulated).
    pub nodes: usize,
    /// Real node processes among them.
    pub real: usize,
    /// Seconds until every simulated node was subscribed.
    pub enrol_s: f64,
    /// Peers each real node's `ctl show` listed at the end.
    pub peers_listed: Vec<usize>,
    /// Seconds from the last enrolment until every real node listed them all.
    pub tables_s: f64,
    /// Whether the first real node reached the second's service through SOCKS.
    pub reached: bool,
    /// Time of that fetch (1 MiB), ms.
    pub fetch_ms: f64,
    /// Verifier RSS at the end, bytes.
    pub verifier_rss: u64,
    /// RSS of each real node at the end, bytes.
    pub node_rss: Vec<u64>,
    /// Why it failed (empty: passed).
    pub failures: Vec<String>,
}

struct RealNode {
    proc: Proc,
    dir: PathBuf,
    socks: std::net::SocketAddr,
}

fn start_node(
    bin: &Path,
    work: &Path,
    name: &str,
    secret: &str,
    verifier: &str,
    pins: &Path,
) -> Result<RealNode> {
    let node_bin = bin.join("hopmesh-node");
    let dir = work.join(name);
    let listen = free_udp()?;
    let socks = free_tcp()?;
    run_ok(
        Command::new(&node_bin)
            .arg("enroll")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--verifier", verifier])
            .env("HOPMESH_JOIN_TOKEN", secret)
            .arg("--pins")
            .arg(pins)
            .args(["--advertise", &listen.to_string()]),
    )?;
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nverifier = \"{verifier}\"\nlisten = \"{listen}\"\nadvertise = [\"{listen}\"]\nsocks = \"{socks}\"\n",
            dir.display(),
        ),
    )?;
    let proc = Proc::spawn(
        name,
        Command::new(&node_bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("HOPMESH_LOG", "warn"),
        &work.join(format!("{name}.log")),
    )?;
    Ok(RealNode { proc, dir, socks })
}

async fn show(dir: &Path) -> Option<serde_json::Value> {
    hopmesh_node::ctl::request(dir, "show").await.ok()
}

fn peers_of(v: &serde_json::Value) -> usize {
    v["peers"].as_array().map_or(0, Vec::len)
}

/// Runs stage 2: `real` real nodes (`n0`, `n1`, …) and `p.nodes - real` simulated ones, one
/// segment, every node serving a service; the second real node's service is a real backend.
pub async fn run(p: &Params, real: usize) -> Result<RealResult> {
    if real < 2 || p.nodes <= real {
        bail!("stage 2 needs at least 2 real nodes and more nodes than that");
    }
    let work = tempfile::tempdir()?;
    let backend = Backend::start(work.path())?;
    let node_bin = p.bin.join("hopmesh-node");
    let node_digest = hex::encode(sha2::Sha256::digest(
        std::fs::read(&node_bin).with_context(|| format!("read {}", node_bin.display()))?,
    ));
    let shape = Shape {
        nodes: p.nodes,
        peers: p.nodes - 1,
        extra_allows: Vec::new(),
        measurements: vec![hex::encode(sim_measurement().0), node_digest],
        backend_port_base: 30_000,
        backends: BTreeMap::from([(1, backend.addr)]),
    };
    let v = Arc::new(Verifier::start(p, work.path(), &shape)?);
    let pins_path = work.path().join("pins.json");
    std::fs::write(&pins_path, serde_json::to_string(&v.pins)?)?;
    let (secrets, _) = join_tokens(&v, p.nodes).await?;
    let mut out = RealResult {
        nodes: p.nodes,
        real,
        ..RealResult::default()
    };
    // The real nodes first: they then take every other enrolment as a table update.
    let mut reals = Vec::new();
    for (i, s) in secrets.iter().enumerate().take(real) {
        reals.push(start_node(
            &p.bin,
            work.path(),
            &Shape::name(i),
            &hex::encode(s.expose()),
            &v.node_addr.to_string(),
            &pins_path,
        )?);
    }
    for n in &reals {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = show(&n.dir)
                .await
                .is_some_and(|s| s["self_permit"].is_null() && s["verifier_connected"] == true);
            if ready {
                break;
            }
            if Instant::now() >= end {
                bail!("real node {} did not become ready in 60 s", n.proc.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "sim stage 2: {real} real nodes ready; enrolling {} simulated",
        p.nodes - real
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (_burst_tx, burst) = watch::channel(0u64);
    let keys = v.pins.key_set()?;
    let ctx = Arc::new(Ctx {
        endpoints: node::endpoints(p.nodes)?,
        burst_gate: Semaphore::new(node::BURST_CONCURRENCY),
        verifiers: vec![v.node_addr],
        pins: v.pins.clone(),
        measurement: sim_measurement(),
        enroll_gate: Semaphore::new(p.concurrency.max(1)),
        shutdown,
        burst,
        burst_refreshes: 0,
    });
    let slots: Vec<Slot> = (0..p.nodes)
        .map(|_| Slot::new(Consumer::new(keys.clone())))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for (i, secret) in secrets.into_iter().enumerate().skip(real) {
        tasks.spawn(node::run(ctx.clone(), i, secret, slots[i].clone()));
    }
    let all = wait_for(p.enroll_timeout, || {
        slots.iter().skip(real).all(|s| {
            let s = s.lock();
            s.subscribed_at.is_some() || s.stopped
        })
    })
    .await;
    out.enrol_s = t0.elapsed().as_secs_f64();
    let failed = slots
        .iter()
        .skip(real)
        .filter(|s| s.lock().subscribed_at.is_none())
        .count();
    if !all || failed > 0 {
        out.failures.push(format!(
            "{failed} simulated nodes did not enrol and subscribe"
        ));
    }
    eprintln!(
        "sim stage 2: simulated nodes subscribed in {:.1} s",
        out.enrol_s
    );
    let t1 = Instant::now();
    let want = p.nodes - 1;
    let end = Instant::now() + p.propagation_timeout.max(Duration::from_secs(60));
    loop {
        let mut listed = Vec::new();
        for n in &reals {
            listed.push(show(&n.dir).await.map_or(0, |s| peers_of(&s)));
        }
        out.peers_listed = listed;
        if out.peers_listed.iter().all(|&c| c == want) || Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out.tables_s = t1.elapsed().as_secs_f64();
    for (i, &c) in out.peers_listed.iter().enumerate() {
        if c != want {
            out.failures
                .push(format!("real node n{i} lists {c} peers, not {want}"));
        }
    }
    let via = Via::Socks {
        proxy: reals[0].socks,
        host: "v1.s0.mesh".into(),
        port: 80,
    };
    let mut buf = vec![0u8; 64 * 1024];
    match tokio::time::timeout(
        Duration::from_secs(30),
        load::fetch(&via, FETCH_BYTES, &mut buf),
    )
    .await
    {
        Ok(Ok(d)) => {
            out.reached = true;
            out.fetch_ms = d.as_secs_f64() * 1e3;
        }
        Ok(Err(e)) => out
            .failures
            .push(format!("n0 could not reach v1.s0.mesh through SOCKS: {e}")),
        Err(_) => out
            .failures
            .push("n0's fetch of v1.s0.mesh timed out (30 s)".into()),
    }
    out.verifier_rss = rss_bytes(v.proc.pid()).unwrap_or(0);
    out.node_rss = reals
        .iter()
        .map(|n| rss_bytes(n.proc.pid()).unwrap_or(0))
        .collect();
    for s in slots.iter().skip(real) {
        let s = s.lock();
        for e in s.consumer.violations.iter().chain(&s.errors) {
            if out.failures.len() < 12 {
                out.failures.push(format!("simulated node: {e}"));
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    ctx.close();
    drop(reals);
    drop(backend);
    Ok(out)
}
