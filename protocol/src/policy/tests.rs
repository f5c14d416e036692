use super::*;
use crate::routing::{RouteRefusal, ServeRefusal};

/// The standard topology of docs/testing.md: a, b in s1; c in s2; allow s1 -> s1 and s1 -> web.s2;
/// s2 -> s1 denied (no rule).
pub(crate) const SAMPLE: &str = r#"
[attestation]
allow_any_measurement = true

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

[[service]]
name = "api"
segment = "s1"
node = "b"
backend = "127.0.0.1:8080"
[[service]]
name = "db"
segment = "s1"
node = "a"
backend = "db.internal:5432"
[[service]]
name = "web"
segment = "s2"
node = "c"
backend = "[::1]:80"
[[service]]
name = "admin"
segment = "s2"
node = "c"
backend = "127.0.0.1:9090"

[[allow]]
from = "s1"
to = "s1"
[[allow]]
from = "s1"
to = "web.s2"
"#;

fn directory() -> NodeDirectory {
    [("a", 0xA0u8), ("b", 0xB0), ("c", 0xC0)]
        .into_iter()
        .map(|(n, b)| {
            (
                NodeName::new(n).expect("valid"),
                NodeId::from_bytes([b; 32]),
            )
        })
        .collect()
}

fn id(n: &str) -> NodeId {
    directory()[&NodeName::new(n).expect("valid")]
}

#[test]
fn sample_parses() {
    let p = Policy::parse(SAMPLE).expect("valid");
    assert_eq!(p.suffix, "mesh");
    assert!(p.allow_any_measurement);
    assert_eq!(p.segments.len(), 2);
    assert_eq!(p.services.len(), 4);
    let web = MeshName::parse("web.s2.mesh", "mesh").expect("name");
    assert_eq!(p.services[&web].backend.to_string(), "[::1]:80");
    assert_eq!(p.rules.len(), 2);
}

/// Every (source node × service) cell: egress on the source and ingress on the server agree,
/// allowed cells permit, denied cells refuse.
#[test]
fn segment_matrix() {
    let p = Policy::parse(SAMPLE).expect("valid");
    let tables = p.compile(&directory());
    // (source, service) -> allowed. Serving nodes never route to themselves.
    let expected = [
        ("a", "api.s1", true),
        ("a", "db.s1", false), // served by a itself
        ("a", "web.s2", true),
        ("a", "admin.s2", false),
        ("b", "api.s1", false), // served by b itself
        ("b", "db.s1", true),
        ("b", "web.s2", true),
        ("b", "admin.s2", false),
        ("c", "api.s1", false),
        ("c", "db.s1", false),
        ("c", "web.s2", false), // served by c itself
        ("c", "admin.s2", false),
    ];
    for (src, svc, allowed) in expected {
        let host = format!("{svc}.mesh");
        let mesh = MeshName::parse(&host, "mesh").expect("name");
        let server = id(p.services[&mesh].node.as_str());
        let egress = tables[&id(src)].egress.may_route(&host, "mesh");
        let ingress = tables[&server]
            .ingress
            .may_serve(&id(src), mesh.service_id());
        if allowed {
            let route = egress
                .unwrap_or_else(|e| panic!("{src} -> {svc} must route: {e}"))
                .route;
            assert_eq!(route.serving_node, server);
            assert_eq!(route.service, mesh.service_id());
            assert!(ingress.is_ok(), "{src} -> {svc} must be served");
            assert!(tables[&id(src)].peers.contains(&server));
            assert!(tables[&server].peers.contains(&id(src)));
        } else {
            assert_eq!(
                egress,
                Err(RouteRefusal::NoRoute),
                "{src} -> {svc} must not route"
            );
            assert_eq!(
                ingress.map(|_| ()),
                Err(ServeRefusal::PeerNotAllowed),
                "{src} -> {svc} must not be served"
            );
        }
    }
    // c (s2) is in no allowed pair with anyone but as a server of web.s2.
    let c_peers: Vec<_> = tables[&id("c")].peers.iter().copied().collect();
    assert_eq!(c_peers, vec![id("a"), id("b")]);
    assert!(tables[&id("c")].egress.routes().next().is_none());
}

#[test]
fn unenrolled_nodes_get_nothing_and_are_not_routed_to() {
    let p = Policy::parse(SAMPLE).expect("valid");
    let mut dir = directory();
    dir.remove(&NodeName::new("c").expect("valid"));
    let tables = p.compile(&dir);
    assert_eq!(tables.len(), 2);
    assert_eq!(
        tables[&id("a")].egress.may_route("web.s2.mesh", "mesh"),
        Err(RouteRefusal::NoRoute)
    );
    // An enrolled node that policy does not name gets no table.
    dir.insert(
        NodeName::new("stranger").expect("valid"),
        NodeId::from_bytes([0xEE; 32]),
    );
    assert!(
        p.compile_for(&NodeName::new("stranger").expect("valid"), &dir)
            .is_none()
    );
}

#[test]
fn may_reach_names_the_rule() {
    let p = Policy::parse(SAMPLE).expect("valid");
    let s1 = SegmentName::new("s1").expect("valid");
    let s2 = SegmentName::new("s2").expect("valid");
    let web = MeshName::parse("web.s2.mesh", "mesh").expect("name");
    let api = MeshName::parse("api.s1.mesh", "mesh").expect("name");
    assert_eq!(p.may_reach(&s1, &api), Ok(RuleMatch { rule: 0 }));
    assert_eq!(p.may_reach(&s1, &web), Ok(RuleMatch { rule: 1 }));
    assert_eq!(p.may_reach(&s2, &api), Err(DefaultDeny));
}

fn line_err(text: &str) -> (usize, String) {
    match Policy::parse(text) {
        Err(PolicyError::Invalid { line, message }) => (line, message),
        other => panic!("expected a semantic error, got {other:?}"),
    }
}

#[test]
fn errors_name_the_line_and_field() {
    let (line, msg) =
        line_err("[[segment]]\nname = \"s1\"\n[[node]]\nname = \"a\"\nsegments = [\"s9\"]\n");
    assert_eq!(line, 5);
    assert!(
        msg.contains("unknown segment `s9`") && msg.contains("node `a`"),
        "{msg}"
    );

    let (line, msg) = line_err("[[segment]]\nname = \"Bad_Name\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("segment.name"), "{msg}");

    let base = "[[segment]]\nname = \"s1\"\n[[segment]]\nname = \"s2\"\n[[node]]\nname = \"a\"\nsegments = [\"s1\"]\n";
    let (line, msg) = line_err(&format!(
        "{base}[[service]]\nname = \"x\"\nsegment = \"s2\"\nnode = \"a\"\nbackend = \"h:1\"\n"
    ));
    assert_eq!(line, 11);
    assert!(msg.contains("not in segment `s2`"), "{msg}");

    let (line, msg) = line_err(&format!(
        "{base}[[service]]\nname = \"x\"\nsegment = \"s1\"\nnode = \"a\"\nbackend = \"h:0\"\n"
    ));
    assert_eq!(line, 12);
    assert!(msg.contains("backend") && msg.contains("port"), "{msg}");

    let (line, msg) = line_err(&format!(
        "{base}[[allow]]\nfrom = \"s1\"\nto = \"nope.s1\"\n"
    ));
    assert_eq!(line, 10);
    assert!(msg.contains("unknown service `nope.s1`"), "{msg}");

    let (_, msg) = line_err(&format!("{base}[[segment]]\nname = \"s1\"\n"));
    assert!(msg.contains("declared twice"), "{msg}");

    let (_, msg) = line_err("[attestation]\nmeasurements = [\"abc\"]\n");
    assert!(msg.contains("measurement"), "{msg}");

    let (_, msg) = line_err("suffix = \"Mesh!\"\n");
    assert!(msg.contains("suffix"), "{msg}");
}

#[test]
fn syntax_and_unknown_keys_are_errors() {
    let Err(PolicyError::Syntax(msg)) = Policy::parse("[[segment]]\nnmae = \"s1\"\n") else {
        panic!("unknown key must be refused");
    };
    assert!(msg.contains("nmae") && msg.contains("line 2"), "{msg}");
    let Err(PolicyError::Syntax(msg)) = Policy::parse("[[segment]\n") else {
        panic!("bad TOML must be refused");
    };
    assert!(msg.contains("line 1"), "{msg}");
    assert!(matches!(
        Policy::parse("[[service]]\nname = \"x\"\n"),
        Err(PolicyError::Syntax(_))
    ));
}

#[test]
fn backends_parse() {
    assert_eq!(
        parse_backend("127.0.0.1:80").map(|b| b.to_string()),
        Ok("127.0.0.1:80".into())
    );
    assert_eq!(parse_backend("[::1]:80").map(|b| b.host), Ok("::1".into()));
    assert_eq!(parse_backend("db.internal:5432").map(|b| b.port), Ok(5432));
    for bad in [
        "noport", "::1:80", ":80", "h:", "h:65536", "h:0", "[zz]:1", "[::1:80",
    ] {
        assert!(parse_backend(bad).is_err(), "{bad}");
    }
}

#[test]
fn empty_policy_denies_everything() {
    let p = Policy::parse("").expect("an empty policy is valid");
    assert!(p.rules.is_empty());
    assert!(p.compile(&directory()).is_empty());
}

#[test]
fn relay_routes_compile_into_transit_and_relayed_origins() {
    let text = SAMPLE.to_owned()
        + "\n[[node]]\nname = \"r\"\nsegments = [\"s2\"]\n[[route]]\nfrom = \"a\"\nto = \"c\"\nvia = \"r\"\n";
    let p = Policy::parse(&text).expect("valid");
    let mut dir = directory();
    dir.insert(
        NodeName::new("r").expect("name"),
        NodeId::from_bytes([0xD0; 32]),
    );
    let r = NodeId::from_bytes([0xD0; 32]);
    let tables = p.compile(&dir);
    let web = MeshName::parse("web.s2.mesh", "mesh").expect("name");
    // a goes through r; b (no route) still goes direct.
    let a_route = tables[&id("a")]
        .egress
        .may_route("web.s2.mesh", "mesh")
        .expect("route")
        .route;
    assert_eq!((a_route.serving_node, a_route.via), (id("c"), Some(r)));
    assert!(tables[&id("a")].peers.contains(&r) && !tables[&id("a")].peers.contains(&id("c")));
    assert_eq!(
        tables[&id("b")]
            .egress
            .may_route("web.s2.mesh", "mesh")
            .expect("route")
            .route
            .via,
        None
    );
    // r forwards exactly a's streams for web.s2 to c.
    let transit: Vec<_> = tables[&r].ingress.transit().collect();
    assert_eq!(transit, vec![(id("a"), web.service_id(), id("c"))]);
    assert!(tables[&r].peers.contains(&id("a")) && tables[&r].peers.contains(&id("c")));
    // c admits a only through r, b directly.
    let at_c = &tables[&id("c")].ingress;
    assert!(at_c.may_serve_via(&r, &id("a"), web.service_id()).is_ok());
    assert_eq!(
        at_c.may_serve(&id("a"), web.service_id()).map(|_| ()),
        Err(ServeRefusal::PeerNotAllowed)
    );
    assert!(at_c.may_serve(&id("b"), web.service_id()).is_ok());
    // A relay cannot bridge: c (s2) may not reach api.s1 through anyone.
    assert_eq!(
        tables[&r]
            .ingress
            .admit(
                &id("c"),
                MeshName::parse("api.s1.mesh", "mesh")
                    .expect("n")
                    .service_id()
            )
            .map(|_| ()),
        Err(ServeRefusal::UnknownService)
    );
    // Unenrolled relay: the route's services become unreachable, not direct.
    dir.remove(&NodeName::new("r").expect("name"));
    let tables = p.compile(&dir);
    assert_eq!(
        tables[&id("a")].egress.may_route("web.s2.mesh", "mesh"),
        Err(RouteRefusal::NoRoute)
    );
}

#[test]
fn route_errors_name_the_line() {
    let base = "[[segment]]\nname = \"s\"\n[[node]]\nname = \"a\"\nsegments = [\"s\"]\n[[node]]\nname = \"b\"\nsegments = [\"s\"]\n";
    let (line, msg) = line_err(&format!(
        "{base}[[route]]\nfrom = \"a\"\nto = \"b\"\nvia = \"zz\"\n"
    ));
    assert_eq!(line, 12);
    assert!(msg.contains("unknown node `zz`"), "{msg}");
    let (_, msg) = line_err(&format!(
        "{base}[[route]]\nfrom = \"a\"\nto = \"b\"\nvia = \"a\"\n"
    ));
    assert!(msg.contains("three different nodes"), "{msg}");
}

/// A relay whose own route to the serving node needs an unenrolled relay has no route of its
/// own, and still relays the streams it carries for others (it used to lose its transit
/// entries for that serving node's services).
#[test]
fn a_relay_without_its_own_route_still_relays() {
    let text = SAMPLE.to_owned()
        + "\n[[node]]\nname = \"r\"\nsegments = [\"s1\"]\n[[node]]\nname = \"q\"\nsegments = [\"s1\"]\n\
           [[route]]\nfrom = \"a\"\nto = \"c\"\nvia = \"r\"\n\
           [[route]]\nfrom = \"r\"\nto = \"c\"\nvia = \"q\"\n";
    let p = Policy::parse(&text).expect("valid");
    let mut dir = directory();
    let r = NodeId::from_bytes([0xD0; 32]);
    dir.insert(NodeName::new("r").expect("name"), r);
    let tables = p.compile(&dir);
    let web = MeshName::parse("web.s2.mesh", "mesh").expect("name");
    assert_eq!(
        tables[&r].egress.may_route("web.s2.mesh", "mesh"),
        Err(RouteRefusal::NoRoute),
        "q is not enrolled: r has no route to web.s2"
    );
    let transit: Vec<_> = tables[&r].ingress.transit().collect();
    assert_eq!(transit, vec![(id("a"), web.service_id(), id("c"))]);
    assert!(tables[&r].peers.contains(&id("a")) && tables[&r].peers.contains(&id("c")));
}
