//! A key prefix of one test, every key under it deleted when the guard
//! goes, so tests share one Redis in parallel and leave nothing behind. The
//! server comes from `PARLEY_TEST_REDIS_URL` (default: the local one
//! `scripts/services` provides).

use parley_core::testing::{run_blocking, unique_name};

/// The Redis server tests use.
pub fn redis_url() -> String {
    std::env::var("PARLEY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A key prefix of one test; every key under it is deleted when this goes.
#[derive(Debug)]
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
}

impl TestRedis {
    pub fn new() -> Self {
        Self {
            url: redis_url(),
            prefix: unique_name("parley-t"),
        }
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        run_blocking(async move {
            if let Err(e) = crate::delete_prefix(&url, &prefix).await {
                eprintln!("test cleanup of redis prefix {prefix} failed: {e}");
            }
        });
    }
}
