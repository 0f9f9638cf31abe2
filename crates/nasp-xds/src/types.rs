//! xDS type URLs and the encoding of resources, shared by the client and
//! the embedded control plane.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::{ResourceSet, XdsError};

/// CDS.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// LDS.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Istio's NDS name table.
pub const NAME_TABLE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// The four resource types, in the order a client subscribes.
pub const RESOURCE_TYPES: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Whether a SotW response of this type carries the whole state of the type
/// (LDS and CDS), so that a resource missing from it is removed. EDS and RDS
/// responses may carry only some of the subscribed resources.
pub fn is_full_state(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// One encoded resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// The resource name.
    pub name: String,
    /// A version that changes exactly when the content does (a hash).
    pub version: String,
    /// The resource.
    pub any: Any,
}

fn encode_one<M: Message>(type_url: &str, name: &str, m: &M) -> Encoded {
    let value = m.encode_to_vec();
    Encoded {
        name: name.to_string(),
        version: content_version(&value),
        any: Any {
            type_url: type_url.to_string(),
            value,
        },
    }
}

/// FNV-1a of the bytes, as hex: stable across processes and builds.
pub fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every resource of a set, by type URL and name.
pub fn encode_set(set: &ResourceSet) -> BTreeMap<&'static str, BTreeMap<String, Encoded>> {
    let mut out: BTreeMap<&'static str, BTreeMap<String, Encoded>> = BTreeMap::new();
    out.insert(
        CLUSTER,
        set.clusters
            .iter()
            .map(|(n, r)| (n.clone(), encode_one(CLUSTER, n, r)))
            .collect(),
    );
    out.insert(
        ENDPOINT,
        set.endpoints
            .iter()
            .map(|(n, r)| (n.clone(), encode_one(ENDPOINT, n, r)))
            .collect(),
    );
    out.insert(
        LISTENER,
        set.listeners
            .iter()
            .map(|(n, r)| (n.clone(), encode_one(LISTENER, n, r)))
            .collect(),
    );
    out.insert(
        ROUTE,
        set.routes
            .iter()
            .map(|(n, r)| (n.clone(), encode_one(ROUTE, n, r)))
            .collect(),
    );
    out
}

/// A decoded resource.
#[derive(Clone, Debug)]
pub enum Decoded {
    /// CDS.
    Cluster(Box<Cluster>),
    /// EDS.
    Endpoint(Box<ClusterLoadAssignment>),
    /// LDS.
    Listener(Box<Listener>),
    /// RDS.
    Route(Box<RouteConfiguration>),
}

impl Decoded {
    /// The resource's name.
    pub fn name(&self) -> &str {
        match self {
            Decoded::Cluster(c) => &c.name,
            Decoded::Endpoint(e) => &e.cluster_name,
            Decoded::Listener(l) => &l.name,
            Decoded::Route(r) => &r.name,
        }
    }
}

/// Decodes and validates one resource of `type_url`.
pub fn decode(type_url: &str, any: &Any) -> Result<Decoded, XdsError> {
    let bad = |message: String| XdsError::Resource {
        type_url: type_url.to_string(),
        name: String::new(),
        message,
    };
    if any.type_url != type_url {
        return Err(bad(format!(
            "a {} resource in a {type_url} response",
            any.type_url
        )));
    }
    let d = match type_url {
        CLUSTER => Decoded::Cluster(Box::new(
            Cluster::decode(any.value.as_slice()).map_err(|e| bad(e.to_string()))?,
        )),
        ENDPOINT => Decoded::Endpoint(Box::new(
            ClusterLoadAssignment::decode(any.value.as_slice()).map_err(|e| bad(e.to_string()))?,
        )),
        LISTENER => Decoded::Listener(Box::new(
            Listener::decode(any.value.as_slice()).map_err(|e| bad(e.to_string()))?,
        )),
        ROUTE => Decoded::Route(Box::new(
            RouteConfiguration::decode(any.value.as_slice()).map_err(|e| bad(e.to_string()))?,
        )),
        other => return Err(bad(format!("unsupported type {other}"))),
    };
    if d.name().is_empty() {
        return Err(bad("the resource has no name".into()));
    }
    // A route configuration the view cannot convert (a regex that does not
    // compile, weights summing to 0, …) is one Envoy would reject: NACK it.
    if let Decoded::Route(r) = &d {
        crate::route::RouteConfig::from_proto(r)?;
    }
    Ok(d)
}

/// Applies a decoded resource to a set.
pub fn insert(set: &mut ResourceSet, d: Decoded) {
    match d {
        Decoded::Cluster(c) => {
            set.clusters.insert(c.name.clone(), *c);
        }
        Decoded::Endpoint(e) => {
            set.endpoints.insert(e.cluster_name.clone(), *e);
        }
        Decoded::Listener(l) => {
            set.listeners.insert(l.name.clone(), *l);
        }
        Decoded::Route(r) => {
            set.routes.insert(r.name.clone(), *r);
        }
    }
}

/// Removes a resource by type and name.
pub fn remove(set: &mut ResourceSet, type_url: &str, name: &str) {
    match type_url {
        CLUSTER => {
            set.clusters.remove(name);
        }
        ENDPOINT => {
            set.endpoints.remove(name);
        }
        LISTENER => {
            set.listeners.remove(name);
        }
        ROUTE => {
            set.routes.remove(name);
        }
        _ => {}
    }
}

/// Names of a type present in a set.
pub fn names(set: &ResourceSet, type_url: &str) -> Vec<String> {
    match type_url {
        CLUSTER => set.clusters.keys().cloned().collect(),
        ENDPOINT => set.endpoints.keys().cloned().collect(),
        LISTENER => set.listeners.keys().cloned().collect(),
        ROUTE => set.routes.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The EDS and RDS names the clusters and listeners of a set refer to.
pub fn referenced(
    set: &ResourceSet,
) -> (
    std::collections::BTreeSet<String>,
    std::collections::BTreeSet<String>,
) {
    use envoy_types::pb::envoy::config::listener::v3::filter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
    const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    let eds = set
        .clusters
        .values()
        .filter(|c| crate::view::is_eds(c))
        .map(crate::view::eds_service_name)
        .collect();
    let mut rds = std::collections::BTreeSet::new();
    for l in set.listeners.values() {
        for fc in l
            .filter_chains
            .iter()
            .chain(l.default_filter_chain.as_ref())
        {
            for f in &fc.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if any.type_url != HCM {
                    continue;
                }
                if let Ok(HttpConnectionManager {
                    route_specifier: Some(RouteSpecifier::Rds(r)),
                    ..
                }) = HttpConnectionManager::decode(any.value.as_slice())
                {
                    rds.insert(r.route_config_name);
                }
            }
        }
    }
    (eds, rds)
}
