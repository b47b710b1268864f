//! The `parley-chat` command line: one chat-service replica of a Parley
//! cluster, on PostgreSQL, Redis and RabbitMQ. `parley-chat migrate` only
//! brings the database schema up to date; without a command it serves
//! (migrating first unless told not to). Every flag has an environment
//! variable of the same name in the PARLEY_ scheme (see `--help` and
//! docs/cluster.md). The binary is a thin `main` over `run`, so the e2e
//! tests start exactly this code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use clap::{Parser, Subcommand};
use parley_amqp::{AmqpBus, AmqpConfig};
use parley_core::{ChatConfig, ChatService, TokenKeys};
use parley_ops::args::BackendArgs;
use parley_ops::{self as ops, BackendMetrics, Probe, Readiness};
use parley_redis::RedisState;
use parley_store::PgStore;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "parley-chat", version, about = "A Parley chat-service replica")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Bring the database schema up to date, then exit.
    Migrate,
}

#[derive(clap::Args)]
struct DbArgs {
    /// PostgreSQL, e.g. postgres://user:pass@host:5432/parley
    #[arg(long, env = "PARLEY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Keep the tables in this schema (created if missing).
    #[arg(long, env = "PARLEY_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// Database connections of this replica.
    #[arg(long, env = "PARLEY_DATABASE_POOL", default_value_t = 16)]
    database_pool: u32,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// gRPC for gateways.
    #[arg(long, env = "PARLEY_INTERNAL_LISTEN", default_value = "0.0.0.0:7500")]
    internal_listen: SocketAddr,
    /// Admin gRPC for the app's backend.
    #[arg(long, env = "PARLEY_ADMIN_LISTEN", default_value = "0.0.0.0:7402")]
    admin_listen: SocketAddr,
    /// Health (/healthz, /readyz) and metrics (/metrics).
    #[arg(long, env = "PARLEY_OPS_LISTEN", default_value = "0.0.0.0:7501")]
    ops_listen: SocketAddr,
    #[arg(long, env = "PARLEY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Token-signing secret, at least 32 bytes, the same on every replica.
    #[arg(long, env = "PARLEY_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// The previous token-signing secret, during a rotation: tokens signed
    /// with it are still accepted (new ones are signed with the current
    /// secret). Drop it once the tokens it signed have expired.
    #[arg(long, env = "PARLEY_TOKEN_SECRET_PREVIOUS", hide_env_values = true)]
    token_secret_previous: Option<String>,
    /// Seconds a token passes after its `exp` (and before its `nbf`): the
    /// clock skew allowed between the token's minter and this service.
    #[arg(long, env = "PARLEY_TOKEN_LEEWAY_SECS", default_value_t = parley_core::token::DEFAULT_LEEWAY_SECS)]
    token_leeway_secs: u64,
    #[command(flatten)]
    backends: BackendArgs,
    /// Do not migrate on start (when a job runs `parley-chat migrate`).
    #[arg(long, env = "PARLEY_NO_MIGRATE")]
    no_migrate: bool,
    /// Remove messages older than this many days (0 keeps everything).
    #[arg(long, env = "PARLEY_RETENTION_DAYS", default_value_t = 0)]
    retention_days: u64,
    #[command(flatten)]
    conversations: ConversationArgs,
    /// Milliseconds between turning unready and closing the listeners.
    #[arg(long, env = "PARLEY_DRAIN_PAUSE_MS", default_value_t = 2_000)]
    drain_pause_ms: u64,
    /// Microseconds a batch of sends short of its largest size may wait for
    /// more before it is committed, from its first send's arrival, while
    /// sends arrive at least that often (0: never wait).
    #[arg(long, env = "PARLEY_BATCH_LINGER_US", default_value_t = 2_000)]
    batch_linger_us: u64,
    /// Milliseconds after Redis lost its data (a restart without
    /// persistence) during which deliveries go to every gateway, while the
    /// gateways write their sessions back. Longer than the gateways' lease
    /// interval.
    #[arg(long, env = "PARLEY_PRESENCE_SETTLE_MS", default_value_t = parley_redis::PRESENCE_SETTLE.as_millis() as u64)]
    presence_settle_ms: u64,
    #[cfg(feature = "media")]
    #[command(flatten)]
    s3: S3Args,
    #[cfg(feature = "media")]
    #[command(flatten)]
    media_dir: MediaDirArgs,
    #[command(flatten)]
    media: MediaArgs,
}

/// Connects, waiting while the database is not up yet.
async fn connect(db: &DbArgs) -> anyhow::Result<PgStore> {
    let url = db
        .database_url
        .as_deref()
        .context("--database-url (PARLEY_DATABASE_URL) is required")?;
    PgStore::connect_patiently(url, db.database_schema.as_deref(), db.database_pool)
        .await
        .context("connecting to PostgreSQL")
}

struct Node {
    store: PgStore,
    redis: RedisState,
    bus: Arc<AmqpBus>,
    draining: AtomicBool,
    backends: BackendMetrics,
    registry: Registry,
}

#[async_trait]
impl Probe for Node {
    /// PostgreSQL is required: it is where every message commits. Without
    /// Redis or RabbitMQ sends still commit and devices get them by sync, so
    /// those only degrade the service (taking every replica out of service
    /// during a broker outage would stop sends too).
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
        if !self.bus.status().connected() {
            r.degraded.push("rabbitmq is unreachable".to_owned());
        }
        r
    }

    fn metrics(&self) -> String {
        let status = self.bus.status();
        self.backends.set_up("rabbitmq", status.connected());
        self.backends
            .set_reconnects("rabbitmq", status.reconnects());
        ops::encode(&self.registry)
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
    let store = connect(&args.db).await?;
    if let Some(Command::Migrate) = args.command {
        store.migrate().await.context("migrating")?;
        tracing::info!("database schema is up to date");
        return Ok(());
    }
    let a = args.serve;
    if !a.no_migrate {
        store.migrate().await.context("migrating")?;
    }
    let admin_key = a
        .admin_key
        .context("--admin-key (PARLEY_ADMIN_KEY) is required")?;
    let secret = a
        .token_secret
        .context("--token-secret (PARLEY_TOKEN_SECRET) is required")?;
    let mut tokens = TokenKeys::new(secret.as_bytes())?.with_leeway(a.token_leeway_secs);
    if let Some(previous) = &a.token_secret_previous {
        tokens = tokens.with_previous(previous.as_bytes())?;
    }

    let redis = RedisState::new(&a.backends.redis_url, &a.backends.prefix)?
        .with_presence_settle(Duration::from_millis(a.presence_settle_ms));
    let bus = Arc::new(AmqpBus::start(AmqpConfig {
        url: a.backends.amqp_url.clone(),
        prefix: a.backends.prefix.clone(),
    }));
    #[cfg(feature = "media")]
    let blobs = match (a.s3.storage()?, a.media_dir.storage()?) {
        (Some(_), Some(_)) => {
            anyhow::bail!("media go to an S3 bucket or a shared directory, not both")
        }
        (s3, dir) => s3.or(dir),
    };
    #[cfg(not(feature = "media"))]
    let blobs: Option<Arc<dyn parley_core::BlobStorage>> = None;
    if blobs.is_none() {
        tracing::info!("no --media-s3-bucket or --media-dir: this replica stores no media");
    }
    let config = ChatConfig {
        retention: (a.retention_days > 0)
            .then(|| Duration::from_secs(a.retention_days * 24 * 3600)),
        batch_linger: Duration::from_micros(a.batch_linger_us),
        media: a.media.limits()?,
        blobs,
        ..a.conversations.apply(ChatConfig::default())
    };
    let chat = ChatService::start(
        Arc::new(store.clone()),
        Arc::new(redis.clone()),
        bus.clone(),
        tokens,
        config,
    );
    let mut registry = Registry::with_prefix("parley");
    chat.metrics().register(&mut registry);
    let backends = BackendMetrics::default();
    backends.register(&mut registry);
    let node = Arc::new(Node {
        store,
        redis,
        bus: bus.clone(),
        draining: AtomicBool::new(false),
        backends,
        registry,
    });

    let internal = ops::bind(a.internal_listen, "internal").await?;
    let admin = ops::bind(a.admin_listen, "admin").await?;
    let ops_listener = ops::bind(a.ops_listen, "ops").await?;
    tracing::info!(
        internal = %a.internal_listen,
        admin = %a.admin_listen,
        ops = %a.ops_listen,
        prefix = %a.backends.prefix,
        "chat service starting"
    );

    let (stop, stop_rx) = watch::channel(false);
    let until_stopped = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let internal_task = tokio::spawn(crate::internal::serve(
        internal,
        chat.clone(),
        a.backends.internal_key,
        until_stopped(&stop_rx),
    ));
    let admin_task = tokio::spawn(crate::admin::serve(
        admin,
        chat.clone(),
        admin_key,
        until_stopped(&stop_rx),
    ));
    let probe: Arc<dyn Probe> = node.clone();
    let ops_task = tokio::spawn(ops::serve(
        ops_listener,
        ops::router(probe),
        until_stopped(&stop_rx),
    ));

    ops::terminated().await;
    tracing::info!("draining");
    node.draining.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(a.drain_pause_ms)).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = internal_task.await;
        let _ = admin_task.await;
    })
    .await;
    if let Err(e) = chat.flush_cursors().await {
        tracing::warn!(error = %e, "acked cursors not written at exit");
    }
    // Give confirmed publishing a moment to empty its queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = ops_task.await;
    tracing::info!("chat service stopped");
    Ok(())
}

/// The upload rules: per-kind limits, the daily quota, garbage collection.
#[derive(clap::Args, Debug, Clone)]
pub struct MediaArgs {
    /// Largest image upload, in MiB.
    #[arg(long, env = "PARLEY_MEDIA_MAX_IMAGE_MB", default_value_t = 20)]
    media_max_image_mb: u64,
    /// Largest voice upload, in MiB.
    #[arg(long, env = "PARLEY_MEDIA_MAX_VOICE_MB", default_value_t = 20)]
    media_max_voice_mb: u64,
    /// Largest video upload, in MiB.
    #[arg(long, env = "PARLEY_MEDIA_MAX_VIDEO_MB", default_value_t = 500)]
    media_max_video_mb: u64,
    /// Largest file upload, in MiB.
    #[arg(long, env = "PARLEY_MEDIA_MAX_FILE_MB", default_value_t = 1024)]
    media_max_file_mb: u64,
    /// MIME types allowed for images, comma-separated ("type/*" and "*/*"
    /// match any subtype).
    #[arg(
        long,
        env = "PARLEY_MEDIA_IMAGE_TYPES",
        default_value = "image/jpeg,image/png,image/gif,image/webp,image/heic,image/heif,image/avif"
    )]
    media_image_types: String,
    /// MIME types allowed for voice.
    #[arg(long, env = "PARLEY_MEDIA_VOICE_TYPES", default_value = "audio/*")]
    media_voice_types: String,
    /// MIME types allowed for video.
    #[arg(long, env = "PARLEY_MEDIA_VIDEO_TYPES", default_value = "video/*")]
    media_video_types: String,
    /// MIME types allowed for files.
    #[arg(long, env = "PARLEY_MEDIA_FILE_TYPES", default_value = "*/*")]
    media_file_types: String,
    /// Uploads one user may start in 24 hours (0: no quota).
    #[arg(long, env = "PARLEY_MEDIA_DAILY_UPLOADS", default_value_t = 1000)]
    media_daily_uploads: u64,
    /// MiB one user may upload in 24 hours (0: no quota).
    #[arg(long, env = "PARLEY_MEDIA_DAILY_MB", default_value_t = 5120)]
    media_daily_mb: u64,
    /// Hours a completed upload no message uses is kept.
    #[arg(long, env = "PARLEY_MEDIA_UNUSED_GRACE_HOURS", default_value_t = 24)]
    media_unused_grace_hours: u64,
}

impl MediaArgs {
    /// The rules these flags set.
    pub fn limits(&self) -> anyhow::Result<parley_core::MediaLimits> {
        use parley_core::media::{KindLimits, check_mime};
        const MIB: u64 = 1024 * 1024;
        let kind = |mb: u64, types: &str, flag: &str| -> anyhow::Result<KindLimits> {
            let mime_types: Vec<String> = types
                .split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect();
            for t in &mime_types {
                let concrete = t.replace('*', "x");
                check_mime(&concrete).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
            }
            anyhow::ensure!(!mime_types.is_empty(), "--{flag} names no MIME type");
            anyhow::ensure!(mb > 0, "a size limit is at least 1 MiB");
            Ok(KindLimits {
                max_bytes: mb.saturating_mul(MIB),
                mime_types,
            })
        };
        Ok(parley_core::MediaLimits {
            image: kind(
                self.media_max_image_mb,
                &self.media_image_types,
                "media-image-types",
            )?,
            voice: kind(
                self.media_max_voice_mb,
                &self.media_voice_types,
                "media-voice-types",
            )?,
            video: kind(
                self.media_max_video_mb,
                &self.media_video_types,
                "media-video-types",
            )?,
            file: kind(
                self.media_max_file_mb,
                &self.media_file_types,
                "media-file-types",
            )?,
            daily_uploads: self.media_daily_uploads,
            daily_bytes: self.media_daily_mb.saturating_mul(MIB),
            unused_grace: Duration::from_secs(self.media_unused_grace_hours.max(1) * 3600),
            ..parley_core::MediaLimits::default()
        })
    }
}

/// The S3-compatible store uploads live in (MinIO, AWS S3, ...).
#[cfg(feature = "media")]
#[derive(clap::Args, Clone, Default)]
pub struct S3Args {
    /// The bucket (it must exist); without it, this server stores no media.
    #[arg(long, env = "PARLEY_MEDIA_S3_BUCKET")]
    pub media_s3_bucket: Option<String>,
    /// The store's endpoint as Parley reaches it, e.g. http://minio.minio:9000
    /// (default: AWS S3).
    #[arg(long, env = "PARLEY_MEDIA_S3_ENDPOINT")]
    pub media_s3_endpoint: Option<String>,
    /// The endpoint clients reach the store at, as presigned URLs name it
    /// (default: --media-s3-endpoint).
    #[arg(long, env = "PARLEY_MEDIA_S3_PUBLIC_ENDPOINT")]
    pub media_s3_public_endpoint: Option<String>,
    #[arg(long, env = "PARLEY_MEDIA_S3_REGION", default_value = "us-east-1")]
    pub media_s3_region: String,
    #[arg(long, env = "PARLEY_MEDIA_S3_ACCESS_KEY", hide_env_values = true)]
    pub media_s3_access_key: Option<String>,
    #[arg(long, env = "PARLEY_MEDIA_S3_SECRET_KEY", hide_env_values = true)]
    pub media_s3_secret_key: Option<String>,
}

#[cfg(feature = "media")]
impl std::fmt::Debug for S3Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("S3Args")
            .field("bucket", &self.media_s3_bucket)
            .field("endpoint", &self.media_s3_endpoint)
            .field("public_endpoint", &self.media_s3_public_endpoint)
            .field("region", &self.media_s3_region)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "media")]
impl S3Args {
    /// The store these flags name, if any.
    pub fn config(&self) -> anyhow::Result<Option<parley_media::S3Config>> {
        let Some(bucket) = &self.media_s3_bucket else {
            return Ok(None);
        };
        Ok(Some(parley_media::S3Config {
            bucket: bucket.clone(),
            endpoint: self.media_s3_endpoint.clone(),
            public_endpoint: self.media_s3_public_endpoint.clone(),
            region: self.media_s3_region.clone(),
            access_key: self
                .media_s3_access_key
                .clone()
                .context("--media-s3-access-key (PARLEY_MEDIA_S3_ACCESS_KEY) is required")?,
            secret_key: self
                .media_s3_secret_key
                .clone()
                .context("--media-s3-secret-key (PARLEY_MEDIA_S3_SECRET_KEY) is required")?,
        }))
    }

    /// The storage of the store these flags name, if any.
    pub fn storage(&self) -> anyhow::Result<Option<Arc<dyn parley_core::BlobStorage>>> {
        let Some(config) = self.config()? else {
            return Ok(None);
        };
        let storage = parley_media::MediaStorage::s3(&config)
            .with_context(|| format!("the media store {config:?}"))?;
        Ok(Some(Arc::new(storage)))
    }
}

/// The rules of conversations beside messages: receipts, recalls and
/// edits. The same flags on `parley up` and the chat service.
#[derive(clap::Args, Clone, Debug)]
pub struct ConversationArgs {
    /// Largest group whose members see each other's read receipts live and
    /// by name (past it, only a count on request).
    #[arg(long, env = "PARLEY_RECEIPT_GROUP_LIMIT", default_value_t = 100)]
    receipt_group_limit: usize,
    /// Seconds after sending during which a sender may recall a message.
    #[arg(long, env = "PARLEY_RECALL_WINDOW_SECS", default_value_t = 24 * 3600)]
    recall_window_secs: u64,
    /// Seconds after sending during which a sender may edit a message.
    #[arg(long, env = "PARLEY_EDIT_WINDOW_SECS", default_value_t = 48 * 3600)]
    edit_window_secs: u64,
    /// Days the texts replaced by edits are kept for the edit history.
    #[arg(long, env = "PARLEY_EDIT_HISTORY_DAYS", default_value_t = 7)]
    edit_history_days: u64,
}

impl ConversationArgs {
    /// `config` with these rules.
    pub fn apply(&self, config: ChatConfig) -> ChatConfig {
        ChatConfig {
            receipt_group_limit: self.receipt_group_limit,
            recall_window: Duration::from_secs(self.recall_window_secs),
            edit_window: Duration::from_secs(self.edit_window_secs),
            edit_history_kept: Duration::from_secs(self.edit_history_days * 24 * 3600),
            ..config
        }
    }
}

/// Uploads in a directory every chat-service replica and gateway mounts
/// (a ReadWriteMany volume): the chat services sign URLs for the gateways'
/// public HTTP port, where the gateways take and serve the bytes.
#[cfg(feature = "media")]
#[derive(clap::Args, Clone, Default)]
pub struct MediaDirArgs {
    /// The shared directory; without it (or an S3 bucket), this server
    /// stores no media.
    #[arg(long, env = "PARLEY_MEDIA_DIR")]
    pub media_dir: Option<std::path::PathBuf>,
    /// The key the URLs are signed with, at least 32 bytes: the same on
    /// every chat service and gateway.
    #[arg(long, env = "PARLEY_MEDIA_KEY", hide_env_values = true)]
    pub media_key: Option<String>,
    /// The base URL clients reach the gateways' public HTTP port at (their
    /// route lookup's), e.g. https://chat.example.com:7404.
    #[arg(long, env = "PARLEY_MEDIA_PUBLIC_URL")]
    pub media_public_url: Option<String>,
}

#[cfg(feature = "media")]
impl std::fmt::Debug for MediaDirArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MediaDirArgs")
            .field("dir", &self.media_dir)
            .field("public_url", &self.media_public_url)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "media")]
impl MediaDirArgs {
    /// The storage of the directory these flags name, if any.
    pub fn storage(&self) -> anyhow::Result<Option<Arc<dyn parley_core::BlobStorage>>> {
        let Some(dir) = &self.media_dir else {
            return Ok(None);
        };
        let key = self
            .media_key
            .as_deref()
            .context("--media-key (PARLEY_MEDIA_KEY) is required with --media-dir")?;
        let url = self.media_public_url.as_deref().context(
            "--media-public-url (PARLEY_MEDIA_PUBLIC_URL), the gateways' public HTTP address, \
             is required with --media-dir",
        )?;
        let storage = parley_media::MediaStorage::local(dir, url, key.as_bytes())
            .with_context(|| format!("the media directory {}", dir.display()))?;
        Ok(Some(Arc::new(storage)))
    }
}
