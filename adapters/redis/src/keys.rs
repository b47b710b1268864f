//! Every Redis key name of a Parley cluster, in one place: the chat
//! service, the gateways and the operator take them from here.
//!
//! Keys (`P` is the cluster's prefix, `--prefix` / `PARLEY_PREFIX`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:presence:<user>` | hash | device → `<gateway>|<epoch>`; expires unless refreshed |
//! | `P:presence-since` | string | when presence started over (ms, Redis's clock): set by the first lookup after Redis lost its data |
//! | `P:gw:<gateway>` | string | `<address>|<connections>`, a lease with a short TTL |
//! | `P:gw-since:<gateway>` | string | the gateway process's first connection epoch, written with the lease and with its TTL: presence entries under the gateway with a smaller epoch are a former process's |
//! | `P:drain:<gateway>` | string | the operator's drain request: clients per second; expires |
//! | `P:shed:<gateway>` | string | the operator's rebalancing request: `<clients>|<per second>`, taken once; expires |
//! | `P:routes` | sorted set | advertised address scored by connections |
//! | `P:routes:seen` | hash | address → when its entry was last written (ms) |
//! | `P:routes:via` | hash | public address → the gateway's own (advertised) address, when the operator publishes gateways |
//! | `P:rl:<window ms>:<index>:<key>` | string | a rate limit's count in one fixed window (`key` is e.g. `send:<user>`, `login-ip:<address>`); expires two windows on |
//! | `P:push-sent:<id>` | string | a push notification was sent (its id: message and device hashed); expires after a day |

/// The key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn of(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// A rate limit's counter for window `index` of `window_ms`.
    pub fn rate(&self, key: &str, window_ms: u64, index: u64) -> String {
        format!("{}:rl:{window_ms}:{index}:{key}", self.prefix)
    }

    /// A user's devices and the gateways holding them.
    pub fn presence(&self, user: &str) -> String {
        self.of("presence", user)
    }

    /// When presence started over (Redis's clock, ms): lookups within the
    /// settle time after it cannot trust a missing entry.
    pub fn presence_since(&self) -> String {
        format!("{}:presence-since", self.prefix)
    }

    /// A gateway's lease: its address and online count.
    pub fn lease(&self, gateway: &str) -> String {
        self.of("gw", gateway)
    }

    /// The first connection epoch of the process holding a gateway's lease.
    pub fn lease_since(&self, gateway: &str) -> String {
        self.of("gw-since", gateway)
    }

    /// A push notification that was sent, by its id.
    pub fn push_sent(&self, id: &str) -> String {
        self.of("push-sent", id)
    }

    /// The operator's request that a gateway drain.
    pub fn drain(&self, gateway: &str) -> String {
        self.of("drain", gateway)
    }

    /// The operator's request that a gateway hand some clients on.
    pub fn shed(&self, gateway: &str) -> String {
        self.of("shed", gateway)
    }

    /// The routing table: advertised addresses scored by connections.
    pub fn routes(&self) -> String {
        format!("{}:routes", self.prefix)
    }

    /// When each routing entry was last written.
    pub fn routes_seen(&self) -> String {
        format!("{}:routes:seen", self.prefix)
    }

    /// For published gateways: public address → the gateway's own.
    pub fn routes_via(&self) -> String {
        format!("{}:routes:via", self.prefix)
    }

    /// A SCAN pattern matching every key of the cluster.
    pub fn all(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn every_key_starts_with_the_prefix() {
        let k = Keys::new("im");
        for key in [
            k.presence("ann"),
            k.presence_since(),
            k.lease("gw-0"),
            k.drain("gw-0"),
            k.shed("gw-0"),
            k.routes(),
            k.routes_seen(),
            k.routes_via(),
        ] {
            assert!(key.starts_with("im:"), "{key}");
        }
        assert_eq!(k.lease("gw-0"), "im:gw:gw-0");
        assert_eq!(k.all(), "im:*");
    }
}
