//! Parley's error codes across gRPC, in one place for both sides: a failed
//! call carries its code (decimal) in the `parley-error-code` metadata entry
//! beside a gRPC status chosen from it. A status without the entry is a
//! transport or server failure, which a caller may retry elsewhere; one with
//! it is the application's answer, final.

use crate::pb::ErrorCode;

/// The gRPC metadata entry that carries a Parley error code (decimal) on a
/// failed call, telling an application error from a transport failure.
pub const ERROR_CODE_METADATA: &str = "parley-error-code";

/// The status for an application error with `code`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> tonic::Status {
    let message = message.into();
    let mut status = match code {
        ErrorCode::InvalidArgument => tonic::Status::invalid_argument(message),
        ErrorCode::NotFound => tonic::Status::not_found(message),
        ErrorCode::NotMember | ErrorCode::Blocked | ErrorCode::Forbidden => {
            tonic::Status::permission_denied(message)
        }
        ErrorCode::GroupFull
        | ErrorCode::TooManyDevices
        | ErrorCode::UploadIncomplete
        | ErrorCode::UploadMismatch => tonic::Status::failed_precondition(message),
        ErrorCode::PayloadTooLarge | ErrorCode::UnsupportedMediaType => {
            tonic::Status::invalid_argument(message)
        }
        ErrorCode::QuotaExceeded => tonic::Status::resource_exhausted(message),
        ErrorCode::Conflict => tonic::Status::already_exists(message),
        ErrorCode::Unauthenticated | ErrorCode::TokenExpired | ErrorCode::SessionRevoked => {
            tonic::Status::unauthenticated(message)
        }
        ErrorCode::Unavailable => tonic::Status::unavailable(message),
        _ => tonic::Status::internal(message),
    };
    status
        .metadata_mut()
        .insert(ERROR_CODE_METADATA, (code as i32).into());
    status
}

/// The application error code a failed call carries, or None for a
/// transport or server failure. An unknown code reads as INTERNAL.
pub fn error_code(status: &tonic::Status) -> Option<ErrorCode> {
    let code = status
        .metadata()
        .get(ERROR_CODE_METADATA)?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(ErrorCode::try_from(code).unwrap_or(ErrorCode::Internal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_trip_and_transport_failures_carry_none() {
        let s = status(ErrorCode::NotMember, "not yours");
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(error_code(&s), Some(ErrorCode::NotMember));
        assert_eq!(s.message(), "not yours");
        assert_eq!(error_code(&tonic::Status::unavailable("reset")), None);
    }
}
