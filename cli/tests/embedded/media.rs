//! Uploads on the one-process default: files through the SDK and the
//! signed HTTP endpoint, refusals of what does not match, members-only
//! downloads, and garbage collection.

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};

use parley_core::limits::Rate;
use sha2::{Digest, Sha256};

use super::*;

/// A `w` × `h` picture encoded as `format`.
fn picture(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

/// One HTTP/1.1 request to an `http://` URL: (status, body). `length`
/// overrides the Content-Length sent (the body is sent as given).
pub(super) async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    length: Option<usize>,
) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = TcpStream::connect(authority).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        length.unwrap_or(body.len())
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..at]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[at + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = unchunk(&body);
    }
    (status, body)
}

fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<T, parley_client::ClientError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a server error: {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

async fn slot(
    client: &Client,
    req: pb::UploadRequest,
) -> Result<pb::UploadSlot, parley_client::ClientError> {
    match client.request(Req::Upload(req)).await? {
        Resp::UploadSlot(s) => Ok(s),
        other => panic!("expected an UploadSlot, got {other:?}"),
    }
}

async fn complete(client: &Client, blob_id: &str) -> Result<pb::Blob, parley_client::ClientError> {
    let req = Req::UploadComplete(pb::UploadComplete {
        blob_id: blob_id.into(),
        ..Default::default()
    });
    match client.request(req).await? {
        Resp::Blob(b) => Ok(b),
        other => panic!("expected a Blob, got {other:?}"),
    }
}

fn upload(kind: pb::MediaKind, mime: &str, size: u64, sha256: Vec<u8>) -> pb::UploadRequest {
    pb::UploadRequest {
        kind: kind as i32,
        mime_type: mime.into(),
        size_bytes: size,
        sha256,
        name: "x".into(),
    }
}

async fn put_bytes(slot: &pb::UploadSlot, bytes: &[u8], length: Option<usize>) -> u16 {
    let headers: Vec<(&str, &str)> = slot
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_str()))
        .collect();
    http("PUT", &slot.url, &headers, bytes, length).await.0
}

/// Starts a PUT of 1000 bytes to an upload URL and drops the connection
/// after `n`.
async fn cut_off(url: &str, n: usize) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = TcpStream::connect(authority).await.unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b'x'; n]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// What a HEAD of an upload URL says of it (`Upload-Offset`).
async fn upload_offset(url: &str) -> Option<u64> {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = TcpStream::connect(authority).await.unwrap();
    let req = format!("HEAD {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("upload-offset: "))
        .and_then(|v| v.trim().parse().ok())
}

fn media_of(m: &pb::Message) -> &pb::Media {
    match m.content.as_ref().and_then(|c| c.body.as_ref()) {
        Some(pb::content::Body::Media(media)) => media,
        other => panic!("not media: {other:?}"),
    }
}

async fn next_media(events: &mut Receiver<Event>) -> pb::Message {
    next_message(events, |b| matches!(b, pb::content::Body::Media(_))).await
}

/// Files under `dir`, by name.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

/// A member uploads an image and a photo and sends them; the other member
/// gets them filled in by the server (type, size, dimensions, SHA-256,
/// thumbnail) and downloads them byte for byte; a non-member, an expired
/// or forged URL, bytes that are not what was declared, an upload cut off
/// half way and an upload still pending are each refused with their code;
/// garbage collection deletes what no message uses and keeps what one
/// does; the daily quota and the upload rate hold.
#[tokio::test]
async fn files_go_up_once_whole_and_come_down_only_to_members() {
    let mut w = World::with(|c| {
        c.chat.media.upload_ttl = Duration::from_secs(1);
        c.chat.media.download_ttl = Duration::from_secs(1);
        c.chat.media.unused_grace = Duration::from_secs(1);
        c.chat.media.daily_bytes = 14 * 1024 * 1024;
        c.gateway.limits.uploads_per_user = Some(Rate::per_minute(15));
    })
    .await;
    let (ta, tb, tc) = (
        w.user("alice").await,
        w.user("bob").await,
        w.user("carol").await,
    );
    let (alice, _aev) = w.connect(&ta, "phone").await;
    let (bob, mut bev) = w.connect(&tb, "laptop").await;
    let (carol, _cev) = w.connect(&tc, "tablet").await;
    let conv = alice.open_direct("bob").await.unwrap().id;
    let files = tempfile::tempdir().unwrap();

    // An image, with progress, arrives filled in and whole.
    let png = picture(640, 480, image::ImageFormat::Png);
    let cat = files.path().join("cat.png");
    std::fs::write(&cat, &png).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let progress: parley_client::Progress =
        Arc::new(move |done, total| log.lock().unwrap().push((done, total)));
    let (ack, blob) = alice
        .send_file(conv, &cat, "a cat", Some(progress))
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().last(),
        Some(&(png.len() as u64, png.len() as u64))
    );
    assert_eq!((blob.width, blob.height), (640, 480));
    assert_eq!(blob.mime_type, "image/png");
    assert_eq!(blob.sha256, Sha256::digest(&png).to_vec());
    let thumb = blob.thumbnail.clone().expect("a thumbnail of an image");
    assert_eq!(
        (thumb.width, thumb.height, thumb.mime_type.as_str()),
        (320, 240, "image/jpeg")
    );
    let got = next_media(&mut bev).await;
    assert_eq!(got.seq, ack.seq);
    let m = media_of(&got);
    assert_eq!(m.blob_id, blob.blob_id);
    assert_eq!(
        (m.width, m.height, m.size_bytes),
        (640, 480, png.len() as u64)
    );
    assert_eq!((m.caption.as_str(), m.name.as_str()), ("a cat", "cat.png"));
    assert_eq!(m.thumbnail, blob.thumbnail);
    assert!(m.url.is_empty());
    let saved = files.path().join("bob-cat.png");
    let n = bob.download(&got, false, &saved, None).await.unwrap();
    assert_eq!(n, png.len() as u64);
    assert_eq!(std::fs::read(&saved).unwrap(), png, "byte for byte");
    let small = files.path().join("bob-cat-small.jpg");
    bob.download(&got, true, &small, None).await.unwrap();
    let small = std::fs::read(&small).unwrap();
    assert_eq!(&small[..2], &[0xFF, 0xD8], "a JPEG thumbnail");
    assert_eq!(small.len() as u64, thumb.size_bytes);

    // A JPEG too; and history shows what the live delivery showed.
    let jpeg = picture(300, 200, image::ImageFormat::Jpeg);
    let dog = files.path().join("dog.jpg");
    std::fs::write(&dog, &jpeg).unwrap();
    let (dog_ack, dog_blob) = alice.send_file(conv, &dog, "", None).await.unwrap();
    assert_eq!((dog_blob.width, dog_blob.height), (300, 200));
    assert!(dog_blob.thumbnail.is_some());
    let page = bob
        .history(conv, 0, pb::Direction::Backward, 10)
        .await
        .unwrap();
    let stored = page.messages.iter().find(|m| m.seq == dog_ack.seq).unwrap();
    assert_eq!(media_of(stored).sha256, Sha256::digest(&jpeg).to_vec());

    // Only members download; nobody sends another's upload.
    let ask = Req::Download(pb::DownloadRequest {
        conversation_id: conv,
        seq: ack.seq,
        thumbnail: false,
    });
    assert_eq!(
        code_of(carol.request(ask.clone()).await),
        ErrorCode::NotMember
    );
    let carol_bob = carol.open_direct("bob").await.unwrap().id;
    let stolen = pb::Content {
        body: Some(pb::content::Body::Media(Box::new(pb::Media {
            blob_id: blob.blob_id.clone(),
            ..Default::default()
        }))),
    };
    assert_eq!(
        code_of(carol.send(carol_bob, stolen).await),
        ErrorCode::NotFound
    );
    let text_seq = alice
        .send(conv, pb::Content::text("no file here"))
        .await
        .unwrap()
        .seq;
    let no_file = Req::Download(pb::DownloadRequest {
        conversation_id: conv,
        seq: text_seq,
        thumbnail: false,
    });
    assert_eq!(code_of(bob.request(no_file).await), ErrorCode::NotFound);

    // A URL is good for what it names until it expires, and only that.
    let Resp::DownloadUrl(url) = bob.request(ask.clone()).await.unwrap() else {
        panic!("a download URL")
    };
    let (status, part) = http("GET", &url.url, &[("Range", "bytes=0-9")], b"", None).await;
    assert_eq!((status, part.as_slice()), (206, &png[..10]));
    let forged = url.url.replace("type=image%2Fpng", "type=text%2Fhtml");
    assert_eq!(http("GET", &forged, &[], b"", None).await.0, 403);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        http("GET", &url.url, &[], b"", None).await.0,
        403,
        "expired"
    );

    // Refused at the slot: too large, a type the kind does not allow.
    let big = upload(pb::MediaKind::Image, "image/png", 21 * 1024 * 1024, vec![]);
    assert_eq!(code_of(slot(&alice, big).await), ErrorCode::PayloadTooLarge);
    let pdf = upload(pb::MediaKind::Image, "application/pdf", 10, vec![]);
    assert_eq!(
        code_of(slot(&alice, pdf).await),
        ErrorCode::UnsupportedMediaType
    );

    // Fewer bytes than declared: refused by the endpoint, so incomplete;
    // then whole, it completes (and stays unused).
    let notes = vec![b'n'; 100];
    let s = slot(
        &alice,
        upload(pb::MediaKind::File, "text/plain", 100, vec![]),
    )
    .await
    .unwrap();
    assert_eq!(put_bytes(&s, &notes[..50], None).await, 400);
    assert_eq!(
        code_of(complete(&alice, &s.blob_id).await),
        ErrorCode::UploadIncomplete
    );
    assert_eq!(put_bytes(&s, &notes, None).await, 200);
    assert_eq!(
        put_bytes(&s, &notes, None).await,
        409,
        "complete bytes stay as they are"
    );
    let orphan = complete(&alice, &s.blob_id).await.unwrap();
    assert_eq!(orphan.size_bytes, 100);

    // Another checksum: refused at completion, and the upload is gone.
    let s = slot(
        &alice,
        upload(pb::MediaKind::File, "text/plain", 100, vec![0; 32]),
    )
    .await
    .unwrap();
    assert_eq!(put_bytes(&s, &notes, None).await, 200);
    assert_eq!(
        code_of(complete(&alice, &s.blob_id).await),
        ErrorCode::UploadMismatch
    );
    assert_eq!(
        code_of(complete(&alice, &s.blob_id).await),
        ErrorCode::NotFound
    );

    // A PNG declared as a JPEG.
    let s = slot(
        &alice,
        upload(pb::MediaKind::Image, "image/jpeg", png.len() as u64, vec![]),
    )
    .await
    .unwrap();
    assert_eq!(put_bytes(&s, &png, None).await, 200);
    assert_eq!(
        code_of(complete(&alice, &s.blob_id).await),
        ErrorCode::UnsupportedMediaType
    );

    // Cut off part way: the upload is incomplete, a message cannot use
    // it, and what arrived waits for the rest (HEAD says how much).
    let s = slot(
        &alice,
        upload(pb::MediaKind::File, "text/plain", 1000, vec![]),
    )
    .await
    .unwrap();
    cut_off(&s.url, 400).await;
    let media_dir = w._dir.path().join("media");
    assert!(!names(&media_dir.join("blobs")).contains(&s.blob_id));
    assert_eq!(upload_offset(&s.url).await, Some(400));
    assert_eq!(
        code_of(complete(&alice, &s.blob_id).await),
        ErrorCode::UploadIncomplete
    );

    // One writer at a time: a PUT while another is still sending the same
    // upload is refused (409, Upload-Offset 0: ask again later).
    {
        let rest = s.url.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let mut first = TcpStream::connect(authority).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: text/plain\r\n\
             Content-Range: bytes 400-999/1000\r\nContent-Length: 600\r\n\r\n"
        );
        first.write_all(head.as_bytes()).await.unwrap();
        first.write_all(&[b'x'; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let range = [
            ("Content-Type", "text/plain"),
            ("Content-Range", "bytes 400-999/1000"),
        ];
        let (status, _) = http("PUT", &s.url, &range, &[b'y'; 600], None).await;
        assert_eq!(status, 409, "a second writer");
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            upload_offset(&s.url).await,
            Some(500),
            "the first writer's bytes stay"
        );
    }

    // Another, resumed with Content-Range from where it ended: whole.
    let tail = slot(
        &alice,
        upload(pb::MediaKind::File, "text/plain", 1000, vec![]),
    )
    .await
    .unwrap();
    cut_off(&tail.url, 300).await;
    assert_eq!(upload_offset(&tail.url).await, Some(300));
    let rest = |from: usize| {
        let range = format!("bytes {from}-999/1000");
        let url = tail.url.clone();
        async move {
            let headers = [
                ("Content-Type", "text/plain"),
                ("Content-Range", range.as_str()),
            ];
            http("PUT", &url, &headers, &vec![b'x'; 1000 - from], None)
                .await
                .0
        }
    };
    assert_eq!(rest(200).await, 409, "not from where it ended");
    // The cut-off request may still be ending (its fsync) and hold the
    // upload: 409 meanwhile, and the client asks again, as told.
    let mut status = rest(300).await;
    for _ in 0..50 {
        if status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = rest(300).await;
    }
    assert_eq!(status, 200);
    assert_eq!(upload_offset(&tail.url).await, Some(1000));
    assert_eq!(
        complete(&alice, &tail.blob_id).await.unwrap().size_bytes,
        1000
    );
    let pending = pb::Content {
        body: Some(pb::content::Body::Media(Box::new(pb::Media {
            blob_id: s.blob_id.clone(),
            ..Default::default()
        }))),
    };
    assert_eq!(
        code_of(alice.send(conv, pending).await),
        ErrorCode::UploadIncomplete
    );

    // Garbage collection, once the grace has passed: the unused and the
    // unfinished go, what messages use stays.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let deleted = w.server.chat.collect_blobs().await.unwrap();
    assert_eq!(
        deleted, 3,
        "the orphan, the resumed one and the cut-off upload"
    );
    let mut kept = vec![
        blob.blob_id.clone(),
        format!("{}.thumb", blob.blob_id),
        dog_blob.blob_id.clone(),
        format!("{}.thumb", dog_blob.blob_id),
    ];
    kept.sort();
    assert_eq!(names(&media_dir.join("blobs")), kept);
    assert!(
        names(&media_dir.join("partial")).is_empty(),
        "the cut-off bytes too"
    );
    assert_eq!(
        code_of(complete(&alice, &orphan.blob_id).await),
        ErrorCode::NotFound
    );
    let again = files.path().join("bob-cat-again.png");
    bob.download(&got, false, &again, None).await.unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), png);

    // The daily quota (14 MiB, of which the two pictures use some), then
    // the rate.
    let file = |mb: u64| {
        upload(
            pb::MediaKind::File,
            "application/zip",
            mb * 1024 * 1024,
            vec![],
        )
    };
    slot(&alice, file(12)).await.unwrap();
    assert_eq!(
        code_of(slot(&alice, file(2)).await),
        ErrorCode::QuotaExceeded
    );
    let mut limited = false;
    for _ in 0..15 {
        match slot(&alice, file(1)).await {
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                limited = true;
                break;
            }
            _ => {}
        }
    }
    assert!(limited, "15 upload requests a minute, then RATE_LIMITED");
}

/// A TCP relay in front of an HTTP server that cuts its `nth` connection
/// (counting from 1) once `cut` bytes went through it towards the server,
/// and counts every byte it carried that way.
struct Relay {
    addr: std::net::SocketAddr,
    listener: Option<tokio::net::TcpListener>,
    carried: Arc<std::sync::atomic::AtomicU64>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The doomed connection goes silent (held open, nothing carried)
    /// rather than closing: a half-dead connection.
    freeze: bool,
}

impl Relay {
    async fn bind() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self {
            addr: listener.local_addr().unwrap(),
            listener: Some(listener),
            carried: Arc::default(),
            connections: Arc::default(),
            freeze: false,
        }
    }

    fn run(&mut self, target: std::net::SocketAddr, nth: usize, cut: u64) {
        use std::sync::atomic::Ordering;
        let listener = self.listener.take().expect("runs once");
        let (conns, bytes) = (self.connections.clone(), self.carried.clone());
        let freeze = self.freeze;
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let doomed = conns.fetch_add(1, Ordering::SeqCst) + 1 == nth;
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let mut server = TcpStream::connect(target).await.unwrap();
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = async {
                        let mut buf = vec![0; 16 * 1024];
                        let mut sent = 0u64;
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if doomed && sent >= cut && freeze {
                                std::future::pending::<()>().await;
                            }
                            if n == 0 || (doomed && sent >= cut) {
                                return;
                            }
                            sent += n as u64;
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
    }

    fn carried(&self) -> u64 {
        self.carried.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The SDK's upload through a connection that breaks after `cut` bytes the
/// first time: it asks where the upload stands and sends only the rest,
/// and the file arrives whole. The HTTP endpoint is reached through a
/// relay that cuts the first connection (`public_url` names the relay).
#[tokio::test]
async fn an_upload_that_breaks_off_resumes_where_it_ended() {
    let mut relay = Relay::bind().await;
    let relay_addr = relay.addr;
    let mut w = World::with(|c| c.public_url = Some(format!("http://{relay_addr}"))).await;
    let cut = 300_000u64;
    relay.run(w.server.http_addr.unwrap(), 1, cut);
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _aev) = w.connect(&ta, "phone").await;
    let (bob, mut bev) = w.connect(&tb, "laptop").await;
    let conv = alice.open_direct("bob").await.unwrap().id;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("talk.ogg");
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let (_, blob) = alice.send_file(conv, &path, "", None).await.unwrap();
    assert_eq!(blob.size_bytes, 1_000_000);
    assert_eq!(blob.kind, pb::MediaKind::Voice as i32);
    assert!(relay.connections() >= 3, "cut, HEAD, the rest");
    let moved = relay.carried();
    assert!(
        moved < 1_100_000,
        "only the rest went again, not the {cut} bytes before the cut: {moved} bytes carried"
    );
    let got = next_media(&mut bev).await;
    let saved = dir.path().join("bob.ogg");
    bob.download(&got, false, &saved, None).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), bytes);
}

/// An upload whose connection goes silent half way (held open, nothing
/// moving, as when a NAT forgets it): the SDK gives it up after its stall
/// time rather than waiting forever, the endpoint lets the upload go after
/// its own (so the resume is not refused as a second writer), and the
/// rest goes up from where it ended.
#[tokio::test]
async fn an_upload_whose_connection_goes_silent_resumes() {
    let mut relay = Relay::bind().await;
    relay.freeze = true;
    let relay_addr = relay.addr;
    let mut w = World::with(|c| {
        c.public_url = Some(format!("http://{relay_addr}"));
        c.media_body_stall = Duration::from_millis(800);
    })
    .await;
    let cut = 400_000u64;
    relay.run(w.server.http_addr.unwrap(), 1, cut);
    let ta = w.user("alice").await;
    let mut config = ClientConfig::new(w.server.tcp_addr.to_string(), &ta, "phone");
    config.transfer_stall = Duration::from_millis(800);
    let (alice, _aev) = Client::connect(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("song.ogg");
    let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i * 11 % 239) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let started = std::time::Instant::now();
    let blob = timeout(Duration::from_secs(20), alice.upload(&path, None, None))
        .await
        .expect("the silent connection was given up")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(blob.size_bytes, bytes.len() as u64);
    let moved = relay.carried();
    assert!(
        moved < bytes.len() as u64 + cut,
        "the rest went, not everything again: {moved} bytes carried"
    );
    println!(
        "silent upload connection: given up and resumed, {} bytes whole in {:.1} s over {} \
         connections ({moved} bytes carried)",
        bytes.len(),
        took.as_secs_f64(),
        relay.connections()
    );
}

/// A large file to an S3 store goes up in parts: a part whose connection
/// breaks goes again on its own (not the whole file), and the file
/// arrives whole. The store is reached through a relay that cuts the
/// second part's first connection (presigned URLs name the relay).
#[tokio::test]
async fn a_large_upload_to_s3_goes_in_parts_and_a_broken_part_goes_again() {
    let s3 = parley_media::testing::S3Server::start().await.unwrap();
    let mut relay = Relay::bind().await;
    let mut store = s3.config();
    store.public_endpoint = Some(format!("http://{}", relay.addr));
    let target = s3.endpoint.trim_start_matches("http://").parse().unwrap();
    relay.run(target, 2, 500_000);
    let mut w = World::with(|c| c.s3 = Some(store)).await;
    let (ta, tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _aev) = w.connect(&ta, "phone").await;
    let (bob, mut bev) = w.connect(&tb, "laptop").await;
    let conv = alice.open_direct("bob").await.unwrap().id;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let size = parley_media::PART_BYTES as usize + 1_000_000;
    let bytes: Vec<u8> = (0..size as u32).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let (_, blob) = alice.send_file(conv, &path, "", None).await.unwrap();
    assert_eq!(blob.size_bytes, size as u64);
    assert_eq!(blob.kind, pb::MediaKind::Video as i32);
    let moved = relay.carried();
    assert!(
        moved < size as u64 + 2_000_000,
        "the broken part went again, not the whole file: {moved} bytes carried for {size}"
    );
    assert!(relay.connections() >= 3, "two parts, one of them twice");
    assert_eq!(
        s3.keys(),
        vec![format!("blobs/{}", blob.blob_id)],
        "joined, checked and kept: nothing of the upload is left"
    );
    assert!(s3.unfinished_parts().is_empty());
    let got = next_media(&mut bev).await;
    let saved = dir.path().join("bob.mp4");
    bob.download(&got, false, &saved, None).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), bytes, "byte for byte");
}

/// Garbage collection on an S3 store: an upload whose bytes arrived but
/// that was never completed, an upload in parts with one part sent, and a
/// completed upload no message uses all leave the store (objects, and the
/// multipart upload with its parts); the file a message uses stays.
#[tokio::test]
async fn uploads_nobody_uses_leave_the_s3_store() {
    let s3 = parley_media::testing::S3Server::start().await.unwrap();
    let store = s3.config();
    let ttl = Duration::from_secs(3);
    let mut w = World::with(|c| {
        c.s3 = Some(store);
        c.chat.media.upload_ttl = ttl;
        c.chat.media.unused_grace = Duration::from_secs(1);
    })
    .await;
    let (ta, _tb) = (w.user("alice").await, w.user("bob").await);
    let (alice, _aev) = w.connect(&ta, "phone").await;
    let conv = alice.open_direct("bob").await.unwrap().id;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kept.txt");
    std::fs::write(&path, b"a message uses me").unwrap();
    let (_, used) = alice.send_file(conv, &path, "", None).await.unwrap();

    let text = |n: u64| upload(pb::MediaKind::File, "text/plain", n, vec![]);
    let unfinished = slot(&alice, text(5)).await.unwrap();
    assert_eq!(put_bytes(&unfinished, b"hello", None).await, 200);
    let unused = slot(&alice, text(5)).await.unwrap();
    assert_eq!(put_bytes(&unused, b"hello", None).await, 200);
    complete(&alice, &unused.blob_id).await.unwrap();
    let size = parley_media::PART_BYTES + 1;
    let parted = slot(
        &alice,
        upload(pb::MediaKind::Video, "video/mp4", size, vec![]),
    )
    .await
    .unwrap();
    assert_eq!(parted.parts.len(), 2);
    let first = vec![7u8; parted.parts[0].size as usize];
    let (status, _) = http("PUT", &parted.parts[0].url, &[], &first, None).await;
    assert_eq!(status, 200, "the first part");
    let parts = s3.unfinished_parts();
    assert_eq!(parts.len(), 2, "the upload and its first part: {parts:?}");
    let mut before = s3.keys();
    before.retain(|k| !k.starts_with("blobs/"));
    assert!(
        before.contains(&format!("uploads/{}", unfinished.blob_id)),
        "{before:?}"
    );

    // Past the slot and the grace: everything but the used file goes.
    tokio::time::sleep(ttl + Duration::from_millis(1_300)).await;
    let deleted = w.server.chat.collect_blobs().await.unwrap();
    assert_eq!(
        deleted, 3,
        "the unfinished, the unused and the one in parts"
    );
    assert_eq!(s3.keys(), vec![format!("blobs/{}", used.blob_id)]);
    assert_eq!(
        s3.unfinished_parts(),
        Vec::<String>::new(),
        "the upload in parts was aborted, its part with it"
    );
    println!(
        "S3 garbage collection: {deleted} uploads deleted ({} parts of an unfinished one \
         among them), {:?} kept",
        parts.len() - 1,
        s3.keys()
    );
}
