//! HTTP over mesh connections: any hyper (or tower, through
//! `hyper_util::service::TowerToHyperService`) service served on a
//! [`MeshListener`], HTTP/1.1 and HTTP/2 on the same port (by the HTTP/2
//! preface, as hyper-util's auto builder tells them apart).
//!
//! Each request carries a [`MeshPeer`] extension: who called, verified.
//! As an Istio sidecar does with `SANITIZE_SET`, an incoming
//! `x-forwarded-client-cert` header is removed (a client cannot forge its
//! identity with it) and, on mTLS, set to `URI=<peer SPIFFE id>` for
//! applications that read the peer from it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nasp_identity::SpiffeId;

use crate::inbound::{MeshConn, MeshListener};

/// The `x-forwarded-client-cert` header.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Who sent a request, as the mesh listener verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    /// The peer's SPIFFE id (mTLS only).
    pub id: Option<SpiffeId>,
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether the connection is mTLS.
    pub mtls: bool,
}

impl MeshPeer {
    fn of(conn: &MeshConn) -> Self {
        Self {
            id: conn.peer_id.clone(),
            addr: conn.peer_addr,
            mtls: conn.is_mtls(),
        }
    }
}

/// Serves `service` on every connection `listener` accepts, until the
/// listener stops. Each connection runs in its own task; a connection
/// that fails (a protocol error, a reset) ends alone.
pub async fn serve_http<S, B>(listener: MeshListener, service: S)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_http_until(listener, service, std::future::pending(), Duration::ZERO).await;
}

/// As [`serve_http`], until `shutdown` completes; then it drains as Envoy
/// does, so that no caller that already sent a request is cut off:
/// 1. the port closes (new callers are refused and go to other endpoints),
///    connections already accepted or in their handshake are still served;
/// 2. for a short grace (a quarter of `drain`, at most 1 s) connections
///    stay open and every HTTP/1.1 response says `connection: close`, so
///    keep-alive clients stop reusing them instead of racing a close;
/// 3. then idle connections are closed, HTTP/2 peers get a GOAWAY, and
///    requests in flight have the rest of `drain` to finish.
///
/// Returns how many connections were still open when `drain` ran out (0:
/// everything finished).
pub async fn serve_http_until<S, B>(
    mut listener: MeshListener,
    service: S,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> usize
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    let draining = Arc::new(AtomicBool::new(false));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let conn = match deadline {
            None => tokio::select! {
                c = listener.accept() => c,
                () = &mut shutdown => {
                    listener.stop_accepting();
                    draining.store(true, Ordering::Relaxed);
                    deadline = Some(tokio::time::Instant::now() + drain);
                    continue;
                }
            },
            Some(d) => tokio::time::timeout_at(d, listener.accept())
                .await
                .unwrap_or_default(),
        };
        let Some(conn) = conn else { break };
        let peer = MeshPeer::of(&conn);
        let service = service.clone();
        let addr = peer.addr;
        let draining_now = draining.clone();
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let headers = req.headers_mut();
            headers.remove(XFCC);
            if let Some(id) = &peer.id
                && let Ok(v) = http::HeaderValue::try_from(format!("URI={id}"))
            {
                headers.insert(XFCC, v);
            }
            req.extensions_mut().insert(peer.clone());
            let h1 = req.version() < http::Version::HTTP_2;
            let fut = service.call(req);
            let draining = draining_now.clone();
            async move {
                let mut resp = fut.await?;
                if h1 && draining.load(Ordering::Relaxed) {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, S::Error>(resp)
            }
        });
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(conn.stream), svc)
            .into_owned();
        let watched = graceful.watch(served);
        let open = open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(%addr, "HTTP connection ended: {e}");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + drain);
    // The grace: keep-alive connections answer with `connection: close`.
    let grace = (drain / 4).min(Duration::from_secs(1));
    let grace_end = (tokio::time::Instant::now() + grace).min(deadline);
    while open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_ok()
    {
        return 0;
    }
    open.load(Ordering::Relaxed)
}
