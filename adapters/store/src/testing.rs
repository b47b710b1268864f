//! Helpers for tests that need a real PostgreSQL: each test gets a schema
//! (or a database) of its own, dropped when the guard goes, so tests run in
//! parallel and leave nothing behind. The server comes from
//! `PARLEY_TEST_DATABASE_URL` (default: the local one `scripts/services`
//! provides).

use parley_core::testing::{run_blocking, unique_name};
use sqlx::{Connection, PgConnection};

/// The PostgreSQL server tests use.
pub fn database_url() -> String {
    std::env::var("PARLEY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Runs one statement on a fresh connection, from `Drop`.
fn execute_blocking(url: String, sql: String) {
    run_blocking(async move {
        match PgConnection::connect(&url).await {
            Ok(mut conn) => {
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&mut conn)
                    .await
                {
                    eprintln!("test cleanup `{sql}` failed: {e}");
                }
            }
            Err(e) => eprintln!("test cleanup could not connect: {e}"),
        }
    });
}

/// A schema of one test, dropped with everything in it when this goes.
#[derive(Debug)]
pub struct TestSchema {
    pub url: String,
    pub name: String,
}

impl TestSchema {
    /// A new name on the test server; the store creates the schema itself.
    pub fn new() -> Self {
        Self {
            url: database_url(),
            name: unique_name("parley_t"),
        }
    }
}

impl Default for TestSchema {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Sessions a failed test left behind would hold locks the drop
        // waits for: end them first, and never wait long.
        execute_blocking(
            self.url.clone(),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'parley-chat {name}'; \
                 SET lock_timeout = '10s'; \
                 DROP SCHEMA IF EXISTS \"{name}\" CASCADE",
                name = self.name
            ),
        );
    }
}

/// A database of one test (for processes that take a URL), dropped when
/// this goes, even with connections still open to it.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    /// The URL that reaches the new database.
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Result<Self, sqlx::Error> {
        Self::create_on(&database_url()).await
    }

    /// A new database on the server `admin_url` reaches.
    pub async fn create_on(admin_url: &str) -> Result<Self, sqlx::Error> {
        let admin_url = admin_url.to_owned();
        let name = unique_name("parley_t");
        let mut conn = PgConnection::connect(&admin_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(Self {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        execute_blocking(
            self.admin_url.clone(),
            format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }
}
