//! Distributed tracing, as an Istio sidecar's Envoy traces: a SERVER span
//! per request a [`crate::Mesh`] serves and a CLIENT span per request it
//! sends, continued from W3C trace context (`traceparent` / `tracestate`)
//! or B3 (`b3`, `x-b3-*`) headers, injected again on the way on, sampled
//! as Istio samples (a percentage of new traces, the caller's decision for
//! the others), exported over OTLP/gRPC.
//!
//! The configuration ([`TracingConfig`]) is always here; the mechanism
//! needs the cargo feature `otel` (the `opentelemetry` SDK and its OTLP
//! exporter). A mesh given a configuration without the feature fails
//! [`crate::MeshBuilder::build`] saying so, as a runtime that is not
//! compiled in does.
//!
//! Invariants: tracing never blocks or fails traffic — spans go to a
//! bounded queue that a background thread exports (a full queue drops
//! spans, an unreachable collector loses only spans); headers that do not
//! parse are ignored, never an error or a panic.

use std::time::Duration;

#[cfg(feature = "otel")]
pub(crate) mod otel;
#[cfg(feature = "otel")]
pub mod propagation;

/// The variable [`crate::MeshBuilder::from_env`] reads the OTLP/gRPC
/// collector from (`http://otel-collector.istio-system:4317`); unset,
/// empty or `off`: no tracing.
pub const OTLP_ENDPOINT_VAR: &str = "NASP_OTLP_ENDPOINT";

/// The variable for the sampling percentage of new traces (`0`–`100`,
/// Istio's `tracing.sampling`; default [`DEFAULT_SAMPLING_PERCENT`]).
pub const TRACE_SAMPLING_VAR: &str = "NASP_TRACE_SAMPLING";

/// The variable for the headers injected, OpenTelemetry's names joined
/// with commas (`tracecontext,b3multi`, the default; `b3` is B3's single
/// header).
pub const TRACE_PROPAGATION_VAR: &str = "NASP_TRACE_PROPAGATION";

/// Istio's default random sampling: 1 % of the requests that start a
/// trace (meshConfig `defaultConfig.tracing.sampling`).
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// A header format written on the requests a mesh passes on. Every
/// format is read, whichever are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Propagator {
    /// W3C trace context: `traceparent` and `tracestate`
    /// (OpenTelemetry's `tracecontext`).
    TraceContext,
    /// B3's multiple headers `x-b3-traceid`, `x-b3-spanid`,
    /// `x-b3-parentspanid`, `x-b3-sampled`, as Envoy's Zipkin tracer
    /// writes them (OpenTelemetry's `b3multi`).
    B3Multi,
    /// B3's single header `b3: {trace}-{span}-{sampled}-{parent}`
    /// (OpenTelemetry's `b3`).
    B3Single,
}

impl Propagator {
    /// OpenTelemetry's name (`OTEL_PROPAGATORS`).
    pub fn name(self) -> &'static str {
        match self {
            Propagator::TraceContext => "tracecontext",
            Propagator::B3Multi => "b3multi",
            Propagator::B3Single => "b3",
        }
    }

    /// Parses OpenTelemetry's name.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Propagator::TraceContext,
            Propagator::B3Multi,
            Propagator::B3Single,
        ]
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }
}

/// How a mesh traces ([`crate::MeshBuilder::tracing`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector (`http://127.0.0.1:4317`).
    pub endpoint: String,
    /// The percentage (0–100) of new traces sampled: requests that come
    /// without a sampling decision. A decision in the headers (W3C's
    /// sampled flag, B3's `x-b3-sampled` / `d`) is always followed.
    pub sampling_percent: f64,
    /// The header formats written on outbound requests and on the
    /// request the application is handed (in this order). Empty: none
    /// written, spans still made.
    pub propagators: Vec<Propagator>,
    /// How long spans wait in the batch before they are sent (the SDK's
    /// 5 s by default); `Mesh::shutdown` sends what is left.
    pub export_interval: Duration,
    /// How long one export may take before it is abandoned (the spans of
    /// that batch are lost, traffic is not affected).
    pub export_timeout: Duration,
    /// Spans queued at most; more are dropped rather than slowing traffic.
    pub max_queue: usize,
}

impl TracingConfig {
    /// Traces to `endpoint` with Istio's defaults: 1 % of new traces,
    /// W3C and B3 (multi) headers written.
    pub fn otlp(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            sampling_percent: DEFAULT_SAMPLING_PERCENT,
            propagators: vec![Propagator::TraceContext, Propagator::B3Multi],
            export_interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
            max_queue: 2048,
        }
    }

    /// The sampling percentage of new traces, clamped to 0–100.
    pub fn sampling(mut self, percent: f64) -> Self {
        self.sampling_percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        self
    }

    /// The header formats written.
    pub fn propagators(mut self, p: impl IntoIterator<Item = Propagator>) -> Self {
        self.propagators = p.into_iter().collect();
        self
    }

    /// How long spans wait in the batch before they are sent.
    pub fn export_interval(mut self, d: Duration) -> Self {
        self.export_interval = d;
        self
    }

    /// How long one export may take.
    pub fn export_timeout(mut self, d: Duration) -> Self {
        self.export_timeout = d;
        self
    }

    /// From the values of [`OTLP_ENDPOINT_VAR`], [`TRACE_SAMPLING_VAR`]
    /// and [`TRACE_PROPAGATION_VAR`]: no endpoint (unset, empty, `off`) is
    /// no tracing; a value that does not parse is an error naming it.
    pub fn from_vars(
        endpoint: Option<&str>,
        sampling: Option<&str>,
        propagation: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let endpoint = match endpoint.map(str::trim) {
            None | Some("") => return Ok(None),
            Some(v) if v.eq_ignore_ascii_case("off") => return Ok(None),
            Some(v) => v,
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(format!(
                "{OTLP_ENDPOINT_VAR}={endpoint:?}: expected an http:// or https:// URL \
                 (http://otel-collector.istio-system:4317) or off"
            ));
        }
        let mut c = Self::otlp(endpoint);
        if let Some(s) = sampling.map(str::trim).filter(|s| !s.is_empty()) {
            match s.parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => c.sampling_percent = p,
                _ => {
                    return Err(format!(
                        "{TRACE_SAMPLING_VAR}={s:?}: expected a percentage from 0 to 100"
                    ));
                }
            }
        }
        if let Some(p) = propagation.map(str::trim).filter(|s| !s.is_empty()) {
            let mut list = Vec::new();
            for name in p.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name.eq_ignore_ascii_case("none") {
                    continue;
                }
                let prop = Propagator::from_name(name).ok_or_else(|| {
                    format!(
                        "{TRACE_PROPAGATION_VAR}={p:?}: unknown {name:?} \
                         (expected tracecontext, b3multi, b3 or none)"
                    )
                })?;
                if !list.contains(&prop) {
                    list.push(prop);
                }
            }
            c.propagators = list;
        }
        Ok(Some(c))
    }
}

/// A running tracer, or (without the `otel` feature) nothing that can be
/// made: [`Tracing::start`] then says which feature is missing.
#[cfg(not(feature = "otel"))]
pub(crate) enum Tracing {}

#[cfg(not(feature = "otel"))]
impl Tracing {
    pub(crate) fn start(
        _config: &TracingConfig,
        _workload: &nasp_xds::WorkloadSettings,
    ) -> Result<std::sync::Arc<Self>, String> {
        Err(
            "tracing is configured but nasp was built without its `otel` feature \
             (enable it, or unset the tracing configuration / NASP_OTLP_ENDPOINT)"
                .into(),
        )
    }

    pub(crate) fn outbound(
        self: &std::sync::Arc<Self>,
        _svc: crate::MeshHttpClient,
        _local: Option<std::net::SocketAddr>,
    ) -> crate::MeshHttpClient {
        match **self {}
    }

    pub(crate) fn inbound(
        self: &std::sync::Arc<Self>,
        _svc: crate::MeshHttpClient,
        _local: std::net::SocketAddr,
    ) -> crate::MeshHttpClient {
        match **self {}
    }

    pub(crate) async fn shutdown(&self) {
        match *self {}
    }
}

#[cfg(feature = "otel")]
pub(crate) use otel::Tracing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variables_configure_tracing() {
        assert_eq!(TracingConfig::from_vars(None, Some("100"), None), Ok(None));
        assert_eq!(
            TracingConfig::from_vars(Some(" off "), None, None),
            Ok(None)
        );
        let c = TracingConfig::from_vars(Some("http://127.0.0.1:4317"), None, None)
            .expect("valid")
            .expect("on");
        assert_eq!(c.sampling_percent, 1.0);
        assert_eq!(
            c.propagators,
            [Propagator::TraceContext, Propagator::B3Multi]
        );
        let c = TracingConfig::from_vars(
            Some("http://c:4317"),
            Some("12.5"),
            Some("b3, tracecontext,b3"),
        )
        .expect("valid")
        .expect("on");
        assert_eq!(c.sampling_percent, 12.5);
        assert_eq!(
            c.propagators,
            [Propagator::B3Single, Propagator::TraceContext]
        );
        let c = TracingConfig::from_vars(Some("http://c:4317"), None, Some("none"))
            .expect("valid")
            .expect("on");
        assert!(c.propagators.is_empty());
        for (e, s, p, var) in [
            ("c:4317", None, None, OTLP_ENDPOINT_VAR),
            ("http://c", Some("101"), None, TRACE_SAMPLING_VAR),
            ("http://c", Some("all"), None, TRACE_SAMPLING_VAR),
            ("http://c", None, Some("jaeger"), TRACE_PROPAGATION_VAR),
        ] {
            let err = TracingConfig::from_vars(Some(e), s, p).expect_err(e);
            assert!(err.contains(var), "{err}");
        }
    }

    #[test]
    fn sampling_is_clamped_to_a_percentage() {
        let c = TracingConfig::otlp("http://c:4317");
        assert_eq!(c.clone().sampling(250.0).sampling_percent, 100.0);
        assert_eq!(c.clone().sampling(-1.0).sampling_percent, 0.0);
        assert_eq!(c.sampling(f64::NAN).sampling_percent, 0.0);
    }
}
