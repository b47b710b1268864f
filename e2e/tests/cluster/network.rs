//! A gateway on a host of its own (a network namespace with a veth link),
//! whose link to the rest of the cluster turns slow, lossy, partitioned
//! and dead in turn while devices on it and on the other gateways talk.
//! Faults are silent, as a broken network's are: dropped segments, no
//! resets. See `parley_e2e::netns`.

use std::time::{Duration, Instant};

use parley_e2e::{Cluster, Faults, Host, Recorder, Spec, http_get};

use super::{check, join, others, spec, stream, traffic};

/// Whether gateway `far`'s address is in the routing table and in a route
/// lookup's answer at gateway `near`.
async fn routed(c: &Cluster, redis: &parley_redis::RedisState, near: usize, far: usize) -> bool {
    let addr = c.gateways[far].addr.to_string();
    let table = redis.routes().await.unwrap_or_default();
    let (_, answer) = http_get(c.gateways[near].ops, "/route")
        .await
        .unwrap_or_default();
    table.iter().any(|(a, _)| *a == addr) || answer.contains(&addr)
}

/// Polls `routed` until it is `want`, for up to `within`; how long it took.
async fn until_routed(
    c: &Cluster,
    redis: &parley_redis::RedisState,
    far: usize,
    want: bool,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if routed(c, redis, 0, far).await == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_across_a_slow_lossy_partitioned_and_dead_link_loses_nothing() {
    let host = Host::create().expect("a network namespace (run as root; scripts/services)");
    let mut c = Cluster::start(Spec {
        gateways: 2,
        ..spec()
    })
    .await
    .unwrap();
    let (far, uplink) = c.add_gateway_on(&host).await.unwrap();
    let redis = parley_redis::RedisState::new(&c.spec.redis_url, &c.prefix).unwrap();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let rec = Recorder::default();
    let ann = join(&c, 0, &t[0], "ann/phone", &rec).await;
    let _ann2 = join(&c, far, &t[0], "ann/laptop", &rec).await;
    let bob = join(&c, far, &t[1], "bob/phone", &rec).await;
    let _bob2 = join(&c, 1, &t[1], "bob/laptop", &rec).await;
    let direct = ann.open_direct("bob").await.unwrap().id;
    let devices = ["ann/phone", "ann/laptop", "bob/phone", "bob/laptop"];
    let pause = Duration::from_millis(20);
    let streams = vec![
        tokio::spawn(stream(
            ann.clone(),
            direct,
            800,
            pause,
            others(&devices, "ann/phone"),
        )),
        tokio::spawn(stream(
            bob.clone(),
            direct,
            800,
            pause,
            others(&devices, "bob/phone"),
        )),
    ];
    let began = Instant::now();
    let phase = |what: &str| println!("network: {:>5.1} s  {what}", began.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(800)).await;

    phase("80 ms each way between gw2 and Redis, RabbitMQ and the chat services");
    uplink.set_delay(Duration::from_millis(80));
    tokio::time::sleep(Duration::from_secs(2)).await;
    uplink.set_delay(Duration::ZERO);

    phase("10% of segments lost each way on gw2's link (clients' too)");
    host.inject(&Faults {
        loss: 10,
        ..Faults::default()
    })
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    phase("gw2 partitioned from RabbitMQ and the chat services");
    host.inject(&Faults {
        blocked: uplink.cluster_ports(),
        ..Faults::default()
    })
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    phase("gw2 partitioned from Redis");
    assert!(routed(&c, &redis, 0, far).await, "gw2 is routed before");
    host.inject(&Faults {
        blocked: vec![uplink.redis.addr.port()],
        ..Faults::default()
    })
    .unwrap();
    // The lease lives 3 s (3 lease periods); the other gateways' next lease
    // write after that drops the entry.
    let gone = until_routed(&c, &redis, far, false, Duration::from_secs(10)).await;
    println!("network: gw2 left the routing table {gone:?} after the partition");
    let gone = gone.expect("a gateway cut off from Redis still gets routes");
    assert!(gone <= Duration::from_secs(5), "{gone:?}");
    for _ in 0..10 {
        assert!(
            !routed(&c, &redis, 0, far).await,
            "gw2 came back into the table while cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.inject(&Faults::default()).unwrap();
    let back = until_routed(&c, &redis, far, true, Duration::from_secs(10)).await;
    println!("network: gw2 back in the routing table {back:?} after the partition healed");
    assert!(back.expect("gw2 never came back into the routing table") <= Duration::from_secs(3));

    phase("gw2's link down (everything across it, clients too)");
    host.link(false).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    host.link(true).unwrap();
    phase("link up; the streams run to their end");

    let done = traffic(&rec, streams).await;
    check(&done.ledger, "network-faults", &c);
    let delays = super::delivery_delays(&rec, &done.acked, began);
    println!("network-faults: {}", super::percentiles(&delays));
}

/// The chaos run's connection resets work on this kernel (`ss -K` needs
/// its socket-destroy support): both ends of a reset connection see it.
#[tokio::test]
async fn a_connection_reset_reaches_both_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for at_server in [false, true] {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let reset = parley_e2e::reset_connections(addr, at_server).unwrap();
        assert_eq!(reset, 1, "at the server's end: {at_server}");
        let mut buf = [0u8; 1];
        let (mine, theirs) = if at_server {
            (&mut server, &mut client)
        } else {
            (&mut client, &mut server)
        };
        assert!(
            mine.write_all(b"x").await.is_err() || mine.read(&mut buf).await.is_err(),
            "the destroyed socket fails"
        );
        assert!(
            !matches!(theirs.read(&mut buf).await, Ok(n) if n > 0),
            "the other end sees the connection gone"
        );
    }
}
