//! A replica that shuts down under load fails no request: its server
//! drains (the port closes, accepted connections are served, HTTP/1.1
//! answers say `connection: close` for a grace, then GOAWAY / close) and
//! the client's retries (Istio's default policy) and its stale keep-alive
//! retry take the rest to the other replica. HTTP/1.1 and HTTP/2, 8
//! concurrent callers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::{KeyAlgorithm, WorkloadCert, keys};
use nasp_transport::{
    Body, HttpClient, InboundConfig, InboundMode, MeshConnector, MeshListener, StaticView,
    serve_http_until,
};
use nasp_xds::{MeshView, ViewSettings, read_config_dump};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

fn certs() -> watch::Receiver<Option<Arc<WorkloadCert>>> {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = OffsetDateTime::now_utc();
    let chain = ca
        .issue(
            &"spiffe://cluster.local/ns/demo/sa/web".parse().expect("id"),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .expect("issue")
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    let cert = WorkloadCert::new(
        chain,
        pem_key(key.serialize_pem().as_bytes()).expect("key"),
        pem_certs(ca.root_pem().as_bytes()).expect("root"),
    )
    .expect("cert");
    let (tx, rx) = watch::channel(Some(Arc::new(cert)));
    std::mem::forget(tx);
    rx
}

/// A replica that serves until `stop` fires, then drains.
async fn replica(
    ip: &str,
    name: &'static str,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    let listener = MeshListener::bind(
        format!("{ip}:0").parse().expect("addr"),
        certs(),
        InboundConfig::new(InboundMode::Disable, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("x-served-by", name)
                .body(Body::from(name))
                .expect("response"),
        )
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_http_until(
        listener,
        svc,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(2),
    ));
    (addr, tx, task)
}

fn client(eps: &[SocketAddr]) -> HttpClient {
    let lb: Vec<_> = eps
        .iter()
        .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    let cluster = |name: &str, h2: bool| {
        let mut c = json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            // Istio's circuit breakers (Envoy's default allows 3 retries
            // in flight, which 8 callers overflow).
            "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u32, "max_pending_requests": 4294967295u32,
                "max_requests": 4294967295u32, "max_retries": 4294967295u32, "track_remaining": true}]},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb.clone()}]}
        });
        if h2 {
            c["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}});
        }
        json!({"cluster": c})
    };
    // Istio's default retry policy.
    let retry = json!({"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2, "retriable_status_codes": [503],
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5"});
    let vhost = |name: &str, c: &str| json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": c, "retry_policy": retry.clone()}}]});
    let dump = json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": [cluster("h1", false), cluster("h2", true)]},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": [{"name": "0.0.0.0_80", "active_state": {"listener": {
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "0.0.0.0_80",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "outbound_0.0.0.0_80",
                "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": "80"},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }}]}]}}}]},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [{"route_config": {
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "80", "virtual_hosts": [vhost("h1.test", "h1"), vhost("h2.test", "h2")]}}]}
    ]});
    let set = read_config_dump(&dump.to_string()).expect("dump");
    let view = MeshView::build(&set, HashMap::new(), ViewSettings::default());
    HttpClient::new(Arc::new(StaticView::new(view)), MeshConnector::new(certs()))
}

async fn run(host: &'static str, ips: [&str; 2]) {
    let (a, stop_a, drained_a) = replica(ips[0], "a").await;
    let (b, _stop_b, _drained_b) = replica(ips[1], "b").await;
    let client = client(&[a, b]);
    let end = Instant::now() + Duration::from_millis(2500);
    let mut callers = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        callers.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut failures = Vec::new();
            while Instant::now() < end {
                let req = http::Request::get(format!("http://{host}/"))
                    .body(Body::empty())
                    .expect("request");
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let by = r
                            .headers()
                            .get("x-served-by")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let _ = r.into_body().collect_bytes().await;
                        *seen.entry(by).or_default() += 1;
                    }
                    Ok(r) => {
                        let s = r.status();
                        let b = r.into_body().collect_bytes().await.unwrap_or_default();
                        failures.push(format!("{s} {}", String::from_utf8_lossy(&b)));
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (seen, failures)
        }));
    }
    // Stop replica a in the middle of the load.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _ = stop_a.send(());
    let left = drained_a.await.expect("join");
    assert_eq!(left, 0, "{host}: connections left after the drain");
    let mut total: HashMap<String, usize> = HashMap::new();
    for c in callers {
        let (seen, mut failures) = c.await.expect("join");
        failures.truncate(5);
        assert!(
            failures.is_empty(),
            "{host}: requests failed while a replica drained: {failures:?}"
        );
        for (k, v) in seen {
            *total.entry(k).or_default() += v;
        }
    }
    assert!(
        total.get("a").copied().unwrap_or(0) > 20,
        "{host}: {total:?}"
    );
    assert!(
        total.get("b").copied().unwrap_or(0) > 20,
        "{host}: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_http1_replica_fails_no_request() {
    run("h1.test", ["127.0.0.100", "127.0.0.101"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_http2_replica_fails_no_request() {
    run("h2.test", ["127.0.0.102", "127.0.0.103"]).await;
}
