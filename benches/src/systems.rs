//! The systems under test, each started as real processes on loopback: the backend, a hopmesh
//! mesh (verifier + N nodes, the release binaries, attested with the node binary's measurement),
//! and OpenSSH (`sshd` on 127.0.0.1 with a throwaway key, `ssh -tt -D`).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::Digest;

use crate::load::Via;
use crate::procs::Proc;

/// `socks_max_clients` of every benchmark node: above the 1 000 idle connections workload 7
/// holds open (the node's default, 512, would answer the 513th `05 FF`).
pub const BENCH_SOCKS_MAX_CLIENTS: usize = 4096;

/// A free loopback TCP port (bound and released; a small race, fine on a bench machine).
pub fn free_tcp() -> Result<SocketAddr> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A free loopback UDP port.
pub fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Reads the first line the process prints on stdout.
fn first_line(p: &mut Proc) -> Result<String> {
    let out = p.stdout().context("stdout already taken")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.is_empty() {
        bail!("{} printed nothing (see its log)", p.name);
    }
    Ok(line)
}

/// Polls `ok` every 20 ms until it holds or `secs` pass.
pub fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {secs} s waiting for {what}")
}

/// The backend byte source, a child process running `hopmesh-bench backend`.
#[derive(Debug)]
pub struct Backend {
    /// Its process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Backend {
    /// Starts it from this very executable.
    pub fn start(work: &Path) -> Result<Self> {
        let me = std::env::current_exe()?;
        let mut proc = Proc::spawn(
            "backend",
            Command::new(me).arg("backend"),
            &work.join("backend.log"),
        )?;
        let addr = first_line(&mut proc)?.trim().parse()?;
        Ok(Backend { proc, addr })
    }
}

/// What a mesh looks like.
#[derive(Clone, Debug)]
pub struct MeshSpec {
    /// Number of node processes (≥ 2). The service lives on the last one; clients use the first.
    pub nodes: usize,
    /// Hop-token epoch in seconds.
    pub epoch: u64,
    /// Pair-seed generation lifetime in seconds.
    pub generation: u64,
    /// Attestation lifetime in seconds (nodes refresh at half of it).
    pub ttl: u64,
    /// The service's backend.
    pub backend: SocketAddr,
    /// Lines appended to every node's config (`socks_reply = "after_connect"`, say).
    pub node_extra: String,
    /// Route the first node's flows to the service through the second (a relay; needs
    /// three nodes or more): the relayed path of workload 9.
    pub relayed: bool,
}

/// One running node.
#[derive(Debug)]
pub struct MeshNode {
    /// Its name in the policy.
    pub name: String,
    /// Its process.
    pub proc: Proc,
    /// Its SOCKS endpoint.
    pub socks: SocketAddr,
    /// Its data directory (`audit.jsonl`, the ctl socket).
    pub data_dir: PathBuf,
}

/// A running mesh; everything stops when it drops.
#[derive(Debug)]
pub struct Mesh {
    /// The verifier process.
    pub verifier: Proc,
    /// The verifier's data directory.
    pub verifier_dir: PathBuf,
    /// The nodes, in name order `n0`, `n1`, ….
    pub nodes: Vec<MeshNode>,
    bin: PathBuf,
}

fn policy(spec: &MeshSpec, node_bin: &Path) -> Result<String> {
    let digest = sha2::Sha256::digest(std::fs::read(node_bin)?);
    let mut p = format!(
        "[attestation]\nmeasurements = [\"{}\"]\n\n[[segment]]\nname = \"bench\"\n",
        hex::encode(digest)
    );
    for i in 0..spec.nodes {
        p.push_str(&format!(
            "\n[[node]]\nname = \"n{i}\"\nsegments = [\"bench\"]\n"
        ));
    }
    p.push_str(&format!(
        "\n[[service]]\nname = \"svc\"\nsegment = \"bench\"\nnode = \"n{}\"\nbackend = \"{}\"\n\n[[allow]]\nfrom = \"bench\"\nto = \"bench\"\n",
        spec.nodes - 1,
        spec.backend
    ));
    if spec.relayed {
        p.push_str(&format!(
            "\n[[route]]\nfrom = \"n0\"\nto = \"n{}\"\nvia = \"n1\"\n",
            spec.nodes - 1
        ));
    }
    Ok(p)
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

impl Mesh {
    /// Starts the verifier and `spec.nodes` nodes under `work`, and waits until every node is
    /// attested and connected to the verifier.
    pub fn start(bin: &Path, work: &Path, spec: &MeshSpec) -> Result<Self> {
        let node_bin = bin.join("hopmesh-node");
        let vbin = bin.join("hopmesh-verifier");
        for b in [&node_bin, &vbin] {
            if !b.exists() {
                bail!(
                    "{} not found: build with `cargo build --release --bins`",
                    b.display()
                );
            }
        }
        std::fs::create_dir_all(work)?;
        let vdir = work.join("verifier");
        let policy_path = work.join("policy.toml");
        std::fs::write(&policy_path, policy(spec, &node_bin)?)?;
        let pins = run_ok(Command::new(&vbin).arg("--data-dir").arg(&vdir).arg("init"))?;
        let pins_path = work.join("pins.json");
        std::fs::write(&pins_path, pins)?;
        let mut verifier = Proc::spawn(
            "verifier",
            Command::new(&vbin)
                .arg("--data-dir")
                .arg(&vdir)
                .arg("serve")
                .arg("--policy")
                .arg(&policy_path)
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .args(["--epoch", &spec.epoch.to_string()])
                .args(["--generation", &spec.generation.to_string()])
                .args(["--attestation-ttl", &spec.ttl.to_string()])
                .env("HOPMESH_LOG", "warn"),
            &work.join("verifier.log"),
        )?;
        let started: serde_json::Value = serde_json::from_str(&first_line(&mut verifier)?)?;
        let vaddr = started["node_addr"]
            .as_str()
            .context("verifier did not print node_addr")?
            .to_owned();
        let mut mesh = Mesh {
            verifier,
            verifier_dir: vdir.clone(),
            nodes: Vec::new(),
            bin: bin.to_owned(),
        };
        for i in 0..spec.nodes {
            let name = format!("n{i}");
            let token: serde_json::Value = serde_json::from_str(&mesh.vcli(&[
                "join-token",
                "create",
                "--name",
                &name,
                "--ttl",
                "600",
            ])?)?;
            let secret = token["secret"].as_str().context("no join secret")?;
            let data_dir = work.join(&name);
            let listen = free_udp()?;
            let socks = free_tcp()?;
            run_ok(
                Command::new(&node_bin)
                    .arg("enroll")
                    .arg("--data-dir")
                    .arg(&data_dir)
                    .args(["--verifier", &vaddr])
                    .env("HOPMESH_JOIN_TOKEN", secret)
                    .arg("--pins")
                    .arg(&pins_path)
                    .args(["--advertise", &listen.to_string()]),
            )?;
            let config = work.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "data_dir = \"{}\"\nverifier = \"{vaddr}\"\nlisten = \"{listen}\"\nadvertise = [\"{listen}\"]\nsocks = \"{socks}\"\nsocks_max_clients = {BENCH_SOCKS_MAX_CLIENTS}\n{}",
                    data_dir.display(),
                    spec.node_extra,
                ),
            )?;
            let proc = Proc::spawn(
                &name,
                Command::new(&node_bin)
                    .arg("run")
                    .arg("--config")
                    .arg(&config)
                    .env("HOPMESH_LOG", "warn"),
                &work.join(format!("{name}.log")),
            )?;
            mesh.nodes.push(MeshNode {
                name,
                proc,
                socks,
                data_dir,
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for n in &mut mesh.nodes {
            let dir = n.data_dir.clone();
            let ready = || {
                rt.block_on(hopmesh_node::ctl::request(&dir, "show"))
                    .map(|s| s["self_permit"].is_null() && s["verifier_connected"] == true)
                    .unwrap_or(false)
            };
            wait_until(&format!("node {} ready", n.name), 60, ready)?;
            n.proc.check_alive()?;
        }
        Ok(mesh)
    }

    /// Runs a verifier CLI command against this mesh's verifier; its stdout.
    pub fn vcli(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new(self.bin.join("hopmesh-verifier"))
                .arg("--data-dir")
                .arg(&self.verifier_dir)
                .args(args),
        )
    }

    /// How clients reach the service: through the first node's SOCKS endpoint.
    pub fn via(&self) -> Via {
        Via::Socks {
            proxy: self.nodes[0].socks,
            host: "svc.bench.mesh".into(),
            port: 80,
        }
    }

    /// The smoothed RTT (µs) of the first node's connection to node `to`, from its `ctl show`
    /// (`None` without a connection).
    pub fn rtt_us(&self, to: usize) -> Option<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let show = rt
            .block_on(hopmesh_node::ctl::request(&self.nodes[0].data_dir, "show"))
            .ok()?;
        let name = &self.nodes[to].name;
        show["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())?["connections"]
            .as_array()?
            .first()?["rtt_us"]
            .as_u64()
    }

    /// The node processes on the data path (client side and service side).
    pub fn data_path_pids(&self) -> Vec<u32> {
        let last = self.nodes.len() - 1;
        vec![self.nodes[0].proc.pid(), self.nodes[last].proc.pid()]
    }
}

/// OpenSSH: a private `sshd` on loopback and an `ssh -tt -D` SOCKS proxy through it.
#[derive(Debug)]
pub struct Ssh {
    /// The sshd listener (its session children carry the traffic).
    pub sshd: Proc,
    /// The ssh client holding the `-D` SOCKS listener.
    pub client: Proc,
    /// The SOCKS listener of the client.
    pub socks: SocketAddr,
}

impl Ssh {
    /// Starts both with throwaway keys under `work`; aes128-gcm as the only cipher.
    pub fn start(work: &Path, backend: SocketAddr) -> Result<Self> {
        let sshd_bin = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .context("sshd not found: apt-get install openssh-server openssh-client")?;
        let dir = work.join("ssh");
        std::fs::create_dir_all(&dir)?;
        for key in ["host", "client"] {
            let path = dir.join(key);
            if !path.exists() {
                run_ok(
                    Command::new("ssh-keygen")
                        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                        .arg(&path),
                )?;
            }
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
        // Privilege separation needs this directory when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_tcp()?.port();
        let user = run_ok(Command::new("id").arg("-un"))?.trim().to_owned();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
                 Ciphers aes128-gcm@openssh.com\nCompression no\nAllowTcpForwarding yes\nLogLevel ERROR\n",
                d = dir.display()
            ),
        )?;
        let sshd = Proc::spawn(
            "sshd",
            Command::new(sshd_bin).args(["-D", "-e", "-f"]).arg(&config),
            &dir.join("sshd.log"),
        )?;
        wait_until("sshd listening", 10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        let socks = free_tcp()?;
        // A tty (-tt) makes ssh mark the session interactive and set TCP_NODELAY; stdin is a
        // pipe we hold, so the remote `sleep` runs until we kill the client.
        let client = Command::new("ssh")
            .arg("-tt")
            .args(["-F", "/dev/null", "-D", &socks.to_string(), "-i"])
            .arg(dir.join("client"))
            .args(["-p", &port.to_string()])
            .args(["-c", "aes128-gcm@openssh.com", "-o", "Compression=no"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("{user}@127.0.0.1"))
            .arg("sleep 86400")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("ssh.log"))?)
            .spawn()
            .context("start ssh")?;
        let mut client = Proc::adopt("ssh", client);
        let via = Via::Socks {
            proxy: socks,
            host: backend.ip().to_string(),
            port: backend.port(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        wait_until("ssh -D forwarding", 20, || {
            let mut buf = [0u8; 64];
            rt.block_on(crate::load::fetch(&via, 10, &mut buf)).is_ok()
        })
        .with_context(|| format!("see {}", dir.join("ssh.log").display()))?;
        client.check_alive()?;
        Ok(Ssh {
            sshd,
            client,
            socks,
        })
    }

    /// The processes carrying the traffic: the client, sshd and its session children.
    pub fn pids(&self) -> Vec<u32> {
        vec![self.client.pid(), self.sshd.pid()]
    }
}
