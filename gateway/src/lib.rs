//! Parley's gateway: accepts client connections over TCP and WebSocket, caps
//! their number, serves each with the protocol state machine in `conn`, and
//! on shutdown tells every client to reconnect before it exits.

pub mod conn;
pub mod io;
pub mod registry;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parley_chat::{ChatBackend, Delivery, Presence};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::io::{FrameIo, StreamIo, WsIo};
use crate::registry::Registry;

/// The gateway's limits and identity.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's name in presence and on the bus.
    pub gateway_id: String,
    pub max_frame_bytes: usize,
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// A write that takes longer marks a slow reader, which is disconnected.
    pub write_timeout: Duration,
    /// Deliveries queued per connection before it must catch up from the store.
    pub push_queue: usize,
    pub max_connections: usize,
    /// Sends per second per connection, and the burst allowed.
    pub send_rate: u32,
    pub send_burst: u32,
    /// How long connections get to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Told to clients in GoAway: when to reconnect.
    pub reconnect_hint: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: "gw-local".into(),
            max_frame_bytes: parley_proto::DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(10),
            push_queue: 256,
            max_connections: 200_000,
            send_rate: 100,
            send_burst: 200,
            shutdown_grace: Duration::from_secs(10),
            reconnect_hint: Duration::from_millis(500),
        }
    }
}

/// What every connection of a gateway shares.
pub struct Shared {
    pub config: GatewayConfig,
    pub chat: Arc<dyn ChatBackend>,
    pub presence: Arc<dyn Presence>,
    pub registry: Arc<Registry>,
    epoch: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A connection epoch larger than any earlier one, here or (by the
    /// clock) on another gateway.
    pub fn next_epoch(&self) -> u64 {
        let now = parley_chat::now_ms().max(0) as u64 * 1000;
        let mut cur = self.epoch.load(Ordering::Relaxed);
        loop {
            let next = now.max(cur + 1);
            match self
                .epoch
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// A running gateway's listeners.
#[derive(Debug)]
pub struct Listeners {
    pub tcp: TcpListener,
    pub ws: Option<TcpListener>,
}

/// Serves clients until `shutdown` turns true, then says goodbye to each
/// and returns once they are gone (or the grace period ends).
pub async fn run(
    listeners: Listeners,
    chat: Arc<dyn ChatBackend>,
    presence: Arc<dyn Presence>,
    deliveries: mpsc::Receiver<Vec<Delivery>>,
    config: GatewayConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let registry = Arc::new(Registry::default());
    let dispatcher = tokio::spawn(registry::dispatcher(registry.clone(), deliveries));
    let grace = config.shutdown_grace;
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let shared = Arc::new(Shared {
        config,
        chat,
        presence,
        registry,
        epoch: AtomicU64::new(0),
    });
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    let ws = listeners.ws;

    loop {
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => break,
            r = listeners.tcp.accept() => r.map(|(s, _)| (s, false)),
            r = accept_opt(ws.as_ref()) => r.map(|(s, _)| (s, true)),
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, is_ws) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let permit = limit.clone().try_acquire_owned();
        let shared = shared.clone();
        let stop = shutdown.clone();
        conns.spawn(async move {
            let Ok(_permit) = permit else {
                refuse(stream, is_ws, &shared).await;
                return;
            };
            if is_ws {
                let ws_config = WebSocketConfig::default()
                    .max_message_size(Some(shared.config.max_frame_bytes))
                    .max_frame_size(Some(shared.config.max_frame_bytes));
                let handshake =
                    tokio_tungstenite::accept_async_with_config(stream, Some(ws_config));
                match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                    Ok(Ok(ws)) => {
                        let io = WsIo::new(ws, shared.config.max_frame_bytes);
                        conn::serve(io, shared, id, stop).await
                    }
                    _ => tracing::debug!("websocket handshake failed"),
                }
            } else {
                let io = StreamIo::new(stream, shared.config.max_frame_bytes);
                conn::serve(io, shared, id, stop).await
            }
        });
    }

    tracing::info!(
        connections = conns.len(),
        "shutting down: telling clients to reconnect"
    );
    drop(listeners.tcp);
    drop(ws);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = conns.len(), "grace period over; closing the rest");
        conns.shutdown().await;
    }
    dispatcher.abort();
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn accept_opt(l: Option<&TcpListener>) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Tells a client over the connection cap to come back later.
async fn refuse(stream: TcpStream, is_ws: bool, shared: &Shared) {
    let frame = parley_proto::pb::ServerFrame::error(
        0,
        parley_proto::pb::ErrorCode::ServerBusy,
        "too many connections on this gateway; retry later",
    );
    if is_ws {
        if let Ok(Ok(ws)) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::accept_async(stream),
        )
        .await
        {
            let _ = WsIo::new(ws, shared.config.max_frame_bytes)
                .write(&[frame])
                .await;
        }
    } else {
        let _ = StreamIo::new(stream, shared.config.max_frame_bytes)
            .write(&[frame])
            .await;
    }
}
