//! The Python package (`bindings/python`, docs/python.md) against the
//! fixture's embedded control plane and echo workload on 127.0.15.1-3:
//! its pytest suite runs in a venv of its own (`<target>/nasp-ffi-venv`,
//! made with `python3 -m venv` and `pip install -r requirements-test.txt`
//! when missing or when the requirements changed), loading the
//! `libnasp_ffi.so` cargo built beside this test binary. The test fails
//! unless pytest exits 0 having passed at least as many tests as the suite
//! defines, with none failed, skipped or in error: a suite that quietly
//! runs nothing cannot pass.

// Only the support module's helpers (its own blocks say why each is
// sound); this file calls the library through Python.
#![allow(unsafe_code, reason = "the support module calls the C ABI")]

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::{CLIENT_ID, Fixture, SERVER_ID};

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `libnasp_ffi.so` of this build: cargo writes the cdylib beside the
/// test binary (`target/<profile>/deps`), with this build's features.
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe
        .parent()
        .expect("the test binary has a directory")
        .join("libnasp_ffi.so");
    assert!(lib.is_file(), "no {}", lib.display());
    lib
}

/// Runs `cmd` with its output in files under `dir` (a pipe could fill
/// and stall the child while we poll), killing it after `limit`. Returns
/// the exit status and the output, stdout then stderr.
fn run(cmd: &mut Command, dir: &Path, name: &str, limit: Duration) -> (ExitStatus, String) {
    let (out, err) = (
        dir.join(format!("{name}.stdout")),
        dir.join(format!("{name}.stderr")),
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} did not exit in {limit:?}:\n{}\n{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    (status, text)
}

/// The venv with the test requirements, made or remade when it is missing
/// or `requirements-test.txt` differs from the copy kept inside it.
/// Returns its Python.
fn venv(log_dir: &Path) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .to_path_buf();
    let venv = target.join("nasp-ffi-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements-test.txt");
    let wanted = std::fs::read(repo().join("bindings/python/requirements-test.txt"))
        .expect("bindings/python/requirements-test.txt");
    if python.is_file() && std::fs::read(&stamp).ok().as_ref() == Some(&wanted) {
        return python;
    }
    let started = Instant::now();
    if venv.exists() {
        std::fs::remove_dir_all(&venv).expect("remove the old venv");
    }
    let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let (status, out) = run(
        Command::new(&host).args(["-m", "venv"]).arg(&venv),
        log_dir,
        "venv",
        Duration::from_secs(120),
    );
    assert!(
        status.success(),
        "{host} -m venv {}: {status}\n{out}\n(Debian: apt-get install python3-venv)",
        venv.display()
    );
    let (status, out) = run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "-q",
                "-r",
            ])
            .arg(repo().join("bindings/python/requirements-test.txt")),
        log_dir,
        "pip",
        Duration::from_secs(300),
    );
    assert!(status.success(), "pip install: {status}\n{out}");
    // Written last: a failed install is retried next time.
    std::fs::write(&stamp, &wanted).expect("the requirements copy");
    eprintln!("venv made in {:.1?}", started.elapsed());
    python
}

/// How many test functions the suite defines (`def test_...` at the
/// start of a line in `tests/test_*.py`).
fn tests_defined(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("bindings/python/tests")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test_") && n.ends_with(".py"))
        })
        .map(|p| {
            std::fs::read_to_string(&p)
                .expect("a test file")
                .lines()
                .filter(|l| l.starts_with("def test_"))
                .count()
        })
        .sum()
}

/// pytest's closing line (`17 passed in 3.21s`, `1 failed, 16 passed in
/// ...`) as (outcome, count) pairs.
fn summary(out: &str) -> Vec<(String, usize)> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && (l.contains("passed") || l.contains("failed")))
        .or_else(|| out.lines().rev().find(|l| l.contains(" in ")))
        .unwrap_or("");
    let line = line.trim().trim_matches('=').trim();
    let counts = line.rsplit_once(" in ").map_or(line, |(c, _)| c);
    counts
        .split(", ")
        .filter_map(|part| {
            let (n, what) = part.trim().split_once(' ')?;
            Some((what.to_string(), n.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_python_package_passes_its_tests_against_the_mesh() {
    let fx = Fixture::start_on("127.0.15", 1);
    let config = fx.dir.path().join("config.yaml");
    std::fs::write(&config, &fx.config).expect("write the config");
    let python = venv(fx.dir.path());
    let tests = repo().join("bindings/python/tests");
    let defined = tests_defined(&tests);
    assert!(defined >= 20, "only {defined} Python tests found");

    let started = Instant::now();
    let (status, out) = run(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"])
            .arg(&tests)
            .current_dir(repo())
            .env("NASP_LIBRARY", library())
            .env(
                "NASP_TEST_HEADER",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("include/nasp.h"),
            )
            .env("NASP_TEST_CONFIG", &config)
            .env("NASP_TEST_HTTP_URL", fx.url("/py"))
            .env("NASP_TEST_TCP", fx.tcp_target())
            .env("NASP_TEST_LISTEN", fx.listen_addr())
            .env("NASP_TEST_SELF", fx.self_target())
            .env("NASP_TEST_SERVER_ID", SERVER_ID)
            .env("NASP_TEST_CLIENT_ID", CLIENT_ID)
            // No bytecode in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // A backtrace captured at a caught panic stays cached for the
            // process's life (docs/ffi-design.md, section 7.3).
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE"),
        fx.dir.path(),
        "pytest",
        Duration::from_secs(300),
    );
    let took = started.elapsed();
    assert!(status.success(), "pytest: {status}\n{out}");
    let counts = summary(&out);
    let count = |what: &str| {
        counts
            .iter()
            .filter(|(w, _)| w.starts_with(what))
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    assert!(
        count("passed") >= defined,
        "{} passed of {defined} defined ({counts:?})\n{out}",
        count("passed")
    );
    for bad in [
        "failed",
        "skipped",
        "error",
        "xfailed",
        "xpassed",
        "deselected",
    ] {
        assert_eq!(count(bad), 0, "{bad} in pytest's summary {counts:?}\n{out}");
    }
    eprintln!("pytest in {took:.1?}: {counts:?}");
}

#[test]
fn the_summary_parser_reads_pytests_closing_lines() {
    assert_eq!(
        summary("....\n17 passed in 3.21s\n"),
        [("passed".to_string(), 17)]
    );
    assert_eq!(
        summary("F.\n==== 1 failed, 16 passed, 2 skipped in 9.00s ====\n"),
        [
            ("failed".to_string(), 1),
            ("passed".to_string(), 16),
            ("skipped".to_string(), 2)
        ]
    );
    assert_eq!(
        summary("E\n1 passed, 3 errors in 0.50s\n"),
        [("passed".to_string(), 1), ("errors".to_string(), 3)]
    );
    assert!(summary("no tests ran in 0.01s\n").is_empty());
}
