//! The verifier link: one session at a time (refresh at half-life with jitter, apply pushes,
//! deliver reports), reconnecting with backoff; renewals of our attestation go to every peer.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::attestation::{ATTESTATION_BACKDATE, VerifiedAttestation};
use hopmesh_protocol::enrollment::{Address, Push, Refusal, Report};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::fields;
use hopmesh_transport::verifier_client::{ClientError, VerifierClient};
use tokio::sync::{mpsc, watch};

use crate::datadir::write_atomic;
use crate::overlay::Overlay;
use crate::shared::Shared;

/// Shortest wait between verifier reconnection attempts (and the value after a healthy
/// session).
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between verifier reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps the verifier link up: refresh at half-life with jitter, apply pushes, send reports,
/// reconnect with backoff.
pub async fn run(
    overlay: Arc<Overlay>,
    mut reports: mpsc::Receiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = overlay.shared.clone();
    let mut backoff = MIN_BACKOFF;
    loop {
        let session = async {
            let addrs = node
                .resolve_hostport(&node.config.verifier)
                .await
                .map_err(ClientError::Connect)?;
            let addr = *addrs
                .first()
                .ok_or_else(|| ClientError::Connect("verifier name has no address".into()))?;
            let client =
                VerifierClient::connect(&overlay.endpoint, addr, &node.identity, &node.pins)
                    .await?;
            run_session(&overlay, &client, &mut reports).await
        };
        let result = tokio::select! {
            r = session => r,
            _ = shutdown.changed() => return,
        };
        node.set_verifier_connected(false);
        match result {
            Ok(()) => backoff = MIN_BACKOFF,
            Err(ClientError::Refused(r @ (Refusal::Revoked | Refusal::NotEnrolled))) => {
                node.audit("verifier_refused", fields! {"reason" => r.to_string()});
                tracing::error!(reason = %r, "the verifier refuses this node; failing closed when the attestation expires");
                backoff = MAX_BACKOFF;
            }
            Err(e) => tracing::warn!(error = %e, "verifier link down"),
        }
        let jitter =
            Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 4 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn refresh(overlay: &Overlay, client: &VerifierClient) -> Result<Duration, ClientError> {
    let node = &overlay.shared;
    let (env, v) = client
        .refresh(node.measurement, addresses(node), node.now())
        .await?;
    let interval = refresh_interval(&v, node.now(), rand::random_range(0.4..=0.6));
    set_attestation(overlay, env, v);
    Ok(interval)
}

async fn run_session(
    overlay: &Arc<Overlay>,
    client: &VerifierClient,
    reports: &mut mpsc::Receiver<Report>,
) -> Result<(), ClientError> {
    let node = &overlay.shared;
    // A fixed deadline: a `sleep(next)` inside the select would restart on every push and
    // never fire while pushes arrive faster than the refresh interval.
    let mut next = tokio::time::Instant::now() + refresh(overlay, client).await?;
    let mut pushes = client.subscribe().await?;
    node.set_verifier_connected(true);
    node.audit("verifier_connected", fields! {});
    loop {
        tokio::select! {
            p = pushes.next() => match p {
                Ok(Some(push)) => apply_push(overlay, push),
                Ok(None) => return Ok(()),
                Err(e) => return Err(ClientError::Frame(e)),
            },
            _ = tokio::time::sleep_until(next) => next = tokio::time::Instant::now() + refresh(overlay, client).await?,
            Some(r) = reports.recv() => {
                if let Err(e) = client.report(r).await {
                    tracing::warn!(error = %e, "report not delivered");
                }
            }
        }
    }
}

/// Applies one push: the state decides ([`crate::state::NodeState::apply`]), then the
/// effects are carried out (persist, audit, close).
fn apply_push(overlay: &Overlay, push: Push) {
    let node = &overlay.shared;
    let now = node.now();
    let fx = node.state_write().apply(push, now);
    if let Some(bytes) = fx.persist_revocations {
        if let Err(e) = write_atomic(&node.dir.file("revocations.bin"), &bytes) {
            tracing::error!(error = %e, "could not persist the revocation list");
        }
        let (version, entries) = node
            .state_read()
            .revocations
            .as_ref()
            .map_or((0, 0), |(v, _, l)| (*v, l.revoked.len()));
        // Wall-clock milliseconds besides the log's own seconds: propagation time is measured
        // from these (benches/, scale workload).
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        node.audit(
            "revocation_list_applied",
            fields! {"version" => version, "entries" => entries, "unix_ms" => unix_ms},
        );
    }
    if let Some(why) = fx.refused {
        node.counters.refused("push_refused");
        node.audit("push_refused", fields! {"reason" => why});
    }
    for (peer, why) in fx.close {
        overlay.close_peer(&peer, why);
    }
}

/// When to refresh next: at `fraction` (half-life with ±10 % jitter) of the attestation's
/// TTL (its lifetime less the verifier's `ATTESTATION_BACKDATE`), and never later than that
/// fraction of what is left of it on our clock (a clock ahead of the verifier's sees less
/// left and refreshes sooner; one behind does not refresh later than the TTL says).
pub fn refresh_interval(v: &VerifiedAttestation, now: UnixTime, fraction: f64) -> Duration {
    let a = v.get();
    let lifetime = a.not_after.secs_since(a.not_before);
    let lifetime = match lifetime.checked_sub(ATTESTATION_BACKDATE) {
        Some(ttl) if ttl >= 2 => ttl,
        // Not backdated (an older verifier): the whole lifetime is the TTL.
        _ => lifetime,
    };
    let left = a.not_after.secs_since(now);
    let base = lifetime.min(left).max(2);
    Duration::from_secs_f64(base as f64 * fraction)
}

/// Persists a refreshed attestation and installs it, unless it is not valid yet on our clock
/// while the old one still is (then the watchdog installs it later); peers get it as a
/// renewal from each connection's control writer, so the session never waits on a peer.
fn set_attestation(overlay: &Overlay, envelope: Vec<u8>, v: VerifiedAttestation) {
    let node = &overlay.shared;
    if let Err(e) = write_atomic(&node.dir.file("attestation.bin"), &envelope) {
        tracing::warn!(error = %e, "could not persist the attestation");
    }
    let now = node.now();
    if node.state_write().refreshed(envelope.clone(), v, now) {
        overlay.renew_all(envelope);
    }
}

fn addresses(node: &Shared) -> BoundedVec<Address, 4> {
    BoundedVec::new(
        node.config
            .advertise
            .iter()
            .take(4)
            .map(|a| BoundedString::truncated(a))
            .collect(),
    )
    .unwrap_or_default()
}
