//! Where uploads' bytes live: any [`object_store`] backend behind Parley's
//! [`BlobStorage`]. Completed objects are `blobs/<id>` and, for an image,
//! its thumbnail `blobs/<id>.thumb`.
//!
//! With a directory (the one-process default), Parley signs the URLs
//! itself (HMAC-SHA256 over what each permits) and serves them with
//! [`router`]: a PUT streams the body to a partial file, checked against
//! the declared size and type as it arrives, and moves it in place only
//! when it is whole, so a completed upload can never be replaced. An
//! upload that broke off resumes where it ended (`HEAD` says where,
//! `Content-Range` goes on from there), as the SDK does.
//!
//! With an S3-compatible store (a cluster: MinIO, AWS S3, ...), clients
//! PUT and GET through presigned URLs, straight to the store. An upload
//! goes to `uploads/<id>` (its Content-Type bound to the signature);
//! completing it copies the checked bytes to `blobs/<id>` and deletes the
//! upload, so the slot's URL, still valid for a while, can no longer
//! change what messages reference.
//!
//! Completing an upload ([`BlobStorage::inspect`]) reads the bytes back:
//! their size and SHA-256 against the declaration, and for an image its
//! format (from the bytes, not the name), its dimensions and a JPEG
//! thumbnail, on a blocking thread.

mod endpoint;
mod image_info;
mod sign;
pub mod testing;

use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parley_core::ChatError;
use parley_core::media::{BlobRecord, BlobStorage, Inspected, is_blob_id, thumbnail_key};
use parley_proto::pb;
use sha2::{Digest, Sha256};

pub use endpoint::router;
pub use sign::UrlSigner;

/// Uploads to an S3-compatible store larger than this go up in parts of
/// this size (the last one smaller): a part that fails is sent again on
/// its own, not the whole file.
pub const PART_BYTES: u64 = 8 * 1024 * 1024;

/// How long the local endpoint waits, by default, on an upload's body
/// that stopped moving (a connection gone half-dead). Shorter than the
/// Rust SDK's `transfer_stall` (30 s), so that by the time a client gives
/// up on a silent connection and resumes, the server has let the silent
/// request go.
pub const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(20);

/// The path the local endpoint serves, before a blob's key.
pub const HTTP_PREFIX: &str = "/media/v1/blobs";

/// Uploads' bytes in an object store, with signed URLs.
#[derive(Debug, Clone)]
pub struct MediaStorage {
    store: Arc<dyn ObjectStore>,
    urls: Urls,
    /// How long the local endpoint waits on an upload's body that stopped
    /// moving before it ends the request, keeping what arrived and
    /// releasing the writer's lock, so that a resume can go on.
    body_stall: std::time::Duration,
    /// Images decoded at once (a decode takes a core and up to hundreds
    /// of MiB).
    decoding: Arc<tokio::sync::Semaphore>,
}

/// Who signs the URLs clients use.
#[derive(Debug, Clone)]
enum Urls {
    /// Parley, for its own endpoint ([`router`]), over this directory.
    Local(UrlSigner, std::path::PathBuf),
    /// The S3 store's presigning, with the endpoint clients reach; and
    /// the store itself, for multipart uploads.
    Presigned(Arc<AmazonS3>, Arc<AmazonS3>),
}

/// An S3-compatible store.
#[derive(Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// The endpoint Parley reaches the store at (`http://minio.minio:9000`);
    /// None: AWS S3 itself.
    pub endpoint: Option<String>,
    /// The endpoint clients reach it at, as presigned URLs name it (the
    /// public name of the same store); None: `endpoint`.
    pub public_endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("public_endpoint", &self.public_endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    fn builder(&self, endpoint: Option<&str>) -> AmazonS3Builder {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_virtual_hosted_style_request(false);
        if let Some(e) = endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        b
    }
}

/// The object of a blob (or of a blob's thumbnail) by its key.
fn object(key: &str) -> Path {
    Path::from(format!("blobs/{key}"))
}

/// Where a presigned upload lands, until its completion copies it.
fn incoming(id: &str) -> Path {
    Path::from(format!("uploads/{id}"))
}

/// Where the id of an upload in parts is kept until the parts are
/// joined, so that deleting an upload never completed aborts it and its
/// parts go with it (S3 keeps the parts of an unfinished multipart upload,
/// unlisted, until it is aborted).
fn parts_marker(id: &str) -> Path {
    Path::from(format!("uploads/{id}.parts"))
}

/// `result` with an object that is not there taken as done (deleted,
/// aborted: gone already is what was wanted).
fn gone_is_fine(result: object_store::Result<()>) -> object_store::Result<()> {
    match result {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        other => other,
    }
}

/// How long a presigned URL made at `now_ms` must last to be good until
/// `expires_at_ms`: S3 counts its whole seconds (`X-Amz-Expires`) from the
/// signing time cut down to the second (`X-Amz-Date`), so the span is
/// counted from that second and rounded up, and is never under one.
fn presigned_ttl(now_ms: i64, expires_at_ms: i64) -> std::time::Duration {
    let signed_at = now_ms - now_ms.rem_euclid(1_000);
    let secs = (expires_at_ms - signed_at + 999).div_euclid(1_000).max(1);
    std::time::Duration::from_secs(secs as u64)
}

/// A storage failure, logged with its detail and answered as UNAVAILABLE
/// (the client may retry).
fn unavailable(what: &str, e: impl std::fmt::Display) -> ChatError {
    tracing::warn!(error = %e, "media storage: {what}");
    ChatError::Unavailable(format!("media storage failed to {what}; retry"))
}

impl MediaStorage {
    /// Blobs under directory `dir` (created if missing), with URLs that
    /// Parley signs with `key` and serves itself at `public_url` (the base
    /// URL clients reach the [`router`] at, e.g. `http://host:7404`).
    pub fn local(dir: &FsPath, public_url: &str, key: &[u8]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        // No automatic clean-up of emptied folders: the endpoint writes
        // into `blobs/` and `partial/` beside the store.
        let store = LocalFileSystem::new_with_prefix(&dir)?;
        Ok(Self::new(
            Arc::new(store),
            Urls::Local(UrlSigner::new(public_url, key)?, dir),
        ))
    }

    /// Blobs under directory `dir` as a gateway of a cluster serves them
    /// with [`router`], checking URLs the chat services signed with `key`
    /// (this storage is not asked for URLs: the chat services, which know
    /// the public address, sign them).
    pub fn serving(dir: &FsPath, key: &[u8]) -> anyhow::Result<Self> {
        // The base only goes into URLs this storage signs: none.
        Self::local(dir, "http://signed-by-the-chat-services.invalid", key)
    }

    /// Blobs in an S3-compatible bucket, with presigned URLs.
    pub fn s3(config: &S3Config) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.bucket.is_empty(), "an S3 store needs a bucket");
        // reqwest's rustls takes the process's provider: ring, as everywhere
        // in Parley (already installed is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = Arc::new(config.builder(config.endpoint.as_deref()).build()?);
        let public = config
            .public_endpoint
            .as_deref()
            .or(config.endpoint.as_deref());
        let signer = config.builder(public).build()?;
        Ok(Self::new(
            store.clone(),
            Urls::Presigned(Arc::new(signer), store),
        ))
    }

    fn new(store: Arc<dyn ObjectStore>, urls: Urls) -> Self {
        Self {
            store,
            urls,
            body_stall: BODY_STALL,
            decoding: Arc::new(tokio::sync::Semaphore::new(2)),
        }
    }

    /// How long the local endpoint waits on an upload's body that stopped
    /// moving ([`BODY_STALL`] unless set).
    pub fn with_body_stall(mut self, stall: std::time::Duration) -> Self {
        self.body_stall = stall;
        self
    }

    pub(crate) fn body_stall(&self) -> std::time::Duration {
        self.body_stall
    }

    /// The signer of this storage's own URLs: None when the store presigns
    /// them (then [`router`] serves nothing).
    pub fn local_signer(&self) -> Option<&UrlSigner> {
        match &self.urls {
            Urls::Local(s, _) => Some(s),
            Urls::Presigned(..) => None,
        }
    }

    /// The directory of a local store, where the endpoint writes uploads.
    pub(crate) fn local_dir(&self) -> Option<&std::path::Path> {
        match &self.urls {
            Urls::Local(_, dir) => Some(dir),
            Urls::Presigned(..) => None,
        }
    }

    /// Deletes a presigned upload's slot object again once its URL has
    /// expired (a PUT meanwhile would put it back: bytes nothing
    /// references). A restart forgets it: a lifecycle rule on `uploads/`
    /// is the backstop (docs/operations.md).
    fn forget_slot(&self, id: &str, expires_at_ms: i64) {
        let (store, path) = (self.store.clone(), incoming(id));
        tokio::spawn(async move {
            let wait = (expires_at_ms - parley_core::now_ms()).max(0) as u64 + 5_000;
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            if let Err(e) = gone_is_fine(store.delete(&path).await) {
                tracing::warn!(error = %e, "an upload's slot object stays");
            }
        });
    }

    /// A slot in parts for a large presigned upload: a multipart upload
    /// of `uploads/<id>` (its Content-Type set), and a presigned PUT per
    /// part. A part that fails goes again on its own.
    async fn parts_slot(
        signer: &AmazonS3,
        store: &AmazonS3,
        blob: &BlobRecord,
        expires_at_ms: i64,
    ) -> Result<pb::UploadSlot, ChatError> {
        let mut attributes = object_store::Attributes::new();
        attributes.insert(
            object_store::Attribute::ContentType,
            blob.mime_type.clone().into(),
        );
        let options = object_store::PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let path = incoming(&blob.id);
        let upload_id = store
            .create_multipart_opts(&path, options)
            .await
            .map_err(|e| unavailable("start an upload in parts", e))?;
        let marker = PutPayload::from(upload_id.clone().into_bytes());
        if let Err(e) = store.put(&parts_marker(&blob.id), marker).await {
            let _ = store.abort_multipart(&path, &upload_id).await;
            return Err(unavailable("start an upload in parts", e));
        }
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1u32;
        while offset < blob.size_bytes {
            let size = PART_BYTES.min(blob.size_bytes - offset);
            let query = SignedUrlOptions::new().with_query([
                ("partNumber", number.to_string()),
                ("uploadId", upload_id.clone()),
            ]);
            let method = object_store::signer::Method::PUT;
            let url = Self::presign(signer, method, &path, expires_at_ms, &query).await?;
            parts.push(pb::UploadPart {
                number,
                offset,
                size,
                url,
            });
            offset += size;
            number += 1;
        }
        Ok(pb::UploadSlot {
            blob_id: blob.id.clone(),
            method: "PUT".into(),
            expires_at_ms,
            parts,
            upload_id,
            ..pb::UploadSlot::default()
        })
    }

    /// A presigned URL for `method` on `path`, good until `expires_at_ms`
    /// at least.
    async fn presign(
        signer: &AmazonS3,
        method: object_store::signer::Method,
        path: &Path,
        expires_at_ms: i64,
        options: &SignedUrlOptions,
    ) -> Result<String, ChatError> {
        let ttl = presigned_ttl(parley_core::now_ms(), expires_at_ms);
        signer
            .signed_url_opts(method, path, ttl, options)
            .await
            .map(|u| u.to_string())
            .map_err(|e| unavailable("sign a URL", e))
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Reads a whole object, hashing it, keeping its bytes when `keep`.
    async fn read(&self, path: &Path, keep: bool) -> Result<(u64, Vec<u8>, Vec<u8>), ChatError> {
        let got = match self.store.get(path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ChatError::UploadIncomplete(
                    "the upload's bytes have not arrived: send them to the slot's URL first".into(),
                ));
            }
            Err(e) => return Err(unavailable("read an upload", e)),
        };
        let mut hasher = Sha256::new();
        let mut kept = Vec::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| unavailable("read an upload", e))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
            if keep {
                kept.extend_from_slice(&chunk);
            }
        }
        Ok((size, hasher.finalize().to_vec(), kept))
    }
}

#[async_trait]
impl BlobStorage for MediaStorage {
    async fn upload_slot(
        &self,
        blob: &BlobRecord,
        expires_at_ms: i64,
    ) -> Result<pb::UploadSlot, ChatError> {
        let url = match &self.urls {
            Urls::Local(signer, _) => {
                signer.upload_url(&blob.id, blob.size_bytes, &blob.mime_type, expires_at_ms)
            }
            Urls::Presigned(signer, store) if blob.size_bytes > PART_BYTES => {
                return Self::parts_slot(signer, store, blob, expires_at_ms).await;
            }
            Urls::Presigned(signer, _) => {
                let content_type = blob
                    .mime_type
                    .parse()
                    .map_err(|_| ChatError::invalid("a MIME type fit for a header"))?;
                let options = SignedUrlOptions::new()
                    .with_signed_header(http::header::CONTENT_TYPE, content_type);
                let method = object_store::signer::Method::PUT;
                Self::presign(signer, method, &incoming(&blob.id), expires_at_ms, &options).await?
            }
        };
        Ok(pb::UploadSlot {
            blob_id: blob.id.clone(),
            url,
            method: "PUT".into(),
            headers: vec![pb::HttpHeader {
                name: "Content-Type".into(),
                value: blob.mime_type.clone(),
            }],
            expires_at_ms,
            ..pb::UploadSlot::default()
        })
    }

    async fn join_parts(
        &self,
        blob: &BlobRecord,
        upload_id: &str,
        parts: &[pb::CompletedPart],
    ) -> Result<(), ChatError> {
        let Urls::Presigned(_, store) = &self.urls else {
            return Err(parley_core::media::not_in_parts());
        };
        let count = blob.size_bytes.div_ceil(PART_BYTES);
        let mut sorted: Vec<&pb::CompletedPart> = parts.iter().collect();
        sorted.sort_by_key(|p| p.number);
        let numbered = sorted
            .iter()
            .enumerate()
            .all(|(i, p)| u64::from(p.number) == i as u64 + 1 && !p.etag.is_empty());
        if sorted.len() as u64 != count || !numbered {
            return Err(ChatError::UploadIncomplete(format!(
                "an upload in {count} parts completes with every part's number and ETag"
            )));
        }
        let ids = sorted
            .iter()
            .map(|p| object_store::multipart::PartId {
                content_id: p.etag.clone(),
            })
            .collect();
        let upload_id = upload_id.to_owned();
        let joined = store
            .complete_multipart(&incoming(&blob.id), &upload_id, ids)
            .await;
        // Joined now, or already by an earlier completion whose answer was
        // lost: the object is there, and the parts are gone.
        let whole = joined.is_ok() || store.head(&incoming(&blob.id)).await.is_ok();
        if whole && let Err(e) = gone_is_fine(store.delete(&parts_marker(&blob.id)).await) {
            tracing::warn!(error = %e, "an upload's parts marker stays");
        }
        match joined {
            Ok(_) => Ok(()),
            Err(_) if whole => Ok(()),
            Err(e) => {
                tracing::info!(error = %e, blob = %blob.id, "parts not joined");
                Err(ChatError::UploadIncomplete(
                    "the parts do not make the upload: send every part, then complete with their ETags"
                        .into(),
                ))
            }
        }
    }

    async fn inspect(&self, blob: &BlobRecord) -> Result<Inspected, ChatError> {
        let image = blob.kind == pb::MediaKind::Image;
        match &self.urls {
            Urls::Presigned(..) => {
                // Out of the slot's reach first, then checked: the bytes
                // checked are the bytes kept, whatever the slot's URL (good
                // a while longer) is used for meanwhile.
                match self
                    .store
                    .copy(&incoming(&blob.id), &object(&blob.id))
                    .await
                {
                    Ok(()) => {}
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(ChatError::UploadIncomplete(
                            "the upload's bytes have not arrived: send them to the slot's URL first"
                                .into(),
                        ));
                    }
                    Err(e) => return Err(unavailable("keep an upload", e)),
                }
                if let Err(e) = gone_is_fine(self.store.delete(&incoming(&blob.id)).await) {
                    tracing::warn!(error = %e, "an upload's slot object stays");
                }
                self.forget_slot(&blob.id, blob.upload_expires_at_ms);
            }
            Urls::Local(_, dir) => {
                // A whole upload a crash left unplaced is placed now
                // (unless a request is writing it).
                endpoint::place_whole(dir, &blob.id, blob.size_bytes)
                    .await
                    .map_err(|e| unavailable("place an upload", e))?;
            }
        }
        let (size, sha256, bytes) = self.read(&object(&blob.id), image).await?;
        if size != blob.size_bytes {
            return Err(ChatError::UploadMismatch(format!(
                "{size} bytes arrived where {} were declared",
                blob.size_bytes
            )));
        }
        if !blob.sha256.is_empty() && blob.sha256 != sha256 {
            return Err(ChatError::UploadMismatch(format!(
                "the bytes' SHA-256 is {}, not the {} declared",
                hex::encode(&sha256),
                hex::encode(&blob.sha256)
            )));
        }
        let mut inspected = Inspected {
            sha256,
            ..Inspected::default()
        };
        if !image {
            return Ok(inspected);
        }
        let mime = blob.mime_type.clone();
        let _decoding = self
            .decoding
            .acquire()
            .await
            .map_err(|e| unavailable("analyse an image", e))?;
        let info = tokio::task::spawn_blocking(move || image_info::analyze(&bytes, &mime))
            .await
            .map_err(|e| unavailable("analyse an image", e))??;
        if let Some(info) = info {
            inspected.width = info.width;
            inspected.height = info.height;
            if let Some(thumb) = info.thumbnail {
                let size_bytes = thumb.bytes.len() as u64;
                self.store
                    .put(
                        &object(&blob.thumbnail_key()),
                        PutPayload::from(thumb.bytes),
                    )
                    .await
                    .map_err(|e| unavailable("store a thumbnail", e))?;
                inspected.thumbnail = Some(pb::Thumbnail {
                    mime_type: image_info::THUMBNAIL_MIME.into(),
                    width: thumb.width,
                    height: thumb.height,
                    size_bytes,
                });
            }
        }
        Ok(inspected)
    }

    async fn download_url(
        &self,
        blob: &BlobRecord,
        thumbnail: bool,
        expires_at_ms: i64,
    ) -> Result<String, ChatError> {
        let (key, mime) = match (&blob.thumbnail, thumbnail) {
            (Some(t), true) => (thumbnail_key(&blob.id), t.mime_type.as_str()),
            _ => (blob.id.clone(), blob.mime_type.as_str()),
        };
        match &self.urls {
            Urls::Local(signer, _) => Ok(signer.download_url(&key, mime, expires_at_ms)),
            Urls::Presigned(signer, _) => {
                // Served as its type, never run as a page; anything but
                // pictures and sound saved, not shown.
                let mut query = vec![("response-content-type", mime.to_owned())];
                if !endpoint::serves_inline(mime) {
                    query.push(("response-content-disposition", "attachment".to_owned()));
                }
                let options = SignedUrlOptions::new().with_query(query);
                let method = object_store::signer::Method::GET;
                Self::presign(signer, method, &object(&key), expires_at_ms, &options).await
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<(), ChatError> {
        if !is_blob_id(id) {
            return Err(ChatError::invalid(format!("{id:?} is not a blob id")));
        }
        if let Urls::Presigned(_, store) = &self.urls {
            // An upload in parts never joined: abort it, its parts with it.
            match store.get(&parts_marker(id)).await {
                Ok(got) => {
                    let bytes = got
                        .bytes()
                        .await
                        .map_err(|e| unavailable("delete an upload", e))?;
                    let upload_id = String::from_utf8_lossy(&bytes).into_owned();
                    gone_is_fine(store.abort_multipart(&incoming(id), &upload_id).await)
                        .map_err(|e| unavailable("abort an upload in parts", e))?;
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("delete an upload", e)),
            }
        }
        let paths = [
            object(id),
            object(&thumbnail_key(id)),
            incoming(id),
            parts_marker(id),
        ];
        for path in paths {
            gone_is_fine(self.store.delete(&path).await)
                .map_err(|e| unavailable("delete an upload", e))?;
        }
        if let Some(dir) = self.local_dir() {
            match tokio::fs::remove_file(endpoint::partial(dir, id)).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable("delete a partial upload", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::presigned_ttl;

    #[test]
    fn a_presigned_url_lasts_at_least_until_asked_in_whole_seconds() {
        let secs = |now, until| presigned_ttl(now, until).as_secs() as i64;
        // Signed at 10.999 s for 11.998 s: the date says 10 s, so 2 s.
        assert_eq!(secs(10_999, 11_998), 2);
        assert_eq!(secs(10_000, 11_000), 1);
        assert_eq!(secs(10_000, 11_001), 2);
        // Already past, or a moment away: the shortest S3 takes.
        assert_eq!(secs(10_500, 9_000), 1);
        for now in (0..3_000).step_by(7) {
            for ahead in [1, 999, 1_000, 1_001, 59_999] {
                let until = now + ahead;
                let valid_until = now - now % 1_000 + 1_000 * secs(now, until);
                assert!(valid_until >= until, "{now} {until}");
                assert!(valid_until < until + 1_000, "{now} {until}");
            }
        }
    }
}
