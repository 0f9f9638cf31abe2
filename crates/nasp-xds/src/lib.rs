//! xDS for nasp.
//!
//! - [`dump`]: Envoy admin config dumps (JSON) read into typed resources;
//! - [`view`]: the resolved mesh — outbound lookups by `host:port`, inbound
//!   by port — computed once per update and read without locks;
//! - [`client`]: the ADS client (State-of-the-World and Delta), with ACK/NACK,
//!   reconnects and the view swapped atomically on each update;
//! - [`cluster`]: clusters typed — endpoints, upstream TLS modes, protocol,
//!   timeouts, outlier detection with Envoy's defaults;
//! - [`route`]: typed HTTP route tables (matchers, actions, retries, faults),
//!   converted once per update;
//! - [`types`]: type URLs and resource encoding shared with the server.

pub mod client;
pub mod cluster;
pub mod dump;
pub mod node;
pub mod route;
pub mod types;
pub mod view;

pub use client::{AdsClient, AdsConfig, ClientStats, Protocol};
pub use dump::{ResourceSet, read_config_dump};
pub use envoy_types;
pub use node::WorkloadSettings;
pub use route::{RequestHeaders, RouteConfig, VirtualHost};
pub use view::{
    ClusterInfo, Endpoint, HttpDestination, Inbound, InboundChain, InboundTransport, MeshView,
    Outbound, OutlierSettings, RouteDecision, SlowStart, ViewSettings,
};

/// Errors of the xDS layer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum XdsError {
    /// A config dump could not be read.
    #[error("config dump: {0}")]
    Dump(String),
    /// A resource could not be decoded or failed validation.
    #[error("bad resource {type_url} {name:?}: {message}")]
    Resource {
        /// Type URL.
        type_url: String,
        /// Resource name, if known.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The ADS connection failed.
    #[error("ADS: {0}")]
    Transport(String),
}
