//! Firebase Cloud Messaging, HTTP v1: one request per notification
//! (`POST /v1/projects/<project>/messages:send`, up to [`PARALLEL`] at once
//! on one HTTP/2 connection), authorised by an OAuth 2 access token that a
//! service account's key obtains (the JWT-bearer grant, RFC 7523: a JWT
//! signed RS256 with the key, sent to the key file's `token_uri`), kept
//! until five minutes before it expires or until FCM answers 401.
//!
//! The message: `notification {title, body}`; `android {collapse_key,
//! priority: high, ttl, notification {tag, notification_count}}` (the tag,
//! the conversation, makes a newer notification replace an older one);
//! `apns {headers {apns-collapse-id}, payload {aps {badge, thread-id,
//! mutable-content}}}` for iPhones reached through FCM; and `data`
//! (strings only): conversation_id, msg_id, inbox_seq, sender, loc_key.
//!
//! Answers: 200 sent; `UNREGISTERED` (404), `SENDER_ID_MISMATCH` (403) and
//! an `INVALID_ARGUMENT` about the token itself drop the token; 401
//! without an FCM code gets a new access token and tries again;
//! `QUOTA_EXCEEDED` (429), `UNAVAILABLE` (503) and `INTERNAL` (500) try
//! again, after Retry-After when given; anything else is final.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt as _;
use parley_proto::pb;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::jwt::Signer;
use crate::plan::{LOC_KEY, Notification};
use crate::provider::{Outcome, Provider, by_status, http2_client, retry_after, unanswered};

/// Google's FCM host.
pub const ENDPOINT: &str = "https://fcm.googleapis.com";
/// The scope the access token is asked for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Requests of one batch in flight at once.
pub const PARALLEL: usize = 64;
/// How long FCM keeps a notification for a device that is off.
const TTL: &str = "86400s";

/// A service account's key file, as Google's console downloads it.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    #[serde(rename = "type")]
    pub kind: String,
    pub project_id: String,
    pub private_key_id: String,
    pub private_key: String,
    pub client_email: String,
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

/// What the FCM provider needs.
#[derive(Clone)]
pub struct FcmConfig {
    /// The key file's JSON.
    pub service_account: String,
    /// [`ENDPOINT`], or (tests) a local stand-in; an `http://` one is
    /// spoken to in HTTP/2 without TLS.
    pub endpoint: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmConfig")
            .field("endpoint", &self.endpoint)
            .field("service_account", &"<redacted>")
            .finish()
    }
}

/// The provider.
pub struct Fcm {
    account: ServiceAccount,
    signer: Signer,
    send_url: String,
    http: reqwest::Client,
    /// The access token and when to stop using it.
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key nor the access token.
        f.debug_struct("Fcm")
            .field("account", &self.account)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Grant<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

/// The body of a send.
#[derive(Debug, Serialize, Deserialize)]
pub struct FcmRequest {
    pub message: FcmMessage,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FcmMessage {
    pub token: String,
    pub notification: FcmNotification,
    pub android: serde_json::Value,
    pub apns: serde_json::Value,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FcmNotification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub body: String,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorStatus,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

impl ErrorStatus {
    /// The FCM error code of the details, if any.
    fn fcm_code(&self) -> Option<&str> {
        self.details.iter().find_map(|d| {
            let kind = d.get("@type")?.as_str()?;
            if kind.ends_with("google.firebase.fcm.v1.FcmError") {
                d.get("errorCode")?.as_str()
            } else {
                None
            }
        })
    }

    /// Whether an INVALID_ARGUMENT is about the token, not the message.
    fn about_the_token(&self) -> bool {
        self.message.contains("registration token")
            || self.details.iter().any(|d| {
                d.get("fieldViolations")
                    .and_then(|v| v.as_array())
                    .is_some_and(|v| {
                        v.iter().any(|f| {
                            f.get("field").and_then(|f| f.as_str()) == Some("message.token")
                        })
                    })
            })
    }
}

impl Fcm {
    pub fn new(config: &FcmConfig) -> Result<Self, String> {
        let account: ServiceAccount = serde_json::from_str(&config.service_account)
            .map_err(|e| format!("the FCM service account is not a key file's JSON: {e}"))?;
        if account.kind != "service_account" {
            return Err(format!(
                "the FCM credentials are of type {:?}, not a service account",
                account.kind
            ));
        }
        let signer = Signer::rs256(&account.private_key)
            .map_err(|e| format!("the FCM service account's key: {e}"))?;
        let endpoint = config.endpoint.trim_end_matches('/');
        let http = http2_client(endpoint, config.timeout, "FCM")?;
        Ok(Self {
            send_url: format!(
                "{endpoint}/v1/projects/{}/messages:send",
                account.project_id
            ),
            account,
            signer,
            http,
            token: Mutex::new(None),
        })
    }

    /// The access token, asked for again when it is about to expire or
    /// when FCM refused `refused` and no other request has replaced it
    /// since (many requests refused at once make one new token). A
    /// failure is the reason, for a retry.
    async fn access_token(&self, refused: Option<&str>) -> Result<String, Outcome> {
        let mut held = self.token.lock().await;
        if let Some((token, until)) = held.as_ref()
            && Some(token.as_str()) != refused
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let iat = parley_core::now_ms() / 1000;
        let grant = Grant {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat,
            exp: iat + 3600,
        };
        let assertion = self
            .signer
            .sign(&self.account.private_key_id, &grant)
            .map_err(|reason| Outcome::Failed { reason })?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let retry = |reason: String| Outcome::Retry {
            reason,
            after: None,
        };
        let resp = self
            .http
            .post(&self.account.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|_| retry("the OAuth token endpoint is unreachable".into()))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let reason = format!("the OAuth token endpoint answered {status}");
            return Err(by_status(status, reason, retry_after(resp.headers())));
        }
        let answer: TokenAnswer = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| retry("the OAuth token endpoint's answer is not a token".into()))?;
        let life = Duration::from_secs(answer.expires_in.clamp(60, 3600));
        let until = Instant::now()
            + life
                .saturating_sub(Duration::from_secs(300))
                .max(Duration::from_secs(30));
        *held = Some((answer.access_token.clone(), until));
        Ok(answer.access_token)
    }

    fn request(n: &Notification) -> FcmRequest {
        let mut data = BTreeMap::from([
            ("conversation_id".to_owned(), n.conversation_id.to_string()),
            ("msg_id".to_owned(), n.msg_id.to_string()),
            ("inbox_seq".to_owned(), n.inbox_seq.to_string()),
            ("loc_key".to_owned(), LOC_KEY.to_owned()),
            ("notification_id".to_owned(), n.id.clone()),
        ]);
        if let Some(sender) = &n.sender {
            data.insert("sender".into(), sender.clone());
        }
        FcmRequest {
            message: FcmMessage {
                token: n.token.clone(),
                notification: FcmNotification {
                    title: n.title.clone(),
                    body: n.body.clone(),
                },
                android: serde_json::json!({
                    "collapse_key": n.collapse_key,
                    "priority": "high",
                    "ttl": TTL,
                    "notification": {
                        "tag": n.collapse_key,
                        "notification_count": n.badge,
                    },
                }),
                apns: serde_json::json!({
                    "headers": { "apns-collapse-id": n.collapse_key },
                    "payload": { "aps": {
                        "badge": n.badge,
                        "thread-id": n.collapse_key,
                        "mutable-content": 1,
                    }},
                }),
                data,
            },
        }
    }

    async fn one(&self, n: &Notification) -> Outcome {
        let body = match serde_json::to_vec(&Self::request(n)) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("not encoded: {e}"),
                };
            }
        };
        let mut refused: Option<String> = None;
        loop {
            let token = match self.access_token(refused.as_deref()).await {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            let sent = self
                .http
                .post(&self.send_url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => return unanswered(&e, "FCM"),
            };
            let status = resp.status().as_u16();
            if status == 200 {
                return Outcome::Sent;
            }
            let after = retry_after(resp.headers());
            let error = resp
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(&b).ok())
                .unwrap_or_default()
                .error;
            let code = error.fcm_code().unwrap_or(&error.status).to_owned();
            let reason = format!("FCM {status} {code}");
            match (status, code.as_str()) {
                (_, "UNREGISTERED" | "SENDER_ID_MISMATCH") => {
                    return Outcome::DeadToken { reason };
                }
                (400, "INVALID_ARGUMENT") if error.about_the_token() => {
                    return Outcome::DeadToken { reason };
                }
                // The access token expired or was revoked: once more with
                // a new one.
                (401, c) if c != "THIRD_PARTY_AUTH_ERROR" && refused.is_none() => {
                    refused = Some(token);
                }
                _ => return by_status(status, reason, after),
            }
        }
    }
}

#[async_trait]
impl Provider for Fcm {
    fn kind(&self) -> pb::PushProvider {
        pb::PushProvider::Fcm
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
