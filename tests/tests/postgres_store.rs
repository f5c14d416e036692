//! The mesh on a PostgreSQL store (a throwaway cluster this test starts and stops): data
//! flows, a revoke is enforced and outlives a verifier restart, the audit chain verifies
//! against the database, and a second serving verifier on the same database is refused.

#[path = "../../verifier/src/store/pg_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg_cluster;

use std::sync::Arc;
use std::time::Duration;

use hopmesh_tests::mesh::{Mesh, echo_through, pattern, sha256, socks_connect};
use hopmesh_verifier::authority::Settings;
use hopmesh_verifier::datadir::DataDir;
use hopmesh_verifier::error::VerifierError;
use hopmesh_verifier::store::{PgTarget, StoreError, StoreSpec};
use pg_cluster::PgCluster;

fn pg_store(cluster: &PgCluster) -> StoreSpec {
    StoreSpec::Postgres(PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    })
}

async fn round_trip(mesh: &Mesh, host: &str) -> Result<(), u8> {
    let data = Arc::new(pattern(64 << 10, 3));
    let tcp = socks_connect(mesh.node("a").socks, host, 80).await?;
    let back = tokio::time::timeout(Duration::from_secs(20), echo_through(tcp, data.clone()))
        .await
        .expect("in time")
        .expect("io");
    assert_eq!(sha256(&back), sha256(&data));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_runs_on_a_postgres_store_and_a_revoke_outlives_a_restart() {
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let store = pg_store(&cluster);
    let mut mesh = Mesh::start_on_store(Settings::default(), store.clone()).await;
    assert!(
        !mesh.verifier.dir.path().join("store.db").exists(),
        "no SQLite file beside a PostgreSQL store"
    );
    round_trip(&mesh, "api.s1.mesh").await.expect("a reaches b");
    let out = mesh
        .verifier
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
        .await
        .expect("revoke");
    assert_eq!(out["revocation_version"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        round_trip(&mesh, "api.s1.mesh").await,
        Err(2),
        "b is cut off"
    );

    // The verifier restarts on the same database: the revocation, its version and the
    // audit anchor are there.
    mesh.verifier
        .restart()
        .await
        .expect("restart on the same database");
    let again = mesh
        .verifier
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
        .await;
    assert!(
        again.expect_err("already revoked").contains("revoked"),
        "the revocation is in the database"
    );
    let out = mesh
        .verifier
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "c"})))
        .await
        .expect("revoke c");
    assert_eq!(
        out["revocation_version"], 2,
        "the version counter persisted"
    );

    // While it serves, a second verifier on this database is refused.
    let data = DataDir::with_store(mesh.verifier.dir.path(), store.clone());
    match data.open() {
        Err(VerifierError::Store(StoreError::InUse(_))) => {}
        other => panic!("a second serving verifier must be refused: {other:?}"),
    }
    // A command that forgets `--store` is told where the store is.
    let e = DataDir::new(mesh.verifier.dir.path())
        .verify_audit()
        .expect_err("no --store");
    assert!(e.to_string().contains("--store postgres://"), "{e}");
    let report = data
        .verify_audit()
        .expect("the audit chain verifies against the database");
    assert!(report.anchored_seq.is_some_and(|s| s > 0), "{report:?}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_database_of_another_mesh_is_refused_at_init() {
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let store = pg_store(&cluster);
    let first = tempfile::tempdir().expect("tempdir");
    DataDir::with_store(first.path(), store.clone())
        .init()
        .expect("init");
    DataDir::with_store(first.path(), store.clone())
        .init()
        .expect("init again on its own database: the schema is checked, nothing overwritten");
    let second = tempfile::tempdir().expect("tempdir");
    let e = DataDir::with_store(&second.path().join("v"), store)
        .init()
        .expect_err("another mesh's database");
    assert!(
        matches!(e, VerifierError::Store(StoreError::WrongMesh(_))),
        "{e}"
    );
    assert!(
        !second.path().join("v").join("signing.key").exists(),
        "a refused init leaves no keys behind"
    );
    // `init` again, pointed at an empty database: refused, never a new empty store.
    let e = DataDir::with_store(first.path(), pg_store(&cluster))
        .init()
        .expect_err("an empty database for an existing data directory");
    assert!(e.to_string().contains("start the mesh over"), "{e}");
}

/// The database goes down under a serving verifier (docs/design.md §12, "When the database is
/// down"): what needs a commit is refused, promptly and with the reason, and nothing is
/// acknowledged; the verifier is fenced and issues nothing; once the database is back it
/// takes its lock again (nobody served meanwhile) and the pool reconnects.
#[tokio::test]
async fn with_the_database_down_nothing_is_acknowledged_and_it_recovers() {
    use hopmesh_protocol::enrollment::Refusal;
    use hopmesh_tests::{GOOD_MEASUREMENT, VerifierHarness, standard_policy};
    use hopmesh_transport::verifier_client::ClientError;
    let Some(cluster) = PgCluster::start_private() else {
        return;
    };
    let h = VerifierHarness::start_on(&standard_policy(), Settings::default(), pg_store(&cluster))
        .await;
    let a = h.node().await;
    a.enroll(h.join_token("a", 600), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll a");
    let b = h.node().await;
    b.enroll(h.join_token("b", 600), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll b");
    let spare = h.join_token("c", 600);

    cluster.stop();
    let started = std::time::Instant::now();
    let revoke = h
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
        .await;
    let e = revoke.expect_err("a revoke that cannot commit is not acknowledged");
    assert!(e.contains("PostgreSQL"), "the reason names the store: {e}");
    let bound = hopmesh_verifier::store::PG_CALL_TIMEOUT + Duration::from_secs(2);
    assert!(started.elapsed() < bound, "took {:?}", started.elapsed());
    let token = h
        .admin()
        .call(
            "POST",
            "/v1/join-tokens",
            Some(serde_json::json!({"name": "c"})),
        )
        .await;
    let e = token.expect_err("no join secret without a commit");
    assert!(e.contains("PostgreSQL"), "the reason names the store: {e}");
    let c = h.node().await;
    match c.enroll(spare.clone(), GOOD_MEASUREMENT, h.now()).await {
        Err(ClientError::Refused(Refusal::Internal)) => {}
        other => panic!("an enrolment needs its commit: {other:?}"),
    }
    // The serve lock went with the server: the verifier is fenced and issues nothing, since
    // it cannot tell a dead database from one another verifier now serves.
    match a.refresh(GOOD_MEASUREMENT, h.now()).await {
        Err(ClientError::Refused(Refusal::Internal)) => {}
        other => panic!("a fenced verifier issues nothing: {other:?}"),
    }

    let metrics = h.shared().metrics().render();
    let failures: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("hopmesh_verifier_store_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        failures >= 4,
        "each refused call is counted: {failures}\n{metrics}"
    );
    assert!(
        metrics.contains("hopmesh_verifier_store_failures_total{kind=\"fenced\"}"),
        "{metrics}"
    );

    cluster.restart();
    // The follower takes the lock again (at most every PG_RELOCK_INTERVAL) and reads the
    // change feed to its head (at least every FEED_POLL_INTERVAL); until then, fenced.
    let back = std::time::Instant::now();
    let out = loop {
        let r = h
            .admin()
            .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
            .await;
        match r {
            Ok(out) => break out,
            Err(e) if e.contains("fenced") && back.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the verifier serves again once the database is back: {e}"),
        }
    };
    println!("serving again {:?} after the database", back.elapsed());
    assert_eq!(
        out["revocation_version"], 1,
        "the refused revoke used no version"
    );
    a.refresh(GOOD_MEASUREMENT, h.now())
        .await
        .expect("the lock was taken again (nobody served meanwhile): issuing again");
    let c = h.node().await;
    c.enroll(spare, GOOD_MEASUREMENT, h.now())
        .await
        .expect("the join secret refused during the outage was not burned");
    match b.refresh(GOOD_MEASUREMENT, h.now()).await {
        Err(ClientError::Refused(Refusal::Revoked)) => {}
        other => panic!("b is revoked now: {other:?}"),
    }
}

/// A replica made from the first verifier's bundle, on the same database, with a TLS key of
/// its own: a node that pinned the first verifier accepts it, refreshes there (its record,
/// the seed master secret and the serial counter are shared), and a verifier of another mesh
/// is refused by the same pins. One verifier serves a database at a time (for now), so the
/// first stops before the replica starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_from_a_bundle_serves_nodes_pinned_to_the_first_verifier() {
    use hopmesh_tests::{GOOD_MEASUREMENT, VerifierHarness, addresses, standard_policy};
    use hopmesh_transport::verifier_client::VerifierClient;
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let store = pg_store(&cluster);
    let mut h =
        VerifierHarness::start_on(&standard_policy(), Settings::default(), store.clone()).await;
    let a = h.node().await;
    let first = a
        .enroll(h.join_token("a", 600), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll at the first verifier");
    let pass = b"correct horse battery staple";
    let bundle = DataDir::new(h.dir.path())
        .export_bundle(pass)
        .expect("export");
    h.running.take().expect("running").shutdown().await;

    let rdir = tempfile::tempdir().expect("tempdir");
    let root = rdir.path().join("replica");
    let replica = DataDir::with_store(&root, store.clone());
    let e = replica
        .init_replica(&bundle, b"not the passphrase, long enough")
        .expect_err("wrong passphrase");
    assert!(e.to_string().contains("bundle"), "{e}");
    let e = DataDir::new(&root)
        .init_replica(&bundle, pass)
        .expect_err("a replica on SQLite");
    assert!(e.to_string().contains("PostgreSQL"), "{e}");
    let e = DataDir::with_store(&root, pg_store(&cluster))
        .init_replica(&bundle, pass)
        .expect_err("a database nobody initialised");
    assert!(e.to_string().contains("init"), "{e}");
    assert!(
        !root.join("signing.key").exists(),
        "refused inits leave no keys"
    );
    let pins = replica.init_replica(&bundle, pass).expect("replica init");
    assert_eq!(pins, h.pins, "the replica hands out the mesh's pins");
    let own_key = std::fs::read(root.join("tls.key")).expect("tls.key");
    assert_ne!(
        own_key,
        std::fs::read(h.dir.path().join("tls.key")).expect("tls.key"),
        "a TLS key of its own"
    );

    let opts = hopmesh_verifier::ServeOptions {
        settings: Settings::default(),
        policy_path: h.policy_path.clone(),
        clock: h.clock.clone(),
        store: store.clone(),
    };
    let running = hopmesh_verifier::start(
        &root,
        opts,
        std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"),
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("tcp"),
    )
    .await
    .expect("the replica serves");
    let ep = hopmesh_transport::quic::endpoint(
        std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"),
        None,
    )
    .expect("endpoint");
    let client = VerifierClient::connect(&ep, running.node_addr, &a.identity, &h.pins)
        .await
        .expect("the node's pins accept the replica's certified key");
    let (_, second) = client
        .refresh(GOOD_MEASUREMENT, addresses(), h.now())
        .await
        .expect("a refresh at the replica");
    assert!(
        second.get().serial > first.get().serial,
        "serials increase across verifiers"
    );

    // A verifier of another mesh: refused at the handshake by the same pins.
    let other = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let e = VerifierClient::connect(&ep, other.node_addr(), &a.identity, &h.pins)
        .await
        .expect_err("another mesh's verifier");
    assert!(format!("{e}").contains("certified"), "{e}");
    running.shutdown().await;
    // Each verifier's audit chain verifies against its own anchor in the shared database.
    for dir in [h.dir.path(), root.as_path()] {
        DataDir::with_store(dir, store.clone())
            .verify_audit()
            .expect("the chain reaches its anchor");
    }
}

/// Waits (bounded) on `stream` for a push that `want` picks; returns it and how long it took.
async fn wait_push<T>(
    stream: &mut hopmesh_transport::verifier_client::PushStream,
    mut want: impl FnMut(&hopmesh_protocol::enrollment::Push) -> Option<T>,
) -> (T, Duration) {
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let p = stream.next().await.expect("push stream").expect("open");
            if let Some(t) = want(&p) {
                return t;
            }
        }
    })
    .await
    .expect("the push arrives within 10 s");
    (got, started.elapsed())
}

/// The version of a revocation-list push, verified under the mesh's pins.
fn list_version(
    pins: &hopmesh_transport::pins::Pins,
    p: &hopmesh_protocol::enrollment::Push,
) -> Option<u64> {
    use hopmesh_protocol::attestation::{KeySet, RevocationUpdate, verify_revocation_list};
    let hopmesh_protocol::enrollment::Push::Revocations { list } = p else {
        return None;
    };
    let keys = KeySet::new(pins.signing_keys().expect("signing keys")).expect("key set");
    match verify_revocation_list(list, &keys, None).expect("a list signed by the mesh") {
        RevocationUpdate::Newer(l) => Some(l.version),
        RevocationUpdate::Same => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_at_once_and_each_applies_the_others_changes() {
    use hopmesh_protocol::enrollment::Push;
    use hopmesh_protocol::ids::NodeName;
    use hopmesh_tests::{GOOD_MEASUREMENT, TestNode, VerifierHarness, standard_policy};
    use hopmesh_verifier::authority::NodeRef;
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let one =
        VerifierHarness::start_on(&standard_policy(), Settings::default(), pg_store(&cluster))
            .await;
    let two = one.replica().await;

    // A join secret made at one is used at the other; each sees the other's enrolment.
    let a = one.node().await;
    let first = a
        .enroll(two.join_token("a", 600), GOOD_MEASUREMENT, one.now())
        .await
        .expect("a enrolls at one with a secret made at two");
    let b = two.node().await;
    b.enroll(one.join_token("b", 600), GOOD_MEASUREMENT, two.now())
        .await
        .expect("b enrolls at two");
    let sees = |h: &VerifierHarness, name: &str| {
        h.shared()
            .authority()
            .nodes_view()
            .iter()
            .any(|n| n.name == name)
    };
    for _ in 0..100 {
        if sees(&one, "b") && sees(&two, "a") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sees(&one, "b") && sees(&two, "a"),
        "each replica applied the other's enrolment"
    );

    // Serials increase for one node across replicas, both ways.
    let a_at_two = TestNode::connect(&two, a.identity.try_clone().expect("clone")).await;
    let second = a_at_two
        .refresh(GOOD_MEASUREMENT, two.now())
        .await
        .expect("a refreshes at two");
    let third = a
        .refresh(GOOD_MEASUREMENT, one.now())
        .await
        .expect("a refreshes at one again");
    let serials = [first.get().serial, second.get().serial, third.get().serial];
    assert!(
        serials.windows(2).all(|w| w[0] < w[1]),
        "serials of one node increase across replicas: {serials:?}"
    );

    // b, subscribed at two, learns of a's revocation at one: the list and its compromised
    // generations.
    let mut pushes = b.subscribe().await.expect("b subscribes at two");
    let now = one.now();
    let out = one
        .shared()
        .authority()
        .revoke(&NodeRef::Name(NodeName::new("a").expect("name")), now)
        .expect("revoke a at one");
    assert_eq!(out.revocation_version, 1);
    let (version, took) = wait_push(&mut pushes, |p| {
        list_version(&two.pins, p).filter(|v| *v >= 1)
    })
    .await;
    assert_eq!(version, 1, "b got the list one signed");
    let (peer, _) = wait_push(&mut pushes, |p| match p {
        Push::Compromised { peer, .. } => Some(*peer),
        _ => None,
    })
    .await;
    assert_eq!(
        peer.to_string(),
        out.node_id,
        "b treats a's generations as compromised"
    );
    println!("cross-replica revocation propagation: {took:?}");
    assert!(
        two.shared()
            .authority()
            .nodes_view()
            .iter()
            .any(|n| n.name == "a" && n.revoked_at.is_some()),
        "two holds a as revoked"
    );
    let e = a_at_two
        .refresh(GOOD_MEASUREMENT, two.now())
        .await
        .expect_err("a revoked at one is refused at two");
    assert!(format!("{e}").to_lowercase().contains("revoked"), "{e}");

    // Revokes at both replicas at once: each gets its own version; both end on the list
    // that holds both.
    let c = one.node().await;
    c.enroll(one.join_token("c", 600), GOOD_MEASUREMENT, one.now())
        .await
        .expect("c enrolls");
    for _ in 0..100 {
        if sees(&two, "c") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s1, s2) = (one.shared().clone(), two.shared().clone());
    let now = one.now();
    let at_one = std::thread::spawn(move || {
        s1.authority()
            .revoke(&NodeRef::Name(NodeName::new("c").expect("name")), now)
    });
    let at_two = std::thread::spawn(move || {
        s2.authority()
            .revoke(&NodeRef::Name(NodeName::new("b").expect("name")), now)
    });
    let v1 = at_one
        .join()
        .expect("thread")
        .expect("revoke c at one")
        .revocation_version;
    let v2 = at_two
        .join()
        .expect("thread")
        .expect("revoke b at two")
        .revocation_version;
    let mut versions = [v1, v2];
    versions.sort_unstable();
    assert_eq!(versions, [2, 3], "unique versions across replicas");
    for _ in 0..100 {
        let at = |h: &VerifierHarness| h.shared().authority().revocation_list().map(|l| l.version);
        if at(&one) == Some(3) && at(&two) == Some(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for h in [&one, &two] {
        assert_eq!(
            h.shared().authority().revocation_list().map(|l| l.version),
            Some(3),
            "both replicas hold the last list"
        );
        let revoked: Vec<String> = h
            .shared()
            .authority()
            .nodes_view()
            .into_iter()
            .filter(|n| n.revoked_at.is_some())
            .map(|n| n.name)
            .collect();
        assert_eq!(revoked.len(), 3, "{revoked:?}");
    }
    let applied = two.shared().metrics().render();
    assert!(
        applied.contains("feed_applied_total{kind=\"list\"}"),
        "{applied}"
    );
    let (mut one, mut two) = (one, two);
    two.stop().await;
    one.stop().await;
}

/// Waits (bounded) until every node of `mesh` is subscribed again; fails if any node's own
/// attestation stops being usable meanwhile (it would fail closed). Returns the time taken.
async fn all_connected(mesh: &Mesh, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let shows: Vec<serde_json::Value> = mesh.nodes.values().map(|n| n.show()).collect();
        for s in &shows {
            assert!(s["self_permit"].is_null(), "a node failed closed: {s}");
        }
        if shows.iter().all(|s| s["verifier_connected"] == true) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "nodes not connected again within {within:?}: {shows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failovers(mesh: &Mesh) -> u64 {
    mesh.nodes
        .values()
        .map(|n| {
            n.show()["counters"]["verifier_failovers"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_listing_two_replicas_move_to_the_live_one_and_none_fails_closed() {
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let mut mesh = Mesh::start_replicated(Settings::default(), pg_store(&cluster), 1).await;
    assert_eq!(mesh.verifier_addrs().len(), 2);
    round_trip(&mesh, "api.s1.mesh").await.expect("a reaches b");
    let before = failovers(&mesh);

    // The first verifier stops: its nodes move to the replica; data keeps flowing.
    mesh.verifier.stop().await;
    let took = all_connected(&mesh, Duration::from_secs(20)).await;
    println!("every node subscribed again {took:?} after the first verifier stopped");
    round_trip(&mesh, "api.s1.mesh")
        .await
        .expect("a reaches b with one verifier gone");
    // A revoke at the replica is enforced by every node, wherever it was subscribed.
    mesh.replicas[0]
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
        .await
        .expect("revoke b at the replica");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        round_trip(&mesh, "api.s1.mesh").await,
        Err(2),
        "b is cut off"
    );

    // Rolling: the first comes back, then the replica stops; nodes move back.
    mesh.verifier
        .restart()
        .await
        .expect("the first verifier again");
    mesh.replicas[0].stop().await;
    // b is revoked: it never subscribes again; the others do.
    let mut b = mesh.nodes.remove("b").expect("b");
    let took = all_connected(&mesh, Duration::from_secs(20)).await;
    println!("every live node subscribed again {took:?} after the replica stopped");
    assert!(
        failovers(&mesh) > before,
        "the nodes counted their moves ({before} before)"
    );
    assert!(
        mesh.verifier
            .admin()
            .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "b"})))
            .await
            .expect_err("already revoked")
            .contains("revoked"),
        "the first verifier knows b is revoked"
    );
    if let Some(h) = b.handle.take() {
        h.shutdown().await;
    }
    mesh.replicas[0].restart().await.expect("the replica again");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reloaded_at_one_replica_is_served_by_every_replica() {
    use hopmesh_protocol::ids::NodeName;
    use hopmesh_tests::{VerifierHarness, standard_policy};
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let one =
        VerifierHarness::start_on(&standard_policy(), Settings::default(), pg_store(&cluster))
            .await;
    let mut two = one.replica().await;
    let version = |h: &VerifierHarness| h.shared().authority().policy_version();
    assert_eq!(
        (version(&one), version(&two)),
        (1, 1),
        "the first file is the mesh's policy"
    );
    let may_enroll_d = |h: &VerifierHarness| {
        let now = h.now();
        h.shared()
            .authority()
            .create_join_token(&NodeName::new("d").expect("name"), None, 600, now)
            .is_ok()
    };
    assert!(!may_enroll_d(&two), "d is not in the policy yet");

    // One's file gains a node; a reload there is applied at two.
    let with_d = standard_policy() + "\n[[node]]\nname = \"d\"\nsegments = [\"s1\"]\n";
    std::fs::write(&one.policy_path, &with_d).expect("write policy");
    let out = one
        .admin()
        .call("POST", "/v1/policy/reload", None)
        .await
        .expect("reload at one");
    assert!(out.is_object(), "{out}");
    for _ in 0..100 {
        if version(&two) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((version(&one), version(&two)), (2, 2));
    assert!(may_enroll_d(&two), "two serves the reloaded policy");

    // Two restarts with its own, older file: it serves the mesh's policy, not the file.
    two.restart().await.expect("restart two");
    assert_eq!(version(&two), 2);
    assert!(
        may_enroll_d(&two),
        "the database's policy, not the stale file"
    );
    let mut one = one;
    two.stop().await;
    one.stop().await;
}

fn held_version(h: &hopmesh_tests::VerifierHarness) -> u64 {
    h.shared()
        .authority()
        .revocation_list()
        .map_or(0, |l| l.version)
}

/// Revokes storming three replicas at once, through the admin API: every one is acknowledged
/// (a replica that lost the race for the next list version follows the feed and tries again,
/// and between rounds releases its lock for a random pause), the versions acknowledged are
/// unique with none skipped, and every replica ends holding the newest list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revokes_storming_three_replicas_are_all_acknowledged_with_unique_versions() {
    use hopmesh_tests::{GOOD_MEASUREMENT, VerifierHarness, standard_policy};
    const NODES: usize = 24;
    let Some(cluster) = PgCluster::shared() else {
        return;
    };
    let mut policy = standard_policy();
    for i in 0..NODES {
        policy.push_str(&format!(
            "\n[[node]]\nname = \"n{i}\"\nsegments = [\"s1\"]\n"
        ));
    }
    // Every node enrols from 127.0.0.1 and keeps its connection: room for all of them.
    let settings = Settings {
        connections: hopmesh_verifier::service::ConnectionBudgets {
            max_unauthenticated: 2 * NODES,
            max_unauthenticated_per_source: 2 * NODES,
            ..Default::default()
        },
        ..Settings::default()
    };
    let one = VerifierHarness::start_on(&policy, settings, pg_store(&cluster)).await;
    let replicas = [one.replica().await, one.replica().await];
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let n = one.node().await;
        n.enroll(
            one.join_token(&format!("n{i}"), 600),
            GOOD_MEASUREMENT,
            one.now(),
        )
        .await
        .expect("enrolls");
        nodes.push(n);
    }
    let all = [&one, &replicas[0], &replicas[1]];
    let knows_all = |h: &VerifierHarness| h.shared().authority().nodes_view().len() >= NODES;
    for _ in 0..200 {
        if all.iter().all(|h| knows_all(h)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        all.iter().all(|h| knows_all(h)),
        "every replica knows every node"
    );

    // Node i is revoked at replica i % 3, all at once.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..NODES {
        let admin = all[i % 3].admin();
        calls.spawn(async move {
            let node = serde_json::json!({"node": format!("n{i}")});
            (i % 3, admin.call("POST", "/v1/revoke", Some(node)).await)
        });
    }
    let mut versions = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (replica, answer) = done.expect("the call task");
        let answer =
            answer.unwrap_or_else(|e| panic!("a revoke at replica {replica} refused: {e}"));
        versions.push(answer["revocation_version"].as_u64().expect("version"));
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=NODES as u64).collect::<Vec<_>>(),
        "unique versions, none skipped"
    );
    for _ in 0..200 {
        if all.iter().all(|h| held_version(h) == NODES as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for h in all {
        assert_eq!(
            held_version(h),
            NODES as u64,
            "every replica holds the newest list"
        );
    }
    let retried: usize = all
        .iter()
        .map(|h| {
            h.shared()
                .metrics()
                .render()
                .lines()
                .filter(|l| {
                    l.starts_with("hopmesh_verifier_store_failures_total{kind=\"stale_version\"}")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
                .sum::<usize>()
        })
        .sum();
    println!("{NODES} revokes over 3 replicas at once: {retried} lost races, all acknowledged");
}
