//! `nasp demo`, `nasp serve` and `nasp get`, run as a user runs them.
//! Addresses are on 127.0.3.x (other suites use 127.0.0–2.x): the demo
//! tests on .10–.14 and .20–.24, serve/get on .30–.32.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nasp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nasp"))
}

/// Waits for `child` to exit, at most `limit`; the output, or a panic
/// naming the command after killing it.
fn wait_output(child: Child, limit: Duration, what: &str) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Running(child);
    loop {
        match child.0.try_wait().expect("try_wait") {
            Some(_) => break,
            None if start.elapsed() > limit => panic!("{what} still running after {limit:?}"),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let took = start.elapsed();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = child.0.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let status = child.0.wait().expect("status");
    (
        Output {
            status,
            stdout,
            stderr,
        },
        took,
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn demo_quick_runs_every_phase_with_the_expected_split_and_no_failure() {
    let child = nasp()
        .args(["demo", "--quick", "--ip", "127.0.3.10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nasp demo");
    let (out, took) = wait_output(child, Duration::from_secs(60), "nasp demo --quick");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Stdout is a pipe: plain lines, no cursor moves.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    for phase in [
        "phase 1/4: split 90/10 ok:",
        "phase 2/4: shift to 50/50 ok:",
        "phase 3/4: replica v1-b lost ok:",
        "phase 4/4: all to v2 (0/100) ok:",
    ] {
        assert!(stdout.contains(phase), "{phase} missing:\n{stdout}");
    }
    // The split per endpoint, for both protocols, each second.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("req/s | http v1-a") && l.contains("| grpc v1-a")),
        "{stdout}"
    );
    // While a v1 replica is gone, it serves nothing and nothing fails.
    let lost = stdout
        .lines()
        .find(|l| l.starts_with("phase 3/4: replica v1-b lost ok:"))
        .expect("phase 3 result");
    assert!(lost.contains("v1-b 0.0%"), "{lost}");
    assert!(lost.contains("failed 0"), "{lost}");
    let all_v2 = stdout
        .lines()
        .find(|l| l.starts_with("phase 4/4: all to v2 (0/100) ok:"))
        .expect("phase 4 result");
    assert!(all_v2.contains("v2-a 100.0%"), "{all_v2}");
    // The identities as each side verified them.
    assert!(
        stdout.contains(
            "backend replicas are spiffe://cluster.local/ns/demo/sa/backend (verified by the frontend"
        ),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("the backends saw the caller as spiffe://cluster.local/ns/demo/sa/frontend"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("demo ok") && last.contains(", 0 failed"),
        "{last}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn demo_into_a_closed_pipe_ends_quietly() {
    // The full-length demo (about 50 s): a reader that leaves after two
    // lines (`nasp demo | head -n 2`) must end it within seconds, cleanly.
    let mut child = nasp()
        .args(["demo", "--ip", "127.0.3.20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nasp demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    for _ in 0..2 {
        let mut line = String::new();
        lines.read_line(&mut line).expect("a line");
        assert!(line.starts_with("nasp demo:"), "{line:?}");
    }
    drop(lines);
    let (out, took) = wait_output(child, Duration::from_secs(30), "nasp demo after head");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// A mesh file for `echo.demo` with two endpoints on 127.0.3.31/.32.
const ECHO_MESH: &str = r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    mtls: strict
    ports:
      - { port: 18080, protocol: http }
      - { port: 19090, protocol: grpc }
    endpoints:
      - { ip: 127.0.3.31, labels: { app: echo, version: v1 } }
      - { ip: 127.0.3.32, labels: { app: echo, version: v1 } }
"#;

/// Starts `cmd` and returns it with its first stdout line as JSON.
fn start_with_line(cmd: &mut Command, what: &str) -> (Running, serde_json::Value) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line:?}"));
    (Running(child), v)
}

#[test]
fn serve_and_get_through_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, ECHO_MESH).expect("mesh file");
    let root = dir.path().join("root.pem");
    let (_cp, cp) = start_with_line(
        nasp()
            .args([
                "controlplane",
                "--listen",
                "127.0.3.30:0",
                "--allow-any-identity",
                "--mesh",
            ])
            .arg(&mesh)
            .arg("--root-out")
            .arg(&root),
        "nasp controlplane",
    );
    let xds = cp["listening"].as_str().expect("address").to_string();
    let mut servers = Vec::new();
    for ip in ["127.0.3.31", "127.0.3.32"] {
        let (s, line) = start_with_line(
            nasp()
                .args([
                    "serve",
                    "--service",
                    "echo.demo",
                    "--service-account",
                    "echo",
                ])
                .args(["--xds", &xds, "--root"])
                .arg(&root)
                .args(["--listen", &format!("{ip}:18080")])
                .args(["--grpc", &format!("{ip}:19090")])
                .args(["--tcp-echo", &format!("{ip}:15432")])
                .args(["--metrics", &format!("{ip}:15090")]),
            "nasp serve",
        );
        assert_eq!(
            line["id"], "spiffe://cluster.local/ns/demo/sa/echo",
            "{line}"
        );
        assert_eq!(line["http"], format!("{ip}:18080"), "{line}");
        servers.push(s);
    }
    let get = |extra: &[&str]| {
        let out = nasp()
            .args(["get", "--service", "web.demo", "--service-account", "web"])
            .args(["--xds", &xds, "--root"])
            .arg(&root)
            .args(extra)
            .output()
            .expect("run nasp get");
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };

    // One request: status, headers, the verified peer, then the echo app's
    // JSON with the caller's id as the server's listener verified it.
    let (ok, stdout, stderr) = get(&[
        "http://echo.demo:18080/hello?x=1",
        "-H",
        "x-nasp-test: yes",
        "-d",
        "ping",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.starts_with("HTTP/1.1 200 OK\n"), "{stdout}");
    assert!(
        stdout.contains("content-type: application/json\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("* peer: spiffe://cluster.local/ns/demo/sa/echo (verified, mTLS)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cluster outbound|18080||echo.demo.svc.cluster.local"),
        "{stdout}"
    );
    let body = &stdout[stdout.find("\n{").expect("JSON body")..];
    let echo: serde_json::Value = serde_json::from_str(body.trim()).expect("echo JSON");
    assert_eq!(
        echo["peer"], "spiffe://cluster.local/ns/demo/sa/web",
        "{echo}"
    );
    assert_eq!(echo["served_by"], "spiffe://cluster.local/ns/demo/sa/echo");
    assert_eq!(echo["mtls"], true);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echo["body"], "ping");
    assert_eq!(echo["headers"]["x-nasp-test"], "yes");
    assert!(
        ["127.0.3.31:18080", "127.0.3.32:18080"].contains(&echo["endpoint"].as_str().unwrap_or("")),
        "{echo}"
    );

    // -n: the split across both endpoints, round robin.
    let (ok, stdout, stderr) = get(&["http://echo.demo:18080/", "-n", "20"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.starts_with("20 requests: 20 × 200\n"), "{stdout}");
    for ep in ["127.0.3.31:18080", "127.0.3.32:18080"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(ep))
            .unwrap_or_else(|| panic!("{ep} missing:\n{stdout}"));
        assert!(
            line.contains("10   50.0%  spiffe://cluster.local/ns/demo/sa/echo"),
            "{line}"
        );
    }

    // TCP echo (the port is PERMISSIVE: the mesh file lists no inbound
    // ports), and the counters the workload keeps.
    let mut tcp = std::net::TcpStream::connect("127.0.3.31:15432").expect("tcp echo");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    tcp.write_all(b"hello tcp").expect("write");
    let mut buf = [0u8; 9];
    tcp.read_exact(&mut buf).expect("echoed");
    assert_eq!(&buf, b"hello tcp");
    let metrics = |ip: &str| {
        let mut c = std::net::TcpStream::connect(format!("{ip}:15090")).expect("metrics");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("write");
        let mut page = String::new();
        let _ = c.read_to_string(&mut page);
        page
    };
    let counted: u64 = ["127.0.3.31", "127.0.3.32"]
        .iter()
        .map(|ip| {
            let page = metrics(ip);
            assert!(
                page.contains("# TYPE nasp_requests_total counter"),
                "{page}"
            );
            page.lines()
                .filter(|l| {
                    l.starts_with("nasp_requests_total{protocol=\"http\",response_code=\"200\"")
                        && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/web\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(counted, 21, "one request and twenty");
}

/// Runs nasp with `args`; asserts it fails with exactly one `nasp:` line
/// on stderr and no panic, and returns that line.
fn fails_with_one_line(args: &[&str]) -> String {
    let child = nasp()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nasp");
    let (out, _) = wait_output(child, Duration::from_secs(30), &args.join(" "));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("nasp:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

#[test]
fn bad_input_and_an_unreachable_control_plane_give_one_error_line() {
    let e = fails_with_one_line(&["get", "ht!tp://x"]);
    assert!(e.contains("bad URL"), "{e}");
    let e = fails_with_one_line(&["get", "https://echo.demo/"]);
    assert!(e.contains("use http://"), "{e}");
    let e = fails_with_one_line(&["get", "http://echo.demo/", "-H", "no-colon"]);
    assert!(e.contains("bad header"), "{e}");
    // A real mesh root from a control plane that is then stopped: nothing
    // answers where the client is sent.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.pem");
    {
        let _cp = start_with_line(
            nasp()
                .args(["controlplane", "--listen", "127.0.3.38:0", "--root-out"])
                .arg(&root),
            "nasp controlplane",
        );
    }
    let e = fails_with_one_line(&[
        "get",
        "http://echo.demo:18080/",
        "--xds",
        "127.0.3.39:1",
        "--root",
        root.to_str().expect("utf-8"),
        "--timeout",
        "2s",
    ]);
    assert!(e.contains("joining the mesh"), "{e}");
    let e = fails_with_one_line(&[
        "serve",
        "--service",
        "echo",
        "--listen",
        "127.0.3.39:18080",
        "--xds",
        "127.0.3.39:1",
    ]);
    assert!(e.contains("NAME.NAMESPACE"), "{e}");
    let e = fails_with_one_line(&["demo", "--ip", "10.0.0.1"]);
    assert!(e.contains("loopback"), "{e}");
}
