//! Routing tables on the push stream over real QUIC (`hopmesh_protocol::table_sync`): a table
//! larger than one push frame reaches a real node whole, and a node that lost a part or
//! missed an update resubscribes and ends with the verifier's table.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::time::Duration;

use hopmesh_node::state::NodeState;
use hopmesh_protocol::attestation::KeySet;
use hopmesh_protocol::enrollment::{Address, PUSH_CAP, PeerInfo, Push};
use hopmesh_protocol::ids::{NodeId, NodeName};
use hopmesh_protocol::routing::RoutingTable;
use hopmesh_protocol::table_sync::{TableSyncError, TableUpdate, entries_of, split};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_tests::mesh::Mesh;
use hopmesh_tests::{GOOD_MEASUREMENT, TestNode, VerifierHarness, standard_policy};
use hopmesh_transport::identity::Identity;
use hopmesh_transport::verifier_client::PushStream;
use hopmesh_verifier::authority::{Enrollment, Settings};

/// Peers of the big segment besides the node under test: with 63-character names and four
/// long addresses each, about 1 KB per peer, so the table is well over one 64 KiB frame.
const BULK: usize = 100;

/// Bound on waiting for the pushes of one update.
const WAIT: Duration = Duration::from_secs(20);

fn label(prefix: &str, i: usize) -> String {
    let head = format!("{prefix}{i:03}-");
    format!("{head}{}", "x".repeat(63 - head.len()))
}

fn node_name(i: usize) -> String {
    label("big", i)
}

/// The segment `big`: node `i` serves `svc<i>`, every node may use every service.
fn big_segment(nodes: usize) -> String {
    let mut p =
        String::from("\n[[segment]]\nname = \"big\"\n[[allow]]\nfrom = \"big\"\nto = \"big\"\n");
    for i in 0..nodes {
        p += &format!(
            "[[node]]\nname = \"{}\"\nsegments = [\"big\"]\n[[service]]\nname = \"{}\"\nsegment = \"big\"\nnode = \"{}\"\nbackend = \"127.0.0.1:9\"\n",
            node_name(i),
            label("svc", i),
            node_name(i)
        );
    }
    p
}

/// Four advertised addresses of about 190 bytes each (valid `host:port`).
fn long_addresses(i: usize) -> Vec<Address> {
    (0..4)
        .map(|a| {
            let l = |k: usize| label(&format!("h{a}{k}"), i)[..60].to_owned();
            Address::truncated(&format!("{}.{}.{}.test:{}", l(0), l(1), l(2), 4000 + a))
        })
        .collect()
}

/// Enrolls nodes `from..to` of the big segment in process (fresh keys, long addresses): the
/// setup, not what is tested, so it skips a QUIC handshake per node.
fn enroll_bulk(h: &VerifierHarness, from: usize, to: usize) {
    for i in from..to {
        let secret = h.join_token(&node_name(i), 600);
        let spki = Identity::generate().expect("identity").spki();
        let addresses = long_addresses(i);
        let now = h.now();
        h.shared()
            .authority()
            .enroll(
                &Enrollment {
                    spki: &spki,
                    join_secret: &secret,
                    measurement: GOOD_MEASUREMENT,
                    addresses: &addresses,
                    hostname: "bulk",
                },
                now,
            )
            .expect("enroll");
    }
}

/// The verifier's compiled table of `id` (owned, whether `table` lends or copies it).
fn verifier_table(h: &VerifierHarness, id: &NodeId) -> Option<RoutingTable> {
    let a = h.shared().authority();
    a.table(id)
        .map(|t| Borrow::<RoutingTable>::borrow(&t).clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_larger_than_one_frame_reaches_a_real_node_whole() {
    let mut mesh = Mesh::start_with(Settings::default(), &big_segment(BULK + 1), &[]).await;
    enroll_bulk(&mesh.verifier, 1, BULK + 1);
    let me = node_name(0);
    mesh.add_node(&me).await;
    mesh.wait_ready(&me).await;
    let id: NodeId = mesh.node(&me).show()["node_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("hex");
    let want: BTreeSet<NodeId> = mesh
        .verifier
        .shared()
        .authority()
        .table(&id)
        .expect("compiled")
        .peers
        .clone();
    assert_eq!(want.len(), BULK);
    // Wait (bounded) for the node's table to name every peer.
    let mut show = mesh.node(&me).show();
    for _ in 0..400 {
        if show["peers"].as_array().is_some_and(|p| p.len() == BULK) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        show = mesh.node(&me).show();
    }
    let peers = show["peers"].as_array().expect("peers");
    let got: BTreeSet<NodeId> = peers
        .iter()
        .map(|p| p["node_id"].as_str().expect("id").parse().expect("hex"))
        .collect();
    assert_eq!(got, want, "every peer, none cut");
    // Every peer's long addresses arrived whole.
    let bytes: usize = peers
        .iter()
        .flat_map(|p| p["addresses"].as_array().expect("addresses").iter())
        .map(|a| a.as_str().expect("text").len())
        .sum();
    assert!(bytes > PUSH_CAP, "{bytes} bytes of addresses alone");
    assert!(
        peers
            .iter()
            .all(|p| p["addresses"].as_array().map(Vec::len) == Some(4))
    );
    // What the node holds is more than one push frame: a snapshot of it is several parts.
    let infos: Vec<PeerInfo> = peers
        .iter()
        .map(|p| PeerInfo {
            node_id: p["node_id"].as_str().expect("id").parse().expect("hex"),
            name: NodeName::new(p["name"].as_str().expect("name")).expect("label"),
            addresses: BoundedVec::new(
                p["addresses"]
                    .as_array()
                    .expect("addresses")
                    .iter()
                    .map(|a| Address::truncated(a.as_str().expect("text")))
                    .collect(),
            )
            .expect("at most 4"),
        })
        .collect();
    let table = verifier_table(&mesh.verifier, &id).expect("compiled");
    let entries = entries_of(&table, &infos);
    let parts = split(&TableUpdate::snapshot(0, &entries).expect("fits")).expect("split");
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert_eq!(show["counters"]["table_resyncs"], 0);
    mesh.shutdown().await;
}

/// The node side as the real node runs it: pushes into [`NodeState::apply`]; a table error
/// (`Effects::resync`) means: drop the stream, subscribe again on the same connection.
struct Follower {
    node: TestNode,
    state: NodeState,
    stream: PushStream,
    resyncs: Vec<&'static str>,
}

impl Follower {
    async fn start(h: &VerifierHarness, name: &str) -> Self {
        let node = h.node().await;
        node.enroll(h.join_token(name, 600), GOOD_MEASUREMENT, h.now())
            .await
            .expect("enroll");
        let stream = node.subscribe().await.expect("subscribe");
        let state = NodeState::new(node.identity.node_id(), KeySet::default());
        Self {
            node,
            state,
            stream,
            resyncs: Vec::new(),
        }
    }

    async fn next(&mut self) -> Push {
        tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("a push in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// Applies `push`; resubscribes on a table error.
    async fn apply(&mut self, push: Push) -> Option<TableSyncError> {
        let fx = self.state.apply(push, UnixTime::from_secs(0));
        let why = fx.resync?;
        self.resyncs.push(why.reason());
        self.stream = self.node.subscribe().await.expect("resubscribe");
        self.state.table_stream_restarted();
        Some(why)
    }

    /// Reads and drops the parts of one whole table update (skipping other pushes).
    async fn skip_update(&mut self) -> u32 {
        loop {
            if let Push::TablePart(p) = self.next().await
                && p.part + 1 == p.parts
            {
                return p.parts;
            }
        }
    }

    /// Applies pushes until the held table is the verifier's current one for this node.
    async fn until_synced(&mut self, h: &VerifierHarness) {
        let id = self.node.identity.node_id();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let want = verifier_table(h, &id);
            if want.is_some() && self.state.table == want && !self.state.assembler.is_assembling() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "not synced in time");
            let p = self.next().await;
            self.apply(p).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_a_part_or_missed_an_update_resyncs_to_the_verifiers_table() {
    let policy = standard_policy() + &big_segment(BULK + 3);
    let h = VerifierHarness::start(&policy, Settings::default()).await;
    enroll_bulk(&h, 1, BULK + 1);
    let mut f = Follower::start(&h, &node_name(0)).await;

    // The snapshot comes in several parts; part 1 is lost on the way.
    let mut seen = Vec::new();
    let first_error = loop {
        let p = f.next().await;
        if let Push::TablePart(t) = &p {
            assert!(t.parts >= 3, "a table over one frame: {} parts", t.parts);
            seen.push(t.part);
            if t.part == 1 {
                continue;
            }
        }
        if let Some(e) = f.apply(p).await {
            break e;
        }
    };
    assert_eq!(seen, [0, 1, 2]);
    assert_eq!(
        first_error,
        TableSyncError::Gap {
            expected: 1,
            got: 2
        }
    );
    assert_eq!(f.state.table, None, "nothing of the broken update applied");
    // The resubscribe brings a fresh snapshot, which applies whole.
    f.until_synced(&h).await;
    assert_eq!(f.resyncs, ["part_gap"]);
    assert_eq!(f.state.peers.len(), BULK);

    // A peer joins; the node misses that whole update.
    enroll_bulk(&h, BULK + 1, BULK + 2);
    assert!(f.skip_update().await >= 1);
    // Another joins: a delta on the missed version does not apply (a resync), a snapshot
    // does; either way the node ends with the verifier's table and both new peers.
    enroll_bulk(&h, BULK + 2, BULK + 3);
    f.until_synced(&h).await;
    assert_eq!(f.state.peers.len(), BULK + 2);
    let synced = f.state.synced.as_ref().expect("held");
    assert_eq!(
        synced.digest(),
        hopmesh_protocol::table_sync::digest(synced.entries())
    );
    assert!(f.resyncs.len() <= 2, "{:?}", f.resyncs);
    if let [_, second] = f.resyncs.as_slice() {
        assert_eq!(*second, "wrong_base");
    }
    f.node.client.close();
}
