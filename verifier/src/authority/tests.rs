//! Unit tests of the authority: a real SQLite store in a temp dir, a fixed clock, fixed keys.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use hopmesh_protocol::attestation::{
    ATTESTATION_BACKDATE, KeySet, RevocationUpdate, SigningKey, verify_attestation,
    verify_revocation_list,
};
use hopmesh_protocol::enrollment::{Address, Push, Refusal, Report, ReportKind};
use hopmesh_protocol::hop_token::{Generation, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::secret::{JoinSecret, MasterSecret, SigningSeed};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedString;
use hopmesh_transport::audit::{AuditLog, read_since};
use serde_json::Value;
use tokio::sync::mpsc;

use super::*;
use crate::store::SqliteStore;
use hopmesh_protocol::table_sync::{TableAssembler, TableChange, TableEntry, TableUpdate};

/// The table updates whole in `pushes` (parts reassembled in order).
fn table_updates(pushes: &[Push]) -> Vec<TableUpdate> {
    let mut a = TableAssembler::new();
    pushes
        .iter()
        .filter_map(|p| match p {
            Push::TablePart(part) => a.push(part).expect("parts in order"),
            _ => None,
        })
        .collect()
}

/// Mid-slot: generation slot 6 000 000 runs from 1 800 000 000 to 1 800 000 300.
const T0: u64 = 1_800_000_100;
const SLOT0: u64 = T0 / 300;
const NEXT_EDGE: u64 = (SLOT0 + 1) * 300;
const GOOD: Measurement = Measurement([7; 32]);
const BAD: Measurement = Measurement([8; 32]);

fn t(secs: u64) -> UnixTime {
    UnixTime::from_secs(secs)
}

fn name(s: &str) -> NodeName {
    NodeName::new(s).expect("valid node name")
}

/// The standard topology: a, b in s1; c in s2; api on b, db on a, web on c; s1 -> s1 and
/// s1 -> web.s2. Every node pairs with both others.
fn standard_policy() -> String {
    // The one fixture every test uses (docs/testing.md, "Standard topology").
    include_str!("../../../tests/fixtures/standard-policy.toml")
        .replace("{measurement}", &GOOD.to_string())
        .replace("{api}", "127.0.0.1:18080")
        .replace("{db}", "127.0.0.1:18082")
        .replace("{web}", "127.0.0.1:18081")
}

/// Two islands: a, b in s1 (api on b); c, d in s2 (web on d). Pairs: a-b and c-d. With
/// `s1_open = false` the s1 -> s1 rule is gone and a, b lose each other.
fn islands_policy(s1_open: bool) -> String {
    let s1_rule = if s1_open {
        "[[allow]]\nfrom = \"s1\"\nto = \"s1\"\n"
    } else {
        ""
    };
    format!(
        r#"[attestation]
measurements = ["{GOOD}"]
[[segment]]
name = "s1"
[[segment]]
name = "s2"
[[node]]
name = "a"
segments = ["s1"]
[[node]]
name = "b"
segments = ["s1"]
[[node]]
name = "c"
segments = ["s2"]
[[node]]
name = "d"
segments = ["s2"]
[[service]]
name = "api"
segment = "s1"
node = "b"
backend = "127.0.0.1:18080"
[[service]]
name = "web"
segment = "s2"
node = "d"
backend = "127.0.0.1:18081"
{s1_rule}[[allow]]
from = "s2"
to = "s2"
"#
    )
}

fn signing() -> SigningKey {
    SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]))
}

/// A fixed key per test node.
fn spki(i: u8) -> Vec<u8> {
    vec![i; 44]
}

fn id(i: u8) -> NodeId {
    NodeId::from_spki(&spki(i))
}

fn addresses(i: u8) -> Vec<Address> {
    vec![Address::truncated(&format!(
        "127.0.0.1:{}",
        20_000 + u16::from(i)
    ))]
}

fn open_authority(
    dir: &Path,
    policy: &str,
    settings: Settings,
    create: bool,
    now: UnixTime,
) -> Authority {
    let path = dir.join("store.db");
    let store = if create {
        SqliteStore::create(&path)
    } else {
        SqliteStore::open(&path)
    }
    .expect("store opens");
    let (audit, _) = AuditLog::open(&dir.join("audit.jsonl")).expect("audit log opens");
    Authority::new(
        Parts {
            settings,
            signing: signing(),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit,
            metrics: Arc::new(Metrics::default()),
            policy: Policy::parse(policy).expect("test policy parses"),
        },
        now,
    )
    .expect("authority builds")
}

/// An authority on a fresh temp-dir store.
struct Harness {
    dir: tempfile::TempDir,
    policy: String,
    settings: Settings,
    auth: Authority,
}

impl Harness {
    fn new(policy: String) -> Self {
        Self::with_settings(policy, Settings::default())
    }

    fn with_settings(policy: String, settings: Settings) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let auth = open_authority(dir.path(), &policy, settings.clone(), true, t(T0));
        Self {
            dir,
            policy,
            settings,
            auth,
        }
    }

    /// Drops the authority and builds a new one on the same store at `now`.
    fn reopen(self, now: UnixTime) -> Self {
        let Self {
            dir,
            policy,
            settings,
            auth,
        } = self;
        drop(auth);
        let auth = open_authority(dir.path(), &policy, settings.clone(), false, now);
        Self {
            dir,
            policy,
            settings,
            auth,
        }
    }

    fn token(&mut self, node: &str) -> JoinSecret {
        self.auth
            .create_join_token(&name(node), None, 3600, t(T0))
            .expect("join token")
            .0
    }

    fn try_enroll(
        &mut self,
        key: u8,
        secret: &JoinSecret,
        measurement: Measurement,
        addrs: &[Address],
        now: UnixTime,
    ) -> Result<Vec<u8>, Refusal> {
        let key = spki(key);
        self.auth.enroll(
            &Enrollment {
                spki: &key,
                join_secret: secret,
                measurement,
                addresses: addrs,
                hostname: "test-host",
            },
            now,
        )
    }

    /// Enrolls key `key` under `node` with a fresh token; panics on refusal.
    fn enroll(&mut self, key: u8, node: &str) -> NodeId {
        let secret = self.token(node);
        self.try_enroll(key, &secret, GOOD, &addresses(key), t(T0))
            .expect("enrollment accepted");
        id(key)
    }

    fn refusals(&self, reason: &'static str) -> u64 {
        self.auth
            .metrics()
            .refusals
            .get_or_create(&[("reason", reason)])
            .get()
    }

    fn pushes(&self, kind: &'static str) -> u64 {
        self.auth
            .metrics()
            .pushes
            .get_or_create(&[("kind", kind)])
            .get()
    }

    fn subscribe(&mut self, node: &NodeId) -> mpsc::Receiver<Push> {
        self.auth.subscribe(node, t(T0)).expect("subscribe")
    }

    fn audit(&self) -> Vec<Value> {
        read_since(self.auth.audit_path(), 0).expect("audit log reads")
    }

    fn last_event(&self, event: &str) -> Value {
        self.audit()
            .into_iter()
            .rev()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no `{event}` audit record"))
    }
}

/// Everything queued on a push stream right now.
fn drain(rx: &mut mpsc::Receiver<Push>) -> Vec<Push> {
    let mut out = Vec::new();
    while let Ok(p) = rx.try_recv() {
        out.push(p);
    }
    out
}

/// Whether the verifier closed the stream (all senders dropped) once drained.
fn closed(rx: &mut mpsc::Receiver<Push>) -> bool {
    matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected))
}

fn kinds(pushes: &[Push]) -> Vec<&'static str> {
    pushes.iter().map(subscribers::push_kind).collect()
}

fn seeds_peers(pushes: &[Push]) -> BTreeSet<NodeId> {
    pushes
        .iter()
        .filter_map(|p| match p {
            Push::Seeds { peer, .. } => Some(*peer),
            _ => None,
        })
        .collect()
}

fn peer_set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

// --- enrollment ---------------------------------------------------------------------------

#[test]
fn enrollment_issues_a_signed_attestation_with_policy_segments() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("a");
    let env = h
        .try_enroll(1, &secret, GOOD, &addresses(1), t(T0))
        .expect("enrolls");
    let keys = KeySet::new(vec![signing().verifying_key()]).expect("key set");
    let verified = verify_attestation(&env, &keys, t(T0), 0).expect("attestation verifies");
    let a = verified.get();
    assert_eq!(a.node_id, id(1));
    assert_eq!(a.name, name("a"));
    assert_eq!(
        a.segments.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );
    assert_eq!(a.measurement, GOOD);
    assert_eq!(a.not_before, t(T0 - ATTESTATION_BACKDATE));
    assert_eq!(a.not_after, t(T0 + 300));
    let view = h.auth.nodes_view();
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].name, "a");
    assert_eq!(view[0].addresses, ["127.0.0.1:20001"]);
    assert!(!view[0].connected);
    let rec = h.last_event("enroll");
    assert_eq!(rec["node"], id(1).to_string());
    assert_eq!(rec["name"], "a");
    assert_eq!(rec["measurement"], GOOD.to_string());
    assert_eq!(rec["hostname"], "test-host");
    assert_eq!(
        h.auth
            .metrics()
            .attested
            .get_or_create(&[("kind", "enroll")])
            .get(),
        1
    );
}

/// Asserts an enrollment refusal: wire refusal, audited reason, counted reason.
fn assert_enroll_refused(
    h: &Harness,
    result: &Result<Vec<u8>, Refusal>,
    want: EnrollRefusal,
    key: u8,
) {
    assert_eq!(*result, Err(want.to_wire()), "want {}", want.reason());
    let rec = h.last_event("enroll_refused");
    assert_eq!(rec["reason"], want.reason());
    assert_eq!(rec["node"], id(key).to_string());
    assert_eq!(rec["hostname"], "test-host");
    assert_eq!(h.refusals(want.reason()), 1);
}

#[test]
fn enrollment_refuses_an_unknown_join_secret() {
    let mut h = Harness::new(standard_policy());
    let secret = JoinSecret::from_bytes([9; 32]);
    let r = h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0));
    assert_enroll_refused(&h, &r, EnrollRefusal::JoinSecretUnknown, 1);
    assert_eq!(r, Err(Refusal::JoinSecret));
    assert!(h.auth.nodes_view().is_empty());
}

#[test]
fn join_secret_is_single_use() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("a");
    h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0))
        .expect("first use enrolls");
    // The same key again, and another key: both refused as used.
    let again = h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0 + 1));
    assert_eq!(again, Err(Refusal::JoinSecret));
    let other = h.try_enroll(2, &secret, GOOD, &addresses(2), t(T0 + 1));
    assert_eq!(other, Err(Refusal::JoinSecret));
    let rec = h.last_event("enroll_refused");
    assert_eq!(rec["reason"], "join_secret_used");
    assert_eq!(rec["node"], id(2).to_string());
    assert_eq!(h.refusals("join_secret_used"), 2);
    assert_eq!(h.auth.nodes_view().len(), 1);
}

#[test]
fn a_refused_enrollment_burns_the_join_secret() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("a");
    let bad = h.try_enroll(1, &secret, BAD, &addresses(1), t(T0));
    assert_eq!(bad, Err(Refusal::Measurement));
    let retry = h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0));
    assert_enroll_refused(&h, &retry, EnrollRefusal::JoinSecretUsed, 1);
}

#[test]
fn enrollment_refuses_an_expired_join_secret() {
    let mut h = Harness::new(standard_policy());
    let (secret, expires) = h
        .auth
        .create_join_token(&name("a"), None, 60, t(T0))
        .expect("token");
    assert_eq!(expires, t(T0 + 60));
    let r = h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0 + 60));
    assert_enroll_refused(&h, &r, EnrollRefusal::JoinSecretExpired, 1);
}

#[test]
fn enrollment_refuses_a_measurement_not_in_policy() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("a");
    let r = h.try_enroll(1, &secret, BAD, &addresses(1), t(T0));
    assert_enroll_refused(&h, &r, EnrollRefusal::Measurement, 1);
    assert_eq!(
        EnrollRefusal::Measurement.reason(),
        "measurement_not_allowed"
    );
}

#[test]
fn enrollment_refuses_a_revoked_key_as_key_banned() {
    let mut h = Harness::new(standard_policy());
    h.enroll(1, "a");
    h.auth
        .revoke(&NodeRef::Name(name("a")), t(T0))
        .expect("revoke");
    // The name is free again, the key is not.
    let secret = h.token("a");
    let r = h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0 + 1));
    assert_enroll_refused(&h, &r, EnrollRefusal::KeyBanned, 1);
    assert_eq!(r, Err(Refusal::Revoked));
    h.enroll(2, "a");
}

#[test]
fn enrollment_refuses_a_banned_name() {
    let mut h = Harness::new(standard_policy());
    let early = h.token("a");
    h.enroll(1, "a");
    h.auth.ban(&NodeRef::Name(name("a")), t(T0)).expect("ban");
    let r = h.try_enroll(2, &early, GOOD, &addresses(2), t(T0 + 1));
    assert_enroll_refused(&h, &r, EnrollRefusal::NameBanned, 2);
}

#[test]
fn enrollment_refuses_a_name_the_policy_no_longer_has() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("c");
    let without_c = standard_policy()
        .replace("[[node]]\nname = \"c\"\nsegments = [\"s2\"]\n", "")
        .replace(
            "[[service]]\nname = \"web\"\nsegment = \"s2\"\nnode = \"c\"\nbackend = \"127.0.0.1:18081\"\n",
            "",
        )
        .replace("[[allow]]\nfrom = \"s1\"\nto = \"web.s2\"\n", "");
    assert!(!without_c.contains("\"c\""), "the policy still names c");
    h.auth
        .reload_policy(&without_c, t(T0))
        .expect("policy reloads");
    let r = h.try_enroll(3, &secret, GOOD, &addresses(3), t(T0));
    assert_enroll_refused(&h, &r, EnrollRefusal::NameNotInPolicy, 3);
    assert_eq!(r, Err(Refusal::NotInPolicy));
}

#[test]
fn enrollment_refuses_segments_bound_in_the_token_that_policy_disagrees_with() {
    let mut h = Harness::new(standard_policy());
    let (wrong, _) = h
        .auth
        .create_join_token(&name("a"), Some(vec!["s2".into()]), 60, t(T0))
        .expect("token");
    let r = h.try_enroll(1, &wrong, GOOD, &addresses(1), t(T0));
    assert_enroll_refused(&h, &r, EnrollRefusal::SegmentsMismatch, 1);
    let (right, _) = h
        .auth
        .create_join_token(&name("a"), Some(vec!["s1".into()]), 60, t(T0))
        .expect("token");
    h.try_enroll(1, &right, GOOD, &addresses(1), t(T0))
        .expect("matching segments enroll");
}

#[test]
fn enrollment_refuses_a_name_held_by_another_live_key() {
    let mut h = Harness::new(standard_policy());
    h.enroll(1, "a");
    let secret = h.token("a");
    let r = h.try_enroll(2, &secret, GOOD, &addresses(2), t(T0));
    assert_enroll_refused(&h, &r, EnrollRefusal::NameTaken, 2);
    assert_eq!(r, Err(Refusal::NameTaken));
    // The holder itself may enroll again under its name.
    let secret = h.token("a");
    h.try_enroll(1, &secret, GOOD, &addresses(1), t(T0))
        .expect("same key re-enrolls");
}

#[test]
fn enrollment_refuses_an_address_that_is_not_host_port() {
    let mut h = Harness::new(standard_policy());
    let secret = h.token("a");
    let r = h.try_enroll(
        1,
        &secret,
        GOOD,
        &[Address::truncated("not an address")],
        t(T0),
    );
    assert_enroll_refused(&h, &r, EnrollRefusal::BadAddress, 1);
    assert_eq!(r, Err(Refusal::BadRequest));
}

#[test]
fn refusal_reasons_and_wire_refusals_are_stable() {
    let enroll = [
        (
            EnrollRefusal::JoinSecretUnknown,
            "join_secret_unknown",
            Refusal::JoinSecret,
        ),
        (
            EnrollRefusal::JoinSecretUsed,
            "join_secret_used",
            Refusal::JoinSecret,
        ),
        (
            EnrollRefusal::JoinSecretExpired,
            "join_secret_expired",
            Refusal::JoinSecret,
        ),
        (EnrollRefusal::KeyBanned, "key_banned", Refusal::Revoked),
        (EnrollRefusal::NameBanned, "name_banned", Refusal::Revoked),
        (
            EnrollRefusal::NameNotInPolicy,
            "name_not_in_policy",
            Refusal::NotInPolicy,
        ),
        (
            EnrollRefusal::SegmentsMismatch,
            "segments_mismatch",
            Refusal::NotInPolicy,
        ),
        (
            EnrollRefusal::Measurement,
            "measurement_not_allowed",
            Refusal::Measurement,
        ),
        (EnrollRefusal::NameTaken, "name_taken", Refusal::NameTaken),
        (
            EnrollRefusal::BadAddress,
            "bad_address",
            Refusal::BadRequest,
        ),
        (EnrollRefusal::Internal, "internal", Refusal::Internal),
    ];
    for (r, reason, wire) in enroll {
        assert_eq!((r.reason(), r.to_wire()), (reason, wire));
    }
    let refresh = [
        (
            RefreshRefusal::NotEnrolled,
            "not_enrolled",
            Refusal::NotEnrolled,
        ),
        (RefreshRefusal::Revoked, "revoked", Refusal::Revoked),
        (RefreshRefusal::Banned, "banned", Refusal::Revoked),
        (
            RefreshRefusal::Measurement,
            "measurement_not_allowed",
            Refusal::Measurement,
        ),
        (
            RefreshRefusal::NotInPolicy,
            "name_not_in_policy",
            Refusal::NotInPolicy,
        ),
        (
            RefreshRefusal::BadAddress,
            "bad_address",
            Refusal::BadRequest,
        ),
        (RefreshRefusal::Internal, "internal", Refusal::Internal),
    ];
    for (r, reason, wire) in refresh {
        assert_eq!((r.reason(), r.to_wire()), (reason, wire));
    }
}

#[test]
fn join_token_requests_are_checked() {
    let mut h = Harness::new(standard_policy());
    let bad = |r: Result<(JoinSecret, UnixTime), AdminError>| match r {
        Err(AdminError::BadRequest(msg)) => msg,
        other => panic!("expected a bad request, got {other:?}"),
    };
    let a = name("a");
    assert_eq!(
        bad(h.auth.create_join_token(&a, None, 0, t(T0))),
        "ttl must be 1 s to 7 days"
    );
    assert_eq!(
        bad(h.auth.create_join_token(&a, None, 7 * 24 * 3600 + 1, t(T0))),
        "ttl must be 1 s to 7 days"
    );
    assert_eq!(
        bad(h.auth.create_join_token(&name("zz"), None, 60, t(T0))),
        "node `zz` is not in the policy"
    );
    assert!(
        bad(h
            .auth
            .create_join_token(&a, Some(vec!["Not A Segment!".into()]), 60, t(T0)))
        .starts_with("segment `Not A Segment!`")
    );
    let (_, expires) = h
        .auth
        .create_join_token(&a, None, 7 * 24 * 3600, t(T0))
        .expect("seven days is allowed");
    assert_eq!(expires, t(T0 + 7 * 24 * 3600));
    let rec = h.last_event("join_token_created");
    assert_eq!(rec["name"], "a");
    assert_eq!(rec["expires_at"], T0 + 7 * 24 * 3600);
}

// --- refresh ------------------------------------------------------------------------------

fn assert_refresh_refused(
    h: &Harness,
    result: &Result<Vec<u8>, Refusal>,
    want: RefreshRefusal,
    node: NodeId,
) {
    assert_eq!(*result, Err(want.to_wire()), "want {}", want.reason());
    let rec = h.last_event("refresh_refused");
    assert_eq!(rec["reason"], want.reason());
    assert_eq!(rec["node"], node.to_string());
    assert!(h.refusals(want.reason()) >= 1);
}

#[test]
fn refresh_refuses_a_key_that_never_enrolled() {
    let mut h = Harness::new(standard_policy());
    let r = h.auth.refresh(&id(5), &GOOD, &addresses(5), t(T0));
    assert_refresh_refused(&h, &r, RefreshRefusal::NotEnrolled, id(5));
    assert_eq!(h.refusals("not_enrolled"), 1);
}

#[test]
fn refresh_refuses_a_revoked_node() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    h.auth.revoke(&NodeRef::Id(a), t(T0)).expect("revoke");
    let r = h.auth.refresh(&a, &GOOD, &addresses(1), t(T0 + 1));
    assert_refresh_refused(&h, &r, RefreshRefusal::Revoked, a);
    assert_eq!(
        h.auth.check_refresh(&a, &GOOD, &addresses(1)),
        Err(RefreshRefusal::Revoked)
    );
}

#[test]
fn refresh_refuses_a_live_key_whose_name_was_banned() {
    let mut h = Harness::new(standard_policy());
    let old = h.enroll(1, "a");
    h.auth.revoke(&NodeRef::Id(old), t(T0)).expect("revoke");
    let new = h.enroll(2, "a");
    // Banning the old (revoked) record by id bans the name "a", which the new key holds.
    h.auth.ban(&NodeRef::Id(old), t(T0)).expect("ban");
    let r = h.auth.refresh(&new, &GOOD, &addresses(2), t(T0 + 1));
    assert_refresh_refused(&h, &r, RefreshRefusal::Banned, new);
    assert_eq!(r, Err(Refusal::Revoked));
}

#[test]
fn refresh_refuses_a_node_the_policy_no_longer_has() {
    let mut h = Harness::new(islands_policy(true));
    let c = h.enroll(3, "c");
    let without_c =
        islands_policy(true).replace("[[node]]\nname = \"c\"\nsegments = [\"s2\"]\n", "");
    h.auth.reload_policy(&without_c, t(T0)).expect("reload");
    let r = h.auth.refresh(&c, &GOOD, &addresses(3), t(T0));
    assert_refresh_refused(&h, &r, RefreshRefusal::NotInPolicy, c);
}

#[test]
fn refresh_refuses_a_measurement_not_in_policy() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let r = h.auth.refresh(&a, &BAD, &addresses(1), t(T0));
    assert_refresh_refused(&h, &r, RefreshRefusal::Measurement, a);
    // The stored measurement is unchanged.
    assert_eq!(h.auth.nodes_view()[0].measurement, GOOD.to_string());
}

#[test]
fn refresh_refuses_an_address_that_is_not_host_port() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let r = h
        .auth
        .refresh(&a, &GOOD, &[Address::truncated("nope")], t(T0));
    assert_refresh_refused(&h, &r, RefreshRefusal::BadAddress, a);
}

#[test]
fn refresh_pushes_routes_only_when_the_record_changed() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    let mut rb = h.subscribe(&b);
    let mut rc = h.subscribe(&c);
    drain(&mut rb);
    drain(&mut rc);
    // Same measurement and addresses: a new attestation, nothing pushed.
    let env = h
        .auth
        .refresh(&a, &GOOD, &addresses(1), t(T0 + 10))
        .expect("refresh");
    assert!(!env.is_empty());
    assert_eq!(h.last_event("attest")["name"], "a");
    assert!(drain(&mut rb).is_empty());
    assert!(drain(&mut rc).is_empty());
    // A new address: b and c see a's new peer info.
    let moved = [Address::truncated("127.0.0.1:29999")];
    h.auth
        .refresh(&a, &GOOD, &moved, t(T0 + 20))
        .expect("refresh");
    for rx in [&mut rb, &mut rc] {
        let got = drain(rx);
        assert!(
            matches!(got.first(), Some(Push::TablePart(_))),
            "expected the table first, got {got:?}"
        );
        let [update] = table_updates(&got).try_into().expect("one table update");
        let info = update
            .changes
            .iter()
            .find_map(|c| match c {
                TableChange::Put(TableEntry::Peer(p)) if p.node_id == a => Some(p),
                _ => None,
            })
            .expect("a's new info");
        assert_eq!(
            info.addresses
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>(),
            ["127.0.0.1:29999"]
        );
    }
    assert_eq!(
        h.auth
            .metrics()
            .attested
            .get_or_create(&[("kind", "refresh")])
            .get(),
        2
    );
}

#[test]
fn attestation_serials_increase_and_never_repeat_across_a_reopen() {
    let mut h = Harness::new(standard_policy());
    let keys = KeySet::new(vec![signing().verifying_key()]).expect("key set");
    let a = h.enroll(1, "a");
    let serial = |env: &[u8]| {
        verify_attestation(env, &keys, t(T0), 0)
            .expect("verifies")
            .get()
            .serial
    };
    let s1 = serial(
        &h.auth
            .refresh(&a, &GOOD, &addresses(1), t(T0))
            .expect("refresh"),
    );
    let s2 = serial(
        &h.auth
            .refresh(&a, &GOOD, &addresses(1), t(T0))
            .expect("refresh"),
    );
    assert_eq!(s2, s1 + 1);
    let mut h = h.reopen(t(T0));
    let s3 = serial(
        &h.auth
            .refresh(&a, &GOOD, &addresses(1), t(T0))
            .expect("refresh"),
    );
    // The enrollment took the first serial of the first block; a new process reserves the
    // next block and never reuses the rest of the first.
    let first = s1 - 1;
    assert_eq!(s3, first + SERIAL_BLOCK);
}

// --- subscribe and snapshot ---------------------------------------------------------------

#[test]
fn subscribe_refuses_unknown_and_revoked_nodes_and_snapshots_the_rest() {
    let mut h = Harness::new(standard_policy());
    assert_eq!(
        h.auth.subscribe(&id(9), t(T0)).err(),
        Some(Refusal::NotEnrolled)
    );
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    let mut ra = h.subscribe(&a);
    let snap = drain(&mut ra);
    assert_eq!(kinds(&snap), ["config", "table_part", "seeds", "seeds"]);
    let Push::Config(cfg) = &snap[0] else {
        panic!("config first")
    };
    assert_eq!(cfg.generation_secs, 300);
    assert_eq!(seeds_peers(&snap), peer_set(&[b, c]));
    assert!(
        h.auth
            .nodes_view()
            .iter()
            .any(|v| v.name == "a" && v.connected)
    );
    h.auth.revoke(&NodeRef::Id(b), t(T0)).expect("revoke");
    assert_eq!(h.auth.subscribe(&b, t(T0)).err(), Some(Refusal::Revoked));
    assert_eq!(h.refusals("subscribe_not_live"), 2);
    assert_eq!(h.last_event("subscribe_refused")["node"], b.to_string());
    // After a revoke the snapshot carries the revocation list.
    let mut rc = h.subscribe(&c);
    assert_eq!(
        kinds(&drain(&mut rc)),
        ["config", "revocations", "table_part", "seeds"]
    );
}

// --- revoke, ban --------------------------------------------------------------------------

#[test]
fn revoke_pushes_compromised_to_exactly_the_revoked_nodes_peers() {
    let mut h = Harness::new(islands_policy(true));
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    let d = h.enroll(4, "d");
    assert_eq!(
        h.auth.table(&a).map(|t| t.peers.clone()),
        Some(peer_set(&[b]))
    );
    let mut rx: Vec<_> = [a, b, c, d].iter().map(|n| h.subscribe(n)).collect();
    for r in &mut rx {
        drain(r);
    }
    let outcome = h
        .auth
        .revoke(&NodeRef::Name(name("a")), t(T0))
        .expect("revoke");
    assert_eq!(outcome.node_id, a.to_string());
    assert_eq!(outcome.revocation_version, 1);
    assert_eq!(outcome.notified, 1);

    let got: Vec<Vec<Push>> = rx.iter_mut().map(drain).collect();
    let compromised = |pushes: &[Push]| -> Vec<(NodeId, Vec<Generation>)> {
        pushes
            .iter()
            .filter_map(|p| match p {
                Push::Compromised { peer, generations } => {
                    Some((*peer, generations.iter().copied().collect()))
                }
                _ => None,
            })
            .collect()
    };
    let want: Vec<Generation> = (SLOT0 - 1..=SLOT0 + 1)
        .map(|s| Generation::compose(s, 0))
        .collect();
    assert_eq!(compromised(&got[1]), [(a, want)]);
    assert!(compromised(&got[0]).is_empty());
    assert!(compromised(&got[2]).is_empty());
    assert!(compromised(&got[3]).is_empty());
    // b: compromised, the new list, then its table without a.
    assert_eq!(kinds(&got[1]), ["compromised", "revocations", "table_part"]);
    // c and d's tables do not change: they only get the new list.
    assert_eq!(kinds(&got[2]), ["revocations"]);
    assert_eq!(kinds(&got[3]), ["revocations"]);
    // a got the list, then its stream was closed.
    assert_eq!(kinds(&got[0]), ["revocations"]);
    assert!(closed(&mut rx[0]));
    assert_eq!(h.auth.table(&a), None);
    assert_eq!(h.auth.table(&b).map(|t| t.peers.len()), Some(0));
    let rec = h.last_event("revoke");
    assert_eq!(rec["node"], a.to_string());
    assert_eq!(rec["name"], "a");
    assert_eq!(rec["revocation_version"], 1);
    assert_eq!(h.auth.metrics().revocations.get(), 1);
    assert_eq!(revocation_version_sample(&h), "1");
}

/// The value of `hopmesh_verifier_revocation_list_version` in the rendered metrics.
fn revocation_version_sample(h: &Harness) -> String {
    let text = h.auth.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix("hopmesh_verifier_revocation_list_version "))
        .unwrap_or_else(|| panic!("no revocation_list_version sample:\n{text}"))
        .to_owned()
}

#[test]
fn revoke_refuses_unknown_and_already_revoked_nodes() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    assert!(matches!(
        h.auth.revoke(&NodeRef::Name(name("b")), t(T0)),
        Err(AdminError::UnknownNode(n)) if n == "b"
    ));
    h.auth.revoke(&NodeRef::Id(a), t(T0)).expect("revoke");
    assert!(matches!(
        h.auth.revoke(&NodeRef::Id(a), t(T0 + 1)),
        Err(AdminError::AlreadyRevoked(n)) if n == "a"
    ));
    assert_eq!(h.auth.revocation_list().map(|l| l.version), Some(1));
}

#[test]
fn revocation_list_versions_increase_and_survive_a_reopen() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    h.enroll(3, "c");
    assert!(h.auth.revocation_list().is_none());
    let v1 = h.auth.revoke(&NodeRef::Id(a), t(T0)).expect("revoke a");
    let v2 = h.auth.revoke(&NodeRef::Id(b), t(T0 + 5)).expect("revoke b");
    assert_eq!((v1.revocation_version, v2.revocation_version), (1, 2));
    let before = h.auth.revocation_list().cloned().expect("a list");

    let mut h = h.reopen(t(T0 + 10));
    let after = h
        .auth
        .revocation_list()
        .cloned()
        .expect("the list survives");
    assert_eq!(after, before);
    let keys = KeySet::new(vec![signing().verifying_key()]).expect("key set");
    let Ok(RevocationUpdate::Newer(list)) = verify_revocation_list(&after.bytes, &keys, None)
    else {
        panic!("the stored list verifies")
    };
    let revoked: BTreeSet<NodeId> = list.revoked.iter().map(|r| r.node_id).collect();
    assert_eq!(revoked, peer_set(&[a, b]));
    let v3 = h
        .auth
        .revoke(&NodeRef::Name(name("c")), t(T0 + 10))
        .expect("revoke c");
    assert_eq!(v3.revocation_version, 3);
    // The revoked nodes stay revoked.
    assert_eq!(
        h.auth.refresh(&a, &GOOD, &addresses(1), t(T0 + 10)),
        Err(Refusal::Revoked)
    );
}

#[test]
fn a_stored_revocation_list_signed_by_another_key_fails_closed() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    h.auth.revoke(&NodeRef::Id(a), t(T0)).expect("revoke");
    let Harness { dir, auth, .. } = h;
    drop(auth);
    let store = SqliteStore::open(&dir.path().join("store.db")).expect("store");
    let (audit, _) = AuditLog::open(&dir.path().join("audit.jsonl")).expect("audit");
    let other = Authority::new(
        Parts {
            settings: Settings::default(),
            signing: SigningKey::from_seed(&SigningSeed::from_bytes([3; 32])),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit,
            metrics: Arc::new(Metrics::default()),
            policy: Policy::parse(&standard_policy()).expect("policy"),
        },
        t(T0),
    );
    match other {
        Err(AdminError::Store(e)) => assert!(
            e.to_string()
                .contains("does not verify under this verifier's key"),
            "{e}"
        ),
        other => panic!("expected a store error, got {other:?}"),
    }
}

#[test]
fn ban_survives_a_reopen() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    h.enroll(2, "b");
    h.auth.ban(&NodeRef::Name(name("a")), t(T0)).expect("ban");
    let rec = h.last_event("ban");
    assert_eq!(rec["node"], a.to_string());
    assert_eq!(rec["name"], "a");
    // Banning a live node revokes it first.
    assert_eq!(h.last_event("revoke")["node"], a.to_string());

    let mut h = h.reopen(t(T0 + 1000));
    assert!(matches!(
        h.auth.create_join_token(&name("a"), None, 60, t(T0 + 1000)),
        Err(AdminError::BadRequest(m)) if m == "node name `a` is banned"
    ));
    assert_eq!(
        h.auth.subscribe(&a, t(T0 + 1000)).err(),
        Some(Refusal::Revoked)
    );
    assert_eq!(
        h.auth.check_refresh(&a, &GOOD, &addresses(1)),
        Err(RefreshRefusal::Revoked)
    );
    let view = h.auth.nodes_view();
    let va = view.iter().find(|v| v.name == "a").expect("a listed");
    assert_eq!(va.revoked_at, Some(T0));
    // Banning again (already revoked) is accepted and does not revoke twice.
    h.auth
        .ban(&NodeRef::Id(a), t(T0 + 1000))
        .expect("second ban");
    assert_eq!(h.auth.revocation_list().map(|l| l.version), Some(1));
}

// --- reissue ------------------------------------------------------------------------------

#[test]
fn reissue_touches_exactly_one_pair() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    let now = t(T0);
    let ab = h.auth.grants(&PairIds::new(a, b), now);
    let ac = h.auth.grants(&PairIds::new(a, c), now);
    let bc = h.auth.grants(&PairIds::new(b, c), now);
    let mut rx: Vec<_> = [a, b, c].iter().map(|n| h.subscribe(n)).collect();
    for r in &mut rx {
        drain(r);
    }

    let out = h
        .auth
        .reissue(&NodeRef::Name(name("a")), &NodeRef::Id(b), now)
        .expect("reissue");
    let want: Vec<u64> = (SLOT0 - 1..=SLOT0 + 1)
        .map(|s| Generation::compose(s, 0).0)
        .collect();
    assert_eq!(out.reissues, 1);
    assert_eq!(out.compromised, want);

    assert_eq!(h.auth.grants(&PairIds::new(a, c), now), ac);
    assert_eq!(h.auth.grants(&PairIds::new(b, c), now), bc);
    let ab2 = h.auth.grants(&PairIds::new(a, b), now);
    assert_ne!(ab2, ab);
    assert_eq!(
        ab2.iter().map(|g| g.generation).collect::<Vec<_>>(),
        [
            Generation::compose(SLOT0, 1),
            Generation::compose(SLOT0 + 1, 1)
        ]
    );
    let got: Vec<Vec<Push>> = rx.iter_mut().map(drain).collect();
    assert_eq!(kinds(&got[0]), ["compromised", "seeds"]);
    assert_eq!(kinds(&got[1]), ["compromised", "seeds"]);
    assert_eq!(seeds_peers(&got[0]), peer_set(&[b]));
    assert_eq!(seeds_peers(&got[1]), peer_set(&[a]));
    assert!(got[2].is_empty(), "c saw {got:?}");
    let rec = h.last_event("reissue");
    assert_eq!(rec["why"], "operator");
    assert_eq!(rec["reissues"], 1);
    assert_eq!(rec["compromised"], serde_json::json!(want));
    assert_eq!(h.auth.metrics().reissues.get(), 1);
    assert!(matches!(
        h.auth.reissue(&NodeRef::Id(a), &NodeRef::Name(name("a")), now),
        Err(AdminError::BadRequest(m)) if m == "a pair needs two different nodes"
    ));
}

#[test]
fn just_after_a_generation_edge_a_new_pair_also_gets_the_previous_generation() {
    // A node whose clock runs behind sits in the previous generation for a while after an
    // edge: a pair that forms then must still give it a seed to mint with. Rotation (pairs
    // that existed before the edge) sends current and next only.
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let pair = PairIds::new(a, b);
    let edge = SLOT0 * 300;
    let generations = |now: u64| -> Vec<u64> {
        h.auth
            .seeds
            .pair_grants(&pair, t(now))
            .iter()
            .map(|g| g.generation.0)
            .collect()
    };
    let slots =
        |s: &[u64]| -> Vec<u64> { s.iter().map(|s| Generation::compose(*s, 0).0).collect() };
    assert_eq!(generations(edge + 5), slots(&[SLOT0 - 1, SLOT0, SLOT0 + 1]));
    assert_eq!(
        generations(edge + BEHIND_CLOCK_GRACE_SECS - 1),
        slots(&[SLOT0 - 1, SLOT0, SLOT0 + 1])
    );
    assert_eq!(
        generations(edge + BEHIND_CLOCK_GRACE_SECS),
        slots(&[SLOT0, SLOT0 + 1])
    );
    let rotated: Vec<u64> = h
        .auth
        .grants(&pair, t(edge + 5))
        .iter()
        .map(|g| g.generation.0)
        .collect();
    assert_eq!(rotated, slots(&[SLOT0, SLOT0 + 1]));
    // Each grant is the generation's own window, so a node keeps minting in its own one.
    let g = h.auth.seeds.pair_grants(&pair, t(edge + 5));
    assert_eq!(g[0].valid_from, t(edge - 300));
    assert_eq!(g[0].valid_until, t(edge));
}

#[test]
fn reissue_state_survives_a_reopen() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    h.auth
        .reissue(&NodeRef::Id(a), &NodeRef::Id(b), t(T0))
        .expect("reissue");
    let ab = h.auth.grants(&PairIds::new(a, b), t(T0));
    let mut h = h.reopen(t(T0));
    assert_eq!(h.auth.grants(&PairIds::new(a, b), t(T0)), ab);
    // The snapshot repeats the compromised generations of the pair.
    let mut ra = h.subscribe(&a);
    let snap = drain(&mut ra);
    let compromised: Vec<&Push> = snap
        .iter()
        .filter(|p| matches!(p, Push::Compromised { peer, .. } if *peer == b))
        .collect();
    assert_eq!(compromised.len(), 1);
    let out = h
        .auth
        .reissue(&NodeRef::Id(b), &NodeRef::Id(a), t(T0))
        .expect("second reissue");
    assert_eq!(out.reissues, 2);
}

// --- tick ---------------------------------------------------------------------------------

/// The seed-rotation spread window at the default generation (300 s): every node is served by
/// `edge + SPREAD`.
const SPREAD: u64 = 300 * ROTATION_SPREAD_PERCENT / 100;

/// Ticks every second of `from..=to`, each second until nothing more is due (as the ticker
/// does); returns the seconds at which `rx` received something, with what it got.
fn tick_through(
    h: &mut Harness,
    rx: &mut mpsc::Receiver<Push>,
    from: u64,
    to: u64,
) -> Vec<(u64, Vec<Push>)> {
    tick_all(h, std::slice::from_mut(rx), from, to).remove(0)
}

/// [`tick_through`] for several receivers at once.
fn tick_all(
    h: &mut Harness,
    rx: &mut [mpsc::Receiver<Push>],
    from: u64,
    to: u64,
) -> Vec<Vec<(u64, Vec<Push>)>> {
    let mut out = vec![Vec::new(); rx.len()];
    for s in from..=to {
        while h.auth.tick(t(s)).more_due {}
        for (r, o) in rx.iter_mut().zip(&mut out) {
            let got = drain(r);
            if !got.is_empty() {
                o.push((s, got));
            }
        }
    }
    out
}

#[test]
fn each_node_gets_its_next_generation_once_per_slot_at_its_own_offset_not_at_the_edge() {
    let mut h = Harness::new(standard_policy());
    let nodes = [h.enroll(1, "a"), h.enroll(2, "b"), h.enroll(3, "c")];
    let mut rx: Vec<_> = nodes.iter().map(|n| h.subscribe(n)).collect();
    for r in &mut rx {
        drain(r);
    }
    // Nothing inside the slot before the edge.
    assert!(
        tick_all(&mut h, &mut rx, T0, NEXT_EDGE - 1)
            .iter()
            .all(Vec::is_empty)
    );
    let mut when = Vec::new();
    for slot in 0..2 {
        let edge = NEXT_EDGE + 300 * slot;
        let got = tick_all(&mut h, &mut rx, edge, edge + 299);
        for (node, got) in nodes.iter().zip(&got) {
            // Exactly once in the slot, at the node's own offset inside the spread window.
            assert_eq!(got.len(), 1, "{got:?}");
            let (at, pushes) = &got[0];
            let offset = h.auth.seeds.rotation().offset(node);
            assert!(offset < SPREAD);
            assert_eq!(*at, edge + offset);
            when.push(*at);
            assert_eq!(kinds(pushes), ["seeds", "seeds"]);
            let others: Vec<NodeId> = nodes.into_iter().filter(|p| p != node).collect();
            assert_eq!(seeds_peers(pushes), peer_set(&others));
            for p in pushes {
                let Push::Seeds { grants, .. } = p else {
                    unreachable!()
                };
                let from: Vec<UnixTime> = grants.iter().map(|g| g.valid_from).collect();
                assert_eq!(from, [t(edge), t(edge + 300)]);
            }
        }
    }
    assert!(
        when.iter().any(|s| !(s - NEXT_EDGE).is_multiple_of(300)),
        "not everyone at the edge: {when:?}"
    );
}

/// `n` nodes `n0`, `n1`, … in segment `m`, each serving `svc<i>`, and `m -> m`: every node
/// pairs with every other. Plus `z`, alone in segment `lone` (no pairs).
fn full_mesh_policy(n: usize) -> String {
    let mut p = format!(
        "[attestation]\nmeasurements = [\"{GOOD}\"]\n[[segment]]\nname = \"m\"\n\
         [[segment]]\nname = \"lone\"\n[[node]]\nname = \"z\"\nsegments = [\"lone\"]\n"
    );
    for i in 0..n {
        p += &format!(
            "[[node]]\nname = \"n{i}\"\nsegments = [\"m\"]\n[[service]]\nname = \"svc{i}\"\n\
             segment = \"m\"\nnode = \"n{i}\"\nbackend = \"127.0.0.1:{}\"\n",
            18_000 + i
        );
    }
    p + "[[allow]]\nfrom = \"m\"\nto = \"m\"\n"
}

#[test]
fn a_revocation_during_a_rotation_backlog_is_queued_before_the_backlog_is_served() {
    let n = ROTATION_BATCH + 6;
    let mut h = Harness::new(full_mesh_policy(n));
    let ids: Vec<NodeId> = (0..n)
        .map(|i| h.enroll(u8::try_from(i + 1).expect("fits"), &format!("n{i}")))
        .collect();
    let z = h.enroll(200, "z");
    let mut rx: Vec<_> = ids.iter().map(|id| h.subscribe(id)).collect();
    for r in &mut rx {
        drain(r);
    }
    // The end of the spread window: everyone is due; one batch per tick, the lock released
    // between two (the ticker, `verifier/src/lib.rs`).
    let at = t(NEXT_EDGE + SPREAD);
    let first = h.auth.tick(at);
    assert!(first.round_started);
    assert_eq!(
        (first.served, first.pairs),
        (ROTATION_BATCH, ROTATION_BATCH * (n - 1))
    );
    assert_eq!(first.backlog, 6);
    assert!(first.more_due);
    assert_eq!(h.auth.metrics().rotation_backlog.get(), 6);
    assert_eq!(h.auth.metrics().rotation_batches.get(), 1);
    // A revocation between two batches (z has no pairs: no table changes, no seeds).
    let version = h
        .auth
        .revoke(&NodeRef::Id(z), at)
        .expect("revoke")
        .revocation_version;
    assert_eq!(version, 1);
    // Every subscriber has the new list queued when revoke returns; the backlog's nodes have
    // it before any of their seeds.
    let mut queued: Vec<Vec<Push>> = rx.iter_mut().map(drain).collect();
    for q in &queued {
        assert!(kinds(q).contains(&"revocations"), "{:?}", kinds(q));
    }
    let waiting: Vec<usize> = (0..n)
        .filter(|i| !kinds(&queued[*i]).contains(&"seeds"))
        .collect();
    assert_eq!(waiting.len(), 6);
    let rest = h.auth.tick(at);
    assert_eq!((rest.served, rest.backlog, rest.more_due), (6, 0, false));
    assert_eq!(h.auth.metrics().rotation_backlog.get(), 0);
    assert_eq!(h.auth.metrics().rotation_batches.get(), 2);
    for (i, r) in rx.iter_mut().enumerate() {
        queued[i].extend(drain(r));
        let k = kinds(&queued[i]);
        let revocations = k.iter().position(|k| *k == "revocations").expect("list");
        let seeds = k.iter().position(|k| *k == "seeds").expect("seeds");
        if waiting.contains(&i) {
            assert!(revocations < seeds, "{k:?}");
        }
        assert_eq!(seeds_peers(&queued[i]).len(), n - 1, "every pair, once");
        assert_eq!(k.iter().filter(|k| **k == "seeds").count(), n - 1);
    }
    // Nothing more in this slot.
    assert!(!h.auth.tick(t(NEXT_EDGE + 299)).worked());
}

#[test]
fn a_node_that_subscribes_after_the_edge_is_not_rotated_again_in_that_slot() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    h.enroll(2, "b");
    h.enroll(3, "c");
    let mut ra = h.subscribe(&a);
    drain(&mut ra);
    assert!(h.auth.tick(t(NEXT_EDGE)).round_started);
    // Subscribed just after the edge: the snapshot also holds the previous slot's (for a
    // clock running behind).
    let mut early = h.auth.subscribe(&a, t(NEXT_EDGE + 1)).expect("subscribe");
    let slots: BTreeSet<u64> = drain(&mut early)
        .iter()
        .filter_map(|p| match p {
            Push::Seeds { grants, .. } => Some(grants.iter().map(|g| g.generation.slot())),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(slots, BTreeSet::from([SLOT0, SLOT0 + 1, SLOT0 + 2]));
    // Subscribed later in the round: its snapshot holds this slot's and the next one's.
    let at = NEXT_EDGE + BEHIND_CLOCK_GRACE_SECS;
    let mut ra = h.auth.subscribe(&a, t(at)).expect("subscribe");
    let snapshot = drain(&mut ra);
    let generations: BTreeSet<u64> = snapshot
        .iter()
        .filter_map(|p| match p {
            Push::Seeds { grants, .. } => Some(grants.iter().map(|g| g.generation.slot())),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(generations, BTreeSet::from([SLOT0 + 1, SLOT0 + 2]));
    // The round may still serve it (it was subscribed at the edge): the same grants, once.
    let later = tick_through(&mut h, &mut ra, at, NEXT_EDGE + 299);
    assert!(later.len() <= 1);
    for (_, pushes) in &later {
        assert!(
            pushes.iter().all(|p| snapshot.contains(p)),
            "identical grants"
        );
    }
    // A node first subscribed after the edge is not in the round at all.
    let c = id(3);
    let mut h = h.reopen(t(NEXT_EDGE - 1));
    h.auth.tick(t(NEXT_EDGE));
    let mut rc = h.auth.subscribe(&c, t(NEXT_EDGE)).expect("subscribe");
    drain(&mut rc);
    assert!(tick_through(&mut h, &mut rc, NEXT_EDGE, NEXT_EDGE + 299).is_empty());
    assert_eq!(
        tick_through(&mut h, &mut rc, NEXT_EDGE + 300, NEXT_EDGE + 599).len(),
        1
    );
}

#[test]
fn a_verifier_paused_past_a_whole_slot_rotates_everyone_at_once() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    h.enroll(2, "b");
    h.enroll(3, "c");
    let mut ra = h.subscribe(&a);
    drain(&mut ra);
    // No tick during slot SLOT0 + 1: a never got SLOT0 + 2, now current. It is served at the
    // first tick, not at its offset.
    let late = NEXT_EDGE + 300;
    let r = h.auth.tick(t(late));
    assert!(r.round_started);
    let got = drain(&mut ra);
    assert_eq!(kinds(&got), ["seeds", "seeds"]);
    let Push::Seeds { grants, .. } = &got[0] else {
        unreachable!()
    };
    assert_eq!(grants[0].valid_from, t(late));
    assert!(tick_through(&mut h, &mut ra, late, late + 299).is_empty());
}

#[test]
fn tick_prunes_expired_revocations_and_broadcasts_the_new_list() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    assert_eq!(revocation_version_sample(&h), "0", "none signed yet");
    h.auth.revoke(&NodeRef::Id(a), t(T0)).expect("revoke");
    let mut rb = h.subscribe(&b);
    drain(&mut rb);
    // Inside the attestation lifetime nothing is pruned (T0 + 299 is still the same slot).
    h.auth.tick(t(T0 + 199));
    assert!(drain(&mut rb).is_empty());
    assert_eq!(h.auth.revocation_list().map(|l| l.version), Some(1));
    // At until = T0 + 300 the entry runs out (and a slot edge passes).
    h.auth.tick(t(T0 + 300));
    let got = drain(&mut rb);
    assert!(kinds(&got).contains(&"revocations"), "{got:?}");
    let stored = h.auth.revocation_list().cloned().expect("list");
    assert_eq!(stored.version, 2);
    let keys = KeySet::new(vec![signing().verifying_key()]).expect("key set");
    let Ok(RevocationUpdate::Newer(list)) = verify_revocation_list(&stored.bytes, &keys, None)
    else {
        panic!("the pruned list verifies")
    };
    assert!(list.revoked.is_empty());
    assert_eq!(
        revocation_version_sample(&h),
        "2",
        "the pruned list's version"
    );
    // Nothing left to prune: no new version.
    h.auth.tick(t(T0 + 301));
    assert_eq!(h.auth.revocation_list().map(|l| l.version), Some(2));
    // A restart reads the version from the store.
    let h = h.reopen(t(T0 + 302));
    assert_eq!(revocation_version_sample(&h), "2", "loaded from the store");
}

// --- policy reload ------------------------------------------------------------------------

#[test]
fn policy_reload_pushes_new_routes_only_to_the_changed_nodes() {
    let mut h = Harness::new(islands_policy(true));
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    let d = h.enroll(4, "d");
    let mut rx: Vec<_> = [a, b, c, d].iter().map(|n| h.subscribe(n)).collect();
    for r in &mut rx {
        drain(r);
    }
    let before = h.pushes("table_part");
    let changed = h
        .auth
        .reload_policy(&islands_policy(false), t(T0))
        .expect("reload");
    assert_eq!(
        changed
            .changed
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["a", "b"])
    );
    // The diff: the pair {a, b} is gone, nothing added.
    assert_eq!(
        (
            changed.nodes_changed,
            changed.pairs_added,
            changed.pairs_removed
        ),
        (2, 0, 1)
    );
    assert!(changed.added.is_empty());
    assert_eq!(changed.removed, [["a".to_owned(), "b".to_owned()]]);
    let got: Vec<Vec<Push>> = rx.iter_mut().map(drain).collect();
    for i in [0, 1] {
        assert!(
            got[i].iter().all(|p| matches!(p, Push::TablePart(_))),
            "node {i} expected exactly its new table, got {:?}",
            got[i]
        );
        let [update] = table_updates(&got[i]).try_into().expect("one table update");
        assert!(
            !update
                .changes
                .iter()
                .any(|c| matches!(c, TableChange::Put(TableEntry::Peer(_)))),
            "node {i} has no peer left: {update:?}"
        );
    }
    assert!(got[2].is_empty());
    assert!(got[3].is_empty());
    assert_eq!(h.pushes("table_part"), before + 2);
    assert_eq!(
        h.auth.table(&c).map(|t| t.peers.clone()),
        Some(peer_set(&[d]))
    );
    let rec = h.last_event("policy_reload");
    let mut names: Vec<String> = rec["changed"]
        .as_array()
        .expect("changed is a list")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(rec["pairs_removed"], 1);
    assert_eq!(rec["removed"], serde_json::json!([["a", "b"]]));
    // Reloading the same text changes nothing.
    assert_eq!(
        h.auth
            .reload_policy(&islands_policy(false), t(T0))
            .expect("reload"),
        PolicyReload::default()
    );
    assert!(matches!(
        h.auth.reload_policy("not = [toml", t(T0)),
        Err(AdminError::Policy(_))
    ));
}

// --- reports ------------------------------------------------------------------------------

fn report(kind: ReportKind, peer: NodeId) -> Report {
    Report {
        kind,
        peer,
        generation: Some(Generation::compose(SLOT0, 0)),
        detail: BoundedString::truncated("seen in a test"),
    }
}

#[test]
fn reports_are_audited_and_compromised_key_use_reissues_the_pair() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    assert_eq!(
        h.auth
            .report(&id(9), &report(ReportKind::ForgedTokens, a), t(T0)),
        Err(Refusal::NotEnrolled)
    );
    assert_eq!(h.refusals("report_not_live"), 1);

    h.auth
        .report(&a, &report(ReportKind::ForgedTokens, b), t(T0))
        .expect("report");
    let rec = h.last_event("forged_tokens");
    assert_eq!(rec["reporter"], a.to_string());
    assert_eq!(rec["peer"], b.to_string());
    assert_eq!(rec["generation"], Generation::compose(SLOT0, 0).0);
    assert_eq!(rec["detail"], "seen in a test");
    assert_eq!(h.auth.metrics().reissues.get(), 0);

    let ac = h.auth.grants(&PairIds::new(a, c), t(T0));
    h.auth
        .report(&a, &report(ReportKind::CompromisedKeyUse, b), t(T0))
        .expect("report");
    assert_eq!(h.last_event("reissue")["why"], "compromised_key_use");
    assert_eq!(
        h.auth.grants(&PairIds::new(a, b), t(T0))[0].generation,
        Generation::compose(SLOT0, 1)
    );
    assert_eq!(h.auth.grants(&PairIds::new(a, c), t(T0)), ac);
    // About itself or an unknown peer: refused, nothing reissued.
    assert_eq!(
        h.auth
            .report(&a, &report(ReportKind::CompromisedKeyUse, a), t(T0)),
        Err(Refusal::BadRequest)
    );
    assert_eq!(h.refusals("report_about_self"), 1);
    assert_eq!(
        h.auth
            .report(&a, &report(ReportKind::CompromisedKeyUse, id(9)), t(T0)),
        Err(Refusal::BadRequest)
    );
    assert_eq!(h.refusals("report_peer_not_in_table"), 1);
    assert_eq!(h.auth.metrics().reissues.get(), 1);
    assert_eq!(
        h.auth
            .metrics()
            .reports
            .get_or_create(&[("kind", "compromised_key_use")])
            .get(),
        1
    );
    // A revoked reporter is refused.
    h.auth.revoke(&NodeRef::Id(c), t(T0)).expect("revoke");
    assert_eq!(
        h.auth
            .report(&c, &report(ReportKind::Impersonation, a), t(T0)),
        Err(Refusal::NotEnrolled)
    );
}

#[test]
fn alert_only_mode_records_compromised_key_use_without_reissuing() {
    let settings = Settings {
        on_compromise: CompromiseMode::AlertOnly,
        ..Settings::default()
    };
    let mut h = Harness::with_settings(standard_policy(), settings);
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let ab = h.auth.grants(&PairIds::new(a, b), t(T0));
    h.auth
        .report(&b, &report(ReportKind::CompromisedKeyUse, a), t(T0))
        .expect("report");
    assert_eq!(
        h.last_event("compromised_key_use")["reporter"],
        b.to_string()
    );
    assert_eq!(h.auth.grants(&PairIds::new(a, b), t(T0)), ab);
    assert_eq!(h.auth.metrics().reissues.get(), 0);
}

// --- hostile nodes: reports, pairs, address changes (issue #12 items 5, 6) ----------------

/// The standard topology plus `z` alone in segment s3, which no allow rule names: `z` is
/// outside every allowed pair.
fn lonely_policy() -> String {
    standard_policy()
        + "\n[[segment]]\nname = \"s3\"\n[[node]]\nname = \"z\"\nsegments = [\"s3\"]\n"
}

fn with_limits(f: impl FnOnce(&mut Limits)) -> Settings {
    let mut settings = Settings::default();
    f(&mut settings.limits);
    settings
}

fn events(h: &Harness, event: &str) -> Vec<Value> {
    h.audit()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

/// The `refusals_aggregated` summaries of `reason`.
fn summaries(h: &Harness, reason: &str) -> Vec<Value> {
    events(h, "refusals_aggregated")
        .into_iter()
        .filter(|r| r["reason"] == reason)
        .collect()
}

#[test]
fn a_node_outside_every_allowed_pair_gets_no_seeds_and_cannot_be_reported() {
    let mut h = Harness::new(lonely_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let z = h.enroll(9, "z");
    assert!(h.auth.table(&z).is_none_or(|t| t.peers.is_empty()));
    let mut rz = h.subscribe(&z);
    let mut ra = h.subscribe(&a);
    let snapshot = drain(&mut rz);
    assert!(seeds_peers(&snapshot).is_empty(), "{:?}", kinds(&snapshot));
    drain(&mut ra);
    // Slot rotations push seeds to a (its pairs), never to z.
    h.auth.tick(t(NEXT_EDGE));
    h.auth.tick(t(NEXT_EDGE + SPREAD));
    assert!(drain(&mut rz).is_empty());
    assert_eq!(seeds_peers(&drain(&mut ra)), peer_set(&[b]));
    // An operator reissue of a pair policy forbids is refused: no seeds for it.
    let err = h
        .auth
        .reissue(&NodeRef::Id(z), &NodeRef::Id(a), t(NEXT_EDGE))
        .expect_err("not a pair");
    assert!(matches!(err, AdminError::BadRequest(_)), "{err}");
    assert_eq!(h.refusals("reissue_not_a_pair"), 1);
    assert!(drain(&mut rz).is_empty());
    assert!(drain(&mut ra).is_empty());
    assert_eq!(h.auth.metrics().reissues.get(), 0);
    // Reports naming z as a peer, or by z about a, are refused; nothing is reissued.
    for (reporter, peer) in [(a, z), (z, a)] {
        assert_eq!(
            h.auth.report(
                &reporter,
                &report(ReportKind::CompromisedKeyUse, peer),
                t(NEXT_EDGE)
            ),
            Err(Refusal::BadRequest)
        );
    }
    assert_eq!(h.refusals("report_peer_not_in_table"), 2);
    assert_eq!(h.auth.metrics().reissues.get(), 0);
    assert!(drain(&mut rz).is_empty());
    assert!(drain(&mut ra).is_empty());
    assert_eq!(
        h.auth.seeds.reissues_of(&PairIds::new(a, z)),
        0,
        "the forbidden pair was never reissued"
    );
    let refused = h.last_event("report_refused");
    assert_eq!(refused["reason"], "report_peer_not_in_table");
    assert_eq!(refused["kind"], "compromised_key_use");
}

#[test]
fn a_compromised_key_use_report_about_a_non_peer_reissues_nothing() {
    // Islands: a-b and c-d; c is enrolled but not a's peer.
    let mut h = Harness::new(islands_policy(true));
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let c = h.enroll(3, "c");
    h.enroll(4, "d");
    let mut rc = h.subscribe(&c);
    drain(&mut rc);
    for kind in [
        ReportKind::CompromisedKeyUse,
        ReportKind::ForgedTokens,
        ReportKind::Impersonation,
    ] {
        assert_eq!(
            h.auth.report(&a, &report(kind, c), t(T0)),
            Err(Refusal::BadRequest)
        );
    }
    assert_eq!(h.refusals("report_peer_not_in_table"), 3);
    assert_eq!(h.auth.metrics().reissues.get(), 0);
    assert!(drain(&mut rc).is_empty(), "c was not touched");
    assert!(events(&h, "compromised_key_use").is_empty());
    // About its real peer: accepted and acted on.
    h.auth
        .report(&a, &report(ReportKind::CompromisedKeyUse, b), t(T0))
        .expect("report about a table peer");
    assert_eq!(h.auth.metrics().reissues.get(), 1);
    // A policy change that splits a and b: the same report is now refused.
    h.auth
        .reload_policy(&islands_policy(false), t(T0 + 1))
        .expect("reload");
    assert_eq!(
        h.auth
            .report(&a, &report(ReportKind::ForgedTokens, b), t(T0 + 1)),
        Err(Refusal::BadRequest)
    );
    assert_eq!(h.refusals("report_peer_not_in_table"), 4);
}

#[test]
fn reports_past_the_per_reporter_limit_are_refused_counted_and_audited_aggregated() {
    let settings = with_limits(|l| {
        l.reports_per_window = 3;
        l.report_window_secs = 60;
    });
    let mut h = Harness::with_settings(standard_policy(), settings);
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    for i in 0..3 {
        h.auth
            .report(&a, &report(ReportKind::ForgedTokens, b), t(T0 + i))
            .expect("within the limit");
    }
    for i in 0..500 {
        assert_eq!(
            h.auth
                .report(&a, &report(ReportKind::ForgedTokens, b), t(T0 + 3 + i % 50)),
            Err(Refusal::BadRequest)
        );
    }
    assert_eq!(h.refusals("report_rate_limited"), 500);
    assert_eq!(
        events(&h, "forged_tokens").len(),
        3,
        "only accepted reports"
    );
    assert_eq!(
        events(&h, "report_refused").len(),
        1,
        "one record, then a count"
    );
    assert_eq!(h.auth.metrics().audit_aggregated.get(), 499);
    // The limit is per reporter: b still reports.
    h.auth
        .report(&b, &report(ReportKind::ForgedTokens, a), t(T0 + 10))
        .expect("another reporter");
    // The next window: accepted again, and the summary of the refused ones is written.
    h.auth
        .report(&a, &report(ReportKind::ForgedTokens, b), t(T0 + 60))
        .expect("a new window");
    assert!(
        summaries(&h, "report_rate_limited").is_empty(),
        "not due before T0 + 63"
    );
    h.auth.tick(t(T0 + 63));
    let s = summaries(&h, "report_rate_limited");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["count"], 500);
    assert_eq!(s[0]["node"], a.to_string());
    assert_eq!(s[0]["refused_event"], "report_refused");
    assert_eq!(s[0]["first"], T0 + 3);
    assert_eq!(s[0]["last"], T0 + 52);
}

#[test]
fn a_report_of_a_generation_an_earlier_reissue_replaced_does_not_reissue_again() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let pair = PairIds::new(a, b);
    let old = h.auth.grants(&pair, t(T0))[0].generation;
    h.auth
        .reissue(&NodeRef::Id(a), &NodeRef::Id(b), t(T0))
        .expect("operator reissue");
    // b sees a token under the replaced generation (someone holds the old seed): recorded,
    // but the pair's current seeds are not implicated; no churn.
    for i in 0..5 {
        let r = Report {
            generation: Some(old),
            ..report(ReportKind::CompromisedKeyUse, a)
        };
        h.auth.report(&b, &r, t(T0 + i)).expect("report");
    }
    assert_eq!(h.auth.metrics().reissues.get(), 1);
    assert_eq!(h.auth.seeds.reissues_of(&pair), 1);
    assert_eq!(events(&h, "compromised_key_use").len(), 5);
    assert_eq!(
        h.last_event("reissue_skipped")["reason"],
        "generation_already_reissued"
    );
    // A generation of the current reissue count still reissues.
    let current = h.auth.grants(&pair, t(T0))[0].generation;
    let r = Report {
        generation: Some(current),
        ..report(ReportKind::CompromisedKeyUse, a)
    };
    h.auth.report(&b, &r, t(T0 + 9)).expect("report");
    assert_eq!(h.auth.seeds.reissues_of(&pair), 2);
}

#[test]
fn address_changes_past_the_limit_are_deferred_and_the_refresh_still_attests() {
    let settings = with_limits(|l| {
        l.address_changes_per_window = 2;
        l.address_change_window_secs = 600;
    });
    let mut h = Harness::with_settings(standard_policy(), settings);
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let mut rb = h.subscribe(&b);
    drain(&mut rb);
    let addr = |port: u16| [Address::truncated(&format!("127.0.0.1:{port}"))];
    let a_addresses = |h: &Harness| {
        h.auth
            .nodes_view()
            .into_iter()
            .find(|n| n.node_id == a.to_string())
            .expect("a")
            .addresses
    };
    // Two changes: applied, each pushes b a delta of one change, a's new peer info (and no
    // seeds: the pair is the same).
    for (i, port) in [(1, 30_001), (2, 30_002)] {
        h.auth
            .refresh(&a, &GOOD, &addr(port), t(T0 + i))
            .expect("refresh");
        let got = drain(&mut rb);
        assert_eq!(kinds(&got), ["table_part"]);
        let [update] = table_updates(&got).try_into().expect("one table update");
        assert!(!update.is_snapshot());
        let [TableChange::Put(TableEntry::Peer(info))] = &update.changes[..] else {
            panic!("one peer info: {update:?}");
        };
        assert_eq!(info.node_id, a);
        assert_eq!(info.addresses[0].as_str(), format!("127.0.0.1:{port}"));
    }
    // Unchanged addresses, many times: no push, and no change used up.
    for i in 0..50 {
        h.auth
            .refresh(&a, &GOOD, &addr(30_002), t(T0 + 3 + i))
            .expect("refresh");
    }
    assert!(drain(&mut rb).is_empty());
    // The third change in the window: attested, but deferred; b sees nothing.
    for i in 0..20 {
        let env = h
            .auth
            .refresh(&a, &GOOD, &addr(30_003), t(T0 + 100 + i))
            .expect("a deferred change still attests");
        assert!(!env.is_empty());
    }
    assert!(drain(&mut rb).is_empty());
    assert_eq!(a_addresses(&h), ["127.0.0.1:30002"]);
    assert_eq!(h.refusals("address_change_rate_limited"), 20);
    let deferred = events(&h, "address_change_deferred");
    assert_eq!(deferred.len(), 1, "aggregated");
    assert_eq!(deferred[0]["addresses"][0], "127.0.0.1:30003");
    assert_eq!(deferred[0]["reason"], "address_change_rate_limited");
    // A refresh in the next window applies it.
    h.auth
        .refresh(&a, &GOOD, &addr(30_003), t(T0 + 1 + 600))
        .expect("refresh");
    assert_eq!(a_addresses(&h), ["127.0.0.1:30003"]);
    assert_eq!(kinds(&drain(&mut rb)), ["table_part"]);
    h.auth.tick(t(T0 + 700));
    assert_eq!(summaries(&h, "address_change_rate_limited")[0]["count"], 20);
}

#[test]
fn rate_limit_windows_are_fixed_and_a_clock_stepping_back_does_not_reopen_them() {
    use super::registry::Window;
    let mut w = None;
    for _ in 0..3 {
        assert!(Window::take(&mut w, t(100), 3, 60));
    }
    assert!(!Window::take(&mut w, t(159), 3, 60), "past the limit");
    assert!(!Window::take(&mut w, t(50), 3, 60), "the clock went back");
    assert!(Window::take(&mut w, t(160), 3, 60), "a new window");
    let mut none = None;
    assert!(
        !Window::take(&mut none, t(1), 0, 60),
        "a zero limit refuses all"
    );
}

// --- aggregated audit of repeatable refusals (issue #12 item 2) ----------------------------

#[test]
fn ten_thousand_bogus_enrollments_from_one_key_cost_o1_audit_records() {
    let mut h = Harness::new(standard_policy());
    let before = h.audit().len();
    for i in 0..10_000u32 {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        let bogus = JoinSecret::from_bytes(bytes);
        assert_eq!(
            h.try_enroll(7, &bogus, GOOD, &addresses(7), t(T0 + u64::from(i) / 1_000)),
            Err(Refusal::JoinSecret)
        );
    }
    assert_eq!(
        h.refusals("join_secret_unknown"),
        10_000,
        "every one counted"
    );
    assert_eq!(h.auth.metrics().audit_aggregated.get(), 9_999);
    let refused = events(&h, "enroll_refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["node"], id(7).to_string());
    assert_eq!(refused[0]["hostname"], "test-host");
    assert!(
        summaries(&h, "join_secret_unknown").is_empty(),
        "not due yet"
    );
    // The periodic tick writes the summary once the interval has passed.
    h.auth.tick(t(T0 + 59));
    assert!(summaries(&h, "join_secret_unknown").is_empty());
    h.auth.tick(t(T0 + 60));
    let s = summaries(&h, "join_secret_unknown");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["count"], 10_000);
    assert_eq!(
        (s[0]["first"].clone(), s[0]["last"].clone()),
        (T0.into(), (T0 + 9).into())
    );
    assert_eq!(s[0]["refused_event"], "enroll_refused");
    // (Signed checkpoints of the audit chain aside.)
    let mut new: Vec<Value> = h.audit().split_off(before);
    new.retain(|r| r["event"] != "audit_checkpoint");
    assert_eq!(new.len(), 2, "two records for 10 000 refusals: {new:?}");
}

#[test]
fn bogus_enrollments_from_many_keys_share_one_other_bucket_past_the_key_bound() {
    let settings = with_limits(|l| l.audit_max_keys = 8);
    let mut h = Harness::with_settings(standard_policy(), settings);
    let bogus = JoinSecret::from_bytes([9; 32]);
    for i in 0..1_000u16 {
        let key = [i.to_be_bytes().to_vec(), vec![0xEE; 42]].concat();
        let r = h.auth.enroll(
            &Enrollment {
                spki: &key,
                join_secret: &bogus,
                measurement: GOOD,
                addresses: &addresses(1),
                hostname: "h",
            },
            t(T0),
        );
        assert_eq!(r, Err(Refusal::JoinSecret));
    }
    assert_eq!(h.refusals("join_secret_unknown"), 1_000);
    let refused = events(&h, "enroll_refused");
    assert_eq!(refused.len(), 9, "8 keys and one record for the overflow");
    assert_eq!(refused[8]["aggregated"], "other");
    assert_eq!(h.auth.metrics().audit_overflow.get(), 992);
    h.auth.tick(t(T0 + 60));
    let other: Vec<Value> = events(&h, "refusals_aggregated")
        .into_iter()
        .filter(|r| r["node"] == "other")
        .collect();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0]["count"], 992);
}

#[test]
fn refused_refreshes_and_bad_requests_are_aggregated_and_summarised_on_shutdown() {
    let mut h = Harness::new(standard_policy());
    for i in 0..1_000 {
        assert_eq!(
            h.auth.refresh(&id(9), &GOOD, &addresses(9), t(T0 + i % 10)),
            Err(Refusal::NotEnrolled)
        );
        h.auth.bad_request(&id(9), t(T0));
        assert!(h.auth.subscribe(&id(9), t(T0)).is_err());
    }
    assert_eq!(h.refusals("not_enrolled"), 1_000);
    assert_eq!(h.refusals("bad_request"), 1_000);
    assert_eq!(h.refusals("subscribe_not_live"), 1_000);
    assert_eq!(events(&h, "refresh_refused").len(), 1);
    assert_eq!(events(&h, "request_refused").len(), 1);
    assert_eq!(events(&h, "subscribe_refused").len(), 1);
    // Not due, but a shutdown (the authority dropped) writes what is pending.
    let h = h.reopen(t(T0 + 10));
    for (reason, event) in [
        ("not_enrolled", "refresh_refused"),
        ("bad_request", "request_refused"),
        ("subscribe_not_live", "subscribe_refused"),
    ] {
        let s = summaries(&h, reason);
        assert_eq!(s.len(), 1, "{reason}");
        assert_eq!(s[0]["count"], 1_000);
        assert_eq!(s[0]["refused_event"], event);
    }
}

#[test]
fn attacker_chosen_text_in_audit_records_is_bounded() {
    let mut h = Harness::new(standard_policy());
    let a = h.enroll(1, "a");
    let b = h.enroll(2, "b");
    let hostname = format!("evil\n{{\"event\":\"revoke\"}}{}", "x".repeat(240));
    let key = spki(5);
    let _ = h.auth.enroll(
        &Enrollment {
            spki: &key,
            join_secret: &JoinSecret::from_bytes([3; 32]),
            measurement: GOOD,
            addresses: &addresses(5),
            hostname: &hostname,
        },
        t(T0),
    );
    let rec = h.last_event("enroll_refused");
    let written = rec["hostname"].as_str().expect("hostname");
    assert!(written.len() <= hopmesh_protocol::audit_aggregate::MAX_AUDIT_TEXT_LEN + 3);
    assert!(written.starts_with("evil?{"), "{written}");
    assert!(!written.contains('\n'));
    let detail = format!("\u{1b}[2J{}", "y".repeat(250));
    let r = Report {
        detail: BoundedString::truncated(&detail),
        ..report(ReportKind::ForgedTokens, b)
    };
    h.auth.report(&a, &r, t(T0)).expect("report");
    let written = h.last_event("forged_tokens")["detail"]
        .as_str()
        .expect("detail")
        .to_owned();
    assert!(written.len() <= hopmesh_protocol::audit_aggregate::MAX_AUDIT_TEXT_LEN + 3);
    assert!(written.starts_with("?[2J"), "{written}");
}

// --- node references ----------------------------------------------------------------------

#[test]
fn node_refs_parse_ids_and_names() {
    let hex = id(1).to_string();
    assert_eq!(hex.parse::<NodeRef>(), Ok(NodeRef::Id(id(1))));
    assert_eq!("web-1".parse::<NodeRef>(), Ok(NodeRef::Name(name("web-1"))));
    let err = "Not A Name!".parse::<NodeRef>().expect_err("refused");
    assert!(
        err.starts_with("`Not A Name!` is neither a node id nor a node name"),
        "{err}"
    );
}

#[test]
fn a_name_resolves_to_its_live_node_before_revoked_ones() {
    let mut h = Harness::new(standard_policy());
    let old = h.enroll(1, "a");
    h.auth.revoke(&NodeRef::Id(old), t(T0)).expect("revoke");
    let new = h.enroll(2, "a");
    let out = h
        .auth
        .revoke(&NodeRef::Name(name("a")), t(T0 + 1))
        .expect("revoke by name");
    assert_eq!(out.node_id, new.to_string());
    assert!(matches!(
        h.auth.revoke(&NodeRef::Name(name("a")), t(T0 + 2)),
        Err(AdminError::AlreadyRevoked(_))
    ));
}

// --- fail closed --------------------------------------------------------------------------

/// A SQLite store whose writes fail while `fail` is set.
#[derive(Debug)]
struct FlakyStore {
    inner: SqliteStore,
    fail: Arc<std::sync::atomic::AtomicBool>,
    /// If set, `put_node` says it entered, then waits to be released.
    hold: Option<(
        std::sync::mpsc::Sender<()>,
        std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    )>,
}

impl FlakyStore {
    fn check(&self) -> Result<(), crate::store::StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::store::StoreError::BadValue(
                "injected failure".into(),
            ));
        }
        Ok(())
    }
}

impl Store for FlakyStore {
    fn put_join_token(
        &mut self,
        t: &crate::store::JoinTokenRecord,
    ) -> Result<(), crate::store::StoreError> {
        self.check()?;
        self.inner.put_join_token(t)
    }
    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<crate::store::JoinTokenUse, crate::store::StoreError> {
        self.inner.take_join_token(secret_hash, now)
    }
    fn put_node(&mut self, n: &crate::store::NodeRecord) -> Result<(), crate::store::StoreError> {
        if let Some((entered, release)) = &self.hold {
            let _ = entered.send(());
            // Bounded: a broken run fails instead of hanging.
            let _ = release
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .recv_timeout(std::time::Duration::from_secs(10));
        }
        self.check()?;
        self.inner.put_node(n)
    }
    fn nodes(&self) -> Result<Vec<crate::store::NodeRecord>, crate::store::StoreError> {
        self.inner.nodes()
    }
    fn bans(&self) -> Result<Vec<crate::store::BanSubject>, crate::store::StoreError> {
        self.inner.bans()
    }
    fn put_bans(
        &mut self,
        bans: &[crate::store::BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), crate::store::StoreError> {
        self.check()?;
        self.inner.put_bans(bans, reason, at)
    }
    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[crate::store::BanSubject],
        list: &StoredList,
    ) -> Result<(), crate::store::StoreError> {
        self.check()?;
        self.inner.commit_revocation(node, at, bans, list)
    }
    fn revocation_list(&self) -> Result<Option<StoredList>, crate::store::StoreError> {
        self.inner.revocation_list()
    }
    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), crate::store::StoreError> {
        self.check()?;
        self.inner.put_revocation_list(list)
    }
    fn reserve_serials(&mut self, n: u64) -> Result<u64, crate::store::StoreError> {
        self.check()?;
        self.inner.reserve_serials(n)
    }
    fn pair_states(&self) -> Result<Vec<crate::store::PairState>, crate::store::StoreError> {
        self.inner.pair_states()
    }
    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), crate::store::StoreError> {
        self.check()?;
        self.inner.commit_reissue(pair, reissues, compromised, at)
    }
}

/// An authority on `store`, the standard policy, its audit log in `dir`.
fn authority_on(dir: &Path, store: FlakyStore) -> Authority {
    let (audit, _) = AuditLog::open(&dir.join("audit.jsonl")).expect("audit");
    Authority::new(
        Parts {
            settings: Settings::default(),
            signing: signing(),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit,
            metrics: Arc::new(Metrics::default()),
            policy: Policy::parse(&standard_policy()).expect("policy"),
        },
        t(T0),
    )
    .expect("authority")
}

#[test]
fn a_failing_store_fails_closed_and_changes_nothing_in_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = FlakyStore {
        inner: SqliteStore::create(&dir.path().join("store.db")).expect("store"),
        fail: fail.clone(),
        hold: None,
    };
    let mut auth = authority_on(dir.path(), store);
    let token = |auth: &mut Authority, n: &str| {
        auth.create_join_token(&name(n), None, 60, t(T0))
            .expect("token")
            .0
    };
    let enroll = |auth: &mut Authority, key: u8, secret: &JoinSecret| {
        let k = spki(key);
        auth.enroll(
            &Enrollment {
                spki: &k,
                join_secret: secret,
                measurement: GOOD,
                addresses: &addresses(key),
                hostname: "test-host",
            },
            t(T0),
        )
    };
    let (sa, sb) = (token(&mut auth, "a"), token(&mut auth, "b"));
    enroll(&mut auth, 2, &sb).expect("b enrolls");
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    // Enrollment: refused as internal; the node is not registered.
    assert_eq!(enroll(&mut auth, 1, &sa), Err(Refusal::Internal));
    assert_eq!(
        auth.metrics()
            .refusals
            .get_or_create(&[("reason", "internal")])
            .get(),
        1
    );
    assert!(auth.nodes_view().iter().all(|v| v.name != "a"));
    // Revoke: an error, and the node stays live with no revocation list.
    assert!(matches!(
        auth.revoke(&NodeRef::Name(name("b")), t(T0)),
        Err(AdminError::Store(_))
    ));
    assert!(auth.revocation_list().is_none());
    assert!(auth.table(&id(2)).is_some());
    // A join token is not handed out unless stored.
    let enrolled_b = id(2);
    assert!(matches!(
        auth.create_join_token(&name("a"), None, 60, t(T0)),
        Err(AdminError::Store(_))
    ));
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let sa2 = token(&mut auth, "a");
    enroll(&mut auth, 1, &sa2).expect("a enrolls once the store works");
    let ab = auth.grants(&PairIds::new(id(1), enrolled_b), t(T0));
    // Reissue: an error, and the pair keeps its generations.
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        auth.reissue(&NodeRef::Id(id(1)), &NodeRef::Id(enrolled_b), t(T0)),
        Err(AdminError::Store(_))
    ));
    assert_eq!(auth.grants(&PairIds::new(id(1), enrolled_b), t(T0)), ab);
    assert_eq!(auth.metrics().reissues.get(), 0);
}

// --- store commits outside the authority lock -------------------------------------------

fn enrollment<'a>(key: &'a [u8], secret: &'a JoinSecret, addrs: &'a [Address]) -> Enrollment<'a> {
    Enrollment {
        spki: key,
        join_secret: secret,
        measurement: GOOD,
        addresses: addrs,
        hostname: "test-host",
    }
}

#[test]
fn an_enrollment_commit_runs_with_the_authority_lock_free() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let store = FlakyStore {
        inner: SqliteStore::create(&dir.path().join("store.db")).expect("store"),
        fail: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        hold: Some((entered_tx, std::sync::Mutex::new(release_rx))),
    };
    let auth = std::sync::Mutex::new(authority_on(dir.path(), store));
    let secret = lock_authority(&auth)
        .create_join_token(&name("a"), None, 60, t(T0))
        .expect("token")
        .0;
    std::thread::scope(|scope| {
        let enrolling = scope.spawn(|| {
            let (key, addrs) = (spki(1), addresses(1));
            enroll_outside_lock(&auth, &enrollment(&key, &secret, &addrs), t(T0))
                .map(|(mut a, issued)| a.publish(issued, t(T0)))
        });
        entered
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the enrollment reached its commit");
        // The commit is in progress (the store lock held by it): the authority lock is free,
        // the key reserved, the node not yet visible.
        {
            let a = auth
                .try_lock()
                .expect("the authority lock is free during the commit");
            assert!(!a.has_table(&id(1)));
            assert!(a.nodes_view().is_empty());
            assert_eq!(a.registry.commits_in_flight(), 1);
        }
        release.send(()).expect("release the commit");
        enrolling
            .join()
            .expect("no panic")
            .expect("the enrollment completes");
    });
    let a = lock_authority(&auth);
    assert!(a.has_table(&id(1)));
    assert_eq!(a.registry.commits_in_flight(), 0);
}

/// Reserves an enrollment of key `key` as `node` in `h` (its join secret consumed).
fn reserve(h: &mut Harness, key: u8, node: &str) -> Result<PendingEnrollment, Refusal> {
    let secret = h.token(node);
    let (k, addrs) = (spki(key), addresses(key));
    let e = enrollment(&k, &secret, &addrs);
    let token = lock(&h.auth.store_handle()).take_join_token(&join_secret_hash(&e), t(T0));
    h.auth.reserve_enrollment(&e, token, t(T0))
}

#[test]
fn an_enrollment_in_flight_holds_its_key_and_name() {
    let mut h = Harness::new(standard_policy());
    let pending = reserve(&mut h, 1, "a").expect("reserved");
    assert_eq!(reserve(&mut h, 1, "a").map(|_| ()), Err(Refusal::Internal));
    assert_eq!(h.refusals("commit_in_flight"), 1);
    assert_eq!(
        reserve(&mut h, 2, "a").map(|_| ()),
        Err(Refusal::NameTaken),
        "the name is held by the enrollment being committed"
    );
    let stored = lock(&h.auth.store_handle()).put_node(pending.record());
    let issued = h
        .auth
        .complete_enrollment(pending, stored, t(T0))
        .expect("completes");
    let _ = h.auth.publish(issued, t(T0));
    assert!(h.auth.has_table(&id(1)));
}

#[test]
fn a_failed_enrollment_commit_releases_the_name_and_registers_nothing() {
    let mut h = Harness::new(standard_policy());
    let pending = reserve(&mut h, 1, "a").expect("reserved");
    let failed = Err(crate::store::StoreError::BadValue("injected".into()));
    assert_eq!(
        h.auth
            .complete_enrollment(pending, failed, t(T0))
            .map(|_| ()),
        Err(Refusal::Internal)
    );
    assert!(!h.auth.registry.contains(&id(1)));
    assert_eq!(h.auth.registry.commits_in_flight(), 0);
    // The name is free again: another key takes it.
    h.enroll(2, "a");
}

#[test]
fn a_policy_change_during_an_enrollment_commit_refuses_it_after_the_commit() {
    let mut h = Harness::new(standard_policy());
    let pending = reserve(&mut h, 1, "a").expect("reserved");
    let stored = lock(&h.auth.store_handle()).put_node(pending.record());
    let policy = Policy::parse(&standard_policy().replace(&GOOD.to_string(), &BAD.to_string()))
        .expect("policy");
    let _ = h.auth.apply_policy(policy, t(T0));
    assert_eq!(
        h.auth
            .complete_enrollment(pending, stored, t(T0))
            .map(|_| ()),
        Err(Refusal::Measurement)
    );
    assert!(!h.auth.has_table(&id(1)));
    assert!(!h.auth.registry.contains(&id(1)));
    assert_eq!(h.refusals("measurement_not_allowed"), 1);
}

#[test]
fn a_revocation_during_a_refresh_commit_wins_in_memory_and_in_the_store() {
    let mut h = Harness::new(standard_policy());
    h.enroll(1, "a");
    let moved = vec![Address::truncated("127.0.0.1:29999")];
    let step = h
        .auth
        .begin_refresh(&id(1), &GOOD, &moved, t(T0))
        .expect("decided");
    let RefreshStep::Commit(pending) = step else {
        panic!("a changed address is committed: {step:?}");
    };
    // A second refresh of the key meanwhile is refused as busy.
    assert_eq!(
        h.auth
            .begin_refresh(&id(1), &GOOD, &moved, t(T0))
            .map(|_| ()),
        Err(Refusal::Internal)
    );
    assert_eq!(h.refusals("commit_in_flight"), 1);
    h.auth.revoke(&NodeRef::Id(id(1)), t(T0)).expect("revoke");
    let stored = lock(&h.auth.store_handle()).put_node(pending.record());
    assert_eq!(
        h.auth.complete_refresh(pending, stored, t(T0)).map(|_| ()),
        Err(Refusal::Revoked)
    );
    assert!(!h.auth.has_table(&id(1)));
    // The late write kept the revocation: after a restart the node is still revoked.
    let mut h = h.reopen(t(T0 + 1));
    assert_eq!(
        h.auth.refresh(&id(1), &GOOD, &moved, t(T0 + 1)),
        Err(Refusal::Revoked)
    );
}

#[test]
fn an_unchanged_refresh_is_signed_in_one_step() {
    let mut h = Harness::new(standard_policy());
    h.enroll(1, "a");
    let step = h
        .auth
        .begin_refresh(&id(1), &GOOD, &addresses(1), t(T0))
        .expect("decided");
    assert!(matches!(step, RefreshStep::Attested(_)), "{step:?}");
    assert_eq!(h.auth.registry.commits_in_flight(), 0);
}

// --- incremental tables and deltas --------------------------------------------------------

/// One segment `s` of nodes `n1..n{n}`, each serving `v{i}.s`; `allow s -> s` (or, with
/// `open = false`, only `s -> v1.s`); `[[route]] n1 -> n2 via n3`.
fn mesh_policy(n: u8, open: bool) -> String {
    let mut t = format!(
        "[attestation]\nmeasurements = [\"{GOOD}\"]\n[[segment]]\nname = \"s\"\n[[allow]]\nfrom = \"s\"\nto = \"{}\"\n",
        if open { "s" } else { "v1.s" }
    );
    for i in 1..=n {
        t += &format!(
            "[[node]]\nname = \"n{i}\"\nsegments = [\"s\"]\n[[service]]\nname = \"v{i}\"\nsegment = \"s\"\nnode = \"n{i}\"\nbackend = \"127.0.0.1:{}\"\n",
            18_000 + u16::from(i)
        );
    }
    t + "[[route]]\nfrom = \"n1\"\nto = \"n2\"\nvia = \"n3\"\n"
}

/// The reference: `node`'s entries per `Policy::compile_for` over the live directory.
fn reference_entries(h: &Harness, node: &NodeId) -> hopmesh_protocol::table_sync::Entries {
    let dir = h.auth.registry.directory();
    let rec = h.auth.registry.get(node).expect("known");
    let Some(table) = h.auth.tables.policy().compile_for(&rec.name, &dir) else {
        return Default::default();
    };
    let infos: Vec<_> = table
        .peers
        .iter()
        .map(|p| tables::peer_info(h.auth.registry.get(p).expect("live peer")))
        .collect();
    hopmesh_protocol::table_sync::entries_of(&table, &infos)
}

/// Each subscribed node applies every table update it receives, as a node does (a delta only
/// on the version held, the digest checked); what it holds must equal the reference compile
/// after every step: enrolments, a relay's arrival, address changes, a revocation, reloads.
#[test]
fn the_deltas_a_node_applies_give_the_reference_table_after_every_change() {
    use hopmesh_protocol::table_sync::SyncedTable;
    let mut h = Harness::new(mesh_policy(6, true));
    type Held = std::collections::BTreeMap<NodeId, (mpsc::Receiver<Push>, Option<SyncedTable>)>;
    let mut held = Held::new();
    let mut updates = 0;
    let mut check = |h: &mut Harness, held: &mut Held, step: &str| {
        for (node, (rx, synced)) in held.iter_mut() {
            if !h.auth.registry.is_live(node) {
                continue;
            }
            for u in table_updates(&drain(rx)) {
                let next = SyncedTable::apply_to(synced.as_ref(), &u)
                    .unwrap_or_else(|e| panic!("{step}: update refused: {e}"));
                *synced = Some(next);
                updates += 1;
            }
            let got = synced
                .as_ref()
                .map(|s| s.entries().clone())
                .unwrap_or_default();
            assert_eq!(got, reference_entries(h, node), "{step}: {node:?}");
            let (sent, now) = h.auth.tables.digests(node);
            assert_eq!(sent, now, "{step}: the digest kept equals the entries'");
        }
    };
    for (k, name) in [(1, "n1"), (2, "n2"), (4, "n4")] {
        let id = h.enroll(k, name);
        held.insert(id, (h.subscribe(&id), None));
    }
    check(&mut h, &mut held, "subscribed");
    // n3 is the relay of n1 -> n2: its arrival reroutes v2.s for n1.
    for (k, name) in [(3, "n3"), (5, "n5"), (6, "n6")] {
        h.enroll(k, name);
        check(&mut h, &mut held, name);
    }
    for k in [3, 5, 6] {
        held.insert(id(k), (h.subscribe(&id(k)), None));
    }
    check(&mut h, &mut held, "all subscribed");
    h.auth
        .refresh(
            &id(3),
            &GOOD,
            &[Address::truncated("127.0.0.1:31003")],
            t(T0 + 1),
        )
        .expect("refresh");
    check(&mut h, &mut held, "n3 readdressed");
    h.auth
        .revoke(&NodeRef::Id(id(3)), t(T0 + 2))
        .expect("revoke");
    check(&mut h, &mut held, "relay revoked");
    let r = h
        .auth
        .reload_policy(&mesh_policy(6, false), t(T0 + 3))
        .expect("reload");
    assert!(r.pairs_removed > 0 && r.pairs_added == 0, "{r:?}");
    check(&mut h, &mut held, "closed reload");
    let r = h
        .auth
        .reload_policy(&mesh_policy(5, true), t(T0 + 4))
        .expect("reload");
    assert!(r.pairs_added > 0, "{r:?}");
    check(&mut h, &mut held, "open reload without n6");
    assert!(h.auth.table(&id(6)).is_none(), "n6 is no longer in policy");
    assert!(updates > 20, "only {updates} updates");
}

/// An enrolment pushes each existing peer one delta of three changes (a route, an allowed
/// entry, the peer) and the seeds of the one new pair only (was: the whole table and the
/// seeds of every pair).
#[test]
fn an_enrolment_pushes_deltas_and_only_the_new_pairs_seeds() {
    let mut h = Harness::new(mesh_policy(6, true));
    // n1..n2 and n4..n5: n3 (the relay) stays out, so every pair is direct.
    let ids: Vec<NodeId> = [(1, "n1"), (2, "n2"), (4, "n4"), (5, "n5")]
        .into_iter()
        .map(|(k, n)| h.enroll(k, n))
        .collect();
    let mut rx: Vec<_> = ids.iter().map(|n| h.subscribe(n)).collect();
    for r in &mut rx {
        drain(r);
    }
    let n6 = h.enroll(6, "n6");
    for (i, r) in rx.iter_mut().enumerate() {
        let got = drain(r);
        assert_eq!(kinds(&got), ["table_part", "seeds"], "node {i}");
        assert_eq!(seeds_peers(&got), peer_set(&[n6]));
        let [update] = table_updates(&got).try_into().expect("one update");
        // A delta on the version the node got in its snapshot.
        let base = update.base.expect("a delta, not a snapshot");
        assert_eq!(update.version, base + 1);
        assert_eq!(update.changes.len(), 3, "{update:?}");
    }
}

/// A shared SQLite store whose change feed fails while `feed_down` is set, counting the list
/// writes (prunes) made on it.
#[derive(Debug)]
struct FeedDown {
    inner: SqliteStore,
    feed_down: Arc<std::sync::atomic::AtomicBool>,
    list_writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Store for FeedDown {
    fn put_join_token(
        &mut self,
        t: &crate::store::JoinTokenRecord,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.put_join_token(t)
    }
    fn take_join_token(
        &mut self,
        secret_hash: &[u8; 32],
        now: UnixTime,
    ) -> Result<crate::store::JoinTokenUse, crate::store::StoreError> {
        self.inner.take_join_token(secret_hash, now)
    }
    fn put_node(&mut self, n: &crate::store::NodeRecord) -> Result<(), crate::store::StoreError> {
        self.inner.put_node(n)
    }
    fn nodes(&self) -> Result<Vec<crate::store::NodeRecord>, crate::store::StoreError> {
        self.inner.nodes()
    }
    fn bans(&self) -> Result<Vec<crate::store::BanSubject>, crate::store::StoreError> {
        self.inner.bans()
    }
    fn put_bans(
        &mut self,
        bans: &[crate::store::BanSubject],
        reason: &str,
        at: UnixTime,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.put_bans(bans, reason, at)
    }
    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[crate::store::BanSubject],
        list: &StoredList,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.commit_revocation(node, at, bans, list)
    }
    fn revocation_list(&self) -> Result<Option<StoredList>, crate::store::StoreError> {
        self.inner.revocation_list()
    }
    fn put_revocation_list(&mut self, list: &StoredList) -> Result<(), crate::store::StoreError> {
        self.list_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.put_revocation_list(list)
    }
    fn reserve_serials(&mut self, n: u64) -> Result<u64, crate::store::StoreError> {
        self.inner.reserve_serials(n)
    }
    fn pair_states(&self) -> Result<Vec<crate::store::PairState>, crate::store::StoreError> {
        self.inner.pair_states()
    }
    fn commit_reissue(
        &mut self,
        pair: &PairIds,
        reissues: u16,
        compromised: &[Generation],
        at: UnixTime,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.commit_reissue(pair, reissues, compromised, at)
    }
    fn put_audit_anchor(
        &mut self,
        anchor: &hopmesh_transport::audit::SignedHead,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.put_audit_anchor(anchor)
    }
    fn audit_anchor(
        &self,
    ) -> Result<Option<hopmesh_transport::audit::SignedHead>, crate::store::StoreError> {
        self.inner.audit_anchor()
    }
    fn is_shared(&self) -> bool {
        true
    }
    fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::store::Change>, crate::store::StoreError> {
        if self.feed_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::store::StoreError::Timeout(
                std::time::Duration::from_secs(2),
            ));
        }
        self.inner.changes_since(after, limit)
    }
}

#[test]
fn a_replica_whose_feed_read_failed_defers_its_prune_until_the_feed_reads_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().expect("temp dir");
    let feed_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let list_writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = FeedDown {
        inner: SqliteStore::create(&dir.path().join("store.db")).expect("store"),
        feed_down: feed_down.clone(),
        list_writes: list_writes.clone(),
    };
    let (audit, _) = AuditLog::open(&dir.path().join("audit.jsonl")).expect("audit");
    let mut auth = Authority::new(
        Parts {
            settings: Settings::default(),
            signing: signing(),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit,
            metrics: Arc::new(Metrics::default()),
            policy: Policy::parse(&standard_policy()).expect("policy"),
        },
        t(T0),
    )
    .expect("authority");
    let secret = auth
        .create_join_token(&name("a"), None, 60, t(T0))
        .expect("token")
        .0;
    let k = spki(1);
    auth.enroll(
        &Enrollment {
            spki: &k,
            join_secret: &secret,
            measurement: GOOD,
            addresses: &addresses(1),
            hostname: "test-host",
        },
        t(T0),
    )
    .expect("enrolls");
    auth.revoke(&NodeRef::Name(name("a")), t(T0))
        .expect("revoke");
    let after = t(T0 + auth.settings().attestation_ttl + 1);
    assert!(auth.revocations.prune_due(after), "the entry ran out");

    // The feed read fails: the prune waits, however often the tick runs.
    feed_down.store(true, SeqCst);
    assert!(auth.follow(after).is_err());
    for _ in 0..5 {
        auth.tick(after);
    }
    assert_eq!(list_writes.load(SeqCst), 0, "no prune while the feed fails");
    // The feed reads again: the next tick prunes.
    feed_down.store(false, SeqCst);
    auth.follow(after).expect("the feed reads");
    auth.tick(after);
    assert_eq!(
        list_writes.load(SeqCst),
        1,
        "pruned once the feed read again"
    );
    assert!(!auth.revocations.prune_due(after));
}
