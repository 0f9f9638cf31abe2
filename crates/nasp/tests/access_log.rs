//! Access logs through two `Mesh` workloads on loopback (127.0.9.20–29,
//! the embedded control plane, mTLS): the client's lines in Envoy's default
//! text format in one file, the server's as JSON in another, one per
//! request and per TCP connection, with the method, path, protocol, code,
//! byte counts, headers, upstream host and cluster a reader of Envoy's log
//! would look for.

mod common;

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use nasp::access_log::{AccessLogConfig, AccessLogFormat};
use nasp::controlplane::ControlPlane;
use nasp::controlplane::mesh::MeshFile;
use nasp::transport::Body;
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClientExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
      - { ip: 127.0.9.22 }
  - name: db
    namespace: demo
    service_account: echo
    vip: 10.96.9.24
    mtls: strict
    ports:
      - { port: 15432, protocol: tcp }
    endpoints:
      - { ip: 127.0.9.22 }
"#;

async fn workload(cp: &ControlPlane, name: &str, ip: &str, log: AccessLogConfig) -> Mesh {
    Mesh::builder()
        .workload(WorkloadSettings {
            namespace: "demo".into(),
            service_account: name.into(),
            instance_ips: vec![ip.into()],
            ..Default::default()
        })
        .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), None)
        .filter_workers(1)
        .ready_timeout(Duration::from_secs(20))
        .access_log(Some(log))
        .build()
        .await
        .expect("joined")
}

/// The file's lines once there are `n`, within 10 s.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || tokio::time::Instant::now() >= deadline {
            assert_eq!(lines.len(), n, "{}:\n{text}", path.display());
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_request_and_connection_in_envoys_format_and_as_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client_log, server_log) = (dir.path().join("web.log"), dir.path().join("echo.json"));
    let cp = common::control_plane("127.0.9.21", &MeshFile::parse(MESH).expect("mesh file")).await;
    let echo = workload(
        &cp,
        "echo",
        "127.0.9.22",
        AccessLogConfig::file(&server_log).format(AccessLogFormat::Json),
    )
    .await;
    let listener = echo
        .bind("127.0.9.22:18080".parse().expect("addr"))
        .await
        .expect("bind");
    let app = tower::service_fn(|req: http::Request<Body>| async move {
        let status = if req.uri().path() == "/missing" {
            404
        } else {
            200
        };
        let _ = req.into_body().collect_bytes().await;
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(status)
                .body(Body::from("echo"))
                .expect("response"),
        )
    });
    let e = echo.clone();
    let served = tokio::spawn(async move { e.serve(listener, app).await });
    let tcp_listener = echo
        .bind("127.0.9.22:15432".parse().expect("addr"))
        .await
        .expect("bind TCP");
    let e = echo.clone();
    // Reads 4 bytes, answers 5, closes.
    let tcp_served = tokio::spawn(async move {
        e.serve_tcp(tcp_listener, |mut conn: nasp::TcpConnection| async move {
            let mut buf = [0u8; 4];
            if conn.read_exact(&mut buf).await.is_ok() {
                let _ = conn.write_all(b"pong!").await;
                let _ = conn.shutdown().await;
            }
        })
        .await;
    });
    let web = workload(&cp, "web", "127.0.9.23", AccessLogConfig::file(&client_log)).await;

    let client = web.http_client();
    let req = http::Request::post("http://echo.demo:18080/upload?x=1")
        .header("user-agent", "nasp-test/1")
        .header("x-request-id", "req-1")
        .body(Body::from("hello"))
        .expect("request");
    let resp = client.send(req).await.expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &resp.into_body().collect_bytes().await.expect("body")[..],
        b"echo"
    );
    let resp = client
        .get("http://echo.demo:18080/missing")
        .await
        .expect("sent");
    assert_eq!(resp.status(), 404);
    let _ = resp.into_body().collect_bytes().await;

    // One TCP connection: 4 bytes out, 5 back.
    let mut conn = web.connect("db.demo:15432").await.expect("connect");
    conn.write_all(b"ping").await.expect("write");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut back))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(back, b"pong!");
    drop(conn);

    // The client: Envoy's default text format, one line per request and
    // per connection.
    let text = lines(&client_log, 3).await;
    let echo_host = "127.0.9.22:18080";
    // [START] "POST /upload?x=1 HTTP/1.1" 200 - 5 4 <ms> <ms> "-" "nasp-test/1" "req-1" "echo.demo:18080" "127.0.9.22:18080"
    let line = &text[0];
    assert!(line.starts_with('['), "{line}");
    let (start, rest) = line[1..].split_once("] ").expect("start time");
    assert_eq!(start.len(), "2026-12-01T15:04:05.123Z".len(), "{line}");
    assert!(
        start.ends_with('Z') && start.as_bytes()[10] == b'T',
        "{line}"
    );
    let fields: Vec<&str> = rest.split('"').collect();
    assert_eq!(fields[1], "POST /upload?x=1 HTTP/1.1", "{line}");
    let numbers: Vec<&str> = fields[2].split_whitespace().collect();
    assert_eq!(&numbers[..4], ["200", "-", "5", "4"], "{line}");
    assert!(numbers[4].parse::<u64>().is_ok(), "duration: {line}");
    assert!(
        numbers[5].parse::<u64>().is_ok(),
        "upstream service time: {line}"
    );
    assert_eq!(
        [fields[3], fields[5], fields[7], fields[9], fields[11]],
        ["-", "nasp-test/1", "req-1", "echo.demo:18080", echo_host],
        "{line}"
    );
    assert!(
        text[1].contains("\"GET /missing HTTP/1.1\" 404 - 0 4 "),
        "{}",
        text[1]
    );
    // Envoy's TCP line: no method, path, protocol or code.
    let tcp = &text[2];
    assert!(tcp.contains("] \"- - -\" 0 - 4 5 "), "{tcp}");
    assert!(
        tcp.ends_with(" \"-\" \"-\" \"-\" \"-\" \"127.0.9.22:15432\""),
        "{tcp}"
    );

    // The server: JSON, the caller's identity, the inbound cluster.
    let json = lines(&server_log, 3).await;
    let first: serde_json::Value = serde_json::from_str(&json[0]).expect("JSON line");
    assert_eq!(first["direction"], "inbound", "{first}");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/upload?x=1");
    assert_eq!(first["response_code"], 200);
    assert_eq!(first["response_flags"], "-");
    assert_eq!(first["bytes_received"], 5);
    assert_eq!(first["bytes_sent"], 4);
    assert_eq!(first["user_agent"], "nasp-test/1");
    assert_eq!(first["request_id"], "req-1");
    assert_eq!(first["upstream_host"], echo_host);
    assert_eq!(first["upstream_cluster"], "inbound|18080||");
    assert_eq!(first["peer"], "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(first["x_forwarded_for"], serde_json::Value::Null);
    let caller: std::net::SocketAddr = first["downstream_remote_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the caller's address");
    assert!(caller.ip().is_loopback(), "{first}");
    let second: serde_json::Value = serde_json::from_str(&json[1]).expect("JSON line");
    assert_eq!(second["response_code"], 404);
    let tcp: serde_json::Value = serde_json::from_str(&json[2]).expect("JSON line");
    assert_eq!(
        (
            &tcp["method"],
            &tcp["response_code"],
            &tcp["bytes_received"],
            &tcp["bytes_sent"],
            &tcp["upstream_cluster"],
            &tcp["peer"],
        ),
        (
            &serde_json::json!("-"),
            &serde_json::json!(0),
            &serde_json::json!(4),
            &serde_json::json!(5),
            &serde_json::json!("inbound|15432||"),
            &serde_json::json!("spiffe://cluster.local/ns/demo/sa/web"),
        ),
        "{tcp}"
    );

    web.shutdown().await;
    echo.shutdown().await;
    let _ = served.await;
    let _ = tcp_served.await;
}

/// A file that cannot be opened fails the build, naming it.
#[tokio::test]
async fn an_access_log_that_cannot_be_opened_fails_the_build() {
    let err = Mesh::builder()
        .workload(WorkloadSettings {
            namespace: "demo".into(),
            service_account: "web".into(),
            ..Default::default()
        })
        .embedded("127.0.9.21:1".parse().expect("addr"), b"x".to_vec(), None)
        .access_log(Some(AccessLogConfig::file("/nonexistent-dir/nasp.log")))
        .build()
        .await
        .expect_err("no such directory");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent-dir/nasp.log"), "{msg}");
}
