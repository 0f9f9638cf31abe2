//! The default filter chain of every [`crate::Mesh`]: our own
//! metadata-exchange and istio-stats filters (`filters/`), built to
//! `wasm32-wasip1` and embedded in the library, so that a workload reports
//! Istio's standard metrics without configuring anything.
//!
//! The `.wasm` files under `crates/nasp/filters/` are checked in: a normal
//! `cargo build` needs no wasm toolchain. `cargo xtask build-filters
//! --update` rebuilds them from `filters/` (reproducibly: source paths are
//! remapped), and `cargo xtask test` fails when the checked-in bytes differ
//! from a fresh build (`docs/telemetry.md`, "The default chain").
//!
//! The chain, in each direction (inbound and outbound), for HTTP and for TCP
//! alike: metadata exchange first (it reads the peer's metadata and stores
//! it in `upstream_peer` / `downstream_peer`), then stats (which labels with
//! it). Both are fail-open: telemetry that traps is skipped from then on,
//! the traffic goes on.
//!
//! Invariants: each module is compiled at most once per runtime per
//! process, whatever the number of meshes; the bytes are never modified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nasp_proxywasm::{FailPolicy, PluginConfig, WasmModule};

use crate::mesh::{FilterDirection, FilterKind, FilterSpec};

/// `filters/metadata-exchange` (wasm32-wasip1, release): Istio's peer
/// metadata exchange over HTTP headers and the TCP preamble.
pub const METADATA_EXCHANGE_WASM: &[u8] = include_bytes!("../filters/metadata-exchange.wasm");

/// `filters/istio-stats` (wasm32-wasip1, release): Istio's standard
/// request and TCP metrics.
pub const ISTIO_STATS_WASM: &[u8] = include_bytes!("../filters/istio-stats.wasm");

/// The metadata-exchange plugin's configuration: Istio's (the filter
/// accepts `max_peer_cache_size` and ignores it).
pub const METADATA_EXCHANGE_CONFIG: &str = r#"{"max_peer_cache_size":10000}"#;

/// The stats plugin's configuration: Istio's standard metrics, no custom
/// dimensions.
pub const ISTIO_STATS_CONFIG: &str = "{}";

/// Metadata exchange's and stats' bytes.
type Pair = (Arc<[u8]>, Arc<[u8]>);

/// The two modules as shared bytes, copied out of the binary once.
fn wasm() -> &'static Pair {
    static WASM: OnceLock<Pair> = OnceLock::new();
    WASM.get_or_init(|| {
        (
            Arc::from(METADATA_EXCHANGE_WASM),
            Arc::from(ISTIO_STATS_WASM),
        )
    })
}

/// Which of the two modules a spec runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Module {
    MetadataExchange,
    IstioStats,
}

/// One plugin of the default chain.
fn spec(module: Module, direction: FilterDirection, kind: FilterKind) -> FilterSpec {
    let (mx, stats) = wasm();
    let (dir, tcp) = (
        match direction {
            FilterDirection::Inbound => "inbound",
            FilterDirection::Outbound => "outbound",
        },
        kind == FilterKind::Network,
    );
    // The filters pick HTTP or TCP from the root id (`tcp` in it) and stats
    // its direction from `listener_direction`; the root ids are also what
    // logs name the plugins by.
    let (wasm, config) = match module {
        Module::MetadataExchange => (
            mx.clone(),
            PluginConfig::new("istio.metadata_exchange")
                .root_id(if tcp {
                    "tcp_metadata_exchange"
                } else {
                    "metadata_exchange"
                })
                .configuration(METADATA_EXCHANGE_CONFIG),
        ),
        Module::IstioStats => (
            stats.clone(),
            PluginConfig::new("istio.stats")
                .root_id(if tcp {
                    format!("tcp_stats_{dir}")
                } else {
                    format!("stats_{dir}")
                })
                .configuration(ISTIO_STATS_CONFIG),
        ),
    };
    FilterSpec {
        wasm,
        // Telemetry must never cost traffic: a trap skips the plugin.
        config: config.fail_policy(FailPolicy::FailOpen),
        direction,
        kind,
    }
}

/// The default chain as [`FilterSpec`]s, in the order a [`crate::Mesh`]
/// runs them: for inbound and outbound, HTTP and TCP, metadata exchange
/// then stats. Useful to rebuild it around filters of one's own after
/// [`crate::MeshBuilder::no_default_filters`] (a mesh built with the
/// defaults on compiles them once per process; given as specs they are
/// compiled per mesh like any filter).
pub fn specs() -> Vec<FilterSpec> {
    chain().into_iter().map(|(_, s)| s).collect()
}

/// The chain with which module each entry is.
pub(crate) fn chain() -> Vec<(Module, FilterSpec)> {
    let mut out = Vec::with_capacity(8);
    for kind in [FilterKind::Http, FilterKind::Network] {
        for direction in [FilterDirection::Inbound, FilterDirection::Outbound] {
            for module in [Module::MetadataExchange, Module::IstioStats] {
                out.push((module, spec(module, direction, kind)));
            }
        }
    }
    out
}

/// The two modules compiled by `runtime`, once per process: a debug build
/// of wasmtime takes seconds to compile them, and every `Mesh` (tests build
/// dozens) would pay it again. Not cached for user filters, whose bytes
/// could differ from one mesh to the next and would be held forever.
pub(crate) fn compiled(runtime: &str) -> nasp_proxywasm::Result<(WasmModule, WasmModule)> {
    type Cache = Mutex<HashMap<String, (WasmModule, WasmModule)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(m) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(runtime)
    {
        return Ok(m.clone());
    }
    // Compiled outside the lock: another runtime's meshes need not wait. Two
    // meshes racing on the same runtime may both compile; the first wins.
    let engine = crate::wasm::shared_runtime(runtime)?;
    let (mx, stats) = wasm();
    let modules = (
        WasmModule::new(engine.as_ref(), mx)?,
        WasmModule::new(engine.as_ref(), stats)?,
    );
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(cache.entry(runtime.to_string()).or_insert(modules).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_modules_are_proxy_wasm_filters() {
        for wasm in [METADATA_EXCHANGE_WASM, ISTIO_STATS_WASM] {
            assert_eq!(&wasm[..4], b"\0asm");
            let info = nasp_proxywasm::ModuleInfo::parse(wasm).expect("parses");
            info.require_abi().expect("a proxy-wasm ABI version");
        }
    }

    #[test]
    fn the_chain_is_exchange_then_stats_fail_open_everywhere() {
        let chain = specs();
        assert_eq!(chain.len(), 8);
        for pair in chain.chunks(2) {
            assert_eq!(pair[0].config.name, "istio.metadata_exchange");
            assert_eq!(pair[1].config.name, "istio.stats");
            assert_eq!(pair[0].direction, pair[1].direction);
            assert_eq!(pair[0].kind, pair[1].kind);
            for s in pair {
                assert_eq!(s.config.fail_policy, FailPolicy::FailOpen);
                let tcp = s.config.root_id.contains("tcp");
                assert_eq!(tcp, s.kind == FilterKind::Network, "{}", s.config.root_id);
            }
        }
        let roots: Vec<&str> = chain.iter().map(|s| s.config.root_id.as_str()).collect();
        assert!(roots.contains(&"stats_inbound") && roots.contains(&"tcp_stats_outbound"));
    }
}
