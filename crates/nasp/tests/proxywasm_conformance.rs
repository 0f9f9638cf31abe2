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

    fn chain_of(&self, rt: &str, configs: Vec<PluginConfig>) -> FilterChain {
        FilterChain::new(
            configs
                .into_iter()
                .map(|c| self.plugin(rt, c).unwrap_or_else(|e| panic!("{rt}: {e}")))
                .collect(),
        )
    }

    fn wat_plugin(&self, rt: &str, wat: &str, config: PluginConfig) -> Plugin {
        let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("{e}"));
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap_or_else(|e| panic!("{rt}: {e}"));
        let module =
            WasmModule::new(runtime.as_ref(), &wasm).unwrap_or_else(|e| panic!("{rt}: {e}"));
        Plugin::new(&module, config, self.env.clone()).unwrap_or_else(|e| panic!("{rt}: {e}"))
    }

    /// What the plugins logged, in order.
    fn messages(&self) -> Vec<String> {
        self.logs
            .lines()
            .iter()
            .map(|l| l.message.clone())
            .collect()
    }

    fn count(&self, needle: &str) -> usize {
        self.logs
            .lines()
            .iter()
            .filter(|l| l.message.contains(needle))
            .count()
    }

    fn chain(&self, rt: &str, config: PluginConfig) -> FilterChain {
        FilterChain::new(vec![
            self.plugin(rt, config)
                .unwrap_or_else(|e| panic!("{rt}: {e}")),
        ])
    }
}

/// The exports a 0.2.1 WAT module needs for its request callbacks to
/// run: a bump `malloc` over the module's own `$heap` global, and a root
/// that accepts its start and configuration.
macro_rules! wat_stream_root {
    () => {
        r#"
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "malloc") (param i32) (result i32)
              (local i32) global.get $heap local.set 1
              global.get $heap local.get 0 i32.add global.set $heap local.get 1)
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
            (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)"#
    };
}

fn props() -> Arc<dyn PropertyProvider> {
    let mut m = std::collections::HashMap::new();
    m.insert(
        "node.id".to_string(),
        PropertyValue::from("sidecar~10.0.0.1~pod.demo~demo.svc.cluster.local"),
    );
    Arc::new(MapProperties(m))
}

/// A plugin's provider: the node and the listener's direction.
fn plugin_props(node_id: &str, direction: i64) -> Arc<dyn PropertyProvider> {
    let mut m = std::collections::HashMap::new();
    m.insert("node.id".to_string(), PropertyValue::from(node_id));
    m.insert(
        "node.metadata.NAMESPACE".to_string(),
        PropertyValue::from("demo"),
    );
    m.insert(
        "listener_direction".to_string(),
        PropertyValue::Int(direction),
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

/// A module for the ABI corners: statuses land in i32 slots at 512 + 4·i,
/// read back with the `slot` export.
const CORNERS: &str = r#"(module
    (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
    (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
    (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
    (import "env" "proxy_done" (func $done (result i32)))
    (import "env" "proxy_define_metric" (func $def (param i32 i32 i32 i32) (result i32)))
    (import "env" "proxy_record_metric" (func $rec (param i32 i64) (result i32)))
    (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
    (import "env" "proxy_get_metric" (func $get (param i32 i32) (result i32)))
    (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
    (import "env" "proxy_get_shared_data" (func $sget (param i32 i32 i32 i32 i32) (result i32)))
    (import "env" "proxy_grpc_stream" (func $gstream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
    (import "env" "proxy_grpc_close" (func $gclose (param i32) (result i32)))
    (import "env" "proxy_grpc_cancel" (func $gcancel (param i32) (result i32)))
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    ;; one pair ("a", "b") followed by a stray byte
    (data (i32.const 0) "\01\00\00\00\01\00\00\00\01\00\00\00a\00b\00\ff")
    (data (i32.const 32) "ch" )
    (data (i32.const 40) "k1k2vv")
    (data (i32.const 48) "upsm")
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "malloc") (param i32) (result i32)
      (local i32) global.get $heap local.set 1
      global.get $heap local.get 0 i32.add global.set $heap local.get 1)
    (func $put (param i32 i32) (i32.store (i32.add (i32.const 512) (i32.mul (local.get 0) (i32.const 4))) (local.get 1)))
    (func (export "slot") (param i32) (result i32) (i32.load (i32.add (i32.const 512) (i32.mul (local.get 0) (i32.const 4)))))
    (func (export "proxy_on_context_create") (param i32 i32))
    (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
    (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
    (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
      (call $put (i32.const 0) (call $set_pairs (i32.const 0) (i32.const 0) (i32.const 17)))
      (call $put (i32.const 1) (call $tick (i32.const 250)))
      (call $put (i32.const 2) (call $continue (i32.const 3)))
      i32.const 2)
    (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) i32.const 2)
    (func (export "proxy_on_new_connection") (param i32) (result i32) i32.const 0)
    (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) i32.const 2)
    (func (export "proxy_on_done") (param i32) (result i32) (i32.ne (local.get 0) (i32.const 1)))
    (func (export "proxy_on_delete") (param i32)
      (if (i32.eq (local.get 0) (i32.const 1)) (then (call $put (i32.const 9) (i32.const 1)))))
    (func (export "done") (result i32) (call $done))
    (func (export "metrics") (result i32)
      (drop (call $def (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 600)))
      (drop (call $rec (i32.load (i32.const 600)) (i64.const 5)))
      (drop (call $rec (i32.load (i32.const 600)) (i64.const 5)))
      (drop (call $get (i32.load (i32.const 600)) (i32.const 608)))
      (call $put (i32.const 4) (i32.wrap_i64 (i64.load (i32.const 608))))
      (call $put (i32.const 5) (call $inc (i32.load (i32.const 600)) (i64.const 0)))
      (call $put (i32.const 6) (call $inc (i32.load (i32.const 600)) (i64.const -1)))
      (drop (call $def (i32.const 2) (i32.const 33) (i32.const 1) (i32.const 616)))
      (call $put (i32.const 7) (call $get (i32.load (i32.const 616)) (i32.const 624)))
      i32.const 0)
    (func (export "cas") (result i32)
      (call $put (i32.const 10) (call $sset (i32.const 40) (i32.const 2) (i32.const 44) (i32.const 2) (i32.const 7)))
      (drop (call $sget (i32.const 40) (i32.const 2) (i32.const 640) (i32.const 644) (i32.const 700)))
      (drop (call $sset (i32.const 42) (i32.const 2) (i32.const 44) (i32.const 2) (i32.const 0)))
      (drop (call $sget (i32.const 42) (i32.const 2) (i32.const 640) (i32.const 644) (i32.const 704)))
      (call $put (i32.const 11) (i32.sub (i32.load (i32.const 704)) (i32.load (i32.const 700))))
      i32.const 0)
    (func (export "grpc") (result i32)
      (drop (call $gstream (i32.const 48) (i32.const 2) (i32.const 50) (i32.const 1) (i32.const 51) (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 720)))
      (call $put (i32.const 12) (i32.load (i32.const 720)))
      (call $put (i32.const 13) (call $gclose (i32.load (i32.const 720))))
      (call $put (i32.const 14) (call $gcancel (i32.load (i32.const 720))))
      (call $put (i32.const 15) (call $gcancel (i32.load (i32.const 720))))
      i32.const 0))"#;

/// `fd_write` with 400 000 iovecs of one megabyte each (all the same bytes).
const FD_WRITE_BOMB: &str = r#"(module
    (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 70)
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "malloc") (param i32) (result i32) i32.const 0)
    (func (export "bomb") (result i32)
      (local $i i32) (local $at i32)
      (local.set $at (i32.const 1048576))
      (block $done (loop $fill
        (br_if $done (i32.ge_u (local.get $i) (i32.const 400000)))
        (i32.store (local.get $at) (i32.const 0))
        (i32.store (i32.add (local.get $at) (i32.const 4)) (i32.const 1048576))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $fill)))
      (call $fd_write (i32.const 1) (i32.const 1048576) (i32.const 400000) (i32.const 16)))
    (func (export "written") (result i32) (i32.load (i32.const 16))))"#;

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
            assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), false), FilterStatus::Continue);
            headers = s.request_header_map().clone();
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
            assert_eq!(s.request_trailers(&mut chain, std::mem::take(&mut trailers)), FilterStatus::Continue);
            trailers = s.request_trailer_map().clone();
            assert_eq!(trailers.get_str("x-trailer-seen").as_deref(), Some("yes"));
            let mut resp = HeaderMap::from_pairs([(":status", "200"), ("server", "envoy")]);
            assert_eq!(s.response_headers(&mut chain, std::mem::take(&mut resp), false), FilterStatus::Continue);
            resp = s.response_header_map().clone();
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
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::LocalResponse);
        let lr = s.local_response().expect("local response");
        assert_eq!(lr.status, 403);
        assert_eq!(lr.headers.get_str("x-denied-by").as_deref(), Some("conformance"));
        // The reply went through the response callbacks, with a :status, as
        // Envoy's local replies do: the filter copies :status into a header
        // and appends to the body at its end.
        assert_eq!(lr.headers.get_str("x-upstream-status").as_deref(), Some("403"), "{rt}: {lr:?}");
        assert!(lr.headers.get_str(":status").is_none(), "{rt}: :status is the status field");
        assert_eq!(String::from_utf8_lossy(&lr.body), "denied by conformance filter [filtered]", "{rt}");
        s.finish(&mut chain);
    };
    trap_fails_closed => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Fail);
        match chain.plugins[0].fail_state() {
            FailState::RuntimeError(m) => assert!(m.starts_with("Function: proxy_on_request_headers failed:"), "{rt}: {m}"),
            FailState::Ok => panic!("{rt}: the VM should have failed"),
        }
        assert!(h.logs.contains("conformance filter asked to trap"), "{rt}: the panic message is logged: {:?}", h.logs.lines());
        s.finish(&mut chain);
        // The dead instance is never called again; new streams fail closed.
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Fail);
    };
    fail_open_skips => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::FailOpen));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Continue);
        let mut s2 = chain.http_stream(props());
        let mut headers = req("/", None);
        assert_eq!(s2.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Continue);
        headers = s2.request_header_map().clone();
        assert!(headers.get_str("x-conformance-seen").is_none(), "{rt}: a failed fail-open plugin is skipped");
    };
    reload_gives_fresh_instance => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff: Duration::ZERO }));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Fail);
        let mut s2 = chain.http_stream(props());
        let mut headers = req("/", None);
        assert_eq!(s2.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Continue, "{rt}");
        headers = s2.request_header_map().clone();
        assert!(headers.get_str("x-conformance-seen").is_some());
        assert_eq!(chain.plugins[0].reloads(), 1);
    };
    reload_waits_for_backoff => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff: Duration::from_secs(3600) }));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Fail);
        let mut s2 = chain.http_stream(props());
        assert_eq!(s2.request_headers(&mut chain, req("/", None), true), FilterStatus::Fail);
        assert_eq!(chain.plugins[0].reloads(), 0);
    };
    infinite_loop_is_cut => |rt: &str| {
        let h = Harness::new();
        let limits = Limits { call_deadline: Some(Duration::from_millis(200)), ..Limits::default() };
        let mut chain = h.chain(rt, cfg("conf").limits(limits));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("loop")), true), FilterStatus::Fail);
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
        assert_eq!(s.request_headers(&mut chain, req("/", Some("memory")), true), FilterStatus::Fail);
        assert!(matches!(chain.plugins[0].fail_state(), FailState::RuntimeError(_)), "{rt}");
    };
    bad_pointers_get_invalid_memory_access => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("bad-pointer")), true), FilterStatus::Continue);
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
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Pause);
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
        assert_eq!(s.request_headers(&mut chain, req("/queued", Some("queue")), true), FilterStatus::Continue);
        assert!(h.logs.contains("queue ready: /queued"), "{rt}: {:?}", h.logs.lines());
    };
    tick => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").configuration("tick"));
        assert_eq!(chain.plugins[0].tick_period(), Duration::from_millis(100));
        chain.tick();
        assert!(h.logs.contains("tick"));
    };
    root_properties => |rt: &str| {
        // The plugin's provider answers the root context in every root
        // callback, as Envoy answers `node.*` and `listener_direction` from
        // the plugin's listener; without one the root sees nothing.
        let h = Harness::new();
        let outbound = plugin_props("sidecar~10.0.0.2~web-1.demo~demo.svc.cluster.local", 2);
        // The bare plugin runs first: the second one's `x-conformance-seen`
        // replaces its header, so the header shows the provider's plugin.
        let mut chain = h.chain_of(rt, vec![
            cfg("bare").configuration("passive"),
            cfg("outbound").configuration("tick").properties(outbound),
        ]);
        let want = "node.id=sidecar~10.0.0.2~web-1.demo~demo.svc.cluster.local namespace=demo listener_direction=2";
        for cb in ["on_vm_start", "on_configure"] {
            let line = format!("root properties in {cb}: {want}");
            assert_eq!(h.count(&line), 1, "{rt}: {line} in {:?}", h.logs.lines());
        }
        assert_eq!(
            h.count("root properties in on_configure: node.id=none namespace=none listener_direction=none"),
            1,
            "{rt}: a plugin without a provider gets NOT_FOUND: {:?}",
            h.logs.lines()
        );
        chain.tick();
        assert_eq!(h.count(&format!("root properties in on_tick: {want}")), 1, "{rt}: {:?}", h.logs.lines());
        // A stream: its provider first, the plugin's when it has no answer.
        let mut s = chain.http_stream(Arc::new(NoProperties));
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue);
        assert_eq!(
            s.request_header_map().get_str("x-conformance-seen").as_deref(),
            Some("root=conformance;node=sidecar~10.0.0.2~web-1.demo~demo.svc.cluster.local"),
            "{rt}: the stream falls back to the plugin's provider"
        );
        s.finish(&mut chain);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue);
        assert_eq!(
            s.request_header_map().get_str("x-conformance-seen").as_deref(),
            Some("root=conformance;node=sidecar~10.0.0.1~pod.demo~demo.svc.cluster.local"),
            "{rt}: the stream's own answer wins"
        );
        s.finish(&mut chain);
        // A reloaded VM gets the provider again.
        let h = Harness::new();
        let config = cfg("reload")
            .fail_policy(FailPolicy::Reload { backoff: Duration::ZERO })
            .properties(plugin_props("node-r", 1));
        let mut chain = h.chain(rt, config);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Fail);
        s.finish(&mut chain);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue, "{rt}");
        s.finish(&mut chain);
        let line = "root properties in on_configure: node.id=node-r namespace=demo listener_direction=1";
        assert_eq!(h.count(line), 2, "{rt}: {:?}", h.logs.lines());
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
    tcp_chain_plugins_see_the_buffer_as_the_previous_left_it => |rt: &str| {
        // Two TCP plugins: the first prepends ">" to downstream data, so the
        // second is told 5 bytes for "ping" (Envoy passes the current buffer
        // length), and both count what they were told.
        let h = Harness::new();
        let mut chain = h.chain_of(
            rt,
            vec![cfg("first").configuration("tcp"), cfg("second").configuration("tcp")],
        );
        let (mut s, _) = chain.tcp_stream(props());
        let (_, data) = s.downstream_data(&mut chain, b"ping", false);
        assert_eq!(data, b">>ping", "{rt}");
        s.downstream_close(&mut chain, 2);
        assert_eq!(h.count("downstream closed after 4 bytes"), 1, "{rt}: {:?}", h.logs.lines());
        assert_eq!(h.count("downstream closed after 5 bytes"), 1, "{rt}: {:?}", h.logs.lines());
        s.finish(&mut chain);
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
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue);
        assert!(h.logs.contains("missing"), "{rt}: {:?}", h.logs.lines());
        // proxy_continue_request then proxy_continue_response (0.1.0 forms).
        assert_eq!(s.state().lock().unwrap().continued, vec![0, 1], "{rt}");
    };
    batch_property_read_answers_each_path_in_order => |rt: &str| {
        // `nasp_get_properties` with two paths (one the stream has, one
        // nobody has), logged as the guest got it; then arguments cut
        // short by a byte, which must be BAD_ARGUMENT (2).
        let wat = concat!(r#"(module
            (import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $heap (mut i32) (i32.const 4096))
            (data (i32.const 0) "\07\00\00\00node\00id\07\00\00\00missing")
            (data (i32.const 64) "nasp_get_propertiesbad-argument")
"#, wat_stream_root!(), r#"
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
              (if (i32.eqz (call $ff (i32.const 64) (i32.const 19) (i32.const 0) (i32.const 22) (i32.const 300) (i32.const 304)))
                (then (drop (call $log (i32.const 2) (i32.load (i32.const 300)) (i32.load (i32.const 304))))))
              (if (i32.eq (call $ff (i32.const 64) (i32.const 19) (i32.const 0) (i32.const 21) (i32.const 300) (i32.const 304)) (i32.const 2))
                (then (drop (call $log (i32.const 2) (i32.const 83) (i32.const 12)))))
              i32.const 0))"#);
        let node_id = "sidecar~10.0.0.1~pod.demo~demo.svc.cluster.local";
        let mut expected = (node_id.len() as u32).to_le_bytes().to_vec();
        expected.extend_from_slice(node_id.as_bytes());
        expected.extend_from_slice(&u32::MAX.to_le_bytes());
        let expected = String::from_utf8_lossy(&expected).into_owned();

        let h = Harness::new();
        let mut chain = FilterChain::new(vec![h.wat_plugin(rt, wat, cfg("batch"))]);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue, "{rt}");
        let lines = h.messages();
        assert!(lines.contains(&expected), "{rt}: {lines:?}");
        assert!(lines.iter().any(|l| l == "bad-argument"), "{rt}: {lines:?}");

        // An embedder's function of the same name replaces the built-in.
        let mut h = Harness::new();
        let mut foreign = std::collections::HashMap::new();
        let own: nasp::wasm::env::ForeignFunction = Arc::new(|_args: &[u8]| Ok(b"own".to_vec()));
        foreign.insert(nasp::wasm::env::GET_PROPERTIES.to_string(), own);
        h.env.foreign = Arc::new(foreign);
        let mut chain = FilterChain::new(vec![h.wat_plugin(rt, wat, cfg("batch"))]);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue, "{rt}");
        let lines = h.messages();
        assert!(lines.iter().any(|l| l == "own"), "{rt}: {lines:?}");
        assert!(!lines.contains(&expected), "{rt}: {lines:?}");
    };
    deep_property_paths_reach_the_filter_state_only => |rt: &str| {
        // A 17-segment key set with dots is read back with NULs; a path of
        // 60 000 NULs is absent, then set, then read in a batch (it is
        // matched as text, never split into segments).
        let wat = concat!(r#"(module
            (import "env" "proxy_get_property" (func $get (param i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_set_property" (func $set (param i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))
            (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
            (memory (export "memory") 2)
            (global $heap (mut i32) (i32.const 70000))
            (data (i32.const 0) "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q")
            (data (i32.const 64) "a\00b\00c\00d\00e\00f\00g\00h\00i\00j\00k\00l\00m\00n\00o\00p\00q")
            (data (i32.const 128) "deep")
            (data (i32.const 136) "absent")
            (data (i32.const 144) "nasp_get_properties")
            (data (i32.const 256) "\60\ea\00\00")
"#, wat_stream_root!(), r#"
            (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
              (drop (call $set (i32.const 0) (i32.const 33) (i32.const 128) (i32.const 4)))
              (if (i32.eqz (call $get (i32.const 64) (i32.const 33) (i32.const 200) (i32.const 204)))
                (then (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
              (if (i32.eq (call $get (i32.const 260) (i32.const 60000) (i32.const 200) (i32.const 204)) (i32.const 1))
                (then (drop (call $log (i32.const 2) (i32.const 136) (i32.const 6)))))
              (drop (call $set (i32.const 260) (i32.const 60000) (i32.const 128) (i32.const 4)))
              (if (i32.eqz (call $ff (i32.const 144) (i32.const 19) (i32.const 256) (i32.const 60004) (i32.const 200) (i32.const 204)))
                (then (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
              i32.const 0))"#);
        let h = Harness::new();
        let mut chain = FilterChain::new(vec![h.wat_plugin(rt, wat, cfg("deep"))]);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue, "{rt}");
        let lines = h.messages();
        assert_eq!(lines, ["deep", "absent", "\u{4}\0\0\0deep"], "{rt}");
    };
    istio_stats_reports_the_same_without_the_batch_read => |rt: &str| {
        // The stats filter reads its report's properties in one
        // `nasp_get_properties` call; on a host without it (an embedder's
        // function of that name answering NOT_FOUND stands in for Envoy)
        // it reads them one by one, and the series are the same.
        let scrape = |without_batch: bool| {
            let mut h = Harness::new();
            if without_batch {
                let mut foreign = std::collections::HashMap::new();
                let absent: nasp::wasm::env::ForeignFunction =
                    Arc::new(|_args: &[u8]| Err(nasp::wasm::abi::status::NOT_FOUND));
                foreign.insert(nasp::wasm::env::GET_PROPERTIES.to_string(), absent);
                h.env.foreign = Arc::new(foreign);
            }
            let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
            let module = WasmModule::new(runtime.as_ref(), nasp::default_filters::ISTIO_STATS_WASM).unwrap();
            let config = PluginConfig::new("stats")
                .root_id("stats_outbound")
                .properties(plugin_props("sidecar~10.0.0.2~web-1.demo~demo.svc.cluster.local", 2));
            let mut chain = FilterChain::new(vec![Plugin::new(&module, config, h.env.clone()).unwrap()]);
            let mut m = std::collections::HashMap::new();
            for (k, v) in [
                ("cluster_name", "outbound|80||echo.demo.svc.cluster.local"),
                ("route_name", "echo"),
                ("upstream.uri_san_peer_certificate", "spiffe://cluster.local/ns/demo/sa/echo"),
                ("upstream.uri_san_local_certificate", "spiffe://cluster.local/ns/demo/sa/web"),
            ] {
                m.insert(k.to_string(), PropertyValue::from(v));
            }
            m.insert("response.code".to_string(), PropertyValue::Int(503));
            // A fixed duration: the clock's would differ between the runs.
            m.insert("request.duration".to_string(), PropertyValue::Int(7_000_000));
            m.insert("request.total_size".to_string(), PropertyValue::Int(120));
            m.insert("response.total_size".to_string(), PropertyValue::Int(40));
            let mut s = chain.http_stream(Arc::new(MapProperties(m)));
            assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue, "{rt}");
            s.finish(&mut chain);
            h.env.metrics.prometheus_text()
        };
        let batched = scrape(false);
        let one_by_one = scrape(true);
        let line = batched
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap_or_else(|| panic!("{rt}: {batched}"));
        for want in [
            r#"response_code="503""#,
            r#"destination_service_name="echo""#,
            r#"destination_principal="spiffe://cluster.local/ns/demo/sa/echo""#,
            r#"source_principal="spiffe://cluster.local/ns/demo/sa/web""#,
            r#"reporter="source""#,
        ] {
            assert!(line.contains(want), "{rt}: {want} in {line}");
        }
        assert_eq!(batched, one_by_one, "{rt}");
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
            assert_eq!(s.request_headers(&mut chain, req("/", Some("wasi")), true), FilterStatus::Continue, "{rt}");
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
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut request), true), FilterStatus::Continue);
        request = s.request_header_map().clone();
        assert_eq!(request.get_str("x-path-seen").as_deref(), Some("/lean"), "{rt}");
        let mut response = HeaderMap::from_pairs([(":status", "204")]);
        assert_eq!(s.response_headers(&mut chain, std::mem::take(&mut response), true), FilterStatus::Continue);
        response = s.response_header_map().clone();
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
        assert_eq!(s.request_headers(&mut chain, req("/", Some("wasi-corners")), true), FilterStatus::Continue, "{rt}");
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
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Continue, "{rt}");
        headers = s.request_header_map().clone();
        // The filter added x-conformance-seen before asking for the size.
        // Envoy's byte size: names and values, no serialization overhead.
        let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
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
    resume_continues_after_the_paused_plugin => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain_of(rt, vec![cfg("active"), cfg("passive").configuration("passive")]);
        let mut s = chain.http_stream(props());
        let mut headers = req("/", Some("callout"));
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Pause, "{rt}");
        headers = s.request_header_map().clone();
        assert_eq!(s.paused(Direction::Request), Some(Stage::Headers));
        assert!(headers.get_str("x-passive-seen").is_none(), "{rt}: the second plugin waits");
        let (token, _) = h.callouts.http.lock().unwrap()[0].clone();
        chain.plugins[0].on_http_call_response(token, HeaderMap::from_pairs([(":status", "200")]), b"answer".to_vec(), HeaderMap::new());
        let resumed = s.resume_continued(&mut chain);
        assert_eq!(resumed.len(), 1, "{rt}: {resumed:?}");
        assert_eq!(resumed[0].0, Direction::Request);
        assert_eq!(resumed[0].1.status, FilterStatus::Continue, "{rt}");
        let st = s.state().lock().unwrap();
        assert_eq!(st.request_headers.get_str("x-callout-body").as_deref(), Some("answer"), "{rt}");
        assert!(st.request_headers.get_str("x-passive-seen").is_some(), "{rt}: the plugin after the paused one ran");
        drop(st);
        // Each plugin saw the request headers once: the chain did not start over.
        assert_eq!(h.count("request headers:"), 2, "{rt}: {:?}", h.logs.lines());
        assert_eq!(s.paused(Direction::Request), None);
        s.finish(&mut chain);
    };
    body_paused_at_its_end_stays_buffered_for_the_resumed_filter => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain_of(rt, vec![cfg("active"), cfg("passive").configuration("passive")]);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("pause-body")), false), FilterStatus::Continue);
        let (st, body) = s.request_body(&mut chain, b"hello", true);
        assert_eq!((st, body.as_slice()), (FilterStatus::Pause, &b""[..]), "{rt}: a body paused at its end is not forwarded");
        let (token, call) = h.callouts.http.lock().unwrap()[0].clone();
        assert_eq!(call.headers.get_str(":path").as_deref(), Some("/body"));
        chain.plugins[0].on_http_call_response(token, HeaderMap::from_pairs([(":status", "200")]), b"ok".to_vec(), HeaderMap::new());
        let resumed = s.resume_continued(&mut chain);
        assert_eq!(resumed.len(), 1, "{rt}");
        // The passive plugin upper-cases the whole body at its end.
        assert_eq!(resumed[0].1, Resumed { status: FilterStatus::Continue, body: Some(b"HELLO".to_vec()), trailers: false }, "{rt}");
        assert_eq!(h.count("paused for a callout"), 1, "{rt}: the pausing plugin is not called again");
        s.finish(&mut chain);
    };
    dropped_stream_runs_its_teardown_and_frees_its_state => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", None), true), FilterStatus::Continue);
        assert_eq!(chain.plugins[0].live_streams(), 1);
        // What a cancelled request future does: drop without finish().
        drop(s);
        assert_eq!(chain.reap_dropped(), 1, "{rt}");
        assert!(h.logs.contains("#2 log"), "{rt}: on_log ran: {:?}", h.logs.lines());
        assert_eq!(chain.plugins[0].live_streams(), 0, "{rt}: its state is freed");
        // TCP too, reaped by the next use of the chain.
        let mut chain = h.chain(rt, cfg("conf").configuration("tcp"));
        let (s, _) = chain.tcp_stream(props());
        drop(s);
        let (s2, _) = chain.tcp_stream(props());
        assert!(h.logs.contains("tcp log"), "{rt}: {:?}", h.logs.lines());
        assert_eq!(chain.plugins[0].live_streams(), 1, "{rt}: only the new stream is alive");
        s2.finish(&mut chain);
        assert_eq!(chain.plugins[0].live_streams(), 0);
    };
    stream_is_bound_to_its_chain => |rt: &str| {
        let h = Harness::new();
        let mut a = h.chain(rt, cfg("a"));
        let mut b = h.chain(rt, cfg("b"));
        let mut s = a.http_stream(props());
        assert_eq!(s.request_headers(&mut b, req("/", None), true), FilterStatus::Fail, "{rt}");
        assert_eq!(h.count("request headers:"), 0, "{rt}: no plugin of the other chain was called");
        s.finish(&mut b);
        assert_eq!(b.plugins[0].fail_state(), &FailState::Ok);
        assert_eq!(a.plugins[0].live_streams(), 1, "{rt}: finish through another chain does nothing");
        assert_eq!(a.reap_dropped(), 1, "{rt}: its own chain ends it");
        assert_eq!(a.plugins[0].live_streams(), 0);
    };
    reload_never_delivers_stale_streams_or_tokens => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff: Duration::ZERO }));
        let mut old = chain.http_stream(props());
        assert_eq!(old.request_headers(&mut chain, req("/", Some("callout")), false), FilterStatus::Pause);
        let (old_token, _) = h.callouts.http.lock().unwrap()[0].clone();
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("trap")), true), FilterStatus::Fail);
        let mut fresh = chain.http_stream(props());
        assert_eq!(chain.plugins[0].reloads(), 1, "{rt}");
        // The stream of the failed VM fails closed and never reaches the new VM.
        let mut resp = HeaderMap::from_pairs([(":status", "200")]);
        assert_eq!(old.response_headers(&mut chain, std::mem::take(&mut resp), true), FilterStatus::Fail, "{rt}");
        chain.plugins[0].on_http_call_response(old_token, HeaderMap::from_pairs([(":status", "200")]), b"late".to_vec(), HeaderMap::new());
        old.finish(&mut chain);
        s.finish(&mut chain);
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok, "{rt}: the fresh VM never saw a stale id");
        assert!(!h.logs.contains("root got callout response"), "{rt}");
        // The fresh VM works, and its tokens are new.
        let mut headers = req("/", Some("callout"));
        assert_eq!(fresh.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Pause, "{rt}");
        let (new_token, _) = h.callouts.http.lock().unwrap()[1].clone();
        assert_ne!(new_token, old_token, "{rt}: tokens are unique across VMs");
        chain.plugins[0].on_http_call_response(new_token, HeaderMap::from_pairs([(":status", "200")]), b"fresh".to_vec(), HeaderMap::new());
        assert_eq!(fresh.state().lock().unwrap().request_headers.get_str("x-callout-body").as_deref(), Some("fresh"));
        fresh.finish(&mut chain);
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok, "{rt}");
    };
    reload_backoff_resets_after_a_healthy_period => |rt: &str| {
        let h = Harness::new();
        let backoff = Duration::from_millis(20);
        let mut chain = h.chain(rt, cfg("conf").fail_policy(FailPolicy::Reload { backoff }));
        let trap = |chain: &mut FilterChain| {
            let mut s = chain.http_stream(props());
            assert_eq!(s.request_headers(chain, req("/", Some("trap")), true), FilterStatus::Fail);
        };
        let wait_reload = |chain: &mut FilterChain| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let mut s = chain.http_stream(props());
                if s.request_headers(chain, req("/", None), true) == FilterStatus::Continue {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "no reload");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        trap(&mut chain);
        assert_eq!(chain.plugins[0].reload_delay(), Some(backoff), "{rt}");
        wait_reload(&mut chain);
        trap(&mut chain);
        assert_eq!(chain.plugins[0].reload_delay(), Some(backoff * 2), "{rt}: a quick second failure doubles it");
        wait_reload(&mut chain);
        // Healthy for longer than twice the last delay: the backoff starts over.
        std::thread::sleep(Duration::from_millis(100));
        trap(&mut chain);
        assert_eq!(chain.plugins[0].reload_delay(), Some(backoff), "{rt}");
    };
    idle_consumer_vm_gets_queue_ready => |rt: &str| {
        let h = Harness::new();
        let mut consumer = h.chain(rt, cfg("consumer"));
        let mut producer = h.chain(rt, cfg("producer").configuration("producer"));
        let mut s = producer.http_stream(props());
        assert_eq!(s.request_headers(&mut producer, req("/posted", Some("queue")), true), FilterStatus::Continue);
        s.finish(&mut producer);
        assert!(!h.logs.contains("queue ready"), "{rt}: not delivered to the producer");
        let key = consumer.plugins[0].vm_key().unwrap();
        assert!(h.env.shared.has_ready(key), "{rt}: posted to the consumer VM");
        consumer.dispatch_pending();
        assert!(h.logs.contains("queue ready: /posted"), "{rt}: the idle consumer got it: {:?}", h.logs.lines());
        // A dead consumer's notifications are dropped.
        let mut c = consumer.http_stream(props());
        assert_eq!(c.request_headers(&mut consumer, req("/", Some("trap")), true), FilterStatus::Fail);
        let mut s = producer.http_stream(props());
        s.request_headers(&mut producer, req("/late", Some("queue")), true);
        assert!(!h.env.shared.has_ready(key), "{rt}");
        s.finish(&mut producer);
    };
    pseudo_headers_stay_first => |rt: &str| {
        let h = Harness::new();
        let mut chain = h.chain(rt, cfg("conf"));
        let mut s = chain.http_stream(props());
        let mut headers = req("/orig", Some("pseudo"));
        assert_eq!(s.request_headers(&mut chain, std::mem::take(&mut headers), true), FilterStatus::Continue);
        headers = s.request_header_map().clone();
        let names: Vec<String> = headers.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect();
        assert_eq!(&names[..4], &[":method", ":path", ":authority", ":custom"], "{rt}: {names:?}");
        assert!(names[4..].iter().all(|n| !n.starts_with(':')), "{rt}: {names:?}");
        assert_eq!(headers.get_str(":path").as_deref(), Some("/rewritten"));
    };
    vm_configuration_and_log_level => |rt: &str| {
        let logs = MemoryLogSink::with_level(LogLevel::Warn);
        let env = HostEnv { logs: Arc::new(logs.clone()), ..HostEnv::default() };
        let runtime = nasp::wasm::runtime_by_name(rt).unwrap();
        let module = WasmModule::new(runtime.as_ref(), &conformance_wasm()).unwrap();
        let mut chain = FilterChain::new(vec![Plugin::new(&module, cfg("conf"), env).unwrap()]);
        let mut s = chain.http_stream(props());
        assert_eq!(s.request_headers(&mut chain, req("/", Some("log-level")), true), FilterStatus::Continue);
        assert!(logs.contains("log level 3 (status 0)"), "{rt}: the configured level: {:?}", logs.lines());
        assert!(!logs.contains("request headers:"), "{rt}: info lines are below the level");
        let h = Harness::new();
        let _chain = h.chain(rt, cfg("conf"));
        assert!(h.logs.contains("vm configuration during configure: vmcfg"), "{rt}: {:?}", h.logs.lines());
    };
    abi_statuses_as_envoy => |rt: &str| {
        // Callback return values, proxy_done, metrics, shared data CAS,
        // malformed pairs, tick period from a stream, continue_stream
        // (UPSTREAM) and gRPC close vs cancel.
        let h = Harness::new();
        let p = h.wat_plugin(rt, CORNERS, cfg("corners"));
        let mut chain = FilterChain::new(vec![p]);
        let ty = FuncType::new(&[], &[ValType::I32]);
        let slot = |chain: &mut FilterChain, i: i32| chain.plugins[0].call_export("slot", &FuncType::new(&[ValType::I32], &[ValType::I32]), &[runtime::Val::I32(i)]).unwrap();
        let mut s = chain.http_stream(props());
        // Headers return 2 (ContinueAndEndStream): continue.
        assert_eq!(s.request_headers(&mut chain, req("/", None), false), FilterStatus::Continue, "{rt}");
        assert_eq!(slot(&mut chain, 0), Some(runtime::Val::I32(2)), "{rt}: trailing bytes after the pairs are BAD_ARGUMENT");
        assert_eq!(slot(&mut chain, 1), Some(runtime::Val::I32(0)), "{rt}: tick period from a stream is accepted");
        assert_eq!(chain.plugins[0].tick_period(), Duration::from_millis(250), "{rt}: and applies to its root");
        assert_eq!(slot(&mut chain, 2), Some(runtime::Val::I32(12)), "{rt}: continue_stream(UPSTREAM) is UNIMPLEMENTED");
        // A body callback returning 2 is StopIterationAndWatermark.
        assert_eq!(s.request_body(&mut chain, b"x", true).0, FilterStatus::Pause, "{rt}");
        s.finish(&mut chain);
        let (mut t, _) = chain.tcp_stream(props());
        assert_eq!(t.downstream_data(&mut chain, b"x", false).0, FilterStatus::Pause, "{rt}: non-zero TCP return stops");
        t.finish(&mut chain);
        // Metrics.
        assert_eq!(chain.plugins[0].call_export("metrics", &ty, &[]).unwrap(), Some(runtime::Val::I32(0)));
        assert_eq!(slot(&mut chain, 4), Some(runtime::Val::I32(10)), "{rt}: record_metric on a counter adds");
        assert_eq!(slot(&mut chain, 5), Some(runtime::Val::I32(2)), "{rt}: zero increment of a counter");
        assert_eq!(slot(&mut chain, 6), Some(runtime::Val::I32(2)), "{rt}: negative increment of a counter");
        assert_eq!(slot(&mut chain, 7), Some(runtime::Val::I32(2)), "{rt}: get_metric on a histogram");
        // Shared data.
        chain.plugins[0].call_export("cas", &ty, &[]).unwrap();
        assert_eq!(slot(&mut chain, 10), Some(runtime::Val::I32(0)), "{rt}: CAS on a missing key inserts");
        assert_eq!(slot(&mut chain, 11), Some(runtime::Val::I32(1)), "{rt}: one CAS counter for all keys");
        // gRPC close is not cancel.
        chain.plugins[0].call_export("grpc", &ty, &[]).unwrap();
        let token = match slot(&mut chain, 12) { Some(runtime::Val::I32(t)) => t as u32, other => panic!("{rt}: {other:?}") };
        assert_eq!(slot(&mut chain, 13), Some(runtime::Val::I32(0)));
        assert_eq!(slot(&mut chain, 14), Some(runtime::Val::I32(0)));
        assert_eq!(slot(&mut chain, 15), Some(runtime::Val::I32(1)), "{rt}: a cancelled call is gone");
        assert_eq!(*h.callouts.closed.lock().unwrap(), vec![token], "{rt}");
        assert_eq!(*h.callouts.cancelled.lock().unwrap(), vec![token], "{rt}");
        // proxy_done: NOT_FOUND unless pending done; on_delete follows it.
        assert_eq!(chain.plugins[0].call_export("done", &ty, &[]).unwrap(), Some(runtime::Val::I32(1)), "{rt}");
        assert!(!chain.plugins[0].shutdown(), "{rt}: on_done returned false");
        assert_eq!(slot(&mut chain, 9), Some(runtime::Val::I32(0)), "{rt}: not deleted yet");
        assert_eq!(chain.plugins[0].call_export("done", &ty, &[]).unwrap(), Some(runtime::Val::I32(0)), "{rt}");
        assert_eq!(slot(&mut chain, 9), Some(runtime::Val::I32(1)), "{rt}: on_delete followed proxy_done");
        assert_eq!(chain.plugins[0].fail_state(), &FailState::Ok);
    };
    fd_write_gathering_is_capped => |rt: &str| {
        // 400 000 iovecs naming the same megabyte: 400 GB if gathered whole.
        let h = Harness::new();
        let mut p = h.wat_plugin(rt, FD_WRITE_BOMB, cfg("fdbomb"));
        let r = p.call_export("bomb", &FuncType::new(&[], &[ValType::I32]), &[]).unwrap();
        assert_eq!(r, Some(runtime::Val::I32(0)), "{rt}: errno");
        let r = p.call_export("written", &FuncType::new(&[], &[ValType::I32]), &[]).unwrap();
        assert_eq!(r, Some(runtime::Val::I32(64 * 1024)), "{rt}: a short write of the cap");
        let line = h.logs.lines().into_iter().find(|l| l.plugin == "fdbomb").expect("a log line");
        assert_eq!(line.message.len(), 64 * 1024, "{rt}");
        assert_eq!(p.fail_state(), &FailState::Ok);
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
