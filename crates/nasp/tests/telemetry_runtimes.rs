//! Issue 10, item 7: the default telemetry chain end to end on each
//! runtime (wasmtime, wasmi, wasm3; one test per runtime, so they run in
//! parallel). Two `Mesh` workloads with the embedded control plane and
//! mTLS talk HTTP, gRPC (unary, server streaming, an error status) and
//! TCP; both sides report every label of Istio's standard series, the gRPC
//! message counts included; a caller without the defaults (no metadata) is
//! `unknown` on the server; the metadata headers reach neither application;
//! a trapping fail-open filter loses no request and is counted in
//! `nasp_wasm_plugin_traps_total`. Loopback 127.0.11.0/24 only.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::transport::Body;
use nasp::wasm::{FailPolicy, PluginConfig};
use nasp::xds::WorkloadSettings;
use nasp::{FilterDirection, FilterKind, FilterSpec, Mesh, MeshBuilder, MeshHttpClientExt as _};
use nasp_proto::echo::EchoRequest;
use nasp_proto::echo::echo_client::EchoClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PEER_HEADERS: [&str; 2] = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"];

/// One test per runtime for each scenario; `$net`, `$trap` and `$idle`
/// are the first host numbers in 127.0.11.0/24 each uses (a block of 8).
macro_rules! per_runtime {
    ($($rt:ident: $net:literal, $trap:literal, $idle:literal;)*) => {$(
        mod $rt {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_idle_tcp_connection_is_reported_on_the_tick() {
                super::idle_tcp(stringify!($rt), $idle).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_meshes_report_every_label_over_http_grpc_and_tcp() {
                super::two_meshes(stringify!($rt), $net).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_trapping_fail_open_filter_loses_no_request_and_is_counted() {
                super::trap(stringify!($rt), $trap).await;
            }
        }
    )*};
}

per_runtime! {
    wasmtime: 10, 130, 30;
    wasmi: 50, 170, 70;
    wasm3: 90, 210, 110;
}

/// 127.0.11.`base + n`.
fn ip(base: u8, n: u8) -> String {
    format!("127.0.11.{}", base + n)
}

/// `echo` (HTTP :18080, gRPC :19090) at `base+2`, `db` (TCP) at `base+4`.
fn mesh_file(base: u8) -> MeshFile {
    let (echo, db) = (ip(base, 2), ip(base, 4));
    MeshFile::parse(&format!(
        r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - {{ port: 18080, protocol: http }}
      - {{ port: 19090, protocol: grpc }}
    endpoints:
      - {{ ip: {echo}, labels: {{ app: echo, version: v1 }} }}
  - name: db
    namespace: demo
    service_account: db
    vip: 10.96.11.5
    mtls: strict
    ports:
      - {{ port: 15432, protocol: tcp }}
    endpoints:
      - {{ ip: {db} }}
"#
    ))
    .expect("mesh file")
}

/// A workload `name` (service account, workload and `app` label too,
/// `version: v1`) on runtime `rt`; no filter configured, so the defaults.
fn workload(cp: &ControlPlane, rt: &str, name: &str, ip: &str) -> MeshBuilder {
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
        .runtime(rt)
        .filter_workers(2)
        .ready_timeout(Duration::from_secs(30))
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

/// The request headers the echo application saw, per request.
type Seen = Arc<Mutex<Vec<http::HeaderMap>>>;

/// Serves echo on `ip`: HTTP :18080 (records the headers, 200, 404 on
/// `/missing`) and the gRPC echo service on :19090.
async fn serve_echo(mesh: &Mesh, ip: &str) -> Seen {
    let listener = mesh
        .bind(format!("{ip}:18080").parse().expect("addr"))
        .await
        .expect("bind http");
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
    tokio::spawn(async move { m.serve(listener, app).await });
    let grpc = mesh
        .bind(format!("{ip}:19090").parse().expect("addr"))
        .await
        .expect("bind grpc");
    let routes = tonic::service::Routes::new(
        nasp::transport::EchoService::new("echo", format!("{ip}:19090")).into_server(),
    );
    let m = mesh.clone();
    tokio::spawn(async move { m.serve(grpc, routes).await });
    seen
}

/// `db` on `ip`:15432: greets with `hello\n`, then echoes.
async fn serve_db(mesh: &Mesh, ip: &str) {
    let listener = mesh
        .bind(format!("{ip}:15432").parse().expect("addr"))
        .await
        .expect("bind db");
    let m = mesh.clone();
    tokio::spawn(async move {
        m.serve_tcp(listener, |mut conn: nasp::TcpConnection| async move {
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
}

/// The samples of `family` in `mesh`'s exposition: labels and value.
fn samples(mesh: &Mesh, family: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let text = mesh.metrics().prometheus_text();
    let prefix = format!("{family}{{");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((parse_labels(labels), value.trim().parse().ok()?))
        })
        .collect()
}

/// `a="x",b="y"` (with `\"` and `\\` escapes) as a map.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The sum of the samples whose labels include every `want` pair exactly.
fn sum(mesh: &Mesh, family: &str, want: &[(&str, &str)]) -> f64 {
    samples(mesh, family)
        .iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Polls until `sum(..) == want`, up to 10 s (the server records in
/// `proxy_on_log`, which may run just after the answer).
async fn counted(mesh: &Mesh, family: &str, want_labels: &[(&str, &str)], want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = sum(mesh, family, want_labels);
        if got == want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{family} {want_labels:?}: {got}, want {want}; registry:\n{}",
                mesh.metrics().prometheus_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` GETs of `path` on echo through `mesh`; each answered `status` with
/// `want_body`, none carrying the peer's metadata headers back to the caller.
async fn get_echo(
    mesh: &Mesh,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
    status: u16,
    want_body: &[u8],
) {
    let client = mesh.http_client();
    for _ in 0..n {
        let mut req = http::Request::get(format!("http://echo.demo:18080{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = client
            .send(req.body(Body::empty()).expect("request"))
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
        assert_eq!(
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(want_body)
        );
    }
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

/// Neither metadata header in what the gRPC server saw or the client got.
fn no_peer_metadata(
    server_saw: &std::collections::HashMap<String, String>,
    client_got: &tonic::metadata::MetadataMap,
) {
    for h in PEER_HEADERS {
        assert!(
            !server_saw.contains_key(h),
            "{h} reached the gRPC server: {server_saw:?}"
        );
        assert!(
            client_got.get(h).is_none(),
            "{h} reached the gRPC client: {client_got:?}"
        );
    }
}

/// Every label of a standard series, `web` calling `echo`: `(side, protocol,
/// response_code, grpc_response_status)`; `service` as each side names it.
fn standard_labels<'a>(
    reporter: &'a str,
    service: &'a str,
    principals: &'a (String, String),
    protocol: &'a str,
    code: &'a str,
    grpc: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut l = peer_labels(reporter, service, principals);
    l.extend([
        ("request_protocol", protocol),
        ("response_flags", "-"),
        (
            "connection_security_policy",
            // Istio's source reporter does not know the policy.
            if reporter == "source" {
                "unknown"
            } else {
                "mutual_tls"
            },
        ),
        ("response_code", code),
        ("grpc_response_status", grpc),
    ]);
    l
}

/// The peer labels (Istio's `count_peer_labels`: up to
/// `destination_cluster`), `web` calling `echo`.
fn peer_labels<'a>(
    reporter: &'a str,
    service: &'a str,
    principals: &'a (String, String),
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", "web"),
        ("source_workload_namespace", "demo"),
        ("source_principal", principals.0.as_str()),
        ("source_app", "web"),
        ("source_version", "v1"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "latest"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "echo"),
        ("destination_workload_namespace", "demo"),
        ("destination_principal", principals.1.as_str()),
        ("destination_app", "echo"),
        ("destination_version", "v1"),
        // Both sides name the service as Istio does: outbound from the
        // cluster's metadata, inbound from the services the local workload
        // is an endpoint of (docs/telemetry.md).
        ("destination_service", service),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "demo"),
        ("destination_canonical_service", "echo"),
        ("destination_canonical_revision", "latest"),
        ("destination_cluster", "Kubernetes"),
    ]
}

/// A sample with exactly these labels (no more, no fewer) has `want`.
async fn exactly(mesh: &Mesh, family: &str, labels: &[(&str, &str)], want: f64) {
    counted(mesh, family, labels, want).await;
    let keys: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
    for (l, _) in samples(mesh, family).iter().filter(|(l, _)| {
        labels
            .iter()
            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
    }) {
        let got: Vec<&str> = l.keys().map(String::as_str).collect();
        let mut want_keys = keys.clone();
        want_keys.sort_unstable();
        assert_eq!(got, want_keys, "{family}: the labels of {l:?}");
    }
}

async fn two_meshes(rt: &str, base: u8) {
    let cp = common::control_plane(&ip(base, 1), &mesh_file(base)).await;
    let echo_ip = ip(base, 2);
    let echo = workload(&cp, rt, "echo", &echo_ip)
        .build()
        .await
        .expect("echo");
    let seen = serve_echo(&echo, &echo_ip).await;
    let db = workload(&cp, rt, "db", &ip(base, 4))
        .build()
        .await
        .expect("db");
    serve_db(&db, &ip(base, 4)).await;
    let web = workload(&cp, rt, "web", &ip(base, 3))
        .build()
        .await
        .expect("web");
    let principals = (spiffe("web"), spiffe("echo"));
    let (out_http, in_http) = ("echo.demo.svc.cluster.local", "echo.demo.svc.cluster.local");
    let (out_grpc, in_grpc) = ("echo.demo.svc.cluster.local", "echo.demo.svc.cluster.local");

    // HTTP: 3 × 200, 2 × 404.
    get_echo(&web, "/", &[], 3, 200, b"echo").await;
    get_echo(&web, "/missing", &[], 2, 404, b"echo").await;
    for (code, n) in [("200", 3.0), ("404", 2.0)] {
        let src = standard_labels("source", out_http, &principals, "http", code, "");
        exactly(&web, "istio_requests_total", &src, n).await;
        let dst = standard_labels("destination", in_http, &principals, "http", code, "");
        exactly(&echo, "istio_requests_total", &dst, n).await;
        for family in [
            "istio_request_duration_milliseconds_count",
            "istio_request_bytes_count",
            "istio_response_bytes_count",
        ] {
            counted(&web, family, &src, n).await;
            counted(&echo, family, &dst, n).await;
        }
    }

    // gRPC: two unary calls, a stream of 3 answers, a stream refused with
    // INVALID_ARGUMENT (no answer).
    let channel = web.grpc_channel("http://echo.demo:19090").expect("channel");
    let mut client = EchoClient::new(channel);
    for i in 0..2 {
        let resp = client
            .echo(EchoRequest {
                message: format!("hi {i}"),
                count: 0,
            })
            .await
            .expect("unary call");
        let headers = resp.metadata().clone();
        let reply = resp.into_inner();
        assert_eq!(reply.message, format!("hi {i}"));
        assert_eq!(reply.peer, spiffe("web"));
        no_peer_metadata(&reply.metadata, &headers);
    }
    let resp = client
        .echo_stream(EchoRequest {
            message: "s".into(),
            count: 3,
        })
        .await
        .expect("stream call");
    let headers = resp.metadata().clone();
    let mut stream = resp.into_inner();
    let mut answers = Vec::new();
    while let Some(m) = stream.message().await.expect("stream message") {
        no_peer_metadata(&m.metadata, &headers);
        answers.push(m.index);
    }
    assert_eq!(answers, vec![0, 1, 2]);
    let refused = client
        .echo_stream(EchoRequest {
            message: "too many".into(),
            count: u32::MAX,
        })
        .await;
    match refused {
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument),
        Ok(_) => panic!("a stream over the limit was accepted"),
    }
    for (status, n) in [("0", 3.0), ("3", 1.0)] {
        let src = standard_labels("source", out_grpc, &principals, "grpc", "200", status);
        exactly(&web, "istio_requests_total", &src, n).await;
        let dst = standard_labels("destination", in_grpc, &principals, "grpc", "200", status);
        exactly(&echo, "istio_requests_total", &dst, n).await;
    }
    // Messages: 4 requests; 1 + 1 + 3 + 0 answers, on both sides, with the
    // peer labels only.
    for (mesh, reporter, service) in [(&web, "source", out_grpc), (&echo, "destination", in_grpc)] {
        let labels = peer_labels(reporter, service, &principals);
        exactly(mesh, "istio_request_messages_total", &labels, 4.0).await;
        exactly(mesh, "istio_response_messages_total", &labels, 5.0).await;
    }

    // Each side reports only as itself.
    for family in ["istio_requests_total", "istio_request_messages_total"] {
        assert_eq!(sum(&web, family, &[("reporter", "destination")]), 0.0);
        assert_eq!(sum(&echo, family, &[("reporter", "source")]), 0.0);
    }
    // The metadata headers never reached the HTTP application.
    let seen_http = seen.lock().expect("seen").clone();
    assert_eq!(seen_http.len(), 5);
    for headers in &seen_http {
        for h in PEER_HEADERS {
            assert!(!headers.contains_key(h), "{h} reached echo: {headers:?}");
        }
    }

    // TCP, with the exchange's ALPN: exact application bytes both ways,
    // both sides' series.
    let mut conn = web.connect("db.demo:15432").await.expect("connect");
    assert_eq!(conn.upstream().alpn.as_deref(), Some("istio-peer-exchange"));
    let got = greeted_and_echoed(&mut conn).await;
    assert_eq!(got, b"hello\nping", "{:?}", String::from_utf8_lossy(&got));
    drop(conn);
    let db_id = spiffe("db");
    let tcp = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "web"),
            ("source_principal", principals.0.as_str()),
            ("destination_workload", "db"),
            ("destination_principal", db_id.as_str()),
            ("destination_app", "db"),
            ("destination_service", "db.demo.svc.cluster.local"),
            ("destination_service_name", "db"),
            ("request_protocol", "tcp"),
            (
                "connection_security_policy",
                if reporter == "source" {
                    "unknown"
                } else {
                    "mutual_tls"
                },
            ),
        ]
    };
    for (mesh, labels) in [(&web, tcp("source")), (&db, tcp("destination"))] {
        counted(mesh, "istio_tcp_connections_opened_total", &labels, 1.0).await;
        counted(mesh, "istio_tcp_connections_closed_total", &labels, 1.0).await;
    }
    counted(&web, "istio_tcp_received_bytes_total", &tcp("source"), 4.0).await;
    counted(&web, "istio_tcp_sent_bytes_total", &tcp("source"), 10.0).await;
    counted(
        &db,
        "istio_tcp_received_bytes_total",
        &tcp("destination"),
        4.0,
    )
    .await;
    counted(&db, "istio_tcp_sent_bytes_total", &tcp("destination"), 10.0).await;

    // A caller without the defaults sends no metadata: echo reports its
    // calls with `unknown` peer labels (the principal still comes from
    // mTLS), and it reports nothing itself.
    let bare = workload(&cp, rt, "bare", &ip(base, 5))
        .no_default_filters()
        .build()
        .await
        .expect("bare");
    get_echo(&bare, "/", &[], 2, 200, b"echo").await;
    let mut bare_client = EchoClient::new(
        bare.grpc_channel("http://echo.demo:19090")
            .expect("channel"),
    );
    let reply = bare_client
        .echo(EchoRequest {
            message: "bare".into(),
            count: 0,
        })
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(reply.peer, spiffe("bare"));
    let bare_id = spiffe("bare");
    let unknown_peer = |protocol: &'static str| {
        vec![
            ("reporter", "destination"),
            ("source_workload", "unknown"),
            ("source_workload_namespace", "unknown"),
            ("source_app", "unknown"),
            ("source_version", "unknown"),
            ("source_canonical_service", "unknown"),
            ("source_cluster", "unknown"),
            ("source_principal", bare_id.as_str()),
            ("destination_workload", "echo"),
            ("destination_app", "echo"),
            ("request_protocol", protocol),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ]
    };
    counted(&echo, "istio_requests_total", &unknown_peer("http"), 2.0).await;
    counted(&echo, "istio_requests_total", &unknown_peer("grpc"), 1.0).await;
    let unknown_messages = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("source_principal", bare_id.as_str()),
    ];
    counted(
        &echo,
        "istio_request_messages_total",
        &unknown_messages,
        1.0,
    )
    .await;
    counted(
        &echo,
        "istio_response_messages_total",
        &unknown_messages,
        1.0,
    )
    .await;
    let bare_text = bare.metrics().prometheus_text();
    assert!(!bare_text.contains("istio_"), "bare reported:\n{bare_text}");
    let seen_http = seen.lock().expect("seen").clone();
    assert_eq!(seen_http.len(), 7);
    for headers in &seen_http {
        for h in PEER_HEADERS {
            assert!(!headers.contains_key(h), "{h} reached echo: {headers:?}");
        }
    }
    // No trap anywhere in all this.
    for m in [&web, &echo, &db] {
        assert!(samples(m, nasp::wasm::TRAPS_METRIC).is_empty());
    }

    for m in [bare, web, echo, db] {
        m.shutdown().await;
    }
}

/// The default chain with stats reporting every `period` (Istio's
/// `tcp_reporting_duration`) instead of every 15 s.
fn reporting_every(b: MeshBuilder, period: &str) -> MeshBuilder {
    let mut b = b.no_default_filters();
    for mut s in nasp::default_filters::specs() {
        if s.config.name == "istio.stats" {
            s.config = s
                .config
                .configuration(format!(r#"{{"tcp_reporting_duration": "{period}"}}"#));
        }
        b = b.filter(s);
    }
    b
}

/// Istio's recurrent TCP reports: a connection open on both sides that has
/// moved no byte yet is reported as opened on the tick (every 0.5 s here),
/// once however many ticks pass, long before it closes; then closed once it
/// does. Before the ticks it was counted only at its first byte or its
/// close.
async fn idle_tcp(rt: &str, base: u8) {
    let cp = common::control_plane(&ip(base, 1), &mesh_file(base)).await;
    let db = reporting_every(workload(&cp, rt, "db", &ip(base, 4)), "0.5s")
        .build()
        .await
        .expect("db");
    let listener = db
        .bind(format!("{}:15432", ip(base, 4)).parse().expect("addr"))
        .await
        .expect("bind db");
    let (release, released) = tokio::sync::watch::channel(false);
    let d = db.clone();
    tokio::spawn(async move {
        // Says nothing; hangs up when told.
        d.serve_tcp(listener, move |conn: nasp::TcpConnection| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                drop(conn);
            }
        })
        .await;
    });
    let web = reporting_every(workload(&cp, rt, "web", &ip(base, 3)), "0.5s")
        .build()
        .await
        .expect("web");
    let conn = web.connect("db.demo:15432").await.expect("connect");
    let source = [("reporter", "source"), ("source_workload", "web")];
    let destination = [("reporter", "destination"), ("destination_workload", "db")];
    counted(&web, "istio_tcp_connections_opened_total", &source, 1.0).await;
    counted(&db, "istio_tcp_connections_opened_total", &destination, 1.0).await;
    // More ticks pass while it stays open: counted once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (mesh, labels) in [(&web, &source), (&db, &destination)] {
        assert_eq!(sum(mesh, "istio_tcp_connections_opened_total", labels), 1.0);
        // Reported as it stands: open, nothing moved.
        for family in [
            "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ] {
            assert_eq!(sum(mesh, family, labels), 0.0, "{family}");
        }
    }
    let _ = release.send(true);
    drop(conn);
    counted(&web, "istio_tcp_connections_closed_total", &source, 1.0).await;
    counted(&db, "istio_tcp_connections_closed_total", &destination, 1.0).await;
    for m in [web, db] {
        m.shutdown().await;
    }
}

fn conformance_filter() -> FilterSpec {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/filters/conformance.wasm"
    );
    let wasm: Arc<[u8]> = std::fs::read(path)
        .unwrap_or_else(|e| {
            panic!("{path}: {e}; build the filters with `cargo xtask build-filters`")
        })
        .into();
    FilterSpec {
        wasm,
        // As the default chain's plugins are: fail-open.
        config: PluginConfig::new("conformance").fail_policy(FailPolicy::FailOpen),
        direction: FilterDirection::Outbound,
        kind: FilterKind::Http,
    }
}

/// `web` runs the defaults plus the conformance filter, fail-open, on one
/// worker: the request that makes it trap and every one after it are
/// answered; the trap is counted once (the instance is not called again)
/// with the plugin, direction and runtime; the stats filter before it
/// still counts every request on both sides.
async fn trap(rt: &str, base: u8) {
    let cp = common::control_plane(&ip(base, 1), &mesh_file(base)).await;
    let echo_ip = ip(base, 2);
    let echo = workload(&cp, rt, "echo", &echo_ip)
        .build()
        .await
        .expect("echo");
    let seen = serve_echo(&echo, &echo_ip).await;
    let web = workload(&cp, rt, "web", &ip(base, 3))
        .filter(conformance_filter())
        .filter_workers(1)
        .build()
        .await
        .expect("web");
    let traps = [
        ("plugin", "conformance"),
        ("direction", "outbound"),
        ("runtime", rt),
    ];

    // The conformance filter marks the answers it sees.
    get_echo(&web, "/", &[], 1, 200, b"echo [filtered]").await;
    assert_eq!(sum(&web, nasp::wasm::TRAPS_METRIC, &[]), 0.0);
    get_echo(&web, "/", &[("x-conformance", "trap")], 1, 200, b"echo").await;
    exactly(&web, nasp::wasm::TRAPS_METRIC, &traps, 1.0).await;
    // Skipped from now on: the answers come back unmarked.
    get_echo(&web, "/", &[("x-conformance", "trap")], 3, 200, b"echo").await;
    assert_eq!(sum(&web, nasp::wasm::TRAPS_METRIC, &traps), 1.0);
    assert!(samples(&echo, nasp::wasm::TRAPS_METRIC).is_empty());

    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 5, "every request reached the application");
    assert!(
        seen[0].contains_key("x-conformance-seen"),
        "the filter ran before the trap: {:?}",
        seen[0]
    );
    for headers in &seen[2..] {
        assert!(
            !headers.contains_key("x-conformance-seen"),
            "the trapped plugin is skipped: {headers:?}"
        );
    }
    let out = [
        ("reporter", "source"),
        ("response_code", "200"),
        ("destination_workload", "echo"),
    ];
    counted(&web, "istio_requests_total", &out, 5.0).await;
    let inb = [
        ("reporter", "destination"),
        ("response_code", "200"),
        ("source_workload", "web"),
    ];
    counted(&echo, "istio_requests_total", &inb, 5.0).await;
    web.shutdown().await;
    echo.shutdown().await;
}
