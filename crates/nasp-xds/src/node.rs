//! The node a workload presents to istiod, built from its settings the way
//! Istio's agent builds it (reference: istio.md §2).
//!
//! - id: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`;
//! - cluster: `<workload>.<namespace>`;
//! - metadata (strings, as the agent sends them): `NAME`, `NAMESPACE`,
//!   `CLUSTER_ID`, `MESH_ID`, `NETWORK`, `ISTIO_VERSION`, `WORKLOAD_NAME`,
//!   `SERVICE_ACCOUNT`, `INSTANCE_IPS` (comma-joined), `APP_CONTAINERS`,
//!   `LABELS` (a struct), `PLATFORM_METADATA` (a struct), plus any extra
//!   string fields.
//!
//! [`WorkloadSettings::from_env`] reads the variables Istio's agent reads
//! (POD_NAME, POD_NAMESPACE, …) so a process in a pod needs no code.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// What a workload is, for the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSettings {
    /// Pod (or process) name.
    pub pod_name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Workload name (the deployment), defaults to the pod name.
    pub workload_name: String,
    /// The workload's IPs; the first is the one in the node id.
    pub instance_ips: Vec<String>,
    /// Kubernetes cluster id (also sent to the CA).
    pub cluster_id: String,
    /// Mesh id.
    pub mesh_id: String,
    /// Network name.
    pub network: String,
    /// Istio version to claim (istiod tailors config to it).
    pub istio_version: String,
    /// DNS domain (`cluster.local`).
    pub dns_domain: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Application container names.
    pub app_containers: Vec<String>,
    /// Platform metadata (e.g. cloud region).
    pub platform_metadata: BTreeMap<String, String>,
    /// Extra string metadata.
    pub extra: BTreeMap<String, String>,
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        Self {
            pod_name: "nasp".into(),
            namespace: "default".into(),
            service_account: "default".into(),
            workload_name: String::new(),
            instance_ips: vec!["127.0.0.1".into()],
            cluster_id: "Kubernetes".into(),
            mesh_id: "cluster.local".into(),
            network: String::new(),
            istio_version: "1.20.0".into(),
            dns_domain: "cluster.local".into(),
            labels: BTreeMap::new(),
            app_containers: Vec::new(),
            platform_metadata: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

fn kv(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter_map(|p| {
            let (k, v) = p.split_once(':').or_else(|| p.split_once('='))?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn map(m: &BTreeMap<String, String>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct {
            fields: m.iter().map(|(k, v)| (k.clone(), string(v))).collect(),
        })),
    }
}

impl WorkloadSettings {
    /// Reads Istio's agent variables through `get` (`std::env::var` for the
    /// real environment); unset ones keep their defaults.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut s = Self::default();
        let set = |target: &mut String, names: &[&str]| {
            if let Some(v) = names.iter().find_map(|n| get(n)).filter(|v| !v.is_empty()) {
                *target = v;
            }
        };
        set(&mut s.pod_name, &["POD_NAME", "NASP_POD_NAME"]);
        set(&mut s.namespace, &["POD_NAMESPACE", "NASP_POD_NAMESPACE"]);
        set(
            &mut s.service_account,
            &["SERVICE_ACCOUNT", "NASP_SERVICE_ACCOUNT"],
        );
        set(
            &mut s.workload_name,
            &["WORKLOAD_NAME", "NASP_WORKLOAD_NAME"],
        );
        set(
            &mut s.cluster_id,
            &["CLUSTER_ID", "ISTIO_META_CLUSTER_ID", "NASP_CLUSTER_ID"],
        );
        set(
            &mut s.mesh_id,
            &["MESH_ID", "ISTIO_META_MESH_ID", "NASP_MESH_ID"],
        );
        set(
            &mut s.network,
            &["NETWORK", "ISTIO_META_NETWORK", "NASP_NETWORK"],
        );
        set(
            &mut s.istio_version,
            &["ISTIO_VERSION", "NASP_ISTIO_VERSION"],
        );
        set(&mut s.dns_domain, &["DNS_DOMAIN", "NASP_DNS_DOMAIN"]);
        if let Some(v) = get("INSTANCE_IPS").or_else(|| get("INSTANCE_IP")) {
            let ips = list(&v);
            if !ips.is_empty() {
                s.instance_ips = ips;
            }
        }
        if let Some(v) = get("LABELS").or_else(|| get("NASP_LABELS")) {
            s.labels = kv(&v);
        }
        if let Some(v) = get("APP_CONTAINERS") {
            s.app_containers = list(&v);
        }
        if let Some(v) = get("PLATFORM_METADATA") {
            s.platform_metadata = kv(&v);
        }
        s
    }

    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|n| std::env::var(n).ok())
    }

    /// The workload name, or the pod name when unset.
    pub fn workload(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.pod_name
        } else {
            &self.workload_name
        }
    }

    /// The node as Istio's agent presents it.
    pub fn node(&self) -> Node {
        let ip = self
            .instance_ips
            .first()
            .map(String::as_str)
            .unwrap_or("127.0.0.1");
        let mut fields: BTreeMap<String, Value> = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                fields.insert(k.to_string(), string(v));
            }
        };
        put("NAME", &self.pod_name);
        put("NAMESPACE", &self.namespace);
        put("CLUSTER_ID", &self.cluster_id);
        put("MESH_ID", &self.mesh_id);
        put("NETWORK", &self.network);
        put("ISTIO_VERSION", &self.istio_version);
        put("WORKLOAD_NAME", self.workload());
        put("SERVICE_ACCOUNT", &self.service_account);
        put("INSTANCE_IPS", &self.instance_ips.join(","));
        put("APP_CONTAINERS", &self.app_containers.join(","));
        for (k, v) in &self.extra {
            put(k, v);
        }
        if !self.labels.is_empty() {
            fields.insert("LABELS".into(), map(&self.labels));
        }
        if !self.platform_metadata.is_empty() {
            fields.insert("PLATFORM_METADATA".into(), map(&self.platform_metadata));
        }
        Node {
            id: format!(
                "sidecar~{ip}~{}.{}~{}.svc.{}",
                self.pod_name, self.namespace, self.namespace, self.dns_domain
            ),
            cluster: format!("{}.{}", self.workload(), self.namespace),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }

    /// The search domains a pod of this namespace resolves short names with.
    pub fn search_domains(&self) -> Vec<String> {
        vec![
            format!("{}.svc.{}", self.namespace, self.dns_domain),
            format!("svc.{}", self.dns_domain),
            self.dns_domain.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_as_istio_builds_it() {
        let env: BTreeMap<&str, &str> = [
            ("POD_NAME", "catalog-v1-7d9f"),
            ("POD_NAMESPACE", "demo"),
            ("SERVICE_ACCOUNT", "catalog"),
            ("WORKLOAD_NAME", "catalog-v1"),
            ("INSTANCE_IPS", "10.20.1.7, 10.20.1.8"),
            ("CLUSTER_ID", "waynz0r-0626-01"),
            ("MESH_ID", "mesh1"),
            ("LABELS", "app:catalog,version:v1"),
        ]
        .into_iter()
        .collect();
        let s = WorkloadSettings::from_lookup(|k| env.get(k).map(|v| v.to_string()));
        let node = s.node();
        assert_eq!(
            node.id,
            "sidecar~10.20.1.7~catalog-v1-7d9f.demo~demo.svc.cluster.local"
        );
        assert_eq!(node.cluster, "catalog-v1.demo");
        let md = node.metadata.expect("metadata").fields;
        let text = |k: &str| match md.get(k).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(s)) => s,
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("CLUSTER_ID"), "waynz0r-0626-01");
        assert_eq!(text("NAMESPACE"), "demo");
        assert_eq!(text("MESH_ID"), "mesh1");
        assert_eq!(text("INSTANCE_IPS"), "10.20.1.7,10.20.1.8");
        assert_eq!(text("SERVICE_ACCOUNT"), "catalog");
        match md.get("LABELS").and_then(|v| v.kind.clone()) {
            Some(Kind::StructValue(st)) => assert_eq!(st.fields.len(), 2),
            other => panic!("LABELS: {other:?}"),
        }
        assert_eq!(s.search_domains()[0], "demo.svc.cluster.local");
    }

    #[test]
    fn unset_environment_gives_usable_defaults() {
        let s = WorkloadSettings::from_lookup(|_| None);
        assert_eq!(
            s.node().id,
            "sidecar~127.0.0.1~nasp.default~default.svc.cluster.local"
        );
        assert_eq!(s.node().cluster, "nasp.default");
    }
}
