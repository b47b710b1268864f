//! Push notifications: wakes the phones of users with no device online.
//!
//! The chat service cues every message committed for a user with no device
//! online (`ChatEvent::OfflineMessage`: in one process through the
//! `LocalBus`, in a cluster on the events exchange). The [`PushSender`]
//! takes those cues a batch at a time:
//!
//! 1. asks presence again, once for the batch, and drops users who have
//!    come online since (they get the message on their connection);
//! 2. reads in one store call everything the batch needs (tokens, mutes,
//!    preview settings, unseen counts, senders' names) and plans one
//!    notification per registered device ([`plan`]);
//! 3. drops what its [`PushLedger`] says was sent already (a redelivered cue);
//! 4. hands each provider its notifications, tries again what came back
//!    429 or 5xx with exponential backoff and jitter (or the provider's
//!    Retry-After), drops tokens the provider calls dead, and returns
//!    what still failed, for the caller to dead-letter.
//!
//! Nothing here is on the message path: a provider that is down slows
//! only the notifications.

pub mod apns;
pub mod cli;
pub mod fcm;
pub mod jwt;
pub mod plan;
pub mod process;
pub mod provider;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parley_core::bus::ChatEvent;
use parley_core::push::{DeadToken, LEDGER_KEEP, PushLedger};
use parley_core::{ChatError, Presence, Store, now_ms};
use parley_proto::pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

pub use plan::{Notification, Offline};
pub use provider::{Outcome, Provider};

/// How hard the sender tries.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Tries per notification, the first included.
    pub attempts: u32,
    /// The wait before the second try; each later one doubles it, up to
    /// `max_backoff`, each drawn at random between half and all of it.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The providers a sender has credentials for.
#[derive(Debug, Clone, Default)]
pub struct ProvidersConfig {
    pub apns: Option<apns::ApnsConfig>,
    pub fcm: Option<fcm::FcmConfig>,
    pub webhook: Option<webhook::WebhookConfig>,
}

impl ProvidersConfig {
    /// Whether no provider is configured (no sender is needed).
    pub fn is_empty(&self) -> bool {
        self.apns.is_none() && self.fcm.is_none() && self.webhook.is_none()
    }

    /// The providers, ready to send.
    pub fn build(&self) -> Result<Vec<Arc<dyn Provider>>, String> {
        let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
        if let Some(a) = &self.apns {
            providers.push(Arc::new(apns::Apns::new(a)?));
        }
        if let Some(f) = &self.fcm {
            providers.push(Arc::new(fcm::Fcm::new(f)?));
        }
        if let Some(w) = &self.webhook {
            providers.push(Arc::new(webhook::Webhook::new(w)?));
        }
        Ok(providers)
    }
}

/// A ledger in memory, for one process: it forgets after `keep`.
#[derive(Debug)]
pub struct MemoryLedger {
    keep: Duration,
    sent: Mutex<Sent>,
}

/// What a [`MemoryLedger`] holds: when each id was recorded, and the ids
/// in the order recorded, so that forgetting the old ones costs what is
/// forgotten, not a pass over everything kept.
#[derive(Debug, Default)]
struct Sent {
    at: HashMap<String, Instant>,
    order: std::collections::VecDeque<(Instant, String)>,
}

impl MemoryLedger {
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            sent: Mutex::default(),
        }
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new(LEDGER_KEEP)
    }
}

#[async_trait]
impl PushLedger for MemoryLedger {
    async fn unsent(&self, ids: &[String]) -> Result<Vec<bool>, ChatError> {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        Ok(ids
            .iter()
            .map(|id| {
                sent.at
                    .get(id)
                    .is_none_or(|at| now.duration_since(*at) >= self.keep)
            })
            .collect())
    }

    async fn sent(&self, ids: &[String]) -> Result<(), ChatError> {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while let Some((at, _)) = sent.order.front()
            && now.duration_since(*at) >= self.keep
        {
            let Some((at, id)) = sent.order.pop_front() else {
                break;
            };
            // Recorded again since: that later record stays.
            if sent.at.get(&id) == Some(&at) {
                sent.at.remove(&id);
            }
        }
        for id in ids {
            sent.at.insert(id.clone(), now);
            sent.order.push_back((now, id.clone()));
        }
        Ok(())
    }
}

/// Labels of the push counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub provider: String,
    /// sent, retried, dead_token, failed, gave_up, unconfigured
    pub outcome: String,
    /// The provider's answer ("APNs 410 Unregistered", "FCM 429
    /// QUOTA_EXCEEDED", "webhook answered 503", "APNs timed out"); empty
    /// for sent. A closed set: statuses and the providers' own codes.
    pub reason: String,
}

/// What the sender counts.
#[derive(Debug, Clone)]
pub struct PushMetrics {
    /// Every try's outcome, by provider.
    pub notifications: Family<OutcomeLabels, Counter>,
    /// Cues for users who came online before their batch was handled.
    pub online: Counter,
    /// Notifications a redelivered cue would have sent again.
    pub repeats: Counter,
    /// Tokens dropped on a provider's word.
    pub tokens_dropped: Counter,
    /// Cues a listener in one process lost by falling behind.
    pub lost: Counter,
    /// Batches sent without the ledger (it could not be read).
    pub ledger_unread: Counter,
    /// From a message's commit to its batch being handled (seconds).
    pub lag_seconds: Histogram,
}

impl Default for PushMetrics {
    fn default() -> Self {
        Self {
            notifications: Family::default(),
            online: Counter::default(),
            repeats: Counter::default(),
            tokens_dropped: Counter::default(),
            lost: Counter::default(),
            ledger_unread: Counter::default(),
            lag_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
        }
    }
}

impl PushMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "push_notifications",
            "Notification tries by provider, outcome and the provider's answer",
            self.notifications.clone(),
        );
        r.register(
            "push_skipped_online",
            "Cues for users online again by the time they were handled",
            self.online.clone(),
        );
        r.register(
            "push_repeats",
            "Notifications not sent again for a redelivered cue",
            self.repeats.clone(),
        );
        r.register(
            "push_tokens_dropped",
            "Push tokens removed because their provider refused them for good",
            self.tokens_dropped.clone(),
        );
        r.register(
            "push_cues_lost",
            "Cues lost by a listener that fell behind (one process)",
            self.lost.clone(),
        );
        r.register(
            "push_ledger_unread",
            "Batches sent without the ledger of sent notifications (it could not be read)",
            self.ledger_unread.clone(),
        );
        r.register(
            "push_lag_seconds",
            "From a message's commit to its notifications' batch",
            self.lag_seconds.clone(),
        );
    }

    fn count(&self, provider: pb::PushProvider, outcome: &str, reason: &str) {
        self.notifications
            .get_or_create(&OutcomeLabels {
                provider: provider_label(provider).to_owned(),
                outcome: outcome.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// The provider's name in metrics and logs.
pub fn provider_label(p: pb::PushProvider) -> &'static str {
    match p {
        pb::PushProvider::Apns => "apns",
        pb::PushProvider::Fcm => "fcm",
        pb::PushProvider::Webhook => "webhook",
        pb::PushProvider::Unspecified => "unspecified",
    }
}

/// What one provider's part of a batch came to.
#[derive(Debug, Default)]
struct Delivered {
    sent: usize,
    failed: Vec<(Notification, String)>,
    dead: HashSet<DeadToken>,
}

/// What one batch came to.
#[derive(Debug, Default)]
pub struct Handled {
    /// Notifications the providers took.
    pub sent: usize,
    /// Tokens dropped on the providers' word.
    pub dead_tokens: usize,
    /// Notifications refused for good, or still failing after every try,
    /// with the last reason: for the caller to dead-letter.
    pub failed: Vec<(Notification, String)>,
}

/// Turns cues into notifications; see the crate's documentation.
pub struct PushSender {
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    providers: HashMap<i32, Arc<dyn Provider>>,
    ledger: Arc<dyn PushLedger>,
    config: PushConfig,
    metrics: PushMetrics,
}

impl std::fmt::Debug for PushSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut providers: Vec<&str> = self
            .providers
            .values()
            .map(|p| provider_label(p.kind()))
            .collect();
        providers.sort_unstable();
        f.debug_struct("PushSender")
            .field("providers", &providers)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PushSender {
    pub fn new(
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        providers: Vec<Arc<dyn Provider>>,
        ledger: Arc<dyn PushLedger>,
        config: PushConfig,
    ) -> Self {
        Self {
            store,
            presence,
            providers: providers
                .into_iter()
                .map(|p| (p.kind() as i32, p))
                .collect(),
            ledger,
            config,
            metrics: PushMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &PushMetrics {
        &self.metrics
    }

    /// Handles one batch of cues to the end: every notification sent,
    /// dropped with its dead token, or returned as failed. An error means
    /// nothing was sent (the store could not be read): the caller tries
    /// the batch again later. A ledger that cannot be read stops nothing:
    /// every notification then counts as unsent.
    pub async fn handle(&self, events: Vec<Offline>) -> Result<Handled, ChatError> {
        let events = self.still_offline(events).await;
        if events.is_empty() {
            return Ok(Handled::default());
        }
        let now = now_ms();
        if let Some(oldest) = events.iter().map(|e| e.message.server_time_ms).min() {
            self.metrics
                .lag_seconds
                .observe((now - oldest).max(0) as f64 / 1000.0);
        }
        let audience = self.store.push_audience(&plan::query(&events, now)).await?;
        let planned = plan::plan(&events, &audience);
        let ids: Vec<String> = planned.iter().map(|n| n.id.clone()).collect();
        // A ledger that cannot be read (Redis down) stops no notification:
        // a repeat of a redelivered cue beats none at all.
        let unsent = match self.ledger.unsent(&ids).await {
            Ok(unsent) => unsent,
            Err(e) => {
                tracing::warn!(error = %e, "push ledger unreadable; sending without it");
                self.metrics.ledger_unread.inc();
                vec![true; ids.len()]
            }
        };
        let mut pending = Vec::with_capacity(planned.len());
        for (n, unsent) in planned.into_iter().zip(unsent) {
            if unsent {
                pending.push(n);
            } else {
                self.metrics.repeats.inc();
            }
        }
        let mut by_provider: HashMap<i32, Vec<Notification>> = HashMap::new();
        for n in pending {
            by_provider.entry(n.provider as i32).or_default().push(n);
        }
        let mut handled = Handled::default();
        let mut runs = Vec::new();
        for (kind, batch) in by_provider {
            match self.providers.get(&kind) {
                // Each provider on its own: one that is slow or asks to
                // wait holds up only its own notifications.
                Some(p) => runs.push(self.deliver(p.as_ref(), batch)),
                None => {
                    for n in batch {
                        self.metrics.count(n.provider, "unconfigured", "");
                        let why =
                            format!("no {} credentials configured", provider_label(n.provider));
                        handled.failed.push((n, why));
                    }
                }
            }
        }
        let mut dead = HashSet::new();
        for run in futures_util::future::join_all(runs).await {
            handled.sent += run.sent;
            handled.failed.extend(run.failed);
            dead.extend(run.dead);
        }
        if !dead.is_empty() {
            let dead: Vec<DeadToken> = dead.into_iter().collect();
            match self.store.drop_push_tokens(&dead).await {
                Ok(n) => {
                    self.metrics.tokens_dropped.inc_by(n);
                }
                Err(e) => tracing::warn!(error = %e, "dead push tokens not dropped; next time"),
            }
            handled.dead_tokens = dead.len();
        }
        Ok(handled)
    }

    /// [`handle`](Self::handle), tried again up to `tries` more times
    /// (with the backoff) while the store or the ledger cannot be read.
    pub async fn handle_patiently(
        &self,
        cues: Vec<Offline>,
        tries: u32,
    ) -> Result<Handled, ChatError> {
        let mut tried = 0;
        loop {
            match self.handle(cues.clone()).await {
                Err(e) if tried < tries => {
                    tried += 1;
                    tracing::warn!(error = %e, "push batch failed; trying again");
                    tokio::time::sleep(self.backoff(tried)).await;
                }
                done => return done,
            }
        }
    }

    /// The cues of users still offline: presence is asked once for the
    /// batch. When it cannot tell, every cue stays (a notification too
    /// many beats one missing).
    async fn still_offline(&self, events: Vec<Offline>) -> Vec<Offline> {
        let mut users: Vec<&str> = events.iter().map(|e| e.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let online: HashSet<String> = match self.presence.locate(&users).await {
            Ok(l) => l.gateways.into_values().flatten().collect(),
            Err(e) => {
                tracing::debug!(error = %e, "presence unknown; every cue stays");
                HashSet::new()
            }
        };
        if online.is_empty() {
            return events;
        }
        let before = events.len();
        let events: Vec<Offline> = events
            .into_iter()
            .filter(|e| !online.contains(&e.user))
            .collect();
        self.metrics.online.inc_by((before - events.len()) as u64);
        events
    }

    /// One provider's notifications, tried until each is sent, refused
    /// for good or out of tries; what was sent is recorded in the ledger
    /// after each try. Between tries: the backoff, or the wait the
    /// provider asked for (Retry-After) when longer, up to `max_backoff`.
    async fn deliver(&self, provider: &dyn Provider, mut pending: Vec<Notification>) -> Delivered {
        let mut out = Delivered::default();
        let mut attempt = 1;
        loop {
            let last_try = attempt >= self.config.attempts;
            let outcomes = provider.send(&pending).await;
            let mut outcomes = outcomes.into_iter();
            let mut retry = Vec::new();
            let mut wait: Option<Duration> = None;
            let mut sent = Vec::new();
            for n in pending {
                let outcome = outcomes.next().unwrap_or_else(|| Outcome::Failed {
                    reason: "the provider gave no answer for it".into(),
                });
                match outcome {
                    Outcome::Sent => {
                        self.metrics.count(n.provider, "sent", "");
                        sent.push(n.id);
                    }
                    Outcome::Retry { reason, .. } if last_try => {
                        self.metrics.count(n.provider, "gave_up", &reason);
                        out.failed.push((n, reason));
                    }
                    Outcome::Retry { reason, after } => {
                        tracing::debug!(provider = provider_label(n.provider), %reason, "push again");
                        self.metrics.count(n.provider, "retried", &reason);
                        wait = wait.max(after);
                        retry.push(n);
                    }
                    Outcome::DeadToken { reason } => {
                        tracing::info!(
                            provider = provider_label(n.provider),
                            user = %n.user,
                            device = %n.device,
                            %reason,
                            "push token refused for good; dropped"
                        );
                        self.metrics.count(n.provider, "dead_token", &reason);
                        out.dead.insert(DeadToken {
                            provider: n.provider,
                            token: n.token,
                        });
                    }
                    Outcome::Failed { reason } => {
                        self.metrics.count(n.provider, "failed", &reason);
                        out.failed.push((n, reason));
                    }
                }
            }
            out.sent += sent.len();
            if !sent.is_empty()
                && let Err(e) = self.ledger.sent(&sent).await
            {
                tracing::warn!(error = %e, "sent notifications not recorded; a redelivery repeats them");
            }
            if retry.is_empty() {
                return out;
            }
            let backoff = self.backoff(attempt);
            let asked = wait.map_or(Duration::ZERO, |w| w.min(self.config.max_backoff));
            tokio::time::sleep(backoff.max(asked)).await;
            pending = retry;
            attempt += 1;
        }
    }

    /// The wait after try `attempt` (1-based): doubling from
    /// `first_backoff`, capped, with jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let full = self
            .config
            .first_backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.config.max_backoff);
        full.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// The cues of one batch of events.
pub fn offline_cues(events: &[ChatEvent]) -> Vec<Offline> {
    events
        .iter()
        .map(|e| match e {
            ChatEvent::OfflineMessage {
                user,
                inbox_seq,
                message,
            } => Offline {
                user: user.clone(),
                inbox_seq: *inbox_seq,
                message: message.clone(),
            },
        })
        .collect()
}

/// Most cues handled as one batch.
pub const MAX_BATCH: usize = 512;

/// Groups of cues handled at once in one process.
pub const LOCAL_CONCURRENCY: usize = 4;

/// The sender in one process: takes the bus's event batches as they come
/// (several at once when it fell behind, up to [`MAX_BATCH`] cues) and
/// handles up to [`LOCAL_CONCURRENCY`] groups at once, until the bus
/// closes. A group the store could not be read for is tried again a few
/// times, then dropped with a warning; failures are logged (one process
/// has no dead-letter queue). A listener that falls more than 1,024
/// batches behind loses the oldest (counted in `push_cues_lost`).
pub async fn run_local(sender: Arc<PushSender>, mut events: broadcast::Receiver<Arc<[ChatEvent]>>) {
    use broadcast::error::{RecvError, TryRecvError};
    let slots = Arc::new(tokio::sync::Semaphore::new(LOCAL_CONCURRENCY));
    loop {
        let mut cues = match events.recv().await {
            Ok(batch) => offline_cues(&batch),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(batches = n, "push sender fell behind; cues lost");
                sender.metrics.lost.inc_by(n);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        while cues.len() < MAX_BATCH {
            match events.try_recv() {
                Ok(batch) => cues.extend(offline_cues(&batch)),
                Err(TryRecvError::Lagged(n)) => {
                    tracing::warn!(batches = n, "push sender fell behind; cues lost");
                    sender.metrics.lost.inc_by(n);
                }
                Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let sender = sender.clone();
        let group = tokio::spawn(async move {
            handle_locally(&sender, cues).await;
            drop(slot);
        });
        // A panic in a group is logged, and the sender goes on.
        tokio::spawn(async move {
            if let Err(e) = group.await
                && e.is_panic()
            {
                tracing::error!("a push group panicked; its notifications are lost");
            }
        });
    }
}

async fn handle_locally(sender: &PushSender, cues: Vec<Offline>) {
    match sender.handle_patiently(cues, 3).await {
        Ok(handled) => log_failed(&handled.failed, "push notification not sent"),
        Err(e) => tracing::warn!(error = %e, "push batch dropped"),
    }
}

/// Logs each notification that failed for good, with its reason.
pub fn log_failed(failed: &[(Notification, String)], what: &str) {
    for (n, reason) in failed {
        tracing::warn!(
            provider = provider_label(n.provider),
            user = %n.user,
            device = %n.device,
            %reason,
            "{what}"
        );
    }
}
