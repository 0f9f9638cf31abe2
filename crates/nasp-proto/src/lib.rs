//! Generated protobuf and gRPC code for the Istio APIs nasp speaks.
//!
//! The code under `src/gen/` is produced by `cargo xtask codegen` (protox +
//! tonic-prost-build, no `protoc`) from the `.proto` files under `proto/`, and
//! checked in, so a normal build needs no proto compiler.

/// `istio.v1.auth`: the Istio CA service (`security/v1alpha1/ca.proto`).
pub mod istio_ca {
    #![allow(missing_docs, clippy::all)]
    include!("gen/istio.v1.auth.rs");
}

pub use prost_types;
