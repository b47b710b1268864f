//! Parley's Rust SDK: what an app links to chat. A `Client` holds one
//! device's connection (TCP or TLS, found through the route lookup), logs
//! in, resumes from its cursor after every reconnect, retries sends under
//! the same client id, drops duplicates and releases messages in order.
//! With the `admin` feature, `Admin` calls the admin gRPC API for an app's
//! backend. No server crate is in this crate's tree; `scripts/check-layout`
//! keeps it so.

#[cfg(feature = "admin")]
pub mod admin_client;
pub mod media;
pub mod sdk;
pub mod transport;

#[cfg(feature = "admin")]
pub use admin_client::{Admin, AdminError};
pub use media::Progress;
pub use sdk::{Client, ClientConfig, ClientError, Event};
pub use transport::TlsOptions;
