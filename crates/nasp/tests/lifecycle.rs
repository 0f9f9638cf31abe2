//! The facade pieces the C ABI (issue 12, `docs/ffi-design.md` section 4)
//! stands on, on loopback 127.0.12.0/24 with the embedded control plane:
//! a serve future that is dropped (its task aborted) no longer holds
//! `Mesh::shutdown` for the drain deadline, and `MeshBuilder::token_file`
//! gives the CA a token however the control plane was named.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nasp::Mesh;
use nasp::controlplane::mesh::MeshFile;
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::identity::SpiffeId;
use nasp::transport::Body;
use nasp::xds::WorkloadSettings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.12.2 }
"#;

fn workload(sa: &str) -> WorkloadSettings {
    WorkloadSettings {
        pod_name: format!("{sa}-0"),
        namespace: "demo".into(),
        service_account: sa.into(),
        ..Default::default()
    }
}

/// Far longer than the test's own wait: a shutdown held by a stale count
/// waits this long, and the test fails well before.
const DRAIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_serve_whose_task_was_aborted() {
    let cp = common::control_plane("127.0.12.1", &MeshFile::parse(MESH).expect("mesh")).await;
    let mesh = Mesh::builder()
        .workload(workload("echo"))
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .no_default_filters()
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(DRAIN)
        .build()
        .await
        .expect("joined the mesh");

    // One HTTP and one TCP server, each in a task that is then aborted, the
    // way a C caller's `nasp_listener_close` stops one listener.
    let http = mesh
        .bind("127.0.12.2:18080".parse().expect("addr"))
        .await
        .expect("bind http");
    let app = tower::service_fn(|_req: http::Request<Body>| async {
        Ok::<_, Infallible>(http::Response::new(Body::from("ok")))
    });
    let served_http = tokio::spawn({
        let mesh = mesh.clone();
        async move { mesh.serve(http, app).await }
    });
    let tcp = mesh
        .bind("127.0.12.2:19000".parse().expect("addr"))
        .await
        .expect("bind tcp");
    let (accepted, mut on_accept) = tokio::sync::mpsc::channel::<()>(1);
    let served_tcp = tokio::spawn({
        let mesh = mesh.clone();
        async move {
            mesh.serve_tcp(tcp, move |_conn| {
                let accepted = accepted.clone();
                async move {
                    let _ = accepted.send(()).await;
                }
            })
            .await
        }
    });
    // Both are inside their loops before the abort (a task aborted before
    // its first poll never counted itself): each answers a plaintext
    // caller (PERMISSIVE, as xDS says nothing about the ports).
    let mut conn = tokio::net::TcpStream::connect("127.0.12.2:18080")
        .await
        .expect("connect http");
    conn.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("response");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut conn = tokio::net::TcpStream::connect("127.0.12.2:19000")
        .await
        .expect("connect tcp");
    conn.write_all(b"hello").await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), on_accept.recv())
        .await
        .expect("the TCP server accepted")
        .expect("handler ran");
    served_http.abort();
    served_tcp.abort();
    assert!(served_http.await.expect_err("aborted").is_cancelled());
    assert!(served_tcp.await.expect_err("aborted").is_cancelled());

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), mesh.shutdown())
        .await
        .expect("shutdown returned without waiting the 60 s drain for aborted servers");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A control plane whose CA issues `spiffe://cluster.local/ns/demo/sa/web`
/// only to the bearer of `token`.
fn control_plane_with_token(ip: &str, token: &str) -> impl Future<Output = ControlPlane> {
    let policy = TokenPolicy::Tokens(HashMap::from([(
        token.to_string(),
        SpiffeId::new("cluster.local", "demo", "web").expect("id"),
    )]));
    let ip = ip.to_string();
    async move {
        let ca = CertificateAuthority::generate("cluster.local")
            .expect("ca")
            .tokens(policy);
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind");
        ControlPlane::start(
            listener,
            ControlPlaneConfig {
                ca: Arc::new(ca),
                xds: Some(Arc::new(
                    SnapshotCache::from_mesh(&MeshFile::parse(MESH).expect("mesh"))
                        .expect("snapshot"),
                )),
            },
        )
        .expect("control plane")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_shown_to_the_ca_whichever_way_the_control_plane_was_given() {
    let cp = control_plane_with_token("127.0.12.11", "s3cret-web").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "s3cret-web\n").expect("token");
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-it\n").expect("token");
    let root = cp.root_pem().as_bytes().to_vec();
    let quick = Duration::from_secs(3);

    // `control_plane` has no token argument: without `token_file` the CA
    // refuses, with it the workload gets its certificate.
    let refused = Mesh::builder()
        .workload(workload("web"))
        .control_plane(cp.addr().to_string(), root.clone())
        .no_default_filters()
        .ready_timeout(quick)
        .build()
        .await
        .expect_err("no token, no certificate");
    assert!(refused.to_string().contains("no certificate"), "{refused}");
    let mesh = Mesh::builder()
        .workload(workload("web"))
        .control_plane(cp.addr().to_string(), root.clone())
        .token_file(&token)
        .no_default_filters()
        .ready_timeout(Duration::from_secs(20))
        .build()
        .await
        .expect("joined with the token");
    assert!(mesh.is_ready());
    assert_eq!(
        mesh.id().to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    mesh.shutdown().await;

    // Given before `embedded`, it still overrides embedded's token.
    let mesh = Mesh::builder()
        .workload(workload("web"))
        .token_file(&token)
        .embedded(cp.addr(), root.clone(), Some(wrong.clone()))
        .no_default_filters()
        .ready_timeout(Duration::from_secs(20))
        .build()
        .await
        .expect("token_file wins over embedded's");
    assert!(mesh.is_ready());
    mesh.shutdown().await;

    // And the wrong token alone is refused, so the case above did depend
    // on the override.
    Mesh::builder()
        .workload(workload("web"))
        .embedded(cp.addr(), root, Some(wrong))
        .no_default_filters()
        .ready_timeout(quick)
        .build()
        .await
        .expect_err("wrong token refused");
}
