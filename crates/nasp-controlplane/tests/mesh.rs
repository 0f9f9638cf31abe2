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
