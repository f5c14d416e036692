//! `hopmesh-stall DATA_DIR PEER_ADDR PEER_ID SECS`: acting as the node whose data directory is
//! DATA_DIR (its key and attestation, renewed from that file as an honest peer would), connects
//! to the peer, reads its Hello and then never reads the control stream again (a 256-byte
//! stream window: the peer's next renewal finds no credit). Waits at most SECS (≤ 120) for the
//! peer to close the connection; prints the close reason. Exits 0 only if the peer closed it
//! with CONTROL_STALLED.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hopmesh_protocol::codes::CONTROL_STALLED;
use hopmesh_protocol::ids::NodeId;
use hopmesh_tests::attacker::ProtocolClient;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (
        args.get(1).map(PathBuf::from),
        args.get(2).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(3).and_then(|n| n.parse::<NodeId>().ok()),
        args.get(4).and_then(|s| s.parse::<u64>().ok()),
    );
    let (Some(dir), Some(addr), Some(peer), Some(secs)) = parsed else {
        eprintln!("usage: hopmesh-stall DATA_DIR PEER_ADDR PEER_ID SECS");
        return std::process::ExitCode::from(2);
    };
    let bad = ProtocolClient::connect_never_reading(&dir, peer, addr).await;
    let secs = secs.min(120);
    let closed = tokio::time::timeout(Duration::from_secs(secs), bad.conn.closed()).await;
    match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(CONTROL_STALLED) =>
        {
            println!("closed CONTROL_STALLED");
            std::process::ExitCode::SUCCESS
        }
        Ok(other) => {
            println!("closed otherwise: {other}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            println!("still open after {secs} s");
            std::process::ExitCode::FAILURE
        }
    }
}
