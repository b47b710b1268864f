//! The gateway's hot path to the chat service: every connection's sends and
//! acks go into one queue, and a task takes whatever waits there as one
//! `Batch` call, up to `batch_max` items, with at most `batches_in_flight`
//! calls out at once. Nothing waits on a timer: with the chat service idle
//! a send leaves at once, alone; under load the calls in flight make the
//! next one wait, and everything that arrives meanwhile goes with it. So a
//! batch costs one round trip and (on the chat service) one transaction,
//! however many devices it carries. One call in flight (the default) makes
//! each call carry everything that arrived during the last one; the chat
//! service's short linger (`PARLEY_BATCH_LINGER_US`) sets the pace.
//!
//! A call that fails in transport is sent again whole to another replica,
//! which is safe: sends are deduplicated by client id, acks only move
//! cursors forward. The queue is bounded: when it is full, a send is
//! refused at once with UNAVAILABLE rather than held.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parley_core::ChatError;
use parley_proto::internal as ipb;
use parley_proto::pb::ErrorCode;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

use super::{Caller, RemoteConfig};

pub(super) use ipb::batch_item::Body as Item;
pub(super) use ipb::batch_result::Body as Answer;

/// One device's item and where its answer goes.
struct Queued {
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
            config.batch_max.max(1),
            config.batches_in_flight.max(1),
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
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
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
        match answer.await {
            Ok(Ok(Answer::Error(e))) => Err(refused(e)),
            Ok(answer) => answer,
            Err(_) => Err(ChatError::Unavailable("the gateway is stopping".into())),
        }
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

/// Takes what waits, a call at a time, while a call may go out.
async fn run(
    caller: Arc<Caller>,
    mut rx: mpsc::Receiver<Queued>,
    counts: Arc<Counts>,
    batch_max: usize,
    in_flight: usize,
) {
    let calls = Arc::new(Semaphore::new(in_flight));
    let mut waiting = Vec::with_capacity(batch_max);
    loop {
        let Ok(call) = calls.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut waiting, batch_max).await == 0 {
            return;
        }
        let batch = std::mem::replace(&mut waiting, Vec::with_capacity(batch_max));
        counts.calls.fetch_add(1, Ordering::Relaxed);
        counts
            .items
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let caller = caller.clone();
        tokio::spawn(async move {
            send(&caller, batch).await;
            drop(call);
        });
    }
}

/// One `Batch` call, its answers handed to the devices waiting for them.
async fn send(caller: &Caller, batch: Vec<Queued>) {
    let n = batch.len();
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.item, q.reply)).unzip();
    let req = ipb::BatchRequest { items };
    let answered = caller
        .invoke(true, |mut c| {
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
