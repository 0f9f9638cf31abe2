//! The boundary under bad arguments, called as C calls it: NULL handles
//! and pointers, NULL strings with lengths, invalid UTF-8, malformed
//! input, wrong-kind handles, double frees, use after free and after
//! shutdown, a caller inside a tokio runtime. Each gives its status and a
//! message, never a crash. With a mesh: 127.0.12.111-112.

// As in tests/http.rs: every pointer passed is to a live local (or NULL on
// purpose) with its true length, the whole of each call's contract.
#![allow(unsafe_code, reason = "calling the C ABI")]
#![allow(
    clippy::undocumented_unsafe_blocks,
    reason = "one contract for every call, stated above"
)]

mod support;

use std::ptr::{null, null_mut};

use nasp_ffi::*;
use support::{Fixture, c, last_error};

/// `s` is `want` and the message mentions `says`.
#[track_caller]
fn expect(s: NaspStatus, want: NaspStatus, says: &str) {
    let msg = last_error();
    assert_eq!(s, want, "{msg}");
    assert_eq!(nasp_last_error_status(), want);
    assert!(
        msg.contains(says),
        "{want:?}: {msg:?} should mention {says:?}"
    );
}

const EMPTY: NaspStr = NaspStr {
    ptr: null(),
    len: 0,
};

#[test]
fn no_mesh_needed_bad_arguments_are_statuses() {
    assert_eq!(nasp_abi_version(), NASP_ABI_VERSION);
    let v = unsafe { std::ffi::CStr::from_ptr(nasp_version()) }
        .to_str()
        .unwrap();
    assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");

    let mut mesh = NaspMesh::default();
    let cfg = "trust_domain: x\n";
    // NULL config with a length, NULL out, invalid UTF-8, bad field.
    expect(
        unsafe { nasp_mesh_new(null(), 5, &mut mesh) },
        NaspStatus::InvalidArgument,
        "config is NULL",
    );
    expect(
        unsafe { nasp_mesh_new(cfg.as_ptr().cast(), cfg.len(), null_mut()) },
        NaspStatus::InvalidArgument,
        "out is NULL",
    );
    let bad = b"runtime: \xff\xfe\n";
    expect(
        unsafe { nasp_mesh_new(bad.as_ptr().cast(), bad.len(), &mut mesh) },
        NaspStatus::InvalidArgument,
        "not UTF-8",
    );
    let typo = "control_plane: { address: 127.0.12.119:1, root_cert_pem: x }\nruntme: wasmi\n";
    expect(
        unsafe { nasp_mesh_new(typo.as_ptr().cast(), typo.len(), &mut mesh) },
        NaspStatus::Config,
        "runtme",
    );
    expect(
        unsafe { nasp_mesh_new(cfg.as_ptr().cast(), cfg.len(), &mut mesh) },
        NaspStatus::Config,
        "control_plane",
    );
    assert_eq!(mesh, NaspMesh::default(), "out untouched on failure");

    // Zero and made-up handles, for every function that takes one.
    let zero = NaspMesh::default();
    let made_up = NaspMesh {
        id: 1 << 56 | 12345,
    };
    let mut id = EMPTY;
    expect(
        unsafe { nasp_mesh_id(zero, &mut id) },
        NaspStatus::InvalidHandle,
        "is 0",
    );
    expect(
        unsafe { nasp_mesh_id(made_up, &mut id) },
        NaspStatus::InvalidHandle,
        "unknown",
    );
    let mut ready = false;
    expect(
        unsafe { nasp_mesh_is_ready(zero, &mut ready) },
        NaspStatus::InvalidHandle,
        "mesh",
    );
    let mut buf = NaspBuf::default();
    expect(
        unsafe { nasp_mesh_metrics(made_up, &mut buf) },
        NaspStatus::InvalidHandle,
        "mesh",
    );
    expect(
        nasp_mesh_shutdown(zero, 0),
        NaspStatus::InvalidHandle,
        "mesh",
    );
    expect(nasp_mesh_free(zero), NaspStatus::InvalidHandle, "mesh");
    expect(
        nasp_mesh_free(made_up),
        NaspStatus::InvalidHandle,
        "unknown",
    );
    let mut resp = NaspResponse::default();
    expect(
        unsafe {
            nasp_http_request(
                zero,
                c"GET".as_ptr(),
                c"http://a/".as_ptr(),
                null(),
                0,
                null(),
                0,
                0,
                &mut resp,
            )
        },
        NaspStatus::InvalidHandle,
        "mesh",
    );
    let r0 = NaspResponse::default();
    let mut status = 0u16;
    expect(
        unsafe { nasp_response_status(r0, &mut status) },
        NaspStatus::InvalidHandle,
        "response",
    );
    let mut n = 0usize;
    expect(
        unsafe { nasp_response_header_count(r0, &mut n) },
        NaspStatus::InvalidHandle,
        "response",
    );
    let (mut a, mut b) = (EMPTY, EMPTY);
    expect(
        unsafe { nasp_response_header_at(r0, 0, &mut a, &mut b) },
        NaspStatus::InvalidHandle,
        "response",
    );
    expect(
        unsafe { nasp_response_peer_id(r0, &mut a) },
        NaspStatus::InvalidHandle,
        "response",
    );
    let mut chunk = [0u8; 8];
    expect(
        unsafe { nasp_response_read(r0, chunk.as_mut_ptr(), chunk.len(), &mut n, 0) },
        NaspStatus::InvalidHandle,
        "response",
    );
    expect(
        unsafe { nasp_response_read_all(r0, 10, 0, &mut buf) },
        NaspStatus::InvalidHandle,
        "response",
    );
    expect(
        nasp_response_free(r0),
        NaspStatus::InvalidHandle,
        "response",
    );
    let (mut p, mut l) = (null(), 0usize);
    expect(
        unsafe { nasp_buf_data(NaspBuf::default(), &mut p, &mut l) },
        NaspStatus::InvalidHandle,
        "buffer",
    );
    expect(
        nasp_buf_free(NaspBuf::default()),
        NaspStatus::InvalidHandle,
        "buffer",
    );

    // A success clears the last error.
    assert_eq!(nasp_abi_version(), 1);
    let ok = unsafe { nasp_buf_data(NaspBuf::default(), null_mut(), &mut l) };
    expect(ok, NaspStatus::InvalidArgument, "ptr is NULL");
}

#[test]
fn a_caller_inside_a_tokio_runtime_gets_wrong_thread() {
    let cfg = "control_plane: { address: 127.0.12.119:1, root_cert_pem: x }\n";
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let mut mesh = NaspMesh::default();
        let s = unsafe { nasp_mesh_new(cfg.as_ptr().cast(), cfg.len(), &mut mesh) };
        (s, last_error())
    });
    assert_eq!(s.0, NaspStatus::WrongThread, "{}", s.1);
    assert!(s.1.contains("tokio runtime"), "{}", s.1);
}

#[test]
fn with_a_mesh_bad_arguments_double_frees_and_use_after_close_are_statuses() {
    let fx = Fixture::start(111);
    let mut mesh = NaspMesh::default();
    let s = unsafe { nasp_mesh_new(fx.config.as_ptr().cast(), fx.config.len(), &mut mesh) };
    assert_eq!(s, NaspStatus::Ok, "{}", last_error());
    let url = c(&fx.url("/"));
    let get = |out: &mut NaspResponse| unsafe {
        nasp_http_request(
            mesh,
            c"GET".as_ptr(),
            url.as_ptr(),
            null(),
            0,
            null(),
            0,
            0,
            out,
        )
    };

    // Request arguments.
    let mut resp = NaspResponse::default();
    let call = |method: *const std::ffi::c_char,
                url: *const std::ffi::c_char,
                headers: *const NaspHeader,
                n_headers: usize,
                body: *const u8,
                body_len: usize,
                out: *mut NaspResponse| unsafe {
        nasp_http_request(
            mesh, method, url, headers, n_headers, body, body_len, 0, out,
        )
    };
    let u = url.as_ptr();
    let m = c"GET".as_ptr();
    expect(
        call(null(), u, null(), 0, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "method is NULL",
    );
    expect(
        call(m, null(), null(), 0, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "url is NULL",
    );
    expect(
        call(m, u, null(), 0, null(), 0, null_mut()),
        NaspStatus::InvalidArgument,
        "out is NULL",
    );
    expect(
        call(m, u, null(), 2, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "headers is NULL",
    );
    expect(
        call(m, u, null(), 0, null(), 3, &mut resp),
        NaspStatus::InvalidArgument,
        "body is NULL",
    );
    let bad_utf8 = c"http://echo.demo:18080/\xff";
    expect(
        call(m, bad_utf8.as_ptr(), null(), 0, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "url is not UTF-8",
    );
    expect(
        call(m, c"not a url".as_ptr(), null(), 0, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "url",
    );
    expect(
        call(c"G T".as_ptr(), u, null(), 0, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "method",
    );
    let bad_header = [NaspHeader {
        name: c"a b".as_ptr(),
        name_len: 3,
        value: c"v".as_ptr(),
        value_len: 1,
    }];
    expect(
        call(m, u, bad_header.as_ptr(), 1, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "headers[0].name",
    );
    let null_value = [NaspHeader {
        name: c"x".as_ptr(),
        name_len: 1,
        value: null(),
        value_len: 4,
    }];
    expect(
        call(m, u, null_value.as_ptr(), 1, null(), 0, &mut resp),
        NaspStatus::InvalidArgument,
        "headers[0].value",
    );
    assert_eq!(resp, NaspResponse::default(), "out untouched on failure");

    // A response: accessor arguments, wrong kind, double free.
    assert_eq!(get(&mut resp), NaspStatus::Ok, "{}", last_error());
    let (mut a, mut b) = (EMPTY, EMPTY);
    expect(
        unsafe { nasp_response_header_at(resp, 999, &mut a, &mut b) },
        NaspStatus::InvalidArgument,
        "out of range",
    );
    expect(
        unsafe { nasp_response_header_at(resp, 0, null_mut(), &mut b) },
        NaspStatus::InvalidArgument,
        "name is NULL",
    );
    let mut n = 0usize;
    expect(
        unsafe { nasp_response_read(resp, null_mut(), 8, &mut n, 0) },
        NaspStatus::InvalidArgument,
        "buf",
    );
    expect(
        unsafe { nasp_response_status(resp, null_mut()) },
        NaspStatus::InvalidArgument,
        "out is NULL",
    );
    let as_mesh = NaspMesh { id: resp.id };
    let mut id = EMPTY;
    expect(
        unsafe { nasp_mesh_id(as_mesh, &mut id) },
        NaspStatus::InvalidHandle,
        "is a response, not a mesh",
    );
    expect(
        nasp_mesh_free(as_mesh),
        NaspStatus::InvalidHandle,
        "not a mesh",
    );
    assert_eq!(nasp_response_free(resp), NaspStatus::Ok);
    expect(
        nasp_response_free(resp),
        NaspStatus::InvalidHandle,
        "already freed",
    );
    let mut status = 0u16;
    expect(
        unsafe { nasp_response_status(resp, &mut status) },
        NaspStatus::InvalidHandle,
        "already freed",
    );

    // A buffer: double free.
    let mut buf = NaspBuf::default();
    assert_eq!(unsafe { nasp_mesh_metrics(mesh, &mut buf) }, NaspStatus::Ok);
    assert_eq!(nasp_buf_free(buf), NaspStatus::Ok);
    expect(
        nasp_buf_free(buf),
        NaspStatus::InvalidHandle,
        "already freed",
    );

    // A body too large for read_all's max.
    let body = [7u8; 64];
    let mut big = NaspResponse::default();
    assert_eq!(
        call(
            c"POST".as_ptr(),
            u,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            &mut big
        ),
        NaspStatus::Ok
    );
    expect(
        unsafe { nasp_response_read_all(big, 10, 0, &mut buf) },
        NaspStatus::Io,
        "larger than max",
    );
    assert_eq!(nasp_response_free(big), NaspStatus::Ok);

    // After shutdown: calls are CLOSED, a second shutdown is OK, the id
    // still reads; after free: everything of the mesh is unknown.
    let mut kept = NaspResponse::default();
    assert_eq!(get(&mut kept), NaspStatus::Ok);
    assert_eq!(nasp_mesh_shutdown(mesh, 0), NaspStatus::Ok);
    expect(get(&mut resp), NaspStatus::Closed, "shut down");
    let mut chunk = [0u8; 8];
    expect(
        unsafe { nasp_response_read(kept, chunk.as_mut_ptr(), chunk.len(), &mut n, 0) },
        NaspStatus::Closed,
        "shut down",
    );
    let mut ready = true;
    expect(
        unsafe { nasp_mesh_is_ready(mesh, &mut ready) },
        NaspStatus::Closed,
        "shut down",
    );
    assert_eq!(nasp_mesh_shutdown(mesh, 0), NaspStatus::Ok, "idempotent");
    assert_eq!(unsafe { nasp_mesh_id(mesh, &mut id) }, NaspStatus::Ok);
    assert_eq!(nasp_mesh_free(mesh), NaspStatus::Ok);
    expect(
        nasp_mesh_free(mesh),
        NaspStatus::InvalidHandle,
        "already freed",
    );
    expect(
        unsafe { nasp_mesh_id(mesh, &mut id) },
        NaspStatus::InvalidHandle,
        "already freed",
    );
    expect(get(&mut resp), NaspStatus::InvalidHandle, "already freed");
    expect(
        nasp_response_free(kept),
        NaspStatus::InvalidHandle,
        "already freed",
    );

    // A control plane that is not there: NOT_READY within the ready timeout.
    let cfg = format!(
        "control_plane: {{ address: 127.0.12.119:1, root_cert_file: {} }}\nready_timeout_ms: 500\n",
        fx.dir.path().join("root-cert.pem").display()
    );
    let mut m2 = NaspMesh::default();
    expect(
        unsafe { nasp_mesh_new(cfg.as_ptr().cast(), cfg.len(), &mut m2) },
        NaspStatus::NotReady,
        "no certificate",
    );
    assert_eq!(m2, NaspMesh::default());
}
