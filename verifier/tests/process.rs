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

/// Runs the CLI and returns its output whatever the exit status.
fn cli_output(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cli")
}

/// `serve` must refuse to start: returns its stderr (kills it if it started after all).
fn serve_refuses(dir: &Path) -> String {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(["serve", "--policy"])
        .arg(dir.join("policy.toml"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verifier");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "serve exited 0");
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
                .expect("stderr");
            return err;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started on a log that does not reach its anchor");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Init, policy, serve, and enroll `a` and `b`.
async fn enrolled_pair(dir: &Path) -> (Server, Pins) {
    let pins: Pins = serde_json::from_value(cli(dir, &["init"])).expect("pins");
    std::fs::write(dir.join("policy.toml"), standard_policy(MEASUREMENT)).expect("policy");
    let server = serve(dir);
    let now = || SystemClock::default().now();
    let addrs = || BoundedVec::new(vec![BoundedString::truncated("127.0.0.1:4433")]).expect("fits");
    for name in ["a", "b"] {
        let token = cli(
            dir,
            &["join-token", "create", "--name", name, "--ttl", "60"],
        );
        let id = Identity::generate().expect("id");
        let (_ep, c) = client(server.1, &id, &pins).await;
        c.enroll(secret(&token), MEASUREMENT, facts(), addrs(), now())
            .await
            .expect("enroll");
    }
    (server, pins)
}

#[tokio::test]
async fn a_revoke_on_a_full_disk_fails_loudly_and_is_not_acknowledged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    std::fs::create_dir_all(&dir).expect("dir");
    // Every audit write fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", dir.join("audit.jsonl")).expect("symlink");
    let (server, _pins) = enrolled_pair(&dir).await;
    let out = cli_output(&dir, &["revoke", "a"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "revoke acknowledged with no audit record: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("No space left on device") && stderr.contains("nothing was committed"),
        "{stderr}"
    );
    // Not committed either: after a restart on a working disk, a is still live.
    drop(server);
    std::fs::remove_file(dir.join("audit.jsonl")).expect("rm symlink");
    let server = serve(&dir);
    let nodes = cli(&dir, &["nodes"]);
    let a = nodes
        .as_array()
        .expect("list")
        .iter()
        .find(|n| n["name"] == "a")
        .expect("a listed")
        .clone();
    assert!(
        a["revoked_at"].is_null(),
        "a refused revoke was committed: {a}"
    );
    // And with the disk back, the revoke goes through.
    assert_eq!(cli(&dir, &["revoke", "a"])["revocation_version"], 1);
    drop(server);
}

#[tokio::test]
async fn audit_verify_catches_a_truncated_tail_and_a_rewritten_log() {
    use hopmesh_transport::audit::{AuditLog, CHECKPOINT_EVENT};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    std::fs::create_dir_all(&dir).expect("dir");
    let (server, _pins) = enrolled_pair(&dir).await;
    let revoked = cli(&dir, &["revoke", "a"]);
    assert_eq!(revoked["revocation_version"], 1);
    let verified = cli(&dir, &["audit", "verify"]);
    assert_eq!(verified["ok"], true);
    let anchored = verified["anchored_seq"]
        .as_u64()
        .expect("anchored at the revoke");
    drop(server);
    let log = dir.join("audit.jsonl");
    let original = std::fs::read_to_string(&log).expect("read");
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() as u64 >= anchored);

    // Cut the tail just below the anchored head: the chain is valid, the anchor is not met.
    let cut: String = lines[..usize::try_from(anchored - 1).expect("fits")]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, cut).expect("write");
    hopmesh_transport::audit::verify(&log).expect("the chain alone cannot tell");
    let out = cli_output(&dir, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "a truncated tail verified");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("removed from the tail"), "{stderr}");
    assert!(serve_refuses(&dir).contains("removed from the tail"));

    // Rewrite the whole log: drop the revoke and the checkpoints, recompute every hash.
    std::fs::remove_file(&log).expect("rm");
    let (mut forged, _) = AuditLog::open(&log).expect("open");
    for l in &lines {
        let mut v: Value = serde_json::from_str(l).expect("json");
        let obj = v.as_object_mut().expect("object");
        let event = obj["event"].as_str().expect("event").to_owned();
        if event == "revoke" || event == CHECKPOINT_EVENT {
            continue;
        }
        let ts = obj["ts"].as_u64().expect("ts");
        for k in ["seq", "ts", "event", "prev", "hash"] {
            obj.remove(k);
        }
        forged.record(ts, &event, obj.clone()).expect("record");
    }
    // Padded to the anchored length, so only the hash can tell.
    while forged.head().seq < anchored + 2 {
        forged
            .record(1, "enroll", serde_json::Map::new())
            .expect("record");
    }
    drop(forged);
    hopmesh_transport::audit::verify(&log).expect("the forger's chain is valid");
    let out = cli_output(&dir, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "a rewritten log verified");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rewritten"), "{stderr}");
    assert!(serve_refuses(&dir).contains("rewritten"));

    // The true log still verifies and serves.
    std::fs::write(&log, &original).expect("restore");
    assert_eq!(cli(&dir, &["audit", "verify"])["ok"], true);
    drop(serve(&dir));
}

#[test]
fn serve_refuses_a_node_connection_budget_out_of_range() {
    let dir = tempfile::tempdir().expect("temp dir");
    for bad in ["0", "1048577"] {
        let out = cli_output(
            dir.path(),
            &[
                "serve",
                "--policy",
                "/nonexistent.toml",
                "--max-node-connections",
                bad,
            ],
        );
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--max-node-connections must be 1 to 1048576"),
            "{bad}: {err}"
        );
    }
}
