//! The chat layer's errors and their one mapping to wire error codes.
//! Storage failures never reach a client as database text: they are logged
//! here and answered as INTERNAL. (Their mapping to gRPC statuses lives
//! with the gRPC stubs, in `parley_proto::grpc`.)

use parley_proto::pb::{self, ErrorCode};

/// What went wrong with a chat request.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("you are not a member of conversation {0}")]
    NotMember(u64),
    #[error("{0} does not accept messages from you")]
    Blocked(String),
    #[error("a group holds at most {0} members")]
    GroupFull(usize),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("token expired")]
    TokenExpired,
    #[error("this device was logged out: its tokens are revoked; log in again for a new one")]
    SessionRevoked,
    /// A login of a new device when the user has this many online.
    #[error("you have {0} devices online, the most allowed: log out or close one to log in here")]
    TooManyDevices(u32),
    /// Past a rate limit: try again after `retry_after_ms`.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_ms: u32,
    },
    #[error("the service is unavailable: {0}")]
    Unavailable(String),
    /// An upload declared larger than its kind allows.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A MIME type its kind does not allow, or bytes not of the type declared.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Uploaded bytes that differ from their declaration.
    #[error("{0}")]
    UploadMismatch(String),
    /// The user's uploads reached the quota.
    #[error("{0}")]
    QuotaExceeded(String),
    /// An upload whose bytes have not (all) arrived.
    #[error("{0}")]
    UploadIncomplete(String),
    /// The database failed; the store adapter's own error is the source.
    #[error("storage failed")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// An error another Parley process answered with, passed on as it came.
    #[error("{1}")]
    Remote(ErrorCode, String),
}

impl ChatError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::NotMember(_) => ErrorCode::NotMember,
            Self::Blocked(_) => ErrorCode::Blocked,
            Self::GroupFull(_) => ErrorCode::GroupFull,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::TokenExpired => ErrorCode::TokenExpired,
            Self::SessionRevoked => ErrorCode::SessionRevoked,
            Self::TooManyDevices(_) => ErrorCode::TooManyDevices,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Self::UploadMismatch(_) => ErrorCode::UploadMismatch,
            Self::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Self::UploadIncomplete(_) => ErrorCode::UploadIncomplete,
            Self::Storage(_) | Self::Corrupt(_) => ErrorCode::Internal,
            Self::Remote(code, _) => *code,
        }
    }

    /// The text a client may see: internal details are logged, not sent.
    pub fn client_message(&self) -> String {
        match self {
            Self::Storage(e) => {
                tracing::error!(error = %e, "storage error");
                "internal error".to_owned()
            }
            Self::Corrupt(e) => {
                tracing::error!(error = %e, "corrupt data");
                "internal error".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// How long until a retry can pass (RATE_LIMITED), in ms; 0 otherwise.
    pub fn retry_after_ms(&self) -> u32 {
        match self {
            Self::RateLimited { retry_after_ms, .. } => *retry_after_ms,
            _ => 0,
        }
    }

    /// The Error frame for this error, answering request `request_id`.
    pub fn frame(&self, request_id: u64) -> pb::ServerFrame {
        let code = self.code();
        pb::ServerFrame::new(
            request_id,
            pb::server_frame::Body::Error(pb::Error {
                code: code as i32,
                message: self.client_message(),
                fatal: code.is_fatal(),
                retry_after_ms: self.retry_after_ms(),
            }),
        )
    }

    /// An INVALID_ARGUMENT error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// A storage failure whose source is the adapter's error.
    pub fn storage(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Storage(Box::new(e))
    }
}
