//! The providers against their stand-ins, and the sender over the
//! in-memory store and presence: what each service is sent, what each of
//! its answers leads to.

use std::sync::Arc;
use std::time::Duration;

use parley_core::push::PushTokenRecord;
use parley_core::store::NewMessage;
use parley_core::{MemoryPresence, MemoryStore, Presence, Session, Store};
use parley_proto::pb;

use crate::apns::Apns;
use crate::fcm::Fcm;
use crate::testing::{ApnsStandIn, FcmStandIn, SECRET, WebhookReceiver};
use crate::webhook::{Webhook, WebhookConfig};
use crate::*;

fn notification(token: &str, provider: pb::PushProvider, msg_id: u64) -> Notification {
    Notification {
        id: plan::notification_id(msg_id, "bob", token),
        user: "bob".into(),
        device: format!("dev-{token}"),
        provider,
        token: token.into(),
        topic: "chat.app".into(),
        locale: "en".into(),
        conversation_id: 7,
        msg_id,
        inbox_seq: msg_id,
        sender: Some("ann".into()),
        title: Some("Ann".into()),
        body: "hi".into(),
        badge: 2,
        collapse_key: "c7".into(),
    }
}

#[tokio::test]
async fn apns_is_sent_what_apple_asks_for_and_its_answers_are_heeded() {
    use pb::PushProvider::Apns as P;
    let apple = ApnsStandIn::start().await;
    let apns = Apns::new(&apple.config()).unwrap();
    apple.call_dead("dead0");
    let batch = [
        notification("ab01", P, 1),
        notification("dead0", P, 2),
        notification("cd02", P, 3),
    ];
    let got = apns.send(&batch).await;
    assert_eq!(got[0], Outcome::Sent);
    assert!(
        matches!(&got[1], Outcome::DeadToken { reason } if reason.contains("410")),
        "{got:?}"
    );
    assert_eq!(got[2], Outcome::Sent);
    let accepted = apple.accepted();
    assert_eq!(accepted.len(), 2);
    let first = accepted.iter().find(|r| r.token == "ab01").unwrap();
    assert_eq!(first.topic, "chat.app");
    assert_eq!(first.collapse_id, "c7");
    assert_eq!(first.apns_id, apns::apns_id(&batch[0].id));
    let aps = &first.payload["aps"];
    assert_eq!(
        (
            aps["alert"]["title"].as_str(),
            aps["alert"]["body"].as_str()
        ),
        (Some("Ann"), Some("hi"))
    );
    assert_eq!(
        (aps["badge"].as_u64(), aps["thread-id"].as_str()),
        (Some(2), Some("c7"))
    );
    assert_eq!(first.payload["parley"]["loc_key"], plan::LOC_KEY);
    assert_eq!(first.payload["parley"]["msg_id"], 1);
    assert_eq!(apple.requests(), (3, 0, 1), "one JWT for every request");

    // Busy and an expired JWT: both tried again; a bad topic is final.
    apple.answer_next(&[
        (503, "ServiceUnavailable"),
        (403, "ExpiredProviderToken"),
        (400, "BadTopic"),
    ]);
    let got = apns.send(&batch[..1]).await;
    assert!(matches!(got[0], Outcome::Retry { .. }), "{got:?}");
    let got = apns.send(&batch[..1]).await;
    assert!(matches!(got[0], Outcome::Retry { .. }), "{got:?}");
    let got = apns.send(&batch[..1]).await;
    assert!(
        matches!(&got[0], Outcome::Failed { reason } if reason.contains("BadTopic")),
        "{got:?}"
    );
    assert_eq!(apns.send(&batch[..1]).await, [Outcome::Sent]);
}

#[tokio::test]
async fn fcm_gets_a_token_once_and_again_when_it_is_refused() {
    use pb::PushProvider::Fcm as P;
    let google = FcmStandIn::start().await;
    let fcm = Fcm::new(&google.config()).unwrap();
    google.call_dead("gone");
    let batch = [notification("t1", P, 1), notification("gone", P, 2)];
    let got = fcm.send(&batch).await;
    assert_eq!(got[0], Outcome::Sent);
    assert!(
        matches!(&got[1], Outcome::DeadToken { reason } if reason.contains("UNREGISTERED")),
        "{got:?}"
    );
    let accepted = google.accepted();
    assert_eq!(accepted.len(), 1);
    let m = &accepted[0].message;
    assert_eq!(accepted[0].project, testing::FCM_PROJECT);
    assert_eq!(
        (
            m["notification"]["title"].as_str(),
            m["notification"]["body"].as_str()
        ),
        (Some("Ann"), Some("hi"))
    );
    assert_eq!(m["android"]["collapse_key"], "c7");
    assert_eq!(m["android"]["notification"]["notification_count"], 2);
    assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "c7");
    assert_eq!(m["data"]["msg_id"], "1");
    assert_eq!(m["data"]["sender"], "ann");
    assert_eq!(google.requests(), (2, 1), "one access token for both");

    // A revoked access token: a new one, and the send goes through.
    google.answer_next(&[(401, "")]);
    assert_eq!(fcm.send(&batch[..1]).await, [Outcome::Sent]);
    assert_eq!(google.requests().1, 2);
    // Busy: again later; a message FCM refuses: final.
    google.answer_next(&[
        (503, "UNAVAILABLE"),
        (429, "QUOTA_EXCEEDED"),
        (400, "INVALID_ARGUMENT"),
    ]);
    for _ in 0..2 {
        let got = fcm.send(&batch[..1]).await;
        assert!(matches!(got[0], Outcome::Retry { .. }), "{got:?}");
    }
    let got = fcm.send(&batch[..1]).await;
    assert!(
        matches!(got[0], Outcome::Failed { .. }),
        "an INVALID_ARGUMENT not about the token: {got:?}"
    );
}

#[tokio::test]
async fn fcm_refuses_credentials_that_are_not_a_service_account() {
    let google = FcmStandIn::start().await;
    let mut config = google.config();
    config.service_account = config
        .service_account
        .replace("service_account", "authorized_user");
    assert!(
        Fcm::new(&config)
            .unwrap_err()
            .contains("not a service account")
    );
    config.service_account = "{}".into();
    assert!(Fcm::new(&config).is_err());
}

/// A sender on the in-memory store with bob's devices registered, one
/// per provider, and a message from ann to bob.
struct World {
    store: Arc<MemoryStore>,
    presence: Arc<MemoryPresence>,
    apple: ApnsStandIn,
    google: FcmStandIn,
    hook: WebhookReceiver,
    sender: PushSender,
    direct: u64,
}

/// A ledger whose store is down.
struct Unreachable;

#[async_trait::async_trait]
impl parley_core::push::PushLedger for Unreachable {
    async fn unsent(&self, _: &[String]) -> Result<Vec<bool>, parley_core::ChatError> {
        Err(parley_core::ChatError::Unavailable("redis: refused".into()))
    }
    async fn sent(&self, _: &[String]) -> Result<(), parley_core::ChatError> {
        Err(parley_core::ChatError::Unavailable("redis: refused".into()))
    }
}

impl World {
    async fn new() -> Self {
        Self::with_ledger(Arc::new(MemoryLedger::default())).await
    }

    async fn with_ledger(ledger: Arc<dyn parley_core::push::PushLedger>) -> Self {
        let store = Arc::new(MemoryStore::new());
        store.create_user("ann", "Ann A.", 0).await.unwrap();
        store.create_user("bob", "", 0).await.unwrap();
        let direct = store.open_direct("ann", "bob", 0).await.unwrap().id;
        for (device, provider, token) in [
            ("iphone", pb::PushProvider::Apns, "aa11"),
            ("pixel", pb::PushProvider::Fcm, "fcm-1"),
            ("web", pb::PushProvider::Webhook, "hook-1"),
        ] {
            store
                .put_push_token(
                    &PushTokenRecord {
                        user: "bob".into(),
                        device: device.into(),
                        provider,
                        token: token.into(),
                        topic: "chat.app".into(),
                        locale: "en".into(),
                        updated_at_ms: 0,
                    },
                    i64::MAX,
                )
                .await
                .unwrap();
        }
        let (apple, google, hook) = (
            ApnsStandIn::start().await,
            FcmStandIn::start().await,
            WebhookReceiver::start(SECRET).await,
        );
        let providers: Vec<Arc<dyn Provider>> = vec![
            Arc::new(Apns::new(&apple.config()).unwrap()),
            Arc::new(Fcm::new(&google.config()).unwrap()),
            Arc::new(
                Webhook::new(&WebhookConfig {
                    url: hook.url.clone(),
                    secret: SECRET.into(),
                    timeout: Duration::from_secs(5),
                })
                .unwrap(),
            ),
        ];
        let presence = Arc::new(MemoryPresence::default());
        let sender = PushSender::new(
            store.clone(),
            presence.clone(),
            providers,
            ledger,
            PushConfig {
                attempts: 3,
                first_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(50),
            },
        );
        Self {
            store,
            presence,
            apple,
            google,
            hook,
            sender,
            direct,
        }
    }

    /// Ann's message `text` to bob, committed: bob's cue.
    async fn cue(&self, id: &str, text: &str) -> Offline {
        let appended = self
            .store
            .append(vec![NewMessage {
                conversation_id: self.direct,
                sender_id: "ann".into(),
                sender_device: "d".into(),
                client_msg_id: id.into(),
                content: pb::Content::text(text),
                now_ms: parley_core::now_ms(),
            }])
            .await
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let (_, inbox_seq) = appended
            .recipients
            .iter()
            .find(|(u, _)| u == "bob")
            .cloned()
            .unwrap();
        Offline {
            user: "bob".into(),
            inbox_seq,
            message: Arc::new(appended.message),
        }
    }

    /// What each service took: (APNs, FCM, webhook).
    fn taken(&self) -> (usize, usize, usize) {
        (
            self.apple.accepted().len(),
            self.google.accepted().len(),
            self.hook.accepted().len(),
        )
    }
}

#[tokio::test]
async fn each_device_is_woken_through_its_provider_once() {
    let w = World::new().await;
    let cues = vec![w.cue("m1", "lunch?").await, w.cue("m2", "at noon").await];
    let handled = w.sender.handle(cues.clone()).await.unwrap();
    assert_eq!((handled.sent, handled.failed.len()), (6, 0));
    assert_eq!(w.taken(), (2, 2, 2));
    let apns = w.apple.accepted();
    assert_eq!(apns[0].payload["aps"]["alert"]["title"], "Ann A.");
    assert_eq!(
        apns[1].payload["aps"]["badge"], 2,
        "two messages no device has seen"
    );

    // The same cues again (a redelivery): nothing is sent twice.
    let again = w.sender.handle(cues).await.unwrap();
    assert_eq!(again.sent, 0);
    assert_eq!(w.taken(), (2, 2, 2));
    assert_eq!(w.sender.metrics().repeats.get(), 6);

    // Bob came online meanwhile: his cue wakes nothing.
    w.presence
        .online(&Session::new("bob", "laptop", "g1", 1))
        .await
        .unwrap();
    let late = w.cue("m3", "hello?").await;
    let handled = w.sender.handle(vec![late]).await.unwrap();
    assert_eq!(handled.sent, 0);
    assert_eq!(w.sender.metrics().online.get(), 1);
}

#[tokio::test]
async fn failures_are_tried_again_dropped_or_handed_back() {
    let w = World::new().await;
    // APNs is busy twice, then takes it; FCM calls the token dead; the
    // webhook refuses for good.
    w.apple
        .answer_next(&[(503, "ServiceUnavailable"), (429, "TooManyRequests")]);
    w.google.call_dead("fcm-1");
    w.hook.answer_next(&[400]);
    let handled = w
        .sender
        .handle(vec![w.cue("m1", "hi").await])
        .await
        .unwrap();
    assert_eq!(handled.sent, 1, "APNs, on its third try");
    assert_eq!(handled.dead_tokens, 1);
    assert_eq!(handled.failed.len(), 1);
    assert_eq!(handled.failed[0].0.provider, pb::PushProvider::Webhook);
    assert_eq!(w.taken(), (1, 0, 0));
    assert_eq!(w.apple.requests().0, 3);
    let left = w
        .store
        .push_audience(&parley_core::push::AudienceQuery {
            users: vec!["bob".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let tokens: Vec<&str> = left.tokens.iter().map(|t| t.token.as_str()).collect();
    assert_eq!(tokens, ["aa11", "hook-1"], "the dead FCM token is gone");

    // APNs down for every try: handed back after the last.
    w.apple.answer_next(&[
        (503, "ServiceUnavailable"),
        (503, "ServiceUnavailable"),
        (503, "ServiceUnavailable"),
    ]);
    let handled = w
        .sender
        .handle(vec![w.cue("m2", "hi").await])
        .await
        .unwrap();
    let apns_failed: Vec<&str> = handled
        .failed
        .iter()
        .filter(|(n, _)| n.provider == pb::PushProvider::Apns)
        .map(|(_, why)| why.as_str())
        .collect();
    assert_eq!(apns_failed.len(), 1, "{:?}", handled.failed);
    assert!(apns_failed[0].contains("503"), "{apns_failed:?}");
}

#[tokio::test]
async fn a_token_any_provider_calls_dead_is_dropped_and_the_next_message_skips_it() {
    let w = World::new().await;
    w.apple.call_dead("aa11");
    w.google.call_dead("fcm-1");
    w.hook.call_dead("hook-1");
    let handled = w
        .sender
        .handle(vec![w.cue("m1", "hi").await])
        .await
        .unwrap();
    assert_eq!((handled.sent, handled.dead_tokens), (0, 3));
    assert!(handled.failed.is_empty(), "{:?}", handled.failed);
    assert_eq!(w.sender.metrics().tokens_dropped.get(), 3);
    let left = w
        .store
        .push_audience(&parley_core::push::AudienceQuery {
            users: vec!["bob".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        left.tokens.is_empty(),
        "APNs 410, FCM UNREGISTERED, the webhook's word"
    );
    let requests = (
        w.apple.requests().0,
        w.google.requests().0,
        w.hook.requests().0,
    );
    let handled = w
        .sender
        .handle(vec![w.cue("m2", "hi").await])
        .await
        .unwrap();
    assert_eq!(handled.sent, 0);
    assert_eq!(
        (
            w.apple.requests().0,
            w.google.requests().0,
            w.hook.requests().0
        ),
        requests,
        "no token left: no request"
    );
}

#[tokio::test]
async fn a_ledger_that_cannot_be_read_stops_no_notification() {
    let w = World::with_ledger(Arc::new(Unreachable)).await;
    let handled = w
        .sender
        .handle(vec![w.cue("m1", "hi").await])
        .await
        .unwrap();
    assert_eq!(handled.sent, 3, "every device woken without the ledger");
    assert_eq!(w.taken(), (1, 1, 1));
    assert_eq!(w.sender.metrics().ledger_unread.get(), 1);
}

#[tokio::test]
async fn the_memory_ledger_forgets_after_its_time() {
    use parley_core::push::PushLedger as _;
    let ledger = MemoryLedger::new(Duration::from_millis(50));
    let ids = ["a".to_owned(), "b".to_owned()];
    ledger.sent(&ids[..1]).await.unwrap();
    assert_eq!(ledger.unsent(&ids).await.unwrap(), [false, true]);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        ledger.unsent(&ids).await.unwrap(),
        [true, true],
        "forgotten"
    );
    ledger.sent(&ids[1..]).await.unwrap();
    assert_eq!(ledger.unsent(&ids).await.unwrap(), [true, false]);
}
