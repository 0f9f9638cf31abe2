//! Istio's standard metrics, with Istio's names, labels and `unknown`
//! defaults, computed from the host's properties and the peer the
//! `metadata-exchange` filter stored before this one in the chain.
//!
//! HTTP / gRPC (any root id without `tcp`), reported in `proxy_on_log`:
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (histograms: the host's
//! Envoy buckets); gRPC also `istio_request_messages_total` and
//! `istio_response_messages_total` (peer labels only) from the host's
//! `filter_state.envoy.filters.http.grpc_stats` ("request,response", as
//! Envoy's `grpc_stats` filter serializes it), recorded as they grow: at
//! the response headers, on each body chunk after them, and in
//! `proxy_on_log`. TCP (a root id containing `tcp`):
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_received_bytes_total` (downstream → upstream),
//! `istio_tcp_sent_bytes_total` (upstream → downstream).
//!
//! Open connections and gRPC streams past their response headers are also
//! reported on every tick, every `tcp_reporting_duration` of the plugin's
//! configuration (protobuf JSON, `"15s"` by default, as Istio's), so a
//! connection that stays open and idle shows as opened, and its counts as
//! they stand, without waiting for its next byte or its close.
//!
//! Labels travel in the metric name as Istio's compiled filter encodes them
//! (`reporter=.=source;.;…;.;istio_requests_total`); the host turns them
//! into Prometheus labels. `reporter` is `source` on an outbound listener
//! (`listener_direction` 2) and `destination` on an inbound one; the local
//! node fills that side's `source_*` / `destination_*` labels, the peer
//! (`upstream_peer` outbound, `downstream_peer` inbound: a serialized
//! `google.protobuf.Struct`) the other side's.
//!
//! Invariants: never panics on any input; a missing property is `unknown`
//! (or Istio's specific default), a peer that does not decode is no peer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use peer_metadata::config::{json_string, proto_duration};

use peer_metadata::host::{property, property_int, Batch};
use peer_metadata::{node_struct, path, Struct, WordHash, Workload};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

const UNKNOWN: &str = "unknown";

/// A path of runtime segments, for the few that are not literals.
fn property_of(segments: &[&str]) -> Option<Vec<u8>> {
    property(segments.join("\0").as_bytes())
}

fn text(v: Vec<u8>) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    // Valid UTF-8 (every value nasp and Envoy give) is taken as is.
    Some(
        String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

fn property_text(path: &[u8]) -> Option<String> {
    property(path).and_then(text)
}

/// What a stream's report reads from the host, read in one [`Batch`] on
/// every HTTP stream (outbound: the peer id is `upstream_peer_id`, the
/// principals the upstream connection's). Both lists hold the same values
/// at the same index (the `AT_*` constants); inbound adds mTLS.
const OUTBOUND_REPORT: [&[u8]; 10] = [
    path!("response", "code"),
    path!("upstream_peer_id"),
    path!("upstream", "uri_san_local_certificate"),
    path!("upstream", "uri_san_peer_certificate"),
    path!("cluster_name"),
    path!("route_name"),
    path!("response", "flags"),
    path!("request", "duration"),
    path!("request", "total_size"),
    path!("response", "total_size"),
];

/// [`OUTBOUND_REPORT`] inbound: the downstream peer and the connection.
const INBOUND_REPORT: [&[u8]; 11] = [
    path!("response", "code"),
    path!("downstream_peer_id"),
    path!("connection", "uri_san_peer_certificate"),
    path!("connection", "uri_san_local_certificate"),
    path!("cluster_name"),
    path!("route_name"),
    path!("response", "flags"),
    path!("request", "duration"),
    path!("request", "total_size"),
    path!("response", "total_size"),
    path!("connection", "mtls"),
];

/// Where each value is in [`OUTBOUND_REPORT`] / [`INBOUND_REPORT`].
const AT_CODE: usize = 0;
const AT_PEER_ID: usize = 1;
const AT_SOURCE_PRINCIPAL: usize = 2;
const AT_DESTINATION_PRINCIPAL: usize = 3;
const AT_CLUSTER: usize = 4;
const AT_ROUTE: usize = 5;
const AT_FLAGS: usize = 6;
const AT_DURATION: usize = 7;
const AT_REQUEST_SIZE: usize = 8;
const AT_RESPONSE_SIZE: usize = 9;
/// Inbound only.
const AT_MTLS: usize = 10;

/// The current length of a data buffer, without copying it
/// (`proxy_get_buffer_status`, which the Rust SDK does not wrap). The size
/// the host passes to the callback is what arrived; this is what is left
/// after the filters before this one (the metadata exchange strips and adds
/// its preamble).
fn buffer_len(kind: BufferType) -> Option<usize> {
    extern "C" {
        fn proxy_get_buffer_status(kind: u32, size: *mut usize, flags: *mut u32) -> u32;
    }
    let mut size = 0usize;
    let mut flags = 0u32;
    // SAFETY: both out-pointers point at live locals of the right types;
    // the host writes a u32 to each (wasm32: usize is 32 bits).
    let status = unsafe { proxy_get_buffer_status(kind as u32, &mut size, &mut flags) };
    (status == 0).then_some(size)
}

/// The labels of one standard metric, in Istio's order.
const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];
/// TCP metrics stop after `connection_security_policy`.
const TCP_LABELS: usize = 23;
/// gRPC message counts carry the peer labels only (Istio's
/// `count_peer_labels`: up to `destination_cluster`).
const PEER_LABELS: usize = 20;

/// The gRPC message counts so far (request, response), from the host's
/// `filter_state.envoy.filters.http.grpc_stats` (`"x,y"`, as Istio's
/// `populateGRPCInfo` reads it); `None` when absent or malformed.
fn grpc_messages() -> Option<(u64, u64)> {
    let v = property(path!("filter_state", "envoy.filters.http.grpc_stats"))?;
    let v = std::str::from_utf8(&v).ok()?;
    let (req, resp) = v.split_once(',')?;
    Some((req.trim().parse().ok()?, resp.trim().parse().ok()?))
}

/// Envoy's response flags by bit (`StreamInfo::ResponseFlag`), as
/// `response_flags` shows them.
const FLAGS: [&str; 26] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM",
];

fn response_flags(bits: u64) -> String {
    if bits == 0 {
        return "-".into();
    }
    let names: Vec<&str> = FLAGS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    names.join(",")
}

/// The service an Istio cluster name names: `outbound|80||echo.demo.svc…`
/// or `inbound|8080||host` → `(host, name, namespace)`; name and namespace
/// are the first two labels of a Kubernetes service host
/// (`<name>.<ns>.svc.<domain>`), else the host itself and nothing.
fn cluster_service(cluster: &str) -> Option<(String, String, String)> {
    let host = cluster.splitn(4, '|').nth(3).filter(|h| !h.is_empty())?;
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() >= 3 && parts[2] == "svc" {
        Some((host.into(), parts[0].into(), parts[1].into()))
    } else {
        Some((host.into(), host.into(), String::new()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Protocol {
    Http,
    Grpc,
    Tcp,
}

/// What a stream knows when it reports.
struct Request {
    protocol: Protocol,
    response_code: Option<i64>,
    grpc_status: Option<i64>,
    /// Whether `request.host` may be asked for (HTTP), read only when the
    /// destination service falls back to it: most streams name their
    /// service by the cluster, and each property read is a host call and
    /// an allocation in the guest.
    has_host: bool,
}

/// Shared by the root and its streams.
struct Shared {
    outbound: bool,
    local: Workload,
    /// The local node's canonical service (inbound destination service
    /// fallback, as Istio's `getServiceNameFallback`).
    local_canonical: String,
    /// Metric ids by encoded name.
    ids: HashMap<String, u32>,
    /// The ids of each report's metrics by its label set's serial, so
    /// that a label set seen before costs one lookup, not an encoded name
    /// per metric (a few hundred bytes built, escaped and hashed each).
    /// Keyed by the report's first metric name; few, so a list.
    series: Vec<(&'static str, HashMap<u64, Vec<Option<u32>>, WordHash>)>,
    /// Label sets by what they are computed from (the peer, principals,
    /// service, code, …), so that a stream like an earlier one reuses its
    /// 25 values instead of building them again.
    label_sets: HashMap<Inputs, Rc<LabelSet>, WordHash>,
    /// The peer of streams without one (all `unknown`).
    no_peer: Rc<Peer>,
    /// Decoded peers by their serialized `Struct` (Istio's peer cache):
    /// the same few peers come back on every stream.
    peers: PeerCache,
    /// `app_version_canonical` of the local node, computed once.
    local_avc: [String; 4],
    /// The host answers `request.total_size` / `response.total_size`: a
    /// stream then skips counting header bytes itself (a copy of each
    /// whole header map into the guest) for the fallback.
    host_sizes: bool,
    /// The host answers `request.duration`: a stream then skips reading
    /// the clock at its request headers for the fallback.
    host_duration: bool,
    /// The service of each cluster name, from the cluster's metadata or
    /// its Istio name (`None`: neither names one), so that a stream does
    /// not ask for metadata its cluster does not have on every request.
    /// Read once per cluster name: a cluster whose metadata an update
    /// changes under the same name keeps its first service until the
    /// cache starts over (bounded like the peers).
    services: HashMap<Vec<u8>, Option<KnownService>, WordHash>,
    /// Principals seen, by their bytes, as serials: a label set's inputs
    /// hold the serial, not a copy of the text (bounded like the peers).
    principals: HashMap<Vec<u8>, u64, WordHash>,
    /// The last principal of each side (source, destination) and its
    /// serial: the same workloads talk on most streams, and comparing
    /// the bytes is cheaper than hashing them.
    last_principals: [(Vec<u8>, u64); 2],
    /// What an HTTP report reads in one batch ([`OUTBOUND_REPORT`] or
    /// [`INBOUND_REPORT`]), and the batch call's arguments naming them.
    report: &'static [&'static [u8]],
    report_args: Vec<u8>,
}

/// Peers seen, decoded once. Bounded: when full it starts over (a mesh
/// has far fewer distinct peers than the bound; a flood of distinct ones
/// costs a decode each, as without a cache).
#[derive(Default)]
struct PeerCache {
    map: HashMap<Vec<u8>, Rc<Peer>, WordHash>,
    /// The same peers by node id (`<side>_peer_id`).
    by_id: HashMap<Vec<u8>, Rc<Peer>, WordHash>,
    /// Peers from endpoint labels, by label.
    by_label: HashMap<String, Rc<Peer>, WordHash>,
}

/// A decoded peer and its derived label values.
struct Peer {
    workload: Workload,
    avc: [String; 4],
    /// Unique for the filter's life: what label sets are keyed by.
    serial: u64,
}

impl Peer {
    fn new(workload: Workload) -> Rc<Self> {
        let avc = workload.app_version_canonical();
        Rc::new(Self {
            workload,
            avc,
            serial: next_serial(),
        })
    }
}

/// A new serial for a peer or a label set (the VM is single-threaded).
fn next_serial() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static NEXT: Cell<u64> = const { Cell::new(1) };
    }
    NEXT.with(|n| {
        let v = n.get();
        n.set(v + 1);
        v
    })
}

/// Everything a stream's label values are computed from besides the local
/// node: equal inputs give equal labels.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Inputs {
    peer: u64,
    /// The principals' serials ([`Shared::principal`]; 0: none).
    source_principal: u64,
    destination_principal: u64,
    security: &'static str,
    service: ServiceKey,
    flags: i64,
    protocol: Protocol,
    code: Option<i64>,
    grpc_status: Option<i64>,
}

/// One label set's values, in [`LABELS`] order, with its serial.
struct LabelSet {
    values: Vec<String>,
    serial: u64,
}

/// A stream's destination service: host, name, namespace.
type Service = (String, String, String);

/// What [`Shared::services`] keeps of a cluster: its whole service when
/// the cluster names its host (shared by every stream to it), else the
/// name and namespace, completed by each request's host.
enum KnownService {
    Full(Rc<Service>),
    NoHost(String, String),
}

/// A [`Service`] in a label set's [`Inputs`]: equal by content, and
/// found equal without comparing the texts when both are the one a
/// cluster's cache entry holds.
#[derive(Clone)]
struct ServiceKey(Rc<Service>);

impl PartialEq for ServiceKey {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for ServiceKey {}

impl std::hash::Hash for ServiceKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

/// Label sets kept before the cache starts over.
const LABEL_SETS_MAX: usize = 4096;

const PEER_CACHE_SIZE: usize = 1024;

/// Inserts into one of the bounded caches, which start over when full.
fn insert_bounded<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V, WordHash>, k: K, v: V) {
    if map.len() >= PEER_CACHE_SIZE {
        map.clear();
    }
    map.insert(k, v);
}

impl PeerCache {
    fn get(&mut self, raw: &[u8]) -> Option<Rc<Peer>> {
        if let Some(p) = self.map.get(raw) {
            return Some(p.clone());
        }
        let peer = Peer::new(Workload::from_struct(&Struct::decode(raw)?));
        insert_bounded(&mut self.map, raw.to_vec(), peer.clone());
        Some(peer)
    }

    /// A peer from Istio's endpoint label (`upstream_host_metadata`),
    /// kept so that its serial is stable.
    fn endpoint(&mut self, label: &str) -> Option<Rc<Peer>> {
        if let Some(p) = self.by_label.get(label) {
            return Some(p.clone());
        }
        let peer = Peer::new(Workload::from_endpoint_label(label)?);
        insert_bounded(&mut self.by_label, label.to_string(), peer.clone());
        Some(peer)
    }

    fn remember_id(&mut self, id: Vec<u8>, peer: Rc<Peer>) {
        insert_bounded(&mut self.by_id, id, peer);
    }
}

impl Shared {
    fn metric(&mut self, kind: MetricType, name: String) -> Option<u32> {
        if let Some(id) = self.ids.get(&name) {
            return Some(*id);
        }
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                self.ids.insert(name, id);
                Some(id)
            }
            Err(e) => {
                log::warn!("istio-stats: cannot define {name}: {e:?}");
                None
            }
        }
    }

    /// The peer of the current stream, as metadata exchange left it (or
    /// Istio's endpoint-metadata fallback outbound).
    fn peer(&mut self, b: &Batch) -> Option<Rc<Peer>> {
        let key = if self.outbound {
            path!("upstream_peer")
        } else {
            path!("downstream_peer")
        };
        // A peer's node id names one proxy instance, whose metadata is
        // fixed for its life (Istio's agent sends what it started with):
        // a peer seen before is found by its id (tens of bytes) without
        // copying its metadata (hundreds) into the guest again.
        let id = b.at(AT_PEER_ID).filter(|v| !v.is_empty());
        if let Some(p) = id.as_ref().and_then(|id| self.peers.by_id.get(&id[..])) {
            return Some(p.clone());
        }
        if let Some(raw) = property(key) {
            match self.peers.get(&raw) {
                Some(p) => {
                    if let Some(id) = id {
                        self.peers.remember_id(id.into_owned(), p.clone());
                    }
                    return Some(p);
                }
                None => log::warn!(
                    "istio-stats: {} is not a protobuf Struct; ignored",
                    String::from_utf8_lossy(key)
                ),
            }
        }
        if self.outbound {
            let label = property_text(path!(
                "upstream_host_metadata",
                "filter_metadata",
                "istio",
                "workload"
            ))?;
            return self.peers.endpoint(&label);
        }
        None
    }

    /// The label values of one stream, in [`LABELS`] order.
    /// `b`: the properties read ahead ([`OUTBOUND_REPORT`] /
    /// [`INBOUND_REPORT`]), or an empty batch.
    fn labels(&mut self, req: &Request, b: &Batch) -> Rc<LabelSet> {
        let peer = self.peer(b).unwrap_or_else(|| self.no_peer.clone());
        let security = if self.outbound {
            ""
        } else {
            match b.at(AT_MTLS).as_deref() {
                Some([1, ..]) => "mutual_tls",
                Some(_) => "none",
                None => "",
            }
        };
        let (source_principal, destination_principal) =
            (b.at(AT_SOURCE_PRINCIPAL), b.at(AT_DESTINATION_PRINCIPAL));
        let principals = [
            source_principal.as_deref(),
            destination_principal.as_deref(),
        ];
        let inputs = Inputs {
            peer: peer.serial,
            source_principal: self.principal(0, principals[0]),
            destination_principal: self.principal(1, principals[1]),
            security,
            service: self.destination_service(req, b),
            flags: b.int_at(AT_FLAGS).unwrap_or(0),
            protocol: req.protocol,
            code: req.response_code,
            grpc_status: req.grpc_status,
        };
        if let Some(set) = self.label_sets.get(&inputs) {
            return set.clone();
        }
        let set = Rc::new(LabelSet {
            values: self.label_values(&peer, &inputs, principals),
            serial: next_serial(),
        });
        if self.label_sets.len() >= LABEL_SETS_MAX {
            // Series are keyed by the sets' serials: both start over.
            self.label_sets.clear();
            for (_, g) in &mut self.series {
                g.clear();
            }
        }
        self.label_sets.insert(inputs, set.clone());
        set
    }

    /// The serial of a principal (0 for none or empty), so that a label
    /// set's inputs are compared without copying the text into them.
    fn principal(&mut self, side: usize, p: Option<&[u8]>) -> u64 {
        let Some(p) = p.filter(|p| !p.is_empty()) else {
            return 0;
        };
        let last = &mut self.last_principals[side];
        if last.0 == p {
            return last.1;
        }
        let id = match self.principals.get(p) {
            Some(&id) => id,
            None => {
                let id = next_serial();
                insert_bounded(&mut self.principals, p.to_vec(), id);
                id
            }
        };
        let last = &mut self.last_principals[side];
        last.0.clear();
        last.0.extend_from_slice(p);
        last.1 = id;
        id
    }

    /// The 25 label values of `inputs`; `principals`: the source's and
    /// the destination's, whose serials `inputs` holds.
    fn label_values(
        &self,
        peer: &Peer,
        inputs: &Inputs,
        principals: [Option<&[u8]>; 2],
    ) -> Vec<String> {
        let ((source, s_avc), (destination, d_avc)) = if self.outbound {
            ((&self.local, &self.local_avc), (&peer.workload, &peer.avc))
        } else {
            ((&peer.workload, &peer.avc), (&self.local, &self.local_avc))
        };
        let [s_app, s_version, s_canonical, s_revision] = s_avc.clone();
        let [d_app, d_version, d_canonical, d_revision] = d_avc.clone();
        let (service, service_name, service_namespace) = (*inputs.service.0).clone();
        let [source_principal, destination_principal] =
            principals.map(|p| p.map(|p| String::from_utf8_lossy(p).into_owned()));
        let service_namespace = match destination.namespace.as_str() {
            "" => service_namespace,
            ns => ns.to_string(),
        };
        let flags = inputs.flags;
        let protocol = match inputs.protocol {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        };
        let mut v: Vec<String> = vec![
            if self.outbound {
                "source"
            } else {
                "destination"
            }
            .into(),
            source.workload.clone(),
            source.namespace.clone(),
            source_principal.unwrap_or_default(),
            s_app,
            s_version,
            s_canonical,
            s_revision,
            source.cluster.clone(),
            destination.workload.clone(),
            destination.namespace.clone(),
            destination_principal.unwrap_or_default(),
            d_app,
            d_version,
            service,
            service_name,
            service_namespace,
            d_canonical,
            d_revision,
            destination.cluster.clone(),
            protocol.into(),
            response_flags(u64::try_from(flags).unwrap_or(0)),
            inputs.security.to_string(),
            inputs.code.unwrap_or(0).to_string(),
        ];
        for x in &mut v {
            if x.is_empty() {
                *x = UNKNOWN.into();
            }
        }
        // Set after the unknown defaults, as Istio does: HTTP has an empty
        // gRPC status, gRPC defaults to 2 (UNKNOWN) when none was seen.
        v.push(match inputs.protocol {
            Protocol::Grpc => inputs.grpc_status.unwrap_or(2).to_string(),
            _ => String::new(),
        });
        v
    }

    /// `destination_service`, `_name`, `_namespace` (the namespace may be
    /// replaced by the destination workload's).
    fn destination_service(&mut self, req: &Request, b: &Batch) -> ServiceKey {
        let from_metadata = |what: &str| {
            property_of(&[
                "cluster_metadata",
                "filter_metadata",
                "istio",
                "services",
                "0",
                what,
            ])
            .and_then(text)
        };
        let cluster = b.at(AT_CLUSTER).unwrap_or_default();
        let route = b.at(AT_ROUTE).unwrap_or_default();
        let host = || {
            let h = if req.has_host {
                property_text(path!("request", "host"))
            } else {
                None
            };
            match (h, self.outbound) {
                (Some(h), _) => h,
                (None, true) => UNKNOWN.into(),
                (None, false) => self.local_canonical.clone(),
            }
        };
        let special = [
            "BlackHoleCluster",
            "PassthroughCluster",
            "InboundPassthroughClusterIpv4",
            "InboundPassthroughClusterIpv6",
        ];
        let fresh = |s: Service| ServiceKey(Rc::new(s));
        if route[..] == *b"block_all" {
            return fresh((host(), "BlackHoleCluster".into(), String::new()));
        }
        if route[..] == *b"allow_any" {
            return fresh((host(), "PassthroughCluster".into(), String::new()));
        }
        if special.iter().any(|s| s.as_bytes() == &cluster[..]) {
            let name = String::from_utf8_lossy(&cluster).into_owned();
            return fresh((host(), name, String::new()));
        }
        let resolve = |known: &Option<KnownService>| match known {
            Some(KnownService::Full(s)) => ServiceKey(s.clone()),
            // The metadata names the service but no host: the request's.
            Some(KnownService::NoHost(name, ns)) => fresh((host(), name.clone(), ns.clone())),
            None => {
                let host = host();
                fresh((host.clone(), host, String::new()))
            }
        };
        if let Some(known) = self.services.get(&cluster[..]) {
            return resolve(known);
        }
        let s = match from_metadata("name") {
            Some(name) => Some((
                from_metadata("host"),
                name,
                from_metadata("namespace").unwrap_or_default(),
            )),
            // nasp has no cluster metadata; Istio's cluster names carry
            // the same service host.
            None => cluster_service(&String::from_utf8_lossy(&cluster))
                .map(|(h, n, ns)| (Some(h), n, ns)),
        };
        let known = s.map(|(h, name, ns)| match h {
            Some(h) => KnownService::Full(Rc::new((h, name, ns))),
            None => KnownService::NoHost(name, ns),
        });
        let key = resolve(&known);
        insert_bounded(&mut self.services, cluster.to_vec(), known);
        key
    }

    /// Records one stream's metrics. `values`: (metric, type, value, labels used).
    fn report(&mut self, set: &LabelSet, values: &[(&'static str, MetricType, u64, usize)]) {
        let labels = &set.values[..];
        let Some(first) = values.first().map(|v| v.0) else {
            return;
        };
        let used = values
            .iter()
            .map(|v| v.3)
            .max()
            .unwrap_or(0)
            .min(labels.len());
        let group = match self.series.iter().position(|(n, _)| *n == first) {
            Some(i) => i,
            None => {
                self.series.push((first, HashMap::default()));
                self.series.len() - 1
            }
        };
        let ids = match self.series[group].1.get(&set.serial) {
            Some(ids) => ids.clone(),
            None => {
                let ids: Vec<Option<u32>> = values
                    .iter()
                    .map(|(name, kind, _, count)| {
                        self.metric(*kind, encoded_name(name, &labels[..(*count).min(used)]))
                    })
                    .collect();
                self.series[group].1.insert(set.serial, ids.clone());
                ids
            }
        };
        for ((name, kind, value, _), id) in values.iter().zip(ids) {
            let Some(id) = id else { continue };
            let r = match kind {
                MetricType::Counter if *value == 0 => Ok(()),
                MetricType::Counter => {
                    hostcalls::increment_metric(id, i64::try_from(*value).unwrap_or(i64::MAX))
                }
                _ => hostcalls::record_metric(id, *value),
            };
            if let Err(e) = r {
                log::warn!("istio-stats: recording {name}: {e:?}");
            }
        }
    }
}

/// A metric's name with its labels in Istio's tag encoding
/// (`reporter=.=source;.;…;.;istio_requests_total`).
fn encoded_name(name: &str, labels: &[String]) -> String {
    let mut encoded = String::with_capacity(512);
    for (k, v) in LABELS.iter().zip(labels) {
        encoded.push_str(k);
        encoded.push_str("=.=");
        // The separators must not appear in a value.
        encoded.push_str(&v.replace(";.;", "_").replace("=.=", "_"));
        encoded.push_str(";.;");
    }
    encoded.push_str(name);
    encoded
}

#[derive(Default)]
struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    tcp: bool,
    open: Rc<RefCell<Open>>,
}

/// The streams reported on every tick, by context id: open TCP
/// connections, and gRPC streams once their response headers passed
/// (Istio's recurrent reports).
#[derive(Default)]
struct Open {
    tcp: HashMap<u32, Rc<RefCell<TcpState>>>,
    grpc: HashMap<u32, Rc<RefCell<GrpcState>>>,
}

/// Istio's default `tcp_reporting_duration`.
const REPORTING_PERIOD: Duration = Duration::from_secs(15);

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        let period = match json_string(&config, "tcp_reporting_duration") {
            None => REPORTING_PERIOD,
            Some(v) => proto_duration(v)
                .filter(|d| !d.is_zero())
                .unwrap_or_else(|| {
                    log::warn!("istio-stats: tcp_reporting_duration {v:?} is not a duration; 15s");
                    REPORTING_PERIOD
                }),
        };
        self.set_tick_period(period);
        let root_id = property_text(path!("plugin_root_id")).unwrap_or_default();
        self.tcp = root_id.contains("tcp");
        let outbound = match property_int(path!("listener_direction")) {
            Some(1) => false,
            Some(2) => true,
            // Istio's root ids say the direction when the listener does not.
            _ => {
                let outbound = !root_id.contains("inbound");
                log::warn!(
                    "istio-stats: listener_direction is not 1 or 2; reporting as {}",
                    if outbound { "source" } else { "destination" }
                );
                outbound
            }
        };
        let report: &'static [&'static [u8]] = if outbound {
            &OUTBOUND_REPORT
        } else {
            &INBOUND_REPORT
        };
        let node = node_struct(|key| property_of(&["node", "metadata", key]));
        let local = Workload::from_struct(&node);
        let local_avc = local.app_version_canonical();
        let local_canonical = match local.label(peer_metadata::CANONICAL_NAME) {
            "" => UNKNOWN.to_string(),
            n => n.to_string(),
        };
        self.shared = Some(Rc::new(RefCell::new(Shared {
            outbound,
            local,
            local_canonical,
            ids: HashMap::new(),
            series: Vec::new(),
            label_sets: HashMap::default(),
            no_peer: Peer::new(Workload::default()),
            peers: PeerCache::default(),
            local_avc,
            host_sizes: false,
            host_duration: false,
            services: HashMap::default(),
            principals: HashMap::default(),
            last_principals: Default::default(),
            report,
            report_args: peer_metadata::batch::encode_paths(report),
        })));
        true
    }

    /// The recurrent reports: every open connection and queued gRPC stream,
    /// each with itself as the effective context (its properties).
    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (tcp, grpc): (Vec<_>, Vec<_>) = {
            let open = self.open.borrow();
            (
                open.tcp.iter().map(|(id, s)| (*id, s.clone())).collect(),
                open.grpc.iter().map(|(id, s)| (*id, s.clone())).collect(),
            )
        };
        for (id, state) in tcp {
            if hostcalls::set_effective_context(id).is_ok() {
                state.borrow_mut().flush(&shared, false);
            }
        }
        for (id, state) in grpc {
            if hostcalls::set_effective_context(id).is_err() {
                continue;
            }
            if let (Ok(mut shared), Ok(mut state)) =
                (shared.try_borrow_mut(), state.try_borrow_mut())
            {
                state.report(&mut shared);
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.tcp {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id,
            shared: self.shared.clone()?,
            open: self.open.clone(),
            start: None,
            grpc: false,
            request_bytes: 0,
            response_bytes: 0,
            status: None,
            grpc_status: None,
            messages: None,
        }))
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        let state = Rc::new(RefCell::new(TcpState {
            labels: None,
            opened: false,
            received: 0,
            sent: 0,
            own_seen: false,
        }));
        self.open.borrow_mut().tcp.insert(id, state.clone());
        Some(Box::new(Tcp {
            id,
            shared: self.shared.clone()?,
            open: self.open.clone(),
            state,
        }))
    }
}

fn header_bytes(h: &[(String, Vec<u8>)]) -> u64 {
    h.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

struct Http {
    id: u32,
    shared: Rc<RefCell<Shared>>,
    open: Rc<RefCell<Open>>,
    start: Option<SystemTime>,
    grpc: bool,
    /// Fallbacks for hosts without `request.total_size` etc.
    request_bytes: u64,
    response_bytes: u64,
    status: Option<i64>,
    grpc_status: Option<i64>,
    /// A gRPC stream's message reports, from its response headers on
    /// (where Istio queues it for recurrent reports).
    messages: Option<Rc<RefCell<GrpcState>>>,
}

/// What a gRPC stream's message reports need: the label values (the peer
/// is known at the response headers) and the counts already recorded
/// (Istio records the growth).
struct GrpcState {
    labels: Rc<LabelSet>,
    reported: (u64, u64),
}

impl GrpcState {
    /// Records the gRPC messages counted since the last report
    /// (`istio_request_messages_total`, `istio_response_messages_total`,
    /// peer labels only), as Istio's recurrent message metrics do.
    fn report(&mut self, shared: &mut Shared) {
        let Some((req, resp)) = grpc_messages() else {
            return;
        };
        let (old_req, old_resp) = self.reported;
        shared.report(
            &self.labels,
            &[
                (
                    "istio_request_messages_total",
                    MetricType::Counter,
                    req.saturating_sub(old_req),
                    PEER_LABELS,
                ),
                (
                    "istio_response_messages_total",
                    MetricType::Counter,
                    resp.saturating_sub(old_resp),
                    PEER_LABELS,
                ),
            ],
        );
        self.reported = (req.max(old_req), resp.max(old_resp));
    }
}

impl Context for Http {}

impl Http {
    fn request(&self, b: &Batch) -> Request {
        Request {
            protocol: if self.grpc {
                Protocol::Grpc
            } else {
                Protocol::Http
            },
            response_code: b.int_at(AT_CODE).or(self.status),
            // Only gRPC has a `grpc_response_status` label value.
            grpc_status: if self.grpc {
                property_int(path!("response", "grpc_status")).or(self.grpc_status)
            } else {
                None
            },
            has_host: true,
        }
    }

    /// On a body chunk of a gRPC stream whose peer is known: the messages
    /// it began.
    fn stream_messages(&mut self) {
        let Some(m) = &self.messages else {
            return;
        };
        if let (Ok(mut shared), Ok(mut m)) = (self.shared.try_borrow_mut(), m.try_borrow_mut()) {
            m.report(&mut shared);
        };
    }
}

fn grpc_status_of(v: Option<String>) -> Option<i64> {
    v?.trim().parse().ok()
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if !self.shared.try_borrow().is_ok_and(|s| s.host_duration) {
            self.start = Some(self.get_current_time());
        }
        self.grpc = self
            .get_http_request_header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"));
        if !self.shared.try_borrow().is_ok_and(|s| s.host_sizes) {
            let h: Vec<(String, Vec<u8>)> = self.get_http_request_headers_bytes();
            self.request_bytes = header_bytes(&h);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, _eos: bool) -> Action {
        // A fallback for hosts without `request.total_size`: counts each
        // chunk as it passes (nothing before this filter buffers bodies).
        self.request_bytes += size as u64;
        self.stream_messages();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // The status on every stream, though the host usually answers
        // `response.code`: a reply whose code the host records only later
        // (a local reply to a caller that went away) still has this one.
        // The gRPC status only for gRPC.
        self.status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse().ok());
        if self.grpc {
            self.grpc_status = grpc_status_of(self.get_http_response_header("grpc-status"));
        }
        if !self.shared.try_borrow().is_ok_and(|s| s.host_sizes) {
            let h: Vec<(String, Vec<u8>)> = self.get_http_response_headers_bytes();
            self.response_bytes = header_bytes(&h);
        }
        if self.grpc && self.messages.is_none() {
            if let Ok(mut shared) = self.shared.try_borrow_mut() {
                let b = Batch::lazy(shared.report);
                let req = self.request(&b);
                let mut state = GrpcState {
                    labels: shared.labels(&req, &b),
                    reported: (0, 0),
                };
                state.report(&mut shared);
                let state = Rc::new(RefCell::new(state));
                self.open.borrow_mut().grpc.insert(self.id, state.clone());
                self.messages = Some(state);
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
        self.response_bytes += size as u64;
        self.stream_messages();
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        if let Some(g) = grpc_status_of(self.get_http_response_trailer("grpc-status")) {
            self.grpc_status = Some(g);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let queued = self.open.borrow_mut().grpc.remove(&self.id);
        let rc = self.shared.clone();
        let Ok(mut shared) = rc.try_borrow_mut() else {
            return;
        };
        let b = Batch::fetch(shared.report, &shared.report_args);
        let req = self.request(&b);
        let labels = shared.labels(&req, &b);
        let duration = b.int_at(AT_DURATION);
        shared.host_duration = duration.is_some();
        let duration_ms = match duration {
            Some(ns) => u64::try_from(ns).unwrap_or(0) / 1_000_000,
            None => self
                .start
                .and_then(|s| self.get_current_time().duration_since(s).ok())
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
        };
        let request_size = b.int_at(AT_REQUEST_SIZE);
        let response_size = b.int_at(AT_RESPONSE_SIZE);
        shared.host_sizes = request_size.is_some() && response_size.is_some();
        let size =
            |v: Option<i64>, fallback: u64| v.map_or(fallback, |v| u64::try_from(v).unwrap_or(0));
        let request_bytes = size(request_size, self.request_bytes);
        let response_bytes = size(response_size, self.response_bytes);
        let all = LABELS.len();
        shared.report(
            &labels,
            &[
                ("istio_requests_total", MetricType::Counter, 1, all),
                (
                    "istio_request_duration_milliseconds",
                    MetricType::Histogram,
                    duration_ms,
                    all,
                ),
                (
                    "istio_request_bytes",
                    MetricType::Histogram,
                    request_bytes,
                    all,
                ),
                (
                    "istio_response_bytes",
                    MetricType::Histogram,
                    response_bytes,
                    all,
                ),
            ],
        );
        // What the stream's last chunks began, and all of it when the
        // response headers never came.
        if self.grpc {
            let state = queued.unwrap_or_else(|| {
                Rc::new(RefCell::new(GrpcState {
                    labels: labels.clone(),
                    reported: (0, 0),
                }))
            });
            if let Ok(mut state) = state.try_borrow_mut() {
                state.report(&mut shared);
            };
        }
    }
}

struct Tcp {
    id: u32,
    shared: Rc<RefCell<Shared>>,
    open: Rc<RefCell<Open>>,
    state: Rc<RefCell<TcpState>>,
}

/// An open connection's reports, shared with the root for the ticks.
struct TcpState {
    /// Fixed once the peer had its chance to be known (its first data
    /// passed the metadata exchange), at the first tick, or at the close.
    labels: Option<Rc<LabelSet>>,
    opened: bool,
    received: u64,
    sent: u64,
    /// Our side's first data was seen (it carries our preamble, if any).
    own_seen: bool,
}

impl TcpState {
    fn flush(&mut self, shared: &RefCell<Shared>, closed: bool) {
        let Ok(mut shared) = shared.try_borrow_mut() else {
            return;
        };
        let labels = match &self.labels {
            Some(l) => l.clone(),
            None => {
                let req = Request {
                    protocol: Protocol::Tcp,
                    response_code: None,
                    grpc_status: None,
                    has_host: false,
                };
                let b = Batch::lazy(shared.report);
                let l = shared.labels(&req, &b);
                self.labels = Some(l.clone());
                l
            }
        };
        let opened = u64::from(!self.opened);
        self.opened = true;
        let (received, sent) = (
            std::mem::take(&mut self.received),
            std::mem::take(&mut self.sent),
        );
        shared.report(
            &labels,
            &[
                (
                    "istio_tcp_connections_opened_total",
                    MetricType::Counter,
                    opened,
                    TCP_LABELS,
                ),
                (
                    "istio_tcp_received_bytes_total",
                    MetricType::Counter,
                    received,
                    TCP_LABELS,
                ),
                (
                    "istio_tcp_sent_bytes_total",
                    MetricType::Counter,
                    sent,
                    TCP_LABELS,
                ),
                (
                    "istio_tcp_connections_closed_total",
                    MetricType::Counter,
                    u64::from(closed),
                    TCP_LABELS,
                ),
            ],
        );
    }

    /// Bytes of this callback's data after the filters before this one,
    /// less our own preamble.
    fn count(&mut self, kind: BufferType, size: usize, own: bool) -> u64 {
        let mut n = buffer_len(kind).unwrap_or(size) as u64;
        if own && !self.own_seen {
            self.own_seen = true;
            let preamble = property_int(path!("nasp_mx_preamble_bytes")).unwrap_or(0);
            n = n.saturating_sub(u64::try_from(preamble).unwrap_or(0));
        }
        n
    }
}

impl Tcp {
    fn outbound(&self) -> bool {
        self.shared.try_borrow().map(|s| s.outbound).unwrap_or(true)
    }
}

impl Context for Tcp {}

impl StreamContext for Tcp {
    fn on_downstream_data(&mut self, size: usize, _eos: bool) -> Action {
        let outbound = self.outbound();
        let Ok(mut st) = self.state.try_borrow_mut() else {
            return Action::Continue;
        };
        st.received += st.count(BufferType::DownstreamData, size, outbound);
        // Inbound the peer is downstream: its first data has passed the
        // exchange, so the peer is as known as it will be.
        if st.labels.is_some() || !outbound {
            st.flush(&self.shared, false);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _eos: bool) -> Action {
        let outbound = self.outbound();
        let Ok(mut st) = self.state.try_borrow_mut() else {
            return Action::Continue;
        };
        st.sent += st.count(BufferType::UpstreamData, size, !outbound);
        if st.labels.is_some() || outbound {
            st.flush(&self.shared, false);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.open.borrow_mut().tcp.remove(&self.id);
        if let Ok(mut st) = self.state.try_borrow_mut() {
            st.flush(&self.shared, true);
        }
    }
}
