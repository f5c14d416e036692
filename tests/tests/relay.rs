//! Relayed routes: `[[route]] from = "a", to = "c", via = "r"`. Each hop mints its own token,
//! the origin's signed flow assertion travels end to end, and a relay cannot bridge segments
//! or replay flows.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use bytes::Bytes;
use hopmesh_node::splice::RelayTap;
use hopmesh_protocol::attestation::KeySet;
use hopmesh_protocol::control::{FlowAssertion, StreamHeader};
use hopmesh_protocol::flow_seal::{Ephemeral, FlowAnswer};
use hopmesh_protocol::hop_token::{EpochLength, PairIds};
use hopmesh_protocol::routing::MeshName;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_tests::attacker::{ProtocolClient, StreamOutcome, current_grant};
use hopmesh_tests::mesh::{Mesh, echo_through, pattern, sha256, socks_connect};
use hopmesh_transport::identity::Identity;
use hopmesh_verifier::authority::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    // Our own header: the token covers its hash, so mint with it.
    let minted = |bytes: &[u8], stream_id: u64| {
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
            header: bytes,
        };
        let t = hopmesh_protocol::hop_token::mint_token(&req, &key).expect("mint");
        [t.as_slice(), bytes].concat()
    };
    let send = |header: StreamHeader| {
        let relay = &relay;
        let minted = &minted;
        async move {
            let bytes = header.encode().expect("encode");
            let Some((mut s, mut rr, stream_id)) = relay.open().await else {
                return StreamOutcome::Refused;
            };
            ProtocolClient::send_on(&mut s, &mut rr, &minted(&bytes, stream_id)).await
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
    let forged = FlowAssertion::sign(r_key.signing_key(), &a_att, c, web, epoch, [1; 16], [1; 32])
        .expect("sign");
    let h = StreamHeader {
        origin: a,
        service: web,
        route: BoundedVec::empty(),
        assertion: Some(forged),
    };
    assert_eq!(send(h).await, StreamOutcome::Refused);
    // A genuine assertion by a, captured by the relay and presented on a stream of its own:
    // c answers (the assertion verifies), but the relay cannot make the first record that
    // proves the flow (it lacks a's private key for the assertion's public one), so c connects
    // no backend and resets. Then the same assertion is refused as a replay.
    let a_key = Identity::load(&mesh.node("a").dir.path().join("node.key")).expect("a key");
    let e_o = Ephemeral::generate(&ring::rand::SystemRandom::new()).expect("ephemeral");
    let genuine = FlowAssertion::sign(
        a_key.signing_key(),
        &a_att,
        c,
        web,
        epoch,
        [2; 16],
        e_o.public(),
    )
    .expect("sign");
    let h = StreamHeader {
        origin: a,
        service: web,
        route: BoundedVec::empty(),
        assertion: Some(genuine.clone()),
    };
    {
        let (mut s, mut rr, stream_id) = relay.open().await.expect("stream");
        let bytes = h.encode().expect("encode");
        s.write_all(&minted(&bytes, stream_id))
            .await
            .expect("write");
        let mut prefix = [0u8; 4];
        rr.read_exact(&mut prefix).await.expect("c answers");
        let mut body = vec![0u8; FlowAnswer::body_len(prefix).expect("answer length")];
        rr.read_exact(&mut body).await.expect("answer body");
        let answer = FlowAnswer::from_body(&body).expect("an answer");
        let keys: KeySet = mesh.verifier.pins.key_set().expect("pinned keys");
        answer
            .verify(&keys, &genuine, &c, now)
            .expect("c's answer is signed by c for this flow");
        // The relay's best try: a well-formed record under keys of its own making.
        let (mut forger, _) = hopmesh_protocol::flow_seal::fuzzing_pair([7; 32]);
        let mut record = Vec::new();
        forger.seal_data(b"GET / HTTP/1.1\r\n\r\n", &mut record);
        s.write_all(&record).await.expect("write");
        let mut byte = [0u8; 1];
        let got = tokio::time::timeout(Duration::from_secs(5), rr.read_exact(&mut byte)).await;
        assert!(matches!(got, Ok(Err(_))), "c resets the stream: {got:?}");
    }
    assert_eq!(send(h).await, StreamOutcome::Refused);
    // b's genuine flow relayed by r: policy has no b-via-r route, so c refuses it.
    let b_att =
        std::fs::read(mesh.node("b").dir.path().join("attestation.bin")).expect("b's attestation");
    let b_key = Identity::load(&mesh.node("b").dir.path().join("node.key")).expect("b key");
    let b_flow = FlowAssertion::sign(b_key.signing_key(), &b_att, c, web, epoch, [3; 16], [3; 32])
        .expect("sign");
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
    assert_eq!(refused["flow_record_bad"], 1, "{refused}");
    let counters = mesh.node("c").show()["counters"].clone();
    assert_eq!(
        counters["sealed_flows"], 0,
        "no flow got past its first record"
    );
    assert_eq!(
        counters["bytes_in"], 0,
        "no byte reached c's backend: {counters}"
    );
    mesh.shutdown().await;
}

/// Records what a relay forwards, and flips one byte at a chosen offset of one direction.
#[derive(Debug, Default)]
struct Tap {
    toward_serving: Mutex<Vec<u8>>,
    toward_origin: Mutex<Vec<u8>>,
    /// (toward the serving node?, offset in that direction's bytes) of the byte to flip.
    flip: Mutex<Option<(bool, usize)>>,
}

impl RelayTap for Tap {
    fn chunk(&self, _flow: u64, toward_serving: bool, chunk: &mut Bytes) {
        let seen = if toward_serving {
            &self.toward_serving
        } else {
            &self.toward_origin
        };
        let mut seen = seen.lock().expect("tap");
        let start = seen.len();
        seen.extend_from_slice(chunk);
        let mut flip = self.flip.lock().expect("tap");
        if let Some((dir, at)) = *flip
            && dir == toward_serving
            && (start..start + chunk.len()).contains(&at)
        {
            let mut changed = chunk.to_vec();
            changed[at - start] ^= 0x01;
            *chunk = Bytes::from(changed);
            *flip = None;
        }
    }
}

impl Tap {
    fn clear(&self) {
        self.toward_serving.lock().expect("tap").clear();
        self.toward_origin.lock().expect("tap").clear();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const MARKER: &[u8] = b"HOPMESH-PLAINTEXT-MARKER";

/// A payload of `len` bytes with the marker every 4 KiB.
fn marked(len: usize) -> Vec<u8> {
    let mut data = pattern(len, 5);
    for at in (0..len.saturating_sub(MARKER.len())).step_by(4096) {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_forwards_only_ciphertext_and_cannot_change_it() {
    let mesh = relay_mesh().await;
    let tap = Arc::new(Tap::default());
    assert!(
        mesh.node("r")
            .handle
            .as_ref()
            .expect("running")
            .node
            .set_relay_tap(tap.clone())
    );
    // 1. Byte-identical both ways, and the relay saw every byte, none of them in clear.
    let data = Arc::new(marked(1 << 20));
    assert!(
        contains(&data, MARKER),
        "the check finds the marker in clear bytes"
    );
    let tcp = socks_connect(mesh.node("a").socks, "web.s2.mesh", 80)
        .await
        .expect("relayed connect");
    let back = tokio::time::timeout(Duration::from_secs(60), echo_through(tcp, data.clone()))
        .await
        .expect("in time")
        .expect("io");
    assert_eq!(sha256(&back), sha256(&data));
    for (dir, seen) in [("up", &tap.toward_serving), ("down", &tap.toward_origin)] {
        let seen = seen.lock().expect("tap");
        assert!(
            seen.len() >= data.len(),
            "{dir}: the relay forwarded {} bytes of a {}-byte flow",
            seen.len(),
            data.len()
        );
        assert!(!contains(&seen, MARKER), "{dir}: the relay saw plaintext");
    }
    for n in ["a", "c"] {
        assert_eq!(
            mesh.node(n).show()["counters"]["sealed_flows"],
            1,
            "{n} sealed the flow"
        );
    }
    // 2. One byte flipped toward the serving node, deep in the data: c resets the stream, the
    // app sees an error, never a clean short echo.
    let bad = |n: &str| {
        mesh.node(n).show()["counters"]["refused"]["flow_record_bad"]
            .as_u64()
            .unwrap_or(0)
    };
    for (toward_serving, end, other) in [(true, "c", "a"), (false, "a", "c")] {
        let other_before = bad(other);
        tap.clear();
        *tap.flip.lock().expect("tap") = Some((toward_serving, 300_000));
        let tcp = socks_connect(mesh.node("a").socks, "web.s2.mesh", 80)
            .await
            .expect("relayed connect");
        let got = tokio::time::timeout(Duration::from_secs(60), echo_through(tcp, data.clone()))
            .await
            .expect("in time");
        assert!(
            got.is_err(),
            "a changed record must cut the flow with an error, got {} clean bytes",
            got.map(|b| b.len()).unwrap_or(0)
        );
        assert!(
            tap.flip.lock().expect("tap").is_none(),
            "the byte was flipped"
        );
        let refused = mesh.node(end).show()["counters"]["refused"].clone();
        assert_eq!(
            refused["flow_record_bad"], 1,
            "{end} refused the record: {refused}"
        );
        let audited = mesh
            .node(end)
            .audit()
            .into_iter()
            .filter(|r| r["reason"] == "flow_record_bad")
            .count();
        assert_eq!(audited, 1, "{end} audited the refusal");
        assert_eq!(bad(other), other_before, "{other} received nothing changed");
    }
    mesh.shutdown().await;
}

/// With one-second epochs, a flow that lasts several seconds moves to new keys in both
/// directions (at least every epoch) and stays byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_flows_move_to_new_keys_every_epoch() {
    let settings = Settings {
        epoch: EpochLength::from_secs(1).expect("1 s"),
        ..Settings::default()
    };
    let mesh = Mesh::start_with(settings, RELAY, &["r"]).await;
    let tcp = socks_connect(mesh.node("a").socks, "web.s2.mesh", 80)
        .await
        .expect("relayed connect");
    let (mut rd, mut wr) = tcp.into_split();
    let mut sent = Vec::new();
    let mut back = Vec::new();
    // Seven writes half a second apart (3.5 s): bounded in count and time.
    for i in 0..7u8 {
        let chunk = pattern(10_000, u64::from(i) + 1);
        wr.write_all(&chunk).await.expect("write");
        sent.extend_from_slice(&chunk);
        let mut got = vec![0u8; chunk.len()];
        tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        back.extend_from_slice(&got);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wr.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut rest))
        .await
        .expect("end in time")
        .expect("clean end");
    assert!(rest.is_empty());
    assert_eq!(sha256(&back), sha256(&sent));
    for n in ["a", "c"] {
        let updates = mesh.node(n).show()["counters"]["seal_key_updates"]
            .as_u64()
            .expect("counter");
        // 3.5 s of writes with one-second epochs: at least two updates, at most one per write.
        assert!((2..=7).contains(&updates), "{n}: {updates} key updates");
    }
    mesh.shutdown().await;
}

/// A relay that policy also lets use the service itself (it is in an allowed segment): the
/// serving node still judges the relayed flow by the origin's assertion and the route, never
/// by the relay's own rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_may_use_the_service_itself_still_relays_as_a_relay() {
    const MEMBER_RELAY: &str = "\n[[node]]\nname = \"r\"\nsegments = [\"s1\"]\n[[route]]\nfrom = \"a\"\nto = \"c\"\nvia = \"r\"\n";
    let mesh = Mesh::start_with(Settings::default(), MEMBER_RELAY, &["r"]).await;
    let data = Arc::new(pattern(100_000, 9));
    let tcp = socks_connect(mesh.node("a").socks, "web.s2.mesh", 80)
        .await
        .expect("relayed connect");
    let back = tokio::time::timeout(Duration::from_secs(30), echo_through(tcp, data.clone()))
        .await
        .expect("in time")
        .expect("io");
    assert_eq!(sha256(&back), sha256(&data));
    let c = mesh.node("c").show();
    assert_eq!(c["counters"]["sealed_flows"], 1, "{c}");
    assert_eq!(c["counters"]["refused"], serde_json::json!({}), "{c}");
    // r's own flows still go direct.
    let tcp = socks_connect(mesh.node("r").socks, "web.s2.mesh", 80)
        .await
        .expect("direct connect");
    let small = Arc::new(pattern(1000, 3));
    assert_eq!(echo_through(tcp, small.clone()).await.expect("io"), *small);
    assert_eq!(mesh.node("c").show()["counters"]["sealed_flows"], 1);
    mesh.shutdown().await;
}
