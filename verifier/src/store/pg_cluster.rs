//! Test support: a throwaway PostgreSQL cluster in a temp dir (initdb, pg_ctl), run as the
//! `postgres` user when the tests run as root, reached over a unix socket in that dir and,
//! with [`PgCluster::start_tls`], over TLS on a 127.0.0.1 port. Stopped (`pg_ctl stop -m
//! immediate`) and removed when the last handle is dropped.
//!
//! Missing PostgreSQL fails the test with a message naming the Debian package, unless
//! `HOPMESH_SKIP_POSTGRES=1` (refused when `CI` is set: CI must run these tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A running cluster.
#[derive(Debug)]
pub(crate) struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Owner of the cluster's files when the tests run as root.
    run_as: Option<String>,
    /// The CA that signed the server's certificate (TLS clusters).
    ca: Option<PathBuf>,
}

static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// `initdb`'s directory: `HOPMESH_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else
/// `PATH`.
fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HOPMESH_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

fn skip_requested() -> bool {
    let skip = std::env::var("HOPMESH_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    assert!(
        !(skip && std::env::var_os("CI").is_some()),
        "HOPMESH_SKIP_POSTGRES=1 is refused in CI: the PostgreSQL tests must run there"
    );
    skip
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgCluster {
    /// The cluster shared by the tests of this process (started by the first that needs it,
    /// stopped when the last handle is dropped), or `None` when skipping was requested.
    pub(crate) fn shared() -> Option<Arc<Self>> {
        if skip_requested() {
            return None;
        }
        let mut slot = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = slot.upgrade() {
            return Some(c);
        }
        let c = Arc::new(Self::start(false));
        *slot = Arc::downgrade(&c);
        Some(c)
    }

    /// A cluster of its own (a test that stops and restarts it), or `None` when skipping.
    pub(crate) fn start_private() -> Option<Self> {
        (!skip_requested()).then(|| Self::start(false))
    }

    /// [`Self::start_private`] with `fsync` on, as a real server runs (the benchmarks); the
    /// test clusters run with it off.
    #[allow(dead_code)] // used by benches/benches/verifier.rs, which includes this file by path
    pub(crate) fn start_durable() -> Option<Self> {
        (!skip_requested()).then(|| Self::start_with(false, true))
    }

    /// Stops the server (`pg_ctl stop -m fast`): clients see their connections closed and new
    /// ones refused, as when the database host goes down.
    pub(crate) fn stop(&self) {
        run(
            self.command("pg_ctl")
                .args(["-w", "-t", "60", "-m", "fast", "-D"])
                .arg(self.dir.path().join("data"))
                .arg("stop"),
            "pg_ctl stop",
        );
    }

    /// Starts the server again after [`Self::stop`].
    pub(crate) fn restart(&self) {
        run(
            self.command("pg_ctl")
                .args(["-w", "-t", "60", "-l"])
                .arg(self.dir.path().join("log"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("start"),
            "pg_ctl start",
        );
    }

    /// A cluster of its own that also listens on 127.0.0.1 with TLS (its CA at [`Self::ca`]).
    pub(crate) fn start_tls() -> Option<Self> {
        (!skip_requested()).then(|| Self::start(true))
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn start(tls: bool) -> Self {
        Self::start_with(tls, false)
    }

    fn start_with(tls: bool, durable: bool) -> Self {
        let bin = find_bin().unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed: install the Debian package `postgresql` \
                 (apt-get install postgresql), or set HOPMESH_SKIP_POSTGRES=1 to skip the \
                 PostgreSQL store tests"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("hopmesh-pg-")
            .tempdir()
            .expect("tempdir");
        let run_as = is_root().then(|| "postgres".to_owned());
        let mut cluster = Self {
            dir,
            bin,
            port: free_port(),
            run_as,
            ca: None,
        };
        if let Some(user) = &cluster.run_as {
            run(
                Command::new("chown").arg(user).arg(cluster.dir.path()),
                "chown the cluster dir",
            );
        }
        let data = cluster.dir.path().join("data");
        run(
            cluster
                .command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        let mut conf = format!(
            "unix_socket_directories = '{}'\nport = {}\nfsync = {}\nmax_connections = 200\n",
            cluster.dir.path().display(),
            cluster.port,
            if durable { "on" } else { "off" }
        );
        if tls {
            cluster.write_tls(&data);
            conf.push_str(
                "listen_addresses = '127.0.0.1'\nssl = on\nssl_cert_file = 'server.crt'\n\
                 ssl_key_file = 'server.key'\n",
            );
        } else {
            conf.push_str("listen_addresses = ''\n");
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        cluster.restart();
        cluster
    }

    /// A server certificate for 127.0.0.1 signed by a fresh CA, written into the data dir.
    fn write_tls(&mut self, data: &Path) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).expect("cert");
        std::fs::write(data.join("server.crt"), cert.pem()).expect("crt");
        std::fs::write(data.join("server.key"), key.serialize_pem()).expect("key");
        let ca_path = self.dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("ca");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        if let Some(user) = &self.run_as {
            run(
                Command::new("chown")
                    .arg(user)
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key")),
                "chown the server key",
            );
        }
        self.ca = Some(ca_path);
    }

    /// The CA file of a TLS cluster.
    pub(crate) fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The TCP port (TLS clusters listen on 127.0.0.1 there).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Creates a fresh database and returns its URL over the unix socket.
    pub(crate) fn fresh_database(&self) -> String {
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        run(
            self.command("createdb")
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "postgres", &name]),
            "createdb",
        );
        self.socket_url(&name)
    }

    /// The URL of database `db` over the unix socket.
    pub(crate) fn socket_url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@{}:{}/{db}",
            self.dir.path().display().to_string().replace('/', "%2F"),
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop")
            .stdin(Stdio::null())
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("pg_ctl stop failed for {}", data.display());
        }
    }
}
