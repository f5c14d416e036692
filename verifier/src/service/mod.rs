//! The node-facing QUIC service (ALPN `hopmesh-verifier/1`), and the budgets that keep it
//! available under a flood.
//!
//! One bidirectional stream per request. The node is the key its TLS handshake proved; the
//! TLS layer admits any Ed25519 key ([`hopmesh_transport::tls::AnyKey`]) and the
//! [`Authority`](crate::authority::Authority) decides what that key may do.
//!
//! # Budgets
//! The verifier accepts handshakes from anyone, so everything an unauthenticated party can make
//! it hold is bounded, and an enrolled node always finds room:
//! - per connection ([`transport`]): no unidirectional streams, at most
//!   [`MAX_STREAMS_PER_CONNECTION`] request streams, receive windows sized for requests
//!   ([`REQUEST_STREAM_WINDOW`], [`REQUEST_CONNECTION_WINDOW`]), send window
//!   [`SEND_WINDOW`];
//! - handshakes ([`BudgetState::admit_handshake`]): at most
//!   [`ConnectionBudgets::max_handshakes`] in flight and
//!   [`ConnectionBudgets::max_handshakes_per_source`] per source IP; above
//!   [`ConnectionBudgets::retry_above`] in flight, an attempt from an address not yet validated
//!   gets a QUIC Retry (it must prove it receives at its address before it costs any state);
//!   a handshake not done within [`ConnectionBudgets::handshake_deadline`] is dropped;
//! - connections ([`BudgetState::admit_connection`]), once the key is known: keys that are
//!   not enrolled (no compiled table: unknown, revoked, banned, or out of policy) share a small
//!   pool ([`ConnectionBudgets::max_unauthenticated`], at most
//!   [`ConnectionBudgets::max_unauthenticated_per_source`] per source IP) and are closed after
//!   [`ConnectionBudgets::unauthenticated_deadline`] unless the key enrolled meanwhile;
//!   enrolled nodes have their own pool ([`ConnectionBudgets::max_enrolled`]), and a node at
//!   [`ConnectionBudgets::max_connections_per_node`] gets in by closing its own oldest
//!   connection, never by being refused.
//!
//! Nothing of this is persisted: after a restart the pools start empty, and an attacker's
//! reconnections compete only for the unauthenticated pool. Every refusal is counted in
//! `hopmesh_verifier_connection_refusals{reason}` and logged at most once per
//! [`REFUSAL_LOG_INTERVAL`] (a count, never one line or audit record per attempt).
//!
//! # Subscriptions
//! One live subscription per node: a new one replaces the old (the old stream is reset with
//! `SHUTDOWN`). A subscriber that cannot keep up ([`crate::authority::PUSH_QUEUE`]) gets a
//! resync: what is still queued is discarded and a fresh snapshot follows on the same stream;
//! one whose stream takes no push for [`PUSH_WRITE_DEADLINE`] is closed (`CONTROL_STALLED`)
//! and resynchronises when it reconnects.

mod budget;
mod gate;

pub use budget::{
    BudgetState, ConnRefusal, ConnectionBudgets, HANDSHAKE_DEADLINE, HandshakeAdmit,
    MAX_CONNECTIONS_PER_NODE, MAX_ENROLLED, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE,
    MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE, PeerClass, Permit, RETRY_ABOVE,
    UNAUTHENTICATED_DEADLINE,
};
use gate::{Ended, Gate, HandshakeSlot};

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::{
    Address, NodeRequest, PUSH_CAP, Push, REQUEST_CAP, Refusal, VerifierResponse,
};
use hopmesh_protocol::frame::LEN_PREFIX;
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::quic::{codes, peer_spki, read_frame_within, transport_config, write_frame};
use quinn::{Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::sync::{mpsc, watch};

use crate::Shared;
use crate::authority::{
    Enrollment, PendingRefresh, RefreshStep, commit_refresh, enroll_outside_lock,
    refresh_outside_lock, try_lock_authority,
};

/// How long a node has to send its request once it opened a stream.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for one push to be written to a subscriber; past it the subscriber's
/// connection is closed (`CONTROL_STALLED`, counted as `refusals{reason="push_stalled"}`).
pub const PUSH_WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Request streams a connection may have open at once (a node needs three: refresh, report,
/// subscribe).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;
/// Receive window of one request stream: one request frame (`REQUEST_CAP` and its length
/// prefix), rounded up.
pub const REQUEST_STREAM_WINDOW: u32 = 8 << 10;
/// Receive window of a connection: every allowed stream's window.
pub const REQUEST_CONNECTION_WINDOW: u32 = MAX_STREAMS_PER_CONNECTION * REQUEST_STREAM_WINDOW;
/// Send window of a connection (unacknowledged response and push bytes held per connection).
pub const SEND_WINDOW: u64 = 2 << 20;
/// Idle timeout of node connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval of node connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// At most one log line about refused connection attempts per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

const _: () = assert!(REQUEST_STREAM_WINDOW as usize >= REQUEST_CAP + LEN_PREFIX);

/// The node connections' transport: [`transport_config`] (no uni streams, no datagrams) with
/// request-sized windows and at most [`MAX_STREAMS_PER_CONNECTION`] streams.
pub fn transport() -> TransportConfig {
    let mut t = transport_config(IDLE_TIMEOUT, KEEP_ALIVE);
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.stream_receive_window(VarInt::from_u32(REQUEST_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(REQUEST_CONNECTION_WINDOW));
    t.send_window(SEND_WINDOW);
    t
}

/// Accepts node connections until `shutdown` flips to true.
pub async fn serve(endpoint: Endpoint, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let (budgets, metrics) = {
        let a = shared.authority();
        (a.settings().connections.clone(), a.metrics().clone())
    };
    let gate = Arc::new(Gate::new(budgets, metrics));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let source = incoming.remote_address().ip().to_canonical();
        let validated = incoming.remote_address_validated();
        let slot = {
            let mut g = gate.lock();
            match g.state.admit_handshake(&gate.budgets, source, validated) {
                Ok(HandshakeAdmit::Accept) => {
                    g.state.begin_handshake(source);
                    gate.gauges(&g);
                    Ok(HandshakeSlot {
                        gate: gate.clone(),
                        source,
                    })
                }
                Ok(HandshakeAdmit::Retry) => Err(None),
                Err(r) => Err(Some(r)),
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(None) => {
                gate.metrics.retries.inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Err(Some(r)) => {
                gate.refused(r);
                incoming.refuse();
                continue;
            }
        };
        let (shared, gate) = (shared.clone(), gate.clone());
        tokio::spawn(async move {
            let deadline = gate.budgets.handshake_deadline;
            // Never `into_0rtt()` (docs/design.md, pitfall 2): await the full handshake.
            let conn = match tokio::time::timeout(deadline, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return tracing::debug!(error = %e, "handshake failed"),
                Err(_) => return gate.refused(ConnRefusal::HandshakeTimeout),
            };
            drop(slot);
            handle_connection(conn, source, shared, gate).await;
        });
    }
    endpoint.close(codes::SHUTDOWN, b"verifier shutting down");
    // Let every connection task see the close and release the socket.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
}

async fn handle_connection(conn: Connection, source: IpAddr, shared: Arc<Shared>, gate: Arc<Gate>) {
    let Some(spki) = peer_spki(&conn) else {
        gate.refused(ConnRefusal::NoCertificate);
        conn.close(codes::BAD_REQUEST, b"no client certificate");
        return;
    };
    let node = NodeId::from_spki(&spki);
    let class = if enrolled(&shared, node).await {
        PeerClass::Enrolled(node)
    } else {
        PeerClass::Unauthenticated
    };
    let mut slot = match gate.admit(&conn, source, class) {
        Ok(slot) => slot,
        Err(r) => {
            gate.refused(r);
            conn.close(codes::BAD_REQUEST, r.reason().as_bytes());
            return;
        }
    };
    let spki: Arc<[u8]> = spki.into();
    let mut deadline = (class == PeerClass::Unauthenticated)
        .then(|| tokio::time::Instant::now() + gate.budgets.unauthenticated_deadline);
    loop {
        tokio::select! {
            s = conn.accept_bi() => {
                let Ok((send, recv)) = s else { break };
                let (shared, gate, spki, conn) =
                    (shared.clone(), gate.clone(), spki.clone(), conn.clone());
                tokio::spawn(async move {
                    handle_stream(conn, &spki, send, recv, shared, gate).await
                });
            }
            // An unauthenticated connection that enrolls moves to the enrolled pool within
            // PROMOTE_POLL, so a batch of nodes enrolling from one address (one host, one
            // NAT) never waits for the per-source share to free up.
            _ = sleep_until_some(deadline.map(|d| d.min(tokio::time::Instant::now() + PROMOTE_POLL))) => {
                if enrolled(&shared, node).await && gate.promote(&mut slot, &conn, node) {
                    deadline = None;
                } else if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    gate.refused(ConnRefusal::UnauthenticatedDeadline);
                    conn.close(codes::BAD_REQUEST, b"not enrolled");
                    break;
                }
            }
        }
    }
    drop(slot);
}

/// Whether `node` has a table (is enrolled and live): on the worker if the authority lock is
/// free at once, else on the blocking pool.
async fn enrolled(shared: &Arc<Shared>, node: NodeId) -> bool {
    if let Some(authority) = try_lock_authority(&shared.authority) {
        return authority.has_table(&node);
    }
    shared
        .blocking(move |s| s.authority().has_table(&node))
        .await
}

/// How often an unauthenticated connection checks whether its key enrolled meanwhile (then it
/// moves to the enrolled pool and its deadline is lifted).
pub const PROMOTE_POLL: Duration = Duration::from_millis(100);

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn respond(mut send: SendStream, resp: &VerifierResponse) {
    if write_frame(&mut send, resp, REQUEST_CAP).await.is_ok() {
        let _ = send.finish();
    }
}

/// Enrolls, the store commits outside the authority lock ([`enroll_outside_lock`]).
/// `issuance_seconds` times it all but the recompile and pushes of
/// [`Authority::publish`](crate::authority::Authority::publish) (the authority reads no clock).
fn enroll(shared: &Shared, e: &Enrollment<'_>, now: UnixTime) -> Result<Vec<u8>, Refusal> {
    let started = Instant::now();
    let (mut authority, issued) = enroll_outside_lock(&shared.authority, e, now)?;
    shared
        .metrics()
        .issuance_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(authority.publish(issued, now))
}

/// Where [`refresh_fast`] got.
enum Fast {
    /// Answered.
    Done(Result<Vec<u8>, Refusal>),
    /// The record changed: commit it on the blocking pool, at once.
    Commit(PendingRefresh),
    /// The authority lock was held: run the refresh on the blocking pool.
    Busy,
}

/// A refresh on the runtime worker if the authority lock is free at once: the common refresh
/// (record unchanged, one lock hold, no store write but a serial block every `SERIAL_BLOCK`
/// issuances) then costs no thread handoff. A held lock is never waited for here.
fn refresh_fast(
    shared: &Shared,
    node: &NodeId,
    measurement: &Measurement,
    addresses: &[Address],
    now: UnixTime,
) -> Fast {
    let Some(mut authority) = try_lock_authority(&shared.authority) else {
        return Fast::Busy;
    };
    let started = Instant::now();
    match authority.begin_refresh(node, measurement, addresses, now) {
        Err(r) => Fast::Done(Err(r)),
        Ok(RefreshStep::Commit(pending)) => Fast::Commit(pending),
        Ok(RefreshStep::Attested(issued)) => {
            shared
                .metrics()
                .issuance_seconds
                .observe(started.elapsed().as_secs_f64());
            Fast::Done(Ok(authority.publish(issued, now)))
        }
    }
}

/// Refreshes, a changed record committed outside the authority lock
/// ([`refresh_outside_lock`]). Timed as [`enroll`].
fn refresh(
    shared: &Shared,
    node: &NodeId,
    measurement: &Measurement,
    addresses: &[Address],
    now: UnixTime,
) -> Result<Vec<u8>, Refusal> {
    let started = Instant::now();
    let (mut authority, issued) =
        refresh_outside_lock(&shared.authority, node, measurement, addresses, now)?;
    shared
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
    gate: Arc<Gate>,
) {
    let node_id = NodeId::from_spki(spki);
    let req = match read_frame_within::<NodeRequest>(&mut recv, REQUEST_CAP, REQUEST_DEADLINE).await
    {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(node = %node_id.short(), error = %e, "bad request stream");
            // Counted and audited (aggregated per key) by the authority.
            shared
                .blocking(move |s| s.authority().bad_request(&node_id, s.now()))
                .await;
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
            let spki = spki.to_vec();
            let result = shared
                .blocking_enrollment(move |s| {
                    let e = Enrollment {
                        spki: &spki,
                        join_secret: &join_secret,
                        measurement,
                        addresses: &addresses,
                        hostname: facts.hostname.as_str(),
                    };
                    enroll(s, &e, now)
                })
                .await;
            respond(send, &attested(result)).await;
        }
        NodeRequest::Refresh {
            measurement,
            addresses,
        } => {
            let result = refresh_fast(&shared, &node_id, &measurement, &addresses, now);
            let result = match result {
                Fast::Done(result) => result,
                // Not queued: started at once, a blocking task always runs to its end, so
                // the key's commit-in-flight mark is always cleared (rare: a changed record).
                Fast::Commit(pending) => {
                    shared
                        .unqueued(move |s| {
                            let (mut a, issued) = commit_refresh(&s.authority, pending, now)?;
                            Ok(a.publish(issued, now))
                        })
                        .await
                }
                Fast::Busy => {
                    shared
                        .blocking(move |s| refresh(s, &node_id, &measurement, &addresses, now))
                        .await
                }
            };
            respond(send, &attested(result)).await;
        }
        NodeRequest::Report(report) => {
            let resp = match shared
                .blocking(move |s| s.authority().report(&node_id, &report, now))
                .await
            {
                Ok(()) => VerifierResponse::Ack,
                Err(r) => VerifierResponse::Refused(r),
            };
            respond(send, &resp).await;
        }
        NodeRequest::Subscribe => {
            let subscribing = gate.clone();
            let subscribed = shared
                .blocking(move |s| subscribing.subscribe(s, &node_id, now))
                .await;
            let (rx, id) = match subscribed {
                Ok(sub) => sub,
                Err(r) => return respond(send, &VerifierResponse::Refused(r)).await,
            };
            if write_frame(&mut send, &VerifierResponse::Ack, REQUEST_CAP)
                .await
                .is_ok()
            {
                push_loop(&conn, send, rx, (node_id, id), &shared, &gate).await;
            }
            gate.forget(&node_id, id);
        }
    }
}

/// Writes pushes to a subscriber until the subscription or the connection ends. When the
/// authority closes the channel (replaced, not live, or queue full), what is still queued is
/// discarded and [`Gate::ended`] says what comes next.
async fn push_loop(
    conn: &Connection,
    mut send: SendStream,
    mut rx: mpsc::Receiver<Push>,
    (node, id): (NodeId, u64),
    shared: &Arc<Shared>,
    gate: &Arc<Gate>,
) {
    loop {
        if rx.is_closed() {
            let ending = gate.clone();
            let ended = shared
                .blocking(move |s| ending.ended(s, &node, id, s.now()))
                .await;
            match ended {
                Ended::Resubscribed(fresh) => {
                    tracing::info!(node = %node.short(), "subscriber fell behind: resynchronised");
                    rx = fresh;
                    continue;
                }
                Ended::Replaced => {
                    let _ = send.reset(codes::SHUTDOWN);
                    return;
                }
                Ended::NotLive => {
                    // Revoked or out of policy: the node must reconnect (and will be refused).
                    let _ = send.reset(codes::REVOKED);
                    conn.close(codes::REVOKED, b"unsubscribed");
                    return;
                }
            }
        }
        let push = tokio::select! {
            p = rx.recv() => p,
            // The connection went away (node gone, or verifier shutting down).
            _ = conn.closed() => return,
        };
        // `None`: closed and drained; the check above says why.
        let Some(push) = push else { continue };
        match tokio::time::timeout(PUSH_WRITE_DEADLINE, write_frame(&mut send, &push, PUSH_CAP))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(node = %node.short(), error = %e, "push stream closed");
                return;
            }
            Err(_) => {
                shared.metrics().refused("push_stalled");
                let _ = send.reset(codes::CONTROL_STALLED);
                conn.close(codes::CONTROL_STALLED, b"push not taken in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_takes_no_uni_streams_and_request_sized_windows() {
        let t = format!("{:?}", transport());
        assert!(t.contains("max_concurrent_uni_streams: 0"), "{t}");
        assert!(t.contains("max_concurrent_bidi_streams: 8"), "{t}");
        assert!(t.contains("stream_receive_window: 8192"), "{t}");
        assert!(t.contains(" receive_window: 65536"), "{t}");
        assert!(t.contains("datagram_receive_buffer_size: None"), "{t}");
    }
}
