//! `parley-bench`: the load generator. Every scenario is one command and
//! prints a table (and JSON with `--json`); `report` runs them all, as
//! `scripts/bench` does. The same binary runs the servers it measures
//! (`serve` for Parley embedded, `gateway` and `chat` for cluster mode), so
//! what is measured is exactly Parley's code.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use parley_bench::{Env, Server, Shape, System, Workload, table, write_json};

#[derive(Parser)]
#[command(
    name = "parley-bench",
    about = "Parley's load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Idle authenticated connections: memory per connection, connect rate, idle CPU.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections, one run per count.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        counts: Vec<usize>,
        /// Logins per second while ramping up.
        #[arg(long, default_value_t = 2000.0)]
        ramp: f64,
        /// Seconds to hold them while measuring CPU.
        #[arg(long, default_value_t = 30)]
        hold_secs: u64,
    },
    /// One run at a fixed offered rate (open loop).
    Run {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Messages per second offered.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Runs per system, one after the other on the same server: shows
        /// whether a server degrades as its data and history grow.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// The highest sustained rate with p99 under a limit, then latency at half that rate.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// The first rate tried; it doubles until a run fails.
        #[arg(long, default_value_t = 5_000.0)]
        start: f64,
        /// The p99 delivery latency a sustained run stays under.
        #[arg(long, default_value_t = 50.0)]
        p99_ms: f64,
        /// Bisection steps after the first failure.
        #[arg(long, default_value_t = 3)]
        refine: usize,
        /// Never offer more than this.
        #[arg(long, default_value_t = 400_000.0)]
        ceiling: f64,
        /// First measure the PostgreSQL floor (the store's batch call driven
        /// directly) and read each sustained rate as a share of it.
        #[arg(long)]
        floor: bool,
    },
    /// The PostgreSQL floor alone: what the machine's PostgreSQL takes of
    /// Parley's writes, the store's batch call driven directly.
    Floor {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Batch sizes tried, each with one and with two writers.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        batches: Vec<usize>,
    },
    /// A device coming back to many missed messages (Parley only).
    Catchup {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100_000)]
        missed: u64,
        /// Users sending them.
        #[arg(long, default_value_t = 500)]
        senders: usize,
        /// Messages per second while filling the inbox.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
    },
    /// Uploads and downloads of a large file, through the embedded
    /// default's own endpoint and through an S3 server (s3s-fs), and the
    /// 1:1 message latency alone and while files move (Parley only).
    Media {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Messages per second offered during the latency runs.
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
        /// The file's size, in MiB.
        #[arg(long, default_value_t = 10)]
        mb: u64,
        /// Uploads and downloads timed, each.
        #[arg(long, default_value_t = 5)]
        files: usize,
        /// Stores measured: `local` (the data directory) and `s3`.
        #[arg(long, value_delimiter = ',', default_value = "local,s3")]
        stores: Vec<String>,
    },
    /// Runs Parley on the embedded default (what `parley up` runs); used by the benchmark.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        admin_listen: SocketAddr,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Systems to measure, in this order; ratios are to the first.
    #[arg(long, value_delimiter = ',', default_value = "parley")]
    systems: Vec<System>,
    /// Also write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Gateways and chat services for parley-cluster.
    #[arg(long, default_value_t = 2)]
    cluster_gateways: usize,
    #[arg(long, default_value_t = 2)]
    cluster_chats: usize,
}

#[derive(Args, Clone)]
struct Load {
    /// Connections (one user each).
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Seconds of traffic per run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// 1:1 partners per endpoint (ignored with --group).
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Fan-out: groups of this many members instead of 1:1.
    #[arg(long)]
    group: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Load {
    fn workload(&self, rate: f64) -> Workload {
        Workload {
            endpoints: self.endpoints,
            rate,
            duration: Duration::from_secs_f64(self.secs),
            size: self.size,
            shape: match self.group {
                Some(size) => Shape::Group { size },
                None => Shape::Direct { peers: self.peers },
            },
            seed: self.seed,
        }
    }
}

fn env(common: &Common) -> anyhow::Result<Env> {
    Ok(Env {
        exe: std::env::current_exe()?,
        cluster: (common.cluster_gateways, common.cluster_chats),
    })
}

fn main() -> anyhow::Result<()> {
    // The cluster's processes are this binary too: `gateway …` and `chat …`
    // run exactly the code of parley-gateway and parley-chat.
    let mut args = std::env::args_os();
    let _ = args.next();
    let first = args.next();
    if let Some(role @ ("gateway" | "chat")) = first.as_ref().and_then(|a| a.to_str()) {
        let argv = std::iter::once(OsString::from(format!("parley-{role}"))).chain(args);
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(async move {
            if role == "gateway" {
                parley_gateway::cli::run(argv).await
            } else {
                parley_chat::cli::run(argv).await
            }
        });
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            data_dir,
            listen,
            admin_listen,
        } => serve(data_dir, listen, admin_listen).await,
        Command::Media {
            common,
            load,
            rate,
            mb,
            files,
            stores,
        } => {
            let env = env(&common)?;
            let mut rows = Vec::new();
            for store in &stores {
                let r =
                    parley_bench::media::run(&env, store, mb, files, load.workload(rate)).await?;
                eprintln!("{}", parley_bench::media::table(std::slice::from_ref(&r)));
                rows.push(r);
            }
            print!("{}", parley_bench::media::table(&rows));
            save(&common, &rows)
        }
        Command::Idle {
            common,
            counts,
            ramp,
            hold_secs,
        } => {
            let env = env(&common)?;
            let mut rows = Vec::new();
            for &n in &counts {
                for &system in &common.systems {
                    let server = Server::start(system, &env).await?;
                    let r = parley_bench::idle(
                        system,
                        &server,
                        n,
                        ramp,
                        Duration::from_secs(hold_secs),
                    )
                    .await?;
                    eprintln!("{}", table::idle(std::slice::from_ref(&r)));
                    rows.push(r);
                }
            }
            print!("{}", table::idle(&rows));
            save(&common, &rows)
        }
        Command::Run {
            common,
            load,
            rate,
            repeat,
        } => {
            let env = env(&common)?;
            let mut rows = Vec::new();
            for &system in &common.systems {
                let server = Server::start(system, &env).await?;
                for _ in 0..repeat.max(1) {
                    let t = parley_bench::traffic(system, &server, load.workload(rate)).await?;
                    if repeat > 1 {
                        eprintln!("  {}", table::step_line(&t));
                    }
                    rows.push(t);
                }
                server.stop().await;
            }
            print!("{}", table::traffic(&rows));
            print!("\n{}", table::cpu_split(&rows));
            save(&common, &rows)
        }
        Command::Throughput {
            common,
            load,
            start,
            p99_ms,
            refine,
            ceiling,
            floor,
        } => {
            let env = env(&common)?;
            let floor = match floor {
                true => Some(measure_floor(&load, &[1, 16, 64, 256]).await?),
                false => None,
            };
            let mut rows = Vec::new();
            for &system in &common.systems {
                eprintln!("{}:", system.name());
                let server = Server::start(system, &env).await?;
                let t = parley_bench::throughput(
                    system,
                    &server,
                    load.workload(start),
                    p99_ms,
                    refine,
                    ceiling,
                )
                .await?;
                rows.push(t);
            }
            print!("{}", table::throughput(&rows));
            let halves: Vec<_> = rows.iter().filter_map(|t| t.half.clone()).collect();
            println!("\nat half the sustained rate:");
            print!("{}", table::traffic(&halves));
            print!("\n{}", table::cpu_split(&halves));
            match floor {
                Some(floor) => {
                    print!("\n{}", table::floor(&floor, &rows));
                    save(
                        &common,
                        &serde_json::json!({ "throughput": rows, "floor": floor }),
                    )
                }
                None => save(&common, &rows),
            }
        }
        Command::Floor {
            common,
            load,
            batches,
        } => {
            let floor = measure_floor(&load, &batches).await?;
            print!("{}", table::floor(&floor, &[]));
            save(&common, &floor)
        }
        Command::Catchup {
            common,
            missed,
            senders,
            rate,
        } => {
            let env = env(&common)?;
            let mut rows = Vec::new();
            for &system in &common.systems {
                let server = Server::start(system, &env).await?;
                let Server::Parley(p) = &server else {
                    anyhow::bail!("the catch-up scenario is Parley's only");
                };
                let c = parley_bench::parley::catch_up(p, missed, senders, rate, 100).await?;
                print!("{}: {}", system.name(), table::catch_up(&c));
                rows.push(c);
            }
            save(&common, &rows)
        }
    }
}

/// The PostgreSQL floor for the 1:1 workload of `load`.
async fn measure_floor(
    load: &Load,
    batches: &[usize],
) -> anyhow::Result<parley_bench::floor::Floor> {
    eprintln!("postgres floor:");
    parley_bench::floor::measure(load.endpoints, load.peers, load.size, load.secs, batches).await
}

fn save(common: &Common, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = &common.json {
        write_json(path, value)?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}

/// Parley on the embedded default, configured as `parley up` is.
async fn serve(
    data_dir: PathBuf,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Result<()> {
    parley_ops::init_logging();
    let mut cfg = parley::EmbeddedConfig::ephemeral(data_dir);
    cfg.listen = listen;
    cfg.ws_listen = None;
    cfg.admin_listen = admin_listen;
    cfg.admin_key = std::env::var("PARLEY_ADMIN_KEY").ok();
    cfg.token_secret = std::env::var("PARLEY_TOKEN_SECRET").ok();
    // Uploads in an S3 store when the environment names one (`media`).
    let var = |n: &str| std::env::var(n).ok();
    if let Some(bucket) = var("PARLEY_MEDIA_S3_BUCKET") {
        cfg.s3 = Some(parley_media::S3Config {
            bucket,
            endpoint: var("PARLEY_MEDIA_S3_ENDPOINT"),
            public_endpoint: None,
            region: var("PARLEY_MEDIA_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
            access_key: var("PARLEY_MEDIA_S3_ACCESS_KEY").unwrap_or_default(),
            secret_key: var("PARLEY_MEDIA_S3_SECRET_KEY").unwrap_or_default(),
        });
    }
    let server = parley::Embedded::start(cfg).await?;
    parley_ops::terminated().await;
    server.shutdown().await;
    Ok(())
}
