//! `hopmesh-node ctl show`: the node's exact state as JSON. The keys are stable. And the
//! metrics' gauges, from the same reads.

use serde_json::Value;

use crate::counters::Gauges;
use crate::peer::Pool;
use crate::shared::Shared;

/// The exact state as JSON.
pub fn show(node: &Shared, pool: &Pool) -> Value {
    let now = node.now();
    let st = node.state_read();
    let own = st.attestation.as_ref().map(|(_, v)| {
        let a = v.get();
        serde_json::json!({"serial": a.serial, "not_after": a.not_after.as_secs(), "valid": crate::state::own_validity(v, now).is_ok(),
                           "name": a.name.as_str(), "segments": a.segments.iter().map(|s| s.as_str()).collect::<Vec<_>>()})
    });
    let peers: Vec<Value> = st
        .peers
        .values()
        .map(|p| {
            let att = st.peer_attestations.get(&p.node_id);
            let generation = st
                .keyrings
                .get(&p.node_id)
                .and_then(|k| k.minting(now))
                .map(|g| g.generation.0);
            let conns = pool.of(&p.node_id);
            serde_json::json!({
                "node_id": p.node_id.to_string(),
                "name": p.name.as_str(),
                "addresses": p.addresses.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                "segments": att.map(|a| a.segments.clone()),
                "attestation_not_after": att.map(|a| a.not_after.as_secs()),
                "connected": conns.iter().any(|pc| pc.usable()),
                "generation": generation,
                "connections": (!conns.is_empty()).then(|| conns.iter().map(|pc| {
                    let st = pc.conn.stats();
                    serde_json::json!({"side": format!("{:?}", pc.conn.side()), "mtu": st.path.current_mtu, "rtt_us": st.path.rtt.as_micros() as u64,
                                       "cwnd": st.path.cwnd, "lost_packets": st.path.lost_packets, "mtu_probes": [st.path.sent_plpmtud_probes, st.path.lost_plpmtud_probes], "black_holes": st.path.black_holes_detected, "sent_packets": st.path.sent_packets,
                                       "udp_tx": {"datagrams": st.udp_tx.datagrams, "bytes": st.udp_tx.bytes, "ios": st.udp_tx.ios},
                                       "udp_rx": {"datagrams": st.udp_rx.datagrams, "bytes": st.udp_rx.bytes, "ios": st.udp_rx.ios}})
                }).collect::<Vec<_>>()),
            })
        })
        .collect();
    serde_json::json!({
        "node_id": node.local.to_string(),
        "now": now.as_secs(),
        "attestation": own,
        "self_permit": st.self_permit(now).err().map(|e| e.to_string()),
        "verifier_connected": node.verifier_connected(),
        "epoch_secs": st.epoch.as_secs(),
        "revocation_version": st.revocations.as_ref().map(|(v, _, _)| *v),
        "routes": st.table.as_ref().map(|t| t.egress.routes().map(|r| r.name.with_suffix(&st.suffix)).collect::<Vec<_>>()),
        // Per route: the serving node and the relay in between (null: direct), by name.
        "paths": st.table.as_ref().map(|t| t.egress.routes().map(|r| {
            // A serving node behind a relay is not a peer: its id then.
            let name = |id: &hopmesh_protocol::ids::NodeId| {
                st.peers.get(id).map_or_else(|| id.to_string(), |p| p.name.as_str().to_owned())
            };
            serde_json::json!({"name": r.name.with_suffix(&st.suffix), "serving": name(&r.serving_node), "via": r.via.as_ref().map(name)})
        }).collect::<Vec<_>>()),
        "serves": st.table.as_ref().map(|t| t.ingress.entries().map(|e| e.name.with_suffix(&st.suffix)).collect::<Vec<_>>()),
        "peers": peers,
        "counters": node.counters.view(),
    })
}

/// The gauges of `/metrics`: the attestation, revocation version and verifier link that
/// [`show`] reports as `attestation`, `revocation_version` and `verifier_connected`.
pub fn gauges(node: &Shared) -> Gauges {
    let now = node.now();
    let st = node.state_read();
    let own = st.attestation.as_ref().map(|(_, v)| v);
    Gauges {
        attestation_not_after: own.map(|v| v.get().not_after.as_secs()),
        attestation_remaining: own.map(|v| {
            let (not_after, now) = (v.get().not_after.as_secs(), now.as_secs());
            i64::try_from(not_after).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(i64::MAX)
        }),
        attestation_valid: own.is_some_and(|v| crate::state::own_validity(v, now).is_ok()),
        revocation_version: st.revocations.as_ref().map_or(0, |(v, _, _)| *v),
        verifier_connected: node.verifier_connected(),
    }
}

/// The Prometheus text of `/metrics`: the counters and the [`gauges`].
pub fn metrics(node: &Shared) -> String {
    node.counters.render(&gauges(node))
}
