//! Both ends of a relayed flow sealed end to end ([`hopmesh_protocol::flow_seal`]): relays
//! forward the records and can neither read nor change them.
//!
//! The exchange, after the gate at every hop has checked its token, the origin's assertion
//! and policy:
//!
//! ```text
//! origin                    relay(s)                 serving node
//!   token, header (assertion with e_o)  ─────────────▶  answer (attestation, e_s, signature)
//!   ◀─────────────────────────────────────────────────
//!   first record (the app's first bytes, or none) ───▶  opens it: the flow is proven, and
//!                                                        only now is the backend connected
//!   ◀──────────────────────────────── status record, then data records both ways
//! ```
//!
//! A record that fails to open resets the stream at the end that received it (counted and
//! audited there), and a stream that ends without the sender's `End` record is a truncation:
//! reset, never a clean close. Each direction moves to its next key at least every epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hopmesh_protocol::control::{FlowAssertion, StreamStatus};
use hopmesh_protocol::flow_seal::{
    Ephemeral, FlowAnswer, Opener, RecordKind, SealError, SealLimits, Sealer,
};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use hopmesh_transport::quic::codes;

use crate::counters::Counters;
use crate::refusal::RemoteRefusal;
use crate::splice::{CHUNKS, ReadBuf, SpliceEnd, rst, write_all_chunks};

/// Why the sealed part of a flow failed.
#[derive(Debug)]
pub enum SealedCut {
    /// A record or the answer was refused.
    Seal(SealError),
    /// The stream was reset or failed.
    Stream(String),
    /// The far end said nothing within the deadline.
    Timeout,
    /// The stream ended without the sender's `End` record (or before a record was whole).
    Truncated,
    /// A record of a kind that does not belong here (a status after the first record).
    Unexpected(RecordKind),
}

impl SealedCut {
    /// Stable reason name (counter label, audit `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Seal(e) => e.reason(),
            Self::Stream(_) => "flow_stream_failed",
            Self::Timeout => "flow_timeout",
            Self::Truncated => "flow_truncated",
            Self::Unexpected(_) => "flow_record_unexpected",
        }
    }
}

impl std::fmt::Display for SealedCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seal(e) => write!(f, "{e}"),
            Self::Stream(e) => write!(f, "stream: {e}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Truncated => f.write_str("truncated (no end record)"),
            Self::Unexpected(k) => write!(f, "unexpected {k:?} record"),
        }
    }
}

/// Reads until one whole record is at the front of `buf`, opens it and returns its kind and
/// payload (the record's bytes leave `buf`). `Ok(None)`: the stream ended cleanly first with
/// `buf` empty.
async fn next_record(
    recv: &mut RecvStream,
    opener: &mut Opener,
    buf: &mut BytesMut,
) -> Result<Option<(RecordKind, Bytes)>, SealedCut> {
    loop {
        if let Some(o) = opener.open(buf.as_mut()).map_err(SealedCut::Seal)? {
            let record = buf.split_to(o.used).freeze();
            return Ok(Some((o.kind, record.slice(o.payload))));
        }
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) if buf.is_empty() => return Ok(None),
            Ok(None) => return Err(SealedCut::Truncated),
            Err(e) => return Err(SealedCut::Stream(e.to_string())),
        }
    }
}

/// Reads one frame's worth of answer within `deadline`.
async fn read_answer(recv: &mut RecvStream, deadline: Duration) -> Result<FlowAnswer, SealedCut> {
    let read = async {
        let mut prefix = [0u8; 4];
        recv.read_exact(&mut prefix)
            .await
            .map_err(|e| SealedCut::Stream(e.to_string()))?;
        let len = FlowAnswer::body_len(prefix).map_err(SealedCut::Seal)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body)
            .await
            .map_err(|e| SealedCut::Stream(e.to_string()))?;
        FlowAnswer::from_body(&body).map_err(SealedCut::Seal)
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| SealedCut::Timeout)?
}

/// The origin's half of a flow being opened: its assertion and the private key behind it.
#[derive(Debug)]
pub struct OriginFlow {
    /// What the origin signed (in the header).
    pub assertion: FlowAssertion,
    /// The private half of the assertion's public key.
    pub ephemeral: Ephemeral,
}

/// What the origin checks the answer against.
#[derive(Clone, Debug)]
pub struct AnswerCheck {
    /// The pinned verifier keys.
    pub keys: hopmesh_protocol::attestation::KeySet,
    /// The flow's serving node.
    pub serving: hopmesh_protocol::ids::NodeId,
    /// Now.
    pub now: hopmesh_protocol::time::UnixTime,
}

/// As the origin, after the token and header left: reads the serving node's answer within
/// `deadline`, checks it and agrees the flow's keys.
pub async fn origin_keys(
    recv: &mut RecvStream,
    flow: OriginFlow,
    check: AnswerCheck,
    deadline: Duration,
) -> Result<(Sealer, Opener), SealedCut> {
    let answer = match read_answer(recv, deadline).await {
        Ok(a) => a,
        // A reset before the answer: a gate on the way refused (generic by design).
        Err(SealedCut::Stream(_)) => return Err(SealedCut::Stream("reset before answer".into())),
        Err(e) => return Err(e),
    };
    let th = answer
        .verify(&check.keys, &flow.assertion, &check.serving, check.now)
        .map_err(SealedCut::Seal)?;
    flow.ephemeral
        .agree(&answer.ephemeral, &th, true, SealLimits::default())
        .map_err(SealedCut::Seal)
}

/// As the origin: reads the serving node's status record within `deadline`. Returns the
/// bytes received behind it (records for the splice).
pub async fn origin_status(
    recv: &mut RecvStream,
    opener: &mut Opener,
    deadline: Duration,
) -> Result<BytesMut, RemoteRefusal> {
    let mut buf = BytesMut::new();
    let read = next_record(recv, opener, &mut buf);
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(RemoteRefusal::Timeout),
        Ok(Ok(Some((RecordKind::Status, s)))) => match StreamStatus::from_byte(s[0]) {
            StreamStatus::Connected => Ok(buf),
            other => Err(RemoteRefusal::Status(other)),
        },
        Ok(Ok(_)) => Err(RemoteRefusal::Sealed("flow_record_unexpected")),
        Ok(Err(SealedCut::Stream(_))) => Err(RemoteRefusal::Reset),
        Ok(Err(e)) => Err(RemoteRefusal::Sealed(e.reason())),
    }
}

/// As the serving node, for a relayed stream the gate admitted: answers with our own fresh
/// key, then waits (`deadline`) for the origin's first record, which proves the stream is the
/// origin's flow (a relay presenting a captured assertion cannot make it). Returns our keys,
/// the first record's payload and the bytes behind it.
pub async fn serving_keys(
    send: &mut SendStream,
    recv: &mut RecvStream,
    answer: (&hopmesh_protocol::attestation::SigningKey, &[u8]),
    assertion: &FlowAssertion,
    deadline: Duration,
) -> Result<(Sealer, Opener, Bytes, BytesMut), SealedCut> {
    let rng = ring::rand::SystemRandom::new();
    let e_s = Ephemeral::generate(&rng).map_err(SealedCut::Seal)?;
    let (key, attestation) = answer;
    let signed = FlowAnswer::sign(key, attestation, assertion, e_s.public())
        .map_err(|e| SealedCut::Stream(e.to_string()))?;
    let th = hopmesh_protocol::flow_seal::transcript(assertion, attestation, &e_s.public());
    let frame = signed
        .to_frame()
        .map_err(|e| SealedCut::Stream(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| SealedCut::Stream(e.to_string()))?;
    let (sealer, mut opener) = e_s
        .agree(&assertion.ephemeral, &th, false, SealLimits::default())
        .map_err(SealedCut::Seal)?;
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(deadline, next_record(recv, &mut opener, &mut buf))
        .await
        .map_err(|_| SealedCut::Timeout)??;
    match first {
        Some((RecordKind::Data, payload)) => Ok((sealer, opener, payload, buf)),
        Some((kind, _)) => Err(SealedCut::Unexpected(kind)),
        None => Err(SealedCut::Truncated),
    }
}

/// Writes one sealed record of `kind` (`End` also finishes the stream).
pub async fn send_record(
    send: &mut SendStream,
    sealer: &mut Sealer,
    kind: RecordKind,
    payload: &[u8],
) -> Result<(), SealedCut> {
    let mut out = Vec::with_capacity(payload.len() + hopmesh_protocol::flow_seal::RECORD_OVERHEAD);
    sealer
        .seal(kind, payload, &mut out)
        .map_err(SealedCut::Seal)?;
    send.write_all(&out)
        .await
        .map_err(|e| SealedCut::Stream(e.to_string()))?;
    if kind == RecordKind::End {
        let _ = send.finish();
    }
    Ok(())
}

/// A sealed flow's state when the splice starts.
#[derive(Debug)]
pub struct SealedEnds {
    /// Seals what TCP gives.
    pub sealer: Sealer,
    /// Opens what the stream gives.
    pub opener: Opener,
    /// Received bytes not yet opened.
    pub pending: BytesMut,
    /// Plaintext for TCP before anything else (the serving node's first record).
    pub tcp_head: Option<Bytes>,
}

/// Splices a TCP socket and a sealed flow's stream until both directions end (each with an
/// `End` record) or one fails, when both sides are reset. Our direction moves to its next key
/// every `rekey_every`. `stop` ends it early (a policy change), with its code.
pub async fn splice_sealed(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: Arc<Counters>,
    ends: SealedEnds,
    rekey_every: Duration,
    stop: impl std::future::Future<Output = (VarInt, &'static str)>,
) -> SpliceEnd {
    let SealedEnds {
        mut sealer,
        mut opener,
        mut pending,
        tcp_head,
    } = ends;
    let (mut tr, mut tw) = tcp.into_split();
    let result = {
        let up = async {
            let mut buf = ReadBuf::default();
            let mut total = 0u64;
            let mut keyed = Instant::now();
            loop {
                let room = buf.room();
                let free = room.capacity();
                let n = tr
                    .read_buf(room)
                    .await
                    .map_err(|e| SealedCut::Stream(format!("tcp read: {e}")))?;
                let mut out = Vec::new();
                if keyed.elapsed() >= rekey_every {
                    sealer.key_update(&mut out);
                    keyed = Instant::now();
                    Counters::add(&counters.seal_key_updates, 1);
                }
                if n == 0 {
                    sealer
                        .seal(RecordKind::End, &[], &mut out)
                        .map_err(SealedCut::Seal)?;
                    send.write_chunk(out.into())
                        .await
                        .map_err(|e| SealedCut::Stream(format!("quic write: {e}")))?;
                    send.finish()
                        .map_err(|e| SealedCut::Stream(format!("quic finish: {e}")))?;
                    return Ok::<u64, SealedCut>(total);
                }
                buf.filled(n, free);
                let plain = buf.take();
                sealer.seal_data(&plain, &mut out);
                send.write_chunk(out.into())
                    .await
                    .map_err(|e| SealedCut::Stream(format!("quic write: {e}")))?;
                total += n as u64;
                Counters::add(&counters.bytes_out, n as u64);
            }
        };
        let down = async {
            let mut total = 0u64;
            let mut chunks: [Bytes; CHUNKS] = Default::default();
            if let Some(head) = tcp_head.filter(|h| !h.is_empty()) {
                let n = head.len() as u64;
                chunks[0] = head;
                write_all_chunks(&mut tw, &mut chunks[..1])
                    .await
                    .map_err(|e| SealedCut::Stream(format!("tcp write: {e}")))?;
                total += n;
                Counters::add(&counters.bytes_in, n);
            }
            loop {
                // Open every whole record received, then write their payloads in one batch.
                let mut k = 0;
                while k < CHUNKS {
                    let Some(o) = opener.open(pending.as_mut()).map_err(SealedCut::Seal)? else {
                        break;
                    };
                    let record = pending.split_to(o.used).freeze();
                    match o.kind {
                        RecordKind::Data if !o.payload.is_empty() => {
                            chunks[k] = record.slice(o.payload);
                            k += 1;
                        }
                        RecordKind::Data | RecordKind::KeyUpdate | RecordKind::End => {}
                        RecordKind::Status => return Err(SealedCut::Unexpected(o.kind)),
                    }
                }
                if k > 0 {
                    let n = write_all_chunks(&mut tw, &mut chunks[..k])
                        .await
                        .map_err(|e| SealedCut::Stream(format!("tcp write: {e}")))?;
                    total += n;
                    Counters::add(&counters.bytes_in, n);
                    continue;
                }
                if opener.ended() {
                    // Nothing may follow the end record but the stream's own end.
                    match recv.read_chunk(usize::MAX, true).await {
                        Ok(None) if pending.is_empty() => {
                            tw.shutdown()
                                .await
                                .map_err(|e| SealedCut::Stream(format!("tcp shutdown: {e}")))?;
                            return Ok::<u64, SealedCut>(total);
                        }
                        Ok(_) => return Err(SealedCut::Seal(SealError::AfterEnd)),
                        Err(e) => return Err(SealedCut::Stream(format!("quic read: {e}"))),
                    }
                }
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => pending.extend_from_slice(&chunk.bytes),
                    Ok(None) => return Err(SealedCut::Truncated),
                    Err(e) => return Err(SealedCut::Stream(format!("quic read: {e}"))),
                }
            }
        };
        tokio::pin!(up, down, stop);
        let (mut u, mut d) = (None, None);
        loop {
            let cut = tokio::select! {
                r = &mut up, if u.is_none() => match r { Ok(n) => { u = Some(n); None } Err(e) => Some(e) },
                r = &mut down, if d.is_none() => match r { Ok(n) => { d = Some(n); None } Err(e) => Some(e) },
                (code, why) = &mut stop => break Err((code, SealedCut::Stream(format!("stopped: {why}")))),
            };
            if let Some(cut) = cut {
                break Err((codes::INTERNAL, cut));
            }
            if let (Some(up), Some(down)) = (u, d) {
                break Ok((up, down));
            }
        }
    };
    match result {
        Ok((up, down)) => {
            let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
            SpliceEnd::Clean { up, down }
        }
        Err((code, cut)) => {
            let _ = send.reset(code);
            let _ = recv.stop(code);
            if let Ok(tcp) = tr.reunite(tw) {
                rst(tcp);
            }
            match cut {
                SealedCut::Seal(_) | SealedCut::Truncated | SealedCut::Unexpected(_) => {
                    SpliceEnd::Sealed(cut.reason(), cut.to_string())
                }
                SealedCut::Stream(e) => SpliceEnd::Reset(e),
                SealedCut::Timeout => SpliceEnd::Reset("timed out".into()),
            }
        }
    }
}
