//! The wasm3 backend of the nasp proxy-wasm host: glue over `wasm3x-sys`.
//!
//! - wasm3 is a small C interpreter: the smallest footprint of the three
//!   runtimes, and the most portable (anything with a C compiler).
//! - Bound through the raw C API rather than the `wasm3x` wrapper, because
//!   the ABI needs host functions that call back into the guest (the
//!   allocator, inside `proxy_get_*`). wasm3 supports that: while a host
//!   function runs, its runtime's stack base is moved to the host function's
//!   frame, so a nested `m3_Call` starts above the suspended caller. The host
//!   function reads all of its arguments before it calls back (the nested
//!   call reuses their slots) and writes its result afterwards.
//! - CPU deadline: wasm3 has no fuel or epochs and checks nothing inside a
//!   loop, so each module is rewritten before loading ([`instrument`]): every
//!   loop header counts down a budget of [`LOOP_BUDGET`] iterations and then
//!   asks the host, which traps once the deadline (or an interrupt from
//!   another thread) has passed. Deep recursion is stopped by wasm3's stack
//!   checks: a value stack of [`VALUE_STACK_BYTES`] and a native-stack budget
//!   of [`NATIVE_STACK_BYTES`] per top-level call.
//! - Memory cap: the rewrite lowers the memory's declared maximum to the cap,
//!   so `memory.grow` past it fails as on the other runtimes.
//!
//! Unsafe code is confined to this file; each block says why it is sound.

#![allow(unsafe_code)]

pub mod instrument;

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nasp_proxywasm::runtime::{
    ArgBuf, CompiledModule, EngineError, FuncRef, FuncType, Guest, HandlerSlots, HostFunc,
    HostHandler, Instance, InterruptHandle, Limits, MAX_ARGS, Trap, Val, ValType, WasmRuntime,
    function_imports, resolve_imports,
};
use wasm3x_sys as ffi;

const NAME: &str = "wasm3";

/// Loop iterations between two deadline checks.
pub const LOOP_BUDGET: i32 = 10_000;
/// Size of each instance's wasm value stack.
pub const VALUE_STACK_BYTES: u32 = 256 * 1024;
/// Native (C) stack that one top-level call may use before wasm3 traps with
/// "stack overflow". Kept well under the 2 MiB of a default Rust or tokio
/// thread so that hostile recursion traps instead of crashing the process.
pub const NATIVE_STACK_BYTES: usize = 512 * 1024;

const PAGE: u64 = 64 * 1024;

/// The wasm3 runtime. It holds no engine state: every instance gets its own
/// wasm3 environment and runtime.
#[derive(Clone, Debug, Default)]
pub struct Wasm3Runtime;

/// Creates the runtime.
pub fn runtime() -> Result<Arc<dyn WasmRuntime>, EngineError> {
    Ok(Arc::new(Wasm3Runtime))
}

fn pages_for(limits: &Limits) -> u64 {
    (limits.max_memory_bytes / PAGE).min(65_536)
}

impl WasmRuntime for Wasm3Runtime {
    fn name(&self) -> &'static str {
        NAME
    }

    fn compile(&self, wasm: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        let imports = function_imports(NAME, wasm)?;
        // Instrument for the default memory cap, which most instances use, so
        // the first instantiation finds these bytes ready; a module whose
        // initial memory is over that cap is instrumented for the largest one
        // (its instances then say whether their own cap fits).
        let default_pages = pages_for(&Limits::default());
        let (pages, instrumented) = match instrument::instrument(wasm, default_pages) {
            Ok(out) => (default_pages, out),
            Err(_) => (
                65_536,
                instrument::instrument(wasm, 65_536).map_err(|m| EngineError::new(NAME, m))?,
            ),
        };
        let bytes: Arc<[u8]> = instrumented.wasm.into();
        // Let wasm3 parse it once now, so its own refusals are load errors.
        // SAFETY: a fresh environment; the module is freed before it is
        // loaded into any runtime, as `m3_FreeModule` requires, and `bytes`
        // outlives both.
        unsafe {
            let env = ffi::m3_NewEnvironment();
            if env.is_null() {
                return Err(EngineError::new(NAME, "out of memory"));
            }
            let mut module: ffi::IM3Module = std::ptr::null_mut();
            let r = ffi::m3_ParseModule(env, &mut module, bytes.as_ptr(), len32(&bytes)?);
            if !module.is_null() && r.is_null() {
                ffi::m3_FreeModule(module);
            }
            ffi::m3_FreeEnvironment(env);
            if !r.is_null() {
                return Err(EngineError::new(NAME, message(r)));
            }
        }
        Ok(Arc::new(Compiled {
            original: wasm.into(),
            imports,
            exports: Arc::new(instrumented.exported_functions),
            capped: Mutex::new((pages, bytes)),
        }))
    }
}

fn len32(bytes: &[u8]) -> Result<u32, EngineError> {
    u32::try_from(bytes.len()).map_err(|_| EngineError::new(NAME, "module larger than 4 GiB"))
}

/// A wasm3 result string as text.
fn message(r: ffi::M3Result) -> String {
    if r.is_null() {
        return String::new();
    }
    // SAFETY: wasm3 results are NUL-terminated static strings (or ours).
    unsafe { CStr::from_ptr(r) }.to_string_lossy().into_owned()
}

struct Compiled {
    original: Arc<[u8]>,
    imports: Vec<(String, String, FuncType)>,
    exports: Arc<Vec<String>>,
    /// The instrumented module for the last memory cap asked for.
    capped: Mutex<(u64, Arc<[u8]>)>,
}

impl Compiled {
    fn bytes_for(&self, pages: u64) -> Result<Arc<[u8]>, EngineError> {
        let mut capped = self
            .capped
            .lock()
            .map_err(|_| EngineError::new(NAME, "module cache poisoned"))?;
        if capped.0 != pages {
            let out = instrument::instrument(&self.original, pages)
                .map_err(|m| EngineError::new(NAME, m))?;
            *capped = (pages, out.wasm.into());
        }
        Ok(capped.1.clone())
    }
}

/// What a linked host function needs to run; its address is the import's
/// wasm3 userdata, so it lives as long as the instance.
struct LinkEntry {
    id: u32,
    params: Vec<ValType>,
    result: Option<ValType>,
}

struct State {
    runtime: ffi::IM3Runtime,
    handlers: HandlerSlots,
    /// The trap a host function raised, handed to whoever sees `HOST_TRAP`.
    pending: Option<Trap>,
    funcs: Vec<(ffi::IM3Function, FuncType)>,
    deadline: Option<Instant>,
    call_deadline: Option<Duration>,
    interrupt: Arc<AtomicBool>,
}

/// The result a host function returns to wasm3 to make it unwind; the real
/// trap waits in `State::pending`.
const HOST_TRAP: &CStr = c"[trap] nasp host function trap";

fn slot_from(v: Val) -> u64 {
    let mut b = [0u8; 8];
    match v {
        Val::I32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
        Val::F32(x) => b[..4].copy_from_slice(&x.to_ne_bytes()),
        Val::I64(x) => b = x.to_ne_bytes(),
        Val::F64(x) => b = x.to_ne_bytes(),
    }
    u64::from_ne_bytes(b)
}

fn val_from(slot: u64, ty: ValType) -> Val {
    let b = slot.to_ne_bytes();
    let low = [b[0], b[1], b[2], b[3]];
    match ty {
        ValType::I32 => Val::I32(i32::from_ne_bytes(low)),
        ValType::F32 => Val::F32(f32::from_ne_bytes(low)),
        ValType::I64 => Val::I64(i64::from_ne_bytes(b)),
        ValType::F64 => Val::F64(f64::from_ne_bytes(b)),
    }
}

fn type_char(t: ValType) -> char {
    match t {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        ValType::F32 => 'f',
        ValType::F64 => 'F',
    }
}

fn m3_type(t: ffi::M3ValueType::Type) -> Option<ValType> {
    Some(match t {
        ffi::M3ValueType::c_m3Type_i32 => ValType::I32,
        ffi::M3ValueType::c_m3Type_i64 => ValType::I64,
        ffi::M3ValueType::c_m3Type_f32 => ValType::F32,
        ffi::M3ValueType::c_m3Type_f64 => ValType::F64,
        _ => return None,
    })
}

/// Turns a wasm3 result into a trap.
///
/// # Safety
/// `state` must point to the live state of the instance that returned `r`.
unsafe fn trap_from(state: *mut State, r: ffi::M3Result) -> Trap {
    if std::ptr::eq(r, HOST_TRAP.as_ptr()) {
        // SAFETY: per the contract; no other reference to the state is live.
        if let Some(t) = unsafe { (*state).pending.take() } {
            return t;
        }
    }
    let text = message(r);
    match text.strip_prefix("[trap] ") {
        Some(m) => Trap::guest(format!("wasm trap: {m}")),
        None => Trap::engine(format!("wasm3: {text}")),
    }
}

/// Calls `f` with `args` and reads its result.
///
/// # Safety
/// `state` must point to the live state of the instance `f` belongs to, and
/// no Rust reference into that state may be held across this call (host
/// functions called from the guest access it too).
unsafe fn call_raw(
    state: *mut State,
    f: ffi::IM3Function,
    ty: &FuncType,
    args: &[Val],
) -> Result<Option<Val>, Trap> {
    if args.len() != ty.params.len() || args.iter().zip(&ty.params).any(|(a, t)| a.ty() != *t) {
        return Err(Trap::engine(format!(
            "arguments {args:?} do not match the signature {ty}"
        )));
    }
    // Slots and their pointers on the stack: no vectors per call.
    if args.len() > MAX_ARGS {
        return Err(Trap::engine(format!(
            "{} arguments: more than any ABI function takes",
            args.len()
        )));
    }
    let mut slots = [0u64; MAX_ARGS];
    for (slot, a) in slots.iter_mut().zip(args) {
        *slot = slot_from(*a);
    }
    let mut ptrs: [*const c_void; MAX_ARGS] = [std::ptr::null(); MAX_ARGS];
    for (p, s) in ptrs.iter_mut().zip(&slots[..args.len()]) {
        *p = std::ptr::from_ref(s).cast();
    }
    let ptrs = &mut ptrs[..args.len()];
    // SAFETY: `f` is a function of this instance with the checked signature;
    // each pointer addresses an 8-byte slot holding one argument in the
    // layout wasm3 reads (the value in the low-addressed bytes).
    let r = unsafe { ffi::m3_Call(f, ptrs.len() as u32, ptrs.as_mut_ptr()) };
    if !r.is_null() {
        // SAFETY: forwarded contract.
        return Err(unsafe { trap_from(state, r) });
    }
    let Some(&rt) = ty.results.first() else {
        return Ok(None);
    };
    let mut out: u64 = 0;
    let mut outs = [std::ptr::from_mut(&mut out).cast::<c_void>().cast_const()];
    // SAFETY: the call succeeded and `f` has exactly one result, written
    // into the 8-byte slot.
    let r = unsafe { ffi::m3_GetResults(f, 1, outs.as_mut_ptr()) };
    if !r.is_null() {
        return Err(Trap::engine(format!("wasm3: {}", message(r))));
    }
    Ok(Some(val_from(out, rt)))
}

/// The linear memory of the instance behind `state` (empty if it has none).
///
/// # Safety
/// `state` is live; the caller ties the slice's lifetime to a borrow during
/// which no wasm runs. The pointer is re-read on every call because a nested
/// call may grow (and move) the memory.
unsafe fn memory_of<'a>(state: *mut State) -> &'a mut [u8] {
    // SAFETY: per the contract.
    unsafe {
        let mut size: u32 = 0;
        let p = ffi::m3_GetMemory((*state).runtime, &mut size, 0);
        if p.is_null() {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(p, size as usize)
    }
}

/// The function behind a handle.
///
/// # Safety
/// `state` is live and not borrowed elsewhere; the lookup copies what it
/// needs and drops the reference before returning.
unsafe fn func_of(state: *mut State, func: FuncRef) -> Result<(ffi::IM3Function, FuncType), Trap> {
    // SAFETY: per the contract.
    let found = unsafe {
        let funcs = &(*state).funcs;
        funcs.get(func.0 as usize).cloned()
    };
    found.ok_or_else(|| Trap::engine(format!("unknown function reference {}", func.0)))
}

/// The guest as host functions see it.
struct StateGuest {
    state: *mut State,
}

impl Guest for StateGuest {
    fn memory(&mut self) -> &mut [u8] {
        // SAFETY: the state outlives every call into the instance, and the
        // slice's lifetime is tied to `&mut self`, during which no wasm runs.
        unsafe { memory_of(self.state) }
    }

    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        // SAFETY: the state is live and not borrowed here.
        let (f, ty) = unsafe { func_of(self.state, func) }?;
        // SAFETY: wasm3 moved the stack base above this host function's
        // frame, so the nested call cannot overwrite the suspended caller.
        unsafe { call_raw(self.state, f, &ty, args) }
    }
}

fn state_of(runtime: ffi::IM3Runtime) -> *mut State {
    // SAFETY: every runtime this backend creates carries its state pointer.
    unsafe { ffi::m3_GetUserData(runtime) }.cast()
}

/// Sets the pending trap and returns the marker result.
///
/// # Safety
/// `state` must be the live state, not otherwise borrowed.
unsafe fn raise(state: *mut State, trap: Trap) -> *const c_void {
    // SAFETY: per the contract.
    unsafe { (*state).pending = Some(trap) };
    HOST_TRAP.as_ptr().cast()
}

unsafe extern "C" fn host_trampoline(
    runtime: ffi::IM3Runtime,
    ctx: ffi::IM3ImportContext,
    sp: *mut u64,
    _mem: *mut c_void,
) -> *const c_void {
    let state = state_of(runtime);
    // SAFETY: the userdata of every import linked with this trampoline is a
    // `LinkEntry` boxed in the instance, which outlives its calls.
    let entry = unsafe { &*(*ctx).userdata.cast::<LinkEntry>() };
    let rets = usize::from(entry.result.is_some());
    // Read every argument before anything can call back into the guest: a
    // nested call reuses these slots.
    let args = ArgBuf::collect(
        entry
            .params
            .iter()
            .enumerate()
            // SAFETY: wasm3 gives the function one slot per result and argument.
            .map(|(i, t)| val_from(unsafe { *sp.add(rets + i) }, *t)),
    );
    let Some(args) = args else {
        // SAFETY: as below; no reference to the state is live here.
        return unsafe { raise(state, Trap::engine("too many arguments")) };
    };
    // SAFETY: no reference to the state is live here.
    let taken = match unsafe { (*state).handlers.take() } {
        Ok(t) => t,
        // SAFETY: as above.
        Err(t) => return unsafe { raise(state, t) },
    };
    let mut taken = taken;
    let mut guest = StateGuest { state };
    let r = catch_unwind(AssertUnwindSafe(|| {
        taken.call(entry.id, &mut guest, args.as_slice())
    }))
    .unwrap_or_else(|_| Err(Trap::host("host function panicked")));
    // SAFETY: the handler call has returned; nothing else borrows the state.
    unsafe { (*state).handlers.restore(taken) };
    match r {
        Ok(v) => {
            if let (Some(v), Some(_)) = (v, entry.result) {
                // SAFETY: slot 0 is the result slot.
                unsafe { *sp = slot_from(v) };
            }
            std::ptr::null()
        }
        // SAFETY: as above.
        Err(t) => unsafe { raise(state, t) },
    }
}

unsafe extern "C" fn budget_trampoline(
    runtime: ffi::IM3Runtime,
    _ctx: ffi::IM3ImportContext,
    sp: *mut u64,
    _mem: *mut c_void,
) -> *const c_void {
    let state = state_of(runtime);
    // SAFETY: a short-lived read of the live state; no other borrow exists
    // while wasm calls an import.
    let (interrupted, deadline, call_deadline) = unsafe {
        let s = &*state;
        (
            s.interrupt.swap(false, Ordering::Relaxed),
            s.deadline,
            s.call_deadline,
        )
    };
    if interrupted {
        // SAFETY: as above.
        return unsafe { raise(state, Trap::interrupted("wasm trap: interrupted")) };
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        let ms = call_deadline.map_or(0, |d| d.as_millis());
        let trap = Trap::interrupted(format!("wasm trap: CPU deadline of {ms} ms exceeded"));
        // SAFETY: as above.
        return unsafe { raise(state, trap) };
    }
    // SAFETY: the budget import returns one i32 in slot 0.
    unsafe { *sp = slot_from(Val::I32(LOOP_BUDGET)) };
    std::ptr::null()
}

/// Where wasm3 keeps a runtime's native-stack limit (`M3Runtime::stackLimit`).
///
/// The field is not part of wasm3's public API, so its offset is found once
/// per process: right after creation the runtime holds, in this order,
/// `stack` and `originStack` (the same non-null pointer), `stackSize` (0),
/// `numStackSlots`, `stackLimit` (null), `lastCalled` (null) and `userdata`.
/// That pattern, with a userdata pointer unique to the runtime, cannot occur
/// by chance. Every later runtime is checked against the same pattern at
/// the found offset before the field is ever written; `wasm3x-sys` is pinned
/// to the version this was written for.
fn stack_limit_offset(runtime: ffi::IM3Runtime, userdata: *mut c_void) -> Option<usize> {
    static OFFSET: OnceLock<Option<usize>> = OnceLock::new();
    let matches = |off: usize| {
        let base = runtime.cast::<u8>().cast_const();
        // SAFETY: `off` is at most the real offset of `stack` in the runtime
        // allocation (the scan stops at the first match), so every read
        // stays inside the struct; reads are unaligned-safe.
        unsafe {
            let word = |at: usize| std::ptr::read_unaligned(base.add(off + at).cast::<usize>());
            let half = |at: usize| std::ptr::read_unaligned(base.add(off + at).cast::<u32>());
            let stack = word(0);
            stack != 0
                && word(8) == stack
                && half(16) == 0
                && half(20) == VALUE_STACK_BYTES / 8
                && word(24) == 0
                && word(32) == 0
                && word(40) == userdata as usize
        }
    };
    let found = *OFFSET.get_or_init(|| (0..64 * 1024).step_by(8).find(|o| matches(*o)));
    found.filter(|o| matches(*o)).map(|o| o + 24)
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
        let wasm = self.bytes_for(pages_for(limits))?;
        let interrupt = Arc::new(AtomicBool::new(false));
        let state = Box::into_raw(Box::new(State {
            runtime: std::ptr::null_mut(),
            handlers: HandlerSlots::new(handler, restricted),
            pending: None,
            funcs: Vec::new(),
            deadline: None,
            call_deadline: limits.call_deadline,
            interrupt: interrupt.clone(),
        }));
        // Built once and never resized: wasm3 keeps each entry's address.
        let entries: Vec<LinkEntry> = matched
            .iter()
            .map(|h| LinkEntry {
                id: h.id,
                params: h.ty.params.clone(),
                result: h.ty.results.first().copied(),
            })
            .collect();
        // From here on the instance owns (and its Drop frees) everything.
        let mut instance = Wasm3Instance {
            state,
            env: std::ptr::null_mut(),
            runtime: std::ptr::null_mut(),
            stack_limit: None,
            wasm,
            entries,
            exports: self.exports.clone(),
            lookups: HashMap::new(),
            depth: 0,
            interrupt,
        };
        instance.load(&matched)?;
        Ok(Box::new(instance))
    }
}

struct Wasm3Instance {
    state: *mut State,
    env: ffi::IM3Environment,
    runtime: ffi::IM3Runtime,
    stack_limit: Option<usize>,
    /// The module bytes: wasm3 reads function bodies from them lazily.
    wasm: Arc<[u8]>,
    entries: Vec<LinkEntry>,
    exports: Arc<Vec<String>>,
    lookups: HashMap<(String, FuncType), FuncRef>,
    depth: u32,
    interrupt: Arc<AtomicBool>,
}

// SAFETY: the wasm3 environment, runtime and state are owned by this value
// alone and only touched through `&mut self` (wasm3 keeps no thread-local or
// global state), so moving the whole instance to another thread is sound.
unsafe impl Send for Wasm3Instance {}

impl Wasm3Instance {
    fn load(&mut self, matched: &[&HostFunc]) -> Result<(), EngineError> {
        let err = |m: String| EngineError::new(NAME, m);
        let mut module: ffi::IM3Module = std::ptr::null_mut();
        // SAFETY: the environment, runtime and module are created and owned
        // here; pointers handed to wasm3 (state, entries, bytes) are owned
        // by `self` and outlive the runtime, which `Drop` frees first.
        unsafe {
            self.env = ffi::m3_NewEnvironment();
            if self.env.is_null() {
                return Err(err("out of memory".into()));
            }
            self.runtime = ffi::m3_NewRuntime(self.env, VALUE_STACK_BYTES, self.state.cast());
            if self.runtime.is_null() {
                return Err(err("out of memory".into()));
            }
            (*self.state).runtime = self.runtime;
            self.stack_limit = stack_limit_offset(self.runtime, self.state.cast());
            if self.stack_limit.is_none() {
                return Err(err(
                    "runtime layout not recognised (built against another wasm3x-sys?)".into(),
                ));
            }
            let r = ffi::m3_ParseModule(
                self.env,
                &mut module,
                self.wasm.as_ptr(),
                len32(&self.wasm)?,
            );
            if !r.is_null() {
                return Err(err(message(r)));
            }
            let r = ffi::m3_LoadModule(self.runtime, module);
            if !r.is_null() {
                ffi::m3_FreeModule(module);
                return Err(err(message(r)));
            }
            for (h, entry) in matched.iter().zip(&self.entries) {
                let sig: String = std::iter::once(entry.result.map_or('v', type_char))
                    .chain(std::iter::once('('))
                    .chain(entry.params.iter().map(|t| type_char(*t)))
                    .chain(std::iter::once(')'))
                    .collect();
                link(
                    module,
                    h.module,
                    h.name,
                    &sig,
                    host_trampoline,
                    std::ptr::from_ref(entry).cast(),
                )?;
            }
            link(
                module,
                instrument::BUDGET_MODULE,
                instrument::BUDGET_NAME,
                "i()",
                budget_trampoline,
                std::ptr::null(),
            )?;
            // Compile every function now: wasm3 would otherwise find an
            // unsupported instruction only when it first runs.
            let r = ffi::m3_CompileModule(module);
            if !r.is_null() {
                return Err(err(message(r)));
            }
        }
        // Start functions run now, under the call deadline, like the other
        // runtimes' instantiation.
        self.enter();
        // SAFETY: the module is loaded into this runtime; no reference into
        // the state is live.
        let r = unsafe { ffi::m3_RunStart(module) };
        let r = if r.is_null() {
            Ok(())
        } else {
            // SAFETY: as above.
            Err(unsafe { trap_from(self.state, r) })
        };
        self.leave();
        r.map_err(|t| err(t.to_string()))
    }

    /// Arms the deadline and native-stack limit for a top-level call.
    fn enter(&mut self) {
        self.depth += 1;
        if self.depth == 1 {
            // SAFETY: no reference into the state is live between calls.
            unsafe {
                (*self.state).deadline = (*self.state).call_deadline.map(|d| Instant::now() + d);
            }
            if let Some(off) = self.stack_limit {
                let here = std::ptr::from_ref(&off) as usize;
                let limit = here.saturating_sub(NATIVE_STACK_BYTES);
                // SAFETY: `off` was verified to be the runtime's stackLimit
                // field; wasm3 only reads it during calls on this thread.
                unsafe {
                    std::ptr::write_unaligned(
                        self.runtime.cast::<u8>().add(off).cast::<usize>(),
                        limit,
                    );
                }
            }
        }
    }

    fn leave(&mut self) {
        self.depth -= 1;
        if self.depth == 0
            && let Some(off) = self.stack_limit
        {
            {
                // SAFETY: as in `enter`.
                unsafe {
                    std::ptr::write_unaligned(
                        self.runtime.cast::<u8>().add(off).cast::<usize>(),
                        0,
                    );
                }
            }
        }
    }
}

/// Links one import to a trampoline.
///
/// # Safety
/// `module` is a loaded module; `userdata` outlives it.
unsafe fn link(
    module: ffi::IM3Module,
    module_name: &str,
    name: &str,
    sig: &str,
    f: unsafe extern "C" fn(
        ffi::IM3Runtime,
        ffi::IM3ImportContext,
        *mut u64,
        *mut c_void,
    ) -> *const c_void,
    userdata: *const c_void,
) -> Result<(), EngineError> {
    let c =
        |s: &str| CString::new(s).map_err(|_| EngineError::new(NAME, format!("NUL in name {s:?}")));
    let (m, n, s) = (c(module_name)?, c(name)?, c(sig)?);
    // SAFETY: per the contract; wasm3 copies nothing it keeps from the
    // strings but the signature, which it parses immediately.
    let r = unsafe {
        ffi::m3_LinkRawFunctionEx(
            module,
            m.as_ptr(),
            n.as_ptr(),
            s.as_ptr(),
            Some(f),
            userdata,
        )
    };
    // An import the module does not use is reported as a failed lookup.
    if !r.is_null() && !message(r).contains("function lookup failed") {
        return Err(EngineError::new(
            NAME,
            format!("linking {module_name}.{name}: {}", message(r)),
        ));
    }
    Ok(())
}

impl Drop for Wasm3Instance {
    fn drop(&mut self) {
        // SAFETY: the runtime owns the loaded module; it is freed before the
        // environment, and both before the state and entries it points to.
        unsafe {
            if !self.runtime.is_null() {
                ffi::m3_FreeRuntime(self.runtime);
            }
            if !self.env.is_null() {
                ffi::m3_FreeEnvironment(self.env);
            }
            drop(Box::from_raw(self.state));
        }
    }
}

impl Instance for Wasm3Instance {
    fn lookup(&mut self, name: &str, ty: &FuncType) -> Option<FuncRef> {
        if let Some(r) = self.lookups.get(&(name.to_string(), ty.clone())) {
            return Some(*r);
        }
        // wasm3 also finds internal functions by debug name: only exports
        // are the guest's interface.
        if !self.exports.iter().any(|e| e == name) {
            return None;
        }
        let cname = CString::new(name).ok()?;
        let mut f: ffi::IM3Function = std::ptr::null_mut();
        // SAFETY: the runtime is live; wasm3 writes the handle or fails.
        let r = unsafe { ffi::m3_FindFunction(&mut f, self.runtime, cname.as_ptr()) };
        if !r.is_null() || f.is_null() {
            return None;
        }
        // SAFETY: `f` is a function of this runtime.
        let (params, results) = unsafe {
            let params: Option<Vec<ValType>> = (0..ffi::m3_GetArgCount(f))
                .map(|i| m3_type(ffi::m3_GetArgType(f, i)))
                .collect();
            let results: Option<Vec<ValType>> = (0..ffi::m3_GetRetCount(f))
                .map(|i| m3_type(ffi::m3_GetRetType(f, i)))
                .collect();
            (params?, results?)
        };
        if params != ty.params || results != ty.results {
            return None;
        }
        // SAFETY: no reference into the state is live between calls.
        let funcs = unsafe { &mut (*self.state).funcs };
        funcs.push((f, ty.clone()));
        let r = FuncRef((funcs.len() - 1) as u32);
        self.lookups.insert((name.to_string(), ty.clone()), r);
        Some(r)
    }

    fn call(&mut self, func: FuncRef, args: &[Val]) -> Result<Option<Val>, Trap> {
        // SAFETY: no reference into the state is live between calls.
        let (f, ty) = unsafe { func_of(self.state, func) }?;
        self.enter();
        // SAFETY: the state is live and unborrowed; `f` belongs to it.
        let r = unsafe { call_raw(self.state, f, &ty, args) };
        self.leave();
        r
    }

    fn memory(&mut self) -> &mut [u8] {
        // SAFETY: the slice's lifetime is tied to `&mut self`, during which
        // no wasm runs.
        unsafe { memory_of(self.state) }
    }

    fn handler(&mut self) -> &mut dyn HostHandler {
        // SAFETY: the returned borrow is tied to `&mut self`, during which
        // no wasm runs and nothing else touches the state.
        unsafe { (*self.state).handlers.handler_mut() }
    }

    fn interrupt_handle(&self) -> Option<InterruptHandle> {
        let flag = self.interrupt.clone();
        Some(Arc::new(move || flag.store(true, Ordering::Relaxed)))
    }
}
