//! The cluster's delivery bus on RabbitMQ.
//!
//! Topology (`P` is the cluster's prefix):
//! - `P.deliveries`, a direct exchange. Each gateway declares its own queue
//!   `P.gw.<gateway>` bound with its name as routing key, and consumes it;
//!   a chat service publishes a delivery batch with the gateway's name as
//!   routing key, so a message goes only to gateways holding its recipients.
//!   The queue expires when its gateway is gone (`x-expires`), and is bounded
//!   (`x-max-length`, `x-message-ttl`): what it drops, devices get by sync.
//! - `P.events`, a durable topic exchange for services outside the message
//!   path. Routing key `message.offline`: a message for a user with no device
//!   online (body `parley.internal.v1.OfflineMessage`), the cue for push
//!   notifications. Bind your own queue to receive them.
//!
//! Publishing is asynchronous and confirmed: publishes queue up (bounded)
//! for a task that owns the connection, sends them, and waits for the
//! broker's confirms; what was not confirmed is sent again after it
//! reconnects. Both sides reconnect by themselves with backoff. A gateway
//! whose consumer reconnects asks every connection to catch up from the
//! database, since its queue may have lost deliveries meanwhile.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use parley_proto::internal as ipb;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::bus::{ChatEvent, Delivery, DeliveryBus};
use crate::error::ChatError;

/// The routing key of offline-message events.
pub const OFFLINE_MESSAGE_KEY: &str = "message.offline";

/// Publishes waiting for the broker, at most; beyond, new ones are dropped
/// (devices recover them by sync) rather than growing memory.
const PUBLISH_QUEUE: usize = 65_536;

/// Where the broker is and whose names to use.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Starts every exchange and queue name.
    pub prefix: String,
}

impl AmqpConfig {
    fn deliveries(&self) -> String {
        format!("{}.deliveries", self.prefix)
    }

    fn events(&self) -> String {
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

    fn up(&self, first: bool) {
        self.connected.store(true, Ordering::Relaxed);
        if !first {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn down(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }
}

async fn connect(url: &str, name: &str) -> Result<(Connection, Channel), lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let conn = Connection::connect(url, props).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

async fn declare_exchanges(channel: &Channel, config: &AmqpConfig) -> Result<(), lapin::Error> {
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
async fn backoff(attempt: &mut u32) {
    let ms = (100u64 << (*attempt).min(5)).min(3_000);
    *attempt += 1;
    tokio::time::sleep(Duration::from_millis(ms + rand::random::<u64>() % 100)).await;
}

/// One message for the publisher task.
struct Outgoing {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
}

/// The publishing side, used by the chat service.
pub struct AmqpBus {
    config: AmqpConfig,
    tx: mpsc::Sender<Outgoing>,
    status: Arc<LinkStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus")
            .field("prefix", &self.config.prefix)
            .field("connected", &self.status.connected())
            .finish()
    }
}

impl Drop for AmqpBus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AmqpBus {
    /// Starts the publisher; it connects (and reconnects) in the background.
    pub fn start(config: AmqpConfig) -> Self {
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let status = Arc::new(LinkStatus::default());
        let task = tokio::spawn(publisher(config.clone(), rx, status.clone()));
        Self {
            config,
            tx,
            status,
            task,
        }
    }

    pub fn status(&self) -> &Arc<LinkStatus> {
        &self.status
    }

    fn enqueue(&self, out: Outgoing) {
        if self.tx.try_send(out).is_err() {
            self.status.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("publish queue full; delivery dropped, devices will sync");
        }
    }
}

#[async_trait]
impl DeliveryBus for AmqpBus {
    async fn publish(&self, gateway: &str, deliveries: Vec<Delivery>) -> Result<(), ChatError> {
        let batch = ipb::DeliveryBatch {
            items: deliveries
                .into_iter()
                .map(|d| ipb::DeliveryItem {
                    message: Some(Arc::unwrap_or_clone(d.message)),
                    recipients: d
                        .recipients
                        .into_iter()
                        .map(|(user_id, inbox_seq)| ipb::Recipient { user_id, inbox_seq })
                        .collect(),
                })
                .collect(),
        };
        self.enqueue(Outgoing {
            exchange: self.config.deliveries(),
            routing_key: gateway.to_owned(),
            body: batch.encode_to_vec(),
        });
        Ok(())
    }

    async fn event(&self, event: ChatEvent) -> Result<(), ChatError> {
        let ChatEvent::OfflineMessage {
            user,
            inbox_seq,
            message,
        } = event;
        let body = ipb::OfflineMessage {
            user_id: user,
            inbox_seq,
            message: Some(Arc::unwrap_or_clone(message)),
        }
        .encode_to_vec();
        self.enqueue(Outgoing {
            exchange: self.config.events(),
            routing_key: OFFLINE_MESSAGE_KEY.to_owned(),
            body,
        });
        Ok(())
    }
}

/// Owns the publishing connection: sends in batches, waits for confirms,
/// and keeps what was not confirmed for after the reconnect.
async fn publisher(config: AmqpConfig, mut rx: mpsc::Receiver<Outgoing>, status: Arc<LinkStatus>) {
    let mut unconfirmed: VecDeque<Outgoing> = VecDeque::new();
    let mut first = true;
    let mut attempt = 0;
    loop {
        let (conn, channel) = match connect(&config.url, "parley-chat").await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "RabbitMQ unreachable; retrying");
                backoff(&mut attempt).await;
                if rx.is_closed() && rx.is_empty() {
                    return;
                }
                continue;
            }
        };
        let ready = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare_exchanges(&channel, &config).await
        };
        if let Err(e) = ready.await {
            tracing::warn!(error = %e, "RabbitMQ setup failed; retrying");
            backoff(&mut attempt).await;
            continue;
        }
        status.up(first);
        if !first {
            tracing::info!(
                resending = unconfirmed.len(),
                "RabbitMQ publisher reconnected"
            );
        }
        first = false;
        attempt = 0;
        let result = publish_loop(&channel, &mut rx, &mut unconfirmed).await;
        status.down();
        let _ = conn.close(200, "bye".into()).await;
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, pending = unconfirmed.len(), "RabbitMQ publisher lost its connection; reconnecting");
                backoff(&mut attempt).await;
            }
        }
    }
}

/// Publishes until the channel fails (Err) or the bus is dropped (Ok).
async fn publish_loop(
    channel: &Channel,
    rx: &mut mpsc::Receiver<Outgoing>,
    unconfirmed: &mut VecDeque<Outgoing>,
) -> Result<(), lapin::Error> {
    let props = BasicProperties::default().with_content_type("application/x-protobuf".into());
    let mut fresh = Vec::with_capacity(256);
    loop {
        if unconfirmed.is_empty() {
            if rx.recv_many(&mut fresh, 256).await == 0 {
                return Ok(());
            }
            unconfirmed.extend(fresh.drain(..));
        }
        // Everything in `unconfirmed` goes out, then one wait covers it all.
        for out in unconfirmed.iter() {
            channel
                .basic_publish(
                    out.exchange.as_str().into(),
                    out.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &out.body,
                    props.clone(),
                )
                .await?;
        }
        channel.wait_for_confirms().await?;
        unconfirmed.clear();
        // Take what queued meanwhile without waiting.
        while unconfirmed.len() < 256 {
            match rx.try_recv() {
                Ok(out) => unconfirmed.push_back(out),
                Err(_) => break,
            }
        }
    }
}

/// A task stopped when this is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The consuming side of one gateway; consuming stops when `task` drops.
#[derive(Debug)]
pub struct GatewayFeed {
    /// Delivery batches in the order the broker handed them over.
    pub deliveries: mpsc::Receiver<Vec<Delivery>>,
    /// Ticks every time the consumer reconnects: deliveries may have been
    /// lost meanwhile, so connections should catch up from the database.
    pub resync: watch::Receiver<u64>,
    pub status: Arc<LinkStatus>,
    pub task: AbortOnDrop,
}

/// Starts consuming `gateway`'s queue, declaring it (and the exchange) on
/// every connect.
pub fn consume(config: AmqpConfig, gateway: &str, capacity: usize) -> GatewayFeed {
    let (tx, rx) = mpsc::channel(capacity);
    let (resync_tx, resync) = watch::channel(0);
    let status = Arc::new(LinkStatus::default());
    let task = tokio::spawn(consumer(
        config,
        gateway.to_owned(),
        tx,
        resync_tx,
        status.clone(),
    ));
    GatewayFeed {
        deliveries: rx,
        resync,
        status,
        task: AbortOnDrop(task),
    }
}

fn decode_batch(body: &[u8]) -> Option<Vec<Delivery>> {
    let batch = ipb::DeliveryBatch::decode(body).ok()?;
    Some(
        batch
            .items
            .into_iter()
            .filter_map(|item| {
                Some(Delivery {
                    message: Arc::new(item.message?),
                    recipients: item
                        .recipients
                        .into_iter()
                        .map(|r| (r.user_id, r.inbox_seq))
                        .collect(),
                })
            })
            .collect(),
    )
}

async fn consumer(
    config: AmqpConfig,
    gateway: String,
    tx: mpsc::Sender<Vec<Delivery>>,
    resync: watch::Sender<u64>,
    status: Arc<LinkStatus>,
) {
    let queue = config.gateway_queue(&gateway);
    let mut first = true;
    let mut attempt = 0;
    loop {
        let setup = async {
            let (conn, channel) =
                connect(&config.url, &format!("parley-gateway {gateway}")).await?;
            declare_exchanges(&channel, &config).await?;
            let mut args = FieldTable::default();
            // Gone 30 s after its gateway; bounded while it lives.
            args.insert("x-expires".into(), AMQPValue::LongUInt(30_000));
            args.insert("x-max-length".into(), AMQPValue::LongUInt(100_000));
            args.insert("x-message-ttl".into(), AMQPValue::LongUInt(60_000));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("drop-head".into()),
            );
            channel
                .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    config.deliveries().into(),
                    gateway.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("gw-{gateway}").into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((conn, channel, consumer))
        };
        let (conn, _channel, mut stream) = match setup.await {
            Ok(s) => s,
            Err(e) => {
                status.down();
                tracing::warn!(error = %e, "RabbitMQ consumer setup failed; retrying");
                backoff(&mut attempt).await;
                continue;
            }
        };
        status.up(first);
        if !first {
            tracing::info!(
                gateway,
                "RabbitMQ consumer reconnected; connections catch up"
            );
            resync.send_modify(|n| *n += 1);
        }
        first = false;
        attempt = 0;
        while let Some(delivery) = stream.next().await {
            match delivery {
                Ok(d) => match decode_batch(&d.data) {
                    Some(batch) => {
                        if tx.send(batch).await.is_err() {
                            let _ = conn.close(200, "bye".into()).await;
                            return;
                        }
                    }
                    None => tracing::warn!("undecodable delivery batch skipped"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "RabbitMQ consumer failed");
                    break;
                }
            }
        }
        status.down();
        tracing::warn!(
            gateway,
            "RabbitMQ consumer lost its connection; reconnecting"
        );
        let _ = conn.close(200, "bye".into()).await;
        backoff(&mut attempt).await;
    }
}

/// Deletes a cluster's exchanges and the queues of `gateways` (tests, and a
/// cluster being deleted).
pub async fn delete_topology(config: &AmqpConfig, gateways: &[&str]) -> Result<(), lapin::Error> {
    let (conn, channel) = connect(&config.url, "parley-cleanup").await?;
    for g in gateways {
        let _ = channel
            .queue_delete(config.gateway_queue(g).as_str().into(), Default::default())
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
mod tests {
    use parley_proto::pb;

    use super::*;

    fn test_config() -> AmqpConfig {
        AmqpConfig {
            url: std::env::var("PARLEY_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            prefix: crate::testing::unique_name("parley-t"),
        }
    }

    fn delivery(seq: u64, users: &[&str]) -> Delivery {
        Delivery {
            message: Arc::new(pb::Message {
                msg_id: seq,
                seq,
                content: Some(pb::Content::text("hi")),
                ..Default::default()
            }),
            recipients: users.iter().map(|u| ((*u).to_owned(), seq)).collect(),
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..600 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn deliveries_reach_only_their_gateway_and_events_their_exchange() {
        let config = test_config();
        let mut g1 = consume(config.clone(), "g1", 16);
        let mut g2 = consume(config.clone(), "g2", 16);
        until("consumers", || {
            g1.status.connected() && g2.status.connected()
        })
        .await;

        // A push-notification service binds its own queue to the events.
        let (conn, channel) = connect(&config.url, "test").await.unwrap();
        let push_queue = format!("{}.push", config.prefix);
        channel
            .queue_declare(
                push_queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                push_queue.as_str().into(),
                config.events().into(),
                "message.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut push = channel
            .basic_consume(
                push_queue.as_str().into(),
                "push".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();

        let bus = AmqpBus::start(config.clone());
        bus.publish(
            "g1",
            vec![delivery(1, &["ann"]), delivery(2, &["ann", "bo"])],
        )
        .await
        .unwrap();
        bus.publish("g2", vec![delivery(3, &["cy"])]).await.unwrap();
        bus.event(ChatEvent::OfflineMessage {
            user: "dee".into(),
            inbox_seq: 7,
            message: delivery(4, &[]).message,
        })
        .await
        .unwrap();

        let batch = tokio::time::timeout(Duration::from_secs(10), g1.deliveries.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            batch[1].recipients,
            vec![("ann".into(), 2), ("bo".into(), 2)]
        );
        assert_eq!(
            batch[1].message.content.as_ref().unwrap().as_text(),
            Some("hi")
        );
        let batch = tokio::time::timeout(Duration::from_secs(10), g2.deliveries.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch[0].message.seq, 3);
        assert!(g1.deliveries.try_recv().is_err(), "g1 got only its own");

        let event = tokio::time::timeout(Duration::from_secs(10), push.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.routing_key.as_str(), OFFLINE_MESSAGE_KEY);
        let offline = ipb::OfflineMessage::decode(event.data.as_slice()).unwrap();
        assert_eq!((offline.user_id.as_str(), offline.inbox_seq), ("dee", 7));
        assert!(bus.status().connected());
        assert_eq!(bus.status().dropped(), 0);

        drop((g1, g2, bus));
        conn.close(200, "bye".into()).await.unwrap();
        delete_topology(&config, &["g1", "g2"]).await.unwrap();
    }
}
