//! The consuming side, used by each gateway: its own queue, bound to the
//! deliveries exchange with its name and the every-gateway key, declared on
//! every connect; `resync` changes whenever the consumer had to reconnect,
//! to when it last heard from the broker.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use parley_core::{Delivery, Dispatch, Revocation, Session, Signal};
use parley_proto::internal as ipb;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::{AmqpConfig, EVERY_GATEWAY_KEY, LinkStatus, backoff, connect, declare_exchanges};

/// The consuming side of one gateway; consuming stops when `task` drops.
#[derive(Debug)]
pub struct GatewayFeed {
    /// Delivery batches and signals in the order the broker handed them
    /// over.
    pub deliveries: mpsc::Receiver<Dispatch>,
    /// Devices of this gateway that logged in again elsewhere: the newer
    /// session (its user, device and epoch).
    pub replaced: mpsc::Receiver<Session>,
    /// Devices logged out, on any gateway.
    pub revoked: mpsc::Receiver<Revocation>,
    /// Changes every time the consumer reconnects, to when (ms since the
    /// epoch) it last heard from the broker before the link went (a batch,
    /// or the connect): what was published after that may be lost, so
    /// connections should catch up from the database and log-outs since
    /// then be looked up.
    pub resync: watch::Receiver<i64>,
    pub status: Arc<LinkStatus>,
    pub task: AbortOnDropHandle<()>,
}

/// Starts consuming `gateway`'s queue, declaring it (and the exchange) on
/// every connect.
pub fn consume(config: AmqpConfig, gateway: &str, capacity: usize) -> GatewayFeed {
    let (tx, rx) = mpsc::channel(capacity);
    let (replaced_tx, replaced) = mpsc::channel(REPLACED_QUEUE);
    let (revoked_tx, revoked) = mpsc::channel(REPLACED_QUEUE);
    let (resync_tx, resync) = watch::channel(0);
    let status = Arc::new(LinkStatus::default());
    let task = tokio::spawn(consumer(
        config,
        gateway.to_owned(),
        Outputs {
            deliveries: tx,
            replaced: replaced_tx,
            revoked: revoked_tx,
        },
        resync_tx,
        status.clone(),
    ));
    GatewayFeed {
        deliveries: rx,
        replaced,
        revoked,
        resync,
        status,
        task: AbortOnDropHandle::new(task),
    }
}

/// Replacement and log-out notices waiting for the registry; past it they
/// are dropped (a replaced device is found again by the presence refresh).
const REPLACED_QUEUE: usize = 1024;

/// Where the consumer hands what it decodes.
struct Outputs {
    deliveries: mpsc::Sender<Dispatch>,
    replaced: mpsc::Sender<Session>,
    revoked: mpsc::Sender<Revocation>,
}

/// What one message of the queue carries.
struct Decoded {
    deliveries: Vec<Delivery>,
    signals: Vec<Signal>,
    replaced: Vec<Session>,
    revoked: Vec<Revocation>,
}

fn decode_batch(body: &[u8]) -> Option<Decoded> {
    let batch = ipb::DeliveryBatch::decode(body).ok()?;
    let deliveries = batch
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
        .collect();
    let replaced = batch
        .replaced
        .into_iter()
        .map(|r| Session::new(&r.user_id, &r.device_id, &r.gateway, r.epoch))
        .collect();
    let revoked = batch.revoked.into_iter().map(Revocation::from).collect();
    let signals = batch
        .signals
        .into_iter()
        .filter_map(|s| {
            Some(Signal {
                frame: Arc::new(s.frame?),
                users: s.users,
            })
        })
        .collect();
    Some(Decoded {
        deliveries,
        signals,
        replaced,
        revoked,
    })
}

async fn consumer(
    config: AmqpConfig,
    gateway: String,
    out: Outputs,
    resync: watch::Sender<i64>,
    status: Arc<LinkStatus>,
) {
    let queue = config.gateway_queue(&gateway);
    let mut first = true;
    // When the broker was last heard from: a batch, or the connect.
    let mut heard_at_ms = parley_core::now_ms();
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
            for key in [gateway.as_str(), EVERY_GATEWAY_KEY] {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        config.deliveries().into(),
                        key.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
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
            resync.send_replace(heard_at_ms);
        }
        heard_at_ms = parley_core::now_ms();
        first = false;
        attempt = 0;
        while let Some(delivery) = stream.next().await {
            match delivery {
                Ok(d) => {
                    heard_at_ms = parley_core::now_ms();
                    match decode_batch(&d.data) {
                        Some(decoded) => {
                            for newer in decoded.replaced {
                                if out.replaced.try_send(newer).is_err() {
                                    tracing::warn!(
                                        "replacement notice dropped; the presence refresh repeats it"
                                    );
                                }
                            }
                            for revocation in decoded.revoked {
                                // Not dropped for lack of room: waits for the
                                // registry (they are rare).
                                let _ = out.revoked.send(revocation).await;
                            }
                            let batches = [
                                Dispatch::Messages(decoded.deliveries),
                                Dispatch::Signals(decoded.signals),
                            ];
                            for batch in batches {
                                let empty = match &batch {
                                    Dispatch::Messages(m) => m.is_empty(),
                                    Dispatch::Signals(s) => s.is_empty(),
                                };
                                if !empty && out.deliveries.send(batch).await.is_err() {
                                    let _ = conn.close(200, "bye".into()).await;
                                    return;
                                }
                            }
                        }
                        None => tracing::warn!("undecodable delivery batch skipped"),
                    }
                }
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
