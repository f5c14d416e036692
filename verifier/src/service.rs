//! The node-facing QUIC service (ALPN `hopmesh-verifier/1`).
//!
//! One bidirectional stream per request. The node is the key its TLS handshake proved; the
//! TLS layer admits any Ed25519 key ([`hopmesh_transport::tls::AnyKey`]) and the
//! [`Authority`] decides what that key may do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{NodeRequest, PUSH_CAP, REQUEST_CAP, Refusal, VerifierResponse};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::quic::{codes, peer_spki, read_frame_within, write_frame};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::{Semaphore, watch};

use crate::Shared;
use crate::authority::{Authority, Enrollment, Issued};

/// How long a node has to send its request once it opened a stream.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Most node connections served at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Accepts node connections until `shutdown` flips to true.
pub async fn serve(endpoint: Endpoint, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Never `into_0rtt()` (docs/design.md, pitfall 2): await the full handshake.
            match incoming.await {
                Ok(conn) => handle_connection(conn, shared).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
        });
    }
    endpoint.close(codes::SHUTDOWN, b"verifier shutting down");
    // Let every connection task see the close and release the socket.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
}

async fn handle_connection(conn: Connection, shared: Arc<Shared>) {
    let Some(spki) = peer_spki(&conn) else {
        conn.close(codes::BAD_REQUEST, b"no client certificate");
        return;
    };
    let spki: Arc<[u8]> = spki.into();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (shared, spki, conn) = (shared.clone(), spki.clone(), conn.clone());
        tokio::spawn(async move { handle_stream(conn, &spki, send, recv, shared).await });
    }
}

async fn respond(mut send: SendStream, resp: &VerifierResponse) {
    if write_frame(&mut send, resp, REQUEST_CAP).await.is_ok() {
        let _ = send.finish();
    }
}

/// Runs an admission under the authority lock: `issuance_seconds` times the check and the
/// signing (not the recompile and pushes of [`Authority::publish`]), as the authority reads no
/// clock.
fn timed_admission(
    shared: &Shared,
    now: hopmesh_protocol::time::UnixTime,
    admit: impl FnOnce(&mut Authority) -> Result<Issued, Refusal>,
) -> Result<Vec<u8>, Refusal> {
    let mut authority = shared.authority();
    let started = Instant::now();
    let issued = admit(&mut authority)?;
    authority
        .metrics()
        .issuance_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(authority.publish(issued, now))
}

fn attested(result: Result<Vec<u8>, Refusal>) -> VerifierResponse {
    match result.and_then(|env| BoundedVec::new(env).map_err(|_| Refusal::Internal)) {
        Ok(attestation) => VerifierResponse::Attested { attestation },
        Err(r) => VerifierResponse::Refused(r),
    }
}

async fn handle_stream(
    conn: Connection,
    spki: &[u8],
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
) {
    let node_id = NodeId::from_spki(spki);
    let req = match read_frame_within::<NodeRequest>(&mut recv, REQUEST_CAP, REQUEST_DEADLINE).await
    {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(node = %node_id.short(), error = %e, "bad request stream");
            shared.authority().metrics().refused("bad_request");
            let _ = send.reset(codes::BAD_REQUEST);
            return;
        }
    };
    let now = shared.now();
    match req {
        NodeRequest::Enroll {
            join_secret,
            measurement,
            facts,
            addresses,
        } => {
            let e = Enrollment {
                spki,
                join_secret: &join_secret,
                measurement,
                addresses: &addresses,
                hostname: facts.hostname.as_str(),
            };
            let result = timed_admission(&shared, now, |a| a.admit_enrollment(&e, now));
            respond(send, &attested(result)).await;
        }
        NodeRequest::Refresh {
            measurement,
            addresses,
        } => {
            let result = timed_admission(&shared, now, |a| {
                a.admit_refresh(&node_id, &measurement, &addresses, now)
            });
            respond(send, &attested(result)).await;
        }
        NodeRequest::Report(report) => {
            let resp = match shared.authority().report(&node_id, &report, now) {
                Ok(()) => VerifierResponse::Ack,
                Err(r) => VerifierResponse::Refused(r),
            };
            respond(send, &resp).await;
        }
        NodeRequest::Subscribe => {
            let rx = shared.authority().subscribe(&node_id, now);
            let mut rx = match rx {
                Ok(rx) => rx,
                Err(r) => return respond(send, &VerifierResponse::Refused(r)).await,
            };
            if write_frame(&mut send, &VerifierResponse::Ack, REQUEST_CAP)
                .await
                .is_err()
            {
                return;
            }
            loop {
                let push = tokio::select! {
                    p = rx.recv() => p,
                    // The connection went away (node gone, or verifier shutting down).
                    _ = conn.closed() => return,
                };
                let Some(push) = push else { break };
                if let Err(e) = write_frame(&mut send, &push, PUSH_CAP).await {
                    tracing::debug!(node = %node_id.short(), error = %e, "push stream closed");
                    return;
                }
            }
            // Unsubscribed by the verifier: revoked, or too slow to keep up. Either way the
            // node must reconnect (and a revoked one will be refused).
            let _ = send.reset(codes::REVOKED);
            conn.close(codes::REVOKED, b"unsubscribed");
        }
    }
}
