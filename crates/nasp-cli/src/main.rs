//! The `nasp` command.
//!
//! - `nasp wasm exec`: runs a proxy-wasm filter against a described HTTP
//!   exchange or TCP stream and prints a JSON transcript;
//! - `nasp wasm inspect`: prints a module's ABI version, imports, exports and
//!   the imports this host cannot satisfy;
//! - `nasp controlplane`: the embedded control plane (the Istio CA today);
//! - `nasp ca issue`: gets a workload certificate from a CA and writes it in
//!   Istio's file layout;
//! - `nasp xds resolve` / `nasp xds dump`: what an ADS server says about the
//!   mesh;
//! - `nasp demo`: the embedded control plane, a backend of three replicas
//!   and a frontend calling it over mTLS while the mesh changes live;
//! - `nasp serve`: one mesh workload running a built-in echo app;
//! - `nasp get`: a mesh-aware curl.

#[cfg(feature = "controlplane")]
mod demo;
mod get;
mod identity;
mod serve;
mod workload;
mod xds;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use nasp::wasm::{
    FailState, FilterChain, FilterStatus, HeaderMap, HostEnv, MapProperties, MemoryLogSink,
    ModuleInfo, Plugin, PluginConfig, PropertyValue, WasmModule,
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "nasp", version, about = "An Istio workload without a sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The traffic demo: mTLS, load balancing, a live weight shift and a
    /// lost replica, in one process (docs/cli.md).
    #[cfg(feature = "controlplane")]
    Demo(demo::DemoArgs),
    /// Run one mesh workload with a built-in echo app (HTTP, gRPC, TCP).
    Serve(serve::ServeArgs),
    /// A mesh-aware curl: send requests through the mesh, print who answered.
    Get(get::GetArgs),
    /// proxy-wasm filters.
    #[command(subcommand)]
    Wasm(WasmCommand),
    /// Run the embedded control plane (Istio CA; xDS joins later).
    #[cfg(feature = "controlplane")]
    Controlplane(identity::ControlPlaneArgs),
    /// Certificates from an Istio CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Ask an ADS server (istiod or `nasp controlplane`) about the mesh.
    #[command(subcommand)]
    Xds(XdsCommand),
}

#[derive(Subcommand)]
enum XdsCommand {
    /// Resolve HOST:PORT as a workload would: cluster, SNI, TLS, endpoints.
    Resolve(xds::ResolveArgs),
    /// Print the configuration received, as an Envoy config dump.
    Dump(xds::Connect),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Request a workload certificate and write cert-chain.pem, key.pem and
    /// root-cert.pem.
    Issue(identity::IssueArgs),
}

#[derive(Subcommand)]
enum WasmCommand {
    /// Run a filter as a proxy would and print a JSON transcript.
    Exec(ExecArgs),
    /// Print a module's ABI version, imports and exports.
    Inspect {
        /// The module.
        plugin: PathBuf,
    },
}

#[derive(clap::Args)]
struct ExecArgs {
    /// wasmtime, wasmi or wasm3.
    #[arg(long, default_value = "wasmtime")]
    runtime: String,
    /// A filter module; more than one runs them as one chain, in order. The
    /// n-th --root-id, --config and --vm-config belong to the n-th --plugin.
    #[arg(long, required = true)]
    plugin: Vec<PathBuf>,
    /// Root id (plugin_root_id) of the plugin in the same position.
    #[arg(long)]
    root_id: Vec<String>,
    /// Plugin configuration (a string, or @FILE) of the plugin in the same
    /// position.
    #[arg(long)]
    config: Vec<String>,
    /// VM configuration (a string, or @FILE) of the plugin in the same
    /// position.
    #[arg(long)]
    vm_config: Vec<String>,
    /// JSON object of properties by dotted path (e.g. {"node.id": "..."}),
    /// seen by the stream and by every plugin's root context.
    #[arg(long)]
    properties: Option<PathBuf>,
    /// JSON description of the exchange (see docs/wasm-exec.md).
    #[arg(long)]
    request: PathBuf,
}

/// The exchange to run.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Exchange {
    #[serde(default)]
    request: Option<Message>,
    #[serde(default)]
    response: Option<Message>,
    #[serde(default)]
    tcp: Option<Vec<Chunk>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Message {
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    trailers: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Chunk {
    /// "downstream" or "upstream".
    from: String,
    data: String,
    #[serde(default)]
    end_of_stream: bool,
}

fn arg_bytes(v: &str) -> Result<Vec<u8>> {
    match v.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {path}")),
        None => Ok(v.as_bytes().to_vec()),
    }
}

fn json_property(v: &Value) -> PropertyValue {
    match v {
        Value::String(s) => PropertyValue::Bytes(s.as_bytes().to_vec()),
        Value::Bool(b) => PropertyValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => PropertyValue::Int(i),
            (None, Some(u)) => PropertyValue::Uint(u),
            _ => PropertyValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::Object(m) => PropertyValue::Map(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
        ),
        Value::Array(a) => PropertyValue::Bytes(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
        ),
        Value::Null => PropertyValue::Bytes(Vec::new()),
    }
}

fn headers_json(h: &HeaderMap) -> Value {
    Value::Array(
        h.to_string_pairs()
            .into_iter()
            .map(|(k, v)| json!([k, v]))
            .collect(),
    )
}

/// Reads a JSON or YAML document: by extension (`.json`, `.yaml`, `.yml`),
/// else JSON first and YAML if that fails.
fn read_document<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    let yaml = |t: &str| {
        serde_saphyr::from_str::<T>(t)
            .with_context(|| format!("parsing {} as YAML", path.display()))
    };
    let json = |t: &str| {
        serde_json::from_str::<T>(t).with_context(|| format!("parsing {} as JSON", path.display()))
    };
    match ext {
        "yaml" | "yml" => yaml(&text),
        "json" => json(&text),
        _ => json(&text).or_else(|e| yaml(&text).map_err(|_| e)),
    }
}

fn exec(args: ExecArgs) -> Result<Value> {
    let n = args.plugin.len();
    for (flag, given) in [
        ("--root-id", args.root_id.len()),
        ("--config", args.config.len()),
        ("--vm-config", args.vm_config.len()),
    ] {
        if given > n {
            bail!("{given} {flag} for {n} --plugin: the n-th {flag} belongs to the n-th --plugin");
        }
    }
    let exchange: Exchange = read_document(&args.request)?;
    let mut props = HashMap::new();
    if let Some(p) = &args.properties {
        let v: Value = read_document(p)?;
        let Value::Object(m) = v else {
            bail!("{}: properties must be an object (a map)", p.display())
        };
        for (k, v) in m {
            props.insert(k, json_property(&v));
        }
    }
    let runtime = nasp::wasm::runtime_by_name(&args.runtime)?;
    let logs = MemoryLogSink::new();
    let env = HostEnv {
        logs: Arc::new(logs.clone()),
        ..HostEnv::default()
    };
    // One provider for the stream and for every root context.
    let provider: Arc<dyn nasp::wasm::PropertyProvider> = Arc::new(MapProperties(props));
    let mut plugins = Vec::with_capacity(n);
    let mut abi_versions = Vec::with_capacity(n);
    for (i, path) in args.plugin.iter().enumerate() {
        let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let module = WasmModule::new(runtime.as_ref(), &wasm)
            .with_context(|| format!("loading {}", path.display()))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        // Log lines name their plugin: the same file twice gets `stem#2`.
        let name = match args.plugin[..i]
            .iter()
            .filter(|p| p.file_stem() == path.file_stem())
            .count()
        {
            0 => stem.to_string(),
            k => format!("{stem}#{}", k + 1),
        };
        let arg = |v: &[String]| arg_bytes(v.get(i).map_or("", String::as_str));
        let config = PluginConfig::new(name)
            .root_id(args.root_id.get(i).cloned().unwrap_or_default())
            .configuration(arg(&args.config)?)
            .vm_configuration(arg(&args.vm_config)?)
            .properties(provider.clone());
        let plugin = Plugin::new(&module, config, env.clone())
            .with_context(|| format!("starting {}", path.display()))?;
        abi_versions.push(module.abi().as_str());
        plugins.push(plugin);
    }
    let mut chain = FilterChain::new(plugins);
    let mut out = serde_json::Map::new();
    out.insert("runtime".into(), json!(runtime.name()));
    out.insert("abi_version".into(), json!(abi_versions[0]));
    if let Some(chunks) = exchange.tcp {
        let (mut s, st) = chain.tcp_stream(provider);
        let mut steps = vec![json!({"callback": "new_connection", "status": st})];
        for c in chunks {
            let (st, data) = match c.from.as_str() {
                "downstream" => s.downstream_data(&mut chain, c.data.as_bytes(), c.end_of_stream),
                "upstream" => s.upstream_data(&mut chain, c.data.as_bytes(), c.end_of_stream),
                other => bail!("tcp chunk from {other:?}: expected \"downstream\" or \"upstream\""),
            };
            steps.push(
                json!({"from": c.from, "status": st, "forwarded": String::from_utf8_lossy(&data)}),
            );
        }
        s.downstream_close(&mut chain, 2);
        s.upstream_close(&mut chain, 2);
        let closed = s
            .state()
            .lock()
            .map(|st| st.closed.clone())
            .unwrap_or_default();
        s.finish(&mut chain);
        out.insert(
            "tcp".into(),
            json!({"steps": steps, "closed_streams": closed}),
        );
    } else {
        let mut s = chain.http_stream(provider);
        let req = exchange.request.unwrap_or_default();
        let mut steps = Vec::new();
        let mut request = json!({});
        let mut response = json!({});
        let mut stopped = false;
        let h = HeaderMap::from_pairs(
            req.headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        );
        let no_body = req.body.is_none() && req.trailers.is_empty();
        let st = s.request_headers(&mut chain, h, no_body);
        steps.push(json!({"callback": "request_headers", "status": st}));
        request["headers"] = headers_json(&s.request_header_map());
        stopped |= st != FilterStatus::Continue;
        if let (false, Some(body)) = (stopped, &req.body) {
            let (st, b) = s.request_body(&mut chain, body.as_bytes(), req.trailers.is_empty());
            steps.push(json!({"callback": "request_body", "status": st}));
            request["body"] = json!(String::from_utf8_lossy(&b));
            stopped |= st != FilterStatus::Continue;
        }
        if !stopped && !req.trailers.is_empty() {
            let t = HeaderMap::from_pairs(
                req.trailers
                    .iter()
                    .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            );
            let st = s.request_trailers(&mut chain, t);
            steps.push(json!({"callback": "request_trailers", "status": st}));
            request["trailers"] = headers_json(&s.request_trailer_map());
            stopped |= st != FilterStatus::Continue;
        }
        if let (false, Some(resp)) = (stopped, exchange.response) {
            let h = HeaderMap::from_pairs(
                resp.headers
                    .iter()
                    .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            );
            let no_body = resp.body.is_none() && resp.trailers.is_empty();
            let st = s.response_headers(&mut chain, h, no_body);
            steps.push(json!({"callback": "response_headers", "status": st}));
            response["headers"] = headers_json(&s.response_header_map());
            stopped |= st != FilterStatus::Continue;
            if let (false, Some(body)) = (stopped, &resp.body) {
                let (st, b) =
                    s.response_body(&mut chain, body.as_bytes(), resp.trailers.is_empty());
                steps.push(json!({"callback": "response_body", "status": st}));
                response["body"] = json!(String::from_utf8_lossy(&b));
                stopped |= st != FilterStatus::Continue;
            }
            if !stopped && !resp.trailers.is_empty() {
                let t = HeaderMap::from_pairs(
                    resp.trailers
                        .iter()
                        .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
                );
                let st = s.response_trailers(&mut chain, t);
                steps.push(json!({"callback": "response_trailers", "status": st}));
                response["trailers"] = headers_json(&s.response_trailer_map());
            }
        }
        let local = s.local_response().map(|l| {
            json!({"status": l.status, "details": l.details, "body": String::from_utf8_lossy(&l.body), "headers": headers_json(&l.headers), "grpc_status": l.grpc_status})
        });
        s.finish(&mut chain);
        out.insert("steps".into(), json!(steps));
        out.insert("request".into(), request);
        out.insert("response".into(), response);
        out.insert("local_response".into(), json!(local));
    }
    out.insert("logs".into(), json!(logs.lines()));
    out.insert("metrics".into(), json!(env.metrics.prometheus_text()));
    // `fail_state`: the first plugin that failed (Ok if none did).
    let fail = chain
        .plugins
        .iter()
        .map(|p| p.fail_state().clone())
        .find(|f| *f != FailState::Ok)
        .unwrap_or(FailState::Ok);
    out.insert("fail_state".into(), json!(fail));
    out.insert("failed".into(), json!(fail != FailState::Ok));
    if n > 1 {
        let each: Vec<Value> = chain
            .plugins
            .iter()
            .zip(&abi_versions)
            .map(|(p, abi)| json!({"name": p.name(), "abi_version": abi, "fail_state": p.fail_state()}))
            .collect();
        out.insert("plugins".into(), json!(each));
    }
    Ok(Value::Object(out))
}

fn inspect(path: &Path) -> Result<Value> {
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let info = ModuleInfo::parse(&wasm)?;
    let abi = info.require_abi().ok();
    let host = abi.map(nasp::wasm::abi::host_functions).unwrap_or_default();
    let unsatisfied: Vec<String> = info
        .imports
        .iter()
        .filter(|(m, n, ty)| {
            !host
                .iter()
                .any(|h| h.module == m && h.name == n && &h.ty == ty)
        })
        .map(|(m, n, ty)| format!("{m}.{n}{ty}"))
        .chain(
            info.non_function_imports
                .iter()
                .map(|(m, n)| format!("{m}.{n} (not a function)")),
        )
        .collect();
    Ok(json!({
        "abi_version": abi.map(|a| a.as_str()),
        "abi_error": info.require_abi().err().map(|e| e.to_string()),
        "imports": info.imports.iter().map(|(m, n, ty)| format!("{m}.{n}{ty}")).collect::<Vec<_>>(),
        "exports": info.exports.iter().map(|(n, ty)| format!("{n}{ty}")).collect::<Vec<_>>(),
        "unsatisfied_imports": unsatisfied,
        "custom_sections": info.custom_sections,
    }))
}

/// Errors end the process with one line on stderr (the whole cause chain,
/// no backtrace) and exit code 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nasp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NASP_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let out = match cli.command {
        #[cfg(feature = "controlplane")]
        Command::Demo(args) => return demo::demo(args),
        Command::Serve(args) => return serve::serve(args),
        Command::Get(args) => return get::get(args),
        Command::Wasm(WasmCommand::Exec(args)) => exec(args)?,
        Command::Wasm(WasmCommand::Inspect { plugin }) => inspect(&plugin)?,
        #[cfg(feature = "controlplane")]
        Command::Controlplane(args) => return identity::controlplane(args),
        Command::Ca(CaCommand::Issue(args)) => identity::issue(args)?,
        Command::Xds(XdsCommand::Resolve(args)) => xds::resolve(args)?,
        Command::Xds(XdsCommand::Dump(args)) => xds::dump(args)?,
    };
    identity::print_json(&out)
}
