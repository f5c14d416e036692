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
    ConnectionKeys, GateContext, MintRequest, PairIds, PairKeyring, TOKEN_LEN, TokenRefusal,
    mint_token, verify_token,
};
use hopmesh_protocol::ids::{NodeId, ServiceId};
use hopmesh_protocol::routing::{Admission, IngressTable, ServePermit};
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
                    cache: Some(&pc.keys),
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
    // The header is MAC'd; it must still agree with the token. Single-hop relays only.
    let h = match StreamHeader::decode(&header) {
        Ok(h) if h.service == stream.fields().service && h.route.is_empty() => h,
        _ => return refuse_io(&node, &pc, "bad_header", &mut send, &mut recv),
    };
    let serve = match stream.into_admission() {
        Admission::Serve(p) if p.relay.is_none() => {
            if h.origin != pc.peer {
                return refuse_io(&node, &pc, "origin_not_peer", &mut send, &mut recv);
            }
            p
        }
        Admission::Serve(_) => match check_relayed(&node, &pc, &h) {
            Ok(p) => p,
            Err(reason) => return refuse_io(&node, &pc, reason, &mut send, &mut recv),
        },
        Admission::Forward(fwd) => {
            // Every hop checks the origin's signature: a relay forwards only its peer's own flows.
            let now = node.now();
            let (keys, epoch) = {
                let st = node.state_read();
                (st.keys.clone(), st.epoch)
            };
            let proven = h
                .assertion
                .as_ref()
                .map(|a| a.verify(&keys, &fwd.next, fwd.service, epoch, now));
            match proven {
                Some(Ok(origin)) if origin == pc.peer && h.origin == pc.peer => {}
                Some(Err(e)) => return refuse_io(&node, &pc, e.reason(), &mut send, &mut recv),
                _ => return refuse_io(&node, &pc, "flow_origin_mismatch", &mut send, &mut recv),
            }
            Counters::add(&node.counters.streams_accepted, 1);
            return forward(node, pc, fwd.next, fwd.service, header, send, recv).await;
        }
    };
    Counters::add(&node.counters.streams_accepted, 1);
    let (status, tcp) = connect_backend(&node, &serve).await;
    if send.write_all(&[status.to_byte()]).await.is_err() {
        return;
    }
    let Some(tcp) = tcp else {
        node.counters.refused("backend_unreachable");
        let _ = send.finish();
        return;
    };
    if let SpliceEnd::Reset(e) = splice(tcp, send, recv, node.counters.clone()).await {
        tracing::debug!(peer = %pc.peer.short(), error = %e, "inbound stream reset");
    }
}

/// At the serving node, for a stream that came through a relay: the origin's flow assertion
/// must verify, be fresh and unseen, and policy must allow that origin through that relay.
fn check_relayed(
    node: &Node,
    pc: &PeerConn,
    h: &StreamHeader,
) -> Result<ServePermit, &'static str> {
    let a = h.assertion.as_ref().ok_or("flow_missing")?;
    let now = node.now();
    let st = node.state_read();
    let origin = a
        .verify(&st.keys, &st.local, h.service, st.epoch, now)
        .map_err(|e| e.reason())?;
    if origin != h.origin {
        return Err("flow_origin_mismatch");
    }
    node.flow_nonces(|cache| cache.insert(a.epoch, a.nonce, st.epoch.epoch_at(now)))
        .map_err(|e| e.reason())?;
    let table = st.table.as_ref().ok_or("no_routes")?;
    table
        .ingress
        .may_serve_via(&pc.peer, &origin, h.service)
        .map_err(|_| "origin_not_allowed_via_relay")
}

/// As a relay: open the next hop's stream with our own token, pass the origin's header on,
/// relay the status byte, then splice the two streams.
async fn forward(
    node: Arc<Node>,
    pc: Arc<PeerConn>,
    next: NodeId,
    service: ServiceId,
    header: Vec<u8>,
    mut in_send: SendStream,
    in_recv: RecvStream,
) {
    let out = match node.connection_to(next).await {
        Ok(out) => out,
        Err(_) => {
            let _ = in_send
                .write_all(&[StreamStatus::HostUnreachable.to_byte()])
                .await;
            let _ = in_send.finish();
            return;
        }
    };
    let Ok((mut out_send, mut out_recv)) = out.conn.open_bi().await else {
        let _ = in_send
            .write_all(&[StreamStatus::HostUnreachable.to_byte()])
            .await;
        let _ = in_send.finish();
        return;
    };
    let stream_id = u64::from(out_send.id());
    let minted = {
        let st = node.state_read();
        let now = node.now();
        st.keyrings
            .get(&next)
            .and_then(|k| k.minting(now))
            .and_then(|g| {
                let epoch = st.epoch.epoch_at(now);
                let key =
                    out.stream_key(&g.seed, &PairIds::new(st.local, next), g.generation, epoch);
                let req = MintRequest {
                    generation: g.generation,
                    epoch,
                    src: st.local,
                    dst: next,
                    service,
                    stream_id,
                    header: &header,
                };
                mint_token(&req, &key).ok()
            })
    };
    let Some(token) = minted else {
        node.counters.refused("no_seed_for_peer");
        let _ = out_send.reset(codes::INTERNAL);
        let _ = in_send
            .write_all(&[StreamStatus::GeneralFailure.to_byte()])
            .await;
        let _ = in_send.finish();
        return;
    };
    if out_send
        .write_all(&[token.as_slice(), &header].concat())
        .await
        .is_err()
    {
        let _ = in_send.reset(codes::INTERNAL);
        return;
    }
    let mut status = [0u8; 1];
    let status =
        match tokio::time::timeout(Duration::from_secs(15), out_recv.read_exact(&mut status)).await
        {
            Ok(Ok(())) => status[0],
            _ => StreamStatus::NotAllowed.to_byte(),
        };
    if in_send.write_all(&[status]).await.is_err() || status != StreamStatus::Connected.to_byte() {
        let _ = out_send.reset(codes::INTERNAL);
        let _ = in_send.finish();
        return;
    }
    if let Err(e) = crate::splice::splice_quic(in_send, in_recv, out_send, out_recv).await {
        tracing::debug!(peer = %pc.peer.short(), next = %next.short(), error = %e, "relayed stream reset");
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
