//! TCP through the C ABI: a connection to the fixture's echo service over
//! mTLS (bytes both ways, a half-close answered with one), a mesh listener
//! that a connection from the same mesh reaches by service name, accept
//! timeouts, and closes from another thread waking blocked calls. Each
//! test owns a fixture on 127.0.12.121-135 (three addresses each).

// As in tests/http.rs: every pointer passed is to a live local (or a view
// the library wrote) with its true length, the whole of each call's
// contract.
#![allow(unsafe_code, reason = "calling the C ABI")]
#![allow(
    clippy::undocumented_unsafe_blocks,
    reason = "one contract for every call, stated above"
)]

mod support;

use std::time::{Duration, Instant};

use nasp_ffi::*;
use support::{CLIENT_ID, Fixture, SERVER_ID, c, last_error, view};

#[track_caller]
fn ok(s: NaspStatus) {
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
}

fn join(fx: &Fixture) -> NaspMesh {
    let mut mesh = NaspMesh::default();
    ok(unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) });
    mesh
}

fn empty() -> NaspStr {
    NaspStr {
        ptr: std::ptr::null(),
        len: 0,
    }
}

fn write_all(conn: NaspConn, bytes: &[u8]) {
    ok(unsafe { nasp_conn_write(conn, bytes.as_ptr(), bytes.len(), 10_000) });
}

/// Reads until the end of the stream, in 1000-byte reads.
fn read_to_end(conn: NaspConn) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1000];
    loop {
        let mut n = usize::MAX;
        ok(unsafe { nasp_conn_read(conn, buf.as_mut_ptr(), buf.len(), &mut n, 10_000) });
        if n == 0 {
            return all;
        }
        assert!(n <= buf.len());
        all.extend_from_slice(&buf[..n]);
    }
}

/// Reads exactly `len` bytes.
fn read_exact(conn: NaspConn, len: usize) -> Vec<u8> {
    let mut all = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let mut n = 0;
        ok(unsafe { nasp_conn_read(conn, all[at..].as_mut_ptr(), len - at, &mut n, 10_000) });
        assert_ne!(n, 0, "the stream ended after {at} of {len} bytes");
        at += n;
    }
    all
}

#[test]
fn a_tcp_connection_echoes_over_mtls_and_half_closes() {
    let fx = Fixture::start(121);
    let mesh = join(&fx);
    let mut conn = NaspConn::default();
    let target = c(fx.tcp_target());
    ok(unsafe { nasp_tcp_connect(mesh, target.as_ptr(), 10_000, &mut conn) });

    let (mut id, mut addr) = (empty(), empty());
    ok(unsafe { nasp_conn_peer_id(conn, &mut id) });
    ok(unsafe { nasp_conn_peer_addr(conn, &mut addr) });
    assert_eq!(view(id), SERVER_ID, "the echo's verified identity");
    assert_eq!(view(addr), "127.0.12.122:19000");

    // 2 MB with every byte value (many TLS records, far more than the
    // pipes and socket buffers hold), written by one thread while this one
    // reads the echo: the halves do not wait on each other.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    write_all(conn, &data[..1000]);
    assert_eq!(read_exact(conn, 1000), data[..1000], "echo before the end");
    let writer = std::thread::spawn({
        let rest = data[1000..].to_vec();
        move || {
            for chunk in rest.chunks(64 * 1024) {
                write_all(conn, chunk);
            }
            ok(nasp_conn_shutdown_write(conn, 10_000));
            // The write side is shut: a write is an I/O error.
            let s = unsafe { nasp_conn_write(conn, b"late".as_ptr(), 4, 1000) };
            (s, last_error())
        }
    });
    let rest = read_to_end(conn);
    let (late, msg) = writer.join().expect("the writer");
    assert_eq!(late, NaspStatus::Io, "{msg}");
    assert_eq!(rest.len(), data.len() - 1000);
    assert!(rest == data[1000..], "the echo differs");
    ok(nasp_conn_close(conn));
    assert_eq!(nasp_conn_close(conn), NaspStatus::InvalidHandle);

    // Istio's TCP metrics saw it, from the client side.
    let mut buf = NaspBuf::default();
    ok(unsafe { nasp_mesh_metrics(mesh, &mut buf) });
    let (mut p, mut l) = (std::ptr::null(), 0);
    ok(unsafe { nasp_buf_data(buf, &mut p, &mut l) });
    let text = String::from_utf8(unsafe { std::slice::from_raw_parts(p, l) }.to_vec()).unwrap();
    ok(nasp_buf_free(buf));
    let opened = text
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_service_name=\"echo\"")
        })
        .unwrap_or_else(|| panic!("no opened series:\n{text}"));
    assert!(opened.ends_with(" 1"), "{opened}");

    // Names the mesh does not know, and text that is not host:port.
    let nowhere = c("nowhere.demo:1");
    let s = unsafe { nasp_tcp_connect(mesh, nowhere.as_ptr(), 5000, &mut conn) };
    assert_eq!(s, NaspStatus::Connect, "{}", last_error());
    assert!(last_error().contains("nowhere.demo"), "{}", last_error());
    let bad = c("no-port");
    let s = unsafe { nasp_tcp_connect(mesh, bad.as_ptr(), 5000, &mut conn) };
    assert_eq!(s, NaspStatus::InvalidArgument, "{}", last_error());
    ok(nasp_mesh_free(mesh));
}

#[test]
fn a_listener_accepts_a_mesh_connection_with_the_callers_identity() {
    let fx = Fixture::start(124);
    let mesh = join(&fx);
    let mut listener = NaspListener::default();
    let addr = c(fx.listen_addr());
    ok(unsafe { nasp_listen(mesh, addr.as_ptr(), &mut listener) });
    let mut local = empty();
    ok(unsafe { nasp_listener_local_addr(listener, &mut local) });
    assert_eq!(view(local), fx.listen_addr());

    // Nobody yet: a timeout, soon.
    let started = Instant::now();
    let mut conn = NaspConn::default();
    let s = unsafe { nasp_listener_accept(listener, 200, &mut conn) };
    assert_eq!(s, NaspStatus::Timeout, "{}", last_error());
    assert!(started.elapsed() < Duration::from_secs(5));

    // This mesh calls itself by service name: mTLS both ways.
    let target = c(fx.self_target());
    let mut out = NaspConn::default();
    ok(unsafe { nasp_tcp_connect(mesh, target.as_ptr(), 10_000, &mut out) });
    write_all(out, b"ping");
    let mut inbound = NaspConn::default();
    ok(unsafe { nasp_listener_accept(listener, 10_000, &mut inbound) });
    let mut id = empty();
    ok(unsafe { nasp_conn_peer_id(inbound, &mut id) });
    assert_eq!(view(id), CLIENT_ID, "the caller's verified identity");
    let mut peer = empty();
    ok(unsafe { nasp_conn_peer_addr(inbound, &mut peer) });
    assert!(view(peer).starts_with("127."), "{}", view(peer));
    ok(unsafe { nasp_conn_peer_id(out, &mut id) });
    assert_eq!(view(id), CLIENT_ID, "the server is this identity too");
    assert_eq!(read_exact(inbound, 4), b"ping");
    write_all(inbound, b"pong");
    assert_eq!(read_exact(out, 4), b"pong");

    // The accepted connection outlives its listener.
    ok(nasp_listener_close(listener));
    assert_eq!(nasp_listener_close(listener), NaspStatus::InvalidHandle);
    write_all(inbound, b"still");
    assert_eq!(read_exact(out, 5), b"still");
    ok(nasp_conn_shutdown_write(out, 10_000));
    assert_eq!(read_to_end(inbound), b"");
    ok(nasp_conn_close(out));
    ok(nasp_conn_close(inbound));
    // The listener's socket is closed: nothing accepts there now.
    let refused = std::net::TcpStream::connect_timeout(
        &fx.listen_addr().parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(refused.is_err(), "the closed listener still accepts");
    ok(nasp_mesh_free(mesh));
}

#[test]
fn closes_from_another_thread_wake_blocked_reads_and_accepts() {
    let fx = Fixture::start(127);
    let mesh = join(&fx);
    let target = c(fx.tcp_target());
    let mut conn = NaspConn::default();
    ok(unsafe { nasp_tcp_connect(mesh, target.as_ptr(), 10_000, &mut conn) });
    let mut listener = NaspListener::default();
    let addr = c(fx.listen_addr());
    ok(unsafe { nasp_listen(mesh, addr.as_ptr(), &mut listener) });

    // A read with nothing to read and an accept with nobody coming, each
    // with a 60 s timeout, woken by a close from this thread.
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let mut n = 0;
        let started = Instant::now();
        let s = unsafe { nasp_conn_read(conn, buf.as_mut_ptr(), buf.len(), &mut n, 60_000) };
        (s, last_error(), started.elapsed())
    });
    let acceptor = std::thread::spawn(move || {
        let mut c = NaspConn::default();
        let started = Instant::now();
        let s = unsafe { nasp_listener_accept(listener, 60_000, &mut c) };
        (s, last_error(), started.elapsed())
    });
    // Long enough on a loaded machine for both threads to be inside their
    // calls (one that was not would get INVALID_HANDLE and fail the test).
    std::thread::sleep(Duration::from_millis(1000));
    ok(nasp_conn_close(conn));
    ok(nasp_listener_close(listener));
    for (what, h) in [("read", reader), ("accept", acceptor)] {
        let (s, msg, took) = h.join().expect("no panic");
        assert_eq!(s, NaspStatus::Closed, "{what}: {msg}");
        assert!(msg.contains("closed"), "{what}: {msg}");
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    }

    // A shut-down mesh: its listener stops, new calls are CLOSED.
    ok(unsafe { nasp_listen(mesh, addr.as_ptr(), &mut listener) });
    ok(nasp_mesh_shutdown(mesh, 5000));
    let mut c2 = NaspConn::default();
    let s = unsafe { nasp_listener_accept(listener, 1000, &mut c2) };
    assert_eq!(s, NaspStatus::Closed, "{}", last_error());
    let s = unsafe { nasp_tcp_connect(mesh, target.as_ptr(), 1000, &mut c2) };
    assert_eq!(s, NaspStatus::Closed, "{}", last_error());
    // Freeing the mesh takes its listener with it.
    ok(nasp_mesh_free(mesh));
    assert_eq!(nasp_listener_close(listener), NaspStatus::InvalidHandle);
}
