//! First contact: create the node key (0600), enroll with a one-time join secret, store the
//! pins and the attestation.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use hopmesh_protocol::enrollment::HostFacts;
use hopmesh_protocol::ids::Measurement;
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::verifier_client::VerifierClient;

use crate::NodeError;
use crate::datadir::{NodeDir, write_atomic};

/// What enrollment produced.
#[derive(Debug)]
pub struct Enrolled {
    /// The node id.
    pub node_id: hopmesh_protocol::ids::NodeId,
    /// Attested name.
    pub name: String,
    /// Attestation expiry.
    pub not_after: UnixTime,
}

/// Enrolls the node in `data_dir` (creating its key if missing) at the verifier `addr`.
pub async fn enroll(
    data_dir: &Path,
    addr: SocketAddr,
    join_secret: JoinSecret,
    pins: &Pins,
    advertise: &[String],
    measurement: Measurement,
    now: UnixTime,
) -> Result<Enrolled, NodeError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| NodeError::io(format!("create {}", data_dir.display()), e))?;
    let dir = NodeDir::new(data_dir);
    let identity = if dir.key().exists() {
        Identity::load(&dir.key())?
    } else {
        let id = Identity::generate()?;
        id.save_new(&dir.key())?;
        id
    };
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(|_| NodeError::Config("bind".into()))?;
    let socket = UdpSocket::bind(bind).map_err(|e| NodeError::io("bind udp", e))?;
    let endpoint = hopmesh_transport::quic::endpoint(socket, None)?;
    let client = VerifierClient::connect(&endpoint, addr, &identity, pins).await?;
    let facts = HostFacts {
        hostname: BoundedString::truncated(
            std::fs::read_to_string("/etc/hostname")
                .unwrap_or_default()
                .trim(),
        ),
        platform: BoundedString::truncated(&format!(
            "{}/{}",
            std::env::consts::OS,
            std::env::consts::ARCH
        )),
        version: BoundedString::truncated(env!("CARGO_PKG_VERSION")),
    };
    let addresses = BoundedVec::new(
        advertise
            .iter()
            .take(4)
            .map(|a| BoundedString::truncated(a))
            .collect(),
    )
    .unwrap_or_default();
    let (envelope, v) = client
        .enroll(join_secret, measurement, facts, addresses, now)
        .await?;
    client.close();
    endpoint.wait_idle().await;
    let pins_json =
        serde_json::to_string_pretty(pins).map_err(|e| NodeError::Config(e.to_string()))?;
    write_atomic(&dir.file("pins.json"), pins_json.as_bytes())
        .map_err(|e| NodeError::io("write pins.json", e))?;
    write_atomic(&dir.file("attestation.bin"), &envelope)
        .map_err(|e| NodeError::io("write attestation.bin", e))?;
    Ok(Enrolled {
        node_id: identity.node_id(),
        name: v.get().name.to_string(),
        not_after: v.get().not_after,
    })
}
