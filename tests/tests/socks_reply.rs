//! When the SOCKS endpoint answers a CONNECT (`socks_reply`, `node/src/config.rs`).
//!
//! `early` (the default) answers once every local check passed; a refusal only the serving
//! node can know (here: its backend refuses the connection) then resets the app's connection,
//! never a clean close, and is counted and audited at the origin. `after_connect` answers with
//! the serving node's true result instead.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_node::config::SocksReply;
use hopmesh_tests::mesh::{Mesh, echo_through, pattern, socks_connect};
use hopmesh_verifier::authority::Settings;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A service on b whose backend port has no listener (bound, then closed: refused).
fn dead_service() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    format!(
        "\n[[service]]\nname = \"dead\"\nsegment = \"s1\"\nnode = \"b\"\nbackend = \"127.0.0.1:{port}\"\n"
    )
}

async fn mesh(reply: SocksReply) -> Mesh {
    Mesh::start_configured(Settings::default(), &dead_service(), &[], move |_, c| {
        c.socks_reply = reply;
    })
    .await
}

fn refused(mesh: &Mesh, node: &str, reason: &str) -> u64 {
    mesh.node(node).show()["counters"]["refused"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (bounded) until `node` counted `reason` `want` times.
async fn wait_refused(mesh: &Mesh, node: &str, reason: &str, want: u64) {
    for _ in 0..100 {
        if refused(mesh, node, reason) >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refused(mesh, node, reason),
        want,
        "{node}: {reason}: {}",
        mesh.node(node).show()["counters"]
    );
}

fn remote_refusal_records(mesh: &Mesh, node: &str) -> Vec<Value> {
    mesh.node(node)
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "stream_refused_remote")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_reply_then_a_refusing_backend_resets_the_app_and_is_counted() {
    let mesh = mesh(SocksReply::Early).await;
    // Allowed routes still work, with data right behind the reply.
    let tcp = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80)
        .await
        .expect("allowed");
    let data = Arc::new(pattern(100_000, 7));
    assert_eq!(*echo_through(tcp, data.clone()).await.expect("echo"), *data);

    // The backend of dead.s1 refuses: the app was told "succeeded" ...
    let mut tcp = socks_connect(mesh.node("a").socks, "dead.s1.mesh", 80)
        .await
        .expect("early reply: REP 0 before the backend is tried");
    let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    // ... and then sees its connection reset, never a clean end.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the reset arrives in time");
    let err = read.expect_err("a refused stream must not end cleanly");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    wait_refused(&mesh, "a", "remote_backend_refused", 1).await;
    wait_refused(&mesh, "b", "backend_unreachable", 1).await;
    let records = remote_refusal_records(&mesh, "a");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["reason"], "remote_backend_refused");
    assert_eq!(records[0]["target"], "dead.s1.mesh");
    // Local refusals keep their true code with no round trip.
    assert_eq!(
        socks_connect(mesh.node("c").socks, "api.s1.mesh", 80)
            .await
            .err(),
        Some(2),
        "s2 may not reach api.s1"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_connect_reply_gives_the_backends_true_code() {
    let mesh = mesh(SocksReply::AfterConnect).await;
    assert_eq!(
        socks_connect(mesh.node("a").socks, "dead.s1.mesh", 80)
            .await
            .err(),
        Some(5),
        "REP 0x05: connection refused by the backend"
    );
    wait_refused(&mesh, "a", "remote_backend_refused", 1).await;
    assert_eq!(remote_refusal_records(&mesh, "a").len(), 1);
    let tcp = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80)
        .await
        .expect("allowed");
    let data = Arc::new(pattern(100_000, 8));
    assert_eq!(*echo_through(tcp, data.clone()).await.expect("echo"), *data);
    mesh.shutdown().await;
}

/// A refusal an attacker can repeat is audited once per interval, every one counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_remote_refusals_are_counted_each_and_audited_aggregated() {
    let mesh = mesh(SocksReply::Early).await;
    const N: u64 = 20;
    for _ in 0..N {
        let mut tcp = socks_connect(mesh.node("a").socks, "dead.s1.mesh", 80)
            .await
            .expect("early reply");
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("in time");
        assert!(read.is_err(), "reset, not {read:?}");
    }
    wait_refused(&mesh, "a", "remote_backend_refused", N).await;
    let records = remote_refusal_records(&mesh, "a");
    assert!(
        !records.is_empty() && (records.len() as u64) < N,
        "aggregated: {} records for {N} refusals",
        records.len()
    );
    mesh.shutdown().await;
}
