//! HTTP services on a mesh listener through real sockets: `curl` over
//! HTTP/1.1 and HTTP/2 plaintext (PERMISSIVE), and a hyper HTTP/2 client
//! over nasp mTLS with Istio's ALPN; the application sees the verified peer
//! and never a forged `x-forwarded-client-cert`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::{KeyAlgorithm, WorkloadCert, keys};
use nasp_transport::outbound::ALPN_H2;
use nasp_transport::{
    InboundConfig, InboundMode, MeshConnector, MeshListener, MeshPeer, istio_sni, serve_http,
};
use time::OffsetDateTime;
use tokio::sync::watch;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

type Watch = watch::Receiver<Option<Arc<WorkloadCert>>>;

fn workload(ca: &CertificateAuthority, who: &str) -> Watch {
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = OffsetDateTime::now_utc();
    let chain = ca
        .issue(
            &who.parse().expect("id"),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .expect("issue")
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    let cert = WorkloadCert::new(
        chain,
        pem_key(key.serialize_pem().as_bytes()).expect("key"),
        pem_certs(ca.root_pem().as_bytes()).expect("root"),
    )
    .expect("cert");
    let (tx, rx) = watch::channel(Some(Arc::new(cert)));
    std::mem::forget(tx);
    rx
}

/// The application: says who called, over which HTTP version, and what
/// `x-forwarded-client-cert` it was given.
async fn app(req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let peer = req.extensions().get::<MeshPeer>().cloned();
    let who = peer
        .as_ref()
        .and_then(|p| p.id.as_ref().map(ToString::to_string))
        .unwrap_or_else(|| "anonymous".into());
    let xfcc = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let version = format!("{:?}", req.version());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Ok(http::Response::new(Full::new(Bytes::from(format!(
        "who={who} version={version} xfcc={xfcc} mtls={} body={body}",
        peer.is_some_and(|p| p.mtls)
    )))))
}

async fn start(mode: InboundMode) -> (SocketAddr, MeshConnector) {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let listener = MeshListener::bind(
        "127.0.0.1:0".parse().expect("addr"),
        workload(&ca, WEB),
        InboundConfig::new(mode, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    tokio::spawn(serve_http(listener, hyper::service::service_fn(app)));
    (addr, MeshConnector::new(workload(&ca, CLIENT)))
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http1_and_h2_reach_the_service_without_a_forged_identity() {
    let (addr, _) = start(InboundMode::Permissive).await;
    let url = format!("http://{addr}/");
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        curl(&[
            "-H",
            &format!("x-forwarded-client-cert: URI={WEB}"),
            "-d",
            "hello",
            &u,
        ])
    })
    .await
    .expect("join");
    assert_eq!(
        out,
        "who=anonymous version=HTTP/1.1 xfcc=- mtls=false body=5"
    );
    let out = tokio::task::spawn_blocking(move || curl(&["--http2-prior-knowledge", &url]))
        .await
        .expect("join");
    assert_eq!(
        out,
        "who=anonymous version=HTTP/2.0 xfcc=- mtls=false body=0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_mesh_mtls_carries_the_verified_peer() {
    let (addr, connector) = start(InboundMode::Strict).await;
    let tls = connector
        .connect(
            addr,
            &istio_sni(8080, "", "web.demo.svc.cluster.local"),
            &[WEB.to_string()],
            ALPN_H2,
        )
        .await
        .expect("mTLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio-h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // Several requests share the one connection, each told who called, and
    // a forged header from the client is replaced by the verified one.
    for i in 0..3 {
        let req = http::Request::builder()
            .uri("http://web.demo.svc.cluster.local:8080/")
            .header(
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/istio-system/sa/istiod",
            )
            .body(Full::new(Bytes::from(vec![b'x'; i * 1000])))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!(
                "who={CLIENT} version=HTTP/2.0 xfcc=URI={CLIENT} mtls=true body={}",
                i * 1000
            )
        );
    }
}
