//! The resolved mesh: what a workload needs to know to send or accept a
//! connection, computed once per configuration update from the raw xDS
//! resources and then only read (behind an `ArcSwap`, without locks).
//! Nothing in it is a string to parse again: routes are typed
//! ([`crate::route`]), clusters are typed ([`crate::cluster`]).
//!
//! Outbound lookups follow Istio's conventions:
//! - an IP with a listener named `<ip>_<port>` goes where the filter chain
//!   Envoy would pick for a plaintext connection points (TCP proxy or HTTP
//!   connection manager); an IP on a port with a `0.0.0.0_<port>` listener
//!   the same on that listener (HTTP routes, or a TCP service without VIP);
//! - otherwise the route configuration named after the port (`"80"`) is
//!   searched by virtual-host domain with Envoy's precedence (exact, suffix
//!   wildcards longest first, prefix wildcards longest first, `*`), IPv6
//!   bracketed;
//! - a short name is tried with each search domain (`echo` →
//!   `echo.demo.svc.cluster.local`), and through the NDS name table;
//! - a name with no route falls back to the cluster `outbound|<port>||<fqdn>`.
//!
//! An HTTP answer is the virtual host, not a cluster: each request picks
//! its route and cluster with [`MeshView::route`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, transport_socket};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpCluster;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

pub use crate::cluster::{
    ClientCertificate, ClusterInfo, Endpoint, HealthStatus, OutlierSettings, SanMatcher, SanType,
    SlowStart, SocketMatch, TlsMode, TrustedCa, UpstreamProtocol, UpstreamTls,
};
use crate::cluster::{IstioService, cluster_info};
use crate::dump::ResourceSet;
use crate::route::{
    Forward, Redirect, RequestHeaders, Route, RouteAction, RouteConfig, VirtualHost,
};

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

/// The answer to an outbound lookup.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// Every connection goes to this cluster: a TCP service (its listener's
    /// TCP proxy), or a name known only as a cluster (`outbound|<port>||<fqdn>`).
    Cluster(Arc<ClusterInfo>),
    /// An HTTP destination: each request picks its route in the virtual
    /// host ([`MeshView::route`]).
    Http(HttpDestination),
}

/// An HTTP destination: the route configuration and the virtual host that
/// serves the host.
#[derive(Clone, Debug)]
pub struct HttpDestination {
    /// The route configuration (its header changes apply to every route).
    pub route_config: Arc<RouteConfig>,
    /// The matched virtual host with its ordered routes.
    pub virtual_host: Arc<VirtualHost>,
}

impl Outbound {
    /// The cluster of a [`Outbound::Cluster`] answer.
    pub fn cluster(&self) -> Option<&Arc<ClusterInfo>> {
        match self {
            Outbound::Cluster(c) => Some(c),
            Outbound::Http(_) => None,
        }
    }

    /// The HTTP destination of an [`Outbound::Http`] answer.
    pub fn http(&self) -> Option<&HttpDestination> {
        match self {
            Outbound::Http(h) => Some(h),
            Outbound::Cluster(_) => None,
        }
    }
}

/// What one HTTP request to an [`HttpDestination`] does.
#[derive(Clone, Debug)]
pub enum RouteDecision<'a> {
    /// Forward to `cluster` as `forward` says.
    Forward {
        /// The matched route (its header changes, fault, name).
        route: &'a Route,
        /// The forwarding settings (rewrites, timeout, retries, hashing, mirrors).
        forward: &'a Forward,
        /// The cluster picked for this request.
        cluster: Arc<ClusterInfo>,
    },
    /// Answer with this redirect.
    Redirect(&'a Route, &'a Redirect),
    /// Answer with this status and body.
    DirectResponse {
        /// The matched route.
        route: &'a Route,
        /// Status.
        status: u16,
        /// Body, if any.
        body: Option<&'a [u8]>,
    },
    /// No route matches: Envoy answers 404.
    NoRoute,
    /// The route names a cluster the mesh does not have (or a
    /// `cluster_header` the request lacks): Envoy answers 503.
    ClusterNotFound(Option<&'a str>),
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
    /// The port's filter chains in order: a PERMISSIVE TCP port has three
    /// (Istio mTLS, the application's own TLS passed through, plaintext).
    pub chains: Vec<InboundChain>,
    /// Whether no chain names the port and the listener's catch-all chains
    /// (`prefix_ranges 0.0.0.0/0`) answer for it.
    pub catch_all: bool,
}

/// One inbound filter chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundChain {
    /// The chain's name (`0.0.0.0_8080`, `virtualInbound-catchall-http`).
    pub name: String,
    /// How the connection arrives.
    pub transport: InboundTransport,
    /// The ALPN values the chain matches (empty: any).
    pub application_protocols: Vec<String>,
    /// Whether the chain serves HTTP (else TCP).
    pub http: bool,
}

/// How an inbound chain takes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundTransport {
    /// Terminates (Istio) mTLS.
    Mtls {
        /// Whether a client certificate is required.
        require_client_certificate: bool,
        /// ALPN the server side offers.
        alpn: Vec<String>,
    },
    /// TLS the application terminates itself: passed through untouched.
    TlsPassthrough,
    /// Plaintext.
    Plaintext,
}

impl Inbound {
    fn from_chains(port: u16, chains: Vec<InboundChain>, catch_all: bool) -> Self {
        let tls = chains
            .iter()
            .any(|c| matches!(c.transport, InboundTransport::Mtls { .. }));
        let plain = chains
            .iter()
            .any(|c| c.transport == InboundTransport::Plaintext);
        Inbound {
            port,
            tls,
            // A port that only takes plaintext is not "permissive": it is plain.
            permissive: tls && plain,
            client_certificate_required: chains.iter().any(|c| {
                matches!(
                    c.transport,
                    InboundTransport::Mtls {
                        require_client_certificate: true,
                        ..
                    }
                )
            }),
            chains,
            catch_all,
        }
    }

    /// The chain a connection lands on, as Envoy picks it: by transport
    /// (TLS or plaintext), then a chain whose ALPN list meets the client's,
    /// else one that matches any ALPN.
    pub fn chain(&self, tls: bool, client_alpn: &[&str]) -> Option<&InboundChain> {
        let transport_ok = |c: &&InboundChain| match c.transport {
            InboundTransport::Plaintext => !tls,
            _ => tls,
        };
        self.chains
            .iter()
            .filter(transport_ok)
            .find(|c| {
                c.application_protocols
                    .iter()
                    .any(|p| client_alpn.contains(&p.as_str()))
            })
            .or_else(|| {
                self.chains
                    .iter()
                    .filter(transport_ok)
                    .find(|c| c.application_protocols.is_empty())
            })
    }
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
    /// `(ip, port)` → filter chains, from listeners named `<ip>_<port>`.
    by_listener: HashMap<(IpAddr, u16), ListenerChains>,
    /// Port → filter chains, from listeners on `0.0.0.0_<port>` (Istio's
    /// HTTP ports, and TCP services without a VIP).
    by_port: HashMap<u16, ListenerChains>,
    /// Route configuration name → typed routes.
    route_tables: HashMap<String, Arc<RouteConfig>>,
    /// Tables named after a port (Istio's HTTP outbound tables).
    port_tables: HashMap<u16, Arc<RouteConfig>>,
    inbound: HashMap<u16, Inbound>,
    /// `virtualInbound`'s catch-all chains, for ports no chain names.
    inbound_catch_all: Option<Inbound>,
    names: HashMap<String, Vec<IpAddr>>,
    settings: ViewSettings,
    /// [`Self::local_services`]' answers, by listener address (with the
    /// instance IPs they were found for).
    #[allow(clippy::type_complexity)]
    local_services: std::sync::Mutex<HashMap<SocketAddr, (Vec<IpAddr>, Arc<[IstioService]>)>>,
}

#[derive(Clone, Debug)]
enum ListenerTarget {
    Tcp(String),
    Http(String),
}

/// The filter chains of one outbound listener, with what they match on.
#[derive(Clone, Debug, Default)]
struct ListenerChains {
    chains: Vec<Chain>,
    default: Option<ListenerTarget>,
}

#[derive(Clone, Debug)]
struct Chain {
    /// Destination prefixes (`(network, length)`); empty matches any.
    prefixes: Vec<(IpAddr, u8)>,
    port: Option<u16>,
    /// A chain that needs SNI or TLS cannot take a plaintext connection
    /// from the application.
    needs_tls: bool,
    target: ListenerTarget,
}

fn in_prefix(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl ListenerChains {
    /// The chain a plaintext connection from the application to `ip:port`
    /// lands on, as Envoy selects it: destination port, then the most
    /// specific destination prefix; among equals an HTTP chain (the
    /// application speaks HTTP to an HTTP port), then configuration order.
    /// Nothing matching: the default chain.
    fn select(&self, ip: IpAddr, port: u16) -> Option<&ListenerTarget> {
        let mut best: Option<(i32, bool, &ListenerTarget)> = None;
        for c in &self.chains {
            if c.needs_tls || c.port.is_some_and(|p| p != port) {
                continue;
            }
            let specificity = if c.prefixes.is_empty() {
                -1
            } else {
                match c
                    .prefixes
                    .iter()
                    .filter(|p| in_prefix(ip, **p))
                    .map(|p| i32::from(p.1))
                    .max()
                {
                    Some(len) => len,
                    None => continue,
                }
            };
            let http = matches!(c.target, ListenerTarget::Http(_));
            let better = match best {
                None => true,
                Some((s, h, _)) => specificity > s || (specificity == s && http && !h),
            };
            if better {
                best = Some((specificity, http, &c.target));
            }
        }
        best.map(|(_, _, t)| t).or(self.default.as_ref())
    }
}

pub(crate) fn any_is<M: Message + Default>(any: &Any, url: &str) -> Option<M> {
    (any.type_url == url)
        .then(|| M::decode(any.value.as_slice()).ok())
        .flatten()
}

pub(crate) fn socket(addr: &Option<Address>) -> Option<(String, u32)> {
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

/// Istio's clusters for traffic that is not to a mesh service.
pub(crate) fn is_catch_all(cluster: &str) -> bool {
    matches!(
        cluster,
        "PassthroughCluster"
            | "BlackHoleCluster"
            | "InboundPassthroughClusterIpv4"
            | "InboundPassthroughClusterIpv6"
    )
}

/// What one filter chain does: the first TCP proxy or HTTP connection
/// manager among its filters.
fn chain_target(
    fc: &FilterChain,
    inline: &mut Vec<(String, RouteConfig)>,
    inline_name: &str,
) -> Option<ListenerTarget> {
    for f in &fc.filters {
        let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_ref() else {
            continue;
        };
        if let Some(tcp) = any_is::<TcpProxy>(any, TCP_PROXY) {
            return match tcp.cluster_specifier {
                Some(TcpCluster::Cluster(c)) => Some(ListenerTarget::Tcp(c)),
                // Weighted TCP routes: the heaviest leg (per-connection
                // weighting is the transport's, from the raw resource).
                Some(TcpCluster::WeightedClusters(w)) => w
                    .clusters
                    .iter()
                    .max_by_key(|c| c.weight)
                    .map(|c| ListenerTarget::Tcp(c.name.clone())),
                _ => None,
            };
        }
        if let Some(hcm) = any_is::<HttpConnectionManager>(any, HCM) {
            return match hcm.route_specifier {
                Some(RouteSpecifier::Rds(rds)) => Some(ListenerTarget::Http(rds.route_config_name)),
                Some(RouteSpecifier::RouteConfig(rc)) => match RouteConfig::from_proto(&rc) {
                    Ok(table) => {
                        let name = format!("{inline_name}#{}", inline.len());
                        inline.push((name.clone(), table));
                        Some(ListenerTarget::Http(name))
                    }
                    Err(e) => {
                        tracing::warn!("inline route configuration of {inline_name} skipped: {e}");
                        None
                    }
                },
                _ => None,
            };
        }
    }
    None
}

fn chain(fc: &FilterChain, target: ListenerTarget) -> Chain {
    let m = fc.filter_chain_match.as_ref();
    Chain {
        prefixes: m
            .map(|m| {
                m.prefix_ranges
                    .iter()
                    .filter_map(|r| {
                        let ip = r.address_prefix.parse::<IpAddr>().ok()?;
                        let len = r
                            .prefix_len
                            .as_ref()
                            .map(|l| l.value)
                            .unwrap_or(if ip.is_ipv4() { 32 } else { 128 });
                        Some((ip, u8::try_from(len).unwrap_or(128)))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        port: m
            .and_then(|m| m.destination_port.as_ref())
            .and_then(|p| u16::try_from(p.value).ok()),
        needs_tls: m.is_some_and(|m| !m.server_names.is_empty() || m.transport_protocol == "tls"),
        target,
    }
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
            // The client validated RDS resources on receipt; a dump is not,
            // so a bad one is skipped here rather than served half-read.
            let table = match RouteConfig::from_proto(rc) {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    tracing::warn!("route configuration {name:?} skipped: {e}");
                    continue;
                }
            };
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

    fn add_listener(&mut self, l: &Listener) {
        let Some((ip, port)) = socket(&l.address) else {
            return;
        };
        let port = u16::try_from(port).unwrap_or(0);
        if l.name == "virtualInbound" || (ip == "0.0.0.0" && port == 15006) {
            self.add_inbound(l);
            return;
        }
        if l.name == "virtualOutbound" || port == 15001 {
            return; // the capture listener: what it matches is "outside the mesh"
        }
        let Ok(ip) = ip.parse::<IpAddr>() else { return };
        let mut inline = Vec::new();
        let inline_name = format!("{}#inline", l.name);
        let mut chains = ListenerChains::default();
        for fc in &l.filter_chains {
            if let Some(t) = chain_target(fc, &mut inline, &inline_name) {
                chains.chains.push(chain(fc, t));
            }
        }
        chains.default = l
            .default_filter_chain
            .as_ref()
            .and_then(|fc| chain_target(fc, &mut inline, &inline_name));
        for (name, table) in inline {
            self.route_tables.insert(name, Arc::new(table));
        }
        if chains.chains.is_empty() && chains.default.is_none() {
            return;
        }
        if ip.is_unspecified() {
            self.by_port.insert(port, chains);
        } else {
            self.by_listener.insert((ip, port), chains);
        }
    }

    fn add_inbound(&mut self, l: &Listener) {
        let mut by_port: HashMap<u16, Vec<InboundChain>> = HashMap::new();
        let mut catch_all: Vec<InboundChain> = Vec::new();
        for fc in &l.filter_chains {
            let m = fc.filter_chain_match.clone().unwrap_or_default();
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
            let mut inline = Vec::new();
            let target = chain_target(fc, &mut inline, &l.name);
            // 15006 itself: Istio's blackhole, so that nothing loops.
            if matches!(&target, Some(ListenerTarget::Tcp(c)) if c == "BlackHoleCluster") {
                continue;
            }
            let transport = match tls_ctx {
                Some(ctx) => InboundTransport::Mtls {
                    require_client_certificate: ctx
                        .require_client_certificate
                        .as_ref()
                        .is_some_and(|b| b.value),
                    alpn: ctx
                        .common_tls_context
                        .map(|c| c.alpn_protocols)
                        .unwrap_or_default(),
                },
                None if m.transport_protocol == "tls" => InboundTransport::TlsPassthrough,
                None => InboundTransport::Plaintext,
            };
            let chain = InboundChain {
                name: fc.name.clone(),
                transport,
                application_protocols: m.application_protocols.clone(),
                http: matches!(target, Some(ListenerTarget::Http(_))),
            };
            match m
                .destination_port
                .as_ref()
                .and_then(|p| u16::try_from(p.value).ok())
            {
                Some(port) => by_port.entry(port).or_default().push(chain),
                // The IPv4 and IPv6 catch-alls are the same chains twice.
                None if !catch_all.contains(&chain) => catch_all.push(chain),
                None => {}
            }
        }
        for (port, chains) in by_port {
            self.inbound
                .insert(port, Inbound::from_chains(port, chains, false));
        }
        if !catch_all.is_empty() {
            self.inbound_catch_all = Some(Inbound::from_chains(0, catch_all, true));
        }
    }

    /// The services the local workload serves on `local` (a listener's
    /// address), as a sidecar's inbound cluster names them: the
    /// `filter_metadata.istio.services` of `inbound|<port>||` (istiod
    /// writes them); else those of every cluster with an endpoint at
    /// `local` (an embedded control plane sends no inbound clusters, but
    /// the workload is an endpoint of its services), in cluster-name
    /// order, each host once. A listener on an unspecified address (`0.0.0.0`)
    /// matches endpoints of its port at any of `local_ips`. Empty when
    /// nothing names the workload. Computed once per view and address.
    pub fn local_services(&self, local: SocketAddr, local_ips: &[IpAddr]) -> Arc<[IstioService]> {
        let mut memo = self
            .local_services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((ips, s)) = memo.get(&local)
            && ips == local_ips
        {
            return s.clone();
        }
        let found = self.find_local_services(local, local_ips);
        // Bounded by the listeners a process opens; a view is replaced on
        // every update anyway.
        if memo.len() < 1024 || memo.contains_key(&local) {
            memo.insert(local, (local_ips.to_vec(), found.clone()));
        }
        found
    }

    fn find_local_services(&self, local: SocketAddr, local_ips: &[IpAddr]) -> Arc<[IstioService]> {
        if let Some(c) = self.clusters.get(&format!("inbound|{}||", local.port()))
            && !c.services.is_empty()
        {
            return c.services.clone();
        }
        let at_local = |e: &crate::cluster::Endpoint| {
            e.address.parse::<SocketAddr>().is_ok_and(|a| {
                a.port() == local.port()
                    && (a.ip() == local.ip()
                        || (local.ip().is_unspecified() && local_ips.contains(&a.ip())))
            })
        };
        let mut clusters: Vec<&Arc<ClusterInfo>> = self
            .clusters
            .values()
            .filter(|c| !c.services.is_empty() && c.endpoints.iter().any(at_local))
            .collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out: Vec<IstioService> = Vec::new();
        for s in clusters.iter().flat_map(|c| c.services.iter()) {
            if !out.iter().any(|o| o.host == s.host) {
                out.push(s.clone());
            }
        }
        out.into()
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterInfo>> {
        self.clusters.get(name).cloned()
    }

    /// A route configuration by name.
    pub fn route_config(&self, name: &str) -> Option<Arc<RouteConfig>> {
        self.route_tables.get(name).cloned()
    }

    /// Number of clusters, listeners-with-targets and route tables.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.clusters.len(),
            self.by_listener.len() + self.by_port.len(),
            self.route_tables.len(),
        )
    }

    /// Inbound settings of a port: its own chains, else the listener's
    /// catch-all chains. Never 15006 (the capture port's blackhole).
    pub fn inbound(&self, port: u16) -> Option<Inbound> {
        if let Some(i) = self.inbound.get(&port) {
            return Some(i.clone());
        }
        if port == 15006 {
            return None;
        }
        self.inbound_catch_all
            .as_ref()
            .map(|i| Inbound { port, ..i.clone() })
    }

    fn via_table(&self, table: &Arc<RouteConfig>, host: &str, port: u16) -> Option<Outbound> {
        let vh = table.virtual_host(host, port)?;
        // Istio's catch-all virtual host (`*` → PassthroughCluster, or
        // `block_all` answering 502 under REGISTRY_ONLY) is how a sidecar
        // handles hosts *outside* the mesh: such a host is not a mesh
        // destination.
        if vh.is_outside_mesh() {
            return None;
        }
        Some(Outbound::Http(HttpDestination {
            route_config: table.clone(),
            virtual_host: vh.clone(),
        }))
    }

    fn via_target(&self, target: &ListenerTarget, host: &str, port: u16) -> Option<Outbound> {
        match target {
            ListenerTarget::Tcp(c) if is_catch_all(c) => None,
            ListenerTarget::Tcp(c) => Some(Outbound::Cluster(self.clusters.get(c)?.clone())),
            ListenerTarget::Http(table) => {
                self.via_table(self.route_tables.get(table)?, host, port)
            }
        }
    }

    fn by_ip(&self, ip: IpAddr, port: u16) -> Option<Outbound> {
        let host = ip.to_string();
        if let Some(o) = self
            .by_listener
            .get(&(ip, port))
            .and_then(|chains| chains.select(ip, port))
            .and_then(|t| self.via_target(t, &host, port))
        {
            return Some(o);
        }
        // `0.0.0.0_<port>`: an HTTP port's routes (by the IP as domain), or
        // a TCP service without a VIP that takes the whole port.
        if let Some(chains) = self.by_port.get(&port) {
            return chains
                .select(ip, port)
                .and_then(|t| self.via_target(t, &host, port));
        }
        let t = self.port_tables.get(&port)?;
        self.via_table(t, &host, port)
    }

    /// Where a connection to `host:port` goes, if the mesh knows it. An
    /// IPv6 address may come bracketed or not.
    pub fn outbound(&self, host: &str, port: u16) -> Option<Outbound> {
        if let Ok(ip) = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .parse::<IpAddr>()
        {
            return self.by_ip(ip, port);
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
            if let Some(o) = table.and_then(|t| self.via_table(t, &name, port)) {
                return Some(o);
            }
            use std::fmt::Write as _;
            buf.clear();
            let _ = write!(buf, "outbound|{port}||{name}");
            if let Some(c) = self.clusters.get(buf.as_str()) {
                return Some(Outbound::Cluster(c.clone()));
            }
            if let Some(o) = self
                .names
                .get(name.as_str())
                .and_then(|ips| ips.iter().find_map(|ip| self.by_ip(*ip, port)))
            {
                return Some(o);
            }
        }
        None
    }

    /// The cluster a TCP connection goes to, or for an HTTP destination the
    /// one a plain `GET /` without headers is forwarded to (weighted legs:
    /// the first). For tools and tests; the transport routes each request
    /// with [`MeshView::route`].
    pub fn plain_cluster(&self, o: &Outbound) -> Option<Arc<ClusterInfo>> {
        match o {
            Outbound::Cluster(c) => Some(c.clone()),
            Outbound::Http(h) => match self.route(h, "/", &[], 0) {
                RouteDecision::Forward { cluster, .. } => Some(cluster),
                _ => None,
            },
        }
    }

    /// What one request to an HTTP destination does: the first matching
    /// route, and for a forwarding route the cluster picked for it
    /// (`random` chooses the weighted leg; pass a fresh random number per
    /// request). `path` is `:path` with its query string.
    pub fn route<'a, H: RequestHeaders + ?Sized>(
        &self,
        dest: &'a HttpDestination,
        path: &str,
        headers: &'a H,
        random: u64,
    ) -> RouteDecision<'a> {
        let Some(route) = dest.virtual_host.route(path, headers) else {
            return RouteDecision::NoRoute;
        };
        match &route.action {
            RouteAction::Forward(f) => match f.target.pick(headers, random) {
                Some(name) => match self.clusters.get(name) {
                    Some(c) => RouteDecision::Forward {
                        route,
                        forward: f,
                        cluster: c.clone(),
                    },
                    None => RouteDecision::ClusterNotFound(Some(name)),
                },
                None => RouteDecision::ClusterNotFound(None),
            },
            RouteAction::Redirect(r) => RouteDecision::Redirect(route, r),
            RouteAction::DirectResponse { status, body } => RouteDecision::DirectResponse {
                route,
                status: *status,
                body: body.as_deref(),
            },
            RouteAction::Unsupported(_) => RouteDecision::NoRoute,
        }
    }
}
