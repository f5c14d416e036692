//! Operator and node-report operations: join tokens, revoke, ban, reissue, reports, policy
//! reload.

use hopmesh_protocol::audit_aggregate::bounded_text;
use hopmesh_protocol::enrollment::{Refusal, Report, ReportKind};
use hopmesh_protocol::hop_token::PairIds;
use hopmesh_protocol::ids::{NodeId, NodeName};
use hopmesh_protocol::policy::Policy;
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::fields;

use super::Authority;
use super::admission::sha256;
use super::refusals::{AdminError, ReportRefusal};
use super::settings::CompromiseMode;
use super::views::{NodeRef, ReissueOutcome, RevokeOutcome};
use crate::store::{BanSubject, JoinTokenRecord, StoreError, lock};

/// How many times a revoke is decided when other replicas keep taking the next list version
/// first (`Authority::revoke`).
pub const REVOKE_ATTEMPTS: u32 = 3;

impl Authority {
    /// Creates a one-time join secret for `name`.
    pub fn create_join_token(
        &mut self,
        name: &NodeName,
        segments: Option<Vec<String>>,
        ttl: u64,
        now: UnixTime,
    ) -> Result<(JoinSecret, UnixTime), AdminError> {
        self.registry.check_join_token_request(
            self.tables.policy(),
            name,
            segments.as_deref(),
            ttl,
        )?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| AdminError::Internal("rng".into()))?;
        let secret = JoinSecret::from_bytes(secret);
        let expires_at = now.plus(ttl);
        lock(&self.store).put_join_token(&JoinTokenRecord {
            secret_hash: sha256(secret.expose()),
            name: name.clone(),
            segments,
            created_at: now,
            expires_at,
        })?;
        self.audit(
            now,
            "join_token_created",
            fields! {"name" => name.as_str(), "expires_at" => expires_at.as_secs()},
        );
        Ok((secret, expires_at))
    }

    /// Revokes a node: its audit record is fsynced and anchored, then the revocation is
    /// committed, and only then applied and pushed to every connected node (`journal.rs`: a
    /// failing audit log or store refuses the revoke and changes nothing).
    ///
    /// On a shared store another replica may have taken the next list version first
    /// ([`StoreError::StaleVersion`]): the feed is then followed (which may show the node is
    /// revoked already) and the revoke is decided again, up to [`REVOKE_ATTEMPTS`] times.
    pub fn revoke(&mut self, target: &NodeRef, now: UnixTime) -> Result<RevokeOutcome, AdminError> {
        let mut attempt = 1;
        loop {
            match self.revoke_once(target, now) {
                Err(AdminError::Store(StoreError::StaleVersion { stored, offered }))
                    if attempt < REVOKE_ATTEMPTS =>
                {
                    tracing::info!(
                        stored,
                        offered,
                        "another replica revoked first; following the feed"
                    );
                    attempt += 1;
                    self.follow(now)?;
                    // A list this verifier committed but never heard back about is not in the
                    // feed as someone else's: read it directly.
                    self.sync_revocations()?;
                }
                other => return other,
            }
        }
    }

    fn revoke_once(
        &mut self,
        target: &NodeRef,
        now: UnixTime,
    ) -> Result<RevokeOutcome, AdminError> {
        let rec = self.registry.resolve(target)?;
        if rec.revoked_at.is_some() {
            return Err(AdminError::AlreadyRevoked(rec.name.to_string()));
        }
        let list = self.revocations.with_revoked(
            rec.node_id,
            self.settings.attestation_ttl,
            self.issuer.key(),
            now,
        )?;
        let bans = [BanSubject::Node(rec.node_id)];
        let version = list.0.version;
        self.audit_durable(now, "revoke", fields! {"node" => rec.node_id.to_string(), "name" => rec.name.as_str(), "revocation_version" => version})?;
        let committed = lock(&self.store).commit_revocation(&rec.node_id, now, &bans, &list.0);
        if let Err(e) = committed {
            self.audit_aborted(now, "revoke", &e);
            return Err(e.into());
        }
        // Committed: from here on nothing may fail the revoke.
        self.revocations.install(list);
        self.revocation_version_changed();
        self.registry.add_bans(bans);
        self.metrics.revocations.inc();
        let notified = self.revocation_applied(&rec.node_id, now, now, true);
        Ok(RevokeOutcome {
            node_id: rec.node_id.to_string(),
            revocation_version: version,
            notified,
        })
    }

    /// Bans a node's key and name: it can never attest or enroll again. Revokes it too if live.
    pub fn ban(&mut self, target: &NodeRef, now: UnixTime) -> Result<(), AdminError> {
        let rec = self.registry.resolve(target)?;
        if rec.revoked_at.is_none() {
            self.revoke(target, now)?;
        }
        let bans = [
            BanSubject::Node(rec.node_id),
            BanSubject::Name(rec.name.clone()),
        ];
        self.audit_durable(
            now,
            "ban",
            fields! {"node" => rec.node_id.to_string(), "name" => rec.name.as_str()},
        )?;
        let committed = lock(&self.store).put_bans(&bans, "operator ban", now);
        if let Err(e) = committed {
            self.audit_aborted(now, "ban", &e);
            return Err(e.into());
        }
        self.registry.add_bans(bans);
        Ok(())
    }

    /// Reissues the pair `{a, b}`: its recent generations become compromised and both ends get
    /// fresh ones. No other pair changes.
    pub fn reissue(
        &mut self,
        a: &NodeRef,
        b: &NodeRef,
        now: UnixTime,
    ) -> Result<ReissueOutcome, AdminError> {
        let a = self.registry.resolve(a)?;
        let b = self.registry.resolve(b)?;
        if a.node_id == b.node_id {
            return Err(AdminError::BadRequest(
                "a pair needs two different nodes".into(),
            ));
        }
        if self.tables.allowed_pair(&a.node_id, &b.node_id).is_none() {
            self.metrics.refused("reissue_not_a_pair");
            return Err(AdminError::BadRequest(format!(
                "`{}` and `{}` are not a pair under the current policy: they hold no seeds",
                a.name, b.name
            )));
        }
        self.reissue_pair(&a.node_id, &b.node_id, now, "operator")
    }

    fn reissue_pair(
        &mut self,
        a: &NodeId,
        b: &NodeId,
        now: UnixTime,
        why: &str,
    ) -> Result<ReissueOutcome, AdminError> {
        let plan = self.seeds.plan_reissue(PairIds::new(*a, *b), now)?;
        let compromised: Vec<u64> = plan.compromised.iter().map(|g| g.0).collect();
        self.audit_durable(
            now,
            "reissue",
            fields! {"a" => a.to_string(), "b" => b.to_string(), "reissues" => plan.next, "why" => why,
            "compromised" => compromised.clone()},
        )?;
        let committed =
            lock(&self.store).commit_reissue(&plan.pair, plan.next, &plan.compromised, now);
        if let Err(e) = committed {
            self.audit_aborted(now, "reissue", &e);
            return Err(e.into());
        }
        self.seeds.apply_reissue(&plan);
        self.metrics.reissues.inc();
        // Checked by the callers; a pair policy forbids never gets seeds.
        self.push_pair_seeds(a, b, now);
        Ok(ReissueOutcome {
            reissues: plan.next,
            compromised,
        })
    }

    /// Decides a node's security report: the reporter is enrolled and unrevoked, within its
    /// report limit ([`Limits::reports_per_window`](super::Limits)), and names a peer in its
    /// current routing table (not itself).
    fn check_report(
        &mut self,
        reporter: &NodeId,
        report: &Report,
        now: UnixTime,
    ) -> Result<(), ReportRefusal> {
        if !self.registry.is_unrevoked(reporter) {
            return Err(ReportRefusal::NotLive);
        }
        let limits = &self.settings.limits;
        let (max, window) = (limits.reports_per_window, limits.report_window_secs);
        if !self.registry.take_report(reporter, now, max, window) {
            return Err(ReportRefusal::RateLimited);
        }
        if reporter == &report.peer {
            return Err(ReportRefusal::AboutSelf);
        }
        if self.tables.allowed_pair(reporter, &report.peer).is_none() {
            return Err(ReportRefusal::PeerNotInTable);
        }
        Ok(())
    }

    /// Records a node's security report (refused, counted and audited aggregated unless
    /// `check_report` permits it); reissues the pair on
    /// `compromised_key_use` when so configured, unless the pair was reissued since the
    /// reported generation.
    pub fn report(
        &mut self,
        reporter: &NodeId,
        report: &Report,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        if let Err(r) = self.check_report(reporter, report, now) {
            self.refuse(
                now,
                "report_refused",
                reporter,
                r.reason(),
                fields! {"kind" => report.kind.as_str(), "peer" => report.peer.to_string(),
                "detail" => bounded_text(report.detail.as_str())},
            );
            return Err(r.to_wire());
        }
        self.metrics
            .reports
            .get_or_create(&[("kind", report.kind.as_str())])
            .inc();
        if self
            .audit_durable(
                now,
                report.kind.as_str(),
                fields! {"reporter" => reporter.to_string(), "peer" => report.peer.to_string(),
                "generation" => report.generation.map(|g| g.0), "detail" => bounded_text(report.detail.as_str())},
            )
            .is_err()
        {
            // Not recorded: not accepted (the node keeps it in its own log and may resend).
            self.metrics.refused("report_not_recorded");
            return Err(Refusal::Internal);
        }
        if report.kind == ReportKind::CompromisedKeyUse
            && self.settings.on_compromise == CompromiseMode::AutoReissue
        {
            let pair = PairIds::new(*reporter, report.peer);
            let current = self.seeds.reissues_of(&pair);
            if report.generation.is_some_and(|g| g.reissues() < current) {
                // Use of a generation an earlier reissue already replaced: the pair's current
                // seeds are not implicated, and reissuing again would let whoever replays old
                // tokens churn the pair.
                self.audit(
                    now,
                    "reissue_skipped",
                    fields! {"a" => reporter.to_string(), "b" => report.peer.to_string(),
                    "reason" => "generation_already_reissued", "reissues" => current},
                );
                return Ok(());
            }
            if let Err(e) = self.reissue_pair(reporter, &report.peer, now, "compromised_key_use") {
                tracing::error!(error = %e, "automatic reissue failed");
            }
        }
        Ok(())
    }

    /// Parses `text` and applies it ([`Self::apply_policy`]): recompiles only the nodes the
    /// change can touch, pushes only the tables that changed (as deltas,
    /// seeds only for the pairs added), and reports the diff: the nodes changed and the pairs
    /// added and removed (counts, and the first [`RELOAD_REPORTED`] of each by name).
    pub fn reload_policy(&mut self, text: &str, now: UnixTime) -> Result<PolicyReload, AdminError> {
        Ok(self.apply_policy(Policy::parse(text)?, now))
    }

    /// Replaces the policy with one already parsed (outside the lock), pushes each changed
    /// node its delta and seeds for its new pairs, and audits the reload.
    pub fn apply_policy(&mut self, policy: Policy, now: UnixTime) -> PolicyReload {
        let reloaded = self.tables.reload(policy);
        let name = |id: &NodeId| {
            self.registry
                .get(id)
                .map_or_else(|| id.to_string(), |n| n.name.to_string())
        };
        let pairs = |set: &std::collections::BTreeSet<(NodeId, NodeId)>| -> Vec<[String; 2]> {
            set.iter()
                .take(RELOAD_REPORTED)
                .map(|(a, b)| {
                    let mut pair = [name(a), name(b)];
                    pair.sort();
                    pair
                })
                .collect()
        };
        let outcome = PolicyReload {
            nodes_changed: reloaded.changed.len(),
            changed: reloaded
                .changed
                .iter()
                .take(RELOAD_REPORTED)
                .map(|c| name(&c.node))
                .collect(),
            pairs_added: reloaded.diff.pairs_added.len(),
            pairs_removed: reloaded.diff.pairs_removed.len(),
            added: pairs(&reloaded.diff.pairs_added),
            removed: pairs(&reloaded.diff.pairs_removed),
        };
        self.push_changed(reloaded.changed, now);
        self.audit(
            now,
            "policy_reload",
            fields! {"nodes_changed" => outcome.nodes_changed, "changed" => outcome.changed.clone(),
            "pairs_added" => outcome.pairs_added, "pairs_removed" => outcome.pairs_removed,
            "added" => serde_json::json!(outcome.added), "removed" => serde_json::json!(outcome.removed)},
        );
        outcome
    }
}

/// How many changed nodes, added pairs and removed pairs a [`PolicyReload`] (the admin
/// response, the CLI output and the `policy_reload` audit record) lists by name: 100 of
/// each; the counts are always whole.
pub const RELOAD_REPORTED: usize = 100;

/// What a policy reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyReload {
    /// Nodes whose table changed (and were pushed a delta).
    pub nodes_changed: usize,
    /// The first [`RELOAD_REPORTED`] of them, by name.
    pub changed: Vec<String>,
    /// Pairs that now exist and did not before.
    pub pairs_added: usize,
    /// Pairs that no longer exist.
    pub pairs_removed: usize,
    /// The first [`RELOAD_REPORTED`] pairs added, by name (each pair sorted).
    pub added: Vec<[String; 2]>,
    /// The first [`RELOAD_REPORTED`] pairs removed.
    pub removed: Vec<[String; 2]>,
}
