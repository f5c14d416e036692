//! The node side of the verifier protocol: enroll, refresh, report, subscribe.
//!
//! Dials the verifier pinned by [`Pins`] (its TLS key, no trust on first use), presents the
//! node's key, and checks every attestation it receives against the pinned signing keys
//! before handing it out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::attestation::{KeySet, VerifiedAttestation, verify_attestation};
use hopmesh_protocol::enrollment::{
    Address, HostFacts, NodeRequest, PUSH_CAP, Push, REQUEST_CAP, Refusal, Report, VerifierResponse,
};
use hopmesh_protocol::ids::Measurement;
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use quinn::{Connection, Endpoint, RecvStream};

use crate::TransportError;
use crate::identity::{Identity, SNI};
use crate::pins::{Pins, PinsError};
use crate::quic::{
    FrameIoError, codes, quinn_client, read_frame, read_frame_within, transport_config, write_frame,
};
use crate::tls::{self, ALPN_CONTROL, ServerExpectation};

/// How long to wait for the verifier's answer.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(10);

/// How a verifier connection notices that the verifier is gone: a QUIC keep-alive every
/// `keep_alive`, and the connection is dead after `idle` without a packet from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Longest time without a packet from the verifier.
    pub idle: Duration,
    /// Keep-alive interval.
    pub keep_alive: Duration,
}

impl Heartbeat {
    /// A node's link: a dead verifier (or a path to it) is noticed after 3 s idle plus at most
    /// one keep-alive interval (≈4 s measured, `benches/benches/failover.rs`), so the node
    /// moves to another replica inside the 5 s failover target (docs/design.md, section 3). One
    /// small packet a second per node.
    pub const NODE: Self = Self {
        idle: Duration::from_secs(3),
        keep_alive: Duration::from_secs(1),
    };
    /// One-off calls (enrolment, tools, the scale simulator's many clients).
    pub const RELAXED: Self = Self {
        idle: Duration::from_secs(30),
        keep_alive: Duration::from_secs(10),
    };
}

/// Why a verifier call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not set up or reach the verifier (handshake, pin mismatch, network).
    #[error("cannot reach the verifier: {0}")]
    Connect(String),
    /// The pins are unusable.
    #[error(transparent)]
    Pins(#[from] PinsError),
    /// TLS or QUIC setup.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The exchange failed.
    #[error("verifier exchange failed: {0}")]
    Frame(#[from] FrameIoError),
    /// The verifier refused.
    #[error("verifier refused: {0}")]
    Refused(Refusal),
    /// The verifier answered with something unexpected.
    #[error("unexpected verifier response")]
    Unexpected,
    /// The attestation received does not verify against the pins (spoofed verifier?).
    #[error("attestation from the verifier does not verify: {0}")]
    BadAttestation(String),
}

/// A connection to the verifier.
#[derive(Debug, Clone)]
pub struct VerifierClient {
    conn: Connection,
    keys: KeySet,
    spki: Vec<u8>,
}

/// The push stream: yields pushes until the verifier or the network ends it.
#[derive(Debug)]
pub struct PushStream {
    recv: RecvStream,
}

impl PushStream {
    /// The next push; `Ok(None)` when the verifier finished the stream.
    pub async fn next(&mut self) -> Result<Option<Push>, FrameIoError> {
        read_frame(&mut self.recv, PUSH_CAP).await
    }
}

impl VerifierClient {
    /// Dials the verifier at `addr` from `endpoint` as `identity`, with the
    /// [`Heartbeat::RELAXED`] liveness check.
    pub async fn connect(
        endpoint: &Endpoint,
        addr: SocketAddr,
        identity: &Identity,
        pins: &Pins,
    ) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, addr, identity, pins, Heartbeat::RELAXED).await
    }

    /// [`Self::connect`] with `heartbeat`.
    pub async fn connect_with(
        endpoint: &Endpoint,
        addr: SocketAddr,
        identity: &Identity,
        pins: &Pins,
        heartbeat: Heartbeat,
    ) -> Result<Self, ClientError> {
        let tls = tls::client_config(
            identity,
            ALPN_CONTROL,
            ServerExpectation::Verifier {
                pin: pins.tls_pin()?,
                signing_keys: pins.signing_keys()?,
            },
        )?;
        let transport = Arc::new(transport_config(heartbeat.idle, heartbeat.keep_alive));
        let cfg = quinn_client(tls, transport)?;
        let connecting = endpoint
            .connect_with(cfg, addr, SNI)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = connecting
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Self {
            conn,
            keys: pins.key_set()?,
            spki: identity.spki(),
        })
    }

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn request(&self, req: &NodeRequest) -> Result<VerifierResponse, ClientError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        write_frame(&mut send, req, REQUEST_CAP).await?;
        let _ = send.finish();
        read_frame_within(&mut recv, REQUEST_CAP, RESPONSE_DEADLINE)
            .await?
            .ok_or(ClientError::Unexpected)
    }

    fn attestation(
        &self,
        resp: VerifierResponse,
        now: UnixTime,
    ) -> Result<(Vec<u8>, VerifiedAttestation), ClientError> {
        match resp {
            VerifierResponse::Attested { attestation } => {
                let bytes = attestation.into_inner();
                // A few seconds of leeway for skew between us and the verifier.
                let v = verify_attestation(&bytes, &self.keys, now, 30)
                    .map_err(|e| ClientError::BadAttestation(e.to_string()))?;
                v.check_peer(&self.spki)
                    .map_err(|e| ClientError::BadAttestation(e.to_string()))?;
                Ok((bytes, v))
            }
            VerifierResponse::Refused(r) => Err(ClientError::Refused(r)),
            VerifierResponse::Ack => Err(ClientError::Unexpected),
        }
    }

    /// Enrolls with a one-time join secret; returns the attestation envelope, verified.
    pub async fn enroll(
        &self,
        join_secret: JoinSecret,
        measurement: Measurement,
        facts: HostFacts,
        addresses: BoundedVec<Address, 4>,
        now: UnixTime,
    ) -> Result<(Vec<u8>, VerifiedAttestation), ClientError> {
        let resp = self
            .request(&NodeRequest::Enroll {
                join_secret,
                measurement,
                facts,
                addresses,
            })
            .await?;
        self.attestation(resp, now)
    }

    /// Renews the attestation; returns the envelope, verified.
    pub async fn refresh(
        &self,
        measurement: Measurement,
        addresses: BoundedVec<Address, 4>,
        now: UnixTime,
    ) -> Result<(Vec<u8>, VerifiedAttestation), ClientError> {
        let resp = self
            .request(&NodeRequest::Refresh {
                measurement,
                addresses,
            })
            .await?;
        self.attestation(resp, now)
    }

    /// Sends a security report.
    pub async fn report(&self, report: Report) -> Result<(), ClientError> {
        match self.request(&NodeRequest::Report(report)).await? {
            VerifierResponse::Ack => Ok(()),
            VerifierResponse::Refused(r) => Err(ClientError::Refused(r)),
            VerifierResponse::Attested { .. } => Err(ClientError::Unexpected),
        }
    }

    /// Opens the push stream.
    pub async fn subscribe(&self) -> Result<PushStream, ClientError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        write_frame(&mut send, &NodeRequest::Subscribe, REQUEST_CAP).await?;
        let _ = send.finish();
        match read_frame_within(&mut recv, REQUEST_CAP, RESPONSE_DEADLINE).await? {
            Some(VerifierResponse::Ack) => Ok(PushStream { recv }),
            Some(VerifierResponse::Refused(r)) => Err(ClientError::Refused(r)),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(codes::SHUTDOWN, b"bye");
    }
}
