//! gRPC served on a nasp STRICT listener, through real loopback sockets:
//! Python's `grpcio` (PyPI) with TLS client credentials calls the tonic echo
//! service and gets back the SPIFFE id the server verified; without a client
//! certificate it is refused; and a generated tonic client over a nasp mTLS
//! connection (ALPN `istio-h2`) calls the same service.
//!
//! Why the server's certificate carries a DNS SAN here: grpcio (gRPC core)
//! always checks the server's certificate against the target's host name,
//! by DNS and IP SANs only (never URI SANs), and Python's grpcio has no
//! option to replace that check with a SPIFFE one. An Istio workload
//! certificate carries only the URI SAN, so grpcio refuses it whatever the
//! name (`grpcio_refuses_a_workload_certificate_without_a_dns_name` shows
//! it). The server's certificate here therefore carries both: its SPIFFE id
//! (what nasp and Istio peers verify) and the DNS name of the service,
//! signed by the mesh root; grpcio dials 127.0.0.1 with
//! `grpc.ssl_target_name_override` set to that DNS name, which grpcio then
//! uses for the name check and the SNI. The embedded CA issues SPIFFE-only
//! certificates (as istiod does), so the test makes the mesh root itself,
//! loads the embedded CA from it (`CertificateAuthority::from_pem`) for the
//! client's workload certificate, and signs the server's two-SAN
//! certificate with the same root key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::{KeyAlgorithm, WorkloadCert, keys};
use nasp_proto::echo::EchoRequest;
use nasp_proto::echo::echo_client::EchoClient;
use nasp_transport::outbound::ALPN_H2;
use nasp_transport::{
    EchoService, InboundConfig, InboundMode, MeshConnector, MeshListener, istio_sni, serve_grpc,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::service::Routes;

const TRUST_DOMAIN: &str = "cluster.local";
/// The server's SPIFFE id.
const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";
/// The DNS name the server's certificate also carries, for grpcio.
const ECHO_DNS: &str = "echo.demo.svc.cluster.local";
/// The client's SPIFFE id.
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// PEM material: a certificate chain (leaf first) and its key.
struct Pem {
    chain: Vec<String>,
    key: String,
}

impl Pem {
    fn watch(&self, root_pem: &str) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        let chain = self
            .chain
            .iter()
            .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
            .collect();
        let cert = WorkloadCert::new(
            chain,
            pem_key(self.key.as_bytes()).expect("key"),
            pem_certs(root_pem.as_bytes()).expect("root"),
        )
        .expect("cert");
        let (tx, rx) = watch::channel(Some(Arc::new(cert)));
        std::mem::forget(tx);
        rx
    }
}

/// A mesh root, the embedded CA loaded from it, and the root's signer for
/// the one certificate the CA does not issue (SPIFFE id plus DNS name).
struct Mesh {
    root_pem: String,
    ca: CertificateAuthority,
    issuer: Issuer<'static, KeyPair>,
}

impl Mesh {
    fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("root key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, TRUST_DOMAIN);
        dn.push(DnType::CommonName, "grpc interop test root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(1);
        let root_pem = params.self_signed(&key).expect("root").pem();
        let key_pem = key.serialize_pem();
        let ca = CertificateAuthority::from_pem(&root_pem, &key_pem, &[], TRUST_DOMAIN)
            .expect("embedded CA from the root");
        Self {
            root_pem,
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate from the embedded CA: the URI SAN only.
    fn workload(&self, id: &str) -> Pem {
        let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
        let now = OffsetDateTime::now_utc();
        let chain = self
            .ca
            .issue(
                &id.parse().expect("id"),
                &key,
                now - time::Duration::minutes(1),
                now + time::Duration::hours(1),
            )
            .expect("issue");
        Pem {
            chain,
            key: key.serialize_pem(),
        }
    }

    /// A workload certificate with the SPIFFE id and a DNS name, signed by
    /// the mesh root.
    fn workload_with_dns(&self, id: &str, dns: &str) -> Pem {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(vec![dns.to_string()]).expect("dns name");
        params.subject_alt_names.push(SanType::URI(
            rcgen::string::Ia5String::try_from(id).expect("uri"),
        ));
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let leaf = params.signed_by(&key, &self.issuer).expect("sign");
        Pem {
            chain: vec![leaf.pem(), self.root_pem.clone()],
            key: key.serialize_pem(),
        }
    }

    /// The echo service on a STRICT listener that serves `cert`.
    async fn serve_echo(&self, cert: &Pem) -> SocketAddr {
        let listener = MeshListener::bind(
            "127.0.0.1:0".parse().expect("addr"),
            cert.watch(&self.root_pem),
            InboundConfig::new(InboundMode::Strict, TRUST_DOMAIN),
        )
        .await
        .expect("listen");
        let addr = listener.local_addr();
        let echo = EchoService::new(ECHO, addr.to_string());
        tokio::spawn(serve_grpc(listener, Routes::new(echo.into_server())));
        addr
    }
}

/// The client's files, as Istio mounts them: chain, key and mesh root.
struct ClientFiles {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn client_files(mesh: &Mesh, client: &Pem) -> ClientFiles {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    ClientFiles {
        root: write("root-cert.pem", &mesh.root_pem),
        cert: write("cert-chain.pem", &client.chain.concat()),
        key: write("key.pem", &client.key),
        _dir: dir,
    }
}

/// Fails, saying how to install it, when Python's grpcio is missing: this
/// test must never pass by not running.
fn require_grpcio() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "Python's grpcio is not installed: run `cargo xtask setup` (or \
         `python3 -m pip install 'grpcio==1.76.0'`), then this test again"
    );
}

/// How the Python client calls.
struct Call<'a> {
    addr: SocketAddr,
    files: &'a ClientFiles,
    with_client_cert: bool,
    server_name: &'a str,
    message: &'a str,
    stream: Option<u32>,
}

/// Runs tests/python/echo_client.py and returns the JSON objects it printed
/// (one per answer, or one `{"error": ..}`).
async fn python(call: Call<'_>) -> Vec<Value> {
    require_grpcio();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/echo_client.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&script)
        .arg("--target")
        .arg(call.addr.to_string())
        .arg("--root")
        .arg(&call.files.root)
        .args(["--server-name", call.server_name, "--message", call.message]);
    if call.with_client_cert {
        cmd.arg("--cert")
            .arg(&call.files.cert)
            .arg("--key")
            .arg(&call.files.key);
    }
    if let Some(count) = call.stream {
        cmd.args(["--stream", "--count", &count.to_string()]);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the Python client ends in time")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "echo_client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_with_a_client_certificate_calls_echo_and_the_server_sees_its_spiffe_id() {
    let mesh = Mesh::new();
    let addr = mesh
        .serve_echo(&mesh.workload_with_dns(ECHO, ECHO_DNS))
        .await;
    let files = client_files(&mesh, &mesh.workload(CLIENT));
    let call = |stream| Call {
        addr,
        files: &files,
        with_client_cert: true,
        server_name: ECHO_DNS,
        message: "hello from python",
        stream,
    };

    let got = python(call(None)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let answer = &got[0];
    assert!(answer.get("error").is_none(), "{answer}");
    assert_eq!(text(answer, "message"), "hello from python");
    assert_eq!(text(answer, "served_by"), ECHO);
    assert_eq!(text(answer, "endpoint"), addr.to_string());
    assert_eq!(text(answer, "peer"), CLIENT, "the verified client id");
    let metadata = answer["metadata"].as_object().expect("metadata");
    assert!(
        text(&answer["metadata"], "x-interop-client").starts_with("grpcio "),
        "{metadata:?}"
    );
    // serve_http replaced whatever XFCC there was with the verified peer.
    assert_eq!(
        metadata
            .get("x-forwarded-client-cert")
            .and_then(Value::as_str),
        Some(format!("URI={CLIENT}").as_str())
    );

    let got = python(call(Some(5))).await;
    assert_eq!(got.len(), 5, "{got:?}");
    for (i, answer) in got.iter().enumerate() {
        assert_eq!(answer["index"].as_u64(), Some(i as u64), "{answer}");
        assert_eq!(text(answer, "message"), "hello from python");
        assert_eq!(text(answer, "peer"), CLIENT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_without_a_client_certificate_is_refused_in_strict() {
    let mesh = Mesh::new();
    let addr = mesh
        .serve_echo(&mesh.workload_with_dns(ECHO, ECHO_DNS))
        .await;
    let files = client_files(&mesh, &mesh.workload(CLIENT));
    let call = |with_client_cert| Call {
        addr,
        files: &files,
        with_client_cert,
        server_name: ECHO_DNS,
        message: "anyone there?",
        stream: None,
    };
    let got = python(call(false)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["error"], "UNAVAILABLE", "{got:?}");
    // Refused by the listener during the handshake (grpcio reports the
    // alert as a failed read), not by grpcio's own name check.
    assert!(!text(&got[0], "details").contains("Peer name"), "{got:?}");
    // The refusal cost only that connection: a client with a certificate
    // is served next.
    let got = python(call(true)).await;
    assert_eq!(text(&got[0], "peer"), CLIENT, "{got:?}");
}

/// The negative control for the choice explained at the top: an Istio
/// workload certificate (URI SAN only) fails grpcio's name check, so the
/// DNS SAN is what makes the calls above work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_refuses_a_workload_certificate_without_a_dns_name() {
    let mesh = Mesh::new();
    let addr = mesh.serve_echo(&mesh.workload(ECHO)).await;
    let files = client_files(&mesh, &mesh.workload(CLIENT));
    let got = python(Call {
        addr,
        files: &files,
        with_client_cert: true,
        server_name: ECHO_DNS,
        message: "hello",
        stream: None,
    })
    .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["error"], "UNAVAILABLE", "{got:?}");
    assert!(
        text(&got[0], "details").contains("is not in peer certificate"),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_over_nasp_mtls_calls_the_echo_service() {
    let mesh = Mesh::new();
    let server = mesh.workload(ECHO);
    let addr = mesh.serve_echo(&server).await;
    let connector = MeshConnector::new(mesh.workload(CLIENT).watch(&mesh.root_pem));
    let tls = connector
        .connect(
            addr,
            &istio_sni(9090, "", ECHO_DNS),
            &[ECHO.to_string()],
            ALPN_H2,
        )
        .await
        .expect("mTLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio-h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    // The lead's Mesh::grpc_channel will replace this: a tower service over
    // one HTTP/2 connection is all a generated tonic client needs.
    let channel = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut send = send.clone();
        async move { send.send_request(req).await }
    });
    let origin = format!("http://{ECHO_DNS}:9090").parse().expect("uri");
    let mut client = EchoClient::with_origin(channel, origin);

    let mut request = tonic::Request::new(EchoRequest {
        message: "hello from nasp".into(),
        count: 0,
    });
    request
        .metadata_mut()
        .insert("x-caller", "tonic".parse().expect("ascii"));
    let answer = tokio::time::timeout(Duration::from_secs(10), client.echo(request))
        .await
        .expect("in time")
        .expect("echo")
        .into_inner();
    assert_eq!(answer.message, "hello from nasp");
    assert_eq!(answer.served_by, ECHO);
    assert_eq!(answer.endpoint, addr.to_string());
    assert_eq!(answer.peer, CLIENT);
    let metadata: &HashMap<String, String> = &answer.metadata;
    assert_eq!(metadata.get("x-caller").map(String::as_str), Some("tonic"));

    let mut stream = client
        .echo_stream(EchoRequest {
            message: "again".into(),
            count: 3,
        })
        .await
        .expect("stream")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(answer) = stream.message().await.expect("answer") {
        assert_eq!(
            (answer.message.as_str(), answer.peer.as_str()),
            ("again", CLIENT)
        );
        indexes.push(answer.index);
    }
    assert_eq!(indexes, vec![0, 1, 2]);
}
