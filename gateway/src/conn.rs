//! One client connection: the protocol state machine (hello, auth, ready),
//! requests forwarded to the chat service, catch-up from the cursor, live
//! pushes with gap detection, heartbeat, flood control and goodbye.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parley_core::limits::limited;
use parley_core::{ChatError, Session};
use parley_proto::codec::{DecodeError, Outgoing};
use parley_proto::pb::{self, ErrorCode, client_frame::Body as Req, server_frame::Body as Resp};
use parley_proto::{PROTOCOL_VERSION, ids};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use crate::io::{FrameIo, ReadError};
use crate::registry::{Push, Subscription};
use crate::{Shared, heap};

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    AwaitHello,
    AwaitAuth,
    Ready,
}

/// Whether `req` may arrive in `phase`; the error to send if not.
pub fn admit(phase: Phase, req: &Req) -> Result<(), &'static str> {
    match (phase, req) {
        (Phase::AwaitHello, Req::Hello(_)) => Ok(()),
        (Phase::AwaitHello, _) => Err("the first frame must be Hello"),
        (Phase::AwaitAuth, Req::Auth(_) | Req::Ping(_) | Req::Refresh(_)) => Ok(()),
        (Phase::AwaitAuth, _) => Err("authenticate first: send Auth"),
        (Phase::Ready, Req::Hello(_) | Req::Auth(_)) => Err("already authenticated"),
        (Phase::Ready, _) => Ok(()),
    }
}

/// Picks the protocol version for a Hello.
pub fn negotiate(hello: &pb::Hello) -> Option<u32> {
    (hello.min_version <= PROTOCOL_VERSION && PROTOCOL_VERSION <= hello.max_version)
        .then_some(PROTOCOL_VERSION)
}

/// A token bucket for sends.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            burst: burst as f64,
            per_sec: per_sec as f64,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec)
            .min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.per_sec > 0.0 {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        } else {
            Err(Duration::MAX)
        }
    }
}

struct Live {
    session: Session,
    /// When the token it logged in with was issued (ms since the epoch).
    issued_at_ms: i64,
    limits: LimitKeys,
    sub: Subscription,
    /// The newest inbox sequence number written to the device.
    delivered: u64,
    /// A catch-up is under way: its last page was full. Pages are written
    /// one at a time, so a device far behind costs one page of memory.
    behind: bool,
    /// What retention removed, found during the catch-up under way.
    missing: Option<(u64, u64)>,
    /// The request a SyncDone answers once the catch-up ends (0: login).
    sync_done: Option<u64>,
    typing: TypingGate,
    /// The users this user blocks: their messages are delivered marked
    /// `from_blocked`. Read at login, kept by the BlockList signals.
    blocked: std::collections::HashSet<String>,
}

/// How often a connection's `typing = true` for one conversation goes on
/// to the chat service; those between are answered and dropped.
const TYPING_EVERY: Duration = Duration::from_secs(2);

/// The typing signals a connection passed on: when it last passed on a
/// `typing = true`, by conversation. A `false` goes on only while the
/// other devices may still show the `true` before it.
#[derive(Debug, Default)]
struct TypingGate {
    passed: std::collections::HashMap<u64, Instant>,
}

impl TypingGate {
    /// Whether this signal goes on.
    fn admit(&mut self, conversation_id: u64, typing: bool, now: Instant) -> bool {
        let shown = parley_core::TYPING_SHOWN;
        if self.passed.len() >= 32 {
            self.passed.retain(|_, at| now.duration_since(*at) < shown);
        }
        let last = self.passed.get(&conversation_id).copied();
        match (typing, last) {
            (true, Some(at)) if now.duration_since(at) < TYPING_EVERY => false,
            (true, _) => {
                self.passed.insert(conversation_id, now);
                true
            }
            (false, Some(at)) => {
                self.passed.remove(&conversation_id);
                now.duration_since(at) < shown
            }
            (false, None) => false,
        }
    }
}

/// Why the connection ends.
enum End {
    /// A fatal error frame, as built (a refusal with a retry-after).
    Refused(Box<pb::ServerFrame>),
    Closed,
    /// An Error frame ends it; it answers the request with this id (0: none).
    Fatal(u64, ErrorCode, String),
    /// A GoAway ends it, with this reason.
    GoAway(&'static str),
    Io,
}

/// GoAway's reasons: what the client can do, in words.
const SHUTTING_DOWN: &str = "server shutting down: reconnect after reconnect_after_ms, through \
     your route lookup if you use one (it answers with a gateway that is up), else to the same \
     address, and resume from your cursor";
const REBALANCING: &str = "gateway rebalancing: reconnect after reconnect_after_ms through \
     your route lookup (it sends you to a less loaded gateway) and resume from your cursor";
const DRAINING: &str = "gateway draining: reconnect after reconnect_after_ms through your route \
     lookup (this gateway has left its answers) and resume from your cursor";

/// A newer connection of the same device took this one's place.
fn replaced() -> End {
    End::Fatal(
        0,
        ErrorCode::DeviceReplaced,
        "this device logged in on another connection".into(),
    )
}

/// The registry closed this connection: replaced, or logged out.
fn evicted(live: Option<&Live>) -> End {
    match live {
        Some(l) if l.sub.revoked.load(Ordering::Acquire) => End::Fatal(
            0,
            ErrorCode::SessionRevoked,
            ChatError::SessionRevoked.to_string(),
        ),
        _ => replaced(),
    }
}

const CATCH_UP_PAGE: u32 = 500;
/// The most pushes a connection takes from its queue in one turn.
const PUSHES_PER_TURN: usize = 64;

/// Serves one connection until it closes, fails or the gateway shuts down.
pub async fn serve<IO: FrameIo>(
    mut io: IO,
    shared: Arc<Shared>,
    conn_id: u64,
    peer: Option<IpAddr>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = &shared.config;
    let mut phase = Phase::AwaitHello;
    let mut live: Option<Live> = None;
    let mut bucket = Bucket::new(cfg.send_rate, cfg.send_burst);
    let mut pushes: Vec<Push> = Vec::with_capacity(0);
    let mut out: Vec<Outgoing> = Vec::new();

    shared.metrics.connections.inc();
    // Made once and polled in every turn: a waiter or a timer made anew in
    // each turn is registered and taken out again for every frame and
    // every push. The idle timer fires at most once per idle timeout and
    // moves on to the last frame's deadline then. They go with the loop, so
    // a drain ticket one of them holds is back before the goodbye.
    let end = {
        let stop = parley_ops::stopped(&mut shutdown);
        let drain = shared.drain.turn();
        let shed = shared.shed.turn();
        let mut last_frame = Instant::now();
        let idle = sleep_until(last_frame + cfg.idle_timeout);
        tokio::pin!(stop, drain, shed, idle);
        loop {
            out.clear();
            let mut step = tokio::select! {
                biased;
                () = &mut stop => Err(End::GoAway(SHUTTING_DOWN)),
                () = &mut drain => Err(End::GoAway(DRAINING)),
                () = &mut shed, if live.is_some() => Err(End::GoAway(REBALANCING)),
                () = &mut idle => {
                    let due = last_frame + cfg.idle_timeout;
                    if due > Instant::now() {
                        idle.as_mut().reset(due);
                        Ok(())
                    } else {
                        Err(End::Fatal(0, ErrorCode::IdleTimeout, format!("no frame for {} ms", cfg.idle_timeout.as_millis())))
                    }
                }
                n = recv_pushes(&mut live, &mut pushes) => {
                    match (n, live.as_mut()) {
                        (None, l) => Err(evicted(l.as_deref())),
                        (Some(_), Some(l)) => {
                            let pushed = heap(on_pushes(&shared, l, pushes.drain(..), &mut out));
                            pushed.await
                        }
                        _ => Ok(()),
                    }
                }
                frame = io.read() => match frame {
                    Ok(Some(frame)) => {
                        last_frame = Instant::now();
                        // Boxed, as every large step here: an idle connection's
                        // state is only what waits in this select.
                        let handled = heap(on_frame(&shared, conn_id, peer, frame, &mut phase, &mut live, &mut bucket, &mut out));
                        handled.await
                    }
                    Ok(None) => Err(End::Closed),
                    Err(ReadError::Decode(DecodeError::TooLarge { len, max })) => Err(End::Fatal(
                        0,
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes exceeds the limit of {max} bytes"),
                    )),
                    Err(ReadError::Decode(e)) => Err(End::Fatal(e.request_id(), ErrorCode::BadFrame, e.to_string())),
                    Err(e @ ReadError::NotBinary(_)) => Err(End::Fatal(0, ErrorCode::BadFrame, e.to_string())),
                    Err(ReadError::Truncated | ReadError::Io(_)) => Err(End::Closed),
                },
            };
            // Pushes already waiting leave in the same write as the answer (a
            // sender's ack and the copy of its message for its own timeline
            // often arrive together): one system call, not two.
            if step.is_ok()
                && let Some(l) = live.as_mut().filter(|l| !l.behind)
            {
                while pushes.len() < PUSHES_PER_TURN
                    && let Ok(push) = l.sub.rx.try_recv()
                {
                    pushes.push(push);
                }
                if !pushes.is_empty() {
                    let pushed = heap(on_pushes(&shared, l, pushes.drain(..), &mut out));
                    step = pushed.await;
                }
            }
            if !out.is_empty() {
                shared.metrics.written(&out);
                let written = heap(write(&mut io, &out, cfg.write_timeout));
                if !written.await {
                    break End::Io;
                }
            }
            if let Err(end) = step {
                break end;
            }
            // The rest of a catch-up, a page per write.
            let mut next = Ok(());
            while let Some(l) = live.as_mut().filter(|l| l.behind) {
                out.clear();
                let page = heap(catch_up(&shared, l, &mut out));
                next = page.await;
                if !out.is_empty() {
                    shared.metrics.written(&out);
                    let written = heap(write(&mut io, &out, cfg.write_timeout));
                    if !written.await {
                        next = Err(End::Io);
                    }
                }
                if next.is_err() {
                    break;
                }
            }
            if let Err(end) = next {
                break end;
            }
        }
    };

    let farewell = match end {
        End::Refused(mut frame) => {
            if let Some(Resp::Error(e)) = &mut frame.body {
                tracing::debug!(conn_id, code = e.code, message = %e.message, "closing connection");
                e.fatal = true;
            }
            Some(*frame)
        }
        End::Fatal(rid, code, message) => {
            tracing::debug!(conn_id, ?code, %message, "closing connection");
            let mut frame = pb::ServerFrame::error(rid, code, message);
            // UNAVAILABLE during login or a catch-up ends the connection too.
            if let Some(Resp::Error(e)) = &mut frame.body {
                e.fatal = true;
            }
            Some(frame)
        }
        End::GoAway(reason) => {
            let go = pb::GoAway {
                reason: reason.into(),
                reconnect_after_ms: cfg.reconnect_hint.as_millis() as u32,
                redirect: String::new(),
            };
            Some(pb::ServerFrame::new(0, Resp::GoAway(go)))
        }
        End::Closed | End::Io => None,
    };
    // Out of the registry first: a replaced device's newer connection must
    // not wait for this one's goodbye.
    if let Some(l) = &live {
        shared.registry.unregister(&l.session.user, conn_id);
    }
    if let Some(frame) = farewell {
        let frames = [Outgoing::from(frame)];
        // Counted as every write is: the frame, the write, an error's code.
        shared.metrics.written(&frames);
        let bye = heap(async {
            if write(&mut io, &frames, cfg.write_timeout).await {
                io.close().await;
            }
        });
        bye.await;
    }
    shared.metrics.connections.dec();
    if let Some(l) = live {
        shared.go_offline(l.session).await;
    }
}

/// Writes frames; false when the peer is gone or too slow to read them.
async fn write<IO: FrameIo>(io: &mut IO, frames: &[Outgoing], limit: Duration) -> bool {
    match timeout(limit, io.write(frames)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!(
                "slow reader disconnected: a write did not finish in {:?}",
                limit
            );
            false
        }
    }
}

/// Waits for pushes when the connection is live; never when it is not.
/// `None`: a newer connection of the same device replaced this one (the
/// registry dropped this connection's queue and told it).
async fn recv_pushes(live: &mut Option<Live>, buf: &mut Vec<Push>) -> Option<usize> {
    match live {
        Some(l) => tokio::select! {
            biased;
            () = l.sub.replaced.as_mut() => None,
            n = l.sub.rx.recv_many(buf, PUSHES_PER_TURN) => (n > 0).then_some(n),
        },
        None => std::future::pending().await,
    }
}

async fn on_pushes(
    shared: &Shared,
    live: &mut Live,
    pushes: impl Iterator<Item = Push>,
    out: &mut Vec<Outgoing>,
) -> Result<(), End> {
    let mut gap = live.sub.lagged.swap(false, Ordering::AcqRel);
    for push in pushes {
        let (inbox_seq, message) = match push {
            Push::Message { inbox_seq, message } => (inbox_seq, message),
            Push::Signal(frame) => {
                if let Some(Resp::Blocks(b)) = &frame.body {
                    live.blocked = b.users.iter().cloned().collect();
                }
                out.push(Outgoing::Frame(pb::ServerFrame::clone(&frame)));
                continue;
            }
        };
        if inbox_seq <= live.delivered {
            continue;
        }
        if gap || inbox_seq != live.delivered + 1 {
            // Missed something (overflow or reordering): the database has it.
            gap = true;
            continue;
        }
        live.delivered = inbox_seq;
        // Encoded from the copy every recipient shares, not a clone.
        let from_blocked = live.blocked.contains(&message.sender_id);
        out.push(Outgoing::Deliver {
            inbox_seq,
            message,
            from_blocked,
        });
    }
    if gap {
        catch_up(shared, live, out).await?;
    }
    Ok(())
}

fn deliver(inbox_seq: u64, message: pb::Message, from_blocked: bool) -> Outgoing {
    Outgoing::Frame(pb::ServerFrame::new(
        0,
        Resp::Deliver(pb::Deliver {
            inbox_seq,
            message: Some(message),
            from_blocked,
        }),
    ))
}

/// Sends the next page of what follows `live.delivered` from the database.
/// While pages come back full, `live.behind` stays set and the caller asks
/// again after writing this one; the last page is followed by the SyncDone
/// a request is waiting for.
async fn catch_up(shared: &Shared, live: &mut Live, out: &mut Vec<Outgoing>) -> Result<(), End> {
    let page = shared
        .chat
        .sync(&live.session.user, live.delivered, CATCH_UP_PAGE)
        .await
        .map_err(|e| {
            let rid = live.sync_done.unwrap_or(0);
            End::Fatal(rid, ErrorCode::Unavailable, e.client_message())
        })?;
    // A cursor from the future (a confused client) restarts at the head.
    live.delivered = live.delivered.min(page.head);
    if let Some((from, to)) = page.missing {
        live.missing = Some(live.missing.map_or((from, to), |(f, _)| (f, to)));
        live.delivered = to;
    }
    live.behind = page.entries.len() as u32 == CATCH_UP_PAGE;
    for (seq, message) in page.entries {
        live.delivered = seq;
        let from_blocked = live.blocked.contains(&message.sender_id);
        out.push(deliver(seq, message, from_blocked));
    }
    if !live.behind
        && let Some(request_id) = live.sync_done.take()
    {
        out.push(sync_done(request_id, live.delivered, live.missing.take()).into());
    }
    Ok(())
}

/// Starts a catch-up from `live.delivered` that ends with a SyncDone for
/// `request_id`.
async fn start_sync(
    shared: &Shared,
    live: &mut Live,
    request_id: u64,
    out: &mut Vec<Outgoing>,
) -> Result<(), End> {
    live.missing = None;
    live.sync_done = Some(request_id);
    catch_up(shared, live, out).await
}

/// Records a new login in presence, where the newest login (the larger
/// epoch) wins: this one yields to a newer one already recorded, unless
/// that one's epoch is from the future (a gateway whose clock runs ahead),
/// which is overtaken with a larger epoch. The device's older connection,
/// if another gateway holds it, is told to close (this gateway's own was
/// closed when the login registered). A device that would be one too many
/// for its user is refused (TOO_MANY_DEVICES, fatal).
async fn go_online(shared: &Shared, l: &mut Live, conn_id: u64, rid: u64) -> Result<(), End> {
    let cap = shared.config.limits.devices_per_user;
    let mut met = shared.presence.online_within(&l.session, cap).await;
    if let Ok(Some(newer)) = &met
        && newer.epoch > l.session.epoch
    {
        // A newer login of the device got there first, here (the registry
        // already replaced this one) or elsewhere: this login is the stale
        // one (one its client gave up on, say) and yields. Only an entry
        // from the future, of a gateway whose clock runs ahead, is
        // overtaken, or it would keep the device's deliveries away.
        let now = parley_core::now_ms().max(0) as u64 * 1000;
        let stale = l.sub.rx.is_closed()
            || newer.gateway == l.session.gateway
            || newer.epoch <= now + CLOCK_SKEW_US;
        shared.registry.unregister(&l.session.user, conn_id);
        if stale {
            return Err(replaced());
        }
        shared.observe_epoch(newer.epoch);
        l.session.epoch = shared.next_epoch();
        l.sub = shared.registry.register(
            &l.session,
            l.issued_at_ms,
            conn_id,
            shared.config.push_queue,
        );
        met = shared.presence.online_within(&l.session, cap).await;
    }
    match met {
        Err(e @ ChatError::TooManyDevices(_)) => {
            shared.registry.unregister(&l.session.user, conn_id);
            return Err(End::Fatal(rid, ErrorCode::TooManyDevices, e.to_string()));
        }
        // The device still gets everything: the gateway registers its
        // sessions again and has them catch up once presence is back.
        Err(e) => {
            tracing::warn!(error = %e, "presence not recorded; live delivery waits for its recovery")
        }
        Ok(Some(older)) if older.epoch < l.session.epoch && older.gateway != l.session.gateway => {
            if let Some(bus) = &shared.notices
                && let Err(e) = bus.replaced(&older.gateway, &l.session).await
            {
                tracing::warn!(error = %e, gateway = %older.gateway, "replacement notice not sent");
            }
        }
        Ok(_) => {}
    }
    Ok(())
}

/// Counts a login (or a refresh before one) against its address's limit;
/// past it the connection ends with a RATE_LIMITED that says when to retry.
/// An IPv6 address counts by its /64, what one subscriber is given.
fn per_address(shared: &Shared, peer: Option<IpAddr>, rid: u64) -> Result<(), End> {
    let (Some(rate), Some(ip)) = (shared.config.limits.logins_per_ip, peer) else {
        return Ok(());
    };
    let key = match ip {
        IpAddr::V4(v4) => format!("login-ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("login-ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    };
    shared.limiter.check(&key, rate).map_err(|wait| {
        let refused = limited("logins from your address", rate, wait);
        End::Refused(Box::new(refused.frame(rid)))
    })
}

/// A user's keys in the rate limiter, made once per login so that a check
/// on the send path allocates nothing.
struct LimitKeys {
    send: String,
    read: String,
    group: String,
    upload: String,
}

impl LimitKeys {
    fn of(user: &str) -> Self {
        Self {
            send: format!("send:{user}"),
            read: format!("read:{user}"),
            group: format!("group:{user}"),
            upload: format!("upload:{user}"),
        }
    }
}

/// Counts a request against its user's limit for its kind, if any.
fn limit(shared: &Shared, keys: &LimitKeys, req: &Req) -> Result<(), ChatError> {
    let limits = &shared.config.limits;
    let (rate, key, what) = match req {
        Req::Send(_) => (limits.sends_per_user, &keys.send, "sends"),
        Req::Sync(_)
        | Req::History(_)
        | Req::ListConversations(_)
        | Req::ListDevices(_)
        | Req::Download(_)
        | Req::MarkRead(_)
        | Req::Receipts(_)
        | Req::EditHistory(_)
        | Req::ListBlocks(_)
        | Req::Typing(_) => (limits.reads_per_user, &keys.read, "reads"),
        Req::Upload(_) => (limits.uploads_per_user, &keys.upload, "uploads"),
        Req::OpenDirect(_)
        | Req::CreateGroup(_)
        | Req::AddMembers(_)
        | Req::RemoveMembers(_)
        | Req::LeaveGroup(_)
        | Req::Block(_)
        | Req::Unblock(_)
        | Req::LogOut(_)
        | Req::RegisterPush(_)
        | Req::RemovePush(_)
        | Req::SetNotifications(_)
        | Req::Mute(_)
        | Req::Pin(_)
        | Req::Recall(_)
        | Req::Edit(_) => (limits.group_ops_per_user, &keys.group, "group operations"),
        _ => return Ok(()),
    };
    let Some(rate) = rate else {
        return Ok(());
    };
    shared
        .limiter
        .check(key, rate)
        .map_err(|wait| limited(what, rate, wait))
}

/// RATE_LIMITED for a request past the connection's send bucket.
fn rate_limited(rid: u64, wait: Duration, rate: u32, burst: u32) -> pb::ServerFrame {
    let retry_after_ms = wait.as_millis().clamp(1, u32::MAX as u128) as u32;
    pb::ServerFrame::new(
        rid,
        Resp::Error(pb::Error {
            code: ErrorCode::RateLimited as i32,
            message: format!(
                "more than {rate} sends a second (burst {burst}); resend after {retry_after_ms} ms"
            ),
            fatal: false,
            retry_after_ms,
        }),
    )
}

/// How far another gateway's clock may run ahead of this one's before its
/// epochs count as from the future (microseconds).
const CLOCK_SKEW_US: u64 = 2_000_000;

fn sync_done(request_id: u64, cursor: u64, missing: Option<(u64, u64)>) -> pb::ServerFrame {
    let (from, to) = missing.unwrap_or((0, 0));
    let done = pb::SyncDone {
        cursor,
        complete: missing.is_none(),
        missing_from: from,
        missing_to: to,
    };
    pb::ServerFrame::new(request_id, Resp::SyncDone(done))
}

#[allow(clippy::too_many_arguments)]
async fn on_frame(
    shared: &Shared,
    conn_id: u64,
    peer: Option<IpAddr>,
    frame: pb::ClientFrame,
    phase: &mut Phase,
    live: &mut Option<Live>,
    bucket: &mut Bucket,
    out: &mut Vec<Outgoing>,
) -> Result<(), End> {
    let rid = frame.request_id;
    let Some(req) = frame.body else {
        return Err(End::Fatal(
            rid,
            ErrorCode::BadFrame,
            "frame has no body".into(),
        ));
    };
    admit(*phase, &req).map_err(|m| End::Fatal(rid, ErrorCode::UnexpectedFrame, m.into()))?;
    let cfg = &shared.config;
    match req {
        Req::Hello(hello) => {
            let Some(version) = negotiate(&hello) else {
                return Err(End::Fatal(
                    rid,
                    ErrorCode::UnsupportedVersion,
                    format!("this server speaks protocol version {PROTOCOL_VERSION}"),
                ));
            };
            *phase = Phase::AwaitAuth;
            out.push(
                pb::ServerFrame::new(
                    rid,
                    Resp::HelloOk(pb::HelloOk {
                        version,
                        server: format!("parley/{}", env!("CARGO_PKG_VERSION")),
                        max_frame_bytes: cfg.max_frame_bytes as u32,
                        heartbeat_interval_ms: (cfg.idle_timeout / 3).as_millis() as u32,
                        idle_timeout_ms: cfg.idle_timeout.as_millis() as u32,
                        send_rate_per_sec: cfg.send_rate,
                        send_burst: cfg.send_burst,
                        pong_timeout_ms: cfg.pong_timeout.as_millis() as u32,
                    }),
                )
                .into(),
            );
        }
        Req::Auth(auth) => {
            ids::check_device_id(&auth.device_id)
                .map_err(|m| End::Fatal(rid, ErrorCode::Unauthenticated, m))?;
            per_address(shared, peer, rid)?;
            // A chat service that cannot be reached is not a bad token: the
            // client must try again later, not give up on its token.
            let login = shared
                .chat
                .authenticate(&auth.token, &auth.device_id)
                .await
                .map_err(|e| {
                    let code = match e.code() {
                        c @ (ErrorCode::TokenExpired
                        | ErrorCode::Unauthenticated
                        | ErrorCode::SessionRevoked) => c,
                        _ => ErrorCode::Unavailable,
                    };
                    End::Fatal(rid, code, e.client_message())
                })?;
            if let Some(rate) = cfg.limits.logins_per_user {
                shared
                    .limiter
                    .check(&format!("login:{}", login.user), rate)
                    .map_err(|wait| {
                        End::Refused(Box::new(
                            limited("logins of this user", rate, wait).frame(rid),
                        ))
                    })?;
            }
            let user = login.user;
            let token_expires_at_ms = login.expires_at_ms;
            let session = Session {
                user: user.clone(),
                device: auth.device_id.clone(),
                gateway: cfg.gateway_id.clone(),
                epoch: shared.next_epoch(),
            };
            // Register here and in presence before reading the head, so
            // nothing committed from then on can slip between catch-up and
            // live delivery.
            let sub =
                shared
                    .registry
                    .register(&session, login.issued_at_ms, conn_id, cfg.push_queue);
            // A log-out that came between the token's check and now.
            if sub.revoked.load(Ordering::Acquire) {
                shared.registry.unregister(&user, conn_id);
                return Err(End::Fatal(
                    rid,
                    ErrorCode::SessionRevoked,
                    ChatError::SessionRevoked.to_string(),
                ));
            }
            let mut l = Live {
                limits: LimitKeys::of(&session.user),
                session,
                issued_at_ms: login.issued_at_ms,
                sub,
                delivered: 0,
                behind: false,
                missing: None,
                sync_done: None,
                typing: TypingGate::default(),
                blocked: Default::default(),
            };
            go_online(shared, &mut l, conn_id, rid).await?;
            let opened = shared
                .chat
                .session_opened(&user, &auth.device_id, auth.cursor)
                .await;
            let (resume, head) = match opened {
                Ok(r) => r,
                Err(e) => {
                    shared.registry.unregister(&user, conn_id);
                    shared.go_offline(l.session).await;
                    return Err(End::Fatal(rid, ErrorCode::Unavailable, e.client_message()));
                }
            };
            l.delivered = resume;
            // Before the catch-up, so that it is marked too. Without it
            // (a chat service of an older release during a rolling
            // upgrade, a moment's outage) the login goes on unmarked: the
            // next BlockList push or login sets it.
            match shared
                .chat
                .call(&user, &auth.device_id, Req::ListBlocks(pb::ListBlocks {}))
                .await
            {
                Ok(Resp::Blocks(b)) => l.blocked = b.users.into_iter().collect(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "block list not read at login"),
            }
            *phase = Phase::Ready;
            out.push(
                pb::ServerFrame::new(
                    rid,
                    Resp::AuthOk(pb::AuthOk {
                        user_id: user,
                        device_id: auth.device_id,
                        inbox_head: head,
                        resume_from: resume,
                        token_expires_at_ms,
                    }),
                )
                .into(),
            );
            let result = start_sync(shared, &mut l, 0, out).await;
            *live = Some(l);
            result?;
        }
        Req::Ping(p) => {
            out.push(pb::ServerFrame::new(rid, Resp::Pong(pb::Pong { nonce: p.nonce })).into())
        }
        // Before Auth as well as after; counted as a send, so that a
        // connection cannot make the store rotate tokens as fast as it
        // writes. A refusal is fatal as at Auth, an outage is not.
        Req::Refresh(r) => {
            if live.is_none() {
                per_address(shared, peer, rid)?;
            }
            if let Err(wait) = bucket.take() {
                out.push(rate_limited(rid, wait, cfg.send_rate, cfg.send_burst).into());
                return Ok(());
            }
            match shared.chat.refresh(&r.refresh_token).await {
                Ok(tokens) => out.push(pb::ServerFrame::new(rid, Resp::Tokens(tokens)).into()),
                Err(e) => match e.code() {
                    c @ (ErrorCode::Unauthenticated | ErrorCode::SessionRevoked) => {
                        return Err(End::Fatal(rid, c, e.client_message()));
                    }
                    c => out.push(pb::ServerFrame::error(rid, c, e.client_message()).into()),
                },
            }
        }
        Req::Ack(ack) => {
            let l = live.as_ref().expect("admitted only when ready");
            let cursor = ack.cursor.min(l.delivered);
            shared.chat.ack(&l.session.user, &l.session.device, cursor);
        }
        Req::Sync(sync) => {
            let l = live.as_mut().expect("admitted only when ready");
            if let Err(e) = limit(shared, &l.limits, &Req::Sync(pb::SyncRequest::default())) {
                out.push(e.frame(rid).into());
                return Ok(());
            }
            l.delivered = sync.after;
            start_sync(shared, l, rid, out).await?;
        }
        Req::Typing(t)
            if !live
                .as_mut()
                .expect("admitted only when ready")
                .typing
                .admit(t.conversation_id, t.typing, Instant::now()) =>
        {
            out.push(pb::ServerFrame::new(rid, Resp::Done(pb::Done {})).into());
        }
        req => {
            if matches!(req, Req::Send(_))
                && let Err(wait) = bucket.take()
            {
                shared.metrics.messages_in.inc();
                out.push(rate_limited(rid, wait, cfg.send_rate, cfg.send_burst).into());
                return Ok(());
            }
            let l = live.as_ref().expect("admitted only when ready");
            if let Err(e) = limit(shared, &l.limits, &req) {
                if matches!(req, Req::Send(_)) {
                    shared.metrics.messages_in.inc();
                }
                out.push(e.frame(rid).into());
                return Ok(());
            }
            let send = matches!(req, Req::Send(_));
            let started = std::time::Instant::now();
            let result = shared
                .chat
                .call_in_session(&l.session.user, &l.session.device, l.issued_at_ms, req)
                .await;
            if send {
                shared.metrics.messages_in.inc();
                shared
                    .metrics
                    .send_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            match result {
                Ok(resp) => out.push(pb::ServerFrame::new(rid, resp).into()),
                // The device was logged out meanwhile (a push registration
                // racing its log-out): fatal, as at Auth.
                Err(e) if e.code() == ErrorCode::SessionRevoked => {
                    return Err(End::Fatal(
                        rid,
                        ErrorCode::SessionRevoked,
                        e.client_message(),
                    ));
                }
                Err(e) => {
                    out.push(pb::ServerFrame::error(rid, e.code(), e.client_message()).into())
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_admitted_only_in_their_phase() {
        let hello = Req::Hello(pb::Hello::default());
        let auth = Req::Auth(pb::Auth::default());
        let send = Req::Send(pb::Send::default());
        let ping = Req::Ping(pb::Ping::default());
        assert!(admit(Phase::AwaitHello, &hello).is_ok());
        assert!(admit(Phase::AwaitHello, &auth).is_err());
        assert!(admit(Phase::AwaitHello, &ping).is_err());
        assert!(admit(Phase::AwaitAuth, &auth).is_ok());
        assert!(admit(Phase::AwaitAuth, &ping).is_ok());
        assert!(admit(Phase::AwaitAuth, &send).is_err());
        assert!(admit(Phase::Ready, &send).is_ok());
        assert!(admit(Phase::Ready, &hello).is_err());
        assert!(admit(Phase::Ready, &auth).is_err());
    }

    #[test]
    fn typing_goes_on_every_two_seconds_and_a_stop_only_after_a_start() {
        let mut gate = TypingGate::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!gate.admit(7, false, at(0)), "nothing to stop");
        assert!(gate.admit(7, true, at(0)));
        assert!(!gate.admit(7, true, at(1_999)), "told already");
        assert!(gate.admit(8, true, at(1_999)), "another conversation");
        assert!(gate.admit(7, true, at(2_000)));
        assert!(gate.admit(7, false, at(2_100)), "the stop of a start");
        assert!(!gate.admit(7, false, at(2_200)), "stopped already");
        assert!(
            !gate.admit(8, false, at(10_000)),
            "the start shown has expired"
        );
        for c in 0..40 {
            gate.admit(100 + c, true, at(20_000));
        }
        assert!(gate.passed.len() <= 40, "old ones are swept");
        assert!(!gate.passed.contains_key(&7));
    }

    #[test]
    fn versions_are_negotiated_within_the_client_range() {
        let h = |min, max| pb::Hello {
            min_version: min,
            max_version: max,
            client: String::new(),
        };
        assert_eq!(negotiate(&h(1, 3)), Some(1));
        assert_eq!(negotiate(&h(2, 3)), None);
        assert_eq!(negotiate(&h(0, 0)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_over_time() {
        let mut b = Bucket::new(10, 2);
        assert!(b.take().is_ok() && b.take().is_ok());
        let wait = b.take().unwrap_err();
        assert!(
            wait.abs_diff(Duration::from_millis(100)) < Duration::from_millis(1),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        let wait = b.take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(41) && wait >= Duration::from_millis(39),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(b.take().is_ok());
    }
}
