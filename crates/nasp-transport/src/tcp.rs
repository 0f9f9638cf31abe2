//! Outbound TCP through the mesh: `connect("db.demo:5432")` resolves the
//! destination in the view (a TCP service's cluster, or the cluster a plain
//! request to an HTTP service would take), picks an endpoint with the
//! cluster's balancer, and returns a stream that is mTLS (Istio's SNI, ALPN
//! `istio-peer-exchange`, `istio`, the SANs xDS expects) or plaintext, as
//! the view says for that endpoint.
//!
//! As Envoy's TCP proxy (`max_connect_attempts` 1 by default), a failed
//! connect is reported, not retried, unless `connect_attempts` says so;
//! a retry goes to another endpoint when there is one.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nasp_xds::cluster::TlsMode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::balance::{Balancers, InFlight};
use crate::client::ViewSource;
use crate::info::Upstream;
use crate::outbound::{ALPN_TCP, MeshConnector};
use crate::pool::{ConnInfo, TlsTarget};

/// Why a mesh TCP connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Not `host:port`.
    #[error("{0:?} is not host:port")]
    BadTarget(String),
    /// The mesh has no such destination (and passthrough is off).
    #[error("{0} is not a mesh destination")]
    NotInMesh(String),
    /// The destination's cluster has no endpoint.
    #[error("no healthy upstream in {0}")]
    NoHealthyUpstream(String),
    /// The cluster's upstream TLS is not one nasp speaks yet.
    #[error("{0}")]
    Unsupported(String),
    /// Every attempt failed; the last failure.
    #[error("connecting to {target}: {reason}")]
    Failed {
        /// What was dialed.
        target: String,
        /// Why it failed.
        reason: String,
    },
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A TCP connection through the mesh.
pub struct MeshTcpStream {
    io: Io,
    upstream: Upstream,
    _in_flight: InFlight,
}

impl std::fmt::Debug for MeshTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTcpStream")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl MeshTcpStream {
    /// Where the connection went.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

/// Opens TCP connections through the mesh. Cheap to clone.
#[derive(Clone)]
pub struct TcpConnector {
    views: Arc<dyn ViewSource>,
    connector: MeshConnector,
    balancers: Arc<Balancers>,
    /// Send connections to hosts outside the mesh straight to them.
    pub passthrough: bool,
    /// Connect attempts per connection (Envoy's `max_connect_attempts`, 1).
    pub connect_attempts: u32,
    /// Offer `istio-peer-exchange` before `istio` (the default): only when
    /// the caller's outbound chain runs a metadata exchange, which strips
    /// the server's preamble; otherwise those bytes would reach the
    /// application.
    pub peer_exchange: bool,
}

impl std::fmt::Debug for TcpConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnector").finish_non_exhaustive()
    }
}

fn split(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port.parse().ok()?))
}

impl TcpConnector {
    /// A connector routing by `views`.
    pub fn new(views: Arc<dyn ViewSource>, connector: MeshConnector) -> Self {
        Self {
            views,
            connector,
            balancers: Arc::default(),
            passthrough: true,
            connect_attempts: 1,
            peer_exchange: true,
        }
    }

    /// The ALPN offered to mesh peers.
    fn alpn(&self) -> &'static [&'static [u8]] {
        if self.peer_exchange {
            ALPN_TCP
        } else {
            &ALPN_TCP[1..]
        }
    }

    /// Connects to `host:port` through the mesh.
    pub async fn connect(&self, target: &str) -> Result<MeshTcpStream, ConnectError> {
        let (host, port) = split(target).ok_or_else(|| ConnectError::BadTarget(target.into()))?;
        let view = self.views.view();
        let cluster = view
            .outbound(host, port)
            .and_then(|o| view.plain_cluster(&o));
        let Some(cluster) = cluster else {
            if !self.passthrough {
                return Err(ConnectError::NotInMesh(target.into()));
            }
            let failed = |reason: String| ConnectError::Failed {
                target: target.into(),
                reason,
            };
            let addr = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| failed(e.to_string()))?
                .next()
                .ok_or_else(|| failed("no address".into()))?;
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let counter = Arc::default();
            return Ok(MeshTcpStream {
                io: Io::Plain(tcp),
                upstream: Upstream {
                    cluster: Arc::from("PassthroughCluster"),
                    route: Arc::from(""),
                    address: addr,
                    mtls: false,
                    peer_id: None,
                    alpn: None,
                    attempts: 1,
                    services: Arc::from([]),
                },
                _in_flight: InFlight::start(&counter),
            });
        };
        let lb = self.balancers.get(&cluster);
        if lb.is_empty() {
            return Err(ConnectError::NoHealthyUpstream(cluster.name.clone()));
        }
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = String::new();
        for attempt in 1..=self.connect_attempts.max(1) {
            let Some(member) = lb.pick(&tried) else {
                break;
            };
            let addr = member.addr;
            tried.push(addr);
            let in_flight = InFlight::start(&member.in_flight);
            let upstream = |mtls, peer_id, alpn| Upstream {
                cluster: Arc::from(cluster.name.as_str()),
                route: Arc::from(""),
                address: addr,
                mtls,
                peer_id,
                alpn,
                attempts: attempt,
                services: cluster.services.clone(),
            };
            let timeout = cluster.connect_timeout;
            match cluster.tls_for(&cluster.endpoints[member.idx]) {
                None => match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(MeshTcpStream {
                            io: Io::Plain(tcp),
                            upstream: upstream(false, None, None),
                            _in_flight: in_flight,
                        });
                    }
                    Ok(Err(e)) => last = format!("{addr}: {e}"),
                    Err(_) => last = format!("{addr}: no connection within {timeout:?}"),
                },
                Some(t) if t.mode == TlsMode::IstioMutual => {
                    let target = TlsTarget::istio(&cluster, t, addr);
                    match self
                        .connector
                        .clone()
                        .connect_timeout(timeout)
                        .connect(addr, &target.sni, &target.sans, self.alpn())
                        .await
                    {
                        Ok(tls) => {
                            let info = ConnInfo::of(tls.get_ref().1);
                            return Ok(MeshTcpStream {
                                io: Io::Tls(Box::new(tls)),
                                upstream: upstream(true, info.peer_id, info.alpn),
                                _in_flight: in_flight,
                            });
                        }
                        Err(e) => last = format!("{addr}: {e}"),
                    }
                }
                Some(t) => {
                    return Err(ConnectError::Unsupported(format!(
                        "cluster {}: upstream TLS mode {:?} is not supported yet",
                        cluster.name, t.mode
                    )));
                }
            }
        }
        Err(ConnectError::Failed {
            target: target.into(),
            reason: last,
        })
    }
}

impl AsyncRead for MeshTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_are_host_port() {
        assert_eq!(super::split("db.demo:5432"), Some(("db.demo", 5432)));
        assert_eq!(super::split("[::1]:80"), Some(("::1", 80)));
        assert_eq!(super::split("db.demo"), None);
        assert_eq!(super::split("db.demo:x"), None);
    }
}
