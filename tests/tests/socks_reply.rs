//! When the SOCKS endpoint answers a CONNECT (`socks_reply`, `node/src/config.rs`).
//!
//! `early` (the default) answers once every local check passed; a refusal only the serving
//! node can know (here: its backend refuses the connection) then resets the app's connection,
//! never a clean close, and is counted and audited at the origin. `after_connect` answers with
//! the serving node's true result instead. The serving node's status byte rides with the
//! backend's first bytes when the app's bytes came behind the header (`STATUS_WAIT`).

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
    mesh_with(reply, "").await
}

async fn mesh_with(reply: SocksReply, more_policy: &str) -> Mesh {
    let policy = format!("{}{more_policy}", dead_service());
    Mesh::start_configured(Settings::default(), &policy, &[], move |_, c| {
        c.socks_reply = reply;
    })
    .await
}

fn counter(mesh: &Mesh, node: &str, name: &str) -> u64 {
    mesh.node(node).show()["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("{node}: no counter {name}"))
}

/// A backend that reads a request, answers `SLOW_ANSWER` after `SLOW_DELAY` (far beyond
/// `STATUS_WAIT`) and closes; it serves `conns` connections and then stops.
const SLOW_ANSWER: &[u8] = b"late answer";
const SLOW_DELAY: Duration = Duration::from_millis(150);

async fn slow_backend(conns: usize) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        for _ in 0..conns {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 64];
            let _ = tcp.read(&mut buf).await;
            tokio::time::sleep(SLOW_DELAY).await;
            let _ = tcp.write_all(SLOW_ANSWER).await;
            let _ = tcp.shutdown().await;
        }
    });
    let policy = format!(
        "\n[[service]]\nname = \"slow\"\nsegment = \"s1\"\nnode = \"b\"\nbackend = \"127.0.0.1:{port}\"\n"
    );
    (policy, task)
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

/// The serving node holds its status for the backend's first bytes (one packet each way for a
/// request and its answer), at most `STATUS_WAIT`: a slower backend gets it alone, counted, and
/// the app's bytes are the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_rides_with_the_backends_first_bytes_or_leaves_alone_counted() {
    const SLOW: usize = 5;
    let (slow_policy, slow_task) = slow_backend(SLOW).await;
    let mesh = mesh_with(SocksReply::Early, &slow_policy).await;
    assert_eq!(counter(&mesh, "b", "status_sent_alone"), 0);

    // An echo backend answers within microseconds: the status waits and rides with it.
    const N: u64 = 20;
    for i in 0..N {
        let tcp = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80)
            .await
            .expect("allowed");
        let data = Arc::new(pattern(1_000, i));
        assert_eq!(*echo_through(tcp, data.clone()).await.expect("echo"), *data);
    }
    let alone = counter(&mesh, "b", "status_sent_alone");
    assert!(
        alone < N,
        "{alone} of {N} echo streams sent their status alone"
    );

    // A backend that answers after 150 ms: the status cannot wait for it.
    for _ in 0..SLOW {
        let mut tcp = socks_connect(mesh.node("a").socks, "slow.s1.mesh", 80)
            .await
            .expect("allowed");
        tcp.write_all(b"question").await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
            .await
            .expect("in time")
            .expect("a clean end");
        assert_eq!(answer, SLOW_ANSWER);
    }
    // Each slow stream whose question came behind the header counts once (one whose header
    // left alone, on a loaded machine, had its status written at once and counts nothing).
    let slow_alone = counter(&mesh, "b", "status_sent_alone") - alone;
    assert!(
        (1..=SLOW as u64).contains(&slow_alone),
        "{slow_alone} of {SLOW} slow streams counted status_sent_alone"
    );
    slow_task
        .await
        .expect("the slow backend served every connection");
    mesh.shutdown().await;
}
