//! Media in a cluster: uploads go straight to an S3-compatible store
//! through presigned URLs (s3s-fs, which checks signatures as S3 does; see
//! `parley_media::testing`), the chat services check and record them, and
//! a member on another gateway downloads them. Or, without an object
//! store, to a directory every process shares, through the gateways'
//! public HTTP port.

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use parley_media::testing::S3Server;
use parley_proto::pb::client_frame::Body as Req;
use parley_proto::pb::server_frame::Body as Resp;

use super::*;

/// Ann on gateway 0 and Bob on gateway 1, in a conversation: Bob's phone
/// records what arrives, his laptop downloads.
struct Pair {
    ann: Client,
    bob: Client,
    conv: u64,
    _bob_phone: Client,
    _laptop_events: tokio::sync::mpsc::Receiver<Event>,
}

/// Ann and Bob (the first two of `tokens`) as [`Pair`] says.
async fn ann_and_bob(c: &Cluster, tokens: &[String], rec: &Recorder) -> Pair {
    let ann = join(c, 0, &tokens[0], "ann/phone", rec).await;
    let bob_phone = join(c, 1, &tokens[1], "bob/phone", rec).await;
    let (bob, laptop_events) = Client::connect(c.at_gateway(1, &tokens[1], "laptop"))
        .await
        .unwrap();
    let conv = ann.open_direct("bob").await.unwrap().id;
    Pair {
        ann,
        bob,
        conv,
        _bob_phone: bob_phone,
        _laptop_events: laptop_events,
    }
}

/// A user on one gateway sends a picture; a member on another gateway
/// gets it filled in and downloads it byte for byte, thumbnail too; a
/// user outside the conversation gets NOT_MEMBER, and the object's key
/// alone, unsigned, gets nothing from the store. No process logs the
/// store's secret or a presigned URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_crosses_gateways_to_members_only() {
    let s3 = S3Server::start().await.unwrap();
    let spec = Spec {
        gateways: 2,
        env: s3.env(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    let t = c.users(&["ann", "bob", "cyd"]).await.unwrap();
    let rec = Recorder::default();
    let pair = ann_and_bob(&c, &t, &rec).await;
    let (ann, bob, conv) = (&pair.ann, &pair.bob, pair.conv);
    let cyd = join(&c, 1, &t[2], "cyd/phone", &rec).await;

    let img = image::RgbImage::from_fn(800, 600, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut png = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("view.png");
    std::fs::write(&path, &png).unwrap();
    let started = Instant::now();
    let (ack, blob) = ann.send_file(conv, &path, "the view", None).await.unwrap();
    let sent_in = started.elapsed();
    assert_eq!((blob.width, blob.height), (800, 600));
    let key = format!("blobs/{}", blob.blob_id);
    assert!(s3.keys().contains(&key), "{:?}", s3.keys());

    // Bob's phone, on the other gateway, receives it live.
    let deadline = Instant::now() + SETTLE;
    let message = loop {
        let log = rec.log("bob/phone");
        if let Some(m) = log.messages.iter().find(|m| m.seq == ack.seq) {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "bob never got the picture");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(pb::content::Body::Media(media)) =
        message.content.as_ref().and_then(|c| c.body.as_ref())
    else {
        panic!("not media: {message:?}")
    };
    assert_eq!(media.blob_id, blob.blob_id);
    assert_eq!((media.width, media.height), (800, 600));
    assert_eq!(media.sha256, blob.sha256);
    let started = Instant::now();
    let saved = dir.path().join("bob.png");
    let n = bob.download(&message, false, &saved, None).await.unwrap();
    let fetched_in = started.elapsed();
    assert_eq!(std::fs::read(&saved).unwrap(), png, "byte for byte");
    let thumb = dir.path().join("bob-small.jpg");
    bob.download(&message, true, &thumb, None).await.unwrap();
    assert_eq!(
        std::fs::metadata(&thumb).unwrap().len(),
        blob.thumbnail.as_ref().unwrap().size_bytes
    );

    // Cyd is in no conversation with it.
    let ask = Req::Download(pb::DownloadRequest {
        conversation_id: conv,
        seq: ack.seq,
        thumbnail: false,
    });
    let refused = cyd.request(ask).await.unwrap_err();
    assert_eq!(refused.code(), Some(pb::ErrorCode::NotMember), "{refused}");
    let endpoint: std::net::SocketAddr = s3.endpoint.trim_start_matches("http://").parse().unwrap();
    let (status, _) = http_get(
        endpoint,
        &format!("/{}/{key}", parley_media::testing::BUCKET),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "the key alone, unsigned");
    // Neither the store's secret nor a presigned URL's signature (a
    // credential of its own) reaches a log, at debug.
    let logs = c.full_logs();
    assert!(
        !logs.contains(&s3.config().secret_key),
        "the S3 secret key in a log"
    );
    assert!(
        !logs.contains("X-Amz-Signature"),
        "a presigned URL in a log"
    );
    println!(
        "media across gateways: {} bytes up and sent in {:.0} ms, down in {:.0} ms ({n} bytes); \
         non-member refused, unsigned GET {status}",
        png.len(),
        sent_in.as_secs_f64() * 1e3,
        fetched_in.as_secs_f64() * 1e3,
    );
}

/// A load balancer in front of the gateways' public HTTP ports, as a
/// Service would be: each connection goes to the upstream the test points
/// it at, and each upstream's connections are counted.
struct Balancer {
    addr: SocketAddr,
    upstreams: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    turn: Arc<AtomicUsize>,
    served: Arc<std::sync::Mutex<Vec<usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstreams = Arc::new(std::sync::Mutex::new(Vec::<SocketAddr>::new()));
        let turn = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ups, t, counts) = (upstreams.clone(), turn.clone(), served.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let i = t.load(Ordering::SeqCst);
                let Some(up) = ups.lock().unwrap().get(i).copied() else {
                    continue;
                };
                counts.lock().unwrap().push(i);
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(up).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Self {
            addr,
            upstreams,
            turn,
            served,
            task,
        }
    }

    /// Connections from now on go to upstream `i`; returns the upstreams
    /// of the connections made until now, and forgets them.
    fn point_at(&self, i: usize) -> Vec<usize> {
        self.turn.store(i, Ordering::SeqCst);
        std::mem::take(&mut *self.served.lock().unwrap())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PUT of `body` to `url` (plain HTTP) with `headers`: the status.
async fn put(url: &str, headers: &[pb::HttpHeader], body: &[u8]) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = TcpStream::connect(authority).await.unwrap();
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let head = String::from_utf8_lossy(&answer);
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Without an object store: the chat services and the gateways share a
/// directory (a ReadWriteMany volume in Kubernetes), the chat services
/// sign URLs for the gateways' public port behind a balancer, and any
/// gateway takes and serves the bytes. A file goes up through one gateway
/// and comes down, byte for byte, through the other; one writer per upload
/// holds across processes (the partial file's lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_in_a_shared_directory_goes_up_one_gateway_and_down_another() {
    let shared = tempfile::tempdir().unwrap();
    let lb = Balancer::bind().await;
    let key = format!("{:064x}", rand::random::<u128>());
    let env = [
        ("PARLEY_MEDIA_DIR", shared.path().display().to_string()),
        ("PARLEY_MEDIA_KEY", key.clone()),
        ("PARLEY_MEDIA_PUBLIC_URL", format!("http://{}", lb.addr)),
    ];
    let spec = Spec {
        gateways: 2,
        env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..spec()
    };
    let c = Cluster::start(spec).await.unwrap();
    *lb.upstreams.lock().unwrap() = c.gateways.iter().map(|g| g.route.unwrap()).collect();
    let t = c.users(&["ann", "bob"]).await.unwrap();
    let rec = Recorder::default();
    let pair = ann_and_bob(&c, &t, &rec).await;
    let (ann, bob, conv) = (&pair.ann, &pair.bob, pair.conv);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minutes.pdf");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    lb.point_at(0);
    let (ack, blob) = ann
        .send_file(conv, &path, "the minutes", None)
        .await
        .unwrap();
    let up = lb.point_at(1);
    assert!(!up.is_empty() && up.iter().all(|&g| g == 0), "{up:?}");
    let stored = shared.path().join("blobs").join(&blob.blob_id);
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        bytes,
        "in the shared directory"
    );

    let deadline = Instant::now() + SETTLE;
    let message = loop {
        if let Some(m) = rec
            .log("bob/phone")
            .messages
            .iter()
            .find(|m| m.seq == ack.seq)
        {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "bob never got the file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let saved = dir.path().join("bob.pdf");
    bob.download(&message, false, &saved, None).await.unwrap();
    assert_eq!(std::fs::read(&saved).unwrap(), bytes, "byte for byte");
    let down = lb.point_at(0);
    assert!(!down.is_empty() && down.iter().all(|&g| g == 1), "{down:?}");

    // An upload another process is writing (it holds the partial file's
    // lock, as a gateway does) is not written by a second one.
    let small = b"hello from the shared directory".to_vec();
    let req = Req::Upload(pb::UploadRequest {
        kind: pb::MediaKind::File as i32,
        mime_type: "text/plain".into(),
        size_bytes: small.len() as u64,
        name: "hello.txt".into(),
        ..Default::default()
    });
    let Resp::UploadSlot(slot) = ann.request(req).await.unwrap() else {
        panic!("an upload slot")
    };
    std::fs::create_dir_all(shared.path().join("partial")).unwrap();
    let held = std::fs::File::create(shared.path().join("partial").join(&slot.blob_id)).unwrap();
    held.try_lock().unwrap();
    let url = slot.url.replace(
        &lb.addr.to_string(),
        &c.gateways[1].route.unwrap().to_string(),
    );
    assert_eq!(
        put(&url, &slot.headers, &small).await,
        409,
        "held elsewhere"
    );
    drop(held);
    assert_eq!(put(&url, &slot.headers, &small).await, 200);
    let done = Req::UploadComplete(pb::UploadComplete {
        blob_id: slot.blob_id.clone(),
        ..Default::default()
    });
    let Resp::Blob(b) = ann.request(done).await.unwrap() else {
        panic!("a blob")
    };
    assert_eq!(b.size_bytes, small.len() as u64);
    println!(
        "shared directory: {} bytes up through gateway 0 ({} connections), down through \
         gateway 1 ({} connections); a second writer across processes got 409",
        bytes.len(),
        up.len(),
        down.len(),
    );
}
