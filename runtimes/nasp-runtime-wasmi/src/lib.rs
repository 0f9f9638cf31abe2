//! The wasmi backend of the nasp proxy-wasm host: glue only.
//!
//! - wasmi is a pure-Rust interpreter: no JIT, fast to build, portable to any
//!   target Rust supports (mobile, embedded).
//! - CPU deadline: fuel. The deadline is converted at [`FUEL_PER_MS`] units
//!   per millisecond and set before each top-level call; running out traps
//!   with "all fuel consumed". Fuel bounds the work done, not wall-clock time,
//!   and wasmi cannot be interrupted from another thread
//!   (`interrupt_handle` is `None`).
//! - Memory cap: wasmi's `StoreLimits`.

use std::sync::Arc;

use nasp_proxywasm::runtime::{
    ArgBuf, CompiledModule, EngineError, FuncRef, FuncType, Guest, HandlerSlots, HostFunc,
    HostHandler, Instance, InterruptHandle, Limits, MAX_ARGS, Trap, TrapKind, Val, ValType,
    WasmRuntime, function_imports, resolve_imports,
};

const NAME: &str = "wasmi";

/// Fuel granted per millisecond of `Limits::call_deadline` (about the number
/// of simple instructions wasmi runs in a millisecond on this project's
/// reference machine).
pub const FUEL_PER_MS: u64 = 100_000;

/// The wasmi runtime.
#[derive(Clone)]
pub struct WasmiRuntime {
    engine: wasmi::Engine,
}

impl std::fmt::Debug for WasmiRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WasmiRuntime")
    }
}

/// Creates the runtime.
pub fn runtime() -> Result<Arc<dyn WasmRuntime>, EngineError> {
    Ok(Arc::new(WasmiRuntime::new()))
}

impl WasmiRuntime {
    /// A new engine with fuel metering.
    pub fn new() -> Self {
        let mut config = wasmi::Config::default();
        config.consume_fuel(true);
        Self {
            engine: wasmi::Engine::new(&config),
        }
    }
}

impl Default for WasmiRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl WasmRuntime for WasmiRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        let imports = function_imports(NAME, wasm)?;
        let module = wasmi::Module::new(&self.engine, wasm)
            .map_err(|e| EngineError::new(NAME, e.to_string()))?;
        Ok(Arc::new(Compiled {
            engine: self.engine.clone(),
            module,
            imports,
        }))
    }
}

struct Compiled {
    engine: wasmi::Engine,
    module: wasmi::Module,
    imports: Vec<(String, String, FuncType)>,
}

struct Data {
    handlers: HandlerSlots,
    limits: wasmi::StoreLimits,
    memory: Option<wasmi::Memory>,
    funcs: Vec<wasmi::Func>,
}

#[derive(Debug)]
struct HostTrap(Trap);

impl std::fmt::Display for HostTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl wasmi::errors::HostError for HostTrap {}

fn wi_type(t: ValType) -> wasmi::ValType {
    match t {
        ValType::I32 => wasmi::ValType::I32,
        ValType::I64 => wasmi::ValType::I64,
        ValType::F32 => wasmi::ValType::F32,
        ValType::F64 => wasmi::ValType::F64,
    }
}

fn to_wi(v: &Val) -> wasmi::Val {
    match *v {
        Val::I32(x) => wasmi::Val::I32(x),
        Val::I64(x) => wasmi::Val::I64(x),
        Val::F32(x) => wasmi::Val::F32(x.into()),
        Val::F64(x) => wasmi::Val::F64(x.into()),
    }
}

fn from_wi(v: &wasmi::Val) -> Option<Val> {
    Some(match v {
        wasmi::Val::I32(x) => Val::I32(*x),
        wasmi::Val::I64(x) => Val::I64(*x),
        wasmi::Val::F32(x) => Val::F32((*x).into()),
        wasmi::Val::F64(x) => Val::F64((*x).into()),
        _ => return None,
    })
}

fn to_trap(e: wasmi::Error) -> Trap {
    if let Some(h) = e.downcast_ref::<HostTrap>() {
        return h.0.clone();
    }
    let (kind, message) = match e.as_trap_code() {
        Some(wasmi::TrapCode::OutOfFuel) => (
            TrapKind::Interrupted,
            format!("wasm trap: {e} (CPU deadline exceeded)"),
        ),
        Some(_) => (TrapKind::Guest, format!("wasm trap: {e}")),
        None => (TrapKind::Engine, e.to_string()),
    };
    Trap {
        kind,
        message,
        backtrace: None,
    }
}

fn call_func(
    mut store: impl wasmi::AsContextMut<Data = Data>,
    f: wasmi::Func,
    args: &[Val],
) -> Result<Option<Val>, Trap> {
    // Arguments and the (at most one) result on the stack: no vectors per call.
    let mut params: [wasmi::Val; MAX_ARGS] = core::array::from_fn(|_| wasmi::Val::I32(0));
    if args.len() > MAX_ARGS {
        return Err(Trap::engine(format!(
            "{} arguments: more than any ABI function takes",
            args.len()
        )));
    }
    for (slot, a) in params.iter_mut().zip(args) {
        *slot = to_wi(a);
    }
    let ty = f.ty(&store);
    let mut results: [wasmi::Val; 1] = [wasmi::Val::I32(0)];
    let n = match ty.results() {
        [] => 0,
        [t] => {
            results[0] = wasmi::Val::default_for_ty(*t);
            1
        }
        more => {
            return Err(Trap::engine(format!(
                "{} results: proxy-wasm functions have at most one",
                more.len()
            )));
        }
    };
    f.call(&mut store, &params[..args.len()], &mut results[..n])
        .map_err(to_trap)?;
    Ok(results[..n].first().and_then(from_wi))
}

struct CallerGuest<'a, 'b> {
    caller: &'a mut wasmi::Caller<'b, Data>,
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
    mut caller: wasmi::Caller<'_, Data>,
    id: u32,
    params: &[wasmi::Val],
    results: &mut [wasmi::Val],
) -> Result<(), wasmi::Error> {
    let Some(args) = ArgBuf::collect(params.iter().filter_map(from_wi)) else {
        return Err(wasmi::Error::host(HostTrap(Trap::engine(
            "too many arguments",
        ))));
    };
    let mut taken = match caller.data_mut().handlers.take() {
        Ok(t) => t,
        Err(t) => return Err(wasmi::Error::host(HostTrap(t))),
    };
    let r = taken.call(
        id,
        &mut CallerGuest {
            caller: &mut caller,
        },
        args.as_slice(),
    );
    caller.data_mut().handlers.restore(taken);
    match r {
        Ok(v) => {
            if let (Some(v), Some(slot)) = (v, results.first_mut()) {
                *slot = to_wi(&v);
            }
            Ok(())
        }
        Err(t) => Err(wasmi::Error::host(HostTrap(t))),
    }
}

fn fuel_for(limits: &Limits) -> u64 {
    limits
        .call_deadline
        .map(|d| (d.as_millis() as u64).saturating_mul(FUEL_PER_MS))
        .unwrap_or(u64::MAX)
}

impl CompiledModule for Compiled {
    fn instantiate(
        &self,
        host: &[HostFunc],
        limits: &Limits,
        handler: Box<dyn HostHandler>,
        restricted: Box<dyn HostHandler>,
    ) -> Result<Box<dyn Instance>, EngineError> {
        let matched = resolve_imports(NAME, &self.imports, host)?;
        let mut linker: wasmi::Linker<Data> = wasmi::Linker::new(&self.engine);
        for h in matched {
            let ty = wasmi::FuncType::new(
                h.ty.params.iter().copied().map(wi_type),
                h.ty.results.iter().copied().map(wi_type),
            );
            let id = h.id;
            linker
                .func_new(h.module, h.name, ty, move |caller, params, results| {
                    host_call(caller, id, params, results)
                })
                .map_err(|e| EngineError::new(NAME, e.to_string()))?;
        }
        let memory_size = usize::try_from(limits.max_memory_bytes).unwrap_or(usize::MAX);
        let store_limits = wasmi::StoreLimitsBuilder::new()
            .memory_size(memory_size)
            .instances(1)
            .memories(1)
            .table_elements(10_000)
            .build();
        let data = Data {
            handlers: HandlerSlots::new(handler, restricted),
            limits: store_limits,
            memory: None,
            funcs: Vec::new(),
        };
        let mut store = wasmi::Store::new(&self.engine, data);
        store.limiter(|d| &mut d.limits);
        let fuel = fuel_for(limits);
        store
            .set_fuel(fuel)
            .map_err(|e| EngineError::new(NAME, e.to_string()))?;
        let instance = linker
            .instantiate_and_start(&mut store, &self.module)
            .map_err(|e| EngineError::new(NAME, to_trap(e).to_string()))?;
        let memory = instance.get_memory(&store, "memory");
        store.data_mut().memory = memory;
        Ok(Box::new(WasmiInstance {
            lookups: Default::default(),
            store,
            instance,
            fuel,
            depth: 0,
        }))
    }
}

struct WasmiInstance {
    lookups: std::collections::HashMap<(String, FuncType), FuncRef>,
    store: wasmi::Store<Data>,
    instance: wasmi::Instance,
    fuel: u64,
    depth: u32,
}

impl Instance for WasmiInstance {
    fn lookup(&mut self, name: &str, ty: &FuncType) -> Option<FuncRef> {
        // Found exports are cached by name and signature, so repeated lookups
        // neither search the instance again nor grow the table of handles.
        if let Some(r) = self.lookups.get(&(name.to_string(), ty.clone())) {
            return Some(*r);
        }
        let f = self.instance.get_func(&self.store, name)?;
        let fty = f.ty(&self.store);
        let same = |a: &[wasmi::ValType], b: &[ValType]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| *x == wi_type(*y))
        };
        if !same(fty.params(), &ty.params) || !same(fty.results(), &ty.results) {
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
        self.depth += 1;
        if self.depth == 1
            && let Err(e) = self.store.set_fuel(self.fuel)
        {
            self.depth -= 1;
            return Err(Trap::engine(e.to_string()));
        }
        let r = call_func(&mut self.store, f, args);
        self.depth -= 1;
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
        None
    }
}
