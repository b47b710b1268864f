//! Read markers on the one-process default, through the gateway and the
//! SDK: receipts reach the peer's devices and the reader's other devices as
//! they happen, and the conversation list tells a device that missed them.

use super::*;

/// The first event `pick` takes, skipping the others.
async fn next_of<T>(events: &mut Receiver<Event>, pick: impl Fn(Event) -> Option<T>) -> T {
    loop {
        let event = timeout(WAIT, events.recv())
            .await
            .expect("nothing of the kind in time")
            .expect("events closed");
        if let Some(got) = pick(event) {
            return got;
        }
    }
}

/// The next read receipt pushed to a device.
async fn next_read(events: &mut Receiver<Event>) -> pb::ReadReceipt {
    next_of(events, |e| match e {
        Event::Read(r) => Some(r),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn receipts_reach_the_peer_and_the_readers_other_devices() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, mut alice_ev) = w.connect(&ta, "phone").await;
    let (bob, mut bob_ev) = w.connect(&tb, "phone").await;
    let (_desk, mut desk_ev) = w.connect(&tb, "desk").await;

    let conv = alice.open_direct("bob").await.unwrap();
    for i in 1..=3 {
        alice
            .send(conv.id, pb::Content::text(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut newest = 0;
    while newest < 3 {
        newest = next_text(&mut bob_ev).await.seq;
    }
    let before = bob.conversations(0, "").await.unwrap();
    assert_eq!(
        (before.conversations[0].unread_count, before.total_unread),
        (3, 3)
    );

    assert_eq!(bob.mark_read(conv.id, 2).await.unwrap(), 2);
    for ev in [&mut alice_ev, &mut desk_ev] {
        let r = next_read(ev).await;
        assert_eq!(
            (r.conversation_id, r.user.as_str(), r.seq),
            (conv.id, "bob", 2)
        );
    }
    let after = bob.conversations(0, "").await.unwrap();
    assert_eq!(after.conversations[0].unread_count, 1);
    let listed = alice.conversations(0, "").await.unwrap();
    assert_eq!(listed.conversations[0].peer_read_seq, 2);
    let r = alice.receipts(conv.id, 2).await.unwrap();
    assert_eq!((r.read_count, r.readers), (1, vec!["bob".to_owned()]));

    // A reply reads everything before it, without a MarkRead.
    bob.send(conv.id, pb::Content::text("ok")).await.unwrap();
    assert_eq!(bob.conversations(0, "").await.unwrap().total_unread, 0);
    assert_eq!(
        alice.conversations(0, "").await.unwrap().conversations[0].unread_count,
        1,
        "alice has the reply to read"
    );
}

/// The next typing indicator pushed to a device.
async fn next_typing(events: &mut Receiver<Event>) -> pb::TypingIndicator {
    next_of(events, |e| match e {
        Event::Typing(t) => Some(t),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn typing_reaches_the_other_members_and_repeats_are_held_back() {
    let mut w = World::start().await;
    let (ta, tb, tc) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let (alice, mut alice_ev) = w.connect(&ta, "phone").await;
    let (_bob, mut bob_ev) = w.connect(&tb, "phone").await;
    let (carol, _carol_ev) = w.connect(&tc, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap();

    alice.typing(conv.id, true).await.unwrap();
    let t = next_typing(&mut bob_ev).await;
    assert_eq!(
        (t.conversation_id, t.user.as_str(), t.typing),
        (conv.id, "alice", true)
    );
    assert_eq!(t.expires_in_ms, 6_000);
    // Said again at once: answered, not passed on; the stop is.
    alice.typing(conv.id, true).await.unwrap();
    alice.typing(conv.id, false).await.unwrap();
    let t = next_typing(&mut bob_ev).await;
    assert!(!t.typing, "the repeat was held back: {t:?}");
    assert!(
        timeout(Duration::from_millis(300), next_typing(&mut alice_ev))
            .await
            .is_err(),
        "the typist is not told of itself"
    );
    let err = carol.typing(conv.id, true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
}

#[tokio::test]
async fn recalls_and_edits_reach_every_device_and_history() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _alice_ev) = w.connect(&ta, "phone").await;
    let (_laptop, mut laptop_ev) = w.connect(&ta, "laptop").await;
    let (bob, mut bob_ev) = w.connect(&tb, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap();
    let first = alice
        .send(conv.id, pb::Content::text("helo"))
        .await
        .unwrap();
    let second = alice
        .send(conv.id, pb::Content::text("oops"))
        .await
        .unwrap();
    for ev in [&mut bob_ev, &mut laptop_ev] {
        assert_eq!(next_text(ev).await.seq, first.seq);
        assert_eq!(next_text(ev).await.seq, second.seq);
    }

    alice.edit(conv.id, first.seq, "hello").await.unwrap();
    alice.recall(conv.id, second.seq).await.unwrap();
    // The sender's other device and the peer see both, in order.
    for ev in [&mut bob_ev, &mut laptop_ev] {
        let edited = next_text(ev).await;
        assert_eq!((edited.msg_id, edited.seq), (first.msg_id, first.seq));
        assert_eq!(text_of(&edited), "hello");
        assert_ne!(edited.edited_at_ms, 0);
        let recalled = next_of(ev, |e| match e {
            Event::Message { message, .. } => Some(message),
            _ => None,
        })
        .await;
        assert_eq!(recalled.msg_id, second.msg_id);
        assert!(recalled.recalled && recalled.content.is_none());
    }
    let page = bob
        .history(conv.id, 0, pb::Direction::Backward, 10)
        .await
        .unwrap();
    let shown: Vec<(u64, Option<&str>, bool)> = page
        .messages
        .iter()
        .map(|m| {
            (
                m.seq,
                m.content.as_ref().and_then(|c| c.as_text()),
                m.recalled,
            )
        })
        .collect();
    assert_eq!(shown, [(1, Some("hello"), false), (2, None, true)]);
    let versions = bob.edit_history(conv.id, first.seq).await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(
        versions[0].content.as_ref().unwrap().as_text(),
        Some("helo")
    );
    // Revisions are not messages: nothing new to read, no seq taken.
    let list = bob.conversations(0, "").await.unwrap();
    assert_eq!(list.conversations[0].last_seq, 2);

    let err = bob.recall(conv.id, first.seq).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Forbidden),
        "not bob's to recall"
    );
    let err = alice.edit(conv.id, second.seq, "x").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "recalled");
    let err = alice.recall(conv.id, 99).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
}

/// The next text message and its `from_blocked` mark.
async fn next_marked(events: &mut Receiver<Event>) -> (pb::Message, bool) {
    next_of(events, |e| match e {
        Event::Message {
            message,
            from_blocked,
            ..
        } if matches!(
            message.content.as_ref().and_then(|c| c.body.as_ref()),
            Some(pb::content::Body::Text(_))
        ) =>
        {
            Some((message, from_blocked))
        }
        _ => None,
    })
    .await
}

/// The next block list pushed to a device.
async fn next_blocks(events: &mut Receiver<Event>) -> Vec<String> {
    next_of(events, |e| match e {
        Event::Blocks(b) => Some(b),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_block_reaches_groups_and_marks_what_arrives() {
    let mut w = World::start().await;
    let (ta, tb, tc) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let (alice, _alice_ev) = w.connect(&ta, "phone").await;
    let (_desk, mut desk_ev) = w.connect(&ta, "desk").await;
    let (bob, _bob_ev) = w.connect(&tb, "phone").await;
    let (carol, _carol_ev) = w.connect(&tc, "phone").await;
    let group = bob.create_group("g", &["alice", "carol"]).await.unwrap();

    alice.block("carol", true).await.unwrap();
    let blocks = next_blocks(&mut desk_ev).await;
    assert_eq!(blocks, ["carol"], "the other device hears of it");
    assert_eq!(alice.blocks().await.unwrap(), ["carol"]);

    // carol cannot bring alice into a group of hers.
    let err = carol.create_group("mine", &["alice"]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Blocked));
    let other = carol.create_group("other", &["bob"]).await.unwrap();
    let err = carol
        .request(Req::AddMembers(pb::AddMembers {
            conversation_id: other.id,
            users: vec!["alice".into()],
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Blocked));

    // In the group they share, carol's messages reach alice marked, live
    // and in a catch-up; bob's do not.
    carol
        .send(group.id, pb::Content::text("from carol"))
        .await
        .unwrap();
    bob.send(group.id, pb::Content::text("from bob"))
        .await
        .unwrap();
    let (m, marked) = next_marked(&mut desk_ev).await;
    assert_eq!((text_of(&m), marked), ("from carol", true));
    let (m, marked) = next_marked(&mut desk_ev).await;
    assert_eq!((text_of(&m), marked), ("from bob", false));
    // A device catching up from before them.
    let (_tablet, mut tablet_ev) = w.connect_at(&ta, "tablet", Some(0)).await;
    let (m, marked) = next_marked(&mut tablet_ev).await;
    assert_eq!(
        (text_of(&m), marked),
        ("from carol", true),
        "caught up, marked"
    );

    alice.block("carol", false).await.unwrap();
    assert!(next_blocks(&mut desk_ev).await.is_empty());
    carol
        .send(group.id, pb::Content::text("again"))
        .await
        .unwrap();
    let (m, marked) = next_marked(&mut desk_ev).await;
    assert_eq!((text_of(&m), marked), ("again", false));
}
