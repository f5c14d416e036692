//! `hopmesh-node`: enroll, run, and inspect a node.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::{CommandFactory, Parser, Subcommand};
use hopmesh_node::config::NodeConfig;
use hopmesh_node::enroll::{JOIN_TOKEN_ENV, read_join_secret};
use hopmesh_node::runtime::{Sockets, start};
use hopmesh_protocol::time::Clock;
use hopmesh_transport::clock::SystemClock;
use hopmesh_transport::pins::Pins;

/// jemalloc, not glibc malloc: the receive path allocates one buffer per datagram (quinn copies
/// each into its own `BytesMut`), 64 KiB each on loopback. glibc returned the freed top of the
/// heap to the kernel and faulted it back in at once: page faults were 29 % of the receiving
/// node's CPU (perf, 1 GiB transfer). jemalloc keeps freed pages for reuse; the same transfer
/// took 13 % less CPU, and idle RSS stayed at 10.5 MiB.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "hopmesh-node",
    version,
    about = "A hopmesh node: encrypted overlay and local SOCKS5 endpoint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the node key and enroll with a one-time join secret.
    Enroll {
        /// Take the data directory, verifier and advertised addresses from this node config
        /// file (the one `run` uses) instead of the flags.
        #[arg(long, conflicts_with_all = ["data_dir", "verifier", "advertise"])]
        config: Option<PathBuf>,
        /// Data directory.
        #[arg(long, required_unless_present = "config")]
        data_dir: Option<PathBuf>,
        /// Verifier host:port.
        #[arg(long, required_unless_present = "config")]
        verifier: Option<String>,
        /// A file holding the join secret (64 hex digits) from `hopmesh-verifier join-token
        /// create`; `-` reads it from stdin. Without it, the secret is read from the
        /// environment variable HOPMESH_JOIN_TOKEN. Never on the command line: other users can
        /// read a process's arguments.
        #[arg(long, value_name = "PATH|-")]
        join_token_file: Option<PathBuf>,
        /// The pins JSON printed by `hopmesh-verifier init`.
        #[arg(long)]
        pins: PathBuf,
        /// Addresses peers dial (host:port), as in the config file.
        #[arg(long)]
        advertise: Vec<String>,
    },
    /// Run the node.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a running node.
    Ctl {
        /// Data directory of the node.
        #[arg(long)]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// The node's audit log.
    Audit {
        /// Data directory of the node.
        #[arg(long)]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: AuditCommand,
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
    /// Write `hopmesh-node.1` and one page per subcommand into a directory.
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
enum AuditCommand {
    /// Verify the audit log: hash chain across rotated files and the head anchored in
    /// `audit.anchor` (exit 1 if edited, truncated or rewritten).
    Verify,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Print the node's exact state as JSON.
    Show,
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
    // `run` sizes its runtime from the config file; everything else is one short task.
    let threads = match &cli.command {
        Command::Run { config } => match NodeConfig::load(config) {
            Ok(c) => c.threads,
            Err(e) => {
                eprintln!("hopmesh-node: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => 1,
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hopmesh-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Enroll {
            config,
            data_dir,
            verifier,
            join_token_file,
            pins,
            advertise,
        } => {
            let (data_dir, verifiers, advertise) = match config {
                Some(path) => {
                    let c = NodeConfig::load(&path)?;
                    (c.data_dir, c.verifiers, c.advertise)
                }
                // clap requires both flags when there is no --config.
                None => (
                    data_dir.ok_or_else(|| anyhow!("--data-dir is required"))?,
                    vec![verifier.ok_or_else(|| anyhow!("--verifier is required"))?],
                    advertise,
                ),
            };
            let (join_secret, _) = read_join_secret(
                join_token_file.as_deref(),
                std::env::var(JOIN_TOKEN_ENV).ok(),
                std::io::stdin(),
            )
            .map_err(anyhow::Error::msg)?;
            let pins: Pins = serde_json::from_str(
                &std::fs::read_to_string(&pins)
                    .with_context(|| format!("read {}", pins.display()))?,
            )
            .context("pins file")?;
            let measurement =
                hopmesh_node::datadir::self_measurement().context("measure own executable")?;
            // The first listed verifier that can be reached. Only an unreachable one is
            // skipped: any answer (an enrolment, or a refusal every replica would repeat) ends
            // the search.
            let mut out = Err(anyhow!("no verifier listed"));
            for verifier in &verifiers {
                let addr = match tokio::net::lookup_host(verifier).await {
                    Ok(mut a) => a.next(),
                    Err(e) => {
                        eprintln!("resolve {verifier}: {e}");
                        None
                    }
                };
                let Some(addr) = addr else {
                    out = Err(anyhow!("{verifier} has no address"));
                    continue;
                };
                let tried = hopmesh_node::enroll::enroll(
                    &data_dir,
                    addr,
                    join_secret.clone(),
                    &pins,
                    &advertise,
                    measurement,
                    SystemClock::default().now(),
                )
                .await;
                let unreachable = matches!(
                    &tried,
                    Err(hopmesh_node::NodeError::Verifier(
                        hopmesh_transport::verifier_client::ClientError::Connect(_)
                    ))
                );
                out = tried.with_context(|| format!("enroll at {verifier}"));
                if !unreachable {
                    break;
                }
                if let Err(e) = &out {
                    eprintln!("{e:#}");
                }
            }
            let out = out?;
            println!(
                "{}",
                serde_json::json!({"node_id": out.node_id.to_string(), "name": out.name, "attestation_not_after": out.not_after.as_secs()})
            );
        }
        Command::Run { config } => {
            let config = NodeConfig::load(&config)?;
            let quic = std::net::UdpSocket::bind(config.listen)
                .with_context(|| format!("bind {}", config.listen))?;
            let socks = tokio::net::TcpListener::bind(config.socks)
                .await
                .with_context(|| format!("bind {}", config.socks))?;
            let clock = Arc::new(SystemClock {
                offset_secs: config.clock_offset,
            });
            let tap = hopmesh_node::relay_tap::EnvTap::from_env().map_err(anyhow::Error::msg)?;
            let handle = start(config, Sockets { quic, socks }, clock).await?;
            if let Some(tap) = tap {
                tracing::warn!(
                    "TEST HOOK: relayed bytes are dumped or changed ({}, {}); never in production",
                    hopmesh_node::relay_tap::DUMP_VAR,
                    hopmesh_node::relay_tap::FLIP_VAR
                );
                handle.node.set_relay_tap(Arc::new(tap));
            }
            println!(
                "{}",
                serde_json::json!({"node_id": handle.node.local.to_string(), "quic": handle.quic_addr, "socks": handle.socks_addr})
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            handle.shutdown().await;
            // The last line: a supervisor (or the netns suite) can tell a drained exit from a crash.
            println!("{}", serde_json::json!({"stopped": true}));
        }
        Command::Ctl {
            data_dir,
            command: CtlCommand::Show,
        } => {
            let v = hopmesh_node::ctl::request(&data_dir, "show")
                .await
                .with_context(|| format!("no running node at {}", data_dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Audit {
            data_dir,
            command: AuditCommand::Verify,
        } => {
            let dir = hopmesh_node::datadir::NodeDir::new(&data_dir);
            let (s, anchor) = hopmesh_node::datadir::verify_audit(&dir)?;
            println!(
                "{}",
                serde_json::json!({"ok": true, "records": s.records, "last_hash": s.last_hash,
                    "files": s.files, "anchored_seq": anchor.map(|a| a.seq)})
            );
        }
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
            "hopmesh-node",
            &mut std::io::stdout(),
        ),
    }
    Ok(())
}
