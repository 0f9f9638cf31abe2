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
#[derive(Clone, Debug, Default)]
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
        let host = AbiHost::new(abi, self.info.clone(), self.env.clone(), vm_key);
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
        self.failed_at = Some(Instant::now());
        self.consecutive_failures += 1;
        // The instance may hold broken state (the Rust SDK leaves a RefCell
        // borrowed on panic): drop it so it is never called again.
        self.vm = None;
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
        {
            let h = vm.host();
            h.phase = Phase::Callback;
            h.call = CallData::default();
        }
        let ready = self.env.shared.take_ready(key);
        for (root, token) in ready {
            let _ = self.call_root(
                |c| c.on_queue_ready,
                "proxy_on_queue_ready",
                &[Val::I32(root as i32), Val::I32(token as i32)],
                Phase::Callback,
            );
        }
    }

    /// Recreates a failed VM under the reload policy, when the backoff allows.
    fn maybe_reload(&mut self) {
        let FailPolicy::Reload { backoff } = self.config.fail_policy else {
            return;
        };
        if self.vm.is_some() {
            return;
        }
        let exp = self.consecutive_failures.saturating_sub(1).min(16);
        let delay = backoff
            .saturating_mul(1u32 << exp)
            .min(Duration::from_secs(60));
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
                self.vm = None;
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
    fn create_stream(&mut self, state: &SharedStream) -> Option<u32> {
        self.maybe_reload();
        let vm = self.vm.as_mut()?;
        let id = self.next_context_id;
        self.next_context_id += 1;
        let root = vm.root_id;
        vm.host().streams.insert(id, state.clone());
        let f = vm.cb.on_context_create;
        self.call_stream(
            id,
            f,
            "proxy_on_context_create",
            &[Val::I32(id as i32), Val::I32(root as i32)],
        )
        .ok()?;
        Some(id)
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
        id: Option<u32>,
        pick: fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: &[Val],
    ) -> FilterStatus {
        let (Some(id), Some(vm)) = (id, self.vm.as_mut()) else {
            return self.failed_status();
        };
        let f = pick(&vm.cb);
        match self.call_stream(id, f, name, args) {
            Ok(None) => FilterStatus::Continue,
            // 0 Continue and 2 ContinueAndEndStream go on; every stop value pauses.
            Ok(Some(Val::I32(0 | 2))) => FilterStatus::Continue,
            Ok(Some(_)) => FilterStatus::Pause,
            Err(()) => self.failed_status(),
        }
    }

    fn stream_event(
        &mut self,
        id: Option<u32>,
        pick: fn(&Callbacks) -> Option<FuncRef>,
        name: &str,
        args: &[Val],
    ) {
        let (Some(id), Some(vm)) = (id, self.vm.as_mut()) else {
            return;
        };
        let f = pick(&vm.cb);
        let _ = self.call_stream(id, f, name, args);
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` for a stream.
    fn finish_stream(&mut self, id: Option<u32>) {
        let Some(id) = id else { return };
        let i = id as i32;
        self.stream_event(Some(id), |c| c.on_done, "proxy_on_done", &[Val::I32(i)]);
        self.stream_event(Some(id), |c| c.on_log, "proxy_on_log", &[Val::I32(i)]);
        self.stream_event(Some(id), |c| c.on_delete, "proxy_on_delete", &[Val::I32(i)]);
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

    /// Delivers an HTTP callout response to the root context.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        headers: HeaderMap,
        body: Vec<u8>,
        trailers: HeaderMap,
    ) {
        let Some(vm) = self.vm.as_mut() else { return };
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

    /// Tears the root context down: `proxy_on_done`; if it returns false the
    /// plugin must call `proxy_done()` before `proxy_on_delete` runs. Returns
    /// whether the root context was deleted.
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
        let done_now = !matches!(done, Ok(Some(Val::I32(0))));
        let done_later = self.vm.as_mut().is_some_and(|vm| vm.host().done_called);
        if done_now || done_later {
            let _ = self.call_root(
                |c| c.on_delete,
                "proxy_on_delete",
                &[Val::I32(root)],
                Phase::Callback,
            );
            return true;
        }
        false
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

/// Plugins applied in order to every stream of one direction.
#[derive(Debug, Default)]
pub struct FilterChain {
    /// The plugins, first to last.
    pub plugins: Vec<Plugin>,
}

impl FilterChain {
    /// A chain of plugins.
    pub fn new(plugins: Vec<Plugin>) -> Self {
        Self { plugins }
    }

    fn new_state(provider: Arc<dyn PropertyProvider>) -> SharedStream {
        Arc::new(Mutex::new(StreamState {
            provider: Some(provider),
            ..Default::default()
        }))
    }

    /// Starts an HTTP stream: one context in every plugin.
    pub fn http_stream(&mut self, provider: Arc<dyn PropertyProvider>) -> HttpStream {
        let state = Self::new_state(provider);
        let contexts = self
            .plugins
            .iter_mut()
            .map(|p| p.create_stream(&state))
            .collect();
        HttpStream {
            state,
            contexts,
            finished: false,
        }
    }

    /// Starts a TCP stream and calls `proxy_on_new_connection`.
    pub fn tcp_stream(&mut self, provider: Arc<dyn PropertyProvider>) -> (TcpStream, FilterStatus) {
        let state = Self::new_state(provider);
        let contexts: Vec<Option<u32>> = self
            .plugins
            .iter_mut()
            .map(|p| p.create_stream(&state))
            .collect();
        let mut s = TcpStream {
            state,
            contexts,
            finished: false,
        };
        let status = s.run(
            self,
            |c| c.on_new_connection,
            "proxy_on_new_connection",
            |id| vec![Val::I32(id as i32)],
        );
        (s, status)
    }

    /// Calls `proxy_on_tick` on every plugin whose tick period is set.
    pub fn tick(&mut self) {
        for p in &mut self.plugins {
            if !p.tick_period().is_zero() {
                p.tick();
            }
        }
    }
}

fn run_chain(
    chain: &mut FilterChain,
    state: &SharedStream,
    contexts: &[Option<u32>],
    pick: fn(&Callbacks) -> Option<FuncRef>,
    name: &str,
    args: impl Fn(u32, &StreamState, bool) -> Vec<Val>,
) -> FilterStatus {
    for (plugin, id) in chain.plugins.iter_mut().zip(contexts) {
        let status = match (*id, plugin.vm.as_ref()) {
            (Some(id), Some(vm)) => {
                let eos = vm.cb.headers_eos;
                let a = args(id, &lock(state), eos);
                plugin.stream_action(Some(id), pick, name, &a)
            }
            _ => plugin.failed_status(),
        };
        if lock(state).local_response.is_some() {
            return FilterStatus::LocalResponse;
        }
        if status != FilterStatus::Continue {
            return status;
        }
    }
    FilterStatus::Continue
}

/// One HTTP exchange through a [`FilterChain`].
#[derive(Debug)]
pub struct HttpStream {
    state: SharedStream,
    contexts: Vec<Option<u32>>,
    finished: bool,
}

impl HttpStream {
    /// The shared state (headers, bodies, properties set by filters).
    pub fn state(&self) -> &SharedStream {
        &self.state
    }

    /// Runs `proxy_on_request_headers` with these headers; they are replaced
    /// by what the filters leave.
    pub fn request_headers(
        &mut self,
        chain: &mut FilterChain,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> FilterStatus {
        lock(&self.state).request_headers = std::mem::take(headers);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_request_headers,
            "proxy_on_request_headers",
            |id, s, eos3| {
                let mut v = vec![
                    Val::I32(id as i32),
                    Val::I32(s.request_headers.len() as i32),
                ];
                if eos3 {
                    v.push(Val::I32(i32::from(end_of_stream)));
                }
                v
            },
        );
        *headers = lock(&self.state).request_headers.clone();
        st
    }

    /// Runs `proxy_on_response_headers`.
    pub fn response_headers(
        &mut self,
        chain: &mut FilterChain,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> FilterStatus {
        lock(&self.state).response_headers = std::mem::take(headers);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_response_headers,
            "proxy_on_response_headers",
            |id, s, eos3| {
                let mut v = vec![
                    Val::I32(id as i32),
                    Val::I32(s.response_headers.len() as i32),
                ];
                if eos3 {
                    v.push(Val::I32(i32::from(end_of_stream)));
                }
                v
            },
        );
        *headers = lock(&self.state).response_headers.clone();
        st
    }

    /// Adds a request body chunk and runs `proxy_on_request_body` over
    /// everything buffered. On `Continue` the (possibly rewritten) body is
    /// returned and the buffer emptied; on `Pause` it stays buffered and the
    /// next chunk is delivered together with it.
    pub fn request_body(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        lock(&self.state).request_body.extend_from_slice(chunk);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_request_body,
            "proxy_on_request_body",
            |id, s, _| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(s.request_body.len() as i32),
                    Val::I32(i32::from(end_of_stream)),
                ]
            },
        );
        let body = if st == FilterStatus::Pause && !end_of_stream {
            Vec::new()
        } else {
            std::mem::take(&mut lock(&self.state).request_body)
        };
        (st, body)
    }

    /// As [`Self::request_body`], for the response.
    pub fn response_body(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        lock(&self.state).response_body.extend_from_slice(chunk);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_response_body,
            "proxy_on_response_body",
            |id, s, _| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(s.response_body.len() as i32),
                    Val::I32(i32::from(end_of_stream)),
                ]
            },
        );
        let body = if st == FilterStatus::Pause && !end_of_stream {
            Vec::new()
        } else {
            std::mem::take(&mut lock(&self.state).response_body)
        };
        (st, body)
    }

    /// Runs `proxy_on_request_trailers`.
    pub fn request_trailers(
        &mut self,
        chain: &mut FilterChain,
        trailers: &mut HeaderMap,
    ) -> FilterStatus {
        lock(&self.state).request_trailers = std::mem::take(trailers);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_request_trailers,
            "proxy_on_request_trailers",
            |id, s, _| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(s.request_trailers.len() as i32),
                ]
            },
        );
        *trailers = lock(&self.state).request_trailers.clone();
        st
    }

    /// Runs `proxy_on_response_trailers`.
    pub fn response_trailers(
        &mut self,
        chain: &mut FilterChain,
        trailers: &mut HeaderMap,
    ) -> FilterStatus {
        lock(&self.state).response_trailers = std::mem::take(trailers);
        let st = run_chain(
            chain,
            &self.state,
            &self.contexts,
            |c| c.on_response_trailers,
            "proxy_on_response_trailers",
            |id, s, _| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(s.response_trailers.len() as i32),
                ]
            },
        );
        *trailers = lock(&self.state).response_trailers.clone();
        st
    }

    /// The local response a filter sent, if any.
    pub fn local_response(&self) -> Option<crate::types::LocalResponse> {
        lock(&self.state).local_response.clone()
    }

    /// Ends the stream: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` in every plugin.
    pub fn finish(mut self, chain: &mut FilterChain) {
        self.finished = true;
        for (p, id) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.finish_stream(*id);
        }
    }
}

/// One TCP connection through a [`FilterChain`].
#[derive(Debug)]
pub struct TcpStream {
    state: SharedStream,
    contexts: Vec<Option<u32>>,
    finished: bool,
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
        args: impl Fn(u32) -> Vec<Val>,
    ) -> FilterStatus {
        run_chain(
            chain,
            &self.state,
            &self.contexts,
            pick,
            name,
            |id, _, _| args(id),
        )
    }

    /// Data from downstream: runs `proxy_on_downstream_data` and returns what
    /// to forward upstream (the filters may have rewritten it).
    pub fn downstream_data(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        lock(&self.state).downstream_data.extend_from_slice(chunk);
        let n = lock(&self.state).downstream_data.len() as i32;
        let st = self.run(
            chain,
            |c| c.on_downstream_data,
            "proxy_on_downstream_data",
            |id| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(n),
                    Val::I32(i32::from(end_of_stream)),
                ]
            },
        );
        let data = if st == FilterStatus::Pause && !end_of_stream {
            Vec::new()
        } else {
            std::mem::take(&mut lock(&self.state).downstream_data)
        };
        (st, data)
    }

    /// Data from upstream: runs `proxy_on_upstream_data`.
    pub fn upstream_data(
        &mut self,
        chain: &mut FilterChain,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (FilterStatus, Vec<u8>) {
        lock(&self.state).upstream_data.extend_from_slice(chunk);
        let n = lock(&self.state).upstream_data.len() as i32;
        let st = self.run(
            chain,
            |c| c.on_upstream_data,
            "proxy_on_upstream_data",
            |id| {
                vec![
                    Val::I32(id as i32),
                    Val::I32(n),
                    Val::I32(i32::from(end_of_stream)),
                ]
            },
        );
        let data = if st == FilterStatus::Pause && !end_of_stream {
            Vec::new()
        } else {
            std::mem::take(&mut lock(&self.state).upstream_data)
        };
        (st, data)
    }

    /// The downstream peer closed (`peer`: 0 unknown, 1 local, 2 remote).
    pub fn downstream_close(&mut self, chain: &mut FilterChain, peer: i32) {
        for (p, id) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.stream_event(
                *id,
                |c| c.on_downstream_connection_close,
                "proxy_on_downstream_connection_close",
                &[Val::I32(id.unwrap_or(0) as i32), Val::I32(peer)],
            );
        }
    }

    /// The upstream peer closed.
    pub fn upstream_close(&mut self, chain: &mut FilterChain, peer: i32) {
        for (p, id) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.stream_event(
                *id,
                |c| c.on_upstream_connection_close,
                "proxy_on_upstream_connection_close",
                &[Val::I32(id.unwrap_or(0) as i32), Val::I32(peer)],
            );
        }
    }

    /// Ends the connection's contexts.
    pub fn finish(mut self, chain: &mut FilterChain) {
        self.finished = true;
        for (p, id) in chain.plugins.iter_mut().zip(&self.contexts) {
            p.finish_stream(*id);
        }
    }
}
