//! The store contract: one suite, run against SQLite and against PostgreSQL (a throwaway
//! cluster, see `pg_cluster.rs`). A backend passes only if every case passes on it.
//!
//! A [`Backend`] hands out handles on one durable state: a reopen after a restart, or (for
//! PostgreSQL) the connection of another replica. The cross-replica cases run on PostgreSQL
//! only: SQLite is one verifier's file.

use std::sync::{Arc, Barrier};

use super::*;
use crate::store::pg_cluster::PgCluster;

/// One durable state and a way to open handles on it.
pub(super) trait Backend {
    /// A new handle on the same state.
    fn open(&self) -> Box<dyn Store>;
}

pub(super) struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    pub(super) fn new() -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SqliteStore::create(&dir.path().join("s.db")).expect("create"));
        Some(Self { dir })
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Box<dyn Store> {
        Box::new(SqliteStore::open(&self.dir.path().join("s.db")).expect("open"))
    }
}

/// The signing key the contract's PostgreSQL stores are bound to.
pub(super) const MESH_KEY: [u8; 32] = [0x5a; 32];

pub(super) struct Postgres {
    pub(super) target: PgTarget,
    _cluster: Arc<PgCluster>,
}

impl Postgres {
    pub(super) fn new() -> Option<Self> {
        let cluster = PgCluster::shared()?;
        let target = PgTarget {
            url: cluster.fresh_database(),
            ca: None,
        };
        assert_eq!(
            PostgresStore::init(&target, &MESH_KEY).expect("init"),
            postgres::InitOutcome::Created
        );
        Some(Self {
            target,
            _cluster: cluster,
        })
    }
}

impl Backend for Postgres {
    fn open(&self) -> Box<dyn Store> {
        Box::new(PostgresStore::open(&self.target, &MESH_KEY, "r1", false).expect("open"))
    }
}

fn name(s: &str) -> NodeName {
    NodeName::new(s).expect("valid")
}

fn node(id: NodeId, n: &str) -> NodeRecord {
    NodeRecord {
        node_id: id,
        name: name(n),
        spki: vec![1, 2, 3],
        measurement: Measurement([4; 32]),
        addresses: vec!["127.0.0.1:1".into(), "[::1]:2".into()],
        enrolled_at: UnixTime::from_secs(5),
        revoked_at: None,
    }
}

fn list(version: u64) -> StoredList {
    StoredList {
        version,
        bytes: version.to_be_bytes().to_vec(),
    }
}

fn anchor(seq: u64, hash: &str) -> SignedHead {
    SignedHead {
        seq,
        hash: hash.into(),
        key_id: "00".repeat(8),
        sig: "00".repeat(64),
    }
}

pub(super) fn join_tokens_are_single_use_and_expire(b: &dyn Backend) {
    let mut s = b.open();
    let t = JoinTokenRecord {
        secret_hash: [1; 32],
        name: name("a"),
        segments: Some(vec!["s1".into(), "s2".into()]),
        created_at: UnixTime::from_secs(100),
        expires_at: UnixTime::from_secs(200),
    };
    s.put_join_token(&t).expect("put");
    s.put_join_token(&JoinTokenRecord {
        secret_hash: [2; 32],
        segments: None,
        ..t.clone()
    })
    .expect("put");
    assert!(s.put_join_token(&t).is_err(), "a secret is stored once");
    let at = UnixTime::from_secs;
    assert_eq!(
        s.take_join_token(&[9; 32], at(150)).expect("take"),
        JoinTokenUse::Unknown
    );
    assert_eq!(
        s.take_join_token(&[2; 32], at(200)).expect("take"),
        JoinTokenUse::Expired
    );
    assert_eq!(
        s.take_join_token(&[1; 32], at(150)).expect("take"),
        JoinTokenUse::Valid(t)
    );
    assert_eq!(
        b.open().take_join_token(&[1; 32], at(151)).expect("take"),
        JoinTokenUse::Used,
        "used, as seen through another handle"
    );
}

pub(super) fn a_record_write_never_clears_a_revocation(b: &dyn Backend) {
    let mut s = b.open();
    let id = NodeId::from_bytes([7; 32]);
    let rec = node(id, "a");
    s.put_node(&rec).expect("node");
    s.commit_revocation(&id, UnixTime::from_secs(9), &[], &list(1))
        .expect("revoke");
    // A refresh decided before the revocation and committed after it.
    let mut late = rec.clone();
    late.addresses = vec!["127.0.0.1:2".into()];
    s.put_node(&late).expect("late refresh");
    let stored = s.nodes().expect("nodes");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].addresses, late.addresses, "the write landed");
    assert_eq!(stored[0].revoked_at, Some(UnixTime::from_secs(9)));
}

pub(super) fn revocations_bans_serials_and_pairs_persist(b: &dyn Backend) {
    let id = NodeId::from_bytes([7; 32]);
    let pair = PairIds::new(id, NodeId::from_bytes([8; 32]));
    {
        let mut s = b.open();
        s.put_node(&node(id, "a")).expect("node");
        s.put_node(&node(NodeId::from_bytes([3; 32]), "b"))
            .expect("node");
        s.commit_revocation(
            &id,
            UnixTime::from_secs(9),
            &[BanSubject::Node(id)],
            &list(1),
        )
        .expect("revoke");
        s.put_bans(
            &[BanSubject::Name(name("a")), BanSubject::Node(id)],
            "operator",
            UnixTime::from_secs(10),
        )
        .expect("ban (the repeated one is kept once)");
        assert_eq!(s.reserve_serials(100).expect("reserve"), 1);
        assert_eq!(s.reserve_serials(100).expect("reserve"), 101);
        s.commit_reissue(
            &pair,
            1,
            &[Generation(3), Generation(4)],
            UnixTime::from_secs(11),
        )
        .expect("reissue");
        s.commit_reissue(&pair, 2, &[Generation(4)], UnixTime::from_secs(12))
            .expect("reissue again");
        // A writer working from a stale count: refused, and nothing of it lands.
        for stale in [1, 2] {
            assert!(
                s.commit_reissue(&pair, stale, &[Generation(9)], UnixTime::from_secs(13))
                    .is_err(),
                "a reissue count never goes back or repeats ({stale})"
            );
        }
    }
    let mut s = b.open();
    let nodes = s.nodes().expect("nodes");
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "ordered by name"
    );
    assert_eq!(nodes[0].revoked_at, Some(UnixTime::from_secs(9)));
    assert_eq!(nodes[0].addresses, vec!["127.0.0.1:1", "[::1]:2"]);
    assert_eq!(
        nodes[0],
        NodeRecord {
            revoked_at: Some(UnixTime::from_secs(9)),
            ..node(id, "a")
        }
    );
    let mut bans = s.bans().expect("bans");
    bans.sort();
    assert_eq!(
        bans,
        vec![BanSubject::Node(id), BanSubject::Name(name("a"))]
    );
    assert_eq!(s.revocation_list().expect("list"), Some(list(1)));
    let pairs = s.pair_states().expect("pairs");
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].reissues, 2);
    assert_eq!(pairs[0].compromised, vec![Generation(3), Generation(4)]);
    assert_eq!(
        s.reserve_serials(1).expect("reserve"),
        201,
        "serials never go back"
    );
}

pub(super) fn a_stale_list_version_is_refused_whole(b: &dyn Backend) {
    let mut s = b.open();
    let (a, c) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
    s.put_node(&node(a, "a")).expect("node");
    s.put_node(&node(c, "c")).expect("node");
    assert_eq!(s.revocation_list().expect("list"), None);
    s.commit_revocation(&a, UnixTime::from_secs(9), &[BanSubject::Node(a)], &list(2))
        .expect("first");
    // A writer that read version 1 (or 2) before that commit offers a stale version.
    for stale in [1, 2] {
        let e = s
            .commit_revocation(
                &c,
                UnixTime::from_secs(10),
                &[BanSubject::Node(c)],
                &list(stale),
            )
            .expect_err("stale");
        assert!(
            matches!(e, StoreError::StaleVersion { stored: 2, offered } if offered == stale),
            "{e}"
        );
        let e = s.put_revocation_list(&list(stale)).expect_err("stale");
        assert!(matches!(e, StoreError::StaleVersion { .. }), "{e}");
    }
    assert_eq!(s.revocation_list().expect("list"), Some(list(2)));
    let nodes = s.nodes().expect("nodes");
    let c_rec = nodes.iter().find(|n| n.node_id == c).expect("c");
    assert_eq!(
        c_rec.revoked_at, None,
        "nothing of the refused commit landed"
    );
    assert_eq!(s.bans().expect("bans"), vec![BanSubject::Node(a)]);
    s.commit_revocation(
        &c,
        UnixTime::from_secs(10),
        &[BanSubject::Node(c)],
        &list(3),
    )
    .expect("the next version");
    s.put_revocation_list(&list(5)).expect("a prune moves on");
    assert_eq!(b.open().revocation_list().expect("list"), Some(list(5)));
}

#[test]
fn each_replica_has_its_own_audit_anchor() {
    let Some(b) = Postgres::new() else { return };
    let open = |r: &str| PostgresStore::open(&b.target, &MESH_KEY, r, false).expect("open");
    let (mut r1, mut r2) = (open("r1"), open("r2"));
    r1.put_audit_anchor(&anchor(7, "aa")).expect("r1");
    assert_eq!(
        r2.audit_anchor().expect("r2"),
        None,
        "r2's log anchored nothing yet"
    );
    r2.put_audit_anchor(&anchor(2, "bb"))
        .expect("r2's own chain, behind r1's");
    assert_eq!(
        open("r1").audit_anchor().expect("r1"),
        Some(anchor(7, "aa"))
    );
    assert_eq!(
        open("r2").audit_anchor().expect("r2"),
        Some(anchor(2, "bb"))
    );
    let e = PostgresStore::open(&b.target, &MESH_KEY, "", false).expect_err("no name");
    assert!(matches!(e, StoreError::Config(_)), "{e}");
}

pub(super) fn the_audit_anchor_only_moves_forward(b: &dyn Backend) {
    {
        let mut s = b.open();
        assert_eq!(s.audit_anchor().expect("read"), None);
        s.put_audit_anchor(&anchor(5, "aa")).expect("put");
        s.put_audit_anchor(&anchor(5, "aa"))
            .expect("the same head again");
        assert!(s.put_audit_anchor(&anchor(4, "bb")).is_err(), "backwards");
        assert!(
            s.put_audit_anchor(&anchor(5, "bb")).is_err(),
            "same seq, other hash"
        );
        s.put_audit_anchor(&anchor(9, "cc")).expect("forward");
    }
    assert_eq!(
        b.open().audit_anchor().expect("read"),
        Some(anchor(9, "cc"))
    );
}

macro_rules! contract {
    ($module:ident, $backend:ident, $($case:ident),+ $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $case() {
                    if let Some(b) = super::$backend::new() {
                        super::$case(&b);
                    }
                }
            )+
        }
    };
}

mod run {
    use super::*;
    contract!(
        sqlite,
        Sqlite,
        join_tokens_are_single_use_and_expire,
        a_record_write_never_clears_a_revocation,
        revocations_bans_serials_and_pairs_persist,
        a_stale_list_version_is_refused_whole,
        the_audit_anchor_only_moves_forward,
    );
    contract!(
        postgres,
        Postgres,
        join_tokens_are_single_use_and_expire,
        a_record_write_never_clears_a_revocation,
        revocations_bans_serials_and_pairs_persist,
        a_stale_list_version_is_refused_whole,
        the_audit_anchor_only_moves_forward,
    );
}

/// What replicas acknowledged: each revoke's list version. Correct when the versions are
/// exactly `1..=n` (unique, none skipped) and each replica's own acknowledgements increase.
pub(super) fn check_versions(per_replica: &[Vec<u64>]) -> Result<(), String> {
    for (i, acks) in per_replica.iter().enumerate() {
        if let Some(w) = acks.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!("replica {i} acknowledged {} after {}", w[1], w[0]));
        }
    }
    let mut all: Vec<u64> = per_replica.iter().flatten().copied().collect();
    all.sort_unstable();
    for (want, got) in (1..).zip(&all) {
        if *got != want {
            return Err(match got.cmp(&want) {
                std::cmp::Ordering::Less => format!("version {got} acknowledged twice"),
                _ => format!("version {want} skipped"),
            });
        }
    }
    Ok(())
}

#[test]
fn the_version_checker_fails_on_broken_histories() {
    assert_eq!(check_versions(&[vec![1, 3], vec![2, 4]]), Ok(()));
    assert_eq!(check_versions(&[]), Ok(()));
    let broken: &[(&[&[u64]], &str)] = &[
        (&[&[1, 2], &[2, 3]], "acknowledged twice"),
        (&[&[1, 2], &[4]], "version 3 skipped"),
        (&[&[2, 1]], "acknowledged 1 after 2"),
        (&[&[2]], "version 1 skipped"),
    ];
    for (history, want) in broken {
        let h: Vec<Vec<u64>> = history.iter().map(|r| r.to_vec()).collect();
        let e = check_versions(&h).expect_err("broken");
        assert!(e.contains(want), "{h:?}: {e}");
    }
}

/// Replicas revoking concurrently: each reads the list, offers the next version, and on
/// [`StoreError::StaleVersion`] reads again and retries (what a replica's authority does).
/// Returns each replica's acknowledged versions.
fn revoke_storm(b: &Postgres, replicas: usize, each: usize) -> Vec<Vec<u64>> {
    let start = Arc::new(Barrier::new(replicas));
    let handles: Vec<_> = (0..replicas)
        .map(|r| {
            let mut s = b.open();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut acked = Vec::new();
                let mut retries = 0;
                while acked.len() < each {
                    let next = s
                        .revocation_list()
                        .expect("list")
                        .map_or(1, |l| l.version + 1);
                    let id = NodeId::from_bytes([u8::try_from(r).expect("few"); 32]);
                    match s.commit_revocation(&id, UnixTime::from_secs(1), &[], &list(next)) {
                        Ok(()) => acked.push(next),
                        Err(StoreError::StaleVersion { .. }) => retries += 1,
                        Err(e) => panic!("replica {r}: {e}"),
                    }
                    assert!(retries < 100 * each, "replica {r} starved");
                }
                acked
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("replica thread"))
        .collect()
}

#[test]
fn concurrent_revokes_at_three_replicas_get_unique_increasing_versions() {
    let Some(b) = Postgres::new() else { return };
    let acks = revoke_storm(&b, 3, 20);
    check_versions(&acks).expect("versions");
    assert_eq!(acks.iter().map(Vec::len).sum::<usize>(), 60);
    assert_eq!(b.open().revocation_list().expect("list"), Some(list(60)));
}

#[test]
fn one_join_secret_used_at_two_replicas_at_once_enrolls_once() {
    let Some(b) = Postgres::new() else { return };
    let mut s = b.open();
    const ROUNDS: u8 = 20;
    for i in 0..ROUNDS {
        s.put_join_token(&JoinTokenRecord {
            secret_hash: [i; 32],
            name: name(&format!("n{i}")),
            segments: None,
            created_at: UnixTime::from_secs(1),
            expires_at: UnixTime::from_secs(1000),
        })
        .expect("put");
    }
    let start = Arc::new(Barrier::new(2));
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            let mut s = b.open();
            let start = start.clone();
            std::thread::spawn(move || {
                (0..ROUNDS)
                    .map(|i| {
                        start.wait();
                        s.take_join_token(&[i; 32], UnixTime::from_secs(2))
                            .expect("take")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<Vec<JoinTokenUse>> = replicas
        .into_iter()
        .map(|h| h.join().expect("replica"))
        .collect();
    for i in 0..usize::from(ROUNDS) {
        let valid = outcomes
            .iter()
            .filter(|o| matches!(o[i], JoinTokenUse::Valid(_)))
            .count();
        let used = outcomes
            .iter()
            .filter(|o| o[i] == JoinTokenUse::Used)
            .count();
        assert_eq!((valid, used), (1, 1), "round {i}: {outcomes:?}");
    }
}

#[test]
fn concurrent_serial_reservations_never_overlap() {
    let Some(b) = Postgres::new() else { return };
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            let mut s = b.open();
            std::thread::spawn(move || {
                (0..20)
                    .map(|_| s.reserve_serials(10).expect("reserve"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut firsts: Vec<u64> = replicas
        .into_iter()
        .flat_map(|h| h.join().expect("replica"))
        .collect();
    firsts.sort_unstable();
    let want: Vec<u64> = (0..60).map(|i| 1 + 10 * i).collect();
    assert_eq!(firsts, want, "blocks of 10, disjoint and contiguous");
}

#[test]
fn a_postgres_store_is_bound_to_its_mesh_and_schema() {
    let Some(b) = Postgres::new() else { return };
    let other = [0x11; 32];
    let e = PostgresStore::open(&b.target, &other, "r1", false).expect_err("another mesh");
    assert!(matches!(e, StoreError::WrongMesh(_)), "{e}");
    let e = PostgresStore::init(&b.target, &other).expect_err("another mesh");
    assert!(matches!(e, StoreError::WrongMesh(_)), "{e}");
    assert_eq!(
        PostgresStore::init(&b.target, &MESH_KEY).expect("init again"),
        postgres::InitOutcome::Current,
        "init is idempotent for its own mesh"
    );
    // A database nobody initialised.
    let cluster = PgCluster::shared().expect("running");
    let empty = PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    };
    let e = PostgresStore::open(&empty, &MESH_KEY, "r1", false).expect_err("empty");
    assert!(
        matches!(e, StoreError::Missing(_)) && e.to_string().contains("init --store"),
        "{e}"
    );
    // A newer schema, as a newer build would leave it: refused by open and by init.
    let raw = b.open();
    drop(raw);
    set_schema_version(&b.target, PG_SCHEMA_VERSION + 1);
    for e in [
        PostgresStore::open(&b.target, &MESH_KEY, "r1", false).expect_err("newer"),
        PostgresStore::init(&b.target, &MESH_KEY).expect_err("newer"),
    ] {
        assert!(e.to_string().contains("newer than this build"), "{e}");
    }
}

/// Test only: overwrites the stored schema version.
fn set_schema_version(target: &PgTarget, v: i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let (cfg, _) = target.config().expect("config");
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
        let driver = tokio::spawn(conn);
        c.execute(
            "UPDATE hopmesh.meta SET value = $1 WHERE key = 'schema_version'",
            &[&v],
        )
        .await
        .expect("update");
        drop(c);
        let _ = driver.await;
    });
}

#[test]
fn a_replica_serves_once_and_other_replicas_serve_beside_it() {
    let Some(b) = Postgres::new() else { return };
    let first = PostgresStore::open(&b.target, &MESH_KEY, "r1", true).expect("first");
    let e = PostgresStore::open(&b.target, &MESH_KEY, "r1", true).expect_err("r1 again");
    assert!(matches!(e, StoreError::InUse(_)), "{e}");
    let mut other = PostgresStore::open(&b.target, &MESH_KEY, "r2", true).expect("r2 serves too");
    other.check_serving().expect("r2 issues");
    PostgresStore::open(&b.target, &MESH_KEY, "r1", false).expect("a non-serving reader may open");
    drop(first);
    PostgresStore::open(&b.target, &MESH_KEY, "r1", true).expect("the lock went with the first");
}

/// Each batch a follower reads starts right after the last entry it saw and has no holes.
pub(super) fn check_feed(batches: &[Vec<u64>]) -> Result<u64, String> {
    let mut last = 0;
    for b in batches {
        for &seq in b {
            if seq != last + 1 {
                return Err(format!("entry {seq} read after {last}"));
            }
            last = seq;
        }
    }
    Ok(last)
}

#[test]
fn the_feed_checker_fails_on_broken_feeds() {
    assert_eq!(check_feed(&[vec![1, 2], vec![], vec![3]]), Ok(3));
    assert!(check_feed(&[vec![1, 3]]).is_err(), "a hole");
    assert!(check_feed(&[vec![1, 2], vec![2]]).is_err(), "read twice");
    assert!(check_feed(&[vec![2, 1]]).is_err(), "out of order");
}

#[test]
fn the_change_feed_is_read_in_commit_order_without_holes_while_three_replicas_write() {
    let Some(b) = Postgres::new() else { return };
    const EACH: u8 = 20;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let s = PostgresStore::open(&b.target, &MESH_KEY, "reader", false).expect("open");
        let done = done.clone();
        std::thread::spawn(move || {
            let mut batches = Vec::new();
            let mut last = s.change_head().expect("head");
            assert_eq!(last, 0);
            let started = std::time::Instant::now();
            loop {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(60),
                    "bounded"
                );
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch: Vec<u64> = s
                    .changes_since(last, 7)
                    .expect("read")
                    .iter()
                    .map(|c| c.seq)
                    .collect();
                if let Some(l) = batch.last() {
                    last = *l;
                }
                let empty = batch.is_empty();
                batches.push(batch);
                if finished && empty {
                    return batches;
                }
            }
        })
    };
    let start = Arc::new(Barrier::new(3));
    let writers: Vec<_> = (0..3u8)
        .map(|w| {
            let mut s =
                PostgresStore::open(&b.target, &MESH_KEY, &format!("w{w}"), false).expect("open");
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for i in 0..EACH {
                    let id = NodeId::from_bytes([w * 100 + i; 32]);
                    s.put_node(&node(id, &format!("n{w}-{i}"))).expect("node");
                    s.put_bans(&[BanSubject::Node(id)], "test", UnixTime::from_secs(1))
                        .expect("ban");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let batches = reader.join().expect("reader");
    let total = check_feed(&batches).expect("the follower never saw a hole");
    assert_eq!(total, 3 * 2 * u64::from(EACH), "every write is in the feed");
    // Each replica's own entries are marked as its own, in the order it wrote them.
    let s = PostgresStore::open(&b.target, &MESH_KEY, "w1", false).expect("open");
    assert_eq!(s.change_head().expect("head"), total);
    let all = s.changes_since(0, 1000).expect("read");
    let mine: Vec<&ChangeKind> = all.iter().filter(|c| c.mine).map(|c| &c.kind).collect();
    let want: Vec<ChangeKind> = (0..EACH)
        .flat_map(|i| {
            let id = NodeId::from_bytes([100 + i; 32]);
            [ChangeKind::Node(id), ChangeKind::Ban(BanSubject::Node(id))]
        })
        .collect();
    assert_eq!(mine, want.iter().collect::<Vec<_>>());
    assert!(
        all.iter().all(|c| c.at_ms > 1_600_000_000_000),
        "the database's clock"
    );
}

#[test]
fn every_replicated_write_names_what_it_changed_in_the_feed() {
    let Some(b) = Postgres::new() else { return };
    let mut s = PostgresStore::open(&b.target, &MESH_KEY, "w", false).expect("open");
    let (x, y) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
    let pair = PairIds::new(x, y);
    s.put_node(&node(x, "x")).expect("node");
    s.commit_revocation(&x, UnixTime::from_secs(9), &[BanSubject::Node(x)], &list(1))
        .expect("revoke");
    s.put_revocation_list(&list(2)).expect("prune");
    s.commit_reissue(&pair, 1, &[Generation(4)], UnixTime::from_secs(9))
        .expect("reissue");
    s.put_bans(
        &[BanSubject::Name(name("x"))],
        "ban",
        UnixTime::from_secs(9),
    )
    .expect("ban");
    assert_eq!(s.put_policy("first").expect("policy"), 1);
    assert_eq!(s.put_policy("second").expect("policy"), 2);
    // Writes no other replica needs in memory are not in the feed.
    s.reserve_serials(1).expect("serials");
    s.put_join_token(&JoinTokenRecord {
        secret_hash: [3; 32],
        name: name("z"),
        segments: None,
        created_at: UnixTime::from_secs(1),
        expires_at: UnixTime::from_secs(99),
    })
    .expect("token");
    let other = PostgresStore::open(&b.target, &MESH_KEY, "other", false).expect("open");
    let feed = other.changes_since(0, 100).expect("read");
    let kinds: Vec<ChangeKind> = feed.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            ChangeKind::Node(x),
            ChangeKind::List,
            ChangeKind::Node(x),
            ChangeKind::Ban(BanSubject::Node(x)),
            ChangeKind::List,
            ChangeKind::Pair(pair),
            ChangeKind::Ban(BanSubject::Name(name("x"))),
            ChangeKind::Policy,
            ChangeKind::Policy,
        ]
    );
    assert_eq!(
        other.policy().expect("policy"),
        Some((2, "second".to_owned()))
    );
    assert!(feed.iter().all(|c| !c.mine));
    assert_eq!(
        other
            .changes_since(3, 2)
            .expect("read")
            .iter()
            .map(|c| c.seq)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    // What the follower re-reads.
    assert!(
        other
            .node(&x)
            .expect("node")
            .is_some_and(|n| n.revoked_at.is_some())
    );
    assert_eq!(other.node(&y).expect("node"), None);
    let state = other.pair_state(&pair).expect("pair").expect("stored");
    assert_eq!(
        (state.reissues, state.compromised),
        (1, vec![Generation(4)])
    );
    assert_eq!(
        other
            .pair_state(&PairIds::new(x, NodeId::from_bytes([7; 32])))
            .expect("pair"),
        None
    );
}

#[test]
fn a_feed_entry_no_build_writes_is_refused() {
    for (kind, subject) in [
        ("node", vec![1; 31]),
        ("list", vec![1]),
        ("pair", vec![1; 63]),
        ("ban_name", vec![0xff, 0xfe]),
        ("policy", vec![1]),
        ("acl", vec![]),
    ] {
        let e = postgres::change_of(kind, subject).expect_err(kind);
        assert!(matches!(e, StoreError::BadValue(_)), "{e}");
    }
    assert_eq!(
        postgres::change_of("list", vec![]).expect("list"),
        ChangeKind::List
    );
}

#[test]
fn tls_to_the_store_is_verified_against_the_ca_file() {
    let Some(cluster) = PgCluster::start_tls() else {
        return;
    };
    let ca = cluster.ca().expect("tls cluster").to_owned();
    let url = |db: &str| format!("postgresql://postgres@127.0.0.1:{}/{db}", cluster.port());
    let tls = PgTarget {
        url: url("postgres"),
        ca: Some(ca.clone()),
    };
    assert_eq!(tls.config().expect("config").1, TlsPlan::Verify);
    assert_eq!(
        PostgresStore::init(&tls, &MESH_KEY).expect("init over TLS"),
        postgres::InitOutcome::Created
    );
    let mut s = PostgresStore::open(&tls, &MESH_KEY, "r1", false).expect("open over TLS");
    assert_eq!(s.reserve_serials(1).expect("a call over TLS"), 1);
    // Over TCP the server probes a replica's sessions as the replica probes the server (a
    // partitioned replica's serve lock ends on the server too), and ends a session left idle
    // inside a transaction.
    for (setting, want) in [
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "10000"),
        ("idle_in_transaction_session_timeout", "10s"),
    ] {
        assert_eq!(s.show(setting).expect(setting), want, "{setting}");
    }
    // A CA that did not sign the server's certificate: refused, with the reason.
    let dir = tempfile::tempdir().expect("tempdir");
    let other = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).expect("ca").pem()).expect("write");
    let wrong = PgTarget {
        url: url("postgres"),
        ca: Some(other),
    };
    let e = PostgresStore::open(&wrong, &MESH_KEY, "r1", false).expect_err("wrong CA");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // A CA file that holds no certificate.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a pem\n").expect("write");
    let e = PostgresStore::open(
        &PgTarget {
            url: url("postgres"),
            ca: Some(empty),
        },
        &MESH_KEY,
        "r1",
        false,
    )
    .expect_err("empty CA file");
    assert!(e.to_string().contains("holds no certificate"), "{e}");
}

#[test]
fn a_call_with_the_server_down_fails_with_the_reason_and_the_pool_recovers() {
    let Some(cluster) = PgCluster::start_private() else {
        return;
    };
    let target = PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    };
    PostgresStore::init(&target, &MESH_KEY).expect("init");
    let mut s = PostgresStore::open(&target, &MESH_KEY, "r1", false).expect("open");
    assert_eq!(s.reserve_serials(1).expect("up"), 1);
    cluster.stop();
    let started = std::time::Instant::now();
    let e = s.reserve_serials(1).expect_err("down");
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    assert!(
        started.elapsed() < PG_CALL_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    let e = PostgresStore::open(&target, &MESH_KEY, "r1", false).expect_err("down");
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    cluster.restart();
    assert_eq!(
        s.reserve_serials(1)
            .expect("the pool replaced its closed connections"),
        2,
        "the failed call reserved nothing"
    );
}

#[test]
fn a_verifier_that_lost_its_serve_lock_is_fenced_until_it_took_it_again_and_caught_up() {
    let Some(cluster) = PgCluster::start_private() else {
        return;
    };
    let target = PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    };
    PostgresStore::init(&target, &MESH_KEY).expect("init");
    let mut a = PostgresStore::open(&target, &MESH_KEY, "a", true).expect("a serves");
    a.check_serving().expect("holding the lock");
    cluster.stop();
    cluster.restart();
    // The lock's session ended with the server; give its driver a moment to see it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Meanwhile another replica writes.
    let mut b = PostgresStore::open(&target, &MESH_KEY, "b", true).expect("b serves");
    b.reserve_serials(1).expect("b writes");
    // The attempt to take the lock again runs in the background (a call never waits for it).
    let started = std::time::Instant::now();
    let first = a.check_serving().expect_err("lost");
    assert!(matches!(&first, StoreError::Fenced(_)), "{first}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(500),
        "a fenced call does not wait for the database"
    );
    loop {
        let e = a
            .check_serving()
            .expect_err("lost, then taken again: catching up");
        assert!(matches!(&e, StoreError::Fenced(_)), "{e}");
        if e.to_string().contains("catching up") {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for _ in 0..2 {
        let e = a
            .reserve_serials(1)
            .expect_err("fenced: nothing acknowledged");
        assert!(
            matches!(&e, StoreError::Fenced(why) if why.contains("change feed")),
            "{e}"
        );
        a.check_serving().expect_err("still catching up");
    }
    assert!(
        PostgresStore::open(&target, &MESH_KEY, "a", true).is_err(),
        "a holds its lock again"
    );
    a.feed_current();
    a.check_serving().expect("caught up: serving again");
    a.reserve_serials(1).expect("and writing");
    // A replica whose follower stops reading is fenced once the feed is older than the bound.
    std::thread::sleep(FEED_STALE_BOUND + std::time::Duration::from_millis(200));
    let e = a
        .check_serving()
        .expect_err("the feed was not read within the bound");
    assert!(
        matches!(&e, StoreError::Fenced(why) if why.contains("stale")),
        "{e}"
    );
    a.feed_current();
    a.check_serving().expect("read again");
    drop(b);
}
