//! The ADS client.
//!
//! One background task keeps one ADS stream (SotW or Delta) to the control
//! plane over a caller-built tonic [`Channel`] (plaintext, TLS or mTLS — the
//! caller decides). It subscribes CDS and LDS as wildcards, EDS and RDS by the
//! names the clusters and listeners refer to (unsubscribing what is no longer
//! referenced), ACKs good responses and NACKs bad ones with the last good
//! version, the response nonce and an error detail, while the last good
//! configuration stays in force. After every accepted response it rebuilds
//! the [`MeshView`] and swaps it in atomically; readers never lock.
//!
//! When the stream fails it reconnects with exponential backoff and jitter,
//! resubscribing with what it has (SotW: the last versions; Delta:
//! `initial_resource_versions`). Lookups keep answering from the last view
//! meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::types::{self, CLUSTER, Decoded, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use crate::{MeshView, ResourceSet, ViewSettings, XdsError};

/// SotW or Delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// State of the World.
    #[default]
    Sotw,
    /// Incremental (Delta) xDS.
    Delta,
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct AdsConfig {
    /// The node the control plane sees (id, cluster, metadata).
    pub node: Node,
    /// SotW or Delta.
    pub protocol: Protocol,
    /// How lookups resolve names.
    pub view: ViewSettings,
    /// First reconnect delay (default 500 ms).
    pub backoff_initial: Duration,
    /// Longest reconnect delay (default 30 s).
    pub backoff_max: Duration,
    /// Subscribe to Istio's NDS name table (names → IPs for lookups).
    pub nds: bool,
}

impl AdsConfig {
    /// Defaults for `node`.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            protocol: Protocol::Sotw,
            view: ViewSettings::default(),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            nds: false,
        }
    }
}

/// Counters of the client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Responses accepted.
    pub acks: u64,
    /// Responses rejected.
    pub nacks: u64,
    /// Streams opened after the first.
    pub reconnects: u64,
    /// Whether a stream is up now.
    pub connected: bool,
    /// The last rejection's message.
    pub last_nack: Option<String>,
}

#[derive(Default)]
struct TypeState {
    version: String,
    nonce: String,
    names: BTreeSet<String>,
    received: bool,
    /// Delta: name → version the client holds.
    versions: HashMap<String, String>,
}

struct Shared {
    resources: ResourceSet,
    types: HashMap<&'static str, TypeState>,
    names: HashMap<String, Vec<std::net::IpAddr>>,
}

/// A running ADS client. Dropping it stops the background task.
#[derive(Debug)]
pub struct AdsClient {
    view: Arc<ArcSwap<MeshView>>,
    shared: Arc<Mutex<SharedHandle>>,
    ready: watch::Receiver<bool>,
    stats: watch::Receiver<ClientStats>,
    task: tokio::task::JoinHandle<()>,
}

/// Opaque holder so `AdsClient` can derive Debug.
struct SharedHandle(Shared);

impl std::fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedHandle")
    }
}

impl Drop for AdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Worker {
    channel: Channel,
    config: AdsConfig,
    view: Arc<ArcSwap<MeshView>>,
    shared: Arc<Mutex<SharedHandle>>,
    ready: watch::Sender<bool>,
    stats: watch::Sender<ClientStats>,
}

fn lock(m: &Mutex<SharedHandle>) -> std::sync::MutexGuard<'_, SharedHandle> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AdsClient {
    /// Starts the client on `channel` (needs a tokio runtime).
    pub fn start(channel: Channel, config: AdsConfig) -> Self {
        let view = Arc::new(ArcSwap::from_pointee(MeshView::default()));
        let shared = Arc::new(Mutex::new(SharedHandle(Shared {
            resources: ResourceSet::default(),
            types: HashMap::new(),
            names: HashMap::new(),
        })));
        let (ready_tx, ready_rx) = watch::channel(false);
        let (stats_tx, stats_rx) = watch::channel(ClientStats::default());
        let worker = Worker {
            channel,
            config,
            view: view.clone(),
            shared: shared.clone(),
            ready: ready_tx,
            stats: stats_tx,
        };
        let task = tokio::spawn(worker.run());
        Self {
            view,
            shared,
            ready: ready_rx,
            stats: stats_rx,
            task,
        }
    }

    /// The current resolved view (cheap: an `Arc` clone, no lock).
    pub fn view(&self) -> Arc<MeshView> {
        self.view.load_full()
    }

    /// Waits until every subscribed type has been received once.
    pub async fn ready(&self, timeout: Duration) -> Result<(), XdsError> {
        let mut rx = self.ready.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(XdsError::Transport(format!(
                "not ready after {timeout:?} ({:?})",
                self.stats()
            ))),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats.borrow().clone()
    }

    /// A watch of the counters.
    pub fn watch_stats(&self) -> watch::Receiver<ClientStats> {
        self.stats.clone()
    }

    /// The raw resources the client holds.
    pub fn resources(&self) -> ResourceSet {
        lock(&self.shared).0.resources.clone()
    }

    /// What the client holds, as an Envoy admin config dump (JSON).
    pub fn config_dump(&self) -> Result<serde_json::Value, XdsError> {
        let (set, versions) = {
            let g = lock(&self.shared);
            let versions =
                g.0.types
                    .iter()
                    .map(|(t, s)| (t.to_string(), s.version.clone()))
                    .collect();
            (g.0.resources.clone(), versions)
        };
        crate::dump::write_config_dump(&set, &versions)
    }

    /// The accepted version of each type.
    pub fn versions(&self) -> HashMap<String, String> {
        lock(&self.shared)
            .0
            .types
            .iter()
            .map(|(t, s)| (t.to_string(), s.version.clone()))
            .collect()
    }
}

fn nack_detail(e: &XdsError) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: e.to_string(),
        details: Vec::new(),
    }
}

impl Worker {
    async fn run(self) {
        let mut backoff = self.config.backoff_initial;
        let mut first = true;
        loop {
            if !first {
                self.stats.send_modify(|s| s.reconnects += 1);
            }
            first = false;
            let r = match self.config.protocol {
                Protocol::Sotw => self.sotw().await,
                Protocol::Delta => self.delta().await,
            };
            self.stats.send_modify(|s| s.connected = false);
            let healthy = match r {
                Ok(had_data) => had_data,
                Err(e) => {
                    tracing::warn!("ADS stream failed: {e}");
                    false
                }
            };
            if healthy {
                backoff = self.config.backoff_initial;
            }
            let jitter = 1.0 + rand::random_range(-0.2..=0.2);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            if !healthy {
                backoff = (backoff * 2).min(self.config.backoff_max);
            }
        }
    }

    fn acked(&self) {
        self.stats.send_modify(|s| s.acks += 1);
    }

    fn nacked(&self, e: &XdsError) {
        tracing::warn!("NACK: {e}");
        self.stats.send_modify(|s| {
            s.nacks += 1;
            s.last_nack = Some(e.to_string());
        });
    }

    fn rebuild(&self, shared: &Shared) {
        let view = MeshView::build(
            &shared.resources,
            shared.names.clone(),
            self.config.view.clone(),
        );
        self.view.store(Arc::new(view));
        // The EDS and RDS subscriptions were brought up to date with the
        // resources before every rebuild, so they say what is referenced.
        let got = |t: &str| shared.types.get(t).is_some_and(|s| s.received);
        let wanted = |t: &str| shared.types.get(t).is_some_and(|s| !s.names.is_empty());
        let ready = got(CLUSTER)
            && got(LISTENER)
            && (!wanted(ENDPOINT) || got(ENDPOINT))
            && (!wanted(ROUTE) || got(ROUTE))
            && (!self.config.nds || got(NAME_TABLE));
        if ready {
            self.ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
    }

    /// Which names each type should be subscribed to now (`None`: wildcard).
    fn wanted(&self, shared: &Shared) -> Vec<(&'static str, Option<BTreeSet<String>>)> {
        let (eds, rds) = types::referenced(&shared.resources);
        let mut v = vec![
            (CLUSTER, None),
            (LISTENER, None),
            (ENDPOINT, Some(eds)),
            (ROUTE, Some(rds)),
        ];
        if self.config.nds {
            v.push((NAME_TABLE, None));
        }
        v
    }

    /// Reads an NDS response; `Err` is a NACK.
    fn name_table(
        resources: &[envoy_types::pb::google::protobuf::Any],
    ) -> Result<HashMap<String, Vec<std::net::IpAddr>>, XdsError> {
        use prost::Message;
        let mut names = HashMap::new();
        for any in resources {
            let table =
                nasp_proto::istio_nds::NameTable::decode(any.value.as_slice()).map_err(|e| {
                    XdsError::Resource {
                        type_url: NAME_TABLE.to_string(),
                        name: String::new(),
                        message: e.to_string(),
                    }
                })?;
            for (host, info) in table.table {
                let ips = info.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
                names.insert(host.to_ascii_lowercase(), ips);
            }
        }
        Ok(names)
    }

    /// Feeds each response of a stream to `handle` and sends the requests it
    /// produces, until the stream ends. `Ok(true)` if it carried data (a
    /// stream that worked for a while ends normally and resets the backoff).
    async fn pump<Req, Resp>(
        &self,
        mut inbound: tonic::Streaming<Resp>,
        tx: &mpsc::Sender<Req>,
        handle: fn(&Self, Resp, &mut Vec<Req>),
    ) -> Result<bool, XdsError> {
        self.stats.send_modify(|s| s.connected = true);
        let mut had_data = false;
        loop {
            let resp = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(had_data),
                Err(_) if had_data => return Ok(true),
                Err(s) => {
                    return Err(XdsError::Transport(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )));
                }
            };
            had_data = true;
            let mut out = Vec::new();
            handle(self, resp, &mut out);
            for r in out {
                if tx.send(r).await.is_err() {
                    return Ok(had_data);
                }
            }
        }
    }

    /// Runs one SotW stream. `Ok(true)` if it carried data before ending.
    async fn sotw(&self) -> Result<bool, XdsError> {
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut node = Some(self.config.node.clone());
        // (Re)subscribe: wildcards first, then what is already referenced.
        {
            let mut g = lock(&self.shared);
            let shared = &mut g.0;
            for (type_url, names) in self.wanted(shared) {
                if names.as_ref().is_some_and(|n| n.is_empty()) {
                    continue;
                }
                let st = shared.types.entry(type_url).or_default();
                st.names = names.unwrap_or_default();
                st.nonce.clear();
                let req = DiscoveryRequest {
                    version_info: st.version.clone(),
                    node: node.take(),
                    resource_names: st.names.iter().cloned().collect(),
                    type_url: type_url.to_string(),
                    ..Default::default()
                };
                tx.try_send(req)
                    .map_err(|e| XdsError::Transport(e.to_string()))?;
            }
        }
        let inbound = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|s| XdsError::Transport(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        self.pump(inbound, &tx, Self::on_sotw).await
    }

    fn on_sotw(&self, resp: DiscoveryResponse, out: &mut Vec<DiscoveryRequest>) {
        if resp.type_url == NAME_TABLE && self.config.nds {
            let mut g = lock(&self.shared);
            let shared = &mut g.0;
            let st = shared.types.entry(NAME_TABLE).or_default();
            st.nonce = resp.nonce.clone();
            match Self::name_table(&resp.resources) {
                Ok(names) => {
                    st.version = resp.version_info.clone();
                    st.received = true;
                    out.push(DiscoveryRequest {
                        version_info: st.version.clone(),
                        type_url: NAME_TABLE.to_string(),
                        response_nonce: resp.nonce,
                        ..Default::default()
                    });
                    shared.names = names;
                    self.acked();
                    self.rebuild(shared);
                }
                Err(e) => {
                    out.push(DiscoveryRequest {
                        version_info: st.version.clone(),
                        type_url: NAME_TABLE.to_string(),
                        response_nonce: resp.nonce,
                        error_detail: Some(nack_detail(&e)),
                        ..Default::default()
                    });
                    self.nacked(&e);
                }
            }
            return;
        }
        let Some(type_url) = types::RESOURCE_TYPES
            .iter()
            .copied()
            .find(|t| *t == resp.type_url)
        else {
            // A type we did not ask for: ACK it empty-handed.
            out.push(DiscoveryRequest {
                version_info: resp.version_info,
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                ..Default::default()
            });
            return;
        };
        let decoded: Result<Vec<Decoded>, XdsError> = resp
            .resources
            .iter()
            .map(|a| types::decode(type_url, a))
            .collect();
        let mut g = lock(&self.shared);
        let shared = &mut g.0;
        match decoded {
            Err(e) => {
                tracing::warn!(type_url, "NACK: {e}");
                let st = shared.types.entry(type_url).or_default();
                st.nonce = resp.nonce.clone();
                out.push(DiscoveryRequest {
                    version_info: st.version.clone(),
                    resource_names: st.names.iter().cloned().collect(),
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce,
                    error_detail: Some(nack_detail(&e)),
                    ..Default::default()
                });
                self.nacked(&e);
            }
            Ok(items) => {
                // SotW: an LDS or CDS response is the whole state of its
                // type, so what it leaves out is gone. EDS and RDS responses
                // are not: istiod sends only the changed load assignments on
                // an incremental push and only the newly subscribed route
                // configurations after a subscription change, so those are
                // upserts and a resource of theirs goes away only when it is
                // no longer subscribed (below). This is Envoy's reading of
                // the protocol too.
                if types::is_full_state(type_url) {
                    for name in types::names(&shared.resources, type_url) {
                        types::remove(&mut shared.resources, type_url, &name);
                    }
                }
                for d in items {
                    types::insert(&mut shared.resources, d);
                }
                let st = shared.types.entry(type_url).or_default();
                st.version = resp.version_info.clone();
                st.nonce = resp.nonce.clone();
                st.received = true;
                out.push(DiscoveryRequest {
                    version_info: st.version.clone(),
                    resource_names: st.names.iter().cloned().collect(),
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce,
                    ..Default::default()
                });
                self.acked();
                // Follow references: EDS after CDS, RDS after LDS.
                for (t, names) in self.wanted(shared) {
                    let Some(names) = names else { continue };
                    let st = shared.types.entry(t).or_default();
                    if st.names != names {
                        st.names = names;
                        // Drop what is no longer referenced.
                        let stale: Vec<String> = types::names(&shared.resources, t)
                            .into_iter()
                            .filter(|n| !st.names.contains(n))
                            .collect();
                        for n in stale {
                            types::remove(&mut shared.resources, t, &n);
                        }
                        out.push(DiscoveryRequest {
                            version_info: st.version.clone(),
                            resource_names: st.names.iter().cloned().collect(),
                            type_url: t.to_string(),
                            response_nonce: st.nonce.clone(),
                            ..Default::default()
                        });
                    }
                }
                self.rebuild(shared);
            }
        }
    }

    /// Runs one Delta stream.
    async fn delta(&self) -> Result<bool, XdsError> {
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut node = Some(self.config.node.clone());
        {
            let mut g = lock(&self.shared);
            let shared = &mut g.0;
            for (type_url, names) in self.wanted(shared) {
                if names.as_ref().is_some_and(|n| n.is_empty()) {
                    continue;
                }
                let st = shared.types.entry(type_url).or_default();
                st.names = names.clone().unwrap_or_default();
                let req = DeltaDiscoveryRequest {
                    node: node.take(),
                    type_url: type_url.to_string(),
                    // Wildcard types: `*`; named types: the names.
                    resource_names_subscribe: match names {
                        None => vec!["*".to_string()],
                        Some(n) => n.into_iter().collect(),
                    },
                    initial_resource_versions: st.versions.clone(),
                    ..Default::default()
                };
                tx.try_send(req)
                    .map_err(|e| XdsError::Transport(e.to_string()))?;
            }
        }
        let inbound = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|s| XdsError::Transport(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        self.pump(inbound, &tx, Self::on_delta).await
    }

    fn on_delta(&self, resp: DeltaDiscoveryResponse, out: &mut Vec<DeltaDiscoveryRequest>) {
        if resp.type_url == NAME_TABLE && self.config.nds {
            let anys: Vec<_> = resp
                .resources
                .iter()
                .filter_map(|r| r.resource.clone())
                .collect();
            let mut g = lock(&self.shared);
            let shared = &mut g.0;
            match Self::name_table(&anys) {
                Ok(names) => {
                    let st = shared.types.entry(NAME_TABLE).or_default();
                    for r in &resp.resources {
                        st.versions.insert(r.name.clone(), r.version.clone());
                    }
                    st.received = true;
                    if !anys.is_empty() || !resp.removed_resources.is_empty() {
                        shared.names = names;
                    }
                    out.push(DeltaDiscoveryRequest {
                        type_url: NAME_TABLE.to_string(),
                        response_nonce: resp.nonce,
                        ..Default::default()
                    });
                    self.acked();
                    self.rebuild(shared);
                }
                Err(e) => {
                    out.push(DeltaDiscoveryRequest {
                        type_url: NAME_TABLE.to_string(),
                        response_nonce: resp.nonce,
                        error_detail: Some(nack_detail(&e)),
                        ..Default::default()
                    });
                    self.nacked(&e);
                }
            }
            return;
        }
        let Some(type_url) = types::RESOURCE_TYPES
            .iter()
            .copied()
            .find(|t| *t == resp.type_url)
        else {
            out.push(DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                ..Default::default()
            });
            return;
        };
        let decoded: Result<Vec<(Decoded, String)>, XdsError> = resp
            .resources
            .iter()
            .map(|r| {
                let any = r.resource.as_ref().ok_or_else(|| XdsError::Resource {
                    type_url: type_url.to_string(),
                    name: r.name.clone(),
                    message: "no resource body".into(),
                })?;
                types::decode(type_url, any).map(|d| (d, r.version.clone()))
            })
            .collect();
        let mut g = lock(&self.shared);
        let shared = &mut g.0;
        match decoded {
            Err(e) => {
                tracing::warn!(type_url, "delta NACK: {e}");
                out.push(DeltaDiscoveryRequest {
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce,
                    error_detail: Some(nack_detail(&e)),
                    ..Default::default()
                });
                self.nacked(&e);
            }
            Ok(items) => {
                let st = shared.types.entry(type_url).or_default();
                for (d, version) in items {
                    st.versions.insert(d.name().to_string(), version);
                    types::insert(&mut shared.resources, d);
                }
                for name in &resp.removed_resources {
                    st.versions.remove(name);
                    types::remove(&mut shared.resources, type_url, name);
                }
                st.version = resp.system_version_info.clone();
                st.nonce = resp.nonce.clone();
                st.received = true;
                out.push(DeltaDiscoveryRequest {
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce,
                    ..Default::default()
                });
                self.acked();
                for (t, names) in self.wanted(shared) {
                    let Some(names) = names else { continue };
                    let st = shared.types.entry(t).or_default();
                    if st.names == names {
                        continue;
                    }
                    let subscribe: Vec<String> = names.difference(&st.names).cloned().collect();
                    let unsubscribe: Vec<String> = st.names.difference(&names).cloned().collect();
                    for n in &unsubscribe {
                        st.versions.remove(n);
                        types::remove(&mut shared.resources, t, n);
                    }
                    st.names = names;
                    out.push(DeltaDiscoveryRequest {
                        type_url: t.to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    });
                }
                self.rebuild(shared);
            }
        }
    }
}
