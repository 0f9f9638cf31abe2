//! The outbound client through real sockets on loopback: routing by path,
//! header, query and weight from a hand-written Envoy config; the real
//! Istio config dumps served by the embedded control plane over ADS with
//! mTLS to backends, where switching v0 → v1 moves live traffic; retries on
//! connect failure to another endpoint; streaming in both directions; TCP
//! through the mesh.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Watch, workload};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache};
use nasp_transport::{
    Body, HttpClient, InboundConfig, InboundMode, LocalReply, MeshConnector, MeshListener,
    MeshPeer, StaticView, TcpConnector, Upstream, serve_http,
};
use nasp_xds::{AdsClient, AdsConfig, MeshView, ResourceSet, ViewSettings, read_config_dump};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend: answers with where it runs, what it saw and who called.
async fn backend(ip: &str, mode: InboundMode, certs: Watch, name: &'static str) -> SocketAddr {
    let listener = MeshListener::bind(
        format!("{ip}:0").parse().expect("addr"),
        certs,
        InboundConfig::new(mode, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
        let peer = req.extensions().get::<MeshPeer>().cloned();
        let mut resp = http::Response::builder()
            .header("x-served-by", name)
            .header("x-backend-addr", addr.to_string())
            .header(
                "x-seen-path",
                req.uri().path_and_query().map_or("", |p| p.as_str()),
            )
            .header(
                "x-seen-host",
                req.headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .or(req.uri().authority().map(|a| a.as_str()))
                    .unwrap_or(""),
            )
            .header("x-seen-version", format!("{:?}", req.version()))
            .header(
                "x-seen-peer",
                peer.and_then(|p| p.id)
                    .map_or("-".into(), |id| id.to_string()),
            );
        if let Some(v) = req.headers().get("x-added") {
            resp = resp.header("x-seen-added", v);
        }
        if let Some(v) = req.headers().get("x-envoy-attempt-count") {
            resp = resp.header("x-seen-attempt", v);
        }
        // Echo the body frame by frame: the answer starts before the
        // request ends (a buffering client would never see it).
        let body = req.into_body();
        Ok::<_, Infallible>(resp.body(body).expect("response"))
    });
    tokio::spawn(serve_http(listener, svc));
    addr
}

async fn call(
    client: &HttpClient,
    req: http::Request<Body>,
) -> (http::Response<Bytes>, HashMap<String, String>) {
    let resp = client.request(req).await.expect("routed");
    let (parts, body) = resp.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = body.collect_bytes().await.expect("body");
    (http::Response::from_parts(parts, body), headers)
}

fn get(url: &str) -> http::Request<Body> {
    http::Request::get(url)
        .body(Body::empty())
        .expect("request")
}

/// A small Envoy config dump: plaintext STATIC clusters and one route
/// table with every kind of match.
fn routing_dump(eps: &HashMap<&str, SocketAddr>, h2_cluster: SocketAddr) -> ResourceSet {
    use serde_json::json;
    let mut clusters: Vec<serde_json::Value> = eps
        .iter()
        .map(|(name, addr)| common::static_cluster(name, &[*addr], json!({})))
        .collect();
    clusters.push(common::static_cluster(
        "grpcish",
        &[h2_cluster],
        common::http2(),
    ));
    let vhosts = vec![
        json!({"name": "web.test:80", "domains": ["web.test", "web.test:80"], "routes": [
            {"name": "health", "match": {"path": "/health"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
            {"name": "canary-header", "match": {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "yes"}}]}, "route": {"cluster": "canary"}},
            {"name": "api", "match": {"prefix": "/api/"}, "route": {"cluster": "api", "prefix_rewrite": "/", "host_rewrite_literal": "api.internal"},
             "response_headers_to_add": [{"header": {"key": "x-route", "value": "api"}}]},
            {"name": "static", "match": {"safe_regex": {"regex": "/static/[a-z]+\\.png"}}, "route": {"cluster": "static"}},
            {"name": "debug", "match": {"prefix": "/q", "query_parameters": [{"name": "debug", "string_match": {"exact": "1"}}]}, "route": {"cluster": "debug"}},
            {"name": "h2", "match": {"prefix": "/h2"}, "route": {"cluster": "grpcish"}},
            {"name": "missing", "match": {"prefix": "/missing"}, "route": {"cluster": "no-such-cluster"}},
            {"name": "split", "match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "stable", "weight": 75}, {"name": "canary", "weight": 25}]}}}
        ]}),
        json!({"name": "narrow.test:80", "domains": ["narrow.test"], "routes": [
            {"name": "only", "match": {"path": "/only"}, "route": {"cluster": "stable"}}
        ]}),
    ];
    common::dump(
        clusters,
        vhosts,
        json!({"request_headers_to_add": [{"header": {"key": "x-added", "value": "by-route-config"}}]}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_path_header_query_and_weight() {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/web");
    let mut eps = HashMap::new();
    for (i, name) in ["stable", "canary", "api", "static", "debug"]
        .into_iter()
        .enumerate()
    {
        let ip = format!("127.0.0.{}", 20 + i);
        eps.insert(
            name,
            backend(&ip, InboundMode::Disable, certs.clone(), name).await,
        );
    }
    let h2 = backend("127.0.0.30", InboundMode::Disable, certs.clone(), "h2").await;
    let set = routing_dump(&eps, h2);
    let view = Arc::new(StaticView::new(MeshView::build(
        &set,
        HashMap::new(),
        ViewSettings::default(),
    )));
    let client = HttpClient::new(view, MeshConnector::new(certs));

    // Weighted 75/25 over 400 requests.
    let mut split: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let (resp, h) = call(&client, get("http://web.test/anything")).await;
        assert_eq!(resp.status(), 200);
        *split.entry(h["x-served-by"].clone()).or_default() += 1;
        let up = resp
            .extensions()
            .get::<Upstream>()
            .expect("upstream recorded");
        assert_eq!(&*up.route, "split");
    }
    let stable = split.get("stable").copied().unwrap_or(0);
    let canary = split.get("canary").copied().unwrap_or(0);
    assert_eq!(stable + canary, 400, "{split:?}");
    assert!((250..=350).contains(&stable), "75/25 split, got {split:?}");

    // A header match wins over the weighted default.
    for _ in 0..20 {
        let mut req = get("http://web.test/anything");
        req.headers_mut()
            .insert("x-canary", "yes".parse().expect("value"));
        let (_, h) = call(&client, req).await;
        assert_eq!(h["x-served-by"], "canary");
    }
    // Prefix rewrite, host rewrite, route-config request header, route
    // response header.
    let (resp, h) = call(&client, get("http://web.test/api/users?id=7")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(h["x-served-by"], "api");
    assert_eq!(h["x-seen-path"], "/users?id=7");
    assert_eq!(h["x-seen-host"], "api.internal");
    assert_eq!(h["x-seen-added"], "by-route-config");
    assert_eq!(h["x-route"], "api");
    // Regex and query-parameter matches.
    let (_, h) = call(&client, get("http://web.test/static/logo.png")).await;
    assert_eq!(h["x-served-by"], "static");
    let (_, h) = call(&client, get("http://web.test/static/Logo.png")).await;
    assert_ne!(h["x-served-by"], "static", "the regex is case sensitive");
    let (_, h) = call(&client, get("http://web.test/q?debug=1")).await;
    assert_eq!(h["x-served-by"], "debug");
    let (_, h) = call(&client, get("http://web.test/q?debug=0")).await;
    assert_ne!(h["x-served-by"], "debug");
    // A Host header instead of an absolute URI.
    let mut req = http::Request::get("/api/x")
        .body(Body::empty())
        .expect("request");
    req.headers_mut()
        .insert("host", "web.test".parse().expect("host"));
    let (_, h) = call(&client, req).await;
    assert_eq!(h["x-served-by"], "api");
    // An HTTP/2 cluster gets HTTP/2 from an HTTP/1.1 caller.
    let (_, h) = call(&client, get("http://web.test/h2/x")).await;
    assert_eq!(h["x-served-by"], "h2");
    assert_eq!(h["x-seen-version"], "HTTP/2.0");
    // Local answers as Envoy gives them, and the backends never see them.
    let (resp, h) = call(&client, get("http://web.test/health")).await;
    assert_eq!(
        (resp.status().as_u16(), resp.body().as_ref()),
        (200, &b"ok"[..])
    );
    assert!(!h.contains_key("x-served-by"));
    let (resp, _) = call(&client, get("http://narrow.test/other")).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.extensions().get::<LocalReply>().map(|l| l.flags),
        Some("NR")
    );
    let (resp, _) = call(&client, get("http://web.test/missing")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.extensions().get::<LocalReply>().map(|l| l.flags),
        Some("NC")
    );
    // Sequential HTTP/1.1 requests reuse pooled connections.
    assert!(
        client.pooled_connections() <= 6,
        "{} connections",
        client.pooled_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/web");
    let mut eps = HashMap::new();
    for name in ["stable", "canary", "api", "static", "debug"] {
        eps.insert(
            name,
            backend("127.0.0.40", InboundMode::Disable, certs.clone(), name).await,
        );
    }
    let h2 = backend("127.0.0.41", InboundMode::Disable, certs.clone(), "h2").await;
    let set = routing_dump(&eps, h2);
    let view = Arc::new(StaticView::new(MeshView::build(
        &set,
        HashMap::new(),
        ViewSettings::default(),
    )));
    let client = HttpClient::new(view, MeshConnector::new(certs));
    for path in ["/api/stream", "/h2/stream"] {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = http::Request::post(format!("http://web.test{path}"))
            .body(Body::new(body))
            .expect("request");
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .await
            .expect("send");
        // The response (headers and the echoed first chunk) arrives while
        // the request is still open.
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .expect("headers before the request body ended")
            .expect("routed");
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("first chunk echoed before the request ended")
            .expect("a frame")
            .expect("data");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"first ")
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .expect("send");
        drop(tx);
        let rest = Body::new(body).collect_bytes().await.expect("rest");
        assert_eq!(rest, Bytes::from_static(b"second"), "{path}");
    }
}

/// The real dumps' endpoints (10.20.x.x) replaced by loopback backends.
fn relocate(set: &mut ResourceSet, to: &dyn Fn(&str, &str) -> Option<SocketAddr>) {
    for (cluster, cla) in set.endpoints.iter_mut() {
        for locality in &mut cla.endpoints {
            for lb in &mut locality.lb_endpoints {
                let Some(HostIdentifier::Endpoint(ep)) = lb.host_identifier.as_mut() else {
                    continue;
                };
                let Some(AddressKind::SocketAddress(sa)) =
                    ep.address.as_mut().and_then(|a| a.address.as_mut())
                else {
                    continue;
                };
                if let Some(new) = to(cluster, &sa.address) {
                    sa.address = new.ip().to_string();
                    sa.port_specifier = Some(PortSpecifier::PortValue(u32::from(new.port())));
                }
            }
        }
    }
}

fn dump(name: &str) -> ResourceSet {
    let path = format!(
        "{}/../../../shared/data/istio-config-dumps/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    read_config_dump(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
        .expect("dump")
}

/// A TCP echo server on a STRICT mesh listener: answers with the caller's
/// SPIFFE id, then echoes.
async fn tcp_echo(ip: &str, certs: Watch) -> SocketAddr {
    let mut listener = MeshListener::bind(
        format!("{ip}:0").parse().expect("addr"),
        certs,
        InboundConfig::new(InboundMode::Strict, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                let who = conn
                    .peer_id
                    .as_ref()
                    .map_or("-".into(), ToString::to_string);
                let _ = conn.stream.write_all(format!("{who}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.stream.read(&mut buf).await {
                    if n == 0 || conn.stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_switch_over_ads_moves_live_mtls_traffic() {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    // The dumps' echo service runs as demo/default; the caller is catalog.
    let server_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/default");
    let client_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/catalog");
    let mut http_eps = HashMap::new();
    for (i, ip) in [
        "10.20.160.131",
        "10.20.164.172",
        "10.20.166.13",
        "10.20.166.2",
    ]
    .into_iter()
    .enumerate()
    {
        let name: &'static str = ["v0-a", "v1-b", "v1-c", "v1-d"][i];
        let addr = backend(
            &format!("127.0.0.{}", 50 + i),
            InboundMode::Strict,
            server_certs.clone(),
            name,
        )
        .await;
        http_eps.insert(ip.to_string(), addr);
    }
    let tcp = tcp_echo("127.0.0.60", server_certs.clone()).await;
    let place = |cluster: &str, ip: &str| -> Option<SocketAddr> {
        if cluster.starts_with("outbound|12050|") {
            return Some(tcp);
        }
        http_eps.get(ip).copied()
    };
    let mut v0 = dump("config_v0.json");
    relocate(&mut v0, &place);
    let mut v1 = dump("config_v1.json");
    relocate(&mut v1, &place);

    let cache = Arc::new(SnapshotCache::new(&v0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: ca.clone(),
            xds: Some(cache.clone()),
        },
    )
    .expect("control plane");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr()))
        .expect("uri")
        .connect_lazy();
    let mut config = AdsConfig::new(Node {
        id: "test-node-id".into(),
        cluster: "catalog-v1.demo".into(),
        ..Default::default()
    });
    config.view = ViewSettings {
        search_domains: vec![
            "demo.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    };
    let ads = Arc::new(AdsClient::start(channel, config));
    ads.ready(Duration::from_secs(10))
        .await
        .expect("first snapshot");
    let client = HttpClient::new(ads.clone(), MeshConnector::new(client_certs.clone()));

    // v0: one endpoint, mTLS with the SAN xDS expects.
    for _ in 0..10 {
        let (resp, h) = call(&client, get("http://echo.demo/v0")).await;
        assert_eq!(resp.status(), 200, "{h:?}");
        assert_eq!(h["x-served-by"], "v0-a");
        assert_eq!(
            h["x-seen-peer"],
            "spiffe://cluster.local/ns/demo/sa/catalog"
        );
        let up = resp.extensions().get::<Upstream>().expect("upstream");
        assert!(up.mtls);
        assert_eq!(
            up.peer_id.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/default")
        );
        assert_eq!(up.alpn.as_deref(), Some("istio-http/1.1"));
    }
    // TCP through the mesh by VIP: mTLS with Istio's TCP ALPN.
    let tcpc = TcpConnector::new(ads.clone(), MeshConnector::new(client_certs));
    let mut s = tcpc
        .connect("10.10.42.110:12050")
        .await
        .expect("tcp through the mesh");
    assert_eq!(s.upstream().alpn.as_deref(), Some("istio-peer-exchange"));
    let mut line = vec![0u8; "spiffe://cluster.local/ns/demo/sa/catalog\n".len()];
    s.read_exact(&mut line).await.expect("greeting");
    assert_eq!(line, b"spiffe://cluster.local/ns/demo/sa/catalog\n");
    s.write_all(b"ping").await.expect("write");
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.expect("echo");
    assert_eq!(&pong, b"ping");

    // Push v1 while requests flow: traffic moves to the three replicas.
    cache.set(&v1);
    let mut moved = false;
    for _ in 0..100 {
        let (resp, h) = call(&client, get("http://echo.demo/switch")).await;
        assert_eq!(
            resp.status(),
            200,
            "no request fails during the switch: {h:?}"
        );
        if h["x-served-by"] != "v0-a" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "v1 never reached the client");
    let mut split: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let (resp, h) = call(&client, get("http://echo.demo.svc.cluster.local/v1")).await;
        assert_eq!(resp.status(), 200);
        *split.entry(h["x-served-by"].clone()).or_default() += 1;
    }
    assert_eq!(split.get("v0-a"), None, "{split:?}");
    for b in ["v1-b", "v1-c", "v1-d"] {
        let n = split.get(b).copied().unwrap_or(0);
        assert!((10..=30).contains(&n), "round robin over three: {split:?}");
    }
    assert!(
        client.pooled_connections() <= 4,
        "{}",
        client.pooled_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_retried_elsewhere_under_istios_default_policy() {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    let server_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/default");
    let client_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/catalog");
    let live = backend(
        "127.0.0.70",
        InboundMode::Strict,
        server_certs.clone(),
        "live",
    )
    .await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.71:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let place = |_: &str, ip: &str| -> Option<SocketAddr> {
        match ip {
            "10.20.164.172" => Some(live),
            "10.20.166.13" | "10.20.166.2" => Some(dead),
            _ => None,
        }
    };
    let mut v1 = dump("config_v1.json");
    relocate(&mut v1, &place);
    let view = Arc::new(StaticView::new(MeshView::build(
        &v1,
        HashMap::new(),
        ViewSettings {
            search_domains: vec!["demo.svc.cluster.local".into()],
        },
    )));
    let client = HttpClient::new(view, MeshConnector::new(client_certs));
    // The dump's route retries connect failures twice on other hosts: with
    // two of three endpoints dead, every request still succeeds.
    let mut retried = 0;
    for _ in 0..30 {
        let (resp, h) = call(&client, get("http://echo/")).await;
        assert_eq!(resp.status(), 200, "{h:?}");
        assert_eq!(h["x-served-by"], "live");
        let up = resp.extensions().get::<Upstream>().expect("upstream");
        if up.attempts > 1 {
            retried += 1;
        }
        // Istio's virtual hosts ask for `x-envoy-attempt-count`.
        assert_eq!(h["x-seen-attempt"], up.attempts.to_string());
    }
    assert!(retried > 0, "round robin reached the dead endpoints");
}
