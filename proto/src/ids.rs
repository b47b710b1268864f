//! Rules for the identifiers clients and admins choose: user ids, device ids
//! and client message ids. One place, so the gateway, chat service and SDK
//! agree on what is valid.

/// Longest user or device id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;

fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b':'))
}

/// A user id: 1 to 64 of `A-Z a-z 0-9 . _ - @`. Unlike the other ids, no
/// `:`, which separates a user id from what follows it in keys and names
/// outside the protocol (`user:device`, Redis keys).
pub fn check_user_id(s: &str) -> Result<(), String> {
    if valid_id(s, MAX_ID_LEN) && !s.contains(':') {
        Ok(())
    } else {
        Err(format!(
            "user id {s:?} must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ - @"
        ))
    }
}

/// A device id: the same alphabet and length as a user id.
pub fn check_device_id(s: &str) -> Result<(), String> {
    if valid_id(s, MAX_ID_LEN) {
        Ok(())
    } else {
        Err(format!(
            "device id {s:?} must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ - @ :"
        ))
    }
}

/// A client message id: 1 to 128 of the same alphabet (a UUID fits).
pub fn check_client_msg_id(s: &str) -> Result<(), String> {
    if valid_id(s, MAX_CLIENT_MSG_ID_LEN) {
        Ok(())
    } else {
        Err(format!(
            "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_LEN} characters of A-Z a-z 0-9 . _ - @ :"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_ids_and_refuses_others() {
        for ok in ["alice", "u-42", "bob@example.com", "a.b_c-d"] {
            assert!(check_user_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "with space",
            "ünïcode",
            "semi;colon",
            "a:b",
            &"x".repeat(65),
        ] {
            assert!(check_user_id(bad).is_err(), "{bad}");
        }
        assert!(check_device_id("phone:2").is_ok());
        assert!(check_client_msg_id(&"x".repeat(128)).is_ok());
        assert!(check_client_msg_id(&"x".repeat(129)).is_err());
    }
}
