//! nasp's C ABI (issue 12; the design is `docs/ffi-design.md`): a mesh
//! joined from a JSON/YAML configuration or the environment, HTTP requests
//! through it (routing, mTLS, filters; bodies streamed both ways), TCP
//! connections through it and mesh listeners accepting them, its metrics
//! text, and the last error as a string.
//!
//! Every export returns a [`NaspStatus`] and writes its outputs through
//! out-pointers, only on [`NaspStatus::Ok`]; the message of a failed call
//! is kept per thread ([`nasp_last_error`]). Objects are reached through
//! opaque 64-bit handles resolved in a registry ([`registry`]), so a NULL,
//! stale, freed or wrong-kind handle is a status code, never a dereference.
//! Each mesh handle owns a tokio runtime; every call blocks the caller's
//! thread on it with a timeout.
//!
//! Invariants: no panic crosses the boundary (each export runs inside
//! `ffi_call`, which catches it); no pointer from the caller is read
//! before it is checked (the helpers of [`args`]); no caller memory is kept
//! after a call returns; an `Arc` of a mesh's state is never moved into a
//! task of its own runtime (a runtime must not be dropped from inside
//! itself).
//!
//! Features: `wasmtime`, `wasmi`, `wasm3` (default: all), forwarded to
//! `nasp`.

// The crate is a C boundary: raw pointers from the caller are read and
// written here, each through the checked helpers in `args`, each unsafe
// block saying why it is sound.
#![allow(unsafe_code, reason = "a C ABI reads and writes the caller's pointers")]

pub mod args;
pub mod buf;
pub mod config;
pub mod http;
pub mod listener;
pub mod mesh;
pub mod registry;
pub mod request;
pub mod status;
pub mod tcp;

pub use buf::{NaspBuf, nasp_buf_data, nasp_buf_free};
pub use http::{
    NaspHeader, NaspResponse, nasp_http_request, nasp_response_free, nasp_response_header_at,
    nasp_response_header_count, nasp_response_peer_id, nasp_response_read, nasp_response_read_all,
    nasp_response_status,
};
pub use listener::{
    NaspListener, nasp_listen, nasp_listener_accept, nasp_listener_close, nasp_listener_local_addr,
};
pub use mesh::{
    NaspMesh, nasp_mesh_free, nasp_mesh_id, nasp_mesh_is_ready, nasp_mesh_metrics, nasp_mesh_new,
    nasp_mesh_new_from_env, nasp_mesh_shutdown,
};
pub use request::{
    NaspRequest, nasp_http_start, nasp_request_finish, nasp_request_free, nasp_request_write,
};
pub use status::{
    NASP_ABI_VERSION, NaspStatus, NaspStr, nasp_abi_version, nasp_last_error,
    nasp_last_error_status, nasp_version,
};
pub use tcp::{
    NaspConn, nasp_conn_close, nasp_conn_peer_addr, nasp_conn_peer_id, nasp_conn_read,
    nasp_conn_shutdown_write, nasp_conn_write, nasp_tcp_connect,
};
