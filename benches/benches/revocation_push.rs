//! Revocation push latency: a verifier in process, 20 subscribed test nodes on 127.0.0.1,
//! then a series of revocations; for each, the time from the revoke call until each
//! subscriber holds the new signed list. Target: p99 ≤ 200 ms.
//!
//! `cargo bench -p hopmesh-benches --bench revocation_push` (under `cargo test` it runs a
//! short smoke version).

use std::time::{Duration, Instant};

use hopmesh_protocol::enrollment::Push;
use hopmesh_tests::{GOOD_MEASUREMENT, VerifierHarness, standard_policy};
use hopmesh_verifier::authority::{NodeRef, Settings};

const SUBSCRIBERS: usize = 20;

/// The standard test policy plus segment `s` (no allow rule: no route pushes) with `n`
/// nodes `n0`, `n1`, ….
fn policy(n: usize) -> String {
    let mut p = standard_policy() + "\n[[segment]]\nname = \"s\"\n";
    for i in 0..n {
        p += &format!("[[node]]\nname = \"n{i}\"\nsegments = [\"s\"]\n");
    }
    p
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let revocations = if bench { 50 } else { 3 };
    let h = VerifierHarness::start(&policy(SUBSCRIBERS + revocations), Settings::default()).await;
    let mut streams = Vec::new();
    let mut keep = Vec::new();
    for i in 0..SUBSCRIBERS {
        let node = h.node().await;
        node.enroll(
            h.join_token(&format!("n{i}"), 60),
            GOOD_MEASUREMENT,
            h.now(),
        )
        .await
        .expect("enroll");
        let mut s = node.subscribe().await.expect("subscribe");
        while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(200), s.next()).await
        {
        }
        streams.push(s);
        keep.push(node);
    }
    for i in 0..revocations {
        let node = h.node().await;
        node.enroll(
            h.join_token(&format!("n{}", SUBSCRIBERS + i), 60),
            GOOD_MEASUREMENT,
            h.now(),
        )
        .await
        .expect("enroll");
        keep.push(node);
    }
    // Drain the route updates the enrollments caused.
    for s in &mut streams {
        while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(100), s.next()).await
        {
        }
    }

    let mut samples = Vec::new();
    for i in 0..revocations {
        let target = NodeRef::Name(format!("n{}", SUBSCRIBERS + i).parse().expect("name"));
        let started = Instant::now();
        let now = h.now();
        let version = h
            .shared()
            .authority()
            .revoke(&target, now)
            .expect("revoke")
            .revocation_version;
        let waits = streams.iter_mut().map(|s| async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Ok(Some(Push::Revocations { list }))) => {
                        let payload = &list[hopmesh_protocol::attestation::ENVELOPE_HEADER_LEN..];
                        let l: hopmesh_protocol::attestation::RevocationList =
                            postcard::from_bytes(payload).expect("list");
                        if l.version == version {
                            return started.elapsed();
                        }
                    }
                    Ok(Ok(Some(_))) => continue,
                    other => panic!("push stream failed: {other:?}"),
                }
            }
        });
        let mut got = Vec::new();
        for w in waits {
            got.push(w.await);
        }
        samples.extend(got);
        // Let route updates settle between rounds.
        for s in &mut streams {
            while let Ok(Ok(Some(_))) =
                tokio::time::timeout(Duration::from_millis(20), s.next()).await
            {}
        }
    }
    samples.sort();
    println!("| subscribers | revocations | samples | p50 | p99 | max |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| {SUBSCRIBERS} | {revocations} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}
