//! Refresh tokens: how a device keeps itself logged in with short-lived
//! access tokens. The admin API logs a device in with a pair (an access
//! token, a refresh token); the device trades its refresh token for the next
//! pair itself, and each refresh token works once. The store keeps only a
//! digest of the current refresh token of each device and of the one before
//! it: a copy of a used-up token that comes back after the grace period
//! means two holders, and the device is logged out.
//!
//! A refresh token reads `pr1.<user hex>.<device hex>.<secret hex>`: the
//! ids say which record to read, the 32-byte random secret is the
//! credential. It is opaque to clients.

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "pr1";

/// A refresh token taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    pub user: String,
    pub device: String,
    secret: [u8; 32],
}

impl RefreshToken {
    /// A new token for `user`'s `device`, with a fresh random secret.
    pub fn new(user: &str, device: &str) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            user: user.to_owned(),
            device: device.to_owned(),
            secret,
        }
    }

    /// Reads a token as [`RefreshToken::encode`] writes it; None for
    /// anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        if parts.next()? != PREFIX {
            return None;
        }
        let user = String::from_utf8(unhex(parts.next()?)?).ok()?;
        let device = String::from_utf8(unhex(parts.next()?)?).ok()?;
        let secret = unhex(parts.next()?)?.try_into().ok()?;
        if parts.next().is_some() || user.is_empty() || device.is_empty() {
            return None;
        }
        Some(Self {
            user,
            device,
            secret,
        })
    }

    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            hex(self.user.as_bytes()),
            hex(self.device.as_bytes()),
            hex(&self.secret)
        )
    }

    /// What the store keeps of it: SHA-256 of the secret (a random 256-bit
    /// secret needs no salt or stretching).
    pub fn digest(&self) -> Vec<u8> {
        Sha256::digest(self.secret).to_vec()
    }
}

/// Compares without an early exit, so timing does not reveal how much of
/// a secret matched.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 256 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_anything_else_is_refused() {
        let t = RefreshToken::new("alice", "phone:1");
        let text = t.encode();
        assert!(text.starts_with("pr1."));
        assert_eq!(RefreshToken::parse(&text), Some(t.clone()));
        assert_eq!(RefreshToken::new("alice", "phone:1").digest().len(), 32);
        assert_ne!(t.digest(), RefreshToken::new("alice", "phone:1").digest());
        for bad in [
            "",
            "pr1",
            "pr2.61.62.00",
            "pr1.61.62.00",
            "pr1..62.0000000000000000000000000000000000000000000000000000000000000000",
            "pr1.6.62.0000000000000000000000000000000000000000000000000000000000000000",
            "pr1.zz.62.0000000000000000000000000000000000000000000000000000000000000000",
            "pr1.61.62.0000000000000000000000000000000000000000000000000000000000000000.00",
            "pr1.ff.62.0000000000000000000000000000000000000000000000000000000000000000",
            "pr1.61.62.000000000000000000000000000000000000000000000000000000000000000é",
        ] {
            assert_eq!(RefreshToken::parse(bad), None, "{bad:?}");
        }
    }
}
