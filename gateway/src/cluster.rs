//! A gateway in a cluster: the chat service over gRPC, presence and the
//! routing table in Redis, deliveries from its own RabbitMQ queue, and an
//! operator endpoint with health, metrics and the route lookup.
//!
//! Every few seconds the gateway writes its lease (address and online count)
//! and its routing-table entry, and at once when its link to Redis drops or
//! comes back; while Redis does not answer, it tries every 200 ms. When the lease
//! had gone, Redis lost its data (or the gateway was cut off longer than
//! the TTL): the gateway writes the presence of every session it holds
//! again, then has every connection catch up from the database, so nothing
//! committed meanwhile is missed. Until presence is back the chat services
//! send deliveries to every gateway (see `parley_redis::PRESENCE_SETTLE`),
//! so live delivery does not wait for it. The same catch-up follows a
//! reconnect of its RabbitMQ consumer.
//!
//! It drains when the operator asks (a drain request read back with the
//! lease, see [`crate::drain`]) or on SIGTERM: readiness turns false and its
//! routing entry goes, then after a pause for routes to settle it tells its
//! clients to reconnect (GoAway) at the drain rate. On SIGTERM the rate
//! rises if need be so that everyone has been told within the grace period;
//! whoever is left at its end is told at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use parley_amqp::{AmqpBus, AmqpConfig, LinkStatus};
use parley_core::Session;
use parley_ops::{self as ops, Probe, Readiness, stopped};
use parley_redis::{PRESENCE_TTL, RedisState};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::lookup;
use crate::registry::Registry;
use crate::remote::{RemoteChat, RemoteConfig};
use crate::{GatewayConfig, Listeners, Shared};

/// Everything a cluster gateway needs to know.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub gateway: GatewayConfig,
    pub listen: Option<SocketAddr>,
    pub ws_listen: Option<SocketAddr>,
    pub tls_listen: Option<SocketAddr>,
    pub wss_listen: Option<SocketAddr>,
    /// PEM certificate chain and key, for the TLS listeners.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Health, metrics and the route lookup.
    pub ops_listen: SocketAddr,
    /// The route lookup alone, for clients outside the cluster (published
    /// on the gateway Service, where health and metrics do not belong).
    pub route_listen: Option<SocketAddr>,
    /// More for clients, served beside the route lookup: the media
    /// endpoint of a directory shared with the chat services.
    pub public_routes: Option<axum::Router>,
    /// The address clients should use to reach this gateway (host:port),
    /// written to the routing table.
    pub advertise: String,
    pub chat: RemoteConfig,
    pub redis_url: String,
    pub amqp_url: String,
    /// Starts every Redis key and RabbitMQ name of the cluster.
    pub prefix: String,
    pub lease_every: Duration,
    pub lease_ttl: Duration,
    /// The operator owns the routing table: write only the lease.
    pub routing_managed: bool,
    /// Between leaving the routing table and telling clients to go.
    pub drain_pause: Duration,
    /// Clients told to go per second while draining.
    pub drain_rate: u32,
}

/// What the gateway's loops share with its probe.
struct Node {
    shared: Arc<Shared>,
    chat: Arc<RemoteChat>,
    redis: RedisState,
    amqp: Arc<LinkStatus>,
    redis_up: AtomicBool,
    /// The first lease write was tried (whether Redis answered or not).
    started: AtomicBool,
    advertise: String,
    metrics: MetricsRegistry,
    prober: lookup::Prober,
    /// The operator writes the routing table (with the addresses clients
    /// outside the cluster can reach).
    routing_managed: bool,
}

#[async_trait]
impl Probe for Node {
    /// The chat service is required: without it nobody can log in or send.
    /// Without Redis or RabbitMQ clients still connect and send, and catch
    /// up once they are back, so those only degrade the gateway.
    async fn ready(&self) -> Readiness {
        let mut r = Readiness::default();
        if self.shared.drain.active() {
            r.blockers.push("draining".to_owned());
        }
        if !self.started.load(Ordering::Relaxed) {
            r.blockers
                .push("starting: the lease is not written yet".to_owned());
        }
        if !self.chat.healthy() {
            r.blockers
                .push("no chat-service replica answers".to_owned());
        }
        if !self.redis_up.load(Ordering::Relaxed) {
            r.degraded.push("redis is unreachable".to_owned());
        }
        if !self.amqp.connected() {
            r.degraded.push("rabbitmq is unreachable".to_owned());
        }
        r
    }

    fn metrics(&self) -> String {
        let m = &self.shared.metrics;
        m.sessions.set(self.shared.registry.len() as i64);
        m.backends.set_up("chat", self.chat.healthy());
        m.backends
            .set_up("redis", self.redis_up.load(Ordering::Relaxed));
        m.backends.set_up("rabbitmq", self.amqp.connected());
        m.backends
            .set_reconnects("rabbitmq", self.amqp.reconnects());
        m.backends.set_reconnects("chat", self.chat.failures());
        m.set_batches(self.chat.batches());
        ops::encode(&self.metrics)
    }
}

/// `GET /route` (see [`lookup`]): the least-loaded gateways from the
/// routing table, none a client reported failed; each reported one still
/// in the table is probed, and leaves it if it does not answer. Without
/// Redis, this gateway answers with itself while it is not draining.
async fn route(State(node): State<Arc<Node>>, RawQuery(query): RawQuery) -> Response {
    let failed = lookup::reported_failed(query.as_deref());
    for addr in &failed {
        if *addr != node.advertise && node.prober.due(addr) {
            tokio::spawn(probe_reported(node.clone(), addr.clone()));
        }
    }
    let candidates = match node.redis.route(&failed).await {
        Ok(c) if !c.is_empty() => c,
        // Under the operator the table holds the addresses clients can
        // reach; this gateway's own may be one only the cluster can.
        Err(e) if node.routing_managed => {
            tracing::warn!(error = %e, "route lookup without the routing table");
            return lookup::unavailable("the routing table is unavailable; retry shortly");
        }
        // Nothing routable yet (the operator's first write, load balancers
        // still being made): not this gateway's pod address either.
        Ok(_) if node.routing_managed => {
            return lookup::unavailable("no gateway is routable yet; retry shortly");
        }
        Ok(_) | Err(_) if !node.shared.drain.active() => vec![node.advertise.clone()],
        _ => Vec::new(),
    };
    lookup::answer(&candidates)
}

/// Takes `addr` out of the routing table if it is there and its gateway
/// does not answer a Hello. A published address is probed at the gateway's
/// own (from inside the cluster, a load balancer's or node's public address
/// may not be reachable); this gateway does not probe itself.
async fn probe_reported(node: Arc<Node>, addr: String) {
    if !node.redis.routed(&addr).await.unwrap_or(false) {
        return;
    }
    let own = node.redis.via(&addr).await.ok().flatten();
    let target = own.unwrap_or_else(|| addr.clone());
    if target == node.advertise || lookup::answers_hello(&target, lookup::PROBE_WITHIN).await {
        return;
    }
    match node.redis.unroute(&addr).await {
        Ok(()) => {
            tracing::info!(gateway = %addr, "a gateway clients could not reach failed its probe; out of the routing table")
        }
        Err(e) => {
            tracing::warn!(error = %e, gateway = %addr, "a gateway failed its probe but stays routed")
        }
    }
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => Ok(Some(ops::bind(a, what).await?)),
        None => Ok(None),
    }
}

/// Writes the lease every `lease_every`, re-registers presence when it had
/// gone, and refreshes presence before it expires.
async fn keep_lease(node: Arc<Node>, cfg: ClusterConfig, mut wake: watch::Receiver<bool>) {
    let id = &cfg.gateway.gateway_id;
    let registry = &node.shared.registry;
    let mut link = node.redis.watch_link();
    let mut refreshed = Instant::now();
    let mut first = true;
    loop {
        let mut again = false;
        let draining = node.shared.drain.active();
        let count = registry.len() as u64;
        match node
            .redis
            .announce(
                id,
                &node.advertise,
                count,
                cfg.lease_ttl,
                draining,
                cfg.routing_managed,
            )
            .await
        {
            Ok(announced) => {
                let had = announced.had_lease;
                if let Some((clients, rate)) = announced.shed
                    && !node.shared.drain.active()
                {
                    tracing::info!(
                        clients,
                        rate,
                        "the operator asked this gateway to hand clients on"
                    );
                    node.shared.shed.ask(clients, rate);
                }
                if let Some(rate) = announced.drain_rate
                    && !node.shared.drain.active()
                {
                    // Out of the routing table first (the lease is written
                    // again at once), clients moved only after the pause.
                    tracing::info!(rate, "the operator asked this gateway to drain");
                    node.shared.drain.announce();
                    again = true;
                    let (shared, pause) = (node.shared.clone(), cfg.drain_pause);
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        shared.drain.start(rate);
                    });
                }
                let was_up = node.redis_up.swap(true, Ordering::Relaxed);
                if !first && !was_up {
                    node.shared.metrics.backends.reconnected("redis");
                }
                if (!had || !was_up) && !registry.is_empty() {
                    // Presence may be gone: write it again, then catch up
                    // on whatever was not routed here meanwhile.
                    let sessions = registry.sessions();
                    tracing::info!(
                        sessions = sessions.len(),
                        "redis is back; re-registering presence"
                    );
                    match node.redis.online_many(&sessions).await {
                        Ok(newer) => {
                            refreshed = Instant::now();
                            close_replaced(registry, &newer);
                            registry.resync_all();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "presence not re-registered; retrying");
                            node.redis_up.store(false, Ordering::Relaxed);
                        }
                    }
                }
                let unclean = node.shared.take_unclean();
                if !unclean.is_empty() {
                    match node.redis.offline_many(&unclean).await {
                        Ok(()) => tracing::info!(
                            sessions = unclean.len(),
                            "presence cleared of sessions that ended while it was away"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "presence not cleared; retrying");
                            for s in unclean {
                                node.shared.unclean_end(s);
                            }
                        }
                    }
                }
                first = false;
            }
            Err(e) => {
                if node.redis_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis unreachable; the lease will be written again");
                }
            }
        }
        node.started.store(true, Ordering::Relaxed);
        if refreshed.elapsed() > PRESENCE_TTL / 3 && node.redis_up.load(Ordering::Relaxed) {
            match node.redis.online_many(&registry.sessions()).await {
                Ok(newer) => {
                    refreshed = Instant::now();
                    close_replaced(registry, &newer);
                }
                Err(e) => tracing::warn!(error = %e, "presence refresh failed"),
            }
        }
        // Sleep, but write at once when draining starts or the link to
        // Redis drops or comes back (Redis may have restarted empty), and
        // retry soon while Redis does not answer: presence is written back
        // as soon as it does.
        if !again {
            let pause = if node.redis_up.load(Ordering::Relaxed) {
                cfg.lease_every
            } else {
                RETRY_WHILE_DOWN.min(cfg.lease_every)
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = wake.changed() => {}
                Ok(()) = link.changes.changed() => {
                    tracing::info!("the link to redis dropped or came back; writing the lease at once");
                }
            }
        }
    }
}

/// Between lease writes while Redis does not answer.
const RETRY_WHILE_DOWN: Duration = Duration::from_millis(200);

/// Closes the connections here of devices that logged in again as `newer`
/// (on another gateway).
fn close_replaced(registry: &Registry, newer: &[Session]) {
    for n in newer {
        let closed = registry.replace(&n.user, &n.device, n.epoch);
        if closed > 0 {
            tracing::debug!(user = %n.user, device = %n.device, by = %n.gateway, "device logged in on another gateway");
        }
    }
}

/// Runs a cluster gateway until `shutdown` turns true, then drains.
pub async fn run(cfg: ClusterConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let acceptor = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::tls::acceptor(cert, key).map_err(anyhow::Error::msg)?)
        }
        (None, None) => None,
        _ => anyhow::bail!("TLS needs both a certificate and a key"),
    };
    if (cfg.tls_listen.is_some() || cfg.wss_listen.is_some()) && acceptor.is_none() {
        anyhow::bail!("a TLS listener needs --tls-cert and --tls-key");
    }
    // The lookup's own listener speaks HTTPS where the gateways have a
    // certificate: it is published beside the TLS client port.
    let route_tls = acceptor.clone();
    let listeners = Listeners {
        tcp: bind(cfg.listen, "TCP").await?,
        ws: bind(cfg.ws_listen, "WebSocket").await?,
        tls: bind(cfg.tls_listen, "TLS").await?,
        wss: bind(cfg.wss_listen, "WSS").await?,
        acceptor,
    };
    let ops_listener = ops::bind(cfg.ops_listen, "ops").await?;
    let route_listener = match cfg.route_listen {
        Some(a) => Some(ops::bind(a, "route lookup").await?),
        None => None,
    };

    let chat = Arc::new(RemoteChat::connect(cfg.chat.clone()).await?);
    let redis = RedisState::new(&cfg.redis_url, &cfg.prefix)?;
    let amqp = AmqpConfig {
        url: cfg.amqp_url.clone(),
        prefix: cfg.prefix.clone(),
    };
    let feed = parley_amqp::consume(amqp.clone(), &cfg.gateway.gateway_id, 4096);
    let notices = AmqpBus::start_named(amqp, &format!("parley-gateway {}", cfg.gateway.gateway_id));
    // Rate limits count across every gateway of the cluster, in Redis.
    let limiter = parley_core::limits::Limiter::start(Arc::new(redis.clone()));
    let shared = Shared::with_limiter(
        cfg.gateway.clone(),
        chat.clone(),
        Arc::new(redis.clone()),
        Some(Arc::new(notices)),
        limiter,
    );
    let mut metrics = MetricsRegistry::with_prefix("parley");
    shared.metrics.register(&mut metrics);
    let node = Arc::new(Node {
        shared: shared.clone(),
        chat,
        redis: redis.with_lease_since(shared.first_epoch()),
        amqp: feed.status.clone(),
        redis_up: AtomicBool::new(false),
        started: AtomicBool::new(false),
        advertise: cfg.advertise.clone(),
        metrics,
        prober: lookup::Prober::default(),
        routing_managed: cfg.routing_managed,
    });
    tracing::info!(
        gateway = %cfg.gateway.gateway_id,
        advertise = %cfg.advertise,
        ?listeners,
        ops = %cfg.ops_listen,
        "gateway starting"
    );

    // A consumer that reconnected may have missed deliveries, and log-out
    // notices: those are looked up from the last it heard, on their own.
    let mut resync = feed.resync.clone();
    let resync_shared = shared.clone();
    let resyncer = AbortOnDropHandle::new(tokio::spawn(async move {
        while resync.changed().await.is_ok() {
            let heard_at_ms = *resync.borrow_and_update();
            resync_shared.registry.resync_all();
            tokio::spawn(crate::registry::recheck_log_outs(
                resync_shared.clone(),
                heard_at_ms,
            ));
        }
    }));
    // Devices of this gateway that logged in again on another.
    let mut replaced = feed.replaced;
    let replace_registry = shared.registry.clone();
    let replacer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(newer) = replaced.recv().await {
            close_replaced(&replace_registry, std::slice::from_ref(&newer));
        }
    }));
    // Devices logged out, on any gateway.
    let mut revoked = feed.revoked;
    let revoke_registry = shared.registry.clone();
    let revoker = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(r) = revoked.recv().await {
            crate::registry::revoke_logged(&revoke_registry, &r);
        }
    }));
    let (wake_lease, wake_rx) = watch::channel(false);
    let lease =
        AbortOnDropHandle::new(tokio::spawn(keep_lease(node.clone(), cfg.clone(), wake_rx)));

    let (ops_stop, ops_stop_rx) = watch::channel(false);
    let probe: Arc<dyn Probe> = node.clone();
    let mut lookup = axum::Router::new()
        .route("/route", get(route))
        .with_state(node.clone());
    if let Some(routes) = cfg.public_routes.clone() {
        lookup = lookup.merge(routes);
    }
    let router = ops::router(probe).merge(lookup.clone());
    let mut stop_rx = ops_stop_rx.clone();
    let ops_task = tokio::spawn(ops::serve(ops_listener, router, async move {
        stopped(&mut stop_rx).await
    }));
    let route_task = route_listener.map(|listener| {
        let mut stop_rx = ops_stop_rx;
        let stop = async move { stopped(&mut stop_rx).await };
        match route_tls {
            Some(acceptor) => tokio::spawn(lookup::serve_tls(listener, acceptor, lookup, stop)),
            None => tokio::spawn(ops::serve(listener, lookup, stop)),
        }
    });

    let (gw_stop, gw_stop_rx) = watch::channel(false);
    let gateway = tokio::spawn(crate::run(
        listeners,
        shared.clone(),
        feed.deliveries,
        gw_stop_rx,
    ));

    let drain = AbortOnDropHandle::new(tokio::spawn({
        let shared = shared.clone();
        async move { shared.drain.issue().await }
    }));
    let shed = AbortOnDropHandle::new(tokio::spawn({
        let shared = shared.clone();
        async move { shared.shed.issue().await }
    }));

    stopped(&mut shutdown).await;
    let asked = shared.drain.active();
    tracing::info!(
        already_draining = asked,
        "SIGTERM: leaving the routing table"
    );
    shared.drain.announce();
    let _ = wake_lease.send(true);
    if !asked {
        tokio::time::sleep(cfg.drain_pause).await;
    }
    // Everyone must have been told before the grace period ends.
    let window = cfg
        .gateway
        .shutdown_grace
        .saturating_sub(cfg.drain_pause)
        .max(Duration::from_secs(1));
    let online = shared.metrics.connections.get().max(0) as u64;
    let needed = online
        .div_ceil(window.as_secs().max(1))
        .min(u32::MAX as u64) as u32;
    shared.drain.start(cfg.drain_rate.max(needed));
    tracing::info!(online, rate = shared.drain.rate(), "moving clients away");
    let deadline = Instant::now() + window;
    while shared.metrics.connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = gw_stop.send(true);
    let _ = gateway.await;
    drop((lease, resyncer, replacer, revoker, drain, shed, feed.task));
    if let Err(e) = node
        .redis
        .withdraw(&cfg.gateway.gateway_id, &cfg.advertise)
        .await
    {
        tracing::warn!(error = %e, "lease not withdrawn; it expires by itself");
    }
    let _ = ops_stop.send(true);
    let _ = ops_task.await;
    if let Some(task) = route_task {
        let _ = task.await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}
