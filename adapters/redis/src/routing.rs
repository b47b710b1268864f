//! Gateways' leases, the routing table and drain requests. Every few
//! seconds a gateway writes its lease (address and online count, with a
//! TTL) and, unless the operator owns the table, its own routing entry; the
//! route lookup hands out the least-loaded address; the operator replaces
//! the whole table at once and asks gateways to drain.

use std::collections::HashMap;
use std::time::Duration;

use parley_core::ChatError;
use redis::AsyncCommands;

use crate::{RedisState, redis_err};

/// Writes a gateway's lease and its routing entry (or removes the entry when
/// it drains), and drops entries nobody refreshed within the TTL. Time comes
/// from Redis, so gateways' clocks need not agree. When the operator owns
/// the routing table (ARGV[5] = 1), only the lease is written, and a
/// draining gateway takes its own entry out. The reply also carries the
/// operator's drain request for this gateway, if any, and its rebalancing
/// request, taken (deleted) so that it is acted on once.
pub(crate) const ANNOUNCE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local had = redis.call('EXISTS', KEYS[1])
local drain = redis.call('GET', KEYS[4])
local shed = redis.call('GET', KEYS[5])
if shed then redis.call('DEL', KEYS[5]) end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ttl)
redis.call('SET', KEYS[7], ARGV[6], 'PX', ttl)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  -- Published under another address too (the operator's): that goes.
  local via = redis.call('HGETALL', KEYS[6])
  for i = 1, #via, 2 do
    if via[i + 1] == ARGV[1] then
      redis.call('ZREM', KEYS[2], via[i])
      redis.call('HDEL', KEYS[6], via[i])
    end
  end
elseif ARGV[5] == '1' then
  -- The operator owns the routing table: only the lease is ours.
  return {had, drain, shed}
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
return {had, drain, shed}
";

/// The `ARGV[1]` least-loaded addresses, least loaded first, leaving out
/// those in `ARGV[2..]` (a client found them dead); counts the client about
/// to arrive on the first, so a burst of lookups between two refreshes
/// spreads out.
pub(crate) const ROUTE: &str = r"
local want = tonumber(ARGV[1])
local skip = {}
for i = 2, #ARGV do skip[ARGV[i]] = true end
local r = redis.call('ZRANGE', KEYS[1], 0, want + #ARGV - 2)
local out = {}
for _, a in ipairs(r) do
  if not skip[a] and #out < want then out[#out + 1] = a end
end
if #out > 0 then redis.call('ZINCRBY', KEYS[1], 1, out[1]) end
return out
";

/// How many addresses a route lookup answers: the first to try, and where
/// to go when it does not answer.
pub const ROUTE_CANDIDATES: usize = 3;

/// What a lease write learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// False when the lease had gone (first start, expiry, or a Redis that
    /// restarted and lost everything): presence must be written again.
    pub had_lease: bool,
    /// The operator asks this gateway to drain at this many clients per
    /// second.
    pub drain_rate: Option<u32>,
    /// The operator asks this gateway to hand this many clients on to
    /// others, at this many per second, and stay in service (rebalancing).
    pub shed: Option<(u64, u32)>,
}

/// One gateway's lease as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub gateway: String,
    pub address: String,
    pub connections: u64,
}

impl Lease {
    /// A lease's value, `<address>|<connections>`.
    fn parse(gateway: &str, value: &str) -> Option<Self> {
        let (address, n) = value.rsplit_once('|')?;
        Some(Self {
            gateway: gateway.to_owned(),
            address: address.to_owned(),
            connections: n.parse().unwrap_or(0),
        })
    }
}

impl RedisState {
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
        let (had, drain, shed): (i64, Option<String>, Option<String>) = self
            .announce
            .key(self.keys.lease(gateway))
            .key(self.keys.routes())
            .key(self.keys.routes_seen())
            .key(self.keys.drain(gateway))
            .key(self.keys.shed(gateway))
            .key(self.keys.routes_via())
            .key(self.keys.lease_since(gateway))
            .arg(address)
            .arg(connections)
            .arg(ttl.as_millis() as u64)
            .arg(if draining { "1" } else { "0" })
            .arg(if managed { "1" } else { "0" })
            .arg(self.lease_since)
            .invoke_async(&mut c)
            .await
            .map_err(redis_err)?;
        let shed = shed.and_then(|s| {
            let (count, rate) = s.split_once('|')?;
            Some((count.parse().ok()?, rate.parse().ok()?))
        });
        Ok(Announced {
            had_lease: had == 1,
            drain_rate: drain.and_then(|d| d.parse().ok()),
            shed,
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
        c.pset_ex::<_, _, ()>(self.keys.drain(gateway), rate, ttl.as_millis() as u64)
            .await
            .map_err(redis_err)
    }

    /// Asks `gateway` to hand `count` of its clients on to other gateways
    /// at `rate` per second and stay in service (rebalancing after a
    /// scale-up). The gateway takes the request with its next lease write;
    /// a newer request replaces one not yet taken; it lapses after `ttl`.
    pub async fn request_shed(
        &self,
        gateway: &str,
        count: u64,
        rate: u32,
        ttl: Duration,
    ) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.pset_ex::<_, _, ()>(
            self.keys.shed(gateway),
            format!("{count}|{rate}"),
            ttl.as_millis() as u64,
        )
        .await
        .map_err(redis_err)
    }

    /// Removes this gateway's lease and routing entry (a clean shutdown).
    pub async fn withdraw(&self, gateway: &str, address: &str) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        let via: HashMap<String, String> =
            c.hgetall(self.keys.routes_via()).await.map_err(redis_err)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.keys.lease(gateway))
            .del(self.keys.lease_since(gateway))
            .zrem(self.keys.routes(), address)
            .hdel(self.keys.routes_seen(), address);
        for (public, own) in &via {
            if own == address {
                pipe.zrem(self.keys.routes(), public)
                    .hdel(self.keys.routes_via(), public);
            }
        }
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// The gateway's own address behind a published one, if the operator
    /// published it.
    pub async fn via(&self, public: &str) -> Result<Option<String>, ChatError> {
        let mut c = self.conn.clone();
        c.hget(self.keys.routes_via(), public)
            .await
            .map_err(redis_err)
    }

    /// Replaces the whole routing table with `entries` (address,
    /// connections), atomically: the operator's write, once it owns the
    /// table. Route lookups never see it half written.
    /// `via` maps each published address to the gateway's own, so that a
    /// gateway can find its entry (to leave the table when it drains) and a
    /// probe can reach it from inside.
    pub async fn replace_routes(
        &self,
        entries: &[(String, u64)],
        via: &[(String, String)],
    ) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.keys.routes())
            .del(self.keys.routes_seen())
            .del(self.keys.routes_via());
        if !via.is_empty() {
            pipe.hset_multiple(self.keys.routes_via(), via);
        }
        if !entries.is_empty() {
            let members: Vec<(u64, &str)> = entries.iter().map(|(a, n)| (*n, a.as_str())).collect();
            pipe.zadd_multiple(self.keys.routes(), &members);
        }
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// Up to [`ROUTE_CANDIDATES`] addresses, least loaded first, none of
    /// `skip`; the caller is counted on the first.
    pub async fn route(&self, skip: &[String]) -> Result<Vec<String>, ChatError> {
        let mut c = self.conn.clone();
        let mut call = self.route.key(self.keys.routes());
        call.arg(ROUTE_CANDIDATES);
        for a in skip {
            call.arg(a);
        }
        call.invoke_async(&mut c).await.map_err(redis_err)
    }

    /// Whether `address` is in the routing table.
    pub async fn routed(&self, address: &str) -> Result<bool, ChatError> {
        let mut c = self.conn.clone();
        let score: Option<f64> = c
            .zscore(self.keys.routes(), address)
            .await
            .map_err(redis_err)?;
        Ok(score.is_some())
    }

    /// Takes `address` out of the routing table: its gateway failed a probe
    /// (killed, frozen). The gateway's next lease write puts it back if it
    /// lives; until then no lookup hands it out.
    pub async fn unroute(&self, address: &str) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .zrem(self.keys.routes(), address)
            .hdel(self.keys.routes_seen(), address)
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// The routing table, lowest score first.
    pub async fn routes(&self) -> Result<Vec<(String, f64)>, ChatError> {
        let mut c = self.conn.clone();
        c.zrange_withscores(self.keys.routes(), 0, -1)
            .await
            .map_err(redis_err)
    }

    /// The leases of `gateways` that are alive.
    pub async fn leases(&self, gateways: &[&str]) -> Result<Vec<Lease>, ChatError> {
        if gateways.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = gateways.iter().map(|g| self.keys.lease(g)).collect();
        let mut c = self.conn.clone();
        let values: Vec<Option<String>> = c.mget(keys).await.map_err(redis_err)?;
        Ok(gateways
            .iter()
            .zip(values)
            .filter_map(|(g, v)| Lease::parse(g, &v?))
            .collect())
    }
}
