//! Mesh transport for nasp: the bytes of an application's connections as an
//! Istio sidecar would carry them.
//!
//! - [`inbound`]: a [`MeshListener`] that accepts mesh connections in
//!   Istio's three peer-authentication modes — STRICT (mTLS only),
//!   PERMISSIVE (mTLS and plaintext on one port, told apart by the first
//!   bytes) and DISABLE (plaintext) — and hands the application each
//!   connection with the peer's verified SPIFFE id;
//! - [`http`]: [`serve_http`] serves a hyper service on a listener, HTTP/1.1
//!   and HTTP/2, each request carrying the verified [`MeshPeer`];
//! - [`outbound`]: a [`MeshConnector`] that opens mTLS connections as a
//!   sidecar does: Istio's SNI, the ALPN of the protocol carried, the
//!   server SANs that xDS expects, the workload certificate of the moment.
//!
//! Invariants: a connection that is slow, silent or hostile costs only
//! itself (every handshake and sniff runs in its own task, under a
//! deadline); certificates are read from the identity watch at each
//! handshake, so a rotation needs no reconnect and no new listener; TLS
//! settings are built once per destination shape and shared, never mutated
//! per connection.
//!
//! - [`client`]: the outbound [`HttpClient`] — a tower stack route →
//!   cluster → balance → connect over the mesh view ([`balance`] picks
//!   endpoints, pooled connections per endpoint), [`GrpcChannel`] for tonic;
//! - [`tcp`]: TCP through the mesh ([`TcpConnector`]);
//! - [`filter`]: proxy-wasm filters on every exchange and connection;
//! - [`grpc`]: serving tonic services, the echo service.
//!
//! See `docs/transport.md`.

pub mod balance;
pub mod body;
pub mod client;
pub mod filter;
pub mod grpc;
pub mod http;
pub mod inbound;
pub mod info;
pub mod outbound;
mod pool;
pub mod tcp;

pub use body::{Body, BoxError};
pub use client::{
    ClientError, ClientSettings, GrpcChannel, HttpClient, LocalReply, StaticView, ViewSource,
};
pub use info::Upstream;
pub use tcp::{MeshTcpStream, TcpConnector};

pub use grpc::{EchoService, serve_grpc};
pub use http::{MeshPeer, serve_http, serve_http_until};
pub use inbound::{InboundConfig, InboundMode, MeshConn, MeshListener, MeshStream};
pub use outbound::{MeshConnector, istio_sni};

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed.
    #[error("transport: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A TLS setting could not be built or a handshake failed.
    #[error("transport: TLS: {0}")]
    Tls(String),
    /// Identity material is missing or unusable.
    #[error("transport: {0}")]
    Identity(#[from] nasp_identity::Error),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
