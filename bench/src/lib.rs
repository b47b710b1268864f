//! Parley's load generator and benchmark scenarios. Each scenario runs
//! against Parley (embedded or in cluster mode) and, where the comparison
//! means something, against Mosquitto (MQTT QoS 1) and NATS (core and
//! JetStream) started privately for the run, from the same process and in
//! the same run, so the figures are ratios taken on the same machine at the
//! same moment. See docs/benchmarks.md.

pub mod floor;
pub mod load;
pub mod media;
pub mod mqtt;
pub mod nats;
pub mod parley;
pub mod procs;
pub mod table;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use load::{Shape, Traffic, Workload};
use procs::{Broker, Meter, ParleyServer, Usage};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// Parley on the embedded default: one process, SQLite, every message persisted.
    Parley,
    /// Parley in cluster mode: gateways and chat services on PostgreSQL, Redis, RabbitMQ.
    ParleyCluster,
    /// Mosquitto, MQTT 3.1.1, QoS 1, one topic per recipient (in memory).
    Mosquitto,
    /// NATS core: at most once, no acknowledgement.
    Nats,
    /// NATS with a file-backed JetStream stream; acked once stored.
    Jetstream,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            Self::Parley => "parley",
            Self::ParleyCluster => "parley-cluster",
            Self::Mosquitto => "mosquitto",
            Self::Nats => "nats",
            Self::Jetstream => "jetstream",
        }
    }

    /// Whether sends are acknowledged once the system took responsibility.
    pub fn acks(self) -> bool {
        self != Self::Nats
    }
}

/// What the benchmark needs to start servers.
#[derive(Debug, Clone)]
pub struct Env {
    /// This binary (`serve`, `gateway` and `chat` run Parley's code).
    pub exe: PathBuf,
    /// Gateways and chat services in cluster mode.
    pub cluster: (usize, usize),
}

/// A started system, stopped when dropped.
pub enum Server {
    Parley(ParleyServer),
    Broker(Broker),
}

impl Server {
    pub async fn start(system: System, env: &Env) -> anyhow::Result<Self> {
        Ok(match system {
            System::Parley => Self::Parley(ParleyServer::embedded(&env.exe).await?),
            System::ParleyCluster => {
                let (g, c) = env.cluster;
                Self::Parley(ParleyServer::cluster(&env.exe, g, c).await?)
            }
            System::Mosquitto => Self::Broker(Broker::mosquitto().await?),
            System::Nats | System::Jetstream => Self::Broker(Broker::nats().await?),
        })
    }

    /// The server processes, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        match self {
            Self::Parley(p) => p.pids.clone(),
            Self::Broker(b) => vec![(b.name.clone(), b.pid)],
        }
    }

    /// Stops the servers (gracefully where that matters).
    pub async fn stop(self) {
        if let Self::Parley(p) = self {
            p.stop().await;
        }
    }

    /// The processes that hold client connections.
    pub fn front_pids(&self) -> Vec<u32> {
        match self {
            Self::Parley(p) => p.gateway_pids.clone(),
            Self::Broker(b) => vec![b.pid],
        }
    }
}

/// Runs one workload and measures the servers meanwhile.
pub async fn traffic(system: System, server: &Server, w: Workload) -> anyhow::Result<Traffic> {
    let pids = server.pids();
    let run = match (system, server) {
        (_, Server::Parley(p)) => parley::traffic(p, w).await?,
        (System::Mosquitto, Server::Broker(b)) => mqtt::traffic(b.addr, w, pids).await?,
        (System::Jetstream, Server::Broker(b)) => nats::traffic(b.addr, w, true, pids).await?,
        (_, Server::Broker(b)) => nats::traffic(b.addr, w, false, pids).await?,
    };
    Ok(run.report(system.name(), system.acks()))
}

/// The highest rate a system sustains, and the run at half of it.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub system: String,
    pub p99_limit_ms: f64,
    /// Every rate tried, in order.
    pub steps: Vec<Traffic>,
    /// The best sustained run (clean, on schedule, p99 within the limit).
    pub max: Option<Traffic>,
    pub half: Option<Traffic>,
}

/// Searches the highest sustained rate: after a warm-up run, doubles from
/// `start` until a rate fails twice in a row, then bisects `refine` times;
/// then runs at half the best rate.
pub async fn throughput(
    system: System,
    server: &Server,
    base: Workload,
    p99_limit_ms: f64,
    refine: usize,
    ceiling: f64,
) -> anyhow::Result<Throughput> {
    let mut steps = Vec::new();
    let mut best: Option<Traffic> = None;
    let mut failed: Option<f64> = None;
    let mut rate = base.rate;
    let mut left = refine;
    // A first run on a fresh server pays for cold caches and lazy setup;
    // it is not part of the search.
    let warm = Workload {
        duration: base.duration.min(Duration::from_secs(2)),
        ..base.clone()
    };
    let _ = traffic(system, server, warm).await?;
    loop {
        let at = |rate| Workload {
            rate,
            ..base.clone()
        };
        let mut t = traffic(system, server, at(rate)).await?;
        eprintln!("  {}", table::step_line(&t));
        // One bad run on a shared machine is not a verdict: a failure must
        // repeat before the search believes it.
        if !t.sustained(p99_limit_ms) {
            steps.push(t);
            t = traffic(system, server, at(rate)).await?;
            eprintln!("  {} (again)", table::step_line(&t));
        }
        let ok = t.sustained(p99_limit_ms);
        steps.push(t.clone());
        if ok {
            best = Some(t);
        } else {
            failed = Some(rate);
        }
        let lo = best.as_ref().map_or(0.0, |b| b.workload.rate);
        rate = match failed {
            None if rate * 2.0 <= ceiling => rate * 2.0,
            None => break,
            Some(hi) => {
                if left == 0 || lo == 0.0 && hi <= base.rate / 8.0 {
                    break;
                }
                left -= 1;
                if lo == 0.0 { hi / 2.0 } else { (lo + hi) / 2.0 }
            }
        };
        rate = rate.round();
    }
    let half = match &best {
        Some(b) => {
            let w = Workload {
                rate: (b.workload.rate / 2.0).round(),
                ..base.clone()
            };
            Some(traffic(system, server, w).await?)
        }
        None => None,
    };
    Ok(Throughput {
        system: system.name().to_owned(),
        p99_limit_ms,
        steps,
        max: best,
        half,
    })
}

/// Idle connections held by one system.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub system: String,
    pub requested: usize,
    pub connected: usize,
    pub connects_per_sec: f64,
    /// Resident memory of the connection-holding processes before and after.
    pub baseline_kib: u64,
    pub loaded_kib: u64,
    pub bytes_per_connection: f64,
    /// Over the hold, with heartbeats (Parley Ping every 30 s, MQTT keep-alive
    /// 30 s, NATS PING every 2 min).
    pub hold_secs: f64,
    pub cpu_percent_of_a_core: f64,
    pub usage: Usage,
}

/// Connects `n` idle authenticated clients at `per_sec`, then holds them
/// for `hold`, measuring memory and CPU.
pub async fn idle(
    system: System,
    server: &Server,
    n: usize,
    per_sec: f64,
    hold: Duration,
) -> anyhow::Result<IdleReport> {
    let front = server.front_pids();
    let rss = |pids: &[u32]| -> u64 {
        pids.iter()
            .map(|p| procs::sample(*p).map(|s| s.rss_kib).unwrap_or(0))
            .sum()
    };
    let (connected, connect_secs, baseline, loaded, usage, close): (_, _, _, _, _, Closer) =
        match server {
            Server::Parley(p) => {
                let users = parley::users(p, &format!("i{}", load::run_id()), n).await?;
                settle_memory().await;
                let baseline = rss(&front);
                let idle = parley::idle(p, &users, per_sec).await?;
                drop(users);
                settle_memory().await;
                let loaded = rss(&front);
                let meter = Meter::start(server.pids());
                tokio::time::sleep(hold).await;
                let usage = meter.finish();
                (
                    idle.connected,
                    idle.connect_secs,
                    baseline,
                    loaded,
                    usage,
                    Closer::Parley(idle),
                )
            }
            Server::Broker(b) => {
                settle_memory().await;
                let baseline = rss(&front);
                let (connected, secs, close) = if system == System::Mosquitto {
                    let i = mqtt::idle(b.addr, n, per_sec).await?;
                    (i.connected, i.connect_secs, Closer::Mqtt(i))
                } else {
                    let i = nats::idle(b.addr, n, per_sec).await?;
                    (i.connected, i.connect_secs, Closer::Nats(i))
                };
                settle_memory().await;
                let loaded = rss(&front);
                let meter = Meter::start(server.pids());
                tokio::time::sleep(hold).await;
                (connected, secs, baseline, loaded, meter.finish(), close)
            }
        };
    close.close().await;
    Ok(IdleReport {
        system: system.name().to_owned(),
        requested: n,
        connected,
        connects_per_sec: connected as f64 / connect_secs,
        baseline_kib: baseline,
        loaded_kib: loaded,
        bytes_per_connection: (loaded.saturating_sub(baseline) * 1024) as f64
            / connected.max(1) as f64,
        hold_secs: hold.as_secs_f64(),
        cpu_percent_of_a_core: usage.cpu_cores() * 100.0,
        usage,
    })
}

enum Closer {
    Parley(parley::Idle),
    Mqtt(mqtt::Idle),
    Nats(nats::Idle),
}

impl Closer {
    async fn close(self) {
        match self {
            Self::Parley(i) => i.close().await,
            Self::Mqtt(i) => i.close().await,
            Self::Nats(i) => i.close().await,
        }
    }
}

/// Lets the allocator and the kernel catch up before reading memory.
async fn settle_memory() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Writes `value` as pretty JSON to `path`, creating its folder.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}
