//! Device tokens: HS256 JWTs whose `sub` is the user id. The app's backend
//! gets them from the admin API, or mints them itself with the same secret
//! and any JWT library. A token may name the one device it is for (`dev`),
//! and may carry its issue time in milliseconds (`iat_ms`) beside the
//! standard `iat`, so that a log-out revokes exactly the tokens issued
//! before it.
//!
//! The signing secret can be rotated without logging anyone out: tokens
//! are signed with the current secret and accepted under it or any of the
//! previous ones still configured (until the longest-lived token signed
//! with them has expired).

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
    /// The device the token is for; none: any device of the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dev: Option<String>,
    /// `iat` in milliseconds, when the issuer knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat_ms: Option<i64>,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user: String,
    /// The one device the token is for, if it names one.
    pub device: Option<String>,
    /// When it was issued, in milliseconds (`iat_ms`, else `iat` × 1000).
    pub issued_at_ms: i64,
    /// When it expires (`exp` × 1000).
    pub expires_at_ms: i64,
}

/// Signs tokens with the current secret and verifies them under it or a
/// previous one.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    /// The current secret's key first, then the previous ones'.
    decoding: Vec<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKeys({} secrets)", self.decoding.len())
    }
}

/// The shortest secret accepted, in bytes.
const MIN_SECRET: usize = 32;

fn check_secret(secret: &[u8]) -> Result<(), ChatError> {
    if secret.len() < MIN_SECRET {
        return Err(ChatError::invalid(
            "the token secret must be at least 32 bytes",
        ));
    }
    Ok(())
}

impl TokenKeys {
    /// Keys from a secret of at least 32 bytes.
    pub fn new(secret: &[u8]) -> Result<Self, ChatError> {
        check_secret(secret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.validate_nbf = true;
        validation.leeway = DEFAULT_LEEWAY_SECS;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: vec![DecodingKey::from_secret(secret)],
            validation,
        })
    }

    /// The same keys, also accepting tokens signed with `secret`, a
    /// previous signing secret (for a rotation).
    pub fn with_previous(mut self, secret: &[u8]) -> Result<Self, ChatError> {
        check_secret(secret)?;
        self.decoding.push(DecodingKey::from_secret(secret));
        Ok(self)
    }

    /// The same keys with a clock-skew allowance of `secs` seconds.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.validation.leeway = secs;
        self
    }

    /// A token for `user`, any device, valid from `now_s` for `ttl_s`
    /// seconds.
    pub fn issue(&self, user: &str, now_s: i64, ttl_s: i64) -> Result<String, ChatError> {
        self.issue_for(user, None, now_s * 1000, ttl_s)
    }

    /// A token for `user` on `device` (any device when none), issued at
    /// `now_ms` and valid for `ttl_s` seconds.
    pub fn issue_for(
        &self,
        user: &str,
        device: Option<&str>,
        now_ms: i64,
        ttl_s: i64,
    ) -> Result<String, ChatError> {
        let now_s = now_ms.div_euclid(1000);
        let claims = Claims {
            sub: user.to_owned(),
            iss: ISSUER.to_owned(),
            iat: now_s,
            exp: now_s + ttl_s,
            nbf: None,
            dev: device.map(str::to_owned),
            iat_ms: Some(now_ms),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ChatError::Unavailable(format!("cannot sign token: {e}")))
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, ChatError> {
        self.verify_claims(token).map(|v| v.user)
    }

    /// What a valid token says.
    pub fn verify_claims(&self, token: &str) -> Result<Verified, ChatError> {
        let now_s = crate::now_ms() / 1000;
        let mut decoded = Err(ErrorKind::InvalidSignature.into());
        for key in &self.decoding {
            decoded = jsonwebtoken::decode::<Claims>(token, key, &self.validation);
            match &decoded {
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                _ => break,
            }
        }
        match decoded {
            Ok(data) if data.claims.iat > now_s + self.validation.leeway as i64 => Err(
                ChatError::Unauthenticated("invalid token: issued in the future (iat)".into()),
            ),
            // `iat_ms` is trusted only to refine `iat`, never to move it.
            Ok(data) => {
                let c = data.claims;
                let coarse = c.iat.saturating_mul(1000);
                let issued_at_ms = match c.iat_ms {
                    Some(ms) if ms.div_euclid(1000) == c.iat => ms,
                    _ => coarse,
                };
                Ok(Verified {
                    user: c.sub,
                    device: c.dev,
                    issued_at_ms,
                    expires_at_ms: c.exp.saturating_mul(1000),
                })
            }
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

    #[test]
    fn device_tokens_carry_their_device_and_milliseconds() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let at = now() * 1000 + 321;
        let t = keys.issue_for("alice", Some("phone"), at, 60).unwrap();
        let v = keys.verify_claims(&t).unwrap();
        assert_eq!(v.user, "alice");
        assert_eq!(v.device.as_deref(), Some("phone"));
        assert_eq!(v.issued_at_ms, at);
        // A plain token: any device, its issue time to the second.
        let t = keys.issue("alice", now(), 60).unwrap();
        let v = keys.verify_claims(&t).unwrap();
        assert_eq!(v.device, None);
        assert_eq!(v.issued_at_ms % 1000, 0);
        // An iat_ms that disagrees with iat is ignored, not trusted.
        let odd = mint(&serde_json::json!({
            "sub": "a", "iss": ISSUER, "iat": now(), "exp": now() + 60, "iat_ms": 5
        }));
        assert_eq!(keys.verify_claims(&odd).unwrap().issued_at_ms, now() * 1000);
    }

    #[test]
    fn a_rotated_secret_keeps_old_tokens_valid_until_it_is_dropped() {
        let old_secret = b"the old secret, thirty-two bytes!";
        let old = TokenKeys::new(old_secret).unwrap();
        let before = old.issue("alice", now(), 60).unwrap();
        let rotated = TokenKeys::new(SECRET)
            .unwrap()
            .with_previous(old_secret)
            .unwrap();
        assert_eq!(rotated.verify(&before).unwrap(), "alice");
        let after = rotated.issue("bob", now(), 60).unwrap();
        assert_eq!(rotated.verify(&after).unwrap(), "bob");
        // Signed with the new secret: the old keys alone refuse it.
        assert!(matches!(
            old.verify(&after),
            Err(ChatError::Unauthenticated(_))
        ));
        // Once the previous secret is dropped, its tokens are refused.
        let dropped = TokenKeys::new(SECRET).unwrap();
        assert!(matches!(
            dropped.verify(&before),
            Err(ChatError::Unauthenticated(_))
        ));
        // An expired token signed with a previous secret is expired, not forged.
        let stale = old.issue("alice", now() - 3600, 60).unwrap();
        assert!(matches!(
            rotated.verify(&stale),
            Err(ChatError::TokenExpired)
        ));
        assert!(
            TokenKeys::new(SECRET)
                .unwrap()
                .with_previous(b"short")
                .is_err()
        );
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
