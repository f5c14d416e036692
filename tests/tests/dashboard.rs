//! The Grafana dashboard (`packaging/grafana/hopmesh.json`) and the Prometheus alert rules
//! (`packaging/prometheus/hopmesh-alerts.yml`) name only metrics a running mesh exposes, and
//! only refusal reasons and report kinds the code has; the gauges they alert on carry the
//! node's real state.
//!
//! A mesh of three nodes (each with a `/metrics` address) and the verifier, driven so that
//! every family the files use has a sample: one stream a → b, one refused SOCKS route, one
//! unauthorised admin call, a connection flood past the per-source budget, a forged hop token
//! and a token under a compromised generation (from a client holding a's key), one
//! revocation. Then every node's and the verifier's `/metrics` are scraped over HTTP and the
//! files are checked against the sample names actually exposed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::enrollment::ReportKind;
use hopmesh_protocol::hop_token::{EpochLength, PairIds, TokenRefusal};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::routing::{MeshName, ServeRefusal};
use hopmesh_tests::attacker::{ProtocolClient, StreamOutcome, current_grant};
use hopmesh_tests::flood::Flooder;
use hopmesh_tests::mesh::{Mesh, echo_through, pattern, socks_connect};
use hopmesh_verifier::admin_addr::AdminAddr;
use hopmesh_verifier::authority::Settings;
use hopmesh_verifier::service::MAX_UNAUTHENTICATED_PER_SOURCE;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const DASHBOARD: &str = "packaging/grafana/hopmesh.json";
const ALERTS: &str = "packaging/prometheus/hopmesh-alerts.yml";

/// The alerts the rules must have (issue "Deployable on a VM", item 4).
const REQUIRED_ALERTS: [&str; 5] = [
    "HopmeshNodeAttestationExpiring",
    "HopmeshNodeVerifierLinkDown",
    "HopmeshVerifierDown",
    "HopmeshForgedHopTokens",
    "HopmeshCompromisedKeyUse",
];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// `GET path` over a fresh connection; the body of a 200 answer.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read answer");
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http answer");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// `GET path` on the verifier's admin listener (a Unix socket or loopback TCP).
async fn admin_get(addr: &AdminAddr, path: &str) -> String {
    match addr {
        AdminAddr::Unix(p) => {
            get(
                tokio::net::UnixStream::connect(p).await.expect("connect"),
                path,
            )
            .await
        }
        AdminAddr::Tcp(a) => {
            get(
                tokio::net::TcpStream::connect(a).await.expect("connect"),
                path,
            )
            .await
        }
    }
}

/// An unauthorised admin call: answered 401 and counted as a verifier refusal.
async fn admin_unauthorised(addr: &AdminAddr) {
    async fn status<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> String {
        s.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        String::from_utf8_lossy(&raw)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }
    let line = match addr {
        AdminAddr::Unix(p) => {
            status(tokio::net::UnixStream::connect(p).await.expect("connect")).await
        }
        AdminAddr::Tcp(a) => {
            status(tokio::net::TcpStream::connect(a).await.expect("connect")).await
        }
    };
    assert!(line.starts_with("HTTP/1.1 401"), "{line}");
}

/// What the scrapes expose: sample name → every sample line's labels and value.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<String, Vec<(String, String)>>,
}

impl Exposition {
    fn parse(text: &str, into: &mut Self) {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let end = line.find(['{', ' ']).expect("sample line");
            let (name, rest) = line.split_at(end);
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (l, v) = r.split_once("} ").expect("labels end");
                    (l.to_owned(), v.to_owned())
                }
                None => (String::new(), rest.trim().to_owned()),
            };
            into.samples
                .entry(name.to_owned())
                .or_default()
                .push((labels, value));
        }
    }

    /// Whether a sample of that exact name was exposed (`_total`, `_bucket`, ... included).
    fn exposes(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }
}

/// The one unlabelled sample `name` of a scrape, as a number.
fn value(text: &str, name: &str) -> f64 {
    let mut e = Exposition::default();
    Exposition::parse(text, &mut e);
    let s = e
        .samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name}:\n{text}"));
    let unlabelled: Vec<_> = s.iter().filter(|(l, _)| l.is_empty()).collect();
    assert_eq!(unlabelled.len(), 1, "{name}: {s:?}");
    unlabelled[0].1.parse().expect("number")
}

/// Every `hopmesh_node_*` / `hopmesh_verifier_*` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("hopmesh_") {
        let start = from + i;
        let end = text[start..]
            .find(|c: char| !(ident(c)))
            .map_or(text.len(), |n| start + n);
        let name = &text[start..end];
        let preceded = text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| ident(c) || c.is_ascii_uppercase());
        if !preceded
            && ["hopmesh_node_", "hopmesh_verifier_"]
                .iter()
                .any(|p| name.len() > p.len() && name.starts_with(p))
        {
            out.insert(name.to_owned());
        }
        from = end.max(start + 1);
    }
    out
}

/// The values of every `reason="…"`, `reason=~"a|b"`, `kind=…` matcher in `expr`.
fn matcher_values(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for label in ["reason", "kind"] {
        let mut from = 0;
        while let Some(i) = expr[from..].find(&format!("{label}=")) {
            let start = from + i + label.len() + 1;
            let rest = expr[start..].trim_start_matches('~');
            let rest = rest.strip_prefix('"').expect("quoted matcher value");
            let v = &rest[..rest.find('"').expect("closing quote")];
            out.extend(v.split('|').map(str::to_owned));
            from = start;
        }
    }
    out
}

/// Every string of the dashboard JSON (exprs, template queries, descriptions alike).
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Every panel, rows' nested panels included.
fn all_panels(panels: &[Value], out: &mut Vec<Value>) {
    for p in panels {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            all_panels(inner, out);
        }
    }
}

/// Every hop-token refusal, so the rules' reasons are checked against the code's strings.
fn token_refusals() -> Vec<TokenRefusal> {
    let id = NodeId::from_bytes([1; 32]);
    vec![
        TokenRefusal::WrongVersion(0),
        TokenRefusal::UnknownAlgorithm(0),
        TokenRefusal::HeaderTooLong(0),
        TokenRefusal::StreamIdMismatch {
            token: 0,
            actual: 1,
        },
        TokenRefusal::SrcNotPeer {
            claimed: id,
            peer: id,
        },
        TokenRefusal::DstNotSelf(id),
        TokenRefusal::EpochOutOfWindow { token: 0, now: 9 },
        TokenRefusal::UnknownGeneration(0),
        TokenRefusal::CompromisedKeyUse(0),
        TokenRefusal::BadMac,
        TokenRefusal::PolicyRefused(ServeRefusal::UnknownService),
        TokenRefusal::HeaderHashMismatch,
    ]
}

/// The alert rules: (name, its lines up to the next alert).
fn alert_blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert:") {
            out.push((name.trim().to_owned(), Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            lines.push(t.to_owned());
        }
    }
    out
}

/// Checks the dashboard and the rules against the scraped expositions; the failures, empty
/// when they are true.
fn check_files(dashboard: &str, alerts: &str, exposed: &Exposition) -> Vec<String> {
    let mut errors = Vec::new();
    let mut known_values: BTreeSet<String> = token_refusals()
        .iter()
        .map(|r| r.reason().to_owned())
        .collect();
    for k in [
        ReportKind::CompromisedKeyUse,
        ReportKind::ForgedTokens,
        ReportKind::Impersonation,
    ] {
        known_values.insert(k.as_str().to_owned());
    }

    // The dashboard.
    let d: Value = serde_json::from_str(dashboard).expect("dashboard JSON");
    for key in ["title", "panels", "templating"] {
        if d.get(key).is_none() {
            errors.push(format!("dashboard: no `{key}`"));
        }
    }
    let vars: Vec<&Value> = d["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    if !vars.iter().any(|v| {
        v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
    }) {
        errors.push("dashboard: no Prometheus `datasource` variable".into());
    }
    if !vars.iter().any(|v| v["name"] == "instance") {
        errors.push("dashboard: no `instance` variable".into());
    }
    let mut panels = Vec::new();
    all_panels(d["panels"].as_array().map_or(&[][..], |v| v), &mut panels);
    let mut exprs = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        let targets = p["targets"].as_array().map_or(&[][..], |v| v);
        if targets.is_empty() {
            errors.push(format!("dashboard panel `{title}`: no targets"));
        }
        for t in targets {
            match t["expr"].as_str() {
                Some(e) if !e.trim().is_empty() => exprs.push(e.to_owned()),
                _ => errors.push(format!("dashboard panel `{title}`: a target without expr")),
            }
            if t["datasource"]["uid"] != "${datasource}" {
                errors.push(format!(
                    "dashboard panel `{title}`: target not on ${{datasource}}"
                ));
            }
        }
    }
    if panels.iter().filter(|p| p["type"] != "row").count() < 10 {
        errors.push("dashboard: fewer than 10 panels".into());
    }
    let mut all = Vec::new();
    strings(&d, &mut all);
    let dash_names: BTreeSet<String> = all.iter().flat_map(|s| metric_names(s)).collect();
    for n in &dash_names {
        if !exposed.exposes(n) {
            errors.push(format!("dashboard names `{n}`, which no scrape exposes"));
        }
    }
    if dash_names.len() < 10 {
        errors.push(format!(
            "dashboard names only {} metrics: {dash_names:?}",
            dash_names.len()
        ));
    }
    for e in &exprs {
        for v in matcher_values(e) {
            if !known_values.contains(&v) {
                errors.push(format!(
                    "dashboard matches reason/kind `{v}`, which the code has not"
                ));
            }
        }
    }
    // The names the dashboard must cover.
    for must in [
        "hopmesh_node_refusals_total",
        "hopmesh_verifier_refusals_total",
        "hopmesh_node_streams_accepted_total",
        "hopmesh_node_bytes_in_total",
        "hopmesh_node_attestation_remaining_seconds",
        "hopmesh_node_revocation_version",
        "hopmesh_node_revocation_propagation_seconds_bucket",
        "hopmesh_verifier_subscribed_nodes",
        "hopmesh_verifier_connection_refusals_total",
        "hopmesh_verifier_issuance_seconds_bucket",
    ] {
        if !dash_names.contains(must) {
            errors.push(format!("dashboard does not show `{must}`"));
        }
    }

    // The rules.
    let mut rule_names = BTreeSet::new();
    for (i, line) in alerts.lines().enumerate() {
        let Some(expr) = line.trim().strip_prefix("expr:") else {
            continue;
        };
        let expr = expr.trim();
        if expr.is_empty() || expr.starts_with('|') || expr.starts_with('>') {
            errors.push(format!("{ALERTS}:{}: expr not on one line", i + 1));
        }
        for n in metric_names(expr) {
            if !exposed.exposes(&n) {
                errors.push(format!(
                    "{ALERTS}:{}: names `{n}`, which no scrape exposes",
                    i + 1
                ));
            }
            rule_names.insert(n);
        }
        for v in matcher_values(expr) {
            if !known_values.contains(&v) {
                errors.push(format!(
                    "{ALERTS}:{}: matches reason/kind `{v}`, which the code has not",
                    i + 1
                ));
            }
        }
    }
    let blocks = alert_blocks(alerts);
    for (name, lines) in &blocks {
        for (what, prefix) in [
            ("expr", "expr:"),
            ("for", "for:"),
            ("severity", "severity:"),
            ("summary", "summary:"),
        ] {
            if !lines.iter().any(|l| l.starts_with(prefix)) {
                errors.push(format!("alert {name}: no {what}"));
            }
        }
    }
    let names: BTreeSet<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    for must in REQUIRED_ALERTS {
        if !names.contains(must) {
            errors.push(format!("no alert {must}"));
        }
    }
    // The forged-token alert matches every reason the code counts as forgery; the
    // compromised-key one the code's reason and report kind.
    let expr_of = |alert: &str| -> String {
        blocks
            .iter()
            .find(|(n, _)| n == alert)
            .and_then(|(_, l)| l.iter().find_map(|l| l.strip_prefix("expr:")))
            .unwrap_or("")
            .to_owned()
    };
    let forged = matcher_values(&expr_of("HopmeshForgedHopTokens"));
    for r in token_refusals().iter().filter(|r| r.is_forgery()) {
        if !forged.iter().any(|v| v == r.reason()) {
            errors.push(format!(
                "HopmeshForgedHopTokens misses reason {}",
                r.reason()
            ));
        }
    }
    if !forged
        .iter()
        .any(|v| v == ReportKind::ForgedTokens.as_str())
    {
        errors.push("HopmeshForgedHopTokens misses the forged_tokens report".into());
    }
    let compromised = matcher_values(&expr_of("HopmeshCompromisedKeyUse"));
    for v in [
        TokenRefusal::CompromisedKeyUse(0).reason(),
        ReportKind::CompromisedKeyUse.as_str(),
    ] {
        if !compromised.iter().any(|c| c == v) {
            errors.push(format!("HopmeshCompromisedKeyUse misses {v}"));
        }
    }
    if rule_names.len() < 6 {
        errors.push(format!("the rules name only {rule_names:?}"));
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_name_only_exposed_metrics() {
    let mesh = Mesh::start_configured(Settings::default(), "", &[], |_, c| {
        c.metrics = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    // One stream a → b (api), so the stream and byte counters move.
    let data = Arc::new(pattern(64 << 10, 3));
    let tcp = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80)
        .await
        .expect("socks connect");
    let back = tokio::time::timeout(Duration::from_secs(30), echo_through(tcp, data.clone()))
        .await
        .expect("in time")
        .expect("io");
    assert_eq!(back, *data);
    // A route c may not use: a counted node refusal.
    assert!(
        socks_connect(mesh.node("c").socks, "api.s1.mesh", 80)
            .await
            .is_err()
    );
    let admin = mesh
        .verifier
        .running
        .as_ref()
        .expect("running")
        .admin_addr
        .clone();
    admin_unauthorised(&admin).await;
    // Unauthenticated connections past the per-source budget: verifier connection refusals.
    let mut flood = Flooder::new(mesh.verifier.node_addr(), &mesh.verifier.pins);
    flood.open(MAX_UNAUTHENTICATED_PER_SOURCE + 2).await;
    // The verifier admits (or refuses) a connection after the client's handshake is done:
    // hold the flood until the refusals are counted.
    let refusals = || {
        let text = mesh.verifier.shared().metrics().render();
        text.contains("\nhopmesh_verifier_connection_refusals_total{")
    };
    for _ in 0..200 {
        if refusals() {
            break;
        }
        let _ = flood.alive().await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refusals(), "{}", mesh.verifier.shared().metrics().render());
    flood.shutdown().await;
    // With a's key towards b: one forged token (bad_mac; the connection stays up), then the
    // pair's seeds are reissued and the old generation is used (compromised_key_use, refused
    // and reported to the verifier).
    let id = |n: &str| mesh.node(n).handle.as_ref().expect("running").node.local;
    let (a, b) = (id("a"), id("b"));
    let b_addr = mesh.node("b").handle.as_ref().expect("running").quic_addr;
    let now = mesh.verifier.now();
    let grant = current_grant(
        &mesh
            .verifier
            .shared()
            .authority()
            .grants(&PairIds::new(a, b), now),
    );
    let epoch = EpochLength::DEFAULT.epoch_at(now);
    let api = MeshName::parse("api.s1.mesh", "mesh")
        .expect("name")
        .service_id();
    let client = ProtocolClient::connect(mesh.node("a").dir.path(), b, b_addr).await;
    let (mut st, mut rs, stream) = client.open().await.expect("stream");
    let mut forged = client.mint(&grant, epoch, api, stream, |_| {});
    forged[140] ^= 0x80;
    assert_eq!(
        ProtocolClient::send_on(&mut st, &mut rs, &forged).await,
        StreamOutcome::Refused
    );
    mesh.verifier
        .admin()
        .call(
            "POST",
            "/v1/reissue",
            Some(serde_json::json!({"a": "a", "b": "b"})),
        )
        .await
        .expect("reissue");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.try_stream(&grant, epoch, api, |_| {}).await,
        StreamOutcome::Refused
    );
    let reported = "hopmesh_verifier_reports_total{kind=\"compromised_key_use\"} 1";
    let mut seen = false;
    for _ in 0..200 {
        if mesh.verifier.shared().metrics().render().contains(reported) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "{}", mesh.verifier.shared().metrics().render());
    drop(client);
    // Revoke c: a and b apply revocation list 1.
    mesh.verifier
        .admin()
        .call("POST", "/v1/revoke", Some(serde_json::json!({"node": "c"})))
        .await
        .expect("revoke");
    // Applied: the version in the state first, then the list persisted, then observed.
    let scrape = |name: &str| {
        let addr = mesh
            .node(name)
            .handle
            .as_ref()
            .and_then(|h| h.metrics_addr)
            .expect("metrics address");
        async move {
            get(
                tokio::net::TcpStream::connect(addr).await.expect("connect"),
                "/metrics",
            )
            .await
        }
    };
    for name in ["a", "b"] {
        let mut applied = false;
        for _ in 0..200 {
            if scrape(name)
                .await
                .contains("\nhopmesh_node_revocation_propagation_seconds_count 1\n")
            {
                applied = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(applied, "{name}: {}", mesh.node(name).show());
    }

    let mut exposed = Exposition::default();
    let mut scraped = BTreeMap::new();
    for name in mesh.nodes.keys() {
        let text = scrape(name).await;
        Exposition::parse(&text, &mut exposed);
        scraped.insert(name.clone(), text);
    }
    let verifier = admin_get(&admin, "/metrics").await;
    Exposition::parse(&verifier, &mut exposed);

    // The new gauges carry the state `ctl show` reports.
    for name in ["a", "b"] {
        let text = &scraped[name];
        let show = mesh.node(name).show();
        let not_after = show["attestation"]["not_after"]
            .as_u64()
            .expect("not_after");
        let now = show["now"].as_u64().expect("now");
        assert_eq!(
            value(text, "hopmesh_node_attestation_expires_at_seconds"),
            not_after as f64
        );
        assert_eq!(
            value(text, "hopmesh_node_attestation_remaining_seconds"),
            not_after as f64 - now as f64,
            "the test clock stands still"
        );
        assert!(not_after > now + 60, "{show}");
        assert_eq!(value(text, "hopmesh_node_attestation_valid"), 1.0);
        assert_eq!(value(text, "hopmesh_node_verifier_connected"), 1.0);
        assert_eq!(value(text, "hopmesh_node_revocation_version"), 1.0);
        // The list was issued and applied on the same (manual) clock: one observation of 0.
        assert_eq!(
            value(text, "hopmesh_node_revocation_propagation_seconds_count"),
            1.0
        );
        assert_eq!(
            value(text, "hopmesh_node_revocation_propagation_seconds_sum"),
            0.0
        );
    }
    assert_eq!(
        value(&scraped["a"], "hopmesh_node_streams_opened_total"),
        1.0
    );
    assert_eq!(
        value(&scraped["b"], "hopmesh_node_streams_accepted_total"),
        1.0
    );
    assert_eq!(
        value(&scraped["a"], "hopmesh_node_bytes_out_total"),
        data.len() as f64
    );
    assert!(
        scraped["c"].contains("\nhopmesh_node_refusals_total{reason="),
        "{}",
        scraped["c"]
    );
    for want in [
        "hopmesh_node_refusals_total{reason=\"bad_mac\"} 1",
        "hopmesh_node_refusals_total{reason=\"compromised_key_use\"} 1",
    ] {
        assert!(scraped["b"].contains(want), "{want}: {}", scraped["b"]);
    }
    assert!(
        verifier.contains("\nhopmesh_verifier_connection_refusals_total{reason="),
        "{verifier}"
    );
    assert_eq!(
        value(&verifier, "hopmesh_verifier_revocation_list_version"),
        1.0
    );
    assert_eq!(value(&verifier, "hopmesh_verifier_revocations_total"), 1.0);
    assert!(
        verifier.contains("hopmesh_verifier_refusals_total{reason=\"admin_unauthorized\"} 1"),
        "{verifier}"
    );

    let dashboard = std::fs::read_to_string(repo_file(DASHBOARD)).expect("dashboard");
    let alerts = std::fs::read_to_string(repo_file(ALERTS)).expect("alert rules");
    let errors = check_files(&dashboard, &alerts, &exposed);
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The checks can fail: a misspelt metric, an unknown reason, a missing `for:`.
    let broken = [
        (
            dashboard.replacen(
                "hopmesh_node_bytes_in_total",
                "hopmesh_node_bytes_inn_total",
                1,
            ),
            alerts.clone(),
            "hopmesh_node_bytes_inn_total",
        ),
        (
            dashboard.clone(),
            alerts.replacen(
                "hopmesh_node_verifier_connected",
                "hopmesh_node_verifier_connectd",
                1,
            ),
            "hopmesh_node_verifier_connectd",
        ),
        (
            dashboard.clone(),
            alerts.replacen("bad_mac", "bad_mack", 1),
            "bad_mack",
        ),
        (
            dashboard.clone(),
            alerts.replacen("        for: 1m\n", "", 1),
            "no for",
        ),
    ];
    for (d, a, want) in broken {
        let errors = check_files(&d, &a, &exposed);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "a break naming `{want}` went unnoticed: {errors:?}"
        );
    }
    mesh.shutdown().await;
}
