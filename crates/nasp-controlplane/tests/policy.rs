//! The mesh file's DestinationRule and VirtualService settings
//! (`traffic_policy`, `retries`, `fault`, `headers`): the Envoy resources
//! they become, as istiod writes them, read back as a client reads them;
//! and every bad value a clear error.

use std::time::Duration;

use nasp_controlplane::mesh::{MeshFile, generate};
use nasp_xds::route::{
    ClusterTarget, FaultAbort, HashInput, HeaderAppend, HostPredicate, HostRewrite, Route,
    RouteAction,
};
use nasp_xds::{MeshView, ResourceSet, ViewSettings};

fn example() -> MeshFile {
    let path = format!(
        "{}/../../examples/mesh/policy.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    MeshFile::parse(&std::fs::read_to_string(path).expect("policy.yaml")).expect("parses")
}

fn view(set: &ResourceSet) -> MeshView {
    MeshView::build(
        set,
        Default::default(),
        ViewSettings {
            search_domains: vec!["demo.svc.cluster.local".into()],
        },
    )
}

const CART: &str = "cart.demo.svc.cluster.local";

fn routes(view: &MeshView) -> Vec<Route> {
    view.outbound("cart", 8080)
        .and_then(|o| o.http().map(|h| h.virtual_host.routes.clone()))
        .expect("cart:8080 routes")
}

fn route<'a>(routes: &'a [Route], name: &str) -> &'a Route {
    routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("route {name}"))
}

fn forward(r: &Route) -> &nasp_xds::route::Forward {
    match &r.action {
        RouteAction::Forward(f) => f,
        other => panic!("{}: {other:?}", r.name),
    }
}

#[test]
fn destination_rule_settings_become_istiods_cluster_fields() {
    let (set, _) = generate(&example()).expect("generate");
    let view = view(&set);
    let cluster = |subset: &str| {
        view.cluster(&format!("outbound|8080|{subset}|{CART}"))
            .unwrap_or_else(|| panic!("subset {subset:?}"))
    };
    // The service's policy: Maglev (its key goes on the route), the pool
    // limits as circuit breakers, outlier detection as istiod maps it.
    let svc = cluster("");
    assert_eq!(svc.lb_policy, "MAGLEV");
    assert!(svc.locality_weighted_lb, "Istio's default locality LB");
    assert_eq!(svc.circuit_breakers, Some((100, 10, 50, 5)));
    assert_eq!(svc.connect_timeout, Duration::from_secs(2));
    let o = svc.outlier_detection.clone().expect("outlier detection");
    assert_eq!((o.consecutive_5xx, o.enforcing_consecutive_5xx), (3, 100));
    assert_eq!(
        (
            o.consecutive_gateway_failure,
            o.enforcing_consecutive_gateway_failure
        ),
        (2, 100)
    );
    assert_eq!(o.enforcing_success_rate, 0, "istiod turns success rate off");
    assert_eq!(
        (o.interval, o.base_ejection_time, o.max_ejection_percent),
        (Duration::from_secs(5), Duration::from_secs(30), 50)
    );
    // The raw cluster carries what the view does not keep.
    let raw = &set.clusters[&format!("outbound|8080||{CART}")];
    assert_eq!(
        raw.common_lb_config
            .as_ref()
            .and_then(|c| c.healthy_panic_threshold.as_ref())
            .map(|p| p.value),
        Some(0.0),
        "istiod disables the panic threshold with outlier detection"
    );
    assert!(
        matches!(
            raw.lb_config,
            Some(envoy_types::pb::envoy::config::cluster::v3::cluster::LbConfig::MaglevLbConfig(ref m))
                if m.table_size.as_ref().map(|t| t.value) == Some(65537)
        ),
        "{:?}",
        raw.lb_config
    );
    // v1 replaces only the load balancer: the pool and outlier settings
    // stay the service's (Istio's merge).
    let v1 = cluster("v1");
    assert_eq!(v1.lb_policy, "LEAST_REQUEST");
    assert_eq!(
        v1.slow_start,
        Some(nasp_xds::SlowStart {
            window: Duration::from_secs(30),
            aggression: 2.0,
            min_weight_percent: 20.0
        }),
        "the warmup is the least-request slow start"
    );
    assert_eq!(svc.slow_start, None);
    assert_eq!(v1.circuit_breakers, svc.circuit_breakers);
    assert_eq!(v1.outlier_detection, svc.outlier_detection);
    // v2: ring hash on a cookie, locality weighting off.
    let v2 = cluster("v2");
    assert_eq!(v2.lb_policy, "RING_HASH");
    assert!(!v2.locality_weighted_lb);
    let raw = &set.clusters[&format!("outbound|8080|v2|{CART}")];
    assert!(
        matches!(
            raw.lb_config,
            Some(envoy_types::pb::envoy::config::cluster::v3::cluster::LbConfig::RingHashLbConfig(ref r))
                if r.minimum_ring_size.as_ref().map(|t| t.value) == Some(1024)
        ),
        "{:?}",
        raw.lb_config
    );
    // Locality weights: the sum of the endpoints' weights, as istiod.
    let mut weights: Vec<(String, Option<u32>)> = svc
        .endpoints
        .iter()
        .map(|e| (e.locality.clone(), e.locality_weight))
        .collect();
    weights.sort();
    weights.dedup();
    assert_eq!(
        weights,
        vec![
            ("eu/eu-a/".to_string(), Some(1)),
            ("eu/eu-b/".to_string(), Some(3))
        ]
    );
}

#[test]
fn virtual_service_settings_become_istiods_route_fields() {
    let (set, _) = generate(&example()).expect("generate");
    let view = view(&set);
    let routes = routes(&view);

    let checkout = route(&routes, "checkout");
    let f = forward(checkout);
    assert_eq!(f.timeout, Some(Duration::from_secs(3)));
    let r = f.retry_policy.as_ref().expect("retries");
    assert_eq!(r.num_retries, 3);
    assert_eq!(r.per_try_timeout, Some(Duration::from_secs(1)));
    assert!(r.retry_on.server_error && r.retry_on.reset && r.retry_on.retriable_status_codes);
    assert!(
        !r.retry_on.connect_failure,
        "retry_on replaces Istio's default"
    );
    assert_eq!(r.retriable_status_codes, vec![503]);
    assert_eq!(r.host_predicates, vec![HostPredicate::PreviousHosts]);
    assert_eq!(
        f.mirrors,
        vec![nasp_xds::route::Mirror {
            cluster: format!("outbound|8080|v1|{CART}"),
            fraction: 0.25
        }],
        "istiod's request_mirror_policies"
    );
    // To v2 only: v2's cookie is the hash key.
    assert!(
        matches!(&f.target, ClusterTarget::Cluster(c) if c == &format!("outbound|8080|v2|{CART}"))
    );
    assert!(matches!(
        &f.hash_policy[..],
        [p] if matches!(&p.input, HashInput::Cookie { name, ttl, .. } if name == "session" && *ttl == Some(Duration::from_secs(3600)))
    ));
    // Header changes: set overwrites, add appends, removes.
    let h = &checkout.headers;
    let adds: Vec<(&str, &str, HeaderAppend)> = h
        .request_add
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str(), a.action))
        .collect();
    assert_eq!(
        adds,
        vec![
            ("x-route", "checkout", HeaderAppend::OverwriteIfExistsOrAdd),
            ("x-trace", "1", HeaderAppend::AppendIfExistsOrAdd)
        ]
    );
    assert_eq!(h.request_remove, vec!["x-debug".to_string()]);
    assert_eq!(h.response_add.len(), 1);
    assert_eq!(h.response_remove, vec!["server".to_string()]);
    assert!(checkout.fault.is_none());

    // Faults as istiod writes them (per million), retries off.
    let chaos = route(&routes, "chaos");
    let fault = chaos.fault.clone().expect("fault");
    assert_eq!(fault.delay, Some((Duration::from_millis(100), 0.1)));
    assert_eq!(fault.abort, Some((FaultAbort::Http(503), 0.5)));
    assert!(forward(chaos).retry_policy.is_none(), "attempts: 0");
    // v1 is LEAST_REQUEST: no hash key on its route.
    assert!(forward(chaos).hash_policy.is_empty());

    // A split keeps Istio's default retries and carries the hash key of
    // the leg that hashes.
    let rest = forward(route(&routes, "rest"));
    let r = rest.retry_policy.as_ref().expect("default retries");
    assert_eq!(
        (r.num_retries, r.retriable_status_codes.clone()),
        (2, vec![503])
    );
    assert!(r.retry_on.connect_failure);
    assert_eq!(rest.hash_policy.len(), 1);
}

#[test]
fn every_hash_key_and_the_authority_rewrite() {
    let mesh = |lb: &str, headers: &str| {
        MeshFile::parse(&format!(
            "services:\n  - name: s\n    namespace: n\n    ports: [{{port: 80}}]\n    endpoints: [{{ip: 10.0.0.1}}]\n    traffic_policy: {{load_balancer: {lb}}}\n    routes: [{{route: [{{}}], headers: {headers}}}]\n"
        ))
        .expect("parses")
    };
    let first = |m: &MeshFile| {
        let (set, _) = generate(m).expect("generate");
        let view = MeshView::build(&set, Default::default(), ViewSettings::default());
        let o = view.outbound("s.n.svc.cluster.local", 80).expect("s");
        let r = o.http().expect("http").virtual_host.routes[0].clone();
        let c = view.plain_cluster(&o).expect("cluster");
        (r, c.lb_policy.clone())
    };
    let (r, lb) = first(&mesh(
        "{consistent_hash: {http_query_parameter_name: user}}",
        "{request: {set: {host: other.example}}}",
    ));
    assert_eq!(lb, "RING_HASH");
    let f = forward(&r);
    assert_eq!(
        f.hash_policy[0].input,
        HashInput::QueryParameter("user".into())
    );
    assert_eq!(
        f.host_rewrite,
        HostRewrite::Literal("other.example".into()),
        "istiod turns a set Host into the route's host rewrite"
    );
    assert!(r.headers.request_add.is_empty());
    let (r, _) = first(&mesh("{consistent_hash: {use_source_ip: true}}", "{}"));
    assert_eq!(forward(&r).hash_policy[0].input, HashInput::SourceIp);
    let (r, lb) = first(&mesh("{simple: RANDOM}", "{response: {add: {x-a: b}}}"));
    assert_eq!(lb, "RANDOM");
    assert!(forward(&r).hash_policy.is_empty());
    assert_eq!(
        r.headers.response_add[0].action,
        HeaderAppend::AppendIfExistsOrAdd
    );
    let (_, lb) = first(&mesh("ROUND_ROBIN", "{}"));
    assert_eq!(lb, "ROUND_ROBIN");
    // Numbers in retry_on become status codes, with the condition added.
    let m = MeshFile::parse(
        "services:\n  - name: s\n    namespace: n\n    ports: [{port: 80}]\n    routes: [{route: [{}], retries: {attempts: 4, retry_on: \"gateway-error,500\"}}]\n",
    )
    .expect("parses");
    let (r, _) = first(&m);
    let p = forward(&r).retry_policy.clone().expect("retry");
    assert!(p.retry_on.gateway_error && p.retry_on.retriable_status_codes);
    assert_eq!((p.num_retries, p.retriable_status_codes), (4, vec![500]));
    // A gRPC abort by name.
    let m = MeshFile::parse(
        "services:\n  - name: s\n    namespace: n\n    ports: [{port: 80, protocol: grpc}]\n    routes: [{route: [{}], fault: {abort: {grpc_status: UNAVAILABLE}}}]\n",
    )
    .expect("parses");
    let (r, _) = first(&m);
    assert_eq!(
        r.fault.expect("fault").abort,
        Some((FaultAbort::Grpc(14), 1.0))
    );
}

#[test]
fn bad_policies_are_clear_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("", "mirror: {subset: nope}", "mirror: unknown subset"),
        (
            "",
            "mirror: {}, mirror_percentage: 101",
            "mirror_percentage 101",
        ),
        ("", "mirror_percentage: 5", "without a `mirror`"),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_header_name: a}, warmup_duration_secs: 10s}}",
            "",
            "only with ROUND_ROBIN or LEAST_REQUEST",
        ),
        (
            "traffic_policy: {load_balancer: {simple: RANDOM, warmup: {duration: 10s}}}",
            "",
            "only with ROUND_ROBIN or LEAST_REQUEST",
        ),
        (
            "traffic_policy: {load_balancer: {simple: ROUND_ROBIN, warmup_duration_secs: 10q}}",
            "",
            "warmup duration",
        ),
        (
            "traffic_policy: {load_balancer: {warmup_duration_secs: 1s, warmup: {duration: 1s}}}",
            "",
            "not both",
        ),
        (
            "traffic_policy: {load_balancer: {warmup: {duration: 1s, aggression: 0.5}}}",
            "",
            "aggression",
        ),
        (
            "traffic_policy: {load_balancer: {warmup: {duration: 1s, minimum_percent: 120}}}",
            "",
            "minimum_percent",
        ),
        (
            "traffic_policy: {load_balancer: LEAST_CONNECTIONS}",
            "",
            "LEAST_CONNECTIONS",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {}}}",
            "",
            "exactly one of http_header_name",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_header_name: a, use_source_ip: true}}}",
            "",
            "exactly one",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_header_name: a, maglev: {table_size: 100}}}}",
            "",
            "table_size 100",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_header_name: a, ring_hash: {}, maglev: {}}}}",
            "",
            "not both",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_cookie: {name: s, ttl: 5}}}}",
            "",
            "ttl",
        ),
        (
            "traffic_policy: {load_balancer: {consistent_hash: {http_header_name: \"a b\"}}}",
            "",
            "bad header name",
        ),
        (
            "traffic_policy: {outlier_detection: {interval: 0s}}",
            "",
            "interval",
        ),
        (
            "traffic_policy: {outlier_detection: {max_ejection_percent: 101}}",
            "",
            "max_ejection_percent 101",
        ),
        (
            "traffic_policy: {outlier_detection: {consecutive_local_origin_failures: 2}}",
            "",
            "split_external_local_origin_errors",
        ),
        (
            "traffic_policy: {connection_pool: {tcp: {connect_timeout: 10}}}",
            "",
            "connect_timeout",
        ),
        (
            "traffic_policy: {connection_pool: {http: {max_requests: 1}}}",
            "",
            "max_requests",
        ),
        (
            "traffic_policy: {outlier_detection: {consecutive_5xx_errors: -1}}",
            "",
            "consecutive_5xx_errors",
        ),
        (
            "",
            "retries: {attempts: 2, retry_on: \"5xx,sometimes\"}",
            "sometimes",
        ),
        ("", "retries: {attempts: 2, retry_on: \"42\"}", "status 42"),
        (
            "",
            "retries: {attempts: 2, per_try_timeout: 0ms}",
            "per_try_timeout",
        ),
        ("", "fault: {}", "needs a delay or an abort"),
        ("", "fault: {abort: {http_status: 99}}", "http_status 99"),
        (
            "",
            "fault: {abort: {http_status: 503, grpc_status: UNAVAILABLE}}",
            "exactly one of http_status",
        ),
        ("", "fault: {abort: {grpc_status: NOPE}}", "NOPE"),
        (
            "",
            "fault: {abort: {http_status: 503, percentage: 150}}",
            "percentage 150",
        ),
        ("", "fault: {delay: {fixed_delay: soon}}", "fixed_delay"),
        (
            "",
            "headers: {request: {set: {\"bad name\": x}}}",
            "bad header name",
        ),
        (
            "",
            "headers: {request: {remove: [host]}}",
            "cannot be removed",
        ),
        (
            "",
            "headers: {response: {set: {\":status\": \"200\"}}}",
            "bad header name",
        ),
    ];
    for (svc, route, expected) in cases {
        let text = format!(
            "services:\n  - name: s\n    namespace: n\n    ports: [{{port: 80}}]\n    {svc}\n    routes: [{{name: r, route: [{{}}], {route}}}]\n"
        );
        let err = match MeshFile::parse(&text) {
            Err(e) => e.to_string(),
            Ok(m) => match generate(&m) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted: {svc} {route}"),
            },
        };
        assert!(err.contains("mesh file"), "{err}");
        assert!(err.contains(expected), "{svc} {route}: {err}");
    }
    // A subset's bad policy names the subset.
    let m = MeshFile::parse(
        "services:\n  - name: s\n    namespace: n\n    ports: [{port: 80}]\n    subsets: [{name: v1, traffic_policy: {outlier_detection: {min_health_percent: 200}}}]\n",
    )
    .expect("parses");
    let e = generate(&m).unwrap_err().to_string();
    assert!(
        e.contains("subset \"v1\"") && e.contains("min_health_percent 200"),
        "{e}"
    );
}
