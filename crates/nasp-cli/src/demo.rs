//! `nasp demo`: README's main job, in one process.
//!
//! The embedded control plane (Istio CA + ADS) on a loopback address
//! serves the traffic example's mesh (`examples/mesh/traffic.yaml`); a
//! `backend` service runs three replicas (two of v1, one of v2), each its
//! own [`Mesh`] with the identity `demo/backend`, serving HTTP and the gRPC
//! echo service under STRICT mTLS; a `frontend` [`Mesh`] (`demo/frontend`)
//! calls it over HTTP and gRPC with a few requests in flight. Four phases
//! change the mesh under live traffic: the 90/10 split, a shift to 50/50
//! pushed over xDS, a replica stopped without telling the control plane
//! (Istio's retry policy keeps every request succeeding, then the replica
//! leaves the mesh file), and everything to v2. Each phase checks what a
//! user would look for (who got the traffic, zero failed requests) and the
//! demo exits non-zero naming the phase whose expectation failed.
//!
//! Invariants: nothing here panics, whatever the network or the terminal
//! does — a closed stdout (`nasp demo | head`) ends the demo quietly; every
//! address is on loopback; no lock is held across an `.await`.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nasp::controlplane::mesh::{MeshFile, RouteDestination};
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::transport::{Body, LocalReply, MeshPeer, Upstream};
use nasp::xds::WorkloadSettings;
use nasp::{Mesh, MeshHttpClientExt as _};
use nasp_proto::echo::EchoRequest;
use nasp_proto::echo::echo_client::EchoClient;
use tokio::sync::watch;

/// The traffic example; the demo moves its addresses to `--ip` and gives
/// the backend its own service account (what callers verify).
const TRAFFIC_YAML: &str = include_str!("../../../examples/mesh/traffic.yaml");

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const TRUST_DOMAIN: &str = "cluster.local";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Short phases (about 3 s each instead of 12 s), for tests and a quick look.
    #[arg(long)]
    quick: bool,
    /// Cycle through the phases until Ctrl-C (the stopped replica comes back
    /// at the start of each cycle).
    #[arg(long)]
    forever: bool,
    /// The first of five consecutive loopback addresses: the control plane
    /// on it, the backend replicas on the next three, the frontend's
    /// endpoint on the fifth.
    #[arg(long, default_value = "127.0.0.1")]
    ip: Ipv4Addr,
    /// HTTP requests in flight (as many gRPC calls again).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
}

/// Which protocol a request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Http,
    Grpc,
}

/// A backend replica: its name, version label and address.
#[derive(Clone, Debug)]
struct ReplicaSpec {
    name: &'static str,
    version: &'static str,
    ip: Ipv4Addr,
}

/// The replicas, in table order.
fn replica_specs(base: Ipv4Addr) -> Vec<ReplicaSpec> {
    let o = base.octets();
    let at = |n: u8| Ipv4Addr::new(o[0], o[1], o[2], o[3].saturating_add(n));
    vec![
        ReplicaSpec {
            name: "v1-a",
            version: "v1",
            ip: at(1),
        },
        ReplicaSpec {
            name: "v1-b",
            version: "v1",
            ip: at(2),
        },
        ReplicaSpec {
            name: "v2-a",
            version: "v2",
            ip: at(3),
        },
    ]
}

/// The replica the demo stops in phase 3.
const LOST: usize = 1;

/// The demo's mesh: the traffic example with the backend's endpoints on
/// `replicas` (the lost one left out when `with_lost` is false), its
/// service account `backend`, the frontend on `frontend`, and this split.
fn demo_mesh(
    replicas: &[ReplicaSpec],
    frontend: Ipv4Addr,
    v1: u32,
    v2: u32,
    with_lost: bool,
) -> Result<MeshFile> {
    let mut mesh = MeshFile::parse(TRAFFIC_YAML).context("the built-in traffic mesh")?;
    let backend = mesh
        .service_mut("backend", "demo")
        .ok_or_else(|| anyhow!("the built-in mesh has no backend.demo"))?;
    backend.service_account = "backend".into();
    if backend.endpoints.len() != replicas.len() {
        bail!(
            "the built-in mesh has {} backend endpoints, the demo runs {}",
            backend.endpoints.len(),
            replicas.len()
        );
    }
    for (e, r) in backend.endpoints.iter_mut().zip(replicas) {
        e.ip = r.ip.to_string();
    }
    if !with_lost {
        let lost = replicas[LOST].ip.to_string();
        backend.endpoints.retain(|e| e.ip != lost);
    }
    let split = backend
        .routes
        .iter_mut()
        .find(|r| r.name.as_deref() == Some("split"))
        .ok_or_else(|| anyhow!("the built-in mesh has no `split` route"))?;
    split.route = vec![
        RouteDestination::subset("v1", v1),
        RouteDestination::subset("v2", v2),
    ];
    let front = mesh
        .service_mut("frontend", "demo")
        .ok_or_else(|| anyhow!("the built-in mesh has no frontend.demo"))?;
    front.service_account = "frontend".into();
    for e in &mut front.endpoints {
        e.ip = frontend.to_string();
    }
    Ok(mesh)
}

/// Token files for the CA: one random token per identity, in a private
/// directory removed when the demo ends.
struct Tokens {
    dir: PathBuf,
    policy: String,
}

impl Tokens {
    fn create(ids: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("nasp-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut policy = String::new();
        for sa in ids {
            let token = format!("{:032x}", rand::random::<u128>());
            write_private(&dir.join(sa), &token)?;
            policy.push_str(&format!(
                "{token} spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}\n"
            ));
        }
        Ok(Self { dir, policy })
    }

    fn file(&self, sa: &str) -> PathBuf {
        self.dir.join(sa)
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Joins the mesh as `demo/<sa>` with the token registered for it.
async fn join(
    cp: &ControlPlane,
    tokens: &Tokens,
    sa: &str,
    pod: &str,
    ip: Ipv4Addr,
) -> Result<Mesh> {
    let workload = WorkloadSettings {
        pod_name: pod.into(),
        namespace: "demo".into(),
        service_account: sa.into(),
        workload_name: sa.into(),
        instance_ips: vec![ip.to_string()],
        ..Default::default()
    };
    Mesh::builder()
        .workload(workload)
        .embedded(
            cp.addr(),
            cp.root_pem().as_bytes().to_vec(),
            Some(tokens.file(sa)),
        )
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(2))
        .build()
        .await
        .with_context(|| format!("{pod} joining the mesh"))
}

/// A running replica.
struct Replica {
    mesh: Mesh,
}

/// Starts a backend replica: HTTP on :8080 answers who it is and who
/// called (the caller's SPIFFE id as its listener verified it), gRPC on
/// :9090 is the echo service.
async fn start_replica(cp: &ControlPlane, tokens: &Tokens, spec: &ReplicaSpec) -> Result<Replica> {
    let mesh = join(
        cp,
        tokens,
        "backend",
        &format!("backend-{}", spec.name),
        spec.ip,
    )
    .await?;
    let http = mesh
        .bind(SocketAddr::new(IpAddr::V4(spec.ip), HTTP_PORT))
        .await
        .with_context(|| format!("replica {} HTTP", spec.name))?;
    let name = spec.name;
    let app = tower::service_fn(move |req: http::Request<Body>| async move {
        let peer = req
            .extensions()
            .get::<MeshPeer>()
            .and_then(|p| p.id.as_ref())
            .map_or_else(String::new, ToString::to_string);
        let resp = http::Response::builder()
            .header("x-served-by", name)
            .header("x-peer", peer);
        let resp = resp
            .body(Body::from(format!("hello from backend {name}\n")))
            .map_err(|e| -> nasp::transport::BoxError { e.into() })?;
        Ok::<_, nasp::transport::BoxError>(resp)
    });
    let m = mesh.clone();
    tokio::spawn(async move { m.serve(http, app).await });
    let grpc_addr = SocketAddr::new(IpAddr::V4(spec.ip), GRPC_PORT);
    let grpc = mesh
        .bind(grpc_addr)
        .await
        .with_context(|| format!("replica {} gRPC", spec.name))?;
    let routes = tonic::service::Routes::new(
        nasp::transport::EchoService::new(spec.name, grpc_addr.to_string()).into_server(),
    );
    let m = mesh.clone();
    tokio::spawn(async move { m.serve(grpc, routes).await });
    Ok(Replica { mesh })
}

/// Counts since some moment: successful requests per protocol and
/// replica, failures, retries.
#[derive(Clone, Debug, Default)]
struct Counts {
    ok: BTreeMap<(Proto, usize), u64>,
    failed: u64,
    retried: u64,
}

impl Counts {
    fn total(&self, p: Proto) -> u64 {
        self.ok
            .iter()
            .filter(|((q, _), _)| *q == p)
            .map(|(_, n)| n)
            .sum()
    }

    fn of(&self, p: Proto, replica: usize) -> u64 {
        self.ok.get(&(p, replica)).copied().unwrap_or(0)
    }

    /// Share of `p`'s requests that `replica` served, in percent.
    fn share(&self, p: Proto, replica: usize) -> f64 {
        let total = self.total(p);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.of(p, replica) as f64 / total as f64
    }

    fn all_ok(&self) -> u64 {
        self.ok.values().sum()
    }
}

/// Everything the workers report.
#[derive(Debug, Default)]
struct Tally {
    /// Since the last refresh.
    window: Counts,
    /// Since the current phase's traffic settled (what is checked).
    settled: Counts,
    /// Failures during the whole current phase (settling included).
    phase_failed: u64,
    /// Whether `settled` is counting.
    settling_done: bool,
    total: Counts,
    last_error: Option<String>,
    /// The backend's SPIFFE ids as the frontend verified them, with counts.
    backend_ids: BTreeMap<String, u64>,
    /// The caller's SPIFFE ids as the backends saw them, with counts.
    caller_ids: BTreeMap<String, u64>,
}

type Shared = Arc<Mutex<Tally>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    // A worker cannot panic while holding the lock (no code in the
    // critical sections panics); a poisoned lock would still hold counts.
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One request's outcome as a worker saw it.
enum Outcome {
    Ok {
        replica: usize,
        attempts: u32,
        backend_id: String,
        caller_id: String,
    },
    Failed(String),
}

fn record(t: &Shared, proto: Proto, outcome: Outcome) {
    let mut guard = lock(t);
    let t = &mut *guard;
    match outcome {
        Outcome::Ok {
            replica,
            attempts,
            backend_id,
            caller_id,
        } => {
            let retried = u64::from(attempts > 1);
            let settled = t.settling_done;
            for c in [&mut t.window, &mut t.total] {
                *c.ok.entry((proto, replica)).or_default() += 1;
                c.retried += retried;
            }
            if settled {
                *t.settled.ok.entry((proto, replica)).or_default() += 1;
                t.settled.retried += retried;
            }
            *t.backend_ids.entry(backend_id).or_default() += 1;
            *t.caller_ids.entry(caller_id).or_default() += 1;
        }
        Outcome::Failed(e) => {
            t.window.failed += 1;
            t.total.failed += 1;
            t.settled.failed += 1;
            t.phase_failed += 1;
            t.last_error = Some(e);
        }
    }
}

/// How a response maps to a replica: by the endpoint the client reports.
fn replica_of(replicas: &[ReplicaSpec], up: &Upstream) -> Option<usize> {
    replicas
        .iter()
        .position(|r| up.address.ip() == IpAddr::V4(r.ip))
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const PACE: Duration = Duration::from_millis(5);

async fn http_worker(
    client: nasp::MeshHttpClient,
    replicas: Arc<Vec<ReplicaSpec>>,
    tally: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("http://backend.demo:{HTTP_PORT}/");
    while !*stop.borrow() {
        let outcome = match http::Request::get(&url).body(Body::empty()) {
            Err(e) => Outcome::Failed(format!("HTTP request: {e}")),
            Ok(req) => match tokio::time::timeout(REQUEST_TIMEOUT, client.send(req)).await {
                Err(_) => Outcome::Failed(format!("HTTP: no answer within {REQUEST_TIMEOUT:?}")),
                Ok(Err(e)) => Outcome::Failed(format!("HTTP: {e}")),
                Ok(Ok(resp)) => http_outcome(&replicas, resp).await,
            },
        };
        record(&tally, Proto::Http, outcome);
        tokio::select! {
            _ = tokio::time::sleep(PACE) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn http_outcome(replicas: &[ReplicaSpec], resp: http::Response<Body>) -> Outcome {
    let status = resp.status();
    let up = resp.extensions().get::<Upstream>().cloned();
    let local = resp.extensions().get::<LocalReply>().cloned();
    let caller = resp
        .headers()
        .get("x-peer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect_bytes().await;
    if !status.is_success() {
        return Outcome::Failed(match local {
            Some(l) => format!("HTTP {status} ({} {})", l.flags, l.details),
            None => format!("HTTP {status} from the backend"),
        });
    }
    if let Err(e) = body {
        return Outcome::Failed(format!("HTTP body: {e}"));
    }
    upstream_outcome(replicas, up, caller, "HTTP")
}

fn upstream_outcome(
    replicas: &[ReplicaSpec],
    up: Option<Upstream>,
    caller_id: String,
    what: &str,
) -> Outcome {
    let Some(up) = up else {
        return Outcome::Failed(format!("{what}: the response has no upstream record"));
    };
    let Some(replica) = replica_of(replicas, &up) else {
        return Outcome::Failed(format!("{what}: answered by {}, not a replica", up.address));
    };
    let Some(backend_id) = up.peer_id.as_deref().map(str::to_string) else {
        return Outcome::Failed(format!(
            "{what}: {} answered without mTLS (no verified peer)",
            up.address
        ));
    };
    if caller_id.is_empty() {
        return Outcome::Failed(format!(
            "{what}: {} did not see a verified caller",
            up.address
        ));
    }
    Outcome::Ok {
        replica,
        attempts: up.attempts,
        backend_id,
        caller_id,
    }
}

/// The frontend's gRPC channel with a named error type: with the boxed
/// error tonic's bounds are stated over, rustc cannot prove a spawned
/// call's future `Send` ("implementation of `From` is not general
/// enough"); a named error sidesteps that, as `ServiceError` does in the
/// transport.
#[derive(Clone)]
struct Channel(nasp::transport::GrpcChannel<nasp::MeshHttpClient>);

#[derive(Debug)]
struct ChannelError(nasp::transport::BoxError);

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ChannelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

type ChannelFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<Body>, ChannelError>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = ChannelError;
    type Future = ChannelFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.0, cx)
            .map_err(ChannelError)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let call = tower::Service::call(&mut self.0, req);
        Box::pin(async move { call.await.map_err(ChannelError) })
    }
}

async fn grpc_worker(
    frontend: Mesh,
    replicas: Arc<Vec<ReplicaSpec>>,
    tally: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let channel = match frontend.grpc_channel(&format!("http://backend.demo:{GRPC_PORT}")) {
        Ok(c) => c,
        Err(e) => {
            record(
                &tally,
                Proto::Grpc,
                Outcome::Failed(format!("gRPC channel: {e}")),
            );
            return;
        }
    };
    let mut echo = EchoClient::new(Channel(channel));
    while !*stop.borrow() {
        let call = echo.echo(EchoRequest {
            message: "ping".into(),
            count: 0,
        });
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Err(_) => Outcome::Failed(format!("gRPC: no answer within {REQUEST_TIMEOUT:?}")),
            Ok(Err(status)) => {
                Outcome::Failed(format!("gRPC {:?}: {}", status.code(), status.message()))
            }
            Ok(Ok(resp)) => {
                let up = resp.extensions().get::<Upstream>().cloned();
                let reply = resp.into_inner();
                upstream_outcome(&replicas, up, reply.peer, "gRPC")
            }
        };
        record(&tally, Proto::Grpc, outcome);
        tokio::select! {
            _ = tokio::time::sleep(PACE) => {}
            _ = stop.changed() => {}
        }
    }
}

/// The terminal: a table redrawn in place on a TTY, plain lines otherwise.
/// A write that fails (the reader went away) marks it closed; the demo
/// then ends quietly.
struct Screen {
    tty: bool,
    drawn: usize,
    table: Vec<String>,
    closed: watch::Sender<bool>,
}

impl Screen {
    fn write(&mut self, text: &str) {
        if *self.closed.borrow() {
            return;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            let _ = self.closed.send(true);
        }
    }

    /// A line that stays (phase changes, results).
    fn line(&mut self, line: &str) {
        if self.tty && self.drawn > 0 {
            let mut text = format!("\x1b[{}A\r\x1b[J{line}\n", self.drawn);
            for l in &self.table {
                text.push_str(l);
                text.push_str("\x1b[K\n");
            }
            self.write(&text);
        } else {
            self.write(&format!("{line}\n"));
        }
    }

    /// The live view: the table on a TTY, one summary line otherwise.
    fn refresh(&mut self, table: Vec<String>, summary: &str) {
        if !self.tty {
            self.write(&format!("{summary}\n"));
            return;
        }
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A\r", self.drawn));
        }
        for l in &table {
            text.push_str(l);
            text.push_str("\x1b[K\n");
        }
        if self.drawn > table.len() {
            text.push_str("\x1b[J");
        }
        self.drawn = table.len();
        self.table = table;
        self.write(&text);
    }
}

type SharedScreen = Arc<Mutex<Screen>>;

fn lock_screen(s: &SharedScreen) -> std::sync::MutexGuard<'_, Screen> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the live view shows besides the counts.
#[derive(Clone, Debug)]
struct Status {
    phase: String,
    split: (u32, u32),
    up: Vec<bool>,
}

fn pct(c: &Counts, p: Proto, i: usize) -> String {
    if c.total(p) == 0 {
        "-".into()
    } else {
        format!("{:.0}%", c.share(p, i))
    }
}

/// The per-second line of plain mode.
fn summary_line(
    elapsed: Duration,
    status: &Status,
    replicas: &[ReplicaSpec],
    w: &Counts,
    secs: f64,
) -> String {
    let split = |p: Proto| {
        replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{} {}", r.name, pct(w, p, i)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "[{:>5.1}s] {} | {:.0} req/s | http {} | grpc {} | failed {} retried {}",
        elapsed.as_secs_f64(),
        status.phase,
        (w.all_ok() + w.failed) as f64 / secs,
        split(Proto::Http),
        split(Proto::Grpc),
        w.failed,
        w.retried,
    )
}

/// The table of TTY mode.
fn table(
    elapsed: Duration,
    status: &Status,
    replicas: &[ReplicaSpec],
    w: &Counts,
    t: &Tally,
    secs: f64,
) -> Vec<String> {
    let mut out = vec![
        format!(
            "nasp demo — {}   (t = {:.0} s, Ctrl-C to stop)",
            status.phase,
            elapsed.as_secs_f64()
        ),
        format!(
            "backend.demo routes: v1 {} % / v2 {} % (canary header → v2), STRICT mTLS",
            status.split.0, status.split.1
        ),
        String::new(),
        format!(
            "{:<7} {:<16} {:<8} {:>7} {:>7}  {}",
            "replica", "endpoint", "version", "HTTP", "gRPC", "state"
        ),
    ];
    for (i, r) in replicas.iter().enumerate() {
        out.push(format!(
            "{:<7} {:<16} {:<8} {:>7} {:>7}  {}",
            r.name,
            r.ip.to_string(),
            r.version,
            pct(w, Proto::Http, i),
            pct(w, Proto::Grpc, i),
            if status.up.get(i).copied().unwrap_or(false) {
                "serving"
            } else {
                "stopped"
            }
        ));
    }
    let rate = |n: u64| n as f64 / secs;
    out.push(String::new());
    out.push(format!(
        "requests/s  {:.0} (HTTP {:.0}, gRPC {:.0})   total {}   failed {}   retried by the mesh {}",
        rate(w.all_ok() + w.failed),
        rate(w.total(Proto::Http)),
        rate(w.total(Proto::Grpc)),
        t.total.all_ok() + t.total.failed,
        t.total.failed,
        t.total.retried,
    ));
    let ids = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    out.push(format!(
        "identities  backend {} (verified by the frontend)",
        ids(&t.backend_ids)
    ));
    out.push(format!(
        "            caller  {} (as the backends saw it)",
        ids(&t.caller_ids)
    ));
    out.push(format!(
        "errors      {} (last: {})",
        t.total.failed,
        t.last_error.as_deref().unwrap_or("-")
    ));
    out
}

/// The four phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Split,
    Shift,
    ReplicaLost,
    AllToV2,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Split,
        Phase::Shift,
        Phase::ReplicaLost,
        Phase::AllToV2,
    ];

    fn title(self) -> &'static str {
        match self {
            Phase::Split => "split 90/10",
            Phase::Shift => "shift to 50/50",
            Phase::ReplicaLost => "replica v1-b lost",
            Phase::AllToV2 => "all to v2 (0/100)",
        }
    }

    fn split(self) -> (u32, u32) {
        match self {
            Phase::Split => (90, 10),
            Phase::Shift | Phase::ReplicaLost => (50, 50),
            Phase::AllToV2 => (0, 100),
        }
    }

    /// Whether the settled traffic is what this phase should give; the
    /// reason when not.
    fn check(self, c: &Counts, failed: u64) -> std::result::Result<(), String> {
        if failed > 0 {
            return Err(format!("{failed} requests failed"));
        }
        for p in [Proto::Http, Proto::Grpc] {
            let name = if p == Proto::Http { "HTTP" } else { "gRPC" };
            let total = c.total(p);
            if total < 10 {
                return Err(format!("only {total} {name} requests succeeded"));
            }
            let v2 = c.share(p, 2);
            let served = |i: usize| c.of(p, i) > 0;
            let names = ["v1-a", "v1-b", "v2-a"];
            let need = |is: &[usize]| -> std::result::Result<(), String> {
                for &i in is {
                    if !served(i) {
                        return Err(format!("{name}: {} got no traffic", names[i]));
                    }
                }
                Ok(())
            };
            match self {
                Phase::Split => {
                    need(&[0, 1, 2])?;
                    if !(2.0..=25.0).contains(&v2) {
                        return Err(format!("{name}: v2 got {v2:.1} %, expected about 10 %"));
                    }
                }
                Phase::Shift => {
                    need(&[0, 1, 2])?;
                    if !(30.0..=70.0).contains(&v2) {
                        return Err(format!("{name}: v2 got {v2:.1} %, expected about 50 %"));
                    }
                }
                Phase::ReplicaLost => {
                    need(&[0, 2])?;
                    if served(LOST) {
                        return Err(format!(
                            "{name}: the stopped replica v1-b still answered {} requests",
                            c.of(p, LOST)
                        ));
                    }
                }
                Phase::AllToV2 => {
                    if v2 < 99.0 {
                        return Err(format!("{name}: v2 got {v2:.1} %, expected 100 %"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn phase_result(replicas: &[ReplicaSpec], c: &Counts) -> String {
    let part = |p: Proto| {
        replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{} {:.1}%", r.name, c.share(p, i)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "http {} ({} req) | grpc {} ({} req) | failed {} | retried {}",
        part(Proto::Http),
        c.total(Proto::Http),
        part(Proto::Grpc),
        c.total(Proto::Grpc),
        c.failed,
        c.retried
    )
}

/// The running pieces.
struct Demo {
    cp: Option<ControlPlane>,
    tokens: Tokens,
    specs: Arc<Vec<ReplicaSpec>>,
    replicas: Vec<Option<Replica>>,
    frontend_ip: Ipv4Addr,
    tally: Shared,
    screen: SharedScreen,
    status: Arc<Mutex<Status>>,
    phase_len: Duration,
    settle: Duration,
    start: Instant,
}

impl Demo {
    fn cp(&self) -> Result<&ControlPlane> {
        self.cp
            .as_ref()
            .ok_or_else(|| anyhow!("the control plane has stopped"))
    }

    fn push(&self, split: (u32, u32), with_lost: bool) -> Result<()> {
        let mesh = demo_mesh(&self.specs, self.frontend_ip, split.0, split.1, with_lost)?;
        self.cp()?
            .set_mesh(&mesh)
            .context("pushing the mesh over xDS")?;
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        s.split = split;
        Ok(())
    }

    fn say(&self, line: &str) {
        lock_screen(&self.screen).line(line);
    }

    fn set_phase(&self, label: String, up: Option<(usize, bool)>) {
        let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        s.phase = label;
        if let Some((i, v)) = up
            && let Some(u) = s.up.get_mut(i)
        {
            *u = v;
        }
    }

    /// Starts counting a new phase: settled counts stop until `settle` is
    /// called.
    fn reset_phase(&self) {
        let mut t = lock(&self.tally);
        t.settled = Counts::default();
        t.settling_done = false;
        t.phase_failed = 0;
    }

    fn start_settled(&self) {
        let mut t = lock(&self.tally);
        t.settled = Counts::default();
        t.settling_done = true;
    }

    /// Runs one phase: its change, the settle time, the rest of the phase,
    /// then the check.
    async fn phase(&mut self, n: usize, cycle: u64, phase: Phase) -> Result<()> {
        let label = if cycle > 1 {
            format!("phase {n}/4 (cycle {cycle}): {}", phase.title())
        } else {
            format!("phase {n}/4: {}", phase.title())
        };
        let begun = Instant::now();
        self.reset_phase();
        let (v1, v2) = phase.split();
        match phase {
            Phase::Split => {
                if self.replicas.get(LOST).is_some_and(Option::is_none) {
                    // A new cycle: the lost replica comes back first.
                    let spec = self.specs[LOST].clone();
                    let m = start_replica(self.cp()?, &self.tokens, &spec).await?;
                    self.replicas[LOST] = Some(m);
                    self.set_phase(label.clone(), Some((LOST, true)));
                }
                self.push((v1, v2), true)?;
                self.say(&format!(
                    "{label} — v1 {v1} % / v2 {v2} % by weight (a VirtualService split over DestinationRule subsets); inside v1, round robin"
                ));
            }
            Phase::Shift => {
                self.push((v1, v2), true)?;
                self.say(&format!(
                    "{label} — v1 {v1} % / v2 {v2} %, pushed live over xDS (ControlPlane::set_mesh)"
                ));
            }
            Phase::ReplicaLost => {
                self.say(&format!(
                    "{label} — stopping replica v1-b ({}) without telling the control plane; Istio's retry policy (connect-failure, other hosts) takes over",
                    self.specs[LOST].ip
                ));
                self.set_phase(label.clone(), None);
                if let Some(r) = self.replicas.get_mut(LOST).and_then(Option::take) {
                    r.mesh.shutdown().await;
                }
                self.set_phase(label.clone(), Some((LOST, false)));
            }
            Phase::AllToV2 => {
                self.push((v1, v2), false)?;
                self.say(&format!(
                    "{label} — v1 {v1} % / v2 {v2} %, pushed live over xDS"
                ));
            }
        }
        self.set_phase(label.clone(), None);
        tokio::time::sleep(self.settle).await;
        self.start_settled();
        if phase == Phase::ReplicaLost {
            // A third of the way in, the replica also leaves the mesh
            // file, as a Kubernetes endpoint controller would remove it.
            let third = self.phase_len / 3;
            tokio::time::sleep(third.saturating_sub(begun.elapsed())).await;
            self.push((v1, v2), false)?;
            self.say(&format!(
                "          v1-b ({}) removed from the mesh file, pushed over xDS",
                self.specs[LOST].ip
            ));
        }
        tokio::time::sleep(self.phase_len.saturating_sub(begun.elapsed())).await;
        let (settled, failed, last) = {
            let t = lock(&self.tally);
            (t.settled.clone(), t.phase_failed, t.last_error.clone())
        };
        let result = phase_result(&self.specs, &settled);
        match phase.check(&settled, failed) {
            Ok(()) => {
                self.say(&format!("{label} ok: {result}"));
                Ok(())
            }
            Err(why) => {
                let last = last
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                self.say(&format!("{label} FAILED: {why}: {result}"));
                Err(anyhow!("demo failed in {label}: {why}{last}"))
            }
        }
    }

    async fn phases(&mut self, forever: bool) -> Result<()> {
        let mut cycle = 0;
        loop {
            cycle += 1;
            for (i, p) in Phase::ALL.into_iter().enumerate() {
                self.phase(i + 1, cycle, p).await?;
            }
            if !forever {
                return Ok(());
            }
        }
    }
}

/// Refreshes the live view once a second.
async fn refresher(
    tally: Shared,
    screen: SharedScreen,
    status: Arc<Mutex<Status>>,
    specs: Arc<Vec<ReplicaSpec>>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = Instant::now();
    let mut seen_backend = 0usize;
    let mut seen_caller = 0usize;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let secs = last.elapsed().as_secs_f64().max(0.001);
        last = Instant::now();
        let status = status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (rows, summary, new_ids) = {
            let mut t = lock(&tally);
            let w = std::mem::take(&mut t.window);
            let elapsed = start.elapsed();
            let rows = table(elapsed, &status, &specs, &w, &t, secs);
            let summary = summary_line(elapsed, &status, &specs, &w, secs);
            let mut new_ids = Vec::new();
            if t.backend_ids.len() > seen_backend {
                seen_backend = t.backend_ids.len();
                for id in t.backend_ids.keys() {
                    new_ids.push(format!(
                        "identity: backend replicas are {id} (verified by the frontend in the mTLS handshake)"
                    ));
                }
            }
            if t.caller_ids.len() > seen_caller {
                seen_caller = t.caller_ids.len();
                for id in t.caller_ids.keys() {
                    new_ids.push(format!(
                        "identity: the backends saw the caller as {id} (its client certificate)"
                    ));
                }
            }
            (rows, summary, new_ids)
        };
        let mut s = lock_screen(&screen);
        for l in new_ids {
            s.line(&l);
        }
        s.refresh(rows, &summary);
    }
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

async fn run(args: DemoArgs) -> Result<()> {
    let base = args.ip;
    if !base.is_loopback() || base.octets()[3] > 250 {
        bail!("--ip {base}: the demo needs five loopback addresses from it (127.x.y.z, z ≤ 250)");
    }
    let (phase_len, settle) = if args.quick {
        (Duration::from_millis(2500), Duration::from_millis(700))
    } else {
        (Duration::from_secs(12), Duration::from_secs(2))
    };
    let specs = Arc::new(replica_specs(base));
    let o = base.octets();
    let frontend_ip = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 4);
    let (closed, mut closed_rx) = watch::channel(false);
    let screen = Arc::new(Mutex::new(Screen {
        tty: std::io::stdout().is_terminal(),
        drawn: 0,
        table: Vec::new(),
        closed,
    }));

    // The control plane: a CA that signs only for the two registered
    // tokens, and the mesh over ADS.
    let tokens = Tokens::create(&["backend", "frontend"])?;
    let ca = CertificateAuthority::generate(TRUST_DOMAIN)?
        .tokens(TokenPolicy::from_text(&tokens.policy)?);
    let mesh = demo_mesh(&specs, frontend_ip, 90, 10, true)?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(base), 0))
        .await
        .with_context(|| format!("listening on {base}"))?;
    let cp = ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: Some(Arc::new(SnapshotCache::from_mesh(&mesh)?)),
        },
    )?;
    lock_screen(&screen).line(&format!(
        "nasp demo: control plane (Istio CA + xDS) on {}, trust domain {TRUST_DOMAIN}; the CA signs only for a token registered per identity",
        cp.addr()
    ));
    let mut replicas = Vec::new();
    for s in specs.iter() {
        replicas.push(Some(start_replica(&cp, &tokens, s).await?));
    }
    let frontend = join(&cp, &tokens, "frontend", "frontend-0", frontend_ip).await?;
    lock_screen(&screen).line(&format!(
        "nasp demo: backend.demo replicas {} (HTTP :{HTTP_PORT}, gRPC :{GRPC_PORT}, STRICT mTLS) as {}; frontend as {}, {} HTTP + {} gRPC requests in flight",
        specs
            .iter()
            .map(|s| format!("{} {} {}", s.name, s.version, s.ip))
            .collect::<Vec<_>>()
            .join(", "),
        replicas
            .first()
            .and_then(Option::as_ref)
            .map_or_else(String::new, |r| r.mesh.id().to_string()),
        frontend.id(),
        args.concurrency,
        args.concurrency,
    ));

    let tally: Shared = Arc::default();
    let status = Arc::new(Mutex::new(Status {
        phase: "starting".into(),
        split: (90, 10),
        up: vec![true; specs.len()],
    }));
    let (stop, stop_rx) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        workers.push(tokio::spawn(http_worker(
            frontend.http_client(),
            specs.clone(),
            tally.clone(),
            stop_rx.clone(),
        )));
        workers.push(tokio::spawn(grpc_worker(
            frontend.clone(),
            specs.clone(),
            tally.clone(),
            stop_rx.clone(),
        )));
    }
    let start = Instant::now();
    workers.push(tokio::spawn(refresher(
        tally.clone(),
        screen.clone(),
        status.clone(),
        specs.clone(),
        start,
        stop_rx.clone(),
    )));
    let mut demo = Demo {
        cp: Some(cp),
        tokens,
        specs: specs.clone(),
        replicas,
        frontend_ip,
        tally: tally.clone(),
        screen: screen.clone(),
        status,
        phase_len,
        settle,
        start,
    };
    let outcome = tokio::select! {
        r = demo.phases(args.forever) => r.map(|()| true),
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        _ = closed_rx.wait_for(|c| *c) => Ok(false),
    };
    let _ = stop.send(true);
    for w in workers {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, w).await;
    }
    let elapsed = demo.start.elapsed();
    let total = lock(&tally).total.clone();
    frontend.shutdown().await;
    for r in demo.replicas.iter().flatten() {
        r.mesh.shutdown().await;
    }
    if let Some(cp) = demo.cp.take() {
        cp.shutdown().await;
    }
    match outcome {
        Ok(true) => {
            lock_screen(&screen).line(&format!(
                "demo ok in {:.1} s: {} requests ({} HTTP, {} gRPC) over mTLS, 0 failed, {} retried by the mesh",
                elapsed.as_secs_f64(),
                total.all_ok() + total.failed,
                total.total(Proto::Http),
                total.total(Proto::Grpc),
                total.retried,
            ));
            Ok(())
        }
        // The reader went away (`nasp demo | head`): nothing to report to.
        Ok(false) => Ok(()),
        Err(e) if e.to_string() == "interrupted" && args.forever && total.failed == 0 => {
            lock_screen(&screen).line(&format!(
                "demo stopped: {} requests, 0 failed, {} retried by the mesh",
                total.all_ok(),
                total.retried
            ));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_mesh_moves_to_the_chosen_addresses() {
        let specs = replica_specs(Ipv4Addr::new(127, 0, 3, 10));
        let mesh = demo_mesh(&specs, Ipv4Addr::new(127, 0, 3, 14), 50, 50, false).expect("mesh");
        let backend = mesh
            .services
            .iter()
            .find(|s| s.name == "backend")
            .expect("backend");
        let ips: Vec<&str> = backend.endpoints.iter().map(|e| e.ip.as_str()).collect();
        assert_eq!(ips, ["127.0.3.11", "127.0.3.13"]);
        assert_eq!(backend.service_account, "backend");
        mesh.generate().expect("generates");
    }

    #[test]
    fn checks_name_what_went_wrong() {
        let mut c = Counts::default();
        for p in [Proto::Http, Proto::Grpc] {
            c.ok.insert((p, 0), 45);
            c.ok.insert((p, 1), 45);
            c.ok.insert((p, 2), 10);
        }
        assert!(Phase::Split.check(&c, 0).is_ok());
        assert!(Phase::Split.check(&c, 1).is_err());
        let e = Phase::Shift.check(&c, 0).expect_err("10 % is not 50 %");
        assert!(e.contains("expected about 50 %"), "{e}");
        let e = Phase::ReplicaLost.check(&c, 0).expect_err("v1-b served");
        assert!(e.contains("v1-b"), "{e}");
        assert!(Phase::AllToV2.check(&c, 0).is_err());
    }
}
