//! Mesh TCP through real sockets on loopback: nasp's inbound listener in
//! each mode against nasp's connector, `curl` and `openssl s_client`, with
//! certificates from the embedded CA; and the hostile cases (silence, a
//! stalled hello, garbage, foreign certificates) costing only themselves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::{KeyAlgorithm, SpiffeId, WorkloadCert, keys};
use nasp_transport::outbound::ALPN_TCP;
use nasp_transport::{InboundConfig, InboundMode, MeshConnector, MeshListener, istio_sni};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

type Watch = watch::Receiver<Option<Arc<WorkloadCert>>>;

fn id(s: &str) -> SpiffeId {
    s.parse().expect("spiffe id")
}

/// A certificate for `who` from `ca`, as a watch and as PEM (chain, key).
fn workload(ca: &CertificateAuthority, who: &str) -> (Watch, String, String) {
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = OffsetDateTime::now_utc();
    let chain_pem = ca
        .issue(
            &id(who),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .expect("issue");
    let chain = chain_pem
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    let key_pem = key.serialize_pem();
    let cert = WorkloadCert::new(
        chain,
        pem_key(key_pem.as_bytes()).expect("key"),
        pem_certs(ca.root_pem().as_bytes()).expect("root"),
    )
    .expect("cert");
    let (tx, rx) = watch::channel(Some(Arc::new(cert)));
    std::mem::forget(tx); // the certificate stays for the test's life
    (rx, chain_pem.concat(), key_pem)
}

/// A listener whose application answers each connection with what it saw:
/// an HTTP response to a `GET`, a line otherwise.
async fn serve(certs: Watch, config: InboundConfig) -> SocketAddr {
    let mut listener = MeshListener::bind("127.0.0.1:0".parse().expect("addr"), certs, config)
        .await
        .expect("listen");
    let addr = listener.local_addr();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                let peer = conn
                    .peer_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "none".into());
                let alpn = conn
                    .alpn
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .unwrap_or_default();
                let mut buf = vec![0u8; 4096];
                let n = conn.stream.read(&mut buf).await.unwrap_or(0);
                let seen = format!(
                    "peer={peer} mtls={} alpn={alpn} first={:02x}",
                    conn.is_mtls(),
                    buf.first().copied().filter(|_| n > 0).unwrap_or(0)
                );
                let reply = if buf[..n].starts_with(b"GET ") {
                    format!(
                        "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{seen}",
                        seen.len()
                    )
                } else {
                    format!("{seen}\n")
                };
                let _ = conn.stream.write_all(reply.as_bytes()).await;
                let _ = conn.stream.shutdown().await;
            });
        }
    });
    addr
}

async fn mtls_call(
    client: &MeshConnector,
    addr: SocketAddr,
    sans: &[String],
) -> Result<String, String> {
    let sni = istio_sni(9000, "", "web.demo.svc.cluster.local");
    let mut tls = client
        .connect(addr, &sni, sans, ALPN_TCP)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn curl(addr: SocketAddr) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--http1.0"])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `openssl s_client`, with a client certificate when `cert` is given;
/// returns what it printed (the server's reply included).
fn s_client(dir: &Path, addr: SocketAddr, cert: Option<(&str, &str)>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-alpn",
        "istio-peer-exchange",
        "-ign_eof",
        "-quiet",
    ]);
    if let Some((chain, key)) = cert {
        std::fs::write(dir.join("chain.pem"), chain).expect("write");
        std::fs::write(dir.join("key.pem"), key).expect("write");
        cmd.arg("-cert").arg(dir.join("chain.pem"));
        cmd.arg("-key").arg(dir.join("key.pem"));
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        let _ = stdin.write_all(b"ping\n");
    }
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

struct Mesh {
    ca: CertificateAuthority,
    server: Watch,
    client: MeshConnector,
}

fn mesh() -> Mesh {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let (server, _, _) = workload(&ca, WEB);
    let (client, _, _) = workload(&ca, CLIENT);
    Mesh {
        ca,
        server,
        client: MeshConnector::new(client),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_gives_the_application_the_peer_id_and_refuses_the_rest() {
    let m = mesh();
    let addr = serve(
        m.server.clone(),
        InboundConfig::new(InboundMode::Strict, "cluster.local"),
    )
    .await;
    let seen = mtls_call(&m.client, addr, &[WEB.to_string()])
        .await
        .expect("mTLS");
    assert_eq!(
        seen,
        format!("peer={CLIENT} mtls=true alpn=istio-peer-exchange first=70\n")
    );
    // One configuration per destination shape, however many connections.
    mtls_call(&m.client, addr, &[WEB.to_string()])
        .await
        .expect("again");
    assert_eq!(m.client.configs_built(), 1);
    // The server is not who the client expects: refused by the client.
    let e = mtls_call(
        &m.client,
        addr,
        &["spiffe://cluster.local/ns/demo/sa/db".into()],
    )
    .await
    .unwrap_err();
    assert!(e.contains("handshake"), "{e}");
    // Plaintext is refused.
    let (ok, out) = tokio::task::spawn_blocking(move || curl(addr))
        .await
        .expect("join");
    assert!(!ok, "plaintext on STRICT: {out}");
    // TLS without a client certificate is refused; with one it is served.
    let dir = tempfile::tempdir().expect("tmp");
    let (_, chain, key) = workload(&m.ca, CLIENT);
    let d = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || s_client(&d, addr, None))
        .await
        .expect("join");
    assert!(!out.contains("peer="), "no client certificate: {out}");
    let d = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || s_client(&d, addr, Some((&chain, &key))))
        .await
        .expect("join");
    assert!(
        out.contains(&format!("peer={CLIENT} mtls=true alpn=istio-peer-exchange")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_mtls_and_plaintext_on_one_port() {
    let m = mesh();
    let addr = serve(
        m.server.clone(),
        InboundConfig::new(InboundMode::Permissive, "cluster.local"),
    )
    .await;
    let (ok, out) = tokio::task::spawn_blocking(move || curl(addr))
        .await
        .expect("join");
    assert!(ok, "{out}");
    assert_eq!(out, "peer=none mtls=false alpn= first=47");
    let seen = mtls_call(&m.client, addr, &[WEB.to_string()])
        .await
        .expect("mTLS");
    assert!(
        seen.starts_with(&format!("peer={CLIENT} mtls=true")),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_passes_bytes_through_untouched() {
    let m = mesh();
    let addr = serve(
        m.server.clone(),
        InboundConfig::new(InboundMode::Disable, "cluster.local"),
    )
    .await;
    let (ok, out) = tokio::task::spawn_blocking(move || curl(addr))
        .await
        .expect("join");
    assert!(ok, "{out}");
    // A TLS client's hello reaches the application as bytes (0x16 first);
    // nothing terminates it, so the client's handshake fails.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    assert_eq!(out, "peer=none mtls=false alpn= first=16\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_a_stalled_hello_and_garbage_cost_only_their_connection() {
    let m = mesh();
    let config = InboundConfig::new(InboundMode::Permissive, "cluster.local")
        .first_bytes_timeout(Duration::from_millis(300))
        .handshake_timeout(Duration::from_millis(300));
    let addr = serve(m.server.clone(), config).await;
    // A client that says nothing, one that stalls in its TLS hello, one that
    // sends garbage that looks like TLS.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(b"\x16\x03\x01\x02\x00\x01")
        .await
        .expect("write");
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage
        .write_all(b"\x16\x03\xff\xff garbage garbage")
        .await
        .expect("write");
    // Meanwhile others are served at once.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        mtls_call(&m.client, addr, &[WEB.to_string()])
            .await
            .expect("served");
        let (ok, out) = tokio::task::spawn_blocking(move || curl(addr))
            .await
            .expect("join");
        assert!(ok, "{out}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "nobody waited on the hostile clients: {:?}",
        started.elapsed()
    );
    // Each hostile connection is closed by the server at its deadline.
    for (name, conn) in [
        ("silent", &mut silent),
        ("stalled", &mut stalled),
        ("garbage", &mut garbage),
    ] {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: still open after its deadline"));
        assert!(
            matches!(r, Ok(0) | Err(_)) || matches!(r, Ok(n) if buf[..n].starts_with(b"\x15")),
            "{name}: closed (or a TLS alert then closed): {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_roots_and_other_trust_domains_are_refused() {
    let m = mesh();
    let addr = serve(
        m.server.clone(),
        InboundConfig::new(InboundMode::Strict, "cluster.local"),
    )
    .await;
    // A client certificate from another CA.
    let other = CertificateAuthority::generate("cluster.local").expect("ca");
    let (foreign, _, _) = workload(&other, CLIENT);
    let e = mtls_call(&MeshConnector::new(foreign), addr, &[]).await;
    assert!(e.is_err(), "foreign root accepted: {e:?}");
    // A client of another trust domain, signed by the same CA.
    let (stranger, _, _) = workload(&m.ca, "spiffe://evil.example/ns/demo/sa/client");
    let e = mtls_call(&MeshConnector::new(stranger), addr, &[WEB.to_string()]).await;
    assert!(e.is_err(), "other trust domain accepted: {e:?}");
    // The listener still serves the mesh.
    mtls_call(&m.client, addr, &[WEB.to_string()])
        .await
        .expect("served");
}

/// Dropping a listener closes its socket from the runtime, a moment
/// later; `socket_closed` resolves once it has, and the port can be bound
/// again at once (the C ABI's `nasp_listener_close` waits on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_closed_resolves_once_the_port_is_free() {
    let m = mesh();
    for _ in 0..20 {
        let listener = MeshListener::bind(
            "127.0.0.1:0".parse().expect("addr"),
            m.server.clone(),
            InboundConfig::new(InboundMode::Strict, "cluster.local"),
        )
        .await
        .expect("bind");
        let addr = listener.local_addr();
        let closed = listener.socket_closed();
        drop(listener);
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the socket closes");
        std::net::TcpListener::bind(addr).expect("the port is free again");
    }
}
