//! The proxy-wasm chain on the data path, through real sockets on loopback,
//! on every runtime (wasmtime, wasmi, wasm3): an application served with
//! `serve_http` on a DISABLE mesh listener behind `HttpFilterLayer`, a
//! hyper HTTP/1.1 client, and `filter_tcp` between two TCP sockets. The
//! filters are the real `conformance` and `headers` filters built by
//! `cargo xtask build-filters`.

// The helpers below are test code as much as the `#[test]` bodies that
// clippy.toml already lets unwrap (`allow-unwrap-in-tests`).
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use nasp_proxywasm::{
    FailPolicy, HostEnv, MemoryLogSink, PluginConfig, PropertyProvider, WasmModule, WasmRuntime,
};
use nasp_transport::filter::{
    ChainPool, ConnectionProperties, HttpFilterLayer, ListenerDirection, ListenerProperties,
    NodeProperties, StreamProperties, filter_tcp,
};
use nasp_transport::{Body, BoxError, InboundConfig, InboundMode, MeshListener, serve_http};
use nasp_xds::WorkloadSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::{Layer, ServiceExt};

fn filter_wasm(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../target/filters/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the filters with `cargo xtask build-filters`")
    })
}

fn runtime(name: &str) -> Arc<dyn WasmRuntime> {
    let rt = match name {
        "wasmtime" => nasp_runtime_wasmtime::runtime(),
        "wasmi" => nasp_runtime_wasmi::runtime(),
        "wasm3" => nasp_runtime_wasm3::runtime(),
        other => panic!("unknown runtime {other}"),
    };
    rt.unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn settings() -> WorkloadSettings {
    WorkloadSettings {
        pod_name: "web-1".into(),
        namespace: "demo".into(),
        instance_ips: vec!["127.0.0.5".into()],
        ..Default::default()
    }
}

const NODE_ID: &str = "sidecar~127.0.0.5~web-1.demo~demo.svc.cluster.local";

fn node() -> Arc<NodeProperties> {
    Arc::new(NodeProperties::from_settings(&settings()))
}

fn conformance(policy: FailPolicy) -> (&'static str, PluginConfig) {
    (
        "conformance",
        PluginConfig::new("conformance")
            .root_id("conformance")
            .vm_id("filters-test")
            .configuration("hello")
            .fail_policy(policy),
    )
}

fn headers_filter() -> (&'static str, PluginConfig) {
    ("headers", PluginConfig::new("headers").root_id("headers"))
}

/// A pool of `workers` chains of these filters, each module compiled once.
fn pool(rt: &str, workers: usize, filters: &[(&str, PluginConfig)]) -> Arc<ChainPool> {
    let runtime = runtime(rt);
    let plugins: Vec<(WasmModule, PluginConfig)> = filters
        .iter()
        .map(|(f, c)| {
            let m = WasmModule::new(runtime.as_ref(), &filter_wasm(f))
                .unwrap_or_else(|e| panic!("{rt}: {f}: {e}"));
            (m, c.clone())
        })
        .collect();
    let pool = ChainPool::from_plugins(workers, &plugins, &HostEnv::default())
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    assert_eq!(pool.workers(), workers);
    Arc::new(pool)
}

/// What the application saw of one request.
#[derive(Clone, Debug, Default)]
struct Seen {
    path: String,
    headers: http::HeaderMap,
    frames: Vec<Bytes>,
    source: Option<String>,
    node_id: Option<String>,
}

#[derive(Clone, Default)]
struct App {
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Tells the client each body frame as the application receives it.
    frames: Option<mpsc::UnboundedSender<Bytes>>,
}

impl App {
    fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the app was called")
    }
}

async fn app(app: App, req: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    app.calls.fetch_add(1, Ordering::SeqCst);
    let props = req.extensions().get::<Arc<StreamProperties>>().cloned();
    let text = |p: &Arc<StreamProperties>, path: &[&str]| {
        p.property(path)
            .map(|v| String::from_utf8_lossy(&v.serialize()).into_owned())
    };
    let mut seen = Seen {
        path: req
            .uri()
            .path_and_query()
            .map_or("", |p| p.as_str())
            .to_string(),
        headers: req.headers().clone(),
        source: props.as_ref().and_then(|p| text(p, &["source", "address"])),
        node_id: props.as_ref().and_then(|p| text(p, &["node", "id"])),
        ..Default::default()
    };
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            if let Some(tx) = &app.frames {
                let _ = tx.send(data.clone());
            }
            seen.frames.push(data);
        }
    }
    app.seen.lock().unwrap().push(seen);
    let resp = http::Response::builder()
        .header("server", "app")
        .body(Body::from("hello"))
        .unwrap();
    Ok(resp)
}

/// Serves `app` behind the inbound filter layer on a DISABLE listener.
async fn serve(ip: &str, pool: Arc<ChainPool>, app_state: App, pause: Duration) -> SocketAddr {
    let (_tx, certs) = watch::channel(None);
    std::mem::forget(_tx);
    let listener = MeshListener::bind(
        format!("{ip}:0").parse().unwrap(),
        certs,
        InboundConfig::new(InboundMode::Disable, "cluster.local"),
    )
    .await
    .expect("listen");
    let addr = listener.local_addr();
    let layer = HttpFilterLayer::new(pool, ListenerDirection::Inbound, node())
        .local_addr(addr)
        .pause_timeout(pause);
    let svc = layer.layer(tower::service_fn(move |req| app(app_state.clone(), req)));
    let hyper_svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        // An async block awaiting the layered service, as applications
        // write it: its future must be `Send` for `serve_http`.
        let svc = svc.clone();
        async move { svc.oneshot(req.map(Body::new)).await }
    });
    tokio::spawn(serve_http(listener, hyper_svc));
    addr
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A hyper HTTP/1.1 client connection from `from_ip`.
async fn client(
    addr: SocketAddr,
    from_ip: &str,
) -> (hyper::client::conn::http1::SendRequest<Body>, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from_ip}:0").parse().unwrap())
        .unwrap();
    let tcp = socket.connect(addr).await.expect("connect");
    let local = tcp.local_addr().unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    (send, local)
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Body>,
    path: &str,
    mode: Option<&str>,
    body: Body,
) -> Reply {
    let mut req = http::Request::builder()
        .uri(path)
        .header("host", "web.demo");
    if let Some(m) = mode {
        req = req.header("x-conformance", m);
    }
    let method = if http_body::Body::is_end_stream(&body) {
        "GET"
    } else {
        "POST"
    };
    let req = req.method(method).body(body).unwrap();
    c.ready().await.expect("connection ready");
    let resp = tokio::time::timeout(Duration::from_secs(20), c.send_request(req))
        .await
        .expect("no hang")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn header(r: &Reply, name: &str) -> Option<String> {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap_or_default().to_string())
}

/// A request body the test feeds frame by frame.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }
}

fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, Body::new(ChannelBody(rx)))
}

const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The cases, each run on every runtime by `per_runtime!` below.

/// conformance `local-response`: the client gets the filter's 403 (through
/// the response filters) and the application is never called.
async fn local_response_rejects(rt: &str) {
    let state = App::default();
    let addr = serve(
        "127.0.0.61",
        pool(rt, 2, &[conformance(FailPolicy::FailClosed)]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.62").await;
    let r = send(&mut c, "/secret", Some("local-response"), Body::empty()).await;
    assert_eq!(r.status, 403, "{rt}");
    assert_eq!(
        header(&r, "x-denied-by").as_deref(),
        Some("conformance"),
        "{rt}"
    );
    assert!(
        r.body.starts_with(b"denied by conformance filter"),
        "{rt}: {:?}",
        r.body
    );
    assert_eq!(
        state.calls.load(Ordering::SeqCst),
        0,
        "{rt}: the app was called"
    );
    // The same connection goes on serving.
    let r = send(&mut c, "/open", None, Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
    assert_eq!(state.calls.load(Ordering::SeqCst), 1, "{rt}");
}

/// conformance `pseudo` rewrites `:path`; the headers filter after it sees
/// the rewritten path; the response headers the filters change are what
/// the client gets; the node and connection properties are the real ones.
async fn rewrites_reach_app_and_client(rt: &str) {
    let state = App::default();
    let filters = [conformance(FailPolicy::FailClosed), headers_filter()];
    let addr = serve("127.0.0.63", pool(rt, 2, &filters), state.clone(), SETTLE).await;
    let (mut c, local) = client(addr, "127.0.0.64").await;
    let r = send(&mut c, "/original?q=1", Some("pseudo"), Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
    let seen = state.last();
    assert_eq!(seen.path, "/rewritten", "{rt}");
    assert_eq!(
        seen.headers
            .get("x-path-seen")
            .and_then(|v| v.to_str().ok()),
        Some("/rewritten"),
        "{rt}"
    );
    assert_eq!(
        seen.headers
            .get("x-conformance-seen")
            .and_then(|v| v.to_str().ok()),
        Some(format!("root=conformance;node={NODE_ID}").as_str()),
        "{rt}"
    );
    assert_eq!(
        seen.headers.get("host").and_then(|v| v.to_str().ok()),
        Some("web.demo")
    );
    assert_eq!(
        seen.source.as_deref(),
        Some(local.to_string().as_str()),
        "{rt}"
    );
    assert_eq!(seen.node_id.as_deref(), Some(NODE_ID), "{rt}");
    // Response side: conformance removed `server`, added its headers; the
    // headers filter added `x-status-seen`; the body got its suffix.
    assert_eq!(header(&r, "server"), None, "{rt}");
    assert_eq!(
        header(&r, "x-upstream-status").as_deref(),
        Some("200"),
        "{rt}"
    );
    assert_eq!(
        header(&r, "x-seen-path").as_deref(),
        Some("/original?q=1"),
        "{rt}"
    );
    assert_eq!(header(&r, "x-status-seen").as_deref(), Some("200"), "{rt}");
    assert_eq!(&r.body[..], b"hello [filtered]", "{rt}");
}

/// The request body, sent in several frames, reaches the application
/// upper-cased by conformance (which buffers to the end of the body).
async fn body_upper_cased(rt: &str) {
    let state = App::default();
    let addr = serve(
        "127.0.0.65",
        pool(rt, 2, &[conformance(FailPolicy::FailClosed)]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.66").await;
    let (tx, body) = channel_body();
    let feed = tokio::spawn(async move {
        for part in ["hello ", "streamed ", "world"] {
            tx.send(Bytes::from(part)).await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let r = send(&mut c, "/upload", None, body).await;
    feed.await.unwrap();
    assert_eq!(r.status, 200, "{rt}");
    let seen = state.last();
    let all: Vec<u8> = seen.frames.iter().flat_map(|f| f.to_vec()).collect();
    assert_eq!(&all[..], b"HELLO STREAMED WORLD", "{rt}");
}

/// A filter that does not hold the body (headers) lets each frame through
/// as it arrives: the application has the first frame before the client
/// sends the second.
async fn body_streamed_frame_by_frame(rt: &str) {
    let (frames_tx, mut frames_rx) = mpsc::unbounded_channel();
    let state = App {
        frames: Some(frames_tx),
        ..Default::default()
    };
    let addr = serve(
        "127.0.0.67",
        pool(rt, 2, &[headers_filter()]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.68").await;
    let (tx, body) = channel_body();
    let feed = tokio::spawn(async move {
        for part in ["one", "two", "three"] {
            tx.send(Bytes::from(part)).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), frames_rx.recv())
                .await
                .expect("the app got the frame before the next was sent")
                .unwrap();
            assert_eq!(&got[..], part.as_bytes());
        }
    });
    let r = send(&mut c, "/stream", None, body).await;
    feed.await.unwrap();
    assert_eq!(r.status, 200, "{rt}");
    assert_eq!(state.last().frames.len(), 3, "{rt}");
}

/// Fail-closed: a trapping filter gives 503 without calling the app, and
/// (Envoy's FAIL_CLOSED) the dead VM keeps answering 503 on its chain.
async fn trap_fail_closed(rt: &str) {
    let state = App::default();
    let addr = serve(
        "127.0.0.69",
        pool(rt, 1, &[conformance(FailPolicy::FailClosed)]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.70").await;
    let r = send(&mut c, "/", Some("trap"), Body::empty()).await;
    assert_eq!(r.status, 503, "{rt}");
    let r = send(&mut c, "/after", None, Body::empty()).await;
    assert_eq!(r.status, 503, "{rt}");
    assert_eq!(state.calls.load(Ordering::SeqCst), 0, "{rt}");
}

/// Reload: the trapping request gets 503, the next gets a fresh instance
/// and is filtered again.
async fn trap_reload_keeps_serving(rt: &str) {
    let state = App::default();
    let policy = FailPolicy::Reload {
        backoff: Duration::ZERO,
    };
    let addr = serve(
        "127.0.0.71",
        pool(rt, 1, &[conformance(policy)]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.72").await;
    let r = send(&mut c, "/", Some("trap"), Body::empty()).await;
    assert_eq!(r.status, 503, "{rt}");
    let r = send(&mut c, "/after", None, Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
    assert_eq!(
        header(&r, "x-upstream-status").as_deref(),
        Some("200"),
        "{rt}"
    );
    assert_eq!(state.calls.load(Ordering::SeqCst), 1, "{rt}");
}

/// Fail-open: the trapping request reaches the app (200), and so do the
/// requests after it (the dead plugin is skipped).
async fn trap_fail_open(rt: &str) {
    let state = App::default();
    let addr = serve(
        "127.0.0.73",
        pool(rt, 1, &[conformance(FailPolicy::FailOpen)]),
        state.clone(),
        SETTLE,
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.74").await;
    let r = send(&mut c, "/", Some("trap"), Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
    let r = send(&mut c, "/after", None, Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
    assert_eq!(state.calls.load(Ordering::SeqCst), 2, "{rt}");
}

/// A filter that pauses request headers with nothing to resume them: the
/// client gets a 500 at the pause deadline, not a hang.
async fn pause_without_resume_answers(rt: &str) {
    let state = App::default();
    let addr = serve(
        "127.0.0.75",
        pool(rt, 1, &[conformance(FailPolicy::FailClosed)]),
        state.clone(),
        Duration::from_millis(200),
    )
    .await;
    let (mut c, _) = client(addr, "127.0.0.76").await;
    let r = send(&mut c, "/", Some("pause"), Body::empty()).await;
    assert_eq!(r.status, 500, "{rt}");
    assert_eq!(state.calls.load(Ordering::SeqCst), 0, "{rt}");
    let r = send(&mut c, "/", None, Body::empty()).await;
    assert_eq!(r.status, 200, "{rt}");
}

/// Many concurrent streams over a pool of four chains, each on its own
/// connection: every one is filtered, with its own body, and every stream
/// is ended in the chain that ran it.
async fn concurrent_streams(rt: &str) {
    let state = App::default();
    let pool = pool(rt, 4, &[conformance(FailPolicy::FailClosed)]);
    let addr = serve("127.0.0.77", pool.clone(), state.clone(), SETTLE).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        tasks.push(tokio::spawn(async move {
            let (mut c, _) = client(addr, "127.0.0.78").await;
            let r = send(
                &mut c,
                &format!("/{i}"),
                None,
                Body::from(format!("body {i}")),
            )
            .await;
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "{rt}");
        assert_eq!(header(&r, "x-seen-path"), Some(format!("/{i}")), "{rt}");
    }
    let seen = state.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 24);
    for s in &seen {
        let i = s.path.trim_start_matches('/');
        let body: Vec<u8> = s.frames.iter().flat_map(|f| f.to_vec()).collect();
        assert_eq!(body, format!("BODY {i}").into_bytes(), "{rt}");
    }
    // Every stream was finished: no context is left in any VM.
    for w in 0..pool.workers() {
        let live = pool
            .with_chain(w, |c| {
                c.plugins
                    .iter_mut()
                    .map(|p| p.live_streams())
                    .sum::<usize>()
            })
            .unwrap();
        assert_eq!(live, 0, "{rt}: chain {w} has live streams");
    }
}

async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.80:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP proxy on loopback running each connection through `filter_tcp`;
/// the outcomes come back on the channel.
async fn tcp_proxy(
    pool: Arc<ChainPool>,
    upstream: SocketAddr,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<std::io::Result<nasp_transport::filter::TcpOutcome>>,
) {
    let l = TcpListener::bind("127.0.0.81:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((down, peer)) = l.accept().await {
            let (pool, tx) = (pool.clone(), tx.clone());
            tokio::spawn(async move {
                let up = TcpStream::connect(upstream).await.unwrap();
                let props = Arc::new(StreamProperties::new(
                    node(),
                    ListenerDirection::Inbound,
                    ConnectionProperties {
                        source: Some(peer),
                        ..Default::default()
                    },
                ));
                let _ = tx.send(filter_tcp(&pool, down, up, props).await);
            });
        }
    });
    (addr, rx)
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("no hang")
        .expect("read");
    buf
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the connection is closed");
    buf
}

/// conformance as a TCP filter: downstream bytes get a `>` prepended,
/// upstream bytes a `<` appended, chunk by chunk; `close` makes it close
/// the connection.
async fn tcp_rewrites_and_closes(rt: &str) {
    let cfg = PluginConfig::new("conformance-tcp")
        .root_id("conformance")
        .vm_id("filters-tcp")
        .configuration("tcp");
    let (addr, mut outcomes) =
        tcp_proxy(pool(rt, 2, &[("conformance", cfg)]), echo_upstream().await).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut s, 7).await, b">hello<", "{rt}");
    s.write_all(b"again").await.unwrap();
    assert_eq!(read_exactly(&mut s, 7).await, b">again<", "{rt}");
    s.shutdown().await.unwrap();
    // The end of each side is a data callback too (no bytes, end_of_stream),
    // and this filter marks it: `>` goes up and is echoed back with `<`,
    // then the upstream's end adds one more `<`.
    assert_eq!(read_to_close(&mut s).await, b"><<", "{rt}");
    let o = outcomes.recv().await.unwrap().expect("clean end");
    assert_eq!(
        (o.sent, o.received, o.closed_by_filter),
        (13, 17, false),
        "{rt}"
    );

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"close").await.unwrap();
    read_to_close(&mut s).await;
    let o = outcomes.recv().await.unwrap().expect("filter close");
    assert!(o.closed_by_filter, "{rt}: {o:?}");
}

/// A plugin that traps on every TCP connection (conformance configured as
/// an HTTP filter: the SDK panics on `on_new_connection`): fail-closed
/// closes the connection before a byte passes, fail-open passes bytes
/// unchanged.
async fn tcp_failing_plugin(rt: &str) {
    let (name, cfg) = conformance(FailPolicy::FailClosed);
    let (addr, mut outcomes) = tcp_proxy(pool(rt, 1, &[(name, cfg)]), echo_upstream().await).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(b"hello").await;
    assert_eq!(read_to_close(&mut s).await, b"", "{rt}");
    assert!(
        outcomes.recv().await.unwrap().unwrap().closed_by_filter,
        "{rt}"
    );

    let (name, cfg) = conformance(FailPolicy::FailOpen);
    let (addr, mut outcomes) = tcp_proxy(pool(rt, 1, &[(name, cfg)]), echo_upstream().await).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"hello", "{rt}");
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    let o = outcomes.recv().await.unwrap().unwrap();
    assert_eq!(
        (o.sent, o.received, o.closed_by_filter),
        (5, 5, false),
        "{rt}"
    );
}

/// An empty pool: no wrapper (the layer returns the service itself) and
/// TCP bytes copied untouched.
#[tokio::test(flavor = "multi_thread")]
async fn empty_pool_passes_through() {
    let pool = Arc::new(ChainPool::empty());
    assert!(pool.is_empty());
    let layer = HttpFilterLayer::new(pool.clone(), ListenerDirection::Inbound, node());
    let svc = layer.layer(tower::service_fn(|_req: http::Request<Body>| async {
        Ok::<_, Infallible>(http::Response::new(Body::from("direct")))
    }));
    assert!(matches!(svc, tower::util::Either::Left(_)));
    let r = svc
        .oneshot(http::Request::new(Body::empty()))
        .await
        .unwrap();
    assert_eq!(&r.into_body().collect_bytes().await.unwrap()[..], b"direct");
    assert!(pool.spawn_maintenance(Duration::from_millis(10)).is_none());

    let (addr, mut outcomes) = tcp_proxy(pool, echo_upstream().await).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"plain").await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"plain");
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    let o = outcomes.recv().await.unwrap().unwrap();
    assert_eq!((o.sent, o.received), (5, 5));
}

/// A stream dropped mid-exchange (the client goes away while the app holds
/// the request) is ended by the pool's maintenance, not leaked.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_streams_are_reaped() {
    let pool = pool("wasmtime", 1, &[conformance(FailPolicy::FailClosed)]);
    let _maint = pool.spawn_maintenance(Duration::from_millis(5));
    let layer = HttpFilterLayer::new(pool.clone(), ListenerDirection::Inbound, node());
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let entered = Arc::new(Mutex::new(Some(entered_tx)));
    let svc = layer.layer(tower::service_fn(move |_req: http::Request<Body>| {
        let entered = entered.clone();
        async move {
            if let Some(tx) = entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        }
    }));
    let req = http::Request::builder()
        .uri("/hang")
        .body(Body::empty())
        .unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    entered_rx.await.unwrap();
    let live = |p: &ChainPool| p.with_chain(0, |c| c.plugins[0].live_streams()).unwrap();
    assert_eq!(live(&pool), 1);
    call.abort();
    let _ = call.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while live(&pool) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped stream was never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every plugin of a pool built with [`ListenerProperties`] reads the node
/// and its pool's direction in `proxy_on_vm_start` and `proxy_on_configure`
/// (as `nasp::Mesh` builds its pools), on each worker's VM.
async fn root_reads_the_listener_properties(rt: &str) {
    let runtime = runtime(rt);
    let module = WasmModule::new(runtime.as_ref(), &filter_wasm("conformance"))
        .unwrap_or_else(|e| panic!("{rt}: {e}"));
    for (direction, code) in [
        (ListenerDirection::Inbound, 1),
        (ListenerDirection::Outbound, 2),
    ] {
        let logs = MemoryLogSink::new();
        let env = HostEnv {
            logs: Arc::new(logs.clone()),
            ..HostEnv::default()
        };
        let (_, config) = conformance(FailPolicy::FailClosed);
        let config = config.properties(Arc::new(ListenerProperties::new(node(), direction)));
        let pool = ChainPool::from_plugins(2, &[(module.clone(), config)], &env)
            .unwrap_or_else(|e| panic!("{rt}: {e}"));
        assert_eq!(pool.workers(), 2);
        for cb in ["on_vm_start", "on_configure"] {
            let line = format!(
                "root properties in {cb}: node.id={NODE_ID} namespace=demo listener_direction={code}"
            );
            let n = logs.lines().iter().filter(|l| l.message == line).count();
            assert_eq!(n, 2, "{rt}: {line} once per worker in {:?}", logs.lines());
        }
    }
}

macro_rules! per_runtime {
    ($($case:ident),* $(,)?) => {
        mod wasmtime {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case("wasmtime").await })*
        }
        mod wasmi {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case("wasmi").await })*
        }
        mod wasm3 {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $case() { super::$case("wasm3").await })*
        }
    };
}

per_runtime!(
    local_response_rejects,
    rewrites_reach_app_and_client,
    body_upper_cased,
    body_streamed_frame_by_frame,
    trap_fail_closed,
    trap_reload_keeps_serving,
    trap_fail_open,
    pause_without_resume_answers,
    concurrent_streams,
    tcp_rewrites_and_closes,
    tcp_failing_plugin,
    root_reads_the_listener_properties,
);
