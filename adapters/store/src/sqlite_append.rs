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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use parley_proto::pb;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use parley_core::ChatError;
use parley_core::store::{Appended, NewMessage};

type Outcome = Result<Vec<Result<Appended, ChatError>>, ChatError>;
type Job = (Vec<NewMessage>, oneshot::Sender<Outcome>);

/// A handle to the append thread; the thread ends when every handle is gone.
#[derive(Clone)]
pub(super) struct Appender {
    jobs: mpsc::Sender<Job>,
    /// The checkpointer runs while any handle holds this.
    _alive: Arc<()>,
}

/// WAL pages (4 KiB each) after which the checkpointer makes the WAL start
/// over: the WAL file stays near 64 MiB under any load.
const WAL_RESTART: i64 = 16 * 1024;

fn storage(e: rusqlite::Error) -> ChatError {
    ChatError::Unavailable(format!("storage: {e}"))
}

impl Appender {
    /// Opens its own connection to the database at `path` (already
    /// migrated) and starts the thread.
    pub(super) fn start(path: &Path) -> Result<Self, ChatError> {
        let conn = open_writer(path, WAL_RESTART).map_err(storage)?;
        let checkpointer = Connection::open(path).map_err(storage)?;
        checkpointer
            .busy_timeout(Duration::from_secs(10))
            .map_err(storage)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let writing = Arc::new(Turns::default());
        let held = writing.clone();
        std::thread::Builder::new()
            .name("sqlite-append".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok((batch, reply)) = rx.recv() {
                    let appended = {
                        let _turn = held.writer();
                        append_batch(&mut conn, batch)
                    };
                    let _ = reply.send(appended);
                }
            })
            .map_err(|e| ChatError::Unavailable(format!("cannot start the append thread: {e}")))?;
        let alive = Arc::new(());
        let store = Arc::downgrade(&alive);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while store.upgrade().is_some() {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Err(e) = checkpoint(&checkpointer, &writing, WAL_RESTART) {
                        tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                    }
                }
            })
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

/// The append thread's connection. As the sqlx connections: WAL, and FULL
/// so an acked message survives a power loss (one fsync per batch). No
/// checkpoints on commit: copying the WAL back into the database is the
/// checkpointer's job, off the senders' path. The size limit trims a WAL
/// that a long reader let grow past twice `restart_at` pages.
fn open_writer(path: &Path, restart_at: i64) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA foreign_keys = ON; PRAGMA cache_size = -16000; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {};",
        restart_at.saturating_mul(2 * 4096)
    ))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// One pass of the checkpointer (every 200 ms): copies the WAL back into
/// the database without blocking writers (PASSIVE).
///
/// SQLite starts the WAL over only when a writer begins after a checkpoint
/// has copied all of it. While sends keep coming that never happens: the
/// append thread has always committed more by the time a checkpoint ends,
/// and the WAL grew without bound (by 80 MB a second at 6,000 messages a
/// second). So once the WAL holds `restart_at` pages, the pass holds the
/// append thread between two batches (`writing`) and copies the little
/// written since its first step; the next batch starts the WAL over. The
/// pause is that catch-up, every 64 MiB of WAL.
fn checkpoint(conn: &Connection, writing: &Turns, restart_at: i64) -> rusqlite::Result<()> {
    let pass = || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
    if pass()? >= restart_at {
        let _pause = writing.checkpoint();
        pass()?;
    }
    Ok(())
}

/// Turns between the append thread's batches and a checkpoint's pause. A
/// plain mutex is not fair: under a steady stream of sends the append
/// thread took it back between two batches before the waiting
/// checkpointer woke, and the WAL grew on. A checkpoint that wants its turn
/// says so first, and the append thread lets it go ahead.
#[derive(Debug, Default)]
struct Turns {
    lock: Mutex<()>,
    checkpoint_waiting: AtomicBool,
}

impl Turns {
    fn writer(&self) -> MutexGuard<'_, ()> {
        while self.checkpoint_waiting.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint(&self) -> MutexGuard<'_, ()> {
        self.checkpoint_waiting.store(true, Ordering::Release);
        let turn = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.checkpoint_waiting.store(false, Ordering::Release);
        turn
    }
}

fn append_batch(conn: &mut Connection, batch: Vec<NewMessage>) -> Outcome {
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
    m: NewMessage,
) -> rusqlite::Result<Result<Appended, ChatError>> {
    let existing = tx
        .prepare_cached(
            "SELECT id, conversation_id, seq, sender_device, content, created_at, edited_at, \
             recalled FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2",
        )?
        .query_row(params![m.sender_id, m.client_msg_id], |r| {
            Ok((
                (
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ),
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, bool>(7)?,
            ))
        })
        .optional()?;
    if let Some((ids, content, created_at, edited_at_ms, recalled)) = existing {
        let (id, conversation_id, seq, sender_device) = ids;
        let content = match pb::Content::decode(content.as_slice()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(ChatError::Corrupt(format!("message content: {e}")))),
        };
        let recipients = tx
            .prepare_cached(
                // Each member's first entry: a revision gave them more.
                "SELECT user_id, MIN(seq) FROM inbox WHERE message_id = ?1 \
                 GROUP BY user_id ORDER BY user_id",
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
            content: (!recalled).then_some(content),
            edited_at_ms,
            recalled,
        };
        return Ok(m.resend_of(Appended {
            message,
            recipients,
            duplicate: true,
        }));
    }

    let conv = tx
        .prepare_cached(crate::sqlite::CONVERSATION_KIND_AND_SEQ)?
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
    tx.prepare_cached(crate::sqlite::READ_UP_TO)?
        .execute(params![seq, m.conversation_id as i64, m.sender_id])?;
    let mut head = tx.prepare_cached(crate::sqlite::INBOX_HEAD)?;
    let mut entry =
        tx.prepare_cached("INSERT INTO inbox (user_id, seq, message_id) VALUES (?1, ?2, ?3)")?;
    let mut recipients = Vec::with_capacity(members.len());
    for user in members {
        let inbox_seq: i64 = head.query_row([&user], |r| r.get::<_, i64>(0))? + 1;
        entry.execute(params![user, inbox_seq, msg_id])?;
        recipients.push((user, inbox_seq as u64));
    }
    Ok(Ok(Appended {
        message: m.into_stored(msg_id as u64, seq as u64),
        recipients,
        duplicate: false,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::SqliteStore;
    use parley_core::Store;

    /// Under sends that never pause, the WAL still starts over once it
    /// passes the limit, so the file stays near it instead of holding
    /// everything ever written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_a_steady_stream_of_sends() {
        const LIMIT: i64 = 256; // pages: 1 MiB
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).await.unwrap();
        for u in ["alice", "bob"] {
            store.create_user(u, "", 0).await.unwrap();
        }
        let conv = store.open_direct("alice", "bob", 0).await.unwrap().id;
        drop(store);

        let writing = Arc::new(Turns::default());
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = {
            let (writing, stop, path) = (writing.clone(), stop.clone(), path.clone());
            std::thread::spawn(move || {
                let conn = Connection::open(&path).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    checkpoint(&conn, &writing, LIMIT).unwrap();
                }
            })
        };
        let mut conn = open_writer(&path, LIMIT).unwrap();
        let body = "x".repeat(2000);
        let mut written = 0;
        // 20 MB of message rows alone, twenty times the limit.
        for k in 0..400 {
            let batch: Vec<NewMessage> = (0..25)
                .map(|i| NewMessage {
                    conversation_id: conv,
                    sender_id: "alice".into(),
                    sender_device: "d1".into(),
                    client_msg_id: format!("m{k}-{i}"),
                    content: parley_proto::pb::Content::text(&body),
                    now_ms: 0,
                })
                .collect();
            let _turn = writing.writer();
            for r in append_batch(&mut conn, batch).unwrap() {
                assert!(!r.unwrap().duplicate);
                written += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        checkpointer.join().unwrap();
        assert_eq!(written, 10_000);
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal < 8 << 20,
            "the WAL grew to {wal} bytes with a limit of {} bytes",
            LIMIT * 4096
        );
    }
}
