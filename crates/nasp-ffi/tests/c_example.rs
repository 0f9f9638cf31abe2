//! `examples/c/http.c`, compiled with the system C compiler against the
//! cdylib and run as its own process against the embedded control plane
//! and the echo workload of the fixture (127.0.13.1-2): a C program joins
//! the mesh from a YAML file and makes an mTLS request in a few lines.

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

/// Runs `cmd`, polling until it exits or `limit` passes (then it is
/// killed and the test fails); returns its stdout.
fn run(cmd: &mut Command, limit: Duration) -> String {
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
    assert!(
        status.success(),
        "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
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
    eprintln!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    // The token file's identity, the server's verified id, and the server
    // saw ours: mTLS both ways.
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
