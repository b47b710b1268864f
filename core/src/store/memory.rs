//! The store in memory: every rule the SQL stores keep, kept in maps under
//! one lock, so each method is one atomic step as each SQL method is one
//! transaction. It is what the core's own tests run on, and it runs the same
//! conformance suite as SQLite and PostgreSQL (`store::conformance`), so a
//! rule that holds here and not there (or the reverse) shows up as a failing
//! check. Nothing is kept across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use parley_proto::pb;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use super::{
    Appended, ConversationRecord, DeviceCursor, DeviceRecord, HistorySlice, InboxPage,
    MemberSettings, MembershipChange, NewMessage, ReadMark, RefreshRecord, Store, UserRecord,
    direct_key, history_bound, history_page,
};
use crate::bus::Revocation;
use crate::error::ChatError;
use crate::media::{BlobRecord, BlobState};
use crate::membership::{
    changed_members, membership_event, no_such_users, require_group, system_message,
};
use crate::push::{AudienceQuery, DeadToken, PushAudience, PushTokenRecord};
use crate::revision::{Change, EditRecord, Revision, no_message};

/// A store that lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Held for writing while appends stall (`stall_appends`).
    gate: Arc<RwLock<()>>,
}

#[derive(Debug)]
struct User {
    record: UserRecord,
    /// Raised by pruning to the head it removed, so numbers are never
    /// given twice (the SQL stores' `users.inbox_head`).
    inbox_floor: u64,
    /// Its log-out of every device (`users.revoked_at`).
    logged_out_at_ms: i64,
    /// Its notifications show previews (`users.push_previews`).
    previews: bool,
}

/// A device's row (`devices`).
#[derive(Debug, Default)]
struct Device {
    cursor: u64,
    last_seen_ms: i64,
}

#[derive(Debug)]
struct Conversation {
    kind: pb::ConversationKind,
    name: String,
    owner: String,
    members: BTreeSet<String>,
    /// Raised by pruning, as `conversations.last_seq` is.
    seq_floor: u64,
    /// seq → msg_id.
    messages: BTreeMap<u64, u64>,
    created_at_ms: i64,
}

/// A member's own state of a conversation (`members`' columns).
#[derive(Debug, Default, Clone, Copy)]
struct MemberState {
    settings: MemberSettings,
    read_seq: u64,
}

#[derive(Debug)]
struct Stored {
    message: pb::Message,
    /// (user, inbox_seq) of every timeline holding it, by user.
    recipients: Vec<(String, u64)>,
}

#[derive(Debug, Default)]
struct Inner {
    users: HashMap<String, User>,
    conversations: BTreeMap<u64, Conversation>,
    direct: HashMap<String, u64>,
    last_conversation_id: u64,
    messages: BTreeMap<u64, Stored>,
    last_msg_id: u64,
    /// (sender, client_msg_id) → msg_id.
    dedup: HashMap<(String, String), u64>,
    /// user → inbox_seq → msg_id.
    inboxes: HashMap<String, BTreeMap<u64, u64>>,
    /// (user, device) → its row.
    devices: BTreeMap<(String, String), Device>,
    /// (user, device) → its log-out (`log_outs`).
    log_outs: BTreeMap<(String, String), i64>,
    /// (user, device) → its refresh token (`refresh_tokens`).
    refresh: HashMap<(String, String), RefreshRecord>,
    /// (user, blocked).
    blocks: HashSet<(String, String)>,
    /// id → upload (`blobs`).
    blobs: BTreeMap<String, BlobRecord>,
    /// (user, device) → its push token (`push_tokens`).
    push_tokens: BTreeMap<(String, String), PushTokenRecord>,
    /// (conversation, member) → its mute, pin and read marker (`members`);
    /// removed with the membership.
    member_state: HashMap<(u64, String), MemberState>,
    /// msg_id → the texts it had before its edits (`message_edits`).
    edits: HashMap<u64, Vec<EditRecord>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes appends wait until the guard is dropped: a database that has
    /// stopped answering, for tests of what waits on it.
    pub async fn stall_appends(&self) -> OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn missing_users(&self, ids: &[String]) -> Vec<String> {
        ids.iter()
            .filter(|id| !self.users.contains_key(*id))
            .cloned()
            .collect()
    }

    fn record(&self, id: u64) -> Option<ConversationRecord> {
        let c = self.conversations.get(&id)?;
        Some(ConversationRecord {
            id,
            kind: c.kind,
            name: c.name.clone(),
            owner: c.owner.clone(),
            members: c.members.iter().cloned().collect(),
            last_seq: last_seq(c),
            ..ConversationRecord::default()
        })
    }

    /// A member's state, to change; None when `user` is not in the
    /// conversation.
    fn member_mut(&mut self, conversation_id: u64, user: &str) -> Option<&mut MemberState> {
        let member = self
            .conversations
            .get(&conversation_id)
            .is_some_and(|c| c.members.contains(user));
        if !member {
            return None;
        }
        Some(
            self.member_state
                .entry((conversation_id, user.to_owned()))
                .or_default(),
        )
    }

    fn inbox_head(&self, user: &str) -> u64 {
        let floor = self.users.get(user).map_or(0, |u| u.inbox_floor);
        let newest = self
            .inboxes
            .get(user)
            .and_then(|i| i.last_key_value())
            .map_or(0, |(seq, _)| *seq);
        floor.max(newest)
    }

    /// Gives `msg_id` the next inbox sequence number of `user`.
    fn add_inbox_entry(&mut self, user: &str, msg_id: u64) -> u64 {
        let seq = self.inbox_head(user) + 1;
        self.inboxes
            .entry(user.to_owned())
            .or_default()
            .insert(seq, msg_id);
        if let Some(stored) = self.messages.get_mut(&msg_id) {
            stored.recipients.push((user.to_owned(), seq));
            stored.recipients.sort();
        }
        seq
    }

    /// Writes `m` at the conversation's next seq, with an inbox entry for
    /// every member. The conversation exists.
    fn insert_message(&mut self, m: &NewMessage) -> Appended {
        let conv = self
            .conversations
            .get_mut(&m.conversation_id)
            .expect("the caller checked the conversation");
        let seq = last_seq(conv) + 1;
        self.last_msg_id += 1;
        let msg_id = self.last_msg_id;
        conv.messages.insert(seq, msg_id);
        let members: Vec<String> = conv.members.iter().cloned().collect();
        let message = m.stored(msg_id, seq);
        // Whoever writes a message has read the conversation up to it.
        if let Some(state) = self.member_mut(m.conversation_id, &m.sender_id) {
            state.read_seq = state.read_seq.max(seq);
        }
        self.messages.insert(
            msg_id,
            Stored {
                message: message.clone(),
                recipients: Vec::with_capacity(members.len()),
            },
        );
        self.dedup
            .insert((m.sender_id.clone(), m.client_msg_id.clone()), msg_id);
        let recipients = members
            .into_iter()
            .map(|user| {
                let seq = self.add_inbox_entry(&user, msg_id);
                (user, seq)
            })
            .collect();
        Appended {
            message,
            recipients,
            duplicate: false,
        }
    }

    fn append_one(&mut self, m: &NewMessage) -> Result<Appended, ChatError> {
        let key = (m.sender_id.clone(), m.client_msg_id.clone());
        if let Some(stored) = self.dedup.get(&key).and_then(|id| self.messages.get(id)) {
            return m.resend_of(Appended {
                message: stored.message.clone(),
                recipients: stored.recipients.clone(),
                duplicate: true,
            });
        }
        let Some(conv) = self.conversations.get(&m.conversation_id) else {
            return Err(ChatError::NotMember(m.conversation_id));
        };
        if !conv.members.contains(&m.sender_id) {
            return Err(ChatError::NotMember(m.conversation_id));
        }
        if conv.kind == pb::ConversationKind::Direct {
            let blocked_by = conv.members.iter().find(|peer| {
                **peer != m.sender_id
                    && self
                        .blocks
                        .contains(&((*peer).clone(), m.sender_id.clone()))
            });
            if let Some(peer) = blocked_by {
                return Err(ChatError::Blocked(peer.clone()));
            }
        }
        Ok(self.insert_message(m))
    }

    /// Appends a server-written event to a conversation that exists.
    fn append_system(
        &mut self,
        conversation_id: u64,
        actor: &str,
        event: pb::SystemEvent,
        now_ms: i64,
    ) -> Appended {
        let seq = self.conversations.get(&conversation_id).map_or(0, last_seq) + 1;
        let m = system_message(conversation_id, seq, actor, event, now_ms);
        self.insert_message(&m)
    }

    fn new_conversation(
        &mut self,
        kind: pb::ConversationKind,
        name: &str,
        owner: &str,
        members: BTreeSet<String>,
        now_ms: i64,
    ) -> u64 {
        self.last_conversation_id += 1;
        let id = self.last_conversation_id;
        self.conversations.insert(
            id,
            Conversation {
                kind,
                name: name.to_owned(),
                owner: owner.to_owned(),
                members,
                seq_floor: 0,
                messages: BTreeMap::new(),
                created_at_ms: now_ms,
            },
        );
        id
    }
}

/// A conversation's newest seq: its newest message, or the floor pruning
/// left.
fn last_seq(c: &Conversation) -> u64 {
    let newest = c.messages.last_key_value().map_or(0, |(seq, _)| *seq);
    c.seq_floor.max(newest)
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_user(
        &self,
        id: &str,
        display_name: &str,
        now_ms: i64,
    ) -> Result<UserRecord, ChatError> {
        let mut s = self.lock();
        if s.users.contains_key(id) {
            return Err(ChatError::Conflict(format!("user {id} already exists")));
        }
        let record = UserRecord {
            id: id.to_owned(),
            display_name: display_name.to_owned(),
            created_at_ms: now_ms,
        };
        s.users.insert(
            id.to_owned(),
            User {
                record: record.clone(),
                inbox_floor: 0,
                logged_out_at_ms: 0,
                previews: true,
            },
        );
        Ok(record)
    }

    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>, ChatError> {
        Ok(self.lock().users.get(id).map(|u| u.record.clone()))
    }

    async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, ChatError> {
        Ok(self.lock().missing_users(ids))
    }

    async fn open_direct(
        &self,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<ConversationRecord, ChatError> {
        let key = direct_key(a, b);
        let mut s = self.lock();
        let id = match s.direct.get(&key) {
            Some(id) => *id,
            None => {
                let missing = s.missing_users(&[a.to_owned(), b.to_owned()]);
                if !missing.is_empty() {
                    return Err(no_such_users(&missing));
                }
                let members = BTreeSet::from([a.to_owned(), b.to_owned()]);
                let id = s.new_conversation(pb::ConversationKind::Direct, "", "", members, now_ms);
                s.direct.insert(key, id);
                id
            }
        };
        Ok(s.record(id).expect("conversation just read or written"))
    }

    async fn create_group(
        &self,
        owner: &str,
        name: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<(ConversationRecord, Appended), ChatError> {
        let mut s = self.lock();
        let missing = s.missing_users(members);
        if !missing.is_empty() {
            return Err(no_such_users(&missing));
        }
        let set = members.iter().cloned().collect();
        let id = s.new_conversation(pb::ConversationKind::Group, name, owner, set, now_ms);
        let event = pb::SystemEvent {
            kind: pb::SystemEventKind::GroupCreated as i32,
            actor: owner.to_owned(),
            users: members.to_vec(),
        };
        let appended = s.append_system(id, owner, event, now_ms);
        Ok((s.record(id).expect("group just written"), appended))
    }

    async fn get_conversation(&self, id: u64) -> Result<Option<ConversationRecord>, ChatError> {
        Ok(self.lock().record(id))
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
        let mut s = self.lock();
        let before = require_group(s.record(conversation_id), conversation_id)?;
        if change == MembershipChange::Add {
            let missing = s.missing_users(users);
            if !missing.is_empty() {
                return Err(no_such_users(&missing));
            }
        }
        let changed = changed_members(&before, change, users, max_members)?;
        if changed.is_empty() {
            return Ok((before, None));
        }
        let members = &mut s
            .conversations
            .get_mut(&conversation_id)
            .expect("read above")
            .members;
        for u in &changed {
            if change == MembershipChange::Add {
                members.insert(u.clone());
            } else {
                members.remove(u);
            }
        }
        for u in &changed {
            let key = (conversation_id, u.clone());
            if change == MembershipChange::Add {
                // What came before the member joined is not theirs to read.
                let state = MemberState {
                    read_seq: before.last_seq,
                    ..MemberState::default()
                };
                s.member_state.insert(key, state);
            } else {
                s.member_state.remove(&key);
            }
        }
        let event = membership_event(change, actor, &changed);
        let mut appended = s.append_system(conversation_id, actor, event, now_ms);
        if change != MembershipChange::Add {
            // Those who left still learn that they did, on their other devices.
            for u in changed {
                let seq = s.add_inbox_entry(&u, appended.message.msg_id);
                appended.recipients.push((u, seq));
            }
        }
        let after = s.record(conversation_id).expect("conversation exists");
        Ok((after, Some(appended)))
    }

    async fn list_conversations(&self, user: &str) -> Result<Vec<ConversationRecord>, ChatError> {
        let s = self.lock();
        Ok(s.conversations
            .iter()
            .filter(|(_, c)| c.members.contains(user))
            .filter_map(|(id, conv)| {
                let record = s.record(*id)?;
                let state = |u: &str| {
                    s.member_state
                        .get(&(*id, u.to_owned()))
                        .copied()
                        .unwrap_or_default()
                };
                let mine = state(user);
                let peer_read_seq = match conv.kind {
                    pb::ConversationKind::Direct => record
                        .members
                        .iter()
                        .find(|m| *m != user)
                        .map_or(0, |peer| state(peer).read_seq),
                    _ => 0,
                };
                let last_message = conv
                    .messages
                    .last_key_value()
                    .and_then(|(_, msg_id)| s.messages.get(msg_id))
                    .map(|stored| stored.message.clone());
                let last_activity_ms = last_message
                    .as_ref()
                    .map_or(conv.created_at_ms, |m| m.server_time_ms);
                Some(ConversationRecord {
                    muted_until_ms: mine.settings.muted_until_ms,
                    pinned: mine.settings.pinned,
                    read_seq: mine.read_seq,
                    peer_read_seq,
                    last_message,
                    last_activity_ms,
                    ..record
                })
            })
            .collect())
    }

    async fn mark_read(
        &self,
        conversation_id: u64,
        user: &str,
        seq: u64,
    ) -> Result<ReadMark, ChatError> {
        let mut s = self.lock();
        let newest = s.conversations.get(&conversation_id).map_or(0, last_seq);
        let state = s
            .member_mut(conversation_id, user)
            .ok_or(ChatError::NotMember(conversation_id))?;
        let wanted = seq.min(newest);
        let moved = wanted > state.read_seq;
        state.read_seq = state.read_seq.max(wanted);
        Ok(ReadMark {
            seq: state.read_seq,
            moved,
        })
    }

    async fn read_markers(&self, conversation_id: u64) -> Result<Vec<(String, u64)>, ChatError> {
        let s = self.lock();
        let Some(conv) = s.conversations.get(&conversation_id) else {
            return Ok(Vec::new());
        };
        Ok(conv
            .members
            .iter()
            .map(|u| {
                let key = (conversation_id, u.clone());
                let read = s.member_state.get(&key).map_or(0, |m| m.read_seq);
                (u.clone(), read)
            })
            .collect())
    }

    async fn is_member(&self, conversation_id: u64, user: &str) -> Result<bool, ChatError> {
        Ok(self
            .lock()
            .conversations
            .get(&conversation_id)
            .is_some_and(|c| c.members.contains(user)))
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        let _open = self.gate.read().await;
        let mut s = self.lock();
        Ok(batch.iter().map(|m| s.append_one(m)).collect())
    }

    async fn revise(&self, r: &Revision) -> Result<Option<Appended>, ChatError> {
        let mut s = self.lock();
        let not_found = || no_message(r.conversation_id, r.seq);
        let conv = s
            .conversations
            .get(&r.conversation_id)
            .ok_or_else(not_found)?;
        let msg_id = *conv.messages.get(&r.seq).ok_or_else(not_found)?;
        let members: Vec<String> = conv.members.iter().cloned().collect();
        let stored = s.messages.get_mut(&msg_id).ok_or_else(not_found)?;
        let Some(revised) = r.apply(&stored.message)? else {
            return Ok(None);
        };
        let before = std::mem::replace(&mut stored.message, revised.clone());
        match &r.change {
            Change::Edit(_) => s.edits.entry(msg_id).or_default().push(EditRecord {
                content: before.content.unwrap_or_default(),
                replaced_at_ms: r.now_ms,
            }),
            Change::Recall => {
                s.edits.remove(&msg_id);
            }
        }
        // Each member's timeline gets the message again, at its next place
        // (not among the original's recipients, which resends answer with).
        let recipients = members
            .into_iter()
            .map(|user| {
                let seq = s.inbox_head(&user) + 1;
                s.inboxes
                    .entry(user.clone())
                    .or_default()
                    .insert(seq, msg_id);
                (user, seq)
            })
            .collect();
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
        let s = self.lock();
        let msg_id = s
            .conversations
            .get(&conversation_id)
            .and_then(|c| c.messages.get(&seq))
            .ok_or_else(|| no_message(conversation_id, seq))?;
        Ok(s.edits.get(msg_id).cloned().unwrap_or_default())
    }

    async fn prune_edits(&self, before_ms: i64) -> Result<u64, ChatError> {
        let mut s = self.lock();
        let mut gone = 0;
        s.edits.retain(|_, list| {
            let n = list.len();
            list.retain(|e| e.replaced_at_ms >= before_ms);
            gone += (n - list.len()) as u64;
            !list.is_empty()
        });
        Ok(gone)
    }

    async fn inbox_after(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<InboxPage, ChatError> {
        let s = self.lock();
        let entries = s
            .inboxes
            .get(user)
            .map(|inbox| {
                inbox
                    .range(after.saturating_add(1)..)
                    .filter_map(|(seq, id)| Some((*seq, s.messages.get(id)?.message.clone())))
                    .take(limit as usize)
                    .collect()
            })
            .unwrap_or_default();
        Ok(InboxPage {
            entries,
            head: s.inbox_head(user),
        })
    }

    async fn inbox_head(&self, user: &str) -> Result<u64, ChatError> {
        Ok(self.lock().inbox_head(user))
    }

    async fn history(
        &self,
        conversation_id: u64,
        from_seq: u64,
        direction: pb::Direction,
        limit: u32,
    ) -> Result<HistorySlice, ChatError> {
        let s = self.lock();
        let Some(conv) = s.conversations.get(&conversation_id) else {
            return Ok(HistorySlice::default());
        };
        let bound = history_bound(from_seq, direction).max(0) as u64;
        let take = limit as usize + 1;
        let ids: Vec<u64> = match direction {
            pb::Direction::Backward => conv
                .messages
                .range(..bound)
                .rev()
                .take(take)
                .map(|(_, id)| *id)
                .collect(),
            pb::Direction::Forward => conv
                .messages
                .range(bound.saturating_add(1)..)
                .take(take)
                .map(|(_, id)| *id)
                .collect(),
        };
        let (ids, has_more) = history_page(ids, limit, direction);
        Ok(HistorySlice {
            messages: ids
                .iter()
                .filter_map(|id| Some(s.messages.get(id)?.message.clone()))
                .collect(),
            has_more,
            oldest_available_seq: conv.messages.first_key_value().map_or(0, |(seq, _)| *seq),
        })
    }

    async fn set_cursors(&self, cursors: &[DeviceCursor], now_ms: i64) -> Result<(), ChatError> {
        let mut s = self.lock();
        for c in cursors {
            let d = s
                .devices
                .entry((c.user.clone(), c.device.clone()))
                .or_default();
            d.cursor = d.cursor.max(c.cursor);
            d.last_seen_ms = now_ms;
        }
        Ok(())
    }

    async fn get_cursor(&self, user: &str, device: &str) -> Result<Option<u64>, ChatError> {
        Ok(self
            .lock()
            .devices
            .get(&(user.to_owned(), device.to_owned()))
            .map(|d| d.cursor))
    }

    async fn log_out(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), ChatError> {
        let mut s = self.lock();
        let Some(u) = s.users.get_mut(user) else {
            return Err(ChatError::NotFound(format!("no user {user}")));
        };
        let at = match device {
            None => &mut u.logged_out_at_ms,
            Some(device) => s
                .log_outs
                .entry((user.to_owned(), device.to_owned()))
                .or_default(),
        };
        *at = (*at).max(at_ms);
        s.push_tokens
            .retain(|(u, d), _| u != user || device.is_some_and(|device| d != device));
        Ok(())
    }

    async fn logged_out_at(&self, user: &str, device: &str) -> Result<Option<i64>, ChatError> {
        let s = self.lock();
        let Some(u) = s.users.get(user) else {
            return Ok(None);
        };
        let own = s
            .log_outs
            .get(&(user.to_owned(), device.to_owned()))
            .copied()
            .unwrap_or(0);
        Ok(Some(u.logged_out_at_ms.max(own)))
    }

    async fn log_outs_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, ChatError> {
        let s = self.lock();
        let all = s.users.iter().map(|(u, r)| (u, None, r.logged_out_at_ms));
        let one = s.log_outs.iter().map(|((u, d), at)| (u, Some(d), *at));
        let mut out: Vec<Revocation> = all
            .chain(one)
            .filter(|(_, _, at)| *at > 0 && *at >= since_ms)
            .map(|(u, d, at)| Revocation {
                user: u.clone(),
                device: d.cloned(),
                at_ms: at,
            })
            .collect();
        out.sort_by_key(|r| r.at_ms);
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceRecord>, ChatError> {
        let s = self.lock();
        let all = s.users.get(user).map_or(0, |u| u.logged_out_at_ms);
        let of_user = |(u, _): &&(String, String)| u == user;
        let ids: BTreeSet<&String> = s
            .devices
            .keys()
            .chain(s.log_outs.keys())
            .chain(s.refresh.keys())
            .filter(of_user)
            .map(|(_, d)| d)
            .collect();
        Ok(ids
            .into_iter()
            .map(|device| {
                let key = (user.to_owned(), device.clone());
                let d = s.devices.get(&key);
                DeviceRecord {
                    device: device.clone(),
                    cursor: d.map_or(0, |d| d.cursor),
                    last_seen_ms: d.map_or(0, |d| d.last_seen_ms),
                    logged_out_at_ms: s.log_outs.get(&key).copied().unwrap_or(0).max(all),
                }
            })
            .collect())
    }

    async fn put_refresh(&self, record: &RefreshRecord) -> Result<(), ChatError> {
        let key = (record.user.clone(), record.device.clone());
        self.lock().refresh.insert(key, record.clone());
        Ok(())
    }

    async fn get_refresh(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<RefreshRecord>, ChatError> {
        Ok(self
            .lock()
            .refresh
            .get(&(user.to_owned(), device.to_owned()))
            .cloned())
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
        let mut s = self.lock();
        let Some(r) = s.refresh.get_mut(&(user.to_owned(), device.to_owned())) else {
            return Ok(false);
        };
        if r.digest != current {
            return Ok(false);
        }
        r.previous = std::mem::replace(&mut r.digest, next.to_vec());
        r.rotated_at_ms = now_ms;
        r.expires_at_ms = expires_at_ms;
        Ok(true)
    }

    async fn set_block(
        &self,
        user: &str,
        other: &str,
        blocked: bool,
        _now_ms: i64,
    ) -> Result<(), ChatError> {
        let mut s = self.lock();
        let pair = (user.to_owned(), other.to_owned());
        if blocked {
            s.blocks.insert(pair);
        } else {
            s.blocks.remove(&pair);
        }
        Ok(())
    }

    async fn is_blocked(&self, user: &str, by: &str) -> Result<bool, ChatError> {
        Ok(self
            .lock()
            .blocks
            .contains(&(by.to_owned(), user.to_owned())))
    }

    async fn blocks_of(&self, user: &str) -> Result<Vec<String>, ChatError> {
        let mut out: Vec<String> = self
            .lock()
            .blocks
            .iter()
            .filter(|(by, _)| by == user)
            .map(|(_, blocked)| blocked.clone())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn blockers_of(&self, actor: &str, users: &[String]) -> Result<Vec<String>, ChatError> {
        let s = self.lock();
        let mut out: Vec<String> = users
            .iter()
            .filter(|u| s.blocks.contains(&((*u).clone(), actor.to_owned())))
            .cloned()
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    async fn put_push_token(
        &self,
        token: &PushTokenRecord,
        session_since_ms: i64,
    ) -> Result<bool, ChatError> {
        let mut s = self.lock();
        let Some(all) = s.users.get(&token.user).map(|u| u.logged_out_at_ms) else {
            return Ok(false);
        };
        let own = s
            .log_outs
            .get(&(token.user.clone(), token.device.clone()))
            .copied()
            .unwrap_or(0);
        if all.max(own) >= session_since_ms {
            return Ok(false);
        }
        s.push_tokens
            .retain(|_, t| t.provider != token.provider || t.token != token.token);
        s.push_tokens
            .insert((token.user.clone(), token.device.clone()), token.clone());
        Ok(true)
    }

    async fn delete_push_token(&self, user: &str, device: &str) -> Result<(), ChatError> {
        self.lock()
            .push_tokens
            .remove(&(user.to_owned(), device.to_owned()));
        Ok(())
    }

    async fn drop_push_tokens(&self, dead: &[DeadToken]) -> Result<u64, ChatError> {
        let mut s = self.lock();
        let before = s.push_tokens.len();
        s.push_tokens.retain(|_, t| {
            !dead
                .iter()
                .any(|d| d.provider == t.provider && d.token == t.token)
        });
        Ok((before - s.push_tokens.len()) as u64)
    }

    async fn notification_previews(
        &self,
        user: &str,
        previews: Option<bool>,
    ) -> Result<Option<bool>, ChatError> {
        let mut s = self.lock();
        Ok(s.users.get_mut(user).map(|u| {
            if let Some(p) = previews {
                u.previews = p;
            }
            u.previews
        }))
    }

    async fn mute(
        &self,
        conversation_id: u64,
        user: &str,
        until_ms: i64,
    ) -> Result<MemberSettings, ChatError> {
        let mut s = self.lock();
        let state = s
            .member_mut(conversation_id, user)
            .ok_or(ChatError::NotMember(conversation_id))?;
        state.settings.muted_until_ms = until_ms;
        Ok(state.settings)
    }

    async fn pin(
        &self,
        conversation_id: u64,
        user: &str,
        pinned: bool,
    ) -> Result<MemberSettings, ChatError> {
        let mut s = self.lock();
        let state = s
            .member_mut(conversation_id, user)
            .ok_or(ChatError::NotMember(conversation_id))?;
        state.settings.pinned = pinned;
        Ok(state.settings)
    }

    async fn push_audience(&self, q: &AudienceQuery) -> Result<PushAudience, ChatError> {
        let s = self.lock();
        let mut audience = PushAudience::default();
        for user in &q.users {
            audience.tokens.extend(
                s.push_tokens
                    .range((user.clone(), String::new())..)
                    .take_while(|((u, _), _)| u == user)
                    .map(|(_, t)| t.clone()),
            );
            let Some(u) = s.users.get(user) else { continue };
            if !u.previews {
                audience.no_previews.insert(user.clone());
            }
            let unread = s
                .conversations
                .iter()
                .filter(|(_, c)| c.members.contains(user))
                .map(|(id, c)| {
                    let state = s
                        .member_state
                        .get(&(*id, user.clone()))
                        .copied()
                        .unwrap_or_default();
                    if state.settings.muted_until_ms > q.now_ms {
                        0
                    } else {
                        last_seq(c).saturating_sub(state.read_seq)
                    }
                })
                .sum();
            audience.unread.insert(user.clone(), unread);
        }
        for (user, conversation) in &q.conversations {
            if s.member_state
                .get(&(*conversation, user.clone()))
                .is_some_and(|m| m.settings.muted_until_ms > q.now_ms)
            {
                audience.muted.insert((user.clone(), *conversation));
            }
        }
        for sender in &q.senders {
            if let Some(u) = s.users.get(sender)
                && !u.record.display_name.is_empty()
            {
                audience
                    .names
                    .insert(sender.clone(), u.record.display_name.clone());
            }
        }
        Ok(audience)
    }

    async fn prune_before(&self, cutoff_ms: i64) -> Result<u64, ChatError> {
        let mut s = self.lock();
        // As in SQL: everything up to the newest old message's id goes.
        let Some(max_id) = s
            .messages
            .values()
            .filter(|m| m.message.server_time_ms < cutoff_ms)
            .map(|m| m.message.msg_id)
            .max()
        else {
            return Ok(0);
        };
        let kept = s.messages.split_off(&(max_id + 1));
        let gone = std::mem::replace(&mut s.messages, kept);
        for stored in gone.values() {
            let m = &stored.message;
            // Floors first, so no number is given twice.
            if let Some(conv) = s.conversations.get_mut(&m.conversation_id) {
                conv.seq_floor = last_seq(conv);
                conv.messages.remove(&m.seq);
            }
            s.dedup
                .remove(&(m.sender_id.clone(), m.client_msg_id.clone()));
            s.edits.remove(&m.msg_id);
        }
        // Every entry pointing at them goes, revisions' too; the heads
        // stay where they were.
        let users: Vec<String> = s.inboxes.keys().cloned().collect();
        for user in users {
            let head = s.inbox_head(&user);
            if let Some(u) = s.users.get_mut(&user) {
                u.inbox_floor = head;
            }
            if let Some(inbox) = s.inboxes.get_mut(&user) {
                inbox.retain(|_, id| !gone.contains_key(id));
            }
        }
        Ok(gone.len() as u64)
    }

    async fn create_blob(&self, blob: &BlobRecord) -> Result<(), ChatError> {
        let mut s = self.lock();
        if s.blobs.contains_key(&blob.id) {
            return Err(ChatError::Conflict(format!("blob {} exists", blob.id)));
        }
        s.blobs.insert(blob.id.clone(), blob.clone());
        Ok(())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobRecord>, ChatError> {
        Ok(self.lock().blobs.get(id).cloned())
    }

    async fn complete_blob(&self, blob: &BlobRecord) -> Result<bool, ChatError> {
        let mut s = self.lock();
        match s.blobs.get_mut(&blob.id) {
            Some(b) if b.state == BlobState::Pending => {
                b.state = BlobState::Ready;
                b.sha256.clone_from(&blob.sha256);
                b.width = blob.width;
                b.height = blob.height;
                b.thumbnail.clone_from(&blob.thumbnail);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn use_blobs(
        &self,
        uses: &[(String, String)],
        now_ms: i64,
    ) -> Result<Vec<BlobRecord>, ChatError> {
        let mut s = self.lock();
        let mut used = Vec::new();
        for (owner, id) in uses {
            if let Some(b) = s.blobs.get_mut(id)
                && b.owner == *owner
                && b.state == BlobState::Ready
            {
                b.last_used_ms = b.last_used_ms.max(now_ms);
                used.push(b.clone());
            }
        }
        Ok(used)
    }

    async fn uploads_since(&self, owner: &str, since_ms: i64) -> Result<(u64, u64), ChatError> {
        let s = self.lock();
        Ok(s.blobs
            .values()
            .filter(|b| b.owner == owner && b.created_at_ms >= since_ms)
            .fold((0, 0), |(n, bytes), b| (n + 1, bytes + b.size_bytes)))
    }

    async fn doom_blobs(
        &self,
        pending_before_ms: i64,
        unused_before_ms: i64,
        used_before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<String>, ChatError> {
        let mut s = self.lock();
        let mut doomed = Vec::new();
        for b in s.blobs.values_mut() {
            if doomed.len() >= limit as usize {
                break;
            }
            let stale = match b.state {
                BlobState::Pending => b.upload_expires_at_ms < pending_before_ms,
                BlobState::Ready if b.last_used_ms == 0 => b.created_at_ms < unused_before_ms,
                BlobState::Ready => used_before_ms.is_some_and(|t| b.last_used_ms < t),
                BlobState::Deleting => true,
            };
            if stale {
                b.state = BlobState::Deleting;
                doomed.push(b.id.clone());
            }
        }
        Ok(doomed)
    }

    async fn delete_blobs(&self, ids: &[String]) -> Result<(), ChatError> {
        let mut s = self.lock();
        for id in ids {
            s.blobs.remove(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryStore;

    async fn open() -> ((), MemoryStore) {
        ((), MemoryStore::new())
    }

    crate::store_conformance!(open);
}
