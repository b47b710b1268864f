//! The SQLite store's hot path, sends, on a thread of its own.
//!
//! Through sqlx every statement is a round trip to sqlx's worker thread:
//! a 1:1 message takes ten statements, so twenty thread wake-ups, and on a
//! small machine those wake-ups cost more than SQLite's own work (see
//! docs/benchmarks.md). Here a whole batch of sends is one hand-over: the
//! thread runs the batch's transaction with cached prepared statements and
//! answers once. The rules are the same as the sqlx path's: deduplication
//! by (sender, client_msg_id), membership, blocks for direct conversations,
//! the conversation's next seq and every member's next inbox number.

use std::path::Path;
use std::sync::{Arc, Weak, mpsc};
use std::time::Duration;

use parley_proto::pb;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{Appended, NewMessage};
use crate::error::ChatError;

type Outcome = Result<Vec<Result<Appended, ChatError>>, ChatError>;
type Job = (Vec<NewMessage>, oneshot::Sender<Outcome>);

/// A handle to the append thread; the thread ends when every handle is gone.
#[derive(Clone)]
pub(super) struct Appender {
    jobs: mpsc::Sender<Job>,
    /// The checkpointer runs while any handle holds this.
    _alive: Arc<()>,
}

fn storage(e: rusqlite::Error) -> ChatError {
    ChatError::Unavailable(format!("storage: {e}"))
}

impl Appender {
    /// Opens its own connection to the database at `path` (already
    /// migrated) and starts the thread.
    pub(super) fn start(path: &Path) -> Result<Self, ChatError> {
        let conn = Connection::open(path).map_err(storage)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(storage)?;
        // As the sqlx connections: WAL, and FULL so an acked message
        // survives a power loss (one fsync per batch). No checkpoints on
        // commit: copying the WAL back into the database is the
        // checkpointer's job, off the senders' path.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA foreign_keys = ON; PRAGMA cache_size = -16000; \
             PRAGMA wal_autocheckpoint = 0;",
        )
        .map_err(storage)?;
        conn.set_prepared_statement_cache_capacity(32);
        let checkpointer = Connection::open(path).map_err(storage)?;
        checkpointer
            .busy_timeout(Duration::from_secs(10))
            .map_err(storage)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sqlite-append".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok((batch, reply)) = rx.recv() {
                    let _ = reply.send(append_batch(&mut conn, &batch));
                }
            })
            .map_err(|e| ChatError::Unavailable(format!("cannot start the append thread: {e}")))?;
        let alive = Arc::new(());
        let store = Arc::downgrade(&alive);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoints(checkpointer, store))
            .map_err(|e| ChatError::Unavailable(format!("cannot start the checkpointer: {e}")))?;
        Ok(Self {
            jobs,
            _alive: alive,
        })
    }

    pub(super) async fn append(&self, batch: Vec<NewMessage>) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((batch, tx))
            .map_err(|_| ChatError::Unavailable("the append thread stopped".into()))?;
        rx.await
            .map_err(|_| ChatError::Unavailable("the append thread stopped".into()))?
    }
}

/// Copies the WAL back into the database every 200 ms without blocking
/// writers (PASSIVE), for as long as the store lives. SQLite starts the
/// WAL over once a checkpoint has copied all of it and no reader needs it.
fn checkpoints(conn: Connection, store: Weak<()>) {
    while store.upgrade().is_some() {
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

fn append_batch(conn: &mut Connection, batch: &[NewMessage]) -> Outcome {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(storage)?;
    let mut results = Vec::with_capacity(batch.len());
    for m in batch {
        results.push(append_one(&tx, m).map_err(storage)?);
    }
    tx.commit().map_err(storage)?;
    Ok(results)
}

fn append_one(
    tx: &rusqlite::Transaction<'_>,
    m: &NewMessage,
) -> rusqlite::Result<Result<Appended, ChatError>> {
    let existing = tx
        .prepare_cached(
            "SELECT id, conversation_id, seq, sender_device, content, created_at \
             FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2",
        )?
        .query_row(params![m.sender_id, m.client_msg_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .optional()?;
    if let Some((id, conversation_id, seq, sender_device, content, created_at)) = existing {
        let content = match pb::Content::decode(content.as_slice()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(ChatError::Corrupt(format!("message content: {e}")))),
        };
        let recipients = tx
            .prepare_cached(
                "SELECT user_id, seq FROM inbox WHERE message_id = ?1 ORDER BY user_id",
            )?
            .query_map([id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let message = pb::Message {
            msg_id: id as u64,
            conversation_id: conversation_id as u64,
            seq: seq as u64,
            sender_id: m.sender_id.clone(),
            sender_device,
            client_msg_id: m.client_msg_id.clone(),
            server_time_ms: created_at,
            content: Some(content),
        };
        return Ok(Ok(Appended {
            message,
            recipients,
            duplicate: true,
        }));
    }

    let conv = tx
        .prepare_cached("SELECT kind, last_seq FROM conversations WHERE id = ?1")?
        .query_row([m.conversation_id as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((kind, last_seq)) = conv else {
        return Ok(Err(ChatError::NotMember(m.conversation_id)));
    };
    let members: Vec<String> = tx
        .prepare_cached("SELECT user_id FROM members WHERE conversation_id = ?1 ORDER BY user_id")?
        .query_map([m.conversation_id as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if !members.contains(&m.sender_id) {
        return Ok(Err(ChatError::NotMember(m.conversation_id)));
    }
    if kind == pb::ConversationKind::Direct as i64 {
        let mut blocked =
            tx.prepare_cached("SELECT 1 FROM blocks WHERE user_id = ?1 AND blocked_id = ?2")?;
        for peer in members.iter().filter(|u| **u != m.sender_id) {
            if blocked.exists(params![peer, m.sender_id])? {
                return Ok(Err(ChatError::Blocked(peer.clone())));
            }
        }
    }

    // No RETURNING below: a statement with RETURNING keeps a statement
    // journal (a 64 KiB buffer and a copy of every page it changes), which
    // dhat showed as most of the bytes allocated per message. A plain write
    // followed by a read in the same transaction does not.
    let seq = last_seq + 1;
    tx.prepare_cached("UPDATE conversations SET last_seq = ?1 WHERE id = ?2")?
        .execute(params![seq, m.conversation_id as i64])?;
    let content = m.content.encode_to_vec();
    tx.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, sender_id, sender_device, client_msg_id, content, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        m.conversation_id as i64,
        seq,
        m.sender_id,
        m.sender_device,
        m.client_msg_id,
        content,
        m.now_ms
    ])?;
    let msg_id = tx.last_insert_rowid();
    let mut bump =
        tx.prepare_cached("UPDATE users SET inbox_head = inbox_head + 1 WHERE id = ?1")?;
    let mut head = tx.prepare_cached("SELECT inbox_head FROM users WHERE id = ?1")?;
    let mut entry =
        tx.prepare_cached("INSERT INTO inbox (user_id, seq, message_id) VALUES (?1, ?2, ?3)")?;
    let mut recipients = Vec::with_capacity(members.len());
    for user in members {
        bump.execute([&user])?;
        let inbox_seq: i64 = head.query_row([&user], |r| r.get(0))?;
        entry.execute(params![user, inbox_seq, msg_id])?;
        recipients.push((user, inbox_seq as u64));
    }
    Ok(Ok(Appended {
        message: pb::Message {
            msg_id: msg_id as u64,
            conversation_id: m.conversation_id,
            seq: seq as u64,
            sender_id: m.sender_id.clone(),
            sender_device: m.sender_device.clone(),
            client_msg_id: m.client_msg_id.clone(),
            server_time_ms: m.now_ms,
            content: Some(m.content.clone()),
        },
        recipients,
        duplicate: false,
    }))
}
