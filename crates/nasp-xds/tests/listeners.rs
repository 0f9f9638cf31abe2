//! Outbound listeners with several filter chains: the chain a plaintext
//! connection from the application lands on is the one Envoy would pick.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, CidrRange, SocketAddress};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use nasp_xds::{MeshView, ResourceSet, ViewSettings};
use prost::Message;

fn tcp_chain(cluster: &str, m: Option<FilterChainMatch>) -> FilterChain {
    let tcp = TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    FilterChain {
        filter_chain_match: m,
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
                        .into(),
                value: tcp.encode_to_vec(),
            })),
        }],
        ..Default::default()
    }
}

fn listener(
    ip: &str,
    port: u32,
    chains: Vec<FilterChain>,
    default: Option<FilterChain>,
) -> Listener {
    Listener {
        name: format!("{ip}_{port}"),
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        filter_chains: chains,
        default_filter_chain: default,
        ..Default::default()
    }
}

fn cidr(ip: &str, len: u32) -> CidrRange {
    CidrRange {
        address_prefix: ip.into(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn view() -> MeshView {
    let mut set = ResourceSet::default();
    for c in ["sni-only", "narrow", "wide", "fallback", "whole-port", "v6"] {
        set.clusters.insert(
            c.into(),
            Cluster {
                name: c.into(),
                ..Default::default()
            },
        );
    }
    let l = listener(
        "10.0.0.1",
        443,
        vec![
            // Needs SNI: a plaintext connection never lands here.
            tcp_chain(
                "sni-only",
                Some(FilterChainMatch {
                    server_names: vec!["api.example.com".into()],
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
            ),
            tcp_chain(
                "wide",
                Some(FilterChainMatch {
                    prefix_ranges: vec![cidr("10.0.0.0", 8)],
                    ..Default::default()
                }),
            ),
            tcp_chain(
                "narrow",
                Some(FilterChainMatch {
                    prefix_ranges: vec![cidr("10.0.0.1", 32)],
                    ..Default::default()
                }),
            ),
        ],
        Some(tcp_chain("fallback", None)),
    );
    set.listeners.insert(l.name.clone(), l);
    let l = listener(
        "0.0.0.0",
        7000,
        vec![
            tcp_chain(
                "wide",
                Some(FilterChainMatch {
                    prefix_ranges: vec![cidr("192.168.0.0", 16)],
                    ..Default::default()
                }),
            ),
            tcp_chain("whole-port", None),
        ],
        None,
    );
    set.listeners.insert(l.name.clone(), l);
    let l = listener("fd00::10", 5432, vec![tcp_chain("v6", None)], None);
    set.listeners.insert(l.name.clone(), l);
    MeshView::build(&set, HashMap::new(), ViewSettings::default())
}

fn cluster(v: &MeshView, host: &str, port: u16) -> Option<String> {
    v.outbound(host, port)
        .and_then(|o| o.cluster().map(|c| c.name.clone()))
}

#[test]
fn the_most_specific_plaintext_chain_wins() {
    let v = view();
    assert_eq!(cluster(&v, "10.0.0.1", 443).as_deref(), Some("narrow"));
}

#[test]
fn wildcard_listeners_honour_destination_prefixes() {
    let v = view();
    assert_eq!(cluster(&v, "192.168.3.4", 7000).as_deref(), Some("wide"));
    assert_eq!(cluster(&v, "10.9.9.9", 7000).as_deref(), Some("whole-port"));
    assert_eq!(cluster(&v, "10.9.9.9", 7001), None);
}

#[test]
fn ipv6_listeners_answer_bracketed_and_bare() {
    let v = view();
    assert_eq!(cluster(&v, "[fd00::10]", 5432).as_deref(), Some("v6"));
    assert_eq!(cluster(&v, "fd00::10", 5432).as_deref(), Some("v6"));
}
