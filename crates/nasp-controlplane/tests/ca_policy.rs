//! The embedded CA as istiod behaves: authorization before issuing, CSRs as
//! Go's x509 reads them (judged by OpenSSL-made requests), validity within
//! the signer's, start-up checks of a given CA, serial numbers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, TokenPolicy};
use nasp_identity::cert::{cert_pem, pem_certs, validity};
use nasp_identity::{CaClient, CaClientConfig, KeyAlgorithm, SpiffeId, keys};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const ISTIOD: &str = "spiffe://cluster.local/ns/istio-system/sa/istiod";

fn id(s: &str) -> SpiffeId {
    s.parse().expect("spiffe id")
}

fn csr(who: &str) -> String {
    keys::generate_csr(&id(who), KeyAlgorithm::EcdsaP256)
        .expect("csr")
        .csr_pem
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CSR made by OpenSSL with `key_args` for the key and `req_args` extra.
fn openssl_csr(dir: &Path, key: &str, req_args: &[&str]) -> String {
    let mut args = vec![
        "req",
        "-new",
        "-key",
        key,
        "-subj",
        "/",
        "-addext",
        "subjectAltName=critical,URI:spiffe://cluster.local/ns/demo/sa/web",
        "-out",
        "req.csr",
    ];
    args.extend_from_slice(req_args);
    openssl(dir, &args);
    std::fs::read_to_string(dir.join("req.csr")).expect("csr")
}

fn code(r: Result<Vec<String>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

// ---- 1. authorization ------------------------------------------------------

#[test]
fn without_a_credential_nothing_is_issued_and_the_csr_is_not_read_first() {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    // The default grants nothing: not istiod's identity, not any other.
    for who in [ISTIOD, WEB] {
        let (c, m) = code(ca.sign(&csr(who), None, None));
        assert_eq!(c, Code::Unauthenticated, "{who}: {m}");
    }
    // A garbage CSR from an anonymous caller is refused as unauthenticated,
    // not parsed (and so not answered with InvalidArgument).
    let (c, _) = code(ca.sign("garbage", None, None));
    assert_eq!(c, Code::Unauthenticated);
    let (c, _) = code(ca.sign("garbage", None, Some("unknown-token")));
    assert_eq!(c, Code::Unauthenticated);
}

#[test]
fn a_token_grants_exactly_its_identity() {
    let policy = TokenPolicy::from_text(&format!("tok-web {WEB}\n")).expect("policy");
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(policy);
    assert_eq!(code(ca.sign(&csr(WEB), None, Some("tok-web"))).0, Code::Ok);
    let (c, m) = code(ca.sign(&csr(ISTIOD), None, Some("tok-web")));
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("istiod"), "{m}");
    // Garbage with a valid token is now looked at, and is invalid.
    assert_eq!(
        code(ca.sign("garbage", None, Some("tok-web"))).0,
        Code::InvalidArgument
    );
}

#[test]
fn a_duplicated_token_line_is_an_error() {
    let e = TokenPolicy::from_text(&format!("t {WEB}\n# comment\nt {ISTIOD}\n")).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("line 3") && m.contains("line 1"),
        "names both lines: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_mode_issues_any_identity_on_loopback() {
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    assert!(ca.allows_any_identity());
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0")
        .await
        .expect("bind");
    let cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: None,
        },
    )
    .expect("loopback is allowed");
    let mut cfg = CaClientConfig::new(
        cp.addr().to_string(),
        pem_certs(cp.root_pem().as_bytes()).expect("root"),
    );
    cfg.retries = 0;
    let chain = CaClient::new(cfg)
        .expect("client")
        .sign(&csr(WEB), Duration::from_secs(600))
        .await
        .expect("issued");
    assert_eq!(chain.len(), 2);
}

// ---- 2. CSRs as Go reads them -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p384_key_signed_with_sha256_gets_a_p384_certificate_openssl_decodes() {
    let dir = tempfile::tempdir().expect("tmp");
    openssl(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            "key.pem",
        ],
    );
    // ecdsa-with-SHA256 on a P-384 key, plus a subjectKeyIdentifier the CA
    // must ignore rather than refuse.
    let req = openssl_csr(
        dir.path(),
        "key.pem",
        &["-sha256", "-addext", "subjectKeyIdentifier=hash"],
    );
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let root = ca.root_pem().to_string();
    let chain = ca
        .sign(&req, Some(Duration::from_secs(600)), None)
        .expect("issued");
    std::fs::write(dir.path().join("leaf.pem"), &chain[0]).expect("write");
    std::fs::write(dir.path().join("root.pem"), root).expect("write");
    let text = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(text.contains("secp384r1"), "the key's own curve: {text}");
    assert!(text.contains(WEB), "{text}");
    openssl(dir.path(), &["verify", "-CAfile", "root.pem", "leaf.pem"]);
    // The certificate carries the request's key, as openssl derives it.
    let cert_key = openssl(
        dir.path(),
        &["x509", "-in", "leaf.pem", "-noout", "-pubkey"],
    );
    let own_key = openssl(dir.path(), &["pkey", "-in", "key.pem", "-pubout"]);
    assert_eq!(cert_key, own_key);
}

#[test]
fn rsa_pss_requests_are_verified_or_refused_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    openssl(dir.path(), &["genrsa", "-out", "rsa.pem", "2048"]);
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    // PSS with the standard parameters (salt = digest length): verified.
    let standard = openssl_csr(
        dir.path(),
        "rsa.pem",
        &[
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
        ],
    );
    let (c, m) = code(ca.sign(&standard, None, None));
    assert_eq!(c, Code::Ok, "{m}");
    // Another salt length: refused, saying what it is.
    let odd = openssl_csr(
        dir.path(),
        "rsa.pem",
        &[
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:max",
        ],
    );
    let (c, m) = code(ca.sign(&odd, None, None));
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("RSASSA-PSS"), "{m}");
    // A standard PSS request whose signature was tampered with: refused.
    let (_, pem) = x509_parser::pem::parse_x509_pem(standard.as_bytes()).expect("pem");
    let mut der = pem.contents.clone();
    let last = der.len() - 1;
    der[last] ^= 0x55;
    let tampered = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    let (c, m) = code(ca.sign(&tampered, None, None));
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("bad signature"), "{m}");
}

// ---- 3. validity within the issuer's -------------------------------------------

/// A root CA (PEM cert, PEM key) valid from `nb` to `na`.
fn root_ca(nb: OffsetDateTime, na: OffsetDateTime) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "short-lived root");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = nb;
    p.not_after = na;
    let cert = p.self_signed(&key).expect("root");
    (cert.pem(), key.serialize_pem())
}

#[test]
fn nothing_outlives_the_signing_certificate() {
    let now = OffsetDateTime::now_utc();
    let (cert, key) = root_ca(
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    let ca = CertificateAuthority::from_pem(&cert, &key, &[], "cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let signer_end = validity(&pem_certs(cert.as_bytes()).expect("pem")[0])
        .expect("validity")
        .1;
    let chain = ca
        .sign(&csr(WEB), Some(Duration::from_secs(24 * 3600)), None)
        .expect("issued");
    let leaf_end = validity(&pem_certs(chain[0].as_bytes()).expect("pem")[0])
        .expect("validity")
        .1;
    assert_eq!(leaf_end, signer_end, "24 h asked, clamped to the CA's end");
    // The CA's own serving certificate follows the same rule.
    let (serving, _) = ca.serving_cert(&["localhost"], &[]).expect("serving cert");
    let serving_end = validity(&pem_certs(serving[0].as_bytes()).expect("pem")[0])
        .expect("validity")
        .1;
    assert!(
        serving_end <= signer_end,
        "{serving_end:?} > {signer_end:?}"
    );
}

#[test]
fn an_expired_signer_issues_nothing() {
    let now = OffsetDateTime::now_utc();
    let (cert, key) = root_ca(now - time::Duration::days(2), now - time::Duration::days(1));
    let ca = CertificateAuthority::from_pem(&cert, &key, &[], "cluster.local")
        .expect("an expired CA still loads (and says so in the log)")
        .tokens(TokenPolicy::AnyIdentity);
    let (c, m) = code(ca.sign(&csr(WEB), None, None));
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("expired"), "{m}");
    let e = ca.serving_cert(&["localhost"], &[]).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
}

// ---- 4. start-up checks of a given CA ------------------------------------------

/// A root, an intermediate it signed, and their keys (PEM).
fn root_and_intermediate() -> ((String, String), (String, String)) {
    let root_key = KeyPair::generate().expect("key");
    let mut rp = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "offline root");
    rp.distinguished_name = dn;
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).expect("root");
    let root_pem = root.pem();
    let root_key_pem = root_key.serialize_pem();
    let issuer = Issuer::new(rp, root_key);
    let inter_key = KeyPair::generate().expect("key");
    let mut ip = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "cluster intermediate");
    ip.distinguished_name = dn;
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let inter = ip.signed_by(&inter_key, &issuer).expect("intermediate");
    (
        (root_pem, root_key_pem),
        (inter.pem(), inter_key.serialize_pem()),
    )
}

fn refused(r: Result<CertificateAuthority, nasp_controlplane::ca::CaError>) -> String {
    match r {
        Ok(_) => panic!("the CA was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_given_ca_is_checked_at_start() {
    let ((root, root_key), (inter, inter_key)) = root_and_intermediate();
    // The right pair, and an intermediate with its chain: accepted.
    CertificateAuthority::from_pem(&root, &root_key, &[], "cluster.local").expect("root");
    CertificateAuthority::from_pem(
        &inter,
        &inter_key,
        std::slice::from_ref(&root),
        "cluster.local",
    )
    .expect("intermediate with its chain");
    // A key that is not the certificate's.
    let m = refused(CertificateAuthority::from_pem(
        &root,
        &inter_key,
        &[],
        "cluster.local",
    ));
    assert!(m.contains("does not belong"), "{m}");
    // An intermediate without its chain.
    let m = refused(CertificateAuthority::from_pem(
        &inter,
        &inter_key,
        &[],
        "cluster.local",
    ));
    assert!(m.contains("--ca-chain"), "{m}");
    // An intermediate with somebody else's root.
    let ((other_root, _), _) = root_and_intermediate();
    let m = refused(CertificateAuthority::from_pem(
        &inter,
        &inter_key,
        &[other_root],
        "cluster.local",
    ));
    assert!(m.contains("does not verify"), "{m}");
    // A workload certificate is no CA.
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let bundle = keys::generate_csr(&id(WEB), KeyAlgorithm::EcdsaP256).expect("csr");
    let leaf = ca.sign(&bundle.csr_pem, None, None).expect("leaf");
    let m = refused(CertificateAuthority::from_pem(
        &leaf[0],
        &bundle.key_pem,
        &[ca.root_pem().to_string()],
        "cluster.local",
    ));
    assert!(m.contains("not a CA"), "{m}");
}

#[test]
fn max_ttl_out_of_range_is_refused() {
    for ttl in [Duration::ZERO, Duration::from_secs(u64::MAX / 2)] {
        let e = CertificateAuthority::generate("cluster.local")
            .expect("ca")
            .max_ttl(ttl)
            .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
    // A huge requested lifetime is capped, never an overflow.
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let chain = ca
        .sign(&csr(WEB), Some(Duration::from_secs(u64::MAX)), None)
        .expect("issued");
    let (_, na) = validity(&pem_certs(chain[0].as_bytes()).expect("pem")[0]).expect("validity");
    assert!(na <= SystemTime::now() + Duration::from_secs(24 * 3600 + 5));
}

// ---- 9. serial numbers -------------------------------------------------------

#[test]
fn serials_are_random_even_for_one_key() {
    use x509_parser::prelude::*;
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let req = csr(WEB);
    let serial = |pem: &str| {
        let der = pem_certs(pem.as_bytes()).expect("pem").remove(0);
        let (_, x) = X509Certificate::from_der(der.as_ref()).expect("cert");
        x.raw_serial().to_vec()
    };
    let serials: Vec<Vec<u8>> = (0..4)
        .map(|_| serial(&ca.sign(&req, None, None).expect("issued")[0]))
        .collect();
    for (i, a) in serials.iter().enumerate() {
        assert!(a.len() <= 17, "at most 128 bits plus a sign byte: {a:?}");
        for b in &serials[i + 1..] {
            assert_ne!(a, b, "one key, distinct serials");
        }
    }
    assert_ne!(
        serial(&cert_pem(
            &pem_certs(ca.root_pem().as_bytes()).expect("root")[0]
        )),
        serials[0]
    );
}
