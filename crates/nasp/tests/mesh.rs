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

fn conformance_wasm() -> Arc<[u8]> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/filters/conformance.wasm"
    );
    std::fs::read(path)
        .unwrap_or_else(|e| {
            panic!("{path}: {e}; build the filters with `cargo xtask build-filters`")
        })
        .into()
}

const TCP_MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: db
    namespace: demo
    service_account: db
    vip: 10.96.4.5
    mtls: strict
    ports:
      - { port: 15432, protocol: tcp }
    endpoints:
      - { ip: 127.0.4.2 }
  - name: web
    namespace: demo
    service_account: web
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.4.3 }
"#;

/// TCP and HTTP through `Mesh` with the conformance filter on each
/// runtime: outbound TCP bytes get the filter's `>` prefix on the way out
/// and `<` suffix on the way back; an inbound HTTP filter rewrites the
/// path the application sees and rejects what the filter rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_through_filters_on_every_runtime() {
    use nasp::wasm::{FailPolicy, PluginConfig};
    use nasp::{FilterDirection, FilterKind, FilterSpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mesh = MeshFile::parse(TCP_MESH).expect("mesh");
    let cp = control_plane("127.0.4", &mesh).await;
    // The database: greets with the caller's id, then echoes. This test
    // asserts the exact bytes the conformance filter writes, so the TCP
    // ends run without the default chain (whose metadata preambles would
    // be among them: tests/default_filters.rs covers those); the web
    // workload keeps it, its HTTP filter extending the chain.
    let db = Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: "db-0".into(),
            namespace: "demo".into(),
            service_account: "db".into(),
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .ready_timeout(Duration::from_secs(20))
        .no_default_filters()
        .build()
        .await
        .expect("db joined");
    let l = db
        .bind("127.0.4.2:15432".parse().expect("addr"))
        .await
        .expect("bind");
    let d = db.clone();
    tokio::spawn(async move {
        d.serve_tcp(l, |mut conn: nasp::TcpConnection| async move {
            let who = conn.peer_id().unwrap_or("-").to_string();
            let _ = conn.write_all(format!("{who}\n").as_bytes()).await;
            let mut buf = [0u8; 256];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
        .await;
    });
    let wasm = conformance_wasm();
    for runtime in ["wasmtime", "wasmi", "wasm3"] {
        // A web workload whose inbound HTTP goes through the filter.
        let web = Mesh::builder()
            .workload(WorkloadSettings {
                namespace: "demo".into(),
                service_account: "web".into(),
                ..Default::default()
            })
            .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
            .runtime(runtime)
            .filter(FilterSpec {
                wasm: wasm.clone(),
                config: PluginConfig::new("conformance").fail_policy(FailPolicy::FailClosed),
                direction: FilterDirection::Inbound,
                kind: FilterKind::Http,
            })
            .filter_workers(2)
            .build()
            .await
            .expect("web joined");
        let l = web
            .bind("127.0.4.3:18080".parse().expect("addr"))
            .await
            .expect("bind");
        let app = tower::service_fn(|req: http::Request<Body>| async move {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("x-app-path", req.uri().path())
                    .body(Body::from("app"))
                    .expect("response"),
            )
        });
        let w = web.clone();
        let served = tokio::spawn(async move { w.serve(l, app).await });

        // A client whose outbound TCP goes through the filter (TCP mode).
        let client = Mesh::builder()
            .workload(WorkloadSettings {
                namespace: "demo".into(),
                service_account: "frontend".into(),
                ..Default::default()
            })
            .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
            .runtime(runtime)
            .no_default_filters()
            .filter(FilterSpec {
                wasm: wasm.clone(),
                config: PluginConfig::new("conformance-tcp").configuration("tcp"),
                direction: FilterDirection::Outbound,
                kind: FilterKind::Network,
            })
            .filter_workers(2)
            .build()
            .await
            .expect("client joined");
        let mut conn = client.connect("db.demo:15432").await.expect("connect");
        assert!(conn.is_filtered());
        assert!(conn.upstream().mtls, "{runtime}");
        let mut got = Vec::new();
        let want_greeting = b"spiffe://cluster.local/ns/demo/sa/frontend\n<";
        let mut buf = [0u8; 256];
        while got.len() < want_greeting.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("greeting in time")
                .expect("read");
            assert!(n > 0, "{runtime}: closed early after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want_greeting, "{runtime}");
        conn.write_all(b"ping").await.expect("write");
        let mut echo = Vec::new();
        while echo.len() < b">ping<".len() {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("echo in time")
                .expect("read");
            assert!(n > 0, "{runtime}: closed early");
            echo.extend_from_slice(&buf[..n]);
        }
        assert_eq!(echo, b">ping<", "{runtime}: the filter saw both directions");

        // Inbound HTTP filters: a rewrite the app sees, a rejection it
        // never sees, and a trap under fail-closed answered 503.
        let http = client.http_client();
        let send = |mode: &'static str| {
            let http = http.clone();
            async move {
                let req = http::Request::get("http://web.demo:18080/original")
                    .header("x-conformance", mode)
                    .body(Body::empty())
                    .expect("request");
                let resp = http.send(req).await.expect("sent");
                let status = resp.status().as_u16();
                let path = resp
                    .headers()
                    .get("x-app-path")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                (status, path)
            }
        };
        assert_eq!(
            send("pseudo").await,
            (200, "/rewritten".into()),
            "{runtime}"
        );
        assert_eq!(send("local-response").await, (403, "-".into()), "{runtime}");
        assert_eq!(
            send("trap").await.0,
            503,
            "{runtime}: fail-closed after a trap"
        );
        web.shutdown().await;
        let _ = served.await;
    }
}
