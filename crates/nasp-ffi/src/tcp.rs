//! TCP through the mesh: a connection dialed by name (`echo.demo:19000`:
//! mTLS with Istio's TCP ALPN, the outbound TCP filters) or accepted on a
//! mesh listener (`listener.rs`), read, written, half-closed and closed
//! through a `NaspConn` handle.
//!
//! Invariants: the connection is split into a read half and a write half,
//! each behind its own async lock, so one thread may read while another
//! writes (two readers of one connection take turns); a close from any
//! thread wakes a blocked read or write of it with `CLOSED`; a connection
//! belongs to its mesh (freed with it, `CLOSED` once it is shut down).

use std::ffi::{CString, c_char};
use std::sync::Arc;

use nasp::{MeshError, TcpConnection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};

use crate::args;
use crate::mesh::NaspMesh;
use crate::registry::{self, Closer, Kind, Object};
use crate::status::{FfiError, NaspStatus, NaspStr, Result, ffi_call};

/// A handle to a mesh TCP connection; `id == 0` is "no handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspConn {
    /// The registry id.
    pub id: u64,
}

/// What a connection handle owns.
pub(crate) struct ConnState {
    read: tokio::sync::Mutex<ReadHalf<TcpConnection>>,
    write: tokio::sync::Mutex<WriteHalf<TcpConnection>>,
    peer_id: CString,
    peer_addr: CString,
    pub(crate) closer: Closer,
}

fn view_of(s: String) -> CString {
    // Neither a SPIFFE id nor a socket address holds a NUL; an empty view
    // is the honest answer if one ever did.
    CString::new(s).unwrap_or_default()
}

/// Registers `conn` as a connection of mesh `parent`: outbound, the
/// upstream's verified id and address; inbound, the caller's.
pub(crate) fn register(conn: TcpConnection, parent: u64) -> Result<u64> {
    let (peer_id, peer_addr) = match (conn.peer_id(), conn.peer_addr()) {
        (None, None) => {
            let up = conn.upstream();
            (
                up.peer_id.as_deref().unwrap_or("").to_string(),
                up.address.to_string(),
            )
        }
        (id, addr) => (
            id.unwrap_or("").to_string(),
            addr.map(|a| a.to_string()).unwrap_or_default(),
        ),
    };
    let (r, w) = tokio::io::split(conn);
    let state = ConnState {
        read: tokio::sync::Mutex::new(r),
        write: tokio::sync::Mutex::new(w),
        peer_id: view_of(peer_id),
        peer_addr: view_of(peer_addr),
        closer: Closer::new(),
    };
    registry::insert_child(Kind::Conn, Object::Conn(Arc::new(state)), parent)
}

fn connect_error(target: &str, e: &MeshError) -> FfiError {
    use nasp::transport::tcp::ConnectError;
    let status = match e {
        MeshError::Connect(ConnectError::BadTarget(_)) => NaspStatus::InvalidArgument,
        _ => NaspStatus::Connect,
    };
    FfiError::new(status, format!("connecting to {target}: {e}"))
}

fn io_error(what: &str, e: &std::io::Error) -> FfiError {
    FfiError::new(NaspStatus::Io, format!("{what}: {e}"))
}

/// Opens a TCP connection through the mesh to `target` (`host:port`, a
/// mesh service name such as `"db.demo:5432"` or an address the mesh
/// knows): mTLS with Istio's TCP ALPN where the destination is in the
/// mesh, through the outbound TCP filters (metadata exchange, TCP
/// metrics). Waits at most `timeout_ms` (0: the configured call timeout).
///
/// # Ownership
/// `target` is borrowed for the call. On `OK`, `*out` is a new connection
/// the caller closes with `nasp_conn_close`; freeing the mesh closes it
/// too.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `target` or `out`, not UTF-8, not
/// `host:port`), `INVALID_HANDLE`, `CLOSED`, `TIMEOUT`, `CONNECT` (not a
/// mesh destination, no endpoint, refused, handshake failed: the message
/// says which), `WRONG_THREAD`.
///
/// # Safety
/// `target` is NULL or a NUL-terminated string; `out` is NULL or valid for
/// a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_tcp_connect(
    m: NaspMesh,
    target: *const c_char,
    timeout_ms: u32,
    out: *mut NaspConn,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantee on `target`.
        let target = unsafe { args::cstr(target, "target") }?;
        let mesh = registry::mesh(m.id)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let conn = mesh.run(timeout, &format!("connecting to {target}"), async {
            mesh.mesh()
                .connect(target)
                .await
                .map_err(|e| connect_error(target, &e))
        })?;
        let id = register(conn, m.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspConn { id }) };
        Ok(())
    })
}

/// Reads up to `cap` bytes into `buf` and sets `*n` to how many; `*n == 0`
/// with `OK` is the end of the stream (the peer half-closed). Waits for
/// data at most `timeout_ms` (0: the call timeout); a timeout loses no
/// bytes.
///
/// # Ownership
/// `buf` is the caller's, written for the call only.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `buf` or `n`, `cap == 0`), `INVALID_HANDLE`,
/// `CLOSED` (the connection was closed by another thread, or the mesh shut
/// down), `TIMEOUT`, `IO` (reset, TLS error), `WRONG_THREAD`.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `n` is NULL or valid
/// for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_conn_read(
    c: NaspConn,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    timeout_ms: u32,
) -> NaspStatus {
    ffi_call(|| {
        let n = args::out(n, "n")?;
        if buf.is_null() || cap == 0 {
            return Err(FfiError::new(
                NaspStatus::InvalidArgument,
                format!("buf is NULL or cap is 0 (cap {cap})"),
            ));
        }
        let (state, parent) = registry::conn(c.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        // Read into our own buffer, then copy: the caller's memory is never
        // held by a future that a timeout could leave behind.
        let mut chunk = vec![0u8; cap.min(64 * 1024)];
        let got = mesh.run(
            timeout,
            "reading the connection",
            state.closer.guard("connection", async {
                // Cancel-safe: a read that has not completed took no bytes.
                let mut r = state.read.lock().await;
                r.read(&mut chunk)
                    .await
                    .map_err(|e| io_error("reading the connection", &e))
            }),
        )?;
        // SAFETY: `buf` is non-NULL with `cap` writable bytes (the caller's
        // guarantee) and `got <= chunk.len() <= cap`; the memory is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf, got);
            n.write(got);
        }
        Ok(())
    })
}

/// Writes all `len` bytes of `buf` and flushes them, waiting at most
/// `timeout_ms` (0: the call timeout) while the peer is slow to read.
///
/// # Ownership
/// `buf` is borrowed for the call (copied).
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `buf` with `len > 0`), `INVALID_HANDLE`,
/// `CLOSED`, `TIMEOUT` (some bytes may have been sent), `IO` (reset, the
/// write side was shut down), `WRONG_THREAD`.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_conn_write(
    c: NaspConn,
    buf: *const u8,
    len: usize,
    timeout_ms: u32,
) -> NaspStatus {
    ffi_call(|| {
        // SAFETY: the caller's guarantee on `buf` and `len`; copied before
        // any await, so no future holds the caller's memory.
        let data = unsafe { args::bytes(buf, len, "buf") }?.to_vec();
        let (state, parent) = registry::conn(c.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        mesh.run(
            timeout,
            "writing the connection",
            state.closer.guard("connection", async {
                let mut w = state.write.lock().await;
                w.write_all(&data)
                    .await
                    .map_err(|e| io_error("writing the connection", &e))?;
                w.flush()
                    .await
                    .map_err(|e| io_error("flushing the connection", &e))
            }),
        )
    })
}

/// Half-closes the connection: the peer reads the end of the stream, and
/// this side can still read what the peer sends. Waits at most
/// `timeout_ms` (0: the call timeout) for buffered bytes to go out.
///
/// # Ownership
/// Frees nothing; `nasp_conn_close` is still needed.
///
/// # Errors
/// `INVALID_HANDLE`, `CLOSED`, `TIMEOUT`, `IO`, `WRONG_THREAD`.
#[unsafe(no_mangle)]
pub extern "C" fn nasp_conn_shutdown_write(c: NaspConn, timeout_ms: u32) -> NaspStatus {
    ffi_call(|| {
        let (state, parent) = registry::conn(c.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        mesh.run(
            timeout,
            "shutting the connection's write side",
            state.closer.guard("connection", async {
                state
                    .write
                    .lock()
                    .await
                    .shutdown()
                    .await
                    .map_err(|e| io_error("shutting the connection's write side", &e))
            }),
        )
    })
}

/// The peer's verified SPIFFE id: for a connection from
/// `nasp_tcp_connect`, the upstream's; for one from
/// `nasp_listener_accept`, the caller's. An empty view when the hop was
/// plaintext.
///
/// # Ownership
/// `*out` is a view borrowed from `c`, valid until `nasp_conn_close(c)`
/// (or the mesh's free); never freed by the caller.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_conn_peer_id(c: NaspConn, out: *mut NaspStr) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::conn(c.id)?;
        // SAFETY: checked non-NULL; the view points into the state, which
        // the registry keeps until the connection is closed.
        unsafe { out.write(NaspStr::of(&state.peer_id)) };
        Ok(())
    })
}

/// The peer's address (`ip:port`): the upstream endpoint dialed, or the
/// caller's address for an accepted connection.
///
/// # Ownership
/// `*out` is a view borrowed from `c`, valid until `nasp_conn_close(c)`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_conn_peer_addr(c: NaspConn, out: *mut NaspStr) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::conn(c.id)?;
        // SAFETY: checked non-NULL; the view points into the state.
        unsafe { out.write(NaspStr::of(&state.peer_addr)) };
        Ok(())
    })
}

/// Closes the connection and frees its handle. A read or write blocked on
/// it in another thread returns `CLOSED`.
///
/// # Ownership
/// `c` and its views are invalid afterwards.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already closed, or closed with its
/// mesh: a double close is reported, not undefined).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_conn_close(c: NaspConn) -> NaspStatus {
    ffi_call(|| {
        drop(registry::remove(c.id, Kind::Conn)?);
        Ok(())
    })
}
