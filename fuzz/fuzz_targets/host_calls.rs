//! Every host function's argument handling against a guest the fuzzer
//! controls.
//!
//! The seam is the engine trait: `WasmRuntime` is implemented here by a fake
//! engine whose "guest" is a script. The real ABI (`AbiHost`, handed to
//! `CompiledModule::instantiate` like to any backend) is driven through a
//! real `Plugin` and `FilterChain`; whenever the host calls into the guest (a
//! lifecycle or stream callback), the fake guest makes fuzzer-chosen host
//! calls (any function the module's ABI version links, any arguments) against
//! a fuzzer-filled linear memory, and its allocator answers with good, bad,
//! null or trapping pointers, or calls the host itself (which must reach the
//! restricted handler). The host must never panic, and every host function
//! must answer with exactly the result type its signature declares, because
//! the backends hand that value to the engine unchecked.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nasp_proxywasm::env::{ForeignFunction, RecordingCallouts};
use nasp_proxywasm::runtime::{
    CompiledModule, EngineError, FuncRef, FuncType, Guest, HostFunc, HostHandler, Instance,
    InterruptHandle, Limits, Trap, Val, ValType, WasmRuntime,
};
use nasp_proxywasm::{
    Direction, FailPolicy, FilterChain, HeaderMap, HostEnv, MapProperties, Plugin, PluginConfig,
    PropertyValue, WasmModule,
};

/// An argument: small values hit the fuzzer-filled memory, the others probe
/// the bounds checks.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Arg {
    Small(u8),
    Mid(u16),
    Any(i32),
    Wide(i64),
}

impl Arg {
    fn val(self, ty: ValType) -> Val {
        let raw = match self {
            Arg::Small(v) => i64::from(v),
            Arg::Mid(v) => i64::from(v),
            Arg::Any(v) => i64::from(v),
            Arg::Wide(v) => v,
        };
        match ty {
            ValType::I32 => Val::I32(raw as i32),
            ValType::I64 => Val::I64(raw),
            ValType::F32 => Val::F32(raw as f32),
            ValType::F64 => Val::F64(raw as f64),
        }
    }
}

/// One host call: which of the linked host functions, with what arguments
/// (missing ones are 0).
#[derive(Arbitrary, Debug, Clone)]
struct HostCall {
    func: u8,
    args: Vec<Arg>,
}

/// What the guest's allocator does when the host asks for memory.
#[derive(Arbitrary, Debug, Clone)]
enum AllocReply {
    /// A fresh, aligned block in the upper half of memory (0 when full).
    Bump,
    /// This address, whatever it holds.
    At(u16),
    /// Null.
    Null,
    /// Any value, usually out of bounds.
    Wild(i32),
    /// The allocator traps.
    Trap,
    /// The allocator calls the host (a logging `malloc`), then bumps.
    Nested(HostCall),
}

/// What the guest does in one callback: host calls, then a result or a trap.
#[derive(Arbitrary, Debug, Clone, Default)]
struct Callback {
    calls: Vec<HostCall>,
    result: Option<Arg>,
    trap: bool,
}

type Pairs = Vec<(String, String)>;

/// What the embedder does once the plugin has started.
#[derive(Arbitrary, Debug)]
enum Event {
    RequestHeaders(Pairs, bool),
    RequestBody(Vec<u8>, bool),
    RequestTrailers(Pairs),
    ResponseHeaders(Pairs, bool),
    ResponseBody(Vec<u8>, bool),
    ResponseTrailers(Pairs),
    /// Resume a paused direction (after `proxy_continue_stream`, or as the
    /// embedder would on a timeout), then whatever the filters continued.
    Resume(bool),
    /// Deliver queue notifications and other work the host deferred.
    DispatchPending,
    NewHttpStream,
    Tcp {
        downstream: Vec<u8>,
        upstream: Vec<u8>,
        close: bool,
    },
    Tick,
    HttpCallResponse {
        token: u8,
        headers: Pairs,
        body: Vec<u8>,
        trailers: Pairs,
    },
    GrpcInitialMetadata(u8, Pairs),
    GrpcMessage(u8, Vec<u8>),
    GrpcTrailingMetadata(u8, Pairs),
    GrpcClose(u8, u32, String),
    ForeignFunction(u32, Vec<u8>),
    Shutdown,
}

#[derive(Arbitrary, Debug)]
struct Input {
    abi: u8,
    reload: bool,
    memory_len: u16,
    memory: Vec<u8>,
    vm_configuration: Vec<u8>,
    configuration: Vec<u8>,
    callbacks: Vec<Callback>,
    allocs: Vec<AllocReply>,
    events: Vec<Event>,
}

/// The guest's script, shared by every instance of the module (a reload
/// instantiates again and goes on with the script).
struct Script {
    memory: Vec<u8>,
    callbacks: VecDeque<Callback>,
    allocs: Vec<AllocReply>,
    next_alloc: usize,
}

struct FakeRuntime(Arc<Mutex<Script>>);

struct FakeModule(Arc<Mutex<Script>>);

struct FakeInstance {
    script: Arc<Mutex<Script>>,
    host: Vec<HostFunc>,
    handler: Box<dyn HostHandler>,
    restricted: Box<dyn HostHandler>,
    memory: Vec<u8>,
    bump: usize,
    exports: Vec<(String, FuncType)>,
}

/// The exports the fake guest has: every callback, the allocator and
/// `_start`, with whatever signature the host asks for.
const EXPORTS: &[&str] = &[
    "_start",
    "proxy_on_memory_allocate",
    "proxy_on_context_create",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_delete",
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_upstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_connection_close",
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_http_call_response",
    "proxy_on_grpc_receive_initial_metadata",
    "proxy_on_grpc_receive",
    "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_grpc_close",
    "proxy_on_queue_ready",
    "proxy_on_foreign_function",
];

const ALLOCATOR: &str = "proxy_on_memory_allocate";

impl WasmRuntime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fuzz"
    }
    fn compile(&self, _wasm: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        Ok(Arc::new(FakeModule(self.0.clone())))
    }
}

impl CompiledModule for FakeModule {
    fn instantiate(
        &self,
        host: &[HostFunc],
        _limits: &Limits,
        handler: Box<dyn HostHandler>,
        restricted: Box<dyn HostHandler>,
    ) -> Result<Box<dyn Instance>, EngineError> {
        let memory = lock(&self.0).memory.clone();
        let bump = memory.len() / 2;
        Ok(Box::new(FakeInstance {
            script: self.0.clone(),
            host: host.to_vec(),
            handler,
            restricted,
            memory,
            bump,
            exports: Vec::new(),
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The arguments of a host call, typed by the function's signature.
fn args_for(f: &HostFunc, call: &HostCall) -> Vec<Val> {
    f.ty.params
        .iter()
        .enumerate()
        .map(|(i, ty)| call.args.get(i).map_or(Val::zero(*ty), |a| a.val(*ty)))
        .collect()
}

/// A host function must answer with the type its signature declares.
fn check_result(f: &HostFunc, r: &Result<Option<Val>, Trap>) {
    if let Ok(v) = r {
        assert_eq!(
            v.map(|v| v.ty()),
            f.ty.results.first().copied(),
            "{}.{} returned {v:?} for {}",
            f.module,
            f.name,
            f.ty
        );
    }
}

/// The guest as a host function sees it while it runs.
struct FakeGuest<'a> {
    memory: &'a mut Vec<u8>,
    bump: &'a mut usize,
    script: &'a Mutex<Script>,
    host: &'a [HostFunc],
    restricted: &'a mut dyn HostHandler,
    allocator: Option<FuncRef>,
}

/// The guest as the restricted handler sees it: calling back in is the
/// re-entry every backend refuses.
struct NestedGuest<'a> {
    memory: &'a mut Vec<u8>,
}

impl Guest for NestedGuest<'_> {
    fn memory(&mut self) -> &mut [u8] {
        self.memory
    }
    fn call(&mut self, _func: FuncRef, _args: &[Val]) -> Result<Option<Val>, Trap> {
        Err(Trap::host(
            "host call re-entered while the allocator was running",
        ))
    }
}

impl FakeGuest<'_> {
    fn bump_alloc(&mut self, len: i32) -> Result<Option<Val>, Trap> {
        let len = len as u32 as usize;
        let at = (*self.bump + 7) & !7;
        if at
            .checked_add(len)
            .is_some_and(|end| end <= self.memory.len())
            && at != 0
        {
            *self.bump = at + len;
            Ok(Some(Val::I32(at as i32)))
        } else {
            Ok(Some(Val::I32(0)))
        }
    }
}

impl Guest for FakeGuest<'_> {
    fn memory(&mut self) -> &mut [u8] {
        self.memory
    }
    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        // The only export the ABI calls from inside a host function is the
        // allocator it looked up at start.
        assert_eq!(
            Some(func),
            self.allocator,
            "host called a non-allocator export"
        );
        assert_eq!(args.len(), 1, "allocator takes one argument");
        let len = args[0].i32().unwrap_or(0);
        let reply = {
            let mut s = lock(self.script);
            let i = s.next_alloc;
            s.next_alloc += 1;
            s.allocs.get(i).cloned().unwrap_or(AllocReply::Bump)
        };
        match reply {
            AllocReply::Bump => self.bump_alloc(len),
            AllocReply::At(p) => Ok(Some(Val::I32(i32::from(p)))),
            AllocReply::Null => Ok(Some(Val::I32(0))),
            AllocReply::Wild(p) => Ok(Some(Val::I32(p))),
            AllocReply::Trap => Err(Trap::guest("allocator trapped")),
            AllocReply::Nested(call) => {
                if !self.host.is_empty() {
                    let f = &self.host[usize::from(call.func) % self.host.len()];
                    let args = args_for(f, &call);
                    let mut nested = NestedGuest {
                        memory: self.memory,
                    };
                    let r = self.restricted.call(f.id, &mut nested, &args);
                    check_result(f, &r);
                    r?;
                }
                self.bump_alloc(len)
            }
        }
    }
}

impl Instance for FakeInstance {
    fn lookup(&mut self, name: &str, ty: &FuncType) -> Option<FuncRef> {
        if !EXPORTS.contains(&name) {
            return None;
        }
        let i = match self.exports.iter().position(|(n, t)| n == name && t == ty) {
            Some(i) => i,
            None => {
                self.exports.push((name.to_string(), ty.clone()));
                self.exports.len() - 1
            }
        };
        Some(FuncRef(i as u32))
    }

    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        let (name, ty) = self
            .exports
            .get(func.0 as usize)
            .cloned()
            .ok_or_else(|| Trap::engine("unknown function"))?;
        assert_eq!(
            args.iter().map(Val::ty).collect::<Vec<_>>(),
            ty.params,
            "{name} called with arguments that do not match its signature"
        );
        let allocator = self
            .exports
            .iter()
            .position(|(n, _)| n == ALLOCATOR)
            .map(|i| FuncRef(i as u32));
        let callback = lock(&self.script).callbacks.pop_front().unwrap_or_default();
        for call in &callback.calls {
            if self.host.is_empty() {
                break;
            }
            let f = &self.host[usize::from(call.func) % self.host.len()];
            let args = args_for(f, call);
            let mut guest = FakeGuest {
                memory: &mut self.memory,
                bump: &mut self.bump,
                script: &self.script,
                host: &self.host,
                restricted: self.restricted.as_mut(),
                allocator,
            };
            let r = self.handler.call(f.id, &mut guest, &args);
            check_result(f, &r);
            // A host function that fails the call traps the guest.
            r?;
        }
        if callback.trap {
            return Err(Trap::guest("unreachable"));
        }
        let result = callback.result.unwrap_or(Arg::Small(1));
        Ok(ty.results.first().map(|t| result.val(*t)))
    }

    fn memory(&mut self) -> &mut [u8] {
        &mut self.memory
    }

    fn handler(&mut self) -> &mut dyn HostHandler {
        self.handler.as_mut()
    }

    fn interrupt_handle(&self) -> Option<InterruptHandle> {
        None
    }
}

/// The smallest module the ABI accepts: one exported marker function.
fn marker_module(abi: u8) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, ExportKind, ExportSection, Function, FunctionSection, Module, TypeSection,
    };
    let marker = match abi % 3 {
        0 => "proxy_abi_version_0_1_0",
        1 => "proxy_abi_version_0_2_0",
        _ => "proxy_abi_version_0_2_1",
    };
    let mut types = TypeSection::new();
    types.ty().function([], []);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    let mut exports = ExportSection::new();
    exports.export(marker, ExportKind::Func, 0);
    let mut code = CodeSection::new();
    let mut f = Function::new([]);
    f.instructions().end();
    code.function(&f);
    let mut module = Module::new();
    module
        .section(&types)
        .section(&funcs)
        .section(&exports)
        .section(&code);
    module.finish()
}

fn headers(p: Pairs) -> HeaderMap {
    HeaderMap::from_pairs(p)
}

fuzz_target!(|input: Input| {
    let mut memory = vec![0u8; usize::from(input.memory_len)];
    let n = input.memory.len().min(memory.len());
    memory[..n].copy_from_slice(&input.memory[..n]);
    let script = Arc::new(Mutex::new(Script {
        memory,
        callbacks: input.callbacks.into(),
        allocs: input.allocs,
        next_alloc: 0,
    }));
    let runtime = FakeRuntime(script);
    let module = match WasmModule::new(&runtime, &marker_module(input.abi)) {
        Ok(m) => m,
        Err(e) => panic!("the marker module must load: {e}"),
    };
    let mut foreign: HashMap<String, ForeignFunction> = HashMap::new();
    foreign.insert("echo".into(), Arc::new(|args: &[u8]| Ok(args.to_vec())));
    let env = HostEnv {
        callouts: Arc::new(RecordingCallouts::default()),
        foreign: Arc::new(foreign),
        ..HostEnv::default()
    };
    let policy = if input.reload {
        FailPolicy::Reload {
            backoff: Duration::ZERO,
        }
    } else {
        FailPolicy::FailClosed
    };
    let config = PluginConfig::new("fuzz")
        .vm_configuration(input.vm_configuration)
        .configuration(input.configuration)
        .fail_policy(policy);
    let Ok(plugin) = Plugin::new(&module, config, env) else {
        return;
    };
    let props = Arc::new(MapProperties(HashMap::from([
        ("request.path".to_string(), PropertyValue::from("/fuzz")),
        (
            "node.metadata.NAME".to_string(),
            PropertyValue::from("fuzz"),
        ),
        ("upstream.port".to_string(), PropertyValue::Int(80)),
    ])));
    let mut chain = FilterChain::new(vec![plugin]);
    let mut http = Some(chain.http_stream(props.clone()));
    for event in input.events.into_iter().take(64) {
        match event {
            Event::RequestHeaders(h, eos) => {
                if let Some(s) = http.as_mut() {
                    s.request_headers(&mut chain, headers(h), eos);
                }
            }
            Event::RequestBody(b, eos) => {
                if let Some(s) = http.as_mut() {
                    s.request_body(&mut chain, &b, eos);
                }
            }
            Event::RequestTrailers(h) => {
                if let Some(s) = http.as_mut() {
                    s.request_trailers(&mut chain, headers(h));
                }
            }
            Event::ResponseHeaders(h, eos) => {
                if let Some(s) = http.as_mut() {
                    s.response_headers(&mut chain, headers(h), eos);
                }
            }
            Event::ResponseBody(b, eos) => {
                if let Some(s) = http.as_mut() {
                    s.response_body(&mut chain, &b, eos);
                }
            }
            Event::ResponseTrailers(h) => {
                if let Some(s) = http.as_mut() {
                    s.response_trailers(&mut chain, headers(h));
                }
            }
            Event::Resume(response) => {
                if let Some(s) = http.as_mut() {
                    let dir = if response {
                        Direction::Response
                    } else {
                        Direction::Request
                    };
                    s.resume(&mut chain, dir);
                    s.resume_continued(&mut chain);
                }
            }
            Event::DispatchPending => chain.dispatch_pending(),
            Event::NewHttpStream => {
                if let Some(s) = http.take() {
                    s.finish(&mut chain);
                }
                http = Some(chain.http_stream(props.clone()));
            }
            Event::Tcp {
                downstream,
                upstream,
                close,
            } => {
                let (mut tcp, _) = chain.tcp_stream(props.clone());
                tcp.downstream_data(&mut chain, &downstream, close);
                tcp.upstream_data(&mut chain, &upstream, close);
                if close {
                    tcp.downstream_close(&mut chain, 1);
                    tcp.upstream_close(&mut chain, 1);
                }
                tcp.finish(&mut chain);
            }
            Event::Tick => chain.tick(),
            Event::HttpCallResponse {
                token,
                headers: h,
                body,
                trailers,
            } => chain.plugins[0].on_http_call_response(
                u32::from(token),
                headers(h),
                body,
                headers(trailers),
            ),
            Event::GrpcInitialMetadata(token, h) => {
                chain.plugins[0].on_grpc_receive_initial_metadata(u32::from(token), headers(h));
            }
            Event::GrpcMessage(token, m) => chain.plugins[0].on_grpc_receive(u32::from(token), m),
            Event::GrpcTrailingMetadata(token, h) => {
                chain.plugins[0].on_grpc_receive_trailing_metadata(u32::from(token), headers(h));
            }
            Event::GrpcClose(token, status, message) => {
                chain.plugins[0].on_grpc_close(u32::from(token), status, message);
            }
            Event::ForeignFunction(id, args) => chain.plugins[0].on_foreign_function(id, args),
            Event::Shutdown => {
                chain.plugins[0].shutdown();
            }
        }
    }
    if let Some(s) = http.take() {
        s.finish(&mut chain);
    }
});
