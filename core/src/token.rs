//! Device tokens: HS256 JWTs whose `sub` is the user id. The app's backend
//! gets them from the admin API, or mints them itself with the same secret
//! and any JWT library.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::ChatError;

/// The issuer written into and required of every token.
pub const ISSUER: &str = "parley";

/// The clock-skew allowance, in seconds, unless configured otherwise: how
/// long after `exp` a token still passes, how early before `nbf`, and how
/// far in the future its `iat` may lie.
pub const DEFAULT_LEEWAY_SECS: u64 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    iat: i64,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
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
        validation.validate_nbf = true;
        validation.leeway = DEFAULT_LEEWAY_SECS;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// The same keys with a clock-skew allowance of `secs` seconds.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.validation.leeway = secs;
        self
    }

    /// A token for `user` valid from `now_s` for `ttl_s` seconds.
    pub fn issue(&self, user: &str, now_s: i64, ttl_s: i64) -> Result<String, ChatError> {
        let claims = Claims {
            sub: user.to_owned(),
            iss: ISSUER.to_owned(),
            iat: now_s,
            exp: now_s + ttl_s,
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ChatError::Unavailable(format!("cannot sign token: {e}")))
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, ChatError> {
        let now_s = crate::now_ms() / 1000;
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) if data.claims.iat > now_s + self.validation.leeway as i64 => Err(
                ChatError::Unauthenticated("invalid token: issued in the future (iat)".into()),
            ),
            Ok(data) => Ok(data.claims.sub),
            Err(e) if matches!(e.kind(), ErrorKind::ImmatureSignature) => Err(
                ChatError::Unauthenticated("invalid token: not valid yet (nbf)".into()),
            ),
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

    fn mint(claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_secret(SECRET);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    #[test]
    fn the_skew_allowance_is_the_configured_one_and_no_more() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let t = now();
        let token = |exp: i64| {
            mint(&serde_json::json!({"sub": "a", "iss": ISSUER, "iat": t - 60, "exp": exp}))
        };
        // Expired two seconds ago: past the default second of allowance.
        assert!(matches!(
            keys.verify(&token(t - 2)),
            Err(ChatError::TokenExpired)
        ));
        assert!(matches!(
            keys.verify(&token(t - 6)),
            Err(ChatError::TokenExpired)
        ));
        assert_eq!(keys.verify(&token(t + 5)).unwrap(), "a");
        // A larger allowance, configured, lets the same token through.
        let lenient = TokenKeys::new(SECRET).unwrap().with_leeway(30);
        assert_eq!(lenient.verify(&token(t - 6)).unwrap(), "a");
    }

    #[test]
    fn not_before_and_a_future_issue_time_are_honoured() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let t = now();
        let early = mint(&serde_json::json!({
            "sub": "a", "iss": ISSUER, "iat": t, "exp": t + 60, "nbf": t + 30
        }));
        let err = keys.verify(&early).unwrap_err();
        assert!(err.to_string().contains("nbf"), "{err}");
        let ready = mint(&serde_json::json!({
            "sub": "a", "iss": ISSUER, "iat": t, "exp": t + 60, "nbf": t - 1
        }));
        assert_eq!(keys.verify(&ready).unwrap(), "a");
        let future = mint(&serde_json::json!({
            "sub": "a", "iss": ISSUER, "iat": t + 120, "exp": t + 600
        }));
        let err = keys.verify(&future).unwrap_err();
        assert!(err.to_string().contains("iat"), "{err}");
        // Missing iat or a foreign issuer: refused.
        let no_iat = mint(&serde_json::json!({"sub": "a", "iss": ISSUER, "exp": t + 60}));
        assert!(matches!(
            keys.verify(&no_iat),
            Err(ChatError::Unauthenticated(_))
        ));
        let foreign = mint(&serde_json::json!({
            "sub": "a", "iss": "other", "iat": t, "exp": t + 60
        }));
        assert!(matches!(
            keys.verify(&foreign),
            Err(ChatError::Unauthenticated(_))
        ));
    }
}
