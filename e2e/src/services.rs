//! Private Redis and RabbitMQ instances on ports of their own, for tests
//! that restart them: the shared services stay untouched.

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
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl PrivateRedis {
    pub async fn start() -> anyhow::Result<Self> {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir()?,
            proc: None,
        };
        r.up().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
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
        self.kill_node().await;
        wait_port(self.port, false, Duration::from_secs(20)).await?;
        tokio::time::sleep(down_for).await;
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
