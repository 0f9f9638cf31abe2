//! The Istio CA client: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nasp_proto::istio_ca::IstioCertificateRequest;
use nasp_proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cert::pem_certs;
use crate::{Error, crypto_provider};

/// istiod's name in its serving certificate, unless configured otherwise.
pub const DEFAULT_CA_SERVER_NAME: &str = "istiod.istio-system.svc";

/// How to reach and authenticate to the CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `host:port` of the CA (istiod: port 15012).
    pub addr: String,
    /// The mesh root(s) that istiod's serving certificate must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// The file the roots came from, if any: re-read after a failed call,
    /// and the connection rebuilt when its roots changed (istiod's root
    /// rotated), as istio-agent reconnects with fresh roots.
    pub root_file: Option<PathBuf>,
    /// The DNS name istiod's certificate must carry.
    pub server_name: String,
    /// A bearer token file, re-read on every call (tokens rotate).
    pub token_file: Option<PathBuf>,
    /// Sent as the `ClusterID` header.
    pub cluster_id: Option<String>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Attempts after the first on a transient error.
    pub retries: u32,
}

impl CaClientConfig {
    /// A configuration with Istio's defaults.
    pub fn new(addr: impl Into<String>, roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            addr: addr.into(),
            roots,
            root_file: None,
            server_name: DEFAULT_CA_SERVER_NAME.to_string(),
            token_file: None,
            cluster_id: None,
            timeout: Duration::from_secs(10),
            retries: 5,
        }
    }
}

/// A client of the Istio CA. Cheap to clone; connects lazily.
#[derive(Clone)]
pub struct CaClient {
    config: Arc<CaClientConfig>,
    /// The roots the channel trusts and the channel; replaced together when
    /// the root file brings new roots.
    channel: Arc<Mutex<(Vec<CertificateDer<'static>>, Channel)>>,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.config.addr)
            .finish_non_exhaustive()
    }
}

/// A lazily connecting gRPC channel to `addr` over TLS (ALPN h2): the
/// server's certificate must chain to `roots` and carry `server_name`.
pub fn grpc_channel(
    addr: &str,
    roots: &[CertificateDer<'static>],
    server_name: &str,
    timeout: Duration,
) -> Result<Channel, Error> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| Error::Certificate(format!("root certificate: {e}")))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let server_name = ServerName::try_from(server_name.to_string())
        .map_err(|e| Error::Config(format!("server name {server_name:?}: {e}")))?;
    let dial = addr.to_string();
    let connector = tower::service_fn(move |_uri: Uri| {
        let (tls, server_name, addr) = (tls.clone(), server_name.clone(), dial.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The URI only names the authority for HTTP/2; the connector dials.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Config(format!("address {addr:?}: {e}")))?
        .connect_timeout(timeout);
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Codes Istio's own client retries on.
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

fn status_error(s: &tonic::Status) -> Error {
    Error::Ca {
        code: format!("{:?}", s.code()),
        message: s.message().to_string(),
    }
}

impl CaClient {
    /// Builds the client. No connection is made until the first call.
    pub fn new(config: CaClientConfig) -> Result<Self, Error> {
        if config.roots.is_empty() {
            return Err(Error::Config(
                "the CA client needs the mesh root certificate".into(),
            ));
        }
        let channel = grpc_channel(
            &config.addr,
            &config.roots,
            &config.server_name,
            config.timeout,
        )?;
        Ok(Self {
            channel: Arc::new(Mutex::new((config.roots.clone(), channel))),
            config: Arc::new(config),
        })
    }

    fn channel(&self) -> Channel {
        self.channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// The roots the client trusts now.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Re-reads the root file; rebuilds the channel when its roots differ
    /// from the ones in use. Returns whether it did.
    async fn refresh_roots(&self) -> bool {
        let Some(path) = &self.config.root_file else {
            return false;
        };
        let roots = match tokio::fs::read(path)
            .await
            .map_err(|e| e.to_string())
            .and_then(|pem| pem_certs(&pem).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("CA root file {} not reloaded: {e}", path.display());
                return false;
            }
        };
        if roots == self.roots() {
            return false;
        }
        let channel = match grpc_channel(
            &self.config.addr,
            &roots,
            &self.config.server_name,
            self.config.timeout,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("CA root file {}: {e}", path.display());
                return false;
            }
        };
        tracing::info!("CA roots changed in {}: reconnecting", path.display());
        *self
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (roots, channel);
        true
    }

    /// Asks the CA to sign `csr_pem` for `ttl`; returns the chain, leaf first
    /// and root last (at least two certificates).
    pub async fn sign(
        &self,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        let mut retried_with_new_roots = false;
        let resp = loop {
            match self.sign_once(csr_pem, ttl).await {
                Ok(chain) => break chain,
                // A failed call may mean istiod's root rotated: with fresh
                // roots from the file, one more attempt at once.
                Err(s) if !retried_with_new_roots && self.refresh_roots().await => {
                    tracing::debug!(code = ?s.code(), "CA call failed; retrying with the new roots: {}", s.message());
                    retried_with_new_roots = true;
                }
                Err(s) if transient(s.code()) && attempt < self.config.retries => {
                    tracing::debug!(attempt, code = ?s.code(), "CA call failed, retrying: {}", s.message());
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(s) => return Err(status_error(&s)),
            }
        };
        if resp.len() < 2 {
            return Err(Error::Ca {
                code: "InvalidResponse".into(),
                message: format!(
                    "the CA returned {} certificate(s); a chain ends with the root, so at least 2 are expected",
                    resp.len()
                ),
            });
        }
        let mut chain = Vec::new();
        for pem in &resp {
            chain.extend(pem_certs(pem.as_bytes())?);
        }
        Ok(chain)
    }

    async fn sign_once(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, tonic::Status> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        req.set_timeout(self.config.timeout);
        if let Some(path) = &self.config.token_file {
            // Re-read every time: projected service-account tokens rotate.
            // A missing file sends no credential (as istio-agent does), so
            // the CA answers with what it thinks of an anonymous caller.
            let token = match tokio::fs::read_to_string(path).await {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!(
                        "token file {} is missing: no credential sent",
                        path.display()
                    );
                    None
                }
                Err(e) => {
                    return Err(tonic::Status::unauthenticated(format!(
                        "token file {}: {e}",
                        path.display()
                    )));
                }
            };
            if let Some(token) = token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                let value = format!("Bearer {token}").parse().map_err(|_| {
                    tonic::Status::unauthenticated("the token is not a valid header value")
                })?;
                req.metadata_mut().insert("authorization", value);
            }
        }
        if let Some(cluster) = &self.config.cluster_id {
            let value = cluster
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("bad cluster id"))?;
            req.metadata_mut().insert("clusterid", value);
        }
        let mut client = IstioCertificateServiceClient::new(self.channel());
        let resp = client.create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }
}
