//! Load-balancing costs (issue 9): the pick of each policy against plain
//! round robin in the same run, with 10 000 endpoints, and the rebuild of a
//! balancer after an EDS update of 10 000 endpoints (one replaced). Targets: ring hash and
//! Maglev picks ≤ 200 ns, a rebuild ≤ 5 ms.
//! Run: `cargo bench -p nasp-transport --bench balance` (or `cargo xtask
//! bench`).

use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use nasp_transport::balance::{Balancer, xx_hash64};
use nasp_xds::cluster::{ClusterInfo, Endpoint, HealthStatus};

fn cluster(policy: &str, n: usize, locality_weighted: bool) -> Arc<ClusterInfo> {
    let endpoints = (0..n)
        .map(|i| Endpoint {
            address: format!("10.{}.{}.{}:8080", i / 65_536, (i / 256) % 256, i % 256),
            weight: 1 + (i % 3) as u32,
            locality: format!("region/zone-{}", i % 3),
            locality_weight: Some(1 + (i % 3) as u32),
            priority: 0,
            healthy: true,
            health: HealthStatus::Healthy,
            istio_mtls: true,
            tls_mode: Some("istio".into()),
        })
        .collect();
    Arc::new(ClusterInfo {
        name: format!("outbound|80||bench-{policy}"),
        sni: None,
        tls: true,
        permissive: false,
        expected_sans: vec![],
        alpn: vec![],
        upstream_tls: None,
        socket_matches: vec![],
        auto_sni: false,
        auto_san_validation: false,
        endpoints,
        lb_policy: policy.into(),
        locality_weighted_lb: locality_weighted,
        overprovisioning_factor: 140,
        connect_timeout: std::time::Duration::from_secs(1),
        upstream_protocol: Default::default(),
        circuit_breakers: None,
        healthy_panic_threshold: 50.0,
        ring_size: (1024, 8 * 1024 * 1024),
        maglev_table_size: 65537,
        retry_budget: None,
        outlier_detection: None,
        slow_start: None,
        least_request: (2, 1.0),
        services: Arc::from([]),
    })
}

fn picks(c: &mut Criterion) {
    let n = 10_000;
    let mut g = c.benchmark_group("pick_10k");
    // Hashes of distinct keys, cycled, so the lookups are not one cache line.
    let hashes: Vec<u64> = (0..4096u32).map(|k| xx_hash64(&k.to_le_bytes())).collect();
    for (name, policy, locality, hashed) in [
        ("round_robin", "ROUND_ROBIN", false, false),
        ("round_robin_localities", "ROUND_ROBIN", true, false),
        ("least_request", "LEAST_REQUEST", false, false),
        ("random", "RANDOM", false, false),
        ("ring_hash", "RING_HASH", false, true),
        ("maglev", "MAGLEV", false, true),
    ] {
        let lb = Balancer::new(cluster(policy, n, locality));
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                let h = hashed.then(|| hashes[i]);
                std::hint::black_box(lb.pick(h, &[]))
            })
        });
    }
    g.finish();
}

fn rebuilds(c: &mut Criterion) {
    let n = 10_000;
    let mut g = c.benchmark_group("rebuild_10k");
    g.sample_size(20);
    for (name, policy) in [
        ("round_robin", "ROUND_ROBIN"),
        ("ring_hash", "RING_HASH"),
        ("maglev", "MAGLEV"),
    ] {
        let before = Balancer::new(cluster(policy, n, false));
        // The update replaces one endpoint (one leaves, one joins) and
        // keeps the other 9 999, as a scale-up / scale-down does.
        let mut after = Arc::unwrap_or_clone(cluster(policy, n, false));
        after.endpoints[0].address = "10.200.0.1:8080".into();
        let after = Arc::new(after);
        g.bench_function(name, |b| {
            b.iter_batched(
                || after.clone(),
                |info| std::hint::black_box(before.update(info)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, picks, rebuilds);
criterion_main!(benches);
