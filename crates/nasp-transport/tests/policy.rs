//! Traffic policy from xDS through real sockets (issue 9): fault injection
//! (abort, delay, gRPC abort, header-driven), circuit breakers
//! (`max_requests` → 503 `UO`), outlier detection (consecutive 5xx eject a
//! host for the base ejection time, then it comes back; success rate ejects
//! a flaky host), hashing (ring hash / Maglev keep a user, a generated
//! cookie keeps a session), slow start, retry budgets and streamed-body
//! replays.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::any_certs as certs;
use hyper::body::Incoming;
use nasp_transport::{
    Body, HttpClient, InboundConfig, InboundMode, LocalReply, MeshConnector, MeshListener,
    StaticView, serve_http,
};
use nasp_xds::ResourceSet;
use serde_json::{Value, json};

/// A plaintext backend answering `status` after `delay`, naming itself.
async fn backend(ip: &str, name: &'static str, status: u16, delay: Duration) -> SocketAddr {
    let listener = common::plain_listener(ip).await;
    let addr = listener.local_addr();
    let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(status)
                .header("x-served-by", name)
                .body(Body::from(name))
                .expect("response"),
        )
    });
    tokio::spawn(serve_http(listener, svc));
    addr
}

/// A plaintext backend failing every other request with 503.
async fn flaky_backend(ip: &str, name: &'static str) -> SocketAddr {
    let listener = common::plain_listener(ip).await;
    let addr = listener.local_addr();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
        let n = n.clone();
        async move {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(if k % 2 == 1 { 503 } else { 200 })
                    .header("x-served-by", name)
                    .body(Body::from(name))
                    .expect("response"),
            )
        }
    });
    tokio::spawn(serve_http(listener, svc));
    addr
}

/// One cluster `c` with `endpoints` and `extra` cluster fields, one route
/// `/` to it with `route_extra` fields on the route (`action` fields go
/// into the route action).
fn client(endpoints: &[SocketAddr], extra: Value, route_extra: Value) -> HttpClient {
    common::client(&config(endpoints, extra, route_extra), certs())
}

/// The resource set [`client`] serves.
fn config(endpoints: &[SocketAddr], extra: Value, route_extra: Value) -> ResourceSet {
    let mut route = json!({"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}});
    if let (Some(r), Some(e)) = (route.as_object_mut(), route_extra.as_object()) {
        for (k, v) in e {
            if k == "action" {
                if let (Some(a), Some(extra)) = (
                    r.get_mut("route").and_then(Value::as_object_mut),
                    v.as_object(),
                ) {
                    a.extend(extra.clone());
                }
            } else {
                r.insert(k.clone(), v.clone());
            }
        }
    }
    common::dump(
        vec![common::static_cluster("c", endpoints, extra)],
        vec![json!({"name": "svc.test:80", "domains": ["svc.test"], "routes": [route]})],
        json!({}),
    )
}

async fn get(client: &HttpClient, headers: &[(&str, &str)]) -> (u16, String, Option<&'static str>) {
    let mut req = http::Request::get("http://svc.test/")
        .body(Body::empty())
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let resp = client.request(req).await.expect("routed");
    let status = resp.status().as_u16();
    let flags = resp.extensions().get::<LocalReply>().map(|l| l.flags);
    let by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let _ = resp.into_body().collect_bytes().await;
    (status, by, flags)
}

fn fault(f: Value) -> Value {
    json!({"typed_per_filter_config": {"envoy.filters.http.fault": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault", "abort": f["abort"], "delay": f["delay"]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_their_share_of_requests() {
    let ok = backend("127.0.0.90", "ok", 200, Duration::ZERO).await;
    // Abort every request with 418: the backend is never reached.
    let c = client(
        &[ok],
        json!({}),
        fault(
            json!({"abort": {"http_status": 418, "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}),
        ),
    );
    for _ in 0..5 {
        assert_eq!(get(&c, &[]).await, (418, "-".into(), Some("FI")));
    }
    // Abort half of them.
    let c = client(
        &[ok],
        json!({}),
        fault(
            json!({"abort": {"http_status": 503, "percentage": {"numerator": 50, "denominator": "HUNDRED"}}}),
        ),
    );
    let mut aborted = 0;
    for _ in 0..200 {
        if get(&c, &[]).await.2 == Some("FI") {
            aborted += 1;
        }
    }
    assert!((60..=140).contains(&aborted), "50 % aborted: {aborted}/200");
    // gRPC abort: a trailers-only answer with the gRPC status.
    let c = client(
        &[ok],
        json!({}),
        fault(
            json!({"abort": {"grpc_status": 14, "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}),
        ),
    );
    let resp = c
        .request(
            http::Request::post("http://svc.test/pkg.Svc/M")
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("routed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..])
    );
    // A fixed delay for every request.
    let c = client(
        &[ok],
        json!({}),
        fault(
            json!({"delay": {"fixed_delay": "0.3s", "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}),
        ),
    );
    let t = Instant::now();
    assert_eq!(get(&c, &[]).await.0, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_overflow_is_answered_503_uo() {
    let slow = backend("127.0.0.91", "slow", 200, Duration::from_millis(400)).await;
    let c = client(
        &[slow],
        json!({"circuit_breakers": {"thresholds": [{"max_requests": 2, "max_pending_requests": 100, "max_connections": 100, "max_retries": 3}]}}),
        json!({}),
    );
    let mut calls = Vec::new();
    for _ in 0..6 {
        let c = c.clone();
        calls.push(tokio::spawn(async move { get(&c, &[]).await }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for call in calls {
        match call.await.expect("join") {
            (200, _, None) => ok += 1,
            (503, _, Some("UO")) => overflow += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, overflow), (2, 4), "two in flight at most");
    // Once they are done, requests flow again.
    assert_eq!(get(&c, &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_a_host_until_its_time_is_up() {
    let good = backend("127.0.0.92", "good", 200, Duration::ZERO).await;
    let bad = backend("127.0.0.93", "bad", 503, Duration::ZERO).await;
    let c = client(
        &[good, bad],
        json!({"outlier_detection": {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "1s", "max_ejection_percent": 50}}),
        json!({}),
    );
    // Round robin reaches the bad host until it has failed three times in
    // a row; then it is ejected and only the good host answers.
    let mut bad_seen = 0;
    for _ in 0..10 {
        let (status, by, _) = get(&c, &[]).await;
        if by == "bad" {
            assert_eq!(status, 503);
            bad_seen += 1;
        }
    }
    assert_eq!(bad_seen, 3, "ejected after 3 consecutive 5xx");
    for _ in 0..20 {
        assert_eq!(get(&c, &[]).await.1, "good");
    }
    // After the ejection time the host is back (and fails again).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut back = false;
    for _ in 0..4 {
        back |= get(&c, &[]).await.1 == "bad";
    }
    assert!(back, "the host came back after base_ejection_time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_keep_a_user_on_one_backend() {
    let a = backend("127.0.0.94", "a", 200, Duration::ZERO).await;
    let b = backend("127.0.0.95", "b", 200, Duration::ZERO).await;
    let c3 = backend("127.0.0.96", "c", 200, Duration::ZERO).await;
    for policy in ["RING_HASH", "MAGLEV"] {
        let c = client(
            &[a, b, c3],
            json!({"lb_policy": policy}),
            json!({"action": {"hash_policy": [{"header": {"header_name": "x-user"}}]}}),
        );
        let mut owners: HashMap<String, String> = HashMap::new();
        let mut used = std::collections::HashSet::new();
        for round in 0..3 {
            // 29 users: round robin would shift them between rounds.
            for u in 0..29 {
                let user = format!("user-{u}");
                let (status, by, _) = get(&c, &[("x-user", &user)]).await;
                assert_eq!(status, 200);
                used.insert(by.clone());
                if round == 0 {
                    owners.insert(user, by);
                } else {
                    assert_eq!(owners[&user], by, "{policy}: {user} moved");
                }
            }
        }
        assert_eq!(used.len(), 3, "{policy}: users spread over every backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_outlier_detection_ejects_the_flaky_backend() {
    let mut eps = Vec::new();
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        eps.push(backend(&format!("127.0.0.{}", 110 + i), name, 200, Duration::ZERO).await);
    }
    eps.push(flaky_backend("127.0.0.114", "flaky").await);
    // Success rate only (consecutive 5xx off): 5 hosts with 20 requests
    // each in the 1 s interval.
    let c = client(
        &eps,
        json!({"outlier_detection": {"consecutive_5xx": 0, "interval": "1s", "base_ejection_time": "30s",
            "enforcing_success_rate": 100, "success_rate_request_volume": 20, "success_rate_minimum_hosts": 5,
            "max_ejection_percent": 50}}),
        json!({}),
    );
    // Round robin sends every fifth request to the flaky host until a
    // sweep finds it far below the mean; from then on it gets none.
    let started = Instant::now();
    let (mut failures, mut since_flaky) = (0, 0);
    while since_flaky < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flaky host was never ejected ({failures} failures)"
        );
        let (status, by, _) = get(&c, &[]).await;
        if by == "flaky" {
            since_flaky = 0;
            failures += usize::from(status == 503);
        } else {
            assert_eq!(status, 200, "{by}");
            since_flaky += 1;
        }
    }
    assert!(
        failures >= 10,
        "ejected only after 20 requests: {failures} failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_gives_a_new_backend_a_growing_share() {
    let old = backend("127.0.0.115", "old", 200, Duration::ZERO).await;
    let new = backend("127.0.0.116", "new", 200, Duration::ZERO).await;
    // Aggression 0.25: the ramp is (age / window)^4, so the new endpoint
    // stays at the 10 % minimum for the first half of its 2 s.
    let cluster = json!({"round_robin_lb_config": {"slow_start_config": {"slow_start_window": "2s",
        "aggression": {"default_value": 0.25, "runtime_key": "a"}}}});
    let view = std::sync::Arc::new(StaticView::new(common::view(&config(
        &[old],
        cluster.clone(),
        json!({}),
    ))));
    let c = HttpClient::new(view.clone(), MeshConnector::new(certs()));
    assert_eq!(get(&c, &[]).await.1, "old");
    // The old endpoint is past its window when the new one joins.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    view.set(common::view(&config(&[old, new], cluster, json!({}))));
    let share = |by: &[String]| by.iter().filter(|b| *b == "new").count() as f64 / by.len() as f64;
    let mut early = Vec::new();
    let t = Instant::now();
    while early.len() < 300 && t.elapsed() < Duration::from_millis(800) {
        early.push(get(&c, &[]).await.1);
    }
    // Its share is the 10 % minimum (0.1 / 1.1 of the traffic) for its
    // first second, where plain round robin gives it half at once.
    assert!(early.len() >= 30, "only {} requests in 800 ms", early.len());
    let early_share = share(&early);
    assert!(
        early_share > 0.0 && early_share < 0.2,
        "early share {early_share}"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut later = Vec::new();
    for _ in 0..100 {
        later.push(get(&c, &[]).await.1);
    }
    let later_share = share(&later);
    assert!(
        (later_share - 0.5).abs() <= 0.05,
        "after the window: {later_share}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_cookie_keeps_a_session_on_one_backend() {
    let eps = [
        backend("127.0.0.117", "a", 200, Duration::ZERO).await,
        backend("127.0.0.118", "b", 200, Duration::ZERO).await,
        backend("127.0.0.119", "c", 200, Duration::ZERO).await,
    ];
    let c = client(
        &eps,
        json!({"lb_policy": "RING_HASH"}),
        json!({"action": {"hash_policy": [{"cookie": {"name": "session", "ttl": "60s", "path": "/"}}]}}),
    );
    let mut used = std::collections::HashSet::new();
    for _ in 0..12 {
        // No cookie: one is generated, and the answer carries it.
        let resp = c
            .request(
                http::Request::get("http://svc.test/")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("routed");
        let first = resp.headers()["x-served-by"]
            .to_str()
            .expect("name")
            .to_string();
        let cookie = resp.headers()[http::header::SET_COOKIE]
            .to_str()
            .expect("cookie")
            .to_string();
        let (pair, attrs) = cookie.split_once("; ").expect("attributes");
        assert_eq!(attrs, "Max-Age=60; Path=/; HttpOnly", "{cookie}");
        let value = pair.strip_prefix("session=").expect("name");
        assert!(value.starts_with('"') && value.len() == 18, "{cookie}");
        used.insert(first.clone());
        // Sent back as a browser would (quotes kept): the same backend,
        // and no new cookie.
        for _ in 0..5 {
            let mut req = http::Request::get("http://svc.test/")
                .body(Body::empty())
                .expect("request");
            req.headers_mut().insert(
                http::header::COOKIE,
                format!("other=1; {pair}").parse().expect("cookie"),
            );
            let resp = c.request(req).await.expect("routed");
            assert!(resp.headers().get(http::header::SET_COOKIE).is_none());
            assert_eq!(resp.headers()["x-served-by"], first.as_str());
        }
    }
    assert!(
        used.len() >= 2,
        "sessions spread over the backends: {used:?}"
    );
}

/// A backend that records the authority and body of each request it gets,
/// answering `status` after `delay`.
async fn recorder(
    ip: &str,
    status: u16,
    delay: Duration,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    let listener = common::plain_listener(ip).await;
    let addr = listener.local_addr();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let log = log.clone();
        async move {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            tokio::time::sleep(delay).await;
            log.lock().expect("log").push((host, body));
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(status)
                    .body(Body::from("recorded"))
                    .expect("response"),
            )
        }
    });
    tokio::spawn(serve_http(listener, svc));
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_a_shadow_copy_whose_answer_never_reaches_the_caller() {
    let (main, main_seen) = recorder("127.0.0.128", 200, Duration::ZERO).await;
    // The shadow is slow and failing: the caller must see neither.
    let (shadow, shadow_seen) = recorder("127.0.0.129", 500, Duration::from_millis(300)).await;
    let mirror = |numerator: u32| {
        let route = json!({"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c",
            "request_mirror_policies": [{"cluster": "m", "runtime_fraction": {"default_value": {"numerator": numerator}}}]}});
        common::client(
            &common::dump(
                vec![
                    common::static_cluster("c", &[main], json!({})),
                    common::static_cluster("m", &[shadow], json!({})),
                ],
                vec![
                    json!({"name": "svc.test:80", "domains": ["svc.test", "svc.test:80"], "routes": [route]}),
                ],
                json!({}),
            ),
            certs(),
        )
    };
    let c = mirror(100);
    let started = Instant::now();
    for i in 0..10 {
        let uri = if i % 2 == 0 {
            "http://svc.test/"
        } else {
            "http://svc.test:80/"
        };
        let req = http::Request::post(uri)
            .body(Body::from(format!("body-{i}")))
            .expect("request");
        let resp = c.request(req).await.expect("routed");
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect_bytes().await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "callers waited for the slow shadow: {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while shadow_seen.lock().expect("log").len() < 10 {
        assert!(
            Instant::now() < deadline,
            "the shadow copies never all arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut shadowed = shadow_seen.lock().expect("log").clone();
    shadowed.sort();
    let mut want: Vec<(String, String)> = (0..10)
        .map(|i| {
            let host = if i % 2 == 0 {
                "svc.test-shadow"
            } else {
                "svc.test-shadow:80"
            };
            (host.to_string(), format!("body-{i}"))
        })
        .collect();
    want.sort();
    assert_eq!(shadowed, want, "Envoy's shadow authority and the same body");
    assert_eq!(main_seen.lock().expect("log").len(), 10);
    // A 0 % mirror sends nothing.
    let c = mirror(0);
    for _ in 0..10 {
        assert_eq!(get(&c, &[]).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(shadow_seen.lock().expect("log").len(), 10);
}

/// A backend that reads each request and resets the connection (RST)
/// without answering.
async fn resetter(ip: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                // Linger 0: close sends RST, not FIN.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_retried_under_5xx_and_reset_but_not_under_status_codes_alone() {
    let reset = resetter("127.0.0.130").await;
    let good = backend("127.0.0.131", "good", 200, Duration::ZERO).await;
    let retry = |on: &str| {
        json!({"action": {"retry_policy": {"retry_on": on, "num_retries": 2, "retriable_status_codes": [503],
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}]}}})
    };
    // Envoy counts a reset as a 5xx (and a gateway error): retried on the
    // other host, every caller served.
    for on in ["5xx", "gateway-error", "reset"] {
        let c = client(&[reset, good], json!({}), retry(on));
        for _ in 0..10 {
            assert_eq!(get(&c, &[]).await, (200, "good".into(), None), "{on}");
        }
    }
    // Istio's status-code condition alone does not retry a reset: the
    // requests round robin sends to the resetting host fail, 503 `UR`.
    let c = client(&[reset, good], json!({}), retry("retriable-status-codes"));
    let mut failed = 0;
    for _ in 0..10 {
        match get(&c, &[]).await {
            (200, by, None) => assert_eq!(by, "good"),
            (503, _, Some("UR")) => failed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(failed, 5, "every other request reached the resetting host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_is_retried_only_under_5xx_gateway_error_or_reset() {
    let slow = backend("127.0.0.132", "slow", 200, Duration::from_secs(2)).await;
    let fast = backend("127.0.0.133", "fast", 200, Duration::ZERO).await;
    let retry = |on: &str| {
        json!({"action": {"timeout": "5s", "retry_policy": {"retry_on": on, "num_retries": 2, "per_try_timeout": "0.2s",
            "retriable_status_codes": [503],
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}]}}})
    };
    let c = client(&[slow, fast], json!({}), retry("5xx"));
    for _ in 0..4 {
        assert_eq!(get(&c, &[]).await, (200, "fast".into(), None));
    }
    // Istio's default conditions: a timed-out try is answered 504 `UT`.
    let c = client(
        &[slow, fast],
        json!({}),
        retry("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"),
    );
    let mut timed_out = 0;
    for _ in 0..4 {
        let t = Instant::now();
        match get(&c, &[]).await {
            (200, by, None) => assert_eq!(by, "fast"),
            (504, _, Some("UT")) => {
                timed_out += 1;
                assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(timed_out, 2, "the slow host's tries time out, not retried");
}

/// Counts of the backends that answered `n` requests.
async fn spread(c: &HttpClient, n: usize) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for _ in 0..n {
        let (status, name, _) = get(c, &[]).await;
        assert_eq!(status, 200, "{name}");
        *by.entry(name).or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_localities_and_priorities_share_traffic_over_real_endpoints() {
    let a = backend("127.0.0.124", "a", 200, Duration::ZERO).await;
    let b = backend("127.0.0.125", "b", 200, Duration::ZERO).await;
    let c = backend("127.0.0.126", "c", 200, Duration::ZERO).await;
    let d = backend("127.0.0.127", "d", 200, Duration::ZERO).await;
    let ep = |addr: SocketAddr, weight: u32, health: &str| {
        json!({"endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}},
            "load_balancing_weight": weight, "health_status": health})
    };
    // Priority 0: zone a (a weight 2, b weight 1) and zone b (c), each
    // locality of weight 1; priority 1: d. Panic mode off, as Istio with
    // outlier detection.
    let cluster = |locality_weighted: bool, health: [&str; 3]| {
        let mut v = json!({"common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            "load_assignment": {"cluster_name": "c", "endpoints": [
            {"locality": {"zone": "a"}, "load_balancing_weight": 1, "lb_endpoints": [ep(a, 2, health[0]), ep(b, 1, health[1])]},
            {"locality": {"zone": "b"}, "load_balancing_weight": 1, "lb_endpoints": [ep(c, 1, health[2])]},
            {"locality": {"zone": "c"}, "load_balancing_weight": 1, "priority": 1, "lb_endpoints": [ep(d, 1, "HEALTHY")]}]}});
        if locality_weighted {
            v["common_lb_config"]["locality_weighted_lb_config"] = json!({});
        }
        v
    };
    let healthy = ["HEALTHY"; 3];
    let near = |got: usize, want: f64, n: usize| {
        let want = want * n as f64;
        (got as f64 - want).abs() <= 4.0 * want.sqrt().max(3.0)
    };
    let n = 600;
    // Endpoint weights alone: 2 : 1 : 1 (round robin is exact), d idle.
    let by = spread(&client(&[], cluster(false, healthy), json!({})), n).await;
    assert_eq!(
        (by.get("a"), by.get("b"), by.get("c"), by.get("d")),
        (Some(&300), Some(&150), Some(&150), None),
        "{by:?}"
    );
    // Locality weighting: half to each zone, then by weight within zone a.
    let by = spread(&client(&[], cluster(true, healthy), json!({})), n).await;
    let count = |k: &str| by.get(k).copied().unwrap_or(0);
    assert!(
        near(count("a"), 1.0 / 3.0, n)
            && near(count("b"), 1.0 / 6.0, n)
            && near(count("c"), 0.5, n),
        "{by:?}"
    );
    assert_eq!(count("d"), 0);
    // One of three unhealthy: priority 0 keeps 1.4 × 2/3 ≈ 93 % (Envoy's
    // overprovisioning factor), the rest spills to priority 1.
    let by = spread(
        &client(
            &[],
            cluster(false, ["HEALTHY", "HEALTHY", "UNHEALTHY"]),
            json!({}),
        ),
        1000,
    )
    .await;
    let count = |k: &str| by.get(k).copied().unwrap_or(0);
    assert_eq!(count("c"), 0, "{by:?}");
    assert!(near(count("d"), 0.0667, 1000), "{by:?}");
    assert!(near(count("a"), 0.9333 * 2.0 / 3.0, 1000), "{by:?}");
    // Nothing healthy at priority 0: all of it to priority 1.
    let by = spread(
        &client(&[], cluster(false, ["UNHEALTHY"; 3]), json!({})),
        100,
    )
    .await;
    assert_eq!(by.get("d"), Some(&100), "{by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_limits_retries_to_its_share_of_active_requests() {
    let live = backend("127.0.0.97", "live", 200, Duration::ZERO).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.98:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let retry = json!({"action": {"retry_policy": {"retry_on": "connect-failure", "num_retries": 2,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}});
    let budget = |percent: f64, min: u32| {
        json!({"circuit_breakers": {"thresholds": [{"max_retries": 1000,
            "retry_budget": {"budget_percent": {"value": percent}, "min_retry_concurrency": min}}]}})
    };
    // A budget of nothing: a request that meets the dead host first is not
    // retried (about half of them, by round robin).
    let c = client(&[live, dead], budget(0.0, 0), retry.clone());
    let mut failed = 0;
    for _ in 0..20 {
        if get(&c, &[]).await.0 != 200 {
            failed += 1;
        }
    }
    assert!(
        (5..=15).contains(&failed),
        "no budget, no retries: {failed}/20 failed"
    );
    // A budget with room: every request succeeds.
    let c = client(&[live, dead], budget(20.0, 3), retry);
    for _ in 0..20 {
        assert_eq!(get(&c, &[]).await.0, 200);
    }
}

/// A body of unknown length (as tonic's), in two frames.
fn streamed(parts: [&'static str; 2]) -> Body {
    let frames = parts.into_iter().map(|p| {
        Ok::<_, Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            p.as_bytes(),
        )))
    });
    Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_replayed_on_a_retry_and_grpc_gets_grpc_local_replies() {
    // An echo of the body it got, and a replica that always answers 503.
    let listener = MeshListener::bind(
        "127.0.0.99:0".parse().expect("addr"),
        certs(),
        InboundConfig::new(InboundMode::Disable, "cluster.local"),
    )
    .await
    .expect("listen");
    let echo = listener.local_addr();
    let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("x-served-by", "echo")
                .body(Body::from(body))
                .expect("response"),
        )
    });
    tokio::spawn(serve_http(listener, svc));
    let bad = backend("127.0.0.89", "bad", 503, Duration::ZERO).await;
    let retry = json!({"action": {"retry_policy": {"retry_on": "retriable-status-codes", "num_retries": 2,
        "retriable_status_codes": [503],
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}});
    let c = client(&[bad, echo], json!({}), retry);
    // Whichever replica a request meets first, the body arrives whole.
    for _ in 0..6 {
        let req = http::Request::post("http://svc.test/")
            .body(streamed(["hello ", "world"]))
            .expect("request");
        let resp = c.request(req).await.expect("routed");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect_bytes().await.expect("body");
        assert_eq!(&body[..], b"hello world");
    }
    // A gRPC call that cannot be served gets a trailers-only answer with
    // UNAVAILABLE, as Envoy's local replies to gRPC.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.88:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let c = client(&[dead], json!({}), json!({}));
    let resp = c
        .request(
            http::Request::post("http://svc.test/pkg.Svc/M")
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("routed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..])
    );
    assert!(resp.headers().get("grpc-message").is_some());
    assert_eq!(
        resp.extensions().get::<LocalReply>().map(|l| l.flags),
        Some("UF")
    );
}
