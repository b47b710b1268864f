//! One-process Parley on ephemeral ports, driven by the SDK and by raw
//! sockets: chat, devices, catch-up, dedup, ordering, refusals, bad input,
//! timeouts and shutdown.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use parley::{Embedded, EmbeddedConfig};
use parley_client::{Admin, Client, ClientConfig, Event};
use parley_proto::pb::{self, ErrorCode, client_frame::Body as Req, server_frame::Body as Resp};
use parley_proto::{PROTOCOL_VERSION, codec};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

#[path = "embedded/media.rs"]
mod media;
#[path = "embedded/push.rs"]
mod push;
#[path = "embedded/receipts.rs"]
mod receipts;

struct World {
    _dir: tempfile::TempDir,
    server: Embedded,
    admin: Admin,
}

impl World {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut EmbeddedConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = EmbeddedConfig::ephemeral(dir.path().to_path_buf());
        cfg.gateway.send_rate = 100_000;
        cfg.gateway.send_burst = 100_000;
        tweak(&mut cfg);
        let server = Embedded::start(cfg).await.unwrap();
        let admin = Admin::connect(&server.admin_url(), &server.admin_key)
            .await
            .unwrap();
        Self {
            _dir: dir,
            server,
            admin,
        }
    }

    /// Creates a user and returns a token for it.
    async fn user(&mut self, id: &str) -> String {
        self.admin.create_user(id, "").await.unwrap();
        self.admin.token(id, 3600).await.unwrap().token
    }

    async fn connect(&self, token: &str, device: &str) -> (Client, Receiver<Event>) {
        self.connect_at(token, device, None).await
    }

    async fn connect_at(
        &self,
        token: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> (Client, Receiver<Event>) {
        let mut cfg = ClientConfig::new(self.server.tcp_addr.to_string(), token, device);
        cfg.cursor = cursor;
        Client::connect(cfg).await.unwrap()
    }
}

/// The next chat message (system events skipped).
/// The next message delivered whose content `is` picks out.
async fn next_message(
    events: &mut Receiver<Event>,
    is: impl Fn(&pb::content::Body) -> bool,
) -> pb::Message {
    loop {
        match timeout(WAIT, events.recv())
            .await
            .expect("no message in time")
            .expect("events closed")
        {
            Event::Message { message, .. }
                if message
                    .content
                    .as_ref()
                    .and_then(|c| c.body.as_ref())
                    .is_some_and(&is) =>
            {
                return message;
            }
            _ => {}
        }
    }
}

async fn next_text(events: &mut Receiver<Event>) -> pb::Message {
    next_message(events, |b| matches!(b, pb::content::Body::Text(_))).await
}

async fn next_synced(events: &mut Receiver<Event>) -> pb::SyncDone {
    loop {
        if let Event::Synced(s) = timeout(WAIT, events.recv())
            .await
            .expect("no sync in time")
            .expect("closed")
        {
            return s;
        }
    }
}

fn text_of(m: &pb::Message) -> &str {
    m.content.as_ref().and_then(|c| c.as_text()).unwrap_or("")
}

// ---- raw sockets ----

async fn raw(addr: std::net::SocketAddr) -> (TcpStream, BytesMut) {
    (TcpStream::connect(addr).await.unwrap(), BytesMut::new())
}

async fn put(s: &mut TcpStream, rid: u64, body: Req) {
    let mut buf = BytesMut::new();
    codec::encode_frame(&pb::ClientFrame::new(rid, body), &mut buf);
    s.write_all(&buf).await.unwrap();
}

/// The next frame, or None at end of stream.
async fn get(s: &mut TcpStream, buf: &mut BytesMut) -> Option<pb::ServerFrame> {
    timeout(WAIT, async {
        loop {
            if let Some(f) = codec::decode_frame(buf, 1 << 20).unwrap() {
                return Some(f);
            }
            if s.read_buf(buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    })
    .await
    .expect("no frame in time")
}

fn hello() -> Req {
    Req::Hello(pb::Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client: "test".into(),
    })
}

fn auth(token: &str, device: &str) -> Req {
    Req::Auth(pb::Auth {
        token: token.into(),
        device_id: device.into(),
        cursor: None,
    })
}

/// Expects a fatal error with `code` answering request `rid`, then the end
/// of the stream: a clean close (FIN), not a reset.
async fn expect_fatal(s: &mut TcpStream, buf: &mut BytesMut, code: ErrorCode, rid: u64) {
    loop {
        match get(s, buf).await {
            Some(pb::ServerFrame {
                request_id,
                body: Some(Resp::Error(e)),
            }) => {
                assert_eq!(e.code(), code, "{}", e.message);
                assert!(e.fatal);
                assert!(!e.message.is_empty());
                assert_eq!(
                    request_id, rid,
                    "the Error answers the frame that caused it"
                );
                break;
            }
            Some(_) => continue,
            None => panic!("closed without an error frame"),
        }
    }
    expect_clean_close(s, buf).await;
}

/// Reads to the end of the stream: no more frames, and a FIN, not a reset.
async fn expect_clean_close(s: &mut TcpStream, buf: &mut BytesMut) {
    let end = timeout(WAIT, async {
        loop {
            if let Some(f) = codec::decode_frame::<pb::ServerFrame>(buf, 1 << 20).unwrap() {
                panic!("a frame after the last one: {f:?}");
            }
            match s.read_buf(buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the connection must close after a fatal error");
    end.expect("the server must close with a FIN, not a reset");
}

/// Logs in on a raw socket and reads up to SyncDone.
async fn raw_login(w: &World, token: &str, device: &str) -> (TcpStream, BytesMut) {
    let s = TcpStream::connect(w.server.tcp_addr).await.unwrap();
    login_on(s, token, device).await
}

/// Logs in on `s` and reads up to the end of the catch-up.
async fn login_on(mut s: TcpStream, token: &str, device: &str) -> (TcpStream, BytesMut) {
    let mut buf = BytesMut::new();
    put(&mut s, 1, hello()).await;
    put(&mut s, 2, auth(token, device)).await;
    while !matches!(
        get(&mut s, &mut buf).await.unwrap().body,
        Some(Resp::SyncDone(_))
    ) {}
    (s, buf)
}

// ---- tests ----

#[tokio::test]
async fn direct_chat_reaches_every_device_of_both_users() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (phone, mut phone_ev) = w.connect(&ta, "phone").await;
    let (_laptop, mut laptop_ev) = w.connect(&ta, "laptop").await;
    let (_tablet, mut tablet_ev) = w.connect(&ta, "tablet").await;
    let (bob, mut bob_ev) = w.connect(&tb, "phone").await;

    let conv = phone.open_direct("bob").await.unwrap();
    let ack = phone
        .send(conv.id, pb::Content::text("hi bob 👋"))
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    let got = next_text(&mut bob_ev).await;
    assert_eq!(
        (text_of(&got), got.msg_id, got.sender_id.as_str()),
        ("hi bob 👋", ack.msg_id, "alice")
    );
    // The sender's other devices see it; the sending device does not get an echo.
    assert_eq!(next_text(&mut laptop_ev).await.msg_id, ack.msg_id);
    assert_eq!(next_text(&mut tablet_ev).await.msg_id, ack.msg_id);

    let reply = bob
        .send(conv.id, pb::Content::text("hi alice"))
        .await
        .unwrap();
    assert_eq!(reply.seq, 2);
    for ev in [&mut phone_ev, &mut laptop_ev, &mut tablet_ev] {
        let m = next_text(ev).await;
        assert_eq!((text_of(&m), m.seq), ("hi alice", 2));
    }
    let media = pb::Content {
        body: Some(pb::content::Body::Media(Box::new(pb::Media {
            kind: pb::MediaKind::Image as i32,
            url: "https://cdn.example/cat.png".into(),
            mime_type: "image/png".into(),
            ..Default::default()
        }))),
    };
    phone.send(conv.id, media.clone()).await.unwrap();
    loop {
        if let Event::Message { message, .. } = timeout(WAIT, bob_ev.recv()).await.unwrap().unwrap()
        {
            assert_eq!(message.content, Some(media));
            break;
        }
    }
}

#[tokio::test]
async fn group_members_see_concurrent_senders_in_one_order() {
    let mut w = World::start().await;
    let names = ["ann", "ben", "cat", "dan"];
    let mut clients = Vec::new();
    for n in names {
        let t = w.user(n).await;
        clients.push(w.connect(&t, "d1").await);
    }
    let group = clients[0]
        .0
        .create_group("crew", &["ben", "cat", "dan"])
        .await
        .unwrap();
    assert_eq!(group.members.len(), 4);
    // Each member also watches from a second device.
    let mut watchers = Vec::new();
    let mut watcher_clients = Vec::new();
    for n in names {
        let t = w.admin.token(n, 3600).await.unwrap().token;
        let (c, ev) = w.connect(&t, "watch").await;
        watcher_clients.push(c);
        watchers.push(ev);
    }

    let per_sender = 25;
    let mut tasks = Vec::new();
    for (i, (c, _)) in clients.iter().enumerate() {
        let c = c.clone();
        let id = group.id;
        tasks.push(tokio::spawn(async move {
            for k in 0..per_sender {
                c.send(id, pb::Content::text(format!("{i}-{k}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = per_sender * names.len();
    let mut orders = Vec::new();
    for ev in watchers.iter_mut() {
        let mut seqs = Vec::new();
        let mut texts = Vec::new();
        while texts.len() < total {
            let m = next_text(ev).await;
            seqs.push(m.seq);
            texts.push(text_of(&m).to_owned());
        }
        assert!(
            seqs.windows(2).all(|p| p[1] == p[0] + 1),
            "seqs are gap-free and ascending: {seqs:?}"
        );
        orders.push(texts);
    }
    assert!(
        orders.windows(2).all(|p| p[0] == p[1]),
        "every member sees the same order"
    );
    let mut uniq = orders[0].clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), total, "each message exactly once");
}

#[tokio::test]
async fn an_offline_device_catches_up_on_1000_messages_then_goes_live() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _ae) = w.connect(&ta, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap();
    let (bob, mut bob_ev) = w.connect(&tb, "phone").await;
    alice
        .send(conv.id, pb::Content::text("before"))
        .await
        .unwrap();
    assert_eq!(text_of(&next_text(&mut bob_ev).await), "before");
    let cursor = bob.cursor();
    bob.close().await;

    let mut sends = Vec::new();
    for i in 0..1000 {
        let a = alice.clone();
        sends.push(tokio::spawn(async move {
            a.send(conv.id, pb::Content::text(format!("m{i}")))
                .await
                .unwrap()
        }));
        if sends.len() == 100 {
            for s in sends.drain(..) {
                s.await.unwrap();
            }
        }
    }
    for s in sends {
        s.await.unwrap();
    }

    let (bob, mut bob_ev) = w.connect_at(&tb, "phone", Some(cursor)).await;
    let mut last_seq = 1;
    for _ in 0..1000 {
        let m = next_text(&mut bob_ev).await;
        assert_eq!(m.seq, last_seq + 1, "in order, nothing missing or doubled");
        last_seq = m.seq;
    }
    let done = next_synced(&mut bob_ev).await;
    assert!(done.complete);
    assert_eq!(done.cursor, bob.cursor());
    // The seam: the next live message is the very next one.
    alice
        .send(conv.id, pb::Content::text("after"))
        .await
        .unwrap();
    let m = next_text(&mut bob_ev).await;
    assert_eq!((text_of(&m), m.seq), ("after", 1002));

    // A device resuming from its acknowledged cursor (no cursor given) gets nothing again.
    tokio::time::sleep(Duration::from_millis(500)).await; // the SDK acks every 200 ms
    bob.close().await;
    let (_bob, mut bob_ev) = w.connect(&tb, "phone").await;
    let done = next_synced(&mut bob_ev).await;
    assert_eq!(done.cursor, 1002);
}

#[tokio::test]
async fn a_resend_after_a_lost_ack_stores_one_message() {
    let mut w = World::start().await;
    let (ta, _tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _e) = w.connect(&ta, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap();

    let send = Req::Send(pb::Send {
        client_msg_id: "once-only".into(),
        conversation_id: conv.id,
        content: Some(pb::Content::text("exactly once")),
    });
    // Send, then drop the connection without reading the ack.
    let (mut s, _buf) = raw_login(&w, &ta, "raw").await;
    put(&mut s, 7, send.clone()).await;
    drop(s);
    // Resend on a new connection.
    let (mut s, mut buf) = raw_login(&w, &ta, "raw").await;
    put(&mut s, 8, send).await;
    let ack = loop {
        let f = get(&mut s, &mut buf).await.unwrap();
        if let Some(Resp::SendAck(a)) = f.body {
            assert_eq!(f.request_id, 8);
            break a;
        }
    };
    assert_eq!(ack.seq, 1);
    assert_eq!(ack.client_msg_id, "once-only");
    let again = alice
        .send_with_id(
            "once-only".into(),
            conv.id,
            pb::Content::text("exactly once"),
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.msg_id, ack.msg_id);
    // The same id for another message is a mistake, said out loud.
    let group = alice.create_group("g", &["bob"]).await.unwrap();
    for (conv, text) in [(conv.id, "other words"), (group.id, "exactly once")] {
        let err = alice
            .send_with_id("once-only".into(), conv, pb::Content::text(text))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    }
    let page = alice
        .history(conv.id, 0, pb::Direction::Backward, 50)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
}

#[tokio::test]
async fn blocks_and_membership_are_enforced() {
    let mut w = World::start().await;
    let (ta, tb, tc) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let (alice, _) = w.connect(&ta, "d").await;
    let (bob, _) = w.connect(&tb, "d").await;
    let (carol, _) = w.connect(&tc, "d").await;
    let conv = alice.open_direct("bob").await.unwrap();

    bob.block("alice", true).await.unwrap();
    let err = alice
        .send(conv.id, pb::Content::text("hello?"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Blocked));
    bob.send(conv.id, pb::Content::text("I can still write"))
        .await
        .unwrap();
    bob.block("alice", false).await.unwrap();
    alice
        .send(conv.id, pb::Content::text("thanks"))
        .await
        .unwrap();

    let err = carol
        .history(conv.id, 0, pb::Direction::Backward, 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
    let err = carol
        .send(conv.id, pb::Content::text("let me in"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
    let err = carol
        .send(424242, pb::Content::text("nowhere"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
    let err = alice.open_direct("nobody").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = alice.block("nobody", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = alice
        .request(Req::History(pb::HistoryRequest {
            conversation_id: conv.id,
            from_seq: 0,
            direction: 7,
            limit: 10,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    let err = alice
        .send(conv.id, pb::Content::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));

    // Groups: a non-owner cannot remove others; a full group refuses more.
    let g = alice.create_group("g", &["bob"]).await.unwrap();
    let err = bob
        .request(Req::RemoveMembers(pb::RemoveMembers {
            conversation_id: g.id,
            users: vec!["alice".into()],
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    bob.request(Req::LeaveGroup(pb::LeaveGroup {
        conversation_id: g.id,
    }))
    .await
    .unwrap();
    let err = bob
        .send(g.id, pb::Content::text("still here?"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
}

#[tokio::test]
async fn group_size_is_capped() {
    let mut w = World::with(|c| c.chat.max_group_members = 3).await;
    let ta = w.user("a").await;
    for u in ["b", "c", "d"] {
        w.user(u).await;
    }
    let (a, _) = w.connect(&ta, "d").await;
    let err = a.create_group("big", &["b", "c", "d"]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::GroupFull));
    let g = a.create_group("ok", &["b", "c"]).await.unwrap();
    let err = a
        .request(Req::AddMembers(pb::AddMembers {
            conversation_id: g.id,
            users: vec!["d".into()],
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::GroupFull));
}

#[tokio::test]
async fn bad_expired_and_forged_tokens_are_refused() {
    let mut w = World::start().await;
    w.user("alice").await;
    let expired = w
        .server
        .chat
        .tokens()
        .issue("alice", parley_core::now_ms() / 1000 - 7200, 60)
        .unwrap();
    let forged = parley_core::TokenKeys::new(&[7u8; 32])
        .unwrap()
        .issue("alice", parley_core::now_ms() / 1000, 600)
        .unwrap();
    // Two seconds past `exp`: beyond the default allowance of one.
    let just_expired = w
        .server
        .chat
        .tokens()
        .issue("alice", parley_core::now_ms() / 1000 - 62, 60)
        .unwrap();
    for (token, code) in [
        ("garbage".to_owned(), ErrorCode::Unauthenticated),
        (forged, ErrorCode::Unauthenticated),
        (expired, ErrorCode::TokenExpired),
        (just_expired, ErrorCode::TokenExpired),
    ] {
        let (mut s, mut buf) = raw(w.server.tcp_addr).await;
        put(&mut s, 1, hello()).await;
        put(&mut s, 2, auth(&token, "d")).await;
        expect_fatal(&mut s, &mut buf, code, 2).await;
    }
    let cfg = ClientConfig::new(w.server.tcp_addr.to_string(), "garbage", "d");
    assert_eq!(
        Client::connect(cfg).await.unwrap_err().code(),
        Some(ErrorCode::Unauthenticated)
    );
}

#[tokio::test]
async fn bad_frames_get_an_error_and_a_close() {
    let w = World::start().await;
    let addr = w.server.tcp_addr;

    // Oversized: refused from the length prefix alone.
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&(10_000_000u32).to_be_bytes()).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::FrameTooLarge, 0).await;

    // Garbled protobuf.
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::BadFrame, 0).await;

    // Garbled after a readable request id: the Error answers it.
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&[0, 0, 0, 5, 0x08, 0x07, 0x22, 0x40, 0x0a])
        .await
        .unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::BadFrame, 7).await;

    // Out of order: Send before Hello, then Send before Auth.
    let (mut s, mut buf) = raw(addr).await;
    put(&mut s, 5, Req::Send(pb::Send::default())).await;
    expect_fatal(&mut s, &mut buf, ErrorCode::UnexpectedFrame, 5).await;
    let (mut s, mut buf) = raw(addr).await;
    put(&mut s, 1, hello()).await;
    put(&mut s, 2, Req::Send(pb::Send::default())).await;
    expect_fatal(&mut s, &mut buf, ErrorCode::UnexpectedFrame, 2).await;

    // A version the server does not speak.
    let (mut s, mut buf) = raw(addr).await;
    put(
        &mut s,
        3,
        Req::Hello(pb::Hello {
            min_version: 9,
            max_version: 12,
            client: String::new(),
        }),
    )
    .await;
    expect_fatal(&mut s, &mut buf, ErrorCode::UnsupportedVersion, 3).await;

    // An empty frame (no body), and one with only a request id.
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&[0, 0, 0, 0]).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::BadFrame, 0).await;
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&[0, 0, 0, 2, 0x08, 0x09]).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::BadFrame, 9).await;
}

#[tokio::test]
async fn a_fatal_error_is_read_before_the_close_whatever_the_client_still_sends() {
    let mut w = World::start().await;
    let t = w.user("alice").await;
    let addr = w.server.tcp_addr;

    // A real Send over the frame limit, written whole.
    let (mut s, mut buf) = raw_login(&w, &t, "big").await;
    let mut frame = BytesMut::new();
    codec::encode_frame(
        &pb::ClientFrame::new(
            4,
            Req::Send(pb::Send {
                client_msg_id: "big".into(),
                conversation_id: 1,
                content: Some(pb::Content::text("x".repeat(70_000))),
            }),
        ),
        &mut frame,
    );
    s.write_all(&frame).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::FrameTooLarge, 0).await;

    // A 2^31 length prefix followed by data.
    let (mut s, mut buf) = raw(addr).await;
    s.write_all(&(1u32 << 31).to_be_bytes()).await.unwrap();
    s.write_all(&vec![0x5a; 200_000]).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::FrameTooLarge, 0).await;

    // Frames back to back after the offending one.
    let (mut s, mut buf) = raw(addr).await;
    let mut frames = BytesMut::new();
    codec::encode_frame(
        &pb::ClientFrame::new(6, Req::Send(pb::Send::default())),
        &mut frames,
    );
    for n in 0..2_000 {
        codec::encode_frame(
            &pb::ClientFrame::new(n, Req::Ping(pb::Ping { nonce: n })),
            &mut frames,
        );
    }
    s.write_all(&frames).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::UnexpectedFrame, 6).await;

    // The same over the connection cap: SERVER_BUSY, then a clean close.
    let w = World::with(|c| c.gateway.max_connections = 1).await;
    let (_held, _b) = raw(w.server.tcp_addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    s.write_all(&vec![0x5a; 100_000]).await.unwrap();
    expect_fatal(&mut s, &mut buf, ErrorCode::ServerBusy, 0).await;
}

#[tokio::test]
async fn a_device_that_logs_in_again_replaces_its_older_connection() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (mut old, mut old_buf) = raw_login(&w, &ta, "phone").await;
    let (mut other, mut other_buf) = raw_login(&w, &ta, "laptop").await;
    let (mut new, mut new_buf) = raw_login(&w, &ta, "phone").await;
    expect_fatal(&mut old, &mut old_buf, ErrorCode::DeviceReplaced, 0).await;

    // The new connection and the other device get what comes next.
    let (bob, _e) = w.connect(&tb, "phone").await;
    let conv = bob.open_direct("alice").await.unwrap();
    bob.send(conv.id, pb::Content::text("still here?"))
        .await
        .unwrap();
    for (s, buf) in [(&mut new, &mut new_buf), (&mut other, &mut other_buf)] {
        let m = loop {
            if let Some(Resp::Deliver(d)) = get(s, buf).await.expect("open").body {
                break d.message.unwrap();
            }
        };
        assert_eq!(text_of(&m), "still here?");
    }

    // An SDK client that is replaced stops; it does not fight back.
    let (sdk, mut sdk_ev) = w.connect(&ta, "tablet").await;
    let (_tablet, _b) = raw_login(&w, &ta, "tablet").await;
    let closed = timeout(WAIT, async {
        let mut last = None;
        while let Some(ev) = sdk_ev.recv().await {
            if let Event::Disconnected { reason } = ev {
                panic!("the SDK treated replacement as a reason to reconnect: {reason}");
            }
            last = Some(ev);
        }
        last
    })
    .await
    .expect("the replaced SDK client's events end");
    match closed {
        Some(Event::Closed(e)) => assert_eq!(e.code(), Some(ErrorCode::DeviceReplaced)),
        other => panic!("the last event must say why: {other:?}"),
    }
    assert_eq!(
        sdk.open_direct("bob").await.unwrap_err().code(),
        None,
        "a replaced client is closed"
    );
}

#[tokio::test]
async fn hello_announces_the_limits_and_rate_limited_says_when_to_retry() {
    let mut w = World::with(|c| {
        c.gateway.send_rate = 2;
        c.gateway.send_burst = 3;
    })
    .await;
    let (ta, _tb) = (w.user("alice").await, w.user("bob").await);
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    let Some(Resp::HelloOk(ok)) = get(&mut s, &mut buf).await.unwrap().body else {
        panic!("no HelloOk");
    };
    assert_eq!((ok.send_rate_per_sec, ok.send_burst), (2, 3));
    assert_eq!(
        ok.max_frame_bytes as usize,
        parley_proto::DEFAULT_MAX_FRAME_BYTES
    );
    assert!(ok.heartbeat_interval_ms > 0 && ok.heartbeat_interval_ms < ok.idle_timeout_ms);
    assert!(ok.pong_timeout_ms > 0);
    put(&mut s, 2, auth(&ta, "d")).await;
    put(
        &mut s,
        3,
        Req::OpenDirect(pb::OpenDirect { peer: "bob".into() }),
    )
    .await;
    let conv = loop {
        if let Some(Resp::Conversation(c)) = get(&mut s, &mut buf).await.unwrap().body {
            break c.id;
        }
    };
    for n in 0..4u64 {
        let send = pb::Send {
            client_msg_id: format!("m{n}"),
            conversation_id: conv,
            content: Some(pb::Content::text("hi")),
        };
        put(&mut s, 10 + n, Req::Send(send)).await;
    }
    let mut acked = 0;
    let limited = loop {
        let f = get(&mut s, &mut buf).await.unwrap();
        match f.body {
            Some(Resp::SendAck(_)) => acked += 1,
            Some(Resp::Error(e)) => break (f.request_id, e),
            _ => {}
        }
    };
    assert_eq!(acked, 3, "the burst passes");
    assert_eq!(limited.0, 13);
    assert_eq!(limited.1.code(), ErrorCode::RateLimited);
    assert!(!limited.1.fatal);
    assert!(
        (1..=500).contains(&limited.1.retry_after_ms),
        "a token comes within 1/rate: {}",
        limited.1.retry_after_ms
    );
}

#[tokio::test]
async fn idle_connections_are_closed_and_pings_keep_them_open() {
    let mut w = World::with(|c| c.gateway.idle_timeout = Duration::from_millis(600)).await;
    let t = w.user("alice").await;
    let (mut quiet, mut qbuf) = raw_login(&w, &t, "quiet").await;
    let (mut chatty, mut cbuf) = raw_login(&w, &t, "chatty").await;
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        put(&mut chatty, 0, Req::Ping(pb::Ping { nonce: n })).await;
    }
    expect_fatal(&mut quiet, &mut qbuf, ErrorCode::IdleTimeout, 0).await;
    put(&mut chatty, 0, Req::Ping(pb::Ping { nonce: 99 })).await;
    loop {
        match get(&mut chatty, &mut cbuf).await.unwrap().body {
            Some(Resp::Pong(p)) if p.nonce == 99 => break,
            Some(Resp::Pong(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_disconnected_not_buffered() {
    let mut w = World::with(|c| {
        c.gateway.write_timeout = Duration::from_millis(300);
        c.gateway.push_queue = 8;
    })
    .await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _) = w.connect(&ta, "d").await;
    let conv = alice.open_direct("bob").await.unwrap();
    // A small receive buffer, fixed: left to itself the kernel may grow it
    // to tens of megabytes (net.ipv4.tcp_rmem) and absorb all of this.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = socket.connect(w.server.tcp_addr).await.unwrap();
    let (mut stuck, _buf) = login_on(stream, &tb, "stuck").await;
    let big = "x".repeat(60_000);
    for _ in 0..300 {
        alice
            .send(conv.id, pb::Content::text(big.clone()))
            .await
            .unwrap();
    }
    // The sends can end (in a third of a second here) before a write to
    // the stuck reader has been blocked for the whole write timeout: it
    // must not be let off by the draining below.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The gateway gave up on the stuck reader: draining the socket ends in EOF.
    let drained = timeout(WAIT, async {
        let mut sink = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match stuck.read(&mut sink).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the stuck connection was never closed");
    assert!(
        drained < 300 * 60_000,
        "the gateway must not have buffered everything ({drained} bytes)"
    );
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect() {
    let mut w = World::start().await;
    let t = w.user("alice").await;
    let (mut s, mut buf) = raw_login(&w, &t, "d").await;
    let World { server, _dir, .. } = w;
    let stopping = tokio::spawn(server.shutdown());
    let go = loop {
        match get(&mut s, &mut buf)
            .await
            .expect("closed without GoAway")
            .body
        {
            Some(Resp::GoAway(g)) => break g,
            _ => continue,
        }
    };
    assert!(go.reason.contains("shutting down"), "{}", go.reason);
    assert!(go.redirect.is_empty());
    assert!(get(&mut s, &mut buf).await.is_none());
    timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn websocket_clients_speak_the_same_frames() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (bob, _) = w.connect(&tb, "d").await;
    let conv = bob.open_direct("alice").await.unwrap();
    let url = format!("ws://{}/", w.server.ws_addr.unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let frame = |rid, body| {
        tokio_tungstenite::tungstenite::Message::Binary(
            pb::ClientFrame::new(rid, body).encode_to_vec().into(),
        )
    };
    ws.send(frame(1, hello())).await.unwrap();
    ws.send(frame(2, auth(&ta, "browser"))).await.unwrap();
    // A device never seen before starts at the head: send once it is in.
    let mut saw_auth = false;
    let mut sent = false;
    loop {
        let msg = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let f = pb::ServerFrame::decode(msg.into_data()).unwrap();
        match f.body {
            Some(Resp::AuthOk(ok)) => {
                assert_eq!(ok.user_id, "alice");
                saw_auth = true;
            }
            Some(Resp::SyncDone(_)) if !sent => {
                bob.send(conv.id, pb::Content::text("to the browser"))
                    .await
                    .unwrap();
                sent = true;
            }
            Some(Resp::Deliver(d)) => {
                assert_eq!(text_of(d.message.as_ref().unwrap()), "to the browser");
                break;
            }
            _ => {}
        }
    }
    assert!(saw_auth);
    // A text message is not a frame.
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello".into(),
    ))
    .await
    .unwrap();
    loop {
        match timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                if let Some(Resp::Error(e)) = pb::ServerFrame::decode(b).unwrap().body {
                    assert_eq!(e.code(), ErrorCode::BadFrame);
                    break;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn catch_up_says_when_retention_removed_messages() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _) = w.connect(&ta, "d").await;
    let conv = alice.open_direct("bob").await.unwrap();
    for i in 0..5 {
        alice
            .send(conv.id, pb::Content::text(format!("old {i}")))
            .await
            .unwrap();
    }
    let removed = w
        .server
        .chat
        .store()
        .prune_before(parley_core::now_ms() + 1)
        .await
        .unwrap();
    assert_eq!(removed, 5);
    alice
        .send(conv.id, pb::Content::text("kept"))
        .await
        .unwrap();
    let (_bob, mut ev) = w.connect_at(&tb, "d", Some(0)).await;
    assert_eq!(text_of(&next_text(&mut ev).await), "kept");
    let done = next_synced(&mut ev).await;
    assert!(!done.complete);
    assert_eq!((done.missing_from, done.missing_to, done.cursor), (1, 5, 6));
}

#[tokio::test]
async fn the_admin_api_requires_its_key() {
    let w = World::start().await;
    let mut wrong = Admin::connect(&w.server.admin_url(), "not-the-key")
        .await
        .unwrap();
    let err = wrong.create_user("mallory", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut admin = w.admin.clone();
    for bad in ["bad id!", "has:colon"] {
        let err = admin.create_user(bad, "").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
    }
    admin.create_user("ok", "").await.unwrap();
    assert_eq!(
        admin.create_user("ok", "").await.unwrap_err().code(),
        tonic::Code::AlreadyExists
    );
}

#[tokio::test]
async fn the_sdk_reconnects_after_a_restart_and_resumes_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EmbeddedConfig::ephemeral(dir.path().to_path_buf());
    cfg.gateway.reconnect_hint = Duration::from_millis(50);
    let server = Embedded::start(cfg.clone()).await.unwrap();
    let mut admin = Admin::connect(&server.admin_url(), &server.admin_key)
        .await
        .unwrap();
    admin.create_user("alice", "").await.unwrap();
    admin.create_user("bob", "").await.unwrap();
    let ta = admin.token("alice", 3600).await.unwrap().token;
    let tb = admin.token("bob", 3600).await.unwrap().token;
    let (bob, mut bob_ev) =
        Client::connect(ClientConfig::new(server.tcp_addr.to_string(), &tb, "phone"))
            .await
            .unwrap();
    let conv = bob.open_direct("alice").await.unwrap();

    // Restart on the same ports and data directory.
    cfg.listen = server.tcp_addr;
    cfg.ws_listen = None;
    cfg.admin_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    server.shutdown().await;
    loop {
        if let Event::Disconnected { .. } = timeout(WAIT, bob_ev.recv()).await.unwrap().unwrap() {
            break;
        }
    }
    let server = Embedded::start(cfg).await.unwrap();
    let (alice, _) = Client::connect(ClientConfig::new(server.tcp_addr.to_string(), &ta, "phone"))
        .await
        .unwrap();
    for i in 0..3 {
        alice
            .send(
                conv.id,
                pb::Content::text(format!("while you were away {i}")),
            )
            .await
            .unwrap();
    }
    // Bob's SDK reconnected by itself and gets each message once, in order.
    for i in 0..3 {
        assert_eq!(
            text_of(&next_text(&mut bob_ev).await),
            format!("while you were away {i}")
        );
    }
    // Its sends work again too.
    let ack = bob.send(conv.id, pb::Content::text("back")).await.unwrap();
    assert_eq!(ack.seq, 4);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reopened_terminal_chat_shows_each_missed_message_once() {
    let mut w = World::start().await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _ae) = w.connect(&ta, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap().id;

    // Bob's terminal device has seen one line and acknowledged it.
    let (bob, mut bob_ev) = w.connect(&tb, "cli").await;
    alice
        .send(conv, pb::Content::text("seen-live"))
        .await
        .unwrap();
    assert_eq!(text_of(&next_text(&mut bob_ev).await), "seen-live");
    bob.close().await;
    for n in 1..=3 {
        let line = format!("missed-{n}");
        alice.send(conv, pb::Content::text(line)).await.unwrap();
    }

    let mut chat = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["chat", "--server", &w.server.tcp_addr.to_string()])
        .args(["--token", &tb, "--device", "cli", "--to", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = lines_of(chat.stdout.take().unwrap());
    let mut seen: Vec<String> = Vec::new();
    let mut read_until = async |end: &str, seen: &mut Vec<String>| loop {
        let line = timeout(WAIT, lines.recv())
            .await
            .expect("the chat printed nothing in time")
            .expect("the chat ended early");
        let done = line.ends_with(end);
        seen.push(line);
        if done {
            return;
        }
    };
    read_until(": missed-3", &mut seen).await;
    // Delivered in inbox order: once this shows, every catch-up copy of the
    // missed lines would have shown before it.
    alice
        .send(conv, pb::Content::text("after-open"))
        .await
        .unwrap();
    read_until(": after-open", &mut seen).await;
    drop(chat.stdin.take());
    let status = tokio::task::spawn_blocking(move || chat.wait())
        .await
        .unwrap();
    assert!(status.unwrap().success());
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    for text in [
        "seen-live",
        "missed-1",
        "missed-2",
        "missed-3",
        "after-open",
    ] {
        let times = seen
            .iter()
            .filter(|l| l.ends_with(&format!(": {text}")))
            .count();
        assert_eq!(times, 1, "{text} shown {times} times in {seen:#?}");
    }
}

/// The lines a child process writes to `pipe`, as they come.
fn lines_of(
    pipe: impl std::io::Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

/// One HTTP/1.1 GET: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = media::http("GET", &format!("http://{addr}{path}"), &[], b"", None).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn parley_up_serves_health_metrics_and_the_route_lookup() {
    let mut w = World::start().await;
    let ops = w.server.ops_addr.expect("an ops listener");
    assert_eq!(http_get(ops, "/healthz").await.0, 200);
    assert_eq!(http_get(ops, "/readyz").await.0, 200);
    let (status, route) = http_get(ops, "/route").await;
    assert_eq!(status, 200);
    let me = w.server.tcp_addr.to_string();
    assert_eq!(
        route.trim(),
        format!("{{\"address\":\"{me}\",\"candidates\":[\"{me}\"]}}")
    );
    // The SDK finds the server through it, with no fixed address.
    let t = w.user("alice").await;
    let mut cfg = ClientConfig::new("", &t, "d");
    cfg.routes = vec![format!("http://{ops}/route")];
    let (alice, _e) = Client::connect(cfg).await.unwrap();
    alice.open_direct("alice").await.unwrap();
    let (status, metrics) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("parley_gateway_sessions 1"), "{metrics}");
    assert!(
        metrics.contains("parley_chat_"),
        "the chat service's metrics too"
    );
}

#[tokio::test]
async fn parley_up_counts_the_clients_it_tells_to_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s".repeat(32);
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["up", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--ws-listen", "off"])
        .args(["--admin-listen", "127.0.0.1:0", "--ops-listen", "off"])
        .args(["--admin-key", "k", "--token-secret", &secret])
        .env("PARLEY_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(up.stderr.take().unwrap());
    let field = |line: &str, name: &str| -> Option<String> {
        let rest = line.split_once(&format!("{name}="))?.1;
        Some(rest.split_whitespace().next()?.to_owned())
    };
    let (tcp, admin) = loop {
        let line = timeout(WAIT, lines.recv())
            .await
            .unwrap()
            .expect("parley up ended");
        if line.contains("Parley is up") {
            break (
                field(&line, "tcp")
                    .unwrap()
                    .parse::<std::net::SocketAddr>()
                    .unwrap(),
                field(&line, "admin").unwrap(),
            );
        }
    };
    let mut admin = Admin::connect(&admin, "k").await.unwrap();
    admin.create_user("alice", "").await.unwrap();
    let token = parley_core::TokenKeys::new(secret.as_bytes())
        .unwrap()
        .issue("alice", parley_core::now_ms() / 1000, 600)
        .unwrap();
    let mut clients = Vec::new();
    for d in ["a", "b", "c", "d"] {
        let (mut s, mut buf) = raw(tcp).await;
        put(&mut s, 1, hello()).await;
        put(&mut s, 2, auth(&token, d)).await;
        while !matches!(
            get(&mut s, &mut buf).await.unwrap().body,
            Some(Resp::SyncDone(_))
        ) {}
        clients.push((s, buf));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let said = loop {
        let line = timeout(WAIT, lines.recv())
            .await
            .unwrap()
            .expect("no shutdown log");
        if line.contains("telling clients to reconnect") && line.contains("connections=") {
            break line;
        }
    };
    assert_eq!(field(&said, "connections").as_deref(), Some("4"), "{said}");
    assert_eq!(field(&said, "sessions").as_deref(), Some("4"), "{said}");
    for (mut s, mut buf) in clients {
        loop {
            match get(&mut s, &mut buf)
                .await
                .expect("closed without GoAway")
                .body
            {
                Some(Resp::GoAway(_)) => break,
                _ => continue,
            }
        }
    }
    let exited = tokio::task::spawn_blocking(move || up.wait())
        .await
        .unwrap();
    assert!(exited.unwrap().success());
}

#[tokio::test]
async fn the_sdk_follows_a_redirect_that_comes_before_its_login() {
    let mut w = World::start().await;
    let t = w.user("alice").await;
    // A gateway that sends every login elsewhere.
    let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let target = w.server.tcp_addr.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = busy.accept().await {
            let mut out = BytesMut::new();
            let go = pb::GoAway {
                reason: "busy".into(),
                reconnect_after_ms: 0,
                redirect: target.clone(),
            };
            codec::encode_frame(&pb::ServerFrame::new(0, Resp::GoAway(go)), &mut out);
            let _ = s.write_all(&out).await;
            let _ = s.shutdown().await;
        }
    });
    let cfg = ClientConfig::new(busy_addr.to_string(), &t, "d");
    let (alice, mut events) = timeout(WAIT, Client::connect(cfg))
        .await
        .unwrap()
        .expect("logged in where the redirect said");
    assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    alice.open_direct("alice").await.unwrap();
}

/// Waits until `events` end and returns the error that ended them; a
/// reconnect attempt on the way fails the test.
async fn closed_with(events: &mut Receiver<Event>, within: Duration) -> Option<ErrorCode> {
    let last = timeout(within, async {
        let mut last = None;
        while let Some(ev) = events.recv().await {
            if let Event::Disconnected { reason } = ev {
                panic!("the SDK reconnected after a log-out: {reason}");
            }
            last = Some(ev);
        }
        last
    })
    .await
    .expect("the client's events end in time");
    match last {
        Some(Event::Closed(e)) => e.code(),
        other => panic!("the last event must say why: {other:?}"),
    }
}

/// A device logged out by the app's backend is closed at once with
/// SESSION_REVOKED and its token refused from then on, while the user's
/// other devices go on; a new token logs it in again. A device can list
/// its user's devices and log them all out, itself included.
#[tokio::test]
async fn a_logged_out_device_is_closed_and_its_token_refused() {
    let mut w = World::start().await;
    w.user("alice").await;
    let phone_token = w
        .admin
        .device_token("alice", "phone", 3600)
        .await
        .unwrap()
        .token;
    let laptop_token = w
        .admin
        .device_token("alice", "laptop", 3600)
        .await
        .unwrap()
        .token;
    let (_phone, mut phone_ev) = w.connect(&phone_token, "phone").await;
    let (laptop, mut laptop_ev) = w.connect(&laptop_token, "laptop").await;
    next_synced(&mut phone_ev).await;
    next_synced(&mut laptop_ev).await;

    // A device token is for its device only.
    let stolen = ClientConfig::new(w.server.tcp_addr.to_string(), &phone_token, "other");
    assert_eq!(
        Client::connect(stolen).await.unwrap_err().code(),
        Some(ErrorCode::Unauthenticated)
    );

    let started = std::time::Instant::now();
    w.admin.log_out("alice", Some("phone")).await.unwrap();
    assert_eq!(
        closed_with(&mut phone_ev, Duration::from_secs(1)).await,
        Some(ErrorCode::SessionRevoked)
    );
    println!("log-out to close: {:?}", started.elapsed());
    let again = ClientConfig::new(w.server.tcp_addr.to_string(), &phone_token, "phone");
    assert_eq!(
        Client::connect(again).await.unwrap_err().code(),
        Some(ErrorCode::SessionRevoked)
    );
    // The laptop goes on.
    assert!(laptop.devices().await.is_ok());

    // A new token logs the phone in again.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let fresh = w
        .admin
        .device_token("alice", "phone", 3600)
        .await
        .unwrap()
        .token;
    let (_phone, mut phone_ev) = w.connect(&fresh, "phone").await;
    next_synced(&mut phone_ev).await;

    let devices = laptop.devices().await.unwrap();
    let ids: Vec<_> = devices
        .iter()
        .map(|d| (d.device_id.as_str(), d.current))
        .collect();
    assert!(ids.contains(&("phone", false)), "{ids:?}");
    let phone = devices.iter().find(|d| d.device_id == "phone").unwrap();
    assert!(phone.logged_out_at_ms > 0);

    // The laptop logs out every device: both close, the laptop after its
    // answer.
    laptop.log_out(None, true).await.unwrap();
    for events in [&mut phone_ev, &mut laptop_ev] {
        assert_eq!(
            closed_with(events, Duration::from_secs(1)).await,
            Some(ErrorCode::SessionRevoked)
        );
    }
    let after = ClientConfig::new(w.server.tcp_addr.to_string(), &fresh, "phone");
    assert_eq!(
        Client::connect(after).await.unwrap_err().code(),
        Some(ErrorCode::SessionRevoked)
    );
}

/// A device logged in with a session keeps itself logged in: holding an
/// expired access token and its refresh token, the SDK refreshes once the
/// server refuses the access token, logs in with the new one and reports
/// the new pair. Over raw frames, Refresh works before Auth, and a refresh
/// token that is not one closes the connection.
#[tokio::test]
async fn an_expired_access_token_is_refreshed_by_the_sdk() {
    let mut w = World::start().await;
    w.user("alice").await;
    let session = w
        .admin
        .create_session("alice", "phone", 0, 0)
        .await
        .unwrap();
    let expired = w
        .server
        .chat
        .tokens()
        .issue_for(
            "alice",
            Some("phone"),
            parley_core::now_ms() - 7_200_000,
            60,
        )
        .unwrap();
    let mut cfg = ClientConfig::new(w.server.tcp_addr.to_string(), &expired, "phone");
    cfg.refresh_token = Some(session.refresh_token.clone());
    let (client, mut events) = Client::connect(cfg).await.unwrap();
    let tokens = loop {
        match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::Tokens(t) => break t,
            Event::Connected { .. } => panic!("logged in before refreshing"),
            _ => {}
        }
    };
    assert_ne!(tokens.refresh_token, session.refresh_token);
    assert!(tokens.access_expires_at_ms > parley_core::now_ms());
    assert!(
        client.devices().await.is_ok(),
        "logged in with the new token"
    );

    // Raw frames: Hello, Refresh with the newest refresh token, then Auth
    // with the access token it answers.
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    let refresh = pb::Refresh {
        refresh_token: tokens.refresh_token.clone(),
    };
    put(&mut s, 2, Req::Refresh(refresh)).await;
    let mut access = None;
    while access.is_none() {
        match get(&mut s, &mut buf).await.unwrap().body {
            Some(Resp::Tokens(t)) => access = Some(t.access_token),
            Some(Resp::HelloOk(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    put(&mut s, 3, auth(&access.unwrap(), "laptop")).await;
    expect_fatal(&mut s, &mut buf, ErrorCode::Unauthenticated, 3).await;

    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    let garbage = pb::Refresh {
        refresh_token: "not-a-refresh-token".into(),
    };
    put(&mut s, 2, Req::Refresh(garbage)).await;
    expect_fatal(&mut s, &mut buf, ErrorCode::Unauthenticated, 2).await;
}

/// The answer to request `rid` (deliveries and the like skipped).
async fn answer(s: &mut TcpStream, buf: &mut BytesMut, rid: u64) -> Resp {
    loop {
        let frame = get(s, buf).await.expect("an answer before the close");
        if frame.request_id == rid
            && let Some(body) = frame.body
        {
            return body;
        }
    }
}

/// RATE_LIMITED with a retry-after, not fatal.
fn limited(resp: Resp, what: &str) {
    match resp {
        Resp::Error(e) => {
            assert_eq!(e.code(), ErrorCode::RateLimited, "{what}: {}", e.message);
            assert!(!e.fatal, "{what}");
            // At most two windows: the count of this one must also slide
            // out of the next far enough.
            assert!(
                e.retry_after_ms > 0 && e.retry_after_ms <= 120_000,
                "{what}: {}",
                e.retry_after_ms
            );
        }
        other => panic!("{what}: expected RATE_LIMITED, got {other:?}"),
    }
}

/// A user has at most so many devices online: one more is refused at Auth
/// with TOO_MANY_DEVICES (the SDK's first connect returns it; a reconnect
/// would try again every 30 s or so), while a device already online logs
/// in again, another user is not
/// held back, and a device going offline makes room.
#[tokio::test]
async fn devices_online_are_capped_per_user() {
    let mut w = World::with(|c| c.gateway.limits.devices_per_user = Some(2)).await;
    let addr = w.server.tcp_addr.to_string();
    let at = |token: &str| ClientConfig::new(addr.clone(), token, "tablet");
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (phone, _pbuf) = raw_login(&w, &ta, "phone").await;
    let (_laptop, _lbuf) = raw_login(&w, &ta, "laptop").await;
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    put(&mut s, 2, auth(&ta, "tablet")).await;
    expect_fatal(&mut s, &mut buf, ErrorCode::TooManyDevices, 2).await;
    let refused = Client::connect(at(&ta)).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManyDevices), "{refused}");
    assert!(refused.to_string().contains("2 devices"), "{refused}");
    // The phone logs in again (replacing its connection): not a new device.
    let (_phone2, _p2buf) = raw_login(&w, &ta, "phone").await;
    raw_login(&w, &tb, "tablet").await;
    drop(phone);
    drop(_laptop);
    let mut admitted = false;
    for _ in 0..50 {
        if let Ok((c, _)) = Client::connect(at(&ta)).await {
            c.close().await;
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the laptop's going made room for the tablet");
}

/// Each limit holds for a user across all its devices (sends, reads,
/// group operations, logins) or for an address across users (logins):
/// past it a request gets RATE_LIMITED with when to retry, a login a fatal
/// one; other users are not held back by it.
#[tokio::test]
async fn rate_limits_hold_per_user_across_devices_and_per_address() {
    use parley_core::limits::{Limits, Rate};
    let mut w = World::with(|c| {
        c.gateway.limits = Limits {
            logins_per_ip: Some(Rate::per_minute(6)),
            logins_per_user: Some(Rate::per_minute(4)),
            sends_per_user: Some(Rate::per_minute(5)),
            reads_per_user: Some(Rate::per_minute(3)),
            group_ops_per_user: Some(Rate::per_minute(2)),
            uploads_per_user: None,
            devices_per_user: None,
        }
    })
    .await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (mut phone, mut pbuf) = raw_login(&w, &ta, "phone").await;
    let (mut laptop, mut lbuf) = raw_login(&w, &ta, "laptop").await;

    // Group operations: two, whichever device.
    put(
        &mut phone,
        3,
        Req::OpenDirect(pb::OpenDirect { peer: "bob".into() }),
    )
    .await;
    let Resp::Conversation(conv) = answer(&mut phone, &mut pbuf, 3).await else {
        panic!("a conversation");
    };
    put(&mut laptop, 3, Req::Block(pb::Block { user: "bob".into() })).await;
    assert!(matches!(
        answer(&mut laptop, &mut lbuf, 3).await,
        Resp::Done(_)
    ));
    put(
        &mut phone,
        4,
        Req::Unblock(pb::Unblock { user: "bob".into() }),
    )
    .await;
    limited(
        answer(&mut phone, &mut pbuf, 4).await,
        "a third group operation",
    );

    // Sends: five across both devices, the sixth refused.
    for i in 0..6u64 {
        let (s, b) = if i % 2 == 0 {
            (&mut phone, &mut pbuf)
        } else {
            (&mut laptop, &mut lbuf)
        };
        let send = Req::Send(pb::Send {
            client_msg_id: format!("m{i}"),
            conversation_id: conv.id,
            content: Some(pb::Content::text("hi")),
        });
        put(s, 10 + i, send).await;
        let resp = answer(s, b, 10 + i).await;
        if i < 5 {
            assert!(matches!(resp, Resp::SendAck(_)), "send {i}: {resp:?}");
        } else {
            limited(resp, "a sixth send");
        }
    }

    // Reads: three.
    for i in 0..4u64 {
        let history = Req::History(pb::HistoryRequest {
            conversation_id: conv.id,
            from_seq: 0,
            direction: pb::Direction::Backward as i32,
            limit: 10,
        });
        put(&mut laptop, 20 + i, history).await;
        let resp = answer(&mut laptop, &mut lbuf, 20 + i).await;
        if i < 3 {
            assert!(matches!(resp, Resp::HistoryPage(_)), "read {i}: {resp:?}");
        } else {
            limited(resp, "a fourth read");
        }
    }

    // Bob is held back by none of alice's limits.
    let (mut bob, mut bbuf) = raw_login(&w, &tb, "phone").await;
    put(
        &mut bob,
        3,
        Req::ListConversations(pb::ListConversations::default()),
    )
    .await;
    assert!(matches!(
        answer(&mut bob, &mut bbuf, 3).await,
        Resp::Conversations(_)
    ));

    // Logins: alice has used two of four, the address three of six.
    raw_login(&w, &ta, "tablet").await;
    raw_login(&w, &ta, "watch").await;
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    put(&mut s, 2, auth(&ta, "tv")).await;
    match answer(&mut s, &mut buf, 2).await {
        Resp::Error(e) => {
            assert_eq!(e.code(), ErrorCode::RateLimited, "{}", e.message);
            assert!(e.fatal && e.retry_after_ms > 0, "{e:?}");
        }
        other => panic!("a fifth login of alice: {other:?}"),
    }
    // That refused login counted against the address too: six in all.
    let (mut s, mut buf) = raw(w.server.tcp_addr).await;
    put(&mut s, 1, hello()).await;
    put(&mut s, 2, auth(&tb, "laptop")).await;
    match answer(&mut s, &mut buf, 2).await {
        Resp::Error(e) => assert_eq!(e.code(), ErrorCode::RateLimited, "{}", e.message),
        other => panic!("a seventh login from one address: {other:?}"),
    }
}
