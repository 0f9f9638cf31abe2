//! Regenerates `crates/nasp-proto/src/gen/` from `crates/nasp-proto/proto/`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto = root.join("crates/nasp-proto/proto");
    let out = root.join("crates/nasp-proto/src/gen");
    let files = ["istio/security/v1alpha1/ca.proto"];
    let fds = protox::compile(files, [&proto]).unwrap_or_else(|e| panic!("proto: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("codegen: {e}"));
    eprintln!("codegen: wrote {}", out.display());
}
