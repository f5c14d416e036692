//! The policy file and its compilation into per-node routing tables (docs/design.md,
//! "Segments, services, routing, relays").
//!
//! ```toml
//! suffix = "mesh"                      # optional, default "mesh"
//!
//! [attestation]
//! allow_any_measurement = false        # true only for development
//! measurements = ["<64 hex digits>"]   # SHA-256 of allowed node binaries
//!
//! [[segment]]
//! name = "payments"
//!
//! [[node]]
//! name = "b"
//! segments = ["payments"]
//!
//! [[service]]
//! name = "api"                         # reached as api.payments.mesh
//! segment = "payments"
//! node = "b"                           # must be in the service's segment
//! backend = "127.0.0.1:8080"           # host:port, [v6]:port; fixed here, never by a peer
//!
//! [[allow]]
//! from = "frontend"                    # a segment
//! to = "api.payments"                  # a service, or a segment: every service in it
//!
//! [[route]]                            # optional: clouds that cannot reach each other
//! from = "a"                           # node a reaches node b only
//! to = "b"
//! via = "r"                            # through relay node r (one hop)
//! ```
//!
//! Default deny: a stream is allowed only if one of the source node's segments has an
//! `allow` rule reaching the service. Errors name the line and the field at fault; unknown
//! keys are errors, so a typo cannot silently drop a rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

pub use self::mesh_tables::{MeshError, MeshTables, NodeDelta, PolicyDiff, TableState};
use crate::attestation::MAX_SEGMENTS_PER_NODE;
use crate::ids::{Measurement, NodeId, NodeName, SegmentName, ServiceId, ServiceName};

use crate::routing::{
    Backend, DEFAULT_MESH_SUFFIX, EgressRoute, EgressTable, IngressEntry, IngressTable, MeshName,
    RoutingTable,
};

/// A policy that parsed and passed every consistency check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Mesh-name suffix, e.g. `mesh`.
    pub suffix: String,
    /// Accept any binary measurement (development only).
    pub allow_any_measurement: bool,
    /// Allowed binary measurements.
    pub measurements: BTreeSet<Measurement>,
    /// Declared segments.
    pub segments: BTreeSet<SegmentName>,
    /// Declared nodes and their segments.
    pub nodes: BTreeMap<NodeName, BTreeSet<SegmentName>>,
    /// Declared services.
    pub services: BTreeMap<MeshName, ServiceSpec>,
    /// Allow rules, in file order.
    pub rules: Vec<Rule>,
    /// `(from, to) -> via`: node `from` reaches node `to` only through relay `via`.
    pub routes: BTreeMap<(NodeName, NodeName), NodeName>,
}

/// One service in policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its id.
    pub id: ServiceId,
    /// The node serving it.
    pub node: NodeName,
    /// Where the serving node connects.
    pub backend: Backend,
}

/// `allow <from> -> <to>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Source segment.
    pub from: SegmentName,
    /// What it may reach.
    pub to: RuleTarget,
}

/// The right-hand side of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleTarget {
    /// One service.
    Service(MeshName),
    /// Every service in a segment.
    Segment(SegmentName),
}

/// The rule that allows a segment to reach a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    /// Index of the rule in file order.
    pub rule: usize,
}

/// No rule allows it: default deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no allow rule matches (default deny)")]
pub struct DefaultDeny;

/// Why a policy file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// TOML syntax or shape error; the message names line, column and field.
    #[error("policy: {0}")]
    Syntax(String),
    /// A value is wrong or refers to something undeclared.
    #[error("policy line {line}: {message}")]
    Invalid {
        /// 1-based line of the offending value.
        line: usize,
        /// What is wrong, naming the field and value.
        message: String,
    },
}

/// Enrolled nodes: name → id. Policy nodes not in it get no routes and serve no one.
pub type NodeDirectory = BTreeMap<NodeName, NodeId>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    suffix: Option<Spanned<String>>,
    #[serde(default)]
    attestation: RawAttestation,
    #[serde(default, rename = "segment")]
    segments: Vec<RawSegment>,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default, rename = "allow")]
    rules: Vec<RawRule>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    from: Spanned<String>,
    to: Spanned<String>,
    via: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    #[serde(default)]
    allow_any_measurement: bool,
    #[serde(default)]
    measurements: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    #[serde(default)]
    segments: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    segment: Spanned<String>,
    node: Spanned<String>,
    backend: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Spanned<String>,
    to: Spanned<String>,
}

/// Turns spans into line numbers for error messages.
struct Source<'a>(&'a str);

impl Source<'_> {
    fn err(&self, span: Range<usize>, message: impl fmt::Display) -> PolicyError {
        let upto = self.0.get(..span.start).unwrap_or(self.0);
        PolicyError::Invalid {
            line: upto.matches('\n').count() + 1,
            message: message.to_string(),
        }
    }

    fn label<T>(
        &self,
        v: &Spanned<String>,
        field: &str,
        parse: impl Fn(&str) -> Result<T, crate::ids::NameError>,
    ) -> Result<T, PolicyError> {
        parse(v.get_ref()).map_err(|e| self.err(v.span(), format!("{field}: {e}")))
    }
}

impl Policy {
    /// Parses and checks a policy file.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text)
            .map_err(|e| PolicyError::Syntax(e.to_string().trim_end().to_owned()))?;
        let src = Source(text);

        let suffix = match &raw.suffix {
            None => DEFAULT_MESH_SUFFIX.to_owned(),
            Some(s) => {
                let v = s.get_ref();
                if v.is_empty() || v.split('.').any(|l| SegmentName::new(l).is_err()) {
                    return Err(src.err(
                        s.span(),
                        format!("suffix: `{v}` is not a DNS name of lowercase labels"),
                    ));
                }
                v.clone()
            }
        };

        let mut measurements = BTreeSet::new();
        for m in &raw.attestation.measurements {
            let parsed = src.label(m, "attestation.measurements", |s| s.parse::<Measurement>())?;
            measurements.insert(parsed);
        }

        let mut segments = BTreeSet::new();
        for s in &raw.segments {
            let name = src.label(&s.name, "segment.name", SegmentName::new)?;
            if !segments.insert(name.clone()) {
                return Err(src.err(s.name.span(), format!("segment `{name}` declared twice")));
            }
        }
        let known_segment =
            |v: &Spanned<String>, field: &str| -> Result<SegmentName, PolicyError> {
                let name = src.label(v, field, SegmentName::new)?;
                if !segments.contains(&name) {
                    return Err(src.err(v.span(), format!("{field}: unknown segment `{name}`")));
                }
                Ok(name)
            };

        let mut nodes = BTreeMap::new();
        for n in &raw.nodes {
            let name = src.label(&n.name, "node.name", NodeName::new)?;
            let mut segs = BTreeSet::new();
            for s in &n.segments {
                segs.insert(known_segment(s, &format!("node `{name}` segments"))?);
            }
            if segs.len() > MAX_SEGMENTS_PER_NODE {
                return Err(src.err(
                    n.name.span(),
                    format!(
                        "node `{name}` is in {} segments, at most {MAX_SEGMENTS_PER_NODE}",
                        segs.len()
                    ),
                ));
            }
            if nodes.insert(name.clone(), segs).is_some() {
                return Err(src.err(n.name.span(), format!("node `{name}` declared twice")));
            }
        }

        let mut services = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for s in &raw.services {
            let name = src.label(&s.name, "service.name", ServiceName::new)?;
            let segment = known_segment(&s.segment, &format!("service `{name}` segment"))?;
            let node = src.label(&s.node, "service.node", NodeName::new)?;
            let Some(node_segments) = nodes.get(&node) else {
                return Err(src.err(
                    s.node.span(),
                    format!("service `{name}.{segment}`: unknown node `{node}`"),
                ));
            };
            if !node_segments.contains(&segment) {
                return Err(src.err(
                    s.node.span(),
                    format!(
                        "service `{name}.{segment}`: node `{node}` is not in segment `{segment}`"
                    ),
                ));
            }
            let backend = parse_backend(s.backend.get_ref()).map_err(|e| {
                src.err(
                    s.backend.span(),
                    format!("service `{name}.{segment}` backend: {e}"),
                )
            })?;
            let mesh = MeshName {
                service: name,
                segment,
            };
            let id = mesh.service_id();
            if let Some(other) = ids.insert(id, mesh.clone()) {
                return Err(src.err(
                    s.name.span(),
                    format!("service `{mesh}` declared twice or id collides with `{other}`"),
                ));
            }
            services.insert(mesh, ServiceSpec { id, node, backend });
        }

        let mut rules = Vec::new();
        for r in &raw.rules {
            let from = known_segment(&r.from, "allow.from")?;
            let to_text = r.to.get_ref();
            let to = match to_text.split_once('.') {
                Some((service, segment)) => {
                    let mesh = MeshName {
                        service: ServiceName::new(service)
                            .map_err(|e| src.err(r.to.span(), format!("allow.to: {e}")))?,
                        segment: SegmentName::new(segment)
                            .map_err(|e| src.err(r.to.span(), format!("allow.to: {e}")))?,
                    };
                    if !services.contains_key(&mesh) {
                        return Err(
                            src.err(r.to.span(), format!("allow.to: unknown service `{mesh}`"))
                        );
                    }
                    RuleTarget::Service(mesh)
                }
                None => RuleTarget::Segment(known_segment(&r.to, "allow.to")?),
            };
            rules.push(Rule { from, to });
        }

        let mut routes = BTreeMap::new();
        for r in &raw.routes {
            let mut names = Vec::new();
            for (field, v) in [
                ("route.from", &r.from),
                ("route.to", &r.to),
                ("route.via", &r.via),
            ] {
                let n = src.label(v, field, NodeName::new)?;
                if !nodes.contains_key(&n) {
                    return Err(src.err(v.span(), format!("{field}: unknown node `{n}`")));
                }
                names.push(n);
            }
            let [from, to, via] = <[NodeName; 3]>::try_from(names)
                .map_err(|_| src.err(r.from.span(), "route: three nodes"))?;
            if from == to || via == from || via == to {
                return Err(src.err(
                    r.via.span(),
                    format!("route {from} -> {to} via {via}: three different nodes needed"),
                ));
            }
            if routes.insert((from.clone(), to.clone()), via).is_some() {
                return Err(src.err(
                    r.from.span(),
                    format!("route {from} -> {to} declared twice"),
                ));
            }
        }

        Ok(Self {
            routes,
            suffix,
            allow_any_measurement: raw.attestation.allow_any_measurement,
            measurements,
            segments,
            nodes,
            services,
            rules,
        })
    }

    /// Does segment `from` reach `service`? Returns the first matching rule, or default deny.
    pub fn may_reach(
        &self,
        from: &SegmentName,
        service: &MeshName,
    ) -> Result<RuleMatch, DefaultDeny> {
        self.rules
            .iter()
            .position(|r| {
                r.from == *from
                    && match &r.to {
                        RuleTarget::Service(s) => s == service,
                        RuleTarget::Segment(seg) => *seg == service.segment,
                    }
            })
            .map(|rule| RuleMatch { rule })
            .ok_or(DefaultDeny)
    }

    /// May node `node` (by its policy segments) use `service`? The node serving a service is
    /// not routed to itself.
    pub fn node_may_use(
        &self,
        node: &NodeName,
        service: &MeshName,
    ) -> Result<RuleMatch, DefaultDeny> {
        let spec = self.services.get(service).ok_or(DefaultDeny)?;
        if spec.node == *node {
            return Err(DefaultDeny);
        }
        self.nodes
            .get(node)
            .into_iter()
            .flatten()
            .find_map(|seg| self.may_reach(seg, service).ok())
            .ok_or(DefaultDeny)
    }

    /// Compiles the routing table of every enrolled node named in policy.
    pub fn compile(&self, directory: &NodeDirectory) -> BTreeMap<NodeId, RoutingTable> {
        directory
            .iter()
            .filter_map(|(name, id)| Some((*id, self.compile_for(name, directory)?)))
            .collect()
    }

    /// Compiles one node's table; `None` if the node is not enrolled or not in policy.
    ///
    /// With a `[[route]] from = F, to = T, via = R`, F's streams for T's services go to R; R
    /// gets transit entries for exactly those services; T admits them from R only for origin
    /// F (proven end to end by F's signed flow assertion). A relay route whose relay is not
    /// enrolled makes the services unreachable rather than falling back to a direct path.
    pub fn compile_for(&self, node: &NodeName, directory: &NodeDirectory) -> Option<RoutingTable> {
        let self_id = *directory.get(node)?;
        if !self.nodes.contains_key(node) {
            return None;
        }
        let mut table = RoutingTable::default();
        let mut routes = Vec::new();
        let mut entries = Vec::new();
        let mut transit = Vec::new();
        for (mesh, spec) in &self.services {
            let Some(serving) = directory.get(&spec.node) else {
                continue;
            };
            if spec.node == *node {
                let mut allowed_peers = BTreeSet::new();
                let mut relayed = BTreeSet::new();
                for (other, id) in directory {
                    if *id == self_id || self.node_may_use(other, mesh).is_err() {
                        continue;
                    }
                    match self.routes.get(&(other.clone(), node.clone())) {
                        None => {
                            allowed_peers.insert(*id);
                        }
                        Some(via) => {
                            if let Some(relay) = directory.get(via) {
                                relayed.insert((*relay, *id));
                            }
                        }
                    }
                }
                table.peers.extend(allowed_peers.iter().copied());
                table.peers.extend(relayed.iter().map(|(r, _)| *r));
                entries.push(IngressEntry {
                    service: spec.id,
                    name: mesh.clone(),
                    backend: spec.backend.clone(),
                    allowed_peers,
                    relayed,
                });
            } else if self.node_may_use(node, mesh).is_ok() && *serving != self_id {
                // `None`: the route's relay is not enrolled, so no route at all (never a
                // direct fallback). This node may still relay others' streams below.
                let via = match self.routes.get(&(node.clone(), spec.node.clone())) {
                    None => Some(None),
                    Some(v) => directory.get(v).map(|id| Some(*id)),
                };
                if let Some(via) = via {
                    table.peers.insert(via.unwrap_or(*serving));
                    routes.push(EgressRoute {
                        name: mesh.clone(),
                        service: spec.id,
                        serving_node: *serving,
                        via,
                    });
                }
            }
            // This node relays `from`'s streams for this service to its serving node.
            for ((from, to), via) in &self.routes {
                if via == node
                    && *to == spec.node
                    && self.node_may_use(from, mesh).is_ok()
                    && let Some(origin) = directory.get(from)
                {
                    table.peers.insert(*origin);
                    table.peers.insert(*serving);
                    transit.push((*origin, spec.id, *serving));
                }
            }
        }
        table.egress = EgressTable::from_routes(routes);
        table.ingress = IngressTable::from_entries(entries).with_transit(transit);
        Some(table)
    }
}

/// Parses `host:port` (`[v6]:port` for IPv6). The port must not be 0.
pub fn parse_backend(s: &str) -> Result<Backend, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not host:port"))?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
            .ok_or_else(|| format!("`{s}`: bad bracketed IPv6 address"))?,
        None if host.contains(':') => {
            return Err(format!("`{s}`: write IPv6 backends as [addr]:port"));
        }
        None => host,
    };
    if host.is_empty() {
        return Err(format!("`{s}`: empty host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{s}`: port must be 1-65535"))?;
    if port == 0 {
        return Err(format!("`{s}`: port must be 1-65535"));
    }
    Ok(Backend {
        host: host.to_owned(),
        port,
    })
}

mod mesh_tables;
#[cfg(test)]
mod tests;
