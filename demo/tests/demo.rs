//! The README's main command works: the demo comes up, serves the allowed name, refuses the
//! denied one, and stops cleanly on Ctrl-C (SIGINT).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the demo if the test fails half-way.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn socks_get(socks: SocketAddr, host: &str) -> Result<String, u8> {
    let mut tcp = TcpStream::connect(socks).map_err(|_| 0xFF)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|_| 0xFF)?;
    tcp.write_all(&[5, 1, 0]).map_err(|_| 0xFF)?;
    let mut sel = [0u8; 2];
    tcp.read_exact(&mut sel).map_err(|_| 0xFF)?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&[0, 80]);
    tcp.write_all(&req).map_err(|_| 0xFF)?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).map_err(|_| 0xFF)?;
    if reply[1] != 0 {
        return Err(reply[1]);
    }
    tcp.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|_| 0xFF)?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).map_err(|_| 0xFF)?;
    Ok(out)
}

#[test]
fn demo_serves_allowed_refuses_denied_and_stops_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopmesh-demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut demo = Demo(child);
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let mut socks = None;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(addr) = line.strip_prefix("SOCKS endpoint of node edge (segment web): ") {
            socks = Some(addr.parse::<SocketAddr>().expect("address"));
        }
        if line.starts_with("Ctrl-C to stop") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "demo too slow to start"
        );
    }
    let socks = socks.expect("the demo prints its SOCKS address");
    let body = socks_get(socks, "api.payments.mesh").expect("allowed request");
    assert!(body.contains("hello from the api service"), "{body}");
    assert_eq!(socks_get(socks, "ledger.payments.mesh").err(), Some(2));

    let status = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = demo.0.try_wait().expect("wait") {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}
