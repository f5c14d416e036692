//! Following a shared store's change feed: what the other replicas committed (an enrolment,
//! an address change, a revocation, a ban, a reissue, a pruned list) is read again from the
//! store, in feed order, and applied here as if it had been done here, pushes included. Each
//! application re-reads the current state and compares, so applying a change twice, or a
//! change this verifier already holds, does nothing.

use hopmesh_protocol::enrollment::Push;
use hopmesh_protocol::hop_token::PairIds;
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::BoundedVec;

use super::Authority;
use super::refusals::AdminError;
use super::revocations::Revocations;
use crate::store::{BanSubject, ChangeKind, NodeRecord, PairState, lock};

/// Entries read from the feed per store call.
pub const FEED_BATCH: usize = 256;

/// Where this verifier is in the feed.
#[derive(Debug, Default)]
pub(super) struct Feed {
    /// The last entry read (and applied, unless it was this verifier's own).
    pub(super) seq: u64,
    /// Since when this replica has not been serving (fenced), if it is not.
    pub(super) fenced_since: Option<UnixTime>,
    /// The last read of the feed failed: the database may be unreachable, so the periodic
    /// store work that can wait (pruning, audit checkpoints) waits, rather than holding the
    /// authority lock for a call bound each while the replica is about to be fenced.
    pub(super) failing: bool,
    /// Version of the stored policy this verifier applies (0: its own file, not stored).
    pub(super) policy_version: u64,
    /// Whether the stored policy was checked since start (a reload elsewhere between the
    /// policy read at start and the feed's head is caught by this first check).
    pub(super) policy_synced: bool,
}

impl Authority {
    /// Reads the change feed from where this verifier left off and applies the other
    /// replicas' changes, then tells the store it is current (which lets a replica that took
    /// its serve lock again serve). On a store error it stops at the last change applied, so
    /// nothing is skipped; the next call goes on from there. Returns how many were applied.
    pub fn follow(&mut self, now: UnixTime) -> Result<usize, AdminError> {
        if !lock(&self.store).is_shared() {
            return Ok(0);
        }
        let followed = self.follow_shared(now);
        self.feed.failing = followed.is_err();
        followed
    }

    fn follow_shared(&mut self, now: UnixTime) -> Result<usize, AdminError> {
        lock(&self.store).relock()?;
        if !self.feed.policy_synced {
            self.sync_policy(now)?;
            self.feed.policy_synced = true;
        }
        let mut applied = 0;
        loop {
            let batch = lock(&self.store).changes_since(self.feed.seq, FEED_BATCH)?;
            let full = batch.len() == FEED_BATCH;
            for c in batch {
                if !c.mine {
                    self.apply_change(&c.kind, now)?;
                    applied += 1;
                    let kind = match c.kind {
                        ChangeKind::Node(_) => "node",
                        ChangeKind::List => "list",
                        ChangeKind::Ban(_) => "ban",
                        ChangeKind::Pair(_) => "pair",
                        ChangeKind::Policy => "policy",
                    };
                    self.metrics
                        .feed_applied
                        .get_or_create(&[("kind", kind)])
                        .inc();
                }
                self.feed.seq = c.seq;
                self.metrics
                    .feed_seq
                    .set(i64::try_from(c.seq).unwrap_or(i64::MAX));
            }
            if !full {
                break;
            }
        }
        lock(&self.store).feed_current();
        Ok(applied)
    }

    /// Is this replica serving ([`crate::store::Store::check_serving`])? When it stops (fenced:
    /// it lost the database, or its feed is stale), every push stream is closed, once, so its
    /// nodes move to another replica; while fenced, subscribes are refused too. Audited
    /// (`fenced`, `serving_again`). Called by the follower after each read of the feed.
    pub fn check_fenced(&mut self, now: UnixTime) -> bool {
        let checked = lock(&self.store).check_serving();
        match (checked, self.feed.fenced_since) {
            (Ok(()), None) => true,
            (Ok(()), Some(since)) => {
                self.feed.fenced_since = None;
                tracing::warn!("serving again");
                self.audit(
                    now,
                    "serving_again",
                    hopmesh_transport::fields! {"fenced_secs" => now.as_secs().saturating_sub(since.as_secs())},
                );
                true
            }
            (Err(e), None) => {
                self.feed.fenced_since = Some(now);
                let closed = self.subscribers.close_all(&self.metrics);
                tracing::error!(error = %e, closed, "fenced: closed every push stream so nodes move to another replica");
                self.audit(
                    now,
                    "fenced",
                    hopmesh_transport::fields! {"reason" => e.to_string(), "closed" => closed},
                );
                false
            }
            (Err(_), Some(_)) => false,
        }
    }

    fn apply_change(&mut self, kind: &ChangeKind, now: UnixTime) -> Result<(), AdminError> {
        match kind {
            ChangeKind::List => {
                self.sync_revocations()?;
            }
            ChangeKind::Node(id) => {
                let rec = lock(&self.store).node(id)?;
                if let Some(rec) = rec {
                    self.apply_node_record(rec, now);
                }
            }
            ChangeKind::Ban(b) => self.apply_ban(b.clone(), now),
            ChangeKind::Policy => {
                self.sync_policy(now)?;
            }
            ChangeKind::Pair(p) => {
                let state = lock(&self.store).pair_state(p)?;
                if let Some(state) = state {
                    self.apply_pair_state(state, now);
                }
            }
        }
        Ok(())
    }

    /// The version of the stored policy this verifier serves (0: its policy file, on a store
    /// of its own).
    pub fn policy_version(&self) -> u64 {
        self.feed.policy_version
    }

    /// Records that the policy this verifier was built with is the stored version `version`
    /// (read by `start` from the shared store).
    pub fn policy_loaded(&mut self, version: u64) {
        self.feed.policy_version = version;
        self.metrics
            .policy_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Applies the stored policy if it is newer than the one served here (a reload at another
    /// replica). A stored policy that does not parse is an error: the follower stops there.
    fn sync_policy(&mut self, now: UnixTime) -> Result<bool, AdminError> {
        let stored = lock(&self.store).policy()?;
        let Some((version, text)) = stored else {
            return Ok(false);
        };
        if version <= self.feed.policy_version {
            return Ok(false);
        }
        let policy = hopmesh_protocol::policy::Policy::parse(&text)?;
        let out = self.apply_policy(policy, now);
        tracing::info!(
            version,
            nodes_changed = out.nodes_changed,
            "applied the mesh's policy from another replica"
        );
        self.policy_loaded(version);
        Ok(true)
    }

    /// A policy reload here: on a shared store the text is stored as the mesh's next policy
    /// version first (every replica applies it from the feed; a failing store refuses the
    /// reload and changes nothing), then applied.
    pub fn reload_stored(
        &mut self,
        policy: hopmesh_protocol::policy::Policy,
        text: &str,
        now: UnixTime,
    ) -> Result<super::PolicyReload, AdminError> {
        let version = lock(&self.store).put_policy(text)?;
        let out = self.apply_policy(policy, now);
        if version > 0 {
            self.policy_loaded(version);
        }
        Ok(out)
    }

    /// Installs the stored revocation list if it is newer than ours (after checking it verifies
    /// under our key) and pushes it to every subscriber. Also how a revoke that lost the race
    /// for the next version (`StaleVersion`) learns the winner's list. Returns whether it did.
    pub(super) fn sync_revocations(&mut self) -> Result<bool, AdminError> {
        let stored = lock(&self.store).revocation_list()?;
        let Some(stored) = stored else {
            return Ok(false);
        };
        if stored.version <= self.revocations.version() {
            return Ok(false);
        }
        let list = Revocations::verified(stored, self.issuer.key())?;
        self.revocations.install(list);
        self.revocation_version_changed();
        self.broadcast_revocations();
        Ok(true)
    }

    /// Applies a node record another replica committed: a new enrolment, new addresses, or a
    /// revocation (then with everything a revoke does here: peers told the generations they
    /// shared are compromised, its push stream closed, tables recompiled).
    fn apply_node_record(&mut self, rec: NodeRecord, now: UnixTime) {
        let id = rec.node_id;
        let old = self.registry.get(&id).cloned();
        if old.as_ref() == Some(&rec) {
            return;
        }
        let newly_revoked = match (&rec.revoked_at, &old) {
            (Some(_), Some(o)) => o.revoked_at.is_none(),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let at = rec.revoked_at;
        // A record never loses its revocation mark (the store keeps it), here neither.
        let keep_mark = old.as_ref().and_then(|o| o.revoked_at);
        self.registry.insert(NodeRecord {
            revoked_at: at.or(keep_mark),
            ..rec
        });
        match at {
            Some(at) if newly_revoked => {
                self.revocation_applied(&id, at, now, false);
            }
            _ => self.node_changed(&id, now),
        }
    }

    /// What follows a committed revocation of `node` (here or elsewhere): its peers treat
    /// every generation they share with it as compromised (told before the new list, when
    /// `broadcast`: a revoke here; the feed brings another replica's list first), its push
    /// stream closes, and the tables drop it. Returns how many peers were told.
    pub(super) fn revocation_applied(
        &mut self,
        node: &NodeId,
        at: UnixTime,
        now: UnixTime,
        broadcast: bool,
    ) -> usize {
        self.registry.mark_revoked(node, at);
        let peers = self.tables.peers_of(node);
        for p in &peers {
            let gens = self.seeds.recent_generations(&PairIds::new(*p, *node), now);
            let msg = Push::Compromised {
                peer: *node,
                generations: BoundedVec::new(gens).unwrap_or_default(),
            };
            self.push(p, &[msg]);
        }
        if broadcast {
            self.broadcast_revocations();
        }
        self.subscribers.close(node);
        self.node_changed(node, now);
        peers.len()
    }

    /// Applies a ban another replica committed; a node it covers leaves the tables.
    fn apply_ban(&mut self, ban: BanSubject, now: UnixTime) {
        if self.registry.has_ban(&ban) {
            return;
        }
        let covered: Vec<NodeId> = match &ban {
            BanSubject::Node(id) => vec![*id],
            BanSubject::Name(name) => self
                .registry
                .records()
                .filter(|r| r.name == *name)
                .map(|r| r.node_id)
                .collect(),
        };
        self.registry.add_bans([ban]);
        for id in covered {
            self.subscribers.close(&id);
            self.node_changed(&id, now);
        }
    }

    /// Applies a reissue another replica committed (a higher count than ours): both ends get
    /// the pair's fresh seeds and its compromised generations.
    fn apply_pair_state(&mut self, state: PairState, now: UnixTime) {
        if state.reissues <= self.seeds.reissues_of(&state.pair) {
            return;
        }
        let pair = state.pair;
        self.seeds.set_state(state);
        self.push_pair_seeds(&pair.lo(), &pair.hi(), now);
    }

    /// Pushes both ends of `{a, b}` the pair's seeds (and compromised generations), if policy
    /// lets them be a pair.
    pub(super) fn push_pair_seeds(&mut self, a: &NodeId, b: &NodeId, now: UnixTime) {
        for (me, peer) in [(a, b), (b, a)] {
            if let Some(pair) = self.tables.allowed_pair(me, peer) {
                let msgs = self.seeds.pair_pushes(&pair, now);
                self.push(me, &msgs);
            }
        }
    }
}
