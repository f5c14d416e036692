//! `hopmesh-bench`: the end-to-end benchmark of the performance issue.
//!
//! `run` starts the backend, OpenSSH (`sshd` + `ssh -tt -D`) and hopmesh meshes as real
//! processes on loopback, runs workloads 1–4, 6, 7 and 8 with the systems interleaved in every
//! round, and writes `results.json`, `results.md` and SVG plots. Workload 5 (lossy link) needs
//! network namespaces and runs from `netns/run.sh bench_lossy`, which adds its figures to the same
//! `results.json`; `report` re-renders the markdown and plots. `benches/run.sh` does it all.

use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hopmesh_benches::load::{self, Via};
use hopmesh_benches::procs::{clock_ticks, cpu_time, rss_bytes};
use hopmesh_benches::results::{Results, ScalePoint, system as sys};
use hopmesh_benches::stats::{percentile, sorted_ms};
use hopmesh_benches::systems::{Backend, Mesh, MeshSpec, Ssh};
use hopmesh_benches::{report, stats};

#[derive(Parser)]
#[command(about = "End-to-end benchmark: direct TCP vs ssh -D vs hopmesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The backend byte source (prints its address, serves until killed).
    Backend,
    /// Runs the loopback workloads and writes the results and report into `--out`.
    Run {
        /// Output directory.
        #[arg(long, default_value = "benches/results/latest")]
        out: PathBuf,
        /// Directory with hopmesh-node and hopmesh-verifier (default: next to this binary).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Rounds of each workload (systems interleaved within every round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Small sizes and one round: checks the harness end to end in seconds.
        #[arg(long)]
        quick: bool,
        /// Skip ssh (only where OpenSSH cannot be installed; the report then marks its
        /// comparisons "not run").
        #[arg(long)]
        no_ssh: bool,
        /// Mesh sizes of the scale workload (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10,20,40")]
        scale: Vec<usize>,
        /// Skip the scale workload.
        #[arg(long)]
        no_scale: bool,
        /// Loopback workloads to run (comma-separated subset of w1,w2,w3,w4,w6,w7,w9).
        #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4,w6,w7,w9")]
        only: Vec<String>,
    },
    /// Starts the backend and a 2-node mesh, prints how to reach it, and holds until killed
    /// (for profiling: `perf record -p <node pids>` while driving load through it).
    Mesh {
        /// Directory with hopmesh-node and hopmesh-verifier (default: next to this binary).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Hop-token epoch in seconds.
        #[arg(long, default_value_t = 10)]
        epoch: u64,
        /// The nodes' `socks_reply` (`early` or `after_connect`).
        #[arg(long, default_value = "early")]
        socks_reply: String,
        /// Three nodes, the first reaching the service through the second (a relay).
        #[arg(long)]
        relayed: bool,
    },
    /// Downloads through a SOCKS5 proxy (or directly) and prints MB/s: load for profiling.
    Load {
        /// SOCKS5 proxy; without it, `--target` is reached directly.
        #[arg(long)]
        socks: Option<std::net::SocketAddr>,
        /// Destination host (a name or IP) and port.
        #[arg(long, default_value = "svc.bench.mesh:80")]
        target: String,
        /// Bytes per download.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Parallel downloads.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Instead: this many short requests (`--bytes` each, new connection each) from
        /// `--streams` concurrent clients; prints requests/s.
        #[arg(long)]
        requests: Option<usize>,
    },
    /// Re-renders results.md and the plots from results.json in `--out`.
    Report {
        /// Output directory.
        #[arg(long, default_value = "benches/results/latest")]
        out: PathBuf,
    },
    /// The control-plane simulator: N simulated nodes against one real verifier; writes
    /// sim.json, sim.md and plots into `--out`. Exits non-zero if any push was lost,
    /// truncated or reordered, or any revocation or table update missed a subscriber.
    Sim {
        /// Output directory.
        #[arg(long, default_value = "benches/results/latest")]
        out: PathBuf,
        /// Directory with hopmesh-verifier (default: next to this binary).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Mesh sizes, one verifier each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100")]
        nodes: Vec<usize>,
        /// Peers per node (segments of peers + 1 nodes).
        #[arg(long, default_value_t = 99)]
        peers: usize,
        /// Attestation TTL in seconds (nodes refresh at half of it; 10 to 86400).
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Seed generation in seconds (10 to 86400).
        #[arg(long, default_value_t = 20)]
        generation: u64,
        /// Hop-token epoch in seconds.
        #[arg(long, default_value_t = 10)]
        epoch: u64,
        /// Enrolments in flight at once (the verifier admits 16 unauthenticated connections
        /// per source address).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Steady phase in seconds (default: two generations).
        #[arg(long)]
        steady: Option<u64>,
        /// Refreshes per node in the burst phase (0: none).
        #[arg(long, default_value_t = 5)]
        burst: u64,
        /// Revocations timed one at a time.
        #[arg(long, default_value_t = 5)]
        revocations: usize,
        /// Skip the revocation timed at a seed-rotation edge.
        #[arg(long)]
        no_rotation_revocation: bool,
        /// Skip the policy-reload phase.
        #[arg(long)]
        no_reload: bool,
        /// Seconds a revocation or table update may take to reach every node.
        #[arg(long, default_value_t = 30)]
        propagation_timeout: u64,
        /// Seconds enrolment of a whole mesh may take.
        #[arg(long, default_value_t = 3600)]
        enroll_timeout: u64,
        /// Inject a fault (the run must then fail): node 0 drops one push.
        #[arg(long, value_enum)]
        fault: Option<hopmesh_benches::sim::Fault>,
        /// Small and fast for CI: 50 nodes, 9 peers, TTL 10 s, generation 10 s, 11 s steady (one
        /// rotation), 10 s timeouts (other size flags are ignored).
        #[arg(long)]
        ci: bool,
        /// Stage 2 instead: this many real hopmesh-node processes in ONE segment of `--nodes`
        /// (the rest simulated), every node serving a service; checks `ctl show` lists every
        /// other node and the first reaches the second's service through SOCKS.
        #[arg(long)]
        real: Option<usize>,
        /// Verifier replicas on one PostgreSQL database (a throwaway cluster; needs Debian's
        /// `postgresql`): each size then runs twice in this invocation, first on one verifier
        /// on SQLite (the baseline), then on the replicas, node i at replica i % R, admin
        /// actions at replica 0. 1: one verifier on SQLite only.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        replicas: u16,
    },
    /// Adds one figure to results.json in `--out` (used by `netns/run.sh bench_lossy`).
    Add {
        /// Output directory.
        #[arg(long, default_value = "benches/results/latest")]
        out: PathBuf,
        /// Workload key.
        #[arg(long)]
        workload: String,
        /// System name.
        #[arg(long)]
        system: String,
        /// Metric with unit.
        #[arg(long)]
        metric: String,
        /// The value.
        #[arg(long)]
        value: f64,
    },
}

/// Workload sizes.
struct Sizes {
    w1_bytes: u64,
    short_bytes: u64,
    w2_requests: usize,
    w3_requests: usize,
    w3_clients: usize,
    w4_streams: usize,
    w4_bytes: u64,
    idle_conns: usize,
    revocations: usize,
}

const FULL: Sizes = Sizes {
    w1_bytes: 1 << 30,
    short_bytes: 1024,
    w2_requests: 500,
    w3_requests: 10_000,
    w3_clients: 100,
    w4_streams: 100,
    w4_bytes: 10 << 20,
    idle_conns: 1000,
    revocations: 5,
};

const QUICK: Sizes = Sizes {
    w1_bytes: 32 << 20,
    short_bytes: 1024,
    w2_requests: 20,
    w3_requests: 200,
    w3_clients: 10,
    w4_streams: 10,
    w4_bytes: 1 << 20,
    idle_conns: 50,
    revocations: 2,
};

const MB: f64 = 1e6;
const GIB: f64 = (1u64 << 30) as f64;

struct Sys {
    name: &'static str,
    via: Via,
    pids: Vec<u32>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Backend => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                println!("{}", l.local_addr()?);
                std::io::stdout().flush()?;
                load::serve_backend(l).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Sim {
            out,
            bin,
            nodes,
            peers,
            ttl,
            generation,
            epoch,
            concurrency,
            steady,
            burst,
            revocations,
            no_rotation_revocation,
            no_reload,
            propagation_timeout,
            enroll_timeout,
            fault,
            ci,
            real,
            replicas,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            // Also stops the PostgreSQL cluster of a replicas run.
            hopmesh_benches::sim::stop_on_signal(&rt)?;
            let bin = bin_dir(bin)?;
            let mut p = hopmesh_benches::sim::Params {
                bin,
                nodes: 0,
                peers,
                ttl,
                generation,
                epoch,
                concurrency,
                steady_secs: steady.unwrap_or(2 * generation),
                burst,
                revocations,
                rotation_revocation: !no_rotation_revocation,
                reload: !no_reload,
                propagation_timeout: Duration::from_secs(propagation_timeout),
                enroll_timeout: Duration::from_secs(enroll_timeout),
                fault,
                replicas: usize::from(replicas),
            };
            let sizes = if ci {
                p.peers = 9;
                p.ttl = 10;
                p.generation = 10;
                p.steady_secs = 11;
                p.burst = 2;
                p.revocations = 3;
                p.propagation_timeout = Duration::from_secs(10);
                p.enroll_timeout = Duration::from_secs(60);
                vec![50]
            } else {
                nodes
            };
            if let Err(e) = hopmesh_benches::sim::run_all(&rt, &p, &sizes, real, &out) {
                // One line, no backtrace: CI shows why the run failed.
                eprintln!("hopmesh-bench sim: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Mesh {
            bin,
            epoch,
            socks_reply,
            relayed,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            hopmesh_benches::procs::stop_children_on_signal(&rt)?;
            let bin = bin_dir(bin)?;
            let work = tempfile::tempdir()?;
            let backend = Backend::start(work.path())?;
            let mesh = Mesh::start(
                &bin,
                &work.path().join("mesh"),
                &MeshSpec {
                    nodes: if relayed { 3 } else { 2 },
                    epoch,
                    generation: 300,
                    ttl: 300,
                    backend: backend.addr,
                    node_extra: format!("socks_reply = {socks_reply:?}\n"),
                    relayed,
                },
            )?;
            let show = |n: &hopmesh_benches::systems::MeshNode| {
                format!(
                    "{} pid {} data dir {}",
                    n.name,
                    n.proc.pid(),
                    n.data_dir.display()
                )
            };
            println!("backend {} (pid {})", backend.addr, backend.proc.pid());
            println!("socks {} -> svc.bench.mesh", mesh.nodes[0].socks);
            for n in &mesh.nodes {
                println!("{}", show(n));
            }
            std::io::stdout().flush()?;
            // Until a signal: the handler kills the children and exits.
            rt.block_on(std::future::pending::<()>());
            Ok(())
        }
        Cmd::Load {
            socks,
            target,
            bytes,
            streams,
            requests,
        } => {
            let (host, port) = target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .context("--target must be host:port")?;
            let via = match socks {
                Some(proxy) => Via::Socks { proxy, host, port },
                None => Via::Direct(target.parse().context("direct --target must be ip:port")?),
            };
            let rt = tokio::runtime::Runtime::new()?;
            if let Some(n) = requests {
                let (lat, wall) = rt.block_on(load::concurrent(&via, streams.max(1), n, bytes))?;
                let ms = sorted_ms(&lat);
                println!(
                    "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
                    lat.len() as f64 / wall.as_secs_f64(),
                    percentile(&ms, 50.0).unwrap_or(0.0),
                    percentile(&ms, 99.0).unwrap_or(0.0)
                );
                return Ok(());
            }
            let wall = rt.block_on(load::parallel(&via, streams.max(1), bytes))?;
            let total = bytes as f64 * streams.max(1) as f64;
            println!(
                "{:.1} MB/s ({total} bytes in {:.3} s)",
                total / MB / wall.as_secs_f64(),
                wall.as_secs_f64()
            );
            Ok(())
        }
        Cmd::Report { out } => {
            let mut r = read_results(&out)?;
            r.compact();
            write_results(&r, &out)?;
            report::write(&r, &out)?;
            println!("{}", out.join("results.md").display());
            Ok(())
        }
        Cmd::Add {
            out,
            workload,
            system,
            metric,
            value,
        } => {
            if !value.is_finite() {
                bail!("value must be a finite number");
            }
            let mut r = read_results(&out)?;
            r.push(&workload, &system, &metric, value);
            write_results(&r, &out)
        }
        Cmd::Run {
            out,
            bin,
            rounds,
            quick,
            no_ssh,
            scale,
            no_scale,
            only,
        } => {
            if let Some(bad) = only
                .iter()
                .find(|w| !["w1", "w2", "w3", "w4", "w6", "w7", "w9"].contains(&w.as_str()))
            {
                bail!(
                    "--only: unknown workload `{bad}` (w5 runs from `netns/run.sh bench_lossy`, w8 is --scale)"
                );
            }
            let scale = if no_scale { vec![] } else { scale };
            let bin = bin_dir(bin)?;
            let (sizes, rounds) = if quick {
                (QUICK, 1)
            } else {
                (FULL, rounds.max(1))
            };
            run(&out, &bin, rounds, &sizes, quick, no_ssh, &scale, &only)
        }
    }
}

fn bin_dir(bin: Option<PathBuf>) -> Result<PathBuf> {
    match bin {
        Some(b) => Ok(b),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .to_owned()),
    }
}

fn read_results(out: &Path) -> Result<Results> {
    let path = out.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (run `hopmesh-bench run` first)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn write_results(r: &Results, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let tmp = out.join("results.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(r)?)?;
    std::fs::rename(&tmp, out.join("results.json"))?;
    Ok(())
}

fn cmd_line(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn run(
    out: &Path,
    bin: &Path,
    rounds: usize,
    z: &Sizes,
    quick: bool,
    no_ssh: bool,
    scale: &[usize],
    only: &[String],
) -> Result<()> {
    let on = |w: &str| only.iter().any(|o| o == w);
    std::fs::create_dir_all(out)?;
    let work = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    hopmesh_benches::procs::stop_children_on_signal(&rt)?;
    let ticks = clock_ticks();
    let mut r = Results::default();
    r.meta
        .insert("date".into(), cmd_line("date -u +%Y-%m-%dT%H:%M:%SZ"));
    r.meta.insert(
        "cpu".into(),
        cmd_line("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    );
    r.meta.insert("cores".into(), cmd_line("nproc"));
    r.meta.insert("kernel".into(), cmd_line("uname -r"));
    r.meta.insert("openssh".into(), cmd_line("ssh -V 2>&1"));
    r.meta.insert("rounds".into(), rounds.to_string());
    r.meta.insert(
        "mode".into(),
        if quick {
            "quick (small sizes: a harness check, not a result)"
        } else {
            "full"
        }
        .into(),
    );

    let backend = Backend::start(work.path())?;
    eprintln!("backend on {}", backend.addr);
    let mesh_spec = |epoch| MeshSpec {
        nodes: 2,
        epoch,
        generation: 300,
        ttl: 300,
        backend: backend.addr,
        node_extra: String::new(),
        relayed: false,
    };
    let main_mesh = Mesh::start(bin, &work.path().join("mesh"), &mesh_spec(10))?;
    eprintln!("hopmesh mesh up");

    // Workload 7 first, on a fresh mesh: idle RSS, then 1 000 idle connections.
    if on("w7") {
        workload7(&rt, &main_mesh, z, &mut r)?;
    }

    let e1 = Mesh::start(bin, &work.path().join("mesh-e1"), &mesh_spec(1))?;
    let e60 = Mesh::start(bin, &work.path().join("mesh-e60"), &mesh_spec(60))?;
    // The SOCKS reply after the backend connect (one more tunnel round trip), against the
    // default early reply of the main mesh: w2 and w3.
    let after_connect = MeshSpec {
        node_extra: "socks_reply = \"after_connect\"\n".into(),
        ..mesh_spec(10)
    };
    let after_connect = Mesh::start(bin, &work.path().join("mesh-after"), &after_connect)?;
    // Workload 9: the same workloads through a relay (n0 → n1 → n2), sealed end to end.
    let relayed_mesh = if on("w9") {
        let spec = MeshSpec {
            nodes: 3,
            relayed: true,
            ..mesh_spec(10)
        };
        Some(Mesh::start(bin, &work.path().join("mesh-relayed"), &spec)?)
    } else {
        None
    };
    let ssh = if no_ssh {
        None
    } else {
        Some(Ssh::start(work.path(), backend.addr)?)
    };
    eprintln!("all systems up");

    let mut systems = vec![Sys {
        name: sys::DIRECT,
        via: Via::Direct(backend.addr),
        pids: vec![],
    }];
    if let Some(s) = &ssh {
        systems.push(Sys {
            name: sys::SSH,
            via: Via::Socks {
                proxy: s.socks,
                host: backend.addr.ip().to_string(),
                port: backend.addr.port(),
            },
            pids: s.pids(),
        });
    }
    systems.push(Sys {
        name: sys::HOPMESH,
        via: main_mesh.via(),
        pids: main_mesh.data_path_pids(),
    });
    let rotation = [
        Sys {
            name: sys::HOPMESH_E1,
            via: e1.via(),
            pids: e1.data_path_pids(),
        },
        Sys {
            name: sys::HOPMESH_E60,
            via: e60.via(),
            pids: e60.data_path_pids(),
        },
    ];

    let reply_modes = [Sys {
        name: sys::HOPMESH_AFTER_CONNECT,
        via: after_connect.via(),
        pids: after_connect.data_path_pids(),
    }];
    let relayed: Vec<(Sys, u32)> = relayed_mesh
        .iter()
        .map(|m| {
            (
                Sys {
                    name: sys::HOPMESH_RELAYED,
                    via: m.via(),
                    pids: m.data_path_pids(),
                },
                m.nodes[1].proc.pid(),
            )
        })
        .collect();

    // Warm-up, not measured: every system moves bytes once before round 1, so no round
    // measures a cold path (first-use page faults, congestion and MTU state still starting).
    eprintln!("warm-up");
    for s in systems
        .iter()
        .chain(&rotation)
        .chain(&reply_modes)
        .chain(relayed.iter().map(|(s, _)| s))
    {
        warm_up(&rt, s, z)?;
    }
    for round in 0..rounds {
        eprintln!("round {} of {rounds}", round + 1);
        let order = |n: usize| (0..n).map(move |i| (i + round) % n);
        for i in order(systems.len()).filter(|_| on("w1")) {
            w1(&rt, &systems[i], z, ticks, "w1", "MB/s", &mut r)?;
        }
        // The reply modes interleave with the other systems (second in even rounds, last in
        // odd ones).
        let with_modes: Vec<&Sys> = {
            let mut v: Vec<&Sys> = order(systems.len()).map(|i| &systems[i]).collect();
            v.insert(if round % 2 == 0 { 1 } else { v.len() }, &reply_modes[0]);
            v
        };
        for s in with_modes.iter().filter(|_| on("w2")) {
            w2(&rt, s, z, &mut r)?;
        }
        for s in with_modes.iter().filter(|_| on("w3")) {
            w3(&rt, s, z, "w3", "req/s", &mut r)?;
        }
        for i in order(systems.len()).filter(|_| on("w4")) {
            w4(&rt, &systems[i], z, ticks, &mut r)?;
        }
        for i in order(rotation.len()).filter(|_| on("w6")) {
            w1(&rt, &rotation[i], z, ticks, "w6", "w1 MB/s", &mut r)?;
            w3(&rt, &rotation[i], z, "w6", "w3 req/s", &mut r)?;
        }
        for (s, relay) in &relayed {
            w9(&rt, s, *relay, z, ticks, &mut r)?;
        }
        write_results(&r, out)?;
    }
    // After all that traffic: has anything been refused or has memory grown?
    for n in [&main_mesh.nodes[0], &main_mesh.nodes[1]]
        .into_iter()
        .filter(|_| on("w7"))
    {
        r.push(
            "w7",
            sys::HOPMESH,
            &format!("{} RSS after the run MiB", role(n.name == "n0")),
            rss_bytes(n.proc.pid())? as f64 / (1 << 20) as f64,
        );
    }
    if let Some(m) = &relayed_mesh {
        // One extra hop's RTT, as QUIC measures it on the client node's connection to the relay.
        if let Some(rtt) = m.rtt_us(1) {
            r.push(
                "w9",
                sys::HOPMESH_RELAYED,
                "relay hop RTT ms",
                rtt as f64 / 1e3,
            );
        }
    }
    let mut meshes = vec![&main_mesh, &e1, &e60, &after_connect];
    meshes.extend(&relayed_mesh);
    check_no_refusals(&rt, &meshes)?;
    drop(relayed_mesh);
    drop(ssh);
    drop((e1, e60, after_connect, main_mesh));

    for &n in scale {
        eprintln!("scale: {n} nodes");
        let point = workload8(
            &rt,
            bin,
            &work.path().join(format!("scale-{n}")),
            n,
            z,
            backend.addr,
            ticks,
        )?;
        r.scale.push(point);
        write_results(&r, out)?;
    }
    write_results(&r, out)?;
    report::write(&r, out)?;
    println!("{}", out.join("results.md").display());
    Ok(())
}

fn role(client: bool) -> &'static str {
    if client {
        "client node"
    } else {
        "service node"
    }
}

/// One download of a tenth of workload 1 and a tenth of workload 3's requests; results dropped.
fn warm_up(rt: &tokio::runtime::Runtime, s: &Sys, z: &Sizes) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    rt.block_on(async {
        load::fetch(&s.via, z.w1_bytes / 10, &mut buf).await?;
        load::concurrent(&s.via, z.w3_clients, z.w3_requests / 10, z.short_bytes).await
    })
    .with_context(|| format!("warm-up through {}", s.name))?;
    Ok(())
}

fn w1(
    rt: &tokio::runtime::Runtime,
    s: &Sys,
    z: &Sizes,
    ticks: f64,
    workload: &str,
    metric: &str,
    r: &mut Results,
) -> Result<()> {
    let cpu0 = cpu_time(&s.pids, ticks);
    let mut buf = vec![0u8; 256 * 1024];
    let t = rt
        .block_on(load::fetch(&s.via, z.w1_bytes, &mut buf))
        .with_context(|| format!("{workload} through {}", s.name))?;
    let cpu = cpu_time(&s.pids, ticks).since(cpu0);
    r.push(
        workload,
        s.name,
        metric,
        z.w1_bytes as f64 / MB / t.as_secs_f64(),
    );
    if !s.pids.is_empty() && workload == "w1" {
        r.push(
            workload,
            s.name,
            "proxy CPU s/GiB",
            cpu / (z.w1_bytes as f64 / GIB),
        );
    }
    Ok(())
}

/// Workload 9, the relayed path: w1's stream (with the relay's CPU per GiB beside the end
/// nodes') and w2's sequential requests, through a relay.
fn w9(
    rt: &tokio::runtime::Runtime,
    s: &Sys,
    relay: u32,
    z: &Sizes,
    ticks: f64,
    r: &mut Results,
) -> Result<()> {
    let cpu0 = cpu_time(&[relay], ticks);
    w1(rt, s, z, ticks, "w9", "w1 MB/s", r)?;
    let cpu = cpu_time(&[relay], ticks).since(cpu0);
    r.push(
        "w9",
        s.name,
        "relay CPU s/GiB",
        cpu / (z.w1_bytes as f64 / GIB),
    );
    let lat = rt
        .block_on(load::sequential(&s.via, z.w2_requests, z.short_bytes))
        .with_context(|| format!("w9 through {}", s.name))?;
    let ms = sorted_ms(&lat);
    r.push(
        "w9",
        s.name,
        "w2 p50 ms",
        percentile(&ms, 50.0).unwrap_or(0.0),
    );
    r.push(
        "w9",
        s.name,
        "w2 p99 ms",
        percentile(&ms, 99.0).unwrap_or(0.0),
    );
    Ok(())
}

fn w2(rt: &tokio::runtime::Runtime, s: &Sys, z: &Sizes, r: &mut Results) -> Result<()> {
    let lat = rt
        .block_on(load::sequential(&s.via, z.w2_requests, z.short_bytes))
        .with_context(|| format!("w2 through {}", s.name))?;
    let total: f64 = lat.iter().map(Duration::as_secs_f64).sum();
    let ms = sorted_ms(&lat);
    r.push("w2", s.name, "p50 ms", percentile(&ms, 50.0).unwrap_or(0.0));
    r.push("w2", s.name, "p99 ms", percentile(&ms, 99.0).unwrap_or(0.0));
    r.push("w2", s.name, "total s", total);
    r.samples("w2", s.name, &ms);
    Ok(())
}

fn w3(
    rt: &tokio::runtime::Runtime,
    s: &Sys,
    z: &Sizes,
    workload: &str,
    metric: &str,
    r: &mut Results,
) -> Result<()> {
    let (lat, wall) = rt
        .block_on(load::concurrent(
            &s.via,
            z.w3_clients,
            z.w3_requests,
            z.short_bytes,
        ))
        .with_context(|| format!("{workload} through {}", s.name))?;
    let ms = sorted_ms(&lat);
    r.push(
        workload,
        s.name,
        metric,
        lat.len() as f64 / wall.as_secs_f64(),
    );
    if workload == "w3" {
        r.push("w3", s.name, "p50 ms", percentile(&ms, 50.0).unwrap_or(0.0));
        r.push("w3", s.name, "p99 ms", percentile(&ms, 99.0).unwrap_or(0.0));
        r.samples("w3", s.name, &ms);
    }
    Ok(())
}

fn w4(rt: &tokio::runtime::Runtime, s: &Sys, z: &Sizes, ticks: f64, r: &mut Results) -> Result<()> {
    let cpu0 = cpu_time(&s.pids, ticks);
    let wall = rt
        .block_on(load::parallel(&s.via, z.w4_streams, z.w4_bytes))
        .with_context(|| format!("w4 through {}", s.name))?;
    let cpu = cpu_time(&s.pids, ticks).since(cpu0);
    let bytes = z.w4_streams as f64 * z.w4_bytes as f64;
    r.push("w4", s.name, "MB/s", bytes / MB / wall.as_secs_f64());
    if !s.pids.is_empty() {
        r.push("w4", s.name, "proxy CPU s/GiB", cpu / (bytes / GIB));
    }
    Ok(())
}

fn workload7(rt: &tokio::runtime::Runtime, mesh: &Mesh, z: &Sizes, r: &mut Results) -> Result<()> {
    let (client, service) = (mesh.nodes[0].proc.pid(), mesh.nodes[1].proc.pid());
    let mib = |pid| rss_bytes(pid).map(|b| b as f64 / (1 << 20) as f64);
    // Idle: attested, connected to the verifier, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let (c0, s0) = (mib(client)?, mib(service)?);
    r.push("w7", sys::HOPMESH, "client node idle RSS MiB", c0);
    r.push("w7", sys::HOPMESH, "service node idle RSS MiB", s0);
    let via = mesh.via();
    let conns = rt
        .block_on(load::idle(&via, z.idle_conns))
        .context("w7: open idle connections")?;
    std::thread::sleep(Duration::from_millis(500));
    let scale = 1000.0 / z.idle_conns as f64;
    r.push(
        "w7",
        sys::HOPMESH,
        "client node +1000 conns MiB",
        (mib(client)? - c0) * scale,
    );
    r.push(
        "w7",
        sys::HOPMESH,
        "service node +1000 conns MiB",
        (mib(service)? - s0) * scale,
    );
    drop(conns);
    Ok(())
}

fn check_no_refusals(rt: &tokio::runtime::Runtime, meshes: &[&Mesh]) -> Result<()> {
    for m in meshes {
        for n in &m.nodes {
            let s = rt.block_on(hopmesh_node::ctl::request(&n.data_dir, "show"))?;
            let refused: u64 = s["counters"]["refused"]
                .as_object()
                .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
                .unwrap_or(0);
            if refused != 0 {
                bail!(
                    "node {} refused {refused} streams during the run: {}",
                    n.name,
                    s["counters"]
                );
            }
        }
    }
    Ok(())
}

/// `hopmesh_verifier_attestations_issued_total{kind="refresh"}` from the admin `/metrics`.
fn refreshes(mesh: &Mesh) -> Result<u64> {
    let addr = std::fs::read_to_string(mesh.verifier_dir.join("admin.addr"))?;
    let mut tcp = StdTcpStream::connect(addr.trim())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    text.lines()
        .find(|l| l.starts_with("hopmesh_verifier_attestations_issued_total{kind=\"refresh\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no refresh counter in the verifier's /metrics")
}

/// Wall-clock ms at which each node applied its first revocation list newer than `after`
/// (from its audit log).
fn applied_at(mesh: &Mesh, after: u64, skip: &[String]) -> Vec<Option<u64>> {
    mesh.nodes
        .iter()
        .filter(|n| !skip.contains(&n.name))
        .map(|n| {
            let log = std::fs::read_to_string(n.data_dir.join("audit.jsonl")).ok()?;
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| {
                    v["event"] == "revocation_list_applied"
                        && v["version"].as_u64().is_some_and(|x| x > after)
                })
                .and_then(|v| v["unix_ms"].as_u64())
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn workload8(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    work: &Path,
    n: usize,
    z: &Sizes,
    backend: std::net::SocketAddr,
    ticks: f64,
) -> Result<ScalePoint> {
    if n < z.revocations + 2 {
        bail!(
            "scale: a mesh of {n} nodes is too small for {} revocations",
            z.revocations
        );
    }
    // A 10 s attestation lifetime (the verifier's minimum): every node refreshes about every
    // 5 s, so the window below sees enough refreshes for the 10 ms resolution of the kernel's
    // CPU accounting.
    let ttl = 10;
    let window = Duration::from_secs(if z.revocations < FULL.revocations {
        10
    } else {
        30
    });
    let mesh = Mesh::start(
        bin,
        work,
        &MeshSpec {
            nodes: n,
            epoch: 10,
            generation: 300,
            ttl,
            backend,
            node_extra: String::new(),
            relayed: false,
        },
    )?;
    // Steady state: CPU of the verifier over a window of two refresh periods.
    std::thread::sleep(Duration::from_secs(2));
    let vpid = mesh.verifier.pid();
    let (cpu0, ref0) = (cpu_time(&[vpid], ticks), refreshes(&mesh)?);
    std::thread::sleep(window);
    let (cpu1, ref1) = (cpu_time(&[vpid], ticks), refreshes(&mesh)?);
    let refreshed = ref1.saturating_sub(ref0);
    if refreshed == 0 {
        bail!("scale {n}: no refresh in {window:?}");
    }
    let rss: Vec<f64> = mesh
        .nodes
        .iter()
        .map(|m| rss_bytes(m.proc.pid()).map(|b| b as f64 / (1 << 20) as f64))
        .collect::<Result<_>>()?;
    // Revocations: revoke n1, n2, …; every other node must apply each new list.
    let mut samples = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    for k in 1..=z.revocations {
        // n0 is never revoked: its view gives the list version before each revoke.
        let name = format!("n{k}");
        let before = rt.block_on(hopmesh_node::ctl::request(&mesh.nodes[0].data_dir, "show"))?;
        let version = before["revocation_version"].as_u64().unwrap_or(0);
        let t0 = unix_ms();
        mesh.vcli(&["revoke", &name])?;
        revoked.push(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        let times = loop {
            let times = applied_at(&mesh, version, &revoked);
            if times.iter().all(Option::is_some) || Instant::now() > deadline {
                break times;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let missing = times.iter().filter(|t| t.is_none()).count();
        if missing > 0 {
            bail!(
                "scale {n}: {missing} nodes did not apply a revocation list after v{version} within 10 s"
            );
        }
        samples.extend(
            times
                .into_iter()
                .flatten()
                .map(|t| t.saturating_sub(t0) as f64),
        );
    }
    samples.sort_by(f64::total_cmp);
    Ok(ScalePoint {
        nodes: n,
        verifier_cpu_ms_per_refresh: cpu1.since(cpu0) * 1e3 / refreshed as f64,
        refreshes: refreshed,
        node_rss_mib_mean: rss.iter().sum::<f64>() / rss.len() as f64,
        node_rss_mib_max: stats::Summary::of(&rss).map_or(0.0, |s| s.max),
        revocation_p50_ms: percentile(&samples, 50.0).unwrap_or(0.0),
        revocation_p99_ms: percentile(&samples, 99.0).unwrap_or(0.0),
        revocation_max_ms: samples.last().copied().unwrap_or(0.0),
        revocation_samples: samples.len(),
    })
}
