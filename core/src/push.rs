//! Push notifications: what the chat rules keep for them. A device
//! registers the token its platform gave it (APNs, FCM, or the app's own
//! service behind a webhook); a user mutes conversations and chooses
//! whether notifications show previews. The sender (`parley-push`) reads
//! all of it for a batch of offline recipients at once
//! ([`Store::push_audience`](crate::Store::push_audience)); tokens a
//! provider calls dead are dropped, each only while it is still the token
//! that device holds.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use parley_proto::pb;

use crate::error::ChatError;

/// Longest token, topic and locale accepted (a token is in a unique
/// index: PostgreSQL's btree entries hold about 2.7 KB).
pub const MAX_TOKEN_BYTES: usize = 1024;
pub const MAX_TOPIC_BYTES: usize = 255;
pub const MAX_LOCALE_BYTES: usize = 35;

/// A device's push token, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTokenRecord {
    pub user: String,
    pub device: String,
    pub provider: pb::PushProvider,
    pub token: String,
    pub topic: String,
    pub locale: String,
    pub updated_at_ms: i64,
}

impl PushTokenRecord {
    /// A registration from `device` of `user`, checked.
    pub fn registered(
        user: &str,
        device: &str,
        r: pb::RegisterPush,
        now_ms: i64,
    ) -> Result<Self, ChatError> {
        let provider = match pb::PushProvider::try_from(r.provider) {
            Ok(pb::PushProvider::Unspecified) | Err(_) => {
                return Err(ChatError::invalid(format!(
                    "push provider {} is none of APNS (1), FCM (2) or WEBHOOK (3)",
                    r.provider
                )));
            }
            Ok(p) => p,
        };
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if r.token.is_empty() || r.token.len() > MAX_TOKEN_BYTES || !printable(&r.token) {
            return Err(ChatError::invalid(format!(
                "a push token is 1 to {MAX_TOKEN_BYTES} bytes of printable ASCII"
            )));
        }
        if r.topic.len() > MAX_TOPIC_BYTES || !printable(&r.topic) {
            return Err(ChatError::invalid(format!(
                "a push topic is at most {MAX_TOPIC_BYTES} bytes of printable ASCII"
            )));
        }
        let mut token = r.token;
        if provider == pb::PushProvider::Apns {
            if r.topic.is_empty() {
                return Err(ChatError::invalid(
                    "an APNs registration names the app's bundle id as its topic",
                ));
            }
            // Hex, in one case: the same device token never counts as two.
            let hex = token.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex || !token.len().is_multiple_of(2) || !(32..=200).contains(&token.len()) {
                return Err(ChatError::invalid(
                    "an APNs token is the device token in hex (32 to 200 digits)",
                ));
            }
            token.make_ascii_lowercase();
        }
        let locale_ok = r
            .locale
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if r.locale.len() > MAX_LOCALE_BYTES || !locale_ok {
            return Err(ChatError::invalid(format!(
                "a locale is a language tag of at most {MAX_LOCALE_BYTES} bytes (\"en\", \"pt-BR\")"
            )));
        }
        Ok(Self {
            user: user.to_owned(),
            device: device.to_owned(),
            provider,
            token,
            topic: r.topic,
            locale: r.locale,
            updated_at_ms: now_ms,
        })
    }

    /// From the SQL stores' row: (user, device, provider, token, topic,
    /// locale, updated_at).
    pub fn from_row(
        (user, device, provider, token, topic, locale, updated_at_ms): (
            String,
            String,
            i64,
            String,
            String,
            String,
            i64,
        ),
    ) -> Result<Self, ChatError> {
        let provider = i32::try_from(provider)
            .ok()
            .and_then(|p| pb::PushProvider::try_from(p).ok())
            .filter(|p| *p != pb::PushProvider::Unspecified)
            .ok_or_else(|| ChatError::Corrupt(format!("push provider {provider}")))?;
        Ok(Self {
            user,
            device,
            provider,
            token,
            topic,
            locale,
            updated_at_ms,
        })
    }
}

/// A token a provider refused for good: dropped only while the device
/// still holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeadToken {
    pub provider: pb::PushProvider,
    pub token: String,
}

/// What the push sender asks of the store for one batch.
#[derive(Debug, Clone, Default)]
pub struct AudienceQuery {
    /// Recipients, sorted and unique.
    pub users: Vec<String>,
    /// Senders whose display names the notifications show.
    pub senders: Vec<String>,
    /// (recipient, conversation) pairs whose mutes matter.
    pub conversations: Vec<(String, u64)>,
    /// Mutes ending at or before this time are over.
    pub now_ms: i64,
}

/// What the store answers: everything a batch of notifications needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushAudience {
    /// The recipients' registered devices.
    pub tokens: Vec<PushTokenRecord>,
    /// Recipients who turned previews off.
    pub no_previews: HashSet<String>,
    /// The pairs of the query muted at its time.
    pub muted: HashSet<(String, u64)>,
    /// Per recipient, the unread messages of every conversation not muted
    /// at the query's time (the conversation list's `total_unread`): what
    /// the badge counts.
    pub unread: HashMap<String, u64>,
    /// Display names of the senders that have one.
    pub names: HashMap<String, String>,
}

/// Remembers which notifications were sent, so that a cue delivered
/// twice (a redelivery after a sender restarted) wakes nobody twice. In
/// one process a map does (`parley-push`); in a cluster Redis does
/// (`parley-redis`), for every sender replica.
#[async_trait]
pub trait PushLedger: Send + Sync + 'static {
    /// Of `ids`, which were not sent yet (one answer each, in order).
    async fn unsent(&self, ids: &[String]) -> Result<Vec<bool>, ChatError>;
    /// Records `ids` as sent.
    async fn sent(&self, ids: &[String]) -> Result<(), ChatError>;
}

/// How long a ledger remembers a notification: longer than any
/// redelivery takes (a cue is handled within minutes or dead-lettered).
pub const LEDGER_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A mute's end as stored: 0 for anything past (unmuted).
pub fn mute_until(muted_until_ms: i64, now_ms: i64) -> i64 {
    if muted_until_ms <= now_ms {
        0
    } else {
        muted_until_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(provider: pb::PushProvider, token: &str, topic: &str, locale: &str) -> pb::RegisterPush {
        pb::RegisterPush {
            provider: provider as i32,
            token: token.into(),
            topic: topic.into(),
            locale: locale.into(),
        }
    }

    #[test]
    fn registrations_are_checked() {
        use pb::PushProvider::*;
        let ok = PushTokenRecord::registered("ann", "phone", reg(Fcm, "tok:1", "", "pt-BR"), 5);
        assert_eq!(ok.unwrap().provider, Fcm);
        let apns = reg(Apns, &"AB".repeat(32), "app", "en");
        let apns = PushTokenRecord::registered("ann", "phone", apns, 5).unwrap();
        assert_eq!(apns.token, "ab".repeat(32), "one case");
        for (bad, why) in [
            (reg(Unspecified, "t", "", ""), "provider"),
            (reg(Fcm, "", "", ""), "token"),
            (reg(Fcm, "a b", "", ""), "token"),
            (reg(Fcm, &"x".repeat(MAX_TOKEN_BYTES + 1), "", ""), "token"),
            (reg(Apns, "ab01", "", ""), "bundle id"),
            (reg(Apns, "ab01", "app", ""), "hex"),
            (
                reg(Apns, &format!("{}/x", "a".repeat(64)), "app", ""),
                "hex",
            ),
            (reg(Webhook, "t", "x\ny", ""), "topic"),
            (reg(Webhook, "t", "", "en;DROP"), "locale"),
        ] {
            let e = PushTokenRecord::registered("ann", "phone", bad, 5).unwrap_err();
            assert!(
                matches!(&e, ChatError::InvalidArgument(m) if m.contains(why)),
                "{e}"
            );
        }
        let unknown = pb::RegisterPush {
            provider: 9,
            ..reg(Fcm, "t", "", "")
        };
        assert!(PushTokenRecord::registered("ann", "phone", unknown, 5).is_err());
    }
}
