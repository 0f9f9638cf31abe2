//! The resolved mesh: what a workload needs to know to send or accept a
//! connection, computed once per configuration update from the raw xDS
//! resources and then only read (behind an `ArcSwap`, without locks).
//!
//! Outbound lookups follow Istio's conventions:
//! - an IP with a listener named `<ip>_<port>` (TCP services) goes where its
//!   TCP proxy or HTTP connection manager points;
//! - otherwise the route configuration named after the port (`"80"`, HTTP
//!   services behind `0.0.0.0_<port>`) is searched by virtual-host domain:
//!   exact, `host:port`, then `*.suffix` / `prefix*` wildcards, longest first;
//! - a short name is tried with each search domain (`echo` →
//!   `echo.demo.svc.cluster.local`), and through the NDS name table;
//! - a name with no route falls back to the cluster `outbound|<port>||<fqdn>`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier as RouteCluster;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpCluster;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{DownstreamTlsContext, UpstreamTlsContext};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::dump::ResourceSet;

const TLS_CONTEXT_UPSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const TLS_CONTEXT_DOWNSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// Whether a cluster takes its endpoints from EDS.
pub fn is_eds(c: &Cluster) -> bool {
    matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32)
}

/// The EDS resource name of a cluster (its service name, else its name).
pub fn eds_service_name(c: &Cluster) -> String {
    c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone())
}

/// One endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:port` (or `host:port` for DNS clusters).
    pub address: String,
    /// Load-balancing weight (1 when unset).
    pub weight: u32,
    /// `region/zone/subzone`.
    pub locality: String,
    /// Priority (0 is the highest).
    pub priority: u32,
    /// Whether the endpoint counts as healthy (unknown, healthy or degraded).
    pub healthy: bool,
    /// Whether the endpoint speaks Istio mTLS (`tlsMode: istio` metadata).
    pub istio_mtls: bool,
}

/// Retry settings of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Envoy's `retry_on` conditions.
    pub retry_on: String,
    /// Attempts after the first.
    pub num_retries: u32,
    /// Status codes retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u32>,
}

/// One route of a virtual host.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// `prefix:/x`, `path:/x`, `regex:…` or `any`.
    pub matcher: String,
    /// Target cluster; weighted targets as `(cluster, weight)`.
    pub clusters: Vec<(String, u32)>,
    /// Retry policy.
    pub retry: Option<Retry>,
    /// Route timeout in milliseconds, if set.
    pub timeout_ms: Option<u64>,
}

/// What is known about a cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterInfo {
    /// The cluster name (`outbound|80||echo.demo.svc.cluster.local`).
    pub name: String,
    /// SNI to send.
    pub sni: Option<String>,
    /// Whether connections use (Istio) mTLS.
    pub tls: bool,
    /// Whether plaintext is used for endpoints without `tlsMode: istio`.
    pub permissive: bool,
    /// The SANs the server must present.
    pub expected_sans: Vec<String>,
    /// ALPN offered on TLS.
    pub alpn: Vec<String>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Load-balancing policy (`ROUND_ROBIN`, `LEAST_REQUEST`, …).
    pub lb_policy: String,
    /// Circuit-breaker thresholds of the default priority:
    /// (max connections, max pending, max requests, max retries).
    pub circuit_breakers: Option<(u32, u32, u32, u32)>,
    /// Outlier detection, when configured.
    pub outlier_detection: Option<OutlierSettings>,
}

/// Outlier detection of a cluster (Envoy's defaults where unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive 5xx before ejection (default 5).
    pub consecutive_5xx: u32,
    /// Consecutive gateway failures before ejection (default 5).
    pub consecutive_gateway_failure: u32,
    /// Analysis interval in milliseconds (default 10 000).
    pub interval_ms: u64,
    /// Base ejection time in milliseconds (default 30 000).
    pub base_ejection_ms: u64,
    /// Most hosts ejected at once, in percent (default 10).
    pub max_ejection_percent: u32,
}

/// The answer to an outbound lookup.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    /// The chosen cluster.
    pub cluster: Arc<ClusterInfo>,
    /// For HTTP destinations, the routes of the matched virtual host.
    pub routes: Option<Arc<Vec<Route>>>,
    /// The virtual host matched, if any.
    pub virtual_host: Option<String>,
}

/// The answer to an inbound lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The port.
    pub port: u16,
    /// Whether mTLS is accepted.
    pub tls: bool,
    /// Whether plaintext is accepted too.
    pub permissive: bool,
    /// Whether TLS clients must present a certificate.
    pub client_certificate_required: bool,
}

/// A route configuration prepared for lookups: exact domains hashed,
/// wildcard domains kept aside, longest first.
#[derive(Debug, Default)]
struct RouteTable {
    vhosts: Vec<VHost>,
    exact: HashMap<String, usize>,
    /// (pattern without `*`, is-suffix, vhost index), longest pattern first.
    wildcards: Vec<(String, bool, usize)>,
}

impl RouteTable {
    fn new(vhosts: Vec<VHost>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, v) in vhosts.iter().enumerate() {
            for d in &v.domains {
                if let Some(suffix) = d.strip_prefix('*') {
                    wildcards.push((suffix.to_string(), true, i));
                } else if let Some(prefix) = d.strip_suffix('*') {
                    wildcards.push((prefix.to_string(), false, i));
                } else {
                    // The first virtual host that lists a domain wins.
                    exact.entry(d.clone()).or_insert(i);
                }
            }
        }
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        Self {
            vhosts,
            exact,
            wildcards,
        }
    }

    /// `host` must be lower case. `buf` is scratch space.
    fn find(&self, host: &str, port: u16, buf: &mut String) -> Option<&VHost> {
        if let Some(i) = self.exact.get(host) {
            return self.vhosts.get(*i);
        }
        use std::fmt::Write as _;
        buf.clear();
        let _ = write!(buf, "{host}:{port}");
        if let Some(i) = self.exact.get(buf.as_str()) {
            return self.vhosts.get(*i);
        }
        self.wildcards
            .iter()
            .find(|(p, suffix, _)| {
                if *suffix {
                    host.ends_with(p.as_str()) || buf.ends_with(p.as_str())
                } else {
                    host.starts_with(p.as_str())
                }
            })
            .and_then(|(_, _, i)| self.vhosts.get(*i))
    }
}

#[derive(Clone, Debug)]
struct VHost {
    name: String,
    domains: Vec<String>,
    routes: Arc<Vec<Route>>,
}

/// Settings that shape lookups.
#[derive(Clone, Debug, Default)]
pub struct ViewSettings {
    /// DNS search domains, tried in order for names without a match.
    pub search_domains: Vec<String>,
}

/// The resolved mesh.
#[derive(Debug, Default)]
pub struct MeshView {
    clusters: HashMap<String, Arc<ClusterInfo>>,
    /// `(ip, port)` → cluster, from listeners named `<ip>_<port>`.
    by_listener: HashMap<(IpAddr, u16), ListenerTarget>,
    /// Route configuration name → virtual hosts.
    route_tables: HashMap<String, Arc<RouteTable>>,
    /// Tables named after a port (Istio's HTTP outbound tables).
    port_tables: HashMap<u16, Arc<RouteTable>>,
    inbound: HashMap<u16, Inbound>,
    names: HashMap<String, Vec<IpAddr>>,
    settings: ViewSettings,
}

#[derive(Clone, Debug)]
enum ListenerTarget {
    Tcp(String),
    Http(String),
}

fn any_is<M: Message + Default>(any: &Any, url: &str) -> Option<M> {
    (any.type_url == url)
        .then(|| M::decode(any.value.as_slice()).ok())
        .flatten()
}

fn socket(addr: &Option<Address>) -> Option<(String, u32)> {
    match addr.as_ref()?.address.as_ref()? {
        AddressKind::SocketAddress(s) => match s.port_specifier {
            Some(PortSpecifier::PortValue(p)) => Some((s.address.clone(), p)),
            _ => Some((s.address.clone(), 0)),
        },
        _ => None,
    }
}

/// `<address>_<port>` of a listener bound to a socket address.
pub fn listener_address_name(l: &Listener) -> Option<String> {
    socket(&l.address).map(|(ip, port)| format!("{ip}_{port}"))
}

fn upstream_tls(ts: &Option<TransportSocket>) -> Option<UpstreamTlsContext> {
    match ts.as_ref()?.config_type.as_ref()? {
        transport_socket::ConfigType::TypedConfig(any) => any_is(any, TLS_CONTEXT_UPSTREAM),
    }
}

fn sans_of(ctx: &UpstreamTlsContext) -> Vec<String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
    let Some(common) = ctx.common_tls_context.as_ref() else {
        return Vec::new();
    };
    let validation = match common.validation_context_type.as_ref() {
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.clone()
        }
        Some(ValidationContextType::ValidationContext(v)) => Some(v.clone()),
        _ => None,
    };
    let Some(v) = validation else {
        return Vec::new();
    };
    #[allow(deprecated)]
    let plain = v.match_subject_alt_names.iter();
    let typed = v
        .match_typed_subject_alt_names
        .iter()
        .filter_map(|t| t.matcher.as_ref());
    plain
        .chain(typed)
        .filter_map(|m| match m.match_pattern.as_ref() {
            Some(MatchPattern::Exact(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn cluster_info(c: &Cluster, cla: Option<&ClusterLoadAssignment>) -> ClusterInfo {
    let mut tls_ctx = upstream_tls(&c.transport_socket);
    let mut permissive = false;
    if tls_ctx.is_none() && !c.transport_socket_matches.is_empty() {
        // Istio's auto-mTLS: a TLS socket for endpoints labelled
        // tlsMode=istio, plaintext for the rest.
        tls_ctx = c
            .transport_socket_matches
            .iter()
            .find_map(|m| upstream_tls(&m.transport_socket));
        permissive = tls_ctx.is_some()
            && c.transport_socket_matches
                .iter()
                .any(|m| upstream_tls(&m.transport_socket).is_none());
    }
    let cla = cla.or(c.load_assignment.as_ref());
    let mut endpoints = Vec::new();
    for group in cla.map(|a| a.endpoints.as_slice()).unwrap_or_default() {
        let locality = group
            .locality
            .as_ref()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .unwrap_or_default();
        for lb in &group.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = lb.host_identifier.as_ref() else {
                continue;
            };
            let Some((ip, port)) = socket(&ep.address) else {
                continue;
            };
            let address = if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            };
            let istio_mtls = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match v.kind.as_ref() {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s == "istio")
                    }
                    _ => None,
                })
                .unwrap_or(false);
            // UNKNOWN (0), HEALTHY (1) and DEGRADED (5) take traffic.
            let healthy = matches!(lb.health_status, 0 | 1 | 5);
            endpoints.push(Endpoint {
                address,
                weight: lb
                    .load_balancing_weight
                    .as_ref()
                    .map(|w| w.value)
                    .unwrap_or(1),
                locality: locality.clone(),
                priority: group.priority,
                healthy,
                istio_mtls,
            });
        }
    }
    let circuit_breakers = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first())
        .map(|t| {
            let v = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d| {
                w.as_ref().map(|w| w.value).unwrap_or(d)
            };
            (
                v(&t.max_connections, 1024),
                v(&t.max_pending_requests, 1024),
                v(&t.max_requests, 1024),
                v(&t.max_retries, 3),
            )
        });
    ClusterInfo {
        name: c.name.clone(),
        sni: tls_ctx
            .as_ref()
            .map(|t| t.sni.clone())
            .filter(|s| !s.is_empty()),
        tls: tls_ctx.is_some(),
        permissive,
        expected_sans: tls_ctx.as_ref().map(sans_of).unwrap_or_default(),
        alpn: tls_ctx
            .as_ref()
            .and_then(|t| t.common_tls_context.as_ref())
            .map(|c| c.alpn_protocols.clone())
            .unwrap_or_default(),
        endpoints,
        lb_policy: LbPolicy::try_from(c.lb_policy)
            .map(|p| p.as_str_name().to_string())
            .unwrap_or_default(),
        circuit_breakers,
        outlier_detection: c.outlier_detection.as_ref().map(|o| {
            let u = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
                w.as_ref().map(|w| w.value).unwrap_or(d)
            };
            let ms = |d: &Option<envoy_types::pb::google::protobuf::Duration>, default: u64| {
                d.as_ref()
                    .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000)
                    .unwrap_or(default)
            };
            OutlierSettings {
                consecutive_5xx: u(&o.consecutive_5xx, 5),
                consecutive_gateway_failure: u(&o.consecutive_gateway_failure, 5),
                interval_ms: ms(&o.interval, 10_000),
                base_ejection_ms: ms(&o.base_ejection_time, 30_000),
                max_ejection_percent: u(&o.max_ejection_percent, 10),
            }
        }),
    }
}

/// Istio's clusters for traffic that is not to a mesh service.
fn is_catch_all(cluster: &str) -> bool {
    matches!(
        cluster,
        "PassthroughCluster"
            | "BlackHoleCluster"
            | "InboundPassthroughClusterIpv4"
            | "InboundPassthroughClusterIpv6"
    )
}

fn routes_of(vh: &VirtualHost) -> Vec<Route> {
    vh.routes
        .iter()
        .filter_map(|r| {
            let matcher = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
                Some(PathSpecifier::Prefix(p)) => format!("prefix:{p}"),
                Some(PathSpecifier::Path(p)) => format!("path:{p}"),
                Some(PathSpecifier::SafeRegex(re)) => format!("regex:{}", re.regex),
                Some(_) => "other".to_string(),
                None => "any".to_string(),
            };
            let Some(Action::Route(action)) = r.action.as_ref() else {
                return None;
            };
            let clusters = match action.cluster_specifier.as_ref() {
                Some(RouteCluster::Cluster(c)) => vec![(c.clone(), 100)],
                Some(RouteCluster::WeightedClusters(w)) => w
                    .clusters
                    .iter()
                    .map(|c| {
                        (
                            c.name.clone(),
                            c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let retry = action.retry_policy.as_ref().map(|p| Retry {
                retry_on: p.retry_on.clone(),
                num_retries: p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
                retriable_status_codes: p.retriable_status_codes.clone(),
            });
            let timeout_ms = action
                .timeout
                .as_ref()
                .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000);
            Some(Route {
                matcher,
                clusters,
                retry,
                timeout_ms,
            })
        })
        .collect()
}

fn network_filters(
    l: &Listener,
) -> impl Iterator<
    Item = (
        &envoy_types::pb::envoy::config::listener::v3::FilterChain,
        &Any,
    ),
> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
        .flat_map(|fc| {
            fc.filters
                .iter()
                .filter_map(move |f| match f.config_type.as_ref() {
                    Some(filter::ConfigType::TypedConfig(any)) => Some((fc, any)),
                    _ => None,
                })
        })
}

impl MeshView {
    /// Resolves a set of resources.
    pub fn build(
        set: &ResourceSet,
        names: HashMap<String, Vec<IpAddr>>,
        settings: ViewSettings,
    ) -> Self {
        let mut view = MeshView {
            names,
            settings,
            ..Default::default()
        };
        for (name, c) in &set.clusters {
            let cla = is_eds(c)
                .then(|| set.endpoints.get(&eds_service_name(c)))
                .flatten();
            view.clusters
                .insert(name.clone(), Arc::new(cluster_info(c, cla)));
        }
        for (name, rc) in &set.routes {
            let table = Arc::new(RouteTable::new(Self::vhosts(rc)));
            if let Ok(port) = name.parse::<u16>() {
                view.port_tables.insert(port, table.clone());
            }
            view.route_tables.insert(name.clone(), table);
        }
        for l in set.listeners.values() {
            view.add_listener(l);
        }
        view
    }

    fn vhosts(rc: &RouteConfiguration) -> Vec<VHost> {
        rc.virtual_hosts
            .iter()
            .map(|vh| VHost {
                name: vh.name.clone(),
                domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                routes: Arc::new(routes_of(vh)),
            })
            .collect()
    }

    fn add_listener(&mut self, l: &Listener) {
        let Some((ip, port)) = socket(&l.address) else {
            return;
        };
        let port = u16::try_from(port).unwrap_or(0);
        if l.name == "virtualInbound" || (ip == "0.0.0.0" && port == 15006) {
            self.add_inbound(l);
            return;
        }
        let Ok(ip) = ip.parse::<IpAddr>() else { return };
        if ip.is_unspecified() {
            return; // 0.0.0.0_<port>: HTTP, resolved through the route named after the port
        }
        for (_, any) in network_filters(l) {
            if let Some(tcp) = any_is::<TcpProxy>(any, TCP_PROXY) {
                if let Some(TcpCluster::Cluster(c)) = tcp.cluster_specifier {
                    self.by_listener.insert((ip, port), ListenerTarget::Tcp(c));
                    return;
                }
            }
            if let Some(hcm) = any_is::<HttpConnectionManager>(any, HCM) {
                match hcm.route_specifier {
                    Some(RouteSpecifier::Rds(rds)) => {
                        self.by_listener
                            .insert((ip, port), ListenerTarget::Http(rds.route_config_name));
                    }
                    Some(RouteSpecifier::RouteConfig(rc)) => {
                        let name = format!("{}_{port}#inline", ip);
                        self.route_tables
                            .insert(name.clone(), Arc::new(RouteTable::new(Self::vhosts(&rc))));
                        self.by_listener
                            .insert((ip, port), ListenerTarget::Http(name));
                    }
                    _ => {}
                }
                return;
            }
        }
    }

    fn add_inbound(&mut self, l: &Listener) {
        for fc in &l.filter_chains {
            let Some(m) = fc.filter_chain_match.as_ref() else {
                continue;
            };
            let Some(port) = m
                .destination_port
                .as_ref()
                .and_then(|p| u16::try_from(p.value).ok())
            else {
                continue;
            };
            let tls_ctx: Option<DownstreamTlsContext> = match fc
                .transport_socket
                .as_ref()
                .and_then(|t| t.config_type.as_ref())
            {
                Some(transport_socket::ConfigType::TypedConfig(any)) => {
                    any_is(any, TLS_CONTEXT_DOWNSTREAM)
                }
                None => None,
            };
            let entry = self.inbound.entry(port).or_insert(Inbound {
                port,
                tls: false,
                permissive: false,
                client_certificate_required: false,
            });
            match tls_ctx {
                Some(ctx) => {
                    entry.tls = true;
                    entry.client_certificate_required |= ctx
                        .require_client_certificate
                        .as_ref()
                        .is_some_and(|b| b.value);
                }
                None if m.transport_protocol == "raw_buffer" || m.transport_protocol.is_empty() => {
                    entry.permissive = true;
                }
                None => {}
            }
        }
        // A port that only takes plaintext is not "permissive": it is plain.
        for i in self.inbound.values_mut() {
            if !i.tls {
                i.permissive = false;
            }
        }
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterInfo>> {
        self.clusters.get(name).cloned()
    }

    /// Number of clusters, listeners-with-targets and route tables.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.clusters.len(),
            self.by_listener.len(),
            self.route_tables.len(),
        )
    }

    /// Inbound settings of a port.
    pub fn inbound(&self, port: u16) -> Option<Inbound> {
        self.inbound.get(&port).cloned()
    }

    fn via_table(
        &self,
        table: &RouteTable,
        host: &str,
        port: u16,
        buf: &mut String,
    ) -> Option<Outbound> {
        let vh = table.find(host, port, buf)?;
        // The cluster of the first route (the catch-all `/` in Istio's
        // tables); per-request routing uses `routes`.
        let cluster = &vh.routes.first()?.clusters.first()?.0;
        // Istio's catch-all virtual host (`*` → PassthroughCluster or
        // BlackHoleCluster) is how a sidecar handles hosts *outside* the
        // mesh: such a host is not a mesh destination.
        if is_catch_all(cluster) {
            return None;
        }
        Some(Outbound {
            cluster: self.clusters.get(cluster)?.clone(),
            routes: Some(vh.routes.clone()),
            virtual_host: Some(vh.name.clone()),
        })
    }

    fn via_routes(&self, table: &str, host: &str, port: u16) -> Option<Outbound> {
        let t = self.route_tables.get(table)?;
        self.via_table(t, host, port, &mut String::new())
    }

    fn by_ip(&self, ip: IpAddr, port: u16) -> Option<Outbound> {
        match self.by_listener.get(&(ip, port))? {
            ListenerTarget::Tcp(c) if is_catch_all(c) => None,
            ListenerTarget::Tcp(c) => Some(Outbound {
                cluster: self.clusters.get(c)?.clone(),
                routes: None,
                virtual_host: None,
            }),
            ListenerTarget::Http(table) => self.via_routes(table, &ip.to_string(), port),
        }
    }

    /// Where a connection to `host:port` goes, if the mesh knows it.
    pub fn outbound(&self, host: &str, port: u16) -> Option<Outbound> {
        if let Ok(ip) = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        {
            if let Some(o) = self.by_ip(ip, port) {
                return Some(o);
            }
            let t = self.port_tables.get(&port)?;
            return self.via_table(t, &ip.to_string(), port, &mut String::new());
        }
        let host = host.trim_end_matches('.');
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let table = self.port_tables.get(&port);
        let mut buf = String::with_capacity(64);
        let mut name = String::with_capacity(64);
        for i in 0..=self.settings.search_domains.len() {
            name.clear();
            name.push_str(host);
            if i > 0 {
                name.push('.');
                name.push_str(&self.settings.search_domains[i - 1]);
            }
            if let Some(o) = table.and_then(|t| self.via_table(t, &name, port, &mut buf)) {
                return Some(o);
            }
            use std::fmt::Write as _;
            buf.clear();
            let _ = write!(buf, "outbound|{port}||{name}");
            if let Some(c) = self.clusters.get(buf.as_str()) {
                return Some(Outbound {
                    cluster: c.clone(),
                    routes: None,
                    virtual_host: None,
                });
            }
            if let Some(ips) = self.names.get(name.as_str()) {
                if let Some(o) = ips.iter().find_map(|ip| self.by_ip(*ip, port)) {
                    return Some(o);
                }
            }
        }
        None
    }
}
