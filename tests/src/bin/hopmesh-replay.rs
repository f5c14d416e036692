//! `hopmesh-replay DATA_DIR VERIFIER_ADDR PEER_ADDR PEER_ID SERVICE_NAME`: acting as the node
//! whose data directory is DATA_DIR (its key, attestation and pins), gets its pair seeds from
//! the verifier like any node, opens two connections to the peer, sends a valid token on the
//! first and replays the same bytes on the second. Prints `first=<outcome> replay=<outcome>`;
//! exits 0 only if the first was accepted and the replay refused. Bounded to 20 s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::hop_token::{EpochLength, GenerationGrant};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::routing::MeshName;
use hopmesh_protocol::time::Clock;
use hopmesh_tests::attacker::{ProtocolClient, StreamOutcome};
use hopmesh_transport::clock::SystemClock;
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::verifier_client::VerifierClient;

async fn run(
    dir: PathBuf,
    verifier: SocketAddr,
    peer_addr: SocketAddr,
    peer: NodeId,
    service: &str,
) -> Result<(StreamOutcome, StreamOutcome), String> {
    let identity = Identity::load(&dir.join("node.key")).map_err(|e| e.to_string())?;
    let pins: Pins = serde_json::from_str(
        &std::fs::read_to_string(dir.join("pins.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let bind: SocketAddr = "0.0.0.0:0".parse().map_err(|_| "bind")?;
    let ep = hopmesh_transport::quic::endpoint(
        std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?,
        None,
    )
    .map_err(|e| e.to_string())?;
    let client = VerifierClient::connect(&ep, verifier, &identity, &pins)
        .await
        .map_err(|e| e.to_string())?;
    let mut pushes = client.subscribe().await.map_err(|e| e.to_string())?;
    let (mut epoch_len, mut grant): (EpochLength, Option<GenerationGrant>) =
        (EpochLength::DEFAULT, None);
    let now = SystemClock::default().now();
    while grant.is_none() {
        match pushes.next().await.map_err(|e| e.to_string())? {
            Some(Push::Config(c)) => {
                epoch_len = EpochLength::from_secs(c.epoch_secs).map_err(|e| e.to_string())?
            }
            Some(Push::Seeds { peer: p, grants }) if p == peer => {
                grant = grants
                    .iter()
                    .rev()
                    .find(|g| g.valid_from <= now && now < g.valid_until)
                    .cloned();
            }
            Some(_) => {}
            None => return Err("verifier closed the push stream".into()),
        }
    }
    let grant = grant.ok_or("no seed")?;
    let service = MeshName::parse(service, "mesh")
        .map_err(|e| e.to_string())?
        .service_id();
    let epoch = epoch_len.epoch_at(SystemClock::default().now());
    let c1 = ProtocolClient::connect(&dir, peer, peer_addr).await;
    let c2 = ProtocolClient::connect(&dir, peer, peer_addr).await;
    let (mut s1, mut r1, id1) = c1.open().await.ok_or("stream")?;
    let (mut s2, mut r2, id2) = c2.open().await.ok_or("stream")?;
    if id1 != id2 {
        return Err("stream ids differ".into());
    }
    let bytes = c1.mint(&grant, epoch, service, id1, |_| {});
    let first = ProtocolClient::send_on(&mut s1, &mut r1, &bytes).await;
    let replay = ProtocolClient::send_on(&mut s2, &mut r2, &bytes).await;
    Ok((first, replay))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a: Vec<String> = std::env::args().collect();
    let parsed = (
        a.get(1).map(PathBuf::from),
        a.get(2).and_then(|x| x.parse().ok()),
        a.get(3).and_then(|x| x.parse().ok()),
        a.get(4).and_then(|x| x.parse().ok()),
        a.get(5),
    );
    let (Some(dir), Some(verifier), Some(peer_addr), Some(peer), Some(service)) = parsed else {
        eprintln!("usage: hopmesh-replay DATA_DIR VERIFIER_ADDR PEER_ADDR PEER_ID SERVICE_NAME");
        return std::process::ExitCode::from(2);
    };
    match tokio::time::timeout(
        Duration::from_secs(20),
        run(dir, verifier, peer_addr, peer, service),
    )
    .await
    {
        Ok(Ok((first, replay))) => {
            println!("first={first:?} replay={replay:?}");
            if first == StreamOutcome::Status(0) && replay == StreamOutcome::Refused {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Ok(Err(e)) => {
            println!("error: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            println!("error: timed out");
            std::process::ExitCode::FAILURE
        }
    }
}
