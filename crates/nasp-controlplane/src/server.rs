//! The control plane's gRPC server, as istiod serves port 15012, on one
//! port: a connection that starts with a TLS handshake gets the CA and ADS
//! over TLS; one that starts in plaintext HTTP/2 gets ADS only (as istiod's
//! plaintext port 15010), so local tools need no certificate to read config.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;

use crate::ca::{CaError, CaService, CertificateAuthority};

/// Names in the control plane's serving certificate: istiod's default name,
/// so clients configured for istiod work unchanged, and loopback.
pub const SERVING_DNS_NAMES: &[&str] = &["istiod.istio-system.svc", "localhost"];

/// How to run the control plane.
#[derive(Debug)]
pub struct ControlPlaneConfig {
    /// The signing authority.
    pub ca: Arc<CertificateAuthority>,
    /// The xDS snapshots to serve, if any.
    pub xds: Option<Arc<crate::xds::SnapshotCache>>,
}

/// A running control plane. Dropping it stops the server.
#[derive(Debug)]
pub struct ControlPlane {
    addr: SocketAddr,
    root_pem: String,
    xds: Option<Arc<crate::xds::SnapshotCache>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// A connection: TLS or plaintext, cut when the control plane stops (ADS
/// streams never end on their own, so a graceful stop alone would leave
/// clients attached to a server that is gone).
struct Conn {
    io: Io,
    stop: tokio_stream::wrappers::WatchStream<bool>,
}

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl Conn {
    fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        use tokio_stream::Stream;
        loop {
            match Pin::new(&mut self.stop).poll_next(cx) {
                Poll::Ready(Some(false)) => continue,
                Poll::Ready(Some(true)) | Poll::Ready(None) => return true,
                Poll::Pending => return false,
            }
        }
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "control plane stopped",
    )
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.io {
            Io::Tls(t) => t.get_ref().0.peer_addr().ok(),
            Io::Plain(t) => t.peer_addr().ok(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(aborted()));
        }
        match &mut this.io {
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(aborted()));
        }
        match &mut this.io {
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            Io::Plain(t) => Pin::new(t).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

impl ControlPlane {
    /// Serves on `listener` until dropped or [`ControlPlane::shutdown`].
    pub fn start(listener: TcpListener, config: ControlPlaneConfig) -> Result<Self, CaError> {
        let addr = listener
            .local_addr()
            .map_err(|e| CaError::Serve(e.to_string()))?;
        let ca = config.ca;
        if ca.allows_any_identity() {
            if !addr.ip().is_loopback() {
                return Err(CaError::Config(format!(
                    "refusing to serve the CA's development mode (any identity to anyone) on \
                     {addr}: it is allowed on loopback addresses only; register tokens instead"
                )));
            }
            tracing::warn!(%addr, "DEVELOPMENT MODE: any local caller can get any identity of the trust domain");
        }
        let ips = [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ];
        let (chain_pem, key_pem) = ca.serving_cert(SERVING_DNS_NAMES, &ips)?;
        let chain: Vec<CertificateDer<'static>> = chain_pem
            .iter()
            .take(chain_pem.len().saturating_sub(1)) // the root is not sent
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Material(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CaError::Material(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(nasp_identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Serve(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| CaError::Serve(e.to_string()))?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tls_tx, tls_rx) = mpsc::channel::<std::io::Result<Conn>>(64);
        let (plain_tx, plain_rx) = mpsc::channel::<std::io::Result<Conn>>(64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let root_pem = ca.root_pem().to_string();
        let xds = config.xds;
        let snapshots = xds.clone();
        let mut tls_router =
            tonic::transport::Server::builder().add_service(CaService::new(ca).into_server());
        if let Some(cache) = &xds {
            tls_router =
                tls_router.add_service(crate::xds::AdsService::new(cache.clone()).into_server());
        }
        let plain_router = xds.as_ref().map(|cache| {
            tonic::transport::Server::builder()
                .add_service(crate::xds::AdsService::new(cache.clone()).into_server())
        });
        let task = tokio::spawn(async move {
            let accept = tokio::spawn(async move {
                loop {
                    // Failing accepts (EMFILE) back off instead of spinning.
                    let (tcp, peer) = nasp_transport::inbound::accept_with_backoff(&listener).await;
                    let (acceptor, tls_tx, plain_tx) =
                        (acceptor.clone(), tls_tx.clone(), plain_tx.clone());
                    let stop = tokio_stream::wrappers::WatchStream::new(cut_rx.clone());
                    tokio::spawn(async move {
                        // A TLS connection starts with a handshake record (0x16).
                        let mut first = [0u8; 1];
                        let peeked = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            tcp.peek(&mut first),
                        )
                        .await;
                        if !matches!(peeked, Ok(Ok(1))) {
                            return;
                        }
                        if first[0] != 0x16 {
                            let _ = plain_tx
                                .send(Ok(Conn {
                                    io: Io::Plain(tcp),
                                    stop,
                                }))
                                .await;
                            return;
                        }
                        // A failed handshake (garbage, wrong protocol) only
                        // costs that connection.
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(tcp),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => {
                                let _ = tls_tx
                                    .send(Ok(Conn {
                                        io: Io::Tls(Box::new(tls)),
                                        stop,
                                    }))
                                    .await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            });
            let (stop_plain_tx, stop_plain_rx) = oneshot::channel::<()>();
            let plain = tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::ReceiverStream::new(plain_rx);
                match plain_router {
                    Some(router) => {
                        let r = router
                            .serve_with_incoming_shutdown(incoming, async {
                                let _ = stop_plain_rx.await;
                            })
                            .await;
                        if let Err(e) = r {
                            tracing::error!("plaintext xDS server failed: {e}");
                        }
                    }
                    // No xDS: plaintext connections are dropped.
                    None => {
                        use tokio_stream::StreamExt;
                        let mut incoming = incoming;
                        while incoming.next().await.is_some() {}
                    }
                }
            });
            let incoming = tokio_stream::wrappers::ReceiverStream::new(tls_rx);
            let r = tls_router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                    // Cut every connection: long-lived streams end now.
                    let _ = cut_tx.send(true);
                })
                .await;
            accept.abort();
            let _ = stop_plain_tx.send(());
            plain.abort();
            if let Err(e) = r {
                tracing::error!("control plane server failed: {e}");
            }
        });
        Ok(Self {
            addr,
            root_pem,
            xds: snapshots,
            shutdown: Some(stop_tx),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The mesh root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The snapshots it serves over ADS (`None` without xDS): a new
    /// snapshot set there is pushed to every connected client.
    pub fn snapshots(&self) -> Option<&Arc<crate::xds::SnapshotCache>> {
        self.xds.as_ref()
    }

    /// Stops serving and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }

    /// Waits until the server ends (it ends only on shutdown or error).
    pub async fn wait(mut self) {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}
