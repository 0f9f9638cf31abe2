//! The outbound HTTP client: what an Istio sidecar does to a request the
//! application sends, as a tower stack a reader can follow top to bottom.
//!
//! ```text
//! HttpClient ─► Route ─► Cluster ─► Connect
//!               │        │          └ a pooled HTTP/1.1 or HTTP/2 connection to the
//!               │        │            endpoint: mTLS with Istio's SNI, ALPN and SANs
//!               │        │            from the view, or plaintext where the view says so
//!               │        └ per attempt: an endpoint from the balancer (healthy ones,
//!               │          round robin / least request), retries as the route's policy
//!               │          says (connect failure, refused stream, status codes), with
//!               │          back-off and Istio's previous-hosts predicate
//!               └ the destination from the mesh view (host, port), the first matching
//!                 route (path, headers, query), the weighted cluster, rewrites, header
//!                 changes, the route timeout; redirects, direct responses, 404 / 503
//!                 as Envoy answers them
//! ```
//!
//! Each layer is a `tower::Service<http::Request<Body>>` and hands its
//! decision to the next as a request extension ([`Routed`], then the
//! endpoint). Bodies stream through: nothing is buffered, except a small
//! request body (≤ 64 KiB, known length) when the route may retry after
//! sending, as Envoy buffers for retries.
//!
//! The view is read once per request from a [`ViewSource`] (the ADS
//! client's lock-free view, or a [`StaticView`]), so an xDS update moves
//! the next request without touching requests in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use nasp_xds::cluster::{ClusterInfo, TlsMode, UpstreamProtocol};
use nasp_xds::route::{HeaderAppend, HeaderMutations, HostRewrite, PathMatch, RetryPolicy, Route};
use nasp_xds::{MeshView, Outbound, RequestHeaders, RouteDecision};

use crate::balance::{Balancers, InFlight, Outcome, Slot};
use crate::body::{Body, BoxError};
use crate::info::Upstream;
use crate::outbound::MeshConnector;
use crate::pool::{
    CheckoutError, ConnInfo, ConnLimits, ConnectError, PoolKey, Pools, Proto, Sender, TlsTarget,
};

/// Where the client reads the mesh from.
pub trait ViewSource: Send + Sync + 'static {
    /// The mesh as it is now.
    fn view(&self) -> Arc<MeshView>;
}

impl ViewSource for nasp_xds::AdsClient {
    fn view(&self) -> Arc<MeshView> {
        nasp_xds::AdsClient::view(self)
    }
}

/// A view set by hand: a config dump, a test, an embedder's own source.
#[derive(Debug, Default)]
pub struct StaticView(arc_swap::ArcSwap<MeshView>);

impl StaticView {
    /// A source serving `view`.
    pub fn new(view: MeshView) -> Self {
        Self(arc_swap::ArcSwap::from_pointee(view))
    }

    /// Replaces the view; the next request uses it.
    pub fn set(&self, view: MeshView) {
        self.0.store(Arc::new(view));
    }
}

impl ViewSource for StaticView {
    fn view(&self) -> Arc<MeshView> {
        self.0.load_full()
    }
}

/// Request bodies up to this size are kept for retries after sending.
const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// Why the client could not even start: the request is not one it can
/// route. Everything past routing (no route, no endpoint, upstream
/// failures) is answered as Envoy answers it, with a local response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request names no host (neither an absolute URI nor `Host`).
    #[error(
        "request has no authority (use an absolute URI such as http://echo.demo/ or a Host header)"
    )]
    NoAuthority,
    /// The host is not in the mesh and passthrough is off.
    #[error("{0} is not a mesh destination (and passthrough is disabled)")]
    NotInMesh(String),
    /// Passthrough to a host outside the mesh failed to resolve it.
    #[error("resolving {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
}

/// Settings of the client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Send requests for hosts outside the mesh straight to them, in
    /// plaintext (Istio's default `ALLOW_ANY`); off: an error.
    pub passthrough: bool,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// This workload's IP, the "source IP" of hash policies that use it
    /// (Envoy hashes the downstream address, which for a sidecar's outbound
    /// traffic is the workload's). `None`: a random value fixed for the
    /// client's lifetime, so one client still sticks to one endpoint.
    pub source_ip: Option<std::net::IpAddr>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            passthrough: true,
            max_idle_per_endpoint: 64,
            idle_timeout: Duration::from_secs(90),
            source_ip: None,
        }
    }
}

/// A local response the client made instead of an upstream one (Envoy's
/// local reply), as a response extension: the response flag as Envoy's
/// access log writes it and the details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// `NR` (no route), `NC` (no cluster), `UH` (no healthy upstream), `UF`
    /// (upstream connect failure), `URX` (retries exhausted), `UT`
    /// (timeout), `UR` (upstream reset), `DC`…; empty for a configured
    /// direct response or redirect.
    pub flags: &'static str,
    /// What happened.
    pub details: String,
}

/// What the route decided, for the cluster layer.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The cluster.
    pub cluster: Arc<ClusterInfo>,
    /// The route's name.
    pub route: Arc<str>,
    /// Its retry policy.
    pub retry: Option<RetryPolicy>,
    /// Its per-request timeout.
    pub timeout: Option<Duration>,
    /// The request's hash from the route's hash policy (ring hash, Maglev).
    pub hash: Option<u64>,
    /// Send `x-envoy-attempt-count` with each attempt.
    pub attempt_count: bool,
}

/// The endpoint picked for one attempt, for the connect layer.
#[derive(Clone, Debug)]
struct Attempt {
    key: PoolKey,
    connect_timeout: Duration,
    limits: ConnLimits,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The mesh HTTP client (see the module docs). Cheap to clone; clones
/// share pools and balancers.
#[derive(Clone, Debug)]
pub struct HttpClient {
    route: RouteLayer,
}

impl HttpClient {
    /// A client routing by `views`, connecting with `connector`.
    pub fn new(views: Arc<dyn ViewSource>, connector: MeshConnector) -> Self {
        Self::with_settings(views, connector, ClientSettings::default())
    }

    /// As [`HttpClient::new`], with settings.
    pub fn with_settings(
        views: Arc<dyn ViewSource>,
        connector: MeshConnector,
        settings: ClientSettings,
    ) -> Self {
        let mut pools = Pools::new(connector);
        pools.max_idle = settings.max_idle_per_endpoint;
        pools.idle_timeout = settings.idle_timeout;
        let connect = ConnectLayer {
            pools: Arc::new(pools),
        };
        let cluster = ClusterLayer {
            balancers: Arc::default(),
            inner: connect,
        };
        let source_key: Arc<str> = match settings.source_ip {
            Some(ip) => Arc::from(ip.to_string()),
            None => Arc::from(format!("nasp-client-{:016x}", rand::random::<u64>())),
        };
        Self {
            route: RouteLayer {
                views,
                settings: Arc::new(settings),
                source_key,
                passthrough_counters: Arc::default(),
                inner: cluster,
            },
        }
    }

    /// Sends one request: `http://host[:port]/path` (or a `Host` header),
    /// routed through the mesh.
    pub async fn request<B>(&self, req: Request<B>) -> Result<Response<Body>, ClientError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.route.call(req.map(Body::new)).await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response<Body>, BoxError> {
        let req = Request::get(url).body(Body::empty())?;
        Ok(self.request(req).await?)
    }

    /// Connections open or idle in the pools (for tests and stats: it grows
    /// with endpoints, not with requests).
    pub fn pooled_connections(&self) -> usize {
        self.route.inner.inner.pools.connections()
    }
}

impl<B> tower::Service<Request<B>> for HttpClient
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Response<Body>, BoxError>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = self.route.clone();
        Box::pin(async move { Ok(route.call(req.map(Body::new)).await?) })
    }
}

/// A gRPC channel through the mesh: generated tonic clients take it as
/// they take tonic's own `Channel` (`EchoClient::new(channel)`). Every call
/// goes to `authority` (e.g. `backend.demo:9090`) over HTTP/2 through `S`:
/// the [`HttpClient`] (routing, balancing, mTLS), or the client wrapped in
/// more layers (filters).
#[derive(Clone, Debug)]
pub struct GrpcChannel<S = HttpClient> {
    inner: S,
    authority: http::uri::Authority,
}

impl<S> GrpcChannel<S> {
    /// A channel to `uri` (`http://backend.demo:9090`, or just the
    /// authority) over `inner`.
    pub fn new(inner: S, uri: &str) -> Result<Self, ClientError> {
        let authority = match uri.parse::<Uri>() {
            Ok(u) => u.authority().cloned(),
            Err(_) => None,
        }
        .or_else(|| uri.parse::<http::uri::Authority>().ok())
        .ok_or(ClientError::NoAuthority)?;
        Ok(Self { inner, authority })
    }
}

impl<S, B> tower::Service<Request<B>> for GrpcChannel<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Response<Body>, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(u) = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
        {
            *req.uri_mut() = u;
        }
        *req.version_mut() = Version::HTTP_2;
        // The clone that was polled ready makes the call (tower's rule).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let fut = ready.call(req.map(Body::new));
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

// ---------------------------------------------------------------- route --

/// The request facts routing reads, over an `http::HeaderMap`, with the
/// pseudo-headers Envoy matches on.
struct Facts<'a> {
    headers: &'a http::HeaderMap,
    method: &'a str,
    authority: &'a str,
    scheme: &'a str,
    path: &'a str,
}

impl RequestHeaders for Facts<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            ":method" => Some(self.method),
            ":authority" => Some(self.authority),
            ":scheme" => Some(self.scheme),
            ":path" => Some(self.path),
            _ => self.headers.get(name).and_then(|v| v.to_str().ok()),
        }
    }
}

#[derive(Clone)]
struct RouteLayer {
    views: Arc<dyn ViewSource>,
    settings: Arc<ClientSettings>,
    /// What `source_ip` hash policies hash.
    source_key: Arc<str>,
    /// Circuit-breaker accounting of the passthrough cluster.
    passthrough_counters: Arc<crate::balance::ClusterCounters>,
    inner: ClusterLayer,
}

impl std::fmt::Debug for RouteLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteLayer").finish_non_exhaustive()
    }
}

/// A local response, as Envoy writes them (`text/plain`, the details as
/// the body).
fn local_reply(status: StatusCode, flags: &'static str, details: String) -> Response<Body> {
    let mut r = Response::new(Body::from(details.clone()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r.extensions_mut().insert(LocalReply { flags, details });
    r
}

/// Splits an authority into host and port (default by scheme).
fn host_port(authority: &str, https: bool) -> (String, u16) {
    let default = if https { 443 } else { 80 };
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        let port = p
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return (format!("[{h}]"), port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().unwrap_or(default)),
        _ => (authority.to_string(), default),
    }
}

fn apply_request_mutations(headers: &mut http::HeaderMap, levels: &[&HeaderMutations]) {
    for m in levels {
        for name in &m.request_remove {
            headers.remove(name.as_str());
        }
        for add in &m.request_add {
            add_header(
                headers,
                &add.name,
                &add.value,
                add.action,
                add.keep_empty_value,
            );
        }
    }
}

fn apply_response_mutations(headers: &mut http::HeaderMap, levels: &[&HeaderMutations]) {
    for m in levels {
        for name in &m.response_remove {
            headers.remove(name.as_str());
        }
        for add in &m.response_add {
            add_header(
                headers,
                &add.name,
                &add.value,
                add.action,
                add.keep_empty_value,
            );
        }
    }
}

fn add_header(
    headers: &mut http::HeaderMap,
    name: &str,
    value: &str,
    action: HeaderAppend,
    keep_empty: bool,
) {
    // Envoy's `%…%` formatters are not evaluated here: such a header is
    // left out rather than sent with the formatter text.
    if value.contains('%') || (value.is_empty() && !keep_empty) {
        return;
    }
    let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) else {
        return;
    };
    let present = headers.contains_key(&n);
    match action {
        HeaderAppend::AppendIfExistsOrAdd => {
            headers.append(n, v);
        }
        HeaderAppend::AddIfAbsent if !present => {
            headers.insert(n, v);
        }
        HeaderAppend::OverwriteIfExistsOrAdd => {
            headers.insert(n, v);
        }
        HeaderAppend::OverwriteIfExists if present => {
            headers.insert(n, v);
        }
        _ => {}
    }
}

/// The path after the route's rewrites.
fn rewritten_path(
    route: &Route,
    prefix: Option<&str>,
    regex: Option<&(regex::Regex, String)>,
    pq: &str,
) -> Option<String> {
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    let new = if let Some(rw) = prefix {
        let matched = match &route.matcher.path {
            PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p.len(),
            _ => return None,
        };
        let rest = path.get(matched.min(path.len())..).unwrap_or("");
        format!("{rw}{rest}")
    } else if let Some((re, sub)) = regex {
        re.replace_all(path, sub.as_str()).into_owned()
    } else {
        return None;
    };
    Some(match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    })
}

/// Envoy's HTTP → gRPC status mapping for local replies.
fn grpc_status_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A local reply to a gRPC request as Envoy sends it: a trailers-only
/// answer (HTTP 200, `grpc-status` from the HTTP status, the details as
/// `grpc-message`), so gRPC clients see `UNAVAILABLE` and not a body they
/// cannot parse.
fn grpc_local_reply(resp: Response<Body>) -> Response<Body> {
    if resp.headers().contains_key("grpc-status") {
        return resp;
    }
    let Some(lr) = resp.extensions().get::<LocalReply>().cloned() else {
        return resp;
    };
    let code = grpc_status_of(resp.status());
    let (mut parts, _) = resp.into_parts();
    parts.status = StatusCode::OK;
    parts.headers.clear();
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts.headers.insert("grpc-status", HeaderValue::from(code));
    // grpc-message is percent-encoded: keep printable ASCII but '%'.
    let msg: String = lr
        .details
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&msg) {
        parts.headers.insert("grpc-message", v);
    }
    Response::from_parts(parts, Body::empty())
}

impl RouteLayer {
    async fn call(&self, req: Request<Body>) -> Result<Response<Body>, ClientError> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let resp = self.call_routed(req).await?;
        Ok(if grpc { grpc_local_reply(resp) } else { resp })
    }

    async fn call_routed(&self, mut req: Request<Body>) -> Result<Response<Body>, ClientError> {
        let https = req.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let authority = match req.uri().authority() {
            Some(a) => a.as_str().to_string(),
            None => req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .ok_or(ClientError::NoAuthority)?,
        };
        let (host, port) = host_port(&authority, https);
        let view = self.views.view();
        let Some(outbound) = view.outbound(&host, port) else {
            if !self.settings.passthrough {
                return Err(ClientError::NotInMesh(format!("{host}:{port}")));
            }
            return self.passthrough(req, &authority, &host, port).await;
        };
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let dest = match outbound {
            Outbound::Cluster(cluster) => {
                let routed = Routed {
                    cluster,
                    route: Arc::from(""),
                    retry: None,
                    timeout: None,
                    hash: None,
                    attempt_count: false,
                };
                set_uri(&mut req, &authority, &pq);
                req.extensions_mut().insert(routed);
                return Ok(self.inner.call(req).await);
            }
            Outbound::Http(dest) => dest,
        };
        let method = req.method().as_str().to_string();
        let decision_owned;
        let (route, forward, cluster) = {
            let facts = Facts {
                headers: req.headers(),
                method: &method,
                authority: &authority,
                scheme: if https { "https" } else { "http" },
                path: &pq,
            };
            match view.route(&dest, &pq, &facts, rand::random()) {
                RouteDecision::Forward {
                    route,
                    forward,
                    cluster,
                } => {
                    decision_owned = (route.clone(), forward.clone());
                    (&decision_owned.0, &decision_owned.1, cluster)
                }
                RouteDecision::Redirect(_, r) => {
                    let mut loc = String::new();
                    let scheme =
                        r.scheme
                            .as_deref()
                            .unwrap_or(if https { "https" } else { "http" });
                    let (h, p) = host_port(&authority, https);
                    let h = r.host.clone().unwrap_or(h);
                    let p = r.port.unwrap_or(p);
                    let path = match &r.path {
                        nasp_xds::route::RedirectPath::Keep => pq.clone(),
                        nasp_xds::route::RedirectPath::Path(p) => p.clone(),
                        nasp_xds::route::RedirectPath::Prefix(p) => p.clone(),
                    };
                    let path = if r.strip_query {
                        path.split('?').next().unwrap_or("/").to_string()
                    } else {
                        path
                    };
                    loc.push_str(&format!("{scheme}://{h}:{p}{path}"));
                    let mut resp = local_reply(
                        StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                        "",
                        String::new(),
                    );
                    if let Ok(v) = HeaderValue::from_str(&loc) {
                        resp.headers_mut().insert(http::header::LOCATION, v);
                    }
                    return Ok(resp);
                }
                RouteDecision::DirectResponse { status, body, .. } => {
                    let mut resp = local_reply(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                        "",
                        String::new(),
                    );
                    *resp.body_mut() = body.map_or_else(Body::empty, |b| Body::from(b.to_vec()));
                    return Ok(resp);
                }
                RouteDecision::NoRoute => {
                    return Ok(local_reply(
                        StatusCode::NOT_FOUND,
                        "NR",
                        format!("no route for {authority}{pq}"),
                    ));
                }
                RouteDecision::ClusterNotFound(name) => {
                    return Ok(local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NC",
                        format!("cluster {} not found", name.unwrap_or("(from header)")),
                    ));
                }
            }
        };
        // Rewrites, then header changes: route, virtual host, route config
        // (Envoy's default order, most specific first).
        let mut authority = authority;
        match &forward.host_rewrite {
            HostRewrite::Literal(h) => authority = h.clone(),
            HostRewrite::Header(name) => {
                if let Some(v) = req
                    .headers()
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                {
                    authority = v.to_string();
                }
            }
            HostRewrite::None | HostRewrite::Auto => {}
        }
        let pq = rewritten_path(
            route,
            forward.prefix_rewrite.as_deref(),
            forward.regex_rewrite.as_ref(),
            &pq,
        )
        .unwrap_or(pq);
        apply_request_mutations(
            req.headers_mut(),
            &[
                &route.headers,
                &dest.virtual_host.headers,
                &dest.route_config.headers,
            ],
        );
        // Fault injection (Istio's VirtualService `fault`): the delay, then
        // the abort, each for its share of requests.
        if let Some(fault) = route.fault.as_ref().or(dest.virtual_host.fault.as_ref()) {
            if let Some((delay, share)) = fault.delay
                && rand::random::<f64>() < share
            {
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, share)) = &fault.abort
                && rand::random::<f64>() < *share
                && let Some(resp) = fault_abort(abort, req.headers())
            {
                return Ok(resp);
            }
        }
        set_uri(&mut req, &authority, &pq);
        let (hash, set_cookie) =
            request_hash(&forward.hash_policy, req.headers(), &pq, &self.source_key);
        let route_name: Arc<str> = Arc::from(route.name.as_str());
        // Mirrors (Istio's `mirror`): a copy to each mirror cluster for its
        // share, as Envoy's shadowing: authority `host-shadow`, no retries,
        // the answer dropped.
        let shadows: Vec<Arc<ClusterInfo>> = forward
            .mirrors
            .iter()
            .filter(|m| m.fraction >= 1.0 || rand::random::<f64>() < m.fraction)
            .filter_map(|m| view.cluster(&m.cluster))
            .collect();
        if !shadows.is_empty() {
            match mirror_body(&mut req).await {
                Ok(Some(body)) => {
                    for cluster in shadows {
                        let shadow = shadow_request(
                            &req,
                            &body,
                            Routed {
                                cluster,
                                route: route_name.clone(),
                                retry: None,
                                timeout: forward.timeout,
                                hash,
                                attempt_count: false,
                            },
                        );
                        let (inner, timeout) = (self.inner.clone(), forward.timeout);
                        tokio::spawn(async move {
                            let send = async {
                                let _ = inner.call(shadow).await.into_body().collect_bytes().await;
                            };
                            match timeout {
                                Some(t) => {
                                    let _ = tokio::time::timeout(t, send).await;
                                }
                                None => send.await,
                            }
                        });
                    }
                }
                Ok(None) => tracing::debug!(
                    route = %route.name,
                    "not mirrored: a body of unknown length or over 64 KiB"
                ),
                Err(e) => {
                    return Ok(local_reply(
                        StatusCode::BAD_REQUEST,
                        "DPE",
                        format!("reading the request body: {e}"),
                    ));
                }
            }
        }
        req.extensions_mut().insert(Routed {
            cluster,
            route: route_name,
            retry: forward.retry_policy.clone(),
            timeout: forward.timeout,
            hash,
            attempt_count: dest.virtual_host.include_request_attempt_count,
        });
        let mut resp = match forward.timeout {
            Some(t) => match tokio::time::timeout(t, self.inner.call(req)).await {
                Ok(r) => r,
                Err(_) => local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    format!("upstream request timeout ({t:?})"),
                ),
            },
            None => self.inner.call(req).await,
        };
        apply_response_mutations(
            resp.headers_mut(),
            &[
                &route.headers,
                &dest.virtual_host.headers,
                &dest.route_config.headers,
            ],
        );
        if let Some(cookie) = set_cookie {
            resp.headers_mut().append(http::header::SET_COOKIE, cookie);
        }
        Ok(resp)
    }

    /// A host outside the mesh: straight to it, plaintext (Istio's
    /// `PassthroughCluster`).
    async fn passthrough(
        &self,
        mut req: Request<Body>,
        authority: &str,
        host: &str,
        port: u16,
    ) -> Result<Response<Body>, ClientError> {
        let target = format!(
            "{}:{port}",
            host.trim_start_matches('[').trim_end_matches(']')
        );
        let addr = tokio::net::lookup_host(&target)
            .await
            .map_err(|e| ClientError::Resolve {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ClientError::Resolve {
                host: host.to_string(),
                reason: "no address".into(),
            })?;
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        set_uri(&mut req, authority, &pq);
        let proto = if req.version() == Version::HTTP_2 {
            Proto::H2
        } else {
            Proto::H1
        };
        let attempt = Attempt {
            key: PoolKey {
                addr,
                tls: None,
                proto,
            },
            connect_timeout: nasp_xds::cluster::DEFAULT_CONNECT_TIMEOUT,
            // Envoy's defaults for the PassthroughCluster (Istio sets none).
            limits: ConnLimits {
                counters: self.passthrough_counters.clone(),
                max_connections: crate::balance::DEFAULT_CIRCUIT_BREAKERS.0,
                max_pending: crate::balance::DEFAULT_CIRCUIT_BREAKERS.1,
            },
        };
        req.extensions_mut().insert(attempt);
        let upstream = Upstream {
            cluster: Arc::from("PassthroughCluster"),
            route: Arc::from("allow_any"),
            address: addr,
            mtls: false,
            peer_id: None,
            alpn: None,
            attempts: 1,
            services: Arc::from([]),
        };
        Ok(match self.inner.inner.call(req).await {
            Ok((mut r, _)) => {
                r.extensions_mut().insert(upstream);
                r
            }
            Err(e) => local_reply(StatusCode::SERVICE_UNAVAILABLE, "UF", e.to_string()),
        })
    }
}

/// The request's hash from a route's hash policies, as Envoy combines
/// them: each input's xxHash64, folded as `rotl(h, 1) ^ next`, stopping
/// after a terminal policy that produced one. Inputs that are absent give
/// nothing; none at all: no hash (the balancer then picks at random).
/// The source IP is the workload's (`ClientSettings::source_ip`); filter
/// state is not an input a client library has.
///
/// A cookie policy with a TTL whose cookie is missing generates one, as
/// Envoy's router: the value hashed is a fresh 64-bit hex string, and the
/// `Set-Cookie` returned goes on the response (`name="value"; Max-Age=ttl;
/// Path=path; HttpOnly`, no `Max-Age` for a zero TTL) so the caller's
/// cookie jar sends it back and stays on the host. Envoy derives the value
/// from the downstream connection's addresses; a client library has no
/// downstream connection, so it is random.
fn request_hash(
    policies: &[nasp_xds::route::HashPolicy],
    headers: &http::HeaderMap,
    pq: &str,
    source: &str,
) -> (Option<u64>, Option<http::HeaderValue>) {
    use nasp_xds::route::HashInput;
    let mut hash: Option<u64> = None;
    let mut set_cookie = None;
    for p in policies {
        let value: Option<String> = match &p.input {
            HashInput::Header(name) => headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            HashInput::Cookie { name, ttl, path } => {
                let found = headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|kv| kv.trim().split_once('='))
                    .find(|(k, _)| k == name)
                    // A quoted value is hashed without its quotes (as
                    // Envoy parses cookies).
                    .map(|(_, v)| {
                        v.strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v)
                            .to_string()
                    });
                match (found, ttl) {
                    (Some(v), _) => Some(v),
                    (None, Some(ttl)) => {
                        let value = format!("{:016x}", rand::random::<u64>());
                        let mut c = format!("{name}=\"{value}\"");
                        if !ttl.is_zero() {
                            c.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                        }
                        if !path.is_empty() {
                            c.push_str(&format!("; Path={path}"));
                        }
                        c.push_str("; HttpOnly");
                        // A name or path a header cannot carry: no cookie,
                        // and the request is hashed on the value anyway.
                        set_cookie = http::HeaderValue::from_str(&c).ok();
                        Some(value)
                    }
                    (None, None) => None,
                }
            }
            HashInput::QueryParameter(name) => pq
                .split_once('?')
                .map(|(_, q)| q)
                .into_iter()
                .flat_map(|q| q.split('&'))
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string()),
            HashInput::SourceIp => Some(source.to_string()),
            HashInput::FilterState(_) => None,
        };
        if let Some(v) = value {
            let h = crate::balance::xx_hash64(v.as_bytes());
            hash = Some(match hash {
                Some(prev) => prev.rotate_left(1) ^ h,
                None => h,
            });
            if p.terminal {
                break;
            }
        }
    }
    (hash, set_cookie)
}

/// The answer of an injected abort (`FI`): an HTTP status, or a gRPC
/// status in a trailers-only response; `Header` takes them from
/// `x-envoy-fault-abort-request` / `x-envoy-fault-abort-grpc-request` and
/// does nothing without them.
fn fault_abort(
    abort: &nasp_xds::route::FaultAbort,
    headers: &http::HeaderMap,
) -> Option<Response<Body>> {
    use nasp_xds::route::FaultAbort;
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    let (http_status, grpc) = match abort {
        FaultAbort::Http(s) => (Some(*s), None),
        FaultAbort::Grpc(g) => (None, Some(*g)),
        FaultAbort::Header => (
            header("x-envoy-fault-abort-request").and_then(|s| u16::try_from(s).ok()),
            header("x-envoy-fault-abort-grpc-request"),
        ),
    };
    if let Some(code) = grpc {
        let mut r = local_reply(StatusCode::OK, "FI", "fault filter abort".into());
        *r.body_mut() = Body::empty();
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
        return Some(r);
    }
    let status = StatusCode::from_u16(http_status?).ok()?;
    Some(local_reply(status, "FI", "fault filter abort".into()))
}

/// Sets the URI the next layers work with: always absolute, the authority
/// the upstream is to see.
/// The request body for a mirror: empty, or read whole when its length is
/// known and at most 64 KiB (the request then sends the same bytes).
/// Bodies of unknown length or larger are not mirrored (`None`): Envoy
/// streams them to the shadow too, which would need a copy held for the
/// slower of the two.
async fn mirror_body(req: &mut Request<Body>) -> Result<Option<Bytes>, BoxError> {
    let body = req.body();
    if http_body::Body::is_end_stream(body) {
        return Ok(Some(Bytes::new()));
    }
    if http_body::Body::size_hint(body)
        .exact()
        .is_none_or(|n| n > RETRY_BUFFER_LIMIT)
    {
        return Ok(None);
    }
    let bytes = std::mem::take(req.body_mut()).collect_bytes().await?;
    *req.body_mut() = Body::from(bytes.clone());
    Ok(Some(bytes))
}

/// A copy of `req` for a mirror cluster: Envoy's shadow authority (`-shadow`
/// after the host, before any port), the same method, headers and body.
fn shadow_request(req: &Request<Body>, body: &Bytes, routed: Routed) -> Request<Body> {
    let mut shadow = Request::new(Body::from(body.clone()));
    *shadow.method_mut() = req.method().clone();
    *shadow.version_mut() = req.version();
    *shadow.headers_mut() = req.headers().clone();
    let authority = req.uri().authority().map_or("", |a| a.as_str());
    let shadowed = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}-shadow:{p}")
        }
        _ => format!("{authority}-shadow"),
    };
    set_uri(
        &mut shadow,
        &shadowed,
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
    );
    shadow.extensions_mut().insert(routed);
    shadow
}

fn set_uri(req: &mut Request<Body>, authority: &str, pq: &str) {
    if let Ok(u) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = u;
    }
}

// -------------------------------------------------------------- cluster --

#[derive(Clone, Debug)]
struct ClusterLayer {
    balancers: Arc<Balancers>,
    inner: ConnectLayer,
}

/// Why an attempt failed, and whether the request is still there to retry.
#[derive(Debug)]
struct AttemptError {
    kind: AttemptErrorKind,
    message: String,
    /// The request, when nothing of it was sent.
    request: Option<Request<Body>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptErrorKind {
    /// No connection (connect, TLS handshake, HTTP handshake).
    Connect,
    /// The server refused the stream (HTTP/2 `REFUSED_STREAM`).
    Refused,
    /// The connection or stream broke after sending.
    Reset,
    /// The cluster's connection circuit breakers overflowed (503 `UO`,
    /// never retried).
    Overflow,
    /// A reused idle HTTP/1.1 connection was closed by the server as the
    /// request went out, before any byte of an answer (the keep-alive
    /// race): an idempotent request goes again on a new connection, once,
    /// whatever the retry policy (as HTTP clients retry stale keep-alive
    /// connections).
    Stale,
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A request body kept for another attempt.
enum Replay {
    /// Not kept: only an attempt that sent nothing can be retried.
    Once,
    /// Empty, or small and buffered.
    Bytes(Option<Bytes>),
    /// Sent as it streams while a copy is kept (up to the buffer limit), as
    /// Envoy buffers for retries without holding the request back; a retry
    /// can use the copy once the body has ended within the limit.
    Tee(Arc<std::sync::Mutex<TeeCopy>>),
}

impl Replay {
    /// Whether another attempt can have the body (a complete copy becomes
    /// plain bytes).
    fn replayable(&mut self) -> bool {
        if let Replay::Tee(t) = self {
            let copy = {
                let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (t.ended && !t.overflow).then(|| t.chunks.concat())
            };
            if let Some(c) = copy {
                *self = Replay::Bytes(Some(Bytes::from(c)));
            }
        }
        matches!(self, Replay::Bytes(_))
    }
}

/// What a [`TeeBody`] has copied so far.
#[derive(Debug, Default)]
struct TeeCopy {
    chunks: Vec<Bytes>,
    len: u64,
    ended: bool,
    /// Over the limit, or trailers: not replayable.
    overflow: bool,
}

/// A request body passed through as it streams, copied on the side.
struct TeeBody {
    inner: Body,
    copy: Arc<std::sync::Mutex<TeeCopy>>,
}

impl http_body::Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let mut copy = self
            .copy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &r {
            Poll::Ready(Some(Ok(f))) => match f.data_ref() {
                Some(d) if !copy.overflow => {
                    copy.len += d.len() as u64;
                    if copy.len > RETRY_BUFFER_LIMIT {
                        copy.overflow = true;
                        copy.chunks.clear();
                    } else {
                        copy.chunks.push(d.clone());
                    }
                }
                Some(_) => {}
                None => copy.overflow = true,
            },
            Poll::Ready(None) => copy.ended = true,
            Poll::Ready(Some(Err(_))) => copy.overflow = true,
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

/// A request rebuilt for another attempt (extensions are not carried).
fn rebuild(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

fn retriable_status(p: &RetryPolicy, resp: &Response<Body>) -> bool {
    let s = resp.status().as_u16();
    let on = &p.retry_on;
    if (on.server_error && s >= 500)
        || (on.gateway_error && matches!(s, 502..=504))
        || (on.retriable_4xx && s == 409)
        || (on.retriable_status_codes && p.retriable_status_codes.contains(&s))
    {
        return true;
    }
    // A trailers-only gRPC answer carries its status in the headers.
    match resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(1) => on.grpc_cancelled,
        Some(4) => on.grpc_deadline_exceeded,
        Some(8) => on.grpc_resource_exhausted,
        Some(13) => on.grpc_internal,
        Some(14) => on.grpc_unavailable,
        _ => false,
    }
}

fn retriable_error(p: &RetryPolicy, kind: AttemptErrorKind) -> bool {
    let on = &p.retry_on;
    // Envoy counts any upstream reset as a 5xx and a gateway error too.
    let any_reset = on.reset || on.server_error || on.gateway_error;
    match kind {
        AttemptErrorKind::Connect => any_reset || on.connect_failure || on.reset_before_request,
        AttemptErrorKind::Refused => any_reset || on.refused_stream,
        AttemptErrorKind::Reset => any_reset,
        AttemptErrorKind::Stale => true,
        AttemptErrorKind::Overflow => false,
    }
}

/// Whether a per-try timeout is retried: as Envoy, it is a local reset,
/// retried under `5xx`, `gateway-error` or `reset` only (Istio's default
/// policy has none of them).
fn retriable_timeout(p: &RetryPolicy) -> bool {
    let on = &p.retry_on;
    on.reset || on.server_error || on.gateway_error
}

/// Envoy's jittered exponential back-off: random in `[0, base·2ⁿ)`, at
/// most `max`.
fn backoff(p: &RetryPolicy, retry: u32) -> Duration {
    let base = p.back_off.base.as_millis().max(1) as u64;
    let cap = p.back_off.max.as_millis().max(1) as u64;
    let ceiling = base.saturating_mul(1u64 << retry.min(16)).min(cap);
    Duration::from_millis(rand::random_range(0..=ceiling))
}

impl ClusterLayer {
    async fn call(&self, req: Request<Body>) -> Response<Body> {
        let Some(routed) = req.extensions().get::<Routed>().cloned() else {
            return local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                "request reached the cluster layer without a route".into(),
            );
        };
        let lb = self.balancers.get(&routed.cluster);
        if lb.is_empty() {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                format!("no healthy upstream in {}", routed.cluster.name),
            );
        }
        // Circuit breakers (Envoy's defaults when the cluster sets none):
        // a request over `max_requests` is answered 503 `UO` at once.
        let (max_connections, max_pending, max_requests, max_retries) = routed
            .cluster
            .circuit_breakers
            .unwrap_or(crate::balance::DEFAULT_CIRCUIT_BREAKERS);
        let Some(request_slot) = Slot::try_take(&lb.counters, |c| &c.requests, max_requests) else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                format!(
                    "upstream overflow: {} has {max_requests} requests in flight (max_requests)",
                    routed.cluster.name
                ),
            );
        };
        let mut retry_slot: Option<Slot> = None;
        let policy = routed.retry.as_ref();
        let mut max_attempts = 1 + policy.map_or(0, |p| p.num_retries);
        let mut stale_retried = false;
        let avoid_previous = policy.is_some_and(|p| {
            p.host_predicates
                .contains(&nasp_xds::route::HostPredicate::PreviousHosts)
        });
        let (parts, body) = req.into_parts();
        let may_retry_after_send = policy.is_some_and(|p| {
            let on = &p.retry_on;
            on.server_error
                || on.gateway_error
                || on.retriable_4xx
                || on.retriable_status_codes
                || on.reset
                || on.refused_stream
                || on.grpc_cancelled
                || on.grpc_deadline_exceeded
                || on.grpc_internal
                || on.grpc_resource_exhausted
                || on.grpc_unavailable
        });
        let mut replay = Replay::Once;
        let mut once = Some(body);
        if let Some(b) = once.as_ref() {
            if http_body::Body::is_end_stream(b) {
                replay = Replay::Bytes(None);
            } else if may_retry_after_send
                && http_body::Body::size_hint(b)
                    .exact()
                    .is_some_and(|n| n <= RETRY_BUFFER_LIMIT)
                && let Some(b) = once.take()
            {
                match b.collect_bytes().await {
                    Ok(bytes) => replay = Replay::Bytes(Some(bytes)),
                    Err(e) => {
                        return local_reply(
                            StatusCode::BAD_REQUEST,
                            "DPE",
                            format!("reading the request body: {e}"),
                        );
                    }
                }
            } else if may_retry_after_send && let Some(b) = once.take() {
                // A body of unknown length (gRPC, streaming): sent as it
                // comes, copied on the side for a retry.
                let copy = Arc::new(std::sync::Mutex::new(TeeCopy::default()));
                once = Some(Body::new(TeeBody {
                    inner: b,
                    copy: copy.clone(),
                }));
                replay = Replay::Tee(copy);
            }
        }
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_failure = String::new();
        let mut attempt_no = 0;
        let mut pending: Option<Request<Body>> = None;
        while attempt_no < max_attempts {
            attempt_no += 1;
            let exclude: &[SocketAddr] = if avoid_previous { &tried } else { &[] };
            let Some(member) = lb.pick_hashed(exclude, routed.hash) else {
                break;
            };
            let addr = member.addr;
            tried.push(addr);
            let key = match endpoint_key(&routed.cluster, member, &parts) {
                Ok(k) => k,
                Err(details) => {
                    return local_reply(StatusCode::SERVICE_UNAVAILABLE, "UF", details);
                }
            };
            let mut req = match pending.take() {
                Some(r) => r,
                None => {
                    let body = match &replay {
                        Replay::Bytes(Some(b)) => Body::from(b.clone()),
                        Replay::Bytes(None) => Body::empty(),
                        Replay::Once | Replay::Tee(_) => match once.take() {
                            Some(b) => b,
                            None => break,
                        },
                    };
                    rebuild(&parts, body)
                }
            };
            if routed.attempt_count {
                req.headers_mut()
                    .insert("x-envoy-attempt-count", HeaderValue::from(attempt_no));
            }
            req.extensions_mut().insert(Attempt {
                key,
                connect_timeout: routed.cluster.connect_timeout,
                limits: ConnLimits {
                    counters: lb.counters.clone(),
                    max_connections,
                    max_pending,
                },
            });
            let in_flight = InFlight::start(&member.in_flight);
            let per_try = policy.and_then(|p| p.per_try_timeout);
            let outcome = match per_try {
                Some(t) => match tokio::time::timeout(t, self.inner.call(req)).await {
                    Ok(o) => o,
                    Err(_) => {
                        lb.report(addr, Outcome::LocalFailure);
                        last_failure = format!("per-try timeout ({t:?}) to {addr}");
                        // Retried under 5xx / gateway-error / reset, with
                        // attempts, the body and a retry slot left; else
                        // Envoy's answer to a timed-out try: 504 `UT`.
                        let again = policy.is_some_and(retriable_timeout)
                            && attempt_no < max_attempts
                            && replay.replayable()
                            && match Slot::try_take(
                                &lb.counters,
                                |c| &c.retries,
                                retry_limit(&routed.cluster, &lb, max_retries),
                            ) {
                                Some(s) => {
                                    retry_slot = Some(s);
                                    true
                                }
                                None => false,
                            };
                        if !again {
                            return local_reply(
                                StatusCode::GATEWAY_TIMEOUT,
                                "UT",
                                format!("upstream request timeout: {last_failure}"),
                            );
                        }
                        continue;
                    }
                },
                None => self.inner.call(req).await,
            };
            match outcome {
                Ok((mut resp, info)) => {
                    lb.report(addr, Outcome::Status(resp.status().as_u16()));
                    // A retry needs a retry slot (`max_retries`): without
                    // one the answer goes back as it is, as Envoy's retry
                    // overflow.
                    let again = attempt_no < max_attempts
                        && policy.is_some_and(|p| retriable_status(p, &resp))
                        && replay.replayable()
                        && match Slot::try_take(
                            &lb.counters,
                            |c| &c.retries,
                            retry_limit(&routed.cluster, &lb, max_retries),
                        ) {
                            Some(s) => {
                                retry_slot = Some(s);
                                true
                            }
                            None => false,
                        };
                    if again {
                        last_failure = format!("{} from {addr}", resp.status());
                        drop(resp);
                        drop(in_flight);
                        if let Some(p) = policy {
                            tokio::time::sleep(backoff(p, attempt_no - 1)).await;
                        }
                        continue;
                    }
                    resp.extensions_mut().insert(Upstream {
                        cluster: Arc::from(routed.cluster.name.as_str()),
                        route: routed.route.clone(),
                        address: addr,
                        mtls: info.peer_id.is_some() || info.alpn.is_some(),
                        peer_id: info.peer_id,
                        alpn: info.alpn,
                        attempts: attempt_no,
                        services: routed.cluster.services.clone(),
                    });
                    drop(retry_slot);
                    return resp.map(|b| {
                        Body::new(Tracked {
                            inner: b,
                            _in_flight: in_flight,
                            _request: request_slot,
                        })
                    });
                }
                Err(e) => {
                    drop(in_flight);
                    lb.report(addr, Outcome::LocalFailure);
                    last_failure = format!("{e} ({addr})");
                    // The keep-alive race costs one extra attempt, outside
                    // the policy's count.
                    if e.kind == AttemptErrorKind::Stale && !stale_retried && replay.replayable() {
                        stale_retried = true;
                        max_attempts += 1;
                        continue;
                    }
                    let can = policy.is_some_and(|p| retriable_error(p, e.kind))
                        && attempt_no < max_attempts
                        && match Slot::try_take(
                            &lb.counters,
                            |c| &c.retries,
                            retry_limit(&routed.cluster, &lb, max_retries),
                        ) {
                            Some(s) => {
                                retry_slot = Some(s);
                                true
                            }
                            None => false,
                        };
                    if !can {
                        return failure_reply(e.kind, &last_failure, attempt_no > 1);
                    }
                    // Nothing was sent: the same request goes again;
                    // otherwise it must be replayable.
                    match e.request {
                        Some(r) => {
                            let mut r = r;
                            r.extensions_mut().remove::<Attempt>();
                            pending = Some(r);
                        }
                        None if replay.replayable() => {}
                        None => return failure_reply(e.kind, &last_failure, false),
                    }
                    if let Some(p) = policy
                        && attempt_no < max_attempts
                    {
                        tokio::time::sleep(backoff(p, attempt_no - 1)).await;
                    }
                }
            }
        }
        failure_reply(AttemptErrorKind::Connect, &last_failure, attempt_no > 1)
    }
}

/// Retries allowed in flight now: the retry budget when the cluster has
/// one (`budget_percent` of the active requests, at least
/// `min_retry_concurrency`), else `max_retries`.
fn retry_limit(cluster: &ClusterInfo, lb: &crate::balance::ClusterLb, max_retries: u32) -> u32 {
    match cluster.retry_budget {
        Some((percent, min)) => {
            let active = lb
                .counters
                .requests
                .load(std::sync::atomic::Ordering::Relaxed) as f64;
            ((active * percent / 100.0) as u32).max(min)
        }
        None => max_retries,
    }
}

fn failure_reply(kind: AttemptErrorKind, details: &str, retried: bool) -> Response<Body> {
    let flags = match (retried, kind) {
        (_, AttemptErrorKind::Overflow) => "UO",
        (true, _) => "URX",
        (false, AttemptErrorKind::Connect) => "UF",
        (false, _) => "UR",
    };
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        flags,
        format!("upstream connect error or disconnect/reset before headers: {details}"),
    )
}

/// How to talk to an endpoint: TLS from the cluster's socket matches,
/// HTTP version from its protocol options.
fn endpoint_key(
    cluster: &ClusterInfo,
    member: &crate::balance::Member,
    parts: &http::request::Parts,
) -> Result<PoolKey, String> {
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let downstream_h2 = parts.version == Version::HTTP_2;
    let proto = match cluster.upstream_protocol {
        UpstreamProtocol::Http2 | UpstreamProtocol::Http3 => Proto::H2,
        // gRPC needs HTTP/2 whatever the cluster says.
        UpstreamProtocol::Http1 if grpc => Proto::H2,
        UpstreamProtocol::Http1 => Proto::H1,
        UpstreamProtocol::UseDownstream | UpstreamProtocol::Auto => {
            if downstream_h2 || grpc {
                Proto::H2
            } else {
                Proto::H1
            }
        }
    };
    let tls = match cluster.tls_for(&cluster.endpoints[member.idx]) {
        None => None,
        Some(t) if t.mode == TlsMode::IstioMutual => {
            Some(TlsTarget::istio(cluster, t, member.addr))
        }
        Some(t) => {
            return Err(format!(
                "cluster {}: upstream TLS mode {:?} (DestinationRule SIMPLE/MUTUAL) is not supported yet",
                cluster.name, t.mode
            ));
        }
    };
    Ok(PoolKey {
        addr: member.addr,
        tls,
        proto,
    })
}

/// A response body that keeps the endpoint counted as busy, and the
/// request counted against the cluster's `max_requests`, until it ends.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
    _request: Slot,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// -------------------------------------------------------------- connect --

#[derive(Clone, Debug)]
struct ConnectLayer {
    pools: Arc<Pools>,
}

fn is_refused(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            // A stream the server refused, or one above the last stream id
            // of a graceful GOAWAY (the server promises it did not process
            // it): both are safe to send again, Envoy's `refused-stream`.
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2e.is_go_away() && h2e.reason() == Some(h2::Reason::NO_ERROR));
        }
        src = s.source();
    }
    false
}

impl ConnectLayer {
    async fn call(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Response<Body>, ConnInfo), AttemptError> {
        let Some(attempt) = req.extensions_mut().remove::<Attempt>() else {
            return Err(AttemptError {
                kind: AttemptErrorKind::Connect,
                message: "no endpoint chosen".into(),
                request: Some(req),
            });
        };
        let checkout = match self
            .pools
            .checkout(&attempt.key, attempt.connect_timeout, &attempt.limits)
            .await
        {
            Ok(c) => c,
            Err(CheckoutError::Connect(ConnectError(message))) => {
                return Err(AttemptError {
                    kind: AttemptErrorKind::Connect,
                    message,
                    request: Some(req),
                });
            }
            Err(CheckoutError::Overflow(message)) => {
                return Err(AttemptError {
                    kind: AttemptErrorKind::Overflow,
                    message,
                    request: Some(req),
                });
            }
        };
        let info = checkout.info.clone();
        match checkout.sender {
            Sender::H2(mut s) => {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(HOST);
                match s.try_send_request(req).await {
                    Ok(resp) => Ok((resp.map(Body::new), info)),
                    Err(mut e) => {
                        checkout.pool.h2_failed();
                        let request = e.take_message();
                        let err = e.into_error();
                        let kind = if request.is_some() {
                            AttemptErrorKind::Connect
                        } else if is_refused(&err) {
                            AttemptErrorKind::Refused
                        } else {
                            AttemptErrorKind::Reset
                        };
                        Err(AttemptError {
                            kind,
                            message: format!("HTTP/2 to {}: {err}", attempt.key.addr),
                            request,
                        })
                    }
                }
            }
            Sender::H1(mut s) => {
                if let Err(e) = s.ready().await {
                    return Err(AttemptError {
                        kind: AttemptErrorKind::Connect,
                        message: format!("HTTP/1.1 to {}: {e}", attempt.key.addr),
                        request: Some(req),
                    });
                }
                let idempotent = matches!(
                    *req.method(),
                    http::Method::GET
                        | http::Method::HEAD
                        | http::Method::OPTIONS
                        | http::Method::PUT
                        | http::Method::DELETE
                        | http::Method::TRACE
                );
                *req.version_mut() = Version::HTTP_11;
                if let Some(a) = req.uri().authority()
                    && let Ok(v) = HeaderValue::from_str(a.as_str())
                {
                    req.headers_mut().insert(HOST, v);
                }
                let origin = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .map(Uri::from)
                    .unwrap_or_else(|| Uri::from_static("/"));
                *req.uri_mut() = origin;
                match s.try_send_request(req).await {
                    Ok(resp) => {
                        let pool = checkout.pool.clone();
                        let back = ReturnToPool {
                            inner: resp.body().is_end_stream_hint(),
                            slot: Some((s, info.clone(), pool)),
                        };
                        let (parts, body) = resp.into_parts();
                        let body = PooledBody { body, back };
                        Ok((Response::from_parts(parts, Body::new(body)), info))
                    }
                    Err(mut e) => {
                        let request = e.take_message();
                        let err = e.into_error();
                        let stale = checkout.reused
                            && idempotent
                            && (err.is_incomplete_message() || err.is_canceled());
                        Err(AttemptError {
                            kind: if request.is_some() {
                                AttemptErrorKind::Connect
                            } else if stale {
                                AttemptErrorKind::Stale
                            } else {
                                AttemptErrorKind::Reset
                            },
                            message: format!("HTTP/1.1 to {}: {err}", attempt.key.addr),
                            request,
                        })
                    }
                }
            }
        }
    }
}

trait EndHint {
    fn is_end_stream_hint(&self) -> bool;
}

impl EndHint for hyper::body::Incoming {
    fn is_end_stream_hint(&self) -> bool {
        http_body::Body::is_end_stream(self)
    }
}

/// Gives an HTTP/1.1 connection back to its pool when the response body
/// ends (never while it is still being read: the connection is busy).
struct ReturnToPool {
    inner: bool,
    slot: Option<(
        hyper::client::conn::http1::SendRequest<Body>,
        ConnInfo,
        Arc<crate::pool::EndpointPool>,
    )>,
}

impl ReturnToPool {
    fn done(&mut self) {
        if let Some((s, info, pool)) = self.slot.take() {
            pool.put_back(s, info);
        }
    }
}

struct PooledBody {
    body: hyper::body::Incoming,
    back: ReturnToPool,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.back.inner && this.back.slot.is_some() {
            this.back.done();
        }
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.back.done();
        }
        if let Poll::Ready(Some(Err(_))) = r {
            this.back.slot = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body that already ended returns its connection; one dropped
        // half-read does not (the connection would carry the rest).
        if self.back.inner || http_body::Body::is_end_stream(&self.body) {
            self.back.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_as_envoy_reads_them() {
        assert_eq!(host_port("echo.demo", false), ("echo.demo".into(), 80));
        assert_eq!(
            host_port("echo.demo:8080", false),
            ("echo.demo".into(), 8080)
        );
        assert_eq!(host_port("echo.demo", true), ("echo.demo".into(), 443));
        assert_eq!(host_port("[::1]:9000", false), ("[::1]".into(), 9000));
        assert_eq!(host_port("[::1]", false), ("[::1]".into(), 80));
        assert_eq!(host_port("10.0.0.1:81", false), ("10.0.0.1".into(), 81));
    }

    #[test]
    fn header_actions() {
        let mut h = http::HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        add_header(&mut h, "a", "2", HeaderAppend::AddIfAbsent, false);
        assert_eq!(h.get_all("a").iter().count(), 1);
        add_header(&mut h, "a", "2", HeaderAppend::AppendIfExistsOrAdd, false);
        assert_eq!(h.get_all("a").iter().count(), 2);
        add_header(
            &mut h,
            "a",
            "3",
            HeaderAppend::OverwriteIfExistsOrAdd,
            false,
        );
        assert_eq!(h.get("a"), Some(&HeaderValue::from_static("3")));
        add_header(&mut h, "b", "3", HeaderAppend::OverwriteIfExists, false);
        assert!(h.get("b").is_none());
        add_header(
            &mut h,
            "c",
            "%DOWNSTREAM_REMOTE_ADDRESS%",
            HeaderAppend::AddIfAbsent,
            false,
        );
        assert!(h.get("c").is_none(), "formatters are not sent as text");
    }

    #[test]
    fn backoff_stays_within_envoys_bounds() {
        let p = RetryPolicy {
            retry_on: Default::default(),
            num_retries: 2,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: vec![],
            back_off: nasp_xds::route::RetryBackOff {
                base: Duration::from_millis(25),
                max: Duration::from_millis(250),
            },
            host_predicates: vec![],
            host_selection_retry_max_attempts: 0,
            retriable_headers: vec![],
        };
        for n in 0..10 {
            let d = backoff(&p, n);
            assert!(d <= Duration::from_millis(250), "{d:?}");
            assert!(d <= Duration::from_millis(25 << n.min(4)), "{n}: {d:?}");
        }
    }
}
