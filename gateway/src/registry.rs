//! The sessions this gateway holds, by user, and the dispatcher that hands
//! each delivery to every local device of its recipients. A device whose
//! queue is full is marked lagged instead of blocking anyone: it then catches
//! up from the database, so a slow reader costs a bounded amount of memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use parley_core::{ChatError, Delivery, Dispatch, Revocation, Session, Signal};
use parley_proto::pb;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::Shared;

/// What one device is handed.
#[derive(Debug, Clone)]
pub enum Push {
    /// A message at its place in the device's timeline.
    Message {
        inbox_seq: u64,
        message: Arc<pb::Message>,
    },
    /// A frame written as is (a read receipt, a setting changed elsewhere).
    Signal(Arc<pb::ServerFrame>),
}

impl Push {
    /// The timeline position of a message (0 for a signal).
    pub fn inbox_seq(&self) -> u64 {
        match self {
            Self::Message { inbox_seq, .. } => *inbox_seq,
            Self::Signal(_) => 0,
        }
    }
}

/// What a connection keeps of its registration.
#[derive(Debug)]
pub struct Subscription {
    pub rx: mpsc::Receiver<Push>,
    pub lagged: Arc<AtomicBool>,
    /// Resolves when the connection must close: a newer connection of the
    /// same device replaced it, here or on another gateway, or (with
    /// `revoked` set first) the device was logged out. Made once, so that
    /// the connection does not register a new waiter in every turn of its
    /// loop.
    pub replaced: Pin<Box<OwnedNotified>>,
    pub revoked: Arc<AtomicBool>,
}

struct Entry {
    conn: u64,
    session: Session,
    /// When the connection's token was issued (ms since the epoch).
    issued_at_ms: i64,
    tx: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
    replaced: Arc<Notify>,
    revoked: Arc<AtomicBool>,
}

/// Local sessions by user.
pub struct Registry {
    users: Mutex<HashMap<String, Vec<Entry>>>,
    /// Log-outs of the last [`LOG_OUTS_KEPT`]: a login whose token was
    /// checked before a log-out reached the store, and that registers after
    /// the log-out's notice came, is closed all the same.
    log_outs: Mutex<RecentLogOuts>,
    /// An empty push that wakes a connection to look at its lag flag.
    nudge: Arc<pb::Message>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            users: Mutex::default(),
            log_outs: Mutex::default(),
            nudge: Arc::new(pb::Message::default()),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.len())
            .finish()
    }
}

impl Registry {
    /// Registers connection `conn` of a session, logged in with a token
    /// issued at `issued_at_ms`, with a queue of `capacity`. An older
    /// connection of the same device held here is replaced: it leaves the
    /// registry (it gets no more pushes) and is told to close.
    pub fn register(
        &self,
        session: &Session,
        issued_at_ms: i64,
        conn: u64,
        capacity: usize,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let replaced = Arc::new(Notify::new());
        let revoked = Arc::new(AtomicBool::new(false));
        let entry = Entry {
            conn,
            session: session.clone(),
            issued_at_ms,
            tx,
            lagged: lagged.clone(),
            replaced: replaced.clone(),
            revoked: revoked.clone(),
        };
        let late = self
            .log_outs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_user
            .get(&session.user)
            .is_some_and(|list| {
                list.iter()
                    .any(|(_, r)| revokes(r, &session.user, &session.device, issued_at_ms))
            });
        if late {
            revoked.store(true, Ordering::Release);
            replaced.notify_one();
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let list = users.entry(session.user.clone()).or_default();
        evict(list, &session.device, session.epoch);
        list.push(entry);
        Subscription {
            rx,
            lagged,
            replaced: Box::pin(replaced.notified_owned()),
            revoked,
        }
    }

    /// Closes the local connections a log-out revokes: of its user, on its
    /// device (any device when it names none), logged in with a token
    /// issued no later than the log-out. Returns how many were closed.
    pub fn revoke(&self, r: &Revocation) -> usize {
        self.log_outs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(r.clone());
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = users.get_mut(&r.user) else {
            return 0;
        };
        let before = list.len();
        list.retain(|e| {
            let hit = revokes(r, &e.session.user, &e.session.device, e.issued_at_ms);
            if hit {
                e.revoked.store(true, Ordering::Release);
                e.replaced.notify_one();
            }
            !hit
        });
        let closed = before - list.len();
        if list.is_empty() {
            users.remove(&r.user);
        }
        closed
    }

    /// Closes the local connections of `user`'s `device` older than
    /// `epoch`: the device logged in again, perhaps on another gateway.
    /// Returns how many were closed.
    pub fn replace(&self, user: &str, device: &str, epoch: u64) -> usize {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = users.get_mut(user) else {
            return 0;
        };
        let closed = evict(list, device, epoch);
        if list.is_empty() {
            users.remove(user);
        }
        closed
    }

    /// Every session held, for re-registering presence.
    pub fn sessions(&self) -> Vec<Session> {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .map(|e| e.session.clone())
            .collect()
    }

    /// Makes every connection catch up from the database: deliveries may
    /// have been lost (the broker or presence was away).
    pub fn resync_all(&self) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for entry in users.values().flatten() {
            entry.lagged.store(true, Ordering::Release);
            // A full queue wakes the connection anyway.
            let _ = entry.tx.try_send(Push::Message {
                inbox_seq: 0,
                message: self.nudge.clone(),
            });
        }
    }

    pub fn unregister(&self, user: &str, conn: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = users.get_mut(user) {
            list.retain(|e| e.conn != conn);
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Sessions held, all users together.
    pub fn len(&self) -> usize {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands a delivery to every local device of its recipients.
    pub fn dispatch(&self, delivery: &Delivery) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for (user, inbox_seq) in &delivery.recipients {
            for entry in users.get(user).into_iter().flatten() {
                let push = Push::Message {
                    inbox_seq: *inbox_seq,
                    message: delivery.message.clone(),
                };
                if entry.tx.try_send(push).is_err() {
                    entry.lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Hands a signal to every local device of its users whose queue is
    /// at most half full; the other half is kept for messages, so a chatty
    /// group's receipts and typing never push a device's messages out (and
    /// it into a catch-up). A signal not handed over is dropped, not marked
    /// lagged: it is not in the timeline, and the device reads the state
    /// again when it lists its conversations.
    pub fn signal(&self, signal: &Signal) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for user in &signal.users {
            for entry in users.get(user).into_iter().flatten() {
                if entry.tx.capacity() * 2 > entry.tx.max_capacity() {
                    let _ = entry.tx.try_send(Push::Signal(signal.frame.clone()));
                }
            }
        }
    }
}

/// Log-outs of the last [`LOG_OUTS_KEPT`], by user: a login looks at its
/// user's alone, and old ones are swept when the map has doubled since
/// the last sweep (so a flood of log-outs costs amortized constant time).
#[derive(Debug, Default)]
struct RecentLogOuts {
    by_user: HashMap<String, Vec<(std::time::Instant, Revocation)>>,
    swept_at: usize,
}

impl RecentLogOuts {
    fn add(&mut self, r: Revocation) {
        let now = std::time::Instant::now();
        let fresh = |at: &std::time::Instant| now.duration_since(*at) < LOG_OUTS_KEPT;
        let list = self.by_user.entry(r.user.clone()).or_default();
        list.retain(|(at, _)| fresh(at));
        list.push((now, r));
        if self.by_user.len() > 2 * self.swept_at + 64 {
            self.by_user.retain(|_, list| {
                list.retain(|(at, _)| fresh(at));
                !list.is_empty()
            });
            self.swept_at = self.by_user.len();
        }
    }
}

/// How long the registry remembers a log-out for logins still under way.
const LOG_OUTS_KEPT: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether `r` revokes a login of `user` on `device` with a token issued at
/// `issued_at_ms`.
fn revokes(r: &Revocation, user: &str, device: &str, issued_at_ms: i64) -> bool {
    r.user == user && r.device.as_deref().is_none_or(|d| d == device) && issued_at_ms <= r.at_ms
}

/// Removes from `list` the entries of `device` older than `epoch`, and tells
/// their connections; returns how many.
fn evict(list: &mut Vec<Entry>, device: &str, epoch: u64) -> usize {
    let before = list.len();
    list.retain(|e| {
        let stale = e.session.device == device && e.session.epoch < epoch;
        if stale {
            e.replaced.notify_one();
        }
        !stale
    });
    before - list.len()
}

/// Closes the connections each log-out revokes.
pub fn revoke_logged(registry: &Registry, r: &Revocation) {
    let closed = registry.revoke(r);
    tracing::info!(
        user = %r.user,
        device = r.device.as_deref().unwrap_or("*"),
        closed,
        "devices logged out"
    );
}

/// How far before the last notice heard log-outs are looked up again: the
/// chat service that stamped them may run behind this gateway's clock.
pub const RECHECK_MARGIN_MS: i64 = 10_000;

/// Log-outs looked up per call.
const RECHECK_PAGE: u32 = 5_000;

/// Closes the connections of every log-out since `heard_at_ms` (less the
/// margin), looked up in the store, page by page: for when their notices
/// may have been missed (the broker link was down, a local channel
/// overflowed). Tries for about two minutes while the chat service is
/// unreachable, and gives up at once on any other answer (a chat service
/// of an older version); a revocation applied twice closes nothing more.
pub async fn recheck_log_outs(shared: Arc<Shared>, heard_at_ms: i64) {
    let mut since = heard_at_ms - RECHECK_MARGIN_MS;
    let (mut found, mut closed, mut failures) = (0, 0, 0);
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        match shared.chat.log_outs_since(since, RECHECK_PAGE).await {
            Ok(page) => {
                found += page.len();
                closed += page
                    .iter()
                    .map(|r| shared.registry.revoke(r))
                    .sum::<usize>();
                let (Some(first), Some(last)) = (page.first(), page.last()) else {
                    break;
                };
                if page.len() < RECHECK_PAGE as usize {
                    break;
                }
                // The next page starts at the last one's time. A full page of
                // one millisecond moves past it, and what else was stamped
                // in that millisecond is not looked at: said, not hidden.
                since = if first.at_ms == last.at_ms {
                    tracing::warn!(
                        at_ms = last.at_ms,
                        "over a page of log-outs in one millisecond; the rest of it is skipped"
                    );
                    last.at_ms + 1
                } else {
                    last.at_ms
                };
            }
            Err(ChatError::Unavailable(e)) if failures < 25 => {
                failures += 1;
                tracing::warn!(error = %e, "log-outs not looked up; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %e, "log-outs not looked up; connections they revoke stay open");
                return;
            }
        }
    }
    tracing::info!(
        log_outs = found,
        closed,
        since = heard_at_ms - RECHECK_MARGIN_MS,
        "log-outs looked up again after notices may have been missed"
    );
}

/// Closes the connections of each log-out of the bus in this process
/// (`LocalBus::revocations`) until it closes. When some were missed (a
/// flood of log-outs overflowed the channel), those since the last one
/// heard are looked up in the store.
pub async fn follow_log_outs(shared: Arc<Shared>, mut log_outs: broadcast::Receiver<Revocation>) {
    let mut heard_at_ms = parley_core::now_ms();
    loop {
        match log_outs.recv().await {
            Ok(r) => {
                heard_at_ms = parley_core::now_ms();
                revoke_logged(&shared.registry, &r)
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "log-out notices missed; looking them up");
                let now = parley_core::now_ms();
                recheck_log_outs(shared.clone(), heard_at_ms).await;
                heard_at_ms = now;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Feeds deliveries and signals from the bus to the registry until the
/// bus closes.
pub async fn dispatcher(registry: Arc<Registry>, mut bus: mpsc::Receiver<Dispatch>) {
    while let Some(batch) = bus.recv().await {
        match batch {
            Dispatch::Messages(deliveries) => {
                for delivery in &deliveries {
                    registry.dispatch(delivery);
                }
            }
            Dispatch::Signals(signals) => {
                for signal in &signals {
                    registry.signal(signal);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(user: &str, seq: u64) -> Delivery {
        Delivery {
            message: Arc::new(pb::Message::default()),
            recipients: vec![(user.to_owned(), seq)],
        }
    }

    #[test]
    fn every_device_of_a_user_gets_the_push_and_overflow_marks_lag() {
        let reg = Registry::default();
        let s = |device: &str| Session {
            user: "a".into(),
            device: device.into(),
            gateway: "g".into(),
            epoch: 1,
        };
        let mut phone = reg.register(&s("phone"), 0, 1, 2);
        let mut laptop = reg.register(&s("laptop"), 0, 2, 8);
        for seq in 1..=3 {
            reg.dispatch(&delivery("a", seq));
        }
        assert_eq!(laptop.rx.try_recv().unwrap().inbox_seq(), 1);
        assert_eq!(phone.rx.try_recv().unwrap().inbox_seq(), 1);
        assert!(
            phone.lagged.load(Ordering::Acquire),
            "the third push did not fit"
        );
        assert!(!laptop.lagged.load(Ordering::Acquire));
        assert_eq!(reg.sessions().len(), 2);
        reg.resync_all();
        assert!(
            laptop.lagged.load(Ordering::Acquire),
            "a resync marks everyone"
        );
        reg.unregister("a", 1);
        reg.unregister("a", 2);
        assert!(reg.is_empty());
    }

    #[test]
    fn signals_leave_half_of_a_queue_to_messages() {
        let reg = Registry::default();
        let mut sub = reg.register(&Session::new("a", "phone", "g", 1), 0, 1, 4);
        let signal = Signal {
            users: vec!["a".into()],
            frame: Arc::new(pb::ServerFrame::default()),
        };
        for _ in 0..4 {
            reg.signal(&signal);
        }
        reg.dispatch(&delivery("a", 1));
        reg.dispatch(&delivery("a", 2));
        let got: Vec<u64> = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .map(|p| p.inbox_seq())
            .collect();
        assert_eq!(got, [0, 0, 1, 2], "two signals, then both messages");
        assert!(
            !sub.lagged.load(Ordering::Acquire),
            "no message was dropped"
        );
    }

    #[tokio::test]
    async fn a_device_that_logs_in_again_replaces_its_older_connection() {
        let reg = Registry::default();
        let s = |device: &str, epoch| Session::new("a", device, "g", epoch);
        let old = reg.register(&s("phone", 1), 0, 1, 4);
        let laptop = reg.register(&s("laptop", 2), 0, 2, 4);
        let mut new = reg.register(&s("phone", 3), 0, 3, 4);
        // The old connection is told, and the notice waits for it.
        tokio::time::timeout(std::time::Duration::from_secs(1), old.replaced)
            .await
            .expect("the older phone connection is told it was replaced");
        assert_eq!(reg.len(), 2, "the laptop and the new phone remain");
        reg.dispatch(&delivery("a", 1));
        assert_eq!(new.rx.try_recv().unwrap().inbox_seq(), 1);
        // A late notice from another gateway about an older login, or about
        // this very one, closes nothing.
        assert_eq!(reg.replace("a", "phone", 3), 0);
        assert_eq!(reg.replace("a", "phone", 4), 1);
        assert_eq!(reg.replace("b", "phone", 9), 0);
        drop(laptop);
        reg.unregister("a", 2);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_log_out_closes_the_connections_its_tokens_opened_and_no_later_ones() {
        let reg = Registry::default();
        let s = |device: &str, epoch| Session::new("a", device, "g", epoch);
        // Phone and tablet logged in with tokens from t=1,000; the laptop
        // with one issued after the phone's log-out at t=5,000.
        let phone = reg.register(&s("phone", 1), 1_000, 1, 4);
        let tablet = reg.register(&s("tablet", 2), 1_000, 2, 4);
        let laptop = reg.register(&s("laptop", 3), 6_000, 3, 4);
        let other = reg.register(&Session::new("b", "phone", "g", 4), 1_000, 4, 4);
        let phone_out = Revocation {
            user: "a".into(),
            device: Some("phone".into()),
            at_ms: 5_000,
        };
        assert_eq!(reg.revoke(&phone_out), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), phone.replaced)
            .await
            .expect("the phone is told");
        assert!(phone.revoked.load(Ordering::Acquire), "as a log-out");
        assert!(!tablet.revoked.load(Ordering::Acquire));
        // Every device of a: the tablet's old token goes, the laptop's
        // newer one stays; user b is untouched.
        let all = Revocation {
            user: "a".into(),
            device: None,
            at_ms: 5_000,
        };
        assert_eq!(reg.revoke(&all), 1);
        assert!(tablet.revoked.load(Ordering::Acquire));
        assert!(!laptop.revoked.load(Ordering::Acquire));
        assert!(!other.revoked.load(Ordering::Acquire));
        assert_eq!(reg.len(), 2, "the laptop and b's phone remain");

        // A login whose token was checked before the log-out, registering
        // after its notice: closed as it registers.
        let late = reg.register(&s("phone", 9), 4_000, 9, 4);
        assert!(late.revoked.load(Ordering::Acquire));
        tokio::time::timeout(std::time::Duration::from_secs(1), late.replaced)
            .await
            .expect("told at once");
        let fresh = reg.register(&s("phone", 10), 7_000, 10, 4);
        assert!(
            !fresh.revoked.load(Ordering::Acquire),
            "a newer token is not"
        );
    }
}
