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
/// and the body (at most 64 KiB), within 5 s.
pub async fn http_get(authority: &str, path: &str) -> Result<(u16, String), String> {
    let work = async {
        let mut s = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
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
    let raw = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| format!("{authority} did not answer within 5 s"))??;
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

/// Asks a gateway's route lookup (`http://host:port/route`) for the
/// least-loaded gateway's address.
pub async fn lookup_route(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("route lookup {url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/route"),
    };
    let (status, body) = http_get(authority, path)
        .await
        .map_err(|e| format!("route lookup at {e}"))?;
    if status != 200 {
        return Err(format!("route lookup answered {status}: {}", body.trim()));
    }
    // {"address":"host:port"}
    let address = body
        .split_once("\"address\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(a, _)| a.to_owned())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("route lookup: no address in {:?}", body.trim()))?;
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_off_addresses() {
        assert_eq!(host_of("chat.example.com:7443"), "chat.example.com");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
