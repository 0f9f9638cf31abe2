//! A filter that exercises the host. Behaviour is chosen by the plugin
//! configuration (`reject-empty` is rejected, `tcp...` makes it a TCP filter,
//! `tick...` sets a 100 ms tick) and by the
//! request header `x-conformance`:
//!
//! - `local-response`: replies 403 with a body and a header;
//! - `trap`: panics (a trap in the guest);
//! - `loop`: spins forever (the CPU deadline must stop it);
//! - `memory`: allocates without bound (the memory cap must stop it);
//! - `bad-pointer`: calls host functions with out-of-bounds pointers and
//!   logs the statuses it got back;
//! - `pause`: stops iteration on request headers;
//! - `callout`: dispatches an HTTP call and resumes the request when the
//!   response arrives;
//! - `queue`: enqueues on its own shared queue (the root logs on_queue_ready).
//! - `wasi` (wasm32-wasip1 builds): reads the environment, both clocks and
//!   random bytes through the Rust std (so through WASI) and logs them.
//! - `wasi-corners` (wasm32-wasip1 builds): calls every WASI function the
//!   std does not, directly, and logs each return code.
//! - `abi-corners`: calls the ABI functions the SDK does not expose
//!   (`proxy_get_header_map_size`, `proxy_get_buffer_status`) and logs them.
//! - `log-level`: logs (at warn) what `proxy_get_log_level` returns.
//! - `pseudo`: adds the pseudo-header `:custom` and replaces `:path`.
//! - `pause-body`: at the end of the request body dispatches a callout and
//!   pauses; the callout answer resumes the request.
//!
//! Configuration `passive...` makes a plugin ignore `x-conformance` (it only
//! does the every-request work and adds `x-passive-seen`), so a chain can
//! pair one active plugin with one that shows where iteration resumed.
//! Configuration `producer...` resolves the `conformance` queue instead of
//! registering it, so another VM of the same VM id stays its owner.
//!
//! The root context logs `root properties in <callback>: node.id=…
//! namespace=… listener_direction=…` in `on_vm_start`, `on_configure` and
//! `on_tick` (`none` for a property the host does not have), as Istio's
//! filters read the local node there.
//!
//! Every request also: logs, reads headers, adds `x-conformance-seen`,
//! reads `plugin_root_id` and `node.id`, sets the `conformance.seen`
//! property, bumps a counter, a gauge and a histogram, and uses shared data.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, out: *mut *const u8, out_len: *mut usize) -> u32;
    fn proxy_log(level: u32, msg: *const u8, len: usize) -> u32;
    fn proxy_get_property(path: *const u8, len: usize, out: *mut *const u8, out_len: *mut usize) -> u32;
    fn proxy_call_foreign_function(name: *const u8, name_len: usize, args: *const u8, args_len: usize, out: *mut *const u8, out_len: *mut usize) -> u32;
    fn proxy_get_header_map_size(map: u32, size: *mut usize) -> u32;
    fn proxy_get_buffer_status(buffer: u32, len: *mut usize, flags: *mut u32) -> u32;
    fn proxy_get_log_level(level: *mut u32) -> u32;
}

// WASI functions the Rust std does not call on its own, declared with the
// wasm-level signatures of `wasi_snapshot_preview1`.
#[cfg(target_os = "wasi")]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn args_sizes_get(argc: *mut u32, buf_size: *mut u32) -> i32;
    fn args_get(argv: *mut u32, buf: *mut u8) -> i32;
    fn clock_res_get(id: i32, res: *mut u64) -> i32;
    fn fd_close(fd: i32) -> i32;
    fn fd_datasync(fd: i32) -> i32;
    fn fd_sync(fd: i32) -> i32;
    fn fd_fdstat_get(fd: i32, buf: *mut u8) -> i32;
    fn fd_fdstat_set_flags(fd: i32, flags: i32) -> i32;
    fn fd_filestat_get(fd: i32, buf: *mut u8) -> i32;
    fn fd_pread(fd: i32, iovs: *const u32, iovs_len: i32, offset: i64, nread: *mut u32) -> i32;
    fn fd_pwrite(fd: i32, iovs: *const u32, iovs_len: i32, offset: i64, nwritten: *mut u32) -> i32;
    fn fd_prestat_get(fd: i32, buf: *mut u8) -> i32;
    fn fd_prestat_dir_name(fd: i32, path: *mut u8, len: i32) -> i32;
    fn fd_read(fd: i32, iovs: *const u32, iovs_len: i32, nread: *mut u32) -> i32;
    fn fd_readdir(fd: i32, buf: *mut u8, len: i32, cookie: i64, used: *mut u32) -> i32;
    fn fd_renumber(fd: i32, to: i32) -> i32;
    fn fd_seek(fd: i32, offset: i64, whence: i32, new_offset: *mut u64) -> i32;
    fn fd_tell(fd: i32, offset: *mut u64) -> i32;
    fn path_filestat_get(fd: i32, flags: i32, path: *const u8, len: i32, buf: *mut u8) -> i32;
    fn path_open(fd: i32, dirflags: i32, path: *const u8, len: i32, oflags: i32, base: i64, inheriting: i64, fdflags: i32, opened: *mut u32) -> i32;
    fn poll_oneoff(subs: *const u8, events: *mut u8, n: i32, nevents: *mut u32) -> i32;
    fn sched_yield() -> i32;
    fn random_get(buf: *mut u8, len: i32) -> i32;
}

#[derive(Default)]
struct Root {
    config: Vec<u8>,
    counter: u32,
    gauge: u32,
    histogram: u32,
    queue: u32,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        log::info!("root got callout response: {}", String::from_utf8_lossy(&body));
    }
}

impl Root {
    /// The root-level properties Istio's filters read, as one log line.
    fn log_root_properties(&self, callback: &str) {
        let text = |path: Vec<&str>| self.get_property(path).map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "none".into());
        let direction = self
            .get_property(vec!["listener_direction"])
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(|b| i64::from_le_bytes(b).to_string())
            .unwrap_or_else(|| "none".into());
        log::info!("root properties in {}: node.id={} namespace={} listener_direction={}", callback, text(vec!["node", "id"]), text(vec!["node", "metadata", "NAMESPACE"]), direction);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        self.log_root_properties("on_vm_start");
        let vm = self.get_vm_configuration().unwrap_or_default();
        log::info!("vm start: {} bytes of vm configuration: {}", vm_configuration_size, String::from_utf8_lossy(&vm));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = self.get_plugin_configuration().unwrap_or_default();
        self.log_root_properties("on_configure");
        log::info!("configure: {}", String::from_utf8_lossy(&self.config));
        let vm = self.get_vm_configuration().unwrap_or_default();
        log::info!("vm configuration during configure: {}", String::from_utf8_lossy(&vm));
        if self.config.starts_with(b"reject-empty") || self.config.is_empty() && self.get_property(vec!["plugin_root_id"]).as_deref() == Some(b"reject-empty") {
            return false;
        }
        self.counter = hostcalls::define_metric(MetricType::Counter, "conformance_requests_total").unwrap_or(0);
        self.gauge = hostcalls::define_metric(MetricType::Gauge, "conformance_last_header_count").unwrap_or(0);
        self.histogram = hostcalls::define_metric(MetricType::Histogram, "conformance_body_bytes").unwrap_or(0);
        self.queue = if self.config.starts_with(b"producer") {
            hostcalls::resolve_shared_queue("", "conformance").ok().flatten().unwrap_or(0)
        } else {
            hostcalls::register_shared_queue("conformance").unwrap_or(0)
        };
        if self.config.starts_with(b"tick") {
            self.set_tick_period(Duration::from_millis(100));
        }
        true
    }

    fn on_tick(&mut self) {
        self.log_root_properties("on_tick");
        log::info!("tick");
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            log::info!("queue ready: {}", String::from_utf8_lossy(&item));
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let passive = self.config.starts_with(b"passive");
        Some(Box::new(Http { id: context_id, counter: self.counter, gauge: self.gauge, histogram: self.histogram, queue: self.queue, passive, mode: None }))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp { id: context_id, bytes: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        // One module serves both kinds: a configuration starting with "tcp"
        // makes it a TCP (stream) filter.
        if self.config.starts_with(b"tcp") {
            Some(ContextType::StreamContext)
        } else {
            Some(ContextType::HttpContext)
        }
    }
}

struct Http {
    id: u32,
    counter: u32,
    gauge: u32,
    histogram: u32,
    queue: u32,
    passive: bool,
    mode: Option<String>,
}

fn status_of(r: u32) -> String {
    format!("{r}")
}

impl Http {
    fn bad_pointers(&self) {
        // Keys and output pointers far outside linear memory.
        let bad = 0xffff_fff0usize as *const u8;
        let mut out: *const u8 = core::ptr::null();
        let mut len: usize = 0;
        let s1 = unsafe { proxy_get_header_map_value(0, bad, 64, &mut out, &mut len) };
        let s2 = unsafe { proxy_get_header_map_value(0, b":path".as_ptr(), 5, 0xffff_fff0usize as *mut *const u8, &mut len) };
        let s3 = unsafe { proxy_log(2, bad, 1 << 20) };
        let s4 = unsafe { proxy_get_property(bad, 8, &mut out, &mut len) };
        log::warn!("bad-pointer statuses: {} {} {} {}", status_of(s1), status_of(s2), status_of(s3), status_of(s4));
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        self.set_http_request_header("x-callout-body", Some(&String::from_utf8_lossy(&body)));
        self.resume_http_request();
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        log::info!("#{} request headers: {} headers, path {}, end_of_stream {}", self.id, num_headers, path, end_of_stream);
        let _ = hostcalls::increment_metric(self.counter, 1);
        let _ = hostcalls::record_metric(self.gauge, num_headers as u64);
        let root_id = self.get_property(vec!["plugin_root_id"]).unwrap_or_default();
        let node = self.get_property(vec!["node", "id"]).map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_else(|| "none".into());
        self.set_http_request_header("x-conformance-seen", Some(&format!("root={};node={}", String::from_utf8_lossy(&root_id), node)));
        self.set_property(vec!["conformance", "seen"], Some(path.as_bytes()));
        let (old, cas) = self.get_shared_data("requests");
        let n = old.map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0)).unwrap_or(0) + 1;
        let _ = self.set_shared_data("requests", Some(n.to_string().as_bytes()), cas);
        // A foreign function nobody registered: NOT_FOUND, with NULL results.
        let name = b"conformance_unknown";
        let ff = unsafe { proxy_call_foreign_function(name.as_ptr(), name.len(), core::ptr::null(), 0, core::ptr::null_mut(), core::ptr::null_mut()) };
        log::debug!("foreign function status {}", ff);
        if self.passive {
            self.set_http_request_header("x-passive-seen", Some(&self.id.to_string()));
            return Action::Continue;
        }
        self.mode = self.get_http_request_header("x-conformance");
        match self.mode.as_deref() {
            Some("local-response") => {
                self.send_http_response(403, vec![("x-denied-by", "conformance")], Some(b"denied by conformance filter"));
                Action::Pause
            }
            Some("trap") => panic!("conformance filter asked to trap"),
            Some("loop") => {
                let mut i: u64 = 0;
                loop {
                    i = core::hint::black_box(i.wrapping_add(1));
                }
            }
            Some("memory") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    core::hint::black_box(&hoard);
                }
            }
            Some("bad-pointer") => {
                self.bad_pointers();
                Action::Continue
            }
            Some("pause") => Action::Pause,
            Some("callout") => {
                match self.dispatch_http_call("upstream", vec![(":method", "GET"), (":path", "/callout"), (":authority", "upstream")], None, vec![], Duration::from_secs(1)) {
                    Ok(token) => log::info!("callout dispatched with token {}", token),
                    Err(e) => log::error!("callout failed: {:?}", e),
                }
                Action::Pause
            }
            #[cfg(target_os = "wasi")]
            Some("wasi") => {
                use std::hash::{BuildHasher, Hasher};
                let vars = std::env::vars().count();
                let realtime = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let start = std::time::Instant::now();
                let monotonic_ok = start.elapsed() < Duration::from_secs(3600);
                // std seeds RandomState from random_get.
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write(b"conformance");
                log::info!("wasi: {} env vars, realtime {} s, monotonic ok {}, random {:016x}", vars, realtime, monotonic_ok, hasher.finish());
                Action::Continue
            }
            #[cfg(target_os = "wasi")]
            Some("wasi-corners") => {
                log::info!("wasi-corners: {}", wasi_corners());
                Action::Continue
            }
            Some("abi-corners") => {
                let mut size = 0usize;
                let s1 = unsafe { proxy_get_header_map_size(0, &mut size) };
                let (mut len, mut flags) = (0usize, 0u32);
                // Buffer 0 is the request body: not available during headers.
                let s2 = unsafe { proxy_get_buffer_status(0, &mut len, &mut flags) };
                let s3 = unsafe { proxy_get_header_map_size(99, &mut size) };
                log::info!("abi-corners: map_size={} status={} buffer_status={} bad_map={}", size, s1, s2, s3);
                Action::Continue
            }
            Some("log-level") => {
                let mut level = 99u32;
                let s = unsafe { proxy_get_log_level(&mut level) };
                log::warn!("log level {} (status {})", level, s);
                Action::Continue
            }
            Some("pseudo") => {
                self.add_http_request_header(":custom", "pseudo");
                self.set_http_request_header(":path", Some("/rewritten"));
                Action::Continue
            }
            Some("queue") => {
                let _ = hostcalls::enqueue_shared_queue(self.queue, Some(path.as_bytes()));
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if self.mode.as_deref() == Some("pause-body") {
            log::info!("#{} body of {} bytes paused for a callout", self.id, body_size);
            let _ = self.dispatch_http_call("upstream", vec![(":method", "GET"), (":path", "/body"), (":authority", "upstream")], None, vec![], Duration::from_secs(1));
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let _ = hostcalls::record_metric(self.histogram, body.len() as u64);
        let upper = body.to_ascii_uppercase();
        self.set_http_request_body(0, body_size, &upper);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.add_http_request_trailer("x-trailer-seen", "yes");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        self.set_http_response_header("x-upstream-status", Some(&status));
        self.set_http_response_header("server", None);
        let seen = self.get_property(vec!["conformance", "seen"]).unwrap_or_default();
        self.add_http_response_header("x-seen-path", &String::from_utf8_lossy(&seen));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            let _ = self.get_http_response_body(0, body_size);
            self.set_http_response_body(body_size, 0, b" [filtered]");
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        log::info!("#{} log", self.id);
    }
}

struct Tcp {
    id: u32,
    bytes: usize,
}

impl Context for Tcp {}

impl StreamContext for Tcp {
    fn on_new_connection(&mut self) -> Action {
        log::info!("#{} new connection", self.id);
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _eos: bool) -> Action {
        self.bytes += data_size;
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if data.starts_with(b"close") {
            self.close_downstream();
        }
        self.set_downstream_data(0, 0, b">");
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _eos: bool) -> Action {
        self.bytes += data_size;
        self.set_upstream_data(data_size, 0, b"<");
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer: proxy_wasm::types::PeerType) {
        log::info!("#{} downstream closed after {} bytes", self.id, self.bytes);
    }

    fn on_log(&mut self) {
        log::info!("#{} tcp log", self.id);
    }
}

/// Calls the WASI functions the std leaves alone; "name=errno" pairs.
#[cfg(target_os = "wasi")]
fn wasi_corners() -> String {
    let mut out = Vec::new();
    let mut push = |name: &str, code: i32| out.push(format!("{}={}", name, code));
    let (mut a, mut b) = (7u32, 7u32);
    let mut buf = [0u8; 64];
    let mut word = 7u64;
    let text = b"pwrite line\n";
    let iov: [u32; 2] = [text.as_ptr() as u32, text.len() as u32];
    let mut read_buf = [0u8; 8];
    let read_iov: [u32; 2] = [read_buf.as_mut_ptr() as u32, read_buf.len() as u32];
    unsafe {
        push("args_sizes_get", args_sizes_get(&mut a, &mut b));
        push("args_count", a as i32);
        push("args_get", args_get(buf.as_mut_ptr() as *mut u32, buf.as_mut_ptr()));
        push("clock_res_get_realtime", clock_res_get(0, &mut word));
        push("clock_res", word as i32);
        push("clock_res_get_process", clock_res_get(2, &mut word));
        push("fd_close", fd_close(3));
        push("fd_datasync_stdout", fd_datasync(1));
        push("fd_sync_other", fd_sync(5));
        push("fd_fdstat_get_stdout", fd_fdstat_get(1, buf.as_mut_ptr()));
        push("fd_filetype", buf[0] as i32);
        push("fd_fdstat_get_other", fd_fdstat_get(5, buf.as_mut_ptr()));
        push("fd_fdstat_set_flags", fd_fdstat_set_flags(1, 0));
        push("fd_filestat_get", fd_filestat_get(1, buf.as_mut_ptr()));
        push("fd_pread", fd_pread(0, read_iov.as_ptr(), 1, 0, &mut a));
        push("fd_pwrite", fd_pwrite(1, iov.as_ptr(), 1, 0, &mut a));
        push("fd_pwrite_bytes", a as i32);
        push("fd_prestat_get", fd_prestat_get(3, buf.as_mut_ptr()));
        push("fd_prestat_dir_name", fd_prestat_dir_name(3, buf.as_mut_ptr(), 8));
        push("fd_read", fd_read(0, read_iov.as_ptr(), 1, &mut a));
        push("fd_readdir", fd_readdir(3, buf.as_mut_ptr(), 64, 0, &mut a));
        push("fd_renumber", fd_renumber(1, 2));
        push("fd_seek", fd_seek(1, 0, 0, &mut word));
        word = 7;
        push("fd_tell", fd_tell(1, &mut word));
        push("fd_tell_offset", word as i32);
        let path = b"/etc/passwd";
        push("path_filestat_get", path_filestat_get(3, 0, path.as_ptr(), path.len() as i32, buf.as_mut_ptr()));
        push("path_open", path_open(3, 0, path.as_ptr(), path.len() as i32, 0, 0, 0, 0, &mut a));
        a = 7;
        push("poll_oneoff", poll_oneoff(buf.as_ptr(), buf.as_mut_ptr(), 0, &mut a));
        push("poll_events", a as i32);
        push("sched_yield", sched_yield());
        let mut big = vec![0u8; 64 * 1024 + 1];
        push("random_get_too_big", random_get(big.as_mut_ptr(), big.len() as i32));
        push("random_get", random_get(big.as_mut_ptr(), 16));
    }
    out.join(" ")
}
