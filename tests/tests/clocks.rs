//! Streams outlive attestation refreshes at any clock offset the design accepts
//! (docs/testing.md, case 41): a paced transfer that spans at least six refreshes at a 10 s
//! attestation TTL, from nodes whose clocks run 5 and 3 s behind, on time, and 3 and 5 s
//! ahead of the verifier's, arrives byte-identical.
//!
//! The app reads slowly on purpose: the echoed bytes wait in the client node's receive
//! window, which is where a renewal from the serving node used to starve for flow-control
//! credit (and the verifier session behind it, which wrote the renewals, stopped refreshing).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_tests::mesh::{Mesh, pattern, sha256, socks_connect};
use hopmesh_transport::clock::SystemClock;
use hopmesh_verifier::authority::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Attestation lifetime: a refresh every 4–6 s.
const TTL: u64 = 10;
/// Node clock offsets in seconds against the verifier's.
const OFFSETS: [(&str, i64); 5] = [
    ("late5", -5),
    ("late3", -3),
    ("ontime", 0),
    ("early3", 3),
    ("early5", 5),
];
/// Bytes each app sends and reads back.
const TOTAL: usize = 14 << 20;
/// The app reads this much ...
const READ_CHUNK: usize = 16 << 10;
/// ... this often: 320 KiB/s, so the transfer takes about 45 s (at least 7 refreshes).
const READ_EVERY: Duration = Duration::from_millis(50);
/// Refreshes a transfer must span.
const MIN_REFRESHES: u64 = 6;

fn serial(mesh: &Mesh, name: &str) -> u64 {
    mesh.node(name).show()["attestation"]["serial"]
        .as_u64()
        .expect("serial")
}

/// Sends `TOTAL` bytes to the echo service and reads them back slowly; returns the SHA-256
/// and length of what came back.
async fn paced_echo(socks: std::net::SocketAddr, seed: u64) -> Result<([u8; 32], usize), String> {
    let tcp = socks_connect(socks, "api.s1.mesh", 80)
        .await
        .map_err(|rep| format!("SOCKS REP {rep}"))?;
    let (mut r, mut w) = tcp.into_split();
    let data = pattern(TOTAL, seed);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(TOTAL);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut tick = tokio::time::interval(READ_EVERY);
    loop {
        tick.tick().await;
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write: {e}"))?;
    Ok((sha256(&back), back.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_transfers_outlive_six_refreshes_at_every_clock_offset() {
    let settings = Settings {
        attestation_ttl: TTL,
        ..Settings::default()
    };
    let extra: String = OFFSETS
        .iter()
        .map(|(name, _)| format!("\n[[node]]\nname = \"{name}\"\nsegments = [\"s1\"]\n"))
        .collect();
    let mut mesh = Mesh::start_with(settings, &extra, &[]).await;
    for (name, offset) in OFFSETS {
        mesh.add_node_with_clock(
            name,
            Arc::new(SystemClock {
                offset_secs: offset,
            }),
        )
        .await;
    }
    for (name, _) in OFFSETS {
        mesh.wait_ready(name).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let transfers: Vec<_> = OFFSETS
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let socks = mesh.node(OFFSETS[i].0).socks;
            tokio::spawn(paced_echo(socks, 41 + i as u64))
        })
        .collect();
    // Each node's own attestation serials while the transfers run (serials are global to
    // the verifier, so count the distinct ones each node held).
    let mut serials: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); OFFSETS.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !transfers.iter().all(|t| t.is_finished()) && tokio::time::Instant::now() < deadline {
        for (i, (name, _)) in OFFSETS.iter().enumerate() {
            serials[i].insert(serial(&mesh, name));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut results = Vec::new();
    for t in transfers {
        let r = tokio::time::timeout(Duration::from_secs(1), t)
            .await
            .expect("transfer finished within 120 s")
            .expect("transfer task");
        results.push(r);
    }
    let mut failures = Vec::new();
    for (i, ((name, offset), result)) in OFFSETS.iter().zip(&results).enumerate() {
        let refreshes = serials[i].len().saturating_sub(1) as u64;
        let expected = (sha256(&pattern(TOTAL, 41 + i as u64)), TOTAL);
        match result {
            Ok(got) if *got == expected && refreshes >= MIN_REFRESHES => {}
            Ok(got) if *got == expected => failures.push(format!(
                "{name} ({offset:+} s): only {refreshes} refreshes during the transfer"
            )),
            Ok((_, len)) => failures.push(format!(
                "{name} ({offset:+} s): {len} of {TOTAL} bytes came back, or other bytes"
            )),
            Err(e) => failures.push(format!("{name} ({offset:+} s): {e}")),
        }
    }
    let audits: Vec<String> = if failures.is_empty() {
        Vec::new()
    } else {
        OFFSETS
            .iter()
            .map(|(n, _)| *n)
            .chain(["a", "b", "c"])
            .flat_map(|n| mesh.node(n).audit())
            .filter(|r| r["event"] == "peer_closed")
            .map(|r| r.to_string())
            .collect()
    };
    mesh.shutdown().await;
    assert!(
        failures.is_empty(),
        "{failures:#?}\npeer_closed records: {audits:#?}"
    );
}
