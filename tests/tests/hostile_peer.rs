//! A peer that never reads its control stream (withholds flow-control credit) cannot stall
//! the node it is connected to (issue 12, item 3; docs/testing.md case 40).

use std::time::Duration;

use hopmesh_tests::attacker::ProtocolClient;
use hopmesh_tests::mesh::Mesh;
use hopmesh_verifier::authority::Settings;
use serde_json::Value;

/// Short attestations, so that the victim refreshes (and renews to its peers) every few
/// seconds.
const TTL: u64 = 10;

fn not_after(mesh: &Mesh, node: &str) -> u64 {
    mesh.node(node).show()["attestation"]["not_after"]
        .as_u64()
        .expect("attested")
}

/// Polls `f` every 50 ms until it holds, at most `secs` seconds.
async fn within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bad peer (holding node a's real key and attestation) reads b's Hello and then nothing:
/// b's next renewal to it finds no credit. b keeps refreshing its own attestation, applies a
/// revocation (of c) the verifier pushes while the bad peer is connected, and closes the bad
/// peer's connection with CONTROL_STALLED within the write deadline. Honest a keeps its own
/// connection to b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_closed_and_the_victim_keeps_refreshing_and_revoking() {
    let settings = Settings {
        attestation_ttl: TTL,
        ..Settings::default()
    };
    let mesh = Mesh::start(settings).await;
    let b = mesh.node("b").handle.as_ref().expect("running");
    let (b_id, b_addr) = (b.node.local, b.quic_addr);
    let dir = mesh.node("a").dir.path().to_owned();
    let bad = ProtocolClient::connect_never_reading(&dir, b_id, b_addr).await;
    let start = not_after(&mesh, "b");

    // b refreshes: its renewal to the bad peer is queued and stalls there.
    within(2 * TTL, "b refreshes with the bad peer connected", || {
        not_after(&mesh, "b") > start
    })
    .await;
    assert!(bad.conn.close_reason().is_none(), "closed too early");

    // A revocation pushed now is applied at once, the stalled writer notwithstanding.
    let version = |m: &Mesh| m.node("b").show()["revocation_version"].as_u64();
    let before = version(&mesh);
    mesh.verifier
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "c"})))
        .await
        .expect("revoke c");
    within(3, "b applies the revocation", || version(&mesh) > before).await;
    let peers = mesh.node("b").show()["peers"].clone();
    let c_connected = peers
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "c")
        .any(|p| p["connected"] == Value::Bool(true));
    assert!(
        !c_connected,
        "b still holds a connection to revoked c: {peers}"
    );

    // The bad peer is closed with CONTROL_STALLED within the write deadline (plus a refresh).
    let closed = tokio::time::timeout(Duration::from_secs(2 * TTL), bad.conn.closed())
        .await
        .expect("the peer that never reads is closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(hopmesh_protocol::codes::CONTROL_STALLED)),
        "{closed:?}"
    );
    assert!(
        mesh.node("b").show()["counters"]["refused"]["control_stalled"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );

    // And b goes on refreshing.
    let later = not_after(&mesh, "b");
    within(2 * TTL, "b refreshes again", || {
        not_after(&mesh, "b") > later
    })
    .await;
    mesh.shutdown().await;
}
