//! `nasp controlplane --config-dump`, `nasp xds resolve` and `nasp xds dump`,
//! run as a user runs them, on the real Istio config dumps.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shared_dump(name: &str) -> String {
    format!(
        "{}/../../../shared/data/istio-config-dumps/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn controlplane(dir: &Path, dump: &Path) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(["controlplane", "--listen", "127.0.0.1:0", "--root-out"])
        .arg(dir.join("root.pem"))
        .arg("--config-dump")
        .arg(dump)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nasp controlplane");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (
        Running(child),
        v["listening"].as_str().expect("address").to_string(),
    )
}

fn nasp(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(args)
        .output()
        .expect("run nasp");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn resolve_and_dump_over_sotw_delta_and_tls() {
    let dir = tempfile::tempdir().expect("tmp");
    let dump = dir.path().join("dump.json");
    std::fs::copy(shared_dump("config_v0.json"), &dump).expect("copy");
    let (_cp, addr) = controlplane(dir.path(), &dump);
    let root = dir.path().join("root.pem");
    let root = root.to_str().expect("utf-8");

    for extra in [&[][..], &["--delta"][..], &["--root", root][..]] {
        let mut args = vec![
            "xds",
            "resolve",
            "10.10.42.110:12050",
            "--xds",
            &addr,
            "--node-id",
            "test-node-id",
        ];
        args.extend_from_slice(extra);
        let (ok, v, err) = nasp(&args);
        assert!(ok, "{extra:?}: {err}");
        assert_eq!(
            v["sni"], "outbound_.12050_._.echo.demo.svc.cluster.local",
            "{extra:?}"
        );
        assert_eq!(v["tls"], true);
        assert_eq!(v["permissive"], true);
        assert_eq!(v["cluster"], "outbound|12050||echo.demo.svc.cluster.local");
        assert_eq!(v["endpoints"], serde_json::json!(["10.20.160.131:8080"]));
    }
    let (ok, v, err) = nasp(&[
        "xds",
        "resolve",
        "echo:80",
        "--xds",
        &addr,
        "--namespace",
        "demo",
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["sni"], "outbound_.80_._.echo.demo.svc.cluster.local");
    assert_eq!(v["routes"][0]["retry"]["num_retries"], 2);
    // The typed route table: matcher, action, Envoy's reading of `0s`.
    assert_eq!(v["kind"], "http");
    assert_eq!(v["routes"][0]["match"]["path"]["prefix"], "/");
    assert_eq!(
        v["routes"][0]["action"]["forward"]["cluster"],
        "outbound|80||echo.demo.svc.cluster.local"
    );
    assert_eq!(
        v["routes"][0]["action"]["timeout_ms"],
        serde_json::Value::Null,
        "timeout 0s means disabled"
    );
    assert_eq!(
        v["routes"][0]["retry"]["host_predicates"][0],
        "PreviousHosts"
    );
    assert_eq!(
        v["routes"][0]["retry"]["host_selection_retry_max_attempts"],
        5
    );

    let (ok, _, err) = nasp(&["xds", "resolve", "nowhere.example:80", "--xds", &addr]);
    assert!(!ok);
    assert!(
        err.contains("nowhere.example:80 is not in the mesh"),
        "{err}"
    );

    let (ok, v, err) = nasp(&["xds", "dump", "--xds", &addr]);
    assert!(ok, "{err}");
    let configs = v["configs"].as_array().expect("configs");
    assert_eq!(configs.len(), 4);
    assert!(
        configs[0]["dynamic_active_clusters"]
            .as_array()
            .expect("clusters")
            .len()
            >= 92
    );

    // The dump file changes: the control plane reloads and pushes.
    std::fs::copy(shared_dump("config_v1.json"), &dump).expect("copy v1");
    let mut last = serde_json::Value::Null;
    for _ in 0..40 {
        let (ok, v, _) = nasp(&["xds", "resolve", "10.10.42.110:80", "--xds", &addr]);
        if ok && v["endpoints"].as_array().is_some_and(|e| e.len() == 3) {
            return;
        }
        last = v;
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("the new dump was not served: {last}");
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (ok, _, err) = nasp(&[
        "xds",
        "resolve",
        "echo:80",
        "--xds",
        &addr,
        "--timeout",
        "2s",
    ]);
    assert!(!ok);
    assert!(err.contains("no configuration from"), "{err}");
}

#[test]
fn a_mesh_file_is_served_and_reloaded() {
    let dir = tempfile::tempdir().expect("tmp");
    let mesh = dir.path().join("mesh.yaml");
    let example = format!(
        "{}/../../examples/mesh/mesh.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(example).expect("example");
    std::fs::write(&mesh, &text).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(["controlplane", "--listen", "127.0.0.1:0", "--mesh"])
        .arg(&mesh)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    let _cp = Running(child);
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    let addr = v["listening"].as_str().expect("addr").to_string();

    let (ok, v, err) = nasp(&[
        "xds",
        "resolve",
        "db:5432",
        "--xds",
        &addr,
        "--namespace",
        "demo",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        (v["tls"].as_bool(), v["permissive"].as_bool()),
        (Some(true), Some(false))
    );
    let (ok, v, err) = nasp(&[
        "xds",
        "resolve",
        "echo.example.internal:12050",
        "--xds",
        &addr,
        "--nds",
        "--delta",
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["cluster"], "outbound|12050||echo.demo.svc.cluster.local");

    // A new endpoint for db appears once the file changes.
    std::fs::write(
        &mesh,
        text.replace(
            "- { ip: 10.20.1.5 }",
            "- { ip: 10.20.1.5 }\n      - { ip: 10.20.1.6 }",
        ),
    )
    .expect("write");
    for _ in 0..40 {
        let (ok, v, _) = nasp(&[
            "xds",
            "resolve",
            "db:5432",
            "--xds",
            &addr,
            "--namespace",
            "demo",
        ]);
        if ok && v["endpoints"].as_array().is_some_and(|e| e.len() == 2) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("the changed mesh file was not served");
}
