//! What plugins share with each other and with the embedder: logs, metrics,
//! shared data, shared queues, foreign functions, callouts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nasp_telemetry::MetricsRegistry;

use crate::types::HeaderMap;

/// Log levels (`proxy_log_level_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// 0
    Trace,
    /// 1
    Debug,
    /// 2
    Info,
    /// 3
    Warn,
    /// 4
    Error,
    /// 5
    Critical,
}

impl LogLevel {
    /// From the ABI value.
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// One log line from a plugin (or from the host about a plugin).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogRecord {
    /// Level.
    pub level: LogLevel,
    /// Plugin name.
    pub plugin: String,
    /// Message.
    pub message: String,
}

/// Where plugin logs go.
pub trait LogSink: Send + Sync {
    /// Records a line.
    fn log(&self, record: LogRecord);
    /// The level below which the plugin need not log (`proxy_get_log_level`).
    fn level(&self) -> LogLevel {
        LogLevel::Trace
    }
}

/// Sends plugin logs to `tracing`.
#[derive(Debug, Default)]
pub struct TracingLogSink;

impl LogSink for TracingLogSink {
    fn level(&self) -> LogLevel {
        Self::current_level()
    }
    fn log(&self, r: LogRecord) {
        match r.level {
            LogLevel::Trace => tracing::trace!(plugin = %r.plugin, "{}", r.message),
            LogLevel::Debug => tracing::debug!(plugin = %r.plugin, "{}", r.message),
            LogLevel::Info => tracing::info!(plugin = %r.plugin, "{}", r.message),
            LogLevel::Warn => tracing::warn!(plugin = %r.plugin, "{}", r.message),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(plugin = %r.plugin, "{}", r.message)
            }
        }
    }
}

impl TracingLogSink {
    /// The most verbose level `tracing` lets through right now.
    fn current_level() -> LogLevel {
        use tracing::level_filters::LevelFilter;
        let max = LevelFilter::current();
        if max >= LevelFilter::TRACE {
            LogLevel::Trace
        } else if max >= LevelFilter::DEBUG {
            LogLevel::Debug
        } else if max >= LevelFilter::INFO {
            LogLevel::Info
        } else if max >= LevelFilter::WARN {
            LogLevel::Warn
        } else if max >= LevelFilter::ERROR {
            LogLevel::Error
        } else {
            LogLevel::Critical
        }
    }
}

/// Keeps every line in memory (tests, `nasp wasm exec`).
#[derive(Debug, Clone)]
pub struct MemoryLogSink {
    lines: Arc<Mutex<Vec<LogRecord>>>,
    level: LogLevel,
}

impl Default for MemoryLogSink {
    fn default() -> Self {
        Self {
            lines: Arc::default(),
            level: LogLevel::Trace,
        }
    }
}

impl MemoryLogSink {
    /// A new, empty sink that keeps every level.
    pub fn new() -> Self {
        Self::default()
    }
    /// A sink that drops lines below `level` (and tells plugins so through
    /// `proxy_get_log_level`).
    pub fn with_level(level: LogLevel) -> Self {
        Self {
            level,
            ..Self::default()
        }
    }
    /// The lines so far.
    pub fn lines(&self) -> Vec<LogRecord> {
        lock(&self.lines).clone()
    }
    /// Whether some line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        lock(&self.lines).iter().any(|l| l.message.contains(needle))
    }
}

impl LogSink for MemoryLogSink {
    fn log(&self, record: LogRecord) {
        if record.level >= self.level {
            lock(&self.lines).push(record);
        }
    }
    fn level(&self) -> LogLevel {
        self.level
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Host state stays consistent across a panic in another thread (every
    // update is a single assignment or push), so a poisoned lock is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Result of a shared-data or queue operation, in ABI status terms.
pub type StatusResult<T> = std::result::Result<T, i32>;

/// Shared key-value data and queues, keyed by VM id as in Envoy.
#[derive(Default)]
pub struct SharedStore {
    data: Mutex<SharedData>,
    queues: Mutex<Queues>,
    ready: Mutex<HashMap<u64, Vec<(u32, u32)>>>,
    /// Told the VM key each time a notification is posted, so an embedder
    /// can wake the task that owns an idle consumer VM.
    ready_hook: Mutex<Option<ReadyHook>>,
    /// Whether `ready` may hold anything: every callback checks for queue
    /// notifications, and almost always there are none.
    any_ready: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedStore")
    }
}

/// Called with the VM key that has queue notifications waiting.
pub type ReadyHook = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Default)]
struct SharedData {
    entries: HashMap<(String, String), (Vec<u8>, u32)>,
    /// One CAS counter for every key, as in Envoy's host.
    last_cas: u32,
}

#[derive(Default)]
struct Queues {
    next_token: u32,
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

struct Queue {
    owner: (u64, u32),
    items: std::collections::VecDeque<Vec<u8>>,
}

impl SharedStore {
    /// Reads a value and its CAS.
    pub fn get(&self, vm_id: &str, key: &str) -> StatusResult<(Vec<u8>, u32)> {
        lock(&self.data)
            .entries
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
            .ok_or(crate::abi::status::NOT_FOUND)
    }

    /// Writes a value; `cas` 0 is unconditional, otherwise it must match an
    /// existing key's CAS. A missing key is inserted whatever the CAS (as
    /// Envoy's host). Every write takes the next value of one counter.
    pub fn set(&self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> StatusResult<()> {
        let mut data = lock(&self.data);
        let data = &mut *data;
        let k = (vm_id.to_string(), key.to_string());
        if let Some((_, current)) = data.entries.get(&k)
            && cas != 0
            && cas != *current
        {
            return Err(crate::abi::status::CAS_MISMATCH);
        }
        data.last_cas = data.last_cas.wrapping_add(1).max(1);
        data.entries.insert(k, (value.to_vec(), data.last_cas));
        Ok(())
    }

    /// Registers (or re-registers) a queue owned by a root context; tokens start at 1.
    pub fn register_queue(&self, vm_id: &str, name: &str, owner: (u64, u32)) -> u32 {
        let mut q = lock(&self.queues);
        if let Some(t) = q
            .by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
        {
            if let Some(queue) = q.queues.get_mut(&t) {
                queue.owner = owner;
            }
            return t;
        }
        q.next_token += 1;
        let token = q.next_token;
        q.by_name
            .insert((vm_id.to_string(), name.to_string()), token);
        q.queues.insert(
            token,
            Queue {
                owner,
                items: Default::default(),
            },
        );
        token
    }

    /// Finds a queue registered by any VM.
    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> StatusResult<u32> {
        lock(&self.queues)
            .by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
            .ok_or(crate::abi::status::NOT_FOUND)
    }

    /// Enqueues; returns the owner to notify.
    pub fn enqueue(&self, token: u32, value: &[u8]) -> StatusResult<(u64, u32)> {
        let mut q = lock(&self.queues);
        let queue = q
            .queues
            .get_mut(&token)
            .ok_or(crate::abi::status::NOT_FOUND)?;
        queue.items.push_back(value.to_vec());
        Ok(queue.owner)
    }

    /// Records that queue `token` of root context `owner.1` in VM `owner.0` has data.
    pub(crate) fn notify(&self, owner: (u64, u32), token: u32) {
        // Owner 0: the VM that registered the queue is gone.
        if owner.0 == 0 {
            return;
        }
        {
            let mut ready = lock(&self.ready);
            ready.entry(owner.0).or_default().push((owner.1, token));
            self.any_ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let hook = lock(&self.ready_hook).clone();
        if let Some(hook) = hook {
            hook(owner.0);
        }
    }

    /// Sets the function told which VM has `proxy_on_queue_ready` waiting
    /// (the embedder then calls [`crate::FilterChain::dispatch_pending`] or
    /// [`crate::Plugin::dispatch_queue_ready`] on it).
    pub fn set_ready_hook(&self, hook: ReadyHook) {
        *lock(&self.ready_hook) = Some(hook);
    }

    /// Whether notifications wait for a VM.
    pub fn has_ready(&self, vm_key: u64) -> bool {
        self.any_ready.load(std::sync::atomic::Ordering::Acquire)
            && lock(&self.ready).contains_key(&vm_key)
    }

    /// A VM is gone: its pending notifications are dropped, and so are later
    /// ones for queues it still owns.
    pub(crate) fn forget_vm(&self, vm_key: u64) {
        for q in lock(&self.queues).queues.values_mut() {
            if q.owner.0 == vm_key {
                q.owner = (0, 0);
            }
        }
        let mut ready = lock(&self.ready);
        ready.remove(&vm_key);
        if ready.is_empty() {
            self.any_ready
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Takes the pending `proxy_on_queue_ready` notifications of a VM.
    pub(crate) fn take_ready(&self, vm_key: u64) -> Vec<(u32, u32)> {
        if !self.any_ready.load(std::sync::atomic::Ordering::Acquire) {
            return Vec::new();
        }
        let mut ready = lock(&self.ready);
        let mine = ready.remove(&vm_key).unwrap_or_default();
        if ready.is_empty() {
            // Under the lock, so a concurrent `notify` sets it again after.
            self.any_ready
                .store(false, std::sync::atomic::Ordering::Release);
        }
        mine
    }

    /// Dequeues one item.
    pub fn dequeue(&self, token: u32) -> StatusResult<Vec<u8>> {
        let mut q = lock(&self.queues);
        let queue = q
            .queues
            .get_mut(&token)
            .ok_or(crate::abi::status::NOT_FOUND)?;
        queue.items.pop_front().ok_or(crate::abi::status::EMPTY)
    }
}

/// The host's built-in foreign function that answers several properties
/// in one call (nasp's default filters use it; hosts without it answer
/// `NOT_FOUND` and the filters read one by one). Arguments: each path as a
/// little-endian u32 length and its bytes (segments separated by NUL, as
/// `proxy_get_property` takes them); result: each value in order as a u32
/// length and its bytes, `u32::MAX` alone for an absent one. A function
/// registered in [`HostEnv::foreign`] under this name replaces it.
pub const GET_PROPERTIES: &str = "nasp_get_properties";

/// Most paths one [`GET_PROPERTIES`] call may name (`BAD_ARGUMENT` past it).
pub const MAX_BATCH_PATHS: usize = 64;

/// A foreign function a plugin can call by name. It gets the argument bytes
/// and returns result bytes, or a proxy status on failure.
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> StatusResult<Vec<u8>> + Send + Sync>;

/// An HTTP callout a plugin asked for (`proxy_http_call`).
#[derive(Clone, Debug)]
pub struct HttpCallout {
    /// Cluster / upstream name.
    pub upstream: String,
    /// Request headers (with `:method`, `:path`, `:authority`).
    pub headers: HeaderMap,
    /// Body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: HeaderMap,
    /// Timeout in milliseconds.
    pub timeout_ms: u32,
}

/// A gRPC callout (`proxy_grpc_call` / `proxy_grpc_stream`).
#[derive(Clone, Debug)]
pub struct GrpcCallout {
    /// Cluster / upstream (the serialized GrpcService in Envoy).
    pub upstream: Vec<u8>,
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Initial metadata.
    pub metadata: HeaderMap,
    /// The message (empty for a stream until `proxy_grpc_send`).
    pub message: Vec<u8>,
    /// Timeout in milliseconds (0 for streams).
    pub timeout_ms: u32,
}

/// The embedder's side of callouts. The host assigns tokens; the embedder
/// performs the call and later delivers the answer with
/// [`crate::Plugin::on_http_call_response`] / `on_grpc_*`. Returning an error
/// status refuses the call (the guest sees that status).
pub trait Callouts: Send + Sync {
    /// Starts an HTTP call with this token.
    fn http_call(&self, plugin: &str, token: u32, call: HttpCallout) -> StatusResult<()>;
    /// Starts a gRPC call or stream with this token.
    fn grpc_call(
        &self,
        plugin: &str,
        token: u32,
        call: GrpcCallout,
        stream: bool,
    ) -> StatusResult<()>;
    /// A message sent on a gRPC stream.
    fn grpc_send(&self, _token: u32, _message: &[u8], _end_stream: bool) -> StatusResult<()> {
        Ok(())
    }
    /// A call was cancelled by the plugin: no answer is delivered.
    fn grpc_cancel(&self, _token: u32) -> StatusResult<()> {
        Ok(())
    }
    /// The plugin closed its side of a call or stream; the answer still
    /// comes (`proxy_grpc_close` closes, it does not cancel).
    fn grpc_close(&self, _token: u32) -> StatusResult<()> {
        Ok(())
    }
}

/// Callouts that refuse every call with `INTERNAL_FAILURE` (no upstreams).
#[derive(Debug, Default)]
pub struct NoCallouts;

impl Callouts for NoCallouts {
    fn http_call(&self, _: &str, _: u32, _: HttpCallout) -> StatusResult<()> {
        Err(crate::abi::status::INTERNAL_FAILURE)
    }
    fn grpc_call(&self, _: &str, _: u32, _: GrpcCallout, _: bool) -> StatusResult<()> {
        Err(crate::abi::status::INTERNAL_FAILURE)
    }
}

/// Records callouts for the embedder to answer later (tests, `wasm exec`).
#[derive(Debug, Default, Clone)]
pub struct RecordingCallouts {
    /// HTTP calls, with their tokens.
    pub http: Arc<Mutex<Vec<(u32, HttpCallout)>>>,
    /// gRPC calls and streams, with their tokens.
    pub grpc: Arc<Mutex<Vec<(u32, GrpcCallout)>>>,
    /// Tokens the plugin cancelled.
    pub cancelled: Arc<Mutex<Vec<u32>>>,
    /// Tokens the plugin closed.
    pub closed: Arc<Mutex<Vec<u32>>>,
}

impl Callouts for RecordingCallouts {
    fn http_call(&self, _: &str, token: u32, call: HttpCallout) -> StatusResult<()> {
        lock(&self.http).push((token, call));
        Ok(())
    }
    fn grpc_call(&self, _: &str, token: u32, call: GrpcCallout, _: bool) -> StatusResult<()> {
        lock(&self.grpc).push((token, call));
        Ok(())
    }
    fn grpc_cancel(&self, token: u32) -> StatusResult<()> {
        lock(&self.cancelled).push(token);
        Ok(())
    }
    fn grpc_close(&self, token: u32) -> StatusResult<()> {
        lock(&self.closed).push(token);
        Ok(())
    }
}

/// Everything plugins of one process (or mesh instance) share.
#[derive(Clone)]
pub struct HostEnv {
    /// Plugin logs.
    pub logs: Arc<dyn LogSink>,
    /// Metrics.
    pub metrics: MetricsRegistry,
    /// Shared data and queues.
    pub shared: Arc<SharedStore>,
    /// Foreign functions by name.
    pub foreign: Arc<HashMap<String, ForeignFunction>>,
    /// Callouts.
    pub callouts: Arc<dyn Callouts>,
    /// Environment variables the guest sees through WASI.
    pub env_vars: Arc<Vec<(String, String)>>,
}

impl fmt::Debug for HostEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostEnv").finish_non_exhaustive()
    }
}

impl Default for HostEnv {
    fn default() -> Self {
        Self {
            logs: Arc::new(TracingLogSink),
            metrics: MetricsRegistry::new(),
            shared: Arc::new(SharedStore::default()),
            foreign: Arc::new(HashMap::new()),
            callouts: Arc::new(NoCallouts),
            env_vars: Arc::new(Vec::new()),
        }
    }
}
