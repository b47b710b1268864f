//! Apple Push Notification service: the provider API over HTTP/2, with
//! token-based authentication (a JWT signed ES256 with the team's .p8 key,
//! made again every 50 minutes: Apple refuses one older than an hour and
//! one made more often than every 20 minutes).
//!
//! Each notification is one request (`POST /3/device/<token>`) on one
//! multiplexed connection, up to [`PARALLEL`] at once:
//!
//! - `apns-topic` the registration's topic (the app's bundle id),
//!   `apns-push-type: alert`, `apns-priority: 10`, `apns-expiration` a
//!   day on, `apns-collapse-id` the conversation, and `apns-id` the
//!   notification's id as a UUID;
//! - the payload: `aps.alert {title, body}`, `aps.badge`, `aps.sound`,
//!   `aps.thread-id` (the conversation), `aps.mutable-content: 1` (a
//!   notification service extension may rewrite it, e.g. in the device's
//!   language from `parley.loc_key`), and `parley {conversation_id,
//!   msg_id, inbox_seq, sender, loc_key}`.
//!
//! Answers: 200 sent; 410 (`Unregistered`, `ExpiredToken`), and 400
//! `BadDeviceToken` or `DeviceTokenNotForTopic`, drop the token; 403
//! `ExpiredProviderToken`, `InvalidProviderToken` or
//! `MissingProviderToken` make a new JWT (unless one was made in the last
//! 20 minutes, Apple's limit) and try again; 429, 5xx and 400 `IdleTimeout` try again; any
//! other refusal is final.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt as _;
use parley_proto::pb;
use serde::{Deserialize, Serialize};

use crate::jwt::Signer;
use crate::plan::{LOC_KEY, Notification};
use crate::provider::{Outcome, Provider, by_status, http2_client, retry_after, unanswered};

/// Apple's hosts.
pub const PRODUCTION: &str = "https://api.push.apple.com";
pub const SANDBOX: &str = "https://api.sandbox.push.apple.com";

/// Requests of one batch in flight at once (streams of one connection).
pub const PARALLEL: usize = 64;
/// A JWT is made again after this long.
pub const JWT_LIFETIME: Duration = Duration::from_secs(50 * 60);
/// A JWT Apple refused is made again only if it is older than this: many
/// requests refused at once make one new JWT, not one each, and Apple
/// answers TooManyProviderTokenUpdates to more than one per 20 minutes.
const JWT_RENEW_AFTER: Duration = Duration::from_secs(20 * 60);
/// Notifications not delivered within this long are dropped by Apple.
const EXPIRATION_SECS: i64 = 24 * 3600;

/// The team's credentials and where Apple is.
#[derive(Clone)]
pub struct ApnsConfig {
    /// The .p8 key (PKCS#8 PEM) made in the developer account.
    pub key_pem: String,
    pub key_id: String,
    pub team_id: String,
    /// [`PRODUCTION`], [`SANDBOX`], or (tests) a local stand-in; an
    /// `http://` one is spoken to in HTTP/2 without TLS.
    pub endpoint: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("endpoint", &self.endpoint)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The provider.
pub struct Apns {
    endpoint: String,
    signer: Signer,
    key_id: String,
    team_id: String,
    http: reqwest::Client,
    jwt: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("endpoint", &self.endpoint)
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// The body of a request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApnsPayload {
    pub aps: Aps,
    pub parley: ApnsData,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Aps {
    pub alert: Alert,
    pub badge: u64,
    pub sound: String,
    #[serde(rename = "thread-id")]
    pub thread_id: String,
    #[serde(rename = "mutable-content")]
    pub mutable_content: u8,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Alert {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub body: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ApnsData {
    pub conversation_id: u64,
    pub msg_id: u64,
    pub inbox_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    pub loc_key: String,
}

#[derive(Debug, Default, Deserialize)]
struct Refusal {
    #[serde(default)]
    reason: String,
}

/// The notification's id as the UUID `apns-id` takes.
pub fn apns_id(id: &str) -> String {
    if id.len() != 32 {
        return id.to_owned();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &id[..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..]
    )
}

impl Apns {
    pub fn new(config: &ApnsConfig) -> Result<Self, String> {
        let signer = Signer::es256(&config.key_pem).map_err(|e| format!("the APNs key: {e}"))?;
        if config.key_id.is_empty() || config.team_id.is_empty() {
            return Err("APNs needs the key's id and the team's id".into());
        }
        let endpoint = config.endpoint.trim_end_matches('/').to_owned();
        let http = http2_client(&endpoint, config.timeout, "APNs")?;
        let apns = Self {
            endpoint,
            signer,
            key_id: config.key_id.clone(),
            team_id: config.team_id.clone(),
            http,
            jwt: Mutex::new(None),
        };
        apns.jwt(false)?;
        Ok(apns)
    }

    /// The JWT to send, made again when it is old or `renew` (Apple said
    /// it expired or is invalid).
    fn jwt(&self, renew: bool) -> Result<String, String> {
        let mut held = self.jwt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((jwt, made)) = held.as_ref() {
            let age = made.elapsed();
            if age < JWT_LIFETIME && (!renew || age < JWT_RENEW_AFTER) {
                return Ok(jwt.clone());
            }
        }
        let claims = Claims {
            iss: &self.team_id,
            iat: parley_core::now_ms() / 1000,
        };
        let jwt = self
            .signer
            .sign(&self.key_id, &claims)
            .map_err(|e| format!("APNs JWT not signed: {e}"))?;
        *held = Some((jwt.clone(), Instant::now()));
        Ok(jwt)
    }

    async fn one(&self, n: &Notification) -> Outcome {
        let jwt = match self.jwt(false) {
            Ok(j) => j,
            Err(reason) => return Outcome::Failed { reason },
        };
        let payload = ApnsPayload {
            aps: Aps {
                alert: Alert {
                    title: n.title.clone(),
                    body: n.body.clone(),
                },
                badge: n.badge,
                sound: "default".into(),
                thread_id: n.collapse_key.clone(),
                mutable_content: 1,
            },
            parley: ApnsData {
                conversation_id: n.conversation_id,
                msg_id: n.msg_id,
                inbox_seq: n.inbox_seq,
                sender: n.sender.clone(),
                loc_key: LOC_KEY.into(),
            },
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("not encoded: {e}"),
                };
            }
        };
        let url = format!("{}/3/device/{}", self.endpoint, n.token);
        let expiration = parley_core::now_ms() / 1000 + EXPIRATION_SECS;
        let sent = self
            .http
            .post(url)
            .bearer_auth(jwt)
            .header("apns-topic", &n.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", expiration.to_string())
            .header("apns-collapse-id", &n.collapse_key)
            .header("apns-id", apns_id(&n.id))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return unanswered(&e, "APNs"),
        };
        let status = resp.status().as_u16();
        if status == 200 {
            return Outcome::Sent;
        }
        let after = retry_after(resp.headers());
        let refusal: Refusal = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let reason = format!("APNs {status} {}", refusal.reason);
        match (status, refusal.reason.as_str()) {
            (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                Outcome::DeadToken { reason }
            }
            (400, "IdleTimeout") => Outcome::Retry {
                reason,
                after: None,
            },
            (403, "ExpiredProviderToken" | "InvalidProviderToken" | "MissingProviderToken") => {
                // A new JWT for the next try (and every request after it).
                if let Err(e) = self.jwt(true) {
                    return Outcome::Failed { reason: e };
                }
                Outcome::Retry {
                    reason,
                    after: None,
                }
            }
            _ => by_status(status, reason, after),
        }
    }
}

#[async_trait]
impl Provider for Apns {
    fn kind(&self) -> pb::PushProvider {
        pb::PushProvider::Apns
    }

    async fn send(&self, batch: &[Notification]) -> Vec<Outcome> {
        // By index: a closure over `&Notification` trips the async trait's
        // lifetimes.
        futures_util::stream::iter(0..batch.len())
            .map(|i| self.one(&batch[i]))
            .buffered(PARALLEL)
            .collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_uuids() {
        assert_eq!(
            apns_id("0123456789abcdef0123456789abcdef"),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }
}
