//! Rate limits across the cluster: logins per IP and per user, and per user
//! sends, reads (history and sync) and group operations, each counted over
//! a sliding window by every process together.
//!
//! Every hop batches, and a limit is checked on every send, so a check never
//! waits for the network: each process counts locally and, every
//! [`SYNC_EVERY`], adds what it counted to the shared counters ([`Counters`]:
//! Redis in a cluster, memory in one process) in one round trip, reading
//! back the cluster's totals. A check compares the cluster's last known
//! count plus what this process counted since with the limit, so the
//! cluster can overshoot a limit by what the other processes admit within
//! one sync period (a few percent at the defaults), and a process judges a
//! key it has not checked for a while once on its last known count before
//! it reads the key's count again. The window slides as
//! Cloudflare's does: the previous fixed window's count, weighted by how much
//! of it still overlaps, plus the current one's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::ChatError;

/// How often counts are pushed to the shared counters and read back.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// At most `limit` actions per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub window: Duration,
}

impl Rate {
    pub const fn per_minute(limit: u32) -> Self {
        Self {
            limit,
            window: Duration::from_secs(60),
        }
    }

    pub const fn per_10s(limit: u32) -> Self {
        Self {
            limit,
            window: Duration::from_secs(10),
        }
    }
}

/// The limits; `None` turns one off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Logins (Auth frames) from one IP address, whatever their user: the
    /// guard against token guessing. Generous, for offices behind one NAT.
    pub logins_per_ip: Option<Rate>,
    /// Logins of one user, all devices together.
    pub logins_per_user: Option<Rate>,
    /// Sends of one user, all devices together (each connection also has
    /// its own send bucket).
    pub sends_per_user: Option<Rate>,
    /// Reads of one user: history pages, catch-up requests (SyncRequest),
    /// conversation and device lists, read markers, receipts and typing.
    pub reads_per_user: Option<Rate>,
    /// Group operations of one user: creating, adding, removing, leaving,
    /// opening direct conversations, blocks, log-outs, push settings, mutes
    /// and pins.
    pub group_ops_per_user: Option<Rate>,
    /// Upload slots asked for by one user (UploadRequest).
    pub uploads_per_user: Option<Rate>,
    /// Devices of one user online at once, over every gateway. A device
    /// online has one connection: a second login of it replaces the first.
    pub devices_per_user: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            logins_per_ip: Some(Rate::per_minute(600)),
            logins_per_user: Some(Rate::per_minute(60)),
            sends_per_user: Some(Rate::per_10s(1_000)),
            reads_per_user: Some(Rate::per_10s(300)),
            group_ops_per_user: Some(Rate::per_minute(120)),
            uploads_per_user: Some(Rate::per_minute(60)),
            devices_per_user: Some(10),
        }
    }
}

impl Limits {
    /// Every limit off.
    pub fn none() -> Self {
        Self {
            logins_per_ip: None,
            logins_per_user: None,
            sends_per_user: None,
            reads_per_user: None,
            group_ops_per_user: None,
            uploads_per_user: None,
            devices_per_user: None,
        }
    }
}

/// One counter's increment, in fixed window `index` of `window_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterAdd {
    pub key: String,
    pub window_ms: u64,
    pub index: u64,
    pub by: u64,
}

/// The shared counters behind every process's [`Limiter`].
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// Adds each increment to its counter (the counter of window `index`
    /// lives at least two windows) and returns, for each, the cluster's
    /// count in window `index - 1` and in window `index` after the add. One
    /// round trip for the whole batch.
    async fn add(&self, adds: &[CounterAdd]) -> Result<Vec<(u64, u64)>, ChatError>;
}

/// Counters in memory, for one process.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    counts: Mutex<HashMap<(String, u64, u64), u64>>,
}

#[async_trait]
impl Counters for MemoryCounters {
    async fn add(&self, adds: &[CounterAdd]) -> Result<Vec<(u64, u64)>, ChatError> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let out = adds
            .iter()
            .map(|a| {
                let at = (a.key.clone(), a.window_ms, a.index);
                let current = *counts.entry(at).and_modify(|n| *n += a.by).or_insert(a.by);
                let prev = a.index.checked_sub(1).map_or(0, |p| {
                    counts
                        .get(&(a.key.clone(), a.window_ms, p))
                        .copied()
                        .unwrap_or(0)
                });
                (prev, current)
            })
            .collect();
        // Windows two behind the present are never read again.
        let now = now_ms();
        counts.retain(|(_, w, i), _| *i + 2 > now / (*w).max(1));
        Ok(out)
    }
}

/// What this process knows of one counter.
#[derive(Debug, Default)]
struct Entry {
    window_ms: u64,
    /// The fixed window the counts below are of.
    index: u64,
    /// The cluster's counts at the last sync: previous and current window.
    prev: u64,
    current: u64,
    /// Counted here since the last sync.
    unsynced: u64,
    /// Counted here and on its way to the shared counters: still counted
    /// until the answer says the cluster's count holds it.
    in_flight: u64,
    /// Checked since the last sync: its count is read back at the next one.
    checked: bool,
}

/// Rate limits checked locally and shared through [`Counters`].
pub struct Limiter {
    counters: Arc<dyn Counters>,
    entries: Mutex<HashMap<String, Entry>>,
    /// Syncs that failed (the shared counters unreachable): limits then hold
    /// per process, from what it counted itself.
    failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    crate::now_ms().max(0) as u64
}

impl Limiter {
    /// A limiter over `counters`, synced every [`SYNC_EVERY`] by a task on
    /// the current runtime for as long as the limiter lives.
    pub fn start(counters: Arc<dyn Counters>) -> Arc<Self> {
        let limiter = Arc::new(Self {
            counters,
            entries: Mutex::default(),
            failures: Default::default(),
        });
        tokio::spawn(sync_loop(Arc::downgrade(&limiter)));
        limiter
    }

    /// Counts one action on `key` if `rate` allows it now; otherwise how
    /// long until it would. Never waits: it judges from the last sync and
    /// what this process counted since.
    pub fn check(&self, key: &str, rate: Rate) -> Result<(), Duration> {
        self.check_at(key, rate, now_ms())
    }

    fn check_at(&self, key: &str, rate: Rate, now: u64) -> Result<(), Duration> {
        let window_ms = rate.window.as_millis().max(1) as u64;
        let index = now / window_ms;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // The key is copied only the first time it is seen in a while.
        if !entries.contains_key(key) {
            entries.insert(key.to_owned(), Entry::default());
        }
        let Some(e) = entries.get_mut(key) else {
            return Ok(());
        };
        if e.window_ms != window_ms || e.index + 1 < index {
            *e = Entry {
                window_ms,
                index,
                ..Entry::default()
            };
        } else if e.index < index {
            // The window moved on since the last sync: the current becomes
            // the previous; what was counted here since counts in the new
            // one (it will be pushed there).
            e.prev = e.current;
            e.current = 0;
            e.index = index;
        }
        e.checked = true;
        let into = now - index * window_ms;
        let overlap = 1.0 - into as f64 / window_ms as f64;
        let current = (e.current + e.in_flight + e.unsynced) as f64;
        let estimate = e.prev as f64 * overlap + current;
        let limit = rate.limit as f64;
        if estimate + 1.0 <= limit {
            e.unsynced += 1;
            return Ok(());
        }
        // When enough of the previous window has slid out; or else, once
        // the current window is the previous one, when enough of it has.
        let excess = estimate + 1.0 - limit;
        let wait = if e.prev > 0 && excess <= e.prev as f64 * overlap {
            (excess / e.prev as f64 * window_ms as f64).ceil() as u64
        } else {
            let slide = (1.0 - (limit - 1.0) / current).max(0.0);
            window_ms - into + (slide * window_ms as f64).ceil() as u64
        };
        Err(Duration::from_millis(wait.max(1)))
    }

    /// Pushes what was counted since the last sync and reads the cluster's
    /// counts back for every key checked since, one round trip for all of
    /// them. Keys not checked since are left alone: a key that was idle
    /// here is judged once on its last known count, then refreshed.
    pub async fn sync(&self) {
        let adds: Vec<CounterAdd> = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let now = now_ms();
            // Counters whose windows have both passed hold nothing that
            // matters any more, counted here or not.
            entries.retain(|_, e| e.index + 2 > now / e.window_ms.max(1));
            entries
                .iter_mut()
                .filter(|(_, e)| e.checked || e.unsynced > 0)
                .map(|(key, e)| {
                    e.checked = false;
                    e.in_flight = std::mem::take(&mut e.unsynced);
                    CounterAdd {
                        key: key.clone(),
                        window_ms: e.window_ms,
                        index: e.index,
                        by: e.in_flight,
                    }
                })
                .collect()
        };
        if adds.is_empty() {
            return;
        }
        match self.counters.add(&adds).await {
            Ok(counts) => {
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                for (a, (prev, current)) in adds.iter().zip(counts) {
                    if let Some(e) = entries.get_mut(&a.key) {
                        e.in_flight = 0;
                        if e.index == a.index && e.window_ms == a.window_ms {
                            e.prev = prev;
                            e.current = current;
                        }
                    }
                }
            }
            Err(e) => {
                // Put the counts back, to be pushed with the next sync; the
                // limits hold per process meanwhile.
                let failures = 1 + self
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "rate-limit counters unreachable; limits hold per process");
                }
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                for a in adds {
                    if let Some(e) = entries.get_mut(&a.key) {
                        e.unsynced += std::mem::take(&mut e.in_flight);
                    }
                }
            }
        }
    }
}

async fn sync_loop(limiter: Weak<Limiter>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.sync().await;
    }
}

/// The refusal of a request past `what`'s limit, with when to try again.
pub fn limited(what: &str, rate: Rate, wait: Duration) -> ChatError {
    let retry_after_ms = wait.as_millis().clamp(1, u32::MAX as u128) as u32;
    ChatError::RateLimited {
        message: format!(
            "more than {} {what} in {} s; retry after {retry_after_ms} ms",
            rate.limit,
            rate.window.as_secs()
        ),
        retry_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(counters: Arc<dyn Counters>) -> Limiter {
        Limiter {
            counters,
            entries: Mutex::default(),
            failures: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_limit_holds_across_processes_sharing_counters() {
        let shared: Arc<dyn Counters> = Arc::new(MemoryCounters::default());
        let (a, b) = (limiter(shared.clone()), limiter(shared));
        let rate = Rate::per_10s(10);
        // The start of the next window (a sync forgets counters of windows
        // long past by the real clock).
        let t = (now_ms() / 10_000 + 1) * 10_000;
        for _ in 0..6 {
            a.check_at("send:alice", rate, t).unwrap();
        }
        a.sync().await;
        b.sync().await;
        // b has not counted anything itself, but knows of a's six once it
        // syncs: four more fit, the fifth does not.
        b.check_at("send:alice", rate, t).unwrap();
        b.sync().await;
        for _ in 0..3 {
            b.check_at("send:alice", rate, t + 1).unwrap();
        }
        // Ten in this window: the next fits once this window is the
        // previous one and a tenth of it has slid out.
        let wait = b.check_at("send:alice", rate, t + 1).unwrap_err();
        assert_eq!(wait, Duration::from_millis(9_999 + 1_000));
        assert!(b.check_at("send:bob", rate, t + 1).is_ok(), "keys apart");

        // Half-way into the next window, half of the previous ten still
        // count: five fit.
        let half = t + 15_000;
        b.sync().await;
        // a checked the key before its last sync, not since: a sync now
        // reads the key back only after a check (admitted on a's old view
        // of six).
        a.check_at("send:alice", rate, half).unwrap();
        a.sync().await;
        let mut admitted = 1;
        while a.check_at("send:alice", rate, half).is_ok() {
            admitted += 1;
        }
        assert_eq!(admitted, 5);
        // Two windows on, nothing of the old counts.
        let later = t + 30_000;
        for _ in 0..10 {
            a.check_at("send:alice", rate, later).unwrap();
        }
        assert!(a.check_at("send:alice", rate, later).is_err());
    }

    struct Down;

    #[async_trait]
    impl Counters for Down {
        async fn add(&self, _: &[CounterAdd]) -> Result<Vec<(u64, u64)>, ChatError> {
            Err(ChatError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn without_the_shared_counters_a_limit_holds_per_process() {
        let l = limiter(Arc::new(Down));
        let rate = Rate::per_minute(3);
        let t = now_ms();
        for _ in 0..3 {
            l.check_at("login:1.2.3.4", rate, t).unwrap();
            l.sync().await;
        }
        assert!(l.check_at("login:1.2.3.4", rate, t).is_err());
    }
}
