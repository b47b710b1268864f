//! The harness of Parley's end-to-end tests: real `parley-chat` and
//! `parley-gateway` processes on real PostgreSQL, Redis and RabbitMQ, each
//! cluster isolated by its own database, key prefix and broker names;
//! private Redis and RabbitMQ instances for tests that restart them; SDK
//! clients whose every received message is recorded; and the ledger that
//! says what was sent, acked, delivered, lost, duplicated and out of order.

pub mod ledger;
pub mod netns;
pub mod services;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use parley_client::{Admin, Client, ClientConfig, TlsOptions};
use parley_core::testing::unique_name;
use parley_store::testing::TestDatabase;
use tokio::process::{Child, Command};

pub use ledger::{Ledger, Recorder};
pub use netns::{Faults, Host, Relay, reset_connections};

/// The default local services (see `scripts/services`).
pub fn redis_url() -> String {
    parley_redis::testing::redis_url()
}

pub fn amqp_url() -> String {
    std::env::var("PARLEY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A port nobody listens on right now, below the kernel's ephemeral range
/// (32768 and up on Linux): a port the kernel handed out could be taken
/// by an outgoing connection (a test's hundreds of clients) before the
/// process that is to listen on it binds it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One child process with its log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(program)
            .args(args)
            .env("PARLEY_LOG", "info,parley=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no goodbye, no cleanup.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `grace`).
    pub async fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill9().await;
        }
    }

    /// The last lines of the log, for a failing test's message.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// An HTTP GET (the SDK's): (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    parley_client::transport::http_get(&addr.to_string(), path)
        .await
        .map_err(anyhow::Error::msg)
}

/// Waits for `/readyz` on `ops` to answer 200.
pub async fn wait_ready(ops: SocketAddr, within: Duration, proc: &Proc) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http_get(ops, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            Ok((_, body)) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{} not ready within {within:?}: {last}\n--- log ---\n{}",
        proc.name,
        proc.tail(30)
    )
}

/// A process of the cluster, restartable with the same arguments.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// Clients' address (gateways) or the internal gRPC address (chat).
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    /// A gateway's route lookup alone (what a Service publishes).
    pub route: Option<SocketAddr>,
    pub proc: Option<Proc>,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Node {
    pub async fn start(&mut self, log_dir: &Path) -> anyhow::Result<()> {
        let proc = Proc::spawn(&self.name, &self.program, &self.args, &self.env, log_dir)?;
        wait_ready(self.ops, Duration::from_secs(30), &proc).await?;
        self.proc = Some(proc);
        Ok(())
    }

    pub async fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9().await;
        }
    }

    /// The route lookup URL of a gateway: its listener that serves the
    /// lookup alone.
    pub fn route_url(&self) -> String {
        format!("http://{}/route", self.route.unwrap_or(self.ops))
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The `parley-e2e-node` binary (`env!("CARGO_BIN_EXE_parley-e2e-node")`
    /// in a test), which runs the gateway's and chat service's code.
    pub node: PathBuf,
    pub gateways: usize,
    pub chats: usize,
    /// The PostgreSQL server the cluster's database is made on.
    pub database_url: String,
    pub redis_url: String,
    pub amqp_url: String,
    /// Seconds between lease writes (the lease lives three times as long).
    pub lease_secs: u64,
    /// PEM certificate and key: gateways listen with TLS as well.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// More environment for every process (the benchmarks quiet the logs).
    pub env: Vec<(String, String)>,
}

impl Spec {
    /// 3 gateways and 2 chat services on the shared local services.
    pub fn new(node: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            gateways: 3,
            chats: 2,
            database_url: parley_store::testing::database_url(),
            redis_url: redis_url(),
            amqp_url: amqp_url(),
            lease_secs: 1,
            tls: None,
            env: Vec::new(),
        }
    }
}

/// A running cluster of its own: database, key prefix and broker names no
/// other test uses, removed when it drops.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub spec: Spec,
    pub chats: Vec<Node>,
    pub gateways: Vec<Node>,
    /// Push senders (`parley-push`), started by [`Cluster::add_push`].
    pub pushes: Vec<Node>,
    /// The TLS listener of each gateway, when the spec asked for TLS.
    pub tls_addrs: Vec<SocketAddr>,
    /// The WebSocket-over-TLS listener of each gateway, likewise.
    pub wss_addrs: Vec<SocketAddr>,
    pub admin_url: String,
    pub admin_key: String,
    /// The token-signing secret, for minting device tokens without the admin API.
    pub token_secret: String,
    /// The environment every process gets.
    common: Vec<(String, String)>,
    _db: TestDatabase,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("logs", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub async fn start(spec: Spec) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("parley-e2e-").tempdir()?;
        let db = TestDatabase::create_on(&spec.database_url)
            .await
            .context("a test database (run scripts/services)")?;
        let prefix = unique_name("e2e");
        let admin_key = format!("{:032x}", rand::random::<u128>());
        let secret = format!("{:064x}", rand::random::<u128>());
        let common = vec![
            ("PARLEY_PREFIX".to_owned(), prefix.clone()),
            ("PARLEY_REDIS_URL".to_owned(), spec.redis_url.clone()),
            ("PARLEY_AMQP_URL".to_owned(), spec.amqp_url.clone()),
            ("PARLEY_INTERNAL_KEY".to_owned(), "internal-e2e".to_owned()),
            ("PARLEY_DRAIN_PAUSE_MS".to_owned(), "200".to_owned()),
        ];
        let common: Vec<_> = common.into_iter().chain(spec.env.clone()).collect();
        let admin_port = free_port();
        let mut chats = Vec::new();
        for i in 0..spec.chats {
            let (addr, ops) = (loopback(free_port()), loopback(free_port()));
            let admin = if i == 0 { admin_port } else { free_port() };
            let mut env = common.clone();
            env.extend([
                ("PARLEY_DATABASE_URL".to_owned(), db.url.clone()),
                ("PARLEY_DATABASE_POOL".to_owned(), "8".to_owned()),
                ("PARLEY_ADMIN_KEY".to_owned(), admin_key.clone()),
                ("PARLEY_TOKEN_SECRET".to_owned(), secret.clone()),
                ("PARLEY_INTERNAL_LISTEN".to_owned(), addr.to_string()),
                (
                    "PARLEY_ADMIN_LISTEN".to_owned(),
                    loopback(admin).to_string(),
                ),
                ("PARLEY_OPS_LISTEN".to_owned(), ops.to_string()),
            ]);
            let mut node = Node {
                name: format!("chat{i}"),
                addr,
                ops,
                route: None,
                proc: None,
                program: spec.node.clone(),
                args: vec!["chat".to_owned()],
                env,
            };
            node.start(dir.path()).await?;
            chats.push(node);
        }
        let mut cluster = Self {
            dir,
            prefix,
            spec,
            chats,
            gateways: Vec::new(),
            pushes: Vec::new(),
            tls_addrs: Vec::new(),
            wss_addrs: Vec::new(),
            admin_url: format!("http://{}", loopback(admin_port)),
            admin_key,
            token_secret: secret,
            common,
            _db: db,
        };
        for _ in 0..cluster.spec.gateways {
            cluster.add_gateway().await?;
        }
        Ok(cluster)
    }

    /// Starts one more gateway, `gw<n>` for the next n (a scale-up);
    /// returns its index.
    pub async fn add_gateway(&mut self) -> anyhow::Result<usize> {
        self.start_gateway(None).await
    }

    /// Starts one more gateway on `host`, across its link from everything
    /// else: it reaches Redis, RabbitMQ and the chat services through the
    /// returned relays, and clients reach it at the host's address.
    pub async fn add_gateway_on(&mut self, host: &Host) -> anyhow::Result<(usize, Uplink)> {
        let upstream = |url: &str| -> anyhow::Result<SocketAddr> {
            let (host, port) = authority(url).context("a service URL")?;
            let ip = if host == "localhost" {
                "127.0.0.1"
            } else {
                host
            };
            Ok(SocketAddr::new(ip.parse()?, port.parse()?))
        };
        let uplink = Uplink {
            redis: host.relay(upstream(&self.spec.redis_url)?).await?,
            amqp: host.relay(upstream(&self.spec.amqp_url)?).await?,
            chats: {
                let mut relays = Vec::new();
                for c in &self.chats {
                    relays.push(host.relay(c.addr).await?);
                }
                relays
            },
        };
        let i = self.start_gateway(Some((host, &uplink))).await?;
        Ok((i, uplink))
    }

    async fn start_gateway(&mut self, remote: Option<(&Host, &Uplink)>) -> anyhow::Result<usize> {
        let i = self.gateways.len();
        let ip = remote.map_or(IpAddr::from([127, 0, 0, 1]), |(h, _)| h.far.into());
        let at = |port| SocketAddr::new(ip, port);
        let chat_addrs: Vec<String> = match remote {
            Some((_, up)) => up.chats.iter().map(|r| r.addr.to_string()).collect(),
            None => self.chats.iter().map(|c| c.addr.to_string()).collect(),
        };
        let (addr, ops) = (at(free_port()), at(free_port()));
        let route = at(free_port());
        let mut env = self.common.clone();
        if let Some((_, up)) = remote {
            env.extend([
                (
                    "PARLEY_REDIS_URL".to_owned(),
                    through(&self.spec.redis_url, up.redis.addr),
                ),
                (
                    "PARLEY_AMQP_URL".to_owned(),
                    through(&self.spec.amqp_url, up.amqp.addr),
                ),
            ]);
        }
        env.extend([
            ("PARLEY_GATEWAY_ID".to_owned(), format!("gw{i}")),
            ("PARLEY_LISTEN".to_owned(), addr.to_string()),
            ("PARLEY_OPS_LISTEN".to_owned(), ops.to_string()),
            ("PARLEY_ROUTE_LISTEN".to_owned(), route.to_string()),
            ("PARLEY_ADVERTISE".to_owned(), addr.to_string()),
            ("PARLEY_CHAT_ADDRS".to_owned(), chat_addrs.join(",")),
            (
                "PARLEY_LEASE_SECS".to_owned(),
                self.spec.lease_secs.to_string(),
            ),
            ("PARLEY_SHUTDOWN_GRACE_SECS".to_owned(), "5".to_owned()),
        ]);
        if let Some((cert, key)) = &self.spec.tls {
            let (tls, wss) = (loopback(free_port()), loopback(free_port()));
            self.tls_addrs.push(tls);
            self.wss_addrs.push(wss);
            env.extend([
                ("PARLEY_TLS_LISTEN".to_owned(), tls.to_string()),
                ("PARLEY_WSS_LISTEN".to_owned(), wss.to_string()),
                ("PARLEY_TLS_CERT".to_owned(), cert.display().to_string()),
                ("PARLEY_TLS_KEY".to_owned(), key.display().to_string()),
            ]);
        }
        let (program, args) = match remote {
            Some((host, _)) => {
                let mut args = host.exec();
                args.extend([self.spec.node.display().to_string(), "gateway".to_owned()]);
                (PathBuf::from("ip"), args)
            }
            None => (self.spec.node.clone(), vec!["gateway".to_owned()]),
        };
        let mut node = Node {
            name: format!("gw{i}"),
            addr,
            ops,
            route: Some(route),
            proc: None,
            program,
            args,
            env,
        };
        node.start(self.dir.path()).await?;
        self.gateways.push(node);
        Ok(i)
    }

    /// Starts a push sender, `push<n>`, with `env` (its providers) besides
    /// the cluster's own; returns its index.
    pub async fn add_push(&mut self, env: &[(String, String)]) -> anyhow::Result<usize> {
        let i = self.pushes.len();
        let ops = loopback(free_port());
        let mut all = self.common.clone();
        all.extend([
            ("PARLEY_DATABASE_URL".to_owned(), self._db.url.clone()),
            ("PARLEY_OPS_LISTEN".to_owned(), ops.to_string()),
            ("PARLEY_PUSH_NAME".to_owned(), format!("push{i}")),
        ]);
        all.extend(env.iter().cloned());
        let mut node = Node {
            name: format!("push{i}"),
            addr: ops,
            ops,
            route: None,
            proc: None,
            program: self.spec.node.clone(),
            args: vec!["push".to_owned()],
            env: all,
        };
        node.start(self.dir.path()).await?;
        self.pushes.push(node);
        Ok(i)
    }

    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Ok(Admin::connect(&self.admin_url, &self.admin_key).await?)
    }

    /// Creates users and returns a token for each.
    pub async fn users(&self, ids: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut admin = self.admin().await?;
        let mut tokens = Vec::new();
        for id in ids {
            admin.create_user(id, "").await?;
            tokens.push(admin.token(id, 3600).await?.token);
        }
        Ok(tokens)
    }

    /// Connects a device to gateway `i` directly.
    pub fn at_gateway(&self, i: usize, token: &str, device: &str) -> ClientConfig {
        ClientConfig::new(self.gateways[i].addr.to_string(), token, device)
    }

    /// Connects a device through gateway `i`'s route lookup, with no fixed
    /// address to fall back on.
    pub fn via_route(&self, i: usize, token: &str, device: &str) -> ClientConfig {
        let mut c = ClientConfig::new("", token, device);
        c.routes = vec![self.gateways[i].route_url()];
        c
    }

    /// Connects a device to gateway `i` over TLS.
    pub fn over_tls(&self, i: usize, token: &str, device: &str, ca: &Path) -> ClientConfig {
        let mut c = ClientConfig::new(self.tls_addrs[i].to_string(), token, device);
        c.tls = Some(TlsOptions {
            ca_file: Some(ca.to_path_buf()),
            server_name: Some("localhost".into()),
        });
        c
    }

    /// Which gateway holds a device now, by its address.
    pub fn gateway_at(&self, addr: &str) -> Option<usize> {
        self.gateways
            .iter()
            .position(|g| g.addr.to_string() == addr)
    }

    /// Every process's last log lines, for a failure message.
    /// Every line every process of the cluster logged so far.
    pub fn full_logs(&self) -> String {
        self.chats
            .iter()
            .chain(&self.gateways)
            .chain(&self.pushes)
            .filter_map(|n| n.proc.as_ref())
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn logs(&self) -> String {
        self.chats
            .iter()
            .chain(&self.gateways)
            .chain(&self.pushes)
            .filter_map(|n| n.proc.as_ref())
            .map(|p| format!("--- {} ---\n{}", p.name, p.tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    /// Stops every process (SIGKILL) and removes the cluster's Redis keys
    /// and broker names; its database goes with its guard.
    fn drop(&mut self) {
        for n in self
            .gateways
            .iter_mut()
            .chain(self.chats.iter_mut())
            .chain(self.pushes.iter_mut())
        {
            n.proc = None;
        }
        let redis = self.spec.redis_url.clone();
        let amqp = parley_amqp::AmqpConfig {
            url: self.spec.amqp_url.clone(),
            prefix: self.prefix.clone(),
        };
        let gateways: Vec<String> = (0..self.gateways.len()).map(|i| format!("gw{i}")).collect();
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async {
                let cleanup = async {
                    let _ = parley_redis::delete_prefix(&redis, &prefix).await;
                    let names: Vec<&str> = gateways.iter().map(String::as_str).collect();
                    let _ = parley_amqp::delete_topology(&amqp, &names).await;
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), cleanup).await;
            });
        })
        .join();
    }
}

/// How a gateway on another [`Host`] reaches the cluster's services: a
/// relay on the near end of the link for each.
#[derive(Debug)]
pub struct Uplink {
    pub redis: Relay,
    pub amqp: Relay,
    pub chats: Vec<Relay>,
}

impl Uplink {
    /// The ports on the near end that reach the broker and the chat
    /// services (what a partition from "the rest of the cluster" blocks,
    /// Redis aside).
    pub fn cluster_ports(&self) -> Vec<u16> {
        std::iter::once(&self.amqp)
            .chain(&self.chats)
            .map(|r| r.addr.port())
            .collect()
    }

    /// Every relay's delay each way from now on.
    pub fn set_delay(&self, delay: Duration) {
        for r in std::iter::once(&self.redis)
            .chain([&self.amqp])
            .chain(&self.chats)
        {
            r.set_delay(delay);
        }
    }
}

/// The host and port of a URL (`scheme://[user[:password]@]host:port[/...]`).
fn authority(url: &str) -> Option<(&str, &str)> {
    let rest = url.split_once("://")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    rest[..end].rsplit_once(':')
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (host, port) = authority(url).expect("a URL with a host and port");
    url.replacen(&format!("{host}:{port}"), &addr.to_string(), 1)
}

/// Connects a client and starts recording what it receives.
pub async fn connect(
    config: ClientConfig,
    recorder: &Recorder,
    device: &str,
) -> anyhow::Result<Client> {
    let (client, events) = Client::connect(config).await?;
    recorder.record(device, events);
    Ok(client)
}
