//! The Redis state against a real Redis, each test under a prefix of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parley_core::{Presence, Session};

use crate::RedisState;
use crate::testing::TestRedis;

fn s(user: &str, device: &str, gateway: &str, epoch: u64) -> Session {
    Session::new(user, device, gateway, epoch)
}

/// Presence settled from the start: a missing entry means offline.
fn state(t: &TestRedis) -> RedisState {
    RedisState::new(&t.url, &t.prefix)
        .unwrap()
        .with_presence_settle(Duration::ZERO)
}

#[tokio::test]
async fn presence_is_fenced_by_epoch_and_needs_a_live_gateway() {
    let t = TestRedis::new();
    let r = state(&t);
    assert!(r.ping().await, "Redis for tests (run scripts/services)");
    let ttl = Duration::from_secs(30);
    let first = r
        .announce("g1", "10.0.0.1:7400", 1, ttl, false, false)
        .await
        .unwrap();
    assert!(!first.had_lease, "a first lease is new");
    assert_eq!(first.drain_rate, None);
    let again = r
        .announce("g1", "10.0.0.1:7400", 1, ttl, false, false)
        .await
        .unwrap();
    assert!(again.had_lease);
    // The operator asks g1 to drain; g1 learns it with its next lease.
    r.request_drain("g1", 250, ttl).await.unwrap();
    for managed in [false, true] {
        let asked = r
            .announce("g1", "10.0.0.1:7400", 1, ttl, false, managed)
            .await
            .unwrap();
        assert_eq!(asked.drain_rate, Some(250));
    }
    // A rebalancing request is taken once, and the gateway stays routed.
    r.request_shed("g2", 40, 10, ttl).await.unwrap();
    let asked = r
        .announce("g2", "10.0.0.2:7400", 1, ttl, false, false)
        .await
        .unwrap();
    assert_eq!((asked.shed, asked.drain_rate), (Some((40, 10)), None));
    let again = r
        .announce("g2", "10.0.0.2:7400", 1, ttl, false, false)
        .await
        .unwrap();
    assert_eq!(again.shed, None, "taken, not repeated");
    assert!(r.routed("10.0.0.2:7400").await.unwrap());
    assert_eq!(r.online(&s("ann", "phone", "g1", 1)).await.unwrap(), None);
    assert_eq!(
        r.online(&s("ann", "phone", "g2", 2)).await.unwrap(),
        Some(s("ann", "phone", "g1", 1)),
        "the replaced session is named, for its gateway to close"
    );
    assert_eq!(
        r.online(&s("ann", "phone", "g2", 2)).await.unwrap(),
        None,
        "a refresh"
    );
    // The old connection's registration and goodbye arrive late.
    assert_eq!(
        r.online(&s("ann", "phone", "g1", 1)).await.unwrap(),
        Some(s("ann", "phone", "g2", 2)),
        "kept out by the newer one"
    );
    r.offline(&s("ann", "phone", "g1", 1)).await.unwrap();
    r.online(&s("ann", "laptop", "g1", 3)).await.unwrap();
    let located = r.locate(&["ann", "nobody"]).await.unwrap();
    assert!(located.settled);
    let located = located.gateways;
    assert_eq!(located.len(), 2);
    assert_eq!(located["g2"], vec!["ann".to_owned()]);
    assert_eq!(located["g1"], vec!["ann".to_owned()]);
    r.offline(&s("ann", "laptop", "g1", 3)).await.unwrap();
    let located = r.locate(&["ann"]).await.unwrap().gateways;
    assert_eq!(located.keys().collect::<Vec<_>>(), vec!["g2"]);

    // A gateway that dies says nothing: its lease runs out, and its
    // devices are no longer located.
    r.announce(
        "g3",
        "10.0.0.3:7400",
        1,
        Duration::from_secs(2),
        false,
        false,
    )
    .await
    .unwrap();
    r.online(&s("bo", "phone", "g3", 4)).await.unwrap();
    assert!(r.locate(&["bo"]).await.unwrap().gateways.contains_key("g3"));
    let mut gone = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if r.locate(&["bo"]).await.unwrap().gateways.is_empty() {
            gone = true;
            break;
        }
    }
    assert!(gone, "the dead gateway's devices are no longer located");

    // A gateway re-registers what it holds in bulk (after a Redis restart).
    let many: Vec<Session> = (0..2500)
        .map(|i| s(&format!("u{i}"), "d", "g2", 10))
        .collect();
    assert!(r.online_many(&many).await.unwrap().is_empty());
    let users: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    assert_eq!(r.locate(&refs).await.unwrap().gateways["g2"].len(), 2500);
    // A refresh names the devices that logged in again elsewhere since.
    r.online(&s("u7", "d", "g1", 11)).await.unwrap();
    assert_eq!(
        r.online_many(&many).await.unwrap(),
        vec![s("u7", "d", "g1", 11)]
    );
}

/// A user's devices online are capped over the cluster; a device already
/// online logs in again whatever the count; devices of a gateway that died
/// without a word do not count once its lease is gone.
#[tokio::test]
async fn devices_online_are_capped_per_user_across_gateways() {
    let t = TestRedis::new();
    let r = state(&t);
    let ttl = Duration::from_secs(30);
    r.announce("g1", "10.0.0.1:7400", 1, ttl, false, false)
        .await
        .unwrap();
    r.announce(
        "g2",
        "10.0.0.2:7400",
        1,
        Duration::from_secs(1),
        false,
        false,
    )
    .await
    .unwrap();
    let cap = Some(2);
    r.online_within(&s("ann", "phone", "g1", 1), cap)
        .await
        .unwrap();
    r.online_within(&s("ann", "desk", "g2", 2), cap)
        .await
        .unwrap();
    let refused = r.online_within(&s("ann", "tab", "g1", 3), cap).await;
    assert!(
        matches!(refused, Err(parley_core::ChatError::TooManyDevices(2))),
        "{refused:?}"
    );
    r.online_within(&s("ann", "phone", "g1", 4), cap)
        .await
        .expect("a device online logs in again");
    r.online_within(&s("bob", "tab", "g1", 5), cap)
        .await
        .expect("another user is counted apart");
    // g2 dies: once its lease runs out, its device makes room.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    r.online_within(&s("ann", "tab", "g1", 6), cap)
        .await
        .expect("the dead gateway's device does not count");
    let located = r.locate(&["ann"]).await.unwrap().gateways;
    assert_eq!(located["g1"], vec!["ann".to_owned()]);
    assert!(!located.contains_key("g2"));
    // g1 crashes and comes back under the same name (a pod's restart): its
    // lease names its first epoch, and the former process's entries (ann's
    // phone and tab, epochs 4 and 6) count no more.
    let reborn = state(&t).with_lease_since(100);
    reborn
        .announce("g1", "10.0.0.1:7400", 0, ttl, false, false)
        .await
        .unwrap();
    for (d, epoch) in [("desk", 101), ("laptop", 102)] {
        r.online_within(&s("ann", d, "g1", epoch), cap)
            .await
            .expect("the former process's devices do not count");
    }
    assert!(
        r.online_within(&s("ann", "watch", "g1", 103), cap)
            .await
            .is_err(),
        "the new process's own do"
    );
    // Bulk re-registration (after Redis lost its data) is never refused.
    let back: Vec<Session> = ["a", "b", "c"]
        .iter()
        .map(|d| s("cyd", d, "g1", 7))
        .collect();
    assert!(r.online_many(&back).await.unwrap().is_empty());
}

/// After presence starts over (Redis lost its data), lookups call it
/// unsettled for the settle time: a missing entry may be a device whose
/// gateway has not written it back yet. Then it is settled again, and
/// only gateways with a lease count.
#[tokio::test]
async fn presence_is_unsettled_for_a_while_after_it_starts_over() {
    let t = TestRedis::new();
    let settle = Duration::from_millis(400);
    let r = RedisState::new(&t.url, &t.prefix)
        .unwrap()
        .with_presence_settle(settle);
    r.online(&s("ann", "phone", "g1", 1)).await.unwrap();
    let first = r.locate(&["ann", "bob"]).await.unwrap();
    assert!(!first.settled, "a first lookup starts the settle time");
    assert_eq!(
        first.gateways["g1"],
        ["ann"],
        "entries found are listed, lease or not"
    );
    tokio::time::sleep(settle).await;
    let later = r.locate(&["ann", "bob"]).await.unwrap();
    assert!(later.settled);
    assert!(
        later.gateways.is_empty(),
        "g1 holds no lease: its entries are stale"
    );
    // Redis restarted empty: every key of the cluster gone, the mark too.
    crate::delete_prefix(&t.url, &t.prefix).await.unwrap();
    assert!(!r.locate(&["ann"]).await.unwrap().settled);
    assert!(
        !r.locate(&["ann"]).await.unwrap().settled,
        "still within the settle time"
    );
}

/// A TCP relay to the test Redis that can cut every connection through it
/// and refuse new ones, as a Redis restart or a network fault would.
struct Relay {
    addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: &str) -> Self {
        let upstream = upstream
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (o, c) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let (upstream, c) = (upstream.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = c.notified() => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            cut,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Cuts every connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A dropped link is reported at once, and again when it is back.
#[tokio::test]
async fn a_dropped_link_is_reported_and_its_return() {
    let t = TestRedis::new();
    let relay = Relay::start(&t.url).await;
    let r = RedisState::new(&relay.url(), &t.prefix).unwrap();
    let mut link = r.watch_link();
    // Subscribed once a publish reaches one receiver.
    let mut c = r.conn.clone();
    let channel = format!("{}:link", t.prefix);
    let mut subscribed = false;
    for _ in 0..100 {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("hello")
            .query_async(&mut c)
            .await
            .unwrap();
        if receivers == 1 {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(subscribed, "the watch subscribes");
    assert!(!link.changes.has_changed().unwrap(), "a message is no tick");
    relay.cut();
    tokio::time::timeout(Duration::from_secs(2), link.changes.changed())
        .await
        .expect("the drop is reported within 2 s")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !link.changes.has_changed().unwrap(),
        "no tick while it is down"
    );
    relay.reopen();
    tokio::time::timeout(Duration::from_secs(2), link.changes.changed())
        .await
        .expect("the return is reported within 2 s")
        .unwrap();
    // The handle's own connection died with the cut: its next call fails
    // and reconnects.
    let mut answers = false;
    for _ in 0..20 {
        if r.ping().await {
            answers = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answers, "the handle answers again");
}

#[tokio::test]
async fn the_route_lookup_spreads_clients_over_the_least_loaded() {
    let t = TestRedis::new();
    let r = state(&t);
    let ttl = Duration::from_secs(30);
    assert!(r.route(&[]).await.unwrap().is_empty());
    r.announce("a", "a:1", 5, ttl, false, false).await.unwrap();
    r.announce("b", "b:1", 2, ttl, false, false).await.unwrap();
    let mut picked = Vec::new();
    for _ in 0..5 {
        let candidates = r.route(&[]).await.unwrap();
        assert_eq!(candidates.len(), 2, "every gateway, least loaded first");
        picked.push(candidates[0].clone());
    }
    // b takes clients until it is as loaded as a, then they alternate.
    assert_eq!(picked, vec!["b:1", "b:1", "b:1", "a:1", "b:1"]);
    // What a client found dead is left out, and not counted on.
    r.announce("d", "d:1", 9, ttl, false, false).await.unwrap();
    let before = r.routes().await.unwrap();
    assert_eq!(
        r.route(&["a:1".into(), "b:1".into()]).await.unwrap(),
        vec!["d:1"]
    );
    let after = r.routes().await.unwrap();
    assert_eq!(after.iter().find(|e| e.0 == "d:1").unwrap().1, 10.0);
    assert_eq!(
        before.iter().find(|e| e.0 == "a:1"),
        after.iter().find(|e| e.0 == "a:1")
    );
    // A probe's verdict takes an address out until its next lease write.
    assert!(r.routed("d:1").await.unwrap());
    r.unroute("d:1").await.unwrap();
    assert!(!r.routed("d:1").await.unwrap());
    r.announce("d", "d:1", 9, ttl, false, false).await.unwrap();
    assert!(r.routed("d:1").await.unwrap());
    r.withdraw("d", "d:1").await.unwrap();
    // A refresh puts the real count back.
    r.announce("b", "b:1", 2, ttl, false, false).await.unwrap();
    assert_eq!(r.routes().await.unwrap()[0], ("b:1".to_owned(), 2.0));
    // A draining gateway leaves the table but keeps its lease.
    r.announce("b", "b:1", 2, ttl, true, false).await.unwrap();
    assert_eq!(r.route(&[]).await.unwrap(), vec!["a:1"]);
    assert_eq!(r.leases(&["b"]).await.unwrap()[0].connections, 2);
    // An entry nobody refreshes is pruned by the next announcement.
    r.announce("c", "c:1", 0, Duration::from_millis(100), false, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    r.announce("a", "a:1", 6, Duration::from_millis(100), false, false)
        .await
        .unwrap();
    let routes: Vec<String> = r.routes().await.unwrap().into_iter().map(|e| e.0).collect();
    assert_eq!(routes, vec!["a:1"]);
    r.withdraw("a", "a:1").await.unwrap();
    assert!(r.routes().await.unwrap().is_empty());
    assert!(r.leases(&["a"]).await.unwrap().is_empty());

    // Published by the operator under public addresses: a gateway finds
    // its entry by its own address, when it drains and when it goes.
    let table = [
        ("203.0.113.1:7400".to_owned(), 5),
        ("203.0.113.2:7400".to_owned(), 6),
    ];
    let via = [
        ("203.0.113.1:7400".to_owned(), "10.0.0.1:7400".to_owned()),
        ("203.0.113.2:7400".to_owned(), "10.0.0.2:7400".to_owned()),
    ];
    r.replace_routes(&table, &via).await.unwrap();
    assert_eq!(
        r.via("203.0.113.1:7400").await.unwrap().as_deref(),
        Some("10.0.0.1:7400")
    );
    r.announce("p1", "10.0.0.1:7400", 5, ttl, true, true)
        .await
        .unwrap();
    assert_eq!(
        r.route(&[]).await.unwrap(),
        vec!["203.0.113.2:7400"],
        "a draining gateway takes its public entry out"
    );
    r.withdraw("p2", "10.0.0.2:7400").await.unwrap();
    assert!(r.routes().await.unwrap().is_empty());
    assert_eq!(r.via("203.0.113.2:7400").await.unwrap(), None);
}

/// Two processes' limiters over one Redis see each other's counts after a
/// sync, in one round trip for all their keys; counters expire.
#[tokio::test]
async fn rate_limit_counters_are_shared_through_redis() {
    use parley_core::limits::{CounterAdd, Counters, Limiter, Rate};
    let t = TestRedis::new();
    let r = Arc::new(state(&t));
    let add = |key: &str, index, by| CounterAdd {
        key: key.into(),
        window_ms: 10_000,
        index,
        by,
    };
    let counts = r
        .add(&[add("send:a", 7, 3), add("send:b", 7, 1)])
        .await
        .unwrap();
    assert_eq!(counts, vec![(0, 3), (0, 1)]);
    let counts = r
        .add(&[add("send:a", 7, 2), add("send:a", 8, 1)])
        .await
        .unwrap();
    assert_eq!(
        counts,
        vec![(0, 5), (5, 1)],
        "the previous window is read back"
    );
    let mut c = redis::Client::open(t.url.as_str()).unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{}:rl:10000:8:send:a", t.prefix))
        .query(&mut c)
        .unwrap();
    assert!(ttl > 0 && ttl <= 20_000, "{ttl}");

    // Through two limiters, as two gateways: a limit of 10 holds in sum.
    let rate = Rate::per_minute(10);
    let (g1, g2) = (Limiter::start(r.clone()), Limiter::start(r.clone()));
    for _ in 0..6 {
        g1.check("login:x", rate).unwrap();
    }
    g1.sync().await;
    g2.sync().await;
    g2.check("login:x", rate).unwrap();
    g2.sync().await;
    let admitted = (0..10)
        .filter(|_| g2.check("login:x", rate).is_ok())
        .count();
    assert_eq!(admitted, 3, "6 on g1 and 1 + 3 on g2");
}

#[tokio::test]
async fn the_push_ledger_remembers_what_was_sent_for_a_day() {
    use parley_core::push::PushLedger;
    let t = TestRedis::new();
    let r = state(&t);
    let ids: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
    assert_eq!(r.unsent(&ids).await.unwrap(), [true, true, true]);
    r.sent(&ids[..2]).await.unwrap();
    assert_eq!(r.unsent(&ids).await.unwrap(), [false, false, true]);
    assert!(r.unsent(&[]).await.unwrap().is_empty());
    r.sent(&[]).await.unwrap();
    let mut c = redis::Client::open(t.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(r.keys().push_sent("n1"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        (86_000..=86_400).contains(&ttl),
        "expires after a day: {ttl}"
    );
}
