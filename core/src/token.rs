//! Device tokens: HS256 JWTs whose `sub` is the user id. The app's backend
//! gets them from the admin API, or mints them itself with the same secret
//! and any JWT library.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::ChatError;

/// The issuer written into and required of every token.
pub const ISSUER: &str = "parley";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    iat: i64,
    exp: i64,
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Keys from a secret of at least 32 bytes.
    pub fn new(secret: &[u8]) -> Result<Self, ChatError> {
        if secret.len() < 32 {
            return Err(ChatError::invalid(
                "the token secret must be at least 32 bytes",
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// A token for `user` valid from `now_s` for `ttl_s` seconds.
    pub fn issue(&self, user: &str, now_s: i64, ttl_s: i64) -> Result<String, ChatError> {
        let claims = Claims {
            sub: user.to_owned(),
            iss: ISSUER.to_owned(),
            iat: now_s,
            exp: now_s + ttl_s,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ChatError::Unavailable(format!("cannot sign token: {e}")))
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, ChatError> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims.sub),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                Err(ChatError::TokenExpired)
            }
            Err(e) => Err(ChatError::Unauthenticated(format!("invalid token: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn issued_tokens_verify_to_their_user() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let t = keys.issue("alice", now(), 60).unwrap();
        assert_eq!(keys.verify(&t).unwrap(), "alice");
    }

    #[test]
    fn expired_forged_and_garbled_tokens_are_refused() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let old = keys.issue("alice", now() - 3600, 60).unwrap();
        assert!(matches!(keys.verify(&old), Err(ChatError::TokenExpired)));

        let other = TokenKeys::new(b"another secret, also 32 bytes long!").unwrap();
        let forged = other.issue("alice", now(), 60).unwrap();
        assert!(matches!(
            keys.verify(&forged),
            Err(ChatError::Unauthenticated(_))
        ));

        assert!(matches!(
            keys.verify("not.a.token"),
            Err(ChatError::Unauthenticated(_))
        ));
        assert!(TokenKeys::new(b"short").is_err());
    }
}
