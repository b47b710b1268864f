//! Presence: which gateway holds each device of a user. The embedded default
//! keeps it in memory; the cluster keeps it in Redis (`parley-redis`)
//! behind the same trait.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::ChatError;

/// One device's live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub device: String,
    pub gateway: String,
    /// Grows with every connection of the device; a stale entry (the device
    /// has since reconnected elsewhere) carries a smaller epoch.
    pub epoch: u64,
}

impl Session {
    pub fn new(user: &str, device: &str, gateway: &str, epoch: u64) -> Self {
        Self {
            user: user.to_owned(),
            device: device.to_owned(),
            gateway: gateway.to_owned(),
            epoch,
        }
    }
}

/// Where some users are connected, as one lookup found them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Located {
    /// For each gateway, the users asked about with a device on it.
    pub gateways: HashMap<String, Vec<String>>,
    /// Whether a user missing from `gateways` is known to be offline. False
    /// while presence may lack entries: its store restarted empty and the
    /// gateways are still writing their sessions back. Deliveries then go
    /// to every gateway rather than wait for a later sync.
    pub settled: bool,
}

impl Located {
    /// A complete answer.
    pub fn settled(gateways: HashMap<String, Vec<String>>) -> Self {
        Self {
            gateways,
            settled: true,
        }
    }

    /// Nothing known: presence is unreachable.
    pub fn unknown() -> Self {
        Self::default()
    }
}

/// Where users are connected.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records `session` unless a newer connection of the device (a larger
    /// epoch) is recorded. Returns the device's other session it met: the
    /// one it replaced (a smaller epoch: that gateway must close it), or the
    /// newer one that kept it out (nothing written); None when there was
    /// none, or it was this very session.
    async fn online(&self, session: &Session) -> Result<Option<Session>, ChatError> {
        self.online_within(session, None).await
    }
    /// As [`online`](Self::online), but a device that is not online yet is
    /// refused with [`ChatError::TooManyDevices`] when its user has `cap`
    /// devices online already (on gateways that are alive).
    async fn online_within(
        &self,
        session: &Session,
        cap: Option<u32>,
    ) -> Result<Option<Session>, ChatError>;
    /// Removes the session if it is still the device's newest.
    async fn offline(&self, session: &Session) -> Result<(), ChatError>;
    /// For each gateway, the users among `users` with a device on it, and
    /// whether that answer is complete.
    async fn locate(&self, users: &[&str]) -> Result<Located, ChatError>;
}

/// A user's devices: device -> (gateway, epoch).
type Devices = HashMap<String, (String, u64)>;

/// Presence for one process.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    sessions: Mutex<HashMap<String, Devices>>,
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn online_within(
        &self,
        s: &Session,
        cap: Option<u32>,
    ) -> Result<Option<Session>, ChatError> {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let devices = map.entry(s.user.clone()).or_default();
        if let Some(cap) = cap
            && !devices.contains_key(&s.device)
            && devices.len() >= cap as usize
        {
            return Err(ChatError::TooManyDevices(cap));
        }
        let other = devices
            .get(&s.device)
            .filter(|(gateway, epoch)| !(*gateway == s.gateway && *epoch == s.epoch))
            .map(|(gateway, epoch)| Session::new(&s.user, &s.device, gateway, *epoch));
        if other.as_ref().is_none_or(|o| o.epoch <= s.epoch) {
            devices.insert(s.device.clone(), (s.gateway.clone(), s.epoch));
        }
        Ok(other)
    }

    async fn offline(&self, s: &Session) -> Result<(), ChatError> {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(devices) = map.get_mut(&s.user) {
            if devices
                .get(&s.device)
                .is_some_and(|(_, epoch)| *epoch == s.epoch)
            {
                devices.remove(&s.device);
            }
            if devices.is_empty() {
                map.remove(&s.user);
            }
        }
        Ok(())
    }

    async fn locate(&self, users: &[&str]) -> Result<Located, ChatError> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for user in users {
            let Some(devices) = map.get(*user) else {
                continue;
            };
            for (g, _) in devices.values() {
                // A gateway's key is made once per call, not per user.
                let list = match out.get_mut(g.as_str()) {
                    Some(list) => list,
                    None => out.entry(g.clone()).or_default(),
                };
                // Two devices of a user on one gateway list it once: its
                // entry is the last one there, users being taken in turn.
                if list.last().map(String::as_str) != Some(*user) {
                    list.push((*user).to_owned());
                }
            }
        }
        Ok(Located::settled(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(user: &str, device: &str, gateway: &str, epoch: u64) -> Session {
        Session::new(user, device, gateway, epoch)
    }

    #[tokio::test]
    async fn stale_sessions_are_fenced_by_epoch() {
        let p = MemoryPresence::default();
        assert_eq!(p.online(&s("a", "phone", "g1", 1)).await.unwrap(), None);
        assert_eq!(
            p.online(&s("a", "phone", "g2", 2)).await.unwrap(),
            Some(s("a", "phone", "g1", 1)),
            "the replaced session is named, for its gateway to close"
        );
        assert_eq!(p.online(&s("a", "phone", "g2", 2)).await.unwrap(), None);
        assert_eq!(
            p.online(&s("a", "phone", "g1", 1)).await.unwrap(),
            Some(s("a", "phone", "g2", 2)),
            "a late login with an older epoch is kept out and told by whom"
        );
        // The old connection's goodbye arrives late: it must not remove the new one.
        p.offline(&s("a", "phone", "g1", 1)).await.unwrap();
        let located = p.locate(&["a", "b"]).await.unwrap().gateways;
        assert_eq!(located.get("g2"), Some(&vec!["a".to_owned()]));
        assert!(!located.contains_key("g1"));
        p.offline(&s("a", "phone", "g2", 2)).await.unwrap();
        assert!(p.locate(&["a"]).await.unwrap().gateways.is_empty());
    }

    /// A user's devices online are capped; one already online logging in
    /// again (a reconnect, here or elsewhere) is not a new one; one going
    /// offline makes room.
    #[tokio::test]
    async fn devices_online_are_capped_per_user() {
        let p = MemoryPresence::default();
        for d in ["phone", "desk"] {
            p.online_within(&s("a", d, "g1", 1), Some(2)).await.unwrap();
        }
        let refused = p.online_within(&s("a", "tab", "g1", 2), Some(2)).await;
        assert!(
            matches!(refused, Err(ChatError::TooManyDevices(2))),
            "{refused:?}"
        );
        p.online_within(&s("b", "tab", "g1", 2), Some(2))
            .await
            .expect("another user is counted apart");
        p.online_within(&s("a", "phone", "g2", 3), Some(2))
            .await
            .expect("a device online logs in again");
        p.offline(&s("a", "desk", "g1", 1)).await.unwrap();
        p.online_within(&s("a", "tab", "g1", 4), Some(2))
            .await
            .expect("room once a device went");
        assert!(p.online(&s("a", "laptop", "g1", 5)).await.is_ok(), "no cap");
    }

    /// Each gateway lists each user with a device on it once, however many
    /// devices, in the order the users were asked for.
    #[tokio::test]
    async fn users_are_listed_once_per_gateway() {
        let p = MemoryPresence::default();
        for (user, device, gateway) in [
            ("a", "phone", "g1"),
            ("a", "desk", "g1"),
            ("a", "tab", "g2"),
            ("b", "phone", "g1"),
            ("c", "phone", "g2"),
            ("c", "desk", "g2"),
        ] {
            p.online(&s(user, device, gateway, 1)).await.unwrap();
        }
        let located = p.locate(&["a", "b", "c", "d"]).await.unwrap();
        assert!(located.settled, "presence in one process is never lost");
        let located = located.gateways;
        assert_eq!(located.len(), 2);
        assert_eq!(located["g1"], ["a", "b"]);
        assert_eq!(located["g2"], ["a", "c"]);
    }
}
