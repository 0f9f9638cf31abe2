//! The tracer (feature `otel`): the OpenTelemetry SDK with Istio's
//! sampling, an OTLP/gRPC batch exporter, and the tower layer that makes
//! one span per request on a mesh's client and served services.
//!
//! Spans carry Envoy's standard tags and Istio's custom tags under their
//! names (`http.url`, `upstream_cluster`, `guid:x-request-id`,
//! `istio.canonical_service`, …), all string values as Envoy writes them,
//! so that a trace of a nasp workload reads as one of a sidecar.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use nasp_transport::{Body, BoxError, LocalReply, MeshPeer, Upstream};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceId,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracer,
    SdkTracerProvider, ShouldSample, Span,
};
use tower::Service;

use super::propagation::{self, Incoming};
use super::{Propagator, TracingConfig};
use crate::MeshHttpClient;

/// A running tracer: the SDK's provider (its batch thread), the tags
/// every span carries, the headers written.
pub(crate) struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagators: Arc<[Propagator]>,
    tags: Arc<[KeyValue]>,
    /// Outbound `peer.address`: the application's address, Envoy's
    /// downstream on the outbound side.
    local_ip: Option<IpAddr>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("propagators", &self.propagators)
            .finish_non_exhaustive()
    }
}

/// Istio's canonical service of a workload: the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`,
/// else `app`, else the workload's name.
fn canonical_service(w: &nasp_xds::WorkloadSettings) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()).cloned())
    .unwrap_or_else(|| w.workload().to_string())
}

/// Its canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
fn canonical_revision(w: &nasp_xds::WorkloadSettings) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()).cloned())
    .unwrap_or_else(|| "latest".to_string())
}

/// Marks a parent context whose sampling decision is ours to make (B3
/// ids without `x-b3-sampled`), or a decision without a parent (`b3: 0`).
#[derive(Clone, Copy, Debug)]
enum Decision {
    Deferred,
    Forced(bool),
}

/// Istio's sampling: the caller's decision when it made one, else a
/// percentage of trace ids (the SDK's ratio sampler, so every span of a
/// trace decides alike).
#[derive(Clone, Debug)]
struct IstioSampler {
    ratio: Sampler,
}

impl ShouldSample for IstioSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let state = parent
            .map(|p| p.span().span_context().trace_state().clone())
            .unwrap_or_default();
        let decided = |sample: bool| SamplingResult {
            decision: if sample {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: state.clone(),
        };
        match parent.and_then(|p| p.get::<Decision>().copied()) {
            Some(Decision::Forced(s)) => return decided(s),
            Some(Decision::Deferred) => {}
            None => {
                if let Some(p) = parent.filter(|p| p.span().span_context().is_valid()) {
                    return decided(p.span().span_context().is_sampled());
                }
            }
        }
        let mut r = self
            .ratio
            .should_sample(None, trace_id, name, kind, attributes, links);
        r.trace_state = state;
        r
    }
}

/// The exporter, logging its first failure (and the recovery), not one
/// line per batch: the SDK's own logs are off.
#[derive(Debug)]
struct Exporter {
    inner: opentelemetry_otlp::SpanExporter,
    endpoint: String,
    failing: Arc<AtomicBool>,
}

impl opentelemetry_sdk::trace::SpanExporter for Exporter {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let n = batch.len();
        let fut = self.inner.export(batch);
        let (failing, endpoint) = (self.failing.clone(), self.endpoint.clone());
        async move {
            let r = fut.await;
            match &r {
                Err(e) if !failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                    "tracing: exporting {n} spans to {endpoint} failed: {e} \
                     (spans are dropped until it works; traffic is not affected)"
                ),
                Ok(()) if failing.swap(false, Ordering::Relaxed) => {
                    tracing::info!("tracing: exporting to {endpoint} works again");
                }
                _ => {}
            }
            r
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

impl Tracing {
    /// Starts the exporter and the SDK (a batch thread). Must run in a
    /// tokio runtime: the gRPC channel's connection task runs on it. The
    /// channel connects lazily, so an unreachable collector does not fail
    /// this.
    pub(crate) fn start(
        config: &TracingConfig,
        workload: &nasp_xds::WorkloadSettings,
    ) -> Result<Arc<Self>, String> {
        let inner = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| format!("tracing: OTLP exporter to {:?}: {e}", config.endpoint))?;
        let exporter = Exporter {
            inner,
            endpoint: config.endpoint.clone(),
            failing: Arc::new(AtomicBool::new(false)),
        };
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(config.export_interval)
            .with_max_queue_size(config.max_queue.max(1))
            .build();
        let service = canonical_service(workload);
        // Istio names the trace's service `<canonical service>.<namespace>`.
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(format!("{service}.{}", workload.namespace))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_sampler(IstioSampler {
                ratio: Sampler::TraceIdRatioBased(config.sampling_percent / 100.0),
            })
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("nasp");
        let node = workload.node();
        let s = |k: &'static str, v: String| KeyValue::new(k, v);
        let tags: Vec<KeyValue> = vec![
            s("node_id", node.id),
            // Envoy's locality zone; nasp's workload settings have none.
            s("zone", String::new()),
            s("component", "proxy".into()),
            s("downstream_cluster", "-".into()),
            s("istio.canonical_service", service),
            s("istio.canonical_revision", canonical_revision(workload)),
            s("istio.mesh_id", workload.mesh_id.clone()),
            s("istio.namespace", workload.namespace.clone()),
            s("istio.cluster_id", workload.cluster_id.clone()),
        ];
        Ok(Arc::new(Self {
            provider,
            tracer,
            propagators: config.propagators.clone().into(),
            tags: tags.into(),
            local_ip: workload.instance_ips.iter().find_map(|ip| ip.parse().ok()),
            stopped: AtomicBool::new(false),
        }))
    }

    /// Wraps the mesh's client: a CLIENT span per request.
    pub(crate) fn outbound(
        self: &Arc<Self>,
        inner: MeshHttpClient,
        _local: Option<SocketAddr>,
    ) -> MeshHttpClient {
        tower::util::BoxCloneSyncService::new(TraceService {
            inner,
            tracing: self.clone(),
            side: Side::Outbound,
            local: None,
        })
    }

    /// Wraps a served service: a SERVER span per request.
    pub(crate) fn inbound(
        self: &Arc<Self>,
        inner: MeshHttpClient,
        local: SocketAddr,
    ) -> MeshHttpClient {
        tower::util::BoxCloneSyncService::new(TraceService {
            inner,
            tracing: self.clone(),
            side: Side::Inbound,
            local: Some(local),
        })
    }

    /// Sends what is queued and stops the exporter, within the export
    /// timeout; once.
    pub(crate) async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let provider = self.provider.clone();
        // The SDK's shutdown blocks until the batch thread has exported,
        // and the export runs on this runtime: off the runtime's threads.
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(Duration::from_secs(15), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!("tracing: shutdown: {e}"),
            Ok(Err(e)) => tracing::debug!("tracing: shutdown task: {e}"),
            Err(_) => tracing::warn!("tracing: the exporter did not stop within 15 s"),
        }
    }

    /// The parent of a new span and the span id B3 names as its parent.
    fn parent(&self, incoming: Incoming) -> (Context, Option<SpanId>) {
        match incoming {
            Incoming::None => (Context::new(), None),
            Incoming::Decision(s) => (Context::new().with_value(Decision::Forced(s)), None),
            Incoming::Parent { context, sampled } => {
                let id = context.span_id();
                let cx = Context::new().with_remote_span_context(context);
                match sampled {
                    Some(_) => (cx, Some(id)),
                    None => (cx.with_value(Decision::Deferred), Some(id)),
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Outbound,
    Inbound,
}

#[derive(Clone)]
struct TraceService {
    inner: MeshHttpClient,
    tracing: Arc<Tracing>,
    side: Side,
    /// Inbound: the listener.
    local: Option<SocketAddr>,
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// `<host>:<port>/*`, Istio's route decorator (outbound it names the
/// cluster's service; inbound nasp has the request's host).
fn operation(host: &str, port: Option<u16>) -> String {
    match (host.rsplit_once(':'), port) {
        (Some((_, p)), _) if p.parse::<u16>().is_ok() => format!("{host}/*"),
        (_, Some(port)) => format!("{host}:{port}/*"),
        _ => format!("{host}/*"),
    }
}

/// The service and port of an Istio cluster name
/// (`outbound|9080|v1|reviews.default.svc.cluster.local`).
fn cluster_operation(cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    let (dir, port, _subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (dir == "outbound" && !host.is_empty() && port.parse::<u16>().is_ok())
        .then(|| format!("{host}:{port}/*"))
}

/// gRPC codes Envoy maps to a 5xx (`grpcToHttpStatus`): unknown,
/// deadline exceeded, unimplemented, internal, unavailable, data loss.
fn grpc_is_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

fn grpc_status(h: &http::HeaderMap) -> Option<i64> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

impl Service<Request<Body>> for TraceService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let t = &self.tracing;
        let incoming = match self.side {
            Side::Inbound => propagation::extract(req.headers()),
            // The application's own headers first (it passed on what it
            // was handed, or has a context of its own), else the context
            // of the served request it runs in.
            Side::Outbound if propagation::has_context(req.headers()) => {
                propagation::extract(req.headers())
            }
            Side::Outbound => {
                let cx = Context::current();
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    let sampled = sc.is_sampled();
                    Incoming::Parent {
                        context: sc,
                        sampled: Some(sampled),
                    }
                } else {
                    Incoming::None
                }
            }
        };
        let (parent_cx, parent_id) = t.parent(incoming);
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header("host"))
            .unwrap_or_default();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let scheme = req.uri().scheme_str().unwrap_or("http");
        let mut attrs: Vec<KeyValue> = t.tags.to_vec();
        let s = |k: &'static str, v: String| KeyValue::new(k, v);
        attrs.push(s("http.url", format!("{scheme}://{authority}{path}")));
        attrs.push(s("http.method", req.method().as_str().to_string()));
        attrs.push(s("http.protocol", protocol(req.version()).to_string()));
        attrs.push(s(
            "user_agent",
            header("user-agent").unwrap_or_else(|| "-".into()),
        ));
        if let Some(id) = header("x-request-id") {
            attrs.push(s("guid:x-request-id", id));
        }
        let peer = match self.side {
            Side::Inbound => req.extensions().get::<MeshPeer>().map(|p| p.addr.ip()),
            Side::Outbound => t.local_ip,
        };
        if let Some(ip) = peer {
            attrs.push(s("peer.address", ip.to_string()));
        }
        let (kind, name) = match self.side {
            Side::Inbound => {
                if let Some(local) = self.local {
                    attrs.push(s("upstream_cluster", format!("inbound|{}||", local.port())));
                    attrs.push(s(
                        "upstream_cluster.name",
                        format!("inbound|{}||", local.port()),
                    ));
                    attrs.push(s("upstream_address", local.to_string()));
                }
                (
                    SpanKind::Server,
                    operation(&authority, self.local.map(|l| l.port())),
                )
            }
            Side::Outbound => (
                SpanKind::Client,
                operation(&authority, req.uri().port_u16()),
            ),
        };
        let builder = t
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs);
        let span = t.tracer.build_with_context(builder, &parent_cx);
        let context = span.span_context().clone();
        // Envoy writes its span's context on the request it passes on: to
        // the upstream outbound, to the application inbound (which passes
        // it on to its own calls).
        propagation::inject(req.headers_mut(), &context, parent_id, &t.propagators);
        let (req, received) = crate::counted::count_request(req);
        let side = self.side;
        let mut open = Open {
            span: Some(span),
            received,
            sent: 0,
            code: 0,
            grpc: None,
            flags: String::new(),
            side,
        };
        let fut = self.inner.call(req);
        let fut: Self::Future = match side {
            // The application's handler runs in the server span's
            // context: a call it makes without passing headers on
            // continues the trace too.
            Side::Inbound => Box::pin(fut.with_context(Context::new().with_remote_span_context(
                SpanContext::new(
                    context.trace_id(),
                    context.span_id(),
                    context.trace_flags(),
                    false,
                    context.trace_state().clone(),
                ),
            ))),
            Side::Outbound => fut,
        };
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    open.code = resp.status().as_u16();
                    open.grpc = grpc_status(resp.headers());
                    if let Some(lr) = resp.extensions().get::<LocalReply>() {
                        open.flags = lr.flags.to_string();
                    }
                    if side == Side::Outbound
                        && let Some(span) = &mut open.span
                        && let Some(u) = resp.extensions().get::<Upstream>()
                    {
                        if let Some(op) = cluster_operation(&u.cluster) {
                            span.update_name(op);
                        }
                        span_set(span, "upstream_cluster", u.cluster.to_string());
                        span_set(span, "upstream_cluster.name", u.cluster.to_string());
                        span_set(span, "upstream_address", u.address.to_string());
                    }
                    Ok(resp.map(|b| Body::new(Traced { inner: b, open })))
                }
                Err(e) => {
                    // No response reached the caller: Envoy's code 0.
                    open.finish(true);
                    Err(e)
                }
            }
        })
    }
}

fn span_set(span: &mut Span, key: &'static str, value: String) {
    span.set_attribute(KeyValue::new(key, value));
}

/// The span of a request whose response is still streaming: ended once,
/// when the body ends, breaks or is dropped.
struct Open {
    span: Option<Span>,
    received: Arc<AtomicU64>,
    sent: u64,
    code: u16,
    grpc: Option<i64>,
    flags: String,
    side: Side,
}

impl Open {
    fn finish(&mut self, broke: bool) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        if broke && self.flags.is_empty() && self.code != 0 {
            self.flags = match self.side {
                Side::Outbound => "UR".into(),
                Side::Inbound => "DC".into(),
            };
        }
        span_set(&mut span, "http.status_code", self.code.to_string());
        span_set(
            &mut span,
            "response_flags",
            if self.flags.is_empty() {
                "-".into()
            } else {
                self.flags.clone()
            },
        );
        span_set(
            &mut span,
            "request_size",
            self.received.load(Ordering::Relaxed).to_string(),
        );
        span_set(&mut span, "response_size", self.sent.to_string());
        if let Some(g) = self.grpc {
            span_set(&mut span, "grpc.status_code", g.to_string());
        }
        let error =
            self.code == 0 || self.code >= 500 || self.grpc.is_some_and(grpc_is_error) || broke;
        if error {
            span_set(&mut span, "error", "true".into());
            span.set_status(Status::error(match self.code {
                0 => "no response".to_string(),
                c => format!("HTTP {c}"),
            }));
        }
        span.end();
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A response body that ends the request's span at its end.
struct Traced {
    inner: Body,
    open: Open,
}

impl http_body::Body for Traced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.open.sent += d.len() as u64;
                }
                if let Some(t) = f.trailers_ref()
                    && let Some(g) = grpc_status(t)
                {
                    self.open.grpc = Some(g);
                }
                if self.inner.is_end_stream() {
                    self.open.finish(false);
                }
            }
            Poll::Ready(None) => self.open.finish(false),
            Poll::Ready(Some(Err(_))) => self.open.finish(true),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceState;

    #[test]
    fn span_names_are_istios_route_decorators() {
        assert_eq!(
            cluster_operation("outbound|9080|v1|reviews.default.svc.cluster.local").as_deref(),
            Some("reviews.default.svc.cluster.local:9080/*")
        );
        assert_eq!(cluster_operation("inbound|9080||"), None);
        assert_eq!(cluster_operation("PassthroughCluster"), None);
        assert_eq!(
            operation("echo.demo:18080", Some(18080)),
            "echo.demo:18080/*"
        );
        assert_eq!(operation("echo.demo", Some(18080)), "echo.demo:18080/*");
        assert_eq!(operation("echo.demo", None), "echo.demo/*");
    }

    #[test]
    fn canonical_names_follow_istios_labels() {
        let mut w = nasp_xds::WorkloadSettings {
            workload_name: "reviews-v2".into(),
            ..Default::default()
        };
        assert_eq!(canonical_service(&w), "reviews-v2");
        assert_eq!(canonical_revision(&w), "latest");
        w.labels.insert("app".into(), "reviews".into());
        w.labels.insert("version".into(), "v2".into());
        assert_eq!(
            (canonical_service(&w), canonical_revision(&w)),
            ("reviews".into(), "v2".into())
        );
        w.labels
            .insert("service.istio.io/canonical-name".into(), "rev".into());
        assert_eq!(canonical_service(&w), "rev");
    }

    #[test]
    fn the_sampler_follows_a_decision_and_samples_new_traces_by_ratio() {
        let never = IstioSampler {
            ratio: Sampler::TraceIdRatioBased(0.0),
        };
        let always = IstioSampler {
            ratio: Sampler::TraceIdRatioBased(1.0),
        };
        let trace = TraceId::from(0x1234_u128);
        let sample = |s: &IstioSampler, cx: Option<&Context>| {
            s.should_sample(cx, trace, "x", &SpanKind::Server, &[], &[])
                .decision
                == SamplingDecision::RecordAndSample
        };
        assert!(!sample(&never, None));
        assert!(sample(&always, None));
        let parent = |sampled: bool| {
            Context::new().with_remote_span_context(SpanContext::new(
                trace,
                SpanId::from(7_u64),
                if sampled {
                    opentelemetry::trace::TraceFlags::SAMPLED
                } else {
                    opentelemetry::trace::TraceFlags::default()
                },
                true,
                TraceState::default(),
            ))
        };
        assert!(sample(&never, Some(&parent(true))), "sampled parent");
        assert!(!sample(&always, Some(&parent(false))), "unsampled parent");
        let deferred = parent(false).with_value(Decision::Deferred);
        assert!(sample(&always, Some(&deferred)));
        assert!(!sample(&never, Some(&deferred)));
        let forced = Context::new().with_value(Decision::Forced(true));
        assert!(sample(&never, Some(&forced)));
        assert!(grpc_is_error(14) && !grpc_is_error(5) && !grpc_is_error(0));
    }
}
