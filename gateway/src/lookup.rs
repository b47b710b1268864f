//! The route lookup, `GET /route` on a gateway's ops port: the gateways a
//! client should try, least loaded first, as
//! `{"address":"host:port","candidates":["host:port",...]}` (`address` is
//! the first candidate). A client that could not reach some of them says so
//! with `?failed=host:port` (repeatable): those are left out of its answer,
//! and the gateway checks each with a protocol probe (a Hello answered
//! within [`PROBE_WITHIN`]); one that fails leaves the routing table until
//! its gateway's next lease write, so a gateway killed or frozen stops being
//! handed out at once instead of when its lease runs out.
//!
//! `parley up` serves the same lookup, answering with its own address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use parley_ops::{Probe, Readiness};
use parley_proto::pb::{self, client_frame::Body as Req};
use parley_proto::{PROTOCOL_VERSION, codec};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;

/// How long a probed gateway has to answer Hello.
pub const PROBE_WITHIN: Duration = Duration::from_secs(1);
/// One probe of an address per this long, however many clients report it.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// At most this many reported addresses are looked at per lookup.
const MAX_REPORTED: usize = 8;

/// The lookup's answer: 200 with the candidates, or 503 when there are none.
pub fn answer(candidates: &[String]) -> Response {
    let json = |s: &str| format!("\"{}\"", s.escape_default());
    match candidates.first() {
        Some(first) => {
            let list: Vec<String> = candidates.iter().map(|c| json(c)).collect();
            let body = format!(
                "{{\"address\":{},\"candidates\":[{}]}}\n",
                json(first),
                list.join(",")
            );
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        None => unavailable("no gateway available"),
    }
}

/// A 503 saying why there is no answer.
pub fn unavailable(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("content-type", "application/json")],
        format!("{{\"error\":\"{}\"}}\n", why.escape_default()),
    )
        .into_response()
}

/// The addresses a query reports as failed (`failed=host:port`, repeatable,
/// percent-encoded or not), at most [`MAX_REPORTED`].
pub fn reported_failed(query: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("failed="))
        .filter_map(percent_decode)
        .filter(|a| !a.is_empty() && a.len() <= 256)
        .take(MAX_REPORTED)
        .collect();
    out.sort();
    out.dedup();
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Whether the gateway at `addr` is alive: it accepts, and reacts to a
/// Hello within `within` (a HelloOk on a plain port; a TLS port's alert or
/// close is a reaction too). A killed gateway refuses the connection; a
/// frozen one, whose kernel still accepts, says nothing.
pub async fn answers_hello(addr: &str, within: Duration) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut buf = BytesMut::new();
        let hello = Req::Hello(pb::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: "parley-route-probe".into(),
        });
        codec::encode_frame(&pb::ClientFrame::new(1, hello), &mut buf);
        if s.write_all(&buf).await.is_err() {
            // Closed on us before the Hello: it reacted.
            return Some(true);
        }
        buf.clear();
        // Any bytes, an end of stream or a reset: something is running.
        let _ = s.read_buf(&mut buf).await;
        Some(true)
    };
    matches!(tokio::time::timeout(within, probe).await, Ok(Some(true)))
}

/// Remembers when each address was last probed, so that a thousand clients
/// reporting the same dead gateway cost one probe.
#[derive(Debug, Default)]
pub struct Prober {
    last: Mutex<HashMap<String, Instant>>,
}

impl Prober {
    /// Whether `addr` is due a probe now (and, if so, marks it probed).
    pub fn due(&self, addr: &str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.retain(|_, at| now.duration_since(*at) < PROBE_EVERY);
        if last.contains_key(addr) {
            return false;
        }
        last.insert(addr.to_owned(), now);
        true
    }
}

/// Serves `router` over HTTPS: the route lookup where the gateways have a
/// certificate. Handshakes run side by side (a slow one delays nobody) and
/// are cut after 10 s.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // At most this many handshakes at once: the port faces the internet.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(256));
    let accepting = tokio::spawn(async move {
        loop {
            let Ok((tcp, addr)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                let done = handshake.await;
                drop(slot);
                if let Ok(Ok(tls)) = done {
                    let _ = tx.send((tls, addr)).await;
                }
            });
        }
    });
    let served = axum::serve(Handshaken { rx, local }, router)
        .with_graceful_shutdown(shutdown)
        .await;
    accepting.abort();
    served
}

/// Connections whose TLS handshake is done, for axum to serve.
struct Handshaken {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for Handshaken {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// What the ops endpoints of a one-process Parley (`parley up`) look at.
struct OneProcess {
    shared: Arc<Shared>,
    advertise: String,
    metrics: MetricsRegistry,
}

#[async_trait::async_trait]
impl Probe for OneProcess {
    async fn ready(&self) -> Readiness {
        let mut r = Readiness::default();
        if self.shared.drain.active() {
            r.blockers.push("draining".to_owned());
        }
        r
    }

    fn metrics(&self) -> String {
        let m = &self.shared.metrics;
        m.sessions.set(self.shared.registry.len() as i64);
        parley_ops::encode(&self.metrics)
    }
}

/// `/healthz`, `/readyz`, `/metrics` and `/route` for a gateway that is all
/// of Parley in one process: the lookup answers with `advertise`, the only
/// gateway there is. `register` adds the other parts' metrics.
pub fn one_process_ops(
    shared: Arc<Shared>,
    advertise: String,
    register: impl FnOnce(&mut MetricsRegistry),
) -> axum::Router {
    let mut metrics = MetricsRegistry::with_prefix("parley");
    shared.metrics.register(&mut metrics);
    register(&mut metrics);
    let node = Arc::new(OneProcess {
        shared,
        advertise,
        metrics,
    });
    let probe: Arc<dyn Probe> = node.clone();
    parley_ops::router(probe).merge(
        axum::Router::new()
            .route(
                "/route",
                axum::routing::get(|State(n): State<Arc<OneProcess>>| async move {
                    let me = (!n.shared.drain.active()).then(|| n.advertise.clone());
                    answer(me.as_slice())
                }),
            )
            .with_state(node),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_addresses_come_off_the_query() {
        assert!(reported_failed(None).is_empty());
        assert_eq!(
            reported_failed(Some(
                "failed=10.0.0.1%3A7400&x=1&failed=b:1&failed=b:1&failed="
            )),
            vec!["10.0.0.1:7400", "b:1"]
        );
        assert!(reported_failed(Some("failed=%zz")).is_empty());
        let many = (0..20)
            .map(|i| format!("failed=a{i}:1"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(reported_failed(Some(&many)).len(), MAX_REPORTED);
    }

    #[test]
    fn an_address_is_probed_once_however_often_it_is_reported() {
        let p = Prober::default();
        assert!(p.due("a:1"));
        assert!(!p.due("a:1"));
        assert!(p.due("b:1"));
    }

    #[tokio::test]
    async fn a_probe_fails_on_a_closed_port_and_on_a_silent_listener() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        assert!(!answers_hello(&addr, PROBE_WITHIN).await);
        // Accepts (the kernel does) but never answers: a frozen gateway.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        assert!(!answers_hello(&addr, Duration::from_millis(200)).await);
        // A port that answers a Hello with anything at all (a TLS alert,
        // a close) belongs to a running gateway.
        let tls_like = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tls_like.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = tls_like.accept().await.unwrap();
            let _ = s
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32])
                .await;
        });
        assert!(answers_hello(&addr, PROBE_WITHIN).await);
    }
}
