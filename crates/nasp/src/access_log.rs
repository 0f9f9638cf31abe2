//! Access logs: one line per HTTP request and per TCP connection a
//! [`crate::Mesh`] sends or serves,
//! in Envoy's default text format or as JSON, to stdout or a file; off
//! unless configured ([`crate::MeshBuilder::access_log`],
//! `NASP_ACCESS_LOG`).
//!
//! The text line is Envoy's default format:
//!
//! ```text
//! [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
//! %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
//! %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
//! "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
//! ```
//!
//! (one line; `-` for what is unknown). A request is logged when its
//! response body ends or is dropped, so the byte counts and the duration
//! cover the whole exchange, as Envoy logs at the end of a stream.
//!
//! Invariants: logging never blocks or fails traffic — lines go through a
//! bounded queue to a writer thread, and a line that does not fit is
//! dropped and counted; a write error is reported once, never per request.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use nasp_transport::{Body, BoxError, LocalReply, MeshPeer, Upstream};
use tower::{Layer, Service};

/// The variable [`crate::MeshBuilder::from_env`] reads the access log's
/// destination from: `stdout`, a file path, or `off` (the default).
pub const ACCESS_LOG_VAR: &str = "NASP_ACCESS_LOG";

/// The variable for the access log's format: `text` (default) or `json`.
pub const ACCESS_LOG_FORMAT_VAR: &str = "NASP_ACCESS_LOG_FORMAT";

/// How a line is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessLogFormat {
    /// Envoy's default text format.
    #[default]
    Text,
    /// One JSON object per line, the same fields under Envoy's names in
    /// lower case (`start_time`, `method`, `path`, …) plus nasp's
    /// (`direction`, `upstream_cluster`, `peer`: the peer's SPIFFE id,
    /// `downstream_remote_address` inbound).
    Json,
}

/// Where lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessLogTarget {
    /// The process's standard output (Istio's sidecars log there).
    Stdout,
    /// A file, appended to (created if missing).
    File(PathBuf),
}

/// The access log's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Where the lines go.
    pub target: AccessLogTarget,
    /// Their format.
    pub format: AccessLogFormat,
}

impl AccessLogConfig {
    /// Text lines on stdout.
    pub fn stdout() -> Self {
        Self {
            target: AccessLogTarget::Stdout,
            format: AccessLogFormat::Text,
        }
    }

    /// Text lines appended to `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            target: AccessLogTarget::File(path.into()),
            format: AccessLogFormat::Text,
        }
    }

    /// The same, in `format`.
    pub fn format(mut self, format: AccessLogFormat) -> Self {
        self.format = format;
        self
    }

    /// From the values of [`ACCESS_LOG_VAR`] and [`ACCESS_LOG_FORMAT_VAR`]:
    /// unset, empty or `off` is no log; `stdout`, or anything else as a
    /// file path.
    pub fn from_vars(log: Option<&str>, format: Option<&str>) -> Result<Option<Self>, String> {
        let format = match format.map(str::trim) {
            None | Some("") => AccessLogFormat::Text,
            Some(f) if f.eq_ignore_ascii_case("text") => AccessLogFormat::Text,
            Some(f) if f.eq_ignore_ascii_case("json") => AccessLogFormat::Json,
            Some(f) => {
                return Err(format!(
                    "{ACCESS_LOG_FORMAT_VAR}={f:?}: expected text or json"
                ));
            }
        };
        Ok(match log.map(str::trim) {
            None | Some("") => None,
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) if v.eq_ignore_ascii_case("stdout") || v == "/dev/stdout" => {
                Some(Self::stdout().format(format))
            }
            Some(path) => Some(Self::file(path).format(format)),
        })
    }
}

/// Lines queued for the writer at most; more are dropped (and counted)
/// rather than slowing traffic.
const QUEUE: usize = 4096;

/// An open access log: a queue to its writer thread.
#[derive(Debug)]
pub(crate) struct AccessLog {
    tx: mpsc::SyncSender<String>,
    format: AccessLogFormat,
    dropped: AtomicU64,
    warned: AtomicBool,
}

impl AccessLog {
    /// Opens the target (a file is created or appended to now, so a bad
    /// path fails the mesh's build) and starts the writer.
    pub(crate) fn open(config: &AccessLogConfig) -> std::io::Result<Arc<Self>> {
        let mut out: Box<dyn std::io::Write + Send> = match &config.target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let name = match &config.target {
            AccessLogTarget::Stdout => "stdout".to_string(),
            AccessLogTarget::File(p) => p.display().to_string(),
        };
        std::thread::Builder::new()
            .name("nasp-access-log".into())
            .spawn(move || {
                let mut failed = false;
                // Ends when the last sender (the mesh) is gone.
                while let Ok(line) = rx.recv() {
                    let mut batch = line;
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                    }
                    match out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
                        Ok(()) => failed = false,
                        Err(e) if !failed => {
                            failed = true;
                            tracing::warn!(
                                "access log {name}: {e} (lines are lost until it works)"
                            );
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(Arc::new(Self {
            tx,
            format: config.format,
            dropped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }))
    }

    fn write(&self, entry: &Entry) {
        let line = match self.format {
            AccessLogFormat::Text => entry.text(),
            AccessLogFormat::Json => entry.json(),
        };
        if self.tx.try_send(line).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("access log: writer behind, lines dropped ({n} so far)");
            }
        }
    }
}

/// Which side of the mesh a request was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Outbound,
    Inbound,
}

/// What one line says.
#[derive(Clone, Debug)]
struct Entry {
    side: Side,
    start: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    code: u16,
    flags: String,
    received: u64,
    sent: u64,
    duration_ms: u128,
    upstream_service_time: Option<String>,
    forwarded_for: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    authority: Option<String>,
    upstream_host: Option<SocketAddr>,
    upstream_cluster: Option<String>,
    peer: Option<String>,
    /// Inbound: the caller's address (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    downstream: Option<SocketAddr>,
}

fn dash(v: &Option<String>) -> &str {
    v.as_deref().filter(|s| !s.is_empty()).unwrap_or("-")
}

impl Entry {
    fn text(&self) -> String {
        let host = self
            .upstream_host
            .map_or_else(|| "-".to_string(), |h| h.to_string());
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"\n",
            rfc3339_millis(self.start),
            self.method,
            self.path,
            self.protocol,
            self.code,
            if self.flags.is_empty() {
                "-"
            } else {
                &self.flags
            },
            self.received,
            self.sent,
            self.duration_ms,
            dash(&self.upstream_service_time),
            dash(&self.forwarded_for),
            dash(&self.user_agent),
            dash(&self.request_id),
            dash(&self.authority),
            host,
        )
    }

    fn json(&self) -> String {
        let opt = |v: &Option<String>| v.as_deref().map_or("null".to_string(), json_string);
        format!(
            "{{\"start_time\":{},\"direction\":{},\"method\":{},\"path\":{},\"protocol\":{},\
             \"response_code\":{},\"response_flags\":{},\"bytes_received\":{},\"bytes_sent\":{},\
             \"duration\":{},\"upstream_service_time\":{},\"x_forwarded_for\":{},\
             \"user_agent\":{},\"request_id\":{},\"authority\":{},\"upstream_host\":{},\
             \"upstream_cluster\":{},\"peer\":{},\"downstream_remote_address\":{}}}\n",
            json_string(&rfc3339_millis(self.start)),
            json_string(match self.side {
                Side::Outbound => "outbound",
                Side::Inbound => "inbound",
            }),
            json_string(&self.method),
            json_string(&self.path),
            json_string(self.protocol),
            self.code,
            json_string(if self.flags.is_empty() {
                "-"
            } else {
                &self.flags
            }),
            self.received,
            self.sent,
            self.duration_ms,
            opt(&self.upstream_service_time),
            opt(&self.forwarded_for),
            opt(&self.user_agent),
            opt(&self.request_id),
            opt(&self.authority),
            opt(&self.upstream_host.map(|h| h.to_string())),
            opt(&self.upstream_cluster),
            opt(&self.peer),
            opt(&self.downstream.map(|a| a.to_string())),
        )
    }
}

/// A JSON string literal: quotes, backslashes and control characters
/// escaped (header values are visible ASCII, but a path may hold anything
/// a client sent).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `2026-12-01T15:04:05.123Z`, as Envoy's `%START_TIME%` (UTC, ms).
fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days, on days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// Logs each request through the service it wraps.
#[derive(Clone, Debug)]
pub(crate) struct AccessLogLayer {
    log: Arc<AccessLog>,
    side: Side,
    /// Inbound: the listener's address, the "upstream" (the application).
    local: Option<SocketAddr>,
}

impl AccessLogLayer {
    pub(crate) fn new(log: Arc<AccessLog>, side: Side, local: Option<SocketAddr>) -> Self {
        Self { log, side, local }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub(crate) struct AccessLogService<S> {
    inner: S,
    layer: AccessLogLayer,
}

impl<S> Service<Request<Body>> for AccessLogService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let path = header("x-envoy-original-path").unwrap_or_else(|| {
            req.uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
        });
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header("host"));
        let mut entry = Entry {
            side: self.layer.side,
            start: SystemTime::now(),
            method: req.method().as_str().to_string(),
            path,
            protocol: protocol(req.version()),
            code: 0,
            flags: String::new(),
            received: 0,
            sent: 0,
            duration_ms: 0,
            upstream_service_time: None,
            forwarded_for: header("x-forwarded-for"),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            authority,
            upstream_host: self.layer.local,
            upstream_cluster: self.layer.local.map(|l| format!("inbound|{}||", l.port())),
            peer: req
                .extensions()
                .get::<MeshPeer>()
                .and_then(|p| p.id.as_ref().map(ToString::to_string)),
            downstream: req.extensions().get::<MeshPeer>().map(|p| p.addr),
        };
        let (req, received) = crate::counted::count_request(req);
        let log = self.layer.log.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    entry.code = resp.status().as_u16();
                    if let Some(u) = resp.extensions().get::<Upstream>() {
                        entry.upstream_host = Some(u.address);
                        entry.upstream_cluster = Some(u.cluster.to_string());
                        if entry.side == Side::Outbound {
                            entry.peer = u.peer_id.as_deref().map(str::to_string);
                        }
                    }
                    if let Some(lr) = resp.extensions().get::<LocalReply>() {
                        entry.flags = lr.flags.to_string();
                    }
                    entry.upstream_service_time = resp
                        .headers()
                        .get("x-envoy-upstream-service-time")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .or_else(|| {
                            (entry.side == Side::Outbound && entry.upstream_host.is_some())
                                .then(|| started.elapsed().as_millis().to_string())
                        });
                    let pending = Pending {
                        log,
                        entry: Some(entry),
                        started,
                        received,
                        sent: 0,
                    };
                    Ok(resp.map(|b| Body::new(Logged { inner: b, pending })))
                }
                Err(e) => {
                    // No response reached the application: Envoy's
                    // "downstream saw nothing" is code 0.
                    entry.received = received.load(Ordering::Relaxed);
                    entry.duration_ms = started.elapsed().as_millis();
                    log.write(&entry);
                    Err(e)
                }
            }
        })
    }
}

/// The line of a request whose response is still streaming: written once,
/// when the body ends or is dropped.
struct Pending {
    log: Arc<AccessLog>,
    entry: Option<Entry>,
    started: Instant,
    received: Arc<AtomicU64>,
    sent: u64,
}

impl Pending {
    fn done(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.received = self.received.load(Ordering::Relaxed);
            e.sent = self.sent;
            e.duration_ms = self.started.elapsed().as_millis();
            self.log.write(&e);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.done();
    }
}

/// A response body that writes the request's line at its end.
struct Logged {
    inner: Body,
    pending: Pending,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.pending.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.pending.done();
                }
            }
            Poll::Ready(None) => self.pending.done(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = &mut self.pending.entry
                    && e.flags.is_empty()
                {
                    // The upstream reset mid-body (Envoy: UR / DC).
                    e.flags = match e.side {
                        Side::Outbound => "UR".into(),
                        Side::Inbound => "DC".into(),
                    };
                }
                self.pending.done();
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The line of one TCP connection, written when the application drops
/// it: Envoy's TCP line (`"- - -" 0 <flags> <received> <sent> <ms> ... "<upstream host>"`).
/// Bytes are the application's: outbound, received is what it wrote and
/// sent what it read; inbound the other way round (Envoy counts from the
/// downstream's side).
#[derive(Debug)]
pub(crate) struct TcpLog {
    log: Arc<AccessLog>,
    entry: Entry,
    started: Instant,
    read: u64,
    written: u64,
}

impl TcpLog {
    pub(crate) fn new(
        log: Arc<AccessLog>,
        side: Side,
        upstream: &Upstream,
        peer: Option<String>,
        downstream: Option<SocketAddr>,
    ) -> Self {
        let dash = || "-".to_string();
        Self {
            log,
            entry: Entry {
                side,
                start: SystemTime::now(),
                method: dash(),
                path: dash(),
                protocol: "-",
                code: 0,
                flags: String::new(),
                received: 0,
                sent: 0,
                duration_ms: 0,
                upstream_service_time: None,
                forwarded_for: None,
                user_agent: None,
                request_id: None,
                authority: None,
                upstream_host: Some(upstream.address),
                upstream_cluster: Some(upstream.cluster.to_string()),
                peer,
                downstream,
            },
            started: Instant::now(),
            read: 0,
            written: 0,
        }
    }

    /// The application read `n` bytes.
    pub(crate) fn read(&mut self, n: usize) {
        self.read += n as u64;
    }

    /// The application wrote `n` bytes.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.written += n as u64;
    }
}

impl Drop for TcpLog {
    fn drop(&mut self) {
        let (received, sent) = match self.entry.side {
            Side::Outbound => (self.written, self.read),
            Side::Inbound => (self.read, self.written),
        };
        self.entry.received = received;
        self.entry.sent = sent;
        self.entry.duration_ms = self.started.elapsed().as_millis();
        self.log.write(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn start_time_is_envoys_utc_with_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_137_445_123);
        assert_eq!(rfc3339_millis(t), "2026-12-01T15:04:05.123Z");
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        // A leap day.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_strings_escape_what_a_client_may_send() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn the_variables_choose_target_and_format() {
        assert_eq!(AccessLogConfig::from_vars(None, None), Ok(None));
        assert_eq!(AccessLogConfig::from_vars(Some(" OFF "), None), Ok(None));
        assert_eq!(
            AccessLogConfig::from_vars(Some("stdout"), Some("json")),
            Ok(Some(
                AccessLogConfig::stdout().format(AccessLogFormat::Json)
            ))
        );
        assert_eq!(
            AccessLogConfig::from_vars(Some("/var/log/nasp.log"), None),
            Ok(Some(AccessLogConfig::file("/var/log/nasp.log")))
        );
        let e = AccessLogConfig::from_vars(Some("stdout"), Some("yaml")).expect_err("bad format");
        assert!(
            e.contains(ACCESS_LOG_FORMAT_VAR) && e.contains("yaml"),
            "{e}"
        );
    }
}
