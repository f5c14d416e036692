//! The stream gate: every inbound stream starts with a hop token, checked in the order of
//! `docs/design.md` ("Verification order") before any byte reaches a backend. The decisions
//! are [`crate::state::NodeState`] methods; this module does the IO around them.
//!
//! Refusals reset the stream with one generic code; the precise reason is counted and
//! audited. Forged tokens feed the peer's entry in the node's
//! [`ForgeryLedger`](hopmesh_protocol::hop_token::ForgeryLedger) (across its connections); past
//! the limit the peer is suspended (its connections closed, handshakes refused), or on
//! compromised key use or impersonation the connection is closed; the verifier is told.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{StreamHeader, StreamStatus};
use hopmesh_protocol::enrollment::{Report, ReportKind};
use hopmesh_protocol::flow_seal::RecordKind;
use hopmesh_protocol::hop_token::{ForgeryVerdict, Generation, TOKEN_LEN, TokenRefusal};
use hopmesh_protocol::ids::{NodeId, ServiceId};
use hopmesh_protocol::routing::ServePermit;
use hopmesh_protocol::wire::BoundedString;
use hopmesh_transport::fields;
use hopmesh_transport::quic::codes;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::counters::Counters;
use crate::peer::{Dial, PeerConn};
use crate::refusal::{CloseReason, GateRefusal};
use crate::sealed::{SealedCut, SealedEnds, send_record, serving_keys, splice_sealed};
use crate::shared::Shared;
use crate::splice::{
    RELAY_WRITE_DEADLINE, RelayError, SpliceEnd, splice_quic, splice_serving_early, splice_until,
};
use crate::state::{Admitted, ConnectionContext, Mint};
use crate::streams::Flow;

/// Time a peer has to deliver the token and header once the stream is visible.
pub const TOKEN_DEADLINE: Duration = Duration::from_secs(5);
/// Time to connect to a backend.
pub const BACKEND_CONNECT_DEADLINE: Duration = Duration::from_secs(5);

fn reset(send: &mut SendStream, recv: &mut RecvStream, why: &GateRefusal) {
    let _ = send.reset(why.code());
    let _ = recv.stop(why.code());
}

/// Largest read while a stream header arrives: the header buffer grows by at most this much
/// beyond the bytes received.
pub const HEADER_READ_CHUNK: usize = 4 * 1024;

/// Reads until `buf` holds `len` bytes, growing it as bytes arrive ([`HEADER_READ_CHUNK`] at a
/// time), never reserving `len` up front: a peer that announces a long header and sends a
/// little costs what it sent. A stream that ends first is `UnexpectedEof`.
pub async fn read_growing<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<()> {
    let mut chunk = [0u8; HEADER_READ_CHUNK];
    while buf.len() < len {
        let want = (len - buf.len()).min(HEADER_READ_CHUNK);
        let n = r.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Handles one inbound stream on `pc`; `dial` reaches the next hop when we relay.
pub async fn handle(
    node: Arc<Shared>,
    dial: Arc<dyn Dial>,
    pc: Arc<PeerConn>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let stream_id = u64::from(recv.id());
    let mut raw = [0u8; TOKEN_LEN];
    match tokio::time::timeout(TOKEN_DEADLINE, recv.read_exact(&mut raw)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return refuse(
                &node,
                &pc,
                GateRefusal::TokenTruncated,
                stream_id,
                &mut send,
                &mut recv,
            );
        }
        Err(_) => {
            return refuse(
                &node,
                &pc,
                GateRefusal::TokenTimeout,
                stream_id,
                &mut send,
                &mut recv,
            );
        }
    }
    let conn = ConnectionContext {
        peer: pc.peer,
        stream_id,
        binding: &pc.binding,
        keys: &pc.keys,
    };
    let verdict = node.state_read().check_token(&raw, &conn, node.now());
    let permit = match verdict {
        Ok(p) => p,
        Err(why) => return refuse(&node, &pc, why, stream_id, &mut send, &mut recv),
    };
    // The length is the peer's word (under a good MAC, but up to 64 KiB per stream and 4096
    // streams per connection): the buffer grows with the bytes that actually arrive.
    let mut header = Vec::new();
    let read = read_growing(&mut recv, &mut header, permit.header_len());
    if !matches!(tokio::time::timeout(TOKEN_DEADLINE, read).await, Ok(Ok(()))) {
        return refuse(
            &node,
            &pc,
            GateRefusal::HeaderTruncated,
            stream_id,
            &mut send,
            &mut recv,
        );
    }
    let admitted = permit
        .check_header(&header)
        .map_err(GateRefusal::Token)
        .and_then(|stream| {
            let now = node.now();
            let st = node.state_read();
            node.flow_nonces(|nonces| st.check_stream(stream, &header, pc.peer, nonces, now))
        });
    let (serve, origin) = match admitted {
        Ok(Admitted::Serve(p, origin)) => (p, origin),
        Ok(Admitted::Forward(fwd)) => {
            Counters::add(&node.counters.streams_accepted, 1);
            return forward(node, dial, pc, fwd.next, fwd.service, header, send, recv).await;
        }
        Err(why) => return refuse(&node, &pc, why, stream_id, &mut send, &mut recv),
    };
    Counters::add(&node.counters.streams_accepted, 1);
    if origin != pc.peer {
        return serve_sealed(node, pc, serve, origin, &header, send, recv).await;
    }
    let (status, tcp) = connect_backend(&node, &serve).await;
    let Some(tcp) = tcp else {
        node.counters.refused("backend_unreachable");
        let _ = send.write_all(&[status.to_byte()]).await;
        let _ = send.finish();
        return;
    };
    // App bytes already behind the header: the origin answered its app early and is not
    // waiting for our status, so the status may wait (briefly) for the backend's first bytes.
    // An origin that waits for the status (`after_connect`) never sends before it.
    let early = match tokio::time::timeout(Duration::ZERO, recv.read_chunk(usize::MAX, true)).await
    {
        Ok(Ok(Some(chunk))) => Some(chunk.bytes),
        _ => None,
    };
    if early.is_none() && send.write_all(&[status.to_byte()]).await.is_err() {
        return;
    }
    // Tracked while it is served: a policy change that forbids it ends it (the watchdog).
    let mut ticket = node.streams.track(Flow {
        peer: pc.peer,
        origin,
        service: serve.service,
    });
    let stop = async {
        let why = ticket.stopped().await;
        (why.code(), why.reason())
    };
    let counters = node.counters.clone();
    let ended = match early {
        Some(early) => splice_serving_early(tcp, send, recv, counters, early, stop).await,
        None => splice_until(tcp, send, recv, counters, stop).await,
    };
    if let SpliceEnd::Reset(e) = ended {
        tracing::debug!(peer = %pc.peer.short(), error = %e, "inbound stream reset");
    }
}

/// Serves a relayed flow, sealed end to end ([`crate::sealed`]): our answer, the origin's
/// first record (no backend is connected before it proves the flow is the origin's), the
/// backend connect, the status as a record, then the sealed splice. Every failure of a record
/// is counted and audited here and resets the stream.
async fn serve_sealed(
    node: Arc<Shared>,
    pc: Arc<PeerConn>,
    serve: ServePermit,
    origin: NodeId,
    header: &[u8],
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let stream_id = u64::from(recv.id());
    // The gate checked this header's assertion (`check_relayed`); decoding cannot fail now.
    let Some(assertion) = StreamHeader::decode(header).ok().and_then(|h| h.assertion) else {
        return refuse(
            &node,
            &pc,
            GateRefusal::FlowMissing,
            stream_id,
            &mut send,
            &mut recv,
        );
    };
    let Some(attestation) = node.state_read().attestation.as_ref().map(|a| a.0.clone()) else {
        return refuse(
            &node,
            &pc,
            GateRefusal::SelfNotPermitted(crate::state::SelfRefusal::NoAttestation),
            stream_id,
            &mut send,
            &mut recv,
        );
    };
    let keyed = serving_keys(
        &mut send,
        &mut recv,
        (node.identity.signing_key(), &attestation),
        &assertion,
        TOKEN_DEADLINE,
    )
    .await;
    let (mut sealer, opener, first, pending) = match keyed {
        Ok(k) => k,
        Err(cut) => return sealed_refused(&node, &pc, origin, &cut, &mut send, &mut recv),
    };
    let (status, tcp) = connect_backend(&node, &serve).await;
    let sent = send_record(
        &mut send,
        &mut sealer,
        RecordKind::Status,
        &[status.to_byte()],
    )
    .await;
    let Some(tcp) = tcp else {
        node.counters.refused("backend_unreachable");
        let _ = send.finish();
        return;
    };
    if sent.is_err() {
        return;
    }
    Counters::add(&node.counters.sealed_flows, 1);
    let mut ticket = node.streams.track(Flow {
        peer: pc.peer,
        origin,
        service: serve.service,
    });
    let stop = async {
        let why = ticket.stopped().await;
        (why.code(), why.reason())
    };
    let ends = SealedEnds {
        sealer,
        opener,
        pending,
        tcp_head: Some(first),
    };
    let rekey = Duration::from_secs(node.state_read().epoch.as_secs());
    let counters = node.counters.clone();
    match splice_sealed(tcp, send, recv, counters, ends, rekey, stop).await {
        SpliceEnd::Sealed(reason, detail) => {
            node.counters.refused(reason);
            node.audit_refusal(
                "stream_refused",
                pc.peer,
                reason,
                fields! {"peer" => pc.peer.to_string(), "origin" => origin.to_string(), "reason" => reason, "detail" => detail},
            );
        }
        SpliceEnd::Reset(e) => {
            tracing::debug!(peer = %pc.peer.short(), error = %e, "sealed inbound stream reset")
        }
        SpliceEnd::Clean { .. } | SpliceEnd::Refused(_) => {}
    }
}

/// Counts, audits and resets a relayed flow whose answer could not be sent or whose first
/// record did not prove the flow (a relay presenting a captured assertion, a changed record).
fn sealed_refused(
    node: &Shared,
    pc: &PeerConn,
    origin: NodeId,
    cut: &SealedCut,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    let reason = cut.reason();
    node.counters.refused(reason);
    let _ = send.reset(codes::STREAM_REFUSED);
    let _ = recv.stop(codes::STREAM_REFUSED);
    node.audit_refusal(
        "stream_refused",
        pc.peer,
        reason,
        fields! {"peer" => pc.peer.to_string(), "origin" => origin.to_string(), "reason" => reason, "detail" => cut.to_string()},
    );
}

/// As a relay: open the next hop's stream with our own token, pass the origin's header on,
/// then splice the two streams (the next hop's status byte is the first byte relayed back).
#[allow(clippy::too_many_arguments)]
async fn forward(
    node: Arc<Shared>,
    dial: Arc<dyn Dial>,
    pc: Arc<PeerConn>,
    next: NodeId,
    service: ServiceId,
    header: Vec<u8>,
    mut in_send: SendStream,
    in_recv: RecvStream,
) {
    let out = match dial.connection_to(next).await {
        Ok(out) => out,
        Err(_) => {
            let _ = in_send
                .write_all(&[StreamStatus::HostUnreachable.to_byte()])
                .await;
            let _ = in_send.finish();
            return;
        }
    };
    let Ok((mut out_send, out_recv)) = out.conn.open_bi().await else {
        let _ = in_send
            .write_all(&[StreamStatus::HostUnreachable.to_byte()])
            .await;
        let _ = in_send.finish();
        return;
    };
    let mint = Mint {
        dst: next,
        service,
        stream_id: u64::from(out_send.id()),
        header: &header,
    };
    let minted = node.state_read().mint(
        &mint,
        |seed, pair, generation, epoch| out.stream_key(seed, pair, generation, epoch),
        node.now(),
    );
    let token = match minted {
        Ok(t) => t,
        Err(why) => {
            node.counters.refused(why.reason());
            let _ = out_send.reset(codes::INTERNAL);
            let _ = in_send
                .write_all(&[StreamStatus::GeneralFailure.to_byte()])
                .await;
            let _ = in_send.finish();
            return;
        }
    };
    let first = [token.as_slice(), &header].concat();
    let written = tokio::time::timeout(RELAY_WRITE_DEADLINE, out_send.write_all(&first)).await;
    if !matches!(written, Ok(Ok(()))) {
        if written.is_err() {
            node.counters.refused("relay_write_stalled");
        }
        let _ = out_send.reset(codes::INTERNAL);
        let _ = in_send.reset(codes::INTERNAL);
        return;
    }
    // No wait for the next hop's status: it is the first byte coming back and passes through
    // the splice like any other, while the origin's bytes already go on (the next hop buffers
    // them until its gate admits the stream). A refusal on the way resets the whole chain.
    let tap = node.relay_tap.get().cloned();
    let relayed = splice_quic(
        in_send,
        in_recv,
        out_send,
        out_recv,
        RELAY_WRITE_DEADLINE,
        tap,
    )
    .await;
    match relayed {
        Ok(()) => {}
        Err(RelayError::Stalled) => {
            node.counters.refused("relay_write_stalled");
            tracing::debug!(peer = %pc.peer.short(), next = %next.short(), "relayed stream stalled; reset");
        }
        Err(e) => {
            tracing::debug!(peer = %pc.peer.short(), next = %next.short(), error = %e, "relayed stream reset")
        }
    }
}

async fn connect_backend(node: &Shared, serve: &ServePermit) -> (StreamStatus, Option<TcpStream>) {
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

/// Counts, audits and resets a refused stream. Token refusals that prove abuse close the
/// connection and are reported to the verifier; forged tokens feed the connection's meter.
fn refuse(
    node: &Shared,
    pc: &PeerConn,
    why: GateRefusal,
    stream_id: u64,
    send: &mut SendStream,
    recv: &mut RecvStream,
) {
    let reason = why.reason();
    node.counters.refused(reason);
    reset(send, recv, &why);
    let GateRefusal::Token(refusal) = why else {
        node.audit_refusal(
            "stream_refused",
            pc.peer,
            reason,
            fields! {"peer" => pc.peer.to_string(), "reason" => reason},
        );
        return;
    };
    node.audit_refusal(
        "stream_refused",
        pc.peer,
        reason,
        fields! {"peer" => pc.peer.to_string(), "reason" => reason, "stream" => stream_id, "detail" => refusal.to_string()},
    );
    let now = node.now();
    let report = |kind| Report {
        kind,
        peer: pc.peer,
        generation: match &refusal {
            TokenRefusal::CompromisedKeyUse(g) => Some(Generation(*g)),
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
        pc.close(CloseReason::Abuse(kind));
        node.report(report(kind));
        return;
    }
    if !refusal.is_forgery() {
        return;
    }
    let verdict = node.state_write().forgeries.record(pc.peer, now);
    if let ForgeryVerdict::Suspend { until, strikes } = verdict {
        // The peer's other connections close at the next watchdog tick (`doomed`: the peer
        // is no longer authorized while suspended); new handshakes are refused until `until`.
        node.counters.refused("forgery_suspension");
        node.audit(
            "forged_tokens",
            fields! {"peer" => pc.peer.to_string(), "strikes" => strikes, "suspended_until" => until.as_secs()},
        );
        pc.close(CloseReason::ForgedTokens);
        node.report(report(ReportKind::ForgedTokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_long_announced_header_costs_only_the_bytes_sent() {
        let (mut peer, mut ours) = tokio::io::duplex(1 << 20);
        peer.write_all(&[7u8; 100]).await.expect("write");
        let mut buf = Vec::new();
        // The peer announces the cap and then stalls.
        let stalled = tokio::time::timeout(
            Duration::from_millis(100),
            read_growing(&mut ours, &mut buf, 64 * 1024),
        )
        .await;
        assert!(stalled.is_err(), "nothing more was sent");
        assert_eq!(buf.len(), 100);
        assert!(
            buf.capacity() <= 100 + HEADER_READ_CHUNK,
            "grew to {} for 100 bytes",
            buf.capacity()
        );
        // The rest arrives: exactly the announced length, in order; the next bytes stay.
        let rest: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        peer.write_all(&rest).await.expect("write");
        read_growing(&mut ours, &mut buf, 64 * 1024)
            .await
            .expect("whole");
        assert_eq!(buf.len(), 64 * 1024);
        assert_eq!(&buf[100..], &rest[..64 * 1024 - 100]);
        // A stream that ends inside the header is an error, not a short header.
        drop(peer);
        let mut short = Vec::new();
        let mut ended: &[u8] = &[1, 2, 3];
        let e = read_growing(&mut ended, &mut short, 10)
            .await
            .expect_err("truncated");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
