//! Media in a cluster: uploads go straight to an S3-compatible store
//! through presigned URLs (s3s-fs, which checks signatures as S3 does; see
//! `parley_media::testing`), the chat services check and record them, and
//! a member on another gateway downloads them.

use std::io::Cursor;

use parley_media::testing::S3Server;
use parley_proto::pb::client_frame::Body as Req;

use super::*;

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
    let ann = join(&c, 0, &t[0], "ann/phone", &rec).await;
    // Bob's phone records what arrives; his laptop downloads.
    let _bob_phone = join(&c, 1, &t[1], "bob/phone", &rec).await;
    let (bob, _laptop_events) = Client::connect(c.at_gateway(1, &t[1], "laptop"))
        .await
        .unwrap();
    let cyd = join(&c, 1, &t[2], "cyd/phone", &rec).await;
    let conv = ann.open_direct("bob").await.unwrap().id;

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
