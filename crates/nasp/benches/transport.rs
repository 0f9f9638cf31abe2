//! Transport benchmarks: requests/s and p50/p99 latency of nasp's mesh
//! HTTP path against a plain hyper 1.x + rustls mTLS pair, side by side in
//! one run, and the idle RSS of a `Mesh` per proxy-wasm runtime.
//!
//! Run with `cargo xtask bench transport` (it builds the filters first), or
//! `cargo bench -p nasp --bench transport -- [--warm S] [--measure S]
//! [--rounds N] [--no-rss] [--rss-only]`. Results are recorded in
//! docs/benchmarks.md ("Transport").
//!
//! What is compared, per case (HTTP/1.1 or HTTP/2, 1 or 64 concurrent
//! streams, closed loop: each stream sends its next request when the last
//! response body has been read):
//! - `baseline`: a hyper client connection over tokio-rustls to a
//!   hyper-util auto server over tokio-rustls, mTLS with the same
//!   certificates (the rustls configurations of `nasp_identity::tls`), no
//!   routing, no pool: HTTP/1.1 gives each stream its own connection,
//!   HTTP/2 shares one connection between all streams;
//! - `nasp`: `Mesh::http_client()` (route lookup in a view built from the
//!   real `config_v0.json`, endpoint pick, pool, Istio SNI/ALPN/SAN) to a
//!   `Mesh::serve` server on a STRICT mesh listener, no filters;
//! - `nasp+headers`: the same with `filters/headers` on wasmtime in both
//!   directions (outbound on the client's Mesh, inbound on the server's),
//!   as a sidecar pair runs a filter on each side.
//!
//! The three variants of a case run one after the other, in alternating
//! order from round to round (B N F, F N B, …), so drift on a shared
//! machine falls on all of them; ratios are taken per round and the median
//! is reported. Client and server share one tokio runtime (the CPU count of
//! workers), the same for every variant.
//!
//! The idle RSS runs in child processes of this binary (`--rss-child
//! RUNTIME`), one per runtime: VmRSS is read before anything of the mesh
//! exists (runtime and certificate made), then after building a `Mesh`
//! from a `StaticView` of `config_v0.json` (the parsed resources kept, as
//! an xDS client keeps them) with the headers filter in both directions,
//! and a settle.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::identity::cert::{pem_certs, pem_key};
use nasp::identity::{KeyAlgorithm, WorkloadCert, keys};
use nasp::transport::{Body, InboundMode, StaticView, Upstream};
use nasp::wasm::PluginConfig;
use nasp::xds::envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use nasp::xds::envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use nasp::xds::envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use nasp::xds::{MeshView, ResourceSet, ViewSettings, WorkloadSettings, read_config_dump};
use nasp::{FilterDirection, FilterSpec, Mesh, MeshHttpClient};
use tokio::sync::watch;
use tower::ServiceExt as _;

type Watch = watch::Receiver<Option<Arc<WorkloadCert>>>;

const TRUST_DOMAIN: &str = "cluster.local";
/// The caller: catalog in demo, as in the dumps' tests.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/catalog";
/// `echo.demo:80` (HTTP/1.1 cluster) runs as demo/default in config_v0.
const H1_SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/default";
const H1_CLUSTER: &str = "outbound|80||echo.demo.svc.cluster.local";
const H1_URL: &str = "http://echo.demo/";
const H1_SNI: &str = "outbound_.80_._.echo.demo.svc.cluster.local";
/// `echo.default:9000` (explicit HTTP/2 cluster) runs as default/default.
const H2_SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/default";
const H2_CLUSTER: &str = "outbound|9000||echo.default.svc.cluster.local";
const H2_URL: &str = "http://echo.default:9000/";
const H2_SNI: &str = "outbound_.9000_._.echo.default.svc.cluster.local";
const REPLY: &[u8] = b"hello from the bench\n";

struct Opts {
    warm: Duration,
    measure: Duration,
    rounds: usize,
    rss: bool,
    throughput: bool,
    /// Only these protocols, stream counts and variants (for profiling one
    /// case); empty: all.
    protos: Vec<Proto>,
    streams: Vec<usize>,
    variants: Vec<Variant>,
}

fn opts(args: &[String]) -> Opts {
    let mut o = Opts {
        warm: Duration::from_secs(1),
        measure: Duration::from_secs(3),
        rounds: 3,
        rss: true,
        throughput: true,
        protos: Vec::new(),
        streams: Vec::new(),
        variants: Vec::new(),
    };
    let secs = |v: Option<&String>| -> Duration {
        Duration::from_secs_f64(
            v.and_then(|s| s.parse().ok())
                .expect("a number of seconds after --warm / --measure"),
        )
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--warm" => o.warm = secs(it.next()),
            "--measure" => o.measure = secs(it.next()),
            "--rounds" => {
                o.rounds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("a number after --rounds");
            }
            "--proto" => o.protos.push(match it.next().map(String::as_str) {
                Some("h1") => Proto::H1,
                Some("h2") => Proto::H2,
                other => panic!("--proto h1|h2, not {other:?}"),
            }),
            "--streams" => o.streams.push(
                it.next()
                    .and_then(|s| s.parse().ok())
                    .expect("a number after --streams"),
            ),
            "--variant" => o.variants.push(match it.next().map(String::as_str) {
                Some("baseline") => Variant::Baseline,
                Some("nasp") => Variant::Nasp,
                Some("filter") => Variant::NaspFilter,
                other => panic!("--variant baseline|nasp|filter, not {other:?}"),
            }),
            "--no-rss" => o.rss = false,
            "--rss-only" => o.throughput = false,
            // `cargo bench` passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--rss-child") {
        let arg = |k: usize| args.get(i + k).expect("--rss-child RUNTIME XDS ROOT");
        rss_child(arg(1), arg(2), arg(3));
        return;
    }
    let o = opts(&args);
    println!("# nasp transport benchmark");
    println!(
        "machine: {} CPUs, load average at start {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        loadavg()
    );
    if o.throughput {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(throughput(&o));
    }
    if o.rss {
        idle_rss();
    }
    println!("load average at end {}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------- setup

fn workload(ca: &CertificateAuthority, who: &str) -> Watch {
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = time::OffsetDateTime::now_utc();
    let chain = ca
        .issue(
            &who.parse().expect("id"),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(2),
        )
        .expect("issue")
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    let cert = WorkloadCert::new(
        chain,
        pem_key(key.serialize_pem().as_bytes()).expect("key"),
        pem_certs(ca.root_pem().as_bytes()).expect("root"),
    )
    .expect("cert");
    let (tx, rx) = watch::channel(Some(Arc::new(cert)));
    // The certificate never rotates during a run: keep the sender alive.
    std::mem::forget(tx);
    rx
}

fn dump_path() -> String {
    format!(
        "{}/../../../shared/data/istio-config-dumps/config_v0.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn config_v0() -> ResourceSet {
    let path = dump_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    read_config_dump(&text).expect("config_v0.json")
}

/// Points every endpoint of the clusters in `to` at the given address.
fn relocate(set: &mut ResourceSet, to: &HashMap<&str, SocketAddr>) {
    for (cluster, cla) in set.endpoints.iter_mut() {
        let Some(new) = to.get(cluster.as_str()) else {
            continue;
        };
        for locality in &mut cla.endpoints {
            for lb in &mut locality.lb_endpoints {
                let Some(HostIdentifier::Endpoint(ep)) = lb.host_identifier.as_mut() else {
                    continue;
                };
                let Some(AddressKind::SocketAddress(sa)) =
                    ep.address.as_mut().and_then(|a| a.address.as_mut())
                else {
                    continue;
                };
                sa.address = new.ip().to_string();
                sa.port_specifier = Some(PortSpecifier::PortValue(u32::from(new.port())));
            }
        }
    }
}

fn view_settings() -> ViewSettings {
    ViewSettings {
        search_domains: vec![
            "demo.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    }
}

fn static_view(set: &ResourceSet) -> Arc<StaticView> {
    Arc::new(StaticView::new(MeshView::build(
        set,
        HashMap::new(),
        view_settings(),
    )))
}

fn headers_wasm() -> Arc<[u8]> {
    let path = format!(
        "{}/../../target/filters/headers.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path)
        .unwrap_or_else(|e| {
            panic!("{path}: {e}; build the filters first: cargo xtask build-filters")
        })
        .into()
}

fn headers_filter(wasm: &Arc<[u8]>, direction: FilterDirection) -> FilterSpec {
    FilterSpec {
        wasm: wasm.clone(),
        config: PluginConfig::new("headers"),
        direction,
        kind: nasp::mesh::FilterKind::Http,
    }
}

async fn mesh(
    ns: &str,
    sa: &str,
    certs: Watch,
    view: Arc<StaticView>,
    filter: Option<(&Arc<[u8]>, FilterDirection)>,
    runtime: &str,
) -> Mesh {
    let mut b = Mesh::builder()
        .workload(WorkloadSettings {
            pod_name: format!("{sa}-0"),
            namespace: ns.into(),
            service_account: sa.into(),
            ..Default::default()
        })
        .certificates(certs)
        .view(view)
        .inbound_mode(InboundMode::Strict)
        .runtime(runtime)
        // The variants compare no filter with the headers filter alone; the
        // default telemetry chain would be in both.
        .no_default_filters();
    if let Some((wasm, dir)) = filter {
        b = b.filter(headers_filter(wasm, dir));
    }
    b.build().await.expect("mesh")
}

/// A nasp server: `Mesh::serve` on a STRICT listener at `ip`, answering
/// every request with [`REPLY`].
async fn nasp_server(m: &Mesh, ip: &str) -> SocketAddr {
    let listener = m
        .bind(format!("{ip}:0").parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr();
    let app = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::from(Bytes::from_static(REPLY))))
    });
    let m = m.clone();
    tokio::spawn(async move { m.serve(listener, app).await });
    addr
}

/// The baseline server: hyper-util's auto builder (HTTP/1.1 and HTTP/2)
/// over tokio-rustls, mTLS required.
async fn baseline_server(ip: &str, certs: Watch) -> SocketAddr {
    let tls = nasp::identity::tls::server_config(certs, TRUST_DOMAIN, None, &[b"h2", b"http/1.1"])
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(REPLY))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

type BaseBody = Empty<Bytes>;

async fn baseline_tls(
    addr: SocketAddr,
    certs: &Watch,
    san: &str,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = nasp::identity::tls::client_config(certs.clone(), vec![san.into()], &[alpn])
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from(sni.to_string()).expect("sni"),
            tcp,
        )
        .await
        .expect("handshake")
}

// ---------------------------------------------------------------- load

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Baseline,
    Nasp,
    NaspFilter,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Baseline, Variant::Nasp, Variant::NaspFilter];
    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline (hyper + rustls)",
            Variant::Nasp => "nasp, no filter",
            Variant::NaspFilter => "nasp, headers filter (wasmtime, in + out)",
        }
    }
}

/// One stream's way of sending a request.
enum Requester {
    H1(hyper::client::conn::http1::SendRequest<BaseBody>),
    H2(hyper::client::conn::http2::SendRequest<BaseBody>, Uri),
    Nasp(MeshHttpClient, Uri),
}

impl Requester {
    async fn once(&mut self) -> Result<(), String> {
        let n = match self {
            Requester::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                let req = Request::get("/")
                    .header(http::header::HOST, "echo.demo")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                let b = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                b.to_bytes().len()
            }
            Requester::H2(s, uri) => {
                s.ready().await.map_err(|e| e.to_string())?;
                let req = Request::get(uri.clone())
                    .version(http::Version::HTTP_2)
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                let b = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                b.to_bytes().len()
            }
            Requester::Nasp(c, uri) => {
                let req = Request::get(uri.clone())
                    .body(Body::empty())
                    .map_err(|e| e.to_string())?;
                let resp = c.clone().oneshot(req).await.map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                resp.into_body()
                    .collect_bytes()
                    .await
                    .map_err(|e| e.to_string())?
                    .len()
            }
        };
        if n != REPLY.len() {
            return Err(format!("body of {n} bytes"));
        }
        Ok(())
    }
}

struct RunResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: usize,
}

/// Drives `streams` closed loops for `warm` then `measure`; latencies of
/// requests started in the measured window count.
async fn drive(streams: Vec<Requester>, warm: Duration, measure: Duration) -> RunResult {
    let start = Instant::now();
    let measure_from = start + warm;
    let end = measure_from + measure;
    let mut tasks = Vec::new();
    for mut r in streams {
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(64 * 1024);
            let mut errors = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = r.once().await;
                if t0 >= measure_from {
                    match ok {
                        Ok(()) => {
                            lat.push(u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX))
                        }
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("request failed: {e}");
                            }
                            errors += 1;
                        }
                    }
                } else if let Err(e) = ok {
                    panic!("request failed during warm-up: {e}");
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.expect("stream task");
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        // Nearest rank, rounded down: the q-quantile of the sorted samples.
        let i = ((all.len() - 1) as f64 * q) as usize;
        f64::from(all[i]) / 1000.0
    };
    let rps = all.len() as f64 / measure.as_secs_f64();
    RunResult {
        rps,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

/// Everything the runs need, built once.
struct Bench {
    client_certs: Watch,
    base_h1: SocketAddr,
    base_h2: SocketAddr,
    /// Clients: without filters and with the outbound headers filter.
    nasp: MeshHttpClient,
    nasp_filtered: MeshHttpClient,
    _meshes: Vec<Mesh>,
}

impl Bench {
    async fn new() -> Self {
        let ca = CertificateAuthority::generate(TRUST_DOMAIN).expect("ca");
        let client_certs = workload(&ca, CLIENT_ID);
        let h1_certs = workload(&ca, H1_SERVER_ID);
        let h2_certs = workload(&ca, H2_SERVER_ID);
        let wasm = headers_wasm();

        let base_h1 = baseline_server("127.0.0.1", h1_certs.clone()).await;
        let base_h2 = baseline_server("127.0.0.1", h2_certs.clone()).await;

        // Server meshes: their view only gives the inbound side (STRICT is
        // set explicitly), so the plain dump does for them.
        let plain_view = static_view(&config_v0());
        let inbound = Some((&wasm, FilterDirection::Inbound));
        let s_h1 = mesh(
            "demo",
            "default",
            h1_certs.clone(),
            plain_view.clone(),
            None,
            "wasmtime",
        )
        .await;
        let s_h2 = mesh(
            "default",
            "default",
            h2_certs.clone(),
            plain_view.clone(),
            None,
            "wasmtime",
        )
        .await;
        let s_h1f = mesh(
            "demo",
            "default",
            h1_certs,
            plain_view.clone(),
            inbound,
            "wasmtime",
        )
        .await;
        let s_h2f = mesh(
            "default", "default", h2_certs, plain_view, inbound, "wasmtime",
        )
        .await;
        let a_h1 = nasp_server(&s_h1, "127.0.0.1").await;
        let a_h2 = nasp_server(&s_h2, "127.0.0.1").await;
        let a_h1f = nasp_server(&s_h1f, "127.0.0.1").await;
        let a_h2f = nasp_server(&s_h2f, "127.0.0.1").await;

        // Client meshes: config_v0 with echo.demo:80 and echo.default:9000
        // pointed at the servers of their variant.
        let view_to = |h1: SocketAddr, h2: SocketAddr| {
            let mut set = config_v0();
            relocate(
                &mut set,
                &HashMap::from([(H1_CLUSTER, h1), (H2_CLUSTER, h2)]),
            );
            static_view(&set)
        };
        let c = mesh(
            "demo",
            "catalog",
            client_certs.clone(),
            view_to(a_h1, a_h2),
            None,
            "wasmtime",
        )
        .await;
        let cf = mesh(
            "demo",
            "catalog",
            client_certs.clone(),
            view_to(a_h1f, a_h2f),
            Some((&wasm, FilterDirection::Outbound)),
            "wasmtime",
        )
        .await;
        let b = Bench {
            client_certs,
            base_h1,
            base_h2,
            nasp: c.http_client(),
            nasp_filtered: cf.http_client(),
            _meshes: vec![s_h1, s_h2, s_h1f, s_h2f, c, cf],
        };
        b.check().await;
        b
    }

    /// One request per nasp path, to show (and assert) what is measured:
    /// mTLS with Istio's ALPN to the expected identity, the filter's
    /// headers present only where the filter runs.
    async fn check(&self) {
        for (client, filtered) in [(&self.nasp, false), (&self.nasp_filtered, true)] {
            for (url, alpn, peer) in [
                (H1_URL, "istio-http/1.1", H1_SERVER_ID),
                (H2_URL, "istio-h2", H2_SERVER_ID),
            ] {
                let req = Request::get(url).body(Body::empty()).expect("request");
                let resp = client.clone().oneshot(req).await.expect("nasp request");
                assert_eq!(resp.status(), 200, "{url}");
                let up = resp
                    .extensions()
                    .get::<Upstream>()
                    .expect("upstream")
                    .clone();
                assert!(up.mtls, "{url}: mTLS");
                assert_eq!(up.alpn.as_deref(), Some(alpn), "{url}");
                assert_eq!(up.peer_id.as_deref(), Some(peer), "{url}");
                assert_eq!(
                    resp.headers().contains_key("x-status-seen"),
                    filtered,
                    "{url}: the headers filter runs exactly when configured"
                );
                let body = resp.into_body().collect_bytes().await.expect("body");
                assert_eq!(&body[..], REPLY);
                println!(
                    "check: {url} filter={filtered}: {} via {} alpn {alpn}, peer {peer}",
                    up.cluster, up.address
                );
            }
        }
    }

    async fn streams(&self, proto: Proto, variant: Variant, n: usize) -> Vec<Requester> {
        let mut out = Vec::with_capacity(n);
        match (variant, proto) {
            (Variant::Baseline, Proto::H1) => {
                for _ in 0..n {
                    let tls = baseline_tls(
                        self.base_h1,
                        &self.client_certs,
                        H1_SERVER_ID,
                        H1_SNI,
                        b"http/1.1",
                    )
                    .await;
                    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .expect("h1 handshake");
                    tokio::spawn(conn);
                    out.push(Requester::H1(s));
                }
            }
            (Variant::Baseline, Proto::H2) => {
                let tls = baseline_tls(
                    self.base_h2,
                    &self.client_certs,
                    H2_SERVER_ID,
                    H2_SNI,
                    b"h2",
                )
                .await;
                let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tls))
                    .await
                    .expect("h2 handshake");
                tokio::spawn(conn);
                let uri: Uri = format!("https://{H2_SNI}/").parse().expect("uri");
                for _ in 0..n {
                    out.push(Requester::H2(s.clone(), uri.clone()));
                }
            }
            (v, p) => {
                let client = if v == Variant::Nasp {
                    &self.nasp
                } else {
                    &self.nasp_filtered
                };
                let uri: Uri = match p {
                    Proto::H1 => H1_URL,
                    Proto::H2 => H2_URL,
                }
                .parse()
                .expect("uri");
                for _ in 0..n {
                    out.push(Requester::Nasp(client.clone(), uri.clone()));
                }
            }
        }
        out
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

async fn throughput(o: &Opts) {
    let bench = Bench::new().await;
    println!(
        "\nclosed loop, {} s warm-up + {} s measured per run, {} rounds, variants alternating\n",
        o.warm.as_secs_f64(),
        o.measure.as_secs_f64(),
        o.rounds
    );
    let mut rows = Vec::new();
    let protos = if o.protos.is_empty() {
        vec![Proto::H1, Proto::H2]
    } else {
        o.protos.clone()
    };
    let counts = if o.streams.is_empty() {
        vec![1, 64]
    } else {
        o.streams.clone()
    };
    let variants = if o.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        o.variants.clone()
    };
    for &proto in &protos {
        for &conc in &counts {
            let mut per: HashMap<&'static str, Vec<RunResult>> = HashMap::new();
            for round in 0..o.rounds {
                let mut order = variants.clone();
                if round % 2 == 1 {
                    order.reverse();
                }
                for v in order {
                    let streams = bench.streams(proto, v, conc).await;
                    let r = drive(streams, o.warm, o.measure).await;
                    eprintln!(
                        "  {} c={conc} round {round} {:<44} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs{}",
                        proto.name(),
                        v.name(),
                        r.rps,
                        r.p50_us,
                        r.p99_us,
                        if r.errors > 0 {
                            format!("  {} errors", r.errors)
                        } else {
                            String::new()
                        }
                    );
                    per.entry(v.name()).or_default().push(r);
                }
            }
            rows.push((proto, conc, per));
        }
    }
    println!(
        "| protocol | streams | variant | req/s (median) | p50 µs | p99 µs | throughput / baseline | p99 − baseline (µs) | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (proto, conc, per) in &rows {
        let base = per.get(Variant::Baseline.name());
        for &v in &variants {
            let runs = &per[v.name()];
            let rps = median(runs.iter().map(|r| r.rps).collect());
            let p50 = median(runs.iter().map(|r| r.p50_us).collect());
            let p99 = median(runs.iter().map(|r| r.p99_us).collect());
            let errors: usize = runs.iter().map(|r| r.errors).sum();
            let (ratio, dp99) = if v == Variant::Baseline {
                ("1".to_string(), "0".to_string())
            } else if let Some(base) = base {
                // Paired per round: each nasp run against the baseline run
                // of the same round.
                let ratio = median(runs.iter().zip(base).map(|(r, b)| r.rps / b.rps).collect());
                let d = median(
                    runs.iter()
                        .zip(base)
                        .map(|(r, b)| r.p99_us - b.p99_us)
                        .collect(),
                );
                (format!("{ratio:.2}"), format!("{d:+.0}"))
            } else {
                ("-".to_string(), "-".to_string())
            };
            println!(
                "| {} | {conc} | {} | {rps:.0} | {p50:.0} | {p99:.0} | {ratio} | {dp99} | {errors} |",
                proto.name(),
                v.name()
            );
        }
    }
}

// ---------------------------------------------------------------- RSS

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// In a child process: RSS before and after an idle Mesh on `runtime`
/// (`none`: the Mesh without filters) that joins the embedded control
/// plane at `xds` (its root in the file `root`): certificate from its CA,
/// config_v0 over ADS.
fn rss_child(runtime: &str, xds: &str, root: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let root_pem = std::fs::read(root).expect("root certificate file");
        let wasm = headers_wasm();
        let addr: SocketAddr = xds.parse().expect("control plane address");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = vm_rss_kib();
        let mut b = Mesh::builder()
            .workload(WorkloadSettings {
                pod_name: "catalog-0".into(),
                namespace: "demo".into(),
                service_account: "catalog".into(),
                ..Default::default()
            })
            .embedded(addr, root_pem, None)
            .ready_timeout(Duration::from_secs(20))
            // As recorded in docs/benchmarks.md: the headers filter only.
            .no_default_filters();
        if runtime != "none" {
            b = b
                .runtime(runtime)
                .filter(headers_filter(&wasm, FilterDirection::Outbound))
                .filter(headers_filter(&wasm, FilterDirection::Inbound));
        }
        let m = b.build().await.expect("mesh");
        let _client = m.http_client();
        let clusters = m.view().counts().0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = vm_rss_kib();
        println!("rss {runtime} {before} {after} {clusters}");
        drop(m);
    });
}

fn idle_rss() {
    let exe = std::env::current_exe().expect("current exe");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The control plane runs in this process; each Mesh in its own.
    let cp = rt.block_on(async {
        let ca = CertificateAuthority::generate(TRUST_DOMAIN)
            .expect("ca")
            .tokens(TokenPolicy::AnyIdentity);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        ControlPlane::start(
            listener,
            ControlPlaneConfig {
                ca: Arc::new(ca),
                xds: Some(Arc::new(SnapshotCache::new(&config_v0()))),
            },
        )
        .expect("control plane")
    });
    let root = std::env::temp_dir().join(format!("nasp-bench-root-{}.pem", std::process::id()));
    std::fs::write(&root, cp.root_pem()).expect("root file");
    println!(
        "\nidle Mesh RSS: a Mesh joining the embedded control plane (CA + ADS serving config_v0.json), headers filter in both directions, {} filter workers per direction; VmRSS before the Mesh and 1 s after it was built, each runtime in its own process\n",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    println!("| runtime | RSS before (MiB) | RSS with the idle Mesh (MiB) | Mesh's share (MiB) |");
    println!("|---|---|---|---|");
    for name in ["none", "wasmtime", "wasmi", "wasm3"] {
        let out = std::process::Command::new(&exe)
            .arg("--rss-child")
            .arg(name)
            .arg(cp.addr().to_string())
            .arg(&root)
            .output()
            .expect("rss child");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find(|l| l.starts_with("rss ")) else {
            println!(
                "| {name} | failed: {} | | |",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        };
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        let (before, after) = (f[0] / 1024.0, f[1] / 1024.0);
        let label = if name == "none" {
            format!("no filter ({} clusters in the view)", f[2])
        } else {
            name.to_string()
        };
        println!(
            "| {label} | {before:.1} | {after:.1} | {:.1} |",
            after - before
        );
    }
    let _ = std::fs::remove_file(&root);
    drop(cp);
}
