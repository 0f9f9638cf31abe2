//! The proxy-wasm conformance suite: every case runs on every runtime
//! compiled into this build, against the real `conformance` filter built from
//! `filters/` (run `cargo xtask build-filters` first; `cargo xtask test` does)
//! and a few hand-written modules for ABI corners.

use std::sync::Arc;
use std::time::Duration;

use nasp::wasm::env::RecordingCallouts;
use nasp::wasm::runtime::{FuncType, ValType};
use nasp::wasm::*;

fn conformance_wasm() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/filters/conformance.wasm"
    );
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the filters with `cargo xtask build-filters`")
    })
}

struct Harness {
    logs: MemoryLogSink,
    env: HostEnv,
    callouts: RecordingCallouts,
}

impl Harness {
    fn new() -> Self {
        let logs = MemoryLogSink::new();
        let callouts = RecordingCallouts::default();
        let env = HostEnv {
            logs: Arc::new(logs.clone()),
            callouts: Arc::new(callouts.clone()),
            ..HostEnv::default()
        };
        Self {
            logs,
            env,
            callouts,
        }
    }

    fn plugin(&self, rt: &str, config: PluginConfig) -> Result<Plugin> {
        let runtime = nasp::wasm::runtime_by_name(rt)?;
        let module = WasmModule::new(runtime.as_ref(), &conformance_wasm())?;
        Plugin::new(&module, config, self.env.clone())
    }

    fn chain(&self, rt: &str, config: PluginConfig) -> FilterChain {
        FilterChain::new(vec![
            self.plugin(rt, config)
                .unwrap_or_else(|e| panic!("{rt}: {e}")),
        ])
    }
}

fn props() -> Arc<dyn PropertyProvider> {
    let mut m = std::collections::HashMap::new();
    m.insert(
        "node.id".to_string(),
        PropertyValue::from("sidecar~10.0.0.1~pod.demo~demo.svc.cluster.local"),
    );
    Arc::new(MapProperties(m))
}

fn req(path: &str, mode: Option<&str>) -> HeaderMap {
    let mut h =
        HeaderMap::from_pairs([(":method", "GET"), (":path", path), (":authority", "echo")]);
    if let Some(m) = mode {
        h.add(b"x-conformance", m.as_bytes());
    }
    h
}

fn cfg(name: &str) -> PluginConfig {
    PluginConfig::new(name)
        .root_id("conformance")
        .vm_id("vm1")
        .configuration("hello")
        .vm_configuration("vmcfg")
}

macro_rules! per_runtime {
    ($($name:ident => $body:expr;)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                #[test]
                fn wasmtime() {
                    ($body)("wasmtime");
                }
                #[test]
                fn wasmi() {
                    ($body)("wasmi");
                }
                #[test]
                #[cfg(feature = "wasm3")]
                fn wasm3() {
                    ($body)("wasm3");
                }
            }
        )*
    };
}

per_runtime! {
    http_lifecycle => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        assert!(h.logs.contains("vm start: 5 bytes of vm configuration: vmcfg"), "{rt}: {:?}", h.logs.lines());
        assert!(h.logs.contains("configure: hello"));
        for i in 0..2 {
            let mut s = chain.http_stream(props());
            let mut headers = req("/echo", None);
            assert_eq!(s.request_headers(&mut chain, &mut headers, false), FilterStatus::Continue);
            assert_eq!(
                headers.get_str("x-conformance-seen").as_deref(),
                Some("root=conformance;node=sidecar~10.0.0.1~pod.demo~demo.svc.cluster.local"),
                "{rt}"
            );
            let (st, body) = s.request_body(&mut chain, b"hello ", false);
            assert_eq!((st, body.as_slice()), (FilterStatus::Pause, &b""[..]), "{rt}: a paused body is buffered");
            let (st, body) = s.request_body(&mut chain, b"world", true);
            assert_eq!((st, body.as_slice()), (FilterStatus::Continue, &b"HELLO WORLD"[..]), "{rt}");
            let mut trailers = HeaderMap::new();
            assert_eq!(s.request_trailers(&mut chain, &mut trailers), FilterStatus::Continue);
            assert_eq!(trailers.get_str("x-trailer-seen").as_deref(), Some("yes"));
            let mut resp = HeaderMap::from_pairs([(":status", "200"), ("server", "envoy")]);
            assert_eq!(s.response_headers(&mut chain, &mut resp, false), FilterStatus::Continue);
            assert_eq!(resp.get_str("x-upstream-status").as_deref(), Some("200"));
            assert_eq!(resp.get_str("x-seen-path").as_deref(), Some("/echo"), "{rt}: property set on request visible on response");
            assert!(resp.get_str("server").is_none());
            let (_, body) = s.response_body(&mut chain, b"ok", true);
            assert_eq!(body, b"ok [filtered]");
            s.finish(&mut chain);
            assert!(h.logs.contains(&format!("#{} log", i + 2)), "{rt}: on_log ran: {:?}", h.logs.lines());
        }
        let text = h.env.metrics.prometheus_text();
        assert!(text.contains("conformance_requests_total 2\n"), "{rt}: {text}");
        assert!(text.contains("conformance_last_header_count 3\n"), "{rt}: {text}");
        assert!(text.contains("conformance_body_bytes_count 2\n"), "{rt}: {text}");
        assert_eq!(h.env.shared.get("vm1", "requests").unwrap().0, b"2");
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok);
    };
    local_response => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        let mut headers = req("/", Some("local-response"));
        assert_eq!(s.request_headers(&mut chain, &mut headers, true), FilterStatus::LocalResponse);
        let lr = s.local_response().expect("local response");
        assert_eq!(lr.status, 403);
        assert_eq!(lr.body, b"denied by conformance filter");
        assert_eq!(lr.headers.get_str("x-denied-by").as_deref(), Some("conformance"));
        s.finish(&mut chain);
    };
    trap_fails_closed => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("trap")), true), FilterStatus::Fail);
        match chain.plugins[0].fail_state() {
            FailState::RuntimeError(m) => assert!(m.starts_with("Function: proxy_on_request_headers failed:"), "{rt}: {m}"),
            FailState::Ok => panic!("{rt}: the VM should have failed"),
        }
        assert!(h.logs.contains("conformance filter asked to trap"), "{rt}: the panic message is logged: {:?}", h.logs.lines());
        s.finish(&mut chain);
        // The dead instance is never called again; new streams fail closed.
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", None), true), FilterStatus::Fail);
    };
    fail_open_skips => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::FailOpen));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("trap")), true), FilterStatus::Continue);
        let mut s2 = chain.http_stream(props());
        let mut headers = req("/", None);
        assert_eq!(s2.request_headers(&mut chain, &mut headers, true), FilterStatus::Continue);
        assert!(headers.get_str("x-conformance-seen").is_none(), "{rt}: a failed fail-open plugin is skipped");
    };
    reload_gives_fresh_instance => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff: Duration::ZERO }));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("trap")), true), FilterStatus::Fail);
        let mut s2 = chain.http_stream(props());
        let mut headers = req("/", None);
        assert_eq!(s2.request_headers(&mut chain, &mut headers, true), FilterStatus::Continue, "{rt}");
        assert!(headers.get_str("x-conformance-seen").is_some());
        assert_eq!(chain.plugins[0].reloads(), 1);
    };
    reload_waits_for_backoff => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff: Duration::from_secs(3600) }));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("trap")), true), FilterStatus::Fail);
        let mut s2 = chain.http_stream(props());
        assert_eq!(s2.request_headers(&mut chain, &mut req("/", None), true), FilterStatus::Fail);
        assert_eq!(chain.plugins[0].reloads(), 0);
    };
    infinite_loop_is_cut => |rt: &str| {
        let h = Harness::new();
        let limits = Limits { call_deadline: Some(Duration::from_millis(200)), ..Limits::default() };
        let mut chain = h.chain(rt, cfg("conf").limits(limits));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("loop")), true), FilterStatus::Fail);
        match chain.plugins[0].fail_state() {
            FailState::RuntimeError(m) => assert!(m.contains("proxy_on_request_headers"), "{rt}: {m}"),
            FailState::Ok => panic!("{rt}: the loop should have been interrupted"),
        }
    };
    memory_bomb_is_capped => |rt: &str| {
        let h = Harness::new();
        let limits = Limits { max_memory_bytes: 16 << 20, ..Limits::default() };
        let mut chain = h.chain(rt, cfg("conf").limits(limits));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("memory")), true), FilterStatus::Fail);
        assert!(matches!(chain.plugins[0].fail_state(), FailState::RuntimeError(_)), "{rt}");
    };
    bad_pointers_get_invalid_memory_access => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("bad-pointer")), true), FilterStatus::Continue);
        assert!(h.logs.contains("bad-pointer statuses: 6 6 6 6"), "{rt}: {:?}", h.logs.lines());
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok);
    };
    configure_false_rejects => |rt: &str| {
        let h = Harness::new();
        let err = h.plugin(rt, cfg("conf").configuration("reject-empty")).unwrap_err();
        assert!(matches!(err, Error::ConfigureRejected(_)), "{rt}: {err}");
        assert!(err.to_string().contains("proxy_on_configure returned false"));
    };
    pause_and_callout => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        let mut headers = req("/", Some("callout"));
        assert_eq!(s.request_headers(&mut chain, &mut headers, true), FilterStatus::Pause);
        let calls = h.callouts.http.lock().unwrap().clone();
        assert_eq!(calls.len(), 1, "{rt}");
        let (token, call) = &calls[0];
        assert_eq!(call.upstream, "upstream");
        assert_eq!(call.headers.get_str(":path").as_deref(), Some("/callout"));
        assert_eq!(token & 3, 0, "http tokens have type 0 in the low bits");
        chain.plugins[0].on_http_call_response(*token, HeaderMap::from_pairs([(":status", "200")]), b"from upstream".to_vec(), HeaderMap::new());
        let state = s.state().lock().unwrap();
        assert_eq!(state.request_headers.get_str("x-callout-body").as_deref(), Some("from upstream"), "{rt}");
        assert_eq!(state.continued, vec![0], "{rt}: the filter resumed the request");
    };
    shared_queue_notifies_owner => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/queued", Some("queue")), true), FilterStatus::Continue);
        assert!(h.logs.contains("queue ready: /queued"), "{rt}: {:?}", h.logs.lines());
    };
    tick => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").configuration("tick"));
        assert_eq!(chain.plugins[0].tick_period(), Duration::from_millis(100));
        chain.tick();
        assert!(h.logs.contains("tick"));
    };
    tcp_stream => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").configuration("tcp"));
        let (mut s, st) = chain.tcp_stream(props());
        assert_eq!(st, FilterStatus::Continue);
        let (st, data) = s.downstream_data(&mut chain, b"ping", false);
        assert_eq!((st, data.as_slice()), (FilterStatus::Continue, &b">ping"[..]), "{rt}");
        let (_, data) = s.upstream_data(&mut chain, b"pong", false);
        assert_eq!(data, b"pong<");
        s.downstream_close(&mut chain, 2);
        assert!(h.logs.contains("downstream closed after 8 bytes"), "{rt}: {:?}", h.logs.lines());
        let (_, _) = s.downstream_data(&mut chain, b"close", true);
        assert_eq!(s.state().lock().unwrap().closed, vec![2], "{rt}");
        s.finish(&mut chain);
        assert!(h.logs.contains("tcp log"));
    };
    abi_0_1_0_links_and_runs => |rt: &str| {
        // A 0.1.0 module importing the 0.1.0-only functions; headers callback has 2 params.
        let wasm = wat::parse_str(r#"(module
            (import "env" "proxy_get_configuration" (func $cfg (param i32 i32) (result i32)))
            (import "env" "proxy_continue_request" (func $cr (result i32)))
            (import "env" "proxy_continue_response" (func $cresp (result i32)))
            (import "env" "proxy_clear_route_cache" (func $crc (result i32)))
            (import "env" "emscripten_notify_memory_growth" (func $grew (param i32)))
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $heap (mut i32) (i32.const 1024))
            (data (i32.const 0) "missing")
            (func (export "proxy_abi_version_0_1_0"))
            (func (export "malloc") (param i32) (result i32)
              (local i32) global.get $heap local.set 1
              global.get $heap local.get 0 i32.add global.set $heap local.get 1)
            (func (export "proxy_on_configure") (param i32 i32) (result i32)
              (drop (call $cfg (i32.const 100) (i32.const 104)))
              ;; log the configuration it got back
              (drop (call $log (i32.const 2) (i32.load (i32.const 100)) (i32.load (i32.const 104))))
              i32.const 1)
            (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
              ;; 0.1.0: a missing header is OK with an empty value
              (i32.store (i32.const 200) (call $get (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 208) (i32.const 212)))
              (if (i32.eqz (i32.load (i32.const 200))) (then (drop (call $log (i32.const 2) (i32.const 0) (i32.const 7)))))
              (drop (call $cr)) (drop (call $crc))
              ;; continue_response during request headers: the reference host accepts it
              (if (i32.ne (call $cresp) (i32.const 0)) (then unreachable))
              (call $grew (i32.const 0))
              i32.const 0))"#).unwrap();
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        assert_eq!(module.abi(), AbiVersion::V0_1_0);
        let mut chain = FilterChain::new(vec![Plugin::new(&module, cfg("v010").configuration("cfg-010"), h.env.clone()).unwrap()]);
        assert!(h.logs.contains("cfg-010"), "{rt}: {:?}", h.logs.lines());
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", None), true), FilterStatus::Continue);
        assert!(h.logs.contains("missing"), "{rt}: {:?}", h.logs.lines());
        // proxy_continue_request then proxy_continue_response (0.1.0 forms).
        assert_eq!(s.state().lock().unwrap().continued, vec![0, 1], "{rt}");
    };
    allocator_host_calls_are_restricted => |rt: &str| {
        // The allocator logs (allowed) for size 3 and calls proxy_done
        // (refused: a trap) for size 4.
        let wasm = wat::parse_str(r#"(module
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (import "env" "proxy_done" (func $done (result i32)))
            (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "plugin_vm_id")
            (data (i32.const 16) "in malloc")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32)
              (if (i32.eq (local.get 0) (i32.const 3)) (then (drop (call $log (i32.const 2) (i32.const 16) (i32.const 9)))))
              (if (i32.eq (local.get 0) (i32.const 4)) (then (drop (call $done))))
              i32.const 1024)
            (func (export "malloc") (param i32) (result i32) unreachable)
            (func (export "get_vm_id") (result i32)
              (call $prop (i32.const 0) (i32.const 12) (i32.const 100) (i32.const 104))))"#).unwrap();
        let ty = FuncType::new(&[], &[ValType::I32]);
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        // vm id "abc" (3 bytes): the allocator logs, the copy succeeds;
        // proxy_on_memory_allocate is preferred over a (trapping) malloc.
        let mut p = Plugin::new(&module, cfg("alloc").vm_id("abc"), h.env.clone()).unwrap();
        assert_eq!(p.call_export("get_vm_id", &ty, &[]).unwrap(), Some(runtime::Val::I32(0)), "{rt}");
        assert!(h.logs.contains("in malloc"), "{rt}");
        // vm id "abcd" (4 bytes): proxy_done inside the allocator traps.
        let mut p = Plugin::new(&module, cfg("alloc").vm_id("abcd"), h.env.clone()).unwrap();
        let err = p.call_export("get_vm_id", &ty, &[]).unwrap_err();
        assert!(err.message.contains("restricted_callback"), "{rt}: {err}");
    };
    values_cross_the_boundary_intact => |rt: &str| {
        // i32 results >= 2^31, i64 metric values, and LE out-pointer writes.
        let wasm = wat::parse_str(r#"(module
            (import "env" "proxy_define_metric" (func $def (param i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_record_metric" (func $rec (param i32 i64) (result i32)))
            (import "env" "proxy_get_metric" (func $get (param i32 i32) (result i32)))
            (import "env" "pthread_equal" (func $eq (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "big_gauge")
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32) i32.const 1024)
            (func (export "big") (result i32) i32.const -961633963)
            (func (export "wide") (result i64)
              (drop (call $def (i32.const 1) (i32.const 0) (i32.const 9) (i32.const 100)))
              (drop (call $rec (i32.load (i32.const 100)) (i64.const 5000000000)))
              (drop (call $get (i32.load (i32.const 100)) (i32.const 200)))
              (i64.load (i32.const 200)))
            (func (export "eq") (param i32 i32) (result i32) (call $eq (local.get 0) (local.get 1))))"#).unwrap();
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        let mut p = Plugin::new(&module, cfg("values"), h.env.clone()).unwrap();
        let r = p.call_export("big", &FuncType::new(&[], &[ValType::I32]), &[]).unwrap();
        assert_eq!(r, Some(runtime::Val::I32(3333333333u32 as i32)), "{rt}");
        let r = p.call_export("wide", &FuncType::new(&[], &[ValType::I64]), &[]).unwrap();
        assert_eq!(r, Some(runtime::Val::I64(5_000_000_000)), "{rt}");
        let r = p.call_export("eq", &FuncType::new(&[ValType::I32, ValType::I32], &[ValType::I32]), &[runtime::Val::I32(-7), runtime::Val::I32(-7)]).unwrap();
        assert_eq!(r, Some(runtime::Val::I32(1)), "{rt}");
        assert!(h.env.metrics.prometheus_text().contains("big_gauge 5000000000"), "{rt}");
    };
    wasi_env_clocks_and_random_reach_the_guest => |rt: &str| {
        // The filter reads them through the Rust std, i.e. through WASI.
        let random_of = |h: &Harness| -> (u64, String) {
            let mut chain = h.chain(rt, cfg("conf"));
            let mut s = chain.http_stream(props());
            assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("wasi")), true), FilterStatus::Continue, "{rt}");
            let line = h.logs.lines().into_iter().map(|r| r.message).find(|m| m.starts_with("wasi: ")).unwrap_or_else(|| panic!("{rt}: no wasi line: {:?}", h.logs.lines()));
            let realtime: u64 = line.split("realtime ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{rt}: {line}"));
            (realtime, line)
        };
        let (a, b) = (Harness::new(), Harness::new());
        let (realtime, line_a) = random_of(&a);
        let (_, line_b) = random_of(&b);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(realtime.abs_diff(now) < 120, "{rt}: the guest's wall clock is the host's: {line_a}");
        assert!(line_a.contains("0 env vars"), "{rt}: the host exposes no environment: {line_a}");
        assert!(line_a.contains("monotonic ok true"), "{rt}: {line_a}");
        let random = |l: &str| l.rsplit("random ").next().unwrap_or_default().to_string();
        assert_ne!(random(&line_a), random(&line_b), "{rt}: two VMs got the same random seed");
    };
    lean_headers_filter_reads_and_adds_headers => |rt: &str| {
        // The benchmark's filter does what the benchmark claims.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/filters/headers.wasm");
        let wasm = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask build-filters`"));
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        let mut chain = FilterChain::new(vec![Plugin::new(&module, cfg("headers"), h.env.clone()).unwrap()]);
        let mut s = chain.http_stream(props());
        let mut request = req("/lean", None);
        assert_eq!(s.request_headers(&mut chain, &mut request, true), FilterStatus::Continue);
        assert_eq!(request.get_str("x-path-seen").as_deref(), Some("/lean"), "{rt}");
        let mut response = HeaderMap::from_pairs([(":status", "204")]);
        assert_eq!(s.response_headers(&mut chain, &mut response, true), FilterStatus::Continue);
        assert_eq!(response.get_str("x-status-seen").as_deref(), Some("204"), "{rt}");
        s.finish(&mut chain);
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok);
    };
    wasi_functions_give_the_reference_return_codes => |rt: &str| {
        // Every WASI function the Rust std does not call itself, called raw
        // by the filter; codes as Envoy's host gives them (docs/proxy-wasm-host.md).
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, &mut req("/", Some("wasi-corners")), true), FilterStatus::Continue, "{rt}");
        let line = h.logs.lines().into_iter().map(|r| r.message).find(|m| m.starts_with("wasi-corners: ")).unwrap_or_else(|| panic!("{rt}: {:?}", h.logs.lines()));
        let expected = "args_sizes_get=0 args_count=0 args_get=0 clock_res_get_realtime=0 clock_res=1 \
            clock_res_get_process=58 fd_close=0 fd_datasync_stdout=0 fd_sync_other=8 fd_fdstat_get_stdout=0 \
            fd_filetype=2 fd_fdstat_get_other=8 fd_fdstat_set_flags=52 fd_filestat_get=8 fd_pread=52 \
            fd_pwrite=0 fd_pwrite_bytes=12 fd_prestat_get=8 fd_prestat_dir_name=52 fd_read=52 fd_readdir=20 \
            fd_renumber=58 fd_seek=0 fd_tell=0 fd_tell_offset=0 path_filestat_get=58 path_open=44 \
            poll_oneoff=0 poll_events=0 sched_yield=0 random_get_too_big=28 random_get=0";
        assert_eq!(line, format!("wasi-corners: {expected}"), "{rt}");
        // fd_pwrite to stdout is a log line, like fd_write.
        assert!(h.logs.contains("pwrite line"), "{rt}");
    };
    header_map_size_and_buffer_status => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        let mut headers = req("/", Some("abi-corners"));
        assert_eq!(s.request_headers(&mut chain, &mut headers, true), FilterStatus::Continue, "{rt}");
        // The filter added x-conformance-seen before asking for the size.
        let size = headers.serialize().len();
        let expected = format!("abi-corners: map_size={size} status=0 buffer_status=0 bad_map=2");
        assert!(h.logs.contains(&expected), "{rt}: want {expected:?} in {:?}", h.logs.lines());
    };
    deep_recursion_traps_and_the_host_survives => |rt: &str| {
        // Unbounded recursion must end in a "stack" trap on every runtime,
        // never in a crash of the host thread (a 2 MiB test thread here).
        let wasm = wat::parse_str(r#"(module
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32) i32.const 1024)
            (func $down (export "down") (param i32) (result i32)
              (i32.add (call $down (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
            (func (export "ok") (result i32) i32.const 7))"#).unwrap();
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        let mut p = Plugin::new(&module, cfg("recursion"), h.env.clone()).unwrap();
        let err = p.call_export("down", &FuncType::new(&[ValType::I32], &[ValType::I32]), &[runtime::Val::I32(0)]).unwrap_err();
        assert!(err.message.to_lowercase().contains("stack"), "{rt}: {err}");
        let mut fresh = Plugin::new(&module, cfg("recursion"), h.env.clone()).unwrap();
        let ok = fresh.call_export("ok", &FuncType::new(&[], &[ValType::I32]), &[]).unwrap();
        assert_eq!(ok, Some(runtime::Val::I32(7)), "{rt}");
    };
    interrupt_from_another_thread => |rt: &str| {
        let wasm = wat::parse_str(r#"(module
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32) i32.const 1024)
            (func (export "spin") (loop (br 0))))"#).unwrap();
        let h = Harness::new();
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        // A deadline far away: only the interrupt can stop the loop.
        let limits = Limits { call_deadline: Some(Duration::from_secs(120)), ..Limits::default() };
        let mut p = Plugin::new(&module, cfg("spin").limits(limits), h.env.clone()).unwrap();
        let Some(interrupt) = p.interrupt_handle() else {
            // wasmi has no cross-thread interrupt (docs/proxy-wasm-host.md);
            // fuel bounds its calls instead.
            assert_eq!(rt, "wasmi", "only wasmi lacks an interrupt handle");
            return;
        };
        let started = std::time::Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            interrupt();
        });
        let err = p.call_export("spin", &FuncType::new(&[], &[]), &[]).unwrap_err();
        t.join().unwrap();
        assert_eq!(err.kind, runtime::TrapKind::Interrupted, "{rt}: {err}");
        assert!(started.elapsed() < Duration::from_secs(60), "{rt}: stopped by the interrupt, not the deadline");
    };
    load_errors_are_clear => |rt: &str| {
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let err = WasmModule::new(runtime.as_ref(), b"garbage").unwrap_err().to_string();
        assert!(err.contains("corrupted"), "{rt}: {err}");
        let wasm = wat::parse_str(r#"(module (func (export "proxy_abi_version_0_x_x")))"#).unwrap();
        let err = WasmModule::new(runtime.as_ref(), &wasm).unwrap_err().to_string();
        assert!(err.contains("unknown Proxy-Wasm ABI version"), "{rt}: {err}");
        // An import this host does not provide fails at instantiation, by name.
        let wasm = wat::parse_str(r#"(module (import "env" "proxy_nonexistent" (func (param i32)))
            (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")) (func (export "malloc") (param i32) (result i32) i32.const 0))"#).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        let err = Plugin::new(&module, cfg("x"), HostEnv::default()).unwrap_err().to_string();
        assert!(err.contains("unknown import env.proxy_nonexistent"), "{rt}: {err}");
        // A 0.2.0 module may not import proxy_get_log_level (0.2.1 only).
        let wasm = wat::parse_str(r#"(module (import "env" "proxy_get_log_level" (func (param i32) (result i32)))
            (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0")) (func (export "malloc") (param i32) (result i32) i32.const 0))"#).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &wasm).unwrap();
        let err = Plugin::new(&module, cfg("x"), HostEnv::default()).unwrap_err().to_string();
        assert!(err.contains("proxy_get_log_level"), "{rt}: {err}");
    };
}

#[test]
fn runtime_not_compiled_in_is_a_clear_error() {
    let err = nasp::wasm::runtime_by_name("v8")
        .err()
        .expect("v8 is not a runtime")
        .to_string();
    assert!(
        err.contains("\"v8\" is not compiled into this build"),
        "{err}"
    );
    for r in nasp::wasm::Runtime::ALL {
        assert_eq!(r.create().is_ok(), r.is_compiled_in(), "{r:?}");
    }
}

#[test]
fn test_modules_together_import_every_host_function() {
    // The filters under filters/ plus the hand-written modules of this suite
    // must reach every host function of the table; a new host function
    // without a test that calls it fails here.
    let this_suite = include_str!("proxywasm_conformance.rs");
    let info = ModuleInfo::parse(&conformance_wasm()).expect("conformance filter parses");
    let mut missing = Vec::new();
    for f in nasp::wasm::abi::HostFn::ALL {
        let (module, name, ..) = f.spec();
        // WASI functions are listed once under "wasi" and linked under both
        // wasi_snapshot_preview1 and wasi_unstable (same code).
        let modules: &[&str] = if module == "wasi" {
            &["wasi_snapshot_preview1", "wasi_unstable"]
        } else {
            &[module]
        };
        let in_filter = info
            .imports
            .iter()
            .any(|(m, n, _)| modules.contains(&m.as_str()) && n == name);
        let in_wat = modules
            .iter()
            .any(|m| this_suite.contains(&format!("(import \"{m}\" \"{name}\"")));
        if !(in_filter || in_wat) {
            missing.push(format!("{module}.{name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "host functions no test module calls: {missing:?}"
    );
}
