//! Uploads in the chat service: slots, completion, the blobs a batch of
//! sends references, downloads for members, and garbage collection. See
//! [`crate::media`] for the flow.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parley_proto::pb;

use super::{ChatService, now_ms};
use crate::error::ChatError;
use crate::media::{BlobRecord, BlobState, BlobStorage, new_blob_id};

/// An unfinished upload outlives its slot's URL by this much at most (see
/// `slot_grace_ms`).
const SLOT_GRACE_MS: i64 = 60 * 60 * 1000;

/// Uploads collected per store call.
const GC_PAGE: u32 = 500;

impl ChatService {
    fn blob_storage(&self) -> Result<&Arc<dyn BlobStorage>, ChatError> {
        self.config
            .blobs
            .as_ref()
            .ok_or_else(|| ChatError::Forbidden("this server stores no media".into()))
    }

    /// A slot for an upload of `user`'s: checked against the kind's rules
    /// and the user's daily quota, recorded as pending.
    pub(super) async fn upload(
        &self,
        user: &str,
        req: pb::UploadRequest,
    ) -> Result<pb::UploadSlot, ChatError> {
        let storage = self.blob_storage()?;
        let limits = &self.config.media;
        let kind = limits.check(&req)?;
        let now = now_ms();
        if limits.daily_uploads > 0 || limits.daily_bytes > 0 {
            let (count, bytes) = self
                .store
                .uploads_since(user, now - 24 * 3600 * 1000)
                .await?;
            if limits.daily_uploads > 0 && count >= limits.daily_uploads {
                return Err(ChatError::QuotaExceeded(format!(
                    "you made {count} uploads in the last 24 hours, the most allowed"
                )));
            }
            if limits.daily_bytes > 0 && bytes.saturating_add(req.size_bytes) > limits.daily_bytes {
                return Err(ChatError::QuotaExceeded(format!(
                    "{} more bytes would pass your quota of {} bytes in 24 hours ({bytes} used)",
                    req.size_bytes, limits.daily_bytes
                )));
            }
        }
        let expires = now + limits.upload_ttl.as_millis() as i64;
        let blob = BlobRecord {
            id: new_blob_id(),
            owner: user.to_owned(),
            kind,
            mime_type: req.mime_type,
            size_bytes: req.size_bytes,
            sha256: req.sha256,
            name: req.name,
            state: BlobState::Pending,
            created_at_ms: now,
            upload_expires_at_ms: expires,
            width: 0,
            height: 0,
            thumbnail: None,
            last_used_ms: 0,
        };
        self.store.create_blob(&blob).await?;
        storage.upload_slot(&blob, expires).await
    }

    /// Completes an upload of `user`'s: its bytes checked, what they show
    /// stored. Bytes that are not what was declared are discarded with the
    /// upload.
    pub(super) async fn upload_complete(
        &self,
        user: &str,
        req: pb::UploadComplete,
    ) -> Result<pb::Blob, ChatError> {
        let blob_id = req.blob_id.as_str();
        let storage = self.blob_storage()?;
        let not_found = || ChatError::NotFound(format!("no upload {blob_id:?} of yours"));
        let blob = self
            .store
            .get_blob(blob_id)
            .await?
            .filter(|b| b.owner == user)
            .ok_or_else(not_found)?;
        match blob.state {
            BlobState::Ready => return Ok(blob.to_pb()),
            BlobState::Deleting => return Err(not_found()),
            BlobState::Pending => {}
        }
        if now_ms() > blob.upload_expires_at_ms + self.slot_grace_ms() {
            return Err(ChatError::UploadIncomplete(format!(
                "upload {blob_id} expired unfinished; ask for a new slot"
            )));
        }
        if !req.parts.is_empty() {
            storage
                .join_parts(&blob, &req.upload_id, &req.parts)
                .await?;
        }
        let inspected = match storage.inspect(&blob).await {
            Ok(i) => i,
            Err(e @ (ChatError::UploadMismatch(_) | ChatError::UnsupportedMediaType(_))) => {
                // A new slot is needed: the bytes and the record go now,
                // unless a completion of its own made it ready meanwhile.
                let still_pending = self
                    .store
                    .get_blob(&blob.id)
                    .await?
                    .is_some_and(|b| b.state == BlobState::Pending);
                if still_pending {
                    storage.delete(&blob.id).await?;
                    self.store
                        .delete_blobs(std::slice::from_ref(&blob.id))
                        .await?;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let done = BlobRecord {
            state: BlobState::Ready,
            sha256: inspected.sha256,
            width: inspected.width,
            height: inspected.height,
            thumbnail: inspected.thumbnail,
            ..blob
        };
        if !self.store.complete_blob(&done).await? {
            // Completed meanwhile by another call: answer what it stored.
            return match self.store.get_blob(blob_id).await? {
                Some(b) if b.state == BlobState::Ready => Ok(b.to_pb()),
                _ => Err(not_found()),
            };
        }
        Ok(done.to_pb())
    }

    /// How long an unfinished upload outlives its slot's URL: a client that
    /// started sending just before it expired may still be sending (never
    /// longer than an unused upload is kept).
    fn slot_grace_ms(&self) -> i64 {
        SLOT_GRACE_MS.min(self.config.media.unused_grace.as_millis() as i64)
    }

    /// Fills in the media of sends that reference uploads, from one store
    /// call for the whole batch: each must be a completed upload of its
    /// sender. Answers, per send, an error for those that fail.
    pub(super) async fn resolve_blobs(
        &self,
        sends: &mut [(String, &mut pb::Content)],
    ) -> Result<Vec<Option<ChatError>>, ChatError> {
        let mut uses = Vec::new();
        for (user, content) in sends.iter() {
            if let Some(id) = blob_of(content) {
                uses.push((user.clone(), id.to_owned()));
            }
        }
        let mut errors: Vec<Option<ChatError>> = sends.iter().map(|_| None).collect();
        if uses.is_empty() {
            return Ok(errors);
        }
        // One order for every batch's row locks (no two replicas' batches
        // wait on each other), and each upload once.
        uses.sort();
        uses.dedup();
        let used: HashMap<(String, String), BlobRecord> = self
            .store
            .use_blobs(&uses, now_ms())
            .await?
            .into_iter()
            .map(|b| ((b.owner.clone(), b.id.clone()), b))
            .collect();
        for ((user, content), error) in sends.iter_mut().zip(&mut errors) {
            let Some(id) = blob_of(content).map(str::to_owned) else {
                continue;
            };
            match used.get(&(user.clone(), id.clone())) {
                Some(blob) => {
                    if let Some(pb::content::Body::Media(m)) = content.body.as_mut() {
                        blob.fill(m);
                    }
                }
                None => *error = Some(self.unusable(user, &id).await),
            }
        }
        Ok(errors)
    }

    /// Why upload `id` cannot go in a message of `user`'s.
    async fn unusable(&self, user: &str, id: &str) -> ChatError {
        match self.store.get_blob(id).await {
            Ok(Some(b)) if b.owner == user && b.state == BlobState::Pending => {
                ChatError::UploadIncomplete(format!(
                    "upload {id} is not complete: send UploadComplete first"
                ))
            }
            Ok(_) => ChatError::NotFound(format!("no completed upload {id} of yours")),
            Err(e) => e,
        }
    }

    /// A download URL for the media of message `seq`, for a member.
    pub(super) async fn download(
        &self,
        user: &str,
        req: pb::DownloadRequest,
    ) -> Result<pb::DownloadUrl, ChatError> {
        let storage = self.blob_storage()?;
        self.require_member(req.conversation_id, user).await?;
        let missing = |what: &str| {
            ChatError::NotFound(format!(
                "message {} of conversation {} {what}",
                req.seq, req.conversation_id
            ))
        };
        let slice = self
            .store
            .history(
                req.conversation_id,
                req.seq.saturating_add(1),
                pb::Direction::Backward,
                1,
            )
            .await?;
        let message = slice
            .messages
            .into_iter()
            .find(|m| m.seq == req.seq)
            .ok_or_else(|| missing("does not exist"))?;
        let content = message.content.unwrap_or_default();
        let id = blob_of(&content).ok_or_else(|| missing("holds no upload"))?;
        let blob = self
            .store
            .get_blob(id)
            .await?
            .filter(|b| b.state == BlobState::Ready)
            .ok_or_else(|| missing("holds an upload that is gone"))?;
        let (mime_type, size_bytes) = match (&blob.thumbnail, req.thumbnail) {
            (_, false) => (blob.mime_type.clone(), blob.size_bytes),
            (Some(t), true) => (t.mime_type.clone(), t.size_bytes),
            (None, true) => return Err(missing("has no thumbnail")),
        };
        let expires = now_ms() + self.config.media.download_ttl.as_millis() as i64;
        let url = storage.download_url(&blob, req.thumbnail, expires).await?;
        Ok(pb::DownloadUrl {
            url,
            expires_at_ms: expires,
            mime_type,
            size_bytes,
        })
    }

    /// One pass of garbage collection: uploads never finished, finished and
    /// never used past the grace, and used only by messages past the
    /// retention lose their bytes, then their records. The number deleted.
    pub async fn collect_blobs(&self) -> Result<usize, ChatError> {
        let storage = self.blob_storage()?;
        let now = now_ms();
        let grace = self.config.media.unused_grace.as_millis() as i64;
        // A margin for clocks: a message's time is its replica's.
        let used_before = self
            .config
            .retention
            .map(|r| now - r.as_millis() as i64 - SLOT_GRACE_MS);
        let mut deleted = 0;
        loop {
            let ids = self
                .store
                .doom_blobs(
                    now - self.slot_grace_ms(),
                    now - grace,
                    used_before,
                    GC_PAGE,
                )
                .await?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            for id in &ids {
                storage.delete(id).await?;
            }
            self.store.delete_blobs(&ids).await?;
            deleted += ids.len();
            if ids.len() < GC_PAGE as usize {
                return Ok(deleted);
            }
        }
    }
}

/// The upload a content references, if any.
pub(super) fn blob_of(content: &pb::Content) -> Option<&str> {
    match &content.body {
        Some(pb::content::Body::Media(m)) if !m.blob_id.is_empty() => Some(&m.blob_id),
        _ => None,
    }
}

/// Collects garbage every `gc_every`.
pub(super) async fn blob_collector(svc: Weak<ChatService>) {
    let Some(every) = svc.upgrade().map(|s| s.config.media.gc_every) else {
        return;
    };
    super::periodically(svc, every, |svc| async move {
        match svc.collect_blobs().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "unused uploads deleted"),
            Err(e) => tracing::warn!(error = %e, "upload garbage collection failed; retrying"),
        }
    })
    .await;
}
