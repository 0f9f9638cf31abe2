//! The proxy-wasm host of nasp: the ABI (0.1.0, 0.2.0, 0.2.1) written once
//! above the [`runtime::WasmRuntime`] trait that wasmtime, wasmi and wasm3
//! backends implement.
//!
//! - [`runtime`]: the engine seam (object safe).
//! - [`abi`]: constants and the table of every host function.
//! - [`plugin`]: modules, plugins, the fail policy, HTTP and TCP streams.
//! - [`env`]: logs, metrics, shared data and queues, foreign functions and
//!   callouts shared between plugins and the embedder.
//!
//! Invariants: no guest input can panic the host; a trapped instance is never
//! called again; every host function of the spec links with its exact
//! signature.

pub mod abi;
pub mod bytecode;
pub mod env;
mod host;
pub mod pairs;
pub mod plugin;
pub mod runtime;
pub mod types;

pub use bytecode::{AbiVersion, ModuleInfo};
pub use env::{HostEnv, LogLevel, LogRecord, LogSink, MemoryLogSink};
pub use host::PluginInfo;
pub use plugin::{
    Direction, FailPolicy, FailState, FilterChain, FilterStatus, HttpStream, MapRef, Plugin,
    PluginConfig, Resumed, Stage, TRAPS_METRIC, TcpStream, WasmModule,
};
pub use runtime::{EngineError, Limits, Trap, WasmRuntime};
pub use types::{
    HeaderMap, LocalResponse, MapProperties, NoProperties, PropertyProvider, PropertyValue,
};

/// Errors of the proxy-wasm host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a valid WebAssembly module.
    #[error("invalid wasm module: {0}")]
    InvalidModule(String),
    /// The ABI version is missing or unknown.
    #[error("{0}")]
    UnknownAbi(String),
    /// The engine failed to compile or instantiate.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A required export is missing.
    #[error("missing function: {0}")]
    MissingFunction(String),
    /// `_initialize`, `_start` or a root callback trapped.
    #[error("plugin failed to start: {0}")]
    StartFailed(String),
    /// `proxy_on_vm_start` returned false.
    #[error("{0}")]
    VmStartFailed(String),
    /// `proxy_on_configure` returned false.
    #[error("configuration rejected: {0}")]
    ConfigureRejected(String),
    /// The runtime asked for is not compiled in.
    #[error("wasm runtime {name:?} is not compiled into this build (available: {available})")]
    RuntimeNotCompiledIn {
        /// The name asked for.
        name: String,
        /// The runtimes that are.
        available: String,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
