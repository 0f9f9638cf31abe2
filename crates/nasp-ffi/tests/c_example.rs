//! `examples/c/http.c`, `tcp.c` and `bad_args.c`, compiled with the
//! system C compiler against the cdylib and run as their own processes
//! against the embedded control plane and the echo workload of the
//! fixture (127.0.13.0/24 without valgrind, 127.0.14.0/24 for the
//! programs under valgrind and for `bad_args.c`): a C program joins the
//! mesh from a YAML file and makes an mTLS request or a TCP echo in a few
//! lines, and bad arguments give status codes. Each program also runs
//! under valgrind's memcheck (docs/ffi-design.md, section 7.3), which must
//! report zero errors and no definitely or indirectly lost bytes; a
//! missing valgrind fails the test with the package to install, never
//! skips it.

// Only the support module's helpers (its own blocks say why each is
// sound); this file calls the library through the C program.
#![allow(unsafe_code, reason = "the support module calls the C ABI")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{CLIENT_ID, Fixture, SERVER_ID};

/// The directory that holds this test's `libnasp_ffi.so`: cargo builds the
/// library's cdylib beside the test binary (`target/<profile>/deps`), with
/// the features of this build.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the test binary has a directory");
    assert!(
        dir.join("libnasp_ffi.so").is_file(),
        "no libnasp_ffi.so in {}",
        dir.display()
    );
    dir.to_path_buf()
}

/// Compiles `examples/c/<name>.c` into `out`, failing on any warning.
fn compile(name: &str, out: &Path) -> PathBuf {
    let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = krate.join("../../examples/c").join(format!("{name}.c"));
    let exe = out.join(name);
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(krate.join("include"))
        .arg(&src)
        .arg("-L")
        .arg(&lib)
        .arg("-lnasp_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        output.status.success(),
        "{cc} {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Compiles `examples/c/<name>.c` into `out` linked against the
/// staticlib cargo built beside this test (`libnasp_ffi.a`), with the
/// system libraries that `rustc --print native-static-libs` names for a
/// Linux GNU staticlib: the program then needs no `libnasp_ffi.so`.
fn compile_static(name: &str, out: &Path) -> PathBuf {
    let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = krate.join("../../examples/c").join(format!("{name}.c"));
    let exe = out.join(format!("{name}-static"));
    let archive = lib_dir().join("libnasp_ffi.a");
    assert!(archive.is_file(), "no {}", archive.display());
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(krate.join("include"))
        .arg(&src)
        .arg(&archive)
        .args([
            "-Wl,--gc-sections",
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
        ])
        .args(["-lm", "-ldl", "-lc"])
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        output.status.success(),
        "{cc} {} with {}:\n{}",
        src.display(),
        archive.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Runs `cmd`, polling until it exits or `limit` passes (then it is
/// killed and the test fails); returns its stdout.
fn run(cmd: &mut Command, limit: Duration) -> String {
    run_with_status(cmd, limit, |status| status.success())
}

/// As [`run`], with `ok` judging the exit status.
fn run_with_status(
    cmd: &mut Command,
    limit: Duration,
    ok: impl Fn(std::process::ExitStatus) -> bool,
) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the C program");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the C program did not exit in {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(ok(status), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout
}

/// The exit code valgrind uses when it found an error or a gating leak,
/// apart from the program's own codes.
const VALGRIND_ERROR_EXIT: i32 = 99;

/// Where memcheck writes its report on `name`: kept after the test (in
/// cargo's `target/tmp`) so that a passing run's possibly lost and still
/// reachable blocks can be read too.
fn report_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("valgrind-{name}.log"))
}

/// Fails the test when valgrind is not installed, naming the package:
/// the check must not pass by being skipped.
fn require_valgrind() {
    let found = Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "valgrind not found: the C tests run the examples under it; install the \
         Debian package `valgrind` (`apt-get install valgrind`, or `cargo xtask setup`)"
    );
}

/// A command that runs `exe` under memcheck, its report written to
/// `log`. Fails the test when valgrind is not installed.
fn valgrind(exe: &Path, log: &Path) -> Command {
    require_valgrind();
    let supp = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/c/valgrind.supp");
    let mut cmd = Command::new("valgrind");
    // Errors (invalid reads and writes, uninitialised jumps, bad frees)
    // and definitely or indirectly lost bytes gate the exit code; possibly
    // lost blocks are listed and checked from the summary; still
    // reachable ones are process-global caches, not leaks (section 7.3).
    cmd.args([
        "--error-exitcode=99",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect,possible",
        "--errors-for-leak-kinds=definite,indirect",
        "--num-callers=40",
        "--fair-sched=yes",
    ])
    .arg(format!("--log-file={}", log.display()));
    if supp.is_file() {
        cmd.arg(format!("--suppressions={}", supp.display()));
    }
    cmd.arg(exe)
        // A backtrace captured at a caught panic is cached for the
        // process's life (33 MB still reachable, section 7.3).
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

/// Runs a valgrind command (see [`valgrind`]) and checks its report: exit
/// 0, zero errors, nothing definitely or indirectly lost. Returns the
/// program's stdout.
fn run_valgrind(cmd: &mut Command, log: &Path, limit: Duration) -> String {
    let started = Instant::now();
    let stdout = run_with_status(cmd, limit, |status| {
        if status.code() == Some(VALGRIND_ERROR_EXIT) || !status.success() {
            let report = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("valgrind report:\n{report}");
        }
        status.success()
    });
    let report = std::fs::read_to_string(log).expect("valgrind's log");
    eprintln!(
        "under valgrind in {:.1?}; summary:\n{}",
        started.elapsed(),
        report
            .lines()
            .filter(|l| l.contains("SUMMARY") || l.contains("lost:") || l.contains("reachable:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        report.contains("ERROR SUMMARY: 0 errors from 0 contexts"),
        "valgrind found errors:\n{report}"
    );
    let leaks = report.contains("All heap blocks were freed -- no leaks are possible")
        || (report.contains("definitely lost: 0 bytes in 0 blocks")
            && report.contains("indirectly lost: 0 bytes in 0 blocks"));
    assert!(leaks, "valgrind found leaks:\n{report}");
    stdout
}

#[test]
fn the_c_example_joins_from_yaml_and_makes_an_mtls_request() {
    let fx = Fixture::start_on("127.0.13", 1);
    let config = fx.dir.path().join("config.yaml");
    std::fs::write(&config, &fx.config).expect("write the config");
    let exe = compile("http", fx.dir.path());

    let stdout = run(
        Command::new(&exe)
            .arg(&config)
            .arg(fx.url("/from-c"))
            .env_remove("RUST_BACKTRACE"),
        Duration::from_secs(60),
    );
    check_http(&stdout);
}

/// The same program linked statically: no `libnasp_ffi.so` is loaded
/// (`ldd` lists none), and it works.
#[test]
fn the_c_example_links_against_the_staticlib() {
    let fx = Fixture::start_on("127.0.13", 21);
    let config = fx.dir.path().join("config.yaml");
    std::fs::write(&config, &fx.config).expect("write the config");
    let exe = compile_static("http", fx.dir.path());
    let ldd = Command::new("ldd").arg(&exe).output().expect("ldd");
    let deps = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        !deps.contains("nasp_ffi"),
        "links the shared library:\n{deps}"
    );
    let stdout = run(
        Command::new(&exe)
            .arg(&config)
            .arg(fx.url("/from-c"))
            .env_remove("RUST_BACKTRACE"),
        Duration::from_secs(60),
    );
    check_http(&stdout);
}

/// What `http.c` prints after an mTLS POST to the echo: the token file's
/// identity, the server's verified id, and the server saw ours.
fn check_http(stdout: &str) {
    eprintln!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.contains(&format!("id {CLIENT_ID}").as_str()),
        "{stdout}"
    );
    assert!(lines.contains(&"status 200"), "{stdout}");
    assert!(
        lines.contains(&format!("peer {SERVER_ID}").as_str()),
        "{stdout}"
    );
    assert!(
        lines.contains(&format!("header x-peer: {CLIENT_ID}").as_str()),
        "{stdout}"
    );
    assert!(lines.contains(&"body hello from C"), "{stdout}");
}

/// The fixture's config, with the timeouts raised for memcheck (20-50
/// times slower): key generation, the handshakes and filter compilation
/// on wasmi take tens of seconds under it. Only the config's timeouts are
/// raised, never the test's assertions.
fn config_for_valgrind(fx: &Fixture) -> PathBuf {
    let config = fx.dir.path().join("config-valgrind.yaml");
    let text = fx
        .config
        .replace("ready_timeout_ms: 30000", "ready_timeout_ms: 240000");
    assert_ne!(text, fx.config, "the fixture's ready timeout moved");
    std::fs::write(&config, format!("{text}call_timeout_ms: 240000\n")).expect("write the config");
    config
}

#[test]
fn the_c_example_under_valgrind_has_no_errors_and_no_leaks() {
    require_valgrind();
    let fx = Fixture::start_on("127.0.14", 1);
    let config = config_for_valgrind(&fx);
    let exe = compile("http", fx.dir.path());
    let log = report_path("http");

    let stdout = run_valgrind(
        valgrind(&exe, &log).arg(&config).arg(fx.url("/from-c")),
        &log,
        Duration::from_secs(600),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"status 200"), "{stdout}");
    assert!(
        lines.contains(&format!("peer {SERVER_ID}").as_str()),
        "{stdout}"
    );
    assert!(lines.contains(&"body hello from C"), "{stdout}");
}

/// Runs `examples/c/bad_args.c` against a mesh of the fixture's on
/// 127.0.14.`host`; returns its stdout.
fn bad_args(host: u8, under_valgrind: bool) -> String {
    if under_valgrind {
        require_valgrind();
    }
    let fx = Fixture::start_on("127.0.14", host);
    let config = config_for_valgrind(&fx);
    let exe = compile("bad_args", fx.dir.path());
    let url = fx.url("/bad-args");
    let stdout = if under_valgrind {
        let log = report_path("bad_args");
        run_valgrind(
            valgrind(&exe, &log)
                .arg(&config)
                .arg(&url)
                .arg(fx.tcp_target()),
            &log,
            Duration::from_secs(600),
        )
    } else {
        run(
            Command::new(&exe)
                .arg(&config)
                .arg(&url)
                .arg(fx.tcp_target())
                .env_remove("RUST_BACKTRACE"),
            Duration::from_secs(60),
        )
    };
    check_bad_args(&stdout);
    stdout
}

/// `bad_args.c` exits 0 only when every check held; its count proves they
/// ran.
fn check_bad_args(stdout: &str) {
    eprintln!("{stdout}");
    let checks: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("checks "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no check count in:\n{stdout}"));
    assert!(checks >= 100, "only {checks} checks ran:\n{stdout}");
    assert!(stdout.lines().any(|l| l == "failures 0"), "{stdout}");
}

#[test]
fn bad_arguments_from_c_get_status_codes() {
    bad_args(11, false);
}

#[test]
fn bad_arguments_from_c_under_valgrind_have_no_errors_and_no_leaks() {
    bad_args(21, true);
}

/// Runs `examples/c/tcp.c` against a fixture on `net`.`host`; asserts what
/// it printed: the echo's verified id and the echo, the caller's verified
/// id at the listener and the bytes both ways, and the TCP series.
fn tcp_example(net: &str, host: u8, under_valgrind: bool) {
    if under_valgrind {
        require_valgrind();
    }
    let fx = Fixture::start_on(net, host);
    let config = config_for_valgrind(&fx);
    let exe = compile("tcp", fx.dir.path());
    let stdout = if under_valgrind {
        let log = report_path("tcp");
        run_valgrind(
            valgrind(&exe, &log)
                .arg(&config)
                .arg(fx.tcp_target())
                .arg(fx.listen_addr())
                .arg(fx.self_target()),
            &log,
            Duration::from_secs(600),
        )
    } else {
        run(
            Command::new(&exe)
                .arg(&config)
                .arg(fx.tcp_target())
                .arg(fx.listen_addr())
                .arg(fx.self_target())
                .env_remove("RUST_BACKTRACE"),
            Duration::from_secs(60),
        )
    };
    check_tcp(&stdout, &fx);
}

/// What `tcp.c` prints: the echo's verified id and the echo, the caller's
/// verified id at the listener and the bytes both ways, and one opened
/// connection in each destination's series (the echo, and itself).
fn check_tcp(stdout: &str, fx: &Fixture) {
    eprintln!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        format!("echo peer {SERVER_ID}"),
        "echo hello over mesh TCP".to_string(),
        format!("listening {}", fx.listen_addr()),
        format!("accepted peer {CLIENT_ID}"),
        "accepted read ping".to_string(),
        "caller read pong".to_string(),
    ] {
        assert!(lines.contains(&want.as_str()), "no {want:?} in:\n{stdout}");
    }
    for service in ["echo", "c-server"] {
        assert!(
            lines.iter().any(|l| l.starts_with("metric ")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("destination_service_name=\"{service}\""))
                && l.ends_with(" 1")),
            "no opened connection to {service} in:\n{stdout}"
        );
    }
}

#[test]
fn the_c_tcp_example_echoes_and_accepts_over_mtls() {
    tcp_example("127.0.13", 11, false);
}

#[test]
fn the_c_tcp_example_under_valgrind_has_no_errors_and_no_leaks() {
    tcp_example("127.0.14", 31, true);
}

/// The C examples built for another architecture by `cargo xtask cross
/// <target>` (which sets `NASP_FFI_CROSS_RUNNER`, e.g. `qemu-aarch64 -L
/// /usr/aarch64-linux-gnu`, and `NASP_FFI_CROSS_BIN`, the directory of the
/// cross-compiled programs), each run under that emulator against this
/// host's fixture on loopback (qemu-user shares the host's network): the
/// same checks as on the host. Ignored in a plain run, since it needs the
/// cross build; without the variables it fails rather than pass.
#[test]
#[ignore = "run by `cargo xtask cross <target>`, which builds the examples for the target"]
fn the_c_examples_run_on_another_architecture_under_qemu() {
    let runner = std::env::var("NASP_FFI_CROSS_RUNNER")
        .expect("NASP_FFI_CROSS_RUNNER (set by `cargo xtask cross <target>`)");
    let bin = PathBuf::from(
        std::env::var("NASP_FFI_CROSS_BIN")
            .expect("NASP_FFI_CROSS_BIN (set by `cargo xtask cross <target>`)"),
    );
    let mut runner = runner.split_whitespace();
    let emulator = runner.next().expect("a runner");
    let runner_args: Vec<&str> = runner.collect();
    let exe = |name: &str| {
        let exe = bin.join(name);
        // An ELF of another machine: the emulator really ran it.
        let head = std::fs::read(&exe).unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        assert!(
            head.starts_with(b"\x7fELF") && head.len() > 20,
            "{}",
            exe.display()
        );
        let machine = u16::from_le_bytes([head[18], head[19]]);
        assert_ne!(machine, 62, "{} is an x86-64 program", exe.display());
        let mut c = Command::new(emulator);
        c.args(&runner_args).arg(exe).env_remove("RUST_BACKTRACE");
        c
    };
    let fx = Fixture::start_on("127.0.16", 1);
    // Emulated, key generation and wasmi's compilation of the filters take
    // several times longer: the config's timeouts are raised.
    let config = config_for_valgrind(&fx);
    let limit = Duration::from_secs(600);
    check_http(&run(exe("http").arg(&config).arg(fx.url("/from-c")), limit));
    check_tcp(
        &run(
            exe("tcp")
                .arg(&config)
                .arg(fx.tcp_target())
                .arg(fx.listen_addr())
                .arg(fx.self_target()),
            limit,
        ),
        &fx,
    );
    check_bad_args(&run(
        exe("bad_args")
            .arg(&config)
            .arg(fx.url("/bad-args"))
            .arg(fx.tcp_target()),
        limit,
    ));
}
