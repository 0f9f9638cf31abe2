//! Our `metadata-exchange` and `istio-stats` filters as one chain through
//! `nasp wasm exec`, on wasmtime, wasmi and wasm3: the peer metadata
//! headers and TCP preamble they write (byte for byte as Istio encodes
//! them), the ones they strip, and the Istio metrics and labels they
//! produce.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const RUNTIMES: [&str; 3] = ["wasmtime", "wasmi", "wasm3"];
const MX: &str = "target/filters/metadata-exchange.wasm";
const STATS: &str = "target/filters/istio-stats.wasm";

fn filters() {
    for f in [MX, STATS] {
        assert!(
            Path::new(ROOT).join(f).exists(),
            "{f} is missing: build the filters with `cargo xtask build-filters`"
        );
    }
}

fn nasp(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nasp"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run nasp");
    assert!(
        out.status.success(),
        "nasp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn temp(name: &str, body: &serde_json::Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nasp-telemetry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(body).expect("json")).expect("write");
    p
}

/// Runs metadata exchange then stats on one stream.
fn chain(rt: &str, roots: [&str; 2], props: &Path, request: &Path) -> serde_json::Value {
    filters();
    let utf8 = |p: &Path| p.to_str().expect("temp paths are UTF-8").to_string();
    let (props, request) = (utf8(props), utf8(request));
    nasp(&[
        "wasm",
        "exec",
        "--runtime",
        rt,
        "--plugin",
        MX,
        "--root-id",
        roots[0],
        "--config",
        r#"{"max_peer_cache_size":10000}"#,
        "--plugin",
        STATS,
        "--root-id",
        roots[1],
        "--config",
        "{}",
        "--properties",
        &props,
        "--request",
        &request,
    ])
}

// An independent protobuf writer, from the wire format: the filters'
// encoder must agree with it byte for byte.
fn varint(mut v: usize, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

enum V<'a> {
    S(&'a str),
    M(Vec<(&'a str, V<'a>)>),
}

/// A `google.protobuf.Struct`, entries sorted by key as Istio's
/// deterministic serialization writes them.
fn pb_struct(mut entries: Vec<(&str, V<'_>)>) -> Vec<u8> {
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    for (k, v) in entries {
        let value = match v {
            V::S(s) => field(0x1a, s.as_bytes()),
            V::M(m) => field(0x2a, &pb_struct(m)),
        };
        let mut entry = field(0x0a, k.as_bytes());
        entry.extend(field(0x12, &value));
        out.extend(field(0x0a, &entry));
    }
    out
}

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            s.push(if i <= c.len() {
                A[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    s
}

const WEB_ID: &str = "sidecar~10.0.0.1~web-1.demo~demo.svc.cluster.local";

/// The local workload `web` in `demo`.
fn web_props(direction: i64, extra: serde_json::Value) -> serde_json::Value {
    let mut p = serde_json::json!({
        "node.id": WEB_ID,
        "node.metadata.NAME": "web-1",
        "node.metadata.NAMESPACE": "demo",
        "node.metadata.WORKLOAD_NAME": "web",
        "node.metadata.CLUSTER_ID": "Kubernetes",
        "node.metadata.MESH_ID": "cluster.local",
        "node.metadata.ISTIO_VERSION": "1.20.0",
        "node.metadata.LABELS": {"app": "web", "version": "v1"},
        "listener_direction": direction,
    });
    if let (Some(p), serde_json::Value::Object(e)) = (p.as_object_mut(), extra) {
        p.extend(e);
    }
    p
}

/// What the filters must send for `web` (Istio 1.13's key set, the
/// properties above).
fn web_struct() -> Vec<u8> {
    pb_struct(vec![
        ("NAME", V::S("web-1")),
        ("NAMESPACE", V::S("demo")),
        ("WORKLOAD_NAME", V::S("web")),
        ("CLUSTER_ID", V::S("Kubernetes")),
        ("MESH_ID", V::S("cluster.local")),
        ("ISTIO_VERSION", V::S("1.20.0")),
        (
            "LABELS",
            V::M(vec![("app", V::S("web")), ("version", V::S("v1"))]),
        ),
    ])
}

/// The Istio 1.13 sidecar of the real config dump
/// (`data/istio-config-dumps/`, bootstrap node metadata) as a peer.
const CATALOG_ID: &str =
    "sidecar~10.20.160.34~catalog-v1-6578575465-lz5h2.demo~demo.svc.cluster.local";

fn catalog_struct() -> Vec<u8> {
    pb_struct(vec![
        ("NAME", V::S("catalog-v1-6578575465-lz5h2")),
        ("NAMESPACE", V::S("demo")),
        (
            "OWNER",
            V::S("kubernetes://apis/apps/v1/namespaces/demo/deployments/catalog-v1"),
        ),
        ("WORKLOAD_NAME", V::S("catalog-v1")),
        ("ISTIO_VERSION", V::S("1.13.5")),
        ("MESH_ID", V::S("mesh1")),
        ("CLUSTER_ID", V::S("waynz0r-0626-01")),
        ("APP_CONTAINERS", V::S("catalog")),
        (
            "INSTANCE_IPS",
            V::S("10.20.160.34,fe80::84cb:9eff:feb7:941b"),
        ),
        (
            "LABELS",
            V::M(vec![
                ("service.istio.io/canonical-revision", V::S("v1")),
                ("topology.istio.io/network", V::S("network1")),
                ("istio.io/rev", V::S("cp-v113x.istio-system")),
                ("version", V::S("v1")),
                ("service.istio.io/canonical-name", V::S("catalog")),
                ("security.istio.io/tlsMode", V::S("istio")),
                ("app", V::S("catalog")),
                ("pod-template-hash", V::S("6578575465")),
            ]),
        ),
    ])
}

fn header<'a>(headers: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    headers
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

/// The exposition line of `metric` (a counter or a histogram's `_count`);
/// fails the test naming what is there when there is none.
fn series<'a>(t: &'a serde_json::Value, metric: &str) -> &'a str {
    let text = t["metrics"].as_str().unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")))
        .unwrap_or_else(|| panic!("no {metric} series in:\n{text}"))
}

fn assert_labels(line: &str, labels: &[(&str, &str)]) {
    for (k, v) in labels {
        let want = format!("{k}=\"{v}\"");
        assert!(line.contains(&want), "{want} missing in {line}");
    }
}

fn no_failure(t: &serde_json::Value, rt: &str) {
    assert_eq!(t["failed"], false, "{rt}: {t}");
}

#[test]
fn outbound_http_sends_ours_strips_the_peers_and_labels_by_it() {
    let props = temp(
        "out.json",
        &web_props(
            2,
            serde_json::json!({
                "cluster_name": "outbound|80||catalog.demo.svc.cluster.local",
                "upstream.uri_san_peer_certificate": "spiffe://cluster.local/ns/demo/sa/catalog",
                "upstream.uri_san_local_certificate": "spiffe://cluster.local/ns/demo/sa/web",
            }),
        ),
    );
    let request = temp(
        "out-req.json",
        &serde_json::json!({
            "request": {"headers": [[":method", "GET"], [":path", "/items"], [":authority", "catalog.demo"]]},
            "response": {"headers": [
                [":status", "200"],
                ["x-envoy-peer-metadata-id", CATALOG_ID],
                ["x-envoy-peer-metadata", base64(&catalog_struct())],
            ], "body": "[]"},
        }),
    );
    for rt in RUNTIMES {
        let t = chain(rt, ["", "stats_outbound"], &props, &request);
        no_failure(&t, rt);
        let req = &t["request"]["headers"];
        assert_eq!(
            header(req, "x-envoy-peer-metadata"),
            Some(base64(&web_struct()).as_str()),
            "{rt}: our metadata, byte for byte"
        );
        assert_eq!(header(req, "x-envoy-peer-metadata-id"), Some(WEB_ID));
        let resp = &t["response"]["headers"];
        assert_eq!(
            header(resp, "x-envoy-peer-metadata"),
            None,
            "{rt}: stripped"
        );
        assert_eq!(header(resp, "x-envoy-peer-metadata-id"), None);
        assert_eq!(header(resp, ":status"), Some("200"));
        let line = series(&t, "istio_requests_total");
        assert!(line.ends_with("} 1"), "{rt}: {line}");
        assert_labels(
            line,
            &[
                ("reporter", "source"),
                ("source_workload", "web"),
                ("source_workload_namespace", "demo"),
                ("source_principal", "spiffe://cluster.local/ns/demo/sa/web"),
                ("source_app", "web"),
                ("source_version", "v1"),
                ("source_canonical_service", "web"),
                ("source_canonical_revision", "latest"),
                ("source_cluster", "Kubernetes"),
                ("destination_workload", "catalog-v1"),
                ("destination_workload_namespace", "demo"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/demo/sa/catalog",
                ),
                ("destination_app", "catalog"),
                ("destination_version", "v1"),
                ("destination_service", "catalog.demo.svc.cluster.local"),
                ("destination_service_name", "catalog"),
                ("destination_service_namespace", "demo"),
                ("destination_canonical_service", "catalog"),
                ("destination_canonical_revision", "v1"),
                ("destination_cluster", "waynz0r-0626-01"),
                ("request_protocol", "http"),
                ("response_code", "200"),
                ("grpc_response_status", ""),
                ("response_flags", "-"),
                ("connection_security_policy", "unknown"),
            ],
        );
        for h in [
            "istio_request_duration_milliseconds_count",
            "istio_request_bytes_count",
            "istio_response_bytes_count",
        ] {
            assert!(series(&t, h).ends_with("} 1"), "{rt}: {h}");
        }
        // Envoy's buckets, from 0.5 ms to an hour.
        let text = t["metrics"].as_str().unwrap_or_default();
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(text.contains(r#"le="0.5"}"#) && text.contains(r#"le="3600000"}"#));
    }
}

/// A cluster whose Istio metadata names the service: the metadata wins
/// over the cluster's name, and a service without a host there takes the
/// request's (istio-stats keeps each cluster's service after its first
/// stream, so this checks what is kept).
#[test]
fn cluster_metadata_names_the_service_before_the_cluster_name() {
    // The same cluster and service, with the service's host in the
    // metadata or only the request's.
    let props = |file: &str, (key, value): (&str, &str)| {
        let mut extra = serde_json::json!({
            "cluster_name": "outbound|80||catalog.demo.svc.cluster.local",
            "cluster_metadata.filter_metadata.istio.services.0.name": "shop",
            "cluster_metadata.filter_metadata.istio.services.0.namespace": "retail",
        });
        extra[key] = value.into();
        temp(file, &web_props(2, extra))
    };
    let with_host = props(
        "md-host.json",
        (
            "cluster_metadata.filter_metadata.istio.services.0.host",
            "shop.retail.svc.cluster.local",
        ),
    );
    let no_host = props("md-nohost.json", ("request.host", "shop.example"));
    let request = temp(
        "md-req.json",
        &serde_json::json!({
            "request": {"headers": [[":method", "GET"], [":path", "/"], [":authority", "shop.example"]]},
            "response": {"headers": [[":status", "200"]]},
        }),
    );
    for rt in RUNTIMES {
        let t = chain(rt, ["", "stats_outbound"], &with_host, &request);
        no_failure(&t, rt);
        assert_labels(
            series(&t, "istio_requests_total"),
            &[
                ("destination_service", "shop.retail.svc.cluster.local"),
                ("destination_service_name", "shop"),
                ("destination_service_namespace", "retail"),
            ],
        );
        let t = chain(rt, ["", "stats_outbound"], &no_host, &request);
        no_failure(&t, rt);
        assert_labels(
            series(&t, "istio_requests_total"),
            &[
                ("destination_service", "shop.example"),
                ("destination_service_name", "shop"),
                ("destination_service_namespace", "retail"),
            ],
        );
    }
}

#[test]
fn inbound_http_reads_the_peer_answers_it_and_reports_as_destination() {
    let props = temp(
        "in.json",
        &web_props(
            1,
            serde_json::json!({
                "connection.mtls": true,
                "connection.uri_san_peer_certificate": "spiffe://cluster.local/ns/demo/sa/catalog",
                "connection.uri_san_local_certificate": "spiffe://cluster.local/ns/demo/sa/web",
                "request.host": "web.demo.svc.cluster.local:8080",
            }),
        ),
    );
    let request = temp(
        "in-req.json",
        &serde_json::json!({
            "request": {"headers": [
                [":method", "POST"], [":path", "/svc.Echo/Say"], [":authority", "web.demo.svc.cluster.local:8080"],
                ["content-type", "application/grpc"],
                ["x-envoy-peer-metadata-id", CATALOG_ID],
                ["x-envoy-peer-metadata", base64(&catalog_struct())],
            ], "body": "xxxxx"},
            "response": {"headers": [[":status", "200"], ["content-type", "application/grpc"]],
                         "body": "yyyyy", "trailers": [["grpc-status", "14"]]},
        }),
    );
    for rt in RUNTIMES {
        let t = chain(rt, ["", "stats_inbound"], &props, &request);
        no_failure(&t, rt);
        let req = &t["request"]["headers"];
        assert_eq!(
            header(req, "x-envoy-peer-metadata"),
            None,
            "{rt}: the app never sees the peer's metadata: {t}"
        );
        assert_eq!(header(req, "x-envoy-peer-metadata-id"), None);
        let resp = &t["response"]["headers"];
        assert_eq!(
            header(resp, "x-envoy-peer-metadata"),
            Some(base64(&web_struct()).as_str()),
            "{rt}: answered with ours"
        );
        assert_eq!(header(resp, "x-envoy-peer-metadata-id"), Some(WEB_ID));
        let line = series(&t, "istio_requests_total");
        assert_labels(
            line,
            &[
                ("reporter", "destination"),
                ("source_workload", "catalog-v1"),
                ("source_workload_namespace", "demo"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/demo/sa/catalog",
                ),
                ("source_app", "catalog"),
                ("source_version", "v1"),
                ("source_canonical_service", "catalog"),
                ("source_canonical_revision", "v1"),
                ("source_cluster", "waynz0r-0626-01"),
                ("destination_workload", "web"),
                ("destination_workload_namespace", "demo"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/demo/sa/web",
                ),
                ("destination_service", "web.demo.svc.cluster.local:8080"),
                ("destination_service_namespace", "demo"),
                ("destination_cluster", "Kubernetes"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "14"),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
    }
}

/// The value of an exposition line.
fn value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {line}"))
}

/// gRPC message counts come from Envoy's `grpc_stats` filter state
/// (`filter_state.envoy.filters.http.grpc_stats`, "request,response") and
/// carry the peer labels only, as Istio's; HTTP has none, and a value that
/// is not two counts is ignored.
#[test]
fn grpc_message_counts_come_from_the_grpc_stats_filter_state() {
    let request = |content_type: &str| {
        serde_json::json!({
            "request": {"headers": [
                [":method", "POST"], [":path", "/svc.Echo/Chat"], [":authority", "web.demo.svc.cluster.local:8080"],
                ["content-type", content_type],
                ["x-envoy-peer-metadata-id", CATALOG_ID],
                ["x-envoy-peer-metadata", base64(&catalog_struct())],
            ], "body": "xxxxx"},
            "response": {"headers": [[":status", "200"], ["content-type", content_type]],
                         "body": "yyyyy", "trailers": [["grpc-status", "0"]]},
        })
    };
    let props = |state: &str| {
        web_props(
            1,
            serde_json::json!({
                "connection.mtls": true,
                "connection.uri_san_peer_certificate": "spiffe://cluster.local/ns/demo/sa/catalog",
                "request.host": "web.demo.svc.cluster.local:8080",
                "filter_state.envoy.filters.http.grpc_stats": state,
            }),
        )
    };
    let grpc = temp("grpc-msg-req.json", &request("application/grpc"));
    let http = temp("http-msg-req.json", &request("application/json"));
    let counts = temp("grpc-msg.json", &props("2,3"));
    let garbage = temp("grpc-msg-bad.json", &props("2;x"));
    for rt in RUNTIMES {
        let t = chain(rt, ["", "stats_inbound"], &counts, &grpc);
        no_failure(&t, rt);
        for (metric, want) in [
            ("istio_request_messages_total", 2.0),
            ("istio_response_messages_total", 3.0),
        ] {
            let line = series(&t, metric);
            assert_eq!(value(line), want, "{rt}: {line}");
            assert_labels(
                line,
                &[
                    ("reporter", "destination"),
                    ("source_workload", "catalog-v1"),
                    ("destination_workload", "web"),
                    ("destination_cluster", "Kubernetes"),
                ],
            );
            for not in ["request_protocol", "response_code", "grpc_response_status"] {
                assert!(!line.contains(not), "{rt}: {not} in {line}");
            }
        }
        assert_labels(
            series(&t, "istio_requests_total"),
            &[("request_protocol", "grpc")],
        );

        for (what, props, req) in [("HTTP", &counts, &http), ("garbage", &garbage, &grpc)] {
            let t = chain(rt, ["", "stats_inbound"], props, req);
            no_failure(&t, rt);
            let text = t["metrics"].as_str().unwrap_or_default();
            assert!(
                !text.contains("messages_total"),
                "{rt}, {what}: message counts in\n{text}"
            );
            series(&t, "istio_requests_total");
        }
    }
}

#[test]
fn a_peer_without_metadata_is_unknown_and_bad_metadata_is_ignored() {
    let props = temp("in2.json", &web_props(1, serde_json::json!({})));
    for (name, extra) in [
        ("none", vec![]),
        (
            "bad",
            vec![
                serde_json::json!(["x-envoy-peer-metadata", "!!not base64!!"]),
                serde_json::json!(["x-envoy-peer-metadata-id", "sidecar~x"]),
            ],
        ),
        (
            "not-a-struct",
            vec![serde_json::json!([
                "x-envoy-peer-metadata",
                base64(&[0x0a, 0xff, 0x01])
            ])],
        ),
    ] {
        let mut headers = vec![
            serde_json::json!([":method", "GET"]),
            serde_json::json!([":path", "/"]),
        ];
        headers.extend(extra);
        let request = temp(
            &format!("{name}.json"),
            &serde_json::json!({
                "request": {"headers": headers},
                "response": {"headers": [[":status", "503"]]},
            }),
        );
        for rt in RUNTIMES {
            let t = chain(rt, ["", "stats_inbound"], &props, &request);
            no_failure(&t, rt);
            let req = &t["request"]["headers"];
            assert_eq!(header(req, "x-envoy-peer-metadata"), None, "{rt} {name}");
            assert_eq!(header(req, "x-envoy-peer-metadata-id"), None);
            let resp = &t["response"]["headers"];
            assert_eq!(
                header(resp, "x-envoy-peer-metadata"),
                None,
                "{rt} {name}: no metadata answered to a peer that sent none: {t}"
            );
            let line = series(&t, "istio_requests_total");
            assert_labels(
                line,
                &[
                    ("reporter", "destination"),
                    ("source_workload", "unknown"),
                    ("source_workload_namespace", "unknown"),
                    ("source_principal", "unknown"),
                    ("source_app", "unknown"),
                    ("source_canonical_service", "unknown"),
                    ("source_canonical_revision", "latest"),
                    ("destination_workload", "web"),
                    ("destination_service", "unknown"),
                    ("response_code", "503"),
                    ("connection_security_policy", "unknown"),
                ],
            );
        }
    }
}

/// The TCP preamble of a peer `db` (small enough that every byte is ASCII,
/// so it travels in the JSON exchange file as text).
fn db_preamble() -> Vec<u8> {
    let md = pb_struct(vec![("WORKLOAD_NAME", V::S("db"))]);
    let s = pb_struct(vec![(
        "x-envoy-peer-metadata",
        V::M(vec![("WORKLOAD_NAME", V::S("db"))]),
    )]);
    assert!(s.windows(md.len()).any(|w| w == md));
    let mut any = field(0x0a, b"type.googleapis.com/google.protobuf.Struct");
    any.extend(field(0x12, &s));
    let mut p = 0x3D23_0467u32.to_be_bytes().to_vec();
    p.extend((any.len() as u32).to_be_bytes());
    p.extend(any);
    assert!(p.is_ascii());
    p
}

fn tcp_exchange(name: &str, chunks: serde_json::Value) -> PathBuf {
    temp(name, &serde_json::json!({ "tcp": chunks }))
}

fn forwarded(t: &serde_json::Value, i: usize) -> &str {
    t["tcp"]["steps"][i]["forwarded"]
        .as_str()
        .unwrap_or_default()
}

#[test]
fn tcp_outbound_prepends_ours_and_strips_the_peers() {
    let props = temp(
        "tcp-out.json",
        &web_props(
            2,
            serde_json::json!({
                "upstream.negotiated_protocol": "istio-peer-exchange",
                "cluster_name": "outbound|5432||db.demo.svc.cluster.local",
            }),
        ),
    );
    let peer = String::from_utf8(db_preamble()).expect("ascii");
    let exchange = tcp_exchange(
        "tcp-out-req.json",
        serde_json::json!([
            {"from": "downstream", "data": "ping"},
            {"from": "upstream", "data": format!("{peer}pong")},
            {"from": "downstream", "data": "again"},
        ]),
    );
    for rt in RUNTIMES {
        let t = chain(
            rt,
            ["tcp-metadata-exchange", "tcp_stats_outbound"],
            &props,
            &exchange,
        );
        no_failure(&t, rt);
        let first = forwarded(&t, 1);
        assert!(first.starts_with("=#\u{4}g"), "{rt}: magic first: {t}");
        assert!(
            first.ends_with("ping") && first.contains(WEB_ID),
            "{rt}: {first:?}"
        );
        assert!(first.contains("type.googleapis.com/google.protobuf.Struct"));
        assert_eq!(
            forwarded(&t, 2),
            "pong",
            "{rt}: the peer's preamble stripped"
        );
        assert_eq!(forwarded(&t, 3), "again", "{rt}: ours is sent once");
        let labels = [
            ("reporter", "source"),
            ("source_workload", "web"),
            ("destination_workload", "db"),
            ("destination_service", "db.demo.svc.cluster.local"),
            ("destination_service_name", "db"),
            ("request_protocol", "tcp"),
        ];
        for (metric, value) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 9),
            ("istio_tcp_sent_bytes_total", 4),
        ] {
            let line = series(&t, metric);
            assert_labels(line, &labels);
            assert!(!line.contains("response_code"), "{line}");
            assert!(line.ends_with(&format!("}} {value}")), "{rt}: {line}");
        }
    }
}

#[test]
fn tcp_inbound_reads_a_split_preamble_and_answers() {
    let props = temp(
        "tcp-in.json",
        &web_props(
            1,
            serde_json::json!({
                "connection.negotiated_protocol": "istio-peer-exchange",
                "connection.mtls": true,
            }),
        ),
    );
    let peer = String::from_utf8(db_preamble()).expect("ascii");
    let (a, b) = peer.split_at(20);
    let exchange = tcp_exchange(
        "tcp-in-req.json",
        serde_json::json!([
            {"from": "downstream", "data": a},
            {"from": "downstream", "data": format!("{b}ping")},
            {"from": "upstream", "data": "pong"},
        ]),
    );
    for rt in RUNTIMES {
        let t = chain(
            rt,
            ["tcp-metadata-exchange", "tcp_stats_inbound"],
            &props,
            &exchange,
        );
        no_failure(&t, rt);
        assert_eq!(
            t["tcp"]["steps"][1]["status"], "pause",
            "{rt}: waits for the rest: {t}"
        );
        assert_eq!(forwarded(&t, 2), "ping", "{rt}: preamble stripped");
        let back = forwarded(&t, 3);
        assert!(
            back.starts_with("=#\u{4}g") && back.ends_with("pong"),
            "{rt}: {back:?}"
        );
        let line = series(&t, "istio_tcp_received_bytes_total");
        assert_labels(
            line,
            &[
                ("reporter", "destination"),
                ("source_workload", "db"),
                ("destination_workload", "web"),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
        assert!(line.ends_with("} 4"), "{rt}: {line}");
        assert!(series(&t, "istio_tcp_sent_bytes_total").ends_with("} 4"));
    }
}

#[test]
fn tcp_without_the_exchange_alpn_passes_bytes_untouched() {
    let props = temp("tcp-plain.json", &web_props(2, serde_json::json!({})));
    let exchange = tcp_exchange(
        "tcp-plain-req.json",
        serde_json::json!([
            {"from": "downstream", "data": "ping"},
            {"from": "upstream", "data": "=#\u{4}gnot a preamble"},
        ]),
    );
    for rt in RUNTIMES {
        let t = chain(
            rt,
            ["tcp-metadata-exchange", "tcp_stats_outbound"],
            &props,
            &exchange,
        );
        no_failure(&t, rt);
        assert_eq!(forwarded(&t, 1), "ping", "{rt}: {t}");
        assert_eq!(forwarded(&t, 2), "=#\u{4}gnot a preamble");
        assert_labels(
            series(&t, "istio_tcp_connections_opened_total"),
            &[
                ("destination_workload", "unknown"),
                ("source_workload", "web"),
            ],
        );
    }
}
