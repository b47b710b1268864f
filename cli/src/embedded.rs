//! Parley in one process: the SQLite store, in-memory presence, the
//! in-process bus, one gateway (TCP and WebSocket) and the admin API. Used by
//! `parley up` and by the tests, which start it on port 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parley_core::{ChatConfig, ChatService, LocalBus, MemoryPresence, TokenKeys};
use parley_gateway::{GatewayConfig, Listeners};
use parley_store::SqliteStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// None: no WebSocket listener.
    pub ws_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    /// None: read or create `<data_dir>/admin.key`.
    pub admin_key: Option<String>,
    /// None: read or create `<data_dir>/token.key`.
    pub token_secret: Option<String>,
    /// A previous token-signing secret still accepted (a rotation).
    pub token_secret_previous: Option<String>,
    /// The tokens' clock-skew allowance, in seconds.
    pub token_leeway_secs: u64,
    pub chat: ChatConfig,
    pub gateway: GatewayConfig,
    /// Health, metrics and the route lookup; None: not served.
    pub ops_listen: Option<SocketAddr>,
    /// The address the route lookup answers (default: the TCP listener's).
    pub advertise: Option<String>,
    /// The public HTTP endpoint: uploads' and downloads' signed URLs. None:
    /// no media (uploads are refused).
    pub http_listen: Option<SocketAddr>,
    /// The base URL clients reach that endpoint at (default:
    /// `http://<its address>`, an unspecified IP as 127.0.0.1).
    pub public_url: Option<String>,
    /// Uploads in an S3-compatible store instead of `<data_dir>/media`.
    pub s3: Option<parley_media::S3Config>,
    /// How long the endpoint waits on an upload whose bytes stopped
    /// coming before it lets it go for a resume.
    pub media_body_stall: Duration,
    /// Where push notifications go; none configured: no sender runs.
    pub push: parley_push::ProvidersConfig,
    /// How hard the push sender tries.
    pub push_tries: parley_push::PushConfig,
}

impl EmbeddedConfig {
    /// Defaults on loopback with ephemeral ports (for tests).
    pub fn ephemeral(data_dir: PathBuf) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            data_dir,
            listen: any,
            ws_listen: Some(any),
            admin_listen: any,
            admin_key: None,
            token_secret: None,
            token_secret_previous: None,
            token_leeway_secs: parley_core::token::DEFAULT_LEEWAY_SECS,
            chat: ChatConfig::default(),
            gateway: GatewayConfig::default(),
            ops_listen: Some(any),
            advertise: None,
            http_listen: Some(any),
            public_url: None,
            s3: None,
            media_body_stall: parley_media::BODY_STALL,
            push: parley_push::ProvidersConfig::default(),
            push_tries: parley_push::PushConfig::default(),
        }
    }
}

/// A running one-process Parley.
#[derive(Debug)]
pub struct Embedded {
    pub tcp_addr: SocketAddr,
    pub ws_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Health, metrics and the route lookup.
    pub ops_addr: Option<SocketAddr>,
    /// The public HTTP endpoint (media), and the base URL it is reached at.
    pub http_addr: Option<SocketAddr>,
    pub public_url: Option<String>,
    pub admin_key: String,
    pub chat: Arc<ChatService>,
    pub bus: Arc<LocalBus>,
    /// Which devices are online.
    pub presence: Arc<MemoryPresence>,
    /// The push sender, when a provider is configured.
    pub push: Option<Arc<parley_push::PushSender>>,
    stop: watch::Sender<bool>,
    gateway: JoinHandle<()>,
    admin: JoinHandle<()>,
    ops: Option<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
}

/// Reads a secret from `path`, creating a random one (mode 0600) if absent.
fn secret_file(path: &std::path::Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_owned());
    }
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(path)?, secret.as_bytes())?;
    Ok(secret)
}

impl Embedded {
    /// Opens the store, binds every listener and starts serving.
    pub async fn start(cfg: EmbeddedConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let admin_key = match cfg.admin_key {
            Some(k) => k,
            None => secret_file(&cfg.data_dir.join("admin.key"))?,
        };
        let token_secret = match cfg.token_secret {
            Some(s) => s,
            None => secret_file(&cfg.data_dir.join("token.key"))?,
        };
        let store: Arc<dyn parley_core::Store> =
            Arc::new(SqliteStore::open(&cfg.data_dir.join("parley.db")).await?);
        let mut chat_config = cfg.chat;
        let http = match cfg.http_listen {
            Some(a) => Some(parley_ops::bind(a, "HTTP").await?),
            None => None,
        };
        let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
        let public_url = http_addr.map(|a| {
            cfg.public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", parley_gateway::cli::advertised(a)))
        });
        let media = match (&cfg.s3, &public_url) {
            (Some(s3), _) => {
                chat_config.blobs = Some(Arc::new(parley_media::MediaStorage::s3(s3)?));
                None
            }
            (None, Some(url)) => {
                let key = secret_file(&cfg.data_dir.join("media.key"))?;
                let media = parley_media::MediaStorage::local(
                    &cfg.data_dir.join("media"),
                    url,
                    key.as_bytes(),
                )?
                .with_body_stall(cfg.media_body_stall);
                chat_config.blobs = Some(Arc::new(media.clone()));
                Some(media)
            }
            (None, None) => None,
        };
        let bus = Arc::new(LocalBus::default());
        let deliveries = bus.subscribe(&cfg.gateway.gateway_id, 1024);
        let presence = Arc::new(MemoryPresence::default());
        let mut tokens =
            TokenKeys::new(token_secret.as_bytes())?.with_leeway(cfg.token_leeway_secs);
        if let Some(previous) = &cfg.token_secret_previous {
            tokens = tokens.with_previous(previous.as_bytes())?;
        }
        let push = if cfg.push.is_empty() {
            None
        } else {
            let providers = cfg.push.build().map_err(anyhow::Error::msg)?;
            let sender = Arc::new(parley_push::PushSender::new(
                store.clone(),
                presence.clone(),
                providers,
                Arc::new(parley_push::MemoryLedger::default()),
                cfg.push_tries.clone(),
            ));
            tokio::spawn(parley_push::run_local(sender.clone(), bus.events()));
            Some(sender)
        };
        let chat = ChatService::start(store, presence.clone(), bus.clone(), tokens, chat_config);

        let tcp = TcpListener::bind(cfg.listen).await?;
        let ws = match cfg.ws_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let admin = TcpListener::bind(cfg.admin_listen).await?;
        let ops = match cfg.ops_listen {
            Some(a) => Some(parley_ops::bind(a, "ops").await?),
            None => None,
        };
        let ops_addr = ops.as_ref().map(|l| l.local_addr()).transpose()?;
        let tcp_addr = tcp.local_addr()?;
        let ws_addr = ws.as_ref().map(|l| l.local_addr()).transpose()?;
        let admin_addr = admin.local_addr()?;

        let (stop, stop_rx) = watch::channel(false);
        let shared = parley_gateway::Shared::new(cfg.gateway, chat.clone(), presence.clone(), None);
        tokio::spawn(parley_gateway::registry::follow_log_outs(
            shared.clone(),
            bus.revocations(),
        ));
        let advertise = cfg
            .advertise
            .unwrap_or_else(|| parley_gateway::cli::advertised(tcp_addr));
        let ops = ops.map(|listener| {
            let router = parley_gateway::lookup::one_process_ops(shared.clone(), advertise, |r| {
                chat.metrics().register(r);
                if let Some(push) = &push {
                    push.metrics().register(r);
                }
            });
            let mut ops_stop = stop_rx.clone();
            tokio::spawn(async move {
                let shutdown = async move { parley_ops::stopped(&mut ops_stop).await };
                if let Err(e) = parley_ops::serve(listener, router, shutdown).await {
                    tracing::error!(error = %e, "ops endpoints failed");
                }
            })
        });
        let http = http.zip(media).map(|(listener, media)| {
            let mut http_stop = stop_rx.clone();
            tokio::spawn(async move {
                let shutdown = async move { parley_ops::stopped(&mut http_stop).await };
                let router = parley_media::router(media);
                if let Err(e) = parley_ops::serve(listener, router, shutdown).await {
                    tracing::error!(error = %e, "HTTP endpoint failed");
                }
            })
        });
        let listeners = Listeners {
            tcp: Some(tcp),
            ws,
            ..Listeners::default()
        };
        let gateway = tokio::spawn(parley_gateway::run(
            listeners,
            shared,
            deliveries,
            stop_rx.clone(),
        ));
        let mut admin_stop = stop_rx;
        let admin_chat = chat.clone();
        let key = admin_key.clone();
        let admin = tokio::spawn(async move {
            let shutdown = async move { parley_ops::stopped(&mut admin_stop).await };
            if let Err(e) = parley_chat::admin::serve(admin, admin_chat, key, shutdown).await {
                tracing::error!(error = %e, "admin API failed");
            }
        });
        Ok(Self {
            tcp_addr,
            ws_addr,
            admin_addr,
            ops_addr,
            http_addr,
            public_url,
            admin_key,
            chat,
            bus,
            presence,
            push,
            stop,
            gateway,
            admin,
            ops,
            http,
        })
    }

    /// Stops accepting, sends GoAway to every client, waits for them to
    /// leave (within the gateway's grace period), then stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.gateway.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.admin).await;
        for task in [self.ops, self.http].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        if let Err(e) = self.chat.flush_cursors().await {
            tracing::warn!(error = %e, "acked cursors not written at exit");
        }
    }

    /// The admin API's URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }
}
