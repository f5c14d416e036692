//! The admin API's transport, through the real binary: a Unix socket (0600) by default, TCP only
//! on loopback, and a CLI that never sends the admin token to a listener that cannot prove it
//! holds it (a stale `admin.addr` after a crash, with another process on the old port).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hopmesh-verifier");

/// Kills the server on drop, so a failing test leaves no process behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn init(dir: &Path) {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("init")
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = include_str!("../../tests/fixtures/standard-policy.toml")
        .replace("{measurement}", &"01".repeat(32))
        .replace("{api}", "127.0.0.1:1")
        .replace("{db}", "127.0.0.1:1")
        .replace("{web}", "127.0.0.1:1");
    std::fs::write(dir.join("policy.toml"), policy).expect("policy");
}

fn serve_cmd(dir: &Path, admin: Option<&str>) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(dir)
        .args(["serve", "--policy"])
        .arg(dir.join("policy.toml"))
        .args(["--listen", "127.0.0.1:0"]);
    if let Some(a) = admin {
        c.args(["--admin-listen", a]);
    }
    c.env("HOPMESH_LOG", "warn");
    c
}

/// Starts `serve` and waits for its ready line; returns the admin address it printed.
fn serve(dir: &Path, admin: Option<&str>) -> (Server, String) {
    let mut child = serve_cmd(dir, admin)
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
    let admin = ready["admin_addr"].as_str().expect("admin_addr").to_owned();
    (Server(child), admin)
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run cli")
}

#[test]
fn admin_api_is_a_0600_unix_socket_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path());
    let (server, admin) = serve(dir.path(), None);
    let sock = dir.path().join("admin.sock");
    assert_eq!(admin, format!("unix:{}", sock.display()));
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    let out = cli(dir.path(), &["nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(nodes.as_array().is_some_and(Vec::is_empty), "{nodes}");

    // The server checks the token itself too (a client that skips the proof, or a wrong one).
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /v1/nodes HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    drop(server);
}

#[test]
fn admin_api_off_loopback_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path());
    for bad in ["0.0.0.0:0", "[::]:0"] {
        let out = serve_cmd(dir.path(), Some(bad))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(err.contains("not a loopback address"), "{bad}: {err}");
    }
}

/// A verifier dies (kill -9, `admin.addr` left behind); another process listens on its old
/// admin port and answers like an admin API would. The CLI must refuse before sending the
/// token. (Before the proof, the CLI sent `Authorization: Bearer <token>` to whatever listened.)
#[test]
fn cli_never_sends_the_token_to_a_stale_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path());
    let (mut server, admin) = serve(dir.path(), Some("127.0.0.1:0"));
    let token = std::fs::read_to_string(dir.path().join("admin.token")).expect("token");
    // Works while the real verifier runs, over TCP too.
    let out = cli(dir.path(), &["nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    server.0.kill().expect("kill -9");
    server.0.wait().expect("reap");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin.addr")).expect("stale admin.addr"),
        admin
    );
    // The impostor: takes the port, answers every request with a plausible JSON body, and
    // records every byte it receives.
    let listener = std::net::TcpListener::bind(&admin).expect("rebind the old admin port");
    listener.set_nonblocking(true).expect("nonblocking");
    let impostor = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The CLI makes one connection per call: serve the first, then stop.
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("timeout");
                    let mut buf = [0u8; 4096];
                    // Answer each request head, as an HTTP/1.1 keep-alive server would.
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        let body = format!("{{\"proof\":\"{}\"}}", "00".repeat(32));
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        seen
    });
    let out = cli(dir.path(), &["revoke", "api"]);
    let seen = impostor.join().expect("impostor thread");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the CLI accepted an impostor");
    assert!(err.contains("did not prove"), "{err}");
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.contains("/v1/whoami"),
        "the impostor saw no request: {seen:?}"
    );
    assert!(
        !seen.contains(token.trim()),
        "the admin token reached the impostor: {seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("authorization"),
        "{seen}"
    );
}
