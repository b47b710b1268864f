//! The push senders' side of the events exchange. Every sender replica
//! consumes one durable queue, `P.push`, bound with `message.offline`
//! (competing consumers), with manual acks under a prefetch: a batch of
//! cues leaves the queue only once its notifications were handled, and the
//! cues a sender held when it died go to another (or to it, restarted),
//! marked redelivered. What still failed after every try goes to
//! `P.push.dead`, a durable queue, as JSON, for an operator to look at or
//! replay. Both queues are bounded (the oldest go first): a cue a day old
//! is no use to anyone.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, BasicProperties, Channel};
use parley_core::ChatEvent;
use parley_proto::internal as ipb;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::{AmqpConfig, LinkStatus, OFFLINE_MESSAGE_KEY, backoff, connect, declare_exchanges};

/// Most cues the queue keeps, and for how long.
const QUEUE_MAX: u32 = 1_000_000;
const QUEUE_TTL_MS: u32 = 24 * 3600 * 1000;
/// Most dead letters kept.
const DEAD_MAX: u32 = 100_000;

impl AmqpConfig {
    /// The push senders' queue.
    pub fn push_queue(&self) -> String {
        format!("{}.push", self.prefix)
    }

    /// Where notifications that failed for good go.
    pub fn push_dead_queue(&self) -> String {
        format!("{}.push.dead", self.prefix)
    }
}

/// The cues of one message of the queue (one committed batch's), to be
/// acked once handled.
pub struct CueBatch {
    pub cues: Vec<ChatEvent>,
    /// The broker handed it out before (a sender died holding it).
    pub redelivered: bool,
    acker: Acker,
}

impl std::fmt::Debug for CueBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CueBatch")
            .field("cues", &self.cues.len())
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl CueBatch {
    /// Handled: off the queue. A failure (the link dropped) means the
    /// broker hands it out again, which the ledger makes harmless.
    pub async fn ack(&self) {
        if let Err(e) = self.acker.ack(BasicAckOptions::default()).await {
            tracing::debug!(error = %e, "cue batch not acked; it comes again");
        }
    }

    /// Not handled (the store could not be read): back on the queue.
    pub async fn retry(&self) {
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(e) = self.acker.nack(requeue).await {
            tracing::debug!(error = %e, "cue batch not returned; it comes again");
        }
    }
}

/// A sender's feed; consuming stops when `task` drops.
#[derive(Debug)]
pub struct CueFeed {
    /// Cue batches as the broker hands them over.
    pub batches: mpsc::Receiver<CueBatch>,
    dead: mpsc::Sender<Vec<u8>>,
    pub status: Arc<LinkStatus>,
    pub task: AbortOnDropHandle<()>,
}

impl CueFeed {
    /// Where dead letters (JSON bodies) go, for the dead-letter queue; a
    /// `try_send` fails when too many wait already.
    pub fn dead_letters(&self) -> mpsc::Sender<Vec<u8>> {
        self.dead.clone()
    }
}

/// Starts consuming the push queue, declaring both queues (and the
/// exchanges) on every connect. `prefetch`: cue batches held unacked at
/// once.
pub fn consume_cues(config: AmqpConfig, name: &str, prefetch: u16) -> CueFeed {
    let (tx, batches) = mpsc::channel(usize::from(prefetch.max(1)));
    let (dead, dead_rx) = mpsc::channel(1024);
    let status = Arc::new(LinkStatus::default());
    let task = tokio::spawn(consumer(
        config,
        name.to_owned(),
        prefetch.max(1),
        tx,
        dead_rx,
        status.clone(),
    ));
    CueFeed {
        batches,
        dead,
        status,
        task: AbortOnDropHandle::new(task),
    }
}

fn decode(body: &[u8]) -> Option<Vec<ChatEvent>> {
    let batch = ipb::OfflineMessages::decode(body).ok()?;
    Some(
        batch
            .items
            .into_iter()
            .filter_map(|i| {
                Some(ChatEvent::OfflineMessage {
                    user: i.user_id,
                    inbox_seq: i.inbox_seq,
                    message: Arc::new(i.message?),
                })
            })
            .collect(),
    )
}

async fn declare(channel: &Channel, config: &AmqpConfig) -> Result<(), lapin::Error> {
    declare_exchanges(channel, config).await?;
    let bounded = |max: u32, ttl: Option<u32>| {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongUInt(max));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        if let Some(ttl) = ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        }
        args
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            config.push_queue().as_str().into(),
            durable,
            bounded(QUEUE_MAX, Some(QUEUE_TTL_MS)),
        )
        .await?;
    channel
        .queue_bind(
            config.push_queue().as_str().into(),
            config.events().into(),
            OFFLINE_MESSAGE_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.push_dead_queue().as_str().into(),
            durable,
            bounded(DEAD_MAX, None),
        )
        .await?;
    Ok(())
}

async fn consumer(
    config: AmqpConfig,
    name: String,
    prefetch: u16,
    out: mpsc::Sender<CueBatch>,
    mut dead: mpsc::Receiver<Vec<u8>>,
    status: Arc<LinkStatus>,
) {
    let mut first = true;
    let mut attempt = 0;
    let persistent = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    loop {
        let setup = async {
            let (conn, channel) = connect(&config.url, &format!("parley-push {name}")).await?;
            declare(&channel, &config).await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    config.push_queue().as_str().into(),
                    format!("push-{name}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((conn, channel, consumer))
        };
        let (conn, channel, mut stream) = match setup.await {
            Ok(s) => s,
            Err(e) => {
                status.down();
                tracing::warn!(error = %e, "RabbitMQ push consumer setup failed; retrying");
                backoff(&mut attempt).await;
                continue;
            }
        };
        status.up(first);
        first = false;
        attempt = 0;
        loop {
            tokio::select! {
                delivery = stream.next() => match delivery {
                    Some(Ok(d)) => match decode(&d.data) {
                        Some(cues) => {
                            let batch = CueBatch {
                                cues,
                                redelivered: d.redelivered,
                                acker: d.acker,
                            };
                            if out.send(batch).await.is_err() {
                                let _ = conn.close(200, "bye".into()).await;
                                return;
                            }
                        }
                        None => {
                            tracing::warn!("undecodable cue batch dropped");
                            let _ = d.acker.ack(BasicAckOptions::default()).await;
                        }
                    },
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "RabbitMQ push consumer failed");
                        break;
                    }
                    None => break,
                },
                Some(body) = dead.recv() => {
                    let sent = channel
                        .basic_publish(
                            "".into(),
                            config.push_dead_queue().as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            persistent.clone(),
                        )
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "dead letter not published");
                        break;
                    }
                }
            }
        }
        status.down();
        tracing::warn!("RabbitMQ push consumer lost its connection; reconnecting");
        let _ = conn.close(200, "bye".into()).await;
        backoff(&mut attempt).await;
    }
}
