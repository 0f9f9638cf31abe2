//! The mesh file's traffic policy: port protocols, endpoint ports and
//! labels, subsets, ordered routes with weighted destinations — resolved
//! through `nasp_xds::MeshView` as a client resolves them — and a changed
//! mesh reaching connected ADS clients live.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use nasp_controlplane::mesh::{MeshFile, RouteDestination, generate};
use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache};
use nasp_xds::cluster::UpstreamProtocol;
use nasp_xds::route::{ClusterTarget, RouteAction};
use nasp_xds::{AdsClient, AdsConfig, MeshView, Protocol, RouteDecision, ViewSettings};

const FQDN: &str = "backend.demo.svc.cluster.local";

/// Request headers, as `MeshView::route` takes them.
type Headers<'a> = &'a [(&'a str, &'a str)];

fn traffic() -> MeshFile {
    let path = format!(
        "{}/../../examples/mesh/traffic.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    MeshFile::parse(&std::fs::read_to_string(path).expect("traffic.yaml")).expect("parses")
}

fn settings() -> ViewSettings {
    ViewSettings {
        search_domains: vec![
            "demo.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    }
}

fn view_of(mesh: &MeshFile) -> MeshView {
    let (set, _) = generate(mesh).expect("generate");
    MeshView::build(&set, Default::default(), settings())
}

/// SplitMix64: a deterministic stream of well-spread random numbers.
struct Draws(u64);

impl Iterator for Draws {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Some(z ^ (z >> 31))
    }
}

/// Which cluster `n` requests to `host:port` with `headers` go to, by name.
fn split(
    view: &MeshView,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let o = view
        .outbound(host, port)
        .unwrap_or_else(|| panic!("{host}:{port}"));
    let dest = o.http().expect("an HTTP port");
    let mut counts = BTreeMap::new();
    for random in Draws(7).take(n) {
        match view.route(dest, path, headers, random) {
            RouteDecision::Forward { cluster, .. } => {
                *counts.entry(cluster.name.clone()).or_insert(0) += 1
            }
            _ => panic!("{host}:{port}{path} is not forwarded"),
        }
    }
    counts
}

/// The name of the route `path` with `headers` takes.
fn route_name(
    view: &MeshView,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    let o = view.outbound(host, port).expect("known");
    match view.route(o.http().expect("HTTP"), path, headers, 0) {
        RouteDecision::Forward { route, .. } => route.name.clone(),
        RouteDecision::NoRoute => "<none>".into(),
        _ => panic!("unexpected decision"),
    }
}

fn sorted_addresses(view: &MeshView, cluster: &str) -> Vec<String> {
    let mut v: Vec<String> = view
        .cluster(cluster)
        .unwrap_or_else(|| panic!("{cluster}"))
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    v.sort();
    v
}

fn v(subset: &str, port: u16) -> String {
    format!("outbound|{port}|{subset}|{FQDN}")
}

#[test]
fn the_traffic_example_splits_90_10_and_routes_the_canary_header() {
    let view = view_of(&traffic());
    for port in [8080, 9090] {
        let counts = split(&view, "backend", port, "/", &[], 10_000);
        let v1 = counts.get(&v("v1", port)).copied().unwrap_or(0);
        let v2 = counts.get(&v("v2", port)).copied().unwrap_or(0);
        assert_eq!(v1 + v2, 10_000, "only the subsets take traffic: {counts:?}");
        // 5 standard deviations of a 10 000-draw binomial at 10 % is 150.
        assert!(v2.abs_diff(1_000) < 150, "port {port}: {counts:?}");
        let canary = split(
            &view,
            "backend.demo",
            port,
            "/x",
            &[("X-Nasp-Canary", "1")],
            500,
        );
        assert_eq!(canary.get(&v("v2", port)), Some(&500), "{canary:?}");
        // Another value of the header is no canary.
        let other = split(
            &view,
            "backend.demo",
            port,
            "/x",
            &[("x-nasp-canary", "0")],
            500,
        );
        assert!(other.contains_key(&v("v1", port)), "{other:?}");
    }
    assert_eq!(route_name(&view, "backend", 8080, "/", &[]), "split");
    assert_eq!(
        route_name(&view, "backend", 8080, "/", &[("x-nasp-canary", "1")]),
        "canary"
    );

    // Subset clusters hold only their endpoints, with Istio's names.
    assert_eq!(
        sorted_addresses(&view, &v("v1", 8080)),
        vec!["127.0.0.2:8080", "127.0.0.3:8080"]
    );
    assert_eq!(
        sorted_addresses(&view, &v("v2", 9090)),
        vec!["127.0.0.4:9090"]
    );
    assert_eq!(
        sorted_addresses(&view, &format!("outbound|8080||{FQDN}")),
        vec!["127.0.0.2:8080", "127.0.0.3:8080", "127.0.0.4:8080"]
    );
    let c = view.cluster(&v("v1", 8080)).expect("v1");
    assert_eq!(
        c.sni.as_deref(),
        Some("outbound_.8080_.v1_.backend.demo.svc.cluster.local")
    );
    assert!(c.tls && !c.permissive, "STRICT");
    assert_eq!(
        c.expected_sans,
        vec!["spiffe://cluster.local/ns/demo/sa/default".to_string()]
    );

    // gRPC ports speak HTTP/2 to the endpoints, HTTP ports HTTP/1.1.
    for subset in ["", "v1", "v2"] {
        let http = view
            .cluster(&format!("outbound|8080|{subset}|{FQDN}"))
            .expect("http");
        assert_eq!(
            http.upstream_protocol,
            UpstreamProtocol::Http1,
            "{}",
            http.name
        );
        let grpc = view
            .cluster(&format!("outbound|9090|{subset}|{FQDN}"))
            .expect("grpc");
        assert_eq!(
            grpc.upstream_protocol,
            UpstreamProtocol::Http2,
            "{}",
            grpc.name
        );
    }
    // Every route keeps Istio's default retries and its disabled timeout.
    let o = view.outbound("backend", 9090).expect("grpc");
    for r in &o.http().expect("HTTP").virtual_host.routes {
        let RouteAction::Forward(f) = &r.action else {
            panic!("{}", r.name)
        };
        let retry = f.retry_policy.as_ref().expect("retries");
        assert_eq!(
            (retry.num_retries, retry.retriable_status_codes.clone()),
            (2, vec![503])
        );
        assert_eq!(f.timeout, None, "{}", r.name);
    }
    // The frontend, beside it on 8080, is untouched by the backend's routes.
    assert_eq!(
        split(&view, "frontend", 8080, "/", &[], 10),
        BTreeMap::from([(
            "outbound|8080||frontend.demo.svc.cluster.local".to_string(),
            10
        )])
    );
}

#[test]
fn http2_ports_are_http2_and_a_service_without_routes_keeps_its_default_route() {
    let mesh = MeshFile::parse(
        "services:
  - name: h
    namespace: n
    ports: [{port: 81, protocol: http2, target_port: 8081}, {port: 80}]
    endpoints: [{ip: 10.0.0.1}]",
    )
    .expect("parses");
    let view = view_of(&mesh);
    let h2 = view
        .plain_cluster(&view.outbound("h.n", 81).expect("81"))
        .expect("cluster");
    assert_eq!(h2.upstream_protocol, UpstreamProtocol::Http2);
    assert_eq!(h2.endpoints[0].address, "10.0.0.1:8081");
    let o = view.outbound("h.n", 80).expect("80");
    let routes = &o.http().expect("HTTP").virtual_host.routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].name, "default");
    assert_eq!(
        view.plain_cluster(&o).expect("cluster").upstream_protocol,
        UpstreamProtocol::Http1
    );
}

#[test]
fn routes_match_by_exact_path_prefix_regex_and_headers_in_order() {
    let mesh = MeshFile::parse(
        r#"services:
  - name: api
    namespace: demo
    ports: [{port: 80}]
    endpoints:
      - {ip: 10.1.0.1, labels: {version: v1}}
      - {ip: 10.1.0.2, labels: {version: v2}}
    subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    routes:
      - {name: exact, match: {path: /health}, route: [{subset: v2}]}
      - {name: admin, match: {prefix: /admin, headers: {x-user: root}}, route: [{subset: v2}], timeout: 1500ms}
      - {name: numbers, match: {regex: "/items/[0-9]+"}, route: [{subset: v2}]}
      - {name: v1-prefix, match: {prefix: /v1}, route: [{subset: v1}]}
      - {name: fallback, route: [{}]}
"#,
    )
    .expect("parses");
    let view = view_of(&mesh);
    let cases: &[(&str, Headers<'_>, &str)] = &[
        ("/health", &[], "exact"),
        ("/healthz", &[], "fallback"),
        ("/admin/x", &[("x-user", "root")], "admin"),
        ("/admin/x", &[("x-user", "guest")], "fallback"),
        ("/admin/x", &[], "fallback"),
        ("/items/42", &[], "numbers"),
        ("/items/42/x", &[], "fallback"),
        ("/v1/x", &[], "v1-prefix"),
        ("/", &[], "fallback"),
    ];
    for (path, headers, want) in cases {
        assert_eq!(
            route_name(&view, "api", 80, path, headers),
            *want,
            "{path} {headers:?}"
        );
    }
    let clusters = |path: &str| split(&view, "api", 80, path, &[], 20);
    let api = |s: &str| format!("outbound|80|{s}|api.demo.svc.cluster.local");
    assert_eq!(clusters("/health"), BTreeMap::from([(api("v2"), 20)]));
    assert_eq!(clusters("/v1/a"), BTreeMap::from([(api("v1"), 20)]));
    assert_eq!(clusters("/other"), BTreeMap::from([(api(""), 20)]));
    let o = view.outbound("api", 80).expect("api");
    let admin = &o.http().expect("HTTP").virtual_host.routes[1];
    let RouteAction::Forward(f) = &admin.action else {
        panic!()
    };
    assert_eq!(f.timeout, Some(Duration::from_millis(1500)));
}

#[test]
fn a_zero_weight_destination_is_dropped_as_istiod_drops_it() {
    let mut mesh = traffic();
    set_split(&mut mesh, 100, 0);
    let view = view_of(&mesh);
    let o = view.outbound("backend", 8080).expect("backend");
    let split_route = &o.http().expect("HTTP").virtual_host.routes[1];
    let RouteAction::Forward(f) = &split_route.action else {
        panic!()
    };
    assert!(
        matches!(&f.target, ClusterTarget::Cluster(c) if *c == v("v1", 8080)),
        "{:?}",
        f.target
    );
    set_split(&mut mesh, 30, 70);
    let view = view_of(&mesh);
    let o = view.outbound("backend", 8080).expect("backend");
    let RouteAction::Forward(f) = &o.http().expect("HTTP").virtual_host.routes[1].action else {
        panic!()
    };
    let ClusterTarget::Weighted(legs) = &f.target else {
        panic!("{:?}", f.target)
    };
    let legs: Vec<(&str, u32)> = legs.iter().map(|l| (l.name.as_str(), l.weight)).collect();
    assert_eq!(
        legs,
        vec![(v("v1", 8080).as_str(), 30), (v("v2", 8080).as_str(), 70)]
    );
}

#[test]
fn endpoints_carry_their_own_ports_and_labels_as_istio_metadata() {
    let mesh = MeshFile::parse(
        "services:
  - name: multi
    namespace: demo
    ports: [{port: 80, target_port: 8080}, {port: 90, protocol: grpc}]
    endpoints:
      - {ip: 127.0.0.1, ports: {80: 18080, 90: 19090}, labels: {app: multi, version: v3}}
      - {ip: 127.0.0.1, ports: {80: 28080}}
  - name: one
    namespace: demo
    ports: [{port: 80, target_port: 8080}]
    endpoints:
      - {ip: 127.0.0.1, port: 9001}
      - {ip: 127.0.0.1, port: 9002}
      - {ip: 127.0.0.1}",
    )
    .expect("parses");
    let (set, _) = generate(&mesh).expect("generate");
    let view = MeshView::build(&set, Default::default(), settings());
    assert_eq!(
        sorted_addresses(&view, "outbound|80||multi.demo.svc.cluster.local"),
        vec!["127.0.0.1:18080", "127.0.0.1:28080"]
    );
    assert_eq!(
        sorted_addresses(&view, "outbound|90||multi.demo.svc.cluster.local"),
        vec!["127.0.0.1:19090", "127.0.0.1:90"]
    );
    assert_eq!(
        sorted_addresses(&view, "outbound|80||one.demo.svc.cluster.local"),
        vec!["127.0.0.1:8080", "127.0.0.1:9001", "127.0.0.1:9002"],
        "several replicas on one IP"
    );

    // The metadata istiod writes (`istio.workload`), the labels under
    // `envoy.lb`, and `tlsMode` for the socket match.
    let cla = &set.endpoints["outbound|80||multi.demo.svc.cluster.local"];
    let lb = &cla.endpoints[0].lb_endpoints[0];
    let md = &lb.metadata.as_ref().expect("metadata").filter_metadata;
    let field = |ns: &str, key: &str| -> Option<String> {
        use envoy_types::pb::google::protobuf::value::Kind;
        match md.get(ns)?.fields.get(key)?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    };
    assert_eq!(
        field("istio", "workload").as_deref(),
        Some("multi-v3;demo;multi;v3;Kubernetes")
    );
    assert_eq!(field("envoy.lb", "version").as_deref(), Some("v3"));
    assert_eq!(field("envoy.lb", "app").as_deref(), Some("multi"));
    assert_eq!(
        field("envoy.transport_socket_match", "tlsMode").as_deref(),
        Some("istio")
    );
    let unlabelled = &cla.endpoints[0].lb_endpoints[1];
    let md = &unlabelled
        .metadata
        .as_ref()
        .expect("metadata")
        .filter_metadata;
    assert!(!md.contains_key("envoy.lb"));
    // The view reads the socket-match label.
    let c = view
        .cluster("outbound|80||multi.demo.svc.cluster.local")
        .expect("cluster");
    assert!(c.endpoints.iter().all(|e| e.istio_mtls));
}

#[test]
fn bad_traffic_policies_are_clear_errors() {
    let base = "services:
  - name: s
    namespace: n
    ports: [{port: 80}, {port: 81, protocol: grpc}]
    endpoints: [{ip: 10.0.0.1, labels: {version: v1}}]
    subsets: [{name: v1, labels: {version: v1}}]
";
    let cases: &[(&str, &str)] = &[
        (
            "    routes: [{route: [{subset: v9}]}]\n",
            "unknown subset \"v9\"",
        ),
        (
            "    routes: [{name: r, route: [{subset: v1, weight: 0}, {weight: 0}]}]\n",
            "route \"r\": the weights sum to 0",
        ),
        (
            "    routes: [{route: [{subset: v1, weight: 0}]}]\n",
            "the weights sum to 0",
        ),
        (
            "    routes: [{route: [{subset: v1, weight: 5}, {}]}]\n",
            "each needs a `weight`",
        ),
        ("    routes: [{route: []}]\n", "names no destination"),
        (
            "    routes: [{match: {prefix: /a, path: /b}, route: [{}]}]\n",
            "at most one of `prefix`, `path` and `regex`",
        ),
        (
            "    routes: [{match: {regex: \"(\"}, route: [{}]}]\n",
            "routes of port 80",
        ),
        ("    routes: [{timeout: 5, route: [{}]}]\n", "needs a unit"),
        (
            "    routes: [{timeout: -1s, route: [{}]}]\n",
            "non-negative",
        ),
    ];
    for (extra, want) in cases {
        let m = MeshFile::parse(&format!("{base}{extra}")).expect("parses");
        let e = generate(&m).expect_err(extra).to_string();
        assert!(e.contains(want), "{extra}: {e}");
        assert!(
            e.contains("service s.n.svc.cluster.local") || e.contains("routes of port"),
            "{e}"
        );
    }
    let whole = |yaml: &str, want: &str| {
        let m = MeshFile::parse(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let e = generate(&m).expect_err(yaml).to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    };
    whole(
        "services: [{name: s, namespace: n, ports: [{port: 80}, {port: 81}], endpoints: [{ip: 10.0.0.1, port: 8080}]}]",
        "`port` is ambiguous with 2 service ports",
    );
    whole(
        "services: [{name: s, namespace: n, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, ports: {81: 1}}]}]",
        "`ports` names 81, not a port of the service",
    );
    whole(
        "services: [{name: s, namespace: n, ports: [{port: 80}], endpoints: [{ip: not-an-ip}]}]",
        "endpoint ip \"not-an-ip\"",
    );
    whole(
        "services: [{name: s, namespace: n, ports: [{port: 80}], subsets: [{name: a}, {name: a}]}]",
        "subset \"a\" is declared twice",
    );
    whole(
        "services: [{name: s, namespace: n, ports: [{port: 80}], subsets: [{name: 'a|b'}]}]",
        "subset name \"a|b\"",
    );
    whole(
        "services: [{name: s, namespace: n, vip: 10.0.0.9, ports: [{port: 80, protocol: tcp}], routes: [{route: [{}]}]}]",
        "`routes` need an http, http2 or grpc port",
    );
    let e =
        MeshFile::parse("services: [{name: s, namespace: n, ports: [{port: 80, protocol: h3}]}]")
            .expect_err("unknown protocol")
            .to_string();
    assert!(e.contains("h3"), "{e}");
}

fn set_split(mesh: &mut MeshFile, v1: u32, v2: u32) {
    let backend = mesh.service_mut("backend", "demo").expect("backend");
    let split = backend
        .routes
        .iter_mut()
        .find(|r| r.name.as_deref() == Some("split"))
        .expect("the split route");
    split.route = vec![
        RouteDestination::subset("v1", v1),
        RouteDestination::subset("v2", v2),
    ];
}

/// Polls `f` on the client's current view until it holds or 10 s pass.
async fn eventually(what: &str, client: &AdsClient, f: impl Fn(&MeshView) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(&client.view()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn share_of_v2(view: &MeshView) -> f64 {
    let counts = split(view, "backend", 8080, "/", &[], 2_000);
    counts.get(&v("v2", 8080)).copied().unwrap_or(0) as f64 / 2_000.0
}

async fn live(protocol: Protocol) {
    let mut mesh = traffic();
    set_split(&mut mesh, 100, 0);
    let cache = Arc::new(SnapshotCache::from_mesh(&mesh).expect("mesh"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    let cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca,
            xds: Some(cache),
        },
    )
    .expect("start");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr()))
        .expect("uri")
        .connect_lazy();
    let mut config = AdsConfig::new(Node {
        id: "frontend".into(),
        ..Default::default()
    });
    config.protocol = protocol;
    config.nds = true;
    config.view = settings();
    let client = AdsClient::start(channel, config);
    client.ready(Duration::from_secs(10)).await.expect("ready");
    assert_eq!(
        share_of_v2(&client.view()),
        0.0,
        "{protocol:?}: 100/0 at first"
    );

    // Shift every request to v2.
    set_split(&mut mesh, 0, 100);
    cp.set_mesh(&mesh).expect("set_mesh");
    eventually("0/100", &client, |v| share_of_v2(v) == 1.0).await;

    // A split in between is honoured too.
    set_split(&mut mesh, 50, 50);
    cp.set_mesh(&mesh).expect("set_mesh");
    eventually("50/50", &client, |v| (share_of_v2(v) - 0.5).abs() < 0.06).await;

    // Remove a v1 replica: it leaves the subset and the whole service.
    mesh.service_mut("backend", "demo")
        .expect("backend")
        .endpoints
        .retain(|e| e.ip != "127.0.0.3");
    cp.set_mesh(&mesh).expect("set_mesh");
    eventually("127.0.0.3 removed", &client, |v| {
        v.cluster(&self::v("v1", 8080))
            .is_some_and(|c| c.endpoints.len() == 1 && c.endpoints[0].address == "127.0.0.2:8080")
    })
    .await;
    let view = client.view();
    assert_eq!(
        sorted_addresses(&view, &format!("outbound|9090||{FQDN}")),
        vec!["127.0.0.2:9090", "127.0.0.4:9090"]
    );

    // A bad mesh is refused and the clients keep the last good one.
    let mut broken = mesh.clone();
    broken
        .service_mut("backend", "demo")
        .expect("backend")
        .routes[0]
        .route = vec![RouteDestination::subset("v9", 1)];
    let version = cp.snapshots().expect("xds").current().version;
    let e = cp
        .set_mesh(&broken)
        .expect_err("unknown subset")
        .to_string();
    assert!(e.contains("v9"), "{e}");
    assert_eq!(
        cp.snapshots().expect("xds").current().version,
        version,
        "nothing pushed"
    );
    assert_eq!(
        sorted_addresses(&client.view(), &v("v1", 8080)),
        vec!["127.0.0.2:8080"]
    );
    drop(client);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_clients_follow_mesh_changes_live() {
    live(Protocol::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_clients_follow_mesh_changes_live() {
    live(Protocol::Delta).await;
}

#[tokio::test]
async fn set_mesh_without_xds_is_an_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    let cp = ControlPlane::start(listener, ControlPlaneConfig { ca, xds: None }).expect("start");
    let e = cp.set_mesh(&traffic()).expect_err("no xDS").to_string();
    assert!(e.contains("without xDS"), "{e}");
    cp.shutdown().await;
}
