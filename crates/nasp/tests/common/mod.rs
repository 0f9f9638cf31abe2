//! What the facade's integration tests share: the embedded control plane
//! (CA handing any identity, ADS from a mesh file) on loopback.

use std::sync::Arc;

use nasp::controlplane::mesh::MeshFile;
use nasp::controlplane::{
    CertificateAuthority, ControlPlane, ControlPlaneConfig, SnapshotCache, TokenPolicy,
};

/// The embedded control plane on `ip` (any port) serving `mesh`, its CA
/// issuing any identity asked for.
pub async fn control_plane(ip: &str, mesh: &MeshFile) -> ControlPlane {
    let ca = CertificateAuthority::generate("cluster.local")
        .expect("ca")
        .tokens(TokenPolicy::AnyIdentity);
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    ControlPlane::start(
        listener,
        ControlPlaneConfig {
            ca: Arc::new(ca),
            xds: Some(Arc::new(SnapshotCache::from_mesh(mesh).expect("snapshot"))),
        },
    )
    .expect("control plane")
}
