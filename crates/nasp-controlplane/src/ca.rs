//! The embedded Istio CA: serves `istio.v1.auth.IstioCertificateService`
//! like istiod, for laptops, demos and tests.
//!
//! Decisions (see docs/identity.md):
//! - The root is generated (ECDSA P-256, 10 years) or given as PEM; a given
//!   CA certificate may be an intermediate, with its chain up to the root.
//!   A given CA is checked at start: its key must match, it must be a CA,
//!   and its chain must verify up to a self-signed root.
//! - Authorization comes first, as istiod's: a call without a known
//!   credential is refused (UNAUTHENTICATED) before its CSR is even parsed,
//!   and a credential grants exactly the identities registered for it
//!   (PERMISSION_DENIED for any other). The default grants nothing. "Any
//!   caller, any identity" exists only as an explicit development mode
//!   ([`TokenPolicy::AnyIdentity`]) that is logged loudly and that the
//!   control plane refuses to serve beyond loopback.
//! - CSRs are read as Go's `crypto/x509` reads them: the key type and curve
//!   come from the SubjectPublicKeyInfo, the signature is verified whatever
//!   its algorithm (ECDSA, RSA PKCS#1 v1.5, RSA-PSS, Ed25519), and requested
//!   extensions other than the SAN are ignored.
//! - Issued certificates: the CSR's public key and its single SPIFFE URI SAN
//!   (which must be in the CA's trust domain), an empty subject (so the SAN
//!   is critical), digital signature + key encipherment, server and client
//!   auth, a random 128-bit serial, not before one minute ago (clock skew),
//!   lifetime as requested but at most `max_ttl` (24 h by default when none
//!   is requested), and never past the signing certificate's own NotAfter.
//!   An expired signer issues nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nasp_identity::SpiffeId;
use nasp_identity::pkix;
use nasp_proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use nasp_proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

/// The longest `max_ttl` accepted: beyond it, time arithmetic on
/// certificate dates would overflow long before it made sense.
pub const MAX_TTL_LIMIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Errors setting up the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key or certificate material is unusable.
    #[error("CA material: {0}")]
    Material(String),
    /// A setting is out of range.
    #[error("CA configuration: {0}")]
    Config(String),
    /// Serving failed.
    #[error("CA server: {0}")]
    Serve(String),
}

/// Who may ask for which identity.
#[derive(Clone, Debug)]
pub enum TokenPolicy {
    /// Each bearer token may request exactly the one SPIFFE id registered
    /// for it; a caller without a registered token gets nothing. The default
    /// (with no tokens) refuses every call.
    Tokens(HashMap<String, SpiffeId>),
    /// Development only: anyone may request any SPIFFE id of the trust
    /// domain. Logged loudly; [`crate::ControlPlane::start`] refuses to serve
    /// it on an address other than loopback.
    AnyIdentity,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy::Tokens(HashMap::new())
    }
}

impl TokenPolicy {
    /// Parses a token file: one `TOKEN SPIFFE-ID` pair per line; `#` comments.
    /// A token listed twice is an error (a silent rebind would hand the
    /// token's holder whichever identity came last).
    pub fn from_text(text: &str) -> Result<Self, CaError> {
        let mut map: HashMap<String, SpiffeId> = HashMap::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
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
            if let Some(first) = first_line.get(token) {
                return Err(CaError::Material(format!(
                    "token file line {}: this token is already registered on line {first}",
                    n + 1
                )));
            }
            first_line.insert(token.to_string(), n + 1);
            map.insert(token.to_string(), id);
        }
        Ok(TokenPolicy::Tokens(map))
    }

    /// Authenticates a caller: the identity its credential grants (`None`:
    /// any identity, development mode), or the refusal.
    fn grant(&self, token: Option<&str>) -> Result<Option<&SpiffeId>, Status> {
        match self {
            TokenPolicy::AnyIdentity => Ok(None),
            TokenPolicy::Tokens(map) => {
                let token = token.ok_or_else(|| {
                    Status::unauthenticated("no credential: send `authorization: Bearer <token>`")
                })?;
                map.get(token)
                    .map(Some)
                    .ok_or_else(|| Status::unauthenticated("unknown token"))
            }
        }
    }
}

/// The signing authority.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and its chain up to the root (root last), PEM.
    chain_pem: Vec<String>,
    /// The signing certificate's validity: nothing issued outlives it.
    signer_not_before: OffsetDateTime,
    signer_not_after: OffsetDateTime,
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
            .field("signer_not_after", &self.signer_not_after)
            .finish_non_exhaustive()
    }
}

fn material(e: impl std::fmt::Display) -> CaError {
    CaError::Material(e.to_string())
}

fn to_time(d: Duration) -> time::Duration {
    // Every duration that reaches here is bounded by MAX_TTL_LIMIT.
    time::Duration::try_from(d).unwrap_or(time::Duration::ZERO)
}

/// A certificate's DER and the parts the checks need.
struct ParsedCa {
    der: Vec<u8>,
    spki: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    is_ca: bool,
    can_sign_certs: bool,
    self_issued: bool,
    subject: String,
}

fn parse_ca_cert(pem_text: &str, what: &str) -> Result<ParsedCa, CaError> {
    use x509_parser::prelude::*;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .map_err(|e| CaError::Material(format!("{what}: not a PEM certificate: {e}")))?;
    let (_, x) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| CaError::Material(format!("{what}: bad certificate: {e}")))?;
    let at = |t: ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|e| CaError::Material(format!("{what}: validity out of range: {e}")))
    };
    let is_ca = matches!(x.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let can_sign_certs = match x.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    Ok(ParsedCa {
        spki: x.tbs_certificate.subject_pki.raw.to_vec(),
        not_before: at(x.validity().not_before)?,
        not_after: at(x.validity().not_after)?,
        is_ca,
        can_sign_certs,
        self_issued: x.subject().as_raw() == x.issuer().as_raw(),
        subject: x.subject().to_string(),
        der: pem.contents.clone(),
    })
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
        params.serial_number = Some(SerialNumber::from_slice(&pkix::random_serial()));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let (not_before, not_after) = (params.not_before, params.not_after);
        let cert = params.self_signed(&key).map_err(material)?;
        let pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Self::with_issuer(issuer, vec![pem], (not_before, not_after), trust_domain)
    }

    /// A CA from a PEM certificate and key; `chain_pem` is the rest of its
    /// chain up to the root (empty when the certificate is the root).
    ///
    /// Refused, with a sentence saying which: a key that is not the
    /// certificate's, a certificate that is not a CA (basic constraints) or
    /// may not sign certificates (key usage), a chain in which a certificate
    /// is not signed by the next one, or a chain that does not end in a
    /// self-signed root. An expired certificate is accepted here (and
    /// logged) but issues nothing until replaced.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &[String],
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Material(format!("the CA key: {e}")))?;
        let ca = parse_ca_cert(cert_pem, "the CA certificate")?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != ca.spki {
            return Err(CaError::Material(format!(
                "the CA key does not belong to the CA certificate ({}): check --ca-cert and --ca-key",
                ca.subject
            )));
        }
        if !ca.is_ca || !ca.can_sign_certs {
            return Err(CaError::Material(format!(
                "the CA certificate ({}) is not a CA certificate (basic constraints CA:TRUE \
                 and key usage keyCertSign are required)",
                ca.subject
            )));
        }
        let mut parsed = vec![ca];
        for (i, pem) in chain_pem.iter().enumerate() {
            parsed.push(parse_ca_cert(pem, &format!("chain certificate {}", i + 1))?);
        }
        for pair in parsed.windows(2) {
            let (child, parent) = (&pair[0], &pair[1]);
            pkix::verify_signed_by(&child.der, &parent.spki).map_err(|e| {
                CaError::Material(format!(
                    "the CA chain does not verify: {} is not signed by {} ({e})",
                    child.subject, parent.subject
                ))
            })?;
            if !parent.is_ca {
                return Err(CaError::Material(format!(
                    "the CA chain does not verify: {} is not a CA",
                    parent.subject
                )));
            }
        }
        let top = parsed
            .last()
            .ok_or_else(|| CaError::Material("empty chain".into()))?;
        let root_ok = top.self_issued && pkix::verify_signed_by(&top.der, &top.spki).is_ok();
        if !root_ok {
            return Err(CaError::Material(if chain_pem.is_empty() {
                format!(
                    "the CA certificate ({}) is not a self-signed root: give the rest of its \
                     chain up to the root (--ca-chain)",
                    parsed[0].subject
                )
            } else {
                format!(
                    "the CA chain does not end in a self-signed root ({} is not one)",
                    top.subject
                )
            }));
        }
        let (not_before, not_after) = (parsed[0].not_before, parsed[0].not_after);
        if not_after <= OffsetDateTime::now_utc() {
            tracing::error!(%not_after, "the CA certificate has expired: it will issue nothing");
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(material)?;
        let mut chain = vec![cert_pem.to_string()];
        chain.extend(chain_pem.iter().cloned());
        Self::with_issuer(issuer, chain, (not_before, not_after), trust_domain)
    }

    fn with_issuer(
        issuer: Issuer<'static, KeyPair>,
        chain_pem: Vec<String>,
        (signer_not_before, signer_not_after): (OffsetDateTime, OffsetDateTime),
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        SpiffeId::new(trust_domain, "x", "y")
            .map_err(|_| CaError::Material(format!("bad trust domain {trust_domain:?}")))?;
        Ok(Self {
            issuer,
            chain_pem,
            signer_not_before,
            signer_not_after,
            trust_domain: trust_domain.to_string(),
            max_ttl: Duration::from_secs(24 * 3600),
            default_ttl: Duration::from_secs(24 * 3600),
            backdate: Duration::from_secs(60),
            tokens: TokenPolicy::default(),
        })
    }

    /// Caps the lifetime of issued certificates. Zero, and anything over
    /// [`MAX_TTL_LIMIT`], are refused.
    pub fn max_ttl(mut self, ttl: Duration) -> Result<Self, CaError> {
        if ttl.is_zero() || ttl > MAX_TTL_LIMIT {
            return Err(CaError::Config(format!(
                "max TTL {ttl:?} is out of range: it must be more than 0 and at most 100 years"
            )));
        }
        self.max_ttl = ttl;
        self.default_ttl = self.default_ttl.min(ttl);
        Ok(self)
    }

    /// How far before "now" issued certificates start (default 1 min, for
    /// clock skew between the CA and its peers); at most one day.
    pub fn backdate(mut self, d: Duration) -> Self {
        self.backdate = d.min(Duration::from_secs(24 * 3600));
        self
    }

    /// Sets who may ask for what.
    pub fn tokens(mut self, policy: TokenPolicy) -> Self {
        if matches!(policy, TokenPolicy::AnyIdentity) {
            tracing::warn!(
                trust_domain = %self.trust_domain,
                "DEVELOPMENT MODE: the CA issues any identity of the trust domain to any caller"
            );
        }
        self.tokens = policy;
        self
    }

    /// Whether this CA runs in the development mode that issues any
    /// identity to anyone.
    pub fn allows_any_identity(&self) -> bool {
        matches!(self.tokens, TokenPolicy::AnyIdentity)
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

    /// The validity window of what is issued now with lifetime `ttl`:
    /// backdated for clock skew, and within the signing certificate's.
    fn window(
        &self,
        ttl: Duration,
        backdate: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
        let now = OffsetDateTime::now_utc();
        if now >= self.signer_not_after {
            return Err(CaError::Config(format!(
                "the CA certificate expired at {}: it issues nothing until replaced",
                self.signer_not_after
            )));
        }
        let not_before = (now - to_time(backdate)).max(self.signer_not_before);
        let not_after = now
            .checked_add(to_time(ttl))
            .unwrap_or(self.signer_not_after)
            .min(self.signer_not_after);
        Ok((not_before, not_after))
    }

    /// Issues a TLS serving certificate for the CA itself (DNS names and IPs
    /// as SANs), returned as (chain PEM leaf-first, key PEM). It lasts a
    /// year, or until the signing certificate ends if that is sooner.
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
        params.serial_number = Some(SerialNumber::from_slice(&pkix::random_serial()));
        (params.not_before, params.not_after) = self.window(
            Duration::from_secs(365 * 24 * 3600),
            Duration::from_secs(60),
        )?;
        let cert = params.signed_by(&key, &self.issuer).map_err(material)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }

    /// Signs a workload CSR. `token` is the caller's bearer token, if any.
    ///
    /// The caller is authenticated before the CSR is looked at; then the
    /// CSR must ask for the identity the credential grants.
    pub fn sign(
        &self,
        csr_pem: &str,
        ttl: Option<Duration>,
        token: Option<&str>,
    ) -> Result<Vec<String>, Status> {
        let granted = self.tokens.grant(token)?;
        let csr = pkix::read_csr(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let id = csr
            .spiffe_id()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(allowed) = granted
            && *allowed != id
        {
            return Err(Status::permission_denied(format!(
                "this token may request {allowed}, not {id}"
            )));
        }
        if id.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(&csr.public_key_info).map_err(|e| {
                Status::invalid_argument(format!(
                    "bad CSR: unsupported public key ({e}); use ECDSA P-256/P-384 or RSA"
                ))
            })?;
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(self.default_ttl)
            .min(self.max_ttl);
        let (not_before, not_after) = self
            .window(ttl, self.backdate)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let chain = self
            .issue(&id, public_key, not_before, not_after)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(%id, ?ttl, %not_after, "issued workload certificate");
        Ok(chain)
    }

    /// Issues a workload certificate for `id` and `public_key` with the given
    /// validity, without any policy check (for tools and tests, e.g. to make
    /// an expired certificate); NotAfter is still capped at the signing
    /// certificate's. Returns the chain, PEM, leaf first.
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
        params.serial_number = Some(SerialNumber::from_slice(&pkix::random_serial()));
        params.not_before = not_before;
        params.not_after = not_after.min(self.signer_not_after);
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
