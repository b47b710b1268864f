//! A real S3 server for tests: s3s-fs (the `s3s` project's
//! filesystem-backed server, from crates.io; `scripts/services` installs
//! it) on a port of its own over a temporary directory. It checks SigV4
//! signatures, presigned URLs' expiry and every signed header, as AWS S3
//! and MinIO do, so a URL it takes is one they take.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::S3Config;

/// The bucket every test server has.
pub const BUCKET: &str = "media";
const ACCESS: &str = "parley-test";
const SECRET: &str = "parley-test-secret-key-0123456789";

/// A running s3s-fs, stopped (and its files removed) when dropped.
pub struct S3Server {
    child: Child,
    root: tempfile::TempDir,
    pub endpoint: String,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let installed = home.join("bin/s3s-fs");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("s3s-fs")
    }
}

impl S3Server {
    /// Starts one, with the bucket [`BUCKET`], and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        use anyhow::Context;
        let root = tempfile::Builder::new().prefix("parley-s3-").tempdir()?;
        std::fs::create_dir(root.path().join(BUCKET))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS, "--secret-key", SECRET])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("s3s-fs (run ./scripts/services, which installs it)")?;
        let server = Self {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("s3s-fs did not answer on port {port}")
    }

    /// Parley's configuration for it.
    pub fn config(&self) -> S3Config {
        S3Config {
            bucket: BUCKET.into(),
            endpoint: Some(self.endpoint.clone()),
            public_endpoint: None,
            region: "us-east-1".into(),
            access_key: ACCESS.into(),
            secret_key: SECRET.into(),
        }
    }

    /// The same as `parley-chat`'s environment.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("PARLEY_MEDIA_S3_BUCKET", BUCKET),
            ("PARLEY_MEDIA_S3_ENDPOINT", &self.endpoint),
            ("PARLEY_MEDIA_S3_ACCESS_KEY", ACCESS),
            ("PARLEY_MEDIA_S3_SECRET_KEY", SECRET),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The objects stored, by key (`blobs/<id>`, `uploads/<id>`, ...).
    pub fn keys(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, prefix: &str, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let key = format!("{prefix}{name}");
                if entry.path().is_dir() {
                    walk(&entry.path(), &format!("{key}/"), out);
                } else if !name.starts_with('.') {
                    out.push(key);
                }
            }
        }
        let mut keys = Vec::new();
        walk(&self.root.path().join(BUCKET), "", &mut keys);
        keys.sort();
        keys
    }

    /// What the server keeps of multipart uploads not yet joined or
    /// aborted (s3s-fs keeps them as hidden files at its root: each
    /// upload's record and its parts).
    pub fn unfinished_parts(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect();
        names.sort();
        names
    }
}
