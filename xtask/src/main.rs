//! `cargo xtask <command>`: the one entry point for chores. No dependencies,
//! so it builds in a second on a fresh machine.
//!
//! - `setup`: installs what the build needs and the machine may lack: the
//!   `wasm32-wasip1` and `wasm32-unknown-unknown` targets (rustup), libclang
//!   (apt, for wasm3's bindings) and openssl (apt, for the interop tests).
//! - `build-filters`: builds every crate under `filters/` for both targets
//!   (release) and copies the modules to `target/filters/`.
//! - `test`: setup, build-filters, the runtime feature matrix (`cargo check`,
//!   no warnings allowed), doc tests, then the workspace tests (nextest if
//!   installed, else `cargo test`). This is the command CI runs.
//! - `demo`: the embedded control plane, a certificate, xDS lookups and a
//!   filter on every runtime (see `demo()`).
//! - `codegen`: regenerates the checked-in protobuf code.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// What bindgen (through clang-sys) loads: `libclang.so`, `libclang-<N>.so`
/// and their versioned forms (`libclang.so.1`, `libclang-14.so.1`). Not
/// `libclang-cpp.so.*`, the C++ interface that a machine may ship alone.
fn is_loadable_libclang(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix("libclang") else {
        return false;
    };
    let rest = match rest.strip_prefix('-') {
        // `libclang-<N>[.<M>...].so[.<K>...]`: only a version may follow the dash.
        Some(version) => {
            let Some(end) = version.find(".so") else {
                return false;
            };
            let (v, after) = version.split_at(end);
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return false;
            }
            after
        }
        None => rest,
    };
    match rest.strip_prefix(".so") {
        Some("") => true,
        Some(suffix) => suffix
            .strip_prefix('.')
            .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.')),
        None => false,
    }
}

/// Whether `dir` holds a libclang that bindgen would load.
fn dir_has_libclang(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| is_loadable_libclang(&e.file_name().to_string_lossy()))
    })
}

/// The directories clang-sys searches on Linux, in its order: `LIBCLANG_PATH`
/// alone when set, else `llvm-config --libdir` and the system's library
/// directories.
fn libclang_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    if let Ok(out) = Command::new("llvm-config").arg("--libdir").output()
        && out.status.success()
    {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        let mut llvm: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
            .map(|e| e.path().join("lib"))
            .collect();
        llvm.sort();
        dirs.extend(llvm);
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn has_libclang() -> bool {
    libclang_dirs().iter().any(|d| dir_has_libclang(d))
}

fn setup() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    let installed = String::from_utf8_lossy(&installed.stdout).into_owned();
    for target in FILTER_TARGETS.iter().map(|(t, _)| *t) {
        if !installed.lines().any(|l| l.trim() == target) {
            run(Command::new("rustup").args(["target", "add", target]))?;
        }
    }
    let mut apt_packages = Vec::new();
    if !has_libclang() {
        eprintln!("xtask: libclang not found (wasm3's bindings need it)");
        apt_packages.push("libclang-dev");
    }
    let has_openssl = Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_openssl {
        eprintln!("xtask: openssl not found (the interop tests run it)");
        apt_packages.push("openssl");
    }
    if !apt_packages.is_empty() {
        let sudo = if Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
        {
            vec![]
        } else {
            vec!["sudo"]
        };
        let apt = |args: &[&str]| {
            let mut all: Vec<&str> = sudo.clone();
            all.push("apt-get");
            all.extend_from_slice(args);
            let mut c = Command::new(all[0]);
            c.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut c)
        };
        apt(&["update", "-qq"])?;
        let mut install = vec!["install", "-y", "-qq"];
        install.extend(apt_packages);
        apt(&install)?;
    }
    if !has_libclang() {
        return Err(
            "libclang is missing (wasm3's bindings load libclang.so through bindgen): \
             install it with `apt-get install libclang-dev`, or point LIBCLANG_PATH at \
             the directory that holds libclang.so"
                .into(),
        );
    }
    Ok(())
}

/// Every filter is built for both targets the Rust SDK supports; the
/// wasip1 build keeps the crate's name, the other gets a suffix.
const FILTER_TARGETS: [(&str, &str); 2] = [
    ("wasm32-wasip1", ""),
    ("wasm32-unknown-unknown", "-unknown"),
];

fn build_filters() -> Result<(), String> {
    let root = root();
    let filters = root.join("filters");
    let out = root.join("target").join("filters");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (target, suffix) in FILTER_TARGETS {
        run(cargo()
            .current_dir(&filters)
            .args(["build", "--release", "--target", target]))?;
        let built = filters.join("target").join(target).join("release");
        let entries = std::fs::read_dir(&built).map_err(|e| format!("{}: {e}", built.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                let to = out.join(format!("{stem}{suffix}.wasm"));
                std::fs::copy(&path, &to).map_err(|e| format!("copy {}: {e}", path.display()))?;
                eprintln!("xtask: {}", to.display());
            }
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<(), String> {
    setup()?;
    build_filters()?;
    let nextest = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    feature_matrix()?;
    // Doc tests first (nextest does not run them), so that the last summary
    // CI prints is the one of the real test run.
    if nextest {
        run(cargo()
            .current_dir(root())
            .args(["test", "--workspace", "--doc"]))?;
    }
    let mut c = cargo();
    c.current_dir(root());
    if nextest {
        c.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        c.args(["test", "--workspace", "--no-fail-fast"]);
    }
    c.args(extra);
    run(&mut c)
}

/// The runtime features must build without warnings in every combination
/// that matters: none, each alone, all together (`cargo check`, so the
/// dependencies are checked once and shared between the combinations).
fn feature_matrix() -> Result<(), String> {
    for features in [
        "",
        "wasmtime",
        "wasmi",
        "wasm3",
        "wasmtime,wasmi,wasm3",
        "controlplane",
    ] {
        eprintln!("xtask: cargo check, runtime features [{features}]");
        let out = cargo()
            .current_dir(root())
            .args([
                "check",
                "-p",
                "nasp",
                "-p",
                "nasp-cli",
                "--no-default-features",
                "--features",
                features,
            ])
            .output()
            .map_err(|e| format!("cargo check: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning"))
            .collect();
        if !out.status.success() || !warnings.is_empty() {
            eprintln!("{stderr}");
            return Err(format!("features [{features}]: build failed or warned"));
        }
    }
    // The identity crate with the other crypto provider.
    let out = cargo()
        .current_dir(root())
        .args([
            "check",
            "-p",
            "nasp-identity",
            "--no-default-features",
            "--features",
            "ring",
        ])
        .output()
        .map_err(|e| format!("cargo check: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.lines().any(|l| l.starts_with("warning")) {
        eprintln!("{stderr}");
        return Err("nasp-identity with ring: build failed or warned".into());
    }
    Ok(())
}

/// The main job: the embedded control plane (CA + ADS from the example mesh
/// file) on loopback; a workload certificate from it, checked by openssl; the
/// mesh resolved over SotW and Delta; a filter run on every runtime.
fn demo() -> Result<(), String> {
    setup()?;
    build_filters()?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "-q", "-p", "nasp-cli"]))?;
    let nasp = root.join("target/debug/nasp");
    let out = root.join("target/demo");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let root_pem = out.join("root-cert.pem");

    eprintln!("demo: starting the embedded control plane (CA + ADS) with examples/mesh/mesh.yaml");
    let mut cp = Command::new(&nasp)
        .current_dir(&root)
        .args([
            "controlplane",
            "--listen",
            "127.0.0.1:0",
            "--mesh",
            "examples/mesh/mesh.yaml",
            "--root-out",
        ])
        .arg(&root_pem)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nasp controlplane: {e}"))?;
    let result = (|| -> Result<(), String> {
        use std::io::BufRead;
        let mut line = String::new();
        let stdout = cp.stdout.take().ok_or("no stdout")?;
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .split("\"listening\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .ok_or_else(|| format!("unexpected first line: {line}"))?
            .to_string();
        eprintln!("demo: control plane on {addr}");
        let certs = out.join("web");
        run(Command::new(&nasp)
            .args(["ca", "issue", "--ca", &addr, "--root"])
            .arg(&root_pem)
            .args([
                "--spiffe",
                "spiffe://cluster.local/ns/demo/sa/web",
                "--ttl",
                "1h",
                "--out",
            ])
            .arg(&certs))?;
        run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(certs.join("root-cert.pem"))
            .arg(certs.join("cert-chain.pem")))?;
        run(Command::new(&nasp).args([
            "xds",
            "resolve",
            "echo:80",
            "--xds",
            &addr,
            "--namespace",
            "demo",
        ]))?;
        run(Command::new(&nasp).args([
            "xds",
            "resolve",
            "10.10.42.110:12050",
            "--xds",
            &addr,
            "--delta",
        ]))?;
        run(Command::new(&nasp)
            .args([
                "xds",
                "resolve",
                "db:5432",
                "--xds",
                &addr,
                "--namespace",
                "demo",
                "--root",
            ])
            .arg(&root_pem))?;
        let plugin = root.join("target/filters/conformance.wasm");
        let request = root.join("examples/wasm-exec/request.json");
        for rt in ["wasmtime", "wasmi", "wasm3"] {
            run(Command::new(&nasp)
                .args(["wasm", "exec", "--runtime", rt, "--plugin"])
                .arg(&plugin)
                .args(["--config", "demo", "--request"])
                .arg(&request))?;
        }
        Ok(())
    })();
    let _ = cp.kill();
    let _ = cp.wait();
    result?;
    eprintln!("demo: done");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build-filters") => setup().and_then(|()| build_filters()),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        // Regenerates crates/nasp-proto/src/gen (protox, no protoc); the
        // generator is its own workspace so normal builds never compile it.
        Some("codegen") => run(cargo().current_dir(root()).args([
            "run",
            "--manifest-path",
            "xtask/codegen/Cargo.toml",
        ])),
        _ => Err("usage: cargo xtask <setup|build-filters|test|demo|codegen>".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libclang_names_bindgen_loads() {
        for name in [
            "libclang.so",
            "libclang.so.1",
            "libclang.so.14.0.6",
            "libclang-14.so",
            "libclang-14.so.1",
            "libclang-14.0.so.1",
        ] {
            assert!(is_loadable_libclang(name), "{name} should be loadable");
        }
        for name in [
            "libclang-cpp.so",
            "libclang-cpp.so.14",
            "libclang.a",
            "libclangBasic.a",
            "libclang-14.a",
            "libclang.so.",
            "libclang-.so",
            "libclangd.so",
        ] {
            assert!(!is_loadable_libclang(name), "{name} should not count");
        }
    }

    #[test]
    fn a_directory_with_only_libclang_cpp_reads_as_missing() {
        let dir = std::env::temp_dir().join(format!("xtask-libclang-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("libclang-cpp.so.14"), b"").expect("write");
        assert!(!dir_has_libclang(&dir));
        std::fs::write(dir.join("libclang-14.so.1"), b"").expect("write");
        assert!(dir_has_libclang(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
