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

/// Turns a database error into the core's error: an unreachable database
/// is `Unavailable` (clients try again: nothing was refused), anything else
/// a storage failure with the database's error as its source (logged,
/// never sent to a client).
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, ChatError>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, ChatError> {
        self.map_err(|e| {
            if unreachable(&e) {
                tracing::warn!(error = %e, "the database is unreachable");
                ChatError::Unavailable("the database is unreachable".to_owned())
            } else {
                ChatError::storage(e)
            }
        })
    }
}

/// Whether `e` says the database cannot be reached or is going away,
/// rather than that it refused this statement.
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: the server is shutting
            // down, crashed or starting; 53300: too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

impl<T> Db<T> for Result<T, sqlx::migrate::MigrateError> {
    fn db(self) -> Result<T, ChatError> {
        self.map_err(ChatError::storage)
    }
}

#[cfg(test)]
mod tests;
