//! Parley's stores behind `parley_core::Store`: SQLite, the one-process
//! default (a file in WAL mode, sends written by a thread of their own), and
//! PostgreSQL for a cluster (several chat-service replicas on one database).
//! Their migrations live beside them in `migrations/`; both pass the core's
//! conformance suite, and what only a shared database can show (replicas
//! writing one conversation at once) is tested here.

mod postgres;
mod sqlite;
mod sqlite_append;
pub mod testing;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use parley_core::ChatError;

/// Turns a database error into the core's storage failure, keeping it as
/// the source (logged, never sent to a client).
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, ChatError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, ChatError> {
        self.map_err(ChatError::storage)
    }
}

impl<T> Db<T> for Result<T, sqlx::migrate::MigrateError> {
    fn db(self) -> Result<T, ChatError> {
        self.map_err(ChatError::storage)
    }
}

#[cfg(test)]
mod tests;
