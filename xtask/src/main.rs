//! `cargo xtask <command>`: the one entry point for chores. No dependencies,
//! so it builds in a second on a fresh machine.
//!
//! - `setup`: installs what the build needs and the machine may lack: the
//!   `wasm32-wasip1` and `wasm32-unknown-unknown` targets (rustup), libclang
//!   (apt, for wasm3's bindings), openssl (apt, for the interop tests),
//!   prometheus, curl and valgrind (apt, for the metrics, listener and C
//!   tests); and the tools of the checks: cargo-deny and cargo-fuzz (`cargo
//!   install --locked`) and a nightly toolchain (rustup, for libFuzzer).
//! - `build-filters`: builds every crate under `filters/` for both targets
//!   (release, with the source paths remapped so the bytes do not depend on
//!   the machine) and copies the modules to `target/filters/`. With
//!   `--update`, also copies the default chain's modules (metadata-exchange,
//!   istio-stats) to `crates/nasp/filters/`, which the library embeds; with
//!   `--check`, fails if those copies differ from the modules just built.
//! - `lint`: rustfmt (`--check`), clippy on every target with `-D warnings`
//!   (the lint set is `[workspace.lints]` in `Cargo.toml`), and cargo-deny
//!   (bans, licenses, sources, advisories) against the offline RustSec
//!   snapshot in `../shared/advisory-db`. Runs all three, then fails if any
//!   did.
//! - `fuzz [SECS]`: builds the cargo-fuzz targets of `fuzz/` and runs each
//!   for SECS seconds (default 30); fails on a crash, whose input is left in
//!   `fuzz/artifacts/<target>/`. See `docs/fuzzing.md`.
//! - `test`: setup, lint, the check that the C header is in step (as
//!   `ffi-header --check`), build-filters and the check that the embedded
//!   filters are in step (as `build-filters --check`), the runtime feature matrix (`cargo
//!   check`, no warnings allowed), doc tests, the workspace tests (nextest if
//!   installed, else `cargo test`), `cross aarch64-unknown-linux-gnu`,
//!   then every fuzz target for 30 s. This is
//!   the command CI runs; each stage prints how long it took.
//! - `demo`: the embedded control plane, a certificate, xDS lookups and a
//!   filter on every runtime (see `demo()`).
//! - `bench`: builds the filters and runs the criterion benches recorded in
//!   `docs/benchmarks.md` (proxy-wasm host, the default telemetry chain,
//!   identity, xDS, balancing, policy layers) with the settings given
//!   there; `bench telemetry` / `bench policy` run only that one (criterion
//!   arguments after it). `bench transport` runs only the transport
//!   benchmark (nasp's mesh HTTP path against a plain hyper + rustls pair,
//!   and the idle RSS of a `Mesh` per runtime); arguments after
//!   `transport` go to it (`--warm S --measure S --rounds N --no-rss
//!   --rss-only`). `bench telemetry --instructions [CASE...]` counts the
//!   telemetry cases' instructions per request under callgrind instead
//!   (machine-independent; see `telemetry_instructions`). Neither is part of `test`: numbers from a shared CI
//!   machine would be noise, and they take minutes.
//! - `codegen`: regenerates the checked-in protobuf code.
//! - `cross <target>` (`aarch64-unknown-linux-gnu`): installs the target
//!   and Debian's cross compiler, libc and qemu-user if missing, builds
//!   `nasp-ffi` for it with the interpreters (wasmi, wasm3), compiles the C
//!   examples with the cross compiler and runs them under qemu-user
//!   against the host's test fixture on loopback (docs/edge-targets.md).
//! - `ffi-sizes <host|target> <features>...`: the C library's size per
//!   runtime set under `[profile.ffi-size]` (minutes each; not in `test`).
//! - `ffi-header [--update|--check]`: generates the C header
//!   `crates/nasp-ffi/include/nasp.h` with cbindgen (its own workspace,
//!   `xtask/cbindgen/`, because cbindgen's MPL-2.0 license is not allowed in
//!   the main graph); `--update` writes it, `--check` (the default) fails if
//!   the checked-in one differs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

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

/// What the build and the demo need.
fn setup_build() -> Result<(), String> {
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
    let has = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    // Debian's `prometheus` package has both: promtool checks the metrics
    // text, the server scrapes two workloads in crates/nasp/tests/prometheus.rs.
    if !has("promtool", "--version") || !has("prometheus", "--version") {
        eprintln!("xtask: promtool or prometheus not found (the metrics tests run them)");
        apt_packages.push("prometheus");
    }
    if !has("curl", "--version") {
        eprintln!("xtask: curl not found (the listener tests run it)");
        apt_packages.push("curl");
    }
    // The C tests run examples/c under memcheck (crates/nasp-ffi/tests/c_example.rs)
    // and fail, naming this package, when it is missing.
    if !has("valgrind", "--version") {
        eprintln!("xtask: valgrind not found (the C tests run the examples under it)");
        apt_packages.push("valgrind");
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

/// Everything: what the build needs, and the tools of `lint` and `fuzz`.
fn setup() -> Result<(), String> {
    setup_build()?;
    ensure_cargo_tool("deny", "cargo-deny")?;
    ensure_nightly()?;
    ensure_cargo_tool("fuzz", "cargo-fuzz")?;
    ensure_grpcio()
}

/// The `grpcio` release the Python interop test
/// (`crates/nasp-transport/tests/grpc_interop.rs`) runs against.
const GRPCIO: &str = "grpcio==1.76.0";

/// Installs Python's `grpcio` from PyPI with pip when `import grpc` fails.
fn ensure_grpcio() -> Result<(), String> {
    let present = Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    timed(&format!("install {GRPCIO}"), || {
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", GRPCIO]))
    })
    .map_err(|e| {
        format!(
            "the gRPC interop test needs Python's grpcio (`python3 -m pip install '{GRPCIO}'`): {e}"
        )
    })
}

/// Runs `f` and prints how long it took, so that CI logs show where the time
/// goes (`docs/ci.md` records the numbers).
fn timed<T>(stage: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    let r = f();
    let outcome = if r.is_ok() { "done" } else { "FAILED" };
    eprintln!(
        "xtask: stage {stage} {outcome} in {:.0} s{}",
        start.elapsed().as_secs_f64(),
        free_disk()
            .map(|f| format!(", {f} free"))
            .unwrap_or_default()
    );
    r
}

/// The space left on the file system of the working directory, as `df`
/// prints it (`12G`), so that a CI log shows which stage used the disk: a
/// fresh-clone run once died of a full disk in the tests stage.
fn free_disk() -> Option<String> {
    let out = Command::new("df")
        .args(["-h", "--output=avail", "."])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().nth(1).map(|l| l.trim().to_string())
}

/// Installs `cargo <sub>` from crates.io (`cargo install --locked <krate>`)
/// when `cargo <sub> --version` does not run.
fn ensure_cargo_tool(sub: &str, krate: &str) -> Result<(), String> {
    let present = cargo()
        .args([sub, "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: cargo {sub} not found, installing {krate} (a few minutes, once)");
    timed(&format!("install {krate}"), || {
        run(cargo().args(["install", "--locked", krate]))
    })
}

/// The nightly toolchain cargo-fuzz builds with (it passes nightly-only
/// compiler flags).
fn ensure_nightly() -> Result<(), String> {
    let present = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    timed("install nightly", || {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
    })
    .map_err(|e| {
        format!(
            "the fuzz targets need a nightly toolchain (`rustup toolchain install nightly`): {e}"
        )
    })
}

/// The directory cargo-deny opens for the default RustSec database under
/// its `db-path`: the URL's last segment and a hash of the URL
/// (`url_to_db_path` in cargo-deny).
const ADVISORY_DB_DIR: &str = "advisory-db-3157b0e258782691";

/// Copies the RustSec snapshot that sits beside the clone
/// (`../shared/advisory-db`, or `NASP_ADVISORY_DB`) to where deny.toml's
/// `db-path` points, as the git repository cargo-deny expects. A fresh copy
/// every time: it takes a second and a newer snapshot is never shadowed.
fn prepare_advisory_db(root: &Path) -> Result<(), String> {
    let src = std::env::var_os("NASP_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/advisory-db"));
    if !src.join("crates").is_dir() {
        return Err(format!(
            "no RustSec advisory database at {}: cargo-deny runs offline against a copy of \
             rustsec/advisory-db there (or where NASP_ADVISORY_DB points)",
            src.display()
        ));
    }
    let dbs = root.join("target/advisory-dbs");
    let db = dbs.join(ADVISORY_DB_DIR);
    if db.exists() {
        std::fs::remove_dir_all(&db).map_err(|e| format!("{}: {e}", db.display()))?;
    }
    copy_tree(&src, &db)?;
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&db)
            .args(["-c", "user.name=xtask", "-c", "user.email=xtask@localhost"])
            .args(args)
            .output()
            .map_err(|e| format!("git: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "git {args:?} in {}: {}",
                db.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "RustSec advisory-db snapshot"])?;
    eprintln!(
        "xtask: advisory database {} -> {}",
        src.display(),
        db.display()
    );
    Ok(())
}

/// Copies a directory tree. Contents only: the snapshot is read-only and a
/// copy that kept its modes could not be removed again.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_name() == ".git" {
            continue;
        }
        let ty = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", src.display()))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            let data = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
            std::fs::write(&dst, data).map_err(|e| format!("{}: {e}", dst.display()))?;
        }
    }
    Ok(())
}

/// rustfmt, clippy and cargo-deny. All three run; the error names each one
/// that failed.
fn lint() -> Result<(), String> {
    let root = root();
    let mut failed = Vec::new();
    let fmt = timed("lint: rustfmt", || {
        // The workspace, and the workspaces of our own beside it (the fuzz
        // targets, the protobuf code generator, the C header generator). Not `--all` there: that would
        // also check their path dependencies, the workspace crates again.
        run(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
        for manifest in [
            "fuzz/Cargo.toml",
            "xtask/codegen/Cargo.toml",
            "xtask/cbindgen/Cargo.toml",
        ] {
            run(cargo()
                .current_dir(&root)
                .args(["fmt", "--check", "--manifest-path", manifest]))?;
        }
        Ok(())
    });
    if fmt.is_err() {
        failed.push("rustfmt (`cargo fmt --all` fixes it)");
    }
    let clippy = timed("lint: clippy", || {
        // `--keep-going`: a crate with a warning (an error under `-D`) does
        // not stop the crates that do not depend on it from being linted, so
        // one run reports as much as it can.
        run(cargo().current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--keep-going",
            "--",
            "-D",
            "warnings",
        ]))
    });
    if clippy.is_err() {
        failed.push("clippy");
    }
    let deny = timed("lint: cargo-deny", || {
        ensure_cargo_tool("deny", "cargo-deny")?;
        // cargo-deny reads the metadata of every package, for every target:
        // fetch them while online, then check offline (the advisory database
        // cannot be fetched on these machines).
        run(cargo().current_dir(&root).args(["fetch", "--locked"]))?;
        prepare_advisory_db(&root)?;
        run(cargo()
            .current_dir(&root)
            .args(["deny", "--locked", "--offline", "check"]))
    });
    if deny.is_err() {
        failed.push("cargo-deny");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("lint failed: {}", failed.join(", ")))
    }
}

/// The fuzz targets of `fuzz/` (see `docs/fuzzing.md`).
const FUZZ_TARGETS: [&str; 6] = [
    "pairs",
    "host_calls",
    "module_info",
    "xds_view",
    "config_dump",
    "wasm3_instrument",
];

/// Build flags shared by `fuzz build` and `fuzz run` (a `run` with other
/// flags would rebuild). No sanitizer: the code under test is safe Rust (the
/// workspace denies `unsafe_code` outside the runtime glue, which no target
/// reaches), so ASan would find nothing there and halve the executions;
/// panics, overflow (debug assertions are on), timeouts and OOMs are what the
/// targets look for.
const FUZZ_BUILD_FLAGS: [&str; 2] = ["--sanitizer", "none"];

/// `cargo +nightly` through rustup, with the variables of the outer (stable)
/// cargo removed so that they do not leak into the nightly build.
fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

/// What libFuzzer reported at the end of a run.
#[derive(Debug, Default, PartialEq)]
struct FuzzStats {
    runs: u64,
    execs_per_sec: u64,
    coverage: u64,
    corpus_units: u64,
    corpus_size: String,
}

/// Reads the last status line (`#1234 DONE cov: 56 ft: 78 corp: 9/1024b
/// ... exec/s: 41 rss: 50Mb`) and the final stats (`stat::...: N`).
fn parse_fuzz_stats(log: &str) -> FuzzStats {
    let mut s = FuzzStats::default();
    let field = |line: &str, key: &str| -> Option<String> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key)?;
        words.next().map(str::to_string)
    };
    if let Some(line) = log
        .lines()
        .rfind(|l| l.starts_with('#') && l.contains(" corp: "))
    {
        s.coverage = field(line, "cov:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if let Some(corp) = field(line, "corp:") {
            let (units, size) = corp.split_once('/').unwrap_or((&corp, ""));
            s.corpus_units = units.parse().unwrap_or(0);
            s.corpus_size = size.to_string();
        }
        s.execs_per_sec = field(line, "exec/s:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    for line in log.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.runs = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            s.execs_per_sec = v.trim().parse().unwrap_or(s.execs_per_sec);
        }
    }
    s
}

fn fuzz(secs: u64) -> Result<(), String> {
    let root = root();
    let dir = root.join("fuzz");
    ensure_nightly()?;
    ensure_cargo_tool("fuzz", "cargo-fuzz")?;
    timed("fuzz: build", || {
        run(nightly_cargo()
            .current_dir(&dir)
            .args(["fuzz", "build"])
            .args(FUZZ_BUILD_FLAGS))
    })?;
    let mut table = Vec::new();
    let mut crashed = Vec::new();
    for target in FUZZ_TARGETS {
        // New inputs go to the first directory (kept between runs, ignored by
        // git); the seeds are read only.
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let mut c = nightly_cargo();
        c.current_dir(&dir)
            .args(["fuzz", "run"])
            .args(FUZZ_BUILD_FLAGS)
            .arg(target)
            .arg(&corpus);
        let seeds = dir.join("seeds").join(target);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.args([
            "--",
            &format!("-max_total_time={secs}"),
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
        eprintln!("xtask: fuzzing {target} for {secs} s");
        let start = Instant::now();
        let out = c
            .output()
            .map_err(|e| format!("cargo fuzz run {target}: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stats = parse_fuzz_stats(&log);
        eprintln!(
            "xtask: {target}: {} runs, {} exec/s, cov {}, corpus {} units / {} in {:.0} s",
            stats.runs,
            stats.execs_per_sec,
            stats.coverage,
            stats.corpus_units,
            stats.corpus_size,
            start.elapsed().as_secs_f64()
        );
        if !out.status.success() {
            // The libFuzzer report: the panic, then the input's path and the
            // command that reproduces it.
            let lines: Vec<&str> = log.lines().collect();
            if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
                for line in lines.iter().skip(at).take(8) {
                    eprintln!("  {line}");
                }
            }
            for line in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("  {line}");
            }
            crashed.push(target);
        }
        table.push((target, stats));
    }
    eprintln!("xtask: fuzz summary ({secs} s each)");
    eprintln!(
        "  {:<18} {:>10} {:>8} {:>7} {:>14}",
        "target", "runs", "exec/s", "cov", "corpus"
    );
    for (target, s) in &table {
        eprintln!(
            "  {:<18} {:>10} {:>8} {:>7} {:>14}",
            target,
            s.runs,
            s.execs_per_sec,
            s.coverage,
            format!("{}/{}", s.corpus_units, s.corpus_size)
        );
    }
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/<target>/; reproduce with \
             `cargo +nightly fuzz run --sanitizer none <target> <input>` in fuzz/)",
            crashed.join(", ")
        ))
    }
}

/// Every filter is built for both targets the Rust SDK supports; the
/// wasip1 build keeps the crate's name, the other gets a suffix.
const FILTER_TARGETS: [(&str, &str); 2] = [
    ("wasm32-wasip1", ""),
    ("wasm32-unknown-unknown", "-unknown"),
];

/// The filters the `nasp` library embeds as every `Mesh`'s default chain
/// (`crates/nasp/src/filters.rs`): their wasip1 builds are checked in under
/// [`EMBEDDED_DIR`], so that a normal `cargo build` needs no wasm toolchain.
const EMBEDDED_FILTERS: [&str; 2] = ["metadata-exchange", "istio-stats"];

/// Where the embedded copies live, from the workspace root.
const EMBEDDED_DIR: &str = "crates/nasp/filters";

/// Flags that make a filter build the same bytes on any machine: rustc
/// writes the source paths of dependencies into panic locations, and those
/// sit under `CARGO_HOME` (`/root/.cargo/registry/src/index.crates.io-
/// <hash>/proxy-wasm-0.2.5/src/...`); the standard library's are already
/// `/rustc/<commit>/`, and the workspace's own are relative. Each registry
/// source directory becomes `/cargo/registry/<name>`, the filters
/// directory `/nasp/filters`. The same toolchain is still needed: another
/// rustc generates other code.
fn reproducible_rustflags(filters: &Path) -> String {
    let mut flags = Vec::new();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        // rustc applies the last prefix that matches: the general one first.
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
        for sub in ["registry/src", "git/checkouts"] {
            let dir = home.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for path in names {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                // `index.crates.io-1949cf8c6b5b557f`: the hash is cargo's,
                // not the source's, so it is dropped.
                let name = name.split_once('-').map_or(&*name, |(n, _)| n).to_string();
                flags.push(format!(
                    "--remap-path-prefix={}=/cargo/{sub}/{name}",
                    path.display()
                ));
            }
        }
    }
    flags.push(format!(
        "--remap-path-prefix={}=/nasp/filters",
        filters.display()
    ));
    // CARGO_ENCODED_RUSTFLAGS: one flag per 0x1f-separated field, so paths
    // with spaces survive; it also wins over a RUSTFLAGS of the caller's.
    flags.join("\x1f")
}

fn build_filters() -> Result<(), String> {
    let root = root();
    let filters = root.join("filters");
    let out = root.join("target").join("filters");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let rustflags = reproducible_rustflags(&filters);
    for (target, suffix) in FILTER_TARGETS {
        run(cargo()
            .current_dir(&filters)
            .env("CARGO_ENCODED_RUSTFLAGS", &rustflags)
            .env_remove("RUSTFLAGS")
            .args(["build", "--release", "--locked", "--target", target]))?;
        let built = filters.join("target").join(target).join("release");
        let entries = std::fs::read_dir(&built).map_err(|e| format!("{}: {e}", built.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                // Cargo names a cdylib after its crate with `_`; the
                // modules keep the crate's name (`metadata-exchange.wasm`).
                let stem = path
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .replace('_', "-");
                let to = out.join(format!("{stem}{suffix}.wasm"));
                std::fs::copy(&path, &to).map_err(|e| format!("copy {}: {e}", path.display()))?;
                eprintln!("xtask: {}", to.display());
            }
        }
    }
    Ok(())
}

/// The filters' shared code (`filters/peer-metadata`: the metadata
/// encodings, the configuration parsing) has unit tests that run natively;
/// the filters themselves are tested through the host.
fn filter_unit_tests() -> Result<(), String> {
    run(cargo().current_dir(root().join("filters")).args([
        "test",
        "--locked",
        "-p",
        "peer-metadata",
    ]))
}

/// Compares the embedded copies with the modules just built
/// (`target/filters/`); with `update`, copies the built ones over those
/// that differ. Fails, naming each file, when a copy is out of step and
/// `update` is not set.
fn embedded_filters(update: bool) -> Result<(), String> {
    let root = root();
    let mut stale = Vec::new();
    for name in EMBEDDED_FILTERS {
        let built = root.join("target/filters").join(format!("{name}.wasm"));
        let embedded = root.join(EMBEDDED_DIR).join(format!("{name}.wasm"));
        let new = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
        let old = std::fs::read(&embedded).ok();
        if old.as_deref() == Some(new.as_slice()) {
            eprintln!(
                "xtask: {} is in step with filters/{name}",
                embedded.display()
            );
            continue;
        }
        if update {
            std::fs::write(&embedded, &new).map_err(|e| format!("{}: {e}", embedded.display()))?;
            eprintln!(
                "xtask: {} updated ({} -> {} bytes)",
                embedded.display(),
                old.map_or(0, |o| o.len()),
                new.len()
            );
        } else {
            stale.push(format!(
                "{EMBEDDED_DIR}/{name}.wasm ({} bytes checked in, {} built from filters/{name})",
                old.map_or_else(|| "none".to_string(), |o| o.len().to_string()),
                new.len()
            ));
        }
    }
    if stale.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the embedded default filters are out of step with their sources: {}. \
             Run `cargo xtask build-filters --update` and commit the result \
             (the same rustc as CI's is needed for the same bytes; docs/telemetry.md)",
            stale.join("; ")
        ))
    }
}

/// Generates the C header with `xtask/cbindgen` (built once into
/// `xtask/cbindgen/target`, about 25 s; later runs take a second) and
/// writes it (`update`) or fails if the checked-in one differs.
fn ffi_header(update: bool) -> Result<(), String> {
    run(cargo().current_dir(root()).args([
        "run",
        "--quiet",
        "--locked",
        "--manifest-path",
        "xtask/cbindgen/Cargo.toml",
        "--",
        if update { "--update" } else { "--check" },
    ]))
    .map_err(|e| {
        if update {
            e
        } else {
            format!(
                "{e}: crates/nasp-ffi/include/nasp.h is not what cbindgen generates from \
                 crates/nasp-ffi/src; run `cargo xtask ffi-header --update` and commit it"
            )
        }
    })
}

/// A target `cargo xtask cross` builds the C library for and runs the C
/// examples on, under qemu-user (docs/edge-targets.md).
struct CrossTarget {
    triple: &'static str,
    /// Debian's cross tools' prefix (`<prefix>-gcc`, `<prefix>-ar`); their
    /// sysroot is `/usr/<prefix>`.
    prefix: &'static str,
    /// The qemu-user binary that runs the target's programs.
    qemu: &'static str,
    /// Debian packages: the cross compiler, the target's libc, qemu-user.
    apt: [&'static str; 3],
}

const CROSS_TARGETS: [CrossTarget; 1] = [CrossTarget {
    triple: "aarch64-unknown-linux-gnu",
    prefix: "aarch64-linux-gnu",
    qemu: "qemu-aarch64",
    apt: [
        "gcc-aarch64-linux-gnu",
        "libc6-dev-arm64-cross",
        "qemu-user",
    ],
}];

/// The runtimes a cross build carries: the interpreters, which every
/// edge target allows (iOS forbids a JIT; Cranelift has no 32-bit ARM).
const CROSS_FEATURES: &str = "wasmi,wasm3";

/// The C examples the cross test runs (each `examples/c/<name>.c`).
const CROSS_EXAMPLES: [&str; 3] = ["http", "tcp", "bad_args"];

fn has_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs what `t` needs and is missing: its rustup target and Debian's
/// cross compiler, libc and qemu-user (apt, as root or through sudo).
fn ensure_cross(t: &CrossTarget) -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == t.triple)
    {
        run(Command::new("rustup").args(["target", "add", t.triple]))?;
    }
    let gcc = format!("{}-gcc", t.prefix);
    let libc = PathBuf::from(format!("/usr/{}/include/stdio.h", t.prefix));
    if has_tool(&gcc) && has_tool(t.qemu) && libc.is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the {} cross toolchain ({})",
        t.triple,
        t.apt.join(", ")
    );
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut c = if root_user {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    apt(&["update", "-qq"])?;
    // No recommends: qemu-user-binfmt would need binfmt_misc, and the
    // programs are started through qemu explicitly.
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(t.apt);
    apt(&install)?;
    if !has_tool(&gcc) || !has_tool(t.qemu) {
        return Err(format!("{gcc} or {} still missing after apt", t.qemu));
    }
    Ok(())
}

/// The cargo environment of a cross build for `t`: Debian's linker, C
/// compiler and archiver, qemu as the runner, and the sysroot for wasm3's
/// bindgen.
fn cross_env(c: &mut Command, t: &CrossTarget) {
    let upper = t.triple.to_uppercase().replace('-', "_");
    let lower = t.triple.replace('-', "_");
    c.env(
        format!("CARGO_TARGET_{upper}_LINKER"),
        format!("{}-gcc", t.prefix),
    )
    .env(
        format!("CARGO_TARGET_{upper}_RUNNER"),
        format!("{} -L /usr/{}", t.qemu, t.prefix),
    )
    .env(format!("CC_{lower}"), format!("{}-gcc", t.prefix))
    .env(format!("AR_{lower}"), format!("{}-ar", t.prefix))
    .env(
        format!("BINDGEN_EXTRA_CLANG_ARGS_{lower}"),
        format!("--sysroot=/usr/{}", t.prefix),
    );
}

/// `cargo xtask cross <target>`: builds `nasp-ffi` (debug, with the
/// interpreters) for the target, compiles the C examples with the cross
/// compiler, and runs them under qemu-user against the host test fixture
/// on loopback (`crates/nasp-ffi/tests/c_example.rs`,
/// `the_c_examples_run_on_another_architecture_under_qemu`).
fn cross(args: &[String]) -> Result<(), String> {
    let known: Vec<&str> = CROSS_TARGETS.iter().map(|t| t.triple).collect();
    let Some(t) = args
        .first()
        .and_then(|a| CROSS_TARGETS.iter().find(|t| t.triple == a.as_str()))
    else {
        return Err(format!(
            "usage: cargo xtask cross <target>, one of: {}",
            known.join(", ")
        ));
    };
    timed(&format!("cross: toolchain for {}", t.triple), || {
        ensure_cross(t)
    })?;
    timed(&format!("cross: nasp-ffi for {}", t.triple), || {
        let mut c = cargo();
        c.current_dir(root()).args([
            "build",
            "-p",
            "nasp-ffi",
            "--target",
            t.triple,
            "--no-default-features",
            "--features",
            CROSS_FEATURES,
        ]);
        cross_env(&mut c, t);
        run(&mut c)
    })?;
    let lib_dir = root().join("target").join(t.triple).join("debug");
    let bin_dir = lib_dir.join("c-examples");
    std::fs::create_dir_all(&bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    for name in CROSS_EXAMPLES {
        run(Command::new(format!("{}-gcc", t.prefix))
            .current_dir(root())
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
            .arg("-Icrates/nasp-ffi/include")
            .arg(format!("examples/c/{name}.c"))
            .arg("-L")
            .arg(&lib_dir)
            .arg("-lnasp_ffi")
            .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
            .arg("-o")
            .arg(bin_dir.join(name)))?;
    }
    timed(&format!("cross: the C examples under {}", t.qemu), || {
        run(cargo()
            .current_dir(root())
            .args([
                "test",
                "-p",
                "nasp-ffi",
                "--test",
                "c_example",
                "--",
                "--ignored",
                "--exact",
                "the_c_examples_run_on_another_architecture_under_qemu",
            ])
            .env(
                "NASP_FFI_CROSS_RUNNER",
                format!("{} -L /usr/{}", t.qemu, t.prefix),
            )
            .env("NASP_FFI_CROSS_BIN", &bin_dir))
    })
}

/// `cargo xtask ffi-sizes <target> <features>...`: builds `nasp-ffi`
/// under `[profile.ffi-size]` (fat LTO, one codegen unit, `opt-level =
/// "s"`, stripped) for `target` (`host` or a cross target) with each
/// runtime set (`wasmi`, `wasmi,wasm3`, ...) and prints a Markdown row per
/// set: the shared library, it gzipped (`gzip -9`), and the static
/// library. Minutes per set; not part of `test` (docs/edge-targets.md).
fn ffi_sizes(args: &[String]) -> Result<(), String> {
    let (Some(target), sets) = (args.first(), args.get(1..).unwrap_or_default()) else {
        return Err("usage: cargo xtask ffi-sizes <host|target> <features>...".into());
    };
    if sets.is_empty() {
        return Err("name at least one runtime set, e.g. wasmi,wasm3".into());
    }
    let cross = CROSS_TARGETS.iter().find(|t| t.triple == target.as_str());
    if target != "host" && cross.is_none() {
        return Err(format!("{target} is neither host nor a cross target"));
    }
    if let Some(t) = cross {
        ensure_cross(t)?;
    }
    let out_dir = match cross {
        Some(t) => root().join("target").join(t.triple).join("ffi-size"),
        None => root().join("target/ffi-size"),
    };
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let mut rows = Vec::new();
    for features in sets {
        let mut c = cargo();
        c.current_dir(root()).args([
            "build",
            "-p",
            "nasp-ffi",
            "--profile",
            "ffi-size",
            "--no-default-features",
            "--features",
            features,
        ]);
        if let Some(t) = cross {
            c.args(["--target", t.triple]);
            cross_env(&mut c, t);
        }
        timed(&format!("ffi-sizes: {target} [{features}]"), || run(&mut c))?;
        let so = out_dir.join("libnasp_ffi.so");
        let gz = Command::new("gzip")
            .args(["-9", "-c"])
            .arg(&so)
            .output()
            .map_err(|e| format!("gzip: {e}"))?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        rows.push(format!(
            "| {target} | {features} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            mib(size(&so)?),
            mib(gz.stdout.len() as u64),
            mib(size(&out_dir.join("libnasp_ffi.a"))?),
        ));
    }
    println!("| target | runtimes | .so (stripped) | .so, gzip -9 | .a |");
    println!("|---|---|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test` (CI).
const CI_FUZZ_SECS: u64 = 30;

fn test(extra: &[String]) -> Result<(), String> {
    let start = Instant::now();
    timed("setup", setup)?;
    // Lint first: it is the quickest way to fail.
    timed("lint", lint)?;
    timed("ffi header in step", || ffi_header(false))?;
    timed("build-filters", build_filters)?;
    timed("embedded filters in step", || embedded_filters(false))?;
    timed("filter unit tests", filter_unit_tests)?;
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    timed("feature matrix", feature_matrix)?;
    // Doc tests first (nextest does not run them), so that the test summary
    // CI prints last is the one of the real test run.
    if nextest {
        timed("doc tests", || {
            run(cargo()
                .current_dir(root())
                .args(["test", "--workspace", "--doc"]))
        })?;
    }
    let mut c = cargo();
    c.current_dir(root());
    if nextest {
        c.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        c.args(["test", "--workspace", "--no-fail-fast"]);
    }
    c.args(extra);
    timed("tests", || run(&mut c))?;
    // The edge build: the first cross target, under qemu, installing its
    // toolchain when possible; a machine that cannot install it is told so
    // in the log (never a silent pass).
    let edge = &CROSS_TARGETS[0];
    match ensure_cross(edge) {
        Ok(()) => timed("cross", || cross(&[edge.triple.to_string()]))?,
        Err(e) => eprintln!(
            "xtask: stage cross SKIPPED: no {} toolchain, and installing it failed: {e}",
            edge.triple
        ),
    }
    timed("fuzz", || fuzz(CI_FUZZ_SECS))?;
    eprintln!(
        "xtask: test done in {:.1} min",
        start.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
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

/// `cargo xtask bench [transport|policy|telemetry [ARGS]]`: release builds of the
/// benches, run with the settings `docs/benchmarks.md` records (the
/// criterion ones and the policy layers by default).
fn bench(args: &[String]) -> Result<(), String> {
    setup_build()?;
    build_filters()?;
    let root = root();
    if args.first().map(String::as_str) == Some("transport") {
        return run(cargo()
            .current_dir(&root)
            .args(["bench", "-p", "nasp", "--bench", "transport", "--"])
            .args(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("policy") {
        return run(cargo()
            .current_dir(&root)
            .args(["bench", "-p", "nasp-transport", "--bench", "policy", "--"])
            .args(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("telemetry")
        && args.get(1).map(String::as_str) == Some("--instructions")
    {
        return telemetry_instructions(&root, &args[2..]);
    }
    if args.first().map(String::as_str) == Some("telemetry") {
        return run(cargo()
            .current_dir(&root)
            .args(["bench", "-p", "nasp", "--bench", "telemetry", "--"])
            .args(&args[1..]));
    }
    if let Some(other) = args.first() {
        return Err(format!(
            "cargo xtask bench [transport|policy|telemetry [ARGS]]: unknown bench {other:?}"
        ));
    }
    for (package, bench, measure) in [
        ("nasp", "proxywasm", "2"),
        ("nasp", "telemetry", "3"),
        ("nasp-controlplane", "identity", "3"),
        ("nasp-xds", "xds", "3"),
        ("nasp-transport", "balance", "3"),
    ] {
        run(cargo().current_dir(&root).args([
            "bench",
            "-p",
            package,
            "--bench",
            bench,
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            measure,
        ]))?;
    }
    run(cargo()
        .current_dir(&root)
        .args(["bench", "-p", "nasp-transport", "--bench", "policy"]))
}

/// The telemetry bench's cases `bench telemetry --instructions` counts when
/// given none.
const INSTRUCTION_CASES: [&str; 11] = [
    "none",
    "wasmtime/outbound",
    "wasmtime/inbound",
    "wasmtime/pair",
    "wasmtime/noop_x1",
    "wasmi/outbound",
    "wasmi/inbound",
    "wasmi/noop_x1",
    "wasm3/outbound",
    "wasm3/inbound",
    "wasm3/noop_x1",
];

/// `bench telemetry --instructions [CASE...]`: instructions per request of
/// the telemetry bench's cases, counted by callgrind, and each case's cost
/// over `none` in units of `none`. Each case runs twice under callgrind in
/// the bench's plain-loop mode (`NASP_BENCH_ITERS`), 100 and 600 requests,
/// and the difference is divided by 500: set-up (compiling, instantiating,
/// the first request's caches) cancels out. The counts do not depend on
/// the machine's speed, only on the build: `none` repeats within 0.2 %,
/// wasmtime's cases within about 3 %, where times move by 2× between
/// machines (docs/benchmarks.md, "Twelfth session").
fn telemetry_instructions(root: &Path, cases: &[String]) -> Result<(), String> {
    const FEW: u64 = 100;
    const MANY: u64 = 600;
    let exe = bench_executable(root, "nasp", "telemetry")?;
    let cases: Vec<String> = if cases.is_empty() {
        INSTRUCTION_CASES.iter().map(|c| c.to_string()).collect()
    } else {
        cases.to_vec()
    };
    let dir = root.join("target").join("callgrind");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let count = |case: &str, n: u64| -> Result<u64, String> {
        // Only the case's runtime is set up ("none" matches no runtime).
        let runtime = case.split_once('/').map_or("none", |(r, _)| r);
        let out = dir.join(format!("{}.{n}.out", case.replace('/', "_")));
        let log = dir.join(format!("{}.{n}.log", case.replace('/', "_")));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let status = Command::new("valgrind")
            .current_dir(root.join("crates/nasp"))
            .env("NASP_BENCH_ITERS", n.to_string())
            .env("NASP_BENCH_CASE", case)
            .env("NASP_BENCH_RUNTIMES", runtime)
            .arg("--tool=callgrind")
            // Only what runs under the bench's `block_on` (every request):
            // not wasmtime's epoch thread, whose ticks grow with the run's
            // wall time rather than its requests.
            .arg("--collect-atstart=no")
            .arg("--toggle-collect=*block_on*")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&exe)
            .arg("--bench")
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .status()
            .map_err(|e| format!("cannot run valgrind: {e}"))?;
        if !status.success() {
            return Err(format!(
                "{case}: valgrind failed ({status}); see {}",
                log.display()
            ));
        }
        let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("summary: ")
                    .or_else(|| l.strip_prefix("totals: "))
            })
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("{}: no instruction total", out.display()))
    };
    let mut rows: Vec<(String, f64)> = Vec::new();
    for case in &cases {
        let (few, many) = (count(case, FEW)?, count(case, MANY)?);
        let per = many.saturating_sub(few) as f64 / (MANY - FEW) as f64;
        eprintln!("xtask: {case}: {per:.0} instructions per request");
        rows.push((case.clone(), per));
    }
    let none = rows.iter().find(|(c, _)| c == "none").map(|r| r.1);
    println!("| case | instructions per request | (case − none) / none |");
    println!("|---|---|---|");
    for (case, per) in &rows {
        let ratio = match none {
            Some(b) if b > 0.0 && case != "none" => format!("{:.2}", (per - b) / b),
            _ => "".into(),
        };
        println!("| {case} | {per:.0} | {ratio} |");
    }
    Ok(())
}

/// Builds bench `bench` of `package` (release) and returns its executable.
fn bench_executable(root: &Path, package: &str, bench: &str) -> Result<PathBuf, String> {
    let out = cargo()
        .current_dir(root)
        .args([
            "bench",
            "-p",
            package,
            "--bench",
            bench,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building bench {bench} failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let name = format!("\"name\":\"{bench}\"");
    text.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&name))
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + 14..];
            Some(PathBuf::from(&rest[..rest.find('"')?]))
        })
        .ok_or_else(|| format!("cargo named no executable for bench {bench}"))
}

/// The main job: the embedded control plane (CA + ADS from the example mesh
/// file) on loopback; a workload certificate from it, checked by openssl; the
/// mesh resolved over SotW and Delta; a filter run on every runtime.
/// README's main job: set-up, the filters, the `nasp` binary, then
/// `nasp demo` — the embedded control plane, a backend of three replicas
/// and a frontend over mTLS while the mesh changes live (docs/cli.md). It
/// exits non-zero when a phase's expectation fails.
fn demo() -> Result<(), String> {
    setup_build()?;
    build_filters()?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "-q", "-p", "nasp-cli"]))?;
    let nasp = root.join("target/debug/nasp");
    run(Command::new(&nasp).current_dir(&root).arg("demo"))?;
    eprintln!("demo: done");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build-filters") => match args.get(1).map(String::as_str) {
            None => setup_build().and_then(|()| build_filters()),
            Some("--update") => setup_build()
                .and_then(|()| build_filters())
                .and_then(|()| embedded_filters(true)),
            Some("--check") => setup_build()
                .and_then(|()| build_filters())
                .and_then(|()| embedded_filters(false)),
            Some(other) => Err(format!(
                "cargo xtask build-filters [--update|--check]: unknown argument {other:?}"
            )),
        },
        Some("lint") => lint(),
        Some("ffi-header") => match args.get(1).map(String::as_str) {
            None | Some("--check") => ffi_header(false),
            Some("--update") => ffi_header(true),
            Some(other) => Err(format!(
                "cargo xtask ffi-header [--update|--check]: unknown argument {other:?}"
            )),
        },
        Some("fuzz") => match args.get(1).map(|s| s.parse::<u64>()) {
            None => fuzz(CI_FUZZ_SECS),
            Some(Ok(secs)) if secs > 0 => fuzz(secs),
            Some(_) => Err(format!(
                "cargo xtask fuzz [SECS]: {:?} is not a number of seconds",
                args[1]
            )),
        },
        Some("test") => test(&args[1..]),
        Some("demo") => demo(),
        Some("bench") => bench(&args[1..]),
        Some("cross") => cross(&args[1..]),
        Some("ffi-sizes") => ffi_sizes(&args[1..]),
        // Regenerates crates/nasp-proto/src/gen (protox, no protoc); the
        // generator is its own workspace so normal builds never compile it.
        Some("codegen") => run(cargo().current_dir(root()).args([
            "run",
            "--manifest-path",
            "xtask/codegen/Cargo.toml",
        ])),
        _ => Err(
            "usage: cargo xtask <setup|build-filters [--update|--check]|lint|fuzz [SECS]|test|demo|bench [transport|policy|telemetry]|codegen|ffi-header [--update|--check]|cross <target>|ffi-sizes <target> <features>...>"
                .into(),
        ),
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

    #[test]
    fn fuzz_stats_are_read_from_libfuzzer_output() {
        let log = "INFO: Seed: 1\n\
            #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
            #65536\tpulse  cov: 88 ft: 120 corp: 30/2110b lim: 652 exec/s: 21845 rss: 40Mb\n\
            #131072\tDONE   cov: 91 ft: 130 corp: 33/2400b lim: 1300 exec/s: 4369 rss: 41Mb\n\
            Done 131072 runs in 31 second(s)\n\
            stat::number_of_executed_units: 131072\n\
            stat::average_exec_per_sec:     4228\n\
            stat::new_units_added:          32\n";
        assert_eq!(
            parse_fuzz_stats(log),
            FuzzStats {
                runs: 131_072,
                execs_per_sec: 4228,
                coverage: 91,
                corpus_units: 33,
                corpus_size: "2400b".into(),
            }
        );
        assert_eq!(parse_fuzz_stats("no fuzzer here"), FuzzStats::default());
    }
}
