//! Which devices a batch of offline messages wakes, and what each
//! notification says: a pure function of the events and what the store
//! answered for them, so every rule of `docs/protocol.md` ("Push
//! notifications") is tested here without a provider.

use std::collections::HashSet;
use std::sync::Arc;

use parley_core::push::{AudienceQuery, PushAudience};
use parley_proto::pb;

/// A message committed for a user with no device online.
#[derive(Debug, Clone)]
pub struct Offline {
    pub user: String,
    pub inbox_seq: u64,
    pub message: Arc<pb::Message>,
}

/// What the store is asked for these events.
pub fn query(events: &[Offline], now_ms: i64) -> AudienceQuery {
    let mut users: Vec<String> = events.iter().map(|e| e.user.clone()).collect();
    users.sort_unstable();
    users.dedup();
    let mut senders: Vec<String> = events.iter().map(|e| e.message.sender_id.clone()).collect();
    senders.sort_unstable();
    senders.dedup();
    let mut conversations: Vec<(String, u64)> = events
        .iter()
        .map(|e| (e.user.clone(), e.message.conversation_id))
        .collect();
    conversations.sort_unstable();
    conversations.dedup();
    AudienceQuery {
        users,
        senders,
        conversations,
        now_ms,
    }
}

/// The text a notification shows when the user turned previews off, and
/// the localization key an app may translate it with (argument: the
/// sender's name, when previews are on).
pub const GENERIC_BODY: &str = "New message";
pub const LOC_KEY: &str = "PARLEY_NEW_MESSAGE";

/// Longest body, in characters: a lock screen shows a few lines, and APNs
/// takes 4 KB for the whole payload.
pub const MAX_BODY_CHARS: usize = 180;

/// One notification for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The same for every try and every redelivery of this message to
    /// this device: the message id, user and device hashed to 32 hex
    /// digits ([`notification_id`]): the ledger's key, the webhook's `id`
    /// (a receiver drops a repeat by it), APNs' `apns-id` (for its logs;
    /// APNs does not drop repeats, its collapse id replaces one in place).
    pub id: String,
    pub user: String,
    pub device: String,
    pub provider: pb::PushProvider,
    pub token: String,
    pub topic: String,
    pub locale: String,
    pub conversation_id: u64,
    pub msg_id: u64,
    pub inbox_seq: u64,
    /// The sender's id, and the display name shown as the title: both
    /// None with previews off.
    pub sender: Option<String>,
    pub title: Option<String>,
    /// The preview, or [`GENERIC_BODY`].
    pub body: String,
    pub badge: u64,
    /// Notifications with the same key replace each other on the device.
    pub collapse_key: String,
}

/// Every device the events wake, in event order: one notification per
/// registered device of each recipient, except for conversations the
/// recipient muted and messages written by the server (membership
/// changes).
pub fn plan(events: &[Offline], audience: &PushAudience) -> Vec<Notification> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for e in events {
        let m = &e.message;
        if is_system(m)
            || audience
                .muted
                .contains(&(e.user.clone(), m.conversation_id))
        {
            continue;
        }
        let previews = !audience.no_previews.contains(&e.user);
        let badge = audience.unread.get(&e.user).copied().unwrap_or(0);
        for t in audience.tokens.iter().filter(|t| t.user == e.user) {
            let id = notification_id(m.msg_id, &t.user, &t.device);
            // A redelivered event inside one batch wakes a device once.
            if !seen.insert(id.clone()) {
                continue;
            }
            let (sender, title, body) = if previews {
                let name = audience
                    .names
                    .get(&m.sender_id)
                    .cloned()
                    .unwrap_or_else(|| m.sender_id.clone());
                (Some(m.sender_id.clone()), Some(name), preview(m))
            } else {
                (None, None, GENERIC_BODY.to_owned())
            };
            out.push(Notification {
                id,
                user: t.user.clone(),
                device: t.device.clone(),
                provider: t.provider,
                token: t.token.clone(),
                topic: t.topic.clone(),
                locale: t.locale.clone(),
                conversation_id: m.conversation_id,
                msg_id: m.msg_id,
                inbox_seq: e.inbox_seq,
                sender,
                title,
                body,
                badge,
                collapse_key: format!("c{}", m.conversation_id),
            });
        }
    }
    out
}

fn is_system(m: &pb::Message) -> bool {
    matches!(
        m.content.as_ref().and_then(|c| c.body.as_ref()),
        Some(pb::content::Body::System(_)) | None
    )
}

/// What a notification with previews on says of a message: its text, a
/// media message's caption or kind. A custom payload is the app's own
/// (it may be encrypted end to end): never shown.
pub fn preview(m: &pb::Message) -> String {
    use pb::content::Body;
    let text = match m.content.as_ref().and_then(|c| c.body.as_ref()) {
        Some(Body::Text(t)) => t.as_str(),
        Some(Body::Media(media)) if !media.caption.is_empty() => media.caption.as_str(),
        Some(Body::Media(media)) => match pb::MediaKind::try_from(media.kind) {
            Ok(pb::MediaKind::Image) => "Photo",
            Ok(pb::MediaKind::Voice) => "Voice message",
            Ok(pb::MediaKind::Video) => "Video",
            _ => "File",
        },
        Some(Body::Custom(_) | Body::System(_)) | None => GENERIC_BODY,
    };
    shorten(text, MAX_BODY_CHARS)
}

/// At most `max` characters, cut at a character boundary with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => {
            let cut = text[..end].trim_end();
            format!("{cut}…")
        }
    }
}

/// A notification's stable id: 32 hex digits of SHA-256 over the message
/// and the device.
pub fn notification_id(msg_id: u64, user: &str, device: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(msg_id.to_be_bytes());
    h.update(user.as_bytes());
    h.update([0]);
    h.update(device.as_bytes());
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use parley_core::push::PushTokenRecord;

    use super::*;

    fn message(
        msg_id: u64,
        conversation_id: u64,
        sender: &str,
        body: pb::content::Body,
    ) -> Arc<pb::Message> {
        Arc::new(pb::Message {
            msg_id,
            conversation_id,
            seq: msg_id,
            sender_id: sender.into(),
            content: Some(pb::Content { body: Some(body) }),
            ..Default::default()
        })
    }

    fn text(msg_id: u64, conversation_id: u64, body: &str) -> Arc<pb::Message> {
        message(
            msg_id,
            conversation_id,
            "ann",
            pb::content::Body::Text(body.into()),
        )
    }

    fn offline(user: &str, inbox_seq: u64, message: &Arc<pb::Message>) -> Offline {
        Offline {
            user: user.into(),
            inbox_seq,
            message: message.clone(),
        }
    }

    fn token(user: &str, device: &str, provider: pb::PushProvider) -> PushTokenRecord {
        PushTokenRecord {
            user: user.into(),
            device: device.into(),
            provider,
            token: format!("{user}-{device}"),
            topic: "app".into(),
            locale: "en".into(),
            updated_at_ms: 0,
        }
    }

    fn audience() -> PushAudience {
        PushAudience {
            tokens: vec![
                token("bob", "phone", pb::PushProvider::Apns),
                token("bob", "tablet", pb::PushProvider::Fcm),
                token("cy", "phone", pb::PushProvider::Webhook),
            ],
            names: HashMap::from([("ann".to_owned(), "Ann A.".to_owned())]),
            unread: HashMap::from([("bob".to_owned(), 4)]),
            ..PushAudience::default()
        }
    }

    #[test]
    fn every_device_of_each_recipient_is_woken_once_per_message() {
        let m1 = text(10, 1, "lunch?");
        let m2 = text(11, 2, "see you");
        let events = [
            offline("bob", 7, &m1),
            offline("cy", 3, &m2),
            offline("bob", 7, &m1),
            offline("dee", 1, &m1),
        ];
        let got = plan(&events, &audience());
        let woken: Vec<(&str, &str, u64)> = got
            .iter()
            .map(|n| (n.user.as_str(), n.device.as_str(), n.msg_id))
            .collect();
        assert_eq!(
            woken,
            [
                ("bob", "phone", 10),
                ("bob", "tablet", 10),
                ("cy", "phone", 11)
            ],
            "a repeated event wakes nobody twice; dee has no device registered"
        );
        let n = &got[0];
        assert_eq!(n.title.as_deref(), Some("Ann A."));
        assert_eq!(n.sender.as_deref(), Some("ann"));
        assert_eq!(n.body, "lunch?");
        assert_eq!(
            (n.badge, n.inbox_seq, n.collapse_key.as_str()),
            (4, 7, "c1")
        );
        assert_eq!(n.id, notification_id(10, "bob", "phone"));
        assert_ne!(got[0].id, got[1].id);
        assert_eq!(got[2].badge, 0, "no count known: no badge");
    }

    #[test]
    fn mutes_previews_and_system_messages() {
        let m = text(10, 1, "secret plans");
        let added = message(
            12,
            1,
            "ann",
            pb::content::Body::System(pb::SystemEvent::default()),
        );
        let mut a = audience();
        a.muted.insert(("cy".into(), 1));
        a.no_previews.insert("bob".into());
        let got = plan(
            &[
                offline("bob", 1, &m),
                offline("cy", 1, &m),
                offline("bob", 2, &added),
            ],
            &a,
        );
        assert_eq!(
            got.len(),
            2,
            "cy muted the conversation; system messages wake nobody"
        );
        for n in &got {
            assert_eq!(n.body, GENERIC_BODY);
            assert_eq!((n.title.as_ref(), n.sender.as_ref()), (None, None));
        }
    }

    #[test]
    fn previews_say_what_a_message_is_without_opening_it() {
        use pb::content::Body;
        let media = |kind: pb::MediaKind, caption: &str| {
            Body::Media(Box::new(pb::Media {
                kind: kind as i32,
                caption: caption.into(),
                ..Default::default()
            }))
        };
        let cases = [
            (media(pb::MediaKind::Image, ""), "Photo"),
            (media(pb::MediaKind::Voice, ""), "Voice message"),
            (media(pb::MediaKind::Video, ""), "Video"),
            (media(pb::MediaKind::File, ""), "File"),
            (media(pb::MediaKind::Image, "the view"), "the view"),
            (
                Body::Custom(pb::Custom {
                    r#type: "e2e".into(),
                    data: b"ciphertext".to_vec(),
                }),
                GENERIC_BODY,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(preview(&message(1, 1, "ann", body)), want);
        }
        let long = "é".repeat(MAX_BODY_CHARS + 5);
        let short = preview(&text(1, 1, &long));
        assert_eq!(short.chars().count(), MAX_BODY_CHARS + 1);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn the_query_asks_for_each_thing_once() {
        let m1 = text(10, 1, "a");
        let m2 = message(11, 2, "cy", pb::content::Body::Text("b".into()));
        let q = query(
            &[
                offline("bob", 1, &m1),
                offline("bob", 2, &m2),
                offline("bob", 1, &m1),
            ],
            9,
        );
        assert_eq!(q.users, ["bob"]);
        assert_eq!(q.senders, ["ann", "cy"]);
        assert_eq!(
            q.conversations,
            [("bob".to_owned(), 1), ("bob".to_owned(), 2)]
        );
        assert_eq!(q.now_ms, 9);
    }
}
