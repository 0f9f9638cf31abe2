//! xDS benchmarks: applying the real `config_v0.json` snapshot as a client
//! does (decode every resource, build the resolved view), the memory that
//! takes, lookups, and an EDS update of a 10 000-endpoint cluster.
//! Run: `cargo bench -p nasp-xds --bench xds`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use nasp_xds::envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, address, socket_address,
};
use nasp_xds::envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use nasp_xds::types::{self, ENDPOINT, RESOURCE_TYPES, encode_set};
use nasp_xds::{MeshView, ResourceSet, ViewSettings, read_config_dump};
use prost::Message;

/// Counts live heap bytes, to report what a snapshot costs in memory.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn settings() -> ViewSettings {
    ViewSettings {
        search_domains: vec![
            "demo.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    }
}

/// What a client does with a full snapshot it received.
fn apply(
    encoded: &[(
        &'static str,
        Vec<nasp_xds::envoy_types::pb::google::protobuf::Any>,
    )],
) -> (ResourceSet, MeshView) {
    let mut set = ResourceSet::default();
    for (t, anys) in encoded {
        for a in anys {
            types::insert(&mut set, types::decode(t, a).expect("valid"));
        }
    }
    let view = MeshView::build(&set, HashMap::new(), settings());
    (set, view)
}

fn big_cla(n: u32) -> ClusterLoadAssignment {
    let lb_endpoints = (0..n)
        .map(|i| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: "outbound|80||echo.demo.svc.cluster.local".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let path = format!(
        "{}/../../../shared/data/istio-config-dumps/config_v0.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let set = read_config_dump(&std::fs::read_to_string(path).expect("dump")).expect("parse");
    let encoded: Vec<(&'static str, Vec<_>)> = {
        let all = encode_set(&set);
        RESOURCE_TYPES
            .iter()
            .map(|t| {
                (
                    *t,
                    all.get(t)
                        .map(|m| m.values().map(|e| e.any.clone()).collect())
                        .unwrap_or_default(),
                )
            })
            .collect()
    };
    let wire: usize = encoded
        .iter()
        .flat_map(|(_, a)| a.iter().map(|a| a.value.len()))
        .sum();

    let before = LIVE.load(Ordering::Relaxed);
    let (held_set, held_view) = apply(&encoded);
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "config_v0: {} clusters, {} listeners, {} routes, {} endpoint sets; {} KiB on the wire; {} KiB held after applying (resources + view)",
        held_set.clusters.len(),
        held_set.listeners.len(),
        held_set.routes.len(),
        held_set.endpoints.len(),
        wire / 1024,
        (after - before) / 1024
    );
    drop((held_set, held_view));

    let mut g = c.benchmark_group("xds");
    g.sample_size(20);
    g.bench_function("apply_config_v0_snapshot", |b| b.iter(|| apply(&encoded)));
    g.sample_size(100);

    let view = MeshView::build(&set, HashMap::new(), settings());
    g.bench_function("lookup_http_short_name", |b| {
        b.iter(|| {
            view.outbound(std::hint::black_box("echo"), 80)
                .expect("known")
        })
    });
    g.bench_function("lookup_http_fqdn", |b| {
        b.iter(|| {
            view.outbound(std::hint::black_box("echo.demo.svc.cluster.local"), 80)
                .expect("known")
        })
    });
    g.bench_function("lookup_tcp_ip", |b| {
        b.iter(|| {
            view.outbound(std::hint::black_box("10.10.42.110"), 12050)
                .expect("known")
        })
    });
    g.bench_function("lookup_inbound_port", |b| {
        b.iter(|| view.inbound(std::hint::black_box(8080)).expect("known"))
    });

    let cla = big_cla(10_000);
    let any = nasp_xds::envoy_types::pb::google::protobuf::Any {
        type_url: ENDPOINT.to_string(),
        value: cla.encode_to_vec(),
    };
    let mut base = set.clone();
    g.sample_size(20);
    g.bench_function("eds_update_10k_endpoints", |b| {
        b.iter(|| {
            types::insert(&mut base, types::decode(ENDPOINT, &any).expect("valid"));
            MeshView::build(&base, HashMap::new(), settings())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
