//! The expectations of reference §6 on the real Istio config dumps, without
//! any network: dump → resources → resolved view.

use std::collections::HashMap;

use std::sync::Arc;
use std::time::Duration;

use nasp_xds::route::{ClusterTarget, HostPredicate, PathMatch, RouteAction};
use nasp_xds::{ClusterInfo, MeshView, Outbound, RouteDecision, ViewSettings, read_config_dump};

fn dump(name: &str) -> String {
    let path = format!(
        "{}/../../../shared/data/istio-config-dumps/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn view(name: &str) -> MeshView {
    let set = read_config_dump(&dump(name)).expect("dump parses");
    MeshView::build(
        &set,
        HashMap::new(),
        ViewSettings {
            search_domains: vec![
                "demo.svc.cluster.local".into(),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
        },
    )
}

/// The cluster a TCP connection (or the request `GET /`) to `host:port` goes to.
fn cluster_of(view: &MeshView, host: &str, port: u16) -> Arc<ClusterInfo> {
    match view
        .outbound(host, port)
        .unwrap_or_else(|| panic!("{host}:{port} is in the mesh"))
    {
        Outbound::Cluster(c) => c,
        Outbound::Http(h) => match view.route(&h, "/", &[], 0) {
            RouteDecision::Forward { cluster, .. } => cluster,
            other => panic!("{host}:{port}: GET / is not forwarded: {other:?}"),
        },
    }
}

fn addrs(c: &ClusterInfo) -> Vec<String> {
    let mut v: Vec<String> = c.endpoints.iter().map(|e| e.address.clone()).collect();
    v.sort();
    v
}

#[test]
fn dumps_parse_into_every_resource() {
    let set = read_config_dump(&dump("config_v0.json")).expect("v0");
    // Reference §6: 92 dynamic clusters, 78 dynamic listeners, 26 dynamic
    // route configs (plus the static ones of the bootstrap).
    assert!(set.clusters.len() >= 92, "{}", set.clusters.len());
    assert!(set.listeners.len() >= 78, "{}", set.listeners.len());
    assert!(set.routes.len() >= 26, "{}", set.routes.len());
    assert!(
        set.endpoints
            .contains_key("outbound|80||echo.demo.svc.cluster.local")
    );
}

#[test]
fn inbound_8080_is_permissive_mtls_with_client_certs() {
    for v in ["config_v0.json", "config_v1.json"] {
        let i = view(v).inbound(8080).expect("port 8080");
        assert!(i.tls, "{v}");
        assert!(i.client_certificate_required, "{v}");
        assert!(i.permissive, "{v}");
    }
}

#[test]
fn tcp_service_by_ip() {
    let v0 = view("config_v0.json");
    let o = v0.outbound("10.10.42.110", 12050).expect("known");
    let c = o.cluster().expect("a TCP service goes to one cluster");
    assert!(c.tls && c.permissive);
    assert_eq!(
        c.sni.as_deref(),
        Some("outbound_.12050_._.echo.demo.svc.cluster.local")
    );
    assert_eq!(addrs(c), vec!["10.20.160.131:8080"]);
    let c = cluster_of(&view("config_v1.json"), "10.10.42.110", 12050);
    assert_eq!(
        addrs(&c),
        vec![
            "10.20.164.172:8080",
            "10.20.166.13:8080",
            "10.20.166.2:8080"
        ]
    );
}

#[test]
fn tcp_listener_on_0_0_0_0_takes_its_whole_port() {
    // `0.0.0.0_10032` is a TCP proxy to a ServiceEntry without a VIP: every
    // connection on port 10032 goes there, whatever the address.
    let v0 = view("config_v0.json");
    for ip in ["3.120.0.1", "10.99.1.2"] {
        let o = v0
            .outbound(ip, 10032)
            .unwrap_or_else(|| panic!("{ip}:10032"));
        assert_eq!(
            o.cluster().map(|c| c.name.as_str()),
            Some("outbound|10032||0.tcp.eu.ngrok.io"),
            "{ip}"
        );
    }
    assert_eq!(
        cluster_of(&v0, "0.tcp.eu.ngrok.io", 10032).name,
        "outbound|10032||0.tcp.eu.ngrok.io"
    );
}

#[test]
fn http_service_by_ip_and_by_names() {
    let v0 = view("config_v0.json");
    for host in [
        "10.10.42.110",
        "echo",
        "echo.demo",
        "echo.demo.svc",
        "echo.demo.svc.cluster.local",
        "ECHO.demo",
    ] {
        let c = cluster_of(&v0, host, 80);
        assert_eq!(c.name, "outbound|80||echo.demo.svc.cluster.local", "{host}");
        assert_eq!(
            c.sni.as_deref(),
            Some("outbound_.80_._.echo.demo.svc.cluster.local")
        );
        assert!(c.tls && c.permissive);
        assert_eq!(addrs(&c), vec!["10.20.160.131:8080"]);
        assert_eq!(
            c.expected_sans,
            vec!["spiffe://cluster.local/ns/demo/sa/default".to_string()]
        );
    }
    let c = cluster_of(&view("config_v1.json"), "echo", 80);
    assert_eq!(
        addrs(&c),
        vec![
            "10.20.164.172:8080",
            "10.20.166.13:8080",
            "10.20.166.2:8080"
        ]
    );
}

#[test]
fn the_echo_route_is_typed_as_istio_wrote_it() {
    let v0 = view("config_v0.json");
    let o = v0.outbound("echo", 80).expect("known");
    let h = o.http().expect("an HTTP destination");
    assert_eq!(h.virtual_host.name, "echo.demo.svc.cluster.local:80");
    let route = &h.virtual_host.routes[0];
    assert_eq!(route.name, "default");
    assert!(matches!(&route.matcher.path, PathMatch::Prefix(p) if p == "/"));
    let RouteAction::Forward(f) = &route.action else {
        panic!("{:?}", route.action)
    };
    assert!(
        matches!(&f.target, ClusterTarget::Cluster(c) if c == "outbound|80||echo.demo.svc.cluster.local")
    );
    // `timeout: 0s` disables the timeout (unset would be Envoy's 15 s).
    assert_eq!(f.timeout, None);
    let r = f.retry_policy.as_ref().expect("retries");
    assert_eq!(r.num_retries, 2);
    assert!(r.retry_on.connect_failure && r.retry_on.refused_stream);
    assert!(r.retry_on.grpc_unavailable && r.retry_on.grpc_cancelled);
    assert!(r.retry_on.retriable_status_codes && !r.retry_on.server_error);
    assert_eq!(r.retriable_status_codes, vec![503]);
    assert_eq!(r.host_predicates, vec![HostPredicate::PreviousHosts]);
    assert_eq!(r.host_selection_retry_max_attempts, 5);
    assert_eq!(r.back_off.base, Duration::from_millis(25));
    assert_eq!(r.back_off.max, Duration::from_millis(250));
    let m = f.max_stream_duration.expect("max_stream_duration");
    assert_eq!(m.max_stream_duration, Some(Duration::ZERO));
    assert_eq!(m.grpc_timeout_header_max, Some(Duration::ZERO));
}

#[test]
fn unknown_hosts_are_not_in_the_mesh() {
    let v0 = view("config_v0.json");
    assert!(v0.outbound("nope.example.com", 80).is_none());
    assert!(v0.outbound("10.99.99.99", 12050).is_none());
    assert!(v0.outbound("echo", 9999).is_none());
}

#[test]
fn garbage_dumps_are_clear_errors() {
    let e = read_config_dump("{").unwrap_err().to_string();
    assert!(e.contains("not JSON"), "{e}");
    let e = read_config_dump("{\"x\": 1}").unwrap_err().to_string();
    assert!(e.contains("configs"), "{e}");
    let e = read_config_dump(r#"{"configs":[{"@type":"type.googleapis.com/envoy.admin.v3.ClustersConfigDump","dynamic_active_clusters":[{"cluster":{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","connect_timeout":"not a duration"}}]}]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ClustersConfigDump"), "{e}");
}

#[test]
fn a_written_dump_reads_back_the_same() {
    let set = read_config_dump(&dump("config_v1.json")).expect("v1");
    let versions = HashMap::from([(nasp_xds::types::CLUSTER.to_string(), "7".to_string())]);
    let json = nasp_xds::dump::write_config_dump(&set, &versions).expect("write");
    assert_eq!(
        json["configs"][0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
    );
    assert_eq!(json["configs"][0]["version_info"], "7");
    let again = read_config_dump(&json.to_string()).expect("read back");
    assert_eq!(again.clusters, set.clusters);
    assert_eq!(again.endpoints, set.endpoints);
    assert_eq!(again.routes, set.routes);
    assert_eq!(again.listeners.len(), set.listeners.len());
}

#[test]
fn echo_cluster_is_complete_on_the_dump() {
    use nasp_xds::view::{ClientCertificate, HealthStatus, TlsMode, TrustedCa, UpstreamProtocol};
    let v0 = view("config_v0.json");
    let c = v0
        .cluster("outbound|80||echo.demo.svc.cluster.local")
        .expect("echo");
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert!(c.locality_weighted_lb, "locality_weighted_lb_config");
    assert_eq!(c.overprovisioning_factor, 140);
    let e = &c.endpoints[0];
    assert_eq!(e.locality_weight, Some(2));
    assert_eq!(e.weight, 2);
    assert_eq!(e.health, HealthStatus::Healthy);
    assert_eq!(e.tls_mode.as_deref(), Some("istio"));
    // Auto-mTLS: Istio mTLS toward tlsMode=istio endpoints, plaintext else.
    let names: Vec<&str> = c.socket_matches.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["tlsMode-istio", "tlsMode-disabled"]);
    let tls = c.tls_for(e).expect("mTLS to an Istio endpoint");
    assert_eq!(tls.mode, TlsMode::IstioMutual);
    assert_eq!(tls.trusted_ca, TrustedCa::Sds("ROOTCA".into()));
    assert_eq!(
        tls.client_certificate,
        ClientCertificate::Sds("default".into())
    );
    let mut plain = e.clone();
    plain.tls_mode = None;
    assert!(
        c.tls_for(&plain).is_none(),
        "plaintext to a non-Istio endpoint"
    );
    // gRPC port: explicit HTTP/2 upstream; an HTTP port: the downstream's.
    let grpc = v0
        .cluster("outbound|15010||istiod-cp-v113x.istio-system.svc.cluster.local")
        .expect("istiod grpc");
    assert_eq!(grpc.upstream_protocol, UpstreamProtocol::Http2);
    let http = v0
        .cluster("outbound|8080||heimdall.heimdall.svc.cluster.local")
        .expect("heimdall");
    assert_eq!(http.upstream_protocol, UpstreamProtocol::UseDownstream);
    assert_eq!(c.upstream_protocol, UpstreamProtocol::Http1);
}

#[test]
fn inbound_chains_as_istio_wrote_them() {
    use nasp_xds::InboundTransport;
    let v0 = view("config_v0.json");
    // A PERMISSIVE TCP port: Istio mTLS, the application's own TLS, plaintext.
    let tcp = v0.inbound(8083).expect("8083");
    assert_eq!(tcp.chains.len(), 3);
    assert!(tcp.tls && tcp.permissive && !tcp.catch_all);
    let mtls = tcp
        .chain(true, &["istio-peer-exchange", "istio"])
        .expect("mTLS");
    assert!(matches!(
        &mtls.transport,
        InboundTransport::Mtls { require_client_certificate: true, alpn } if alpn.contains(&"istio-peer-exchange".to_string())
    ));
    assert!(
        mtls.application_protocols
            .contains(&"istio-http/1.1".to_string())
    );
    assert!(!mtls.http);
    let own = tcp.chain(true, &["h2"]).expect("the app's TLS");
    assert_eq!(own.transport, InboundTransport::TlsPassthrough);
    assert_eq!(
        tcp.chain(false, &[]).map(|c| &c.transport),
        Some(&InboundTransport::Plaintext)
    );
    // An HTTP port: HTTP chains.
    let http = v0.inbound(8080).expect("8080");
    assert!(http.chains.iter().all(|c| c.http));
    // Any other port: the catch-all chains answer; 15006 is the blackhole.
    let other = v0.inbound(9999).expect("the catch-all");
    assert!(other.catch_all && other.tls && other.permissive);
    assert_eq!(other.port, 9999);
    assert!(
        other
            .chain(true, &["istio-http/1.1"])
            .is_some_and(|c| c.http)
    );
    assert!(v0.inbound(15006).is_none());
}

fn service(host: &str) -> nasp_xds::cluster::IstioService {
    let (name, rest) = host.split_once('.').expect("a service FQDN");
    nasp_xds::cluster::IstioService {
        host: host.into(),
        name: name.into(),
        namespace: rest.split('.').next().expect("namespace").into(),
    }
}

#[test]
fn clusters_carry_the_services_istiod_names_in_their_metadata() {
    let v0 = view("config_v0.json");
    let c = v0
        .cluster("outbound|80||echo.demo.svc.cluster.local")
        .expect("echo");
    assert_eq!(&c.services[..], &[service("echo.demo.svc.cluster.local")]);
    let inbound = v0.cluster("inbound|8080||").expect("inbound 8080");
    assert_eq!(
        &inbound.services[..],
        &[service("catalog.demo.svc.cluster.local")]
    );
    // Envoy's own clusters name none.
    assert!(
        v0.cluster("PassthroughCluster")
            .expect("passthrough")
            .services
            .is_empty()
    );
}

#[test]
fn local_services_from_the_inbound_cluster_else_the_clusters_the_workload_is_in() {
    let v0 = view("config_v0.json");
    let addr = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
    // istiod's inbound cluster for the port decides (the dump is catalog's).
    for local in ["0.0.0.0:8080", "10.20.160.34:8082"] {
        assert_eq!(
            &v0.local_services(addr(local), &[])[..],
            &[service("catalog.demo.svc.cluster.local")],
            "{local}"
        );
    }
    // No inbound cluster for 9000: the services with an endpoint there.
    let echo = [service("echo.default.svc.cluster.local")];
    assert_eq!(
        &v0.local_services(addr("10.20.161.226:9000"), &[])[..],
        &echo
    );
    let ip: std::net::IpAddr = "10.20.161.226".parse().expect("ip");
    assert_eq!(&v0.local_services(addr("0.0.0.0:9000"), &[ip])[..], &echo);
    assert!(v0.local_services(addr("0.0.0.0:9000"), &[]).is_empty());
    assert!(
        v0.local_services(addr("10.20.161.227:9000"), &[])
            .is_empty()
    );
    // Two services on one endpoint: both, in cluster-name order, once each.
    assert_eq!(
        &v0.local_services(addr("10.20.161.227:16686"), &[])[..],
        &[
            service("smm-jaeger-query.smm-system.svc.cluster.local"),
            service("smm-tracing.smm-system.svc.cluster.local"),
        ]
    );
}
