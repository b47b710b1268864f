//! Push notifications in a cluster: the chat services cue every message
//! for a user with no device online on the events exchange, and a push
//! sender process (`parley-push`) wakes each registered device through
//! the app's webhook (a receiver in this test that checks every
//! signature). Its ledger: expected notifications, those received, those
//! received twice, those never received.

use std::collections::{HashMap, HashSet};

use parley_core::Presence as _;
use parley_push::testing::WebhookReceiver;
use parley_push::webhook::WebhookNotification;

use super::*;

/// A cluster of 2 gateways and 2 chat services, `n` users each with one
/// phone registered for the webhook and then gone offline, and ann online
/// with a direct conversation to each.
struct Offline {
    c: Cluster,
    ann: Client,
    /// (user, conversation)
    users: Vec<(String, u64)>,
}

async fn offline_users(receiver: &WebhookReceiver, n: usize, push_env: &[(&str, &str)]) -> Offline {
    let mut c = Cluster::start(Spec {
        gateways: 2,
        ..spec()
    })
    .await
    .unwrap();
    let mut env = receiver.env();
    env.extend(
        push_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    c.add_push(&env).await.unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("u{i:02}")).collect();
    let mut ids: Vec<&str> = vec!["ann"];
    ids.extend(names.iter().map(String::as_str));
    let tokens = c.users(&ids).await.unwrap();
    for (i, name) in names.iter().enumerate() {
        let (phone, _events) = Client::connect(c.at_gateway(i % 2, &tokens[i + 1], "phone"))
            .await
            .unwrap();
        phone
            .register_push(
                pb::PushProvider::Webhook,
                &format!("token-{name}"),
                "app",
                "en",
            )
            .await
            .unwrap();
        phone.close().await;
    }
    // Offline everywhere before the first send.
    let presence = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let deadline = Instant::now() + SETTLE;
    while !presence
        .locate(&name_refs)
        .await
        .unwrap()
        .gateways
        .is_empty()
    {
        assert!(Instant::now() < deadline, "users still online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ann, _ann_events) = Client::connect(c.at_gateway(0, &tokens[0], "laptop"))
        .await
        .unwrap();
    let mut users = Vec::new();
    for name in names {
        let conv = ann.open_direct(&name).await.unwrap().id;
        users.push((name, conv));
    }
    Offline { c, ann, users }
}

/// What the receiver got against what was owed.
struct PushLedger {
    expected: usize,
    received: usize,
    unique: usize,
    duplicated: usize,
    lost: usize,
    strangers: usize,
}

fn push_ledger(owed: &HashSet<(String, u64)>, got: &[WebhookNotification]) -> PushLedger {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for n in got {
        *seen.entry(n.id.as_str()).or_default() += 1;
    }
    let arrived: HashSet<(String, u64)> = got.iter().map(|n| (n.user.clone(), n.msg_id)).collect();
    PushLedger {
        expected: owed.len(),
        received: got.len(),
        unique: seen.len(),
        duplicated: seen.values().map(|k| k - 1).sum(),
        lost: owed.difference(&arrived).count(),
        strangers: arrived.difference(owed).count(),
    }
}

impl std::fmt::Display for PushLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "push ledger: expected {}, received {} ({} distinct), duplicated {}, lost {}, not owed {}",
            self.expected, self.received, self.unique, self.duplicated, self.lost, self.strangers
        )
    }
}

/// Sends `per_user` messages to each user, round-robin; what they owe.
async fn send_all(o: &Offline, per_user: usize) -> HashSet<(String, u64)> {
    let mut owed = HashSet::new();
    for round in 0..per_user {
        for (user, conv) in &o.users {
            let ack = o
                .ann
                .send(*conv, pb::Content::text(format!("{user} {round}")))
                .await
                .unwrap();
            owed.insert((user.clone(), ack.msg_id));
        }
    }
    owed
}

async fn wait_for(
    receiver: &WebhookReceiver,
    owed: &HashSet<(String, u64)>,
) -> Vec<WebhookNotification> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: Vec<WebhookNotification> =
            receiver.accepted().into_iter().map(|(_, n)| n).collect();
        let arrived: HashSet<(String, u64)> =
            got.iter().map(|n| (n.user.clone(), n.msg_id)).collect();
        if owed.is_subset(&arrived) || Instant::now() > deadline {
            // Whatever else was on its way.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return receiver.accepted().into_iter().map(|(_, n)| n).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 200 messages to 20 offline users: 200 notifications, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_to_twenty_offline_users_wake_each_phone_once() {
    let receiver = WebhookReceiver::start(parley_push::testing::SECRET).await;
    let o = offline_users(&receiver, 20, &[]).await;
    let owed = send_all(&o, 10).await;
    assert_eq!(owed.len(), 200);
    let got = wait_for(&receiver, &owed).await;
    let ledger = push_ledger(&owed, &got);
    println!("{ledger}");
    assert_eq!(
        (ledger.lost, ledger.duplicated, ledger.strangers),
        (0, 0, 0),
        "{ledger}\n{}",
        o.c.logs()
    );
    assert_eq!(receiver.requests().1, 0, "every request was signed");
    let sample = got.iter().find(|n| n.user == "u07").unwrap();
    assert_eq!(sample.token, "token-u07");
    assert_eq!(sample.title.as_deref(), Some("ann"));
    assert!(sample.body.starts_with("u07 "), "{sample:?}");
}

/// The sender is killed (SIGKILL) while it waits on the receiver, and
/// started again: the cues it held come back from the queue, and what it
/// had sent and recorded is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_batch_sends_the_rest_after_its_restart() {
    let receiver = WebhookReceiver::start(parley_push::testing::SECRET).await;
    receiver.set_delay(Duration::from_millis(150));
    let mut o = offline_users(&receiver, 20, &[("PARLEY_PUSH_CONCURRENCY", "1")]).await;
    let owed = send_all(&o, 10).await;
    // Some went through, the rest is in hand or queued: kill it.
    let deadline = Instant::now() + SETTLE;
    while receiver.accepted().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no push before the kill\n{}",
            o.c.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    o.c.pushes[0].kill9().await;
    let before = receiver.accepted().len();
    assert!(
        before < owed.len(),
        "the kill came after everything was sent"
    );
    let dir = o.c.dir.path().to_path_buf();
    o.c.pushes[0].start(&dir).await.unwrap();
    let got = wait_for(&receiver, &owed).await;
    let ledger = push_ledger(&owed, &got);
    println!("{ledger} (received before the kill: {before})");
    assert_eq!(
        (ledger.lost, ledger.strangers),
        (0, 0),
        "{ledger}\n{}",
        o.c.logs()
    );
    // A repeat is possible only for what was answered in the moment
    // between the receiver's answer and the sender's record of it: one
    // request's notifications at most (and each under its id, which a
    // receiver drops a second time).
    assert!(
        ledger.duplicated <= parley_push::webhook::MAX_PER_REQUEST,
        "{ledger}"
    );
}
