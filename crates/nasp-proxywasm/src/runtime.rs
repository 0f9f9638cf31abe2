//! The seam between the proxy-wasm ABI and a WebAssembly engine.
//!
//! A backend (`nasp-runtime-wasmtime`, `-wasmi`, `-wasm3`) implements
//! [`WasmRuntime`], [`CompiledModule`] and [`Instance`] and nothing else: the
//! ABI is written once, above this trait, in terms of [`HostHandler`] and
//! [`Guest`]. Everything here is object safe so the runtime can be chosen at
//! start-up by name.
//!
//! Invariants a backend must keep:
//! - a trap, an out-of-bounds access or an exhausted limit is returned as a
//!   [`Trap`], never a panic of the host;
//! - a host function that the [`HostHandler`] fails with a [`Trap`] traps the
//!   guest with that message;
//! - while a host function runs, the handler is taken out of the instance; a
//!   host function reached again from inside it (for example a guest
//!   allocator that logs) goes to the *restricted* handler instead.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A WebAssembly value type (only the numeric ones appear in proxy-wasm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValType {
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
}

/// A WebAssembly value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Val {
    /// 32-bit integer.
    I32(i32),
    /// 64-bit integer.
    I64(i64),
    /// 32-bit float.
    F32(f32),
    /// 64-bit float.
    F64(f64),
}

impl Val {
    /// The type of this value.
    pub fn ty(&self) -> ValType {
        match self {
            Val::I32(_) => ValType::I32,
            Val::I64(_) => ValType::I64,
            Val::F32(_) => ValType::F32,
            Val::F64(_) => ValType::F64,
        }
    }

    /// The value as an `i32`, if it is one.
    pub fn i32(&self) -> Option<i32> {
        match self {
            Val::I32(v) => Some(*v),
            _ => None,
        }
    }

    /// The value as an `i64`, if it is one.
    pub fn i64(&self) -> Option<i64> {
        match self {
            Val::I64(v) => Some(*v),
            _ => None,
        }
    }

    /// The zero value of a type.
    pub fn zero(ty: ValType) -> Val {
        match ty {
            ValType::I32 => Val::I32(0),
            ValType::I64 => Val::I64(0),
            ValType::F32 => Val::F32(0.0),
            ValType::F64 => Val::F64(0.0),
        }
    }
}

/// Most parameters any function of the ABI has (`proxy_grpc_call`: 12).
pub const MAX_ARGS: usize = 16;

/// The arguments of one call, on the stack: backends gather a host call's
/// or a guest call's values here instead of allocating a vector per call.
#[derive(Clone, Copy, Debug)]
pub struct ArgBuf {
    vals: [Val; MAX_ARGS],
    len: usize,
}

impl ArgBuf {
    /// Collects up to [`MAX_ARGS`] values; `None` if there are more (no
    /// signature of the ABI has).
    #[inline]
    pub fn collect(it: impl IntoIterator<Item = Val>) -> Option<Self> {
        let mut b = ArgBuf {
            vals: [Val::I32(0); MAX_ARGS],
            len: 0,
        };
        for v in it {
            *b.vals.get_mut(b.len)? = v;
            b.len += 1;
        }
        Some(b)
    }

    /// The values.
    #[inline]
    pub fn as_slice(&self) -> &[Val] {
        &self.vals[..self.len]
    }
}

/// A function signature.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FuncType {
    /// Parameter types.
    pub params: Vec<ValType>,
    /// Result types (proxy-wasm never uses more than one).
    pub results: Vec<ValType>,
}

impl FuncType {
    /// Builds a signature from slices.
    pub fn new(params: &[ValType], results: &[ValType]) -> Self {
        Self {
            params: params.to_vec(),
            results: results.to_vec(),
        }
    }
}

impl fmt::Display for FuncType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[ValType]| {
            v.iter()
                .map(|t| format!("{t:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "({})->({})", list(&self.params), list(&self.results))
    }
}

/// A host function the embedder offers to a module: the backend links every
/// import of the module that matches one of these by module, name and exact
/// signature, and dispatches calls to [`HostHandler::call`] with `id`.
#[derive(Clone, Debug)]
pub struct HostFunc {
    /// Import module (`env`, `wasi_snapshot_preview1`, `wasi_unstable`).
    pub module: &'static str,
    /// Import name.
    pub name: &'static str,
    /// Exact signature.
    pub ty: FuncType,
    /// Opaque id passed back to the handler.
    pub id: u32,
}

/// Limits applied to one instance.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest linear memory, in bytes (default 1 GiB, as Envoy's host).
    pub max_memory_bytes: u64,
    /// CPU time one top-level call may take before it is interrupted. How each
    /// backend enforces it is documented on the backend.
    pub call_deadline: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_bytes: 1 << 30,
            call_deadline: Some(Duration::from_secs(5)),
        }
    }
}

/// Why a call into the guest did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrapKind {
    /// The CPU deadline ran out (epoch, fuel or wasm3 yield check).
    Interrupted,
    /// The guest trapped (unreachable, bad memory access, stack overflow...).
    Guest,
    /// A host function failed the call on purpose (restricted call, proc_exit).
    Host,
    /// The engine could not perform the call (missing export, bad arguments).
    Engine,
}

/// A failed call, with the engine's message and a backtrace when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trap {
    /// What kind of failure.
    pub kind: TrapKind,
    /// The engine's message.
    pub message: String,
    /// In-guest backtrace, when the engine provides one.
    pub backtrace: Option<String>,
}

impl Trap {
    /// A trap raised by a host function.
    pub fn host(message: impl Into<String>) -> Self {
        Self {
            kind: TrapKind::Host,
            message: message.into(),
            backtrace: None,
        }
    }
    /// A failure of the engine itself.
    pub fn engine(message: impl Into<String>) -> Self {
        Self {
            kind: TrapKind::Engine,
            message: message.into(),
            backtrace: None,
        }
    }
    /// A guest trap.
    pub fn guest(message: impl Into<String>) -> Self {
        Self {
            kind: TrapKind::Guest,
            message: message.into(),
            backtrace: None,
        }
    }
    /// An interrupted call.
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self {
            kind: TrapKind::Interrupted,
            message: message.into(),
            backtrace: None,
        }
    }
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(bt) = &self.backtrace {
            write!(f, "\n{bt}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Trap {}

/// An error from compiling or instantiating a module.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{runtime}: {message}")]
pub struct EngineError {
    /// The backend's name.
    pub runtime: &'static str,
    /// What failed.
    pub message: String,
}

impl EngineError {
    /// Builds an error for a backend.
    pub fn new(runtime: &'static str, message: impl Into<String>) -> Self {
        Self {
            runtime,
            message: message.into(),
        }
    }
}

/// A handle to a guest export, valid for the instance that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FuncRef(pub u32);

/// The guest as a host function sees it: its memory, and its exports to call
/// back into (the ABI calls the guest allocator from inside host functions).
pub trait Guest {
    /// The guest's linear memory (empty if it has none).
    fn memory(&mut self) -> &mut [u8];
    /// Calls an export found earlier with [`Instance::lookup`].
    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap>;
}

/// The ABI implementation a backend dispatches host calls to.
pub trait HostHandler: Send + 'static {
    /// Handles host function `id` (from [`HostFunc::id`]).
    fn call(&mut self, id: u32, guest: &mut dyn Guest, args: &[Val]) -> Result<Option<Val>, Trap>;
    /// For the embedder to reach its concrete state between calls.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// For the embedder to reach its concrete state between calls.
    fn as_any(&self) -> &dyn Any;
}

/// Interrupts a running call from another thread.
pub type InterruptHandle = Arc<dyn Fn() + Send + Sync>;

/// One instantiated module with its store.
pub trait Instance: Send {
    /// Finds an exported function with exactly this signature; an export with
    /// another signature counts as missing.
    fn lookup(&mut self, name: &str, ty: &FuncType) -> Option<FuncRef>;
    /// Calls an export. The deadline of [`Limits::call_deadline`] applies.
    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap>;
    /// The guest's linear memory, outside of calls.
    fn memory(&mut self) -> &mut [u8];
    /// The handler given at instantiation.
    fn handler(&mut self) -> &mut dyn HostHandler;
    /// A handle that interrupts the running call, when the engine can.
    fn interrupt_handle(&self) -> Option<InterruptHandle>;
}

/// A module compiled once, instantiated many times.
pub trait CompiledModule: Send + Sync {
    /// Creates an instance. Every function import of the module must match
    /// one of `host` by module, name and signature, or this fails with a
    /// message naming the import. `restricted` serves host calls made while
    /// another host call is in progress.
    fn instantiate(
        &self,
        host: &[HostFunc],
        limits: &Limits,
        handler: Box<dyn HostHandler>,
        restricted: Box<dyn HostHandler>,
    ) -> Result<Box<dyn Instance>, EngineError>;
}

/// A WebAssembly engine.
pub trait WasmRuntime: Send + Sync {
    /// The name used to select it (`"wasmtime"`, `"wasmi"`, `"wasm3"`).
    fn name(&self) -> &'static str;
    /// Compiles (and validates) a module.
    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError>;
}

/// Checks that every function import of `imports` is offered by `host`, and
/// returns for each import the matching host function (in import order).
/// Backends use this so that every engine reports a missing import the same way.
pub fn resolve_imports<'h>(
    runtime: &'static str,
    imports: &[(String, String, FuncType)],
    host: &'h [HostFunc],
) -> Result<Vec<&'h HostFunc>, EngineError> {
    imports
        .iter()
        .map(|(module, name, ty)| {
            let found = host.iter().find(|h| h.module == module && h.name == name);
            match found {
                Some(h) if &h.ty == ty => Ok(h),
                Some(h) => Err(EngineError::new(
                    runtime,
                    format!(
                        "import {module}.{name} has signature {ty}, the host provides {}",
                        h.ty
                    ),
                )),
                None => Err(EngineError::new(
                    runtime,
                    format!("unknown import {module}.{name}{ty}"),
                )),
            }
        })
        .collect()
}

/// Lists the function imports of a module (module, name, signature), using
/// `wasmparser`. Non-function imports are rejected: proxy-wasm modules import
/// functions only and define their own memory.
pub fn function_imports(
    runtime: &'static str,
    wasm: &[u8],
) -> Result<Vec<(String, String, FuncType)>, EngineError> {
    crate::bytecode::ModuleInfo::parse(wasm)
        .map_err(|e| EngineError::new(runtime, e.to_string()))
        .and_then(|info| {
            if let Some((m, n)) = info.non_function_imports.first() {
                return Err(EngineError::new(
                    runtime,
                    format!(
                        "import {m}.{n} is not a function; only function imports are supported"
                    ),
                ));
            }
            Ok(info.imports)
        })
}

/// The main and the restricted handler as a backend keeps them in its store,
/// with the take-out / put-back protocol every backend follows around a host
/// call (see the module invariants).
pub struct HandlerSlots {
    handler: Option<Box<dyn HostHandler>>,
    restricted: Option<Box<dyn HostHandler>>,
}

/// A handler taken out of [`HandlerSlots`] for one host call.
pub struct TakenHandler {
    handler: Box<dyn HostHandler>,
    nested: bool,
}

impl TakenHandler {
    /// Dispatches the host call.
    #[inline]
    pub fn call(
        &mut self,
        id: u32,
        guest: &mut dyn Guest,
        args: &[Val],
    ) -> Result<Option<Val>, Trap> {
        self.handler.call(id, guest, args)
    }
}

impl HandlerSlots {
    /// Slots holding both handlers.
    pub fn new(handler: Box<dyn HostHandler>, restricted: Box<dyn HostHandler>) -> Self {
        Self {
            handler: Some(handler),
            restricted: Some(restricted),
        }
    }

    /// Takes the handler for a host call: the main one, or the restricted one
    /// when the main one is already out (a host call from inside a host call).
    #[inline]
    pub fn take(&mut self) -> Result<TakenHandler, Trap> {
        if let Some(handler) = self.handler.take() {
            return Ok(TakenHandler {
                handler,
                nested: false,
            });
        }
        match self.restricted.take() {
            Some(handler) => Ok(TakenHandler {
                handler,
                nested: true,
            }),
            None => Err(Trap::host(
                "host call re-entered while the allocator was running",
            )),
        }
    }

    /// Puts a taken handler back where it came from.
    #[inline]
    pub fn restore(&mut self, taken: TakenHandler) {
        if taken.nested {
            self.restricted = Some(taken.handler);
        } else {
            self.handler = Some(taken.handler);
        }
    }

    /// The main handler, outside of host calls.
    pub fn handler_mut(&mut self) -> &mut dyn HostHandler {
        // Invariant: the handler is only out of the slots during a host call,
        // and no host call runs while a backend is reached through `&mut self`.
        #[allow(clippy::expect_used)]
        self.handler
            .as_deref_mut()
            .expect("handler present outside calls")
    }
}
