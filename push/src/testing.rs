//! Stand-ins for the push services, for tests: servers on loopback that
//! speak each service's requests and answers, check what a real one
//! checks (signatures, JWTs, headers), keep what they accept, and answer
//! as a test scripts them (statuses for the next requests, tokens to call
//! dead).
//!
//! - [`WebhookReceiver`]: the app's webhook, HTTP/1.1, Standard Webhooks
//!   signatures;
//! - [`ApnsStandIn`]: APNs' provider API over HTTP/2 (without TLS), ES256
//!   JWTs checked against the test key;
//! - [`FcmStandIn`]: FCM HTTP v1 over HTTP/2 (without TLS) and the OAuth
//!   token endpoint, RS256 grants checked against the test key.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse as _;
use axum::routing::post;

use crate::webhook::{Payload, WebhookNotification, secret_key, signature};

/// A stand-in's server task, stopped when the stand-in is dropped.
struct Stops(tokio::task::JoinHandle<()>);

impl Drop for Stops {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The secret the receiver and its sender share in tests.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Inner {
    key: Vec<u8>,
    /// How long each request takes to be answered (ms).
    delay_ms: AtomicU64,
    accepted: Mutex<Vec<(String, WebhookNotification)>>,
    script: Mutex<VecDeque<u16>>,
    dead: Mutex<Vec<String>>,
    requests: AtomicU64,
    bad_signatures: AtomicU64,
}

/// A running receiver; stops when dropped.
pub struct WebhookReceiver {
    pub url: String,
    inner: Arc<Inner>,
    _task: Stops,
}

impl std::fmt::Debug for WebhookReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookReceiver")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

async fn receive(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let delay = inner.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        // A request whose client goes away meanwhile is dropped here,
        // unrecorded, as a real receiver's would be.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (parley_core::now_ms() / 1000 - t).abs() <= 300);
    let signed = fresh
        && header("webhook-signature")
            .split(' ')
            .any(|s| s == signature(&inner.key, &id, timestamp.parse().unwrap_or(0), &body));
    if !signed {
        inner.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    let scripted = inner
        .script
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    if let Some(status) = scripted.filter(|s| *s >= 300) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, "scripted".into());
    }
    let Ok(payload) = serde_json::from_slice::<Payload>(&body) else {
        return (StatusCode::BAD_REQUEST, "not a payload".into());
    };
    let dead = inner.dead.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let named: Vec<&String> = payload
        .data
        .notifications
        .iter()
        .map(|n| &n.token)
        .filter(|t| dead.contains(t))
        .collect();
    let answer = serde_json::json!({ "dead_tokens": named }).to_string();
    let mut accepted = inner.accepted.lock().unwrap_or_else(|p| p.into_inner());
    for n in payload.data.notifications {
        if !dead.contains(&n.token) {
            accepted.push((id.clone(), n));
        }
    }
    (StatusCode::OK, answer)
}

impl WebhookReceiver {
    /// Starts one on an ephemeral loopback port, checking signatures
    /// against `secret`.
    pub async fn start(secret: &str) -> Self {
        let inner = Arc::new(Inner {
            key: secret_key(secret).expect("a valid secret"),
            ..Inner::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}/push", listener.local_addr().expect("bound"));
        let app = axum::Router::new()
            .route("/push", post(receive))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            inner,
            _task: Stops(task),
        }
    }

    /// The next requests are answered with these statuses (a 2xx is
    /// handled as usual).
    pub fn answer_next(&self, statuses: &[u16]) {
        self.inner
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(statuses);
    }

    /// From now on, each request waits `delay` before it is handled.
    pub fn set_delay(&self, delay: Duration) {
        self.inner
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// From now on, `token` is answered as dead.
    pub fn call_dead(&self, token: &str) {
        self.inner
            .dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(token.to_owned());
    }

    /// The environment that points a push sender (`parley-push`) here.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PARLEY_PUSH_WEBHOOK_URL".to_owned(), self.url.clone()),
            ("PARLEY_PUSH_WEBHOOK_SECRET".to_owned(), SECRET.to_owned()),
        ]
    }

    /// The notifications of every request accepted, with its webhook-id.
    pub fn accepted(&self) -> Vec<(String, WebhookNotification)> {
        self.inner
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests received, and those among them whose signature failed.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            self.inner.bad_signatures.load(Ordering::Relaxed),
        )
    }

    /// Waits until at least `n` notifications were accepted (at most
    /// `within`), then answers them all.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<WebhookNotification> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.accepted();
            if got.len() >= n || tokio::time::Instant::now() >= deadline {
                return got.into_iter().map(|(_, n)| n).collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The P-256 key (PKCS#8) the APNs stand-in trusts, and its ids.
pub const APNS_KEY: &str = include_str!("../testdata/apns-test-key.pem");
pub const APNS_KEY_ID: &str = "TESTKEY123";
pub const APNS_TEAM_ID: &str = "TESTTEAM12";
/// The RSA key (PKCS#8) of the FCM stand-in's service account.
pub const FCM_KEY: &str = include_str!("../testdata/fcm-test-key.pem");

/// Checks a JWT's signature with `key`'s public half; the claims.
fn verified(jwt: &str, key: &crate::jwt::Signer) -> Option<serde_json::Value> {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, KeyPair, RSA_PKCS1_2048_8192_SHA256};
    let (signed, sig) = jwt.rsplit_once('.')?;
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    let ok = match key {
        crate::jwt::Signer::Es256(k) => ring::signature::UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            k.public_key().as_ref(),
        )
        .verify(signed.as_bytes(), &sig),
        crate::jwt::Signer::Rs256(k) => ring::signature::UnparsedPublicKey::new(
            &RSA_PKCS1_2048_8192_SHA256,
            k.public().as_ref(),
        )
        .verify(signed.as_bytes(), &sig),
    };
    ok.ok()?;
    let (header, claims) = signed.split_once('.')?;
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
    claims["header"] = header;
    Some(claims)
}

/// What a test scripts a stand-in to answer.
#[derive(Default)]
struct Script {
    /// Statuses (and reasons) for the next requests.
    next: VecDeque<(u16, String)>,
    /// Tokens answered as dead.
    dead: Vec<String>,
}

impl Script {
    /// The scripted answer of this request, if any.
    fn answer(&mut self, token: &str) -> Option<(u16, String, bool)> {
        if self.dead.iter().any(|d| d == token) {
            return Some((0, String::new(), true));
        }
        self.next.pop_front().map(|(s, r)| (s, r, false))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

/// One request APNs accepted.
#[derive(Debug, Clone)]
pub struct ApnsReceived {
    pub token: String,
    pub apns_id: String,
    pub topic: String,
    pub collapse_id: String,
    pub payload: serde_json::Value,
}

#[derive(Default)]
struct ApnsInner {
    script: Mutex<Script>,
    accepted: Mutex<Vec<ApnsReceived>>,
    requests: AtomicU64,
    refused_jwts: AtomicU64,
    jwts: Mutex<Vec<String>>,
}

/// The APNs stand-in; stops when dropped.
pub struct ApnsStandIn {
    pub url: String,
    inner: Arc<ApnsInner>,
    _task: Stops,
}

impl std::fmt::Debug for ApnsStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsStandIn")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

async fn apns_request(
    State(inner): State<Arc<ApnsInner>>,
    axum::extract::Path(token): axum::extract::Path<String>,
    request: axum::extract::Request,
) -> axum::response::Response {
    match apns_answer(inner, token, request).await {
        Ok(accepted) => accepted,
        Err(refused) => refused.into_response(),
    }
}

/// An accepted request's answer (200 with `apns-id`), or the refusal.
async fn apns_answer(
    inner: Arc<ApnsInner>,
    token: String,
    request: axum::extract::Request,
) -> Result<axum::response::Response, (StatusCode, String)> {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let refuse = |status: u16, reason: &str| {
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            serde_json::json!({ "reason": reason }).to_string(),
        )
    };
    if request.version() != axum::http::Version::HTTP_2 {
        return Err(refuse(400, "NotHttp2"));
    }
    let headers = request.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let key = crate::jwt::Signer::es256(APNS_KEY).expect("the test key");
    // The scheme is case-insensitive.
    let auth = header("authorization");
    let Some(jwt) = auth
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, jwt)| jwt.to_owned())
    else {
        return Err(refuse(403, "MissingProviderToken"));
    };
    let claims = verified(&jwt, &key);
    let fresh = claims.as_ref().is_some_and(|c| {
        c["iss"] == APNS_TEAM_ID
            && c["header"]["kid"] == APNS_KEY_ID
            && c["header"]["alg"] == "ES256"
            && c["iat"]
                .as_i64()
                .is_some_and(|iat| (parley_core::now_ms() / 1000 - iat).abs() < 3600)
    });
    if !fresh {
        inner.refused_jwts.fetch_add(1, Ordering::Relaxed);
        return Err(refuse(403, "InvalidProviderToken"));
    }
    {
        let mut jwts = lock(&inner.jwts);
        if !jwts.contains(&jwt) {
            jwts.push(jwt);
        }
    }
    let (topic, collapse_id, apns_id) = (
        header("apns-topic"),
        header("apns-collapse-id"),
        header("apns-id"),
    );
    if topic.is_empty() {
        return Err(refuse(400, "MissingTopic"));
    }
    if header("apns-push-type") != "alert" {
        return Err(refuse(400, "InvalidPushType"));
    }
    if collapse_id.len() > 64 {
        return Err(refuse(400, "BadCollapseId"));
    }
    let uuid = apns_id.len() == 36
        && apns_id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !uuid {
        return Err(refuse(400, "BadMessageId"));
    }
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refuse(400, "BadDeviceToken"));
    }
    let body = match axum::body::to_bytes(request.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return Err(refuse(400, "PayloadEmpty")),
    };
    if body.len() > 4096 {
        return Err(refuse(413, "PayloadTooLarge"));
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Err(refuse(400, "BadPayload"));
    };
    if let Some((status, reason, dead)) = lock(&inner.script).answer(&token) {
        if dead {
            return Err((
                StatusCode::GONE,
                serde_json::json!({ "reason": "Unregistered", "timestamp": parley_core::now_ms() })
                    .to_string(),
            ));
        }
        if status >= 300 {
            return Err(refuse(status, &reason));
        }
    }
    lock(&inner.accepted).push(ApnsReceived {
        token,
        apns_id: apns_id.clone(),
        topic,
        collapse_id,
        payload,
    });
    Ok((
        StatusCode::OK,
        [(
            axum::http::header::HeaderName::from_static("apns-id"),
            apns_id,
        )],
        String::new(),
    )
        .into_response())
}

impl ApnsStandIn {
    pub async fn start() -> Self {
        let inner = Arc::new(ApnsInner::default());
        let app = axum::Router::new()
            .route("/3/device/{token}", post(apns_request))
            .with_state(inner.clone());
        let (url, task) = serve(app).await;
        Self {
            url,
            inner,
            _task: Stops(task),
        }
    }

    /// The configuration of a provider that sends here.
    pub fn config(&self) -> crate::apns::ApnsConfig {
        crate::apns::ApnsConfig {
            key_pem: APNS_KEY.to_owned(),
            key_id: APNS_KEY_ID.to_owned(),
            team_id: APNS_TEAM_ID.to_owned(),
            endpoint: self.url.clone(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The next requests are answered `status` with `reason`.
    pub fn answer_next(&self, answers: &[(u16, &str)]) {
        lock(&self.inner.script)
            .next
            .extend(answers.iter().map(|(s, r)| (*s, (*r).to_owned())));
    }

    /// From now on, `token` is answered 410 Unregistered.
    pub fn call_dead(&self, token: &str) {
        lock(&self.inner.script).dead.push(token.to_owned());
    }

    pub fn accepted(&self) -> Vec<ApnsReceived> {
        lock(&self.inner.accepted).clone()
    }

    /// Requests received, JWTs refused, and distinct JWTs accepted.
    pub fn requests(&self) -> (u64, u64, usize) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            self.inner.refused_jwts.load(Ordering::Relaxed),
            lock(&self.inner.jwts).len(),
        )
    }
}

/// One message FCM accepted.
#[derive(Debug, Clone)]
pub struct FcmReceived {
    pub project: String,
    pub message: serde_json::Value,
}

#[derive(Default)]
struct FcmInner {
    token_uri: Mutex<String>,
    script: Mutex<Script>,
    accepted: Mutex<Vec<FcmReceived>>,
    /// Access tokens handed out; the last is the one accepted.
    grants: Mutex<Vec<String>>,
    requests: AtomicU64,
}

/// The FCM stand-in (the send API and the OAuth token endpoint); stops
/// when dropped.
pub struct FcmStandIn {
    pub url: String,
    inner: Arc<FcmInner>,
    _task: Stops,
}

impl std::fmt::Debug for FcmStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmStandIn")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The project of the stand-in's service account.
pub const FCM_PROJECT: &str = "parley-test";
const FCM_EMAIL: &str = "push@parley-test.iam.gserviceaccount.com";

fn fcm_error(status: u16, code: &str, message: &str) -> (StatusCode, String) {
    let canonical = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    let mut details = Vec::new();
    if !code.is_empty() {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }));
    }
    let body = serde_json::json!({ "error": {
        "code": status, "message": message, "status": canonical, "details": details,
    }});
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
}

async fn fcm_token(State(inner): State<Arc<FcmInner>>, body: Bytes) -> (StatusCode, String) {
    let form = String::from_utf8_lossy(&body).to_string();
    let field = |name: &str| {
        form.split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_default()
            .to_owned()
    };
    let bad = |why: &str| {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "invalid_grant", "error_description": why }).to_string(),
        )
    };
    if field("grant_type") != "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" {
        return bad("grant_type");
    }
    let key = crate::jwt::Signer::rs256(FCM_KEY).expect("the test key");
    let Some(claims) = verified(&field("assertion"), &key) else {
        return bad("Invalid JWT Signature.");
    };
    let token_uri = lock(&inner.token_uri).clone();
    let now = parley_core::now_ms() / 1000;
    let good = claims["iss"] == FCM_EMAIL
        && claims["aud"] == token_uri.as_str()
        && claims["scope"] == crate::fcm::SCOPE
        && claims["header"]["kid"] == "test-key-1"
        && claims["exp"]
            .as_i64()
            .is_some_and(|exp| exp > now && exp <= now + 3600 + 5);
    if !good {
        return bad("claims");
    }
    let mut grants = lock(&inner.grants);
    let token = format!("ya29.test-{}", grants.len() + 1);
    grants.push(token.clone());
    (
        StatusCode::OK,
        serde_json::json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" })
            .to_string(),
    )
}

async fn fcm_send(
    State(inner): State<Arc<FcmInner>>,
    axum::extract::Path(project): axum::extract::Path<String>,
    request: axum::extract::Request,
) -> (StatusCode, String) {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    if request.version() != axum::http::Version::HTTP_2 {
        return fcm_error(400, "", "not HTTP/2");
    }
    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if lock(&inner.grants).last().is_none_or(|t| *t != bearer) {
        return fcm_error(401, "", "Request had invalid authentication credentials.");
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), 1 << 20).await else {
        return fcm_error(400, "INVALID_ARGUMENT", "no body");
    };
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return fcm_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
    };
    let message = req["message"].clone();
    let Some(token) = message["token"].as_str().map(str::to_owned) else {
        return fcm_error(400, "INVALID_ARGUMENT", "no token");
    };
    let data_ok = message["data"]
        .as_object()
        .is_some_and(|d| d.values().all(serde_json::Value::is_string));
    if !data_ok {
        return fcm_error(400, "INVALID_ARGUMENT", "data values are strings");
    }
    if let Some((status, reason, dead)) = lock(&inner.script).answer(&token) {
        if dead {
            return fcm_error(404, "UNREGISTERED", "Requested entity was not found.");
        }
        if status == 401 {
            // The access token was revoked: the next one is needed.
            lock(&inner.grants).push("revoked".into());
        }
        if status >= 300 {
            return fcm_error(status, &reason, "scripted");
        }
    }
    lock(&inner.accepted).push(FcmReceived {
        project: project.clone(),
        message,
    });
    (
        StatusCode::OK,
        serde_json::json!({ "name": format!("projects/{project}/messages/{}", parley_core::now_ms()) })
            .to_string(),
    )
}

impl FcmStandIn {
    pub async fn start() -> Self {
        let inner = Arc::new(FcmInner::default());
        let app = axum::Router::new()
            .route("/token", post(fcm_token))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .with_state(inner.clone());
        let (url, task) = serve(app).await;
        *lock(&inner.token_uri) = format!("{url}/token");
        Self {
            url,
            inner,
            _task: Stops(task),
        }
    }

    /// A service account key file whose token_uri is this stand-in.
    pub fn service_account(&self) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": FCM_PROJECT,
            "private_key_id": "test-key-1",
            "private_key": FCM_KEY,
            "client_email": FCM_EMAIL,
            "client_id": "1",
            "token_uri": format!("{}/token", self.url),
        })
        .to_string()
    }

    /// The configuration of a provider that sends here.
    pub fn config(&self) -> crate::fcm::FcmConfig {
        crate::fcm::FcmConfig {
            service_account: self.service_account(),
            endpoint: self.url.clone(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The next sends are answered `status` with the FCM error code
    /// `code` (401: the access token is revoked).
    pub fn answer_next(&self, answers: &[(u16, &str)]) {
        lock(&self.inner.script)
            .next
            .extend(answers.iter().map(|(s, r)| (*s, (*r).to_owned())));
    }

    /// From now on, `token` is answered 404 UNREGISTERED.
    pub fn call_dead(&self, token: &str) {
        lock(&self.inner.script).dead.push(token.to_owned());
    }

    pub fn accepted(&self) -> Vec<FcmReceived> {
        lock(&self.inner.accepted).clone()
    }

    /// Sends received, and access tokens granted.
    pub fn requests(&self) -> (u64, usize) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            lock(&self.inner.grants)
                .iter()
                .filter(|t| *t != "revoked")
                .count(),
        )
    }
}
