//! `hopmesh-verifier`: initialise, serve, and administer a verifier.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hopmesh_protocol::hop_token::EpochLength;
use hopmesh_transport::clock::SystemClock;
use hopmesh_verifier::admin::{AdminClient, DEFAULT_JOIN_TTL};
use hopmesh_verifier::admin_addr::{AdminAddr, AdminListener};
use hopmesh_verifier::authority::{CompromiseMode, Settings};
use hopmesh_verifier::datadir::{DataDir, read_passphrase};
use hopmesh_verifier::service::ConnectionBudgets;
use hopmesh_verifier::store::StoreSpec;
use hopmesh_verifier::{ServeOptions, start};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "hopmesh-verifier",
    version,
    about = "The hopmesh verifier: attestation, policy and revocation"
)]
struct Cli {
    /// The verifier's data directory.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/hopmesh-verifier",
        env = "HOPMESH_VERIFIER_DIR"
    )]
    data_dir: PathBuf,
    /// The store: `sqlite` (`store.db` in the data directory) or a PostgreSQL URL
    /// (`postgresql://user@host/db`; unix sockets as `postgresql://user@%2Frun%2Fpostgresql/db`).
    /// Pass it in the environment so that a password in it stays out of `ps`.
    #[arg(
        long,
        global = true,
        default_value = "sqlite",
        env = "HOPMESH_VERIFIER_STORE",
        hide_env_values = true
    )]
    store: String,
    /// The CA (PEM) that signed the PostgreSQL server's certificate: required for a
    /// non-loopback host; TLS is then required and the certificate and host name verified.
    #[arg(long, global = true, env = "HOPMESH_VERIFIER_STORE_CA")]
    store_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnCompromise {
    AutoReissue,
    AlertOnly,
}

/// Highest `--max-node-connections`: past it the budget stops being one (each connection
/// can hold its stream windows and push queue).
const MAX_NODE_CONNECTIONS_FLAG: usize = 1 << 20;

#[derive(Subcommand)]
enum Command {
    /// Create keys, admin token and store; print the pins nodes need (JSON). With
    /// `--replica-of`, a replica of an existing verifier instead (same PostgreSQL store).
    Init {
        /// A bundle from `replica export`: this data directory becomes a replica (its own TLS
        /// key and admin token; the mesh's signing key, seed master secret and pins).
        #[arg(long, requires = "passphrase_file")]
        replica_of: Option<PathBuf>,
        /// The bundle's passphrase, in a file only its owner can read (mode 0600).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Replicas: what they share, moved by the operator.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Run the verifier.
    Serve {
        /// The policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
        /// Node-facing QUIC address.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Admin API: `unix` (the socket `admin.sock` in the data directory, mode 0600),
        /// `unix:PATH`, or a loopback IP:PORT (any other address is refused).
        #[arg(long, default_value = "unix")]
        admin_listen: String,
        /// Attestation lifetime in seconds.
        #[arg(long, default_value_t = 300)]
        attestation_ttl: u64,
        /// Hop-token epoch length in seconds (1-60).
        #[arg(long, default_value_t = 10)]
        epoch: u64,
        /// Pair-seed generation lifetime in seconds.
        #[arg(long, default_value_t = 300)]
        generation: u64,
        /// What to do on a reported compromised key use.
        #[arg(long, value_enum, default_value = "auto-reissue")]
        on_compromise: OnCompromise,
        /// Connections of enrolled nodes held at once (past it a node's connection is
        /// refused, counted in `connection_refusals{reason="enrolled_full"}`).
        #[arg(long, default_value_t = hopmesh_verifier::service::MAX_ENROLLED)]
        max_node_connections: usize,
        /// Test only: seconds added to the system clock.
        #[arg(long, default_value_t = 0, hide = true, allow_hyphen_values = true)]
        clock_offset: i64,
    },
    /// Join secrets.
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
    /// List enrolled nodes.
    Nodes,
    /// Revoke a node (by name or id): its credentials die and its key is banned.
    Revoke {
        /// Node name or 64-hex node id.
        node: String,
    },
    /// Ban a node's key and name for good (revokes it too).
    Ban {
        /// Node name or 64-hex node id.
        node: String,
    },
    /// Issue a new seed generation for one pair; the old one is marked compromised.
    Reissue {
        /// The two nodes.
        #[arg(long, num_args = 2, value_names = ["A", "B"])]
        pair: Vec<String>,
    },
    /// Policy operations.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Show audit records, or verify the audit chain.
    Audit {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
    /// Packaging: write man pages, or print shell completions, generated from this CLI.
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// Write `hopmesh-verifier.1` and one page per subcommand into a directory.
    Man {
        /// The directory (created if missing).
        out_dir: PathBuf,
    },
    /// Print the completion script for a shell.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Seal the signing key, seed master secret and pins into FILE (mode 0600) with a
    /// passphrase (at least 16 bytes), for `init --replica-of FILE` on a new replica.
    Export {
        /// The bundle to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// The passphrase, in a file only its owner can read (mode 0600).
        #[arg(long)]
        passphrase_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum JoinTokenCommand {
    /// Create a one-time join secret bound to a node name.
    Create {
        /// The node name (must be in the policy).
        #[arg(long)]
        name: String,
        /// Segments the node must have in policy (comma-separated).
        #[arg(long, value_delimiter = ',')]
        segments: Option<Vec<String>>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = DEFAULT_JOIN_TTL)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Re-read the policy file; only changed routing tables are pushed.
    Reload,
    /// Check a policy file without loading it.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the local audit log: hash chain across rotated files, signed checkpoints, and
    /// the head anchored in the store (exit 1 if edited, truncated or rewritten).
    Verify,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd stderr goes to the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .context("start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on; no backtrace.
            eprintln!("hopmesh-verifier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn admin(dir: &Path) -> Result<AdminClient> {
    let data = DataDir::new(dir);
    let addr = std::fs::read_to_string(data.file("admin.addr")).with_context(|| {
        format!(
            "no running verifier found in {} (admin.addr missing)",
            dir.display()
        )
    })?;
    Ok(AdminClient::new(addr.trim(), &data.admin_token()?))
}

async fn call(dir: &Path, method: &str, path: &str, body: Option<Value>) -> Result<()> {
    let v = admin(dir)
        .await?
        .call(method, path, body)
        .await
        .map_err(anyhow::Error::msg)?;
    print(&v);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let dir = cli.data_dir.as_path();
    let store = || StoreSpec::parse(Some(&cli.store), cli.store_ca.as_deref());
    match cli.command {
        Command::Init {
            replica_of: None,
            passphrase_file,
        } => {
            if passphrase_file.is_some() {
                bail!("--passphrase-file goes with --replica-of");
            }
            let pins = DataDir::with_store(dir, store()?).init()?;
            print(&json!(pins));
        }
        Command::Init {
            replica_of: Some(bundle),
            passphrase_file,
        } => {
            let pass = passphrase_file.context("--replica-of needs --passphrase-file")?;
            let pass = read_passphrase(&pass)?;
            let bytes = std::fs::read(&bundle)
                .with_context(|| format!("read the bundle {}", bundle.display()))?;
            let pins = DataDir::with_store(dir, store()?).init_replica(&bytes, &pass)?;
            print(&json!(pins));
        }
        Command::Replica {
            command:
                ReplicaCommand::Export {
                    out,
                    passphrase_file,
                },
        } => {
            let pass = read_passphrase(&passphrase_file)?;
            let sealed = DataDir::new(dir).export_bundle(&pass)?;
            hopmesh_transport::identity::write_secret_file(&out, &sealed)
                .with_context(|| format!("write the bundle {}", out.display()))?;
            print(&json!({"ok": true, "bundle": out, "bytes": sealed.len()}));
        }
        Command::Serve {
            policy,
            listen,
            admin_listen,
            attestation_ttl,
            epoch,
            generation,
            on_compromise,
            max_node_connections,
            clock_offset,
        } => {
            if !(1..=MAX_NODE_CONNECTIONS_FLAG).contains(&max_node_connections) {
                bail!("--max-node-connections must be 1 to {MAX_NODE_CONNECTIONS_FLAG}");
            }
            if !(10..=86_400).contains(&attestation_ttl) {
                bail!("--attestation-ttl must be 10 to 86400 seconds");
            }
            if !(10..=86_400).contains(&generation) {
                bail!("--generation must be 10 to 86400 seconds");
            }
            let settings = Settings {
                attestation_ttl,
                epoch: EpochLength::from_secs(epoch)?,
                generation_secs: generation,
                on_compromise: match on_compromise {
                    OnCompromise::AutoReissue => CompromiseMode::AutoReissue,
                    OnCompromise::AlertOnly => CompromiseMode::AlertOnly,
                },
                connections: ConnectionBudgets {
                    max_enrolled: max_node_connections,
                    ..ConnectionBudgets::default()
                },
                ..Settings::default()
            };
            let udp = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
            let admin_addr = AdminAddr::parse(&admin_listen, dir)
                .with_context(|| format!("--admin-listen {admin_listen}"))?;
            let admin = AdminListener::bind(&admin_addr)
                .await
                .with_context(|| format!("bind the admin API at {admin_addr}"))?;
            let opts = ServeOptions {
                settings,
                policy_path: policy,
                clock: Arc::new(SystemClock {
                    offset_secs: clock_offset,
                }),
                store: store()?,
            };
            let running = start(dir, opts, udp, admin).await?;
            println!(
                "{}",
                json!({"node_addr": running.node_addr, "admin_addr": running.admin_addr.to_string()})
            );
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            loop {
                tokio::select! {
                    _ = hup.recv() => match running.shared.reload_policy() {
                        Ok(r) => tracing::info!(nodes_changed = r.nodes_changed, pairs_added = r.pairs_added, pairs_removed = r.pairs_removed, added = ?r.added, removed = ?r.removed, "policy reloaded"),
                        Err(e) => tracing::error!(error = %e, "policy reload failed; keeping the old policy"),
                    },
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            let _ = std::fs::remove_file(DataDir::new(dir).file("admin.addr"));
            running.shutdown().await;
        }
        Command::JoinToken {
            command:
                JoinTokenCommand::Create {
                    name,
                    segments,
                    ttl,
                },
        } => {
            call(
                dir,
                "POST",
                "/v1/join-tokens",
                Some(json!({"name": name, "segments": segments, "ttl_secs": ttl})),
            )
            .await?;
        }
        Command::Nodes => call(dir, "GET", "/v1/nodes", None).await?,
        Command::Revoke { node } => {
            call(dir, "POST", "/v1/revoke", Some(json!({"node": node}))).await?
        }
        Command::Ban { node } => call(dir, "POST", "/v1/ban", Some(json!({"node": node}))).await?,
        Command::Reissue { pair } => {
            let [a, b] = <[String; 2]>::try_from(pair)
                .map_err(|_| anyhow::anyhow!("--pair takes two nodes"))?;
            call(dir, "POST", "/v1/reissue", Some(json!({"a": a, "b": b}))).await?;
        }
        Command::Policy {
            command: PolicyCommand::Reload,
        } => call(dir, "POST", "/v1/policy/reload", None).await?,
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let p = hopmesh_protocol::policy::Policy::parse(&text)?;
            print(
                &json!({"ok": true, "segments": p.segments.len(), "nodes": p.nodes.len(), "services": p.services.len(), "rules": p.rules.len()}),
            );
        }
        Command::Audit {
            command: Some(AuditCommand::Verify),
            ..
        } => {
            // Chain, every rotated file, signed checkpoints and the store's anchor; exit 1 if
            // anything was edited, removed, cut from the tail or rewritten.
            let r = DataDir::with_store(dir, store()?).verify_audit()?;
            print(
                &json!({"ok": true, "records": r.summary.records, "last_hash": r.summary.last_hash,
                "files": r.summary.files, "checkpoints": r.summary.checkpoints, "anchored_seq": r.anchored_seq}),
            );
        }
        Command::Audit {
            since,
            command: None,
        } => call(dir, "GET", &format!("/v1/audit?since={since}"), None).await?,
        Command::Generate {
            what: Generate::Man { out_dir },
        } => {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("create {}", out_dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &out_dir)
                .with_context(|| format!("write man pages into {}", out_dir.display()))?;
        }
        Command::Generate {
            what: Generate::Completion { shell },
        } => clap_complete::generate(
            shell,
            &mut Cli::command(),
            "hopmesh-verifier",
            &mut std::io::stdout(),
        ),
    }
    Ok(())
}
