//! DestinationRule and VirtualService settings written in the mesh file,
//! served by the embedded control plane over ADS to a `nasp::Mesh`
//! frontend, change what happens to real requests on loopback sockets as
//! they would through an Istio sidecar: consistent hashing keeps a user on
//! one replica, least request avoids a slow one, faults abort and delay
//! their share, outliers are ejected, circuit breakers overflow with `UO`,
//! retries reach a healthy replica, headers are changed, route timeouts
//! answer 504 `UT`, a warmup ramps a new replica up, a generated hash
//! cookie keeps a session on one replica, a mirror gets shadow copies, and
//! a pushed change moves live traffic without dropping requests in flight.
//!
//! Backends are plain HTTP/1.1 servers (`istio: false` endpoints, `mtls:
//! disable`) that the test tells to answer a status, stall, and that report
//! the request headers they saw. Addresses 127.0.5.x / 127.0.6.x, one
//! network per test.

mod common;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::transport::{Body, LocalReply};
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClient, MeshHttpClientExt as _};

/// A backend replica the test controls.
struct Backend {
    name: String,
    addr: SocketAddr,
    /// The status it answers.
    status: AtomicU16,
    /// How long it stalls before answering (ms).
    delay_ms: AtomicU64,
    /// Requests it has received.
    hits: AtomicUsize,
    /// Requests it is stalling on now.
    stalled: AtomicUsize,
}

impl Backend {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts a backend on `ip`. It answers `x-served-by: <name>`, stalls for
/// `x-delay-ms` (or its own delay), sets `x-internal` and `x-resp`, and
/// lists the request headers it saw in the body, one `name: value` a line.
async fn backend(ip: &str, name: &str, status: u16) -> Arc<Backend> {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind backend");
    let b = Arc::new(Backend {
        name: name.to_string(),
        addr: listener.local_addr().expect("addr"),
        status: AtomicU16::new(status),
        delay_ms: AtomicU64::new(0),
        hits: AtomicUsize::new(0),
        stalled: AtomicUsize::new(0),
    });
    let shared = b.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let b = shared.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let b = b.clone();
                    async move {
                        b.hits.fetch_add(1, Ordering::SeqCst);
                        let delay = req
                            .headers()
                            .get("x-delay-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_else(|| b.delay_ms.load(Ordering::SeqCst));
                        if delay > 0 {
                            b.stalled.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            b.stalled.fetch_sub(1, Ordering::SeqCst);
                        }
                        let mut seen: Vec<String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                            .collect();
                        seen.sort();
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(b.status.load(Ordering::SeqCst))
                                .header("x-served-by", b.name.as_str())
                                .header("x-internal", "secret")
                                .header("x-resp", "backend")
                                .body(Body::from(seen.join("\n")))
                                .expect("response"),
                        )
                    }
                });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    b
}

/// A mesh with one service `svc.demo` (port 8080, plaintext) over
/// `backends` (each labelled `version: <its name's first two letters>`),
/// subsets v1/v2 and the YAML `extra` appended to the service (its
/// `traffic_policy` and `routes`, indented four spaces).
fn mesh(backends: &[&Arc<Backend>], extra: &str) -> MeshFile {
    let mut text = String::from(
        "services:\n  - name: svc\n    namespace: demo\n    mtls: disable\n    ports: [{port: 8080, protocol: http}]\n    subsets:\n      - {name: v1, labels: {version: v1}}\n      - {name: v2, labels: {version: v2}}\n    endpoints:\n",
    );
    for b in backends {
        text.push_str(&format!(
            "      - {{ip: {}, port: {}, istio: false, labels: {{version: {}}}}}\n",
            b.addr.ip(),
            b.addr.port(),
            &b.name[..2]
        ));
    }
    text.push_str(extra);
    MeshFile::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The frontend: a workload of the mesh with the control plane as its
/// istiod.
async fn frontend(cp: &ControlPlane) -> Mesh {
    Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: "frontend-0".into(),
            namespace: "demo".into(),
            service_account: "frontend".into(),
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .ready_timeout(Duration::from_secs(20))
        .build()
        .await
        .expect("joined the mesh")
}

/// What a caller sees of one answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    by: String,
    flags: Option<&'static str>,
    headers: http::HeaderMap,
    body: String,
}

async fn call(client: &MeshHttpClient, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::get(format!("http://svc.demo:8080{path}"))
        .body(Body::empty())
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let resp = client.send(req).await.expect("sent");
    let status = resp.status().as_u16();
    let flags = resp.extensions().get::<LocalReply>().map(|l| l.flags);
    let headers = resp.headers().clone();
    let by = headers
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = resp
        .into_body()
        .collect_bytes()
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Answer {
        status,
        by,
        flags,
        headers,
        body,
    }
}

/// Waits (bounded) until the frontend's view satisfies `ready`: a push
/// has arrived.
async fn until_view(mesh: &Mesh, what: &str, ready: impl Fn(&nasp::xds::MeshView) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(&mesh.view()) {
        assert!(Instant::now() < deadline, "the push never arrived: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CLUSTER: &str = "outbound|8080||svc.demo.svc.cluster.local";

fn lb_policy(view: &nasp::xds::MeshView) -> String {
    view.cluster(CLUSTER)
        .map(|c| c.lb_policy.clone())
        .unwrap_or_default()
}

/// How a user's request carries its key: the path and headers to send.
type UserRequest = fn(&str) -> (String, Vec<(String, String)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_user_on_one_replica() {
    let a = backend("127.0.5.2", "v1-a", 200).await;
    let b = backend("127.0.5.3", "v1-b", 200).await;
    let c = backend("127.0.5.4", "v1-c", 200).await;
    let all = [&a, &b, &c];
    // Round robin first: the control that users move.
    let cp = common::control_plane("127.0.5.1", &mesh(&all, "")).await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut first = HashMap::new();
    let mut moved = false;
    for round in 0..2 {
        for u in 0..29 {
            let user = format!("user-{u}");
            let by = call(&client, "/", &[("x-user", &user)]).await.by;
            if round == 0 {
                first.insert(user, by);
            } else {
                moved |= first[&user] != by;
            }
        }
    }
    assert!(moved, "round robin moves users between rounds");

    // Each hash key istiod writes on the route, on ring hash and Maglev.
    let keys: [(&str, UserRequest); 3] = [
        ("{http_header_name: x-user}", |u| {
            ("/".into(), vec![("x-user".into(), u.into())])
        }),
        ("{http_cookie: {name: session, ttl: 0s}}", |u| {
            (
                "/".into(),
                vec![("cookie".into(), format!("theme=dark; session={u}"))],
            )
        }),
        ("{http_query_parameter_name: user}", |u| {
            (format!("/cart?x=1&user={u}"), vec![])
        }),
    ];
    for (key, request) in keys {
        for algorithm in ["ring_hash: {minimum_ring_size: 1024}", "maglev: {}"] {
            let policy = format!(
                "    traffic_policy: {{load_balancer: {{consistent_hash: {{{}, {algorithm}}}}}}}\n",
                &key[1..key.len() - 1]
            );
            cp.set_mesh(&mesh(&all, &policy)).expect("push");
            let want = if algorithm.starts_with("ring") {
                "RING_HASH"
            } else {
                "MAGLEV"
            };
            until_view(&fe, want, |v| {
                lb_policy(v) == want
                    && v.outbound("svc.demo", 8080)
                        .and_then(|o| o.http().map(|h| h.virtual_host.routes.clone()))
                        .is_some_and(|r| match &r[0].action {
                            nasp::xds::route::RouteAction::Forward(f) => {
                                format!("{:?}", f.hash_policy).contains(match key {
                                    k if k.contains("header") => "Header",
                                    k if k.contains("cookie") => "Cookie",
                                    _ => "QueryParameter",
                                })
                            }
                            _ => false,
                        })
            })
            .await;
            let mut owners: HashMap<String, String> = HashMap::new();
            let mut used = HashSet::new();
            for round in 0..3 {
                for u in 0..29 {
                    let user = format!("user-{u}");
                    let (path, headers) = request(&user);
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let ans = call(&client, &path, &headers).await;
                    assert_eq!(ans.status, 200);
                    used.insert(ans.by.clone());
                    if round == 0 {
                        owners.insert(user, ans.by);
                    } else {
                        assert_eq!(owners[&user], ans.by, "{key} {want}: {user} moved");
                    }
                }
            }
            assert_eq!(used.len(), 3, "{key} {want}: users spread over replicas");
        }
    }
}

// Envoy hashes the downstream address (for a sidecar: the workload's own
// IP), so one caller stays on one host; nasp's client has no source-IP
// input yet (`request_hash` gives no hash, so each pick is random).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_the_source_ip_keeps_a_caller_on_one_replica() {
    let a = backend("127.0.5.12", "v1-a", 200).await;
    let b = backend("127.0.5.13", "v1-b", 200).await;
    let c = backend("127.0.5.14", "v1-c", 200).await;
    let cp = common::control_plane(
        "127.0.5.11",
        &mesh(
            &[&a, &b, &c],
            "    traffic_policy: {load_balancer: {consistent_hash: {use_source_ip: true}}}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut used = HashSet::new();
    for _ in 0..30 {
        used.insert(call(&client, "/", &[]).await.by);
    }
    // One caller has one source IP: Envoy sends all of it to one host.
    assert_eq!(used.len(), 1, "one caller, one replica: {used:?}");
}

/// 8 callers, 30 requests each: the share `slow` answered.
async fn slow_share(slow: &Backend, client: &MeshHttpClient) -> f64 {
    let before = slow.hits();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..30 {
                assert_eq!(call(&client, "/", &[]).await.status, 200);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    (slow.hits() - before) as f64 / 240.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_a_slow_replica() {
    let slow = backend("127.0.5.22", "v1-slow", 200).await;
    slow.delay_ms.store(150, Ordering::SeqCst);
    let f1 = backend("127.0.5.23", "v1-f1", 200).await;
    let f2 = backend("127.0.5.24", "v1-f2", 200).await;
    let all = [&slow, &f1, &f2];
    let cp = common::control_plane("127.0.5.21", &mesh(&all, "")).await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let rr = slow_share(&slow, &client).await;
    assert!(
        rr > 0.28,
        "round robin gives the slow replica its third: {rr}"
    );
    cp.set_mesh(&mesh(
        &all,
        "    traffic_policy: {load_balancer: LEAST_REQUEST}\n",
    ))
    .expect("push");
    until_view(&fe, "LEAST_REQUEST", |v| lb_policy(v) == "LEAST_REQUEST").await;
    let lr = slow_share(&slow, &client).await;
    assert!(lr < 0.22, "least request avoids the slow replica: {lr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_over_every_replica() {
    let a = backend("127.0.5.32", "v1-a", 200).await;
    let b = backend("127.0.5.33", "v1-b", 200).await;
    let cp = common::control_plane(
        "127.0.5.31",
        &mesh(&[&a, &b], "    traffic_policy: {load_balancer: RANDOM}\n"),
    )
    .await;
    let fe = frontend(&cp).await;
    assert_eq!(lb_policy(&fe.view()), "RANDOM");
    let client = fe.http_client();
    // Round robin alternates strictly; random has runs.
    let mut seq = Vec::new();
    for _ in 0..200 {
        seq.push(call(&client, "/", &[]).await.by);
    }
    let on_a = seq.iter().filter(|s| *s == "v1-a").count();
    assert!((60..=140).contains(&on_a), "about half each: {on_a}/200");
    assert!(
        seq.windows(2).any(|w| w[0] == w[1]),
        "random, not alternating"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_abort_and_delay_take_their_share() {
    let ok = backend("127.0.5.42", "v1-ok", 200).await;
    let cp = common::control_plane(
        "127.0.5.41",
        &mesh(
            &[&ok],
            "    routes:\n      - name: chaos\n        route: [{}]\n        fault: {abort: {http_status: 418, percentage: 50}}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut aborted = 0;
    for _ in 0..200 {
        let ans = call(&client, "/", &[]).await;
        match (ans.status, ans.flags) {
            (418, Some("FI")) => aborted += 1,
            (200, None) => assert_eq!(ans.by, "v1-ok"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((60..=140).contains(&aborted), "50 % aborted: {aborted}/200");
    assert_eq!(ok.hits(), 200 - aborted, "an aborted request never leaves");

    // A delay of every request, then the answer.
    cp.set_mesh(&mesh(
        &[&ok],
        "    routes:\n      - name: chaos\n        route: [{}]\n        fault: {delay: {fixed_delay: 300ms, percentage: 100}}\n",
    ))
    .expect("push");
    until_view(&fe, "delay fault", |v| {
        v.outbound("svc.demo", 8080)
            .and_then(|o| o.http().map(|h| h.virtual_host.routes[0].fault.clone()))
            .flatten()
            .is_some_and(|f| f.delay.is_some())
    })
    .await;
    let t = Instant::now();
    assert_eq!(call(&client, "/", &[]).await.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outliers_are_ejected_and_come_back() {
    let good = backend("127.0.5.52", "v1-good", 200).await;
    let bad = backend("127.0.5.53", "v1-bad", 503).await;
    let cp = common::control_plane(
        "127.0.5.51",
        &mesh(
            &[&good, &bad],
            "    traffic_policy:\n      outlier_detection: {consecutive_5xx_errors: 3, interval: 1s, base_ejection_time: 1s, max_ejection_percent: 50}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    // Istio's default retry (503, other hosts) hides the bad replica from
    // callers; it is ejected after its third 503 and gets nothing more.
    for _ in 0..30 {
        let ans = call(&client, "/", &[]).await;
        assert_eq!((ans.status, ans.by.as_str()), (200, "v1-good"));
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 consecutive 5xx");
    // After the ejection time it is tried again (and fails again).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..6 {
        assert_eq!(call(&client, "/", &[]).await.status, 200);
    }
    assert!(bad.hits() > 3, "back after base_ejection_time");

    // Gateway errors: 502 is not retried by Istio's default, so callers
    // see it until the second one ejects the replica.
    let gw = backend("127.0.5.54", "v1-gw", 502).await;
    cp.set_mesh(&mesh(
        &[&good, &gw],
        "    traffic_policy:\n      outlier_detection: {consecutive_5xx_errors: 0, consecutive_gateway_errors: 2, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50}\n",
    ))
    .expect("push");
    until_view(&fe, "gateway outlier", |v| {
        v.cluster(CLUSTER).is_some_and(|c| {
            c.outlier_detection
                .as_ref()
                .is_some_and(|o| o.ejects_on_gateway_failure() && !o.ejects_on_5xx())
                && c.endpoints.iter().any(|e| e.address == gw.addr.to_string())
        })
    })
    .await;
    let mut failed = 0;
    for _ in 0..30 {
        let ans = call(&client, "/", &[]).await;
        if ans.status == 502 {
            failed += 1;
        } else {
            assert_eq!(ans.status, 200);
        }
    }
    assert_eq!(
        (failed, gw.hits()),
        (2, 2),
        "ejected after 2 gateway errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_max_requests_overflow_answers_503_uo() {
    let slow = backend("127.0.5.62", "v1-slow", 200).await;
    slow.delay_ms.store(400, Ordering::SeqCst);
    let cp = common::control_plane(
        "127.0.5.61",
        &mesh(
            &[&slow],
            "    traffic_policy: {connection_pool: {http: {http2_max_requests: 2}}}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut calls = Vec::new();
    for _ in 0..6 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let a = call(&client, "/", &[]).await;
            (a.status, a.flags)
        }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for c in calls {
        match c.await.expect("join") {
            (200, None) => ok += 1,
            (503, Some("UO")) => overflow += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, overflow), (2, 4), "two in flight at most");
    assert_eq!(slow.hits(), 2, "overflow never reaches the replica");
    assert_eq!(call(&client, "/", &[]).await.status, 200, "flows again");
}

// Envoy: one HTTP/1.1 connection (max_connections), one request waiting
// for it (max_pending_requests), the rest 503 UO, never retried. nasp's
// client does not enforce max_connections / max_pending_requests yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_max_pending_requests_overflow_answers_503_uo() {
    let slow = backend("127.0.5.72", "v1-slow", 200).await;
    slow.delay_ms.store(400, Ordering::SeqCst);
    let cp = common::control_plane(
        "127.0.5.71",
        &mesh(
            &[&slow],
            "    traffic_policy: {connection_pool: {tcp: {max_connections: 1}, http: {http1_max_pending_requests: 1}}}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut calls = Vec::new();
    for _ in 0..5 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let a = call(&client, "/", &[]).await;
            (a.status, a.flags)
        }));
    }
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.expect("join"));
    }
    // One connection busy, one request waiting for it, the rest overflow.
    let overflow = results.iter().filter(|r| **r == (503, Some("UO"))).count();
    assert_eq!(overflow, 3, "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_3_attempts_on_503_reaches_the_healthy_replica() {
    let bad: Vec<Arc<Backend>> = vec![
        backend("127.0.5.82", "v1-b1", 503).await,
        backend("127.0.5.83", "v1-b2", 503).await,
        backend("127.0.5.84", "v1-b3", 503).await,
    ];
    let good = backend("127.0.5.85", "v1-ok", 200).await;
    let all = [&bad[0], &bad[1], &bad[2], &good];
    let retries = |r: &str| {
        format!("    routes:\n      - name: r\n        route: [{{}}]\n        retries: {r}\n")
    };
    let cp = common::control_plane(
        "127.0.5.81",
        &mesh(&all, &retries("{attempts: 3, retry_on: \"503\"}")),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    // Three of four replicas fail; four attempts on different hosts
    // (previous-hosts) always find the healthy one.
    for _ in 0..40 {
        let ans = call(&client, "/", &[]).await;
        assert_eq!((ans.status, ans.by.as_str()), (200, "v1-ok"));
    }
    // Without retries about three in four fail.
    cp.set_mesh(&mesh(&all, &retries("{attempts: 0}")))
        .expect("push");
    until_view(&fe, "no retries", |v| {
        v.outbound("svc.demo", 8080)
            .and_then(|o| o.http().map(|h| h.virtual_host.routes[0].clone()))
            .is_some_and(|r| {
                matches!(&r.action, nasp::xds::route::RouteAction::Forward(f) if f.retry_policy.is_none())
            })
    })
    .await;
    let mut failed = 0;
    for _ in 0..40 {
        if call(&client, "/", &[]).await.status == 503 {
            failed += 1;
        }
    }
    assert!(
        (20..=40).contains(&failed),
        "no retries: {failed}/40 failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_moves_on_to_another_replica() {
    let slow = backend("127.0.5.92", "v1-slow", 200).await;
    slow.delay_ms.store(2000, Ordering::SeqCst);
    let fast = backend("127.0.5.93", "v1-fast", 200).await;
    let cp = common::control_plane(
        "127.0.5.91",
        &mesh(
            &[&slow, &fast],
            "    routes:\n      - route: [{}]\n        timeout: 5s\n        retries: {attempts: 2, per_try_timeout: 150ms, retry_on: \"5xx\"}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    for _ in 0..6 {
        let t = Instant::now();
        let ans = call(&client, "/", &[]).await;
        assert_eq!((ans.status, ans.by.as_str()), (200, "v1-fast"));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert!(
        slow.hits() > 0,
        "the slow replica was tried and given up on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_ut() {
    let slow = backend("127.0.6.2", "v1-slow", 200).await;
    let cp = common::control_plane(
        "127.0.6.1",
        &mesh(
            &[&slow],
            "    routes:\n      - route: [{}]\n        timeout: 200ms\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    assert_eq!(call(&client, "/", &[]).await.status, 200, "fast enough");
    slow.delay_ms.store(1500, Ordering::SeqCst);
    let t = Instant::now();
    let ans = call(&client, "/", &[]).await;
    assert_eq!((ans.status, ans.flags), (504, Some("UT")));
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_headers_are_changed_as_configured() {
    let b = backend("127.0.6.12", "v1-a", 200).await;
    let cp = common::control_plane(
        "127.0.6.11",
        &mesh(
            &[&b],
            "    routes:\n      - route: [{}]\n        headers:\n          request: {set: {x-route: r1}, add: {x-trace: added}, remove: [x-debug]}\n          response: {set: {x-resp: mesh}, add: {x-extra: one}, remove: [x-internal]}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let ans = call(
        &client,
        "/",
        &[("x-route", "old"), ("x-trace", "orig"), ("x-debug", "1")],
    )
    .await;
    assert_eq!(ans.status, 200);
    let seen: Vec<&str> = ans.body.lines().collect();
    assert!(seen.contains(&"x-route: r1"), "set overwrites: {seen:?}");
    assert!(!seen.contains(&"x-route: old"), "{seen:?}");
    assert!(
        seen.contains(&"x-trace: orig") && seen.contains(&"x-trace: added"),
        "add appends: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("x-debug")),
        "removed: {seen:?}"
    );
    let h = |n: &str| -> Vec<&str> {
        ans.headers
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    };
    assert_eq!(h("x-resp"), vec!["mesh"], "response set overwrites");
    assert_eq!(h("x-extra"), vec!["one"]);
    assert!(h("x-internal").is_empty(), "response header removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_change_moves_live_traffic_without_dropping_requests_in_flight() {
    let a = backend("127.0.6.22", "v1-a", 200).await;
    let b = backend("127.0.6.23", "v2-b", 200).await;
    let split = |v1: u32, v2: u32| {
        format!(
            "    routes:\n      - name: split\n        route: [{{subset: v1, weight: {v1}}}, {{subset: v2, weight: {v2}}}]\n"
        )
    };
    let cp = common::control_plane("127.0.6.21", &mesh(&[&a, &b], &split(100, 0))).await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    assert_eq!(call(&client, "/", &[]).await.by, "v1-a");

    // Slow requests in flight on v1 across the push …
    let mut slow = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        slow.push(tokio::spawn(async move {
            let ans = call(&client, "/", &[("x-delay-ms", "800")]).await;
            (ans.status, ans.by)
        }));
    }
    // … and steady callers throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut steady = Vec::new();
    for _ in 0..3 {
        let (client, stop) = (client.clone(), stop.clone());
        steady.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let ans = call(&client, "/", &[]).await;
                seen.push((ans.status, ans.by));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.stalled.load(Ordering::SeqCst) < 8 {
        assert!(Instant::now() < deadline, "slow requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pushed = Instant::now();
    cp.set_mesh(&mesh(&[&a, &b], &split(0, 100))).expect("push");
    // New requests move to v2 while the slow ones are still on v1.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if call(&client, "/", &[]).await.by == "v2-b" {
            break;
        }
        assert!(Instant::now() < deadline, "traffic never moved to v2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved_after = pushed.elapsed();
    for s in slow {
        let (status, by) = s.await.expect("join");
        assert_eq!(
            (status, by.as_str()),
            (200, "v1-a"),
            "in flight across the push"
        );
    }
    assert!(
        moved_after < Duration::from_millis(800),
        "traffic moved while the slow requests were in flight ({moved_after:?})"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let mut after_push = 0;
    for s in steady {
        let seen = s.await.expect("join");
        assert!(seen.iter().all(|(st, _)| *st == 200), "{seen:?}");
        after_push += seen.iter().filter(|(_, by)| by == "v2-b").count();
    }
    assert!(after_push > 0, "steady callers moved too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmup_ramps_a_new_replica_up_over_its_duration() {
    let old = backend("127.0.6.32", "v1-old", 200).await;
    let new = backend("127.0.6.33", "v1-new", 200).await;
    let policy = "    traffic_policy:\n      load_balancer: {simple: ROUND_ROBIN, warmup: {duration: 4s, minimum_percent: 5}}\n";
    let cp = common::control_plane("127.0.6.31", &mesh(&[&old], policy)).await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    assert_eq!(call(&client, "/", &[]).await.by, "v1-old");
    // The old replica is past its warmup when the new one is added.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    cp.set_mesh(&mesh(&[&old, &new], policy)).expect("push");
    until_view(&fe, "the new replica", |v| {
        v.cluster(CLUSTER).is_some_and(|c| {
            c.slow_start
                .is_some_and(|s| s.window == Duration::from_secs(4))
                && c.endpoints
                    .iter()
                    .any(|e| e.address == new.addr.to_string())
        })
    })
    .await;
    let share =
        |by: &[String]| by.iter().filter(|b| *b == "v1-new").count() as f64 / by.len() as f64;
    let (mut early, t) = (Vec::new(), Instant::now());
    while early.len() < 300 && t.elapsed() < Duration::from_millis(600) {
        early.push(call(&client, "/", &[]).await.by);
    }
    // Round robin without a warmup gives it half at once; in its first
    // 600 ms of 4 s it ramps from 5 % to 15 % of its weight.
    assert!(early.len() >= 40, "only {} requests in 600 ms", early.len());
    assert!(share(&early) < 0.25, "early share {}", share(&early));
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let mut later = Vec::new();
    for _ in 0..100 {
        later.push(call(&client, "/", &[]).await.by);
    }
    assert!(
        (share(&later) - 0.5).abs() <= 0.05,
        "after the warmup: {}",
        share(&later)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_hash_cookie_keeps_a_session_on_one_replica() {
    let replicas = [
        backend("127.0.6.42", "v1-a", 200).await,
        backend("127.0.6.43", "v1-b", 200).await,
        backend("127.0.6.44", "v1-c", 200).await,
    ];
    let cp = common::control_plane(
        "127.0.6.41",
        &mesh(
            &replicas.iter().collect::<Vec<_>>(),
            "    traffic_policy:\n      load_balancer:\n        consistent_hash: {http_cookie: {name: session, path: /, ttl: 30s}}\n",
        ),
    )
    .await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    let mut used = HashSet::new();
    for _ in 0..12 {
        let first = call(&client, "/", &[]).await;
        let cookie = first.headers[http::header::SET_COOKIE]
            .to_str()
            .expect("cookie")
            .to_string();
        let pair = cookie.split(';').next().expect("pair").to_string();
        assert!(
            cookie.starts_with("session=\"") && cookie.ends_with("; Max-Age=30; Path=/; HttpOnly"),
            "{cookie}"
        );
        used.insert(first.by.clone());
        for _ in 0..5 {
            let again = call(&client, "/", &[("cookie", &pair)]).await;
            assert_eq!(again.by, first.by, "the session moved");
            assert!(again.headers.get(http::header::SET_COOKIE).is_none());
        }
    }
    assert!(
        used.len() >= 2,
        "sessions spread over the replicas: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_its_share_of_shadow_copies_and_the_caller_only_the_route() {
    let main = backend("127.0.6.52", "v1-main", 200).await;
    let shadow = backend("127.0.6.53", "v2-shadow", 503).await;
    let route = |percent: u32| {
        format!(
            "    routes:\n      - name: mirrored\n        route: [{{subset: v1}}]\n        mirror: {{subset: v2}}\n        mirror_percentage: {percent}\n"
        )
    };
    let cp = common::control_plane("127.0.6.51", &mesh(&[&main, &shadow], &route(100))).await;
    let fe = frontend(&cp).await;
    let client = fe.http_client();
    for _ in 0..20 {
        let ans = call(&client, "/", &[]).await;
        assert_eq!((ans.status, ans.by.as_str()), (200, "v1-main"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shadow.hits() < 20 {
        assert!(
            Instant::now() < deadline,
            "{} shadow copies of 20",
            shadow.hits()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        main.hits(),
        20,
        "the shadow's 503 was never retried on main"
    );
    // 30 %: about 60 of 200.
    cp.set_mesh(&mesh(&[&main, &shadow], &route(30)))
        .expect("push");
    until_view(&fe, "30 % mirror", |v| {
        v.outbound("svc.demo", 8080)
            .and_then(|o| o.http().map(|h| h.virtual_host.routes.clone()))
            .is_some_and(|routes| {
                routes.iter().any(|r| {
                    matches!(&r.action, nasp::xds::route::RouteAction::Forward(f)
                        if f.mirrors.iter().any(|m| (m.fraction - 0.3).abs() < 1e-9))
                })
            })
    })
    .await;
    let before = shadow.hits();
    for _ in 0..200 {
        assert_eq!(call(&client, "/", &[]).await.by, "v1-main");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copies = shadow.hits() - before;
    assert!(
        (30..=90).contains(&copies),
        "{copies} copies of 200 at 30 %"
    );
}
