//! The send path: sends from many devices (one at a time from a connection,
//! or a gateway's whole batch at once) wait in one bounded queue for the
//! batch writer, which commits everything waiting in one transaction, then
//! answers each sender and fans the batch out in commit order. A send is
//! acked only after its commit. When the queue is full a send is refused at
//! once with UNAVAILABLE, so memory stays bounded and nobody stalls behind
//! an overload.

use std::sync::{Arc, Weak};

use parley_proto::ids;
use parley_proto::pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use super::{ChatService, media, now_ms};
use crate::error::ChatError;
use crate::metrics::code_label;
use crate::store::{Appended, NewMessage};

/// One device's send, as its gateway passes it on.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub user: String,
    pub device: String,
    pub send: pb::Send,
}

/// Where a send's answer goes: the ack is made where the batch commits, so
/// the committed message itself moves on to the fan-out, not a copy.
type Reply = oneshot::Sender<Result<pb::SendAck, ChatError>>;

/// Sends that entered the queue together, with their places in it. They
/// are committed in one transaction (a group is never split), and their
/// places are given back once it is answered.
pub(super) struct AppendGroup {
    jobs: Vec<(NewMessage, Reply)>,
    queued_at: Instant,
    _places: OwnedSemaphorePermit,
}

/// The queue's ends: groups in, and the places that bound it.
pub(super) fn queue() -> (
    mpsc::UnboundedSender<AppendGroup>,
    mpsc::UnboundedReceiver<AppendGroup>,
) {
    mpsc::unbounded_channel()
}

impl ChatService {
    /// Commits sends of many devices together and answers each, in order.
    /// Each is checked on its own (a bad one does not fail the others); all
    /// that pass enter the queue as one group, or none does when it has no
    /// room for them.
    pub async fn send_many(
        &self,
        requests: Vec<SendRequest>,
    ) -> Vec<Result<pb::SendAck, ChatError>> {
        let now = now_ms();
        let mut results: Vec<Option<Result<pb::SendAck, ChatError>>> =
            Vec::with_capacity(requests.len());
        let mut jobs = Vec::with_capacity(requests.len());
        let mut waiting = Vec::with_capacity(requests.len());
        let mut requests = requests;
        let mut checked: Vec<Result<(), ChatError>> =
            requests.iter().map(|r| check_send(&r.send)).collect();
        self.resolve_sends_blobs(&mut requests, &mut checked).await;
        for (i, (r, check)) in requests.into_iter().zip(checked).enumerate() {
            match check {
                Ok(()) => {
                    let (tx, rx) = oneshot::channel();
                    jobs.push((
                        NewMessage {
                            conversation_id: r.send.conversation_id,
                            sender_id: r.user,
                            sender_device: r.device,
                            client_msg_id: r.send.client_msg_id,
                            content: r.send.content.unwrap_or_default(),
                            now_ms: now,
                        },
                        tx,
                    ));
                    waiting.push((i, rx));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !jobs.is_empty() {
            let places = u32::try_from(jobs.len())
                .ok()
                .and_then(|n| self.queue.clone().try_acquire_many_owned(n).ok());
            let refused = match places {
                Some(places) => self
                    .appends
                    .send(AppendGroup {
                        jobs,
                        queued_at: Instant::now(),
                        _places: places,
                    })
                    .err()
                    .map(|_| "shutting down"),
                None => Some("the chat service is busy; retry shortly"),
            };
            for (i, rx) in waiting {
                let answer = match refused {
                    Some(why) => Err(ChatError::Unavailable(why.into())),
                    None => match rx.await {
                        Ok(answer) => answer,
                        Err(_) => Err(ChatError::Unavailable("shutting down".into())),
                    },
                };
                results[i] = Some(answer);
            }
        }
        results
            .into_iter()
            .map(|r| {
                let r = r.expect("every send is answered");
                if let Err(e) = &r {
                    self.metrics
                        .errors
                        .get_or_create(&code_label(e.code()))
                        .inc();
                }
                r
            })
            .collect()
    }

    /// Fills in the media of the sends (those that passed their checks so
    /// far) that reference uploads, and fails those whose upload is not
    /// theirs or not complete: one store call for the batch, none when no
    /// send references an upload.
    async fn resolve_sends_blobs(
        &self,
        requests: &mut [SendRequest],
        checked: &mut [Result<(), ChatError>],
    ) {
        let mut sends = Vec::new();
        let mut index = Vec::new();
        for (i, (r, check)) in requests.iter_mut().zip(checked.iter()).enumerate() {
            if let (Ok(()), Some(content)) = (check, r.send.content.as_mut())
                && media::blob_of(content).is_some()
            {
                sends.push((r.user.clone(), content));
                index.push(i);
            }
        }
        if sends.is_empty() {
            return;
        }
        match self.resolve_blobs(&mut sends).await {
            Ok(errors) => {
                for (i, e) in index.into_iter().zip(errors) {
                    if let Some(e) = e {
                        checked[i] = Err(e);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "uploads of a batch not read; its media sends retry");
                for i in index {
                    checked[i] = Err(ChatError::Unavailable("storage failed; retry".into()));
                }
            }
        }
    }

    /// One device's send.
    pub(super) async fn send(
        &self,
        user: &str,
        device: &str,
        send: pb::Send,
    ) -> Result<pb::SendAck, ChatError> {
        let request = SendRequest {
            user: user.to_owned(),
            device: device.to_owned(),
            send,
        };
        self.send_many(vec![request])
            .await
            .pop()
            .expect("one answer per send")
    }
}

fn ack_of(appended: &Appended) -> pb::SendAck {
    let m = &appended.message;
    pb::SendAck {
        client_msg_id: m.client_msg_id.clone(),
        msg_id: m.msg_id,
        conversation_id: m.conversation_id,
        seq: m.seq,
        server_time_ms: m.server_time_ms,
        duplicate: appended.duplicate,
    }
}

fn check_send(send: &pb::Send) -> Result<(), ChatError> {
    ids::check_client_msg_id(&send.client_msg_id).map_err(ChatError::InvalidArgument)?;
    check_content(send.content.as_ref())
}

fn check_content(content: Option<&pb::Content>) -> Result<(), ChatError> {
    use pb::content::Body;
    match content.and_then(|c| c.body.as_ref()) {
        None => Err(ChatError::invalid("a message needs content")),
        Some(Body::Text(t)) if t.is_empty() => Err(ChatError::invalid("text must not be empty")),
        Some(Body::Media(m)) if m.url.is_empty() == m.blob_id.is_empty() => Err(
            ChatError::invalid("media needs either a blob_id (an upload) or a url, not both"),
        ),
        Some(Body::Media(m)) if !m.blob_id.is_empty() && !crate::media::is_blob_id(&m.blob_id) => {
            Err(ChatError::invalid(format!(
                "{:?} is not a blob id",
                m.blob_id
            )))
        }
        Some(Body::Custom(c)) if c.r#type.is_empty() => {
            Err(ChatError::invalid("custom content needs a type"))
        }
        Some(Body::System(_)) => Err(ChatError::invalid(
            "system events are written by the server only",
        )),
        Some(_) => Ok(()),
    }
}

/// Commits what waits in the queue, a transaction at a time: every group
/// waiting when the last commit ended, up to `max_batch` sends (a larger
/// group goes alone), then answers each sender and fans the batch out in
/// commit order.
///
/// With a `batch_linger`, a batch short of `max_batch` also takes what
/// arrives until its first send has waited that long, but only while sends
/// arrive often enough for the wait to gather one (at least one per linger,
/// measured over the last batch): a transaction's fixed cost is then
/// shared by more sends at moderate rates, and a send to an idle service
/// still commits at once.
pub(super) async fn batch_writer(
    weak: Weak<ChatService>,
    mut rx: mpsc::UnboundedReceiver<AppendGroup>,
) {
    let Some((max, linger)) = weak
        .upgrade()
        .map(|s| (s.config.max_batch, s.config.batch_linger))
    else {
        return;
    };
    let mut groups: Vec<AppendGroup> = Vec::new();
    let mut next: Option<AppendGroup> = None;
    // Sends per second over the last batch: its size over the time since
    // the batch before it closed.
    let mut rate = 0.0_f64;
    let mut last_closed = Instant::now();
    loop {
        let first = match next.take() {
            Some(g) => g,
            None => match rx.recv().await {
                Some(g) => g,
                None => return,
            },
        };
        let mut size = first.jobs.len();
        let until = (rate * linger.as_secs_f64() >= 1.0).then(|| first.queued_at + linger);
        groups.push(first);
        while size < max {
            let g = match (rx.try_recv(), until) {
                (Ok(g), _) => g,
                (Err(_), Some(until)) => match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(g)) => g,
                    Ok(None) | Err(_) => break,
                },
                (Err(_), None) => break,
            };
            if size + g.jobs.len() > max {
                next = Some(g);
                break;
            }
            size += g.jobs.len();
            groups.push(g);
        }
        let closed = Instant::now();
        rate = size as f64 / closed.duration_since(last_closed).as_secs_f64().max(1e-6);
        last_closed = closed;
        let Some(svc) = weak.upgrade() else { return };
        svc.commit(&mut groups, size).await;
        // The groups' places go back to the queue only now.
        groups.clear();
    }
}

impl ChatService {
    /// Appends the sends of `groups` in one transaction, answers them, and
    /// fans out what committed.
    async fn commit(self: &Arc<Self>, groups: &mut [AppendGroup], size: usize) {
        let mut batch = Vec::with_capacity(size);
        let mut replies = Vec::with_capacity(size);
        for g in groups.iter_mut() {
            for (m, reply) in g.jobs.drain(..) {
                batch.push(m);
                replies.push(reply);
            }
        }
        let started = std::time::Instant::now();
        self.metrics.batch_size.observe(batch.len() as f64);
        let appended = self.store.append(batch).await;
        self.metrics
            .append_seconds
            .observe(started.elapsed().as_secs_f64());
        match appended {
            Ok(results) => {
                // Duplicates are fanned out again: the replica that committed
                // the original may have died before it published. Gateways and
                // the SDK drop what a device already has.
                let mut committed: Vec<Appended> = Vec::with_capacity(results.len());
                for (result, reply) in results.into_iter().zip(replies) {
                    let a = match result {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    let counter = if a.duplicate {
                        &self.metrics.duplicates
                    } else {
                        &self.metrics.messages
                    };
                    counter.inc();
                    let _ = reply.send(Ok(ack_of(&a)));
                    if !a.duplicate
                        || !committed
                            .iter()
                            .any(|c| c.message.msg_id == a.message.msg_id)
                    {
                        committed.push(a);
                    }
                }
                self.fan_out(committed).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "append batch failed; senders will retry");
                for reply in replies {
                    let _ = reply.send(Err(ChatError::Unavailable("storage failed; retry".into())));
                }
            }
        }
    }
}
