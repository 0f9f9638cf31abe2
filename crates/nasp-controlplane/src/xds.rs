//! The embedded ADS server: State-of-the-World and Delta over one snapshot
//! cache. A new snapshot is pushed to every connected client.
//!
//! - SotW: CDS and LDS are wildcard (an empty name list or `*`), EDS and RDS
//!   by name. A response carries every subscribed resource of its type and
//!   the snapshot version; it is sent when the subscription changes or the
//!   type's resources change. A NACK is logged and not retried until the
//!   next snapshot. Requests with a stale nonce are ignored.
//! - Delta: per-type subscriptions (`*` or an empty first request for
//!   wildcard), the client's known versions (`initial_resource_versions` on
//!   reconnect), and responses with only what changed plus removals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use nasp_xds::ResourceSet;
use nasp_xds::types::{CLUSTER, Encoded, LISTENER, NAME_TABLE, encode_set};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Every resource the server serves, at one version.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Increases with every new snapshot.
    pub version: u64,
    /// By type URL, then name.
    pub resources: BTreeMap<String, BTreeMap<String, Encoded>>,
}

impl Snapshot {
    fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Encoded>> {
        self.resources.get(type_url)
    }
}

/// The current snapshot, watched by every stream.
#[derive(Debug)]
pub struct SnapshotCache {
    tx: watch::Sender<Arc<Snapshot>>,
    nodes: std::sync::Mutex<BTreeMap<String, envoy_types::pb::envoy::config::core::v3::Node>>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self::new(&ResourceSet::default())
    }
}

impl SnapshotCache {
    /// A cache serving `set`.
    pub fn new(set: &ResourceSet) -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let cache = Self {
            tx,
            nodes: Default::default(),
        };
        cache.set(set);
        cache
    }

    /// Replaces everything with `set` and pushes it to connected clients.
    pub fn set(&self, set: &ResourceSet) {
        let resources = encode_set(set)
            .into_iter()
            .map(|(t, m)| (t.to_string(), m))
            .collect();
        self.set_raw(resources);
    }

    /// Replaces everything with `set` plus an NDS name table.
    pub fn set_with_names(&self, set: &ResourceSet, names: &nasp_proto::istio_nds::NameTable) {
        use prost::Message;
        let mut resources: BTreeMap<String, BTreeMap<String, Encoded>> = encode_set(set)
            .into_iter()
            .map(|(t, m)| (t.to_string(), m))
            .collect();
        let value = names.encode_to_vec();
        let encoded = Encoded {
            name: String::new(),
            version: nasp_xds::types::content_version(&value),
            any: envoy_types::pb::google::protobuf::Any {
                type_url: NAME_TABLE.to_string(),
                value,
            },
        };
        resources.insert(
            NAME_TABLE.to_string(),
            BTreeMap::from([(String::new(), encoded)]),
        );
        self.set_raw(resources);
    }

    /// Replaces everything with already encoded resources (tools and tests
    /// use it to serve resources a `ResourceSet` cannot hold, e.g. broken ones).
    pub fn set_raw(&self, resources: BTreeMap<String, BTreeMap<String, Encoded>>) {
        self.tx.send_modify(|s| {
            *s = Arc::new(Snapshot {
                version: s.version + 1,
                resources,
            })
        });
    }

    /// The nodes that have connected, by id, as they described themselves.
    pub fn nodes(&self) -> BTreeMap<String, envoy_types::pb::envoy::config::core::v3::Node> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn saw(&self, node: &envoy_types::pb::envoy::config::core::v3::Node) {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.id.clone(), node.clone());
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

/// The gRPC service over a [`SnapshotCache`].
#[derive(Clone, Debug)]
pub struct AdsService {
    cache: Arc<SnapshotCache>,
}

impl AdsService {
    /// Serves `cache`.
    pub fn new(cache: Arc<SnapshotCache>) -> Self {
        Self { cache }
    }

    /// The tonic server wrapper (64 MiB message limit: a whole mesh's CDS can
    /// be large).
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// The types of `subs` in make-before-break order: CDS, EDS, LDS, RDS, then
/// anything else (NDS) by name. A client that applies a push in this order
/// never holds a listener or route naming a cluster it does not know yet, nor
/// a cluster without its endpoints (the order the xDS protocol prescribes).
fn push_order<V>(subs: &HashMap<String, V>) -> Vec<String> {
    let rank = |t: &str| {
        nasp_xds::types::RESOURCE_TYPES
            .iter()
            .position(|r| *r == t)
            .unwrap_or(nasp_xds::types::RESOURCE_TYPES.len())
    };
    let mut types: Vec<String> = subs.keys().cloned().collect();
    types.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    types
}

fn wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER || type_url == NAME_TABLE
}

#[derive(Default)]
struct SotwSub {
    wildcard: bool,
    names: BTreeSet<String>,
    nonce: String,
    /// The snapshot version and content hash last sent.
    sent: Option<(u64, u64)>,
}

fn content_hash(items: &[&Encoded]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in items {
        for b in e.name.bytes().chain(e.version.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn selected<'a>(
    snap: &'a Snapshot,
    type_url: &str,
    wildcard: bool,
    names: &BTreeSet<String>,
) -> Vec<&'a Encoded> {
    snap.of_type(type_url)
        .map(|m| {
            m.values()
                .filter(|e| wildcard || names.contains(&e.name))
                .collect()
        })
        .unwrap_or_default()
}

async fn sotw_stream(
    cache: Arc<SnapshotCache>,
    mut inbound: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut subs: HashMap<String, SotwSub> = HashMap::new();
    let mut nonce: u64 = 0;
    let mut node = String::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        // Send whatever is due, in make-before-break order.
        for type_url in push_order(&subs) {
            let Some(sub) = subs.get_mut(&type_url) else {
                continue;
            };
            let type_url = &type_url;
            let items = selected(&snap, type_url, sub.wildcard, &sub.names);
            let hash = content_hash(&items);
            if sub.sent.is_some_and(|(_, h)| h == hash) {
                continue;
            }
            nonce += 1;
            sub.nonce = nonce.to_string();
            sub.sent = Some((snap.version, hash));
            let resp = DiscoveryResponse {
                version_info: snap.version.to_string(),
                resources: items.iter().map(|e| e.any.clone()).collect(),
                type_url: type_url.clone(),
                nonce: sub.nonce.clone(),
                ..Default::default()
            };
            if out.send(Ok(resp)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            req = inbound.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%node, "ADS stream ended: {e}");
                        return;
                    }
                };
                if let Some(n) = &req.node {
                    node = n.id.clone();
                    cache.saw(n);
                }
                let sub = subs.entry(req.type_url.clone()).or_default();
                if !req.response_nonce.is_empty() && req.response_nonce != sub.nonce {
                    continue; // stale
                }
                if let Some(err) = &req.error_detail {
                    tracing::warn!(%node, type_url = %req.type_url, "NACK: {}", err.message);
                    // Keep `sent`: the same content is not sent again.
                }
                let names: BTreeSet<String> = req.resource_names.iter().filter(|n| *n != "*").cloned().collect();
                let wildcard = req.resource_names.iter().any(|n| n == "*")
                    || (req.resource_names.is_empty() && wildcard_type(&req.type_url));
                if names != sub.names || wildcard != sub.wildcard || sub.sent.is_none() {
                    sub.names = names;
                    sub.wildcard = wildcard;
                    // The subscription changed: answer even if the content
                    // hash is the same as before (a new request needs a reply).
                    sub.sent = None;
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name → version.
    known: HashMap<String, String>,
    responded: bool,
}

async fn delta_stream(
    cache: Arc<SnapshotCache>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut subs: HashMap<String, DeltaSub> = HashMap::new();
    let mut nonce: u64 = 0;
    let mut node = String::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        for type_url in push_order(&subs) {
            let Some(sub) = subs.get_mut(&type_url) else {
                continue;
            };
            let type_url = &type_url;
            let empty = BTreeMap::new();
            let all = snap.of_type(type_url).unwrap_or(&empty);
            let mut resources = Vec::new();
            for e in all.values() {
                if !(sub.wildcard || sub.names.contains(&e.name)) {
                    continue;
                }
                if sub.known.get(&e.name) != Some(&e.version) {
                    resources.push(Resource {
                        name: e.name.clone(),
                        version: e.version.clone(),
                        resource: Some(e.any.clone()),
                        ..Default::default()
                    });
                }
            }
            let removed: Vec<String> = sub
                .known
                .keys()
                .filter(|n| !all.contains_key(*n) || !(sub.wildcard || sub.names.contains(*n)))
                .cloned()
                .collect();
            if resources.is_empty() && removed.is_empty() && sub.responded {
                continue;
            }
            for r in &resources {
                sub.known.insert(r.name.clone(), r.version.clone());
            }
            for n in &removed {
                sub.known.remove(n);
            }
            sub.responded = true;
            nonce += 1;
            let resp = DeltaDiscoveryResponse {
                system_version_info: snap.version.to_string(),
                resources,
                type_url: type_url.clone(),
                removed_resources: removed,
                nonce: nonce.to_string(),
                ..Default::default()
            };
            if out.send(Ok(resp)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            req = inbound.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%node, "delta ADS stream ended: {e}");
                        return;
                    }
                };
                if let Some(n) = &req.node {
                    node = n.id.clone();
                    cache.saw(n);
                }
                if let Some(err) = &req.error_detail {
                    tracing::warn!(%node, type_url = %req.type_url, "delta NACK: {}", err.message);
                }
                let first = !subs.contains_key(&req.type_url);
                let sub = subs.entry(req.type_url.clone()).or_default();
                if first {
                    sub.known = req.initial_resource_versions.clone();
                    if req.resource_names_subscribe.is_empty() && wildcard_type(&req.type_url) {
                        sub.wildcard = true;
                    }
                }
                for n in &req.resource_names_subscribe {
                    if n == "*" {
                        sub.wildcard = true;
                    } else {
                        sub.names.insert(n.clone());
                    }
                }
                for n in &req.resource_names_unsubscribe {
                    if n == "*" {
                        sub.wildcard = false;
                    } else {
                        sub.names.remove(n);
                    }
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(sotw_stream(
            self.cache.clone(),
            request.into_inner(),
            tx,
            self.cache.subscribe(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(delta_stream(
            self.cache.clone(),
            request.into_inner(),
            tx,
            self.cache.subscribe(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
