//! Media: a large file up and down through the SDK, on the embedded
//! default with its uploads in the data directory (`local`, served by
//! Parley's own HTTP endpoint) or in an S3 server (`s3`: s3s-fs on
//! loopback, presigned URLs), and the 1:1 message path's latency alone and
//! while files move.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use parley_client::{Admin, Client, ClientConfig};
use parley_media::testing::S3Server;
use parley_proto::pb;
use serde::Serialize;

use crate::load::{Latency, Traffic, Workload};
use crate::procs::ParleyServer;
use crate::{Env, Server, System};

/// One store's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MediaRow {
    pub store: String,
    pub file_bytes: u64,
    /// MB/s (10^6 bytes a second) of each timed upload (slot, PUT,
    /// completion with its check) and download.
    pub upload_mb_s: Vec<f64>,
    pub download_mb_s: Vec<f64>,
    /// The same 1:1 load alone, then while one client uploads and another
    /// downloads the file over and over.
    pub alone: Traffic,
    pub during: Traffic,
    /// Files moved (up and down) during the second run.
    pub transfers_during: u64,
}

fn mb_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// Two users of their own, connected through the SDK, with their direct
/// conversation.
async fn pair(server: &ParleyServer) -> anyhow::Result<(Client, Client, u64)> {
    let mut admin = Admin::connect(&server.admin_url, &server.admin_key).await?;
    let tag = format!("{:08x}", rand::random::<u32>());
    let mut clients = Vec::new();
    for who in ["up", "down"] {
        let user = format!("media-{who}-{tag}");
        admin.create_user(&user, "").await?;
        let token = admin.token(&user, 3600).await?.token;
        let cfg = ClientConfig::new(server.gateways[0].to_string(), token, "bench");
        clients.push(Client::connect(cfg).await?.0);
    }
    let down = clients.pop().context("two clients")?;
    let up = clients.pop().context("two clients")?;
    let conv = up.open_direct(down.user_id()).await?.id;
    Ok((up, down, conv))
}

/// Sends an uploaded blob and answers the message as the receiver reads it.
async fn share(
    up: &Client,
    down: &Client,
    conv: u64,
    blob: &pb::Blob,
) -> anyhow::Result<pb::Message> {
    let media = pb::Media {
        blob_id: blob.blob_id.clone(),
        ..Default::default()
    };
    let content = pb::Content {
        body: Some(pb::content::Body::Media(Box::new(media))),
    };
    let ack = up.send(conv, content).await?;
    let page = down
        .history(conv, ack.seq + 1, pb::Direction::Backward, 1)
        .await?;
    page.messages
        .into_iter()
        .find(|m| m.seq == ack.seq)
        .context("the message just sent")
}

/// Measures one store: `store` is `local` or `s3`.
pub async fn run(
    env: &Env,
    store: &str,
    mb: u64,
    files: usize,
    w: Workload,
) -> anyhow::Result<MediaRow> {
    let s3 = match store {
        "s3" => Some(S3Server::start().await?),
        "local" => None,
        other => anyhow::bail!("store {other:?}: local or s3"),
    };
    let extra = s3.as_ref().map(S3Server::env).unwrap_or_default();
    let server = ParleyServer::embedded_with(&env.exe, extra).await?;
    let dir = tempfile::Builder::new().prefix("parley-media-").tempdir()?;
    let file = dir.path().join("payload.bin");
    let bytes: Vec<u8> = (0..mb * 1024 * 1024)
        .map(|_| rand::random::<u8>())
        .collect();
    std::fs::write(&file, &bytes)?;
    let size = bytes.len() as u64;
    drop(bytes);
    let (up, down, conv) = pair(&server).await?;
    let mime = Some("application/octet-stream");

    let mut upload_mb_s = Vec::new();
    let mut last = None;
    for _ in 0..files.max(1) {
        let t = Instant::now();
        last = Some(up.upload(&file, mime, None).await?);
        upload_mb_s.push(mb_s(size, t.elapsed()));
    }
    let message = share(&up, &down, conv, &last.context("an upload")?).await?;
    let mut download_mb_s = Vec::new();
    for i in 0..files.max(1) {
        let dest = dir.path().join(format!("down-{i}.bin"));
        let t = Instant::now();
        down.download(&message, false, &dest, None).await?;
        download_mb_s.push(mb_s(size, t.elapsed()));
        std::fs::remove_file(&dest)?;
    }

    let server = Server::Parley(server);
    let alone = crate::traffic(System::Parley, &server, w.clone()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mover = tokio::spawn(keep_moving(
        up.clone(),
        down.clone(),
        message,
        file.clone(),
        dir.path().to_path_buf(),
        stop.clone(),
        moved.clone(),
    ));
    let during = crate::traffic(System::Parley, &server, w).await?;
    stop.store(true, Ordering::Relaxed);
    mover.await??;
    server.stop().await;
    Ok(MediaRow {
        store: store.to_owned(),
        file_bytes: size,
        upload_mb_s,
        download_mb_s,
        alone,
        during,
        transfers_during: moved.load(Ordering::Relaxed),
    })
}

/// Uploads and downloads the file, turn about, until `stop`.
async fn keep_moving(
    up: Client,
    down: Client,
    message: pb::Message,
    file: std::path::PathBuf,
    dir: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let dest = dir.join("during.bin");
    while !stop.load(Ordering::Relaxed) {
        up.upload(&file, Some("application/octet-stream"), None)
            .await?;
        down.download(&message, false, &dest, None).await?;
        let _ = std::fs::remove_file(&dest);
        moved.fetch_add(2, Ordering::Relaxed);
    }
    Ok(())
}

fn spread(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(lo), Some(mid), Some(hi)) => format!("{mid:.0} ({lo:.0}–{hi:.0})"),
        _ => "–".to_owned(),
    }
}

fn latency(l: &Option<Latency>) -> String {
    l.as_ref()
        .map(|l| format!("{:.1} / {:.1}", l.p50_ms, l.p99_ms))
        .unwrap_or_else(|| "–".to_owned())
}

/// The figures as a Markdown table.
pub fn table(rows: &[MediaRow]) -> String {
    let mut out = String::from(
        "| store | file | upload MB/s, median (range) | download MB/s | msg/s | ack p50 / p99 ms alone | while files move | deliver p50 / p99 ms alone | while files move | files moved meanwhile | ledger alone / during |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ledger = |t: &Traffic| {
            format!(
                "{} of {}, lost {}, dup {}",
                t.delivered, t.expected, t.lost, t.duplicated
            )
        };
        out.push_str(&format!(
            "| {} | {:.1} MB | {} | {} | {:.0} | {} | {} | {} | {} | {} | {}; {} |\n",
            r.store,
            r.file_bytes as f64 / 1e6,
            spread(&r.upload_mb_s),
            spread(&r.download_mb_s),
            r.alone.workload.rate,
            latency(&r.alone.ack),
            latency(&r.during.ack),
            latency(&r.alone.deliver),
            latency(&r.during.deliver),
            r.transfers_during,
            ledger(&r.alone),
            ledger(&r.during),
        ));
    }
    out
}
