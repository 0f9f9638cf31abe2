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
    received: SystemTime,
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

/// Checks that `key` is the private half of the leaf's public key (as
/// rustls compares them: by SubjectPublicKeyInfo bytes).
pub fn keys_match(leaf: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<(), Error> {
    let provider = crate::crypto_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| Error::Certificate(format!("unusable private key: {e}")))?;
    let public = signing.public_key().ok_or_else(|| {
        Error::Certificate("cannot derive the public key of the private key".into())
    })?;
    let leaf_spki = crate::pkix::cert_public_key_info(leaf.as_ref())?;
    if public.as_ref() == leaf_spki.as_slice() {
        Ok(())
    } else {
        Err(Error::Certificate(
            "the private key does not belong to the certificate".into(),
        ))
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same
/// directory, flushed, then renamed over `path`, so a reader (a workload
/// polling the directory) sees the old file or the new one, never half of
/// one. `mode` is set when the file is created (no window in which a key is
/// readable by others).
pub fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write as _;
    let io = |e: std::io::Error, p: &Path| Error::Io(format!("{}: {e}", p.display()));
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp).map_err(|e| io(e, &tmp))?;
        f.write_all(text).map_err(|e| io(e, &tmp))?;
        f.sync_all().map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, path).map_err(|e| io(e, path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl WorkloadCert {
    /// A bundle from parts; the leaf must carry at most one SPIFFE id and
    /// `key` must be its private key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Certificate("empty certificate chain".into()))?;
        keys_match(leaf, &key)?;
        let (not_before, not_after) = validity(leaf)?;
        let id = spiffe_id_of(leaf).ok();
        Ok(Self {
            chain,
            key,
            roots,
            id,
            not_before,
            not_after,
            received: SystemTime::now(),
        })
    }

    /// The same certificate and key with other trust roots (a rotated root
    /// file); the time it was received is kept, so renewal does not move.
    pub fn with_roots(&self, roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots,
            id: self.id.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            received: self.received,
        }
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

    /// Writes Istio's layout into `dir` (created if missing). Each file is
    /// replaced atomically; `key.pem` is created readable by its owner only.
    pub fn write_dir(&self, dir: &Path, key_pem: &str) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
        let chain: String = self.chain.iter().map(cert_pem).collect();
        let roots: String = self.roots.iter().map(cert_pem).collect();
        // The key first: a reader that sees the new chain finds its key.
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CERT_CHAIN_FILE), chain.as_bytes(), 0o644)?;
        write_atomic(&dir.join(ROOT_CERT_FILE), roots.as_bytes(), 0o644)?;
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

    /// When this certificate was received (read or issued).
    pub fn received(&self) -> SystemTime {
        self.received
    }

    /// When to renew, as istio-agent's secret cache decides it: the
    /// lifetime is measured from when the certificate was *received* (not
    /// from its NotBefore, which a CA backdates for clock skew), and renewal
    /// falls `fraction` of the way through it, spread by `jitter` (a
    /// fraction of that grace period, e.g. 0.01 = ±1 %). `jitter_sample` is
    /// in -1..=1. Never before `received + floor`, so a certificate that is
    /// short-lived or already expired on arrival is not renewed back to back.
    pub fn renew_at(
        &self,
        fraction: f64,
        jitter: f64,
        jitter_sample: f64,
        floor: Duration,
    ) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let spread = if jitter.is_finite() && jitter_sample.is_finite() {
            (jitter.clamp(0.0, 1.0) * jitter_sample.clamp(-1.0, 1.0)).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        // Istio: renew `grace` before expiry, grace = (1 - fraction) of the
        // lifetime (its ratio is the part *left*; ours the part *used*, the
        // same at the default 0.5), with the jitter applied to the grace.
        let grace = life.mul_f64(((1.0 - fraction) * (1.0 + spread)).clamp(0.0, 1.0));
        let at = self.not_after.checked_sub(grace).unwrap_or(self.received);
        at.max(self.received + floor)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `id` valid from `nb` to `na`, with its
    /// key (PKCS#8).
    pub(crate) fn self_signed(
        id: &str,
        nb: SystemTime,
        na: SystemTime,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_string()).expect("ia5"),
        )];
        p.not_before = nb.into();
        p.not_after = na.into();
        let cert = p.self_signed(&key).expect("cert");
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

    #[test]
    fn renewal_is_measured_from_receipt_not_from_a_backdated_not_before() {
        let now = SystemTime::now();
        // Backdated a minute, lasting 30 s from now: the lifetime that
        // counts is the 30 s this workload can use.
        let (c, k) = self_signed(
            WEB,
            now - Duration::from_secs(60),
            now + Duration::from_secs(30),
        );
        let cert = WorkloadCert::new(vec![c], k, vec![]).expect("cert");
        let floor = Duration::from_secs(1);
        let mid = cert.renew_at(0.5, 0.0, 0.0, floor);
        let from_receipt = mid.duration_since(cert.received()).expect("after receipt");
        assert!(
            (Duration::from_secs(14)..=Duration::from_secs(16)).contains(&from_receipt),
            "half of the 30 s left: {from_receipt:?}"
        );
        // ±1 % jitter of the grace period moves it by at most 0.15 s.
        for sample in [-1.0, 1.0] {
            let at = cert.renew_at(0.5, 0.01, sample, floor);
            let d = at.duration_since(mid).unwrap_or_else(|e| e.duration());
            assert!(d <= Duration::from_millis(160), "{sample}: {d:?}");
            assert!(d >= Duration::from_millis(140), "{sample}: {d:?}");
        }
    }

    #[test]
    fn an_expired_or_tiny_certificate_is_not_renewed_back_to_back() {
        let now = SystemTime::now();
        let (c, k) = self_signed(
            WEB,
            now - Duration::from_secs(120),
            now - Duration::from_secs(60),
        );
        let cert = WorkloadCert::new(vec![c], k, vec![]).expect("cert");
        let floor = Duration::from_secs(2);
        let at = cert.renew_at(0.5, 0.01, 1.0, floor);
        assert_eq!(at, cert.received() + floor, "the floor holds");
        // Hostile numbers neither panic nor skip the floor.
        for (f, j) in [(f64::NAN, f64::NAN), (f64::INFINITY, -5.0), (-1.0, 2.0)] {
            assert!(cert.renew_at(f, j, f, floor) >= cert.received() + floor);
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let now = SystemTime::now();
        let (c, _) = self_signed(WEB, now, now + Duration::from_secs(60));
        let (_, other_key) = self_signed(WEB, now, now + Duration::from_secs(60));
        let e = WorkloadCert::new(vec![c.clone()], other_key.clone_key(), vec![]).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        // The same through mounted files.
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(CERT_CHAIN_FILE), cert_pem(&c)).expect("write");
        std::fs::write(dir.path().join(ROOT_CERT_FILE), cert_pem(&c)).expect("write");
        let key_pem = ::pem::encode(&::pem::Pem::new(
            "PRIVATE KEY",
            other_key.secret_der().to_vec(),
        ));
        std::fs::write(dir.path().join(KEY_FILE), key_pem).expect("write");
        let e = WorkloadCert::from_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
    }

    #[test]
    fn the_istio_layout_is_replaced_atomically_with_a_private_key() {
        let now = SystemTime::now();
        let dir = tempfile::tempdir().expect("tmp");
        let write = || {
            let (c, k) = self_signed(WEB, now, now + Duration::from_secs(60));
            let pem = ::pem::encode(&::pem::Pem::new("PRIVATE KEY", k.secret_der().to_vec()));
            let cert = WorkloadCert::new(vec![c.clone()], k, vec![c.clone()]).expect("cert");
            cert.write_dir(dir.path(), &pem).expect("write");
            c
        };
        let first = write();
        // A reader that opened the old chain keeps reading the old chain,
        // whole, while a new one is written (a rename, not an overwrite).
        let mut old = std::fs::File::open(dir.path().join(CERT_CHAIN_FILE)).expect("open");
        let second = write();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut old, &mut text).expect("read");
        assert_eq!(text, cert_pem(&first));
        let now_on_disk = std::fs::read_to_string(dir.path().join(CERT_CHAIN_FILE)).expect("read");
        assert_eq!(now_on_disk, cert_pem(&second));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        WorkloadCert::from_dir(dir.path()).expect("reads back");
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let e = pem_certs(b"not a certificate").unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = pem_key(b"nope").unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
    }
}
