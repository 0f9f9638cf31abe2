//! Certificate rotation under load: both sides rotate their workload
//! certificates every 150 ms while 8 concurrent callers send requests over
//! pooled HTTP/1.1 and HTTP/2 mTLS. No request fails, the pools do not
//! reconnect per rotation, and a connection opened after a rotation
//! presents the new certificate.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::issue;
use nasp_controlplane::CertificateAuthority;
use nasp_transport::outbound::ALPN_H2;
use nasp_transport::{
    Body, HttpClient, InboundConfig, InboundMode, MeshConnector, MeshListener, StaticView,
    serve_http,
};
use nasp_xds::MeshView;
use tokio::sync::watch;

const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// One mTLS cluster per protocol, both to `addr`.
fn view(addr: SocketAddr) -> MeshView {
    use serde_json::json;
    let tls = json!({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default"}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": SERVER}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA"}}},
        "sni": "outbound_.80_._.server.demo.svc.cluster.local"}}});
    let mut h2 = tls.clone();
    if let (Some(a), Some(b)) = (h2.as_object_mut(), common::http2().as_object()) {
        a.extend(b.clone());
    }
    let vhost = |name: &str, cluster: &str| json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]});
    common::view(&common::dump(
        vec![
            common::static_cluster("h1", &[addr], tls),
            common::static_cluster("h2", &[addr], h2),
        ],
        vec![vhost("h1.test", "h1"), vhost("h2.test", "h2")],
        json!({}),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").expect("ca"));
    let (server_tx, server_rx) = watch::channel(Some(issue(&ca, SERVER)));
    let (client_tx, client_rx) = watch::channel(Some(issue(&ca, CLIENT)));
    let listener = MeshListener::bind(
        "127.0.0.80:0".parse().expect("addr"),
        server_rx.clone(),
        InboundConfig::new(InboundMode::Strict, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
    });
    tokio::spawn(serve_http(listener, svc));
    let client = HttpClient::new(
        Arc::new(StaticView::new(view(addr))),
        MeshConnector::new(client_rx),
    );

    // Rotate both sides every 150 ms for the whole run.
    let rotations = {
        let ca = ca.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let (s, c) = (issue(&ca, SERVER), issue(&ca, CLIENT));
                let _ = server_tx.send(Some(s));
                let _ = client_tx.send(Some(c));
                n += 1;
            }
            (n, server_tx)
        })
    };
    let mut callers = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        let host = if i % 2 == 0 { "h1.test" } else { "h2.test" };
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                let req = http::Request::get(format!("http://{host}/"))
                    .body(Body::empty())
                    .expect("request");
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect_bytes().await;
                        ok += 1;
                    }
                    Ok(r) => failed.push(format!("{}", r.status())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let mut total = 0;
    for c in callers {
        let (ok, failed) = c.await.expect("join");
        assert!(
            failed.is_empty(),
            "requests failed during rotation: {failed:?}"
        );
        total += ok;
    }
    let (rotations, server_tx) = rotations.await.expect("join");
    assert!(rotations >= 10, "only {rotations} rotations");
    assert!(total > 100, "only {total} requests");
    // Pools kept their connections across rotations: far fewer than one
    // per rotation.
    assert!(
        client.pooled_connections() <= 10,
        "{} pooled connections after {rotations} rotations",
        client.pooled_connections()
    );

    // A connection opened now presents the newest server certificate.
    let newest = server_tx.borrow().clone().expect("cert");
    let (_, client_rx) = watch::channel(Some(issue(&ca, CLIENT)));
    let tls = MeshConnector::new(client_rx)
        .connect(
            addr,
            "outbound_.80_._.server.demo.svc.cluster.local",
            &[SERVER.to_string()],
            ALPN_H2,
        )
        .await
        .expect("handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    assert_eq!(
        presented,
        newest.chain()[0],
        "the rotated certificate is served"
    );
}
