//! Relayed routes: `[[route]] from = "a", to = "c", via = "r"`. Each hop mints its own token,
//! the origin's signed flow assertion travels end to end, and a relay cannot bridge segments
//! or replay flows.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{FlowAssertion, StreamHeader};
use hopmesh_protocol::hop_token::{EpochLength, PairIds};
use hopmesh_protocol::routing::MeshName;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_tests::attacker::{ProtocolClient, StreamOutcome, current_grant};
use hopmesh_tests::mesh::{Mesh, echo_through, pattern, sha256, socks_connect};
use hopmesh_transport::identity::Identity;
use hopmesh_verifier::authority::Settings;

const RELAY: &str =
    "\n[[node]]\nname = \"r\"\nsegments = []\n[[route]]\nfrom = \"a\"\nto = \"c\"\nvia = \"r\"\n";

async fn relay_mesh() -> Mesh {
    Mesh::start_with(Settings::default(), RELAY, &["r"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_through_the_relay_byte_identical() {
    let mesh = relay_mesh().await;
    let data = Arc::new(pattern(4 << 20, 21));
    let tcp = socks_connect(mesh.node("a").socks, "web.s2.mesh", 80)
        .await
        .expect("relayed connect");
    let back = tokio::time::timeout(Duration::from_secs(60), echo_through(tcp, data.clone()))
        .await
        .expect("in time")
        .expect("io");
    assert_eq!(sha256(&back), sha256(&data));
    let (a, r, c) = (
        mesh.node("a").show(),
        mesh.node("r").show(),
        mesh.node("c").show(),
    );
    assert_eq!(
        r["counters"]["streams_accepted"], 1,
        "the relay forwarded one stream: {r}"
    );
    assert_eq!(c["counters"]["streams_accepted"], 1, "{c}");
    let a_peers: Vec<&str> = a["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        a_peers.contains(&"r") && !a_peers.contains(&"c"),
        "a talks to r, never to c: {a_peers:?}"
    );
    // b has no route: it still goes direct.
    let tcp = socks_connect(mesh.node("b").socks, "web.s2.mesh", 80)
        .await
        .expect("direct connect");
    let small = Arc::new(pattern(1000, 2));
    assert_eq!(echo_through(tcp, small.clone()).await.expect("io"), *small);
    assert_eq!(
        mesh.node("r").show()["counters"]["streams_accepted"],
        1,
        "b's stream did not touch r"
    );
    mesh.shutdown().await;
}

/// The relay itself (its real key, attestation and seeds) tries to open flows at c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_invent_an_origin_or_replay_a_flow() {
    let mesh = relay_mesh().await;
    let id = |n: &str| mesh.node(n).handle.as_ref().expect("running").node.local;
    let (a, r, c) = (id("a"), id("r"), id("c"));
    let c_addr = mesh.node("c").handle.as_ref().expect("running").quic_addr;
    let now = mesh.verifier.now();
    let epoch = EpochLength::DEFAULT.epoch_at(now);
    let grant = current_grant(
        &mesh
            .verifier
            .shared()
            .authority()
            .grants(&PairIds::new(r, c), now),
    );
    let web = MeshName::parse("web.s2.mesh", "mesh")
        .expect("name")
        .service_id();
    let relay = ProtocolClient::connect(mesh.node("r").dir.path(), c, c_addr).await;
    let a_att =
        std::fs::read(mesh.node("a").dir.path().join("attestation.bin")).expect("a's attestation");

    let send = |header: StreamHeader| {
        let relay = &relay;
        let grant = grant.clone();
        async move {
            let bytes = header.encode().expect("encode");
            let Some((mut s, mut rr, stream_id)) = relay.open().await else {
                return StreamOutcome::Refused;
            };
            // Our own header: the token covers its hash, so mint with it.
            let pair = PairIds::new(r, c);
            let key = hopmesh_protocol::secret::StreamKey::derive(
                &relay.binding,
                &hopmesh_protocol::secret::EpochKey::derive(&grant.seed, &pair, epoch),
            );
            let req = hopmesh_protocol::hop_token::MintRequest {
                generation: grant.generation,
                epoch,
                src: r,
                dst: c,
                service: web,
                stream_id,
                header: &bytes,
            };
            let t = hopmesh_protocol::hop_token::mint_token(&req, &key).expect("mint");
            ProtocolClient::send_on(&mut s, &mut rr, &[t.as_slice(), &bytes].concat()).await
        }
    };

    // No assertion at all: the relay speaking for itself as a "relayed" stream.
    let bare = StreamHeader {
        origin: a,
        service: web,
        route: BoundedVec::empty(),
        assertion: None,
    };
    assert_eq!(send(bare).await, StreamOutcome::Refused);
    // An assertion for a, signed with the relay's own key.
    let r_key = Identity::load(&mesh.node("r").dir.path().join("node.key")).expect("r key");
    let forged =
        FlowAssertion::sign(r_key.signing_key(), &a_att, c, web, epoch, [1; 16]).expect("sign");
    let h = StreamHeader {
        origin: a,
        service: web,
        route: BoundedVec::empty(),
        assertion: Some(forged),
    };
    assert_eq!(send(h).await, StreamOutcome::Refused);
    // A genuine assertion by a (as if captured) is accepted once, then refused as a replay.
    let a_key = Identity::load(&mesh.node("a").dir.path().join("node.key")).expect("a key");
    let genuine =
        FlowAssertion::sign(a_key.signing_key(), &a_att, c, web, epoch, [2; 16]).expect("sign");
    let h = StreamHeader {
        origin: a,
        service: web,
        route: BoundedVec::empty(),
        assertion: Some(genuine),
    };
    assert_eq!(send(h.clone()).await, StreamOutcome::Status(0));
    assert_eq!(send(h).await, StreamOutcome::Refused);
    // b's genuine flow relayed by r: policy has no b-via-r route, so c refuses it.
    let b_att =
        std::fs::read(mesh.node("b").dir.path().join("attestation.bin")).expect("b's attestation");
    let b_key = Identity::load(&mesh.node("b").dir.path().join("node.key")).expect("b key");
    let b_flow =
        FlowAssertion::sign(b_key.signing_key(), &b_att, c, web, epoch, [3; 16]).expect("sign");
    let h = StreamHeader {
        origin: id("b"),
        service: web,
        route: BoundedVec::empty(),
        assertion: Some(b_flow),
    };
    assert_eq!(send(h).await, StreamOutcome::Refused);

    let refused = mesh.node("c").show()["counters"]["refused"].clone();
    assert_eq!(refused["flow_missing"], 1, "{refused}");
    assert_eq!(refused["flow_bad_signature"], 1, "{refused}");
    assert_eq!(refused["flow_replayed"], 1, "{refused}");
    assert_eq!(refused["origin_not_allowed_via_relay"], 1, "{refused}");
    mesh.shutdown().await;
}
