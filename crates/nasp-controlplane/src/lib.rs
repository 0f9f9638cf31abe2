//! nasp's embedded control plane: what istiod serves, in-process or as
//! `nasp controlplane`, for laptops, demos and tests. Today: the Istio CA
//! service ([`ca`]). The ADS server joins it on the same port (issue 4).

pub mod ca;
pub mod server;

pub use ca::{CaService, CertificateAuthority, TokenPolicy};
pub use server::{ControlPlane, ControlPlaneConfig};
