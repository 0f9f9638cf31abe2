//! `nasp xds resolve` and `nasp xds dump`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nasp::xds::{AdsClient, AdsConfig, ClusterInfo, Protocol, ViewSettings, route};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Connect {
    /// The ADS server (`nasp controlplane` or istiod).
    #[arg(long)]
    xds: String,
    /// Use Delta xDS instead of State of the World.
    #[arg(long)]
    delta: bool,
    /// The node id the control plane sees (default: built like Istio's agent
    /// from POD_NAME, POD_NAMESPACE, INSTANCE_IPS, … in the environment).
    #[arg(long)]
    node_id: Option<String>,
    /// Connect over TLS, trusting this root (PEM); plaintext without it.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The name the server's certificate must carry (with --root).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    server_name: String,
    /// How long to wait for the configuration.
    #[arg(long, default_value = "10s", value_parser = crate::identity::parse_duration)]
    timeout: Duration,
    /// The workload's namespace (default: POD_NAMESPACE, else `default`):
    /// search domains `<ns>.svc.cluster.local`, `svc.cluster.local`,
    /// `cluster.local`, unless --search-domain is given.
    #[arg(long)]
    namespace: Option<String>,
    /// A DNS search domain (repeatable; replaces the namespace's defaults).
    #[arg(long = "search-domain")]
    search_domains: Vec<String>,
    /// Also subscribe to Istio's NDS name table.
    #[arg(long)]
    nds: bool,
}

impl Connect {
    async fn client(&self) -> Result<AdsClient> {
        let channel = match &self.root {
            Some(root) => {
                let pem =
                    std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
                let roots = nasp::identity::cert::pem_certs(&pem)?;
                nasp::identity::ca_client::grpc_channel(
                    &self.xds,
                    &roots,
                    &self.server_name,
                    self.timeout,
                )?
            }
            None => tonic::transport::Endpoint::from_shared(format!("http://{}", self.xds))
                .with_context(|| format!("bad address {:?}", self.xds))?
                .connect_timeout(self.timeout)
                .connect_lazy(),
        };
        let mut settings = nasp::xds::WorkloadSettings::from_env();
        if let Some(ns) = &self.namespace {
            settings.namespace = ns.clone();
        }
        let mut node = settings.node();
        if let Some(id) = &self.node_id {
            node.id = id.clone();
        }
        let mut config = AdsConfig::new(node);
        config.protocol = if self.delta {
            Protocol::Delta
        } else {
            Protocol::Sotw
        };
        config.nds = self.nds;
        config.view = ViewSettings {
            search_domains: if self.search_domains.is_empty() {
                settings.search_domains()
            } else {
                self.search_domains.clone()
            },
        };
        let client = AdsClient::start(channel, config);
        client
            .ready(self.timeout)
            .await
            .with_context(|| format!("no configuration from {}", self.xds))?;
        Ok(client)
    }
}

#[derive(clap::Args)]
pub struct ResolveArgs {
    /// `host:port` to resolve.
    target: String,
    #[command(flatten)]
    connect: Connect,
}

pub fn resolve(args: ResolveArgs) -> Result<Value> {
    let (host, port) = args
        .target
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .with_context(|| format!("{:?} is not host:port", args.target))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = args.connect.client().await?;
        let view = client.view();
        let Some(o) = view.outbound(&host, port) else {
            bail!("{host}:{port} is not in the mesh (no listener, route or cluster for it)");
        };
        let mut out = json!({
            "host": host,
            "port": port,
            "kind": if o.http().is_some() { "http" } else { "tcp" },
        });
        // The cluster of a TCP connection, or of a plain `GET /`.
        if let Some(c) = view.plain_cluster(&o) {
            for (k, v) in cluster_json(&c) {
                out[k] = v;
            }
        }
        if let Some(h) = o.http() {
            out["route_config"] = json!(h.route_config.name);
            out["virtual_host"] = json!(h.virtual_host.name);
            out["routes"] = h.virtual_host.routes.iter().map(route_json).collect();
            out["headers"] = mutations_json(&h.virtual_host.headers);
            out["fault"] = json!(h.virtual_host.fault.as_ref().map(|f| format!("{f:?}")));
        }
        Ok(out)
    })
}

fn cluster_json(c: &ClusterInfo) -> serde_json::Map<String, Value> {
    let v = json!({
        "cluster": c.name,
        "sni": c.sni,
        "tls": c.tls,
        "permissive": c.permissive,
        "expected_sans": c.expected_sans,
        "alpn": c.alpn,
        "endpoints": c.endpoints.iter().map(|e| e.address.clone()).collect::<Vec<_>>(),
        "endpoint_details": c.endpoints.iter().map(|e| json!({
            "address": e.address, "weight": e.weight, "locality": e.locality,
            "priority": e.priority, "healthy": e.healthy, "istio_mtls": e.istio_mtls,
            "health": format!("{:?}", e.health), "locality_weight": e.locality_weight,
        })).collect::<Vec<_>>(),
        "lb_policy": c.lb_policy,
        "tls_mode": c.upstream_tls.as_ref().map(|t| format!("{:?}", t.mode)),
        "trusted_ca": c.upstream_tls.as_ref().map(|t| format!("{:?}", t.trusted_ca)),
        "upstream_protocol": format!("{:?}", c.upstream_protocol),
        "connect_timeout_ms": c.connect_timeout.as_millis() as u64,
        "locality_weighted_lb": c.locality_weighted_lb,
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

fn ms(d: Option<Duration>) -> Value {
    json!(d.map(|d| d.as_millis() as u64))
}

fn string_match_json(m: &route::StringMatch) -> Value {
    use route::StringMatch as S;
    match m {
        S::Exact { value, ignore_case } => json!({"exact": value, "ignore_case": ignore_case}),
        S::Prefix { value, ignore_case } => json!({"prefix": value, "ignore_case": ignore_case}),
        S::Suffix { value, ignore_case } => json!({"suffix": value, "ignore_case": ignore_case}),
        S::Contains { value, ignore_case } => {
            json!({"contains": value, "ignore_case": ignore_case})
        }
        S::Regex(re) => json!({"regex": re.as_str()}),
    }
}

fn mutations_json(h: &route::HeaderMutations) -> Value {
    let adds = |v: &[route::HeaderAdd]| {
        v.iter()
            .map(|a| json!({"name": a.name, "value": a.value, "action": format!("{:?}", a.action)}))
            .collect::<Vec<_>>()
    };
    json!({
        "request_add": adds(&h.request_add),
        "request_remove": h.request_remove,
        "response_add": adds(&h.response_add),
        "response_remove": h.response_remove,
    })
}

fn retry_json(r: &route::RetryPolicy) -> Value {
    json!({
        "retry_on": r.retry_on.names(),
        "num_retries": r.num_retries,
        "per_try_timeout_ms": ms(r.per_try_timeout),
        "retriable_status_codes": r.retriable_status_codes,
        "back_off_ms": [r.back_off.base.as_millis() as u64, r.back_off.max.as_millis() as u64],
        "host_predicates": r.host_predicates.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
        "host_selection_retry_max_attempts": r.host_selection_retry_max_attempts,
    })
}

fn route_json(r: &route::Route) -> Value {
    use route::{ClusterTarget, HeaderValueMatch, PathMatch, RouteAction};
    let m = &r.matcher;
    let path = match &m.path {
        PathMatch::Prefix(p) => json!({"prefix": p}),
        PathMatch::Path(p) => json!({"path": p}),
        PathMatch::PathSeparatedPrefix(p) => json!({"path_separated_prefix": p}),
        PathMatch::Regex(re) => json!({"regex": re.as_str()}),
        PathMatch::Unsupported(what) => json!({"unsupported": what}),
    };
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| {
            let value = match &h.value {
                HeaderValueMatch::Present(p) => json!({"present": p}),
                HeaderValueMatch::String(s) => string_match_json(s),
                HeaderValueMatch::Range { start, end } => json!({"range": [start, end]}),
            };
            json!({"name": h.name, "match": value, "invert": h.invert})
        })
        .collect();
    let query: Vec<Value> = m
        .query_parameters
        .iter()
        .map(|q| json!({"name": q.name, "match": q.value.as_ref().map(string_match_json)}))
        .collect();
    let mut out = json!({
        "name": r.name,
        "match": {
            "path": path,
            "case_sensitive": m.case_sensitive,
            "headers": headers,
            "query_parameters": query,
            "grpc": m.grpc,
        },
        "headers": mutations_json(&r.headers),
        "fault": r.fault.as_ref().map(|f| format!("{f:?}")),
    });
    out["action"] = match &r.action {
        RouteAction::Forward(f) => {
            let target = match &f.target {
                ClusterTarget::Cluster(c) => json!({"cluster": c}),
                ClusterTarget::Header(h) => json!({"cluster_header": h}),
                ClusterTarget::Weighted(w) => json!({"weighted_clusters": w.iter().map(|l| json!({
                    "name": l.name, "cluster_header": l.cluster_header, "weight": l.weight,
                })).collect::<Vec<_>>()}),
            };
            if let Some(retry) = &f.retry_policy {
                out["retry"] = retry_json(retry);
            }
            json!({
                "forward": target,
                "prefix_rewrite": f.prefix_rewrite,
                "regex_rewrite": f.regex_rewrite.as_ref().map(|(re, sub)| json!([re.as_str(), sub])),
                "host_rewrite": format!("{:?}", f.host_rewrite),
                "timeout_ms": ms(f.timeout),
                "hash_policy": f.hash_policy.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>(),
                "mirrors": f.mirrors.iter().map(|m| json!({"cluster": m.cluster, "fraction": m.fraction})).collect::<Vec<_>>(),
                "max_stream_duration_ms": f.max_stream_duration.map(|m| ms(m.max_stream_duration)),
            })
        }
        RouteAction::Redirect(x) => json!({"redirect": {
            "status": x.status, "scheme": x.scheme, "host": x.host, "port": x.port,
            "path": format!("{:?}", x.path), "strip_query": x.strip_query,
        }}),
        RouteAction::DirectResponse { status, body } => json!({"direct_response": {
            "status": status,
            "body": body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
        }}),
        RouteAction::Unsupported(what) => json!({"unsupported": what}),
    };
    out
}

pub fn dump(args: Connect) -> Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = args.client().await?;
        Ok(client.config_dump()?)
    })
}
