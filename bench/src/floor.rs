//! The PostgreSQL floor: what the machine's own PostgreSQL takes of
//! exactly what Parley writes per message, with nothing of Parley in the
//! way. The store's batch statement (`parley_append`, through `PgStore`)
//! is driven directly, from one and two writers, at several batch sizes,
//! on a database of its own seeded like the 1:1 workload (users, each in
//! direct conversations with its peers, messages of the workload's size);
//! the best rate is the floor. A cluster's sustained rate is then read as a
//! share of it: the part of the database's capacity that reaches users.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use parley_core::Store;
use parley_core::store::NewMessage;
use parley_proto::pb;
use parley_store::PgStore;
use parley_store::testing::TestDatabase;
use serde::Serialize;

use crate::procs::Meter;

/// One configuration's rate.
#[derive(Debug, Clone, Serialize)]
pub struct FloorRun {
    pub batch: usize,
    pub writers: usize,
    pub messages_per_sec: f64,
    /// PostgreSQL CPU per message.
    pub postgres_us: f64,
    /// The mean time of one batch call.
    pub call_ms: f64,
}

/// The floor: every configuration, and the best.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub users: usize,
    pub conversations: usize,
    pub size: usize,
    pub runs: Vec<FloorRun>,
}

impl Floor {
    /// The best rate measured.
    pub fn best(&self) -> Option<&FloorRun> {
        self.runs
            .iter()
            .max_by(|a, b| a.messages_per_sec.total_cmp(&b.messages_per_sec))
    }
}

/// Measures the floor for `users` users with `peers` direct partners each
/// and messages of `size` bytes, `secs` seconds per configuration.
pub async fn measure(
    users: usize,
    peers: usize,
    size: usize,
    secs: f64,
    batches: &[usize],
) -> anyhow::Result<Floor> {
    let db = TestDatabase::create()
        .await
        .context("a database for the floor (PostgreSQL on PARLEY_TEST_DATABASE_URL)")?;
    let store = PgStore::connect(&db.url, None, 8).await?;
    store.migrate().await?;
    let names: Vec<String> = (0..users).map(|u| format!("f{u}")).collect();
    for n in &names {
        store.create_user(n, "", 0).await?;
    }
    // Each user and its next `peers` users, around the ring.
    let mut convs: Vec<(u64, String, String)> = Vec::new();
    for a in 0..users {
        // Each pair once, from its first user (2 × peers < users).
        for k in 1..=peers.min(users.saturating_sub(1) / 2) {
            let b = (a + k) % users;
            let c = store.open_direct(&names[a], &names[b], 0).await?;
            convs.push((c.id, names[a].clone(), names[b].clone()));
        }
    }
    let store: Arc<dyn Store> = Arc::new(store);
    let convs = Arc::new(convs);
    let mut runs = Vec::new();
    for &writers in &[1usize, 2] {
        for &batch in batches {
            let run = drive(store.clone(), convs.clone(), writers, batch, size, secs).await?;
            eprintln!(
                "  floor: batch {batch:>3} writers {writers}: {:>8.0} msg/s, postgres {:>6.1} µs/msg, {:.2} ms a call",
                run.messages_per_sec, run.postgres_us, run.call_ms
            );
            runs.push(run);
        }
    }
    Ok(Floor {
        users,
        conversations: convs.len(),
        size,
        runs,
    })
}

/// `writers` tasks appending batches of `batch` messages for `secs`.
async fn drive(
    store: Arc<dyn Store>,
    convs: Arc<Vec<(u64, String, String)>>,
    writers: usize,
    batch: usize,
    size: usize,
    secs: f64,
) -> anyhow::Result<FloorRun> {
    let written = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let meter = Meter::start(Vec::new());
    let started = Instant::now();
    let tag = crate::load::run_id();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, convs, written, calls, tag) = (
            store.clone(),
            convs.clone(),
            written.clone(),
            calls.clone(),
            tag.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut k: u64 = 0;
            while Instant::now() < until {
                let messages: Vec<NewMessage> = (0..batch)
                    .map(|_| {
                        k += 1;
                        let pick = rand::random::<u64>() as usize;
                        let (conv, a, b) = &convs[pick % convs.len()];
                        let sender = if pick & 1 == 0 { a } else { b };
                        NewMessage {
                            conversation_id: *conv,
                            sender_id: sender.clone(),
                            sender_device: "d".into(),
                            client_msg_id: format!("{tag}-{w}-{k:x}"),
                            content: pb::Content {
                                body: Some(pb::content::Body::Custom(pb::Custom {
                                    r#type: "bench".into(),
                                    data: crate::load::payload(k, size),
                                })),
                            },
                            now_ms: parley_core::now_ms(),
                        }
                    })
                    .collect();
                let results = store.append(messages).await?;
                let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                written.fetch_add(ok, Ordering::Relaxed);
                calls.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let usage = meter.finish();
    let messages = written.load(Ordering::Relaxed).max(1) as f64;
    let postgres: f64 = usage
        .processes
        .iter()
        .filter(|(name, _, _)| name == "postgres")
        .map(|(_, a, b)| b.cpu_secs - a.cpu_secs)
        .sum();
    let calls = calls.load(Ordering::Relaxed).max(1) as f64;
    Ok(FloorRun {
        batch,
        writers,
        messages_per_sec: messages / elapsed,
        postgres_us: postgres * 1e6 / messages,
        call_ms: elapsed * 1e3 * writers as f64 / calls,
    })
}
