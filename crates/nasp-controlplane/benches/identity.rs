//! Identity benchmarks: CSR generation (ECDSA P-256, RSA 2048) and a mesh
//! mTLS handshake, full and resumed, between two workloads with embedded-CA
//! certificates. The handshakes run in memory (no sockets), so they measure
//! the TLS work alone. Run: `cargo bench -p nasp-controlplane --bench identity`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use nasp_controlplane::CertificateAuthority;
use nasp_identity::cert::{pem_certs, pem_key};
use nasp_identity::tls::{client_config, server_config};
use nasp_identity::{KeyAlgorithm, SpiffeId, WorkloadCert, keys};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::sync::watch;

fn workload(ca: &CertificateAuthority, who: &str) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
    let id: SpiffeId = who.parse().expect("id");
    let key = keys::generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let now = OffsetDateTime::now_utc();
    let chain_pem = ca
        .issue(
            &id,
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .expect("issue");
    let chain = chain_pem
        .iter()
        .flat_map(|p| pem_certs(p.as_bytes()).expect("pem"))
        .collect();
    let cert = WorkloadCert::new(
        chain,
        pem_key(key.serialize_pem().as_bytes()).expect("key"),
        pem_certs(ca.root_pem().as_bytes()).expect("root"),
    )
    .expect("cert");
    let (tx, rx) = watch::channel(Some(Arc::new(cert)));
    std::mem::forget(tx);
    rx
}

fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> rustls::HandshakeKind {
    let mut c = ClientConnection::new(
        client.clone(),
        ServerName::try_from("web.demo").expect("name"),
    )
    .expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..10 {
        buf.clear();
        c.write_tls(&mut buf).expect("client write");
        s.read_tls(&mut &buf[..]).expect("server read");
        s.process_new_packets().expect("server handshake");
        buf.clear();
        s.write_tls(&mut buf).expect("server write");
        c.read_tls(&mut &buf[..]).expect("client read");
        c.process_new_packets().expect("client handshake");
        if !c.is_handshaking() && !s.is_handshaking() {
            // Deliver anything left (TLS 1.3 session tickets).
            buf.clear();
            s.write_tls(&mut buf).expect("server write");
            c.read_tls(&mut &buf[..]).expect("client read");
            c.process_new_packets().expect("client tickets");
            return c.handshake_kind().expect("kind");
        }
    }
    panic!("handshake did not finish");
}

fn bench(c: &mut Criterion) {
    let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().expect("id");
    let mut g = c.benchmark_group("identity");
    g.bench_function("csr_ecdsa_p256", |b| {
        b.iter(|| keys::generate_csr(&id, KeyAlgorithm::EcdsaP256).expect("csr"))
    });
    g.sample_size(10);
    g.bench_function("csr_rsa_2048", |b| {
        b.iter(|| keys::generate_csr(&id, KeyAlgorithm::Rsa2048).expect("csr"))
    });
    g.sample_size(100);

    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    let server_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/web");
    let client_certs = workload(&ca, "spiffe://cluster.local/ns/demo/sa/client");
    let server = Arc::new(
        server_config(server_certs, "cluster.local", None, &[b"istio-h2"]).expect("server"),
    );
    let mut full = client_config(
        client_certs.clone(),
        vec!["spiffe://cluster.local/ns/demo/sa/web".into()],
        &[b"istio-h2"],
    )
    .expect("client");
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);
    let resuming = Arc::new(
        client_config(
            client_certs,
            vec!["spiffe://cluster.local/ns/demo/sa/web".into()],
            &[b"istio-h2"],
        )
        .expect("client"),
    );
    assert_eq!(handshake(&full, &server), rustls::HandshakeKind::Full);
    handshake(&resuming, &server);
    assert_eq!(
        handshake(&resuming, &server),
        rustls::HandshakeKind::Resumed,
        "the second handshake resumes"
    );

    g.bench_function("mtls_handshake_full", |b| {
        b.iter(|| handshake(&full, &server))
    });
    g.bench_function("mtls_handshake_resumed", |b| {
        b.iter(|| handshake(&resuming, &server))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
