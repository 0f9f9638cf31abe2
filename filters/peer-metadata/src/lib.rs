//! Istio's peer metadata on the wire, shared by the `metadata-exchange` and
//! `istio-stats` filters: `google.protobuf.Struct` / `Value` / `Any` in the
//! protobuf binary encoding (deterministic, as Istio's sidecars serialize
//! them), base64 for the `x-envoy-peer-metadata` header, the TCP
//! `istio-peer-exchange` preamble, the proxy-wasm pairs encoding of map
//! properties, and the node metadata keys Istio exchanges.
//!
//! Also `host` (wasm32 only): the property calls both filters make per
//! stream, without the SDK's path building, with `batch`'s format for
//! reading several in one call, and the `path!` macro for their
//! compile-time paths.
//!
//! Invariants: nothing here but `host` calls the host, nothing panics on
//! any input; a
//! decoder given bytes it cannot read returns `None` (the filters log and
//! ignore them). Nesting is bounded ([`MAX_DEPTH`]) so a hostile peer cannot
//! exhaust the guest's stack.

/// A property path as the ABI carries it: segments separated by NUL,
/// built at compile time (`path!("response", "code")`).
#[macro_export]
macro_rules! path {
    ($first:literal $(, $rest:literal)*) => {
        concat!($first $(, "\0", $rest)*).as_bytes()
    };
}

pub mod base64;
pub mod batch;
pub mod compare;
pub mod config;
#[cfg(target_arch = "wasm32")]
pub mod host;
pub mod pairs;
pub mod pb;
pub mod preamble;

pub use pb::{Struct, Value};

/// How deep a `Struct` may nest before the decoder gives up.
pub const MAX_DEPTH: usize = 16;

/// Request/response header (and TCP `Struct` key) carrying the peer's node id.
pub const HEADER_ID: &str = "x-envoy-peer-metadata-id";
/// Request/response header (and TCP `Struct` key) carrying the peer's metadata.
pub const HEADER_METADATA: &str = "x-envoy-peer-metadata";

/// The string node metadata keys Istio's metadata exchange sends (Istio
/// 1.13's `extractStructFromNodeFlatBuffer`), each a `string_value` when the
/// local node has it.
pub const STRING_KEYS: [&str; 9] = [
    "NAME",
    "NAMESPACE",
    "OWNER",
    "WORKLOAD_NAME",
    "ISTIO_VERSION",
    "MESH_ID",
    "CLUSTER_ID",
    "APP_CONTAINERS",
    "INSTANCE_IPS",
];
/// The map keys, each a `struct_value` of string values when not empty.
pub const MAP_KEYS: [&str; 2] = ["LABELS", "PLATFORM_METADATA"];

/// Istio's canonical service label.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Istio's canonical revision label.
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

/// The node metadata `Struct` Istio's metadata exchange sends, from a lookup
/// of `node.metadata.<KEY>` (raw property bytes, maps in the pairs
/// encoding). Keys the lookup does not have are left out; empty maps too.
pub fn node_struct(mut lookup: impl FnMut(&str) -> Option<Vec<u8>>) -> Struct {
    let mut s = Struct::default();
    for key in STRING_KEYS {
        if let Some(v) = lookup(key) {
            s.insert(key, Value::String(String::from_utf8_lossy(&v).into_owned()));
        }
    }
    for key in MAP_KEYS {
        let Some(raw) = lookup(key) else { continue };
        let Some(entries) = pairs::decode(&raw) else {
            continue;
        };
        if entries.is_empty() {
            continue;
        }
        let mut m = Struct::default();
        for (k, v) in entries {
            m.insert(&k, Value::String(v));
        }
        s.insert(key, Value::Struct(m));
    }
    s
}

/// A workload as the stats filter labels it: a local node or a peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    /// `WORKLOAD_NAME`.
    pub workload: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `CLUSTER_ID`.
    pub cluster: String,
    /// `LABELS`, absent when the node has none (Istio then labels the
    /// canonical service as unknown and the revision `latest`).
    pub labels: Option<Vec<(String, String)>>,
}

impl Workload {
    /// The workload described by a node metadata `Struct`.
    pub fn from_struct(s: &Struct) -> Self {
        let text = |k: &str| match s.get(k) {
            Some(Value::String(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match s.get("LABELS") {
            Some(Value::Struct(l)) => Some(
                l.fields
                    .iter()
                    .filter_map(|(k, v)| match v {
                        Value::String(v) => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        };
        Self {
            workload: text("WORKLOAD_NAME"),
            namespace: text("NAMESPACE"),
            cluster: text("CLUSTER_ID"),
            labels,
        }
    }

    /// Istio's endpoint-metadata fallback
    /// (`upstream_host_metadata.filter_metadata.istio.workload`):
    /// `workload;namespace;canonical_service;canonical_revision;cluster`.
    pub fn from_endpoint_label(v: &str) -> Option<Self> {
        let parts: Vec<&str> = v.split(';').collect();
        if parts.len() < 5 {
            return None;
        }
        let mut labels = Vec::new();
        if !parts[2].is_empty() {
            labels.push((CANONICAL_NAME.to_string(), parts[2].to_string()));
        }
        if !parts[3].is_empty() {
            labels.push((CANONICAL_REVISION.to_string(), parts[3].to_string()));
        }
        Some(Self {
            workload: parts[0].to_string(),
            namespace: parts[1].to_string(),
            cluster: parts[4].to_string(),
            labels: Some(labels),
        })
    }

    /// A label's value, empty when missing.
    pub fn label(&self, key: &str) -> &str {
        self.labels
            .as_deref()
            .and_then(|l| l.iter().find(|(k, _)| k == key))
            .map_or("", |(_, v)| v.as_str())
    }

    /// `<side>_app`, `<side>_version`, `<side>_canonical_service`,
    /// `<side>_canonical_revision` as Istio's `map_node` derives them.
    pub fn app_version_canonical(&self) -> [String; 4] {
        match &self.labels {
            None => [String::new(), String::new(), String::new(), "latest".into()],
            Some(_) => {
                let name = match self.label(CANONICAL_NAME) {
                    "" => self.workload.clone(),
                    n => n.to_string(),
                };
                let rev = match self.label(CANONICAL_REVISION) {
                    "" => "latest".to_string(),
                    r => r.to_string(),
                };
                [
                    self.label("app").to_string(),
                    self.label("version").to_string(),
                    name,
                    rev,
                ]
            }
        }
    }
}

/// A word-at-a-time multiplicative hash (FNV's offset basis, FxHash's
/// mixing) for the filters' caches of label sets, peers and peer headers.
/// Not DoS-resistant like the standard SipHash, and not needed to be: the
/// caches are bounded and start over when full, so colliding keys cost a
/// slower lookup in a small table at worst; SipHash over a few hundred
/// bytes per stream was a visible share of the filters' time, most of all
/// on the interpreters.
#[derive(Clone, Copy, Default)]
pub struct WordHash;

pub struct WordHasher(u64);

impl std::hash::BuildHasher for WordHash {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes a step (FNV's multiply on words, as FxHash mixes):
        // on the interpreters a byte-at-a-time loop over a label set's few
        // hundred bytes was several microseconds.
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_hash_separates_close_keys_and_repeats() {
        use std::hash::BuildHasher;
        let h = |b: &[u8]| WordHash.hash_one(b);
        let long = [7u8; 19];
        let mut other = long;
        other[17] = 8; // in the tail after two words
        assert_eq!(h(&long), h(&long));
        assert_ne!(h(&long), h(&other));
        assert_ne!(h(b"abcdefgh"), h(b"abcdefgi"));
        assert_ne!(h(b""), h(b"\0"));
    }

    #[test]
    fn node_struct_takes_istio_keys_only() {
        let labels = pairs::encode(&[("app", "web"), ("version", "v1")]);
        let s = node_struct(|k| match k {
            "NAME" => Some(b"web-1".to_vec()),
            "NAMESPACE" => Some(b"demo".to_vec()),
            "LABELS" => Some(labels.clone()),
            "PLATFORM_METADATA" => Some(Vec::new()),
            _ => None,
        });
        let keys: Vec<&str> = s.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["LABELS", "NAME", "NAMESPACE"]);
        let w = Workload::from_struct(&s);
        assert_eq!(w.namespace, "demo");
        assert_eq!(w.label("version"), "v1");
        assert_eq!(
            w.app_version_canonical(),
            ["web", "v1", "", "latest"].map(String::from)
        );
    }

    #[test]
    fn canonical_defaults_follow_istio() {
        let none = Workload::default();
        assert_eq!(
            none.app_version_canonical(),
            ["", "", "", "latest"].map(String::from)
        );
        let w = Workload::from_endpoint_label("echo-v1;demo;echo;v1;Kubernetes").unwrap();
        assert_eq!(
            w.app_version_canonical(),
            ["", "", "echo", "v1"].map(String::from)
        );
        assert_eq!(w.cluster, "Kubernetes");
        assert!(Workload::from_endpoint_label("a;b").is_none());
    }
}
