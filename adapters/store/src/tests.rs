//! The stores against the core's conformance suite, on SQLite and on
//! PostgreSQL (each test in a schema of its own), and what only a shared
//! database can show: several writers on one conversation at once.

use parley_core::store::Store;
use parley_core::store::conformance::{text, with_users};
use parley_proto::pb;

use crate::testing::TestSchema;
use crate::{PgStore, SqliteStore};

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, store)
}

async fn pg_store(schema: &TestSchema) -> PgStore {
    let store = PgStore::connect(&schema.url, Some(&schema.name), 4)
        .await
        .expect("PostgreSQL for tests (run scripts/services)");
    store.migrate().await.unwrap();
    store
}

async fn pg() -> (TestSchema, PgStore) {
    let schema = TestSchema::new();
    let store = pg_store(&schema).await;
    (schema, store)
}

/// A PostgreSQL store with the suite's users.
async fn pg_with_users() -> (TestSchema, PgStore) {
    let (schema, store) = pg().await;
    with_users(&store).await;
    (schema, store)
}

mod on_sqlite {
    parley_core::store_conformance!(super::sqlite);
}

mod on_postgres {
    parley_core::store_conformance!(super::pg);
}

/// Two stores on one database stand for two chat-service replicas. They
/// append to the same group (and the same users' timelines) at once, in
/// batches, with resends of each other's messages mixed in; every seq must be
/// taken exactly once, in order, with no gap, and so must every inbox seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_writing_one_conversation_keep_seqs_gap_free() {
    let (schema, a) = pg_with_users().await;
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

/// Every session of the pool runs without JIT, whatever the server's
/// default: a grown inbox with stale statistics made PostgreSQL compile
/// `parley_append` on every call, 50-64 ms a call instead of 3-4.
#[tokio::test]
async fn sessions_run_without_jit() {
    let (_schema, store) = pg().await;
    for _ in 0..3 {
        let jit: String = sqlx::query_scalar("SHOW jit")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(jit, "off");
    }
}
