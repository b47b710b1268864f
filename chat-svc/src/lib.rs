//! Parley's chat core: users, devices, conversations (direct and group),
//! sequence numbers, persistence, the offline inbox and sync, history, the
//! block list, dedup, delivery fan-out and the admin API. Storage, presence
//! and the delivery bus sit behind traits, so one process (SQLite, memory,
//! channels) and a cluster (PostgreSQL, Redis, RabbitMQ) share this logic.

pub mod admin;
pub mod amqp_bus;
pub mod backend;
pub mod bus;
pub mod cli;
pub mod error;
pub mod internal;
pub mod ops;
pub mod presence;
pub mod redis_state;
pub mod remote;
pub mod service;
pub mod store;
pub mod testing;
pub mod token;

pub use amqp_bus::{AmqpBus, AmqpConfig};
pub use backend::ChatBackend;
pub use bus::{ChatEvent, Delivery, DeliveryBus, LocalBus};
pub use error::ChatError;
pub use presence::{MemoryPresence, Presence, Session};
pub use redis_state::{BlockCache, RedisState};
pub use remote::{RemoteChat, RemoteConfig};
pub use service::{ChatConfig, ChatMetrics, ChatService, SyncPage, now_ms};
pub use store::{PgStore, SqliteStore, Store};
pub use token::TokenKeys;
