//! The HTTP endpoint for URLs Parley signs itself: `PUT` of an upload's
//! bytes and `GET` (with `Range`, for resumed downloads) of a blob or its
//! thumbnail, each permitted by the URL's signature alone.

use axum::Router;
use axum::body::Body;
use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};
use parley_core::media::{ByteRange, is_blob_id, parse_content_range, parse_range};
use serde::Deserialize;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::sign::{Grant, Refusal};
use crate::{HTTP_PREFIX, MediaStorage, object};

/// Serves the signed URLs of `media` at [`HTTP_PREFIX`].
pub fn router(media: MediaStorage) -> Router {
    Router::new()
        .route(
            &format!("{HTTP_PREFIX}/{{key}}"),
            put(upload).get(download).head(head),
        )
        .with_state(media)
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    size: u64,
    #[serde(rename = "type")]
    mime: String,
    expires: i64,
    sig: String,
}

#[derive(Debug, Deserialize)]
struct DownloadQuery {
    #[serde(rename = "type")]
    mime: String,
    expires: i64,
    sig: String,
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, format!("{}\n", why.into())).into_response()
}

fn refused(r: Refusal) -> Response {
    match r {
        Refusal::BadSignature => refuse(
            StatusCode::FORBIDDEN,
            "the URL's signature does not permit this",
        ),
        Refusal::Expired => refuse(
            StatusCode::FORBIDDEN,
            "the URL has expired: ask for a new one",
        ),
    }
}

fn storage_failed(e: object_store::Error) -> Response {
    tracing::warn!(error = %e, "media endpoint: storage failed");
    refuse(StatusCode::SERVICE_UNAVAILABLE, "storage failed; retry")
}

/// Where the local endpoint keeps an upload's bytes until they are whole.
pub(crate) fn partial(dir: &Path, id: &str) -> PathBuf {
    dir.join("partial").join(id)
}

/// The `Upload-Offset` header: how many bytes of an upload have arrived.
const UPLOAD_OFFSET: &str = "upload-offset";

/// A checked upload URL: the blob id, its declaration and the store's
/// directory, or the refusal to answer.
fn upload_grant(media: &MediaStorage, id: &str, q: &UploadQuery) -> Result<PathBuf, Box<Response>> {
    if !is_blob_id(id) {
        return Err(Box::new(refuse(StatusCode::NOT_FOUND, "no such upload")));
    }
    let (Some(signer), Some(dir)) = (media.local_signer(), media.local_dir()) else {
        return Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            "uploads go to the object store",
        )));
    };
    let grant = Grant::Upload {
        id,
        size: q.size,
        mime: &q.mime,
    };
    signer
        .check(&grant, q.expires, &q.sig, parley_core::now_ms())
        .map_err(|r| Box::new(refused(r)))?;
    Ok(dir.to_path_buf())
}

/// Where upload `id`'s blob is once it is whole.
fn placed(dir: &Path, id: &str) -> PathBuf {
    dir.join("blobs").join(id)
}

/// Moves the whole partial file of upload `id` into place as its blob.
/// The blob is never replaced (a link fails on an existing name), and the
/// partial's name goes once the blob has the file.
pub(crate) async fn place(dir: &Path, id: &str) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir.join("blobs")).await?;
    match tokio::fs::hard_link(partial(dir, id), placed(dir, id)).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    match tokio::fs::remove_file(partial(dir, id)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// How many bytes of upload `id` are here: all of them once it is whole
/// (a whole partial that nobody is writing, left unplaced by a crash, is
/// placed now). The partial is read before the blob is looked for: a
/// placement links the blob before it unlinks the partial, so one that
/// happens in between is seen.
pub(crate) async fn received(dir: &Path, id: &str, size: u64) -> std::io::Result<u64> {
    let have = match tokio::fs::metadata(partial(dir, id)).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if tokio::fs::try_exists(placed(dir, id)).await? {
        return Ok(size);
    }
    if have == size {
        place_whole(dir, id, size).await?;
    }
    Ok(have)
}

/// Places upload `id`'s partial if it is whole and nobody holds it (a
/// writer places its own): placing happens only under the partial's lock,
/// so no writer ever has the file it writes turned into a blob.
pub(crate) async fn place_whole(dir: &Path, id: &str, size: u64) -> std::io::Result<()> {
    let Some(file) = lock_partial(dir, id, false).await? else {
        return Ok(());
    };
    if tokio::fs::try_exists(placed(dir, id)).await? {
        return Ok(());
    }
    if file.metadata().await?.len() == size {
        place(dir, id).await?;
    }
    drop(file);
    Ok(())
}

/// Removes upload `id`'s partial name once the upload is placed: an empty
/// partial a request made after the placement, or the name a placement
/// that crashed between its link and its unlink left on the blob's file.
async fn remove_partial(dir: &Path, id: &str) {
    let _ = tokio::fs::remove_file(partial(dir, id)).await;
}

fn offset_header(response: &mut Response, offset: u64) {
    if let Ok(v) = HeaderValue::from_str(&offset.to_string()) {
        response.headers_mut().insert(UPLOAD_OFFSET, v);
    }
}

fn io_failed(e: std::io::Error) -> Response {
    tracing::warn!(error = %e, "media endpoint: storage failed");
    refuse(StatusCode::SERVICE_UNAVAILABLE, "storage failed; retry")
}

/// Upload `id`'s partial file, opened (created if missing, when `create`)
/// and locked for this request alone; None while another request, in this
/// process or another one sharing `dir`, holds it (or, without `create`,
/// when there is none). The lock goes with the file.
async fn lock_partial(
    dir: &Path,
    id: &str,
    create: bool,
) -> std::io::Result<Option<tokio::fs::File>> {
    if create {
        tokio::fs::create_dir_all(dir.join("partial")).await?;
    }
    let path = partial(dir, id);
    tokio::task::spawn_blocking(move || {
        let opened = std::fs::OpenOptions::new()
            .create(create)
            .truncate(false)
            .write(true)
            .open(&path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(tokio::fs::File::from_std(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `HEAD` of an upload URL: where the upload stands (`Upload-Offset`);
/// of a download URL, the download's headers.
async fn head(
    State(media): State<MediaStorage>,
    UrlPath(key): UrlPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    if let Ok(Query(q)) =
        Query::<UploadQuery>::try_from_uri(&format!("/?{query}").parse().unwrap_or_default())
    {
        let dir = match upload_grant(&media, &key, &q) {
            Ok(dir) => dir,
            Err(r) => return *r,
        };
        return match received(&dir, &key, q.size).await {
            Ok(n) => {
                let mut r = StatusCode::OK.into_response();
                offset_header(&mut r, n);
                r
            }
            Err(e) => io_failed(e),
        };
    }
    match Query::<DownloadQuery>::try_from_uri(&format!("/?{query}").parse().unwrap_or_default()) {
        Ok(q) => download(State(media), UrlPath(key), q, headers).await,
        Err(_) => refuse(
            StatusCode::FORBIDDEN,
            "the URL's signature does not permit this",
        ),
    }
}

/// `bytes START-END/TOTAL` of a Content-Range header: None without one,
/// `Err` for one that is not well-formed.
fn content_range(headers: &HeaderMap) -> Option<Result<(u64, u64, u64), ()>> {
    let v = headers.get(header::CONTENT_RANGE)?;
    Some(v.to_str().ok().and_then(parse_content_range).ok_or(()))
}

/// `PUT` of an upload URL: the whole upload, or with `Content-Range` the
/// rest of one that broke off, from where it ended.
async fn upload(
    State(media): State<MediaStorage>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dir = match upload_grant(&media, &id, &q) {
        Ok(dir) => dir,
        Err(r) => return *r,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    if content_type.as_deref() != Some(q.mime.as_str()) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "this upload's Content-Type is {}, not {:?}",
                q.mime,
                content_type.unwrap_or_default()
            ),
        );
    }
    let (start, len) = match content_range(&headers) {
        None => (0, q.size),
        Some(Ok((start, end, total))) if total == q.size => (start, end - start + 1),
        Some(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("Content-Range is bytes START-END/{}", q.size),
            );
        }
    };
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = length
        && n != len
    {
        let status = if n > len {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        return refuse(status, format!("this request carries {len} bytes, not {n}"));
    }
    // One writer per upload: the partial file's lock, which every process
    // sharing the directory (gateways of a cluster) honours. A second PUT
    // of the same upload while the first is still going is refused, so no
    // file is written by two, and none once it is in place.
    let mut file = match lock_partial(&dir, &id, true).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            let mut r = refuse(
                StatusCode::CONFLICT,
                "another request is sending this upload",
            );
            offset_header(&mut r, 0);
            return r;
        }
        Err(e) => return io_failed(e),
    };
    // Under the lock, nobody else writes or places this upload. It may be
    // placed already: the file this request holds is then the blob's
    // (opened before its partial name went) or a new, empty partial.
    match tokio::fs::try_exists(placed(&dir, &id)).await {
        Ok(true) => {
            remove_partial(&dir, &id).await;
            return refuse(StatusCode::CONFLICT, "this upload is complete already");
        }
        Ok(false) => {}
        Err(e) => return io_failed(e),
    }
    let have = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return io_failed(e),
    };
    if have == q.size {
        // Whole, left unplaced by a crash.
        return match place(&dir, &id).await {
            Ok(()) => refuse(StatusCode::CONFLICT, "this upload is complete already"),
            Err(e) => io_failed(e),
        };
    }
    if start > 0 && start != have {
        let mut r = refuse(
            StatusCode::CONFLICT,
            format!("{have} bytes of this upload are here: go on from there"),
        );
        offset_header(&mut r, have);
        return r;
    }
    if start == 0
        && let Err(e) = file.set_len(0).await
    {
        return io_failed(e);
    }
    if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
        return io_failed(e);
    }
    let mut got = 0u64;
    let mut stream = body.into_data_stream();
    let mut broke = None;
    let stall = media.body_stall();
    loop {
        let chunk = match tokio::time::timeout(stall, stream.next()).await {
            Ok(None) => break,
            Ok(Some(Ok(c))) => c,
            Ok(Some(Err(e))) => {
                broke = Some(e.to_string());
                break;
            }
            Err(_) => {
                // A half-dead connection: let the upload go (and its lock,
                // as this request ends), so that a resume can go on.
                broke = Some(format!("nothing arrived for {} ms", stall.as_millis()));
                break;
            }
        };
        if got + chunk.len() as u64 > len {
            // What this request added goes; what came before stays.
            let _ = file.set_len(start).await;
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("this request carries {len} bytes; more arrived"),
            );
        }
        if let Err(e) = file.write_all(&chunk).await {
            return io_failed(e);
        }
        got += chunk.len() as u64;
    }
    if let Err(e) = file.sync_all().await {
        return io_failed(e);
    }
    let now = start + got;
    if now < q.size {
        // Kept: the client resumes from here (HEAD says so too).
        let why = broke.unwrap_or_else(|| "the body ended".to_owned());
        let mut r = refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "{now} of {} bytes are here ({why}): send the rest with Content-Range",
                q.size
            ),
        );
        offset_header(&mut r, now);
        return r;
    }
    // Whole: into place, while this request still holds the upload.
    let placed = place(&dir, &id).await;
    drop(file);
    match placed {
        Ok(()) => (StatusCode::OK, "stored\n").into_response(),
        Err(e) => io_failed(e),
    }
}

/// Whether a download of `mime` may show in a browser: raster pictures,
/// sound and video, which run no script. Anything else (SVG, HTML, PDF,
/// ...) is sent as an attachment to save.
pub(crate) fn serves_inline(mime: &str) -> bool {
    matches!(
        mime,
        "image/jpeg"
            | "image/png"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "image/heic"
            | "image/heif"
    ) || ((mime.starts_with("audio/") || mime.starts_with("video/")) && !mime.contains("xml"))
}

/// A single `bytes=` range of a Range header; None for anything else
/// (served whole, as RFC 9110 allows).
fn range_of(headers: &HeaderMap) -> Option<GetRange> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    Some(match parse_range(value)? {
        ByteRange::Bounded { start, end } => GetRange::Bounded(start..end),
        ByteRange::From(start) => GetRange::Offset(start),
        ByteRange::Suffix(n) => GetRange::Suffix(n),
    })
}

async fn download(
    State(media): State<MediaStorage>,
    UrlPath(key): UrlPath<String>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Response {
    let stem = key.strip_suffix(".thumb").unwrap_or(&key);
    if !is_blob_id(stem) {
        return refuse(StatusCode::NOT_FOUND, "no such blob");
    }
    let grant = Grant::Download {
        key: &key,
        mime: &q.mime,
    };
    let Some(signer) = media.local_signer() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "downloads come from the object store",
        );
    };
    if let Err(r) = signer.check(&grant, q.expires, &q.sig, parley_core::now_ms()) {
        return refused(r);
    }
    let range = range_of(&headers);
    let partial = range.is_some();
    let options = GetOptions {
        range,
        ..GetOptions::default()
    };
    let got = match media.store().get_opts(&object(&key), options).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return refuse(StatusCode::NOT_FOUND, "no such blob");
        }
        Err(e @ object_store::Error::Generic { .. }) if partial => {
            tracing::debug!(error = %e, "unsatisfiable range");
            return refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range is past the end",
            );
        }
        Err(e) => return storage_failed(e),
    };
    let total = got.meta.size;
    let served = got.range.clone();
    let mut response = Response::new(Body::from_stream(got.into_stream()));
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
    h.insert(header::CONTENT_TYPE, value(q.mime.clone()));
    h.insert(
        header::CONTENT_LENGTH,
        value((served.end - served.start).to_string()),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    // Bytes a user uploaded never run as a page of this origin.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    if !serves_inline(&q.mime) {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    if partial {
        h.insert(
            header::CONTENT_RANGE,
            value(format!(
                "bytes {}-{}/{total}",
                served.start,
                served.end.saturating_sub(1)
            )),
        );
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole partial is placed by whoever finds it only while nobody
    /// holds it: a writer (here the test, holding the lock as a request in
    /// another process would) never has its file turned into a blob under
    /// it; once it lets go, the next look places it.
    #[tokio::test]
    async fn a_partial_is_placed_only_under_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let id = parley_core::media::new_blob_id();
        std::fs::create_dir_all(dir.path().join("partial")).unwrap();
        std::fs::write(partial(dir.path(), &id), b"whole").unwrap();
        let held = std::fs::File::open(partial(dir.path(), &id)).unwrap();
        held.try_lock().unwrap();
        assert_eq!(received(dir.path(), &id, 5).await.unwrap(), 5);
        let blob = placed(dir.path(), &id);
        assert!(!blob.exists(), "placed under its writer");
        drop(held);
        assert_eq!(received(dir.path(), &id, 5).await.unwrap(), 5);
        assert_eq!(std::fs::read(&blob).unwrap(), b"whole");
        assert!(!partial(dir.path(), &id).exists());
        // A request that opens a new partial after that finds it placed,
        // and its empty partial goes.
        let late = lock_partial(dir.path(), &id, true).await.unwrap().unwrap();
        remove_partial(dir.path(), &id).await;
        drop(late);
        assert!(!partial(dir.path(), &id).exists());
        assert_eq!(std::fs::read(&blob).unwrap(), b"whole");
    }
}
