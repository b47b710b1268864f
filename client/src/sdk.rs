//! The Rust SDK. A background task owns the connection: it logs in, resumes
//! from the cursor, resends unacknowledged sends under their original
//! client_msg_id after a reconnect, drops duplicates, hands messages out in
//! inbox order, asks for a sync when it sees a gap, acks what it received,
//! pings, and reconnects with backoff.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use parley_proto::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use parley_proto::{PROTOCOL_VERSION, codec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::media::{self, Progress};
use crate::transport::{self, BoxStream, TlsOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout};

/// How to reach and log in to Parley.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// A gateway's address, host:port (with a route lookup: the fallback
    /// when the lookup fails; may be empty).
    pub addr: String,
    /// Route lookup URLs (`http://host:port/route`), asked in order before
    /// every (re)connect until one answers: its candidates are tried in
    /// order, and those that fail are reported to the next lookup.
    pub routes: Vec<String>,
    /// Connect over TLS.
    pub tls: Option<TlsOptions>,
    /// The access token `Auth` carries.
    pub token: String,
    /// The device's refresh token, if it was logged in with one (the admin
    /// API's CreateSession): the SDK then gets itself a new access token
    /// when the one it holds has expired or is about to, and reports the
    /// new pair as [`Event::Tokens`].
    pub refresh_token: Option<String>,
    pub device_id: String,
    /// Resume after this inbox sequence number; None lets the server use the
    /// device's last acknowledged cursor.
    pub cursor: Option<u64>,
    /// How long a request may wait, reconnects included.
    pub request_timeout: Duration,
    pub max_frame_bytes: usize,
    /// How long an upload's or a download's HTTP transfer may go without a
    /// byte moving before it is given up (an upload then resumes from
    /// where the server says it ended).
    pub transfer_stall: Duration,
}

impl ClientConfig {
    pub fn new(
        addr: impl Into<String>,
        token: impl Into<String>,
        device_id: impl Into<String>,
    ) -> Self {
        Self {
            addr: addr.into(),
            routes: Vec::new(),
            tls: None,
            token: token.into(),
            refresh_token: None,
            device_id: device_id.into(),
            cursor: None,
            request_timeout: Duration::from_secs(30),
            max_frame_bytes: parley_proto::DEFAULT_MAX_FRAME_BYTES,
            transfer_stall: Duration::from_secs(30),
        }
    }
}

/// What can go wrong for a caller of the SDK.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{code:?}: {message}")]
    Server {
        code: pb::ErrorCode,
        message: String,
    },
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("no answer within the request timeout")]
    Timeout,
    #[error("the client is closed")]
    Closed,
    #[error("disconnected before the answer came; the request may or may not have been applied")]
    Disconnected,
    /// Moving an upload's or a download's bytes over HTTP failed.
    #[error("transfer failed: {0}")]
    Transfer(String),
    /// The gateway sent us elsewhere (GoAway) before the login finished.
    #[error("sent elsewhere before the login finished: {0:?}")]
    Redirected(Option<String>),
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What the SDK hands to the application.
#[derive(Debug, Clone)]
pub enum Event {
    /// Logged in (again).
    Connected { user_id: String, inbox_head: u64 },
    /// A message, once, in inbox order. Messages this device sent are not
    /// repeated here (their ack said all there is). A message whose
    /// `edited_at_ms` is set or that is `recalled` replaces the one with the
    /// same `msg_id` (a revision comes as a new timeline entry of the same
    /// message, on every device; a device catching up may see the revised
    /// message first at its original place, then again).
    Message {
        inbox_seq: u64,
        message: pb::Message,
        /// The user blocks its sender (a group message): hide it.
        from_blocked: bool,
    },
    /// A catch-up ended; `complete = false` means retention removed part of it.
    Synced(pb::SyncDone),
    /// A member's read marker moved: the peer's (messages up to `seq`
    /// were read), or the user's own on another device (clear the unread
    /// count up to it). Not stored: after a reconnect, list the
    /// conversations again for the markers as they stand.
    Read(pb::ReadReceipt),
    /// The user pinned or muted a conversation on another device.
    Settings(pb::ConversationSettings),
    /// The users this user blocks, after a change on any device.
    Blocks(Vec<String>),
    /// Someone is typing in a conversation (until `expires_in_ms` from now,
    /// a stop, or their next message there), or stopped.
    Typing(pb::TypingIndicator),
    /// The connection dropped, or a reconnect was refused for now (the
    /// user has the most devices online the server allows: the reason says
    /// so, and it comes again at each refused try, about every 30 s); the
    /// SDK is reconnecting.
    Disconnected { reason: String },
    /// New credentials after a refresh: store them in place of the old ones
    /// (the refresh token used for it works no more).
    Tokens(pb::Tokens),
    /// The server ended the session for good (the token was refused or
    /// expired, or this device logged in on another connection); the client
    /// is closed and this is the last event.
    Closed(ClientError),
}

enum Command {
    Request {
        body: Req,
        reply: oneshot::Sender<Result<Resp, ClientError>>,
    },
    /// Dropped once the last Ack is written.
    Close { _written: oneshot::Sender<()> },
}

/// A handle to a Parley connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    cursor: Arc<AtomicU64>,
    user_id: Arc<str>,
    request_timeout: Duration,
    /// Trusted for https upload and download URLs (the gateways' CA, if
    /// one is set; the public web's otherwise).
    transfers: media::Transfers,
}

impl Client {
    /// Connects and logs in; later disconnects are repaired in the background.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        let (events_tx, events) = mpsc::channel(4096);
        let (commands, commands_rx) = mpsc::channel(1024);
        let cursor = Arc::new(AtomicU64::new(config.cursor.unwrap_or(0)));
        let tls = config
            .tls
            .as_ref()
            .map(transport::tls_connector)
            .transpose()
            .map_err(ClientError::Connect)?;
        let mut engine = Engine {
            config: config.clone(),
            events: events_tx,
            commands: commands_rx,
            cursor: config.cursor,
            shared_cursor: cursor.clone(),
            acked: 0,
            held: BTreeMap::new(),
            pending: HashMap::new(),
            next_rid: 1,
            user_id: String::new(),
            tls,
            redirect: None,
            failed: Vec::new(),
            retries: Vec::new(),
            token_expires_at_ms: None,
            token_expired: false,
        };
        let (conn, user_id) = engine.login().await?;
        let request_timeout = config.request_timeout;
        tokio::spawn(engine.run(conn));
        Ok((
            Client {
                commands,
                cursor,
                user_id: user_id.into(),
                request_timeout,
                transfers: media::Transfers {
                    tls: config.tls.clone(),
                    stall: config.transfer_stall,
                },
            },
            events,
        ))
    }

    /// The logged-in user.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The inbox sequence number everything up to which has been handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its answer.
    pub async fn request(&self, body: Req) -> Result<Resp, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request { body, reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        match timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Sends a message under a fresh client_msg_id; see `send_with_id`.
    pub async fn send(
        &self,
        conversation_id: u64,
        content: pb::Content,
    ) -> Result<pb::SendAck, ClientError> {
        self.send_with_id(new_client_msg_id(), conversation_id, content)
            .await
    }

    /// Sends a message. Across reconnects it is resent under the same id, so
    /// it is stored once whatever happens to the acks.
    pub async fn send_with_id(
        &self,
        client_msg_id: String,
        conversation_id: u64,
        content: pb::Content,
    ) -> Result<pb::SendAck, ClientError> {
        let body = Req::Send(pb::Send {
            client_msg_id,
            conversation_id,
            content: Some(content),
        });
        match self.request(body).await? {
            Resp::SendAck(ack) => Ok(ack),
            other => Err(unexpected(other)),
        }
    }

    pub async fn open_direct(&self, peer: &str) -> Result<pb::Conversation, ClientError> {
        conversation(
            self.request(Req::OpenDirect(pb::OpenDirect { peer: peer.into() }))
                .await?,
        )
    }

    pub async fn create_group(
        &self,
        name: &str,
        members: &[&str],
    ) -> Result<pb::Conversation, ClientError> {
        let members = members.iter().map(|m| (*m).to_owned()).collect();
        conversation(
            self.request(Req::CreateGroup(pb::CreateGroup {
                name: name.into(),
                members,
            }))
            .await?,
        )
    }

    /// One page of a conversation's history.
    pub async fn history(
        &self,
        conversation_id: u64,
        from_seq: u64,
        direction: pb::Direction,
        limit: u32,
    ) -> Result<pb::HistoryPage, ClientError> {
        let req = pb::HistoryRequest {
            conversation_id,
            from_seq,
            direction: direction as i32,
            limit,
        };
        match self.request(Req::History(req)).await? {
            Resp::HistoryPage(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// The users this user blocks.
    pub async fn blocks(&self) -> Result<Vec<String>, ClientError> {
        match self.request(Req::ListBlocks(pb::ListBlocks {})).await? {
            Resp::Blocks(b) => Ok(b.users),
            other => Err(unexpected(other)),
        }
    }

    pub async fn block(&self, user: &str, blocked: bool) -> Result<(), ClientError> {
        let req = if blocked {
            Req::Block(pb::Block { user: user.into() })
        } else {
            Req::Unblock(pb::Unblock { user: user.into() })
        };
        self.request(req).await.map(drop)
    }

    /// Uploads the file at `path` (its MIME type from its name unless
    /// `mime` is given, its kind from the type): asks for a slot, sends
    /// the bytes to the slot's URL (up to three more times after a
    /// transfer that broke off: the rest, from where the server says it
    /// ended, on Parley's own endpoint; all of it again on a presigned
    /// S3 URL), and completes the upload. The blob is
    /// then ready to send ([`Client::send_file`] does both).
    pub async fn upload(
        &self,
        path: &Path,
        mime: Option<&str>,
        progress: Option<Progress>,
    ) -> Result<pb::Blob, ClientError> {
        let (size, sha256) = media::digest_file(path)
            .await
            .map_err(|e| ClientError::Transfer(format!("{}: {e}", path.display())))?;
        let mime = mime.unwrap_or_else(|| media::mime_for(path)).to_owned();
        let req = pb::UploadRequest {
            kind: media::kind_for(&mime) as i32,
            mime_type: mime,
            size_bytes: size,
            sha256,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let slot = match self.request(Req::Upload(req)).await? {
            Resp::UploadSlot(s) => s,
            other => return Err(unexpected(other)),
        };
        if !slot.parts.is_empty() {
            return self.upload_parts(path, size, slot, progress).await;
        }
        let headers: Vec<(String, String)> = slot
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let mut attempt = 0;
        let mut from = 0;
        loop {
            let sent = media::put_file(
                &slot.url,
                &headers,
                path,
                (from, size),
                &self.transfers,
                progress.clone(),
            )
            .await;
            match sent {
                Ok(()) => break,
                Err(e) if e.retry && attempt < 3 => {
                    attempt += 1;
                    sleep(Duration::from_millis(250 << attempt)).await;
                    // Where the server's own endpoint says the upload
                    // stands; from the start for a store that cannot say.
                    from = media::upload_offset(&slot.url, &self.transfers)
                        .await
                        .filter(|n| *n <= size)
                        .unwrap_or(0);
                    tracing::debug!(error = %e.message, attempt, from, "upload broke off; resuming");
                    if from == size {
                        break;
                    }
                }
                Err(e) => return Err(ClientError::Transfer(e.message)),
            }
        }
        let done = pb::UploadComplete {
            blob_id: slot.blob_id,
            ..Default::default()
        };
        match self.request(Req::UploadComplete(done)).await? {
            Resp::Blob(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    /// An upload in parts (a large file to an S3-compatible store): each
    /// part up on its own, again up to three more times when it fails
    /// (only that part), then the completion with every part's ETag.
    async fn upload_parts(
        &self,
        path: &Path,
        size: u64,
        slot: pb::UploadSlot,
        progress: Option<Progress>,
    ) -> Result<pb::Blob, ClientError> {
        let mut done = Vec::with_capacity(slot.parts.len());
        for part in &slot.parts {
            let mut attempt = 0;
            let etag = loop {
                let sent = media::put_part(
                    &part.url,
                    path,
                    (part.offset, part.size, size),
                    &self.transfers,
                    progress.clone(),
                )
                .await;
                match sent {
                    Ok(etag) => break etag,
                    Err(e) if e.retry && attempt < 3 => {
                        attempt += 1;
                        tracing::debug!(error = %e.message, part = part.number, attempt, "part again");
                        sleep(Duration::from_millis(250 << attempt)).await;
                    }
                    Err(e) => return Err(ClientError::Transfer(e.message)),
                }
            };
            done.push(pb::CompletedPart {
                number: part.number,
                etag,
            });
        }
        let complete = pb::UploadComplete {
            blob_id: slot.blob_id,
            upload_id: slot.upload_id,
            parts: done,
        };
        match self.request(Req::UploadComplete(complete)).await? {
            Resp::Blob(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    /// Uploads the file at `path` and sends it to a conversation as a
    /// media message with `caption`: the ack and the upload as stored.
    pub async fn send_file(
        &self,
        conversation_id: u64,
        path: &Path,
        caption: &str,
        progress: Option<Progress>,
    ) -> Result<(pb::SendAck, pb::Blob), ClientError> {
        let blob = self.upload(path, None, progress).await?;
        let media = pb::Media {
            kind: blob.kind,
            blob_id: blob.blob_id.clone(),
            name: blob.name.clone(),
            caption: caption.to_owned(),
            ..Default::default()
        };
        let content = pb::Content {
            body: Some(pb::content::Body::Media(Box::new(media))),
        };
        let ack = self.send(conversation_id, content).await?;
        Ok((ack, blob))
    }

    /// Downloads the upload of a media message (or its thumbnail) to
    /// `dest`, resuming a download of it that broke off (`<dest>.part`),
    /// and checks the bytes against the message's SHA-256. The bytes
    /// written.
    pub async fn download(
        &self,
        message: &pb::Message,
        thumbnail: bool,
        dest: &Path,
        progress: Option<Progress>,
    ) -> Result<u64, ClientError> {
        let media = match message.content.as_ref().and_then(|c| c.body.as_ref()) {
            Some(pb::content::Body::Media(m)) if !m.blob_id.is_empty() => m,
            _ => {
                return Err(ClientError::Transfer(format!(
                    "message {} of conversation {} holds no upload",
                    message.seq, message.conversation_id
                )));
            }
        };
        let req = pb::DownloadRequest {
            conversation_id: message.conversation_id,
            seq: message.seq,
            thumbnail,
        };
        let mut attempt = 0;
        let (size, sha256) = loop {
            // A new URL each time: the last may have expired meanwhile.
            let url = match self.request(Req::Download(req)).await? {
                Resp::DownloadUrl(u) => u.url,
                other => return Err(unexpected(other)),
            };
            match media::get_file(&url, dest, &self.transfers, progress.clone()).await {
                Ok(got) => break got,
                Err(e) if e.retry && attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e.message, attempt, "download broke off; resuming");
                    sleep(Duration::from_millis(250 << attempt)).await;
                }
                Err(e) => return Err(ClientError::Transfer(e.message)),
            }
        };
        if !thumbnail && !media.sha256.is_empty() && sha256 != media.sha256 {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(ClientError::Transfer(format!(
                "the {size} bytes downloaded are not the ones sent (SHA-256 differs)"
            )));
        }
        Ok(size)
    }

    /// The user's devices, this one marked `current`.
    pub async fn devices(&self) -> Result<Vec<pb::Device>, ClientError> {
        match self.request(Req::ListDevices(pb::ListDevices {})).await? {
            Resp::Devices(list) => Ok(list.devices),
            other => Err(unexpected(other)),
        }
    }

    /// Logs out `device` (this device when None), or every device of the
    /// user with `all_devices`: their tokens are refused from now on and
    /// their connections close with SESSION_REVOKED, this one included when
    /// it is among them (its events then end with that error).
    pub async fn log_out(
        &self,
        device: Option<&str>,
        all_devices: bool,
    ) -> Result<(), ClientError> {
        let req = pb::LogOut {
            device_id: device.unwrap_or_default().into(),
            all_devices,
        };
        self.request(Req::LogOut(req)).await.map(drop)
    }

    /// Registers this device's push token (replacing its earlier one):
    /// while none of the user's devices is online, messages wake it.
    /// `topic` is the app's bundle id for APNs; `locale` a language tag.
    pub async fn register_push(
        &self,
        provider: pb::PushProvider,
        token: &str,
        topic: &str,
        locale: &str,
    ) -> Result<(), ClientError> {
        let req = pb::RegisterPush {
            provider: provider as i32,
            token: token.into(),
            topic: topic.into(),
            locale: locale.into(),
        };
        self.request(Req::RegisterPush(req)).await.map(drop)
    }

    /// Stops push notifications to this device.
    pub async fn remove_push(&self) -> Result<(), ClientError> {
        self.request(Req::RemovePush(pb::RemovePush {}))
            .await
            .map(drop)
    }

    /// Whether the user's notifications show the sender and the text,
    /// after setting it when `previews` is Some.
    pub async fn notification_previews(&self, previews: Option<bool>) -> Result<bool, ClientError> {
        let req = pb::SetNotifications { previews };
        match self.request(Req::SetNotifications(req)).await? {
            Resp::NotificationSettings(s) => Ok(s.previews),
            other => Err(unexpected(other)),
        }
    }

    /// Mutes a conversation's push notifications, on every device of the
    /// user, until `until_ms` (ms since the epoch; `i64::MAX`: until
    /// unmuted, 0: unmutes now).
    pub async fn mute(&self, conversation_id: u64, until_ms: i64) -> Result<(), ClientError> {
        let req = pb::MuteConversation {
            conversation_id,
            muted_until_ms: until_ms,
        };
        self.request(Req::Mute(req)).await.map(drop)
    }

    /// Pins (or unpins) a conversation at the top of the list, on every
    /// device of the user.
    pub async fn pin(&self, conversation_id: u64, pinned: bool) -> Result<(), ClientError> {
        let req = pb::PinConversation {
            conversation_id,
            pinned,
        };
        self.request(Req::Pin(req)).await.map(drop)
    }

    /// Takes back message `seq` this user sent (within the server's
    /// recall window): every member's devices see it recalled.
    pub async fn recall(&self, conversation_id: u64, seq: u64) -> Result<(), ClientError> {
        let req = pb::Recall {
            conversation_id,
            seq,
        };
        self.request(Req::Recall(req)).await.map(drop)
    }

    /// Replaces the text of message `seq` this user sent (within the
    /// server's edit window).
    pub async fn edit(
        &self,
        conversation_id: u64,
        seq: u64,
        text: impl Into<String>,
    ) -> Result<(), ClientError> {
        let req = pb::Edit {
            conversation_id,
            seq,
            content: Some(pb::Content::text(text)),
        };
        self.request(Req::Edit(req)).await.map(drop)
    }

    /// The texts message `seq` had before its edits, oldest first.
    pub async fn edit_history(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<Vec<pb::MessageVersion>, ClientError> {
        let req = pb::EditHistoryRequest {
            conversation_id,
            seq,
        };
        match self.request(Req::EditHistory(req)).await? {
            Resp::EditHistory(h) => Ok(h.versions),
            other => Err(unexpected(other)),
        }
    }

    /// Says the user is typing in a conversation (again every 3 seconds
    /// while it goes on), or stopped.
    pub async fn typing(&self, conversation_id: u64, typing: bool) -> Result<(), ClientError> {
        let req = pb::Typing {
            conversation_id,
            typing,
        };
        self.request(Req::Typing(req)).await.map(drop)
    }

    /// Marks a conversation read up to `seq` (the newest message shown):
    /// the user's marker as it now stands (it never moves back).
    pub async fn mark_read(&self, conversation_id: u64, seq: u64) -> Result<u64, ClientError> {
        let req = pb::MarkRead {
            conversation_id,
            seq,
        };
        match self.request(Req::MarkRead(req)).await? {
            Resp::ReadReceipt(r) => Ok(r.seq),
            other => Err(unexpected(other)),
        }
    }

    /// Who has read message `seq` of a conversation.
    pub async fn receipts(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<pb::Receipts, ClientError> {
        let req = pb::ReceiptsRequest {
            conversation_id,
            seq,
        };
        match self.request(Req::Receipts(req)).await? {
            Resp::Receipts(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// A page of the user's conversations (pinned first, then the newest
    /// activity), at most `limit` (0: all), after `page` (a `next_page`;
    /// empty: the first).
    pub async fn conversations(
        &self,
        limit: u32,
        page: &str,
    ) -> Result<pb::ConversationList, ClientError> {
        let req = pb::ListConversations {
            limit,
            page: page.into(),
        };
        match self.request(Req::ListConversations(req)).await? {
            Resp::Conversations(l) => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection for good.
    /// Waits (at most the request timeout) until the cursor's last Ack is
    /// written, so the server resumes this device after it next time.
    pub async fn close(&self) {
        let (done, written) = oneshot::channel();
        if self
            .commands
            .send(Command::Close { _written: done })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(self.request_timeout, written).await;
        }
    }
}

/// A random client message id (128 bits, hex).
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn unexpected(resp: Resp) -> ClientError {
    ClientError::Server {
        code: pb::ErrorCode::Internal,
        message: format!("unexpected answer: {resp:?}"),
    }
}

fn conversation(resp: Resp) -> Result<pb::Conversation, ClientError> {
    match resp {
        Resp::Conversation(c) => Ok(c),
        other => Err(unexpected(other)),
    }
}

/// A logged-in connection.
struct Conn {
    stream: BoxStream,
    buf: BytesMut,
    heartbeat: Duration,
    /// A Ping unanswered this long means the server is gone (frozen, or
    /// the network half-open): reconnect elsewhere.
    pong_timeout: Duration,
}

struct Pending {
    body: Req,
    reply: oneshot::Sender<Result<Resp, ClientError>>,
    /// Times the server answered a Send with a transient error.
    attempts: u32,
}

/// Whether a Send refused with `code` is worth sending again by itself.
fn transient(code: pb::ErrorCode) -> bool {
    matches!(
        code,
        pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited
    )
}

/// Sends answered with a transient error are tried again this many times.
const SEND_RETRIES: u32 = 30;
/// A connection up this long counts as working: the reconnect backoff
/// starts over after it.
const STABLE: Duration = Duration::from_secs(10);
/// How long a reconnect refused with TOO_MANY_DEVICES waits before trying
/// again (plus up to 5 s of jitter).
const TOO_MANY_DEVICES_RETRY: Duration = Duration::from_secs(30);
/// How long a gateway has to answer Hello and Auth before the next is tried.
const LOGIN_WITHIN: Duration = Duration::from_secs(5);
/// How long a Ping waits for its Pong when the server does not say.
const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);

struct Engine {
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    commands: mpsc::Receiver<Command>,
    /// Everything up to here was handed out; None before the first login.
    cursor: Option<u64>,
    shared_cursor: Arc<AtomicU64>,
    acked: u64,
    /// Deliveries that arrived ahead of a gap, by inbox_seq.
    /// Messages after a gap, by inbox seq, with their `from_blocked`.
    held: BTreeMap<u64, (pb::Message, bool)>,
    pending: HashMap<u64, Pending>,
    next_rid: u64,
    user_id: String,
    tls: Option<TlsConnector>,
    /// The address a GoAway named, for the next connect.
    redirect: Option<String>,
    /// Gateways that could not be reached since the last login, for the
    /// next route lookup to leave out (and check).
    failed: Vec<String>,
    /// Sends to try again: (when, request id).
    retries: Vec<(Instant, u64)>,
    /// When the access token expires, once a login or refresh said so.
    token_expires_at_ms: Option<i64>,
    /// The server refused the access token as expired.
    token_expired: bool,
}

/// How long before its expiry an access token is replaced at a login.
const REFRESH_AHEAD_MS: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

enum Disconnect {
    Retry(String),
    Fatal(ClientError),
    Closed,
}

impl Engine {
    /// Where to connect now, in order: where a GoAway sent us; else the
    /// candidates of the first route lookup that answers; then the
    /// configured address.
    async fn targets(&mut self) -> Result<Vec<String>, ClientError> {
        if let Some(addr) = self.redirect.take() {
            return Ok(vec![addr]);
        }
        let mut out = Vec::new();
        let mut lookup_error = None;
        for url in &self.config.routes {
            match transport::lookup_route(url, &self.failed, self.config.tls.as_ref()).await {
                Ok(candidates) => {
                    out = candidates;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "route lookup failed; trying the next");
                    lookup_error = Some(e);
                }
            }
        }
        let fixed = &self.config.addr;
        if !fixed.is_empty() && !out.contains(fixed) {
            out.push(fixed.clone());
        }
        if out.is_empty() {
            let why = lookup_error.unwrap_or_else(|| "no address and no route lookup".into());
            return Err(ClientError::Connect(why));
        }
        Ok(out)
    }

    /// Logs in at the first target that answers; a target that cannot be
    /// reached is remembered for the next route lookup.
    async fn login(&mut self) -> Result<(Conn, String), ClientError> {
        let mut last = None;
        let mut hops = 0;
        let mut targets = self.targets().await?.into_iter();
        // Reported once: the lookup probes them, and leaving them out of
        // every later answer could leave nothing to try once all recover.
        self.failed.clear();
        while let Some(addr) = targets.next() {
            match self.login_at(&addr).await {
                Ok(done) => {
                    self.failed.clear();
                    return Ok(done);
                }
                // Followed at most twice per login, so two gateways that
                // disagree cannot bounce a client between them.
                Err(ClientError::Redirected(to)) if hops < 2 => {
                    hops += 1;
                    self.redirect = to;
                    targets = self.targets().await?.into_iter();
                }
                // Full, or without its chat service: another may not be.
                Err(
                    e @ (ClientError::Connect(_)
                    | ClientError::Timeout
                    | ClientError::Server {
                        code: pb::ErrorCode::ServerBusy | pb::ErrorCode::Unavailable,
                        ..
                    }),
                ) => {
                    tracing::debug!(error = %e, gateway = %addr, "gateway unreachable; trying the next");
                    if !self.failed.contains(&addr) && self.failed.len() < 8 {
                        self.failed.push(addr);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Connect("nowhere to connect".into())))
    }

    /// Logs in at `addr`, refreshing the access token first when it is due,
    /// or when the server refused it as expired (once).
    async fn login_at(&mut self, addr: &str) -> Result<(Conn, String), ClientError> {
        match self.login_once(addr).await {
            Err(ClientError::Server {
                code: pb::ErrorCode::TokenExpired,
                ..
            }) if self.config.refresh_token.is_some() && !self.token_expired => {
                self.token_expired = true;
                self.login_once(addr).await
            }
            other => other,
        }
    }

    /// Whether the next login refreshes the access token first.
    fn refresh_due(&self) -> bool {
        self.config.refresh_token.is_some()
            && (self.token_expired
                || self
                    .token_expires_at_ms
                    .is_some_and(|at| at - REFRESH_AHEAD_MS <= now_ms()))
    }

    fn auth(&self) -> Req {
        Req::Auth(pb::Auth {
            token: self.config.token.clone(),
            device_id: self.config.device_id.clone(),
            cursor: self.cursor,
        })
    }

    async fn login_once(&mut self, addr: &str) -> Result<(Conn, String), ClientError> {
        let tls = self.tls.as_ref().zip(self.config.tls.as_ref());
        let stream = transport::connect(addr, tls)
            .await
            .map_err(ClientError::Connect)?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
            heartbeat: Duration::from_secs(30),
            pong_timeout: DEFAULT_PONG_TIMEOUT,
        };
        let hello = Req::Hello(pb::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: format!("parley-sdk-rust/{}", env!("CARGO_PKG_VERSION")),
        });
        let mut out = BytesMut::new();
        codec::encode_frame(&pb::ClientFrame::new(0, hello), &mut out);
        // Auth waits for the new access token when one is due.
        match self
            .config
            .refresh_token
            .clone()
            .filter(|_| self.refresh_due())
        {
            Some(refresh_token) => {
                let refresh = Req::Refresh(pb::Refresh { refresh_token });
                codec::encode_frame(&pb::ClientFrame::new(0, refresh), &mut out);
            }
            None => codec::encode_frame(&pb::ClientFrame::new(0, self.auth()), &mut out),
        }
        conn.stream
            .write_all(&out)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let deadline = Instant::now() + LOGIN_WITHIN;
        loop {
            let frame = timeout(
                deadline - Instant::now(),
                read_frame(&mut conn, self.config.max_frame_bytes),
            )
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Connect)?;
            match frame.body {
                Some(Resp::HelloOk(ok)) => {
                    conn.heartbeat =
                        Duration::from_millis(ok.heartbeat_interval_ms.max(1000) as u64);
                    if ok.pong_timeout_ms > 0 {
                        conn.pong_timeout = Duration::from_millis(ok.pong_timeout_ms as u64);
                    }
                }
                Some(Resp::Tokens(tokens)) => {
                    self.config.token = tokens.access_token.clone();
                    self.config.refresh_token = Some(tokens.refresh_token.clone());
                    self.token_expires_at_ms = Some(tokens.access_expires_at_ms);
                    self.token_expired = false;
                    let _ = self.events.send(Event::Tokens(tokens)).await;
                    out.clear();
                    codec::encode_frame(&pb::ClientFrame::new(0, self.auth()), &mut out);
                    conn.stream
                        .write_all(&out)
                        .await
                        .map_err(|e| ClientError::Connect(e.to_string()))?;
                }
                Some(Resp::AuthOk(ok)) => {
                    self.token_expired = false;
                    if ok.token_expires_at_ms > 0 {
                        self.token_expires_at_ms = Some(ok.token_expires_at_ms);
                    }
                    if self.cursor.is_none() {
                        self.cursor = Some(ok.resume_from);
                        self.acked = ok.resume_from;
                        self.shared_cursor.store(ok.resume_from, Ordering::Release);
                    }
                    self.user_id = ok.user_id.clone();
                    let _ = self
                        .events
                        .send(Event::Connected {
                            user_id: ok.user_id.clone(),
                            inbox_head: ok.inbox_head,
                        })
                        .await;
                    return Ok((conn, ok.user_id));
                }
                Some(Resp::Error(e)) => {
                    return Err(ClientError::Server {
                        code: e.code(),
                        message: e.message,
                    });
                }
                // Sent elsewhere before logging in (a gateway that is
                // draining, or busier than another): follow it.
                Some(Resp::GoAway(g)) => {
                    return Err(ClientError::Redirected(
                        (!g.redirect.is_empty()).then_some(g.redirect),
                    ));
                }
                _ => {}
            }
        }
    }

    async fn run(mut self, first: Conn) {
        let mut conn = Some(first);
        let mut backoff = Duration::from_millis(100);
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.login().await {
                    Ok((c, _)) => c,
                    Err(
                        e @ ClientError::Server {
                            code:
                                pb::ErrorCode::Unauthenticated
                                | pb::ErrorCode::TokenExpired
                                | pb::ErrorCode::SessionRevoked,
                            ..
                        },
                    ) => {
                        self.close_for_good(e).await;
                        return;
                    }
                    // The user's other devices took every place while this
                    // one was away: one may leave, so try again, slowly.
                    Err(
                        e @ ClientError::Server {
                            code: pb::ErrorCode::TooManyDevices,
                            ..
                        },
                    ) => {
                        tracing::info!(error = %e, "no place among the user's devices; retrying");
                        // The app learns why it stays offline.
                        let reason = e.to_string();
                        let _ = self.events.send(Event::Disconnected { reason }).await;
                        let jitter = Duration::from_millis(rand::random::<u64>() % 5_000);
                        if !self.wait_or_close(TOO_MANY_DEVICES_RETRY + jitter).await {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reconnect failed");
                        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                        if !self.wait_or_close(backoff + jitter).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let up_since = Instant::now();
            match self.serve(c).await {
                Disconnect::Closed => return,
                Disconnect::Fatal(e) => {
                    self.close_for_good(e).await;
                    return;
                }
                Disconnect::Retry(reason) => {
                    let _ = self.events.send(Event::Disconnected { reason }).await;
                    // Sends are resent under their ids; other requests may or
                    // may not have been applied, so their callers decide.
                    let rids: Vec<u64> = self
                        .pending
                        .iter()
                        .filter(|(_, p)| !matches!(p.body, Req::Send(_)))
                        .map(|(r, _)| *r)
                        .collect();
                    for rid in rids {
                        if let Some(p) = self.pending.remove(&rid) {
                            let _ = p.reply.send(Err(ClientError::Disconnected));
                        }
                    }
                    // A connection that held for a while starts the backoff
                    // over; one that failed at once (a catch-up that cannot
                    // be read) waits, so the client does not loop hot.
                    if up_since.elapsed() >= STABLE {
                        backoff = Duration::from_millis(100);
                    } else {
                        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                        if !self.wait_or_close(backoff + jitter).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// Sleeps, still taking requests; false when the client was closed.
    async fn wait_or_close(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request { body, reply }) => {
                        let rid = self.next_rid;
                        self.next_rid += 1;
                        self.pending.insert(rid, Pending { body, reply, attempts: 0 });
                    }
                    Some(Command::Close { .. }) | None => return false,
                },
            }
        }
    }

    /// Fails what waits and tells the application why the client closed.
    async fn close_for_good(&mut self, e: ClientError) {
        self.fail_all(e.clone());
        let _ = self.events.send(Event::Closed(e)).await;
    }

    fn fail_all(&mut self, e: ClientError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(e.clone()));
        }
    }

    async fn serve(&mut self, mut conn: Conn) -> Disconnect {
        let max = self.config.max_frame_bytes;
        let mut out = BytesMut::new();
        // Everything pending is resent below; scheduled retries are moot.
        self.retries.clear();
        // Resend what was in flight when the last connection dropped.
        let mut rids: Vec<&u64> = self.pending.keys().collect();
        rids.sort();
        for rid in rids {
            codec::encode_frame(
                &pb::ClientFrame::new(*rid, self.pending[rid].body.clone()),
                &mut out,
            );
        }
        let mut ping = tokio::time::interval(conn.heartbeat);
        ping.reset();
        let mut ack_tick = tokio::time::interval(Duration::from_millis(200));
        let mut gap_since: Option<Instant> = None;
        // When the Pong to the Ping in flight is due.
        let mut pong_due: Option<Instant> = None;
        loop {
            if !out.is_empty() {
                // Bounded: a gateway that stopped reading (frozen, or a
                // half-open network) must not hold the client forever.
                match timeout(conn.pong_timeout, conn.stream.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Disconnect::Retry(e.to_string()),
                    Err(_) => return Disconnect::Retry("a write did not finish in time".into()),
                }
                out.clear();
            }
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request { body, reply }) => {
                        let rid = self.next_rid;
                        self.next_rid += 1;
                        codec::encode_frame(&pb::ClientFrame::new(rid, body.clone()), &mut out);
                        self.pending.insert(rid, Pending { body, reply, attempts: 0 });
                    }
                    closing @ (Some(Command::Close { .. }) | None) => {
                        self.send_ack(&mut out);
                        let _ = timeout(conn.pong_timeout, conn.stream.write_all(&out)).await;
                        // Dropping the close command tells `close` it is written.
                        drop(closing);
                        return Disconnect::Closed;
                    }
                },
                frame = read_frame(&mut conn, max) => {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => return Disconnect::Retry(e),
                    };
                    // Any frame shows the server alive: a Pong can wait
                    // behind a catch-up's pages on a slow link.
                    pong_due = None;
                    match frame.body {
                        Some(Resp::Deliver(d)) => {
                            if let Some(m) = d.message {
                                self.on_deliver(d.inbox_seq, m, d.from_blocked).await;
                            }
                            if self.held.is_empty() {
                                gap_since = None;
                            } else if gap_since.is_none() {
                                gap_since = Some(Instant::now());
                            }
                        }
                        Some(Resp::SyncDone(done)) => {
                            let cursor = self.cursor.unwrap_or(0);
                            if done.cursor > cursor && !done.complete {
                                // Retention removed these: skip past them, said out loud.
                                self.set_cursor(done.missing_to.max(cursor));
                            }
                            self.release_held().await;
                            let _ = self.events.send(Event::Synced(done)).await;
                        }
                        Some(Resp::GoAway(g)) => {
                            if !g.redirect.is_empty() {
                                self.redirect = Some(g.redirect.clone());
                            }
                            sleep(Duration::from_millis(g.reconnect_after_ms as u64)).await;
                            return Disconnect::Retry(format!("server going away: {}", g.reason));
                        }
                        Some(Resp::Error(e)) if e.fatal => {
                            let code = e.code();
                            let err = ClientError::Server { code, message: e.message };
                            return match code {
                                // Logging in again as this device would take
                                // the place of the connection that took ours.
                                pb::ErrorCode::Unauthenticated | pb::ErrorCode::TokenExpired
                                | pb::ErrorCode::UnsupportedVersion
                                | pb::ErrorCode::DeviceReplaced
                                // A logged-out device's token works no more.
                                | pb::ErrorCode::SessionRevoked
                                // The user must free a place first.
                                | pb::ErrorCode::TooManyDevices => Disconnect::Fatal(err),
                                _ => Disconnect::Retry(err.to_string()),
                            };
                        }
                        Some(Resp::Error(e)) => {
                            let rid = frame.request_id;
                            let retry = self.pending.get_mut(&rid).is_some_and(|p| {
                                p.attempts += 1;
                                matches!(p.body, Req::Send(_)) && transient(e.code()) && p.attempts <= SEND_RETRIES
                            });
                            if retry {
                                // The same client_msg_id again: acked once, whatever happened.
                                let attempts = self.pending[&rid].attempts;
                                let wait = Duration::from_millis((50u64 << attempts.min(5)).min(1_000) + rand::random::<u64>() % 50);
                                self.retries.push((Instant::now() + wait, rid));
                            } else if let Some(p) = self.pending.remove(&rid) {
                                let _ = p.reply.send(Err(ClientError::Server { code: e.code(), message: e.message }));
                            }
                        }
                        Some(Resp::Pong(_)) => {}
                        None => {}
                        Some(Resp::ReadReceipt(r)) if frame.request_id == 0 => {
                            let _ = self.events.send(Event::Read(r)).await;
                        }
                        Some(Resp::ConversationSettings(c)) if frame.request_id == 0 => {
                            let _ = self.events.send(Event::Settings(c)).await;
                        }
                        Some(Resp::Typing(t)) => {
                            let _ = self.events.send(Event::Typing(t)).await;
                        }
                        Some(Resp::Blocks(b)) if frame.request_id == 0 => {
                            let _ = self.events.send(Event::Blocks(b.users)).await;
                        }
                        Some(body) => {
                            if let Some(p) = self.pending.remove(&frame.request_id) {
                                let _ = p.reply.send(Ok(body));
                            }
                        }
                    }
                }
                _ = sleep_until_first(&self.retries), if !self.retries.is_empty() => {
                    let now = Instant::now();
                    let mut due: Vec<u64> = Vec::new();
                    self.retries.retain(|(at, rid)| {
                        if *at <= now { due.push(*rid); false } else { true }
                    });
                    for rid in due {
                        if let Some(p) = self.pending.get(&rid) {
                            codec::encode_frame(&pb::ClientFrame::new(rid, p.body.clone()), &mut out);
                        }
                    }
                }
                _ = ping.tick() => {
                    codec::encode_frame(&pb::ClientFrame::new(0, Req::Ping(pb::Ping { nonce: 0 })), &mut out);
                    pong_due.get_or_insert(Instant::now() + conn.pong_timeout);
                }
                () = sleep_until_opt(pong_due) => {
                    return Disconnect::Retry(format!("no Pong within {} ms", conn.pong_timeout.as_millis()));
                }
                _ = ack_tick.tick() => {
                    self.send_ack(&mut out);
                    if gap_since.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
                        // A gap the server did not fill by itself: ask.
                        let after = self.cursor.unwrap_or(0);
                        codec::encode_frame(&pb::ClientFrame::new(0, Req::Sync(pb::SyncRequest { after })), &mut out);
                        gap_since = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn send_ack(&mut self, out: &mut BytesMut) {
        let cursor = self.cursor.unwrap_or(0);
        if cursor > self.acked {
            codec::encode_frame(&pb::ClientFrame::new(0, Req::Ack(pb::Ack { cursor })), out);
            self.acked = cursor;
        }
    }

    fn set_cursor(&mut self, c: u64) {
        self.cursor = Some(c);
        self.shared_cursor.store(c, Ordering::Release);
    }

    async fn on_deliver(&mut self, inbox_seq: u64, message: pb::Message, from_blocked: bool) {
        let cursor = self.cursor.unwrap_or(0);
        if inbox_seq <= cursor {
            return; // a duplicate
        }
        self.held.insert(inbox_seq, (message, from_blocked));
        self.release_held().await;
    }

    /// Hands out held messages that are next in order.
    async fn release_held(&mut self) {
        let mut cursor = self.cursor.unwrap_or(0);
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if seq <= cursor {
                entry.remove();
                continue;
            }
            if seq != cursor + 1 {
                break;
            }
            let (message, from_blocked) = entry.remove();
            cursor = seq;
            self.set_cursor(cursor);
            // A revision (an edit, a recall) is handed out on every device,
            // the one that sent the message too.
            let revised = message.edited_at_ms != 0 || message.recalled;
            let own = !revised
                && message.sender_id == self.user_id
                && message.sender_device == self.config.device_id;
            if !own {
                let _ = self
                    .events
                    .send(Event::Message {
                        inbox_seq: seq,
                        message,
                        from_blocked,
                    })
                    .await;
            }
        }
    }
}

async fn read_frame(conn: &mut Conn, max: usize) -> Result<pb::ServerFrame, String> {
    loop {
        match codec::decode_frame(&mut conn.buf, max) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if conn.buf.capacity() == conn.buf.len() {
            conn.buf.reserve(4096);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => return Err("connection closed by the server".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Sleeps until the earliest scheduled retry.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_first(retries: &[(Instant, u64)]) {
    match retries.iter().map(|(at, _)| *at).min() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
