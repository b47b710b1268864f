//! Helpers for tests that share real services (PostgreSQL, Redis,
//! RabbitMQ) with other tests and other runs: names no one else picks, and
//! cleanup that runs from `Drop`. The guards themselves live with the
//! adapter that talks to each service (`parley_store::testing`,
//! `parley_redis::testing`).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A name no other test run will pick: `prefix`, `_` and 16 hex digits.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS per process; the counter and the
    // clock tell this process's names apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{prefix}_{:016x}", h.finish())
}

/// Runs `work` to completion on a thread and runtime of its own, so cleanup
/// works inside `Drop`, even while a test unwinds.
pub fn run_blocking<F>(work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for cleanup")
            .block_on(work)
    })
    .join();
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_do_not_repeat() {
        let names: std::collections::HashSet<String> =
            (0..1000).map(|_| super::unique_name("t")).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.len() == "t_".len() + 16));
    }
}
