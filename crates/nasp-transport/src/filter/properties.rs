//! The properties a proxy-wasm filter reads about one HTTP exchange or TCP
//! connection (`proxy_get_property`), filled from the real connection, the
//! route and the cluster, with Envoy's names and encodings (ints 8-byte LE,
//! bools one byte, maps in the pairs encoding).
//!
//! Invariants: a [`StreamProperties`] is shared (`Arc`) between the filter
//! chain and the transport, so values that are only known later (the
//! upstream the client picked, the response code, byte counts) are seen by
//! filters from the moment they are set; nothing here blocks for longer than
//! a copy, and no lookup can panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nasp_proxywasm::{HeaderMap, PropertyProvider, PropertyValue};
use nasp_xds::WorkloadSettings;
use nasp_xds::cluster::IstioService;

use crate::info::Upstream;

/// Which way the traffic of a listener flows (`listener_direction`, Envoy's
/// `TrafficDirection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerDirection {
    /// Traffic to this workload (value 1).
    Inbound,
    /// Traffic from this workload (value 2).
    Outbound,
}

impl ListenerDirection {
    /// Envoy's enum value: 1 inbound, 2 outbound.
    pub fn code(self) -> i64 {
        match self {
            ListenerDirection::Inbound => 1,
            ListenerDirection::Outbound => 2,
        }
    }
}

/// The local node (`node.id`, `node.cluster`, `node.metadata.*`), built once
/// from the workload's settings and shared by every stream.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProperties {
    id: String,
    cluster: String,
    metadata: BTreeMap<String, PropertyValue>,
}

impl NodeProperties {
    /// The node as Istio's agent presents it: the id and cluster of
    /// [`WorkloadSettings::node`], and the metadata Istio's filters read.
    /// `OWNER` is the settings' extra `OWNER` or, as Istio's agent derives
    /// it, `kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<workload>`.
    pub fn from_settings(s: &WorkloadSettings) -> Self {
        let node = s.node();
        let mut metadata = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            metadata.insert(k.to_string(), PropertyValue::Bytes(v.into_bytes()));
        };
        for (k, v) in &s.extra {
            put(k, v.clone());
        }
        put("NAME", s.pod_name.clone());
        put("NAMESPACE", s.namespace.clone());
        put("WORKLOAD_NAME", s.workload().to_string());
        put("ISTIO_VERSION", s.istio_version.clone());
        put("MESH_ID", s.mesh_id.clone());
        put("CLUSTER_ID", s.cluster_id.clone());
        put("SERVICE_ACCOUNT", s.service_account.clone());
        put("APP_CONTAINERS", s.app_containers.join(","));
        put("INSTANCE_IPS", s.instance_ips.join(","));
        if !s.network.is_empty() {
            put("NETWORK", s.network.clone());
        }
        if !s.extra.contains_key("OWNER") {
            put(
                "OWNER",
                format!(
                    "kubernetes://apis/apps/v1/namespaces/{}/deployments/{}",
                    s.namespace,
                    s.workload()
                ),
            );
        }
        let map = |m: &BTreeMap<String, String>| {
            PropertyValue::Map(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        };
        metadata.insert("LABELS".into(), map(&s.labels));
        metadata.insert("PLATFORM_METADATA".into(), map(&s.platform_metadata));
        Self {
            id: node.id,
            cluster: node.cluster,
            metadata,
        }
    }

    /// The node id (`sidecar~<ip>~<pod>.<ns>~<ns>.svc.<domain>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn property(&self, path: &[&str]) -> Option<PropertyValue> {
        match path {
            ["id"] => Some(self.id.as_str().into()),
            ["cluster"] => Some(self.cluster.as_str().into()),
            ["metadata", key] => self.metadata.get(*key).cloned(),
            _ => None,
        }
    }
}

/// What a plugin reads outside any stream: the local node and the direction
/// of the listener its pool serves, as Envoy answers them from the plugin's
/// listener (`node.*`, `listener_direction`). Given to every plugin of a
/// pool with [`nasp_proxywasm::PluginConfig::properties`], so root contexts
/// see them in `proxy_on_vm_start`, `proxy_on_configure` and
/// `proxy_on_tick`; streams ask their [`StreamProperties`] first.
#[derive(Clone, Debug)]
pub struct ListenerProperties {
    node: Arc<NodeProperties>,
    direction: ListenerDirection,
}

impl ListenerProperties {
    /// The node and the listener direction of one pool.
    pub fn new(node: Arc<NodeProperties>, direction: ListenerDirection) -> Self {
        Self { node, direction }
    }
}

impl PropertyProvider for ListenerProperties {
    fn property(&self, path: &[&str]) -> Option<PropertyValue> {
        match path {
            ["node", rest @ ..] => self.node.property(rest),
            ["listener_direction"] => Some(PropertyValue::Int(self.direction.code())),
            _ => None,
        }
    }
}

/// What is known about the connection a stream runs on when it starts.
/// Inbound: the downstream peer and this workload; outbound: this workload
/// (`local_san`) — the upstream side comes later with [`Upstream`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionProperties {
    /// `source.address` / `source.port`: the peer that connected (inbound).
    pub source: Option<SocketAddr>,
    /// `destination.address` / `destination.port`: the local address the
    /// peer connected to (inbound).
    pub destination: Option<SocketAddr>,
    /// `connection.mtls`.
    pub mtls: bool,
    /// `connection.uri_san_peer_certificate`: the peer's SPIFFE id.
    pub peer_san: Option<String>,
    /// `connection.uri_san_local_certificate` (and, outbound,
    /// `upstream.uri_san_local_certificate`): this workload's SPIFFE id.
    /// Shared with the listener's configuration (it is the same on every
    /// stream).
    pub local_san: Option<Arc<str>>,
    /// `connection.negotiated_protocol`: the ALPN agreed downstream.
    pub negotiated_protocol: Option<String>,
    /// `connection.requested_server_name`: the SNI the peer asked for.
    pub requested_server_name: Option<String>,
    /// Inbound: the local cluster the listener hands the stream to
    /// (`cluster_name`, `cluster_metadata` when no upstream answers them).
    pub local_cluster: Option<LocalCluster>,
}

/// The inbound cluster of a listener, as a sidecar's `inbound|<port>||`:
/// its name and the services its Istio metadata names (the ones the local
/// workload serves on that port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalCluster {
    /// `inbound|8080||`.
    pub name: Arc<str>,
    /// The services (`cluster_metadata.filter_metadata.istio.services`).
    pub services: Arc<[IstioService]>,
}

/// The request as the filters last left it (`request.*`).
#[derive(Debug)]
struct RequestInfo {
    headers: HeaderMap,
    protocol: &'static str,
}

#[derive(Debug, Default)]
struct ResponseInfo {
    code: Option<u16>,
    headers: Option<HeaderMap>,
    trailers: Option<HeaderMap>,
    grpc_status: Option<i64>,
}

/// Envoy's response flag bits (`response.flags`, `StreamInfo::ResponseFlag`)
/// that the transport can know.
pub mod response_flags {
    /// `UH`: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// `UT`: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// `LR`: local reset.
    pub const LOCAL_RESET: u64 = 0x8;
    /// `UR`: upstream remote reset.
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// `UF`: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// `UO`: upstream overflow (circuit breaker).
    pub const UPSTREAM_OVERFLOW: u64 = 0x80;
    /// `NR`: no route found.
    pub const NO_ROUTE_FOUND: u64 = 0x100;
    /// `DC`: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    /// `URX`: upstream retry limit exceeded.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 0x8000;
}

/// The properties of one stream: a [`PropertyProvider`] the filter chain
/// asks, and setters the transport calls as the exchange goes on.
#[derive(Debug)]
pub struct StreamProperties {
    node: Arc<NodeProperties>,
    direction: ListenerDirection,
    connection: ConnectionProperties,
    start: SystemTime,
    started: Instant,
    ended: OnceLock<Instant>,
    request: Mutex<Option<Arc<RequestInfo>>>,
    response: Mutex<ResponseInfo>,
    upstream: OnceLock<Upstream>,
    request_header_bytes: AtomicU64,
    request_body_bytes: AtomicU64,
    response_header_bytes: AtomicU64,
    response_body_bytes: AtomicU64,
    flags: AtomicU64,
    /// gRPC message counts (request, response), for gRPC requests only.
    grpc_messages: OnceLock<Mutex<[GrpcFrames; 2]>>,
}

/// The property key of Envoy's `grpc_stats` filter state
/// (`filter_state.envoy.filters.http.grpc_stats`), which Istio's stats
/// filter reads for `istio_request_messages_total` and
/// `istio_response_messages_total`.
pub const GRPC_STATS_FILTER_STATE: &str = "envoy.filters.http.grpc_stats";

/// Counts the gRPC messages of one direction of a stream as Envoy's
/// `grpc_stats` filter does (its `Grpc::FrameInspector`): each
/// length-prefixed frame (1 flag byte, 4-byte big-endian length, the
/// message) counts when its first byte passes, however the frames are cut
/// into chunks. It only skips bytes, so any input is fine.
#[derive(Debug, Default, Clone, Copy)]
pub struct GrpcFrames {
    count: u64,
    prefix: [u8; 5],
    prefix_len: usize,
    remaining: u64,
}

impl GrpcFrames {
    /// Reads the next chunk of the body.
    pub fn inspect(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining).map_or(data.len(), |r| r.min(data.len()));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.prefix_len == 0 {
                self.count += 1;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.prefix_len = 0;
            }
        }
    }

    /// The messages begun so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn int(v: u64) -> PropertyValue {
    PropertyValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

fn nanos(d: std::time::Duration) -> PropertyValue {
    PropertyValue::Int(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn header_value(h: &HeaderMap, name: &str) -> Option<PropertyValue> {
    h.get(name.as_bytes())
        .map(|v| PropertyValue::Bytes(v.to_vec()))
}

fn header_pairs(h: &HeaderMap) -> PropertyValue {
    PropertyValue::Map(h.to_string_pairs())
}

fn address(a: Option<SocketAddr>, what: &str) -> Option<PropertyValue> {
    let a = a?;
    match what {
        "address" => Some(a.to_string().as_str().into()),
        "port" => Some(PropertyValue::Int(i64::from(a.port()))),
        _ => None,
    }
}

impl StreamProperties {
    /// Properties of a stream starting now.
    pub fn new(
        node: Arc<NodeProperties>,
        direction: ListenerDirection,
        connection: ConnectionProperties,
    ) -> Self {
        Self {
            node,
            direction,
            connection,
            start: SystemTime::now(),
            started: Instant::now(),
            ended: OnceLock::new(),
            request: Mutex::new(None),
            response: Mutex::new(ResponseInfo::default()),
            upstream: OnceLock::new(),
            request_header_bytes: AtomicU64::new(0),
            request_body_bytes: AtomicU64::new(0),
            response_header_bytes: AtomicU64::new(0),
            response_body_bytes: AtomicU64::new(0),
            flags: AtomicU64::new(0),
            grpc_messages: OnceLock::new(),
        }
    }

    /// The direction of the stream's listener.
    pub fn direction(&self) -> ListenerDirection {
        self.direction
    }

    /// The connection the stream runs on.
    pub fn connection(&self) -> &ConnectionProperties {
        &self.connection
    }

    /// Where the request went (`upstream.*`, `cluster_name`, `route_name`).
    /// Only the first call counts (a stream goes to one upstream in the
    /// end; the client sets it once it knows).
    pub fn set_upstream(&self, upstream: Upstream) {
        let _ = self.upstream.set(upstream);
    }

    /// The upstream, once set.
    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.get()
    }

    /// Adds [`response_flags`] bits.
    pub fn add_response_flags(&self, flags: u64) {
        self.flags.fetch_or(flags, Ordering::Relaxed);
    }

    /// The request headers as they are now (pseudo-headers included); the
    /// filter layer calls it before and after the request filters.
    pub fn set_request(&self, headers: &HeaderMap, version: http::Version) {
        self.set_request_map(headers.clone(), version);
    }

    /// [`Self::set_request`] with a map the caller no longer needs.
    pub fn set_request_map(&self, headers: HeaderMap, version: http::Version) {
        let protocol = match version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        self.request_header_bytes
            .store(headers.byte_size() as u64, Ordering::Relaxed);
        // A gRPC request (as Envoy's `Grpc::Common::isGrpcRequestHeaders`
        // decides) gets message counts from here on.
        if headers
            .get(b"content-type")
            .is_some_and(|c| c.starts_with(b"application/grpc"))
        {
            let _ = self.grpc_messages.set(Mutex::default());
        }
        *lock(&self.request) = Some(Arc::new(RequestInfo { headers, protocol }));
    }

    /// The response status and headers (before the response filters run,
    /// then as they left them).
    pub fn set_response(&self, code: u16, headers: &HeaderMap) {
        self.set_response_map(code, headers.clone());
    }

    /// [`Self::set_response`] with a map the caller no longer needs.
    pub fn set_response_map(&self, code: u16, headers: HeaderMap) {
        self.response_header_bytes
            .store(headers.byte_size() as u64, Ordering::Relaxed);
        let mut r = lock(&self.response);
        r.code = Some(code);
        if let Some(g) = headers
            .get(b"grpc-status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        {
            r.grpc_status = Some(g);
        }
        r.headers = Some(headers);
    }

    /// The response trailers (`grpc-status` is read from them).
    pub fn set_response_trailers(&self, trailers: &HeaderMap) {
        let mut r = lock(&self.response);
        if let Some(g) = trailers
            .get(b"grpc-status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        {
            r.grpc_status = Some(g);
        }
        r.trailers = Some(trailers.clone());
    }

    /// Counts request body bytes received.
    pub fn add_request_body_bytes(&self, n: usize) {
        self.request_body_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts response body bytes received.
    pub fn add_response_body_bytes(&self, n: usize) {
        self.response_body_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a chunk of the request body: its bytes and, on a gRPC
    /// request, the messages it begins.
    pub fn add_request_body(&self, data: &[u8]) {
        self.add_request_body_bytes(data.len());
        if let Some(g) = self.grpc_messages.get() {
            lock(g)[0].inspect(data);
        }
    }

    /// Counts a chunk of the response body: its bytes and, on a gRPC
    /// request, the messages it begins.
    pub fn add_response_body(&self, data: &[u8]) {
        self.add_response_body_bytes(data.len());
        if let Some(g) = self.grpc_messages.get() {
            lock(g)[1].inspect(data);
        }
    }

    /// The gRPC messages counted so far (request, response); `None` when
    /// the request is not gRPC.
    pub fn grpc_messages(&self) -> Option<(u64, u64)> {
        let g = lock(self.grpc_messages.get()?);
        Some((g[0].count(), g[1].count()))
    }

    /// Marks the end of the exchange (`request.duration` stops here).
    pub fn mark_end(&self) {
        let _ = self.ended.set(Instant::now());
    }

    fn request_property(&self, path: &[&str]) -> Option<PropertyValue> {
        let bytes = |a: &AtomicU64| a.load(Ordering::Relaxed);
        match path {
            ["time"] => return Some(nanos(self.start.duration_since(UNIX_EPOCH).ok()?)),
            ["duration"] => {
                let end = self.ended.get().copied().unwrap_or_else(Instant::now);
                return Some(nanos(end.duration_since(self.started)));
            }
            ["total_size"] => {
                return Some(int(
                    bytes(&self.request_header_bytes) + bytes(&self.request_body_bytes)
                ));
            }
            _ => {}
        }
        let req = lock(&self.request).clone()?;
        let h = &req.headers;
        match path {
            ["path"] => header_value(h, ":path"),
            ["url_path"] => {
                let p = h.get(b":path")?;
                let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
                Some(PropertyValue::Bytes(p[..end].to_vec()))
            }
            ["query"] => {
                let p = h.get(b":path")?;
                let q = p
                    .iter()
                    .position(|b| *b == b'?')
                    .map_or(&[][..], |i| &p[i + 1..]);
                Some(PropertyValue::Bytes(q.to_vec()))
            }
            ["host"] => header_value(h, ":authority"),
            ["method"] => header_value(h, ":method"),
            ["scheme"] => header_value(h, ":scheme"),
            ["id"] => header_value(h, "x-request-id"),
            ["referer"] => header_value(h, "referer"),
            ["useragent"] => header_value(h, "user-agent"),
            ["protocol"] => Some(req.protocol.into()),
            ["size"] => h
                .get(b"content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                .map(int)
                .or_else(|| Some(int(bytes(&self.request_body_bytes)))),
            ["headers"] => Some(header_pairs(h)),
            ["headers", name] => header_value(h, name),
            _ => None,
        }
    }

    fn response_property(&self, path: &[&str]) -> Option<PropertyValue> {
        let bytes = |a: &AtomicU64| a.load(Ordering::Relaxed);
        match path {
            ["flags"] => return Some(int(self.flags.load(Ordering::Relaxed))),
            ["size"] => return Some(int(bytes(&self.response_body_bytes))),
            ["total_size"] => {
                return Some(int(
                    bytes(&self.response_header_bytes) + bytes(&self.response_body_bytes)
                ));
            }
            _ => {}
        }
        let r = lock(&self.response);
        match path {
            ["code"] => r.code.map(|c| PropertyValue::Int(i64::from(c))),
            ["grpc_status"] => r.grpc_status.map(PropertyValue::Int),
            ["headers"] => r.headers.as_ref().map(header_pairs),
            ["headers", name] => header_value(r.headers.as_ref()?, name),
            ["trailers"] => r.trailers.as_ref().map(header_pairs),
            ["trailers", name] => header_value(r.trailers.as_ref()?, name),
            _ => None,
        }
    }

    fn upstream_property(&self, path: &[&str]) -> Option<PropertyValue> {
        let up = self.upstream.get()?;
        match path {
            ["address"] => address(Some(up.address), "address"),
            ["port"] => address(Some(up.address), "port"),
            ["mtls"] => Some(PropertyValue::Bool(up.mtls)),
            _ => None,
        }
    }

    /// The text properties the stream keeps as they are (names, SANs,
    /// ALPNs), so that a read can borrow them
    /// ([`PropertyProvider::with_property_bytes`]): `Some(value)` for one
    /// of those paths (`None` inside when absent), `None` for any other.
    fn text_property(&self, path: &[&str]) -> Option<Option<&str>> {
        let c = &self.connection;
        let up = self.upstream.get();
        Some(match path {
            ["cluster_name"] => match (up, &c.local_cluster) {
                (Some(u), _) => Some(&*u.cluster),
                (None, Some(l)) => Some(&*l.name),
                (None, None) => None,
            },
            ["route_name"] => up.map(|u| &*u.route).filter(|r| !r.is_empty()),
            ["connection", "uri_san_peer_certificate"] => c.peer_san.as_deref(),
            ["connection", "uri_san_local_certificate"] => {
                c.local_san.as_deref().filter(|_| c.mtls)
            }
            ["connection", "negotiated_protocol"] => c.negotiated_protocol.as_deref(),
            ["connection", "requested_server_name"] => c.requested_server_name.as_deref(),
            ["upstream", "uri_san_local_certificate"] => c
                .local_san
                .as_deref()
                .filter(|_| up.is_some_and(|u| u.mtls)),
            ["upstream", "uri_san_peer_certificate"] => up.and_then(|u| u.peer_id.as_deref()),
            ["upstream", "negotiated_protocol"] => up.and_then(|u| u.alpn.as_deref()),
            _ => return None,
        })
    }

    fn connection_property(&self, path: &[&str]) -> Option<PropertyValue> {
        match path {
            ["mtls"] => Some(PropertyValue::Bool(self.connection.mtls)),
            _ => None,
        }
    }
}

impl StreamProperties {
    /// Every property but the [`Self::text_property`] ones: made per read.
    fn computed_property(&self, path: &[&str]) -> Option<PropertyValue> {
        let outbound = self.direction == ListenerDirection::Outbound;
        match path {
            ["node", rest @ ..] => self.node.property(rest),
            ["listener_direction"] => Some(PropertyValue::Int(self.direction.code())),
            ["source", what] => address(self.connection.source, what),
            // Outbound, the destination is the endpoint the client picked.
            ["destination", what] if outbound => {
                address(self.upstream.get().map(|u| u.address), what)
            }
            ["destination", what] => address(self.connection.destination, what),
            ["connection", rest @ ..] => self.connection_property(rest),
            ["upstream", rest @ ..] => self.upstream_property(rest),
            [
                "cluster_metadata",
                "filter_metadata",
                "istio",
                "services",
                i,
                what,
            ] => {
                let services = match (self.upstream.get(), &self.connection.local_cluster) {
                    (Some(u), _) => &u.services,
                    (None, Some(l)) => &l.services,
                    (None, None) => return None,
                };
                let s = services.get(i.parse::<usize>().ok()?)?;
                let v = match *what {
                    "host" => &s.host,
                    "name" => &s.name,
                    "namespace" => &s.namespace,
                    _ => return None,
                };
                (!v.is_empty()).then(|| PropertyValue::from(v.as_str()))
            }
            ["request", rest @ ..] => self.request_property(rest),
            ["response", rest @ ..] => self.response_property(rest),
            // Envoy's `GrpcStatsObject::serializeAsString`: "request,response".
            ["filter_state", GRPC_STATS_FILTER_STATE] => {
                let (req, resp) = self.grpc_messages()?;
                Some(PropertyValue::Bytes(format!("{req},{resp}").into_bytes()))
            }
            _ => None,
        }
    }
}

impl PropertyProvider for StreamProperties {
    fn property(&self, path: &[&str]) -> Option<PropertyValue> {
        match self.text_property(path) {
            Some(text) => text.map(PropertyValue::from),
            None => self.computed_property(path),
        }
    }

    /// The stream's text properties are lent where they are kept.
    fn with_property_bytes(&self, path: &[&str], f: &mut dyn FnMut(&[u8])) -> bool {
        match self.text_property(path) {
            Some(text) => text.map(|t| f(t.as_bytes())).is_some(),
            None => PropertyValue::lend(self.computed_property(path), f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WorkloadSettings {
        WorkloadSettings {
            pod_name: "web-1".into(),
            namespace: "demo".into(),
            workload_name: "web".into(),
            instance_ips: vec!["10.0.0.7".into(), "fd00::7".into()],
            labels: [("app".to_string(), "web".to_string())].into(),
            app_containers: vec!["web".into(), "side".into()],
            ..Default::default()
        }
    }

    /// The value at `path`, read both ways the host can (a lent value and
    /// a `PropertyValue`), which must agree.
    fn get(p: &StreamProperties, path: &str) -> Option<Vec<u8>> {
        let segs: Vec<&str> = path.split('.').collect();
        let value = p.property(&segs).map(|v| v.serialize());
        let mut lent = None;
        let found = p.with_property_bytes(&segs, &mut |b| lent = Some(b.to_vec()));
        assert_eq!(found, lent.is_some(), "{path}");
        // A running request's duration moves between the two reads.
        if path != "request.duration" {
            assert_eq!(lent, value, "{path}: lent and made differ");
        }
        value
    }

    fn text(p: &StreamProperties, path: &str) -> Option<String> {
        get(p, path).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn int_of(p: &StreamProperties, path: &str) -> Option<i64> {
        let b: [u8; 8] = get(p, path)?.try_into().ok()?;
        Some(i64::from_le_bytes(b))
    }

    fn inbound() -> StreamProperties {
        StreamProperties::new(
            Arc::new(NodeProperties::from_settings(&settings())),
            ListenerDirection::Inbound,
            ConnectionProperties {
                source: Some("10.0.0.9:40000".parse().unwrap()),
                destination: Some("10.0.0.7:8080".parse().unwrap()),
                mtls: true,
                peer_san: Some("spiffe://cluster.local/ns/demo/sa/client".into()),
                local_san: Some("spiffe://cluster.local/ns/demo/sa/web".into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn node_properties_come_from_the_workload_settings() {
        let p = inbound();
        assert_eq!(
            text(&p, "node.id").as_deref(),
            Some("sidecar~10.0.0.7~web-1.demo~demo.svc.cluster.local")
        );
        assert_eq!(text(&p, "node.metadata.NAME").as_deref(), Some("web-1"));
        assert_eq!(text(&p, "node.metadata.NAMESPACE").as_deref(), Some("demo"));
        assert_eq!(
            text(&p, "node.metadata.WORKLOAD_NAME").as_deref(),
            Some("web")
        );
        assert_eq!(
            text(&p, "node.metadata.OWNER").as_deref(),
            Some("kubernetes://apis/apps/v1/namespaces/demo/deployments/web")
        );
        assert_eq!(
            text(&p, "node.metadata.ISTIO_VERSION").as_deref(),
            Some("1.20.0")
        );
        assert_eq!(
            text(&p, "node.metadata.MESH_ID").as_deref(),
            Some("cluster.local")
        );
        assert_eq!(
            text(&p, "node.metadata.CLUSTER_ID").as_deref(),
            Some("Kubernetes")
        );
        assert_eq!(
            text(&p, "node.metadata.INSTANCE_IPS").as_deref(),
            Some("10.0.0.7,fd00::7")
        );
        assert_eq!(
            text(&p, "node.metadata.APP_CONTAINERS").as_deref(),
            Some("web,side")
        );
        let labels = get(&p, "node.metadata.LABELS").unwrap();
        assert_eq!(
            nasp_proxywasm::pairs::decode(&labels).unwrap(),
            vec![(b"app".to_vec(), b"web".to_vec())]
        );
        // An empty map is the empty pairs encoding (no bytes, as Envoy's),
        // not a missing property.
        assert_eq!(
            get(&p, "node.metadata.PLATFORM_METADATA").map(|b| b.len()),
            Some(0)
        );
        assert_eq!(get(&p, "node.metadata.NOPE"), None);
    }

    #[test]
    fn listener_properties_answer_the_node_and_direction_only() {
        let node = Arc::new(NodeProperties::from_settings(&settings()));
        let get = |p: &ListenerProperties, path: &str| {
            let segs: Vec<&str> = path.split('.').collect();
            p.property(&segs).map(|v| v.serialize())
        };
        let out = ListenerProperties::new(node.clone(), ListenerDirection::Outbound);
        let inb = ListenerProperties::new(node, ListenerDirection::Inbound);
        assert_eq!(
            get(&out, "node.id"),
            Some(b"sidecar~10.0.0.7~web-1.demo~demo.svc.cluster.local".to_vec())
        );
        assert_eq!(get(&out, "node.metadata.NAMESPACE"), Some(b"demo".to_vec()));
        assert_eq!(
            get(&out, "listener_direction"),
            Some(2i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            get(&inb, "listener_direction"),
            Some(1i64.to_le_bytes().to_vec())
        );
        // Stream attributes are not the plugin's to answer.
        assert_eq!(get(&out, "request.path"), None);
        assert_eq!(get(&out, "source.address"), None);
    }

    #[test]
    fn inbound_connection_properties() {
        let p = inbound();
        assert_eq!(int_of(&p, "listener_direction"), Some(1));
        assert_eq!(
            text(&p, "source.address").as_deref(),
            Some("10.0.0.9:40000")
        );
        assert_eq!(int_of(&p, "source.port"), Some(40000));
        assert_eq!(
            text(&p, "destination.address").as_deref(),
            Some("10.0.0.7:8080")
        );
        assert_eq!(int_of(&p, "destination.port"), Some(8080));
        assert_eq!(get(&p, "connection.mtls"), Some(vec![1]));
        assert_eq!(
            text(&p, "connection.uri_san_peer_certificate").as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/client")
        );
        assert_eq!(
            text(&p, "connection.uri_san_local_certificate").as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/web")
        );
        assert_eq!(get(&p, "cluster_name"), None);
        assert_eq!(get(&p, "upstream.address"), None);
    }

    #[test]
    fn outbound_upstream_is_seen_once_set() {
        let p = StreamProperties::new(
            Arc::new(NodeProperties::from_settings(&settings())),
            ListenerDirection::Outbound,
            ConnectionProperties {
                local_san: Some("spiffe://cluster.local/ns/demo/sa/web".into()),
                ..Default::default()
            },
        );
        assert_eq!(int_of(&p, "listener_direction"), Some(2));
        assert_eq!(get(&p, "upstream.port"), None);
        assert_eq!(get(&p, "upstream.uri_san_local_certificate"), None);
        p.set_upstream(Upstream {
            cluster: "outbound|80||echo.demo.svc.cluster.local".into(),
            route: "echo.demo.svc.cluster.local:80".into(),
            address: "10.1.0.3:8080".parse().unwrap(),
            mtls: true,
            peer_id: Some("spiffe://cluster.local/ns/demo/sa/echo".into()),
            alpn: Some("istio-h2".into()),
            attempts: 1,
            services: Arc::from([IstioService {
                host: "echo.demo.svc.cluster.local".into(),
                name: "echo".into(),
                namespace: "demo".into(),
            }]),
        });
        assert_eq!(
            text(&p, "cluster_metadata.filter_metadata.istio.services.0.host").as_deref(),
            Some("echo.demo.svc.cluster.local")
        );
        assert_eq!(
            text(
                &p,
                "cluster_metadata.filter_metadata.istio.services.0.namespace"
            )
            .as_deref(),
            Some("demo")
        );
        assert_eq!(
            get(&p, "cluster_metadata.filter_metadata.istio.services.1.host"),
            None
        );
        assert_eq!(
            text(&p, "cluster_name").as_deref(),
            Some("outbound|80||echo.demo.svc.cluster.local")
        );
        assert_eq!(
            text(&p, "route_name").as_deref(),
            Some("echo.demo.svc.cluster.local:80")
        );
        assert_eq!(
            text(&p, "upstream.address").as_deref(),
            Some("10.1.0.3:8080")
        );
        assert_eq!(int_of(&p, "upstream.port"), Some(8080));
        assert_eq!(int_of(&p, "destination.port"), Some(8080));
        assert_eq!(
            text(&p, "upstream.uri_san_peer_certificate").as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/echo")
        );
        assert_eq!(
            text(&p, "upstream.uri_san_local_certificate").as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/web")
        );
        assert_eq!(
            text(&p, "upstream.negotiated_protocol").as_deref(),
            Some("istio-h2")
        );
    }

    #[test]
    fn inbound_streams_name_the_local_cluster_and_its_services() {
        let bare = inbound();
        assert_eq!(get(&bare, "cluster_name"), None);
        assert_eq!(
            get(
                &bare,
                "cluster_metadata.filter_metadata.istio.services.0.host"
            ),
            None
        );
        let p = StreamProperties::new(
            Arc::new(NodeProperties::from_settings(&settings())),
            ListenerDirection::Inbound,
            ConnectionProperties {
                local_cluster: Some(LocalCluster {
                    name: "inbound|8080||".into(),
                    services: Arc::from([
                        IstioService {
                            host: "web.demo.svc.cluster.local".into(),
                            name: "web".into(),
                            namespace: "demo".into(),
                        },
                        IstioService {
                            host: "web-canary.demo.svc.cluster.local".into(),
                            name: String::new(),
                            namespace: "demo".into(),
                        },
                    ]),
                }),
                ..Default::default()
            },
        );
        assert_eq!(text(&p, "cluster_name").as_deref(), Some("inbound|8080||"));
        let svc = |i: usize, what: &str| {
            text(
                &p,
                &format!("cluster_metadata.filter_metadata.istio.services.{i}.{what}"),
            )
        };
        assert_eq!(
            svc(0, "host").as_deref(),
            Some("web.demo.svc.cluster.local")
        );
        assert_eq!(svc(0, "name").as_deref(), Some("web"));
        assert_eq!(
            svc(1, "host").as_deref(),
            Some("web-canary.demo.svc.cluster.local")
        );
        // An empty field is absent, as a Struct without it.
        assert_eq!(svc(1, "name"), None);
        assert_eq!(svc(0, "port"), None);
        assert_eq!(svc(2, "host"), None);
        assert_eq!(
            get(&p, "cluster_metadata.filter_metadata.istio.services.x.host"),
            None
        );
    }

    #[test]
    fn request_and_response_attributes() {
        let p = inbound();
        let h = HeaderMap::from_pairs([
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "web.demo:8080"),
            (":path", "/a/b?x=1"),
            ("x-request-id", "r-1"),
            ("content-length", "5"),
        ]);
        p.set_request(&h, http::Version::HTTP_11);
        assert_eq!(text(&p, "request.path").as_deref(), Some("/a/b?x=1"));
        assert_eq!(text(&p, "request.url_path").as_deref(), Some("/a/b"));
        assert_eq!(text(&p, "request.query").as_deref(), Some("x=1"));
        assert_eq!(text(&p, "request.host").as_deref(), Some("web.demo:8080"));
        assert_eq!(text(&p, "request.method").as_deref(), Some("POST"));
        assert_eq!(text(&p, "request.scheme").as_deref(), Some("http"));
        assert_eq!(text(&p, "request.id").as_deref(), Some("r-1"));
        assert_eq!(text(&p, "request.protocol").as_deref(), Some("HTTP/1.1"));
        assert_eq!(
            text(&p, "request.headers.x-request-id").as_deref(),
            Some("r-1")
        );
        assert_eq!(int_of(&p, "request.size"), Some(5));
        p.add_request_body_bytes(5);
        assert_eq!(
            int_of(&p, "request.total_size"),
            Some(h.byte_size() as i64 + 5)
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let t = int_of(&p, "request.time").unwrap();
        assert!((now.as_nanos() as i64 - t).abs() < 60_000_000_000);
        assert!(int_of(&p, "request.duration").unwrap() >= 0);

        assert_eq!(get(&p, "response.code"), None);
        let r = HeaderMap::from_pairs([(":status", "200"), ("grpc-status", "0")]);
        p.set_response(200, &r);
        assert_eq!(int_of(&p, "response.code"), Some(200));
        assert_eq!(int_of(&p, "response.grpc_status"), Some(0));
        p.set_response_trailers(&HeaderMap::from_pairs([("grpc-status", "14")]));
        assert_eq!(int_of(&p, "response.grpc_status"), Some(14));
        p.add_response_body_bytes(10);
        assert_eq!(int_of(&p, "response.size"), Some(10));
        assert_eq!(
            int_of(&p, "response.total_size"),
            Some(r.byte_size() as i64 + 10)
        );
        assert_eq!(int_of(&p, "response.flags"), Some(0));
        p.add_response_flags(response_flags::UPSTREAM_CONNECTION_FAILURE);
        assert_eq!(int_of(&p, "response.flags"), Some(0x20));
        p.mark_end();
        let d1 = int_of(&p, "request.duration").unwrap();
        std::thread::yield_now();
        assert_eq!(
            int_of(&p, "request.duration"),
            Some(d1),
            "frozen at the end"
        );
    }

    /// A gRPC frame: flag 0, big-endian length, the message.
    fn frame(msg: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        f.extend_from_slice(msg);
        f
    }

    #[test]
    fn grpc_frames_are_counted_however_the_body_is_cut() {
        let mut body = frame(b"hello");
        body.extend(frame(b""));
        body.extend(frame(&[7; 300]));
        // Whole, byte by byte, and cut inside a prefix and a message.
        for cuts in [
            vec![body.len()],
            vec![1; body.len()],
            vec![3, 4, 2, 200, 120],
        ] {
            let mut g = GrpcFrames::default();
            let mut rest = &body[..];
            for n in cuts {
                let n = n.min(rest.len());
                g.inspect(&rest[..n]);
                rest = &rest[n..];
            }
            g.inspect(rest);
            assert_eq!(g.count(), 3);
        }
        // A frame counts from its first byte, as Envoy's inspector does.
        let mut g = GrpcFrames::default();
        g.inspect(&[0]);
        assert_eq!(g.count(), 1);
        // A length that claims 4 GiB just swallows what follows.
        let mut g = GrpcFrames::default();
        g.inspect(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        g.inspect(&frame(b"x"));
        assert_eq!(g.count(), 1);
    }

    #[test]
    fn grpc_stats_filter_state_only_on_grpc_requests() {
        let grpc = HeaderMap::from_pairs([
            (":method", "POST"),
            (":path", "/nasp.echo.v1.Echo/EchoStream"),
            ("content-type", "application/grpc+proto"),
        ]);
        // The key has dots of its own: one segment after `filter_state`.
        let state = |p: &StreamProperties| {
            p.property(&["filter_state", GRPC_STATS_FILTER_STATE])
                .map(|v| String::from_utf8_lossy(&v.serialize()).into_owned())
        };
        let p = inbound();
        p.set_request(&grpc, http::Version::HTTP_2);
        assert_eq!(state(&p).as_deref(), Some("0,0"));
        p.add_request_body(&frame(b"ping"));
        let mut answers = frame(b"a");
        answers.extend(frame(b"b"));
        p.add_response_body(&answers[..4]);
        p.add_response_body(&answers[4..]);
        p.add_response_body(&frame(b"c"));
        assert_eq!(state(&p).as_deref(), Some("1,3"));
        assert_eq!(int_of(&p, "response.size"), Some(answers.len() as i64 + 6));

        let http = HeaderMap::from_pairs([(":method", "POST"), ("content-type", "text/plain")]);
        let p = inbound();
        p.set_request(&http, http::Version::HTTP_11);
        p.add_request_body(&frame(b"ping"));
        assert_eq!(state(&p), None);
    }
}
