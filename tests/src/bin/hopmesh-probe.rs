//! `hopmesh-probe ADDR NODE_ID`: tries to reach a node's overlay with a fresh key that has
//! no attestation (the attacker of the netns suite). Prints `refused` and exits 0 when the
//! node refuses; prints `ACCEPTED` and exits 1 if a stream got an answer. Bounded to 10 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_transport::identity::{Identity, SNI};
use hopmesh_transport::quic::{endpoint, quinn_client, transport_config};
use hopmesh_transport::tls::{self, ALPN_DATA, AnyKey, ServerExpectation};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(node)) = (
        args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(2).and_then(|n| n.parse().ok()),
    ) else {
        eprintln!("usage: hopmesh-probe ADDR NODE_ID");
        return std::process::ExitCode::from(2);
    };
    let attempt = async {
        let id = Identity::generate().map_err(|e| e.to_string())?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| "bind")?;
        let ep = endpoint(
            std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?,
            None,
        )
        .map_err(|e| e.to_string())?;
        let tls = tls::client_config(
            &id,
            ALPN_DATA,
            ServerExpectation::Node(node, Arc::new(AnyKey)),
        )
        .map_err(|e| e.to_string())?;
        let cfg = quinn_client(
            tls,
            Arc::new(transport_config(
                Duration::from_secs(5),
                Duration::from_secs(1),
            )),
        )
        .map_err(|e| e.to_string())?;
        let conn = ep
            .connect_with(cfg, addr, SNI)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        s.write_all(&[0u8; 200]).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(())) => {
            println!("ACCEPTED");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("refused: {e}");
            std::process::ExitCode::SUCCESS
        }
        Err(_) => {
            println!("refused: timed out");
            std::process::ExitCode::SUCCESS
        }
    }
}
