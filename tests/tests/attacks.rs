//! Token attacks against a real node, with a client holding a real node's key, attestation
//! and pair seeds (docs/testing.md, cases 9–13).

use std::time::Duration;

use hopmesh_protocol::hop_token::{EpochLength, MAX_FORGED_PER_WINDOW, PairIds};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::routing::MeshName;
use hopmesh_tests::attacker::{ProtocolClient, StreamOutcome, current_grant};
use hopmesh_tests::mesh::Mesh;
use hopmesh_verifier::authority::Settings;
use serde_json::Value;

struct Setup {
    mesh: Mesh,
    a: NodeId,
    b: NodeId,
    b_addr: std::net::SocketAddr,
    /// The generation a currently mints with towards b, as the verifier issued it.
    grant: hopmesh_protocol::hop_token::GenerationGrant,
    /// The current epoch.
    epoch: hopmesh_protocol::hop_token::Epoch,
}

async fn setup() -> Setup {
    let mesh = Mesh::start(Settings::default()).await;
    let id = |n: &str| mesh.node(n).handle.as_ref().expect("running").node.local;
    let (a, b) = (id("a"), id("b"));
    let b_addr = mesh.node("b").handle.as_ref().expect("running").quic_addr;
    let now = mesh.verifier.now();
    let grant = current_grant(
        &mesh
            .verifier
            .shared()
            .authority()
            .grants(&PairIds::new(a, b), now),
    );
    let epoch = EpochLength::DEFAULT.epoch_at(now);
    Setup {
        mesh,
        a,
        b,
        b_addr,
        grant,
        epoch,
    }
}

fn refused(mesh: &Mesh, node: &str) -> Value {
    mesh.node(node).show()["counters"]["refused"].clone()
}

fn api() -> hopmesh_protocol::ids::ServiceId {
    MeshName::parse("api.s1.mesh", "mesh")
        .expect("name")
        .service_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_forged_and_stale_tokens_are_refused() {
    let s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let (grant, epoch) = (s.grant.clone(), s.epoch);

    // Baseline: an honest token is accepted (the backend answers status 0).
    let c0 = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    assert_eq!(
        c0.try_stream(&grant, epoch, api(), |_| {}).await,
        StreamOutcome::Status(0)
    );
    let c1 = ProtocolClient::connect(&dir, s.b, s.b_addr).await;

    // Replay on another connection: same bytes, same stream id, other exporter.
    let (mut s1, mut r1, id1) = c1.open().await.expect("stream");
    let bytes = c1.mint(&grant, epoch, api(), id1, |_| {});
    let c2 = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    let (mut s2, mut r2, id2) = c2.open().await.expect("stream");
    assert_eq!(
        id1, id2,
        "both are the first data stream of their connection"
    );
    assert_eq!(
        ProtocolClient::send_on(&mut s2, &mut r2, &bytes).await,
        StreamOutcome::Refused
    );
    // The original is still good on its own stream.
    assert_eq!(
        ProtocolClient::send_on(&mut s1, &mut r1, &bytes).await,
        StreamOutcome::Status(0)
    );

    // Replay on another stream of the same connection.
    let (mut s3, mut r3, id3) = c1.open().await.expect("stream");
    assert_ne!(id3, id1);
    assert_eq!(
        ProtocolClient::send_on(&mut s3, &mut r3, &bytes).await,
        StreamOutcome::Refused
    );

    // Epochs: ±1 accepted, ±2 refused.
    let c3 = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    for (delta, ok) in [(-1i64, true), (1, true), (-2, false), (2, false)] {
        let e =
            hopmesh_protocol::hop_token::Epoch(epoch.0.checked_add_signed(delta).expect("epoch"));
        let out = c3.try_stream(&grant, e, api(), |_| {}).await;
        assert_eq!(
            out == StreamOutcome::Status(0),
            ok,
            "epoch {delta:+}: {out:?}"
        );
    }

    let r = refused(&s.mesh, "b");
    assert_eq!(r["bad_mac"], 1, "{r}");
    assert_eq!(r["stream_id_mismatch"], 1, "{r}");
    assert_eq!(r["epoch_out_of_window"], 2, "{r}");
    // Each (peer, reason) is audited once at b with its precise reason; the second
    // epoch_out_of_window of the interval is counted, not written (aggregated).
    let audit = s.mesh.node("b").audit();
    let reasons: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "stream_refused")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        vec!["bad_mac", "stream_id_mismatch", "epoch_out_of_window"]
    );
    assert_eq!(s.mesh.node("b").show()["counters"]["audit_aggregated"], 1);
    s.mesh.shutdown().await;
}

/// A peer repeating a refused stream costs the node one audit record per (peer, reason) and
/// interval, plus one summary with the count, whatever the rate; every refusal is still
/// counted. (Before the aggregation: one `stream_refused` line per stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refusals_from_a_peer_cost_one_audit_record_and_a_summary() {
    const N: u64 = 200;
    let mut s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let stale = hopmesh_protocol::hop_token::Epoch(s.epoch.0 - 2);
    let c = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    for _ in 0..N {
        assert_eq!(
            c.try_stream(&s.grant, stale, api(), |_| {}).await,
            StreamOutcome::Refused
        );
    }
    assert_eq!(refused(&s.mesh, "b")["epoch_out_of_window"], N);
    assert_eq!(
        s.mesh.node("b").show()["counters"]["audit_aggregated"],
        N - 1
    );
    let written = |audit: &[Value], event: &str| {
        audit
            .iter()
            .filter(|r| r["event"] == event && r["peer"] == s.a.to_string())
            .count()
    };
    assert_eq!(written(&s.mesh.node("b").audit(), "stream_refused"), 1);
    // Stopping b writes the pending summary with the whole count.
    let b = s.mesh.nodes.get_mut("b").expect("b");
    b.handle.take().expect("running").shutdown().await;
    let audit = s.mesh.node("b").audit();
    let summaries: Vec<&Value> = audit
        .iter()
        .filter(|r| r["event"] == "refusals_aggregated" && r["peer"] == s.a.to_string())
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(summaries[0]["refused_event"], "stream_refused");
    assert_eq!(summaries[0]["reason"], "epoch_out_of_window");
    assert_eq!(summaries[0]["count"], N);
    s.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_are_refused_and_four_forgeries_close_the_connection() {
    let s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let (grant, epoch) = (s.grant.clone(), s.epoch);
    let c = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    // Flip one bit in the tag of three tokens: refused, connection still up.
    for bit in [0usize, 77, 255] {
        let (mut st, mut rs, id) = c.open().await.expect("stream");
        let mut bytes = c.mint(&grant, epoch, api(), id, |_| {});
        bytes[134 + bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            ProtocolClient::send_on(&mut st, &mut rs, &bytes).await,
            StreamOutcome::Refused
        );
    }
    assert!(
        c.conn.close_reason().is_none(),
        "three forgeries are tolerated"
    );
    let (mut st, mut rs, id) = c.open().await.expect("stream");
    let mut bytes = c.mint(&grant, epoch, api(), id, |_| {});
    bytes[140] ^= 0x80;
    assert_eq!(
        ProtocolClient::send_on(&mut st, &mut rs, &bytes).await,
        StreamOutcome::Refused
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.conn.close_reason().is_some(),
        "the fourth forgery within 60 s closes the connection"
    );
    assert_eq!(refused(&s.mesh, "b")["bad_mac"], 4);
    s.mesh.shutdown().await;
}

/// Forged tokens are counted per peer, not per connection: three on one connection and one
/// on the next pass the limit, the peer is suspended (its connection closed with ABUSE, a new
/// handshake refused) and reported (case 13, issue 12 item 7). Before the ledger, each
/// connection had a fresh meter and the fourth forgery on a new connection was tolerated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_follow_the_peer_across_reconnects_and_suspend_it() {
    let s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let (grant, epoch) = (s.grant.clone(), s.epoch);
    let forge = |c: &ProtocolClient, id: u64| {
        let mut bytes = c.mint(&grant, epoch, api(), id, |_| {});
        bytes[140] ^= 0x01;
        bytes
    };
    let first = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    for _ in 0..MAX_FORGED_PER_WINDOW {
        let (mut st, mut rs, id) = first.open().await.expect("stream");
        let bytes = forge(&first, id);
        assert_eq!(
            ProtocolClient::send_on(&mut st, &mut rs, &bytes).await,
            StreamOutcome::Refused
        );
    }
    assert!(first.conn.close_reason().is_none(), "under the limit");
    first.conn.close(0u32.into(), b"reconnecting");
    drop(first);

    // A new connection does not start a new count.
    let second = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    let (mut st, mut rs, id) = second.open().await.expect("stream");
    let bytes = forge(&second, id);
    assert_eq!(
        ProtocolClient::send_on(&mut st, &mut rs, &bytes).await,
        StreamOutcome::Refused
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), second.conn.closed())
        .await
        .expect("the connection of a peer past the limit is closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(hopmesh_protocol::codes::ABUSE)),
        "{closed:?}"
    );
    // Suspended: the next handshake is refused.
    let again = ProtocolClient::try_connect(&dir, s.b, s.b_addr).await;
    assert!(again.is_err(), "a suspended peer was let back in");
    let refused_b = refused(&s.mesh, "b");
    assert_eq!(refused_b["bad_mac"], MAX_FORGED_PER_WINDOW as u64 + 1);
    assert_eq!(refused_b["forgery_suspension"], 1);
    assert!(
        refused_b["peer_suspended"].as_u64().unwrap_or(0) >= 1,
        "{refused_b}"
    );
    let audit = s.mesh.node("b").audit();
    let record = audit
        .iter()
        .find(|r| r["event"] == "forged_tokens")
        .expect("a forged_tokens record");
    assert_eq!(record["strikes"], 1, "{record}");
    assert_eq!(record["peer"], s.a.to_string(), "{record}");
    s.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_refused_and_closes_the_connection() {
    let s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let (grant, epoch) = (s.grant.clone(), s.epoch);
    let c_id = s
        .mesh
        .node("c")
        .handle
        .as_ref()
        .expect("running")
        .node
        .local;
    let client = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    // a claims to be c.
    assert_eq!(
        client
            .try_stream(&grant, epoch, api(), |req| req.src = c_id)
            .await,
        StreamOutcome::Refused
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        client.conn.close_reason().is_some(),
        "impersonation closes the connection"
    );
    assert_eq!(refused(&s.mesh, "b")["src_not_peer"], 1);
    // And the verifier heard about it.
    let mut reported = false;
    for _ in 0..40 {
        let audit = hopmesh_transport::audit::read_since(
            &s.mesh.verifier.dir.path().join("audit.jsonl"),
            0,
        )
        .expect("audit");
        if audit
            .iter()
            .any(|r| r["event"] == "impersonation" && r["peer"] == s.a.to_string())
        {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reported,
        "the verifier must receive the impersonation report"
    );
    s.mesh.shutdown().await;
}

/// A pair reissue marks the old generation compromised: a valid MAC under it is
/// `compromised_key_use`, refused, the connection closed, and only that pair changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compromised_generation_use_is_recognised_and_reported() {
    let s = setup().await;
    let dir = s.mesh.node("a").dir.path().to_owned();
    let (old, epoch) = (s.grant.clone(), s.epoch);
    let client = ProtocolClient::connect(&dir, s.b, s.b_addr).await;
    assert_eq!(
        client.try_stream(&old, epoch, api(), |_| {}).await,
        StreamOutcome::Status(0)
    );
    s.mesh
        .verifier
        .admin()
        .call(
            "POST",
            "/v1/reissue",
            Some(serde_json::json!({"a": "a", "b": "b"})),
        )
        .await
        .expect("reissue");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.try_stream(&old, epoch, api(), |_| {}).await,
        StreamOutcome::Refused
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(client.conn.close_reason().is_some());
    assert_eq!(refused(&s.mesh, "b")["compromised_key_use"], 1);
    // Honest traffic moves on to the new generation with nothing lost.
    let data = std::sync::Arc::new(hopmesh_tests::mesh::pattern(256 * 1024, 5));
    let tcp = hopmesh_tests::mesh::socks_connect(s.mesh.node("a").socks, "api.s1.mesh", 80)
        .await
        .expect("connect");
    let back = hopmesh_tests::mesh::echo_through(tcp, data.clone())
        .await
        .expect("io");
    assert_eq!(
        hopmesh_tests::mesh::sha256(&back),
        hopmesh_tests::mesh::sha256(&data)
    );
    s.mesh.shutdown().await;
}
