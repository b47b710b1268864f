//! The MQTT driver (rumqttc, MQTT 3.1.1, QoS 1): one client per endpoint,
//! subscribed to its own topic (1:1) or its group's topic (fan-out).
//! A message is acked when the broker's PUBACK arrives.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};
use tokio::task::JoinSet;

use crate::load::{Run, Shape, Workload, next_due, number, payload};

fn options(id: String, broker: SocketAddr, keep_alive: Duration) -> MqttOptions {
    let mut o = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(keep_alive);
    o.set_clean_session(true);
    o.set_inflight(1000);
    o
}

/// Connects and subscribes; returns once the SUBACK is in.
async fn connect(
    id: String,
    broker: SocketAddr,
    topic: String,
    keep_alive: Duration,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client, mut ev) = AsyncClient::new(options(id, broker, keep_alive), 1024);
    // Nagle's algorithm would hold small publishes for the peer's delayed
    // ACK (up to 40 ms); every other client here disables it.
    let mut net = ev.network_options();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() > deadline {
            bail!("no SUBACK within 30 s");
        }
        if let Event::Incoming(Incoming::SubAck(_)) = ev.poll().await? {
            return Ok((client, ev));
        }
    }
}

fn topic(tag: &str, w: &Workload, e: usize) -> String {
    match w.shape {
        Shape::Direct { .. } => format!("b/{tag}/{e}"),
        Shape::Group { .. } => format!("g/{tag}/{}", w.group_of(e).0),
    }
}

/// Runs a workload against an MQTT broker.
pub async fn traffic(
    broker: SocketAddr,
    w: Workload,
    pids: Vec<(String, u32)>,
) -> anyhow::Result<Arc<Run>> {
    w.check()?;
    let tag = crate::load::run_id();
    let mut clients = Vec::with_capacity(w.endpoints);
    let mut set = JoinSet::new();
    for e in 0..w.endpoints {
        let (id, t) = (format!("{tag}-{e}"), topic(&tag, &w, e));
        set.spawn(async move { (e, connect(id, broker, t, Duration::from_secs(30)).await) });
        if set.len() >= 64 {
            clients.push(set.join_next().await.expect("a task")?);
        }
    }
    while let Some(r) = set.join_next().await {
        clients.push(r?);
    }
    clients.sort_by_key(|(e, _)| *e);
    let peers = w.peers();
    let run = Arc::new(Run::new(w, Duration::from_millis(300), pids));
    let mut tasks = JoinSet::new();
    for (e, c) in clients {
        let (client, ev) = c?;
        // Publishes leave the event loop in the order they were queued, so
        // a FIFO of message numbers maps packet ids back to messages.
        let queued = Arc::new(Mutex::new(VecDeque::new()));
        tasks.spawn(events(ev, e, run.clone(), queued.clone()));
        let run = run.clone();
        let targets: Vec<String> = match run.w.shape {
            Shape::Direct { .. } => peers[e].iter().map(|&p| topic(&tag, &run.w, p)).collect(),
            Shape::Group { .. } => vec![topic(&tag, &run.w, e)],
        };
        tasks.spawn(async move {
            let mut sends = run.sends_of(e).peekable();
            let mut batch = Vec::new();
            while next_due(&run, &mut sends, &mut batch).await {
                for &k in &batch {
                    queued
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_back(k);
                    let t = &targets[run.w.slot(k)];
                    if client
                        .publish(t, QoS::AtLeastOnce, false, payload(k, run.w.size))
                        .await
                        .is_err()
                    {
                        run.error("publish refused");
                        return;
                    }
                    run.sent(k);
                }
            }
            let mut stop = run.stopped();
            let _ = stop.wait_for(|s| *s).await;
            let _ = client.disconnect().await;
        });
    }
    run.settle(Duration::from_secs(5)).await;
    run.stop();
    while tasks.join_next().await.is_some() {}
    Ok(run)
}

/// Drives one client's event loop: records PUBACKs and deliveries.
async fn events(mut ev: EventLoop, e: usize, run: Arc<Run>, queued: Arc<Mutex<VecDeque<u64>>>) {
    let rank = run.w.group_of(e).1;
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut stop = run.stopped();
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            ev = ev.poll() => ev,
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(k) = queued.lock().unwrap_or_else(|p| p.into_inner()).pop_front() {
                    inflight.insert(pkid, k);
                }
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if let Some(k) = inflight.remove(&ack.pkid) {
                    run.acked(e, k);
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                if let Some(k) = number(&p.payload)
                    && run.w.sender(k) != e
                {
                    run.delivered(e, rank, k);
                }
            }
            Ok(_) => {}
            // The run's end closes connections; only a failure before it counts.
            Err(_) if *stop.borrow() => return,
            Err(err) => {
                run.error(format!("connection: {err}"));
                return;
            }
        }
    }
}

/// `n` idle clients, each subscribed to its own topic, keeping alive every
/// `keep_alive`.
pub struct Idle {
    pub connected: usize,
    pub connect_secs: f64,
    tasks: JoinSet<()>,
}

impl Idle {
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

pub async fn idle(broker: SocketAddr, n: usize, per_sec: f64) -> anyhow::Result<Idle> {
    let tag = crate::load::run_id();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(1024);
    for i in 0..n {
        let at = started + Duration::from_secs_f64(i as f64 / per_sec);
        let done = done_tx.clone();
        let tag = tag.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let id = format!("{tag}-{i}");
            let topic = format!("i/{tag}/{i}");
            match connect(id, broker, topic, Duration::from_secs(30)).await {
                Ok((_client, mut ev)) => {
                    let _ = done.send(true).await;
                    drop(done);
                    while ev.poll().await.is_ok() {}
                }
                Err(e) => {
                    tracing::warn!("MQTT client {i}: {e:#}");
                    let _ = done.send(false).await;
                }
            }
        });
    }
    drop(done_tx);
    let mut connected = 0;
    while let Some(ok) = done_rx.recv().await {
        connected += usize::from(ok);
    }
    Ok(Idle {
        connected,
        connect_secs: started.elapsed().as_secs_f64(),
        tasks,
    })
}
