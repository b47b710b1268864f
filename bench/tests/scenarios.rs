//! Every benchmark scenario at a tiny scale against every system, so the
//! load generator cannot rot. Nothing here is timed: the assertions are on
//! the ledger (every message taken reached every recipient exactly once)
//! and on what each scenario reports, never on latency or rates.

use std::time::Duration;

use parley_bench::{Env, Server, Shape, System, Traffic, Workload};

fn env() -> Env {
    Env {
        exe: env!("CARGO_BIN_EXE_parley-bench").into(),
        cluster: (1, 1),
    }
}

fn tiny(shape: Shape) -> Workload {
    Workload {
        endpoints: 10,
        rate: 200.0,
        duration: Duration::from_secs(1),
        size: 64,
        shape,
        seed: 3,
    }
}

fn assert_clean(t: &Traffic) {
    assert!(
        t.clean() && t.delivered == t.expected && t.sent == t.workload.total(),
        "{}: {}",
        t.system,
        parley_bench::table::traffic(std::slice::from_ref(t))
    );
    assert!(t.deliver.is_some(), "{}: no latency recorded", t.system);
    assert_eq!(t.ack.is_some(), t.system != "nats", "{}", t.system);
    assert!(t.usage.as_ref().is_some_and(|u| !u.processes.is_empty()));
}

/// 1:1 and fan-out through the same load generator on every system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_and_fan_out_reach_everyone_once_on_every_system() {
    let env = env();
    for system in [
        System::Parley,
        System::Mosquitto,
        System::Nats,
        System::Jetstream,
    ] {
        let server = Server::start(system, &env).await.unwrap();
        let direct = parley_bench::traffic(system, &server, tiny(Shape::Direct { peers: 3 }))
            .await
            .unwrap();
        assert_clean(&direct);
        assert_eq!(direct.expected, 200);
        let group = parley_bench::traffic(system, &server, tiny(Shape::Group { size: 5 }))
            .await
            .unwrap();
        assert_clean(&group);
        // 200 messages, each to the 4 other members of its group of 5.
        assert_eq!(group.expected, 800);
        print!(
            "{}",
            parley_bench::table::traffic(&[direct.clone(), group.clone()])
        );
    }
}

/// Cluster mode: gateways and chat services as processes of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_carries_the_same_workload() {
    let server = Server::start(System::ParleyCluster, &env()).await.unwrap();
    let t = parley_bench::traffic(
        System::ParleyCluster,
        &server,
        tiny(Shape::Direct { peers: 2 }),
    )
    .await
    .unwrap();
    assert_clean(&t);
    // Two processes measured: the chat service and the gateway.
    let usage = t.usage.as_ref().unwrap();
    assert!(usage.processes.len() >= 3, "{usage:?}");
}

/// Idle connections: all of them log in and memory is read for each system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_and_measured() {
    let env = env();
    for system in [System::Parley, System::Mosquitto, System::Nats] {
        let server = Server::start(system, &env).await.unwrap();
        let r = parley_bench::idle(system, &server, 40, 400.0, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!(
            r.connected,
            40,
            "{}",
            parley_bench::table::idle(std::slice::from_ref(&r))
        );
        assert!(r.baseline_kib > 0 && r.loaded_kib > 0);
    }
}

/// The search tries rates upward and reports the half-rate run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throughput_search_steps_up_and_runs_at_half() {
    let server = Server::start(System::Parley, &env()).await.unwrap();
    let base = Workload {
        rate: 50.0,
        duration: Duration::from_millis(500),
        ..tiny(Shape::Direct { peers: 2 })
    };
    // A limit no run can miss, and a ceiling after two doublings: the
    // search's path is fixed, whatever the machine's speed.
    let t = parley_bench::throughput(System::Parley, &server, base, 60_000.0, 0, 200.0)
        .await
        .unwrap();
    let rates: Vec<f64> = t.steps.iter().map(|s| s.workload.rate).collect();
    assert_eq!(rates, vec![50.0, 100.0, 200.0]);
    t.steps.iter().for_each(assert_clean);
    assert_eq!(t.max.as_ref().unwrap().workload.rate, 200.0);
    assert_eq!(t.half.as_ref().unwrap().workload.rate, 100.0);
    print!("{}", parley_bench::table::throughput(&[t]));
}

/// A device comes back to every message it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_device_catches_up_on_everything() {
    let server = Server::start(System::Parley, &env()).await.unwrap();
    let Server::Parley(p) = &server else {
        unreachable!()
    };
    let c = parley_bench::parley::catch_up(p, 1000, 10, 1000.0, 64)
        .await
        .unwrap();
    assert_eq!((c.missed, c.received), (1000, 1000));
    assert!(c.usage.peak_kib() > 0);
    print!("{}", parley_bench::table::catch_up(&c));
}

/// A file goes up and down through each store while messages flow, and
/// the messages' ledger stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_move_through_both_stores_while_messages_flow() {
    for store in ["local", "s3"] {
        let r = parley_bench::media::run(&env(), store, 1, 2, tiny(Shape::Direct { peers: 2 }))
            .await
            .unwrap();
        assert_eq!(
            (r.upload_mb_s.len(), r.download_mb_s.len()),
            (2, 2),
            "{store}"
        );
        assert_eq!(r.file_bytes, 1024 * 1024);
        assert_clean(&r.alone);
        assert_clean(&r.during);
        print!("{}", parley_bench::media::table(std::slice::from_ref(&r)));
    }
}

/// The PostgreSQL floor drives the store's batch call at every batch size
/// and writer count, and reads the cluster's rate as a share of its best.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_drives_the_store_directly_at_each_batch_size() {
    let floor = parley_bench::floor::measure(12, 2, 64, 0.3, &[1, 4])
        .await
        .unwrap();
    assert_eq!(floor.users, 12);
    assert_eq!(floor.conversations, 24, "each user with its next 2");
    let shapes: Vec<(usize, usize)> = floor.runs.iter().map(|r| (r.batch, r.writers)).collect();
    assert_eq!(shapes, vec![(1, 1), (4, 1), (1, 2), (4, 2)]);
    for r in &floor.runs {
        assert!(r.messages_per_sec > 0.0, "{r:?}");
    }
    let report = parley_bench::table::floor(&floor, &[]);
    assert!(report.contains("floor: "), "{report}");
}
