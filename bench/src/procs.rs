//! The servers under test, each a process of its own so that its memory and
//! CPU can be read from /proc: Parley embedded (this binary's `serve`),
//! a Parley cluster (the e2e harness), and private Mosquitto and NATS
//! instances on ports nobody else uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parley_e2e::{Cluster, Proc, Spec, free_port};
use serde::Serialize;

/// A process's resident memory and CPU time, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    /// The peak resident memory since start (or since the last reset).
    pub hwm_kib: u64,
    pub cpu_secs: f64,
}

/// Reads /proc/<pid>/status and /proc/<pid>/stat.
pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; here 11 and 12.
    let cpu_secs = (ticks(11) + ticks(12)) as f64 / clock_ticks();
    Ok(Sample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_secs,
    })
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux the kernel ABI allows for x86 and arm.
    100.0
}

/// Resets the peak resident memory to the current one.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// What the servers used during a measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Per process (or, for the shared services, per service): name, then
    /// (before, after).
    pub processes: Vec<(String, Sample, Sample)>,
    pub seconds: f64,
}

impl Usage {
    /// CPU seconds of all server processes per second of wall time.
    pub fn cpu_cores(&self) -> f64 {
        let cpu: f64 = self
            .processes
            .iter()
            .filter(|(name, _, _)| !SERVICES.iter().any(|(s, _)| s == name))
            .map(|(_, a, b)| b.cpu_secs - a.cpu_secs)
            .sum();
        cpu / self.seconds.max(1e-9)
    }

    pub fn peak_kib(&self) -> u64 {
        self.processes.iter().map(|(_, _, b)| b.hwm_kib).sum()
    }
}

/// The machine's shared services, each known by its processes' names in
/// /proc/<pid>/comm: their CPU is counted too, since a cluster's cost is
/// theirs as much as Parley's.
pub const SERVICES: &[(&str, &[&str])] = &[
    ("postgres", &["postgres"]),
    ("redis", &["redis-server"]),
    (
        "rabbitmq",
        &["beam.smp", "erl_child_setup", "epmd", "inet_gethost"],
    ),
];

/// Every process of each shared service now, by pid.
fn service_pids() -> Vec<(u32, &'static str)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let comm = comm.trim();
        let service = SERVICES
            .iter()
            .find(|(_, names)| names.iter().any(|n| comm.starts_with(n)))?;
        Some((pid, service.0))
    })
    .collect()
}

/// Measures the named processes, and every process of the shared
/// services, from `start` to `finish`. A service process that starts
/// meanwhile (a new database connection) counts from its start; one that
/// exits before the end is missed, which undercounts a little.
pub struct Meter {
    pids: Vec<(String, u32)>,
    before: Vec<Sample>,
    services: std::collections::HashMap<u32, Sample>,
    at: Instant,
}

impl Meter {
    pub fn start(pids: Vec<(String, u32)>) -> Self {
        for (_, pid) in &pids {
            reset_peak(*pid);
        }
        let before = pids
            .iter()
            .map(|(_, p)| sample(*p).unwrap_or_default())
            .collect();
        let services = service_pids()
            .into_iter()
            .map(|(pid, _)| (pid, sample(pid).unwrap_or_default()))
            .collect();
        Self {
            pids,
            before,
            services,
            at: Instant::now(),
        }
    }

    pub fn finish(&self) -> Usage {
        let mut processes: Vec<(String, Sample, Sample)> = self
            .pids
            .iter()
            .zip(&self.before)
            .map(|((name, pid), b)| (name.clone(), *b, sample(*pid).unwrap_or_default()))
            .collect();
        for (service, _) in SERVICES {
            let (mut before, mut after) = (Sample::default(), Sample::default());
            for (pid, _) in service_pids().into_iter().filter(|(_, s)| s == service) {
                let Ok(now) = sample(pid) else { continue };
                let then = self.services.get(&pid).copied().unwrap_or_default();
                before.cpu_secs += then.cpu_secs;
                after.cpu_secs += now.cpu_secs;
                after.rss_kib += now.rss_kib;
                after.hwm_kib += now.hwm_kib;
            }
            processes.push(((*service).to_owned(), before, after));
        }
        Usage {
            processes,
            seconds: self.at.elapsed().as_secs_f64(),
        }
    }
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, within: Duration, proc: &Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} did not listen on {addr} within {within:?}\n--- log ---\n{}",
        proc.name,
        proc.tail(30)
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How to reach Parley and what to measure.
pub struct ParleyServer {
    pub name: String,
    /// Client TCP address of each gateway.
    pub gateways: Vec<SocketAddr>,
    pub admin_url: String,
    pub admin_key: String,
    pub token_secret: String,
    /// Processes to measure, by role.
    pub pids: Vec<(String, u32)>,
    /// The gateway processes alone.
    pub gateway_pids: Vec<u32>,
    _keep: Keep,
}

/// Held so the server lives as long as its handle.
enum Keep {
    Embedded(Box<(Proc, tempfile::TempDir)>),
    Cluster(Box<Cluster>),
}

impl ParleyServer {
    /// Parley on the embedded default (SQLite, one process): `exe serve`.
    pub async fn embedded(exe: &Path) -> anyhow::Result<Self> {
        Self::embedded_with(exe, Vec::new()).await
    }

    /// [`ParleyServer::embedded`] with more environment (e.g. an S3 store
    /// for its uploads: `PARLEY_MEDIA_S3_*`).
    pub async fn embedded_with(
        exe: &Path,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("parley-bench-").tempdir()?;
        let (tcp, admin) = (loopback(free_port()), loopback(free_port()));
        let admin_key = format!("{:032x}", rand::random::<u128>());
        let token_secret = format!("{:064x}", rand::random::<u128>());
        let args = vec![
            "serve".to_owned(),
            "--data-dir".to_owned(),
            dir.path().join("data").display().to_string(),
            "--listen".to_owned(),
            tcp.to_string(),
            "--admin-listen".to_owned(),
            admin.to_string(),
        ];
        let env = vec![
            ("PARLEY_ADMIN_KEY".to_owned(), admin_key.clone()),
            ("PARLEY_TOKEN_SECRET".to_owned(), token_secret.clone()),
            ("PARLEY_LOG".to_owned(), "warn".to_owned()),
        ]
        .into_iter()
        .chain(extra_env)
        .collect::<Vec<_>>();
        // PARLEY_BENCH_WRAP runs the server under a profiler, e.g.
        // "valgrind --tool=dhat --dhat-out-file=/tmp/dhat.out" or
        // "strace -c -f -o /tmp/strace.txt" (see docs/benchmarks.md).
        let (program, args) = match std::env::var("PARLEY_BENCH_WRAP") {
            Ok(wrap) if !wrap.trim().is_empty() => {
                let mut words = wrap.split_whitespace().map(str::to_owned);
                let program = PathBuf::from(words.next().expect("a word"));
                let mut all: Vec<String> = words.collect();
                all.push(exe.display().to_string());
                all.extend(args);
                (program, all)
            }
            _ => (exe.to_path_buf(), args),
        };
        let proc = Proc::spawn("parley-embedded", &program, &args, &env, dir.path())?;
        wait_listening(tcp, Duration::from_secs(120), &proc).await?;
        wait_listening(admin, Duration::from_secs(120), &proc).await?;
        let pid = proc.pid().context("the server exited")?;
        Ok(Self {
            name: "parley".to_owned(),
            gateways: vec![tcp],
            admin_url: format!("http://{admin}"),
            admin_key,
            token_secret,
            pids: vec![("parley".to_owned(), pid)],
            gateway_pids: vec![pid],
            _keep: Keep::Embedded(Box::new((proc, dir))),
        })
    }

    /// Stops the server with SIGTERM, so that a profiler it runs under
    /// writes its report (a dropped server is killed).
    pub async fn stop(self) {
        match self._keep {
            Keep::Embedded(mut b) => b.0.terminate(Duration::from_secs(60)).await,
            Keep::Cluster(c) => drop(c),
        }
    }

    /// Parley in cluster mode on PostgreSQL, Redis and RabbitMQ.
    pub async fn cluster(exe: &Path, gateways: usize, chats: usize) -> anyhow::Result<Self> {
        let spec = Spec {
            gateways,
            chats,
            env: vec![("PARLEY_LOG".to_owned(), "warn".to_owned())],
            ..Spec::new(exe)
        };
        let c = Cluster::start(spec).await?;
        let pid = |n: &parley_e2e::Node| n.proc.as_ref().and_then(Proc::pid).unwrap_or(0);
        let pids = c
            .chats
            .iter()
            .chain(&c.gateways)
            .map(|n| (n.name.clone(), pid(n)))
            .collect();
        Ok(Self {
            name: "parley-cluster".to_owned(),
            gateways: c.gateways.iter().map(|g| g.addr).collect(),
            admin_url: c.admin_url.clone(),
            admin_key: c.admin_key.clone(),
            token_secret: c.token_secret.clone(),
            pids,
            gateway_pids: c.gateways.iter().map(pid).collect(),
            _keep: Keep::Cluster(Box::new(c)),
        })
    }
}

/// A private broker: Mosquitto or nats-server, on a port of its own.
pub struct Broker {
    pub name: String,
    pub addr: SocketAddr,
    pub pid: u32,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

fn program(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed (scripts/services installs it)")
}

impl Broker {
    /// Mosquitto 2 with QoS 1 queues large enough for the benchmark, no
    /// authentication, and no limit on connections.
    pub async fn mosquitto() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("bench-mqtt-").tempdir()?;
        let addr = loopback(free_port());
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
                 max_connections -1\nmax_queued_messages 100000\nmax_inflight_messages 0\n\
                 log_type error\nlog_dest stderr\n",
                addr.port()
            ),
        )?;
        let args = vec!["-c".to_owned(), conf.display().to_string()];
        let proc = Proc::spawn("mosquitto", &program("mosquitto")?, &args, &[], dir.path())?;
        wait_listening(addr, Duration::from_secs(10), &proc).await?;
        Self::from(proc, dir, addr, "mosquitto")
    }

    /// nats-server with JetStream, storing in a directory of its own.
    pub async fn nats() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("bench-nats-").tempdir()?;
        let addr = loopback(free_port());
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nmax_connections: 1000000\nmax_payload: 65536\n\
                 jetstream {{ store_dir: \"{}\" }}\n",
                addr.port(),
                dir.path().join("js").display()
            ),
        )?;
        let args = vec!["-c".to_owned(), conf.display().to_string()];
        let proc = Proc::spawn("nats", &program("nats-server")?, &args, &[], dir.path())?;
        wait_listening(addr, Duration::from_secs(10), &proc).await?;
        Self::from(proc, dir, addr, "nats")
    }

    fn from(
        proc: Proc,
        dir: tempfile::TempDir,
        addr: SocketAddr,
        name: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            addr,
            pid: proc.pid().context("the broker exited")?,
            _proc: proc,
            _dir: dir,
        })
    }
}
