//! Read markers on the one-process default, through the gateway and the
//! SDK: receipts reach the peer's devices and the reader's other devices as
//! they happen, and the conversation list tells a device that missed them.

use super::*;

/// The next read receipt pushed to a device (messages skipped).
async fn next_read(events: &mut Receiver<Event>) -> pb::ReadReceipt {
    loop {
        match timeout(WAIT, events.recv())
            .await
            .expect("no receipt in time")
            .expect("events closed")
        {
            Event::Read(r) => return r,
            _ => {}
        }
    }
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
    loop {
        match timeout(WAIT, events.recv())
            .await
            .expect("no typing indicator in time")
            .expect("events closed")
        {
            Event::Typing(t) => return t,
            _ => {}
        }
    }
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
