//! The HTTP endpoint for URLs Parley signs itself: `PUT` of an upload's
//! bytes and `GET` (with `Range`, for resumed downloads) of a blob or its
//! thumbnail, each permitted by the URL's signature alone.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStoreExt, WriteMultipart};
use parley_core::media::is_blob_id;
use serde::Deserialize;

use crate::sign::{Grant, Refusal};
use crate::{HTTP_PREFIX, MediaStorage, object, staging};

/// Serves the signed URLs of `media` at [`HTTP_PREFIX`].
pub fn router(media: MediaStorage) -> Router {
    Router::new()
        .route(&format!("{HTTP_PREFIX}/{{key}}"), put(upload).get(download))
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

async fn upload(
    State(media): State<MediaStorage>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !is_blob_id(&id) {
        return refuse(StatusCode::NOT_FOUND, "no such upload");
    }
    let grant = Grant::Upload {
        id: &id,
        size: q.size,
        mime: &q.mime,
    };
    let Some(signer) = media.local_signer() else {
        return refuse(StatusCode::NOT_FOUND, "uploads go to the object store");
    };
    if let Err(r) = signer.check(&grant, q.expires, &q.sig, parley_core::now_ms()) {
        return refused(r);
    }
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
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = length
        && n != q.size
    {
        let status = if n > q.size {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        return refuse(status, format!("this upload is {} bytes, not {n}", q.size));
    }
    let store = media.store();
    let target = object(&id);
    match store.head(&target).await {
        Ok(_) => return refuse(StatusCode::CONFLICT, "this upload is complete already"),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return storage_failed(e),
    }
    let staged = staging(&id);
    let mut writer = match store.put_multipart(&staged).await {
        Ok(u) => WriteMultipart::new(u),
        Err(e) => return storage_failed(e),
    };
    let mut received = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // The client went away or sent a broken body: nothing kept.
                let _ = writer.abort().await;
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the upload broke off after {received} bytes: {e}"),
                );
            }
        };
        received += chunk.len() as u64;
        if received > q.size {
            let _ = writer.abort().await;
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("this upload is {} bytes; more arrived", q.size),
            );
        }
        if let Err(e) = writer.wait_for_capacity(4).await {
            return storage_failed(e);
        }
        writer.put(chunk);
    }
    if received != q.size {
        let _ = writer.abort().await;
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the upload ended after {received} of {} bytes: send it again whole",
                q.size
            ),
        );
    }
    if let Err(e) = writer.finish().await {
        return storage_failed(e);
    }
    match store.rename_if_not_exists(&staged, &target).await {
        Ok(()) => (StatusCode::OK, "stored\n").into_response(),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let _ = store.delete(&staged).await;
            refuse(StatusCode::CONFLICT, "this upload is complete already")
        }
        Err(e) => storage_failed(e),
    }
}

/// Whether a download of `mime` may show in a browser (pictures, sound,
/// video); anything else is sent as an attachment to save.
pub(crate) fn serves_inline(mime: &str) -> bool {
    ["image/", "audio/", "video/"]
        .iter()
        .any(|p| mime.starts_with(p))
}

/// A single `bytes=` range of a Range header; None for anything else
/// (served whole, as RFC 9110 allows).
fn range_of(headers: &HeaderMap) -> Option<GetRange> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.trim().split_once('-')?;
    match (start.parse::<u64>().ok(), end.parse::<u64>().ok()) {
        (Some(s), Some(e)) if e >= s => Some(GetRange::Bounded(s..e.saturating_add(1))),
        (Some(s), None) if end.is_empty() => Some(GetRange::Offset(s)),
        (None, Some(n)) if start.is_empty() && n > 0 => Some(GetRange::Suffix(n)),
        _ => None,
    }
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
