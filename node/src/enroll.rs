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

/// The environment variable that may hold the join secret.
pub const JOIN_TOKEN_ENV: &str = "HOPMESH_JOIN_TOKEN";

/// Most bytes read from a join-secret file or stdin (64 hex digits and whitespace fit).
pub const JOIN_TOKEN_READ_CAP: u64 = 1024;

/// Where the join secret comes from: never argv (other users can read a process's arguments
/// in `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTokenSource {
    /// A file, read once.
    File(std::path::PathBuf),
    /// Standard input (`--join-token-file -`).
    Stdin,
    /// The environment variable [`JOIN_TOKEN_ENV`].
    Env,
}

/// Reads the join secret: from `file` (`-` is stdin) if given, else from `env` (the value of
/// [`JOIN_TOKEN_ENV`]). Returns where it came from for messages.
pub fn read_join_secret(
    file: Option<&Path>,
    env: Option<String>,
    stdin: impl std::io::Read,
) -> Result<(JoinSecret, JoinTokenSource), String> {
    use std::io::Read;
    let (text, source) = match file {
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            stdin
                .take(JOIN_TOKEN_READ_CAP)
                .read_to_string(&mut s)
                .map_err(|e| format!("read the join secret from stdin: {e}"))?;
            (s, JoinTokenSource::Stdin)
        }
        Some(p) => {
            let f = std::fs::File::open(p)
                .map_err(|e| format!("read the join secret from {}: {e}", p.display()))?;
            let mut s = String::new();
            f.take(JOIN_TOKEN_READ_CAP)
                .read_to_string(&mut s)
                .map_err(|e| format!("read the join secret from {}: {e}", p.display()))?;
            (s, JoinTokenSource::File(p.to_owned()))
        }
        None => match env {
            Some(v) => (v, JoinTokenSource::Env),
            None => {
                return Err(format!(
                    "no join secret: pass --join-token-file PATH (or - for stdin), or set {JOIN_TOKEN_ENV}"
                ));
            }
        },
    };
    let mut b = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut b).map_err(|_| {
        let from = match &source {
            JoinTokenSource::File(p) => p.display().to_string(),
            JoinTokenSource::Stdin => "stdin".into(),
            JoinTokenSource::Env => JOIN_TOKEN_ENV.into(),
        };
        format!("the join secret (from {from}) must be 64 hex digits")
    })?;
    Ok((JoinSecret::from_bytes(b), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn join_secret_from_file_stdin_or_env_never_argv() {
        let dir = tempfile::tempdir().expect("must succeed");
        let f = dir.path().join("secret");
        std::fs::write(&f, format!("{HEX}\n")).expect("must succeed");
        let empty: &[u8] = b"";
        let (s, src) =
            read_join_secret(Some(&f), Some("ignored".into()), empty).expect("must succeed");
        assert_eq!(hex::encode(s.expose()), HEX);
        assert_eq!(src, JoinTokenSource::File(f.clone()));

        let (s, src) =
            read_join_secret(Some(Path::new("-")), None, format!("  {HEX}\n").as_bytes())
                .expect("must succeed");
        assert_eq!(hex::encode(s.expose()), HEX);
        assert_eq!(src, JoinTokenSource::Stdin);

        let (s, src) = read_join_secret(None, Some(HEX.into()), empty).expect("must succeed");
        assert_eq!(hex::encode(s.expose()), HEX);
        assert_eq!(src, JoinTokenSource::Env);

        let err = read_join_secret(None, None, empty).expect_err("must fail");
        assert!(err.contains("--join-token-file"), "{err}");
        let err = read_join_secret(None, Some("xyz".into()), empty).expect_err("must fail");
        assert!(
            err.contains("HOPMESH_JOIN_TOKEN") && err.contains("64 hex"),
            "{err}"
        );
        let err = read_join_secret(Some(&dir.path().join("missing")), None, empty)
            .expect_err("must fail");
        assert!(err.contains("missing"), "{err}");
        // A huge stdin is read only up to the cap, then refused as not a secret.
        let big = vec![b'a'; 10 * 1024 * 1024];
        let err = read_join_secret(Some(Path::new("-")), None, &big[..]).expect_err("must fail");
        assert!(err.contains("64 hex"), "{err}");
    }
}
