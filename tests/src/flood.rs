//! An unauthenticated flooder of the verifier's node port: fresh self-signed keys, no join
//! secret. Every loop is bounded in count and time; everything talks to the address given
//! (tests give 127.0.0.1).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::enrollment::{NodeRequest, REQUEST_CAP, VerifierResponse};
use hopmesh_protocol::ids::Measurement;
use hopmesh_transport::identity::{Identity, SNI};
use hopmesh_transport::pins::Pins;
use hopmesh_transport::quic::{endpoint, quinn_client, read_frame_within, write_frame};
use hopmesh_transport::tls::{self, ALPN_CONTROL, ServerExpectation};

/// How long one flood connection's handshake, or one probe, may take.
pub const FLOOD_STEP_DEADLINE: Duration = Duration::from_secs(5);

/// One endpoint that opens connections to the verifier, each with a fresh key.
#[derive(Debug)]
pub struct Flooder {
    endpoint: quinn::Endpoint,
    verifier: SocketAddr,
    pin: [u8; 32],
    /// Connections whose handshake completed (the verifier may still have closed them).
    pub conns: Vec<quinn::Connection>,
}

impl Flooder {
    /// A flooder of the verifier at `verifier` (bound to 127.0.0.1 port 0).
    pub fn new(verifier: SocketAddr, pins: &Pins) -> Self {
        Self::bound(verifier, pins, "127.0.0.1:0".parse().expect("loopback"))
    }

    /// A flooder bound to `local` (the netns attacker binds its namespace's address).
    pub fn bound(verifier: SocketAddr, pins: &Pins, local: SocketAddr) -> Self {
        let endpoint =
            endpoint(UdpSocket::bind(local).expect("bind"), None).expect("flood endpoint");
        Self {
            endpoint,
            verifier,
            pin: pins.tls_pin().expect("pin"),
            conns: Vec::new(),
        }
    }

    /// One connection with a fresh key; `None` when the handshake failed or timed out.
    pub async fn connect_one(&self) -> Option<quinn::Connection> {
        let id = Identity::generate().expect("identity");
        let tls = tls::client_config(&id, ALPN_CONTROL, ServerExpectation::Pinned(self.pin))
            .expect("tls");
        let transport = Arc::new(hopmesh_transport::quic::transport_config(
            Duration::from_secs(30),
            Duration::from_secs(5),
        ));
        let cfg = quinn_client(tls, transport).expect("quinn");
        let connecting = self.endpoint.connect_with(cfg, self.verifier, SNI).ok()?;
        tokio::time::timeout(FLOOD_STEP_DEADLINE, connecting)
            .await
            .ok()?
            .ok()
    }

    /// Opens `n` connections at once (bounded by `n` and [`FLOOD_STEP_DEADLINE`] each) and
    /// keeps those whose handshake completed. Returns how many did.
    pub async fn open(&mut self, n: usize) -> usize {
        let mut tasks = tokio::task::JoinSet::new();
        let me = Arc::new(self.clone_dialer());
        for _ in 0..n {
            let me = me.clone();
            tasks.spawn(async move { me.connect_one().await });
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(c)) = r {
                self.conns.push(c);
                done += 1;
            }
        }
        done
    }

    fn clone_dialer(&self) -> Self {
        Self {
            endpoint: self.endpoint.clone(),
            verifier: self.verifier,
            pin: self.pin,
            conns: Vec::new(),
        }
    }

    /// Probes every held connection with a request (an unenrolled refresh: the verifier
    /// answers `Refused`); returns how many are still served. The rest were closed by the
    /// verifier.
    pub async fn alive(&self) -> usize {
        let mut tasks = tokio::task::JoinSet::new();
        for c in &self.conns {
            let c = c.clone();
            tasks.spawn(async move { probe(&c).await });
        }
        let mut alive = 0;
        while let Some(r) = tasks.join_next().await {
            if matches!(r, Ok(true)) {
                alive += 1;
            }
        }
        alive
    }

    /// Closes every held connection.
    pub fn close_all(&mut self) {
        for c in self.conns.drain(..) {
            c.close(0u32.into(), b"flood over");
        }
    }

    /// Stops the endpoint (bounded wait).
    pub async fn shutdown(mut self) {
        self.close_all();
        self.endpoint.close(0u32.into(), b"flood over");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// True when the verifier answers a request on `conn` (any answer) within
/// [`FLOOD_STEP_DEADLINE`].
pub async fn probe(conn: &quinn::Connection) -> bool {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let req = NodeRequest::Refresh {
            measurement: Measurement([0; 32]),
            addresses: hopmesh_protocol::wire::BoundedVec::empty(),
        };
        write_frame(&mut send, &req, REQUEST_CAP).await.ok()?;
        let _ = send.finish();
        read_frame_within::<VerifierResponse>(&mut recv, REQUEST_CAP, FLOOD_STEP_DEADLINE)
            .await
            .ok()?
    };
    matches!(
        tokio::time::timeout(FLOOD_STEP_DEADLINE, ask).await,
        Ok(Some(_))
    )
}

/// The uni-stream attack on one connection: tries to open `streams` unidirectional streams
/// and write `bytes` on each without finishing. Returns how many streams opened within
/// `deadline` in total (0 when the peer allows none).
pub async fn uni_stream_attack(
    conn: &quinn::Connection,
    streams: usize,
    bytes: usize,
    deadline: Duration,
) -> usize {
    let data = vec![0x5a; bytes];
    // Held (never finished) until the attack is over.
    let mut held = Vec::new();
    let attack = async {
        for _ in 0..streams {
            let Ok(s) = conn.open_uni().await else {
                return;
            };
            held.push(s);
            if let Some(s) = held.last_mut() {
                // Bounded: the caller's deadline cuts a write the peer's window blocks.
                let _ = s.write_all(&data).await;
            }
        }
    };
    let _ = tokio::time::timeout(deadline, attack).await;
    held.len()
}

/// Opens bidirectional streams on `conn` without sending a byte, up to `max`, within
/// `deadline`; returns how many the peer's stream limit let us open.
pub async fn open_idle_bidi(conn: &quinn::Connection, max: usize, deadline: Duration) -> usize {
    let mut held = Vec::new();
    let attack = async {
        for _ in 0..max {
            match conn.open_bi().await {
                Ok(s) => held.push(s),
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(deadline, attack).await;
    held.len()
}
