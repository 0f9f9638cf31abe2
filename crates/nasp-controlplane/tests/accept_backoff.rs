//! A control plane whose process runs out of file descriptors does not spin
//! a core on failing `accept` calls, and serves again once descriptors are
//! back. Alone in its test binary: it lowers the process's own descriptor
//! limit (with util-linux `prlimit`, no unsafe code).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nasp_controlplane::{CertificateAuthority, ControlPlane, ControlPlaneConfig, TokenPolicy};
use nasp_identity::cert::pem_certs;
use nasp_identity::{CaClient, CaClientConfig, KeyAlgorithm, keys};

/// Clock ticks per second of /proc's CPU times.
fn clk_tck() -> u64 {
    String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .parse::<u64>()
    .unwrap_or(100)
}

/// CPU time (user + system) this process has used. Reading /proc needs a
/// descriptor: `stat` is kept open and re-read from the start.
fn cpu_time(stat: &mut std::fs::File, hz: u64) -> Duration {
    use std::io::{Read, Seek};
    let mut text = String::new();
    stat.rewind().expect("rewind");
    stat.read_to_string(&mut text).expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses).
    let rest = &text[text.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 1000 / hz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_back_off_and_the_server_recovers() {
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: None,
        },
    )
    .expect("start");
    // Both opened before descriptors run out.
    let hz = clk_tck();
    let mut stat = std::fs::File::open("/proc/self/stat").expect("/proc/self/stat");

    let open = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
    let limit = open + 32;
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux) is installed");
    assert!(status.success(), "prlimit failed");

    // Use up every descriptor, then give one back for the client's socket:
    // the server's accept then finds none and fails with EMFILE.
    let mut hogs = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hogs.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "EMFILE expected: {e}");
                break;
            }
        }
    }
    hogs.pop();
    let client = std::net::TcpStream::connect(cp.addr()).expect("connect (the kernel queues it)");

    let before = cpu_time(&mut stat, hz);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_time(&mut stat, hz).saturating_sub(before);
    assert!(
        spent < Duration::from_millis(300),
        "failing accepts must back off, not spin: {spent:?} of CPU in 1 s"
    );

    drop(client);
    drop(hogs);
    // Descriptors are back: the CA serves a real request again.
    let mut cfg = CaClientConfig::new(
        cp.addr().to_string(),
        pem_certs(cp.root_pem().as_bytes()).expect("root"),
    );
    cfg.retries = 3;
    let csr = keys::generate_csr(
        &"spiffe://cluster.local/ns/demo/sa/web".parse().expect("id"),
        KeyAlgorithm::EcdsaP256,
    )
    .expect("csr");
    let chain = tokio::time::timeout(
        Duration::from_secs(10),
        CaClient::new(cfg)
            .expect("client")
            .sign(&csr.csr_pem, Duration::from_secs(600)),
    )
    .await
    .expect("served within the backoff")
    .expect("signed");
    assert_eq!(chain.len(), 2);
}
