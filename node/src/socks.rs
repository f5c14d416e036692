//! The local SOCKS5 endpoint: CONNECT to mesh names only.
//!
//! Loopback sources only; 5 s handshake deadline; unknown, disallowed, IP-literal and
//! non-mesh targets get REP 0x02 with no network action (no DNS, no dial). The reply is sent
//! only after the serving node reported its backend connect result, so apps see a true code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{FlowAssertion, StreamHeader, StreamStatus};
use hopmesh_protocol::hop_token::{MintRequest, mint_token};
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
use tokio::sync::watch;

use crate::counters::Counters;
use crate::runtime::Node;
use crate::splice::{SpliceEnd, rst, splice};

/// Whole SOCKS handshake deadline.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// How long to wait for the serving node's backend connect result.
pub const STATUS_DEADLINE: Duration = Duration::from_secs(15);
/// Largest handshake message (a request with a 255-byte name is 262 bytes; auth is 513).
const MAX_HANDSHAKE: usize = 1024;

/// Accepts SOCKS clients until shutdown.
pub async fn serve(node: Arc<Node>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let Ok((tcp, from)) = accepted else { continue };
        let node = node.clone();
        tokio::spawn(async move { client(node, tcp, from).await });
    }
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

async fn handshake(node: &Node, tcp: &mut TcpStream) -> Handshake {
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
        node.counters.refused("socks_no_acceptable_method");
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
        let ok = creds.username == user.as_bytes()
            && creds.password.len() == pass.len()
            && ct_eq(&creds.password, pass.as_bytes());
        let _ = tcp.write_all(&encode_userpass_status(ok)).await;
        if !ok {
            node.counters.refused("socks_auth_failed");
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
        node.counters.refused("socks_command_not_supported");
        answer(tcp, SocksResponse::Reply(Reply::CommandNotSupported)).await;
        return Handshake::Done;
    }
    if !buf.is_empty() {
        // Data before our reply: the client did not wait for the handshake.
        node.counters.refused("socks_pipelined_data");
        answer(tcp, SocksResponse::Reply(Reply::GeneralFailure)).await;
        return Handshake::Done;
    }
    Handshake::Connect(req.target.host())
}

async fn client(node: Arc<Node>, mut tcp: TcpStream, from: SocketAddr) {
    if !from.ip().is_loopback() {
        node.counters.refused("socks_non_loopback_source");
        node.audit(
            "socks_refused",
            fields! {"from" => from.to_string(), "reason" => "non_loopback_source"},
        );
        return rst(tcp);
    }
    let _ = tcp.set_nodelay(true);
    let host = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(&node, &mut tcp)).await {
        Ok(Handshake::Connect(h)) => h,
        Ok(Handshake::Done) => return,
        Err(_) => {
            node.counters.refused("socks_handshake_timeout");
            return;
        }
    };
    let reply = |r| encode_reply(r, None);
    // Route: a pure decision, before any network action.
    let now = node.now();
    let route = {
        let st = node.state_read();
        if let Err(e) = st.self_permit(now) {
            Err(format!("self: {e}"))
        } else {
            match st
                .table
                .as_ref()
                .map(|t| t.egress.may_route(&host, &st.suffix))
            {
                Some(Ok(p)) => Ok(p.route),
                Some(Err(e)) => {
                    node.counters.refused(e.reason());
                    Err(e.to_string())
                }
                None => Err("no routes".into()),
            }
        }
    };
    let route = match route {
        Ok(r) => r,
        Err(why) => {
            node.audit(
                "socks_refused",
                fields! {"target" => host.as_str(), "reason" => why},
            );
            let _ = tcp.write_all(&reply(Reply::NotAllowed)).await;
            return;
        }
    };
    // The first hop: the serving node itself, or the relay the route goes through.
    let first_hop = route.via.unwrap_or(route.serving_node);
    let pc = match node.connection_to(first_hop).await {
        Ok(pc) => pc,
        Err(e) => {
            node.counters.refused("peer_unreachable");
            tracing::debug!(target = %host, error = %e, "no connection to the serving node");
            let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
            return;
        }
    };
    let Ok((mut send, mut recv)) = pc.conn.open_bi().await else {
        let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
        return;
    };
    let stream_id = u64::from(send.id());
    let minted = {
        let st = node.state_read();
        let now = node.now();
        let epoch = st.epoch.epoch_at(now);
        // On a relayed route the origin signs the flow end to end.
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
        let header = StreamHeader {
            origin: node.local,
            service: route.service,
            route: BoundedVec::empty(),
            assertion,
        };
        let grant = st
            .keyrings
            .get(&first_hop)
            .and_then(|k| k.minting(now))
            .cloned();
        grant.zip(header.encode().ok()).and_then(|(g, h)| {
            let pair = hopmesh_protocol::hop_token::PairIds::new(st.local, first_hop);
            let key = pc.stream_key(&g.seed, &pair, g.generation, epoch);
            let req = MintRequest {
                generation: g.generation,
                epoch,
                src: st.local,
                dst: first_hop,
                service: route.service,
                stream_id,
                header: &h,
            };
            mint_token(&req, &key)
                .ok()
                .map(|t| [t.as_slice(), &h].concat())
        })
    };
    let Some(first) = minted else {
        node.counters.refused("no_seed_for_peer");
        let _ = send.reset(codes::INTERNAL);
        let _ = tcp.write_all(&reply(Reply::NotAllowed)).await;
        return;
    };
    Counters::add(&node.counters.streams_opened, 1);
    if send.write_all(&first).await.is_err() {
        let _ = tcp.write_all(&reply(Reply::HostUnreachable)).await;
        return;
    }
    let mut status = [0u8; 1];
    let status = match tokio::time::timeout(STATUS_DEADLINE, recv.read_exact(&mut status)).await {
        Ok(Ok(())) => StreamStatus::from_byte(status[0]),
        // A reset stream: the serving node refused the token (generic by design).
        Ok(Err(_)) => StreamStatus::NotAllowed,
        Err(_) => StreamStatus::TimedOut,
    };
    if tcp.write_all(&reply(status.socks_reply())).await.is_err()
        || status != StreamStatus::Connected
    {
        let _ = send.reset(codes::INTERNAL);
        return;
    }
    Counters::add(&node.counters.socks_ok, 1);
    if let SpliceEnd::Reset(e) = splice(tcp, send, recv, node.counters.clone()).await {
        tracing::debug!(target = %host, error = %e, "outbound stream reset");
    }
}
