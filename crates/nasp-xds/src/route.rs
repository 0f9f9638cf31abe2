//! HTTP route tables, typed: what a request is matched against and what the
//! matched route tells the transport to do.
//!
//! Every route configuration is converted from its xDS form once, when an
//! update is accepted: matchers become enums with their regexes compiled,
//! durations become [`Duration`]s with Envoy's defaults applied, retry
//! conditions become a typed set. Nothing here is a string that has to be
//! parsed again per request. A route configuration Envoy would reject (a
//! regex that does not compile, a weighted cluster without weights) fails
//! the conversion, so the client NACKs it and keeps the last good one.
//!
//! Matching follows Envoy: virtual hosts by domain (exact, then suffix
//! wildcards longest first, then prefix wildcards longest first, then `*`;
//! a wildcard never matches an empty remainder), then the virtual host's
//! routes in order, the first whose matcher holds winning.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as DataSpecifier;
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::query_parameter_matcher::QueryParameterMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::redirect_action::{
    PathRewriteSpecifier, SchemeRewriteSpecifier,
};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use envoy_types::pb::envoy::config::route::v3::route_action::{
    ClusterSpecifier, HostRewriteSpecifier,
};
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use regex::Regex;

use crate::XdsError;

/// Envoy's route timeout when a route sets none.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's retry back-off base interval when a policy sets none.
pub const DEFAULT_RETRY_BASE_INTERVAL: Duration = Duration::from_millis(25);

const HTTP_FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Compiled regexes are capped, as RE2's program size is in Envoy.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A route configuration (RDS resource), ready for per-request matching.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// The resource name (`"80"`, `"echo.demo.svc.cluster.local:80"`, …).
    pub name: String,
    /// Virtual hosts in configuration order.
    pub virtual_hosts: Vec<Arc<VirtualHost>>,
    /// Header changes every route of the configuration applies (applied
    /// after the virtual host's and the route's, as Envoy does by default).
    pub headers: HeaderMutations,
    domains: DomainIndex,
}

/// A virtual host: the domains it serves and its ordered routes.
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// Its name (`echo.demo.svc.cluster.local:80`, `allow_any`, …).
    pub name: String,
    /// Domains, lower case.
    pub domains: Vec<String>,
    /// Routes in order; the first that matches a request wins.
    pub routes: Vec<Route>,
    /// Retry policy for routes that set none.
    pub retry_policy: Option<RetryPolicy>,
    /// Header changes of the virtual host.
    pub headers: HeaderMutations,
    /// Fault injection configured on the virtual host.
    pub fault: Option<Fault>,
    /// Send `x-envoy-attempt-count` upstream (Istio sets it on every
    /// virtual host).
    pub include_request_attempt_count: bool,
}

/// One route.
#[derive(Clone, Debug)]
pub struct Route {
    /// The route's name (Istio: `default`, `allow_any`, `block_all`, …).
    pub name: String,
    /// What a request must look like.
    pub matcher: RouteMatch,
    /// What happens to a matching request.
    pub action: RouteAction,
    /// Header changes of the route.
    pub headers: HeaderMutations,
    /// Fault injection of the route (overrides the virtual host's).
    pub fault: Option<Fault>,
}

/// A route's request matcher.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// The path condition.
    pub path: PathMatch,
    /// Whether `Prefix`, `Path` and `PathSeparatedPrefix` compare case
    /// sensitively (Envoy's default: yes). Regexes decide for themselves.
    pub case_sensitive: bool,
    /// Header conditions, all of which must hold.
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions, all of which must hold.
    pub query_parameters: Vec<QueryMatch>,
    /// Only gRPC requests (`content-type: application/grpc…`).
    pub grpc: bool,
}

/// The path condition of a route.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// The path starts with this.
    Prefix(String),
    /// The path without its query is exactly this.
    Path(String),
    /// The path without its query is this prefix, or continues after it
    /// with `/`.
    PathSeparatedPrefix(String),
    /// The path without its query matches this regex as a whole.
    Regex(Regex),
    /// A matcher nasp does not implement (CONNECT, path templates): never
    /// matches, so the next route is tried.
    Unsupported(&'static str),
}

/// A header condition.
#[derive(Clone, Debug)]
pub struct HeaderMatch {
    /// Header name, lower case.
    pub name: String,
    /// The condition on its value.
    pub value: HeaderValueMatch,
    /// Negates the result.
    pub invert: bool,
    /// A missing header is matched as an empty value.
    pub treat_missing_as_empty: bool,
}

/// A condition on a header's value.
#[derive(Clone, Debug)]
pub enum HeaderValueMatch {
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
    /// A string condition.
    String(StringMatch),
    /// The value is an integer in `[start, end)`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// A query parameter condition.
#[derive(Clone, Debug)]
pub struct QueryMatch {
    /// The parameter name.
    pub name: String,
    /// The condition: `None` means "present".
    pub value: Option<StringMatch>,
}

/// Envoy's `StringMatcher`.
#[derive(Clone, Debug)]
pub enum StringMatch {
    /// Equal.
    Exact {
        /// The value.
        value: String,
        /// ASCII case-insensitive.
        ignore_case: bool,
    },
    /// Starts with.
    Prefix {
        /// The value.
        value: String,
        /// ASCII case-insensitive.
        ignore_case: bool,
    },
    /// Ends with.
    Suffix {
        /// The value.
        value: String,
        /// ASCII case-insensitive.
        ignore_case: bool,
    },
    /// Contains.
    Contains {
        /// The value.
        value: String,
        /// ASCII case-insensitive.
        ignore_case: bool,
    },
    /// Matches the regex as a whole.
    Regex(Regex),
}

/// What a matched route does.
#[derive(Clone, Debug)]
pub enum RouteAction {
    /// Forward upstream.
    Forward(Box<Forward>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly (Istio's REGISTRY_ONLY `block_all` is a 502).
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body, when inline.
        body: Option<Arc<[u8]>>,
    },
    /// An action nasp does not implement (filter or non-forwarding
    /// actions): answered as Envoy answers a route without an action, 404.
    Unsupported(&'static str),
}

/// Forwarding to a cluster.
#[derive(Clone, Debug)]
pub struct Forward {
    /// Which cluster.
    pub target: ClusterTarget,
    /// Replaces the matched prefix (Prefix / PathSeparatedPrefix routes).
    pub prefix_rewrite: Option<String>,
    /// Regex substitution on the path (`pattern`, `substitution` with `\1`
    /// style groups as Envoy writes them, converted to the regex crate's).
    pub regex_rewrite: Option<(Regex, String)>,
    /// How the Host header is rewritten.
    pub host_rewrite: HostRewrite,
    /// Whole-request timeout: `None` when disabled (`0s`); Envoy's 15 s
    /// when the route sets none.
    pub timeout: Option<Duration>,
    /// Idle timeout of the stream, if set.
    pub idle_timeout: Option<Duration>,
    /// The route's retry policy, else the virtual host's.
    pub retry_policy: Option<RetryPolicy>,
    /// Hash inputs for ring hash / maglev, in order.
    pub hash_policy: Vec<HashPolicy>,
    /// Where requests are mirrored.
    pub mirrors: Vec<Mirror>,
    /// Stream duration limits.
    pub max_stream_duration: Option<MaxStreamDuration>,
}

/// The cluster a forwarding route sends to.
#[derive(Clone, Debug)]
pub enum ClusterTarget {
    /// A named cluster.
    Cluster(String),
    /// The cluster named by this request header (lower case).
    Header(String),
    /// A weighted pick.
    Weighted(Vec<WeightedCluster>),
}

/// One leg of a weighted route.
#[derive(Clone, Debug)]
pub struct WeightedCluster {
    /// Cluster name (empty when `cluster_header` is used).
    pub name: String,
    /// Or the cluster named by this header.
    pub cluster_header: Option<String>,
    /// Weight.
    pub weight: u32,
    /// Header changes of this leg.
    pub headers: HeaderMutations,
}

/// How the Host header is rewritten.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostRewrite {
    /// Kept.
    #[default]
    None,
    /// Set to this.
    Literal(String),
    /// Set to the upstream host's name (DNS clusters).
    Auto,
    /// Set to the value of this request header.
    Header(String),
}

/// A redirect answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Status: 301, 302, 303, 307 or 308.
    pub status: u16,
    /// `https` for `https_redirect`, else the scheme to set, if any.
    pub scheme: Option<String>,
    /// New host, if any.
    pub host: Option<String>,
    /// New port, if any.
    pub port: Option<u16>,
    /// New path, or new prefix in place of the matched one.
    pub path: RedirectPath,
    /// Drop the query string.
    pub strip_query: bool,
}

/// The path of a redirect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedirectPath {
    /// Kept.
    Keep,
    /// Replaced by this.
    Path(String),
    /// The matched prefix replaced by this.
    Prefix(String),
}

/// A retry policy (Envoy's defaults applied).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// The conditions, as parsed from `retry_on`.
    pub retry_on: RetryOn,
    /// Attempts after the first (default 1).
    pub num_retries: u32,
    /// Timeout of each attempt, if set.
    pub per_try_timeout: Option<Duration>,
    /// Idle timeout of each attempt, if set.
    pub per_try_idle_timeout: Option<Duration>,
    /// Status codes retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Back-off between attempts (default 25 ms base, 10× base max).
    pub back_off: RetryBackOff,
    /// Host predicates (Istio sets `envoy.retry_host_predicates.previous_hosts`:
    /// a retry goes to another host when one exists).
    pub host_predicates: Vec<HostPredicate>,
    /// How many times to pick a host the predicates accept.
    pub host_selection_retry_max_attempts: u32,
    /// Response header conditions that make a response retriable.
    pub retriable_headers: Vec<HeaderMatch>,
}

/// The retry conditions of `retry_on`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`.
    pub server_error: bool,
    /// `gateway-error` (502, 503, 504).
    pub gateway_error: bool,
    /// `reset`.
    pub reset: bool,
    /// `reset-before-request`.
    pub reset_before_request: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `envoy-ratelimited`.
    pub envoy_ratelimited: bool,
    /// `retriable-4xx` (409).
    pub retriable_4xx: bool,
    /// `refused-stream`.
    pub refused_stream: bool,
    /// `retriable-status-codes`.
    pub retriable_status_codes: bool,
    /// `retriable-headers`.
    pub retriable_headers: bool,
    /// `http3-post-connect-failure`.
    pub http3_post_connect_failure: bool,
    /// gRPC `cancelled`.
    pub grpc_cancelled: bool,
    /// gRPC `deadline-exceeded`.
    pub grpc_deadline_exceeded: bool,
    /// gRPC `internal`.
    pub grpc_internal: bool,
    /// gRPC `resource-exhausted`.
    pub grpc_resource_exhausted: bool,
    /// gRPC `unavailable`.
    pub grpc_unavailable: bool,
    /// Conditions nasp does not know, kept for display.
    pub unknown: Vec<String>,
}

/// Retry back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackOff {
    /// Base interval.
    pub base: Duration,
    /// Largest interval.
    pub max: Duration,
}

/// A retry host predicate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPredicate {
    /// `envoy.retry_host_predicates.previous_hosts`.
    PreviousHosts,
    /// `envoy.retry_host_predicates.omit_canary_hosts`.
    OmitCanaryHosts,
    /// `envoy.retry_host_predicates.omit_host_metadata`.
    OmitHostMetadata,
    /// Another predicate, by name.
    Other(String),
}

/// A hash policy input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashPolicy {
    /// What is hashed.
    pub input: HashInput,
    /// Stop at this input when it produced a hash.
    pub terminal: bool,
}

/// What a hash policy hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashInput {
    /// A request header (lower case).
    Header(String),
    /// A cookie; with a TTL Envoy generates it when missing.
    Cookie {
        /// Cookie name.
        name: String,
        /// TTL of a generated cookie.
        ttl: Option<Duration>,
        /// Path of a generated cookie.
        path: String,
    },
    /// The downstream source IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
    /// A filter-state key.
    FilterState(String),
}

/// A mirror target.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    /// The cluster mirrored to.
    pub cluster: String,
    /// Share of requests mirrored, 0.0–1.0 (1.0 when unset).
    pub fraction: f64,
}

/// Stream duration limits of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxStreamDuration {
    /// Longest stream, if set.
    pub max_stream_duration: Option<Duration>,
    /// Cap on the `grpc-timeout` header (`Some(ZERO)`: no cap), if set.
    pub grpc_timeout_header_max: Option<Duration>,
    /// Subtracted from the `grpc-timeout` header, if set.
    pub grpc_timeout_header_offset: Option<Duration>,
}

/// Fault injection (Envoy's HTTP fault filter, per route or virtual host).
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// A fixed delay and the share of requests it applies to (0.0–1.0).
    pub delay: Option<(Duration, f64)>,
    /// An abort and the share of requests it applies to (0.0–1.0).
    pub abort: Option<(FaultAbort, f64)>,
}

/// How a fault aborts a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAbort {
    /// With this HTTP status.
    Http(u16),
    /// With this gRPC status.
    Grpc(u32),
    /// As the `x-envoy-fault-abort-request` header says.
    Header,
}

/// Header changes at one level (route config, virtual host, route, leg).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderMutations {
    /// Request headers to add or set.
    pub request_add: Vec<HeaderAdd>,
    /// Request headers to remove (lower case).
    pub request_remove: Vec<String>,
    /// Response headers to add or set.
    pub response_add: Vec<HeaderAdd>,
    /// Response headers to remove (lower case).
    pub response_remove: Vec<String>,
}

/// One header to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderAdd {
    /// Name, lower case.
    pub name: String,
    /// Value (Envoy's `%…%` formatters are kept as written).
    pub value: String,
    /// What to do when it is present.
    pub action: HeaderAppend,
    /// Add it even when the value is empty.
    pub keep_empty_value: bool,
}

/// Envoy's `HeaderAppendAction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderAppend {
    /// Append to an existing value, else add.
    AppendIfExistsOrAdd,
    /// Add only when absent.
    AddIfAbsent,
    /// Overwrite, or add when absent.
    OverwriteIfExistsOrAdd,
    /// Overwrite only when present.
    OverwriteIfExists,
}

/// Exact domains hashed, wildcard domains sorted for Envoy's precedence.
#[derive(Clone, Debug, Default)]
struct DomainIndex {
    exact: HashMap<String, usize>,
    /// `*.foo.com` → `.foo.com`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `foo.*` → `foo.`, longest first.
    prefixes: Vec<(String, usize)>,
    star: Option<usize>,
}

impl DomainIndex {
    fn new(vhosts: &[Arc<VirtualHost>]) -> Self {
        let mut ix = DomainIndex::default();
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                if d == "*" {
                    ix.star.get_or_insert(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    ix.suffixes.push((s.to_string(), i));
                } else if let Some(p) = d.strip_suffix('*') {
                    ix.prefixes.push((p.to_string(), i));
                } else {
                    ix.exact.entry(d.clone()).or_insert(i);
                }
            }
        }
        // Stable sorts: among equal lengths the first configured wins.
        ix.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        ix.prefixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        ix
    }

    /// The virtual host for `host` (bare) or `host:port`: exact names
    /// first (either form), then wildcards. A wildcard pattern with a port
    /// (`*.foo.com:80`) is held against `host:port`, one without against
    /// the bare host, so the port never stands in for the wildcard.
    fn find(&self, bare: &str, with_port: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(bare).or_else(|| self.exact.get(with_port)) {
            return Some(*i);
        }
        let candidate = |pattern: &str| {
            if pattern.contains(':') {
                with_port
            } else {
                bare
            }
        };
        // A wildcard stands for at least one character.
        for (s, i) in &self.suffixes {
            let c = candidate(s);
            if c.len() > s.len() && c.ends_with(s.as_str()) {
                return Some(*i);
            }
        }
        for (p, i) in &self.prefixes {
            let c = candidate(p);
            if c.len() > p.len() && c.starts_with(p.as_str()) {
                return Some(*i);
            }
        }
        self.star
    }
}

/// The request facts routing looks at. Header names are asked in lower
/// case; implement it over whatever header map the transport uses.
pub trait RequestHeaders {
    /// The value of a header (several values joined with `,`), if present.
    fn header(&self, name: &str) -> Option<&str>;
}

impl RequestHeaders for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl<const N: usize> RequestHeaders for [(&str, &str); N] {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl RequestHeaders for HashMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl RouteConfig {
    /// Converts an RDS resource (or an inline route configuration).
    pub fn from_proto(rc: &pb::RouteConfiguration) -> Result<Self, XdsError> {
        let bad = |message: String| XdsError::Resource {
            type_url: crate::types::ROUTE.to_string(),
            name: rc.name.clone(),
            message,
        };
        let virtual_hosts = rc
            .virtual_hosts
            .iter()
            .map(|vh| {
                virtual_host(vh)
                    .map(Arc::new)
                    .map_err(|e| bad(format!("virtual host {:?}: {e}", vh.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let headers = mutations(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
        );
        let domains = DomainIndex::new(&virtual_hosts);
        Ok(RouteConfig {
            name: rc.name.clone(),
            virtual_hosts,
            headers,
            domains,
        })
    }

    /// The virtual host serving `host` (lower case, no trailing dot) on
    /// `port`, by Envoy's domain precedence. An IPv6 address is looked up
    /// bracketed (`[fd00::10]`, `[fd00::10]:80`) as Istio writes it.
    pub fn virtual_host(&self, host: &str, port: u16) -> Option<&Arc<VirtualHost>> {
        use std::fmt::Write as _;
        let mut bare = String::new();
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => {
                let _ = write!(bare, "[{ip}]");
                bare.as_str()
            }
            _ => host,
        };
        // Istio lists every domain bare too, so the common lookup is one
        // hash probe without building `host:port`.
        if let Some(i) = self.domains.exact.get(host) {
            return self.virtual_hosts.get(*i);
        }
        let mut with_port = String::with_capacity(host.len() + 6);
        let _ = write!(with_port, "{host}:{port}");
        let i = self.domains.find(host, &with_port)?;
        self.virtual_hosts.get(i)
    }
}

impl VirtualHost {
    /// The first route that matches the request (`path` with its query
    /// string, as in `:path`).
    pub fn route<H: RequestHeaders + ?Sized>(&self, path: &str, headers: &H) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(path, headers))
    }

    /// Whether this is Istio's catch-all for destinations outside the mesh
    /// (`allow_any` to PassthroughCluster, `block_all` answering 502): a
    /// `*` host whose every route passes through or blocks.
    pub fn is_outside_mesh(&self) -> bool {
        self.domains.iter().any(|d| d == "*")
            && !self.routes.is_empty()
            && self.routes.iter().all(|r| match &r.action {
                RouteAction::Forward(f) => match &f.target {
                    ClusterTarget::Cluster(c) => crate::view::is_catch_all(c),
                    _ => false,
                },
                RouteAction::DirectResponse { .. } => true,
                _ => false,
            })
    }
}

impl RouteMatch {
    /// Whether a request matches.
    pub fn matches<H: RequestHeaders + ?Sized>(&self, path: &str, headers: &H) -> bool {
        let (bare, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, !self.case_sensitive),
            PathMatch::Path(p) => eq(bare, p, !self.case_sensitive),
            PathMatch::PathSeparatedPrefix(p) => {
                starts_with(bare, p, !self.case_sensitive)
                    && (bare.len() == p.len() || bare.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatch::Regex(re) => re.is_match(bare),
            PathMatch::Unsupported(_) => false,
        };
        if !path_ok {
            return false;
        }
        if self.grpc
            && !headers
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/grpc"))
        {
            return false;
        }
        if !self.headers.iter().all(|h| h.matches(headers)) {
            return false;
        }
        self.query_parameters.iter().all(|q| {
            let value = query.and_then(|qs| {
                qs.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == q.name).then_some(v)
                })
            });
            match (&q.value, value) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some(v)) => m.matches(v),
            }
        })
    }
}

impl HeaderMatch {
    /// Whether the request's headers satisfy this condition.
    pub fn matches<H: RequestHeaders + ?Sized>(&self, headers: &H) -> bool {
        let value = headers
            .header(&self.name)
            .or(self.treat_missing_as_empty.then_some(""));
        let hit = match (&self.value, value) {
            (HeaderValueMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => return false, // a missing header never matches, inverted or not
            (HeaderValueMatch::String(m), Some(v)) => m.matches(v),
            (HeaderValueMatch::Range { start, end }, Some(v)) => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
        };
        hit != self.invert
    }
}

impl StringMatch {
    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact { value, ignore_case } => eq(v, value, *ignore_case),
            StringMatch::Prefix { value, ignore_case } => starts_with(v, value, *ignore_case),
            StringMatch::Suffix { value, ignore_case } => {
                v.len() >= value.len()
                    && v.is_char_boundary(v.len() - value.len())
                    && eq(&v[v.len() - value.len()..], value, *ignore_case)
            }
            StringMatch::Contains { value, ignore_case } => {
                if *ignore_case {
                    v.as_bytes()
                        .windows(value.len().max(1))
                        .any(|w| w.eq_ignore_ascii_case(value.as_bytes()))
                        || value.is_empty()
                } else {
                    v.contains(value.as_str())
                }
            }
            StringMatch::Regex(re) => re.is_match(v),
        }
    }
}

impl ClusterTarget {
    /// The cluster for one request; `random` picks the weighted leg.
    pub fn pick<'a, H: RequestHeaders + ?Sized>(
        &'a self,
        headers: &'a H,
        random: u64,
    ) -> Option<&'a str> {
        match self {
            ClusterTarget::Cluster(c) => Some(c),
            ClusterTarget::Header(h) => headers.header(h).filter(|v| !v.is_empty()),
            ClusterTarget::Weighted(legs) => {
                let total: u64 = legs.iter().map(|l| u64::from(l.weight)).sum();
                if total == 0 {
                    return None;
                }
                let mut n = random % total;
                for l in legs {
                    if n < u64::from(l.weight) {
                        return match &l.cluster_header {
                            Some(h) => headers.header(h).filter(|v| !v.is_empty()),
                            None => Some(&l.name),
                        };
                    }
                    n -= u64::from(l.weight);
                }
                None
            }
        }
    }
}

fn eq(a: &str, b: &str, ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

fn starts_with(s: &str, p: &str, ignore_case: bool) -> bool {
    if ignore_case {
        s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
    } else {
        s.starts_with(p)
    }
}

/// Compiles an Envoy (RE2) regex to match a whole input.
fn compile(re: &RegexMatcher) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{})$", re.regex))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regex {:?}: {e}", re.regex))
}

/// Envoy's substitution syntax (`\1`) to the regex crate's (`${1}`).
fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '\\' if chars.peek() == Some(&'\\') => {
                chars.next();
                out.push('\\');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn string_match(m: &StringMatcher) -> Result<StringMatch, String> {
    let ignore_case = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatch::Exact {
            value: v.clone(),
            ignore_case,
        },
        Some(MatchPattern::Prefix(v)) => StringMatch::Prefix {
            value: v.clone(),
            ignore_case,
        },
        Some(MatchPattern::Suffix(v)) => StringMatch::Suffix {
            value: v.clone(),
            ignore_case,
        },
        Some(MatchPattern::Contains(v)) => StringMatch::Contains {
            value: v.clone(),
            ignore_case,
        },
        Some(MatchPattern::SafeRegex(re)) => StringMatch::Regex(compile(re)?),
        Some(MatchPattern::Custom(_)) => return Err("custom string matchers".into()),
        None => return Err("a string matcher without a pattern".into()),
    })
}

/// A protobuf duration; negative ones are rejected by Envoy's validation.
pub(crate) fn duration(
    d: &envoy_types::pb::google::protobuf::Duration,
) -> Result<Duration, String> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(format!("invalid duration {}s {}ns", d.seconds, d.nanos));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn opt_duration(
    d: &Option<envoy_types::pb::google::protobuf::Duration>,
) -> Result<Option<Duration>, String> {
    d.as_ref().map(duration).transpose()
}

fn fraction(p: &Option<FractionalPercent>) -> f64 {
    let Some(p) = p else { return 1.0 };
    let denominator = match p.denominator {
        1 => 10_000.0,
        2 => 1_000_000.0,
        _ => 100.0,
    };
    (f64::from(p.numerator) / denominator).min(1.0)
}

fn header_adds(v: &[HeaderValueOption]) -> Vec<HeaderAdd> {
    v.iter()
        .filter_map(|o| {
            let h = o.header.as_ref()?;
            let value = if h.value.is_empty() && !h.raw_value.is_empty() {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            } else {
                h.value.clone()
            };
            #[allow(deprecated)]
            let action = match (&o.append, o.append_action) {
                // The deprecated `append` wins when set, as in Envoy.
                (Some(a), _) if !a.value => HeaderAppend::OverwriteIfExistsOrAdd,
                (Some(_), _) => HeaderAppend::AppendIfExistsOrAdd,
                (None, 1) => HeaderAppend::AddIfAbsent,
                (None, 2) => HeaderAppend::OverwriteIfExistsOrAdd,
                (None, 3) => HeaderAppend::OverwriteIfExists,
                (None, _) => HeaderAppend::AppendIfExistsOrAdd,
            };
            Some(HeaderAdd {
                name: h.key.to_ascii_lowercase(),
                value,
                action,
                keep_empty_value: o.keep_empty_value,
            })
        })
        .collect()
}

fn lower(v: &[String]) -> Vec<String> {
    v.iter().map(|s| s.to_ascii_lowercase()).collect()
}

fn mutations(
    req_add: &[HeaderValueOption],
    req_remove: &[String],
    resp_add: &[HeaderValueOption],
    resp_remove: &[String],
) -> HeaderMutations {
    HeaderMutations {
        request_add: header_adds(req_add),
        request_remove: lower(req_remove),
        response_add: header_adds(resp_add),
        response_remove: lower(resp_remove),
    }
}

fn fault(config: &HashMap<String, Any>) -> Result<Option<Fault>, String> {
    let Some(any) = config.get(FAULT_FILTER) else {
        return Ok(None);
    };
    if any.type_url != HTTP_FAULT {
        return Ok(None);
    }
    let f = HttpFault::decode(any.value.as_slice()).map_err(|e| format!("fault filter: {e}"))?;
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    let delay = match f.delay.as_ref() {
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(x)) => {
                Some((duration(x)?, fraction(&d.percentage)))
            }
            _ => None,
        },
        None => None,
    };
    let abort = match f.abort.as_ref() {
        Some(a) => {
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(s)) => FaultAbort::Http(
                    u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| format!("fault abort status {s}"))?,
                ),
                Some(ErrorType::GrpcStatus(s)) => FaultAbort::Grpc(*s),
                Some(ErrorType::HeaderAbort(_)) => FaultAbort::Header,
                None => return Err("a fault abort without an error type".into()),
            };
            Some((kind, fraction(&a.percentage)))
        }
        None => None,
    };
    Ok((delay.is_some() || abort.is_some()).then_some(Fault { delay, abort }))
}

fn retry_on(s: &str) -> RetryOn {
    let mut r = RetryOn::default();
    for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match c {
            "5xx" => r.server_error = true,
            "gateway-error" => r.gateway_error = true,
            "reset" => r.reset = true,
            "reset-before-request" => r.reset_before_request = true,
            "connect-failure" => r.connect_failure = true,
            "envoy-ratelimited" => r.envoy_ratelimited = true,
            "retriable-4xx" => r.retriable_4xx = true,
            "refused-stream" => r.refused_stream = true,
            "retriable-status-codes" => r.retriable_status_codes = true,
            "retriable-headers" => r.retriable_headers = true,
            "http3-post-connect-failure" => r.http3_post_connect_failure = true,
            "cancelled" => r.grpc_cancelled = true,
            "deadline-exceeded" => r.grpc_deadline_exceeded = true,
            "internal" => r.grpc_internal = true,
            "resource-exhausted" => r.grpc_resource_exhausted = true,
            "unavailable" => r.grpc_unavailable = true,
            other => r.unknown.push(other.to_string()),
        }
    }
    r
}

impl RetryOn {
    /// The conditions as Envoy writes them (`connect-failure,refused-stream`).
    pub fn names(&self) -> Vec<&str> {
        let mut v = Vec::new();
        for (on, name) in [
            (self.server_error, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.reset_before_request, "reset-before-request"),
            (self.connect_failure, "connect-failure"),
            (self.envoy_ratelimited, "envoy-ratelimited"),
            (self.retriable_4xx, "retriable-4xx"),
            (self.refused_stream, "refused-stream"),
            (self.retriable_status_codes, "retriable-status-codes"),
            (self.retriable_headers, "retriable-headers"),
            (
                self.http3_post_connect_failure,
                "http3-post-connect-failure",
            ),
            (self.grpc_cancelled, "cancelled"),
            (self.grpc_deadline_exceeded, "deadline-exceeded"),
            (self.grpc_internal, "internal"),
            (self.grpc_resource_exhausted, "resource-exhausted"),
            (self.grpc_unavailable, "unavailable"),
        ] {
            if on {
                v.push(name);
            }
        }
        v.extend(self.unknown.iter().map(String::as_str));
        v
    }
}

fn retry_policy(p: &pb::RetryPolicy) -> Result<RetryPolicy, String> {
    let back_off = match p.retry_back_off.as_ref() {
        Some(b) => {
            let base =
                opt_duration(&b.base_interval)?.ok_or("retry_back_off without base_interval")?;
            if base.is_zero() {
                return Err("retry_back_off base_interval must be above 0".into());
            }
            let max = opt_duration(&b.max_interval)?.unwrap_or(base * 10);
            if max < base {
                return Err("retry_back_off max_interval below base_interval".into());
            }
            RetryBackOff { base, max }
        }
        None => RetryBackOff {
            base: DEFAULT_RETRY_BASE_INTERVAL,
            max: DEFAULT_RETRY_BASE_INTERVAL * 10,
        },
    };
    Ok(RetryPolicy {
        retry_on: retry_on(&p.retry_on),
        num_retries: p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
        per_try_timeout: opt_duration(&p.per_try_timeout)?,
        per_try_idle_timeout: opt_duration(&p.per_try_idle_timeout)?,
        retriable_status_codes: p
            .retriable_status_codes
            .iter()
            .map(|c| u16::try_from(*c).map_err(|_| format!("retriable status code {c}")))
            .collect::<Result<_, _>>()?,
        back_off,
        host_predicates: p
            .retry_host_predicate
            .iter()
            .map(|h| match h.name.as_str() {
                "envoy.retry_host_predicates.previous_hosts" => HostPredicate::PreviousHosts,
                "envoy.retry_host_predicates.omit_canary_hosts" => HostPredicate::OmitCanaryHosts,
                "envoy.retry_host_predicates.omit_host_metadata" => HostPredicate::OmitHostMetadata,
                other => HostPredicate::Other(other.to_string()),
            })
            .collect(),
        // Envoy: the default is 1 (one selection, no re-pick).
        host_selection_retry_max_attempts: u32::try_from(p.host_selection_retry_max_attempts)
            .unwrap_or(0)
            .max(1),
        retriable_headers: p
            .retriable_headers
            .iter()
            .map(header_match)
            .collect::<Result<_, _>>()?,
    })
}

fn header_match(h: &pb::HeaderMatcher) -> Result<HeaderMatch, String> {
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(v)) => HeaderValueMatch::String(StringMatch::Exact {
            value: v.clone(),
            ignore_case: false,
        }),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            HeaderValueMatch::String(StringMatch::Regex(compile(re)?))
        }
        Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderValueMatch::Range {
            start: r.start,
            end: r.end,
        },
        Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderValueMatch::Present(*p),
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => {
            HeaderValueMatch::String(StringMatch::Prefix {
                value: v.clone(),
                ignore_case: false,
            })
        }
        Some(HeaderMatchSpecifier::SuffixMatch(v)) => {
            HeaderValueMatch::String(StringMatch::Suffix {
                value: v.clone(),
                ignore_case: false,
            })
        }
        Some(HeaderMatchSpecifier::ContainsMatch(v)) => {
            HeaderValueMatch::String(StringMatch::Contains {
                value: v.clone(),
                ignore_case: false,
            })
        }
        Some(HeaderMatchSpecifier::StringMatch(m)) => HeaderValueMatch::String(string_match(m)?),
        // No specifier: Envoy checks presence.
        None => HeaderValueMatch::Present(true),
    };
    if h.name.is_empty() {
        return Err("a header matcher without a name".into());
    }
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn route_match(m: Option<&pb::RouteMatch>) -> Result<RouteMatch, String> {
    let Some(m) = m else {
        return Err("a route without a match".into());
    };
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Path(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(compile(re)?),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || p.ends_with('/') {
                return Err(format!("path_separated_prefix {p:?}"));
            }
            PathMatch::PathSeparatedPrefix(p.clone())
        }
        Some(PathSpecifier::ConnectMatcher(_)) => PathMatch::Unsupported("connect_matcher"),
        Some(PathSpecifier::PathMatchPolicy(_)) => PathMatch::Unsupported("path_match_policy"),
        None => return Err("a route match without a path specifier".into()),
    };
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers: m
            .headers
            .iter()
            .map(header_match)
            .collect::<Result<_, _>>()?,
        query_parameters: m
            .query_parameters
            .iter()
            .map(|q| {
                let value = match &q.query_parameter_match_specifier {
                    Some(QueryParameterMatchSpecifier::StringMatch(s)) => Some(string_match(s)?),
                    Some(QueryParameterMatchSpecifier::PresentMatch(_)) | None => None,
                };
                Ok::<_, String>(QueryMatch {
                    name: q.name.clone(),
                    value,
                })
            })
            .collect::<Result<_, _>>()?,
        grpc: m.grpc.is_some(),
    })
}

fn forward(a: &pb::RouteAction, vh_retry: &Option<RetryPolicy>) -> Result<Forward, String> {
    let target = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => ClusterTarget::Cluster(c.clone()),
        Some(ClusterSpecifier::ClusterHeader(h)) => ClusterTarget::Header(h.to_ascii_lowercase()),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let legs: Vec<WeightedCluster> = w
                .clusters
                .iter()
                .map(|c| WeightedCluster {
                    name: c.name.clone(),
                    cluster_header: (!c.cluster_header.is_empty())
                        .then(|| c.cluster_header.to_ascii_lowercase()),
                    weight: c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                    headers: mutations(
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    ),
                })
                .collect();
            if legs.iter().all(|l| l.weight == 0) {
                return Err("weighted clusters whose weights sum to 0".into());
            }
            ClusterTarget::Weighted(legs)
        }
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_))
        | Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
            // Invariant: `route` turns these into `Unsupported` first.
            return Err("cluster specifier plugins are not supported".into());
        }
        None => return Err("a route action without a cluster".into()),
    };
    let regex_rewrite = match &a.regex_rewrite {
        Some(r) => {
            let pattern = r
                .pattern
                .as_ref()
                .ok_or("regex_rewrite without a pattern")?;
            // A rewrite pattern is searched, not anchored.
            let re = regex::RegexBuilder::new(&pattern.regex)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("regex_rewrite {:?}: {e}", pattern.regex))?;
            Some((re, substitution(&r.substitution)))
        }
        None => None,
    };
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => HostRewrite::Literal(h.clone()),
        Some(HostRewriteSpecifier::AutoHostRewrite(b)) if b.value => HostRewrite::Auto,
        Some(HostRewriteSpecifier::HostRewriteHeader(h)) => {
            HostRewrite::Header(h.to_ascii_lowercase())
        }
        _ => HostRewrite::None,
    };
    // Envoy: unset → 15 s; 0 → disabled.
    let timeout = match opt_duration(&a.timeout)? {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    let retry_policy = match &a.retry_policy {
        Some(p) => Some(retry_policy(p)?),
        None => vh_retry.clone(),
    };
    Ok(Forward {
        target,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout: opt_duration(&a.idle_timeout)?,
        retry_policy,
        hash_policy: a
            .hash_policy
            .iter()
            .filter_map(|h| {
                let input = match h.policy_specifier.as_ref()? {
                    PolicySpecifier::Header(x) => {
                        HashInput::Header(x.header_name.to_ascii_lowercase())
                    }
                    PolicySpecifier::Cookie(c) => HashInput::Cookie {
                        name: c.name.clone(),
                        ttl: c.ttl.as_ref().and_then(|t| duration(t).ok()),
                        path: c.path.clone(),
                    },
                    PolicySpecifier::ConnectionProperties(p) if p.source_ip => HashInput::SourceIp,
                    PolicySpecifier::ConnectionProperties(_) => return None,
                    PolicySpecifier::QueryParameter(q) => HashInput::QueryParameter(q.name.clone()),
                    PolicySpecifier::FilterState(f) => HashInput::FilterState(f.key.clone()),
                };
                Some(HashPolicy {
                    input,
                    terminal: h.terminal,
                })
            })
            .collect(),
        mirrors: a
            .request_mirror_policies
            .iter()
            .filter(|m| !m.cluster.is_empty())
            .map(|m| Mirror {
                cluster: m.cluster.clone(),
                fraction: m
                    .runtime_fraction
                    .as_ref()
                    .map(|r| fraction(&r.default_value))
                    .unwrap_or(1.0),
            })
            .collect(),
        max_stream_duration: match &a.max_stream_duration {
            Some(m) => Some(MaxStreamDuration {
                max_stream_duration: opt_duration(&m.max_stream_duration)?,
                grpc_timeout_header_max: opt_duration(&m.grpc_timeout_header_max)?,
                grpc_timeout_header_offset: opt_duration(&m.grpc_timeout_header_offset)?,
            }),
            None => None,
        },
    })
}

fn redirect(r: &pb::RedirectAction) -> Result<Redirect, String> {
    let status = match r.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        other => return Err(format!("redirect response code {other}")),
    };
    Ok(Redirect {
        status,
        scheme: match &r.scheme_rewrite_specifier {
            Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
            Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if !s.is_empty() => {
                Some(s.to_ascii_lowercase())
            }
            _ => None,
        },
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port: match r.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("redirect port {p}"))?),
        },
        path: match &r.path_rewrite_specifier {
            Some(PathRewriteSpecifier::PathRedirect(p)) => RedirectPath::Path(p.clone()),
            Some(PathRewriteSpecifier::PrefixRewrite(p)) => RedirectPath::Prefix(p.clone()),
            _ => RedirectPath::Keep,
        },
        strip_query: r.strip_query,
    })
}

fn route(r: &pb::Route, vh_retry: &Option<RetryPolicy>) -> Result<Route, String> {
    let action = match &r.action {
        // Cluster specifier plugins are extensions nasp does not run: the
        // route stays (answered 404) rather than the whole table NACKed.
        Some(Action::Route(pb::RouteAction {
            cluster_specifier:
                Some(
                    ClusterSpecifier::ClusterSpecifierPlugin(_)
                    | ClusterSpecifier::InlineClusterSpecifierPlugin(_),
                ),
            ..
        })) => RouteAction::Unsupported("cluster_specifier_plugin"),
        Some(Action::Route(a)) => RouteAction::Forward(Box::new(forward(a, vh_retry)?)),
        Some(Action::Redirect(x)) => RouteAction::Redirect(redirect(x)?),
        Some(Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .ok_or_else(|| format!("direct response status {}", d.status))?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(DataSpecifier::InlineBytes(b)) => Some(Arc::from(b.as_slice())),
                Some(DataSpecifier::InlineString(s)) => Some(Arc::from(s.as_bytes())),
                _ => None,
            };
            RouteAction::DirectResponse { status, body }
        }
        Some(Action::FilterAction(_)) => RouteAction::Unsupported("filter_action"),
        Some(Action::NonForwardingAction(_)) => RouteAction::Unsupported("non_forwarding_action"),
        None => return Err("a route without an action".into()),
    };
    Ok(Route {
        name: r.name.clone(),
        matcher: route_match(r.r#match.as_ref())?,
        action,
        headers: mutations(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        ),
        fault: fault(&r.typed_per_filter_config)?,
    })
}

fn virtual_host(vh: &pb::VirtualHost) -> Result<VirtualHost, String> {
    let retry = vh.retry_policy.as_ref().map(retry_policy).transpose()?;
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(r, &retry).map_err(|e| format!("route {i} {:?}: {e}", r.name)))
        .collect::<Result<_, _>>()?;
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        retry_policy: retry,
        headers: mutations(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
        ),
        fault: fault(&vh.typed_per_filter_config)?,
        include_request_attempt_count: vh.include_request_attempt_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> pb::VirtualHost {
        pb::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(Action::Route(pb::RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(name.into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn table(hosts: Vec<pb::VirtualHost>) -> RouteConfig {
        RouteConfig::from_proto(&pb::RouteConfiguration {
            name: "80".into(),
            virtual_hosts: hosts,
            ..Default::default()
        })
        .expect("valid")
    }

    fn pick(t: &RouteConfig, host: &str) -> Option<String> {
        t.virtual_host(host, 80).map(|v| v.name.clone())
    }

    #[test]
    fn domains_follow_envoys_precedence() {
        let t = table(vec![
            vh("prefix", &["api.*"]),
            vh("short-suffix", &["*.com"]),
            vh("long-suffix", &["*.example.com"]),
            vh("any", &["*"]),
            vh("exact", &["www.example.com"]),
        ]);
        assert_eq!(pick(&t, "www.example.com").as_deref(), Some("exact"));
        // Every suffix wildcard before any prefix wildcard, longest first.
        assert_eq!(pick(&t, "api.example.com").as_deref(), Some("long-suffix"));
        assert_eq!(pick(&t, "api.foo.com").as_deref(), Some("short-suffix"));
        assert_eq!(pick(&t, "api.internal").as_deref(), Some("prefix"));
        // A wildcard never stands for nothing.
        assert_eq!(pick(&t, ".example.com").as_deref(), Some("short-suffix"));
        assert_eq!(pick(&t, "api.").as_deref(), Some("any"));
        assert_eq!(pick(&t, "other").as_deref(), Some("any"));
    }

    #[test]
    fn ipv6_hosts_are_matched_bracketed() {
        let t = table(vec![
            vh("v6", &["[fd00::10]", "[fd00::10]:80"]),
            vh("v6-port-only", &["[fd00::20]:80"]),
        ]);
        assert_eq!(pick(&t, "fd00::10").as_deref(), Some("v6"));
        assert_eq!(pick(&t, "fd00:0::10").as_deref(), Some("v6"));
        assert_eq!(pick(&t, "fd00::20").as_deref(), Some("v6-port-only"));
        assert_eq!(pick(&t, "fd00::30"), None);
    }

    #[test]
    fn bad_regexes_and_zero_weights_are_rejected() {
        let mut bad = vh("x", &["x"]);
        bad.routes[0].r#match = Some(pb::RouteMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
        let e = RouteConfig::from_proto(&pb::RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![bad],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("regex") && e.contains("\"x\""), "{e}");
    }

    #[test]
    fn substitution_is_translated() {
        assert_eq!(substitution(r"/v2/\1/\12"), "/v2/${1}/${12}");
        assert_eq!(substitution("a$b"), "a$$b");
    }
}
