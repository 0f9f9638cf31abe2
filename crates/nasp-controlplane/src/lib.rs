//! nasp's embedded control plane: what istiod serves, in-process or as
//! `nasp controlplane`, for laptops, demos and tests: the Istio CA service
//! ([`ca`]) and an ADS server ([`xds`]) on one port.

pub mod ca;
pub mod mesh;
pub mod server;
pub mod xds;

pub use ca::{CaService, CertificateAuthority, TokenPolicy};
pub use server::{ControlPlane, ControlPlaneConfig};
pub use xds::{AdsService, Snapshot, SnapshotCache};
