//! The verifier's data directory.
//!
//! ```text
//! DIR/signing.key   Ed25519 PKCS#8, 0600: signs attestations and revocation lists
//! DIR/tls.key       Ed25519 PKCS#8, 0600: the node-facing QUIC endpoint's TLS key
//! DIR/master.key    32 random bytes, 0600: every pair seed derives from it
//! DIR/admin.token   hex bearer token, 0600: the admin API's credential
//! DIR/store.db      SQLite store (WAL), unless the store is PostgreSQL (`--store postgres://…`)
//! DIR/store.postgres  present when the store is PostgreSQL (no URL, no password: a marker
//!                   so that a command without `--store` fails with the reason)
//! DIR/audit.jsonl   hash-chained audit log (the active file; rotated ones are
//!                   audit.jsonl.<first seq>; its signed head is anchored in the store)
//! DIR/pins.json     what nodes pin (public)
//! DIR/admin.addr    the admin API's address while `serve` runs
//! ```

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hopmesh_protocol::replica_bundle::{self, BundleContents};
use hopmesh_protocol::secret::MasterSecret;
use hopmesh_transport::audit::{self, AuditLog, AuditOptions, ChainSummary};
use hopmesh_transport::identity::{Identity, write_secret_file};
use hopmesh_transport::pins::Pins;
use hopmesh_transport::tls::spki_pin;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::VerifierError;
use crate::store::{PostgresStore, SqliteStore, Store, StoreSpec};

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    store: StoreSpec,
}

/// The marker file of a data directory whose store is PostgreSQL.
const PG_MARKER: &str = "store.postgres";

/// Everything `serve` needs from the data directory.
#[derive(Debug)]
pub struct Opened {
    /// Signing identity.
    pub signing: Identity,
    /// TLS identity.
    pub tls: Identity,
    /// Master secret.
    pub master: MasterSecret,
    /// Admin bearer token.
    pub admin_token: String,
    /// The store.
    pub store: Box<dyn Store>,
    /// The audit log.
    pub audit: AuditLog,
}

fn random32() -> Result<[u8; 32], VerifierError> {
    random_array()
}

fn random_array<const N: usize>() -> Result<[u8; N], VerifierError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| VerifierError::Config("OS random generator failed".into()))?;
    Ok(b)
}

impl DataDir {
    /// The directory at `root`, its store `DIR/store.db`.
    pub fn new(root: &Path) -> Self {
        Self::with_store(root, StoreSpec::Sqlite)
    }

    /// The directory at `root` with its store at `store`.
    pub fn with_store(root: &Path, store: StoreSpec) -> Self {
        Self {
            root: root.to_owned(),
            store,
        }
    }

    /// A file inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates keys, token, store and pins. Refuses if a store already exists, with one
    /// exception: a data directory whose store is PostgreSQL may be initialised again, which
    /// migrates that database's schema (this mesh's only; never another mesh's database).
    pub fn init(&self) -> Result<Pins, VerifierError> {
        let keys_exist = self.file("signing.key").exists();
        if let (StoreSpec::Postgres(target), true) = (&self.store, keys_exist) {
            if !self.file(PG_MARKER).exists() {
                return Err(self.occupied());
            }
            let signing = Identity::load(&self.file("signing.key"))?;
            let outcome = PostgresStore::migrate(target, &signing.verifying_key().0)?;
            tracing::info!(?outcome, store = %target.describe(), "store schema checked");
            return self.pins();
        }
        if self.file("store.db").exists() || keys_exist {
            return Err(self.occupied());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| VerifierError::io(format!("create {}", self.root.display()), e))?;
        let signing = Identity::generate()?;
        let tls = Identity::generate()?;
        if let StoreSpec::Sqlite = &self.store {
            drop(SqliteStore::create(&self.file("store.db"))?);
        }
        signing.save_new(&self.file("signing.key"))?;
        tls.save_new(&self.file("tls.key"))?;
        write_secret_file(&self.file("master.key"), &random32()?)?;
        write_secret_file(
            &self.file("admin.token"),
            hex::encode(random32()?).as_bytes(),
        )?;
        if let StoreSpec::Postgres(target) = &self.store {
            // Bound to the keys only once they are on disk; a database that refuses (another
            // mesh's, unreachable) takes the new keys with it, so init can simply run again.
            if let Err(e) = PostgresStore::init(target, &signing.verifying_key().0) {
                for f in ["signing.key", "tls.key", "master.key", "admin.token"] {
                    let _ = fs::remove_file(self.file(f));
                }
                return Err(e.into());
            }
            self.write_pg_marker()?;
        }
        let pins = Pins {
            verifier_tls_spki_sha256: hex::encode(spki_pin(&tls.spki())),
            signing_keys: vec![hex::encode(signing.verifying_key().0)],
        };
        let json = serde_json::to_string_pretty(&pins)
            .map_err(|e| VerifierError::Config(e.to_string()))?;
        fs::write(self.file("pins.json"), json + "\n")
            .map_err(|e| VerifierError::io("write pins.json", e))?;
        Ok(pins)
    }

    /// `replica export`: the signing key, the seed master secret and the pins, sealed with
    /// `passphrase` (see `hopmesh_protocol::replica_bundle`). What a replica needs and nothing
    /// else: no TLS key (each replica has its own), no admin token, no store.
    pub fn export_bundle(&self, passphrase: &[u8]) -> Result<Vec<u8>, VerifierError> {
        let signing = read_secret(&self.file("signing.key"))?;
        let master: [u8; 32] = read_secret(&self.file("master.key"))?
            .try_into()
            .map_err(|_| VerifierError::Config("master.key must hold exactly 32 bytes".into()))?;
        let pins = self.pins()?;
        let bad_pins = |e: hopmesh_transport::pins::PinsError| {
            VerifierError::Config(format!("pins.json: {e}"))
        };
        let contents = BundleContents {
            signing_pkcs8: Zeroizing::new(signing),
            master_secret: Zeroizing::new(master),
            verifier_tls_pin: pins.tls_pin().map_err(bad_pins)?,
            signing_keys: pins
                .signing_keys()
                .map_err(bad_pins)?
                .into_iter()
                .map(|k| k.0)
                .collect(),
        };
        replica_bundle::seal(
            &contents,
            passphrase,
            random_array()?,
            random_array()?,
            replica_bundle::PBKDF2_ITERATIONS,
        )
        .map_err(|e| VerifierError::Config(format!("replica bundle: {e}")))
    }

    /// `init --replica-of FILE`: a new replica's data directory from a bundle. Its store must
    /// be the PostgreSQL database the first verifier initialised (same mesh); it gets a TLS
    /// key and an admin token of its own and the mesh's pins, so nodes accept it unchanged.
    pub fn init_replica(&self, bundle: &[u8], passphrase: &[u8]) -> Result<Pins, VerifierError> {
        let StoreSpec::Postgres(target) = &self.store else {
            return Err(VerifierError::Config(
                "a replica shares a PostgreSQL store: pass --store postgres://...".into(),
            ));
        };
        if self.file("signing.key").exists() || self.file("store.db").exists() {
            return Err(self.occupied());
        }
        let contents = replica_bundle::open(bundle, passphrase)
            .map_err(|e| VerifierError::Config(format!("replica bundle: {e}")))?;
        let signing = Identity::from_pkcs8(&contents.signing_pkcs8)?;
        let key = signing.verifying_key();
        if !contents.signing_keys.contains(&key.0) {
            return Err(VerifierError::Config(
                "replica bundle: its signing key is not among its pinned keys".into(),
            ));
        }
        let tls = Identity::generate()?;
        // The database must already be this mesh's (a replica never creates one).
        drop(PostgresStore::open(
            target,
            &key.0,
            &replica_name(&tls),
            false,
        )?);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| VerifierError::io(format!("create {}", self.root.display()), e))?;
        signing.save_new(&self.file("signing.key"))?;
        tls.save_new(&self.file("tls.key"))?;
        write_secret_file(&self.file("master.key"), &contents.master_secret[..])?;
        write_secret_file(
            &self.file("admin.token"),
            hex::encode(random32()?).as_bytes(),
        )?;
        self.write_pg_marker()?;
        let pins = Pins {
            verifier_tls_spki_sha256: hex::encode(contents.verifier_tls_pin),
            signing_keys: contents.signing_keys.iter().map(hex::encode).collect(),
        };
        let json = serde_json::to_string_pretty(&pins)
            .map_err(|e| VerifierError::Config(e.to_string()))?;
        fs::write(self.file("pins.json"), json + "\n")
            .map_err(|e| VerifierError::io("write pins.json", e))?;
        Ok(pins)
    }

    fn write_pg_marker(&self) -> Result<(), VerifierError> {
        fs::write(
            self.file(PG_MARKER),
            "This verifier's store is in PostgreSQL: pass --store postgres://... \
             (or HOPMESH_VERIFIER_STORE).\n",
        )
        .map_err(|e| VerifierError::io(format!("write {PG_MARKER}"), e))
    }

    fn occupied(&self) -> VerifierError {
        VerifierError::Config(format!(
            "{} already holds a verifier; refusing to overwrite it",
            self.root.display()
        ))
    }

    /// Opens the store this directory names. A serving verifier opens it `exclusive`ly (see
    /// [`PostgresStore::open`]). Refuses a mismatch: `--store` missing for a PostgreSQL
    /// store, or given for a directory that holds a SQLite one.
    fn open_store(
        &self,
        signing: &Identity,
        tls: &Identity,
        exclusive: bool,
    ) -> Result<Box<dyn Store>, VerifierError> {
        match &self.store {
            StoreSpec::Sqlite => {
                if !self.file("store.db").exists() && self.file(PG_MARKER).exists() {
                    return Err(VerifierError::Config(format!(
                        "{}: this verifier's store is in PostgreSQL; pass --store postgres://... \
                         (or set HOPMESH_VERIFIER_STORE)",
                        self.root.display()
                    )));
                }
                Ok(Box::new(SqliteStore::open(&self.file("store.db"))?))
            }
            StoreSpec::Postgres(target) => {
                if self.file("store.db").exists() {
                    return Err(VerifierError::Config(format!(
                        "{} holds a SQLite store (store.db); it is not moved to PostgreSQL by \
                         --store",
                        self.root.display()
                    )));
                }
                Ok(Box::new(PostgresStore::open(
                    target,
                    &signing.verifying_key().0,
                    &replica_name(tls),
                    exclusive,
                )?))
            }
        }
    }

    /// Opens everything `serve` needs; refuses a missing or corrupt store, a broken audit
    /// chain, an audit log that does not reach the head anchored in the store (records cut
    /// from the tail, or the active file rewritten), or key files readable by others.
    pub fn open(&self) -> Result<Opened, VerifierError> {
        let signing = Identity::load(&self.file("signing.key"))?;
        let tls = Identity::load(&self.file("tls.key"))?;
        let store = self.open_store(&signing, &tls, true)?;
        let master = read_secret(&self.file("master.key"))?;
        let master: [u8; 32] = master
            .try_into()
            .map_err(|_| VerifierError::Config("master.key must hold exactly 32 bytes".into()))?;
        let admin_token = String::from_utf8(read_secret(&self.file("admin.token"))?)
            .map_err(|_| VerifierError::Config("admin.token is not text".into()))?
            .trim()
            .to_owned();
        let anchor = store.audit_anchor()?;
        if let Some(a) = &anchor {
            let keys = hopmesh_protocol::attestation::KeySet::new(vec![signing.verifying_key()])
                .map_err(|e| VerifierError::Config(e.to_string()))?;
            a.check(&keys).map_err(|e| {
                VerifierError::Config(format!(
                    "the audit anchor in the store does not verify: {e}"
                ))
            })?;
        }
        let opts = AuditOptions {
            anchor: anchor.map(|a| a.head()),
            ..AuditOptions::default()
        };
        let (audit, repaired) = AuditLog::open_with(&self.file("audit.jsonl"), &opts)?;
        if repaired {
            tracing::warn!("audit log ended in a partial record (crash mid-write); it was dropped");
        }
        Ok(Opened {
            signing,
            tls,
            master: MasterSecret::from_bytes(master),
            admin_token,
            store,
            audit,
        })
    }

    /// `audit verify`: walks the whole audit chain (every rotated file), checks every signed
    /// checkpoint record against the pinned signing keys (`pins.json`), and checks that the
    /// chain reaches the signed head anchored in the store with the anchored hash. Fails on a
    /// broken chain, a missing file, a truncated tail or a rewritten (even re-chained) log.
    pub fn verify_audit(&self) -> Result<AuditReport, VerifierError> {
        let keys = self
            .pins()?
            .key_set()
            .map_err(|e| VerifierError::Config(format!("pins.json: {e}")))?;
        let signing = Identity::load(&self.file("signing.key"))?;
        let tls = Identity::load(&self.file("tls.key"))?;
        let anchor = self.open_store(&signing, &tls, false)?.audit_anchor()?;
        if let Some(a) = &anchor {
            a.check(&keys).map_err(|e| {
                VerifierError::Config(format!(
                    "the audit anchor in the store does not verify: {e}"
                ))
            })?;
        }
        let head = anchor.as_ref().map(|a| a.head());
        let summary = audit::verify_anchored(
            &self.file("audit.jsonl"),
            head.as_ref(),
            &mut audit::check_checkpoints(&keys),
        )?;
        Ok(AuditReport {
            summary,
            anchored_seq: anchor.map(|a| a.seq),
        })
    }

    /// The pins written at init.
    pub fn pins(&self) -> Result<Pins, VerifierError> {
        let text = fs::read_to_string(self.file("pins.json"))
            .map_err(|e| VerifierError::io("read pins.json", e))?;
        serde_json::from_str(&text).map_err(|e| VerifierError::Config(format!("pins.json: {e}")))
    }

    /// The admin token (for the CLI).
    pub fn admin_token(&self) -> Result<String, VerifierError> {
        let raw = read_secret(&self.file("admin.token"))?;
        Ok(String::from_utf8_lossy(&raw).trim().to_owned())
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The chain.
    pub summary: ChainSummary,
    /// The seq anchored in the store (None: nothing durable was audited yet).
    pub anchored_seq: Option<u64>,
}

/// The name a verifier goes by in a shared store (its audit anchor's owner): the hex of
/// `SHA-256` of its TLS key's SPKI, its TLS pin.
pub fn replica_name(tls: &Identity) -> String {
    hex::encode(spki_pin(&tls.spki()))
}

/// A passphrase from a file that only its owner can read (a final newline is not part of it).
pub fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>, VerifierError> {
    let mut bytes = read_secret(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(Zeroizing::new(bytes))
}

fn read_secret(path: &Path) -> Result<Vec<u8>, VerifierError> {
    let meta =
        fs::metadata(path).map_err(|e| VerifierError::io(format!("read {}", path.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(VerifierError::Config(format!(
            "{}: must not be readable by group or others (chmod 600)",
            path.display()
        )));
    }
    fs::read(path).map_err(|e| VerifierError::io(format!("read {}", path.display()), e))
}
