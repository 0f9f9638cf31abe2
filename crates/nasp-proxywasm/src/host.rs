//! The host functions: every `proxy_*` import and the WASI subset, written
//! once over [`Guest`].
//!
//! Invariants: every guest pointer is bounds-checked (a bad one returns
//! `INVALID_MEMORY_ACCESS`, or `FAULT` for WASI); nothing here panics on guest
//! input; data handed to the guest is copied into memory the guest allocates
//! with its own allocator, never host memory.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nasp_telemetry::{MetricError, MetricId, MetricKind, MetricOp};

use crate::abi::{HostFn, errno, status};
use crate::bytecode::AbiVersion;
use crate::env::{
    GET_PROPERTIES, GrpcCallout, HostEnv, HttpCallout, LogLevel, LogRecord, MAX_BATCH_PATHS, lock,
};
use crate::runtime::{FuncRef, Guest, HostHandler, Trap, Val};
use crate::types::{HeaderMap, LocalResponse, PropertyProvider, SharedStream};

/// Static facts about a plugin, shared by its VM instances.
#[derive(Debug, Clone, Default)]
pub struct PluginInfo {
    /// Plugin name (for logs).
    pub name: String,
    /// Root id (`plugin_root_id`).
    pub root_id: String,
    /// VM id (`plugin_vm_id`, the shared-data namespace).
    pub vm_id: String,
    /// VM configuration.
    pub vm_configuration: Vec<u8>,
    /// Plugin configuration.
    pub configuration: Vec<u8>,
}

/// Which lifecycle call the VM is in; decides which buffers exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Start,
    VmStart,
    Configure,
    Callback,
}

/// Data a callout or foreign-function callback may read.
#[derive(Default, Debug)]
pub(crate) struct CallData {
    pub headers: HeaderMap,
    pub body: Option<Vec<u8>>,
    pub trailers: HeaderMap,
    pub grpc_initial: HeaderMap,
    pub grpc_trailing: HeaderMap,
    pub grpc_message: Option<Vec<u8>>,
    pub status: Option<(u32, String)>,
    pub foreign_args: Option<Vec<u8>>,
}

impl CallData {
    /// Whether nothing is set: the common case after a stream callback,
    /// which then skips the reset.
    pub fn is_clear(&self) -> bool {
        self.headers.is_unused()
            && self.body.is_none()
            && self.trailers.is_unused()
            && self.grpc_initial.is_unused()
            && self.grpc_trailing.is_unused()
            && self.grpc_message.is_none()
            && self.status.is_none()
            && self.foreign_args.is_none()
    }
}

/// The ABI state of one VM instance.
pub(crate) struct AbiHost {
    pub abi: AbiVersion,
    pub info: Arc<PluginInfo>,
    pub env: HostEnv,
    pub vm_key: u64,
    pub alloc: Option<FuncRef>,
    pub root_id: u32,
    pub effective: u32,
    pub streams: HashMap<u32, SharedStream, ContextIds>,
    pub root_filter_state: HashMap<String, Vec<u8>>,
    /// The plugin's provider ([`crate::PluginConfig::properties`]).
    pub plugin_properties: Option<Arc<dyn PropertyProvider>>,
    pub phase: Phase,
    pub call: CallData,
    pub tick_period_ms: u32,
    pub done_called: bool,
    /// The root context's `proxy_on_done` returned false: `proxy_done` is
    /// allowed (and `proxy_on_delete` follows it).
    pub pending_done: bool,
    pub stop_iteration: bool,
    /// Callout tokens this VM issued that may still get an answer.
    pub callouts: HashSet<u32>,
    monotonic_base: Instant,
    /// A header value on its way to the guest, reused across calls (a
    /// fresh `Vec` per `proxy_get_header_map_value` was a visible share of
    /// a chain's allocations).
    scratch: Vec<u8>,
    /// The last batch read's paths, parsed ([`GET_PROPERTIES`]).
    batch: ParsedBatch,
}

/// Callout tokens come from one counter for the whole process, so a token
/// of a failed VM is never issued again by its replacement.
static NEXT_CALLOUT: AtomicU32 = AtomicU32::new(1);

impl AbiHost {
    pub fn new(abi: AbiVersion, info: Arc<PluginInfo>, env: HostEnv, vm_key: u64) -> Self {
        Self {
            abi,
            info,
            env,
            vm_key,
            alloc: None,
            root_id: 0,
            effective: 0,
            streams: HashMap::default(),
            root_filter_state: HashMap::new(),
            plugin_properties: None,
            phase: Phase::Start,
            call: CallData::default(),
            tick_period_ms: 0,
            done_called: false,
            pending_done: false,
            stop_iteration: false,
            callouts: HashSet::new(),
            monotonic_base: Instant::now(),
            scratch: Vec::new(),
            batch: ParsedBatch::default(),
        }
    }

    fn log(&self, level: LogLevel, message: String) {
        self.env.logs.log(LogRecord {
            level,
            plugin: self.info.name.clone(),
            message,
        });
    }

    fn stream(&self) -> Option<&SharedStream> {
        self.streams.get(&self.effective)
    }
}

/// Guest memory helpers. Errors are `Err(())`; callers map them to the status
/// their ABI family uses.
pub(crate) mod mem {
    use super::*;

    pub fn slice(g: &mut dyn Guest, ptr: i32, len: i32) -> Result<&[u8], ()> {
        at(g.memory(), ptr, len)
    }

    /// `len` bytes at `ptr` of memory already looked up: several ranges
    /// (a header's name and value) can be borrowed at once, with no copy.
    pub fn at(m: &[u8], ptr: i32, len: i32) -> Result<&[u8], ()> {
        let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
        let end = ptr.checked_add(len).ok_or(())?;
        m.get(ptr..end).ok_or(())
    }

    pub fn read(g: &mut dyn Guest, ptr: i32, len: i32) -> Result<Vec<u8>, ()> {
        slice(g, ptr, len).map(<[u8]>::to_vec)
    }

    pub fn read_str(g: &mut dyn Guest, ptr: i32, len: i32) -> Result<String, ()> {
        slice(g, ptr, len).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    pub fn write(g: &mut dyn Guest, ptr: i32, data: &[u8]) -> Result<(), ()> {
        put(g.memory(), ptr, data)
    }

    /// [`write`] into memory already looked up.
    pub fn put(m: &mut [u8], ptr: i32, data: &[u8]) -> Result<(), ()> {
        let ptr = ptr as u32 as usize;
        let end = ptr.checked_add(data.len()).ok_or(())?;
        m.get_mut(ptr..end).ok_or(())?.copy_from_slice(data);
        Ok(())
    }

    pub fn write_u32(g: &mut dyn Guest, ptr: i32, v: u32) -> Result<(), ()> {
        write(g, ptr, &v.to_le_bytes())
    }

    pub fn write_u64(g: &mut dyn Guest, ptr: i32, v: u64) -> Result<(), ()> {
        write(g, ptr, &v.to_le_bytes())
    }

    pub fn read_u32(g: &mut dyn Guest, ptr: i32) -> Result<u32, ()> {
        let b = slice(g, ptr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

type HostResult = Result<Option<Val>, Trap>;

fn st(v: i32) -> HostResult {
    Ok(Some(Val::I32(v)))
}

macro_rules! try_mem {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(()) => return st(status::INVALID_MEMORY_ACCESS),
        }
    };
}

macro_rules! try_wasi {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(()) => return st(errno::FAULT),
        }
    };
}

fn arg(args: &[Val], i: usize) -> i32 {
    // The backend checked the signature against the table, so the value has
    // the declared type; a missing one reads as 0 rather than panicking.
    match args.get(i) {
        Some(Val::I32(v)) => *v,
        Some(Val::I64(v)) => *v as i32,
        _ => 0,
    }
}

fn arg64(args: &[Val], i: usize) -> i64 {
    match args.get(i) {
        Some(Val::I64(v)) => *v,
        Some(Val::I32(v)) => i64::from(*v),
        _ => 0,
    }
}

impl AbiHost {
    /// Copies `data` into guest memory allocated by the guest, and writes the
    /// pointer and size through the two out-pointers. Empty data writes 0, 0.
    fn copy_out(
        &mut self,
        g: &mut dyn Guest,
        data: &[u8],
        ptr_ptr: i32,
        size_ptr: i32,
    ) -> HostResult {
        if data.is_empty() {
            try_mem!(mem::write_u32(g, ptr_ptr, 0));
            try_mem!(mem::write_u32(g, size_ptr, 0));
            return st(status::OK);
        }
        let ptr = try_mem!(self.guest_alloc_len(g, data.len())?);
        // One look at the memory for the three writes (each look costs a
        // store check in wasmtime).
        let m = g.memory();
        try_mem!(mem::put(m, ptr, data));
        try_mem!(mem::put(m, ptr_ptr, &(ptr as u32).to_le_bytes()));
        try_mem!(mem::put(m, size_ptr, &(data.len() as u32).to_le_bytes()));
        st(status::OK)
    }

    /// Allocates `len` bytes in the guest with its allocator.
    fn guest_alloc_len(&mut self, g: &mut dyn Guest, len: usize) -> Result<Result<i32, ()>, Trap> {
        let Some(alloc) = self.alloc else {
            return Ok(Err(()));
        };
        let Ok(len) = i32::try_from(len) else {
            return Ok(Err(()));
        };
        match g.call(alloc, &[Val::I32(len)])? {
            Some(Val::I32(p)) if p != 0 => Ok(Ok(p)),
            _ => Ok(Err(())),
        }
    }

    /// Runs `f` over buffer `kind` where it lives, without copying it.
    fn with_buffer<R>(&self, kind: i32, f: impl FnOnce(&[u8]) -> R) -> Result<R, i32> {
        use crate::abi::buffer::*;
        let of_stream = |pick: fn(&crate::types::StreamState) -> &[u8],
                         f: &mut dyn FnMut(&[u8])| {
            match self.stream() {
                Some(s) => {
                    f(pick(&lock(s)));
                    Ok(())
                }
                None => Err(status::NOT_FOUND),
            }
        };
        let mut f = Some(f);
        let mut out = None;
        let mut run = |d: &[u8]| {
            if let Some(f) = f.take() {
                out = Some(f(d));
            }
        };
        let r = match kind {
            HTTP_REQUEST_BODY => of_stream(|s| &s.request_body, &mut run),
            HTTP_RESPONSE_BODY => of_stream(|s| &s.response_body, &mut run),
            DOWNSTREAM_DATA => of_stream(|s| &s.downstream_data, &mut run),
            UPSTREAM_DATA => of_stream(|s| &s.upstream_data, &mut run),
            HTTP_CALL_RESPONSE_BODY => match &self.call.body {
                Some(b) => {
                    run(b);
                    Ok(())
                }
                None => Err(status::NOT_FOUND),
            },
            GRPC_CALL_MESSAGE => match &self.call.grpc_message {
                Some(b) => {
                    run(b);
                    Ok(())
                }
                None => Err(status::NOT_FOUND),
            },
            // Readable at any time (Envoy keeps it for the VM's life); the
            // plugin configuration only while it is being applied.
            VM_CONFIGURATION => {
                run(&self.info.vm_configuration);
                Ok(())
            }
            PLUGIN_CONFIGURATION if self.phase == Phase::Configure => {
                run(&self.info.configuration);
                Ok(())
            }
            PLUGIN_CONFIGURATION => Err(status::NOT_FOUND),
            FOREIGN_FUNCTION_ARGUMENTS => match &self.call.foreign_args {
                Some(b) => {
                    run(b);
                    Ok(())
                }
                None => Err(status::NOT_FOUND),
            },
            _ => Err(status::BAD_ARGUMENT),
        };
        r.and_then(|()| out.ok_or(status::INTERNAL_FAILURE))
    }

    fn with_map<R>(&mut self, kind: i32, f: impl FnOnce(&mut HeaderMap) -> R) -> Result<R, i32> {
        use crate::abi::map::*;
        match kind {
            HTTP_REQUEST_HEADERS..=HTTP_RESPONSE_TRAILERS => {
                let s = self.streams.get(&self.effective).ok_or(status::NOT_FOUND)?;
                let mut s = lock(s);
                Ok(f(match kind {
                    HTTP_REQUEST_HEADERS => &mut s.request_headers,
                    HTTP_REQUEST_TRAILERS => &mut s.request_trailers,
                    HTTP_RESPONSE_HEADERS => &mut s.response_headers,
                    _ => &mut s.response_trailers,
                }))
            }
            GRPC_CALL_INITIAL_METADATA => Ok(f(&mut self.call.grpc_initial)),
            GRPC_CALL_TRAILING_METADATA => Ok(f(&mut self.call.grpc_trailing)),
            HTTP_CALL_RESPONSE_HEADERS => Ok(f(&mut self.call.headers)),
            HTTP_CALL_RESPONSE_TRAILERS => Ok(f(&mut self.call.trailers)),
            _ => Err(status::BAD_ARGUMENT),
        }
    }

    /// A property by its path as the guest sent it (segments separated by
    /// NUL, with or without a trailing one), its bytes appended to `out`;
    /// false when absent. Called several times per callback by Istio's
    /// filters, so the path is borrowed, not split into owned segments
    /// (they are held on the stack), filter-state keys are matched against
    /// it in place ([`dotted_get`]), and the value is copied once, from
    /// where its holder keeps it ([`PropertyProvider::with_property_bytes`]).
    fn property_into(&self, raw: &[u8], out: &mut Vec<u8>) -> bool {
        let text = path_text(raw);
        // A stream context asks its stream's provider first (it knows the
        // connection, the request and possibly a more specific node), then
        // the plugin's; a root context has only the plugin's. The stream
        // lock is released before the providers are asked.
        let mut stream_provider = None;
        if let Some(s) = self.stream() {
            let s = lock(s);
            if let Some(v) = dotted_get(&s.filter_state, &text) {
                out.extend_from_slice(v);
                return true;
            }
            stream_provider = s.provider.clone();
        }
        with_segments(text.split('\0'), |segs| {
            self.answer(&text, segs, stream_provider.as_ref(), &mut |b| {
                out.extend_from_slice(b)
            })
        })
    }

    /// What [`Self::property_into`] answers for a path once the stream's
    /// filter state had nothing, handed to `f`: the root's filter state,
    /// the plugin's names, the stream's provider (taken out of the stream's
    /// lock) and the plugin's; false when none has it. `segs` is `None` for
    /// a path deeper than [`MAX_PATH_SEGMENTS`], which only the filter
    /// states can hold.
    fn answer(
        &self,
        text: &str,
        segs: Option<&[&str]>,
        stream_provider: Option<&Arc<dyn PropertyProvider>>,
        f: &mut dyn FnMut(&[u8]),
    ) -> bool {
        if let Some(v) = dotted_get(&self.root_filter_state, text) {
            f(v);
            return true;
        }
        let name = match text {
            "plugin_name" => Some(&self.info.name),
            "plugin_root_id" => Some(&self.info.root_id),
            "plugin_vm_id" => Some(&self.info.vm_id),
            _ => None,
        };
        if let Some(name) = name {
            f(name.as_bytes());
            return true;
        }
        let Some(segs) = segs else {
            return false;
        };
        stream_provider.is_some_and(|p| p.with_property_bytes(segs, f))
            || self
                .plugin_properties
                .as_ref()
                .is_some_and(|p| p.with_property_bytes(segs, f))
    }

    /// The built-in foreign function [`GET_PROPERTIES`]: the properties
    /// its arguments name, each as [`Self::property_into`] answers it, in one
    /// result (the format: `docs/proxy-wasm-host.md`). `BAD_ARGUMENT` for
    /// arguments that are not a whole list of at most
    /// [`MAX_BATCH_PATHS`] paths.
    fn get_properties(&mut self, g: &mut dyn Guest, a: &[Val]) -> HostResult {
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let listed = match mem::slice(g, arg(a, 2), arg(a, 3)) {
            // A filter sends the same list on every stream: parsed once.
            Ok(args) if args == self.batch.args => {
                self.properties_into(&self.batch, &mut out);
                Ok(())
            }
            Ok(args) => ParsedBatch::parse(args).map(|b| {
                self.properties_into(&b, &mut out);
                // A list of huge paths is not held on to between calls
                // (nor copied to be compared with the next).
                if args.len() <= MAX_CACHED_BATCH {
                    self.batch = ParsedBatch {
                        args: args.to_vec(),
                        ..b
                    };
                }
            }),
            Err(()) => Err(status::INVALID_MEMORY_ACCESS),
        };
        let r = match listed {
            Ok(()) => self.copy_result(g, &out, a),
            Err(s) => st(s),
        };
        self.keep_scratch(out);
        r
    }

    /// A foreign function's result out to the guest's result pointers
    /// (arguments 4 and 5); dropped when either is NULL, as the Istio
    /// metadata-exchange filter passes them.
    fn copy_result(&mut self, g: &mut dyn Guest, data: &[u8], a: &[Val]) -> HostResult {
        let (rp, rs) = (arg(a, 4), arg(a, 5));
        if rp == 0 || rs == 0 {
            return st(status::OK);
        }
        self.copy_out(g, data, rp, rs)
    }

    /// Appends the value (u32 length, bytes) or absence (`u32::MAX`) of
    /// each of `batch`'s paths to `out`, each as [`Self::property_into`]
    /// answers it, with the stream locked once for all of them.
    fn properties_into(&self, batch: &ParsedBatch, out: &mut Vec<u8>) {
        let mut stream_provider = None;
        // The stream's filter state answers first; values it holds are
        // few and rare in a batch, so kept aside by index.
        let mut from_state = Vec::new();
        if let Some(s) = self.stream() {
            let s = lock(s);
            if !s.filter_state.is_empty() {
                for (i, p) in batch.paths.iter().enumerate() {
                    if let Some(v) = dotted_get(&s.filter_state, &p.text) {
                        from_state.push((i, v.clone()));
                    }
                }
            }
            stream_provider = s.provider.clone();
        }
        for (i, p) in batch.paths.iter().enumerate() {
            // A value too long for its length word counts as absent.
            let mut written = false;
            let mut put = |b: &[u8]| match u32::try_from(b.len()) {
                Ok(len) if len != u32::MAX && !written => {
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(b);
                    written = true;
                }
                _ => {}
            };
            match from_state.iter().position(|(at, _)| *at == i) {
                Some(k) => put(&from_state.swap_remove(k).1),
                None => {
                    let provider = stream_provider.as_ref();
                    match &p.segs {
                        Some(segs) => with_segments(segs.iter().map(String::as_str), |segs| {
                            self.answer(&p.text, segs, provider, &mut put)
                        }),
                        None => self.answer(&p.text, None, provider, &mut put),
                    };
                }
            }
            if !written {
                out.extend_from_slice(&u32::MAX.to_le_bytes());
            }
        }
    }

    /// Puts a buffer taken from [`Self::scratch`] back for the next call,
    /// unless one large value made it large: that memory is not kept.
    fn keep_scratch(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= MAX_KEPT_SCRATCH {
            self.scratch = buf;
        }
    }

    fn next_token(&mut self, kind: u32) -> u32 {
        // 30 bits of sequence; the low two carry the kind. Zero is skipped
        // on wrap-around so a token is never 0.
        let n = NEXT_CALLOUT.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff;
        (n.max(1) << 2) | kind
    }
}

/// A property path as text: without a trailing NUL, and valid UTF-8 (paths
/// are ASCII in practice: the strict check is the fast one).
fn path_text(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    match std::str::from_utf8(raw) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(raw),
    }
}

/// The most segments a path a provider is asked about can have; deeper
/// paths (no provider has any: Envoy's attributes go six deep) are
/// answered from the filter states only, so that a path of a million
/// NULs costs no per-segment memory.
const MAX_PATH_SEGMENTS: usize = 16;

/// Runs `f` over a path's segments, held on the stack; `None` past
/// [`MAX_PATH_SEGMENTS`].
fn with_segments<'s, R>(
    segs: impl Iterator<Item = &'s str>,
    f: impl FnOnce(Option<&[&str]>) -> R,
) -> R {
    let mut held = [""; MAX_PATH_SEGMENTS];
    let mut n = 0;
    for seg in segs {
        if n == held.len() {
            return f(None);
        }
        held[n] = seg;
        n += 1;
    }
    f(Some(&held[..n]))
}

/// The largest [`AbiHost::scratch`] buffer kept between host calls.
const MAX_KEPT_SCRATCH: usize = 64 * 1024;

/// The longest [`GET_PROPERTIES`] argument list kept parsed between calls.
const MAX_CACHED_BATCH: usize = 16 * 1024;

/// The paths of the last [`GET_PROPERTIES`] call, as its arguments named
/// them and parsed: each path's text and segments, so that the same list
/// again (a filter sends one list per stream) is not checked and split
/// again.
#[derive(Default)]
struct ParsedBatch {
    args: Vec<u8>,
    paths: Vec<ParsedPath>,
}

/// One path of a [`ParsedBatch`].
struct ParsedPath {
    /// As [`path_text`] gives it: NUL-separated, for the filter state.
    text: String,
    /// `None` past [`MAX_PATH_SEGMENTS`].
    segs: Option<Vec<String>>,
}

impl ParsedBatch {
    /// The length-prefixed paths of `args`; `BAD_ARGUMENT` for arguments
    /// that are not a whole list of at most [`MAX_BATCH_PATHS`] paths.
    /// `args` itself is not kept (the caller keeps it for a list worth
    /// caching).
    fn parse(args: &[u8]) -> Result<Self, i32> {
        let mut paths = Vec::new();
        let mut rest = args;
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<4>().ok_or(status::BAD_ARGUMENT)?;
            let len = u32::from_le_bytes(*len) as usize;
            if paths.len() == MAX_BATCH_PATHS || len > tail.len() {
                return Err(status::BAD_ARGUMENT);
            }
            let (path, tail) = tail.split_at(len);
            rest = tail;
            let text = path_text(path).into_owned();
            let deep = text.split('\0').nth(MAX_PATH_SEGMENTS).is_some();
            let segs = (!deep).then(|| text.split('\0').map(str::to_owned).collect());
            paths.push(ParsedPath { text, segs });
        }
        Ok(Self {
            args: Vec::new(),
            paths,
        })
    }
}

/// A filter-state value by a property path whose segments are NUL-separated
/// (`filter_state` keys are the dotted form, as `proxy_set_property` stored
/// them). The few keys a stream has are compared in place, NUL matching
/// `.`, rather than hashed after building the dotted key: this runs on
/// every property read once a filter has set one.
fn dotted_get<'a>(map: &'a HashMap<String, Vec<u8>>, path: &str) -> Option<&'a Vec<u8>> {
    if map.is_empty() {
        return None;
    }
    if !path.contains('\0') {
        return map.get(path);
    }
    if map.len() > 8 {
        return map.get(path.replace('\0', ".").as_str());
    }
    let path = path.as_bytes();
    map.iter()
        .find(|(k, _)| {
            k.len() == path.len()
                && k.bytes()
                    .zip(path)
                    .all(|(a, &b)| if b == 0 { a == b'.' } else { a == b })
        })
        .map(|(_, v)| v)
}

/// Hashes context ids (small sequential integers) with one multiplication
/// (Fibonacci hashing) instead of SipHash: the stream of the effective
/// context is looked up on every host call.
#[derive(Default, Clone, Copy)]
pub(crate) struct ContextIds;

impl std::hash::BuildHasher for ContextIds {
    type Hasher = ContextIdHasher;
    fn build_hasher(&self) -> ContextIdHasher {
        ContextIdHasher(0)
    }
}

/// The hasher of [`ContextIds`].
pub(crate) struct ContextIdHasher(u64);

impl std::hash::Hasher for ContextIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The registry id and the kind carried in the low two bits of an ABI id.
fn metric_id(id: i32) -> Result<(MetricId, MetricKind), i32> {
    let id = id as u32;
    let kind = match id & 3 {
        0 => MetricKind::Counter,
        1 => MetricKind::Gauge,
        2 => MetricKind::Histogram,
        _ => return Err(status::NOT_FOUND),
    };
    Ok((MetricId((id >> 2) as usize), kind))
}

fn metric_status(e: MetricError) -> i32 {
    match e {
        MetricError::NotFound => status::NOT_FOUND,
        MetricError::WrongKind => status::BAD_ARGUMENT,
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Most bytes one `fd_write` gathers into a log line.
pub(crate) const MAX_FD_WRITE_BYTES: usize = 64 * 1024;
/// Most iovecs one `fd_write` reads (POSIX's `IOV_MAX`).
pub(crate) const MAX_FD_WRITE_IOVECS: u32 = 1024;

/// `fd_write` / `fd_pwrite`: fd 1 logs at info, fd 2 at error.
///
/// The gathering is capped at [`MAX_FD_WRITE_BYTES`] and
/// [`MAX_FD_WRITE_IOVECS`]: past that the write is short (the count written
/// back says how much was taken), which wasi-libc and Rust's std handle by
/// writing the rest again. Without the cap a module can name the same
/// megabyte in hundreds of thousands of iovecs and make the host allocate
/// without bound.
fn fd_write(
    g: &mut dyn Guest,
    args: &[Val],
    written_arg: usize,
    log: impl FnOnce(LogLevel, String),
) -> HostResult {
    let fd = arg(args, 0);
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return st(errno::BADF),
    };
    let (iovs, n) = (arg(args, 1), arg(args, 2) as u32);
    let mut out = Vec::new();
    for i in 0..n.min(MAX_FD_WRITE_IOVECS) {
        let room = MAX_FD_WRITE_BYTES - out.len();
        if room == 0 {
            break;
        }
        let at = (iovs as u32).wrapping_add(i.wrapping_mul(8)) as i32;
        let ptr = try_wasi!(mem::read_u32(g, at));
        let len = try_wasi!(mem::read_u32(g, at.wrapping_add(4)));
        let data = try_wasi!(mem::slice(g, ptr as i32, len as i32));
        out.extend_from_slice(&data[..data.len().min(room)]);
    }
    let written = out.len() as u32;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if text.ends_with('\n') {
        text.pop();
    }
    log(level, text);
    try_wasi!(mem::write_u32(g, arg(args, written_arg), written));
    st(errno::SUCCESS)
}

fn clock_time_get(g: &mut dyn Guest, args: &[Val], base: Instant) -> HostResult {
    let t = match arg(args, 0) {
        0 => now_nanos(),
        1 => base.elapsed().as_nanos() as u64 + 1,
        _ => return st(errno::NOTSUP),
    };
    try_wasi!(mem::write_u64(g, arg(args, 2), t));
    st(errno::SUCCESS)
}

impl HostHandler for AbiHost {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn call(&mut self, id: u32, g: &mut dyn Guest, a: &[Val]) -> HostResult {
        let Some(f) = HostFn::from_id(id) else {
            return Err(Trap::host(format!("unknown host function id {id}")));
        };
        match f {
            HostFn::Log => {
                let Some(level) = LogLevel::from_i32(arg(a, 0)) else {
                    return st(status::BAD_ARGUMENT);
                };
                let msg = try_mem!(mem::read_str(g, arg(a, 1), arg(a, 2)));
                self.log(level, msg);
                st(status::OK)
            }
            HostFn::GetLogLevel => {
                let level = self.env.logs.level() as u32;
                try_mem!(mem::write_u32(g, arg(a, 0), level));
                st(status::OK)
            }
            HostFn::GetCurrentTimeNanoseconds => {
                try_mem!(mem::write_u64(g, arg(a, 0), now_nanos()));
                st(status::OK)
            }
            HostFn::SetTickPeriodMilliseconds => {
                // From a stream context it applies to its root, as in Envoy.
                self.tick_period_ms = arg(a, 0) as u32;
                st(status::OK)
            }
            HostFn::GetConfiguration => {
                let data = match self.phase {
                    Phase::VmStart => self.info.vm_configuration.clone(),
                    _ => self.info.configuration.clone(),
                };
                self.copy_out(g, &data, arg(a, 0), arg(a, 1))
            }
            HostFn::GetBufferBytes => {
                let kind = arg(a, 0);
                let (start, max) = (arg(a, 1) as u32 as usize, arg(a, 2) as u32 as usize);
                let Some(end) = start.checked_add(max) else {
                    return match self.with_buffer(kind, |_| ()) {
                        Ok(()) => st(status::BAD_ARGUMENT),
                        Err(s) => st(s),
                    };
                };
                let range = |d: &[u8]| start.min(d.len())..end.min(d.len());
                let len = match self.with_buffer(kind, |d| range(d).len()) {
                    Ok(n) => n,
                    Err(s) => return st(s),
                };
                if len == 0 {
                    try_mem!(mem::write_u32(g, arg(a, 3), 0));
                    try_mem!(mem::write_u32(g, arg(a, 4), 0));
                    return st(status::OK);
                }
                // Only the requested range is copied, straight from where the
                // buffer lives into memory the guest allocated.
                let ptr = try_mem!(self.guest_alloc_len(g, len)?);
                let copied = self.with_buffer(kind, |d| {
                    let r = range(d);
                    let n = r.len().min(len);
                    mem::write(g, ptr, &d[r.start..r.start + n]).map(|()| n)
                });
                let n = match copied {
                    Ok(Ok(n)) => n,
                    Ok(Err(())) => return st(status::INVALID_MEMORY_ACCESS),
                    Err(s) => return st(s),
                };
                try_mem!(mem::write_u32(g, arg(a, 3), ptr as u32));
                try_mem!(mem::write_u32(g, arg(a, 4), n as u32));
                st(status::OK)
            }
            HostFn::GetBufferStatus => {
                let len = match self.with_buffer(arg(a, 0), <[u8]>::len) {
                    Ok(n) => n,
                    Err(s) => return st(s),
                };
                try_mem!(mem::write_u32(g, arg(a, 1), len as u32));
                try_mem!(mem::write_u32(g, arg(a, 2), 0));
                st(status::OK)
            }
            HostFn::SetBufferBytes => {
                use crate::abi::buffer::*;
                let value = try_mem!(mem::read(g, arg(a, 3), arg(a, 4)));
                let (start, size) = (arg(a, 1) as u32 as usize, arg(a, 2) as u32 as usize);
                let kind = arg(a, 0);
                if !(HTTP_REQUEST_BODY..=UPSTREAM_DATA).contains(&kind) {
                    return st(if (0..=FOREIGN_FUNCTION_ARGUMENTS).contains(&kind) {
                        status::NOT_FOUND
                    } else {
                        status::BAD_ARGUMENT
                    });
                }
                let Some(s) = self.stream() else {
                    return st(status::NOT_FOUND);
                };
                let mut s = lock(s);
                let buf = match kind {
                    HTTP_REQUEST_BODY => &mut s.request_body,
                    HTTP_RESPONSE_BODY => &mut s.response_body,
                    DOWNSTREAM_DATA => &mut s.downstream_data,
                    _ => &mut s.upstream_data,
                };
                if start == 0 {
                    let drain = size.min(buf.len());
                    buf.splice(0..drain, value);
                } else if start >= buf.len() {
                    buf.extend_from_slice(&value);
                } else {
                    return st(status::BAD_ARGUMENT);
                }
                st(status::OK)
            }
            // Envoy's `byteSize()`: the bytes of every name and value.
            HostFn::GetHeaderMapSize => match self.with_map(arg(a, 0), |m| m.byte_size()) {
                Ok(n) => {
                    try_mem!(mem::write_u32(g, arg(a, 1), n as u32));
                    st(status::OK)
                }
                Err(s) => st(s),
            },
            HostFn::GetHeaderMapPairs => match self.with_map(arg(a, 0), |m| m.serialize()) {
                Ok(data) => self.copy_out(g, &data, arg(a, 1), arg(a, 2)),
                Err(s) => st(s),
            },
            HostFn::SetHeaderMapPairs => {
                let raw = try_mem!(mem::read(g, arg(a, 1), arg(a, 2)));
                let Some(pairs) = crate::pairs::decode(&raw) else {
                    return st(status::BAD_ARGUMENT);
                };
                match self.with_map(arg(a, 0), |m| m.set_all(pairs)) {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            // The header calls borrow names and values where they are in
            // the guest's memory (the maps live in the stream's state, not
            // there), and a value read goes out through one reused buffer.
            HostFn::GetHeaderMapValue => {
                let mut out = std::mem::take(&mut self.scratch);
                out.clear();
                let found = {
                    let key = try_mem!(mem::slice(g, arg(a, 1), arg(a, 2)));
                    self.with_map(arg(a, 0), |m| {
                        m.get(key).map(|v| out.extend_from_slice(v)).is_some()
                    })
                };
                let r = match found {
                    Ok(true) => self.copy_out(g, &out, arg(a, 3), arg(a, 4)),
                    Ok(false) if self.abi == AbiVersion::V0_1_0 => {
                        self.copy_out(g, &[], arg(a, 3), arg(a, 4))
                    }
                    Ok(false) => st(status::NOT_FOUND),
                    Err(s) => st(s),
                };
                self.keep_scratch(out);
                r
            }
            HostFn::AddHeaderMapValue | HostFn::ReplaceHeaderMapValue => {
                let m = g.memory();
                let key = try_mem!(mem::at(m, arg(a, 1), arg(a, 2)));
                let value = try_mem!(mem::at(m, arg(a, 3), arg(a, 4)));
                let replace = f == HostFn::ReplaceHeaderMapValue;
                match self.with_map(arg(a, 0), |m| {
                    if replace {
                        m.replace(key, value)
                    } else {
                        m.add(key, value)
                    }
                }) {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            HostFn::RemoveHeaderMapValue => {
                let key = try_mem!(mem::slice(g, arg(a, 1), arg(a, 2)));
                match self.with_map(arg(a, 0), |m| m.remove(key)) {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            HostFn::GetProperty => {
                // The path is read where it is in the guest's memory; the
                // value found is the host's own, so the borrow ends before
                // the copy out.
                let (found, value) = {
                    let path = try_mem!(mem::slice(g, arg(a, 0), arg(a, 1)));
                    // Taken once the path is known good: a bad pointer
                    // leaves the kept buffer where it is.
                    let mut value = std::mem::take(&mut self.scratch);
                    value.clear();
                    (self.property_into(path, &mut value), value)
                };
                let r = if found {
                    self.copy_out(g, &value, arg(a, 2), arg(a, 3))
                } else {
                    st(status::NOT_FOUND)
                };
                self.keep_scratch(value);
                r
            }
            HostFn::SetProperty => {
                let path = try_mem!(mem::read(g, arg(a, 0), arg(a, 1)));
                let value = try_mem!(mem::read(g, arg(a, 2), arg(a, 3)));
                // The dotted key without splitting the path: a hostile
                // path of NULs costs no memory per segment.
                let key = path_text(&path).replace('\0', ".");
                match self.stream() {
                    Some(s) => {
                        lock(s).filter_state.insert(key, value);
                    }
                    None => {
                        self.root_filter_state.insert(key, value);
                    }
                }
                st(status::OK)
            }
            HostFn::GetStatus => {
                let Some((code, msg)) = self.call.status.clone() else {
                    return st(status::NOT_FOUND);
                };
                try_mem!(mem::write_u32(g, arg(a, 0), code));
                self.copy_out(g, msg.as_bytes(), arg(a, 1), arg(a, 2))
            }
            HostFn::SendLocalResponse => {
                let details = try_mem!(mem::read_str(g, arg(a, 1), arg(a, 2)));
                let body = try_mem!(mem::read(g, arg(a, 3), arg(a, 4)));
                let raw = try_mem!(mem::read(g, arg(a, 5), arg(a, 6)));
                let Some(pairs) = crate::pairs::decode(&raw) else {
                    return st(status::BAD_ARGUMENT);
                };
                let grpc = arg(a, 7);
                let Some(s) = self.stream() else {
                    return st(status::NOT_FOUND);
                };
                let mut headers = HeaderMap::new();
                headers.set_all(pairs);
                lock(s).local_response = Some(LocalResponse {
                    status: arg(a, 0) as u32,
                    details,
                    body,
                    headers,
                    grpc_status: (grpc >= 0).then_some(grpc),
                });
                self.stop_iteration = true;
                st(status::OK)
            }
            HostFn::ContinueRequest
            | HostFn::ContinueResponse
            | HostFn::ContinueStream
            | HostFn::CloseStream => {
                let kind = match f {
                    HostFn::ContinueRequest => crate::abi::stream::HTTP_REQUEST,
                    HostFn::ContinueResponse => crate::abi::stream::HTTP_RESPONSE,
                    _ => arg(a, 0),
                };
                if !(0..=3).contains(&kind) {
                    return st(status::BAD_ARGUMENT);
                }
                // Envoy cannot pause (so cannot continue) upstream reads.
                if f == HostFn::ContinueStream && kind == crate::abi::stream::UPSTREAM {
                    return st(status::UNIMPLEMENTED);
                }
                let Some(s) = self.stream() else {
                    return st(status::NOT_FOUND);
                };
                let mut s = lock(s);
                if f == HostFn::CloseStream {
                    s.closed.push(kind)
                } else {
                    s.continued.push(kind)
                }
                st(status::OK)
            }
            HostFn::ClearRouteCache => st(status::OK),
            HostFn::HttpCall => {
                let upstream = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                let h = try_mem!(mem::read(g, arg(a, 2), arg(a, 3)));
                let body = try_mem!(mem::read(g, arg(a, 4), arg(a, 5)));
                let t = try_mem!(mem::read(g, arg(a, 6), arg(a, 7)));
                let (Some(h), Some(t)) = (crate::pairs::decode(&h), crate::pairs::decode(&t))
                else {
                    return st(status::BAD_ARGUMENT);
                };
                let mut headers = HeaderMap::new();
                headers.set_all(h);
                let mut trailers = HeaderMap::new();
                trailers.set_all(t);
                let token = self.next_token(0);
                try_mem!(mem::write_u32(g, arg(a, 9), token));
                let call = HttpCallout {
                    upstream,
                    headers,
                    body,
                    trailers,
                    timeout_ms: arg(a, 8) as u32,
                };
                match self.env.callouts.http_call(&self.info.name, token, call) {
                    Ok(()) => {
                        self.callouts.insert(token);
                        st(status::OK)
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::GrpcCall | HostFn::GrpcStream => {
                let upstream = try_mem!(mem::read(g, arg(a, 0), arg(a, 1)));
                let service = try_mem!(mem::read_str(g, arg(a, 2), arg(a, 3)));
                let method = try_mem!(mem::read_str(g, arg(a, 4), arg(a, 5)));
                let md = try_mem!(mem::read(g, arg(a, 6), arg(a, 7)));
                let Some(md) = crate::pairs::decode(&md) else {
                    return st(status::BAD_ARGUMENT);
                };
                let mut metadata = HeaderMap::new();
                metadata.set_all(md);
                let stream = f == HostFn::GrpcStream;
                let (message, timeout_ms, token_ptr) = if stream {
                    (Vec::new(), 0, arg(a, 8))
                } else {
                    (
                        try_mem!(mem::read(g, arg(a, 8), arg(a, 9))),
                        arg(a, 10) as u32,
                        arg(a, 11),
                    )
                };
                let token = self.next_token(if stream { 2 } else { 1 });
                try_mem!(mem::write_u32(g, token_ptr, token));
                let call = GrpcCallout {
                    upstream,
                    service,
                    method,
                    metadata,
                    message,
                    timeout_ms,
                };
                match self
                    .env
                    .callouts
                    .grpc_call(&self.info.name, token, call, stream)
                {
                    Ok(()) => {
                        self.callouts.insert(token);
                        st(status::OK)
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::GrpcSend => {
                let msg = try_mem!(mem::read(g, arg(a, 1), arg(a, 2)));
                match self
                    .env
                    .callouts
                    .grpc_send(arg(a, 0) as u32, &msg, arg(a, 3) != 0)
                {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            HostFn::GrpcCancel => {
                let token = arg(a, 0) as u32;
                if !self.callouts.contains(&token) {
                    return st(status::NOT_FOUND);
                }
                match self.env.callouts.grpc_cancel(token) {
                    Ok(()) => {
                        // A cancelled call gets no more callbacks.
                        self.callouts.remove(&token);
                        st(status::OK)
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::GrpcClose => {
                // Half-closes the local side; the answer (and on_grpc_close)
                // still arrives, so the token stays pending.
                let token = arg(a, 0) as u32;
                if !self.callouts.contains(&token) {
                    return st(status::NOT_FOUND);
                }
                match self.env.callouts.grpc_close(token) {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            HostFn::SetSharedData => {
                let key = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                let value = try_mem!(mem::read(g, arg(a, 2), arg(a, 3)));
                match self
                    .env
                    .shared
                    .set(&self.info.vm_id, &key, &value, arg(a, 4) as u32)
                {
                    Ok(()) => st(status::OK),
                    Err(s) => st(s),
                }
            }
            HostFn::GetSharedData => {
                let key = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                match self.env.shared.get(&self.info.vm_id, &key) {
                    Ok((value, cas)) => {
                        try_mem!(mem::write_u32(g, arg(a, 4), cas));
                        self.copy_out(g, &value, arg(a, 2), arg(a, 3))
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::RegisterSharedQueue => {
                let name = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                let token = self.env.shared.register_queue(
                    &self.info.vm_id,
                    &name,
                    (self.vm_key, self.root_id),
                );
                try_mem!(mem::write_u32(g, arg(a, 2), token));
                st(status::OK)
            }
            HostFn::ResolveSharedQueue => {
                let mut vm_id = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                let name = try_mem!(mem::read_str(g, arg(a, 2), arg(a, 3)));
                if vm_id.is_empty() {
                    vm_id = self.info.vm_id.clone();
                }
                match self.env.shared.resolve_queue(&vm_id, &name) {
                    Ok(token) => {
                        try_mem!(mem::write_u32(g, arg(a, 4), token));
                        st(status::OK)
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::EnqueueSharedQueue => {
                let value = try_mem!(mem::read(g, arg(a, 1), arg(a, 2)));
                let token = arg(a, 0) as u32;
                match self.env.shared.enqueue(token, &value) {
                    Ok(owner) => {
                        self.env.shared.notify(owner, token);
                        st(status::OK)
                    }
                    Err(s) => st(s),
                }
            }
            HostFn::DequeueSharedQueue => match self.env.shared.dequeue(arg(a, 0) as u32) {
                Ok(v) => self.copy_out(g, &v, arg(a, 1), arg(a, 2)),
                Err(s) => st(s),
            },
            HostFn::DefineMetric => {
                let kind = match arg(a, 0) {
                    0 => MetricKind::Counter,
                    1 => MetricKind::Gauge,
                    2 => MetricKind::Histogram,
                    _ => return st(status::BAD_ARGUMENT),
                };
                let name = try_mem!(mem::read_str(g, arg(a, 1), arg(a, 2)));
                let id = self.env.metrics.define(kind, &name);
                let Ok(index) = u32::try_from(id.0) else {
                    return st(status::INTERNAL_FAILURE);
                };
                try_mem!(mem::write_u32(
                    g,
                    arg(a, 3),
                    (index << 2) | arg(a, 0) as u32
                ));
                st(status::OK)
            }
            HostFn::RecordMetric | HostFn::IncrementMetric | HostFn::GetMetric => {
                let (id, kind) = match metric_id(arg(a, 0)) {
                    Ok(v) => v,
                    Err(s) => return st(s),
                };
                let v = arg64(a, 1);
                // As Envoy: record adds to a counter, sets a gauge, records a
                // histogram sample; a counter only grows, by a positive
                // increment; a histogram has no value to increment or read.
                let op = match (f, kind) {
                    (HostFn::RecordMetric, MetricKind::Counter) => MetricOp::Add(v),
                    (HostFn::RecordMetric, MetricKind::Gauge) => MetricOp::Set(v),
                    (HostFn::RecordMetric, MetricKind::Histogram) => MetricOp::Record(v as u64),
                    (HostFn::IncrementMetric, MetricKind::Counter) if v > 0 => MetricOp::Add(v),
                    (HostFn::IncrementMetric, MetricKind::Gauge) => MetricOp::Add(v),
                    (HostFn::GetMetric, MetricKind::Counter | MetricKind::Gauge) => MetricOp::Get,
                    _ => return st(status::BAD_ARGUMENT),
                };
                match self.env.metrics.update(id, kind, op) {
                    Ok(value) => {
                        if f == HostFn::GetMetric {
                            try_mem!(mem::write_u64(g, arg(a, 1), value as u64));
                        }
                        st(status::OK)
                    }
                    Err(e) => st(metric_status(e)),
                }
            }
            HostFn::SetEffectiveContext => {
                let id = arg(a, 0) as u32;
                if id == self.root_id || self.streams.contains_key(&id) {
                    self.effective = id;
                    st(status::OK)
                } else {
                    st(status::BAD_ARGUMENT)
                }
            }
            HostFn::Done => {
                // As Envoy: only a root context whose `proxy_on_done`
                // returned false may say it is done.
                if self.pending_done && !self.done_called {
                    self.done_called = true;
                    st(status::OK)
                } else {
                    st(status::NOT_FOUND)
                }
            }
            HostFn::CallForeignFunction => {
                let builtin = try_mem!(mem::slice(g, arg(a, 0), arg(a, 1)))
                    == GET_PROPERTIES.as_bytes()
                    && !self.env.foreign.contains_key(GET_PROPERTIES);
                if builtin {
                    return self.get_properties(g, a);
                }
                let name = try_mem!(mem::read_str(g, arg(a, 0), arg(a, 1)));
                let args = try_mem!(mem::read(g, arg(a, 2), arg(a, 3)));
                let Some(func) = self.env.foreign.get(&name).cloned() else {
                    return st(status::NOT_FOUND);
                };
                match func(&args) {
                    Ok(result) => self.copy_result(g, &result, a),
                    Err(s) => st(s),
                }
            }
            HostFn::EmscriptenNotifyMemoryGrowth => Ok(None),
            HostFn::PthreadEqual => st(i32::from(arg(a, 0) == arg(a, 1))),
            _ => wasi_call(f, g, a, &self.env, self.monotonic_base, |level, msg| {
                self.log(level, msg)
            }),
        }
    }
}

/// The WASI subset, shared by the full and the restricted handler.
fn wasi_call(
    f: HostFn,
    g: &mut dyn Guest,
    a: &[Val],
    env: &HostEnv,
    base: Instant,
    log: impl FnOnce(LogLevel, String),
) -> HostResult {
    match f {
        HostFn::FdWrite => fd_write(g, a, 3, log),
        HostFn::FdPwrite => fd_write(g, a, 4, log),
        HostFn::FdRead | HostFn::FdPread | HostFn::FdPrestatDirName | HostFn::FdFdstatSetFlags => {
            st(errno::NOSYS)
        }
        HostFn::FdClose | HostFn::FdSeek | HostFn::SchedYield => st(errno::SUCCESS),
        HostFn::FdTell => {
            try_wasi!(mem::write_u64(g, arg(a, 1), 0));
            st(errno::SUCCESS)
        }
        HostFn::FdSync | HostFn::FdDatasync => st(if matches!(arg(a, 0), 1 | 2) {
            errno::SUCCESS
        } else {
            errno::BADF
        }),
        HostFn::FdFdstatGet => {
            if !matches!(arg(a, 0), 1 | 2) {
                return st(errno::BADF);
            }
            // filetype u8 (2 = character device), flags u16, rights base u64
            // (FD_WRITE = 64), rights inheriting u64: 24 bytes.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            stat[8..16].copy_from_slice(&64u64.to_le_bytes());
            try_wasi!(mem::write(g, arg(a, 1), &stat));
            st(errno::SUCCESS)
        }
        HostFn::FdFilestatGet | HostFn::FdPrestatGet => st(errno::BADF),
        HostFn::FdReaddir => st(errno::NOTDIR),
        HostFn::FdRenumber | HostFn::PathFilestatGet => st(errno::NOTSUP),
        HostFn::PathOpen => st(errno::NOENT),
        HostFn::EnvironSizesGet => {
            let size: usize = env
                .env_vars
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum();
            try_wasi!(mem::write_u32(g, arg(a, 0), env.env_vars.len() as u32));
            try_wasi!(mem::write_u32(g, arg(a, 1), size as u32));
            st(errno::SUCCESS)
        }
        HostFn::EnvironGet => {
            let (mut array, mut buf) = (arg(a, 0), arg(a, 1));
            for (k, v) in env.env_vars.iter() {
                let entry = format!("{k}={v}\0");
                try_wasi!(mem::write_u32(g, array, buf as u32));
                try_wasi!(mem::write(g, buf, entry.as_bytes()));
                array = array.wrapping_add(4);
                buf = buf.wrapping_add(entry.len() as i32);
            }
            st(errno::SUCCESS)
        }
        HostFn::ArgsSizesGet => {
            try_wasi!(mem::write_u32(g, arg(a, 0), 0));
            try_wasi!(mem::write_u32(g, arg(a, 1), 0));
            st(errno::SUCCESS)
        }
        HostFn::ArgsGet => st(errno::SUCCESS),
        HostFn::ClockTimeGet => clock_time_get(g, a, base),
        HostFn::ClockResGet => {
            if !matches!(arg(a, 0), 0 | 1) {
                return st(errno::NOTSUP);
            }
            try_wasi!(mem::write_u64(g, arg(a, 1), 1));
            st(errno::SUCCESS)
        }
        HostFn::RandomGet => {
            let len = arg(a, 1) as u32 as usize;
            if len > 64 * 1024 {
                return st(errno::INVAL);
            }
            let mut bytes = vec![0u8; len];
            rand::fill(&mut bytes[..]);
            try_wasi!(mem::write(g, arg(a, 0), &bytes));
            st(errno::SUCCESS)
        }
        HostFn::ProcExit => Err(Trap::host(format!(
            "proc_exit({}) called: a filter may not exit the host",
            arg(a, 0)
        ))),
        HostFn::PollOneoff => {
            try_wasi!(mem::write_u32(g, arg(a, 3), 0));
            st(errno::SUCCESS)
        }
        other => Err(Trap::host(format!(
            "host function {} is not available here",
            other.spec().1
        ))),
    }
}

/// Serves host calls made while the host is already inside one (the guest
/// allocator called from a copy-out): only logging, `fd_write`, clocks and
/// `poll_oneoff` are allowed, as in Envoy's host; anything else traps.
pub(crate) struct RestrictedHost {
    pub info: Arc<PluginInfo>,
    pub env: HostEnv,
    pub base: Instant,
}

impl HostHandler for RestrictedHost {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn call(&mut self, id: u32, g: &mut dyn Guest, a: &[Val]) -> HostResult {
        let Some(f) = HostFn::from_id(id) else {
            return Err(Trap::host(format!("unknown host function id {id}")));
        };
        if !crate::abi::allowed_in_allocator(f) {
            return Err(Trap::host(format!(
                "restricted_callback: {} may not be called from the guest allocator",
                f.spec().1
            )));
        }
        let (env, info) = (&self.env, &self.info);
        let log = |level, message| {
            env.logs.log(LogRecord {
                level,
                plugin: info.name.clone(),
                message,
            })
        };
        if f == HostFn::Log {
            let Some(level) = LogLevel::from_i32(arg(a, 0)) else {
                return st(status::BAD_ARGUMENT);
            };
            let msg = try_mem!(mem::read_str(g, arg(a, 1), arg(a, 2)));
            log(level, msg);
            return st(status::OK);
        }
        wasi_call(f, g, a, env, self.base, log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(keys: &[&str]) -> HashMap<String, Vec<u8>> {
        keys.iter()
            .map(|k| (k.to_string(), k.as_bytes().to_vec()))
            .collect()
    }

    fn list(paths: &[&[u8]]) -> Vec<u8> {
        let mut args = Vec::new();
        for p in paths {
            args.extend_from_slice(&(p.len() as u32).to_le_bytes());
            args.extend_from_slice(p);
        }
        args
    }

    /// A batch read's list is split into each path's text (a trailing NUL
    /// dropped) and segments, kept with the bytes it came from; a list cut
    /// short or longer than the limit is refused.
    #[test]
    fn batch_paths_parse_and_bad_lists_are_refused() {
        let args = list(&[b"upstream_peer", b"node\0metadata\0WORKLOAD_NAME\0", b""]);
        let b = ParsedBatch::parse(&args).unwrap();
        let texts: Vec<&str> = b.paths.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(
            texts,
            ["upstream_peer", "node\0metadata\0WORKLOAD_NAME", ""]
        );
        assert_eq!(
            b.paths[1].segs.as_deref(),
            Some(&["node", "metadata", "WORKLOAD_NAME"].map(String::from)[..])
        );
        assert_eq!(b.paths[2].segs.as_deref(), Some(&[String::new()][..]));
        // Deeper than any provider's paths: text only (the filter states).
        let mut deep = vec![0u8; MAX_PATH_SEGMENTS];
        deep.push(b'x');
        let b = ParsedBatch::parse(&list(&[&deep, &deep[1..]])).unwrap();
        assert_eq!(b.paths[0].segs, None);
        assert_eq!(
            b.paths[1].segs.as_ref().map(Vec::len),
            Some(MAX_PATH_SEGMENTS)
        );

        // The empty last path's length word cut short.
        assert_eq!(
            ParsedBatch::parse(&args[..args.len() - 1]).err(),
            Some(status::BAD_ARGUMENT)
        );
        let mut cut = list(&[b"request\0host"]);
        cut.truncate(cut.len() - 1);
        assert_eq!(ParsedBatch::parse(&cut).err(), Some(status::BAD_ARGUMENT));
        assert_eq!(
            ParsedBatch::parse(&[1, 0]).err(),
            Some(status::BAD_ARGUMENT)
        );

        let paths: Vec<&[u8]> = vec![b"x"; MAX_BATCH_PATHS + 1];
        assert_eq!(
            ParsedBatch::parse(&list(&paths[..MAX_BATCH_PATHS]))
                .unwrap()
                .paths
                .len(),
            MAX_BATCH_PATHS
        );
        assert_eq!(
            ParsedBatch::parse(&list(&paths)).err(),
            Some(status::BAD_ARGUMENT)
        );
    }

    /// A NUL-separated path finds the dotted key it names, as the
    /// dotted key built from it did, with few keys (compared in place)
    /// and with many (hashed).
    #[test]
    fn dotted_get_matches_the_dotted_key() {
        let mut many = vec![
            "upstream_peer",
            "filter_state.envoy.filters.http.grpc_stats",
        ];
        let extra: Vec<String> = (0..10).map(|i| format!("k{i}.x")).collect();
        for map in [state(&many), {
            many.extend(extra.iter().map(String::as_str));
            state(&many)
        }] {
            let get = |p: &str| dotted_get(&map, p).map(|v| String::from_utf8(v.clone()).unwrap());
            assert_eq!(get("upstream_peer").as_deref(), Some("upstream_peer"));
            let grpc = Some("filter_state.envoy.filters.http.grpc_stats");
            assert_eq!(
                get("filter_state\0envoy.filters.http.grpc_stats").as_deref(),
                grpc
            );
            assert_eq!(
                get("filter_state.envoy.filters.http.grpc_stats").as_deref(),
                grpc
            );
            assert_eq!(
                get("filter_state\0envoy\0filters\0http\0grpc_stats").as_deref(),
                grpc
            );
            assert_eq!(get("filter_state\0envoy.filters.http"), None);
            assert_eq!(get("upstream\0peer"), None);
            assert_eq!(get("upstream_pee"), None);
        }
        assert_eq!(dotted_get(&HashMap::new(), "a\0b"), None);
    }

    /// Context ids spread over the table: a thousand sequential ids all
    /// found, none confused.
    #[test]
    fn context_id_hash_keeps_ids_apart() {
        let mut m: HashMap<u32, u32, ContextIds> = HashMap::default();
        for id in 1..=1000 {
            m.insert(id, id * 2);
        }
        assert!((1..=1000).all(|id| m.get(&id) == Some(&(id * 2))));
        assert_eq!(m.get(&1001), None);
    }
}
