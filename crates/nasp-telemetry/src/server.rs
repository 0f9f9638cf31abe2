//! The Prometheus endpoint of a workload, as an Istio sidecar's
//! `:15090/stats/prometheus`: plain HTTP/1.1 (Prometheus scrapes over
//! HTTP/1.1), outside the mesh (no mTLS, as Envoy's stats listener), serving
//! [`MetricsRegistry::prometheus_text`] at [`PROMETHEUS_PATH`] and
//! [`METRICS_PATH`].
//!
//! Invariants: nothing a client sends panics the server or stops it; a
//! connection that sends garbage, stalls in its headers or breaks off is
//! logged (warn, with the peer's address) and closed, and the others go on
//! being served. After shutdown no new connection is accepted, open ones are
//! closed once their request in flight is answered, and none outlives
//! [`DRAIN_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::MetricsRegistry;

/// Istio's Prometheus port (Envoy's stats listener in a sidecar).
pub const ISTIO_PROMETHEUS_PORT: u16 = 15090;
/// Where Istio's sidecar serves the scrape (the pod annotation
/// `prometheus.io/path` Istio writes).
pub const PROMETHEUS_PATH: &str = "/stats/prometheus";
/// The conventional path, served too.
pub const METRICS_PATH: &str = "/metrics";
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// How long a stopped server waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept (a scrape needs
/// one, a few readers a handful).
pub const MAX_CONNECTIONS: usize = 64;

/// What can go wrong starting the endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address could not be bound (in use, not local, no permission).
    #[error("Prometheus endpoint: binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The listener has no local address.
    #[error("Prometheus endpoint: local address: {0}")]
    LocalAddr(std::io::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A running endpoint: its bound address, and a stop. Dropping it stops the
/// server too (without waiting).
#[derive(Debug)]
pub struct PrometheusServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PrometheusServer {
    /// Binds `addr` (port 0 picks one) and serves `registry` there on the
    /// current tokio runtime.
    pub async fn bind(addr: SocketAddr, registry: MetricsRegistry) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        Self::start(listener, registry)
    }

    /// Serves `registry` on a bound `listener` on the current tokio runtime.
    pub fn start(listener: TcpListener, registry: MetricsRegistry) -> Result<Self> {
        let addr = listener.local_addr().map_err(Error::LocalAddr)?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(serve_prometheus(listener, registry, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        tracing::info!("Prometheus endpoint at http://{addr}{PROMETHEUS_PATH}");
        Ok(Self {
            addr,
            stop,
            done: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, answers the requests in flight (up to
    /// [`DRAIN_TIMEOUT`]) and returns when the server has stopped.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.done.lock().await.take()
            && let Err(e) = task.await
        {
            tracing::warn!(addr = %self.addr, "Prometheus endpoint task: {e}");
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Serves `registry` as Prometheus text on `listener` until `shutdown`
/// completes, then stops accepting, lets each open connection finish the
/// request it is in (up to [`DRAIN_TIMEOUT`]) and returns.
///
/// `GET` / `HEAD` on [`PROMETHEUS_PATH`] or [`METRICS_PATH`] (any query)
/// answer 200 with [`CONTENT_TYPE`]; another method there 405; any other
/// path 404.
pub async fn serve_prometheus(
    listener: TcpListener,
    registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send,
) {
    let local = listener.local_addr().ok();
    let (closing, closed) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => {
                backoff = Duration::from_millis(5);
                c
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and retry
                // rather than spin or stop serving.
                tracing::warn!(
                    ?local,
                    "Prometheus endpoint: accept: {e}; retrying in {backoff:?}"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "Prometheus endpoint: {MAX_CONNECTIONS} connections open, closing this one");
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        conns.spawn(connection(tcp, peer, registry.clone(), closed.clone()));
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?local,
            "Prometheus endpoint: {} connections still open after {DRAIN_TIMEOUT:?}, closed",
            conns.len()
        );
    }
    conns.abort_all();
}

/// One client connection: HTTP/1.1 keep-alive until it closes, fails or
/// the server stops.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    registry: MetricsRegistry,
    mut closing: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let resp = answer(&registry, req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
    let mut conn = std::pin::pin!(conn);
    let closed = async move {
        // The guard `wait_for` returns is not `Send`: drop it here.
        let _ = closing.wait_for(|c| *c).await.map(|_| ());
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = closed => {
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Garbage, a stall in the headers, a reset: the client's problem,
        // logged so that a broken scraper can be found.
        let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
        tracing::warn!(
            "Prometheus endpoint: connection from {peer}: {e}{}",
            cause.unwrap_or_default()
        );
    }
}

/// The answer to one request.
fn answer(registry: &MetricsRegistry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    };
    if path != PROMETHEUS_PATH && path != METRICS_PATH {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /stats/prometheus\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    // HEAD: hyper sends the headers (with the length) and no body.
    let mut resp = Response::new(Full::new(Bytes::from(registry.prometheus_text())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_methods_and_content_type() {
        let r = MetricsRegistry::new();
        let id = r.define(
            crate::MetricKind::Counter,
            "reporter=.=source;.;istio_requests_total",
        );
        r.increment(id, 3).unwrap();
        for path in [PROMETHEUS_PATH, METRICS_PATH] {
            let resp = answer(&r, &Method::GET, path);
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        }
        assert_eq!(
            answer(&r, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&r, &Method::GET, "/stats/prometheus/x").status(),
            StatusCode::NOT_FOUND
        );
        let post = answer(&r, &Method::POST, PROMETHEUS_PATH);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }
}
