//! The `parley-gateway` command line: flags (each with a PARLEY_
//! environment variable, see `--help` and docs/cluster.md) turned into a
//! cluster gateway. The binary is a thin `main` over `run`, so the e2e
//! tests start exactly this code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::GatewayConfig;
use crate::cluster::{self, ClusterConfig};
use crate::remote::RemoteConfig;
use anyhow::Context;
use clap::Parser;
use parley_core::limits::{Limits, Rate};
use parley_ops::args::BackendArgs;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "parley-gateway",
    version,
    about = "A Parley gateway: holds client connections"
)]
struct Args {
    /// This gateway's unique name (the pod name in Kubernetes).
    #[arg(long, env = "PARLEY_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Plain TCP client listener ("off" to disable).
    #[arg(long, env = "PARLEY_LISTEN", default_value = "0.0.0.0:7400")]
    listen: String,
    /// WebSocket client listener ("off" to disable).
    #[arg(long, env = "PARLEY_WS_LISTEN", default_value = "off")]
    ws_listen: String,
    /// TLS client listener ("off" to disable; needs --tls-cert and --tls-key).
    #[arg(long, env = "PARLEY_TLS_LISTEN", default_value = "off")]
    tls_listen: String,
    /// WebSocket-over-TLS listener ("off" to disable).
    #[arg(long, env = "PARLEY_WSS_LISTEN", default_value = "off")]
    wss_listen: String,
    /// PEM certificate chain for the TLS listeners.
    #[arg(long, env = "PARLEY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    #[arg(long, env = "PARLEY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Health (/healthz, /readyz), metrics (/metrics) and route lookup (/route).
    #[arg(long, env = "PARLEY_OPS_LISTEN", default_value = "0.0.0.0:7403")]
    ops_listen: SocketAddr,
    /// The route lookup (/route) alone, for clients outside the cluster
    /// ("off" disables it; the ops port serves it too).
    #[arg(long, env = "PARLEY_ROUTE_LISTEN", default_value = "off")]
    route_listen: String,
    /// The host:port clients use to reach this gateway, for the routing
    /// table (default: the TLS listener if any, else the TCP one; an
    /// unspecified IP becomes 127.0.0.1).
    #[arg(long, env = "PARLEY_ADVERTISE")]
    advertise: Option<String>,
    /// Chat-service replicas: host:port, comma-separated, or one name that
    /// resolves to all of them.
    #[arg(
        long,
        env = "PARLEY_CHAT_ADDRS",
        value_delimiter = ',',
        required = true
    )]
    chat_addrs: Vec<String>,
    #[command(flatten)]
    backends: BackendArgs,
    #[arg(long, env = "PARLEY_MAX_CONNECTIONS", default_value_t = 200_000)]
    max_connections: usize,
    /// Close a connection silent for this long (seconds); clients are told
    /// to Ping every third of it.
    #[arg(long, env = "PARLEY_IDLE_TIMEOUT_SECS", default_value_t = 90)]
    idle_timeout_secs: u64,
    /// Told to clients: how long to wait for a Pong before taking the
    /// connection for dead and reconnecting elsewhere (milliseconds).
    #[arg(long, env = "PARLEY_PONG_TIMEOUT_MS", default_value_t = 10_000)]
    pong_timeout_ms: u64,
    /// Sends per second allowed per connection.
    #[arg(long, env = "PARLEY_SEND_RATE", default_value_t = 100)]
    send_rate: u32,
    /// Sends a connection may make at once before the rate applies.
    #[arg(long, env = "PARLEY_SEND_BURST", default_value_t = 200)]
    send_burst: u32,
    /// Largest frame in bytes, either way.
    #[arg(long, env = "PARLEY_MAX_FRAME_BYTES", default_value_t = parley_proto::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Seconds clients get to leave after the gateway starts draining on
    /// SIGTERM (keep it under the pod's termination grace period).
    #[arg(long, env = "PARLEY_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    shutdown_grace_secs: u64,
    /// Clients told to go per second while draining; on SIGTERM faster if
    /// that is what it takes to finish within the grace period.
    #[arg(long, env = "PARLEY_DRAIN_RATE", default_value_t = 500)]
    drain_rate: u32,
    /// Milliseconds between leaving the routing table and telling clients to go.
    #[arg(long, env = "PARLEY_DRAIN_PAUSE_MS", default_value_t = 2_000)]
    drain_pause_ms: u64,
    /// Who writes the routing table: "gateways" (each its own entry) or
    /// "operator" (the Kubernetes operator; gateways write only their lease).
    #[arg(long, env = "PARLEY_ROUTING_TABLE", default_value = "gateways", value_parser = ["gateways", "operator"])]
    routing_table: String,
    /// Seconds between lease writes (the lease lives three times as long).
    #[arg(long, env = "PARLEY_LEASE_SECS", default_value_t = 5)]
    lease_secs: u64,
    /// `Batch` calls out at once to each chat-service replica; sends and
    /// acks that arrive meanwhile go in the next one.
    #[arg(long, env = "PARLEY_BATCHES_IN_FLIGHT", default_value_t = 1)]
    batches_in_flight: usize,
    #[command(flatten)]
    limits: LimitArgs,
    /// A directory of uploads shared with the chat services (their
    /// --media-dir): served on the public HTTP port (--route-listen, else
    /// the ops port) at /media/v1/blobs/.
    #[cfg(feature = "media")]
    #[arg(long, env = "PARLEY_MEDIA_DIR")]
    media_dir: Option<PathBuf>,
    /// The chat services' --media-key, which signs the URLs served here.
    #[cfg(feature = "media")]
    #[arg(long, env = "PARLEY_MEDIA_KEY", hide_env_values = true)]
    media_key: Option<String>,
}

/// The media endpoint these flags ask for, if any.
#[cfg(feature = "media")]
fn media_routes(a: &Args) -> anyhow::Result<Option<axum::Router>> {
    let Some(dir) = &a.media_dir else {
        return Ok(None);
    };
    let key = a
        .media_key
        .as_deref()
        .context("--media-key (PARLEY_MEDIA_KEY) is required with --media-dir")?;
    let storage = parley_media::MediaStorage::serving(dir, key.as_bytes())
        .with_context(|| format!("the media directory {}", dir.display()))?;
    Ok(Some(parley_media::router(storage)))
}

fn listener(value: &str, what: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        "off" | "" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .with_context(|| format!("{what}: {v:?} is not an address (host:port or off)")),
    }
}

/// The address to advertise for a listener: an unspecified IP (listening
/// on every interface) becomes 127.0.0.1.
pub fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Parses `args` (the program name first) and runs the gateway until
/// SIGTERM or Ctrl-C, then drains.
pub async fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    parley_ops::init_logging();
    let a = Args::parse_from(args);
    let listen = listener(&a.listen, "--listen")?;
    let tls_listen = listener(&a.tls_listen, "--tls-listen")?;
    let advertise = match (&a.advertise, tls_listen, listen) {
        (Some(adv), _, _) => adv.clone(),
        (None, Some(t), _) => advertised(t),
        (None, None, Some(l)) => advertised(l),
        (None, None, None) => anyhow::bail!("no client listener: set --listen or --tls-listen"),
    };
    #[cfg(feature = "media")]
    let public_routes = media_routes(&a)?;
    #[cfg(not(feature = "media"))]
    let public_routes = None;
    let gateway_id = a.gateway_id.unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("gw-{:08x}", rand_id()))
    });
    let mut chat = RemoteConfig::new(a.chat_addrs);
    chat.key = a.backends.internal_key;
    chat.batches_in_flight = a.batches_in_flight.max(1);
    let cfg = ClusterConfig {
        gateway: GatewayConfig {
            gateway_id,
            idle_timeout: Duration::from_secs(a.idle_timeout_secs.max(1)),
            pong_timeout: Duration::from_millis(a.pong_timeout_ms.max(1)),
            send_rate: a.send_rate,
            send_burst: a.send_burst.max(1),
            max_frame_bytes: a.max_frame_bytes,
            max_connections: a.max_connections,
            shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
            limits: a.limits.limits(),
            ..GatewayConfig::default()
        },
        listen,
        ws_listen: listener(&a.ws_listen, "--ws-listen")?,
        tls_listen,
        wss_listen: listener(&a.wss_listen, "--wss-listen")?,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        ops_listen: a.ops_listen,
        route_listen: listener(&a.route_listen, "--route-listen")?,
        public_routes,
        advertise,
        chat,
        redis_url: a.backends.redis_url,
        amqp_url: a.backends.amqp_url,
        prefix: a.backends.prefix,
        lease_every: Duration::from_secs(a.lease_secs.max(1)),
        lease_ttl: Duration::from_secs(a.lease_secs.max(1) * 3),
        drain_pause: Duration::from_millis(a.drain_pause_ms),
        drain_rate: a.drain_rate.max(1),
        routing_managed: a.routing_table == "operator",
    };
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        parley_ops::terminated().await;
        let _ = stop.send(true);
    });
    cluster::run(cfg, stop_rx).await
}

fn rand_id() -> u32 {
    std::process::id() ^ (parley_core::now_ms() as u32)
}

/// The rate limits, as flags `parley up` and `parley-gateway` share: each
/// `N/SECONDS` (at most N in any SECONDS), or `off`.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Logins (Auth) from one IP address, all users together.
    #[arg(long, env = "PARLEY_LIMIT_LOGINS_PER_IP", default_value = "600/60", value_parser = rate)]
    limit_logins_per_ip: Limit,
    /// Logins of one user, all devices together.
    #[arg(long, env = "PARLEY_LIMIT_LOGINS_PER_USER", default_value = "60/60", value_parser = rate)]
    limit_logins_per_user: Limit,
    /// Sends of one user, all devices together.
    #[arg(long, env = "PARLEY_LIMIT_SENDS_PER_USER", default_value = "1000/10", value_parser = rate)]
    limit_sends_per_user: Limit,
    /// History pages, catch-up requests and lists of one user.
    #[arg(long, env = "PARLEY_LIMIT_READS_PER_USER", default_value = "300/10", value_parser = rate)]
    limit_reads_per_user: Limit,
    /// Group operations, direct conversations opened, blocks and log-outs of one user.
    #[arg(long, env = "PARLEY_LIMIT_GROUP_OPS_PER_USER", default_value = "120/60", value_parser = rate)]
    limit_group_ops_per_user: Limit,
    /// Upload slots asked for by one user.
    #[arg(long, env = "PARLEY_LIMIT_UPLOADS_PER_USER", default_value = "60/60", value_parser = rate)]
    limit_uploads_per_user: Limit,
    /// Devices of one user online at once, over every gateway: a number, or off.
    #[arg(long, env = "PARLEY_LIMIT_DEVICES_PER_USER", default_value = "10", value_parser = count)]
    limit_devices_per_user: Count,
}

/// One parsed cap flag (None: off).
#[derive(Debug, Clone, Copy)]
pub struct Count(Option<u32>);

fn count(value: &str) -> Result<Count, String> {
    if value == "off" {
        return Ok(Count(None));
    }
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| Count(Some(n)))
        .ok_or_else(|| format!("{value:?} is not a number above 0 or off"))
}

/// One parsed limit flag (None: off).
#[derive(Debug, Clone, Copy)]
pub struct Limit(Option<Rate>);

fn rate(value: &str) -> Result<Limit, String> {
    if value == "off" {
        return Ok(Limit(None));
    }
    let parsed = value.split_once('/').and_then(|(n, s)| {
        let limit = n.trim().parse::<u32>().ok().filter(|n| *n > 0)?;
        let secs = s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=86_400).contains(s))?;
        Some(Rate {
            limit,
            window: Duration::from_secs(secs),
        })
    });
    parsed
        .map(|r| Limit(Some(r)))
        .ok_or_else(|| format!("{value:?} is not N/SECONDS (N above 0, SECONDS 1 to 86400) or off"))
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            logins_per_ip: self.limit_logins_per_ip.0,
            logins_per_user: self.limit_logins_per_user.0,
            sends_per_user: self.limit_sends_per_user.0,
            reads_per_user: self.limit_reads_per_user.0,
            group_ops_per_user: self.limit_group_ops_per_user.0,
            uploads_per_user: self.limit_uploads_per_user.0,
            devices_per_user: self.limit_devices_per_user.0,
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn limits_read_as_n_per_seconds_or_off() {
        let r = rate("1000/10").unwrap().0.unwrap();
        assert_eq!((r.limit, r.window), (1000, Duration::from_secs(10)));
        assert!(rate("off").unwrap().0.is_none());
        for bad in ["", "10", "0/10", "10/0", "10/86401", "ten/10", "10/s"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
        assert_eq!(
            rate(
                Limits::default()
                    .sends_per_user
                    .map(|r| format!("{}/{}", r.limit, r.window.as_secs()))
                    .unwrap()
                    .as_str()
            )
            .unwrap()
            .0,
            Limits::default().sends_per_user,
            "the flags' defaults are the code's"
        );
        assert_eq!(
            count(&Limits::default().devices_per_user.unwrap().to_string())
                .unwrap()
                .0,
            Limits::default().devices_per_user,
        );
        assert!(count("off").unwrap().0.is_none());
        for bad in ["", "0", "-1", "ten"] {
            assert!(count(bad).is_err(), "{bad}");
        }
    }
}
