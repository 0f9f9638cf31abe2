//! Mesh listeners for C: `nasp_listen` binds a mesh listener (STRICT,
//! PERMISSIVE or DISABLE as xDS says for the port) and serves it with
//! `Mesh::serve_tcp` on the mesh's runtime; each connection that passed
//! the handshake and the inbound TCP filters waits in a bounded queue for
//! `nasp_listener_accept`.
//!
//! Invariants: the accept loop is a task of the mesh's runtime holding a
//! `Mesh` clone and the queue's sender, never the listener's state; the
//! state aborts the loop when it is dropped (closing the socket), and
//! `Mesh::serve_tcp` is abort-safe (its serving count goes down in
//! `Drop`); a full queue drops the newest connection (the caller sees a
//! reset, as with a full accept backlog) rather than holding it
//! unbounded.

use std::ffi::{CString, c_char};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nasp::TcpConnection;
use tokio::sync::mpsc;

use crate::args;
use crate::mesh::NaspMesh;
use crate::registry::{self, Closer, Kind, Object};
use crate::status::{FfiError, NaspStatus, NaspStr, ffi_call};
use crate::tcp::{NaspConn, register};

/// A handle to a mesh listener; `id == 0` is "no handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspListener {
    /// The registry id.
    pub id: u64,
}

/// Connections accepted and not yet taken by `nasp_listener_accept`.
const QUEUE: usize = 64;

/// What a listener handle owns.
pub(crate) struct ListenerState {
    queue: tokio::sync::Mutex<mpsc::Receiver<TcpConnection>>,
    serving: tokio::task::AbortHandle,
    /// Resolves once the socket is closed (the accept loop is dropped by
    /// the runtime a moment after the abort).
    socket_closed: std::sync::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    local: CString,
    pub(crate) closer: Closer,
}

impl Drop for ListenerState {
    fn drop(&mut self) {
        // Stops the accept loop, which drops the socket; queued
        // connections go with the receiver.
        self.serving.abort();
    }
}

/// Binds a mesh listener on `addr` (`"127.0.0.1:0"` picks a port; the TLS
/// mode is what xDS says for the port, or the config's `inbound_mode`) and
/// starts accepting on it.
///
/// # Ownership
/// `addr` is borrowed for the call. On `OK`, `*out` is a new listener the
/// caller closes with `nasp_listener_close`; freeing or shutting down the
/// mesh closes it too.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `addr` or `out`, not UTF-8, not `ip:port`),
/// `INVALID_HANDLE`, `CLOSED`, `TIMEOUT`, `IO` (the address is taken or
/// not this host's), `WRONG_THREAD`.
///
/// # Safety
/// `addr` is NULL or a NUL-terminated string; `out` is NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_listen(
    m: NaspMesh,
    addr: *const c_char,
    out: *mut NaspListener,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantee on `addr`.
        let text = unsafe { args::cstr(addr, "addr") }?;
        let addr: SocketAddr = text.parse().map_err(|e| {
            FfiError::new(
                NaspStatus::InvalidArgument,
                format!("addr {text:?} is not ip:port: {e}"),
            )
        })?;
        let state = registry::mesh(m.id)?;
        let listener = state.run(state.call_timeout, &format!("binding {addr}"), async {
            state
                .mesh()
                .bind(addr)
                .await
                .map_err(|e| FfiError::new(NaspStatus::Io, format!("binding {addr}: {e}")))
        })?;
        let local = CString::new(listener.local_addr().to_string())
            .expect("invariant: a socket address has no NUL");
        let socket_closed = Box::pin(listener.socket_closed());
        let (tx, rx) = mpsc::channel(QUEUE);
        let mesh = state.mesh().clone();
        let serving = state.spawn(async move {
            mesh.serve_tcp(listener, move |conn| {
                let tx = tx.clone();
                async move {
                    // Full (nobody accepting) or closed: the connection is
                    // dropped here and its caller sees a reset; the
                    // facade's metrics and access log saw it.
                    let _ = tx.try_send(conn);
                }
            })
            .await;
        });
        let listener = ListenerState {
            queue: tokio::sync::Mutex::new(rx),
            serving: serving.abort_handle(),
            socket_closed: std::sync::Mutex::new(Some(socket_closed)),
            local,
            closer: Closer::new(),
        };
        let id =
            registry::insert_child(Kind::Listener, Object::Listener(Arc::new(listener)), m.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspListener { id }) };
        Ok(())
    })
}

/// The address the listener is bound to (`ip:port`, the port chosen when
/// `nasp_listen` was given port 0).
///
/// # Ownership
/// `*out` is a view borrowed from `l`, valid until `nasp_listener_close(l)`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_listener_local_addr(
    l: NaspListener,
    out: *mut NaspStr,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::listener(l.id)?;
        // SAFETY: checked non-NULL; the view points into the state, which
        // the registry keeps until the listener is closed.
        unsafe { out.write(NaspStr::of(&state.local)) };
        Ok(())
    })
}

/// The next connection that passed the handshake (mTLS: the caller's
/// certificate verified) and the inbound TCP filters, waiting at most
/// `timeout_ms` (0: the call timeout).
///
/// # Ownership
/// On `OK`, `*out` is a new connection the caller closes with
/// `nasp_conn_close`; it outlives the listener (not the mesh).
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`, `TIMEOUT` (none
/// came), `CLOSED` (the listener was closed by another thread, or the mesh
/// shut down), `WRONG_THREAD`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_listener_accept(
    l: NaspListener,
    timeout_ms: u32,
    out: *mut NaspConn,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, parent) = registry::listener(l.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let conn = mesh.run(
            timeout,
            "accepting a connection",
            state.closer.guard("listener", async {
                // Cancel-safe: `recv` that did not complete took nothing.
                state.queue.lock().await.recv().await.ok_or_else(|| {
                    FfiError::new(
                        NaspStatus::Closed,
                        "the listener was closed, or its mesh stopped it",
                    )
                })
            }),
        )?;
        let id = register(conn, parent)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspConn { id }) };
        Ok(())
    })
}

/// Stops accepting, closes the socket (the port is free when this
/// returns) and frees the handle; connections not yet accepted are
/// dropped (their callers see a reset), accepted ones stay open. An
/// accept blocked in another thread returns `CLOSED`.
///
/// # Ownership
/// `l` and its views are invalid afterwards.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already closed, or closed with its
/// mesh).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_listener_close(l: NaspListener) -> NaspStatus {
    ffi_call(|| {
        let (_, parent) = registry::listener(l.id)?;
        let Object::Listener(state) = registry::remove(l.id, Kind::Listener)? else {
            unreachable!("invariant: registry::remove checked the kind")
        };
        state.serving.abort();
        let socket_closed = state
            .socket_closed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        // Waits (briefly) until the port is free, so that a bind right
        // after this call succeeds. Closed either way: on a shut-down mesh
        // the socket is already gone, and a refused wait (WRONG_THREAD)
        // only skips the wait.
        if let (Ok(mesh), Some(closed)) = (registry::mesh(parent), socket_closed) {
            let _ = mesh.run(Duration::from_secs(5), "closing the listener", async {
                closed.await;
                Ok(())
            });
        }
        drop(state);
        Ok(())
    })
}
