//! A small mesh file (services, ports, endpoints, mTLS mode) turned into
//! Istio-shaped xDS resources, with istiod's naming conventions:
//!
//! - cluster `outbound|<port>||<name>.<ns>.svc.<domain>` (EDS, service name
//!   the same), auto-mTLS as Istio does it: a TLS socket for endpoints
//!   labelled `tlsMode: istio` (SNI `outbound_.<port>_._.<fqdn>`, ALPN
//!   `istio-peer-exchange`, `istio`, the service account's SPIFFE id as the
//!   expected SAN) and plaintext for the rest (PERMISSIVE); TLS only
//!   (STRICT); plaintext only (DISABLE);
//! - TCP ports: a listener `<vip>_<port>` with a TCP proxy to the cluster;
//! - HTTP ports: a listener `0.0.0.0_<port>` with RDS route config `<port>`,
//!   whose virtual host `<fqdn>:<port>` lists Istio's domains (`name`,
//!   `name.ns`, `name.ns.svc`, the FQDN and the VIP, each also with
//!   `:<port>`) and routes `/` with Istio's default retries;
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
//! reader as real config dumps, so both sources go through one path.

use std::collections::HashMap;

use nasp_proto::istio_nds::NameTable;
use nasp_proto::istio_nds::name_table::NameInfo;
use nasp_xds::{ResourceSet, XdsError, read_config_dump};
use serde::Deserialize;
use serde_json::{Value, json};

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

/// Application protocol of a port.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP (any version): routed by host.
    #[default]
    Http,
    /// Opaque TCP: routed by VIP and port.
    Tcp,
}

/// A service port.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The service port.
    pub port: u16,
    /// http or tcp.
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
    /// Load-balancing weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Whether it runs an Istio-compatible mTLS peer (default true).
    #[serde(default = "yes")]
    pub istio: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
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

fn default_td() -> String {
    "cluster.local".into()
}

impl MeshFile {
    /// Parses YAML or JSON (JSON is YAML).
    pub fn parse(text: &str) -> Result<Self, XdsError> {
        serde_saphyr::from_str(text).map_err(|e| XdsError::Dump(format!("mesh file: {e}")))
    }
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

fn cluster(svc: &MeshService, port: &ServicePort, fqdn: &str, trust_domain: &str) -> Value {
    let name = format!("outbound|{}||{fqdn}", port.port);
    let sni = format!("outbound_.{}_._.{fqdn}", port.port);
    let san = format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        svc.namespace, svc.service_account
    );
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": name},
        "connect_timeout": "10s",
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u32, "max_pending_requests": 4294967295u32, "max_requests": 4294967295u32, "max_retries": 4294967295u32}]}
    });
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

fn endpoints(svc: &MeshService, port: &ServicePort, fqdn: &str) -> Value {
    let target = port.target_port.unwrap_or(port.port);
    let mut by_locality: Vec<(String, Vec<Value>)> = Vec::new();
    for e in &svc.endpoints {
        let mut lb = json!({
            "endpoint": {"address": {"socket_address": {"address": e.ip, "port_value": target}}},
            "health_status": "HEALTHY",
            "load_balancing_weight": e.weight
        });
        if e.istio {
            lb["metadata"] =
                json!({"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}});
        }
        match by_locality.iter_mut().find(|(l, _)| *l == e.locality) {
            Some((_, v)) => v.push(lb),
            None => by_locality.push((e.locality.clone(), vec![lb])),
        }
    }
    let groups: Vec<Value> = by_locality
        .into_iter()
        .map(|(locality, lbs)| {
            let mut parts = locality.splitn(3, '/');
            json!({
                "locality": {"region": parts.next().unwrap_or_default(), "zone": parts.next().unwrap_or_default(), "sub_zone": parts.next().unwrap_or_default()},
                "lb_endpoints": lbs
            })
        })
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": format!("outbound|{}||{fqdn}", port.port),
        "endpoints": groups
    })
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

/// The resources and the name table of a mesh.
pub fn generate(mesh: &MeshFile) -> Result<(ResourceSet, NameTable), XdsError> {
    let mut clusters = Vec::new();
    let mut cla = Vec::new();
    let mut listeners = Vec::new();
    let mut vhosts_by_port: HashMap<u16, Vec<Value>> = HashMap::new();
    let mut names = NameTable::default();
    for svc in &mesh.services {
        let fqdn = format!("{}.{}.svc.{}", svc.name, svc.namespace, mesh.domain);
        if let Some(vip) = &svc.vip {
            vip.parse::<std::net::IpAddr>()
                .map_err(|e| XdsError::Dump(format!("service {fqdn}: vip {vip:?}: {e}")))?;
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
            return Err(XdsError::Dump(format!(
                "service {fqdn}: aliases need a vip"
            )));
        }
        for port in &svc.ports {
            let cluster_name = format!("outbound|{}||{fqdn}", port.port);
            clusters.push(json!({"cluster": cluster(svc, port, &fqdn, &mesh.trust_domain)}));
            cla.push(json!({"endpoint_config": endpoints(svc, port, &fqdn)}));
            match port.protocol {
                PortProtocol::Tcp => {
                    let Some(vip) = &svc.vip else {
                        return Err(XdsError::Dump(format!(
                            "service {fqdn}: TCP port {} needs a vip",
                            port.port
                        )));
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
                }
                PortProtocol::Http => {
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
                        "routes": [{"match": {"prefix": "/"}, "name": "default", "route": {
                            "cluster": cluster_name,
                            "timeout": "0s",
                            "retry_policy": {
                                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                                "num_retries": 2,
                                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                                "host_selection_retry_max_attempts": "5",
                                "retriable_status_codes": [503]
                            }
                        }}]
                    }));
                }
            }
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
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
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
    let set = read_config_dump(&dump.to_string())?;
    Ok((set, names))
}
