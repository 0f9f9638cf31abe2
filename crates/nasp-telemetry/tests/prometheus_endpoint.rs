//! The Prometheus endpoint over real sockets on loopback (127.0.7.0/24):
//! what a scraper gets (status, content type, the registry's text, which
//! `promtool check metrics` accepts, Istio's tag encodings as labels), the
//! other paths and methods, garbage on the socket (logged, no panic, the
//! endpoint keeps serving), a taken port, and a graceful stop.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nasp_telemetry::server::{CONTENT_TYPE, Error, PrometheusServer};
use nasp_telemetry::{MetricKind, MetricsRegistry};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A registry with every encoding Istio's filters use: `=.=` / `;.;` tags
/// (two series of one family, a histogram), a stat-tag gauge
/// (`component.proxy.tag.1.13.2;.istio_build`), the cache counters, and a
/// plain name.
fn istio_like_registry() -> MetricsRegistry {
    let r = MetricsRegistry::new();
    let labels = |reporter: &str, code: &str| {
        format!(
            "reporter=.={reporter};.;source_workload=.=web;.;source_principal=.=spiffe://cluster.local/ns/demo/sa/web;.;\
             destination_service=.=echo.demo.svc.cluster.local;.;response_code=.={code};.;"
        )
    };
    let c = r.define(
        MetricKind::Counter,
        &format!("{}istio_requests_total", labels("source", "200")),
    );
    r.increment(c, 7).expect("a metric just defined");
    let c = r.define(
        MetricKind::Counter,
        &format!("{}istio_requests_total", labels("destination", "503")),
    );
    r.increment(c, 2).expect("a metric just defined");
    let h = r.define(
        MetricKind::Histogram,
        &format!(
            "{}istio_request_duration_milliseconds",
            labels("source", "200")
        ),
    );
    for v in [1, 3, 40, 2000] {
        r.record(h, v).expect("a metric just defined");
    }
    let g = r.define(MetricKind::Gauge, "component.proxy.tag.1.13.2;.istio_build");
    r.record(g, 1).expect("a metric just defined");
    let m = r.define(
        MetricKind::Counter,
        "wasm_filter.stats_filter.cache.miss.metric_cache_count",
    );
    r.increment(m, 4).expect("a metric just defined");
    let p = r.define(MetricKind::Gauge, "nasp.plain-gauge");
    r.record(p, 5).expect("a metric just defined");
    r
}

/// One HTTP/1.1 request with `connection: close`: (status, headers, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// `promtool check metrics` on `text`; fails the test if promtool is
/// missing or finds an error. Exit status 3 is only its naming lints (no
/// HELP lines, Istio's own counter names), which a sidecar's scrape has
/// too; 1 is a parse error.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool could not be run ({e}): install Debian's `prometheus` package \
                 (`cargo xtask setup` does)"
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && !report.contains("error"),
        "promtool ({:?}): {report}\n{text}",
        out.status
    );
}

#[tokio::test]
async fn a_scrape_is_the_registry_text_and_passes_promtool() {
    let registry = istio_like_registry();
    let server = PrometheusServer::bind("127.0.7.1:0".parse().unwrap(), registry.clone())
        .await
        .expect("bind");
    let addr = server.local_addr();
    assert_eq!(addr.ip().to_string(), "127.0.7.1");
    assert_ne!(addr.port(), 0);

    let (status, head, body) = request(addr, "GET", "/stats/prometheus").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains(&format!("content-type: {CONTENT_TYPE}")),
        "{head}"
    );
    assert_eq!(body, registry.prometheus_text());
    for line in [
        "# TYPE istio_requests_total counter\n",
        "istio_requests_total{reporter=\"source\",source_workload=\"web\",source_principal=\"spiffe://cluster.local/ns/demo/sa/web\",destination_service=\"echo.demo.svc.cluster.local\",response_code=\"200\"} 7\n",
        "istio_requests_total{reporter=\"destination\",source_workload=\"web\",source_principal=\"spiffe://cluster.local/ns/demo/sa/web\",destination_service=\"echo.demo.svc.cluster.local\",response_code=\"503\"} 2\n",
        "# TYPE istio_request_duration_milliseconds histogram\n",
        "response_code=\"200\",le=\"5\"} 2\n",
        "response_code=\"200\",le=\"+Inf\"} 4\n",
        "istio_build{component=\"proxy\",tag=\"1.13.2\"} 1\n",
        "metric_cache_count{cache=\"miss\",wasm_filter=\"stats_filter\"} 4\n",
        "nasp_plain_gauge 5\n",
    ] {
        assert!(body.contains(line), "{line} missing:\n{body}");
    }
    promtool_check(&body);

    // A later scrape sees later values.
    let id = registry.define(MetricKind::Gauge, "component.proxy.tag.1.13.2;.istio_build");
    registry.record(id, 2).unwrap();
    let (status, _, body) = request(addr, "GET", "/metrics?x=1").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("istio_build{component=\"proxy\",tag=\"1.13.2\"} 2\n"),
        "{body}"
    );

    // HEAD: the headers of a GET, no body.
    let (status, head, body) = request(addr, "HEAD", "/stats/prometheus").await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    assert!(
        head.contains(&format!("content-type: {CONTENT_TYPE}")),
        "{head}"
    );

    // Anything else.
    for path in ["/", "/stats", "/stats/prometheus/", "/metricsx"] {
        let (status, _, body) = request(addr, "GET", path).await;
        assert_eq!(status, 404, "{path}");
        assert!(!body.contains("istio_requests_total"), "{path}: {body}");
    }
    let (status, head, _) = request(addr, "POST", "/stats/prometheus").await;
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("allow: get, head"), "{head}");
    server.shutdown().await;
}

/// A `tracing` writer into a buffer the test reads.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Waits (up to 5 s) until the logs contain `needle` `n` times.
async fn logged(logs: &Logs, needle: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while logs.text().matches(needle).count() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} × {needle:?} not logged:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// A current-thread runtime: the server's tasks run on this thread, so the
// thread's default subscriber sees their logs.
#[tokio::test]
async fn garbage_on_the_socket_is_logged_and_the_endpoint_keeps_serving() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let registry = istio_like_registry();
    let server = PrometheusServer::bind("127.0.7.2:0".parse().unwrap(), registry.clone())
        .await
        .expect("bind");
    let addr = server.local_addr();
    let needle = "Prometheus endpoint: connection from 127.0.0.1:";
    let garbage: [&[u8]; 4] = [
        // A TLS ClientHello's start, on a plaintext port.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        // Not HTTP at all, with a line end.
        b"\x00\xff\xfe garbage \r\n\r\n",
        // A header line without a colon.
        b"GET /stats/prometheus HTTP/1.1\r\nno colon here\r\n\r\n",
        // A request line cut off by the client.
        b"GET /stats/prom",
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(bytes).await.expect("write");
        c.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
            .await
            .expect("closed in time");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{i}: {answer}"
        );
        assert!(!answer.contains("istio_requests_total"), "{i}: {answer}");
        logged(&logs, needle, i + 1).await;
    }
    let (status, _, body) = request(addr, "GET", "/stats/prometheus").await;
    assert_eq!(status, 200);
    assert_eq!(body, registry.prometheus_text());
    assert!(!logs.text().contains("panicked"), "{}", logs.text());
    server.shutdown().await;
}

#[tokio::test]
async fn a_taken_port_is_an_error_naming_the_address() {
    let taken = tokio::net::TcpListener::bind("127.0.7.3:0")
        .await
        .expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = PrometheusServer::bind(addr, MetricsRegistry::new())
        .await
        .expect_err("the port is taken");
    assert!(
        matches!(err, Error::Bind { addr: a, .. } if a == addr),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("in use"),
        "{msg}"
    );
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_refuses_new_ones() {
    let server = PrometheusServer::bind("127.0.7.4:0".parse().unwrap(), istio_like_registry())
        .await
        .expect("bind");
    let addr = server.local_addr();
    // A keep-alive connection, idle after one request (HEAD: the answer
    // ends with its head).
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"HEAD /stats/prometheus HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );

    // Well inside the drain timeout: an idle connection does not hold the stop.
    tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .expect("shutdown in time");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed");
    assert!(closed.is_ok(), "{closed:?}");
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "still accepting after shutdown");
    // A second stop is harmless.
    server.shutdown().await;
}
