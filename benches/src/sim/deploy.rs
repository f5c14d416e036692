//! The verifiers a simulator size runs against: one on its SQLite store, or replicas on one
//! database of a throwaway PostgreSQL cluster, made with the verifier's own commands; their
//! work directories; and stopping all of it on a signal.

#[path = "../../../verifier/src/store/pg_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg_cluster;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result, bail};
use hopmesh_transport::pins::Pins;
use hopmesh_verifier::admin::AdminClient;
use hopmesh_verifier::datadir::DataDir;

use super::shape::Shape;
use super::{Params, run_ok};
use crate::procs::{CpuTime, Proc, cpu_time, rss_bytes};
use pg_cluster::PgCluster;

/// A running verifier for the simulator.
pub(super) struct Verifier {
    pub(super) proc: Proc,
    pub(super) node_addr: SocketAddr,
    pub(super) admin: AdminClient,
    pub(super) pins: Pins,
    pub(super) policy_path: PathBuf,
    pub(super) log: PathBuf,
}

/// The `hopmesh-verifier` binary in `p.bin`.
pub(super) fn verifier_bin(p: &Params) -> Result<PathBuf> {
    let vbin = p.bin.join("hopmesh-verifier");
    if !vbin.exists() {
        bail!(
            "{} not found: build with `cargo build --release --bins`",
            vbin.display()
        );
    }
    Ok(vbin)
}

/// `hopmesh-verifier --data-dir vdir init` on `store` (None: SQLite), or with `replica_of`
/// (bundle, passphrase file) a replica of the verifier that exported the bundle; the pins it
/// printed.
fn init(
    vbin: &Path,
    vdir: &Path,
    store: Option<&str>,
    replica_of: Option<(&Path, &Path)>,
) -> Result<Pins> {
    let mut cmd = Command::new(vbin);
    cmd.arg("--data-dir").arg(vdir).arg("init");
    if let Some((bundle, pass)) = replica_of {
        cmd.arg("--replica-of")
            .arg(bundle)
            .arg("--passphrase-file")
            .arg(pass);
    }
    if let Some(url) = store {
        // In the environment, as the CLI asks: a password in the URL stays out of `ps`.
        cmd.env("HOPMESH_VERIFIER_STORE", url);
    }
    let pins_text = run_ok(&mut cmd)?;
    serde_json::from_str(&pins_text).context("verifier init pins")
}

impl Verifier {
    /// One verifier on its SQLite store.
    pub(super) fn start(p: &Params, work: &Path, shape: &Shape) -> Result<Self> {
        let vbin = verifier_bin(p)?;
        let vdir = work.join("verifier");
        let policy_path = work.join("policy.toml");
        std::fs::write(&policy_path, shape.policy())?;
        let pins = init(&vbin, &vdir, None, None)?;
        Self::serve(
            p,
            &vbin,
            &vdir,
            &policy_path,
            pins,
            None,
            "verifier",
            &work.join("verifier.log"),
        )
    }

    /// `hopmesh-verifier --data-dir vdir serve` on `store` (None: SQLite), loopback only.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve(
        p: &Params,
        vbin: &Path,
        vdir: &Path,
        policy_path: &Path,
        pins: Pins,
        store: Option<&str>,
        name: &str,
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new(vbin);
        cmd.arg("--data-dir")
            .arg(vdir)
            .arg("serve")
            .arg("--policy")
            .arg(policy_path)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--epoch", &p.epoch.to_string()])
            .args(["--generation", &p.generation.to_string()])
            .args(["--attestation-ttl", &p.ttl.to_string()])
            .env("HOPMESH_LOG", "warn");
        if let Some(url) = store {
            cmd.env("HOPMESH_VERIFIER_STORE", url);
        }
        let mut proc = Proc::spawn(name, &mut cmd, log)?;
        let out = proc.stdout().context("verifier stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.is_empty() {
            bail!("{name} printed nothing (see {})", log.display());
        }
        let started: serde_json::Value = serde_json::from_str(&line)?;
        let node_addr = started["node_addr"]
            .as_str()
            .context("verifier did not print node_addr")?
            .parse()?;
        let admin_addr = started["admin_addr"]
            .as_str()
            .context("verifier did not print admin_addr")?;
        let token = DataDir::new(vdir).admin_token()?;
        Ok(Self {
            proc,
            node_addr,
            admin: AdminClient::new(admin_addr, &token),
            pins,
            policy_path: policy_path.to_owned(),
            log: log.to_owned(),
        })
    }

    pub(super) async fn call(
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

/// The PostgreSQL cluster of a replicas run. Held here, not on a stack, so that
/// [`stop_on_signal`] can stop it too; a [`ClusterGuard`] stops it when dropped.
static CLUSTER: Mutex<Option<PgCluster>> = Mutex::new(None);

fn cluster_slot() -> MutexGuard<'static, Option<PgCluster>> {
    CLUSTER.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Work directories of the running sizes, removed by [`stop_on_signal`] (a signal skips the
/// `TempDir`'s drop).
static WORK_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn work_dirs() -> MutexGuard<'static, Vec<PathBuf>> {
    WORK_DIRS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A size's work directory (removed when dropped), known to [`stop_on_signal`].
pub(super) struct WorkDir(tempfile::TempDir);

impl WorkDir {
    pub(super) fn new() -> Result<Self> {
        let d = tempfile::tempdir()?;
        work_dirs().push(d.path().to_owned());
        Ok(Self(d))
    }

    pub(super) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let p = self.0.path().to_owned();
        work_dirs().retain(|d| *d != p);
    }
}

/// The text of a caught panic (pg_cluster.rs reports a failed `initdb`, `pg_ctl` or
/// `createdb` by panicking, as test support does).
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".into())
}

/// The running throwaway cluster (`fsync` on); stopped (`pg_ctl stop -m immediate`) and
/// removed when dropped.
#[derive(Debug)]
struct ClusterGuard;

impl ClusterGuard {
    fn start() -> Result<Self> {
        let cluster = std::panic::catch_unwind(PgCluster::start_durable)
            .map_err(|e| anyhow::anyhow!("start PostgreSQL: {}", panic_text(&*e)))?
            .context("replicas need PostgreSQL, and HOPMESH_SKIP_POSTGRES=1 is set")?;
        let mut slot = cluster_slot();
        if slot.is_some() {
            bail!("a PostgreSQL cluster of this run is already up");
        }
        *slot = Some(cluster);
        Ok(Self)
    }

    /// A fresh database's URL (over the cluster's unix socket).
    fn database(&self) -> Result<String> {
        let slot = cluster_slot();
        let c = slot.as_ref().context("the cluster is gone")?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.fresh_database()))
            .map_err(|e| anyhow::anyhow!("createdb: {}", panic_text(&*e)))
    }

    /// The cluster's directory (its socket's, from the socket URL).
    fn dir(&self) -> Option<PathBuf> {
        let url = cluster_slot().as_ref()?.socket_url("x");
        let host = url
            .strip_prefix("postgresql://postgres@")?
            .split(':')
            .next()?;
        Some(PathBuf::from(host.replace("%2F", "/")))
    }

    /// The postmaster's pid (its CPU and its backends' are the database's), from
    /// `postmaster.pid` in the cluster's data directory.
    fn postmaster_pid(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(self.dir()?.join("data/postmaster.pid")).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        drop(cluster_slot().take());
    }
}

/// On SIGTERM, SIGINT or SIGHUP: kill every process this one started (its descendants, by
/// pid), stop the PostgreSQL cluster of a replicas run, then exit (status 143). Without it a
/// signal would end this process without running the `Drop`s that stop them (the cluster's
/// server is not a descendant: `pg_ctl` detaches it).
pub fn stop_on_signal(rt: &tokio::runtime::Runtime) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = rt.block_on(async { signal(SignalKind::terminate()) })?;
    let mut int = rt.block_on(async { signal(SignalKind::interrupt()) })?;
    let mut hup = rt.block_on(async { signal(SignalKind::hangup()) })?;
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        let me = std::process::id();
        let pids: Vec<String> = crate::procs::tree(&[me])
            .into_iter()
            .filter(|&p| p != me)
            .map(|p| p.to_string())
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).status();
        }
        drop(cluster_slot().take());
        for d in work_dirs().drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
        eprintln!("hopmesh-bench: stopped by a signal; child processes and PostgreSQL stopped");
        std::process::exit(143);
    });
    Ok(())
}

/// The verifiers of one size and, for replicas, their database. Fields drop in order: the
/// verifiers before the cluster.
pub(super) struct Deployment {
    /// Replica 0 first: join tokens, revocations and the policy reload go through it.
    pub(super) verifiers: Vec<Arc<Verifier>>,
    /// The database server's postmaster (replicas only).
    db_pid: Option<u32>,
    /// The PostgreSQL cluster (replicas only).
    _cluster: Option<ClusterGuard>,
}

impl Deployment {
    /// One verifier on SQLite.
    pub(super) fn sqlite(p: &Params, work: &Path, shape: &Shape) -> Result<Self> {
        Ok(Self {
            verifiers: vec![Arc::new(Verifier::start(p, work, shape)?)],
            db_pid: None,
            _cluster: None,
        })
    }

    /// `p.replicas` replicas on one fresh database of a throwaway cluster, made as an operator
    /// makes them: `init` on the database and `serve` for the first; `replica export` from it;
    /// `init --replica-of` and `serve` for each other. One policy file for all (the first
    /// replica's becomes the database's; the others serve the database's).
    pub(super) fn replicas(p: &Params, work: &Path, shape: &Shape) -> Result<Self> {
        let vbin = verifier_bin(p)?;
        let cluster = ClusterGuard::start()?;
        let url = cluster.database()?;
        let db_pid = cluster.postmaster_pid();
        eprintln!(
            "sim: PostgreSQL cluster in {} (postmaster {})",
            cluster.dir().unwrap_or_default().display(),
            db_pid.map_or("?".into(), |p| p.to_string())
        );
        if db_pid.is_none() {
            eprintln!("sim: the PostgreSQL postmaster's pid not found: its CPU is not counted");
        }
        let mut dep = Self {
            verifiers: Vec::new(),
            db_pid,
            _cluster: Some(cluster),
        };
        let policy_path = work.join("policy.toml");
        std::fs::write(&policy_path, shape.policy())?;
        let serve = |k: usize, dir: &Path, pins: Pins| {
            Verifier::serve(
                p,
                &vbin,
                dir,
                &policy_path,
                pins,
                Some(&url),
                &format!("verifier-{k}"),
                &work.join(format!("verifier-{k}.log")),
            )
        };
        let first = work.join("verifier-0");
        let pins = init(&vbin, &first, Some(&url), None)?;
        dep.verifiers
            .push(Arc::new(serve(0, &first, pins.clone())?));
        let pass = work.join("bundle.pass");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pass)?;
            f.write_all(b"the simulator's replica bundle passphrase\n")?;
        }
        let bundle = work.join("replica.bundle");
        run_ok(
            Command::new(&vbin)
                .arg("--data-dir")
                .arg(&first)
                .args(["replica", "export", "--out"])
                .arg(&bundle)
                .arg("--passphrase-file")
                .arg(&pass),
        )?;
        let want = serde_json::to_value(&pins)?;
        for k in 1..p.replicas {
            let dir = work.join(format!("verifier-{k}"));
            let theirs = init(&vbin, &dir, Some(&url), Some((&bundle, &pass)))?;
            if serde_json::to_value(&theirs)? != want {
                bail!("replica {k} printed pins other than replica 0's");
            }
            // Nodes at this replica get replica 0's pins: its certificate must pass with them.
            dep.verifiers.push(Arc::new(serve(k, &dir, pins.clone())?));
        }
        Ok(dep)
    }

    pub(super) fn pids(&self) -> Vec<u32> {
        self.verifiers.iter().map(|v| v.proc.pid()).collect()
    }

    pub(super) fn node_addrs(&self) -> Vec<SocketAddr> {
        self.verifiers.iter().map(|v| v.node_addr).collect()
    }

    /// Resident memory of all verifiers.
    pub(super) fn rss(&self) -> Result<u64> {
        Ok(self.each_rss()?.iter().sum())
    }

    /// Resident memory of each verifier.
    pub(super) fn each_rss(&self) -> Result<Vec<u64>> {
        self.verifiers
            .iter()
            .map(|v| rss_bytes(v.proc.pid()))
            .collect()
    }

    /// CPU of the database server (zero without one).
    pub(super) fn db_cpu(&self, ticks: f64) -> CpuTime {
        self.db_pid
            .map_or_else(CpuTime::default, |pid| cpu_time(&[pid], ticks))
    }

    /// ERROR and WARN lines in the verifiers' logs (counted), and the first few of each.
    pub(super) fn log_lines(&self) -> (usize, usize, Vec<String>) {
        let (mut errors, mut warnings) = (0, 0);
        let mut first = Vec::new();
        for v in &self.verifiers {
            let text = std::fs::read_to_string(&v.log).unwrap_or_default();
            for l in text.lines() {
                let n = if l.contains("ERROR") {
                    &mut errors
                } else if l.contains("WARN") {
                    &mut warnings
                } else {
                    continue;
                };
                *n += 1;
                if *n <= 3 {
                    first.push(format!("{}: {}", v.proc.name, l.trim()));
                }
            }
        }
        (errors, warnings, first)
    }
}
