//! proxy-wasm host benchmarks, per runtime: host→guest call, guest→host call,
//! compile, instantiate (plugin start), and one full HTTP stream lifecycle
//! through the conformance filter and through the lean `headers` filter. Run with `cargo bench -p nasp --bench
//! proxywasm` after `cargo xtask build-filters`; results in docs/benchmarks.md.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use nasp::wasm::runtime::{FuncType, Val, ValType};
use nasp::wasm::*;

const CALLS: &str = r#"(module
  (import "env" "pthread_equal" (func $eq (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) i32.const 1024)
  (func (export "nop") (param i32) (result i32) local.get 0)
  (func (export "host_calls") (param $n i32) (result i32) (local $acc i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $acc (i32.add (local.get $acc) (call $eq (local.get $n) (local.get $n))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    local.get $acc))"#;

fn read_filter(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../target/filters/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the filters first: cargo xtask build-filters")
    })
}

/// One HTTP stream through `module`: create, request headers, response
/// headers, done/log/delete.
fn lifecycle(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    module: &WasmModule,
) {
    let plugin = Plugin::new(
        module,
        PluginConfig::new("c").configuration("bench"),
        quiet_env(),
    )
    .expect("plugin");
    let mut chain = FilterChain::new(vec![plugin]);
    let provider: Arc<dyn PropertyProvider> = Arc::new(NoProperties);
    let req = HeaderMap::from_pairs([(":method", "GET"), (":path", "/"), (":authority", "echo")]);
    let resp = HeaderMap::from_pairs([(":status", "200")]);
    g.bench_function(name, |b| {
        b.iter(|| {
            let mut s = chain.http_stream(provider.clone());
            s.request_headers(&mut chain, req.clone(), true);
            s.response_headers(&mut chain, resp.clone(), true);
            s.finish(&mut chain);
        })
    });
}

fn quiet_env() -> HostEnv {
    #[derive(Debug)]
    struct Null;
    impl LogSink for Null {
        fn log(&self, _: LogRecord) {}
        fn level(&self) -> LogLevel {
            LogLevel::Critical
        }
    }
    HostEnv {
        logs: Arc::new(Null),
        ..HostEnv::default()
    }
}

fn bench(c: &mut Criterion) {
    let calls = wat::parse_str(CALLS).expect("valid wat");
    let filter = read_filter("conformance");
    for rt in Runtime::available_names() {
        let runtime = nasp::wasm::runtime_by_name(rt).expect("compiled in");
        let mut g = c.benchmark_group(rt);

        let module = WasmModule::new(runtime.as_ref(), &calls).expect("module");
        let mut p = Plugin::new(&module, PluginConfig::new("calls"), quiet_env()).expect("plugin");
        let ty = FuncType::new(&[ValType::I32], &[ValType::I32]);
        g.bench_function("host_to_guest_call", |b| {
            b.iter(|| p.call_export("nop", &ty, &[Val::I32(1)]))
        });
        const N: i32 = 1000;
        g.bench_function("guest_to_host_call_x1000", |b| {
            b.iter(|| p.call_export("host_calls", &ty, &[Val::I32(N)]))
        });

        g.bench_function("compile_conformance", |b| {
            b.iter(|| WasmModule::new(runtime.as_ref(), &filter).expect("compile"))
        });
        let module = WasmModule::new(runtime.as_ref(), &filter).expect("compile");
        g.bench_function("instantiate_and_start_plugin", |b| {
            b.iter(|| {
                Plugin::new(
                    &module,
                    PluginConfig::new("c").configuration("bench"),
                    quiet_env(),
                )
                .expect("plugin")
            })
        });

        lifecycle(&mut g, "http_stream_lifecycle", &module);
        let headers = WasmModule::new(runtime.as_ref(), &read_filter("headers")).expect("compile");
        lifecycle(&mut g, "http_stream_lifecycle_headers_filter", &headers);
        g.finish();
    }
}

trait Names {
    fn available_names() -> Vec<&'static str>;
}
impl Names for Runtime {
    fn available_names() -> Vec<&'static str> {
        Runtime::available()
            .into_iter()
            .map(Runtime::name)
            .collect()
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
