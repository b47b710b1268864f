//! Token validation on arbitrary text, and on tokens correctly signed over
//! arbitrary claims: never a panic, and a token passes only with this
//! issuer, a subject, an expiry not yet past and an issue time not in the
//! future.

#![no_main]

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use parley_fuzz::{SECRET, keys};

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        assert!(keys.verify(&text).is_err(), "an unsigned text passed");
        return;
    }
    // Signed with the right key over whatever claims the input holds.
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let Ok(token) = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    ) else {
        return;
    };
    if let Ok(user) = keys.verify(&token) {
        let now = parley_core::now_ms() / 1000;
        assert_eq!(claims["iss"], "parley");
        assert_eq!(claims["sub"].as_str(), Some(user.as_str()));
        let exp = claims["exp"].as_f64().expect("a numeric exp");
        assert!(exp + 1.0 >= now as f64, "expired, yet passed: {claims}");
        if let Some(iat) = claims["iat"].as_f64() {
            assert!(iat <= now as f64 + 1.0, "issued in the future: {claims}");
        }
    }
});
