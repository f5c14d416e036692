//! The verifier's state and every decision it makes: enrollment, refresh, revocation, bans,
//! selective reissue, policy compilation and what to push to whom.
//!
//! IO-free apart from the [`Store`] (committed before anything is acknowledged) and the
//! audit log; the QUIC service and the admin API call in here under one lock. Time is passed
//! in. Each admission decision is a function returning a permit or a refusal with a precise
//! reason; the reason is audited and counted, and the node only sees a coarse
//! [`Refusal`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use hopmesh_protocol::attestation::{
    ATTESTATION_VERSION, Attestation, KeySet, MAX_REVOKED, RevocationList, RevocationUpdate,
    RevokedNode, SigningKey, verify_revocation_list,
};
use hopmesh_protocol::enrollment::{
    Address, MeshConfig, PeerInfo, Push, Refusal, Report, ReportKind,
};
use hopmesh_protocol::hop_token::{EpochLength, Generation, GenerationGrant, PairIds};
use hopmesh_protocol::ids::{Measurement, NodeId, NodeName, SegmentName};
use hopmesh_protocol::policy::{NodeDirectory, Policy, PolicyError, parse_backend};
use hopmesh_protocol::routing::RoutingTable;
use hopmesh_protocol::secret::{JoinSecret, MasterSecret, PairSeed};
use hopmesh_protocol::time::UnixTime;
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::audit::{AuditError, AuditLog};
use hopmesh_transport::fields;
use ring::digest::{SHA256, digest};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::store::{
    BanSubject, JoinTokenRecord, JoinTokenUse, NodeRecord, PairState, Store, StoreError, StoredList,
};

/// Push messages queued per subscriber before it is considered stuck and dropped (it
/// reconnects and resynchronises).
pub const PUSH_QUEUE: usize = 1024;
/// Attestation serials reserved per store commit.
pub const SERIAL_BLOCK: u64 = 1024;

/// What to do when a node reports `compromised_key_use`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompromiseMode {
    /// Mark the generation compromised and reissue the affected pair (default).
    AutoReissue,
    /// Only record and alert.
    AlertOnly,
}

/// Verifier settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Attestation lifetime in seconds (default 300).
    pub attestation_ttl: u64,
    /// Mesh epoch length.
    pub epoch: EpochLength,
    /// Pair-seed generation lifetime in seconds (default 300).
    pub generation_secs: u64,
    /// Reaction to compromised key use.
    pub on_compromise: CompromiseMode,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            attestation_ttl: 300,
            epoch: EpochLength::DEFAULT,
            generation_secs: 300,
            on_compromise: CompromiseMode::AutoReissue,
        }
    }
}

/// A node named by an operator: a 64-hex node id or a node name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRef {
    /// By id.
    Id(NodeId),
    /// By name.
    Name(NodeName),
}

impl std::str::FromStr for NodeRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() == 64
            && let Ok(id) = s.parse()
        {
            return Ok(Self::Id(id));
        }
        NodeName::new(s)
            .map(Self::Name)
            .map_err(|e| format!("`{s}` is neither a node id nor a node name: {e}"))
    }
}

/// Errors of admin operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such node.
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    /// The node is already revoked.
    #[error("node `{0}` is already revoked")]
    AlreadyRevoked(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The new policy does not parse or check.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The store failed: nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pair has been reissued 65535 times.
    #[error("pair reissue limit reached; revoke and re-enroll one of the nodes")]
    ReissueLimit,
    /// Signing or encoding failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Why an enrollment was refused: precise, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No such join secret.
    JoinSecretUnknown,
    /// Used before.
    JoinSecretUsed,
    /// Expired.
    JoinSecretExpired,
    /// The key is banned.
    KeyBanned,
    /// The name is banned.
    NameBanned,
    /// The name is not a node in policy.
    NameNotInPolicy,
    /// The join secret's segments differ from policy.
    SegmentsMismatch,
    /// The measurement is not allowed.
    Measurement,
    /// Another live key holds the name.
    NameTaken,
    /// An advertised address is not host:port.
    BadAddress,
    /// The store failed.
    Internal,
}

impl EnrollRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::JoinSecretUnknown => "join_secret_unknown",
            Self::JoinSecretUsed => "join_secret_used",
            Self::JoinSecretExpired => "join_secret_expired",
            Self::KeyBanned => "key_banned",
            Self::NameBanned => "name_banned",
            Self::NameNotInPolicy => "name_not_in_policy",
            Self::SegmentsMismatch => "segments_mismatch",
            Self::Measurement => "measurement_not_allowed",
            Self::NameTaken => "name_taken",
            Self::BadAddress => "bad_address",
            Self::Internal => "internal",
        }
    }

    /// What the node is told.
    pub fn to_wire(self) -> Refusal {
        match self {
            Self::JoinSecretUnknown | Self::JoinSecretUsed | Self::JoinSecretExpired => {
                Refusal::JoinSecret
            }
            Self::KeyBanned | Self::NameBanned => Refusal::Revoked,
            Self::NameNotInPolicy | Self::SegmentsMismatch => Refusal::NotInPolicy,
            Self::Measurement => Refusal::Measurement,
            Self::NameTaken => Refusal::NameTaken,
            Self::BadAddress => Refusal::BadRequest,
            Self::Internal => Refusal::Internal,
        }
    }
}

/// Why a refresh (or another request by an enrolled key) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshRefusal {
    /// The key never enrolled.
    NotEnrolled,
    /// The node is revoked.
    Revoked,
    /// The key or name is banned.
    Banned,
    /// The measurement is not allowed.
    Measurement,
    /// Policy no longer names the node.
    NotInPolicy,
    /// An advertised address is not host:port.
    BadAddress,
    /// Signing or the store failed.
    Internal,
}

impl RefreshRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotEnrolled => "not_enrolled",
            Self::Revoked => "revoked",
            Self::Banned => "banned",
            Self::Measurement => "measurement_not_allowed",
            Self::NotInPolicy => "name_not_in_policy",
            Self::BadAddress => "bad_address",
            Self::Internal => "internal",
        }
    }

    /// What the node is told.
    pub fn to_wire(self) -> Refusal {
        match self {
            Self::NotEnrolled => Refusal::NotEnrolled,
            Self::Revoked | Self::Banned => Refusal::Revoked,
            Self::Measurement => Refusal::Measurement,
            Self::NotInPolicy => Refusal::NotInPolicy,
            Self::BadAddress => Refusal::BadRequest,
            Self::Internal => Refusal::Internal,
        }
    }
}

/// An enrollment request as the service hands it over.
#[derive(Debug)]
pub struct Enrollment<'a> {
    /// The TLS-proven key.
    pub spki: &'a [u8],
    /// The join secret.
    pub join_secret: &'a JoinSecret,
    /// Measurement.
    pub measurement: Measurement,
    /// Advertised addresses.
    pub addresses: &'a [Address],
    /// Host facts, for the audit log.
    pub hostname: &'a str,
}

/// A node as shown to operators.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// Id (hex).
    pub node_id: String,
    /// Name.
    pub name: String,
    /// Segments in policy.
    pub segments: Vec<String>,
    /// Advertised addresses.
    pub addresses: Vec<String>,
    /// Measurement (hex).
    pub measurement: String,
    /// Enrollment time.
    pub enrolled_at: u64,
    /// Revocation time.
    pub revoked_at: Option<u64>,
    /// Push stream open.
    pub connected: bool,
}

/// Result of a revoke.
#[derive(Clone, Debug, Serialize)]
pub struct RevokeOutcome {
    /// The node.
    pub node_id: String,
    /// New revocation-list version.
    pub revocation_version: u64,
    /// Nodes notified.
    pub notified: usize,
}

/// Result of a reissue.
#[derive(Clone, Debug, Serialize)]
pub struct ReissueOutcome {
    /// The pair's reissue count now.
    pub reissues: u16,
    /// Generations now compromised.
    pub compromised: Vec<u64>,
}

/// What [`Authority::new`] is built from.
#[derive(Debug)]
pub struct Parts {
    /// Settings.
    pub settings: Settings,
    /// Attestation and revocation-list signing key.
    pub signing: SigningKey,
    /// Pair-seed master secret.
    pub master: MasterSecret,
    /// The durable store.
    pub store: Box<dyn Store>,
    /// The audit log.
    pub audit: AuditLog,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The policy.
    pub policy: Policy,
}

/// The verifier.
pub struct Authority {
    settings: Settings,
    signing: SigningKey,
    master: MasterSecret,
    store: Box<dyn Store>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    policy: Policy,
    nodes: BTreeMap<NodeId, NodeRecord>,
    bans: BTreeSet<BanSubject>,
    pairs: BTreeMap<PairIds, PairState>,
    revocations: Option<(StoredList, RevocationList)>,
    serials: (u64, u64),
    tables: BTreeMap<NodeId, (RoutingTable, Vec<PeerInfo>)>,
    subscribers: HashMap<NodeId, Vec<mpsc::Sender<Push>>>,
    last_slot: u64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

fn audit_err(e: AuditError) {
    tracing::error!(error = %e, "audit log write failed");
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

impl Authority {
    /// Loads state from the store and compiles the policy.
    pub fn new(parts: Parts, now: UnixTime) -> Result<Self, AdminError> {
        let Parts {
            settings,
            signing,
            master,
            store,
            audit,
            metrics,
            policy,
        } = parts;
        let nodes = store.nodes()?.into_iter().map(|n| (n.node_id, n)).collect();
        let bans = store.bans()?.into_iter().collect();
        let pairs = store
            .pair_states()?
            .into_iter()
            .map(|p| (p.pair, p))
            .collect();
        let revocations = match store.revocation_list()? {
            None => None,
            Some(stored) => {
                // Our own list must verify under our own key: anything else means the store was
                // swapped or tampered with.
                let keys = KeySet::new(vec![signing.verifying_key()])
                    .map_err(|e| AdminError::Internal(e.to_string()))?;
                match verify_revocation_list(&stored.bytes, &keys, None) {
                    Ok(RevocationUpdate::Newer(list)) if list.version == stored.version => {
                        Some((stored, list))
                    }
                    other => {
                        return Err(AdminError::Store(StoreError::BadValue(format!(
                            "stored revocation list does not verify under this verifier's key: {other:?}"
                        ))));
                    }
                }
            }
        };
        let mut me = Self {
            last_slot: now.as_secs() / settings.generation_secs.max(1),
            settings,
            signing,
            master,
            store,
            audit,
            metrics,
            policy,
            nodes,
            bans,
            pairs,
            revocations,
            serials: (0, 0),
            tables: BTreeMap::new(),
            subscribers: HashMap::new(),
        };
        me.recompile();
        Ok(me)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn audit(
        &mut self,
        now: UnixTime,
        event: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) {
        if let Err(e) = self.audit.record(now.as_secs(), event, fields) {
            audit_err(e);
        }
    }

    fn audit_durable(
        &mut self,
        now: UnixTime,
        event: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) {
        if let Err(e) = self.audit.record_durable(now.as_secs(), event, fields) {
            audit_err(e);
        }
    }

    fn is_banned(&self, id: &NodeId, name: &NodeName) -> bool {
        self.bans.contains(&BanSubject::Node(*id))
            || self.bans.contains(&BanSubject::Name(name.clone()))
    }

    fn measurement_allowed(&self, m: &Measurement) -> bool {
        self.policy.allow_any_measurement || self.policy.measurements.contains(m)
    }

    fn segments_of(&self, name: &NodeName) -> Option<&BTreeSet<SegmentName>> {
        self.policy.nodes.get(name)
    }

    fn live_node_named(&self, name: &NodeName) -> Option<&NodeRecord> {
        self.nodes
            .values()
            .find(|n| n.name == *name && n.revoked_at.is_none())
    }

    fn next_serial(&mut self) -> Result<u64, StoreError> {
        if self.serials.0 >= self.serials.1 {
            let first = self.store.reserve_serials(SERIAL_BLOCK)?;
            self.serials = (first, first + SERIAL_BLOCK);
        }
        let s = self.serials.0;
        self.serials.0 += 1;
        Ok(s)
    }

    fn issue(&mut self, rec: &NodeRecord, now: UnixTime) -> Result<Vec<u8>, AdminError> {
        let segments: Vec<SegmentName> = self
            .segments_of(&rec.name)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let attestation = Attestation {
            version: ATTESTATION_VERSION,
            node_id: rec.node_id,
            spki: BoundedVec::new(rec.spki.clone())
                .map_err(|e| AdminError::Internal(e.to_string()))?,
            name: rec.name.clone(),
            segments: BoundedVec::new(segments).map_err(|e| AdminError::Internal(e.to_string()))?,
            measurement: rec.measurement,
            serial: self.next_serial()?,
            not_before: now,
            not_after: now.plus(self.settings.attestation_ttl),
            verifier_key_id: self.signing.key_id(),
        };
        attestation
            .sign(&self.signing)
            .map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn check_addresses(addresses: &[Address]) -> bool {
        addresses.iter().all(|a| parse_backend(a.as_str()).is_ok())
    }

    /// Decides an enrollment. Consumes the join secret first (so a refused attempt burns it,
    /// and a secret can never be tried twice), then checks bans, policy and measurement.
    pub fn check_enrollment(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixTime,
    ) -> Result<NodeRecord, EnrollRefusal> {
        let node_id = NodeId::from_spki(e.spki);
        let token = match self
            .store
            .take_join_token(&sha256(e.join_secret.expose()), now)
        {
            Ok(JoinTokenUse::Valid(t)) => t,
            Ok(JoinTokenUse::Unknown) => return Err(EnrollRefusal::JoinSecretUnknown),
            Ok(JoinTokenUse::Used) => return Err(EnrollRefusal::JoinSecretUsed),
            Ok(JoinTokenUse::Expired) => return Err(EnrollRefusal::JoinSecretExpired),
            Err(err) => {
                tracing::error!(error = %err, "join secret lookup failed");
                return Err(EnrollRefusal::Internal);
            }
        };
        if self.bans.contains(&BanSubject::Node(node_id)) {
            return Err(EnrollRefusal::KeyBanned);
        }
        if self.bans.contains(&BanSubject::Name(token.name.clone())) {
            return Err(EnrollRefusal::NameBanned);
        }
        let Some(policy_segments) = self.segments_of(&token.name) else {
            return Err(EnrollRefusal::NameNotInPolicy);
        };
        if let Some(bound) = &token.segments {
            let bound: BTreeSet<&str> = bound.iter().map(String::as_str).collect();
            let policy: BTreeSet<&str> = policy_segments.iter().map(SegmentName::as_str).collect();
            if bound != policy {
                return Err(EnrollRefusal::SegmentsMismatch);
            }
        }
        if !self.measurement_allowed(&e.measurement) {
            return Err(EnrollRefusal::Measurement);
        }
        if self
            .live_node_named(&token.name)
            .is_some_and(|n| n.node_id != node_id)
        {
            return Err(EnrollRefusal::NameTaken);
        }
        if !Self::check_addresses(e.addresses) {
            return Err(EnrollRefusal::BadAddress);
        }
        Ok(NodeRecord {
            node_id,
            name: token.name,
            spki: e.spki.to_vec(),
            measurement: e.measurement,
            addresses: e.addresses.iter().map(|a| a.as_str().to_owned()).collect(),
            enrolled_at: now,
            revoked_at: None,
        })
    }

    /// Enrolls the TLS-proven key and returns its first attestation.
    pub fn enroll(&mut self, e: &Enrollment<'_>, now: UnixTime) -> Result<Vec<u8>, Refusal> {
        let started = Instant::now();
        let node_id = NodeId::from_spki(e.spki);
        let rec = match self.check_enrollment(e, now) {
            Ok(rec) => rec,
            Err(r) => {
                self.metrics.refused(r.reason());
                self.audit(now, "enroll_refused", fields! {"node" => node_id.to_string(), "reason" => r.reason(), "hostname" => e.hostname});
                return Err(r.to_wire());
            }
        };
        let envelope = self
            .store
            .put_node(&rec)
            .map_err(AdminError::from)
            .and_then(|()| self.issue(&rec, now));
        let envelope = match envelope {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "enrollment failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        self.audit(
            now,
            "enroll",
            fields! {"node" => node_id.to_string(), "name" => rec.name.as_str(), "measurement" => rec.measurement.to_string(), "hostname" => e.hostname},
        );
        self.nodes.insert(node_id, rec);
        self.metrics
            .attested
            .get_or_create(&[("kind", "enroll")])
            .inc();
        self.metrics
            .issuance_seconds
            .observe(started.elapsed().as_secs_f64());
        let changed = self.recompile();
        self.push_changed(&changed, now);
        Ok(envelope)
    }

    /// Decides a refresh for the TLS-proven key.
    pub fn check_refresh(
        &self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
    ) -> Result<NodeRecord, RefreshRefusal> {
        let rec = self.nodes.get(node_id).ok_or(RefreshRefusal::NotEnrolled)?;
        if rec.revoked_at.is_some() {
            return Err(RefreshRefusal::Revoked);
        }
        if self.is_banned(node_id, &rec.name) {
            return Err(RefreshRefusal::Banned);
        }
        if self.segments_of(&rec.name).is_none() {
            return Err(RefreshRefusal::NotInPolicy);
        }
        if !self.measurement_allowed(measurement) {
            return Err(RefreshRefusal::Measurement);
        }
        if !Self::check_addresses(addresses) {
            return Err(RefreshRefusal::BadAddress);
        }
        let mut rec = rec.clone();
        rec.measurement = *measurement;
        rec.addresses = addresses.iter().map(|a| a.as_str().to_owned()).collect();
        Ok(rec)
    }

    /// Re-attests an enrolled key (possession proven by the TLS handshake); re-measures.
    pub fn refresh(
        &mut self,
        node_id: &NodeId,
        measurement: &Measurement,
        addresses: &[Address],
        now: UnixTime,
    ) -> Result<Vec<u8>, Refusal> {
        let started = Instant::now();
        let rec = match self.check_refresh(node_id, measurement, addresses) {
            Ok(rec) => rec,
            Err(r) => {
                self.metrics.refused(r.reason());
                self.audit(
                    now,
                    "refresh_refused",
                    fields! {"node" => node_id.to_string(), "reason" => r.reason()},
                );
                return Err(r.to_wire());
            }
        };
        let changed = self.nodes.get(node_id) != Some(&rec);
        if changed && let Err(err) = self.store.put_node(&rec) {
            tracing::error!(error = %err, "refresh failed to store");
            self.metrics.refused("internal");
            return Err(Refusal::Internal);
        }
        let envelope = match self.issue(&rec, now) {
            Ok(env) => env,
            Err(err) => {
                tracing::error!(error = %err, "refresh failed internally");
                self.metrics.refused("internal");
                return Err(Refusal::Internal);
            }
        };
        self.audit(
            now,
            "attest",
            fields! {"node" => node_id.to_string(), "name" => rec.name.as_str()},
        );
        self.nodes.insert(*node_id, rec);
        self.metrics
            .attested
            .get_or_create(&[("kind", "refresh")])
            .inc();
        self.metrics
            .issuance_seconds
            .observe(started.elapsed().as_secs_f64());
        if changed {
            let changed = self.recompile();
            self.push_changed(&changed, now);
        }
        Ok(envelope)
    }

    fn slot(&self, now: UnixTime) -> u64 {
        now.as_secs() / self.settings.generation_secs.max(1)
    }

    fn reissues_of(&self, pair: &PairIds) -> u16 {
        self.pairs.get(pair).map_or(0, |p| p.reissues)
    }

    /// The grants (current and next generation) for a pair at `now`.
    pub fn grants(&self, pair: &PairIds, now: UnixTime) -> Vec<GenerationGrant> {
        let g = self.settings.generation_secs.max(1);
        let slot = self.slot(now);
        let r = self.reissues_of(pair);
        (slot..=slot + 1)
            .map(|s| {
                let generation = Generation::compose(s, r);
                GenerationGrant {
                    generation,
                    seed: PairSeed::derive(&self.master, pair, generation),
                    valid_from: UnixTime::from_secs(s * g),
                    valid_until: UnixTime::from_secs((s + 1) * g),
                }
            })
            .collect()
    }

    fn seeds_push(&self, node: &NodeId, peer: &NodeId, now: UnixTime) -> Push {
        let grants = self.grants(&PairIds::new(*node, *peer), now);
        Push::Seeds {
            peer: *peer,
            // Invariant: grants() returns exactly two.
            grants: BoundedVec::new(grants).unwrap_or_default(),
        }
    }

    fn compromised_push(&self, node: &NodeId, peer: &NodeId) -> Option<Push> {
        let state = self.pairs.get(&PairIds::new(*node, *peer))?;
        let recent: Vec<Generation> = state
            .compromised
            .iter()
            .rev()
            .take(16)
            .rev()
            .copied()
            .collect();
        (!recent.is_empty()).then(|| Push::Compromised {
            peer: *peer,
            generations: BoundedVec::new(recent).unwrap_or_default(),
        })
    }

    fn revocations_push(&self) -> Option<Push> {
        let (stored, _) = self.revocations.as_ref()?;
        BoundedVec::new(stored.bytes.clone())
            .ok()
            .map(|list| Push::Revocations { list })
    }

    fn push_kind(p: &Push) -> &'static str {
        match p {
            Push::Config(_) => "config",
            Push::Routes { .. } => "routes",
            Push::Seeds { .. } => "seeds",
            Push::Compromised { .. } => "compromised",
            Push::Revocations { .. } => "revocations",
        }
    }

    fn push(&mut self, node: &NodeId, msgs: &[Push]) {
        let Some(senders) = self.subscribers.get_mut(node) else {
            return;
        };
        senders.retain(|tx| msgs.iter().all(|m| tx.try_send(m.clone()).is_ok()));
        if senders.is_empty() {
            self.subscribers.remove(node);
        }
        for m in msgs {
            self.metrics
                .pushes
                .get_or_create(&[("kind", Self::push_kind(m))])
                .inc();
        }
        self.metrics.subscribed.set(self.subscribers.len() as i64);
    }

    fn directory(&self) -> NodeDirectory {
        self.nodes
            .values()
            .filter(|n| n.revoked_at.is_none() && !self.is_banned(&n.node_id, &n.name))
            .map(|n| (n.name.clone(), n.node_id))
            .collect()
    }

    fn peer_infos(&self, table: &RoutingTable) -> Vec<PeerInfo> {
        table
            .peers
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| PeerInfo {
                node_id: n.node_id,
                name: n.name.clone(),
                addresses: BoundedVec::new(
                    n.addresses
                        .iter()
                        .take(4)
                        .map(|a| BoundedString::truncated(a))
                        .collect(),
                )
                .unwrap_or_default(),
            })
            .collect()
    }

    /// Recompiles every table and pushes the ones that changed. Returns the changed nodes.
    fn recompile(&mut self) -> Vec<NodeId> {
        let compiled = self.policy.compile(&self.directory());
        let mut changed = Vec::new();
        let mut next = BTreeMap::new();
        for (id, table) in compiled {
            let peers = self.peer_infos(&table);
            if self.tables.get(&id) != Some(&(table.clone(), peers.clone())) {
                changed.push(id);
            }
            next.insert(id, (table, peers));
        }
        changed.extend(
            self.tables
                .keys()
                .filter(|id| !next.contains_key(id))
                .copied(),
        );
        self.tables = next;
        changed
    }

    fn routes_push(&self, node: &NodeId) -> Push {
        let (table, peers) = self.tables.get(node).cloned().unwrap_or_default();
        Push::Routes {
            table,
            peers: BoundedVec::new(peers).unwrap_or_default(),
        }
    }

    fn push_changed(&mut self, changed: &[NodeId], now: UnixTime) {
        for id in changed {
            let mut msgs = vec![self.routes_push(id)];
            let peers: Vec<NodeId> = self
                .tables
                .get(id)
                .map(|(t, _)| t.peers.iter().copied().collect())
                .unwrap_or_default();
            msgs.extend(peers.iter().map(|p| self.seeds_push(id, p, now)));
            self.push(id, &msgs);
        }
    }

    /// Everything a freshly subscribed node needs, in order.
    pub fn snapshot(&self, node: &NodeId, now: UnixTime) -> Vec<Push> {
        let mut out = vec![Push::Config(MeshConfig {
            epoch_secs: self.settings.epoch.as_secs(),
            generation_secs: self.settings.generation_secs,
            suffix: BoundedString::truncated(&self.policy.suffix),
        })];
        out.extend(self.revocations_push());
        out.push(self.routes_push(node));
        let peers: Vec<NodeId> = self
            .tables
            .get(node)
            .map(|(t, _)| t.peers.iter().copied().collect())
            .unwrap_or_default();
        for p in &peers {
            out.extend(self.compromised_push(node, p));
            out.push(self.seeds_push(node, p, now));
        }
        out
    }

    /// Opens a push stream for an enrolled, live node: the receiver yields the snapshot, then
    /// every change. Dropping it unsubscribes.
    pub fn subscribe(
        &mut self,
        node: &NodeId,
        now: UnixTime,
    ) -> Result<mpsc::Receiver<Push>, Refusal> {
        let live = self
            .nodes
            .get(node)
            .is_some_and(|n| n.revoked_at.is_none() && !self.is_banned(node, &n.name));
        if !live {
            self.metrics.refused("subscribe_not_live");
            self.audit(
                now,
                "subscribe_refused",
                fields! {"node" => node.to_string()},
            );
            return Err(if self.nodes.contains_key(node) {
                Refusal::Revoked
            } else {
                Refusal::NotEnrolled
            });
        }
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        for m in self.snapshot(node, now) {
            // The queue is larger than any snapshot of a node with ≤ 1000 peers; a failure here
            // only means the subscriber already went away.
            let _ = tx.try_send(m);
        }
        self.subscribers.entry(*node).or_default().push(tx);
        self.metrics.subscribed.set(self.subscribers.len() as i64);
        Ok(rx)
    }

    /// Periodic work: push next-generation seeds at slot boundaries, prune expired
    /// revocations. Call about once a second.
    pub fn tick(&mut self, now: UnixTime) {
        let slot = self.slot(now);
        if slot != self.last_slot {
            self.last_slot = slot;
            let nodes: Vec<NodeId> = self.subscribers.keys().copied().collect();
            for id in nodes {
                let peers: Vec<NodeId> = self
                    .tables
                    .get(&id)
                    .map(|(t, _)| t.peers.iter().copied().collect())
                    .unwrap_or_default();
                let msgs: Vec<Push> = peers.iter().map(|p| self.seeds_push(&id, p, now)).collect();
                self.push(&id, &msgs);
            }
        }
        let expired = self
            .revocations
            .as_ref()
            .is_some_and(|(_, l)| l.revoked.iter().any(|r| r.until <= now));
        if expired && let Err(e) = self.prune_revocations(now) {
            tracing::error!(error = %e, "pruning the revocation list failed");
        }
    }

    fn signed_list(
        &self,
        entries: Vec<RevokedNode>,
        now: UnixTime,
    ) -> Result<(StoredList, RevocationList), AdminError> {
        let version = self.revocations.as_ref().map_or(0, |(s, _)| s.version) + 1;
        let list = RevocationList {
            version,
            issued_at: now,
            verifier_key_id: self.signing.key_id(),
            revoked: BoundedVec::new(entries).map_err(|_| {
                AdminError::Internal(format!("more than {MAX_REVOKED} live revocations"))
            })?,
        };
        let bytes = list
            .sign(&self.signing)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        Ok((StoredList { version, bytes }, list))
    }

    fn live_revocations(&self, now: UnixTime) -> Vec<RevokedNode> {
        self.revocations
            .as_ref()
            .map(|(_, l)| {
                l.revoked
                    .iter()
                    .filter(|r| r.until > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn prune_revocations(&mut self, now: UnixTime) -> Result<(), AdminError> {
        let (stored, list) = self.signed_list(self.live_revocations(now), now)?;
        self.store.put_revocation_list(&stored)?;
        self.revocations = Some((stored, list));
        self.broadcast_revocations();
        Ok(())
    }

    fn broadcast_revocations(&mut self) {
        if let Some(p) = self.revocations_push() {
            let all: Vec<NodeId> = self.subscribers.keys().copied().collect();
            for id in all {
                self.push(&id, std::slice::from_ref(&p));
            }
        }
    }

    fn resolve(&self, r: &NodeRef) -> Result<NodeRecord, AdminError> {
        let found = match r {
            NodeRef::Id(id) => self.nodes.get(id),
            NodeRef::Name(n) => self
                .nodes
                .values()
                .filter(|rec| rec.name == *n)
                .max_by_key(|rec| (rec.revoked_at.is_none(), rec.enrolled_at)),
        };
        found.cloned().ok_or_else(|| {
            AdminError::UnknownNode(match r {
                NodeRef::Id(id) => id.to_string(),
                NodeRef::Name(n) => n.to_string(),
            })
        })
    }

    /// Creates a one-time join secret for `name`.
    pub fn create_join_token(
        &mut self,
        name: &NodeName,
        segments: Option<Vec<String>>,
        ttl: u64,
        now: UnixTime,
    ) -> Result<(JoinSecret, UnixTime), AdminError> {
        if ttl == 0 || ttl > 7 * 24 * 3600 {
            return Err(AdminError::BadRequest("ttl must be 1 s to 7 days".into()));
        }
        if !self.policy.nodes.contains_key(name) {
            return Err(AdminError::BadRequest(format!(
                "node `{name}` is not in the policy"
            )));
        }
        if self.bans.contains(&BanSubject::Name(name.clone())) {
            return Err(AdminError::BadRequest(format!(
                "node name `{name}` is banned"
            )));
        }
        if let Some(segs) = &segments {
            for s in segs {
                SegmentName::new(s)
                    .map_err(|e| AdminError::BadRequest(format!("segment `{s}`: {e}")))?;
            }
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| AdminError::Internal("rng".into()))?;
        let secret = JoinSecret::from_bytes(secret);
        let expires_at = now.plus(ttl);
        self.store.put_join_token(&JoinTokenRecord {
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

    /// Revokes a node: committed durably first, then pushed to every connected node.
    pub fn revoke(&mut self, target: &NodeRef, now: UnixTime) -> Result<RevokeOutcome, AdminError> {
        let rec = self.resolve(target)?;
        if rec.revoked_at.is_some() {
            return Err(AdminError::AlreadyRevoked(rec.name.to_string()));
        }
        let mut entries = self.live_revocations(now);
        entries.push(RevokedNode {
            node_id: rec.node_id,
            revoked_at: now,
            until: now.plus(self.settings.attestation_ttl),
        });
        let (stored, list) = self.signed_list(entries, now)?;
        let bans = [BanSubject::Node(rec.node_id)];
        self.store
            .commit_revocation(&rec.node_id, now, &bans, &stored)?;
        // Committed: from here on nothing may fail the revoke.
        let version = stored.version;
        self.revocations = Some((stored, list));
        self.bans.extend(bans);
        if let Some(n) = self.nodes.get_mut(&rec.node_id) {
            n.revoked_at = Some(now);
        }
        self.metrics.revocations.inc();
        self.audit_durable(now, "revoke", fields! {"node" => rec.node_id.to_string(), "name" => rec.name.as_str(), "revocation_version" => version});

        // Its peers treat every generation they share with it as compromised.
        let peers: Vec<NodeId> = self
            .tables
            .get(&rec.node_id)
            .map(|(t, _)| t.peers.iter().copied().collect())
            .unwrap_or_default();
        let slot = self.slot(now);
        for p in &peers {
            let r = self.reissues_of(&PairIds::new(*p, rec.node_id));
            let gens: Vec<Generation> = (slot.saturating_sub(1)..=slot + 1)
                .map(|s| Generation::compose(s, r))
                .collect();
            let msg = Push::Compromised {
                peer: rec.node_id,
                generations: BoundedVec::new(gens).unwrap_or_default(),
            };
            self.push(p, &[msg]);
        }
        self.broadcast_revocations();
        self.subscribers.remove(&rec.node_id);
        let changed = self.recompile();
        self.push_changed(&changed, now);
        Ok(RevokeOutcome {
            node_id: rec.node_id.to_string(),
            revocation_version: version,
            notified: peers.len(),
        })
    }

    /// Bans a node's key and name: it can never attest or enroll again. Revokes it too if live.
    pub fn ban(&mut self, target: &NodeRef, now: UnixTime) -> Result<(), AdminError> {
        let rec = self.resolve(target)?;
        if rec.revoked_at.is_none() {
            self.revoke(target, now)?;
        }
        let bans = [
            BanSubject::Node(rec.node_id),
            BanSubject::Name(rec.name.clone()),
        ];
        self.store.put_bans(&bans, "operator ban", now)?;
        self.bans.extend(bans);
        self.audit_durable(
            now,
            "ban",
            fields! {"node" => rec.node_id.to_string(), "name" => rec.name.as_str()},
        );
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
        let a = self.resolve(a)?;
        let b = self.resolve(b)?;
        if a.node_id == b.node_id {
            return Err(AdminError::BadRequest(
                "a pair needs two different nodes".into(),
            ));
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
        let pair = PairIds::new(*a, *b);
        let r = self.reissues_of(&pair);
        let next = r.checked_add(1).ok_or(AdminError::ReissueLimit)?;
        let slot = self.slot(now);
        let gens: Vec<Generation> = (slot.saturating_sub(1)..=slot + 1)
            .map(|s| Generation::compose(s, r))
            .collect();
        self.store.commit_reissue(&pair, next, &gens, now)?;
        let state = self.pairs.entry(pair).or_insert(PairState {
            pair,
            reissues: 0,
            compromised: Vec::new(),
        });
        state.reissues = next;
        state.compromised.extend(gens.iter().copied());
        self.metrics.reissues.inc();
        self.audit_durable(
            now,
            "reissue",
            fields! {"a" => a.to_string(), "b" => b.to_string(), "reissues" => next, "why" => why,
            "compromised" => gens.iter().map(|g| g.0).collect::<Vec<u64>>()},
        );
        for (me, peer) in [(a, b), (b, a)] {
            let mut msgs = Vec::new();
            msgs.extend(self.compromised_push(me, peer));
            msgs.push(self.seeds_push(me, peer, now));
            self.push(me, &msgs);
        }
        Ok(ReissueOutcome {
            reissues: next,
            compromised: gens.iter().map(|g| g.0).collect(),
        })
    }

    /// Records a node's security report; reissues the pair on `compromised_key_use` when so
    /// configured.
    pub fn report(
        &mut self,
        reporter: &NodeId,
        report: &Report,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        if self
            .nodes
            .get(reporter)
            .is_none_or(|n| n.revoked_at.is_some())
        {
            self.metrics.refused("report_not_live");
            return Err(Refusal::NotEnrolled);
        }
        self.metrics
            .reports
            .get_or_create(&[("kind", report.kind.as_str())])
            .inc();
        self.audit_durable(
            now,
            report.kind.as_str(),
            fields! {"reporter" => reporter.to_string(), "peer" => report.peer.to_string(),
            "generation" => report.generation.map(|g| g.0), "detail" => report.detail.as_str()},
        );
        if report.kind == ReportKind::CompromisedKeyUse
            && self.settings.on_compromise == CompromiseMode::AutoReissue
        {
            if reporter == &report.peer || !self.nodes.contains_key(&report.peer) {
                return Ok(());
            }
            if let Err(e) =
                self.reissue_pair(reporter, &report.peer.clone(), now, "compromised_key_use")
            {
                tracing::error!(error = %e, "automatic reissue failed");
            }
        }
        Ok(())
    }

    /// Replaces the policy and pushes exactly the routing tables that changed.
    pub fn reload_policy(&mut self, text: &str, now: UnixTime) -> Result<Vec<String>, AdminError> {
        let policy = Policy::parse(text)?;
        self.policy = policy;
        let changed = self.recompile();
        self.push_changed(&changed, now);
        let names: Vec<String> = changed
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.name.to_string())
            .collect();
        self.audit(now, "policy_reload", fields! {"changed" => names.clone()});
        Ok(names)
    }

    /// Nodes for operators.
    pub fn nodes_view(&self) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| NodeView {
                node_id: n.node_id.to_string(),
                name: n.name.to_string(),
                segments: self
                    .segments_of(&n.name)
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect(),
                addresses: n.addresses.clone(),
                measurement: n.measurement.to_string(),
                enrolled_at: n.enrolled_at.as_secs(),
                revoked_at: n.revoked_at.map(UnixTime::as_secs),
                connected: self.subscribers.contains_key(&n.node_id),
            })
            .collect()
    }

    /// A node's compiled table (for tests and introspection).
    pub fn table(&self, node: &NodeId) -> Option<&RoutingTable> {
        self.tables.get(node).map(|(t, _)| t)
    }

    /// The current signed revocation list.
    pub fn revocation_list(&self) -> Option<&StoredList> {
        self.revocations.as_ref().map(|(s, _)| s)
    }

    /// The audit log path.
    pub fn audit_path(&self) -> &std::path::Path {
        self.audit.path()
    }
}
