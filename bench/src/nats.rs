//! The NATS driver (async-nats): one client per endpoint, subscribed to its
//! own subject (1:1) or its group's (fan-out). Core NATS has no
//! acknowledgement; with JetStream a stream captures every subject and a
//! message counts as acked when the stream's PubAck arrives (stored), while
//! recipients still receive it on their subscriptions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::task::JoinSet;

use crate::load::{Run, Shape, Workload, next_due, number, payload};

async fn client(broker: SocketAddr) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(format!("nats://{broker}"))
        .await
        .context("connecting to NATS")
}

fn subject(tag: &str, w: &Workload, e: usize) -> String {
    match w.shape {
        Shape::Direct { .. } => format!("b.{tag}.{e}"),
        Shape::Group { .. } => format!("g.{tag}.{}", w.group_of(e).0),
    }
}

/// Runs a workload against NATS; `jetstream` persists every message in a
/// file-backed stream and waits for its PubAck.
pub async fn traffic(
    broker: SocketAddr,
    w: Workload,
    jetstream: bool,
    pids: Vec<(String, u32)>,
) -> anyhow::Result<Arc<Run>> {
    w.check()?;
    let tag = crate::load::run_id();
    let stream = format!("BENCH{tag}");
    if jetstream {
        let js = jetstream::new(client(broker).await?);
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("b.{tag}.>"), format!("g.{tag}.>")],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    }
    let mut clients = Vec::with_capacity(w.endpoints);
    for e in 0..w.endpoints {
        let c = client(broker).await?;
        let sub = c.subscribe(subject(&tag, &w, e)).await?;
        clients.push((c, sub));
    }
    // Subscriptions are in place once the server answered a round trip.
    for (c, _) in &clients {
        c.flush().await?;
    }
    let peers = w.peers();
    let run = Arc::new(Run::new(w, Duration::from_millis(300), pids));
    let mut tasks = JoinSet::new();
    for (e, (c, mut sub)) in clients.into_iter().enumerate() {
        let r = run.clone();
        tasks.spawn(async move {
            let rank = r.w.group_of(e).1;
            let mut stop = r.stopped();
            loop {
                let msg = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    m = sub.next() => m,
                };
                let Some(msg) = msg else { return };
                if let Some(k) = number(&msg.payload)
                    && r.w.sender(k) != e
                {
                    r.delivered(e, rank, k);
                }
            }
        });
        let run = run.clone();
        let targets: Vec<String> = match run.w.shape {
            Shape::Direct { .. } => peers[e].iter().map(|&p| subject(&tag, &run.w, p)).collect(),
            Shape::Group { .. } => vec![subject(&tag, &run.w, e)],
        };
        tasks.spawn(async move {
            let js = jetstream.then(|| jetstream::new(c.clone()));
            let mut acks = FuturesUnordered::new();
            let mut sends = run.sends_of(e).peekable();
            let mut batch = Vec::new();
            loop {
                tokio::select! {
                    more = next_due(&run, &mut sends, &mut batch) => {
                        if !more && acks.is_empty() {
                            break;
                        }
                        if !more {
                            // Nothing left to send: wait for the acks.
                            while let Some((k, ack)) = acks.next().await {
                                on_ack(&run, e, k, ack);
                            }
                            break;
                        }
                    }
                    Some((k, ack)) = acks.next(), if !acks.is_empty() => {
                        on_ack(&run, e, k, ack);
                        continue;
                    }
                }
                for &k in &batch {
                    let subject = targets[run.w.slot(k)].clone();
                    let data = payload(k, run.w.size).into();
                    match &js {
                        Some(js) => match js.publish(subject, data).await {
                            Ok(fut) => acks.push(async move { (k, fut.await.map(|_| ())) }),
                            Err(err) => {
                                run.error(format!("publish: {err}"));
                                continue;
                            }
                        },
                        None => {
                            if let Err(err) = c.publish(subject, data).await {
                                run.error(format!("publish: {err}"));
                                continue;
                            }
                        }
                    }
                    run.sent(k);
                }
            }
            let _ = c.flush().await;
        });
    }
    run.settle(Duration::from_secs(5)).await;
    run.stop();
    while tasks.join_next().await.is_some() {}
    if jetstream {
        let js = jetstream::new(client(broker).await?);
        let _ = js.delete_stream(&stream).await;
    }
    Ok(run)
}

fn on_ack<E: std::fmt::Display>(run: &Run, e: usize, k: u64, ack: Result<(), E>) {
    match ack {
        Ok(()) => run.acked(e, k),
        Err(err) => run.error(format!("PubAck: {err}")),
    }
}

/// `n` idle clients, each subscribed to a subject of its own.
pub struct Idle {
    pub connected: usize,
    pub connect_secs: f64,
    clients: Vec<(async_nats::Client, async_nats::Subscriber)>,
}

impl Idle {
    pub async fn close(self) {
        drop(self.clients);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn idle(broker: SocketAddr, n: usize, per_sec: f64) -> anyhow::Result<Idle> {
    let tag = crate::load::run_id();
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        let at = started + Duration::from_secs_f64(i as f64 / per_sec);
        let subject = format!("i.{tag}.{i}");
        set.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let c = client(broker).await?;
            let sub = c.subscribe(subject).await?;
            c.flush().await?;
            anyhow::Ok((c, sub))
        });
    }
    let mut clients = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(c) => clients.push(c),
            Err(e) => tracing::warn!("NATS client: {e:#}"),
        }
    }
    Ok(Idle {
        connected: clients.len(),
        connect_secs: started.elapsed().as_secs_f64(),
        clients,
    })
}
