//! The control plane's gRPC server over TLS, as istiod serves port 15012.

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
}

/// A running control plane. Dropping it stops the server.
#[derive(Debug)]
pub struct ControlPlane {
    addr: SocketAddr,
    root_pem: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

struct TlsConn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl ControlPlane {
    /// Serves on `listener` until dropped or [`ControlPlane::shutdown`].
    pub fn start(listener: TcpListener, config: ControlPlaneConfig) -> Result<Self, CaError> {
        let addr = listener
            .local_addr()
            .map_err(|e| CaError::Serve(e.to_string()))?;
        let ca = config.ca;
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
        let (conn_tx, conn_rx) = mpsc::channel::<std::io::Result<TlsConn>>(64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let root_pem = ca.root_pem().to_string();
        let router =
            tonic::transport::Server::builder().add_service(CaService::new(ca).into_server());
        let task = tokio::spawn(async move {
            let accept = tokio::spawn(async move {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, conn_tx) = (acceptor.clone(), conn_tx.clone());
                    tokio::spawn(async move {
                        // A failed handshake (garbage, wrong protocol) only
                        // costs that connection.
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(tcp),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => {
                                let _ = conn_tx.send(Ok(TlsConn(tls))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            });
            let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
            let r = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            accept.abort();
            if let Err(e) = r {
                tracing::error!("control plane server failed: {e}");
            }
        });
        Ok(Self {
            addr,
            root_pem,
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
