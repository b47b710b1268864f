//! The chat layer's errors, and their one mapping to wire error codes and to
//! gRPC status. Store failures never reach a client as database text: they
//! are logged here and answered as INTERNAL.

use parley_proto::pb::ErrorCode;

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
    #[error("the service is unavailable: {0}")]
    Unavailable(String),
    #[error("storage failed")]
    Store(#[from] sqlx::Error),
    #[error("storage failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// An error another Parley process answered with, passed on as it came.
    #[error("{1}")]
    Remote(ErrorCode, String),
}

/// The gRPC metadata entry that carries a Parley error code (decimal) on a
/// failed call, telling an application error from a transport failure.
pub const ERROR_CODE_METADATA: &str = "parley-error-code";

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
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Store(_) | Self::Migrate(_) | Self::Corrupt(_) => ErrorCode::Internal,
            Self::Remote(code, _) => *code,
        }
    }

    /// The text a client may see: internal details are logged, not sent.
    pub fn client_message(&self) -> String {
        match self {
            Self::Store(e) => {
                tracing::error!(error = %e, "store error");
                "internal error".to_owned()
            }
            Self::Migrate(e) => {
                tracing::error!(error = %e, "migration error");
                "internal error".to_owned()
            }
            Self::Corrupt(e) => {
                tracing::error!(error = %e, "corrupt data");
                "internal error".to_owned()
            }
            other => other.to_string(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

impl From<ChatError> for tonic::Status {
    fn from(e: ChatError) -> Self {
        let msg = e.client_message();
        let code = e.code();
        let mut status = match code {
            ErrorCode::InvalidArgument => Self::invalid_argument(msg),
            ErrorCode::NotFound => Self::not_found(msg),
            ErrorCode::NotMember | ErrorCode::Blocked | ErrorCode::Forbidden => {
                Self::permission_denied(msg)
            }
            ErrorCode::GroupFull => Self::failed_precondition(msg),
            ErrorCode::Conflict => Self::already_exists(msg),
            ErrorCode::Unauthenticated | ErrorCode::TokenExpired => Self::unauthenticated(msg),
            ErrorCode::Unavailable => Self::unavailable(msg),
            _ => Self::internal(msg),
        };
        status
            .metadata_mut()
            .insert(ERROR_CODE_METADATA, (code as i32).into());
        status
    }
}

impl ChatError {
    /// The error a remote call failed with: the application error it carries,
    /// or None for a transport or server failure (worth a retry elsewhere).
    pub fn from_status(status: &tonic::Status) -> Option<Self> {
        let code = status
            .metadata()
            .get(ERROR_CODE_METADATA)?
            .to_str()
            .ok()?
            .parse::<i32>()
            .ok()?;
        let code = ErrorCode::try_from(code).unwrap_or(ErrorCode::Internal);
        Some(Self::Remote(code, status.message().to_owned()))
    }
}
