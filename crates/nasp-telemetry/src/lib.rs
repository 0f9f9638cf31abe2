//! Metrics as filters define them, and their Prometheus text exposition.
//!
//! Filters define metrics by name through `proxy_define_metric`; Istio's
//! compiled stats filter encodes labels inside that name
//! (`reporter=.=source;.;response_code=.=200;.;istio_requests_total`). The
//! registry keeps names as given and [`parse_tagged_name`] turns them back
//! into a metric family and labels at exposition time, the way Envoy's
//! stat-tag extraction does; [`extract_stat_tags`] does the same for the
//! tags Istio's bootstrap extracts from the other names its filters define
//! (`component.proxy.tag.1.13.2;.istio_build` → `istio_build{component=
//! "proxy",tag="1.13.2"}`).
//!
//! With the `server` feature (off by default), the `server` module serves
//! the exposition over HTTP as an Istio sidecar's `:15090/stats/prometheus`
//! (`server::PrometheusServer`, `server::serve_prometheus`).
//!
//! Invariants: no panics on any name a guest sends; exposition output always
//! parses as Prometheus text (names sanitized, label values escaped).

#[cfg(feature = "server")]
pub mod server;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

/// Kinds of metric (`proxy_metric_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram of recorded values.
    Histogram,
}

/// Envoy's default histogram buckets, which Istio's dashboards expect.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// One metric family in the exposition: its kind and its series (labels,
/// metric).
type Family<'a> = (MetricKind, Vec<(Vec<(String, String)>, &'a Metric)>);

#[derive(Clone, Debug)]
struct Metric {
    name: String,
    kind: MetricKind,
    value: i64,
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A handle to a defined metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MetricId(pub usize);

/// Errors from metric operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricError {
    /// No metric with this id.
    NotFound,
    /// The operation does not apply to this kind (e.g. increment a histogram).
    WrongKind,
}

/// One operation on a metric, for [`MetricsRegistry::update`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricOp {
    /// Add to a counter or gauge (saturating).
    Add(i64),
    /// Set a counter or gauge.
    Set(i64),
    /// Record a histogram sample.
    Record(u64),
    /// Read a counter or gauge.
    Get,
}

/// A registry shared by every plugin of a process (or mesh instance).
#[derive(Clone, Default, Debug)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default, Debug)]
struct Inner {
    metrics: Vec<Metric>,
    by_name: BTreeMap<(String, u8), usize>,
}

fn kind_tag(k: MetricKind) -> u8 {
    match k {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
        MetricKind::Histogram => 2,
    }
}

impl MetricsRegistry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a metric half-updated in a
        // way that matters, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Defines a metric, or returns the existing one with the same name and kind.
    pub fn define(&self, kind: MetricKind, name: &str) -> MetricId {
        let mut inner = self.lock();
        if let Some(id) = inner.by_name.get(&(name.to_string(), kind_tag(kind))) {
            return MetricId(*id);
        }
        let id = inner.metrics.len();
        inner.metrics.push(Metric {
            name: name.to_string(),
            kind,
            value: 0,
            buckets: vec![0; DEFAULT_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        });
        inner.by_name.insert((name.to_string(), kind_tag(kind)), id);
        MetricId(id)
    }

    /// Applies `op` to metric `id` if it has kind `kind`, under one lock, and
    /// returns the value after it (0 for a histogram). `NotFound` when there
    /// is no such metric of that kind, `WrongKind` when the operation does
    /// not apply to it.
    pub fn update(&self, id: MetricId, kind: MetricKind, op: MetricOp) -> Result<i64, MetricError> {
        let mut inner = self.lock();
        let m = inner
            .metrics
            .get_mut(id.0)
            .filter(|m| m.kind == kind)
            .ok_or(MetricError::NotFound)?;
        match (op, m.kind) {
            (MetricOp::Record(v), MetricKind::Histogram) => {
                let x = v as f64;
                for (i, b) in DEFAULT_BUCKETS.iter().enumerate() {
                    if x <= *b {
                        m.buckets[i] += 1;
                    }
                }
                m.sum += x;
                m.count += 1;
                Ok(0)
            }
            (MetricOp::Add(d), MetricKind::Counter | MetricKind::Gauge) => {
                m.value = m.value.saturating_add(d);
                Ok(m.value)
            }
            (MetricOp::Set(v), MetricKind::Counter | MetricKind::Gauge) => {
                m.value = v;
                Ok(m.value)
            }
            (MetricOp::Get, MetricKind::Counter | MetricKind::Gauge) => Ok(m.value),
            _ => Err(MetricError::WrongKind),
        }
    }

    /// The kind of a metric.
    pub fn kind(&self, id: MetricId) -> Option<MetricKind> {
        self.lock().metrics.get(id.0).map(|m| m.kind)
    }

    /// Adds `delta` to a counter or gauge.
    pub fn increment(&self, id: MetricId, delta: i64) -> Result<(), MetricError> {
        let mut inner = self.lock();
        let m = inner.metrics.get_mut(id.0).ok_or(MetricError::NotFound)?;
        match m.kind {
            MetricKind::Histogram => Err(MetricError::WrongKind),
            _ => {
                m.value = m.value.saturating_add(delta);
                Ok(())
            }
        }
    }

    /// Sets a gauge or counter, or records a histogram sample.
    pub fn record(&self, id: MetricId, value: u64) -> Result<(), MetricError> {
        let mut inner = self.lock();
        let m = inner.metrics.get_mut(id.0).ok_or(MetricError::NotFound)?;
        match m.kind {
            MetricKind::Histogram => {
                let v = value as f64;
                for (i, b) in DEFAULT_BUCKETS.iter().enumerate() {
                    if v <= *b {
                        m.buckets[i] += 1;
                    }
                }
                m.sum += v;
                m.count += 1;
            }
            _ => m.value = i64::try_from(value).unwrap_or(i64::MAX),
        }
        Ok(())
    }

    /// The value of a counter or gauge (a histogram's sample count).
    pub fn get(&self, id: MetricId) -> Result<i64, MetricError> {
        let inner = self.lock();
        let m = inner.metrics.get(id.0).ok_or(MetricError::NotFound)?;
        Ok(match m.kind {
            MetricKind::Histogram => i64::try_from(m.count).unwrap_or(i64::MAX),
            _ => m.value,
        })
    }

    /// Looks a metric's value up by its defined name.
    pub fn value_by_name(&self, name: &str) -> Option<i64> {
        let inner = self.lock();
        inner
            .metrics
            .iter()
            .position(|m| m.name == name)
            .and_then(|i| match inner.metrics[i].kind {
                MetricKind::Histogram => i64::try_from(inner.metrics[i].count).ok(),
                _ => Some(inner.metrics[i].value),
            })
    }

    /// Prometheus text exposition (version 0.0.4) of every metric.
    pub fn prometheus_text(&self) -> String {
        let inner = self.lock();
        // Group series by family so each family has one TYPE line.
        let mut families: BTreeMap<String, Family<'_>> = BTreeMap::new();
        for m in &inner.metrics {
            let (family, mut labels) = parse_tagged_name(&m.name, "=.=", ";.;");
            let (family, tags) = extract_stat_tags(&family);
            for (k, v) in tags {
                // A label the encoding already gave wins: Prometheus
                // rejects a series with the same label twice.
                if !labels.iter().any(|(have, _)| *have == k) {
                    labels.push((k, v));
                }
            }
            let family = sanitize_name(&family);
            families
                .entry(family)
                .or_insert_with(|| (m.kind, Vec::new()))
                .1
                .push((labels, m));
        }
        let mut out = String::new();
        for (family, (kind, series)) in families {
            let ty = match kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# TYPE {family} {ty}");
            for (labels, m) in series {
                if m.kind != kind {
                    // The same family name used with two kinds: expose under a
                    // suffixed name rather than emit invalid text.
                    continue;
                }
                match kind {
                    MetricKind::Histogram => {
                        for (i, b) in DEFAULT_BUCKETS.iter().enumerate() {
                            let mut l = labels.clone();
                            l.push(("le".into(), format_float(*b)));
                            let _ = writeln!(
                                out,
                                "{family}_bucket{} {}",
                                render_labels(&l),
                                m.buckets[i]
                            );
                        }
                        let mut l = labels.clone();
                        l.push(("le".into(), "+Inf".into()));
                        let _ = writeln!(out, "{family}_bucket{} {}", render_labels(&l), m.count);
                        let _ = writeln!(
                            out,
                            "{family}_sum{} {}",
                            render_labels(&labels),
                            format_float(m.sum)
                        );
                        let _ =
                            writeln!(out, "{family}_count{} {}", render_labels(&labels), m.count);
                    }
                    _ => {
                        let _ = writeln!(out, "{family}{} {}", render_labels(&labels), m.value);
                    }
                }
            }
        }
        out
    }
}

fn format_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Splits an Istio-encoded metric name into its family and labels:
/// `k1=.=v1;.;k2=.=v2;.;family` → (`family`, [(k1,v1),(k2,v2)]). A name with
/// no tags is returned as is.
pub fn parse_tagged_name(
    name: &str,
    value_sep: &str,
    field_sep: &str,
) -> (String, Vec<(String, String)>) {
    if !name.contains(value_sep) {
        return (name.to_string(), Vec::new());
    }
    let mut parts: Vec<&str> = name.split(field_sep).collect();
    let family = parts.pop().unwrap_or_default().to_string();
    let mut labels = Vec::new();
    for p in parts {
        match p.split_once(value_sep) {
            Some((k, v)) => labels.push((sanitize_name(k), v.to_string())),
            None => labels.push((sanitize_name(p), String::new())),
        }
    }
    (family, labels)
}

/// Istio's stat tags for the names its filters define outside the `=.=`
/// encoding, as Istio's bootstrap configures Envoy's stat-tag extraction:
/// (tag name, prefix, terminator) for the regex `(<prefix>(.+?)<terminator>)`.
/// `component.proxy.tag.1.13.2;.istio_build` (the stats filter's build
/// gauge) gives `istio_build{component="proxy",tag="1.13.2"}`;
/// `wasm_filter.stats_filter.cache.hit.metric_cache_count` gives
/// `metric_cache_count{cache="hit",wasm_filter="stats_filter"}`.
pub const ISTIO_STAT_TAGS: &[(&str, &str, &str)] = &[
    ("cache", "cache.", "."),
    ("component", "component.", "."),
    ("tag", "tag.", ";."),
    ("wasm_filter", "wasm_filter.", "."),
];

/// Envoy's stat-tag extraction with [`ISTIO_STAT_TAGS`]: each tag's first
/// match in the name, searched as Envoy's regex search does (leftmost
/// prefix, shortest non-empty value up to the terminator), is removed from
/// the name and becomes a label. Every tag matches against the whole
/// original name, and the removals are applied together, as Envoy's tag
/// producer does. A name without a match comes back unchanged.
pub fn extract_stat_tags(name: &str) -> (String, Vec<(String, String)>) {
    let bytes = name.as_bytes();
    let mut removed = vec![false; bytes.len()];
    let mut tags = Vec::new();
    for (tag, prefix, terminator) in ISTIO_STAT_TAGS {
        let Some((start, value, end)) = find_tag(bytes, prefix.as_bytes(), terminator.as_bytes())
        else {
            continue;
        };
        for r in &mut removed[start..end] {
            *r = true;
        }
        tags.push((
            (*tag).to_string(),
            String::from_utf8_lossy(&bytes[value.0..value.1]).into_owned(),
        ));
    }
    if tags.is_empty() {
        return (name.to_string(), tags);
    }
    let kept: Vec<u8> = bytes
        .iter()
        .zip(&removed)
        .filter(|(_, r)| !**r)
        .map(|(b, _)| *b)
        .collect();
    // The removed ranges start and end at ASCII bytes, so what is kept is
    // still UTF-8; lossy only to stay panic-free.
    (String::from_utf8_lossy(&kept).into_owned(), tags)
}

/// The leftmost `prefix (.+?) terminator` in `s`: (match start, value range,
/// match end).
fn find_tag(s: &[u8], prefix: &[u8], terminator: &[u8]) -> Option<(usize, (usize, usize), usize)> {
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut from = 0;
    while let Some(start) = find(s, prefix, from) {
        let value_start = start + prefix.len();
        // At least one byte of value, then the nearest terminator.
        if let Some(t) = find(s, terminator, value_start + 1) {
            return Some((start, (value_start, t), t + terminator.len()));
        }
        from = start + 1;
    }
    None
}

/// Makes a valid Prometheus metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn render_labels(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_tags_become_labels() {
        let (fam, labels) = parse_tagged_name(
            "reporter=.=source;.;response_code=.=200;.;istio_requests_total",
            "=.=",
            ";.;",
        );
        assert_eq!(fam, "istio_requests_total");
        assert_eq!(
            labels,
            vec![
                ("reporter".into(), "source".into()),
                ("response_code".into(), "200".into())
            ]
        );
        assert_eq!(
            parse_tagged_name("plain.name", "=.=", ";.;").0,
            "plain.name"
        );
    }

    #[test]
    fn istio_stat_tags_become_labels() {
        assert_eq!(
            extract_stat_tags("component.proxy.tag.1.13.2;.istio_build"),
            (
                "istio_build".to_string(),
                vec![
                    ("component".into(), "proxy".into()),
                    ("tag".into(), "1.13.2".into())
                ]
            )
        );
        assert_eq!(
            extract_stat_tags("wasm_filter.stats_filter.cache.hit.metric_cache_count"),
            (
                "metric_cache_count".to_string(),
                vec![
                    ("cache".into(), "hit".into()),
                    ("wasm_filter".into(), "stats_filter".into())
                ]
            )
        );
        // No match: unchanged; a prefix without a value or terminator is
        // not a tag.
        for name in [
            "istio_requests_total",
            "tag.;.x",
            "component.",
            "cache.x",
            "",
        ] {
            assert_eq!(
                extract_stat_tags(name),
                (name.to_string(), vec![]),
                "{name}"
            );
        }
        // Non-ASCII bytes around and inside a tag stay intact.
        assert_eq!(
            extract_stat_tags("é.component.ü.x"),
            ("é.x".to_string(), vec![("component".into(), "ü".into())])
        );
    }

    #[test]
    fn istio_build_gauge_and_encoded_names_in_one_exposition() {
        let r = MetricsRegistry::new();
        let g = r.define(MetricKind::Gauge, "component.proxy.tag.1.13.2;.istio_build");
        r.record(g, 1).unwrap();
        let c = r.define(
            MetricKind::Counter,
            "wasm_filter.stats_filter.cache.miss.metric_cache_count",
        );
        r.increment(c, 3).unwrap();
        let e = r.define(
            MetricKind::Counter,
            "reporter=.=source;.;response_code=.=200;.;istio_requests_total",
        );
        r.increment(e, 1).unwrap();
        // An encoded label and a stat tag of the same name: the encoded one stays.
        let d = r.define(MetricKind::Gauge, "component=.=app;.;component.proxy.dup");
        r.record(d, 2).unwrap();
        let text = r.prometheus_text();
        assert!(
            text.contains(
                "# TYPE istio_build gauge\nistio_build{component=\"proxy\",tag=\"1.13.2\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("metric_cache_count{cache=\"miss\",wasm_filter=\"stats_filter\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("istio_requests_total{reporter=\"source\",response_code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("dup{component=\"app\"} 2\n"), "{text}");
        assert!(!text.contains("component_proxy"), "{text}");
        promtool_check(&text);
    }

    /// `promtool check metrics` on the text (Debian package `prometheus`,
    /// which `cargo xtask test` installs). Exit status 1 is a parse error; 3
    /// is only its naming lints (no help text, Istio's own `_count` counter
    /// names), which a sidecar's scrape has too.
    fn promtool_check(text: &str) {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            panic!(
                "promtool is not installed: `apt-get install prometheus` (cargo xtask test \
                 installs it)"
            );
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && !report.contains("error"),
            "promtool ({:?}): {report}\n{text}",
            out.status
        );
    }

    #[test]
    fn exposition() {
        let r = MetricsRegistry::new();
        let c = r.define(
            MetricKind::Counter,
            "reporter=.=source;.;istio_requests_total",
        );
        r.increment(c, 2).unwrap();
        let h = r.define(MetricKind::Histogram, "dur");
        r.record(h, 7).unwrap();
        let g = r.define(MetricKind::Gauge, "wasm.gauge");
        r.record(g, 5).unwrap();
        let text = r.prometheus_text();
        assert!(
            text.contains(
                "# TYPE istio_requests_total counter\nistio_requests_total{reporter=\"source\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("dur_bucket{le=\"5\"} 0\ndur_bucket{le=\"10\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("dur_count 1\n") && text.contains("wasm_gauge 5\n"),
            "{text}"
        );
        assert_eq!(r.increment(h, 1), Err(MetricError::WrongKind));
        assert_eq!(r.get(MetricId(99)), Err(MetricError::NotFound));
    }
}
