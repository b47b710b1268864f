//! The chat rules through `ChatService`, on the in-memory store, presence
//! and bus alone: acks after commit, fan-out to the gateways that hold the
//! recipients and push cues for those offline, dedup, catch-up with holes,
//! group permissions and cursors.

use std::sync::Arc;
use std::time::Duration;

use parley_proto::pb::{self, ErrorCode, client_frame::Body as Req, server_frame::Body as Resp};

use crate::bus::{ChatEvent, Dispatch, LocalBus};
use crate::presence::{MemoryPresence, Presence, Session};
use crate::store::{MemoryStore, Store};
use crate::{ChatConfig, ChatService, SendRequest, TokenKeys};

struct World {
    memory: Arc<MemoryStore>,
    store: Arc<dyn Store>,
    presence: Arc<MemoryPresence>,
    bus: Arc<LocalBus>,
    chat: Arc<ChatService>,
}

async fn world(config: ChatConfig) -> World {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn Store> = memory.clone();
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.unwrap();
    }
    let presence = Arc::new(MemoryPresence::default());
    let bus = Arc::new(LocalBus::default());
    let chat = ChatService::start(
        store.clone(),
        presence.clone(),
        bus.clone(),
        TokenKeys::new(&[7; 32]).unwrap(),
        config,
    );
    World {
        memory,
        store,
        presence,
        bus,
        chat,
    }
}

fn send(conversation_id: u64, client_msg_id: &str, text: &str) -> Req {
    Req::Send(pb::Send {
        client_msg_id: client_msg_id.into(),
        conversation_id,
        content: Some(pb::Content::text(text)),
    })
}

async fn ack_of(chat: &ChatService, user: &str, req: Req) -> pb::SendAck {
    match chat.call(user, "phone", req).await.unwrap() {
        Resp::SendAck(ack) => ack,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// The deliveries a gateway's queue handed over (a test that expects
/// messages, not signals).
fn messages(d: Option<Dispatch>) -> Vec<crate::bus::Delivery> {
    match d {
        Some(Dispatch::Messages(m)) => m,
        other => panic!("expected messages, got {other:?}"),
    }
}

#[tokio::test]
async fn a_committed_send_reaches_online_gateways_and_cues_a_push_for_the_offline() {
    let w = world(ChatConfig::default()).await;
    let mut gw1 = w.bus.subscribe("gw1", 16);
    let mut events = w.bus.events();
    let session = Session::new("bob", "phone", "gw1", 1);
    w.presence.online(&session).await.unwrap();
    let group = w
        .chat
        .create_group("alice", "g", vec!["bob".into(), "carol".into()])
        .await
        .unwrap();
    // The group's creation reaches bob's gateway and cues carol's push.
    let created = messages(gw1.recv().await);
    assert_eq!(created[0].message.seq, 1);

    let ack = ack_of(&w.chat, "alice", send(group.id, "m1", "hi")).await;
    assert_eq!((ack.seq, ack.duplicate), (2, false));
    let delivered = messages(gw1.recv().await);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].message.msg_id, ack.msg_id);
    assert_eq!(delivered[0].recipients, vec![("bob".to_owned(), 2)]);
    let mut cued = Vec::new();
    while let Ok(batch) = events.try_recv() {
        for ChatEvent::OfflineMessage { user, message, .. } in batch.iter() {
            cued.push((user.clone(), message.seq));
        }
    }
    assert_eq!(
        cued,
        vec![("carol".to_owned(), 1), ("carol".to_owned(), 2)],
        "the sender is never cued, the offline member for each message"
    );

    // A resend is acked as the original and delivered again (the replica
    // that committed it may have died before publishing).
    let again = ack_of(&w.chat, "alice", send(group.id, "m1", "hi")).await;
    assert_eq!(
        (again.msg_id, again.seq, again.duplicate),
        (ack.msg_id, 2, true)
    );
    assert_eq!(messages(gw1.recv().await)[0].message.msg_id, ack.msg_id);
    assert_eq!(w.chat.metrics().duplicates.get(), 1);
}

/// Presence whose lookups can be made unsettled or failing, as Redis's are
/// after it restarted empty or while it is down.
#[derive(Default)]
struct Flaky {
    inner: MemoryPresence,
    /// 0: answers as it is; 1: unsettled; 2: down.
    mode: std::sync::atomic::AtomicU8,
}

#[async_trait::async_trait]
impl Presence for Flaky {
    async fn online_within(
        &self,
        s: &Session,
        cap: Option<u32>,
    ) -> Result<Option<Session>, crate::ChatError> {
        self.inner.online_within(s, cap).await
    }
    async fn offline(&self, s: &Session) -> Result<(), crate::ChatError> {
        self.inner.offline(s).await
    }
    async fn locate(&self, users: &[&str]) -> Result<crate::Located, crate::ChatError> {
        let mut located = self.inner.locate(users).await?;
        match self.mode.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Ok(located),
            1 => {
                located.settled = false;
                Ok(located)
            }
            _ => Err(crate::ChatError::Unavailable("presence is down".into())),
        }
    }
}

/// While presence cannot say where recipients are, deliveries go to every
/// gateway in one publish instead of waiting for a later sync; push cues
/// still go out for whoever was not found.
#[tokio::test]
async fn deliveries_go_to_every_gateway_while_presence_is_unsettled_or_down() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.unwrap();
    }
    let presence = Arc::new(Flaky::default());
    let bus = Arc::new(LocalBus::default());
    let chat = ChatService::start(
        store,
        presence.clone(),
        bus.clone(),
        TokenKeys::new(&[7; 32]).unwrap(),
        ChatConfig::default(),
    );
    let mut gw1 = bus.subscribe("gw1", 16);
    let mut gw2 = bus.subscribe("gw2", 16);
    let mut events = bus.events();
    presence
        .online(&Session::new("bob", "phone", "gw1", 1))
        .await
        .unwrap();
    let group = chat
        .create_group("alice", "g", vec!["bob".into(), "carol".into()])
        .await
        .unwrap();
    assert_eq!(messages(gw1.recv().await)[0].message.seq, 1);
    assert!(gw2.try_recv().is_err(), "settled: only bob's gateway");
    while events.try_recv().is_ok() {}

    for (mode, name) in [(1, "unsettled"), (2, "down")] {
        presence
            .mode
            .store(mode, std::sync::atomic::Ordering::Relaxed);
        let ack = ack_of(&chat, "alice", send(group.id, name, name)).await;
        for gw in [&mut gw1, &mut gw2] {
            let got = messages(gw.recv().await);
            assert_eq!(got.len(), 1, "{name}");
            assert_eq!(got[0].message.msg_id, ack.msg_id, "{name}");
            assert_eq!(
                got[0].recipients,
                [
                    ("alice".to_owned(), ack.seq),
                    ("bob".to_owned(), ack.seq),
                    ("carol".to_owned(), ack.seq)
                ],
                "{name}: every recipient, each gateway keeps its own"
            );
        }
        let mut cued: Vec<String> = Vec::new();
        while let Ok(batch) = events.try_recv() {
            for ChatEvent::OfflineMessage { user, .. } in batch.iter() {
                cued.push(user.clone());
            }
        }
        let expected: &[&str] = if mode == 1 {
            &["carol"]
        } else {
            &["bob", "carol"]
        };
        assert_eq!(cued, expected, "{name}: cues for whoever was not found");
    }
    assert_eq!(chat.metrics().broadcasts.get(), 2);
}

#[tokio::test]
async fn refusals_carry_their_codes() {
    let w = world(ChatConfig::default()).await;
    let direct = match w
        .chat
        .call(
            "alice",
            "phone",
            Req::OpenDirect(pb::OpenDirect { peer: "bob".into() }),
        )
        .await
        .unwrap()
    {
        Resp::Conversation(c) => c,
        other => panic!("{other:?}"),
    };
    let code = |r: Result<Resp, crate::ChatError>| r.unwrap_err().code();
    assert_eq!(
        code(w.chat.call("carol", "d", send(direct.id, "x", "hi")).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(w.chat.call("alice", "d", send(direct.id, "", "hi")).await),
        ErrorCode::InvalidArgument,
        "a client id is required"
    );
    let system = Req::Send(pb::Send {
        client_msg_id: "s".into(),
        conversation_id: direct.id,
        content: Some(pb::Content {
            body: Some(pb::content::Body::System(pb::SystemEvent::default())),
        }),
    });
    assert_eq!(
        code(w.chat.call("alice", "d", system).await),
        ErrorCode::InvalidArgument,
        "system events are the server's"
    );
    w.chat
        .call(
            "bob",
            "d",
            Req::Block(pb::Block {
                user: "alice".into(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        code(w.chat.call("alice", "d", send(direct.id, "b", "hi")).await),
        ErrorCode::Blocked
    );

    let group = w
        .chat
        .create_group("alice", "g", vec!["bob".into()])
        .await
        .unwrap();
    let remove = |users: Vec<String>| {
        Req::RemoveMembers(pb::RemoveMembers {
            conversation_id: group.id,
            users,
        })
    };
    assert_eq!(
        code(w.chat.call("bob", "d", remove(vec!["alice".into()])).await),
        ErrorCode::Forbidden,
        "only the owner removes others"
    );
    assert_eq!(
        code(
            w.chat
                .call("carol", "d", remove(vec!["carol".into()]))
                .await
        ),
        ErrorCode::NotMember
    );
    let errors = w
        .chat
        .metrics()
        .errors
        .get_or_create(&crate::code_label(ErrorCode::NotMember));
    assert_eq!(errors.get(), 2, "refusals are counted by code");
}

#[tokio::test]
async fn catch_up_reports_what_retention_removed() {
    let w = world(ChatConfig::default()).await;
    let direct = w.store.open_direct("alice", "bob", 0).await.unwrap();
    for i in 0..5 {
        ack_of(&w.chat, "alice", send(direct.id, &format!("m{i}"), "hi")).await;
    }
    let page = w.chat.sync("bob", 0, 2).await.unwrap();
    assert_eq!(page.entries.len(), 2);
    assert_eq!((page.head, page.missing), (5, None));
    // Everything before now goes; the hole is reported, not hidden.
    w.store.prune_before(crate::now_ms() + 1).await.unwrap();
    let page = w.chat.sync("bob", 1, 100).await.unwrap();
    assert!(page.entries.is_empty());
    assert_eq!((page.head, page.missing), (5, Some((2, 5))));
    let (resume, head) = w
        .chat
        .session_opened("bob", "laptop", Some(99))
        .await
        .unwrap();
    assert_eq!((resume, head), (5, 5), "a cursor past the head is clamped");
}

/// Acked cursors wait in memory and are written together, not one
/// transaction per Ack; meanwhile a login in the same process resumes from
/// the pending one, and a cursor never moves backwards.
#[tokio::test]
async fn acked_cursors_are_coalesced_then_written_together() {
    let w = world(ChatConfig {
        cursor_flush: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let store = &w.store;
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    for id in ["1", "2", "3"] {
        ack_of(&w.chat, "bob", send(conv.id, id, "x")).await;
    }
    let chat = &w.chat;
    chat.ack("alice", "phone", 3).await.unwrap();
    chat.ack("alice", "phone", 2).await.unwrap();
    chat.ack("alice", "laptop", 1).await.unwrap();
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), None);
    let (resume, head) = chat.session_opened("alice", "phone", None).await.unwrap();
    assert_eq!((resume, head), (3, 3));
    chat.flush_cursors().await.unwrap();
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), Some(3));
    assert_eq!(store.get_cursor("alice", "laptop").await.unwrap(), Some(1));
    // Nothing pending: the next login reads the store.
    let (resume, _) = chat.session_opened("alice", "laptop", None).await.unwrap();
    assert_eq!(resume, 1);
}

#[tokio::test]
async fn tokens_authenticate_existing_users_only() {
    let w = world(ChatConfig::default()).await;
    let now = crate::now_ms() / 1000;
    let token = w.chat.tokens().issue("alice", now, 60).unwrap();
    assert_eq!(
        w.chat.authenticate(&token, "d").await.unwrap().user,
        "alice"
    );
    let ghost = w.chat.tokens().issue("ghost", now, 60).unwrap();
    assert_eq!(
        w.chat.authenticate(&ghost, "d").await.unwrap_err().code(),
        ErrorCode::Unauthenticated
    );
}

/// Log-outs revoke exactly the tokens issued until then: of one device, or
/// of every device (and the tokens naming none); a token for another
/// device is refused anyway, a token issued later works, and every gateway
/// hears of each log-out.
#[tokio::test]
async fn a_log_out_revokes_the_tokens_issued_until_then() {
    let w = world(ChatConfig::default()).await;
    let mut revocations = w.bus.revocations();
    let keys = w.chat.tokens().clone();
    let t0 = crate::now_ms() - 10_000;
    let token = |device: Option<&str>, at: i64| keys.issue_for("alice", device, at, 600).unwrap();
    let code = |r: Result<crate::Verified, crate::ChatError>| r.unwrap_err().code();
    let phone = token(Some("phone"), t0);
    let laptop = token(Some("laptop"), t0);
    let anywhere = token(None, t0);
    assert_eq!(
        code(w.chat.authenticate(&phone, "laptop").await),
        ErrorCode::Unauthenticated,
        "a device's token is for that device only"
    );
    assert_eq!(
        w.chat
            .authenticate(&phone, "phone")
            .await
            .unwrap()
            .issued_at_ms,
        t0
    );

    // The phone logs itself out, through the client protocol.
    let logout = Req::LogOut(pb::LogOut::default());
    assert!(matches!(
        w.chat.call("alice", "phone", logout).await.unwrap(),
        Resp::Done(_)
    ));
    let r = revocations.try_recv().unwrap();
    assert_eq!(
        (r.user.as_str(), r.device.as_deref()),
        ("alice", Some("phone"))
    );
    assert_eq!(
        code(w.chat.authenticate(&phone, "phone").await),
        ErrorCode::SessionRevoked
    );
    assert_eq!(
        code(w.chat.authenticate(&anywhere, "phone").await),
        ErrorCode::SessionRevoked,
        "a token for any device is refused on the logged-out one"
    );
    assert!(w.chat.authenticate(&laptop, "laptop").await.is_ok());
    assert!(w.chat.authenticate(&anywhere, "tablet").await.is_ok());
    let fresh = token(Some("phone"), r.at_ms + 1);
    assert!(
        w.chat.authenticate(&fresh, "phone").await.is_ok(),
        "a new login works"
    );

    // Every device, through the admin path (a few ms on: `fresh` was
    // issued a millisecond after the phone's log-out).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let all = w.chat.log_out("alice", None).await.unwrap();
    let r = revocations.try_recv().unwrap();
    assert_eq!((r.device, r.at_ms), (None, all));
    for (t, device) in [
        (&laptop, "laptop"),
        (&anywhere, "tablet"),
        (&fresh, "phone"),
    ] {
        assert_eq!(
            code(w.chat.authenticate(t, device).await),
            ErrorCode::SessionRevoked
        );
    }
    assert!(
        w.chat
            .authenticate(&token(None, all + 1), "tablet")
            .await
            .is_ok()
    );
    // bob is untouched; a log-out of nobody is NOT_FOUND.
    let bob = keys.issue_for("bob", None, t0, 600).unwrap();
    assert!(w.chat.authenticate(&bob, "phone").await.is_ok());
    assert_eq!(
        w.chat.log_out("ghost", None).await.unwrap_err().code(),
        ErrorCode::NotFound
    );

    // The device list: the phone (logged out by itself and then with all),
    // and the laptop, which acknowledged a delivery.
    w.chat.ack("alice", "laptop", 0).await.unwrap();
    w.chat.flush_cursors().await.unwrap();
    let Resp::Devices(list) = w
        .chat
        .call("alice", "laptop", Req::ListDevices(pb::ListDevices {}))
        .await
        .unwrap()
    else {
        panic!("expected the device list");
    };
    let ids: Vec<_> = list
        .devices
        .iter()
        .map(|d| (d.device_id.as_str(), d.current))
        .collect();
    assert_eq!(ids, [("laptop", true), ("phone", false)]);
    assert!(list.devices.iter().all(|d| d.logged_out_at_ms == all));
    assert!(list.devices[0].last_seen_ms > 0);
    assert_eq!(list.devices[1].last_seen_ms, 0, "never acknowledged");
}

/// Past the queue's bound a send is refused at once with UNAVAILABLE, while
/// the store is stalled: nothing piles up in memory and nobody waits behind
/// the overload. What was accepted commits once the store answers again.
#[tokio::test]
async fn past_the_queue_sends_are_refused_at_once() {
    let w = world(ChatConfig {
        max_queue: 3,
        ..Default::default()
    })
    .await;
    let direct = w.store.open_direct("alice", "bob", 0).await.unwrap();
    let sends = |ids: &[&str]| -> Vec<SendRequest> {
        ids.iter()
            .map(|id| SendRequest {
                user: "alice".into(),
                device: "phone".into(),
                send: pb::Send {
                    client_msg_id: (*id).into(),
                    conversation_id: direct.id,
                    content: Some(pb::Content::text("hi")),
                },
            })
            .collect()
    };
    let stall = w.memory.stall_appends().await;
    let chat = w.chat.clone();
    let first = sends(&["a", "b", "c"]);
    let accepted = tokio::spawn(async move { chat.send_many(first).await });
    // The group takes every place and waits in the stalled store.
    tokio::task::yield_now().await;
    for ids in [&["d"][..], &["e", "f", "g", "h"]] {
        // Refused at once: a send that waited would wait for the stall.
        let refused = tokio::time::timeout(Duration::from_secs(5), w.chat.send_many(sends(ids)))
            .await
            .expect("refused, not queued");
        for r in refused {
            assert_eq!(r.unwrap_err().code(), ErrorCode::Unavailable);
        }
    }
    assert!(!accepted.is_finished(), "acked only after the commit");
    drop(stall);
    let acks: Vec<u64> = accepted
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(acks, vec![1, 2, 3]);
    let again = w.chat.send_many(sends(&["d"])).await;
    assert_eq!(
        again[0].as_ref().unwrap().seq,
        4,
        "room again once committed"
    );
    let refusals = w
        .chat
        .metrics()
        .errors
        .get_or_create(&crate::code_label(ErrorCode::Unavailable));
    assert_eq!(refusals.get(), 5);
}

/// Sends that arrive apart go in one commit (one publish to the gateway)
/// when the batch may linger for them and sends come often enough, and
/// each alone when it may not; a lingering send is acked no later than the
/// linger after it arrived, and a send to an idle service does not linger.
#[tokio::test(start_paused = true)]
async fn a_lingering_batch_gathers_sends_that_arrive_apart() {
    let linger = Duration::from_millis(50);
    for lingers in [false, true] {
        let w = world(ChatConfig {
            batch_linger: if lingers { linger } else { Duration::ZERO },
            ..Default::default()
        })
        .await;
        let direct = w.store.open_direct("alice", "bob", 0).await.unwrap();
        w.presence
            .online(&Session::new("bob", "phone", "gw1", 1))
            .await
            .unwrap();
        let mut gw1 = w.bus.subscribe("gw1", 16);
        let publishes = |gw: &mut tokio::sync::mpsc::Receiver<Dispatch>| {
            std::iter::from_fn(|| gw.try_recv().ok())
                .map(|d| messages(Some(d)).len())
                .collect::<Vec<_>>()
        };
        // Idle: a lone send commits at once.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = tokio::time::Instant::now();
        ack_of(&w.chat, "alice", send(direct.id, "m0", "zero")).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "an idle send does not linger"
        );
        // Busy: a burst, then two sends 10 ms apart.
        let burst: Vec<SendRequest> = (1..=8)
            .map(|i| SendRequest {
                user: "alice".into(),
                device: "phone".into(),
                send: pb::Send {
                    client_msg_id: format!("b{i}"),
                    conversation_id: direct.id,
                    content: Some(pb::Content::text("burst")),
                },
            })
            .collect();
        assert!(w.chat.send_many(burst).await.iter().all(Result::is_ok));
        assert_eq!(publishes(&mut gw1), vec![1, 8]);
        let started = tokio::time::Instant::now();
        let chat = w.chat.clone();
        let first =
            tokio::spawn(async move { ack_of(&chat, "alice", send(direct.id, "m1", "one")).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = ack_of(&w.chat, "alice", send(direct.id, "m2", "two")).await;
        let first = first.await.unwrap();
        assert_eq!((first.seq, second.seq), (10, 11));
        if lingers {
            assert_eq!(publishes(&mut gw1), vec![2], "both sends in one commit");
            assert_eq!(
                started.elapsed(),
                linger,
                "committed when the first had waited the linger"
            );
        } else {
            assert_eq!(publishes(&mut gw1), vec![1, 1], "each send committed alone");
        }
    }
}

/// A session's refresh token is traded for the next pair and then works no
/// more: a copy that comes back within the grace period is honoured (its
/// answer may have been lost), one that comes back later logs the device
/// out. Log-outs and expiry end a session; anything else is refused
/// without side effects.
#[tokio::test]
async fn refresh_tokens_rotate_and_a_stolen_copy_logs_the_device_out() {
    let w = world(ChatConfig::default()).await;
    let code = |r: Result<pb::Tokens, crate::ChatError>| r.unwrap_err().code();
    let first = w
        .chat
        .create_session("alice", "phone", None, None)
        .await
        .unwrap();
    let v = w
        .chat
        .authenticate(&first.access_token, "phone")
        .await
        .unwrap();
    assert_eq!(v.device.as_deref(), Some("phone"));
    let lifetime = first.access_expires_at_ms - crate::now_ms();
    assert!(
        (14 * 60_000..=15 * 60_000).contains(&lifetime),
        "{lifetime}"
    );
    assert_eq!(
        code(w.chat.create_session("ghost", "phone", None, None).await),
        ErrorCode::NotFound
    );

    let second = w.chat.refresh(&first.refresh_token).await.unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert!(
        w.chat
            .authenticate(&second.access_token, "phone")
            .await
            .is_ok()
    );
    // The first token again, at once: its answer may have been lost.
    let third = w.chat.refresh(&first.refresh_token).await.unwrap();
    assert!(
        w.chat
            .authenticate(&third.access_token, "phone")
            .await
            .is_ok()
    );

    // Garbage, or a token naming someone else's device, changes nothing.
    assert_eq!(
        code(w.chat.refresh("pr1.zz").await),
        ErrorCode::Unauthenticated
    );
    let forged = crate::refresh::RefreshToken::new("alice", "phone").encode();
    assert_eq!(
        code(w.chat.refresh(&forged).await),
        ErrorCode::Unauthenticated
    );
    let fourth = w.chat.refresh(&third.refresh_token).await.unwrap();

    // A used-up token back after the grace period: two holders.
    let mut record = w
        .store
        .get_refresh("alice", "phone")
        .await
        .unwrap()
        .unwrap();
    record.rotated_at_ms -= crate::service::REFRESH_GRACE.as_millis() as i64 + 1_000;
    w.store.put_refresh(&record).await.unwrap();
    let mut revocations = w.bus.revocations();
    assert_eq!(
        code(w.chat.refresh(&third.refresh_token).await),
        ErrorCode::SessionRevoked
    );
    let r = revocations.try_recv().unwrap();
    assert_eq!(
        r.device.as_deref(),
        Some("phone"),
        "the device is logged out"
    );
    assert_eq!(
        code(w.chat.refresh(&fourth.refresh_token).await),
        ErrorCode::SessionRevoked
    );
    assert!(
        w.chat
            .authenticate(&fourth.access_token, "phone")
            .await
            .is_err()
    );

    // A new login; then a log-out of every device ends it too.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = w
        .chat
        .create_session("alice", "phone", None, None)
        .await
        .unwrap();
    let next = w.chat.refresh(&again.refresh_token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    w.chat.log_out("alice", None).await.unwrap();
    assert_eq!(
        code(w.chat.refresh(&next.refresh_token).await),
        ErrorCode::SessionRevoked
    );

    // An expired refresh token.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let short = w
        .chat
        .create_session("bob", "tab", None, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        code(w.chat.refresh(&short.refresh_token).await),
        ErrorCode::SessionRevoked
    );
}

/// The signals a gateway's queue handed over, as (users, frame body).
fn signals(d: Option<Dispatch>) -> Vec<(Vec<String>, Resp)> {
    match d {
        Some(Dispatch::Signals(s)) => s
            .into_iter()
            .map(|s| (s.users, s.frame.body.clone().expect("a body")))
            .collect(),
        other => panic!("expected signals, got {other:?}"),
    }
}

fn list(resp: Resp) -> pb::ConversationList {
    match resp {
        Resp::Conversations(l) => l,
        other => panic!("expected a list, got {other:?}"),
    }
}

/// A read marker moves forward only, its receipt reaches the reader's other
/// devices and the peer's (on the gateways holding them, and only there),
/// and the lists of both show it.
#[tokio::test]
async fn reading_moves_the_marker_and_tells_both_sides() {
    let w = world(ChatConfig::default()).await;
    let mut gw1 = w.bus.subscribe("gw1", 16);
    let mut gw2 = w.bus.subscribe("gw2", 16);
    for (user, gw) in [("alice", "gw1"), ("bob", "gw2")] {
        let session = Session::new(user, "phone", gw, 1);
        w.presence.online(&session).await.unwrap();
    }
    let direct = w.store.open_direct("alice", "bob", 0).await.unwrap();
    for i in 1..=3 {
        ack_of(&w.chat, "alice", send(direct.id, &format!("m{i}"), "hi")).await;
    }
    while gw1.try_recv().is_ok() || gw2.try_recv().is_ok() {}

    let read = |seq| {
        Req::MarkRead(pb::MarkRead {
            conversation_id: direct.id,
            seq,
        })
    };
    let Resp::ReadReceipt(r) = w.chat.call("bob", "phone", read(2)).await.unwrap() else {
        panic!("a receipt")
    };
    assert_eq!((r.user.as_str(), r.seq), ("bob", 2));
    let expect = |got: Vec<(Vec<String>, Resp)>, users: &[&str]| {
        assert_eq!(got.len(), 1);
        let (to, body) = &got[0];
        assert_eq!(
            to,
            &users.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>()
        );
        let Resp::ReadReceipt(r) = body else {
            panic!("a receipt, got {body:?}")
        };
        assert_eq!(
            (r.conversation_id, r.user.as_str(), r.seq),
            (direct.id, "bob", 2)
        );
    };
    expect(signals(gw1.recv().await), &["alice"]);
    expect(signals(gw2.recv().await), &["bob"]);

    // Behind the marker: answered with where it stands, told to nobody.
    let Resp::ReadReceipt(r) = w.chat.call("bob", "phone", read(1)).await.unwrap() else {
        panic!("a receipt")
    };
    assert_eq!(r.seq, 2);
    assert!(gw1.try_recv().is_err() && gw2.try_recv().is_err());
    assert_eq!(
        code(w.chat.call("carol", "d", read(1)).await),
        ErrorCode::NotMember
    );

    let mine = list(
        w.chat
            .call("alice", "phone", Req::ListConversations(Default::default()))
            .await
            .unwrap(),
    );
    let c = &mine.conversations[0];
    assert_eq!((c.read_seq, c.unread_count, c.peer_read_seq), (3, 0, 2));
    let theirs = list(
        w.chat
            .call("bob", "phone", Req::ListConversations(Default::default()))
            .await
            .unwrap(),
    );
    assert_eq!(
        (theirs.conversations[0].unread_count, theirs.total_unread),
        (1, 1)
    );

    // Receipts name the readers other than the sender.
    let receipts = |seq| {
        Req::Receipts(pb::ReceiptsRequest {
            conversation_id: direct.id,
            seq,
        })
    };
    let Resp::Receipts(r) = w.chat.call("alice", "phone", receipts(2)).await.unwrap() else {
        panic!("receipts")
    };
    assert_eq!(
        (r.read_count, r.others, r.readers),
        (1, 1, vec!["bob".to_owned()])
    );
    let Resp::Receipts(r) = w.chat.call("alice", "phone", receipts(3)).await.unwrap() else {
        panic!("receipts")
    };
    assert_eq!((r.read_count, r.others), (0, 1));
    assert_eq!(
        code(w.chat.call("alice", "phone", receipts(9)).await),
        ErrorCode::NotFound
    );
}

/// Past the receipt limit a group's members are not told of each other's
/// reads, and receipts carry a count without names.
#[tokio::test]
async fn a_large_group_counts_its_readers_without_naming_them() {
    let w = world(ChatConfig {
        receipt_group_limit: 2,
        ..ChatConfig::default()
    })
    .await;
    let mut gw1 = w.bus.subscribe("gw1", 16);
    for user in ["alice", "bob"] {
        let session = Session::new(user, "phone", "gw1", 1);
        w.presence.online(&session).await.unwrap();
    }
    let group = w
        .chat
        .create_group("alice", "g", vec!["bob".into(), "carol".into()])
        .await
        .unwrap();
    let ack = ack_of(&w.chat, "alice", send(group.id, "m1", "hi")).await;
    while gw1.try_recv().is_ok() {}
    w.chat
        .call(
            "bob",
            "phone",
            Req::MarkRead(pb::MarkRead {
                conversation_id: group.id,
                seq: ack.seq,
            }),
        )
        .await
        .unwrap();
    let got = signals(gw1.recv().await);
    assert_eq!(got[0].0, vec!["bob".to_owned()], "only bob's own devices");
    let req = Req::Receipts(pb::ReceiptsRequest {
        conversation_id: group.id,
        seq: ack.seq,
    });
    let Resp::Receipts(r) = w.chat.call("alice", "phone", req).await.unwrap() else {
        panic!("receipts")
    };
    assert_eq!((r.read_count, r.others, r.readers.len()), (1, 2, 0));
}

/// Pinned conversations come first, then the newest activity; pages follow
/// one another without a gap or a repeat; pins and mutes reach the user's
/// own devices; muted conversations stay out of the unread total.
#[tokio::test]
async fn the_list_is_ordered_paged_and_settings_follow_the_user() {
    let w = world(ChatConfig::default()).await;
    let mut gw1 = w.bus.subscribe("gw1", 16);
    w.presence
        .online(&Session::new("alice", "phone", "gw1", 1))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for peer in ["bob", "carol"] {
        let c = w.store.open_direct("alice", peer, 0).await.unwrap();
        ids.push(c.id);
    }
    let group = w
        .chat
        .create_group("bob", "g", vec!["alice".into()])
        .await
        .unwrap();
    ids.push(group.id);
    // Activity: carol's conversation last, then the group, then bob's.
    ack_of(&w.chat, "bob", send(ids[0], "b1", "hi")).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    ack_of(&w.chat, "bob", send(ids[2], "g1", "hi")).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    ack_of(&w.chat, "carol", send(ids[1], "c1", "hi")).await;
    while gw1.try_recv().is_ok() {}

    let page = |limit, page: &str| {
        Req::ListConversations(pb::ListConversations {
            limit,
            page: page.into(),
        })
    };
    let order = |l: &pb::ConversationList| l.conversations.iter().map(|c| c.id).collect::<Vec<_>>();
    let all = list(w.chat.call("alice", "phone", page(0, "")).await.unwrap());
    assert_eq!(order(&all), vec![ids[1], ids[2], ids[0]]);
    assert_eq!(all.total_unread, 4, "one each, and the group's creation");
    assert_eq!(all.next_page, "");
    let last = all.conversations[0].last_message.as_ref().expect("newest");
    assert_eq!(last.client_msg_id, "c1");

    let pin = Req::Pin(pb::PinConversation {
        conversation_id: ids[0],
        pinned: true,
    });
    w.chat.call("alice", "phone", pin).await.unwrap();
    let got = signals(gw1.recv().await);
    assert!(
        matches!(&got[0].1, Resp::ConversationSettings(s) if s.pinned && s.conversation_id == ids[0]),
        "{got:?}"
    );
    let mute = Req::Mute(pb::MuteConversation {
        conversation_id: ids[2],
        muted_until_ms: i64::MAX,
    });
    w.chat.call("alice", "phone", mute).await.unwrap();
    let got = signals(gw1.recv().await);
    assert!(
        matches!(&got[0].1, Resp::ConversationSettings(s) if s.muted_until_ms == i64::MAX && !s.pinned),
        "{got:?}"
    );

    let first = list(w.chat.call("alice", "phone", page(2, "")).await.unwrap());
    assert_eq!(order(&first), vec![ids[0], ids[1]], "the pinned one first");
    assert_eq!(first.total_unread, 2, "the muted group is left out");
    let rest = list(
        w.chat
            .call("alice", "phone", page(2, &first.next_page))
            .await
            .unwrap(),
    );
    assert_eq!(order(&rest), vec![ids[2]]);
    assert_eq!(rest.next_page, "");
    assert_eq!(
        code(w.chat.call("alice", "phone", page(2, "garbage")).await),
        ErrorCode::InvalidArgument
    );
}

fn code(r: Result<Resp, crate::ChatError>) -> ErrorCode {
    r.unwrap_err().code()
}

/// A recall or an edit reaches the online members' gateways like a
/// message, and wakes nobody offline.
#[tokio::test]
async fn a_revision_is_delivered_and_cues_no_push() {
    let w = world(ChatConfig::default()).await;
    let mut gw1 = w.bus.subscribe("gw1", 16);
    let mut events = w.bus.events();
    w.presence
        .online(&Session::new("bob", "phone", "gw1", 1))
        .await
        .unwrap();
    let group = w
        .chat
        .create_group("alice", "g", vec!["bob".into(), "carol".into()])
        .await
        .unwrap();
    let ack = ack_of(&w.chat, "alice", send(group.id, "m1", "hi")).await;
    while gw1.try_recv().is_ok() {}
    while events.try_recv().is_ok() {}
    let edit = Req::Edit(pb::Edit {
        conversation_id: group.id,
        seq: ack.seq,
        content: Some(pb::Content::text("hello")),
    });
    w.chat.call("alice", "phone", edit).await.unwrap();
    let got = messages(gw1.recv().await);
    assert_eq!(got[0].message.msg_id, ack.msg_id);
    assert_eq!(got[0].message.content, Some(pb::Content::text("hello")));
    assert!(events.try_recv().is_err(), "carol, offline, is not woken");
    let recall = Req::Recall(pb::Recall {
        conversation_id: group.id,
        seq: ack.seq,
    });
    assert_eq!(
        code(w.chat.call("bob", "phone", recall.clone()).await),
        ErrorCode::Forbidden
    );
    w.chat.call("alice", "phone", recall).await.unwrap();
    assert!(messages(gw1.recv().await)[0].message.recalled);
    assert!(events.try_recv().is_err());
}
