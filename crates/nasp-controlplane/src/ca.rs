//! The embedded Istio CA: serves `istio.v1.auth.IstioCertificateService`
//! like istiod, for laptops, demos and tests.
//!
//! Decisions (see docs/identity.md):
//! - The root is generated (ECDSA P-256, 10 years) or given as PEM; a given
//!   CA certificate may be an intermediate, with its chain up to the root.
//! - Issued certificates: the CSR's public key and its single SPIFFE URI SAN
//!   (which must be in the CA's trust domain), an empty subject (so the SAN
//!   is critical), digital signature + key encipherment, server and client
//!   auth, not before one minute ago (clock skew), lifetime as requested but
//!   at most `max_ttl` (24 h by default when none is requested).
//! - Token checking: off by default (any caller may ask for any id of the
//!   trust domain). On, each bearer token is registered with the one SPIFFE
//!   id it may request; anything else is refused with UNAUTHENTICATED or
//!   PERMISSION_DENIED. Kubernetes JWT review is istiod's business.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nasp_identity::SpiffeId;
use nasp_proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use nasp_proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

/// Errors setting up the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key or certificate material is unusable.
    #[error("CA material: {0}")]
    Material(String),
    /// Serving failed.
    #[error("CA server: {0}")]
    Serve(String),
}

/// Who may ask for which identity.
#[derive(Clone, Debug, Default)]
pub enum TokenPolicy {
    /// Anyone may request any SPIFFE id of the trust domain.
    #[default]
    Off,
    /// Each bearer token may request exactly one SPIFFE id.
    Tokens(HashMap<String, SpiffeId>),
}

impl TokenPolicy {
    /// Parses a token file: one `TOKEN SPIFFE-ID` pair per line; `#` comments.
    pub fn from_text(text: &str) -> Result<Self, CaError> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (token, id) = line.split_once(char::is_whitespace).ok_or_else(|| {
                CaError::Material(format!(
                    "token file line {}: expected `TOKEN SPIFFE-ID`",
                    n + 1
                ))
            })?;
            let id: SpiffeId = id
                .trim()
                .parse()
                .map_err(|e| CaError::Material(format!("token file line {}: {e}", n + 1)))?;
            map.insert(token.to_string(), id);
        }
        Ok(TokenPolicy::Tokens(map))
    }
}

/// The signing authority.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and its chain up to the root (root last), PEM.
    chain_pem: Vec<String>,
    trust_domain: String,
    max_ttl: Duration,
    default_ttl: Duration,
    backdate: Duration,
    tokens: TokenPolicy,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

fn material(e: impl std::fmt::Display) -> CaError {
    CaError::Material(e.to_string())
}

impl CertificateAuthority {
    /// A new self-signed root for `trust_domain` (ECDSA P-256, 10 years).
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(material)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "nasp embedded CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(material)?;
        let pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Self::with_issuer(issuer, vec![pem], trust_domain)
    }

    /// A CA from a PEM certificate and key; `chain_pem` is the rest of its
    /// chain up to the root (empty when the certificate is the root).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &[String],
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(material)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(material)?;
        let mut chain = vec![cert_pem.to_string()];
        chain.extend(chain_pem.iter().cloned());
        Self::with_issuer(issuer, chain, trust_domain)
    }

    fn with_issuer(
        issuer: Issuer<'static, KeyPair>,
        chain_pem: Vec<String>,
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        SpiffeId::new(trust_domain, "x", "y")
            .map_err(|_| CaError::Material(format!("bad trust domain {trust_domain:?}")))?;
        Ok(Self {
            issuer,
            chain_pem,
            trust_domain: trust_domain.to_string(),
            max_ttl: Duration::from_secs(24 * 3600),
            default_ttl: Duration::from_secs(24 * 3600),
            backdate: Duration::from_secs(60),
            tokens: TokenPolicy::Off,
        })
    }

    /// Caps the lifetime of issued certificates.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// How far before "now" issued certificates start (default 1 min, for
    /// clock skew between the CA and its peers).
    pub fn backdate(mut self, d: Duration) -> Self {
        self.backdate = d;
        self
    }

    /// Sets who may ask for what.
    pub fn tokens(mut self, policy: TokenPolicy) -> Self {
        self.tokens = policy;
        self
    }

    /// The root certificate (PEM), to hand to workloads as `root-cert.pem`.
    pub fn root_pem(&self) -> &str {
        self.chain_pem
            .last()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues a TLS serving certificate for the CA itself (DNS names and IPs
    /// as SANs), returned as (chain PEM leaf-first, key PEM).
    pub fn serving_cert(
        &self,
        dns: &[&str],
        ips: &[std::net::IpAddr],
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(material)?;
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .map_err(material)?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer).map_err(material)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a workload CSR. `token` is the caller's bearer token, if any.
    pub fn sign(
        &self,
        csr_pem: &str,
        ttl: Option<Duration>,
        token: Option<&str>,
    ) -> Result<Vec<String>, Status> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(Status::invalid_argument(format!(
                "the CSR must carry exactly one URI SAN (a SPIFFE id), it has {}",
                uris.len()
            )));
        };
        let id: SpiffeId = uri
            .parse()
            .map_err(|e: nasp_identity::SpiffeIdError| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        if let TokenPolicy::Tokens(map) = &self.tokens {
            let token =
                token.ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
            match map.get(token) {
                Some(allowed) if *allowed == id => {}
                Some(allowed) => {
                    return Err(Status::permission_denied(format!(
                        "this token may request {allowed}, not {id}"
                    )));
                }
                None => return Err(Status::unauthenticated("unknown token")),
            }
        }
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(self.default_ttl)
            .min(self.max_ttl);
        let now = OffsetDateTime::now_utc();
        let not_before =
            now - time::Duration::try_from(self.backdate).unwrap_or(time::Duration::ZERO);
        let not_after = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(1));
        let chain = self
            .issue(&id, csr.public_key, not_before, not_after)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(%id, ?ttl, "issued workload certificate");
        Ok(chain)
    }

    /// Issues a workload certificate for `id` and `public_key` with the given
    /// validity, without any policy check (for tools and tests, e.g. to make
    /// an expired certificate). Returns the chain, PEM, leaf first.
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: impl rcgen::PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Vec<String>, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(material)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let signed = params
            .signed_by(&public_key, &self.issuer)
            .map_err(material)?;
        let mut chain = vec![signed.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }
}

/// The gRPC service over a [`CertificateAuthority`].
#[derive(Clone, Debug)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
}

impl CaService {
    /// Serves `ca`.
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self { ca }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .map(str::to_string);
        let req = request.into_inner();
        let ttl = u64::try_from(req.validity_duration)
            .ok()
            .map(Duration::from_secs);
        let ca = self.ca.clone();
        // Signing (RSA keys in particular) is CPU work: off the reactor.
        let chain = tokio::task::spawn_blocking(move || ca.sign(&req.csr, ttl, token.as_deref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
