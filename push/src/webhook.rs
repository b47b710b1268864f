//! The generic webhook: for apps with a push service of their own. The
//! notifications of a batch go in one signed JSON POST (at most
//! [`MAX_PER_REQUEST`] each), signed as the Standard Webhooks
//! specification says (<https://www.standardwebhooks.com>), so a receiver
//! can check them with any of its libraries:
//!
//! - `webhook-id`: the same for every try of the same request; each
//!   notification also carries its own stable `id`, for dropping repeats;
//! - `webhook-timestamp`: seconds since the epoch (refuse old ones);
//! - `webhook-signature`: `v1,` and the base64 HMAC-SHA256, under the
//!   shared secret, of `<webhook-id>.<webhook-timestamp>.<body>`.
//!
//! The receiver answers 2xx when it took the batch, optionally with
//! `{"dead_tokens": ["...", ...]}` naming tokens that will never work
//! again (they are dropped); 429 or 5xx to have the whole batch sent
//! again later (after Retry-After seconds when given); anything else
//! refuses it for good.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt as _;
use hmac::{Hmac, Mac};
use parley_proto::pb;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::plan::{LOC_KEY, Notification};
use crate::provider::{Outcome, Provider, by_status, retry_after, unanswered};

/// Most notifications in one request.
pub const MAX_PER_REQUEST: usize = 100;
/// Requests of one batch in flight at once.
const PARALLEL: usize = 4;

/// Where the webhook goes and the secret it is signed with.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// `whsec_` and base64 (the Standard Webhooks form), or any other
    /// string, whose bytes are then the key. At least 24 bytes of key.
    pub secret: String,
    /// The longest a request may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &parley_core::redact_urls(&self.url))
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The webhook provider.
pub struct Webhook {
    url: reqwest::Url,
    key: Vec<u8>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, nor credentials in the URL.
        f.debug_struct("Webhook")
            .field("url", &parley_core::redact_urls(self.url.as_str()))
            .finish_non_exhaustive()
    }
}

/// The key bytes of a secret: `whsec_` + base64, or the string's bytes.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => BASE64
            .decode(b64)
            .map_err(|e| format!("the webhook secret's base64 after whsec_ is invalid: {e}"))?,
        None => secret.as_bytes().to_vec(),
    };
    if key.len() < 24 {
        return Err("a webhook secret holds at least 24 bytes of key".into());
    }
    Ok(key)
}

/// The `webhook-signature` of a request: `v1,` and the base64 HMAC.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The body of one request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    /// Always `push.notifications`.
    pub r#type: String,
    pub data: PayloadData,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PayloadData {
    pub notifications: Vec<WebhookNotification>,
}

/// One notification as the webhook carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookNotification {
    pub id: String,
    pub user: String,
    pub device: String,
    pub token: String,
    pub topic: String,
    pub locale: String,
    pub conversation_id: u64,
    pub msg_id: u64,
    pub inbox_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub body: String,
    pub loc_key: String,
    pub badge: u64,
    pub collapse_key: String,
}

impl From<&Notification> for WebhookNotification {
    fn from(n: &Notification) -> Self {
        Self {
            id: n.id.clone(),
            user: n.user.clone(),
            device: n.device.clone(),
            token: n.token.clone(),
            topic: n.topic.clone(),
            locale: n.locale.clone(),
            conversation_id: n.conversation_id,
            msg_id: n.msg_id,
            inbox_seq: n.inbox_seq,
            sender: n.sender.clone(),
            title: n.title.clone(),
            body: n.body.clone(),
            loc_key: LOC_KEY.to_owned(),
            badge: n.badge,
            collapse_key: n.collapse_key.clone(),
        }
    }
}

/// What a receiver may answer.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    #[serde(default)]
    dead_tokens: Vec<String>,
}

impl Webhook {
    pub fn new(config: &WebhookConfig) -> Result<Self, String> {
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| format!("the push webhook URL is invalid: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("the push webhook URL is http:// or https://".into());
        }
        let key = secret_key(&config.secret)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            // A redirect would turn the POST into a GET (301-303) or send
            // the signed body elsewhere (307, 308): an answer of its own.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("no HTTP client for the push webhook: {e}"))?;
        Ok(Self { url, key, http })
    }

    /// One request for up to [`MAX_PER_REQUEST`] notifications: one
    /// outcome for all, except the dead tokens the receiver named.
    async fn post(&self, batch: &[Notification]) -> Vec<Outcome> {
        let payload = Payload {
            r#type: "push.notifications".into(),
            data: PayloadData {
                notifications: batch.iter().map(WebhookNotification::from).collect(),
            },
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(b) => b,
            Err(e) => return vec![failed(format!("not encoded: {e}")); batch.len()],
        };
        let id = request_id(batch);
        let timestamp = parley_core::now_ms() / 1000;
        let signature = signature(&self.key, &id, timestamp, &body);
        let sent = self
            .http
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return vec![unanswered(&e, "webhook"); batch.len()],
        };
        let status = resp.status().as_u16();
        let after = retry_after(resp.headers());
        let outcome = by_status(status, format!("webhook answered {status}"), after);
        if outcome != Outcome::Sent {
            return vec![outcome; batch.len()];
        }
        let answer: Answer = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        batch
            .iter()
            .map(|n| {
                if answer.dead_tokens.contains(&n.token) {
                    Outcome::DeadToken {
                        reason: "webhook named the token dead".into(),
                    }
                } else {
                    Outcome::Sent
                }
            })
            .collect()
    }
}

fn failed(reason: String) -> Outcome {
    Outcome::Failed { reason }
}

/// A request's id: from its notifications' ids, so a retry of the same
/// request carries the same one.
fn request_id(batch: &[Notification]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    for n in batch {
        h.update(n.id.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

#[async_trait]
impl Provider for Webhook {
    fn kind(&self) -> pb::PushProvider {
        pb::PushProvider::Webhook
    }

    async fn send(&self, batch: &[Notification]) -> Vec<Outcome> {
        let answers: Vec<Vec<Outcome>> =
            futures_util::stream::iter((0..batch.len()).step_by(MAX_PER_REQUEST))
                .map(|start| self.post(&batch[start..(start + MAX_PER_REQUEST).min(batch.len())]))
                .buffered(PARALLEL)
                .collect()
                .await;
        answers.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification's reference
        // implementations.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(secret_key("whsec_!!").is_err());
        assert!(secret_key("short").is_err());
        assert_eq!(
            secret_key("a plain secret, long enough").unwrap(),
            b"a plain secret, long enough"
        );
    }
}
