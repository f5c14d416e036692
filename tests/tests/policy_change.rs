//! A policy change ends exactly the established streams it forbids (docs/testing.md, case
//! 43): nodes a and b stay peers (a reaches api.s1 on b), but b loses db.s1 on a; b's open
//! stream to db is reset within a second and a's stream to api goes on.

use std::time::{Duration, Instant};

use hopmesh_tests::mesh::{Mesh, mesh_policy, socks_connect};
use hopmesh_verifier::authority::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a forbidden stream may live on after the reload is acknowledged.
const CUT_WITHIN: Duration = Duration::from_secs(1);

/// One echo round trip of `msg` on `tcp`.
async fn echo(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    tcp.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tcp.read_exact(&mut back).await?;
    if back == msg {
        Ok(())
    } else {
        Err(std::io::Error::other("echo differs"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resets_the_forbidden_stream_and_keeps_the_other() {
    let mesh = Mesh::start(Settings::default()).await;
    let mut allowed = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80)
        .await
        .expect("a -> api");
    let mut forbidden = socks_connect(mesh.node("b").socks, "db.s1.mesh", 80)
        .await
        .expect("b -> db");
    echo(&mut allowed, b"before").await.expect("api echo");
    echo(&mut forbidden, b"before").await.expect("db echo");

    // s1 -> s1 becomes s1 -> api.s1: b keeps a as a peer (a still reaches api on b) but may
    // no longer reach db on a.
    let backends: Vec<_> = mesh.backends.iter().map(|b| b.addr).collect();
    let old = mesh_policy(backends[0], backends[1], backends[2]);
    let new = old.replacen(
        "from = \"s1\"\nto = \"s1\"\n",
        "from = \"s1\"\nto = \"api.s1\"\n",
        1,
    );
    assert_ne!(old, new, "the fixture's s1 -> s1 rule was not found");
    std::fs::write(&mesh.verifier.policy_path, new).expect("write policy");
    mesh.verifier
        .admin()
        .call("POST", "/v1/policy/reload", None)
        .await
        .expect("reload");
    let reloaded = Instant::now();

    // The forbidden stream ends with an error (a reset, never a clean end) within the bound.
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(CUT_WITHIN + Duration::from_secs(4), async {
        loop {
            if forbidden.write_all(b"x").await.is_err() {
                return Err::<usize, _>("write failed");
            }
            match tokio::time::timeout(Duration::from_millis(50), forbidden.read(&mut buf)).await {
                Ok(Ok(0)) => return Ok(0),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => return Err("reset"),
            }
        }
    })
    .await
    .expect("the forbidden stream was not ended");
    let took = reloaded.elapsed();
    assert!(ended.is_err(), "ended with a clean EOF, not a reset");
    assert!(took <= CUT_WITHIN, "took {took:?}");

    // The allowed one still moves bytes, and the pair stays connected.
    echo(&mut allowed, b"after").await.expect("api echo after");
    let closed: Vec<_> = mesh
        .node("a")
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "stream_closed")
        .collect();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["reason"], "policy_changed");
    assert_eq!(
        mesh.node("a").show()["counters"]["refused"]["stream_policy_changed"],
        1
    );
    assert!(
        !mesh
            .node("a")
            .audit()
            .iter()
            .any(|r| r["event"] == "peer_closed"),
        "the pair must stay connected"
    );
    mesh.shutdown().await;
}
