//! Push notifications on the one-process default, through the webhook
//! provider to a receiver that checks every signature: who is woken, what
//! the notification says, and what the sender does with the receiver's
//! answers.

use parley_push::testing::{SECRET, WebhookReceiver};
use parley_push::webhook::{WebhookConfig, WebhookNotification};

use super::*;

/// A world whose push webhook is `receiver`, with quick retries.
async fn pushing(receiver: &WebhookReceiver) -> World {
    let url = receiver.url.clone();
    World::with(move |cfg| {
        cfg.push.webhook = Some(WebhookConfig {
            url,
            secret: SECRET.into(),
            timeout: Duration::from_secs(5),
        });
        cfg.push_tries.first_backoff = Duration::from_millis(50);
        cfg.push_tries.max_backoff = Duration::from_millis(200);
    })
    .await
}

/// Registers a WEBHOOK token for `device` of the token's user, then
/// leaves: the user has no device online.
async fn register(w: &World, token: &str, device: &str, push_token: &str) {
    let (c, _events) = w.connect(token, device).await;
    c.register_push(pb::PushProvider::Webhook, push_token, "chat.app", "de")
        .await
        .unwrap();
    let user = c.user_id().to_owned();
    c.close().await;
    gone(w, &user).await;
}

/// Waits until no device of `user` is online.
async fn gone(w: &World, user: &str) {
    use parley_core::Presence as _;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !w
        .server
        .presence
        .locate(&[user])
        .await
        .unwrap()
        .gateways
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user} still online"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The user's conversations, as `ListConversations` answers.
async fn conversations(c: &Client) -> Vec<pb::Conversation> {
    match c
        .request(Req::ListConversations(pb::ListConversations::default()))
        .await
    {
        Ok(Resp::Conversations(list)) => list.conversations,
        other => panic!("{other:?}"),
    }
}

/// Waits until nothing more arrives for a moment, then answers what did.
async fn settled(receiver: &WebhookReceiver, at_least: usize) -> Vec<WebhookNotification> {
    let got = receiver.wait_for(at_least, WAIT).await;
    assert!(
        got.len() >= at_least,
        "only {} of {at_least} pushes",
        got.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver.accepted().into_iter().map(|(_, n)| n).collect()
}

#[tokio::test]
async fn an_offline_user_is_woken_once_per_message_and_device() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mut w = pushing(&receiver).await;
    let ann = w.user("ann").await;
    w.admin.create_user("bob", "Bob B.").await.unwrap();
    let bob = w.admin.token("bob", 3600).await.unwrap().token;
    register(&w, &bob, "phone", "bob-phone-token").await;
    register(&w, &bob, "tablet", "bob-tablet-token").await;

    let (a, _a_events) = w.connect(&ann, "laptop").await;
    let direct = a.open_direct("bob").await.unwrap();
    for i in 0..3 {
        a.send(direct.id, pb::Content::text(format!("hello {i}")))
            .await
            .unwrap();
    }
    let got = settled(&receiver, 6).await;
    assert_eq!(got.len(), 6, "3 messages × 2 devices, each once: {got:#?}");
    let mut woken: Vec<(String, String)> = got
        .iter()
        .map(|n| (n.device.clone(), n.body.clone()))
        .collect();
    woken.sort();
    assert_eq!(
        woken,
        [
            ("phone", "hello 0"),
            ("phone", "hello 1"),
            ("phone", "hello 2"),
            ("tablet", "hello 0"),
            ("tablet", "hello 1"),
            ("tablet", "hello 2"),
        ]
        .map(|(d, b)| (d.to_owned(), b.to_owned()))
    );
    let n = got.iter().find(|n| n.device == "phone").unwrap();
    assert_eq!(n.user, "bob");
    assert_eq!(n.token, "bob-phone-token");
    assert_eq!((n.topic.as_str(), n.locale.as_str()), ("chat.app", "de"));
    assert_eq!(n.sender.as_deref(), Some("ann"));
    assert_eq!(n.title.as_deref(), Some("ann"), "ann has no display name");
    assert_eq!(n.conversation_id, direct.id);
    assert_eq!(n.collapse_key, format!("c{}", direct.id));
    assert_eq!(n.loc_key, "PARLEY_NEW_MESSAGE");
    let badges: Vec<u64> = got
        .iter()
        .filter(|n| n.device == "phone")
        .map(|n| n.badge)
        .collect();
    assert!(
        badges.iter().all(|b| (1..=3).contains(b)),
        "the badge counts the unread: {badges:?}"
    );
    let ids: std::collections::HashSet<&str> = got.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "every notification has its own id");
    assert_eq!(receiver.requests().1, 0, "every request was signed");

    // bob online on any device: nobody is woken.
    let (_b, mut b_events) = w.connect(&bob, "desk").await;
    a.send(direct.id, pb::Content::text("are you there"))
        .await
        .unwrap();
    assert_eq!(text_of(&next_text(&mut b_events).await), "are you there");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.accepted().len(), 6, "an online user gets no push");
}

#[tokio::test]
async fn mutes_and_previews_are_the_users_choice() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mut w = pushing(&receiver).await;
    let ann = w.user("ann").await;
    let bob = w.user("bob").await;
    let cy = w.user("cy").await;
    register(&w, &bob, "phone", "bob-token").await;
    register(&w, &cy, "phone", "cy-token").await;
    let (a, _a_events) = w.connect(&ann, "laptop").await;
    let group = a.create_group("lunch", &["bob", "cy"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        receiver.accepted().is_empty(),
        "the group's creation is a system message: no push"
    );

    // bob mutes the group; cy turns previews off.
    let (b, _b_events) = w.connect(&bob, "desk").await;
    b.mute(group.id, i64::MAX).await.unwrap();
    let list = conversations(&b).await;
    assert_eq!(list[0].muted_until_ms, i64::MAX);
    b.close().await;
    gone(&w, "bob").await;
    let (c, _c_events) = w.connect(&cy, "desk").await;
    assert!(
        c.notification_previews(None).await.unwrap(),
        "on by default"
    );
    assert!(!c.notification_previews(Some(false)).await.unwrap());
    c.close().await;
    gone(&w, "cy").await;

    a.send(group.id, pb::Content::text("pizza at noon"))
        .await
        .unwrap();
    let got = settled(&receiver, 1).await;
    assert_eq!(got.len(), 1, "bob muted the group: {got:#?}");
    assert_eq!(got[0].user, "cy");
    assert_eq!(got[0].body, "New message", "cy's previews are off");
    assert_eq!(
        (got[0].title.as_ref(), got[0].sender.as_ref()),
        (None, None)
    );

    // bob unmutes: the next message wakes him, with the text.
    let (b, _b_events) = w.connect(&bob, "desk").await;
    b.mute(group.id, 0).await.unwrap();
    assert_eq!(conversations(&b).await[0].muted_until_ms, 0);
    b.close().await;
    gone(&w, "bob").await;
    a.send(group.id, pb::Content::text("or one")).await.unwrap();
    let got = settled(&receiver, 3).await;
    let bobs: Vec<&str> = got
        .iter()
        .filter(|n| n.user == "bob")
        .map(|n| n.body.as_str())
        .collect();
    assert_eq!(bobs, ["or one"]);

    // Muting a conversation one is not in is refused.
    let (c, _c_events) = w.connect(&cy, "desk").await;
    let direct = a.open_direct("bob").await.unwrap();
    let refused = c.mute(direct.id, i64::MAX).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotMember), "{refused}");
}

#[tokio::test]
async fn a_busy_receiver_is_tried_again_and_a_dead_token_is_dropped() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mut w = pushing(&receiver).await;
    let ann = w.user("ann").await;
    let bob = w.user("bob").await;
    register(&w, &bob, "phone", "bob-token").await;
    let (a, _a_events) = w.connect(&ann, "laptop").await;
    let direct = a.open_direct("bob").await.unwrap();

    // Two refusals (503, then 429), then the batch goes through: once.
    receiver.answer_next(&[503, 429]);
    a.send(direct.id, pb::Content::text("first")).await.unwrap();
    let got = settled(&receiver, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "first");
    assert_eq!(
        receiver.requests(),
        (3, 0),
        "two refused tries and one accepted"
    );

    // The receiver calls the token dead: it is dropped, and the next
    // message wakes nobody.
    receiver.call_dead("bob-token");
    a.send(direct.id, pb::Content::text("second"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while receiver.requests().0 < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request for the second message"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.send(direct.id, pb::Content::text("third")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().0, 4, "no token left to push to");
    let push = w.server.push.as_ref().unwrap();
    assert_eq!(push.metrics().tokens_dropped.get(), 1);

    // A 400-class answer is not tried again.
    register(&w, &bob, "phone", "bob-new-token").await;
    receiver.answer_next(&[400]);
    a.send(direct.id, pb::Content::text("fourth"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.requests().0, 5, "one refused try, not retried");
    assert_eq!(receiver.accepted().len(), 1);
}

#[tokio::test]
async fn registrations_are_checked_and_go_with_a_log_out() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let mut w = pushing(&receiver).await;
    let ann = w.user("ann").await;
    let bob = w.user("bob").await;
    // His tablet stays registered: the control that pushes do go out.
    register(&w, &bob, "tablet", "bob-tablet").await;
    let (b, _b_events) = w.connect(&bob, "phone").await;
    for (provider, token, topic) in [
        (pb::PushProvider::Unspecified, "t", ""),
        (pb::PushProvider::Webhook, "", ""),
        (pb::PushProvider::Webhook, "has space", ""),
        (pb::PushProvider::Apns, "abcd", ""),
        (pb::PushProvider::Apns, "not-hex", "chat.app"),
    ] {
        let e = b
            .register_push(provider, token, topic, "en")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{token:?}: {e}");
    }
    b.register_push(pb::PushProvider::Webhook, "bob-token", "", "en")
        .await
        .unwrap();
    b.log_out(None, false).await.unwrap();
    drop(b);
    gone(&w, "bob").await;
    let (a, _a_events) = w.connect(&ann, "laptop").await;
    let direct = a.open_direct("bob").await.unwrap();
    a.send(direct.id, pb::Content::text("anyone?"))
        .await
        .unwrap();
    let got = settled(&receiver, 1).await;
    let tokens: Vec<&str> = got.iter().map(|n| n.token.as_str()).collect();
    assert_eq!(tokens, ["bob-tablet"], "a logged-out device is not woken");
}
