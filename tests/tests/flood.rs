//! Floods of the verifier's node port by keys that are not enrolled (issue 12, item 1) and
//! one live subscription per node (item 6): the per-connection limits hold, the budgets
//! refuse past their edge, and an enrolled node still refreshes within 1 s, also right after a
//! verifier restart. In process, 127.0.0.1 only; every flood is bounded in count and time.

use std::path::Path;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::Push;
use hopmesh_tests::flood::{Flooder, open_idle_bidi, uni_stream_attack};
use hopmesh_tests::{GOOD_MEASUREMENT, TestNode, VerifierHarness, standard_policy};
use hopmesh_transport::identity::Identity;
use hopmesh_verifier::authority::{NodeRef, Settings};
use hopmesh_verifier::service::{ConnectionBudgets, MAX_STREAMS_PER_CONNECTION};

/// Budgets small enough to fill from one loopback source in a test: the whole unauthenticated
/// pool is one source's share.
const POOL: usize = 16;

fn flood_settings() -> Settings {
    Settings {
        connections: ConnectionBudgets {
            max_unauthenticated: POOL,
            max_unauthenticated_per_source: POOL,
            // Held for the whole test.
            unauthenticated_deadline: Duration::from_secs(60),
            ..ConnectionBudgets::default()
        },
        ..Settings::default()
    }
}

/// Enrolls `name` with a key saved at `dir/name.key`; the enrolling connection is closed.
async fn enrolled_key(h: &VerifierHarness, dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.key"));
    Identity::generate()
        .expect("identity")
        .save_new(&path)
        .expect("save key");
    let node = TestNode::connect(h, Identity::load(&path).expect("key")).await;
    node.enroll(h.join_token(name, 60), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll");
    node.client.close();
    node.endpoint.close(0u32.into(), b"done");
    path
}

/// Connects with the key at `path` and refreshes; returns how long connect + refresh took.
async fn refresh_as(h: &VerifierHarness, path: &Path) -> (TestNode, Duration) {
    let started = Instant::now();
    let node = tokio::time::timeout(
        Duration::from_secs(5),
        TestNode::connect(h, Identity::load(path).expect("key")),
    )
    .await
    .expect("the enrolled node connects");
    node.refresh(GOOD_MEASUREMENT, h.now())
        .await
        .expect("the enrolled node refreshes");
    (node, started.elapsed())
}

fn refusals(h: &VerifierHarness, reason: &str) -> u64 {
    h.shared()
        .authority()
        .metrics()
        .connection_refusals
        .get_or_create(&[("reason", static_reason(reason))])
        .get()
}

fn static_reason(r: &str) -> &'static str {
    match r {
        "unauthenticated_full" => "unauthenticated_full",
        "unauthenticated_deadline" => "unauthenticated_deadline",
        "node_oldest_closed" => "node_oldest_closed",
        other => panic!("unknown reason {other}"),
    }
}

/// (a) The measured attack (issue 12): keys that are not enrolled opening 100 uni streams each
/// and writing 1.2 MB on each. The verifier allows no uni stream at all, so nothing is
/// buffered; request streams are capped per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaccepted_uni_streams_and_extra_request_streams_are_refused_by_the_transport() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let mut flood = Flooder::new(h.node_addr(), &h.pins);
    assert_eq!(flood.open(4).await, 4);
    for c in &flood.conns {
        let opened = uni_stream_attack(c, 100, 1_200_000, Duration::from_millis(500)).await;
        assert_eq!(
            opened, 0,
            "the verifier must allow no unidirectional stream"
        );
    }
    let bidi = open_idle_bidi(
        &flood.conns[0],
        MAX_STREAMS_PER_CONNECTION as usize + 4,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        bidi, MAX_STREAMS_PER_CONNECTION as usize,
        "request streams per connection are capped"
    );
    flood.shutdown().await;
    drop(h);
}

/// (b) A flood that holds every unauthenticated slot (and more, refused) does not keep an
/// enrolled node from connecting and refreshing within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_holding_every_unauthenticated_slot_does_not_keep_a_node_out() {
    let h = VerifierHarness::start(&standard_policy(), flood_settings()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let mut flood = Flooder::new(h.node_addr(), &h.pins);
    flood.open(POOL + 8).await;
    assert_eq!(
        flood.alive().await,
        POOL,
        "the pool holds exactly its budget"
    );
    assert!(
        refusals(&h, "unauthenticated_full") >= 8,
        "the connections past the budget are refused and counted"
    );
    let (_node, took) = refresh_as(&h, &a).await;
    assert!(
        took < Duration::from_secs(1),
        "refresh under flood took {took:?}"
    );
    assert_eq!(flood.alive().await, POOL, "the flood still holds its slots");
    flood.shutdown().await;
}

/// (c) Slots held, then a verifier restart: the budgets start empty, the flood refills only
/// the unauthenticated pool, and the enrolled node gets in and refreshes within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_held_across_a_verifier_restart_do_not_keep_nodes_out() {
    let mut h = VerifierHarness::start(&standard_policy(), flood_settings()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let mut flood = Flooder::new(h.node_addr(), &h.pins);
    flood.open(POOL).await;
    assert_eq!(flood.alive().await, POOL);
    h.restart().await.expect("restart");
    // The old connections died with the old process state; the flood comes back at once,
    // racing the node, with more than the pool.
    flood.close_all();
    let mut again = Flooder::new(h.node_addr(), &h.pins);
    let (refilled, (node, took)) = tokio::join!(again.open(POOL + 8), refresh_as(&h, &a));
    assert!(refilled >= POOL, "handshakes complete: {refilled}");
    assert!(
        took < Duration::from_secs(1),
        "refresh after the restart took {took:?}"
    );
    assert_eq!(
        again.alive().await,
        POOL,
        "the refilled pool holds its budget"
    );
    assert!(refusals(&h, "unauthenticated_full") >= 8);
    // The node's connection is not in that pool: it keeps working.
    node.refresh(GOOD_MEASUREMENT, h.now())
        .await
        .expect("refresh again");
    again.shutdown().await;
    flood.shutdown().await;
}

/// A key that is not enrolled is closed at its deadline; an enrolled node's connection is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_enrolled_is_closed_at_its_deadline() {
    let mut settings = flood_settings();
    settings.connections.unauthenticated_deadline = Duration::from_millis(500);
    let h = VerifierHarness::start(&standard_policy(), settings).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let (node, _) = refresh_as(&h, &a).await;
    let mut flood = Flooder::new(h.node_addr(), &h.pins);
    assert_eq!(flood.open(1).await, 1);
    let closed = tokio::time::timeout(Duration::from_secs(5), flood.conns[0].closed()).await;
    assert!(
        closed.is_ok(),
        "an unauthenticated connection must be closed"
    );
    assert_eq!(refusals(&h, "unauthenticated_deadline"), 1);
    // Past the deadline, the enrolled node's older connection still works.
    node.refresh(GOOD_MEASUREMENT, h.now())
        .await
        .expect("enrolled connection kept");
    flood.shutdown().await;
}

/// Above the Retry threshold every unvalidated attempt gets a QUIC Retry; an honest client
/// answers it and gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_attempts_must_validate_their_address_with_a_retry() {
    let mut settings = Settings::default();
    settings.connections.retry_above = 0;
    let h = VerifierHarness::start(&standard_policy(), settings).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let (_node, _) = refresh_as(&h, &a).await;
    let retries = h.shared().authority().metrics().retries.get();
    assert!(
        retries >= 2,
        "every connection went through a Retry: {retries}"
    );
}

/// An enrolled node at its per-node connection cap gets in by closing its own oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_past_its_connection_cap_closes_its_oldest_connection() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let cap = ConnectionBudgets::default().max_connections_per_node;
    let mut nodes = Vec::new();
    for _ in 0..cap {
        nodes.push(refresh_as(&h, &a).await.0);
    }
    let (_newest, _) = refresh_as(&h, &a).await;
    let oldest = nodes[0].client.connection().clone();
    let closed = tokio::time::timeout(Duration::from_secs(5), oldest.closed()).await;
    assert!(closed.is_ok(), "the oldest connection must be closed");
    assert_eq!(refusals(&h, "node_oldest_closed"), 1);
    for n in &nodes[1..] {
        n.refresh(GOOD_MEASUREMENT, h.now())
            .await
            .expect("the others are kept");
    }
}

/// Item 6: a second subscription of the same node (a reconnect while the old connection
/// lingers) replaces the first: the old push stream ends, the new one gets every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_subscription_of_a_node_replaces_the_first() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    let b = enrolled_key(&h, keys.path(), "b").await;
    let (first, _) = refresh_as(&h, &a).await;
    let mut old = first.subscribe().await.expect("first subscription");
    let (second, _) = refresh_as(&h, &a).await;
    let mut new = second.subscribe().await.expect("second subscription");
    // The old stream yields at most its snapshot, then ends (reset), within a bound.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match old.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the old subscription must end");
    assert!(ended.is_err(), "ended by a reset: {ended:?}");
    assert_eq!(
        h.shared()
            .authority()
            .metrics()
            .subscriptions_replaced
            .get(),
        1
    );
    // A change (b revoked) reaches the new stream.
    let b_id = Identity::load(&b).expect("key").node_id();
    let now = h.now();
    h.shared()
        .authority()
        .revoke(&NodeRef::Id(b_id), now)
        .expect("revoke b");
    let saw = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(p)) = new.next().await {
            if let Push::Revocations { .. } = p {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(saw, Ok(true), "the new subscription gets the revocation");
}

/// The node's endpoint takes no unidirectional stream either (the node uses none): a peer that
/// passed the handshake and the Hello cannot make it buffer data nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_open_unidirectional_streams_on_a_node() {
    let mesh = hopmesh_tests::mesh::Mesh::start(Settings::default()).await;
    let b = mesh.node("b").handle.as_ref().expect("running");
    let (b_id, b_addr) = (b.node.local, b.quic_addr);
    let dir = mesh.node("a").dir.path().to_owned();
    let c = hopmesh_tests::attacker::ProtocolClient::connect(&dir, b_id, b_addr).await;
    let opened = uni_stream_attack(&c.conn, 100, 1_200_000, Duration::from_millis(500)).await;
    assert_eq!(opened, 0, "the node must allow no unidirectional stream");
    // The connection itself is fine: data streams still open.
    assert!(c.open().await.is_some());
    drop(c);
    mesh.shutdown().await;
}

/// Item 6: a subscriber that cannot keep up is not dropped: once its queue overflows, what is
/// still queued is discarded and a fresh snapshot (starting with `Config`) follows on the same
/// stream, which stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_gets_a_resync_on_the_same_stream() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let a = enrolled_key(&h, keys.path(), "a").await;
    // Peers, so that every generation slot pushes seeds to a.
    enrolled_key(&h, keys.path(), "b").await;
    enrolled_key(&h, keys.path(), "c").await;
    let (node, _) = refresh_as(&h, &a).await;
    let mut pushes = node.subscribe().await.expect("subscribe");
    let metrics = h.shared().authority().metrics().clone();
    // a does not read: drive generation slots until its queue overflows (bounded).
    let generation = i64::try_from(h.settings.generation_secs).expect("fits");
    let started = Instant::now();
    for _ in 0..20_000 {
        if metrics.subscriber_resyncs.get() > 0 || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        h.clock.advance(generation);
        let now = h.now();
        h.shared().authority().tick(now);
    }
    assert_eq!(
        metrics.subscriber_resyncs.get(),
        1,
        "the queue overflowed once"
    );
    // Now a reads: old pushes (what the transport already held), then a fresh snapshot.
    let mut seen = 0usize;
    let resynced = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match pushes.next().await {
                Ok(Some(Push::Config(_))) if seen > 0 => return true,
                Ok(Some(_)) => seen += 1,
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(
        resynced,
        Ok(true),
        "a fresh snapshot must follow on the same stream"
    );
    // The stream stays: later changes still arrive.
    h.clock.advance(generation);
    let now = h.now();
    h.shared().authority().tick(now);
    let more = tokio::time::timeout(Duration::from_secs(5), pushes.next()).await;
    assert!(matches!(more, Ok(Ok(Some(_)))), "{more:?}");
}

/// A batch of nodes enrolling from one address (one host, or many VMs behind one NAT) while
/// keeping their connections: each enrolled connection moves to the enrolled pool within
/// `PROMOTE_POLL`, so the batch is never limited by that address's unauthenticated share.
/// Before the promotion poll, the 17th such node was refused `source_unauthenticated_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_enrolling_from_one_address_is_not_held_to_the_unauthenticated_share() {
    const BATCH: usize = 3 * hopmesh_verifier::service::MAX_UNAUTHENTICATED_PER_SOURCE;
    let mut policy = standard_policy() + "\n[[segment]]\nname = \"batch\"\n";
    for i in 0..BATCH {
        policy += &format!("[[node]]\nname = \"n{i}\"\nsegments = [\"batch\"]\n");
    }
    let h = VerifierHarness::start(&policy, Settings::default()).await;
    let mut kept = Vec::new();
    for i in 0..BATCH {
        let node = h.node().await;
        node.enroll(
            h.join_token(&format!("n{i}"), 60),
            GOOD_MEASUREMENT,
            h.now(),
        )
        .await
        .unwrap_or_else(|e| panic!("node {i} of the batch: {e:?}"));
        // Promoted within the poll interval, well before the next ones fill the share.
        tokio::time::sleep(hopmesh_verifier::service::PROMOTE_POLL * 2).await;
        kept.push(node);
    }
    let metrics = h.shared().authority().metrics().render();
    assert!(
        !metrics.contains("reason=\"source_unauthenticated_full\""),
        "{metrics}"
    );
    drop(kept);
}
