//! A whole mesh in one process: verifier, nodes, backends, SOCKS clients, all on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_node::config::NodeConfig;
use hopmesh_node::runtime::{NodeHandle, Sockets, start};
use hopmesh_protocol::ids::Measurement;
use hopmesh_protocol::socks5::{self, Command, Request, TargetAddr};
use hopmesh_verifier::authority::Settings;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::VerifierHarness;
use hopmesh_verifier::store::StoreSpec;

/// A backend that echoes every byte back, half-close aware. Stops when dropped.
#[derive(Debug)]
pub struct EchoBackend {
    /// Its address.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Starts one on 127.0.0.1:0.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The standard test policy (the fixture, [`crate::standard_policy_with`]) with these
/// backends and any measurement (in-process nodes measure the test binary).
pub fn mesh_policy(api: SocketAddr, db: SocketAddr, web: SocketAddr) -> String {
    crate::standard_policy_with(
        crate::Attest::Any,
        &api.to_string(),
        &db.to_string(),
        &web.to_string(),
    )
}

/// A node of the harness.
#[derive(Debug)]
pub struct TestMeshNode {
    /// Its name.
    pub name: String,
    /// Its data directory.
    pub dir: tempfile::TempDir,
    /// The running node (None once stopped).
    pub handle: Option<NodeHandle>,
    /// Its SOCKS address.
    pub socks: SocketAddr,
}

impl TestMeshNode {
    /// `ctl show`, in process.
    pub fn show(&self) -> Value {
        self.handle.as_ref().expect("running").node.show()
    }

    /// Every record of the node's audit log.
    pub fn audit(&self) -> Vec<Value> {
        hopmesh_transport::audit::read_since(&self.dir.path().join("audit.jsonl"), 0)
            .expect("audit")
    }
}

/// Verifier, backends and nodes.
#[derive(Debug)]
pub struct Mesh {
    /// The verifier (where nodes enroll).
    pub verifier: VerifierHarness,
    /// Further replicas on the same PostgreSQL store (none unless
    /// [`Mesh::start_replicated`]); every node lists all of them after the verifier.
    pub replicas: Vec<VerifierHarness>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, TestMeshNode>,
    /// Backends: api, db, web.
    pub backends: Vec<EchoBackend>,
}

impl Mesh {
    /// The standard mesh with `settings`, every node ready.
    pub async fn start(settings: Settings) -> Self {
        Self::start_with(settings, "", &[]).await
    }

    /// The standard mesh plus `extra_policy` text and `extra_nodes` (declared in it).
    pub async fn start_with(settings: Settings, extra_policy: &str, extra_nodes: &[&str]) -> Self {
        Self::start_configured(settings, extra_policy, extra_nodes, |_, _| {}).await
    }

    /// [`Self::start_with`], each node's config changed by `tweak(name, config)` before it
    /// starts (a lower limit on one node, for example).
    pub async fn start_configured(
        settings: Settings,
        extra_policy: &str,
        extra_nodes: &[&str],
        tweak: impl Fn(&str, &mut NodeConfig),
    ) -> Self {
        Self::start_full(
            settings,
            extra_policy,
            extra_nodes,
            tweak,
            StoreSpec::Sqlite,
            0,
        )
        .await
    }

    /// The standard mesh with its verifier's store at `store`.
    pub async fn start_on_store(settings: Settings, store: StoreSpec) -> Self {
        Self::start_full(settings, "", &[], |_, _| {}, store, 0).await
    }

    /// The standard mesh on the PostgreSQL `store` with `replicas` more verifiers serving it;
    /// each node lists every verifier (`verifiers`).
    pub async fn start_replicated(settings: Settings, store: StoreSpec, replicas: usize) -> Self {
        Self::start_full(settings, "", &[], |_, _| {}, store, replicas).await
    }

    /// [`Self::start_replicated`] plus `extra_policy` text and `extra_nodes` (declared in it),
    /// each node's config changed by `tweak(name, config)` before it starts. `config.verifiers`
    /// holds every verifier's address then (the first verifier's first, as
    /// [`Self::verifier_addrs`]), so `tweak` may list others in their place (a proxy in front
    /// of each, for example).
    pub async fn start_replicated_with(
        settings: Settings,
        store: StoreSpec,
        replicas: usize,
        extra_policy: &str,
        extra_nodes: &[&str],
        tweak: impl Fn(&str, &mut NodeConfig),
    ) -> Self {
        Self::start_full(settings, extra_policy, extra_nodes, tweak, store, replicas).await
    }

    /// Every verifier's node-facing address, the first verifier's first (while running).
    pub fn verifier_addrs(&self) -> Vec<String> {
        std::iter::once(&self.verifier)
            .chain(&self.replicas)
            .filter_map(|h| h.running.as_ref().map(|r| r.node_addr.to_string()))
            .collect()
    }

    async fn start_full(
        settings: Settings,
        extra_policy: &str,
        extra_nodes: &[&str],
        tweak: impl Fn(&str, &mut NodeConfig),
        store: StoreSpec,
        replicas: usize,
    ) -> Self {
        let backends = vec![
            EchoBackend::start().await,
            EchoBackend::start().await,
            EchoBackend::start().await,
        ];
        let policy =
            mesh_policy(backends[0].addr, backends[1].addr, backends[2].addr) + extra_policy;
        let verifier = VerifierHarness::start_on(&policy, settings, store).await;
        let mut others = Vec::new();
        for _ in 0..replicas {
            others.push(verifier.replica().await);
        }
        let mut mesh = Self {
            verifier,
            replicas: others,
            nodes: BTreeMap::new(),
            backends,
        };
        let names: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .chain(extra_nodes.iter().copied())
            .collect();
        for name in &names {
            let clock = mesh.verifier.clock.clone();
            mesh.add_node_with(name, clock, |c| tweak(name, c)).await;
        }
        for name in &names {
            mesh.wait_ready(name).await;
        }
        // Tables change as later nodes enroll; let the last pushes land.
        tokio::time::sleep(Duration::from_millis(200)).await;
        mesh
    }

    /// Enrolls and starts node `name` on the verifier's clock.
    pub async fn add_node(&mut self, name: &str) {
        let clock = self.verifier.clock.clone();
        self.add_node_with_clock(name, clock).await;
    }

    /// Enrolls node `name` (on the verifier's clock) and starts it on `clock`, for example
    /// one that runs ahead of or behind the verifier's.
    pub async fn add_node_with_clock(
        &mut self,
        name: &str,
        clock: std::sync::Arc<dyn hopmesh_protocol::time::Clock>,
    ) {
        self.add_node_with(name, clock, |_| {}).await;
    }

    /// Enrolls node `name` (on the verifier's clock) and starts it on `clock` with its config
    /// changed by `tweak` first (a lower limit, for example).
    pub async fn add_node_with(
        &mut self,
        name: &str,
        clock: std::sync::Arc<dyn hopmesh_protocol::time::Clock>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind quic");
        let advertise = vec![quic.local_addr().expect("addr").to_string()];
        let running = self.verifier.running.as_ref().expect("verifier running");
        hopmesh_node::enroll::enroll(
            dir.path(),
            running.node_addr,
            self.verifier.join_token(name, 600),
            &self.verifier.pins,
            &advertise,
            Measurement([0; 32]),
            self.verifier.now(),
        )
        .await
        .expect("enroll");
        let socks = TcpListener::bind("127.0.0.1:0").await.expect("bind socks");
        let mut config = NodeConfig {
            data_dir: dir.path().to_owned(),
            verifiers: self.verifier_addrs(),
            listen: quic.local_addr().expect("addr"),
            advertise,
            socks: socks.local_addr().expect("addr"),
            socks_auth: None,
            socks_max_clients: hopmesh_node::config::DEFAULT_SOCKS_MAX_CLIENTS,
            metrics: None,
            congestion: Default::default(),
            socks_reply: Default::default(),
            threads: 1,
            clock_offset: 0,
        };
        tweak(&mut config);
        let handle = start(config, Sockets { quic, socks }, clock)
            .await
            .expect("start node");
        let socks = handle.socks_addr;
        self.nodes.insert(
            name.to_owned(),
            TestMeshNode {
                name: name.to_owned(),
                dir,
                handle: Some(handle),
                socks,
            },
        );
    }

    /// Waits (bounded) until `name` is attested, subscribed and routed.
    pub async fn wait_ready(&self, name: &str) {
        let node = &self.nodes[name];
        for _ in 0..200 {
            let s = node.show();
            if s["self_permit"].is_null() && s["verifier_connected"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {name} not ready: {}", node.show());
    }

    /// The node `name`.
    pub fn node(&self, name: &str) -> &TestMeshNode {
        &self.nodes[name]
    }

    /// Stops every node, then the verifier.
    pub async fn shutdown(mut self) {
        for (_, n) in self.nodes.iter_mut() {
            if let Some(h) = n.handle.take() {
                h.shutdown().await;
            }
        }
        for r in &mut self.replicas {
            r.stop().await;
        }
        self.verifier.stop().await;
    }
}

/// SOCKS5 CONNECT through `socks` to `host:port`. Returns the stream on REP 0, or the REP.
pub async fn socks_connect(socks: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    let mut tcp = TcpStream::connect(socks).await.map_err(|_| 0xFF)?;
    tcp.write_all(&socks5::encode_greeting(&[socks5::method::NO_AUTH]))
        .await
        .map_err(|_| 0xFE)?;
    let mut sel = [0u8; 2];
    tcp.read_exact(&mut sel).await.map_err(|_| 0xFD)?;
    if sel != [5, 0] {
        return Err(0xFC);
    }
    let target = host
        .parse()
        .map(TargetAddr::Ipv4)
        .unwrap_or_else(|_| TargetAddr::Domain(host.to_owned()));
    let req = Request {
        command: Command::Connect,
        target,
        port,
    };
    tcp.write_all(&socks5::encode_request(&req))
        .await
        .map_err(|_| 0xFB)?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.map_err(|_| 0xFA)?;
    if reply[1] == 0 {
        Ok(tcp)
    } else {
        Err(reply[1])
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// Sends `data` through an echo service and returns what came back (or the IO error).
pub async fn echo_through(tcp: TcpStream, data: Arc<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    writer.await.map_err(std::io::Error::other)??;
    Ok(back)
}
