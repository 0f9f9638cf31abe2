//! Reading Envoy admin config dumps (`/config_dump` JSON), as istiod's
//! sidecars produce them, into typed xDS resources.
//!
//! The JSON is read with prost-reflect against the descriptor set in
//! [`nasp_proto::CONFIG_DUMP_DESCRIPTORS`] (Envoy's admin dump types, the
//! extension types Istio uses, Istio's own filter types), then re-decoded as
//! `envoy-types` messages. An `Any` whose type the set does not know (a
//! custom EnvoyFilter, say) is kept as a `google.protobuf.Struct` of its
//! fields: nasp does not run such filters, and the rest of the resource
//! stays usable. Unknown fields are ignored.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use envoy_types::pb::envoy::admin::v3 as admin;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

use crate::XdsError;

/// Resources of the four xDS types, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceSet {
    /// CDS, by cluster name.
    pub clusters: BTreeMap<String, Cluster>,
    /// EDS, by cluster (service) name.
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    /// LDS, by listener name.
    pub listeners: BTreeMap<String, Listener>,
    /// RDS, by route configuration name.
    pub routes: BTreeMap<String, RouteConfiguration>,
}

fn pool() -> Result<&'static DescriptorPool, XdsError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(nasp_proto::CONFIG_DUMP_DESCRIPTORS).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| XdsError::Dump(format!("descriptor set: {e}")))
}

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// Rewrites `Any` objects of unknown types into `Struct`s, in place.
fn sanitize(v: &mut serde_json::Value, pool: &DescriptorPool) {
    match v {
        serde_json::Value::Object(map) => {
            let type_name = map
                .get("@type")
                .and_then(|t| t.as_str())
                .map(|t| t.strip_prefix(TYPE_PREFIX).unwrap_or(t));
            // The value of a `Struct` (or `Value`, `ListValue`) is plain
            // JSON, not messages: an `@type` inside it is data. Rewriting it
            // would also make reading not idempotent, since the `Struct` an
            // unknown type becomes (below) keeps its nested objects as they
            // are, and reading the dump written from it must too.
            if type_name.is_some_and(|name| {
                matches!(
                    name,
                    "google.protobuf.Struct"
                        | "google.protobuf.Value"
                        | "google.protobuf.ListValue"
                )
            }) {
                return;
            }
            let unknown = type_name.is_some_and(|name| pool.get_message_by_name(name).is_none());
            if unknown {
                let mut fields = std::mem::take(map);
                let original = fields.remove("@type");
                fields.insert("@original_type".into(), original.unwrap_or_default());
                map.insert(
                    "@type".into(),
                    format!("{TYPE_PREFIX}google.protobuf.Struct").into(),
                );
                map.insert("value".into(), serde_json::Value::Object(fields));
                return;
            }
            for (_, child) in map.iter_mut() {
                sanitize(child, pool);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| sanitize(i, pool)),
        _ => {}
    }
}

fn decode_as<M: Message + Default>(
    value: serde_json::Value,
    full_name: &str,
    pool: &DescriptorPool,
) -> Result<M, XdsError> {
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| XdsError::Dump(format!("{full_name} is not in the descriptor set")))?;
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let dynamic = DynamicMessage::deserialize_with_options(desc, value, &options)
        .map_err(|e| XdsError::Dump(format!("{full_name}: {e}")))?;
    M::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| XdsError::Dump(format!("{full_name}: {e}")))
}

fn any_as<M: Message + Default>(
    any: &envoy_types::pb::google::protobuf::Any,
    what: &str,
) -> Result<M, XdsError> {
    M::decode(any.value.as_slice())
        .map_err(|e| XdsError::Dump(format!("{what} {}: {e}", any.type_url)))
}

/// Writes resources as an Envoy admin config dump (`/config_dump` JSON,
/// proto field names), with each resource's version as `version_info`.
pub fn write_config_dump(
    set: &ResourceSet,
    versions: &std::collections::HashMap<String, String>,
) -> Result<serde_json::Value, XdsError> {
    use envoy_types::pb::google::protobuf::Any as PbAny;
    let pool = pool()?;
    let any = |type_url: &str, m: &dyn Fn() -> Vec<u8>| PbAny {
        type_url: type_url.to_string(),
        value: m(),
    };
    let version = |t: &str| versions.get(t).cloned().unwrap_or_default();
    let clusters = admin::ClustersConfigDump {
        version_info: version(crate::types::CLUSTER),
        dynamic_active_clusters: set
            .clusters
            .values()
            .map(|c| admin::clusters_config_dump::DynamicCluster {
                version_info: version(crate::types::CLUSTER),
                cluster: Some(any(crate::types::CLUSTER, &|| c.encode_to_vec())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let endpoints = admin::EndpointsConfigDump {
        dynamic_endpoint_configs: set
            .endpoints
            .values()
            .map(|e| admin::endpoints_config_dump::DynamicEndpointConfig {
                version_info: version(crate::types::ENDPOINT),
                endpoint_config: Some(any(crate::types::ENDPOINT, &|| e.encode_to_vec())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let listeners = admin::ListenersConfigDump {
        version_info: version(crate::types::LISTENER),
        dynamic_listeners: set
            .listeners
            .values()
            .map(|l| admin::listeners_config_dump::DynamicListener {
                name: l.name.clone(),
                active_state: Some(admin::listeners_config_dump::DynamicListenerState {
                    version_info: version(crate::types::LISTENER),
                    listener: Some(any(crate::types::LISTENER, &|| l.encode_to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let routes = admin::RoutesConfigDump {
        dynamic_route_configs: set
            .routes
            .values()
            .map(|r| admin::routes_config_dump::DynamicRouteConfig {
                version_info: version(crate::types::ROUTE),
                route_config: Some(any(crate::types::ROUTE, &|| r.encode_to_vec())),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let dump = admin::ConfigDump {
        configs: vec![
            any(
                "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                &|| clusters.encode_to_vec(),
            ),
            any(
                "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
                &|| endpoints.encode_to_vec(),
            ),
            any(
                "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                &|| listeners.encode_to_vec(),
            ),
            any(
                "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
                &|| routes.encode_to_vec(),
            ),
        ],
    };
    let desc = pool
        .get_message_by_name("envoy.admin.v3.ConfigDump")
        .ok_or_else(|| XdsError::Dump("ConfigDump is not in the descriptor set".into()))?;
    let dynamic = DynamicMessage::decode(desc, dump.encode_to_vec().as_slice())
        .map_err(|e| XdsError::Dump(format!("re-reading the dump: {e}")))?;
    let options = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| XdsError::Dump(format!("writing JSON: {e}")))
}

/// Reads a config dump's JSON.
pub fn read_config_dump(json: &str) -> Result<ResourceSet, XdsError> {
    let pool = pool()?;
    let mut root: serde_json::Value =
        serde_json::from_str(json).map_err(|e| XdsError::Dump(format!("not JSON: {e}")))?;
    let configs = root
        .get_mut("configs")
        .and_then(|c| c.as_array_mut())
        .ok_or_else(|| XdsError::Dump("no `configs` array: not an Envoy config dump".into()))?;
    let mut set = ResourceSet::default();
    for config in configs.iter_mut() {
        let kind = config
            .get("@type")
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .trim_start_matches(TYPE_PREFIX)
            .to_string();
        // Only the four resource dumps matter; bootstrap, secrets and scoped
        // routes are skipped without being parsed.
        let wanted = [
            "envoy.admin.v3.ClustersConfigDump",
            "envoy.admin.v3.EndpointsConfigDump",
            "envoy.admin.v3.ListenersConfigDump",
            "envoy.admin.v3.RoutesConfigDump",
        ];
        if !wanted.contains(&kind.as_str()) {
            continue;
        }
        let mut value = config.take();
        if let Some(map) = value.as_object_mut() {
            map.remove("@type");
        }
        sanitize(&mut value, pool);
        match kind.as_str() {
            "envoy.admin.v3.ClustersConfigDump" => {
                let dump: admin::ClustersConfigDump = decode_as(value, &kind, pool)?;
                let statics = dump
                    .static_clusters
                    .iter()
                    .filter_map(|c| c.cluster.as_ref());
                let dynamics = dump
                    .dynamic_active_clusters
                    .iter()
                    .chain(&dump.dynamic_warming_clusters)
                    .filter_map(|c| c.cluster.as_ref());
                for any in statics.chain(dynamics) {
                    let c: Cluster = any_as(any, "cluster")?;
                    set.clusters.insert(c.name.clone(), c);
                }
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                let dump: admin::EndpointsConfigDump = decode_as(value, &kind, pool)?;
                let all = dump
                    .static_endpoint_configs
                    .iter()
                    .filter_map(|e| e.endpoint_config.as_ref())
                    .chain(
                        dump.dynamic_endpoint_configs
                            .iter()
                            .filter_map(|e| e.endpoint_config.as_ref()),
                    );
                for any in all {
                    let e: ClusterLoadAssignment = any_as(any, "endpoints")?;
                    set.endpoints.insert(e.cluster_name.clone(), e);
                }
            }
            "envoy.admin.v3.ListenersConfigDump" => {
                let dump: admin::ListenersConfigDump = decode_as(value, &kind, pool)?;
                let statics = dump
                    .static_listeners
                    .iter()
                    .filter_map(|l| l.listener.as_ref());
                let dynamics = dump.dynamic_listeners.iter().filter_map(|l| {
                    l.active_state
                        .as_ref()
                        .or(l.warming_state.as_ref())
                        .or(l.draining_state.as_ref())
                        .and_then(|s| s.listener.as_ref())
                });
                for any in statics.chain(dynamics) {
                    let mut l: Listener = any_as(any, "listener")?;
                    if l.name.is_empty() {
                        // Bootstrap listeners may be unnamed; name them the
                        // way Istio names listeners: `<address>_<port>`.
                        l.name = crate::view::listener_address_name(&l)
                            .unwrap_or_else(|| format!("unnamed-{}", set.listeners.len()));
                    }
                    set.listeners.insert(l.name.clone(), l);
                }
            }
            _ => {
                let dump: admin::RoutesConfigDump = decode_as(value, &kind, pool)?;
                let all = dump
                    .static_route_configs
                    .iter()
                    .filter_map(|r| r.route_config.as_ref())
                    .chain(
                        dump.dynamic_route_configs
                            .iter()
                            .filter_map(|r| r.route_config.as_ref()),
                    );
                for any in all {
                    let r: RouteConfiguration = any_as(any, "route configuration")?;
                    // Unnamed static route configurations are the inline
                    // ones of bootstrap listeners: they travel inside their
                    // listener, not over RDS.
                    if !r.name.is_empty() {
                        set.routes.insert(r.name.clone(), r);
                    }
                }
            }
        }
    }
    // Clusters whose endpoints come from EDS but have none in the dump get
    // an empty assignment, so a subscriber hears "no endpoints" instead of
    // waiting forever.
    for c in set.clusters.values().filter(|c| crate::view::is_eds(c)) {
        let service = crate::view::eds_service_name(c);
        set.endpoints
            .entry(service.clone())
            .or_insert_with(|| ClusterLoadAssignment {
                cluster_name: service,
                ..Default::default()
            });
    }
    Ok(set)
}
