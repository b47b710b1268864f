//! The embedded default: one SQLite file in WAL mode. Sends are written by a
//! thread of their own, a batch per transaction (sqlite_append.rs). Other
//! writes go through a pool of one connection with `BEGIN IMMEDIATE`; the
//! two writers queue on SQLite's lock (busy timeout) instead of failing with
//! SQLITE_BUSY. Reads use a pool of their own.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use parley_proto::pb;
use prost::Message as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::sqlite_append::Appender;
use parley_core::blob_columns;
use parley_core::media::{BlobRecord, BlobRow};
use parley_core::membership::{
    changed_members, membership_event, no_such_users, require_group, system_message,
};
use parley_core::push::{AudienceQuery, DeadToken, PushAudience, PushTokenRecord};
use parley_core::revision::{Change, EditRecord, Revision, no_message};
use parley_core::store::{
    Appended, ConversationRecord, DeviceCursor, DeviceRecord, HistorySlice, InboxPage,
    MemberSettings, MembershipChange, NewMessage, ReadMark, RefreshRecord, Store, UserRecord,
    direct_key, history_bound, history_page,
};
use parley_core::{ChatError, Revocation};

use crate::Db;

/// The columns `message_from_row` reads, in order (a macro so queries stay
/// `&'static str`, which sqlx requires of SQL).
macro_rules! message_columns {
    () => {
        "m.id, m.conversation_id, m.seq, m.sender_id, m.sender_device, m.client_msg_id, m.content, m.created_at, m.edited_at, m.recalled"
    };
}

// A conversation's last seq and a user's inbox head are not counters
// rewritten by every message: they are read off the newest entry of the
// messages' (conversation_id, seq) index and of the inbox's (user_id, seq)
// key, pages a message writes anyway. Counters cost three more B-tree
// pages per 1:1 message (both users' rows and the conversation's), each a
// random page of its own in a large store (docs/benchmarks.md). The columns
// `conversations.last_seq` and `users.inbox_head` remain as floors: pruning
// raises them before it deletes the rows that carried the newest numbers,
// so no number is ever given twice. Each macro takes the SQL that names
// the conversation or the user (`?1`, or the outer row's id).
macro_rules! last_seq {
    ($conversation:literal) => {
        concat!(
            "MAX(last_seq, IFNULL((SELECT MAX(seq) FROM messages WHERE conversation_id = ",
            $conversation,
            "), 0))"
        )
    };
}

macro_rules! inbox_head {
    ($user:literal) => {
        concat!(
            "MAX(inbox_head, IFNULL((SELECT MAX(seq) FROM inbox WHERE user_id = ",
            $user,
            "), 0))"
        )
    };
}

/// A conversation's kind and last seq, by id (`?1`).
pub(super) const CONVERSATION_KIND_AND_SEQ: &str = concat!(
    "SELECT kind, ",
    last_seq!("?1"),
    " FROM conversations WHERE id = ?1"
);

/// A user's inbox head, by id (`?1`); no row for an unknown user.
pub(super) const INBOX_HEAD: &str =
    concat!("SELECT ", inbox_head!("?1"), " FROM users WHERE id = ?1");

/// Parley's store on a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Sends, a batch per hand-over (see sqlite_append.rs).
    appender: Appender,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, ChatError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged message survives a power loss too, at one
            // fsync per committed batch.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-16000")
            .pragma("temp_store", "memory");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await
            .db()?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .db()?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .db()?;
        let appender = Appender::start(path)?;
        Ok(Self {
            writer,
            reader,
            appender,
        })
    }

    /// Sets a member's mute or pin (None: as it is): the settings after.
    async fn set_member(
        &self,
        conversation_id: u64,
        user: &str,
        muted_until_ms: Option<i64>,
        pinned: Option<bool>,
    ) -> Result<MemberSettings, ChatError> {
        let row = sqlx::query_as(
            "UPDATE members SET muted_until = COALESCE(?, muted_until), \
             pinned = COALESCE(?, pinned) WHERE conversation_id = ? AND user_id = ? \
             RETURNING muted_until, pinned",
        )
        .bind(muted_until_ms)
        .bind(pinned)
        .bind(conversation_id as i64)
        .bind(user)
        .fetch_optional(&self.writer)
        .await
        .db()?;
        MemberSettings::from_row(row, conversation_id)
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, ChatError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.db()
    }
}

fn message_from_row(row: &SqliteRow, offset: usize) -> Result<pb::Message, ChatError> {
    let content: Vec<u8> = row.try_get(offset + 6).db()?;
    let content = pb::Content::decode(content.as_slice())
        .map_err(|e| ChatError::Corrupt(format!("message content: {e}")))?;
    let recalled: bool = row.try_get(offset + 9).db()?;
    Ok(pb::Message {
        msg_id: row.try_get::<i64, _>(offset).db()? as u64,
        conversation_id: row.try_get::<i64, _>(offset + 1).db()? as u64,
        seq: row.try_get::<i64, _>(offset + 2).db()? as u64,
        sender_id: row.try_get(offset + 3).db()?,
        sender_device: row.try_get(offset + 4).db()?,
        client_msg_id: row.try_get(offset + 5).db()?,
        server_time_ms: row.try_get(offset + 7).db()?,
        edited_at_ms: row.try_get(offset + 8).db()?,
        recalled,
        content: (!recalled).then_some(content),
    })
}

fn kind_from_i64(kind: i64) -> pb::ConversationKind {
    match kind {
        1 => pb::ConversationKind::Direct,
        2 => pb::ConversationKind::Group,
        _ => pb::ConversationKind::Unspecified,
    }
}

async fn load_conversation(
    conn: &mut SqliteConnection,
    id: u64,
) -> Result<Option<ConversationRecord>, ChatError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT kind, name, owner, ",
        last_seq!("?1"),
        " FROM conversations WHERE id = ?1"
    ))
    .bind(id as i64)
    .fetch_optional(&mut *conn)
    .await
    .db()?
    else {
        return Ok(None);
    };
    let members: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM members WHERE conversation_id = ? ORDER BY user_id",
    )
    .bind(id as i64)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    Ok(Some(ConversationRecord {
        id,
        kind: kind_from_i64(row.try_get(0).db()?),
        name: row.try_get(1).db()?,
        owner: row.try_get(2).db()?,
        members,
        last_seq: row.try_get::<i64, _>(3).db()? as u64,
        ..ConversationRecord::default()
    }))
}

async fn missing_users_in(
    conn: &mut SqliteConnection,
    ids: &[String],
) -> Result<Vec<String>, ChatError> {
    let mut missing = Vec::new();
    for id in ids {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
        if found.is_none() {
            missing.push(id.clone());
        }
    }
    Ok(missing)
}

/// Gives `message_id` the next inbox sequence number of `user`.
async fn add_inbox_entry(
    conn: &mut SqliteConnection,
    user: &str,
    message_id: i64,
) -> Result<u64, ChatError> {
    let head: i64 = sqlx::query_scalar(INBOX_HEAD)
        .bind(user)
        .fetch_one(&mut *conn)
        .await
        .db()?;
    let inbox_seq = head + 1;
    sqlx::query("INSERT INTO inbox (user_id, seq, message_id) VALUES (?, ?, ?)")
        .bind(user)
        .bind(inbox_seq)
        .bind(message_id)
        .execute(&mut *conn)
        .await
        .db()?;
    Ok(inbox_seq as u64)
}

/// Makes `user` a member who has read up to `read_seq`.
async fn insert_member(
    conn: &mut SqliteConnection,
    conversation_id: i64,
    user: &str,
    read_seq: u64,
    now_ms: i64,
) -> Result<(), ChatError> {
    sqlx::query(
        "INSERT INTO members (conversation_id, user_id, joined_at, read_seq) VALUES (?, ?, ?, ?)",
    )
    .bind(conversation_id)
    .bind(user)
    .bind(now_ms)
    .bind(read_seq as i64)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(())
}

/// Moves a member's read marker up to `seq` (`?1`) of conversation `?2`
/// for user `?3`, never back: a member's own message moves it.
pub(super) const READ_UP_TO: &str = "UPDATE members SET read_seq = ?1 WHERE conversation_id = ?2 AND user_id = ?3 AND read_seq < ?1";

/// Writes a message at `seq` and one inbox entry per member.
async fn insert_message(
    conn: &mut SqliteConnection,
    m: &NewMessage,
    seq: i64,
    members: Vec<String>,
) -> Result<Appended, ChatError> {
    let content = m.content.encode_to_vec();
    let msg_id: i64 = sqlx::query_scalar(
        "INSERT INTO messages (conversation_id, seq, sender_id, sender_device, client_msg_id, content, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(m.conversation_id as i64)
    .bind(seq)
    .bind(&m.sender_id)
    .bind(&m.sender_device)
    .bind(&m.client_msg_id)
    .bind(&content)
    .bind(m.now_ms)
    .fetch_one(&mut *conn)
    .await.db()?;
    sqlx::query(READ_UP_TO)
        .bind(seq)
        .bind(m.conversation_id as i64)
        .bind(&m.sender_id)
        .execute(&mut *conn)
        .await
        .db()?;
    let mut recipients = Vec::with_capacity(members.len());
    for user in members {
        let inbox_seq = add_inbox_entry(conn, &user, msg_id).await?;
        recipients.push((user, inbox_seq));
    }
    let message = m.stored(msg_id as u64, seq as u64);
    Ok(Appended {
        message,
        recipients,
        duplicate: false,
    })
}

/// Appends a server-written event to a conversation.
async fn append_system(
    conn: &mut SqliteConnection,
    conversation_id: u64,
    actor: &str,
    event: pb::SystemEvent,
    now_ms: i64,
) -> Result<Appended, ChatError> {
    let (_kind, last_seq): (i64, i64) = sqlx::query_as(CONVERSATION_KIND_AND_SEQ)
        .bind(conversation_id as i64)
        .fetch_one(&mut *conn)
        .await
        .db()?;
    let members: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM members WHERE conversation_id = ? ORDER BY user_id",
    )
    .bind(conversation_id as i64)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    let seq = last_seq + 1;
    let m = system_message(conversation_id, seq as u64, actor, event, now_ms);
    insert_message(conn, &m, seq, members).await
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(
        &self,
        id: &str,
        display_name: &str,
        now_ms: i64,
    ) -> Result<UserRecord, ChatError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("INSERT INTO users (id, display_name, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
            .bind(id)
            .bind(display_name)
            .bind(now_ms)
            .execute(&mut *tx)
            .await.db()?;
        if done.rows_affected() == 0 {
            return Err(ChatError::Conflict(format!("user {id} already exists")));
        }
        tx.commit().await.db()?;
        Ok(UserRecord {
            id: id.to_owned(),
            display_name: display_name.to_owned(),
            created_at_ms: now_ms,
        })
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>, ChatError> {
        let row = sqlx::query("SELECT display_name, created_at FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .db()?;
        row.map(|r| {
            Ok(UserRecord {
                id: id.to_owned(),
                display_name: r.try_get(0).db()?,
                created_at_ms: r.try_get(1).db()?,
            })
        })
        .transpose()
    }

    async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        missing_users_in(&mut conn, ids).await
    }

    async fn open_direct(
        &self,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<ConversationRecord, ChatError> {
        let key = direct_key(a, b);
        let mut tx = self.begin().await?;
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT id FROM conversations WHERE direct_key = ?")
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let id = match existing {
            Some(id) => id,
            None => {
                let missing = missing_users_in(&mut tx, &[a.to_owned(), b.to_owned()]).await?;
                if !missing.is_empty() {
                    return Err(no_such_users(&missing));
                }
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO conversations (kind, direct_key, created_at) VALUES (1, ?, ?) RETURNING id",
                )
                .bind(&key)
                .bind(now_ms)
                .fetch_one(&mut *tx)
                .await.db()?;
                let mut users = vec![a, b];
                users.dedup();
                for u in users {
                    insert_member(&mut tx, id, u, 0, now_ms).await?;
                }
                id
            }
        };
        let conv = load_conversation(&mut tx, id as u64)
            .await?
            .expect("conversation just read or written");
        tx.commit().await.db()?;
        Ok(conv)
    }

    async fn create_group(
        &self,
        owner: &str,
        name: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<(ConversationRecord, Appended), ChatError> {
        let mut tx = self.begin().await?;
        let missing = missing_users_in(&mut tx, members).await?;
        if !missing.is_empty() {
            return Err(no_such_users(&missing));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO conversations (kind, name, owner, created_at) VALUES (2, ?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(owner)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await.db()?;
        for u in members {
            insert_member(&mut tx, id, u, 0, now_ms).await?;
        }
        let event = pb::SystemEvent {
            kind: pb::SystemEventKind::GroupCreated as i32,
            actor: owner.to_owned(),
            users: members.to_vec(),
        };
        let appended = append_system(&mut tx, id as u64, owner, event, now_ms).await?;
        let conv = load_conversation(&mut tx, id as u64)
            .await?
            .expect("group just written");
        tx.commit().await.db()?;
        Ok((conv, appended))
    }

    async fn get_conversation(&self, id: u64) -> Result<Option<ConversationRecord>, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        load_conversation(&mut conn, id).await
    }

    async fn change_members(
        &self,
        conversation_id: u64,
        actor: &str,
        change: MembershipChange,
        users: &[String],
        max_members: usize,
        now_ms: i64,
    ) -> Result<(ConversationRecord, Option<Appended>), ChatError> {
        let mut tx = self.begin().await?;
        let before = require_group(
            load_conversation(&mut tx, conversation_id).await?,
            conversation_id,
        )?;
        if change == MembershipChange::Add {
            let missing = missing_users_in(&mut tx, users).await?;
            if !missing.is_empty() {
                return Err(no_such_users(&missing));
            }
        }
        let changed = changed_members(&before, change, users, max_members)?;
        if changed.is_empty() {
            return Ok((before, None));
        }
        for u in &changed {
            if change == MembershipChange::Add {
                // What came before the member joined is not theirs to read.
                insert_member(&mut tx, conversation_id as i64, u, before.last_seq, now_ms).await?;
            } else {
                sqlx::query("DELETE FROM members WHERE conversation_id = ? AND user_id = ?")
                    .bind(conversation_id as i64)
                    .bind(u)
                    .execute(&mut *tx)
                    .await
                    .db()?;
            }
        }
        let event = membership_event(change, actor, &changed);
        let mut appended = append_system(&mut tx, conversation_id, actor, event, now_ms).await?;
        if change != MembershipChange::Add {
            // Those who left still learn that they did, on their other devices.
            for u in changed {
                let inbox_seq =
                    add_inbox_entry(&mut tx, &u, appended.message.msg_id as i64).await?;
                appended.recipients.push((u, inbox_seq));
            }
        }
        let after = load_conversation(&mut tx, conversation_id)
            .await?
            .expect("conversation exists");
        tx.commit().await.db()?;
        Ok((after, Some(appended)))
    }

    async fn list_conversations(&self, user: &str) -> Result<Vec<ConversationRecord>, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        let rows: Vec<(i64, i64, bool, i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT m.conversation_id, m.muted_until, m.pinned, m.read_seq, c.created_at, \
                    (SELECT p.read_seq FROM members p \
                     WHERE c.kind = 1 AND p.conversation_id = c.id AND p.user_id <> m.user_id) \
             FROM members m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.user_id = ? ORDER BY m.conversation_id",
        )
        .bind(user)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, muted_until_ms, pinned, read_seq, created_at, peer) in rows {
            let Some(c) = load_conversation(&mut conn, id as u64).await? else {
                continue;
            };
            let newest = sqlx::query(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.conversation_id = ? ORDER BY m.seq DESC LIMIT 1"
            ))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            let last_message = newest.map(|r| message_from_row(&r, 0)).transpose()?;
            out.push(ConversationRecord {
                muted_until_ms,
                pinned,
                read_seq: read_seq as u64,
                peer_read_seq: peer.unwrap_or(0) as u64,
                last_activity_ms: last_message
                    .as_ref()
                    .map_or(created_at, |m| m.server_time_ms),
                last_message,
                ..c
            });
        }
        Ok(out)
    }

    async fn mark_read(
        &self,
        conversation_id: u64,
        user: &str,
        seq: u64,
    ) -> Result<ReadMark, ChatError> {
        let mut tx = self.begin().await?;
        let read: Option<i64> = sqlx::query_scalar(
            "SELECT read_seq FROM members WHERE conversation_id = ? AND user_id = ?",
        )
        .bind(conversation_id as i64)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let read = read.ok_or(ChatError::NotMember(conversation_id))? as u64;
        let (_kind, newest): (i64, i64) = sqlx::query_as(CONVERSATION_KIND_AND_SEQ)
            .bind(conversation_id as i64)
            .fetch_one(&mut *tx)
            .await
            .db()?;
        let wanted = seq.min(newest as u64);
        if wanted <= read {
            return Ok(ReadMark {
                seq: read,
                moved: false,
            });
        }
        sqlx::query(READ_UP_TO)
            .bind(wanted as i64)
            .bind(conversation_id as i64)
            .bind(user)
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(ReadMark {
            seq: wanted,
            moved: true,
        })
    }

    async fn read_markers(&self, conversation_id: u64) -> Result<Vec<(String, u64)>, ChatError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, read_seq FROM members WHERE conversation_id = ? ORDER BY user_id",
        )
        .bind(conversation_id as i64)
        .fetch_all(&self.reader)
        .await
        .db()?;
        Ok(rows.into_iter().map(|(u, r)| (u, r as u64)).collect())
    }

    async fn is_member(&self, conversation_id: u64, user: &str) -> Result<bool, ChatError> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM members WHERE conversation_id = ? AND user_id = ?")
                .bind(conversation_id as i64)
                .bind(user)
                .fetch_optional(&self.reader)
                .await
                .db()?;
        Ok(found.is_some())
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        self.appender.append(batch).await
    }

    async fn revise(&self, r: &Revision) -> Result<Option<Appended>, ChatError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.conversation_id = ? AND m.seq = ?"
        ))
        .bind(r.conversation_id as i64)
        .bind(r.seq as i64)
        .fetch_optional(&mut *tx)
        .await
        .db()?
        .ok_or_else(|| no_message(r.conversation_id, r.seq))?;
        let stored = message_from_row(&row, 0)?;
        let Some(revised) = r.apply(&stored)? else {
            return Ok(None);
        };
        let id = stored.msg_id as i64;
        let content = revised
            .content
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        sqlx::query("UPDATE messages SET content = ?, edited_at = ?, recalled = ? WHERE id = ?")
            .bind(&content)
            .bind(revised.edited_at_ms)
            .bind(revised.recalled)
            .bind(id)
            .execute(&mut *tx)
            .await
            .db()?;
        match &r.change {
            Change::Edit(_) => {
                let before = stored.content.unwrap_or_default().encode_to_vec();
                sqlx::query(
                    "INSERT INTO message_edits (message_id, replaced_at, content) VALUES (?, ?, ?)",
                )
                .bind(id)
                .bind(r.now_ms)
                .bind(before)
                .execute(&mut *tx)
                .await
                .db()?;
            }
            Change::Recall => {
                sqlx::query("DELETE FROM message_edits WHERE message_id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .db()?;
            }
        }
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT user_id FROM members WHERE conversation_id = ? ORDER BY user_id",
        )
        .bind(r.conversation_id as i64)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let mut recipients = Vec::with_capacity(members.len());
        for user in members {
            let inbox_seq = add_inbox_entry(&mut tx, &user, id).await?;
            recipients.push((user, inbox_seq));
        }
        tx.commit().await.db()?;
        Ok(Some(Appended {
            message: revised,
            recipients,
            duplicate: false,
        }))
    }

    async fn edit_history(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<Vec<EditRecord>, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        let id: Option<i64> =
            sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = ? AND seq = ?")
                .bind(conversation_id as i64)
                .bind(seq as i64)
                .fetch_optional(&mut *conn)
                .await
                .db()?;
        let id = id.ok_or_else(|| no_message(conversation_id, seq))?;
        let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
            "SELECT content, replaced_at FROM message_edits WHERE message_id = ? ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        rows.into_iter().map(EditRecord::from_row).collect()
    }

    async fn prune_edits(&self, before_ms: i64) -> Result<u64, ChatError> {
        let done = sqlx::query("DELETE FROM message_edits WHERE replaced_at < ?")
            .bind(before_ms)
            .execute(&self.writer)
            .await
            .db()?;
        Ok(done.rows_affected())
    }

    async fn inbox_after(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<InboxPage, ChatError> {
        // One read transaction, so the head and the page agree.
        let mut tx = self.reader.begin().await.db()?;
        let head: Option<i64> = sqlx::query_scalar(INBOX_HEAD)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        let rows = sqlx::query(concat!(
            "SELECT i.seq, ",
            message_columns!(),
            " FROM inbox i JOIN messages m ON m.id = i.message_id \
             WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?"
        ))
        .bind(user)
        .bind(after as i64)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        let entries = rows
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>(0).db()? as u64, message_from_row(r, 1)?)))
            .collect::<Result<Vec<_>, ChatError>>()?;
        Ok(InboxPage {
            entries,
            head: head.unwrap_or(0) as u64,
        })
    }

    async fn inbox_head(&self, user: &str) -> Result<u64, ChatError> {
        let head: Option<i64> = sqlx::query_scalar(INBOX_HEAD)
            .bind(user)
            .fetch_optional(&self.reader)
            .await
            .db()?;
        Ok(head.unwrap_or(0) as u64)
    }

    async fn history(
        &self,
        conversation_id: u64,
        from_seq: u64,
        direction: pb::Direction,
        limit: u32,
    ) -> Result<HistorySlice, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        let sql = match direction {
            pb::Direction::Backward => concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.conversation_id = ? AND m.seq < ? \
                 ORDER BY m.seq DESC LIMIT ?"
            ),
            pb::Direction::Forward => concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.conversation_id = ? AND m.seq > ? \
                 ORDER BY m.seq LIMIT ?"
            ),
        };
        let rows = sqlx::query(sql)
            .bind(conversation_id as i64)
            .bind(history_bound(from_seq, direction))
            .bind(limit as i64 + 1)
            .fetch_all(&mut *conn)
            .await
            .db()?;
        let (rows, has_more) = history_page(rows, limit, direction);
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT MIN(seq) FROM messages WHERE conversation_id = ?")
                .bind(conversation_id as i64)
                .fetch_one(&mut *conn)
                .await
                .db()?;
        let messages = rows
            .iter()
            .map(|r| message_from_row(r, 0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HistorySlice {
            messages,
            has_more,
            oldest_available_seq: oldest.unwrap_or(0) as u64,
        })
    }

    async fn set_cursors(&self, cursors: &[DeviceCursor], now_ms: i64) -> Result<(), ChatError> {
        // One statement per chunk of rows (SQLite allows 32,766 parameters),
        // all in one transaction: one fsync however many devices acked.
        let mut tx = self.begin().await?;
        for chunk in cursors.chunks(500) {
            let mut sql =
                String::from("INSERT INTO devices (user_id, device_id, cursor, last_seen) VALUES ");
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?, ?, ?, ?)"
                } else {
                    ", (?, ?, ?, ?)"
                });
            }
            sql.push_str(
                " ON CONFLICT (user_id, device_id) DO UPDATE \
                 SET cursor = MAX(cursor, excluded.cursor), last_seen = excluded.last_seen",
            );
            // Only placeholders are spliced in; every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for c in chunk {
                q = q
                    .bind(&c.user)
                    .bind(&c.device)
                    .bind(c.cursor as i64)
                    .bind(now_ms);
            }
            q.execute(&mut *tx).await.db()?;
        }
        tx.commit().await.db()?;
        Ok(())
    }

    async fn get_cursor(&self, user: &str, device: &str) -> Result<Option<u64>, ChatError> {
        let cursor: Option<i64> =
            sqlx::query_scalar("SELECT cursor FROM devices WHERE user_id = ? AND device_id = ?")
                .bind(user)
                .bind(device)
                .fetch_optional(&self.reader)
                .await
                .db()?;
        Ok(cursor.map(|c| c as u64))
    }

    async fn log_out(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), ChatError> {
        let mut tx = self.begin().await?;
        let done = match device {
            None => sqlx::query("UPDATE users SET revoked_at = MAX(revoked_at, ?1) WHERE id = ?2")
                .bind(at_ms)
                .bind(user)
                .execute(&mut *tx)
                .await
                .db()?,
            // Only for a user that exists.
            Some(device) => sqlx::query(
                "INSERT INTO log_outs (user_id, device_id, revoked_at) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM users WHERE id = ?1) \
                 ON CONFLICT (user_id, device_id) DO UPDATE \
                 SET revoked_at = MAX(log_outs.revoked_at, excluded.revoked_at)",
            )
            .bind(user)
            .bind(device)
            .bind(at_ms)
            .execute(&mut *tx)
            .await
            .db()?,
        };
        if done.rows_affected() == 0 {
            return Err(ChatError::NotFound(format!("no user {user}")));
        }
        sqlx::query(
            "DELETE FROM push_tokens WHERE user_id = ?1 AND (?2 IS NULL OR device_id = ?2)",
        )
        .bind(user)
        .bind(device)
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn log_outs_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, ChatError> {
        let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT id, NULL, revoked_at FROM users WHERE revoked_at > 0 AND revoked_at >= ?1 \
             UNION ALL SELECT user_id, device_id, revoked_at FROM log_outs WHERE revoked_at >= ?1 \
             ORDER BY 3 LIMIT ?2",
        )
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .db()?;
        Ok(rows.into_iter().map(Revocation::from_row).collect())
    }

    async fn logged_out_at(&self, user: &str, device: &str) -> Result<Option<i64>, ChatError> {
        sqlx::query_scalar(
            "SELECT MAX(u.revoked_at, COALESCE(l.revoked_at, 0)) FROM users u \
             LEFT JOIN log_outs l ON l.user_id = u.id AND l.device_id = ?2 WHERE u.id = ?1",
        )
        .bind(user)
        .bind(device)
        .fetch_optional(&self.reader)
        .await
        .db()
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceRecord>, ChatError> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT k.device_id, COALESCE(d.cursor, 0), COALESCE(d.last_seen, 0), MAX(COALESCE(l.revoked_at, 0), u.revoked_at) \
             FROM (SELECT device_id FROM devices WHERE user_id = ?1 \
             UNION SELECT device_id FROM log_outs WHERE user_id = ?1 \
             UNION SELECT device_id FROM refresh_tokens WHERE user_id = ?1) k \
             JOIN users u ON u.id = ?1 LEFT JOIN devices d ON d.user_id = ?1 AND d.device_id = k.device_id \
             LEFT JOIN log_outs l ON l.user_id = ?1 AND l.device_id = k.device_id \
             ORDER BY k.device_id",
        )
        .bind(user)
        .fetch_all(&self.reader)
        .await
        .db()?;
        Ok(rows.into_iter().map(DeviceRecord::from_row).collect())
    }

    async fn put_refresh(&self, record: &RefreshRecord) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO refresh_tokens \
             (user_id, device_id, digest, previous, created_at, rotated_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET digest = excluded.digest, \
             previous = excluded.previous, created_at = excluded.created_at, \
             rotated_at = excluded.rotated_at, expires_at = excluded.expires_at",
        )
        .bind(&record.user)
        .bind(&record.device)
        .bind(&record.digest)
        .bind(&record.previous)
        .bind(record.created_at_ms)
        .bind(record.rotated_at_ms)
        .bind(record.expires_at_ms)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(())
    }

    async fn get_refresh(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<RefreshRecord>, ChatError> {
        let row: Option<(Vec<u8>, Vec<u8>, i64, i64, i64)> = sqlx::query_as(
            "SELECT digest, previous, created_at, rotated_at, expires_at FROM refresh_tokens \
             WHERE user_id = ?1 AND device_id = ?2",
        )
        .bind(user)
        .bind(device)
        .fetch_optional(&self.reader)
        .await
        .db()?;
        Ok(row.map(|row| RefreshRecord::from_row(user, device, row)))
    }

    async fn rotate_refresh(
        &self,
        user: &str,
        device: &str,
        current: &[u8],
        next: &[u8],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, ChatError> {
        let done = sqlx::query(
            "UPDATE refresh_tokens SET previous = digest, digest = ?4, rotated_at = ?5, \
             expires_at = ?6 WHERE user_id = ?1 AND device_id = ?2 AND digest = ?3",
        )
        .bind(user)
        .bind(device)
        .bind(current)
        .bind(next)
        .bind(now_ms)
        .bind(expires_at_ms)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_block(
        &self,
        user: &str,
        other: &str,
        blocked: bool,
        now_ms: i64,
    ) -> Result<(), ChatError> {
        if blocked {
            sqlx::query("INSERT INTO blocks (user_id, blocked_id, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
                .bind(user)
                .bind(other)
                .bind(now_ms)
                .execute(&self.writer)
                .await.db()?;
        } else {
            sqlx::query("DELETE FROM blocks WHERE user_id = ? AND blocked_id = ?")
                .bind(user)
                .bind(other)
                .execute(&self.writer)
                .await
                .db()?;
        }
        Ok(())
    }

    async fn is_blocked(&self, user: &str, by: &str) -> Result<bool, ChatError> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM blocks WHERE user_id = ? AND blocked_id = ?")
                .bind(by)
                .bind(user)
                .fetch_optional(&self.reader)
                .await
                .db()?;
        Ok(found.is_some())
    }

    async fn blocks_of(&self, user: &str) -> Result<Vec<String>, ChatError> {
        sqlx::query_scalar("SELECT blocked_id FROM blocks WHERE user_id = ? ORDER BY blocked_id")
            .bind(user)
            .fetch_all(&self.reader)
            .await
            .db()
    }

    async fn blockers_of(&self, actor: &str, users: &[String]) -> Result<Vec<String>, ChatError> {
        let mut conn = self.reader.acquire().await.db()?;
        let mut out = Vec::new();
        for u in users {
            let found: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM blocks WHERE user_id = ? AND blocked_id = ?")
                    .bind(u)
                    .bind(actor)
                    .fetch_optional(&mut *conn)
                    .await
                    .db()?;
            if found.is_some() {
                out.push(u.clone());
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    async fn put_push_token(
        &self,
        t: &PushTokenRecord,
        session_since_ms: i64,
    ) -> Result<bool, ChatError> {
        // BEGIN IMMEDIATE: no log-out commits between the check and the write.
        let mut tx = self.begin().await?;
        let logged_out: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(u.revoked_at, COALESCE(l.revoked_at, 0)) FROM users u \
             LEFT JOIN log_outs l ON l.user_id = u.id AND l.device_id = ?2 WHERE u.id = ?1",
        )
        .bind(&t.user)
        .bind(&t.device)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        if logged_out.is_none_or(|at| at >= session_since_ms) {
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM push_tokens WHERE provider = ?1 AND token = ?2 \
             AND NOT (user_id = ?3 AND device_id = ?4)",
        )
        .bind(t.provider as i64)
        .bind(&t.token)
        .bind(&t.user)
        .bind(&t.device)
        .execute(&mut *tx)
        .await
        .db()?;
        sqlx::query(
            "INSERT INTO push_tokens \
             (user_id, device_id, provider, token, topic, locale, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET provider = excluded.provider, \
             token = excluded.token, topic = excluded.topic, locale = excluded.locale, \
             updated_at = excluded.updated_at",
        )
        .bind(&t.user)
        .bind(&t.device)
        .bind(t.provider as i64)
        .bind(&t.token)
        .bind(&t.topic)
        .bind(&t.locale)
        .bind(t.updated_at_ms)
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(true)
    }

    async fn delete_push_token(&self, user: &str, device: &str) -> Result<(), ChatError> {
        sqlx::query("DELETE FROM push_tokens WHERE user_id = ? AND device_id = ?")
            .bind(user)
            .bind(device)
            .execute(&self.writer)
            .await
            .db()?;
        Ok(())
    }

    async fn drop_push_tokens(&self, dead: &[DeadToken]) -> Result<u64, ChatError> {
        let mut tx = self.begin().await?;
        let mut dropped = 0;
        for d in dead {
            dropped += sqlx::query("DELETE FROM push_tokens WHERE provider = ? AND token = ?")
                .bind(d.provider as i64)
                .bind(&d.token)
                .execute(&mut *tx)
                .await
                .db()?
                .rows_affected();
        }
        tx.commit().await.db()?;
        Ok(dropped)
    }

    async fn notification_previews(
        &self,
        user: &str,
        previews: Option<bool>,
    ) -> Result<Option<bool>, ChatError> {
        sqlx::query_scalar(
            "UPDATE users SET push_previews = COALESCE(?2, push_previews) WHERE id = ?1 \
             RETURNING push_previews",
        )
        .bind(user)
        .bind(previews)
        .fetch_optional(&self.writer)
        .await
        .db()
    }

    async fn mute(
        &self,
        conversation_id: u64,
        user: &str,
        until_ms: i64,
    ) -> Result<MemberSettings, ChatError> {
        self.set_member(conversation_id, user, Some(until_ms), None)
            .await
    }

    async fn pin(
        &self,
        conversation_id: u64,
        user: &str,
        pinned: bool,
    ) -> Result<MemberSettings, ChatError> {
        self.set_member(conversation_id, user, None, Some(pinned))
            .await
    }

    async fn push_audience(&self, q: &AudienceQuery) -> Result<PushAudience, ChatError> {
        // In-process: a statement per user costs no round trip.
        let mut conn = self.reader.acquire().await.db()?;
        let mut audience = PushAudience::default();
        for user in &q.users {
            let rows: Vec<(String, String, i64, String, String, String, i64)> = sqlx::query_as(
                "SELECT user_id, device_id, provider, token, topic, locale, updated_at \
                 FROM push_tokens WHERE user_id = ? ORDER BY device_id",
            )
            .bind(user)
            .fetch_all(&mut *conn)
            .await
            .db()?;
            for row in rows {
                audience.tokens.push(PushTokenRecord::from_row(row)?);
            }
            let settings: Option<(bool, i64)> = sqlx::query_as(concat!(
                "SELECT push_previews, IFNULL((SELECT SUM(MAX(",
                last_seq!("c.id"),
                " - m.read_seq, 0)) FROM members m JOIN conversations c \
                 ON c.id = m.conversation_id WHERE m.user_id = ?1 AND m.muted_until <= ?2), 0) \
                 FROM users WHERE id = ?1"
            ))
            .bind(user)
            .bind(q.now_ms)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            if let Some((previews, unread)) = settings {
                if !previews {
                    audience.no_previews.insert(user.clone());
                }
                audience.unread.insert(user.clone(), unread.max(0) as u64);
            }
        }
        for (user, conversation) in &q.conversations {
            let muted: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM members WHERE conversation_id = ? AND user_id = ? \
                 AND muted_until > ?",
            )
            .bind(*conversation as i64)
            .bind(user)
            .bind(q.now_ms)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            if muted.is_some() {
                audience.muted.insert((user.clone(), *conversation));
            }
        }
        for sender in &q.senders {
            let name: Option<String> = sqlx::query_scalar(
                "SELECT display_name FROM users WHERE id = ? AND display_name <> ''",
            )
            .bind(sender)
            .fetch_optional(&mut *conn)
            .await
            .db()?;
            if let Some(name) = name {
                audience.names.insert(sender.clone(), name);
            }
        }
        Ok(audience)
    }

    async fn prune_before(&self, cutoff_ms: i64) -> Result<u64, ChatError> {
        let mut tx = self.begin().await?;
        let newest_old: Option<i64> =
            sqlx::query_scalar("SELECT MAX(id) FROM messages WHERE created_at < ?")
                .bind(cutoff_ms)
                .fetch_one(&mut *tx)
                .await
                .db()?;
        let Some(max_id) = newest_old else {
            return Ok(0);
        };
        // The newest numbers may be in the rows about to go: keep them as
        // floors first, so a conversation or an inbox never numbers from 1
        // again.
        for sql in [
            concat!(
                "UPDATE conversations SET last_seq = ",
                last_seq!("conversations.id"),
                " WHERE id IN (SELECT DISTINCT conversation_id FROM messages WHERE id <= ?1)"
            ),
            concat!(
                "UPDATE users SET inbox_head = ",
                inbox_head!("users.id"),
                " WHERE id IN (SELECT DISTINCT user_id FROM inbox WHERE message_id <= ?1)"
            ),
            "DELETE FROM inbox WHERE message_id <= ?1",
            "DELETE FROM message_edits WHERE message_id <= ?1",
        ] {
            sqlx::query(sql).bind(max_id).execute(&mut *tx).await.db()?;
        }
        let done = sqlx::query("DELETE FROM messages WHERE id <= ?")
            .bind(max_id)
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(done.rows_affected())
    }

    async fn create_blob(&self, blob: &BlobRecord) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO blobs (id, owner, kind, mime, size, sha256, name, state, created_at, \
             upload_expires_at, width, height, thumbnail, last_used) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&blob.id)
        .bind(&blob.owner)
        .bind(blob.kind as i64)
        .bind(&blob.mime_type)
        .bind(blob.size_bytes as i64)
        .bind(&blob.sha256)
        .bind(&blob.name)
        .bind(blob.state as i64)
        .bind(blob.created_at_ms)
        .bind(blob.upload_expires_at_ms)
        .bind(i64::from(blob.width))
        .bind(i64::from(blob.height))
        .bind(blob.thumbnail_column())
        .bind(blob.last_used_ms)
        .execute(&self.writer)
        .await
        .db()?;
        Ok(())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobRecord>, ChatError> {
        let row: Option<BlobRow> = sqlx::query_as(concat!(
            "SELECT ",
            blob_columns!(),
            " FROM blobs WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reader)
        .await
        .db()?;
        row.map(BlobRecord::from_row).transpose()
    }

    async fn complete_blob(&self, blob: &BlobRecord) -> Result<bool, ChatError> {
        let done = sqlx::query(
            "UPDATE blobs SET state = 1, sha256 = ?2, width = ?3, height = ?4, thumbnail = ?5 \
             WHERE id = ?1 AND state = 0",
        )
        .bind(&blob.id)
        .bind(&blob.sha256)
        .bind(i64::from(blob.width))
        .bind(i64::from(blob.height))
        .bind(blob.thumbnail_column())
        .execute(&self.writer)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn use_blobs(
        &self,
        uses: &[(String, String)],
        now_ms: i64,
    ) -> Result<Vec<BlobRecord>, ChatError> {
        let sql = concat!(
            "UPDATE blobs SET last_used = MAX(last_used, ?3) \
             WHERE id = ?1 AND owner = ?2 AND state = 1 RETURNING ",
            blob_columns!()
        );
        let mut tx = self.begin().await?;
        let mut used = Vec::with_capacity(uses.len());
        for (owner, id) in uses {
            let row: Option<BlobRow> = sqlx::query_as(sql)
                .bind(id)
                .bind(owner)
                .bind(now_ms)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
            if let Some(row) = row {
                used.push(BlobRecord::from_row(row)?);
            }
        }
        tx.commit().await.db()?;
        Ok(used)
    }

    async fn uploads_since(&self, owner: &str, since_ms: i64) -> Result<(u64, u64), ChatError> {
        let (count, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs \
             WHERE owner = ? AND created_at >= ?",
        )
        .bind(owner)
        .bind(since_ms)
        .fetch_one(&self.reader)
        .await
        .db()?;
        Ok((count as u64, bytes as u64))
    }

    async fn doom_blobs(
        &self,
        pending_before_ms: i64,
        unused_before_ms: i64,
        used_before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<String>, ChatError> {
        sqlx::query_scalar(
            "UPDATE blobs SET state = 2 WHERE id IN (SELECT id FROM blobs WHERE \
             (state = 0 AND upload_expires_at < ?1) \
             OR (state = 1 AND last_used = 0 AND created_at < ?2) \
             OR (state = 1 AND last_used > 0 AND last_used < ?3) \
             OR state = 2 LIMIT ?4) RETURNING id",
        )
        .bind(pending_before_ms)
        .bind(unused_before_ms)
        .bind(used_before_ms.unwrap_or(i64::MIN))
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await
        .db()
    }

    async fn delete_blobs(&self, ids: &[String]) -> Result<(), ChatError> {
        let mut tx = self.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM blobs WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .db()?;
        }
        tx.commit().await.db()
    }
}
