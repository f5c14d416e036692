//! The audit log as part of the durable record: a revoke whose record cannot be written is
//! refused and changes nothing; durable records are anchored in the store; checkpoints are
//! signed (`journal.rs`).

use std::path::Path;
use std::sync::Arc;

use hopmesh_protocol::attestation::{KeySet, SigningKey};
use hopmesh_protocol::enrollment::{Address, Refusal, Report, ReportKind};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName};
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::secret::{MasterSecret, SigningSeed};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedString;
use hopmesh_transport::audit::{self, AuditLog, CHECKPOINT_EVENT, read_since};

use super::*;
use crate::store::{SqliteStore, StoreError};

const T0: u64 = 1_800_000_100;
const GOOD: Measurement = Measurement([7; 32]);

fn t(secs: u64) -> UnixTime {
    UnixTime::from_secs(secs)
}

fn signing() -> SigningKey {
    SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]))
}

fn policy() -> Policy {
    let text = include_str!("../../../tests/fixtures/standard-policy.toml")
        .replace("{measurement}", &GOOD.to_string())
        .replace("{api}", "127.0.0.1:18080")
        .replace("{db}", "127.0.0.1:18082")
        .replace("{web}", "127.0.0.1:18081");
    Policy::parse(&text).expect("policy")
}

fn authority(dir: &Path) -> Authority {
    let store = SqliteStore::create(&dir.join("store.db")).expect("store");
    let (audit, _) = AuditLog::open(&dir.join("audit.jsonl")).expect("audit log opens");
    Authority::new(
        Parts {
            settings: Settings::default(),
            signing: signing(),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit,
            metrics: Arc::new(Metrics::default()),
            policy: policy(),
        },
        t(T0),
    )
    .expect("authority")
}

fn enroll(auth: &mut Authority, key: u8, name: &str) -> NodeId {
    let secret = auth
        .create_join_token(&NodeName::new(name).expect("name"), None, 60, t(T0))
        .expect("token")
        .0;
    let spki = vec![key; 44];
    auth.enroll(
        &Enrollment {
            spki: &spki,
            join_secret: &secret,
            measurement: GOOD,
            addresses: &[Address::truncated(&format!(
                "127.0.0.1:{}",
                20_000 + u16::from(key)
            ))],
            hostname: "test-host",
        },
        t(T0),
    )
    .expect("enrolled");
    NodeId::from_spki(&spki)
}

fn failures(auth: &Authority, kind: &'static str) -> u64 {
    auth.metrics()
        .audit_write_failures
        .get_or_create(&[("kind", kind)])
        .get()
}

#[test]
fn a_revoke_whose_audit_record_cannot_be_written_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every write to the audit log fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", dir.path().join("audit.jsonl")).expect("symlink");
    let mut auth = authority(dir.path());
    // Best-effort records (join tokens, enrollments) fail, are counted, and the operations go on.
    let a = enroll(&mut auth, 1, "a");
    let b = enroll(&mut auth, 2, "b");
    assert!(
        failures(&auth, "best_effort") >= 4,
        "tokens and enrollments"
    );

    match auth.revoke(&NodeRef::Id(a), t(T0 + 1)) {
        Err(AdminError::Store(StoreError::Audit(e))) => {
            assert!(e.to_string().contains("No space left on device"), "{e}");
        }
        other => panic!("a revoke whose audit record was lost was acknowledged: {other:?}"),
    }
    assert_eq!(failures(&auth, "durable"), 1);
    // Nothing changed: not in memory, not in the store, nothing pushed.
    assert!(auth.revocation_list().is_none());
    assert!(auth.nodes_view().iter().all(|n| n.revoked_at.is_none()));
    assert!(
        crate::store::lock(&auth.store)
            .revocation_list()
            .expect("store")
            .is_none()
    );
    assert!(
        crate::store::lock(&auth.store)
            .nodes()
            .expect("store")
            .iter()
            .all(|n| n.revoked_at.is_none())
    );
    assert_eq!(auth.metrics().revocations.get(), 0);
    assert_eq!(
        crate::store::lock(&auth.store)
            .audit_anchor()
            .expect("store"),
        None
    );
    // Ban and reissue fail the same way; a node's report is not accepted unrecorded.
    assert!(matches!(
        auth.ban(&NodeRef::Id(b), t(T0 + 1)),
        Err(AdminError::Store(StoreError::Audit(_)))
    ));
    assert!(
        crate::store::lock(&auth.store)
            .bans()
            .expect("bans")
            .is_empty()
    );
    let report = Report {
        kind: ReportKind::ForgedTokens,
        peer: b,
        generation: None,
        detail: BoundedString::truncated("test"),
    };
    assert_eq!(auth.report(&a, &report, t(T0 + 1)), Err(Refusal::Internal));
    // A checkpoint cannot be written either: counted, never a panic.
    auth.tick(t(T0 + 100));
}

#[test]
fn durable_records_are_anchored_in_the_store_and_checkpoints_are_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut auth = authority(dir.path());
    let a = enroll(&mut auth, 1, "a");
    enroll(&mut auth, 2, "b");
    assert_eq!(
        crate::store::lock(&auth.store)
            .audit_anchor()
            .expect("store"),
        None,
        "nothing durable yet"
    );
    auth.revoke(&NodeRef::Id(a), t(T0 + 1)).expect("revoke");
    let revoke_head = auth.audit.head();
    let anchor = crate::store::lock(&auth.store)
        .audit_anchor()
        .expect("store")
        .expect("anchored");
    assert_eq!(
        anchor.head(),
        revoke_head,
        "the anchor is the revoke record"
    );
    let keys = KeySet::new(vec![signing().verifying_key()]).expect("keys");
    anchor.check(&keys).expect("signed by the verifier key");
    let records = read_since(auth.audit_path(), 0).expect("read");
    let revoke = records
        .iter()
        .find(|r| r["event"] == "revoke")
        .expect("revoke record");
    assert_eq!(revoke["seq"], revoke_head.seq);

    // The first tick checkpoints; the next ones wait for the interval and for new records.
    auth.tick(t(T0 + 2));
    let after_first = auth.audit.head();
    assert_eq!(after_first.seq, revoke_head.seq + 1);
    let last = read_since(auth.audit_path(), revoke_head.seq).expect("read");
    assert_eq!(last[0]["event"], CHECKPOINT_EVENT);
    assert_eq!(last[0]["at_seq"], revoke_head.seq);
    auth.tick(t(T0 + 2 + CHECKPOINT_INTERVAL_SECS));
    assert_eq!(
        auth.audit.head(),
        after_first,
        "no new records: no checkpoint"
    );
    enroll(&mut auth, 3, "c");
    auth.tick(t(T0 + 3));
    let grown = auth.audit.head();
    assert_eq!(
        grown.seq,
        after_first.seq + 2,
        "token and enroll, no checkpoint yet"
    );
    auth.tick(t(T0 + 2 + CHECKPOINT_INTERVAL_SECS));
    assert_eq!(
        auth.audit.head().seq,
        grown.seq + 1,
        "a checkpoint after the interval"
    );
    assert_eq!(
        crate::store::lock(&auth.store)
            .audit_anchor()
            .expect("store")
            .expect("anchor")
            .head(),
        grown
    );
    let s = audit::verify_anchored(
        auth.audit_path(),
        Some(&grown),
        &mut audit::check_checkpoints(&keys),
    )
    .expect("valid");
    assert_eq!(s.checkpoints, 2);
}

/// A SQLite store whose revocation commit fails while `fail` is set (anchors still work).
#[derive(Debug)]
struct FailingCommit {
    inner: SqliteStore,
    fail: bool,
}

impl crate::store::Store for FailingCommit {
    fn put_join_token(&mut self, t: &crate::store::JoinTokenRecord) -> Result<(), StoreError> {
        self.inner.put_join_token(t)
    }
    fn take_join_token(
        &mut self,
        h: &[u8; 32],
        now: UnixTime,
    ) -> Result<crate::store::JoinTokenUse, StoreError> {
        self.inner.take_join_token(h, now)
    }
    fn put_node(&mut self, n: &crate::store::NodeRecord) -> Result<(), StoreError> {
        self.inner.put_node(n)
    }
    fn nodes(&self) -> Result<Vec<crate::store::NodeRecord>, StoreError> {
        self.inner.nodes()
    }
    fn bans(&self) -> Result<Vec<crate::store::BanSubject>, StoreError> {
        self.inner.bans()
    }
    fn put_bans(
        &mut self,
        b: &[crate::store::BanSubject],
        r: &str,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.inner.put_bans(b, r, at)
    }
    fn commit_revocation(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        bans: &[crate::store::BanSubject],
        list: &crate::store::StoredList,
    ) -> Result<(), StoreError> {
        if self.fail {
            return Err(StoreError::BadValue("injected commit failure".into()));
        }
        self.inner.commit_revocation(node, at, bans, list)
    }
    fn revocation_list(&self) -> Result<Option<crate::store::StoredList>, StoreError> {
        self.inner.revocation_list()
    }
    fn put_revocation_list(&mut self, l: &crate::store::StoredList) -> Result<(), StoreError> {
        self.inner.put_revocation_list(l)
    }
    fn reserve_serials(&mut self, n: u64) -> Result<u64, StoreError> {
        self.inner.reserve_serials(n)
    }
    fn pair_states(&self) -> Result<Vec<crate::store::PairState>, StoreError> {
        self.inner.pair_states()
    }
    fn commit_reissue(
        &mut self,
        p: &hopmesh_protocol::hop_token::PairIds,
        r: u16,
        c: &[hopmesh_protocol::hop_token::Generation],
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.inner.commit_reissue(p, r, c, at)
    }
    fn put_audit_anchor(&mut self, a: &audit::SignedHead) -> Result<(), StoreError> {
        self.inner.put_audit_anchor(a)
    }
    fn audit_anchor(&self) -> Result<Option<audit::SignedHead>, StoreError> {
        self.inner.audit_anchor()
    }
}

#[test]
fn a_revoke_whose_commit_fails_after_its_record_is_refused_and_marked_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FailingCommit {
        inner: SqliteStore::create(&dir.path().join("store.db")).expect("store"),
        fail: true,
    };
    let (audit_log, _) = AuditLog::open(&dir.path().join("audit.jsonl")).expect("audit");
    let mut auth = Authority::new(
        Parts {
            settings: Settings::default(),
            signing: signing(),
            master: MasterSecret::from_bytes([2; 32]),
            store: Box::new(store),
            audit: audit_log,
            metrics: Arc::new(Metrics::default()),
            policy: policy(),
        },
        t(T0),
    )
    .expect("authority");
    let a = enroll(&mut auth, 1, "a");
    enroll(&mut auth, 2, "b");
    assert!(matches!(
        auth.revoke(&NodeRef::Id(a), t(T0 + 1)),
        Err(AdminError::Store(StoreError::BadValue(_)))
    ));
    // Nothing applied; the record written ahead is followed by one saying it did not happen.
    assert!(auth.revocation_list().is_none());
    assert!(auth.nodes_view().iter().all(|n| n.revoked_at.is_none()));
    let records = read_since(auth.audit_path(), 0).expect("read");
    let revoke = records
        .iter()
        .find(|r| r["event"] == "revoke")
        .expect("written ahead");
    let aborted = records.last().expect("records");
    assert_eq!(aborted["event"], "revoke_aborted");
    assert_eq!(aborted["record"], revoke["seq"]);
    assert!(
        aborted["error"]
            .as_str()
            .expect("error")
            .contains("injected")
    );
    // The anchor names the revoke record, which is on disk: the log still verifies against it.
    let anchor = crate::store::lock(&auth.store)
        .audit_anchor()
        .expect("store")
        .expect("anchored");
    assert_eq!(Some(anchor.seq), revoke["seq"].as_u64());
    audit::verify_anchored(auth.audit_path(), Some(&anchor.head()), &mut |_, _| Ok(()))
        .expect("consistent");
}
