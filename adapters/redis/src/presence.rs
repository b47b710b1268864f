//! Presence in Redis: for each user a hash of device → `<gateway>|<epoch>`.
//! A device's entry names its gateway and connection epoch. Locating users
//! only returns gateways whose lease is alive, so the devices of a gateway
//! that died without a word stop receiving within one lease TTL; a device
//! that reconnected elsewhere replaced its entry with a larger epoch, and the
//! old connection's late goodbye cannot remove it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use parley_core::{ChatError, Located, Presence, Session};
use redis::{FromRedisValue, Script, Value};

use crate::{RedisState, redis_err};

/// How long a user's presence hash lives without a refresh. Gateways
/// refresh their sessions well within it.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30 * 60);

/// How long after presence started over (Redis restarted empty) a lookup
/// cannot trust a user's missing entry: the gateways write their sessions
/// back within this (they notice the dropped connection at once, or the
/// lost lease at their next lease write, every 5 s by default). Meanwhile
/// deliveries go to every gateway.
pub const PRESENCE_SETTLE: Duration = Duration::from_secs(10);

/// Whether presence is settled: 1 when it started over at least ARGV[1] ms
/// ago (Redis's clock), 0 within that time. The first lookup after Redis
/// lost its data finds no mark and makes it.
pub(crate) const SETTLED: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(redis.call('GET', KEYS[1]))
if not since then
  redis.call('SET', KEYS[1], now)
  since = now
end
if now - since >= tonumber(ARGV[1]) then return 1 end
return 0
";

/// Adds `script` to a pipeline as one `SCRIPT LOAD`, so that the `EVALSHA`s
/// after it in the same pipeline find it (also on a Redis that just
/// restarted) without sending its text each time; answers its hash.
fn load(pipe: &mut redis::Pipeline, source: &str) -> String {
    pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
    Script::new(source).get_hash().to_owned()
}

/// Records a device's gateway unless a newer connection (a larger epoch)
/// already did. Answers the device's other entry it met (`<gateway>|<epoch>`:
/// the one it replaced, or the newer one that kept it out), nil for none or
/// for this very entry. A device with no entry is refused when the user
/// has ARGV[5] entries already (0: no cap): the answer is then `!FULL`.
pub(crate) const ONLINE: &str = r"
local mine = ARGV[2] .. '|' .. ARGV[3]
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local cap = tonumber(ARGV[5])
if not cur and cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then
  return '!FULL'
end
if cur and cur ~= mine then
  local e = tonumber(string.match(cur, '|(%d+)$'))
  if e and e > tonumber(ARGV[3]) then return cur end
end
redis.call('HSET', KEYS[1], ARGV[1], mine)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if cur == mine then return false end
return cur
";

/// Removes a user's entries whose gateway is gone: its lease has expired,
/// or a later process holds it (a first epoch above the entry's) that came
/// back under the same name. KEYS[1] is the user's hash; for entry i,
/// KEYS[2i] is its gateway's lease and KEYS[2i + 1] that lease's first
/// epoch, ARGV[2i - 1] and ARGV[2i] the entry's device and value, removed
/// only if the hash still holds that value. Answers how many went.
pub(crate) const FORGET: &str = r"
local gone = 0
for i = 1, (#KEYS - 1) / 2 do
  local device, value = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HGET', KEYS[1], device) == value then
    local dead = redis.call('EXISTS', KEYS[2 * i]) == 0
    if not dead then
      local since = tonumber(redis.call('GET', KEYS[2 * i + 1]) or '0') or 0
      local epoch = tonumber(string.match(value, '|(%d+)$') or '0') or 0
      dead = epoch < since
    end
    if dead then
      redis.call('HDEL', KEYS[1], device)
      gone = gone + 1
    end
  end
end
return gone
";

/// The ONLINE answer of a device refused by the cap.
const FULL: &str = "!FULL";

/// A session's entry in its user's hash: `<gateway>|<epoch>`.
fn entry(s: &Session) -> String {
    format!("{}|{}", s.gateway, s.epoch)
}

/// The session an ONLINE answer names, for the device of `s`.
fn other_session(s: &Session, answer: Option<String>) -> Option<Session> {
    let answer = answer?;
    let (gateway, epoch) = answer.rsplit_once('|')?;
    Some(Session::new(
        &s.user,
        &s.device,
        gateway,
        epoch.parse().ok()?,
    ))
}

/// Removes a device's entry if it is still this connection's.
pub(crate) const OFFLINE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
";

impl RedisState {
    /// Records many sessions at once (a gateway re-registering everything it
    /// holds after Redis came back, or refreshing before the TTL). Returns
    /// the newer sessions that kept some of them out: those devices logged
    /// in again elsewhere, and their connections here are stale (a backstop
    /// for a replacement notice that was lost).
    pub async fn online_many(&self, sessions: &[Session]) -> Result<Vec<Session>, ChatError> {
        let ttl = PRESENCE_TTL.as_millis() as u64;
        let mut newer = Vec::new();
        for chunk in sessions.chunks(1000) {
            let mut pipe = redis::pipe();
            let online = load(&mut pipe, ONLINE);
            for s in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&online)
                    .arg(1)
                    .arg(self.keys.presence(&s.user))
                    .arg(&s.device)
                    .arg(&s.gateway)
                    .arg(s.epoch)
                    .arg(ttl)
                    .arg(0);
            }
            let mut c = self.conn.clone();
            let answers: Vec<Option<String>> = pipe.query_async(&mut c).await.map_err(redis_err)?;
            newer.extend(
                chunk
                    .iter()
                    .zip(answers)
                    .filter_map(|(s, a)| other_session(s, a).filter(|o| o.epoch > s.epoch)),
            );
        }
        Ok(newer)
    }

    /// Removes many sessions' entries at once, each only if it is still
    /// that session's (sessions that ended while Redis was away).
    pub async fn offline_many(&self, sessions: &[Session]) -> Result<(), ChatError> {
        for chunk in sessions.chunks(1000) {
            let mut pipe = redis::pipe();
            let offline = load(&mut pipe, OFFLINE);
            for s in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&offline)
                    .arg(1)
                    .arg(self.keys.presence(&s.user))
                    .arg(&s.device)
                    .arg(entry(s))
                    .ignore();
            }
            let mut c = self.conn.clone();
            pipe.query_async::<()>(&mut c).await.map_err(redis_err)?;
        }
        Ok(())
    }

    async fn online_once(&self, s: &Session, cap: u32) -> Result<Option<String>, ChatError> {
        let mut c = self.conn.clone();
        self.online
            .key(self.keys.presence(&s.user))
            .arg(&s.device)
            .arg(&s.gateway)
            .arg(s.epoch)
            .arg(PRESENCE_TTL.as_millis() as u64)
            .arg(cap)
            .invoke_async(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Removes a user's entries held by gateways that are gone (died
    /// without a word, or came back as a new process under the same
    /// name): they must not count against the user's cap. The check and
    /// the removal are one script, so an entry written again meanwhile
    /// stays. Answers how many went.
    async fn forget_dead_devices(&self, user: &str) -> Result<usize, ChatError> {
        let mut c = self.conn.clone();
        let key = self.keys.presence(user);
        let entries: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        let mut call = self.forget.key(&key);
        for (device, value) in &entries {
            let gateway = value.rsplit_once('|').map_or("", |(g, _)| g);
            call.key(self.keys.lease(gateway))
                .key(self.keys.lease_since(gateway))
                .arg(device)
                .arg(value);
        }
        call.invoke_async(&mut c).await.map_err(redis_err)
    }
}

#[async_trait]
impl Presence for RedisState {
    async fn online_within(
        &self,
        s: &Session,
        cap: Option<u32>,
    ) -> Result<Option<Session>, ChatError> {
        let cap = cap.unwrap_or(0);
        let mut answer = self.online_once(s, cap).await?;
        // Full, perhaps of devices whose gateway died: clear those and try
        // once more (rare: only when a user is at the cap). Redis answered
        // a moment ago: if clearing fails now, the user is still at the cap.
        if answer.as_deref() == Some(FULL)
            && self.forget_dead_devices(&s.user).await.unwrap_or(0) > 0
        {
            answer = self.online_once(s, cap).await?;
        }
        if answer.as_deref() == Some(FULL) {
            return Err(ChatError::TooManyDevices(cap));
        }
        Ok(other_session(s, answer))
    }

    async fn offline(&self, s: &Session) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        self.offline
            .key(self.keys.presence(&s.user))
            .arg(&s.device)
            .arg(entry(s))
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn locate(&self, users: &[&str]) -> Result<Located, ChatError> {
        let mut pipe = redis::pipe();
        let settled = load(&mut pipe, SETTLED);
        pipe.cmd("EVALSHA")
            .arg(&settled)
            .arg(1)
            .arg(self.keys.presence_since())
            .arg(self.settle.as_millis() as u64);
        for u in users {
            pipe.hvals(self.keys.presence(u));
        }
        let mut c = self.conn.clone();
        let answers: Vec<Value> = pipe.query_async(&mut c).await.map_err(redis_err)?;
        let mut answers = answers.into_iter();
        let settled = answers
            .next()
            .map(i64::from_redis_value)
            .transpose()
            .map_err(|e| redis_err(e.into()))?
            == Some(1);
        let entries = answers
            .map(Vec::<String>::from_redis_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| redis_err(e.into()))?;
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
        if !settled {
            // Every gateway gets the deliveries: no need to know which live.
            return Ok(Located {
                gateways: own(wanted),
                settled,
            });
        }
        let names: Vec<&str> = wanted.keys().copied().collect();
        let alive: HashSet<String> = self
            .leases(&names)
            .await?
            .into_iter()
            .map(|l| l.gateway)
            .collect();
        wanted.retain(|g, _| alive.contains(*g));
        Ok(Located::settled(own(wanted)))
    }
}

fn own(wanted: HashMap<&str, Vec<&str>>) -> HashMap<String, Vec<String>> {
    wanted
        .into_iter()
        .map(|(g, users)| (g.to_owned(), users.into_iter().map(str::to_owned).collect()))
        .collect()
}
