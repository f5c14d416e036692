//! The node end to end: SOCKS → node → QUIC → node → backend, on 127.0.0.1.

use std::sync::Arc;
use std::time::Duration;

use hopmesh_tests::mesh::{Mesh, echo_through, pattern, sha256, socks_connect};
use hopmesh_verifier::authority::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_round_trip_through_the_mesh() {
    let mesh = Mesh::start(Settings::default()).await;
    let data = Arc::new(pattern(1 << 20, 7));
    let tcp = socks_connect(mesh.node("a").socks, "api.s1.mesh", 80).await.expect("socks connect");
    let back = tokio::time::timeout(Duration::from_secs(30), echo_through(tcp, data.clone())).await.expect("in time").expect("io");
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256(&back), sha256(&data));
    let a = mesh.node("a").show();
    let b = mesh.node("b").show();
    assert_eq!(a["counters"]["streams_opened"], 1, "{a}");
    assert_eq!(b["counters"]["streams_accepted"], 1, "{b}");
    assert_eq!(a["counters"]["bytes_out"], 1 << 20);
    assert_eq!(a["counters"]["bytes_in"], 1 << 20);
    mesh.shutdown().await;
}
