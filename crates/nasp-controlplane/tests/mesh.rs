//! The mesh file: Istio-shaped resources that resolve as istiod's would,
//! served over ADS with the NDS name table.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use nasp_controlplane::mesh::{MeshFile, generate};
use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache};
use nasp_xds::{AdsClient, AdsConfig, MeshView, Protocol, ViewSettings};

fn mesh() -> MeshFile {
    let path = format!(
        "{}/../../examples/mesh/mesh.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    MeshFile::parse(&std::fs::read_to_string(path).expect("mesh file")).expect("parses")
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

fn addrs(view: &MeshView, host: &str, port: u16) -> Vec<String> {
    let o = view
        .outbound(host, port)
        .unwrap_or_else(|| panic!("{host}:{port}"));
    let mut v: Vec<String> = view
        .plain_cluster(&o)
        .expect("a cluster")
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    v.sort();
    v
}

#[test]
fn generated_resources_resolve_like_istio() {
    let (set, _) = generate(&mesh()).expect("generate");
    let view = MeshView::build(&set, Default::default(), settings());

    for host in [
        "echo",
        "echo.demo",
        "echo.demo.svc.cluster.local",
        "10.10.42.110",
    ] {
        let o = view.outbound(host, 80).unwrap_or_else(|| panic!("{host}"));
        let c = view.plain_cluster(&o).expect("GET / is forwarded");
        assert_eq!(c.name, "outbound|80||echo.demo.svc.cluster.local");
        assert_eq!(
            c.sni.as_deref(),
            Some("outbound_.80_._.echo.demo.svc.cluster.local")
        );
        assert!(c.tls && c.permissive);
        assert_eq!(
            c.expected_sans,
            vec!["spiffe://cluster.local/ns/demo/sa/default".to_string()]
        );
        let route = &o.http().expect("HTTP").virtual_host.routes[0];
        let retry = match &route.action {
            nasp_xds::route::RouteAction::Forward(f) => f.retry_policy.clone(),
            _ => None,
        }
        .expect("retries");
        assert_eq!(
            (retry.num_retries, retry.retriable_status_codes),
            (2, vec![503])
        );
    }
    assert_eq!(
        addrs(&view, "echo", 80),
        vec!["10.20.160.131:8080", "10.20.164.172:8080", "10.20.9.9:8080"]
    );
    let echo = view
        .outbound("echo", 80)
        .and_then(|o| view.plain_cluster(&o))
        .expect("echo");
    let plain = echo
        .endpoints
        .iter()
        .find(|e| e.address == "10.20.9.9:8080")
        .expect("endpoint");
    assert!(
        !plain.istio_mtls,
        "a non-Istio endpoint gets plaintext in PERMISSIVE mode"
    );
    let weighted = echo
        .endpoints
        .iter()
        .find(|e| e.address == "10.20.164.172:8080")
        .expect("endpoint");
    assert_eq!(
        (weighted.weight, weighted.locality.as_str()),
        (2, "eu-central-1/eu-central-1b/")
    );

    let cluster = |h: &str, p: u16| {
        view.outbound(h, p)
            .and_then(|o| view.plain_cluster(&o))
            .unwrap_or_else(|| panic!("{h}:{p}"))
    };
    let tcp = cluster("10.10.42.110", 12050);
    assert_eq!(
        tcp.sni.as_deref(),
        Some("outbound_.12050_._.echo.demo.svc.cluster.local")
    );
    let db = cluster("db", 5432);
    assert!(db.tls && !db.permissive, "STRICT");
    assert_eq!(
        db.expected_sans,
        vec!["spiffe://cluster.local/ns/demo/sa/postgres".to_string()]
    );
    let legacy = cluster("legacy.other", 8080);
    assert!(!legacy.tls, "DISABLE");

    let i = view.inbound(8080).expect("8080");
    assert!(i.tls && i.permissive && i.client_certificate_required);
    let i = view.inbound(9090).expect("9090");
    assert!(i.tls && !i.permissive && i.client_certificate_required);
    let i = view.inbound(7070).expect("7070");
    assert!(!i.tls && !i.permissive);
    assert!(view.inbound(1234).is_none());
}

#[test]
fn bad_mesh_files_are_clear_errors() {
    let e = MeshFile::parse("services: [{name: x}]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mesh file"), "{e}");
    let e = MeshFile::parse("servces: []").unwrap_err().to_string();
    assert!(e.contains("servces"), "unknown keys are named: {e}");
    let m =
        MeshFile::parse("services: [{name: t, namespace: n, ports: [{port: 9, protocol: tcp}]}]")
            .expect("parses");
    let e = generate(&m).unwrap_err().to_string();
    assert!(e.contains("needs a vip"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_only_nds_knows_resolve_when_nds_is_on() {
    let (set, names) = generate(&mesh()).expect("generate");
    let cache = Arc::new(SnapshotCache::default());
    cache.set_with_names(&set, &names);
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
    for protocol in [Protocol::Sotw, Protocol::Delta] {
        for nds in [false, true] {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr()))
                .expect("uri")
                .connect_lazy();
            let mut config = AdsConfig::new(Node {
                id: "n".into(),
                ..Default::default()
            });
            config.protocol = protocol;
            config.nds = nds;
            config.view = settings();
            let client = AdsClient::start(channel, config);
            client.ready(Duration::from_secs(10)).await.expect("ready");
            // `echo.example.internal` exists only in the name table.
            let found = client.view().outbound("echo.example.internal", 12050);
            assert_eq!(found.is_some(), nds, "{protocol:?} nds={nds}");
            if let Some(o) = found {
                assert_eq!(
                    o.cluster().map(|c| c.name.as_str()),
                    Some("outbound|12050||echo.demo.svc.cluster.local")
                );
            }
        }
    }
}

/// Envoy's validation rules for what the mesh generator writes, as the
/// protos and docs state them; each returns the first violation.
mod envoy_rules {
    use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext,
    };
    use nasp_xds::ResourceSet;
    use prost::Message;

    const UP: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
    const DOWN: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

    fn any_of(ts: &Option<TransportSocket>, url: &str) -> Option<Vec<u8>> {
        match ts.as_ref()?.config_type.as_ref()? {
            transport_socket::ConfigType::TypedConfig(a) if a.type_url == url => {
                Some(a.value.clone())
            }
            _ => None,
        }
    }

    /// (has SAN matchers, has a trust source).
    fn validation(c: &CommonTlsContext) -> (bool, bool) {
        #[allow(deprecated)]
        let sans = |v: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext| {
            !v.match_subject_alt_names.is_empty() || !v.match_typed_subject_alt_names.is_empty()
        };
        let trusted = |v: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext| {
            v.trusted_ca.is_some() || v.system_root_certs.is_some() || v.ca_certificate_provider_instance.is_some()
        };
        match c.validation_context_type.as_ref() {
            Some(ValidationContextType::ValidationContext(v)) => (sans(v), trusted(v)),
            Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) => (false, true),
            Some(ValidationContextType::CombinedValidationContext(cv)) => (
                cv.default_validation_context.as_ref().is_some_and(sans),
                cv.validation_context_sds_secret_config.is_some()
                    || cv.default_validation_context.as_ref().is_some_and(trusted),
            ),
            _ => (false, false),
        }
    }

    fn has_certificate(c: &CommonTlsContext) -> bool {
        !c.tls_certificates.is_empty()
            || !c.tls_certificate_sds_secret_configs.is_empty()
            || c.tls_certificate_provider_instance.is_some()
    }

    fn check_listener(l: &Listener) -> Result<(), String> {
        let mut seen = Vec::new();
        let mut needs_inspector = false;
        for fc in l.filter_chains.iter() {
            let m = fc.filter_chain_match.clone().unwrap_or_default();
            if seen.contains(&m) {
                return Err(format!(
                    "listener {}: multiple filter chains with the same matching rules",
                    l.name
                ));
            }
            needs_inspector |= !m.transport_protocol.is_empty()
                || !m.application_protocols.is_empty()
                || !m.server_names.is_empty();
            seen.push(m);
            if let Some(v) = any_of(&fc.transport_socket, DOWN) {
                let d = DownstreamTlsContext::decode(v.as_slice()).map_err(|e| e.to_string())?;
                let c = d.common_tls_context.unwrap_or_default();
                if !has_certificate(&c) {
                    return Err(format!(
                        "listener {}: a downstream TLS context without a certificate",
                        l.name
                    ));
                }
                if d.require_client_certificate.is_some_and(|b| b.value) && !validation(&c).1 {
                    return Err(format!(
                        "listener {}: client certificates required but nothing to verify them against",
                        l.name
                    ));
                }
            }
        }
        if needs_inspector
            && !l
                .listener_filters
                .iter()
                .any(|f| f.name == "envoy.filters.listener.tls_inspector")
        {
            return Err(format!(
                "listener {}: matches on transport or ALPN without the TLS inspector",
                l.name
            ));
        }
        Ok(())
    }

    /// The cluster rules of Envoy's load-balancer and outlier settings.
    fn check_policy(
        c: &envoy_types::pb::envoy::config::cluster::v3::Cluster,
    ) -> Result<(), String> {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy};
        match &c.lb_config {
            Some(LbConfig::RingHashLbConfig(r)) => {
                if c.lb_policy != LbPolicy::RingHash as i32 {
                    return Err(format!(
                        "cluster {}: ring_hash_lb_config without RING_HASH",
                        c.name
                    ));
                }
                let min = r.minimum_ring_size.as_ref().map_or(1024, |v| v.value);
                let max = r
                    .maximum_ring_size
                    .as_ref()
                    .map_or(8 * 1024 * 1024, |v| v.value);
                if min > max || max > 8 * 1024 * 1024 {
                    return Err(format!("cluster {}: ring size {min}..{max}", c.name));
                }
            }
            Some(LbConfig::MaglevLbConfig(m)) => {
                if c.lb_policy != LbPolicy::Maglev as i32 {
                    return Err(format!(
                        "cluster {}: maglev_lb_config without MAGLEV",
                        c.name
                    ));
                }
                let n = m.table_size.as_ref().map_or(65537, |v| v.value);
                let prime = n >= 2
                    && (2..)
                        .take_while(|d| d * d <= n)
                        .all(|d| !n.is_multiple_of(d));
                if !prime || n > 5_000_011 {
                    return Err(format!(
                        "cluster {}: Maglev table size {n} is not a prime ≤ 5000011",
                        c.name
                    ));
                }
            }
            _ => {}
        }
        if let Some(p) = c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.healthy_panic_threshold.as_ref())
            && !(0.0..=100.0).contains(&p.value)
        {
            return Err(format!(
                "cluster {}: healthy_panic_threshold {}",
                c.name, p.value
            ));
        }
        if let Some(o) = &c.outlier_detection {
            let pct = [
                &o.max_ejection_percent,
                &o.enforcing_consecutive_5xx,
                &o.enforcing_consecutive_gateway_failure,
                &o.enforcing_success_rate,
                &o.enforcing_consecutive_local_origin_failure,
            ];
            if pct
                .iter()
                .any(|v| v.as_ref().is_some_and(|v| v.value > 100))
            {
                return Err(format!(
                    "cluster {}: an outlier percentage over 100",
                    c.name
                ));
            }
            let positive = |d: &Option<envoy_types::pb::google::protobuf::Duration>| {
                d.as_ref().is_none_or(|d| d.seconds > 0 || d.nanos > 0)
            };
            if !positive(&o.interval) || !positive(&o.base_ejection_time) {
                return Err(format!(
                    "cluster {}: outlier durations must be above 0",
                    c.name
                ));
            }
        }
        Ok(())
    }

    pub fn check(set: &ResourceSet) -> Result<(), String> {
        for c in set.clusters.values() {
            let sockets = c.transport_socket.iter().chain(
                c.transport_socket_matches
                    .iter()
                    .filter_map(|m| m.transport_socket.as_ref()),
            );
            for ts in sockets {
                let Some(v) = any_of(&Some(ts.clone()), UP) else {
                    continue;
                };
                let u = UpstreamTlsContext::decode(v.as_slice()).map_err(|e| e.to_string())?;
                let (sans, trusted) = validation(&u.common_tls_context.unwrap_or_default());
                if sans && !trusted {
                    return Err(format!(
                        "cluster {}: SAN-based verification without a trusted CA",
                        c.name
                    ));
                }
            }
            if c.connect_timeout
                .as_ref()
                .is_some_and(|d| d.seconds <= 0 && d.nanos <= 0)
            {
                return Err(format!(
                    "cluster {}: connect_timeout must be above 0",
                    c.name
                ));
            }
        }
        for c in set.clusters.values() {
            check_policy(c)?;
        }
        for cla in set.endpoints.values() {
            // `LocalityLbEndpoints.load_balancing_weight`: gte 1 when set.
            if cla.endpoints.iter().any(|g| {
                g.load_balancing_weight
                    .as_ref()
                    .is_some_and(|w| w.value < 1)
            }) {
                return Err(format!("EDS {}: a locality weight of 0", cla.cluster_name));
            }
        }
        for rc in set.routes.values() {
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    // Envoy: ':'-prefixed or host headers may not be modified.
                    let bad = r
                        .request_headers_to_add
                        .iter()
                        .filter_map(|h| h.header.as_ref().map(|h| h.key.as_str()))
                        .chain(r.request_headers_to_remove.iter().map(String::as_str))
                        .find(|k| k.starts_with(':') || k.eq_ignore_ascii_case("host"));
                    if let Some(k) = bad {
                        return Err(format!("route {}: header {k} may not be modified", r.name));
                    }
                }
            }
        }
        for l in set.listeners.values() {
            check_listener(l)?;
        }
        let (eds, rds) = nasp_xds::types::referenced(set);
        if let Some(n) = eds.iter().find(|n| !set.endpoints.contains_key(*n)) {
            return Err(format!("EDS {n} is referenced but not served"));
        }
        if let Some(n) = rds.iter().find(|n| !set.routes.contains_key(*n)) {
            return Err(format!("RDS {n} is referenced but not served"));
        }
        Ok(())
    }
}

#[test]
fn generated_resources_pass_envoys_validation_rules() {
    // The rules hold on what a real Envoy accepted (the dump) …
    let path = format!(
        "{}/../../../shared/data/istio-config-dumps/config_v0.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let real = nasp_xds::read_config_dump(&std::fs::read_to_string(path).expect("dump"))
        .expect("dump parses");
    envoy_rules::check(&real).expect("the real dump");
    // … and on what the mesh file generates.
    let (set, _) = generate(&mesh()).expect("generate");
    envoy_rules::check(&set).expect("the generated mesh");
    // … and on the traffic demo's (subsets, weighted routes, gRPC).
    let path = format!(
        "{}/../../examples/mesh/traffic.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let traffic =
        MeshFile::parse(&std::fs::read_to_string(path).expect("traffic.yaml")).expect("parses");
    let (set, _) = generate(&traffic).expect("generate");
    envoy_rules::check(&set).expect("the generated traffic mesh");
    // … and on the policy example (every DestinationRule / VirtualService
    // setting the mesh file has).
    let path = format!(
        "{}/../../examples/mesh/policy.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let policy =
        MeshFile::parse(&std::fs::read_to_string(path).expect("policy.yaml")).expect("parses");
    let (set, _) = generate(&policy).expect("generate");
    envoy_rules::check(&set).expect("the generated policy mesh");
}

#[test]
fn generated_inbound_has_istios_three_permissive_chains() {
    use nasp_xds::InboundTransport;
    let (set, _) = generate(&mesh()).expect("generate");
    let view = MeshView::build(&set, Default::default(), settings());
    let i = view.inbound(8080).expect("8080");
    let kinds: Vec<&InboundTransport> = i.chains.iter().map(|c| &c.transport).collect();
    assert!(matches!(
        kinds[0],
        InboundTransport::Mtls {
            require_client_certificate: true,
            ..
        }
    ));
    assert_eq!(kinds[1], &InboundTransport::TlsPassthrough);
    assert_eq!(kinds[2], &InboundTransport::Plaintext);
    assert!(
        i.chain(true, &["istio-peer-exchange", "istio"])
            .is_some_and(|c| matches!(c.transport, InboundTransport::Mtls { .. }))
    );
    assert_eq!(
        i.chain(true, &["h2"]).map(|c| &c.transport),
        Some(&InboundTransport::TlsPassthrough)
    );
    // Istio's retry host predicate on every route.
    let o = view.outbound("echo", 80).expect("echo");
    let route = &o.http().expect("HTTP").virtual_host.routes[0];
    let nasp_xds::route::RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    let r = f.retry_policy.as_ref().expect("retry");
    assert_eq!(
        r.host_predicates,
        vec![nasp_xds::route::HostPredicate::PreviousHosts]
    );
    assert_eq!(r.host_selection_retry_max_attempts, 5);
}
