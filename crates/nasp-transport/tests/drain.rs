//! A replica that shuts down under load fails no request: its server
//! drains (the port closes, accepted connections are served, HTTP/1.1
//! answers say `connection: close` for a grace, then GOAWAY / close) and
//! the client's retries (Istio's default policy) and its stale keep-alive
//! retry take the rest to the other replica. HTTP/1.1 and HTTP/2, 8
//! concurrent callers.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::any_certs as certs;
use hyper::body::Incoming;
use nasp_transport::{Body, HttpClient, serve_http_until};
use serde_json::json;

/// A replica that serves until `stop` fires, then drains.
async fn replica(
    ip: &str,
    name: &'static str,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    let listener = common::plain_listener(ip).await;
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
    // Istio's default retry policy.
    let retry = json!({"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2, "retriable_status_codes": [503],
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5"});
    let vhost = |name: &str, c: &str| json!({"name": name, "domains": [name], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": c, "retry_policy": retry.clone()}}]});
    // Istio's circuit breakers (Envoy's default allows 3 retries in flight,
    // which 8 callers overflow).
    let mut h2 = common::istio_circuit_breakers();
    if let (Some(a), Some(b)) = (h2.as_object_mut(), common::http2().as_object()) {
        a.extend(b.clone());
    }
    let set = common::dump(
        vec![
            common::static_cluster("h1", eps, common::istio_circuit_breakers()),
            common::static_cluster("h2", eps, h2),
        ],
        vec![vhost("h1.test", "h1"), vhost("h2.test", "h2")],
        json!({}),
    );
    common::client(&set, certs())
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
