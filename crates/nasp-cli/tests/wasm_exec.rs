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

fn header<'a>(headers: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    headers
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

fn logged(t: &serde_json::Value, plugin: &str, needle: &str) -> bool {
    t["logs"].as_array().is_some_and(|logs| {
        logs.iter().any(|l| {
            l["plugin"] == plugin && l["message"].as_str().is_some_and(|m| m.contains(needle))
        })
    })
}

const NODE: &str = "node.id=sidecar~10.0.0.1~demo-1.demo~demo.svc.cluster.local namespace=demo listener_direction=2";

#[test]
fn plugins_run_as_one_chain_with_their_own_config_and_root_id() {
    for rt in ["wasmtime", "wasmi", "wasm3"] {
        let t = nasp(&[
            "wasm",
            "exec",
            "--runtime",
            rt,
            "--plugin",
            "target/filters/headers.wasm",
            "--root-id",
            "headers",
            "--config",
            "",
            "--plugin",
            "target/filters/conformance.wasm",
            "--root-id",
            "conf-root",
            "--config",
            "demo",
            "--properties",
            "examples/wasm-exec/properties.json",
            "--request",
            "examples/wasm-exec/request.json",
        ]);
        let req = &t["request"]["headers"];
        assert_eq!(header(req, "x-path-seen"), Some("/echo"), "{rt}: {t}");
        assert_eq!(
            header(req, "x-conformance-seen"),
            Some("root=conf-root;node=sidecar~10.0.0.1~demo-1.demo~demo.svc.cluster.local"),
            "{rt}: the second plugin has the second --root-id"
        );
        assert_eq!(t["request"]["body"], "HELLO FROM NASP", "{rt}");
        let resp = &t["response"]["headers"];
        assert_eq!(header(resp, "x-status-seen"), Some("200"), "{rt}: {t}");
        assert_eq!(header(resp, "x-upstream-status"), Some("200"), "{rt}");
        assert!(logged(&t, "conformance", "configure: demo"), "{rt}: {t}");
        // --properties reaches the root context too.
        for cb in ["on_vm_start", "on_configure"] {
            let line = format!("root properties in {cb}: {NODE}");
            assert!(logged(&t, "conformance", &line), "{rt}: {line}: {t}");
        }
        assert_eq!(t["failed"], false);
        let plugins = t["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["name"], "headers");
        assert_eq!(plugins[1]["name"], "conformance");
    }
}

#[test]
fn the_same_module_twice_pairs_flags_by_position() {
    for rt in ["wasmtime", "wasmi", "wasm3"] {
        let t = nasp(&[
            "wasm",
            "exec",
            "--runtime",
            rt,
            "--plugin",
            "target/filters/conformance.wasm",
            "--config",
            "passive",
            "--plugin",
            "target/filters/conformance.wasm",
            "--config",
            "demo",
            "--root-id",
            "first",
            "--root-id",
            "second",
            "--properties",
            "examples/wasm-exec/properties.json",
            "--request",
            "examples/wasm-exec/request.json",
        ]);
        assert!(logged(&t, "conformance", "configure: passive"), "{rt}: {t}");
        assert!(logged(&t, "conformance#2", "configure: demo"), "{rt}: {t}");
        let req = &t["request"]["headers"];
        assert!(header(req, "x-passive-seen").is_some(), "{rt}: {t}");
        assert_eq!(
            header(req, "x-conformance-seen"),
            Some("root=second;node=sidecar~10.0.0.1~demo-1.demo~demo.svc.cluster.local"),
            "{rt}"
        );
        // Both bodies went through: the second plugin upper-cases what the
        // first already did, and each appends to the response body.
        assert_eq!(
            t["response"]["body"], "ok [filtered] [filtered]",
            "{rt}: {t}"
        );
        assert!(
            t["metrics"]
                .as_str()
                .unwrap_or_default()
                .contains("conformance_requests_total 2"),
            "{rt}: both plugins counted the request in one registry: {t}"
        );
    }
}

#[test]
fn more_configs_than_plugins_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args([
            "wasm",
            "exec",
            "--plugin",
            "target/filters/conformance.wasm",
            "--config",
            "a",
            "--config",
            "b",
            "--request",
            "examples/wasm-exec/request.json",
        ])
        .current_dir(ROOT)
        .output()
        .expect("run nasp");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 --config for 1 --plugin"), "{err}");
}
