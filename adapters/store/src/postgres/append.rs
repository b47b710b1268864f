//! Sends in one round trip. `parley_append` (migrations/postgres/
//! 0002_append.sql) judges, numbers and writes a whole batch server side,
//! called as one statement, which is its own transaction: no BEGIN, no
//! COMMIT, no statement per step. Here the batch goes in as arrays and the
//! answers come back one row per message.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use parley_core::ChatError;
use parley_core::store::{Appended, NewMessage};
use parley_proto::pb;
use prost::Message as _;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::Db;

/// Where the answer of a message of the batch comes from.
enum Source {
    /// The message went to the database (its place among those that did).
    Own(usize),
    /// A resend of an earlier message of the batch: that one's answer.
    Same(usize),
}

/// Appends `batch` in one call; an Err is a failure of the whole batch.
pub(super) async fn append(
    pool: &PgPool,
    batch: &[NewMessage],
) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
    let mut first: HashMap<(&str, &str), usize> = HashMap::with_capacity(batch.len());
    let mut unique: Vec<&NewMessage> = Vec::with_capacity(batch.len());
    let sources: Vec<Source> = batch
        .iter()
        .map(
            |m| match first.entry((m.sender_id.as_str(), m.client_msg_id.as_str())) {
                Entry::Occupied(e) => Source::Same(*e.get()),
                Entry::Vacant(e) => {
                    e.insert(unique.len());
                    unique.push(m);
                    Source::Own(unique.len() - 1)
                }
            },
        )
        .collect();

    let n = unique.len();
    let mut conv = Vec::with_capacity(n);
    let mut sender = Vec::with_capacity(n);
    let mut device = Vec::with_capacity(n);
    let mut client = Vec::with_capacity(n);
    let mut content = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for m in &unique {
        conv.push(m.conversation_id as i64);
        sender.push(m.sender_id.as_str());
        device.push(m.sender_device.as_str());
        client.push(m.client_msg_id.as_str());
        content.push(m.content.encode_to_vec());
        created.push(m.now_ms);
    }
    let rows = sqlx::query(
        "SELECT idx, outcome, blocker, msg_id, conv, seq, sender_device, content, created_at, \
         users, inbox_seqs, edited_at, recalled FROM parley_append($1, $2, $3, $4, $5, $6)",
    )
    .bind(&conv)
    .bind(&sender)
    .bind(&device)
    .bind(&client)
    .bind(&content)
    .bind(&created)
    .fetch_all(pool)
    .await
    .db()?;
    if rows.len() != n {
        return Err(ChatError::Corrupt(format!(
            "parley_append answered {} of {n} messages",
            rows.len()
        )));
    }
    let mut answers = rows
        .iter()
        .zip(&unique)
        .map(|(row, m)| answer(row, m).map(Some))
        .collect::<Result<Vec<_>, ChatError>>()?;

    // Resends first (they copy), then every message takes its own answer.
    let mut out: Vec<Option<Result<Appended, ChatError>>> = sources
        .iter()
        .zip(batch)
        .map(|(s, m)| match s {
            Source::Same(k) => Some(same_as(m, answers[*k].as_ref().expect("not taken yet"))),
            Source::Own(_) => None,
        })
        .collect();
    for (slot, s) in out.iter_mut().zip(&sources) {
        if let Source::Own(k) = s {
            *slot = answers[*k].take();
        }
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every message answered"))
        .collect())
}

/// The answer to a send `m` whose id an earlier message of the batch used:
/// the first's answer, as a duplicate or a conflict when it was written.
fn same_as(m: &NewMessage, first: &Result<Appended, ChatError>) -> Result<Appended, ChatError> {
    match first {
        Ok(a) => m.resend_of(a.clone()),
        Err(ChatError::NotMember(c)) => Err(ChatError::NotMember(*c)),
        Err(ChatError::Blocked(by)) => Err(ChatError::Blocked(by.clone())),
        Err(e) => Err(ChatError::Corrupt(format!("unexpected answer: {e}"))),
    }
}

/// One row of `parley_append`: the message's answer. An Err of the outer
/// Result is a row the function should never return.
fn answer(row: &PgRow, m: &NewMessage) -> Result<Result<Appended, ChatError>, ChatError> {
    let outcome: i16 = row.try_get("outcome").db()?;
    let recipients = || -> Result<Vec<(String, u64)>, ChatError> {
        let users: Option<Vec<String>> = row.try_get("users").db()?;
        let seqs: Option<Vec<i64>> = row.try_get("inbox_seqs").db()?;
        Ok(users
            .unwrap_or_default()
            .into_iter()
            .zip(seqs.unwrap_or_default())
            .map(|(u, s)| (u, s as u64))
            .collect())
    };
    let id_and_seq = || -> Result<(u64, u64), ChatError> {
        let msg_id: Option<i64> = row.try_get("msg_id").db()?;
        let seq: Option<i64> = row.try_get("seq").db()?;
        match (msg_id, seq) {
            (Some(id), Some(seq)) => Ok((id as u64, seq as u64)),
            _ => Err(ChatError::Corrupt(
                "a stored message without id or seq".into(),
            )),
        }
    };
    Ok(match outcome {
        0 => {
            let (msg_id, seq) = id_and_seq()?;
            Ok(Appended {
                message: m.stored(msg_id, seq),
                recipients: recipients()?,
                duplicate: false,
            })
        }
        1 => {
            let (msg_id, seq) = id_and_seq()?;
            let bytes: Option<Vec<u8>> = row.try_get("content").db()?;
            let content = pb::Content::decode(bytes.unwrap_or_default().as_slice())
                .map_err(|e| ChatError::Corrupt(format!("message content: {e}")))?;
            let recalled = row
                .try_get::<Option<bool>, _>("recalled")
                .db()?
                .unwrap_or_default();
            m.resend_of(Appended {
                message: pb::Message {
                    msg_id,
                    conversation_id: row
                        .try_get::<Option<i64>, _>("conv")
                        .db()?
                        .unwrap_or_default() as u64,
                    seq,
                    sender_id: m.sender_id.clone(),
                    sender_device: row
                        .try_get::<Option<String>, _>("sender_device")
                        .db()?
                        .unwrap_or_default(),
                    client_msg_id: m.client_msg_id.clone(),
                    server_time_ms: row
                        .try_get::<Option<i64>, _>("created_at")
                        .db()?
                        .unwrap_or_default(),
                    content: (!recalled).then_some(content),
                    edited_at_ms: row
                        .try_get::<Option<i64>, _>("edited_at")
                        .db()?
                        .unwrap_or_default(),
                    recalled,
                },
                recipients: recipients()?,
                duplicate: true,
            })
        }
        2 => Err(ChatError::NotMember(m.conversation_id)),
        3 => Err(ChatError::Blocked(
            row.try_get::<Option<String>, _>("blocker")
                .db()?
                .unwrap_or_default(),
        )),
        other => {
            return Err(ChatError::Corrupt(format!("parley_append outcome {other}")));
        }
    })
}
