//! The publishing side, used by the chat service: delivery batches to the
//! gateways' queues and events to the events exchange, through one task
//! that owns the connection, publishes in batches and waits for confirms.
//! Gateways use it too, for one thing: telling another gateway that a
//! device it holds logged in again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use parley_core::{ChatError, ChatEvent, Delivery, DeliveryBus, Revocation, Session, Signal};
use parley_proto::internal as ipb;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::{
    AmqpConfig, EVERY_GATEWAY_KEY, LinkStatus, OFFLINE_MESSAGE_KEY, backoff, connect,
    declare_exchanges,
};

/// Publishes waiting for the broker, at most; beyond, new ones are dropped
/// (devices recover them by sync) rather than growing memory.
const PUBLISH_QUEUE: usize = 65_536;

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
        Self::start_named(config, "parley-chat")
    }

    /// [`Self::start`] with the connection named `name` on the broker.
    pub fn start_named(config: AmqpConfig, name: &str) -> Self {
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let status = Arc::new(LinkStatus::default());
        let task = tokio::spawn(publisher(
            config.clone(),
            name.to_owned(),
            rx,
            status.clone(),
        ));
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

    /// Queues one delivery batch for the queues bound with `routing_key`.
    fn deliver(&self, routing_key: &str, deliveries: Vec<Delivery>) {
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
            ..Default::default()
        };
        self.enqueue(Outgoing {
            exchange: self.config.deliveries(),
            routing_key: routing_key.to_owned(),
            body: batch.encode_to_vec(),
        });
    }

    fn enqueue(&self, out: Outgoing) {
        if self.tx.try_send(out).is_err() {
            self.status.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("publish queue full; delivery dropped, devices will sync");
        }
    }

    /// Queues what must not be dropped silently: UNAVAILABLE when the
    /// publish queue is full, for the caller to try again.
    fn enqueue_or_fail(&self, out: Outgoing) -> Result<(), ChatError> {
        self.tx.try_send(out).map_err(|_| {
            self.status.dropped.fetch_add(1, Ordering::Relaxed);
            ChatError::Unavailable("the broker's publish queue is full; try again".into())
        })
    }
}

#[async_trait]
impl DeliveryBus for AmqpBus {
    async fn publish(&self, gateway: &str, deliveries: Vec<Delivery>) -> Result<(), ChatError> {
        self.deliver(gateway, deliveries);
        Ok(())
    }

    async fn broadcast(&self, deliveries: Vec<Delivery>) -> Result<(), ChatError> {
        self.deliver(EVERY_GATEWAY_KEY, deliveries);
        Ok(())
    }

    async fn signal(&self, gateway: Option<&str>, signals: Vec<Signal>) -> Result<(), ChatError> {
        let batch = ipb::DeliveryBatch {
            signals: signals
                .into_iter()
                .map(|s| ipb::SignalItem {
                    users: s.users,
                    frame: Some(Arc::unwrap_or_clone(s.frame)),
                })
                .collect(),
            ..Default::default()
        };
        self.enqueue(Outgoing {
            exchange: self.config.deliveries(),
            routing_key: gateway.unwrap_or(EVERY_GATEWAY_KEY).to_owned(),
            body: batch.encode_to_vec(),
        });
        Ok(())
    }

    async fn replaced(&self, gateway: &str, newer: &Session) -> Result<(), ChatError> {
        let notice = ipb::DeviceReplaced {
            user_id: newer.user.clone(),
            device_id: newer.device.clone(),
            epoch: newer.epoch,
            gateway: newer.gateway.clone(),
        };
        let batch = ipb::DeliveryBatch {
            replaced: vec![notice],
            ..Default::default()
        };
        self.enqueue(Outgoing {
            exchange: self.config.deliveries(),
            routing_key: gateway.to_owned(),
            body: batch.encode_to_vec(),
        });
        Ok(())
    }

    async fn revoked(&self, revocation: Revocation) -> Result<(), ChatError> {
        let batch = ipb::DeliveryBatch {
            revoked: vec![revocation.into()],
            ..Default::default()
        };
        self.enqueue_or_fail(Outgoing {
            exchange: self.config.deliveries(),
            routing_key: EVERY_GATEWAY_KEY.to_owned(),
            body: batch.encode_to_vec(),
        })
    }

    async fn events(&self, events: Vec<ChatEvent>) -> Result<(), ChatError> {
        if events.is_empty() {
            return Ok(());
        }
        let items = events
            .into_iter()
            .map(|event| {
                let ChatEvent::OfflineMessage {
                    user,
                    inbox_seq,
                    message,
                } = event;
                ipb::OfflineMessage {
                    user_id: user,
                    inbox_seq,
                    message: Some(Arc::unwrap_or_clone(message)),
                }
            })
            .collect();
        let body = ipb::OfflineMessages { items }.encode_to_vec();
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
async fn publisher(
    config: AmqpConfig,
    name: String,
    mut rx: mpsc::Receiver<Outgoing>,
    status: Arc<LinkStatus>,
) {
    let mut unconfirmed: VecDeque<Outgoing> = VecDeque::new();
    let mut first = true;
    let mut attempt = 0;
    loop {
        let (conn, channel) = match connect(&config.url, &name).await {
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
