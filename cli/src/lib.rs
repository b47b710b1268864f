//! The `parley` command's library: [`Embedded`], all of Parley in one
//! process (the SQLite store, in-memory presence, the in-process bus, one
//! gateway and the admin API), which `parley up` runs and the tests start
//! on port 0.

pub mod embedded;

pub use embedded::{Embedded, EmbeddedConfig};
