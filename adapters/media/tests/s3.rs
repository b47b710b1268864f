//! The storage against a real S3 implementation on loopback (s3s-fs, see
//! `parley_media::testing`).

use std::time::Duration;

use parley_core::media::{BlobRecord, BlobState, BlobStorage, new_blob_id};
use parley_core::{ChatError, now_ms};
use parley_media::MediaStorage;
use parley_media::testing::S3Server;
use parley_proto::pb;
use sha2::{Digest, Sha256};

fn blob(kind: pb::MediaKind, mime: &str, bytes: &[u8], sha256: bool) -> BlobRecord {
    BlobRecord {
        id: new_blob_id(),
        owner: "alice".into(),
        kind,
        mime_type: mime.into(),
        size_bytes: bytes.len() as u64,
        sha256: if sha256 {
            Sha256::digest(bytes).to_vec()
        } else {
            vec![]
        },
        name: "f".into(),
        state: BlobState::Pending,
        created_at_ms: now_ms(),
        upload_expires_at_ms: now_ms() + 60_000,
        width: 0,
        height: 0,
        thumbnail: None,
        last_used_ms: 0,
    }
}

fn picture(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

/// PUTs `bytes` to a slot with its headers (the Content-Type replaced by
/// `content_type` when given): the HTTP status.
async fn put(slot: &pb::UploadSlot, bytes: &[u8], content_type: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().put(&slot.url).body(bytes.to_vec());
    for h in &slot.headers {
        let value = match content_type {
            Some(ct) if h.name.eq_ignore_ascii_case("content-type") => ct,
            _ => h.value.as_str(),
        };
        req = req.header(h.name.as_str(), value);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn get(url: &str) -> (u16, Vec<u8>, Option<String>) {
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, resp.bytes().await.unwrap().to_vec(), ct)
}

/// An image and a file go up through presigned URLs and come down whole;
/// a JPEG and a PNG get their thumbnails; the store refuses another type
/// than signed and an expired URL; bytes that differ from the declaration
/// are caught at completion; a completed upload is out of its slot's
/// reach; deletion takes everything.
#[tokio::test]
async fn presigned_uploads_and_downloads_on_a_real_s3() {
    let server = S3Server::start().await.unwrap();
    let media = MediaStorage::s3(&server.config()).unwrap();

    for (format, mime) in [
        (image::ImageFormat::Png, "image/png"),
        (image::ImageFormat::Jpeg, "image/jpeg"),
    ] {
        let bytes = picture(400, 300, format);
        let b = blob(pb::MediaKind::Image, mime, &bytes, true);
        let slot = media.upload_slot(&b, now_ms() + 60_000).await.unwrap();
        assert!(slot.url.starts_with(&server.endpoint), "{}", slot.url);
        assert!(
            slot.url.contains("X-Amz-Signature="),
            "presigned: {}",
            slot.url
        );
        assert_eq!(
            put(&slot, &bytes, Some("text/html")).await,
            403,
            "the type is signed"
        );
        let early = media.inspect(&b).await.unwrap_err();
        assert!(matches!(early, ChatError::UploadIncomplete(_)), "{early}");
        assert_eq!(put(&slot, &bytes, None).await, 200);
        let seen = media.inspect(&b).await.unwrap();
        assert_eq!((seen.width, seen.height), (400, 300), "{mime}");
        assert_eq!(seen.sha256, b.sha256);
        let thumb = seen.thumbnail.expect("a thumbnail");
        assert_eq!((thumb.width, thumb.height), (320, 240));
        let id = &b.id;
        assert_eq!(
            server.keys(),
            vec![format!("blobs/{id}"), format!("blobs/{id}.thumb")],
            "checked bytes moved out of the slot"
        );

        // The slot's URL, still good, can no longer touch what was checked.
        assert_eq!(put(&slot, b"replaced", None).await, 200);
        let url = media
            .download_url(&b, false, now_ms() + 60_000)
            .await
            .unwrap();
        let (status, got, ct) = get(&url).await;
        assert_eq!((status, ct.as_deref()), (200, Some(mime)));
        assert_eq!(got, bytes, "{mime}: byte for byte");
        let mut with_thumb = b.clone();
        with_thumb.thumbnail = Some(thumb.clone());
        let url = media
            .download_url(&with_thumb, true, now_ms() + 60_000)
            .await
            .unwrap();
        let (status, got, _) = get(&url).await;
        assert_eq!((status, got.len() as u64), (200, thumb.size_bytes));
        assert_eq!(&got[..2], &[0xFF, 0xD8]);

        media.delete(&b.id).await.unwrap();
        assert!(server.keys().is_empty(), "{:?}", server.keys());
        let url = media
            .download_url(&b, false, now_ms() + 60_000)
            .await
            .unwrap();
        assert_eq!(get(&url).await.0, 404, "deleted");
    }

    // A file: not what was declared.
    let notes = vec![b'n'; 1000];
    let b = blob(pb::MediaKind::File, "text/plain", &notes, true);
    let slot = media.upload_slot(&b, now_ms() + 60_000).await.unwrap();
    assert_eq!(
        put(&slot, &notes[..999], None).await,
        200,
        "S3 cannot bind the length"
    );
    let short = media.inspect(&b).await.unwrap_err();
    assert!(matches!(short, ChatError::UploadMismatch(_)), "{short}");
    let mut other = notes.clone();
    other[0] = b'N';
    assert_eq!(put(&slot, &other, None).await, 200);
    let differs = media.inspect(&b).await.unwrap_err();
    assert!(
        matches!(&differs, ChatError::UploadMismatch(m) if m.contains("SHA-256")),
        "{differs}"
    );
    assert_eq!(put(&slot, &notes, None).await, 200);
    media.inspect(&b).await.unwrap();
    let url = media
        .download_url(&b, false, now_ms() + 60_000)
        .await
        .unwrap();
    assert!(
        url.contains("response-content-disposition=attachment"),
        "{url}"
    );
    assert_eq!(get(&url).await.1, notes);

    // An expired URL is refused by the store itself. (Asked for a second,
    // it lasts under two: S3 counts whole seconds from the second it was
    // signed in.)
    let url = media
        .download_url(&b, false, now_ms() + 1_000)
        .await
        .unwrap();
    assert_eq!(get(&url).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(get(&url).await.0, 403, "expired");
    let (head, tail) = url.split_once("X-Amz-Expires=").expect("presigned");
    let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    let forged = format!("{head}X-Amz-Expires=9{rest}");
    assert_eq!(get(&forged).await.0, 403, "forged");
}
