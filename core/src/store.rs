//! Persistence behind one trait, so the embedded SQLite store, the
//! cluster's PostgreSQL store (both in `parley-store`) and the in-memory
//! store here run the same chat logic. Every method is one transaction;
//! `append` is where sequence numbers, dedup and inbox entries are decided,
//! atomically. `conformance` holds the behaviour every implementation must
//! show.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod memory;

pub use memory::MemoryStore;

use async_trait::async_trait;
use parley_proto::pb;

use crate::bus::Revocation;
use crate::error::ChatError;
use crate::media::BlobRecord;
use crate::push::{AudienceQuery, DeadToken, PushAudience, PushTokenRecord};
use crate::revision::{EditRecord, Revision};

/// A user as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: String,
    pub display_name: String,
    pub created_at_ms: i64,
}

/// A conversation with its members, sorted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConversationRecord {
    pub id: u64,
    pub kind: pb::ConversationKind,
    pub name: String,
    pub owner: String,
    pub members: Vec<String>,
    pub last_seq: u64,
    /// In a user's list only: until when that user muted it (0: not).
    pub muted_until_ms: i64,
    /// In a user's list only: that user's read marker and pin.
    pub read_seq: u64,
    pub pinned: bool,
    /// In a user's list only, direct conversations only: the other
    /// member's read marker.
    pub peer_read_seq: u64,
    /// In a user's list only: the newest message kept, and the time of the
    /// newest activity (that message's, or the conversation's creation).
    pub last_message: Option<pb::Message>,
    pub last_activity_ms: i64,
}

impl ConversationRecord {
    /// Messages after the user's read marker.
    pub fn unread(&self) -> u64 {
        self.last_seq.saturating_sub(self.read_seq)
    }
}

impl From<ConversationRecord> for pb::Conversation {
    fn from(c: ConversationRecord) -> Self {
        Self {
            id: c.id,
            kind: c.kind as i32,
            unread_count: c.unread(),
            name: c.name,
            members: c.members,
            last_seq: c.last_seq,
            owner: c.owner,
            muted_until_ms: c.muted_until_ms,
            read_seq: c.read_seq,
            pinned: c.pinned,
            peer_read_seq: c.peer_read_seq,
            last_message: c.last_message,
            last_activity_ms: c.last_activity_ms,
        }
    }
}

/// A member's own settings of a conversation, the same on all its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberSettings {
    /// Push notifications muted until then (0: not muted).
    pub muted_until_ms: i64,
    pub pinned: bool,
}

impl MemberSettings {
    /// From the SQL stores' `RETURNING muted_until, pinned` row; none: the
    /// user is not in the conversation.
    pub fn from_row(row: Option<(i64, bool)>, conversation_id: u64) -> Result<Self, ChatError> {
        let (muted_until_ms, pinned) = row.ok_or(ChatError::NotMember(conversation_id))?;
        Ok(Self {
            muted_until_ms,
            pinned,
        })
    }
}

/// A read marker after [`Store::mark_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMark {
    /// Where the marker stands now.
    pub seq: u64,
    /// It moved (false: it was there or further already).
    pub moved: bool,
}

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation_id: u64,
    pub sender_id: String,
    pub sender_device: String,
    pub client_msg_id: String,
    pub content: pb::Content,
    pub now_ms: i64,
}

impl NewMessage {
    /// The message as stored with id `msg_id` at `seq` of its conversation.
    pub fn stored(&self, msg_id: u64, seq: u64) -> pb::Message {
        self.clone().into_stored(msg_id, seq)
    }

    /// [`NewMessage::stored`], moving the strings and content instead of
    /// copying them.
    pub fn into_stored(self, msg_id: u64, seq: u64) -> pb::Message {
        pb::Message {
            msg_id,
            conversation_id: self.conversation_id,
            seq,
            sender_id: self.sender_id,
            sender_device: self.sender_device,
            client_msg_id: self.client_msg_id,
            server_time_ms: self.now_ms,
            content: Some(self.content),
            edited_at_ms: 0,
            recalled: false,
        }
    }

    /// The answer to this send when `original` already holds its (sender,
    /// client_msg_id): the original, marked a duplicate, when this send is
    /// a resend of it (same conversation, same content); CONFLICT when the
    /// id was used for another message, so that a client reusing ids by
    /// mistake hears of it instead of losing the message.
    pub fn resend_of(&self, original: Appended) -> Result<Appended, ChatError> {
        let used = |what: &str| {
            Err(ChatError::Conflict(format!(
                "client_msg_id {:?} was used for a message {what}; a resend must repeat the \
                 message, a new message needs a new id",
                self.client_msg_id
            )))
        };
        if original.message.conversation_id != self.conversation_id {
            return used(&format!(
                "in conversation {}",
                original.message.conversation_id
            ));
        }
        // A message edited or recalled since has other content now; its
        // resend is still a resend.
        let revised = original.message.edited_at_ms != 0 || original.message.recalled;
        if !revised && original.message.content.as_ref() != Some(&self.content) {
            return used("with other content");
        }
        Ok(Appended {
            duplicate: true,
            ..original
        })
    }
}

/// The outcome of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: pb::Message,
    /// Every member, the sender included, with the inbox sequence number the
    /// message got in their timeline. A duplicate carries the original's
    /// (those still stored), so its fan-out can be redone: the replica that
    /// committed it may have died before publishing.
    pub recipients: Vec<(String, u64)>,
    /// The message existed already (same sender and client_msg_id).
    pub duplicate: bool,
}

/// One page of a user's timeline.
#[derive(Debug, Clone, Default)]
pub struct InboxPage {
    /// (inbox_seq, message), ascending.
    pub entries: Vec<(u64, pb::Message)>,
    /// The user's newest inbox sequence number when the page was read.
    pub head: u64,
}

/// One page of a conversation's history, ascending by seq.
#[derive(Debug, Clone, Default)]
pub struct HistorySlice {
    pub messages: Vec<pb::Message>,
    pub has_more: bool,
    pub oldest_available_seq: u64,
}

/// How a membership change is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    Add,
    Remove,
    Leave,
}

/// A device's acknowledged position in its user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCursor {
    pub user: String,
    pub device: String,
    pub cursor: u64,
}

/// A device of a user, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device: String,
    /// The inbox sequence number it acknowledged last, and when (0: never).
    pub cursor: u64,
    pub last_seen_ms: i64,
    /// Tokens issued until then are refused: the later of its own log-out
    /// and its user's log-out of every device (0: never).
    pub logged_out_at_ms: i64,
}

/// A device's refresh token, as stored: digests, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    pub user: String,
    pub device: String,
    /// SHA-256 of the current refresh token's secret, and of the one it
    /// replaced (empty: none yet).
    pub digest: Vec<u8>,
    pub previous: Vec<u8>,
    /// When the device was logged in (its first pair issued), when it last
    /// refreshed, and until when the current token is good (ms).
    pub created_at_ms: i64,
    pub rotated_at_ms: i64,
    pub expires_at_ms: i64,
}

impl RefreshRecord {
    /// A device's record from the SQL stores' row: (digest, previous,
    /// created_at, rotated_at, expires_at).
    pub fn from_row(user: &str, device: &str, row: (Vec<u8>, Vec<u8>, i64, i64, i64)) -> Self {
        let (digest, previous, created_at_ms, rotated_at_ms, expires_at_ms) = row;
        Self {
            user: user.to_owned(),
            device: device.to_owned(),
            digest,
            previous,
            created_at_ms,
            rotated_at_ms,
            expires_at_ms,
        }
    }
}

impl DeviceRecord {
    /// From the SQL stores' row: (device_id, cursor, last_seen, logged out at).
    pub fn from_row(
        (device, cursor, last_seen_ms, logged_out_at_ms): (String, i64, i64, i64),
    ) -> Self {
        Self {
            device,
            cursor: cursor as u64,
            last_seen_ms,
            logged_out_at_ms,
        }
    }

    /// As the wire shows it; `current`: the asking connection's device.
    pub fn into_pb(self, current: bool) -> pb::Device {
        pb::Device {
            device_id: self.device,
            cursor: self.cursor,
            last_seen_ms: self.last_seen_ms,
            logged_out_at_ms: self.logged_out_at_ms,
            current,
        }
    }
}

/// The store every chat backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_user(
        &self,
        id: &str,
        display_name: &str,
        now_ms: i64,
    ) -> Result<UserRecord, ChatError>;
    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>, ChatError>;
    /// The ids among `ids` that are not users.
    async fn missing_users(&self, ids: &[String]) -> Result<Vec<String>, ChatError>;

    /// The direct conversation of two users, created on first use.
    async fn open_direct(
        &self,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<ConversationRecord, ChatError>;
    /// A new group owned by `owner` with `members` (the owner included), and
    /// its GROUP_CREATED event appended as the first message.
    async fn create_group(
        &self,
        owner: &str,
        name: &str,
        members: &[String],
        now_ms: i64,
    ) -> Result<(ConversationRecord, Appended), ChatError>;
    async fn get_conversation(&self, id: u64) -> Result<Option<ConversationRecord>, ChatError>;
    /// Applies a membership change to a group (at most `max_members` after
    /// it) and appends its event; None when nothing changed.
    async fn change_members(
        &self,
        conversation_id: u64,
        actor: &str,
        change: MembershipChange,
        users: &[String],
        max_members: usize,
        now_ms: i64,
    ) -> Result<(ConversationRecord, Option<Appended>), ChatError>;
    /// The user's conversations, each with the user's mute, pin and read
    /// marker, the newest message and, for a direct one, the peer's
    /// marker; in no particular order.
    async fn list_conversations(&self, user: &str) -> Result<Vec<ConversationRecord>, ChatError>;
    /// Moves `user`'s read marker in a conversation up to `seq`, never
    /// back and never past the newest message. NOT_MEMBER when the user is
    /// not in it. (Appends move the sender's marker to what it sent; a
    /// member added starts at the seq before the event that added it.)
    async fn mark_read(
        &self,
        conversation_id: u64,
        user: &str,
        seq: u64,
    ) -> Result<ReadMark, ChatError>;
    /// The read markers of a conversation's members, by user id.
    async fn read_markers(&self, conversation_id: u64) -> Result<Vec<(String, u64)>, ChatError>;
    async fn is_member(&self, conversation_id: u64, user: &str) -> Result<bool, ChatError>;

    /// Appends messages in one transaction, each checked on its own:
    /// dedup on (sender, client_msg_id), membership, blocks (direct
    /// conversations), then the next seq and one inbox entry per member.
    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError>;

    /// Applies a revision (recall, edit) to message `seq` of its
    /// conversation, under the rules of [`Revision::apply`], in one
    /// transaction: the message is rewritten in place (same id and seq),
    /// every member now in the conversation gets a new timeline entry
    /// pointing at it, and the text an edit replaces goes to the edit
    /// history (a recall clears the history). NOT_FOUND when there is no
    /// such message; None when nothing changed. A resend of the original
    /// still answers with the entries of the original send.
    async fn revise(&self, revision: &Revision) -> Result<Option<Appended>, ChatError>;
    /// The texts message `seq` had before its edits, oldest first.
    /// NOT_FOUND when there is no such message.
    async fn edit_history(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<Vec<EditRecord>, ChatError>;
    /// Forgets the texts replaced before `before_ms`; how many went.
    async fn prune_edits(&self, before_ms: i64) -> Result<u64, ChatError>;

    /// Entries of `user`'s timeline after `after`, at most `limit`.
    async fn inbox_after(&self, user: &str, after: u64, limit: u32)
    -> Result<InboxPage, ChatError>;
    async fn inbox_head(&self, user: &str) -> Result<u64, ChatError>;
    /// Messages of a conversation before `from_seq` (Backward; 0 means the
    /// newest) or after it (Forward).
    async fn history(
        &self,
        conversation_id: u64,
        from_seq: u64,
        direction: pb::Direction,
        limit: u32,
    ) -> Result<HistorySlice, ChatError>;

    /// Records devices' acknowledged cursors, each never moving backwards,
    /// in one transaction. Each (user, device) appears at most once.
    async fn set_cursors(&self, cursors: &[DeviceCursor], now_ms: i64) -> Result<(), ChatError>;
    async fn get_cursor(&self, user: &str, device: &str) -> Result<Option<u64>, ChatError>;
    /// Logs out `device` of `user` at `at_ms`, or every device of the user
    /// (and its tokens naming none) when None: tokens issued until then are
    /// refused, and the push tokens of those devices are removed. A
    /// log-out never moves back to an earlier time. NOT_FOUND when the user
    /// does not exist.
    async fn log_out(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), ChatError>;
    /// Until when tokens of `user` on `device` are refused (the later of
    /// the device's and the user's log-out; 0: never), or None when the
    /// user does not exist. One read, made at every login.
    async fn logged_out_at(&self, user: &str, device: &str) -> Result<Option<i64>, ChatError>;
    /// The first `limit` log-outs made at or after `since_ms` (a device's,
    /// or all of a user's devices' with `device` None), in time order, for
    /// a gateway that may have missed their notices; the next page starts
    /// at the last one's time. Indexed, not a scan.
    async fn log_outs_since(&self, since_ms: i64, limit: u32)
    -> Result<Vec<Revocation>, ChatError>;
    /// The devices of `user` that acknowledged a delivery, hold a session
    /// (a refresh token) or were logged out, by id.
    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceRecord>, ChatError>;
    /// Stores a device's first refresh token, replacing any earlier one of
    /// the device (a new login).
    async fn put_refresh(&self, record: &RefreshRecord) -> Result<(), ChatError>;
    async fn get_refresh(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<RefreshRecord>, ChatError>;
    /// Moves a device's refresh token on, if its digest is still `current`:
    /// `next` becomes current, `current` previous, good until
    /// `expires_at_ms`. False when another refresh moved it first.
    async fn rotate_refresh(
        &self,
        user: &str,
        device: &str,
        current: &[u8],
        next: &[u8],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, ChatError>;

    async fn set_block(
        &self,
        user: &str,
        other: &str,
        blocked: bool,
        now_ms: i64,
    ) -> Result<(), ChatError>;
    async fn is_blocked(&self, user: &str, by: &str) -> Result<bool, ChatError>;
    /// The users `user` blocks, sorted.
    async fn blocks_of(&self, user: &str) -> Result<Vec<String>, ChatError>;
    /// Those among `users` who block `actor`, sorted: who `actor` may not
    /// add to a group.
    async fn blockers_of(&self, actor: &str, users: &[String]) -> Result<Vec<String>, ChatError>;

    /// Registers a device's push token, replacing the device's earlier
    /// one; the same token held by another device (a phone that changed
    /// hands) moves to this one. Refused (false, nothing written) when the
    /// device or its user was logged out at or after `session_since_ms`,
    /// judged in one step with the log-outs, so that a registration racing
    /// a log-out never outlives it.
    async fn put_push_token(
        &self,
        token: &PushTokenRecord,
        session_since_ms: i64,
    ) -> Result<bool, ChatError>;
    /// Removes a device's push token (none: nothing to do).
    async fn delete_push_token(&self, user: &str, device: &str) -> Result<(), ChatError>;
    /// Drops tokens providers refused for good, each only while a device
    /// still holds it (a device that registered a new one keeps it); how
    /// many went.
    async fn drop_push_tokens(&self, dead: &[DeadToken]) -> Result<u64, ChatError>;
    /// Whether the user's notifications show previews, after setting it
    /// when `previews` is Some; None when the user does not exist.
    async fn notification_previews(
        &self,
        user: &str,
        previews: Option<bool>,
    ) -> Result<Option<bool>, ChatError>;
    /// Mutes a conversation for one member until `until_ms` (0: unmuted):
    /// the member's settings after it. NOT_MEMBER when the user is not in
    /// it.
    async fn mute(
        &self,
        conversation_id: u64,
        user: &str,
        until_ms: i64,
    ) -> Result<MemberSettings, ChatError>;
    /// Pins or unpins a conversation for one member: its settings after it.
    /// NOT_MEMBER when the user is not in it.
    async fn pin(
        &self,
        conversation_id: u64,
        user: &str,
        pinned: bool,
    ) -> Result<MemberSettings, ChatError>;
    /// Everything one batch of notifications needs, in one read: the
    /// recipients' tokens, settings and unseen counts, the mutes of the
    /// pairs asked about, the senders' names.
    async fn push_audience(&self, query: &AudienceQuery) -> Result<PushAudience, ChatError>;

    /// Removes messages created before `cutoff_ms`, and their inbox entries.
    async fn prune_before(&self, cutoff_ms: i64) -> Result<u64, ChatError>;

    /// Records a new upload (pending). Its id is new.
    async fn create_blob(&self, blob: &BlobRecord) -> Result<(), ChatError>;
    async fn get_blob(&self, id: &str) -> Result<Option<BlobRecord>, ChatError>;
    /// Makes a pending upload ready with what its bytes showed (`blob`'s
    /// sha256, dimensions and thumbnail); false when it was not pending.
    async fn complete_blob(&self, blob: &BlobRecord) -> Result<bool, ChatError>;
    /// The ready uploads among `(owner, id)` pairs, each marked used at
    /// `now_ms` (so garbage collection keeps it as long as a message
    /// referencing it is retained). Pairs that are not a ready upload of
    /// that owner are left out. One statement for a whole batch of sends.
    async fn use_blobs(
        &self,
        uses: &[(String, String)],
        now_ms: i64,
    ) -> Result<Vec<BlobRecord>, ChatError>;
    /// How many uploads `owner` asked for at or after `since_ms`, and the
    /// bytes they declared (the daily quota).
    async fn uploads_since(&self, owner: &str, since_ms: i64) -> Result<(u64, u64), ChatError>;
    /// Marks for deletion, atomically, uploads still pending whose slot
    /// expired before `pending_before_ms`, ready ones never used and made
    /// before `unused_before_ms`, and used ones last used before
    /// `used_before_ms` (None: those are kept), and answers at most `limit`
    /// ids marked so far (this pass's and any an earlier pass left). A
    /// marked upload is no longer usable, so a send racing the collection
    /// either marks it used first or is refused.
    async fn doom_blobs(
        &self,
        pending_before_ms: i64,
        unused_before_ms: i64,
        used_before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<String>, ChatError>;
    /// Removes the records of uploads (once their bytes are deleted).
    async fn delete_blobs(&self, ids: &[String]) -> Result<(), ChatError>;
}

/// The key that makes a direct conversation unique per pair of users.
pub fn direct_key(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}\n{b}")
    } else {
        format!("{b}\n{a}")
    }
}

/// The seq a history query starts from: Backward from 0 means from the
/// newest.
pub fn history_bound(from_seq: u64, direction: pb::Direction) -> i64 {
    match direction {
        pb::Direction::Backward if from_seq == 0 => i64::MAX,
        _ => from_seq as i64,
    }
}

/// Rows fetched one past `limit` (Backward ones newest first) as a page in
/// ascending seq order, and whether there was more.
pub fn history_page<T>(mut rows: Vec<T>, limit: u32, direction: pb::Direction) -> (Vec<T>, bool) {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    if direction == pb::Direction::Backward {
        rows.reverse();
    }
    (rows, has_more)
}
