//! A gateway's client of the chat-service replicas over gRPC.
//!
//! Targets are `host:port` strings: a list of replicas, or one DNS name that
//! resolves to many (a headless Kubernetes Service), re-resolved every few
//! seconds so replicas come and go without a restart. Sends go to the
//! replica their conversation hashes to (rendezvous hashing over the healthy
//! replicas, so every gateway picks the same one and a replica coming or
//! going moves only its own share): a conversation's appends then meet in
//! one replica's transactions instead of two replicas' transactions waiting
//! on each other's row locks in PostgreSQL. Other calls go round-robin over
//! the replicas that answer. A replica that fails at the transport level
//! (refused, reset, timed out) is set aside for a moment and the call is
//! tried on the next one; an application error (not a member, blocked, ...)
//! is final. Every call a device can repeat safely is retried that way: a
//! Send is deduplicated by its client_msg_id, so a retry after a replica died
//! mid-call is acked once. Creating a group is the one call not retried.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parley_proto::internal::{self as ipb, chat_internal_client::ChatInternalClient};
use parley_proto::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use parley_core::{ChatBackend, ChatError, Login, Revocation, SyncPage};

mod batch;

/// Where the chat service is and how to call it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `host:port` of each replica, or of a name resolving to all of them.
    pub targets: Vec<String>,
    /// Sent as `authorization: Bearer <key>` when set.
    pub key: Option<String>,
    /// The longest one attempt of a call may take.
    pub call_timeout: Duration,
    /// How often names are resolved again.
    pub resolve_every: Duration,
    /// How long a replica that failed is skipped.
    pub backoff: Duration,
    /// Most sends and acks in one `Batch` call (the chat service commits a
    /// call's sends in one transaction, so this matches its batch size).
    pub batch_max: usize,
    /// `Batch` calls in flight at once to each replica; what arrives
    /// meanwhile waits and goes in the next one. One: every call carries
    /// all that arrived during the last, which is what keeps calls (and
    /// transactions) few at moderate rates (docs/benchmarks.md).
    pub batches_in_flight: usize,
    /// Sends and acks waiting for a batch; past it they are refused with
    /// UNAVAILABLE.
    pub batch_queue: usize,
}

impl RemoteConfig {
    pub fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            key: None,
            call_timeout: Duration::from_secs(10),
            resolve_every: Duration::from_secs(5),
            backoff: Duration::from_secs(1),
            batch_max: 256,
            batches_in_flight: 1,
            batch_queue: 16_384,
        }
    }
}

/// Adds the internal key to every call.
#[derive(Clone)]
pub struct KeyInterceptor(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for KeyInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = ChatInternalClient<InterceptedService<Channel, KeyInterceptor>>;

/// One replica.
struct Replica {
    addr: SocketAddr,
    /// The address hashed, for rendezvous hashing.
    tag: u64,
    client: Client,
    /// Milliseconds since the pool started before which this replica is
    /// skipped; 0 when healthy.
    down_until: AtomicU64,
}

struct Pool {
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    next: AtomicUsize,
    started: Instant,
    interceptor: KeyInterceptor,
    backoff: Duration,
    /// Transport failures seen, for metrics.
    failures: AtomicU64,
}

impl Replica {
    fn healthy(&self, now_ms: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now_ms
    }
}

/// When no replica is healthy, the one that has been down longest gets
/// another chance.
fn longest_down(list: &[Arc<Replica>]) -> Option<Arc<Replica>> {
    list.iter()
        .min_by_key(|r| r.down_until.load(Ordering::Relaxed))
        .cloned()
}

impl Pool {
    /// A pool with no replicas yet (see [`Pool::update`]).
    fn new(interceptor: KeyInterceptor, backoff: Duration) -> Self {
        Self {
            replicas: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            started: Instant::now(),
            interceptor,
            backoff,
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The next healthy replica, round-robin; when none is healthy, the one
    /// that has been down longest gets another chance.
    fn pick(&self) -> Option<Arc<Replica>> {
        let list = self.snapshot();
        if list.is_empty() {
            return None;
        }
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..list.len() {
            let r = &list[(start + i) % list.len()];
            if r.healthy(now) {
                return Some(r.clone());
            }
        }
        longest_down(&list)
    }

    /// The healthy replica `key` hashes highest with; when none is
    /// healthy, the one that has been down longest. Gateways agree on it,
    /// and it stays put while the replica does.
    fn pick_for(&self, key: u64) -> Option<Arc<Replica>> {
        let list = self.snapshot();
        let now = self.now_ms();
        list.iter()
            .filter(|r| r.healthy(now))
            .max_by_key(|r| mix(key ^ r.tag))
            .cloned()
            .or_else(|| longest_down(&list))
    }

    fn set_down(&self, r: &Replica) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + self.backoff.as_millis() as u64;
        r.down_until.store(until, Ordering::Relaxed);
    }

    fn replica(&self, addr: SocketAddr) -> Arc<Replica> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI")
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = ChatInternalClient::with_interceptor(channel, self.interceptor.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        Arc::new(Replica {
            addr,
            tag: tag_of(addr),
            client,
            down_until: AtomicU64::new(0),
        })
    }

    /// Replaces the replica set with `addrs`, keeping the connections of
    /// replicas still present.
    fn update(&self, addrs: Vec<SocketAddr>) {
        let old = self.snapshot();
        let by_addr: HashMap<SocketAddr, &Arc<Replica>> = old.iter().map(|r| (r.addr, r)).collect();
        let new: Vec<Arc<Replica>> = addrs
            .into_iter()
            .map(|a| match by_addr.get(&a) {
                Some(r) => (*r).clone(),
                None => self.replica(a),
            })
            .collect();
        let changed =
            new.len() != old.len() || new.iter().zip(old.iter()).any(|(a, b)| a.addr != b.addr);
        if changed {
            tracing::info!(
                replicas = ?new.iter().map(|r| r.addr).collect::<Vec<_>>(),
                "chat-service replicas"
            );
            *self.replicas.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        }
    }
}

/// A replica's address as a number, the same in every gateway (FNV-1a of
/// its text; std's hasher is not promised to stay the same across builds).
fn tag_of(addr: SocketAddr) -> u64 {
    fnv(addr.to_string().as_bytes())
}

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: every bit of the input moves every bit of the
/// output, so `mix(key ^ tag)` ranks replicas independently per key.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Resolves every target; None when nothing resolved (keep what we have).
async fn resolve(targets: &[String]) -> Option<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for t in targets {
        match tokio::net::lookup_host(t.as_str()).await {
            Ok(found) => addrs.extend(found),
            Err(e) => tracing::warn!(target = %t, error = %e, "chat-service name did not resolve"),
        }
    }
    addrs.sort();
    addrs.dedup();
    (!addrs.is_empty()).then_some(addrs)
}

/// Calls replicas: round-robin, failing over on transport errors.
struct Caller {
    pool: Arc<Pool>,
    call_timeout: Duration,
}

/// The chat service behind gRPC, balanced over its replicas.
pub struct RemoteChat {
    caller: Arc<Caller>,
    pool: Arc<Pool>,
    batches: batch::Batches,
    resolver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RemoteChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChat")
            .field(
                "replicas",
                &self
                    .pool
                    .snapshot()
                    .iter()
                    .map(|r| r.addr)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drop for RemoteChat {
    fn drop(&mut self) {
        self.resolver.abort();
    }
}

impl RemoteChat {
    /// Resolves the targets and starts re-resolving them in the background.
    /// Fails only on a malformed key; replicas that do not answer yet are
    /// tried when calls come.
    pub async fn connect(config: RemoteConfig) -> Result<Self, ChatError> {
        let interceptor = KeyInterceptor(
            config
                .key
                .as_deref()
                .map(|k| MetadataValue::try_from(format!("Bearer {k}")))
                .transpose()
                .map_err(|_| ChatError::invalid("the internal key must be printable ASCII"))?,
        );
        let pool = Arc::new(Pool::new(interceptor, config.backoff));
        match resolve(&config.targets).await {
            Some(addrs) => pool.update(addrs),
            None => {
                tracing::warn!(targets = ?config.targets, "no chat-service replica resolved yet")
            }
        }
        let weak = Arc::downgrade(&pool);
        let targets = config.targets.clone();
        let every = config.resolve_every;
        let resolver = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                if let Some(addrs) = resolve(&targets).await {
                    pool.update(addrs);
                }
            }
        });
        let caller = Arc::new(Caller {
            pool: pool.clone(),
            call_timeout: config.call_timeout,
        });
        Ok(Self {
            batches: batch::Batches::start(caller.clone(), &config),
            caller,
            pool,
            resolver,
        })
    }

    /// Replicas known now.
    pub fn replicas(&self) -> Vec<SocketAddr> {
        self.pool.snapshot().iter().map(|r| r.addr).collect()
    }

    /// Transport failures seen so far (each one a retry or a failed call).
    pub fn failures(&self) -> u64 {
        self.pool.failures.load(Ordering::Relaxed)
    }

    /// `Batch` calls made so far, and the sends and acks they carried.
    pub fn batches(&self) -> (u64, u64) {
        let c = &self.batches.counts;
        (
            c.calls.load(Ordering::Relaxed),
            c.items.load(Ordering::Relaxed),
        )
    }

    /// Whether some replica is believed healthy.
    pub fn healthy(&self) -> bool {
        let now = self.pool.now_ms();
        self.pool.snapshot().iter().any(|r| r.healthy(now))
    }
}

impl Caller {
    /// Calls `f` on a replica, moving to the next one on transport failures
    /// when `retry` allows (up to one attempt per replica, at least 3).
    async fn invoke<T, F, Fut>(&self, retry: bool, f: F) -> Result<T, ChatError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.invoke_on(None, retry, f).await
    }

    /// As `invoke`, the first attempt on `first` when given (later ones on
    /// whichever replica is next).
    async fn invoke_on<T, F, Fut>(
        &self,
        mut first: Option<Arc<Replica>>,
        retry: bool,
        f: F,
    ) -> Result<T, ChatError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempts = if retry {
            self.pool.snapshot().len().max(3)
        } else {
            1
        };
        let mut last = String::from("no chat-service replica is known");
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
            }
            let Some(replica) = first.take().or_else(|| self.pool.pick()) else {
                continue;
            };
            match tokio::time::timeout(self.call_timeout, f(replica.client.clone())).await {
                Ok(Ok(resp)) => {
                    replica.down_until.store(0, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => {
                    if let Some(code) = parley_proto::grpc::error_code(&status) {
                        return Err(ChatError::Remote(code, status.message().to_owned()));
                    }
                    // A replica of an older version, during an upgrade:
                    // it is up, and another would answer the same.
                    if status.code() == tonic::Code::Unimplemented {
                        return Err(ChatError::Remote(
                            pb::ErrorCode::Internal,
                            format!(
                                "the chat service at {} does not know this call",
                                replica.addr
                            ),
                        ));
                    }
                    tracing::warn!(replica = %replica.addr, error = %status.message(), "chat-service call failed; trying another replica");
                    last = status.message().to_owned();
                }
                Err(_) => {
                    tracing::warn!(replica = %replica.addr, "chat-service call timed out");
                    last = format!("no answer within {:?}", self.call_timeout);
                }
            }
            self.pool.set_down(&replica);
        }
        Err(ChatError::Unavailable(format!(
            "chat service unreachable ({last}); retry"
        )))
    }
}

#[async_trait]
impl ChatBackend for RemoteChat {
    async fn authenticate(&self, token: &str, device: &str) -> Result<Login, ChatError> {
        let req = ipb::AuthenticateRequest {
            token: token.to_owned(),
            device_id: device.to_owned(),
        };
        let r = self
            .caller
            .invoke(true, |mut c| {
                let req = req.clone();
                async move { c.authenticate(req).await }
            })
            .await?;
        Ok(Login {
            user: r.user_id,
            issued_at_ms: r.issued_at_ms,
            expires_at_ms: r.expires_at_ms,
        })
    }

    async fn refresh(&self, refresh_token: &str) -> Result<pb::Tokens, ChatError> {
        let req = ipb::RefreshRequest {
            refresh_token: refresh_token.to_owned(),
        };
        // Retried elsewhere after a transport failure: if the first replica
        // rotated the token before its answer was lost, the token it used
        // up is still honoured within the grace period.
        self.caller
            .invoke(true, |mut c| {
                let req = req.clone();
                async move { c.refresh(req).await }
            })
            .await
    }

    async fn session_opened(
        &self,
        user: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> Result<(u64, u64), ChatError> {
        let req = ipb::OpenSessionRequest {
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            cursor,
        };
        // The replica that takes this user's acks holds the cursors not yet
        // written: it answers where the device resumes.
        let owner = self.caller.pool.pick_for(fnv(user.as_bytes()));
        let r = self
            .caller
            .invoke_on(owner, true, |mut c| {
                let req = req.clone();
                async move { c.open_session(req).await }
            })
            .await?;
        Ok((r.resume_from, r.inbox_head))
    }

    fn ack(&self, user: &str, device: &str, cursor: u64) {
        self.batches.enqueue(user, device, batch::Item::Ack(cursor));
    }

    async fn sync(&self, user: &str, after: u64, limit: u32) -> Result<SyncPage, ChatError> {
        let req = ipb::SyncRequest {
            user_id: user.to_owned(),
            after,
            limit,
        };
        let r = self
            .caller
            .invoke(true, |mut c| {
                let req = req.clone();
                async move { c.sync(req).await }
            })
            .await?;
        let entries = r
            .entries
            .into_iter()
            .map(|d| (d.inbox_seq, d.message.unwrap_or_default()))
            .collect();
        Ok(SyncPage {
            entries,
            head: r.inbox_head,
            missing: (r.missing_to > 0).then_some((r.missing_from, r.missing_to)),
        })
    }

    async fn call(&self, user: &str, device: &str, req: Req) -> Result<Resp, ChatError> {
        self.call_in_session(user, device, 0, req).await
    }

    async fn call_in_session(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: i64,
        req: Req,
    ) -> Result<Resp, ChatError> {
        let req = match req {
            // The hot path goes in batches.
            Req::Send(send) => {
                return match self
                    .batches
                    .submit(user, device, batch::Item::Send(send))
                    .await?
                {
                    batch::Answer::SendAck(ack) => Ok(Resp::SendAck(ack)),
                    other => Err(batch::unexpected(&other)),
                };
            }
            req => req,
        };
        // A group created twice is two groups: that call is not repeated.
        let retry = !matches!(req, Req::CreateGroup(_));
        let req = ipb::CallRequest {
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            frame: Some(pb::ClientFrame {
                request_id: 0,
                body: Some(req),
            }),
            session_issued_at_ms: issued_at_ms,
        };
        let r = self
            .caller
            .invoke(retry, |mut c| {
                let req = req.clone();
                async move { c.call(req).await }
            })
            .await?;
        r.frame
            .and_then(|f| f.body)
            .ok_or_else(|| ChatError::Unavailable("empty reply from the chat service".into()))
    }

    async fn log_outs_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, ChatError> {
        let req = ipb::LogOutsSinceRequest { since_ms, limit };
        let r = self
            .caller
            .invoke(true, |mut c| async move { c.log_outs_since(req).await })
            .await?;
        Ok(r.revoked.into_iter().map(Revocation::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parley_proto::pb::{
        self, ErrorCode, client_frame::Body as Req, server_frame::Body as Resp,
    };
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use super::*;
    use parley_core::{
        ChatConfig, ChatService, LocalBus, MemoryPresence, MemoryStore, Store, TokenKeys,
    };

    struct Replica {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn replica(store: Arc<dyn Store>, tokens: &TokenKeys) -> Replica {
        replica_with(store, tokens, ChatConfig::default()).await
    }

    async fn replica_with(
        store: Arc<dyn Store>,
        tokens: &TokenKeys,
        config: ChatConfig,
    ) -> Replica {
        let chat = ChatService::start(
            store,
            Arc::new(MemoryPresence::default()),
            Arc::new(LocalBus::default()),
            tokens.clone(),
            config,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            parley_chat::internal::serve(listener, chat, Some("k3y".into()), shutdown)
                .await
                .unwrap();
        });
        Replica { addr, stop, task }
    }

    fn send(conv: u64, id: &str) -> Req {
        Req::Send(pb::Send {
            client_msg_id: id.into(),
            conversation_id: conv,
            content: Some(pb::Content::text("hi")),
        })
    }

    /// A device that logs in again with no cursor of its own resumes where
    /// it acked, whichever replica the gateway would otherwise have asked:
    /// the replica that took its acks (and holds them until the next
    /// cursor write) answers.
    #[tokio::test]
    async fn a_login_resumes_from_the_acks_not_yet_written() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        for u in ["alice", "bob"] {
            store.create_user(u, "", 0).await.unwrap();
        }
        let conv = store.open_direct("alice", "bob", 0).await.unwrap();
        let tokens = TokenKeys::new(b"0123456789abcdef0123456789abcdef").unwrap();
        // Acked cursors stay unwritten for the whole test: only the replica
        // that took the ack knows it.
        let unwritten = ChatConfig {
            cursor_flush: std::time::Duration::from_secs(3600),
            ..ChatConfig::default()
        };
        let replicas = [
            replica_with(store.clone(), &tokens, unwritten.clone()).await,
            replica_with(store.clone(), &tokens, unwritten).await,
        ];
        let addrs = replicas.iter().map(|r| r.addr.to_string()).collect();
        let mut config = RemoteConfig::new(addrs);
        config.key = Some("k3y".into());
        let remote = RemoteChat::connect(config).await.unwrap();
        for i in 0..6 {
            remote
                .call("alice", "d", send(conv.id, &format!("m{i}")))
                .await
                .unwrap();
        }
        remote.ack("bob", "phone", 4);
        // The ack is not waited for: until it has landed, the device resumes
        // at the head.
        let mut landed = false;
        for _ in 0..100 {
            if remote.session_opened("bob", "phone", None).await.unwrap() == (4, 6) {
                landed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(landed, "the ack never landed");
        // Within the cursor-write period (500 ms), several logins in a row:
        // round robin would have sent every other one to the replica that
        // knows nothing of the ack.
        for _ in 0..4 {
            let (resume, head) = remote.session_opened("bob", "phone", None).await.unwrap();
            assert_eq!((resume, head), (4, 6));
        }
    }

    #[tokio::test]
    async fn calls_fail_over_between_replicas_and_keep_application_errors() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        for u in ["alice", "bob"] {
            store.create_user(u, "", 0).await.unwrap();
        }
        let conv = store.open_direct("alice", "bob", 0).await.unwrap();
        let tokens = TokenKeys::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let (a, b) = (
            replica(store.clone(), &tokens).await,
            replica(store.clone(), &tokens).await,
        );
        let mut config = RemoteConfig::new(vec![a.addr.to_string(), b.addr.to_string()]);
        config.key = Some("k3y".into());
        let remote = RemoteChat::connect(config.clone()).await.unwrap();
        assert_eq!(remote.replicas().len(), 2);

        let token = tokens
            .issue("alice", parley_core::now_ms() / 1000, 60)
            .unwrap();
        assert_eq!(
            remote.authenticate(&token, "d").await.unwrap().user,
            "alice"
        );
        let err = remote.authenticate("garbage", "d").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
        let err = remote
            .call("alice", "d", send(9999, "x"))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::NotMember,
            "application errors pass through"
        );

        // One replica goes away; every send still succeeds, each acked once.
        let _ = a.stop.send(true);
        a.task.await.unwrap();
        for i in 0..20 {
            let resp = remote
                .call("alice", "d", send(conv.id, &format!("m{i}")))
                .await
                .unwrap();
            let Resp::SendAck(ack) = resp else {
                panic!("expected an ack, got {resp:?}")
            };
            assert_eq!(ack.seq, i + 1);
        }
        let (resume, head) = remote.session_opened("bob", "phone", None).await.unwrap();
        assert_eq!((resume, head), (20, 20));
        let page = remote.sync("bob", 15, 100).await.unwrap();
        assert_eq!(page.entries.len(), 5);
        // The sends of a conversation the dead replica owned move to the
        // other, in order.
        let members = ["alice", "bob"].map(String::from);
        let mut owned = None;
        for i in 0..64 {
            let (g, _) = store
                .create_group("alice", &format!("g{i}"), &members, 0)
                .await
                .unwrap();
            if mix(g.id ^ tag_of(a.addr)) > mix(g.id ^ tag_of(b.addr)) {
                owned = Some(g.id);
                break;
            }
        }
        let g = owned.expect("one of 64 groups hashes to the stopped replica");
        for i in 0..5 {
            let resp = remote
                .call("alice", "d", send(g, &format!("g{i}")))
                .await
                .unwrap();
            let Resp::SendAck(ack) = resp else {
                panic!("expected an ack, got {resp:?}")
            };
            assert_eq!(ack.seq, i + 2, "after the group's created event");
        }
        assert!(
            remote.failures() >= 1,
            "the dead replica was tried and set aside"
        );

        // A name resolving to several addresses counts each as a replica;
        // those that do not answer are passed over.
        let mut by_name = RemoteConfig::new(vec![format!("localhost:{}", b.addr.port())]);
        by_name.key = Some("k3y".into());
        let by_name = RemoteChat::connect(by_name).await.unwrap();
        assert!(!by_name.replicas().is_empty());
        for _ in 0..4 {
            assert_eq!(
                by_name.authenticate(&token, "d").await.unwrap().user,
                "alice"
            );
        }

        // Without the key, calls are refused, and not retried.
        config.key = None;
        let keyless = RemoteChat::connect(config).await.unwrap();
        let err = keyless.authenticate(&token, "d").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
        let _ = b.stop.send(true);
    }

    fn pool_of(addrs: &[SocketAddr]) -> Pool {
        let pool = Pool::new(KeyInterceptor(None), Duration::from_secs(60));
        pool.update(addrs.to_vec());
        pool
    }

    /// Every gateway sends a conversation to the same replica; each replica
    /// gets a share; a replica set aside or gone moves only its own share.
    #[tokio::test]
    async fn conversations_hash_to_one_replica_and_move_only_with_it() {
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| format!("10.0.0.{i}:7100").parse().unwrap())
            .collect();
        let (one, other) = (pool_of(&addrs), pool_of(&addrs));
        let owner = |p: &Pool, k: u64| p.pick_for(k).unwrap().addr;
        let keys: Vec<u64> = (1..=3_000).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|&k| owner(&one, k)).collect();
        for (&k, a) in keys.iter().zip(&before) {
            assert_eq!(owner(&other, k), *a, "two gateways agree on {k}");
            assert_eq!(owner(&one, k), *a, "and keep to it");
        }
        for addr in &addrs {
            let share = before.iter().filter(|a| *a == addr).count();
            assert!((800..1_200).contains(&share), "{addr} owns {share} of 3000");
        }

        // The first replica fails: its conversations spread over the others,
        // nobody else's move.
        let down = one.snapshot()[0].clone();
        one.set_down(&down);
        for (&k, a) in keys.iter().zip(&before) {
            let now = owner(&one, k);
            if *a == down.addr {
                assert_ne!(now, down.addr);
            } else {
                assert_eq!(now, *a, "{k} stayed");
            }
        }
        // Gone for good: the same.
        other.update(addrs[1..].to_vec());
        for &k in &keys {
            assert_eq!(owner(&other, k), owner(&one, k));
        }
        // With every replica down, the one down longest is tried.
        for r in one.snapshot().iter().skip(1) {
            one.set_down(r);
        }
        assert_eq!(owner(&one, 7), down.addr);
    }

    /// Sends and acks of many connections at once travel in one `Batch`
    /// call, each answered on its own: refusals stay with their item.
    #[tokio::test]
    async fn concurrent_sends_and_acks_share_one_call() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        for u in ["alice", "bob", "carol"] {
            store.create_user(u, "", 0).await.unwrap();
        }
        let conv = store.open_direct("alice", "bob", 0).await.unwrap();
        let tokens = TokenKeys::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let r = replica(store.clone(), &tokens).await;
        let mut config = RemoteConfig::new(vec![r.addr.to_string()]);
        config.key = Some("k3y".into());
        config.batches_in_flight = 1;
        let remote = Arc::new(RemoteChat::connect(config).await.unwrap());
        // Warm the channel, so the batch below is not the connect's.
        remote.sync("bob", 0, 1).await.unwrap();
        let (calls_before, _) = remote.batches();

        let mut tasks = Vec::new();
        for i in 0..150 {
            let sender = remote.clone();
            tasks.push(tokio::spawn(async move {
                // Carol is no member: her sends fail alone.
                let user = if i % 50 == 49 { "carol" } else { "alice" };
                sender
                    .call(user, "d", send(conv.id, &format!("m{i}")))
                    .await
            }));
            let acker = remote.clone();
            tasks.push(tokio::spawn(async move {
                acker.ack("bob", "phone", i);
                Ok(Resp::Done(pb::Done {}))
            }));
        }
        let mut seqs = Vec::new();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(Resp::SendAck(ack)) => seqs.push(ack.seq),
                Ok(Resp::Done(_)) => {}
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => {
                    assert_eq!(e.code(), ErrorCode::NotMember, "{e}");
                    refused += 1;
                }
            }
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=147).collect::<Vec<_>>(),
            "each send committed once"
        );
        assert_eq!(refused, 3);
        // The acks are not waited for: the last may still be on its way.
        let mut counts = remote.batches();
        for _ in 0..100 {
            if counts.1 == 300 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            counts = remote.batches();
        }
        let (calls, items) = counts;
        assert!(
            calls - calls_before <= 4,
            "300 items went in {} calls",
            calls - calls_before
        );
        assert_eq!(items, 300);
        let _ = r.stop.send(true);
    }
}
