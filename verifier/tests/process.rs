//! The real `hopmesh-verifier` binary: init, serve, CLI administration, and a revoke that
//! survives `kill -9` right after its acknowledgement.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hopmesh_protocol::enrollment::{HostFacts, Push, Refusal};
use hopmesh_protocol::ids::Measurement;
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::Clock;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::clock::SystemClock;
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::verifier_client::{ClientError, VerifierClient};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hopmesh-verifier");

/// Kills the server on drop, so a failing test leaves no process behind.
struct Server(Child, SocketAddr);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cli");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn serve(dir: &Path) -> Server {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(["serve", "--policy"])
        .arg(dir.join("policy.toml"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("HOPMESH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn verifier");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    let ready: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
    let addr = ready["node_addr"]
        .as_str()
        .expect("node_addr")
        .parse()
        .expect("addr");
    Server(child, addr)
}

async fn client(addr: SocketAddr, id: &Identity, pins: &Pins) -> (quinn::Endpoint, VerifierClient) {
    let ep = hopmesh_transport::quic::endpoint(UdpSocket::bind("127.0.0.1:0").expect("bind"), None)
        .expect("endpoint");
    let c = VerifierClient::connect(&ep, addr, id, pins)
        .await
        .expect("connect");
    (ep, c)
}

fn secret(v: &Value) -> JoinSecret {
    let mut b = [0u8; 32];
    let hex = v["secret"].as_str().expect("secret");
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        b[i] = u8::from_str_radix(std::str::from_utf8(chunk).expect("utf8"), 16).expect("hex");
    }
    JoinSecret::from_bytes(b)
}

/// The measurement the test's nodes present.
const MEASUREMENT: Measurement = Measurement([1; 32]);

/// The standard test policy (`tests/fixtures/standard-policy.toml`, the fixture every test
/// uses) pinned to `m`. Included as text: the verifier cannot dev-depend on `hopmesh-tests`,
/// which depends on the verifier.
fn standard_policy(m: Measurement) -> String {
    let text = include_str!("../../tests/fixtures/standard-policy.toml")
        .replace("{measurement}", &m.to_string())
        .replace("{api}", "127.0.0.1:1")
        .replace("{db}", "127.0.0.1:1")
        .replace("{web}", "127.0.0.1:1");
    assert!(
        !text.contains("\"{"),
        "a placeholder of the policy fixture is not filled"
    );
    text
}

fn facts() -> HostFacts {
    HostFacts {
        hostname: BoundedString::truncated("t"),
        platform: BoundedString::truncated("linux"),
        version: BoundedString::truncated("0"),
    }
}

#[tokio::test]
async fn revoke_survives_kill_9_right_after_the_acknowledgement() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let pins: Pins = serde_json::from_value(cli(&dir, &["init"])).expect("pins");
    // init refuses to overwrite.
    let again = Command::new(BIN)
        .arg("--data-dir")
        .arg(&dir)
        .arg("init")
        .output()
        .expect("run");
    assert!(!again.status.success());
    std::fs::write(dir.join("policy.toml"), standard_policy(MEASUREMENT)).expect("policy");
    let check = cli(
        &dir,
        &[
            "policy",
            "check",
            dir.join("policy.toml").to_str().expect("utf8"),
        ],
    );
    assert_eq!(check["nodes"], 3, "a, b and c");

    let server = serve(&dir);
    let (a, b) = (
        Identity::generate().expect("id"),
        Identity::generate().expect("id"),
    );
    let now = || SystemClock::default().now();
    let addrs = || BoundedVec::new(vec![BoundedString::truncated("127.0.0.1:4433")]).expect("fits");
    for (id, name) in [(&a, "a"), (&b, "b")] {
        let token = cli(
            &dir,
            &["join-token", "create", "--name", name, "--ttl", "60"],
        );
        let (_ep, c) = client(server.1, id, &pins).await;
        c.enroll(secret(&token), MEASUREMENT, facts(), addrs(), now())
            .await
            .expect("enroll");
    }
    let revoked = cli(&dir, &["revoke", "a"]);
    assert_eq!(revoked["revocation_version"], 1);
    // Acknowledged: kill -9 at once, no chance to flush anything else.
    let mut server = server;
    server.0.kill().expect("SIGKILL");
    server.0.wait().expect("reap");
    drop(server);

    let server = serve(&dir);
    let nodes = cli(&dir, &["nodes"]);
    let a_row = nodes
        .as_array()
        .expect("list")
        .iter()
        .find(|n| n["name"] == "a")
        .expect("a listed")
        .clone();
    assert!(a_row["revoked_at"].is_u64(), "revocation lost: {a_row}");
    let (_ep, ca) = client(server.1, &a, &pins).await;
    match ca.refresh(MEASUREMENT, addrs(), now()).await {
        Err(ClientError::Refused(Refusal::Revoked)) => {}
        other => panic!("revoked node refreshed after restart: {other:?}"),
    }
    // b still gets the signed list naming a.
    let (_ep, cb) = client(server.1, &b, &pins).await;
    let mut pushes = cb.subscribe().await.expect("subscribe");
    let mut saw_list = false;
    while let Ok(Ok(Some(p))) =
        tokio::time::timeout(Duration::from_millis(500), pushes.next()).await
    {
        if let Push::Revocations { list } = p {
            let keys = pins.key_set().expect("keys");
            let update = hopmesh_protocol::attestation::verify_revocation_list(&list, &keys, None)
                .expect("verifies");
            let hopmesh_protocol::attestation::RevocationUpdate::Newer(l) = update else {
                panic!("newer")
            };
            assert_eq!(l.version, 1);
            assert!(l.is_revoked(&a.node_id()));
            saw_list = true;
        }
    }
    assert!(saw_list, "the revocation list must be pushed after restart");
    let verified = cli(&dir, &["audit", "verify"]);
    assert_eq!(verified["ok"], true);
    drop(server);
}
