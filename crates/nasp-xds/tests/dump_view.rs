//! The expectations of reference §6 on the real Istio config dumps, without
//! any network: dump → resources → resolved view.

use std::collections::HashMap;

use nasp_xds::{MeshView, ViewSettings, read_config_dump};

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

fn addrs(o: &nasp_xds::Outbound) -> Vec<String> {
    let mut v: Vec<String> = o
        .cluster
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
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
    let o = view("config_v0.json")
        .outbound("10.10.42.110", 12050)
        .expect("known");
    assert!(o.cluster.tls && o.cluster.permissive);
    assert_eq!(
        o.cluster.sni.as_deref(),
        Some("outbound_.12050_._.echo.demo.svc.cluster.local")
    );
    assert_eq!(addrs(&o), vec!["10.20.160.131:8080"]);
    let o = view("config_v1.json")
        .outbound("10.10.42.110", 12050)
        .expect("known");
    assert_eq!(
        addrs(&o),
        vec![
            "10.20.164.172:8080",
            "10.20.166.13:8080",
            "10.20.166.2:8080"
        ]
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
        let o = v0.outbound(host, 80).unwrap_or_else(|| panic!("{host}"));
        assert_eq!(
            o.cluster.name, "outbound|80||echo.demo.svc.cluster.local",
            "{host}"
        );
        assert_eq!(
            o.cluster.sni.as_deref(),
            Some("outbound_.80_._.echo.demo.svc.cluster.local")
        );
        assert!(o.cluster.tls && o.cluster.permissive);
        assert_eq!(addrs(&o), vec!["10.20.160.131:8080"]);
        assert_eq!(
            o.cluster.expected_sans,
            vec!["spiffe://cluster.local/ns/demo/sa/default".to_string()]
        );
        let routes = o.routes.expect("HTTP routes");
        let first = &routes[0];
        assert_eq!(first.matcher, "prefix:/");
        let retry = first.retry.as_ref().expect("retries");
        assert_eq!(retry.num_retries, 2);
        assert!(retry.retry_on.contains("retriable-status-codes"));
        assert!(retry.retriable_status_codes.contains(&503));
    }
    let o = view("config_v1.json").outbound("echo", 80).expect("known");
    assert_eq!(
        addrs(&o),
        vec![
            "10.20.164.172:8080",
            "10.20.166.13:8080",
            "10.20.166.2:8080"
        ]
    );
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
