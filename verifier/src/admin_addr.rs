//! Where the admin API listens, and how its client knows it reached this verifier.
//!
//! By default the admin API is a Unix socket, `admin.sock` in the data directory, mode 0600
//! (the data directory itself is 0700): only the verifier's user can reach it. A TCP address
//! is accepted only on loopback (`127.0.0.0/8`, `::1`); anything else is refused at start-up.
//!
//! `serve` writes the address it listens on to `admin.addr`; after a crash that file is stale,
//! and whatever listens on the old port now (another user's process) would receive the admin
//! token with the next CLI call. So the client never sends the token before the server proved
//! it holds it: the client sends a fresh random challenge to `GET /v1/whoami` (no token), the
//! server answers `HMAC-SHA256(token, "hopmesh-admin-proof/1" ‖ address ‖ challenge)` over the
//! address the client dialled, and only a matching proof lets the client send `Authorization`.
//! Binding the proof to the address stops a listener on a stale port from relaying the
//! challenge to the real verifier on its new address.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::hmac;

/// The file name of the default admin socket inside the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Context string of the admin server's proof.
const PROOF_CONTEXT: &[u8] = b"hopmesh-admin-proof/1";

/// Length of the client's challenge, in bytes.
pub const CHALLENGE_LEN: usize = 32;

/// Where the admin API listens: written to `admin.addr` as `unix:PATH` or `HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAddr {
    /// A Unix socket.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Why an admin address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminAddrError {
    /// A TCP address off loopback.
    #[error(
        "the admin API listens only on a Unix socket or loopback TCP; {0} is not a loopback address"
    )]
    NotLoopback(SocketAddr),
    /// Neither `unix[:PATH]` nor `HOST:PORT`.
    #[error("`{0}` is neither unix[:PATH] nor a loopback IP:PORT")]
    Unparsable(String),
}

impl AdminAddr {
    /// Parses `--admin-listen` / `admin.addr`: `unix` (the default socket in `data_dir`),
    /// `unix:PATH`, or a loopback `IP:PORT`.
    pub fn parse(s: &str, data_dir: &Path) -> Result<Self, AdminAddrError> {
        let s = s.trim();
        if s == "unix" {
            return Ok(Self::Unix(data_dir.join(ADMIN_SOCKET)));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AdminAddrError::Unparsable(s.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| AdminAddrError::Unparsable(s.to_owned()))?;
        Self::tcp(addr)
    }

    /// A TCP address, refused unless on loopback.
    pub fn tcp(addr: SocketAddr) -> Result<Self, AdminAddrError> {
        if addr.ip().is_loopback() {
            Ok(Self::Tcp(addr))
        } else {
            Err(AdminAddrError::NotLoopback(addr))
        }
    }
}

/// A bound admin listener.
#[derive(Debug)]
pub enum AdminListener {
    /// TCP (loopback).
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, 0600.
    Unix(tokio::net::UnixListener, PathBuf),
}

impl From<tokio::net::TcpListener> for AdminListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl AdminListener {
    /// Binds `addr`. A Unix socket file left by a crashed verifier is replaced; one that a
    /// live process answers on is refused (another verifier serves this data directory).
    pub async fn bind(addr: &AdminAddr) -> std::io::Result<Self> {
        match addr {
            AdminAddr::Tcp(a) => Ok(Self::Tcp(tokio::net::TcpListener::bind(a).await?)),
            AdminAddr::Unix(path) => {
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is served by a running process", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let l = tokio::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Self::Unix(l, path.clone()))
            }
        }
    }

    /// The address it listens on (a TCP port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<AdminAddr> {
        match self {
            Self::Tcp(l) => Ok(AdminAddr::Tcp(l.local_addr()?)),
            Self::Unix(_, p) => Ok(AdminAddr::Unix(p.clone())),
        }
    }
}

/// The server's proof for `challenge` over `addr` (the address as the client dialled it).
pub fn proof(token: &str, addr: &AdminAddr, challenge: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(PROOF_CONTEXT);
    let a = addr.to_string();
    ctx.update(&(a.len() as u32).to_be_bytes());
    ctx.update(a.as_bytes());
    ctx.update(challenge);
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks a server's proof in constant time.
pub fn proof_is_valid(token: &str, addr: &AdminAddr, challenge: &[u8], given: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let a = addr.to_string();
    let mut msg = Vec::with_capacity(PROOF_CONTEXT.len() + 4 + a.len() + challenge.len());
    msg.extend_from_slice(PROOF_CONTEXT);
    msg.extend_from_slice(&(a.len() as u32).to_be_bytes());
    msg.extend_from_slice(a.as_bytes());
    msg.extend_from_slice(challenge);
    hmac::verify(&key, &msg, given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_loopback_and_refuses_the_rest() {
        let dir = Path::new("/d");
        assert_eq!(
            AdminAddr::parse("unix", dir),
            Ok(AdminAddr::Unix("/d/admin.sock".into()))
        );
        assert_eq!(
            AdminAddr::parse("unix:/run/a.sock", dir),
            Ok(AdminAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            AdminAddr::parse("127.0.0.1:7444", dir),
            Ok(AdminAddr::Tcp(
                "127.0.0.1:7444".parse().expect("must succeed")
            ))
        );
        assert!(AdminAddr::parse("[::1]:7444", dir).is_ok());
        assert!(AdminAddr::parse("127.8.9.1:1", dir).is_ok());
        for bad in ["0.0.0.0:7444", "10.0.0.1:7444", "[::]:7444"] {
            assert!(
                matches!(
                    AdminAddr::parse(bad, dir),
                    Err(AdminAddrError::NotLoopback(_))
                ),
                "{bad}"
            );
        }
        for bad in ["unix:", "localhost:7444", "", "tcp"] {
            assert!(
                matches!(
                    AdminAddr::parse(bad, dir),
                    Err(AdminAddrError::Unparsable(_))
                ),
                "{bad}"
            );
        }
        // Round trip through admin.addr.
        for a in ["unix:/d/admin.sock", "127.0.0.1:9", "[::1]:9"] {
            assert_eq!(
                AdminAddr::parse(a, dir).expect("must succeed").to_string(),
                a
            );
        }
    }

    #[test]
    fn proof_binds_token_address_and_challenge() {
        let a: AdminAddr = AdminAddr::Tcp("127.0.0.1:7444".parse().expect("must succeed"));
        let b: AdminAddr = AdminAddr::Tcp("127.0.0.1:7445".parse().expect("must succeed"));
        let c = [7u8; CHALLENGE_LEN];
        let p = proof("tok", &a, &c);
        assert!(proof_is_valid("tok", &a, &c, &p));
        assert!(
            !proof_is_valid("tok", &b, &c, &p),
            "relayed to another address"
        );
        assert!(!proof_is_valid("other", &a, &c, &p), "another token");
        assert!(
            !proof_is_valid("tok", &a, &[8u8; CHALLENGE_LEN], &p),
            "replayed"
        );
        assert!(!proof_is_valid("tok", &a, &c, &p[..31]), "truncated");
    }

    #[tokio::test]
    async fn unix_socket_is_0600_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().expect("must succeed");
        let addr = AdminAddr::parse("unix", dir.path()).expect("must succeed");
        let l = AdminListener::bind(&addr).await.expect("must succeed");
        let AdminAddr::Unix(path) = l.local_addr().expect("must succeed") else {
            panic!("not unix")
        };
        let mode = std::fs::metadata(&path)
            .expect("must succeed")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // A live listener: a second bind is refused, the socket is left alone.
        let err = AdminListener::bind(&addr).await.expect_err("must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // Crashed (listener gone, file left): replaced.
        drop(l);
        assert!(path.exists());
        let l2 = AdminListener::bind(&addr).await.expect("must succeed");
        assert!(tokio::net::UnixStream::connect(&path).await.is_ok());
        drop(l2);
    }
}
