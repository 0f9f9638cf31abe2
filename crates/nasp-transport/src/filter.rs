//! The proxy-wasm filter chain on the data path: every HTTP exchange and TCP
//! connection of one direction runs through the plugins configured for it,
//! as in an Istio sidecar.
//!
//! - [`ChainPool`]: filter instances shared the way Envoy shares them — one
//!   [`FilterChain`] (one VM per plugin) per worker, each behind its own
//!   lock; a stream is pinned to one chain for its whole life.
//! - [`HttpFilterLayer`] / [`HttpFilter`]: a tower layer that runs an HTTP
//!   service's requests and responses through a pool, streaming bodies
//!   frame by frame.
//! - [`filter_tcp`]: copies a byte stream both ways through a pool.
//! - [`properties`]: what filters read about a stream (`node.*`,
//!   `source.*`, `upstream.*`, `request.*`, …).
//!
//! Invariants: a chain's lock is held for one batch of callbacks and never
//! across an `.await`, so streams pinned to different chains run in
//! parallel; an empty pool adds no lock, no copy and no allocation; nothing
//! waits forever on a filter (a paused stream that nothing resumes is
//! answered after a deadline); a failing filter never panics the host.
//! See `docs/transport.md`, "Filters on the data path".

pub mod properties;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use nasp_proxywasm::{
    Direction, FilterChain, FilterStatus, HeaderMap, HostEnv, HttpStream, Plugin, PluginConfig,
    Resumed, Stage, TcpStream, WasmModule,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tower::util::{Either, MapErr};
use tower::{Layer, Service};

use crate::body::{Body, BoxError};
use crate::http::MeshPeer;
use crate::info::Upstream;

pub use properties::{
    ConnectionProperties, ListenerDirection, ListenerProperties, LocalCluster, NodeProperties,
    StreamProperties, response_flags,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a chain was locked cannot leave it half-updated in a way
    // that matters more than refusing all later traffic would.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The number of workers a pool has by default: one per CPU, as Envoy runs
/// one worker thread (and one VM per plugin) per CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Worker {
    chain: FilterChain,
    /// When each plugin was last ticked (`proxy_on_tick`).
    last_tick: Vec<Instant>,
}

/// Filter chains for one direction, one per worker, each behind its own
/// lock. A stream is assigned a chain round robin when it starts and stays
/// on it (its contexts live in that chain's VMs).
pub struct ChainPool {
    workers: Box<[Mutex<Worker>]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for ChainPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainPool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl ChainPool {
    /// A pool without plugins: the filter layer and [`filter_tcp`] pass
    /// traffic straight through.
    pub fn empty() -> Self {
        Self {
            workers: Box::new([]),
            next: AtomicUsize::new(0),
        }
    }

    /// `workers` chains (at least one), each made by `make(worker_index)`.
    /// Compile the modules once and instantiate them in `make`. If the
    /// chains have no plugins the pool is [empty](Self::is_empty).
    pub fn new<F>(workers: usize, mut make: F) -> nasp_proxywasm::Result<Self>
    where
        F: FnMut(usize) -> nasp_proxywasm::Result<FilterChain>,
    {
        let mut chains = Vec::with_capacity(workers.max(1));
        for i in 0..workers.max(1) {
            let chain = make(i)?;
            if chain.plugins.is_empty() {
                return Ok(Self::empty());
            }
            let now = Instant::now();
            chains.push(Mutex::new(Worker {
                last_tick: vec![now; chain.plugins.len()],
                chain,
            }));
        }
        Ok(Self {
            workers: chains.into_boxed_slice(),
            next: AtomicUsize::new(0),
        })
    }

    /// `workers` chains of the same plugins, in order: each module is
    /// compiled once (by the caller) and instantiated once per chain.
    pub fn from_plugins(
        workers: usize,
        plugins: &[(WasmModule, PluginConfig)],
        env: &HostEnv,
    ) -> nasp_proxywasm::Result<Self> {
        Self::new(workers, |_| {
            plugins
                .iter()
                .map(|(m, c)| Plugin::new(m, c.clone(), env.clone()))
                .collect::<nasp_proxywasm::Result<Vec<_>>>()
                .map(FilterChain::new)
        })
    }

    /// Whether the pool has no plugins (traffic passes untouched).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The number of chains.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The chain the next stream goes to (round robin). Only call on a
    /// pool that is not empty.
    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1)
    }

    fn worker(&self, i: usize) -> Option<MutexGuard<'_, Worker>> {
        self.workers.get(i).map(lock)
    }

    /// Runs `f` on chain `worker` under its lock (for tools and tests:
    /// reading a plugin's state). `None` if there is no such chain.
    pub fn with_chain<R>(&self, worker: usize, f: impl FnOnce(&mut FilterChain) -> R) -> Option<R> {
        self.worker(worker).map(|mut w| f(&mut w.chain))
    }

    /// Idle-time work on every chain that is not busy: ends streams that
    /// were dropped without finishing, delivers queue notifications, and
    /// ticks each plugin whose tick period has passed. Returns how many
    /// dropped streams were ended.
    pub fn maintain(&self) -> usize {
        let mut reaped = 0;
        for w in self.workers.iter() {
            // A busy chain is doing this work itself at its next use.
            let Ok(mut w) = w.try_lock() else { continue };
            let w = &mut *w;
            reaped += w.chain.reap_dropped();
            w.chain.dispatch_pending();
            let now = Instant::now();
            for (p, last) in w.chain.plugins.iter_mut().zip(w.last_tick.iter_mut()) {
                let period = p.tick_period();
                if !period.is_zero() && now.duration_since(*last) >= period {
                    *last = now;
                    p.tick();
                }
            }
        }
        reaped
    }

    /// Runs [`Self::maintain`] every `every` on the current tokio runtime,
    /// until the pool is dropped. Nothing is spawned for an empty pool.
    pub fn spawn_maintenance(
        self: &Arc<Self>,
        every: Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.is_empty() {
            return None;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = every.max(Duration::from_millis(1));
        Some(tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                pool.maintain();
            }
        }))
    }
}

/// Settings shared by every stream of one [`HttpFilterLayer`].
#[derive(Debug)]
struct FilterConfig {
    pool: Arc<ChainPool>,
    direction: ListenerDirection,
    node: Arc<NodeProperties>,
    local_id: Option<Arc<str>>,
    local_addr: Option<std::net::SocketAddr>,
    /// Inbound: `inbound|<port>||` of `local_addr`.
    local_cluster: Option<Arc<str>>,
    local_services: Option<LocalServices>,
    pause_timeout: Duration,
}

/// What names the services of the local cluster, asked per stream (the
/// answer may change with the mesh view).
#[derive(Clone)]
struct LocalServices(Arc<dyn Fn() -> Arc<[nasp_xds::cluster::IstioService]> + Send + Sync>);

impl std::fmt::Debug for LocalServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalServices")
    }
}

/// A tower layer that runs every exchange of a service through a
/// [`ChainPool`], for one direction: request headers, body frames and
/// trailers through the request callbacks before the inner service sees
/// them, the response through the response callbacks before the caller
/// does.
#[derive(Clone, Debug)]
pub struct HttpFilterLayer {
    cfg: Arc<FilterConfig>,
}

impl HttpFilterLayer {
    /// A layer over `pool` for `direction`; `node` answers `node.*`.
    pub fn new(
        pool: Arc<ChainPool>,
        direction: ListenerDirection,
        node: Arc<NodeProperties>,
    ) -> Self {
        Self {
            cfg: Arc::new(FilterConfig {
                pool,
                direction,
                node,
                local_id: None,
                local_addr: None,
                local_cluster: None,
                local_services: None,
                pause_timeout: Duration::from_secs(10),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut FilterConfig)) -> Self {
        let mut cfg = FilterConfig {
            pool: self.cfg.pool.clone(),
            direction: self.cfg.direction,
            node: self.cfg.node.clone(),
            local_id: self.cfg.local_id.clone(),
            local_addr: self.cfg.local_addr,
            local_cluster: self.cfg.local_cluster.clone(),
            local_services: self.cfg.local_services.clone(),
            pause_timeout: self.cfg.pause_timeout,
        };
        f(&mut cfg);
        self.cfg = Arc::new(cfg);
        self
    }

    /// This workload's SPIFFE id (`connection.uri_san_local_certificate`
    /// inbound, `upstream.uri_san_local_certificate` outbound, on mTLS).
    pub fn local_identity(self, id: impl Into<String>) -> Self {
        let id = id.into();
        self.edit(|c| c.local_id = Some(id.into()))
    }

    /// The listener's address (`destination.*` inbound; inbound, also the
    /// local cluster `inbound|<port>||` that `cluster_name` answers).
    pub fn local_addr(self, addr: std::net::SocketAddr) -> Self {
        self.edit(|c| {
            c.local_addr = Some(addr);
            c.local_cluster = Some(Arc::from(format!("inbound|{}||", addr.port())));
        })
    }

    /// Inbound: what names the services the local workload serves behind
    /// this listener (`cluster_metadata.filter_metadata.istio.services`,
    /// which Istio's stats filter takes `destination_service` from), asked
    /// once per stream. Needs [`Self::local_addr`].
    pub fn local_services(
        self,
        f: impl Fn() -> Arc<[nasp_xds::cluster::IstioService]> + Send + Sync + 'static,
    ) -> Self {
        let f = LocalServices(Arc::new(f));
        self.edit(|c| c.local_services = Some(f))
    }

    /// How long a stream paused by a filter waits for it to resume (after
    /// `proxy_continue_stream`) before it is answered 500 (request or
    /// response headers) or reset (a body). Default 10 s.
    pub fn pause_timeout(self, d: Duration) -> Self {
        self.edit(|c| c.pause_timeout = d)
    }
}

/// What [`HttpFilterLayer`] makes of a service: the service itself (errors
/// boxed) when the pool is empty, so no filter code runs at all; the
/// filtering [`HttpFilter`] otherwise.
pub type Filtered<S> = Either<
    MapErr<S, fn(<S as Service<http::Request<Body>>>::Error) -> ServiceError>,
    HttpFilter<S>,
>;

/// The error of a filtered service: the inner service's error, boxed. A
/// named type rather than `BoxError` itself, because a `fn` pointer
/// returning a boxed trait object in the service's type trips rustc's
/// `Send` check of async blocks that await the service ("one type is more
/// general than the other").
#[derive(Debug)]
pub struct ServiceError(pub BoxError);

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl ServiceError {
    fn boxed<E: Into<BoxError>>(e: E) -> Self {
        Self(e.into())
    }
}

impl<S> Layer<S> for HttpFilterLayer
where
    S: Service<http::Request<Body>>,
    S::Error: Into<BoxError>,
{
    type Service = Filtered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        if self.cfg.pool.is_empty() {
            let f: fn(S::Error) -> ServiceError = ServiceError::boxed;
            Either::Left(MapErr::new(inner, f))
        } else {
            Either::Right(HttpFilter {
                inner,
                cfg: self.cfg.clone(),
            })
        }
    }
}

/// The filtering service of [`HttpFilterLayer`].
#[derive(Clone, Debug)]
pub struct HttpFilter<S> {
    inner: S,
    cfg: Arc<FilterConfig>,
}

impl<S> Service<http::Request<Body>> for HttpFilter<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = ServiceError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, ServiceError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ServiceError>> {
        self.inner.poll_ready(cx).map_err(ServiceError::boxed)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this request; the clone
        // stays for the next one (tower's usual pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // Boxed as it is: a wrapping `async` block would move the (large)
        // exchange future once more per request.
        Box::pin(exchange(self.cfg.clone(), inner, req))
    }
}

/// One HTTP stream pinned to one chain of a pool, shared by the request
/// body, the response future and the response body. The last of them to
/// go ends the stream (`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`)
/// if the response's end did not already.
struct StreamHandle {
    pool: Arc<ChainPool>,
    worker: usize,
    stream: Mutex<Option<HttpStream>>,
    props: Arc<StreamProperties>,
    /// A filter failed closed (or answered locally) on a body.
    failed: AtomicBool,
}

impl StreamHandle {
    /// Runs `f` with the stream and its chain locked (stream first, then
    /// chain: the one order everywhere). `None` once the stream ended.
    fn with<R>(&self, f: impl FnOnce(&mut HttpStream, &mut FilterChain) -> R) -> Option<R> {
        let mut s = lock(&self.stream);
        let stream = s.as_mut()?;
        let mut w = self.pool.worker(self.worker)?;
        Some(f(stream, &mut w.chain))
    }

    fn finish(&self) {
        let stream = lock(&self.stream).take();
        if let Some(stream) = stream {
            self.props.mark_end();
            if let Some(mut w) = self.pool.worker(self.worker) {
                stream.finish(&mut w.chain);
            }
        }
    }

    /// One attempt to resume a paused direction: idle work on the chain
    /// (queue notifications may be what resumes it), then whatever a
    /// filter asked to continue.
    fn try_resume(&self, dir: Direction) -> Option<Resumed> {
        self.with(|s, c| {
            c.dispatch_pending();
            s.resume_continued(c)
                .into_iter()
                .find_map(|(d, r)| (d == dir).then_some(r))
        })
        .flatten()
    }

    /// Waits (polling with backoff) for a paused direction to be resumed,
    /// up to `timeout`.
    async fn wait_resume(&self, dir: Direction, timeout: Duration) -> Option<Resumed> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            if let Some(r) = self.try_resume(dir) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The request headers as proxy-wasm sees them: `:method`, `:scheme`,
/// `:authority` (from the URI or `Host`), `:path`, then the regular
/// headers without `Host` (it is `:authority`, as in Envoy).
fn request_map(parts: &http::request::Parts, mtls: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(parts.headers.len() + 4, map_room(&parts.headers));
    let p = Pseudo::of(parts, mtls);
    h.add(b":method", p.method);
    h.add(b":scheme", p.scheme);
    if let Some(a) = p.authority {
        h.add(b":authority", a);
    }
    h.add(b":path", p.path);
    for (k, v) in &parts.headers {
        if k != http::header::HOST {
            h.add(k.as_str().as_bytes(), v.as_bytes());
        }
    }
    h.mark_untouched();
    h
}

/// The pseudo-headers [`request_map`] shows for a request: `:authority`
/// from the URI or `Host` (absent when neither), the scheme from the URI
/// or the connection.
struct Pseudo<'a> {
    method: &'a [u8],
    scheme: &'a [u8],
    authority: Option<&'a [u8]>,
    path: &'a [u8],
}

impl<'a> Pseudo<'a> {
    fn of(parts: &'a http::request::Parts, mtls: bool) -> Self {
        let scheme = parts
            .uri
            .scheme_str()
            .unwrap_or(if mtls { "https" } else { "http" });
        let authority = match parts.uri.authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => parts.headers.get(http::header::HOST).map(|h| h.as_bytes()),
        };
        Self {
            method: parts.method.as_str().as_bytes(),
            scheme: scheme.as_bytes(),
            authority,
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        }
    }
}

/// Room for the names and values of `h` and what filters usually add (the
/// peer metadata headers are about 500 bytes): a capacity hint.
fn map_room(h: &http::HeaderMap) -> usize {
    h.iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum::<usize>()
        + 640
}

/// The regular (non-pseudo) entries of a filtered map as HTTP headers.
/// Entries a filter made invalid (bad name or value bytes) are dropped.
fn http_headers(map: &HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(map.len());
    append_headers(
        map.iter().filter(|(k, _)| k.first() != Some(&b':')),
        &mut out,
    );
    out
}

/// Appends entries to HTTP headers; invalid ones (bad name or value bytes)
/// are dropped.
fn append_headers<'a>(
    entries: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut http::HeaderMap,
) {
    for (k, v) in entries {
        match (header_name(k), http::HeaderValue::from_bytes(v)) {
            (Ok(k), Ok(v)) => {
                out.append(k, v);
            }
            _ => tracing::debug!(
                name = %String::from_utf8_lossy(k),
                "a filter left an invalid header; dropped"
            ),
        }
    }
}

/// The metadata exchange's headers, which the default chain adds to every
/// request and response it sends: named without an allocation (a name
/// `http` does not know is copied into a new buffer each time).
const EXCHANGE_HEADERS: [&str; 2] = ["x-envoy-peer-metadata-id", "x-envoy-peer-metadata"];

/// A header name a filter wrote, as `http::HeaderName::from_bytes` makes it.
fn header_name(k: &[u8]) -> Result<http::HeaderName, http::header::InvalidHeaderName> {
    match EXCHANGE_HEADERS.iter().find(|n| n.as_bytes() == k) {
        Some(n) => Ok(http::HeaderName::from_static(n)),
        None => http::HeaderName::from_bytes(k),
    }
}

/// What the filters did to the regular headers of a map built from an
/// `http::HeaderMap` (in its iteration order, `Host` left out on requests).
#[derive(Debug, PartialEq, Eq)]
enum Edit {
    /// The original entries not named in `removed` are all still there, in
    /// order, at the front; the names in `removed` are gone altogether;
    /// the regular entries of the map from index `appended` on are new
    /// (`None`: none are).
    Patch {
        removed: Vec<http::HeaderName>,
        appended: Option<usize>,
    },
    /// Anything else (a value changed in place, an entry moved): convert
    /// the whole map back.
    Rebuild,
}

impl Edit {
    fn is_untouched(&self) -> bool {
        matches!(self, Edit::Patch { removed, appended: None } if removed.is_empty())
    }
}

/// Compares the regular entries of `map` (what the filters left) with the
/// headers it was built from. The usual filter appends headers or removes
/// some by name (the metadata exchange does both), and then only those need
/// converting back rather than every header parsed and copied again.
fn edit_of(orig: &http::HeaderMap, skip_host: bool, map: &HeaderMap) -> Edit {
    let mut filtered = map
        .iter()
        .filter(|(k, _)| k.first() != Some(&b':'))
        .enumerate()
        .peekable();
    let mut removed: Vec<http::HeaderName> = Vec::new();
    for (k, v) in orig {
        if skip_host && k == http::header::HOST {
            continue;
        }
        let name = k.as_str().as_bytes();
        match filtered.peek() {
            Some((_, (fk, fv))) if *fk == name && *fv == v.as_bytes() => {
                filtered.next();
            }
            _ if removed.contains(k) => {}
            // Gone, or still there changed or elsewhere.
            _ if map.iter().any(|(m, _)| m == name) => return Edit::Rebuild,
            _ => removed.push(k.clone()),
        }
    }
    Edit::Patch {
        removed,
        appended: filtered.peek().map(|(i, _)| *i),
    }
}

/// Applies the filters' edit to the HTTP headers the map was built from:
/// the whole map converted when it is not a [`Edit::Patch`].
fn apply_edit(edit: Edit, map: &HeaderMap, headers: &mut http::HeaderMap) {
    match edit {
        Edit::Rebuild => *headers = http_headers(map),
        Edit::Patch { removed, appended } => {
            for name in &removed {
                headers.remove(name);
            }
            if let Some(from) = appended {
                let new = map
                    .iter()
                    .filter(|(k, _)| k.first() != Some(&b':'))
                    .skip(from);
                append_headers(new, headers);
            }
        }
    }
}

/// Makes `parts` the request the filters left: method, URI (`:scheme`,
/// `:authority`, `:path`) and headers. An origin-form request stays
/// origin-form, with `Host` from `:authority`. `mtls` as for
/// [`request_map`]. Returns whether anything changed.
fn apply_request(map: &HeaderMap, parts: &mut http::request::Parts, mtls: bool) -> bool {
    // Still the map `request_map` built from these parts: nothing to do
    // (and nothing to compare).
    if map.is_untouched() {
        return false;
    }
    // The pseudo-headers as `request_map` wrote them, and no `host` of a
    // filter's own: only the regular headers' edit to apply.
    let p = Pseudo::of(parts, mtls);
    if map.get(b":method") == Some(p.method)
        && map.get(b":scheme") == Some(p.scheme)
        && map.get(b":authority") == p.authority
        && map.get(b":path") == Some(p.path)
        && map.get(b"host").is_none()
    {
        let edit = edit_of(&parts.headers, true, map);
        if edit != Edit::Rebuild {
            let untouched = edit.is_untouched();
            apply_edit(edit, map, &mut parts.headers);
            return !untouched;
        }
    }
    // `Host` comes back from `:authority` there.
    rebuild_request(map, parts);
    true
}

/// [`apply_request`] when the filters changed a pseudo-header: method,
/// URI and headers all converted back.
fn rebuild_request(map: &HeaderMap, parts: &mut http::request::Parts) {
    if let Some(m) = map
        .get(b":method")
        .and_then(|m| http::Method::from_bytes(m).ok())
    {
        parts.method = m;
    }
    let mut headers = http_headers(map);
    let authority = map.get(b":authority");
    let path = map.get(b":path").unwrap_or(b"/");
    let uri = if parts.uri.authority().is_some() {
        let scheme = map.get(b":scheme").unwrap_or(b"http");
        let mut s = Vec::with_capacity(scheme.len() + path.len() + 32);
        s.extend_from_slice(scheme);
        s.extend_from_slice(b"://");
        s.extend_from_slice(authority.unwrap_or_default());
        s.extend_from_slice(path);
        http::Uri::try_from(s)
    } else {
        if let Some(v) = authority.and_then(|a| http::HeaderValue::from_bytes(a).ok()) {
            headers.insert(http::header::HOST, v);
        }
        http::Uri::try_from(path.to_vec())
    };
    match uri {
        Ok(u) => parts.uri = u,
        Err(e) => {
            tracing::debug!(error = %e, "a filter left an invalid :path or :authority; URI kept")
        }
    }
    parts.headers = headers;
}

fn response_map(parts: &http::response::Parts) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(parts.headers.len() + 1, map_room(&parts.headers));
    h.add(b":status", parts.status.as_str().as_bytes());
    for (k, v) in &parts.headers {
        h.add(k.as_str().as_bytes(), v.as_bytes());
    }
    h.mark_untouched();
    h
}

/// Makes `parts` the response the filters left; returns whether anything
/// changed.
fn apply_response(map: &HeaderMap, parts: &mut http::response::Parts) -> bool {
    if map.is_untouched() {
        return false;
    }
    let mut changed = false;
    if map.get(b":status") != Some(parts.status.as_str().as_bytes()) {
        if let Some(s) = map
            .get(b":status")
            .and_then(|s| http::StatusCode::from_bytes(s).ok())
        {
            parts.status = s;
        }
        changed = true;
    }
    let edit = edit_of(&parts.headers, false, map);
    changed |= !edit.is_untouched();
    apply_edit(edit, map, &mut parts.headers);
    changed
}

/// A reply made here, not by the application: status, headers, body.
fn reply(status: u16, headers: http::HeaderMap, body: impl Into<Body>) -> http::Response<Body> {
    let mut r = http::Response::new(body.into());
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    *r.headers_mut() = headers;
    r
}

/// Envoy's answer to a stream a fail-closed filter failed.
fn fail_reply(props: &StreamProperties) -> http::Response<Body> {
    props.set_response(503, &HeaderMap::from_pairs([(":status", "503")]));
    props.add_response_flags(response_flags::LOCAL_RESET);
    reply(503, text_plain(), "proxy-wasm filter failed")
}

/// The answer to a stream paused at its headers that nothing resumed.
fn paused_reply(props: &StreamProperties) -> http::Response<Body> {
    props.set_response(500, &HeaderMap::from_pairs([(":status", "500")]));
    reply(
        500,
        text_plain(),
        "a proxy-wasm filter paused the stream and nothing resumed it",
    )
}

fn text_plain() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    h
}

/// The local reply a filter sent, as the response filters left it.
fn local_reply(handle: &StreamHandle) -> Option<http::Response<Body>> {
    let lr = handle.with(|s, _| s.local_response()).flatten()?;
    let mut headers = http_headers(&lr.headers);
    if let Some(g) = lr.grpc_status
        && !headers.contains_key("grpc-status")
        && let Ok(v) = http::HeaderValue::try_from(g.to_string())
    {
        headers.insert("grpc-status", v);
    }
    let status = u16::try_from(lr.status).unwrap_or(500);
    let mut seen = lr.headers.clone();
    seen.add(b":status", status.to_string().as_bytes());
    handle.props.set_response(status, &seen);
    handle.props.add_response_body_bytes(lr.body.len());
    Some(reply(status, headers, lr.body))
}

/// The connection-level properties of a request, from the `MeshPeer` the
/// listener attached (inbound) or this workload's identity (outbound).
fn connection_of(cfg: &FilterConfig, req: &http::Request<Body>) -> ConnectionProperties {
    let mut c = ConnectionProperties {
        local_san: cfg.local_id.clone(),
        destination: cfg.local_addr,
        ..Default::default()
    };
    if cfg.direction == ListenerDirection::Inbound {
        if let Some(peer) = req.extensions().get::<MeshPeer>() {
            c.source = Some(peer.addr);
            c.mtls = peer.mtls;
            c.peer_san = peer.id.as_ref().map(|id| id.to_string());
        }
        c.local_cluster = cfg.local_cluster.as_ref().map(|name| LocalCluster {
            name: name.clone(),
            services: cfg
                .local_services
                .as_ref()
                .map_or_else(|| Arc::from([]), |f| (f.0)()),
        });
    }
    c
}

async fn exchange<S>(
    cfg: Arc<FilterConfig>,
    mut inner: S,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, ServiceError>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    let conn = connection_of(&cfg, &req);
    let mtls = conn.mtls;
    let props = Arc::new(StreamProperties::new(cfg.node.clone(), cfg.direction, conn));
    let (mut parts, body) = req.into_parts();
    let headers = request_map(&parts, mtls);
    props.set_request(&headers, parts.version);
    let end_of_stream = body.is_end_stream();

    let worker = cfg.pool.pick();
    let stream = {
        let provider: Arc<dyn nasp_proxywasm::PropertyProvider> = props.clone();
        cfg.pool
            .with_chain(worker, |c| c.http_stream(provider))
            .ok_or_else(|| ServiceError("filter pool has no chains".into()))?
    };
    let handle = Arc::new(StreamHandle {
        pool: cfg.pool.clone(),
        worker,
        stream: Mutex::new(Some(stream)),
        props: props.clone(),
        failed: AtomicBool::new(false),
    });

    // Request headers.
    let mut st = handle
        .with(|s, c| s.request_headers(c, headers, end_of_stream))
        .unwrap_or(FilterStatus::Fail);
    if st == FilterStatus::Pause {
        st = match handle
            .wait_resume(Direction::Request, cfg.pause_timeout)
            .await
        {
            Some(r) => r.status,
            None => return Ok(paused_reply(&props)),
        };
    }
    match st {
        FilterStatus::Continue => {}
        FilterStatus::LocalResponse => {
            return Ok(local_reply(&handle).unwrap_or_else(|| fail_reply(&props)));
        }
        FilterStatus::Fail => return Ok(fail_reply(&props)),
        FilterStatus::Pause => return Ok(paused_reply(&props)),
    }
    // The stream's properties keep the request as the filters left it
    // (what `request.*` answers from here on), copied only if they changed
    // it.
    if let Some(Some(map)) = handle.with(|s, _| {
        let map = s.request_header_map();
        apply_request(&map, &mut parts, mtls).then(|| map.clone())
    }) {
        props.set_request_map(map, parts.version);
    }
    parts.extensions.insert(props.clone());
    let body = if end_of_stream {
        body
    } else {
        Body::new(FilteredBody::new(
            body,
            handle.clone(),
            Direction::Request,
            cfg.pause_timeout,
        ))
    };

    let result = inner
        .call(http::Request::from_parts(parts, body))
        .await
        .map_err(Into::into);

    // A filter that failed or answered on the request body decides the
    // response, whatever the application made of its broken body.
    if let Some(lr) = local_reply(&handle) {
        return Ok(lr);
    }
    if handle.failed.load(Ordering::Acquire) {
        return Ok(fail_reply(&props));
    }
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            props.add_response_flags(response_flags::UPSTREAM_CONNECTION_FAILURE);
            return Err(ServiceError(e));
        }
    };

    // Response headers.
    let (mut parts, body) = resp.into_parts();
    if let Some(up) = parts.extensions.get::<Upstream>() {
        props.set_upstream(up.clone());
    }
    let headers = response_map(&parts);
    props.set_response(parts.status.as_u16(), &headers);
    let end_of_stream = body.is_end_stream();
    let mut st = handle
        .with(|s, c| s.response_headers(c, headers, end_of_stream))
        .unwrap_or(FilterStatus::Fail);
    if st == FilterStatus::Pause {
        st = match handle
            .wait_resume(Direction::Response, cfg.pause_timeout)
            .await
        {
            Some(r) => r.status,
            None => return Ok(paused_reply(&props)),
        };
    }
    match st {
        FilterStatus::Continue => {}
        // A reply sent from a response callback replaces the response.
        FilterStatus::LocalResponse => {
            return Ok(local_reply(&handle).unwrap_or_else(|| fail_reply(&props)));
        }
        FilterStatus::Fail => return Ok(fail_reply(&props)),
        FilterStatus::Pause => return Ok(paused_reply(&props)),
    }
    if let Some(Some(map)) = handle.with(|s, _| {
        let map = s.response_header_map();
        apply_response(&map, &mut parts).then(|| map.clone())
    }) {
        props.set_response_map(parts.status.as_u16(), map);
    }
    let body = if end_of_stream {
        handle.finish();
        body
    } else {
        Body::new(FilteredBody::new(
            body,
            handle,
            Direction::Response,
            cfg.pause_timeout,
        ))
    };
    Ok(http::Response::from_parts(parts, body))
}

/// A body streamed through one direction of a stream's filters: each data
/// frame goes through the body callbacks as it arrives, trailers through
/// the trailer callbacks. What a filter buffers (a body paused mid-stream)
/// is held here until a later callback lets it go.
struct FilteredBody {
    inner: Body,
    inner_done: bool,
    handle: Option<Arc<StreamHandle>>,
    dir: Direction,
    end_sent: bool,
    queue: VecDeque<Frame<Bytes>>,
    wait: Option<Wait>,
    pause_timeout: Duration,
}

/// A body paused at its end, waiting for a filter to resume it.
struct Wait {
    sleep: Pin<Box<tokio::time::Sleep>>,
    deadline: Instant,
    backoff: Duration,
}

fn filter_error(what: &str) -> BoxError {
    format!("proxy-wasm filter {what}").into()
}

impl FilteredBody {
    fn new(
        inner: Body,
        handle: Arc<StreamHandle>,
        dir: Direction,
        pause_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            inner_done: false,
            handle: Some(handle),
            dir,
            end_sent: false,
            queue: VecDeque::new(),
            wait: None,
            pause_timeout,
        }
    }

    fn handle(&self) -> Result<&Arc<StreamHandle>, BoxError> {
        self.handle
            .as_ref()
            .ok_or_else(|| filter_error("stream already ended"))
    }

    fn trailers_of(&self, s: &HttpStream) -> HeaderMap {
        match self.dir {
            Direction::Request => s.request_trailer_map().clone(),
            Direction::Response => s.response_trailer_map().clone(),
        }
    }

    /// What a status means for the body: go on, or end it with an error
    /// (the stream is reset; on the request side the response future sends
    /// the filter's local reply or a 503).
    fn check(&self, st: FilterStatus) -> Result<(), BoxError> {
        match st {
            FilterStatus::Continue | FilterStatus::Pause => Ok(()),
            FilterStatus::LocalResponse | FilterStatus::Fail => {
                if let Some(h) = &self.handle {
                    h.failed.store(true, Ordering::Release);
                    if self.dir == Direction::Response {
                        h.props.add_response_flags(response_flags::LOCAL_RESET);
                    }
                }
                Err(filter_error(if st == FilterStatus::Fail {
                    "failed"
                } else {
                    "sent a local reply"
                }))
            }
        }
    }

    fn start_wait(&mut self) {
        let now = Instant::now();
        let backoff = Duration::from_millis(1);
        self.wait = Some(Wait {
            sleep: Box::pin(tokio::time::sleep(backoff)),
            deadline: now + self.pause_timeout,
            backoff,
        });
    }

    fn on_data(&mut self, data: &[u8], end_of_stream: bool) -> Result<(), BoxError> {
        let dir = self.dir;
        let h = self.handle()?;
        match dir {
            Direction::Request => h.props.add_request_body(data),
            Direction::Response => h.props.add_response_body(data),
        }
        let (st, out) = h
            .with(|s, c| match dir {
                Direction::Request => s.request_body(c, data, end_of_stream),
                Direction::Response => s.response_body(c, data, end_of_stream),
            })
            .ok_or_else(|| filter_error("stream already ended"))?;
        self.check(st)?;
        if end_of_stream {
            self.end_sent = true;
        }
        match st {
            FilterStatus::Pause if end_of_stream => self.start_wait(),
            FilterStatus::Pause => {}
            _ if !out.is_empty() => self.queue.push_back(Frame::data(Bytes::from(out))),
            _ => {}
        }
        Ok(())
    }

    fn on_trailers(&mut self, trailers: http::HeaderMap) -> Result<(), BoxError> {
        let dir = self.dir;
        let mut map = HeaderMap::new();
        for (k, v) in &trailers {
            map.add(k.as_str().as_bytes(), v.as_bytes());
        }
        let first_end = !self.end_sent;
        self.end_sent = true;
        let h = self.handle()?.clone();
        let (body, st, out) = h
            .with(|s, c| {
                // Trailers end the body: a filter still buffering it (paused
                // mid-body, waiting for the end) gets it with end_of_stream
                // first, so the buffered bytes go on before the trailers.
                let mut body = None;
                if first_end && s.paused(dir) == Some(Stage::Body) {
                    let (st, b) = match dir {
                        Direction::Request => s.request_body(c, &[], true),
                        Direction::Response => s.response_body(c, &[], true),
                    };
                    if st != FilterStatus::Continue {
                        return (None, st, None);
                    }
                    body = Some(b);
                }
                let st = match dir {
                    Direction::Request => s.request_trailers(c, map),
                    Direction::Response => s.response_trailers(c, map),
                };
                let out = (st == FilterStatus::Continue).then(|| self.trailers_of(s));
                (body, st, out)
            })
            .ok_or_else(|| filter_error("stream already ended"))?;
        self.check(st)?;
        if let Some(b) = body.filter(|b| !b.is_empty()) {
            self.queue.push_back(Frame::data(Bytes::from(b)));
        }
        match out {
            Some(t) => self.push_trailers(&t),
            None if st == FilterStatus::Pause => self.start_wait(),
            None => {}
        }
        Ok(())
    }

    fn push_trailers(&mut self, t: &HeaderMap) {
        if self.dir == Direction::Response
            && let Some(h) = &self.handle
        {
            h.props.set_response_trailers(t);
        }
        self.queue.push_back(Frame::trailers(http_headers(t)));
    }

    fn on_resumed(&mut self, r: Resumed) -> Result<(), BoxError> {
        self.check(r.status)?;
        if r.status != FilterStatus::Continue {
            // Paused again further down the chain.
            self.start_wait();
            return Ok(());
        }
        if let Some(b) = r.body.filter(|b| !b.is_empty()) {
            self.queue.push_back(Frame::data(Bytes::from(b)));
        }
        if r.trailers {
            let t = self
                .handle()?
                .with(|s, _| self.trailers_of(s))
                .unwrap_or_default();
            self.push_trailers(&t);
        }
        Ok(())
    }

    /// The body is over: the response's end ends the stream.
    fn end(&mut self) {
        if let Some(h) = self.handle.take()
            && self.dir == Direction::Response
        {
            h.finish();
        }
    }
}

impl http_body::Body for FilteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(f) = this.queue.pop_front() {
                // The last frame ends the stream now: a client that stops
                // at `is_end_stream` (tonic's `Streaming` after the
                // trailers) would otherwise keep it open, unlogged, for as
                // long as it holds the body.
                if this.inner_done && this.queue.is_empty() && this.wait.is_none() {
                    this.end();
                }
                return Poll::Ready(Some(Ok(f)));
            }
            if let Some(w) = this.wait.as_mut() {
                ready!(w.sleep.as_mut().poll(cx));
                let dir = this.dir;
                let resumed = this.handle.as_ref().and_then(|h| h.try_resume(dir));
                match resumed {
                    Some(r) => {
                        this.wait = None;
                        if let Err(e) = this.on_resumed(r) {
                            this.end();
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    None => {
                        let now = Instant::now();
                        if now >= w.deadline || this.handle.is_none() {
                            this.wait = None;
                            this.end();
                            return Poll::Ready(Some(Err(filter_error(
                                "paused the body and nothing resumed it",
                            ))));
                        }
                        w.backoff = (w.backoff * 2).min(Duration::from_millis(50));
                        let next = (now + w.backoff).min(w.deadline);
                        w.sleep.as_mut().reset(next.into());
                    }
                }
                continue;
            }
            if this.inner_done {
                this.end();
                return Poll::Ready(None);
            }
            let step = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.inner.is_end_stream();
                        this.inner_done = end;
                        this.on_data(&data, end)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            this.inner_done = true;
                            this.on_trailers(t)
                        }
                        // Frames of other kinds carry nothing filters see.
                        Err(_) => Ok(()),
                    },
                },
                Some(Err(e)) => Err(e),
                None => {
                    this.inner_done = true;
                    if this.end_sent {
                        Ok(())
                    } else {
                        this.on_data(&[], true)
                    }
                }
            };
            if let Err(e) = step {
                this.inner_done = true;
                this.end();
                return Poll::Ready(Some(Err(e)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_done && self.queue.is_empty() && self.wait.is_none()
    }
}

/// What [`filter_tcp`] did with a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOutcome {
    /// Bytes forwarded from downstream to upstream (after the filters).
    pub sent: u64,
    /// Bytes forwarded from upstream to downstream (after the filters).
    pub received: u64,
    /// Whether a filter ended the connection (failed closed, or asked to
    /// close a side with `proxy_close_stream`).
    pub closed_by_filter: bool,
}

/// A TCP connection pinned to one chain of a pool.
struct TcpHandle {
    pool: Arc<ChainPool>,
    worker: usize,
    stream: Mutex<Option<TcpStream>>,
}

impl TcpHandle {
    fn with<R>(&self, f: impl FnOnce(&mut TcpStream, &mut FilterChain) -> R) -> Option<R> {
        let mut s = lock(&self.stream);
        let stream = s.as_mut()?;
        let mut w = self.pool.worker(self.worker)?;
        Some(f(stream, &mut w.chain))
    }
}

impl Drop for TcpHandle {
    fn drop(&mut self) {
        let stream = lock(&self.stream).take();
        if let (Some(stream), Some(mut w)) = (stream, self.pool.worker(self.worker)) {
            stream.finish(&mut w.chain);
        }
    }
}

/// Why one direction of a TCP connection stopped early.
enum PumpEnd {
    Filter,
    Io(std::io::Error),
}

const TCP_CHUNK: usize = 16 * 1024;

/// Copies one direction: each chunk read goes through the data callback of
/// that side and what the filters leave is written on.
async fn pump<R, W>(
    handle: &TcpHandle,
    mut from: R,
    mut to: W,
    upstream: bool,
) -> Result<u64, PumpEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TCP_CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await.map_err(PumpEnd::Io)?;
        let end = n == 0;
        let chunk = buf.get(..n).unwrap_or_default();
        let (st, out, closed) = handle
            .with(|s, c| {
                let (st, out) = if upstream {
                    s.upstream_data(c, chunk, end)
                } else {
                    s.downstream_data(c, chunk, end)
                };
                let closed = !lock(s.state()).closed.is_empty();
                (st, out, closed)
            })
            .ok_or(PumpEnd::Filter)?;
        if st == FilterStatus::Fail || st == FilterStatus::LocalResponse {
            return Err(PumpEnd::Filter);
        }
        if !out.is_empty() {
            to.write_all(&out).await.map_err(PumpEnd::Io)?;
            total += out.len() as u64;
        }
        if closed {
            return Err(PumpEnd::Filter);
        }
        if end {
            to.shutdown().await.map_err(PumpEnd::Io)?;
            return Ok(total);
        }
    }
}

/// Runs a TCP connection through `pool`: bytes from `downstream` go through
/// `proxy_on_downstream_data` and on to `upstream`, bytes from `upstream`
/// through `proxy_on_upstream_data` and back, each chunk as it arrives.
/// A filter that fails closed, or asks to close the connection, ends it
/// (both sides are closed); the close callbacks run once both directions
/// are over, then the stream's contexts end. An empty pool copies the bytes
/// untouched.
pub async fn filter_tcp<D, U>(
    pool: &Arc<ChainPool>,
    downstream: D,
    upstream: U,
    props: Arc<StreamProperties>,
) -> std::io::Result<TcpOutcome>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut downstream, mut upstream) = (downstream, upstream);
    if pool.is_empty() {
        let (sent, received) =
            tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
        return Ok(TcpOutcome {
            sent,
            received,
            closed_by_filter: false,
        });
    }
    let worker = pool.pick();
    let provider: Arc<dyn nasp_proxywasm::PropertyProvider> = props;
    let Some((stream, status)) = pool.with_chain(worker, |c| c.tcp_stream(provider)) else {
        return Ok(TcpOutcome {
            closed_by_filter: true,
            ..TcpOutcome::default()
        });
    };
    let handle = TcpHandle {
        pool: pool.clone(),
        worker,
        stream: Mutex::new(Some(stream)),
    };
    if status == FilterStatus::Fail {
        return Ok(TcpOutcome {
            closed_by_filter: true,
            ..TcpOutcome::default()
        });
    }
    let (dr, dw) = tokio::io::split(downstream);
    let (ur, uw) = tokio::io::split(upstream);
    let result = tokio::try_join!(pump(&handle, dr, uw, false), pump(&handle, ur, dw, true));
    // Peer types: 1 local (we closed it), 2 remote (the peer did).
    let (outcome, peer, err) = match result {
        Ok((sent, received)) => (
            TcpOutcome {
                sent,
                received,
                closed_by_filter: false,
            },
            2,
            None,
        ),
        Err(PumpEnd::Filter) => (
            TcpOutcome {
                closed_by_filter: true,
                ..TcpOutcome::default()
            },
            1,
            None,
        ),
        Err(PumpEnd::Io(e)) => (TcpOutcome::default(), 2, Some(e)),
    };
    handle.with(|s, c| {
        s.downstream_close(c, peer);
        s.upstream_close(c, peer);
    });
    drop(handle);
    match err {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::get("/a?b=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn pairs(h: &http::HeaderMap) -> Vec<(String, String)> {
        h.iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    fn strs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const HEADERS: [(&str, &str); 4] = [
        ("host", "echo.demo:80"),
        ("accept", "*/*"),
        ("x-peer", "p"),
        ("x-multi", "1"),
    ];

    /// The request's headers after a filter did `edit` to its map, and
    /// whether the layer saw a change; checked against converting the
    /// whole map back, as the layer did before edits were read.
    fn filtered(edit: impl FnOnce(&mut HeaderMap)) -> (Vec<(String, String)>, bool) {
        let mut parts = request(&HEADERS);
        parts
            .headers
            .append("x-multi", http::HeaderValue::from_static("2"));
        let mut map = request_map(&parts, false);
        edit(&mut map);
        let mut rebuilt = parts.clone();
        rebuild_request(&map, &mut rebuilt);
        let changed = apply_request(&map, &mut parts, false);
        let mut got = pairs(&parts.headers);
        let mut want = pairs(&rebuilt.headers);
        // The same headers; order may differ only between names.
        got.sort();
        want.sort();
        assert_eq!(got, want, "the edit applied is not the whole map's");
        assert_eq!(parts.uri, rebuilt.uri);
        assert_eq!(parts.method, rebuilt.method);
        (pairs(&parts.headers), changed)
    }

    #[test]
    fn an_untouched_map_leaves_the_request_as_it_was() {
        let (h, changed) = filtered(|_| {});
        assert!(!changed);
        let mut want = strs(&HEADERS);
        want.push(("x-multi".into(), "2".into()));
        assert_eq!(h, want);
    }

    #[test]
    fn added_and_removed_headers_are_applied_by_name() {
        let (h, changed) = filtered(|m| {
            m.remove(b"x-peer");
            m.add(b"x-envoy-peer-metadata-id", b"sidecar~10.0.0.1~web");
            m.add(b"x-multi", b"3");
        });
        assert!(changed);
        assert_eq!(
            h,
            strs(&[
                ("host", "echo.demo:80"),
                ("accept", "*/*"),
                ("x-multi", "1"),
                ("x-multi", "2"),
                ("x-multi", "3"),
                ("x-envoy-peer-metadata-id", "sidecar~10.0.0.1~web"),
            ])
        );
        // Every value of a name removed.
        let (h, _) = filtered(|m| m.remove(b"x-multi"));
        assert!(h.iter().all(|(k, _)| k != "x-multi"), "{h:?}");
    }

    #[test]
    fn values_replaced_or_pseudo_headers_changed_convert_the_whole_map() {
        let mut parts = request(&HEADERS);
        let mut map = request_map(&parts, false);
        map.replace(b"accept", b"text/plain");
        assert_eq!(edit_of(&parts.headers, true, &map), Edit::Rebuild);
        let (h, changed) = filtered(|m| m.replace(b"accept", b"text/plain"));
        assert!(changed);
        assert!(h.contains(&("accept".into(), "text/plain".into())));
        // One of two values gone: not expressible by name, rebuilt.
        let (h, _) = filtered(|m| {
            let kept: Vec<(Vec<u8>, Vec<u8>)> = m
                .iter()
                .filter(|(k, v)| !(*k == b"x-multi" && *v == b"1"))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            m.set_all(kept);
        });
        assert!(h.contains(&("x-multi".into(), "2".into())));
        assert!(!h.contains(&("x-multi".into(), "1".into())));
        // A new :path and :authority: a new URI and Host.
        map = request_map(&parts, false);
        map.replace(b":path", b"/other");
        map.replace(b":authority", b"elsewhere:81");
        assert!(apply_request(&map, &mut parts, false));
        assert_eq!(parts.uri, "/other");
        assert_eq!(parts.headers["host"], "elsewhere:81");
        let (_, changed) = filtered(|m| m.replace(b":method", b"POST"));
        assert!(changed);
    }

    #[test]
    fn a_map_changed_and_changed_back_is_still_compared() {
        // Added then removed: the mark is gone, the comparison finds the
        // request as it was.
        let (h, changed) = filtered(|m| {
            m.add(b"x-temp", b"1");
            m.remove(b"x-temp");
        });
        assert!(!changed);
        assert!(h.iter().all(|(k, _)| k != "x-temp"), "{h:?}");
    }

    #[test]
    fn responses_too() {
        let mut parts = http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("x-envoy-peer-metadata", "abc")
            .body(())
            .expect("response")
            .into_parts()
            .0;
        let mut map = response_map(&parts);
        assert!(!apply_response(&map, &mut parts));
        map.remove(b"x-envoy-peer-metadata");
        map.add(b"x-added", b"1");
        assert!(apply_response(&map, &mut parts));
        assert_eq!(
            pairs(&parts.headers),
            strs(&[("content-type", "text/plain"), ("x-added", "1")])
        );
        map.replace(b":status", b"503");
        assert!(apply_response(&map, &mut parts));
        assert_eq!(parts.status, 503);
    }
}
