//! `parley-push`: the push sender of a Parley cluster, a process of its
//! own (as many replicas as the load needs; they share one queue). It
//! consumes the cues the chat services publish for users with no device
//! online, reads tokens and settings from PostgreSQL, asks presence and
//! keeps its ledger in Redis, and sends through the providers its flags
//! configure. A cue batch is acked once handled; notifications that
//! failed for good are dead-lettered (`P.push.dead`, JSON). The binary is
//! a thin `main` over [`run`], so the e2e tests start exactly this code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use clap::Parser;
use parley_amqp::{AmqpConfig, CueBatch, CueFeed};
use parley_ops::args::BackendArgs;
use parley_ops::{self as ops, BackendMetrics, Probe, Readiness};
use parley_redis::RedisState;
use parley_store::PgStore;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::cli::PushArgs;
use crate::webhook::WebhookNotification;
use crate::{
    MAX_BATCH, Notification, PushConfig, PushSender, log_failed, offline_cues, provider_label,
};

#[derive(Parser)]
#[command(
    name = "parley-push",
    version,
    about = "The push sender of a Parley cluster"
)]
struct Args {
    /// PostgreSQL (the chat services' database), e.g.
    /// postgres://user:pass@host:5432/parley
    #[arg(long, env = "PARLEY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The tables' schema, as the chat services use it.
    #[arg(long, env = "PARLEY_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// Database connections of this sender.
    #[arg(long, env = "PARLEY_DATABASE_POOL", default_value_t = 4)]
    database_pool: u32,
    /// Health (/healthz, /readyz) and metrics (/metrics).
    #[arg(long, env = "PARLEY_OPS_LISTEN", default_value = "0.0.0.0:7601")]
    ops_listen: SocketAddr,
    /// This sender's name, in the broker's consumer list (default: the
    /// host name, a pod's name in Kubernetes).
    #[arg(long, env = "PARLEY_PUSH_NAME")]
    name: Option<String>,
    /// Cue batches held at once (each one commit's cues).
    #[arg(long, env = "PARLEY_PUSH_PREFETCH", default_value_t = 64)]
    prefetch: u16,
    /// Groups of cue batches handled at once.
    #[arg(long, env = "PARLEY_PUSH_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Tries per notification before it is dead-lettered.
    #[arg(long, env = "PARLEY_PUSH_ATTEMPTS", default_value_t = 5)]
    attempts: u32,
    /// The wait before the second try, in milliseconds; it doubles with
    /// each try, up to --push-max-backoff-ms.
    #[arg(long, env = "PARLEY_PUSH_BACKOFF_MS", default_value_t = 500)]
    push_backoff_ms: u64,
    #[arg(long, env = "PARLEY_PUSH_MAX_BACKOFF_MS", default_value_t = 30_000)]
    push_max_backoff_ms: u64,
    #[command(flatten)]
    backends: BackendArgs,
    #[command(flatten)]
    push: PushArgs,
}

struct Node {
    store: PgStore,
    redis: RedisState,
    feed_status: Arc<parley_amqp::LinkStatus>,
    draining: AtomicBool,
    backends: BackendMetrics,
    registry: Registry,
}

#[async_trait]
impl Probe for Node {
    /// The broker and the database are what a sender cannot work
    /// without; without Redis it sends anyway (presence unknown: every
    /// cue stays; the ledger unread: a redelivered cue may be sent again).
    async fn ready(&self) -> Readiness {
        let mut r = Readiness::default();
        if self.draining.load(Ordering::Relaxed) {
            r.blockers.push("draining".to_owned());
        }
        let (pg, redis) = tokio::join!(self.store.ping(), self.redis.ping());
        self.backends.set_up("postgres", pg);
        self.backends.set_up("redis", redis);
        if !pg {
            r.blockers.push("postgres is unreachable".to_owned());
        }
        if !redis {
            r.degraded.push("redis is unreachable".to_owned());
        }
        if !self.feed_status.connected() {
            r.blockers.push("rabbitmq is unreachable".to_owned());
        }
        r
    }

    fn metrics(&self) -> String {
        self.backends
            .set_up("rabbitmq", self.feed_status.connected());
        self.backends
            .set_reconnects("rabbitmq", self.feed_status.reconnects());
        ops::encode(&self.registry)
    }
}

/// What a dead letter says (JSON on `P.push.dead`).
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub provider: &'static str,
    pub reason: String,
    pub failed_at_ms: i64,
    pub notification: WebhookNotification,
}

impl DeadLetter {
    pub fn of(n: &Notification, reason: &str) -> Self {
        Self {
            provider: provider_label(n.provider),
            reason: reason.to_owned(),
            failed_at_ms: parley_core::now_ms(),
            notification: WebhookNotification::from(n),
        }
    }
}

/// Handles cue batches as the broker hands them over, `concurrency`
/// groups at once, until `stop` resolves; then waits (at most `grace`)
/// for the groups in hand. What is still unacked when the process ends
/// goes back to the queue with its connection.
pub async fn serve(
    sender: Arc<PushSender>,
    mut feed: CueFeed,
    concurrency: usize,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let dead = feed.dead_letters();
    tokio::pin!(stop);
    loop {
        let first = tokio::select! {
            b = feed.batches.recv() => match b {
                Some(b) => b,
                None => break,
            },
            () = &mut stop => break,
        };
        let mut group = vec![first];
        let mut cues: usize = group[0].cues.len();
        while cues < MAX_BATCH {
            match feed.batches.try_recv() {
                Ok(b) => {
                    cues += b.cues.len();
                    group.push(b);
                }
                Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (sender, dead) = (sender.clone(), dead.clone());
        tokio::spawn(async move {
            handle_group(&sender, &dead, group).await;
            drop(slot);
        });
    }
    // Every slot back: the groups in hand are done.
    let all = u32::try_from(concurrency.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}

async fn handle_group(
    sender: &PushSender,
    dead: &tokio::sync::mpsc::Sender<Vec<u8>>,
    group: Vec<CueBatch>,
) {
    use futures_util::FutureExt as _;
    let cues: Vec<_> = group.iter().flat_map(|b| offline_cues(&b.cues)).collect();
    let handled = std::panic::AssertUnwindSafe(sender.handle_patiently(cues, 2))
        .catch_unwind()
        .await;
    match handled {
        Ok(Ok(handled)) => {
            log_failed(&handled.failed, "push notification failed; dead-lettered");
            for (n, reason) in &handled.failed {
                let body = serde_json::to_vec(&DeadLetter::of(n, reason)).unwrap_or_default();
                if dead.try_send(body).is_err() {
                    tracing::warn!("dead-letter queue full; the failure is only logged");
                }
            }
            for b in &group {
                b.ack().await;
            }
        }
        // The store could not be read: back to the queue (another replica
        // may fare better), unless the batch came back once already and
        // failed again (an error that will not go away must not go round
        // for a day).
        Ok(Err(e)) => {
            for b in &group {
                if b.redelivered {
                    tracing::error!(error = %e, cues = b.cues.len(), "push batch failed twice; dropped");
                    b.ack().await;
                } else {
                    tracing::warn!(error = %e, "push batch failed; back to the queue");
                    b.retry().await;
                }
            }
        }
        // A bug: logged, and the batches acked, so that the queue goes on
        // (unacked, they would hold the prefetch for good).
        Err(_) => {
            tracing::error!(
                batches = group.len(),
                "a push group panicked; its cues are dropped"
            );
            for b in &group {
                b.ack().await;
            }
        }
    }
}

/// Parses `args` (the program name first) and runs until SIGTERM or Ctrl-C.
pub async fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    ops::init_logging();
    let args = Args::parse_from(args);
    let providers = args.push.providers().map_err(anyhow::Error::msg)?;
    if providers.is_empty() {
        tracing::warn!(
            "no provider configured (--apns-key-file, --fcm-credentials-file, \
             --push-webhook-url): every notification is counted as unconfigured"
        );
    }
    let url = args
        .database_url
        .as_deref()
        .context("--database-url (PARLEY_DATABASE_URL) is required")?;
    let store =
        PgStore::connect_patiently(url, args.database_schema.as_deref(), args.database_pool)
            .await
            .context("connecting to PostgreSQL")?;
    let redis = RedisState::new(&args.backends.redis_url, &args.backends.prefix)?;
    let name = args
        .name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("push-{}", std::process::id()));
    let feed = parley_amqp::consume_cues(
        AmqpConfig {
            url: args.backends.amqp_url.clone(),
            prefix: args.backends.prefix.clone(),
        },
        &name,
        args.prefetch,
    );
    let sender = Arc::new(PushSender::new(
        Arc::new(store.clone()),
        Arc::new(redis.clone()),
        providers.build().map_err(anyhow::Error::msg)?,
        Arc::new(redis.clone()),
        PushConfig {
            attempts: args.attempts.max(1),
            first_backoff: Duration::from_millis(args.push_backoff_ms),
            max_backoff: Duration::from_millis(args.push_max_backoff_ms),
        },
    ));
    let mut registry = Registry::with_prefix("parley");
    sender.metrics().register(&mut registry);
    let backends = BackendMetrics::default();
    backends.register(&mut registry);
    let node = Arc::new(Node {
        store,
        redis,
        feed_status: feed.status.clone(),
        draining: AtomicBool::new(false),
        backends,
        registry,
    });
    let ops_listener = ops::bind(args.ops_listen, "ops").await?;
    tracing::info!(
        ops = %args.ops_listen,
        prefix = %args.backends.prefix,
        name,
        "push sender starting"
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let probe: Arc<dyn Probe> = node.clone();
    let mut ops_stop = stop_rx.clone();
    let ops_task = tokio::spawn(ops::serve(ops_listener, ops::router(probe), async move {
        let _ = ops_stop.wait_for(|s| *s).await;
    }));
    let draining = node.clone();
    serve(
        sender,
        feed,
        args.concurrency,
        Duration::from_secs(20),
        async move {
            ops::terminated().await;
            tracing::info!("stopping: finishing the notifications in hand");
            draining.draining.store(true, Ordering::Relaxed);
        },
    )
    .await;
    let _ = stop.send(true);
    let _ = ops_task.await;
    tracing::info!("push sender stopped");
    Ok(())
}
