//! The verifier link: one session at a time (refresh at half-life with jitter, apply pushes,
//! deliver reports), reconnecting with [`Backoff`]; renewals of our attestation go to every peer.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::attestation::{ATTESTATION_BACKDATE, VerifiedAttestation};
use hopmesh_protocol::enrollment::{Address, Push, Refusal, Report};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::table_sync::TableSyncError;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::fields;
use hopmesh_transport::quic::FrameIoError;
use hopmesh_transport::verifier_client::{ClientError, Heartbeat, PushStream, VerifierClient};
use tokio::sync::{mpsc, watch};

use crate::counters::Counters;
use crate::datadir::write_atomic;
use crate::overlay::Overlay;
use crate::shared::Shared;

/// Shortest wait between verifier reconnection attempts (and the value after a healthy
/// session).
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between verifier reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A session that stayed subscribed at least this long counts as healthy: the next
/// reconnection waits [`MIN_BACKOFF`] again, whatever ended the session (a verifier restart
/// after hours of service must not cost the doubled wait of earlier failures).
pub const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Pushes read ahead of the session loop (the push reader waits when it is full, never drops).
pub const PUSH_QUEUE: usize = 16;

/// Most table resyncs (resubscribes after a table update that did not assemble or apply,
/// `hopmesh_protocol::table_sync`) per [`TABLE_RESYNC_WINDOW`] on one session. One more ends
/// the session as failed, so the reconnection [`Backoff`] paces a verifier that keeps sending
/// tables that do not apply (counted as `table_resync_limited`, audited).
pub const TABLE_RESYNCS_PER_WINDOW: u32 = 4;
/// The window of [`TABLE_RESYNCS_PER_WINDOW`].
pub const TABLE_RESYNC_WINDOW: Duration = Duration::from_secs(60);

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// The verifier client failed or was refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Table updates kept failing past [`TABLE_RESYNCS_PER_WINDOW`].
    #[error("table resyncs over {TABLE_RESYNCS_PER_WINDOW} per {TABLE_RESYNC_WINDOW:?}")]
    ResyncBudget,
}

/// The resync budget of one session: at most [`TABLE_RESYNCS_PER_WINDOW`] resyncs in any
/// window of [`TABLE_RESYNC_WINDOW`] (a sliding log of the last ones).
#[derive(Debug, Default)]
pub struct ResyncBudget {
    recent: std::collections::VecDeque<tokio::time::Instant>,
}

impl ResyncBudget {
    /// May the session resync at `now`? Records the resync if so.
    pub fn permit(&mut self, now: tokio::time::Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= TABLE_RESYNC_WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= TABLE_RESYNCS_PER_WINDOW as usize {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// How a verifier session ended, as the backoff sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The verifier finished the push stream.
    Clean,
    /// The verifier refuses this node (revoked, not enrolled): retry rarely.
    Refused,
    /// Network, handshake or protocol failure.
    Failed,
}

/// The reconnection backoff of the verifier link: doubling from [`MIN_BACKOFF`] to
/// [`MAX_BACKOFF`], back to [`MIN_BACKOFF`] after a clean end or a healthy session (one that
/// stayed subscribed for [`HEALTHY_SESSION`]), [`MAX_BACKOFF`] at once when refused.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The wait (without jitter) before the next attempt, after a session that ended with
    /// `end` having been subscribed for `subscribed_for` (`None`: it never got that far).
    pub fn after(&mut self, end: SessionEnd, subscribed_for: Option<Duration>) -> Duration {
        if end == SessionEnd::Refused {
            self.next = MAX_BACKOFF;
            return MAX_BACKOFF;
        }
        if end == SessionEnd::Clean || subscribed_for.is_some_and(|d| d >= HEALTHY_SESSION) {
            self.next = MIN_BACKOFF;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }
}

/// Pause before the link tries the next listed verifier after one failed or went away
/// (jittered by up to a quarter more): short, so a dead replica costs little more than the
/// time to notice it (`Heartbeat::NODE`). A whole round of failures waits the [`Backoff`].
pub const FAILOVER_PAUSE: Duration = Duration::from_millis(100);

/// A session subscribed at least this long counts as served: when it ends the link moves on
/// at once (not a failed attempt), though only a [`HEALTHY_SESSION`] resets the backoff.
pub const SERVED_SESSION: Duration = Duration::from_secs(2);

/// Which listed verifier the link uses, and how long it waits before the next attempt.
///
/// It starts at one picked by the node's id (so nodes spread over the replicas), and moves to
/// the next after every session that ends: after a healthy or cleanly ended one (a replica
/// went away, or stopped serving) at once ([`FAILOVER_PAUSE`]); after a failed attempt too,
/// until every verifier failed in a row, then it waits the [`Backoff`]; after a refusal
/// (revoked, not enrolled) it waits [`MAX_BACKOFF`]. With one verifier it is the [`Backoff`]
/// alone.
#[derive(Clone, Debug)]
pub struct Failover {
    n: usize,
    current: usize,
    failed_in_row: usize,
    backoff: Backoff,
}

impl Failover {
    /// `n` verifiers (at least one), starting at the one `node` maps to.
    pub fn new(n: usize, node: &NodeId) -> Self {
        let n = n.max(1);
        let mut first = [0u8; 8];
        first.copy_from_slice(&node.as_bytes()[..8]);
        let start = usize::try_from(u64::from_be_bytes(first) % n as u64).unwrap_or(0);
        Self {
            n,
            current: start,
            failed_in_row: 0,
            backoff: Backoff::default(),
        }
    }

    /// The verifier to use now (an index into the list).
    pub fn current(&self) -> usize {
        self.current
    }

    /// After the session at [`Self::current`] ended with `end`, having been subscribed for
    /// `subscribed_for`: moves on, and returns the wait (without jitter) before the next attempt.
    pub fn after(&mut self, end: SessionEnd, subscribed_for: Option<Duration>) -> Duration {
        if self.n == 1 {
            return self.backoff.after(end, subscribed_for);
        }
        self.current = (self.current + 1) % self.n;
        if end == SessionEnd::Refused {
            self.failed_in_row = 0;
            return self.backoff.after(end, subscribed_for);
        }
        let healthy =
            end == SessionEnd::Clean || subscribed_for.is_some_and(|d| d >= HEALTHY_SESSION);
        if healthy {
            self.failed_in_row = 0;
            self.backoff = Backoff::default();
            return FAILOVER_PAUSE;
        }
        // A replica that served for a while and went away (a rolling restart moves nodes
        // twice within HEALTHY_SESSION): move at once, but keep the backoff's state, so
        // replicas that drop every session soon after it starts are still paced.
        if subscribed_for.is_some_and(|d| d >= SERVED_SESSION) {
            self.failed_in_row = 0;
            return FAILOVER_PAUSE;
        }
        self.failed_in_row += 1;
        if self.failed_in_row < self.n {
            return FAILOVER_PAUSE;
        }
        self.failed_in_row = 0;
        self.backoff.after(end, subscribed_for)
    }
}

/// Keeps the verifier link up: refresh at half-life with jitter, apply pushes, send reports,
/// move between the listed verifiers with [`Failover`].
pub async fn run(
    overlay: Arc<Overlay>,
    mut reports: mpsc::Receiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = overlay.shared.clone();
    let verifiers = node.config.verifiers.clone();
    let mut failover = Failover::new(verifiers.len(), &node.local);
    loop {
        let mut subscribed_at = None;
        let name = verifiers
            .get(failover.current())
            .cloned()
            .unwrap_or_default();
        let session = async {
            let addrs = node
                .resolve_hostport(&name)
                .await
                .map_err(ClientError::Connect)?;
            let addr = *addrs
                .first()
                .ok_or_else(|| ClientError::Connect("verifier name has no address".into()))?;
            let client = VerifierClient::connect_with(
                &overlay.endpoint,
                addr,
                &node.identity,
                &node.pins,
                Heartbeat::NODE,
            )
            .await?;
            run_session(&overlay, &client, &mut reports, &mut subscribed_at).await
        };
        let result = tokio::select! {
            r = session => r,
            _ = shutdown.changed() => return,
        };
        node.set_verifier_connected(false);
        let end = match result {
            Ok(()) => SessionEnd::Clean,
            Err(LinkError::Client(ClientError::Refused(
                r @ (Refusal::Revoked | Refusal::NotEnrolled),
            ))) => {
                node.audit("verifier_refused", fields! {"reason" => r.to_string()});
                tracing::error!(reason = %r, "the verifier refuses this node; failing closed when the attestation expires");
                SessionEnd::Refused
            }
            Err(e) => {
                tracing::warn!(verifier = %name, error = %e, "verifier link down");
                SessionEnd::Failed
            }
        };
        let wait = failover.after(
            end,
            subscribed_at.map(|t: tokio::time::Instant| t.elapsed()),
        );
        if verifiers.len() > 1 {
            node.counters
                .verifier_failovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let to = verifiers.get(failover.current()).map_or("", String::as_str);
            tracing::info!(from = %name, to, "verifier link moves to the next verifier");
        }
        let jitter = Duration::from_millis(rand::random_range(0..=wait.as_millis() as u64 / 4 + 1));
        tokio::select! {
            _ = tokio::time::sleep(wait + jitter) => {}
            _ = shutdown.changed() => return,
        }
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
    subscribed_at: &mut Option<tokio::time::Instant>,
) -> Result<(), LinkError> {
    let node = &overlay.shared;
    // A fixed deadline: a `sleep(next)` inside the select would restart on every push and
    // never fire while pushes arrive faster than the refresh interval.
    let mut next = tokio::time::Instant::now() + refresh(overlay, client).await?;
    let mut pushes = PushReader::spawn(client.subscribe().await?);
    node.state_write().table_stream_restarted();
    let mut resyncs = ResyncBudget::default();
    *subscribed_at = Some(tokio::time::Instant::now());
    node.set_verifier_connected(true);
    node.audit("verifier_connected", fields! {});
    loop {
        // Every branch is cancel-safe: the push stream is read by its own task (a frame half
        // read when another branch wins is never lost), `mpsc::recv` and `sleep_until` keep
        // nothing across a cancel, and the work each branch starts runs outside the select.
        tokio::select! {
            p = pushes.next() => match p {
                Some(Ok(Some(push))) => {
                    if let Some(why) = apply_push(overlay, push) {
                        pushes = resync(overlay, client, pushes, &mut resyncs, &why).await?;
                    }
                }
                Some(Ok(None)) | None => return Ok(()),
                Some(Err(e)) => return Err(ClientError::Frame(e).into()),
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

/// A table update did not assemble or apply (`why`; the table held is unchanged): drop the
/// push stream and subscribe again on the same connection. The verifier replaces the old
/// subscription and starts the new stream with a fresh snapshot. Counted (`table_resyncs`)
/// and audited (`table_resync`); past the [`ResyncBudget`] the session ends instead.
async fn resync(
    overlay: &Overlay,
    client: &VerifierClient,
    old: PushReader,
    budget: &mut ResyncBudget,
    why: &TableSyncError,
) -> Result<PushReader, LinkError> {
    let node = &overlay.shared;
    drop(old);
    if !budget.permit(tokio::time::Instant::now()) {
        node.counters.refused("table_resync_limited");
        node.audit(
            "table_resync_limited",
            fields! {"reason" => why.reason(), "detail" => why.to_string()},
        );
        tracing::warn!(error = %why, "table updates keep failing: ending the verifier session");
        return Err(LinkError::ResyncBudget);
    }
    Counters::add(&node.counters.table_resyncs, 1);
    node.audit(
        "table_resync",
        fields! {"reason" => why.reason(), "detail" => why.to_string()},
    );
    tracing::warn!(error = %why, "table update refused: resubscribing for a fresh snapshot");
    let pushes = PushReader::spawn(client.subscribe().await?);
    node.state_write().table_stream_restarted();
    Ok(pushes)
}

/// The one long-lived reader of a session's push stream: a task that owns the stream (and so
/// every partial frame), handing whole pushes to the session through a [`PUSH_QUEUE`]-deep
/// channel. Dropping it stops the task.
struct PushReader {
    rx: mpsc::Receiver<Result<Option<Push>, FrameIoError>>,
    task: tokio::task::JoinHandle<()>,
}

impl PushReader {
    fn spawn(mut stream: PushStream) -> Self {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let item = stream.next().await;
                let last = !matches!(item, Ok(Some(_)));
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Self { rx, task }
    }

    /// The next push, the end of the stream (`Ok(None)`), or its error; cancel-safe.
    async fn next(&mut self) -> Option<Result<Option<Push>, FrameIoError>> {
        self.rx.recv().await
    }
}

impl Drop for PushReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Applies one push: the state decides ([`crate::state::NodeState::apply`]), then the
/// effects are carried out (persist, audit, close). Returns why the table needs a resync, if
/// it does.
fn apply_push(overlay: &Overlay, push: Push) -> Option<TableSyncError> {
    let node = &overlay.shared;
    let now = node.now();
    let fx = node.state_write().apply(push, now);
    if let Some(bytes) = fx.persist_revocations {
        if let Err(e) = write_atomic(&node.dir.file("revocations.bin"), &bytes) {
            tracing::error!(error = %e, "could not persist the revocation list");
        }
        let (version, entries, issued_at) = node
            .state_read()
            .revocations
            .as_ref()
            .map_or((0, 0, now), |(v, _, l)| (*v, l.revoked.len(), l.issued_at));
        node.counters
            .revocation_propagation
            .observe(now.secs_since(issued_at) as f64);
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
    fx.resync
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_resyncs_are_bounded_per_window() {
        let mut b = ResyncBudget::default();
        let t0 = tokio::time::Instant::now();
        for i in 0..TABLE_RESYNCS_PER_WINDOW {
            assert!(
                b.permit(t0 + Duration::from_secs(u64::from(i))),
                "resync {i}"
            );
        }
        // One past the budget inside the window is refused (and not recorded).
        assert!(!b.permit(t0 + Duration::from_secs(10)));
        assert!(!b.permit(t0 + TABLE_RESYNC_WINDOW - Duration::from_millis(1)));
        // Once the first leaves the window, one more fits; then the budget is full again.
        assert!(b.permit(t0 + TABLE_RESYNC_WINDOW));
        assert!(!b.permit(t0 + TABLE_RESYNC_WINDOW));
        // A quiet window later the whole budget is back.
        let later = t0 + TABLE_RESYNC_WINDOW * 3;
        for i in 0..TABLE_RESYNCS_PER_WINDOW {
            assert!(b.permit(later), "resync {i}");
        }
        assert!(!b.permit(later));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_healthy_session() {
        let mut b = Backoff::default();
        let failed: Vec<Duration> = (0..8).map(|_| b.after(SessionEnd::Failed, None)).collect();
        assert_eq!(failed[0], MIN_BACKOFF);
        assert_eq!(failed[1], MIN_BACKOFF * 2);
        assert_eq!(*failed.last().expect("some"), MAX_BACKOFF);
        // Subscribed, but just short of healthy: still backing off.
        let short = HEALTHY_SESSION - Duration::from_millis(1);
        assert_eq!(b.after(SessionEnd::Failed, Some(short)), MAX_BACKOFF);
        // A session that lived HEALTHY_SESSION and then failed starts over.
        assert_eq!(
            b.after(SessionEnd::Failed, Some(HEALTHY_SESSION)),
            MIN_BACKOFF
        );
        assert_eq!(b.after(SessionEnd::Failed, None), MIN_BACKOFF * 2);
        // A clean end starts over too; a refusal waits the longest at once.
        assert_eq!(b.after(SessionEnd::Clean, None), MIN_BACKOFF);
        assert_eq!(b.after(SessionEnd::Refused, None), MAX_BACKOFF);
        assert_eq!(b.after(SessionEnd::Failed, None), MAX_BACKOFF);
        assert_eq!(
            b.after(SessionEnd::Refused, Some(HEALTHY_SESSION)),
            MAX_BACKOFF
        );
    }

    fn node(first: u8) -> NodeId {
        let mut b = [7u8; 32];
        b[..8].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, first]);
        NodeId::from_bytes(b)
    }

    #[test]
    fn failover_starts_by_node_id_and_moves_through_every_verifier_before_backing_off() {
        // Nodes spread over the replicas by id.
        let starts: Vec<usize> = (0..6)
            .map(|i| Failover::new(3, &node(i)).current())
            .collect();
        assert_eq!(starts, [0, 1, 2, 0, 1, 2]);
        let mut f = Failover::new(3, &node(1));
        // Failed attempts move on at once until all three failed in a row; then the backoff.
        let mut seen = vec![f.current()];
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        seen.push(f.current());
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        seen.push(f.current());
        assert_eq!(seen, [1, 2, 0], "every verifier tried once");
        assert_eq!(f.after(SessionEnd::Failed, None), MIN_BACKOFF);
        assert_eq!(f.current(), 1);
        // The next round fails too: the backoff doubles per round, not per attempt.
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, None), MIN_BACKOFF * 2);
        // A session that served a while, short of healthy, moves on at once too: a rolling
        // restart moves a node twice within HEALTHY_SESSION.
        assert_eq!(
            f.after(SessionEnd::Failed, Some(SERVED_SESSION)),
            FAILOVER_PAUSE
        );
        assert_eq!(
            f.after(SessionEnd::Failed, Some(SERVED_SESSION)),
            FAILOVER_PAUSE
        );
        assert_eq!(
            f.after(SessionEnd::Failed, Some(SERVED_SESSION)),
            FAILOVER_PAUSE
        );
        // One that dropped right after subscribing is a failed attempt.
        let short = Some(SERVED_SESSION - Duration::from_millis(1));
        assert_eq!(f.after(SessionEnd::Failed, short), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, short), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, short), MIN_BACKOFF * 4);
        // A healthy session that ends (its replica died) moves on at once and starts over.
        assert_eq!(
            f.after(SessionEnd::Failed, Some(HEALTHY_SESSION)),
            FAILOVER_PAUSE
        );
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, None), FAILOVER_PAUSE);
        assert_eq!(f.after(SessionEnd::Failed, None), MIN_BACKOFF);
        // A replica that closes the session cleanly (stopping, or fenced) is left at once.
        let before = f.current();
        assert_eq!(
            f.after(SessionEnd::Clean, Some(Duration::from_secs(1))),
            FAILOVER_PAUSE
        );
        assert_ne!(f.current(), before);
        // A refusal waits the longest, and the next attempt goes elsewhere.
        let before = f.current();
        assert_eq!(f.after(SessionEnd::Refused, None), MAX_BACKOFF);
        assert_ne!(f.current(), before);
    }

    #[test]
    fn failover_with_one_verifier_is_the_backoff_alone() {
        let mut f = Failover::new(1, &node(5));
        let mut b = Backoff::default();
        for end in [
            SessionEnd::Failed,
            SessionEnd::Failed,
            SessionEnd::Clean,
            SessionEnd::Failed,
            SessionEnd::Refused,
        ] {
            assert_eq!(f.after(end, None), b.after(end, None));
            assert_eq!(f.current(), 0);
        }
    }
}
