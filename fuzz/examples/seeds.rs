//! Writes the seed inputs under `fuzz/seeds/` from the Istio config dumps in
//! `../shared/data/istio-config-dumps/` (or the directory given as the first
//! argument). Run it after the dumps or an input format changes:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! - `config_dump/`: one small dump per resource type (the first three
//!   resources of each list), and one with all four types;
//! - `xds_view/`: records in the `xds_view` target's format: a cluster with
//!   its endpoints and lookups of its host, listeners, route tables;
//! - `pairs/`: a few maps in the proxy-wasm pairs encoding.

use std::path::{Path, PathBuf};

use nasp_xds::read_config_dump;
use prost::Message;

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The dump with every list cut to its first `n` items.
fn truncated(config: &serde_json::Value, n: usize) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(map) = c.as_object_mut() {
        for v in map.values_mut() {
            if let Some(list) = v.as_array_mut() {
                list.truncate(n);
            }
        }
    }
    c
}

fn record(out: &mut Vec<u8>, tag: u8, payload: &[u8]) -> bool {
    let Ok(len) = u16::try_from(payload.len()) else {
        return false;
    };
    out.push(tag);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    true
}

fn text(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// An outbound lookup of `host:port`, and the route of `GET /` with an
/// `x-request-id` header when it is an HTTP destination.
fn lookup(out: &mut Vec<u8>, host: &str, port: u16) {
    out.push(6);
    out.extend_from_slice(&port.to_le_bytes());
    text(out, host);
    text(out, "/");
    text(out, "x-request-id");
    text(out, "0f3c");
}

fn main() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dumps = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("../../shared/data/istio-config-dumps"));
    let seeds = here.join("seeds");
    let wanted = ["Clusters", "Endpoints", "Listeners", "Routes"];
    for file in ["config_v0.json", "config_v1.json"] {
        let path = dumps.join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stem = file.trim_end_matches(".json");

        // Config dumps: one per type, and all four together.
        let dump: serde_json::Value = serde_json::from_str(&text).expect("dump is JSON");
        let configs = dump["configs"].as_array().expect("configs");
        let mut all = Vec::new();
        for c in configs {
            let ty = c["@type"].as_str().unwrap_or_default();
            let Some(kind) = wanted
                .iter()
                .find(|k| ty.ends_with(&format!("envoy.admin.v3.{k}ConfigDump")))
            else {
                continue;
            };
            let one = serde_json::json!({ "configs": [truncated(c, 3)] });
            write(
                &seeds.join("config_dump"),
                &format!("{stem}-{}.json", kind.to_lowercase()),
                one.to_string().as_bytes(),
            );
            all.push(truncated(c, 2));
        }
        let all = serde_json::json!({ "configs": all });
        write(
            &seeds.join("config_dump"),
            &format!("{stem}-all.json"),
            all.to_string().as_bytes(),
        );

        // xDS records from the resources of the full dump.
        let set = read_config_dump(&text).expect("dump reads");
        let dir = seeds.join("xds_view");
        for (i, (name, cluster)) in set.clusters.iter().enumerate().step_by(7) {
            let mut out = Vec::new();
            if !record(&mut out, 0, &cluster.encode_to_vec()) {
                continue;
            }
            let service = cluster
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone());
            if let Some(cla) = set.endpoints.get(&service) {
                record(&mut out, 1, &cla.encode_to_vec());
            }
            // `outbound|80||echo.demo.svc.cluster.local`: look its host up.
            let parts: Vec<&str> = name.split('|').collect();
            if let [_, port, _, host] = parts[..] {
                lookup(&mut out, host, port.parse().unwrap_or(80));
            }
            write(&dir, &format!("{stem}-cluster-{i}"), &out);
        }
        for (i, listener) in set.listeners.values().enumerate().step_by(5) {
            let mut out = Vec::new();
            if record(&mut out, 2, &listener.encode_to_vec()) {
                out.extend_from_slice(&[7, 0x36, 0x3b]); // inbound 15158
                write(&dir, &format!("{stem}-listener-{i}"), &out);
            }
        }
        for (i, route) in set.routes.values().enumerate().step_by(3) {
            let mut out = Vec::new();
            if record(&mut out, 3, &route.encode_to_vec()) {
                lookup(&mut out, "echo", 80);
                write(&dir, &format!("{stem}-route-{i}"), &out);
            }
        }
    }

    let pairs: &[&[(&[u8], &[u8])]] = &[
        &[
            (b":method", b"GET"),
            (b":path", b"/"),
            (b":authority", b"echo"),
        ],
        &[(b"", b"")],
        &[
            (b"x-request-id", b"0f3c"),
            (b"content-type", b"application/grpc"),
        ],
    ];
    for (i, p) in pairs.iter().enumerate() {
        write(
            &seeds.join("pairs"),
            &format!("map-{i}"),
            &nasp_proxywasm::pairs::encode(p.iter().copied()),
        );
    }
}
