//! A client that speaks the node protocol by hand, to send tokens no honest node would.
//!
//! It holds a real node's key and attestation (read from that node's data directory) and the
//! pair seeds (from the verifier), so every check up to the one under test passes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{MAX_ENVELOPE, PeerMessage, StreamHeader};
use hopmesh_protocol::frame::CONTROL_CAP;
use hopmesh_protocol::hop_token::{
    Epoch, Generation, GenerationGrant, MintRequest, PairIds, TOKEN_LEN, mint_token,
};
use hopmesh_protocol::ids::{NodeId, ServiceId};
use hopmesh_protocol::secret::{ConnectionBinding, EpochKey, StreamKey};
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::identity::{Identity, SNI};
use hopmesh_transport::quic::{
    connection_binding, endpoint, quinn_client, read_frame_within, transport_config, write_frame,
};
use hopmesh_transport::tls::{self, ALPN_DATA, AnyKey, ServerExpectation};

/// Per-stream receive window of [`ProtocolClient::connect_never_reading`]: smaller than one
/// renewal, so the first renewal the node writes stalls.
pub const STINGY_WINDOW: u32 = 256;
/// How often [`ProtocolClient::connect_never_reading`] looks for a newer attestation to renew.
pub const RENEW_POLL: Duration = Duration::from_millis(200);

/// One hand-driven connection to a node.
#[derive(Debug)]
pub struct ProtocolClient {
    /// The connection.
    pub conn: quinn::Connection,
    /// Its exporter binding.
    pub binding: ConnectionBinding,
    /// Who we are.
    pub local: NodeId,
    /// Who we talk to.
    pub peer: NodeId,
    _endpoint: quinn::Endpoint,
    _control_recv: quinn::RecvStream,
    control_send: Option<quinn::SendStream>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ProtocolClient {
    fn drop(&mut self) {
        if let Some(t) = self.renewer.take() {
            t.abort();
        }
    }
}

/// What happened to a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The node answered with this status byte.
    Status(u8),
    /// The node reset the stream (token refused) or the connection died.
    Refused,
}

impl ProtocolClient {
    /// Connects as the node whose data directory is `dir` to the node `peer` at `addr`.
    pub async fn connect(dir: &Path, peer: NodeId, addr: SocketAddr) -> Self {
        Self::try_connect(dir, peer, addr).await.expect("connect")
    }

    /// [`Self::connect`], returning why the handshake or the Hello exchange failed.
    pub async fn try_connect(dir: &Path, peer: NodeId, addr: SocketAddr) -> Result<Self, String> {
        Self::try_connect_with(dir, peer, addr, |_| {}).await
    }

    /// Connects like [`Self::connect`], reads the node's Hello, then never reads its control
    /// stream again, with a receive window of [`STINGY_WINDOW`] bytes per stream: the node's
    /// next control messages (renewals) find no flow-control credit.
    /// It does send renewals, as an honest peer would (the attestation file of `dir`, checked
    /// every [`RENEW_POLL`] while the connection lives), so the node has no other reason to
    /// close it.
    pub async fn connect_never_reading(dir: &Path, peer: NodeId, addr: SocketAddr) -> Self {
        let mut c = Self::try_connect_with(dir, peer, addr, |t| {
            t.stream_receive_window(quinn::VarInt::from_u32(STINGY_WINDOW));
        })
        .await
        .expect("connect");
        let (Some(mut send), conn) = (c.control_send.take(), c.conn.clone()) else {
            unreachable!("a fresh client holds its control stream");
        };
        let file = dir.join("attestation.bin");
        c.renewer = Some(tokio::spawn(async move {
            let mut last = std::fs::read(&file).unwrap_or_default();
            while conn.close_reason().is_none() {
                tokio::time::sleep(RENEW_POLL).await;
                let Ok(now) = std::fs::read(&file) else {
                    continue;
                };
                if now == last {
                    continue;
                }
                let Ok(attestation) = BoundedVec::<u8, MAX_ENVELOPE>::new(now.clone()) else {
                    return;
                };
                let renewal = PeerMessage::Renewal { attestation };
                if write_frame(&mut send, &renewal, CONTROL_CAP).await.is_err() {
                    return;
                }
                last = now;
            }
        }));
        c
    }

    /// [`Self::try_connect`] with the client's transport settings changed by `tweak`.
    pub async fn try_connect_with(
        dir: &Path,
        peer: NodeId,
        addr: SocketAddr,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> Result<Self, String> {
        let identity = Identity::load(&dir.join("node.key")).map_err(|e| e.to_string())?;
        let attestation = std::fs::read(dir.join("attestation.bin")).map_err(|e| e.to_string())?;
        let ep = endpoint(
            std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?, // loopback and across namespaces
            None,
        )
        .map_err(|e| e.to_string())?;
        let cfg = quinn_client(
            tls::client_config(
                &identity,
                ALPN_DATA,
                ServerExpectation::Node(peer, Arc::new(AnyKey)),
            )
            .map_err(|e| e.to_string())?,
            Arc::new({
                let mut t = transport_config(Duration::from_secs(10), Duration::from_secs(2));
                tweak(&mut t);
                t
            }),
        )
        .map_err(|e| e.to_string())?;
        let conn = ep
            .connect_with(cfg, addr, SNI)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = PeerMessage::Hello {
            attestation: BoundedVec::<u8, MAX_ENVELOPE>::new(attestation)
                .map_err(|e| e.to_string())?,
        };
        write_frame(&mut s, &hello, CONTROL_CAP)
            .await
            .map_err(|e| format!("hello: {e}"))?;
        let theirs: Option<PeerMessage> =
            read_frame_within(&mut r, CONTROL_CAP, Duration::from_secs(5))
                .await
                .map_err(|e| format!("their hello: {e}"))?;
        if !matches!(theirs, Some(PeerMessage::Hello { .. })) {
            return Err("peer did not answer hello".into());
        }
        let local = identity.node_id();
        let binding = connection_binding(&conn, ALPN_DATA, &PairIds::new(local, peer))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            conn,
            binding,
            local,
            peer,
            _endpoint: ep,
            _control_recv: r,
            control_send: Some(s),
            renewer: None,
        })
    }

    /// Mints a token for the next stream with `grant`, `epoch` and `service`; `tweak` may
    /// change the request first. Returns the bytes to send (token ‖ header).
    pub fn mint(
        &self,
        grant: &GenerationGrant,
        epoch: Epoch,
        service: ServiceId,
        stream_id: u64,
        tweak: impl FnOnce(&mut MintRequest<'_>),
    ) -> Vec<u8> {
        let header = StreamHeader {
            origin: self.local,
            service,
            route: BoundedVec::empty(),
            assertion: None,
        }
        .encode()
        .expect("header");
        let pair = PairIds::new(self.local, self.peer);
        let key = StreamKey::derive(&self.binding, &EpochKey::derive(&grant.seed, &pair, epoch));
        let mut req = MintRequest {
            generation: grant.generation,
            epoch,
            src: self.local,
            dst: self.peer,
            service,
            stream_id,
            header: &header,
        };
        tweak(&mut req);
        let token = mint_token(&req, &key).expect("mint");
        [token.as_slice(), &header].concat()
    }

    /// Opens a stream and returns it with its raw id.
    pub async fn open(&self) -> Option<(quinn::SendStream, quinn::RecvStream, u64)> {
        let (s, r) = self.conn.open_bi().await.ok()?;
        let id = u64::from(s.id());
        Some((s, r, id))
    }

    /// Sends `bytes` as the start of a stream and reports what the node did.
    pub async fn send_on(
        s: &mut quinn::SendStream,
        r: &mut quinn::RecvStream,
        bytes: &[u8],
    ) -> StreamOutcome {
        if s.write_all(bytes).await.is_err() {
            return StreamOutcome::Refused;
        }
        let mut status = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut status)).await {
            Ok(Ok(())) => StreamOutcome::Status(status[0]),
            _ => StreamOutcome::Refused,
        }
    }

    /// Mints for the next stream and sends.
    pub async fn try_stream(
        &self,
        grant: &GenerationGrant,
        epoch: Epoch,
        service: ServiceId,
        tweak: impl FnOnce(&mut MintRequest<'_>),
    ) -> StreamOutcome {
        let Some((mut s, mut r, id)) = self.open().await else {
            return StreamOutcome::Refused;
        };
        let bytes = self.mint(grant, epoch, service, id, tweak);
        let out = Self::send_on(&mut s, &mut r, &bytes).await;
        let _ = s.finish();
        out
    }
}

/// The grant currently used for minting for the pair, from the verifier.
pub fn current_grant(grants: &[GenerationGrant]) -> GenerationGrant {
    grants.first().cloned().expect("a current generation")
}

/// A generation number that does not exist.
pub fn bogus_generation() -> Generation {
    Generation(u64::MAX)
}

/// Token length, re-exported for tests.
pub const TOKEN: usize = TOKEN_LEN;
