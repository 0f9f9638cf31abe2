//! Per-request routing on a typed route table: what an application notices
//! when Istio's VirtualService features (header-matched canaries, weighted
//! legs, `cluster_header`, redirects, REGISTRY_ONLY) are in the table.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RedirectAction, Route, RouteAction, RouteConfiguration,
    RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use nasp_xds::route::{self as typed, Fault};
use nasp_xds::{MeshView, ResourceSet, RouteDecision, ViewSettings};
use prost::Message;

fn prefix(p: &str) -> Option<RouteMatch> {
    Some(RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(p.into())),
        ..Default::default()
    })
}

fn to(cluster: &str) -> Option<Action> {
    Some(Action::Route(RouteAction {
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }))
}

fn leg(name: &str, weight: u32) -> ClusterWeight {
    ClusterWeight {
        name: name.into(),
        weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

fn set() -> ResourceSet {
    let mut set = ResourceSet::default();
    for c in ["stable", "canary", "v1", "v2", "picked-by-header"] {
        set.clusters.insert(
            c.into(),
            Cluster {
                name: c.into(),
                ..Default::default()
            },
        );
    }
    let fault = HttpFault {
        abort: Some(FaultAbort {
            percentage: Some(FractionalPercent {
                numerator: 10,
                denominator: 0,
            }),
            error_type: Some(
                envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType::HttpStatus(503),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let shop = VirtualHost {
        name: "shop.demo.svc.cluster.local:80".into(),
        domains: vec!["shop.demo.svc.cluster.local".into(), "shop".into()],
        routes: vec![
            Route {
                name: "canary".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    headers: vec![HeaderMatcher {
                        name: "x-canary".into(),
                        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(
                            StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(
                                    "yes".into(),
                                )),
                                ignore_case: true,
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                action: to("canary"),
                ..Default::default()
            },
            Route {
                name: "api".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
                        regex: "/api/v[0-9]+/.*".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                        clusters: vec![leg("v1", 90), leg("v2", 10)],
                        ..Default::default()
                    })),
                    ..Default::default()
                })),
                ..Default::default()
            },
            Route {
                name: "by-header".into(),
                r#match: prefix("/by-header"),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::ClusterHeader("X-Cluster".into())),
                    ..Default::default()
                })),
                ..Default::default()
            },
            Route {
                name: "moved".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Path("/old".into())),
                    ..Default::default()
                }),
                action: Some(Action::Redirect(RedirectAction {
                    host_redirect: "new.example.com".into(),
                    ..Default::default()
                })),
                ..Default::default()
            },
            Route {
                name: "default".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    case_sensitive: Some(BoolValue { value: false }),
                    ..Default::default()
                }),
                action: to("stable"),
                typed_per_filter_config: HashMap::from([(
                    "envoy.filters.http.fault".to_string(),
                    Any {
                        type_url:
                            "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
                                .into(),
                        value: fault.encode_to_vec(),
                    },
                )]),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    // Istio's REGISTRY_ONLY catch-all.
    let block_all = VirtualHost {
        name: "block_all".into(),
        domains: vec!["*".into()],
        routes: vec![Route {
            name: "block_all".into(),
            r#match: prefix("/"),
            action: Some(Action::DirectResponse(DirectResponseAction {
                status: 502,
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString("blocked".into())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    set.routes.insert(
        "80".into(),
        RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![shop, block_all],
            ..Default::default()
        },
    );
    set
}

fn view() -> MeshView {
    MeshView::build(
        &set(),
        HashMap::new(),
        ViewSettings {
            search_domains: vec!["demo.svc.cluster.local".into()],
        },
    )
}

fn cluster(view: &MeshView, path: &str, headers: &[(&str, &str)], random: u64) -> String {
    let o = view.outbound("shop", 80).expect("shop is in the mesh");
    let h = o.http().expect("HTTP");
    match view.route(h, path, headers, random) {
        RouteDecision::Forward { cluster, .. } => cluster.name.clone(),
        other => format!("{other:?}"),
    }
}

#[test]
fn a_canary_header_route_takes_only_the_requests_that_carry_it() {
    let v = view();
    assert_eq!(cluster(&v, "/", &[], 0), "stable");
    assert_eq!(cluster(&v, "/", &[("X-Canary", "YES")], 0), "canary");
    assert_eq!(cluster(&v, "/", &[("x-canary", "no")], 0), "stable");
}

#[test]
fn weighted_legs_split_by_weight() {
    let v = view();
    let mut count: HashMap<String, u32> = HashMap::new();
    for r in 0..100u64 {
        *count
            .entry(cluster(&v, "/api/v2/items", &[], r))
            .or_default() += 1;
    }
    assert_eq!(count.get("v1"), Some(&90));
    assert_eq!(count.get("v2"), Some(&10));
    // The regex matches the whole path, so `/x/api/v2/` is not an API call.
    assert_eq!(cluster(&v, "/x/api/v2/items", &[], 0), "stable");
}

#[test]
fn cluster_header_routes_are_in_the_mesh() {
    let v = view();
    assert_eq!(
        cluster(&v, "/by-header", &[("x-cluster", "picked-by-header")], 0),
        "picked-by-header"
    );
    let o = v.outbound("shop", 80).expect("shop");
    let h = o.http().expect("HTTP");
    assert!(matches!(
        v.route(h, "/by-header", &[], 0),
        RouteDecision::ClusterNotFound(None)
    ));
    assert!(matches!(
        v.route(h, "/by-header", &[("x-cluster", "nope")], 0),
        RouteDecision::ClusterNotFound(Some("nope"))
    ));
}

#[test]
fn redirects_faults_and_envoy_defaults_are_typed() {
    let v = view();
    let o = v.outbound("shop.demo.svc.cluster.local", 80).expect("shop");
    let h = o.http().expect("HTTP");
    match v.route(h, "/old?x=1", &[], 0) {
        RouteDecision::Redirect(_, r) => {
            assert_eq!(r.status, 301);
            assert_eq!(r.host.as_deref(), Some("new.example.com"));
        }
        other => panic!("{other:?}"),
    }
    // case_sensitive: false on the default route.
    match v.route(h, "/OLD/ish", &[], 0) {
        RouteDecision::Forward { route, forward, .. } => {
            assert_eq!(route.name, "default");
            assert_eq!(forward.timeout, Some(typed::DEFAULT_ROUTE_TIMEOUT));
            assert_eq!(forward.timeout, Some(Duration::from_secs(15)));
            assert_eq!(
                route.fault,
                Some(Fault {
                    delay: None,
                    abort: Some((typed::FaultAbort::Http(503), 0.1)),
                })
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn registry_only_block_all_is_outside_the_mesh_but_typed() {
    let v = view();
    assert!(v.outbound("elsewhere.example.com", 80).is_none());
    let table = v.route_config("80").expect("table");
    let vh = table
        .virtual_host("elsewhere.example.com", 80)
        .expect("the catch-all");
    assert!(vh.is_outside_mesh());
    assert!(matches!(
        vh.routes[0].action,
        typed::RouteAction::DirectResponse { status: 502, .. }
    ));
}

#[test]
fn a_route_table_envoy_would_reject_is_nacked() {
    let mut rc = set().routes.remove("80").expect("80");
    rc.virtual_hosts[0].routes[1].r#match = Some(RouteMatch {
        path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/api/(".into(),
            ..Default::default()
        })),
        ..Default::default()
    });
    let any = Any {
        type_url: nasp_xds::types::ROUTE.into(),
        value: rc.encode_to_vec(),
    };
    let e = nasp_xds::types::decode(nasp_xds::types::ROUTE, &any)
        .unwrap_err()
        .to_string();
    assert!(e.contains("regex") && e.contains("\"api\""), "{e}");
}

#[test]
fn rewrites_hashing_mirrors_and_header_changes_are_converted_once() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{
        Header, PolicySpecifier,
    };
    use envoy_types::pb::envoy::config::route::v3::route_action::{
        HashPolicy, RequestMirrorPolicy,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
    let mut s = set();
    let rc = s.routes.get_mut("80").expect("80");
    let Some(Action::Route(a)) = rc.virtual_hosts[0].routes[4].action.as_mut() else {
        panic!("default route forwards")
    };
    a.prefix_rewrite = "/v2/".into();
    a.regex_rewrite = Some(RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex: "^/items/([0-9]+)$".into(),
            ..Default::default()
        }),
        substitution: r"/item?id=\1".into(),
    });
    a.hash_policy = vec![HashPolicy {
        policy_specifier: Some(PolicySpecifier::Header(Header {
            header_name: "X-User".into(),
            ..Default::default()
        })),
        terminal: true,
    }];
    a.retry_policy = Some(envoy_types::pb::envoy::config::route::v3::RetryPolicy {
        retry_on: "5xx,gateway-error".into(),
        retry_back_off: Some(
            envoy_types::pb::envoy::config::route::v3::retry_policy::RetryBackOff {
                base_interval: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
                max_interval: None,
            },
        ),
        per_try_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..Default::default()
    });
    a.request_mirror_policies = vec![RequestMirrorPolicy {
        cluster: "canary".into(),
        ..Default::default()
    }];
    rc.virtual_hosts[0].request_headers_to_add = vec![HeaderValueOption {
        header: Some(HeaderValue {
            key: "X-Mesh".into(),
            value: "nasp".into(),
            ..Default::default()
        }),
        append_action: 2,
        ..Default::default()
    }];
    rc.response_headers_to_remove = vec!["Server".into()];
    let v = MeshView::build(&s, HashMap::new(), ViewSettings::default());
    let table = v.route_config("80").expect("80");
    let vh = table.virtual_host("shop", 80).expect("shop");
    assert_eq!(vh.headers.request_add[0].name, "x-mesh");
    assert_eq!(
        vh.headers.request_add[0].action,
        typed::HeaderAppend::OverwriteIfExistsOrAdd
    );
    assert_eq!(table.headers.response_remove, vec!["server".to_string()]);
    let typed::RouteAction::Forward(f) = &vh.routes[4].action else {
        panic!("forward")
    };
    assert_eq!(f.prefix_rewrite.as_deref(), Some("/v2/"));
    let (re, sub) = f.regex_rewrite.as_ref().expect("regex rewrite");
    assert_eq!(re.replace("/items/42", sub.as_str()), "/item?id=42");
    assert_eq!(
        f.hash_policy,
        vec![typed::HashPolicy {
            input: typed::HashInput::Header("x-user".into()),
            terminal: true,
        }]
    );
    let r = f.retry_policy.as_ref().expect("retry");
    assert!(r.retry_on.server_error && r.retry_on.gateway_error);
    assert_eq!(r.num_retries, 1, "Envoy's default");
    assert_eq!(r.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(r.back_off.base, Duration::from_millis(100));
    assert_eq!(r.back_off.max, Duration::from_secs(1), "10× base");
    assert_eq!(r.host_selection_retry_max_attempts, 1);
    assert_eq!(f.mirrors[0].cluster, "canary");
    assert_eq!(f.mirrors[0].fraction, 1.0);
}
