//! Parley's domain core: the chat rules and the traits the adapters
//! implement. Users, devices, conversations (direct and group), sequence
//! numbers, dedup, the per-user inbox and catch-up, history, membership,
//! blocks, tokens, and the fan-out of committed messages live here; the
//! database, the cache and the broker do not. Storage (`Store`), presence
//! (`Presence`) and the delivery bus (`DeliveryBus`) are traits: the
//! adapters (`parley-store`, `parley-redis`,
//! `parley-amqp`) implement them for a cluster. The in-memory versions
//! here are the one-process default's presence and bus, and every adapter
//! of the core's own tests (`MemoryStore` for storage).

pub mod backend;
pub mod bus;
pub mod error;
pub mod limits;
pub mod media;
pub mod membership;
pub mod metrics;
pub mod presence;
pub mod push;
pub mod redact;
pub mod refresh;
pub mod revision;
pub mod service;
pub mod store;
pub mod testing;
pub mod token;

pub use backend::{ChatBackend, Login};
pub use bus::{ChatEvent, Delivery, DeliveryBus, Dispatch, LocalBus, Revocation, Signal};
pub use error::ChatError;
pub use media::{BlobRecord, BlobState, BlobStorage, MediaLimits};
pub use metrics::{ChatMetrics, CodeLabel, code_label};
pub use presence::{Located, MemoryPresence, Presence, Session};
pub use redact::redact_urls;
pub use service::{ChatConfig, ChatService, SendRequest, SyncPage, TYPING_SHOWN, now_ms};
pub use store::{MemoryStore, Store};
pub use token::{TokenKeys, Verified};
