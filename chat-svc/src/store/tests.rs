//! The store's behaviour suite. It runs against SQLite here; a new store
//! implementation runs the same functions.

use parley_proto::pb;

use super::*;

fn text(conv: u64, sender: &str, id: &str, body: &str) -> NewMessage {
    NewMessage {
        conversation_id: conv,
        sender_id: sender.into(),
        sender_device: "d1".into(),
        client_msg_id: id.into(),
        content: pb::Content::text(body),
        now_ms: 1_000,
    }
}

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.unwrap();
    }
    (dir, store)
}

async fn one(store: &dyn Store, m: NewMessage) -> Result<Appended, ChatError> {
    store.append(vec![m]).await.unwrap().pop().unwrap()
}

pub(crate) async fn seqs_are_gap_free_and_resends_are_deduped(store: &dyn Store) {
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    assert_eq!(
        store.open_direct("bob", "alice", 0).await.unwrap().id,
        conv.id,
        "direct is per pair"
    );
    let batch = (1..=5)
        .map(|i| text(conv.id, "alice", &format!("c{i}"), "hi"))
        .collect();
    let results = store.append(batch).await.unwrap();
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| r.as_ref().unwrap().message.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    let again = one(store, text(conv.id, "alice", "c3", "different body"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.seq, 3);
    assert_eq!(again.message.content.unwrap().as_text(), Some("hi"));
    assert!(again.recipients.is_empty());
    assert_eq!(
        store
            .get_conversation(conv.id)
            .await
            .unwrap()
            .unwrap()
            .last_seq,
        5
    );
}

pub(crate) async fn every_member_gets_an_inbox_entry(store: &dyn Store) {
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    let a = one(store, text(conv.id, "alice", "x1", "one"))
        .await
        .unwrap();
    let users: Vec<&str> = a.recipients.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, vec!["alice", "bob"]);
    let page = store.inbox_after("bob", 0, 10).await.unwrap();
    assert_eq!(page.head, 1);
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].1.msg_id, a.message.msg_id);
}

pub(crate) async fn outsiders_and_blocked_senders_are_refused(store: &dyn Store) {
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    assert!(matches!(
        one(store, text(conv.id, "carol", "z", "hey")).await,
        Err(ChatError::NotMember(_))
    ));
    assert!(matches!(
        one(store, text(9999, "alice", "z", "hey")).await,
        Err(ChatError::NotMember(_))
    ));
    store.set_block("bob", "alice", true, 0).await.unwrap();
    assert!(store.is_blocked("alice", "bob").await.unwrap());
    assert!(matches!(
        one(store, text(conv.id, "alice", "b1", "hey")).await,
        Err(ChatError::Blocked(_))
    ));
    // Bob may still write to alice.
    assert!(one(store, text(conv.id, "bob", "b2", "hey")).await.is_ok());
    store.set_block("bob", "alice", false, 0).await.unwrap();
    assert!(
        one(store, text(conv.id, "alice", "b1", "hey"))
            .await
            .is_ok()
    );
}

pub(crate) async fn history_pages_both_ways(store: &dyn Store) {
    let conv = store.open_direct("alice", "carol", 0).await.unwrap();
    let batch = (1..=25)
        .map(|i| text(conv.id, "alice", &format!("h{i}"), "m"))
        .collect();
    store.append(batch).await.unwrap();
    let newest = store
        .history(conv.id, 0, pb::Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(
        newest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (16..=25).collect::<Vec<_>>()
    );
    assert!(newest.has_more);
    let older = store
        .history(conv.id, 16, pb::Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(older.messages.first().unwrap().seq, 6);
    let oldest = store
        .history(conv.id, 6, pb::Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(oldest.messages.len(), 5);
    assert!(!oldest.has_more);
    let forward = store
        .history(conv.id, 20, pb::Direction::Forward, 10)
        .await
        .unwrap();
    assert_eq!(
        forward.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![21, 22, 23, 24, 25]
    );
    assert!(!forward.has_more);
    assert_eq!(forward.oldest_available_seq, 1);
}

pub(crate) async fn groups_record_membership_changes(store: &dyn Store) {
    let members = vec!["alice".to_owned(), "bob".to_owned()];
    let (g, created) = store
        .create_group("alice", "team", &members, 0)
        .await
        .unwrap();
    assert_eq!(g.members, members);
    assert_eq!(created.message.seq, 1);
    let (g, added) = store
        .change_members(
            g.id,
            "alice",
            MembershipChange::Add,
            &["carol".into()],
            3,
            0,
        )
        .await
        .unwrap();
    assert_eq!(g.members.len(), 3);
    assert_eq!(added.unwrap().recipients.len(), 3);
    let full = store
        .change_members(g.id, "alice", MembershipChange::Add, &["dave".into()], 3, 0)
        .await;
    assert!(
        matches!(full, Err(ChatError::NotFound(_))),
        "unknown users are refused first"
    );
    store.create_user("dave", "", 0).await.unwrap();
    let full = store
        .change_members(g.id, "alice", MembershipChange::Add, &["dave".into()], 3, 0)
        .await;
    assert!(matches!(full, Err(ChatError::GroupFull(3))));
    let (g, left) = store
        .change_members(g.id, "bob", MembershipChange::Leave, &["bob".into()], 3, 0)
        .await
        .unwrap();
    assert!(!g.members.contains(&"bob".to_owned()));
    let left = left.unwrap();
    assert!(
        left.recipients.iter().any(|(u, _)| u == "bob"),
        "the leaver is told too"
    );
    let (_, nothing) = store
        .change_members(g.id, "bob", MembershipChange::Leave, &["bob".into()], 3, 0)
        .await
        .unwrap();
    assert!(nothing.is_none());
    assert!(!store.is_member(g.id, "bob").await.unwrap());
    assert_eq!(store.list_conversations("carol").await.unwrap().len(), 1);
}

pub(crate) async fn retention_leaves_a_visible_hole(store: &dyn Store) {
    let conv = store.open_direct("bob", "carol", 0).await.unwrap();
    let mut old = text(conv.id, "bob", "old", "old");
    old.now_ms = 10;
    let mut new = text(conv.id, "bob", "new", "new");
    new.now_ms = 5_000;
    store.append(vec![old, new]).await.unwrap();
    assert_eq!(store.prune_before(1_000).await.unwrap(), 1);
    let page = store.inbox_after("carol", 0, 10).await.unwrap();
    assert_eq!(
        page.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(page.head, 2);
    let h = store
        .history(conv.id, 0, pb::Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(h.oldest_available_seq, 2);
}

pub(crate) async fn cursors_only_move_forward(store: &dyn Store) {
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), None);
    store.set_cursor("alice", "phone", 7, 0).await.unwrap();
    store.set_cursor("alice", "phone", 3, 0).await.unwrap();
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), Some(7));
    assert!(matches!(
        store.create_user("alice", "", 0).await,
        Err(ChatError::Conflict(_))
    ));
    assert_eq!(
        store
            .missing_users(&["alice".into(), "zed".into()])
            .await
            .unwrap(),
        vec!["zed".to_owned()]
    );
}

macro_rules! sqlite_suite {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_dir, store) = sqlite().await;
                super::tests::$name(&store).await;
            }
        )*
    };
}

mod on_sqlite {
    use super::sqlite;
    sqlite_suite!(
        seqs_are_gap_free_and_resends_are_deduped,
        every_member_gets_an_inbox_entry,
        outsiders_and_blocked_senders_are_refused,
        history_pages_both_ways,
        groups_record_membership_changes,
        retention_leaves_a_visible_hole,
        cursors_only_move_forward,
    );
}
