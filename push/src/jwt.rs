//! The JWTs providers ask for, signed with ring: ES256 with Apple's .p8
//! key (APNs), RS256 with a Google service account's key (FCM's OAuth
//! grant). Both keys come as PKCS#8 PEM and are used as they are.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde::Serialize;

/// The DER inside a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
pub fn pkcs8_der(pem: &str) -> Result<Vec<u8>, String> {
    let pem = pem.trim();
    let body = pem
        .strip_prefix("-----BEGIN PRIVATE KEY-----")
        .and_then(|rest| rest.strip_suffix("-----END PRIVATE KEY-----"))
        .ok_or_else(|| {
            if pem.contains("BEGIN EC PRIVATE KEY") || pem.contains("BEGIN RSA PRIVATE KEY") {
                "the key is in an older form (SEC1 or PKCS#1); convert it to PKCS#8 with \
                 `openssl pkcs8 -topk8 -nocrypt`"
                    .to_owned()
            } else {
                "the key is not a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)".to_owned()
            }
        })?;
    let b64: String = body.split_whitespace().collect();
    STANDARD
        .decode(b64)
        .map_err(|e| format!("the key's base64 is invalid: {e}"))
}

/// A key that signs JWTs.
pub enum Signer {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signer::Es256(_) => "Signer(ES256)",
            Signer::Rs256(_) => "Signer(RS256)",
        })
    }
}

#[derive(Serialize)]
struct JwtHeader<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

impl Signer {
    /// An ES256 signer from a P-256 key in PKCS#8 PEM.
    pub fn es256(pem: &str) -> Result<Self, String> {
        let der = pkcs8_der(pem)?;
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
            .map(Signer::Es256)
            .map_err(|e| format!("not a P-256 key: {e}"))
    }

    /// An RS256 signer from an RSA key in PKCS#8 PEM.
    pub fn rs256(pem: &str) -> Result<Self, String> {
        let der = pkcs8_der(pem)?;
        RsaKeyPair::from_pkcs8(&der)
            .map(Signer::Rs256)
            .map_err(|e| format!("not an RSA key: {e}"))
    }

    /// `header.claims.signature`, each base64url, the header naming the
    /// key `kid`.
    pub fn sign(&self, kid: &str, claims: &impl Serialize) -> Result<String, String> {
        let alg = match self {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        };
        let header = serde_json::to_vec(&JwtHeader {
            alg,
            typ: "JWT",
            kid,
        })
        .map_err(|e| e.to_string())?;
        let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jwt = URL_SAFE_NO_PAD.encode(header);
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let rng = SystemRandom::new();
        let signature = match self {
            Signer::Es256(k) => k
                .sign(&rng, jwt.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ES256 signing failed".to_owned())?,
            Signer::Rs256(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, jwt.as_bytes(), &mut sig)
                    .map_err(|_| "RS256 signing failed".to_owned())?;
                sig
            }
        };
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_other_forms_are_named() {
        let e = pkcs8_der("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----")
            .unwrap_err();
        assert!(e.contains("openssl pkcs8"), "{e}");
        assert!(pkcs8_der("not a key").is_err());
        assert!(
            Signer::es256("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err()
        );
    }
}
