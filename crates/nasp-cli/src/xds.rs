//! `nasp xds resolve` and `nasp xds dump`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nasp::xds::{AdsClient, AdsConfig, Protocol, ViewSettings};
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
        let c = &o.cluster;
        Ok(json!({
            "host": host,
            "port": port,
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
            })).collect::<Vec<_>>(),
            "lb_policy": c.lb_policy,
            "virtual_host": o.virtual_host,
            "routes": o.routes.as_ref().map(|r| r.iter().map(|r| json!({
                "match": r.matcher,
                "clusters": r.clusters,
                "retry": r.retry.as_ref().map(|x| json!({"retry_on": x.retry_on, "num_retries": x.num_retries, "retriable_status_codes": x.retriable_status_codes})),
                "timeout_ms": r.timeout_ms,
            })).collect::<Vec<_>>()),
        }))
    })
}

pub fn dump(args: Connect) -> Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = args.client().await?;
        Ok(client.config_dump()?)
    })
}
