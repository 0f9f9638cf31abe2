//! An mTLS HTTP request from a mesh created through the C ABI to a nasp
//! server workload, with the embedded control plane (127.0.12.101-102),
//! every call made exactly as a C program makes it: handles by value,
//! out-pointers, pointer + length for bytes, statuses checked.

// The exports are `unsafe extern "C"` functions called as C calls them.
// Every pointer passed is to a live local (or a view the library wrote)
// with its true length, which is the whole of each call's safety contract.
#![allow(unsafe_code, reason = "calling the C ABI")]
#![allow(
    clippy::undocumented_unsafe_blocks,
    reason = "one contract for every call, stated above"
)]

mod support;

use std::time::{Duration, Instant};

use nasp_ffi::*;
use support::{CLIENT_ID, Fixture, SERVER_ID, c, last_error, view};

#[test]
fn an_ffi_mesh_sends_mtls_http_to_a_nasp_server_and_reads_its_metrics() {
    let fx = Fixture::start(101);
    let mut mesh = NaspMesh::default();
    let s = unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) };
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
    assert_eq!(last_error(), "");

    let mut id = NaspStr {
        ptr: std::ptr::null(),
        len: 0,
    };
    assert_eq!(unsafe { nasp_mesh_id(mesh, &mut id) }, NaspStatus::Ok);
    assert_eq!(view(id), CLIENT_ID, "the token file's identity");
    let mut ready = false;
    assert_eq!(
        unsafe { nasp_mesh_is_ready(mesh, &mut ready) },
        NaspStatus::Ok
    );
    assert!(ready);

    // A POST with a binary body (a zero byte inside) and a repeated header.
    let (method, url) = (c("POST"), c(&fx.url("/hello")));
    let headers = [
        NaspHeader {
            name: c"x-a".as_ptr(),
            name_len: 3,
            value: c"1".as_ptr(),
            value_len: 1,
        },
        NaspHeader {
            name: c"x-a".as_ptr(),
            name_len: 3,
            value: c"2".as_ptr(),
            value_len: 1,
        },
    ];
    let body = b"bin\0ary body";
    let mut resp = NaspResponse::default();
    let s = unsafe {
        nasp_http_request(
            mesh,
            method.as_ptr(),
            url.as_ptr(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            0,
            &mut resp,
        )
    };
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());

    let mut status = 0u16;
    assert_eq!(
        unsafe { nasp_response_status(resp, &mut status) },
        NaspStatus::Ok
    );
    assert_eq!(status, 200);
    let mut peer = NaspStr {
        ptr: std::ptr::null(),
        len: 0,
    };
    assert_eq!(
        unsafe { nasp_response_peer_id(resp, &mut peer) },
        NaspStatus::Ok
    );
    assert_eq!(view(peer), SERVER_ID, "the server's verified id (mTLS)");
    let mut count = 0usize;
    assert_eq!(
        unsafe { nasp_response_header_count(resp, &mut count) },
        NaspStatus::Ok
    );
    let mut headers_seen = Vec::new();
    for i in 0..count {
        let (mut n, mut v) = (peer, peer);
        assert_eq!(
            unsafe { nasp_response_header_at(resp, i, &mut n, &mut v) },
            NaspStatus::Ok
        );
        headers_seen.push((view(n), view(v)));
    }
    let get = |name: &str| -> Vec<&str> {
        headers_seen
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("x-peer"), [CLIENT_ID], "the server verified our id");
    assert_eq!(get("x-a-count"), ["2"], "both request headers arrived");
    assert_eq!(get("set-cookie"), ["a=1", "b=2"], "repeats kept, in order");

    // The body in small chunks, until a read of 0 bytes.
    let mut got = Vec::new();
    let mut chunk = [0u8; 5];
    loop {
        let mut n = usize::MAX;
        let s = unsafe { nasp_response_read(resp, chunk.as_mut_ptr(), chunk.len(), &mut n, 0) };
        assert_eq!(s, NaspStatus::Ok, "{}", last_error());
        assert!(n <= chunk.len());
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got, body, "binary body echoed whole");
    assert_eq!(nasp_response_free(resp), NaspStatus::Ok);

    // A second request, read whole: the metrics count both, on the client
    // side (istio-stats runs on the FFI mesh's wasmi runtime).
    let get_url = c(&fx.url("/again"));
    let mut resp = NaspResponse::default();
    let s = unsafe {
        nasp_http_request(
            mesh,
            c"GET".as_ptr(),
            get_url.as_ptr(),
            std::ptr::null(),
            0,
            std::ptr::null(),
            0,
            5000,
            &mut resp,
        )
    };
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
    let mut all = NaspBuf::default();
    assert_eq!(
        unsafe { nasp_response_read_all(resp, 1 << 20, 0, &mut all) },
        NaspStatus::Ok
    );
    let (mut p, mut l) = (std::ptr::null(), usize::MAX);
    assert_eq!(
        unsafe { nasp_buf_data(all, &mut p, &mut l) },
        NaspStatus::Ok
    );
    assert_eq!(l, 0, "GET sent no body, so none is echoed");
    assert_eq!(nasp_buf_free(all), NaspStatus::Ok);
    assert_eq!(nasp_response_free(resp), NaspStatus::Ok);

    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let mut buf = NaspBuf::default();
        assert_eq!(unsafe { nasp_mesh_metrics(mesh, &mut buf) }, NaspStatus::Ok);
        let (mut p, mut l) = (std::ptr::null(), 0usize);
        assert_eq!(
            unsafe { nasp_buf_data(buf, &mut p, &mut l) },
            NaspStatus::Ok
        );
        // SAFETY: the view is valid until nasp_buf_free, and NUL-terminated.
        let text = unsafe { std::ffi::CStr::from_ptr(p.cast()) }
            .to_str()
            .expect("UTF-8")
            .to_string();
        assert_eq!(text.len(), l);
        assert_eq!(nasp_buf_free(buf), NaspStatus::Ok);
        let done = text.lines().any(|line| {
            line.starts_with("istio_requests_total{")
                && line.contains("reporter=\"source\"")
                && line.contains("response_code=\"200\"")
                && line.ends_with(" 2")
        });
        if done {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no istio_requests_total 2 in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("destination_workload"), "{text}");

    assert_eq!(nasp_mesh_shutdown(mesh, 0), NaspStatus::Ok);
    assert_eq!(nasp_mesh_free(mesh), NaspStatus::Ok);
    drop(fx);
}

/// The Go original's constructor cancelled its xDS stream when it
/// returned. Here a service added to the mesh after `nasp_mesh_new`
/// returned becomes reachable: the stream lives as long as the handle
/// (127.0.12.141-143).
#[test]
fn xds_updates_reach_a_mesh_after_nasp_mesh_new_returned() {
    let fx = Fixture::start(141);
    let mut mesh = NaspMesh::default();
    let s = unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) };
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
    let (get, url) = (c("GET"), c("http://late.demo:18080/late"));
    // Status 200 from the echo, or the status (or error) we got instead.
    let ask = || -> Result<(), String> {
        let mut resp = NaspResponse::default();
        let s = unsafe {
            nasp_http_request(
                mesh,
                get.as_ptr(),
                url.as_ptr(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                5000,
                &mut resp,
            )
        };
        if s != NaspStatus::Ok {
            return Err(format!("{s:?}: {}", last_error()));
        }
        let mut status = 0;
        assert_eq!(
            unsafe { nasp_response_status(resp, &mut status) },
            NaspStatus::Ok
        );
        let mut peer = NaspStr {
            ptr: std::ptr::null(),
            len: 0,
        };
        assert_eq!(
            unsafe { nasp_response_peer_id(resp, &mut peer) },
            NaspStatus::Ok
        );
        let peer = view(peer);
        assert_eq!(nasp_response_free(resp), NaspStatus::Ok);
        if status == 200 && peer == SERVER_ID {
            Ok(())
        } else {
            Err(format!("status {status} from {peer:?}"))
        }
    };
    let before = ask();
    assert!(before.is_err(), "late.demo answered before it existed");
    // Well after the constructor returned.
    std::thread::sleep(Duration::from_millis(500));
    fx.push_late_service();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ask() {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("late.demo never became reachable (before the push: {before:?}): {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    assert_eq!(nasp_mesh_free(mesh), NaspStatus::Ok);
}

/// The threads of this process, from `/proc/self/task`.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// A mesh's runtime lives exactly as long as its handle: `nasp_mesh_free`
/// joins its threads (and the filter workers'), so a process that joins
/// and leaves the mesh repeatedly does not grow (127.0.12.144-146).
#[test]
fn freeing_a_mesh_joins_its_threads() {
    let fx = Fixture::start(144);
    let url = c(&fx.url("/threads"));
    let get = c("GET");
    // One join, request and free first: process-wide state (the engines'
    // caches, the registry) is made once and kept, as documented.
    let cycle = || {
        let mut mesh = NaspMesh::default();
        let s = unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) };
        assert_eq!(s, NaspStatus::Ok, "{}", last_error());
        let mut resp = NaspResponse::default();
        let s = unsafe {
            nasp_http_request(
                mesh,
                get.as_ptr(),
                url.as_ptr(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                10_000,
                &mut resp,
            )
        };
        assert_eq!(s, NaspStatus::Ok, "{}", last_error());
        let during = threads();
        assert_eq!(nasp_mesh_free(mesh), NaspStatus::Ok);
        during
    };
    cycle();
    // Threads that outlive a free settle within a moment if they do.
    std::thread::sleep(Duration::from_millis(200));
    let before = threads();
    let during = cycle();
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(during > before, "the mesh ran no threads of its own?");
    assert_eq!(
        threads(),
        before,
        "{during} threads with the mesh, {before} before it"
    );
}
