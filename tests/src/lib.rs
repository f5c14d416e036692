//! Test harness: a verifier and test nodes in one process, on 127.0.0.1 port 0, with a clock
//! the test can move.

pub mod attacker;
pub mod flood;
pub mod mesh;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use hopmesh_protocol::enrollment::{Address, HostFacts};
use hopmesh_protocol::ids::{Measurement, NodeName};
use hopmesh_protocol::secret::JoinSecret;
use hopmesh_protocol::time::{Clock, UnixTime};
use hopmesh_protocol::wire::{BoundedString, BoundedVec};
use hopmesh_transport::clock::SystemClock;
use hopmesh_transport::identity::Identity;
use hopmesh_transport::pins::Pins;
use hopmesh_transport::verifier_client::{ClientError, PushStream, VerifierClient};
use hopmesh_verifier::admin::AdminClient;
use hopmesh_verifier::authority::Settings;
use hopmesh_verifier::datadir::DataDir;
use hopmesh_verifier::error::VerifierError;
use hopmesh_verifier::store::StoreSpec;
use hopmesh_verifier::{Running, ServeOptions, start};

/// The measurement test nodes present.
pub const GOOD_MEASUREMENT: Measurement = Measurement([0x11; 32]);

/// `tests/fixtures/standard-policy.toml` as written: the one standard test policy, with
/// placeholders. Fill it with [`standard_policy_with`]; variants append TOML to the result.
pub const STANDARD_POLICY_TEMPLATE: &str = include_str!("../fixtures/standard-policy.toml");

/// How a filled standard policy attests nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attest {
    /// `measurements = ["<this>"]`.
    Pinned(Measurement),
    /// `allow_any_measurement = true` (in-process nodes measure the test binary).
    Any,
}

/// The standard test policy (docs/testing.md, "Standard topology": a, b in s1; c in s2; api.s1 on b, db.s1
/// on a, web.s2 on c; s1 -> s1 and s1 -> web.s2) with `attest` and the three backends.
pub fn standard_policy_with(attest: Attest, api: &str, db: &str, web: &str) -> String {
    const PINNED: &str = "measurements = [\"{measurement}\"]";
    assert!(
        STANDARD_POLICY_TEMPLATE.contains(PINNED),
        "the fixture lost its measurements line"
    );
    let attestation = match attest {
        Attest::Pinned(m) => format!("measurements = [\"{m}\"]"),
        Attest::Any => "allow_any_measurement = true".to_owned(),
    };
    let text = STANDARD_POLICY_TEMPLATE
        .replace(PINNED, &attestation)
        .replace("{api}", api)
        .replace("{db}", db)
        .replace("{web}", web);
    assert!(
        !text.contains("\"{"),
        "a placeholder of the policy fixture is not filled"
    );
    text
}

/// The standard test policy, nodes pinned to [`GOOD_MEASUREMENT`]; backends on unused
/// loopback ports (the verifier never connects to them).
pub fn standard_policy() -> String {
    standard_policy_with(
        Attest::Pinned(GOOD_MEASUREMENT),
        "127.0.0.1:18080",
        "127.0.0.1:18082",
        "127.0.0.1:18081",
    )
}

/// A clock the test can move forward or back.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset: AtomicI64,
}

impl ManualClock {
    /// Moves the clock by `secs`.
    pub fn advance(&self, secs: i64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        SystemClock {
            offset_secs: self.offset.load(Ordering::SeqCst),
        }
        .now()
    }
}

/// A verifier running in this process.
#[derive(Debug)]
pub struct VerifierHarness {
    /// Its data directory (deleted on drop).
    pub dir: tempfile::TempDir,
    /// The policy file.
    pub policy_path: PathBuf,
    /// The pins nodes use.
    pub pins: Pins,
    /// The clock.
    pub clock: Arc<ManualClock>,
    /// Settings used.
    pub settings: Settings,
    /// The running verifier (None while stopped).
    pub running: Option<Running>,
    /// Where its store is.
    pub store: StoreSpec,
    last_addr: Option<std::net::SocketAddr>,
}

impl VerifierHarness {
    /// Initialises a data dir and starts a verifier with `policy`.
    pub async fn start(policy: &str, settings: Settings) -> Self {
        Self::start_on(policy, settings, StoreSpec::Sqlite).await
    }

    /// [`Self::start`] with the store at `store`.
    pub async fn start_on(policy: &str, settings: Settings, store: StoreSpec) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = DataDir::with_store(dir.path(), store.clone())
            .init()
            .expect("init");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).expect("write policy");
        let mut h = Self {
            dir,
            policy_path,
            pins,
            clock: Arc::new(ManualClock::default()),
            settings,
            running: None,
            store,
            last_addr: None,
        };
        h.restart().await.expect("start verifier");
        h
    }

    /// A second verifier serving the same PostgreSQL store beside this one: the mesh's secrets
    /// moved by a replica bundle, a TLS key of its own, the same policy and clock.
    pub async fn replica(&self) -> Self {
        let pass = b"a replica bundle passphrase for tests";
        let bundle = DataDir::new(self.dir.path())
            .export_bundle(pass)
            .expect("export a replica bundle");
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = DataDir::with_store(dir.path(), self.store.clone())
            .init_replica(&bundle, pass)
            .expect("init the replica");
        let policy_path = dir.path().join("policy.toml");
        std::fs::copy(&self.policy_path, &policy_path).expect("copy the policy");
        let mut h = Self {
            dir,
            policy_path,
            pins,
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            running: None,
            store: self.store.clone(),
            last_addr: None,
        };
        h.restart().await.expect("start the replica");
        h
    }

    /// (Re)starts the verifier, on the QUIC port it had before (nodes keep its address).
    pub async fn restart(&mut self) -> Result<(), VerifierError> {
        if let Some(r) = self.running.take() {
            self.last_addr = Some(r.node_addr);
            r.shutdown().await;
        }
        let udp = match self.last_addr {
            Some(addr) => UdpSocket::bind(addr).expect("rebind the verifier's port"),
            None => UdpSocket::bind("127.0.0.1:0").expect("bind udp"),
        };
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tcp");
        let opts = ServeOptions {
            settings: self.settings.clone(),
            policy_path: self.policy_path.clone(),
            clock: self.clock.clone(),
            store: self.store.clone(),
        };
        self.running = Some(start(self.dir.path(), opts, udp, tcp).await?);
        Ok(())
    }

    /// Stops the verifier (a later [`restart`](Self::restart) reuses its port).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            self.last_addr = Some(r.node_addr);
            r.shutdown().await;
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("verifier is running")
    }

    /// The verifier's node-facing QUIC address.
    pub fn node_addr(&self) -> std::net::SocketAddr {
        self.running().node_addr
    }

    /// Now on the verifier's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// A join secret for `name`.
    pub fn join_token(&self, name: &str, ttl: u64) -> JoinSecret {
        let now = self.now();
        self.running()
            .shared
            .authority()
            .create_join_token(&NodeName::new(name).expect("name"), None, ttl, now)
            .expect("join token")
            .0
    }

    /// An admin API client.
    pub fn admin(&self) -> AdminClient {
        let token = DataDir::new(self.dir.path()).admin_token().expect("token");
        AdminClient::new(&self.running().admin_addr.to_string(), &token)
    }

    /// The shared verifier state.
    pub fn shared(&self) -> &Arc<hopmesh_verifier::Shared> {
        &self.running().shared
    }

    /// A new test node (fresh key) connected to the verifier.
    pub async fn node(&self) -> TestNode {
        TestNode::connect(self, Identity::generate().expect("identity")).await
    }
}

/// The node side of the verifier protocol, as a test drives it.
#[derive(Debug)]
pub struct TestNode {
    /// Its key.
    pub identity: Identity,
    /// Its endpoint.
    pub endpoint: quinn::Endpoint,
    /// Its verifier connection.
    pub client: VerifierClient,
}

/// One advertised address.
pub fn addresses() -> BoundedVec<Address, 4> {
    BoundedVec::new(vec![BoundedString::truncated("127.0.0.1:4433")]).expect("fits")
}

impl TestNode {
    /// Connects `identity` to the harness's verifier.
    pub async fn connect(h: &VerifierHarness, identity: Identity) -> Self {
        let endpoint =
            hopmesh_transport::quic::endpoint(UdpSocket::bind("127.0.0.1:0").expect("bind"), None)
                .expect("endpoint");
        let client = VerifierClient::connect(&endpoint, h.running().node_addr, &identity, &h.pins)
            .await
            .expect("connect");
        Self {
            identity,
            endpoint,
            client,
        }
    }

    /// Enrolls with `secret` and `measurement`.
    pub async fn enroll(
        &self,
        secret: JoinSecret,
        measurement: Measurement,
        now: UnixTime,
    ) -> Result<hopmesh_protocol::attestation::VerifiedAttestation, ClientError> {
        let facts = HostFacts {
            hostname: BoundedString::truncated("test"),
            platform: BoundedString::truncated("linux/test"),
            version: BoundedString::truncated("0"),
        };
        self.client
            .enroll(secret, measurement, facts, addresses(), now)
            .await
            .map(|(_, v)| v)
    }

    /// Refreshes with `measurement`.
    pub async fn refresh(
        &self,
        measurement: Measurement,
        now: UnixTime,
    ) -> Result<hopmesh_protocol::attestation::VerifiedAttestation, ClientError> {
        self.client
            .refresh(measurement, addresses(), now)
            .await
            .map(|(_, v)| v)
    }

    /// Opens the push stream.
    pub async fn subscribe(&self) -> Result<PushStream, ClientError> {
        self.client.subscribe().await
    }
}

/// Follows a node's routing table on its push stream as a node does
/// (`hopmesh_protocol::table_sync`): parts reassembled, snapshots and deltas applied. Feed it
/// every push of the stream from the subscribe on (other pushes are skipped).
#[derive(Debug, Default)]
pub struct TableFollower {
    assembler: hopmesh_protocol::table_sync::TableAssembler,
    held: Option<hopmesh_protocol::table_sync::SyncedTable>,
}

impl TableFollower {
    /// Takes `pushes` in order; returns how many table updates they completed and applied.
    pub fn feed(
        &mut self,
        pushes: &[hopmesh_protocol::enrollment::Push],
    ) -> Result<usize, hopmesh_protocol::table_sync::TableSyncError> {
        use hopmesh_protocol::enrollment::Push;
        use hopmesh_protocol::table_sync::SyncedTable;
        let mut applied = 0;
        for p in pushes {
            let Push::TablePart(part) = p else {
                continue;
            };
            if let Some(update) = self.assembler.push(part)? {
                self.held = Some(SyncedTable::apply_to(self.held.as_ref(), &update)?);
                applied += 1;
            }
        }
        Ok(applied)
    }

    /// The table held (None before the first snapshot).
    pub fn synced(&self) -> Option<&hopmesh_protocol::table_sync::SyncedTable> {
        self.held.as_ref()
    }

    /// The routing table held.
    pub fn table(&self) -> Option<hopmesh_protocol::routing::RoutingTable> {
        self.held.as_ref().map(|t| t.table().0)
    }
}
