//! Where uploads' bytes live: any [`object_store`] backend behind Parley's
//! [`BlobStorage`]. Objects are `blobs/<id>` and, for an image, its
//! thumbnail `blobs/<id>.thumb`.
//!
//! With a directory (the one-process default), Parley signs the URLs
//! itself (HMAC-SHA256 over what each permits) and serves them with
//! [`router`]: a PUT streams the body to a staging object, checked against
//! the declared size and type as it arrives, and moves it in place only
//! when it is whole, so an interrupted upload leaves nothing behind and a
//! completed one can never be replaced.
//!
//! Completing an upload ([`BlobStorage::inspect`]) reads the bytes back:
//! their size and SHA-256 against the declaration, and for an image its
//! format (from the bytes, not the name), its dimensions and a JPEG
//! thumbnail, on a blocking thread.

mod http;
mod image_info;
mod sign;

use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parley_core::ChatError;
use parley_core::media::{BlobRecord, BlobStorage, Inspected, is_blob_id, thumbnail_key};
use parley_proto::pb;
use sha2::{Digest, Sha256};

pub use http::router;
pub use sign::UrlSigner;

/// The path the local endpoint serves, before a blob's key.
pub const HTTP_PREFIX: &str = "/media/v1/blobs";

/// Uploads' bytes in an object store, with signed URLs.
#[derive(Debug, Clone)]
pub struct MediaStorage {
    store: Arc<dyn ObjectStore>,
    signer: UrlSigner,
}

/// The object of a blob (or of a blob's thumbnail) by its key.
fn object(key: &str) -> Path {
    Path::from(format!("blobs/{key}"))
}

/// Where a local upload is written until it is whole.
fn staging(id: &str) -> Path {
    Path::from(format!("staging/{id}"))
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
        let store = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(store),
            signer: UrlSigner::new(public_url, key)?,
        })
    }

    /// The signer of this storage's local URLs.
    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Reads a whole object, hashing it, keeping its bytes when `keep`.
    async fn read(&self, key: &str, keep: bool) -> Result<(u64, Vec<u8>, Vec<u8>), ChatError> {
        let got = match self.store.get(&object(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ChatError::UploadIncomplete(format!(
                    "no bytes of upload {key} have arrived: send them to the slot's URL first"
                )));
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
        Ok(pb::UploadSlot {
            blob_id: blob.id.clone(),
            url: self.signer.upload_url(
                &blob.id,
                blob.size_bytes,
                &blob.mime_type,
                expires_at_ms,
            ),
            method: "PUT".into(),
            headers: vec![pb::HttpHeader {
                name: "Content-Type".into(),
                value: blob.mime_type.clone(),
            }],
            expires_at_ms,
        })
    }

    async fn inspect(&self, blob: &BlobRecord) -> Result<Inspected, ChatError> {
        let image = blob.kind == pb::MediaKind::Image;
        let (size, sha256, bytes) = self.read(&blob.id, image).await?;
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
        Ok(self.signer.download_url(&key, mime, expires_at_ms))
    }

    async fn delete(&self, id: &str) -> Result<(), ChatError> {
        if !is_blob_id(id) {
            return Err(ChatError::invalid(format!("{id:?} is not a blob id")));
        }
        for path in [object(id), object(&thumbnail_key(id)), staging(id)] {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("delete an upload", e)),
            }
        }
        Ok(())
    }
}

