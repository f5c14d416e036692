//! `node.toml`: parsed into a checked [`NodeConfig`] with errors naming the field.
//!
//! ```toml
//! data_dir = "/var/lib/hopmesh-node"   # key, attestation, pins, revocations, ctl socket
//! verifier = "verifier.example:7443"   # host:port; names are resolved with hickory
//! # verifiers = ["v1.example:7443", "v2.example:7443"]  # or several replicas (instead)
//! listen = "0.0.0.0:4433"              # QUIC overlay
//! advertise = ["203.0.113.5:4433"]     # where peers dial this node (host:port)
//! socks = "127.0.0.1:1080"             # must be a loopback address
//! # socks_username = "app"             # optional RFC 1929 credentials
//! # socks_password = "secret"
//! # socks_max_clients = 512            # concurrent SOCKS clients (see DEFAULT_SOCKS_MAX_CLIENTS)
//! # metrics = "127.0.0.1:9101"        # Prometheus /metrics, loopback only
//! # congestion = "bbr"                 # or "cubic" (see `Congestion`)
//! # socks_reply = "early"              # or "after_connect" (see `SocksReply`)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The congestion controller for data connections.
///
/// BBR is the default, measured on this project's machines: over a link with 5 % loss and
/// 100 ms RTT (netns suite) BBR moved 64 MiB in 6 s where CUBIC moved 44.6 MiB in 300 s
/// (≈ 70×); on clean loopback BBR was ≈ 15 % slower (64 MiB echo 1.79 s vs 1.52 s). Links
/// between clouds lose packets; choose `cubic` only for clean, local links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// BBR (quinn's implementation).
    #[default]
    Bbr,
    /// CUBIC (quinn's default).
    Cubic,
}

/// When the SOCKS endpoint answers a CONNECT (`socks_reply`).
///
/// `Early`, the default, answers as soon as everything this node can decide alone has passed
/// (its own attestation, the route and policy, a connection to the first hop, a minted token):
/// the app's first bytes then travel right behind the token and header, one tunnel round trip
/// per new connection instead of two. A refusal only the far end can know (its gate, or its
/// backend refusing or timing out) arrives after the app was told "succeeded": the app's TCP
/// connection is reset (never a clean close), and the refusal is counted and audited here
/// (`node/src/refusal.rs`, `RemoteRefusal`). `AfterConnect` waits for the serving node's
/// backend connect result and answers with its true REP code, at one more round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocksReply {
    /// Answer once the local checks pass; remote refusals reset the connection.
    #[default]
    Early,
    /// Answer with the serving node's backend connect result.
    AfterConnect,
}

/// Most verifiers a node lists (`verifiers`).
pub const MAX_VERIFIERS: usize = 8;

/// A checked node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// The verifiers, `host:port` each (1 to [`MAX_VERIFIERS`]): replicas of one mesh. The
    /// link starts at one picked by the node's id and fails over to the next
    /// (`verifier_link::Failover`).
    pub verifiers: Vec<String>,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Advertised addresses.
    pub advertise: Vec<String>,
    /// SOCKS listen address (loopback).
    pub socks: SocketAddr,
    /// Optional SOCKS credentials.
    pub socks_auth: Option<(String, String)>,
    /// Most SOCKS clients served at once (`socks_max_clients`, default
    /// [`DEFAULT_SOCKS_MAX_CLIENTS`], 1 to [`MAX_SOCKS_MAX_CLIENTS`]); one more is answered
    /// `05 FF` and closed, and counted (`socks_clients_limit`).
    pub socks_max_clients: usize,
    /// Optional Prometheus `/metrics` address (loopback).
    pub metrics: Option<SocketAddr>,
    /// Congestion controller for data connections.
    pub congestion: Congestion,
    /// When SOCKS CONNECTs are answered.
    pub socks_reply: SocksReply,
    /// Worker threads of the node's runtime (see [`default_threads`]).
    pub threads: usize,
    /// Test only: seconds added to the clock.
    pub clock_offset: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    data_dir: PathBuf,
    verifier: Option<String>,
    verifiers: Option<Vec<String>>,
    listen: String,
    #[serde(default)]
    advertise: Vec<String>,
    #[serde(default = "default_socks")]
    socks: String,
    socks_username: Option<String>,
    socks_password: Option<String>,
    socks_max_clients: Option<usize>,
    metrics: Option<String>,
    congestion: Option<String>,
    socks_reply: Option<String>,
    threads: Option<usize>,
    #[serde(default)]
    clock_offset: i64,
}

/// The default worker-thread count: half the cores, at least one.
///
/// A node runs beside the workloads it serves, so it should not contend for every core; and
/// one bulk stream is driven by one quinn connection task, which runs fastest when the splice
/// task feeding it is not woken on another core. Measured on a 2-core machine with two nodes,
/// client and backend sharing it (benches/, `hopmesh-bench load`, 1 GiB, 4 runs each): one
/// worker per node moved 750–900 MB/s, two workers 550–690 MB/s, at equal or lower CPU per
/// byte. Nodes on big dedicated hosts may set `threads` higher.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Default of `socks_max_clients`: concurrent SOCKS clients (in handshake or streaming). Each
/// holds one descriptor (its TCP socket) and a spawned task with small buffers; 512 leaves half
/// of the common default descriptor limit (`ulimit -n` 1024) to backend connections, the audit
/// log and the rest, so a local flood meets this limit (answered, counted) before `EMFILE`.
pub const DEFAULT_SOCKS_MAX_CLIENTS: usize = 512;
/// Largest accepted `socks_max_clients`.
pub const MAX_SOCKS_MAX_CLIENTS: usize = 1 << 20;

fn default_socks() -> String {
    "127.0.0.1:1080".into()
}

/// A config file problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    /// TOML or field error (the message names line and field).
    #[error("{0}: {1}")]
    Invalid(String, String),
}

impl NodeConfig {
    /// Reads and checks a config file; relative paths are relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|m| ConfigError::Invalid(path.display().to_string(), m))
    }

    /// Parses config text.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| format!("listen: `{}` is not ip:port", raw.listen))?;
        let socks: SocketAddr = raw
            .socks
            .parse()
            .map_err(|_| format!("socks: `{}` is not ip:port", raw.socks))?;
        if !socks.ip().is_loopback() {
            return Err(format!(
                "socks: `{socks}` must be a loopback address (the SOCKS endpoint is local only)"
            ));
        }
        let verifiers = match (raw.verifier, raw.verifiers) {
            (Some(v), None) => vec![v],
            (None, Some(list)) if !list.is_empty() && list.len() <= MAX_VERIFIERS => list,
            (None, Some(list)) => {
                return Err(format!(
                    "verifiers: {} entries; list 1 to {MAX_VERIFIERS}",
                    list.len()
                ));
            }
            (None, None) => return Err("verifier: missing (or list them in `verifiers`)".into()),
            (Some(_), Some(_)) => {
                return Err("verifier and verifiers: set one of them, not both".into());
            }
        };
        for v in &verifiers {
            hopmesh_protocol::policy::parse_backend(v).map_err(|e| format!("verifier: {e}"))?;
        }
        let mut unique = verifiers.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != verifiers.len() {
            return Err("verifiers: an entry is listed twice".into());
        }
        if raw.advertise.len() > 4 {
            return Err("advertise: at most 4 addresses".into());
        }
        for a in &raw.advertise {
            hopmesh_protocol::policy::parse_backend(a).map_err(|e| format!("advertise: {e}"))?;
        }
        let socks_auth = match (raw.socks_username, raw.socks_password) {
            (Some(u), Some(p))
                if !u.is_empty() && !p.is_empty() && u.len() <= 255 && p.len() <= 255 =>
            {
                Some((u, p))
            }
            (None, None) => None,
            _ => {
                return Err(
                    "socks_username and socks_password: set both, 1 to 255 bytes each".into(),
                );
            }
        };
        let socks_max_clients = match raw.socks_max_clients {
            None => DEFAULT_SOCKS_MAX_CLIENTS,
            Some(n @ 1..=MAX_SOCKS_MAX_CLIENTS) => n,
            Some(n) => {
                return Err(format!(
                    "socks_max_clients: {n} is not between 1 and {MAX_SOCKS_MAX_CLIENTS}"
                ));
            }
        };
        let metrics = match raw.metrics {
            None => None,
            Some(m) => {
                let addr: SocketAddr = m
                    .parse()
                    .map_err(|_| format!("metrics: `{m}` is not ip:port"))?;
                if !addr.ip().is_loopback() {
                    return Err(format!("metrics: `{addr}` must be a loopback address"));
                }
                Some(addr)
            }
        };
        let congestion = match raw.congestion.as_deref() {
            None | Some("bbr") => Congestion::Bbr,
            Some("cubic") => Congestion::Cubic,
            Some(other) => return Err(format!("congestion: `{other}` is not `bbr` or `cubic`")),
        };
        let socks_reply = match raw.socks_reply.as_deref() {
            None | Some("early") => SocksReply::Early,
            Some("after_connect") => SocksReply::AfterConnect,
            Some(other) => {
                return Err(format!(
                    "socks_reply: `{other}` is not `early` or `after_connect`"
                ));
            }
        };
        let threads = match raw.threads {
            None => default_threads(),
            Some(n @ 1..=256) => n,
            Some(n) => return Err(format!("threads: {n} is not between 1 and 256")),
        };
        let data_dir = if raw.data_dir.is_absolute() {
            raw.data_dir
        } else {
            base.join(raw.data_dir)
        };
        Ok(Self {
            data_dir,
            verifiers,
            listen,
            advertise: raw.advertise,
            socks,
            socks_auth,
            socks_max_clients,
            metrics,
            congestion,
            socks_reply,
            threads,
            clock_offset: raw.clock_offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        let ok = NodeConfig::parse(
            "data_dir = \"d\"\nverifier = \"v.example:7443\"\nlisten = \"0.0.0.0:4433\"\n",
            Path::new("/etc/h"),
        )
        .expect("valid");
        assert_eq!(ok.data_dir, PathBuf::from("/etc/h/d"));
        assert_eq!(ok.socks.to_string(), "127.0.0.1:1080");
        let err = |t: &str| NodeConfig::parse(t, Path::new(".")).expect_err("invalid");
        assert!(err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\nsocks = \"0.0.0.0:1080\"\n").contains("loopback"));
        assert!(
            err("data_dir = \"d\"\nverifier = \"v\"\nlisten = \"0.0.0.0:1\"\n")
                .contains("verifier")
        );
        assert!(err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\nsocks_username = \"u\"\n").contains("both"));
        assert!(err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"x\"\n").contains("listen"));
        assert!(err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\ncongestion = \"reno\"\n").contains("congestion"));
        assert!(
            err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\nthreads = 0\n")
                .contains("threads")
        );
        assert!(
            err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\nthreads = 1000\n")
                .contains("threads")
        );
        assert_eq!(ok.threads, default_threads());
        assert!(ok.threads >= 1);
        assert_eq!(ok.congestion, Congestion::Bbr);
        assert_eq!(ok.socks_max_clients, DEFAULT_SOCKS_MAX_CLIENTS);
        let base = "data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\n";
        assert_eq!(ok.socks_reply, SocksReply::Early);
        assert!(err(&format!("{base}socks_reply = \"late\"\n")).contains("socks_reply"));
        let waits = NodeConfig::parse(
            &format!("{base}socks_reply = \"after_connect\"\n"),
            Path::new("."),
        )
        .expect("valid");
        assert_eq!(waits.socks_reply, SocksReply::AfterConnect);
        for bad in [0, MAX_SOCKS_MAX_CLIENTS + 1] {
            assert!(
                err(&format!("{base}socks_max_clients = {bad}\n")).contains("socks_max_clients")
            );
        }
        assert_eq!(ok.verifiers, ["v.example:7443"]);
        let head = "data_dir = \"d\"\nlisten = \"0.0.0.0:1\"\n";
        let many = NodeConfig::parse(
            &format!("{head}verifiers = [\"a:1\", \"b:2\", \"[::1]:3\"]\n"),
            Path::new("."),
        )
        .expect("several verifiers");
        assert_eq!(many.verifiers, ["a:1", "b:2", "[::1]:3"]);
        assert!(err(head).contains("verifier: missing"));
        assert!(err(&format!("{head}verifiers = []\n")).contains("0 entries"));
        let nine: Vec<String> = (1..=MAX_VERIFIERS + 1)
            .map(|i| format!("\"v{i}:1\""))
            .collect();
        assert!(err(&format!("{head}verifiers = [{}]\n", nine.join(", "))).contains("9 entries"));
        assert!(err(&format!("{head}verifiers = [\"a:1\", \"a:1\"]\n")).contains("twice"));
        assert!(err(&format!("{head}verifiers = [\"a:1\", \"b\"]\n")).contains("verifier"));
        assert!(
            err(&format!(
                "{head}verifier = \"a:1\"\nverifiers = [\"b:1\"]\n"
            ))
            .contains("not both")
        );
        let two = NodeConfig::parse(&format!("{base}socks_max_clients = 2\n"), Path::new("."))
            .expect("valid");
        assert_eq!(two.socks_max_clients, 2);
        assert!(
            err("data_dir = \"d\"\nverifier = \"v:1\"\nlisten = \"0.0.0.0:1\"\nlisen = 1\n")
                .contains("lisen")
        );
    }
}
