//! The chat logic over a store, presence and a delivery bus: requests from
//! devices (send, history, conversations, blocks), catch-up, cursors, and the
//! fan-out of committed messages. Sends from many connections are gathered
//! into batches that commit in one transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parley_proto::ids;
use parley_proto::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use tokio::sync::mpsc;

use crate::bus::{DeliveryBus, Revocation};
use crate::error::ChatError;
use crate::media::{BlobStorage, MediaLimits};
use crate::metrics::{ChatMetrics, code_label};
use crate::presence::Presence;
use crate::push::PushTokenRecord;
use crate::refresh::{RefreshToken, same_secret};
use crate::revision::{Change, Revision};
use crate::store::{
    ConversationRecord, DeviceCursor, DeviceRecord, MembershipChange, RefreshRecord, Store,
};
use crate::token::{TokenKeys, Verified};

/// Limits and policies of the chat service.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Largest group, the owner included.
    pub max_group_members: usize,
    /// Default lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Default lifetimes of a session's access tokens and refresh tokens.
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// Messages older than this are removed; None keeps everything.
    pub retention: Option<Duration>,
    /// Most sends committed in one transaction.
    pub max_batch: usize,
    /// How long a batch short of `max_batch` may wait for more sends,
    /// counted from its first send's arrival, while sends arrive at least
    /// once per linger (zero: it never waits).
    pub batch_linger: Duration,
    /// Most sends waiting for a commit or being committed; past it, sends
    /// are refused with UNAVAILABLE until the store catches up.
    pub max_queue: usize,
    /// How often acknowledged cursors are written, all in one transaction.
    /// A cursor is advisory (a device resumes from its own), so a crash
    /// costs at most this much re-delivery, which clients drop as duplicates.
    pub cursor_flush: Duration,
    /// Upload rules.
    pub media: MediaLimits,
    /// Where uploads' bytes live; None: this server stores no media.
    pub blobs: Option<Arc<dyn BlobStorage>>,
    /// Largest group whose members see each other's read receipts live and
    /// by name; past it, a member reads only how many have read a message.
    pub receipt_group_limit: usize,
    /// How long after sending a message its sender may recall it, or edit
    /// it; how long a text an edit replaced is kept for the edit history.
    pub recall_window: Duration,
    pub edit_window: Duration,
    pub edit_history_kept: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_group_members: 1000,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(90 * 24 * 3600),
            retention: None,
            max_batch: 256,
            batch_linger: Duration::ZERO,
            max_queue: 4096,
            cursor_flush: Duration::from_millis(500),
            media: MediaLimits::default(),
            blobs: None,
            receipt_group_limit: 100,
            recall_window: Duration::from_secs(24 * 3600),
            edit_window: Duration::from_secs(48 * 3600),
            edit_history_kept: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What a device receives when it catches up.
#[derive(Debug, Clone, Default)]
pub struct SyncPage {
    pub entries: Vec<(u64, pb::Message)>,
    /// The newest inbox sequence number of the user.
    pub head: u64,
    /// Inbox sequence numbers removed by retention: (from, to), inclusive.
    pub missing: Option<(u64, u64)>,
}

/// The chat service; cheap to share behind an `Arc`.
pub struct ChatService {
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    bus: Arc<dyn DeliveryBus>,
    tokens: TokenKeys,
    config: ChatConfig,
    /// Sends waiting for the batch writer, in groups; `queue` holds a place
    /// for each send waiting or being written.
    appends: mpsc::UnboundedSender<send::AppendGroup>,
    queue: Arc<tokio::sync::Semaphore>,
    /// Acked cursors not yet written, by (user, device).
    cursors: std::sync::Mutex<HashMap<(String, String), u64>>,
    metrics: ChatMetrics,
}

impl std::fmt::Debug for ChatService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How long after a refresh the token it used up is still honoured: a
/// client whose answer was lost tries again with the same token.
pub const REFRESH_GRACE: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ChatService {
    /// Starts the service (and its batch writer) on the current runtime.
    pub fn start(
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        bus: Arc<dyn DeliveryBus>,
        tokens: TokenKeys,
        config: ChatConfig,
    ) -> Arc<Self> {
        let (appends, rx) = send::queue();
        let queue = Arc::new(tokio::sync::Semaphore::new(config.max_queue));
        let svc = Arc::new(Self {
            store,
            presence,
            bus,
            tokens,
            config,
            appends,
            queue,
            cursors: std::sync::Mutex::default(),
            metrics: ChatMetrics::default(),
        });
        tokio::spawn(send::batch_writer(Arc::downgrade(&svc), rx));
        tokio::spawn(cursor_writer(Arc::downgrade(&svc)));
        tokio::spawn(edit_pruner(Arc::downgrade(&svc)));
        if svc.config.blobs.is_some() {
            tokio::spawn(media::blob_collector(Arc::downgrade(&svc)));
        }
        if let Some(retention) = svc.config.retention {
            tokio::spawn(retention_task(Arc::downgrade(&svc), retention));
        }
        svc
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    pub fn tokens(&self) -> &TokenKeys {
        &self.tokens
    }

    pub fn metrics(&self) -> &ChatMetrics {
        &self.metrics
    }

    /// The user a token belongs to, if valid and the user exists.
    /// Who `token` logs in on `device`: a valid token, for this device if
    /// it names one, of a user that exists, issued after the last log-out
    /// of the device or of all the user's devices (one store read).
    pub async fn authenticate(&self, token: &str, device: &str) -> Result<Verified, ChatError> {
        let v = self.tokens.verify_claims(token)?;
        if v.device.as_deref().is_some_and(|d| d != device) {
            return Err(ChatError::Unauthenticated(
                "this token is for another device".into(),
            ));
        }
        match self.store.logged_out_at(&v.user, device).await? {
            None => Err(ChatError::Unauthenticated(format!(
                "unknown user {}",
                v.user
            ))),
            Some(at) if v.issued_at_ms <= at => Err(ChatError::SessionRevoked),
            Some(_) => Ok(v),
        }
    }

    /// Logs out `device` of `user`, or every device of the user when None:
    /// tokens issued until now are refused from now on, and every gateway
    /// is told to close the connections that logged in with them. Returns
    /// the time of the log-out. Safe to repeat: a failure to tell the
    /// gateways is UNAVAILABLE, after which the caller tries again.
    pub async fn log_out(&self, user: &str, device: Option<&str>) -> Result<i64, ChatError> {
        ids::check_user_id(user).map_err(ChatError::InvalidArgument)?;
        if let Some(device) = device {
            ids::check_device_id(device).map_err(ChatError::InvalidArgument)?;
        }
        let at_ms = now_ms();
        self.store.log_out(user, device, at_ms).await?;
        self.bus
            .revoked(Revocation {
                user: user.to_owned(),
                device: device.map(str::to_owned),
                at_ms,
            })
            .await?;
        self.metrics.log_outs.inc();
        Ok(at_ms)
    }

    /// Logs `device` of `user` in: a new pair of tokens, the refresh token
    /// replacing any earlier one of the device. Lifetimes default to the
    /// configured ones.
    pub async fn create_session(
        &self,
        user: &str,
        device: &str,
        access_ttl: Option<Duration>,
        refresh_ttl: Option<Duration>,
    ) -> Result<pb::Tokens, ChatError> {
        ids::check_device_id(device).map_err(ChatError::InvalidArgument)?;
        if self.store.get_user(user).await?.is_none() {
            return Err(ChatError::NotFound(format!("no user {user}")));
        }
        let now = now_ms();
        let refresh = RefreshToken::new(user, device);
        let refresh_ttl = refresh_ttl.unwrap_or(self.config.refresh_ttl);
        let record = RefreshRecord {
            user: user.to_owned(),
            device: device.to_owned(),
            digest: refresh.digest(),
            previous: Vec::new(),
            created_at_ms: now,
            rotated_at_ms: now,
            expires_at_ms: now.saturating_add(refresh_ttl.as_millis() as i64),
        };
        self.store.put_refresh(&record).await?;
        self.metrics.sessions.inc();
        self.pair(&refresh, access_ttl, now, record.expires_at_ms)
    }

    /// Trades a refresh token for the next pair. A used-up token that
    /// comes back within [`REFRESH_GRACE`] of its use is honoured (its
    /// answer may have been lost); later, it means two holders of one
    /// device's credentials, and the device is logged out. Refused with
    /// SESSION_REVOKED once the device or all the user's devices were logged
    /// out after the session began, or the token expired.
    pub async fn refresh(&self, token: &str) -> Result<pb::Tokens, ChatError> {
        let presented = RefreshToken::parse(token)
            .ok_or_else(|| ChatError::Unauthenticated("not a refresh token".into()))?;
        let (user, device) = (presented.user.as_str(), presented.device.as_str());
        let now = now_ms();
        let record = self.store.get_refresh(user, device).await?;
        let logged_out = self.store.logged_out_at(user, device).await?;
        let (Some(record), Some(logged_out)) = (record, logged_out) else {
            return Err(ChatError::Unauthenticated("unknown refresh token".into()));
        };
        let digest = presented.digest();
        let current = same_secret(&digest, &record.digest);
        let lost_answer = !current
            && same_secret(&digest, &record.previous)
            && now - record.rotated_at_ms <= REFRESH_GRACE.as_millis() as i64;
        if !current && !lost_answer {
            if same_secret(&digest, &record.previous) {
                tracing::warn!(
                    user,
                    device,
                    "a used-up refresh token came back: device logged out"
                );
                self.metrics.refresh_reuses.inc();
                self.log_out(user, Some(device)).await?;
                return Err(ChatError::SessionRevoked);
            }
            return Err(ChatError::Unauthenticated("unknown refresh token".into()));
        }
        if record.created_at_ms <= logged_out || record.expires_at_ms < now {
            return Err(ChatError::SessionRevoked);
        }
        let next = RefreshToken::new(user, device);
        let refresh_ttl = record.expires_at_ms - record.rotated_at_ms;
        let expires_at_ms = now.saturating_add(refresh_ttl.max(0));
        let moved = self
            .store
            .rotate_refresh(
                user,
                device,
                &record.digest,
                &next.digest(),
                now,
                expires_at_ms,
            )
            .await?;
        if !moved {
            return Err(ChatError::Unavailable(
                "another refresh of this device was under way; try again".into(),
            ));
        }
        self.metrics.refreshes.inc();
        self.pair(&next, None, now, expires_at_ms)
    }

    /// An access token for the refresh token's device, beside it.
    fn pair(
        &self,
        refresh: &RefreshToken,
        access_ttl: Option<Duration>,
        now: i64,
        refresh_expires_at_ms: i64,
    ) -> Result<pb::Tokens, ChatError> {
        let ttl = access_ttl
            .unwrap_or(self.config.access_ttl)
            .as_secs()
            .max(1) as i64;
        let access_token = self
            .tokens
            .issue_for(&refresh.user, Some(&refresh.device), now, ttl)?;
        Ok(pb::Tokens {
            access_token,
            access_expires_at_ms: (now.div_euclid(1000) + ttl) * 1000,
            refresh_token: refresh.encode(),
            refresh_expires_at_ms,
        })
    }

    /// The devices of `user`, by id.
    pub async fn devices(&self, user: &str) -> Result<Vec<DeviceRecord>, ChatError> {
        self.store.list_devices(user).await
    }

    /// A device connected: where it resumes from, and the user's head. The
    /// gateway registers the session's presence before it calls this, so a
    /// message committed after the head is read finds the device online.
    pub async fn session_opened(
        &self,
        user: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> Result<(u64, u64), ChatError> {
        let head = self.store.inbox_head(user).await?;
        let pending = self.pending_cursor(user, device);
        let resume = match cursor {
            Some(c) => c.min(head),
            None => match pending {
                Some(c) => c,
                None => self.store.get_cursor(user, device).await?.unwrap_or(head),
            }
            .min(head),
        };
        Ok((resume, head))
    }

    /// Records what a device has received. The cursor is written with the
    /// others acked in the same `cursor_flush` period, in one transaction.
    pub async fn ack(&self, user: &str, device: &str, cursor: u64) -> Result<(), ChatError> {
        self.record_ack(user, device, cursor);
        Ok(())
    }

    /// [`ack`](Self::ack), which never waits.
    pub fn record_ack(&self, user: &str, device: &str, cursor: u64) {
        let mut pending = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let c = pending
            .entry((user.to_owned(), device.to_owned()))
            .or_default();
        *c = (*c).max(cursor);
    }

    fn pending_cursor(&self, user: &str, device: &str) -> Option<u64> {
        let pending = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        pending.get(&(user.to_owned(), device.to_owned())).copied()
    }

    /// Writes every acked cursor not yet written. They stay pending (and
    /// are what a login reads) until they are committed, so a failure only
    /// delays them to the next attempt.
    pub async fn flush_cursors(&self) -> Result<(), ChatError> {
        let batch: Vec<DeviceCursor> = {
            let pending = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
            pending
                .iter()
                .map(|((user, device), cursor)| DeviceCursor {
                    user: user.clone(),
                    device: device.clone(),
                    cursor: *cursor,
                })
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.store.set_cursors(&batch, now_ms()).await?;
        let mut pending = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        for c in batch {
            let key = (c.user, c.device);
            // A newer ack that came in meanwhile stays for the next flush.
            if pending.get(&key) == Some(&c.cursor) {
                pending.remove(&key);
            }
        }
        Ok(())
    }

    /// The user's timeline after `after`, with what retention removed.
    pub async fn sync(&self, user: &str, after: u64, limit: u32) -> Result<SyncPage, ChatError> {
        let page = self
            .store
            .inbox_after(user, after, limit.clamp(1, 1000))
            .await?;
        let first = page.entries.first().map(|(s, _)| *s);
        let missing = match first {
            Some(first) if first > after + 1 => Some((after + 1, first - 1)),
            None if page.head > after => Some((after + 1, page.head)),
            _ => None,
        };
        Ok(SyncPage {
            entries: page.entries,
            head: page.head,
            missing,
        })
    }

    /// Handles a request frame of an authenticated device (a session of
    /// unknown age: see [`call_in_session`](Self::call_in_session)).
    pub async fn call(&self, user: &str, device: &str, req: Req) -> Result<Resp, ChatError> {
        self.call_in_session(user, device, i64::MAX, req).await
    }

    /// Handles a request frame of a device whose token was issued at
    /// `issued_at_ms` (`i64::MAX`: unknown, taken as just now).
    pub async fn call_in_session(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: i64,
        req: Req,
    ) -> Result<Resp, ChatError> {
        // Sends count their own refusals (see `send_many`).
        let counted = !matches!(req, Req::Send(_));
        let result = self.handle(user, device, issued_at_ms, req).await;
        if counted && let Err(e) = &result {
            self.metrics
                .errors
                .get_or_create(&code_label(e.code()))
                .inc();
        }
        result
    }

    async fn handle(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: i64,
        req: Req,
    ) -> Result<Resp, ChatError> {
        match req {
            Req::Send(send) => self.send(user, device, send).await.map(Resp::SendAck),
            Req::History(h) => self.history(user, h).await.map(Resp::HistoryPage),
            Req::OpenDirect(o) => {
                ids::check_user_id(&o.peer).map_err(ChatError::InvalidArgument)?;
                let conv = self.store.open_direct(user, &o.peer, now_ms()).await?;
                Ok(Resp::Conversation(conv.into()))
            }
            Req::CreateGroup(g) => {
                self.not_blocked_by(user, &g.members).await?;
                self.create_group(user, &g.name, g.members)
                    .await
                    .map(|c| Resp::Conversation(c.into()))
            }
            Req::AddMembers(a) => {
                self.require_member(a.conversation_id, user).await?;
                self.not_blocked_by(user, &a.users).await?;
                self.change_members(a.conversation_id, user, MembershipChange::Add, &a.users)
                    .await
            }
            Req::RemoveMembers(r) => {
                let conv = self.conversation(r.conversation_id).await?;
                if !conv.members.iter().any(|m| m == user) {
                    return Err(ChatError::NotMember(r.conversation_id));
                }
                if conv.owner != user && r.users.iter().any(|u| u != user) {
                    return Err(ChatError::Forbidden(
                        "only the group's owner can remove others".into(),
                    ));
                }
                self.change_members(r.conversation_id, user, MembershipChange::Remove, &r.users)
                    .await
            }
            Req::LeaveGroup(l) => {
                self.require_member(l.conversation_id, user).await?;
                self.change_members(
                    l.conversation_id,
                    user,
                    MembershipChange::Leave,
                    &[user.to_owned()],
                )
                .await
                .map(|_| Resp::Done(pb::Done {}))
            }
            Req::ListConversations(l) => self
                .list_conversations(user, l)
                .await
                .map(Resp::Conversations),
            Req::MarkRead(m) => self.mark_read(user, m).await.map(Resp::ReadReceipt),
            Req::Pin(p) => {
                self.pin(user, p).await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Receipts(r) => self.receipts(user, r).await.map(Resp::Receipts),
            Req::Recall(r) => {
                let change = Change::Recall;
                let window = self.config.recall_window;
                self.revise(user, r.conversation_id, r.seq, change, window)
                    .await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Edit(e) => {
                let change = Change::Edit(e.content.unwrap_or_default());
                let window = self.config.edit_window;
                self.revise(user, e.conversation_id, e.seq, change, window)
                    .await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::EditHistory(h) => {
                self.require_member(h.conversation_id, user).await?;
                let versions = self.store.edit_history(h.conversation_id, h.seq).await?;
                Ok(Resp::EditHistory(pb::EditHistory {
                    versions: versions.into_iter().map(Into::into).collect(),
                }))
            }
            Req::Typing(t) => {
                self.typing(user, t).await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Block(b) => {
                ids::check_user_id(&b.user).map_err(ChatError::InvalidArgument)?;
                if b.user == user {
                    return Err(ChatError::invalid("you cannot block yourself"));
                }
                if self.store.get_user(&b.user).await?.is_none() {
                    return Err(ChatError::NotFound(format!("no user {:?}", b.user)));
                }
                self.store.set_block(user, &b.user, true, now_ms()).await?;
                self.blocks_changed(user).await;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Unblock(b) => {
                self.store.set_block(user, &b.user, false, now_ms()).await?;
                self.blocks_changed(user).await;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::ListBlocks(_) => {
                let users = self.store.blocks_of(user).await?;
                Ok(Resp::Blocks(pb::BlockList { users }))
            }
            Req::ListDevices(_) => {
                let devices = self.devices(user).await?;
                Ok(Resp::Devices(pb::DeviceList {
                    devices: devices
                        .into_iter()
                        .map(|d| {
                            let current = d.device == device;
                            d.into_pb(current)
                        })
                        .collect(),
                }))
            }
            Req::LogOut(l) => {
                let which = match (l.all_devices, l.device_id.as_str()) {
                    (true, _) => None,
                    (false, "") => Some(device),
                    (false, other) => Some(other),
                };
                self.log_out(user, which).await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Refresh(r) => self.refresh(&r.refresh_token).await.map(Resp::Tokens),
            Req::Upload(u) => self.upload(user, u).await.map(Resp::UploadSlot),
            Req::UploadComplete(c) => self.upload_complete(user, c).await.map(Resp::Blob),
            Req::Download(d) => self.download(user, d).await.map(Resp::DownloadUrl),
            Req::RegisterPush(r) => {
                let token = PushTokenRecord::registered(user, device, r, now_ms())?;
                // A log-out racing the registration wins: the token is
                // not kept for a device logged out since its login.
                let since = issued_at_ms.min(token.updated_at_ms);
                if !self.store.put_push_token(&token, since).await? {
                    return Err(ChatError::SessionRevoked);
                }
                Ok(Resp::Done(pb::Done {}))
            }
            Req::RemovePush(_) => {
                self.store.delete_push_token(user, device).await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::SetNotifications(n) => {
                let previews = self
                    .store
                    .notification_previews(user, n.previews)
                    .await?
                    .ok_or_else(|| ChatError::NotFound(format!("no user {user}")))?;
                Ok(Resp::NotificationSettings(pb::NotificationSettings {
                    previews,
                }))
            }
            Req::Mute(m) => {
                self.mute(user, m).await?;
                Ok(Resp::Done(pb::Done {}))
            }
            Req::Hello(_) | Req::Auth(_) | Req::Ack(_) | Req::Ping(_) | Req::Sync(_) => {
                Err(ChatError::invalid("this frame is handled by the gateway"))
            }
        }
    }

    async fn history(
        &self,
        user: &str,
        h: pb::HistoryRequest,
    ) -> Result<pb::HistoryPage, ChatError> {
        self.require_member(h.conversation_id, user).await?;
        let limit = match h.limit {
            0 => 50,
            n => n.min(200),
        };
        let direction = pb::Direction::try_from(h.direction).map_err(|_| {
            ChatError::invalid(format!(
                "direction {} is neither BACKWARD (0) nor FORWARD (1)",
                h.direction
            ))
        })?;
        let slice = self
            .store
            .history(h.conversation_id, h.from_seq, direction, limit)
            .await?;
        Ok(pb::HistoryPage {
            conversation_id: h.conversation_id,
            messages: slice.messages,
            has_more: slice.has_more,
            oldest_available_seq: slice.oldest_available_seq,
        })
    }

    /// Creates a group owned by `owner`; `members` need not name the owner.
    pub async fn create_group(
        &self,
        owner: &str,
        name: &str,
        members: Vec<String>,
    ) -> Result<ConversationRecord, ChatError> {
        if name.len() > 200 {
            return Err(ChatError::invalid("a group name is at most 200 bytes"));
        }
        let mut all = members;
        all.push(owner.to_owned());
        for u in &all {
            ids::check_user_id(u).map_err(ChatError::InvalidArgument)?;
        }
        all.sort();
        all.dedup();
        if all.len() > self.config.max_group_members {
            return Err(ChatError::GroupFull(self.config.max_group_members));
        }
        let (conv, appended) = self.store.create_group(owner, name, &all, now_ms()).await?;
        self.fan_out(vec![appended]).await;
        Ok(conv)
    }

    /// Adds or removes members on behalf of `actor` (checked by the caller).
    pub async fn change_members(
        &self,
        conversation_id: u64,
        actor: &str,
        change: MembershipChange,
        users: &[String],
    ) -> Result<Resp, ChatError> {
        for u in users {
            ids::check_user_id(u).map_err(ChatError::InvalidArgument)?;
        }
        let (conv, appended) = self
            .store
            .change_members(
                conversation_id,
                actor,
                change,
                users,
                self.config.max_group_members,
                now_ms(),
            )
            .await?;
        if let Some(appended) = appended {
            self.fan_out(vec![appended]).await;
        }
        Ok(Resp::Conversation(conv.into()))
    }

    /// Recalls or edits a message of `user`'s, and hands the rewritten
    /// message to every member's devices as a new timeline entry.
    async fn revise(
        &self,
        user: &str,
        conversation_id: u64,
        seq: u64,
        change: Change,
        window: Duration,
    ) -> Result<(), ChatError> {
        self.require_member(conversation_id, user).await?;
        let revision = Revision {
            conversation_id,
            seq,
            actor: user.to_owned(),
            change,
            now_ms: now_ms(),
            window,
        };
        if let Some(appended) = self.store.revise(&revision).await? {
            self.fan_out(vec![appended]).await;
        }
        Ok(())
    }

    /// The conversation, or NOT_FOUND.
    pub async fn conversation(&self, id: u64) -> Result<ConversationRecord, ChatError> {
        self.store
            .get_conversation(id)
            .await?
            .ok_or_else(|| ChatError::NotFound(format!("no conversation {id}")))
    }

    async fn require_member(&self, conversation_id: u64, user: &str) -> Result<(), ChatError> {
        if self.store.is_member(conversation_id, user).await? {
            Ok(())
        } else {
            Err(ChatError::NotMember(conversation_id))
        }
    }
}

/// Runs `pass` every `every`, the first time one period after the start,
/// for as long as the service lives; a pass that runs late delays the
/// next rather than bunching them.
pub(super) async fn periodically<F, Fut>(
    svc: std::sync::Weak<ChatService>,
    every: Duration,
    pass: F,
) where
    F: Fn(Arc<ChatService>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(svc) = svc.upgrade() else { return };
        pass(svc).await;
    }
}

/// Forgets the texts edits replaced once `edit_history_kept` has passed,
/// looking every hour.
async fn edit_pruner(svc: std::sync::Weak<ChatService>) {
    periodically(svc, Duration::from_secs(3600), |svc| async move {
        let cutoff = now_ms() - svc.config.edit_history_kept.as_millis() as i64;
        match svc.store.prune_edits(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "old edit history removed"),
            Err(e) => tracing::warn!(error = %e, "edit history not pruned"),
        }
    })
    .await;
}

/// Writes acked cursors every `cursor_flush`.
async fn cursor_writer(svc: std::sync::Weak<ChatService>) {
    let Some(every) = svc.upgrade().map(|s| s.config.cursor_flush) else {
        return;
    };
    periodically(svc, every, |svc| async move {
        if let Err(e) = svc.flush_cursors().await {
            tracing::warn!(error = %e, "cursors not written; retrying");
        }
    })
    .await;
}

/// Removes what is older than the retention, every minute.
async fn retention_task(svc: std::sync::Weak<ChatService>, retention: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(60).min(retention));
    loop {
        tick.tick().await;
        let Some(svc) = svc.upgrade() else { return };
        let cutoff = now_ms() - retention.as_millis() as i64;
        match svc.store.prune_before(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "retention removed old messages"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}

mod fanout;
mod media;
mod send;
mod state;
#[cfg(test)]
mod tests;

pub use send::SendRequest;
pub use state::TYPING_SHOWN;
