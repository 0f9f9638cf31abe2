//! The cost per request of each traffic-policy layer (issue 9) against
//! plain round robin, in one run: an `HttpClient` over HTTP/2 (plaintext,
//! loopback) to three hyper backends, one cluster and one route, each
//! variant adding one setting to the cluster or the route.
//!
//! Closed loop: 8 concurrent callers, each sending its next request when
//! the last answer's body is read, for `--measure` seconds per variant and
//! round; the variants run in a rotated order every round (A B C …, B C …
//! A, …) so drift on a shared machine falls on all of them. Reported per
//! variant: requests/s, the wall time per request (1 / throughput), the
//! process's CPU time per request (every thread's, from
//! `/proc/self/task/*/schedstat`, client and backends together: less
//! sensitive than throughput to other work on a shared machine), each
//! with its ratio to round robin's in the same round (median over rounds),
//! and the extra CPU per request.
//!
//! Run: `cargo bench -p nasp-transport --bench policy -- [--measure S]
//! [--rounds N]` (or `cargo xtask bench policy`). Results:
//! docs/benchmarks.md ("Policy layers").

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use nasp_transport::{Body, HttpClient, serve_http};
use serde_json::{Value, json};

const CALLERS: usize = 8;

/// A backend answering 200 with a short body.
async fn backend(ip: &str) -> SocketAddr {
    let listener = common::plain_listener(ip).await;
    let addr = listener.local_addr();
    let svc = hyper::service::service_fn(|_req: http::Request<Incoming>| async {
        Ok::<_, Infallible>(http::Response::new(Body::from("ok")))
    });
    tokio::spawn(serve_http(listener, svc));
    addr
}

fn merge(into: &mut Value, extra: &Value) {
    if let (Some(o), Some(e)) = (into.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            match o.get_mut(k) {
                Some(have) if have.is_object() && v.is_object() => merge(have, v),
                _ => {
                    o.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// A client for one variant: `cluster` fields on cluster `c` (HTTP/2 to
/// the backends), `route` fields on its route (`action` into the action).
fn client(endpoints: &[SocketAddr], cluster: &Value, route: &Value) -> HttpClient {
    let mut extra = common::http2();
    merge(&mut extra, cluster);
    let mut c = common::static_cluster("c", endpoints, extra);
    // Two localities for the locality-weighted variant (weights 2 and 1).
    if cluster.get("common_lb_config").is_some() {
        let lb: Vec<Value> = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        c["load_assignment"]["endpoints"] = json!([
            {"locality": {"zone": "a"}, "load_balancing_weight": 2, "lb_endpoints": lb[..2]},
            {"locality": {"zone": "b"}, "load_balancing_weight": 1, "lb_endpoints": lb[2..]},
        ]);
    }
    let mut r = json!({"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}});
    if let Some(a) = route.get("action") {
        merge(&mut r["route"], a);
    }
    let mut rest = route.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("action");
    }
    merge(&mut r, &rest);
    let set = common::dump(
        vec![c],
        vec![json!({"name": "svc.test:80", "domains": ["svc.test"], "routes": [r]})],
        json!({}),
    );
    common::client(&set, common::any_certs())
}

/// Istio's default route retry policy (istiod's `DefaultPolicy`).
fn istio_retries() -> Value {
    json!({"action": {"retry_policy": {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2, "retriable_status_codes": [503],
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5}}})
}

fn variants() -> Vec<(&'static str, Value, Value)> {
    let hash = |lb: &str| {
        (
            json!({"lb_policy": lb}),
            json!({"action": {"hash_policy": [{"header": {"header_name": "x-user"}}]}}),
        )
    };
    let outlier = json!({"outlier_detection": {"consecutive_5xx": 5, "interval": "10s", "base_ejection_time": "30s", "enforcing_success_rate": 0}});
    let (ring_c, ring_r) = hash("RING_HASH");
    let (maglev_c, maglev_r) = hash("MAGLEV");
    let mut all_c = json!({"common_lb_config": {"locality_weighted_lb_config": {}, "healthy_panic_threshold": {"value": 0}}});
    merge(&mut all_c, &outlier);
    merge(&mut all_c, &common::istio_circuit_breakers());
    let mut all_r = istio_retries();
    merge(&mut all_r, &json!({"action": {"timeout": "10s"}}));
    vec![
        ("round robin (baseline)", json!({}), json!({})),
        (
            "least request",
            json!({"lb_policy": "LEAST_REQUEST"}),
            json!({}),
        ),
        ("random", json!({"lb_policy": "RANDOM"}), json!({})),
        ("ring hash (header key)", ring_c, ring_r),
        ("maglev (header key)", maglev_c, maglev_r),
        (
            "locality weighted",
            json!({"common_lb_config": {"locality_weighted_lb_config": {}}}),
            json!({}),
        ),
        (
            "slow start (all ramping)",
            json!({"round_robin_lb_config": {"slow_start_config": {"slow_start_window": "3600s"}}}),
            json!({}),
        ),
        ("Istio default retries", json!({}), istio_retries()),
        (
            "retries + retry budget",
            json!({"circuit_breakers": {"thresholds": [{"retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}]}}),
            istio_retries(),
        ),
        (
            "route timeout",
            json!({}),
            json!({"action": {"timeout": "10s"}}),
        ),
        ("outlier detection", outlier.clone(), json!({})),
        (
            "outlier + success rate",
            json!({"outlier_detection": {"consecutive_5xx": 5, "interval": "10s", "enforcing_success_rate": 100}}),
            json!({}),
        ),
        (
            "Istio circuit breakers",
            common::istio_circuit_breakers(),
            json!({}),
        ),
        (
            "fault filter at 0 %",
            json!({}),
            json!({"typed_per_filter_config": {"envoy.filters.http.fault": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "abort": {"http_status": 503, "percentage": {"numerator": 0}},
                "delay": {"fixed_delay": "1s", "percentage": {"numerator": 0}}}}}),
        ),
        (
            "header add / remove",
            json!({}),
            json!({"request_headers_to_add": [{"header": {"key": "x-a", "value": "1"}}, {"header": {"key": "x-b", "value": "2"}}],
                "request_headers_to_remove": ["x-debug"],
                "response_headers_to_add": [{"header": {"key": "x-served", "value": "nasp"}}],
                "response_headers_to_remove": ["server"]}),
        ),
        (
            "Istio-like (all of: locality, outlier, breakers, retries, timeout)",
            all_c,
            all_r,
        ),
    ]
}

/// CPU time this process has used so far (every thread's, from
/// `/proc/self/task/*/schedstat`, in nanoseconds).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Requests per second of `client` over `d` with [`CALLERS`] callers, and
/// the process's CPU nanoseconds per request.
async fn run(client: &HttpClient, d: Duration) -> (f64, f64) {
    let cpu = cpu_ns();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("http://svc.test/")
                    .header("x-user", format!("user-{}", (n * 7 + caller as u64) % 64))
                    .header("x-debug", "1")
                    .body(Body::empty())
                    .expect("request");
                let resp = client.request(req).await.expect("answer");
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect_bytes().await;
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("caller");
    }
    let n = done.load(Ordering::Relaxed) as f64;
    (
        n / started.elapsed().as_secs_f64(),
        cpu_ns().saturating_sub(cpu) as f64 / n.max(1.0),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: f64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let measure = Duration::from_secs_f64(arg("--measure", 1.0));
    let rounds = arg("--rounds", 5.0) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = [
            backend("127.0.0.121").await,
            backend("127.0.0.122").await,
            backend("127.0.0.123").await,
        ];
        let variants = variants();
        let clients: Vec<HttpClient> = variants
            .iter()
            .map(|(_, c, r)| client(&eps, c, r))
            .collect();
        // Warm every client (connections, balancers, the view's routes).
        for c in &clients {
            run(c, Duration::from_millis(300)).await;
        }
        println!(
            "# policy layers: {CALLERS} callers, HTTP/2 plaintext on loopback, {rounds} rounds of {measure:?}, load {}",
            loadavg()
        );
        let mut rps = vec![Vec::new(); variants.len()];
        let mut cpu = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let (r, c) = run(&clients[i], measure).await;
                rps[i].push(r);
                cpu[i].push(c);
            }
        }
        // Per round: wall time per request and CPU per request, each as a
        // ratio to round robin's in the same round.
        let ratio = |v: &[Vec<f64>], i: usize, inverse: bool| -> f64 {
            median(
                (0..rounds)
                    .map(|r| if inverse { v[0][r] / v[i][r] } else { v[i][r] / v[0][r] })
                    .collect(),
            )
        };
        let base_cpu = median(cpu[0].clone()) / 1e3;
        println!(
            "| layer | requests/s | wall µs / request | × round robin | CPU µs / request | × round robin | extra CPU µs / request |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (i, (name, _, _)) in variants.iter().enumerate() {
            let r = median(rps[i].clone());
            let c = median(cpu[i].clone()) / 1e3;
            let cpu_ratio = ratio(&cpu, i, false);
            println!(
                "| {name} | {r:.0} | {:.1} | {:.3} | {c:.1} | {cpu_ratio:.3} | {:+.2} |",
                1e6 / r,
                ratio(&rps, i, true),
                (cpu_ratio - 1.0) * base_cpu
            );
        }
        println!("load at end {}", loadavg());
    });
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
