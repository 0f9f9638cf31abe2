//! `nasp serve`: one mesh workload running a built-in echo app, as
//! Istio's test echo app: HTTP answers with what it saw as JSON, gRPC is
//! the `nasp.echo.v1` echo service, TCP echoes bytes back, and the
//! mesh's Prometheus endpoint counts what was served beside the filters'
//! metrics.
//!
//! Invariants: the caller's identity it reports is the one the mesh
//! listener verified, never a header; a request body is read up to
//! [`MAX_BODY`] and no further; Ctrl-C or SIGTERM drains and exits 0.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use http_body_util::BodyExt as _;
use nasp::telemetry::{MetricKind, MetricsRegistry};
use nasp::transport::{Body, MeshPeer};
use serde_json::json;
use tower::ServiceExt as _;

use crate::workload::{MeshArgs, parse_service};

/// The largest request body the echo app reads (it answers 413 beyond).
pub const MAX_BODY: usize = 1024 * 1024;
/// How much of the body the answer shows.
const BODY_SHOWN: usize = 4096;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The service this workload is an endpoint of, NAME.NAMESPACE.
    #[arg(long)]
    service: String,
    /// Serve HTTP (1.1 and 2) here: the echo app answering JSON.
    #[arg(long)]
    listen: SocketAddr,
    /// Serve the gRPC echo service (nasp.echo.v1.Echo) here.
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// Echo TCP bytes here.
    #[arg(long)]
    tcp_echo: Option<SocketAddr>,
    /// Serve Prometheus text at /stats/prometheus (and /metrics) here, in
    /// plaintext outside the mesh, as Envoy's :15090 (the mesh's endpoint:
    /// the filters' metrics and the echo app's counters).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// Counters of what was served, in Istio's tag encoding so the registry
/// exposes them with labels; kept in the mesh's registry, which its
/// Prometheus endpoint serves.
#[derive(Clone)]
struct Stats(MetricsRegistry);

impl Stats {
    fn count(&self, family: &str, labels: &[(&str, &str)]) {
        let mut name = String::new();
        for (k, v) in labels {
            // The tag encoding's separators cannot appear in a value.
            let v = v.replace("=.=", "_").replace(";.;", "_");
            name.push_str(&format!("{k}=.={v};.;"));
        }
        name.push_str(family);
        let id = self.0.define(MetricKind::Counter, &name);
        let _ = self.0.increment(id, 1);
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

async fn run(args: ServeArgs) -> Result<()> {
    let (name, ns) = parse_service(&args.service)?;
    let mesh = args
        .mesh
        .join(&name, &ns, vec![args.listen.ip().to_string()], args.metrics)
        .await
        .map_err(
            |e| match (e.downcast_ref::<nasp::MeshError>(), args.metrics) {
                (Some(nasp::MeshError::Prometheus(_)), Some(a)) => {
                    e.context(format!("--metrics {a}"))
                }
                _ => e,
            },
        )?;
    let id = mesh.id().to_string();
    let stats = Stats(mesh.metrics().clone());
    let mut tasks = tokio::task::JoinSet::new();

    let http = mesh
        .bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let http_addr = http.local_addr();
    let app = EchoApp {
        service: format!("{name}.{ns}"),
        id: id.clone(),
        endpoint: http_addr.to_string(),
        stats: stats.clone(),
    };
    let svc = tower::service_fn(move |req: http::Request<Body>| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.answer(req).await) }
    });
    let m = mesh.clone();
    tasks.spawn(async move { m.serve(http, svc).await });

    let mut grpc_addr = None;
    if let Some(addr) = args.grpc {
        let l = mesh
            .bind(addr)
            .await
            .with_context(|| format!("--grpc {addr}"))?;
        let local = l.local_addr();
        grpc_addr = Some(local);
        let routes = tonic::service::Routes::new(
            nasp::transport::EchoService::new(id.clone(), local.to_string()).into_server(),
        );
        let stats = stats.clone();
        let svc = tower::service_fn(move |req: http::Request<Body>| {
            let (routes, stats) = (routes.clone(), stats.clone());
            async move {
                let peer = peer_of(&req);
                let resp = routes.oneshot(req).await?;
                let grpc_status = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_string();
                stats.count(
                    "nasp_requests_total",
                    &[
                        ("protocol", "grpc"),
                        ("response_code", resp.status().as_str()),
                        ("grpc_response_status", &grpc_status),
                        ("source_principal", &peer),
                    ],
                );
                Ok::<_, Infallible>(resp)
            }
        });
        let m = mesh.clone();
        tasks.spawn(async move { m.serve(l, svc).await });
    }

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tcp_addr = None;
    if let Some(addr) = args.tcp_echo {
        let l = mesh
            .bind(addr)
            .await
            .with_context(|| format!("--tcp-echo {addr}"))?;
        tcp_addr = Some(l.local_addr());
        tasks.spawn(tcp_echo(l, stats.clone(), stop_rx.clone()));
    }

    // One line a script can wait for.
    crate::identity::print_json_line(&json!({
        "serving": format!("{name}.{ns}"),
        "id": id,
        "http": http_addr.to_string(),
        "grpc": grpc_addr.map(|a| a.to_string()),
        "tcp_echo": tcp_addr.map(|a| a.to_string()),
        "metrics": mesh.prometheus_addr().map(|a| a.to_string()),
    }))?;

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = crate::identity::terminate() => {}
    }
    let _ = stop.send(true);
    mesh.shutdown().await;
    tasks.abort_all();
    Ok(())
}

fn peer_of<B>(req: &http::Request<B>) -> String {
    req.extensions()
        .get::<MeshPeer>()
        .and_then(|p| p.id.as_ref())
        .map_or_else(String::new, ToString::to_string)
}

/// The HTTP echo app.
#[derive(Clone)]
struct EchoApp {
    service: String,
    id: String,
    endpoint: String,
    stats: Stats,
}

impl EchoApp {
    async fn answer(&self, req: http::Request<Body>) -> http::Response<Body> {
        let (parts, body) = req.into_parts();
        let peer = parts.extensions.get::<MeshPeer>().cloned();
        let caller = peer
            .as_ref()
            .and_then(|p| p.id.as_ref())
            .map(ToString::to_string);
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &parts.headers {
            let v = String::from_utf8_lossy(v.as_bytes());
            headers
                .entry(k.as_str().to_string())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(&v);
                })
                .or_insert_with(|| v.into_owned());
        }
        let (status, body) = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => (http::StatusCode::OK, Ok(b.to_bytes())),
            Err(e) => {
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                if too_big {
                    (
                        http::StatusCode::PAYLOAD_TOO_LARGE,
                        Err(format!("body over {MAX_BODY} bytes")),
                    )
                } else {
                    (
                        http::StatusCode::BAD_REQUEST,
                        Err(format!("reading the body: {e}")),
                    )
                }
            }
        };
        let mut answer = json!({
            "service": self.service,
            "served_by": self.id,
            "endpoint": self.endpoint,
            "peer": caller,
            "peer_address": peer.as_ref().map(|p| p.addr.to_string()),
            "mtls": peer.as_ref().is_some_and(|p| p.mtls),
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            "protocol": format!("{:?}", parts.version),
            "headers": headers,
        });
        match &body {
            Ok(b) => {
                answer["body_bytes"] = json!(b.len());
                let shown = &b[..b.len().min(BODY_SHOWN)];
                answer["body"] = json!(String::from_utf8_lossy(shown));
            }
            Err(e) => answer["error"] = json!(e),
        }
        self.stats.count(
            "nasp_requests_total",
            &[
                ("protocol", "http"),
                ("response_code", status.as_str()),
                ("request_method", parts.method.as_str()),
                ("source_principal", caller.as_deref().unwrap_or("")),
            ],
        );
        let text = serde_json::to_string_pretty(&answer).unwrap_or_else(|_| "{}".into()) + "\n";
        let mut resp = http::Response::new(Body::from(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&self.id) {
            h.insert("x-served-by", v);
        }
        resp
    }
}

/// Echoes each connection's bytes back until it closes.
async fn tcp_echo(
    mut listener: nasp::transport::MeshListener,
    stats: Stats,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(conn) = conn else { return };
        let peer = conn
            .peer_id
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        stats.count(
            "nasp_tcp_connections_opened_total",
            &[("source_principal", &peer)],
        );
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(conn.stream);
            if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                tracing::debug!("tcp echo: {e}");
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
        });
    }
}
