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

/// The HTTP client of a provider that speaks HTTP/2: over TLS (ALPN h2)
/// for an `https://` endpoint, without TLS (prior knowledge) for an
/// `http://` stand-in; `what` names the provider in errors.
pub fn http2_client(
    endpoint: &str,
    timeout: Duration,
    what: &str,
) -> Result<reqwest::Client, String> {
    let plain = endpoint.starts_with("http://");
    if !plain && !endpoint.starts_with("https://") {
        return Err(format!(
            "the {what} endpoint is https:// (or http:// for a local stand-in)"
        ));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)));
    if plain {
        http = http.http2_prior_knowledge();
    }
    http.build()
        .map_err(|e| format!("no HTTP/2 client for {what}: {e}"))
}

/// A request that got no answer: tried again. Never the URL in the
/// reason (it may carry credentials).
pub fn unanswered(e: &reqwest::Error, what: &str) -> Outcome {
    let why = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "unreachable"
    } else {
        "request failed"
    };
    Outcome::Retry {
        reason: format!("{what} {why}"),
        after: None,
    }
}
