//! Verifier benches.
//!
//! - `attestation_issue`: one refresh through the authority (checks, serial, Ed25519 sign,
//!   audit record) beside a raw Ed25519 sign baseline. Target ≥ 5 000 attestations/s on one
//!   core (≤ 200 µs each). Again on PostgreSQL (`verifier/postgres/…`), where a store that
//!   replicas share hands out each serial from the database: one round trip per attestation.
//! - revocation push latency is in `revocation_push.rs` (a load run, not criterion).
//! - `store/{sqlite,postgres}/…`: the durable commits behind a revoke (`commit_revocation`)
//!   and an enrolment (`put_node`), and a serial block, on each backend in the same run
//!   (PostgreSQL: a throwaway cluster on a unix socket with `fsync = on`, in the same temp
//!   file system as the SQLite file; `HOPMESH_SKIP_POSTGRES=1` leaves it out).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use hopmesh_protocol::attestation::SigningKey;
use hopmesh_protocol::enrollment::Address;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::ids::{Measurement, NodeName};
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::secret::{MasterSecret, SigningSeed};
use hopmesh_protocol::time::UnixTime;
use hopmesh_tests::{Attest, standard_policy_with};
use hopmesh_transport::audit::AuditLog;
use hopmesh_transport::identity::Identity;
use hopmesh_verifier::authority::{Authority, Enrollment, Parts, Settings};
use hopmesh_verifier::metrics::Metrics;
use hopmesh_verifier::store::{
    NodeRecord, PgTarget, PostgresStore, SqliteStore, Store, StoredList,
};

#[path = "../../verifier/src/store/pg_cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg_cluster;

fn issuance(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::create(&dir.path().join("store.db")).expect("store");
    let raw = SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]));
    let msg = [7u8; 300];
    let mut g = c.benchmark_group("verifier");
    g.bench_function("baseline_ed25519_sign_300B", |b| {
        b.iter(|| raw.sign_raw(black_box(&msg)))
    });
    g.finish();
    refreshes(c, "verifier", Box::new(store));
    let Some(cluster) = pg_cluster::PgCluster::start_durable() else {
        eprintln!("verifier/postgres skipped: HOPMESH_SKIP_POSTGRES=1");
        return;
    };
    let target = PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    };
    PostgresStore::init(&target, &[9; 32]).expect("init");
    // Opened without the serve lock: no follower runs here to keep the feed fresh.
    let pg = PostgresStore::open(&target, &[9; 32], "bench", false).expect("open");
    // On a store replicas share, each attestation takes its serial from the database.
    refreshes(c, "verifier/postgres", Box::new(pg));
}

/// One refresh through the authority on `store` (node `a` of the standard test policy).
fn refreshes(c: &mut Criterion, group: &str, store: Box<dyn Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (audit, _) = AuditLog::open(&dir.path().join("audit.jsonl")).expect("audit");
    // The standard test policy; node `a` enrolls and refreshes.
    let measurement = Measurement([3; 32]);
    let policy = Policy::parse(&standard_policy_with(
        Attest::Pinned(measurement),
        "127.0.0.1:1",
        "127.0.0.1:1",
        "127.0.0.1:1",
    ))
    .expect("policy");
    let now = UnixTime::from_secs(1_800_000_000);
    let mut auth = Authority::new(
        Parts {
            settings: Settings::default(),
            signing: SigningKey::from_seed(&SigningSeed::from_bytes([1; 32])),
            master: MasterSecret::from_bytes([2; 32]),
            store,
            audit,
            metrics: Arc::new(Metrics::default()),
            policy,
        },
        now,
    )
    .expect("authority");
    let node = Identity::generate().expect("identity");
    let spki = node.spki();
    let (secret, _) = auth
        .create_join_token(&NodeName::new("a").expect("name"), None, 60, now)
        .expect("token");
    let addresses = [Address::truncated("127.0.0.1:1")];
    auth.enroll(
        &Enrollment {
            spki: &spki,
            join_secret: &secret,
            measurement,
            addresses: &addresses,
            hostname: "bench",
        },
        now,
    )
    .expect("enroll");
    let id = node.node_id();
    let mut g = c.benchmark_group(group);
    g.bench_function("attestation_issue_refresh", |b| {
        b.iter(|| {
            auth.refresh(black_box(&id), &measurement, &addresses, now)
                .expect("refresh")
        })
    });
    g.finish();
}

/// The commits a revoke and an enrolment wait for, on one backend.
fn store_commits(c: &mut Criterion, backend: &str, store: &mut dyn Store) {
    let mut g = c.benchmark_group(format!("store/{backend}"));
    let record = |i: u64| NodeRecord {
        node_id: NodeId::from_bytes({
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&i.to_be_bytes());
            b
        }),
        name: NodeName::new(&format!("n{i}")).expect("name"),
        spki: vec![1; 44],
        measurement: Measurement([3; 32]),
        addresses: vec!["127.0.0.1:1".into()],
        enrolled_at: UnixTime::from_secs(1),
        revoked_at: None,
    };
    let mut i = 0u64;
    g.bench_function("put_node", |b| {
        b.iter(|| {
            i += 1;
            store.put_node(&record(i)).expect("put_node")
        })
    });
    let mut version = 0u64;
    g.bench_function("commit_revocation", |b| {
        b.iter(|| {
            version += 1;
            let list = StoredList {
                version,
                bytes: vec![7; 200],
            };
            store
                .commit_revocation(&record(version).node_id, UnixTime::from_secs(2), &[], &list)
                .expect("commit_revocation")
        })
    });
    g.bench_function("reserve_serials", |b| {
        b.iter(|| store.reserve_serials(1024).expect("reserve"))
    });
    g.finish();
}

fn stores(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sqlite = SqliteStore::create(&dir.path().join("bench.db")).expect("sqlite");
    store_commits(c, "sqlite", &mut sqlite);
    let Some(cluster) = pg_cluster::PgCluster::start_durable() else {
        eprintln!("store/postgres skipped: HOPMESH_SKIP_POSTGRES=1");
        return;
    };
    let target = PgTarget {
        url: cluster.fresh_database(),
        ca: None,
    };
    PostgresStore::init(&target, &[9; 32]).expect("init");
    let mut pg = PostgresStore::open(&target, &[9; 32], "bench", false).expect("open");
    store_commits(c, "postgres", &mut pg);
}

criterion_group!(benches, issuance, stores);
criterion_main!(benches);
