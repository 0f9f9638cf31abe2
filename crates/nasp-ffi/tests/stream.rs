//! Streaming request bodies through the C ABI: 5 MiB written in chunks
//! and echoed back read in chunks, a declared `content_length` held to on
//! both ends, an aborted request, and an endless writer ended by a free
//! from another thread. A fixture on 127.0.12.131-133.

// As in tests/http.rs: every pointer passed is to a live local (or a view
// the library wrote) with its true length, the whole of each call's
// contract.
#![allow(unsafe_code, reason = "calling the C ABI")]
#![allow(
    clippy::undocumented_unsafe_blocks,
    reason = "one contract for every call, stated above"
)]

mod support;

use std::ptr::null;

use nasp_ffi::*;
use support::{CLIENT_ID, Fixture, SERVER_ID, c, last_error, view};

#[track_caller]
fn ok(s: NaspStatus) {
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
}

fn start(mesh: NaspMesh, url: &str, content_length: i64) -> NaspRequest {
    let (method, url) = (c("POST"), c(url));
    let mut req = NaspRequest::default();
    ok(unsafe {
        nasp_http_start(
            mesh,
            method.as_ptr(),
            url.as_ptr(),
            null(),
            0,
            content_length,
            30_000,
            &mut req,
        )
    });
    req
}

fn write(req: NaspRequest, bytes: &[u8]) -> NaspStatus {
    unsafe { nasp_request_write(req, bytes.as_ptr(), bytes.len(), 30_000) }
}

fn header(resp: NaspResponse, name: &str) -> Option<String> {
    let mut count = 0;
    ok(unsafe { nasp_response_header_count(resp, &mut count) });
    (0..count).find_map(|i| {
        let (mut n, mut v) = (
            NaspStr {
                ptr: null(),
                len: 0,
            },
            NaspStr {
                ptr: null(),
                len: 0,
            },
        );
        ok(unsafe { nasp_response_header_at(resp, i, &mut n, &mut v) });
        (view(n) == name).then(|| view(v))
    })
}

/// The body, read in 100 KB calls.
fn read_body(resp: NaspResponse) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 100_000];
    loop {
        let mut n = 0;
        ok(unsafe { nasp_response_read(resp, buf.as_mut_ptr(), buf.len(), &mut n, 30_000) });
        if n == 0 {
            return all;
        }
        all.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn request_bodies_stream_both_ways_and_lengths_are_held() {
    let fx = Fixture::start(131);
    let mut mesh = NaspMesh::default();
    ok(unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) });

    // 5 MiB, unknown length (chunked), in 80 writes of 64 KiB.
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let req = start(mesh, &fx.url("/upload"), -1);
    for chunk in data.chunks(64 * 1024) {
        ok(write(req, chunk));
    }
    let mut resp = NaspResponse::default();
    ok(unsafe { nasp_request_finish(req, 30_000, &mut resp) });
    assert_eq!(
        nasp_request_free(req),
        NaspStatus::InvalidHandle,
        "finish consumed the request"
    );
    let mut status = 0;
    ok(unsafe { nasp_response_status(resp, &mut status) });
    assert_eq!(status, 200);
    let mut peer = NaspStr {
        ptr: null(),
        len: 0,
    };
    ok(unsafe { nasp_response_peer_id(resp, &mut peer) });
    assert_eq!(view(peer), SERVER_ID);
    assert_eq!(header(resp, "x-peer").as_deref(), Some(CLIENT_ID));
    let echoed = read_body(resp);
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echoed body differs");
    ok(nasp_response_free(resp));

    // A declared length, written in one call of 1 MiB and one of the rest.
    let declared = &data[..1_500_000];
    let req = start(mesh, &fx.url("/sized"), declared.len() as i64);
    ok(write(req, &declared[..1 << 20]));
    ok(write(req, &declared[1 << 20..]));
    let s = write(req, b"x");
    assert_eq!(s, NaspStatus::InvalidArgument, "{}", last_error());
    assert!(last_error().contains("content_length"), "{}", last_error());
    ok(unsafe { nasp_request_finish(req, 30_000, &mut resp) });
    assert!(read_body(resp) == declared);
    ok(nasp_response_free(resp));

    // Finishing short of the declared length is refused, and consumes it.
    let req = start(mesh, &fx.url("/short"), 100);
    ok(write(req, &[7u8; 40]));
    let s = unsafe { nasp_request_finish(req, 30_000, &mut resp) };
    assert_eq!(s, NaspStatus::InvalidArgument, "{}", last_error());
    assert!(last_error().contains("40 of the 100"), "{}", last_error());
    assert_eq!(nasp_request_free(req), NaspStatus::InvalidHandle);

    // Aborted: freed after a first chunk, never finished. The server must
    // not take "part" for a whole body.
    let req = start(mesh, &fx.url("/aborted"), -1);
    ok(write(req, b"part"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    ok(nasp_request_free(req));
    assert_eq!(write(req, b"more"), NaspStatus::InvalidHandle);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let aborted = loop {
        let seen = fx.bodies.lock().unwrap().clone();
        if let Some((_, whole)) = seen.iter().find(|(p, _)| p == "/aborted") {
            break *whole;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never finished reading /aborted: {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!aborted, "the server took an aborted body for a whole one");
    let seen = fx.bodies.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(p, whole)| p == "/upload" && *whole),
        "{seen:?}"
    );

    // A writer that never stops (the server takes what it can) is ended
    // by a free from another thread: its call in flight returns CLOSED, or
    // its next one INVALID_HANDLE; it never hangs.
    let req = start(mesh, &fx.url("/endless"), -1);
    let writer = std::thread::spawn(move || {
        let chunk = vec![1u8; 1 << 20];
        for _ in 0..100_000 {
            let s = unsafe { nasp_request_write(req, chunk.as_ptr(), chunk.len(), 60_000) };
            if s != NaspStatus::Ok {
                return (s, last_error());
            }
        }
        (NaspStatus::Ok, String::new())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    ok(nasp_request_free(req));
    let (s, msg) = writer.join().expect("no panic");
    assert!(
        matches!(s, NaspStatus::Closed | NaspStatus::InvalidHandle),
        "{s:?}: {msg}"
    );

    // Starting on a shut-down mesh.
    ok(nasp_mesh_shutdown(mesh, 5000));
    let (method, url) = (c("POST"), c(&fx.url("/late")));
    let mut late = NaspRequest::default();
    let s = unsafe {
        nasp_http_start(
            mesh,
            method.as_ptr(),
            url.as_ptr(),
            null(),
            0,
            -1,
            1000,
            &mut late,
        )
    };
    assert_eq!(s, NaspStatus::Closed, "{}", last_error());
    ok(nasp_mesh_free(mesh));
}
