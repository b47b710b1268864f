//! Parley's client side: the Rust SDK (`sdk`), an admin API client, and
//! the one-process server behind `parley up` (`embedded`).

pub mod admin_client;
pub mod embedded;
pub mod sdk;
pub mod transport;

pub use admin_client::Admin;
pub use embedded::{Embedded, EmbeddedConfig};
pub use sdk::{Client, ClientConfig, ClientError, Event};
pub use transport::TlsOptions;
