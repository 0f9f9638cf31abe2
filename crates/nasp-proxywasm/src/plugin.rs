//! Plugins: a compiled module plus configuration, its VM instance, the
//! root context, and the HTTP and TCP stream contexts driven by a
//! [`FilterChain`].
//!
//! Invariants: a trap never escapes as a panic; after a trap the instance is
//! never called again (the Rust SDK leaves its state borrowed); the plugin's
//! [`FailPolicy`] decides what streams see.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bytecode::{AbiVersion, ModuleInfo};
use crate::env::{HostEnv, LogLevel, LogRecord, lock};
use crate::host::{AbiHost, CallData, Phase, PluginInfo, RestrictedHost};
use crate::runtime::{
    CompiledModule, FuncRef, FuncType, Instance, Limits, Trap, Val, ValType, WasmRuntime,
};
use crate::types::{HeaderMap, PropertyProvider, SharedStream, StreamState};
use crate::{Error, Result};

/// A module compiled by one runtime, with its ABI version checked.
#[derive(Clone)]
pub struct WasmModule {
    runtime: &'static str,
    compiled: Arc<dyn CompiledModule>,
    info: Arc<ModuleInfo>,
    abi: AbiVersion,
}

impl std::fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmModule")
            .field("runtime", &self.runtime)
            .field("abi", &self.abi)
            .finish()
    }
}

impl WasmModule {
    /// Parses, checks the ABI version and compiles a module.
    pub fn new(runtime: &dyn WasmRuntime, wasm: &[u8]) -> Result<Self> {
        let info = ModuleInfo::parse(wasm)?;
        let abi = info.require_abi()?;
        let compiled = runtime.compile(wasm)?;
        Ok(Self {
            runtime: runtime.name(),
            compiled,
            info: Arc::new(info),
            abi,
        })
    }
    /// The module's ABI version.
    pub fn abi(&self) -> AbiVersion {
        self.abi
    }
    /// The runtime that compiled it.
    pub fn runtime(&self) -> &'static str {
        self.runtime
    }
    /// What the bytecode says.
    pub fn info(&self) -> &ModuleInfo {
        &self.info
    }
}

/// The counter of traps (a VM failing at run time), per plugin, listener
/// direction and runtime: `nasp_wasm_plugin_traps_total{plugin, direction,
/// runtime}`. Envoy counts VMs (`wasm.<runtime>.created`, `.active`) but
/// has no failure counter, so the name is ours.
pub const TRAPS_METRIC: &str = "nasp_wasm_plugin_traps_total";

/// What a plugin's streams see once its VM has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailPolicy {
    /// Streams fail: HTTP gets a 503, TCP is reset (Envoy's default).
    #[default]
    FailClosed,
    /// The plugin is skipped.
    FailOpen,
    /// Streams in flight fail closed; new streams get a fresh instance from
    /// the compiled module, no sooner than `backoff` after the failure
    /// (doubling on each consecutive failure, up to one minute).
    Reload {
        /// First delay before a reload.
        backoff: Duration,
    },
}

/// Configuration of one plugin.
#[derive(Clone, Default)]
pub struct PluginConfig {
    /// Name, for logs.
    pub name: String,
    /// Root id (`plugin_root_id`): which root context of the module to use.
    pub root_id: String,
    /// VM id: the namespace of shared data and queues.
    pub vm_id: String,
    /// Plugin configuration (`proxy_on_configure`).
    pub configuration: Vec<u8>,
    /// VM configuration (`proxy_on_vm_start`).
    pub vm_configuration: Vec<u8>,
    /// Fail policy.
    pub fail_policy: FailPolicy,
    /// Memory and CPU limits.
    pub limits: Limits,
    /// What the plugin's root context reads with `proxy_get_property` (the
    /// node, `listener_direction`, listener metadata), and what a stream
    /// context reads when its own provider has no answer. Envoy answers
    /// these from the plugin's configuration, not from the stream, so they
    /// are visible in `proxy_on_vm_start`, `proxy_on_configure` and
    /// `proxy_on_tick` (see docs/proxy-wasm-host.md, "Properties").
    pub properties: Option<Arc<dyn PropertyProvider>>,
}

impl std::fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginConfig")
            .field("name", &self.name)
            .field("root_id", &self.root_id)
            .field("vm_id", &self.vm_id)
            .field(
                "configuration",
                &String::from_utf8_lossy(&self.configuration),
            )
            .field(
                "vm_configuration",
                &String::from_utf8_lossy(&self.vm_configuration),
            )
            .field("fail_policy", &self.fail_policy)
            .field("limits", &self.limits)
            .field("properties", &self.properties.is_some())
            .finish()
    }
}

impl PluginConfig {
    /// A config with a name and everything else default.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Default::default()
        }
    }
    /// Sets the root id.
    pub fn root_id(mut self, id: impl Into<String>) -> Self {
        self.root_id = id.into();
        self
    }
    /// Sets the VM id.
    pub fn vm_id(mut self, id: impl Into<String>) -> Self {
        self.vm_id = id.into();
        self
    }
    /// Sets the plugin configuration.
    pub fn configuration(mut self, c: impl Into<Vec<u8>>) -> Self {
        self.configuration = c.into();
        self
    }
    /// Sets the VM configuration.
    pub fn vm_configuration(mut self, c: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = c.into();
        self
    }
    /// Sets the fail policy.
    pub fn fail_policy(mut self, p: FailPolicy) -> Self {
        self.fail_policy = p;
        self
    }
    /// Sets the limits.
    pub fn limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }
    /// Sets the plugin's property provider: root contexts read it, stream
    /// contexts fall back to it (see [`PluginConfig::properties`]).
    pub fn properties(mut self, p: Arc<dyn PropertyProvider>) -> Self {
        self.properties = Some(p);
        self
    }
}

/// The state of a plugin's VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "message", rename_all = "snake_case")]
pub enum FailState {
    /// Healthy.
    Ok,
    /// Trapped at run time; the message names the function and the engine's error.
    RuntimeError(String),
}

/// What a stream callback decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterStatus {
    /// Go on to the next filter and the upstream.
    Continue,
    /// Stop iteration (buffer, wait for `proxy_continue_stream`).
    Pause,
    /// A filter sent a local response: send it instead.
    LocalResponse,
    /// A filter failed closed: reply 503 (HTTP) or reset (TCP).
    Fail,
}

macro_rules! callbacks {
    ($($field:ident : $name:literal ($($p:ident),*) -> ($($r:ident),*);)*) => {
        #[derive(Default, Clone, Copy)]
        struct Callbacks { $($field: Option<FuncRef>,)* headers_eos: bool }
        impl Callbacks {
            fn lookup(inst: &mut dyn Instance, abi: AbiVersion) -> Self {
                use ValType::*;
                let mut c = Callbacks::default();
                $(c.$field = inst.lookup($name, &FuncType::new(&[$($p),*], &[$($r),*]));)*
                c.headers_eos = abi != AbiVersion::V0_1_0;
                let (params3, params2) = (FuncType::new(&[I32, I32, I32], &[I32]), FuncType::new(&[I32, I32], &[I32]));
                let hdr = if c.headers_eos { &params3 } else { &params2 };
                c.on_request_headers = inst.lookup("proxy_on_request_headers", hdr);
                c.on_response_headers = inst.lookup("proxy_on_response_headers", hdr);
                c
            }
        }
    };
}

callbacks! {
    on_context_create: "proxy_on_context_create" (I32, I32) -> ();
    on_vm_start: "proxy_on_vm_start" (I32, I32) -> (I32);
    on_configure: "proxy_on_configure" (I32, I32) -> (I32);
    on_tick: "proxy_on_tick" (I32) -> ();
    on_done: "proxy_on_done" (I32) -> (I32);
    on_log: "proxy_on_log" (I32) -> ();
    on_delete: "proxy_on_delete" (I32) -> ();
    on_new_connection: "proxy_on_new_connection" (I32) -> (I32);
    on_downstream_data: "proxy_on_downstream_data" (I32, I32, I32) -> (I32);
    on_upstream_data: "proxy_on_upstream_data" (I32, I32, I32) -> (I32);
    on_downstream_connection_close: "proxy_on_downstream_connection_close" (I32, I32) -> ();
    on_upstream_connection_close: "proxy_on_upstream_connection_close" (I32, I32) -> ();
    on_request_headers: "proxy_on_request_headers" (I32, I32, I32) -> (I32);
    on_request_body: "proxy_on_request_body" (I32, I32, I32) -> (I32);
    on_request_trailers: "proxy_on_request_trailers" (I32, I32) -> (I32);
    on_response_headers: "proxy_on_response_headers" (I32, I32, I32) -> (I32);
    on_response_body: "proxy_on_response_body" (I32, I32, I32) -> (I32);
    on_response_trailers: "proxy_on_response_trailers" (I32, I32) -> (I32);
    on_http_call_response: "proxy_on_http_call_response" (I32, I32, I32, I32, I32) -> ();
    on_grpc_receive_initial_metadata: "proxy_on_grpc_receive_initial_metadata" (I32, I32, I32) -> ();
    on_grpc_receive: "proxy_on_grpc_receive" (I32, I32, I32) -> ();
    on_grpc_receive_trailing_metadata: "proxy_on_grpc_receive_trailing_metadata" (I32, I32, I32) -> ();
    on_grpc_close: "proxy_on_grpc_close" (I32, I32, I32) -> ();
    on_queue_ready: "proxy_on_queue_ready" (I32, I32) -> ();
    on_foreign_function: "proxy_on_foreign_function" (I32, I32, I32) -> ();
}

static NEXT_VM_KEY: AtomicU64 = AtomicU64::new(1);

struct Vm {
    inst: Box<dyn Instance>,
    cb: Callbacks,
    root_id: u32,
    vm_key: u64,
}

impl Vm {
    fn host(&mut self) -> &mut AbiHost {
        // Invariant: every instance is created by `Plugin::start_vm` with an
        // `AbiHost` handler, so the downcast cannot fail.
        #[allow(clippy::expect_used)]
        self.inst
            .handler()
            .as_any_mut()
            .downcast_mut::<AbiHost>()
            .expect("handler is an AbiHost")
    }
}

/// A configured plugin with its running VM.
pub struct Plugin {
    module: WasmModule,
    config: PluginConfig,
    info: Arc<PluginInfo>,
    env: HostEnv,
    vm: Option<Vm>,
    fail: FailState,
    failed_at: Option<Instant>,
    /// When the current VM started; a VM that ran long enough without
    /// failing resets the reload backoff.
    healthy_since: Option<Instant>,
    consecutive_failures: u32,
    next_context_id: u32,
    reloads: u32,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.config.name)
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // Queue notifications posted to this VM would otherwise wait forever.
        self.drop_vm();
    }
}

impl Plugin {
    /// Instantiates the module, runs its start functions, creates the root
    /// context and calls `proxy_on_vm_start` and `proxy_on_configure`. A
    /// configure that returns false rejects the plugin.
    pub fn new(module: &WasmModule, config: PluginConfig, env: HostEnv) -> Result<Self> {
        let info = Arc::new(PluginInfo {
            name: config.name.clone(),
            root_id: config.root_id.clone(),
            vm_id: config.vm_id.clone(),
            vm_configuration: config.vm_configuration.clone(),
            configuration: config.configuration.clone(),
        });
        let mut plugin = Plugin {
            module: module.clone(),
            config,
            info,
            env,
            vm: None,
            fail: FailState::Ok,
            failed_at: None,
            healthy_since: None,
            consecutive_failures: 0,
            next_context_id: 1,
            reloads: 0,
        };
        plugin.start_vm()?;
        Ok(plugin)
    }

    fn start_vm(&mut self) -> Result<()> {
        let abi = self.module.abi;
        let vm_key = NEXT_VM_KEY.fetch_add(1, Ordering::Relaxed);
        let mut host = AbiHost::new(abi, self.info.clone(), self.env.clone(), vm_key);
        host.plugin_properties = self.config.properties.clone();
        let restricted = RestrictedHost {
            info: self.info.clone(),
            env: self.env.clone(),
            base: Instant::now(),
        };
        let funcs = crate::abi::host_functions(abi);
        let mut inst = self.module.compiled.instantiate(
            &funcs,
            &self.config.limits,
            Box::new(host),
            Box::new(restricted),
        )?;
        use ValType::*;
        let alloc = inst
            .lookup("proxy_on_memory_allocate", &FuncType::new(&[I32], &[I32]))
            .or_else(|| inst.lookup("malloc", &FuncType::new(&[I32], &[I32])))
            .ok_or_else(|| {
                Error::MissingFunction(
                    "the module exports neither proxy_on_memory_allocate nor malloc".into(),
                )
            })?;
        let cb = Callbacks::lookup(inst.as_mut(), abi);
        let root_id = self.next_context_id;
        self.next_context_id += 1;
        let mut vm = Vm {
            inst,
            cb,
            root_id,
            vm_key,
        };
        {
            let h = vm.host();
            h.alloc = Some(alloc);
            h.root_id = root_id;
            h.effective = 0;
        }
        let start = |vm: &mut Vm, name: &str, ty: FuncType, args: &[Val]| -> Result<()> {
            if let Some(f) = vm.inst.lookup(name, &ty) {
                vm.inst
                    .call(f, args)
                    .map_err(|t| Error::StartFailed(format!("Function: {name} failed: {t}")))?;
            }
            Ok(())
        };
        let has = |vm: &mut Vm, name: &str, ty: FuncType| vm.inst.lookup(name, &ty).is_some();
        if has(&mut vm, "_initialize", FuncType::new(&[], &[])) {
            start(&mut vm, "_initialize", FuncType::new(&[], &[]), &[])?;
            if has(&mut vm, "main", FuncType::new(&[I32, I32], &[I32])) {
                start(
                    &mut vm,
                    "main",
                    FuncType::new(&[I32, I32], &[I32]),
                    &[Val::I32(0), Val::I32(0)],
                )?;
            } else {
                start(&mut vm, "__main_void", FuncType::new(&[], &[I32]), &[])?;
            }
        } else {
            start(&mut vm, "_start", FuncType::new(&[], &[]), &[])?;
        }
        self.vm = Some(vm);
        self.fail = FailState::Ok;
        let root = root_id as i32;
        self.call_root(
            |c| c.on_context_create,
            "proxy_on_context_create",
            &[Val::I32(root), Val::I32(0)],
            Phase::Callback,
        )
        .map_err(|_| Error::StartFailed(self.fail_message()))?;
        let vm_cfg = self.config.vm_configuration.len() as i32;
        let ok = self
            .call_root(
                |c| c.on_vm_start,
                "proxy_on_vm_start",
                &[Val::I32(root), Val::I32(vm_cfg)],
                Phase::VmStart,
            )
            .map_err(|_| Error::StartFailed(self.fail_message()))?;
        if ok == Some(Val::I32(0)) {
            return Err(Error::VmStartFailed(format!(
                "plugin {}: proxy_on_vm_start returned false",
                self.config.name
            )));
        }
        let cfg = self.config.configuration.len() as i32;
        let ok = self
            .call_root(
                |c| c.on_configure,
                "proxy_on_configure",
                &[Val::I32(root), Val::I32(cfg)],
                Phase::Configure,
            )
            .map_err(|_| Error::StartFailed(self.fail_message()))?;
        if ok == Some(Val::I32(0)) {
            return Err(Error::ConfigureRejected(format!(
                "plugin {}: proxy_on_configure returned false",
                self.config.name
            )));
        }
        self.healthy_since = Some(Instant::now());
        Ok(())
    }

    fn fail_message(&self) -> String {
        match &self.fail {
            FailState::Ok => "no failure".into(),
            FailState::RuntimeError(m) => m.clone(),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// The fail state.
    pub fn fail_state(&self) -> &FailState {
        &self.fail
    }
    /// How many times the VM was recreated under [`FailPolicy::Reload`].
    pub fn reloads(&self) -> u32 {
        self.reloads
    }
    /// The tick period the root context asked for (zero: none).
    pub fn tick_period(&mut self) -> Duration {
        self.vm
            .as_mut()
            .map(|vm| Duration::from_millis(u64::from(vm.host().tick_period_ms)))
            .unwrap_or_default()
    }
    /// The ABI version.
    pub fn abi(&self) -> AbiVersion {
        self.module.abi
    }
    /// A handle that interrupts the call running in this plugin's VM.
    pub fn interrupt_handle(&self) -> Option<crate::runtime::InterruptHandle> {
        self.vm.as_ref().and_then(|vm| vm.inst.interrupt_handle())
    }

    fn record_trap(&mut self, name: &str, trap: &Trap) {
        let msg = format!("Function: {name} failed: {trap}");
        self.env.logs.log(LogRecord {
            level: LogLevel::Error,
            plugin: self.config.name.clone(),
            message: msg.clone(),
        });
        self.fail = FailState::RuntimeError(msg);
        self.count_trap();
        let now = Instant::now();
        // A VM that served for twice the delay it waited for before failing
        // again is healthy again: the backoff starts over.
        let reset_after = self
            .backoff_delay(self.consecutive_failures)
            .saturating_mul(2);
        if self
            .healthy_since
            .is_some_and(|t| now.duration_since(t) >= reset_after)
        {
            self.consecutive_failures = 0;
        }
        self.healthy_since = None;
        self.failed_at = Some(now);
        self.consecutive_failures += 1;
        // The instance may hold broken state (the Rust SDK leaves a RefCell
        // borrowed on panic): drop it so it is never called again. Its
        // pending queue notifications go with it.
        self.drop_vm();
    }

    /// Counts a trap in the host's registry as [`TRAPS_METRIC`], labelled
    /// by plugin, listener direction and runtime, so a fail-open plugin
    /// that stopped reporting shows in the metrics rather than only in a
    /// log line.
    fn count_trap(&self) {
        let direction = match self
            .config
            .properties
            .as_ref()
            .and_then(|p| p.property(&["listener_direction"]))
        {
            Some(crate::types::PropertyValue::Int(1)) => "inbound",
            Some(crate::types::PropertyValue::Int(2)) => "outbound",
            _ => "unknown",
        };
        // The registry's tag encoding (`k=.=v;.;`) gives Prometheus labels;
        // the separators must not appear in a value.
        let clean = |v: &str| v.replace(";.;", "_").replace("=.=", "_");
        let name = format!(
            "plugin=.={};.;direction=.={direction};.;runtime=.={};.;{TRAPS_METRIC}",
            clean(&self.config.name),
            self.module.runtime,
        );
        let id = self
            .env
            .metrics
            .define(nasp_telemetry::MetricKind::Counter, &name);
        // Defined just above as a counter, so incrementing it cannot fail.
        let _ = self.env.metrics.increment(id, 1);
    }

    fn drop_vm(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.env.shared.forget_vm(vm.vm_key);
        }
    }

    /// The wait before a reload after `failures` consecutive failures.
    fn backoff_delay(&self, failures: u32) -> Duration {
        let FailPolicy::Reload { backoff } = self.config.fail_policy else {
            return Duration::ZERO;
        };
        let exp = failures.saturating_sub(1).min(16);
        backoff
            .saturating_mul(1u32 << exp)
            .min(Duration::from_secs(60))
    }

    /// Under [`FailPolicy::Reload`], with the VM down: how long after the
    /// failure the next reload may happen. `None` while the VM runs.
    pub fn reload_delay(&self) -> Option<Duration> {
        match (self.config.fail_policy, &self.vm) {
            (FailPolicy::Reload { .. }, None) => {
                Some(self.backoff_delay(self.consecutive_failures))
            }
            _ => None,
        }
    }

    /// An id of the running VM instance, unique in the process; `None` while
    /// it is down. A stream is bound to the instance that created its context.
    pub fn vm_key(&self) -> Option<u64> {
        self.vm.as_ref().map(|vm| vm.vm_key)
    }

    /// Stream contexts alive in the running VM.
    pub fn live_streams(&mut self) -> usize {
        self.vm.as_mut().map_or(0, |vm| vm.host().streams.len())
    }

    /// Calls a root-context callback. `Err` means the VM failed (or is gone).
    fn call_root(
        &mut self,
        pick: impl Fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: &[Val],
        phase: Phase,
    ) -> std::result::Result<Option<Val>, ()> {
        let Some(vm) = self.vm.as_mut() else {
            return Err(());
        };
        let Some(f) = pick(&vm.cb) else {
            return Ok(None);
        };
        let root = vm.root_id;
        {
            let h = vm.host();
            h.effective = root;
            h.phase = phase;
        }
        let r = vm.inst.call(f, args);
        let result = match r {
            Ok(v) => Ok(v),
            Err(t) => {
                self.record_trap(name, &t);
                return Err(());
            }
        };
        self.after_call();
        result
    }

    /// Resets per-call state and delivers pending queue notifications.
    fn after_call(&mut self) {
        let Some(vm) = self.vm.as_mut() else { return };
        let key = vm.vm_key;
        let root = vm.root_id as i32;
        let delete_root = {
            let h = vm.host();
            h.phase = Phase::Callback;
            if !h.call.is_clear() {
                h.call = CallData::default();
            }
            // `proxy_done` from a root context pending done: its
            // `proxy_on_delete` follows the call that made it, as in Envoy.
            let d = h.pending_done && h.done_called;
            if d {
                h.pending_done = false;
            }
            d
        };
        if delete_root {
            let _ = self.call_root(
                |c| c.on_delete,
                "proxy_on_delete",
                &[Val::I32(root)],
                Phase::Callback,
            );
        }
        self.deliver_queue_ready(key);
    }

    /// Delivers the `proxy_on_queue_ready` notifications posted to this VM
    /// (by any VM's enqueue) since its last call. Returns how many.
    pub fn dispatch_queue_ready(&mut self) -> usize {
        match self.vm.as_ref().map(|vm| vm.vm_key) {
            Some(key) => self.deliver_queue_ready(key),
            None => 0,
        }
    }

    fn deliver_queue_ready(&mut self, key: u64) -> usize {
        let ready = self.env.shared.take_ready(key);
        let n = ready.len();
        for (root, token) in ready {
            let _ = self.call_root(
                |c| c.on_queue_ready,
                "proxy_on_queue_ready",
                &[Val::I32(root as i32), Val::I32(token as i32)],
                Phase::Callback,
            );
        }
        n
    }

    /// Recreates a failed VM under the reload policy, when the backoff allows.
    fn maybe_reload(&mut self) {
        let FailPolicy::Reload { .. } = self.config.fail_policy else {
            return;
        };
        if self.vm.is_some() {
            return;
        }
        let delay = self.backoff_delay(self.consecutive_failures);
        if self.failed_at.is_some_and(|t| t.elapsed() < delay) {
            return;
        }
        match self.start_vm() {
            Ok(()) => {
                self.reloads += 1;
                self.env.logs.log(LogRecord {
                    level: LogLevel::Warn,
                    plugin: self.config.name.clone(),
                    message: format!("plugin reloaded after failure (reload #{})", self.reloads),
                });
            }
            Err(e) => {
                self.drop_vm();
                self.failed_at = Some(Instant::now());
                self.consecutive_failures += 1;
                self.fail = FailState::RuntimeError(format!("reload failed: {e}"));
            }
        }
    }

    /// Status that a failed plugin gives its streams.
    fn failed_status(&self) -> FilterStatus {
        match self.config.fail_policy {
            FailPolicy::FailOpen => FilterStatus::Continue,
            _ => FilterStatus::Fail,
        }
    }

    /// Creates a stream context in this VM. `None` if the VM is down.
    fn create_stream(&mut self, state: &SharedStream) -> Option<StreamCtx> {
        self.maybe_reload();
        let vm = self.vm.as_mut()?;
        let id = self.next_context_id;
        self.next_context_id += 1;
        let root = vm.root_id;
        let vm_key = vm.vm_key;
        vm.host().streams.insert(id, state.clone());
        let f = vm.cb.on_context_create;
        self.call_stream(
            id,
            f,
            "proxy_on_context_create",
            &[Val::I32(id as i32), Val::I32(root as i32)],
        )
        .ok()?;
        Some(StreamCtx { vm_key, id })
    }

    /// The context id of `ctx` if it lives in the running VM. A context of a
    /// VM that failed (even if a fresh one runs now) is never delivered to
    /// another instance: the SDKs panic on an unknown context id.
    fn live(&self, ctx: Option<StreamCtx>) -> Option<u32> {
        let ctx = ctx?;
        let vm = self.vm.as_ref()?;
        (vm.vm_key == ctx.vm_key).then_some(ctx.id)
    }

    /// Calls a stream callback with the stream as the effective context.
    fn call_stream(
        &mut self,
        id: u32,
        f: Option<FuncRef>,
        name: &str,
        args: &[Val],
    ) -> std::result::Result<Option<Val>, ()> {
        let Some(vm) = self.vm.as_mut() else {
            return Err(());
        };
        let Some(f) = f else { return Ok(None) };
        {
            let h = vm.host();
            h.effective = id;
            h.stop_iteration = false;
        }
        match vm.inst.call(f, args) {
            Ok(v) => {
                let stop = vm.host().stop_iteration;
                self.after_call();
                Ok(if stop { Some(Val::I32(1)) } else { v })
            }
            Err(t) => {
                self.record_trap(name, &t);
                Err(())
            }
        }
    }

    fn stream_action(
        &mut self,
        ctx: Option<StreamCtx>,
        cb: Cb,
        name: &str,
        args: &[Val],
    ) -> FilterStatus {
        let Some(id) = self.live(ctx) else {
            return self.failed_status();
        };
        let Some(vm) = self.vm.as_mut() else {
            return self.failed_status();
        };
        let f = (cb.pick)(&vm.cb);
        match self.call_stream(id, f, name, args) {
            Ok(None) => FilterStatus::Continue,
            // As Envoy maps them: headers 0 Continue and 2
            // ContinueAndEndStream go on; for bodies, trailers and TCP data
            // only 0 does (2 is StopIterationAndWatermark on a body).
            Ok(Some(Val::I32(0))) => FilterStatus::Continue,
            Ok(Some(Val::I32(2))) if cb.headers => FilterStatus::Continue,
            Ok(Some(_)) => FilterStatus::Pause,
            Err(()) => self.failed_status(),
        }
    }

    fn stream_event(
        &mut self,
        ctx: Option<StreamCtx>,
        pick: fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: &[Val],
    ) {
        let Some(id) = self.live(ctx) else { return };
        let Some(vm) = self.vm.as_mut() else { return };
        let f = pick(&vm.cb);
        let _ = self.call_stream(id, f, name, args);
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` for a stream, and
    /// its state freed. Nothing for a context of a VM that is gone.
    fn finish_stream(&mut self, ctx: Option<StreamCtx>) {
        let Some(id) = self.live(ctx) else { return };
        let i = id as i32;
        self.stream_event(ctx, |c| c.on_done, "proxy_on_done", &[Val::I32(i)]);
        self.stream_event(ctx, |c| c.on_log, "proxy_on_log", &[Val::I32(i)]);
        self.stream_event(ctx, |c| c.on_delete, "proxy_on_delete", &[Val::I32(i)]);
        if let Some(vm) = self.vm.as_mut() {
            vm.host().streams.remove(&id);
        }
    }

    /// Fires `proxy_on_tick` on the root context.
    pub fn tick(&mut self) {
        let root = self.vm.as_ref().map(|v| v.root_id as i32).unwrap_or(0);
        let _ = self.call_root(
            |c| c.on_tick,
            "proxy_on_tick",
            &[Val::I32(root)],
            Phase::Callback,
        );
    }

    /// A callout answer whose token this VM never issued (or already closed):
    /// it belongs to a VM that failed, and the SDKs panic on unknown tokens,
    /// so it is dropped.
    fn unknown_token(&self, callback: &str, token: u32) {
        self.env.logs.log(LogRecord {
            level: LogLevel::Debug,
            plugin: self.config.name.clone(),
            message: format!("{callback}: token {token} is not pending in this VM; dropped"),
        });
    }

    /// Delivers an HTTP callout response to the root context. A token the
    /// running VM did not issue (one from a VM that failed) is dropped.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        headers: HeaderMap,
        body: Vec<u8>,
        trailers: HeaderMap,
    ) {
        let Some(vm) = self.vm.as_mut() else { return };
        if !vm.host().callouts.remove(&token) {
            self.unknown_token("on_http_call_response", token);
            return;
        }
        let root = vm.root_id as i32;
        let (nh, nb, nt) = (
            headers.len() as i32,
            body.len() as i32,
            trailers.len() as i32,
        );
        let status = headers
            .get_str(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        vm.host().call = CallData {
            headers,
            body: Some(body),
            trailers,
            status: Some((status, String::new())),
            ..Default::default()
        };
        let args = [
            Val::I32(root),
            Val::I32(token as i32),
            Val::I32(nh),
            Val::I32(nb),
            Val::I32(nt),
        ];
        let _ = self.call_root_keep_data(
            |c| c.on_http_call_response,
            "proxy_on_http_call_response",
            &args,
        );
    }

    /// Delivers gRPC initial metadata.
    pub fn on_grpc_receive_initial_metadata(&mut self, token: u32, metadata: HeaderMap) {
        let Some(vm) = self.vm.as_mut() else { return };
        if !vm.host().callouts.contains(&token) {
            self.unknown_token("on_grpc_receive_initial_metadata", token);
            return;
        }
        let root = vm.root_id as i32;
        let n = metadata.len() as i32;
        vm.host().call = CallData {
            grpc_initial: metadata,
            ..Default::default()
        };
        let _ = self.call_root_keep_data(
            |c| c.on_grpc_receive_initial_metadata,
            "proxy_on_grpc_receive_initial_metadata",
            &[Val::I32(root), Val::I32(token as i32), Val::I32(n)],
        );
    }

    /// Delivers a gRPC message.
    pub fn on_grpc_receive(&mut self, token: u32, message: Vec<u8>) {
        let Some(vm) = self.vm.as_mut() else { return };
        if !vm.host().callouts.contains(&token) {
            self.unknown_token("on_grpc_receive", token);
            return;
        }
        let root = vm.root_id as i32;
        let n = message.len() as i32;
        vm.host().call = CallData {
            grpc_message: Some(message),
            ..Default::default()
        };
        let _ = self.call_root_keep_data(
            |c| c.on_grpc_receive,
            "proxy_on_grpc_receive",
            &[Val::I32(root), Val::I32(token as i32), Val::I32(n)],
        );
    }

    /// Delivers gRPC trailing metadata.
    pub fn on_grpc_receive_trailing_metadata(&mut self, token: u32, metadata: HeaderMap) {
        let Some(vm) = self.vm.as_mut() else { return };
        if !vm.host().callouts.contains(&token) {
            self.unknown_token("on_grpc_receive_trailing_metadata", token);
            return;
        }
        let root = vm.root_id as i32;
        let n = metadata.len() as i32;
        vm.host().call = CallData {
            grpc_trailing: metadata,
            ..Default::default()
        };
        let _ = self.call_root_keep_data(
            |c| c.on_grpc_receive_trailing_metadata,
            "proxy_on_grpc_receive_trailing_metadata",
            &[Val::I32(root), Val::I32(token as i32), Val::I32(n)],
        );
    }

    /// Delivers the end of a gRPC call with its status.
    pub fn on_grpc_close(&mut self, token: u32, status: u32, message: String) {
        let Some(vm) = self.vm.as_mut() else { return };
        if !vm.host().callouts.remove(&token) {
            self.unknown_token("on_grpc_close", token);
            return;
        }
        let root = vm.root_id as i32;
        vm.host().call = CallData {
            status: Some((status, message)),
            ..Default::default()
        };
        let _ = self.call_root_keep_data(
            |c| c.on_grpc_close,
            "proxy_on_grpc_close",
            &[
                Val::I32(root),
                Val::I32(token as i32),
                Val::I32(status as i32),
            ],
        );
    }

    /// Invokes `proxy_on_foreign_function` with arguments readable as buffer 8.
    pub fn on_foreign_function(&mut self, function_id: u32, args: Vec<u8>) {
        let Some(vm) = self.vm.as_mut() else { return };
        let root = vm.root_id as i32;
        let n = args.len() as i32;
        vm.host().call = CallData {
            foreign_args: Some(args),
            ..Default::default()
        };
        let _ = self.call_root_keep_data(
            |c| c.on_foreign_function,
            "proxy_on_foreign_function",
            &[Val::I32(root), Val::I32(function_id as i32), Val::I32(n)],
        );
    }

    fn call_root_keep_data(
        &mut self,
        pick: impl Fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: &[Val],
    ) -> std::result::Result<Option<Val>, ()> {
        // `call_root` resets the call data after the call, not before.
        self.call_root(pick, name, args, Phase::Callback)
    }

    /// Tears the root context down: `proxy_on_done`; if it returns true,
    /// `proxy_on_delete` follows at once. If it returns false the root
    /// context is pending done: `proxy_on_delete` runs after the call in
    /// which the plugin calls `proxy_done()` (which is NOT_FOUND at any other
    /// time, as in Envoy). Returns whether the root context was deleted now.
    pub fn shutdown(&mut self) -> bool {
        let root = match self.vm.as_ref() {
            Some(vm) => vm.root_id as i32,
            None => return true,
        };
        let done = self.call_root(
            |c| c.on_done,
            "proxy_on_done",
            &[Val::I32(root)],
            Phase::Callback,
        );
        match done {
            Err(()) => true,
            Ok(Some(Val::I32(0))) => {
                if let Some(vm) = self.vm.as_mut() {
                    let h = vm.host();
                    h.pending_done = true;
                    h.done_called = false;
                }
                false
            }
            Ok(_) => {
                let _ = self.call_root(
                    |c| c.on_delete,
                    "proxy_on_delete",
                    &[Val::I32(root)],
                    Phase::Callback,
                );
                true
            }
        }
    }

    /// Whether the root context called `proxy_done()`.
    pub fn done_called(&mut self) -> bool {
        self.vm.as_mut().is_some_and(|vm| vm.host().done_called)
    }

    /// Calls any export by name (for tests and tools).
    pub fn call_export(
        &mut self,
        name: &str,
        ty: &FuncType,
        args: &[Val],
    ) -> std::result::Result<Option<Val>, Trap> {
        let Some(vm) = self.vm.as_mut() else {
            return Err(Trap::engine("the plugin's VM has failed"));
        };
        let Some(f) = vm.inst.lookup(name, ty) else {
            return Err(Trap::engine(format!("no export {name}{ty}")));
        };
        let root = vm.root_id;
        vm.host().effective = root;
        match vm.inst.call(f, args) {
            Ok(v) => {
                self.after_call();
                Ok(v)
            }
            Err(t) => {
                self.record_trap(name, &t);
                Err(t)
            }
        }
    }
}

/// A stream's context in one plugin: the VM instance that created it and
/// its context id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StreamCtx {
    vm_key: u64,
    id: u32,
}

/// Which callback a stream action is, for mapping its return value.
#[derive(Clone, Copy)]
struct Cb {
    pick: fn(&Callbacks) -> Option<FuncRef>,
    headers: bool,
}

/// Up to three callback arguments, without a vector per call.
#[derive(Clone, Copy)]
struct Args {
    vals: [Val; 3],
    len: usize,
}

impl Args {
    fn new(vals: &[i32]) -> Self {
        let mut a = Args {
            vals: [Val::I32(0); 3],
            len: vals.len().min(3),
        };
        for (slot, v) in a.vals.iter_mut().zip(vals) {
            *slot = Val::I32(*v);
        }
        a
    }
    fn as_slice(&self) -> &[Val] {
        &self.vals[..self.len]
    }
}

static NEXT_CHAIN_ID: AtomicU64 = AtomicU64::new(1);

/// Contexts of streams dropped without `finish()`, waiting for their chain
/// to end them. The flag spares every stream operation the lock when
/// nothing was dropped (the common case).
#[derive(Debug, Default)]
struct DroppedList {
    any: std::sync::atomic::AtomicBool,
    list: Mutex<Vec<Vec<Option<StreamCtx>>>>,
}

type Dropped = Arc<DroppedList>;

impl DroppedList {
    fn push(&self, contexts: Vec<Option<StreamCtx>>) {
        let mut list = lock(&self.list);
        list.push(contexts);
        self.any.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<Vec<Option<StreamCtx>>> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut list = lock(&self.list);
        // Under the lock, so a concurrent push sets it again after.
        self.any.store(false, Ordering::Release);
        std::mem::take(&mut *list)
    }
}

/// Plugins applied in order to every stream of one direction.
///
/// A stream belongs to the chain that created it: driving it through
/// another chain fails (`FilterStatus::Fail`) without calling any plugin.
/// A stream dropped without [`HttpStream::finish`] / [`TcpStream::finish`]
/// (a cancelled request future) is ended by the chain at its next use, or
/// by [`FilterChain::dispatch_pending`]: `proxy_on_done`, `proxy_on_log`,
/// `proxy_on_delete`, and its state freed.
#[derive(Debug)]
pub struct FilterChain {
    /// The plugins, first to last.
    pub plugins: Vec<Plugin>,
    id: u64,
    dropped: Dropped,
}

impl Default for FilterChain {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Drop for FilterChain {
    fn drop(&mut self) {
        self.reap_dropped();
    }
}

impl FilterChain {
    /// A chain of plugins.
    pub fn new(plugins: Vec<Plugin>) -> Self {
        Self {
            plugins,
            id: NEXT_CHAIN_ID.fetch_add(1, Ordering::Relaxed),
            dropped: Arc::default(),
        }
    }

    fn new_state(provider: Arc<dyn PropertyProvider>) -> SharedStream {
        Arc::new(Mutex::new(StreamState {
            provider: Some(provider),
            ..Default::default()
        }))
    }

    fn contexts(&mut self, state: &SharedStream) -> Vec<Option<StreamCtx>> {
        self.reap_dropped();
        self.plugins
            .iter_mut()
            .map(|p| p.create_stream(state))
            .collect()
    }

    /// Ends the streams dropped without `finish()`. Returns how many.
    pub fn reap_dropped(&mut self) -> usize {
        let dropped = self.dropped.take();
        for contexts in &dropped {
            for (p, ctx) in self.plugins.iter_mut().zip(contexts) {
                p.finish_stream(*ctx);
            }
        }
        dropped.len()
    }

    /// Work that arrived while the chain was idle: ends dropped streams and
    /// delivers `proxy_on_queue_ready` posted to its VMs by other VMs.
    pub fn dispatch_pending(&mut self) {
        self.reap_dropped();
        for p in &mut self.plugins {
            p.dispatch_queue_ready();
        }
    }

    /// Starts an HTTP stream: one context in every plugin.
    pub fn http_stream(&mut self, provider: Arc<dyn PropertyProvider>) -> HttpStream {
        let state = Self::new_state(provider);
        let contexts = self.contexts(&state);
        HttpStream {
            state,
            contexts,
            chain_id: self.id,
            dropped: self.dropped.clone(),
            finished: false,
            request: Flow::default(),
            response: Flow::default(),
        }
    }

    /// Starts a TCP stream and calls `proxy_on_new_connection`.
    pub fn tcp_stream(&mut self, provider: Arc<dyn PropertyProvider>) -> (TcpStream, FilterStatus) {
        let state = Self::new_state(provider);
        let contexts = self.contexts(&state);
        let mut s = TcpStream {
            state,
            contexts,
            chain_id: self.id,
            dropped: self.dropped.clone(),
            finished: false,
        };
        let status = s.run(
            self,
            |c| c.on_new_connection,
            "proxy_on_new_connection",
            |id, _| Args::new(&[id as i32]),
        );
        (s, status)
    }

    /// Calls `proxy_on_tick` on every plugin whose tick period is set.
    pub fn tick(&mut self) {
        self.dispatch_pending();
        for p in &mut self.plugins {
            if !p.tick_period().is_zero() {
                p.tick();
            }
        }
    }
}

/// Runs one callback over the plugins from `start`; returns the status and
/// the index of the plugin that stopped, if one did.
fn run_chain(
    chain: &mut FilterChain,
    state: &SharedStream,
    contexts: &[Option<StreamCtx>],
    start: usize,
    cb: Cb,
    name: &str,
    args: impl Fn(u32, &StreamState, bool) -> Args,
) -> (FilterStatus, usize) {
    for (i, (plugin, ctx)) in chain
        .plugins
        .iter_mut()
        .zip(contexts)
        .enumerate()
        .skip(start)
    {
        let status = match (plugin.live(*ctx), plugin.vm.as_ref()) {
            (Some(id), Some(vm)) => {
                let eos = vm.cb.headers_eos;
                let a = args(id, &lock(state), eos);
                plugin.stream_action(*ctx, cb, name, a.as_slice())
            }
            _ => plugin.failed_status(),
        };
        if lock(state).local_response.is_some() {
            return (FilterStatus::LocalResponse, i);
        }
        if status != FilterStatus::Continue {
            return (status, i);
        }
    }
    (FilterStatus::Continue, contexts.len())
}

/// Where a paused direction of an HTTP stream stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// In the headers callback.
    Headers,
    /// In the body callback.
    Body,
    /// In the trailers callback.
    Trailers,
}

/// One direction of an HTTP stream: where it paused and what arrived since.
#[derive(Debug, Default)]
struct Flow {
    /// The stage and the plugin that paused.
    paused: Option<(Stage, usize)>,
    /// `end_of_stream` given with the headers.
    headers_eos: bool,
    /// Body data arrived (and is buffered) while paused; with its `end_of_stream`.
    body_pending: Option<bool>,
    /// Trailers arrived while paused.
    trailers_pending: bool,
}

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The request (decoding).
    Request,
    /// The response (encoding).
    Response,
}

/// What resuming a paused direction produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The outcome: `Continue` if the direction ran to the end of the chain.
    pub status: FilterStatus,
    /// The body to forward, when the body stage completed.
    pub body: Option<Vec<u8>>,
    /// Whether the trailers stage completed (read them from the state).
    pub trailers: bool,
}

struct Callbacks3 {
    headers: Cb,
    body: Cb,
    trailers: Cb,
    names: [&'static str; 3],
}

const REQUEST: Callbacks3 = Callbacks3 {
    headers: Cb {
        pick: |c| c.on_request_headers,
        headers: true,
    },
    body: Cb {
        pick: |c| c.on_request_body,
        headers: false,
    },
    trailers: Cb {
        pick: |c| c.on_request_trailers,
        headers: false,
    },
    names: [
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
    ],
};

const RESPONSE: Callbacks3 = Callbacks3 {
    headers: Cb {
        pick: |c| c.on_response_headers,
        headers: true,
    },
    body: Cb {
        pick: |c| c.on_response_body,
        headers: false,
    },
    trailers: Cb {
        pick: |c| c.on_response_trailers,
        headers: false,
    },
    names: [
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
    ],
};

fn headers_of(s: &mut StreamState, dir: Direction) -> &mut HeaderMap {
    match dir {
        Direction::Request => &mut s.request_headers,
        Direction::Response => &mut s.response_headers,
    }
}

fn body_of(s: &mut StreamState, dir: Direction) -> &mut Vec<u8> {
    match dir {
        Direction::Request => &mut s.request_body,
        Direction::Response => &mut s.response_body,
    }
}

fn trailers_of(s: &mut StreamState, dir: Direction) -> &mut HeaderMap {
    match dir {
        Direction::Request => &mut s.request_trailers,
        Direction::Response => &mut s.response_trailers,
    }
}

/// A header map of a stream, borrowed (the stream's state stays locked
/// while it lives).
pub struct MapRef<'a> {
    guard: std::sync::MutexGuard<'a, StreamState>,
    pick: fn(&StreamState) -> &HeaderMap,
}

impl std::ops::Deref for MapRef<'_> {
    type Target = HeaderMap;
    fn deref(&self) -> &HeaderMap {
        (self.pick)(&self.guard)
    }
}

impl std::fmt::Debug for MapRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// One HTTP exchange through a [`FilterChain`].
///
/// A direction that a plugin pauses stays paused: data that arrives is
/// buffered without callbacks, and [`HttpStream::resume`] (after the plugin
/// called `proxy_continue_stream`, see [`HttpStream::resume_continued`])
/// continues with the plugin after the one that paused, as Envoy's
/// `continueDecoding` / `continueEncoding` do.
#[derive(Debug)]
pub struct HttpStream {
    state: SharedStream,
    contexts: Vec<Option<StreamCtx>>,
    chain_id: u64,
    dropped: Dropped,
    finished: bool,
    request: Flow,
    response: Flow,
}

impl Drop for HttpStream {
    fn drop(&mut self) {
        if !self.finished {
            self.dropped.push(std::mem::take(&mut self.contexts));
        }
    }
}

impl HttpStream {
    /// The shared state (headers, bodies, properties set by filters).
    pub fn state(&self) -> &SharedStream {
        &self.state
    }

    /// Whether this stream was created by `chain`; a stream is never driven
    /// through another chain.
    fn mine(&self, chain: &mut FilterChain) -> bool {
        if chain.id != self.chain_id {
            return false;
        }
        chain.reap_dropped();
        true
    }

    fn flow(&mut self, dir: Direction) -> &mut Flow {
        match dir {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
        }
    }

    /// Where a direction is paused, if it is.
    pub fn paused(&self, dir: Direction) -> Option<Stage> {
        match dir {
            Direction::Request => self.request.paused.map(|p| p.0),
            Direction::Response => self.response.paused.map(|p| p.0),
        }
    }

    fn run_headers(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        from: usize,
    ) -> FilterStatus {
        let cbs = match dir {
            Direction::Request => &REQUEST,
            Direction::Response => &RESPONSE,
        };
        let eos = self.flow(dir).headers_eos;
        let (st, at) = run_chain(
            chain,
            &self.state,
            &self.contexts,
            from,
            cbs.headers,
            cbs.names[0],
            |id, s, eos3| {
                let n = match dir {
                    Direction::Request => s.request_headers.len(),
                    Direction::Response => s.response_headers.len(),
                } as i32;
                if eos3 {
                    Args::new(&[id as i32, n, i32::from(eos)])
                } else {
                    Args::new(&[id as i32, n])
                }
            },
        );
        if st == FilterStatus::Pause {
            self.flow(dir).paused = Some((Stage::Headers, at));
        }
        st
    }

    fn run_body(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        from: usize,
        eos: bool,
    ) -> FilterStatus {
        let cbs = match dir {
            Direction::Request => &REQUEST,
            Direction::Response => &RESPONSE,
        };
        let (st, at) = run_chain(
            chain,
            &self.state,
            &self.contexts,
            from,
            cbs.body,
            cbs.names[1],
            |id, s, _| {
                let n = match dir {
                    Direction::Request => s.request_body.len(),
                    Direction::Response => s.response_body.len(),
                } as i32;
                Args::new(&[id as i32, n, i32::from(eos)])
            },
        );
        if st == FilterStatus::Pause {
            let f = self.flow(dir);
            f.paused = Some((Stage::Body, at));
            // A body paused at its end stays buffered for the filter that
            // resumes; one paused mid-stream gets the next chunk with it.
            f.body_pending = eos.then_some(true);
        }
        st
    }

    fn run_trailers(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        from: usize,
    ) -> FilterStatus {
        let cbs = match dir {
            Direction::Request => &REQUEST,
            Direction::Response => &RESPONSE,
        };
        let (st, at) = run_chain(
            chain,
            &self.state,
            &self.contexts,
            from,
            cbs.trailers,
            cbs.names[2],
            |id, s, _| {
                let n = match dir {
                    Direction::Request => s.request_trailers.len(),
                    Direction::Response => s.response_trailers.len(),
                } as i32;
                Args::new(&[id as i32, n])
            },
        );
        if st == FilterStatus::Pause {
            self.flow(dir).paused = Some((Stage::Trailers, at));
        }
        st
    }

    /// Finishes a status: a local response on the request side is sent
    /// through the response callbacks, as Envoy's local replies are.
    fn conclude(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        st: FilterStatus,
    ) -> FilterStatus {
        if st == FilterStatus::LocalResponse && dir == Direction::Request {
            self.local_reply(chain);
        }
        st
    }

    /// Runs a local reply through every plugin's response callbacks, with
    /// `:status` and the reply's headers, then its body, and keeps what the
    /// filters made of it.
    fn local_reply(&mut self, chain: &mut FilterChain) {
        let Some(lr) = lock(&self.state).local_response.take() else {
            return;
        };
        {
            let mut s = lock(&self.state);
            let mut h = HeaderMap::new();
            h.add(b":status", lr.status.to_string().as_bytes());
            for (k, v) in lr.headers.iter() {
                h.add(k, v);
            }
            s.response_headers = h;
            s.response_body = lr.body.clone();
        }
        self.response = Flow {
            headers_eos: lr.body.is_empty(),
            ..Flow::default()
        };
        let st = self.run_headers(chain, Direction::Response, 0);
        if st == FilterStatus::Continue && !lr.body.is_empty() {
            self.run_body(chain, Direction::Response, 0, true);
        }
        let mut s = lock(&self.state);
        // A second local reply from a response callback is ignored: the
        // first one is being sent.
        s.local_response = None;
        let headers = std::mem::take(&mut s.response_headers);
        let status = headers
            .get_str(":status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(lr.status);
        let mut rest = HeaderMap::new();
        for (k, v) in headers.iter().filter(|(k, _)| *k != b":status") {
            rest.add(k, v);
        }
        let body = std::mem::take(&mut s.response_body);
        s.local_response = Some(crate::types::LocalResponse {
            status,
            headers: rest,
            body,
            ..lr
        });
    }

    fn headers_step(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        headers: HeaderMap,
        end_of_stream: bool,
    ) -> FilterStatus {
        if !self.mine(chain) {
            return FilterStatus::Fail;
        }
        *headers_of(&mut lock(&self.state), dir) = headers;
        *self.flow(dir) = Flow {
            headers_eos: end_of_stream,
            ..Flow::default()
        };
        let st = self.run_headers(chain, dir, 0);
        self.conclude(chain, dir, st)
    }

    fn body_step(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        if !self.mine(chain) {
            return (FilterStatus::Fail, Vec::new());
        }
        body_of(&mut lock(&self.state), dir).extend_from_slice(chunk);
        let (paused, pending) = {
            let f = self.flow(dir);
            (f.paused, f.body_pending.is_some())
        };
        match paused {
            // Paused in headers (waiting for a callout, say) or at the end of
            // the body: buffer until resumed.
            Some((Stage::Headers, _)) | Some((Stage::Trailers, _)) => {
                self.flow(dir).body_pending = Some(end_of_stream);
                return (FilterStatus::Pause, Vec::new());
            }
            Some((Stage::Body, _)) if pending => {
                return (FilterStatus::Pause, Vec::new());
            }
            _ => {}
        }
        self.flow(dir).paused = None;
        let st = self.run_body(chain, dir, 0, end_of_stream);
        let st = self.conclude(chain, dir, st);
        let body = if st == FilterStatus::Pause {
            Vec::new()
        } else {
            std::mem::take(body_of(&mut lock(&self.state), dir))
        };
        (st, body)
    }

    fn trailers_step(
        &mut self,
        chain: &mut FilterChain,
        dir: Direction,
        trailers: HeaderMap,
    ) -> FilterStatus {
        if !self.mine(chain) {
            return FilterStatus::Fail;
        }
        *trailers_of(&mut lock(&self.state), dir) = trailers;
        if self.flow(dir).paused.is_some() {
            self.flow(dir).trailers_pending = true;
            return FilterStatus::Pause;
        }
        let st = self.run_trailers(chain, dir, 0);
        self.conclude(chain, dir, st)
    }

    fn map(&self, pick: fn(&StreamState) -> &HeaderMap) -> MapRef<'_> {
        MapRef {
            guard: lock(&self.state),
            pick,
        }
    }

    /// The request headers as the filters left them (borrowed from the
    /// stream, which keeps them for later callbacks; no copy).
    pub fn request_header_map(&self) -> MapRef<'_> {
        self.map(|s| &s.request_headers)
    }

    /// The response headers as the filters left them.
    pub fn response_header_map(&self) -> MapRef<'_> {
        self.map(|s| &s.response_headers)
    }

    /// The request trailers as the filters left them.
    pub fn request_trailer_map(&self) -> MapRef<'_> {
        self.map(|s| &s.request_trailers)
    }

    /// The response trailers as the filters left them.
    pub fn response_trailer_map(&self) -> MapRef<'_> {
        self.map(|s| &s.response_trailers)
    }

    /// Runs `proxy_on_request_headers` over these headers. The stream keeps
    /// them (filters may read them until it ends); read what the filters
    /// made of them with [`Self::request_header_map`].
    pub fn request_headers(
        &mut self,
        chain: &mut FilterChain,
        headers: HeaderMap,
        end_of_stream: bool,
    ) -> FilterStatus {
        self.headers_step(chain, Direction::Request, headers, end_of_stream)
    }

    /// Runs `proxy_on_response_headers` (see [`Self::response_header_map`]).
    pub fn response_headers(
        &mut self,
        chain: &mut FilterChain,
        headers: HeaderMap,
        end_of_stream: bool,
    ) -> FilterStatus {
        self.headers_step(chain, Direction::Response, headers, end_of_stream)
    }

    /// Adds a request body chunk and runs `proxy_on_request_body` over
    /// everything buffered. On `Continue` the (possibly rewritten) body is
    /// returned and the buffer emptied; on `Pause` it stays buffered: a
    /// filter that paused mid-body gets the next chunk together with it, one
    /// that paused at the end keeps it until the stream is resumed. While the
    /// request is paused in an earlier stage the chunk is only buffered.
    pub fn request_body(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        self.body_step(chain, Direction::Request, chunk, end_of_stream)
    }

    /// As [`Self::request_body`], for the response.
    pub fn response_body(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        self.body_step(chain, Direction::Response, chunk, end_of_stream)
    }

    /// Runs `proxy_on_request_trailers` (only buffered while paused); see
    /// [`Self::request_trailer_map`].
    pub fn request_trailers(
        &mut self,
        chain: &mut FilterChain,
        trailers: HeaderMap,
    ) -> FilterStatus {
        self.trailers_step(chain, Direction::Request, trailers)
    }

    /// Runs `proxy_on_response_trailers` (only buffered while paused).
    pub fn response_trailers(
        &mut self,
        chain: &mut FilterChain,
        trailers: HeaderMap,
    ) -> FilterStatus {
        self.trailers_step(chain, Direction::Response, trailers)
    }

    /// Continues a paused direction with the plugin after the one that
    /// paused, then runs the stages that arrived meanwhile (buffered body,
    /// trailers) through the whole chain. Headers and trailers are read from
    /// [`Self::state`]. A direction that is not paused gives `Continue` and
    /// nothing to forward.
    pub fn resume(&mut self, chain: &mut FilterChain, dir: Direction) -> Resumed {
        let mut out = Resumed {
            status: FilterStatus::Continue,
            body: None,
            trailers: false,
        };
        if !self.mine(chain) {
            out.status = FilterStatus::Fail;
            return out;
        }
        let Some((stage, at)) = self.flow(dir).paused.take() else {
            return out;
        };
        let mut st = FilterStatus::Continue;
        if stage == Stage::Headers {
            st = self.run_headers(chain, dir, at + 1);
        }
        if st == FilterStatus::Continue && stage != Stage::Trailers {
            let from = if stage == Stage::Body { at + 1 } else { 0 };
            let pending = self.flow(dir).body_pending.take();
            if stage == Stage::Body || pending.is_some() {
                let eos = pending.unwrap_or(false);
                st = self.run_body(chain, dir, from, eos);
                if st == FilterStatus::Continue {
                    out.body = Some(std::mem::take(body_of(&mut lock(&self.state), dir)));
                }
            }
        }
        if st == FilterStatus::Continue {
            let from = if stage == Stage::Trailers { at + 1 } else { 0 };
            if stage == Stage::Trailers || std::mem::take(&mut self.flow(dir).trailers_pending) {
                st = self.run_trailers(chain, dir, from);
                out.trailers = st == FilterStatus::Continue;
            }
        }
        out.status = self.conclude(chain, dir, st);
        out
    }

    /// Resumes every direction a filter asked to continue with
    /// `proxy_continue_stream` (or 0.1.0's `proxy_continue_request` /
    /// `proxy_continue_response`) since the last time; call it after
    /// delivering a callout answer.
    pub fn resume_continued(&mut self, chain: &mut FilterChain) -> Vec<(Direction, Resumed)> {
        let asked = std::mem::take(&mut lock(&self.state).continued);
        let mut out = Vec::new();
        for dir in [Direction::Request, Direction::Response] {
            let code = match dir {
                Direction::Request => crate::abi::stream::HTTP_REQUEST,
                Direction::Response => crate::abi::stream::HTTP_RESPONSE,
            };
            if asked.contains(&code) && self.paused(dir).is_some() {
                out.push((dir, self.resume(chain, dir)));
            }
        }
        out
    }

    /// The local response a filter sent, if any (after the response
    /// callbacks ran over it).
    pub fn local_response(&self) -> Option<crate::types::LocalResponse> {
        lock(&self.state).local_response.clone()
    }

    /// Ends the stream: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` in
    /// every plugin. Through another chain than its own it does nothing here
    /// and the stream is ended as a dropped one by its own chain.
    pub fn finish(mut self, chain: &mut FilterChain) {
        if chain.id != self.chain_id {
            return;
        }
        self.finished = true;
        chain.reap_dropped();
        for (p, ctx) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.finish_stream(*ctx);
        }
    }
}

/// One TCP connection through a [`FilterChain`].
#[derive(Debug)]
pub struct TcpStream {
    state: SharedStream,
    contexts: Vec<Option<StreamCtx>>,
    chain_id: u64,
    dropped: Dropped,
    finished: bool,
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        if !self.finished {
            self.dropped.push(std::mem::take(&mut self.contexts));
        }
    }
}

impl TcpStream {
    /// The shared state.
    pub fn state(&self) -> &SharedStream {
        &self.state
    }

    fn run(
        &mut self,
        chain: &mut FilterChain,
        pick: fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: impl Fn(u32, &StreamState) -> Args,
    ) -> FilterStatus {
        if chain.id != self.chain_id {
            return FilterStatus::Fail;
        }
        // Any non-zero return of a TCP callback stops iteration (Envoy's
        // `Network::FilterStatus` has only Continue and StopIteration).
        let cb = Cb {
            pick,
            headers: false,
        };
        run_chain(
            chain,
            &self.state,
            &self.contexts,
            0,
            cb,
            name,
            |id, s, _| args(id, s),
        )
        .0
    }

    fn data(
        &mut self,
        chain: &mut FilterChain,
        upstream: bool,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        fn buf(s: &mut StreamState, upstream: bool) -> &mut Vec<u8> {
            if upstream {
                &mut s.upstream_data
            } else {
                &mut s.downstream_data
            }
        }
        buf(&mut lock(&self.state), upstream).extend_from_slice(chunk);
        let (pick, name): (fn(&Callbacks) -> Option<FuncRef>, &str) = if upstream {
            (|c| c.on_upstream_data, "proxy_on_upstream_data")
        } else {
            (|c| c.on_downstream_data, "proxy_on_downstream_data")
        };
        let eos = i32::from(end_of_stream);
        // Each plugin is told the buffer's size as the plugins before it left
        // it (Envoy passes the current buffer length), not the chunk's.
        let st = self.run(chain, pick, name, |id, s| {
            let n = if upstream {
                s.upstream_data.len()
            } else {
                s.downstream_data.len()
            };
            Args::new(&[id as i32, i32::try_from(n).unwrap_or(i32::MAX), eos])
        });
        let data = if st == FilterStatus::Pause && !end_of_stream {
            Vec::new()
        } else {
            std::mem::take(buf(&mut lock(&self.state), upstream))
        };
        (st, data)
    }

    /// Data from downstream: runs `proxy_on_downstream_data` and returns what
    /// to forward upstream (the filters may have rewritten it).
    pub fn downstream_data(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        self.data(chain, false, chunk, end_of_stream)
    }

    /// Data from upstream: runs `proxy_on_upstream_data`.
    pub fn upstream_data(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        self.data(chain, true, chunk, end_of_stream)
    }

    fn close(&mut self, chain: &mut FilterChain, upstream: bool, peer: i32) {
        if chain.id != self.chain_id {
            return;
        }
        let (pick, name): (fn(&Callbacks) -> Option<FuncRef>, &str) = if upstream {
            (
                |c| c.on_upstream_connection_close,
                "proxy_on_upstream_connection_close",
            )
        } else {
            (
                |c| c.on_downstream_connection_close,
                "proxy_on_downstream_connection_close",
            )
        };
        for (p, ctx) in chain.plugins.iter_mut().zip(&self.contexts) {
            let id = ctx.map_or(0, |c| c.id) as i32;
            p.stream_event(*ctx, pick, name, &[Val::I32(id), Val::I32(peer)]);
        }
    }

    /// The downstream peer closed (`peer`: 0 unknown, 1 local, 2 remote).
    pub fn downstream_close(&mut self, chain: &mut FilterChain, peer: i32) {
        self.close(chain, false, peer);
    }

    /// The upstream peer closed.
    pub fn upstream_close(&mut self, chain: &mut FilterChain, peer: i32) {
        self.close(chain, true, peer);
    }

    /// Ends the connection's contexts (see [`HttpStream::finish`]).
    pub fn finish(mut self, chain: &mut FilterChain) {
        if chain.id != self.chain_id {
            return;
        }
        self.finished = true;
        chain.reap_dropped();
        for (p, ctx) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.finish_stream(*ctx);
        }
    }
}
