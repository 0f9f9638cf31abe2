//! The default telemetry chain's cost per HTTP request (issue 10, item 8):
//! one request through the transport's filter layer with nasp's default
//! chain (metadata exchange, then Istio stats) against the same request
//! through the same layer with no filters, on each runtime, in one run.
//!
//! What runs, in one thread, without sockets (the network and TLS are the
//! same with and without filters, and are measured by the transport
//! benchmark): the outbound [`HttpFilterLayer`] of a `web` workload whose
//! inner service is the inbound layer of an `echo` workload around an
//! application answering `200` with 5 bytes — a sidecar pair, so the
//! outbound exchange's header reaches the inbound filter, which strips it
//! and answers its own, which the outbound filter reads. The response's
//! `Upstream` (cluster, endpoint, SAN) and the request's `MeshPeer` are
//! what the client and listener attach in a `Mesh`.
//!
//! Cases per runtime: `outbound` (the client's chain alone, the server with
//! no filters), `inbound` (the server's alone), `pair` (both), and
//! `lean_plugin` (outbound, `filters/headers` alone: what any one plugin
//! costs), `noop_x1` and `noop_x2` (outbound, one or two plugins that do
//! nothing in any callback: the filter layer's fixed cost, and what one
//! more module's callback entries add); `none` (both layers empty) is the
//! baseline. The chain's cost is `case − none`.
//! Run with `cargo bench -p nasp --bench telemetry` (or `cargo xtask bench
//! telemetry`); results in docs/benchmarks.md. `NASP_BENCH_RUNTIMES=wasmtime`
//! (a comma-separated list) sets up only those runtimes: criterion's name
//! filter skips cases but not their set-up, whose first requests (wasmi
//! compiles lazily) would otherwise land in a profile of the loop.
//!
//! Instruction counts (`cargo xtask bench telemetry --instructions`): with
//! `NASP_BENCH_ITERS=N` and `NASP_BENCH_CASE=wasmtime/outbound` the bench
//! sends that case's request N times in a plain loop instead of running
//! criterion; xtask runs it under callgrind twice (two values of N), so the
//! difference is N requests without any set-up, a count that does not move
//! with the machine as times do.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use nasp::transport::filter::NodeProperties;
use nasp::transport::filter::{ChainPool, HttpFilterLayer, ListenerDirection, ListenerProperties};
use nasp::transport::{Body, MeshPeer, Upstream};
use nasp::wasm::{HostEnv, LogLevel, LogRecord, LogSink, PluginConfig, WasmModule};
use nasp::xds::WorkloadSettings;
use nasp::{FilterDirection, FilterKind};
use tower::{Layer, Service, ServiceExt};

fn workload(name: &str, ns: &str, ip: &str) -> Arc<NodeProperties> {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("app".to_string(), name.to_string());
    labels.insert("version".to_string(), "v1".to_string());
    let s = WorkloadSettings {
        pod_name: format!("{name}-5d4f8c9b7-abcde"),
        namespace: ns.into(),
        service_account: name.into(),
        workload_name: name.into(),
        instance_ips: vec![ip.into()],
        labels,
        app_containers: vec![name.into()],
        ..WorkloadSettings::default()
    };
    Arc::new(NodeProperties::from_settings(&s))
}

/// A plugin that does nothing in every stream callback: what the filter
/// layer and the callbacks' entries cost, without any host call.
const NOOP: &str = r#"(module
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "malloc") (param i32) (result i32)
      (local i32) global.get $heap local.set 1
      global.get $heap local.get 0 i32.add global.set $heap local.get 1)
    (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
    (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
    (func (export "proxy_on_context_create") (param i32 i32))
    (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)
    (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) i32.const 0)
    (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) i32.const 0)
    (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) i32.const 0)
    (func (export "proxy_on_done") (param i32) (result i32) i32.const 1)
    (func (export "proxy_on_log") (param i32))
    (func (export "proxy_on_delete") (param i32)))"#;

/// `filters/headers`, built by `cargo xtask build-filters`.
fn lean_filter() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/filters/headers.wasm"
    );
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the filters first: cargo xtask build-filters")
    })
}

fn quiet_env() -> HostEnv {
    #[derive(Debug)]
    struct Null;
    impl LogSink for Null {
        fn log(&self, _: LogRecord) {}
        fn level(&self) -> LogLevel {
            LogLevel::Critical
        }
    }
    HostEnv {
        logs: Arc::new(Null),
        ..HostEnv::default()
    }
}

/// The default HTTP chain of one direction on `runtime`, one worker (a
/// benchmark thread is one worker), as a `Mesh` builds it.
fn pool(
    runtime: &str,
    direction: FilterDirection,
    node: &Arc<NodeProperties>,
    env: &HostEnv,
) -> Arc<ChainPool> {
    let engine = nasp::wasm::shared_runtime(runtime).expect("runtime compiled in");
    let listener = match direction {
        FilterDirection::Inbound => ListenerDirection::Inbound,
        FilterDirection::Outbound => ListenerDirection::Outbound,
    };
    let plugins: Vec<(WasmModule, PluginConfig)> = nasp::default_filters::specs()
        .into_iter()
        .filter(|s| s.kind == FilterKind::Http && s.direction == direction)
        .map(|s| {
            let module = WasmModule::new(engine.as_ref(), &s.wasm).expect("compiles");
            let mut config = s.config.clone();
            config.properties = Some(Arc::new(ListenerProperties::new(node.clone(), listener)));
            (module, config)
        })
        .collect();
    assert_eq!(plugins.len(), 2, "exchange and stats");
    Arc::new(ChainPool::from_plugins(1, &plugins, env).expect("instantiates"))
}

type BoxSvc = tower::util::BoxCloneService<
    http::Request<Body>,
    http::Response<Body>,
    nasp::transport::BoxError,
>;

/// web's outbound layer over echo's inbound layer over the application.
fn pair(
    outbound: Arc<ChainPool>,
    inbound: Arc<ChainPool>,
    web: &Arc<NodeProperties>,
    echo: &Arc<NodeProperties>,
) -> BoxSvc {
    // The echo service, as the cluster's Istio metadata names it to the
    // client (outbound) and the listener's view names it (inbound).
    let services: Arc<[nasp::xds::cluster::IstioService]> =
        Arc::from([nasp::xds::cluster::IstioService {
            host: "echo.demo.svc.cluster.local".into(),
            name: "echo".into(),
            namespace: "demo".into(),
        }]);
    let upstream = Upstream {
        cluster: "outbound|80||echo.demo.svc.cluster.local".into(),
        route: "echo.demo.svc.cluster.local:80".into(),
        address: "10.0.0.2:8080".parse().expect("addr"),
        mtls: true,
        peer_id: Some("spiffe://cluster.local/ns/demo/sa/echo".into()),
        alpn: Some("istio-http/1.1".into()),
        attempts: 1,
        services: services.clone(),
    };
    let app = tower::service_fn(|_req: http::Request<Body>| async {
        Ok::<_, Infallible>(http::Response::new(Body::from(Bytes::from_static(
            b"hello",
        ))))
    });
    let server = HttpFilterLayer::new(inbound, ListenerDirection::Inbound, echo.clone())
        .local_identity("spiffe://cluster.local/ns/demo/sa/echo")
        .local_addr("10.0.0.2:8080".parse().expect("addr"))
        .local_services(move || services.clone())
        .layer(app);
    let peer = MeshPeer {
        addr: "10.0.0.1:40000".parse().expect("addr"),
        mtls: true,
        id: Some(
            "spiffe://cluster.local/ns/demo/sa/web"
                .parse()
                .expect("spiffe id"),
        ),
    };
    // What the client and the listener attach: the listener's peer on the
    // request, the upstream the client picked on the response.
    let wire = tower::service_fn(move |mut req: http::Request<Body>| {
        req.extensions_mut().insert(peer.clone());
        let mut server = server.clone();
        let upstream = upstream.clone();
        async move {
            let mut resp = server.ready().await?.call(req).await?;
            resp.extensions_mut().insert(upstream);
            Ok::<_, nasp::transport::BoxError>(resp)
        }
    });
    let client = HttpFilterLayer::new(outbound, ListenerDirection::Outbound, web.clone())
        .local_identity("spiffe://cluster.local/ns/demo/sa/web")
        .layer(wire);
    tower::util::BoxCloneService::new(tower::util::MapErr::new(
        client,
        |e| -> nasp::transport::BoxError { Box::new(e) },
    ))
}

fn request() -> http::Request<Body> {
    http::Request::builder()
        .method("GET")
        .uri("/")
        .header("host", "echo.demo:80")
        .header("user-agent", "bench")
        .header("x-request-id", "6b4b5c4e-1a8b-4c1e-9a52-2f4f0d2a9b11")
        .body(Body::empty())
        .expect("request")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let web = workload("web", "demo", "10.0.0.1");
    let echo = workload("echo", "demo", "10.0.0.2");
    let empty = || Arc::new(ChainPool::empty());
    let mut g = c.benchmark_group("default_chain");
    let once = |svc: &BoxSvc| {
        rt.block_on(async {
            let resp = svc.clone().oneshot(request()).await.expect("answered");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, body)
        })
    };
    let counted = std::env::var("NASP_BENCH_ITERS")
        .ok()
        .map(|n| n.parse::<u64>().expect("NASP_BENCH_ITERS: a number"));
    let case = std::env::var("NASP_BENCH_CASE").unwrap_or_default();
    // A case name that matches nothing must not count as a case that costs
    // nothing.
    let looped = std::cell::Cell::new(false);
    let run = |g: &mut criterion::BenchmarkGroup<'_, _>, name: String, svc: BoxSvc| {
        // The application's answer, untouched, before and after.
        assert_eq!(
            once(&svc),
            (http::StatusCode::OK, Bytes::from_static(b"hello"))
        );
        match counted {
            Some(n) if name == case => {
                for _ in 0..n {
                    std::hint::black_box(once(&svc));
                }
                looped.set(true);
            }
            Some(_) => {}
            None => {
                g.bench_function(name, |b| b.iter(|| std::hint::black_box(once(&svc))));
            }
        }
    };
    run(&mut g, "none".into(), pair(empty(), empty(), &web, &echo));
    let wanted = std::env::var("NASP_BENCH_RUNTIMES").ok();
    let wanted = |r: &str| {
        wanted
            .as_deref()
            .is_none_or(|w| w.split(',').any(|x| x.trim() == r))
    };
    for runtime in ["wasmtime", "wasmi", "wasm3"]
        .into_iter()
        .filter(|r| wanted(r))
    {
        let (web_env, echo_env) = (quiet_env(), quiet_env());
        let out = pool(runtime, FilterDirection::Outbound, &web, &web_env);
        let inb = pool(runtime, FilterDirection::Inbound, &echo, &echo_env);
        let both = pair(out.clone(), inb.clone(), &web, &echo);
        // The chains do their work: each side reports the other by name.
        once(&both);
        let (w, e) = (
            web_env.metrics.prometheus_text(),
            echo_env.metrics.prometheus_text(),
        );
        for (text, reporter) in [(&w, "source"), (&e, "destination")] {
            let line = text
                .lines()
                .find(|l| l.starts_with("istio_requests_total{"))
                .unwrap_or_else(|| panic!("{runtime}: no istio_requests_total in\n{text}"));
            for want in [
                format!("reporter=\"{reporter}\""),
                "source_workload=\"web\"".into(),
                "destination_workload=\"echo\"".into(),
                "response_code=\"200\"".into(),
            ] {
                assert!(line.contains(&want), "{runtime}: {want} missing in {line}");
            }
        }
        run(
            &mut g,
            format!("{runtime}/outbound"),
            pair(out.clone(), empty(), &web, &echo),
        );
        run(
            &mut g,
            format!("{runtime}/inbound"),
            pair(empty(), inb.clone(), &web, &echo),
        );
        run(&mut g, format!("{runtime}/pair"), both);
        // The floor any plugin pays: filters/headers (reads :path and
        // :status, adds a header each way) alone, outbound.
        let lean = WasmModule::new(
            nasp::wasm::shared_runtime(runtime)
                .expect("runtime")
                .as_ref(),
            &lean_filter(),
        )
        .expect("compiles");
        let one = ChainPool::from_plugins(1, &[(lean, PluginConfig::new("lean"))], &quiet_env())
            .expect("instantiates");
        run(
            &mut g,
            format!("{runtime}/lean_plugin"),
            pair(Arc::new(one), empty(), &web, &echo),
        );
        let noop = WasmModule::new(
            nasp::wasm::shared_runtime(runtime)
                .expect("runtime")
                .as_ref(),
            &wat::parse_str(NOOP).expect("wat"),
        )
        .expect("compiles");
        for n in [1usize, 2] {
            let plugins: Vec<_> = (0..n)
                .map(|i| (noop.clone(), PluginConfig::new(format!("noop{i}"))))
                .collect();
            let chain = ChainPool::from_plugins(1, &plugins, &quiet_env()).expect("instantiates");
            run(
                &mut g,
                format!("{runtime}/noop_x{n}"),
                pair(Arc::new(chain), empty(), &web, &echo),
            );
        }
    }
    g.finish();
    assert!(
        counted.is_none() || looped.get(),
        "NASP_BENCH_CASE={case:?} names no case of the runtimes set up \
         (NASP_BENCH_RUNTIMES); cases are none and <runtime>/<case>, e.g. wasmtime/outbound"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
