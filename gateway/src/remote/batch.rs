//! The gateway's hot path to the chat service: every connection's sends and
//! acks go into one queue, and a task sorts what waits there into a lane per
//! chat-service replica (a send to the replica its conversation hashes to,
//! an ack to its user's) and takes each lane's items as one `Batch` call,
//! up to `batch_max` items, with at most `batches_in_flight` calls out per
//! replica. Nothing waits on a timer: with the chat service idle a send
//! leaves at once, alone; under load the call in flight to a replica makes
//! that replica's next one wait, and everything that arrives for it
//! meanwhile goes with it. So a batch costs one round trip and (on the chat
//! service) one transaction, however many devices it carries, and a
//! conversation's sends meet in one replica's transactions. One call in
//! flight per replica (the default) makes each call carry everything that
//! arrived during the last; the chat service's short linger
//! (`PARLEY_BATCH_LINGER_US`) sets the pace.
//!
//! A call that fails in transport is sent again whole to another replica,
//! which is safe: sends are deduplicated by client id, acks only move
//! cursors forward; the failed replica is set aside, so what arrives next
//! hashes to the others. The queue is bounded (and what the lanes hold, by
//! as much again): when it is full, a send is refused at once with
//! UNAVAILABLE rather than held.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parley_core::ChatError;
use parley_proto::internal as ipb;
use parley_proto::pb::ErrorCode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

use super::{Caller, RemoteConfig, Replica, fnv};

pub(super) use ipb::batch_item::Body as Item;
pub(super) use ipb::batch_result::Body as Answer;

/// One device's item, what routes it, and where its answer goes.
struct Queued {
    /// A send's conversation, or an ack's user hashed.
    key: u64,
    item: ipb::BatchItem,
    reply: oneshot::Sender<Result<Answer, ChatError>>,
}

/// How many calls went out, and how many items they carried.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) calls: AtomicU64,
    pub(super) items: AtomicU64,
}

/// The queue and the task that empties it.
pub(super) struct Batches {
    tx: mpsc::Sender<Queued>,
    pub(super) counts: Arc<Counts>,
    _task: AbortOnDropHandle<()>,
}

impl Batches {
    pub(super) fn start(caller: Arc<Caller>, config: &RemoteConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.batch_queue.max(1));
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(run(
            caller,
            rx,
            counts.clone(),
            Limits {
                batch_max: config.batch_max.max(1),
                in_flight: config.batches_in_flight.max(1),
                held: config.batch_queue.max(1),
            },
        ));
        Self {
            tx,
            counts,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Sends `item` for `user`'s `device` with the next batch and waits for
    /// its answer; a refused item is an error.
    pub(super) async fn submit(
        &self,
        user: &str,
        device: &str,
        item: Item,
    ) -> Result<Answer, ChatError> {
        let answer = self.queue(user, device, item)?;
        match answer.await {
            Ok(Ok(Answer::Error(e))) => Err(refused(e)),
            Ok(answer) => answer,
            Err(_) => Err(ChatError::Unavailable("the gateway is stopping".into())),
        }
    }

    /// Sends `item` with the next batch without waiting for its answer (an
    /// ack: a lost one is made good by the next).
    pub(super) fn enqueue(&self, user: &str, device: &str, item: Item) {
        if let Err(e) = self.queue(user, device, item) {
            tracing::debug!(error = %e, "item not sent");
        }
    }

    /// Puts `item` in the queue; the answer comes on the returned channel.
    fn queue(
        &self,
        user: &str,
        device: &str,
        item: Item,
    ) -> Result<oneshot::Receiver<Result<Answer, ChatError>>, ChatError> {
        let (reply, answer) = oneshot::channel();
        let key = match &item {
            Item::Send(send) => send.conversation_id,
            _ => fnv(user.as_bytes()),
        };
        let queued = Queued {
            key,
            item: ipb::BatchItem {
                user_id: user.to_owned(),
                device_id: device.to_owned(),
                body: Some(item),
            },
            reply,
        };
        self.tx.try_send(queued).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ChatError::Unavailable("this gateway is busy; retry shortly".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                ChatError::Unavailable("the gateway is stopping".into())
            }
        })?;
        Ok(answer)
    }
}

/// The chat service's refusal of one item, passed on as it came.
fn refused(e: parley_proto::pb::Error) -> ChatError {
    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
    ChatError::Remote(code, e.message)
}

/// An answer of the wrong kind for its item (a chat service that does not
/// keep the contract).
pub(super) fn unexpected(answer: &Answer) -> ChatError {
    tracing::error!(
        ?answer,
        "the chat service answered an item with the wrong kind"
    );
    ChatError::Unavailable("unexpected answer from the chat service".into())
}

/// How much the batching task takes at once and holds.
struct Limits {
    batch_max: usize,
    /// Calls out at once per replica.
    in_flight: usize,
    /// Items the lanes hold at most; past it the queue fills.
    held: usize,
}

/// The items waiting for one replica, and its calls out.
struct Lane {
    replica: Arc<Replica>,
    waiting: Vec<Queued>,
    busy: usize,
}

/// Tells the batching task that a call to this replica ended, however it
/// ended.
struct CallEnd(SocketAddr, mpsc::UnboundedSender<SocketAddr>);

impl Drop for CallEnd {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// Sorts what waits into lanes and sends each lane's items, a call at a
/// time, while a call to its replica may go out.
async fn run(
    caller: Arc<Caller>,
    mut rx: mpsc::Receiver<Queued>,
    counts: Arc<Counts>,
    limits: Limits,
) {
    let mut lanes: HashMap<SocketAddr, Lane> = HashMap::new();
    // Calls run on tasks of their own (a call out when the gateway stops
    // still answers its devices) and say here when they end.
    let (ended, mut ends) = mpsc::unbounded_channel();
    let mut out = 0;
    let mut incoming = Vec::with_capacity(limits.batch_max);
    let mut held = 0;
    let mut open = true;
    loop {
        for (addr, lane) in &mut lanes {
            while lane.busy < limits.in_flight && !lane.waiting.is_empty() {
                let n = lane.waiting.len().min(limits.batch_max);
                let batch: Vec<Queued> = lane.waiting.drain(..n).collect();
                held -= n;
                lane.busy += 1;
                counts.calls.fetch_add(1, Ordering::Relaxed);
                counts.items.fetch_add(n as u64, Ordering::Relaxed);
                out += 1;
                let (caller, replica) = (caller.clone(), lane.replica.clone());
                let end = CallEnd(*addr, ended.clone());
                tokio::spawn(async move {
                    send(&caller, replica, batch).await;
                    drop(end);
                });
            }
        }
        lanes.retain(|_, lane| lane.busy > 0 || !lane.waiting.is_empty());
        tokio::select! {
            n = rx.recv_many(&mut incoming, limits.batch_max), if open && held < limits.held => {
                if n == 0 {
                    open = false;
                }
                for q in incoming.drain(..) {
                    let Some(replica) = caller.pool.pick_for(q.key) else {
                        let _ = q.reply.send(Err(ChatError::Unavailable(
                            "no chat-service replica is known; retry".into(),
                        )));
                        continue;
                    };
                    held += 1;
                    lanes
                        .entry(replica.addr)
                        .or_insert_with(|| Lane {
                            replica,
                            waiting: Vec::new(),
                            busy: 0,
                        })
                        .waiting
                        .push(q);
                }
            }
            Some(addr) = ends.recv(), if out > 0 => {
                out -= 1;
                if let Some(lane) = lanes.get_mut(&addr) {
                    lane.busy -= 1;
                }
            }
            else => return,
        }
    }
}

/// One `Batch` call, its answers handed to the devices waiting for them.
async fn send(caller: &Caller, replica: Arc<Replica>, batch: Vec<Queued>) {
    let n = batch.len();
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
    let req = ipb::BatchRequest { items };
    let answered = caller
        .invoke_on(Some(replica), true, |mut c| {
            let req = req.clone();
            async move { c.batch(req).await }
        })
        .await;
    match answered {
        Ok(reply) if reply.results.len() == n => {
            for (result, reply) in reply.results.into_iter().zip(replies) {
                let answer = result.body.ok_or_else(|| {
                    ChatError::Unavailable("an empty answer from the chat service".into())
                });
                let _ = reply.send(answer);
            }
        }
        Ok(reply) => {
            tracing::error!(
                items = n,
                answers = reply.results.len(),
                "the chat service answered a batch with the wrong number of results"
            );
            for reply in replies {
                let _ = reply.send(Err(ChatError::Unavailable(
                    "unexpected answer from the chat service".into(),
                )));
            }
        }
        Err(e) => {
            // The whole call failed: every item gets the same error.
            let (code, message) = (e.code(), e.client_message());
            for reply in replies {
                let _ = reply.send(Err(ChatError::Remote(code, message.clone())));
            }
        }
    }
}
