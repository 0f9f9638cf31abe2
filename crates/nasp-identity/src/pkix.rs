//! Signed X.509 structures — certificates and certificate signing requests —
//! checked with this build's crypto provider, and CSRs read the way Go's
//! `crypto/x509` (and so istiod) reads them.
//!
//! Both shapes are `SEQUENCE { tbs, signatureAlgorithm, signature }`; the
//! signature is verified by the provider's algorithm whose signature and
//! public-key algorithm identifiers match the structure's byte for byte, so
//! ECDSA on any curve the provider knows, RSA PKCS#1 v1.5, RSA-PSS (with the
//! standard parameters) and Ed25519 are all covered, and anything else is
//! refused by name rather than guessed at.
//!
//! Invariants: nothing here panics on hostile input; every length is checked
//! against the bytes actually present.

use rustls_pki_types::SignatureVerificationAlgorithm;
use x509_parser::prelude::*;

use crate::{Error, SpiffeId};

/// One DER element: its tag, its content, and the whole encoding.
#[derive(Clone, Copy, Debug)]
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
}

/// Reads one DER element from the start of `input`; returns it and the rest.
fn tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), Error> {
    let bad = |what: &str| Error::Certificate(format!("malformed DER: {what}"));
    let (&tag, rest) = input.split_first().ok_or_else(|| bad("empty input"))?;
    if tag & 0x1f == 0x1f {
        return Err(bad("multi-byte tags are not used in X.509"));
    }
    let (&first, rest) = rest.split_first().ok_or_else(|| bad("missing length"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad("unsupported length"));
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return Err(bad("length past the end of the input"));
    }
    let header = input.len() - rest.len();
    let (content, after) = rest.split_at(len);
    Ok((
        Tlv {
            tag,
            content,
            whole: &input[..header + len],
        },
        after,
    ))
}

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;

/// The three parts of a signed structure.
struct Signed<'a> {
    /// The signed bytes (the whole `tbs` element).
    tbs: &'a [u8],
    /// The content of the signature `AlgorithmIdentifier`.
    algorithm: &'a [u8],
    /// The signature bits.
    signature: &'a [u8],
}

fn bit_string(t: Tlv<'_>) -> Result<&[u8], Error> {
    match t.content.split_first() {
        Some((0, bits)) if t.tag == BIT_STRING => Ok(bits),
        _ => Err(Error::Certificate(
            "malformed DER: expected a BIT STRING without unused bits".into(),
        )),
    }
}

fn signed(der: &[u8]) -> Result<Signed<'_>, Error> {
    let (outer, trailing) = tlv(der)?;
    if outer.tag != SEQUENCE || !trailing.is_empty() {
        return Err(Error::Certificate(
            "malformed DER: a signed structure is one SEQUENCE".into(),
        ));
    }
    let (tbs, rest) = tlv(outer.content)?;
    let (alg, rest) = tlv(rest)?;
    let (sig, rest) = tlv(rest)?;
    if tbs.tag != SEQUENCE || alg.tag != SEQUENCE || !rest.is_empty() {
        return Err(Error::Certificate(
            "malformed DER: expected tbs, algorithm and signature".into(),
        ));
    }
    Ok(Signed {
        tbs: tbs.whole,
        algorithm: alg.content,
        signature: bit_string(sig)?,
    })
}

/// A SubjectPublicKeyInfo split into its algorithm (content of the
/// `AlgorithmIdentifier`) and its key bits.
fn spki_parts(spki_der: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let (outer, trailing) = tlv(spki_der)?;
    if outer.tag != SEQUENCE || !trailing.is_empty() {
        return Err(Error::Certificate("malformed SubjectPublicKeyInfo".into()));
    }
    let (alg, rest) = tlv(outer.content)?;
    let (key, rest) = tlv(rest)?;
    if alg.tag != SEQUENCE || !rest.is_empty() {
        return Err(Error::Certificate("malformed SubjectPublicKeyInfo".into()));
    }
    Ok((alg.content, bit_string(key)?))
}

/// A readable name for an algorithm identifier's OID (for error messages).
fn algorithm_name(alg_content: &[u8]) -> String {
    const NAMES: &[(&[u8], &str)] = &[
        (b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0a", "RSASSA-PSS"),
        (
            b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0b",
            "sha256WithRSAEncryption",
        ),
        (
            b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x05",
            "sha1WithRSAEncryption",
        ),
        (b"\x2a\x86\x48\xce\x3d\x04\x03\x02", "ecdsa-with-SHA256"),
        (b"\x2a\x86\x48\xce\x3d\x04\x03\x03", "ecdsa-with-SHA384"),
        (b"\x2a\x86\x48\xce\x3d\x04\x01", "ecdsa-with-SHA1"),
        (b"\x2b\x65\x70", "Ed25519"),
        (b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", "RSA"),
        (b"\x2a\x86\x48\xce\x3d\x02\x01", "EC"),
    ];
    match tlv(alg_content) {
        Ok((oid, _)) if oid.tag == 0x06 => NAMES
            .iter()
            .find(|(o, _)| *o == oid.content)
            .map(|(_, n)| (*n).to_string())
            .unwrap_or_else(|| {
                let hex: String = oid.content.iter().map(|b| format!("{b:02x}")).collect();
                format!("OID {hex}")
            }),
        _ => "a malformed algorithm".into(),
    }
}

/// Verifies that `der` (a certificate or a CSR) is signed by the key of
/// `signer_spki_der` (a DER SubjectPublicKeyInfo).
pub fn verify_signed_by(der: &[u8], signer_spki_der: &[u8]) -> Result<(), Error> {
    let s = signed(der)?;
    let (key_alg, key) = spki_parts(signer_spki_der)?;
    let provider = crate::crypto_provider();
    let candidates: Vec<&'static dyn SignatureVerificationAlgorithm> = provider
        .signature_verification_algorithms
        .all
        .iter()
        .copied()
        .filter(|a| {
            a.signature_alg_id().as_ref() == s.algorithm
                && a.public_key_alg_id().as_ref() == key_alg
        })
        .collect();
    if candidates.is_empty() {
        return Err(Error::Certificate(format!(
            "unsupported signature: {} with a {} key (supported: ECDSA P-256/P-384 with \
             SHA-256/384, RSA PKCS#1 v1.5 and RSA-PSS with SHA-256/384/512 and the \
             standard PSS parameters, Ed25519)",
            algorithm_name(s.algorithm),
            algorithm_name(key_alg),
        )));
    }
    if candidates
        .iter()
        .any(|a| a.verify_signature(key, s.tbs, s.signature).is_ok())
    {
        Ok(())
    } else {
        Err(Error::Certificate(format!(
            "bad signature ({})",
            algorithm_name(s.algorithm)
        )))
    }
}

/// A certificate signing request as a CA needs it.
#[derive(Clone, Debug)]
pub struct CsrInfo {
    /// The requested public key, a DER SubjectPublicKeyInfo: the key type
    /// (and curve) come from here, never from the signature algorithm.
    pub public_key_info: Vec<u8>,
    /// The URI SANs of the request's subjectAltName extension.
    pub uri_sans: Vec<String>,
}

impl CsrInfo {
    /// The one SPIFFE id the request asks for.
    pub fn spiffe_id(&self) -> Result<SpiffeId, Error> {
        match self.uri_sans.as_slice() {
            [one] => one
                .parse()
                .map_err(|e: crate::SpiffeIdError| Error::Certificate(e.to_string())),
            other => Err(Error::Certificate(format!(
                "the CSR must carry exactly one URI SAN (a SPIFFE id), it has {}",
                other.len()
            ))),
        }
    }
}

/// Reads a PEM CSR as Go's `x509.ParseCertificateRequest` +
/// `CheckSignature` do: the signature must verify with the request's own
/// key; the subjectAltName extension is read and every other requested
/// extension is ignored (a CA decides the extensions it issues).
pub fn read_csr(csr_pem: &str) -> Result<CsrInfo, Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| Error::Certificate(format!("bad CSR PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(Error::Certificate(format!(
            "expected a CERTIFICATE REQUEST, found {:?}",
            pem.label
        )));
    }
    read_csr_der(&pem.contents)
}

/// [`read_csr`] on DER.
pub fn read_csr_der(der: &[u8]) -> Result<CsrInfo, Error> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| Error::Certificate(format!("bad CSR: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Certificate("bad CSR: trailing bytes".into()));
    }
    let spki = csr.certification_request_info.subject_pki.raw;
    verify_signed_by(der, spki).map_err(|e| Error::Certificate(format!("CSR: {e}")))?;
    let mut uri_sans = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uri_sans.push((*u).to_string());
                    }
                }
            }
        }
    }
    Ok(CsrInfo {
        public_key_info: spki.to_vec(),
        uri_sans,
    })
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn cert_public_key_info(cert_der: &[u8]) -> Result<Vec<u8>, Error> {
    let (_, x) = X509Certificate::from_der(cert_der)
        .map_err(|e| Error::Certificate(format!("bad certificate: {e}")))?;
    Ok(x.tbs_certificate.subject_pki.raw.to_vec())
}

/// A random 128-bit serial number, as istiod's CA draws them (a positive
/// DER INTEGER; rcgen adds the leading zero byte when the top bit is set).
pub fn random_serial() -> [u8; 16] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_garbage_der_is_an_error_not_a_panic() {
        for input in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x03\x30\x01",
            b"\x1f\x00",
            b"\x30\x00",
        ] {
            assert!(verify_signed_by(input, input).is_err(), "{input:?}");
            assert!(read_csr_der(input).is_err(), "{input:?}");
        }
    }

    #[test]
    fn a_csr_from_rcgen_verifies_and_a_flipped_bit_does_not() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let bundle = crate::keys::generate_csr(&id, crate::KeyAlgorithm::EcdsaP256).expect("csr");
        let info = read_csr(&bundle.csr_pem).expect("reads");
        assert_eq!(info.spiffe_id().expect("id"), id);
        let (_, pem) = x509_parser::pem::parse_x509_pem(bundle.csr_pem.as_bytes()).expect("pem");
        let mut der = pem.contents.clone();
        let last = der.len() - 1;
        der[last] ^= 1;
        let e = read_csr_der(&der).expect_err("tampered");
        assert!(e.to_string().contains("bad signature"), "{e}");
    }
}
