//! The cluster's store: PostgreSQL, shared by every chat-service replica.
//!
//! Sequence numbers are decided under row locks: a batch first locks its
//! conversations (`SELECT .. FOR UPDATE`, in id order), then the users whose
//! timelines it extends (in id order). Every writing transaction takes its
//! locks in that one order, so replicas appending to the same conversation
//! queue behind each other instead of deadlocking, and a seq is only ever
//! taken by a row that commits: gap-free and strictly increasing. A batch is
//! a fixed number of statements whatever its size (arrays through `unnest`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use parley_proto::pb;
use prost::Message as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};

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

mod append;

/// The columns `message_from_row` reads, in order.
macro_rules! message_columns {
    () => {
        "m.id, m.conversation_id, m.seq, m.sender_id, m.sender_device, m.client_msg_id, m.content, m.created_at, m.edited_at, m.recalled"
    };
}

/// How often a transaction that lost a race (a deadlock, a serialization
/// failure, a concurrent duplicate) is tried again before giving up.
const ATTEMPTS: usize = 5;

/// Parley's store on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

impl PgStore {
    /// [`PgStore::connect`], trying again once a second for up to 30
    /// seconds while the database does not answer yet (a process starting
    /// beside it, as pods do).
    pub async fn connect_patiently(
        url: &str,
        schema: Option<&str>,
        max_connections: u32,
    ) -> Result<Self, ChatError> {
        let mut attempt = 0u32;
        loop {
            match Self::connect(url, schema, max_connections).await {
                Ok(store) => return Ok(store),
                Err(e) if attempt < 30 => {
                    tracing::warn!(error = %e, "PostgreSQL not reachable yet; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects to `url`. With `schema`, every table lives in that schema
    /// (created if missing), which lets tests and tenants share a database.
    /// Migrations are not run here: see [`PgStore::migrate`].
    pub async fn connect(
        url: &str,
        schema: Option<&str>,
        max_connections: u32,
    ) -> Result<Self, ChatError> {
        let mut options = url.parse::<PgConnectOptions>().db()?;
        // The schema in the name tells tenants' (and tests') sessions apart.
        let app = match schema {
            Some(s) => format!("parley-chat {s}"),
            None => "parley-chat".to_owned(),
        };
        // No JIT: every statement here is short, and PostgreSQL compiles one
        // whenever its estimated cost passes `jit_above_cost`, which stale
        // statistics on a grown inbox make `parley_append` do: 50-64 ms a
        // call instead of 3-4 (docs/benchmarks.md).
        options = options.application_name(&app).options([("jit", "off")]);
        if let Some(schema) = schema {
            check_schema_name(schema)?;
            let mut conn = PgConnection::connect_with(&options).await.db()?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&mut conn)
            .await
            .db()?;
            conn.close().await.db()?;
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(ACQUIRE_WITHIN)
            .connect_with(options)
            .await
            .db()?;
        Ok(Self { pool })
    }

    /// Brings the schema up to date. Safe to run from several replicas at
    /// once: sqlx serializes migrators with an advisory lock.
    pub async fn migrate(&self) -> Result<(), ChatError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .db()?;
        Ok(())
    }

    /// The connection pool (for health checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the database answers (within a second: readiness probes
    /// must not hang on a database that is away).
    pub async fn ping(&self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }
}

/// How long a statement waits for a connection. While the database is
/// away, this is how long a request takes to be refused with UNAVAILABLE
/// (the pool keeps trying to connect meanwhile).
const ACQUIRE_WITHIN: Duration = Duration::from_secs(2);

/// Schema names are spliced into SQL, so only a plain identifier is taken.
fn check_schema_name(schema: &str) -> Result<(), ChatError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(ChatError::invalid(format!(
            "schema name {schema:?} must be lowercase letters, digits and _"
        )))
    }
}

/// A transaction worth trying again: it lost a race, not an argument.
fn is_retryable(e: &ChatError) -> bool {
    let ChatError::Storage(source) = e else {
        return false;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40001" | "40P01" | "23505"))
        }
        _ => false,
    }
}

fn message_from_row(row: &PgRow, offset: usize) -> Result<pb::Message, ChatError> {
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

fn kind_from_i16(kind: i16) -> pb::ConversationKind {
    match kind {
        1 => pb::ConversationKind::Direct,
        2 => pb::ConversationKind::Group,
        _ => pb::ConversationKind::Unspecified,
    }
}

/// Loads a conversation; `lock` takes its row lock for the transaction.
async fn load_conversation(
    conn: &mut PgConnection,
    id: u64,
    lock: bool,
) -> Result<Option<ConversationRecord>, ChatError> {
    let sql = if lock {
        "SELECT kind, name, owner, last_seq FROM conversations WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT kind, name, owner, last_seq FROM conversations WHERE id = $1"
    };
    let Some(row) = sqlx::query(sql)
        .bind(id as i64)
        .fetch_optional(&mut *conn)
        .await
        .db()?
    else {
        return Ok(None);
    };
    let members: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM members WHERE conversation_id = $1 ORDER BY user_id",
    )
    .bind(id as i64)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    Ok(Some(ConversationRecord {
        id,
        kind: kind_from_i16(row.try_get(0).db()?),
        name: row.try_get(1).db()?,
        owner: row.try_get(2).db()?,
        members,
        last_seq: row.try_get::<i64, _>(3).db()? as u64,
        ..ConversationRecord::default()
    }))
}

async fn missing_users_in(
    conn: &mut PgConnection,
    ids: &[String],
) -> Result<Vec<String>, ChatError> {
    let found: Vec<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut *conn)
        .await
        .db()?;
    let found: HashSet<&str> = found.iter().map(String::as_str).collect();
    Ok(ids
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .cloned()
        .collect())
}

/// The members of each of `ids`, sorted.
async fn members_of(
    conn: &mut PgConnection,
    ids: &[i64],
) -> Result<HashMap<u64, Vec<String>>, ChatError> {
    let mut members: HashMap<u64, Vec<String>> = HashMap::new();
    for r in sqlx::query(
        "SELECT conversation_id, user_id FROM members WHERE conversation_id = ANY($1) \
         ORDER BY conversation_id, user_id",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .db()?
    {
        members
            .entry(r.try_get::<i64, _>(0).db()? as u64)
            .or_default()
            .push(r.try_get(1).db()?);
    }
    Ok(members)
}

/// Makes `users` members who have read up to `read_seq`.
async fn insert_members(
    conn: &mut PgConnection,
    conversation_id: i64,
    users: &[String],
    read_seq: u64,
    now_ms: i64,
) -> Result<(), ChatError> {
    sqlx::query(
        "INSERT INTO members (conversation_id, user_id, joined_at, read_seq) \
         SELECT $1, u, $3, $4 FROM unnest($2::text[]) AS u ON CONFLICT DO NOTHING",
    )
    .bind(conversation_id)
    .bind(users)
    .bind(now_ms)
    .bind(read_seq as i64)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(())
}

/// Creates the direct conversation of `users` under `key`, or finds the one
/// a concurrent call just created.
async fn open_direct_in(
    tx: &mut PgConnection,
    key: &str,
    users: &[String],
    now_ms: i64,
) -> Result<ConversationRecord, ChatError> {
    let missing = missing_users_in(tx, users).await?;
    if !missing.is_empty() {
        return Err(no_such_users(&missing));
    }
    // Two replicas opening the same pair at once: one inserts, the other
    // finds its row.
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO conversations (kind, direct_key, created_at) VALUES (1, $1, $2) \
         ON CONFLICT (direct_key) DO NOTHING RETURNING id",
    )
    .bind(key)
    .bind(now_ms)
    .fetch_optional(&mut *tx)
    .await
    .db()?;
    let id = match inserted {
        Some(id) => {
            insert_members(tx, id, users, 0, now_ms).await?;
            id
        }
        None => sqlx::query_scalar("SELECT id FROM conversations WHERE direct_key = $1")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .db()?,
    };
    Ok(load_conversation(tx, id as u64, false)
        .await?
        .expect("conversation just read or written"))
}

/// A message whose seq is decided, with everyone who gets an inbox entry.
struct Planned<'a> {
    message: &'a NewMessage,
    seq: i64,
    recipients: Vec<String>,
}

/// Writes planned messages, their inbox entries and the conversations' new
/// last seq. The caller holds the conversations' row locks; the users' are
/// taken here, in id order. A concurrent duplicate (same sender and
/// client_msg_id committed meanwhile) fails the transaction with 23505, which
/// the caller retries.
async fn write_messages(
    conn: &mut PgConnection,
    planned: &[Planned<'_>],
) -> Result<Vec<Appended>, ChatError> {
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    let n = planned.len();
    let mut conv = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let mut sender = Vec::with_capacity(n);
    let mut device = Vec::with_capacity(n);
    let mut client_id = Vec::with_capacity(n);
    let mut content = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for p in planned {
        conv.push(p.message.conversation_id as i64);
        seq.push(p.seq);
        sender.push(p.message.sender_id.as_str());
        device.push(p.message.sender_device.as_str());
        client_id.push(p.message.client_msg_id.as_str());
        content.push(p.message.content.encode_to_vec());
        created.push(p.message.now_ms);
    }
    let rows = sqlx::query(
        "INSERT INTO messages (conversation_id, seq, sender_id, sender_device, client_msg_id, content, created_at) \
         SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::int8[]) \
         RETURNING id, conversation_id, seq",
    )
    .bind(&conv)
    .bind(&seq)
    .bind(&sender)
    .bind(&device)
    .bind(&client_id)
    .bind(&content)
    .bind(&created)
    .fetch_all(&mut *conn)
    .await.db()?;
    let mut ids: HashMap<(i64, i64), i64> = HashMap::with_capacity(n);
    for r in &rows {
        ids.insert((r.try_get(1).db()?, r.try_get(2).db()?), r.try_get(0).db()?);
    }

    // Timelines: lock the users in id order, then move every head at once.
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for p in planned {
        for u in &p.recipients {
            *counts.entry(u.as_str()).or_default() += 1;
        }
    }
    let mut users: Vec<&str> = counts.keys().copied().collect();
    users.sort_unstable();
    sqlx::query("SELECT 1 FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&users)
        .execute(&mut *conn)
        .await
        .db()?;
    let adds: Vec<i64> = users.iter().map(|u| counts[u]).collect();
    let heads = sqlx::query(
        "UPDATE users SET inbox_head = users.inbox_head + k.n \
         FROM unnest($1::text[], $2::int8[]) AS k(id, n) WHERE users.id = k.id \
         RETURNING users.id, users.inbox_head",
    )
    .bind(&users)
    .bind(&adds)
    .fetch_all(&mut *conn)
    .await
    .db()?;
    // The next inbox seq of each user: the new head minus what was added.
    let mut next: HashMap<String, i64> = HashMap::with_capacity(heads.len());
    for r in &heads {
        let id: String = r.try_get(0).db()?;
        let head: i64 = r.try_get(1).db()?;
        let added = counts.get(id.as_str()).copied().unwrap_or(0);
        next.insert(id, head - added + 1);
    }

    let mut inbox_user: Vec<&str> = Vec::new();
    let mut inbox_seq: Vec<i64> = Vec::new();
    let mut inbox_msg: Vec<i64> = Vec::new();
    let mut out = Vec::with_capacity(n);
    for p in planned {
        let key = (p.message.conversation_id as i64, p.seq);
        let msg_id = *ids
            .get(&key)
            .ok_or_else(|| ChatError::Corrupt("inserted message not returned".into()))?;
        let mut recipients = Vec::with_capacity(p.recipients.len());
        for u in &p.recipients {
            // A recipient without a user row has no timeline to extend.
            let Some(s) = next.get_mut(u.as_str()) else {
                continue;
            };
            inbox_user.push(u.as_str());
            inbox_seq.push(*s);
            inbox_msg.push(msg_id);
            recipients.push((u.clone(), *s as u64));
            *s += 1;
        }
        let m = p.message;
        out.push(Appended {
            message: m.stored(msg_id as u64, p.seq as u64),
            recipients,
            duplicate: false,
        });
    }
    sqlx::query(
        "INSERT INTO inbox (user_id, seq, message_id) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])",
    )
    .bind(&inbox_user)
    .bind(&inbox_seq)
    .bind(&inbox_msg)
    .execute(&mut *conn)
    .await
    .db()?;

    let mut last: HashMap<i64, i64> = HashMap::new();
    for p in planned {
        let e = last.entry(p.message.conversation_id as i64).or_default();
        *e = (*e).max(p.seq);
    }
    let (conv_ids, last_seqs): (Vec<i64>, Vec<i64>) = last.into_iter().unzip();
    sqlx::query(
        "UPDATE conversations SET last_seq = k.seq \
         FROM unnest($1::int8[], $2::int8[]) AS k(id, seq) WHERE conversations.id = k.id",
    )
    .bind(&conv_ids)
    .bind(&last_seqs)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(out)
}

/// Appends a server-written event to a conversation whose row lock the
/// caller holds; `extra` (users who just left) get inbox entries as well.
async fn append_system(
    conn: &mut PgConnection,
    conv: &ConversationRecord,
    actor: &str,
    event: pb::SystemEvent,
    extra: &[String],
    now_ms: i64,
) -> Result<Appended, ChatError> {
    let seq = conv.last_seq as i64 + 1;
    let m = system_message(conv.id, seq as u64, actor, event, now_ms);
    let mut recipients = conv.members.clone();
    recipients.extend(extra.iter().cloned());
    let planned = [Planned {
        message: &m,
        seq,
        recipients,
    }];
    let mut out = write_messages(conn, &planned).await?;
    // Whoever writes a message has read the conversation up to it.
    sqlx::query(
        "UPDATE members SET read_seq = $1 \
         WHERE conversation_id = $2 AND user_id = $3 AND read_seq < $1",
    )
    .bind(seq)
    .bind(conv.id as i64)
    .bind(actor)
    .execute(&mut *conn)
    .await
    .db()?;
    Ok(out.remove(0))
}

impl PgStore {
    /// Sets a member's mute or pin (None: as it is): the settings after.
    async fn set_member(
        &self,
        conversation_id: u64,
        user: &str,
        muted_until_ms: Option<i64>,
        pinned: Option<bool>,
    ) -> Result<MemberSettings, ChatError> {
        let row = sqlx::query_as(
            "UPDATE members SET muted_until = COALESCE($1, muted_until), \
             pinned = COALESCE($2, pinned) WHERE conversation_id = $3 AND user_id = $4 \
             RETURNING muted_until, pinned",
        )
        .bind(muted_until_ms)
        .bind(pinned)
        .bind(conversation_id as i64)
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        MemberSettings::from_row(row, conversation_id)
    }

    async fn change_members_in(
        tx: &mut PgConnection,
        conversation_id: u64,
        actor: &str,
        change: MembershipChange,
        users: &[String],
        max_members: usize,
        now_ms: i64,
    ) -> Result<(ConversationRecord, Option<Appended>), ChatError> {
        let before = require_group(
            load_conversation(&mut *tx, conversation_id, true).await?,
            conversation_id,
        )?;
        if change == MembershipChange::Add {
            let missing = missing_users_in(&mut *tx, users).await?;
            if !missing.is_empty() {
                return Err(no_such_users(&missing));
            }
        }
        let changed = changed_members(&before, change, users, max_members)?;
        if changed.is_empty() {
            return Ok((before, None));
        }
        if change == MembershipChange::Add {
            // What came before the members joined is not theirs to read.
            let read = before.last_seq;
            insert_members(&mut *tx, conversation_id as i64, &changed, read, now_ms).await?;
        } else {
            sqlx::query("DELETE FROM members WHERE conversation_id = $1 AND user_id = ANY($2)")
                .bind(conversation_id as i64)
                .bind(&changed)
                .execute(&mut *tx)
                .await
                .db()?;
        }
        let event = membership_event(change, actor, &changed);
        let after = load_conversation(&mut *tx, conversation_id, false)
            .await?
            .expect("conversation is locked");
        // Those who left still learn that they did, on their other devices.
        let extra: &[String] = if change == MembershipChange::Add {
            &[]
        } else {
            &changed
        };
        let appended = append_system(&mut *tx, &after, actor, event, extra, now_ms).await?;
        let after = ConversationRecord {
            last_seq: appended.message.seq,
            ..after
        };
        Ok((after, Some(appended)))
    }

    async fn revise_in(tx: &mut PgConnection, r: &Revision) -> Result<Option<Appended>, ChatError> {
        // The conversation's lock first, as every append takes it: the
        // users' locks below come after it, in id order.
        let members = load_conversation(&mut *tx, r.conversation_id, true)
            .await?
            .ok_or_else(|| no_message(r.conversation_id, r.seq))?
            .members;
        let row = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.conversation_id = $1 AND m.seq = $2 FOR UPDATE"
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
        sqlx::query(
            "UPDATE messages SET content = $1, edited_at = $2, recalled = $3 WHERE id = $4",
        )
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
                    "INSERT INTO message_edits (message_id, replaced_at, content) \
                     VALUES ($1, $2, $3)",
                )
                .bind(id)
                .bind(r.now_ms)
                .bind(before)
                .execute(&mut *tx)
                .await
                .db()?;
            }
            Change::Recall => {
                sqlx::query("DELETE FROM message_edits WHERE message_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .db()?;
            }
        }
        // One more entry in each member's timeline, heads moved under the
        // users' locks in id order (the members come sorted).
        sqlx::query("SELECT 1 FROM users WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&members)
            .execute(&mut *tx)
            .await
            .db()?;
        let recipients: Vec<(String, i64)> = sqlx::query_as(
            "WITH heads AS ( \
                 UPDATE users SET inbox_head = inbox_head + 1 WHERE id = ANY($1) \
                 RETURNING id, inbox_head \
             ) INSERT INTO inbox (user_id, seq, message_id) \
             SELECT id, inbox_head, $2 FROM heads RETURNING user_id, seq",
        )
        .bind(&members)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        Ok(Some(Appended {
            message: revised,
            recipients: recipients
                .into_iter()
                .map(|(u, seq)| (u, seq as u64))
                .collect(),
            duplicate: false,
        }))
    }

    async fn create_group_in(
        tx: &mut PgConnection,
        owner: &str,
        name: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<(ConversationRecord, Appended), ChatError> {
        let missing = missing_users_in(&mut *tx, members).await?;
        if !missing.is_empty() {
            return Err(no_such_users(&missing));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO conversations (kind, name, owner, created_at) VALUES (2, $1, $2, $3) RETURNING id",
        )
        .bind(name)
        .bind(owner)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await.db()?;
        insert_members(&mut *tx, id, members, 0, now_ms).await?;
        let conv = load_conversation(&mut *tx, id as u64, true)
            .await?
            .expect("group just written");
        let event = pb::SystemEvent {
            kind: pb::SystemEventKind::GroupCreated as i32,
            actor: owner.to_owned(),
            users: members.to_vec(),
        };
        let appended = append_system(&mut *tx, &conv, owner, event, &[], now_ms).await?;
        let conv = ConversationRecord {
            last_seq: appended.message.seq,
            ..conv
        };
        Ok((conv, appended))
    }
}

/// Runs `$body` with `$tx` a new transaction, committed when the body
/// returns Ok and rolled back at once otherwise (a dropped transaction would
/// roll back only when its connection is next used, holding its row locks
/// until then).
macro_rules! in_transaction {
    ($pool:expr, $tx:ident => $body:expr) => {{
        let mut $tx = $pool.begin().await.db()?;
        match $body.await {
            Ok(v) => {
                $tx.commit().await.db()?;
                Ok(v)
            }
            Err(e) => {
                let _ = $tx.rollback().await;
                Err(e)
            }
        }
    }};
}

/// Evaluates `$f` until it succeeds, fails for a reason other than a lost
/// race, or has been tried `ATTEMPTS` times.
macro_rules! with_retries {
    ($f:expr) => {{
        let mut attempt = 1;
        loop {
            match $f {
                Err(e) if attempt < ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "transaction lost a race; retrying");
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

#[async_trait]
impl Store for PgStore {
    async fn create_user(
        &self,
        id: &str,
        display_name: &str,
        now_ms: i64,
    ) -> Result<UserRecord, ChatError> {
        let done = sqlx::query(
            "INSERT INTO users (id, display_name, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(display_name)
        .bind(now_ms)
        .execute(&self.pool)
        .await.db()?;
        if done.rows_affected() == 0 {
            return Err(ChatError::Conflict(format!("user {id} already exists")));
        }
        Ok(UserRecord {
            id: id.to_owned(),
            display_name: display_name.to_owned(),
            created_at_ms: now_ms,
        })
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>, ChatError> {
        let row = sqlx::query("SELECT display_name, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
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
        let mut conn = self.pool.acquire().await.db()?;
        missing_users_in(&mut conn, ids).await
    }

    async fn open_direct(
        &self,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<ConversationRecord, ChatError> {
        let key = direct_key(a, b);
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT id FROM conversations WHERE direct_key = $1")
                .bind(&key)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        if let Some(id) = existing {
            return self.get_conversation(id as u64).await?.ok_or_else(|| {
                ChatError::Corrupt(format!("conversation {id} vanished while read"))
            });
        }
        let mut users = vec![a.to_owned(), b.to_owned()];
        users.sort();
        users.dedup();
        in_transaction!(self.pool, tx => open_direct_in(&mut tx, &key, &users, now_ms))
    }

    async fn create_group(
        &self,
        owner: &str,
        name: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<(ConversationRecord, Appended), ChatError> {
        with_retries!(
            in_transaction!(self.pool, tx => Self::create_group_in(&mut tx, owner, name, members, now_ms))
        )
    }

    async fn get_conversation(&self, id: u64) -> Result<Option<ConversationRecord>, ChatError> {
        let mut conn = self.pool.acquire().await.db()?;
        load_conversation(&mut conn, id, false).await
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
        with_retries!(in_transaction!(self.pool, tx => Self::change_members_in(
            &mut tx,
            conversation_id,
            actor,
            change,
            users,
            max_members,
            now_ms
        )))
    }

    async fn revise(&self, r: &Revision) -> Result<Option<Appended>, ChatError> {
        with_retries!(in_transaction!(self.pool, tx => Self::revise_in(&mut tx, r)))
    }

    async fn edit_history(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<Vec<EditRecord>, ChatError> {
        let mut conn = self.pool.acquire().await.db()?;
        let id: Option<i64> =
            sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1 AND seq = $2")
                .bind(conversation_id as i64)
                .bind(seq as i64)
                .fetch_optional(&mut *conn)
                .await
                .db()?;
        let id = id.ok_or_else(|| no_message(conversation_id, seq))?;
        let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
            "SELECT content, replaced_at FROM message_edits WHERE message_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        rows.into_iter().map(EditRecord::from_row).collect()
    }

    async fn prune_edits(&self, before_ms: i64) -> Result<u64, ChatError> {
        let done = sqlx::query("DELETE FROM message_edits WHERE replaced_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(done.rows_affected())
    }

    async fn list_conversations(&self, user: &str) -> Result<Vec<ConversationRecord>, ChatError> {
        let mut conn = self.pool.acquire().await.db()?;
        // The newest message of each: one probe of (conversation_id, seq)
        // at its last_seq (gone when retention removed it).
        let rows = sqlx::query(concat!(
            "SELECT c.id, c.kind, c.name, c.owner, c.last_seq, me.muted_until, me.pinned, \
                    parley_read(c.kind, c.direct_key, c.sent_low, c.sent_high, me.user_id, \
                                me.read_seq), \
                    c.created_at, peer.read_seq, ",
            message_columns!(),
            " FROM conversations c \
             JOIN members me ON me.conversation_id = c.id \
             LEFT JOIN LATERAL (SELECT parley_read(c.kind, c.direct_key, c.sent_low, \
                 c.sent_high, p.user_id, p.read_seq) AS read_seq FROM members p \
                 WHERE c.kind = 1 AND p.conversation_id = c.id AND p.user_id <> me.user_id \
                 LIMIT 1) peer ON TRUE \
             LEFT JOIN messages m ON m.conversation_id = c.id AND m.seq = c.last_seq \
             WHERE me.user_id = $1 ORDER BY c.id"
        ))
        .bind(user)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .db()?;
        let mut members = members_of(&mut conn, &ids).await?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get(0).db()?;
                let has_message = r.try_get::<Option<i64>, _>(10).db()?.is_some();
                let last_message = has_message.then(|| message_from_row(r, 10)).transpose()?;
                let created_at: i64 = r.try_get(8).db()?;
                Ok(ConversationRecord {
                    id: id as u64,
                    kind: kind_from_i16(r.try_get(1).db()?),
                    name: r.try_get(2).db()?,
                    owner: r.try_get(3).db()?,
                    members: members.remove(&(id as u64)).unwrap_or_default(),
                    last_seq: r.try_get::<i64, _>(4).db()? as u64,
                    muted_until_ms: r.try_get(5).db()?,
                    pinned: r.try_get(6).db()?,
                    read_seq: r.try_get::<i64, _>(7).db()? as u64,
                    peer_read_seq: r.try_get::<Option<i64>, _>(9).db()?.unwrap_or(0) as u64,
                    last_activity_ms: last_message
                        .as_ref()
                        .map_or(created_at, |m| m.server_time_ms),
                    last_message,
                })
            })
            .collect()
    }

    async fn mark_read(
        &self,
        conversation_id: u64,
        user: &str,
        seq: u64,
    ) -> Result<ReadMark, ChatError> {
        // One statement: the marker moves only forward, to at most the
        // newest message (the row is checked again under its lock).
        let row: Option<(i64, Option<i64>)> = sqlx::query_as(
            "WITH me AS ( \
                 SELECT parley_read(c.kind, c.direct_key, c.sent_low, c.sent_high, \
                                    mb.user_id, mb.read_seq) AS read_seq, \
                        LEAST($3, c.last_seq) AS wanted \
                 FROM members mb JOIN conversations c ON c.id = mb.conversation_id \
                 WHERE mb.conversation_id = $1 AND mb.user_id = $2 \
             ), moved AS ( \
                 UPDATE members mb SET read_seq = me.wanted FROM me \
                 WHERE mb.conversation_id = $1 AND mb.user_id = $2 AND mb.read_seq < me.wanted \
                   AND me.read_seq < me.wanted \
                 RETURNING mb.read_seq \
             ) SELECT me.read_seq, (SELECT read_seq FROM moved) FROM me",
        )
        .bind(conversation_id as i64)
        .bind(user)
        .bind(seq.min(i64::MAX as u64) as i64)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        let (_, moved) = row.ok_or(ChatError::NotMember(conversation_id))?;
        if let Some(now) = moved {
            return Ok(ReadMark {
                seq: now as u64,
                moved: true,
            });
        }
        // Not moved: a concurrent MarkRead may have moved it further since
        // the statement's snapshot, so read it as it stands.
        let now: Option<i64> = sqlx::query_scalar(
            "SELECT parley_read(c.kind, c.direct_key, c.sent_low, c.sent_high, mb.user_id, \
                                mb.read_seq) \
             FROM members mb JOIN conversations c ON c.id = mb.conversation_id \
             WHERE mb.conversation_id = $1 AND mb.user_id = $2",
        )
        .bind(conversation_id as i64)
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        let now = now.ok_or(ChatError::NotMember(conversation_id))?;
        Ok(ReadMark {
            seq: now as u64,
            moved: false,
        })
    }

    async fn read_markers(&self, conversation_id: u64) -> Result<Vec<(String, u64)>, ChatError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT mb.user_id, parley_read(c.kind, c.direct_key, c.sent_low, c.sent_high, \
                                           mb.user_id, mb.read_seq) \
             FROM members mb JOIN conversations c ON c.id = mb.conversation_id \
             WHERE mb.conversation_id = $1 ORDER BY mb.user_id",
        )
        .bind(conversation_id as i64)
        .fetch_all(&self.pool)
        .await
        .db()?;
        Ok(rows.into_iter().map(|(u, r)| (u, r as u64)).collect())
    }

    async fn is_member(&self, conversation_id: u64, user: &str) -> Result<bool, ChatError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2")
                .bind(conversation_id as i64)
                .bind(user)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(found.is_some())
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        with_retries!(append::append(&self.pool, &batch).await)
    }

    async fn inbox_after(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<InboxPage, ChatError> {
        // REPEATABLE READ: the head and the page come from one snapshot.
        let mut tx = self.pool.begin().await.db()?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .db()?;
        let head: Option<i64> = sqlx::query_scalar("SELECT inbox_head FROM users WHERE id = $1")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        let rows = sqlx::query(concat!(
            "SELECT i.seq, ",
            message_columns!(),
            " FROM inbox i JOIN messages m ON m.id = i.message_id \
             WHERE i.user_id = $1 AND i.seq > $2 ORDER BY i.seq LIMIT $3"
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
        let head: Option<i64> = sqlx::query_scalar("SELECT inbox_head FROM users WHERE id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
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
        let mut conn = self.pool.acquire().await.db()?;
        let sql = match direction {
            pb::Direction::Backward => concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.conversation_id = $1 AND m.seq < $2 \
                 ORDER BY m.seq DESC LIMIT $3"
            ),
            pb::Direction::Forward => concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.conversation_id = $1 AND m.seq > $2 \
                 ORDER BY m.seq LIMIT $3"
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
            sqlx::query_scalar("SELECT MIN(seq) FROM messages WHERE conversation_id = $1")
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
        if cursors.is_empty() {
            return Ok(());
        }
        let users: Vec<&str> = cursors.iter().map(|c| c.user.as_str()).collect();
        let devices: Vec<&str> = cursors.iter().map(|c| c.device.as_str()).collect();
        let positions: Vec<i64> = cursors.iter().map(|c| c.cursor as i64).collect();
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, cursor, last_seen) \
             SELECT u, d, c, $4 FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS t(u, d, c) \
             ON CONFLICT (user_id, device_id) DO UPDATE \
             SET cursor = GREATEST(devices.cursor, excluded.cursor), last_seen = excluded.last_seen",
        )
        .bind(&users)
        .bind(&devices)
        .bind(&positions)
        .bind(now_ms)
        .execute(&self.pool)
        .await.db()?;
        Ok(())
    }

    async fn get_cursor(&self, user: &str, device: &str) -> Result<Option<u64>, ChatError> {
        let cursor: Option<i64> =
            sqlx::query_scalar("SELECT cursor FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user)
                .bind(device)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(cursor.map(|c| c as u64))
    }

    async fn log_out(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), ChatError> {
        let mut tx = self.pool.begin().await.db()?;
        // Against a push registration racing it (see put_push_token).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(user)
            .execute(&mut *tx)
            .await
            .db()?;
        let done = match device {
            None => {
                sqlx::query("UPDATE users SET revoked_at = GREATEST(revoked_at, $1) WHERE id = $2")
                    .bind(at_ms)
                    .bind(user)
                    .execute(&mut *tx)
                    .await
                    .db()?
            }
            // Only for a user that exists.
            Some(device) => sqlx::query(
                "INSERT INTO log_outs (user_id, device_id, revoked_at) \
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1) \
                 ON CONFLICT (user_id, device_id) DO UPDATE \
                 SET revoked_at = GREATEST(log_outs.revoked_at, excluded.revoked_at)",
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
            "DELETE FROM push_tokens WHERE user_id = $1 AND ($2::text IS NULL OR device_id = $2)",
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
            "SELECT id, NULL, revoked_at FROM users WHERE revoked_at > 0 AND revoked_at >= $1 \
             UNION ALL SELECT user_id, device_id, revoked_at FROM log_outs WHERE revoked_at >= $1 \
             ORDER BY 3 LIMIT $2",
        )
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .db()?;
        Ok(rows.into_iter().map(Revocation::from_row).collect())
    }

    async fn logged_out_at(&self, user: &str, device: &str) -> Result<Option<i64>, ChatError> {
        sqlx::query_scalar(
            "SELECT GREATEST(u.revoked_at, COALESCE(l.revoked_at, 0)) FROM users u \
             LEFT JOIN log_outs l ON l.user_id = u.id AND l.device_id = $2 WHERE u.id = $1",
        )
        .bind(user)
        .bind(device)
        .fetch_optional(&self.pool)
        .await
        .db()
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceRecord>, ChatError> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT k.device_id, COALESCE(d.cursor, 0), COALESCE(d.last_seen, 0), GREATEST(COALESCE(l.revoked_at, 0), u.revoked_at) \
             FROM (SELECT device_id FROM devices WHERE user_id = $1 \
             UNION SELECT device_id FROM log_outs WHERE user_id = $1 \
             UNION SELECT device_id FROM refresh_tokens WHERE user_id = $1) k \
             JOIN users u ON u.id = $1 LEFT JOIN devices d ON d.user_id = $1 AND d.device_id = k.device_id \
             LEFT JOIN log_outs l ON l.user_id = $1 AND l.device_id = k.device_id \
             ORDER BY k.device_id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .db()?;
        Ok(rows.into_iter().map(DeviceRecord::from_row).collect())
    }

    async fn put_refresh(&self, record: &RefreshRecord) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO refresh_tokens \
             (user_id, device_id, digest, previous, created_at, rotated_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
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
        .execute(&self.pool)
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
             WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user)
        .bind(device)
        .fetch_optional(&self.pool)
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
            "UPDATE refresh_tokens SET previous = digest, digest = $4, rotated_at = $5, \
             expires_at = $6 WHERE user_id = $1 AND device_id = $2 AND digest = $3",
        )
        .bind(user)
        .bind(device)
        .bind(current)
        .bind(next)
        .bind(now_ms)
        .bind(expires_at_ms)
        .execute(&self.pool)
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
            sqlx::query(
                "INSERT INTO blocks (user_id, blocked_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(user)
            .bind(other)
            .bind(now_ms)
            .execute(&self.pool)
            .await.db()?;
        } else {
            sqlx::query("DELETE FROM blocks WHERE user_id = $1 AND blocked_id = $2")
                .bind(user)
                .bind(other)
                .execute(&self.pool)
                .await
                .db()?;
        }
        Ok(())
    }

    async fn is_blocked(&self, user: &str, by: &str) -> Result<bool, ChatError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM blocks WHERE user_id = $1 AND blocked_id = $2")
                .bind(by)
                .bind(user)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        Ok(found.is_some())
    }

    async fn blocks_of(&self, user: &str) -> Result<Vec<String>, ChatError> {
        sqlx::query_scalar("SELECT blocked_id FROM blocks WHERE user_id = $1 ORDER BY blocked_id")
            .bind(user)
            .fetch_all(&self.pool)
            .await
            .db()
    }

    async fn blockers_of(&self, actor: &str, users: &[String]) -> Result<Vec<String>, ChatError> {
        sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM blocks WHERE user_id = ANY($1) AND blocked_id = $2 \
             ORDER BY user_id",
        )
        .bind(users)
        .bind(actor)
        .fetch_all(&self.pool)
        .await
        .db()
    }

    async fn put_push_token(
        &self,
        t: &PushTokenRecord,
        session_since_ms: i64,
    ) -> Result<bool, ChatError> {
        // The token leaves any other device first: the unique index on it
        // would refuse the insert otherwise. Two devices registering the
        // same token at once take turns on a lock of the token, and a
        // registration and a log-out of the user on a lock of the user, so
        // that the log-out either comes first (and is seen here) or
        // deletes what this wrote.
        let mut tx = self.pool.begin().await.db()?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0)), \
             pg_advisory_xact_lock(hashtextextended($2, $3))",
        )
        .bind(&t.user)
        .bind(&t.token)
        .bind(t.provider as i64)
        .execute(&mut *tx)
        .await
        .db()?;
        let logged_out: Option<i64> = sqlx::query_scalar(
            "SELECT GREATEST(u.revoked_at, COALESCE(l.revoked_at, 0)) FROM users u \
             LEFT JOIN log_outs l ON l.user_id = u.id AND l.device_id = $2 WHERE u.id = $1",
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
            "DELETE FROM push_tokens WHERE provider = $1 AND token = $2 \
             AND NOT (user_id = $3 AND device_id = $4)",
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
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
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
        sqlx::query("DELETE FROM push_tokens WHERE user_id = $1 AND device_id = $2")
            .bind(user)
            .bind(device)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(())
    }

    async fn drop_push_tokens(&self, dead: &[DeadToken]) -> Result<u64, ChatError> {
        let providers: Vec<i64> = dead.iter().map(|d| d.provider as i64).collect();
        let tokens: Vec<&str> = dead.iter().map(|d| d.token.as_str()).collect();
        let done = sqlx::query(
            "DELETE FROM push_tokens t USING unnest($1::int8[], $2::text[]) AS d(provider, token) \
             WHERE t.provider = d.provider AND t.token = d.token",
        )
        .bind(&providers)
        .bind(&tokens)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(done.rows_affected())
    }

    async fn notification_previews(
        &self,
        user: &str,
        previews: Option<bool>,
    ) -> Result<Option<bool>, ChatError> {
        sqlx::query_scalar(
            "UPDATE users SET push_previews = COALESCE($2, push_previews) WHERE id = $1 \
             RETURNING push_previews",
        )
        .bind(user)
        .bind(previews)
        .fetch_optional(&self.pool)
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
        // Four statements for a whole batch, each over arrays.
        let mut conn = self.pool.acquire().await.db()?;
        let mut audience = PushAudience::default();
        let rows: Vec<(String, String, i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT user_id, device_id, provider, token, topic, locale, updated_at \
             FROM push_tokens WHERE user_id = ANY($1) ORDER BY user_id, device_id",
        )
        .bind(&q.users)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        for row in rows {
            audience.tokens.push(PushTokenRecord::from_row(row)?);
        }
        // The unread of every membership not muted now: a probe of the
        // user's members rows, and of each conversation's row.
        let settings: Vec<(String, bool, i64)> = sqlx::query_as(
            "SELECT u.id, u.push_previews, \
                    COALESCE(SUM(GREATEST(c.last_seq - parley_read(c.kind, c.direct_key, \
                        c.sent_low, c.sent_high, m.user_id, m.read_seq), 0)) \
                             FILTER (WHERE m.muted_until <= $2), 0)::int8 \
             FROM users u \
             LEFT JOIN members m ON m.user_id = u.id \
             LEFT JOIN conversations c ON c.id = m.conversation_id \
             WHERE u.id = ANY($1) GROUP BY u.id",
        )
        .bind(&q.users)
        .bind(q.now_ms)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        for (user, previews, unread) in settings {
            if !previews {
                audience.no_previews.insert(user.clone());
            }
            audience.unread.insert(user, unread.max(0) as u64);
        }
        if !q.conversations.is_empty() {
            let users: Vec<&str> = q.conversations.iter().map(|(u, _)| u.as_str()).collect();
            let ids: Vec<i64> = q.conversations.iter().map(|(_, c)| *c as i64).collect();
            let muted: Vec<(String, i64)> = sqlx::query_as(
                "SELECT m.user_id, m.conversation_id FROM members m \
                 JOIN unnest($1::text[], $2::int8[]) AS q(user_id, conversation_id) \
                 ON m.user_id = q.user_id AND m.conversation_id = q.conversation_id \
                 WHERE m.muted_until > $3",
            )
            .bind(&users)
            .bind(&ids)
            .bind(q.now_ms)
            .fetch_all(&mut *conn)
            .await
            .db()?;
            audience.muted = muted.into_iter().map(|(u, c)| (u, c as u64)).collect();
        }
        let names: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, display_name FROM users WHERE id = ANY($1) AND display_name <> ''",
        )
        .bind(&q.senders)
        .fetch_all(&mut *conn)
        .await
        .db()?;
        audience.names = names.into_iter().collect();
        Ok(audience)
    }

    async fn prune_before(&self, cutoff_ms: i64) -> Result<u64, ChatError> {
        in_transaction!(self.pool, tx => prune_in(&mut tx, cutoff_ms))
    }

    async fn create_blob(&self, blob: &BlobRecord) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO blobs (id, owner, kind, mime, size, sha256, name, state, created_at, \
             upload_expires_at, width, height, thumbnail, last_used) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobRecord>, ChatError> {
        let row: Option<BlobRow> = sqlx::query_as(concat!(
            "SELECT ",
            blob_columns!(),
            " FROM blobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        row.map(BlobRecord::from_row).transpose()
    }

    async fn complete_blob(&self, blob: &BlobRecord) -> Result<bool, ChatError> {
        let done = sqlx::query(
            "UPDATE blobs SET state = 1, sha256 = $2, width = $3, height = $4, thumbnail = $5 \
             WHERE id = $1 AND state = 0",
        )
        .bind(&blob.id)
        .bind(&blob.sha256)
        .bind(i64::from(blob.width))
        .bind(i64::from(blob.height))
        .bind(blob.thumbnail_column())
        .execute(&self.pool)
        .await
        .db()?;
        Ok(done.rows_affected() == 1)
    }

    async fn use_blobs(
        &self,
        uses: &[(String, String)],
        now_ms: i64,
    ) -> Result<Vec<BlobRecord>, ChatError> {
        let (owners, ids): (Vec<&str>, Vec<&str>) =
            uses.iter().map(|(o, i)| (o.as_str(), i.as_str())).unzip();
        let rows: Vec<BlobRow> = sqlx::query_as(concat!(
            "UPDATE blobs b SET last_used = GREATEST(b.last_used, $3) \
             FROM UNNEST($1::text[], $2::text[]) AS u(owner, id) \
             WHERE b.id = u.id AND b.owner = u.owner AND b.state = 1 RETURNING ",
            blob_columns!(b.)
        ))
        .bind(&owners)
        .bind(&ids)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .db()?;
        rows.into_iter().map(BlobRecord::from_row).collect()
    }

    async fn uploads_since(&self, owner: &str, since_ms: i64) -> Result<(u64, u64), ChatError> {
        let (count, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(size), 0)::BIGINT FROM blobs \
             WHERE owner = $1 AND created_at >= $2",
        )
        .bind(owner)
        .bind(since_ms)
        .fetch_one(&self.pool)
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
             (state = 0 AND upload_expires_at < $1) \
             OR (state = 1 AND last_used = 0 AND created_at < $2) \
             OR (state = 1 AND last_used > 0 AND last_used < $3) \
             OR state = 2 LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING id",
        )
        .bind(pending_before_ms)
        .bind(unused_before_ms)
        .bind(used_before_ms.unwrap_or(i64::MIN))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .db()
    }

    async fn delete_blobs(&self, ids: &[String]) -> Result<(), ChatError> {
        sqlx::query("DELETE FROM blobs WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(())
    }
}

/// Removes messages created before `cutoff_ms` and their inbox entries.
async fn prune_in(tx: &mut PgConnection, cutoff_ms: i64) -> Result<u64, ChatError> {
    let newest_old: Option<i64> =
        sqlx::query_scalar("SELECT MAX(id) FROM messages WHERE created_at < $1")
            .bind(cutoff_ms)
            .fetch_one(&mut *tx)
            .await
            .db()?;
    let Some(max_id) = newest_old else {
        return Ok(0);
    };
    for sql in [
        "DELETE FROM inbox WHERE message_id <= $1",
        "DELETE FROM message_edits WHERE message_id <= $1",
    ] {
        sqlx::query(sql).bind(max_id).execute(&mut *tx).await.db()?;
    }
    let done = sqlx::query("DELETE FROM messages WHERE id <= $1")
        .bind(max_id)
        .execute(&mut *tx)
        .await
        .db()?;
    Ok(done.rows_affected())
}
