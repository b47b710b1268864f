//! Chaos: a cluster (3 gateways, 2 chat services) on private PostgreSQL,
//! Redis and RabbitMQ servers, with SDK clients sending 1:1 and group
//! messages the whole time, while random faults hit it: processes killed
//! (SIGKILL) or stopped (SIGTERM) and started again, Redis, RabbitMQ and
//! PostgreSQL restarted or crashed, clients' connections to a gateway reset
//! (from either end). At the end: the ledger (nothing lost,
//! doubled or out of order) and each process's memory at start and end.
//!
//! `PARLEY_CHAOS_SECS` sets how long the faults go on (120 in the test
//! suite; `scripts/chaos` runs it for 30 minutes), `PARLEY_CHAOS_SEED` the
//! fault schedule (printed, so a failing run can be replayed).

use std::time::{Duration, Instant};

use parley_client::{Client, ClientConfig};
use parley_e2e::ledger::Expect;
use parley_e2e::services::{PrivatePostgres, PrivateRabbit, PrivateRedis};
use parley_e2e::{Cluster, Recorder, Spec, connect, reset_connections};
use parley_proto::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Streamed, check, others, spec, traffic};

/// What a process may hold at the end of a run, whatever it did: the
/// stated bound on memory growth under chaos.
const MAX_RSS_KB: u64 = 256 * 1024;

/// Resident memory of a process, in KiB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Each process: (name, pid, RSS in KiB).
fn memory(c: &Cluster) -> Vec<(String, Option<u32>, Option<u64>)> {
    c.chats
        .iter()
        .chain(&c.gateways)
        .map(|n| {
            let pid = n.proc.as_ref().and_then(|p| p.pid());
            (n.name.clone(), pid, pid.and_then(rss_kb))
        })
        .collect()
}

/// A device that finds a live gateway through any gateway's route lookup.
fn anywhere(c: &Cluster, token: &str, device: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new("", token, device);
    cfg.routes = c.gateways.iter().map(|g| g.route_url()).collect();
    cfg
}

/// Sends to `conv` every `pause` until `until`.
async fn stream_until(
    from: Client,
    conv: u64,
    until: Instant,
    pause: Duration,
    receivers: Vec<String>,
) -> Streamed {
    let mut s = Streamed {
        sent: 0,
        acked: Vec::new(),
        ids: Vec::new(),
        began: Vec::new(),
    };
    while Instant::now() < until {
        let id = parley_client::sdk::new_client_msg_id();
        let start = Instant::now();
        s.sent += 1;
        match from
            .send_with_id(id.clone(), conv, pb::Content::text(format!("m{}", s.sent)))
            .await
        {
            Ok(ack) => {
                s.acked.push(Expect {
                    msg_id: ack.msg_id,
                    receivers: receivers.clone(),
                });
                s.ids.push(id);
                s.began.push(start);
            }
            Err(e) => eprintln!("chaos: send failed (not acked, not expected): {e}"),
        }
        tokio::time::sleep(pause).await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing_and_holds_memory() {
    let secs: u64 = std::env::var("PARLEY_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("PARLEY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos: {secs} s of faults, seed {seed} (PARLEY_CHAOS_SEED replays it)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut pg = PrivatePostgres::start().await.unwrap();
    let mut redis = PrivateRedis::start().await.unwrap();
    let mut rabbit = PrivateRabbit::start().await.unwrap();
    let spec = Spec {
        database_url: pg.url(),
        redis_url: redis.url(),
        amqp_url: rabbit.url(),
        lease_secs: 2,
        ..spec()
    };
    let mut c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["ann", "bob", "cyd", "dan"]).await.unwrap();
    let rec = Recorder::default();
    let devices = [
        "ann/phone",
        "ann/laptop",
        "bob/phone",
        "cyd/phone",
        "dan/phone",
    ];
    let mut clients = Vec::new();
    for name in devices {
        let (user, device) = name.split_once('/').unwrap();
        let token = match user {
            "ann" => &t[0],
            "bob" => &t[1],
            "cyd" => &t[2],
            _ => &t[3],
        };
        clients.push(
            connect(anywhere(&c, token, device), &rec, name)
                .await
                .unwrap(),
        );
    }
    let group = clients[0]
        .create_group("chaos", &["bob", "cyd", "dan"])
        .await
        .unwrap()
        .id;
    let direct = clients[2].open_direct("ann").await.unwrap().id;
    let in_direct = ["ann/phone", "ann/laptop", "bob/phone"];

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = memory(&c);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let pause = Duration::from_millis(200);
    // (device index, conversation, the devices of that conversation)
    let senders = [
        (0, group, &devices[..]),
        (3, group, &devices[..]),
        (4, group, &devices[..]),
        (2, direct, &in_direct[..]),
        (1, direct, &in_direct[..]),
    ];
    let streams = senders
        .iter()
        .map(|&(i, conv, members)| {
            let receivers = others(members, devices[i]);
            tokio::spawn(stream_until(
                clients[i].clone(),
                conv,
                until,
                pause,
                receivers,
            ))
        })
        .collect();

    let mut faults: Vec<String> = Vec::new();
    let log_dir = c.dir.path().to_path_buf();
    while Instant::now() + Duration::from_secs(4) < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..6_000))).await;
        let mut down = Duration::from_millis(rng.random_range(300..2_000));
        let at = started.elapsed().as_secs_f64();
        let what = match rng.random_range(0..10) {
            n @ 0..4 => {
                let (nodes, kind) = if n < 2 {
                    (&mut c.gateways, "gateway")
                } else {
                    (&mut c.chats, "chat service")
                };
                let i = rng.random_range(0..nodes.len());
                let node = &mut nodes[i];
                let how = if n % 2 == 0 {
                    node.kill9().await;
                    "killed (SIGKILL)"
                } else {
                    if let Some(p) = node.proc.as_mut() {
                        // A gateway drains its clients first.
                        p.terminate(Duration::from_secs(25)).await;
                    }
                    "stopped (SIGTERM)"
                };
                tokio::time::sleep(down).await;
                node.start(&log_dir).await.unwrap();
                format!("{kind} {i} {how}")
            }
            4 => {
                redis.restart(down).await.unwrap();
                "Redis restarted empty".to_owned()
            }
            5 => {
                rabbit.restart(down).await.unwrap();
                "RabbitMQ restarted".to_owned()
            }
            6 => {
                pg.crash().await.unwrap();
                tokio::time::sleep(down).await;
                pg.start_again().await.unwrap();
                "PostgreSQL crashed (immediate shutdown) and started".to_owned()
            }
            7 => {
                pg.stop().await.unwrap();
                tokio::time::sleep(down).await;
                pg.start_again().await.unwrap();
                "PostgreSQL stopped (fast shutdown) and started".to_owned()
            }
            n => {
                let i = rng.random_range(0..c.gateways.len());
                let at_server = n == 9;
                let reset = reset_connections(c.gateways[i].addr, at_server).unwrap();
                down = Duration::ZERO;
                format!(
                    "{reset} client connections to gateway {i} reset by the {}",
                    if at_server {
                        "gateway's end"
                    } else {
                        "clients' end"
                    }
                )
            }
        };
        println!("chaos: {at:6.1} s  {what}, down {} ms", down.as_millis());
        faults.push(what);
    }

    let done = traffic(&rec, streams).await;
    let after = memory(&c);
    println!(
        "chaos: {} faults in {:.0} s",
        faults.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "chaos: memory (RSS) at start and end; a process restarted during the run has a new pid"
    );
    for ((name, pid0, rss0), (_, pid1, rss1)) in before.iter().zip(&after) {
        let kb =
            |r: &Option<u64>| r.map_or("-".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        println!(
            "chaos:   {name:<8} start {:>10} (pid {}), end {:>10} (pid {}){}",
            kb(rss0),
            pid0.unwrap_or(0),
            kb(rss1),
            pid1.unwrap_or(0),
            if pid0 == pid1 { "" } else { ", restarted" }
        );
        if let Some(k) = rss1 {
            assert!(
                *k <= MAX_RSS_KB,
                "{name} holds {k} KiB at the end, over the bound of {MAX_RSS_KB}"
            );
        }
    }
    check(&done.ledger, "chaos", &c);
    drop(clients);
    rabbit.stop().await;
}
