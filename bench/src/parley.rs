//! The Parley driver: bare protocol connections (no SDK: one task and two
//! small buffers per connection, so the load generator can hold as many as
//! the machine allows), the users and conversations a workload needs, and
//! the endpoint loop that sends on schedule and records every delivery.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use parley_client::Admin;
use parley_core::TokenKeys;
use parley_proto::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use parley_proto::{PROTOCOL_VERSION, codec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use crate::load::{Run, Shape, Workload};
use crate::procs::ParleyServer;

/// Frames larger than this from the server end the connection (the
/// server's own limit is the same).
const MAX_FRAME: usize = parley_proto::DEFAULT_MAX_FRAME_BYTES;

/// A source address for connection `i`: loopback connections spread over
/// 127.1.0.0/16, so no single source address runs out of ephemeral ports.
pub fn source(i: usize, dst: SocketAddr) -> Option<SocketAddr> {
    dst.ip().is_loopback().then(|| {
        let ip = Ipv4Addr::new(127, 1, ((i / 250) % 256) as u8, (1 + i % 250) as u8);
        SocketAddr::new(IpAddr::V4(ip), 0)
    })
}

/// Connects to `dst` from connection `i`'s source address.
pub async fn dial(i: usize, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source(i, dst) {
        socket.bind(src).with_context(|| format!("binding {src}"))?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
        .await
        .with_context(|| format!("connecting to {dst} timed out"))?
        .with_context(|| format!("connecting to {dst}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One logged-in device.
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_rid: u64,
    /// The newest inbox sequence number received.
    pub cursor: u64,
}

/// What login saw.
#[derive(Debug, Clone, Copy)]
pub struct Login {
    /// Deliveries before SyncDone.
    pub caught_up: u64,
    pub heartbeat: Duration,
}

impl Conn {
    /// Hello and Auth in one write, then reads up to SyncDone.
    pub async fn login(
        i: usize,
        dst: SocketAddr,
        token: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> anyhow::Result<(Self, Login)> {
        let stream = dial(i, dst).await?;
        let mut c = Self {
            stream,
            rbuf: BytesMut::with_capacity(256),
            wbuf: BytesMut::with_capacity(256),
            next_rid: 1,
            cursor: 0,
        };
        c.push(Req::Hello(pb::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: "parley-bench".into(),
        }));
        c.push(Req::Auth(pb::Auth {
            token: token.into(),
            device_id: device.into(),
            cursor,
        }));
        c.flush().await?;
        let mut login = Login {
            caught_up: 0,
            heartbeat: Duration::from_secs(30),
        };
        loop {
            let f = c.next().await?;
            match f.body {
                Some(Resp::HelloOk(ok)) => {
                    login.heartbeat = Duration::from_millis(ok.heartbeat_interval_ms.into());
                }
                Some(Resp::AuthOk(_)) => {}
                Some(Resp::Deliver(d)) => {
                    c.cursor = c.cursor.max(d.inbox_seq);
                    login.caught_up += 1;
                }
                Some(Resp::SyncDone(_)) => break,
                Some(Resp::Error(e)) => bail!("login refused: {:?} {}", e.code(), e.message),
                other => bail!("unexpected frame during login: {other:?}"),
            }
        }
        // Catch-up can leave a large buffer behind; idle connections should not keep it.
        if c.rbuf.capacity() > 4096 && c.rbuf.is_empty() {
            c.rbuf = BytesMut::with_capacity(256);
        }
        Ok((c, login))
    }

    /// Queues a request; returns its id.
    pub fn push(&mut self, body: Req) -> u64 {
        let rid = self.next_rid;
        self.next_rid += 1;
        self.push_with(rid, body);
        rid
    }

    fn push_with(&mut self, request_id: u64, body: Req) {
        codec::encode_frame(&pb::ClientFrame::new(request_id, body), &mut self.wbuf);
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next frame, reading as needed.
    pub async fn next(&mut self) -> anyhow::Result<pb::ServerFrame> {
        loop {
            if let Some(f) = self.decoded()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    fn decoded(&mut self) -> anyhow::Result<Option<pb::ServerFrame>> {
        Ok(codec::decode_frame::<pb::ServerFrame>(
            &mut self.rbuf,
            MAX_FRAME,
        )?)
    }

    /// Reads once; cancel-safe.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 128 {
            self.rbuf.reserve(4096);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    /// Sends one request and waits for its answer (no pushes expected).
    pub async fn call(&mut self, body: Req) -> anyhow::Result<Resp> {
        let rid = self.push(body);
        self.flush().await?;
        loop {
            let f = self.next().await?;
            match f.body {
                Some(Resp::Error(e)) if f.request_id == rid => {
                    bail!("{:?}: {}", e.code(), e.message)
                }
                Some(body) if f.request_id == rid => return Ok(body),
                _ => {}
            }
        }
    }
}

/// Users made for one run, with their tokens.
pub struct Users {
    pub ids: Vec<String>,
    pub tokens: Vec<String>,
}

/// Creates `n` users named `<tag>-<i>` (8 admin calls at a time) and signs
/// their tokens locally with the server's secret.
pub async fn users(server: &ParleyServer, tag: &str, n: usize) -> anyhow::Result<Users> {
    let admin = Admin::connect(&server.admin_url, &server.admin_key).await?;
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let mut set = JoinSet::new();
    for lane in 0..8 {
        let mut admin = admin.clone();
        let mine: Vec<String> = ids.iter().skip(lane).step_by(8).cloned().collect();
        set.spawn(async move {
            for id in mine {
                admin.create_user(&id, "").await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let keys = TokenKeys::new(server.token_secret.as_bytes())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let tokens = ids
        .iter()
        .map(|id| keys.issue(id, now, 24 * 3600))
        .collect::<Result<_, _>>()?;
    Ok(Users { ids, tokens })
}

/// Logs in `n` devices, `parallel` at a time; connection `i` goes to
/// gateway `i % gateways`. Returns them in order, with the time it took.
pub async fn login_all(
    server: &ParleyServer,
    users: &Users,
    device: &str,
    parallel: usize,
) -> anyhow::Result<(Vec<Conn>, Duration)> {
    let started = Instant::now();
    let n = users.ids.len();
    let gateways = server.gateways.clone();
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    let tokens = Arc::new(users.tokens.clone());
    for _ in 0..parallel.min(n).max(1) {
        let (next, tokens, gateways, device) = (
            next.clone(),
            tokens.clone(),
            gateways.clone(),
            device.to_owned(),
        );
        set.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= tokens.len() {
                    return anyhow::Ok(mine);
                }
                let dst = gateways[i % gateways.len()];
                let (c, _) = Conn::login(i, dst, &tokens[i], &device, None)
                    .await
                    .with_context(|| format!("logging in device {i}"))?;
                mine.push((i, c));
            }
        });
    }
    let mut all: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        for (i, c) in r?? {
            all[i] = Some(c);
        }
    }
    let conns = all
        .into_iter()
        .map(|c| c.expect("every index logged in"))
        .collect();
    Ok((conns, started.elapsed()))
}

/// The conversation ids each endpoint sends to: one per peer (1:1, opened
/// by the endpoints themselves) or its group's (made by the admin API).
async fn conversations(
    server: &ParleyServer,
    w: &Workload,
    users: &Users,
    conns: &mut [Conn],
) -> anyhow::Result<Vec<Vec<u64>>> {
    match w.shape {
        Shape::Direct { .. } => {
            let peers = w.peers();
            let mut out = Vec::with_capacity(conns.len());
            for (e, c) in conns.iter_mut().enumerate() {
                let mut ids = Vec::new();
                for &p in &peers[e] {
                    let peer = users.ids[p].clone();
                    match c.call(Req::OpenDirect(pb::OpenDirect { peer })).await? {
                        Resp::Conversation(conv) => ids.push(conv.id),
                        other => bail!("OpenDirect answered {other:?}"),
                    }
                }
                out.push(ids);
            }
            Ok(out)
        }
        Shape::Group { .. } => {
            let mut admin = Admin::connect(&server.admin_url, &server.admin_key).await?;
            let mut group_ids = Vec::new();
            for g in 0..w.groups() {
                let members: Vec<String> = w.members(g).map(|e| users.ids[e].clone()).collect();
                let conv = admin
                    .create_group(&members[0], &format!("bench group {g}"), &members[1..])
                    .await?;
                group_ids.push(conv.id);
            }
            // Drain the group-created events from every member's connection.
            for c in conns.iter_mut() {
                c.call(Req::Ping(pb::Ping { nonce: 1 })).await?;
            }
            Ok((0..w.endpoints)
                .map(|e| vec![group_ids[w.group_of(e).0]])
                .collect())
        }
    }
}

/// Runs a workload against Parley and returns the run to report on.
pub async fn traffic(server: &ParleyServer, w: Workload) -> anyhow::Result<Arc<Run>> {
    w.check()?;
    let tag = format!("b{}", crate::load::run_id());
    let users = users(server, &tag, w.endpoints).await?;
    let (mut conns, _) = login_all(server, &users, "bench", 64).await?;
    let convs = conversations(server, &w, &users, &mut conns).await?;
    let run = Arc::new(Run::new(w, Duration::from_millis(300), server.pids.clone()));
    let mut set = JoinSet::new();
    for (e, (c, convs)) in conns.into_iter().zip(convs).enumerate() {
        let me: Arc<str> = users.ids[e].as_str().into();
        let (run, tag) = (run.clone(), tag.clone());
        set.spawn(async move { endpoint(c, e, me, convs, run, tag).await });
    }
    run.settle(Duration::from_secs(5)).await;
    run.stop();
    while let Some(r) = set.join_next().await {
        if let Err(e) = r? {
            run.error(format!("connection: {e:#}"));
        }
    }
    Ok(run)
}

/// One endpoint: sends its share of the schedule, records acks and
/// deliveries, and acknowledges its inbox every 200 ms as the SDK does.
async fn endpoint(
    mut c: Conn,
    e: usize,
    me: Arc<str>,
    convs: Vec<u64>,
    run: Arc<Run>,
    tag: String,
) -> anyhow::Result<()> {
    let rank = run.w.group_of(e).1;
    let mut sends = run.sends_of(e).peekable();
    let mut stop = run.stopped();
    let mut ack_tick = tokio::time::interval(Duration::from_millis(200));
    let mut acked_cursor = c.cursor;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    loop {
        let next_due = sends.peek().map_or(far, |&k| run.due(k).into());
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            r = c.fill() => {
                r?;
                while let Some(f) = c.decoded()? {
                    on_frame(&mut c, f, e, rank, &me, &run)?;
                }
            }
            _ = sleep_until(next_due) => {
                let now = Instant::now();
                while let Some(&k) = sends.peek() {
                    if run.due(k) > now {
                        break;
                    }
                    sends.next();
                    let data = crate::load::payload(k, run.w.size);
                    let send = pb::Send {
                        client_msg_id: format!("{tag}-{k:x}"),
                        conversation_id: convs[run.w.slot(k)],
                        content: Some(pb::Content {
                            body: Some(pb::content::Body::Custom(pb::Custom {
                                r#type: "bench".into(),
                                data,
                            })),
                        }),
                    };
                    c.push_with(k + 1, Req::Send(send));
                    run.sent(k);
                }
                c.flush().await?;
            }
            _ = ack_tick.tick() => {
                if c.cursor > acked_cursor {
                    acked_cursor = c.cursor;
                    c.push(Req::Ack(pb::Ack { cursor: acked_cursor }));
                    c.flush().await?;
                }
            }
        }
    }
}

fn on_frame(
    c: &mut Conn,
    f: pb::ServerFrame,
    e: usize,
    rank: usize,
    me: &str,
    run: &Run,
) -> anyhow::Result<()> {
    match f.body {
        Some(Resp::Deliver(d)) => {
            c.cursor = c.cursor.max(d.inbox_seq);
            let Some(m) = d.message else { return Ok(()) };
            if m.sender_id == me {
                return Ok(());
            }
            if let Some(pb::content::Body::Custom(custom)) = m.content.and_then(|c| c.body)
                && let Some(k) = crate::load::number(&custom.data)
            {
                run.delivered(e, rank, k);
            }
        }
        Some(Resp::SendAck(_)) => run.acked(e, f.request_id - 1),
        Some(Resp::Error(err)) => {
            run.error(format!("{:?}", err.code()));
            if err.fatal {
                bail!("fatal error: {:?} {}", err.code(), err.message);
            }
        }
        Some(Resp::GoAway(g)) => bail!("GoAway: {}", g.reason),
        _ => {}
    }
    Ok(())
}

/// Holds `n` authenticated devices that only send heartbeats; dropping it
/// closes them.
pub struct Idle {
    pub connected: usize,
    pub connect_secs: f64,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Idle {
    pub async fn close(mut self) {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Connects `n` devices at up to `per_sec` logins a second, spread over the
/// gateways, and keeps them alive with a Ping every heartbeat interval.
pub async fn idle(server: &ParleyServer, users: &Users, per_sec: f64) -> anyhow::Result<Idle> {
    let n = users.ids.len();
    let started = Instant::now();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(1024);
    for i in 0..n {
        // Ramp: connection i may start at i / per_sec.
        let at = started + Duration::from_secs_f64(i as f64 / per_sec);
        let dst = server.gateways[i % server.gateways.len()];
        let token = users.tokens[i].clone();
        let (mut stop, done) = (stop_rx.clone(), done_tx.clone());
        tasks.spawn(async move {
            sleep_until(at.into()).await;
            let (mut c, login) = match Conn::login(i, dst, &token, "idle", None).await {
                Ok(ok) => ok,
                Err(e) => {
                    let _ = done.send(Err(e)).await;
                    return;
                }
            };
            drop(token);
            let _ = done.send(Ok(())).await;
            drop(done);
            // First ping at a random point of the interval, so pings spread.
            let every = login.heartbeat;
            let mut next = tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    r = c.fill() => {
                        if r.is_err() {
                            return;
                        }
                        while let Ok(Some(_)) = c.decoded() {}
                    }
                    _ = sleep_until(next) => {
                        c.push(Req::Ping(pb::Ping { nonce: 0 }));
                        if c.flush().await.is_err() {
                            return;
                        }
                        next += every;
                    }
                }
            }
        });
    }
    drop(done_tx);
    let mut connected = 0;
    let mut first_error = None;
    for _ in 0..n {
        match done_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => break,
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        tracing::warn!("{} of {n} logins failed; first: {e:#}", n - connected);
    }
    Ok(Idle {
        connected,
        connect_secs,
        stop,
        tasks,
    })
}

/// A device coming back to `missed` messages: how long until it has them
/// all, with the catch-up counted from Auth to SyncDone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatchUp {
    pub missed: u64,
    pub received: u64,
    pub fill_secs: f64,
    pub catch_up_secs: f64,
    pub messages_per_sec: f64,
    pub usage: crate::procs::Usage,
}

/// Fills an offline device's inbox with `missed` messages from `senders`
/// users, then logs it in and times the catch-up.
pub async fn catch_up(
    server: &ParleyServer,
    missed: u64,
    senders: usize,
    rate: f64,
    size: usize,
) -> anyhow::Result<CatchUp> {
    let tag = format!("c{}", crate::load::run_id());
    let users = users(server, &tag, senders + 1).await?;
    // The device was last here at inbox position 0.
    let (away, _) = Conn::login(0, server.gateways[0], &users.tokens[0], "phone", None).await?;
    drop(away);
    let sender_users = Users {
        ids: users.ids[1..].to_vec(),
        tokens: users.tokens[1..].to_vec(),
    };
    let (mut conns, _) = login_all(server, &sender_users, "bench", 64).await?;
    let mut convs = Vec::new();
    for c in &mut conns {
        let peer = users.ids[0].clone();
        match c.call(Req::OpenDirect(pb::OpenDirect { peer })).await? {
            Resp::Conversation(conv) => convs.push(conv.id),
            other => bail!("OpenDirect answered {other:?}"),
        }
    }
    let started = Instant::now();
    let w = Workload {
        endpoints: senders,
        rate,
        duration: Duration::from_secs_f64(missed as f64 / rate),
        size,
        shape: Shape::Direct { peers: 1 },
        seed: 0,
    };
    let run = Arc::new(Run::new(w, Duration::from_millis(100), Vec::new()));
    anyhow::ensure!(run.total() == missed, "the rate must divide the count");
    let mut set = JoinSet::new();
    for (e, (c, conv)) in conns.into_iter().zip(convs).enumerate() {
        let me: Arc<str> = sender_users.ids[e].as_str().into();
        let (run, tag) = (run.clone(), tag.clone());
        set.spawn(async move { endpoint(c, e, me, vec![conv], run, tag).await });
    }
    // Everything acked means everything stored.
    let deadline = run.due(run.total()) + Duration::from_secs(60);
    while run.report("", true).acked < Some(missed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.stop();
    while set.join_next().await.is_some() {}
    let fill_secs = started.elapsed().as_secs_f64();
    let acked = run.report("", true).acked.unwrap_or(0);
    anyhow::ensure!(
        acked == missed,
        "only {acked} of {missed} messages were stored"
    );

    let meter = crate::procs::Meter::start(server.pids.clone());
    let started = Instant::now();
    let (back, login) =
        Conn::login(0, server.gateways[0], &users.tokens[0], "phone", Some(0)).await?;
    let catch_up_secs = started.elapsed().as_secs_f64();
    let usage = meter.finish();
    drop(back);
    Ok(CatchUp {
        missed,
        received: login.caught_up,
        fill_secs,
        catch_up_secs,
        messages_per_sec: login.caught_up as f64 / catch_up_secs,
        usage,
    })
}
