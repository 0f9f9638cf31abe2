//! The default filter chain (`nasp::default_filters`: our metadata-exchange
//! and istio-stats filters, embedded): two `Mesh` workloads built with no
//! filter configured report Istio's standard series to each other over HTTP
//! and TCP, the peer metadata never reaching the applications; a mesh
//! without the defaults reports nothing; a filter of the user's extends the
//! chain or, with the defaults off, replaces it. Loopback 127.0.9.0/24,
//! the embedded control plane, mTLS, wasmtime (the default runtime).

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::transport::Body;
use nasp::wasm::PluginConfig;
use nasp::xds::WorkloadSettings;
use nasp::{FilterDirection, FilterKind, FilterSpec, Mesh, MeshBuilder, MeshHttpClientExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PEER_HEADERS: [&str; 2] = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"];

/// `echo` (HTTP) and `db` (TCP) on `{net}.2` and `{net}.4`.
fn mesh_file(net: &str) -> String {
    format!(
        r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - {{ port: 18080, protocol: http }}
    endpoints:
      - {{ ip: {net}.2, labels: {{ app: echo, version: v1 }} }}
  - name: db
    namespace: demo
    service_account: db
    vip: 10.96.9.5
    mtls: strict
    ports:
      - {{ port: 15432, protocol: tcp }}
    endpoints:
      - {{ ip: {net}.4 }}
"#
    )
}

/// A workload `name` (service account, workload name and `app` label too)
/// at `ip`; nothing about filters, so the defaults apply.
fn workload(cp: &ControlPlane, name: &str, ip: &str) -> MeshBuilder {
    Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: format!("{name}-0"),
            namespace: "demo".into(),
            service_account: name.into(),
            workload_name: name.into(),
            instance_ips: vec![ip.into()],
            labels: [
                ("app".to_string(), name.to_string()),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .filter_workers(2)
        .ready_timeout(Duration::from_secs(20))
}

/// The request headers the echo application saw, per request.
type Seen = Arc<Mutex<Vec<http::HeaderMap>>>;

/// Serves HTTP on `{ip}:18080`: records the request headers, answers 200
/// (404 on `/missing`).
async fn serve_echo(mesh: &Mesh, ip: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let listener = mesh
        .bind(format!("{ip}:18080").parse().expect("addr"))
        .await
        .expect("bind");
    let seen = Seen::default();
    let s = seen.clone();
    let app = tower::service_fn(move |req: http::Request<Body>| {
        let s = s.clone();
        async move {
            s.lock().expect("seen").push(req.headers().clone());
            let status = if req.uri().path() == "/missing" {
                404
            } else {
                200
            };
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(status)
                    .body(Body::from("echo"))
                    .expect("response"),
            )
        }
    });
    let m = mesh.clone();
    (
        seen,
        tokio::spawn(async move { m.serve(listener, app).await }),
    )
}

/// The sum of `family`'s samples in `mesh`'s registry whose labels include
/// all of `labels` (`k="v"` each).
fn sum(mesh: &Mesh, family: &str, labels: &[&str]) -> u64 {
    mesh.metrics()
        .prometheus_text()
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Polls until `sum(..) == want`, up to 10 s (the inbound side records in
/// `proxy_on_log`, which may run just after the answer); panics with the
/// registry's text otherwise.
async fn counted(mesh: &Mesh, family: &str, labels: &[&str], want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = sum(mesh, family, labels);
        if got == want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{family} {labels:?}: {got}, want {want}; registry:\n{}",
                mesh.metrics().prometheus_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` GETs of `path` on echo through `mesh`'s client; each answered
/// `status`, none with the peer's metadata headers.
async fn get_echo(mesh: &Mesh, path: &str, n: usize, status: u16) {
    let client = mesh.http_client();
    for _ in 0..n {
        let resp = client
            .get(&format!("http://echo.demo:18080{path}"))
            .await
            .expect("sent");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        for h in PEER_HEADERS {
            assert!(
                !resp.headers().contains_key(h),
                "{h} reached the calling application: {:?}",
                resp.headers()
            );
        }
        let body = resp.into_body().collect_bytes().await.expect("body");
        assert_eq!(&body[..], b"echo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meshes_with_the_default_chain_report_istio_series_over_http_and_tcp() {
    let net = "127.0.9";
    let cp = common::control_plane(
        "127.0.9.1",
        &MeshFile::parse(&mesh_file(net)).expect("mesh file"),
    )
    .await;
    let echo = workload(&cp, "echo", "127.0.9.2")
        .build()
        .await
        .expect("echo");
    let (seen, served) = serve_echo(&echo, "127.0.9.2").await;
    let db = workload(&cp, "db", "127.0.9.4").build().await.expect("db");
    let db_listener = db
        .bind("127.0.9.4:15432".parse().expect("addr"))
        .await
        .expect("bind db");
    let d = db.clone();
    // Greets first, then echoes each chunk: exactly the application's
    // bytes must arrive on both sides, preambles stripped.
    let db_served = tokio::spawn(async move {
        d.serve_tcp(db_listener, |mut conn: nasp::TcpConnection| async move {
            let _ = conn.write_all(b"hello\n").await;
            let mut buf = [0u8; 256];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        })
        .await;
    });
    let web = workload(&cp, "web", "127.0.9.3")
        .build()
        .await
        .expect("web");

    // HTTP: 3 answered 200, 2 answered 404.
    get_echo(&web, "/", 3, 200).await;
    get_echo(&web, "/missing", 2, 404).await;
    let web_id = "spiffe://cluster.local/ns/demo/sa/web";
    let peers = [
        "source_workload=\"web\"",
        "source_app=\"web\"",
        "source_workload_namespace=\"demo\"",
        "destination_workload=\"echo\"",
        "destination_app=\"echo\"",
        "destination_version=\"v1\"",
        "request_protocol=\"http\"",
    ];
    for (code, n) in [("200", 3), ("404", 2)] {
        let code = format!("response_code=\"{code}\"");
        // Both sides name the service by its FQDN, as Istio does.
        let mut source = vec![
            "reporter=\"source\"",
            code.as_str(),
            "destination_service=\"echo.demo.svc.cluster.local\"",
        ];
        source.extend(peers);
        counted(&web, "istio_requests_total", &source, n).await;
        let principal = format!("source_principal=\"{web_id}\"");
        let mut destination = vec![
            "reporter=\"destination\"",
            code.as_str(),
            principal.as_str(),
            "connection_security_policy=\"mutual_tls\"",
            "destination_service=\"echo.demo.svc.cluster.local\"",
            "destination_service_name=\"echo\"",
        ];
        destination.extend(peers);
        counted(&echo, "istio_requests_total", &destination, n).await;
    }
    // Each side reports only as itself.
    assert_eq!(
        sum(&web, "istio_requests_total", &["reporter=\"destination\""]),
        0
    );
    assert_eq!(
        sum(&echo, "istio_requests_total", &["reporter=\"source\""]),
        0
    );
    assert_eq!(
        sum(
            &web,
            "istio_request_duration_milliseconds_count",
            &["reporter=\"source\""]
        ),
        5
    );
    // The metadata headers never reached the serving application.
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 5);
    for headers in &seen {
        for h in PEER_HEADERS {
            assert!(!headers.contains_key(h), "{h} reached echo: {headers:?}");
        }
    }

    // TCP: the metadata preambles go both ways and neither application
    // sees a byte of them.
    let mut conn = web.connect("db.demo:15432").await.expect("connect");
    assert!(conn.is_filtered());
    assert_eq!(
        conn.upstream().alpn.as_deref(),
        Some("istio-peer-exchange"),
        "the exchange's ALPN agreed"
    );
    let got = greeted_and_echoed(&mut conn).await;
    assert_eq!(got, b"hello\nping", "{:?}", String::from_utf8_lossy(&got));
    drop(conn);
    let tcp_peers = [
        "source_workload=\"web\"",
        "destination_workload=\"db\"",
        "request_protocol=\"tcp\"",
    ];
    let mut source = vec!["reporter=\"source\""];
    source.extend(tcp_peers);
    counted(&web, "istio_tcp_connections_opened_total", &source, 1).await;
    counted(&web, "istio_tcp_received_bytes_total", &source, 4).await;
    counted(&web, "istio_tcp_sent_bytes_total", &source, 10).await;
    let mut destination = vec![
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    destination.extend(tcp_peers);
    counted(&db, "istio_tcp_connections_opened_total", &destination, 1).await;
    counted(&db, "istio_tcp_received_bytes_total", &destination, 4).await;

    // A caller without the defaults offers plain `istio`, so the server
    // sends no preamble and its application's bytes arrive as they are.
    let bare = workload(&cp, "bare", "127.0.9.5")
        .no_default_filters()
        .build()
        .await
        .expect("bare");
    let mut conn = bare.connect("db.demo:15432").await.expect("connect");
    assert_eq!(conn.upstream().alpn.as_deref(), Some("istio"));
    let got = greeted_and_echoed(&mut conn).await;
    assert_eq!(got, b"hello\nping", "{:?}", String::from_utf8_lossy(&got));
    drop(conn);
    bare.shutdown().await;

    web.shutdown().await;
    echo.shutdown().await;
    db.shutdown().await;
    let _ = served.await;
    let _ = db_served.await;
}

/// Reads the db's greeting, sends `ping`, reads the echo: what arrived.
async fn greeted_and_echoed(conn: &mut nasp::TcpConnection) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let mut sent = false;
    while got.len() < b"hello\nping".len() {
        if !sent && got.len() >= b"hello\n".len() {
            conn.write_all(b"ping").await.expect("write");
            sent = true;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "closed early after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn headers_filter() -> FilterSpec {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/filters/headers.wasm"
    );
    let wasm: Arc<[u8]> = std::fs::read(path)
        .unwrap_or_else(|e| {
            panic!("{path}: {e}; build the filters with `cargo xtask build-filters`")
        })
        .into();
    FilterSpec {
        wasm,
        config: PluginConfig::new("headers"),
        direction: FilterDirection::Outbound,
        kind: FilterKind::Http,
    }
}

/// `.no_default_filters()` reports nothing (and sends no metadata: the
/// server's stats sees an unknown peer); a user filter with the defaults
/// on extends the chain (both its header and the series), with them off it
/// is the whole chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_defaults_no_series_and_a_user_filter_extends_or_replaces_the_chain() {
    let net = "127.0.9";
    let mesh = mesh_file(net).replace("127.0.9.2", "127.0.9.12");
    let cp = common::control_plane("127.0.9.11", &MeshFile::parse(&mesh).expect("mesh file")).await;
    let echo = workload(&cp, "echo", "127.0.9.12")
        .build()
        .await
        .expect("echo");
    let (seen, served) = serve_echo(&echo, "127.0.9.12").await;

    // No defaults, no filter: no series, no metadata sent.
    let bare = workload(&cp, "bare", "127.0.9.13")
        .no_default_filters()
        .build()
        .await
        .expect("bare");
    get_echo(&bare, "/", 2, 200).await;
    // Echo (with the defaults) counts them from an unknown peer.
    counted(
        &echo,
        "istio_requests_total",
        &["reporter=\"destination\"", "source_workload=\"unknown\""],
        2,
    )
    .await;
    assert!(
        !bare.metrics().prometheus_text().contains("istio_"),
        "a mesh without the defaults reported:\n{}",
        bare.metrics().prometheus_text()
    );

    // Defaults off, a filter of ours: that filter is the chain.
    let replaced = workload(&cp, "replaced", "127.0.9.14")
        .no_default_filters()
        .filter(headers_filter())
        .build()
        .await
        .expect("replaced");
    get_echo(&replaced, "/r", 1, 200).await;
    // Defaults on, plus a filter: both run.
    let extended = workload(&cp, "extended", "127.0.9.15")
        .filter(headers_filter())
        .build()
        .await
        .expect("extended");
    get_echo(&extended, "/e", 1, 200).await;
    assert!(!replaced.metrics().prometheus_text().contains("istio_"));
    counted(
        &extended,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "source_workload=\"extended\"",
            "destination_workload=\"echo\"",
        ],
        1,
    )
    .await;
    counted(
        &echo,
        "istio_requests_total",
        &["reporter=\"destination\"", "source_workload=\"extended\""],
        1,
    )
    .await;
    counted(
        &echo,
        "istio_requests_total",
        &["reporter=\"destination\"", "source_workload=\"unknown\""],
        3,
    )
    .await;

    let seen = seen.lock().expect("seen").clone();
    let path_seen = |h: &http::HeaderMap| {
        h.get("x-path-seen")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let got: Vec<Option<String>> = seen.iter().map(path_seen).collect();
    assert_eq!(
        got,
        vec![None, None, Some("/r".into()), Some("/e".into())],
        "the user filter ran on the meshes that have it"
    );
    for headers in &seen {
        for h in PEER_HEADERS {
            assert!(!headers.contains_key(h), "{h} reached echo: {headers:?}");
        }
    }
    for m in [&bare, &replaced, &extended, &echo] {
        m.shutdown().await;
    }
    let _ = served.await;
}
