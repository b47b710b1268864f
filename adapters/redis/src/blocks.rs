//! The block-list cache in front of the database: the users each user
//! blocks, newline-separated, trusted for a while and evicted on change.

use std::time::Duration;

use async_trait::async_trait;
use parley_core::{BlockCache, ChatError};
use redis::AsyncCommands;

use crate::{RedisState, redis_err};

/// How long a cached block list is trusted.
const BLOCKS_TTL: Duration = Duration::from_secs(600);

#[async_trait]
impl BlockCache for RedisState {
    async fn get(&self, users: &[&str]) -> Result<Vec<Option<Vec<String>>>, ChatError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|u| self.keys.blocks(u)).collect();
        let mut c = self.conn.clone();
        let values: Vec<Option<String>> = c.mget(keys).await.map_err(redis_err)?;
        Ok(values
            .into_iter()
            .map(|v| {
                v.map(|s| {
                    s.split('\n')
                        .filter(|x| !x.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
            })
            .collect())
    }

    async fn put(&self, user: &str, blocked: &[String]) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.set_ex::<_, _, ()>(
            self.keys.blocks(user),
            blocked.join("\n"),
            BLOCKS_TTL.as_secs(),
        )
        .await
        .map_err(redis_err)
    }

    async fn forget(&self, user: &str) -> Result<(), ChatError> {
        let mut c = self.conn.clone();
        c.del::<_, ()>(self.keys.blocks(user))
            .await
            .map_err(redis_err)
    }
}
