//! The wasmtime backend of the nasp proxy-wasm host: glue only.
//!
//! - Compilation: Cranelift, once per module; instances come from a cached
//!   `InstancePre`.
//! - CPU deadline: epoch interruption. One ticker thread per runtime bumps the
//!   epoch every 10 ms; at each tick a store checks its call deadline and its
//!   interrupt flag, so a runaway call stops within about 10–20 ms of its
//!   deadline (the clock is read at the first tick a call sees, not when it
//!   starts: most calls take microseconds and never see one), and [`nasp_proxywasm::Plugin::interrupt_handle`] stops it
//!   from another thread.
//! - Memory cap: a `StoreLimits` limiter (memory size, one instance, one
//!   memory, 10 000 table elements).
//! - Traps carry wasmtime's message and its wasm backtrace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nasp_proxywasm::runtime::{
    CompiledModule, EngineError, FuncRef, FuncType, Guest, HandlerSlots, HostFunc, HostHandler,
    Instance, InterruptHandle, Limits, Trap, TrapKind, Val, ValType, WasmRuntime, function_imports,
    resolve_imports,
};

const NAME: &str = "wasmtime";
const TICK: Duration = Duration::from_millis(10);

/// The wasmtime runtime.
#[derive(Clone)]
pub struct WasmtimeRuntime {
    engine: wasmtime::Engine,
}

impl std::fmt::Debug for WasmtimeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WasmtimeRuntime")
    }
}

/// Creates the runtime.
pub fn runtime() -> Result<Arc<dyn WasmRuntime>, EngineError> {
    Ok(Arc::new(WasmtimeRuntime::new()?))
}

impl WasmtimeRuntime {
    /// A new engine with epoch interruption and its ticker thread.
    pub fn new() -> Result<Self, EngineError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine =
            wasmtime::Engine::new(&config).map_err(|e| EngineError::new(NAME, format!("{e:#}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("nasp-wasmtime-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| EngineError::new(NAME, format!("cannot start the epoch thread: {e}")))?;
        Ok(Self { engine })
    }
}

impl WasmRuntime for WasmtimeRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        let imports = function_imports(NAME, wasm)?;
        let module = wasmtime::Module::new(&self.engine, wasm)
            .map_err(|e| EngineError::new(NAME, format!("{e:#}")))?;
        Ok(Arc::new(Compiled {
            engine: self.engine.clone(),
            module,
            imports,
            pre: Mutex::new(None),
        }))
    }
}

struct Compiled {
    engine: wasmtime::Engine,
    module: wasmtime::Module,
    imports: Vec<(String, String, FuncType)>,
    pre: Mutex<Option<(Vec<u32>, wasmtime::InstancePre<Data>)>>,
}

struct Data {
    handlers: HandlerSlots,
    limits: wasmtime::StoreLimits,
    memory: Option<wasmtime::Memory>,
    funcs: Vec<Arc<GuestFunc>>,
    deadline: Option<Instant>,
    /// The current call's time budget, turned into `deadline` at the first
    /// tick the call sees (reading the clock per call was a visible share
    /// of a filter chain's cost).
    budget: Option<Duration>,
    interrupt: Arc<AtomicBool>,
    depth: u32,
}

fn wt_type(t: ValType) -> wasmtime::ValType {
    match t {
        ValType::I32 => wasmtime::ValType::I32,
        ValType::I64 => wasmtime::ValType::I64,
        ValType::F32 => wasmtime::ValType::F32,
        ValType::F64 => wasmtime::ValType::F64,
    }
}

fn to_wt(v: &Val) -> wasmtime::Val {
    match *v {
        Val::I32(x) => wasmtime::Val::I32(x),
        Val::I64(x) => wasmtime::Val::I64(x),
        Val::F32(x) => wasmtime::Val::F32(x.to_bits()),
        Val::F64(x) => wasmtime::Val::F64(x.to_bits()),
    }
}

fn from_wt(v: &wasmtime::Val) -> Option<Val> {
    Some(match v {
        wasmtime::Val::I32(x) => Val::I32(*x),
        wasmtime::Val::I64(x) => Val::I64(*x),
        wasmtime::Val::F32(x) => Val::F32(f32::from_bits(*x)),
        wasmtime::Val::F64(x) => Val::F64(f64::from_bits(*x)),
        _ => return None,
    })
}

fn to_trap(e: wasmtime::Error) -> Trap {
    if let Some(t) = e.downcast_ref::<Trap>() {
        return t.clone();
    }
    let backtrace = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|b| b.to_string());
    let kind = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => TrapKind::Interrupted,
        Some(_) => TrapKind::Guest,
        None => TrapKind::Engine,
    };
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => format!("wasm trap: {t}"),
        None => format!("{e:#}"),
    };
    Trap {
        kind,
        message,
        backtrace,
    }
}

/// An export the host calls, with a typed entry point for the shapes the
/// ABI's callbacks have (all-i32 parameters, no result or one i32): a typed
/// call skips wasmtime's per-call signature lookup and `Val` conversions.
struct GuestFunc {
    func: wasmtime::Func,
    results: Vec<ValType>,
    typed: Typed,
}

macro_rules! typed_shapes {
    ($( $variant:ident ( $($p:ident),* ) -> $r:tt ; )*) => {
        enum Typed {
            Dynamic,
            $( $variant(wasmtime::TypedFunc<( $($p,)* ), $r>), )*
        }

        impl Typed {
            fn new(store: &impl wasmtime::AsContext, f: &wasmtime::Func, ty: &FuncType) -> Typed {
                let all_i32 = ty.params.iter().all(|t| *t == ValType::I32);
                let result = match ty.results.as_slice() {
                    [] => Some(false),
                    [ValType::I32] => Some(true),
                    _ => None,
                };
                if !all_i32 {
                    return Typed::Dynamic;
                }
                let Some(has_result) = result else { return Typed::Dynamic };
                let arity = ty.params.len();
                $(
                    if arity == typed_shapes!(@count $($p)*) && has_result == typed_shapes!(@has $r) {
                        if let Ok(t) = f.typed::<( $($p,)* ), $r>(store) {
                            return Typed::$variant(t);
                        }
                    }
                )*
                Typed::Dynamic
            }

            /// `None` when the shape has no typed entry point.
            fn call(
                &self,
                store: impl wasmtime::AsContextMut<Data = Data>,
                args: &[Val],
            ) -> Option<wasmtime::Result<Option<Val>>> {
                #[allow(unused_variables, unused_mut)]
                let mut it = args.iter().map(|a| a.i32().unwrap_or(0));
                match self {
                    Typed::Dynamic => None,
                    $( Typed::$variant(t) => {
                        let params = ( $( typed_shapes!(@next it $p), )* );
                        Some(t.call(store, params).map(|r| typed_shapes!(@wrap r $r)))
                    } )*
                }
            }
        }
    };
    (@count) => { 0 };
    (@count $h:ident $($t:ident)*) => { 1 + typed_shapes!(@count $($t)*) };
    (@has ()) => { false };
    (@has i32) => { true };
    (@next $it:ident $p:ident) => { $it.next().unwrap_or(0) };
    (@wrap $r:ident ()) => {{ let () = $r; None }};
    (@wrap $r:ident i32) => { Some(Val::I32($r)) };
}

typed_shapes! {
    V0() -> (); V1(i32) -> (); V2(i32, i32) -> (); V3(i32, i32, i32) -> ();
    V4(i32, i32, i32, i32) -> (); V5(i32, i32, i32, i32, i32) -> ();
    I0() -> i32; I1(i32) -> i32; I2(i32, i32) -> i32; I3(i32, i32, i32) -> i32;
    I4(i32, i32, i32, i32) -> i32; I5(i32, i32, i32, i32, i32) -> i32;
}

impl GuestFunc {
    fn call(
        &self,
        mut store: impl wasmtime::AsContextMut<Data = Data>,
        args: &[Val],
    ) -> Result<Option<Val>, Trap> {
        if let Some(r) = self.typed.call(&mut store, args) {
            return r.map_err(to_trap);
        }
        let params: Vec<wasmtime::Val> = args.iter().map(to_wt).collect();
        let mut results: Vec<wasmtime::Val> =
            self.results.iter().map(|t| to_wt(&Val::zero(*t))).collect();
        self.func
            .call(&mut store, &params, &mut results)
            .map_err(to_trap)?;
        Ok(results.first().and_then(from_wt))
    }
}

struct CallerGuest<'a, 'b> {
    caller: &'a mut wasmtime::Caller<'b, Data>,
}

impl Guest for CallerGuest<'_, '_> {
    fn memory(&mut self) -> &mut [u8] {
        match self.caller.data().memory {
            Some(m) => m.data_mut(&mut *self.caller),
            None => &mut [],
        }
    }
    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        let Some(f) = self.caller.data().funcs.get(func.0 as usize).cloned() else {
            return Err(Trap::engine(format!(
                "unknown function reference {}",
                func.0
            )));
        };
        f.call(&mut *self.caller, args)
    }
}

/// Runs host function `id` for the guest behind `caller`.
fn dispatch(
    caller: &mut wasmtime::Caller<'_, Data>,
    id: u32,
    args: &[Val],
) -> Result<Option<Val>, Trap> {
    // Take the handler out so the guest can be borrowed while it runs; a host
    // call made while it is out (from the guest allocator) goes to the
    // restricted handler.
    let mut taken = caller.data_mut().handlers.take()?;
    let r = taken.call(id, &mut CallerGuest { caller }, args);
    caller.data_mut().handlers.restore(taken);
    r
}

/// The general entry point (`Linker::func_new`), for any signature.
fn host_call(
    mut caller: wasmtime::Caller<'_, Data>,
    id: u32,
    params: &[wasmtime::Val],
    results: &mut [wasmtime::Val],
) -> wasmtime::Result<()> {
    let args: Vec<Val> = params.iter().filter_map(from_wt).collect();
    match dispatch(&mut caller, id, &args) {
        Ok(v) => {
            if let (Some(v), Some(slot)) = (v, results.first_mut()) {
                *slot = to_wt(&v);
            }
            Ok(())
        }
        Err(t) => Err(wasmtime::Error::new(t)),
    }
}

/// Links an all-i32 host function returning one i32 (most of the ABI)
/// through `Linker::func_wrap`: no `Val` slices and no allocation per call.
/// `Ok(false)` for an arity it does not cover.
fn wrap_all_i32(
    linker: &mut wasmtime::Linker<Data>,
    module: &str,
    name: &str,
    id: u32,
    arity: usize,
) -> wasmtime::Result<bool> {
    macro_rules! arities {
        ($( $k:literal => ($($a:ident),*) ),* $(,)?) => {
            match arity {
                $( $k => {
                    linker.func_wrap(module, name, move |mut caller: wasmtime::Caller<'_, Data>, $($a: i32),*| -> wasmtime::Result<i32> {
                        match dispatch(&mut caller, id, &[$(Val::I32($a)),*]) {
                            Ok(v) => Ok(v.and_then(|v| v.i32()).unwrap_or(0)),
                            Err(t) => Err(wasmtime::Error::new(t)),
                        }
                    })?;
                    Ok(true)
                } )*
                _ => Ok(false),
            }
        };
    }
    arities! {
        0 => (),
        1 => (a),
        2 => (a, b),
        3 => (a, b, c),
        4 => (a, b, c, d),
        5 => (a, b, c, d, e),
        6 => (a, b, c, d, e, f),
        7 => (a, b, c, d, e, f, g),
        8 => (a, b, c, d, e, f, g, h),
        9 => (a, b, c, d, e, f, g, h, i),
        10 => (a, b, c, d, e, f, g, h, i, j),
        11 => (a, b, c, d, e, f, g, h, i, j, k),
        12 => (a, b, c, d, e, f, g, h, i, j, k, l),
    }
}

/// Links the ABI's host functions that take an i64 (metrics, WASI clocks
/// and file offsets) through `Linker::func_wrap` too, so they get no `Val`
/// vectors either. `Ok(false)` for a shape it does not cover.
fn wrap_with_i64(
    linker: &mut wasmtime::Linker<Data>,
    module: &str,
    name: &str,
    id: u32,
    params: &[ValType],
) -> wasmtime::Result<bool> {
    use ValType::{I32, I64};
    macro_rules! wrap {
        ($($a:ident : $t:ident => $v:ident),*) => {{
            linker.func_wrap(module, name, move |mut caller: wasmtime::Caller<'_, Data>, $($a: $t),*| -> wasmtime::Result<i32> {
                match dispatch(&mut caller, id, &[$(Val::$v($a)),*]) {
                    Ok(v) => Ok(v.and_then(|v| v.i32()).unwrap_or(0)),
                    Err(t) => Err(wasmtime::Error::new(t)),
                }
            })?;
            Ok(true)
        }};
    }
    match params {
        [I32, I64] => wrap!(a: i32 => I32, b: i64 => I64),
        [I32, I64, I32] => wrap!(a: i32 => I32, b: i64 => I64, c: i32 => I32),
        [I32, I64, I32, I32] => wrap!(a: i32 => I32, b: i64 => I64, c: i32 => I32, d: i32 => I32),
        [I32, I32, I32, I64, I32] => {
            wrap!(a: i32 => I32, b: i32 => I32, c: i32 => I32, d: i64 => I64, e: i32 => I32)
        }
        [I32, I32, I32, I32, I32, I64, I64, I32, I32] => wrap!(
            a: i32 => I32, b: i32 => I32, c: i32 => I32, d: i32 => I32, e: i32 => I32,
            f: i64 => I64, g: i64 => I64, h: i32 => I32, i: i32 => I32
        ),
        _ => Ok(false),
    }
}

impl Compiled {
    fn instance_pre(&self, host: &[HostFunc]) -> Result<wasmtime::InstancePre<Data>, EngineError> {
        let matched = resolve_imports(NAME, &self.imports, host)?;
        let ids: Vec<u32> = matched.iter().map(|h| h.id).collect();
        let mut cache = self
            .pre
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, pre)) = cache.as_ref()
            && *cached == ids
        {
            return Ok(pre.clone());
        }
        let mut linker: wasmtime::Linker<Data> = wasmtime::Linker::new(&self.engine);
        for h in matched {
            let all_i32 =
                h.ty.params.iter().all(|t| *t == ValType::I32) && h.ty.results == [ValType::I32];
            if all_i32
                && wrap_all_i32(&mut linker, h.module, h.name, h.id, h.ty.params.len())
                    .map_err(|e| EngineError::new(NAME, format!("{e:#}")))?
            {
                continue;
            }
            if h.ty.results == [ValType::I32]
                && wrap_with_i64(&mut linker, h.module, h.name, h.id, &h.ty.params)
                    .map_err(|e| EngineError::new(NAME, format!("{e:#}")))?
            {
                continue;
            }
            let ty = wasmtime::FuncType::new(
                &self.engine,
                h.ty.params.iter().copied().map(wt_type),
                h.ty.results.iter().copied().map(wt_type),
            );
            let id = h.id;
            linker
                .func_new(h.module, h.name, ty, move |caller, params, results| {
                    host_call(caller, id, params, results)
                })
                .map_err(|e| EngineError::new(NAME, format!("{e:#}")))?;
        }
        let pre = linker
            .instantiate_pre(&self.module)
            .map_err(|e| EngineError::new(NAME, format!("{e:#}")))?;
        *cache = Some((ids, pre.clone()));
        Ok(pre)
    }
}

impl CompiledModule for Compiled {
    fn instantiate(
        &self,
        host: &[HostFunc],
        limits: &Limits,
        handler: Box<dyn HostHandler>,
        restricted: Box<dyn HostHandler>,
    ) -> Result<Box<dyn Instance>, EngineError> {
        let pre = self.instance_pre(host)?;
        let memory_size = usize::try_from(limits.max_memory_bytes).unwrap_or(usize::MAX);
        let store_limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(memory_size)
            .instances(1)
            .memories(1)
            .table_elements(10_000)
            .build();
        let interrupt = Arc::new(AtomicBool::new(false));
        let data = Data {
            handlers: HandlerSlots::new(handler, restricted),
            limits: store_limits,
            memory: None,
            funcs: Vec::new(),
            deadline: None,
            budget: None,
            interrupt: interrupt.clone(),
            depth: 0,
        };
        let mut store = wasmtime::Store::new(&self.engine, data);
        store.limiter(|d| &mut d.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let d = ctx.data_mut();
            if let Some(b) = d.budget.take() {
                d.deadline = Some(Instant::now() + b);
            }
            if d.interrupt.swap(false, Ordering::Relaxed)
                || d.deadline.is_some_and(|t| Instant::now() >= t)
            {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(wasmtime::UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        // Start functions run during instantiation, under the same deadline.
        store.data_mut().deadline = limits.call_deadline.map(|d| Instant::now() + d);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| EngineError::new(NAME, to_trap(e).to_string()))?;
        let memory = instance.get_memory(&mut store, "memory");
        store.data_mut().memory = memory;
        Ok(Box::new(WasmtimeInstance {
            lookups: Default::default(),
            store,
            instance,
            deadline: limits.call_deadline,
            interrupt,
        }))
    }
}

struct WasmtimeInstance {
    lookups: std::collections::HashMap<(String, FuncType), FuncRef>,
    store: wasmtime::Store<Data>,
    instance: wasmtime::Instance,
    deadline: Option<Duration>,
    interrupt: Arc<AtomicBool>,
}

impl Instance for WasmtimeInstance {
    fn lookup(&mut self, name: &str, ty: &FuncType) -> Option<FuncRef> {
        // Found exports are cached by name and signature, so repeated lookups
        // neither search the instance again nor grow the table of handles.
        if let Some(r) = self.lookups.get(&(name.to_string(), ty.clone())) {
            return Some(*r);
        }
        let f = self.instance.get_func(&mut self.store, name)?;
        let fty = f.ty(&self.store);
        let same = |a: &mut dyn ExactSizeIterator<Item = wasmtime::ValType>, b: &[ValType]| {
            a.len() == b.len()
                && a.zip(b)
                    .all(|(x, y)| wasmtime::ValType::eq(&x, &wt_type(*y)))
        };
        if !same(&mut fty.params(), &ty.params) || !same(&mut fty.results(), &ty.results) {
            return None;
        }
        let typed = Typed::new(&self.store, &f, ty);
        let funcs = &mut self.store.data_mut().funcs;
        funcs.push(Arc::new(GuestFunc {
            func: f,
            results: ty.results.clone(),
            typed,
        }));
        let r = FuncRef((funcs.len() - 1) as u32);
        self.lookups.insert((name.to_string(), ty.clone()), r);
        Some(r)
    }

    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        let Some(f) = self.store.data().funcs.get(func.0 as usize).cloned() else {
            return Err(Trap::engine(format!(
                "unknown function reference {}",
                func.0
            )));
        };
        let d = self.store.data_mut();
        d.depth += 1;
        if d.depth == 1 {
            d.deadline = None;
            d.budget = self.deadline;
            d.interrupt.store(false, Ordering::Relaxed);
        }
        self.store.set_epoch_deadline(1);
        let r = f.call(&mut self.store, args);
        self.store.data_mut().depth -= 1;
        r
    }

    fn memory(&mut self) -> &mut [u8] {
        match self.store.data().memory {
            Some(m) => m.data_mut(&mut self.store),
            None => &mut [],
        }
    }

    fn handler(&mut self) -> &mut dyn HostHandler {
        self.store.data_mut().handlers.handler_mut()
    }

    fn interrupt_handle(&self) -> Option<InterruptHandle> {
        let flag = self.interrupt.clone();
        let engine = self.store.engine().clone();
        Some(Arc::new(move || {
            flag.store(true, Ordering::Relaxed);
            engine.increment_epoch();
        }))
    }
}
