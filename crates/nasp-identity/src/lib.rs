//! Istio workload identity for nasp.
//!
//! - [`SpiffeId`]: strict `spiffe://<td>/ns/<ns>/sa/<sa>` ids;
//! - [`keys`]: ECDSA P-256 (default) or RSA 2048 keys and Istio-shaped CSRs;
//! - [`CaClient`]: the `istio.v1.auth.IstioCertificateService` client (istiod
//!   or nasp's embedded CA), over TLS verified against the mesh root;
//! - [`WorkloadCert`]: a chain, key and roots, from the CA or from files in
//!   Istio's layout;
//! - [`SecretManager`]: keeps the certificate fresh in the background and
//!   publishes it on a watch channel;
//! - [`tls`]: rustls glue — a resolver that always serves the current
//!   certificate, and verifiers for SPIFFE peers.
//!
//! Crypto: one provider per build, by feature — `aws-lc-rs` (default; RSA
//! key generation; X25519MLKEM768 preferred) or `ring` (lighter; ECDSA keys
//! only). With both enabled, aws-lc-rs is used.

pub mod ca_client;
pub mod cert;
pub mod keys;
pub mod pkix;
pub mod secrets;
pub mod spiffe;
pub mod tls;

use std::sync::Arc;

pub use ca_client::{CaClient, CaClientConfig};
pub use cert::WorkloadCert;
pub use keys::KeyAlgorithm;
pub use secrets::{RenewalPolicy, SecretManager, Source};
pub use spiffe::{SpiffeId, SpiffeIdError};

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "nasp-identity needs a crypto provider: enable the `aws-lc-rs` or the `ring` feature"
);

/// Everything that can go wrong with identity.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Key generation or signing failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// A certificate or key is malformed or unacceptable.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A file could not be read or written.
    #[error("io: {0}")]
    Io(String),
    /// The CA refused or could not be reached.
    #[error("CA: {code}: {message}")]
    Ca {
        /// gRPC status code name.
        code: String,
        /// What the CA (or the transport) said.
        message: String,
    },
    /// A TLS setting could not be built.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The crypto provider of this build.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    {
        Arc::new(rustls::crypto::ring::default_provider())
    }
}
