//! `nasp get`: a mesh-aware curl. The request goes through
//! `Mesh::http_client()` — the route from xDS, the endpoint the balancer
//! picks, Istio mTLS with the SAN xDS expects, Istio's retry policy — and
//! the answer is printed with where it went and who answered: the
//! endpoint and the SPIFFE id its certificate carries.
//!
//! Invariants: the peer printed is the one the TLS handshake verified
//! (`Upstream.peer_id`), never something the server said; output to a
//! closed pipe ends quietly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nasp::MeshHttpClientExt as _;
use nasp::transport::{Body, LocalReply, Upstream};

use crate::workload::{MeshArgs, parse_service};

/// The most requests one `-n` may ask for.
const MAX_COUNT: u32 = 1_000_000;

#[derive(clap::Args)]
pub struct GetArgs {
    /// The URL, e.g. http://echo.demo:8080/path (a mesh host name or IP).
    url: String,
    /// Send N requests and print the split across endpoints.
    #[arg(short = 'n', long = "count", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT as i64))]
    count: u32,
    /// A request header, 'Name: value' (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// A request body; the method becomes POST unless -X is given.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// The method.
    #[arg(short = 'X', long = "request")]
    method: Option<String>,
    /// Who this client is in the mesh, NAME.NAMESPACE.
    #[arg(long, default_value = "nasp-get.default")]
    service: String,
    /// Give up on one request after this long.
    #[arg(long, default_value = "15s", value_parser = crate::identity::parse_duration)]
    request_timeout: Duration,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// Prints to stdout; false once the reader has gone away.
fn out(text: &str) -> bool {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .is_ok()
}

pub fn get(args: GetArgs) -> Result<()> {
    // Everything that can be checked before joining the mesh is.
    let uri: http::Uri = args
        .url
        .parse()
        .map_err(|e| anyhow!("bad URL {:?}: {e}", args.url))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => {}
        (Some("https"), Some(_)) => bail!(
            "bad URL {:?}: use http:// — the mesh adds mTLS itself (an https URL would be the application's own TLS)",
            args.url
        ),
        _ => bail!("bad URL {:?}: expected http://HOST[:PORT]/PATH", args.url),
    }
    let method = match (&args.method, &args.data) {
        (Some(m), _) => {
            http::Method::from_bytes(m.as_bytes()).map_err(|_| anyhow!("bad method {m:?}"))?
        }
        (None, Some(_)) => http::Method::POST,
        (None, None) => http::Method::GET,
    };
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header {h:?}: expected 'Name: value'"))?;
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| anyhow!("bad header name {:?}", k.trim()))?;
        let value = http::HeaderValue::from_str(v.trim())
            .map_err(|_| anyhow!("bad value for header {:?}", k.trim()))?;
        headers.append(name, value);
    }
    let (name, ns) = parse_service(&args.service)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mesh = args.mesh.join(&name, &ns, Vec::new(), None).await?;
        let client = mesh.http_client();
        let request = || -> Result<http::Request<Body>> {
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(match &args.data {
                    Some(d) => Body::from(d.clone()),
                    None => Body::empty(),
                })?;
            *req.headers_mut() = headers.clone();
            Ok(req)
        };
        let send = |req| async {
            tokio::time::timeout(args.request_timeout, client.send(req))
                .await
                .map_err(|_| anyhow!("no answer within {:?}", args.request_timeout))?
                .map_err(|e| anyhow!("{e}"))
        };
        if args.count == 1 {
            let resp = send(request()?)
                .await
                .with_context(|| format!("GET {}", args.url))?;
            let r = print_one(resp).await;
            mesh.shutdown().await;
            return r;
        }
        // The split: per endpoint, per status.
        let mut by_endpoint: BTreeMap<String, (u64, Option<String>)> = BTreeMap::new();
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed = 0u64;
        let mut last_error = None;
        for _ in 0..args.count {
            match send(request()?).await {
                Ok(resp) => {
                    let up = resp.extensions().get::<Upstream>().cloned();
                    let local = resp.extensions().get::<LocalReply>().cloned();
                    let status = resp.status();
                    let _ = resp.into_body().collect_bytes().await;
                    let key = match &local {
                        Some(l) if !l.flags.is_empty() => {
                            format!("{} {}", status.as_u16(), l.flags)
                        }
                        _ => status.as_u16().to_string(),
                    };
                    *by_status.entry(key).or_default() += 1;
                    if let Some(up) = up {
                        let e = by_endpoint.entry(up.address.to_string()).or_default();
                        e.0 += 1;
                        e.1 = up.peer_id.as_deref().map(str::to_string);
                    }
                }
                Err(e) => {
                    failed += 1;
                    last_error = Some(e.to_string());
                }
            }
        }
        mesh.shutdown().await;
        let answered: u64 = by_endpoint.values().map(|(n, _)| n).sum();
        let mut text = format!(
            "{} requests: {}{}\n",
            args.count,
            by_status
                .iter()
                .map(|(s, n)| format!("{n} × {s}"))
                .collect::<Vec<_>>()
                .join(", "),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        text.push_str(&format!(
            "{:<22} {:>8} {:>7}  {}\n",
            "endpoint", "requests", "share", "peer"
        ));
        for (ep, (n, peer)) in &by_endpoint {
            text.push_str(&format!(
                "{:<22} {:>8} {:>6.1}%  {}\n",
                ep,
                n,
                100.0 * *n as f64 / answered.max(1) as f64,
                peer.as_deref().unwrap_or("- (plaintext)")
            ));
        }
        out(&text);
        match last_error {
            Some(e) => bail!("{failed} of {} requests failed (last: {e})", args.count),
            None => Ok(()),
        }
    })
}

/// Status line, headers, where it went and who answered, then the body.
async fn print_one(resp: http::Response<Body>) -> Result<()> {
    let up = resp.extensions().get::<Upstream>().cloned();
    let local = resp.extensions().get::<LocalReply>().cloned();
    let mut text = format!(
        "{:?} {} {}\n",
        resp.version(),
        resp.status().as_u16(),
        resp.status().canonical_reason().unwrap_or("")
    );
    for (k, v) in resp.headers() {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    match &up {
        Some(u) => {
            text.push_str(&format!(
                "* peer: {}\n",
                match (&u.peer_id, u.mtls) {
                    (Some(id), _) => format!("{id} (verified, mTLS)"),
                    (None, true) => "mTLS without a SPIFFE id".into(),
                    (None, false) => "none (plaintext)".into(),
                }
            ));
            text.push_str(&format!(
                "* upstream: {} cluster {} route {} attempts {}\n",
                u.address,
                u.cluster,
                if u.route.is_empty() { "-" } else { &u.route },
                u.attempts
            ));
        }
        None => text.push_str("* peer: none (no upstream answered)\n"),
    }
    if let Some(l) = &local {
        text.push_str(&format!(
            "* local reply: {} {}\n",
            if l.flags.is_empty() { "-" } else { l.flags },
            l.details
        ));
    }
    text.push('\n');
    let body = resp
        .into_body()
        .collect_bytes()
        .await
        .map_err(|e| anyhow!("reading the body: {e}"))?;
    text.push_str(&String::from_utf8_lossy(&body));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    out(&text);
    Ok(())
}
