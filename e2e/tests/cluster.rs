//! Parley as a cluster of real processes: 3 gateways and 2 chat services on
//! PostgreSQL, Redis and RabbitMQ, driven by the SDK. Each test runs its own
//! cluster (database, key prefix, broker names), injects its fault, and
//! prints its ledger; the ledger must be clean: every send acked, nothing
//! lost, doubled or out of order.

use std::time::{Duration, Instant};

use parley_client::{Client, Event};
use parley_e2e::ledger::Expect;
use parley_e2e::services::{PrivatePostgres, PrivateRabbit, PrivateRedis};
use parley_e2e::{Cluster, Ledger, Recorder, Spec, connect, http_get};
use parley_proto::pb;

#[path = "cluster/chaos.rs"]
mod chaos;
#[path = "cluster/kubernetes.rs"]
mod kubernetes;
#[path = "cluster/media.rs"]
mod media;
#[path = "cluster/network.rs"]
mod network;
#[path = "cluster/push.rs"]
mod push;

const SETTLE: Duration = Duration::from_secs(30);

/// 3 gateways and 2 chat services, running the real binaries' code.
fn spec() -> Spec {
    Spec::new(env!("CARGO_BIN_EXE_parley-e2e-node"))
}

/// What one stream of sends did.
struct Streamed {
    sent: usize,
    /// What each acked message owes its receivers.
    acked: Vec<Expect>,
    /// The client_msg_id of each acked message.
    ids: Vec<String>,
    /// When each acked message's send began.
    began: Vec<Instant>,
}

/// Sends `n` messages to `conv`, one after another with `pause` between.
async fn stream(
    from: Client,
    conv: u64,
    n: usize,
    pause: Duration,
    receivers: Vec<String>,
) -> Streamed {
    let mut acked = Vec::new();
    let mut ids = Vec::new();
    let mut began = Vec::new();
    for i in 0..n {
        let id = parley_client::sdk::new_client_msg_id();
        let start = Instant::now();
        match from
            .send_with_id(id.clone(), conv, pb::Content::text(format!("m{i}")))
            .await
        {
            Ok(ack) => {
                acked.push(Expect {
                    msg_id: ack.msg_id,
                    receivers: receivers.clone(),
                });
                ids.push(id);
                began.push(start);
            }
            Err(e) => eprintln!("send {i} failed: {e}"),
        }
        tokio::time::sleep(pause).await;
    }
    Streamed {
        sent: n,
        acked,
        ids,
        began,
    }
}

/// Connects ann's and bob's phones (recorded as "ann/phone" and
/// "bob/phone") and opens their direct conversation.
async fn pair(
    rec: &Recorder,
    ann: parley_client::ClientConfig,
    bob: parley_client::ClientConfig,
) -> (Client, Client, u64) {
    let ann = connect(ann, rec, "ann/phone").await.unwrap();
    let bob = connect(bob, rec, "bob/phone").await.unwrap();
    let direct = ann.open_direct("bob").await.unwrap().id;
    (ann, bob, direct)
}

/// `a` and `b` (the devices named in `devices`, in that order) each send
/// `n` messages to `conv`, `pause` apart, for the other to receive.
fn both_ways(
    a: &Client,
    b: &Client,
    conv: u64,
    n: usize,
    pause: Duration,
    devices: [&str; 2],
) -> Vec<tokio::task::JoinHandle<Streamed>> {
    vec![
        tokio::spawn(stream(
            a.clone(),
            conv,
            n,
            pause,
            others(&devices, devices[0]),
        )),
        tokio::spawn(stream(
            b.clone(),
            conv,
            n,
            pause,
            others(&devices, devices[1]),
        )),
    ]
}

/// Connects device `name` ("user/device") to gateway `i` and records what
/// it receives under that name.
async fn join(c: &Cluster, i: usize, token: &str, name: &str, rec: &Recorder) -> Client {
    let (_, device) = name.split_once('/').expect("user/device");
    connect(c.at_gateway(i, token, device), rec, name)
        .await
        .unwrap()
}

/// Every device name but `sender`.
fn others(devices: &[&str], sender: &str) -> Vec<String> {
    devices
        .iter()
        .filter(|d| **d != sender)
        .map(|d| (*d).to_owned())
        .collect()
}

/// What a run of streams did, once its ledger settled.
struct Traffic {
    ledger: Ledger,
    /// The client_msg_id of each acked message.
    ids: Vec<String>,
    /// Each acked message, and when its send began.
    acked: Vec<(Instant, Expect)>,
}

/// Runs the streams and settles the ledger.
async fn traffic(rec: &Recorder, streams: Vec<tokio::task::JoinHandle<Streamed>>) -> Traffic {
    let mut sent = 0;
    let mut acked = Vec::new();
    let mut ids = Vec::new();
    for s in streams {
        let s = s.await.expect("a stream task");
        sent += s.sent;
        acked.extend(s.began.into_iter().zip(s.acked));
        ids.extend(s.ids);
    }
    let expected: Vec<Expect> = acked.iter().map(|(_, e)| e.clone()).collect();
    Traffic {
        ledger: Ledger::settle(sent, &expected, rec, SETTLE).await,
        ids,
        acked,
    }
}

/// From the start of each send of `acked` to its arrival on each device
/// that must receive it, for the sends that began at or after `since`,
/// sorted.
fn delivery_delays(rec: &Recorder, acked: &[(Instant, Expect)], since: Instant) -> Vec<Duration> {
    let mut delays = Vec::new();
    for (began, expect) in acked.iter().filter(|(b, _)| *b >= since) {
        for device in &expect.receivers {
            let log = rec.log(device);
            if let Some(i) = log.messages.iter().position(|m| m.msg_id == expect.msg_id) {
                delays.push(log.received_at[i].saturating_duration_since(*began));
            }
        }
    }
    delays.sort();
    delays
}

/// "p50 / p99 / max" of sorted `delays`, in milliseconds.
fn percentiles(delays: &[Duration]) -> String {
    let at = |q: f64| {
        let i = ((delays.len() as f64 * q).ceil() as usize).clamp(1, delays.len()) - 1;
        delays[i].as_secs_f64() * 1e3
    };
    if delays.is_empty() {
        return "none".to_owned();
    }
    format!(
        "{} deliveries, p50 {:.1} / p99 {:.1} / max {:.1} ms",
        delays.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn check(ledger: &Ledger, name: &str, cluster: &Cluster) {
    ledger.print(name);
    assert!(
        ledger.is_clean(),
        "{name}: ledger not clean: {ledger:?}\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_and_group_messages_cross_gateways_exactly_once_in_order() {
    let c = Cluster::start(spec()).await.unwrap();
    let t = c.users(&["ann", "bob", "cyd", "dan"]).await.unwrap();
    let rec = Recorder::default();
    // Six devices over three gateways; ann and dan have two each.
    let ann_phone = join(&c, 0, &t[0], "ann/phone", &rec).await;
    let _ann_laptop = join(&c, 1, &t[0], "ann/laptop", &rec).await;
    let bob = join(&c, 1, &t[1], "bob/phone", &rec).await;
    let cyd = join(&c, 2, &t[2], "cyd/phone", &rec).await;
    let dan = join(&c, 2, &t[3], "dan/phone", &rec).await;
    let _dan_tablet = join(&c, 0, &t[3], "dan/tablet", &rec).await;

    let direct = ann_phone.open_direct("bob").await.unwrap().id;
    let group = ann_phone
        .create_group("crew", &["bob", "cyd", "dan"])
        .await
        .unwrap()
        .id;
    let pair = ["ann/phone", "ann/laptop", "bob/phone"];
    let all = [
        "ann/phone",
        "ann/laptop",
        "bob/phone",
        "cyd/phone",
        "dan/phone",
        "dan/tablet",
    ];
    let pause = Duration::from_millis(2);
    let streams = vec![
        tokio::spawn(stream(
            ann_phone.clone(),
            direct,
            40,
            pause,
            others(&pair, "ann/phone"),
        )),
        tokio::spawn(stream(
            bob.clone(),
            direct,
            40,
            pause,
            others(&pair, "bob/phone"),
        )),
        tokio::spawn(stream(
            ann_phone.clone(),
            group,
            30,
            pause,
            others(&all, "ann/phone"),
        )),
        tokio::spawn(stream(
            cyd.clone(),
            group,
            30,
            pause,
            others(&all, "cyd/phone"),
        )),
        tokio::spawn(stream(
            dan.clone(),
            group,
            30,
            pause,
            others(&all, "dan/phone"),
        )),
    ];
    let ledger = traffic(&rec, streams).await.ledger;
    check(&ledger, "cross-gateway", &c);

    // Every device of the group saw its messages in one and the same order.
    let order = |device: &str| -> Vec<u64> {
        rec.log(device)
            .messages
            .iter()
            .filter(|m| m.conversation_id == group)
            .map(|m| m.msg_id)
            .collect()
    };
    let reference = order("ann/laptop");
    assert_eq!(
        reference.len(),
        30 * 3 + 1,
        "the group's messages and its creation"
    );
    for d in ["bob/phone", "dan/tablet"] {
        assert_eq!(order(d), reference, "{d} saw another order");
    }

    // Bob (gateway 1) reads the group and the direct conversation: every
    // other member's devices hear of it on their gateways, through the
    // broker, and the lists show it.
    let newest = |conv: u64| {
        rec.log("bob/phone")
            .messages
            .iter()
            .filter(|m| m.conversation_id == conv)
            .map(|m| m.seq)
            .max()
            .unwrap()
    };
    let (group_seq, direct_seq) = (newest(group), newest(direct));
    assert_eq!(bob.mark_read(group, group_seq).await.unwrap(), group_seq);
    bob.mark_read(direct, direct_seq).await.unwrap();
    let told = |device: &str, conv: u64, seq: u64| {
        rec.log(device)
            .receipts
            .iter()
            .any(|r| r.conversation_id == conv && r.user == "bob" && r.seq == seq)
    };
    let heard = tokio::time::timeout(SETTLE, async {
        loop {
            let group_told = ["ann/laptop", "cyd/phone", "dan/tablet", "dan/phone"]
                .iter()
                .all(|d| told(d, group, group_seq));
            if group_told && told("ann/phone", direct, direct_seq) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "a read receipt did not reach every member's devices"
    );
    let listed = cyd.conversations(0, "").await.unwrap();
    let in_group = listed.conversations.iter().find(|c| c.id == group).unwrap();
    assert_eq!(in_group.unread_count, group_seq - in_group.read_seq);
    let listed = ann_phone.conversations(0, "").await.unwrap();
    let with_bob = listed
        .conversations
        .iter()
        .find(|c| c.id == direct)
        .unwrap();
    assert_eq!(with_bob.peer_read_seq, direct_seq);
    let r = ann_phone.receipts(group, group_seq).await.unwrap();
    assert!(r.readers.contains(&"bob".to_owned()), "{r:?}");

    // Ann edits one of her group messages: the group's devices on every
    // gateway get it again, rewritten, and a resend of it is still a resend.
    let mine = rec
        .log("ann/laptop")
        .messages
        .iter()
        .find(|m| m.conversation_id == group && m.sender_id == "ann" && m.seq > 1)
        .cloned()
        .unwrap();
    ann_phone.edit(group, mine.seq, "edited").await.unwrap();
    let rewritten = |device: &str| {
        rec.log(device)
            .messages
            .iter()
            .any(|m| m.msg_id == mine.msg_id && m.edited_at_ms != 0)
    };
    let heard = tokio::time::timeout(SETTLE, async {
        while !["bob/phone", "cyd/phone", "dan/tablet", "ann/laptop"]
            .iter()
            .all(|d| rewritten(d))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "an edit did not reach every member's devices"
    );
    let again = ann_phone
        .send_with_id(
            mine.client_msg_id.clone(),
            group,
            mine.content.clone().unwrap(),
        )
        .await
        .unwrap();
    assert!(again.duplicate && again.msg_id == mine.msg_id, "{again:?}");

    // Ann's phone logs in again on another gateway: its connection on
    // gateway 0 gets DEVICE_REPLACED (the SDK stops, it does not fight
    // back), and the new one is the phone from then on.
    let (phone, mut phone_ev) = Client::connect(c.at_gateway(2, &t[0], "phone"))
        .await
        .unwrap();
    let replaced = tokio::time::timeout(SETTLE, async {
        while !matches!(
            ann_phone.open_direct("bob").await,
            Err(parley_client::ClientError::Closed)
        ) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        replaced.is_ok(),
        "the phone's connection on gateway 0 stays open"
    );
    let ack = bob
        .send(direct, pb::Content::text("to the new phone"))
        .await
        .unwrap();
    assert!(
        receives(&mut phone_ev, ack.msg_id).await,
        "the new connection gets what comes next"
    );
    phone.close().await;
}

/// Whether `events` brings message `msg_id` within [`SETTLE`].
async fn receives(
    events: &mut tokio::sync::mpsc::Receiver<parley_client::Event>,
    msg_id: u64,
) -> bool {
    let found = async {
        while let Some(ev) = events.recv().await {
            if let parley_client::Event::Message { message, .. } = ev
                && message.msg_id == msg_id
            {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(SETTLE, found).await.unwrap_or(false)
}

/// Which gateway holds the most sessions, among `candidates`.
async fn busiest(c: &Cluster, candidates: &[usize]) -> usize {
    let mut best = (candidates[0], -1i64);
    for &i in candidates {
        let sessions = gauge(c, i, "parley_gateway_sessions").await;
        if sessions > best.1 {
            best = (i, sessions);
        }
    }
    best.0
}

/// A gauge of gateway `i`, read from its /metrics.
async fn gauge(c: &Cluster, i: usize, name: &str) -> i64 {
    let (_, body) = http_get(c.gateways[i].ops, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_its_clients_reconnect_through_the_route_lookup() {
    let c = Cluster::start(spec()).await.unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let rec = Recorder::default();
    // Everyone comes in through gw2's route lookup and lands where it says.
    let devices = ["ann/phone", "ann/laptop", "bob/phone", "bob/laptop"];
    let mut clients = Vec::new();
    for d in devices {
        let (user, device) = d.split_once('/').unwrap();
        let token = if user == "ann" { &t[0] } else { &t[1] };
        clients.push(
            connect(c.via_route(2, token, device), &rec, d)
                .await
                .unwrap(),
        );
    }
    let direct = clients[0].open_direct("bob").await.unwrap().id;
    let pause = Duration::from_millis(20);
    let streams = vec![
        tokio::spawn(stream(
            clients[0].clone(),
            direct,
            200,
            pause,
            others(&devices, "ann/phone"),
        )),
        tokio::spawn(stream(
            clients[2].clone(),
            direct,
            200,
            pause,
            others(&devices, "bob/phone"),
        )),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = busiest(&c, &[0, 1]).await;
    let mut c = c;
    c.gateways[victim].kill9().await;
    println!("killed gw{victim} (SIGKILL) during traffic");

    // Its lease, and with it its users' presence, runs out on its own.
    let redis = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let name = format!("gw{victim}");
    let mut expired = false;
    for _ in 0..100 {
        if redis.leases(&[name.as_str()]).await.unwrap().is_empty() {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the dead gateway's lease expired");

    let ledger = traffic(&rec, streams).await.ledger;
    check(&ledger, "gateway-killed", &c);
    let reconnected = devices.iter().filter(|d| rec.log(d).connects > 1).count();
    println!("devices that reconnected: {reconnected}");
    assert!(reconnected > 0, "someone was on the killed gateway");
}

/// Each gateway's sessions, from its /metrics.
async fn spread(c: &Cluster) -> Vec<i64> {
    let mut out = Vec::new();
    for i in 0..c.gateways.len() {
        out.push(gauge(c, i, "parley_gateway_sessions").await);
    }
    out
}

/// Whether every count is within `percent` of their mean.
fn even(counts: &[i64], percent: i64) -> bool {
    let mean = counts.iter().sum::<i64>() / counts.len() as i64;
    counts
        .iter()
        .all(|c| (c - mean).abs() * 100 <= mean * percent)
}

/// Waits (up to a minute) for `check` on the spread; the last spread seen.
async fn spread_until(c: &Cluster, check: impl Fn(&[i64]) -> bool) -> (bool, Vec<i64>) {
    let mut last = Vec::new();
    for _ in 0..600 {
        last = spread(c).await;
        if check(&last) {
            return (true, last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (false, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_evenly_and_a_new_gateway_is_filled_by_rebalancing() {
    // Eleven devices per user (the default cap is ten).
    let spec = Spec {
        chats: 1,
        env: vec![("PARLEY_LIMIT_DEVICES_PER_USER".to_owned(), "11".to_owned())],
        ..spec()
    };
    let mut c = Cluster::start(spec).await.unwrap();
    let names: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let mut ids: Vec<&str> = names.iter().map(String::as_str).collect();
    ids.extend(["ann", "bob"]);
    let tokens = c.users(&ids).await.unwrap();
    // Everyone comes in through one entry: gateway 0's public lookup.
    let entry = c.gateways[0].route_url();
    let via_entry = |token: &str, device: &str| {
        let mut cfg = parley_client::ClientConfig::new("", token, device);
        cfg.routes = vec![entry.clone()];
        cfg
    };
    let mut clients = Vec::new();
    for token in &tokens[..30] {
        for d in 0..10 {
            clients.push(
                Client::connect(via_entry(token, &format!("d{d}")))
                    .await
                    .unwrap()
                    .0,
            );
        }
    }
    let (spread_out, counts) = spread_until(&c, |s| s.iter().sum::<i64>() == 300).await;
    assert!(spread_out);
    println!("300 clients over 3 gateways: {counts:?}");
    assert!(even(&counts, 10), "not within 10% of even: {counts:?}");

    // A fourth gateway joins and takes the new connections first.
    let new = c.add_gateway().await.unwrap();
    let new_addr = c.gateways[new].addr.to_string();
    let mut routed = false;
    for _ in 0..100 {
        let (_, body) = http_get(c.gateways[0].route.unwrap(), "/route")
            .await
            .unwrap();
        if body.contains(&new_addr) {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(routed, "the new gateway never entered the routing table");
    for token in &tokens[..30] {
        clients.push(Client::connect(via_entry(token, "late")).await.unwrap().0);
    }
    let (all_in, counts) = spread_until(&c, |s| s.iter().sum::<i64>() == 330).await;
    assert!(all_in, "330 sessions: {counts:?}");
    println!("30 more after gw{new} joined: {counts:?}");
    assert!(
        counts[new] >= 27,
        "the new gateway took the new clients first: {counts:?}"
    );

    // Rebalancing, decided by the operator's own function from the leases,
    // asked through Redis as the operator asks, with traffic going on.
    let rec = Recorder::default();
    let (ann, bob, direct) = pair(
        &rec,
        via_entry(&tokens[30], "phone"),
        via_entry(&tokens[31], "phone"),
    )
    .await;
    let streams = both_ways(
        &ann,
        &bob,
        direct,
        100,
        Duration::from_millis(30),
        ["ann/phone", "bob/phone"],
    );
    let redis = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let gws: Vec<String> = (0..c.gateways.len()).map(|i| format!("gw{i}")).collect();
    let gw_refs: Vec<&str> = gws.iter().map(String::as_str).collect();
    let loads: Vec<parley_operator::scaling::PodLoad> = redis
        .leases(&gw_refs)
        .await
        .unwrap()
        .into_iter()
        .map(|l| parley_operator::scaling::PodLoad {
            name: l.gateway,
            connections: Some(l.connections),
            ready: true,
            draining: false,
            terminating: false,
        })
        .collect();
    let policy = parley_operator::rebalance::Rebalance {
        rate: 30,
        tolerance_percent: 10,
        period: Duration::from_secs(30),
    };
    let round =
        parley_operator::rebalance::plan(&policy, &loads, None, std::time::SystemTime::now());
    println!("the operator's round: {round:?}");
    assert!(!round.is_empty(), "uneven enough to rebalance: {loads:?}");
    let asked_at = std::time::Instant::now();
    for s in &round {
        redis
            .request_shed(&s.pod, s.count, s.rate, policy.period)
            .await
            .unwrap();
    }
    let (evened, counts) = spread_until(&c, |s| s.iter().sum::<i64>() == 332 && even(s, 10)).await;
    println!(
        "after rebalancing ({} clients asked at {}/s in all): {counts:?} in {:?}",
        round.iter().map(|s| s.count).sum::<u64>(),
        policy.rate,
        asked_at.elapsed()
    );
    assert!(evened, "not within 10% of even: {counts:?}");
    let ledger = traffic(&rec, streams).await.ledger;
    check(&ledger, "rebalancing", &c);
    drop(clients);
}

/// Sends `signal` (STOP, CONT) to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_loses_its_clients_within_the_pong_deadline_and_leaves_the_route_answers()
{
    let mut spec = spec();
    // Leases outlive the test's window: only the probe can take the frozen
    // gateway out of the routing table.
    spec.lease_secs = 10;
    spec.env.extend([
        // Pings every second, a second for each Pong.
        ("PARLEY_IDLE_TIMEOUT_SECS".to_owned(), "3".to_owned()),
        ("PARLEY_PONG_TIMEOUT_MS".to_owned(), "1000".to_owned()),
    ]);
    let c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    // The lookup's own listener serves the lookup and nothing else.
    let route = c.gateways[0].route.unwrap();
    assert_eq!(http_get(route, "/route").await.unwrap().0, 200);
    assert_eq!(http_get(route, "/metrics").await.unwrap().0, 404);
    let routes: Vec<String> = c.gateways.iter().map(|g| g.route_url()).collect();
    let mut cfg = parley_client::ClientConfig::new("", &t[0], "phone");
    cfg.routes = routes;
    let (ann, mut ann_ev) = Client::connect(cfg).await.unwrap();
    let frozen = busiest(&c, &[0, 1, 2]).await;
    assert_eq!(gauge(&c, frozen, "parley_gateway_sessions").await, 1);
    let other = (frozen + 1) % 3;
    let bob = Client::connect(c.at_gateway(other, &t[1], "phone"))
        .await
        .unwrap()
        .0;
    let direct = bob.open_direct("ann").await.unwrap().id;

    // What the first login said.
    while ann_ev.try_recv().is_ok() {}
    let pid = c.gateways[frozen].proc.as_ref().unwrap().pid().unwrap();
    signal(pid, "STOP");
    let frozen_at = std::time::Instant::now();
    println!("froze gw{frozen} (SIGSTOP)");

    // The SDK takes the silence for what it is, and logs in elsewhere.
    let moved = tokio::time::timeout(SETTLE, async {
        let mut reason = None;
        loop {
            match ann_ev.recv().await.expect("the client stays alive") {
                parley_client::Event::Disconnected { reason: r } => reason = Some(r),
                parley_client::Event::Connected { .. } => return reason,
                _ => {}
            }
        }
    })
    .await
    .expect("the client of the frozen gateway never got elsewhere");
    let reason = moved.expect("a disconnect before the new login");
    println!(
        "the client left the frozen gateway ({reason}) and was logged in elsewhere after {:?}",
        frozen_at.elapsed()
    );
    assert!(reason.contains("no Pong"), "{reason}");
    let ack = bob
        .send(direct, pb::Content::text("are you there?"))
        .await
        .unwrap();
    assert!(
        receives(&mut ann_ev, ack.msg_id).await,
        "the moved client gets what comes next"
    );

    // A client reports the frozen gateway to a lookup: the lookup probes it
    // and takes it out of everyone's answers, while its lease still lives.
    let frozen_addr = c.gateways[frozen].addr.to_string();
    let ops = c.gateways[other].ops;
    let (status, _) = http_get(ops, &format!("/route?failed={frozen_addr}"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut gone = false;
    for _ in 0..50 {
        let (_, body) = http_get(ops, "/route").await.unwrap();
        if !body.contains(&frozen_addr) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the frozen gateway is still handed out");
    let redis = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let name = format!("gw{frozen}");
    assert!(
        !redis.leases(&[name.as_str()]).await.unwrap().is_empty(),
        "the probe, not the lease's expiry, took it out"
    );
    signal(pid, "CONT");
    ann.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_moves_clients_away_at_its_rate_and_loses_nothing() {
    let c = Cluster::start(spec()).await.unwrap();
    let users = ["ann", "bob", "cyd", "dan"];
    let t = c.users(&users).await.unwrap();
    let rec = Recorder::default();
    let mut devices = Vec::new();
    let mut clients = Vec::new();
    for (user, token) in users.iter().zip(&t) {
        for device in ["phone", "laptop", "tablet"] {
            let name = format!("{user}/{device}");
            clients.push(
                connect(c.via_route(2, token, device), &rec, &name)
                    .await
                    .unwrap(),
            );
            devices.push(name);
        }
    }
    let of = |users: [&str; 2]| -> Vec<&str> {
        devices
            .iter()
            .filter(|d| users.iter().any(|u| d.starts_with(&format!("{u}/"))))
            .map(String::as_str)
            .collect()
    };
    let (ab, cd) = (of(["ann", "bob"]), of(["cyd", "dan"]));
    let ann_bob = clients[0].open_direct("bob").await.unwrap().id;
    let cyd_dan = clients[6].open_direct("dan").await.unwrap().id;
    let pause = Duration::from_millis(20);
    let streams = vec![
        tokio::spawn(stream(
            clients[0].clone(),
            ann_bob,
            250,
            pause,
            others(&ab, "ann/phone"),
        )),
        tokio::spawn(stream(
            clients[9].clone(),
            cyd_dan,
            250,
            pause,
            others(&cd, "dan/phone"),
        )),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;

    // What the operator does when it scales a gateway away.
    let victim = busiest(&c, &[0, 1, 2]).await;
    let held = gauge(&c, victim, "parley_gateway_connections").await;
    let rate = 4;
    let redis = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let asked = std::time::Instant::now();
    redis
        .request_drain(&format!("gw{victim}"), rate, Duration::from_secs(60))
        .await
        .unwrap();
    let mut left = held;
    while left > 0 && asked.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = gauge(&c, victim, "parley_gateway_connections").await;
    }
    let took = asked.elapsed();
    println!("gw{victim} drained {held} clients at {rate}/s in {took:?}");
    assert_eq!(left, 0, "every client moved away\n{}", c.logs());
    // A lower bound only: tickets are issued one per 1/rate seconds.
    let floor = Duration::from_millis(1000 / rate as u64) * (held.max(1) as u32 - 1);
    assert!(
        took >= floor,
        "{held} clients at {rate}/s took only {took:?}"
    );
    let (status, body) = http_get(c.gateways[victim].ops, "/readyz").await.unwrap();
    assert_eq!(status, 503, "a draining gateway is not ready: {body}");
    let routed: Vec<String> = redis
        .routes()
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert!(!routed.contains(&c.gateways[victim].addr.to_string()));

    let ledger = traffic(&rec, streams).await.ledger;
    check(&ledger, "drained", &c);
    let moved = devices.iter().filter(|d| rec.log(d).connects > 1).count();
    assert!(
        moved as i64 >= held,
        "{moved} devices reconnected, {held} were on gw{victim}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_service_killed_mid_stream_costs_retries_not_messages() {
    let c = Cluster::start(spec()).await.unwrap();
    let t = c.users(&["ann", "bob", "cyd"]).await.unwrap();
    let rec = Recorder::default();
    let ann = join(&c, 0, &t[0], "ann/phone", &rec).await;
    let bob = join(&c, 1, &t[1], "bob/phone", &rec).await;
    let cyd = join(&c, 2, &t[2], "cyd/phone", &rec).await;
    let group = ann.create_group("g", &["bob", "cyd"]).await.unwrap().id;
    let all = ["ann/phone", "bob/phone", "cyd/phone"];
    let pause = Duration::from_millis(5);
    let streams = vec![
        tokio::spawn(stream(
            ann.clone(),
            group,
            200,
            pause,
            others(&all, "ann/phone"),
        )),
        tokio::spawn(stream(
            bob.clone(),
            group,
            200,
            pause,
            others(&all, "bob/phone"),
        )),
        tokio::spawn(stream(
            cyd.clone(),
            group,
            200,
            pause,
            others(&all, "cyd/phone"),
        )),
    ];
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut c = c;
    c.chats[0].kill9().await;
    println!("killed chat0 (SIGKILL) during traffic");
    let Traffic { ledger, ids, .. } = traffic(&rec, streams).await;
    check(&ledger, "chat-service-killed", &c);

    // Stored once each: the history holds every send exactly once.
    let mut stored = Vec::new();
    let mut from = 0;
    loop {
        let page = ann
            .history(group, from, pb::Direction::Forward, 200)
            .await
            .unwrap();
        from = page.messages.last().map_or(from, |m| m.seq);
        stored.extend(
            page.messages
                .into_iter()
                .filter(|m| !m.client_msg_id.starts_with('~'))
                .map(|m| m.client_msg_id),
        );
        if !page.has_more {
            break;
        }
    }
    stored.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(stored.len(), 600, "every send stored");
    assert_eq!(stored, expected, "each send stored exactly once");
}

/// Two users on different gateways exchanging messages while `fault` runs;
/// answers what the fault answered, what each device received and when
/// each send began.
async fn traffic_through_a_fault<F, Fut, T>(
    c: &Cluster,
    name: &str,
    fault: F,
) -> (T, Recorder, Vec<(Instant, Expect)>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let rec = Recorder::default();
    let ann = join(c, 0, &t[0], "ann/phone", &rec).await;
    let _ann2 = join(c, 2, &t[0], "ann/laptop", &rec).await;
    let bob = join(c, 1, &t[1], "bob/phone", &rec).await;
    let direct = ann.open_direct("bob").await.unwrap().id;
    let devices = ["ann/phone", "ann/laptop", "bob/phone"];
    let pause = Duration::from_millis(20);
    let streams = vec![
        tokio::spawn(stream(
            ann.clone(),
            direct,
            250,
            pause,
            others(&devices, "ann/phone"),
        )),
        tokio::spawn(stream(
            bob.clone(),
            direct,
            250,
            pause,
            others(&devices, "bob/phone"),
        )),
    ];
    tokio::time::sleep(Duration::from_millis(800)).await;
    let answer = fault().await;
    let done = traffic(&rec, streams).await;
    check(&done.ledger, name, c);
    (answer, rec, done.acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_during_traffic_loses_nothing() {
    let mut rabbit = PrivateRabbit::start().await.unwrap();
    let spec = Spec {
        amqp_url: rabbit.url(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    traffic_through_a_fault(&c, "rabbitmq-restarted", || async {
        rabbit.restart(Duration::from_millis(500)).await.unwrap();
        println!("rabbitmq restarted during traffic");
    })
    .await;
    drop(c);
    rabbit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_during_traffic_loses_nothing() {
    let mut redis = PrivateRedis::start().await.unwrap();
    // Lease writes at the default pace: a gateway that noticed a restart
    // only at its next one would leave its devices without presence for
    // up to 5 s.
    let spec = Spec {
        redis_url: redis.url(),
        lease_secs: 5,
        env: std::env::var("PARLEY_PRESENCE_SETTLE_MS")
            .map(|v| vec![("PARLEY_PRESENCE_SETTLE_MS".to_owned(), v)])
            .unwrap_or_default(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    let (back, rec, acked) = traffic_through_a_fault(&c, "redis-restarted", || async {
        redis.restart(Duration::from_millis(500)).await.unwrap();
        println!("redis restarted (empty) during traffic");
        Instant::now()
    })
    .await;
    // Live delivery does not wait for the gateways to write presence back:
    // from a second after Redis answers, sends arrive as fast as ever
    // (before deliveries went to every gateway meanwhile, they waited for
    // the gateways' next lease write and a catch-up, 5 to 8 s).
    let settled = back + Duration::from_secs(1);
    let early = delivery_delays(&rec, &acked, back);
    let late = delivery_delays(&rec, &acked, settled);
    println!(
        "redis-restarted: delivery from Redis answering: {}",
        percentiles(&early)
    );
    println!(
        "redis-restarted: delivery from a second later: {}",
        percentiles(&late)
    );
    assert!(late.len() > 100, "traffic went on after Redis came back");
    let p99 = late[late.len() * 99 / 100];
    assert!(
        p99 < Duration::from_secs(1),
        "live delivery resumes within a second of Redis answering: {}",
        percentiles(&late)
    );
}

/// What a client and the probes saw while PostgreSQL was away.
#[derive(Debug)]
struct Outage {
    /// How long a request (not a send: the SDK retries those) took to be
    /// refused, and with what.
    refused_in: Duration,
    refusal: Option<pb::ErrorCode>,
    /// A chat service's `/readyz` during the outage.
    readiness: (u16, String),
}

/// Refuses a request during an outage and reads a chat service's readiness.
async fn probe_outage(c: &Cluster, probe: &Client) -> Outage {
    let start = Instant::now();
    let refusal = match probe.open_direct("ann").await {
        Ok(_) => None,
        Err(parley_client::ClientError::Server { code, .. }) => Some(code),
        Err(e) => panic!("a refusal from the server, not {e}"),
    };
    let refused_in = start.elapsed();
    let readiness = http_get(c.chats[0].ops, "/readyz").await.unwrap();
    Outage {
        refused_in,
        refusal,
        readiness,
    }
}

/// PostgreSQL stopped during traffic (a fast shutdown: sessions end, what
/// is in flight rolls back) and started again, then crashed (an immediate
/// shutdown: recovery at start) and started again. Meanwhile requests are
/// refused with UNAVAILABLE within the database deadline, chat services
/// report themselves unready, the SDK's sends wait and retry, and the
/// service resumes by itself: nothing acked is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_crashed_during_traffic_loses_nothing() {
    let mut pg = PrivatePostgres::start().await.unwrap();
    let spec = Spec {
        database_url: pg.url(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["cyd"]).await.unwrap();
    let rec = Recorder::default();
    let probe = join(&c, 0, &t[0], "cyd/phone", &rec).await;
    let (outages, _, _) = traffic_through_a_fault(&c, "postgres-stopped-and-crashed", || async {
        let mut seen = Vec::new();
        for crash in [false, true] {
            if crash {
                pg.crash().await.unwrap();
            } else {
                pg.stop().await.unwrap();
            }
            seen.push(probe_outage(&c, &probe).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
            pg.start_again().await.unwrap();
            println!(
                "postgres {} and started again during traffic",
                if crash { "crashed" } else { "stopped" }
            );
            tokio::time::sleep(Duration::from_millis(1_000)).await;
        }
        seen
    })
    .await;
    for (o, what) in outages.iter().zip(["stopped", "crashed"]) {
        println!(
            "postgres {what}: a request refused in {:.0} ms with {:?}; chat /readyz {} {:?}",
            o.refused_in.as_secs_f64() * 1e3,
            o.refusal,
            o.readiness.0,
            o.readiness.1.trim()
        );
        assert_eq!(o.refusal, Some(pb::ErrorCode::Unavailable), "{what}");
        assert!(
            o.refused_in < Duration::from_secs(5),
            "{what}: refused within the deadline, not hung"
        );
        assert_eq!(o.readiness.0, 503, "{what}: {}", o.readiness.1);
        assert!(o.readiness.1.contains("postgres"), "{what}");
    }
    // Everything is back by itself.
    probe.open_direct("ann").await.unwrap();
    let (status, _) = http_get(c.chats[0].ops, "/readyz").await.unwrap();
    assert_eq!(status, 200);
}

/// `url` with `password` in its user part (`scheme://user@host` or
/// `scheme://host`).
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    match rest.split_once('@') {
        Some((user, host)) => format!("{scheme}://{user}:{password}@{host}"),
        None => format!("{scheme}://:{password}@{rest}"),
    }
}

/// No secret reaches a log, however the run goes: every backend URL carries
/// a password, Redis restarts mid-traffic (its errors get logged), a client
/// logs in with a garbled token and another with a forged one, and every
/// process logs at debug. Then every line of every process is searched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log() {
    let secret = |what: &str| format!("{what}-{:016x}", rand::random::<u64>());
    let (redis_pw, db_pw, internal) = (secret("redispw"), secret("dbpw"), secret("internal"));
    let mut redis = PrivateRedis::start_with_password(&redis_pw).await.unwrap();
    // The shared PostgreSQL trusts local connections: the password is
    // carried in every URL but never asked for.
    let database_url = with_password(&parley_store::testing::database_url(), &db_pw);
    let spec = Spec {
        database_url,
        redis_url: redis.url(),
        env: vec![("PARLEY_INTERNAL_KEY".to_owned(), internal.clone())],
        ..spec()
    };
    let amqp_url = spec.amqp_url.clone();
    let c = Cluster::start(spec).await.unwrap();
    traffic_through_a_fault(&c, "secrets", || async {
        redis.restart(Duration::from_millis(500)).await.unwrap();
    })
    .await;
    let t = c.users(&["eve"]).await.unwrap();
    let eve = join(&c, 1, &t[0], "eve/phone", &Recorder::default()).await;
    eve.open_direct("ann").await.unwrap();
    let garbled = Client::connect(c.at_gateway(0, "garbled.token.here", "x")).await;
    assert!(garbled.is_err());
    let forged = parley_core::TokenKeys::new(&[9; 32])
        .unwrap()
        .issue("ann", parley_core::now_ms() / 1000, 600)
        .unwrap();
    assert!(
        Client::connect(c.at_gateway(2, &forged, "y"))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = c.full_logs();
    assert!(
        logs.contains("redis"),
        "the restart of Redis was logged:\n{logs}"
    );
    let mut secrets = vec![
        ("the redis password", redis_pw.clone()),
        ("the database password", db_pw.clone()),
        ("the internal key", internal.clone()),
        ("the admin key", c.admin_key.clone()),
        ("the token secret", c.token_secret.clone()),
        ("a device token", t[0].clone()),
        ("a forged token", forged.clone()),
        ("a garbled token", "garbled.token.here".to_owned()),
    ];
    if let Some((userinfo, _)) = amqp_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        && userinfo.contains(':')
    {
        secrets.push(("the broker's credentials", format!("{userinfo}@")));
    }
    let found: Vec<&str> = secrets
        .iter()
        .filter(|(_, s)| logs.contains(s.as_str()))
        .map(|(what, _)| *what)
        .collect();
    println!(
        "secrets: {} bytes of logs from {} processes searched for {} secrets: {} found",
        logs.len(),
        c.chats.len() + c.gateways.len(),
        secrets.len(),
        found.len()
    );
    assert!(found.is_empty(), "in the logs: {found:?}");
}

/// Waits for `events` to end with SESSION_REVOKED by `deadline`.
async fn revoked_by(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    deadline: Instant,
    what: &str,
) {
    loop {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some(Event::Closed(e))) => {
                assert_eq!(e.code(), Some(pb::ErrorCode::SessionRevoked), "{what}: {e}");
                return;
            }
            Ok(Some(Event::Disconnected { reason })) => {
                panic!("{what}: reconnected after a log-out: {reason}")
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("{what}: events ended without a reason"),
            Err(_) => panic!("{what}: not closed in time"),
        }
    }
}

/// A log-out reaches every gateway: ann's devices, one on each gateway,
/// close with SESSION_REVOKED within a second of the admin API's answer,
/// and her token is refused on every gateway from then on; one device's
/// log-out closes that device alone; bob, on the same gateways, goes on;
/// a token issued afterwards logs ann in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_out_closes_the_device_on_every_gateway_within_a_second() {
    let c = Cluster::start(spec()).await.unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let mut admin = c.admin().await.unwrap();
    let gateways = c.gateways.len();
    let mut anns = Vec::new();
    for i in 0..gateways {
        let (client, mut events) = Client::connect(c.at_gateway(i, &t[0], &format!("d{i}")))
            .await
            .unwrap();
        while !matches!(events.recv().await, Some(Event::Synced(_))) {}
        anns.push((client, events));
    }
    let phone = admin
        .device_token("ann", "phone", 3600)
        .await
        .unwrap()
        .token;
    let (_phone, mut phone_events) = Client::connect(c.at_gateway(2, &phone, "phone"))
        .await
        .unwrap();
    let (bob, _bob_events) = Client::connect(c.at_gateway(1, &t[1], "phone"))
        .await
        .unwrap();

    // One device: the phone alone closes.
    let asked = Instant::now();
    admin.log_out("ann", Some("phone")).await.unwrap();
    let answered = asked.elapsed();
    revoked_by(
        &mut phone_events,
        Instant::now() + Duration::from_secs(1),
        "the phone",
    )
    .await;
    let phone_took = asked.elapsed();

    // Every device.
    let asked = Instant::now();
    admin.log_out("ann", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut took = Vec::new();
    for (i, (_, events)) in anns.iter_mut().enumerate() {
        revoked_by(events, deadline, &format!("ann's device on gateway {i}")).await;
        took.push(asked.elapsed());
    }
    println!(
        "log-out: the admin call answered in {answered:?}; one device closed after \
         {phone_took:?}; every device (one per gateway) closed after {took:?}"
    );
    for i in 0..gateways {
        let refused = Client::connect(c.at_gateway(i, &t[0], &format!("d{i}")))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(pb::ErrorCode::SessionRevoked),
            "gateway {i}"
        );
    }
    let refused = Client::connect(c.at_gateway(0, &phone, "phone"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(pb::ErrorCode::SessionRevoked));

    bob.open_direct("ann").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = admin.token("ann", 3600).await.unwrap().token;
    let (again, _events) = Client::connect(c.at_gateway(0, &fresh, "d0"))
        .await
        .unwrap();
    again.open_direct("bob").await.unwrap();
}

/// A log-out made while RabbitMQ is down cannot reach the gateways as a
/// notice; when the broker is back, each gateway looks up the log-outs
/// made since its link went, and the device is closed with SESSION_REVOKED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_out_while_the_broker_is_down_closes_the_device_when_it_is_back() {
    let mut rabbit = PrivateRabbit::start().await.unwrap();
    let spec = Spec {
        amqp_url: rabbit.url(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    c.users(&["ann"]).await.unwrap();
    let mut admin = c.admin().await.unwrap();
    let phone = admin
        .device_token("ann", "phone", 3600)
        .await
        .unwrap()
        .token;
    let (_phone, mut events) = Client::connect(c.at_gateway(1, &phone, "phone"))
        .await
        .unwrap();
    while !matches!(events.recv().await, Some(Event::Synced(_))) {}

    rabbit.crash().await.unwrap();
    // The chat service records the log-out (the token is refused from now
    // on) and queues its notice for the broker, which has lost the
    // gateways' queues by the time it is back: the notice reaches nobody.
    // Without the gateways' lookup this test fails.
    let answer = admin.log_out("ann", Some("phone")).await;
    println!("log-out with the broker down: {answer:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nothing tells the gateway yet.
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, Event::Closed(_)),
            "closed before the broker was back: {e:?}"
        );
    }
    rabbit.start_again().await.unwrap();
    let back = Instant::now();
    revoked_by(
        &mut events,
        back + Duration::from_secs(20),
        "the phone, once the broker is back",
    )
    .await;
    println!(
        "log-out while the broker was down: the phone closed {:?} after the broker was back",
        back.elapsed()
    );
    drop(c);
    rabbit.stop().await;
}

/// A user's rate limit holds across gateways: its devices on two gateways
/// share one count, kept in Redis (each gateway pushes its counts every
/// 100 ms), and the one past it is answered RATE_LIMITED with a retry-after.
/// So does the cap on a user's devices online, counted in presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_limits_hold_across_gateways() {
    let spec = Spec {
        env: vec![
            ("PARLEY_LIMIT_READS_PER_USER".to_owned(), "5/60".to_owned()),
            (
                "PARLEY_LIMIT_UPLOADS_PER_USER".to_owned(),
                "3/60".to_owned(),
            ),
            ("PARLEY_LIMIT_DEVICES_PER_USER".to_owned(), "2".to_owned()),
        ],
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let (phone, _e1) = Client::connect(c.at_gateway(0, &t[0], "phone"))
        .await
        .unwrap();
    let (laptop, _e2) = Client::connect(c.at_gateway(1, &t[0], "laptop"))
        .await
        .unwrap();
    let (bob, _e3) = Client::connect(c.at_gateway(1, &t[1], "phone"))
        .await
        .unwrap();
    let conv = phone.open_direct("bob").await.unwrap().id;
    let read = |client: &Client| {
        let client = client.clone();
        async move { client.history(conv, 0, pb::Direction::Backward, 10).await }
    };
    for _ in 0..3 {
        read(&phone).await.unwrap();
    }
    // A gateway reads a key's count back at the sync after it checks the
    // key: the laptop's first read is judged on gateway 1's own count
    // (none), its next ones on the cluster's.
    tokio::time::sleep(Duration::from_millis(400)).await;
    read(&laptop).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    read(&laptop).await.unwrap();
    let refused = read(&laptop).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(pb::ErrorCode::RateLimited),
        "{refused}"
    );
    // Gateway 0 judges the phone's next read on its last view (its own
    // three), then reads the cluster's count back: one read over at most.
    let stale = read(&phone).await.is_ok();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = read(&phone).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(pb::ErrorCode::RateLimited),
        "{refused}"
    );
    // Bob, on the same gateway, reads on.
    bob.history(conv, 0, pb::Direction::Backward, 10)
        .await
        .unwrap();
    println!(
        "rate limit: 5 reads a minute for ann over 2 gateways: {} admitted, then refused on both",
        5 + usize::from(stale)
    );
    // Upload slots likewise (this cluster stores no media: an admitted
    // request is answered FORBIDDEN, one past the limit RATE_LIMITED).
    let ask = |client: &Client| {
        let client = client.clone();
        async move {
            let req = pb::client_frame::Body::Upload(pb::UploadRequest {
                kind: pb::MediaKind::File as i32,
                mime_type: "text/plain".into(),
                size_bytes: 10,
                ..Default::default()
            });
            client.request(req).await.unwrap_err().code()
        }
    };
    for _ in 0..2 {
        assert_eq!(ask(&phone).await, Some(pb::ErrorCode::Forbidden));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ask(&laptop).await, Some(pb::ErrorCode::Forbidden));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ask(&laptop).await, Some(pb::ErrorCode::RateLimited));
    println!("rate limit: 3 upload slots a minute for ann over 2 gateways, then refused");
    // Two devices online at most: ann's third is refused on the third gateway.
    let third = Client::connect(c.at_gateway(2, &t[0], "tablet"))
        .await
        .unwrap_err();
    assert_eq!(third.code(), Some(pb::ErrorCode::TooManyDevices), "{third}");
    laptop.close().await;
    let mut admitted = false;
    for _ in 0..50 {
        if Client::connect(c.at_gateway(2, &t[0], "tablet"))
            .await
            .is_ok()
        {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the laptop's going made room for the tablet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let spec = Spec {
        gateways: 2,
        chats: 1,
        tls: Some((cert_path.clone(), key_path)),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let rec = Recorder::default();
    let (ann, bob, direct) = pair(
        &rec,
        c.over_tls(0, &t[0], "phone", &cert_path),
        c.over_tls(1, &t[1], "phone", &cert_path),
    )
    .await;
    let streams = both_ways(
        &ann,
        &bob,
        direct,
        20,
        Duration::ZERO,
        ["ann/phone", "bob/phone"],
    );
    let ledger = traffic(&rec, streams).await.ledger;
    check(&ledger, "tls", &c);

    // WebSocket over TLS (wss://) speaks the same frames.
    assert_eq!(wss_hello(c.wss_addrs[0], &cert_path).await, 1);

    // With a certificate, the public route lookup is HTTPS.
    let route = format!(
        "https://localhost:{}/route",
        c.gateways[0].route.unwrap().port()
    );
    let trust = parley_client::TlsOptions {
        ca_file: Some(cert_path.clone()),
        server_name: None,
    };
    let candidates = parley_client::transport::lookup_route(&route, &[], Some(&trust))
        .await
        .unwrap();
    assert!(
        candidates.contains(&c.gateways[1].addr.to_string()),
        "{candidates:?}"
    );
    let plain = format!("http://{}/route", c.gateways[0].route.unwrap());
    assert!(
        parley_client::transport::lookup_route(&plain, &[], None)
            .await
            .is_err(),
        "no plain HTTP on the TLS lookup"
    );

    // A client that does not trust the certificate is refused.
    let other = tempfile::NamedTempFile::new().unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(other.path(), stranger.cert.pem()).unwrap();
    let refused = Client::connect(c.over_tls(0, &t[0], "tablet", other.path())).await;
    assert!(
        refused.is_err(),
        "an untrusted certificate must fail the handshake"
    );
}

/// Opens wss:// to `addr` trusting `ca`, sends Hello, returns the version
/// the HelloOk names.
async fn wss_hello(addr: std::net::SocketAddr, ca: &std::path::Path) -> u32 {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use rustls_pki_types::pem::PemObject;
    use tokio_tungstenite::tungstenite::Message as Ws;

    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/", addr.port()), tls)
            .await
            .unwrap();
    let hello = pb::ClientFrame::new(
        1,
        pb::client_frame::Body::Hello(pb::Hello {
            min_version: 1,
            max_version: 1,
            client: "e2e-wss".into(),
        }),
    );
    ws.send(Ws::Binary(hello.encode_to_vec().into()))
        .await
        .unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Ws::Binary(b) => {
                let frame = pb::ServerFrame::decode(b.as_ref()).unwrap();
                match frame.body {
                    Some(pb::server_frame::Body::HelloOk(ok)) => return ok.version,
                    other => panic!("expected HelloOk, got {other:?}"),
                }
            }
            _ => continue,
        }
    }
}
