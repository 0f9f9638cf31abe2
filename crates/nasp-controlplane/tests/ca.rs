//! The embedded CA and the identity client against each other, over real
//! TLS gRPC on loopback; `openssl verify` as an outside judge of the chain.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, TokenPolicy};
use nasp_identity::cert::{cert_pem, pem_certs, spiffe_id_of, validity};
use nasp_identity::{CaClient, CaClientConfig, Error, KeyAlgorithm, SpiffeId, keys};

async fn start(ca: CertificateAuthority) -> ControlPlane {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: None,
        },
    )
    .expect("start")
}

fn client(cp: &ControlPlane, tweak: impl FnOnce(&mut CaClientConfig)) -> CaClient {
    let mut cfg = CaClientConfig::new(
        cp.addr().to_string(),
        pem_certs(cp.root_pem().as_bytes()).expect("root"),
    );
    cfg.retries = 0;
    cfg.timeout = Duration::from_secs(5);
    tweak(&mut cfg);
    CaClient::new(cfg).expect("client")
}

/// A CA in development mode: any caller, any identity (the tests below
/// that are about authorization use tokens).
fn dev_ca() -> CertificateAuthority {
    CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity)
}

fn id(s: &str) -> SpiffeId {
    s.parse().expect("spiffe id")
}

fn openssl_verify(
    dir: &Path,
    root_pem: &str,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> (bool, String) {
    std::fs::write(dir.join("root.pem"), root_pem).expect("write root");
    std::fs::write(dir.join("leaf.pem"), cert_pem(&chain[0])).expect("write leaf");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("root.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_a_chain_openssl_accepts() {
    let cp = start(dev_ca()).await;
    let c = client(&cp, |_| {});
    let me = id("spiffe://cluster.local/ns/demo/sa/web");
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let csr = keys::generate_csr(&me, alg).expect("csr");
        let chain = c
            .sign(&csr.csr_pem, Duration::from_secs(3600))
            .await
            .expect("signed");
        assert_eq!(chain.len(), 2, "leaf + root");
        assert_eq!(spiffe_id_of(&chain[0]).expect("id"), me);
        assert_eq!(cert_pem(&chain[1]), cp.root_pem(), "root last");
        let (nb, na) = validity(&chain[0]).expect("validity");
        let life = na.duration_since(nb).expect("ordered");
        assert!(life <= Duration::from_secs(3600 + 61), "{alg:?}: {life:?}");
        let dir = tempfile::tempdir().expect("tmp");
        let (ok, out) = openssl_verify(dir.path(), cp.root_pem(), &chain);
        assert!(ok, "{alg:?}: openssl verify: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_is_capped() {
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .max_ttl(Duration::from_secs(600))
        .expect("ttl")
        .tokens(TokenPolicy::AnyIdentity)
        .backdate(Duration::ZERO);
    let cp = start(ca).await;
    let csr = keys::generate_csr(
        &id("spiffe://cluster.local/ns/a/sa/b"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");
    let chain = client(&cp, |_| {})
        .sign(&csr.csr_pem, Duration::from_secs(30 * 24 * 3600))
        .await
        .expect("signed");
    let (nb, na) = validity(&chain[0]).expect("validity");
    assert!(na.duration_since(nb).expect("ordered") <= Duration::from_secs(601));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_trust_domain_is_refused() {
    let cp = start(dev_ca()).await;
    let csr = keys::generate_csr(
        &id("spiffe://evil.example/ns/a/sa/b"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");
    let err = client(&cp, |_| {})
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    match err {
        Error::Ca { code, message } => {
            assert_eq!(code, "PermissionDenied");
            assert!(message.contains("trust domain"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_csr_is_invalid_argument() {
    let cp = start(dev_ca()).await;
    let err = client(&cp, |_| {})
        .sign(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "InvalidArgument"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bind_identities_and_are_reread_on_every_call() {
    let web = id("spiffe://cluster.local/ns/demo/sa/web");
    let policy = TokenPolicy::from_text("# token id\ntok-web spiffe://cluster.local/ns/demo/sa/web\ntok-db spiffe://cluster.local/ns/demo/sa/db\n").expect("policy");
    let cp = start(
        CertificateAuthority::generate("cluster.local")
            .expect("ca")
            .tokens(policy),
    )
    .await;
    let csr = keys::generate_csr(&web, KeyAlgorithm::EcdsaP256).expect("csr");

    let err = client(&cp, |_| {})
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "Unauthenticated"),
        "no token: {err}"
    );

    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "tok-web\n").expect("token");
    let c = client(&cp, |cfg| {
        cfg.token_file = Some(token.clone());
        cfg.cluster_id = Some("Kubernetes".into());
    });
    c.sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .expect("the right token");

    // The token rotates to one bound to another identity: the same client
    // must send the new one (and so be refused for web).
    std::fs::write(&token, "tok-db\n").expect("token");
    let err = c
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, message } if code == "PermissionDenied" && message.contains("sa/db")),
        "{err}"
    );

    std::fs::write(&token, "unknown\n").expect("token");
    let err = c
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "Unauthenticated"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_itself_is_verified() {
    let cp = start(dev_ca()).await;
    let csr = keys::generate_csr(
        &id("spiffe://cluster.local/ns/a/sa/b"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");
    // Expecting another name than the CA's certificate carries.
    let err = client(&cp, |c| c.server_name = "istiod.other.svc".into())
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "Unavailable"),
        "{err}"
    );
    // Trusting another root.
    let other = CertificateAuthority::generate("cluster.local").expect("ca");
    let err = client(&cp, |c| {
        c.roots = pem_certs(other.root_pem().as_bytes()).expect("root")
    })
    .sign(&csr.csr_pem, Duration::from_secs(60))
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "Unavailable"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_does_not_hurt_the_ca() {
    use tokio::io::AsyncWriteExt;
    let cp = start(dev_ca()).await;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(cp.addr())
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")
            .await
            .expect("write");
    }
    let csr = keys::generate_csr(
        &id("spiffe://cluster.local/ns/a/sa/b"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");
    client(&cp, |_| {})
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_ca_returns_the_whole_chain() {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    // An offline root and an intermediate it signed; the embedded CA runs
    // with the intermediate only.
    let root_key = KeyPair::generate().expect("key");
    let mut root_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "offline root");
    root_params.distinguished_name = dn;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root_params, root_key);
    let inter_key = KeyPair::generate().expect("key");
    let mut inter_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "cluster intermediate");
    inter_params.distinguished_name = dn;
    inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let inter = inter_params
        .signed_by(&inter_key, &root_issuer)
        .expect("intermediate");

    let ca = CertificateAuthority::from_pem(
        &inter.pem(),
        &inter_key.serialize_pem(),
        &[root.pem()],
        "cluster.local",
    )
    .expect("ca")
    .tokens(TokenPolicy::AnyIdentity);
    assert_eq!(
        ca.root_pem(),
        root.pem(),
        "the root is the end of the chain"
    );
    let cp = start(ca).await;
    let me = id("spiffe://cluster.local/ns/demo/sa/web");
    let csr = keys::generate_csr(&me, KeyAlgorithm::EcdsaP256).expect("csr");
    let chain = client(&cp, |_| {})
        .sign(&csr.csr_pem, Duration::from_secs(600))
        .await
        .expect("signed");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(cert_pem(&chain[2]), root.pem());
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("inter.pem"), cert_pem(&chain[1])).expect("write");
    std::fs::write(dir.path().join("root.pem"), root.pem()).expect("write");
    std::fs::write(dir.path().join("leaf.pem"), cert_pem(&chain[0])).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("root.pem"))
        .arg("-untrusted")
        .arg(dir.path().join("inter.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_merges_the_root_file_with_the_ca_root() {
    use nasp_identity::{RenewalPolicy, SecretManager, Source};
    let cp = start(dev_ca()).await;
    // A second root the workload must also trust (e.g. during a root move).
    let other = CertificateAuthority::generate("cluster.local").expect("ca");
    let dir = tempfile::tempdir().expect("tmp");
    let root_file = dir.path().join("extra-root.pem");
    std::fs::write(&root_file, other.root_pem()).expect("write");
    let mut cfg = CaClientConfig::new(
        cp.addr().to_string(),
        pem_certs(cp.root_pem().as_bytes()).expect("root"),
    );
    cfg.retries = 0;
    let mgr = SecretManager::start(
        Source::Ca {
            client: CaClient::new(cfg).expect("client"),
            id: id("spiffe://cluster.local/ns/demo/sa/web"),
            key: KeyAlgorithm::EcdsaP256,
            ttl: Duration::from_secs(3600),
            root_file: Some(root_file),
        },
        RenewalPolicy::default(),
    );
    let cert = mgr.ready(Duration::from_secs(5)).await.expect("cert");
    let roots: Vec<String> = cert.roots().iter().map(cert_pem).collect();
    assert_eq!(roots.len(), 2, "{roots:?}");
    assert!(
        roots.contains(&other.root_pem().to_string()),
        "the file's root"
    );
    assert!(
        roots.contains(&cp.root_pem().to_string()),
        "the CA response's root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_a_ca_that_is_not_up_yet() {
    // A free port with nothing on it yet: the first attempts are Unavailable.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let ca = dev_ca();
    let root = pem_certs(ca.root_pem().as_bytes()).expect("root");
    let csr = keys::generate_csr(
        &id("spiffe://cluster.local/ns/a/sa/b"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");

    let mut no_retry = CaClientConfig::new(addr.to_string(), root.clone());
    no_retry.retries = 0;
    let err = CaClient::new(no_retry)
        .expect("client")
        .sign(&csr.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Ca { code, .. } if code == "Unavailable"),
        "{err}"
    );

    let mut with_retries = CaClientConfig::new(addr.to_string(), root);
    with_retries.retries = 5; // 100 + 200 + 400 + 800 + 1600 ms of backoff
    let client = CaClient::new(with_retries).expect("client");
    let pending =
        tokio::spawn(async move { client.sign(&csr.csr_pem, Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let _cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: None,
        },
    )
    .expect("start");
    let chain = pending.await.expect("join").expect("signed after retrying");
    assert_eq!(chain.len(), 2);
}
