//! Where the store lives (`--store`), and the decision how to reach a PostgreSQL server: a
//! pure function of the URL and whether a CA file was given, tested without a network.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};

use super::StoreError;
use super::postgres::PG_CONNECT_TIMEOUT;

/// Where the verifier's durable state lives.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum StoreSpec {
    /// `DIR/store.db` in the data directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database.
    Postgres(PgTarget),
}

impl StoreSpec {
    /// Parses `--store` (`sqlite`, or a `postgres://` / `postgresql://` URL) and `--store-ca`
    /// (a PEM file of the CA that signed the server's certificate). The URL is checked here
    /// (syntax, hosts, TLS) so that a bad one fails before anything is created.
    pub fn parse(store: Option<&str>, ca: Option<&Path>) -> Result<Self, StoreError> {
        match store.map(str::trim) {
            None | Some("" | "sqlite") => match ca {
                Some(_) => Err(StoreError::Config(
                    "--store-ca applies to a PostgreSQL store only".into(),
                )),
                None => Ok(Self::Sqlite),
            },
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let target = PgTarget {
                    url: url.to_owned(),
                    ca: ca.map(Path::to_owned),
                };
                target.config()?;
                Ok(Self::Postgres(target))
            }
            Some(_) => Err(StoreError::Config(
                "--store must be `sqlite` or a postgres:// URL".into(),
            )),
        }
    }
}

/// A PostgreSQL database and how to trust its server.
#[derive(Clone, PartialEq, Eq)]
pub struct PgTarget {
    /// The connection URL (may hold a password: never logged; see [`PgTarget::describe`]).
    pub url: String,
    /// The CA file that must have signed the server's certificate.
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("server", &self.describe())
            .field("ca", &self.ca)
            .finish()
    }
}

/// How the connection to the PostgreSQL server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPlan {
    /// No TLS: a unix socket, or a loopback address without a CA file.
    Plain,
    /// TLS required, the server's certificate verified against the CA file and the host name.
    Verify,
}

fn is_loopback(host: &Host) -> Option<bool> {
    match host {
        Host::Unix(_) => None,
        Host::Tcp(name) => Some(
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()),
        ),
    }
}

/// Decides how to reach the server. Unix sockets are plain (the kernel is the channel; a CA
/// file is refused as meaningless). Any non-loopback TCP host needs a CA file: the state of the
/// trust root never crosses a network unencrypted or to an unverified server. Loopback TCP is
/// plain unless a CA file is given. `sslmode=disable` with a CA file, or `sslmode=require`
/// without one (TLS to any server at all), is refused rather than silently overridden.
pub fn plan_tls(
    hosts: &[Host],
    hostaddrs: &[IpAddr],
    ssl_mode: SslMode,
    ca_given: bool,
) -> Result<TlsPlan, String> {
    if hosts.is_empty() && hostaddrs.is_empty() {
        return Err("the store URL names no host (a TCP host or a unix socket directory)".into());
    }
    let kinds: Vec<Option<bool>> = hosts.iter().map(is_loopback).collect();
    let unix = kinds.iter().all(Option::is_none) && hostaddrs.is_empty();
    let remote = kinds.contains(&Some(false)) || hostaddrs.iter().any(|a| !a.is_loopback());
    if unix {
        return match ca_given {
            true => Err("--store-ca given, but the store is reached over a unix socket".into()),
            false => Ok(TlsPlan::Plain),
        };
    }
    match (ssl_mode, ca_given) {
        (SslMode::Disable, true) => Err("sslmode=disable contradicts --store-ca".into()),
        (SslMode::Disable, false) if remote => {
            Err("sslmode=disable to a non-loopback host: the store needs TLS there".into())
        }
        (_, true) => Ok(TlsPlan::Verify),
        (_, false) if remote => Err(
            "a non-loopback PostgreSQL host needs --store-ca FILE (the CA that signed the \
             server's certificate)"
                .into(),
        ),
        (SslMode::Require, false) => {
            Err("sslmode=require needs --store-ca FILE to verify the server".into())
        }
        (_, false) => Ok(TlsPlan::Plain),
    }
}

/// Keepalive idle time, probe interval and probes: an idle connection to a dead server or
/// path is noticed within about 10 + 3 × 2 = 16 s.
const PG_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const PG_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const PG_KEEPALIVE_RETRIES: u32 = 3;
/// Data unacknowledged this long ends the connection (`TCP_USER_TIMEOUT`).
const PG_TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The server ends a session idle inside a transaction this long
/// (`idle_in_transaction_session_timeout`): a replica cut off between a transaction's first
/// row lock and its commit would otherwise hold the change counter's row lock, and so stall
/// every replica's writes, until the server noticed the dead connection.
pub const PG_IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// Session settings sent at connect (`options`): the server probes with the same keepalives
/// as the client, so a partitioned replica's sessions (and its serve lock) end on the server
/// within about 16 s too, rather than after the server's default of two hours, and a healed
/// replica can take its lock again; and [`PG_IDLE_IN_TRANSACTION`]. Ignored by the server on
/// unix sockets, where no partition can happen.
fn server_session_options() -> String {
    format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
         -c tcp_user_timeout={} -c idle_in_transaction_session_timeout={}",
        PG_KEEPALIVE_IDLE.as_secs(),
        PG_KEEPALIVE_INTERVAL.as_secs(),
        PG_KEEPALIVE_RETRIES,
        PG_TCP_USER_TIMEOUT.as_millis(),
        PG_IDLE_IN_TRANSACTION.as_millis(),
    )
}

impl PgTarget {
    /// The client configuration (timeouts and keepalives set, `sslmode` made explicit) and how
    /// TLS is used.
    pub fn config(&self) -> Result<(tokio_postgres::Config, TlsPlan), StoreError> {
        let mut cfg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Config(format!("the store URL does not parse: {e}")))?;
        let plan = plan_tls(
            cfg.get_hosts(),
            cfg.get_hostaddrs(),
            cfg.get_ssl_mode(),
            self.ca.is_some(),
        )
        .map_err(StoreError::Config)?;
        cfg.ssl_mode(match plan {
            TlsPlan::Plain => SslMode::Disable,
            TlsPlan::Verify => SslMode::Require,
        });
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        cfg.keepalives(true)
            .keepalives_idle(PG_KEEPALIVE_IDLE)
            .keepalives_interval(PG_KEEPALIVE_INTERVAL)
            .keepalives_retries(PG_KEEPALIVE_RETRIES)
            .tcp_user_timeout(PG_TCP_USER_TIMEOUT);
        if cfg.get_application_name().is_none() {
            cfg.application_name("hopmesh-verifier");
        }
        // The operator's own `options` come last, so they win where they set the same.
        let options = match cfg.get_options() {
            Some(own) => format!("{} {own}", server_session_options()),
            None => server_session_options(),
        };
        cfg.options(&options);
        Ok((cfg, plan))
    }

    /// The server and database, without user or password: what logs and errors show.
    pub fn describe(&self) -> String {
        let Ok(cfg) = self.url.parse::<tokio_postgres::Config>() else {
            return "an unparsable URL".into();
        };
        let hosts: Vec<String> = cfg
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(n) => n.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        format!(
            "postgres {} database {}",
            hosts.join(","),
            cfg.get_dbname().unwrap_or("(default)")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(url: &str, ca: bool) -> Result<TlsPlan, String> {
        let cfg: tokio_postgres::Config = url.parse().expect("parses");
        plan_tls(cfg.get_hosts(), cfg.get_hostaddrs(), cfg.get_ssl_mode(), ca)
    }

    #[test]
    fn the_server_is_asked_to_probe_and_to_end_idle_transactions_and_the_operator_wins() {
        let target = |url: &str| PgTarget {
            url: url.into(),
            ca: None,
        };
        let (cfg, _) = target("postgresql://u@127.0.0.1/db")
            .config()
            .expect("config");
        let ours = cfg.get_options().expect("options").to_owned();
        for want in [
            "-c tcp_keepalives_idle=10 ",
            "-c tcp_keepalives_interval=2 ",
            "-c tcp_keepalives_count=3 ",
            "-c tcp_user_timeout=10000 ",
            "-c idle_in_transaction_session_timeout=10000",
        ] {
            assert!(ours.contains(want), "{want} in {ours}");
        }
        let (cfg, _) = target("postgresql://u@127.0.0.1/db?options=-c%20tcp_keepalives_idle%3D30")
            .config()
            .expect("config");
        let both = cfg.get_options().expect("options");
        assert_eq!(both, format!("{ours} -c tcp_keepalives_idle=30"));
    }

    #[test]
    fn tls_is_decided_by_where_the_server_is() {
        use TlsPlan::{Plain, Verify};
        let cases: &[(&str, bool, Result<TlsPlan, &str>)] = &[
            ("postgresql://u@%2Frun%2Fpg/db", false, Ok(Plain)),
            ("postgresql:///db?host=/run/pg", true, Err("unix socket")),
            ("postgresql://u@127.0.0.1:5432/db", false, Ok(Plain)),
            ("postgresql://u@localhost/db", false, Ok(Plain)),
            ("postgresql://u@[::1]/db", false, Ok(Plain)),
            ("postgresql://u@127.0.0.1/db", true, Ok(Verify)),
            (
                "postgresql://u@127.0.0.1/db?sslmode=require",
                false,
                Err("sslmode=require"),
            ),
            (
                "postgresql://u@127.0.0.1/db?sslmode=disable",
                true,
                Err("contradicts"),
            ),
            (
                "postgresql://u@db.internal/db",
                false,
                Err("needs --store-ca"),
            ),
            ("postgresql://u@10.0.0.5/db", false, Err("needs --store-ca")),
            ("postgresql://u@10.0.0.5/db", true, Ok(Verify)),
            (
                "postgresql://u@10.0.0.5/db?sslmode=disable",
                false,
                Err("needs TLS"),
            ),
            (
                "postgresql://u@127.0.0.1,10.0.0.5/db",
                false,
                Err("needs --store-ca"),
            ),
            ("postgresql:///db", false, Err("no host")),
        ];
        for (url, ca, want) in cases {
            let got = plan(url, *ca);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{url} ca={ca}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{url} ca={ca}: {g}"),
                _ => panic!("{url} ca={ca}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn store_flags_parse_with_clear_errors() {
        assert_eq!(
            StoreSpec::parse(None, None).expect("default"),
            StoreSpec::Sqlite
        );
        assert_eq!(
            StoreSpec::parse(Some("sqlite"), None).expect("sqlite"),
            StoreSpec::Sqlite
        );
        let ca = Path::new("/etc/ca.pem");
        for (store, ca, want) in [
            (None, Some(ca), "PostgreSQL store only"),
            (Some("mysql://x"), None, "must be `sqlite`"),
            (Some("postgres://u@h:notaport/db"), None, "does not parse"),
            (Some("postgres://u@db.example/db"), None, "needs --store-ca"),
        ] {
            let e = StoreSpec::parse(store, ca).expect_err("refused");
            assert!(e.to_string().contains(want), "{store:?}: {e}");
        }
        let StoreSpec::Postgres(t) =
            StoreSpec::parse(Some("postgres://u:hunter2@127.0.0.1/hm"), None).expect("pg")
        else {
            panic!("not postgres");
        };
        let (cfg, plan) = t.config().expect("config");
        assert_eq!(plan, TlsPlan::Plain);
        assert_eq!(cfg.get_ssl_mode(), SslMode::Disable);
        assert_eq!(cfg.get_connect_timeout(), Some(&PG_CONNECT_TIMEOUT));
        let shown = format!("{t:?} {}", t.describe());
        assert!(
            !shown.contains("hunter2"),
            "the password never shows: {shown}"
        );
        assert!(
            shown.contains("127.0.0.1") && shown.contains("hm"),
            "{shown}"
        );
    }
}
