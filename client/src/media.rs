//! Moving an upload's bytes: the HTTP PUT of a file to an upload slot's
//! signed URL and the GET of a download URL to a file, over HTTP/1.1
//! (hyper) on the SDK's own TCP or TLS transport, with progress reports. A
//! download that broke off resumes where its partial file ends (`Range`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{self, TlsOptions};

/// Called with (bytes moved so far, bytes in all) as a transfer goes.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// How transfers go: the TLS trust for `https` URLs, and how long one may
/// go without a byte moving before it is given up (and, for an upload,
/// resumed).
#[derive(Debug, Clone)]
pub(crate) struct Transfers {
    pub tls: Option<TlsOptions>,
    pub stall: Duration,
}
/// Bytes read from a file per body frame.
const CHUNK: usize = 256 * 1024;

type Body = BoxBody<Bytes, std::io::Error>;

/// An http(s) URL, split as a request needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    https: bool,
    /// host:port, the port filled in.
    authority: String,
    /// The Host header: the URL's own authority.
    host: String,
    path: String,
}

fn target(url: &str) -> Result<Target, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    };
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()));
    let authority = if has_port && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:{}", if https { 443 } else { 80 })
    };
    Ok(Target {
        https,
        authority,
        host: host.to_owned(),
        path,
    })
}

/// A connection to `t`'s server, ready for one request.
async fn open(
    t: &Target,
    tls: Option<&TlsOptions>,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, String> {
    let stream = if t.https {
        // The certificate must name the URL's host.
        let opts = TlsOptions {
            ca_file: tls.and_then(|o| o.ca_file.clone()),
            server_name: None,
        };
        let connector = transport::tls_connector(&opts)?;
        transport::connect(&t.authority, Some((&connector, &opts))).await?
    } else {
        transport::connect(&t.authority, None).await?
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP to {}: {e}", t.authority))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "media transfer connection ended");
        }
    });
    Ok(sender)
}

/// Reads a response body to text, for an error (at most 4 KiB).
async fn error_text(resp: hyper::Response<hyper::body::Incoming>, stall: Duration) -> String {
    let status = resp.status();
    let body = match tokio::time::timeout(stall, resp.into_body().collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    };
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    format!("HTTP {status}: {}", text.trim())
}

/// Whether a failed transfer is worth trying again as it was.
#[derive(Debug)]
pub(crate) struct TransferError {
    pub message: String,
    pub retry: bool,
}

fn transient(message: String) -> TransferError {
    TransferError {
        message,
        retry: true,
    }
}

/// How many bytes of an upload the server holds, for an upload URL that
/// resumes (Parley's own endpoint answers `HEAD` with `Upload-Offset`);
/// None when it does not say (a presigned S3 URL: send it all again).
pub(crate) async fn upload_offset(url: &str, opts: &Transfers) -> Option<u64> {
    let t = target(url).ok()?;
    let req = hyper::Request::head(&t.path)
        .header(hyper::header::HOST, &t.host)
        .body(BodyExt::boxed(Empty::new().map_err(|never| match never {})))
        .ok()?;
    let mut sender = open(&t, opts.tls.as_ref()).await.ok()?;
    let resp = tokio::time::timeout(opts.stall, sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.headers()
        .get("upload-offset")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Sends one request to `t`'s server on a connection of its own; `what`
/// names it in errors ("upload to").
async fn send(
    t: &Target,
    opts: &Transfers,
    req: hyper::http::request::Builder,
    body: Body,
    what: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, TransferError> {
    let req = req.body(body).map_err(|e| TransferError {
        message: e.to_string(),
        retry: false,
    })?;
    let mut sender = open(t, opts.tls.as_ref()).await.map_err(transient)?;
    sender
        .send_request(req)
        .await
        .map_err(|e| transient(format!("{what} {}: {e}", t.authority)))
}

/// PUTs the `size` bytes of the file at `path` to `url` with `headers`,
/// from byte `from` on (with `Content-Range` when that is not 0: the rest
/// of an upload that broke off).
pub(crate) async fn put_file(
    url: &str,
    headers: &[(String, String)],
    path: &Path,
    (from, size): (u64, u64),
    opts: &Transfers,
    progress: Option<Progress>,
) -> Result<(), TransferError> {
    let span = Span {
        from,
        to: size,
        total: size,
        content_range: from > 0,
    };
    put_span(url, headers, path, span, opts, progress)
        .await
        .map(drop)
}

/// PUTs one part of an upload in parts (bytes `offset..offset + len` of a
/// file of `total`): the ETag the store answered.
pub(crate) async fn put_part(
    url: &str,
    path: &Path,
    (offset, len, total): (u64, u64, u64),
    opts: &Transfers,
    progress: Option<Progress>,
) -> Result<String, TransferError> {
    let span = Span {
        from: offset,
        to: offset + len,
        total,
        content_range: false,
    };
    put_span(url, &[], path, span, opts, progress)
        .await?
        .ok_or_else(|| transient("the store answered a part without an ETag".into()))
}

/// Which bytes of a file a PUT carries.
struct Span {
    from: u64,
    to: u64,
    total: u64,
    /// Say so with `Content-Range` (Parley's own endpoint resuming).
    content_range: bool,
}

/// PUTs `span` of the file at `path`: the answer's ETag, if any.
async fn put_span(
    url: &str,
    headers: &[(String, String)],
    path: &Path,
    span: Span,
    opts: &Transfers,
    progress: Option<Progress>,
) -> Result<Option<String>, TransferError> {
    let Span {
        from,
        to,
        total: size,
        content_range,
    } = span;
    let t = target(url).map_err(|message| TransferError {
        message,
        retry: false,
    })?;
    let opened = async {
        let mut file = tokio::fs::File::open(path).await?;
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(from)).await?;
        Ok::<_, std::io::Error>(file)
    };
    let file = opened.await.map_err(|e| TransferError {
        message: format!("{}: {e}", path.display()),
        retry: false,
    })?;
    // When the body last moved: a connection that takes nothing for
    // `opts.stall` is given up (and the upload resumed), not waited on
    // forever.
    let began = tokio::time::Instant::now();
    let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let moved_by_body = moved.clone();
    let frames = futures_util::stream::unfold((file, from), move |(mut file, sent)| {
        let progress = progress.clone();
        let moved = moved_by_body.clone();
        async move {
            moved.store(
                began.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut buf = vec![0; CHUNK.min((to - sent) as usize)];
            if buf.is_empty() {
                return None;
            }
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    let sent = sent + n as u64;
                    if let Some(p) = &progress {
                        p(sent, size);
                    }
                    Some((Ok(Frame::data(Bytes::from(buf))), (file, sent)))
                }
                Err(e) => Some((Err(e), (file, sent))),
            }
        }
    });
    let mut req = hyper::Request::put(&t.path)
        .header(hyper::header::HOST, &t.host)
        .header(hyper::header::CONTENT_LENGTH, to - from);
    if content_range {
        req = req.header(
            hyper::header::CONTENT_RANGE,
            format!("bytes {from}-{}/{size}", to - 1),
        );
    }
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let sending = send(
        &t,
        opts,
        req,
        BodyExt::boxed(StreamBody::new(frames)),
        "upload to",
    );
    let stall = opts.stall.as_millis() as u64;
    let stalled = async {
        let every = (opts.stall.min(Duration::from_secs(4)) / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let last = moved.load(std::sync::atomic::Ordering::Relaxed);
            if began.elapsed().as_millis() as u64 > last + stall {
                return;
            }
        }
    };
    let resp = tokio::select! {
        resp = sending => resp?,
        () = stalled => {
            return Err(transient(format!(
                "upload to {} stalled: nothing moved for {} ms",
                t.authority,
                stall
            )));
        }
    };
    if resp.status().is_success() {
        let etag = resp
            .headers()
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Ok(etag);
    }
    if resp.status() == hyper::StatusCode::CONFLICT {
        // With Upload-Offset short of the size: not from where the upload
        // stands (or another request is sending it): resume. Without: the
        // bytes are all there (an earlier try got through and its answer
        // was lost); completing the upload checks them.
        let offset = resp
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        return match offset {
            Some(n) if n < size => Err(transient(error_text(resp, opts.stall).await)),
            _ => Ok(None),
        };
    }
    // The server ended this PUT short (its body broke off, or went
    // silent past the server's stall time) and kept what arrived: resume.
    let kept = resp
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if resp.status() == hyper::StatusCode::BAD_REQUEST && kept.is_some_and(|n| n < size) {
        return Err(transient(error_text(resp, opts.stall).await));
    }
    let retry = resp.status().is_server_error();
    Err(TransferError {
        message: error_text(resp, opts.stall).await,
        retry,
    })
}

/// The partial file a download writes until it is whole.
fn partial(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// GETs `url` into `dest`, resuming a partial download of it, and answers
/// the bytes' SHA-256 (of the whole file, resumed part included).
pub(crate) async fn get_file(
    url: &str,
    dest: &Path,
    opts: &Transfers,
    progress: Option<Progress>,
) -> Result<(u64, Vec<u8>), TransferError> {
    let t = target(url).map_err(|message| TransferError {
        message,
        retry: false,
    })?;
    let part = partial(dest);
    let io = |e: std::io::Error| TransferError {
        message: format!("{}: {e}", part.display()),
        retry: false,
    };
    let have = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let mut req = hyper::Request::get(&t.path).header(hyper::header::HOST, &t.host);
    if have > 0 {
        req = req.header(hyper::header::RANGE, format!("bytes={have}-"));
    }
    let empty = BodyExt::boxed(Empty::new().map_err(|never| match never {}));
    let resp = send(&t, opts, req, empty, "download from").await?;
    let status = resp.status();
    if status == hyper::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        // The partial file is not a start of this download: start over.
        let _ = tokio::fs::remove_file(&part).await;
        return Err(transient(format!(
            "{} is not part of this download; starting over",
            part.display()
        )));
    }
    let resumed = status == hyper::StatusCode::PARTIAL_CONTENT && have > 0;
    if !status.is_success() {
        let retry = status.is_server_error();
        return Err(TransferError {
            message: error_text(resp, opts.stall).await,
            retry,
        });
    }
    let length = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut hasher = Sha256::new();
    let mut file = if resumed {
        // What is there already goes into the digest first.
        let mut old = tokio::fs::File::open(&part).await.map_err(io)?;
        let mut buf = vec![0; CHUNK];
        loop {
            let n = old.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        tokio::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .await
            .map_err(io)?
    } else {
        tokio::fs::File::create(&part).await.map_err(io)?
    };
    let mut done = if resumed { have } else { 0 };
    let total = length.map(|l| l + done).unwrap_or(0);
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(opts.stall, body.frame()).await {
            Err(_) => return Err(transient(format!("download from {} stalled", t.authority))),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                file.flush().await.map_err(io)?;
                return Err(transient(format!("download from {}: {e}", t.authority)));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).await.map_err(io)?;
            hasher.update(&data);
            done += data.len() as u64;
            if let Some(p) = &progress {
                p(done, total.max(done));
            }
        }
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    if total > 0 && done != total {
        return Err(transient(format!(
            "download from {} ended after {done} of {total} bytes",
            t.authority
        )));
    }
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|e| TransferError {
            message: format!("{}: {e}", dest.display()),
            retry: false,
        })?;
    Ok((done, hasher.finalize().to_vec()))
}

/// The SHA-256 and size of a file.
pub(crate) async fn digest_file(path: &Path) -> std::io::Result<(u64, Vec<u8>)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok((size, hasher.finalize().to_vec()));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// A MIME type for a file name's extension (application/octet-stream when
/// unknown).
pub fn mime_for(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "avif" => "image/avif",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "wav" => "audio/wav",
        "aac" => "audio/aac",
        "amr" => "audio/amr",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// The kind of media a MIME type is sent as.
pub fn kind_for(mime: &str) -> parley_proto::pb::MediaKind {
    use parley_proto::pb::MediaKind;
    match mime.split('/').next().unwrap_or_default() {
        "image" => MediaKind::Image,
        "audio" => MediaKind::Voice,
        "video" => MediaKind::Video,
        _ => MediaKind::File,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_as_requests_need_them() {
        let t = target("http://127.0.0.1:7404/media/v1/blobs/ab?x=1").unwrap();
        assert_eq!(
            (
                t.https,
                t.authority.as_str(),
                t.host.as_str(),
                t.path.as_str()
            ),
            (
                false,
                "127.0.0.1:7404",
                "127.0.0.1:7404",
                "/media/v1/blobs/ab?x=1"
            )
        );
        let t = target("https://bucket.s3.example.com/k?X-Amz-Signature=1").unwrap();
        assert_eq!(t.authority, "bucket.s3.example.com:443");
        assert_eq!(t.host, "bucket.s3.example.com");
        let t = target("http://[::1]:9000/b/k").unwrap();
        assert_eq!(t.authority, "[::1]:9000");
        let t = target("https://h?q").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("h:443", "/?q"));
        assert!(target("ftp://h/x").is_err());
        assert!(target("http:///x").is_err());
    }

    #[test]
    fn file_types_come_off_their_names() {
        assert_eq!(mime_for(Path::new("a/Cat.JPG")), "image/jpeg");
        assert_eq!(mime_for(Path::new("notes")), "application/octet-stream");
        assert_eq!(kind_for("audio/ogg"), parley_proto::pb::MediaKind::Voice);
        assert_eq!(
            kind_for("application/pdf"),
            parley_proto::pb::MediaKind::File
        );
        assert_eq!(
            partial(Path::new("/tmp/x.png")),
            PathBuf::from("/tmp/x.png.part")
        );
    }
}
