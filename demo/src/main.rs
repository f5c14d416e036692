//! `hopmesh-demo`: a working local mesh on loopback, no root and no outside services.
//!
//! ```text
//!   curl ──SOCKS5──▶ node "edge" (segment web) ──QUIC──▶ node "api"    (payments) ──▶ api service
//!                                               ╲──QUIC──▶ node "ledger" (payments) ──▶ ledger service
//!   verifier: attests all three, compiles the policy, pushes seeds and routes
//! ```
//!
//! Policy: `web -> api.payments` is allowed; `web -> ledger.payments` is not. Runs until
//! Ctrl-C, then shuts everything down and deletes its temporary data.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hopmesh_node::config::NodeConfig;
use hopmesh_node::runtime::{NodeHandle, Sockets};
use hopmesh_protocol::ids::{Measurement, NodeName};
use hopmesh_protocol::time::Clock;
use hopmesh_transport::clock::SystemClock;
use hopmesh_verifier::authority::Settings;
use hopmesh_verifier::datadir::DataDir;
use hopmesh_verifier::store::StoreSpec;
use hopmesh_verifier::{ServeOptions, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts a sample HTTP service that names itself.
async fn sample_service(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || async move {
        format!("hello from the {name} service, reached through hopmesh\n")
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn policy(api: SocketAddr, ledger: SocketAddr, shop: SocketAddr) -> String {
    format!(
        r#"
[attestation]
allow_any_measurement = true   # demo only: production pins the node binary's SHA-256

[[segment]]
name = "web"
[[segment]]
name = "payments"

[[node]]
name = "edge"
segments = ["web"]
[[node]]
name = "api"
segments = ["payments"]
[[node]]
name = "ledger"
segments = ["payments"]

[[service]]
name = "shop"
segment = "web"
node = "edge"
backend = "{shop}"
[[service]]
name = "api"
segment = "payments"
node = "api"
backend = "{api}"
[[service]]
name = "ledger"
segment = "payments"
node = "ledger"
backend = "{ledger}"

[[allow]]
from = "web"
to = "api.payments"
[[allow]]
from = "payments"
to = "payments"
"#
    )
}

/// One SOCKS5 request the way curl makes it; returns the HTTP body or the SOCKS REP code.
async fn socks_get(socks: SocketAddr, host: &str) -> Result<Result<String, u8>> {
    let mut tcp = TcpStream::connect(socks).await?;
    tcp.write_all(&[5, 1, 0]).await?;
    let mut sel = [0u8; 2];
    tcp.read_exact(&mut sel).await?;
    let mut req = vec![5, 1, 0, 3, u8::try_from(host.len())?];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&80u16.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        return Ok(Err(reply[1]));
    }
    tcp.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await?;
    Ok(Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPMESH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let work = tempfile::tempdir().context("temporary directory")?;
    let vdir = work.path().join("verifier");
    let pins = DataDir::new(&vdir).init()?;
    let (api, ledger, shop) = (
        sample_service("api").await?,
        sample_service("ledger").await?,
        sample_service("shop").await?,
    );
    let policy_path = work.path().join("policy.toml");
    std::fs::write(&policy_path, policy(api, ledger, shop))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let verifier = start(
        &vdir,
        ServeOptions {
            settings: Settings::default(),
            policy_path: policy_path.clone(),
            clock: clock.clone(),
            store: StoreSpec::Sqlite,
        },
        UdpSocket::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;

    let mut nodes: Vec<(&str, NodeHandle)> = Vec::new();
    for name in ["edge", "api", "ledger"] {
        let dir = work.path().join(name);
        let quic = UdpSocket::bind("127.0.0.1:0")?;
        let advertise = vec![quic.local_addr()?.to_string()];
        let now = clock.now();
        let (secret, _) =
            verifier
                .shared
                .authority()
                .create_join_token(&NodeName::new(name)?, None, 60, now)?;
        hopmesh_node::enroll::enroll(
            &dir,
            verifier.node_addr,
            secret,
            &pins,
            &advertise,
            Measurement([0; 32]),
            now,
        )
        .await?;
        // The edge node takes the usual SOCKS port if it is free.
        let socks = match (name, TcpListener::bind("127.0.0.1:1080").await) {
            ("edge", Ok(l)) => l,
            _ => TcpListener::bind("127.0.0.1:0").await?,
        };
        let config = NodeConfig {
            data_dir: dir,
            verifiers: vec![verifier.node_addr.to_string()],
            listen: quic.local_addr()?,
            advertise,
            socks: socks.local_addr()?,
            socks_auth: None,
            socks_max_clients: hopmesh_node::config::DEFAULT_SOCKS_MAX_CLIENTS,
            metrics: None,
            congestion: Default::default(),
            socks_reply: Default::default(),
            threads: 1,
            clock_offset: 0,
        };
        nodes.push((
            name,
            hopmesh_node::runtime::start(config, Sockets { quic, socks }, clock.clone()).await?,
        ));
    }
    for (name, h) in &nodes {
        let mut ready = false;
        for _ in 0..100 {
            let s = h.node.show();
            if s["self_permit"].is_null() && s["verifier_connected"] == true {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            bail!("node {name} did not become ready: {}", h.node.show());
        }
    }
    let edge = nodes[0].1.socks_addr;

    // Prove it works before telling anyone to try.
    let ok = socks_get(edge, "api.payments.mesh").await?;
    let denied = socks_get(edge, "ledger.payments.mesh").await?;
    let Ok(body) = ok else {
        bail!("self-check failed: api.payments.mesh answered SOCKS REP {ok:?}")
    };
    if denied != Err(2) {
        bail!("self-check failed: ledger.payments.mesh was not refused by policy ({denied:?})");
    }

    println!("hopmesh demo: a verifier and 3 nodes on loopback (segments web and payments)");
    println!();
    for (name, h) in &nodes {
        println!(
            "  node {name:<7} id {}  quic {}  socks {}",
            h.node.local.short(),
            h.quic_addr,
            h.socks_addr
        );
    }
    println!(
        "  verifier     quic {}  admin {}",
        verifier.node_addr, verifier.admin_addr
    );
    println!();
    println!("SOCKS endpoint of node edge (segment web): {edge}");
    println!();
    println!("Allowed by policy (web -> api.payments):");
    println!("  curl --socks5-hostname {edge} http://api.payments.mesh/");
    println!("  -> {}", body.trim());
    println!("Refused by policy (web may not reach ledger.payments), curl exits 97:");
    println!("  curl --socks5-hostname {edge} http://ledger.payments.mesh/");
    println!();
    println!("Exact node state (JSON):");
    println!(
        "  cargo run --release -p hopmesh-node -- ctl --data-dir {} show",
        work.path().join("edge").display()
    );
    println!("Ctrl-C to stop.");

    tokio::signal::ctrl_c().await?;
    println!("stopping...");
    for (_, h) in nodes {
        h.shutdown().await;
    }
    verifier.shutdown().await;
    Ok(())
}
