//! Parley's gateway: accepts client connections over TCP and WebSocket, each
//! plain or over TLS, caps their number, serves each with the protocol state
//! machine in `conn`, and on shutdown tells every client to reconnect before
//! it exits.

pub mod cli;
pub mod cluster;
pub mod conn;
pub mod drain;
pub mod io;
pub mod lookup;
pub mod metrics;
pub mod registry;
pub mod remote;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parley_core::limits::{Limiter, Limits, MemoryCounters};
use parley_core::{ChatBackend, DeliveryBus, Dispatch, Presence, Session};
use parley_ops::stopped;
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
    /// Told to clients in HelloOk: how long to wait for a Pong before
    /// taking the connection for dead.
    pub pong_timeout: Duration,
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
    /// Rate limits per IP and per user, across every gateway that shares
    /// the limiter's counters.
    pub limits: Limits,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: "gw-local".into(),
            max_frame_bytes: parley_proto::DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(90),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            push_queue: 256,
            max_connections: 200_000,
            send_rate: 100,
            send_burst: 200,
            shutdown_grace: Duration::from_secs(10),
            reconnect_hint: Duration::from_millis(500),
            limits: Limits::default(),
        }
    }
}

/// How many ended sessions a gateway keeps for presence to hear of later.
pub const UNCLEAN_MAX: usize = 100_000;

/// What every connection of a gateway shares.
pub struct Shared {
    /// Once the gateway drains: not ready, out of the routing table, and
    /// its clients moved away at a bounded rate.
    pub drain: drain::Drain,
    /// Clients to hand on to other gateways while staying in service (the
    /// operator's rebalancing after a scale-up).
    pub shed: drain::Shed,
    pub config: GatewayConfig,
    pub chat: Arc<dyn ChatBackend>,
    pub presence: Arc<dyn Presence>,
    pub registry: Arc<Registry>,
    pub metrics: metrics::GatewayMetrics,
    /// Carries replacement notices to other gateways (cluster mode; in one
    /// process the registry sees every connection itself).
    pub notices: Option<Arc<dyn DeliveryBus>>,
    /// Counts what the limits in `config` limit.
    pub limiter: Arc<Limiter>,
    epoch: AtomicU64,
    /// Below 1000, from the gateway's id (see [`Shared::next_epoch`]).
    epoch_offset: u64,
    /// No epoch of this process is smaller: entries in presence under this
    /// gateway's name with a smaller one are a former process's.
    first_epoch: u64,
    /// Sessions that ended while presence could not be told: cleared when
    /// it answers again, or they would count against their user's cap of
    /// devices for as long as this gateway lives.
    unclean: std::sync::Mutex<std::collections::VecDeque<Session>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A gateway whose rate limits count in this process alone.
    pub fn new(
        config: GatewayConfig,
        chat: Arc<dyn ChatBackend>,
        presence: Arc<dyn Presence>,
        notices: Option<Arc<dyn DeliveryBus>>,
    ) -> Arc<Self> {
        let limiter = Limiter::start(Arc::new(MemoryCounters::default()));
        Self::with_limiter(config, chat, presence, notices, limiter)
    }

    /// A gateway counting its rate limits with `limiter` (shared counters
    /// in a cluster).
    pub fn with_limiter(
        config: GatewayConfig,
        chat: Arc<dyn ChatBackend>,
        presence: Arc<dyn Presence>,
        notices: Option<Arc<dyn DeliveryBus>>,
        limiter: Arc<Limiter>,
    ) -> Arc<Self> {
        let epoch_offset = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            config.gateway_id.hash(&mut h);
            h.finish() % 1000
        };
        let first_epoch = parley_core::now_ms().max(0) as u64 * 1000;
        Arc::new(Self {
            drain: drain::Drain::default(),
            shed: drain::Shed::default(),
            config,
            chat,
            presence,
            registry: Arc::new(Registry::default()),
            metrics: metrics::GatewayMetrics::default(),
            epoch_offset,
            notices,
            limiter,
            epoch: AtomicU64::new(first_epoch.saturating_sub(1)),
            first_epoch,
            unclean: std::sync::Mutex::default(),
        })
    }

    /// Tells presence a session ended; when it cannot be told, the session
    /// is remembered and cleared when it answers again.
    pub async fn go_offline(&self, session: Session) {
        if let Err(e) = self.presence.offline(&session).await {
            tracing::warn!(error = %e, "presence not cleared; cleared when it answers again");
            self.unclean_end(session);
        }
    }

    /// Remembers a session whose end presence did not hear of (at most
    /// [`UNCLEAN_MAX`]; beyond that the oldest are forgotten, and expire
    /// with their user's presence).
    pub fn unclean_end(&self, session: Session) {
        let mut list = self.unclean.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= UNCLEAN_MAX {
            list.pop_front();
        }
        list.push_back(session);
    }

    /// The sessions whose end presence has yet to hear of, taken.
    pub fn take_unclean(&self) -> Vec<Session> {
        let mut list = self.unclean.lock().unwrap_or_else(|e| e.into_inner());
        list.drain(..).collect()
    }

    /// No connection epoch of this process is smaller (written in the
    /// gateway's lease, so that a former process's presence entries under
    /// the same gateway name can be told apart).
    pub fn first_epoch(&self) -> u64 {
        self.first_epoch
    }

    /// Makes the next epochs larger than `seen` (one from another gateway,
    /// whose clock may run ahead of this one's).
    pub fn observe_epoch(&self, seen: u64) {
        self.epoch.fetch_max(seen, Ordering::Relaxed);
    }

    /// A connection epoch larger than any earlier one, here or (by the
    /// clock) on another gateway.
    pub fn next_epoch(&self) -> u64 {
        // Microseconds of an offset of this gateway's own within the
        // millisecond: two gateways' logins of one device in the same
        // millisecond still order one before the other.
        let now = parley_core::now_ms().max(0) as u64 * 1000 + self.epoch_offset;
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

/// A gateway's client listeners; the TLS ones need `tls`.
#[derive(Default)]
pub struct Listeners {
    /// Length-prefixed frames over plain TCP (inside a cluster).
    pub tcp: Option<TcpListener>,
    /// Binary WebSocket messages over plain TCP.
    pub ws: Option<TcpListener>,
    /// Length-prefixed frames over TLS.
    pub tls: Option<TcpListener>,
    /// WebSocket over TLS (wss://).
    pub wss: Option<TcpListener>,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        f.debug_struct("Listeners")
            .field("tcp", &addr(&self.tcp))
            .field("ws", &addr(&self.ws))
            .field("tls", &addr(&self.tls))
            .field("wss", &addr(&self.wss))
            .finish()
    }
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Ws,
    Tls,
    Wss,
}

impl Kind {
    fn is_ws(self) -> bool {
        matches!(self, Kind::Ws | Kind::Wss)
    }
}

/// Serves clients until `shutdown` turns true, then says goodbye to each
/// and returns once they are gone (or the grace period ends).
pub async fn run(
    listeners: Listeners,
    shared: Arc<Shared>,
    deliveries: mpsc::Receiver<Dispatch>,
    mut shutdown: watch::Receiver<bool>,
) {
    let dispatcher = tokio::spawn(registry::dispatcher(shared.registry.clone(), deliveries));
    let grace = shared.config.shutdown_grace;
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    // Connections hear of the shutdown from here, once they are counted:
    // told by `shutdown` itself they would say goodbye and be reaped below
    // before the count.
    let (go_away, go_away_rx) = watch::channel(false);
    let Listeners {
        tcp,
        ws,
        tls,
        wss,
        acceptor,
    } = listeners;
    if (tls.is_some() || wss.is_some()) && acceptor.is_none() {
        tracing::error!("TLS listeners need a certificate; they stay closed");
    }

    loop {
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => break,
            r = accept_opt(tcp.as_ref()) => r.map(|s| (s, Kind::Tcp)),
            r = accept_opt(ws.as_ref()) => r.map(|s| (s, Kind::Ws)),
            r = accept_opt(tls.as_ref().filter(|_| acceptor.is_some())) => r.map(|s| (s, Kind::Tls)),
            r = accept_opt(wss.as_ref().filter(|_| acceptor.is_some())) => r.map(|s| (s, Kind::Wss)),
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, kind) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok().map(|a| a.ip());
        shared.metrics.accepted.inc();
        next_id += 1;
        let id = next_id;
        let permit = limit.clone().try_acquire_owned();
        let shared = shared.clone();
        let stop = go_away_rx.clone();
        let acceptor = acceptor.clone();
        conns.spawn(async move {
            let Some(acceptor) = acceptor.filter(|_| matches!(kind, Kind::Tls | Kind::Wss)) else {
                return session(stream, kind, permit.ok(), shared, id, peer, stop).await;
            };
            // Boxed: a TLS handshake's state is large, and a plain
            // connection's task should not be sized for it.
            // Each boxed in a statement of its own: a temporary in an
            // awaited expression would keep its room in this task.
            let accept = heap(tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)));
            let Ok(Ok(tls)) = accept.await else {
                tracing::debug!("TLS handshake failed");
                return;
            };
            let served = heap(session(tls, kind, permit.ok(), shared, id, peer, stop));
            served.await;
        });
    }

    tracing::info!(
        connections = shared.metrics.connections.get(),
        sessions = shared.registry.len(),
        "shutting down: telling clients to reconnect"
    );
    go_away.send_replace(true);
    drop((tcp, ws, tls, wss));
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = conns.len(), "grace period over; closing the rest");
        conns.shutdown().await;
    }
    dispatcher.abort();
}

/// How long a client has for the TLS and WebSocket handshakes.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// One connection after its TLS handshake, if any: refused over the cap,
/// upgraded to WebSocket if it came that way, then served. The protocol
/// state lives in a box of its own, sized for this stream type, so an idle
/// plain TCP connection costs what it holds and not what TLS or WebSocket
/// connections need.
async fn session<S>(
    stream: S,
    kind: Kind,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    id: u64,
    peer: Option<std::net::IpAddr>,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(_permit) = permit else {
        let refused = heap(refuse(stream, kind.is_ws(), shared));
        refused.await;
        return;
    };
    let max = shared.config.max_frame_bytes;
    if kind.is_ws() {
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let upgrade = heap(tokio::time::timeout(
            HANDSHAKE,
            tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)),
        ));
        let Ok(Ok(ws)) = upgrade.await else {
            tracing::debug!("websocket handshake failed");
            return;
        };
        let served = heap(conn::serve(WsIo::new(ws, max), shared, id, peer, stop));
        served.await;
    } else {
        let served = heap(conn::serve(
            StreamIo::new(stream, max),
            shared,
            id,
            peer,
            stop,
        ));
        served.await;
    }
}

/// `fut` on the heap. Async callers keep room inline for every future they
/// await (and for temporaries around them); boxing the large, rare or
/// type-specific ones here keeps each connection's task small.
pub(crate) fn heap<'a, F: Future + Send + 'a>(
    fut: F,
) -> std::pin::Pin<Box<dyn Future<Output = F::Output> + Send + 'a>> {
    Box::pin(fut)
}

async fn accept_opt(l: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Writes a last frame and closes without a reset.
async fn goodbye(mut io: impl FrameIo, frame: parley_proto::pb::ServerFrame) {
    if io.write(&[frame.into()]).await.is_ok() {
        io.close().await;
    }
}

/// Refusals that may linger at once; past it a refused client gets the
/// frame and an immediate close, so a storm against a full gateway costs
/// bounded sockets and memory.
static LINGERING_REFUSALS: Semaphore = Semaphore::const_new(1024);

/// Tells a client over the connection cap to come back later.
async fn refuse<S>(stream: S, is_ws: bool, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let Ok(_lingering) = LINGERING_REFUSALS.try_acquire() else {
        let frame = parley_proto::pb::ServerFrame::error(
            0,
            parley_proto::pb::ErrorCode::ServerBusy,
            "too many connections on this gateway; retry later",
        );
        if !is_ws {
            let _ = StreamIo::new(stream, shared.config.max_frame_bytes)
                .write(&[frame.into()])
                .await;
        }
        return;
    };
    let frame = parley_proto::pb::ServerFrame::error(
        0,
        parley_proto::pb::ErrorCode::ServerBusy,
        "too many connections on this gateway; retry later",
    );
    let max = shared.config.max_frame_bytes;
    if is_ws {
        if let Ok(Ok(ws)) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::accept_async(stream),
        )
        .await
        {
            goodbye(WsIo::new(ws, max), frame).await;
        }
    } else {
        goodbye(StreamIo::new(stream, max), frame).await;
    }
}
