//! Moving bytes between a TCP socket and a QUIC stream, both ways, with half-close.
//!
//! EOF on one side finishes the other side's send direction; the other direction goes on.
//! Any error resets the QUIC stream and RSTs the TCP socket (`SO_LINGER 0`): a dropped
//! quinn `SendStream` finishes cleanly, and a clean end after missing bytes would be a lie
//! (`docs/design.md`, pitfall 5).

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hopmesh_transport::quic::codes;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::counters::Counters;
use crate::refusal::RemoteRefusal;
use hopmesh_protocol::control::StreamStatus;

/// First read buffer of a direction: small, so an idle or short-lived stream costs little.
pub const MIN_READ: usize = 16 * 1024;
/// Largest read buffer: a bulk stream reaches it after a few reads that fill the buffer. Large
/// reads cost fewer syscalls and hand quinn whole 64 KiB datagrams of data (100 parallel 10 MiB
/// downloads over loopback, one after the other: 64 KiB reads 1 062, 256 KiB reads 1 280 MB/s).
pub const MAX_READ: usize = 256 * 1024;

/// A read buffer that starts at [`MIN_READ`] and doubles, up to [`MAX_READ`], whenever a read
/// fills all the room it was given.
#[derive(Debug)]
pub struct ReadBuf {
    buf: BytesMut,
    want: usize,
    grown: bool,
}

impl Default for ReadBuf {
    fn default() -> Self {
        ReadBuf {
            buf: BytesMut::with_capacity(MIN_READ),
            want: MIN_READ,
            grown: false,
        }
    }
}

impl ReadBuf {
    /// Room for the next read, empty: the bytes of the last read are gone (taken by
    /// [`Self::take`], or dropped here). The room is the wanted size after a growth, else what
    /// is left of the allocation as long as that is a quarter of the wanted size. The
    /// allocation is reused when no taken bytes still share it; otherwise a new one of exactly
    /// the wanted size is made (`reserve` would double past [`MAX_READ`]).
    pub fn room(&mut self) -> &mut BytesMut {
        self.buf.clear();
        if self.grown || self.buf.capacity() < self.want / 4 {
            if !self.buf.try_reclaim(self.want) {
                self.buf = BytesMut::with_capacity(self.want);
            }
            self.grown = false;
        }
        &mut self.buf
    }

    /// Records a read of `n` bytes into a room of `room` bytes: a full room doubles the wanted
    /// size, up to [`MAX_READ`].
    pub fn filled(&mut self, n: usize, room: usize) {
        if n >= room && self.want < MAX_READ {
            self.want = (self.want * 2).min(MAX_READ);
            self.grown = true;
        }
    }

    /// The bytes read, without a copy (the buffer's remaining room stays for the next read).
    pub fn take(&mut self) -> bytes::Bytes {
        self.buf.split().freeze()
    }

    /// The size reads are currently given room for.
    pub fn wanted(&self) -> usize {
        self.want
    }
}

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions ended with EOF; all bytes delivered.
    Clean {
        /// Bytes TCP → QUIC.
        up: u64,
        /// Bytes QUIC → TCP.
        down: u64,
    },
    /// A direction failed; both sides were reset.
    Reset(String),
    /// The far end refused the stream before its status said "connected" (a splice that
    /// began before the status, [`splice_after_status`]); both sides were reset.
    Refused(RemoteRefusal),
    /// A sealed (relayed) flow's record failed to open, came out of place, or the stream was
    /// truncated (`crate::sealed`): the reason and detail; both sides were reset.
    Sealed(&'static str, String),
}

/// Splices until both directions end or one fails. TCP → QUIC bytes (from a local app or
/// backend into the mesh) count as `bytes_out`, QUIC → TCP as `bytes_in`, on either end.
pub async fn splice(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    counters: Arc<Counters>,
) -> SpliceEnd {
    splice_inner(
        tcp,
        send,
        recv,
        counters,
        std::future::pending(),
        Opening::default(),
    )
    .await
}

/// [`splice`], ended early when `stop` resolves: both sides are reset with the code it gives
/// (a policy change that forbids the stream), never finished cleanly.
pub async fn splice_until(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    counters: Arc<Counters>,
    stop: impl std::future::Future<Output = (VarInt, &'static str)>,
) -> SpliceEnd {
    splice_inner(tcp, send, recv, counters, stop, Opening::default()).await
}

/// How long the serving node holds its "connected" status byte for the backend's first bytes
/// when the origin already sent the app's bytes behind its header (an early SOCKS reply: the
/// origin is not waiting for the status to let its app send), so both leave in one packet. A
/// backend that is slower to answer gets the status sent alone (counted `status_sent_alone`):
/// the origin's `STATUS_DEADLINE` never comes near.
pub const STATUS_WAIT: Duration = Duration::from_millis(1);

/// The serving node's [`splice_until`] for a stream whose origin sent `early` (the app's first
/// bytes, already read from the stream) behind its header: they go to the backend first, and
/// the "connected" status byte leaves with the backend's first bytes (or alone after
/// [`STATUS_WAIT`]). The bytes on the stream are the same as with [`splice_until`] after the
/// status was written; only the packets differ.
pub async fn splice_serving_early(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    counters: Arc<Counters>,
    early: Bytes,
    stop: impl std::future::Future<Output = (VarInt, &'static str)>,
) -> SpliceEnd {
    let opening = Opening {
        up_head: Some(UpHead {
            bytes: Bytes::from_static(&[0]),
            wait: STATUS_WAIT,
            kind: HeadKind::Status,
        }),
        down_head: Some(early),
        status_deadline: None,
    };
    debug_assert_eq!(StreamStatus::Connected.to_byte(), 0);
    splice_inner(tcp, send, recv, counters, stop, opening).await
}

/// What goes first in each direction of a splice.
#[derive(Default)]
struct Opening {
    /// Bytes for the stream before any from TCP: they leave with TCP's first bytes, or alone
    /// after the wait.
    up_head: Option<UpHead>,
    /// Bytes already read from the stream, for TCP before any others.
    down_head: Option<Bytes>,
    /// The first byte coming down is the far end's status, due within this.
    status_deadline: Option<Duration>,
}

/// See [`Opening::up_head`].
struct UpHead {
    bytes: Bytes,
    wait: Duration,
    kind: HeadKind,
}

/// What an [`UpHead`] is (which counter a lonely one counts in).
#[derive(Clone, Copy)]
enum HeadKind {
    /// The origin's token and header: `header_sent_alone`.
    Header,
    /// The serving node's status byte: `status_sent_alone`.
    Status,
}

/// How long the token and header wait for the app's first bytes after an early SOCKS reply,
/// to leave in one packet with them. An app that speaks first (HTTP, TLS, gRPC) answers the
/// reply within microseconds on the same host; a server-speaks-first protocol pays this once
/// per connection (counted: `header_sent_alone`).
pub const FIRST_BYTES_WAIT: Duration = Duration::from_millis(1);

/// [`splice`] begun before the far end's status byte, with `head` (our token and header) still
/// to send: it goes out with the app's first bytes, or alone after [`FIRST_BYTES_WAIT`]. The
/// app's bytes then go up at once, while the first byte coming down must be the status, within
/// `deadline`. Anything but "connected", a reset before it, or no status in time ends the
/// splice as [`SpliceEnd::Refused`], with both sides reset: the app, told "succeeded" already,
/// sees its connection reset, never a clean close.
pub async fn splice_after_status(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    counters: Arc<Counters>,
    head: Bytes,
    deadline: Duration,
) -> SpliceEnd {
    let opening = Opening {
        up_head: Some(UpHead {
            bytes: head,
            wait: FIRST_BYTES_WAIT,
            kind: HeadKind::Header,
        }),
        down_head: None,
        status_deadline: Some(deadline),
    };
    splice_inner(tcp, send, recv, counters, std::future::pending(), opening).await
}

/// Reads the far end's one status byte within `deadline`: `Ok` for "connected".
pub async fn read_status(recv: &mut RecvStream, deadline: Duration) -> Result<(), RemoteRefusal> {
    let mut status = [0u8; 1];
    match tokio::time::timeout(deadline, recv.read_exact(&mut status)).await {
        Ok(Ok(())) => match StreamStatus::from_byte(status[0]) {
            StreamStatus::Connected => Ok(()),
            other => Err(RemoteRefusal::Status(other)),
        },
        // A reset stream: a hop refused the token (generic by design), or the stream ended.
        Ok(Err(_)) => Err(RemoteRefusal::Reset),
        Err(_) => Err(RemoteRefusal::Timeout),
    }
}

/// Why a direction of a splice stopped.
enum Cut {
    /// A read or write failed on the TCP side or reading QUIC.
    Failed(String),
    /// Writing to QUIC failed: the peer stopped the stream (before the status: a refusal).
    QuicWrite(String),
    /// The status said no.
    Refused(RemoteRefusal),
}

async fn splice_inner(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: Arc<Counters>,
    stop: impl std::future::Future<Output = (VarInt, &'static str)>,
    opening: Opening,
) -> SpliceEnd {
    let Opening {
        up_head,
        down_head,
        status_deadline,
    } = opening;
    // (The callers set TCP_NODELAY when they accept or connect the socket.)
    let (mut tr, mut tw) = tcp.into_split();
    // Set once the status said "connected" (at once when there is none to wait for).
    // (An atomic only because the future must be `Send`; both users are in this task.)
    let connected = AtomicBool::new(status_deadline.is_none());
    let result = {
        let up = async {
            // `BytesMut` + `read_buf`: the buffer is never zeroed (a zeroed 64 KiB per
            // direction per stream was 5 % of the CPU of 7 000 short requests per second).
            // `write_chunk` hands the bytes to quinn without the copy `write` makes (that copy
            // was 8 % of the sending node's CPU in a 1 GiB transfer).
            let mut buf = ReadBuf::default();
            let mut total = 0u64;
            if let Some(head) = up_head {
                // Both chunks are queued before quinn's connection task runs: one packet.
                let room = buf.room();
                let free = room.capacity();
                let first = tokio::time::timeout(head.wait, tr.read_buf(room)).await;
                send.write_chunk(head.bytes)
                    .await
                    .map_err(|e| Cut::QuicWrite(format!("quic write: {e}")))?;
                match first {
                    Err(_) => Counters::add(
                        match head.kind {
                            HeadKind::Header => &counters.header_sent_alone,
                            HeadKind::Status => &counters.status_sent_alone,
                        },
                        1,
                    ),
                    Ok(Err(e)) => return Err(Cut::Failed(format!("tcp read: {e}"))),
                    Ok(Ok(0)) => {
                        send.finish()
                            .map_err(|e| Cut::QuicWrite(format!("quic finish: {e}")))?;
                        return Ok(0);
                    }
                    Ok(Ok(n)) => {
                        buf.filled(n, free);
                        send.write_chunk(buf.take())
                            .await
                            .map_err(|e| Cut::QuicWrite(format!("quic write: {e}")))?;
                        total += n as u64;
                        Counters::add(&counters.bytes_out, n as u64);
                    }
                }
            }
            loop {
                let room = buf.room();
                let free = room.capacity();
                let n = tr
                    .read_buf(room)
                    .await
                    .map_err(|e| Cut::Failed(format!("tcp read: {e}")))?;
                if n == 0 {
                    send.finish()
                        .map_err(|e| Cut::QuicWrite(format!("quic finish: {e}")))?;
                    return Ok::<u64, Cut>(total);
                }
                buf.filled(n, free);
                send.write_chunk(buf.take())
                    .await
                    .map_err(|e| Cut::QuicWrite(format!("quic write: {e}")))?;
                total += n as u64;
                Counters::add(&counters.bytes_out, n as u64);
            }
        };
        let down = async {
            if let Some(deadline) = status_deadline {
                read_status(&mut recv, deadline)
                    .await
                    .map_err(Cut::Refused)?;
                connected.store(true, Ordering::Relaxed);
            }
            // `read_chunks`: quinn's received bytes as they are, written to TCP with one
            // vectored write per batch (no copy into a buffer of ours).
            let mut chunks: [Bytes; CHUNKS] = Default::default();
            let mut total = 0u64;
            if let Some(early) = down_head {
                let n = early.len() as u64;
                chunks[0] = early;
                write_all_chunks(&mut tw, &mut chunks[..1])
                    .await
                    .map_err(|e| Cut::Failed(format!("tcp write: {e}")))?;
                total += n;
                Counters::add(&counters.bytes_in, n);
            }
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(None) => {
                        tw.shutdown()
                            .await
                            .map_err(|e| Cut::Failed(format!("tcp shutdown: {e}")))?;
                        return Ok::<u64, Cut>(total);
                    }
                    Ok(Some(k)) => {
                        let n = write_all_chunks(&mut tw, &mut chunks[..k])
                            .await
                            .map_err(|e| Cut::Failed(format!("tcp write: {e}")))?;
                        total += n;
                        Counters::add(&counters.bytes_in, n);
                    }
                    Err(e) => return Err(Cut::Failed(format!("quic read: {e}"))),
                }
            }
        };
        tokio::pin!(up, down, stop);
        let (mut u, mut d) = (None, None);
        loop {
            let cut = tokio::select! {
                r = &mut up, if u.is_none() => match r { Ok(n) => { u = Some(n); None } Err(e) => Some(e) },
                r = &mut down, if d.is_none() => match r { Ok(n) => { d = Some(n); None } Err(e) => Some(e) },
                (code, why) = &mut stop => break Err((code, Cut::Failed(format!("stopped: {why}")))),
            };
            match cut {
                // A stream stopped before its status: the far end refused it (its gate resets
                // both directions; the write side may notice first).
                Some(Cut::QuicWrite(_)) if !connected.load(Ordering::Relaxed) => {
                    break Err((codes::INTERNAL, Cut::Refused(RemoteRefusal::Reset)));
                }
                Some(cut) => break Err((codes::INTERNAL, cut)),
                None => {}
            }
            if let (Some(up), Some(down)) = (u, d) {
                break Ok((up, down));
            }
        }
    };
    match result {
        Ok((up, down)) => {
            // Keep the stream until the peer has everything (finish() alone returns at once).
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
                Cut::Refused(r) => SpliceEnd::Refused(r),
                Cut::Failed(e) | Cut::QuicWrite(e) => SpliceEnd::Reset(e),
            }
        }
    }
}

/// Chunks taken from quinn per read: a vectored write of up to this many.
pub(crate) const CHUNKS: usize = 32;

/// Writes every chunk, in order, with vectored writes; returns the bytes written. The chunks
/// are consumed (left empty).
pub(crate) async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<u64> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(total as u64);
        }
        let live = (chunks.len() - first).min(CHUNKS);
        let slices: [IoSlice<'_>; CHUNKS] = std::array::from_fn(|i| {
            IoSlice::new(if i < live {
                &chunks[first + i][..]
            } else {
                &[][..]
            })
        });
        let mut n = w.write_vectored(&slices[..live]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < chunks.len() {
            let c = &mut chunks[first];
            if n >= c.len() {
                n -= c.len();
                *c = Bytes::new();
                first += 1;
            } else {
                c.advance(n);
                n = 0;
            }
        }
    }
}

/// A relayed write (either direction) that makes no progress for this long resets the relayed
/// stream with [`STREAM_STALLED`]: a hop that stops reading (gives no flow-control credit)
/// cannot pin the relay's task, its buffered chunks and both streams forever. The cost: an app
/// that pauses reading for longer than this behind a relay loses its stream, explicitly.
pub const RELAY_WRITE_DEADLINE: Duration = Duration::from_secs(60);

/// Stream reset code of a relayed stream whose write made no progress within
/// [`RELAY_WRITE_DEADLINE`].
pub const STREAM_STALLED: VarInt = VarInt::from_u32(hopmesh_protocol::codes::STREAM_STALLED);

/// How a relayed stream failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayError {
    /// A write made no progress within the deadline (the hop does not read).
    Stalled,
    /// A read or write failed (reset, connection lost).
    Failed(String),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stalled => f.write_str("relayed write stalled"),
            Self::Failed(e) => f.write_str(e),
        }
    }
}

/// Writes every chunk, each call to quinn under `deadline`: progress, not the whole batch,
/// is what the deadline bounds (a slow hop that reads is never cut).
async fn write_progressing(
    to: &mut SendStream,
    chunks: &mut [Bytes],
    deadline: Duration,
) -> Result<(), RelayError> {
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        match tokio::time::timeout(deadline, to.write_chunks(&mut chunks[first..])).await {
            Err(_) => return Err(RelayError::Stalled),
            Ok(Err(e)) => return Err(RelayError::Failed(e.to_string())),
            Ok(Ok(w)) => first += w.chunks,
        }
    }
}

/// Test instrumentation of a relay: sees every chunk it forwards (after the stream header it
/// checked), and may change it. Set only by tests, on [`crate::shared::Shared::relay_tap`],
/// to show what a compromised relay can and cannot do.
pub trait RelayTap: Send + Sync + std::fmt::Debug {
    /// A relayed stream starts: its number for [`Self::chunk`].
    fn begin(&self) -> u64 {
        0
    }
    /// A chunk of stream `flow` on its way toward the serving node (`toward_serving`) or back
    /// to the origin.
    fn chunk(&self, flow: u64, toward_serving: bool, chunk: &mut Bytes);
}

/// Splices two QUIC streams (a relay): each direction finishes on EOF; any error resets all
/// four halves so neither end can mistake a cut for a clean end. A write that makes no
/// progress within `deadline` ([`RELAY_WRITE_DEADLINE`] in the node) is
/// [`RelayError::Stalled`], reset with [`STREAM_STALLED`]. `a` is the origin's side.
pub async fn splice_quic(
    mut a_send: SendStream,
    mut a_recv: RecvStream,
    mut b_send: SendStream,
    mut b_recv: RecvStream,
    deadline: Duration,
    tap: Option<Arc<dyn RelayTap>>,
) -> Result<(), RelayError> {
    // Chunks pass from one stream to the other as they are: no copy.
    async fn pump(
        from: &mut RecvStream,
        to: &mut SendStream,
        deadline: Duration,
        tap: Option<(&dyn RelayTap, u64, bool)>,
    ) -> Result<(), RelayError> {
        let mut chunks: [Bytes; CHUNKS] = Default::default();
        loop {
            match from
                .read_chunks(&mut chunks)
                .await
                .map_err(|e| RelayError::Failed(e.to_string()))?
            {
                None => return to.finish().map_err(|e| RelayError::Failed(e.to_string())),
                Some(k) => {
                    if let Some((tap, flow, toward_serving)) = tap {
                        for c in &mut chunks[..k] {
                            tap.chunk(flow, toward_serving, c);
                        }
                    }
                    write_progressing(to, &mut chunks[..k], deadline).await?
                }
            }
        }
    }
    let result = {
        let tap = tap.as_deref().map(|t| (t, t.begin()));
        let ab = pump(
            &mut a_recv,
            &mut b_send,
            deadline,
            tap.map(|(t, f)| (t, f, true)),
        );
        let ba = pump(
            &mut b_recv,
            &mut a_send,
            deadline,
            tap.map(|(t, f)| (t, f, false)),
        );
        tokio::try_join!(ab, ba).map(|_| ())
    };
    match result {
        Ok(()) => {
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                let _ = a_send.stopped().await;
                let _ = b_send.stopped().await;
            })
            .await;
            Ok(())
        }
        Err(e) => {
            let code = match e {
                RelayError::Stalled => STREAM_STALLED,
                RelayError::Failed(_) => codes::INTERNAL,
            };
            for s in [&mut a_send, &mut b_send] {
                let _ = s.reset(code);
            }
            for r in [&mut a_recv, &mut b_recv] {
                let _ = r.stop(code);
            }
            Err(e)
        }
    }
}

/// Closes a TCP socket with RST instead of FIN.
pub fn rst(tcp: TcpStream) {
    #[allow(deprecated)] // set_linger is the portable way to ask for an RST on close.
    let _ = tcp.set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// Simulates a read of up to `avail` bytes into the room, as `read_buf` does.
    fn read(buf: &mut ReadBuf, avail: usize, byte: u8) -> (usize, usize) {
        let room = buf.room();
        let free = room.capacity() - room.len();
        let n = avail.min(free);
        room.put_bytes(byte, n);
        buf.filled(n, free);
        (n, free)
    }

    #[test]
    fn starts_small_and_doubles_on_full_reads_up_to_the_cap() {
        let mut buf = ReadBuf::default();
        assert_eq!(buf.wanted(), MIN_READ);
        let mut rooms = Vec::new();
        for _ in 0..8 {
            let (n, free) = read(&mut buf, usize::MAX, 1);
            assert_eq!(n, free);
            rooms.push(free);
            let _ = buf.take();
        }
        assert_eq!(rooms[0], MIN_READ);
        assert!(rooms.windows(2).all(|w| w[1] >= w[0]), "{rooms:?}");
        assert_eq!(buf.wanted(), MAX_READ);
        assert!(rooms.contains(&MAX_READ), "{rooms:?}");
        assert!(rooms.iter().all(|&r| r <= MAX_READ), "{rooms:?}");
    }

    #[test]
    fn partial_reads_do_not_grow_the_buffer() {
        let mut buf = ReadBuf::default();
        for _ in 0..100 {
            read(&mut buf, 100, 2);
            assert_eq!(&buf.take()[..], &[2u8; 100][..]);
        }
        assert_eq!(buf.wanted(), MIN_READ);
    }

    #[test]
    fn taken_bytes_survive_later_reads() {
        let mut buf = ReadBuf::default();
        let mut taken = Vec::new();
        for i in 0..50u8 {
            let (n, _) = read(&mut buf, 5000 + usize::from(i) * 3000, i);
            assert!(n > 0);
            taken.push((i, n, buf.take()));
        }
        for (i, n, t) in taken {
            assert_eq!(t.len(), n);
            assert!(t.iter().all(|&b| b == i), "chunk {i} overwritten");
        }
    }

    /// A writer that takes at most `max` bytes per call, from the first non-empty slice on,
    /// and can be told to return 0.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
        zero: bool,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let me = self.get_mut();
            me.calls += 1;
            let n = if me.zero { 0 } else { buf.len().min(me.max) };
            me.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let me = self.get_mut();
            me.calls += 1;
            let mut room = if me.zero { 0 } else { me.max };
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(room);
                me.out.extend_from_slice(&b[..k]);
                room -= k;
                n += k;
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn chunks_of(sizes: &[usize]) -> (Vec<Bytes>, Vec<u8>) {
        let mut all = Vec::new();
        let chunks = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let c: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                all.extend_from_slice(&c);
                Bytes::from(c)
            })
            .collect();
        (chunks, all)
    }

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order_through_partial_writes() {
        for max in [1, 7, 100, 4096, usize::MAX] {
            let (mut chunks, all) = chunks_of(&[0, 5, 1000, 0, 3, 70_000, 1, 0]);
            let mut w = Trickle {
                out: Vec::new(),
                max,
                zero: false,
                calls: 0,
            };
            let n = write_all_chunks(&mut w, &mut chunks).await.expect("write");
            assert_eq!(n, all.len() as u64);
            assert_eq!(w.out, all, "max {max}");
            assert!(chunks.iter().all(Bytes::is_empty));
            if max == usize::MAX {
                assert_eq!(w.calls, 1, "one vectored write for the whole batch");
            }
        }
    }

    #[tokio::test]
    async fn more_chunks_than_one_vectored_write_takes_are_all_written() {
        let sizes: Vec<usize> = (0..3 * CHUNKS).map(|i| i % 5 * 10).collect();
        let (mut chunks, all) = chunks_of(&sizes);
        let mut w = Trickle {
            out: Vec::new(),
            max: usize::MAX,
            zero: false,
            calls: 0,
        };
        write_all_chunks(&mut w, &mut chunks).await.expect("write");
        assert_eq!(w.out, all);
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_hang() {
        let (mut chunks, _) = chunks_of(&[10]);
        let mut w = Trickle {
            out: Vec::new(),
            max: 0,
            zero: true,
            calls: 0,
        };
        let e = write_all_chunks(&mut w, &mut chunks)
            .await
            .expect_err("zero write");
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        let (mut empty, _) = chunks_of(&[0, 0]);
        assert_eq!(
            write_all_chunks(&mut w, &mut empty).await.expect("empty"),
            0
        );
    }

    #[test]
    fn bytes_not_taken_are_dropped_by_the_next_read() {
        let mut buf = ReadBuf::default();
        read(&mut buf, 10, 7);
        read(&mut buf, 3, 9);
        assert_eq!(&buf.take()[..], &[9, 9, 9]);
    }
}
