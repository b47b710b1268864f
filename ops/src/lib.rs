//! Process plumbing shared by every Parley binary (`parley-chat`,
//! `parley-gateway`, `parley-operator`, `parley up`): what each serves for
//! its operators over HTTP, liveness (`/healthz`), readiness (`/readyz`: 503
//! while draining or while a backend the process cannot work without is
//! down, with the reasons in the body; backends it works around are named
//! as degraded) and Prometheus metrics (`/metrics`); backend health metrics;
//! logging; signals; listener binding; and the flags every cluster process
//! shares (`args`). A gateway adds its route lookup to the same router.

pub mod args;

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Whether a process should receive traffic, and what is wrong with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Reasons not to send it traffic: draining, or a backend it cannot
    /// work without is down.
    pub blockers: Vec<String>,
    /// Backends down that it works around (deliveries wait for sync).
    pub degraded: Vec<String>,
}

/// What a process reports about itself.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    async fn ready(&self) -> Readiness;
    /// The metrics in the Prometheus text format.
    fn metrics(&self) -> String;
}

/// The operator endpoints over `probe`.
pub fn router(probe: Arc<dyn Probe>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probe)
}

async fn readyz(State(probe): State<Arc<dyn Probe>>) -> impl IntoResponse {
    let r = probe.ready().await;
    let degraded = if r.degraded.is_empty() {
        String::new()
    } else {
        format!(" (degraded: {})", r.degraded.join("; "))
    };
    if r.blockers.is_empty() {
        (StatusCode::OK, format!("ready{degraded}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}{degraded}\n", r.blockers.join("; ")),
        )
    }
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        probe.metrics(),
    )
}

/// Binds a listener, naming it in the error ("binding the ops listener on
/// 0.0.0.0:7403: address in use").
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Labels naming a backend: `postgres`, `redis`, `rabbitmq`, `chat`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

/// Backend health, shared by both kinds of process: whether each backend
/// answers, and how often its connection was made again.
#[derive(Debug, Clone, Default)]
pub struct BackendMetrics {
    pub up: Family<BackendLabel, Gauge>,
    pub reconnects: Family<BackendLabel, Counter>,
}

impl BackendMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backend_up",
            "Whether a backend answers (1) or not (0)",
            self.up.clone(),
        );
        registry.register(
            "backend_reconnects",
            "Connections to a backend made again after it was lost",
            self.reconnects.clone(),
        );
    }

    fn label(backend: &str) -> BackendLabel {
        BackendLabel {
            backend: backend.to_owned(),
        }
    }

    pub fn set_up(&self, backend: &str, up: bool) {
        self.up.get_or_create(&Self::label(backend)).set(up as i64);
    }

    /// Raises the reconnect counter to `total` (a count kept elsewhere).
    pub fn set_reconnects(&self, backend: &str, total: u64) {
        let c = self.reconnects.get_or_create(&Self::label(backend));
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    pub fn reconnected(&self, backend: &str) {
        self.reconnects.get_or_create(&Self::label(backend)).inc();
    }
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Logs to stderr, filtered by `PARLEY_LOG` (or `RUST_LOG`), default info.
pub fn init_logging() {
    let filter = std::env::var("PARLEY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn terminated() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Fixed(Readiness);

    #[async_trait]
    impl Probe for Fixed {
        async fn ready(&self) -> Readiness {
            self.0.clone()
        }
        fn metrics(&self) -> String {
            "# EOF\n".to_owned()
        }
    }

    async fn get(readiness: Readiness, path: &str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probe: Arc<dyn Probe> = Arc::new(Fixed(readiness));
        let server = tokio::spawn(serve(listener, router(probe), std::future::pending()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        server.abort();
        out
    }

    #[tokio::test]
    async fn readiness_tells_blockers_from_degradation() {
        let ok = get(Readiness::default(), "/readyz").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("ready\n"),
            "{ok}"
        );
        let degraded = Readiness {
            blockers: vec![],
            degraded: vec!["rabbitmq is unreachable".into()],
        };
        let r = get(degraded, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.ends_with("ready (degraded: rabbitmq is unreachable)\n"),
            "{r}"
        );
        let blocked = Readiness {
            blockers: vec!["draining".into()],
            degraded: vec![],
        };
        let r = get(blocked, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("not ready: draining\n"),
            "{r}"
        );
        let live = get(Readiness::default(), "/healthz").await;
        assert!(live.starts_with("HTTP/1.1 200"), "{live}");
        let m = get(Readiness::default(), "/metrics").await;
        assert!(m.contains("application/openmetrics-text"), "{m}");
    }
}
