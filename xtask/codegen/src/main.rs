//! Regenerates `crates/nasp-proto/src/gen/` from `crates/nasp-proto/proto/`
//! and from the Envoy protos that the `envoy-types` crate ships:
//! - prost + tonic code for the Istio CA service, Istio's extra xDS types
//!   and the echo service of `nasp serve`;
//! - `config_dump.bin`, a descriptor set covering Envoy's admin config dump
//!   and every extension type found in Istio's config dumps, used to read a
//!   dump's JSON with prost-reflect.

use std::path::{Path, PathBuf};

fn envoy_types_proto_dir(root: &Path) -> PathBuf {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(root.join("xtask/codegen/Cargo.toml"))
        .output()
        .expect("cargo metadata");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let pkg = v["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "envoy-types"))
        .expect("envoy-types in the metadata");
    let manifest = PathBuf::from(pkg["manifest_path"].as_str().expect("manifest path"));
    manifest.parent().expect("crate dir").join("proto")
}

/// Envoy extension protos whose types appear in Istio's config dumps.
const DUMP_FILES: &[&str] = &[
    "envoy/admin/v3/config_dump.proto",
    "envoy/extensions/access_loggers/grpc/v3/als.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/request_id/uuid/v3/uuid.proto",
    "envoy/extensions/filters/http/wasm/v3/wasm.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/filters/http/grpc_stats/v3/config.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/config/trace/v3/zipkin.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "istio/extras/typed_struct.proto",
    "istio/extras/filters.proto",
    "istio/extras/metadata_exchange.proto",
    "istio/extras/nds.proto",
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto = root.join("crates/nasp-proto/proto");
    let out = root.join("crates/nasp-proto/src/gen");

    // Istio CA, Istio's extra xDS types and nasp's echo service: prost +
    // tonic code.
    let files = [
        "istio/security/v1alpha1/ca.proto",
        "istio/extras/nds.proto",
        "nasp/echo/v1/echo.proto",
    ];
    let fds = protox::compile(files, [&proto]).unwrap_or_else(|e| panic!("proto: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("codegen: {e}"));

    // The descriptor set for reading config dumps.
    let envoy = envoy_types_proto_dir(&root);
    let includes: Vec<PathBuf> = vec![
        proto.clone(),
        envoy.join("data-plane-api"),
        envoy.join("xds"),
        envoy.join("protoc-gen-validate"),
        envoy.join("googleapis"),
        envoy.join("cel-spec"),
        envoy.join("opentelemetry-proto"),
        envoy.join("client_model"),
    ];
    let mut compiler = protox::Compiler::new(&includes).expect("compiler");
    compiler.include_imports(true).include_source_info(false);
    for f in DUMP_FILES {
        compiler.open_file(f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let bytes = compiler.encode_file_descriptor_set();
    std::fs::write(out.join("config_dump.bin"), &bytes).expect("write descriptor set");
    eprintln!(
        "codegen: wrote {} ({} KiB descriptor set)",
        out.display(),
        bytes.len() / 1024
    );
}
