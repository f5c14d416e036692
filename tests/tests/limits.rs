//! Per-client and per-peer limits of a node, each driven past its edge (issue 12, items 7
//! and 11; docs/testing.md).

use std::time::Duration;

use hopmesh_protocol::socks5;
use hopmesh_tests::mesh::{Mesh, socks_connect};
use hopmesh_verifier::authority::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Node a serves at most this many SOCKS clients in the limit test.
const SOCKS_LIMIT: usize = 2;

fn refused(mesh: &Mesh, node: &str, reason: &str) -> u64 {
    mesh.node(node).show()["counters"]["refused"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// One client past `socks_max_clients` gets `05 FF` and a clean close (not a hang), the
/// refusal is counted, the clients being served go on, and a slot freed is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_clients_past_the_limit_get_a_failure_reply() {
    let mesh = Mesh::start_configured(Settings::default(), "", &[], |name, c| {
        if name == "a" {
            c.socks_max_clients = SOCKS_LIMIT;
        }
    })
    .await;
    let socks = mesh.node("a").socks;
    let mut held = Vec::new();
    for _ in 0..SOCKS_LIMIT {
        held.push(
            socks_connect(socks, "api.s1.mesh", 80)
                .await
                .expect("within the limit"),
        );
    }
    assert_eq!(refused(&mesh, "a", "socks_clients_limit"), 0);

    // One past the limit: the failure reply, then EOF, within a bound.
    let mut extra = TcpStream::connect(socks).await.expect("connect");
    extra
        .write_all(&socks5::encode_greeting(&[socks5::method::NO_AUTH]))
        .await
        .expect("greeting");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer))
        .await
        .expect("answered, not hung")
        .expect("read");
    assert_eq!(answer, [5, socks5::method::NO_ACCEPTABLE]);
    assert_eq!(refused(&mesh, "a", "socks_clients_limit"), 1);

    // The held clients still work.
    for tcp in &mut held {
        tcp.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&back, b"ping");
    }

    // A freed slot is usable again (bounded wait for the node to see the close).
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(tcp) = socks_connect(socks, "api.s1.mesh", 80).await {
            again = Some(tcp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a freed slot was never reused");
    drop((held, again, extra));
    mesh.shutdown().await;
}

/// A peer that opens connection after connection keeps at most `MAX_CONNECTIONS_PER_PEER`:
/// each one past the cap displaces its oldest (closed with CONNECTION_REPLACED, counted), and
/// the newest always works. Before the cap, every one stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_peer_cap_replace_the_oldest() {
    use hopmesh_node::peer::MAX_CONNECTIONS_PER_PEER;
    use hopmesh_tests::attacker::ProtocolClient;

    let mesh = Mesh::start(Settings::default()).await;
    let b = mesh.node("b").handle.as_ref().expect("running");
    let (b_id, b_addr) = (b.node.local, b.quic_addr);
    let dir = mesh.node("a").dir.path().to_owned();
    let mut clients = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER + 2 {
        clients.push(ProtocolClient::connect(&dir, b_id, b_addr).await);
    }
    let replaced = quinn::VarInt::from_u32(hopmesh_protocol::codes::CONNECTION_REPLACED);
    // The two oldest were displaced (real node a's own connection, if any, went first).
    for c in &clients[..2] {
        let closed = tokio::time::timeout(Duration::from_secs(5), c.conn.closed())
            .await
            .expect("the oldest connections are closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(e) if e.error_code == replaced),
            "{closed:?}"
        );
    }
    for c in &clients[clients.len() - (MAX_CONNECTIONS_PER_PEER - 1)..] {
        assert!(
            c.conn.close_reason().is_none(),
            "a recent connection was closed"
        );
    }
    let a_on_b = mesh.node("b").show()["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "a")
        .map(|p| p["connections"].as_array().map_or(0, Vec::len))
        .unwrap_or(0);
    assert!(a_on_b <= MAX_CONNECTIONS_PER_PEER, "{a_on_b} connections");
    assert!(refused(&mesh, "b", "peer_connection_replaced") >= 2);
    drop(clients);
    mesh.shutdown().await;
}
