//! The store's behaviour suite: the same functions run against SQLite and
//! PostgreSQL (each test in a schema of its own), plus what only a shared
//! database can show: several writers on one conversation at once.

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

async fn with_users<S: Store>(store: S) -> S {
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.unwrap();
    }
    store
}

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, with_users(store).await)
}

async fn pg_store(schema: &crate::testing::TestSchema) -> PgStore {
    let store = PgStore::connect(&schema.url, Some(&schema.name), 4)
        .await
        .expect("PostgreSQL for tests (run scripts/services)");
    store.migrate().await.unwrap();
    store
}

async fn pg() -> (crate::testing::TestSchema, PgStore) {
    let schema = crate::testing::TestSchema::new();
    let store = pg_store(&schema).await;
    (schema, with_users(store).await)
}

async fn one(store: &dyn Store, m: NewMessage) -> Result<Appended, ChatError> {
    store.append(vec![m]).await.unwrap().pop().unwrap()
}

async fn last_seq(store: &dyn Store, conversation: u64) -> u64 {
    store
        .get_conversation(conversation)
        .await
        .unwrap()
        .expect("the conversation exists")
        .last_seq
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
    assert_eq!(
        again.recipients,
        results[2].as_ref().unwrap().recipients,
        "a duplicate carries the original's recipients, for a redone fan-out"
    );
    assert_eq!(last_seq(store, conv.id).await, 5);
}

pub(crate) async fn a_resend_inside_one_batch_is_a_duplicate(store: &dyn Store) {
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    let results = store
        .append(vec![
            text(conv.id, "alice", "same", "one"),
            text(conv.id, "alice", "same", "one"),
            text(conv.id, "alice", "other", "two"),
        ])
        .await
        .unwrap();
    let r: Vec<Appended> = results.into_iter().map(Result::unwrap).collect();
    assert!(!r[0].duplicate && r[1].duplicate && !r[2].duplicate);
    assert_eq!(r[1].message.msg_id, r[0].message.msg_id);
    assert_eq!((r[0].message.seq, r[2].message.seq), (1, 2));
    assert_eq!(store.inbox_head("bob").await.unwrap(), 2);
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

/// Numbers are never given twice, even when retention took every row that
/// carried the newest ones (SQLite reads them off those rows).
pub(crate) async fn numbering_survives_pruning_everything(store: &dyn Store) {
    let conv = store.open_direct("alice", "carol", 0).await.unwrap();
    let mut batch: Vec<NewMessage> = (1..=3)
        .map(|i| text(conv.id, "alice", &format!("p{i}"), "old"))
        .collect();
    for m in &mut batch {
        m.now_ms = 10;
    }
    store.append(batch).await.unwrap();
    let g = store
        .create_group("carol", "g", &["alice".into(), "carol".into()], 10)
        .await
        .unwrap()
        .0;
    assert_eq!(store.inbox_head("carol").await.unwrap(), 4);
    assert_eq!(store.prune_before(1_000).await.unwrap(), 4);
    assert_eq!(store.inbox_head("carol").await.unwrap(), 4);
    assert_eq!(store.inbox_head("alice").await.unwrap(), 4);
    assert_eq!(last_seq(store, conv.id).await, 3);

    let a = one(store, text(conv.id, "carol", "after", "new"))
        .await
        .unwrap();
    assert_eq!(a.message.seq, 4);
    assert_eq!(
        a.recipients,
        vec![("alice".to_owned(), 5), ("carol".to_owned(), 5)]
    );
    let (_, joined) = store
        .change_members(
            g.id,
            "carol",
            MembershipChange::Add,
            &["bob".into()],
            2_000,
            0,
        )
        .await
        .unwrap();
    let joined = joined.expect("a system event");
    assert_eq!(
        joined.message.seq, 2,
        "the group's creation event was seq 1"
    );
    assert!(joined.recipients.contains(&("carol".to_owned(), 6)));
    let page = store.inbox_after("carol", 0, 10).await.unwrap();
    assert_eq!(
        page.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(page.head, 6);
    assert_eq!(last_seq(store, conv.id).await, 4);
}

pub(crate) async fn cursors_only_move_forward(store: &dyn Store) {
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), None);
    let at = |device: &str, cursor| DeviceCursor {
        user: "alice".into(),
        device: device.into(),
        cursor,
    };
    store.set_cursors(&[at("phone", 7)], 0).await.unwrap();
    store
        .set_cursors(&[at("phone", 3), at("laptop", 2)], 0)
        .await
        .unwrap();
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), Some(7));
    assert_eq!(store.get_cursor("alice", "laptop").await.unwrap(), Some(2));
    store.set_cursors(&[], 0).await.unwrap();
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

macro_rules! suite {
    ($open:ident: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_guard, store) = $open().await;
                super::tests::$name(&store).await;
            }
        )*
    };
}

mod on_sqlite {
    use super::sqlite;
    suite!(sqlite:
        seqs_are_gap_free_and_resends_are_deduped,
        a_resend_inside_one_batch_is_a_duplicate,
        every_member_gets_an_inbox_entry,
        outsiders_and_blocked_senders_are_refused,
        history_pages_both_ways,
        groups_record_membership_changes,
        retention_leaves_a_visible_hole,
        numbering_survives_pruning_everything,
        cursors_only_move_forward,
    );
}

mod on_postgres {
    use super::pg;
    suite!(pg:
        seqs_are_gap_free_and_resends_are_deduped,
        a_resend_inside_one_batch_is_a_duplicate,
        every_member_gets_an_inbox_entry,
        outsiders_and_blocked_senders_are_refused,
        history_pages_both_ways,
        groups_record_membership_changes,
        retention_leaves_a_visible_hole,
        numbering_survives_pruning_everything,
        cursors_only_move_forward,
    );
}

/// Two stores on one database stand for two chat-service replicas. They
/// append to the same group (and the same users' timelines) at once, in
/// batches, with resends of each other's messages mixed in; every seq must be
/// taken exactly once, in order, with no gap, and so must every inbox seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_writing_one_conversation_keep_seqs_gap_free() {
    let (schema, a) = pg().await;
    let b = pg_store(&schema).await;
    let members: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
    let (g, _) = a.create_group("alice", "busy", &members, 0).await.unwrap();
    let direct = a.open_direct("alice", "bob", 0).await.unwrap();
    let stores = [a.clone(), b.clone()];
    let mut tasks = Vec::new();
    for writer in 0..6usize {
        let store = stores[writer % 2].clone();
        let (gid, did) = (g.id, direct.id);
        tasks.push(tokio::spawn(async move {
            let sender = ["alice", "bob", "carol"][writer % 3];
            for round in 0..10 {
                let mut batch = Vec::new();
                for i in 0..5 {
                    let id = format!("w{writer}-r{round}-{i}");
                    batch.push(text(gid, sender, &id, "x"));
                    if sender != "carol" && i == 2 {
                        batch.push(text(did, sender, &format!("{id}-d"), "y"));
                    }
                }
                // A resend of the previous round's first message.
                if round > 0 {
                    batch.push(text(
                        gid,
                        sender,
                        &format!("w{writer}-r{}-0", round - 1),
                        "x",
                    ));
                }
                for r in store.append(batch).await.unwrap() {
                    r.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let group_msgs = 6 * 10 * 5;
    let direct_msgs = 4 * 10;
    let h = a
        .history(g.id, 0, pb::Direction::Forward, 1000)
        .await
        .unwrap();
    let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=group_msgs as u64 + 1).collect::<Vec<_>>());
    let mut ids: Vec<&str> = h
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), group_msgs + 1, "each message stored once");
    for (user, expected) in [
        ("alice", group_msgs + 1 + direct_msgs),
        ("bob", group_msgs + 1 + direct_msgs),
        ("carol", group_msgs + 1),
    ] {
        let page = b.inbox_after(user, 0, 1000).await.unwrap();
        let inbox: Vec<u64> = page.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(inbox, (1..=expected as u64).collect::<Vec<_>>(), "{user}");
        assert_eq!(page.head, expected as u64);
        // The timeline follows each conversation's order.
        let group_seqs: Vec<u64> = page
            .entries
            .iter()
            .filter(|(_, m)| m.conversation_id == g.id)
            .map(|(_, m)| m.seq)
            .collect();
        assert!(group_seqs.windows(2).all(|w| w[0] < w[1]), "{user}");
    }
}

/// Blocks through the Redis cache: a block or an unblock takes effect on the
/// next message, though the list was cached before the change.
#[tokio::test]
async fn blocks_through_the_redis_cache_take_effect_at_once() {
    let redis = crate::testing::TestRedis::new();
    let cache = std::sync::Arc::new(crate::RedisState::new(&redis.url, &redis.prefix).unwrap());
    let (_schema, store) = pg().await;
    let store = store.with_block_cache(cache.clone());
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    assert!(one(&store, text(conv.id, "alice", "1", "x")).await.is_ok());
    assert_eq!(
        crate::BlockCache::get(&*cache, &["bob"]).await.unwrap(),
        vec![Some(vec![])],
        "bob's (empty) list is cached"
    );
    store.set_block("bob", "alice", true, 0).await.unwrap();
    assert!(matches!(
        one(&store, text(conv.id, "alice", "2", "x")).await,
        Err(ChatError::Blocked(_))
    ));
    store.set_block("bob", "alice", false, 0).await.unwrap();
    assert!(one(&store, text(conv.id, "alice", "3", "x")).await.is_ok());
}

/// Acked cursors wait in memory and are written together, not one
/// transaction per Ack; meanwhile a login in the same process resumes from
/// the pending one, and a cursor never moves backwards.
#[tokio::test]
async fn acked_cursors_are_coalesced_then_written_together() {
    use std::sync::Arc;
    let (_dir, store) = sqlite().await;
    let store: Arc<dyn Store> = Arc::new(store);
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    for id in ["1", "2", "3"] {
        one(&*store, text(conv.id, "bob", id, "x")).await.unwrap();
    }
    let config = crate::ChatConfig {
        cursor_flush: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let chat = crate::ChatService::start(
        store.clone(),
        Arc::new(crate::MemoryPresence::default()),
        Arc::new(crate::LocalBus::default()),
        crate::TokenKeys::new(&[7; 32]).unwrap(),
        config,
    );
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
