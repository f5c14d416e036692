//! The simulated mesh's shape, as pure data: node names, segments of `peers + 1` nodes, one
//! service per node, `allow sK -> sK` (plus extra allow rules, for the policy-reload phase),
//! the policy file text, and the oracle of what every node's table must hold.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// The shape of a generated mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Simulated nodes (`n0` … `n{nodes-1}`).
    pub nodes: usize,
    /// Peers per node: segments hold `peers + 1` nodes (the last one may be smaller).
    pub peers: usize,
    /// Extra `allow` rules `(from segment, to segment)` besides every `sK -> sK`.
    pub extra_allows: Vec<(usize, usize)>,
    /// Measurements the policy admits (hex SHA-256), e.g. the simulator's and the real node
    /// binary's.
    pub measurements: Vec<String>,
    /// Backend of node `i`'s service: `backend_base` port + `i` on loopback (never dialled by
    /// the simulator; a real node in stage 2 would dial its own).
    pub backend_port_base: u16,
    /// Real backends of some nodes' services (stage 2: a real node's service).
    pub backends: BTreeMap<usize, SocketAddr>,
}

impl Shape {
    /// Segment size.
    pub fn segment_size(&self) -> usize {
        self.peers + 1
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.nodes.div_ceil(self.segment_size())
    }

    /// The segment of node `i`.
    pub fn segment_of(&self, i: usize) -> usize {
        i / self.segment_size()
    }

    /// The nodes of segment `k`.
    pub fn members(&self, k: usize) -> std::ops::Range<usize> {
        let s = self.segment_size();
        (k * s).min(self.nodes)..((k + 1) * s).min(self.nodes)
    }

    /// Node `i`'s name.
    pub fn name(i: usize) -> String {
        format!("n{i}")
    }

    /// Segments whose nodes share a table with segment `k`'s: `k` itself and every segment an
    /// allow rule links to `k` in either direction (`allow a -> b` gives a's nodes egress
    /// routes to b's services and b's nodes a's nodes as allowed peers).
    pub fn linked(&self, k: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::from([k]);
        for &(a, b) in &self.extra_allows {
            if a == k {
                out.insert(b);
            }
            if b == k {
                out.insert(a);
            }
        }
        out
    }

    /// The peers node `i` must hold in its table, given which nodes are `live` (enrolled, not
    /// revoked): every live node of a linked segment but itself.
    pub fn expected_peers(&self, i: usize, live: &dyn Fn(usize) -> bool) -> BTreeSet<usize> {
        self.linked(self.segment_of(i))
            .into_iter()
            .flat_map(|k| self.members(k))
            .filter(|&j| j != i && live(j))
            .collect()
    }

    /// The policy file.
    pub fn policy(&self) -> String {
        let quoted: Vec<String> = self
            .measurements
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect();
        let mut p = format!("[attestation]\nmeasurements = [{}]\n", quoted.join(", "));
        for k in 0..self.segments() {
            p.push_str(&format!("\n[[segment]]\nname = \"s{k}\"\n"));
        }
        for i in 0..self.nodes {
            let k = self.segment_of(i);
            p.push_str(&format!(
                "\n[[node]]\nname = \"n{i}\"\nsegments = [\"s{k}\"]\n\n[[service]]\nname = \"v{i}\"\nsegment = \"s{k}\"\nnode = \"n{i}\"\nbackend = \"{}\"\n",
                self.backend(i)
            ));
        }
        let mut allows: Vec<(usize, usize)> = (0..self.segments()).map(|k| (k, k)).collect();
        allows.extend(self.extra_allows.iter().copied());
        for (a, b) in allows {
            p.push_str(&format!("\n[[allow]]\nfrom = \"s{a}\"\nto = \"s{b}\"\n"));
        }
        p
    }

    /// The backend of node `i`'s service: its real one if given, else a loopback port the
    /// simulator never dials.
    pub fn backend(&self, i: usize) -> String {
        match self.backends.get(&i) {
            Some(a) => a.to_string(),
            None => format!(
                "127.0.0.1:{}",
                self.backend_port_base
                    .wrapping_add((i % 20_000) as u16)
                    .max(1)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopmesh_protocol::ids::{NodeId, NodeName};
    use hopmesh_protocol::policy::{NodeDirectory, Policy};

    fn shape(nodes: usize, peers: usize) -> Shape {
        Shape {
            nodes,
            peers,
            extra_allows: Vec::new(),
            measurements: vec!["ab".repeat(32)],
            backend_port_base: 30_000,
            backends: BTreeMap::new(),
        }
    }

    #[test]
    fn segments_of_peers_plus_one_and_a_short_last_one() {
        let s = shape(10, 3);
        assert_eq!(s.segments(), 3);
        assert_eq!(s.members(0), 0..4);
        assert_eq!(s.members(2), 8..10);
        assert_eq!(s.segment_of(9), 2);
        let all = |_| true;
        assert_eq!(s.expected_peers(0, &all), BTreeSet::from([1, 2, 3]));
        assert_eq!(s.expected_peers(9, &all), BTreeSet::from([8]));
        let not2 = |j| j != 2;
        assert_eq!(s.expected_peers(0, &not2), BTreeSet::from([1, 3]));
    }

    #[test]
    fn an_extra_allow_links_both_segments_both_ways() {
        let mut s = shape(8, 3);
        s.extra_allows.push((0, 1));
        let all = |_| true;
        assert_eq!(s.expected_peers(0, &all), (1..8).collect());
        assert_eq!(
            s.expected_peers(5, &all),
            (0..8).filter(|&j| j != 5).collect()
        );
    }

    #[test]
    fn the_policy_parses_and_compiles_to_the_expected_peers() {
        let mut s = shape(10, 3);
        s.extra_allows.push((0, 2));
        let text = s.policy();
        let p = Policy::parse(&text).expect("policy parses");
        assert_eq!(p.nodes.len(), 10);
        assert_eq!(p.services.len(), 10);
        assert_eq!(text.matches("[[allow]]").count(), 4);
        // The oracle agrees with the real compiler, node 3 not enrolled.
        let id = |i: usize| NodeId::from_spki(&[i as u8]);
        let live = |j: usize| j != 3;
        let dir: NodeDirectory = (0..10)
            .filter(|&j| live(j))
            .map(|j| (NodeName::new(&Shape::name(j)).expect("name"), id(j)))
            .collect();
        for i in (0..10).filter(|&j| live(j)) {
            let table = p
                .compile_for(&NodeName::new(&Shape::name(i)).expect("name"), &dir)
                .expect("compiles");
            let want: BTreeSet<NodeId> = s.expected_peers(i, &live).into_iter().map(id).collect();
            assert_eq!(table.peers, want, "n{i}");
        }
    }
}
