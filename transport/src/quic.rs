//! quinn endpoints, connection identity and exporter, and capped frame IO on streams.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::frame::{LEN_PREFIX, body_len, decode_body, encode_frame};
use hopmesh_protocol::hop_token::{EXPORTER_LABEL, PairIds, exporter_context};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::secret::ConnectionBinding;
use hopmesh_protocol::wire::{DecodeError, EncodeError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, RecvStream, SendStream, TokioRuntime, TransportConfig,
    VarInt,
};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::TransportError;
use crate::identity::cert_spki;

/// Socket buffers asked for on the QUIC socket, each direction. The kernel default (208 KiB on
/// Debian) overflows within a millisecond at loopback or 10 Gbit/s rates whenever the receiving
/// process is not scheduled, and every drop costs a retransmission and, in bursts, trips quinn's
/// MTU black-hole detection back to 1200-byte packets. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`; long-running services log a smaller result (see
/// [`log_if_capped`]).
pub const UDP_BUFFER: usize = 16 << 20;

/// Sizes the buffers (see [`size_udp_buffers`]) and logs, once at start of a long-running
/// service, sizes smaller than [`UDP_BUFFER`], with the sysctl that raises the kernel's cap.
/// Returns the (receive, send) sizes obtained.
pub fn log_if_capped(socket: &UdpSocket) -> (usize, usize) {
    let (recv, send) = size_udp_buffers(socket);
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        tracing::info!(
            recv,
            send,
            wanted = UDP_BUFFER,
            "UDP socket buffers capped by the kernel; raise the cap with \
             `sysctl -w net.core.rmem_max={UDP_BUFFER} net.core.wmem_max={UDP_BUFFER}`",
        );
    }
    (recv, send)
}

/// Asks for [`UDP_BUFFER`] in both directions; returns the (receive, send) sizes obtained.
pub fn size_udp_buffers(socket: &UdpSocket) -> (usize, usize) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice the usable size (bookkeeping overhead included).
    (
        sock.recv_buffer_size().unwrap_or(0) / 2,
        sock.send_buffer_size().unwrap_or(0) / 2,
    )
}

/// Receive window of one stream in every [`transport_config`] (quinn's default is 1.25 MB).
/// Callers with other needs set their own: the node's data paths (`node/src/path.rs`) and the
/// verifier (`verifier/src/service.rs`, request-sized).
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;
/// Receive window of a whole connection in every [`transport_config`]: quinn's default is
/// unbounded (`VarInt::MAX`), so a peer could make us buffer any amount across streams that
/// nobody reads (docs/design.md, pitfall 18).
pub const DEFAULT_CONNECTION_WINDOW: u32 = 4 << 20;

/// Transport parameters: idle timeout and keep-alive, and bounded memory a peer can make us
/// hold: no unidirectional streams (hopmesh uses none; quinn's default lets a peer open 100
/// that nobody accepts and fill each), no QUIC datagrams (unused; quinn buffers 1.25 MB of
/// them by default), stream and connection receive windows [`DEFAULT_STREAM_WINDOW`] and
/// [`DEFAULT_CONNECTION_WINDOW`].
pub fn transport_config(idle_timeout: Duration, keep_alive: Duration) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Invariant: idle timeouts we configure are well below the 2^62 ms VarInt limit.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(Some(keep_alive));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window(VarInt::from_u32(DEFAULT_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(DEFAULT_CONNECTION_WINDOW));
    t
}

/// Connection attempts a server endpoint holds before the application accepts or refuses
/// them (quinn's default is 65 536).
pub const MAX_INCOMING: usize = 1024;
/// Bytes buffered for one connection attempt not yet accepted (quinn's default is 10 MiB; with
/// 0-RTT off only handshake packets arrive before acceptance).
pub const INCOMING_BUFFER: u64 = 64 << 10;
/// Bytes buffered for all connection attempts not yet accepted (quinn's default is 100 MiB).
pub const INCOMING_BUFFER_TOTAL: u64 = 8 << 20;

/// Wraps a rustls server config for quinn, with the endpoint's buffers for connection attempts
/// bounded by [`MAX_INCOMING`], [`INCOMING_BUFFER`] and [`INCOMING_BUFFER_TOTAL`].
pub fn quinn_server(
    tls: rustls::ServerConfig,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|_| TransportError::NoInitialSuite)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    cfg.max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// Wraps a rustls client config for quinn.
pub fn quinn_client(
    tls: rustls::ClientConfig,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|_| TransportError::NoInitialSuite)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// An endpoint on an already bound socket (tests bind port 0), serving if `server` is set.
pub fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    endpoint_with(socket, server, EndpointConfig::default())
}

/// [`endpoint`] with explicit endpoint settings (the node raises `max_udp_payload_size`).
pub fn endpoint_with(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    config: EndpointConfig,
) -> Result<Endpoint, TransportError> {
    size_udp_buffers(&socket);
    Endpoint::new(config, server, socket, Arc::new(TokioRuntime)).map_err(|e| TransportError::Io {
        path: "udp socket".into(),
        source: e,
    })
}

/// The peer's SPKI, from the certificate the handshake authenticated.
pub fn peer_spki(conn: &Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    cert_spki(certs.first()?).ok()
}

/// The peer's node id, from the certificate the handshake authenticated.
pub fn peer_node_id(conn: &Connection) -> Option<NodeId> {
    peer_spki(conn).map(|spki| NodeId::from_spki(&spki))
}

/// `X` for this connection: 32 exporter bytes bound to the ALPN and the pair.
pub fn connection_binding(
    conn: &Connection,
    alpn: &[u8],
    pair: &PairIds,
) -> Result<ConnectionBinding, TransportError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, &exporter_context(alpn, pair))
        .map_err(|_| TransportError::Exporter)?;
    Ok(ConnectionBinding::from_bytes(out))
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The stream ended inside a frame: truncation, never mistaken for a clean end.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The peer reset the stream or the connection failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The frame was refused by the decoder (cap, version, canonical form...).
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The message could not be encoded under the cap.
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// Nothing arrived before the deadline.
    #[error("timed out waiting for a frame")]
    Timeout,
}

impl FrameIoError {
    /// True when the peer (not the transport) sent something wrong.
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, Self::Truncated | Self::Decode(_))
    }
}

/// Reads one frame with `cap`. `Ok(None)` when the stream finished cleanly before any byte of
/// a new frame; a finish inside a frame is [`FrameIoError::Truncated`].
pub async fn read_frame<T: Serialize + DeserializeOwned>(
    recv: &mut RecvStream,
    cap: usize,
) -> Result<Option<T>, FrameIoError> {
    let mut prefix = [0u8; LEN_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameIoError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = body_len(prefix, cap)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameIoError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some(decode_body(&body, cap)?))
}

/// [`read_frame`] under a deadline.
pub async fn read_frame_within<T: Serialize + DeserializeOwned>(
    recv: &mut RecvStream,
    cap: usize,
    deadline: Duration,
) -> Result<Option<T>, FrameIoError> {
    tokio::time::timeout(deadline, read_frame(recv, cap))
        .await
        .map_err(|_| FrameIoError::Timeout)?
}

/// Writes one frame with `cap`.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
    cap: usize,
) -> Result<(), FrameIoError> {
    let bytes = encode_frame(msg, cap)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// QUIC application error codes used by hopmesh, as `VarInt`s: each is built from the table
/// in [`hopmesh_protocol::codes`], which holds the values.
pub mod codes {
    use super::VarInt;
    use hopmesh_protocol::codes as table;

    /// A stream refused by the gate (generic; the reason is audited locally).
    pub const STREAM_REFUSED: VarInt = VarInt::from_u32(table::STREAM_REFUSED);
    /// A request or frame the receiver could not accept.
    pub const BAD_REQUEST: VarInt = VarInt::from_u32(table::BAD_REQUEST);
    /// The local side failed (backend, internal error) mid-stream.
    pub const INTERNAL: VarInt = VarInt::from_u32(table::INTERNAL);
    /// Connection closed: the peer's credentials are revoked or expired.
    pub const REVOKED: VarInt = VarInt::from_u32(table::REVOKED);
    /// Connection closed: too many forged tokens or compromised key use.
    pub const ABUSE: VarInt = VarInt::from_u32(table::ABUSE);
    /// Connection closed: orderly shutdown.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(table::SHUTDOWN);
    /// Stream reset or connection closed: policy no longer allows the stream or the pair.
    pub const POLICY: VarInt = VarInt::from_u32(table::POLICY);
    /// Connection closed: a control message could not be written within its deadline.
    pub const CONTROL_STALLED: VarInt = VarInt::from_u32(table::CONTROL_STALLED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_transport_bounds_what_a_peer_can_make_us_buffer() {
        // quinn has no getters; its Debug output names every field.
        let t = format!(
            "{:?}",
            transport_config(Duration::from_secs(30), Duration::from_secs(5))
        );
        assert!(t.contains("max_concurrent_uni_streams: 0"), "{t}");
        assert!(t.contains("datagram_receive_buffer_size: None"), "{t}");
        assert!(t.contains("stream_receive_window: 1048576"), "{t}");
        assert!(t.contains(" receive_window: 4194304"), "{t}");
    }

    #[test]
    fn udp_buffers_get_what_the_kernel_allows() {
        let cap = |f: &str| {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (recv, send) = size_udp_buffers(&socket);
        // The kernel grants min(asked, cap); the default (208 KiB) is what we had before.
        match (
            cap("/proc/sys/net/core/rmem_max"),
            cap("/proc/sys/net/core/wmem_max"),
        ) {
            (Some(r), Some(w)) => {
                assert_eq!(recv, UDP_BUFFER.min(r));
                assert_eq!(send, UDP_BUFFER.min(w));
            }
            _ => assert!(recv > 0 && send > 0),
        }
    }
}
