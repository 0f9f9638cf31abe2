//! `Mesh` end to end on loopback: the embedded control plane (CA + ADS
//! from a mesh file), three backend workloads and a frontend, each a
//! `Mesh` with its own identity from the CA. HTTP and gRPC go through
//! routing, weighted subsets, mTLS; a weight shift pushed over xDS moves
//! live traffic; a stopped replica fails no request; shutdown drains.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use nasp::controlplane::mesh::MeshFile;
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::transport::{Body, MeshPeer};
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClientExt as _};
use nasp_proto::echo::EchoRequest;
use nasp_proto::echo::echo_client::EchoClient;

const MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: backend
    namespace: demo
    service_account: backend
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
      - { port: 19090, protocol: grpc }
    endpoints:
      - { ip: NET.2, labels: { app: backend, version: v1 } }
      - { ip: NET.3, labels: { app: backend, version: v1 } }
      - { ip: NET.4, labels: { app: backend, version: v2 } }
    subsets:
      - { name: v1, labels: { version: v1 } }
      - { name: v2, labels: { version: v2 } }
    routes:
      - name: canary
        match: { headers: { x-canary: "1" } }
        route: [{ subset: v2 }]
      - name: split
        route:
          - { subset: v1, weight: V1 }
          - { subset: v2, weight: V2 }
"#;

/// The mesh with backends at `net`.2, .3, .4 (each test its own `net`,
/// as tests run in parallel) and this split between the subsets.
fn mesh_file(net: &str, v1: u32, v2: u32) -> MeshFile {
    MeshFile::parse(
        &MESH
            .replace("NET", net)
            .replace("V1", &v1.to_string())
            .replace("V2", &v2.to_string()),
    )
    .expect("mesh file")
}

async fn control_plane(net: &str, mesh: &MeshFile) -> ControlPlane {
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let listener = tokio::net::TcpListener::bind(format!("{net}.1:0"))
        .await
        .expect("bind");
    ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: Some(Arc::new(SnapshotCache::from_mesh(mesh).expect("snapshot"))),
        },
    )
    .expect("control plane")
}

async fn join(cp: &ControlPlane, sa: &str) -> Mesh {
    let workload = WorkloadSettings {
        pod_name: format!("{sa}-0"),
        namespace: "demo".into(),
        service_account: sa.into(),
        ..Default::default()
    };
    Mesh::builder()
        .workload(workload)
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(3))
        .build()
        .await
        .expect("joined the mesh")
}

/// A backend replica: HTTP on :18080 says who it is and who called (after a
/// pause when asked), gRPC on :19090 is the echo service.
async fn replica(cp: &ControlPlane, ip: &str, name: &'static str) -> Mesh {
    let mesh = join(cp, "backend").await;
    let http = mesh
        .bind(format!("{ip}:18080").parse().expect("addr"))
        .await
        .expect("bind http");
    let app = tower::service_fn(move |req: http::Request<Body>| async move {
        let peer = req
            .extensions()
            .get::<MeshPeer>()
            .and_then(|p| p.id.as_ref())
            .map_or("-".into(), ToString::to_string);
        if let Some(ms) = req
            .headers()
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("x-served-by", name)
                .header("x-peer", peer)
                .body(Body::from("hello"))
                .expect("response"),
        )
    });
    let m = mesh.clone();
    tokio::spawn(async move { m.serve(http, app).await });
    let grpc = mesh
        .bind(format!("{ip}:19090").parse().expect("addr"))
        .await
        .expect("bind grpc");
    let routes = tonic::service::Routes::new(
        nasp::transport::EchoService::new(name, format!("{ip}:19090")).into_server(),
    );
    let m = mesh.clone();
    tokio::spawn(async move { m.serve(grpc, routes).await });
    mesh
}

async fn served_by(client: &nasp::MeshHttpClient, canary: bool) -> (u16, String, String) {
    let mut req = http::Request::get("http://backend.demo:18080/")
        .body(Body::empty())
        .expect("request");
    if canary {
        req.headers_mut()
            .insert("x-canary", "1".parse().expect("value"));
    }
    let resp = client.send(req).await.expect("sent");
    let status = resp.status().as_u16();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (by, peer) = (h("x-served-by"), h("x-peer"));
    let _ = resp.into_body().collect_bytes().await;
    (status, by, peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_through_the_mesh_with_live_shifts_and_a_lost_replica() {
    let net = "127.0.1";
    let cp = control_plane(net, &mesh_file(net, 90, 10)).await;
    let a = replica(&cp, "127.0.1.2", "v1-a").await;
    let _b = replica(&cp, "127.0.1.3", "v1-b").await;
    let _c = replica(&cp, "127.0.1.4", "v2-c").await;
    let frontend = join(&cp, "frontend").await;
    assert!(frontend.is_ready());
    assert_eq!(
        frontend.id().to_string(),
        "spiffe://cluster.local/ns/demo/sa/frontend"
    );
    let client = frontend.http_client();

    // 90/10 between subsets, round robin inside v1; every backend sees the
    // frontend's verified identity.
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for _ in 0..200 {
        let (status, by, peer) = served_by(&client, false).await;
        assert_eq!(status, 200, "{by}");
        assert_eq!(peer, "spiffe://cluster.local/ns/demo/sa/frontend");
        *counts.entry(by).or_default() += 1;
    }
    let v2 = counts.get("v2-c").copied().unwrap_or(0);
    assert!((5..=40).contains(&v2), "10 % to v2: {counts:?}");
    assert!(counts.get("v1-a").copied().unwrap_or(0) > 50, "{counts:?}");
    assert!(counts.get("v1-b").copied().unwrap_or(0) > 50, "{counts:?}");
    // A header match sends everything to v2.
    for _ in 0..10 {
        assert_eq!(served_by(&client, true).await.1, "v2-c");
    }

    // gRPC with a generated tonic client over the mesh channel.
    let channel = frontend
        .grpc_channel("http://backend.demo:19090")
        .expect("channel");
    let mut echo = EchoClient::new(channel);
    let reply = echo
        .echo(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .expect("gRPC call")
        .into_inner();
    assert_eq!(reply.message, "hi");
    assert_eq!(reply.peer, "spiffe://cluster.local/ns/demo/sa/frontend");

    // Shift everything to v2 over xDS: traffic follows without a failure.
    cp.set_mesh(&mesh_file(net, 0, 100)).expect("push");
    let mut shifted = false;
    for _ in 0..100 {
        let (status, by, _) = served_by(&client, false).await;
        assert_eq!(status, 200);
        if by == "v2-c" {
            // 20 in a row on v2 means the split moved.
            let mut all = true;
            for _ in 0..20 {
                all &= served_by(&client, false).await.1 == "v2-c";
            }
            if all {
                shifted = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shifted, "the 0/100 split never took effect");

    // Back to v1, then stop one v1 replica without telling the control
    // plane: Istio's retry policy (connect-failure, other hosts) keeps every
    // request succeeding.
    cp.set_mesh(&mesh_file(net, 100, 0)).expect("push");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.shutdown().await;
    for _ in 0..60 {
        let (status, by, _) = served_by(&client, false).await;
        assert_eq!(status, 200, "a stopped replica fails no request");
        assert_eq!(by, "v1-b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight_and_refuses_new_ones() {
    let net = "127.0.2";
    let cp = control_plane(net, &mesh_file(net, 100, 0)).await;
    // Only one replica runs here: the others are not listening, and the
    // route's retries find this one.
    let only = replica(&cp, "127.0.2.2", "v1-a").await;
    let frontend = join(&cp, "frontend").await;
    let client = frontend.http_client();
    assert_eq!(served_by(&client, false).await.0, 200);
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let req = http::Request::get("http://backend.demo:18080/")
                .header("x-delay-ms", "700")
                .body(Body::empty())
                .expect("request");
            client.send(req).await.map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    only.shutdown().await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "shutdown returned before the request in flight ended"
    );
    assert_eq!(slow.await.expect("join").expect("sent"), 200);
    // Nothing listens any more: the client answers 503 (after retries).
    assert_eq!(served_by(&client, false).await.0, 503);
}
