//! [`MeshTables`] against the reference [`Policy::compile_for`]: random small policies and
//! random sequences of enrolments, removals, renames, address changes and reloads (fixed
//! seeds), checking after every step that every node's entries equal the reference's, that
//! the deltas applied to what a node held give its new entries, and that the reported peers
//! added and removed are exactly the `Peer` keys that appeared and disappeared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::*;
use crate::enrollment::Address;
use crate::table_sync::entries_of;
use crate::wire::BoundedVec;

/// splitmix64: a fixed-seed generator, enough for test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Names the policies draw from; `n{NODES}` is never declared (a live node not in policy).
const NODES: usize = 7;
const SEGMENTS: usize = 3;

fn parse_blocks(blocks: &[String]) -> Result<Policy, String> {
    let t = format!(
        "[attestation]\nallow_any_measurement = true\n{}",
        blocks.concat()
    );
    Policy::parse(&t).map_err(|e| format!("{e}\n{t}"))
}

/// A small change of a policy: one block dropped, added (from another random policy) or
/// replaced, retried until the result parses (a reload that touches few nodes, where a
/// missed dependency of the incremental reload shows).
fn nudge(rng: &mut Rng, blocks: &[String]) -> Option<(Vec<String>, Policy)> {
    for _ in 0..32 {
        let mut next = blocks.to_vec();
        let donor = random_blocks(rng);
        let pick = |rng: &mut Rng, v: &[String]| v.get(rng.below(v.len())).cloned();
        match rng.below(3) {
            0 if !next.is_empty() => {
                next.remove(rng.below(next.len()));
            }
            1 => next.extend(pick(rng, &donor)),
            _ if !next.is_empty() => {
                let at = rng.below(next.len());
                if let Some(b) = pick(rng, &donor) {
                    next[at] = b;
                }
            }
            _ => continue,
        }
        if let Ok(p) = parse_blocks(&next) {
            return Some((next, p));
        }
    }
    None
}

/// The sections of a random valid policy text, one block each.
fn random_blocks(rng: &mut Rng) -> Vec<String> {
    let mut blocks = Vec::new();
    let segs = 1 + rng.below(SEGMENTS);
    for s in 0..segs {
        blocks.push(format!("[[segment]]\nname = \"s{s}\"\n"));
    }
    let mut members: Vec<(String, Vec<usize>)> = Vec::new();
    for n in 0..NODES {
        if !rng.chance(85) {
            continue;
        }
        let mut in_segs: Vec<usize> = (0..segs).filter(|_| rng.chance(45)).collect();
        in_segs.dedup();
        let list: Vec<String> = in_segs.iter().map(|s| format!("\"s{s}\"")).collect();
        blocks.push(format!(
            "[[node]]\nname = \"n{n}\"\nsegments = [{}]\n",
            list.join(", ")
        ));
        members.push((format!("n{n}"), in_segs));
    }
    let mut services = Vec::new();
    for v in 0..rng.below(7) {
        let seg = rng.below(segs);
        let candidates: Vec<&String> = members
            .iter()
            .filter(|(_, s)| s.contains(&seg))
            .map(|(n, _)| n)
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let node = candidates[rng.below(candidates.len())];
        blocks.push(format!(
            "[[service]]\nname = \"v{v}\"\nsegment = \"s{seg}\"\nnode = \"{node}\"\nbackend = \"127.0.0.1:{}\"\n",
            8000 + rng.below(3)
        ));
        services.push(format!("v{v}.s{seg}"));
    }
    for _ in 0..rng.below(6) {
        let from = rng.below(segs);
        let to = if !services.is_empty() && rng.chance(50) {
            services[rng.below(services.len())].clone()
        } else {
            format!("s{}", rng.below(segs))
        };
        blocks.push(format!("[[allow]]\nfrom = \"s{from}\"\nto = \"{to}\"\n"));
    }
    let mut routed = std::collections::BTreeSet::new();
    if members.len() >= 3 {
        for _ in 0..rng.below(5) {
            let pick = |rng: &mut Rng| members[rng.below(members.len())].0.clone();
            let (from, to, via) = (pick(rng), pick(rng), pick(rng));
            if from == to || via == from || via == to || !routed.insert((from.clone(), to.clone()))
            {
                continue;
            }
            blocks.push(format!(
                "[[route]]\nfrom = \"{from}\"\nto = \"{to}\"\nvia = \"{via}\"\n"
            ));
        }
    }
    blocks
}

fn node_id(b: u64) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&b.to_be_bytes());
    NodeId::from_bytes(bytes)
}

fn info(id: NodeId, name: &str, port: u64) -> PeerInfo {
    let address = Address::new(&format!("127.0.0.1:{port}")).expect("short");
    PeerInfo {
        node_id: id,
        name: NodeName::new(name).expect("valid"),
        addresses: BoundedVec::new(vec![address]).expect("one"),
    }
}

/// The reference: every live node's entries per `compile_for` (absent: no table).
fn reference(policy: &Policy, live: &BTreeMap<NodeId, PeerInfo>) -> BTreeMap<NodeId, Entries> {
    let directory: super::super::NodeDirectory =
        live.values().map(|i| (i.name.clone(), i.node_id)).collect();
    let mut out = BTreeMap::new();
    for i in live.values() {
        if let Some(table) = policy.compile_for(&i.name, &directory) {
            let infos: Vec<PeerInfo> = table.peers.iter().map(|p| live[p].clone()).collect();
            out.insert(i.node_id, entries_of(&table, &infos));
        }
    }
    out
}

/// Applies a delta to what a node holds, as a node would (a `Remove` must hit a key).
fn apply(held: &mut BTreeMap<NodeId, Entries>, d: &NodeDelta) {
    let entries = held.entry(d.node).or_default();
    let peers_before: Vec<NodeId> = peer_keys(entries);
    for c in &d.changes {
        match c {
            TableChange::Put(e) => {
                entries.insert(e.key(), e.clone());
            }
            TableChange::Remove(k) => {
                assert!(entries.remove(k).is_some(), "remove of a missing key {k:?}");
            }
        }
    }
    let peers_after = peer_keys(entries);
    let added: Vec<NodeId> = peers_after
        .iter()
        .filter(|p| !peers_before.contains(p))
        .copied()
        .collect();
    let removed: Vec<NodeId> = peers_before
        .iter()
        .filter(|p| !peers_after.contains(p))
        .copied()
        .collect();
    assert_eq!(d.added_peers, added, "added peers of {:?}", d.node);
    assert_eq!(d.removed_peers, removed, "removed peers of {:?}", d.node);
    if d.state == TableState::Dropped {
        assert!(entries.is_empty(), "a dropped table's delta empties it");
    }
    if entries.is_empty() {
        held.remove(&d.node);
    }
}

fn peer_keys(e: &Entries) -> Vec<NodeId> {
    e.keys()
        .filter_map(|k| match k {
            TableKey::Peer(p) => Some(*p),
            _ => None,
        })
        .collect()
}

/// Checks the whole state after a step.
fn check(
    mesh: &MeshTables,
    live: &BTreeMap<NodeId, PeerInfo>,
    held: &BTreeMap<NodeId, Entries>,
    step: &str,
) {
    let want = reference(mesh.policy(), live);
    for i in live.values() {
        let got = mesh.entries(&i.node_id);
        let got = got.as_ref();
        assert_eq!(
            mesh.has_table(&i.node_id),
            got.is_some(),
            "{step}: has_table"
        );
        assert_eq!(
            mesh.entry_count(&i.node_id),
            got.map_or(0, BTreeMap::len),
            "{step}: entry_count"
        );
        assert_eq!(
            got,
            want.get(&i.node_id),
            "{step}: entries of {} ({:?})",
            i.name,
            i.node_id
        );
        let empty = Entries::new();
        assert_eq!(
            held.get(&i.node_id).unwrap_or(&empty),
            got.unwrap_or(&empty),
            "{step}: the deltas applied give {}'s entries",
            i.name
        );
        let peers: Vec<NodeId> = mesh.peers(&i.node_id).copied().collect();
        assert_eq!(peers, peer_keys(got.unwrap_or(&empty)), "{step}: peers");
        for p in &peers {
            assert!(mesh.is_peer(p, &i.node_id), "{step}: peering is symmetric");
        }
    }
    assert_eq!(mesh.len(), live.len());
    for id in held.keys() {
        assert!(
            live.contains_key(id),
            "{step}: a removed node holds nothing"
        );
    }
}

fn run(seed: u64, steps: usize) -> usize {
    let mut rng = Rng(seed);
    let mut blocks = random_blocks(&mut rng);
    let first =
        parse_blocks(&blocks).unwrap_or_else(|e| panic!("generated policy must parse: {e}"));
    let mut mesh = MeshTables::new(first);
    let mut live: BTreeMap<NodeId, PeerInfo> = BTreeMap::new();
    let mut held: BTreeMap<NodeId, Entries> = BTreeMap::new();
    let mut next_id = 1u64;
    let mut entries_seen = 0;
    for step in 0..steps {
        let roll = rng.below(100);
        let name = format!("n{}", rng.below(NODES + 1));
        let holder = live.values().find(|i| i.name.as_str() == name).cloned();
        let label;
        let deltas = if roll < 45 {
            // Enrol a fresh key under a name (refused if live under another key).
            let i = info(node_id(next_id), &name, rng.below(3) as u64);
            next_id += 1;
            label = format!("step {step}: enrol {name}");
            match mesh.enrol(i.clone()) {
                Ok(d) => {
                    assert!(holder.is_none(), "{label}: a held name is refused");
                    live.insert(i.node_id, i);
                    d
                }
                Err(MeshError::NameHeld(n)) => {
                    assert!(holder.is_some(), "{label}: refused a free name {n}");
                    Vec::new()
                }
            }
        } else if roll < 70 {
            let Some(victim) = pick(&mut rng, &live) else {
                continue;
            };
            label = format!("step {step}: remove {}", victim.name);
            live.remove(&victim.node_id);
            mesh.remove(&victim.node_id)
        } else if roll < 85 {
            // An address change, or (rarely) a re-enrolment of the same key under a free name.
            let Some(mut i) = pick(&mut rng, &live) else {
                continue;
            };
            if rng.chance(25) && holder.is_none() {
                i.name = NodeName::new(&name).expect("valid");
                label = format!("step {step}: rename to {name}");
            } else {
                i = info(i.node_id, i.name.as_str(), 3 + rng.below(3) as u64);
                label = format!("step {step}: readdress {}", i.name);
            }
            let d = mesh.enrol(i.clone()).expect("own or free name");
            live.insert(i.node_id, i);
            d
        } else if roll < 92 {
            label = format!("step {step}: reload");
            blocks = random_blocks(&mut rng);
            let p = parse_blocks(&blocks).unwrap_or_else(|e| panic!("{label}: {e}"));
            mesh.reload(p)
        } else {
            let Some((next, p)) = nudge(&mut rng, &blocks) else {
                continue;
            };
            label = format!("step {step}: small reload");
            blocks = next;
            mesh.reload(p)
        };
        let mut last = None;
        for d in &deltas {
            assert!(last < Some(d.node), "{label}: one delta per node, in order");
            last = Some(d.node);
            assert!(!d.changes.is_empty() || d.state != TableState::Kept);
            apply(&mut held, d);
        }
        check(&mesh, &live, &held, &label);
        entries_seen += live.keys().map(|id| mesh.entry_count(id)).sum::<usize>();
    }
    entries_seen
}

fn pick(rng: &mut Rng, live: &BTreeMap<NodeId, PeerInfo>) -> Option<PeerInfo> {
    let n = live.len();
    (n > 0).then(|| live.values().nth(rng.below(n)).cloned())?
}

#[test]
fn incremental_tables_equal_the_reference_compile() {
    let mut entries = 0;
    for seed in 0..400 {
        entries += run(seed, 60);
    }
    // The random cases are not trivially empty.
    assert!(entries > 50_000, "only {entries} entries checked");
}

#[test]
fn a_reload_reports_the_pairs_it_adds_and_removes() {
    let policy = |allow: &str| {
        Policy::parse(&format!(
            r#"
[attestation]
allow_any_measurement = true
[[segment]]
name = "s"
[[node]]
name = "a"
segments = ["s"]
[[node]]
name = "b"
segments = ["s"]
[[node]]
name = "c"
segments = ["s"]
[[service]]
name = "api"
segment = "s"
node = "a"
backend = "127.0.0.1:80"
[[service]]
name = "db"
segment = "s"
node = "b"
backend = "127.0.0.1:81"
{allow}
"#
        ))
        .expect("valid")
    };
    let mut mesh = MeshTables::new(policy("[[allow]]\nfrom = \"s\"\nto = \"api.s\""));
    for (n, name) in [(1, "a"), (2, "b"), (3, "c")] {
        mesh.enrol(info(node_id(n), name, 1)).expect("free");
    }
    let (a, b, c) = (node_id(1), node_id(2), node_id(3));
    // api.s: {a,b}, {a,c}. After: db.s only: {a,b}, {b,c}.
    let deltas = mesh.reload(policy("[[allow]]\nfrom = \"s\"\nto = \"db.s\""));
    let diff = PolicyDiff::of(&deltas);
    assert_eq!(diff.pairs_added, [(b, c)].into());
    assert_eq!(diff.pairs_removed, [(a, c)].into());
    // {a,b} stays a pair: neither end's Peer entry changes.
    let a_delta = deltas.iter().find(|d| d.node == a).expect("a changed");
    assert!(a_delta.added_peers.is_empty());
    assert_eq!(a_delta.removed_peers, vec![c]);
    // The same policy again changes nothing.
    assert!(
        mesh.reload(policy("[[allow]]\nfrom = \"s\"\nto = \"db.s\""))
            .is_empty()
    );
}

/// An all-to-all segment: one more enrolment touches each other node with a handful of
/// changes, not its whole table.
#[test]
fn an_enrolment_changes_only_the_new_relationships() {
    let n = 200;
    let mut t = String::from(
        "[attestation]\nallow_any_measurement = true\n[[segment]]\nname = \"s\"\n[[allow]]\nfrom = \"s\"\nto = \"s\"\n",
    );
    for i in 0..=n {
        let _ = writeln!(
            t,
            "[[node]]\nname = \"n{i}\"\nsegments = [\"s\"]\n[[service]]\nname = \"v{i}\"\nsegment = \"s\"\nnode = \"n{i}\"\nbackend = \"127.0.0.1:80\""
        );
    }
    let mut mesh = MeshTables::new(Policy::parse(&t).expect("valid"));
    for i in 0..n {
        mesh.enrol(info(node_id(i as u64 + 1), &format!("n{i}"), 1))
            .expect("free");
    }
    let deltas = mesh
        .enrol(info(node_id(n as u64 + 1), &format!("n{n}"), 1))
        .expect("free");
    assert_eq!(deltas.len(), n + 1);
    for d in &deltas {
        if d.node == node_id(n as u64 + 1) {
            // Its service, n routes, n allowed, n peers.
            assert_eq!(d.changes.len(), 1 + 3 * n);
            assert_eq!(d.state, TableState::Created);
        } else {
            // A route to the new service, the new node allowed for its own, the new peer.
            assert_eq!(d.changes.len(), 3);
            assert_eq!(d.added_peers, vec![node_id(n as u64 + 1)]);
        }
    }
    // Revoking it undoes exactly that.
    let deltas = mesh.remove(&node_id(n as u64 + 1));
    assert_eq!(deltas.len(), n + 1);
    assert!(
        deltas
            .iter()
            .all(|d| d.node == node_id(n as u64 + 1) || d.changes.len() == 3)
    );
}
