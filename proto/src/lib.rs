//! Parley's wire protocol: the protobuf frames exchanged with clients, the
//! length-prefixed frame codec and the rules for identifiers; the admin and
//! internal gRPC services' stubs come with the `grpc-client` and
//! `grpc-server` features. Nothing here does I/O; the gateway, the SDK and
//! the tests share these types.

pub mod codec;
#[cfg(any(feature = "grpc-client", feature = "grpc-server"))]
pub mod grpc;
pub mod ids;

/// Generated protobuf types and, with the gRPC features, the admin service
/// (package `parley.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/parley.v1.rs"));

    /// The encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/parley_descriptor.bin"));
}

/// Contracts between Parley's own processes (package `parley.internal.v1`):
/// the messages on RabbitMQ and, with the gRPC features, the
/// gateway-to-chat service.
#[allow(clippy::all, missing_docs)]
pub mod internal {
    include!(concat!(env!("OUT_DIR"), "/parley.internal.v1.rs"));
}

pub use codec::{DecodeError, decode_frame, encode_frame};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default largest frame body, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

impl pb::ErrorCode {
    /// Whether the server closes the connection after an error with this code.
    pub fn is_fatal(self) -> bool {
        (self as i32) < 20
    }
}

impl pb::ServerFrame {
    /// A response or push frame.
    pub fn new(request_id: u64, body: pb::server_frame::Body) -> Self {
        Self {
            request_id,
            body: Some(body),
        }
    }

    /// An error frame; `fatal` follows from the code.
    pub fn error(request_id: u64, code: pb::ErrorCode, message: impl Into<String>) -> Self {
        Self::new(
            request_id,
            pb::server_frame::Body::Error(pb::Error {
                code: code as i32,
                message: message.into(),
                fatal: code.is_fatal(),
                retry_after_ms: 0,
            }),
        )
    }
}

impl pb::ClientFrame {
    /// A request frame.
    pub fn new(request_id: u64, body: pb::client_frame::Body) -> Self {
        Self {
            request_id,
            body: Some(body),
        }
    }
}

impl pb::Content {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            body: Some(pb::content::Body::Text(text.into())),
        }
    }

    /// The text of a text message, if it is one.
    pub fn as_text(&self) -> Option<&str> {
        match &self.body {
            Some(pb::content::Body::Text(t)) => Some(t),
            _ => None,
        }
    }
}
