//! Connection budgets: what an unauthenticated party can make the verifier hold, decided by
//! pure methods of [`BudgetState`] (no clock, no IO), each returning a permit or a
//! [`ConnRefusal`]. The service ([`super`]) holds one `BudgetState` under its gate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hopmesh_protocol::ids::NodeId;

/// Default of [`ConnectionBudgets::max_handshakes`].
pub const MAX_HANDSHAKES: usize = 256;
/// Default of [`ConnectionBudgets::max_handshakes_per_source`].
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// Default of [`ConnectionBudgets::retry_above`].
pub const RETRY_ABOVE: usize = 32;
/// Default of [`ConnectionBudgets::handshake_deadline`].
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Default of [`ConnectionBudgets::max_unauthenticated`].
pub const MAX_UNAUTHENTICATED: usize = 128;
/// Default of [`ConnectionBudgets::max_unauthenticated_per_source`].
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// Default of [`ConnectionBudgets::unauthenticated_deadline`].
pub const UNAUTHENTICATED_DEADLINE: Duration = Duration::from_secs(10);
/// Default of [`ConnectionBudgets::max_enrolled`]: the 10 000-node target mesh with room for
/// a reconnect wave (a node's new connection counts before its old one is closed) and growth.
/// Set with `hopmesh-verifier serve --max-node-connections`.
pub const MAX_ENROLLED: usize = 16_384;
/// Default of [`ConnectionBudgets::max_connections_per_node`].
pub const MAX_CONNECTIONS_PER_NODE: usize = 4;

/// Connection budgets (defaults: the constants of this module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionBudgets {
    /// Handshakes in flight at once ([`MAX_HANDSHAKES`] = 256); past it attempts are refused
    /// (`handshakes_full`).
    pub max_handshakes: usize,
    /// Handshakes in flight from one source IP ([`MAX_HANDSHAKES_PER_SOURCE`] = 32;
    /// `source_handshakes_full`).
    pub max_handshakes_per_source: usize,
    /// Handshakes in flight above which an attempt from an unvalidated address gets a QUIC
    /// Retry ([`RETRY_ABOVE`] = 32; counted in `retries`).
    pub retry_above: usize,
    /// A handshake not done within this is dropped ([`HANDSHAKE_DEADLINE`] = 5 s;
    /// `handshake_timeout`).
    pub handshake_deadline: Duration,
    /// Connections of keys that are not enrolled ([`MAX_UNAUTHENTICATED`] = 128;
    /// `unauthenticated_full`).
    pub max_unauthenticated: usize,
    /// Such connections per source IP ([`MAX_UNAUTHENTICATED_PER_SOURCE`] = 16;
    /// `source_unauthenticated_full`).
    pub max_unauthenticated_per_source: usize,
    /// Such a connection is closed this long after its handshake unless its key enrolled
    /// meanwhile ([`UNAUTHENTICATED_DEADLINE`] = 10 s; `unauthenticated_deadline`).
    pub unauthenticated_deadline: Duration,
    /// Connections of enrolled nodes ([`MAX_ENROLLED`] = 16 384; `enrolled_full`).
    pub max_enrolled: usize,
    /// Connections of one enrolled node; a newer one closes its oldest
    /// ([`MAX_CONNECTIONS_PER_NODE`] = 4; counted as `node_oldest_closed`).
    pub max_connections_per_node: usize,
}

impl Default for ConnectionBudgets {
    fn default() -> Self {
        Self {
            max_handshakes: MAX_HANDSHAKES,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            retry_above: RETRY_ABOVE,
            handshake_deadline: HANDSHAKE_DEADLINE,
            max_unauthenticated: MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: MAX_UNAUTHENTICATED_PER_SOURCE,
            unauthenticated_deadline: UNAUTHENTICATED_DEADLINE,
            max_enrolled: MAX_ENROLLED,
            max_connections_per_node: MAX_CONNECTIONS_PER_NODE,
        }
    }
}

/// Why a connection attempt or a connection was refused or closed by the budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Too many handshakes in flight.
    HandshakesFull,
    /// Too many handshakes in flight from this source IP.
    SourceHandshakesFull,
    /// The handshake did not finish within the deadline.
    HandshakeTimeout,
    /// The client presented no certificate.
    NoCertificate,
    /// The unauthenticated pool is full.
    UnauthenticatedFull,
    /// This source IP holds its share of the unauthenticated pool.
    SourceUnauthenticatedFull,
    /// A key that is not enrolled held its connection past the deadline.
    UnauthenticatedDeadline,
    /// The enrolled pool is full.
    EnrolledFull,
}

impl ConnRefusal {
    /// The stable metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::HandshakesFull => "handshakes_full",
            Self::SourceHandshakesFull => "source_handshakes_full",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NoCertificate => "no_certificate",
            Self::UnauthenticatedFull => "unauthenticated_full",
            Self::SourceUnauthenticatedFull => "source_unauthenticated_full",
            Self::UnauthenticatedDeadline => "unauthenticated_deadline",
            Self::EnrolledFull => "enrolled_full",
        }
    }
}

/// What to do with a connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeAdmit {
    /// Run the handshake (it holds a handshake slot until done).
    Accept,
    /// Answer with a QUIC Retry: no state is kept until the client proves its address.
    Retry,
}

/// Who a connection belongs to, once its handshake proved the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerClass {
    /// An enrolled node with a compiled table.
    Enrolled(NodeId),
    /// Any other key.
    Unauthenticated,
}

/// A connection admitted by [`BudgetState::admit_connection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    /// The source IP it counts against.
    pub source: IpAddr,
    /// Its pool.
    pub class: PeerClass,
    /// The node is at its per-node cap: close its oldest connection.
    pub evict_oldest: bool,
}

/// What the budgets hold now (in memory only; a restart starts empty). Every decision is a
/// pure method; the service calls [`take`](Self::take) / [`release`](Self::release) around
/// each connection's life.
#[derive(Debug, Default)]
pub struct BudgetState {
    handshakes: usize,
    handshakes_by_source: HashMap<IpAddr, usize>,
    unauthenticated: usize,
    unauthenticated_by_source: HashMap<IpAddr, usize>,
    enrolled: usize,
    by_node: HashMap<NodeId, usize>,
}

fn inc<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K) {
    *map.entry(k).or_default() += 1;
}

fn dec<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(k);
        }
    }
}

impl BudgetState {
    /// Handshakes in flight.
    pub fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// Open connections of keys that are not enrolled.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated
    }

    /// Open connections of enrolled nodes.
    pub fn enrolled(&self) -> usize {
        self.enrolled
    }

    /// Decides a connection attempt from `source`; `validated` when QUIC already validated
    /// its address (a Retry round trip). Under load an unvalidated attempt gets a Retry, which
    /// costs no state, before any cap is looked at.
    pub fn admit_handshake(
        &self,
        b: &ConnectionBudgets,
        source: IpAddr,
        validated: bool,
    ) -> Result<HandshakeAdmit, ConnRefusal> {
        if !validated && self.handshakes >= b.retry_above {
            return Ok(HandshakeAdmit::Retry);
        }
        if self.handshakes >= b.max_handshakes {
            return Err(ConnRefusal::HandshakesFull);
        }
        if self.handshakes_by_source.get(&source).copied().unwrap_or(0)
            >= b.max_handshakes_per_source
        {
            return Err(ConnRefusal::SourceHandshakesFull);
        }
        Ok(HandshakeAdmit::Accept)
    }

    /// A handshake from `source` started.
    pub fn begin_handshake(&mut self, source: IpAddr) {
        self.handshakes += 1;
        inc(&mut self.handshakes_by_source, source);
    }

    /// A handshake from `source` ended (either way).
    pub fn end_handshake(&mut self, source: IpAddr) {
        self.handshakes = self.handshakes.saturating_sub(1);
        dec(&mut self.handshakes_by_source, &source);
    }

    /// Decides a connection whose handshake proved a key of `class`, from `source`. Enrolled
    /// nodes and other keys have separate pools, so unauthenticated connections can never
    /// keep a node out; a node at its own cap gets in by closing its oldest connection.
    pub fn admit_connection(
        &self,
        b: &ConnectionBudgets,
        source: IpAddr,
        class: PeerClass,
    ) -> Result<Permit, ConnRefusal> {
        match class {
            PeerClass::Enrolled(node) => {
                let own = self.by_node.get(&node).copied().unwrap_or(0);
                let evict_oldest = own >= b.max_connections_per_node;
                if !evict_oldest && self.enrolled >= b.max_enrolled {
                    return Err(ConnRefusal::EnrolledFull);
                }
                Ok(Permit {
                    source,
                    class,
                    evict_oldest,
                })
            }
            PeerClass::Unauthenticated => {
                if self.unauthenticated >= b.max_unauthenticated {
                    return Err(ConnRefusal::UnauthenticatedFull);
                }
                if self
                    .unauthenticated_by_source
                    .get(&source)
                    .copied()
                    .unwrap_or(0)
                    >= b.max_unauthenticated_per_source
                {
                    return Err(ConnRefusal::SourceUnauthenticatedFull);
                }
                Ok(Permit {
                    source,
                    class,
                    evict_oldest: false,
                })
            }
        }
    }

    /// Counts an admitted connection.
    pub fn take(&mut self, p: &Permit) {
        match p.class {
            PeerClass::Enrolled(node) => {
                self.enrolled += 1;
                inc(&mut self.by_node, node);
            }
            PeerClass::Unauthenticated => {
                self.unauthenticated += 1;
                inc(&mut self.unauthenticated_by_source, p.source);
            }
        }
    }

    /// Releases what [`take`](Self::take) counted.
    pub fn release(&mut self, p: &Permit) {
        match p.class {
            PeerClass::Enrolled(node) => {
                self.enrolled = self.enrolled.saturating_sub(1);
                dec(&mut self.by_node, &node);
            }
            PeerClass::Unauthenticated => {
                self.unauthenticated = self.unauthenticated.saturating_sub(1);
                dec(&mut self.unauthenticated_by_source, &p.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use hopmesh_protocol::ids::NodeId;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    fn small() -> ConnectionBudgets {
        ConnectionBudgets {
            max_handshakes: 4,
            max_handshakes_per_source: 2,
            retry_above: 3,
            max_unauthenticated: 3,
            max_unauthenticated_per_source: 2,
            max_enrolled: 2,
            max_connections_per_node: 2,
            ..ConnectionBudgets::default()
        }
    }

    #[test]
    fn defaults_are_the_documented_constants() {
        let b = ConnectionBudgets::default();
        assert_eq!(b.max_handshakes, 256);
        assert_eq!(b.max_handshakes_per_source, 32);
        assert_eq!(b.retry_above, 32);
        assert_eq!(b.handshake_deadline, Duration::from_secs(5));
        assert_eq!(b.max_unauthenticated, 128);
        assert_eq!(b.max_unauthenticated_per_source, 16);
        assert_eq!(b.unauthenticated_deadline, Duration::from_secs(10));
        assert_eq!(b.max_enrolled, 16_384);
        assert_eq!(b.max_connections_per_node, 4);
    }

    #[test]
    fn handshakes_are_capped_per_source_and_in_total_and_retried_under_load() {
        let b = small();
        let mut s = BudgetState::default();
        assert_eq!(
            s.admit_handshake(&b, ip(1), false),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(1));
        s.begin_handshake(ip(1));
        // Per source: the third from ip 1 is refused, another source is not.
        assert_eq!(
            s.admit_handshake(&b, ip(1), true),
            Err(ConnRefusal::SourceHandshakesFull)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(2), false),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(2));
        // At retry_above (3) in flight: unvalidated attempts get a Retry, validated ones go on.
        assert_eq!(
            s.admit_handshake(&b, ip(3), false),
            Ok(HandshakeAdmit::Retry)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(3), true),
            Ok(HandshakeAdmit::Accept)
        );
        s.begin_handshake(ip(3));
        // At max_handshakes (4): validated attempts are refused; unvalidated still retried
        // (a Retry costs no state).
        assert_eq!(
            s.admit_handshake(&b, ip(4), true),
            Err(ConnRefusal::HandshakesFull)
        );
        assert_eq!(
            s.admit_handshake(&b, ip(4), false),
            Ok(HandshakeAdmit::Retry)
        );
        // Ending handshakes frees the slots; no source entry is left behind.
        for src in [ip(1), ip(1), ip(2), ip(3)] {
            s.end_handshake(src);
        }
        assert_eq!(s.handshakes(), 0);
        assert!(s.handshakes_by_source.is_empty());
        s.end_handshake(ip(9));
        assert_eq!(s.handshakes(), 0, "never below zero");
    }

    #[test]
    fn unauthenticated_keys_have_their_own_pool_and_per_source_share() {
        let b = small();
        let mut s = BudgetState::default();
        let u = PeerClass::Unauthenticated;
        for src in [ip(1), ip(1), ip(2)] {
            let p = s.admit_connection(&b, src, u).expect("room");
            s.take(&p);
        }
        assert_eq!(
            s.admit_connection(&b, ip(3), u),
            Err(ConnRefusal::UnauthenticatedFull)
        );
        let p = Permit {
            source: ip(2),
            class: u,
            evict_oldest: false,
        };
        s.release(&p);
        assert_eq!(
            s.admit_connection(&b, ip(1), u),
            Err(ConnRefusal::SourceUnauthenticatedFull),
            "ip 1 already holds its 2"
        );
        assert!(s.admit_connection(&b, ip(3), u).is_ok());
        // The full unauthenticated pool never keeps an enrolled node out.
        let p = s.admit_connection(&b, ip(3), u).expect("room");
        s.take(&p);
        assert_eq!(
            s.admit_connection(&b, ip(4), u),
            Err(ConnRefusal::UnauthenticatedFull)
        );
        let node = PeerClass::Enrolled(NodeId::from_bytes([1; 32]));
        assert_eq!(
            s.admit_connection(&b, ip(1), node),
            Ok(Permit {
                source: ip(1),
                class: node,
                evict_oldest: false
            })
        );
    }

    #[test]
    fn a_node_at_its_cap_closes_its_oldest_and_the_enrolled_pool_is_capped() {
        let b = small();
        let mut s = BudgetState::default();
        let a = PeerClass::Enrolled(NodeId::from_bytes([1; 32]));
        let c = PeerClass::Enrolled(NodeId::from_bytes([2; 32]));
        let p = s.admit_connection(&b, ip(1), a).expect("room");
        assert!(!p.evict_oldest);
        s.take(&p);
        s.take(&p);
        assert_eq!(s.enrolled(), 2);
        // The pool (2) is full: another node is refused ...
        assert_eq!(
            s.admit_connection(&b, ip(2), c),
            Err(ConnRefusal::EnrolledFull)
        );
        // ... but the node at its own cap gets in by closing its oldest.
        let again = s.admit_connection(&b, ip(1), a).expect("node gets in");
        assert!(again.evict_oldest);
        s.take(&again);
        s.release(&p);
        s.release(&p);
        s.release(&again);
        assert_eq!(s.enrolled(), 0);
        assert!(s.by_node.is_empty());
        assert!(s.admit_connection(&b, ip(2), c).is_ok());
    }

    #[test]
    fn refusal_reasons_are_stable() {
        let all = [
            (ConnRefusal::HandshakesFull, "handshakes_full"),
            (ConnRefusal::SourceHandshakesFull, "source_handshakes_full"),
            (ConnRefusal::HandshakeTimeout, "handshake_timeout"),
            (ConnRefusal::NoCertificate, "no_certificate"),
            (ConnRefusal::UnauthenticatedFull, "unauthenticated_full"),
            (
                ConnRefusal::SourceUnauthenticatedFull,
                "source_unauthenticated_full",
            ),
            (
                ConnRefusal::UnauthenticatedDeadline,
                "unauthenticated_deadline",
            ),
            (ConnRefusal::EnrolledFull, "enrolled_full"),
        ];
        for (r, s) in all {
            assert_eq!(r.reason(), s);
        }
    }
}
