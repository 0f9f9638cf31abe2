//! What the transport's integration tests share: workload certificates from
//! the embedded CA, and small Envoy config dumps (plaintext or mTLS STATIC
//! clusters behind one RDS route table) read back as a client reads them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::{KeyAlgorithm, WorkloadCert, keys};
use nasp_transport::{
    HttpClient, InboundConfig, InboundMode, MeshConnector, MeshListener, StaticView,
};
use nasp_xds::{MeshView, ResourceSet, ViewSettings, read_config_dump};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;

/// A certificate watch, as the secret manager hands it out.
pub type Watch = watch::Receiver<Option<Arc<WorkloadCert>>>;

/// A workload certificate for `who` (a SPIFFE id) from `ca`, valid an hour.
pub fn issue(ca: &CertificateAuthority, who: &str) -> Arc<WorkloadCert> {
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = OffsetDateTime::now_utc();
    let chain = ca
        .issue(
            &who.parse().expect("id"),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .expect("issue")
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    Arc::new(
        WorkloadCert::new(
            chain,
            pem_key(key.serialize_pem().as_bytes()).expect("key"),
            pem_certs(ca.root_pem().as_bytes()).expect("root"),
        )
        .expect("cert"),
    )
}

/// A watch holding `who`'s certificate from `ca` for the whole test.
pub fn workload(ca: &CertificateAuthority, who: &str) -> Watch {
    let (tx, rx) = watch::channel(Some(issue(ca, who)));
    std::mem::forget(tx);
    rx
}

/// Certificates from a CA of their own (for plaintext tests that still need
/// a listener's or client's identity).
pub fn any_certs() -> Watch {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    workload(&ca, "spiffe://cluster.local/ns/demo/sa/test")
}

/// A STATIC cluster `name` over `eps`, with `extra` cluster fields.
pub fn static_cluster(name: &str, eps: &[SocketAddr], extra: Value) -> Value {
    let lb: Vec<Value> = eps
        .iter()
        .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}]}
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

/// Explicit HTTP/2 to a cluster's endpoints (`typed_extension_protocol_options`).
pub fn http2() -> Value {
    json!({"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}})
}

/// Istio's circuit breakers (2³²−1 everywhere).
pub fn istio_circuit_breakers() -> Value {
    json!({"circuit_breakers": {"thresholds": [{"max_connections": 4294967295u32, "max_pending_requests": 4294967295u32,
        "max_requests": 4294967295u32, "max_retries": 4294967295u32, "track_remaining": true}]}})
}

/// A config dump: `clusters` (cluster JSON objects) and, on the `0.0.0.0_80`
/// listener's RDS table `"80"`, `vhosts` (virtual-host JSON objects);
/// `route_config_extra` adds fields to the route configuration.
pub fn dump(clusters: Vec<Value>, vhosts: Vec<Value>, route_config_extra: Value) -> ResourceSet {
    let clusters: Vec<Value> = clusters
        .into_iter()
        .map(|c| json!({"cluster": c}))
        .collect();
    let mut rc = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "80", "virtual_hosts": vhosts});
    if let (Some(r), Some(e)) = (rc.as_object_mut(), route_config_extra.as_object()) {
        r.extend(e.clone());
    }
    let listener = json!({"name": "0.0.0.0_80", "active_state": {"listener": {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "outbound_0.0.0.0_80",
            "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": "80"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
        }}]}]
    }}});
    let d = json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": [listener]},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [{"route_config": rc}]}
    ]});
    read_config_dump(&d.to_string()).expect("test dump")
}

/// The view of a resource set.
pub fn view(set: &ResourceSet) -> MeshView {
    MeshView::build(set, HashMap::new(), ViewSettings::default())
}

/// A client over a fixed view of `set`, presenting `certs`.
pub fn client(set: &ResourceSet, certs: Watch) -> HttpClient {
    HttpClient::new(
        Arc::new(StaticView::new(view(set))),
        MeshConnector::new(certs),
    )
}

/// A plaintext listener on `ip` (any port), for backends outside the mesh.
pub async fn plain_listener(ip: &str) -> MeshListener {
    MeshListener::bind(
        format!("{ip}:0").parse().expect("addr"),
        any_certs(),
        InboundConfig::new(InboundMode::Disable, "cluster.local"),
    )
    .await
    .expect("listen")
}
