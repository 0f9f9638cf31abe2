//! Cluster settings Istio writes for DestinationRules, read as Envoy reads
//! them: upstream TLS modes, SAN matchers, health, outlier detection.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, SocketAddress, TransportSocket, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use nasp_xds::route::StringMatch;
use nasp_xds::view::{ClientCertificate, HealthStatus, SanType, TlsMode, TrustedCa};
use nasp_xds::{MeshView, ResourceSet, ViewSettings};
use prost::Message;

fn tls(validation: Option<CertificateValidationContext>) -> Option<TransportSocket> {
    let ctx = UpstreamTlsContext {
        sni: "api.example.com".into(),
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: validation.map(ValidationContextType::ValidationContext),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url:
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
                    .into(),
            value: ctx.encode_to_vec(),
        })),
    })
}

fn endpoint(ip: &str, health: i32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(AddressKind::SocketAddress(SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health,
        ..Default::default()
    }
}

fn view() -> MeshView {
    let mut set = ResourceSet::default();
    // DestinationRule SIMPLE with system CA and a DNS SAN suffix matcher.
    set.clusters.insert(
        "simple".into(),
        Cluster {
            name: "simple".into(),
            transport_socket: tls(Some(CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(data_source::Specifier::Filename(
                        "/etc/ssl/certs/ca-certificates.crt".into(),
                    )),
                    ..Default::default()
                }),
                match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                    san_type: 2,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Suffix(
                            ".example.com".into(),
                        )),
                        ignore_case: false,
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: "simple".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![endpoint("10.0.0.1", 1), endpoint("10.0.0.2", 5)],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            // Istio's `consecutive5xxErrors: 0`.
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: Some(UInt32Value { value: 0 }),
                enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }),
                consecutive_gateway_failure: Some(UInt32Value { value: 3 }),
                enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 100 }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    // TLS with a CA but no SAN list: the chain is checked, nothing more.
    set.clusters.insert(
        "chain-only".into(),
        Cluster {
            name: "chain-only".into(),
            transport_socket: tls(None),
            outlier_detection: Some(OutlierDetection::default()),
            ..Default::default()
        },
    );
    // A DNS ServiceEntry with SIMPLE TLS: SNI and SAN from the Host.
    let options = envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions {
        upstream_http_protocol_options: Some(
            envoy_types::pb::envoy::config::core::v3::UpstreamHttpProtocolOptions {
                auto_sni: true,
                auto_san_validation: true,
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    set.clusters.insert(
        "auto".into(),
        Cluster {
            name: "auto".into(),
            transport_socket: tls(None),
            typed_extension_protocol_options: HashMap::from([(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                Any {
                    type_url:
                        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                            .into(),
                    value: options.encode_to_vec(),
                },
            )]),
            ..Default::default()
        },
    );
    // DISABLE: no transport socket at all.
    set.clusters.insert(
        "plain".into(),
        Cluster {
            name: "plain".into(),
            ..Default::default()
        },
    );
    MeshView::build(&set, HashMap::new(), ViewSettings::default())
}

#[test]
fn auto_sni_and_disable_are_read() {
    let v = view();
    let c = v.cluster("auto").expect("auto");
    assert!(c.auto_sni && c.auto_san_validation);
    let p = v.cluster("plain").expect("plain");
    assert!(p.upstream_tls.is_none() && !p.tls && !p.permissive);
    assert_eq!(p.connect_timeout, std::time::Duration::from_secs(5));
}

#[test]
fn simple_tls_is_not_istio_mtls() {
    let v = view();
    let c = v.cluster("simple").expect("simple");
    let t = c.upstream_tls.as_ref().expect("TLS");
    assert_eq!(t.mode, TlsMode::Simple);
    assert_eq!(t.client_certificate, ClientCertificate::None);
    assert_eq!(
        t.trusted_ca,
        TrustedCa::File("/etc/ssl/certs/ca-certificates.crt".into())
    );
    assert_eq!(t.sni.as_deref(), Some("api.example.com"));
    // The suffix matcher is kept, typed, with its SAN type.
    assert_eq!(t.san_matchers.len(), 1);
    assert_eq!(t.san_matchers[0].san_type, SanType::Dns);
    assert!(t.san_matchers[0].matcher.matches("api.example.com"));
    assert!(matches!(
        t.san_matchers[0].matcher,
        StringMatch::Suffix { .. }
    ));
    assert!(c.expected_sans.is_empty(), "no exact SAN");
}

#[test]
fn no_san_list_means_chain_only_and_no_ca_means_unverified() {
    let v = view();
    let t = v
        .cluster("chain-only")
        .and_then(|c| c.upstream_tls.clone())
        .expect("TLS");
    assert!(t.san_matchers.is_empty());
    assert_eq!(t.trusted_ca, TrustedCa::Unverified);
}

#[test]
fn degraded_is_told_apart_from_healthy() {
    let v = view();
    let c = v.cluster("simple").expect("simple");
    let h: Vec<(HealthStatus, bool)> = c.endpoints.iter().map(|e| (e.health, e.healthy)).collect();
    assert_eq!(
        h,
        [
            (HealthStatus::Healthy, true),
            (HealthStatus::Degraded, false)
        ]
    );
}

#[test]
fn outlier_detection_enforcement_follows_envoy() {
    let v = view();
    let o = v
        .cluster("simple")
        .and_then(|c| c.outlier_detection.clone())
        .expect("outlier");
    assert!(
        !o.ejects_on_5xx(),
        "Istio's consecutive5xxErrors: 0 disables it"
    );
    assert!(o.ejects_on_gateway_failure());
    let d = v
        .cluster("chain-only")
        .and_then(|c| c.outlier_detection.clone())
        .expect("outlier");
    // Envoy's defaults: 5xx enforced at 100 %, gateway failures not at all.
    assert!(d.ejects_on_5xx() && !d.ejects_on_gateway_failure());
    assert_eq!(d.max_ejection_time, std::time::Duration::from_secs(300));
}
