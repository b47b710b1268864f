//! Private PostgreSQL, Redis and RabbitMQ instances on ports of their own,
//! for tests that stop and restart them: the shared services stay untouched.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpStream;

use crate::{Proc, free_port};

async fn wait_port(port: u16, up: bool, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let answers = TcpStream::connect(("127.0.0.1", port)).await.is_ok();
        if answers == up {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "port {port} did not {} within {within:?}",
        if up { "open" } else { "close" }
    )
}

/// A redis-server of one test; it keeps nothing on disk, so a restart
/// loses every key, as a crashed Redis without persistence would.
#[derive(Debug)]
pub struct PrivateRedis {
    pub port: u16,
    /// Required of clients (`requirepass`), when set.
    password: Option<String>,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl PrivateRedis {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// A Redis that refuses clients without `password`.
    pub async fn start_with_password(password: &str) -> anyhow::Result<Self> {
        Self::start_with(Some(password.to_owned())).await
    }

    async fn start_with(password: Option<String>) -> anyhow::Result<Self> {
        let mut r = Self {
            port: free_port(),
            password,
            dir: tempfile::tempdir()?,
            proc: None,
        };
        r.up().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .to_vec();
        let mut args = args;
        if let Some(p) = &self.password {
            args.extend(["--requirepass".to_owned(), p.clone()]);
        }
        let program = PathBuf::from("redis-server");
        let proc = Proc::spawn("redis", &program, &args, &[], self.dir.path())
            .context("redis-server (run scripts/services to install it)")?;
        self.proc = Some(proc);
        wait_port(self.port, true, Duration::from_secs(10)).await
    }

    /// Kills Redis (SIGKILL) and starts it again, empty, on the same port;
    /// `down_for` is how long it stays away.
    pub async fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        if let Some(p) = self.proc.as_mut() {
            p.kill9().await;
        }
        wait_port(self.port, false, Duration::from_secs(10)).await?;
        tokio::time::sleep(down_for).await;
        self.up().await
    }
}

/// A RabbitMQ node of one test (its own node name, ports and data).
#[derive(Debug)]
pub struct PrivateRabbit {
    pub port: u16,
    dist_port: u16,
    node: String,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl PrivateRabbit {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("parley-rabbit-")
            .tempdir()?;
        // The server drops to the rabbitmq user: it must write here.
        #[cfg(unix)]
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let port = free_port();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        let mut r = Self {
            port,
            dist_port: free_port(),
            node: format!("parley-e2e-{:08x}@localhost", rand::random::<u32>()),
            dir,
            proc: None,
        };
        r.up().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.path().display();
        [
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_CONFIG_FILE", format!("{d}/rabbitmq.conf")),
            ("RABBITMQ_MNESIA_BASE", format!("{d}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{d}/log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", format!("{d}/plugins")),
            ("RABBITMQ_PID_FILE", format!("{d}/pid")),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let program = PathBuf::from("rabbitmq-server");
        let proc = Proc::spawn("rabbitmq", &program, &[], &self.env(), self.dir.path())
            .context("rabbitmq-server (run scripts/services to install it)")?;
        self.proc = Some(proc);
        wait_port(self.port, true, Duration::from_secs(60)).await
    }

    /// Stops the node's Erlang VM; the wrapper script is not enough.
    async fn kill_node(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid")) {
            let _ = tokio::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status()
                .await;
        }
        if let Some(p) = self.proc.as_mut() {
            p.kill9().await;
        }
    }

    /// Kills the broker and starts it again on the same port and data;
    /// `down_for` is how long it stays away.
    pub async fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.crash().await?;
        tokio::time::sleep(down_for).await;
        self.start_again().await
    }

    /// Kills the broker (SIGKILL) and waits for its port to close.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        self.kill_node().await;
        wait_port(self.port, false, Duration::from_secs(20)).await
    }

    /// Starts the broker again on the same port and data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.dir.path().join("pid"));
        self.up().await
    }

    pub async fn stop(mut self) {
        self.kill_node().await;
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
    }
}

/// A PostgreSQL server of one test: a data directory of its own (made by
/// `initdb`, trust authentication) on a port of its own, so that a test can
/// stop it, crash it and start it again. The binaries come from
/// `PARLEY_PG_BINDIR`, else the newest `/usr/lib/postgresql/<v>/bin`
/// (Debian's layout). As root, the server runs as the `postgres` user.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

/// The directory holding `initdb` and `postgres`.
fn pg_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PARLEY_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: set PARLEY_PG_BINDIR (run scripts/services)")?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// Whether this process runs as root (PostgreSQL refuses to).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PrivatePostgres {
    pub async fn start() -> anyhow::Result<Self> {
        let bin = pg_bindir()?;
        let dir = tempfile::Builder::new().prefix("parley-pg-").tempdir()?;
        let data = dir.path().join("data");
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres", &dir.path().display().to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "chown of the data directory failed");
        }
        let initdb = bin.join("initdb").display().to_string();
        let data_arg = data.display().to_string();
        let args = [
            initdb.as_str(),
            "-D",
            &data_arg,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ];
        let out = as_postgres(&args).output().context("running initdb")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            port: free_port(),
            bin,
            dir,
            proc: None,
        };
        pg.up().await?;
        Ok(pg)
    }

    /// The server's `postgres` database, as the superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let postgres = self.bin.join("postgres").display().to_string();
        let data = self.dir.path().join("data").display().to_string();
        let socket_dir = self.dir.path().display().to_string();
        let port = self.port.to_string();
        let args = [
            postgres.as_str(),
            "-D",
            &data,
            "-p",
            &port,
            "-k",
            &socket_dir,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "max_connections=100",
        ];
        let (program, rest) = launcher(&args);
        let proc = Proc::spawn("postgres", &program, &rest, &[], self.dir.path())?;
        self.proc = Some(proc);
        wait_port(self.port, true, Duration::from_secs(30)).await?;
        // The port opens before the server takes connections (recovery).
        for _ in 0..300 {
            if accepting(&self.bin, self.port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("postgres did not take connections within 30 s")
    }

    /// Signals the postmaster and waits for its port to close and for it to
    /// exit. INT is a fast shutdown (sessions end, what is in flight rolls
    /// back); QUIT an immediate one (a crash: recovery at the next start).
    async fn signal_and_wait(&mut self, signal: &str) -> anyhow::Result<()> {
        let Some(mut proc) = self.proc.take() else {
            return Ok(());
        };
        if let Some(pid) = proc.pid() {
            let _ = tokio::process::Command::new("kill")
                .args([format!("-{signal}"), pid.to_string()])
                .status()
                .await;
        }
        wait_port(self.port, false, Duration::from_secs(30)).await?;
        proc.terminate(Duration::from_secs(30)).await;
        Ok(())
    }

    /// Stops the server as `pg_ctl stop -m fast` would.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait("INT").await
    }

    /// Crashes the server as `pg_ctl stop -m immediate` would.
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait("QUIT").await
    }

    /// Starts the server again on the same port and data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.up().await
    }
}

/// A command running `args` as the postgres user when this process is root.
fn as_postgres(args: &[&str]) -> std::process::Command {
    let (program, rest) = launcher(args);
    let mut c = std::process::Command::new(program);
    c.args(rest);
    c
}

/// The program and arguments that run `args` (program first), dropping to
/// the postgres user when this process is root; `setpriv` execs, so the
/// child's pid is the server's.
fn launcher(args: &[&str]) -> (PathBuf, Vec<String>) {
    if is_root() {
        let mut rest: Vec<String> = [
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]
        .map(String::from)
        .to_vec();
        rest.extend(args.iter().map(|a| (*a).to_owned()));
        (PathBuf::from("setpriv"), rest)
    } else {
        (
            PathBuf::from(args[0]),
            args[1..].iter().map(|a| (*a).to_owned()).collect(),
        )
    }
}

/// Whether the server on `port` takes connections (`pg_isready`).
async fn accepting(bin: &std::path::Path, port: u16) -> bool {
    tokio::process::Command::new(bin.join("pg_isready"))
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .status()
        .await
        .is_ok_and(|s| s.success())
}
