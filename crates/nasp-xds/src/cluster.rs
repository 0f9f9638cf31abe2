//! Clusters as the transport needs them: endpoints with their locality,
//! priority and health, the upstream TLS mode of each transport socket,
//! the upstream HTTP protocol, timeouts, circuit breakers and outlier
//! detection, all with Envoy's defaults applied where the cluster is silent.
//! Converted once per update; nothing here is parsed again per connection.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as DataSpecifier;
use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::google::protobuf::value::Kind;

use crate::route::StringMatch;
use crate::view::{any_is, socket};

const TLS_CONTEXT_UPSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_URL: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Envoy's cluster connect timeout when none is set.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's overprovisioning factor (in percent) when none is set.
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

/// Envoy's health status of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// Not known: treated as healthy.
    Unknown,
    /// Healthy.
    Healthy,
    /// Unhealthy: takes no traffic.
    Unhealthy,
    /// Draining: takes no new traffic.
    Draining,
    /// Health check timed out: treated as unhealthy.
    Timeout,
    /// Degraded: used only when too few healthy endpoints remain.
    Degraded,
}

impl HealthStatus {
    fn from_proto(v: i32) -> Self {
        match v {
            1 => HealthStatus::Healthy,
            2 => HealthStatus::Unhealthy,
            3 => HealthStatus::Draining,
            4 => HealthStatus::Timeout,
            5 => HealthStatus::Degraded,
            _ => HealthStatus::Unknown,
        }
    }
}

/// One endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip:port` (`[v6]:port`), or `host:port` for DNS clusters.
    pub address: String,
    /// Load-balancing weight (1 when unset).
    pub weight: u32,
    /// `region/zone/subzone`.
    pub locality: String,
    /// The locality's `load_balancing_weight`, used when the cluster has
    /// `locality_weighted_lb_config` (a locality without one takes no
    /// traffic then, as in Envoy).
    pub locality_weight: Option<u32>,
    /// Priority (0 is the highest).
    pub priority: u32,
    /// Whether the endpoint takes traffic as healthy (unknown or healthy).
    /// Degraded endpoints are not healthy: see `health`.
    pub healthy: bool,
    /// The health status as the control plane sent it.
    pub health: HealthStatus,
    /// Whether the endpoint speaks Istio mTLS (`tlsMode: istio` metadata).
    pub istio_mtls: bool,
    /// The `tlsMode` of `envoy.transport_socket_match` metadata, if any.
    pub tls_mode: Option<String>,
}

/// How a TLS transport socket authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Istio mTLS: the workload certificate (Istio's SDS `default`) and the
    /// mesh root (`ROOTCA`).
    IstioMutual,
    /// Mutual TLS with a certificate the cluster names (DestinationRule
    /// MUTUAL).
    Mutual,
    /// Server-authenticated TLS only, no client certificate
    /// (DestinationRule SIMPLE).
    Simple,
}

/// Where the server's certificate chain is verified against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustedCa {
    /// Nothing given: Envoy does not verify the server's certificate.
    Unverified,
    /// The system roots (`system_root_certs`).
    System,
    /// A PEM file (Istio writes `/etc/ssl/certs/ca-certificates.crt` for
    /// "system" on SIMPLE without `caCertificates`).
    File(String),
    /// Inline PEM.
    Inline(String),
    /// An SDS secret by name (Istio's `ROOTCA`).
    Sds(String),
}

/// The client certificate a TLS socket presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    /// None.
    None,
    /// An SDS secret by name (Istio's `default`: the workload certificate).
    Sds(String),
    /// A certificate file (and key), as named.
    File {
        /// Certificate chain file.
        cert: String,
        /// Private key file.
        key: String,
    },
    /// Inline or otherwise provided.
    Other,
}

/// Envoy's SAN type of a `SubjectAltNameMatcher`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanType {
    /// Any type (the legacy `match_subject_alt_names`).
    Any,
    /// E-mail.
    Email,
    /// DNS name.
    Dns,
    /// URI (SPIFFE ids).
    Uri,
    /// IP address.
    IpAddress,
    /// Other name (with an OID).
    OtherName,
}

/// One SAN condition on the server certificate: it passes when any SAN of
/// the type matches.
#[derive(Clone, Debug)]
pub struct SanMatcher {
    /// Which SANs are looked at.
    pub san_type: SanType,
    /// The condition on them.
    pub matcher: StringMatch,
}

/// An upstream TLS transport socket, typed.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// How it authenticates.
    pub mode: TlsMode,
    /// SNI to send, if fixed.
    pub sni: Option<String>,
    /// ALPN offered.
    pub alpn: Vec<String>,
    /// Conditions on the server certificate's SANs. Empty means "verify
    /// the chain only" (Envoy), never "reject everything".
    pub san_matchers: Vec<SanMatcher>,
    /// What the chain is verified against.
    pub trusted_ca: TrustedCa,
    /// What the client presents.
    pub client_certificate: ClientCertificate,
}

/// One of a cluster's `transport_socket_matches`, in order.
#[derive(Clone, Debug)]
pub struct SocketMatch {
    /// Its name (`tlsMode-istio`, `tlsMode-disabled`).
    pub name: String,
    /// The `tlsMode` an endpoint must carry; `None` matches every endpoint.
    pub tls_mode: Option<String>,
    /// TLS, or `None` for plaintext.
    pub tls: Option<UpstreamTls>,
}

/// The HTTP protocol toward the cluster's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (Envoy's default).
    #[default]
    Http1,
    /// HTTP/2, explicitly (Istio: gRPC and `http2` ports, h2UpgradePolicy).
    Http2,
    /// HTTP/3.
    Http3,
    /// The protocol the request came in with.
    UseDownstream,
    /// Negotiated by ALPN.
    Auto,
}

/// What is known about a cluster.
#[derive(Clone, Debug)]
pub struct ClusterInfo {
    /// The cluster name (`outbound|80||echo.demo.svc.cluster.local`).
    pub name: String,
    /// SNI to send (of the TLS socket).
    pub sni: Option<String>,
    /// Whether connections use TLS (to every endpoint, or to those the
    /// socket matches select).
    pub tls: bool,
    /// Whether plaintext is used for endpoints without `tlsMode: istio`.
    pub permissive: bool,
    /// The exact SANs the server must present (Istio's SPIFFE ids); the
    /// full conditions are in `upstream_tls`'s `san_matchers`.
    pub expected_sans: Vec<String>,
    /// ALPN offered on TLS.
    pub alpn: Vec<String>,
    /// The TLS socket: the cluster's own, else the first TLS socket match.
    pub upstream_tls: Option<UpstreamTls>,
    /// `transport_socket_matches` in order (empty when there are none).
    pub socket_matches: Vec<SocketMatch>,
    /// `auto_sni`: SNI from the request's Host (DNS clusters).
    pub auto_sni: bool,
    /// `auto_san_validation`: verify the server against the Host.
    pub auto_san_validation: bool,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Load-balancing policy (`ROUND_ROBIN`, `LEAST_REQUEST`, …).
    pub lb_policy: String,
    /// Whether locality weights are used (`locality_weighted_lb_config`).
    pub locality_weighted_lb: bool,
    /// Overprovisioning factor in percent (Envoy's default 140).
    pub overprovisioning_factor: u32,
    /// Connect timeout (Envoy's default 5 s).
    pub connect_timeout: Duration,
    /// The upstream HTTP protocol.
    pub upstream_protocol: UpstreamProtocol,
    /// Circuit-breaker thresholds of the default priority:
    /// (max connections, max pending, max requests, max retries).
    pub circuit_breakers: Option<(u32, u32, u32, u32)>,
    /// Envoy's `healthy_panic_threshold` in percent (default 50; Istio
    /// writes 0 with outlier detection, which disables panic mode).
    pub healthy_panic_threshold: f64,
    /// Ring hash sizes: (minimum, maximum) points (Envoy: 1024, 8 Mi).
    pub ring_size: (u64, u64),
    /// Maglev table size (Envoy: 65537, a prime).
    pub maglev_table_size: u64,
    /// The retry budget of the default priority, when set: (percent of the
    /// active requests that may be retries, default 20; minimum retry
    /// concurrency, default 3). It replaces `max retries`.
    pub retry_budget: Option<(f64, u32)>,
    /// Outlier detection, when configured.
    pub outlier_detection: Option<OutlierSettings>,
    /// Slow start of new endpoints (round robin and least request; Istio's
    /// `warmupDurationSecs` / `warmup`), when configured.
    pub slow_start: Option<SlowStart>,
    /// Least request's `(choice_count, active_request_bias)` (Envoy's
    /// defaults 2 and 1.0).
    pub least_request: (u32, f64),
    /// The services istiod names in the cluster's metadata
    /// (`filter_metadata.istio.services`), in order; empty when it names
    /// none. Istio's stats filter takes `destination_service` from the
    /// first.
    pub services: Arc<[IstioService]>,
}

/// One entry of a cluster's `filter_metadata.istio.services`: a service
/// the cluster's endpoints belong to (`inbound|8080||` names the services
/// selecting the local workload, `outbound|80||h` the service `h`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IstioService {
    /// `catalog.demo.svc.cluster.local`.
    pub host: String,
    /// `catalog`.
    pub name: String,
    /// `demo`.
    pub namespace: String,
}

/// `filter_metadata.istio.services` of a cluster: entries that are not
/// structs, and fields that are not strings, are skipped.
fn istio_services(c: &Cluster) -> Arc<[IstioService]> {
    let Some(Kind::ListValue(list)) = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|s| s.fields.get("services"))
        .and_then(|v| v.kind.as_ref())
    else {
        return Arc::from([]);
    };
    list.values
        .iter()
        .filter_map(|v| match v.kind.as_ref() {
            Some(Kind::StructValue(s)) => {
                let text = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
                    Some(Kind::StringValue(t)) => t.clone(),
                    _ => String::new(),
                };
                Some(IstioService {
                    host: text("host"),
                    name: text("name"),
                    namespace: text("namespace"),
                })
            }
            _ => None,
        })
        .collect()
}

/// Envoy's `slow_start_config`: an endpoint added less than `window` ago
/// takes `weight × max(min_weight_percent / 100, (age / window)^(1 /
/// aggression))` of its share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    /// How long a new endpoint ramps up.
    pub window: Duration,
    /// The ramp's curve (Envoy's default 1.0: linear).
    pub aggression: f64,
    /// The least share a new endpoint takes, in percent (default 10).
    pub min_weight_percent: f64,
}

impl SlowStart {
    /// The share of its weight an endpoint of this age takes (1.0 once out
    /// of the window).
    pub fn factor(&self, age: Duration) -> f64 {
        if self.window.is_zero() || age >= self.window {
            return 1.0;
        }
        // Envoy counts at least 1 ms of age.
        let t = age.as_secs_f64().max(0.001) / self.window.as_secs_f64();
        let ramp = if self.aggression == 1.0 || self.aggression <= 0.0 {
            t
        } else {
            t.powf(1.0 / self.aggression)
        };
        ramp.max(self.min_weight_percent / 100.0).min(1.0)
    }
}

impl ClusterInfo {
    /// The TLS to use toward an endpoint: the first socket match its
    /// `tlsMode` selects (Envoy's `transport_socket_matches`), else the
    /// cluster's own socket. `None`: plaintext.
    pub fn tls_for(&self, e: &Endpoint) -> Option<&UpstreamTls> {
        if self.socket_matches.is_empty() {
            return self.upstream_tls.as_ref();
        }
        match self
            .socket_matches
            .iter()
            .find(|m| m.tls_mode.is_none() || m.tls_mode == e.tls_mode)
        {
            Some(m) => m.tls.as_ref(),
            None => self.upstream_tls.as_ref(),
        }
    }
}

/// Outlier detection of a cluster (Envoy's defaults where unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive 5xx before ejection (default 5).
    pub consecutive_5xx: u32,
    /// Percent of 5xx ejections enforced (default 100; Istio writes 0 for
    /// `consecutive5xxErrors: 0`, which disables it).
    pub enforcing_consecutive_5xx: u32,
    /// Consecutive gateway failures before ejection (default 5).
    pub consecutive_gateway_failure: u32,
    /// Percent of gateway-failure ejections enforced (default 0: off).
    pub enforcing_consecutive_gateway_failure: u32,
    /// Percent of success-rate ejections enforced (default 100; Istio
    /// writes 0).
    pub enforcing_success_rate: u32,
    /// Hosts with enough requests an interval needs for success-rate
    /// ejection (default 5).
    pub success_rate_minimum_hosts: u32,
    /// Requests a host needs in an interval to take part (default 100).
    pub success_rate_request_volume: u32,
    /// Ejected below `mean − stdev × factor / 1000` (default 1900).
    pub success_rate_stdev_factor: u32,
    /// Percent of local-origin success-rate ejections enforced when errors
    /// are split (default 100).
    pub enforcing_local_origin_success_rate: u32,
    /// Failure percentage at which a host is ejected (default 85).
    pub failure_percentage_threshold: u32,
    /// Percent of failure-percentage ejections enforced (default 0: off).
    pub enforcing_failure_percentage: u32,
    /// The same for local-origin failures when split (default 0).
    pub enforcing_failure_percentage_local_origin: u32,
    /// Hosts with enough requests needed (default 5).
    pub failure_percentage_minimum_hosts: u32,
    /// Requests a host needs in an interval to take part (default 50).
    pub failure_percentage_request_volume: u32,
    /// Whether local-origin errors are counted apart.
    pub split_external_local_origin_errors: bool,
    /// Consecutive local-origin failures before ejection (default 5).
    pub consecutive_local_origin_failure: u32,
    /// Percent enforced (default 100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// Analysis interval (default 10 s).
    pub interval: Duration,
    /// Base ejection time (default 30 s).
    pub base_ejection_time: Duration,
    /// Longest ejection (default 300 s).
    pub max_ejection_time: Duration,
    /// Most hosts ejected at once, in percent (default 10).
    pub max_ejection_percent: u32,
}

impl OutlierSettings {
    /// Whether consecutive 5xx eject a host at all.
    pub fn ejects_on_5xx(&self) -> bool {
        self.consecutive_5xx > 0 && self.enforcing_consecutive_5xx > 0
    }

    /// Whether consecutive gateway failures eject a host at all.
    pub fn ejects_on_gateway_failure(&self) -> bool {
        self.consecutive_gateway_failure > 0 && self.enforcing_consecutive_gateway_failure > 0
    }
}

fn upstream_ctx(ts: &Option<TransportSocket>) -> Option<UpstreamTlsContext> {
    match ts.as_ref()?.config_type.as_ref()? {
        transport_socket::ConfigType::TypedConfig(any) => any_is(any, TLS_CONTEXT_UPSTREAM),
    }
}

fn data_source(d: &DataSource) -> Option<TrustedCa> {
    match d.specifier.as_ref()? {
        DataSpecifier::Filename(f) => Some(TrustedCa::File(f.clone())),
        DataSpecifier::InlineString(s) => Some(TrustedCa::Inline(s.clone())),
        DataSpecifier::InlineBytes(b) => {
            Some(TrustedCa::Inline(String::from_utf8_lossy(b).into_owned()))
        }
        DataSpecifier::EnvironmentVariable(_) => None,
    }
}

fn validation(common: &CommonTlsContext) -> (Option<CertificateValidationContext>, Option<String>) {
    match common.validation_context_type.as_ref() {
        Some(ValidationContextType::CombinedValidationContext(c)) => (
            c.default_validation_context.clone(),
            c.validation_context_sds_secret_config
                .as_ref()
                .map(|s| s.name.clone()),
        ),
        Some(ValidationContextType::ValidationContext(v)) => (Some(v.clone()), None),
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            (None, Some(s.name.clone()))
        }
        _ => (None, None),
    }
}

fn san_matchers(v: &CertificateValidationContext) -> Vec<SanMatcher> {
    let mut out = Vec::new();
    #[allow(deprecated)]
    for m in &v.match_subject_alt_names {
        if let Ok(matcher) = crate::route::string_match(m) {
            out.push(SanMatcher {
                san_type: SanType::Any,
                matcher,
            });
        }
    }
    for t in &v.match_typed_subject_alt_names {
        let Some(m) = t.matcher.as_ref() else {
            continue;
        };
        let san_type = match t.san_type {
            1 => SanType::Email,
            2 => SanType::Dns,
            3 => SanType::Uri,
            4 => SanType::IpAddress,
            5 => SanType::OtherName,
            _ => SanType::Any,
        };
        if let Ok(matcher) = crate::route::string_match(m) {
            out.push(SanMatcher { san_type, matcher });
        }
    }
    out
}

fn typed_tls(ctx: &UpstreamTlsContext) -> UpstreamTls {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let (v, sds) = validation(&common);
    let trusted_ca = match (&v, sds) {
        (_, Some(name)) => TrustedCa::Sds(name),
        (Some(v), None) if v.system_root_certs.is_some() => TrustedCa::System,
        (Some(v), None) => v
            .trusted_ca
            .as_ref()
            .and_then(data_source)
            .unwrap_or(TrustedCa::Unverified),
        (None, None) => TrustedCa::Unverified,
    };
    let client_certificate = if let Some(s) = common.tls_certificate_sds_secret_configs.first() {
        ClientCertificate::Sds(s.name.clone())
    } else if let Some(c) = common.tls_certificates.first() {
        let file = |d: &Option<DataSource>| match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(DataSpecifier::Filename(f)) => Some(f.clone()),
            _ => None,
        };
        match (file(&c.certificate_chain), file(&c.private_key)) {
            (Some(cert), Some(key)) => ClientCertificate::File { cert, key },
            _ => ClientCertificate::Other,
        }
    } else if common.tls_certificate_provider_instance.is_some() {
        ClientCertificate::Other
    } else {
        ClientCertificate::None
    };
    // Istio's mTLS: the agent's SDS secrets `default` and `ROOTCA`, or the
    // classic mounted `/etc/certs` files.
    let istio = match &client_certificate {
        ClientCertificate::Sds(n) => n == "default",
        ClientCertificate::File { cert, .. } => cert.starts_with("/etc/certs/"),
        _ => false,
    };
    let mode = match client_certificate {
        ClientCertificate::None => TlsMode::Simple,
        _ if istio => TlsMode::IstioMutual,
        _ => TlsMode::Mutual,
    };
    UpstreamTls {
        mode,
        sni: (!ctx.sni.is_empty()).then(|| ctx.sni.clone()),
        alpn: common.alpn_protocols.clone(),
        san_matchers: v.as_ref().map(san_matchers).unwrap_or_default(),
        trusted_ca,
        client_certificate,
    }
}

fn exact_sans(t: &UpstreamTls) -> Vec<String> {
    t.san_matchers
        .iter()
        .filter_map(|m| match &m.matcher {
            StringMatch::Exact {
                value,
                ignore_case: false,
            } => Some(value.clone()),
            _ => None,
        })
        .collect()
}

fn http_options(c: &Cluster) -> Option<HttpProtocolOptions> {
    let any = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)?;
    any_is::<HttpProtocolOptions>(any, HTTP_PROTOCOL_OPTIONS_URL)
}

/// `auto_sni` and `auto_san_validation`, from the HTTP protocol options or
/// the cluster's deprecated field.
fn auto_sni(c: &Cluster, http: &Option<HttpProtocolOptions>) -> (bool, bool) {
    #[allow(deprecated)]
    let legacy = c.upstream_http_protocol_options.as_ref();
    http.as_ref()
        .and_then(|o| o.upstream_http_protocol_options.as_ref())
        .or(legacy)
        .map(|o| (o.auto_sni, o.auto_san_validation))
        .unwrap_or((false, false))
}

fn upstream_protocol(c: &Cluster, http: &Option<HttpProtocolOptions>) -> UpstreamProtocol {
    {
        if let Some(o) = http.clone() {
            return match o.upstream_protocol_options {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => UpstreamProtocol::Http3,
                    _ => UpstreamProtocol::Http1,
                },
                Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
                    UpstreamProtocol::UseDownstream
                }
                Some(UpstreamProtocolOptions::AutoConfig(_)) => UpstreamProtocol::Auto,
                None => UpstreamProtocol::Http1,
            };
        }
    }
    #[allow(deprecated)]
    if c.http2_protocol_options.is_some() {
        return UpstreamProtocol::Http2;
    }
    UpstreamProtocol::Http1
}

fn dur(d: &Option<envoy_types::pb::google::protobuf::Duration>, default: Duration) -> Duration {
    d.as_ref()
        .and_then(|d| crate::route::duration(d).ok())
        .unwrap_or(default)
}

pub(crate) fn cluster_info(c: &Cluster, cla: Option<&ClusterLoadAssignment>) -> ClusterInfo {
    let socket_matches: Vec<SocketMatch> = c
        .transport_socket_matches
        .iter()
        .map(|m| SocketMatch {
            name: m.name.clone(),
            tls_mode: m
                .r#match
                .as_ref()
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match v.kind.as_ref() {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                }),
            tls: upstream_ctx(&m.transport_socket).map(|t| typed_tls(&t)),
        })
        .collect();
    let upstream_tls = upstream_ctx(&c.transport_socket)
        .map(|t| typed_tls(&t))
        .or_else(|| socket_matches.iter().find_map(|m| m.tls.clone()));
    // Istio's auto-mTLS: a TLS socket for endpoints labelled tlsMode=istio,
    // plaintext for the rest.
    let permissive = c.transport_socket.is_none()
        && socket_matches.iter().any(|m| m.tls.is_some())
        && socket_matches.iter().any(|m| m.tls.is_none());
    let cla = cla.or(c.load_assignment.as_ref());
    let mut endpoints = Vec::new();
    for group in cla.map(|a| a.endpoints.as_slice()).unwrap_or_default() {
        let locality = group
            .locality
            .as_ref()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .unwrap_or_default();
        let locality_weight = group.load_balancing_weight.as_ref().map(|w| w.value);
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
            let tls_mode = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match v.kind.as_ref() {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            let health = HealthStatus::from_proto(lb.health_status);
            endpoints.push(Endpoint {
                address,
                weight: lb
                    .load_balancing_weight
                    .as_ref()
                    .map(|w| w.value)
                    .unwrap_or(1),
                locality: locality.clone(),
                locality_weight,
                priority: group.priority,
                healthy: matches!(health, HealthStatus::Unknown | HealthStatus::Healthy),
                health,
                istio_mtls: tls_mode.as_deref() == Some("istio"),
                tls_mode,
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
    let retry_budget = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first())
        .and_then(|t| t.retry_budget.as_ref())
        .map(|b| {
            (
                b.budget_percent.as_ref().map_or(20.0, |p| p.value),
                b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
            )
        });
    let healthy_panic_threshold = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(50.0, |p| p.value.clamp(0.0, 100.0));
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbConfig;
    let (ring_size, maglev_table_size) = match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(r)) => (
            (
                r.minimum_ring_size
                    .as_ref()
                    .map_or(1024, |v| v.value)
                    .max(1),
                r.maximum_ring_size
                    .as_ref()
                    .map_or(8 * 1024 * 1024, |v| v.value)
                    .clamp(1, 8 * 1024 * 1024),
            ),
            65537,
        ),
        Some(LbConfig::MaglevLbConfig(m)) => (
            (1024, 8 * 1024 * 1024),
            m.table_size
                .as_ref()
                .map_or(65537, |v| v.value)
                .clamp(2, 5_000_011),
        ),
        _ => ((1024, 8 * 1024 * 1024), 65537),
    };
    let least_request = match &c.lb_config {
        Some(LbConfig::LeastRequestLbConfig(l)) => (
            l.choice_count.as_ref().map_or(2, |v| v.value.max(2)),
            l.active_request_bias
                .as_ref()
                .map_or(1.0, |b| b.default_value.max(0.0)),
        ),
        _ => (2, 1.0),
    };
    let slow_start = match &c.lb_config {
        Some(LbConfig::RoundRobinLbConfig(r)) => r.slow_start_config.as_ref(),
        Some(LbConfig::LeastRequestLbConfig(l)) => l.slow_start_config.as_ref(),
        _ => None,
    }
    .and_then(|s| {
        let window = dur(&s.slow_start_window, Duration::ZERO);
        (!window.is_zero()).then(|| SlowStart {
            window,
            aggression: s.aggression.as_ref().map_or(1.0, |a| a.default_value),
            min_weight_percent: s
                .min_weight_percent
                .as_ref()
                .map_or(10.0, |p| p.value.clamp(0.0, 100.0)),
        })
    });
    let http = http_options(c);
    let (auto_sni, auto_san_validation) = auto_sni(c, &http);
    ClusterInfo {
        name: c.name.clone(),
        services: istio_services(c),
        sni: upstream_tls.as_ref().and_then(|t| t.sni.clone()),
        tls: upstream_tls.is_some(),
        permissive,
        expected_sans: upstream_tls.as_ref().map(exact_sans).unwrap_or_default(),
        alpn: upstream_tls
            .as_ref()
            .map(|t| t.alpn.clone())
            .unwrap_or_default(),
        upstream_tls,
        socket_matches,
        auto_sni,
        auto_san_validation,
        endpoints,
        lb_policy: LbPolicy::try_from(c.lb_policy)
            .map(|p| p.as_str_name().to_string())
            .unwrap_or_default(),
        locality_weighted_lb: matches!(
            c.common_lb_config
                .as_ref()
                .and_then(|l| l.locality_config_specifier.as_ref()),
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        ),
        overprovisioning_factor: cla
            .and_then(|a| a.policy.as_ref())
            .and_then(|p| p.overprovisioning_factor.as_ref())
            .map(|f| f.value)
            .unwrap_or(DEFAULT_OVERPROVISIONING_FACTOR),
        connect_timeout: dur(&c.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
        upstream_protocol: upstream_protocol(c, &http),
        circuit_breakers,
        healthy_panic_threshold,
        ring_size,
        maglev_table_size,
        retry_budget,
        outlier_detection: c.outlier_detection.as_ref().map(|o| {
            let u = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
                w.as_ref().map(|w| w.value).unwrap_or(d)
            };
            OutlierSettings {
                consecutive_5xx: u(&o.consecutive_5xx, 5),
                enforcing_consecutive_5xx: u(&o.enforcing_consecutive_5xx, 100),
                consecutive_gateway_failure: u(&o.consecutive_gateway_failure, 5),
                enforcing_consecutive_gateway_failure: u(
                    &o.enforcing_consecutive_gateway_failure,
                    0,
                ),
                enforcing_success_rate: u(&o.enforcing_success_rate, 100),
                success_rate_minimum_hosts: u(&o.success_rate_minimum_hosts, 5),
                success_rate_request_volume: u(&o.success_rate_request_volume, 100),
                success_rate_stdev_factor: u(&o.success_rate_stdev_factor, 1900),
                enforcing_local_origin_success_rate: u(&o.enforcing_local_origin_success_rate, 100),
                failure_percentage_threshold: u(&o.failure_percentage_threshold, 85),
                enforcing_failure_percentage: u(&o.enforcing_failure_percentage, 0),
                enforcing_failure_percentage_local_origin: u(
                    &o.enforcing_failure_percentage_local_origin,
                    0,
                ),
                failure_percentage_minimum_hosts: u(&o.failure_percentage_minimum_hosts, 5),
                failure_percentage_request_volume: u(&o.failure_percentage_request_volume, 50),
                split_external_local_origin_errors: o.split_external_local_origin_errors,
                consecutive_local_origin_failure: u(&o.consecutive_local_origin_failure, 5),
                enforcing_consecutive_local_origin_failure: u(
                    &o.enforcing_consecutive_local_origin_failure,
                    100,
                ),
                interval: dur(&o.interval, Duration::from_secs(10)),
                base_ejection_time: dur(&o.base_ejection_time, Duration::from_secs(30)),
                max_ejection_time: dur(&o.max_ejection_time, Duration::from_secs(300)),
                max_ejection_percent: u(&o.max_ejection_percent, 10),
            }
        }),
        slow_start,
        least_request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sans_ignore_other_matchers_but_keep_them_typed() {
        let t = UpstreamTls {
            mode: TlsMode::Simple,
            sni: None,
            alpn: Vec::new(),
            san_matchers: vec![
                SanMatcher {
                    san_type: SanType::Dns,
                    matcher: StringMatch::Suffix {
                        value: ".example.com".into(),
                        ignore_case: false,
                    },
                },
                SanMatcher {
                    san_type: SanType::Uri,
                    matcher: StringMatch::Exact {
                        value: "spiffe://td/ns/a/sa/b".into(),
                        ignore_case: false,
                    },
                },
            ],
            trusted_ca: TrustedCa::System,
            client_certificate: ClientCertificate::None,
        };
        assert_eq!(exact_sans(&t), vec!["spiffe://td/ns/a/sa/b".to_string()]);
    }
}
