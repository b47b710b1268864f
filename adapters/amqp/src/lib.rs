//! The cluster's delivery bus on RabbitMQ.
//!
//! Topology (`P` is the cluster's prefix):
//! - `P.deliveries`, a direct exchange. Each gateway declares its own queue
//!   `P.gw.<gateway>` bound with its name as routing key, and consumes it;
//!   a chat service publishes a delivery batch with the gateway's name as
//!   routing key, so a message goes only to gateways holding its recipients.
//!   Every queue is also bound with `#every-gateway` (no gateway name can
//!   hold a `#`): a batch published with it reaches every gateway, which
//!   is how deliveries travel while presence cannot say where recipients
//!   are (Redis unreachable, or restarted empty and not yet written back).
//!   The queue expires when its gateway is gone (`x-expires`), and is bounded
//!   (`x-max-length`, `x-message-ttl`): what it drops, devices get by sync.
//! - `P.events`, a durable topic exchange for services outside the message
//!   path. Routing key `message.offline`: a message for a user with no device
//!   online (body `parley.internal.v1.OfflineMessages`), the cue for push
//!   notifications. The push senders consume them from `P.push` (and put
//!   what failed for good on `P.push.dead`; see `cues`); bind your own
//!   queue to receive them too.
//!
//! Publishing is asynchronous and confirmed: publishes queue up (bounded)
//! for a task that owns the connection, sends them, and waits for the
//! broker's confirms; what was not confirmed is sent again after it
//! reconnects. Both sides reconnect by themselves with backoff. A gateway
//! whose consumer reconnects asks every connection to catch up from the
//! database, since its queue may have lost deliveries meanwhile.

mod cues;
mod feed;
mod publish;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use cues::{CueBatch, CueFeed, consume_cues};
pub use feed::{GatewayFeed, consume};
pub use publish::AmqpBus;

/// The routing key every gateway's queue is bound with besides its own name.
pub const EVERY_GATEWAY_KEY: &str = "#every-gateway";

/// The routing key of offline-message events.
pub const OFFLINE_MESSAGE_KEY: &str = "message.offline";

/// Where the broker is and whose names to use.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Starts every exchange and queue name.
    pub prefix: String,
}

impl AmqpConfig {
    pub(crate) fn deliveries(&self) -> String {
        format!("{}.deliveries", self.prefix)
    }

    pub(crate) fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The delivery queue of `gateway`.
    pub fn gateway_queue(&self, gateway: &str) -> String {
        format!("{}.gw.{gateway}", self.prefix)
    }
}

/// Connection health, for readiness and metrics.
#[derive(Debug, Default)]
pub struct LinkStatus {
    connected: AtomicBool,
    reconnects: AtomicU64,
    dropped: AtomicU64,
}

impl LinkStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connections made after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Publishes given up on (queue full); their devices sync.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn up(&self, first: bool) {
        self.connected.store(true, Ordering::Relaxed);
        if !first {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn down(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }
}

pub(crate) async fn connect(url: &str, name: &str) -> Result<(Connection, Channel), lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let conn = Connection::connect(url, props).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

pub(crate) async fn declare_exchanges(
    channel: &Channel,
    config: &AmqpConfig,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            config.deliveries().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            config.events().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Sleeps with exponential backoff, capped; resets on success elsewhere.
pub(crate) async fn backoff(attempt: &mut u32) {
    let ms = (100u64 << (*attempt).min(5)).min(3_000);
    *attempt += 1;
    tokio::time::sleep(Duration::from_millis(ms + rand::random::<u64>() % 100)).await;
}

/// Deletes a cluster's exchanges, its push queues and the queues of
/// `gateways` (tests, and a cluster being deleted).
pub async fn delete_topology(config: &AmqpConfig, gateways: &[&str]) -> Result<(), lapin::Error> {
    let (conn, channel) = connect(&config.url, "parley-cleanup").await?;
    let push = [config.push_queue(), config.push_dead_queue()];
    for q in gateways.iter().map(|g| config.gateway_queue(g)).chain(push) {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    for x in [config.deliveries(), config.events()] {
        let _ = channel
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
    conn.close(200, "bye".into()).await
}

#[cfg(test)]
mod tests;
