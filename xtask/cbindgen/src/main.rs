//! Generates nasp's C header, `crates/nasp-ffi/include/nasp.h`, from the
//! exports in `crates/nasp-ffi/src/` with `crates/nasp-ffi/cbindgen.toml`
//! (docs/ffi-design.md, section 5). Each export's `///` comment becomes its
//! doc in the header.
//!
//! `nasp-cbindgen --update` writes the header when it differs;
//! `nasp-cbindgen --check` writes nothing and exits 1 when the checked-in
//! header differs from a fresh generation, naming the file and the command
//! that fixes it. `cargo xtask ffi-header` runs it.
//! It must never write anywhere but the header.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The header, relative to the repository root.
const HEADER: &str = "crates/nasp-ffi/include/nasp.h";

fn root() -> PathBuf {
    // xtask/cbindgen -> the repository root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or(manifest)
}

fn generate(root: &Path) -> Result<Vec<u8>, String> {
    let krate = root.join("crates/nasp-ffi");
    let config_path = krate.join("cbindgen.toml");
    let config = cbindgen::Config::from_file(&config_path)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let bindings = cbindgen::Builder::new()
        .with_crate(&krate)
        .with_config(config)
        .generate()
        .map_err(|e| format!("cbindgen on {}: {e}", krate.display()))?;
    let mut out = Vec::new();
    bindings.write(&mut out);
    Ok(out)
}

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        Some("--update") => false,
        Some("--check") => true,
        other => {
            eprintln!("nasp-cbindgen <--update|--check>: unknown argument {other:?}");
            return ExitCode::FAILURE;
        }
    };
    let root = root();
    let path = root.join(HEADER);
    let new = match generate(&root) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nasp-cbindgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let old = std::fs::read(&path).ok();
    if old.as_deref() == Some(new.as_slice()) {
        eprintln!("nasp-cbindgen: {HEADER} is in step with crates/nasp-ffi/src");
        return ExitCode::SUCCESS;
    }
    if check {
        eprintln!(
            "nasp-cbindgen: {HEADER} is out of step with crates/nasp-ffi/src ({} bytes checked in, \
             {} generated). Run `cargo xtask ffi-header --update` and commit the result",
            old.map_or_else(|| "none".to_string(), |o| o.len().to_string()),
            new.len()
        );
        return ExitCode::FAILURE;
    }
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("nasp-cbindgen: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(&path, &new) {
        eprintln!("nasp-cbindgen: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "nasp-cbindgen: {HEADER} written ({} -> {} bytes)",
        old.map_or(0, |o| o.len()),
        new.len()
    );
    ExitCode::SUCCESS
}
