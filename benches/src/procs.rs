//! Child processes the benchmark starts (each killed when its guard drops) and what `/proc`
//! says about them: CPU time and resident memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// Pids of the live children, for [`stop_children_on_signal`].
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// On SIGTERM, SIGINT or SIGHUP: kill every live child, then exit (status 143). Without it a
/// signal would end this process without running the `Drop`s that stop its children.
pub fn stop_children_on_signal(rt: &tokio::runtime::Runtime) -> std::io::Result<()> {
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
        let pids = live().clone();
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        eprintln!("hopmesh-bench: stopped by a signal; child processes killed");
        std::process::exit(143);
    });
    Ok(())
}

/// A child process that is killed and reaped when dropped, so no run leaves processes behind.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for error messages.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Spawns `cmd` (stdin null, stdout piped, stderr appended to `log`).
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self::adopt(name, child))
    }

    /// Wraps an already spawned child.
    pub fn adopt(name: &str, child: Child) -> Self {
        live().push(child.id());
        Proc {
            name: name.into(),
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout, once.
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        live().retain(|p| *p != pid);
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (parent pid, user + system CPU ticks) of a process, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `roots` and all their live descendants.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok())
                && let Some((ppid, _)) = stat(pid)
            {
                all.push((pid, ppid));
            }
        }
    }
    let mut out: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU used so far by some processes, read two ways: `/proc/<pid>/stat` (user + system, whole
/// process including exited threads, but in clock ticks of 10 ms) and the sum of
/// `/proc/<pid>/task/*/schedstat` (nanoseconds, but only threads alive now).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    ticks_s: f64,
    sched_s: f64,
}

impl CpuTime {
    /// Seconds used between `earlier` and `self`: the larger of the two readings' differences,
    /// since each can only under-count (a tick not yet reached, a thread that exited).
    pub fn since(self, earlier: CpuTime) -> f64 {
        (self.ticks_s - earlier.ticks_s)
            .max(self.sched_s - earlier.sched_s)
            .max(0.0)
    }
}

fn sched_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 / 1e9)
        .sum()
}

/// CPU used so far by `roots` and their descendants.
pub fn cpu_time(roots: &[u32], ticks: f64) -> CpuTime {
    let pids = tree(roots);
    CpuTime {
        ticks_s: pids
            .iter()
            .filter_map(|p| stat(*p))
            .map(|(_, t)| t as f64 / ticks)
            .sum(),
        sched_s: pids.iter().map(|p| sched_seconds(*p)).sum(),
    }
}

/// Resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("bad VmRSS line")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_memory_and_children() {
        let me = std::process::id();
        assert!(rss_bytes(me).expect("rss") > 1 << 20);
        let before = cpu_time(&[me], clock_ticks());
        let spin = std::time::Instant::now();
        while spin.elapsed().as_millis() < 50 {
            std::hint::black_box(spin.elapsed());
        }
        let used = cpu_time(&[me], clock_ticks()).since(before);
        // 50 ms of spinning: nanosecond schedstat sees it even where ticks would round to 0.
        assert!((0.02..5.0).contains(&used), "{used}");
        let mut child = Proc::spawn(
            "sleep",
            Command::new("sleep").arg("30"),
            Path::new("/dev/null"),
        )
        .expect("spawn");
        assert!(tree(&[me]).contains(&child.pid()));
        child.check_alive().expect("alive");
        let pid = child.pid();
        assert!(live().contains(&pid), "registered for the signal handler");
        drop(child);
        assert!(!live().contains(&pid));
        assert!(!Path::new(&format!("/proc/{pid}/stat")).exists() || stat(pid).is_none());
    }
}
