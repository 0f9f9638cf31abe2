//! A small mesh file (services, ports, endpoints, mTLS mode, subsets and
//! HTTP routes) turned into Istio-shaped xDS resources, with istiod's naming
//! conventions:
//!
//! - cluster `outbound|<port>||<name>.<ns>.svc.<domain>` (EDS, service name
//!   the same), auto-mTLS as Istio does it: a TLS socket for endpoints
//!   labelled `tlsMode: istio` (SNI `outbound_.<port>_._.<fqdn>`, ALPN
//!   `istio-peer-exchange`, `istio`, the service account's SPIFFE id as the
//!   expected SAN) and plaintext for the rest (PERMISSIVE); TLS only
//!   (STRICT); plaintext only (DISABLE);
//! - a DestinationRule-style subset (`subsets`): one more cluster per port,
//!   `outbound|<port>|<subset>|<fqdn>` (SNI `outbound_.<port>_.<subset>_.<fqdn>`),
//!   whose EDS holds only the endpoints carrying the subset's labels;
//! - `grpc` and `http2` ports: the cluster speaks HTTP/2 to its endpoints
//!   (`HttpProtocolOptions` with an explicit `http2_protocol_options`, as
//!   istiod writes it); `http` ports get no protocol options (HTTP/1.1,
//!   Envoy's default), again as istiod does;
//! - endpoints: their own port when they name one, `tlsMode` for the socket
//!   match, Istio's `istio.workload` metadata
//!   (`<workload>;<ns>;<canonical name>;<canonical revision>;<cluster>`) and
//!   their labels under `envoy.lb` (Envoy's namespace for endpoint labels);
//! - TCP ports: a listener `<vip>_<port>` with a TCP proxy to the cluster;
//! - HTTP ports (`http`, `http2`, `grpc`): a listener `0.0.0.0_<port>` with
//!   RDS route config `<port>`, whose virtual host `<fqdn>:<port>` lists
//!   Istio's domains (`name`, `name.ns`, `name.ns.svc`, the FQDN and the VIP,
//!   each also with `:<port>`) and either the one `/` route (`default`) to
//!   the service's cluster, or the service's VirtualService-style `routes`
//!   in order (match on prefix / exact path / regex / exact headers; one
//!   destination or weighted ones), each with Istio's default retries and
//!   timeout;
//! - the workload's own ports: filter chains on `virtualInbound`
//!   (0.0.0.0:15006): Istio mTLS (matched by its ALPN, requiring a client
//!   certificate) and, in PERMISSIVE mode, the application's own TLS passed
//!   through and plaintext too;
//! - what a real Envoy demands of them: upstream contexts with SAN matchers
//!   carry the roots (SDS `ROOTCA`) and the workload certificate (SDS
//!   `default`), downstream contexts a certificate and the roots, listeners
//!   that match on transport or ALPN the TLS and HTTP inspectors, every
//!   route Istio's retry host predicate;
//! - an NDS name table: each FQDN → its VIP.
//!
//! The resources are written as Envoy JSON and read back through the same
//! reader as real config dumps, so both sources go through one path; every
//! route configuration is then converted as a client would convert it, so a
//! mesh file a client would NACK is an error here instead. A bad file is
//! always an error naming the service and what is wrong, never a panic.
//!
//! A running control plane takes a changed mesh with
//! [`SnapshotCache::set_mesh`] or [`ControlPlane::set_mesh`]; connected
//! clients receive it as an ordinary xDS push.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use nasp_proto::istio_nds::NameTable;
use nasp_proto::istio_nds::name_table::NameInfo;
use nasp_xds::{ResourceSet, XdsError, read_config_dump};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ControlPlane, SnapshotCache};

mod policy;

pub use policy::{
    ConnectionPool, ConsistentHash, Fault, FaultAbort, FaultDelay, GrpcStatus, HeaderOperations,
    Headers, HttpCookie, HttpPool, LoadBalancer, Maglev, OutlierDetection, Retries, RingHash,
    TcpPool, TrafficPolicy,
};

/// mTLS mode of a service or port.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// mTLS to Istio endpoints, plaintext to the rest; inbound accepts both.
    #[default]
    Permissive,
    /// mTLS only.
    Strict,
    /// Plaintext only.
    Disable,
}

/// Application protocol of a port (Istio's port-name prefixes).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP: routed by host, HTTP/1.1 to the endpoints.
    #[default]
    Http,
    /// HTTP/2: routed by host, HTTP/2 to the endpoints.
    Http2,
    /// gRPC: routed by host like HTTP, HTTP/2 to the endpoints.
    Grpc,
    /// Opaque TCP: routed by VIP and port.
    Tcp,
}

impl PortProtocol {
    /// Whether the port is routed per request (RDS).
    pub fn is_http(self) -> bool {
        !matches!(self, PortProtocol::Tcp)
    }

    /// Whether the cluster speaks HTTP/2 to its endpoints.
    pub fn is_http2(self) -> bool {
        matches!(self, PortProtocol::Http2 | PortProtocol::Grpc)
    }
}

/// A service port.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The service port.
    pub port: u16,
    /// `http`, `http2`, `grpc` or `tcp`.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// The endpoints' port (defaults to `port`).
    pub target_port: Option<u16>,
}

/// An endpoint of a service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshEndpoint {
    /// The endpoint's IP.
    pub ip: String,
    /// Its port, overriding the service port's `target_port`; only for a
    /// service with one port (use `ports` otherwise). Lets several replicas
    /// share one IP.
    #[serde(default)]
    pub port: Option<u16>,
    /// Its port per service port (`{80: 8081, 9090: 9091}`), overriding
    /// `target_port` for the ports named.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Load-balancing weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Whether it runs an Istio-compatible mTLS peer (default true).
    #[serde(default = "yes")]
    pub istio: bool,
    /// Its workload's labels (`version: v1`): subsets select on them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl MeshEndpoint {
    /// An Istio endpoint at `ip` with weight 1 and no labels.
    pub fn new(ip: impl Into<String>) -> Self {
        Self {
            ip: ip.into(),
            port: None,
            ports: BTreeMap::new(),
            weight: 1,
            locality: String::new(),
            istio: true,
            labels: BTreeMap::new(),
        }
    }

    /// The port it serves `service_port` on.
    fn port_for(&self, service_port: &ServicePort) -> u16 {
        self.ports
            .get(&service_port.port)
            .copied()
            .or(self.port)
            .or(service_port.target_port)
            .unwrap_or(service_port.port)
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// A named group of a service's endpoints (a DestinationRule subset).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    /// Its name, in cluster names and SNI (`v1`).
    pub name: String,
    /// The labels an endpoint must carry (all of them) to belong to it.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The subset's own DestinationRule policy; each field it sets
    /// replaces the service's (Istio's merge).
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Subset {
    fn selects(&self, e: &MeshEndpoint) -> bool {
        self.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))
    }
}

/// What a route matches (a VirtualService `HTTPMatchRequest`): at most one
/// of `prefix`, `path` and `regex` (none: every path), and every header in
/// `headers` with exactly that value.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchSpec {
    /// Path prefix.
    pub prefix: Option<String>,
    /// Exact path.
    pub path: Option<String>,
    /// Regex the whole path must match (RE2 syntax).
    pub regex: Option<String>,
    /// Header name → exact value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Where a route sends requests (a VirtualService `HTTPRouteDestination`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDestination {
    /// The subset; none: the whole service.
    pub subset: Option<String>,
    /// Relative weight; needed when a route has several destinations.
    pub weight: Option<u32>,
}

impl RouteDestination {
    /// A destination of `subset` with `weight`.
    pub fn subset(subset: impl Into<String>, weight: u32) -> Self {
        Self {
            subset: Some(subset.into()),
            weight: Some(weight),
        }
    }
}

/// An HTTP route of a service (a VirtualService `HTTPRoute`). Routes are
/// tried in order; the first that matches takes the request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshRoute {
    /// The Envoy route's name (istiod uses the HTTPRoute's `name`; unnamed
    /// routes stay unnamed).
    pub name: Option<String>,
    /// What it matches (default: every request).
    #[serde(rename = "match", default)]
    pub matches: Option<RouteMatchSpec>,
    /// One destination, or several split by weight.
    pub route: Vec<RouteDestination>,
    /// Whole-request timeout (`500ms`, `2s`, `1m`); default Istio's: none.
    pub timeout: Option<String>,
    /// Retries (default Istio's: 2 on connect failure, refused stream,
    /// gRPC unavailable / cancelled and 503); `attempts: 0` turns them off.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Fault injection: a delay and / or an abort for a share of requests.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Request and response header changes.
    #[serde(default)]
    pub headers: Option<Headers>,
    /// A copy of each request (of `mirror_percentage` of them) to this
    /// destination of the service, its answer dropped (Istio's `mirror`).
    #[serde(default)]
    pub mirror: Option<RouteDestination>,
    /// The share mirrored, in percent (default 100, Istio's
    /// `mirrorPercentage`).
    pub mirror_percentage: Option<f64>,
}

/// A service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshService {
    /// Short name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Cluster IP.
    pub vip: Option<String>,
    /// Service account of its workloads (default `default`).
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// mTLS mode for callers.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<MeshEndpoint>,
    /// Other DNS names of the service, published in the NDS name table
    /// (needs a `vip`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Subsets of its endpoints, by label.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// HTTP routes on every HTTP port, in order; none: one `/` route to the
    /// whole service.
    #[serde(default)]
    pub routes: Vec<MeshRoute>,
    /// The DestinationRule `trafficPolicy` of the service (every port and
    /// subset, unless a subset sets its own).
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

impl MeshService {
    /// The service's FQDN in `domain`.
    pub fn fqdn(&self, domain: &str) -> String {
        format!("{}.{}.svc.{domain}", self.name, self.namespace)
    }
}

fn default_sa() -> String {
    "default".into()
}

/// A port of the workload itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The port.
    pub port: u16,
    /// Its mTLS mode.
    #[serde(default)]
    pub mtls: MtlsMode,
}

/// The mesh file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    /// SPIFFE trust domain (default `cluster.local`).
    #[serde(default = "default_td")]
    pub trust_domain: String,
    /// DNS domain of services (default `cluster.local`).
    #[serde(default = "default_td")]
    pub domain: String,
    /// Services.
    #[serde(default)]
    pub services: Vec<MeshService>,
    /// The workload's own ports.
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
}

impl Default for MeshFile {
    fn default() -> Self {
        Self {
            trust_domain: default_td(),
            domain: default_td(),
            services: Vec::new(),
            inbound: Vec::new(),
        }
    }
}

fn default_td() -> String {
    "cluster.local".into()
}

impl MeshFile {
    /// Parses YAML or JSON (JSON is YAML).
    pub fn parse(text: &str) -> Result<Self, XdsError> {
        serde_saphyr::from_str(text).map_err(|e| XdsError::Dump(format!("mesh file: {e}")))
    }

    /// The service `name` in `namespace`, to change it before the next
    /// [`ControlPlane::set_mesh`].
    pub fn service_mut(&mut self, name: &str, namespace: &str) -> Option<&mut MeshService> {
        self.services
            .iter_mut()
            .find(|s| s.name == name && s.namespace == namespace)
    }

    /// Generates the resources and the name table (see [`generate`]).
    pub fn generate(&self) -> Result<(ResourceSet, NameTable), XdsError> {
        generate(self)
    }
}

impl SnapshotCache {
    /// A cache serving the resources and the name table of `mesh`.
    pub fn from_mesh(mesh: &MeshFile) -> Result<Self, XdsError> {
        let cache = Self::default();
        cache.set_mesh(mesh)?;
        Ok(cache)
    }

    /// Serves `mesh` from now on: its resources and name table replace
    /// everything and are pushed to every connected client (make before
    /// break, as [`SnapshotCache::set`]). A mesh that does not generate is
    /// an error and changes nothing: the last good snapshot stays.
    pub fn set_mesh(&self, mesh: &MeshFile) -> Result<(), XdsError> {
        let (set, names) = generate(mesh)?;
        self.set_with_names(&set, &names);
        Ok(())
    }
}

impl ControlPlane {
    /// Serves `mesh` from now on and pushes it to every connected client
    /// (see [`SnapshotCache::set_mesh`]): how a demo shifts traffic or
    /// removes a replica while clients run. An error when the mesh does not
    /// generate (the last good snapshot stays) or the control plane was
    /// started without xDS.
    pub fn set_mesh(&self, mesh: &MeshFile) -> Result<(), XdsError> {
        match self.snapshots() {
            Some(cache) => cache.set_mesh(mesh),
            None => Err(XdsError::Dump(
                "mesh file: this control plane was started without xDS (ControlPlaneConfig::xds)"
                    .into(),
            )),
        }
    }
}

fn bad(fqdn: &str, what: impl std::fmt::Display) -> XdsError {
    XdsError::Dump(format!("mesh file: service {fqdn}: {what}"))
}

/// Istio's names are joined with `|`, `_.` and `;`; a subset name must not
/// break them, and Kubernetes restricts it to a DNS label anyway.
fn valid_subset_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Checks what serde cannot: references between parts of a service.
fn validate(svc: &MeshService, fqdn: &str) -> Result<(), XdsError> {
    for e in &svc.endpoints {
        if svc.ports.len() > 1 && e.port.is_some() {
            return Err(bad(
                fqdn,
                format!(
                    "endpoint {}: `port` is ambiguous with {} service ports; use `ports: {{<service port>: <port>}}`",
                    e.ip,
                    svc.ports.len()
                ),
            ));
        }
        if let Some(p) = e
            .ports
            .keys()
            .find(|p| !svc.ports.iter().any(|s| s.port == **p))
        {
            return Err(bad(
                fqdn,
                format!(
                    "endpoint {}: `ports` names {p}, not a port of the service",
                    e.ip
                ),
            ));
        }
        if e.port == Some(0) || e.ports.values().any(|p| *p == 0) {
            return Err(bad(fqdn, format!("endpoint {}: port 0", e.ip)));
        }
        e.ip.parse::<std::net::IpAddr>()
            .map_err(|err| bad(fqdn, format!("endpoint ip {:?}: {err}", e.ip)))?;
    }
    for (i, s) in svc.subsets.iter().enumerate() {
        if !valid_subset_name(&s.name) {
            return Err(bad(
                fqdn,
                format!(
                    "subset name {:?}: letters, digits, `-` and `.` only",
                    s.name
                ),
            ));
        }
        if svc.subsets[..i].iter().any(|o| o.name == s.name) {
            return Err(bad(fqdn, format!("subset {:?} is declared twice", s.name)));
        }
        if let Some(p) = &s.traffic_policy {
            p.validate()
                .map_err(|e| bad(fqdn, format!("subset {:?} traffic_policy: {e}", s.name)))?;
        }
    }
    if let Some(p) = &svc.traffic_policy {
        p.validate()
            .map_err(|e| bad(fqdn, format!("traffic_policy: {e}")))?;
    }
    if !svc.routes.is_empty() && !svc.ports.iter().any(|p| p.protocol.is_http()) {
        return Err(bad(fqdn, "`routes` need an http, http2 or grpc port"));
    }
    for (i, r) in svc.routes.iter().enumerate() {
        let which = match &r.name {
            Some(n) => format!("route {n:?}"),
            None => format!("route #{}", i + 1),
        };
        if r.route.is_empty() {
            return Err(bad(fqdn, format!("{which}: `route` names no destination")));
        }
        for d in &r.route {
            if let Some(s) = &d.subset
                && !svc.subsets.iter().any(|x| &x.name == s)
            {
                return Err(bad(
                    fqdn,
                    format!("{which}: unknown subset {s:?} (declare it under `subsets`)"),
                ));
            }
        }
        if let Some(m) = &r.mirror {
            if m.weight.is_some() {
                return Err(bad(fqdn, format!("{which}: a `mirror` has no weight")));
            }
            if let Some(s) = &m.subset
                && !svc.subsets.iter().any(|x| &x.name == s)
            {
                return Err(bad(
                    fqdn,
                    format!("{which}: mirror: unknown subset {s:?} (declare it under `subsets`)"),
                ));
            }
        }
        match r.mirror_percentage {
            Some(p) if r.mirror.is_none() => {
                return Err(bad(
                    fqdn,
                    format!("{which}: mirror_percentage {p} without a `mirror`"),
                ));
            }
            Some(p) if !(0.0..=100.0).contains(&p) => {
                return Err(bad(
                    fqdn,
                    format!("{which}: mirror_percentage {p}: 0 to 100"),
                ));
            }
            _ => {}
        }
        if r.route.len() > 1 && r.route.iter().any(|d| d.weight.is_none()) {
            return Err(bad(
                fqdn,
                format!("{which}: with several destinations each needs a `weight`"),
            ));
        }
        if r.route
            .iter()
            .map(|d| u64::from(d.weight.unwrap_or(100)))
            .sum::<u64>()
            == 0
        {
            return Err(bad(fqdn, format!("{which}: the weights sum to 0")));
        }
        if let Some(m) = &r.matches {
            let paths = [&m.prefix, &m.path, &m.regex]
                .iter()
                .filter(|p| p.is_some())
                .count();
            if paths > 1 {
                return Err(bad(
                    fqdn,
                    format!("{which}: at most one of `prefix`, `path` and `regex`"),
                ));
            }
            if let Some(h) = m
                .headers
                .keys()
                .find(|h| h.is_empty() || h.contains(char::is_whitespace))
            {
                return Err(bad(fqdn, format!("{which}: bad header name {h:?}")));
            }
        }
        if let Some(t) = &r.timeout {
            parse_duration(t).map_err(|e| bad(fqdn, format!("{which}: timeout {t:?}: {e}")))?;
        }
        if let Some(x) = &r.retries {
            x.validate()
                .map_err(|e| bad(fqdn, format!("{which}: {e}")))?;
        }
        if let Some(x) = &r.fault {
            x.validate()
                .map_err(|e| bad(fqdn, format!("{which}: {e}")))?;
        }
        if let Some(x) = &r.headers {
            x.validate()
                .map_err(|e| bad(fqdn, format!("{which}: {e}")))?;
        }
    }
    Ok(())
}

/// `500ms`, `2s`, `1.5s`, `1m` (VirtualService durations).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return Err("needs a unit: ms, s, m or h".into());
    };
    let v: f64 = num.trim().parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err("must be a non-negative number".into());
    }
    Duration::try_from_secs_f64(v * unit).map_err(|e| e.to_string())
}

/// Envoy's JSON form of a duration.
fn envoy_duration(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

const TLS_UP: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const TLS_DOWN: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// An SDS secret from the ADS stream, named as Istio's agent names them
/// (`default`: the workload certificate, `ROOTCA`: the mesh roots).
fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}})
}

/// Istio mTLS toward a sidecar. Envoy rejects SAN matchers without a trusted
/// CA, so the roots come with them (SDS `ROOTCA`), and the client presents
/// the workload certificate (SDS `default`).
fn upstream_tls(sni: &str, san: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_UP,
            "common_tls_context": {
                "alpn_protocols": ["istio-peer-exchange", "istio"],
                "tls_certificate_sds_secret_configs": [sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {"match_subject_alt_names": [{"exact": san}]},
                    "validation_context_sds_secret_config": sds("ROOTCA")
                }
            },
            "sni": sni
        }
    })
}

/// Istio mTLS accepted on an inbound chain: a certificate to present
/// (Envoy rejects a downstream context without one) and the roots that
/// client certificates are verified against.
fn downstream_tls() -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS_DOWN,
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [sds("default")],
            "combined_validation_context": {
                "default_validation_context": {},
                "validation_context_sds_secret_config": sds("ROOTCA")
            }
        },
        "require_client_certificate": true
    }})
}

/// The listener filters that make `transport_protocol` and
/// `application_protocols` matchable (Envoy only knows them from these).
fn inspectors() -> Value {
    json!([
        {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
        {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
    ])
}

/// `outbound|<port>|<subset>|<fqdn>`.
fn cluster_name(port: u16, subset: Option<&str>, fqdn: &str) -> String {
    format!("outbound|{port}|{}|{fqdn}", subset.unwrap_or(""))
}

fn cluster(
    svc: &MeshService,
    port: &ServicePort,
    subset: Option<&Subset>,
    fqdn: &str,
    trust_domain: &str,
) -> Value {
    let subset_name = subset.map(|s| s.name.as_str());
    let name = cluster_name(port.port, subset_name, fqdn);
    let sni = format!(
        "outbound_.{}_.{}_.{fqdn}",
        port.port,
        subset_name.unwrap_or("")
    );
    let san = format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        svc.namespace, svc.service_account
    );
    let mut istio = json!({
        "services": [{"host": fqdn, "name": svc.name, "namespace": svc.namespace}],
        "default_original_port": port.port
    });
    if let Some(s) = subset_name {
        istio["subset"] = json!(s);
    }
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": name},
        "connect_timeout": "10s",
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u32, "max_pending_requests": 4294967295u32, "max_requests": 4294967295u32, "max_retries": 4294967295u32}]},
        "metadata": {"filter_metadata": {"istio": istio}}
    });
    TrafficPolicy::merged(
        svc.traffic_policy.as_ref(),
        subset.and_then(|s| s.traffic_policy.as_ref()),
    )
    .apply(&mut c);
    if port.protocol.is_http2() {
        // What istiod writes for gRPC and HTTP/2 ports (see the dumps'
        // `outbound|9000||echo.default…`).
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1073741824u32}}
            }
        });
    }
    match svc.mtls {
        MtlsMode::Permissive => {
            c["transport_socket_matches"] = json!([
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": upstream_tls(&sni, &san)},
                {"name": "tlsMode-disabled", "match": {}, "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}}
            ]);
        }
        MtlsMode::Strict => c["transport_socket"] = upstream_tls(&sni, &san),
        MtlsMode::Disable => {}
    }
    c
}

/// Istio's `istio.workload` endpoint metadata:
/// `<workload>;<namespace>;<canonical name>;<canonical revision>;<cluster>`,
/// the canonical name and revision from the labels as istiod reads them
/// (`service.istio.io/canonical-*`, else `app` / `version`, else the
/// service name / `latest`). The workload is named like a Deployment of the
/// version (`backend-v1`), and the cluster is istiod's default `Kubernetes`.
fn workload(svc: &MeshService, e: &MeshEndpoint) -> String {
    let label = |k: &str| e.labels.get(k).map(String::as_str);
    let name = label("service.istio.io/canonical-name")
        .or(label("app"))
        .unwrap_or(&svc.name);
    let version = label("version");
    let revision = label("service.istio.io/canonical-revision")
        .or(version)
        .unwrap_or("latest");
    let workload = match version {
        Some(v) => format!("{}-{v}", svc.name),
        None => svc.name.clone(),
    };
    format!("{workload};{};{name};{revision};Kubernetes", svc.namespace)
}

fn endpoints(svc: &MeshService, port: &ServicePort, subset: Option<&Subset>, fqdn: &str) -> Value {
    let mut by_locality: Vec<(String, Vec<Value>)> = Vec::new();
    for e in svc
        .endpoints
        .iter()
        .filter(|e| subset.is_none_or(|s| s.selects(e)))
    {
        let mut filter_metadata = json!({"istio": {"workload": workload(svc, e)}});
        if e.istio {
            filter_metadata["envoy.transport_socket_match"] = json!({"tlsMode": "istio"});
        }
        if !e.labels.is_empty() {
            filter_metadata["envoy.lb"] = json!(e.labels);
        }
        let lb = json!({
            "endpoint": {"address": {"socket_address": {"address": e.ip, "port_value": e.port_for(port)}}},
            "health_status": "HEALTHY",
            "metadata": {"filter_metadata": filter_metadata},
            "load_balancing_weight": e.weight
        });
        match by_locality.iter_mut().find(|(l, _)| *l == e.locality) {
            Some((_, v)) => v.push(lb),
            None => by_locality.push((e.locality.clone(), vec![lb])),
        }
    }
    let groups: Vec<Value> = by_locality
        .into_iter()
        .map(|(locality, lbs)| {
            let mut parts = locality.splitn(3, '/');
            // istiod weighs a locality by the sum of its endpoints' weights,
            // which keeps locality-weighted balancing proportional to them.
            let weight: u64 = lbs
                .iter()
                .filter_map(|e| e["load_balancing_weight"].as_u64())
                .sum();
            json!({
                "locality": {"region": parts.next().unwrap_or_default(), "zone": parts.next().unwrap_or_default(), "sub_zone": parts.next().unwrap_or_default()},
                "lb_endpoints": lbs,
                "load_balancing_weight": weight.clamp(1, u64::from(u32::MAX))
            })
        })
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": cluster_name(port.port, subset.map(|s| s.name.as_str()), fqdn),
        "endpoints": groups,
        "policy": {"overprovisioning_factor": 140}
    })
}

/// A route action as istiod writes it: the timeout (none by default), the
/// retry policy (Istio's default unless the route sets one; none for
/// `attempts: 0`) and the destinations' consistent-hash keys.
fn route_action(
    target: Value,
    timeout: Option<Duration>,
    retries: Option<&Retries>,
    hash_policy: Vec<Value>,
) -> Value {
    let mut action = json!({
        "timeout": timeout.map_or_else(|| "0s".to_string(), envoy_duration),
        "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}
    });
    if let Some(r) = policy::retry_policy(retries) {
        action["retry_policy"] = r;
    }
    if !hash_policy.is_empty() {
        action["hash_policy"] = json!(hash_policy);
    }
    if let (Some(a), Some(t)) = (action.as_object_mut(), target.as_object()) {
        a.extend(t.clone());
    }
    action
}

/// The hash policies of a route's destinations (each subset's merged
/// policy, or the service's), in order, each once: the consistent-hash key
/// istiod writes on the route for the cluster it balances.
fn hash_policies<'a>(
    svc: &MeshService,
    subsets: impl Iterator<Item = Option<&'a str>>,
) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for name in subsets {
        let subset = name.and_then(|n| svc.subsets.iter().find(|s| s.name == n));
        let policy = TrafficPolicy::merged(
            svc.traffic_policy.as_ref(),
            subset.and_then(|s| s.traffic_policy.as_ref()),
        );
        if let Some(h) = policy.hash_policy()
            && !out.contains(&h)
        {
            out.push(h);
        }
    }
    out
}

/// The routes of one HTTP port of a service (already validated).
fn http_routes(svc: &MeshService, port: u16, fqdn: &str) -> Vec<Value> {
    if svc.routes.is_empty() {
        return vec![json!({
            "match": {"prefix": "/"},
            "name": "default",
            "route": route_action(
                json!({"cluster": cluster_name(port, None, fqdn)}),
                None,
                None,
                hash_policies(svc, std::iter::once(None)),
            ),
            "decorator": {"operation": format!("{fqdn}:{port}/*")}
        })];
    }
    svc.routes
        .iter()
        .map(|r| {
            let m = r.matches.clone().unwrap_or_default();
            let mut matcher = match (&m.prefix, &m.path, &m.regex) {
                (_, Some(p), _) => json!({"path": p}),
                (_, _, Some(re)) => json!({"safe_regex": {"regex": re}}),
                (Some(p), _, _) => json!({"prefix": p}),
                (None, None, None) => json!({"prefix": "/"}),
            };
            if !m.headers.is_empty() {
                matcher["headers"] = m
                    .headers
                    .iter()
                    .map(|(n, v)| json!({"name": n.to_ascii_lowercase(), "string_match": {"exact": v}}))
                    .collect();
            }
            // Like istiod: a 0-weight destination is dropped when others
            // remain, and one destination left is a plain cluster.
            let single = r.route.len() == 1;
            let legs: Vec<(String, u32)> = r
                .route
                .iter()
                .map(|d| {
                    let w = if single { 100 } else { d.weight.unwrap_or(0) };
                    (cluster_name(port, d.subset.as_deref(), fqdn), w)
                })
                .filter(|(_, w)| single || *w > 0)
                .collect();
            let target = match legs.as_slice() {
                [(name, _)] => json!({"cluster": name}),
                legs => json!({"weighted_clusters": {"clusters": legs
                    .iter()
                    .map(|(name, weight)| json!({"name": name, "weight": weight}))
                    .collect::<Vec<_>>()}}),
            };
            let timeout = r.timeout.as_deref().and_then(|t| parse_duration(t).ok());
            let hash = hash_policies(svc, r.route.iter().map(|d| d.subset.as_deref()));
            let mut route = json!({
                "match": matcher,
                "route": route_action(target, timeout, r.retries.as_ref(), hash),
                "decorator": {"operation": format!("{fqdn}:{port}/*")}
            });
            if let Some(n) = &r.name {
                route["name"] = json!(n);
            }
            if let Some(f) = &r.fault {
                route["typed_per_filter_config"] = f.to_envoy();
            }
            if let Some(m) = &r.mirror {
                // istiod: the percentage as `value × 10 000` per million.
                let share = (r.mirror_percentage.unwrap_or(100.0) * 10_000.0).round() as u64;
                route["route"]["request_mirror_policies"] = json!([{
                    "cluster": cluster_name(port, m.subset.as_deref(), fqdn),
                    "runtime_fraction": {"default_value": {"numerator": share, "denominator": "MILLION"}},
                    "trace_sampled": false
                }]);
            }
            if let Some(h) = &r.headers {
                h.apply(&mut route);
            }
            route
        })
        .collect()
}

fn inbound_listener(ports: &[InboundPort]) -> Value {
    let mut chains = Vec::new();
    for p in ports {
        let tcp = json!([{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": format!("inbound|{}||", p.port),
            "cluster": format!("inbound|{}||", p.port)
        }}]);
        if p.mtls != MtlsMode::Disable {
            // Istio's mTLS, told apart by its ALPN.
            chains.push(json!({
                "name": format!("0.0.0.0_{}", p.port),
                "filter_chain_match": {
                    "destination_port": p.port,
                    "transport_protocol": "tls",
                    "application_protocols": ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
                },
                "filters": tcp,
                "transport_socket": downstream_tls()
            }));
        }
        if p.mtls == MtlsMode::Permissive {
            // The application's own TLS, passed through untouched.
            chains.push(json!({
                "name": format!("0.0.0.0_{}", p.port),
                "filter_chain_match": {"destination_port": p.port, "transport_protocol": "tls"},
                "filters": tcp
            }));
        }
        if p.mtls != MtlsMode::Strict {
            chains.push(json!({
                "name": format!("0.0.0.0_{}", p.port),
                "filter_chain_match": {"destination_port": p.port, "transport_protocol": "raw_buffer"},
                "filters": tcp
            }));
        }
    }
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "listener_filters": inspectors(),
        "filter_chains": chains
    })
}

/// The resources and the name table of a mesh. An error names the service
/// and what is wrong with it (an unknown subset in a route, weights summing
/// to 0, a TCP port without a VIP, a regex that does not compile, …).
pub fn generate(mesh: &MeshFile) -> Result<(ResourceSet, NameTable), XdsError> {
    let mut clusters = Vec::new();
    let mut cla = Vec::new();
    let mut listeners = Vec::new();
    let mut vhosts_by_port: HashMap<u16, Vec<Value>> = HashMap::new();
    let mut names = NameTable::default();
    for svc in &mesh.services {
        let fqdn = svc.fqdn(&mesh.domain);
        validate(svc, &fqdn)?;
        if let Some(vip) = &svc.vip {
            vip.parse::<std::net::IpAddr>()
                .map_err(|e| bad(&fqdn, format!("vip {vip:?}: {e}")))?;
            names.table.insert(
                fqdn.clone(),
                NameInfo {
                    ips: vec![vip.clone()],
                    registry: "Kubernetes".into(),
                    shortname: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    alt_hosts: svc.aliases.clone(),
                },
            );
            for alias in &svc.aliases {
                names.table.insert(
                    alias.to_ascii_lowercase(),
                    NameInfo {
                        ips: vec![vip.clone()],
                        registry: "External".into(),
                        ..Default::default()
                    },
                );
            }
        } else if !svc.aliases.is_empty() {
            return Err(bad(&fqdn, "aliases need a vip"));
        }
        for port in &svc.ports {
            let cluster_name = cluster_name(port.port, None, &fqdn);
            let subsets = std::iter::once(None).chain(svc.subsets.iter().map(Some));
            for subset in subsets {
                clusters.push(
                    json!({"cluster": cluster(svc, port, subset, &fqdn, &mesh.trust_domain)}),
                );
                cla.push(json!({"endpoint_config": endpoints(svc, port, subset, &fqdn)}));
            }
            if port.protocol == PortProtocol::Tcp {
                let Some(vip) = &svc.vip else {
                    return Err(bad(&fqdn, format!("TCP port {} needs a vip", port.port)));
                };
                listeners.push(json!({"name": format!("{vip}_{}", port.port), "active_state": {"listener": {
                    "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                    "name": format!("{vip}_{}", port.port),
                    "address": {"socket_address": {"address": vip, "port_value": port.port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": cluster_name,
                        "cluster": cluster_name
                    }}]}]
                }}}));
                continue;
            }
            let short = [
                svc.name.clone(),
                format!("{}.{}", svc.name, svc.namespace),
                format!("{}.{}.svc", svc.name, svc.namespace),
                fqdn.clone(),
            ];
            let mut domains = Vec::new();
            for d in short.iter().chain(svc.vip.iter()) {
                domains.push(d.clone());
                domains.push(format!("{d}:{}", port.port));
            }
            vhosts_by_port.entry(port.port).or_default().push(json!({
                "name": format!("{fqdn}:{}", port.port),
                "domains": domains,
                "routes": http_routes(svc, port.port, &fqdn)
            }));
        }
    }
    let mut routes = Vec::new();
    let mut ports: Vec<_> = vhosts_by_port.into_iter().collect();
    ports.sort_by_key(|(p, _)| *p);
    for (port, vhosts) in ports {
        routes.push(json!({"route_config": {
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": port.to_string(),
            "virtual_hosts": vhosts
        }}));
        listeners.push(json!({"name": format!("0.0.0.0_{port}"), "active_state": {"listener": {
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": format!("0.0.0.0_{port}"),
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "listener_filters": inspectors(),
            "filter_chains": [{"filter_chain_match": {"transport_protocol": "raw_buffer", "application_protocols": ["http/1.1", "h2c"]}, "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": format!("outbound_0.0.0.0_{port}"),
                "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": port.to_string()},
                "http_filters": [
                    {"name": "envoy.filters.http.fault", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                    {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]
            }}]}]
        }}}));
    }
    if !mesh.inbound.is_empty() {
        listeners.push(json!({"name": "virtualInbound", "active_state": {"listener": inbound_listener(&mesh.inbound)}}));
    }
    let dump = json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": cla},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes}
    ]});
    let set = read_config_dump(&dump.to_string())
        .map_err(|e| XdsError::Dump(format!("mesh file: generated resources: {e}")))?;
    // What a client would NACK (a regex that does not compile, …) is the
    // mesh file's error, found here rather than on every client.
    for rc in set.routes.values() {
        nasp_xds::route::RouteConfig::from_proto(rc)
            .map_err(|e| XdsError::Dump(format!("mesh file: routes of port {}: {e}", rc.name)))?;
    }
    Ok((set, names))
}
