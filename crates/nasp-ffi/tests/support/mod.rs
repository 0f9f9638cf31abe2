//! What the FFI tests share: the embedded control plane (a CA with one
//! token per identity, ADS from a mesh file) and an echo workload `Mesh`
//! serving strict mTLS HTTP, both on a tokio runtime of the fixture's
//! own, so the test's thread is a plain thread, as a C caller's is; plus
//! the configuration a C caller would pass, and C-style helpers.

#![allow(dead_code, reason = "each test binary uses part of the support")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::c_char;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use nasp::Mesh;
use nasp::controlplane::mesh::MeshFile;
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::identity::SpiffeId;
use nasp::transport::{Body, MeshPeer};
use nasp::xds::WorkloadSettings;

/// The control plane at `NET.h`, the echo workload at `NET.h+1` (HTTP on
/// 18080, a TCP echo on 19000), and `c-server.demo:19100` at `NET.h+2`,
/// where a test's own mesh may listen (`listen_addr`, `self_target`).
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub cp: ControlPlane,
    pub server: Mesh,
    pub dir: tempfile::TempDir,
    /// The YAML a C caller passes to `nasp_mesh_new`.
    pub config: String,
    /// The address `c-server.demo` has in the mesh.
    listen: String,
    /// The mesh file the control plane serves.
    mesh: String,
    /// The echo workload's address.
    server_ip: String,
    /// Each request body the echo read: its path, and whether it arrived
    /// whole (`false`: the stream was reset or the connection closed).
    pub bodies: Bodies,
}

/// What the echo saw of request bodies.
pub type Bodies = Arc<std::sync::Mutex<Vec<(String, bool)>>>;

pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/c-client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";

impl Fixture {
    /// On 127.0.12.0/24: `host` is the first of two free host numbers
    /// there (the control plane, then the echo workload).
    pub fn start(host: u8) -> Self {
        Self::start_on("127.0.12", host)
    }

    /// As [`Fixture::start`], on the /24 `net` (three octets, e.g.
    /// `"127.0.13"`), for tests that own another share of loopback.
    pub fn start_on(net: &str, host: u8) -> Self {
        let (cp_ip, server_ip) = (format!("{net}.{host}"), format!("{net}.{}", host + 1));
        let listen_ip = format!("{net}.{}", host + 2);
        let mesh = format!(
            r#"
trust_domain: cluster.local
services:
  - name: echo
    namespace: demo
    service_account: echo
    # The name table's address for TCP; nothing dials it.
    vip: 10.96.12.2
    mtls: strict
    ports:
      - {{ port: 18080, protocol: http }}
      - {{ port: 19000, protocol: tcp }}
    endpoints:
      - {{ ip: {server_ip} }}
  - name: c-server
    namespace: demo
    service_account: c-client
    vip: 10.96.12.3
    mtls: strict
    ports:
      - {{ port: 19100, protocol: tcp }}
    endpoints:
      - {{ ip: {listen_ip} }}
"#
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let bodies: Bodies = Arc::default();
        let (cp, server) = rt.block_on(async {
            let id = |sa: &str| SpiffeId::new("cluster.local", "demo", sa).expect("id");
            let ca = CertificateAuthority::generate("cluster.local")
                .expect("ca")
                .tokens(TokenPolicy::Tokens(HashMap::from([
                    ("c-client-token".to_string(), id("c-client")),
                    ("echo-token".to_string(), id("echo")),
                ])));
            let listener = tokio::net::TcpListener::bind(format!("{cp_ip}:0"))
                .await
                .expect("bind");
            let cp = ControlPlane::start(
                listener,
                ControlPlaneConfig {
                    ca: Arc::new(ca),
                    xds: Some(Arc::new(
                        SnapshotCache::from_mesh(&MeshFile::parse(&mesh).expect("mesh"))
                            .expect("snapshot"),
                    )),
                },
            )
            .expect("control plane");
            let token = dir.path().join("echo-token");
            std::fs::write(&token, "echo-token\n").expect("token");
            let server = Mesh::builder()
                .workload(WorkloadSettings {
                    pod_name: "echo-0".into(),
                    namespace: "demo".into(),
                    service_account: "echo".into(),
                    ..Default::default()
                })
                .embedded(cp.addr(), cp.root_pem().as_bytes().to_vec(), Some(token))
                .runtime("wasmi")
                .ready_timeout(Duration::from_secs(30))
                .drain_timeout(Duration::from_secs(2))
                .build()
                .await
                .expect("echo joined");
            let listener = server
                .bind(format!("{server_ip}:18080").parse().expect("addr"))
                .await
                .expect("bind echo");
            // Answers with the caller's verified id, two set-cookie headers
            // (repeats must survive), and the request body echoed.
            let seen = bodies.clone();
            let app = tower::service_fn(move |req: http::Request<Body>| {
                let seen = seen.clone();
                async move {
                    let peer = req
                        .extensions()
                        .get::<MeshPeer>()
                        .and_then(|p| p.id.as_ref())
                        .map_or("-".into(), ToString::to_string);
                    let x_a = req.headers().get_all("x-a").iter().count();
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((path, body.is_ok()));
                    let body = body.unwrap_or_default();
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("x-peer", peer)
                            .header("x-a-count", x_a.to_string())
                            .header("set-cookie", "a=1")
                            .header("set-cookie", "b=2")
                            .body(Body::from(body))
                            .expect("response"),
                    )
                }
            });
            tokio::spawn({
                let server = server.clone();
                async move { server.serve(listener, app).await }
            });
            // The TCP echo: every byte back, and a half-close answered
            // with one.
            let tcp = server
                .bind(format!("{server_ip}:19000").parse().expect("addr"))
                .await
                .expect("bind the TCP echo");
            tokio::spawn({
                let server = server.clone();
                async move {
                    server
                        .serve_tcp(tcp, |mut conn: nasp::TcpConnection| async move {
                            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                            let mut buf = vec![0u8; 16 * 1024];
                            while let Ok(n) = conn.read(&mut buf).await {
                                if n == 0 {
                                    let _ = conn.shutdown().await;
                                    break;
                                }
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        })
                        .await;
                }
            });
            (cp, server)
        });
        std::fs::write(dir.path().join("root-cert.pem"), cp.root_pem()).expect("root");
        std::fs::write(dir.path().join("istio-token"), "c-client-token\n").expect("token");
        let config = format!(
            "control_plane:\n  address: {}\n  root_cert_file: {}\n  token_file: {}\n\
             workload: {{ namespace: demo, service_account: c-client, pod_name: c-client-1 }}\n\
             runtime: wasmi\nready_timeout_ms: 30000\nworker_threads: 2\n",
            cp.addr(),
            dir.path().join("root-cert.pem").display(),
            dir.path().join("istio-token").display(),
        );
        Self {
            rt,
            cp,
            server,
            dir,
            config,
            listen: format!("{listen_ip}:19100"),
            mesh,
            server_ip,
            bodies,
        }
    }

    /// Pushes a new snapshot over xDS: the mesh with `late.demo` added, a
    /// second name for the echo workload's HTTP port (a route a mesh that
    /// joined before could only learn from a live xDS stream).
    pub fn push_late_service(&self) {
        let mesh = format!(
            "{}  - name: late\n    namespace: demo\n    service_account: echo\n    \
             mtls: strict\n    ports:\n      - {{ port: 18080, protocol: http }}\n    \
             endpoints:\n      - {{ ip: {} }}\n",
            self.mesh, self.server_ip
        );
        self.cp
            .set_mesh(&MeshFile::parse(&mesh).expect("mesh"))
            .expect("snapshot");
    }

    /// The echo service's URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://echo.demo:18080{path}")
    }

    /// The echo service's TCP port, as `nasp_tcp_connect` names it.
    pub fn tcp_target(&self) -> &'static str {
        "echo.demo:19000"
    }

    /// Where a test's own mesh listens to be `c-server.demo`.
    pub fn listen_addr(&self) -> &str {
        &self.listen
    }

    /// The name that reaches `listen_addr` through the mesh.
    pub fn self_target(&self) -> &'static str {
        "c-server.demo:19100"
    }
}

/// This thread's last error, read as C would (length first).
pub fn last_error() -> String {
    // SAFETY: NULL with cap 0 writes nothing.
    let len = unsafe { nasp_ffi::nasp_last_error(std::ptr::null_mut(), 0) };
    let mut buf = vec![0 as c_char; len + 1];
    // SAFETY: `len + 1` writable bytes.
    unsafe { nasp_ffi::nasp_last_error(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated by nasp_last_error.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .expect("UTF-8")
        .to_string()
}

/// The bytes of a view.
pub fn view(s: nasp_ffi::NaspStr) -> String {
    // SAFETY: the library wrote a valid view.
    let b = unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len) };
    String::from_utf8(b.to_vec()).expect("UTF-8")
}

/// A NUL-terminated copy for C-string arguments.
pub fn c(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).expect("no NUL")
}
