//! The verifier end to end over QUIC on 127.0.0.1: enrollment, refresh, refusals, bans,
//! revocation pushes, policy reload, reissue, audit and store integrity.

use std::collections::BTreeSet;
use std::time::Duration;

use hopmesh_protocol::enrollment::{Push, Refusal};
use hopmesh_protocol::hop_token::{GenerationGrant, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_tests::{GOOD_MEASUREMENT, TableFollower, TestNode, VerifierHarness, standard_policy};
use hopmesh_transport::verifier_client::{ClientError, PushStream};
use hopmesh_verifier::authority::{NodeRef, Settings};
use serde_json::Value;

const BAD_MEASUREMENT: Measurement = Measurement([0x66; 32]);

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> Refusal {
    match r {
        Err(ClientError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn enrolled(h: &VerifierHarness, name: &str) -> TestNode {
    let node = h.node().await;
    node.enroll(h.join_token(name, 600), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll");
    node
}

/// Reads pushes until none arrives for `quiet`.
async fn drain(stream: &mut PushStream, quiet: Duration) -> Vec<Push> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(p))) = tokio::time::timeout(quiet, stream.next()).await {
        out.push(p);
    }
    out
}

fn audit_reasons(h: &VerifierHarness, event: &str) -> Vec<String> {
    let records =
        hopmesh_transport::audit::read_since(&h.dir.path().join("audit.jsonl"), 0).expect("audit");
    records
        .iter()
        .filter(|r| r["event"] == event)
        .map(|r| {
            r.get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn enroll_attest_refresh() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let node = h.node().await;
    let first = node
        .enroll(h.join_token("a", 600), GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll");
    let a = first.get();
    assert_eq!(a.node_id, node.identity.node_id());
    assert_eq!(a.name.as_str(), "a");
    assert_eq!(
        a.segments.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        vec!["s1"]
    );
    assert_eq!(a.measurement, GOOD_MEASUREMENT);
    // Valid for the TTL from now, and usable from ATTESTATION_BACKDATE earlier (clocks behind).
    assert_eq!(
        a.not_after.secs_since(a.not_before),
        300 + hopmesh_protocol::attestation::ATTESTATION_BACKDATE
    );

    let second = node
        .refresh(GOOD_MEASUREMENT, h.now())
        .await
        .expect("refresh");
    assert!(second.get().serial > a.serial, "serials increase");
    assert_eq!(second.get().node_id, a.node_id);

    let nodes = h
        .admin()
        .call("GET", "/v1/nodes", None)
        .await
        .expect("nodes");
    assert_eq!(nodes[0]["name"], "a");
    assert_eq!(nodes[0]["node_id"], a.node_id.to_string());
    assert_eq!(audit_reasons(&h, "enroll").len(), 1);
    assert_eq!(audit_reasons(&h, "attest").len(), 1);
}

#[tokio::test]
async fn join_secrets_are_single_use_expire_and_must_exist() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let secret = h.join_token("a", 600);
    let copy = JoinSecret::from_bytes(*secret.expose());
    enrolled_with(&h, secret).await;
    // Reused, by another key.
    let thief = h.node().await;
    assert_eq!(
        refused(thief.enroll(copy, GOOD_MEASUREMENT, h.now()).await),
        Refusal::JoinSecret
    );
    // Unknown.
    assert_eq!(
        refused(
            thief
                .enroll(JoinSecret::from_bytes([9; 32]), GOOD_MEASUREMENT, h.now())
                .await
        ),
        Refusal::JoinSecret
    );
    // Expired.
    let short = h.join_token("b", 5);
    h.clock.advance(6);
    assert_eq!(
        refused(thief.enroll(short, GOOD_MEASUREMENT, h.now()).await),
        Refusal::JoinSecret
    );
    let reasons = audit_reasons(&h, "enroll_refused");
    assert_eq!(
        reasons,
        vec![
            "join_secret_used",
            "join_secret_unknown",
            "join_secret_expired"
        ]
    );
    let metrics = h
        .admin()
        .call("GET", "/metrics", None)
        .await
        .expect("metrics");
    let text = metrics.as_str().expect("text");
    assert!(
        text.contains("hopmesh_verifier_refusals_total{reason=\"join_secret_used\"} 1"),
        "{text}"
    );
}

async fn enrolled_with(h: &VerifierHarness, secret: JoinSecret) -> TestNode {
    let node = h.node().await;
    node.enroll(secret, GOOD_MEASUREMENT, h.now())
        .await
        .expect("enroll");
    node
}

#[tokio::test]
async fn wrong_measurement_is_refused_on_enroll_and_refresh() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let node = h.node().await;
    assert_eq!(
        refused(
            node.enroll(h.join_token("a", 600), BAD_MEASUREMENT, h.now())
                .await
        ),
        Refusal::Measurement
    );
    let good = enrolled(&h, "a").await;
    assert_eq!(
        refused(good.refresh(BAD_MEASUREMENT, h.now()).await),
        Refusal::Measurement
    );
    assert!(good.refresh(GOOD_MEASUREMENT, h.now()).await.is_ok());
    // A name that policy does not know cannot even get a join secret.
    let now = h.now();
    let name = hopmesh_protocol::ids::NodeName::new("zz").expect("name");
    assert!(
        h.shared()
            .authority()
            .create_join_token(&name, None, 60, now)
            .is_err()
    );
}

#[tokio::test]
async fn bans_hold_on_refresh_on_reenroll_and_across_restarts() {
    let mut h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let spare = h.join_token("a", 600);
    let a = enrolled(&h, "a").await;
    h.admin()
        .call("POST", "/v1/ban", Some(serde_json::json!({"node": "a"})))
        .await
        .expect("ban");
    assert_eq!(
        refused(a.refresh(GOOD_MEASUREMENT, h.now()).await),
        Refusal::Revoked
    );
    // A new key with a join secret issued for the banned name.
    let fresh = h.node().await;
    assert_eq!(
        refused(fresh.enroll(spare, GOOD_MEASUREMENT, h.now()).await),
        Refusal::Revoked
    );
    assert_eq!(audit_reasons(&h, "enroll_refused"), vec!["name_banned"]);
    // No new join secret for the name either.
    let err = h
        .admin()
        .call(
            "POST",
            "/v1/join-tokens",
            Some(serde_json::json!({"name": "a"})),
        )
        .await;
    assert!(err.expect_err("banned name").contains("banned"));

    h.restart().await.expect("restart");
    let a = TestNode::connect(&h, a.identity).await;
    assert_eq!(
        refused(a.refresh(GOOD_MEASUREMENT, h.now()).await),
        Refusal::Revoked,
        "ban survives a restart"
    );
}

#[tokio::test]
async fn revoke_is_pushed_at_once_and_cuts_the_node_off() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let a = enrolled(&h, "a").await;
    let b = enrolled(&h, "b").await;
    let c = enrolled(&h, "c").await;
    let mut sa = a.subscribe().await.expect("subscribe");
    let mut sb = b.subscribe().await.expect("subscribe");
    let mut sc = c.subscribe().await.expect("subscribe");
    let mut b_table = TableFollower::default();
    for (i, s) in [&mut sa, &mut sb, &mut sc].into_iter().enumerate() {
        let pushed = drain(s, Duration::from_millis(300)).await;
        assert!(matches!(pushed.first(), Some(Push::Config(_))));
        if i == 1 {
            assert_eq!(b_table.feed(&pushed), Ok(1), "b's snapshot");
        }
    }

    let started = std::time::Instant::now();
    let out = h
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "a"})))
        .await
        .expect("revoke");
    assert_eq!(out["revocation_version"], 1);
    let pushed_b = drain(&mut sb, Duration::from_millis(300)).await;
    let elapsed = started.elapsed();
    let a_id = a.identity.node_id();
    assert!(
        pushed_b
            .iter()
            .any(|p| matches!(p, Push::Compromised { peer, .. } if *peer == a_id)),
        "{pushed_b:?}"
    );
    assert!(
        pushed_b
            .iter()
            .any(|p| matches!(p, Push::Revocations { .. }))
    );
    // b's new table no longer names a.
    assert!(b_table.feed(&pushed_b).expect("b's table applies") >= 1);
    assert!(b_table.table().is_some_and(|t| !t.peers.contains(&a_id)));
    assert!(elapsed < Duration::from_secs(2), "push took {elapsed:?}");
    // c gets the new list; a's own stream ends with an error, not a clean finish.
    let pushed_c = drain(&mut sc, Duration::from_millis(300)).await;
    assert!(
        pushed_c
            .iter()
            .any(|p| matches!(p, Push::Revocations { .. }))
    );
    let end = tokio::time::timeout(Duration::from_secs(2), sa.next())
        .await
        .expect("a's stream ends");
    let end = match end {
        Ok(Some(_)) => tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match sa.next().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("ends"),
        other => other,
    };
    assert!(
        end.is_err(),
        "revoked node's stream must end with an error: {end:?}"
    );
    let a2 = TestNode::connect(&h, a.identity).await;
    assert_eq!(
        refused(a2.refresh(GOOD_MEASUREMENT, h.now()).await),
        Refusal::Revoked
    );
    assert!(
        h.admin()
            .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "a"})))
            .await
            .is_err(),
        "already revoked"
    );
}

#[tokio::test]
async fn policy_reload_changes_exactly_the_affected_tables() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let nodes = [
        enrolled(&h, "a").await,
        enrolled(&h, "b").await,
        enrolled(&h, "c").await,
    ];
    let mut streams = Vec::new();
    for n in &nodes {
        let mut s = n.subscribe().await.expect("subscribe");
        drain(&mut s, Duration::from_millis(300)).await;
        streams.push(s);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.identity.node_id()).collect();
    let before: Vec<_> = ids
        .iter()
        .map(|id| h.shared().authority().table(id))
        .collect();

    // Let s2 reach api.s1 (served by b): c's egress and b's ingress change; a's table does not.
    let policy = standard_policy() + "\n[[allow]]\nfrom = \"s2\"\nto = \"api.s1\"\n";
    std::fs::write(&h.policy_path, policy).expect("write");
    let out = h
        .admin()
        .call("POST", "/v1/policy/reload", None)
        .await
        .expect("reload");
    let changed: BTreeSet<&str> = out["changed"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(changed, BTreeSet::from(["b", "c"]));
    // The diff names the pairs: b and c are peers already (c serves web.s2 to s1), so the
    // reload adds and removes none.
    assert_eq!(out["nodes_changed"], 2);
    assert_eq!(
        (out["pairs_added"].as_u64(), out["pairs_removed"].as_u64()),
        (Some(0), Some(0))
    );

    let after: Vec<_> = ids
        .iter()
        .map(|id| h.shared().authority().table(id))
        .collect();
    assert_eq!(before[0], after[0], "a unchanged");
    assert_ne!(before[1], after[1], "b changed");
    assert_ne!(before[2], after[2], "c changed");
    let c_table = after[2].clone().expect("table");
    assert!(c_table.egress.may_route("api.s1.mesh", "mesh").is_ok());

    let pushed: Vec<Vec<Push>> = futures_drain(&mut streams).await;
    assert!(pushed[0].is_empty(), "a must get nothing: {:?}", pushed[0]);
    assert!(pushed[1].iter().any(|p| matches!(p, Push::TablePart(_))));
    assert!(pushed[2].iter().any(|p| matches!(p, Push::TablePart(_))));

    // A broken policy is refused and the old one stays.
    std::fs::write(&h.policy_path, "[[segment]]\nname = \"BAD\"\n").expect("write");
    let err = h
        .admin()
        .call("POST", "/v1/policy/reload", None)
        .await
        .expect_err("refused");
    assert!(err.contains("line 2"), "{err}");
    assert_eq!(h.shared().authority().table(&ids[2]), Some(c_table));
}

async fn futures_drain(streams: &mut [PushStream]) -> Vec<Vec<Push>> {
    let mut out = Vec::new();
    for s in streams.iter_mut() {
        out.push(drain(s, Duration::from_millis(300)).await);
    }
    out
}

fn grants(h: &VerifierHarness, x: &NodeId, y: &NodeId) -> Vec<GenerationGrant> {
    let now = h.now();
    h.shared().authority().grants(&PairIds::new(*x, *y), now)
}

#[tokio::test]
async fn reissue_changes_only_the_named_pair() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let nodes = [
        enrolled(&h, "a").await,
        enrolled(&h, "b").await,
        enrolled(&h, "c").await,
    ];
    let [a, b, c] = [0, 1, 2].map(|i| nodes[i].identity.node_id());
    let mut streams = Vec::new();
    for n in &nodes {
        let mut s = n.subscribe().await.expect("subscribe");
        drain(&mut s, Duration::from_millis(300)).await;
        streams.push(s);
    }
    let (ab, ac, bc) = (grants(&h, &a, &b), grants(&h, &a, &c), grants(&h, &b, &c));
    let now = h.now();
    let out = h
        .shared()
        .authority()
        .reissue(
            &NodeRef::Name("a".parse().expect("n")),
            &NodeRef::Name("b".parse().expect("n")),
            now,
        )
        .expect("reissue");
    assert_eq!(out.reissues, 1);
    assert!(
        ab.iter().all(|g| out.compromised.contains(&g.generation.0)),
        "old generations are compromised"
    );
    let ab2 = grants(&h, &a, &b);
    assert!(
        ab2.iter()
            .zip(&ab)
            .all(|(new, old)| new.generation > old.generation && new.seed != old.seed)
    );
    assert_eq!(grants(&h, &a, &c), ac);
    assert_eq!(grants(&h, &b, &c), bc);

    let pushed = futures_drain(&mut streams).await;
    for (i, peer) in [(0, b), (1, a)] {
        assert!(
            pushed[i]
                .iter()
                .any(|p| matches!(p, Push::Compromised { peer: x, .. } if *x == peer)),
            "{:?}",
            pushed[i]
        );
        assert!(pushed[i].iter().any(
            |p| matches!(p, Push::Seeds { peer: x, grants } if *x == peer && grants.contains(&ab2[0]))
        ));
    }
    assert!(pushed[2].is_empty(), "c must get nothing: {:?}", pushed[2]);
}

#[tokio::test]
async fn compromised_key_use_report_reissues_the_pair() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let a = enrolled(&h, "a").await;
    let b = enrolled(&h, "b").await;
    let (ai, bi) = (a.identity.node_id(), b.identity.node_id());
    let before = grants(&h, &ai, &bi);
    a.client
        .report(hopmesh_protocol::enrollment::Report {
            kind: hopmesh_protocol::enrollment::ReportKind::CompromisedKeyUse,
            peer: bi,
            generation: Some(before[0].generation),
            detail: hopmesh_protocol::wire::BoundedString::truncated("test"),
        })
        .await
        .expect("report");
    let after = grants(&h, &ai, &bi);
    assert!(after[0].generation > before[0].generation);
    let records =
        hopmesh_transport::audit::read_since(&h.dir.path().join("audit.jsonl"), 0).expect("audit");
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "compromised_key_use" && r["peer"] == bi.to_string())
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "reissue" && r["why"] == "compromised_key_use")
    );
}

#[tokio::test]
async fn audit_chain_breaks_when_a_record_is_edited() {
    let mut h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    enrolled(&h, "a").await;
    enrolled(&h, "b").await;
    let path = h.dir.path().join("audit.jsonl");
    assert!(
        hopmesh_transport::audit::verify(&path)
            .expect("valid")
            .records
            >= 4
    );
    h.stop().await;
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replacen("\"name\":\"a\"", "\"name\":\"x\"", 1)).expect("write");
    assert!(matches!(
        hopmesh_transport::audit::verify(&path),
        Err(hopmesh_transport::audit::AuditError::Broken { .. })
    ));
    assert!(
        h.restart().await.is_err(),
        "a verifier must not start on a tampered audit log"
    );
}

#[tokio::test]
async fn corrupt_or_missing_store_refuses_to_start() {
    let mut h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    h.stop().await;
    let store = h.dir.path().join("store.db");
    for f in ["store.db-wal", "store.db-shm"] {
        let _ = std::fs::remove_file(h.dir.path().join(f));
    }
    std::fs::write(&store, vec![0x5A; 16384]).expect("corrupt");
    let err = h.restart().await.expect_err("corrupt store");
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::remove_file(&store).expect("delete");
    let err = h.restart().await.expect_err("missing store");
    assert!(err.to_string().contains("init"), "{err}");
}

#[tokio::test]
async fn admin_api_requires_the_token() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let wrong = hopmesh_verifier::admin::AdminClient::new(&h.shared_admin_addr(), "nope");
    let err = wrong
        .call("GET", "/v1/nodes", None)
        .await
        .expect_err("unauthorized");
    // A client with the wrong token cannot check the server's proof, so it sends nothing
    // (the server's own 401 is tested in verifier/tests/admin_cli.rs).
    assert!(err.contains("did not prove"), "{err}");
    assert!(h.admin().call("GET", "/v1/nodes", None).await.is_ok());
}

trait AdminAddr {
    fn shared_admin_addr(&self) -> String;
}

impl AdminAddr for VerifierHarness {
    fn shared_admin_addr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.addr")).expect("admin.addr")
    }
}

/// Polls the audit log (bounded: 10 s) until a record matches.
async fn audit_record_within(h: &VerifierHarness, want: impl Fn(&Value) -> bool) -> Value {
    let path = h.dir.path().join("audit.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = hopmesh_transport::audit::read_since(&path, 0).expect("audit");
        if let Some(r) = records.into_iter().find(|r| want(r)) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no matching audit record within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue #12 item 2 over QUIC: every bogus enrollment from one key is refused and counted,
/// but the audit log gets one record and, after the interval (written by the service's
/// tick), one summary with the count.
#[tokio::test]
async fn bogus_enrollments_over_quic_cost_two_audit_records() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let thief = h.node().await;
    for i in 0..300u32 {
        let mut bytes = [0x5a; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        assert_eq!(
            refused(
                thief
                    .enroll(JoinSecret::from_bytes(bytes), GOOD_MEASUREMENT, h.now())
                    .await
            ),
            Refusal::JoinSecret
        );
    }
    assert_eq!(audit_reasons(&h, "enroll_refused"), ["join_secret_unknown"]);
    let metrics = h
        .admin()
        .call("GET", "/metrics", None)
        .await
        .expect("metrics");
    let text = metrics.as_str().expect("text");
    assert!(
        text.contains("hopmesh_verifier_refusals_total{reason=\"join_secret_unknown\"} 300"),
        "{text}"
    );
    assert!(
        text.contains("hopmesh_verifier_audit_aggregated_total 299"),
        "{text}"
    );
    h.clock.advance(61);
    let summary = audit_record_within(&h, |r| {
        r["event"] == "refusals_aggregated" && r["reason"] == "join_secret_unknown"
    })
    .await;
    assert_eq!(summary["count"], 300);
    assert_eq!(summary["node"], thief.identity.node_id().to_string());
    assert_eq!(audit_reasons(&h, "enroll_refused").len(), 1);
}

/// Issue #12 item 5 over QUIC: `z` is outside every allowed pair. A report naming it is
/// refused and reissues nothing; an operator reissue of the forbidden pair is refused.
#[tokio::test]
async fn reports_and_reissues_of_a_pair_policy_forbids_are_refused() {
    let policy = standard_policy()
        + "\n[[segment]]\nname = \"s3\"\n[[node]]\nname = \"z\"\nsegments = [\"s3\"]\n";
    let h = VerifierHarness::start(&policy, Settings::default()).await;
    let a = enrolled(&h, "a").await;
    let z = enrolled(&h, "z").await;
    let (ai, zi) = (a.identity.node_id(), z.identity.node_id());
    let before = grants(&h, &ai, &zi);
    let report = |peer| hopmesh_protocol::enrollment::Report {
        kind: hopmesh_protocol::enrollment::ReportKind::CompromisedKeyUse,
        peer,
        generation: Some(before[0].generation),
        detail: hopmesh_protocol::wire::BoundedString::truncated("test"),
    };
    assert_eq!(
        refused(a.client.report(report(zi)).await),
        Refusal::BadRequest
    );
    assert_eq!(
        refused(z.client.report(report(ai)).await),
        Refusal::BadRequest
    );
    assert_eq!(grants(&h, &ai, &zi), before, "nothing reissued");
    assert_eq!(
        audit_reasons(&h, "report_refused"),
        ["report_peer_not_in_table", "report_peer_not_in_table"]
    );
    let err = h
        .admin()
        .call(
            "POST",
            "/v1/reissue",
            Some(serde_json::json!({"a": "a", "b": "z"})),
        )
        .await
        .expect_err("not a pair");
    assert!(err.contains("not a pair"), "{err}");
    assert_eq!(grants(&h, &ai, &zi), before);
}

/// Requests that wait for a held authority lock wait off the runtime workers: while another
/// thread holds the lock, a verifier on a 2-worker runtime still completes new handshakes and
/// queues the waiting refreshes (`authority_waiting`); once released, every refresh succeeds.
/// With the requests parked on the lock on the workers, the handshake finished only after the
/// release, so `held` was already false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_the_authority_lock_never_freeze_the_runtime() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    let nodes = [
        enrolled(&h, "a").await,
        enrolled(&h, "b").await,
        enrolled(&h, "c").await,
    ];
    let held = Arc::new(AtomicBool::new(false));
    let (taken_tx, taken) = std::sync::mpsc::channel();
    let holder = {
        let (shared, held) = (h.shared().clone(), held.clone());
        std::thread::spawn(move || {
            let authority = shared.authority();
            held.store(true, Ordering::SeqCst);
            let _ = taken_tx.send(());
            std::thread::sleep(Duration::from_secs(3));
            held.store(false, Ordering::SeqCst);
            drop(authority);
        })
    };
    taken
        .recv_timeout(Duration::from_secs(10))
        .expect("the holder took the lock");
    let now = h.now();
    let refreshes: Vec<_> = nodes
        .iter()
        .map(|n| n.client.clone())
        .map(|c| {
            tokio::spawn(async move {
                c.refresh(GOOD_MEASUREMENT, hopmesh_tests::addresses(), now)
                    .await
            })
        })
        .collect();
    // Three refreshes against two slots: one waits in the queue.
    let waiting = || h.shared().metrics().authority_waiting.get();
    let started = std::time::Instant::now();
    while waiting() < 1 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        held.load(Ordering::SeqCst),
        "the check ran after the release"
    );
    assert_eq!(waiting(), 1, "two refreshes hold the slots, one waits");
    let fresh = h.node().await;
    assert!(
        held.load(Ordering::SeqCst),
        "a handshake completed while the lock was held"
    );
    holder.join().expect("holder");
    for r in refreshes {
        r.await
            .expect("no panic")
            .expect("the refresh succeeds after the release");
    }
    // The fresh connection's enrolled check may still be queued behind the refreshes.
    let drained = std::time::Instant::now();
    while waiting() > 0 && drained.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting(), 0, "the queue drains");
    drop(fresh);
}
