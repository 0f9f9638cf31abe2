//! The client against a scripted ADS server on loopback that pushes the way
//! istiod does: after the first full answer, an EDS push carries only the
//! load assignment that changed, and after a subscription change an RDS
//! response carries only the newly subscribed route configuration. Whatever
//! a response leaves out must stay (SotW: only LDS and CDS are full state).

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use nasp_xds::types::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use nasp_xds::{AdsClient, AdsConfig, Protocol};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const A: &str = "outbound|80||a.demo.svc.cluster.local";
const B: &str = "outbound|80||b.demo.svc.cluster.local";
const C: &str = "outbound|8080||c.demo.svc.cluster.local";

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn socket(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn cluster(name: &str) -> Any {
    any(
        CLUSTER,
        &Cluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                service_name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

fn cla(name: &str, ips: &[&str]) -> Any {
    any(
        ENDPOINT,
        &ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: ips
                    .iter()
                    .map(|ip| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: socket(ip, 8080),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

fn listener(port: u32) -> Any {
    let hcm = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: port.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    };
    any(
        LISTENER,
        &Listener {
            name: format!("0.0.0.0_{port}"),
            address: socket("0.0.0.0", port),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        &hcm,
                    ))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

/// Route configuration `name` with one virtual host per `(domain, cluster)`.
fn routes(name: &str, hosts: &[(&str, &str)]) -> Any {
    any(
        ROUTE,
        &RouteConfiguration {
            name: name.into(),
            virtual_hosts: hosts
                .iter()
                .map(|(domain, cluster)| VirtualHost {
                    name: format!("{domain}:{name}"),
                    domains: vec![domain.to_string()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(Action::Route(RouteAction {
                            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
    )
}

/// What the scripted server sends next, given a request (type, the names it
/// now subscribes to, the nonce it answers). Shared by both protocols: the
/// script is istiod's order of events, the encoding differs.
struct Script {
    eds_full: bool,
    eds_partial: bool,
    rds_first: bool,
    lds_second: bool,
    rds_second: bool,
}

/// One step: `(type_url, resources, nonce)` to send.
type Step = (&'static str, Vec<Any>, &'static str);

impl Script {
    fn new() -> Self {
        Self {
            eds_full: false,
            eds_partial: false,
            rds_first: false,
            lds_second: false,
            rds_second: false,
        }
    }

    fn next(&mut self, type_url: &str, names: &BTreeSet<String>, nonce: &str) -> Vec<Step> {
        let mut out = Vec::new();
        match type_url {
            CLUSTER if nonce.is_empty() => {
                out.push((CLUSTER, vec![cluster(A), cluster(B), cluster(C)], "c1"))
            }
            LISTENER if nonce.is_empty() => out.push((LISTENER, vec![listener(80)], "l1")),
            ENDPOINT if !self.eds_full && names.contains(A) && names.contains(B) => {
                self.eds_full = true;
                out.push((
                    ENDPOINT,
                    vec![
                        cla(A, &["10.0.0.1"]),
                        cla(B, &["10.0.0.2"]),
                        cla(C, &["10.0.0.3"]),
                    ],
                    "e1",
                ));
            }
            // istiod's incremental EDS push: only the assignment that changed.
            ENDPOINT if nonce == "e1" && !self.eds_partial => {
                self.eds_partial = true;
                out.push((ENDPOINT, vec![cla(A, &["10.0.0.1", "10.0.0.11"])], "e2"));
            }
            ROUTE if !self.rds_first && names.contains("80") => {
                self.rds_first = true;
                out.push((
                    ROUTE,
                    vec![routes(
                        "80",
                        &[
                            ("a.demo.svc.cluster.local", A),
                            ("b.demo.svc.cluster.local", B),
                        ],
                    )],
                    "r1",
                ));
            }
            // A second HTTP port appears: the client subscribes to its route
            // configuration too.
            ROUTE if nonce == "r1" && !self.lds_second => {
                self.lds_second = true;
                out.push((LISTENER, vec![listener(80), listener(8080)], "l2"));
            }
            // istiod answers a subscription change with only the new name.
            ROUTE if !self.rds_second && names.contains("8080") => {
                self.rds_second = true;
                out.push((
                    ROUTE,
                    vec![routes("8080", &[("c.demo.svc.cluster.local", C)])],
                    "r2",
                ));
            }
            _ => {}
        }
        out
    }
}

#[derive(Clone)]
struct Scripted;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Scripted {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut script = Script::new();
            while let Ok(Some(req)) = inbound.message().await {
                let names = req.resource_names.iter().cloned().collect();
                for (type_url, resources, nonce) in
                    script.next(&req.type_url, &names, &req.response_nonce)
                {
                    let resp = DiscoveryResponse {
                        version_info: nonce.into(),
                        resources,
                        type_url: type_url.into(),
                        nonce: nonce.into(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut script = Script::new();
            let mut subscribed: std::collections::HashMap<String, BTreeSet<String>> =
                Default::default();
            while let Ok(Some(req)) = inbound.message().await {
                let names = subscribed.entry(req.type_url.clone()).or_default();
                names.extend(req.resource_names_subscribe.iter().cloned());
                for n in &req.resource_names_unsubscribe {
                    names.remove(n);
                }
                let names = names.clone();
                for (type_url, resources, nonce) in
                    script.next(&req.type_url, &names, &req.response_nonce)
                {
                    let resp = DeltaDiscoveryResponse {
                        system_version_info: nonce.into(),
                        resources: resources
                            .into_iter()
                            .map(|a| Resource {
                                name: name_of(type_url, &a),
                                version: nonce.into(),
                                resource: Some(a),
                                ..Default::default()
                            })
                            .collect(),
                        type_url: type_url.into(),
                        nonce: nonce.into(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn name_of(type_url: &str, a: &Any) -> String {
    nasp_xds::types::decode(type_url, a)
        .map(|d| d.name().to_string())
        .unwrap_or_default()
}

async fn serve() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Scripted))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn endpoint_count(client: &AdsClient, cluster: &str) -> usize {
    client
        .view()
        .cluster(cluster)
        .map(|c| c.endpoints.len())
        .unwrap_or(0)
}

async fn partial_pushes_keep_what_they_leave_out(protocol: Protocol) {
    let addr = serve().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let mut config = AdsConfig::new(Node {
        id: "sidecar~10.0.0.9~t.demo~demo.svc.cluster.local".into(),
        ..Default::default()
    });
    config.protocol = protocol;
    let client = AdsClient::start(channel, config);
    // Both partial responses have been applied once A has two endpoints and
    // port 8080 routes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(endpoint_count(&client, A) == 2
        && client
            .view()
            .outbound("c.demo.svc.cluster.local", 8080)
            .is_some())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{protocol:?}: the partial pushes never arrived ({:?})",
            client.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        endpoint_count(&client, B),
        1,
        "{protocol:?}: an EDS push for A wiped B's endpoints"
    );
    assert_eq!(endpoint_count(&client, C), 1, "{protocol:?}");
    assert!(
        client
            .view()
            .outbound("b.demo.svc.cluster.local", 80)
            .is_some(),
        "{protocol:?}: the RDS answer for 8080 wiped the route configuration of port 80"
    );
    assert_eq!(client.stats().nacks, 0, "{protocol:?}");
}

#[tokio::test]
async fn sotw_partial_eds_and_rds_responses_keep_the_rest() {
    partial_pushes_keep_what_they_leave_out(Protocol::Sotw).await;
}

#[tokio::test]
async fn delta_partial_eds_and_rds_responses_keep_the_rest() {
    partial_pushes_keep_what_they_leave_out(Protocol::Delta).await;
}
