//! `nasp controlplane` and `nasp ca issue`, run as a user runs them, with
//! `openssl verify` judging what gets written.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn controlplane(dir: &Path, extra: &[&str]) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(["controlplane", "--listen", "127.0.0.1:0", "--root-out"])
        .arg(dir.join("root.pem"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nasp controlplane");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let addr = v["listening"].as_str().expect("address").to_string();
    (Running(child), addr)
}

fn issue(addr: &str, dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(["ca", "issue", "--ca", addr, "--root"])
        .arg(dir.join("root.pem"))
        .arg("--out")
        .arg(dir.join(out))
        .args(extra)
        .output()
        .expect("run nasp ca issue")
}

#[test]
fn issue_writes_istio_layout_that_openssl_verifies() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cp, addr) = controlplane(dir.path(), &["--allow-any-identity"]);
    for (key, out) in [("ecdsa", "ec"), ("rsa", "rsa")] {
        let o = issue(
            &addr,
            dir.path(),
            out,
            &[
                "--spiffe",
                "spiffe://cluster.local/ns/demo/sa/web",
                "--ttl",
                "1h",
                "--key",
                key,
            ],
        );
        assert!(
            o.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(report["spiffe"], "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(report["chain_length"], 2);
        let certs = dir.path().join(out);
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(certs.join("root-cert.pem"))
            .arg(certs.join("cert-chain.pem"))
            .output()
            .expect("openssl");
        assert!(
            verify.status.success(),
            "{key}: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        // The key matches the certificate: openssl derives the same public key.
        let pubkey = |args: &[&str], file: &Path| {
            let o = Command::new("openssl")
                .args(args)
                .arg(file)
                .output()
                .expect("openssl");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            o.stdout
        };
        assert_eq!(
            pubkey(
                &["x509", "-noout", "-pubkey", "-in"],
                &certs.join("cert-chain.pem")
            ),
            pubkey(&["pkey", "-pubout", "-in"], &certs.join("key.pem")),
            "{key}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(certs.join("key.pem"))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the key is private");
        }
    }
}

#[test]
fn token_checking_and_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("tokens"),
        "t1 spiffe://cluster.local/ns/demo/sa/web\n",
    )
    .expect("tokens");
    std::fs::write(dir.path().join("t1"), "t1").expect("token");
    let tokens = dir.path().join("tokens");
    let (_cp, addr) = controlplane(dir.path(), &["--tokens", tokens.to_str().expect("utf-8")]);
    let token = dir.path().join("t1");
    let token = token.to_str().expect("utf-8");
    let ok = issue(
        &addr,
        dir.path(),
        "a",
        &[
            "--spiffe",
            "spiffe://cluster.local/ns/demo/sa/web",
            "--token",
            token,
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let denied = issue(
        &addr,
        dir.path(),
        "b",
        &[
            "--spiffe",
            "spiffe://cluster.local/ns/demo/sa/db",
            "--token",
            token,
        ],
    );
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let bad = issue(
        &addr,
        dir.path(),
        "c",
        &["--spiffe", "spiffe://cluster.local/ns/demo"],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid SPIFFE id"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Runs `nasp controlplane` expecting it to refuse to start.
fn controlplane_refuses(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .arg("controlplane")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nasp controlplane");
    assert!(!out.status.success(), "{args:?} started");
    assert!(out.stdout.is_empty(), "no listening line: {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn without_tokens_the_ca_refuses_every_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cp, addr) = controlplane(dir.path(), &[]);
    let o = issue(
        &addr,
        dir.path(),
        "a",
        &[
            "--spiffe",
            "spiffe://cluster.local/ns/istio-system/sa/istiod",
        ],
    );
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(!dir.path().join("a").exists(), "nothing written");
}

#[test]
fn bad_settings_stop_the_control_plane_with_one_sentence() {
    let dir = tempfile::tempdir().expect("tmp");
    // The development mode never listens beyond loopback.
    let e = controlplane_refuses(&["--listen", "0.0.0.0:0", "--allow-any-identity"]);
    assert!(e.contains("loopback"), "{e}");
    // A token listed twice.
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "t spiffe://cluster.local/ns/demo/sa/web\nt spiffe://cluster.local/ns/demo/sa/db\n",
    )
    .expect("write");
    let e = controlplane_refuses(&[
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        tokens.to_str().expect("utf-8"),
    ]);
    assert!(e.contains("already registered"), "{e}");
    // TTLs that are zero or overflow.
    for ttl in ["0s", "99999999999999999d"] {
        let e = controlplane_refuses(&["--listen", "127.0.0.1:0", "--max-ttl", ttl]);
        assert!(
            e.contains("out of range") || e.contains("too long"),
            "{ttl}: {e}"
        );
    }
    // A CA key that is not the CA certificate's.
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for d in [&a, &b] {
        let o = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=test root",
                "-days",
                "1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
                "-keyout",
            ])
            .arg(d.with_extension("key"))
            .arg("-out")
            .arg(d.with_extension("pem"))
            .output()
            .expect("openssl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let path = |p: std::path::PathBuf| p.to_str().expect("utf-8").to_string();
    let e = controlplane_refuses(&[
        "--listen",
        "127.0.0.1:0",
        "--ca-cert",
        &path(a.with_extension("pem")),
        "--ca-key",
        &path(b.with_extension("key")),
    ]);
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("nasp: ")).collect();
    assert_eq!(lines.len(), 1, "one error line: {e}");
    assert!(lines[0].contains("does not belong"), "{e}");
    assert!(
        !e.contains("acktrace"),
        "no backtrace for a user error: {e}"
    );
}

#[test]
fn a_closed_stdout_is_no_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(["controlplane", "--listen", "127.0.0.1:0", "--root-out"])
        .arg(dir.path().join("root.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nasp controlplane");
    // The reader goes away before the listening line is written.
    drop(child.stdout.take());
    // The root file is written just before that line: wait for it, then
    // give the process time to write the line and fail if it would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("root.pem").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = child.try_wait().expect("wait");
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_none(),
        "still serving, exited with {status:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
