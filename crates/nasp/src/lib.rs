//! nasp: what an Istio sidecar gives an application, as a library.
//!
//! This crate only re-exports the pieces, each under a short name:
//! - [`wasm`]: the proxy-wasm host ([`nasp_proxywasm`]) and the runtimes
//!   compiled in, chosen at start-up by name with [`wasm::runtime_by_name`];
//! - [`telemetry`]: the metric registry and Prometheus exposition;
//! - [`identity`]: SPIFFE ids, the Istio CA client, certificate rotation and
//!   rustls glue ([`nasp_identity`]);
//! - [`xds`]: the ADS client, the resolved mesh view and config dumps;
//! - [`transport`]: mesh listeners (STRICT / PERMISSIVE / DISABLE), mTLS
//!   connections with Istio's SNI and ALPN, HTTP serving with the peer's id;
//! - `controlplane`: the embedded control plane (feature `controlplane`);
//! - [`Mesh`] ([`mesh`]): the facade a workload joins the mesh with, whose
//!   default filter chain ([`default_filters`]) is our metadata-exchange
//!   and istio-stats filters, embedded in the library; [`access_log`]:
//!   its access log (Envoy's format or JSON, off by default); [`trace`]:
//!   its tracing (W3C / B3 propagation, a span per request, OTLP export;
//!   off by default).
//!
//! Cargo features (all on by default): `wasmtime`, `wasmi`, `wasm3`, one per
//! proxy-wasm runtime. Any combination builds, including none; a runtime that
//! is not compiled in is a clear error at start-up, never a build failure.
//! Off by default: `otel`, the OpenTelemetry tracer behind [`trace`]
//! (without it a tracing configuration is such an error).

pub mod access_log;
mod counted;
pub mod default_filters;
pub mod mesh;
pub mod trace;

pub use mesh::{
    FilterDirection, FilterKind, FilterSpec, Mesh, MeshBuilder, MeshError, MeshHttpClient,
    MeshHttpClientExt, TcpConnection,
};
pub use nasp_identity as identity;
pub use nasp_telemetry as telemetry;
pub use nasp_transport as transport;
pub use nasp_xds as xds;

/// The embedded control plane (feature `controlplane`, on by default).
#[cfg(feature = "controlplane")]
pub use nasp_controlplane as controlplane;

/// The proxy-wasm host and its runtimes.
pub mod wasm {
    pub use nasp_proxywasm::*;

    use std::sync::Arc;

    /// A proxy-wasm runtime, chosen at start-up.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum Runtime {
        /// wasmtime: Cranelift JIT, fastest calls, slowest to build.
        Wasmtime,
        /// wasmi: pure-Rust interpreter.
        Wasmi,
        /// wasm3: C interpreter, smallest.
        Wasm3,
    }

    impl Runtime {
        /// Every runtime nasp knows, compiled in or not.
        pub const ALL: [Runtime; 3] = [Runtime::Wasmtime, Runtime::Wasmi, Runtime::Wasm3];

        /// The name used to select it.
        pub fn name(self) -> &'static str {
            match self {
                Runtime::Wasmtime => "wasmtime",
                Runtime::Wasmi => "wasmi",
                Runtime::Wasm3 => "wasm3",
            }
        }

        /// Parses a name.
        pub fn from_name(name: &str) -> Option<Self> {
            Self::ALL.into_iter().find(|r| r.name() == name)
        }

        /// Whether this build includes the runtime.
        pub fn is_compiled_in(self) -> bool {
            match self {
                Runtime::Wasmtime => cfg!(feature = "wasmtime"),
                Runtime::Wasmi => cfg!(feature = "wasmi"),
                Runtime::Wasm3 => cfg!(feature = "wasm3"),
            }
        }

        /// The runtimes compiled into this build.
        pub fn available() -> Vec<Runtime> {
            Self::ALL
                .into_iter()
                .filter(|r| r.is_compiled_in())
                .collect()
        }

        /// Creates the runtime, or explains that it is not compiled in.
        pub fn create(self) -> Result<Arc<dyn WasmRuntime>> {
            let missing = || Error::RuntimeNotCompiledIn {
                name: self.name().to_string(),
                available: Runtime::available()
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            match self {
                #[cfg(feature = "wasmtime")]
                Runtime::Wasmtime => Ok(nasp_runtime_wasmtime::runtime()?),
                #[cfg(feature = "wasmi")]
                Runtime::Wasmi => Ok(nasp_runtime_wasmi::runtime()?),
                #[cfg(feature = "wasm3")]
                Runtime::Wasm3 => Ok(nasp_runtime_wasm3::runtime()?),
                #[allow(unreachable_patterns)]
                _ => Err(missing()),
            }
        }
    }

    /// The process's one engine of a runtime, created on first use: every
    /// `Mesh` and plugin of the process shares it (an engine per runtime
    /// per process, not one per call).
    pub fn shared_runtime(name: &str) -> Result<Arc<dyn WasmRuntime>> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock, PoisonError};
        static ENGINES: OnceLock<Mutex<HashMap<String, Arc<dyn WasmRuntime>>>> = OnceLock::new();
        let mut engines = ENGINES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = engines.get(name) {
            return Ok(r.clone());
        }
        let r = runtime_by_name(name)?;
        engines.insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Creates a runtime by name (`"wasmtime"`, `"wasmi"`, `"wasm3"`).
    pub fn runtime_by_name(name: &str) -> Result<Arc<dyn WasmRuntime>> {
        match Runtime::from_name(name) {
            Some(r) => r.create(),
            None => Err(Error::RuntimeNotCompiledIn {
                name: name.to_string(),
                available: Runtime::available()
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
