//! The stream gate: every inbound stream starts with a hop token, checked in the DESIGN.md
//! order before any byte reaches a backend.
//!
//! Refusals reset the stream with one generic code; the precise reason is counted and
//! audited. Forged tokens feed the connection's [`ForgeryMeter`]; past the limit, or on
//! compromised key use or impersonation, the connection is closed and the verifier told.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{StreamHeader, StreamStatus};
use hopmesh_protocol::enrollment::{Report, ReportKind};
use hopmesh_protocol::hop_token::{
    ConnectionKeys, GateContext, PairIds, PairKeyring, TOKEN_LEN, TokenRefusal, verify_token,
};
use hopmesh_protocol::routing::{IngressTable, ServePermit};
use hopmesh_protocol::wire::BoundedString;
use hopmesh_transport::fields;
use hopmesh_transport::quic::codes;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::counters::Counters;
use crate::runtime::{Node, PeerConn};
use crate::splice::{SpliceEnd, splice};

/// Time a peer has to deliver the token and header once the stream is visible.
pub const TOKEN_DEADLINE: Duration = Duration::from_secs(5);
/// Time to connect to a backend.
pub const BACKEND_CONNECT_DEADLINE: Duration = Duration::from_secs(5);

fn reset(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = send.reset(codes::STREAM_REFUSED);
    let _ = recv.stop(codes::STREAM_REFUSED);
}

/// Handles one inbound stream on `pc`.
pub async fn handle(
    node: Arc<Node>,
    pc: Arc<PeerConn>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let stream_id = u64::from(recv.id());
    let mut raw = [0u8; TOKEN_LEN];
    match tokio::time::timeout(TOKEN_DEADLINE, recv.read_exact(&mut raw)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return refuse_io(&node, &pc, "token_truncated", &mut send, &mut recv),
        Err(_) => return refuse_io(&node, &pc, "token_timeout", &mut send, &mut recv),
    }
    let now = node.now();
    let verdict = {
        let st = node.state_read();
        match st.self_permit(now) {
            Err(e) => Err(Err(e)),
            Ok(()) => {
                let empty = PairKeyring::new(PairIds::new(st.local, pc.peer));
                let keyring = st.keyrings.get(&pc.peer).unwrap_or(&empty);
                let gate = GateContext {
                    local: st.local,
                    peer: pc.peer,
                    stream_id,
                    epoch_len: st.epoch,
                    now,
                };
                let keys = ConnectionKeys {
                    keyring,
                    binding: &pc.binding,
                    now,
                    grace: st.epoch.as_secs(),
                };
                let empty_ingress = IngressTable::default();
                let ingress = st.table.as_ref().map_or(&empty_ingress, |t| &t.ingress);
                verify_token(&raw, &gate, &keys, ingress).map_err(Ok)
            }
        }
    };
    let permit = match verdict {
        Ok(p) => p,
        Err(Err(_self_refusal)) => {
            return refuse_io(&node, &pc, "self_not_permitted", &mut send, &mut recv);
        }
        Err(Ok(refusal)) => {
            return refuse_token(&node, &pc, refusal, stream_id, &mut send, &mut recv);
        }
    };
    let mut header = vec![0u8; permit.header_len()];
    if !matches!(
        tokio::time::timeout(TOKEN_DEADLINE, recv.read_exact(&mut header)).await,
        Ok(Ok(()))
    ) {
        return refuse_io(&node, &pc, "header_truncated", &mut send, &mut recv);
    }
    let stream = match permit.check_header(&header) {
        Ok(s) => s,
        Err(refusal) => return refuse_token(&node, &pc, refusal, stream_id, &mut send, &mut recv),
    };
    // The header is MAC'd; it must still agree with the token and describe a direct route
    // (relays are not supported yet).
    match StreamHeader::decode(&header) {
        Ok(h)
            if h.service == stream.fields().service
                && h.origin == pc.peer
                && h.route.is_empty() => {}
        _ => return refuse_io(&node, &pc, "bad_header", &mut send, &mut recv),
    }
    Counters::add(&node.counters.streams_accepted, 1);
    let serve = stream.serve().clone();
    let (status, tcp) = connect_backend(&node, &serve).await;
    if send.write_all(&[status.to_byte()]).await.is_err() {
        return;
    }
    let Some(tcp) = tcp else {
        node.counters.refused("backend_unreachable");
        let _ = send.finish();
        return;
    };
    if let SpliceEnd::Reset(e) = splice(tcp, send, recv, node.counters.clone(), false).await {
        tracing::debug!(peer = %pc.peer.short(), error = %e, "inbound stream reset");
    }
}

async fn connect_backend(node: &Node, serve: &ServePermit) -> (StreamStatus, Option<TcpStream>) {
    let addrs = match node.resolve(&serve.backend.host, serve.backend.port).await {
        Ok(a) if !a.is_empty() => a,
        _ => return (StreamStatus::HostUnreachable, None),
    };
    let mut last = StreamStatus::HostUnreachable;
    for addr in addrs {
        match tokio::time::timeout(BACKEND_CONNECT_DEADLINE, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return (StreamStatus::Connected, Some(tcp));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = StreamStatus::ConnectionRefused
            }
            Ok(Err(_)) => last = StreamStatus::HostUnreachable,
            Err(_) => last = StreamStatus::TimedOut,
        }
    }
    (last, None)
}

fn refuse_io(
    node: &Node,
    pc: &PeerConn,
    reason: &'static str,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    node.counters.refused(reason);
    node.audit(
        "stream_refused",
        fields! {"peer" => pc.peer.to_string(), "reason" => reason},
    );
    reset(send, recv);
}

fn refuse_token(
    node: &Node,
    pc: &PeerConn,
    refusal: TokenRefusal,
    stream_id: u64,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    let reason = refusal.reason();
    node.counters.refused(reason);
    node.audit(
        "stream_refused",
        fields! {"peer" => pc.peer.to_string(), "reason" => reason, "stream" => stream_id, "detail" => refusal.to_string()},
    );
    reset(send, recv);
    let now = node.now();
    let report = |kind| Report {
        kind,
        peer: pc.peer,
        generation: match &refusal {
            TokenRefusal::CompromisedKeyUse(g) => Some(hopmesh_protocol::hop_token::Generation(*g)),
            _ => None,
        },
        detail: BoundedString::truncated(&refusal.to_string()),
    };
    if refusal.closes_connection() {
        let kind = if matches!(refusal, TokenRefusal::CompromisedKeyUse(_)) {
            ReportKind::CompromisedKeyUse
        } else {
            ReportKind::Impersonation
        };
        node.audit(
            kind.as_str(),
            fields! {"peer" => pc.peer.to_string(), "stream" => stream_id},
        );
        pc.conn.close(codes::ABUSE, kind.as_str().as_bytes());
        node.report(report(kind));
        return;
    }
    if refusal.is_forgery() && pc.record_forgery(now).is_err() {
        node.audit("forged_tokens", fields! {"peer" => pc.peer.to_string()});
        pc.conn.close(codes::ABUSE, b"forged tokens");
        node.report(report(ReportKind::ForgedTokens));
    }
}
