//! How the SDK reaches a gateway: which address (fixed, from the route
//! lookup, or where a GoAway redirected it), and plain TCP or TLS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig as RustlsConfig, RootCertStore};

/// TLS towards the gateway.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM certificates to trust; None trusts the public web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry; None takes the address's host.
    pub server_name: Option<String>,
}

/// A byte stream to a gateway.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub type BoxStream = Box<dyn Stream>;

/// Builds the rustls client configuration once.
pub fn tls_connector(opts: &TlsOptions) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = RustlsConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `addr`, with TLS when `tls` is given.
pub async fn connect(
    addr: &str,
    tls: Option<(&TlsConnector, &TlsOptions)>,
) -> Result<BoxStream, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some((connector, opts)) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = opts
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(addr).to_owned());
    let name =
        ServerName::try_from(name.clone()).map_err(|e| format!("TLS server name {name:?}: {e}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| format!("TLS handshake with {addr} timed out"))?
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    Ok(Box::new(stream))
}

/// A plain HTTP/1.1 GET of `path` at `authority` (host:port): the status
/// and the body (at most 64 KiB), within 2 s (a lookup that takes longer
/// is on a gateway in trouble: the next one is asked).
pub async fn http_get(authority: &str, path: &str) -> Result<(u16, String), String> {
    get(authority, path, None).await
}

/// [`http_get`], over TLS when `tls` is given (HTTPS).
async fn get(
    authority: &str,
    path: &str,
    tls: Option<&TlsOptions>,
) -> Result<(u16, String), String> {
    let work = async {
        let mut s: BoxStream = match tls {
            None => Box::new(
                TcpStream::connect(authority)
                    .await
                    .map_err(|e| format!("{authority}: {e}"))?,
            ),
            Some(opts) => {
                let connector = tls_connector(opts)?;
                connect(authority, Some((&connector, opts))).await?
            }
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.take(64 * 1024)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .map_err(|_| format!("{authority} did not answer within 2 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{authority}: malformed HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{authority}: malformed HTTP status line"))?;
    Ok((status, body.to_owned()))
}

/// Asks a gateway's route lookup (`http://host:port/route`, or `https://`
/// trusting `tls`'s certificates, the public web's by default) which
/// gateways to try, least loaded first, reporting those in `failed` (they
/// are left out, and checked by the lookup).
pub async fn lookup_route(
    url: &str,
    failed: &[String],
    tls: Option<&TlsOptions>,
) -> Result<Vec<String>, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("https://") {
        // The certificate must name the lookup's host, whatever name the
        // gateways' own carry.
        let opts = TlsOptions {
            ca_file: tls.and_then(|t| t.ca_file.clone()),
            server_name: None,
        };
        (rest, Some(opts))
    } else if let Some(rest) = url.strip_prefix("http://") {
        (rest, None)
    } else {
        return Err(format!(
            "route lookup {url:?}: only http:// and https:// URLs are supported"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/route"),
    };
    let mut path = path.to_owned();
    for (i, addr) in failed.iter().enumerate() {
        path.push(if i == 0 && !path.contains('?') {
            '?'
        } else {
            '&'
        });
        path.push_str("failed=");
        path.push_str(&addr.replace('%', "%25").replace('&', "%26"));
    }
    let (status, body) = get(authority, &path, tls.as_ref())
        .await
        .map_err(|e| format!("route lookup at {e}"))?;
    if status != 200 {
        return Err(format!("route lookup answered {status}: {}", body.trim()));
    }
    let candidates = route_candidates(&body);
    if candidates.is_empty() {
        return Err(format!("route lookup: no address in {:?}", body.trim()));
    }
    Ok(candidates)
}

/// The addresses of a lookup's answer:
/// `{"address":"a","candidates":["a","b"]}`, or `{"address":"a"}` from a
/// lookup that predates candidates.
fn route_candidates(body: &str) -> Vec<String> {
    let strings = |s: &str| -> Vec<String> {
        s.split('"')
            .skip(1)
            .step_by(2)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    };
    if let Some((_, rest)) = body.split_once("\"candidates\"")
        && let Some((_, list)) = rest.split_once('[')
        && let Some((list, _)) = list.split_once(']')
    {
        let found = strings(list);
        if !found.is_empty() {
            return found;
        }
    }
    body.split_once("\"address\"")
        .and_then(|(_, rest)| rest.split_once(':'))
        .map(|(_, rest)| strings(rest).into_iter().take(1).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_come_off_the_lookup_answer() {
        assert_eq!(
            route_candidates(r#"{"address":"a:1","candidates":["a:1","b:2","c:3"]}"#),
            vec!["a:1", "b:2", "c:3"]
        );
        assert_eq!(route_candidates(r#"{"address":"a:1"}"#), vec!["a:1"]);
        assert!(route_candidates(r#"{"error":"no gateway available"}"#).is_empty());
    }

    #[test]
    fn hosts_come_off_addresses() {
        assert_eq!(host_of("chat.example.com:7443"), "chat.example.com");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
