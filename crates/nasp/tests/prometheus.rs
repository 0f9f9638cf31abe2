//! Two `Mesh` workloads on loopback (127.0.8.0/24) with the default
//! filter chain (our metadata-exchange and istio-stats filters, embedded in
//! the library; wasmtime), each serving its Prometheus endpoint; after HTTP traffic from one to the
//! other, a real Prometheus server (Debian's `prometheus`, started here)
//! scrapes both and answers PromQL over them: the source reporter's series
//! from the client, the destination reporter's from the server, with the
//! request counts sent.

mod common;

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::transport::Body;
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClientExt as _};

const MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
    endpoints:
      - { ip: 127.0.8.2, labels: { app: echo, version: v1 } }
"#;

const ECHO_IP: &str = "127.0.8.2";
const WEB_IP: &str = "127.0.8.3";
const PROMETHEUS_IP: &str = "127.0.8.10";

/// Requests sent: answered 200 and 404 by the application.
const OK: usize = 5;
const NOT_FOUND: usize = 2;

/// A workload `name` (its service account too) at `ip`, with the default
/// filter chain and its Prometheus endpoint on `ip`, port picked.
async fn workload(cp: &ControlPlane, name: &str, ip: &str) -> Mesh {
    let b = Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: format!("{name}-0"),
            namespace: "demo".into(),
            service_account: name.into(),
            workload_name: name.into(),
            instance_ips: vec![ip.into()],
            labels: [
                ("app".to_string(), name.to_string()),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .runtime("wasmtime")
        .filter_workers(2)
        .ready_timeout(Duration::from_secs(20))
        .prometheus(Some(format!("{ip}:0").parse().expect("addr")));
    let mesh = b.build().await.expect("joined the mesh");
    let addr = mesh.prometheus_addr().expect("Prometheus endpoint on");
    assert_eq!(addr.ip().to_string(), ip);
    assert_ne!(addr.port(), 0);
    mesh
}

/// One plain HTTP/1.0 GET (no chunking, the server closes): (status, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(format!("GET {path_and_query} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The sum of `family`'s samples in a scrape whose labels contain all of
/// `labels` (`k="v"` each).
fn scraped_sum(text: &str, family: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Polls `f` every 100 ms until it returns `Some`, up to `within`; panics
/// with `what` and the last state otherwise.
async fn eventually<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("{what} not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A Prometheus server of ours: killed and waited for when dropped, also
/// when the test fails.
struct PrometheusProcess {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl PrometheusProcess {
    /// Starts `prometheus` scraping `targets` every second, its data and
    /// config in `dir`, its API on 127.0.8.10.
    fn start(dir: &Path, targets: &[SocketAddr]) -> Self {
        let version = Command::new("prometheus").arg("--version").output();
        assert!(
            version.as_ref().is_ok_and(|o| o.status.success()),
            "the prometheus server could not be run ({version:?}): install Debian's \
             `prometheus` package (`cargo xtask setup` does)"
        );
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: nasp\n    metrics_path: /stats/prometheus\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write the config");
        // A free port on our address: bound, read, released for Prometheus.
        let addr = std::net::TcpListener::bind(format!("{PROMETHEUS_IP}:0"))
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET` on the HTTP API, the JSON answer's `data`.
    fn api(&mut self, path_and_query: &str) -> Result<serde_json::Value, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}):\n{}", self.log());
        }
        let (status, body) = http_get(self.addr, path_and_query).map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("{status}: {body}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"].clone())
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PromQL in a URL query.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A vector query's result as (labels of `by`, value) pairs, sorted.
fn vector(data: &serde_json::Value, by: &[&str]) -> Vec<(Vec<String>, String)> {
    let mut out: Vec<(Vec<String>, String)> = data["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    let labels = by
                        .iter()
                        .map(|k| s["metric"][*k].as_str().unwrap_or("").to_string())
                        .collect();
                    (labels, s["value"][1].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_two_workloads_and_answers_promql() {
    let cp = common::control_plane("127.0.8.1", &MeshFile::parse(MESH).expect("mesh file")).await;
    let echo = workload(&cp, "echo", ECHO_IP).await;
    let listener = echo
        .bind(format!("{ECHO_IP}:18080").parse().expect("addr"))
        .await
        .expect("bind");
    let app = tower::service_fn(|req: http::Request<Body>| async move {
        let status = if req.uri().path() == "/missing" {
            404
        } else {
            200
        };
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(status)
                .body(Body::from("echo"))
                .expect("response"),
        )
    });
    let e = echo.clone();
    let served = tokio::spawn(async move { e.serve(listener, app).await });
    let web = workload(&cp, "web", WEB_IP).await;

    let client = web.http_client();
    for (path, n, status) in [("/", OK, 200), ("/missing", NOT_FOUND, 404)] {
        for _ in 0..n {
            let resp = client
                .get(&format!("http://echo.demo:18080{path}"))
                .await
                .expect("sent");
            assert_eq!(resp.status().as_u16(), status, "{path}");
            let _ = resp.into_body().collect_bytes().await;
        }
    }

    // Each workload's own endpoint has its reporter's series (the inbound
    // side records in proxy_on_log, which may end just after the answer).
    let (web_addr, echo_addr) = (
        web.prometheus_addr().expect("web endpoint"),
        echo.prometheus_addr().expect("echo endpoint"),
    );
    for (addr, reporter) in [(web_addr, "source"), (echo_addr, "destination")] {
        let page = eventually(Duration::from_secs(10), "the requests counted", || {
            let (status, page) = http_get(addr, "/stats/prometheus").map_err(|e| e.to_string())?;
            let counted = |code: &str| {
                scraped_sum(
                    &page,
                    "istio_requests_total",
                    &[
                        &format!("reporter=\"{reporter}\""),
                        &format!("response_code=\"{code}\""),
                    ],
                )
            };
            if status == 200 && counted("200") == OK as u64 && counted("404") == NOT_FOUND as u64 {
                Ok(page)
            } else {
                Err(format!("{status}:\n{page}"))
            }
        })
        .await;
        assert!(
            page.contains("# TYPE istio_requests_total counter\n"),
            "{page}"
        );
        assert!(
            page.contains("# TYPE istio_request_duration_milliseconds histogram\n"),
            "{page}"
        );
    }

    // A real Prometheus scrapes both.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut prometheus = PrometheusProcess::start(dir.path(), &[web_addr, echo_addr]);
    let up = eventually(Duration::from_secs(30), "both targets up", || {
        let data = prometheus.api("/api/v1/targets?state=active")?;
        let targets = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up: Vec<String> = targets
            .iter()
            .filter(|t| t["health"] == "up")
            .filter_map(|t| t["labels"]["instance"].as_str().map(str::to_string))
            .collect();
        if up.len() == 2 {
            Ok(up)
        } else {
            Err(format!("{data}"))
        }
    })
    .await;
    let mut want_up = vec![web_addr.to_string(), echo_addr.to_string()];
    want_up.sort();
    let mut up = up;
    up.sort();
    assert_eq!(up, want_up);

    let query = |by: &str| {
        format!(
            "/api/v1/query?query={}",
            url_encode(&format!("sum(istio_requests_total) by ({by})"))
        )
    };
    let total = (OK + NOT_FOUND).to_string();
    let by_reporter = eventually(Duration::from_secs(30), "PromQL by reporter", || {
        let data = prometheus.api(&query("reporter"))?;
        let v = vector(&data, &["reporter"]);
        if v.len() == 2 {
            Ok(v)
        } else {
            Err(format!("{data}"))
        }
    })
    .await;
    assert_eq!(
        by_reporter,
        vec![
            (vec!["destination".to_string()], total.clone()),
            (vec!["source".to_string()], total.clone()),
        ],
        "{}",
        prometheus.log()
    );
    // Per reporter and response code, and which workload reported what.
    let data = prometheus
        .api(&query("reporter, response_code, instance"))
        .expect("PromQL by code");
    let (ok, nf) = (OK.to_string(), NOT_FOUND.to_string());
    let (web_i, echo_i) = (web_addr.to_string(), echo_addr.to_string());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut want = vec![
        (s(&["destination", "200", &echo_i]), ok.clone()),
        (s(&["destination", "404", &echo_i]), nf.clone()),
        (s(&["source", "200", &web_i]), ok.clone()),
        (s(&["source", "404", &web_i]), nf.clone()),
    ];
    want.sort();
    assert_eq!(
        vector(&data, &["reporter", "response_code", "instance"]),
        want,
        "{data}"
    );

    // Both sides know both workloads (metadata exchange), the destination
    // the caller's verified identity over mTLS.
    let data = prometheus
        .api(&query(
            "reporter, source_workload, destination_workload, source_principal, connection_security_policy",
        ))
        .expect("PromQL by workload");
    let web_id = "spiffe://cluster.local/ns/demo/sa/web";
    let mut want = vec![
        (
            s(&["destination", "web", "echo", web_id, "mutual_tls"]),
            total.clone(),
        ),
        (
            s(&["source", "web", "echo", web_id, "unknown"]),
            total.clone(),
        ),
    ];
    want.sort();
    assert_eq!(
        vector(
            &data,
            &[
                "reporter",
                "source_workload",
                "destination_workload",
                "source_principal",
                "connection_security_policy"
            ]
        ),
        want,
        "{data}"
    );

    drop(prometheus);
    web.shutdown().await;
    echo.shutdown().await;
    let _ = served.await;
    // Stopped with the mesh: nothing listens there any more.
    assert!(
        std::net::TcpStream::connect_timeout(&echo_addr, Duration::from_secs(1)).is_err(),
        "the echo workload's endpoint outlived Mesh::shutdown"
    );
}

/// A taken Prometheus port fails `build()` at once, before any wait for
/// the control plane (unreachable here), naming the address and the fix.
#[tokio::test]
async fn a_taken_prometheus_port_fails_the_build_at_once() {
    let taken = std::net::TcpListener::bind("127.0.8.4:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let started = std::time::Instant::now();
    let err = Mesh::builder()
        .workload(WorkloadSettings {
            namespace: "demo".into(),
            service_account: "web".into(),
            ..Default::default()
        })
        .embedded(
            "127.0.8.1:1".parse().expect("addr"),
            b"not even a certificate".to_vec(),
            None,
        )
        .ready_timeout(Duration::from_secs(20))
        .prometheus(Some(addr))
        .build()
        .await
        .expect_err("the port is taken");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, nasp::MeshError::Prometheus(_)), "{err:?}");
    let msg = err.to_string();
    let addr = addr.to_string();
    for want in [addr.as_str(), "in use", "NASP_PROMETHEUS_ADDR", "off"] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
}
