//! The cluster's shared, short-lived state in Redis: presence (which
//! gateway holds each device), each gateway's lease
//! (address and online count), the routing table the route lookup reads,
//! and the operator's drain requests. Every key starts with a prefix, so
//! clusters and tests share one Redis without touching each other's keys;
//! every key name is in [`keys`], the one place the chat service, the
//! gateways and the operator take them from.

pub mod keys;
mod presence;
mod routing;
pub mod testing;

use std::time::Duration;

use futures_util::StreamExt;
use parley_core::{ChatError, redact_urls};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::watch;

pub use keys::Keys;
pub use presence::{PRESENCE_SETTLE, PRESENCE_TTL};
pub use routing::{Announced, Lease, ROUTE_CANDIDATES};

/// A connection to the cluster's Redis, under a key prefix.
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    keys: Keys,
    online: Script,
    offline: Script,
    announce: Script,
    route: Script,
    /// How long presence counts as unsettled after it started over.
    settle: Duration,
    /// The first connection epoch of the gateway writing leases through
    /// this handle (see [`RedisState::with_lease_since`]).
    lease_since: u64,
    forget: Script,
    client: redis::Client,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

pub(crate) fn redis_err(e: redis::RedisError) -> ChatError {
    ChatError::Unavailable(format!("redis: {e}"))
}

impl RedisState {
    /// A handle on `url` under `prefix`. It connects on first use and
    /// reconnects by itself, at once, when the connection drops.
    pub fn new(url: &str, prefix: &str) -> Result<Self, ChatError> {
        let client = redis::Client::open(url)
            .map_err(|e| ChatError::invalid(redact_urls(&format!("redis url {url:?}: {e}"))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(redis_err)?;
        Ok(Self {
            conn,
            keys: Keys::new(prefix),
            online: Script::new(presence::ONLINE),
            offline: Script::new(presence::OFFLINE),
            announce: Script::new(routing::ANNOUNCE),
            route: Script::new(routing::ROUTE),
            settle: PRESENCE_SETTLE,
            lease_since: 0,
            forget: Script::new(presence::FORGET),
            client,
        })
    }

    /// Sets how long presence lookups call presence unsettled after it
    /// started over (see [`PRESENCE_SETTLE`]).
    pub fn with_presence_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Writes `first_epoch` in this gateway's lease: its presence entries
    /// with a smaller epoch are a former process's (one that crashed and
    /// came back under the same name, as a pod does) and count no more.
    pub fn with_lease_since(mut self, first_epoch: u64) -> Self {
        self.lease_since = first_epoch;
        self
    }

    /// Watches the link to Redis over a connection of its own (a
    /// subscription, which ends the moment the connection drops): ticks
    /// when the link drops and when it is back, so that a gateway writes
    /// its lease at once, and its presence again if Redis restarted empty.
    pub fn watch_link(&self) -> LinkWatch {
        let (tx, changes) = watch::channel(0);
        let task = tokio::spawn(watch_link(
            self.client.clone(),
            format!("{}:link", self.keys.prefix()),
            tx,
        ));
        LinkWatch { changes, task }
    }

    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The key names of this cluster.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    }
}

/// Ticks of [`RedisState::watch_link`]; the watching stops when this goes.
#[derive(Debug)]
pub struct LinkWatch {
    pub changes: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Between attempts to reach Redis while it does not answer.
const LINK_RETRY: Duration = Duration::from_millis(200);

async fn watch_link(client: redis::Client, channel: String, tx: watch::Sender<u64>) {
    let mut was_up = true;
    loop {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(mut pubsub)) => {
                if !was_up {
                    tx.send_modify(|n| *n += 1);
                }
                // Nothing is published there: this returns when the
                // connection drops.
                while pubsub.on_message().next().await.is_some() {}
                tx.send_modify(|n| *n += 1);
                was_up = false;
            }
            Ok(Err(_)) | Err(_) => {
                was_up = false;
                tokio::time::sleep(LINK_RETRY).await;
            }
        }
    }
}

/// Removes every key under `prefix` (tests, and a cluster being deleted).
pub async fn delete_prefix(url: &str, prefix: &str) -> Result<u64, ChatError> {
    let client = redis::Client::open(url).map_err(redis_err)?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis_err)?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(Keys::new(prefix).all())
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        if !keys.is_empty() {
            deleted += keys.len() as u64;
            c.del::<_, ()>(keys).await.map_err(redis_err)?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests;

/// The rate limits' shared counters: one pipeline per sync, whatever the
/// number of keys (`INCRBY` and `PEXPIRE` of the current window's counter,
/// `GET` of the previous one's); one, so that it fails or succeeds whole
/// and a failed sync's counts can be pushed again without counting twice.
#[async_trait::async_trait]
impl parley_core::limits::Counters for RedisState {
    async fn add(
        &self,
        adds: &[parley_core::limits::CounterAdd],
    ) -> Result<Vec<(u64, u64)>, ChatError> {
        let mut out = Vec::with_capacity(adds.len());
        {
            let mut pipe = redis::pipe();
            for a in adds {
                let current = self.keys.rate(&a.key, a.window_ms, a.index);
                pipe.incr(&current, a.by)
                    .pexpire(&current, (2 * a.window_ms) as i64)
                    .ignore();
                match a.index.checked_sub(1) {
                    Some(prev) => pipe.get(self.keys.rate(&a.key, a.window_ms, prev)),
                    None => pipe.cmd("ECHO").arg(0),
                };
            }
            let mut c = self.conn.clone();
            let answers: Vec<(u64, Option<u64>)> =
                pipe.query_async(&mut c).await.map_err(redis_err)?;
            out.extend(
                answers
                    .into_iter()
                    .map(|(current, prev)| (prev.unwrap_or(0), current)),
            );
        }
        Ok(out)
    }
}

/// The push senders' ledger: one `MGET` to learn which of a batch's
/// notifications went out already, one pipeline of `SET EX` to record
/// those that did, whatever the batch's size.
#[async_trait::async_trait]
impl parley_core::push::PushLedger for RedisState {
    async fn unsent(&self, ids: &[String]) -> Result<Vec<bool>, ChatError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.push_sent(id)).collect();
        let mut c = self.conn.clone();
        let found: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(found.iter().map(Option::is_none).collect())
    }

    async fn sent(&self, ids: &[String]) -> Result<(), ChatError> {
        if ids.is_empty() {
            return Ok(());
        }
        let keep = parley_core::push::LEDGER_KEEP.as_secs();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.set_ex(self.keys.push_sent(id), 1, keep).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }
}
