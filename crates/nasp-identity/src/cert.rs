//! A workload's certificate: chain, key and trust roots, with what nasp
//! needs to know about them (identity, validity).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

use crate::{Error, SpiffeId};

/// File names of Istio's mounted-certificate layout.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Private key file.
pub const KEY_FILE: &str = "key.pem";
/// Root certificate file.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// A certificate chain (leaf first), its private key and the trust roots.
pub struct WorkloadCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    id: Option<SpiffeId>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Reads every certificate of a PEM text.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| Error::Certificate(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Certificate("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, SEC1 or PKCS#1) from PEM.
pub fn pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| Error::Certificate(format!("bad PEM private key: {e}")))
}

/// PEM text of a certificate.
pub fn cert_pem(cert: &CertificateDer<'_>) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// Adds the roots of `more` that `into` does not have yet, in order.
pub fn merge_roots(
    into: &mut Vec<CertificateDer<'static>>,
    more: impl IntoIterator<Item = CertificateDer<'static>>,
) {
    for r in more {
        if !into.contains(&r) {
            into.push(r);
        }
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Certificate(format!("bad certificate: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                out.push((*u).to_string());
            }
        }
    }
    Ok(out)
}

/// The SPIFFE id of a certificate: its one `spiffe://` URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let uris: Vec<String> = uri_sans(cert)?
        .into_iter()
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::SpiffeIdError| Error::Certificate(e.to_string())),
        [] => Err(Error::Certificate(
            "the certificate has no SPIFFE id".into(),
        )),
        _ => Err(Error::Certificate(
            "the certificate has more than one SPIFFE id".into(),
        )),
    }
}

/// Validity of a certificate as (not before, not after).
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), Error> {
    let (_, x) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Certificate(format!("bad certificate: {e}")))?;
    let t = |asn: ASN1Time| {
        let secs = asn.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((t(x.validity().not_before), t(x.validity().not_after)))
}

impl WorkloadCert {
    /// A bundle from parts; the leaf must carry at most one SPIFFE id.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Certificate("empty certificate chain".into()))?;
        let (not_before, not_after) = validity(leaf)?;
        let id = spiffe_id_of(leaf).ok();
        Ok(Self {
            chain,
            key,
            roots,
            id,
            not_before,
            not_after,
        })
    }

    /// Reads Istio's layout (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| Error::Io(format!("{}: {e}", dir.join(name).display())))
        };
        let chain = pem_certs(&read(CERT_CHAIN_FILE)?)?;
        let key = pem_key(&read(KEY_FILE)?)?;
        let roots = pem_certs(&read(ROOT_CERT_FILE)?)?;
        Self::new(chain, key, roots)
    }

    /// Writes Istio's layout into `dir` (created if missing; the key file is
    /// made readable by its owner only).
    pub fn write_dir(&self, dir: &Path, key_pem: &str) -> Result<(), Error> {
        let io = |e: std::io::Error, p: &Path| Error::Io(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
        let chain: String = self.chain.iter().map(cert_pem).collect();
        let roots: String = self.roots.iter().map(cert_pem).collect();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| io(e, &p))
        };
        write(CERT_CHAIN_FILE, &chain)?;
        write(ROOT_CERT_FILE, &roots)?;
        write(KEY_FILE, key_pem)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.join(KEY_FILE);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io(e, &p))?;
        }
        Ok(())
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The trust roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The leaf's SPIFFE id, if it has one.
    pub fn id(&self) -> Option<&SpiffeId> {
        self.id.as_ref()
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether the leaf is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    /// When to renew: `fraction` of the lifetime after `not_before`.
    pub fn renew_at(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let e = pem_certs(b"not a certificate").unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = pem_key(b"nope").unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
    }
}
