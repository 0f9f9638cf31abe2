//! The wasmtime backend of the nasp proxy-wasm host: glue only.
//!
//! - Compilation: Cranelift, once per module; instances come from a cached
//!   `InstancePre`.
//! - CPU deadline: epoch interruption. One ticker thread per runtime bumps the
//!   epoch every 10 ms; at each tick a store checks its call deadline and its
//!   interrupt flag, so a runaway call stops within about 10 ms of its
//!   deadline, and [`nasp_proxywasm::Plugin::interrupt_handle`] stops it
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
    funcs: Vec<wasmtime::Func>,
    deadline: Option<Instant>,
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

fn call_func(
    store: impl wasmtime::AsContextMut<Data = Data>,
    f: wasmtime::Func,
    args: &[Val],
) -> Result<Option<Val>, Trap> {
    let mut store = store;
    let params: Vec<wasmtime::Val> = args.iter().map(to_wt).collect();
    let ty = f.ty(&store);
    let mut results: Vec<wasmtime::Val> = ty
        .results()
        .map(|t| wasmtime::Val::default_for_ty(&t).unwrap_or(wasmtime::Val::I32(0)))
        .collect();
    f.call(&mut store, &params, &mut results).map_err(to_trap)?;
    Ok(results.first().and_then(from_wt))
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
        let Some(f) = self.caller.data().funcs.get(func.0 as usize).copied() else {
            return Err(Trap::engine(format!(
                "unknown function reference {}",
                func.0
            )));
        };
        call_func(&mut *self.caller, f, args)
    }
}

fn host_call(
    mut caller: wasmtime::Caller<'_, Data>,
    id: u32,
    params: &[wasmtime::Val],
    results: &mut [wasmtime::Val],
) -> wasmtime::Result<()> {
    let args: Vec<Val> = params.iter().filter_map(from_wt).collect();
    // Take the handler out so the guest can be borrowed while it runs; a host
    // call made while it is out (from the guest allocator) goes to the
    // restricted handler.
    let mut taken = match caller.data_mut().handlers.take() {
        Ok(t) => t,
        Err(t) => return Err(wasmtime::Error::new(t)),
    };
    let r = taken.call(
        id,
        &mut CallerGuest {
            caller: &mut caller,
        },
        &args,
    );
    caller.data_mut().handlers.restore(taken);
    match r {
        Ok(v) => {
            if let (Some(v), Some(slot)) = (v, results.first_mut()) {
                *slot = to_wt(&v);
            }
            Ok(())
        }
        Err(t) => Err(wasmtime::Error::new(t)),
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
        if let Some((cached, pre)) = cache.as_ref() {
            if *cached == ids {
                return Ok(pre.clone());
            }
        }
        let mut linker: wasmtime::Linker<Data> = wasmtime::Linker::new(&self.engine);
        for h in matched {
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
            interrupt: interrupt.clone(),
            depth: 0,
        };
        let mut store = wasmtime::Store::new(&self.engine, data);
        store.limiter(|d| &mut d.limits);
        store.epoch_deadline_callback(|ctx| {
            let d = ctx.data();
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
        let funcs = &mut self.store.data_mut().funcs;
        funcs.push(f);
        let r = FuncRef((funcs.len() - 1) as u32);
        self.lookups.insert((name.to_string(), ty.clone()), r);
        Some(r)
    }

    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        let Some(f) = self.store.data().funcs.get(func.0 as usize).copied() else {
            return Err(Trap::engine(format!(
                "unknown function reference {}",
                func.0
            )));
        };
        let d = self.store.data_mut();
        d.depth += 1;
        if d.depth == 1 {
            d.deadline = self.deadline.map(|t| Instant::now() + t);
            d.interrupt.store(false, Ordering::Relaxed);
        }
        self.store.set_epoch_deadline(1);
        let r = call_func(&mut self.store, f, args);
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
