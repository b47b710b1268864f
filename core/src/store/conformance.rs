//! The store's behaviour suite: what every `Store` must do, as functions
//! over `&dyn Store`. The store adapters run it against SQLite and
//! PostgreSQL (each test in a database or schema of its own) and the core
//! runs it against `MemoryStore`, all through
//! [`store_conformance!`](crate::store_conformance), so the three cannot
//! drift apart. Each check starts from a store holding the users alice, bob
//! and carol.

use std::collections::HashSet;

use parley_proto::pb;

use super::*;
use crate::push::{AudienceQuery, DeadToken, PushAudience, PushTokenRecord};

/// A text message from `sender` with client id `id`.
pub fn text(conv: u64, sender: &str, id: &str, body: &str) -> NewMessage {
    NewMessage {
        conversation_id: conv,
        sender_id: sender.into(),
        sender_device: "d1".into(),
        client_msg_id: id.into(),
        content: pb::Content::text(body),
        now_ms: 1_000,
    }
}

/// Creates the users every check starts with.
pub async fn with_users(store: &dyn Store) {
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.unwrap();
    }
}

/// Appends one message on its own.
pub async fn one(store: &dyn Store, m: NewMessage) -> Result<Appended, ChatError> {
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

pub async fn seqs_are_gap_free_and_resends_are_deduped(store: &dyn Store) {
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

    let again = one(store, text(conv.id, "alice", "c3", "hi"))
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

pub async fn a_used_id_with_another_message_is_a_conflict(store: &dyn Store) {
    let conv = store.open_direct("alice", "bob", 0).await.unwrap();
    let (group, _) = store
        .create_group("alice", "g", &["bob".to_owned()], 0)
        .await
        .unwrap();
    one(store, text(conv.id, "alice", "c1", "hi"))
        .await
        .unwrap();
    let conflict = |r: &Result<Appended, ChatError>, id: &str| match r {
        Err(ChatError::Conflict(m)) => assert!(m.contains(id), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    };
    conflict(
        &one(store, text(conv.id, "alice", "c1", "other words")).await,
        "c1",
    );
    conflict(&one(store, text(group.id, "alice", "c1", "hi")).await, "c1");
    // Inside one batch too; the first of the batch stands.
    let r = store
        .append(vec![
            text(conv.id, "alice", "c2", "one"),
            text(conv.id, "alice", "c2", "two"),
        ])
        .await
        .unwrap();
    assert!(!r[0].as_ref().unwrap().duplicate);
    conflict(&r[1], "c2");
    // Another sender may use the same id.
    let theirs = one(store, text(conv.id, "bob", "c1", "hello"))
        .await
        .unwrap();
    assert!(!theirs.duplicate);
    assert_eq!(last_seq(store, conv.id).await, 3);
}

pub async fn a_resend_inside_one_batch_is_a_duplicate(store: &dyn Store) {
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

pub async fn every_member_gets_an_inbox_entry(store: &dyn Store) {
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

pub async fn outsiders_and_blocked_senders_are_refused(store: &dyn Store) {
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

pub async fn history_pages_both_ways(store: &dyn Store) {
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

pub async fn groups_record_membership_changes(store: &dyn Store) {
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

/// A request that names a user twice changes that user once, and the
/// event lists the users it changed sorted, each once.
pub async fn repeated_users_in_a_change_count_once(store: &dyn Store) {
    store.create_user("dave", "", 0).await.unwrap();
    let (g, _) = store
        .create_group("alice", "team", &["alice".into(), "bob".into()], 0)
        .await
        .unwrap();
    let users = |v: &[&str]| v.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
    let event_users = |a: &Appended| match &a.message.content.as_ref().unwrap().body {
        Some(pb::content::Body::System(e)) => e.users.clone(),
        other => panic!("expected a system event, got {other:?}"),
    };
    let (g, added) = store
        .change_members(
            g.id,
            "alice",
            MembershipChange::Add,
            &users(&["dave", "carol", "dave"]),
            4,
            0,
        )
        .await
        .expect("dave counts once, so the group of 4 is not full");
    assert_eq!(g.members, users(&["alice", "bob", "carol", "dave"]));
    assert_eq!(event_users(&added.unwrap()), users(&["carol", "dave"]));
    let (g, removed) = store
        .change_members(
            g.id,
            "alice",
            MembershipChange::Remove,
            &users(&["carol", "carol"]),
            4,
            0,
        )
        .await
        .unwrap();
    assert_eq!(g.members, users(&["alice", "bob", "dave"]));
    let removed = removed.unwrap();
    assert_eq!(event_users(&removed), users(&["carol"]));
    let carol: Vec<&str> = removed
        .recipients
        .iter()
        .filter(|(u, _)| u == "carol")
        .map(|(u, _)| u.as_str())
        .collect();
    assert_eq!(carol, vec!["carol"], "one inbox entry for the removed user");
}

pub async fn retention_leaves_a_visible_hole(store: &dyn Store) {
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
pub async fn numbering_survives_pruning_everything(store: &dyn Store) {
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

pub async fn cursors_only_move_forward(store: &dyn Store) {
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

pub async fn log_outs_only_move_forward_and_list_every_device(store: &dyn Store) {
    assert_eq!(
        store.logged_out_at("alice", "phone").await.unwrap(),
        Some(0)
    );
    assert_eq!(store.logged_out_at("zed", "phone").await.unwrap(), None);
    assert!(matches!(
        store.log_out("zed", None, 5).await,
        Err(ChatError::NotFound(_))
    ));
    assert!(matches!(
        store.log_out("zed", Some("phone"), 5).await,
        Err(ChatError::NotFound(_))
    ));
    // A device never seen can be logged out; it then lists, with no cursor.
    store.log_out("alice", Some("phone"), 1_000).await.unwrap();
    store.log_out("alice", Some("phone"), 900).await.unwrap();
    assert_eq!(
        store.logged_out_at("alice", "phone").await.unwrap(),
        Some(1_000)
    );
    assert_eq!(
        store.logged_out_at("alice", "laptop").await.unwrap(),
        Some(0)
    );
    assert_eq!(store.get_cursor("alice", "phone").await.unwrap(), None);
    // Every device: the later of the two counts, per device.
    store.log_out("alice", None, 800).await.unwrap();
    store.log_out("alice", None, 700).await.unwrap();
    assert_eq!(
        store.logged_out_at("alice", "phone").await.unwrap(),
        Some(1_000)
    );
    assert_eq!(
        store.logged_out_at("alice", "laptop").await.unwrap(),
        Some(800)
    );
    assert_eq!(store.logged_out_at("bob", "laptop").await.unwrap(), Some(0));
    // What a gateway that missed notices asks for: the log-outs since.
    let since = |at: i64| async move {
        store
            .log_outs_since(at, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.user, r.device, r.at_ms))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        since(0).await,
        vec![
            ("alice".to_owned(), None, 800),
            ("alice".to_owned(), Some("phone".to_owned()), 1_000)
        ]
    );
    assert_eq!(
        since(900).await,
        vec![("alice".to_owned(), Some("phone".to_owned()), 1_000)]
    );
    assert!(since(1_001).await.is_empty());
    assert_eq!(store.log_outs_since(0, 1).await.unwrap().len(), 1, "a page");
    let cursor = DeviceCursor {
        user: "alice".into(),
        device: "laptop".into(),
        cursor: 4,
    };
    store.set_cursors(&[cursor], 2_000).await.unwrap();
    let devices = store.list_devices("alice").await.unwrap();
    assert_eq!(
        devices,
        vec![
            DeviceRecord {
                device: "laptop".into(),
                cursor: 4,
                last_seen_ms: 2_000,
                logged_out_at_ms: 800,
            },
            DeviceRecord {
                device: "phone".into(),
                cursor: 0,
                last_seen_ms: 0,
                logged_out_at_ms: 1_000,
            },
        ]
    );
    assert!(store.list_devices("bob").await.unwrap().is_empty());
    // A device logged in with a session lists before it acknowledges.
    let session = RefreshRecord {
        user: "bob".into(),
        device: "tablet".into(),
        digest: vec![1],
        previous: Vec::new(),
        created_at_ms: 3_000,
        rotated_at_ms: 3_000,
        expires_at_ms: 9_000,
    };
    store.put_refresh(&session).await.unwrap();
    let devices = store.list_devices("bob").await.unwrap();
    assert_eq!(
        devices,
        vec![DeviceRecord {
            device: "tablet".into(),
            cursor: 0,
            last_seen_ms: 0,
            logged_out_at_ms: 0,
        }]
    );
}

pub async fn refresh_tokens_move_on_only_from_the_current_one(store: &dyn Store) {
    assert_eq!(store.get_refresh("alice", "phone").await.unwrap(), None);
    assert!(
        !store
            .rotate_refresh("alice", "phone", b"a", b"b", 5, 9)
            .await
            .unwrap()
    );
    let record = RefreshRecord {
        user: "alice".into(),
        device: "phone".into(),
        digest: b"one".to_vec(),
        previous: Vec::new(),
        created_at_ms: 1_000,
        rotated_at_ms: 1_000,
        expires_at_ms: 9_000,
    };
    store.put_refresh(&record).await.unwrap();
    assert_eq!(
        store.get_refresh("alice", "phone").await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(store.get_refresh("alice", "laptop").await.unwrap(), None);
    assert!(
        store
            .rotate_refresh("alice", "phone", b"one", b"two", 2_000, 10_000)
            .await
            .unwrap()
    );
    // Another refresh from the same token lost the race.
    assert!(
        !store
            .rotate_refresh("alice", "phone", b"one", b"three", 2_001, 10_001)
            .await
            .unwrap()
    );
    let moved = store.get_refresh("alice", "phone").await.unwrap().unwrap();
    assert_eq!(
        (moved.digest.as_slice(), moved.previous.as_slice()),
        (&b"two"[..], &b"one"[..])
    );
    assert_eq!(
        (
            moved.created_at_ms,
            moved.rotated_at_ms,
            moved.expires_at_ms
        ),
        (1_000, 2_000, 10_000)
    );
    // A new login replaces the device's record whole.
    let fresh = RefreshRecord {
        digest: b"new".to_vec(),
        created_at_ms: 3_000,
        rotated_at_ms: 3_000,
        ..record
    };
    store.put_refresh(&fresh).await.unwrap();
    assert_eq!(
        store.get_refresh("alice", "phone").await.unwrap(),
        Some(fresh)
    );
}

/// A pending upload of `owner` made at `at_ms`, its slot good for 100 ms.
pub fn blob(id: &str, owner: &str, at_ms: i64) -> crate::media::BlobRecord {
    crate::media::BlobRecord {
        id: id.into(),
        owner: owner.into(),
        kind: pb::MediaKind::Image,
        mime_type: "image/png".into(),
        size_bytes: 1234,
        sha256: vec![],
        name: "cat.png".into(),
        state: crate::media::BlobState::Pending,
        created_at_ms: at_ms,
        upload_expires_at_ms: at_ms + 100,
        width: 0,
        height: 0,
        thumbnail: None,
        last_used_ms: 0,
    }
}

pub async fn uploads_complete_once_are_used_by_their_owner_and_collected(store: &dyn Store) {
    use crate::media::BlobState;
    let ids: Vec<String> = (0..5).map(|i| format!("{i:032x}")).collect();
    for (i, id) in ids.iter().enumerate() {
        store
            .create_blob(&blob(id, "alice", 1_000 + i as i64))
            .await
            .unwrap();
    }
    assert!(store.create_blob(&blob(&ids[0], "bob", 0)).await.is_err());
    store
        .create_blob(&blob(&format!("{:032x}", 99), "bob", 1_000))
        .await
        .unwrap();
    assert_eq!(
        store.uploads_since("alice", 1_001).await.unwrap(),
        (4, 4 * 1234)
    );
    assert_eq!(store.uploads_since("carol", 0).await.unwrap(), (0, 0));

    // Complete: details stored, once.
    let mut done = blob(&ids[0], "alice", 1_000);
    done.sha256 = vec![7; 32];
    done.width = 640;
    done.height = 480;
    done.thumbnail = Some(pb::Thumbnail {
        mime_type: "image/jpeg".into(),
        width: 320,
        height: 240,
        size_bytes: 99,
    });
    assert!(store.complete_blob(&done).await.unwrap());
    assert!(!store.complete_blob(&done).await.unwrap(), "already ready");
    let got = store.get_blob(&ids[0]).await.unwrap().unwrap();
    assert_eq!(got.state, BlobState::Ready);
    assert_eq!(
        (got.width, got.height, got.sha256.clone()),
        (640, 480, vec![7; 32])
    );
    assert_eq!(got.thumbnail, done.thumbnail);
    assert_eq!(got.name, "cat.png");
    assert!(store.get_blob(&"f".repeat(32)).await.unwrap().is_none());
    for id in &ids[1..3] {
        let mut b = blob(id, "alice", 0);
        b.sha256 = vec![1; 32];
        assert!(store.complete_blob(&b).await.unwrap());
    }

    // Used: only a ready upload, only by its owner.
    let uses = vec![
        ("alice".to_owned(), ids[0].clone()),
        ("bob".to_owned(), ids[1].clone()),
        ("alice".to_owned(), ids[3].clone()),
        ("alice".to_owned(), "e".repeat(32)),
    ];
    let used = store.use_blobs(&uses, 5_000).await.unwrap();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(
        (used[0].id.as_str(), used[0].last_used_ms),
        (ids[0].as_str(), 5_000)
    );

    // Collected: pending past its slot, ready and never used past the
    // grace, used past the retention; not what a message still uses.
    let doomed = store.doom_blobs(1_104, 1_002, None, 100).await.unwrap();
    let mut want = vec![ids[1].clone(), ids[3].clone(), format!("{:032x}", 99)];
    want.sort();
    let mut got = doomed.clone();
    got.sort();
    assert_eq!(
        got, want,
        "ids[2] is ready and newer than the grace, ids[4] pending in time"
    );
    assert!(
        store
            .use_blobs(&[("alice".into(), ids[1].clone())], 6_000)
            .await
            .unwrap()
            .is_empty(),
        "a doomed upload is not usable"
    );
    let again = store.doom_blobs(0, 0, None, 100).await.unwrap();
    assert_eq!(again.len(), 3, "what a pass left is answered again");
    store.delete_blobs(&doomed).await.unwrap();
    assert!(store.get_blob(&ids[1]).await.unwrap().is_none());
    assert!(
        store
            .doom_blobs(0, 0, Some(4_999), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.doom_blobs(0, 0, Some(5_001), 100).await.unwrap(),
        vec![ids[0].clone()],
        "used before the retention cut"
    );
}

fn push_token(
    user: &str,
    device: &str,
    provider: pb::PushProvider,
    token: &str,
) -> PushTokenRecord {
    PushTokenRecord {
        user: user.into(),
        device: device.into(),
        provider,
        token: token.into(),
        topic: "app.example".into(),
        locale: "en".into(),
        updated_at_ms: 5,
    }
}

/// A push registration's session time in the checks: after every log-out
/// they make, unless said otherwise.
const NOW: i64 = 1_000_000;

pub async fn push_tokens_follow_their_devices_and_mutes_their_members(store: &dyn Store) {
    use pb::PushProvider::{Apns, Fcm};
    let tokens = |users: &[&str]| AudienceQuery {
        users: users.iter().map(|u| (*u).to_owned()).collect(),
        now_ms: 1_000,
        ..AudienceQuery::default()
    };
    let held = |a: PushAudience| -> Vec<(String, String, String)> {
        a.tokens
            .into_iter()
            .map(|t| (t.user, t.device, t.token))
            .collect()
    };
    let row = |u: &str, d: &str, t: &str| (u.to_owned(), d.to_owned(), t.to_owned());

    store
        .put_push_token(&push_token("alice", "phone", Apns, "a1"), NOW)
        .await
        .unwrap();
    store
        .put_push_token(&push_token("alice", "tablet", Fcm, "f1"), NOW)
        .await
        .unwrap();
    // A new token replaces the device's old one.
    store
        .put_push_token(&push_token("alice", "phone", Apns, "a2"), NOW)
        .await
        .unwrap();
    let a = store
        .push_audience(&tokens(&["alice", "bob"]))
        .await
        .unwrap();
    assert_eq!(
        held(a),
        vec![row("alice", "phone", "a2"), row("alice", "tablet", "f1")]
    );

    // The same token from another user's device: the phone changed hands.
    store
        .put_push_token(&push_token("bob", "phone", Fcm, "f1"), NOW)
        .await
        .unwrap();
    let a = store
        .push_audience(&tokens(&["alice", "bob"]))
        .await
        .unwrap();
    assert_eq!(
        held(a),
        vec![row("alice", "phone", "a2"), row("bob", "phone", "f1")]
    );

    // A dead token goes; one the device has replaced meanwhile stays.
    let dead = |provider, token: &str| DeadToken {
        provider,
        token: token.into(),
    };
    let gone = store
        .drop_push_tokens(&[dead(Apns, "a1"), dead(Fcm, "f1"), dead(Apns, "f1")])
        .await
        .unwrap();
    assert_eq!(gone, 1, "only bob's f1 was still held");
    let a = store
        .push_audience(&tokens(&["alice", "bob"]))
        .await
        .unwrap();
    assert_eq!(held(a), vec![row("alice", "phone", "a2")]);

    // Removing and logging out take tokens away.
    store
        .put_push_token(&push_token("bob", "phone", Fcm, "f2"), NOW)
        .await
        .unwrap();
    store
        .put_push_token(&push_token("bob", "desk", Fcm, "f3"), NOW)
        .await
        .unwrap();
    store.delete_push_token("alice", "phone").await.unwrap();
    store.delete_push_token("alice", "phone").await.unwrap();
    store.log_out("bob", Some("desk"), 10).await.unwrap();
    let a = store
        .push_audience(&tokens(&["alice", "bob"]))
        .await
        .unwrap();
    assert_eq!(held(a), vec![row("bob", "phone", "f2")]);
    store.log_out("bob", None, 11).await.unwrap();
    let a = store
        .push_audience(&tokens(&["alice", "bob"]))
        .await
        .unwrap();
    assert!(
        a.tokens.is_empty(),
        "logging out every device removes every token"
    );
    // A registration from a session that began before a log-out (it
    // raced it) is refused; one from a later login is taken.
    let late = push_token("bob", "phone", Fcm, "f4");
    assert!(
        !store.put_push_token(&late, 11).await.unwrap(),
        "logged out at 11"
    );
    store.log_out("bob", Some("tablet"), 50).await.unwrap();
    let tablet = push_token("bob", "tablet", Fcm, "f5");
    assert!(
        !store.put_push_token(&tablet, 40).await.unwrap(),
        "the tablet at 50"
    );
    assert!(store.put_push_token(&late, 12).await.unwrap());
    assert!(store.put_push_token(&tablet, 51).await.unwrap());
    let a = store.push_audience(&tokens(&["bob"])).await.unwrap();
    assert_eq!(a.tokens.len(), 2);
    store.log_out("bob", None, 60).await.unwrap();
    assert!(
        !store
            .put_push_token(&push_token("nobody", "d", Fcm, "f6"), NOW)
            .await
            .unwrap(),
        "no such user"
    );

    // The longest token registration takes fits the stores (an index
    // entry of PostgreSQL's holds about 2.7 KB).
    let long: String = (0..crate::push::MAX_TOKEN_BYTES)
        .map(|i| char::from(b'!' + (i * 37 % 94) as u8))
        .collect();
    store
        .put_push_token(&push_token("carol", "phone", Fcm, &long), NOW)
        .await
        .unwrap();
    let a = store.push_audience(&tokens(&["carol"])).await.unwrap();
    assert_eq!(a.tokens[0].token, long);
    store.delete_push_token("carol", "phone").await.unwrap();

    // Previews: on by default, per user.
    assert_eq!(
        store.notification_previews("bob", None).await.unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .notification_previews("bob", Some(false))
            .await
            .unwrap(),
        Some(false)
    );
    assert_eq!(
        store.notification_previews("bob", None).await.unwrap(),
        Some(false)
    );
    assert_eq!(
        store
            .notification_previews("nobody", Some(true))
            .await
            .unwrap(),
        None
    );

    // Mutes: per member, gone with the membership.
    let direct = store.open_direct("alice", "bob", 0).await.unwrap();
    let (group, _) = store
        .create_group("alice", "g", &["alice".to_owned(), "carol".to_owned()], 0)
        .await
        .unwrap();
    assert!(matches!(
        store.mute(direct.id, "carol", i64::MAX).await,
        Err(ChatError::NotMember(_))
    ));
    store.mute(direct.id, "bob", i64::MAX).await.unwrap();
    store.mute(group.id, "carol", 2_000).await.unwrap();
    store.mute(group.id, "alice", 500).await.unwrap();
    let list = store.list_conversations("bob").await.unwrap();
    assert_eq!(list[0].muted_until_ms, i64::MAX);
    assert_eq!(
        store.list_conversations("alice").await.unwrap()[0].muted_until_ms,
        0
    );
    let pairs = vec![
        ("bob".to_owned(), direct.id),
        ("alice".to_owned(), direct.id),
        ("carol".to_owned(), group.id),
        ("alice".to_owned(), group.id),
    ];
    let a = store
        .push_audience(&AudienceQuery {
            users: vec!["alice".into(), "bob".into(), "carol".into()],
            senders: vec!["alice".into(), "nobody".into()],
            conversations: pairs.clone(),
            now_ms: 1_000,
        })
        .await
        .unwrap();
    let muted: HashSet<(String, u64)> = [
        ("bob".to_owned(), direct.id),
        ("carol".to_owned(), group.id),
    ]
    .into();
    assert_eq!(a.muted, muted, "alice's mute of the group ended at 500");
    assert_eq!(a.no_previews, HashSet::from(["bob".to_owned()]));
    assert!(
        a.names.is_empty(),
        "the users of the suite have no display names"
    );
    store
        .change_members(
            group.id,
            "carol",
            MembershipChange::Leave,
            &["carol".to_owned()],
            10,
            0,
        )
        .await
        .unwrap();
    store
        .change_members(
            group.id,
            "alice",
            MembershipChange::Add,
            &["carol".to_owned()],
            10,
            0,
        )
        .await
        .unwrap();
    let a = store
        .push_audience(&AudienceQuery {
            conversations: pairs,
            now_ms: 1_000,
            ..AudienceQuery::default()
        })
        .await
        .unwrap();
    assert!(
        !a.muted.contains(&("carol".to_owned(), group.id)),
        "a mute ends with the membership it was part of"
    );
}

pub async fn the_badge_counts_the_unread_of_conversations_not_muted(store: &dyn Store) {
    store.create_user("dave", "Dave D.", 0).await.unwrap();
    let conv = store.open_direct("dave", "bob", 0).await.unwrap();
    for i in 0..3 {
        one(store, text(conv.id, "dave", &format!("u{i}"), "hi"))
            .await
            .unwrap();
    }
    let members = ["bob".to_owned(), "dave".to_owned()];
    let (group, _) = store.create_group("dave", "g", &members, 0).await.unwrap();
    one(store, text(group.id, "dave", "g1", "hi"))
        .await
        .unwrap();
    let query = AudienceQuery {
        users: vec!["bob".into()],
        senders: vec!["dave".into()],
        now_ms: 1_000,
        ..AudienceQuery::default()
    };
    let a = store.push_audience(&query).await.unwrap();
    assert_eq!(
        a.unread.get("bob"),
        Some(&5),
        "three, the group's creation and one"
    );
    assert_eq!(a.names.get("dave").map(String::as_str), Some("Dave D."));
    store.mark_read(conv.id, "bob", 2).await.unwrap();
    let a = store.push_audience(&query).await.unwrap();
    assert_eq!(a.unread.get("bob"), Some(&3), "two of them read");
    store.mute(group.id, "bob", 2_000).await.unwrap();
    let a = store.push_audience(&query).await.unwrap();
    assert_eq!(
        a.unread.get("bob"),
        Some(&1),
        "the muted group does not count"
    );
    let later = AudienceQuery {
        now_ms: 3_000,
        ..query
    };
    let a = store.push_audience(&later).await.unwrap();
    assert_eq!(a.unread.get("bob"), Some(&3), "until its mute ends");
}

pub async fn revisions_rewrite_in_place_and_reach_every_timeline(store: &dyn Store) {
    use crate::revision::{Change, Revision};
    let members = ["alice".to_owned(), "bob".to_owned()];
    let (group, _) = store
        .create_group("alice", "g", &members, 1_000)
        .await
        .unwrap();
    let sent = one(store, text(group.id, "alice", "m1", "helo"))
        .await
        .unwrap();
    let seq = sent.message.seq;
    let bob_before = store.inbox_head("bob").await.unwrap();
    let revision = |change, now_ms| Revision {
        conversation_id: group.id,
        seq,
        actor: "alice".into(),
        change,
        now_ms,
        window: std::time::Duration::from_secs(60),
    };
    let edit = |t: &str, now| revision(Change::Edit(pb::Content::text(t)), now);
    let edited = store.revise(&edit("hello", 2_000)).await.unwrap().unwrap();
    assert_eq!(
        (edited.message.msg_id, edited.message.seq),
        (sent.message.msg_id, seq)
    );
    assert_eq!(edited.message.edited_at_ms, 2_000);
    let mut users: Vec<&str> = edited.recipients.iter().map(|(u, _)| u.as_str()).collect();
    users.sort_unstable();
    assert_eq!(users, ["alice", "bob"], "every member, the sender too");
    let bob_entry = edited
        .recipients
        .iter()
        .find(|(u, _)| u == "bob")
        .unwrap()
        .1;
    assert_eq!(bob_entry, bob_before + 1, "the next place in the timeline");
    assert!(
        store.revise(&edit("hello", 2_500)).await.unwrap().is_none(),
        "no change"
    );
    store.revise(&edit("hello!", 3_000)).await.unwrap().unwrap();

    // History, both timeline entries and the edit history show the text now.
    let page = store.inbox_after("bob", bob_before - 1, 10).await.unwrap();
    let texts: Vec<(u64, Option<&str>)> = page
        .entries
        .iter()
        .map(|(_, m)| (m.msg_id, m.content.as_ref().and_then(|c| c.as_text())))
        .collect();
    let id = sent.message.msg_id;
    assert_eq!(
        texts,
        [
            (id, Some("hello!")),
            (id, Some("hello!")),
            (id, Some("hello!"))
        ]
    );
    let h = store
        .history(group.id, 0, pb::Direction::Backward, 1)
        .await
        .unwrap();
    assert_eq!(h.messages[0].edited_at_ms, 3_000);
    let kept = store.edit_history(group.id, seq).await.unwrap();
    let old: Vec<(Option<&str>, i64)> = kept
        .iter()
        .map(|e| (e.content.as_text(), e.replaced_at_ms))
        .collect();
    assert_eq!(old, [(Some("helo"), 2_000), (Some("hello"), 3_000)]);
    assert_eq!(store.prune_edits(2_500).await.unwrap(), 1);
    assert_eq!(store.edit_history(group.id, seq).await.unwrap().len(), 1);
    assert_eq!(
        last_seq(store, group.id).await,
        seq,
        "the numbering does not move"
    );

    // A resend of the original answers with the original's entries.
    let again = one(store, text(group.id, "alice", "m1", "helo"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.recipients, sent.recipients);
    assert_eq!(again.message.content.unwrap().as_text(), Some("hello!"));

    // Refusals: another's message, past the window, no such message.
    let not_hers = Revision {
        actor: "bob".into(),
        ..revision(Change::Recall, 3_000)
    };
    assert!(matches!(
        store.revise(&not_hers).await,
        Err(ChatError::Forbidden(_))
    ));
    assert!(matches!(
        store.revise(&revision(Change::Recall, 99_000)).await,
        Err(ChatError::Forbidden(_))
    ));
    let missing = Revision {
        seq: 99,
        ..revision(Change::Recall, 3_000)
    };
    assert!(matches!(
        store.revise(&missing).await,
        Err(ChatError::NotFound(_))
    ));
    assert!(matches!(
        store.edit_history(group.id, 99).await,
        Err(ChatError::NotFound(_))
    ));

    // A recall takes the content and the history away for good.
    let recalled = store
        .revise(&revision(Change::Recall, 4_000))
        .await
        .unwrap()
        .unwrap();
    assert!(recalled.message.recalled);
    assert_eq!(recalled.message.content, None);
    let h = store
        .history(group.id, 0, pb::Direction::Backward, 1)
        .await
        .unwrap();
    assert!(h.messages[0].recalled && h.messages[0].content.is_none());
    let page = store.inbox_after("bob", bob_before - 1, 10).await.unwrap();
    assert!(
        page.entries
            .iter()
            .all(|(_, m)| m.recalled && m.content.is_none())
    );
    assert!(store.edit_history(group.id, seq).await.unwrap().is_empty());
    assert!(
        store
            .revise(&revision(Change::Recall, 4_000))
            .await
            .unwrap()
            .is_none()
    );
    let again = one(store, text(group.id, "alice", "m1", "helo"))
        .await
        .unwrap();
    assert!(again.duplicate && again.message.recalled, "still a resend");
    assert_eq!(again.recipients, sent.recipients);
    assert!(matches!(
        store.revise(&edit("back", 4_000)).await,
        Err(ChatError::InvalidArgument(_))
    ));
    let late = revision(Change::Recall, 99_000);
    assert!(
        store.revise(&late).await.unwrap().is_none(),
        "recalled is recalled"
    );

    // Retention takes a revised message with every entry pointing at it,
    // the revisions' too, and its edit history; numbers are not reused.
    let other = one(store, text(group.id, "alice", "m2", "two"))
        .await
        .unwrap();
    let second = Revision {
        seq: other.message.seq,
        ..edit("deux", 4_500)
    };
    store.revise(&second).await.unwrap().unwrap();
    let head = store.inbox_head("bob").await.unwrap();
    store.prune_before(i64::MAX).await.unwrap();
    let page = store.inbox_after("bob", 0, 100).await.unwrap();
    assert!(page.entries.is_empty(), "{:?}", page.entries);
    assert_eq!(page.head, head);
    assert!(matches!(
        store.edit_history(group.id, other.message.seq).await,
        Err(ChatError::NotFound(_))
    ));
}

pub async fn block_lists_read_both_ways(store: &dyn Store) {
    store.set_block("alice", "carol", true, 1).await.unwrap();
    store.set_block("alice", "bob", true, 1).await.unwrap();
    store.set_block("bob", "carol", true, 1).await.unwrap();
    assert_eq!(store.blocks_of("alice").await.unwrap(), ["bob", "carol"]);
    assert!(store.blocks_of("carol").await.unwrap().is_empty());
    let users = ["bob".to_owned(), "alice".to_owned(), "alice".to_owned()];
    assert_eq!(
        store.blockers_of("carol", &users).await.unwrap(),
        ["alice", "bob"]
    );
    assert!(store.blockers_of("alice", &users).await.unwrap().is_empty());
    store.set_block("alice", "carol", false, 2).await.unwrap();
    assert_eq!(store.blockers_of("carol", &users).await.unwrap(), ["bob"]);
}

/// The list entry of `conversation` in `user`'s list.
async fn listed(store: &dyn Store, user: &str, conversation: u64) -> ConversationRecord {
    store
        .list_conversations(user)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id == conversation)
        .expect("listed")
}

pub async fn read_markers_move_forward_and_count_the_unread(store: &dyn Store) {
    let direct = store.open_direct("alice", "bob", 0).await.unwrap();
    let fresh = listed(store, "alice", direct.id).await;
    assert_eq!(
        (fresh.read_seq, fresh.unread(), fresh.last_message),
        (0, 0, None)
    );
    let batch = (1..=3)
        .map(|i| text(direct.id, "alice", &format!("a{i}"), &format!("hi {i}")))
        .collect();
    store.append(batch).await.unwrap();
    let alice = listed(store, "alice", direct.id).await;
    assert_eq!(alice.read_seq, 3, "a sender has read what it sent");
    assert_eq!(alice.unread(), 0);
    assert_eq!(alice.peer_read_seq, 0);
    let newest = alice.last_message.clone().expect("a newest message");
    assert_eq!(
        (newest.seq, newest.content.unwrap().as_text()),
        (3, Some("hi 3"))
    );
    assert_eq!(alice.last_activity_ms, 1_000);
    let bob = listed(store, "bob", direct.id).await;
    assert_eq!((bob.read_seq, bob.unread()), (0, 3));

    let mark = store.mark_read(direct.id, "bob", 2).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 2,
            moved: true
        }
    );
    let mark = store.mark_read(direct.id, "bob", 1).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 2,
            moved: false
        },
        "never back"
    );
    let mark = store.mark_read(direct.id, "bob", 99).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 3,
            moved: true
        },
        "never past the newest"
    );
    assert_eq!(listed(store, "bob", direct.id).await.unread(), 0);
    assert_eq!(listed(store, "alice", direct.id).await.peer_read_seq, 3);
    assert!(matches!(
        store.mark_read(direct.id, "carol", 1).await,
        Err(ChatError::NotMember(_))
    ));

    // A reply moves the replier's marker past what it answers.
    one(store, text(direct.id, "alice", "a4", "more"))
        .await
        .unwrap();
    one(store, text(direct.id, "bob", "b1", "ok"))
        .await
        .unwrap();
    assert_eq!(listed(store, "bob", direct.id).await.read_seq, 5);
    assert_eq!(listed(store, "alice", direct.id).await.unread(), 1);
    assert_eq!(listed(store, "alice", direct.id).await.peer_read_seq, 5);
    let mark = store.mark_read(direct.id, "bob", 4).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 5,
            moved: false
        },
        "sent is read"
    );
    assert_eq!(
        store.read_markers(direct.id).await.unwrap(),
        vec![("alice".to_owned(), 4), ("bob".to_owned(), 5)]
    );
    let mark = store.mark_read(direct.id, "alice", 5).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 5,
            moved: true
        }
    );

    // A group: its creator has read the event that made it; the others
    // have it to read; someone added later starts at the event adding them.
    let members = ["alice".to_owned(), "bob".to_owned()];
    let (group, _) = store
        .create_group("alice", "g", &members, 2_000)
        .await
        .unwrap();
    assert_eq!(listed(store, "alice", group.id).await.unread(), 0);
    assert_eq!(listed(store, "bob", group.id).await.unread(), 1);
    for i in 0..3 {
        one(store, text(group.id, "bob", &format!("g{i}"), "x"))
            .await
            .unwrap();
    }
    store
        .change_members(
            group.id,
            "alice",
            MembershipChange::Add,
            &["carol".into()],
            10,
            3_000,
        )
        .await
        .unwrap();
    let carol = listed(store, "carol", group.id).await;
    assert_eq!((carol.read_seq, carol.unread(), carol.last_seq), (4, 1, 5));
    assert_eq!(carol.peer_read_seq, 0, "a group has no peer");
    let markers = store.read_markers(group.id).await.unwrap();
    assert_eq!(
        markers,
        vec![
            ("alice".to_owned(), 5),
            ("bob".to_owned(), 4),
            ("carol".to_owned(), 4)
        ]
    );
    // Leaving and coming back starts over at the event of the return.
    store.mark_read(group.id, "carol", 5).await.unwrap();
    store
        .change_members(
            group.id,
            "carol",
            MembershipChange::Leave,
            &["carol".into()],
            10,
            3_000,
        )
        .await
        .unwrap();
    store
        .change_members(
            group.id,
            "alice",
            MembershipChange::Add,
            &["carol".into()],
            10,
            3_000,
        )
        .await
        .unwrap();
    assert_eq!(listed(store, "carol", group.id).await.unread(), 1);
}

pub async fn pins_and_mutes_are_a_members_own(store: &dyn Store) {
    let direct = store.open_direct("alice", "bob", 0).await.unwrap();
    let s = store.pin(direct.id, "alice", true).await.unwrap();
    assert_eq!(
        s,
        MemberSettings {
            muted_until_ms: 0,
            pinned: true
        }
    );
    let s = store.mute(direct.id, "alice", 9_000).await.unwrap();
    assert_eq!(
        s,
        MemberSettings {
            muted_until_ms: 9_000,
            pinned: true
        }
    );
    let alice = listed(store, "alice", direct.id).await;
    assert_eq!((alice.pinned, alice.muted_until_ms), (true, 9_000));
    let bob = listed(store, "bob", direct.id).await;
    assert_eq!((bob.pinned, bob.muted_until_ms), (false, 0));
    assert!(matches!(
        store.pin(direct.id, "carol", true).await,
        Err(ChatError::NotMember(_))
    ));
    let s = store.pin(direct.id, "alice", false).await.unwrap();
    assert_eq!(
        s,
        MemberSettings {
            muted_until_ms: 9_000,
            pinned: false
        }
    );
}

/// Turns every check of the suite into a `#[tokio::test]`. `$open` is an
/// async fn returning `(guard, store)`: the guard lives as long as the test
/// (a temporary directory, a schema dropped afterwards) and the store gets
/// the suite's users before each check.
#[macro_export]
macro_rules! store_conformance {
    ($open:path) => {
        $crate::store_conformance!(@each $open:
            seqs_are_gap_free_and_resends_are_deduped,
            a_resend_inside_one_batch_is_a_duplicate,
            a_used_id_with_another_message_is_a_conflict,
            every_member_gets_an_inbox_entry,
            outsiders_and_blocked_senders_are_refused,
            history_pages_both_ways,
            groups_record_membership_changes,
            repeated_users_in_a_change_count_once,
            retention_leaves_a_visible_hole,
            numbering_survives_pruning_everything,
            cursors_only_move_forward,
            log_outs_only_move_forward_and_list_every_device,
            refresh_tokens_move_on_only_from_the_current_one,
            uploads_complete_once_are_used_by_their_owner_and_collected,
            push_tokens_follow_their_devices_and_mutes_their_members,
            the_badge_counts_the_unread_of_conversations_not_muted,
            read_markers_move_forward_and_count_the_unread,
            pins_and_mutes_are_a_members_own,
            revisions_rewrite_in_place_and_reach_every_timeline,
            block_lists_read_both_ways,
        );
    };
    (@each $open:path: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (_guard, store) = $open().await;
                $crate::store::conformance::with_users(&store).await;
                $crate::store::conformance::$name(&store).await;
            }
        )*
    };
}
