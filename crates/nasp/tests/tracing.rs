//! Tracing through two `Mesh` workloads on loopback (127.0.10.0/24, the
//! embedded control plane, mTLS), the spans exported over OTLP/gRPC to an
//! in-process collector (the OTLP `TraceService` on a tonic server): one
//! trace across client and server spans with Istio's names and tags, the
//! application's calls continuing it, W3C and B3 contexts from callers
//! continued, an unsampled caller honoured, the headers each application
//! is handed, and an unreachable collector costing no request.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::trace::{Propagator, TracingConfig};
use nasp::transport::Body;
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClientExt as _};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};

const MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.10.2 }
"#;

/// One span as the collector got it, with its resource's `service.name`.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.clone())
            .map(|v| match v {
                Value::StringValue(s) => s,
                other => format!("{other:?}"),
            })
    }

    fn trace(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The in-process OTLP collector: every span exported to it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
    exports: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        drop(spans);
        self.exports.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves the collector on `ip`; returns its OTLP endpoint.
    async fn start(&self, ip: &str) -> String {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        format!("http://{addr}")
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().expect("spans").clone()
    }

    /// The spans of `trace` once there are `n`, within 15 s.
    async fn trace(&self, trace: &str, n: usize) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let wait = self.exports.notified();
            let got: Vec<Got> = self
                .all()
                .into_iter()
                .filter(|g| g.trace() == trace)
                .collect();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                panic!(
                    "{} spans of trace {trace} within 15 s, {n} expected: {:#?}",
                    got.len(),
                    self.all()
                );
            }
        }
    }
}

async fn workload(
    cp: &ControlPlane,
    name: &str,
    ip: &str,
    tracing: Option<TracingConfig>,
    default_filters: bool,
) -> Mesh {
    Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: format!("{name}-1"),
            namespace: "demo".into(),
            service_account: name.into(),
            instance_ips: vec![ip.into()],
            labels: [
                ("app".to_string(), name.to_string()),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .filter_workers(1)
        .default_filters(default_filters)
        .ready_timeout(Duration::from_secs(20))
        .tracing(tracing)
        .build()
        .await
        .expect("joined")
}

/// What the serving application was handed, per path.
type Seen = Arc<Mutex<HashMap<String, http::HeaderMap>>>;

/// `echo` on 127.0.10.2:18080: `/hop` calls `/leaf` through its own mesh
/// passing the trace headers on, `/hop-context` calls it passing nothing,
/// `/fail` answers 503, anything else 200. Records each request's headers.
async fn serve_echo(echo: &Mesh) -> (Seen, tokio::task::JoinHandle<()>) {
    let listener = echo
        .bind("127.0.10.2:18080".parse::<SocketAddr>().expect("addr"))
        .await
        .expect("bind");
    let seen: Seen = Arc::default();
    let (s, client) = (seen.clone(), echo.http_client());
    let app = tower::service_fn(move |req: http::Request<Body>| {
        let (seen, client) = (s.clone(), client.clone());
        async move {
            let path = req.uri().path().to_string();
            seen.lock()
                .expect("seen")
                .insert(path.clone(), req.headers().clone());
            let status = match path.as_str() {
                "/hop" | "/hop-context" => {
                    let mut call = http::Request::get("http://echo.demo:18080/leaf");
                    if path == "/hop" {
                        // Istio's model: the application passes the
                        // trace headers it was handed on.
                        for (k, v) in req.headers() {
                            if k.as_str().starts_with("x-b3-")
                                || k == "traceparent"
                                || k == "tracestate"
                                || k == "x-request-id"
                            {
                                call = call.header(k, v);
                            }
                        }
                    }
                    let resp = client
                        .send(call.body(Body::empty()).expect("request"))
                        .await
                        .expect("leaf call");
                    let _ = resp.into_body().collect_bytes().await;
                    200
                }
                "/fail" => 503,
                _ => 200,
            };
            let _ = req.into_body().collect_bytes().await;
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(status)
                    .body(Body::from("echo"))
                    .expect("response"),
            )
        }
    });
    let e = echo.clone();
    let served = tokio::spawn(async move { e.serve(listener, app).await });
    (seen, served)
}

fn header(seen: &Seen, path: &str, name: &str) -> Option<String> {
    seen.lock()
        .expect("seen")
        .get(path)?
        .get(name)
        .map(|v| v.to_str().expect("ascii").to_string())
}

async fn get(web: &Mesh, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = http::Request::get(format!("http://echo.demo:18080{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = web
        .http_client()
        .send(req.body(Body::empty()).expect("request"))
        .await
        .expect("sent");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect_bytes().await;
    status
}

fn one<'a>(spans: &'a [Got], what: &str, f: impl Fn(&Got) -> bool) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|g| f(g)).collect();
    assert_eq!(found.len(), 1, "{what}: {spans:#?}");
    found[0]
}

fn kind(g: &Got) -> SpanKind {
    SpanKind::try_from(g.span.kind).expect("kind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_spans_make_one_trace_with_istios_tags() {
    let collector = Collector::default();
    let endpoint = collector.start("127.0.10.4").await;
    let config = TracingConfig::otlp(&endpoint)
        .sampling(100.0)
        .export_interval(Duration::from_millis(100));
    let cp = common::control_plane("127.0.10.1", &MeshFile::parse(MESH).expect("mesh")).await;
    let echo = workload(&cp, "echo", "127.0.10.2", Some(config.clone()), true).await;
    let (seen, served) = serve_echo(&echo).await;
    let web = workload(&cp, "web", "127.0.10.3", Some(config), true).await;

    // web → echo /hop → (echo's application, headers passed on) → echo /leaf.
    let status = get(
        &web,
        "/hop",
        &[("x-request-id", "req-7"), ("user-agent", "nasp-test/1")],
    )
    .await;
    assert_eq!(status, 200);
    // The application at /hop was handed the server span's context in
    // both formats (W3C and B3, the defaults).
    let tp = header(&seen, "/hop", "traceparent").expect("traceparent handed to the app");
    let trace = tp[3..35].to_string();
    let spans = collector.trace(&trace, 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");

    let web_client = one(&spans, "web's client span", |g| {
        g.service == "web.demo" && kind(g) == SpanKind::Client
    });
    let hop_server = one(&spans, "echo's /hop server span", |g| {
        kind(g) == SpanKind::Server && g.attr("http.url").is_some_and(|u| u.ends_with("/hop"))
    });
    let echo_client = one(&spans, "echo's client span", |g| {
        g.service == "echo.demo" && kind(g) == SpanKind::Client
    });
    let leaf_server = one(&spans, "echo's /leaf server span", |g| {
        kind(g) == SpanKind::Server && g.attr("http.url").is_some_and(|u| u.ends_with("/leaf"))
    });
    // One chain of parents, the first a root.
    assert!(web_client.span.parent_span_id.is_empty(), "{web_client:#?}");
    assert_eq!(hop_server.parent(), web_client.id());
    assert_eq!(echo_client.parent(), hop_server.id());
    assert_eq!(leaf_server.parent(), echo_client.id());
    assert_eq!(hop_server.service, "echo.demo");
    // The application was handed its server span, in W3C and B3.
    assert_eq!(tp, format!("00-{trace}-{}-01", hop_server.id()));
    assert_eq!(
        header(&seen, "/hop", "x-b3-traceid").as_deref(),
        Some(trace.as_str())
    );
    assert_eq!(header(&seen, "/hop", "x-b3-spanid"), Some(hop_server.id()));
    assert_eq!(
        header(&seen, "/hop", "x-b3-parentspanid"),
        Some(web_client.id())
    );
    assert_eq!(header(&seen, "/hop", "x-b3-sampled").as_deref(), Some("1"));
    assert_eq!(
        header(&seen, "/leaf", "traceparent"),
        Some(format!("00-{trace}-{}-01", leaf_server.id()))
    );

    // Envoy's span name and tags, Istio's custom tags.
    let c = web_client;
    assert_eq!(c.span.name, "echo.demo.svc.cluster.local:18080/*");
    let expect = [
        ("http.method", "GET"),
        ("http.url", "http://echo.demo:18080/hop"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "200"),
        ("response_flags", "-"),
        (
            "upstream_cluster",
            "outbound|18080||echo.demo.svc.cluster.local",
        ),
        (
            "upstream_cluster.name",
            "outbound|18080||echo.demo.svc.cluster.local",
        ),
        ("upstream_address", "127.0.10.2:18080"),
        ("peer.address", "127.0.10.3"),
        ("guid:x-request-id", "req-7"),
        ("user_agent", "nasp-test/1"),
        ("request_size", "0"),
        ("response_size", "4"),
        ("component", "proxy"),
        ("downstream_cluster", "-"),
        ("istio.canonical_service", "web"),
        ("istio.canonical_revision", "v1"),
        ("istio.namespace", "demo"),
        ("istio.mesh_id", "cluster.local"),
        (
            "node_id",
            "sidecar~127.0.10.3~web-1.demo~demo.svc.cluster.local",
        ),
    ];
    for (k, v) in expect {
        assert_eq!(c.attr(k).as_deref(), Some(v), "{k} on {c:#?}");
    }
    let s = hop_server;
    assert_eq!(s.span.name, "echo.demo:18080/*");
    for (k, v) in [
        ("http.status_code", "200"),
        ("upstream_cluster", "inbound|18080||"),
        ("upstream_address", "127.0.10.2:18080"),
        ("guid:x-request-id", "req-7"),
        ("istio.canonical_service", "echo"),
        ("response_size", "4"),
    ] {
        assert_eq!(s.attr(k).as_deref(), Some(v), "{k} on {s:#?}");
    }
    // The caller's address as the server saw it (on loopback the client
    // does not bind its instance IP).
    let peer: std::net::IpAddr = s
        .attr("peer.address")
        .expect("peer.address")
        .parse()
        .expect("an IP");
    assert!(peer.is_loopback(), "{peer}");
    assert_ne!(
        s.span.status.as_ref().map(|st| st.code),
        Some(StatusCode::Error as i32)
    );

    // An application call that passes no headers continues the trace of
    // the request it serves (the handler runs in the server span's
    // context).
    assert_eq!(get(&web, "/hop-context", &[]).await, 200);
    let tp = header(&seen, "/hop-context", "traceparent").expect("traceparent");
    let spans = collector.trace(&tp[3..35], 4).await;
    let server = one(&spans, "/hop-context server", |g| {
        kind(g) == SpanKind::Server
            && g.attr("http.url")
                .is_some_and(|u| u.ends_with("/hop-context"))
    });
    let inner = one(&spans, "echo's client span", |g| {
        g.service == "echo.demo" && kind(g) == SpanKind::Client
    });
    assert_eq!(inner.parent(), server.id());

    // A 503: both spans are errors.
    assert_eq!(get(&web, "/fail", &[]).await, 503);
    let tp = header(&seen, "/fail", "traceparent").expect("traceparent");
    let spans = collector.trace(&tp[3..35], 2).await;
    for g in &spans {
        assert_eq!(g.attr("http.status_code").as_deref(), Some("503"));
        assert_eq!(g.attr("error").as_deref(), Some("true"), "{g:#?}");
        assert_eq!(
            g.span.status.as_ref().map(|st| st.code),
            Some(StatusCode::Error as i32),
            "{g:#?}"
        );
    }

    web.shutdown().await;
    echo.shutdown().await;
    let _ = served.await;
}

const T1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const T2: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const T3: &str = "6bf92f3577b34da6a3ce929d0e0e4738";
const T4: &str = "7bf92f3577b34da6a3ce929d0e0e4739";
const CALLER: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_w3c_and_b3_contexts_are_continued_and_their_decision_honoured() {
    let collector = Collector::default();
    let endpoint = collector.start("127.0.10.14").await;
    // Nothing sampled of new traces: every span exported comes from a
    // caller's decision.
    let config = TracingConfig::otlp(&endpoint)
        .sampling(0.0)
        .export_interval(Duration::from_millis(100));
    let cp = common::control_plane("127.0.10.11", &MeshFile::parse(MESH_B).expect("mesh")).await;
    // echo writes B3's single header only.
    let echo = workload(
        &cp,
        "echo",
        "127.0.10.12",
        Some(config.clone().propagators([Propagator::B3Single])),
        false,
    )
    .await;
    let listener = echo
        .bind("127.0.10.12:18080".parse::<SocketAddr>().expect("addr"))
        .await
        .expect("bind");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = tower::service_fn(move |req: http::Request<Body>| {
        let seen = s.clone();
        async move {
            seen.lock()
                .expect("seen")
                .insert(req.uri().path().to_string(), req.headers().clone());
            Ok::<_, Infallible>(http::Response::new(Body::from("ok")))
        }
    });
    let e = echo.clone();
    let served = tokio::spawn(async move { e.serve(listener, app).await });
    let web = workload(&cp, "web", "127.0.10.13", Some(config), false).await;

    // Unsampled by the caller, and a new trace at 0 %: no spans, the
    // decision passed on.
    let unsampled = format!("00-{T4}-{CALLER}-00");
    assert_eq!(get(&web, "/t4", &[("traceparent", &unsampled)]).await, 200);
    assert_eq!(get(&web, "/new", &[]).await, 200);
    let b3 = header(&seen, "/t4", "b3").expect("b3 handed to the app");
    let parts: Vec<&str> = b3.split('-').collect();
    // {trace}-{server span}-{sampled}-{parent: the client span}
    assert_eq!((parts.len(), parts[0], parts[2]), (4, T4, "0"), "{b3}");
    assert_eq!(
        header(&seen, "/t4", "traceparent"),
        None,
        "only b3 configured"
    );
    assert_eq!(header(&seen, "/t4", "x-b3-traceid"), None);
    let b3 = header(&seen, "/new", "b3").expect("b3 on a new trace");
    let parts: Vec<&str> = b3.split('-').collect();
    assert_eq!((parts.len(), parts[2]), (4, "0"), "{b3}");

    // Sampled callers, in each format: continued.
    let w3c = format!("00-{T1}-{CALLER}-01");
    assert_eq!(
        get(
            &web,
            "/t1",
            &[("traceparent", &w3c), ("tracestate", "congo=t61rcWkgMzE")]
        )
        .await,
        200
    );
    let single = format!("{T2}-{CALLER}-1");
    assert_eq!(get(&web, "/t2", &[("b3", &single)]).await, 200);
    assert_eq!(
        get(
            &web,
            "/t3",
            &[
                ("x-b3-traceid", T3),
                ("x-b3-spanid", CALLER),
                ("x-b3-sampled", "1"),
            ],
        )
        .await,
        200
    );
    for (trace, path) in [(T1, "/t1"), (T2, "/t2"), (T3, "/t3")] {
        let spans = collector.trace(trace, 2).await;
        let client = one(&spans, "client", |g| kind(g) == SpanKind::Client);
        let server = one(&spans, "server", |g| kind(g) == SpanKind::Server);
        assert_eq!(client.parent(), CALLER, "{path}");
        assert_eq!(server.parent(), client.id(), "{path}");
        assert_eq!(
            header(&seen, path, "b3"),
            Some(format!("{trace}-{}-1-{}", server.id(), client.id())),
            "{path}"
        );
    }
    // W3C's tracestate travels with the trace.
    let spans = collector.trace(T1, 2).await;
    assert!(
        spans
            .iter()
            .all(|g| g.span.trace_state == "congo=t61rcWkgMzE"),
        "{spans:#?}"
    );

    // Everything is flushed at shutdown: still nothing of T4 nor of the
    // new trace.
    web.shutdown().await;
    echo.shutdown().await;
    let _ = served.await;
    let all = collector.all();
    assert_eq!(all.len(), 6, "only T1–T3's spans: {all:#?}");
    assert!(all.iter().all(|g| g.trace() != T4));
}

const MESH_B: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.10.12 }
"#;

const MESH_C: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.10.22 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_loses_no_request() {
    // Nothing listens there: every export fails.
    let config = TracingConfig::otlp("http://127.0.10.29:9")
        .sampling(100.0)
        .export_interval(Duration::from_millis(50))
        .export_timeout(Duration::from_secs(1));
    let cp = common::control_plane("127.0.10.21", &MeshFile::parse(MESH_C).expect("mesh")).await;
    let echo = workload(&cp, "echo", "127.0.10.22", Some(config.clone()), false).await;
    let listener = echo
        .bind("127.0.10.22:18080".parse::<SocketAddr>().expect("addr"))
        .await
        .expect("bind");
    let app = tower::service_fn(|_req: http::Request<Body>| async {
        Ok::<_, Infallible>(http::Response::new(Body::from("ok")))
    });
    let e = echo.clone();
    let served = tokio::spawn(async move { e.serve(listener, app).await });
    let web = workload(&cp, "web", "127.0.10.23", Some(config), false).await;
    for i in 0..40 {
        assert_eq!(get(&web, &format!("/r{i}"), &[]).await, 200, "request {i}");
    }
    // Shutdown gives up on the collector instead of hanging.
    tokio::time::timeout(Duration::from_secs(20), async {
        web.shutdown().await;
        echo.shutdown().await;
    })
    .await
    .expect("shutdown with an unreachable collector");
    let _ = served.await;
}

#[tokio::test]
async fn from_env_reads_the_collector_and_sampling() {
    let get = |k: &str| match k {
        "DISCOVERY_ADDRESS" => Some("127.0.10.31:15012".to_string()),
        "ROOT_CERT" => Some("/nonexistent/root.pem".to_string()),
        "NASP_OTLP_ENDPOINT" => Some("collector:4317".to_string()),
        _ => None,
    };
    let e = nasp::MeshBuilder::from_lookup(get).expect_err("no scheme");
    assert!(e.to_string().contains("NASP_OTLP_ENDPOINT"), "{e}");
}
