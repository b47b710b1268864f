//! What a push provider does with notifications, and what it can answer.

use std::time::Duration;

use async_trait::async_trait;
use parley_proto::pb;

use crate::plan::Notification;

/// How one notification went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider took it.
    Sent,
    /// Worth another try (429, 5xx, a network error), after `after` when
    /// the provider said (Retry-After).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The token will never work again (APNs 410 or BadDeviceToken, FCM
    /// UNREGISTERED): it is dropped.
    DeadToken { reason: String },
    /// Refused for good for another reason (a 400-class answer): not tried
    /// again.
    Failed { reason: String },
}

/// A push service: APNs, FCM or the app's webhook.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Which registrations it serves.
    fn kind(&self) -> pb::PushProvider;
    /// Sends notifications (all for this provider), answering one outcome
    /// each, in order. A provider that can carry many in one request does.
    async fn send(&self, batch: &[Notification]) -> Vec<Outcome>;
}

/// The answer of an HTTP provider as an outcome: 2xx sent, 429 and 5xx
/// tried again (after Retry-After when given), the rest failed.
pub fn by_status(status: u16, reason: String, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Sent,
        429 | 500..=599 => Outcome::Retry {
            reason,
            after: retry_after,
        },
        _ => Outcome::Failed { reason },
    }
}

/// A `Retry-After` header's delay: seconds (an HTTP date is not worth
/// honouring for a push; it falls back to the backoff).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}
