//! Key pairs and certificate signing requests for a workload.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::PrivateKeyDer;

use crate::{Error, SpiffeId};

/// The key algorithm of a workload certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default, as ztunnel).
    #[default]
    EcdsaP256,
    /// RSA 2048 with SHA-256 (needs the `aws-lc-rs` feature; ring cannot
    /// generate RSA keys).
    Rsa2048,
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "ecdsa" | "ecdsa-p256" | "ec" => Ok(KeyAlgorithm::EcdsaP256),
            "rsa" | "rsa2048" | "rsa-2048" => Ok(KeyAlgorithm::Rsa2048),
            other => Err(Error::Config(format!(
                "unknown key algorithm {other:?} (expected ecdsa or rsa)"
            ))),
        }
    }
}

/// A fresh private key and the CSR carrying `id`.
pub struct CsrBundle {
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The CSR, PEM.
    pub csr_pem: String,
}

impl std::fmt::Debug for CsrBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrBundle")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// Generates a key pair.
pub fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair, Error> {
    let r = match alg {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyAlgorithm::Rsa2048 => rsa_key(),
    };
    r.map_err(|e| Error::Crypto(format!("generating a {alg:?} key: {e}")))
}

#[cfg(feature = "aws-lc-rs")]
fn rsa_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
}

#[cfg(not(feature = "aws-lc-rs"))]
fn rsa_key() -> Result<KeyPair, rcgen::Error> {
    Err(rcgen::Error::KeyGenerationUnavailable)
}

/// A CSR as Istio wants it: empty subject, the SPIFFE id as the only
/// subject alternative name (a URI), marked critical because the subject is
/// empty (RFC 5280 §4.2.1.6).
pub fn generate_csr(id: &SpiffeId, alg: KeyAlgorithm) -> Result<CsrBundle, Error> {
    let key = generate_key(alg)?;
    let csr = csr_for(id, &key)?;
    Ok(CsrBundle {
        key_pem: key.serialize_pem(),
        csr_pem: csr,
    })
}

/// The CSR for `id` signed with `key`.
pub fn csr_for(id: &SpiffeId, key: &KeyPair) -> Result<String, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|e| Error::Crypto(format!("SPIFFE id as IA5 string: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(key)
        .map_err(|e| Error::Crypto(format!("signing the CSR: {e}")))?;
    csr.pem()
        .map_err(|e| Error::Crypto(format!("encoding the CSR: {e}")))
}

/// The private key of `key` for rustls.
pub fn private_key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }

    #[test]
    fn csr_has_empty_subject_and_critical_uri_san() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().expect("id");
        for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
            if alg == KeyAlgorithm::Rsa2048 && !cfg!(feature = "aws-lc-rs") {
                assert!(generate_csr(&id, alg).is_err(), "ring cannot make RSA keys");
                continue;
            }
            let bundle = generate_csr(&id, alg).expect("csr");
            assert!(bundle.key_pem.contains("BEGIN PRIVATE KEY"), "PKCS#8");
            let der = parse(&bundle.csr_pem);
            let (_, csr) = X509CertificationRequest::from_der(&der).expect("csr der");
            csr.verify_signature().expect("self-signed CSR verifies");
            assert_eq!(
                csr.certification_request_info.subject.iter().count(),
                0,
                "{alg:?}: empty subject"
            );
            let exts: Vec<_> = csr.requested_extensions().expect("extensions").collect();
            let san = exts
                .iter()
                .find_map(|e| match e {
                    ParsedExtension::SubjectAlternativeName(s) => Some(s),
                    _ => None,
                })
                .expect("SAN");
            assert_eq!(
                san.general_names,
                vec![GeneralName::URI("spiffe://cluster.local/ns/demo/sa/web")]
            );
            // Criticality is on the raw extension.
            let raw = csr
                .certification_request_info
                .iter_attributes()
                .find_map(|a| match a.parsed_attribute() {
                    ParsedCriAttribute::ExtensionRequest(r) => Some(r),
                    _ => None,
                })
                .expect("extension request");
            let san_ext = raw
                .extensions
                .iter()
                .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
                .expect("SAN ext");
            assert!(san_ext.critical, "{alg:?}: SAN must be critical");
        }
    }
}
