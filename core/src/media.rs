//! Uploads ("blobs"): what the chat rules need of them. A client asks for an
//! upload slot, sends the bytes over HTTP to the signed URL it gets (never
//! through the message path), and completes the upload; the server checks
//! the bytes against what was declared and fills in what it can read off
//! them (dimensions, a thumbnail). A Send may then reference the blob, and
//! members of a conversation holding such a message get signed download
//! URLs for it. The metadata lives in the [`Store`](crate::Store); the bytes
//! behind a [`BlobStorage`] (`parley-media`: a directory or any
//! S3-compatible store).

use std::time::Duration;

use async_trait::async_trait;
use parley_proto::pb;

use crate::error::ChatError;

/// Where an upload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// A slot was handed out; the bytes may not have arrived.
    Pending = 0,
    /// Checked and usable in messages.
    Ready = 1,
    /// Chosen by garbage collection; its bytes are being deleted.
    Deleting = 2,
}

impl BlobState {
    /// From the SQL stores' column.
    pub fn from_i64(v: i64) -> Result<Self, ChatError> {
        match v {
            0 => Ok(Self::Pending),
            1 => Ok(Self::Ready),
            2 => Ok(Self::Deleting),
            other => Err(ChatError::Corrupt(format!("blob state {other}"))),
        }
    }
}

/// An upload, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobRecord {
    /// 32 lowercase hex digits, random: also the object's key.
    pub id: String,
    pub owner: String,
    pub kind: pb::MediaKind,
    pub mime_type: String,
    pub size_bytes: u64,
    /// Declared (empty: none) until complete, then what the bytes hash to.
    pub sha256: Vec<u8>,
    pub name: String,
    pub state: BlobState,
    pub created_at_ms: i64,
    /// The slot's URL is good until then.
    pub upload_expires_at_ms: i64,
    pub width: u32,
    pub height: u32,
    pub thumbnail: Option<pb::Thumbnail>,
    /// When a message last referenced it (0: never).
    pub last_used_ms: i64,
}

/// The SQL stores' row of `blobs`, in column order: id, owner, kind, mime,
/// size, sha256, name, state, created_at, upload_expires_at, width, height,
/// thumbnail (a protobuf `Thumbnail`, empty for none), last_used.
pub type BlobRow = (
    String,
    String,
    i64,
    String,
    i64,
    Vec<u8>,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Vec<u8>,
    i64,
);

/// The columns of [`BlobRow`], for SELECT and RETURNING lists, as a
/// literal (`concat!`-able: SQL is never built at run time); with a table
/// alias, `blob_columns!(b.)`.
#[macro_export]
macro_rules! blob_columns {
    () => {
        "id, owner, kind, mime, size, sha256, name, state, created_at, upload_expires_at, \
         width, height, thumbnail, last_used"
    };
    ($t:ident .) => {
        concat!(
            stringify!($t),
            ".id, ",
            stringify!($t),
            ".owner, ",
            stringify!($t),
            ".kind, ",
            stringify!($t),
            ".mime, ",
            stringify!($t),
            ".size, ",
            stringify!($t),
            ".sha256, ",
            stringify!($t),
            ".name, ",
            stringify!($t),
            ".state, ",
            stringify!($t),
            ".created_at, ",
            stringify!($t),
            ".upload_expires_at, ",
            stringify!($t),
            ".width, ",
            stringify!($t),
            ".height, ",
            stringify!($t),
            ".thumbnail, ",
            stringify!($t),
            ".last_used"
        )
    };
}

impl BlobRecord {
    /// From the SQL stores' row.
    pub fn from_row(row: BlobRow) -> Result<Self, ChatError> {
        let (
            id,
            owner,
            kind,
            mime_type,
            size,
            sha256,
            name,
            state,
            created_at_ms,
            upload_expires_at_ms,
            width,
            height,
            thumbnail,
            last_used_ms,
        ) = row;
        let kind = i32::try_from(kind)
            .ok()
            .and_then(|k| pb::MediaKind::try_from(k).ok())
            .ok_or_else(|| ChatError::Corrupt(format!("blob {id}: media kind {kind}")))?;
        let thumbnail = if thumbnail.is_empty() {
            None
        } else {
            Some(
                <pb::Thumbnail as prost::Message>::decode(thumbnail.as_slice())
                    .map_err(|e| ChatError::Corrupt(format!("blob {id}: thumbnail: {e}")))?,
            )
        };
        Ok(Self {
            kind,
            mime_type,
            size_bytes: size as u64,
            sha256,
            name,
            state: BlobState::from_i64(state)?,
            created_at_ms,
            upload_expires_at_ms,
            width: width as u32,
            height: height as u32,
            thumbnail,
            last_used_ms,
            id,
            owner,
        })
    }

    /// The thumbnail's column: a protobuf `Thumbnail`, empty for none.
    pub fn thumbnail_column(&self) -> Vec<u8> {
        self.thumbnail
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default()
    }

    /// As UploadComplete answers it.
    pub fn to_pb(&self) -> pb::Blob {
        pb::Blob {
            blob_id: self.id.clone(),
            kind: self.kind as i32,
            mime_type: self.mime_type.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            width: self.width,
            height: self.height,
            thumbnail: self.thumbnail.clone(),
            name: self.name.clone(),
        }
    }

    /// Replaces what a message says of this blob with what the server
    /// knows; duration, name and caption stay the sender's (a name only
    /// when the sender gave none).
    pub fn fill(&self, media: &mut pb::Media) {
        media.kind = self.kind as i32;
        media.url.clear();
        media.mime_type.clone_from(&self.mime_type);
        media.size_bytes = self.size_bytes;
        media.width = self.width;
        media.height = self.height;
        media.sha256.clone_from(&self.sha256);
        media.thumbnail.clone_from(&self.thumbnail);
        if media.name.is_empty() {
            media.name.clone_from(&self.name);
        }
    }

    /// The key of its thumbnail's object, beside the original's.
    pub fn thumbnail_key(&self) -> String {
        thumbnail_key(&self.id)
    }
}

/// The key of blob `id`'s thumbnail.
pub fn thumbnail_key(id: &str) -> String {
    format!("{id}.thumb")
}

/// Whether `id` has the shape of a blob id (32 lowercase hex digits), so
/// that nothing else ever reaches a storage key.
pub fn is_blob_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new random blob id.
pub fn new_blob_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What the server read off an upload's bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inspected {
    pub sha256: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Made and stored under [`thumbnail_key`], for an image.
    pub thumbnail: Option<pb::Thumbnail>,
}

/// Where the bytes live: a directory served over HTTP by Parley itself, or
/// an S3-compatible store that clients reach with presigned URLs.
#[async_trait]
pub trait BlobStorage: std::fmt::Debug + Send + Sync + 'static {
    /// Where and how the owner sends `blob`'s bytes, good until
    /// `expires_at_ms`: a URL that permits that one upload.
    async fn upload_slot(
        &self,
        blob: &BlobRecord,
        expires_at_ms: i64,
    ) -> Result<pb::UploadSlot, ChatError>;
    /// Checks the bytes stored for `blob` against its declaration (size,
    /// SHA-256 when declared, an image's type) and derives what the server
    /// fills in, storing a thumbnail for an image. UPLOAD_INCOMPLETE when
    /// nothing (or not everything) arrived, UPLOAD_MISMATCH or
    /// UNSUPPORTED_MEDIA_TYPE when the bytes are not what was declared.
    async fn inspect(&self, blob: &BlobRecord) -> Result<Inspected, ChatError>;
    /// A URL that permits a GET of `blob` (or its thumbnail) until
    /// `expires_at_ms`.
    async fn download_url(
        &self,
        blob: &BlobRecord,
        thumbnail: bool,
        expires_at_ms: i64,
    ) -> Result<String, ChatError>;
    /// Deletes a blob's bytes and its thumbnail's; gone already is fine.
    async fn delete(&self, id: &str) -> Result<(), ChatError>;
    /// Joins the parts of an upload that went up in parts (its slot had
    /// `parts`) into one object, before [`BlobStorage::inspect`].
    async fn join_parts(
        &self,
        blob: &BlobRecord,
        upload_id: &str,
        parts: &[pb::CompletedPart],
    ) -> Result<(), ChatError> {
        let _ = (blob, upload_id, parts);
        Err(not_in_parts())
    }
}

/// The refusal of a store that takes uploads whole to join parts.
pub fn not_in_parts() -> ChatError {
    ChatError::invalid("this store takes uploads whole, not in parts")
}

/// A kind's limits: the largest upload and the MIME types it allows
/// ("image/png", "audio/*", or "*/*" for any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindLimits {
    pub max_bytes: u64,
    pub mime_types: Vec<String>,
}

impl KindLimits {
    fn new(max_bytes: u64, mime_types: &[&str]) -> Self {
        Self {
            max_bytes,
            mime_types: mime_types.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    /// Whether `mime` (already checked to be `type/subtype`) is allowed.
    pub fn allows(&self, mime: &str) -> bool {
        let (ty, _) = mime.split_once('/').unwrap_or((mime, ""));
        self.mime_types.iter().any(|p| {
            p == "*/*"
                || p.eq_ignore_ascii_case(mime)
                || p.strip_suffix("/*")
                    .is_some_and(|t| t.eq_ignore_ascii_case(ty))
        })
    }
}

const MIB: u64 = 1024 * 1024;

/// The upload rules of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaLimits {
    pub image: KindLimits,
    pub voice: KindLimits,
    pub video: KindLimits,
    pub file: KindLimits,
    /// Per user, over the last 24 hours: slots asked for, and the bytes
    /// they declared (0: no quota).
    pub daily_uploads: u64,
    pub daily_bytes: u64,
    /// How long an upload slot's URL is good for.
    pub upload_ttl: Duration,
    /// How long a download URL is good for.
    pub download_ttl: Duration,
    /// A completed upload no message has referenced is deleted this long
    /// after it was made; an unfinished one this long after its slot
    /// expired.
    pub unused_grace: Duration,
    /// How often garbage collection runs.
    pub gc_every: Duration,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            image: KindLimits::new(
                20 * MIB,
                &[
                    "image/jpeg",
                    "image/png",
                    "image/gif",
                    "image/webp",
                    "image/heic",
                    "image/heif",
                    "image/avif",
                ],
            ),
            voice: KindLimits::new(20 * MIB, &["audio/*"]),
            video: KindLimits::new(500 * MIB, &["video/*"]),
            file: KindLimits::new(1024 * MIB, &["*/*"]),
            daily_uploads: 1000,
            daily_bytes: 5 * 1024 * MIB,
            upload_ttl: Duration::from_secs(15 * 60),
            download_ttl: Duration::from_secs(60 * 60),
            unused_grace: Duration::from_secs(24 * 3600),
            gc_every: Duration::from_secs(10 * 60),
        }
    }
}

impl MediaLimits {
    /// The limits of `kind`, or INVALID_ARGUMENT for none.
    pub fn of(&self, kind: pb::MediaKind) -> Result<&KindLimits, ChatError> {
        match kind {
            pb::MediaKind::Image => Ok(&self.image),
            pb::MediaKind::Voice => Ok(&self.voice),
            pb::MediaKind::Video => Ok(&self.video),
            pb::MediaKind::File => Ok(&self.file),
            pb::MediaKind::Unspecified => Err(ChatError::invalid(
                "an upload needs a kind: IMAGE, VOICE, VIDEO or FILE",
            )),
        }
    }

    /// Checks an upload request against these rules.
    pub fn check(&self, req: &pb::UploadRequest) -> Result<pb::MediaKind, ChatError> {
        let kind = pb::MediaKind::try_from(req.kind)
            .map_err(|_| ChatError::invalid(format!("media kind {} is unknown", req.kind)))?;
        let limits = self.of(kind)?;
        check_mime(&req.mime_type)?;
        if !limits.allows(&req.mime_type) {
            return Err(ChatError::UnsupportedMediaType(format!(
                "{} is not allowed for {}; allowed: {}",
                req.mime_type,
                kind.as_str_name(),
                limits.mime_types.join(", ")
            )));
        }
        if req.size_bytes == 0 {
            return Err(ChatError::invalid("an upload needs its size in bytes"));
        }
        if req.size_bytes > limits.max_bytes {
            return Err(ChatError::PayloadTooLarge(format!(
                "{} bytes is over the {} limit of {} bytes",
                req.size_bytes,
                kind.as_str_name(),
                limits.max_bytes
            )));
        }
        if !req.sha256.is_empty() && req.sha256.len() != 32 {
            return Err(ChatError::invalid(format!(
                "sha256 is 32 bytes, not {}",
                req.sha256.len()
            )));
        }
        if req.name.len() > 255 || req.name.chars().any(char::is_control) {
            return Err(ChatError::invalid(
                "a file name is at most 255 bytes, without control characters",
            ));
        }
        Ok(kind)
    }
}

/// A MIME type as uploads carry it: `type/subtype`, lowercase token
/// characters only, no parameters.
pub fn check_mime(mime: &str) -> Result<(), ChatError> {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b))
    };
    match mime.split_once('/') {
        Some((t, s)) if mime.len() <= 127 && token(t) && token(s) => Ok(()),
        _ => Err(ChatError::UnsupportedMediaType(format!(
            "{mime:?} is not a MIME type: lowercase type/subtype, no parameters"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: pb::MediaKind, mime: &str, size: u64) -> pb::UploadRequest {
        pb::UploadRequest {
            kind: kind as i32,
            mime_type: mime.into(),
            size_bytes: size,
            sha256: vec![],
            name: "a.bin".into(),
        }
    }

    #[test]
    fn uploads_are_checked_against_their_kinds_rules() {
        let l = MediaLimits::default();
        assert_eq!(
            l.check(&req(pb::MediaKind::Image, "image/png", 10))
                .unwrap(),
            pb::MediaKind::Image
        );
        assert!(l.check(&req(pb::MediaKind::Voice, "audio/ogg", 10)).is_ok());
        assert!(
            l.check(&req(pb::MediaKind::File, "application/pdf", 10))
                .is_ok()
        );
        let code = |r: pb::UploadRequest| l.check(&r).unwrap_err().code();
        assert_eq!(
            code(req(pb::MediaKind::Image, "application/pdf", 10)),
            pb::ErrorCode::UnsupportedMediaType
        );
        assert_eq!(
            code(req(pb::MediaKind::Image, "image/PNG; q=1", 10)),
            pb::ErrorCode::UnsupportedMediaType
        );
        assert_eq!(
            code(req(pb::MediaKind::Voice, "audio/ogg", 21 * MIB)),
            pb::ErrorCode::PayloadTooLarge
        );
        assert_eq!(
            code(req(pb::MediaKind::Unspecified, "image/png", 1)),
            pb::ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(req(pb::MediaKind::File, "text/plain", 0)),
            pb::ErrorCode::InvalidArgument
        );
        let mut bad_sum = req(pb::MediaKind::File, "text/plain", 1);
        bad_sum.sha256 = vec![1; 31];
        assert_eq!(code(bad_sum), pb::ErrorCode::InvalidArgument);
    }

    #[test]
    fn blob_ids_are_all_that_reaches_a_key() {
        assert!(is_blob_id(&new_blob_id()));
        assert!(!is_blob_id("../../etc/passwd"));
        assert!(!is_blob_id(&"A".repeat(32)));
        assert!(!is_blob_id(&"a".repeat(31)));
    }
}

/// One range of a `Range: bytes=...` request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..end` (end exclusive).
    Bounded { start: u64, end: u64 },
    /// From `start` to the end.
    From(u64),
    /// The last `n` bytes.
    Suffix(u64),
}

/// A `Range` header's value when it is a single `bytes=` range; None for
/// anything else, which is served whole, as RFC 9110 allows.
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.trim().split_once('-')?;
    match (start.parse::<u64>().ok(), end.parse::<u64>().ok()) {
        (Some(s), Some(e)) if e >= s && e < u64::MAX => Some(ByteRange::Bounded {
            start: s,
            end: e + 1,
        }),
        (Some(s), None) if end.is_empty() => Some(ByteRange::From(s)),
        (None, Some(n)) if start.is_empty() && n > 0 => Some(ByteRange::Suffix(n)),
        _ => None,
    }
}

/// A `Content-Range: bytes START-END/TOTAL` value (END inclusive):
/// `(start, end, total)`, only when `start <= end < total`.
pub fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let spec = value.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.parse().ok()?, end.parse().ok()?, total.parse().ok()?);
    (start <= end && end < total).then_some((start, end, total))
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn ranges_read_as_rfc_9110_has_them() {
        let b = |start, end| Some(ByteRange::Bounded { start, end });
        assert_eq!(parse_range("bytes=0-9"), b(0, 10));
        assert_eq!(parse_range("bytes=5-5"), b(5, 5 + 1));
        assert_eq!(parse_range("bytes=100-"), Some(ByteRange::From(100)));
        assert_eq!(parse_range("bytes=-20"), Some(ByteRange::Suffix(20)));
        for whole in [
            "",
            "bytes=",
            "bytes=9-0",
            "bytes=-0",
            "bytes=0-1,5-6",
            "items=0-9",
            "bytes=a-b",
            "bytes=-",
            "bytes=0-18446744073709551615",
        ] {
            assert_eq!(parse_range(whole), None, "{whole:?}");
        }
        assert_eq!(
            parse_content_range("bytes 300-999/1000"),
            Some((300, 999, 1000))
        );
        for bad in [
            "bytes 0-1000/1000",
            "bytes 5-4/10",
            "bytes */10",
            "300-999/1000",
            "bytes 1-2/x",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }
}
