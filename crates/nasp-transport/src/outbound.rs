//! Outbound mTLS connections as an Istio sidecar opens them.
//!
//! A [`MeshConnector`] keeps one rustls client configuration per
//! destination shape — the SANs to expect and the ALPN offered — built once
//! and shared by every connection to such a destination (so TLS session
//! resumption works across connections, and no configuration is ever
//! mutated per request, which the Go original did). The client certificate
//! is read from the identity watch at each handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasp_identity::WorkloadCert;
use nasp_identity::tls::client_config;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::{Error, Result, io};

/// ALPN a sidecar offers for TCP with metadata exchange.
pub const ALPN_TCP: &[&[u8]] = &[b"istio-peer-exchange", b"istio"];
/// ALPN a sidecar offers for HTTP/1.1.
pub const ALPN_HTTP11: &[&[u8]] = &[b"istio-http/1.1", b"istio", b"http/1.1"];
/// ALPN a sidecar offers for HTTP/2.
pub const ALPN_H2: &[&[u8]] = nasp_identity::tls::ALPN_ISTIO_H2;

/// Istio's SNI for a mesh destination: `outbound_.<port>_.<subset>_.<fqdn>`
/// (an empty subset is written as nothing between the dots).
pub fn istio_sni(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{fqdn}")
}

type ConfigKey = (Vec<String>, Vec<Vec<u8>>);

/// Opens mesh mTLS connections with the workload's current certificate.
#[derive(Debug, Clone)]
pub struct MeshConnector {
    certs: watch::Receiver<Option<Arc<WorkloadCert>>>,
    configs: Arc<Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>>,
    connect_timeout: Duration,
}

impl MeshConnector {
    /// A connector presenting the certificates of `certs`.
    pub fn new(certs: watch::Receiver<Option<Arc<WorkloadCert>>>) -> Self {
        Self {
            certs,
            configs: Arc::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the deadline for TCP connect plus the TLS handshake (default
    /// 10 s; a cluster's `connect_timeout` when xDS gives one).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// The shared configuration for destinations expecting `sans` with
    /// `alpn` offered; built on first use.
    fn config(&self, sans: &[String], alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
        let key: ConfigKey = (sans.to_vec(), alpn.iter().map(|p| p.to_vec()).collect());
        let mut configs = self
            .configs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(client_config(self.certs.clone(), sans.to_vec(), alpn)?);
        configs.insert(key, c.clone());
        Ok(c)
    }

    /// Opens an mTLS connection to `addr`, sending `sni`, offering `alpn`,
    /// and accepting only a server that carries one of `sans` (none: the
    /// chain to the mesh roots alone decides, as Envoy).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
        sans: &[String],
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.config(sans, alpn)?;
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| Error::Tls(format!("SNI {sni:?}: {e}")))?;
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(io(format!("connecting to {addr}")))?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Tls(format!("handshake with {addr}: {e}")))
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| {
                Error::Tls(format!(
                    "connecting to {addr}: no handshake within {:?}",
                    self.connect_timeout
                ))
            })?
    }

    /// Destination shapes with a configuration built (for tests and
    /// metrics: it grows with destinations, not with connections).
    pub fn configs_built(&self) -> usize {
        self.configs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_is_istios() {
        assert_eq!(
            istio_sni(80, "", "echo.demo.svc.cluster.local"),
            "outbound_.80_._.echo.demo.svc.cluster.local"
        );
        assert_eq!(
            istio_sni(9080, "v2", "reviews.default.svc.cluster.local"),
            "outbound_.9080_.v2_.reviews.default.svc.cluster.local"
        );
    }
}
