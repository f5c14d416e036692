//! The local SOCKS5 endpoint: CONNECT to mesh names only.
//!
//! Loopback sources only; 5 s handshake deadline; unknown, disallowed, IP-literal and
//! non-mesh targets get REP 0x02 with no network action (no DNS, no dial). By default
//! (`socks_reply = "early"`) the success reply is sent once every local check has passed, and
//! the app's first bytes follow the token and header: one tunnel round trip per connection. A
//! refusal by the far end then resets the app's connection and is counted and audited here;
//! `after_connect` waits for the serving node's backend result and answers with its true code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{FlowAssertion, StreamHeader};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::routing::EgressRoute;
use hopmesh_protocol::secret::ct_eq;
use hopmesh_protocol::socks5::{
    self, Command, Reply, SocksError, SocksResponse, encode_method_selection, encode_reply,
    encode_userpass_status, method,
};
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::fields;
use hopmesh_transport::quic::codes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::SocksReply;
use crate::counters::Counters;
use crate::peer::Dial;
use crate::refusal::{MintRefusal, RemoteRefusal, SocksRefusal};
use crate::shared::Shared;
use crate::splice::{SpliceEnd, read_status, rst, splice, splice_after_status};
use crate::state::Mint;

/// Whole SOCKS handshake deadline.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// How long to wait for the serving node's backend connect result (the status byte).
pub const STATUS_DEADLINE: Duration = Duration::from_secs(15);
/// Largest handshake message (a request with a 255-byte name is 262 bytes; auth is 513).
const MAX_HANDSHAKE: usize = 1024;

/// Time a client refused at the `socks_max_clients` limit has to send its greeting before the
/// `05 FF` answer (reading the greeting first lets the close be a FIN, not an RST that could
/// discard the answer).
pub const REFUSAL_DEADLINE: Duration = Duration::from_millis(500);
/// Refused clients answered at once (each for at most [`REFUSAL_DEADLINE`]); past it a refused
/// client is closed without an answer (still counted), so a flood costs bounded tasks.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Accepts SOCKS clients until shutdown, at most `socks_max_clients` at once
/// ([`crate::config::NodeConfig::socks_max_clients`]).
pub async fn serve(
    node: Arc<Shared>,
    dial: Arc<dyn Dial>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    let clients = Arc::new(Semaphore::new(node.config.socks_max_clients));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (tcp, from) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or memory: the error repeats at once, so
                // wait instead of spinning; clients queue in the listen backlog meanwhile.
                node.counters.refused("socks_accept_failed");
                let wait = backoff.failed();
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "SOCKS accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => break,
                }
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            node.counters.refused(SocksRefusal::ClientLimit.reason());
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_at_limit(tcp).await;
                    drop(slot);
                });
            } else {
                rst(tcp);
            }
            continue;
        };
        let (node, dial) = (node.clone(), dial.clone());
        tokio::spawn(async move {
            client(node, dial, tcp, from).await;
            drop(permit);
        });
    }
}

/// Answers a client refused at the limit: `05 FF` (no acceptable method, the one refusal a
/// greeting can get), after its greeting or [`REFUSAL_DEADLINE`], then a clean close.
async fn refuse_at_limit(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
        let mut greeting = [0u8; MAX_HANDSHAKE];
        let _ = tcp.read(&mut greeting).await;
    })
    .await;
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
        let _ = tcp
            .write_all(&encode_method_selection(method::NO_ACCEPTABLE))
            .await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// First wait after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait after repeated failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long the accept loop waits after a failed accept: doubling from
/// [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`], reset by a good accept.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// A failed accept: the wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((wait * 2).min(ACCEPT_BACKOFF_MAX));
        wait
    }

    /// A good accept.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

/// RFC 1929 credentials check: both fields compared in constant time (per field length),
/// both always compared.
pub fn credentials_match(user: &[u8], pass: &[u8], want_user: &str, want_pass: &str) -> bool {
    ct_eq(user, want_user.as_bytes()) & ct_eq(pass, want_pass.as_bytes())
}

/// Reads until `parse` has a whole message or fails; `Ok(None)` on EOF.
async fn read_msg<T>(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
) -> Result<Option<T>, SocksError> {
    loop {
        if let Some((v, used)) = parse(buf)? {
            buf.drain(..used);
            return Ok(Some(v));
        }
        if buf.len() >= MAX_HANDSHAKE {
            return Err(SocksError::WrongVersion(0));
        }
        let mut chunk = [0u8; 512];
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn answer(tcp: &mut TcpStream, resp: SocksResponse) {
    let bytes = match resp {
        SocksResponse::Close => return,
        SocksResponse::NoAcceptableMethod => {
            encode_method_selection(method::NO_ACCEPTABLE).to_vec()
        }
        SocksResponse::AuthFailure => encode_userpass_status(false).to_vec(),
        SocksResponse::Reply(r) => encode_reply(r, None),
    };
    let _ = tcp.write_all(&bytes).await;
}

/// The outcome of the handshake.
enum Handshake {
    /// CONNECT to this host.
    Connect(String),
    /// Already answered (or closed); stop.
    Done,
}

async fn handshake(node: &Shared, tcp: &mut TcpStream) -> Handshake {
    let mut buf = Vec::new();
    let greeting = match read_msg(tcp, &mut buf, socks5::parse_greeting).await {
        Ok(Some(g)) => g,
        Ok(None) => return Handshake::Done,
        Err(e) => {
            node.counters.refused(e.reason());
            answer(tcp, e.response()).await;
            return Handshake::Done;
        }
    };
    let auth = node.config.socks_auth.clone();
    let chosen = greeting.choose(auth.is_some());
    if tcp
        .write_all(&encode_method_selection(chosen))
        .await
        .is_err()
        || chosen == method::NO_ACCEPTABLE
    {
        node.counters
            .refused(SocksRefusal::NoAcceptableMethod.reason());
        return Handshake::Done;
    }
    if let Some((user, pass)) = auth {
        let creds = match read_msg(tcp, &mut buf, socks5::parse_userpass).await {
            Ok(Some(c)) => c,
            Ok(None) => return Handshake::Done,
            Err(e) => {
                answer(tcp, e.response()).await;
                return Handshake::Done;
            }
        };
        let ok = credentials_match(&creds.username, &creds.password, &user, &pass);
        let _ = tcp.write_all(&encode_userpass_status(ok)).await;
        if !ok {
            node.counters.refused(SocksRefusal::AuthFailed.reason());
            node.audit("socks_auth_failed", fields! {});
            return Handshake::Done;
        }
    }
    let req = match read_msg(tcp, &mut buf, socks5::parse_request).await {
        Ok(Some(r)) => r,
        Ok(None) => return Handshake::Done,
        Err(e) => {
            node.counters.refused(e.reason());
            answer(tcp, e.response()).await;
            return Handshake::Done;
        }
    };
    if req.command != Command::Connect {
        node.counters
            .refused(SocksRefusal::CommandNotSupported.reason());
        answer(tcp, SocksResponse::Reply(Reply::CommandNotSupported)).await;
        return Handshake::Done;
    }
    if !buf.is_empty() {
        // Data before our reply: the client did not wait for the handshake.
        node.counters.refused(SocksRefusal::PipelinedData.reason());
        answer(tcp, SocksResponse::Reply(Reply::GeneralFailure)).await;
        return Handshake::Done;
    }
    Handshake::Connect(req.target.host())
}

/// Our stream header for `route`; on a relayed route the origin signs the flow end to end.
fn stream_header(node: &Shared, route: &EgressRoute) -> Option<Vec<u8>> {
    let st = node.state_read();
    let epoch = st.epoch.epoch_at(node.now());
    let assertion = match route.via {
        None => None,
        Some(_) => st.attestation.as_ref().and_then(|(env, _)| {
            FlowAssertion::sign(
                node.identity.signing_key(),
                env,
                route.serving_node,
                route.service,
                epoch,
                rand::random(),
            )
        }),
    };
    StreamHeader {
        origin: node.local,
        service: route.service,
        route: BoundedVec::empty(),
        assertion,
    }
    .encode()
    .ok()
}

async fn client(node: Arc<Shared>, dial: Arc<dyn Dial>, mut tcp: TcpStream, from: SocketAddr) {
    if !from.ip().is_loopback() {
        let why = SocksRefusal::NonLoopbackSource;
        node.counters.refused(why.reason());
        node.audit(
            "socks_refused",
            fields! {"from" => from.to_string(), "reason" => why.audit_text()},
        );
        return rst(tcp);
    }
    let _ = tcp.set_nodelay(true);
    let host = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(&node, &mut tcp)).await {
        Ok(Handshake::Connect(h)) => h,
        Ok(Handshake::Done) => return,
        Err(_) => {
            node.counters
                .refused(SocksRefusal::HandshakeTimeout.reason());
            return;
        }
    };
    let reply = |r| encode_reply(r, None);
    // Route: a pure decision, before any network action.
    let decided = node.state_read().route(&host, node.now());
    let route = match decided {
        Ok(r) => r,
        Err(why) => {
            if why.counted() {
                node.counters.refused(why.reason());
            }
            node.audit(
                "socks_refused",
                fields! {"target" => host.as_str(), "reason" => why.audit_text()},
            );
            let _ = tcp.write_all(&reply(Reply::NotAllowed)).await;
            return;
        }
    };
    // The first hop: the serving node itself, or the relay the route goes through.
    let first_hop = route.via.unwrap_or(route.serving_node);
    let pc = match dial.connection_to(first_hop).await {
        Ok(pc) => pc,
        Err(e) => {
            node.counters
                .refused(SocksRefusal::PeerUnreachable.reason());
            tracing::debug!(target = %host, error = %e, "no connection to the serving node");
            let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
            return;
        }
    };
    let Ok((mut send, mut recv)) = pc.conn.open_bi().await else {
        let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
        return;
    };
    let minted = stream_header(&node, &route)
        .ok_or(MintRefusal::NoSeedForPeer)
        .and_then(|header| {
            let mint = Mint {
                dst: first_hop,
                service: route.service,
                stream_id: u64::from(send.id()),
                header: &header,
            };
            let token = node.state_read().mint(
                &mint,
                |seed, pair, generation, epoch| pc.stream_key(seed, pair, generation, epoch),
                node.now(),
            )?;
            Ok([token.as_slice(), &header].concat())
        });
    let first = match minted {
        Ok(first) => first,
        Err(why) => {
            node.counters.refused(SocksRefusal::Mint(why).reason());
            let _ = send.reset(codes::INTERNAL);
            let _ = tcp.write_all(&reply(Reply::NotAllowed)).await;
            return;
        }
    };
    Counters::add(&node.counters.streams_opened, 1);
    if send.write_all(&first).await.is_err() {
        let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
        return;
    }
    let ended = match node.config.socks_reply {
        SocksReply::Early => {
            // Everything this node can know alone has passed: the app may send now, and its
            // bytes follow the token and header. What only the far end knows comes down as
            // the first byte of the stream (`splice_after_status`).
            if tcp.write_all(&reply(Reply::Succeeded)).await.is_err() {
                let _ = send.reset(codes::INTERNAL);
                return;
            }
            Counters::add(&node.counters.socks_ok, 1);
            splice_after_status(tcp, send, recv, node.counters.clone(), STATUS_DEADLINE).await
        }
        SocksReply::AfterConnect => {
            if let Err(why) = read_status(&mut recv, STATUS_DEADLINE).await {
                let _ = tcp.write_all(&reply(why.status().socks_reply())).await;
                let _ = send.reset(codes::INTERNAL);
                remote_refused(&node, first_hop, &host, why);
                return;
            }
            if tcp.write_all(&reply(Reply::Succeeded)).await.is_err() {
                let _ = send.reset(codes::INTERNAL);
                return;
            }
            Counters::add(&node.counters.socks_ok, 1);
            splice(tcp, send, recv, node.counters.clone()).await
        }
    };
    match ended {
        SpliceEnd::Clean { .. } => {}
        SpliceEnd::Refused(why) => remote_refused(&node, first_hop, &host, why),
        SpliceEnd::Reset(e) => tracing::debug!(target = %host, error = %e, "outbound stream reset"),
    }
}

/// Counts and audits a refusal by the far end (aggregated per first hop and reason: a peer
/// can repeat it at will).
fn remote_refused(node: &Shared, first_hop: NodeId, host: &str, why: RemoteRefusal) {
    node.counters.refused(why.reason());
    node.audit_refusal(
        "stream_refused_remote",
        first_hop,
        why.reason(),
        fields! {"target" => host, "peer" => first_hop.to_string(), "reason" => why.reason()},
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u128> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn both_credentials_must_match() {
        assert!(credentials_match(b"u", b"p", "u", "p"));
        assert!(!credentials_match(b"u", b"x", "u", "p"));
        assert!(!credentials_match(b"x", b"p", "u", "p"));
        assert!(!credentials_match(b"uu", b"p", "u", "p"));
        assert!(!credentials_match(b"u", b"", "u", "p"));
        assert!(!credentials_match(b"", b"", "u", "p"));
    }
}
