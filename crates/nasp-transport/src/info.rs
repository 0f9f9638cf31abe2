//! What the transport tells the layers around it about one exchange.

use std::net::SocketAddr;
use std::sync::Arc;

/// Where an outbound request or connection went: set by the client as a
/// response extension (HTTP) or kept on the stream (TCP), read by filters
/// (`cluster_name`, `route_name`, `upstream.*` properties), tools and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The cluster (`outbound|80||echo.demo.svc.cluster.local`).
    pub cluster: Arc<str>,
    /// The route's name (empty for TCP or an unnamed route).
    pub route: Arc<str>,
    /// The endpoint that answered.
    pub address: SocketAddr,
    /// Whether the connection to it is mTLS.
    pub mtls: bool,
    /// The SPIFFE id the endpoint's certificate carries (mTLS only).
    pub peer_id: Option<Arc<str>>,
    /// The ALPN agreed with it, if any.
    pub alpn: Option<Arc<str>>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// The services the cluster's Istio metadata names
    /// (`cluster_metadata.filter_metadata.istio.services`); empty when it
    /// names none.
    pub services: Arc<[nasp_xds::cluster::IstioService]>,
}
