//! URLs Parley signs itself: HMAC-SHA256, under a key of the server's,
//! over the method, the object and everything the URL permits (for an
//! upload its size and type, for a download the type it is served as),
//! with an expiry. The URL is the permission: no token or cookie goes
//! with it, so it can be handed to a download manager or a browser.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::HTTP_PREFIX;

/// Signs and checks the local endpoint's URLs.
#[derive(Clone)]
pub struct UrlSigner {
    base: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("UrlSigner")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// What a URL permits, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant<'a> {
    /// A PUT of exactly `size` bytes of type `mime` to blob `id`.
    Upload {
        id: &'a str,
        size: u64,
        mime: &'a str,
    },
    /// A GET of `key` (a blob or its thumbnail), served as `mime`.
    Download { key: &'a str, mime: &'a str },
}

impl Grant<'_> {
    fn message(&self, expires_at_ms: i64) -> String {
        match self {
            Grant::Upload { id, size, mime } => {
                format!("PUT\n{id}\n{size}\n{mime}\n{expires_at_ms}")
            }
            Grant::Download { key, mime } => format!("GET\n{key}\n{mime}\n{expires_at_ms}"),
        }
    }
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadSignature,
    Expired,
}

/// Percent-encodes a query value (MIME types hold `/` and `+`).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl UrlSigner {
    /// URLs under `public_url` (scheme, host, port and any path prefix the
    /// endpoint is reached at), signed with `key` (at least 32 bytes).
    pub fn new(public_url: &str, key: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            key.len() >= 32,
            "the media signing key is at least 32 bytes"
        );
        anyhow::ensure!(
            public_url.starts_with("http://") || public_url.starts_with("https://"),
            "the media public URL {public_url:?} is not http:// or https://"
        );
        Ok(Self {
            base: public_url.trim_end_matches('/').to_owned(),
            key: key.to_vec(),
        })
    }

    fn mac(&self, grant: &Grant<'_>, expires_at_ms: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(grant.message(expires_at_ms).as_bytes());
        mac
    }

    fn sign(&self, grant: &Grant<'_>, expires_at_ms: i64) -> String {
        hex::encode(self.mac(grant, expires_at_ms).finalize().into_bytes())
    }

    /// Whether `signature` grants `grant` at `now_ms` (compared in constant
    /// time).
    pub fn check(
        &self,
        grant: &Grant<'_>,
        expires_at_ms: i64,
        signature: &str,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let sig = hex::decode(signature).map_err(|_| Refusal::BadSignature)?;
        self.mac(grant, expires_at_ms)
            .verify_slice(&sig)
            .map_err(|_| Refusal::BadSignature)?;
        if now_ms > expires_at_ms {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    /// The URL an upload's bytes go to.
    pub fn upload_url(&self, id: &str, size: u64, mime: &str, expires_at_ms: i64) -> String {
        let sig = self.sign(&Grant::Upload { id, size, mime }, expires_at_ms);
        format!(
            "{}{HTTP_PREFIX}/{id}?size={size}&type={}&expires={expires_at_ms}&sig={sig}",
            self.base,
            encode(mime)
        )
    }

    /// The URL a blob (or thumbnail) `key` is fetched from.
    pub fn download_url(&self, key: &str, mime: &str, expires_at_ms: i64) -> String {
        let sig = self.sign(&Grant::Download { key, mime }, expires_at_ms);
        format!(
            "{}{HTTP_PREFIX}/{key}?type={}&expires={expires_at_ms}&sig={sig}",
            self.base,
            encode(mime)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_grants_exactly_what_it_was_made_for() {
        let s = UrlSigner::new("http://h:1/", &[7; 32]).unwrap();
        let up = Grant::Upload {
            id: "ab",
            size: 10,
            mime: "image/png",
        };
        let sig = s.sign(&up, 1_000);
        assert_eq!(s.check(&up, 1_000, &sig, 999), Ok(()));
        assert_eq!(s.check(&up, 1_000, &sig, 1_001), Err(Refusal::Expired));
        assert_eq!(s.check(&up, 2_000, &sig, 0), Err(Refusal::BadSignature));
        let bigger = Grant::Upload {
            id: "ab",
            size: 11,
            mime: "image/png",
        };
        assert_eq!(s.check(&bigger, 1_000, &sig, 0), Err(Refusal::BadSignature));
        let get = Grant::Download {
            key: "ab",
            mime: "image/png",
        };
        assert_eq!(s.check(&get, 1_000, &sig, 0), Err(Refusal::BadSignature));
        assert_eq!(s.check(&up, 1_000, "zz", 0), Err(Refusal::BadSignature));
        let other = UrlSigner::new("http://h:1", &[8; 32]).unwrap();
        assert_eq!(other.check(&up, 1_000, &sig, 0), Err(Refusal::BadSignature));
        assert!(s.upload_url("ab", 10, "image/svg+xml", 5).starts_with(
            "http://h:1/media/v1/blobs/ab?size=10&type=image%2Fsvg%2Bxml&expires=5&sig="
        ));
        assert!(
            !format!("{s:?}").contains("7, 7"),
            "the key stays out of logs"
        );
        assert!(UrlSigner::new("http://h", &[1; 31]).is_err());
        assert!(UrlSigner::new("ftp://h", &[1; 32]).is_err());
    }
}
