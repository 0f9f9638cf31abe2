//! `nasp wasm exec` and `nasp wasm inspect`, run as a user runs them.

use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn nasp(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run nasp");
    assert!(
        out.status.success(),
        "nasp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// The conformance filter built for each target the Rust SDK supports.
const PLUGINS: [&str; 2] = [
    "target/filters/conformance.wasm",
    "target/filters/conformance-unknown.wasm",
];

fn exec(runtime: &str, plugin: &str, request: &str) -> serde_json::Value {
    nasp(&[
        "wasm",
        "exec",
        "--runtime",
        runtime,
        "--plugin",
        plugin,
        "--config",
        "demo",
        "--properties",
        "examples/wasm-exec/properties.json",
        "--request",
        request,
    ])
}

#[test]
fn http_transcripts_are_identical_across_runtimes_and_targets() {
    let mut first: Option<serde_json::Value> = None;
    for (rt, plugin) in ["wasmtime", "wasmi", "wasm3"]
        .into_iter()
        .flat_map(|rt| PLUGINS.map(|p| (rt, p)))
    {
        let mut t = exec(rt, plugin, "examples/wasm-exec/request.json");
        assert_eq!(t["runtime"], rt);
        assert_eq!(t["request"]["body"], "HELLO FROM NASP", "{rt}: {t}");
        assert_eq!(t["response"]["body"], "ok [filtered]");
        assert_eq!(t["failed"], false);
        assert!(
            t["metrics"]
                .as_str()
                .unwrap_or_default()
                .contains("conformance_requests_total 1")
        );
        t["runtime"] = serde_json::Value::Null;
        // Log lines name the plugin after its file; that alone may differ.
        if let Some(logs) = t["logs"].as_array_mut() {
            for line in logs {
                line["plugin"] = serde_json::Value::Null;
            }
        }
        match &first {
            None => first = Some(t),
            Some(f) => assert_eq!(f, &t, "{rt} with {plugin}: transcript differs"),
        }
    }
}

#[test]
fn yaml_request_gives_the_json_transcript() {
    let json = exec("wasmi", PLUGINS[0], "examples/wasm-exec/request.json");
    let yaml = exec("wasmi", PLUGINS[0], "examples/wasm-exec/request.yaml");
    assert_eq!(json, yaml);
}

#[test]
fn malformed_request_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("nasp-bad-request-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "request: [unclosed").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args([
            "wasm",
            "exec",
            "--runtime",
            "wasmi",
            "--plugin",
            PLUGINS[0],
            "--request",
        ])
        .arg(&bad)
        .current_dir(ROOT)
        .output()
        .expect("run nasp");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("parsing") && err.contains("bad.yaml") && err.contains("as YAML"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_transcript() {
    for rt in ["wasmtime", "wasmi", "wasm3"] {
        let t = nasp(&[
            "wasm",
            "exec",
            "--runtime",
            rt,
            "--plugin",
            "target/filters/conformance.wasm",
            "--config",
            "tcp",
            "--request",
            "examples/wasm-exec/tcp.json",
        ]);
        assert_eq!(t["tcp"]["steps"][1]["forwarded"], ">ping", "{rt}: {t}");
        assert_eq!(t["tcp"]["steps"][2]["forwarded"], "pong<");
    }
}

#[test]
fn inspect_reports_abi_and_imports() {
    let t = nasp(&["wasm", "inspect", "target/filters/conformance.wasm"]);
    assert_eq!(t["abi_version"], "0.2.1");
    assert_eq!(t["unsatisfied_imports"], serde_json::json!([]));
    let imports = t["imports"].as_array().expect("imports");
    assert!(
        imports
            .iter()
            .any(|i| i == "env.proxy_log(i32,i32,i32)->(i32)"),
        "{t}"
    );
}

#[test]
fn unknown_runtime_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args([
            "wasm",
            "exec",
            "--runtime",
            "v8",
            "--plugin",
            "target/filters/conformance.wasm",
            "--request",
            "examples/wasm-exec/request.json",
        ])
        .current_dir(ROOT)
        .output()
        .expect("run nasp");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"v8\" is not compiled into this build"),
        "{err}"
    );
}
