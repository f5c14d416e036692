//! One simulated node: its own key, enrolment with its join secret, then sessions as
//! `hopmesh-node` runs them (node/src/verifier_link.rs): connect, refresh, subscribe, refresh
//! at half-life with jitter, every push read by one long-lived reader and handed to the
//! [`Consumer`]. All nodes share one quinn endpoint (one UDP socket).

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hopmesh_node::verifier_link::refresh_interval;
use hopmesh_protocol::attestation::VerifiedAttestation;
use hopmesh_protocol::enrollment::{Address, HostFacts, PUSH_CAP, Push, Refusal};
use hopmesh_protocol::frame::encode_frame;
use hopmesh_protocol::ids::{Measurement, NodeId};
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::verifier_client::{ClientError, PushStream, VerifierClient};
use tokio::sync::{Semaphore, watch};

use super::consumer::Consumer;

/// Sessions a node restarts after an unexpected end before it gives up (each one is reported:
/// at a healthy verifier there are none).
pub const MAX_SESSION_RESTARTS: u32 = 5;

/// Enrolment attempts a node makes before it gives up (an answer lost or not sent within the
/// deadline; a refusal ends them at once). Each failed attempt is reported; the wait before
/// attempt `k + 1` is `k` × [`RESTART_BACKOFF`].
pub const MAX_ENROLL_ATTEMPTS: u32 = 4;

/// Wait before a node restarts a session that ended unexpectedly.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// What the orchestrator sees of one node, updated by its tasks.
#[derive(Debug)]
pub struct NodeState {
    /// The push checker and what it holds.
    pub consumer: Consumer,
    /// The node's id, once its key exists.
    pub node_id: Option<NodeId>,
    /// When enrolment started (a gate permit held).
    pub enroll_started: Option<Instant>,
    /// When the verifier attested the enrolment.
    pub enrolled_at: Option<Instant>,
    /// When the first session's subscription was acknowledged.
    pub subscribed_at: Option<Instant>,
    /// Attestations received by refresh (each verified).
    pub refreshes: u64,
    /// Refreshes done for the burst phase.
    pub burst_refreshes: u64,
    /// Sessions started.
    pub sessions: u64,
    /// Why sessions or enrolment ended unexpectedly (the first few).
    pub errors: Vec<String>,
    /// Unexpected ends in all.
    pub error_count: u64,
    /// The orchestrator revoked this node: its session ending is expected.
    pub revoked: bool,
    /// The node has stopped for good.
    pub stopped: bool,
}

impl NodeState {
    fn new(consumer: Consumer) -> Self {
        Self {
            consumer,
            node_id: None,
            enroll_started: None,
            enrolled_at: None,
            subscribed_at: None,
            refreshes: 0,
            burst_refreshes: 0,
            sessions: 0,
            errors: Vec::new(),
            error_count: 0,
            revoked: false,
            stopped: false,
        }
    }

    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 4 {
            self.errors.push(e);
        }
    }
}

/// A node's shared state.
#[derive(Clone, Debug)]
pub struct Slot(Arc<Mutex<NodeState>>);

impl Slot {
    /// A node holding nothing yet.
    pub fn new(consumer: Consumer) -> Self {
        Self(Arc::new(Mutex::new(NodeState::new(consumer))))
    }

    /// Locks it (a poisoned lock is still read: the state is plain counters).
    pub fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What every node shares.
#[derive(Debug)]
pub struct Ctx {
    /// The endpoints the nodes dial from (node `i` uses `endpoints[i % len]`), each one UDP
    /// socket on its own loopback address: real nodes come from many addresses, and the
    /// verifier's per-source budgets (handshakes, unauthenticated connections) would
    /// otherwise throttle a reconnect wave of thousands of simulated nodes as if one host
    /// sent it.
    pub endpoints: Vec<quinn::Endpoint>,
    /// Refreshes in flight at once in the burst phase (a refresh storm of every node at once
    /// would measure the verifier's overload, not its attestation rate).
    pub burst_gate: Semaphore,
    /// The verifiers' node-facing addresses: node `i` talks to `verifiers[i % len]` (one
    /// verifier, or replicas on one PostgreSQL database, each with a TLS key of its own
    /// certified by the mesh's signing key, so one set of pins accepts them all).
    pub verifiers: Vec<SocketAddr>,
    /// The verifier's pins (the first replica's: every replica must be accepted with them).
    pub pins: Pins,
    /// The measurement every simulated node presents (admitted by the policy).
    pub measurement: Measurement,
    /// Enrolments in flight at once.
    pub enroll_gate: Semaphore,
    /// Set to true: every node closes its session and stops.
    pub shutdown: watch::Receiver<bool>,
    /// Each increment: every node does `burst_refreshes` refreshes back to back.
    pub burst: watch::Receiver<u64>,
    /// Refreshes per node per burst.
    pub burst_refreshes: u64,
}

/// Simulated nodes per source address.
pub const NODES_PER_SOURCE: usize = 200;

/// Most source addresses (127.0.1.1 … 127.0.1.64).
pub const MAX_SOURCES: usize = 64;

/// Refreshes in flight at once in the burst phase.
pub const BURST_CONCURRENCY: usize = 256;

/// One endpoint per [`NODES_PER_SOURCE`] nodes (at most [`MAX_SOURCES`]), on 127.0.1.k
/// (Linux routes all of 127/8 to loopback).
pub fn endpoints(nodes: usize) -> Result<Vec<quinn::Endpoint>, hopmesh_transport::TransportError> {
    (1..=nodes.div_ceil(NODES_PER_SOURCE).clamp(1, MAX_SOURCES))
        .map(|k| {
            let socket = std::net::UdpSocket::bind(("127.0.1.".to_owned() + &k.to_string(), 0))
                .map_err(|e| hopmesh_transport::TransportError::Io {
                    path: format!("udp 127.0.1.{k}"),
                    source: e,
                })?;
            hopmesh_transport::quic::endpoint(socket, None)
        })
        .collect()
}

impl Ctx {
    fn endpoint(&self, index: usize) -> &quinn::Endpoint {
        &self.endpoints[index % self.endpoints.len()]
    }

    /// The verifier (replica) node `index` talks to.
    pub fn verifier(&self, index: usize) -> SocketAddr {
        self.verifiers[index % self.verifiers.len()]
    }

    /// Closes every endpoint.
    pub fn close(&self) {
        for e in &self.endpoints {
            e.close(0u32.into(), b"done");
        }
    }
}

fn unix_now() -> UnixTime {
    UnixTime::from_secs(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// A deterministic jitter fraction in 0.4..=0.6 (the node's half-life ± 10 %), from the node
/// index and how many refreshes it did (no RNG needed).
fn jitter(index: usize, n: u64) -> f64 {
    let mut x = (index as u64 ^ (n << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    0.4 + 0.2 * ((x % 10_000) as f64 / 10_000.0)
}

/// The advertised address of node `index` (never dialled by the simulator).
pub fn advertised(index: usize) -> BoundedVec<Address, 4> {
    let a = format!("127.0.0.1:{}", 40_000 + (index % 20_000));
    BoundedVec::new(vec![BoundedString::truncated(&a)]).unwrap_or_default()
}

/// Runs node `index` until shutdown: enrol with `secret`, then sessions.
pub async fn run(ctx: Arc<Ctx>, index: usize, secret: JoinSecret, slot: Slot) {
    let identity = match Identity::generate() {
        Ok(i) => i,
        Err(e) => {
            let mut s = slot.lock();
            s.error(format!("key: {e}"));
            s.stopped = true;
            return;
        }
    };
    slot.lock().node_id = Some(identity.node_id());
    // The gate is never closed; were it, enrolment would just not be throttled.
    let permit = ctx.enroll_gate.acquire().await.ok();
    slot.lock().enroll_started = Some(Instant::now());
    let mut shutdown = ctx.shutdown.clone();
    let mut attempt = 1;
    loop {
        match enroll(&ctx, index, secret.clone(), &identity).await {
            Ok(()) => break,
            // The secret is single-use: refused on a retry, an earlier attempt consumed it and
            // its answer was lost. The session's refresh then shows whether it enrolled.
            Err(ClientError::Refused(Refusal::JoinSecret)) if attempt > 1 => break,
            Err(e) => {
                let mut s = slot.lock();
                s.error(format!("enroll (attempt {attempt}): {e}"));
                if matches!(e, ClientError::Refused(_)) || attempt >= MAX_ENROLL_ATTEMPTS {
                    s.stopped = true;
                    return;
                }
            }
        }
        let backoff = RESTART_BACKOFF * attempt;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {
                slot.lock().stopped = true;
                return;
            }
        }
        attempt += 1;
    }
    slot.lock().enrolled_at = Some(Instant::now());
    let mut permit = permit;
    let mut restarts = 0;
    loop {
        slot.lock().sessions += 1;
        let result = tokio::select! {
            r = session(&ctx, index, &identity, &slot, &mut permit) => r,
            _ = shutdown.changed() => Ok(()),
        };
        permit = None;
        {
            let mut s = slot.lock();
            if *ctx.shutdown.borrow() || s.revoked {
                s.stopped = true;
                return;
            }
            s.error(match result {
                Ok(()) => "the verifier ended the push stream".to_owned(),
                Err(e) => format!("session: {e}"),
            });
            restarts += 1;
            if restarts > MAX_SESSION_RESTARTS {
                s.stopped = true;
                return;
            }
            s.consumer.resubscribed();
        }
        tokio::select! {
            _ = tokio::time::sleep(RESTART_BACKOFF) => {}
            _ = shutdown.changed() => {
                slot.lock().stopped = true;
                return;
            }
        }
    }
}

async fn enroll(
    ctx: &Ctx,
    index: usize,
    secret: JoinSecret,
    identity: &Identity,
) -> Result<(), ClientError> {
    let client = VerifierClient::connect(
        ctx.endpoint(index),
        ctx.verifier(index),
        identity,
        &ctx.pins,
    )
    .await?;
    let facts = HostFacts {
        hostname: BoundedString::truncated(&format!("sim-{index}")),
        platform: BoundedString::truncated("sim"),
        version: BoundedString::truncated(env!("CARGO_PKG_VERSION")),
    };
    let result = client
        .enroll(
            secret,
            ctx.measurement,
            facts,
            advertised(index),
            unix_now(),
        )
        .await;
    client.close();
    result.map(|_| ())
}

async fn refresh(
    ctx: &Ctx,
    index: usize,
    client: &VerifierClient,
    slot: &Slot,
) -> Result<VerifiedAttestation, ClientError> {
    let (_, v) = client
        .refresh(ctx.measurement, advertised(index), unix_now())
        .await?;
    slot.lock().refreshes += 1;
    Ok(v)
}

/// A revocation list received by a node, waiting for its signature check.
struct Received {
    slot: Slot,
    push: Push,
    at: Instant,
}

/// The one thread that checks received revocation lists, in arrival order.
///
/// The simulated nodes share the simulator's cores: checking each of N nodes' copy of a list
/// (an Ed25519 verification, ~50 µs) inline in the reader would delay the next node's receipt
/// by the previous nodes' checks, so the measured propagation at 10 000 nodes would be mostly
/// the simulator's own verification (~0.5 s), not the verifier's delivery. A node's arrival is
/// the time its reader took the frame (`at`); the list is then checked here, fully and in
/// order (one thread: a node's lists are applied in the order received), at the lowest CPU
/// priority, and counted as before ([`Consumer::apply`]: a list that does not verify is a
/// violation, and a node only counts as having seen a revocation once its list verified).
fn revocation_checker() -> &'static std_mpsc::Sender<Received> {
    static CHECKER: OnceLock<std_mpsc::Sender<Received>> = OnceLock::new();
    CHECKER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<Received>();
        std::thread::Builder::new()
            .name("sim-revocation-check".into())
            .spawn(move || {
                lowest_priority();
                for r in rx {
                    let bytes = encode_frame(&r.push, PUSH_CAP).map_or(0, |f| f.len());
                    r.slot.lock().consumer.apply(r.push, bytes, r.at);
                }
            })
            .expect("spawn the revocation checker thread");
        tx
    })
}

/// Lowers the calling thread to nice 19 (Linux: niceness is per thread). Without `renice` the
/// thread keeps normal priority: the checks are then still complete, only the receipts they
/// delay are later.
fn lowest_priority() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    let ok = tid.is_some_and(|tid| {
        std::process::Command::new("renice")
            .args(["-n", "19", "-p", &tid])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!("sim: could not lower the revocation checker's priority (renice); continuing");
    }
}

/// Reads every push and hands it to the consumer; ends with the stream. Revocation lists are
/// timed here, at receipt, and checked by [`revocation_checker`].
async fn read_pushes(mut stream: PushStream, slot: Slot) -> Result<(), ClientError> {
    loop {
        match stream.next().await {
            Ok(Some(push @ Push::Revocations { .. })) => {
                let r = Received {
                    slot: slot.clone(),
                    push,
                    at: Instant::now(),
                };
                if revocation_checker().send(r).is_err() {
                    return Err(ClientError::Connect(
                        "the revocation checker thread is gone".into(),
                    ));
                }
            }
            Ok(Some(push)) => {
                let now = Instant::now();
                // The bytes a node receives for it: the frame (length prefix and payload).
                let bytes = encode_frame(&push, PUSH_CAP).map_or(0, |f| f.len());
                let mut s = slot.lock();
                s.consumer.apply(push, bytes, now);
                if s.consumer.needs_resync {
                    // As a node does: a table that did not apply means a fresh snapshot.
                    return Err(ClientError::Connect(
                        "table out of sync: resubscribing".into(),
                    ));
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(ClientError::Frame(e)),
        }
    }
}

async fn session(
    ctx: &Ctx,
    index: usize,
    identity: &Identity,
    slot: &Slot,
    permit: &mut Option<tokio::sync::SemaphorePermit<'_>>,
) -> Result<(), ClientError> {
    let client = VerifierClient::connect(
        ctx.endpoint(index),
        ctx.verifier(index),
        identity,
        &ctx.pins,
    )
    .await?;
    let v = refresh(ctx, index, &client, slot).await?;
    let mut refreshes = 0u64;
    let mut next =
        tokio::time::Instant::now() + refresh_interval(&v, unix_now(), jitter(index, refreshes));
    let stream = client.subscribe().await?;
    {
        let mut s = slot.lock();
        if s.subscribed_at.is_none() {
            s.subscribed_at = Some(Instant::now());
        }
    }
    // Enrolment is done once the node is subscribed: the next one may start.
    *permit = None;
    let mut reader = tokio::spawn(read_pushes(stream, slot.clone()));
    let mut burst = ctx.burst.clone();
    burst.borrow_and_update();
    let result = loop {
        tokio::select! {
            r = &mut reader => break match r {
                Ok(r) => r,
                Err(e) => Err(ClientError::Connect(format!("push reader: {e}"))),
            },
            _ = tokio::time::sleep_until(next) => {
                let v = refresh(ctx, index, &client, slot).await?;
                refreshes += 1;
                next = tokio::time::Instant::now()
                    + refresh_interval(&v, unix_now(), jitter(index, refreshes));
            }
            Ok(()) = burst.changed() => {
                for _ in 0..ctx.burst_refreshes {
                    let _permit = ctx.burst_gate.acquire().await.ok();
                    refresh(ctx, index, &client, slot).await?;
                    slot.lock().burst_refreshes += 1;
                }
            }
        }
    };
    reader.abort();
    client.close();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::consumer::tests::{consumer, id, list};

    #[test]
    fn revocations_are_checked_off_the_reader_in_order_and_keep_their_receipt_time() {
        let slot = Slot::new(consumer());
        let (t1, t2) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        let bad = match list(3, &[id(9)]) {
            Push::Revocations { list } => {
                let mut b = list.to_vec();
                *b.last_mut().expect("signed") ^= 1;
                Push::Revocations {
                    list: BoundedVec::new(b).expect("fits"),
                }
            }
            _ => unreachable!("a list"),
        };
        for (push, at) in [
            (list(1, &[id(1)]), t1),
            (list(2, &[id(1), id(2)]), t2),
            (bad, t2),
        ] {
            let slot = slot.clone();
            revocation_checker()
                .send(Received { slot, push, at })
                .expect("checker alive");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while slot.lock().consumer.violations.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = slot.lock();
        // Applied in order: v2 after v1; the receipt time is what the reader took, not when
        // the check ran; the tampered v3 is refused and counted, never applied.
        assert_eq!(s.consumer.revocation_version(), 2);
        assert_eq!(s.consumer.revoked_seen[&id(1)], t1);
        assert_eq!(s.consumer.revoked_seen[&id(2)], t2);
        assert!(!s.consumer.revoked_seen.contains_key(&id(9)));
        assert_eq!(
            s.consumer.violations.len(),
            1,
            "{:?}",
            s.consumer.violations
        );
    }

    #[test]
    fn jitter_stays_within_the_nodes_half_life_band() {
        for i in 0..1000 {
            for n in 0..5 {
                let f = jitter(i, n);
                assert!((0.4..=0.6).contains(&f), "{f}");
            }
        }
        assert_ne!(jitter(1, 0), jitter(2, 0));
    }
}
