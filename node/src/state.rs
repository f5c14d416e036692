//! The node's view of the mesh and the decisions it takes from it.
//!
//! Filled by verifier pushes ([`NodeState::apply`]) and read by the TLS authorizer, the
//! stream gate and the SOCKS endpoint. Every admission decision is a function returning a
//! permit or a refusal. No IO here: callers hold the lock only for the decision.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use hopmesh_protocol::attestation::{
    KeySet, RevocationList, RevocationUpdate, SignedRefusal, VerifiedAttestation,
    verify_attestation, verify_revocation_list,
};
use hopmesh_protocol::control::{NonceCache, StreamHeader};
use hopmesh_protocol::enrollment::{PeerInfo, Push};
use hopmesh_protocol::hop_token::{
    ConnectionKeys, Epoch, EpochLength, ForgeryLedger, GateContext, Generation, GrantRefusal,
    MintRequest, PairIds, PairKeyring, StreamKeyCache, StreamPermit, TOKEN_LEN, TokenPermit,
    mint_token, verify_token,
};
use hopmesh_protocol::ids::{NodeId, ServiceId};
use hopmesh_protocol::routing::{
    Admission, DEFAULT_MESH_SUFFIX, EgressRoute, ForwardPermit, IngressTable, RoutingTable,
    ServePermit,
};
use hopmesh_protocol::secret::{ConnectionBinding, PairSeed, StreamKey};
use hopmesh_protocol::table_sync::{SyncedTable, TableAssembler, TableSyncError, TableUpdate};
use hopmesh_protocol::time::UnixTime;

use crate::refusal::{CloseReason, GateRefusal, MintRefusal, SocksRefusal};
use crate::streams::Flow;

/// Seconds of clock skew tolerated on attestation validity.
pub const ATTESTATION_LEEWAY: u64 = 5;

/// Why this node may not serve or initiate right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelfRefusal {
    /// No attestation yet (not enrolled, or never refreshed since start).
    #[error("this node holds no attestation")]
    NoAttestation,
    /// Our attestation expired: fail closed until the next good refresh.
    #[error("this node's attestation expired")]
    Expired,
    /// Our attestation starts more than [`ATTESTATION_LEEWAY`] after our clock's now (the
    /// clock is far behind the verifier's).
    #[error("this node's attestation is not valid yet (clock behind the verifier's?)")]
    NotYetValid,
    /// No routing table yet from the verifier.
    #[error("no routing table from the verifier yet")]
    NoRoutes,
}

/// Why a peer key may not connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// We cannot serve anyone (see [`SelfRefusal`]).
    #[error("{0}")]
    Self_(SelfRefusal),
    /// The peer is on the revocation list.
    #[error("peer is revoked")]
    Revoked,
    /// Policy gives us no pair with that peer.
    #[error("peer is not in this node's routing table")]
    NotAPeer,
    /// The peer passed the forged-token limit and is refused for a while
    /// ([`hopmesh_protocol::hop_token::ForgeryLedger`]).
    #[error("peer is suspended for forged tokens")]
    Suspended,
}

impl PeerRefusal {
    /// Stable reason name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Self_(SelfRefusal::NoAttestation) => "self_no_attestation",
            Self::Self_(SelfRefusal::Expired) => "self_expired",
            Self::Self_(SelfRefusal::NotYetValid) => "self_not_yet_valid",
            Self::Self_(SelfRefusal::NoRoutes) => "self_no_routes",
            Self::Revoked => "peer_revoked",
            Self::NotAPeer => "not_a_peer",
            Self::Suspended => "peer_suspended",
        }
    }
}

/// What a peer's verified attestation told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAttestation {
    /// Serial (anti-rollback).
    pub serial: u64,
    /// Expiry.
    pub not_after: UnixTime,
    /// Segments.
    pub segments: Vec<String>,
}

/// Effects of applying a push that the IO layer must carry out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Connections to these peers must be closed now (revoked, or no longer allowed).
    pub close: Vec<(NodeId, CloseReason)>,
    /// A new revocation list to persist (atomically) before relying on it.
    pub persist_revocations: Option<Vec<u8>>,
    /// Push refused (bad signature, rollback...): the reason, for the audit log.
    pub refused: Option<String>,
    /// A table update could not be assembled or applied (the table held is unchanged): the
    /// node must resubscribe for a fresh snapshot (`verifier_link.rs`), counted and audited.
    pub resync: Option<TableSyncError>,
}

/// Our own attestation's validity at `now` on our clock: it may start up to
/// [`ATTESTATION_LEEWAY`] in our future (our clock a little behind the verifier's), but it
/// ends exactly at `not_after` (fail closed on time).
pub fn own_validity(v: &VerifiedAttestation, now: UnixTime) -> Result<(), SelfRefusal> {
    let a = v.get();
    if now.plus(ATTESTATION_LEEWAY) < a.not_before {
        return Err(SelfRefusal::NotYetValid);
    }
    if now >= a.not_after {
        return Err(SelfRefusal::Expired);
    }
    Ok(())
}

/// The connection an inbound stream arrived on, as the gate knows it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionContext<'a> {
    /// The TLS-authenticated peer.
    pub peer: NodeId,
    /// The QUIC stream id (raw).
    pub stream_id: u64,
    /// The connection's exporter bytes.
    pub binding: &'a ConnectionBinding,
    /// The connection's stream-key cache.
    pub keys: &'a Mutex<StreamKeyCache>,
}

/// What an admitted stream may do here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Reach the local backend, for the flow of this origin (the peer, or the node behind a
    /// relay).
    Serve(ServePermit, NodeId),
    /// Be relayed to the next hop.
    Forward(ForwardPermit),
}

/// What to mint a token for.
#[derive(Clone, Copy, Debug)]
pub struct Mint<'a> {
    /// The next hop (the token's dst).
    pub dst: NodeId,
    /// The service.
    pub service: ServiceId,
    /// The QUIC stream id the token rides on.
    pub stream_id: u64,
    /// The encoded stream header it covers.
    pub header: &'a [u8],
}

/// The node's state.
#[derive(Debug)]
pub struct NodeState {
    /// This node.
    pub local: NodeId,
    /// Pinned verifier signing keys.
    pub keys: KeySet,
    /// Our attestation envelope and what it says.
    pub attestation: Option<(Vec<u8>, VerifiedAttestation)>,
    /// A newer attestation that is not valid yet on our clock; it replaces
    /// [`Self::attestation`] once it is ([`Self::promote_pending`]).
    pub pending: Option<(Vec<u8>, VerifiedAttestation)>,
    /// Epoch length in force.
    pub epoch: EpochLength,
    /// Mesh-name suffix.
    pub suffix: String,
    /// Routing table (None until the verifier sent one), rebuilt from [`Self::synced`] after
    /// every update applied.
    pub table: Option<RoutingTable>,
    /// The table as the verifier sent it: version, entries and digest of the last update
    /// applied (None until a snapshot was).
    pub synced: Option<SyncedTable>,
    /// Reassembles the parts of the update being received.
    pub assembler: TableAssembler,
    /// How to reach peers.
    pub peers: BTreeMap<NodeId, PeerInfo>,
    /// Seeds per peer.
    pub keyrings: HashMap<NodeId, PairKeyring>,
    /// The current revocation list: version, exact bytes, decoded.
    pub revocations: Option<(u64, Vec<u8>, RevocationList)>,
    /// Peers' attestations, as verified at connect or renewal.
    pub peer_attestations: HashMap<NodeId, PeerAttestation>,
    /// Forged tokens per peer, across its connections; a peer past the limit is suspended
    /// ([`PeerRefusal::Suspended`]) and reconnecting resets nothing.
    pub forgeries: ForgeryLedger,
}

impl NodeState {
    /// An empty state for `local` trusting `keys`.
    pub fn new(local: NodeId, keys: KeySet) -> Self {
        Self {
            local,
            keys,
            attestation: None,
            pending: None,
            epoch: EpochLength::DEFAULT,
            suffix: DEFAULT_MESH_SUFFIX.to_owned(),
            table: None,
            synced: None,
            assembler: TableAssembler::new(),
            peers: BTreeMap::new(),
            keyrings: HashMap::new(),
            revocations: None,
            peer_attestations: HashMap::new(),
            forgeries: ForgeryLedger::default(),
        }
    }

    /// May this node serve or initiate at `now`? Fail closed without a valid attestation.
    pub fn self_permit(&self, now: UnixTime) -> Result<(), SelfRefusal> {
        let (_, v) = self
            .attestation
            .as_ref()
            .ok_or(SelfRefusal::NoAttestation)?;
        own_validity(v, now)?;
        if self.table.is_none() {
            return Err(SelfRefusal::NoRoutes);
        }
        Ok(())
    }

    /// Is `peer` revoked?
    pub fn is_revoked(&self, peer: &NodeId) -> bool {
        self.revocations
            .as_ref()
            .is_some_and(|(_, _, l)| l.is_revoked(peer))
    }

    /// May `peer` complete a handshake with us (either direction)?
    pub fn authorize_peer(&self, peer: &NodeId, now: UnixTime) -> Result<(), PeerRefusal> {
        self.self_permit(now).map_err(PeerRefusal::Self_)?;
        if self.is_revoked(peer) {
            return Err(PeerRefusal::Revoked);
        }
        if !self.table.as_ref().is_some_and(|t| t.peers.contains(peer)) {
            return Err(PeerRefusal::NotAPeer);
        }
        if self.forgeries.suspended_until(peer, now).is_some() {
            return Err(PeerRefusal::Suspended);
        }
        Ok(())
    }

    /// Checks a peer's attestation envelope (Hello or Renewal): pinned signature, validity,
    /// bound to the TLS key, not revoked, serial not lower than one seen.
    pub fn check_peer_attestation(
        &self,
        envelope: &[u8],
        tls_spki: &[u8],
        now: UnixTime,
    ) -> Result<PeerAttestation, SignedRefusal> {
        let v = verify_attestation(envelope, &self.keys, now, ATTESTATION_LEEWAY)?;
        v.check_peer(tls_spki)?;
        let a = v.get();
        v.check_serial(self.peer_attestations.get(&a.node_id).map(|p| p.serial))?;
        Ok(PeerAttestation {
            serial: a.serial,
            not_after: a.not_after,
            segments: a.segments.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Replaces our own attestation (at start, after enroll).
    pub fn set_attestation(&mut self, envelope: Vec<u8>, v: VerifiedAttestation) {
        self.attestation = Some((envelope, v));
    }

    /// A refreshed attestation. It becomes ours at once when it is valid at `now`, or when the
    /// one we hold is not valid either; otherwise we keep the old one (a stream must outlive
    /// any refresh) and hold the new one until it is valid ([`Self::promote_pending`]).
    /// Returns whether it is ours now (then peers must get it as a renewal).
    pub fn refreshed(&mut self, envelope: Vec<u8>, v: VerifiedAttestation, now: UnixTime) -> bool {
        let old_ok = self
            .attestation
            .as_ref()
            .is_some_and(|(_, old)| own_validity(old, now).is_ok());
        if own_validity(&v, now).is_ok() || !old_ok {
            self.attestation = Some((envelope, v));
            self.pending = None;
            true
        } else {
            self.pending = Some((envelope, v));
            false
        }
    }

    /// Installs the pending attestation once it is valid at `now` (or the current one is
    /// not); returns its envelope for the renewals.
    pub fn promote_pending(&mut self, now: UnixTime) -> Option<Vec<u8>> {
        let (env, v) = self.pending.take()?;
        if self.refreshed(env.clone(), v, now) {
            Some(env)
        } else {
            None
        }
    }

    /// Loads a persisted revocation list at start. A list that does not verify is an error:
    /// never start with a silently emptied list.
    pub fn load_revocations(&mut self, bytes: &[u8]) -> Result<(), SignedRefusal> {
        match verify_revocation_list(bytes, &self.keys, None)? {
            RevocationUpdate::Newer(list) => {
                self.revocations = Some((list.version, bytes.to_vec(), list));
                Ok(())
            }
            RevocationUpdate::Same => Ok(()),
        }
    }

    fn keyring(&mut self, peer: NodeId) -> &mut PairKeyring {
        let local = self.local;
        self.keyrings
            .entry(peer)
            .or_insert_with(|| PairKeyring::new(PairIds::new(local, peer)))
    }

    /// The gate's first decision on an inbound stream from `peer`: may we serve at all, and
    /// does the token verify (in the order of [`verify_token`])?
    pub fn check_token(
        &self,
        raw: &[u8; TOKEN_LEN],
        conn: &ConnectionContext<'_>,
        now: UnixTime,
    ) -> Result<TokenPermit, GateRefusal> {
        self.self_permit(now)
            .map_err(GateRefusal::SelfNotPermitted)?;
        let empty = PairKeyring::new(PairIds::new(self.local, conn.peer));
        let keyring = self.keyrings.get(&conn.peer).unwrap_or(&empty);
        let gate = GateContext {
            local: self.local,
            peer: conn.peer,
            stream_id: conn.stream_id,
            epoch_len: self.epoch,
            now,
        };
        let keys = ConnectionKeys {
            keyring,
            binding: conn.binding,
            now,
            grace: self.epoch.as_secs(),
            cache: Some(conn.keys),
        };
        let empty_ingress = IngressTable::default();
        let ingress = self.table.as_ref().map_or(&empty_ingress, |t| &t.ingress);
        verify_token(raw, &gate, &keys, ingress).map_err(GateRefusal::Token)
    }

    /// After the token and the MAC'd header checked out: what the stream may do here. The
    /// header must agree with the token; a direct stream's origin is the TLS peer; a relayed
    /// one carries the origin's flow assertion ([`Self::check_relayed`]); a stream to relay
    /// onwards is checked by [`Self::check_forward`].
    pub fn check_stream(
        &self,
        stream: StreamPermit,
        header: &[u8],
        peer: NodeId,
        nonces: &mut NonceCache,
        now: UnixTime,
    ) -> Result<Admitted, GateRefusal> {
        // Single-hop relays only: a header naming a longer route is refused.
        let h = match StreamHeader::decode(header) {
            Ok(h) if h.service == stream.fields().service && h.route.is_empty() => h,
            _ => return Err(GateRefusal::BadHeader),
        };
        match stream.into_admission() {
            Admission::Serve(p) if p.relay.is_none() && h.origin == peer => {
                Ok(Admitted::Serve(p, peer))
            }
            // A direct peer speaking for another node without the origin's assertion.
            Admission::Serve(p) if p.relay.is_none() && h.assertion.is_none() => {
                Err(GateRefusal::OriginNotPeer)
            }
            // A relayed flow: also from a peer that policy lets use the service itself (a
            // relay in the service's segment); the origin's assertion and the route through
            // that peer decide, never the peer's own rights.
            Admission::Serve(_) => self
                .check_relayed(peer, &h, nonces, now)
                .map(|p| Admitted::Serve(p, h.origin)),
            Admission::Forward(fwd) => {
                self.check_forward(&h, &fwd, peer, now)?;
                Ok(Admitted::Forward(fwd))
            }
        }
    }

    /// As a relay: the origin's signature must verify, for the next hop and service, and the
    /// origin must be the TLS peer. A relay forwards only its peer's own flows.
    pub fn check_forward(
        &self,
        h: &StreamHeader,
        fwd: &ForwardPermit,
        peer: NodeId,
        now: UnixTime,
    ) -> Result<(), GateRefusal> {
        let proven = h
            .assertion
            .as_ref()
            .map(|a| a.verify(&self.keys, &fwd.next, fwd.service, self.epoch, now));
        match proven {
            Some(Ok(origin)) if origin == peer && h.origin == peer => Ok(()),
            Some(Err(e)) => Err(GateRefusal::Flow(e)),
            _ => Err(GateRefusal::FlowOriginMismatch),
        }
    }

    /// At the serving node, for a stream that came through relay `peer`: the origin's flow
    /// assertion must verify, be fresh and unseen, and policy must allow that origin through
    /// that relay.
    pub fn check_relayed(
        &self,
        peer: NodeId,
        h: &StreamHeader,
        nonces: &mut NonceCache,
        now: UnixTime,
    ) -> Result<ServePermit, GateRefusal> {
        let a = h.assertion.as_ref().ok_or(GateRefusal::FlowMissing)?;
        let origin = a
            .verify(&self.keys, &self.local, h.service, self.epoch, now)
            .map_err(GateRefusal::Flow)?;
        if origin != h.origin {
            return Err(GateRefusal::FlowOriginMismatch);
        }
        nonces
            .insert(a.epoch, a.nonce, self.epoch.epoch_at(now))
            .map_err(GateRefusal::Flow)?;
        let table = self.table.as_ref().ok_or(GateRefusal::NoRoutes)?;
        table
            .ingress
            .may_serve_via(&peer, &origin, h.service)
            .map_err(|_| GateRefusal::OriginNotAllowedViaRelay)
    }

    /// The SOCKS endpoint's decision, before any network action: may this node initiate, and
    /// may its apps reach `host`?
    pub fn route(&self, host: &str, now: UnixTime) -> Result<EgressRoute, SocksRefusal> {
        self.self_permit(now)
            .map_err(SocksRefusal::SelfNotPermitted)?;
        let table = self.table.as_ref().ok_or(SocksRefusal::NoRoutes)?;
        table
            .egress
            .may_route(host, &self.suffix)
            .map(|p| p.route)
            .map_err(SocksRefusal::Route)
    }

    /// The one minting path (SOCKS client streams and relayed streams): the token for
    /// `stream_id` to `dst` for `service`, over `header`, under the current minting
    /// generation and epoch. `key` derives the connection's stream key (see
    /// [`crate::peer::PeerConn::stream_key`]).
    pub fn mint(
        &self,
        mint: &Mint<'_>,
        key: impl FnOnce(&PairSeed, &PairIds, Generation, Epoch) -> StreamKey,
        now: UnixTime,
    ) -> Result<[u8; TOKEN_LEN], MintRefusal> {
        let grant = self
            .keyrings
            .get(&mint.dst)
            .and_then(|k| k.minting(now))
            .ok_or(MintRefusal::NoSeedForPeer)?;
        let epoch = self.epoch.epoch_at(now);
        let key = key(
            &grant.seed,
            &PairIds::new(self.local, mint.dst),
            grant.generation,
            epoch,
        );
        let req = MintRequest {
            generation: grant.generation,
            epoch,
            src: self.local,
            dst: mint.dst,
            service: mint.service,
            stream_id: mint.stream_id,
            header: mint.header,
        };
        mint_token(&req, &key).map_err(|_| MintRefusal::HeaderTooLong)
    }

    /// The watchdog's selection among `peers` (those with live connections): which to close
    /// now and why. Everything while our own attestation is invalid (fail closed); a peer
    /// that is revoked or no longer in the table; a peer whose attestation expired (with
    /// [`ATTESTATION_LEEWAY`]) without a renewal.
    pub fn doomed(
        &self,
        peers: impl IntoIterator<Item = NodeId>,
        now: UnixTime,
    ) -> Vec<(NodeId, CloseReason)> {
        let self_ok = self.self_permit(now).is_ok();
        peers
            .into_iter()
            .filter_map(|peer| {
                if !self_ok {
                    return Some((peer, CloseReason::OwnAttestationInvalid));
                }
                if let Err(e) = self.authorize_peer(&peer, now) {
                    return Some((peer, CloseReason::NotAuthorized(e)));
                }
                match self.peer_attestations.get(&peer) {
                    Some(a) if now < a.not_after.plus(ATTESTATION_LEEWAY) => None,
                    _ => Some((peer, CloseReason::PeerAttestationExpired)),
                }
            })
            .collect()
    }

    /// Among the streams being served, the ones the current table no longer allows (after a
    /// policy change that kept the peer): a direct stream needs its peer in the service's
    /// allowed peers; a relayed one needs its origin allowed through that relay.
    pub fn disallowed(&self, flows: impl IntoIterator<Item = (u64, Flow)>) -> Vec<(u64, Flow)> {
        let empty = IngressTable::default();
        let ingress = self.table.as_ref().map_or(&empty, |t| &t.ingress);
        flows
            .into_iter()
            .filter(|(_, f)| {
                if f.origin == f.peer {
                    !matches!(
                        ingress.admit(&f.peer, f.service),
                        Ok(Admission::Serve(ServePermit { relay: None, .. }))
                    )
                } else {
                    ingress
                        .may_serve_via(&f.peer, &f.origin, f.service)
                        .is_err()
                }
            })
            .collect()
    }

    /// A new push stream starts (a subscribe or resubscribe): a half-received update of the
    /// old one is dropped. The table held stays: the new stream starts with a snapshot.
    pub fn table_stream_restarted(&mut self) {
        self.assembler.reset();
    }

    /// Applies a whole table update atomically (on an error nothing changes), then rebuilds
    /// the routing table and peer infos from it: peers that left are closed and their seeds
    /// dropped.
    fn apply_table(
        &mut self,
        update: &TableUpdate,
        fx: &mut Effects,
    ) -> Result<(), TableSyncError> {
        match &mut self.synced {
            Some(held) => held.apply_in_place(update)?,
            None => self.synced = Some(SyncedTable::from_update(update)?),
        }
        let Some(synced) = &self.synced else {
            return Ok(());
        };
        let (table, peers) = synced.table();
        let old: BTreeSet<NodeId> = self
            .table
            .as_ref()
            .map(|t| t.peers.clone())
            .unwrap_or_default();
        for gone in old.difference(&table.peers) {
            fx.close.push((*gone, CloseReason::PolicyChanged));
            self.keyrings.remove(gone);
        }
        self.peers = peers.into_iter().map(|p| (p.node_id, p)).collect();
        self.table = Some(table);
        Ok(())
    }

    /// Applies one verifier push.
    pub fn apply(&mut self, push: Push, _now: UnixTime) -> Effects {
        let mut fx = Effects::default();
        match push {
            Push::Config(c) => {
                match EpochLength::from_secs(c.epoch_secs) {
                    Ok(e) => self.epoch = e,
                    Err(e) => fx.refused = Some(format!("config: {e}")),
                }
                self.suffix = c.suffix.as_str().to_owned();
            }
            Push::TablePart(part) => match self.assembler.push(&part) {
                Ok(None) => {}
                Ok(Some(update)) => {
                    if let Err(e) = self.apply_table(&update, &mut fx) {
                        fx.resync = Some(e);
                    }
                }
                Err(e) => fx.resync = Some(e),
            },
            Push::Seeds { peer, grants } => {
                for g in grants.iter() {
                    if let Err(e) = self.keyring(peer).insert(g.clone()) {
                        // A compromised generation re-sent is expected noise; others are worth a line.
                        if !matches!(e, GrantRefusal::Compromised(_)) {
                            fx.refused = Some(format!("seeds for {}: {e}", peer.short()));
                        }
                    }
                }
            }
            Push::Compromised { peer, generations } => {
                let ring = self.keyring(peer);
                for g in generations.iter() {
                    ring.mark_compromised(*g);
                }
            }
            Push::Revocations { list } => {
                let current = self
                    .revocations
                    .as_ref()
                    .map(|(v, b, _)| (*v, b.as_slice()));
                match verify_revocation_list(&list, &self.keys, current) {
                    Ok(RevocationUpdate::Newer(l)) => {
                        for r in l.revoked.iter() {
                            fx.close.push((r.node_id, CloseReason::Revoked));
                            if let Some(ring) = self.keyrings.get_mut(&r.node_id) {
                                ring.mark_all_compromised();
                            }
                        }
                        fx.persist_revocations = Some(list.to_vec());
                        self.revocations = Some((l.version, list.to_vec(), l));
                    }
                    Ok(RevocationUpdate::Same) => {}
                    Err(e) => fx.refused = Some(format!("revocation list: {e}")),
                }
            }
        }
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopmesh_protocol::attestation::{
        ATTESTATION_VERSION, Attestation, RevokedNode, SigningKey,
    };
    use hopmesh_protocol::enrollment::MeshConfig;
    use hopmesh_protocol::ids::{Measurement, NodeName, SegmentName};
    use hopmesh_protocol::secret::SigningSeed;
    use hopmesh_protocol::table_sync::{Entries, diff, digest, entries_of, split};
    use hopmesh_protocol::wire::{BoundedString, BoundedVec};

    const NOW: u64 = 1_800_000_000;

    fn verifier() -> SigningKey {
        SigningKey::from_seed(&SigningSeed::from_bytes([1; 32]))
    }

    fn attestation_for(seed: u8, not_after: u64) -> (Vec<u8>, VerifiedAttestation, Vec<u8>) {
        attestation_window(seed, 7, NOW - 10, not_after)
    }

    fn attestation_window(
        seed: u8,
        serial: u64,
        not_before: u64,
        not_after: u64,
    ) -> (Vec<u8>, VerifiedAttestation, Vec<u8>) {
        let k = verifier();
        let spki = SigningKey::from_seed(&SigningSeed::from_bytes([seed; 32]))
            .verifying_key()
            .to_spki_der();
        let a = Attestation {
            version: ATTESTATION_VERSION,
            node_id: NodeId::from_spki(&spki),
            spki: BoundedVec::new(spki.clone()).expect("fits"),
            name: NodeName::new("n").expect("name"),
            segments: BoundedVec::new(vec![SegmentName::new("s").expect("seg")]).expect("fits"),
            measurement: Measurement([0; 32]),
            serial,
            not_before: UnixTime::from_secs(not_before),
            not_after: UnixTime::from_secs(not_after),
            verifier_key_id: k.key_id(),
        };
        let env = a.sign(&k).expect("sign");
        let keys = KeySet::new(vec![k.verifying_key()]).expect("keys");
        let v = verify_attestation(&env, &keys, UnixTime::from_secs(not_before), 0).expect("valid");
        (env, v, spki)
    }

    fn state() -> NodeState {
        let (env, v, spki) = attestation_for(2, NOW + 300);
        let mut s = NodeState::new(
            NodeId::from_spki(&spki),
            KeySet::new(vec![verifier().verifying_key()]).expect("keys"),
        );
        s.set_attestation(env, v);
        s
    }

    fn info(id: NodeId) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: NodeName::new(&format!("p{}", id.short())).expect("name"),
            addresses: BoundedVec::empty(),
        }
    }

    fn peer_entries(peers: &[NodeId]) -> Entries {
        let table = RoutingTable {
            peers: peers.iter().copied().collect(),
            ..RoutingTable::default()
        };
        let infos: Vec<PeerInfo> = peers.iter().copied().map(info).collect();
        entries_of(&table, &infos)
    }

    fn one_part(update: &TableUpdate) -> Push {
        let [part] = split(update).expect("split").try_into().expect("one part");
        part
    }

    /// A snapshot (one part) of a table that names `peers`.
    fn routes(peers: &[NodeId]) -> Push {
        one_part(&TableUpdate::snapshot(1, &peer_entries(peers)).expect("fits"))
    }

    fn parts(update: &TableUpdate) -> Vec<Push> {
        split(update).expect("split")
    }

    #[test]
    fn a_table_in_several_parts_applies_with_its_last_part_only() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        let e = hopmesh_protocol::fuzzing::segment_entries(2_000, 1);
        let pushes = parts(&TableUpdate::snapshot(1, &e).expect("fits"));
        let (last, init) = pushes.split_last().expect("parts");
        assert!(!init.is_empty());
        for p in init {
            assert_eq!(s.apply(p.clone(), now), Effects::default());
            assert_eq!(s.table, None, "nothing applies before the last part");
        }
        assert_eq!(s.apply(last.clone(), now), Effects::default());
        assert_eq!(s.table.as_ref().map(|t| t.peers.len()), Some(2_000));
        assert_eq!(s.peers.len(), 2_000);
        assert_eq!(s.synced.as_ref().map(|t| t.digest()), Some(digest(&e)));
        assert_eq!(s.self_permit(now), Ok(()));
    }

    #[test]
    fn a_delta_updates_the_table_and_closes_the_peers_that_left() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        let (p, q, r) = (
            NodeId::from_bytes([9; 32]),
            NodeId::from_bytes([8; 32]),
            NodeId::from_bytes([7; 32]),
        );
        let old = peer_entries(&[p, q]);
        s.apply(
            one_part(&TableUpdate::snapshot(4, &old).expect("fits")),
            now,
        );
        let new = peer_entries(&[q, r]);
        let delta = TableUpdate::delta(4, 5, diff(&old, &new), digest(&new)).expect("fits");
        let fx = s.apply(one_part(&delta), now);
        assert_eq!(fx.close, vec![(p, CloseReason::PolicyChanged)]);
        assert_eq!(fx.resync, None);
        assert_eq!(
            s.table.as_ref().map(|t| t.peers.clone()),
            Some([q, r].into())
        );
        assert_eq!(s.peers.keys().copied().collect::<Vec<_>>(), vec![r, q]);
        assert_eq!(s.synced.as_ref().map(|t| t.version()), Some(5));
    }

    #[test]
    fn a_missed_delta_asks_for_a_resync_and_changes_nothing() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        let (p, q, r) = (
            NodeId::from_bytes([9; 32]),
            NodeId::from_bytes([8; 32]),
            NodeId::from_bytes([7; 32]),
        );
        let v4 = peer_entries(&[p]);
        let v5 = peer_entries(&[p, q]);
        let v6 = peer_entries(&[q, r]);
        s.apply(one_part(&TableUpdate::snapshot(4, &v4).expect("fits")), now);
        let before = (s.table.clone(), s.peers.clone(), s.synced.clone());
        // The delta 4 -> 5 was missed; 5 -> 6 does not apply to 4.
        let d6 = TableUpdate::delta(5, 6, diff(&v5, &v6), digest(&v6)).expect("fits");
        let fx = s.apply(one_part(&d6), now);
        assert_eq!(
            fx.resync,
            Some(TableSyncError::WrongBase {
                base: 5,
                held: Some(4)
            })
        );
        assert!(fx.close.is_empty());
        assert_eq!((s.table.clone(), s.peers.clone(), s.synced.clone()), before);
        // A delta without a table held asks for a resync too.
        let mut fresh = state();
        assert_eq!(
            fresh.apply(one_part(&d6), now).resync.map(|e| e.reason()),
            Some("wrong_base")
        );
        assert_eq!(fresh.self_permit(now), Err(SelfRefusal::NoRoutes));
        // The fresh snapshot after the resync recovers.
        let fx = s.apply(one_part(&TableUpdate::snapshot(6, &v6).expect("fits")), now);
        assert_eq!(fx.resync, None);
        assert_eq!(fx.close, vec![(p, CloseReason::PolicyChanged)]);
        assert_eq!(s.synced.as_ref().map(|t| t.digest()), Some(digest(&v6)));
    }

    #[test]
    fn a_lost_part_asks_for_a_resync_and_a_restarted_stream_starts_afresh() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        let e = hopmesh_protocol::fuzzing::segment_entries(2_000, 1);
        let pushes = parts(&TableUpdate::snapshot(1, &e).expect("fits"));
        assert!(pushes.len() >= 3);
        s.apply(pushes[0].clone(), now);
        let fx = s.apply(pushes[2].clone(), now);
        assert_eq!(fx.resync.map(|e| e.reason()), Some("part_gap"));
        assert_eq!(s.table, None);
        // Half an update, then the stream restarts: the new stream's parts are taken whole.
        s.apply(pushes[0].clone(), now);
        s.table_stream_restarted();
        for p in &pushes {
            assert_eq!(s.apply(p.clone(), now).resync, None);
        }
        assert_eq!(s.peers.len(), 2_000);
        // Without the restart, a part 0 inside an update is refused.
        s.apply(pushes[0].clone(), now);
        assert_eq!(
            s.apply(pushes[0].clone(), now).resync.map(|e| e.reason()),
            Some("part_duplicate")
        );
        assert_eq!(s.peers.len(), 2_000, "the table held is kept");
    }

    #[test]
    fn fail_closed_without_routes_or_after_expiry() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        assert_eq!(s.self_permit(now), Err(SelfRefusal::NoRoutes));
        s.apply(routes(&[]), now);
        assert_eq!(s.self_permit(now), Ok(()));
        assert_eq!(
            s.self_permit(UnixTime::from_secs(NOW + 300)),
            Err(SelfRefusal::Expired)
        );
        let empty = NodeState::new(s.local, s.keys.clone());
        assert_eq!(empty.self_permit(now), Err(SelfRefusal::NoAttestation));
    }

    #[test]
    fn own_attestation_tolerates_a_clock_a_little_behind_but_ends_on_time() {
        let (_, v, _) = attestation_window(2, 1, NOW, NOW + 10);
        let at = |t: u64| own_validity(&v, UnixTime::from_secs(t));
        assert_eq!(at(NOW - ATTESTATION_LEEWAY), Ok(()));
        assert_eq!(
            at(NOW - ATTESTATION_LEEWAY - 1),
            Err(SelfRefusal::NotYetValid)
        );
        assert_eq!(at(NOW + 9), Ok(()));
        assert_eq!(at(NOW + 10), Err(SelfRefusal::Expired));
    }

    #[test]
    fn a_refresh_never_replaces_a_valid_attestation_with_one_not_yet_valid() {
        let mut s = state();
        s.apply(routes(&[]), UnixTime::from_secs(NOW));
        // Our clock is 20 s behind the verifier that issued the new one.
        let now = UnixTime::from_secs(NOW);
        let (env, v, _) = attestation_window(2, 8, NOW + 20, NOW + 320);
        assert!(!s.refreshed(env.clone(), v, now));
        assert_eq!(s.attestation.as_ref().map(|(_, v)| v.get().serial), Some(7));
        assert_eq!(s.self_permit(now), Ok(()));
        assert_eq!(s.promote_pending(now), None);
        // Once it is valid on our clock it becomes ours, and peers must hear of it.
        let later = UnixTime::from_secs(NOW + 20 - ATTESTATION_LEEWAY);
        assert_eq!(s.promote_pending(later), Some(env));
        assert_eq!(s.attestation.as_ref().map(|(_, v)| v.get().serial), Some(8));
        assert!(s.pending.is_none());
        // A new one that is valid replaces at once.
        let (env9, v9, _) = attestation_window(2, 9, NOW, NOW + 400);
        assert!(s.refreshed(env9, v9, later));
        assert_eq!(s.attestation.as_ref().map(|(_, v)| v.get().serial), Some(9));
        // With nothing valid held, the newest is taken even if not valid yet.
        let mut expired = state();
        let past = UnixTime::from_secs(NOW + 300);
        let (env10, v10, _) = attestation_window(2, 10, NOW + 320, NOW + 600);
        assert!(expired.refreshed(env10, v10, past));
    }

    #[test]
    fn peers_are_authorized_by_table_and_revocation() {
        let mut s = state();
        let now = UnixTime::from_secs(NOW);
        let p = NodeId::from_bytes([9; 32]);
        let q = NodeId::from_bytes([8; 32]);
        s.apply(routes(&[p]), now);
        assert_eq!(s.authorize_peer(&p, now), Ok(()));
        assert_eq!(s.authorize_peer(&q, now), Err(PeerRefusal::NotAPeer));
        let list = RevocationList {
            version: 1,
            issued_at: now,
            verifier_key_id: verifier().key_id(),
            revoked: BoundedVec::new(vec![RevokedNode {
                node_id: p,
                revoked_at: now,
                until: now.plus(300),
            }])
            .expect("fits"),
        };
        let bytes = list.sign(&verifier()).expect("sign");
        let fx = s.apply(
            Push::Revocations {
                list: BoundedVec::new(bytes.clone()).expect("fits"),
            },
            now,
        );
        assert_eq!(fx.close, vec![(p, CloseReason::Revoked)]);
        assert_eq!(fx.persist_revocations, Some(bytes.clone()));
        assert_eq!(s.authorize_peer(&p, now), Err(PeerRefusal::Revoked));
        // Rollback: an older list is refused and nothing changes.
        let older = RevocationList {
            version: 0,
            revoked: BoundedVec::empty(),
            ..list
        };
        let fx = s.apply(
            Push::Revocations {
                list: BoundedVec::new(older.sign(&verifier()).expect("sign")).expect("fits"),
            },
            now,
        );
        assert!(
            fx.refused
                .is_some_and(|r| r.contains("rollback") || r.contains("below"))
        );
        assert_eq!(s.authorize_peer(&p, now), Err(PeerRefusal::Revoked));
        // Dropping a peer from the table closes its connections.
        let fx = s.apply(routes(&[q]), now);
        assert_eq!(fx.close, vec![(p, CloseReason::PolicyChanged)]);
    }

    #[test]
    fn peer_attestations_are_bound_to_the_tls_key() {
        let s = state();
        let now = UnixTime::from_secs(NOW);
        let (env, _, spki) = attestation_for(3, NOW + 300);
        assert!(s.check_peer_attestation(&env, &spki, now).is_ok());
        let (_, _, other) = attestation_for(4, NOW + 300);
        assert_eq!(
            s.check_peer_attestation(&env, &other, now),
            Err(SignedRefusal::SpkiMismatch)
        );
        let (expired, _, spki) = attestation_for(5, NOW - 6);
        assert!(matches!(
            s.check_peer_attestation(&expired, &spki, now),
            Err(SignedRefusal::Expired { .. })
        ));
    }

    #[test]
    fn config_push_sets_epoch_and_suffix() {
        let mut s = state();
        let fx = s.apply(
            Push::Config(MeshConfig {
                epoch_secs: 1,
                generation_secs: 10,
                suffix: BoundedString::truncated("corp"),
            }),
            UnixTime::from_secs(NOW),
        );
        assert_eq!(fx, Effects::default());
        assert_eq!(s.epoch.as_secs(), 1);
        assert_eq!(s.suffix, "corp");
    }

    /// The decisions of the gate, SOCKS, relays and the watchdog, without a socket.
    mod decisions {
        use super::*;
        use hopmesh_protocol::control::{FlowAssertion, FlowRefusal};
        use hopmesh_protocol::hop_token::{Epoch, Generation, GenerationGrant, TokenRefusal};
        use hopmesh_protocol::routing::RouteRefusal;
        use hopmesh_protocol::routing::{
            Backend, EgressRoute, EgressTable, ForwardPermit, IngressEntry, IngressTable, MeshName,
        };

        const A: u8 = 2;
        const B: u8 = 3;
        const R: u8 = 4;

        fn key_of(seed: u8) -> SigningKey {
            SigningKey::from_seed(&SigningSeed::from_bytes([seed; 32]))
        }

        fn id(seed: u8) -> NodeId {
            NodeId::from_spki(&key_of(seed).verifying_key().to_spki_der())
        }

        fn api() -> MeshName {
            MeshName::parse("api.s.mesh", DEFAULT_MESH_SUFFIX).expect("mesh name")
        }

        fn grant() -> GenerationGrant {
            GenerationGrant {
                generation: Generation(1),
                seed: PairSeed::from_bytes([5; 32]),
                valid_from: UnixTime::from_secs(NOW - 100),
                valid_until: UnixTime::from_secs(NOW + 300),
            }
        }

        /// Node `seed`, attested, with `table` and one seed for each of `peers`.
        fn node(seed: u8, table: RoutingTable) -> NodeState {
            let (env, v, spki) = attestation_for(seed, NOW + 300);
            let mut s = NodeState::new(
                NodeId::from_spki(&spki),
                KeySet::new(vec![verifier().verifying_key()]).expect("keys"),
            );
            s.set_attestation(env, v);
            for p in table.peers.clone() {
                s.keyring(p).insert(grant()).expect("grant");
            }
            s.table = Some(table);
            s
        }

        /// a reaches api on b; b serves api to a, and to a through relay r.
        fn a_and_b() -> (NodeState, NodeState) {
            let name = api();
            let service = name.service_id();
            let a = node(
                A,
                RoutingTable {
                    egress: EgressTable::from_routes([EgressRoute {
                        name: name.clone(),
                        service,
                        serving_node: id(B),
                        via: None,
                    }]),
                    peers: [id(B)].into(),
                    ..RoutingTable::default()
                },
            );
            let b = node(
                B,
                RoutingTable {
                    ingress: IngressTable::from_entries([IngressEntry {
                        service,
                        name,
                        backend: Backend {
                            host: "127.0.0.1".into(),
                            port: 8080,
                        },
                        allowed_peers: [id(A)].into(),
                        relayed: [(id(R), id(A))].into(),
                    }]),
                    peers: [id(A), id(R)].into(),
                    ..RoutingTable::default()
                },
            );
            (a, b)
        }

        fn header(origin: NodeId, service: ServiceId, assertion: Option<FlowAssertion>) -> Vec<u8> {
            StreamHeader {
                origin,
                service,
                route: hopmesh_protocol::wire::BoundedVec::empty(),
                assertion,
            }
            .encode()
            .expect("header")
        }

        fn mint_on(
            st: &NodeState,
            dst: NodeId,
            stream_id: u64,
            header: &[u8],
            binding: &ConnectionBinding,
        ) -> Result<[u8; TOKEN_LEN], MintRefusal> {
            let cache = Mutex::new(StreamKeyCache::default());
            let mint = Mint {
                dst,
                service: api().service_id(),
                stream_id,
                header,
            };
            st.mint(
                &mint,
                |seed, pair, generation, epoch| {
                    cache
                        .lock()
                        .expect("cache")
                        .stream_key(binding, pair, seed, generation, epoch)
                },
                UnixTime::from_secs(NOW),
            )
        }

        fn gate(
            st: &NodeState,
            peer: NodeId,
            stream_id: u64,
            raw: &[u8; TOKEN_LEN],
            binding: &ConnectionBinding,
        ) -> Result<TokenPermit, GateRefusal> {
            let keys = Mutex::new(StreamKeyCache::default());
            let conn = ConnectionContext {
                peer,
                stream_id,
                binding,
                keys: &keys,
            };
            st.check_token(raw, &conn, UnixTime::from_secs(NOW))
        }

        #[test]
        fn a_minted_token_passes_the_gate_on_its_connection_and_stream_only() {
            let (a, b) = a_and_b();
            let x = ConnectionBinding::from_bytes([7; 32]);
            let h = header(a.local, api().service_id(), None);
            let raw = mint_on(&a, b.local, 4, &h, &x).expect("minted");
            let permit = gate(&b, a.local, 4, &raw, &x).expect("admitted");
            assert_eq!(permit.header_len(), h.len());
            let stream = permit.check_header(&h).expect("header hash");
            let admitted = b
                .check_stream(
                    stream,
                    &h,
                    a.local,
                    &mut NonceCache::default(),
                    UnixTime::from_secs(NOW),
                )
                .expect("serve");
            assert!(
                matches!(&admitted, Admitted::Serve(p, origin) if *origin == a.local && p.service == api().service_id() && p.backend.port == 8080)
            );
            // Another connection: the exporter differs, the MAC fails.
            let y = ConnectionBinding::from_bytes([8; 32]);
            assert_eq!(
                gate(&b, a.local, 4, &raw, &y).err(),
                Some(GateRefusal::Token(TokenRefusal::BadMac))
            );
            // Another stream of the same connection.
            assert!(matches!(
                gate(&b, a.local, 8, &raw, &x),
                Err(GateRefusal::Token(TokenRefusal::StreamIdMismatch { .. }))
            ));
            // Another TLS peer claiming a's token.
            assert!(matches!(
                gate(&b, id(R), 4, &raw, &x),
                Err(GateRefusal::Token(TokenRefusal::SrcNotPeer { .. }))
            ));
        }

        #[test]
        fn the_gate_fails_closed_before_reading_the_token() {
            let (a, mut b) = a_and_b();
            let x = ConnectionBinding::from_bytes([7; 32]);
            let h = header(a.local, api().service_id(), None);
            let raw = mint_on(&a, b.local, 0, &h, &x).expect("minted");
            b.table = None;
            assert_eq!(
                gate(&b, a.local, 0, &raw, &x).err(),
                Some(GateRefusal::SelfNotPermitted(SelfRefusal::NoRoutes))
            );
            b.attestation = None;
            assert_eq!(
                gate(&b, a.local, 0, &raw, &x).err(),
                Some(GateRefusal::SelfNotPermitted(SelfRefusal::NoAttestation))
            );
        }

        #[test]
        fn headers_must_agree_with_the_token_and_the_peer() {
            let (a, b) = a_and_b();
            let x = ConnectionBinding::from_bytes([7; 32]);
            let now = UnixTime::from_secs(NOW);
            let check = |h: &[u8]| {
                let raw = mint_on(&a, b.local, 0, h, &x).expect("minted");
                let stream = gate(&b, a.local, 0, &raw, &x)
                    .expect("token")
                    .check_header(h)
                    .expect("hash");
                b.check_stream(stream, h, a.local, &mut NonceCache::default(), now)
            };
            // An origin other than the TLS peer on a direct stream.
            assert_eq!(
                check(&header(id(R), api().service_id(), None)),
                Err(GateRefusal::OriginNotPeer)
            );
            // Bytes that are not a header (MAC'd, so only the minter could send them).
            assert_eq!(check(b"not a header"), Err(GateRefusal::BadHeader));
        }

        #[test]
        fn mint_needs_a_current_seed_for_the_next_hop() {
            let (a, _) = a_and_b();
            let x = ConnectionBinding::from_bytes([7; 32]);
            let h = header(a.local, api().service_id(), None);
            assert_eq!(
                mint_on(&a, id(R), 0, &h, &x),
                Err(MintRefusal::NoSeedForPeer)
            );
            let mut late = a_and_b().0;
            late.keyrings.clear();
            assert_eq!(
                mint_on(&late, id(B), 0, &h, &x),
                Err(MintRefusal::NoSeedForPeer)
            );
        }

        #[test]
        fn route_decides_before_any_network_action() {
            let (a, _) = a_and_b();
            let now = UnixTime::from_secs(NOW);
            let r = a.route("api.s.mesh", now).expect("route");
            assert_eq!((r.serving_node, r.via), (id(B), None));
            assert_eq!(
                a.route("10.0.0.1", now),
                Err(SocksRefusal::Route(RouteRefusal::IpLiteral))
            );
            assert_eq!(
                a.route("example.com", now),
                Err(SocksRefusal::Route(RouteRefusal::NotMeshName))
            );
            assert_eq!(
                a.route("ledger.s.mesh", now),
                Err(SocksRefusal::Route(RouteRefusal::NoRoute))
            );
            assert_eq!(
                a.route("api.s.mesh", UnixTime::from_secs(NOW + 300)),
                Err(SocksRefusal::SelfNotPermitted(SelfRefusal::Expired))
            );
        }

        fn assertion_by(origin: u8, final_node: NodeId, nonce: u8) -> FlowAssertion {
            let (env, _, _) = attestation_for(origin, NOW + 300);
            FlowAssertion::sign(
                &key_of(origin),
                &env,
                final_node,
                api().service_id(),
                EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(NOW)),
                [nonce; 16],
                [nonce; 32],
            )
            .expect("signed")
        }

        #[test]
        fn a_relayed_stream_needs_the_origins_fresh_assertion_and_policy() {
            let (_, b) = a_and_b();
            let now = UnixTime::from_secs(NOW);
            let service = api().service_id();
            let mut nonces = NonceCache::default();
            let h = |origin, assertion| StreamHeader {
                origin,
                service,
                route: hopmesh_protocol::wire::BoundedVec::empty(),
                assertion,
            };
            assert_eq!(
                b.check_relayed(id(R), &h(id(A), None), &mut nonces, now),
                Err(GateRefusal::FlowMissing)
            );
            // The relay names another origin than the one that signed.
            assert_eq!(
                b.check_relayed(
                    id(R),
                    &h(id(R), Some(assertion_by(A, id(B), 1))),
                    &mut nonces,
                    now
                ),
                Err(GateRefusal::FlowOriginMismatch)
            );
            // Signed for another final node.
            assert!(matches!(
                b.check_relayed(
                    id(R),
                    &h(id(A), Some(assertion_by(A, id(R), 2))),
                    &mut nonces,
                    now
                ),
                Err(GateRefusal::Flow(_))
            ));
            let good = h(id(A), Some(assertion_by(A, id(B), 3)));
            let p = b
                .check_relayed(id(R), &good, &mut nonces, now)
                .expect("allowed");
            assert_eq!(p.service, service);
            // The same assertion again: a relay replaying the origin's flow.
            assert_eq!(
                b.check_relayed(id(R), &good, &mut nonces, now),
                Err(GateRefusal::Flow(FlowRefusal::Replayed))
            );
            // Through a relay policy does not name for that origin.
            let other = h(id(A), Some(assertion_by(A, id(B), 4)));
            assert_eq!(
                b.check_relayed(id(A), &other, &mut nonces, now),
                Err(GateRefusal::OriginNotAllowedViaRelay)
            );
        }

        #[test]
        fn a_relay_forwards_only_its_peers_own_flows() {
            let r = node(R, RoutingTable::default());
            let now = UnixTime::from_secs(NOW);
            let service = api().service_id();
            let fwd = ForwardPermit {
                origin: id(A),
                service,
                next: id(B),
            };
            let h = |origin, assertion| StreamHeader {
                origin,
                service,
                route: hopmesh_protocol::wire::BoundedVec::empty(),
                assertion,
            };
            let signed = Some(assertion_by(A, id(B), 1));
            assert_eq!(
                r.check_forward(&h(id(A), signed.clone()), &fwd, id(A), now),
                Ok(())
            );
            // Another peer passing on a's assertion.
            assert_eq!(
                r.check_forward(&h(id(A), signed.clone()), &fwd, id(B), now),
                Err(GateRefusal::FlowOriginMismatch)
            );
            assert_eq!(
                r.check_forward(&h(id(A), None), &fwd, id(A), now),
                Err(GateRefusal::FlowOriginMismatch)
            );
            assert!(matches!(
                r.check_forward(&h(id(A), Some(assertion_by(A, id(R), 2))), &fwd, id(A), now),
                Err(GateRefusal::Flow(_))
            ));
            // A stale assertion (three epochs later).
            let later = UnixTime::from_secs(NOW + 30);
            assert_eq!(
                r.check_forward(&h(id(A), signed), &fwd, id(A), later),
                Err(GateRefusal::Flow(FlowRefusal::EpochOutOfWindow))
            );
        }

        #[test]
        fn doomed_picks_exactly_the_connections_to_close() {
            let (_, mut b) = a_and_b();
            let now = UnixTime::from_secs(NOW);
            let live = PeerAttestation {
                serial: 1,
                not_after: UnixTime::from_secs(NOW + 100),
                segments: vec![],
            };
            b.peer_attestations.insert(id(A), live.clone());
            // r's attestation ended 6 s ago: past the leeway.
            b.peer_attestations.insert(
                id(R),
                PeerAttestation {
                    not_after: UnixTime::from_secs(NOW - ATTESTATION_LEEWAY - 1),
                    ..live.clone()
                },
            );
            let stranger = NodeId::from_bytes([9; 32]);
            assert_eq!(
                b.doomed([id(A), id(R), stranger], now),
                vec![
                    (id(R), CloseReason::PeerAttestationExpired),
                    (stranger, CloseReason::NotAuthorized(PeerRefusal::NotAPeer)),
                ]
            );
            // Within the leeway the connection stays.
            b.peer_attestations.insert(
                id(R),
                PeerAttestation {
                    not_after: UnixTime::from_secs(NOW - 1),
                    ..live
                },
            );
            assert_eq!(b.doomed([id(A), id(R)], now), vec![]);
            // Our own attestation expired: everything closes.
            let late = UnixTime::from_secs(NOW + 300);
            assert_eq!(
                b.doomed([id(A), id(R)], late),
                vec![
                    (id(A), CloseReason::OwnAttestationInvalid),
                    (id(R), CloseReason::OwnAttestationInvalid),
                ]
            );
        }

        #[test]
        fn a_policy_change_disallows_exactly_the_streams_it_forbids() {
            let (_, mut b) = a_and_b();
            let service = api().service_id();
            let direct = Flow {
                peer: id(A),
                origin: id(A),
                service,
            };
            let relayed = Flow {
                peer: id(R),
                origin: id(A),
                service,
            };
            let forged = Flow {
                peer: id(R),
                origin: id(R),
                service,
            };
            assert_eq!(
                b.disallowed([(1, direct), (2, relayed), (3, forged)]),
                vec![(3, forged)]
            );
            // The new table keeps a as a peer but no longer lets it reach api directly.
            let mut table = b.table.clone().expect("table");
            table.ingress =
                IngressTable::from_entries(table.ingress.entries().cloned().map(|mut e| {
                    e.allowed_peers.clear();
                    e
                }));
            b.table = Some(table);
            assert_eq!(b.disallowed([(1, direct), (2, relayed)]), vec![(1, direct)]);
            b.table = None;
            assert_eq!(
                b.disallowed([(1, direct), (2, relayed)]),
                vec![(1, direct), (2, relayed)]
            );
        }

        #[test]
        fn epochs_move_the_token_key() {
            let (a, b) = a_and_b();
            let x = ConnectionBinding::from_bytes([7; 32]);
            let h = header(a.local, api().service_id(), None);
            let raw = mint_on(&a, b.local, 0, &h, &x).expect("minted");
            // Three epochs later the same token is out of the ±1 window.
            let keys = Mutex::new(StreamKeyCache::default());
            let conn = ConnectionContext {
                peer: a.local,
                stream_id: 0,
                binding: &x,
                keys: &keys,
            };
            let epoch = EpochLength::DEFAULT.epoch_at(UnixTime::from_secs(NOW));
            assert!(matches!(
                b.check_token(&raw, &conn, UnixTime::from_secs(NOW + 30)),
                Err(GateRefusal::Token(TokenRefusal::EpochOutOfWindow { .. }))
            ));
            assert_eq!(epoch, Epoch(NOW / 10));
        }
    }
}
