//! The mesh file's DestinationRule and VirtualService settings, and what
//! istiod writes for them.
//!
//! A service's (or a subset's) `traffic_policy` is a DestinationRule
//! `trafficPolicy`: the load balancer (with consistent hashing, whose key
//! istiod puts on the *route*), locality weighting, connection-pool limits
//! (the cluster's circuit breakers) and outlier detection. A route's
//! `retries`, `fault` and `headers` are a VirtualService `HTTPRoute`'s.
//! Each is translated as istiod's `cluster_traffic_policy.go` /
//! `route.go` translate them (field by field in `docs/xds.md`).
//!
//! Everything here is checked before anything is generated: a bad value is
//! an error that says which setting and why, never a panic and never a
//! resource a client would NACK.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::{envoy_duration, parse_duration};

/// A DestinationRule `trafficPolicy` (of a service or of one subset). A
/// subset's policy replaces the service's field by field, as Istio merges
/// them: a subset that sets `outlier_detection` replaces the whole
/// `outlier_detection` and keeps the service's `load_balancer`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// `ROUND_ROBIN` (default), `LEAST_REQUEST`, `RANDOM`, or
    /// `{consistent_hash: {…}}` (also Istio's `{simple: …}` form, which may
    /// carry a warmup).
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Locality-weighted load balancing (Istio's `localityLbSetting.enabled`,
    /// on by default in Istio's mesh config).
    pub locality_lb: Option<bool>,
    /// Connection-pool limits: the cluster's circuit breakers.
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
}

/// A load-balancing policy (Istio's `LoadBalancerSettings`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    /// `ROUND_ROBIN`: Envoy's default.
    RoundRobin,
    /// `LEAST_REQUEST` (Istio's deprecated `LEAST_CONN` is the same).
    LeastRequest,
    /// `RANDOM`.
    Random,
    /// Consistent hashing on a request property.
    ConsistentHash(ConsistentHash),
}

/// Istio's `LoadBalancerSettings`: the policy and, for round robin and
/// least request, a warmup (Envoy's slow start) for new endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadBalancerSettings {
    /// The policy.
    pub policy: LoadBalancer,
    /// Slow start of new endpoints (`warmup_duration_secs` or `warmup`).
    pub warmup: Option<Warmup>,
}

/// Istio's `WarmupConfiguration` (or `warmupDurationSecs` alone).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    /// How long a new endpoint ramps up (`30s`).
    pub duration: String,
    /// The least share it starts with, in percent (Envoy's default 10).
    pub minimum_percent: Option<f64>,
    /// The ramp's curve: 1 linear (the default), above 1 faster at first.
    pub aggression: Option<f64>,
}

impl<'de> Deserialize<'de> for LoadBalancerSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form {
            simple: Option<String>,
            consistent_hash: Option<ConsistentHash>,
            warmup_duration_secs: Option<String>,
            warmup: Option<Warmup>,
        }
        let simple = |s: &str| match s {
            "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
            "RANDOM" => Ok(LoadBalancer::Random),
            other => Err(D::Error::custom(format!(
                "load_balancer {other:?}: ROUND_ROBIN, LEAST_REQUEST, RANDOM or {{consistent_hash: …}}"
            ))),
        };
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self {
                policy: simple(&s)?,
                warmup: None,
            }),
            v @ Value::Object(_) => {
                let f: Form = serde_json::from_value(v)
                    .map_err(|e| D::Error::custom(format!("load_balancer: {e}")))?;
                let warmup = match (f.warmup_duration_secs, f.warmup) {
                    (Some(d), None) => Some(Warmup {
                        duration: d,
                        ..Warmup::default()
                    }),
                    (None, w) => w,
                    (Some(_), Some(_)) => {
                        return Err(D::Error::custom(
                            "load_balancer: `warmup_duration_secs` or `warmup`, not both",
                        ));
                    }
                };
                let policy = match (f.simple, f.consistent_hash) {
                    (Some(s), None) => simple(&s)?,
                    (None, Some(h)) => LoadBalancer::ConsistentHash(h),
                    // Only a warmup: round robin, Istio's default.
                    (None, None) if warmup.is_some() => LoadBalancer::RoundRobin,
                    _ => {
                        return Err(D::Error::custom(
                            "load_balancer: exactly one of `simple` and `consistent_hash`",
                        ));
                    }
                };
                Ok(Self { policy, warmup })
            }
            other => Err(D::Error::custom(format!(
                "load_balancer: a name or {{consistent_hash: …}}, not {other}"
            ))),
        }
    }
}

/// Istio's `ConsistentHashLB`: exactly one hash key, and the algorithm
/// (`ring_hash`, the default, or `maglev`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsistentHash {
    /// Hash this request header.
    pub http_header_name: Option<String>,
    /// Hash this cookie.
    pub http_cookie: Option<HttpCookie>,
    /// Hash the caller's IP.
    pub use_source_ip: Option<bool>,
    /// Hash this query parameter.
    pub http_query_parameter_name: Option<String>,
    /// Ketama ring (the default), with its minimum size.
    pub ring_hash: Option<RingHash>,
    /// Maglev, with its table size.
    pub maglev: Option<Maglev>,
}

/// A hash cookie (Istio's `HTTPCookie`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpCookie {
    /// The cookie's name.
    pub name: String,
    /// Its path, when Envoy generates it.
    pub path: Option<String>,
    /// Lifetime of a generated cookie (`10s`, `1h`).
    pub ttl: Option<String>,
}

/// Ring-hash settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RingHash {
    /// Minimum ring size (istiod's default 1024).
    pub minimum_ring_size: Option<u64>,
}

/// Maglev settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Maglev {
    /// Lookup-table size, a prime (Envoy's default 65537).
    pub table_size: Option<u64>,
}

/// Istio's `ConnectionPoolSettings`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    /// HTTP limits.
    pub http: Option<HttpPool>,
    /// TCP limits.
    pub tcp: Option<TcpPool>,
}

/// Istio's `ConnectionPoolSettings.HTTPSettings`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPool {
    /// Requests waiting for a connection → `max_pending_requests`.
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight → `max_requests`.
    pub http2_max_requests: Option<u32>,
    /// Retries in flight → `max_retries`.
    pub max_retries: Option<u32>,
}

/// Istio's `ConnectionPoolSettings.TCPSettings`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpPool {
    /// Connections → `max_connections`.
    pub max_connections: Option<u32>,
    /// The cluster's `connect_timeout` (istiod's default 10s).
    pub connect_timeout: Option<String>,
}

/// Istio's `OutlierDetection`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (and local failures) before an ejection; 0
    /// turns it off.
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 (and local failures) before an ejection.
    pub consecutive_gateway_errors: Option<u32>,
    /// Count connect failures and resets apart from answers.
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    /// Consecutive local failures before an ejection (with the split).
    pub consecutive_local_origin_failures: Option<u32>,
    /// Analysis interval (Envoy's default 10s).
    pub interval: Option<String>,
    /// Ejection time, times the number of ejections (Envoy's default 30s).
    pub base_ejection_time: Option<String>,
    /// Most hosts ejected at once, percent (Envoy's default 10).
    pub max_ejection_percent: Option<u32>,
    /// Below this share of healthy hosts, balance over all (Envoy's panic
    /// threshold; istiod writes 0, no panic, when unset).
    pub min_health_percent: Option<u32>,
}

/// A VirtualService `HTTPRetry`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first attempt; 0 turns retries off.
    pub attempts: u32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<String>,
    /// Envoy's `retry_on` conditions, comma separated; numbers are
    /// retriable status codes.
    pub retry_on: Option<String>,
}

/// A VirtualService `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Delay a share of requests.
    pub delay: Option<FaultDelay>,
    /// Answer a share of requests at once.
    pub abort: Option<FaultAbort>,
}

/// A fixed delay.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// The delay (`500ms`).
    pub fixed_delay: String,
    /// Percent of requests (default 100).
    pub percentage: Option<f64>,
}

/// An abort.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The HTTP status answered (200–599).
    pub http_status: Option<u32>,
    /// Or a gRPC status (`UNAVAILABLE`, or its number).
    pub grpc_status: Option<GrpcStatus>,
    /// Percent of requests (default 100).
    pub percentage: Option<f64>,
}

/// A gRPC status by name (Istio's form) or number.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum GrpcStatus {
    /// `UNAVAILABLE`, `NOT_FOUND`, …
    Name(String),
    /// 0–16.
    Code(u32),
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl GrpcStatus {
    fn code(&self) -> Result<u32, String> {
        match self {
            GrpcStatus::Code(c) if *c <= 16 => Ok(*c),
            GrpcStatus::Code(c) => Err(format!("grpc_status {c}: 0 to 16")),
            GrpcStatus::Name(n) => GRPC_CODES
                .iter()
                .position(|c| c.eq_ignore_ascii_case(n))
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| format!("grpc_status {n:?}: not a gRPC status name")),
        }
    }
}

/// A VirtualService `Headers`: request and response changes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    /// Changes to the request before it is sent.
    pub request: Option<HeaderOperations>,
    /// Changes to the response before the caller sees it.
    pub response: Option<HeaderOperations>,
}

/// Istio's `HeaderOperations`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOperations {
    /// Replace (or add) these headers.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append these values.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Istio's accepted `retryOn` conditions (its validation list).
const RETRY_ON: [&str; 14] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn duration_at_least_1ms(what: &str, s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| format!("{what} {s:?}: {e}"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("{what} {s:?}: at least 1ms"));
    }
    Ok(d)
}

fn percent(what: &str, p: Option<f64>) -> Result<f64, String> {
    let p = p.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{what} percentage {p}: 0 to 100"));
    }
    Ok(p)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// A header name Envoy takes in a mutation: a lower-case-able HTTP token,
/// not a pseudo-header.
fn header_name(what: &str, n: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if n.is_empty() || !n.bytes().all(token) {
        return Err(format!("{what}: bad header name {n:?}"));
    }
    Ok(())
}

/// Whether a `set`/`add` names the authority, which istiod turns into the
/// route's host rewrite rather than a header (Envoy refuses to mutate it).
fn is_authority(n: &str) -> bool {
    n.eq_ignore_ascii_case("host") || n.eq_ignore_ascii_case(":authority")
}

impl TrafficPolicy {
    /// The load-balancing policy, when set.
    fn policy(&self) -> Option<&LoadBalancer> {
        self.load_balancer.as_ref().map(|l| &l.policy)
    }

    /// Istio's `MergeTrafficPolicy`: each field the subset sets replaces
    /// the service's.
    pub(super) fn merged(service: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>) -> Self {
        let base = service.cloned().unwrap_or_default();
        let Some(s) = subset else { return base };
        TrafficPolicy {
            load_balancer: s.load_balancer.clone().or(base.load_balancer),
            locality_lb: s.locality_lb.or(base.locality_lb),
            connection_pool: s.connection_pool.clone().or(base.connection_pool),
            outlier_detection: s.outlier_detection.clone().or(base.outlier_detection),
        }
    }

    /// What Envoy or Istio would reject.
    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(w) = self.load_balancer.as_ref().and_then(|l| l.warmup.as_ref()) {
            if !matches!(
                self.policy(),
                Some(LoadBalancer::RoundRobin | LoadBalancer::LeastRequest)
            ) {
                // istiod writes a slow start only for these two; elsewhere
                // it would be silently ignored.
                return Err("load_balancer warmup: only with ROUND_ROBIN or LEAST_REQUEST".into());
            }
            let d = parse_duration(&w.duration)
                .map_err(|e| format!("load_balancer warmup duration {:?}: {e}", w.duration))?;
            if d < Duration::from_millis(1) {
                return Err(format!(
                    "load_balancer warmup duration {:?}: at least 1ms",
                    w.duration
                ));
            }
            if w.minimum_percent
                .is_some_and(|p| !(0.0..=100.0).contains(&p))
            {
                return Err("load_balancer warmup minimum_percent: 0 to 100".into());
            }
            if w.aggression.is_some_and(|a| !(a >= 1.0 && a.is_finite())) {
                return Err("load_balancer warmup aggression: at least 1".into());
            }
        }
        if let Some(LoadBalancer::ConsistentHash(h)) = self.policy() {
            let keys = [
                h.http_header_name.is_some(),
                h.http_cookie.is_some(),
                h.use_source_ip == Some(true),
                h.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                return Err("consistent_hash: exactly one of http_header_name, http_cookie, use_source_ip: true and http_query_parameter_name".into());
            }
            if let Some(n) = &h.http_header_name {
                header_name("consistent_hash http_header_name", n)?;
            }
            if let Some(c) = &h.http_cookie {
                if c.name.is_empty() {
                    return Err("consistent_hash http_cookie: needs a name".into());
                }
                if let Some(t) = &c.ttl {
                    parse_duration(t)
                        .map_err(|e| format!("consistent_hash http_cookie ttl {t:?}: {e}"))?;
                }
            }
            if h.http_query_parameter_name.as_deref() == Some("") {
                return Err("consistent_hash http_query_parameter_name: empty".into());
            }
            if h.ring_hash.is_some() && h.maglev.is_some() {
                return Err("consistent_hash: ring_hash or maglev, not both".into());
            }
            if let Some(n) = h.ring_hash.as_ref().and_then(|r| r.minimum_ring_size)
                && !(1..=8 * 1024 * 1024).contains(&n)
            {
                return Err(format!(
                    "consistent_hash ring_hash minimum_ring_size {n}: 1 to 8388608"
                ));
            }
            if let Some(n) = h.maglev.as_ref().and_then(|m| m.table_size)
                && (!is_prime(n) || n > 5_000_011)
            {
                return Err(format!(
                    "consistent_hash maglev table_size {n}: a prime up to 5000011"
                ));
            }
        }
        if let Some(t) = self
            .connection_pool
            .as_ref()
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.connect_timeout.as_deref())
        {
            duration_at_least_1ms("connection_pool tcp connect_timeout", t)?;
        }
        if let Some(o) = &self.outlier_detection {
            for (what, v) in [
                ("interval", &o.interval),
                ("base_ejection_time", &o.base_ejection_time),
            ] {
                if let Some(v) = v {
                    duration_at_least_1ms(&format!("outlier_detection {what}"), v)?;
                }
            }
            for (what, v) in [
                ("max_ejection_percent", o.max_ejection_percent),
                ("min_health_percent", o.min_health_percent),
            ] {
                if let Some(v) = v
                    && v > 100
                {
                    return Err(format!("outlier_detection {what} {v}: 0 to 100"));
                }
            }
            if o.consecutive_local_origin_failures.is_some()
                && !o.split_external_local_origin_errors
            {
                return Err("outlier_detection consecutive_local_origin_failures needs split_external_local_origin_errors: true".into());
            }
        }
        Ok(())
    }

    /// The route's `hash_policy` entry for this policy's consistent hash
    /// (istiod's `consistentHashToHashPolicy`), if any.
    pub(super) fn hash_policy(&self) -> Option<Value> {
        let Some(LoadBalancer::ConsistentHash(h)) = self.policy() else {
            return None;
        };
        if let Some(n) = &h.http_header_name {
            return Some(json!({"header": {"header_name": n}}));
        }
        if let Some(c) = &h.http_cookie {
            let mut cookie = json!({"name": c.name});
            if let Some(p) = &c.path {
                cookie["path"] = json!(p);
            }
            if let Some(t) = c.ttl.as_deref().and_then(|t| parse_duration(t).ok()) {
                cookie["ttl"] = json!(envoy_duration(t));
            }
            return Some(json!({"cookie": cookie}));
        }
        if h.use_source_ip == Some(true) {
            return Some(json!({"connection_properties": {"source_ip": true}}));
        }
        h.http_query_parameter_name
            .as_ref()
            .map(|n| json!({"query_parameter": {"name": n}}))
    }

    /// Writes the policy onto an Envoy cluster (JSON), as istiod's
    /// `applyTrafficPolicy` does; the cluster already has Istio's default
    /// circuit breakers.
    pub(super) fn apply(&self, c: &mut Value) {
        // istiod's slow start: the round-robin or least-request config of
        // the cluster's `lb_config`.
        let slow_start = self
            .load_balancer
            .as_ref()
            .and_then(|l| l.warmup.as_ref())
            .and_then(|w| {
                let window = envoy_duration(parse_duration(&w.duration).ok()?);
                let mut s = json!({"slow_start_window": window});
                if let Some(a) = w.aggression {
                    s["aggression"] = json!({"default_value": a, "runtime_key": "upstream.slow_start.aggression"});
                }
                if let Some(p) = w.minimum_percent {
                    s["min_weight_percent"] = json!({"value": p});
                }
                Some(s)
            });
        match self.policy() {
            None | Some(LoadBalancer::RoundRobin) => {
                if let Some(s) = slow_start {
                    c["round_robin_lb_config"] = json!({"slow_start_config": s});
                }
            }
            Some(LoadBalancer::LeastRequest) => {
                c["lb_policy"] = json!("LEAST_REQUEST");
                if let Some(s) = slow_start {
                    c["least_request_lb_config"] = json!({"slow_start_config": s});
                }
            }
            Some(LoadBalancer::Random) => c["lb_policy"] = json!("RANDOM"),
            Some(LoadBalancer::ConsistentHash(h)) => match &h.maglev {
                Some(m) => {
                    c["lb_policy"] = json!("MAGLEV");
                    c["maglev_lb_config"] = match m.table_size {
                        Some(n) => json!({"table_size": n}),
                        None => json!({}),
                    };
                }
                None => {
                    let size = h
                        .ring_hash
                        .as_ref()
                        .and_then(|r| r.minimum_ring_size)
                        .unwrap_or(1024);
                    c["lb_policy"] = json!("RING_HASH");
                    c["ring_hash_lb_config"] = json!({"minimum_ring_size": size});
                }
            },
        }
        if self.locality_lb != Some(false) {
            c["common_lb_config"]["locality_weighted_lb_config"] = json!({});
        }
        if let Some(pool) = &self.connection_pool {
            let t = &mut c["circuit_breakers"]["thresholds"][0];
            if let Some(h) = &pool.http {
                for (key, v) in [
                    ("max_requests", h.http2_max_requests),
                    ("max_pending_requests", h.http1_max_pending_requests),
                    ("max_retries", h.max_retries),
                ] {
                    // istiod: 0 means "not set", Istio's unlimited default stays.
                    if let Some(v) = v.filter(|v| *v > 0) {
                        t[key] = json!(v);
                    }
                }
            }
            if let Some(tcp) = &pool.tcp {
                if let Some(v) = tcp.max_connections.filter(|v| *v > 0) {
                    t["max_connections"] = json!(v);
                }
                if let Some(d) = tcp
                    .connect_timeout
                    .as_deref()
                    .and_then(|d| parse_duration(d).ok())
                {
                    c["connect_timeout"] = json!(envoy_duration(d));
                }
            }
        }
        if let Some(o) = &self.outlier_detection {
            // istiod's `applyOutlierDetection`: success-rate ejection off,
            // each consecutive count with its enforcement at 100 % (0 when
            // the count is 0, which turns it off).
            let mut out = json!({"enforcing_success_rate": 0});
            let enforcing = |v: u32| if v > 0 { 100 } else { 0 };
            if let Some(v) = o.consecutive_5xx_errors {
                out["consecutive_5xx"] = json!(v);
                out["enforcing_consecutive_5xx"] = json!(enforcing(v));
            }
            if let Some(v) = o.consecutive_gateway_errors {
                out["consecutive_gateway_failure"] = json!(v);
                out["enforcing_consecutive_gateway_failure"] = json!(enforcing(v));
            }
            for (key, v) in [
                ("interval", &o.interval),
                ("base_ejection_time", &o.base_ejection_time),
            ] {
                if let Some(d) = v.as_deref().and_then(|d| parse_duration(d).ok()) {
                    out[key] = json!(envoy_duration(d));
                }
            }
            if let Some(p) = o.max_ejection_percent.filter(|p| *p > 0) {
                out["max_ejection_percent"] = json!(p);
            }
            if o.split_external_local_origin_errors {
                out["split_external_local_origin_errors"] = json!(true);
                if let Some(v) = o.consecutive_local_origin_failures.filter(|v| *v > 0) {
                    out["consecutive_local_origin_failure"] = json!(v);
                    out["enforcing_consecutive_local_origin_failure"] = json!(100);
                }
                out["enforcing_local_origin_success_rate"] = json!(0);
            }
            c["outlier_detection"] = out;
            // istiod turns Envoy's panic threshold off (0) unless
            // `minHealthPercent` says otherwise: few pods per service.
            c["common_lb_config"]["healthy_panic_threshold"] =
                json!({"value": f64::from(o.min_health_percent.unwrap_or(0))});
        }
    }
}

impl Retries {
    /// What Istio's validation rejects.
    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.per_try_timeout {
            duration_at_least_1ms("retries per_try_timeout", t)?;
        }
        for c in self
            .retry_on
            .iter()
            .flat_map(|r| r.split(','))
            .map(str::trim)
        {
            if c.is_empty() {
                continue;
            }
            if let Ok(code) = c.parse::<u32>() {
                if !(100..=599).contains(&code) {
                    return Err(format!(
                        "retries retry_on: status {code} is not an HTTP status"
                    ));
                }
            } else if !RETRY_ON.contains(&c) {
                return Err(format!(
                    "retries retry_on: unknown condition {c:?} (one of {})",
                    RETRY_ON.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// istiod's retry policy for a route: its default (connect-failure,
/// refused-stream, unavailable, cancelled, 503; 2 retries; other hosts
/// first) when the route sets none; none at all for `attempts: 0`; else the
/// default with `num_retries`, `per_try_timeout` and `retry_on` replaced —
/// numbers in `retry_on` become `retriable_status_codes` (replacing the
/// default 503) and bring `retriable-status-codes` with them.
pub(super) fn retry_policy(r: Option<&Retries>) -> Option<Value> {
    let mut out = json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        "host_selection_retry_max_attempts": "5",
        "retriable_status_codes": [503]
    });
    let Some(r) = r else { return Some(out) };
    if r.attempts == 0 {
        return None;
    }
    out["num_retries"] = json!(r.attempts);
    if let Some(on) = r.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
        let (codes, conditions): (Vec<&str>, Vec<&str>) = on
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .partition(|c| c.parse::<u32>().is_ok());
        let mut retry_on = conditions.join(",");
        if !codes.is_empty() && !conditions.contains(&"retriable-status-codes") {
            if !retry_on.is_empty() {
                retry_on.push(',');
            }
            retry_on.push_str("retriable-status-codes");
        }
        out["retry_on"] = json!(retry_on);
        let codes: Vec<u32> = codes.iter().filter_map(|c| c.parse().ok()).collect();
        match out.as_object_mut() {
            Some(o) if codes.is_empty() => {
                o.remove("retriable_status_codes");
            }
            _ => out["retriable_status_codes"] = json!(codes),
        }
    }
    if let Some(d) = r
        .per_try_timeout
        .as_deref()
        .and_then(|d| parse_duration(d).ok())
    {
        out["per_try_timeout"] = json!(envoy_duration(d));
    }
    Some(out)
}

/// A percentage as istiod writes it: `value × 10 000` per million.
fn fractional(p: f64) -> Value {
    // The value is checked to be in 0..=100, so the product fits.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (p * 10_000.0).round() as u32;
    json!({"numerator": n, "denominator": "MILLION"})
}

impl Fault {
    /// What Istio's validation rejects.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err("fault: needs a delay or an abort".into());
        }
        if let Some(d) = &self.delay {
            duration_at_least_1ms("fault delay fixed_delay", &d.fixed_delay)?;
            percent("fault delay", d.percentage)?;
        }
        if let Some(a) = &self.abort {
            percent("fault abort", a.percentage)?;
            match (a.http_status, &a.grpc_status) {
                (Some(s), None) if !(200..=599).contains(&s) => {
                    return Err(format!("fault abort http_status {s}: 200 to 599"));
                }
                (Some(_), None) => {}
                (None, Some(g)) => {
                    g.code().map_err(|e| format!("fault abort {e}"))?;
                }
                _ => return Err("fault abort: exactly one of http_status and grpc_status".into()),
            }
        }
        Ok(())
    }

    /// The route's `typed_per_filter_config` entry: Envoy's `HTTPFault`
    /// (istiod's `translateFault`).
    pub(super) fn to_envoy(&self) -> Value {
        let mut f = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"});
        if let Some(d) = &self.delay
            && let Ok(delay) = parse_duration(&d.fixed_delay)
        {
            f["delay"] = json!({
                "fixed_delay": envoy_duration(delay),
                "percentage": fractional(d.percentage.unwrap_or(100.0))
            });
        }
        if let Some(a) = &self.abort {
            let mut abort = json!({"percentage": fractional(a.percentage.unwrap_or(100.0))});
            if let Some(s) = a.http_status {
                abort["http_status"] = json!(s);
            } else if let Some(g) = a.grpc_status.as_ref().and_then(|g| g.code().ok()) {
                abort["grpc_status"] = json!(g);
            }
            f["abort"] = abort;
        }
        json!({"envoy.filters.http.fault": f})
    }
}

impl Headers {
    /// What Envoy rejects: bad names, pseudo-headers, removing the host.
    pub(super) fn validate(&self) -> Result<(), String> {
        for (side, ops) in [("request", &self.request), ("response", &self.response)] {
            let Some(ops) = ops else { continue };
            for n in ops.set.keys().chain(ops.add.keys()) {
                if side == "request" && is_authority(n) {
                    continue;
                }
                header_name(&format!("headers {side}"), n)?;
            }
            for n in &ops.remove {
                header_name(&format!("headers {side} remove"), n)?;
                if is_authority(n) {
                    return Err(format!("headers {side} remove: {n:?} cannot be removed"));
                }
            }
        }
        Ok(())
    }

    /// Writes the mutations onto an Envoy route (JSON) as istiod does:
    /// `set` → `OVERWRITE_IF_EXISTS_OR_ADD`, `add` →
    /// `APPEND_IF_EXISTS_OR_ADD`, `remove` → `*_headers_to_remove`; a
    /// request `host` / `:authority` becomes the route's
    /// `host_rewrite_literal`.
    pub(super) fn apply(&self, route: &mut Value) {
        let adds = |ops: &HeaderOperations, authority: bool| -> Vec<Value> {
            let one = |(k, v): (&String, &String), action: &str| json!({"header": {"key": k.to_ascii_lowercase(), "value": v}, "append_action": action});
            ops.set
                .iter()
                .filter(|(k, _)| !(authority && is_authority(k)))
                .map(|kv| one(kv, "OVERWRITE_IF_EXISTS_OR_ADD"))
                .chain(
                    ops.add
                        .iter()
                        .filter(|(k, _)| !(authority && is_authority(k)))
                        .map(|kv| one(kv, "APPEND_IF_EXISTS_OR_ADD")),
                )
                .collect()
        };
        let lower =
            |v: &[String]| -> Vec<String> { v.iter().map(|s| s.to_ascii_lowercase()).collect() };
        if let Some(req) = &self.request {
            let add = adds(req, true);
            if !add.is_empty() {
                route["request_headers_to_add"] = json!(add);
            }
            if !req.remove.is_empty() {
                route["request_headers_to_remove"] = json!(lower(&req.remove));
            }
            if let Some(host) = req
                .add
                .iter()
                .chain(req.set.iter())
                .filter(|(k, _)| is_authority(k))
                .map(|(_, v)| v)
                .next_back()
            {
                route["route"]["host_rewrite_literal"] = json!(host);
            }
        }
        if let Some(resp) = &self.response {
            let add = adds(resp, false);
            if !add.is_empty() {
                route["response_headers_to_add"] = json!(add);
            }
            if !resp.remove.is_empty() {
                route["response_headers_to_remove"] = json!(lower(&resp.remove));
            }
        }
    }
}
