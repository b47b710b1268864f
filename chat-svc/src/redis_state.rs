//! The cluster's shared, short-lived state in Redis: presence, the block-list
//! cache, each gateway's lease (address and online count) and the routing
//! table the route lookup reads. Every key starts with a prefix, so clusters
//! and tests share one Redis without touching each other's keys.
//!
//! Keys (`P` is the prefix):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:presence:<user>` | hash | device → `<gateway>|<epoch>`; expires unless refreshed |
//! | `P:gw:<gateway>` | string | `<address>|<connections>`, a lease with a short TTL |
//! | `P:routes` | sorted set | advertised address scored by connections |
//! | `P:routes:seen` | hash | address → when its entry was last written (ms) |
//! | `P:blocks:<user>` | string | the users `<user>` blocks, newline-separated |
//!
//! A device's entry names its gateway and connection epoch. Locating users
//! only returns gateways whose lease is alive, so the devices of a gateway
//! that died without a word stop receiving within one lease TTL; a device
//! that reconnected elsewhere replaced its entry with a larger epoch, and the
//! old connection's late goodbye cannot remove it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::error::ChatError;
use crate::presence::{Presence, Session};

/// How long a user's presence hash lives without a refresh. Gateways
/// refresh their sessions well within it.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30 * 60);

/// How long a cached block list is trusted.
const BLOCKS_TTL: Duration = Duration::from_secs(600);

const ONLINE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local e = tonumber(string.match(cur, '|(%d+)$'))
  if e and e > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

const OFFLINE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
";

/// Writes a gateway's lease and its routing entry (or removes the entry when
/// it drains), and drops entries nobody refreshed within the TTL. Time comes
/// from Redis, so gateways' clocks need not agree. When the operator owns
/// the routing table (ARGV[5] = 1), only the lease is written, and a
/// draining gateway takes its own entry out. The reply also carries the
/// operator's drain request for this gateway, if any.
const ANNOUNCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local had = redis.call('EXISTS', KEYS[1])
local drain = redis.call('GET', KEYS[4])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ttl)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
elseif ARGV[5] == '1' then
  -- The operator owns the routing table: only the lease is ours.
  return {had, drain}
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], now)
end
local seen = redis.call('HGETALL', KEYS[3])
for i = 1, #seen, 2 do
  if tonumber(seen[i + 1]) < now - ttl then
    redis.call('ZREM', KEYS[2], seen[i])
    redis.call('HDEL', KEYS[3], seen[i])
  end
end
return {had, drain}
";

/// Takes the least-loaded address and counts the client about to arrive on
/// it, so a burst of lookups between two refreshes spreads out.
const ROUTE: &str = r"
local r = redis.call('ZRANGE', KEYS[1], 0, 0)
if #r == 0 then return false end
redis.call('ZINCRBY', KEYS[1], 1, r[1])
return r[1]
";

/// A connection to the cluster's Redis, under a key prefix.
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
    online: Script,
    offline: Script,
    announce: Script,
    route: Script,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> ChatError {
    ChatError::Unavailable(format!("redis: {e}"))
}

/// What a lease write learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// False when the lease had gone (first start, expiry, or a Redis that
    /// restarted and lost everything): presence must be written again.
    pub had_lease: bool,
    /// The operator asks this gateway to drain at this many clients per
    /// second.
    pub drain_rate: Option<u32>,
}

/// One gateway's lease as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub gateway: String,
    pub address: String,
    pub connections: u64,
}

impl RedisState {
    /// A handle on `url` under `prefix`. It connects on first use and
    /// reconnects by itself after Redis restarts.
    pub fn new(url: &str, prefix: &str) -> Result<Self, ChatError> {
        let client = redis::Client::open(url)
            .map_err(|e| ChatError::invalid(format!("redis url {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(redis_err)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            online: Script::new(ONLINE),
            offline: Script::new(OFFLINE),
            announce: Script::new(ANNOUNCE),
            route: Script::new(ROUTE),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    }

    /// Records many sessions at once (a gateway re-registering everything it
    /// holds after Redis came back, or refreshing before the TTL).
    pub async fn online_many(&self, sessions: &[Session]) -> Result<(), ChatError> {
        let ttl = PRESENCE_TTL.as_millis() as u64;
        for chunk in sessions.chunks(1000) {
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("EVAL")
                    .arg(ONLINE)
                    .arg(1)
                    .arg(self.key("presence", &s.user))
                    .arg(&s.device)
                    .arg(&s.gateway)
                    .arg(s.epoch)
                    .arg(ttl)
                    .ignore();
            }
            let mut c = self.conn.clone();
            pipe.query_async::<()>(&mut c).await.map_err(redis_err)?;
        }
        Ok(())
    }

    /// Writes this gateway's lease (address and online count, alive for
    /// `ttl`) and, unless the operator owns the routing table (`managed`),
    /// its routing entry; `draining` takes the entry out instead.
    pub async fn announce(
        &self,
        gateway: &str,
        address: &str,
        connections: u64,
        ttl: Duration,
        draining: bool,
        managed: bool,
    ) -> Result<Announced, ChatError> {
        let mut c = self.conn.clone();
        let (had, drain): (i64, Option<String>) = self
            .announce
            .key(self.key("gw", gateway))
            .key(self.routes_key())
            .key(format!("{}:routes:seen", self.prefix))
            .key(self.key("drain", gateway))
            .arg(address)
            .arg(connections)
            .arg(ttl.as_millis() as u64)
            .arg(if draining { "1" } else { "0" })
            .arg(if managed { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(Announced {
            had_lease: had == 1,
            drain_rate: drain.and_then(|d| d.parse().ok()),
        })
    }

    /// Asks `gateway` to move its clients away at `rate` per second (the
    /// operator's scale-down). The gateway reads the request with its next
    /// lease write; the request lapses after `ttl`.
    pub async fn request_drain(
        &self,
        gateway: &str,
        rate: u32,
        ttl: Duration,
    ) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.pset_ex::<_, _, ()>(self.key("drain", gateway), rate, ttl.as_millis() as u64)
            .await
            .map_err(redis_err)
    }

    /// Removes this gateway's lease and routing entry (a clean shutdown).
    pub async fn withdraw(&self, gateway: &str, address: &str) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(self.key("gw", gateway))
            .zrem(self.routes_key(), address)
            .hdel(format!("{}:routes:seen", self.prefix), address)
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Replaces the whole routing table with `entries` (address,
    /// connections), atomically: the operator's write, once it owns the
    /// table. Route lookups never see it half written.
    pub async fn replace_routes(&self, entries: &[(String, u64)]) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.routes_key())
            .del(format!("{}:routes:seen", self.prefix));
        if !entries.is_empty() {
            let members: Vec<(u64, &str)> = entries.iter().map(|(a, n)| (*n, a.as_str())).collect();
            pipe.zadd_multiple(self.routes_key(), &members);
        }
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// The routing table's key: advertised addresses scored by connections.
    pub fn routes_key(&self) -> String {
        format!("{}:routes", self.prefix)
    }

    /// The least-loaded gateway's address, counting the caller on it.
    pub async fn route(&self) -> Result<Option<String>, ChatError> {
        let mut c = self.conn.clone();
        self.route
            .key(self.routes_key())
            .invoke_async::<Option<String>>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// The routing table, lowest score first.
    pub async fn routes(&self) -> Result<Vec<(String, f64)>, ChatError> {
        let mut c = self.conn.clone();
        c.zrange_withscores(self.routes_key(), 0, -1)
            .await
            .map_err(redis_err)
    }

    /// The leases of `gateways` that are alive.
    pub async fn leases(&self, gateways: &[&str]) -> Result<Vec<Lease>, ChatError> {
        if gateways.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = gateways.iter().map(|g| self.key("gw", g)).collect();
        let mut c = self.conn.clone();
        let values: Vec<Option<String>> = c.mget(keys).await.map_err(redis_err)?;
        Ok(gateways
            .iter()
            .zip(values)
            .filter_map(|(g, v)| {
                let v = v?;
                let (address, n) = v.rsplit_once('|')?;
                Some(Lease {
                    gateway: (*g).to_owned(),
                    address: address.to_owned(),
                    connections: n.parse().unwrap_or(0),
                })
            })
            .collect())
    }
}

#[async_trait]
impl Presence for RedisState {
    async fn online(&self, s: &Session) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        self.online
            .key(self.key("presence", &s.user))
            .arg(&s.device)
            .arg(&s.gateway)
            .arg(s.epoch)
            .arg(PRESENCE_TTL.as_millis() as u64)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn offline(&self, s: &Session) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        self.offline
            .key(self.key("presence", &s.user))
            .arg(&s.device)
            .arg(format!("{}|{}", s.gateway, s.epoch))
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn locate(&self, users: &[&str]) -> Result<HashMap<String, Vec<String>>, ChatError> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.hvals(self.key("presence", u));
        }
        let mut c = self.conn.clone();
        let entries: Vec<Vec<String>> = pipe.query_async(&mut c).await.map_err(redis_err)?;
        let mut wanted: HashMap<&str, Vec<&str>> = HashMap::new();
        for (user, devices) in users.iter().zip(&entries) {
            let mut gateways: Vec<&str> = devices
                .iter()
                .filter_map(|v| v.rsplit_once('|').map(|(g, _)| g))
                .collect();
            gateways.sort_unstable();
            gateways.dedup();
            for g in gateways {
                wanted.entry(g).or_default().push(user);
            }
        }
        let names: Vec<&str> = wanted.keys().copied().collect();
        let alive: HashSet<String> = self
            .leases(&names)
            .await?
            .into_iter()
            .map(|l| l.gateway)
            .collect();
        Ok(wanted
            .into_iter()
            .filter(|(g, _)| alive.contains(*g))
            .map(|(g, users)| (g.to_owned(), users.into_iter().map(str::to_owned).collect()))
            .collect())
    }
}

/// A cache of block lists in front of the database.
#[async_trait]
pub trait BlockCache: Send + Sync + 'static {
    /// For each user, the users they block, or None where not cached.
    async fn get(&self, users: &[&str]) -> Result<Vec<Option<Vec<String>>>, ChatError>;
    async fn put(&self, user: &str, blocked: &[String]) -> Result<(), ChatError>;
    async fn forget(&self, user: &str) -> Result<(), ChatError>;
}

#[async_trait]
impl BlockCache for RedisState {
    async fn get(&self, users: &[&str]) -> Result<Vec<Option<Vec<String>>>, ChatError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|u| self.key("blocks", u)).collect();
        let mut c = self.conn.clone();
        let values: Vec<Option<String>> = c.mget(keys).await.map_err(redis_err)?;
        Ok(values
            .into_iter()
            .map(|v| {
                v.map(|s| {
                    s.split('\n')
                        .filter(|x| !x.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
            })
            .collect())
    }

    async fn put(&self, user: &str, blocked: &[String]) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.set_ex::<_, _, ()>(
            self.key("blocks", user),
            blocked.join("\n"),
            BLOCKS_TTL.as_secs(),
        )
        .await
        .map_err(redis_err)
    }

    async fn forget(&self, user: &str) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.del::<_, ()>(self.key("blocks", user))
            .await
            .map_err(redis_err)
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
            .arg(format!("{prefix}:*"))
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
mod tests {
    use super::*;
    use crate::testing::TestRedis;

    fn s(user: &str, device: &str, gateway: &str, epoch: u64) -> Session {
        Session {
            user: user.into(),
            device: device.into(),
            gateway: gateway.into(),
            epoch,
        }
    }

    fn state(t: &TestRedis) -> RedisState {
        RedisState::new(&t.url, &t.prefix).unwrap()
    }

    #[tokio::test]
    async fn presence_is_fenced_by_epoch_and_needs_a_live_gateway() {
        let t = TestRedis::new();
        let r = state(&t);
        assert!(r.ping().await, "Redis for tests (run scripts/services)");
        let ttl = Duration::from_secs(30);
        let first = r
            .announce("g1", "10.0.0.1:7400", 1, ttl, false, false)
            .await
            .unwrap();
        assert!(!first.had_lease, "a first lease is new");
        assert_eq!(first.drain_rate, None);
        let again = r
            .announce("g1", "10.0.0.1:7400", 1, ttl, false, false)
            .await
            .unwrap();
        assert!(again.had_lease);
        // The operator asks g1 to drain; g1 learns it with its next lease.
        r.request_drain("g1", 250, ttl).await.unwrap();
        for managed in [false, true] {
            let asked = r
                .announce("g1", "10.0.0.1:7400", 1, ttl, false, managed)
                .await
                .unwrap();
            assert_eq!(asked.drain_rate, Some(250));
        }
        r.announce("g2", "10.0.0.2:7400", 1, ttl, false, false)
            .await
            .unwrap();
        r.online(&s("ann", "phone", "g1", 1)).await.unwrap();
        r.online(&s("ann", "phone", "g2", 2)).await.unwrap();
        // The old connection's registration and goodbye arrive late.
        r.online(&s("ann", "phone", "g1", 1)).await.unwrap();
        r.offline(&s("ann", "phone", "g1", 1)).await.unwrap();
        r.online(&s("ann", "laptop", "g1", 3)).await.unwrap();
        let located = r.locate(&["ann", "nobody"]).await.unwrap();
        assert_eq!(located.len(), 2);
        assert_eq!(located["g2"], vec!["ann".to_owned()]);
        assert_eq!(located["g1"], vec!["ann".to_owned()]);
        r.offline(&s("ann", "laptop", "g1", 3)).await.unwrap();
        let located = r.locate(&["ann"]).await.unwrap();
        assert_eq!(located.keys().collect::<Vec<_>>(), vec!["g2"]);

        // A gateway that dies says nothing: its lease runs out, and its
        // devices are no longer located.
        r.announce(
            "g3",
            "10.0.0.3:7400",
            1,
            Duration::from_secs(2),
            false,
            false,
        )
        .await
        .unwrap();
        r.online(&s("bo", "phone", "g3", 4)).await.unwrap();
        assert!(r.locate(&["bo"]).await.unwrap().contains_key("g3"));
        let mut gone = false;
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if r.locate(&["bo"]).await.unwrap().is_empty() {
                gone = true;
                break;
            }
        }
        assert!(gone, "the dead gateway's devices are no longer located");

        // A gateway re-registers what it holds in bulk (after a Redis restart).
        let many: Vec<Session> = (0..2500)
            .map(|i| s(&format!("u{i}"), "d", "g2", 10))
            .collect();
        r.online_many(&many).await.unwrap();
        let users: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        assert_eq!(r.locate(&refs).await.unwrap()["g2"].len(), 2500);
    }

    #[tokio::test]
    async fn the_route_lookup_spreads_clients_over_the_least_loaded() {
        let t = TestRedis::new();
        let r = state(&t);
        let ttl = Duration::from_secs(30);
        assert_eq!(r.route().await.unwrap(), None);
        r.announce("a", "a:1", 5, ttl, false, false).await.unwrap();
        r.announce("b", "b:1", 2, ttl, false, false).await.unwrap();
        let mut picked = Vec::new();
        for _ in 0..5 {
            picked.push(r.route().await.unwrap().unwrap());
        }
        // b takes clients until it is as loaded as a, then they alternate.
        assert_eq!(picked, vec!["b:1", "b:1", "b:1", "a:1", "b:1"]);
        // A refresh puts the real count back.
        r.announce("b", "b:1", 2, ttl, false, false).await.unwrap();
        assert_eq!(r.routes().await.unwrap()[0], ("b:1".to_owned(), 2.0));
        // A draining gateway leaves the table but keeps its lease.
        r.announce("b", "b:1", 2, ttl, true, false).await.unwrap();
        assert_eq!(r.route().await.unwrap().as_deref(), Some("a:1"));
        assert_eq!(r.leases(&["b"]).await.unwrap()[0].connections, 2);
        // An entry nobody refreshes is pruned by the next announcement.
        r.announce("c", "c:1", 0, Duration::from_millis(100), false, false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        r.announce("a", "a:1", 6, Duration::from_millis(100), false, false)
            .await
            .unwrap();
        let routes: Vec<String> = r.routes().await.unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(routes, vec!["a:1"]);
        r.withdraw("a", "a:1").await.unwrap();
        assert!(r.routes().await.unwrap().is_empty());
        assert!(r.leases(&["a"]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn block_lists_are_cached_and_forgotten() {
        let t = TestRedis::new();
        let r = state(&t);
        assert_eq!(r.get(&["ann"]).await.unwrap(), vec![None]);
        r.put("ann", &[]).await.unwrap();
        r.put("bo", &["x".into(), "y".into()]).await.unwrap();
        assert_eq!(
            r.get(&["ann", "bo", "cy"]).await.unwrap(),
            vec![Some(vec![]), Some(vec!["x".into(), "y".into()]), None]
        );
        r.forget("bo").await.unwrap();
        assert_eq!(r.get(&["bo"]).await.unwrap(), vec![None]);
    }
}
