//! How `nasp serve` and `nasp get` join a mesh: the control plane, the
//! root, the token and the workload's identity from flags, or Istio's VM
//! environment when `--xds` is not given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nasp::Mesh;
use nasp::xds::WorkloadSettings;

#[derive(clap::Args, Clone, Debug)]
pub struct MeshArgs {
    /// The control plane: Istio CA and xDS on one address (istiod:15012,
    /// `nasp controlplane`). Without it, Istio's VM environment is used
    /// (DISCOVERY_ADDRESS, CA_ADDR, ROOT_CERT, ISTIO_TOKEN, ...).
    #[arg(long)]
    pub xds: Option<String>,
    /// The mesh root certificate (PEM) the control plane's certificate
    /// chains to (default: $ROOT_CERT, else ./root-cert.pem).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// A file holding the bearer token the CA knows this workload by
    /// (default: $ISTIO_TOKEN when set).
    #[arg(long)]
    pub token: Option<PathBuf>,
    /// The workload's service account: its SPIFFE id is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<this> (the mesh file's
    /// `service_account`, `default` unless set there).
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// The mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// How long to wait for a certificate and the first xDS snapshot.
    #[arg(long, default_value = "15s", value_parser = crate::identity::parse_duration)]
    pub timeout: Duration,
}

/// `NAME.NS` → (name, namespace).
pub fn parse_service(s: &str) -> Result<(String, String)> {
    match s.split_once('.') {
        Some((name, ns))
            if !name.is_empty() && !ns.is_empty() && !ns.contains('.') && !s.contains('/') =>
        {
            Ok((name.to_string(), ns.to_string()))
        }
        _ => bail!("--service {s:?}: expected NAME.NAMESPACE (e.g. echo.demo)"),
    }
}

impl MeshArgs {
    /// Joins the mesh as the service `name` in `namespace`, serving its
    /// Prometheus endpoint at `prometheus` (the command's flag decides, in
    /// Istio's VM environment too: `nasp get` never binds :15090).
    pub async fn join(
        &self,
        name: &str,
        namespace: &str,
        ips: Vec<String>,
        prometheus: Option<SocketAddr>,
    ) -> Result<Mesh> {
        let workload = WorkloadSettings {
            pod_name: format!("{name}-{}", std::process::id()),
            namespace: namespace.into(),
            service_account: self.service_account.clone(),
            workload_name: name.into(),
            instance_ips: ips,
            labels: [("app".to_string(), name.to_string())].into(),
            ..Default::default()
        };
        let builder = match &self.xds {
            Some(xds) => {
                let addr = tokio::net::lookup_host(xds.as_str())
                    .await
                    .with_context(|| format!("--xds {xds:?}: expected HOST:PORT"))?
                    .next()
                    .ok_or_else(|| anyhow!("--xds {xds:?}: no address"))?;
                let root = match &self.root {
                    Some(r) => r.clone(),
                    None => std::env::var_os("ROOT_CERT")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("root-cert.pem")),
                };
                let root_pem = std::fs::read(&root).with_context(|| {
                    format!(
                        "reading the mesh root {} (give --root FILE; `nasp controlplane --root-out FILE` writes it)",
                        root.display()
                    )
                })?;
                let token = self
                    .token
                    .clone()
                    .or_else(|| std::env::var_os("ISTIO_TOKEN").map(PathBuf::from));
                Mesh::builder()
                    .workload(workload)
                    .trust_domain(self.trust_domain.clone())
                    .embedded(addr, root_pem, token)
            }
            None => Mesh::builder_from_env_or_err()?
                .workload(workload)
                .trust_domain(self.trust_domain.clone()),
        };
        builder
            .ready_timeout(self.timeout)
            .prometheus(prometheus)
            .build()
            .await
            .context("joining the mesh")
    }
}

/// `Mesh::builder()` from Istio's VM environment, with a hint when nothing
/// is set.
trait FromEnv {
    fn builder_from_env_or_err() -> Result<nasp::MeshBuilder>;
}

impl FromEnv for Mesh {
    fn builder_from_env_or_err() -> Result<nasp::MeshBuilder> {
        nasp::MeshBuilder::from_env().map_err(|e| anyhow!("{e} (or give --xds ADDR --root FILE)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_name_dot_namespace() {
        assert_eq!(
            parse_service("echo.demo").expect("ok"),
            ("echo".to_string(), "demo".to_string())
        );
        for bad in ["echo", ".demo", "echo.", "a.b.c", ""] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
    }
}
