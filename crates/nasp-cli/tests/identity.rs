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
    let (_cp, addr) = controlplane(dir.path(), &[]);
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
