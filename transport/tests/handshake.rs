//! Handshake behaviour on 127.0.0.1 port 0: authorization, pinning, no resumption.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hopmesh_protocol::ids::NodeId;
use hopmesh_transport::identity::{Identity, SNI};
use hopmesh_transport::quic::{
    self, endpoint, peer_node_id, quinn_client, quinn_server, transport_config,
};
use hopmesh_transport::tls::{self, ALPN_CONTROL, ALPN_DATA, PeerAuthorizer, ServerExpectation};

#[derive(Debug, Default)]
struct Gate {
    calls: AtomicUsize,
    refuse: AtomicBool,
}

impl PeerAuthorizer for Gate {
    fn authorize(&self, _: &NodeId, _: &[u8]) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse.load(Ordering::SeqCst) {
            Err("revoked".into())
        } else {
            Ok(())
        }
    }
}

fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind loopback")
}

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_config(
        Duration::from_secs(5),
        Duration::from_secs(1),
    ))
}

struct Server {
    endpoint: quinn::Endpoint,
    identity: Identity,
    gate: Arc<Gate>,
}

fn server(alpn: &[u8]) -> Server {
    let identity = Identity::generate().expect("identity");
    let gate = Arc::new(Gate::default());
    let tls = tls::server_config(&identity, alpn, gate.clone()).expect("tls");
    let endpoint =
        endpoint(udp(), Some(quinn_server(tls, transport()).expect("quinn"))).expect("endpoint");
    Server {
        endpoint,
        identity,
        gate,
    }
}

/// Accepts connections and answers each first stream with one byte, until aborted.
fn serve(endpoint: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                if let Ok((mut send, _recv)) = conn.accept_bi().await {
                    let _ = send.write_all(&[42]).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            });
        }
    })
}

async fn dial(
    client: &Identity,
    server: &Server,
    alpn: &[u8],
    expect: ServerExpectation,
) -> anyhow::Result<u8> {
    let ep = endpoint(udp(), None)?;
    let cfg = quinn_client(tls::client_config(client, alpn, expect)?, transport())?;
    let conn = ep
        .connect_with(cfg, server.endpoint.local_addr()?, SNI)?
        .await?;
    // A refused client certificate only shows on the first stream operation (docs/design.md, pitfall 1).
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[1]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b)).await??;
    assert_eq!(peer_node_id(&conn), Some(server.identity.node_id()));
    conn.close(quic::codes::SHUTDOWN, b"done");
    ep.wait_idle().await;
    Ok(b[0])
}

#[tokio::test]
async fn authorized_peers_connect_and_refused_ones_do_not() {
    let s = server(ALPN_DATA);
    let task = serve(s.endpoint.clone());
    let client = Identity::generate().expect("identity");
    let allow_all: Arc<dyn PeerAuthorizer> = Arc::new(Gate::default());
    let expect = ServerExpectation::Node(s.identity.node_id(), allow_all.clone());
    assert_eq!(
        dial(&client, &s, ALPN_DATA, expect.clone())
            .await
            .expect("connects"),
        42
    );

    s.gate.refuse.store(true, Ordering::SeqCst);
    assert!(
        dial(&client, &s, ALPN_DATA, expect).await.is_err(),
        "refused client must not get a stream through"
    );

    // Dialing a different node than the one reached fails on the client side.
    s.gate.refuse.store(false, Ordering::SeqCst);
    let wrong = ServerExpectation::Node(NodeId::from_bytes([7; 32]), allow_all);
    assert!(dial(&client, &s, ALPN_DATA, wrong).await.is_err());
    task.abort();
}

/// Every connection runs both verifiers: no session resumption, no 0-RTT (docs/design.md, pitfall 3).
#[tokio::test]
async fn every_connection_runs_a_full_handshake() {
    let s = server(ALPN_DATA);
    let task = serve(s.endpoint.clone());
    let client = Identity::generate().expect("identity");
    let client_gate = Arc::new(Gate::default());
    for round in 1..=3 {
        let expect = ServerExpectation::Node(s.identity.node_id(), client_gate.clone());
        dial(&client, &s, ALPN_DATA, expect)
            .await
            .expect("connects");
        assert_eq!(
            s.gate.calls.load(Ordering::SeqCst),
            round,
            "server verifier ran on connection {round}"
        );
        assert_eq!(
            client_gate.calls.load(Ordering::SeqCst),
            round,
            "client verifier ran on connection {round}"
        );
    }
    // Revoke between two connections: the next one must fail.
    s.gate.refuse.store(true, Ordering::SeqCst);
    let expect = ServerExpectation::Node(s.identity.node_id(), client_gate.clone());
    assert!(dial(&client, &s, ALPN_DATA, expect).await.is_err());
    task.abort();
}

#[tokio::test]
async fn pinned_server_and_alpn_mismatch() {
    let s = server(ALPN_CONTROL);
    let task = serve(s.endpoint.clone());
    let client = Identity::generate().expect("identity");
    let pin = tls::spki_pin(&s.identity.spki());
    assert_eq!(
        dial(&client, &s, ALPN_CONTROL, ServerExpectation::Pinned(pin))
            .await
            .expect("pinned"),
        42
    );
    let mut wrong = pin;
    wrong[0] ^= 1;
    assert!(
        dial(&client, &s, ALPN_CONTROL, ServerExpectation::Pinned(wrong))
            .await
            .is_err(),
        "spoofed verifier"
    );
    assert!(
        dial(&client, &s, ALPN_DATA, ServerExpectation::Pinned(pin))
            .await
            .is_err(),
        "ALPN mismatch"
    );
    task.abort();
}

/// A verifier replica with a TLS key of its own, certified by the mesh's signing key: a client
/// that pinned another verifier's key and that signing key accepts it; one that pinned
/// another signing key refuses it, and so does a client that only pins the key.
#[tokio::test]
async fn a_replica_certified_by_the_pinned_signing_key_is_accepted() {
    use hopmesh_transport::clock::SystemClock;
    use hopmesh_transport::verifier_cert::CertifiedTlsKey;
    let signing = Identity::generate().expect("signing");
    let first_verifier = Identity::generate().expect("first verifier's TLS key");
    let replica_tls = Identity::generate().expect("replica TLS key");
    let certs = CertifiedTlsKey::new(
        signing.try_clone().expect("copy"),
        replica_tls.try_clone().expect("copy"),
        Arc::new(SystemClock::default()),
    )
    .expect("certify");
    let gate = Arc::new(Gate::default());
    let tls = tls::server_config_with(Arc::new(certs), ALPN_CONTROL, gate.clone()).expect("tls");
    let s = Server {
        endpoint: endpoint(udp(), Some(quinn_server(tls, transport()).expect("quinn")))
            .expect("endpoint"),
        identity: replica_tls,
        gate,
    };
    let task = serve(s.endpoint.clone());
    let client = Identity::generate().expect("identity");
    let pin = tls::spki_pin(&first_verifier.spki());
    let expect = |keys: Vec<_>| ServerExpectation::Verifier {
        pin,
        signing_keys: keys,
    };
    assert_eq!(
        dial(
            &client,
            &s,
            ALPN_CONTROL,
            expect(vec![signing.verifying_key()])
        )
        .await
        .expect("certified replica"),
        42
    );
    let other = Identity::generate().expect("other mesh");
    let e = dial(
        &client,
        &s,
        ALPN_CONTROL,
        expect(vec![other.verifying_key()]),
    )
    .await
    .expect_err("certified by another mesh's key");
    assert!(format!("{e:#}").contains("certif"), "{e:#}");
    assert!(
        dial(&client, &s, ALPN_CONTROL, ServerExpectation::Pinned(pin))
            .await
            .is_err(),
        "a pin alone does not accept a replica"
    );
    // The pin still admits the first verifier's own key, certified or not.
    let own = tls::spki_pin(&s.identity.spki());
    let e2 = ServerExpectation::Verifier {
        pin: own,
        signing_keys: vec![other.verifying_key()],
    };
    assert_eq!(
        dial(&client, &s, ALPN_CONTROL, e2).await.expect("pinned"),
        42
    );
    task.abort();
}
