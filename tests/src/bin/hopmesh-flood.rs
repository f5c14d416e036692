//! `hopmesh-flood VERIFIER PINS SECS MAX`: the netns suite's unauthenticated flooder. For SECS
//! seconds (at most 120) it opens connections to the verifier in batches of 64, each with a
//! fresh self-signed key and no join secret, at most MAX (at most 20 000) in all; on every
//! connection it gets, it opens idle bidirectional streams and tries unidirectional streams
//! with data it never finishes. It holds what it got until SECS are over, then closes
//! everything and prints one JSON line: attempted, handshakes, held (still served at the end).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hopmesh_tests::flood::{Flooder, open_idle_bidi, uni_stream_attack};
use hopmesh_transport::pins::Pins;

/// Connections opened at once.
const BATCH: usize = 64;
/// Upper bounds on the arguments.
const MAX_SECS: u64 = 120;
const MAX_CONNECTIONS: usize = 20_000;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (
        args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(2)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<Pins>(&t).ok()),
        args.get(3).and_then(|s| s.parse::<u64>().ok()),
        args.get(4).and_then(|s| s.parse::<usize>().ok()),
    );
    let (Some(verifier), Some(pins), Some(secs), Some(max)) = parsed else {
        eprintln!("usage: hopmesh-flood VERIFIER_ADDR PINS_JSON SECS MAX_CONNECTIONS");
        return std::process::ExitCode::from(2);
    };
    let secs = secs.min(MAX_SECS);
    let max = max.min(MAX_CONNECTIONS);
    let local: SocketAddr = if verifier.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("wildcard");
    let mut flood = Flooder::bound(verifier, &pins, local);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut attempted, mut handshakes) = (0usize, 0usize);
    let mut streams = tokio::task::JoinSet::new();
    while Instant::now() < end && attempted < max {
        let n = BATCH.min(max - attempted);
        attempted += n;
        let before = flood.conns.len();
        handshakes += flood.open(n).await;
        for c in &flood.conns[before..] {
            let c = c.clone();
            streams.spawn(async move {
                let bidi = open_idle_bidi(&c, 100, Duration::from_secs(2)).await;
                let uni = uni_stream_attack(&c, 100, 64 << 10, Duration::from_secs(2)).await;
                (bidi, uni)
            });
        }
    }
    let (mut bidi, mut uni) = (0usize, 0usize);
    while let Some(r) = streams.join_next().await {
        if let Ok((b, u)) = r {
            bidi += b;
            uni += u;
        }
    }
    tokio::time::sleep_until(end.into()).await;
    let held = flood.alive().await;
    println!(
        "{}",
        serde_json::json!({"attempted": attempted, "handshakes": handshakes, "held": held,
            "bidi_streams": bidi, "uni_streams": uni})
    );
    flood.shutdown().await;
    std::process::ExitCode::SUCCESS
}
