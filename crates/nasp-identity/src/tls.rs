//! rustls glue: serve the current certificate, verify SPIFFE peers.
//!
//! Both verifiers check the peer's chain against the trust roots of the
//! *current* workload certificate (so a root rotation is followed), then the
//! peer's identity:
//! - [`SpiffeClientVerifier`] (server side): the client's SPIFFE id must be
//!   in the mesh trust domain, and in the allow-list when one is given;
//! - [`SanServerVerifier`] (client side): the server's certificate must carry
//!   one of the SANs xDS expects for the destination (a SPIFFE URI, or a DNS
//!   name); there is no host-name check, as with Istio sidecars.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::cert::{spiffe_id_of, uri_sans};
use crate::{Error, SpiffeId, WorkloadCert, crypto_provider};

type CertWatch = watch::Receiver<Option<Arc<WorkloadCert>>>;

/// ALPN Istio sidecars offer for HTTP/2 over mTLS.
pub const ALPN_ISTIO_H2: &[&[u8]] = &[b"istio-h2", b"istio", b"h2"];

/// Serves whatever certificate the watch holds now, to clients and servers.
#[derive(Debug)]
pub struct CertResolver {
    certs: CertWatch,
    provider: Arc<CryptoProvider>,
    /// The certificate the cached key was made from. Holding the `Arc`
    /// (not its address) means a rotated-away certificate can never be
    /// mistaken for a new one that happens to reuse its memory.
    cached: Mutex<Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>>,
}

impl CertResolver {
    /// A resolver following `certs`.
    pub fn new(certs: CertWatch) -> Self {
        Self {
            certs,
            provider: crypto_provider(),
            cached: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.certs.borrow().clone()?;
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((c, k)) = cached.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Some(k.clone());
        }
        let key = match self
            .provider
            .key_provider
            .load_private_key(cert.key().clone_key())
        {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("the workload key cannot sign: {e}");
                return None;
            }
        };
        let ck = Arc::new(CertifiedKey::new(cert.chain().to_vec(), key));
        *cached = Some((cert, ck.clone()));
        Some(ck)
    }
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.certs.borrow().is_some()
    }
}

/// Checks `end_entity` + `intermediates` against the current roots.
fn verify_chain(
    certs: &CertWatch,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), TlsError> {
    let current = certs.borrow().clone().ok_or_else(|| {
        TlsError::General("no workload certificate (and so no trust roots) yet".into())
    })?;
    let anchors: Vec<_> = current
        .roots()
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err(TlsError::General("no usable trust root".into()));
    }
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
        TlsError::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(webpki_error)
}

fn webpki_error(e: webpki::Error) -> TlsError {
    use rustls::CertificateError as C;
    let c = match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    };
    TlsError::InvalidCertificate(c)
}

fn identity_error(msg: String) -> TlsError {
    TlsError::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
        .pipe_log(msg)
}

trait PipeLog {
    fn pipe_log(self, msg: String) -> Self;
}

impl PipeLog for TlsError {
    fn pipe_log(self, msg: String) -> Self {
        tracing::warn!("peer rejected: {msg}");
        self
    }
}

/// The handshake-signature checks of a verifier: the crypto provider's.
macro_rules! provider_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// The trust domains a mesh accepts peers from: its own and the aliases
/// it was given (Istio's `trustDomainAliases`, used while a mesh migrates
/// from one trust domain to another).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustDomains {
    /// The mesh trust domain.
    pub primary: String,
    /// Other trust domains whose workloads are accepted as peers.
    pub aliases: Vec<String>,
}

impl TrustDomains {
    /// `primary` with no aliases.
    pub fn new(primary: impl Into<String>) -> Self {
        Self {
            primary: primary.into(),
            aliases: Vec::new(),
        }
    }

    /// Adds aliases.
    pub fn aliases(mut self, aliases: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.aliases.extend(aliases.into_iter().map(Into::into));
        self
    }

    /// Whether `td` is the primary or an alias (trust domains are compared
    /// as SPIFFE does: they are lower case by construction).
    pub fn contains(&self, td: &str) -> bool {
        self.primary == td || self.aliases.iter().any(|a| a == td)
    }
}

impl From<&str> for TrustDomains {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for TrustDomains {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// Server-side verification of client certificates: mesh trust domain (or
/// an alias) and optional allow-list of SPIFFE ids.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    certs: CertWatch,
    provider: Arc<CryptoProvider>,
    trust: TrustDomains,
    allow: Option<Vec<SpiffeId>>,
}

impl SpiffeClientVerifier {
    /// Accepts any SPIFFE id of `trust` (a trust domain, or
    /// [`TrustDomains`] with aliases), or only those in `allow`.
    pub fn new(
        certs: CertWatch,
        trust: impl Into<TrustDomains>,
        allow: Option<Vec<SpiffeId>>,
    ) -> Self {
        Self {
            certs,
            provider: crypto_provider(),
            trust: trust.into(),
            allow,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        verify_chain(
            &self.certs,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let id = spiffe_id_of(end_entity)
            .map_err(|e| identity_error(format!("client certificate: {e}")))?;
        if !self.trust.contains(id.trust_domain()) {
            return Err(identity_error(format!(
                "client {id} is not in trust domain {} (aliases: {:?})",
                self.trust.primary, self.trust.aliases
            )));
        }
        if let Some(allow) = &self.allow
            && !allow.contains(&id)
        {
            return Err(identity_error(format!("client {id} is not allowed")));
        }
        Ok(ClientCertVerified::assertion())
    }

    provider_signatures!();
}

/// Client-side verification of a server: chain to the mesh roots and one of
/// the expected SANs (SPIFFE URIs or DNS names), as Envoy's
/// `match_typed_subject_alt_names` with exact matchers: URI SANs compare
/// byte for byte (SPIFFE paths are case-sensitive), DNS names without
/// regard to ASCII case; an empty list checks the chain only.
#[derive(Debug)]
pub struct SanServerVerifier {
    certs: CertWatch,
    provider: Arc<CryptoProvider>,
    expected: Vec<String>,
}

impl SanServerVerifier {
    /// Expects the server to carry one of `expected` SANs (`spiffe://…` or
    /// any `scheme://` string is a URI SAN, anything else a DNS name); with
    /// none, any server whose chain verifies is accepted.
    pub fn new(certs: CertWatch, expected: Vec<String>) -> Self {
        Self {
            certs,
            provider: crypto_provider(),
            expected,
        }
    }
}

fn dns_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, x)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push(d.to_ascii_lowercase());
            }
        }
    }
    out
}

impl ServerCertVerifier for SanServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        verify_chain(
            &self.certs,
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if self.expected.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        let uris = uri_sans(end_entity).map_err(|e| identity_error(e.to_string()))?;
        let dns = dns_sans(end_entity);
        let matches = |e: &String| {
            if e.contains("://") {
                uris.iter().any(|u| u == e)
            } else {
                dns.iter().any(|d| d.eq_ignore_ascii_case(e))
            }
        };
        if self.expected.iter().any(matches) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(identity_error(format!(
                "server SANs {uris:?} {dns:?} match none of the expected {:?}",
                self.expected
            )))
        }
    }

    provider_signatures!();
}

/// A server config for mesh mTLS: serves the current certificate and
/// requires a client certificate of the trust domain or one of its aliases
/// (or, narrower, of the allow-list).
pub fn server_config(
    certs: CertWatch,
    trust_domain: impl Into<TrustDomains>,
    allow: Option<Vec<SpiffeId>>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        certs.clone(),
        trust_domain,
        allow,
    ));
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertResolver::new(certs)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A client config for mesh mTLS to a destination whose certificate must
/// carry one of `expected_sans`; presents the current certificate.
pub fn client_config(
    certs: CertWatch,
    expected_sans: Vec<String>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, Error> {
    let verifier = Arc::new(SanServerVerifier::new(certs.clone(), expected_sans));
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CertResolver::new(certs)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_resolver_never_serves_a_rotated_away_certificate() {
        let now = SystemTime::now();
        let make = || {
            let (c, k) = crate::cert::tests::self_signed(
                "spiffe://cluster.local/ns/demo/sa/web",
                now,
                now + Duration::from_secs(60),
            );
            WorkloadCert::new(vec![c], k, vec![]).expect("cert")
        };
        let (tx, rx) = watch::channel(Some(Arc::new(make())));
        let resolver = CertResolver::new(rx);
        // Rotate many times, freeing each old certificate before the next is
        // allocated, so an address-keyed cache would be handed a reused
        // address sooner or later.
        for _ in 0..50 {
            let served = resolver.current().expect("served");
            let expected = tx.borrow().as_ref().expect("cert").chain()[0].clone();
            assert_eq!(
                served.cert[0], expected,
                "the current certificate is served"
            );
            tx.send_replace(None);
            tx.send_replace(Some(Arc::new(make())));
        }
    }
}
