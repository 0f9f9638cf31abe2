//! ADS end to end on loopback: the embedded control plane serving the real
//! Istio config dumps, the nasp ADS client resolving them, over SotW and
//! Delta — the expectations of reference §6, the switch from v0 to v1 while
//! connected, NACKs of malformed resources, removal, and a control-plane
//! restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache};
use nasp_xds::types::{CLUSTER, Encoded};
use nasp_xds::{AdsClient, AdsConfig, Protocol, ResourceSet, ViewSettings, read_config_dump};
use tonic::transport::{Channel, Endpoint};

fn dump(name: &str) -> ResourceSet {
    let path = format!(
        "{}/../../../shared/data/istio-config-dumps/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    read_config_dump(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
        .expect("dump")
}

async fn start(cache: Arc<SnapshotCache>, addr: &str) -> ControlPlane {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca,
            xds: Some(cache),
        },
    )
    .expect("start")
}

fn channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

fn config(protocol: Protocol) -> AdsConfig {
    let mut c = AdsConfig::new(Node {
        id: "test-node-id".into(),
        cluster: "catalog-v1.demo".into(),
        ..Default::default()
    });
    c.protocol = protocol;
    c.view = ViewSettings {
        search_domains: vec![
            "demo.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    };
    c.backoff_initial = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(400);
    c
}

fn endpoints(client: &AdsClient, host: &str, port: u16) -> Option<Vec<String>> {
    let view = client.view();
    let o = view.outbound(host, port)?;
    let mut v: Vec<String> = view
        .plain_cluster(&o)?
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    v.sort();
    Some(v)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

const V1: [&str; 3] = [
    "10.20.164.172:8080",
    "10.20.166.13:8080",
    "10.20.166.2:8080",
];

async fn expectations(protocol: Protocol) {
    let cache = Arc::new(SnapshotCache::new(&dump("config_v0.json")));
    let cp = start(cache.clone(), "127.0.0.1:0").await;
    let client = AdsClient::start(channel(cp.addr()), config(protocol));
    client.ready(Duration::from_secs(10)).await.expect("ready");

    // Reference §6, v0.
    let view = client.view();
    let inbound = view.inbound(8080).expect("8080");
    assert!(
        inbound.tls && inbound.client_certificate_required && inbound.permissive,
        "{protocol:?}"
    );
    let tcp = view.outbound("10.10.42.110", 12050).expect("tcp");
    let tcp = tcp.cluster().expect("a TCP service");
    assert_eq!(
        tcp.sni.as_deref(),
        Some("outbound_.12050_._.echo.demo.svc.cluster.local")
    );
    assert!(tcp.tls && tcp.permissive);
    assert_eq!(
        endpoints(&client, "10.10.42.110", 12050),
        Some(vec!["10.20.160.131:8080".to_string()])
    );
    let http = view
        .outbound("10.10.42.110", 80)
        .and_then(|o| view.plain_cluster(&o))
        .expect("http");
    assert_eq!(
        http.sni.as_deref(),
        Some("outbound_.80_._.echo.demo.svc.cluster.local")
    );
    assert_eq!(
        endpoints(&client, "echo", 80),
        Some(vec!["10.20.160.131:8080".to_string()])
    );

    // Switch to v1 while connected: the echo service scales to three.
    cache.set(&dump("config_v1.json"));
    eventually("v1 endpoints", || {
        endpoints(&client, "10.10.42.110", 12050) == Some(V1.map(String::from).to_vec())
    })
    .await;
    assert_eq!(
        endpoints(&client, "10.10.42.110", 80),
        Some(V1.map(String::from).to_vec())
    );
    assert_eq!(client.stats().nacks, 0);

    // A malformed cluster: NACKed, and the last good config stays.
    let good = cache.current();
    let mut broken: BTreeMap<String, BTreeMap<String, Encoded>> = good.resources.clone();
    let clusters = broken.get_mut(CLUSTER).expect("clusters");
    let mut bad = clusters.values().next().expect("a cluster").clone();
    bad.name = "zz-broken".into();
    bad.any.value = vec![0xff, 0xff, 0xff, 0x0f];
    bad.version = "broken".into();
    clusters.insert(bad.name.clone(), bad);
    cache.set_raw(broken);
    let mut stats = client.watch_stats();
    tokio::time::timeout(Duration::from_secs(5), stats.wait_for(|s| s.nacks >= 1))
        .await
        .expect("NACK sent")
        .expect("stats");
    assert!(
        client
            .stats()
            .last_nack
            .unwrap_or_default()
            .contains(CLUSTER)
    );
    assert_eq!(
        endpoints(&client, "echo", 80),
        Some(V1.map(String::from).to_vec()),
        "{protocol:?}: the good config stays"
    );
    assert!(client.view().cluster("zz-broken").is_none());

    // A resource removed from the snapshot disappears from lookups.
    let mut without = dump("config_v1.json");
    without
        .listeners
        .retain(|name, _| name != "10.10.42.110_12050");
    without
        .clusters
        .retain(|name, _| name != "outbound|12050||echo.demo.svc.cluster.local");
    cache.set(&without);
    eventually("the TCP service to go", || {
        client.view().outbound("10.10.42.110", 12050).is_none()
    })
    .await;
    assert!(
        client.view().outbound("echo", 80).is_some(),
        "the rest stays"
    );
    cache.set(&dump("config_v1.json"));
    eventually("the TCP service back", || {
        client.view().outbound("10.10.42.110", 12050).is_some()
    })
    .await;

    // The control plane restarts: lookups answer meanwhile, the client
    // reconnects and converges on what the new one serves.
    let addr = cp.addr();
    cp.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        endpoints(&client, "echo", 80),
        Some(V1.map(String::from).to_vec()),
        "served from the last view"
    );
    let cache2 = Arc::new(SnapshotCache::new(&dump("config_v0.json")));
    let _cp2 = start(cache2, &addr.to_string()).await;
    eventually("convergence on the restarted control plane", || {
        endpoints(&client, "echo", 80) == Some(vec!["10.20.160.131:8080".to_string()])
    })
    .await;
    assert!(client.stats().reconnects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_meets_the_expectations() {
    expectations(Protocol::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_meets_the_expectations() {
    expectations(Protocol::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_arrives_with_its_workload_metadata() {
    let cache = Arc::new(SnapshotCache::new(&dump("config_v0.json")));
    let cp = start(cache.clone(), "127.0.0.1:0").await;
    let settings = nasp_xds::WorkloadSettings::from_lookup(|k| match k {
        "POD_NAME" => Some("catalog-v1-abc".into()),
        "POD_NAMESPACE" => Some("demo".into()),
        "CLUSTER_ID" => Some("waynz0r-0626-01".into()),
        "INSTANCE_IPS" => Some("10.20.1.7".into()),
        _ => None,
    });
    for protocol in [Protocol::Sotw, Protocol::Delta] {
        let mut c = AdsConfig::new(settings.node());
        c.protocol = protocol;
        c.view = ViewSettings {
            search_domains: settings.search_domains(),
        };
        let client = AdsClient::start(channel(cp.addr()), c);
        client.ready(Duration::from_secs(10)).await.expect("ready");
        assert!(
            client.view().outbound("echo", 80).is_some(),
            "{protocol:?}: search domains from the settings"
        );
    }
    let nodes = cache.nodes();
    let node = nodes
        .get("sidecar~10.20.1.7~catalog-v1-abc.demo~demo.svc.cluster.local")
        .expect("the node connected");
    let md = node.metadata.as_ref().expect("metadata");
    let cluster_id = md.fields.get("CLUSTER_ID").and_then(|v| v.kind.clone());
    assert!(
        matches!(cluster_id, Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) if s == "waynz0r-0626-01")
    );
}

/// v0 with one resource of every type changed, so that a new snapshot pushes
/// all four types at once.
fn every_type_changed() -> ResourceSet {
    let mut set = dump("config_v0.json");
    let echo = "outbound|80||echo.demo.svc.cluster.local";
    set.clusters
        .get_mut(echo)
        .expect("echo cluster")
        .alt_stat_name = "changed".into();
    set.endpoints
        .get_mut(echo)
        .expect("echo endpoints")
        .endpoints
        .push(Default::default());
    set.listeners
        .get_mut("10.10.42.110_12050")
        .expect("tcp listener")
        .stat_prefix = "changed".into();
    set.routes
        .get_mut("80")
        .expect("route 80")
        .internal_only_headers
        .push("x-changed".into());
    set
}

const ORDER: [&str; 4] = [
    nasp_xds::types::CLUSTER,
    nasp_xds::types::ENDPOINT,
    nasp_xds::types::LISTENER,
    nasp_xds::types::ROUTE,
];

/// Subscribes raw (RDS first, CDS last), takes the first answers, then has
/// the cache change every type and returns the order of the push.
async fn push_order(delta: bool) -> Vec<String> {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    let echo = "outbound|80||echo.demo.svc.cluster.local";
    let names = |t: &str| -> Vec<String> {
        match t {
            nasp_xds::types::ENDPOINT => vec![echo.into()],
            nasp_xds::types::ROUTE => vec!["80".into()],
            _ => Vec::new(),
        }
    };
    let cache = Arc::new(SnapshotCache::new(&dump("config_v0.json")));
    let cp = start(cache.clone(), "127.0.0.1:0").await;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(cp.addr()))
        .max_decoding_message_size(64 << 20);
    let mut order = Vec::new();
    let deadline = Duration::from_secs(10);
    if delta {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for t in ORDER.iter().rev() {
            let mut subscribe = names(t);
            if subscribe.is_empty() {
                subscribe.push("*".into());
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: t.to_string(),
                resource_names_subscribe: subscribe,
                ..Default::default()
            })
            .await
            .expect("send");
        }
        let mut inbound = ads
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        for i in 0..8 {
            let resp = tokio::time::timeout(deadline, inbound.message())
                .await
                .expect("in time")
                .expect("ok")
                .expect("a response");
            tx.send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .expect("ack");
            if i == 3 {
                cache.set(&every_type_changed());
            }
            if i >= 4 {
                order.push(resp.type_url);
            }
        }
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for t in ORDER.iter().rev() {
            tx.send(DiscoveryRequest {
                type_url: t.to_string(),
                resource_names: names(t),
                ..Default::default()
            })
            .await
            .expect("send");
        }
        let mut inbound = ads
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        for i in 0..8 {
            let resp = tokio::time::timeout(deadline, inbound.message())
                .await
                .expect("in time")
                .expect("ok")
                .expect("a response");
            tx.send(DiscoveryRequest {
                version_info: resp.version_info.clone(),
                type_url: resp.type_url.clone(),
                resource_names: names(&resp.type_url),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .expect("ack");
            if i == 3 {
                cache.set(&every_type_changed());
            }
            if i >= 4 {
                order.push(resp.type_url);
            }
        }
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_pushes_in_make_before_break_order() {
    // Several times: hash-map order would pass now and then by chance.
    for _ in 0..4 {
        assert_eq!(push_order(false).await, ORDER.map(String::from).to_vec());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_pushes_in_make_before_break_order() {
    for _ in 0..4 {
        assert_eq!(push_order(true).await, ORDER.map(String::from).to_vec());
    }
}
