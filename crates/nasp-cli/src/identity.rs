//! `nasp controlplane` and `nasp ca issue`.

use std::path::PathBuf;
#[cfg(feature = "controlplane")]
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
#[cfg(feature = "controlplane")]
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};
use nasp::identity::cert::pem_certs;
use nasp::identity::{CaClient, CaClientConfig, KeyAlgorithm, SpiffeId, WorkloadCert, keys};
use serde_json::{Value, json};

/// Prints a report on stdout; a reader that went away (a closed pipe, as
/// `nasp ... | head`) is not an error.
pub fn print_json(out: &serde_json::Value) -> Result<()> {
    print_text(&serde_json::to_string_pretty(out)?)
}

/// Prints a report as one JSON line (what a script waits for).
pub fn print_json_line(out: &serde_json::Value) -> Result<()> {
    print_text(&serde_json::to_string(out)?)
}

fn print_text(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Parses `90s`, `30m`, `24h`, `7d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("bad duration {s:?}: use a number with s, m, h or d"),
    };
    let secs = n
        .checked_mul(unit_secs)
        .with_context(|| format!("duration {s:?} is too long"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(feature = "controlplane")]
#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// Address to listen on: the CA and ADS over TLS, ADS over plaintext.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: String,
    /// Where to write the mesh root certificate (PEM) for workloads.
    #[arg(long)]
    root_out: Option<PathBuf>,
    /// The mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Token file: one `TOKEN SPIFFE-ID` per line. A caller gets only the
    /// identity registered for its token. Without it (and without
    /// --allow-any-identity) the CA refuses every certificate request.
    #[arg(long, conflicts_with = "allow_any_identity")]
    tokens: Option<PathBuf>,
    /// Development mode: issue any identity of the trust domain to any
    /// caller, no credential needed. Only on a loopback --listen address.
    #[arg(long)]
    allow_any_identity: bool,
    /// Longest certificate lifetime to issue.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_ttl: Duration,
    /// Use this CA certificate (PEM; may be an intermediate) instead of a
    /// generated root; needs --ca-key.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The rest of the CA's chain up to the root (PEM), for an intermediate.
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Serve the resources of this Envoy config dump (JSON) over ADS;
    /// reloaded when the file changes.
    #[arg(long, conflicts_with = "mesh")]
    config_dump: Option<PathBuf>,
    /// Serve Istio-shaped resources (and an NDS name table) generated from
    /// this mesh file (YAML or JSON, see docs/xds.md); reloaded on change.
    #[arg(long)]
    mesh: Option<PathBuf>,
}

/// Reads the xDS source and loads it into `cache`.
#[cfg(feature = "controlplane")]
fn load_source(path: &std::path::Path, mesh: bool, cache: &SnapshotCache) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if mesh {
        let file = nasp::controlplane::mesh::MeshFile::parse(&text)?;
        let (set, names) = nasp::controlplane::mesh::generate(&file)
            .with_context(|| format!("{}", path.display()))?;
        cache.set_with_names(&set, &names);
    } else {
        let set = nasp::xds::read_config_dump(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        cache.set(&set);
    }
    Ok(())
}

#[cfg(feature = "controlplane")]
pub fn controlplane(args: ControlPlaneArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut ca = match (&args.ca_cert, &args.ca_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
                let key_pem = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
                let chain = match &args.ca_chain {
                    Some(p) => {
                        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                        pem_certs(text.as_bytes())?.iter().map(nasp::identity::cert::cert_pem).collect()
                    }
                    None => Vec::new(),
                };
                CertificateAuthority::from_pem(&cert_pem, &key_pem, &chain, &args.trust_domain)?
            }
            _ => CertificateAuthority::generate(&args.trust_domain)?,
        }
        .max_ttl(args.max_ttl)?;
        if let Some(p) = &args.tokens {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            ca = ca.tokens(TokenPolicy::from_text(&text).with_context(|| p.display().to_string())?);
        } else if args.allow_any_identity {
            eprintln!("nasp controlplane: DEVELOPMENT MODE (--allow-any-identity): any caller can get any identity of {}", args.trust_domain);
            ca = ca.tokens(TokenPolicy::AnyIdentity);
        } else {
            eprintln!("nasp controlplane: no --tokens given: the CA refuses every certificate request (use --tokens FILE, or --allow-any-identity on loopback for development)");
        }
        let source = match (&args.config_dump, &args.mesh) {
            (Some(p), _) => Some((p.clone(), false)),
            (None, Some(p)) => Some((p.clone(), true)),
            (None, None) => None,
        };
        let xds = match &source {
            Some((path, mesh)) => {
                let cache = Arc::new(SnapshotCache::default());
                load_source(path, *mesh, &cache)?;
                Some(cache)
            }
            None => None,
        };
        if let (Some(cache), Some((path, mesh))) = (&xds, source) {
            // Reload on change; a bad file keeps the last good snapshot.
            let cache = cache.clone();
            tokio::spawn(async move {
                let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                let mut seen = mtime(&path);
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let now = mtime(&path);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match load_source(&path, mesh, &cache) {
                        Ok(()) => eprintln!("nasp controlplane: reloaded {}", path.display()),
                        Err(e) => eprintln!("nasp controlplane: keeping the last good config: {e:#}"),
                    }
                }
            });
        }
        if args.allow_any_identity {
            // Refused before binding: a development CA never listens
            // beyond this machine, not even for a moment.
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&args.listen)
                .await
                .with_context(|| format!("resolving {}", args.listen))?
                .collect();
            if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
                bail!(
                    "--allow-any-identity is for development on loopback only; {} is not a loopback address (register tokens with --tokens instead)",
                    args.listen
                );
            }
        }
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let cp = ControlPlane::start(listener, ControlPlaneConfig { ca: Arc::new(ca), xds })?;
        if let Some(out) = &args.root_out {
            std::fs::write(out, cp.root_pem()).with_context(|| format!("writing {}", out.display()))?;
        }
        // One line a script can wait for.
        print_json_line(&json!({"listening": cp.addr().to_string(), "trust_domain": args.trust_domain, "root": args.root_out}))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate() => {}
        }
        cp.shutdown().await;
        Ok(())
    })
}

/// Resolves on SIGTERM (never elsewhere).
#[cfg(unix)]
pub async fn terminate() {
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
    }
}

/// Resolves on SIGTERM (never elsewhere).
#[cfg(not(unix))]
pub async fn terminate() {
    std::future::pending::<()>().await
}

#[derive(clap::Args)]
pub struct IssueArgs {
    /// The CA address (istiod:15012 or `nasp controlplane`).
    #[arg(long)]
    ca: String,
    /// The mesh root certificate (PEM) the CA's certificate chains to.
    #[arg(long)]
    root: PathBuf,
    /// The identity to request.
    #[arg(long)]
    spiffe: SpiffeId,
    /// Bearer token file.
    #[arg(long)]
    token: Option<PathBuf>,
    /// Requested lifetime.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
    /// Key algorithm: ecdsa or rsa.
    #[arg(long, default_value = "ecdsa")]
    key: KeyAlgorithm,
    /// The name the CA's certificate must carry.
    #[arg(long, default_value = nasp::identity::ca_client::DEFAULT_CA_SERVER_NAME)]
    server_name: String,
    /// Sent as the ClusterID header.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Directory for cert-chain.pem, key.pem and root-cert.pem.
    #[arg(long)]
    out: PathBuf,
}

pub fn issue(args: IssueArgs) -> Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let root_pem = std::fs::read(&args.root)
            .with_context(|| format!("reading {}", args.root.display()))?;
        let roots = pem_certs(&root_pem)?;
        let mut cfg = CaClientConfig::new(args.ca.clone(), roots.clone());
        cfg.token_file = args.token.clone();
        cfg.server_name = args.server_name.clone();
        cfg.cluster_id = args.cluster_id.clone();
        let client = CaClient::new(cfg)?;
        let csr = keys::generate_csr(&args.spiffe, args.key)?;
        let chain = client.sign(&csr.csr_pem, args.ttl).await?;
        // The mesh root file plus the CA response's root (its last element).
        let mut all_roots = roots;
        nasp::identity::cert::merge_roots(&mut all_roots, chain.last().cloned());
        let key = nasp::identity::cert::pem_key(csr.key_pem.as_bytes())?;
        let cert = WorkloadCert::new(chain, key, all_roots)?;
        cert.write_dir(&args.out, &csr.key_pem)?;
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        Ok(json!({
            "spiffe": cert.id().map(ToString::to_string),
            "not_before": secs(cert.not_before()),
            "not_after": secs(cert.not_after()),
            "chain_length": cert.chain().len(),
            "out": args.out,
        }))
    })
}
