//! Per-node routing tables and the two segmentation decisions (docs/design.md,
//! "Segments, services, routing, relays").
//!
//! The verifier compiles policy into one [`RoutingTable`] per node ([`crate::policy`]); the
//! node enforces it on both ends of every stream: [`EgressTable::may_route`] before any
//! network action on the SOCKS side, [`IngressTable::may_serve`] before any byte reaches a
//! backend. Both return a permit or a refusal, never a bool.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, SegmentName, ServiceId, ServiceName};

/// The default mesh-name suffix: names look like `api.payments.mesh`.
pub const DEFAULT_MESH_SUFFIX: &str = "mesh";

/// A parsed mesh name `<service>.<segment>.<suffix>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MeshName {
    /// The service label.
    pub service: ServiceName,
    /// The segment label.
    pub segment: SegmentName,
}

impl MeshName {
    /// The service id this name denotes.
    pub fn service_id(&self) -> ServiceId {
        ServiceId::derive(&self.segment, &self.service)
    }

    /// Parses `host` as a mesh name under `suffix` (case-insensitive, one optional trailing
    /// dot as in DNS).
    pub fn parse(host: &str, suffix: &str) -> Result<Self, RouteRefusal> {
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            return Err(RouteRefusal::IpLiteral);
        }
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let Some(rest) = host
            .strip_suffix(&suffix.to_ascii_lowercase())
            .and_then(|r| r.strip_suffix('.'))
        else {
            return Err(RouteRefusal::NotMeshName);
        };
        let mut labels = rest.split('.');
        let (Some(service), Some(segment), None) = (labels.next(), labels.next(), labels.next())
        else {
            return Err(RouteRefusal::MalformedMeshName);
        };
        Ok(Self {
            service: ServiceName::new(service).map_err(|_| RouteRefusal::MalformedMeshName)?,
            segment: SegmentName::new(segment).map_err(|_| RouteRefusal::MalformedMeshName)?,
        })
    }

    /// The name with `suffix`, as apps type it.
    pub fn with_suffix(&self, suffix: &str) -> String {
        format!("{}.{}.{}", self.service, self.segment, suffix)
    }
}

impl fmt::Display for MeshName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.service, self.segment)
    }
}

/// Where a node sends streams for one mesh name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRoute {
    /// The name.
    pub name: MeshName,
    /// Its service id.
    pub service: ServiceId,
    /// The node serving it.
    pub serving_node: NodeId,
    /// The relay to go through when the serving node is not directly reachable.
    pub via: Option<NodeId>,
}

/// The names this node's apps may reach; anything absent is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressTable {
    routes: BTreeMap<MeshName, EgressRoute>,
}

/// Permission to open a stream for a mesh name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePermit {
    /// The route to use.
    pub route: EgressRoute,
}

/// Why a SOCKS target was refused before any network action. All map to SOCKS REP 0x02.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    /// An IP literal: the mesh routes names only.
    #[error("IP literals are not routed")]
    IpLiteral,
    /// A name outside the mesh suffix (a public name, `localhost`, a metadata host...).
    #[error("not a mesh name")]
    NotMeshName,
    /// Under the suffix but not `<service>.<segment>`.
    #[error("malformed mesh name")]
    MalformedMeshName,
    /// No such route for this node: unknown service, or policy does not allow it. The node is
    /// not told which.
    #[error("no route to that service from this node")]
    NoRoute,
}

impl RouteRefusal {
    /// A stable snake_case name for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IpLiteral => "ip_literal",
            Self::NotMeshName => "not_mesh_name",
            Self::MalformedMeshName => "malformed_mesh_name",
            Self::NoRoute => "no_route",
        }
    }
}

impl EgressTable {
    /// Builds a table from routes (later duplicates replace earlier ones).
    pub fn from_routes(routes: impl IntoIterator<Item = EgressRoute>) -> Self {
        Self {
            routes: routes.into_iter().map(|r| (r.name.clone(), r)).collect(),
        }
    }

    /// Decides whether an app on this node may reach `host`. Call before any DNS lookup or
    /// connection attempt.
    pub fn may_route(&self, host: &str, suffix: &str) -> Result<RoutePermit, RouteRefusal> {
        let name = MeshName::parse(host, suffix)?;
        let route = self.routes.get(&name).ok_or(RouteRefusal::NoRoute)?;
        Ok(RoutePermit {
            route: route.clone(),
        })
    }

    /// All routes, ordered by name.
    pub fn routes(&self) -> impl Iterator<Item = &EgressRoute> {
        self.routes.values()
    }
}

/// A backend address as configured in policy: `host:port`, the host a name or an IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Host name or IP literal; names are resolved by the serving node.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One service this node serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressEntry {
    /// Service id.
    pub service: ServiceId,
    /// Its name.
    pub name: MeshName,
    /// Where streams for it go; never chosen by the remote side.
    pub backend: Backend,
    /// Nodes allowed to open streams for it directly.
    pub allowed_peers: BTreeSet<NodeId>,
    /// `(relay, origin)`: origins allowed to use it through that relay.
    pub relayed: BTreeSet<(NodeId, NodeId)>,
}

/// The services this node serves, who may use them, and the streams it forwards as a relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressTable {
    services: BTreeMap<ServiceId, IngressEntry>,
    /// `(origin, service) -> next node`: streams this node relays.
    transit: BTreeMap<(NodeId, ServiceId), NodeId>,
}

/// Permission to connect a stream to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServePermit {
    /// The service.
    pub service: ServiceId,
    /// Its name.
    pub name: MeshName,
    /// The backend to connect to.
    pub backend: Backend,
    /// The relay the stream came through, if any. Then the origin must still be proven (by
    /// its signed flow assertion) and checked with [`IngressTable::may_serve_via`].
    pub relay: Option<NodeId>,
}

/// Permission to forward a stream, as a relay, to the next node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardPermit {
    /// The origin (the TLS peer that sent it here).
    pub origin: NodeId,
    /// The service.
    pub service: ServiceId,
    /// Where to forward it.
    pub next: NodeId,
}

/// What a stream that passed the token check may do here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Reach a local backend.
    Serve(ServePermit),
    /// Be relayed onwards.
    Forward(ForwardPermit),
}

/// Why a serving node refused a stream's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServeRefusal {
    /// This node does not serve that service id (nor relays it for the peer).
    #[error("service not served here")]
    UnknownService,
    /// The service exists here but the peer is not allowed to use it.
    #[error("peer not allowed to use the service")]
    PeerNotAllowed,
    /// A relayed stream's proven origin is not allowed through that relay.
    #[error("origin not allowed through this relay")]
    OriginNotAllowed,
}

impl IngressTable {
    /// Builds a table from entries.
    pub fn from_entries(entries: impl IntoIterator<Item = IngressEntry>) -> Self {
        Self {
            services: entries.into_iter().map(|e| (e.service, e)).collect(),
            transit: BTreeMap::new(),
        }
    }

    /// Adds streams this node relays: `origin`'s streams for `service` go to `next`.
    pub fn with_transit(
        mut self,
        entries: impl IntoIterator<Item = (NodeId, ServiceId, NodeId)>,
    ) -> Self {
        self.transit
            .extend(entries.into_iter().map(|(o, s, n)| ((o, s), n)));
        self
    }

    /// Decides what a stream from `src` (the TLS-authenticated peer) for `service` may do
    /// here: be served, be relayed on, or nothing.
    pub fn admit(&self, src: &NodeId, service: ServiceId) -> Result<Admission, ServeRefusal> {
        if let Some(entry) = self.services.get(&service) {
            let relay = if entry.allowed_peers.contains(src) {
                None
            } else if entry.relayed.iter().any(|(r, _)| r == src) {
                Some(*src)
            } else {
                return Err(ServeRefusal::PeerNotAllowed);
            };
            return Ok(Admission::Serve(ServePermit {
                service,
                name: entry.name.clone(),
                backend: entry.backend.clone(),
                relay,
            }));
        }
        let next = self
            .transit
            .get(&(*src, service))
            .ok_or(ServeRefusal::UnknownService)?;
        Ok(Admission::Forward(ForwardPermit {
            origin: *src,
            service,
            next: *next,
        }))
    }

    /// For a relayed stream: may `origin` (proven by its signed flow assertion) use `service`
    /// through `relay`?
    pub fn may_serve_via(
        &self,
        relay: &NodeId,
        origin: &NodeId,
        service: ServiceId,
    ) -> Result<ServePermit, ServeRefusal> {
        let entry = self
            .services
            .get(&service)
            .ok_or(ServeRefusal::UnknownService)?;
        if !entry.relayed.contains(&(*relay, *origin)) {
            return Err(ServeRefusal::OriginNotAllowed);
        }
        Ok(ServePermit {
            service,
            name: entry.name.clone(),
            backend: entry.backend.clone(),
            relay: Some(*relay),
        })
    }

    /// Relay entries: `(origin, service, next)`.
    pub fn transit(&self) -> impl Iterator<Item = (NodeId, ServiceId, NodeId)> + '_ {
        self.transit.iter().map(|((o, s), n)| (*o, *s, *n))
    }

    /// Decides whether `peer` (the TLS-authenticated node) may use `service` here.
    pub fn may_serve(
        &self,
        peer: &NodeId,
        service: ServiceId,
    ) -> Result<ServePermit, ServeRefusal> {
        let entry = self
            .services
            .get(&service)
            .ok_or(ServeRefusal::UnknownService)?;
        if !entry.allowed_peers.contains(peer) {
            return Err(ServeRefusal::PeerNotAllowed);
        }
        Ok(ServePermit {
            service,
            name: entry.name.clone(),
            backend: entry.backend.clone(),
            relay: None,
        })
    }

    /// All entries, ordered by service id.
    pub fn entries(&self) -> impl Iterator<Item = &IngressEntry> {
        self.services.values()
    }
}

/// Everything the verifier compiles for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Names this node's apps may reach.
    pub egress: EgressTable,
    /// Services this node serves.
    pub ingress: IngressTable,
    /// Peers this node may hold a connection with (either direction), i.e. the pairs that
    /// get seeds.
    pub peers: BTreeSet<NodeId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> MeshName {
        MeshName::parse(s, DEFAULT_MESH_SUFFIX).expect("valid mesh name")
    }

    #[test]
    fn mesh_names_parse() {
        let n = name("api.payments.mesh");
        assert_eq!(n.service.as_str(), "api");
        assert_eq!(n.segment.as_str(), "payments");
        assert_eq!(name("API.Payments.MESH."), n);
        assert_eq!(n.with_suffix("mesh"), "api.payments.mesh");
        assert_eq!(n.to_string(), "api.payments");
    }

    #[test]
    fn non_mesh_targets_are_refused() {
        let cases = [
            ("10.0.0.1", RouteRefusal::IpLiteral),
            ("169.254.169.254", RouteRefusal::IpLiteral),
            ("::1", RouteRefusal::IpLiteral),
            ("[::1]", RouteRefusal::IpLiteral),
            ("localhost", RouteRefusal::NotMeshName),
            ("metadata.google.internal", RouteRefusal::NotMeshName),
            ("example.com", RouteRefusal::NotMeshName),
            ("mesh", RouteRefusal::NotMeshName),
            ("xmesh", RouteRefusal::NotMeshName),
            (".mesh", RouteRefusal::MalformedMeshName),
            ("payments.mesh", RouteRefusal::MalformedMeshName),
            ("a.b.c.mesh", RouteRefusal::MalformedMeshName),
            ("a..mesh", RouteRefusal::MalformedMeshName),
            ("a_b.c.mesh", RouteRefusal::MalformedMeshName),
        ];
        for (host, want) in cases {
            assert_eq!(MeshName::parse(host, "mesh"), Err(want), "{host}");
        }
    }

    #[test]
    fn may_route_and_may_serve() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        let api = name("api.payments.mesh");
        let egress = EgressTable::from_routes([EgressRoute {
            name: api.clone(),
            service: api.service_id(),
            serving_node: b,
            via: None,
        }]);
        let permit = egress
            .may_route("api.payments.mesh", "mesh")
            .expect("allowed");
        assert_eq!(permit.route.serving_node, b);
        assert_eq!(
            egress.may_route("db.payments.mesh", "mesh"),
            Err(RouteRefusal::NoRoute)
        );
        assert_eq!(
            egress.may_route("127.0.0.1", "mesh"),
            Err(RouteRefusal::IpLiteral)
        );

        let ingress = IngressTable::from_entries([IngressEntry {
            service: api.service_id(),
            name: api.clone(),
            backend: Backend {
                host: "127.0.0.1".into(),
                port: 8080,
            },
            allowed_peers: [a].into(),
            relayed: BTreeSet::new(),
        }]);
        let served = ingress.may_serve(&a, api.service_id()).expect("allowed");
        assert_eq!(served.backend.to_string(), "127.0.0.1:8080");
        assert_eq!(
            ingress.may_serve(&b, api.service_id()),
            Err(ServeRefusal::PeerNotAllowed)
        );
        assert_eq!(
            ingress.may_serve(&a, ServiceId::from_u64(7)),
            Err(ServeRefusal::UnknownService)
        );
    }

    #[test]
    fn admission_serves_relays_and_forwards() {
        let (f, r, t, x) = ([1u8; 32], [2; 32], [3; 32], [4; 32]);
        let (f, r, t, x) = (
            NodeId::from_bytes(f),
            NodeId::from_bytes(r),
            NodeId::from_bytes(t),
            NodeId::from_bytes(x),
        );
        let api = name("api.payments.mesh");
        let s = api.service_id();
        let at_t = IngressTable::from_entries([IngressEntry {
            service: s,
            name: api.clone(),
            backend: Backend {
                host: "127.0.0.1".into(),
                port: 1,
            },
            allowed_peers: BTreeSet::new(),
            relayed: [(r, f)].into(),
        }]);
        // At the serving node, the relay is admitted pending the origin's proof.
        assert!(
            matches!(at_t.admit(&r, s), Ok(Admission::Serve(ServePermit { relay: Some(p), .. })) if p == r)
        );
        assert_eq!(
            at_t.admit(&f, s).map(|_| ()),
            Err(ServeRefusal::PeerNotAllowed),
            "f cannot skip the relay"
        );
        assert!(at_t.may_serve_via(&r, &f, s).is_ok());
        assert_eq!(
            at_t.may_serve_via(&r, &x, s).map(|_| ()),
            Err(ServeRefusal::OriginNotAllowed),
            "a relay cannot bridge x"
        );
        // At the relay, f's streams for the service are forwarded to t, nobody else's.
        let at_r = IngressTable::default().with_transit([(f, s, t)]);
        assert_eq!(
            at_r.admit(&f, s),
            Ok(Admission::Forward(ForwardPermit {
                origin: f,
                service: s,
                next: t
            }))
        );
        assert_eq!(
            at_r.admit(&x, s).map(|_| ()),
            Err(ServeRefusal::UnknownService)
        );
    }

    #[test]
    fn backend_display_brackets_ipv6() {
        let b = Backend {
            host: "::1".into(),
            port: 80,
        };
        assert_eq!(b.to_string(), "[::1]:80");
    }
}
