//! The [`Mesh`] a process joins: a workload identity from the Istio CA,
//! the mesh from xDS, and clients and servers that carry the application's
//! HTTP, gRPC and TCP through both, with the proxy-wasm filters configured.
//!
//! ```text
//! Mesh::builder() ─ identity: SecretManager (CA client, rotation)  ──┐ certificate watch
//!                 ─ xDS: AdsClient (lock-free view)                ──┤ mesh view
//!                 ─ filters: one compiled module per plugin,       ──┤ chain pools
//!                   chains per worker, per direction                 │
//!   .build().await: waits for a certificate and a first snapshot    ▼
//! mesh.http_client() / grpc_channel() / connect() / bind() + serve()
//! ```
//!
//! One engine per runtime per process ([`crate::wasm::shared_runtime`]),
//! one connection pool per endpoint, one TLS configuration per destination
//! shape, whatever the number of clients asked for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use nasp_identity::{
    CaClient, CaClientConfig, KeyAlgorithm, RenewalPolicy, SecretManager, Source, SpiffeId,
    WorkloadCert,
};
use nasp_proxywasm::{HostEnv, PluginConfig, WasmModule};
use nasp_transport::filter::{
    ChainPool, ConnectionProperties, HttpFilterLayer, ListenerDirection, LocalCluster,
    NodeProperties, ServiceError, StreamProperties, filter_tcp,
};
use nasp_transport::{
    Body, BoxError, ClientSettings, GrpcChannel, HttpClient, InboundConfig, InboundMode,
    MeshConnector, MeshListener, MeshStream, MeshTcpStream, TcpConnector, Upstream, ViewSource,
};
use nasp_xds::{AdsClient, AdsConfig, ViewSettings, WorkloadSettings};
use tokio::sync::watch;
use tower::{Layer as _, Service, ServiceExt as _};

use crate::access_log::{AccessLog, AccessLogConfig, AccessLogLayer, Side, TcpLog};
use crate::trace::{Tracing, TracingConfig};

type CertWatch = watch::Receiver<Option<Arc<WorkloadCert>>>;

/// What can go wrong joining or using the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The configuration is incomplete or contradictory.
    #[error("mesh configuration: {0}")]
    Config(String),
    /// Identity failed (CA unreachable, refused, bad material).
    #[error(transparent)]
    Identity(#[from] nasp_identity::Error),
    /// xDS failed (no first snapshot in time, bad address).
    #[error(transparent)]
    Xds(#[from] nasp_xds::XdsError),
    /// A filter could not be loaded or started.
    #[error(transparent)]
    Wasm(#[from] nasp_proxywasm::Error),
    /// A socket could not be bound.
    #[error(transparent)]
    Transport(#[from] nasp_transport::Error),
    /// A client call could not be routed.
    #[error(transparent)]
    Client(#[from] nasp_transport::ClientError),
    /// A TCP connection through the mesh failed.
    #[error(transparent)]
    Connect(#[from] nasp_transport::tcp::ConnectError),
    /// `build()` gave up waiting.
    #[error("mesh not ready within {0:?}: {1}")]
    NotReady(Duration, String),
    /// The Prometheus endpoint could not be started (its port taken…).
    #[error("{0} (give MeshBuilder::prometheus or NASP_PROMETHEUS_ADDR another address, or `off`)")]
    Prometheus(#[from] nasp_telemetry::server::Error),
}

/// The variable [`MeshBuilder::from_env`] reads the Prometheus endpoint's
/// address from: `IP:PORT`, or `off`.
pub const PROMETHEUS_ADDR_VAR: &str = "NASP_PROMETHEUS_ADDR";

/// Where [`MeshBuilder::from_env`] serves Prometheus when
/// [`PROMETHEUS_ADDR_VAR`] is not set: every interface, Istio's port 15090,
/// as a sidecar does.
pub const DEFAULT_PROMETHEUS_ADDR: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    nasp_telemetry::server::ISTIO_PROMETHEUS_PORT,
);

/// [`PROMETHEUS_ADDR_VAR`]'s value: unset or empty is the default, `off`
/// none.
fn prometheus_addr_from(v: Option<&str>) -> Result<Option<SocketAddr>, MeshError> {
    match v.map(str::trim) {
        None | Some("") => Ok(Some(DEFAULT_PROMETHEUS_ADDR)),
        Some(v) if v.eq_ignore_ascii_case("off") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            MeshError::Config(format!(
                "{PROMETHEUS_ADDR_VAR}={v:?}: expected IP:PORT (0.0.0.0:15090) or off"
            ))
        }),
    }
}

/// Which traffic a filter sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterDirection {
    /// Requests the application serves (`SIDECAR_INBOUND`).
    Inbound,
    /// Requests the application sends (`SIDECAR_OUTBOUND`).
    Outbound,
}

/// What a filter is, as Envoy configures them apart: an HTTP filter sees
/// each request (`proxy_on_request_headers`…), a network filter each TCP
/// connection (`proxy_on_downstream_data`…).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FilterKind {
    /// On every HTTP and gRPC exchange.
    #[default]
    Http,
    /// On every TCP connection (`Mesh::connect`, `Mesh::serve_tcp`).
    Network,
}

/// A proxy-wasm filter to run.
#[derive(Clone, Debug)]
pub struct FilterSpec {
    /// The module's bytes.
    pub wasm: Arc<[u8]>,
    /// Its plugin configuration (name, root id, config, fail policy, limits).
    pub config: PluginConfig,
    /// Which traffic.
    pub direction: FilterDirection,
    /// HTTP or network filter.
    pub kind: FilterKind,
}

/// Where the control plane is.
#[derive(Clone, Debug)]
struct ControlPlaneTarget {
    xds: String,
    ca: String,
    roots_pem: Option<Vec<u8>>,
    root_file: Option<PathBuf>,
    server_name: String,
    token_file: Option<PathBuf>,
    /// xDS over TLS (istiod 15012); plaintext only for a local embedded
    /// control plane when asked.
    xds_tls: bool,
}

/// Builds a [`Mesh`].
#[must_use]
pub struct MeshBuilder {
    workload: WorkloadSettings,
    trust_domain: String,
    target: Option<ControlPlaneTarget>,
    certs: Option<CertWatch>,
    view: Option<Arc<dyn ViewSource>>,
    runtime: String,
    filters: Vec<FilterSpec>,
    default_filters: bool,
    ready_timeout: Duration,
    inbound_mode: Option<InboundMode>,
    client: ClientSettings,
    drain: Duration,
    workers: usize,
    prometheus: Option<SocketAddr>,
    access_log: Option<AccessLogConfig>,
    tracing: Option<TracingConfig>,
    /// Overrides the control plane's token file, whichever way that was
    /// given ([`MeshBuilder::token_file`]).
    token_file: Option<PathBuf>,
}

impl std::fmt::Debug for MeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBuilder")
            .field("workload", &self.workload.workload())
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Default for MeshBuilder {
    fn default() -> Self {
        Self {
            workload: WorkloadSettings::default(),
            trust_domain: "cluster.local".into(),
            target: None,
            certs: None,
            view: None,
            runtime: "wasmtime".into(),
            filters: Vec::new(),
            default_filters: true,
            ready_timeout: Duration::from_secs(30),
            inbound_mode: None,
            client: ClientSettings::default(),
            drain: Duration::from_secs(5),
            workers: nasp_transport::filter::default_workers(),
            prometheus: None,
            access_log: None,
            tracing: None,
            token_file: None,
        }
    }
}

/// A `discoveryAddress` in Istio's `mesh.yaml` (`defaultConfig:` block).
fn discovery_address(mesh_yaml: &str) -> Option<String> {
    mesh_yaml.lines().find_map(|l| {
        let v = l.trim().strip_prefix("discoveryAddress:")?.trim();
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

impl MeshBuilder {
    /// The workload: namespace, service account, labels… (Istio's agent
    /// variables: [`WorkloadSettings::from_env`]).
    pub fn workload(mut self, w: WorkloadSettings) -> Self {
        self.workload = w;
        self
    }

    /// The mesh trust domain (default `cluster.local`).
    pub fn trust_domain(mut self, td: impl Into<String>) -> Self {
        self.trust_domain = td.into();
        self
    }

    /// A control plane speaking Istio's protocols: xDS and the CA at
    /// `addr` (istiod: `istiod.istio-system.svc:15012`), its serving
    /// certificate chaining to `roots_pem`.
    pub fn control_plane(mut self, addr: impl Into<String>, roots_pem: impl Into<Vec<u8>>) -> Self {
        let addr = addr.into();
        self.target = Some(ControlPlaneTarget {
            xds: addr.clone(),
            ca: addr,
            roots_pem: Some(roots_pem.into()),
            root_file: None,
            server_name: nasp_identity::ca_client::DEFAULT_CA_SERVER_NAME.into(),
            token_file: None,
            xds_tls: true,
        });
        self
    }

    /// The embedded control plane (`nasp controlplane`, or
    /// `nasp::controlplane::ControlPlane` in-process) at `addr` with its
    /// root certificate; `token_file` holds a token it was given for this
    /// workload, if it checks tokens.
    pub fn embedded(
        self,
        addr: SocketAddr,
        root_pem: impl Into<Vec<u8>>,
        token_file: Option<PathBuf>,
    ) -> Self {
        let mut b = self.control_plane(addr.to_string(), root_pem);
        if let Some(t) = &mut b.target {
            t.token_file = token_file;
        }
        b
    }

    /// The bearer token the CA is shown (Istio's `istio-token`), read from
    /// `path` on every certificate request so a rotated token is picked up.
    /// Overrides the token of [`MeshBuilder::embedded`] or
    /// [`MeshBuilder::from_env`] whether called before or after them; with
    /// [`MeshBuilder::control_plane`] it is the only way to give one.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// Everything from the environment, the way an Istio VM workload is set
    /// up (`cluster.env` variables exported, files in Istio's places):
    /// - the workload from `POD_NAMESPACE`, `SERVICE_ACCOUNT`, `ISTIO_META_*`…;
    /// - the control plane from `CA_ADDR` / `DISCOVERY_ADDRESS`, else
    ///   `discoveryAddress` in the mesh config (`MESH_CONFIG_FILE`, default
    ///   `/etc/istio/config/mesh`, then `./mesh.yaml`);
    /// - the root from `ROOT_CERT` (default `/etc/certs/root-cert.pem`, then
    ///   `./root-cert.pem`), followed for rotation;
    /// - the token from `ISTIO_TOKEN` (default
    ///   `/var/run/secrets/tokens/istio-token`, then `./istio-token`);
    /// - the trust domain from `TRUST_DOMAIN`;
    /// - the Prometheus endpoint from `NASP_PROMETHEUS_ADDR` (`IP:PORT` or
    ///   `off`; default `0.0.0.0:15090`, a sidecar's, see
    ///   [`MeshBuilder::prometheus`]);
    /// - the access log from `NASP_ACCESS_LOG` (`stdout`, a file path, or
    ///   `off`, the default) and `NASP_ACCESS_LOG_FORMAT` (`text`, Envoy's
    ///   default format, or `json`; see [`MeshBuilder::access_log`]);
    /// - tracing from `NASP_OTLP_ENDPOINT` (the OTLP/gRPC collector, or
    ///   `off`, the default), `NASP_TRACE_SAMPLING` (percent, default 1) and
    ///   `NASP_TRACE_PROPAGATION` (see [`MeshBuilder::tracing`]).
    pub fn from_env() -> Result<Self, MeshError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`MeshBuilder::from_env`], with variables from `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, MeshError> {
        let first_file = |var: &str, defaults: &[&str]| -> Option<PathBuf> {
            if let Some(v) = get(var) {
                return Some(PathBuf::from(v));
            }
            defaults.iter().map(PathBuf::from).find(|p| p.is_file())
        };
        let mesh_file = first_file("MESH_CONFIG_FILE", &["/etc/istio/config/mesh", "mesh.yaml"]);
        let from_mesh = mesh_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| discovery_address(&t));
        let xds = get("DISCOVERY_ADDRESS").or(from_mesh).ok_or_else(|| {
            MeshError::Config(
                "no control plane: set DISCOVERY_ADDRESS or give a mesh config with discoveryAddress"
                    .into(),
            )
        })?;
        let ca = get("CA_ADDR").unwrap_or_else(|| xds.clone());
        let root = first_file("ROOT_CERT", &["/etc/certs/root-cert.pem", "root-cert.pem"])
            .ok_or_else(|| MeshError::Config("no root certificate (ROOT_CERT)".into()))?;
        let token = first_file(
            "ISTIO_TOKEN",
            &["/var/run/secrets/tokens/istio-token", "istio-token"],
        );
        let mut b = Self::default().workload(WorkloadSettings::from_lookup(&get));
        if let Some(td) = get("TRUST_DOMAIN") {
            b.trust_domain = td;
        }
        b.prometheus = prometheus_addr_from(get(PROMETHEUS_ADDR_VAR).as_deref())?;
        b.access_log = AccessLogConfig::from_vars(
            get(crate::access_log::ACCESS_LOG_VAR).as_deref(),
            get(crate::access_log::ACCESS_LOG_FORMAT_VAR).as_deref(),
        )
        .map_err(MeshError::Config)?;
        b.tracing = TracingConfig::from_vars(
            get(crate::trace::OTLP_ENDPOINT_VAR).as_deref(),
            get(crate::trace::TRACE_SAMPLING_VAR).as_deref(),
            get(crate::trace::TRACE_PROPAGATION_VAR).as_deref(),
        )
        .map_err(MeshError::Config)?;
        b.target = Some(ControlPlaneTarget {
            xds,
            ca,
            roots_pem: None,
            root_file: Some(root),
            server_name: get("CA_SERVER_NAME")
                .unwrap_or_else(|| nasp_identity::ca_client::DEFAULT_CA_SERVER_NAME.into()),
            token_file: token,
            xds_tls: true,
        });
        Ok(b)
    }

    /// Uses this certificate watch instead of a CA (certificates managed
    /// elsewhere, tests).
    pub fn certificates(mut self, certs: CertWatch) -> Self {
        self.certs = Some(certs);
        self
    }

    /// Uses this view of the mesh instead of xDS (a config dump, tests).
    pub fn view(mut self, view: Arc<dyn ViewSource>) -> Self {
        self.view = Some(view);
        self
    }

    /// The proxy-wasm runtime by name: `wasmtime` (default), `wasmi`, `wasm3`.
    pub fn runtime(mut self, name: impl Into<String>) -> Self {
        self.runtime = name.into();
        self
    }

    /// Adds a filter. It runs after the filters added before it, and after
    /// the default chain unless that is off
    /// ([`MeshBuilder::no_default_filters`]): by default a filter added
    /// here extends the chain, with it off the filters added here are the
    /// chain.
    pub fn filter(mut self, f: FilterSpec) -> Self {
        self.filters.push(f);
        self
    }

    /// Whether the mesh runs the default chain (on by default): our
    /// metadata-exchange and istio-stats filters, embedded in the library
    /// ([`crate::default_filters`]), inbound and outbound, for HTTP and
    /// TCP, before any filter given with [`MeshBuilder::filter`]. They give
    /// the workload Istio's standard metrics (`istio_requests_total`, …,
    /// in [`Mesh::metrics`]) and tell its peers who it is. Fail-open, and
    /// compiled once per runtime per process.
    pub fn default_filters(mut self, on: bool) -> Self {
        self.default_filters = on;
        self
    }

    /// No default chain: only the filters given with
    /// [`MeshBuilder::filter`] run (none: traffic passes untouched, no
    /// telemetry). To run Istio's own compiled filters instead of ours,
    /// turn the defaults off and add those. Inbound TCP then no longer
    /// agrees the `istio-peer-exchange` ALPN, so a caller's metadata
    /// preamble never reaches the application.
    pub fn no_default_filters(self) -> Self {
        self.default_filters(false)
    }

    /// How long `build()` waits for a certificate and a first snapshot
    /// (default 30 s).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// The inbound mode of listeners, overriding what xDS says for the port.
    pub fn inbound_mode(mut self, m: InboundMode) -> Self {
        self.inbound_mode = Some(m);
        self
    }

    /// Client settings (passthrough, pooling).
    pub fn client_settings(mut self, s: ClientSettings) -> Self {
        self.client = s;
        self
    }

    /// How long shutdown waits for requests in flight (default 5 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain = d;
        self
    }

    /// Filter workers: chains per direction (default: the CPU count).
    pub fn filter_workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Serves the filters' metrics (and anything else written into
    /// [`Mesh::metrics`]) as Prometheus text at `addr` (`/stats/prometheus`
    /// and `/metrics`, plain HTTP outside the mesh, as a sidecar's :15090;
    /// port 0 picks one, see [`Mesh::prometheus_addr`]), or not at all
    /// with `None`. Off unless set here — a process may hold several
    /// meshes — except from [`MeshBuilder::from_env`], which serves on
    /// [`DEFAULT_PROMETHEUS_ADDR`]. An address that cannot be bound fails
    /// [`MeshBuilder::build`] ([`MeshError::Prometheus`]).
    pub fn prometheus(mut self, addr: Option<SocketAddr>) -> Self {
        self.prometheus = addr;
        self
    }

    /// Writes one line per HTTP request the mesh sends or serves (Envoy's
    /// default access log format, or JSON) to stdout or a file, or none
    /// with `None` (the default; [`MeshBuilder::from_env`] reads
    /// `NASP_ACCESS_LOG`). A file that cannot be opened fails
    /// [`MeshBuilder::build`]. See [`crate::access_log`].
    pub fn access_log(mut self, config: Option<AccessLogConfig>) -> Self {
        self.access_log = config;
        self
    }

    /// Traces every HTTP and gRPC request the mesh sends or serves (a
    /// CLIENT / SERVER span each, W3C and B3 headers continued and
    /// written, Istio's sampling and span tags, OTLP/gRPC export), or not
    /// with `None` (the default; [`MeshBuilder::from_env`] reads
    /// `NASP_OTLP_ENDPOINT`). Needs the `otel` feature: without it a
    /// configuration fails [`MeshBuilder::build`]. See [`crate::trace`].
    pub fn tracing(mut self, config: Option<TracingConfig>) -> Self {
        self.tracing = config;
        self
    }

    /// Joins the mesh: starts identity and xDS, loads the filters, and waits
    /// (up to the ready timeout) for a certificate and a first snapshot.
    pub async fn build(self) -> Result<Mesh, MeshError> {
        let deadline = self.ready_timeout;
        let id = SpiffeId::new(
            &self.trust_domain,
            &self.workload.namespace,
            &self.workload.service_account,
        )
        .map_err(|e| MeshError::Config(e.to_string()))?;
        // The registry the filters write into, served from the start (a
        // taken port fails before any wait); dropped with an early error.
        let env = HostEnv::default();
        let prometheus = match self.prometheus {
            Some(addr) => Some(
                nasp_telemetry::server::PrometheusServer::bind(addr, env.metrics.clone()).await?,
            ),
            None => None,
        };
        let access_log = match &self.access_log {
            Some(c) => Some(
                AccessLog::open(c)
                    .map_err(|e| MeshError::Config(format!("access log {:?}: {e}", c.target)))?,
            ),
            None => None,
        };
        let tracing = match &self.tracing {
            Some(c) => Some(Tracing::start(c, &self.workload).map_err(MeshError::Config)?),
            None => None,
        };
        // Identity.
        let roots = match &self.target {
            Some(t) => Some(match (&t.roots_pem, &t.root_file) {
                (Some(p), _) => nasp_identity::cert::pem_certs(p)?,
                (None, Some(f)) => {
                    let pem = std::fs::read(f)
                        .map_err(|e| MeshError::Config(format!("reading {}: {e}", f.display())))?;
                    nasp_identity::cert::pem_certs(&pem)?
                }
                (None, None) => return Err(MeshError::Config("no root certificate".into())),
            }),
            None => None,
        };
        let mut secrets = None;
        let certs = match (self.certs, &self.target, &roots) {
            (Some(c), _, _) => c,
            (None, Some(t), Some(roots)) => {
                let mut cfg = CaClientConfig::new(t.ca.clone(), roots.clone());
                cfg.server_name = t.server_name.clone();
                cfg.token_file = self.token_file.clone().or_else(|| t.token_file.clone());
                cfg.root_file = t.root_file.clone();
                if !self.workload.cluster_id.is_empty() {
                    cfg.cluster_id = Some(self.workload.cluster_id.clone());
                }
                let manager = SecretManager::start(
                    Source::Ca {
                        client: CaClient::new(cfg)?,
                        id: id.clone(),
                        key: KeyAlgorithm::EcdsaP256,
                        ttl: Duration::from_secs(24 * 3600),
                        root_file: t.root_file.clone(),
                    },
                    RenewalPolicy::default(),
                );
                manager.ready(deadline).await.map_err(|e| {
                    MeshError::NotReady(deadline, format!("no certificate from {}: {e}", t.ca))
                })?;
                let w = manager.watch();
                secrets = Some(manager);
                w
            }
            _ => {
                return Err(MeshError::Config(
                    "no identity: give a control plane (control_plane / embedded / from_env) or certificates()"
                        .into(),
                ));
            }
        };
        // The mesh view.
        let mut ads = None;
        let view: Arc<dyn ViewSource> = match (self.view, &self.target) {
            (Some(v), _) => v,
            (None, Some(t)) => {
                let channel = xds_channel(t, roots.as_deref().unwrap_or(&[]), certs.clone())?;
                let mut cfg = AdsConfig::new(self.workload.node());
                // Istio's name table, as the agent's DNS proxy uses it:
                // names without a route of their own resolve to VIPs.
                cfg.nds = true;
                cfg.view = ViewSettings {
                    search_domains: self.workload.search_domains(),
                };
                let client = Arc::new(AdsClient::start(channel, cfg));
                client.ready(deadline).await.map_err(|e| {
                    MeshError::NotReady(deadline, format!("no xDS snapshot from {}: {e}", t.xds))
                })?;
                ads = Some(client.clone());
                client
            }
            (None, None) => {
                return Err(MeshError::Config(
                    "no mesh view: give a control plane or view()".into(),
                ));
            }
        };
        // Filters: each module compiled once (the defaults once per process),
        // instantiated per worker; the defaults first, then the user's.
        let node = Arc::new(NodeProperties::from_settings(&self.workload));
        let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
        let (mut inbound_tcp, mut outbound_tcp) = (Vec::new(), Vec::new());
        let mut chain: Vec<(WasmModule, &FilterSpec)> = Vec::new();
        let defaults = if self.default_filters {
            crate::default_filters::chain()
        } else {
            Vec::new()
        };
        if !defaults.is_empty() {
            let (mx, stats) = crate::default_filters::compiled(&self.runtime).map_err(|e| {
                MeshError::Config(format!(
                    "the default filters (metadata exchange, Istio stats) on runtime {:?}: {e} \
                     (choose a compiled-in runtime with MeshBuilder::runtime, or turn them off \
                     with MeshBuilder::no_default_filters)",
                    self.runtime
                ))
            })?;
            for (module, spec) in &defaults {
                let compiled = match module {
                    crate::default_filters::Module::MetadataExchange => mx.clone(),
                    crate::default_filters::Module::IstioStats => stats.clone(),
                };
                chain.push((compiled, spec));
            }
        }
        if !self.filters.is_empty() {
            let runtime = crate::wasm::shared_runtime(&self.runtime)?;
            for f in &self.filters {
                chain.push((WasmModule::new(runtime.as_ref(), &f.wasm)?, f));
            }
        }
        for (module, f) in chain {
            let list = match (f.direction, f.kind) {
                (FilterDirection::Inbound, FilterKind::Http) => &mut inbound,
                (FilterDirection::Outbound, FilterKind::Http) => &mut outbound,
                (FilterDirection::Inbound, FilterKind::Network) => &mut inbound_tcp,
                (FilterDirection::Outbound, FilterKind::Network) => &mut outbound_tcp,
            };
            // Root contexts read the node and the listener direction
            // from the plugin's provider (Istio's filters do in
            // proxy_on_configure); a config with its own keeps it.
            let mut config = f.config.clone();
            if config.properties.is_none() {
                let direction = match f.direction {
                    FilterDirection::Inbound => ListenerDirection::Inbound,
                    FilterDirection::Outbound => ListenerDirection::Outbound,
                };
                config.properties = Some(Arc::new(
                    nasp_transport::filter::ListenerProperties::new(node.clone(), direction),
                ));
            }
            list.push((module, config));
        }
        let pool = |plugins: &[(WasmModule, PluginConfig)]| -> Result<Arc<ChainPool>, MeshError> {
            if plugins.is_empty() {
                return Ok(Arc::new(ChainPool::empty()));
            }
            Ok(Arc::new(ChainPool::from_plugins(
                self.workers,
                plugins,
                &env,
            )?))
        };
        let inbound = pool(&inbound)?;
        let outbound = pool(&outbound)?;
        let inbound_tcp = pool(&inbound_tcp)?;
        let outbound_tcp = pool(&outbound_tcp)?;
        for p in [&inbound, &outbound, &inbound_tcp, &outbound_tcp] {
            ChainPool::spawn_maintenance(p, Duration::from_millis(100));
        }
        let local_ips: Arc<[std::net::IpAddr]> = self
            .workload
            .instance_ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let connector = MeshConnector::new(certs.clone());
        let mut client_settings = self.client.clone();
        if client_settings.source_ip.is_none() {
            client_settings.source_ip = self
                .workload
                .instance_ips
                .iter()
                .find_map(|ip| ip.parse().ok());
        }
        let http = HttpClient::with_settings(view.clone(), connector.clone(), client_settings);
        let mut tcp = TcpConnector::new(view.clone(), connector.clone());
        tcp.passthrough = self.client.passthrough;
        // Without our metadata exchange outbound, nothing would strip a
        // server's preamble: offer plain `istio` only.
        tcp.peer_exchange = self.default_filters;
        let (stop, _) = watch::channel(false);
        Ok(Mesh {
            inner: Arc::new(Inner {
                id,
                trust_domain: self.trust_domain,
                certs,
                _secrets: secrets,
                ads,
                view,
                http,
                tcp,
                node,
                local_ips,
                inbound,
                outbound,
                inbound_tcp,
                outbound_tcp,
                env,
                prometheus,
                inbound_mode: self.inbound_mode,
                peer_exchange: self.default_filters,
                access_log,
                tracing,
                drain: self.drain,
                stop,
                serving: AtomicUsize::new(0),
                served_done: tokio::sync::Notify::new(),
            }),
        })
    }
}

/// The xDS channel: TLS to the control plane (its certificate chaining to
/// the roots and naming `server_name`), presenting the workload
/// certificate as istio-agent does; plaintext only if asked.
fn xds_channel(
    t: &ControlPlaneTarget,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    certs: CertWatch,
) -> Result<tonic::transport::Channel, MeshError> {
    if !t.xds_tls {
        return Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", t.xds))
                .map_err(|e| MeshError::Config(format!("xDS address {:?}: {e}", t.xds)))?
                .connect_lazy(),
        );
    }
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| MeshError::Config(format!("root certificate: {e}")))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(nasp_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| MeshError::Config(e.to_string()))?
        .with_root_certificates(store)
        .with_client_cert_resolver(Arc::new(nasp_identity::tls::CertResolver::new(certs)));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let name = rustls_pki_types::ServerName::try_from(t.server_name.clone())
        .map_err(|e| MeshError::Config(format!("server name {:?}: {e}", t.server_name)))?;
    let dial = t.xds.clone();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (tls, name, dial) = (tls.clone(), name.clone(), dial.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&dial).await?;
            tcp.set_nodelay(true)?;
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{}", t.xds))
            .map_err(|e| MeshError::Config(format!("xDS address {:?}: {e}", t.xds)))?
            .connect_with_connector_lazy(connector),
    )
}

/// A TCP connection through the mesh, as the application holds it.
pub struct TcpConnection {
    io: TcpIo,
    upstream: Upstream,
    peer_id: Option<String>,
    peer_addr: Option<SocketAddr>,
    /// Its access log line, written when the connection is dropped.
    log: Option<TcpLog>,
}

enum TcpIo {
    Direct(MeshTcpStream),
    Inbound(MeshStream),
    Piped(tokio::io::DuplexStream),
}

impl std::fmt::Debug for TcpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnection")
            .field("upstream", &self.upstream)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl TcpConnection {
    /// Outbound: where the connection went. Inbound: the local listener
    /// (`inbound|<port>||`), with the ALPN the peer agreed.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Inbound: the caller's verified SPIFFE id (mTLS only).
    pub fn peer_id(&self) -> Option<&str> {
        self.peer_id.as_deref()
    }

    /// Inbound: the caller's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Whether bytes pass through proxy-wasm filters.
    pub fn is_filtered(&self) -> bool {
        matches!(self.io, TcpIo::Piped(_))
    }
}

macro_rules! each_io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            TcpIo::Direct($io) => $e,
            TcpIo::Inbound($io) => $e,
            TcpIo::Piped($io) => $e,
        }
    };
}

impl tokio::io::AsyncRead for TcpConnection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = self.get_mut();
        let r = match &mut this.io {
            TcpIo::Direct(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            TcpIo::Inbound(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            TcpIo::Piped(io) => std::pin::Pin::new(io).poll_read(cx, buf),
        };
        if let (std::task::Poll::Ready(Ok(())), Some(log)) = (&r, &mut this.log) {
            log.read(buf.filled().len().saturating_sub(before));
        }
        r
    }
}

impl tokio::io::AsyncWrite for TcpConnection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = match &mut this.io {
            TcpIo::Direct(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            TcpIo::Inbound(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            TcpIo::Piped(io) => std::pin::Pin::new(io).poll_write(cx, buf),
        };
        if let (std::task::Poll::Ready(Ok(n)), Some(log)) = (&r, &mut this.log) {
            log.wrote(*n);
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_shutdown(cx))
    }
}

struct Inner {
    id: SpiffeId,
    trust_domain: String,
    certs: CertWatch,
    _secrets: Option<SecretManager>,
    ads: Option<Arc<AdsClient>>,
    view: Arc<dyn ViewSource>,
    http: HttpClient,
    tcp: TcpConnector,
    node: Arc<NodeProperties>,
    /// The workload's instance IPs (which endpoints are this workload).
    local_ips: Arc<[std::net::IpAddr]>,
    inbound: Arc<ChainPool>,
    outbound: Arc<ChainPool>,
    inbound_tcp: Arc<ChainPool>,
    outbound_tcp: Arc<ChainPool>,
    env: HostEnv,
    prometheus: Option<nasp_telemetry::server::PrometheusServer>,
    inbound_mode: Option<InboundMode>,
    /// Whether inbound TCP runs our metadata exchange (the default chain),
    /// and so may agree the `istio-peer-exchange` ALPN.
    peer_exchange: bool,
    access_log: Option<Arc<AccessLog>>,
    tracing: Option<Arc<Tracing>>,
    drain: Duration,
    stop: watch::Sender<bool>,
    serving: AtomicUsize,
    served_done: tokio::sync::Notify,
}

/// One running [`Mesh::serve`] / [`Mesh::serve_tcp`], counted while it
/// lives. The count goes down in `Drop`, so a serve future that is dropped
/// (its task aborted, a `select!` that lost) is uncounted as surely as one
/// that returned, and [`Mesh::shutdown`] never waits the drain deadline for
/// a listener that is gone.
struct ServingGuard<'a>(&'a Inner);

impl<'a> ServingGuard<'a> {
    fn enter(inner: &'a Inner) -> Self {
        inner.serving.fetch_add(1, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for ServingGuard<'_> {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::SeqCst);
        self.0.served_done.notify_waiters();
    }
}

/// A process's membership of the mesh. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("id", &self.inner.id.to_string())
            .finish_non_exhaustive()
    }
}

fn unbox(e: ServiceError) -> BoxError {
    e.0
}

/// The HTTP client of a [`Mesh`]: routing, balancing, mTLS and the
/// outbound filters. A tower `Service`; cheap to clone.
pub type MeshHttpClient = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Extra calls on a [`MeshHttpClient`].
pub trait MeshHttpClientExt {
    /// Sends one request through the mesh.
    fn send(
        &self,
        req: Request<Body>,
    ) -> impl std::future::Future<Output = Result<Response<Body>, BoxError>> + Send;
    /// `GET url` through the mesh.
    fn get(
        &self,
        url: &str,
    ) -> impl std::future::Future<Output = Result<Response<Body>, BoxError>> + Send;
}

impl MeshHttpClientExt for MeshHttpClient {
    async fn send(&self, req: Request<Body>) -> Result<Response<Body>, BoxError> {
        self.clone().oneshot(req).await
    }

    async fn get(&self, url: &str) -> Result<Response<Body>, BoxError> {
        let req = Request::get(url).body(Body::empty())?;
        self.clone().oneshot(req).await
    }
}

impl Mesh {
    /// Starts configuring a mesh.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    /// This workload's SPIFFE id.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// The certificate in use now.
    pub fn certificate(&self) -> Option<Arc<WorkloadCert>> {
        self.inner.certs.borrow().clone()
    }

    /// Whether the mesh is usable: a valid certificate and a mesh view.
    pub fn is_ready(&self) -> bool {
        let cert_ok = self
            .certificate()
            .is_some_and(|c| c.not_after() > std::time::SystemTime::now());
        cert_ok && self.inner.ads.as_ref().is_none_or(|a| a.stats().acks > 0)
    }

    /// The metrics the filters define (`proxy_define_metric`), which the
    /// Prometheus endpoint serves; an application may add its own.
    pub fn metrics(&self) -> &nasp_telemetry::MetricsRegistry {
        &self.inner.env.metrics
    }

    /// Where the Prometheus endpoint listens (the port bound when 0 was
    /// asked), if it is on ([`MeshBuilder::prometheus`]).
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.inner.prometheus.as_ref().map(|p| p.local_addr())
    }

    /// The ADS client, when the view comes from xDS.
    pub fn xds(&self) -> Option<&Arc<AdsClient>> {
        self.inner.ads.as_ref()
    }

    /// The mesh view now.
    pub fn view(&self) -> Arc<nasp_xds::MeshView> {
        self.inner.view.view()
    }

    /// The services this workload serves on the listener `local`, from the
    /// view as it is when asked (`MeshView::local_services`).
    fn local_services(
        &self,
        local: SocketAddr,
    ) -> impl Fn() -> Arc<[nasp_xds::cluster::IstioService]> + Send + Sync + 'static {
        let (view, ips) = (self.inner.view.clone(), self.inner.local_ips.clone());
        move || view.view().local_services(local, &ips)
    }

    /// The HTTP client, with the outbound filters.
    pub fn http_client(&self) -> MeshHttpClient {
        let filters = HttpFilterLayer::new(
            self.inner.outbound.clone(),
            ListenerDirection::Outbound,
            self.inner.node.clone(),
        )
        .local_identity(self.inner.id.to_string());
        let client = tower::util::MapErr::new(
            filters.layer(self.inner.http.clone()),
            unbox as fn(ServiceError) -> BoxError,
        );
        // The access log outermost (the line says what the application
        // got), then the span (its headers reach the filters).
        match (&self.inner.tracing, &self.inner.access_log) {
            (None, Some(log)) => tower::util::BoxCloneSyncService::new(
                AccessLogLayer::new(log.clone(), Side::Outbound, None).layer(client),
            ),
            (None, None) => tower::util::BoxCloneSyncService::new(client),
            (Some(t), log) => {
                let traced = t.outbound(tower::util::BoxCloneSyncService::new(client), None);
                match log {
                    Some(log) => tower::util::BoxCloneSyncService::new(
                        AccessLogLayer::new(log.clone(), Side::Outbound, None).layer(traced),
                    ),
                    None => traced,
                }
            }
        }
    }

    /// The HTTP client without filters (no boxing).
    pub fn raw_http_client(&self) -> HttpClient {
        self.inner.http.clone()
    }

    /// A gRPC channel to `uri` (`http://backend.demo:9090`) for generated
    /// tonic clients, through the mesh and the outbound filters.
    pub fn grpc_channel(&self, uri: &str) -> Result<GrpcChannel<MeshHttpClient>, MeshError> {
        Ok(GrpcChannel::new(self.http_client(), uri)?)
    }

    /// A TCP connection to `host:port` through the mesh: mTLS with Istio's
    /// TCP ALPN (or plaintext where the view says so), through the outbound
    /// TCP filters when there are any.
    pub async fn connect(&self, target: &str) -> Result<TcpConnection, MeshError> {
        let stream = self.inner.tcp.connect(target).await?;
        let upstream = stream.upstream().clone();
        let log = self.inner.access_log.as_ref().map(|l| {
            let peer = upstream.peer_id.as_deref().map(str::to_string);
            TcpLog::new(l.clone(), Side::Outbound, &upstream, peer, None)
        });
        if self.inner.outbound_tcp.is_empty() {
            return Ok(TcpConnection {
                io: TcpIo::Direct(stream),
                upstream,
                peer_id: None,
                peer_addr: None,
                log,
            });
        }
        // The application writes into one end of a pipe; the filters run
        // each chunk on its way to the upstream and back.
        let (app, pump) = tokio::io::duplex(64 * 1024);
        let props = Arc::new(StreamProperties::new(
            self.inner.node.clone(),
            ListenerDirection::Outbound,
            ConnectionProperties {
                destination: Some(upstream.address),
                mtls: upstream.mtls,
                peer_san: upstream.peer_id.as_deref().map(str::to_string),
                local_san: Some(self.inner.id.to_string().into()),
                negotiated_protocol: upstream.alpn.as_deref().map(str::to_string),
                ..Default::default()
            },
        ));
        props.set_upstream(upstream.clone());
        let pool = self.inner.outbound_tcp.clone();
        tokio::spawn(async move {
            if let Err(e) = filter_tcp(&pool, pump, stream, props).await {
                tracing::debug!("outbound TCP through filters ended: {e}");
            }
        });
        Ok(TcpConnection {
            io: TcpIo::Piped(app),
            upstream,
            peer_id: None,
            peer_addr: None,
            log,
        })
    }

    /// Serves raw TCP on `listener` until [`Mesh::shutdown`]: `handler`
    /// gets each connection (the peer's verified id with it), through the
    /// inbound TCP filters when there are any.
    pub async fn serve_tcp<F, Fut>(&self, mut listener: MeshListener, handler: F)
    where
        F: Fn(TcpConnection) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let local = listener.local_addr();
        let services = self.local_services(local);
        let mut stop = self.inner.stop.subscribe();
        let _serving = ServingGuard::enter(&self.inner);
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(conn) = conn else { break };
            let handler = handler.clone();
            let peer_id = conn.peer_id.as_ref().map(ToString::to_string);
            let upstream = Upstream {
                cluster: Arc::from(format!("inbound|{}||", local.port())),
                route: Arc::from(""),
                address: local,
                mtls: conn.is_mtls(),
                peer_id: None,
                alpn: conn
                    .alpn
                    .as_ref()
                    .map(|a| Arc::from(String::from_utf8_lossy(a).into_owned())),
                attempts: 1,
                services: services(),
            };
            let peer_addr = Some(conn.peer_addr);
            let log = self.inner.access_log.as_ref().map(|l| {
                TcpLog::new(
                    l.clone(),
                    Side::Inbound,
                    &upstream,
                    peer_id.clone(),
                    peer_addr,
                )
            });
            if self.inner.inbound_tcp.is_empty() {
                tokio::spawn(handler(TcpConnection {
                    io: TcpIo::Inbound(conn.stream),
                    upstream,
                    peer_id,
                    peer_addr,
                    log,
                }));
                continue;
            }
            let (app, pump) = tokio::io::duplex(64 * 1024);
            let props = Arc::new(StreamProperties::new(
                self.inner.node.clone(),
                ListenerDirection::Inbound,
                ConnectionProperties {
                    source: peer_addr,
                    destination: Some(local),
                    mtls: conn.is_mtls(),
                    peer_san: peer_id.clone(),
                    local_san: Some(self.inner.id.to_string().into()),
                    negotiated_protocol: upstream.alpn.as_deref().map(str::to_string),
                    local_cluster: Some(LocalCluster {
                        name: upstream.cluster.clone(),
                        services: upstream.services.clone(),
                    }),
                    ..Default::default()
                },
            ));
            let pool = self.inner.inbound_tcp.clone();
            tokio::spawn(async move {
                if let Err(e) = filter_tcp(&pool, conn.stream, pump, props).await {
                    tracing::debug!("inbound TCP through filters ended: {e}");
                }
            });
            tokio::spawn(handler(TcpConnection {
                io: TcpIo::Piped(app),
                upstream,
                peer_id,
                peer_addr,
                log,
            }));
        }
    }

    /// A mesh listener on `addr`: STRICT / PERMISSIVE / DISABLE as xDS says
    /// for the port (the builder's `inbound_mode` overrides; PERMISSIVE when
    /// xDS says nothing, as Istio's default).
    pub async fn bind(&self, addr: SocketAddr) -> Result<MeshListener, MeshError> {
        let mode =
            self.inner
                .inbound_mode
                .unwrap_or_else(|| match self.view().inbound(addr.port()) {
                    Some(i) if i.tls && !i.permissive => InboundMode::Strict,
                    Some(i) if !i.tls => InboundMode::Disable,
                    _ => InboundMode::Permissive,
                });
        let mut config = InboundConfig::new(mode, self.inner.trust_domain.as_str());
        if !self.inner.peer_exchange {
            // Without our metadata exchange nothing would strip a caller's
            // preamble: agree plain `istio` instead, as a sidecar without
            // the exchange filter does, and the caller's filter sends none.
            config
                .alpn
                .retain(|p| p.as_slice() != b"istio-peer-exchange");
        }
        Ok(MeshListener::bind(addr, self.inner.certs.clone(), config).await?)
    }

    /// Serves `service` (HTTP/1.1 and HTTP/2: hyper, axum, tonic) on
    /// `listener` with the inbound filters, until [`Mesh::shutdown`]; then
    /// drains requests in flight. Each request carries the verified
    /// [`nasp_transport::MeshPeer`].
    pub async fn serve<S, B>(&self, listener: MeshListener, service: S)
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let local = listener.local_addr();
        let app = tower::util::MapResponse::new(
            tower::util::MapErr::new(service, Into::<BoxError>::into as fn(S::Error) -> BoxError),
            (|r: Response<B>| r.map(Body::new)) as fn(Response<B>) -> Response<Body>,
        );
        let filtered = HttpFilterLayer::new(
            self.inner.inbound.clone(),
            ListenerDirection::Inbound,
            self.inner.node.clone(),
        )
        .local_identity(self.inner.id.to_string())
        .local_addr(local)
        .local_services(self.local_services(local))
        .layer(app);
        let filtered = tower::util::MapErr::new(filtered, unbox as fn(ServiceError) -> BoxError);
        let svc: tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, BoxError> =
            match (&self.inner.tracing, &self.inner.access_log) {
                // Outermost: the line says what the caller got, filters'
                // local replies included; then the span.
                (None, Some(log)) => tower::util::BoxCloneSyncService::new(
                    AccessLogLayer::new(log.clone(), Side::Inbound, Some(local)).layer(filtered),
                ),
                (None, None) => tower::util::BoxCloneSyncService::new(filtered),
                (Some(t), log) => {
                    let traced = t.inbound(tower::util::BoxCloneSyncService::new(filtered), local);
                    match log {
                        Some(log) => tower::util::BoxCloneSyncService::new(
                            AccessLogLayer::new(log.clone(), Side::Inbound, Some(local))
                                .layer(traced),
                        ),
                        None => traced,
                    }
                }
            };
        let hyper_svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            svc.clone().oneshot(req.map(Body::new))
        });
        let mut stop = self.inner.stop.subscribe();
        let _serving = ServingGuard::enter(&self.inner);
        let left = nasp_transport::serve_http_until(
            listener,
            hyper_svc,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
            self.inner.drain,
        )
        .await;
        if left > 0 {
            tracing::warn!(%local, "{left} connections still open after the drain");
        }
    }

    /// Stops every [`Mesh::serve`]: no new connections, requests in flight
    /// get the drain timeout to finish. Returns when all have stopped; the
    /// Prometheus endpoint stops last, so a scrape during the drain still
    /// sees the counts.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.inner.drain + Duration::from_secs(1);
        while self.inner.serving.load(Ordering::SeqCst) > 0 {
            let wait = self.inner.served_done.notified();
            if self.inner.serving.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                break;
            }
        }
        // Spans of the drained requests are sent before the process goes.
        if let Some(t) = &self.inner.tracing {
            t.shutdown().await;
        }
        if let Some(p) = &self.inner.prometheus {
            p.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_address_is_read_from_mesh_yaml() {
        let yaml = "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  proxyMetadata: {}\n";
        assert_eq!(
            discovery_address(yaml).as_deref(),
            Some("istiod.istio-system.svc:15012")
        );
        assert_eq!(
            discovery_address("defaultConfig:\n  discoveryAddress: \"a:1\"\n").as_deref(),
            Some("a:1")
        );
        assert_eq!(discovery_address("defaultConfig: {}\n"), None);
    }

    #[test]
    fn from_env_needs_a_control_plane_and_a_root() {
        let e = MeshBuilder::from_lookup(|_| None).expect_err("nothing set");
        assert!(e.to_string().contains("DISCOVERY_ADDRESS"), "{e}");
        let e = MeshBuilder::from_lookup(|k| match k {
            "DISCOVERY_ADDRESS" => Some("127.0.0.1:15012".into()),
            "ROOT_CERT" => None,
            _ => None,
        });
        // No ROOT_CERT and (normally) no /etc/certs/root-cert.pem here.
        if !std::path::Path::new("/etc/certs/root-cert.pem").exists()
            && !std::path::Path::new("root-cert.pem").exists()
        {
            let e = e.expect_err("no root");
            assert!(e.to_string().contains("ROOT_CERT"), "{e}");
        }
        let b = MeshBuilder::from_lookup(|k| match k {
            "DISCOVERY_ADDRESS" => Some("127.0.0.1:15012".into()),
            "CA_ADDR" => Some("127.0.0.1:15013".into()),
            "ROOT_CERT" => Some("/tmp/root.pem".into()),
            "POD_NAMESPACE" => Some("demo".into()),
            "SERVICE_ACCOUNT" => Some("web".into()),
            "TRUST_DOMAIN" => Some("example.org".into()),
            _ => None,
        })
        .expect("builder");
        let t = b.target.as_ref().expect("target");
        assert_eq!(
            (t.xds.as_str(), t.ca.as_str()),
            ("127.0.0.1:15012", "127.0.0.1:15013")
        );
        assert_eq!(b.trust_domain, "example.org");
        assert_eq!(b.workload.namespace, "demo");
        assert_eq!(b.workload.service_account, "web");
        assert_eq!(b.prometheus, Some(DEFAULT_PROMETHEUS_ADDR));
    }

    #[test]
    fn the_prometheus_address_comes_from_nasp_prometheus_addr() {
        let with = |v: Option<&str>| {
            MeshBuilder::from_lookup(|k| match k {
                "DISCOVERY_ADDRESS" => Some("127.0.0.1:15012".into()),
                "ROOT_CERT" => Some("/tmp/root.pem".into()),
                PROMETHEUS_ADDR_VAR => v.map(str::to_string),
                _ => None,
            })
            .map(|b| b.prometheus)
        };
        assert_eq!(DEFAULT_PROMETHEUS_ADDR.to_string(), "0.0.0.0:15090");
        assert_eq!(with(None).expect("default"), Some(DEFAULT_PROMETHEUS_ADDR));
        assert_eq!(
            with(Some("")).expect("empty"),
            Some(DEFAULT_PROMETHEUS_ADDR)
        );
        assert_eq!(with(Some("off")).expect("off"), None);
        assert_eq!(with(Some(" OFF ")).expect("OFF"), None);
        assert_eq!(
            with(Some("127.0.8.9:9102")).expect("address"),
            Some("127.0.8.9:9102".parse().expect("addr"))
        );
        for bad in ["15090", "localhost:15090", "on", "0.0.0.0"] {
            let e = with(Some(bad)).expect_err(bad);
            assert!(
                e.to_string().contains("NASP_PROMETHEUS_ADDR") && e.to_string().contains(bad),
                "{e}"
            );
        }
        // Off unless asked, for a mesh built in code.
        assert_eq!(Mesh::builder().prometheus, None);
    }

    #[test]
    fn the_access_log_is_off_unless_configured() {
        assert_eq!(Mesh::builder().access_log, None);
        let with = |log: Option<&str>, format: Option<&str>| {
            MeshBuilder::from_lookup(|k| match k {
                "DISCOVERY_ADDRESS" => Some("127.0.0.1:15012".into()),
                "ROOT_CERT" => Some("/tmp/root.pem".into()),
                "NASP_ACCESS_LOG" => log.map(str::to_string),
                "NASP_ACCESS_LOG_FORMAT" => format.map(str::to_string),
                _ => None,
            })
            .map(|b| b.access_log)
        };
        assert_eq!(with(None, None).expect("unset"), None);
        assert_eq!(with(Some("off"), Some("json")).expect("off"), None);
        assert_eq!(
            with(Some("stdout"), None).expect("stdout"),
            Some(AccessLogConfig::stdout())
        );
        let e = with(Some("/tmp/a.log"), Some("xml")).expect_err("bad format");
        assert!(e.to_string().contains("NASP_ACCESS_LOG_FORMAT"), "{e}");
    }
}
