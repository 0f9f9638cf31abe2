//! The mesh handle: creation from a configuration or the environment,
//! its id, readiness, metrics, shutdown and free, and `MeshState::run`,
//! the one place a C caller's thread blocks on the mesh's runtime.
//!
//! Invariants: the runtime is built here and dropped only in
//! `MeshState`'s `Drop`, from a caller's thread (never a task of its own:
//! no `Arc<MeshState>` goes into a spawned future); background work (the
//! secret manager, the ADS client, filter upkeep) runs on that runtime and
//! so lives exactly as long as the handle, not as long as the call that
//! created it.

use std::ffi::{CString, c_char};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nasp::{Mesh, MeshError};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::args;
use crate::buf::{NaspBuf, new_buf};
use crate::config::{Config, Settings};
use crate::registry::{self, Kind, Object};
use crate::status::{FfiError, NaspStatus, NaspStr, Result, ffi_call};

/// A handle to a mesh; `id == 0` is "no handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspMesh {
    /// The registry id.
    pub id: u64,
}

/// What a mesh handle owns.
pub(crate) struct MeshState {
    // Both `Option` only so that `Drop` can order them: the mesh first
    // (inside the runtime's context), then the runtime.
    mesh: Option<Mesh>,
    rt: Option<Runtime>,
    closed: watch::Sender<bool>,
    id: CString,
    pub(crate) call_timeout: Duration,
    drain: Duration,
}

impl Drop for MeshState {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        {
            let _inside = rt.enter();
            self.mesh.take();
        }
        // Joins the worker threads; tasks still running (a connection's
        // last bytes) get a bounded grace.
        rt.shutdown_timeout(Duration::from_secs(5));
    }
}

fn wrong_thread() -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(FfiError::new(
            NaspStatus::WrongThread,
            "called from a thread inside a tokio runtime: call nasp from a plain thread \
             (spawn_blocking, or a thread of your own)",
        ));
    }
    Ok(())
}

fn closed() -> FfiError {
    FfiError::new(NaspStatus::Closed, "the mesh was shut down")
}

impl MeshState {
    pub(crate) fn mesh(&self) -> &Mesh {
        self.mesh
            .as_ref()
            .expect("invariant: the mesh is taken only in Drop")
    }

    /// Whether `nasp_mesh_shutdown` was called.
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Spawns `task` on the mesh's runtime (work that outlives one call:
    /// a listener's accept loop, a streaming request).
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt().spawn(task)
    }

    fn rt(&self) -> &Runtime {
        self.rt
            .as_ref()
            .expect("invariant: the runtime is taken only in Drop")
    }

    /// Blocks the caller's thread on `op`, for at most `timeout`, and
    /// returns `CLOSED` as soon as the mesh is shut down.
    pub(crate) fn run<T>(
        &self,
        timeout: Duration,
        what: &str,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        wrong_thread()?;
        let mut closed_rx = self.closed.subscribe();
        if *closed_rx.borrow() {
            return Err(closed());
        }
        self.rt().block_on(async {
            tokio::select! {
                r = op => r,
                _ = tokio::time::sleep(timeout) => Err(FfiError::new(
                    NaspStatus::Timeout,
                    format!("{what}: no answer within {timeout:?}"),
                )),
                _ = closed_rx.wait_for(|c| *c) => Err(closed()),
            }
        })
    }

    /// Marks the mesh closed (blocked calls return `CLOSED`) and drains its
    /// servers, for at most `timeout`. Idempotent.
    fn shutdown(&self, timeout: Duration) -> Result<()> {
        wrong_thread()?;
        if self.closed.send_replace(true) {
            return Ok(());
        }
        let mesh = self.mesh().clone();
        self.rt().block_on(async {
            if tokio::time::timeout(timeout, mesh.shutdown())
                .await
                .is_err()
            {
                return Err(FfiError::new(
                    NaspStatus::Timeout,
                    format!("shutdown: the drain took longer than {timeout:?}; the mesh is closed"),
                ));
            }
            Ok(())
        })
    }
}

fn mesh_error(e: MeshError) -> FfiError {
    let status = match &e {
        MeshError::Config(_) => NaspStatus::Config,
        MeshError::NotReady(..) => NaspStatus::NotReady,
        _ => NaspStatus::Internal,
    };
    FfiError::new(status, format!("joining the mesh: {e}"))
}

/// Builds the runtime and joins the mesh on it.
fn create(settings: Settings) -> Result<u64> {
    wrong_thread()?;
    let Settings {
        builder,
        call_timeout,
        drain,
        worker_threads,
    } = settings;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .thread_name("nasp-ffi")
        .enable_all()
        .build()
        .map_err(|e| FfiError::new(NaspStatus::Internal, format!("starting the runtime: {e}")))?;
    // The builder's tasks are spawned inside this block_on, so they belong
    // to `rt` and outlive this call (the Go original's bug: a deferred
    // cancel stopped them when its constructor returned).
    let mesh = match rt.block_on(builder.build()) {
        Ok(m) => m,
        Err(e) => {
            rt.shutdown_timeout(Duration::from_secs(1));
            return Err(mesh_error(e));
        }
    };
    let id = CString::new(mesh.id().to_string()).expect("invariant: a SPIFFE id has no NUL");
    let (closed, _) = watch::channel(false);
    let state = MeshState {
        mesh: Some(mesh),
        rt: Some(rt),
        closed,
        id,
        call_timeout,
        drain,
    };
    Ok(registry::insert(
        Kind::Mesh,
        Object::Mesh(Arc::new(state)),
        0,
    ))
}

/// Joins the mesh described by `config` (JSON or YAML, `len` bytes, see
/// `docs/ffi-design.md` section 3.4): starts identity and xDS on a runtime
/// of the mesh's own and blocks until a certificate and a first xDS
/// snapshot arrived (`ready_timeout_ms`, default 30 s).
///
/// # Ownership
/// `config` is borrowed for the call (copied). On `OK`, `*out` is a new
/// mesh the caller frees with `nasp_mesh_free`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`, NULL `config` with `len > 0`, not
/// UTF-8), `CONFIG` (unparsable, unknown field, bad value: the message
/// names it), `NOT_READY` (no certificate or snapshot in time),
/// `WRONG_THREAD`, `INTERNAL`.
///
/// # Safety
/// `config` points to `len` readable bytes (or is NULL with `len == 0`);
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_mesh_new(
    config: *const c_char,
    len: usize,
    out: *mut NaspMesh,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantee on `config` and `len`.
        let text = unsafe { args::text(config, len, "config") }?;
        let settings = Config::parse(text)
            .and_then(Config::into_settings)
            .map_err(|e| FfiError::new(NaspStatus::Config, e))?;
        let id = create(settings)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspMesh { id }) };
        Ok(())
    })
}

/// Joins the mesh the environment describes, as an Istio VM workload
/// (`DISCOVERY_ADDRESS`, `CA_ADDR`, `ROOT_CERT`, `ISTIO_TOKEN`,
/// `POD_NAMESPACE`, `SERVICE_ACCOUNT`, `ISTIO_META_*`, `TRUST_DOMAIN`,
/// `NASP_PROMETHEUS_ADDR`…; files fall back to `./mesh.yaml`,
/// `./root-cert.pem` and `./istio-token` in the working directory), with
/// the fields of `overrides` (same schema as `nasp_mesh_new`) on top.
///
/// # Ownership
/// `overrides` is borrowed for the call and may be NULL with `len == 0`.
/// On `OK`, `*out` is a new mesh the caller frees with `nasp_mesh_free`.
///
/// # Errors
/// As `nasp_mesh_new`; a missing variable is `CONFIG` naming it.
///
/// # Safety
/// As `nasp_mesh_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_mesh_new_from_env(
    overrides: *const c_char,
    len: usize,
    out: *mut NaspMesh,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantee on `overrides` and `len`.
        let text = unsafe { args::text(overrides, len, "overrides") }?;
        let settings = Config::parse(text)
            .and_then(Config::into_env_settings)
            .map_err(|e| FfiError::new(NaspStatus::Config, e))?;
        let id = create(settings)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspMesh { id }) };
        Ok(())
    })
}

/// This workload's SPIFFE id (`spiffe://cluster.local/ns/demo/sa/web`).
///
/// # Ownership
/// `*out` is a view borrowed from `m`, valid until `nasp_mesh_free(m)`;
/// never freed by the caller.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_mesh_id(m: NaspMesh, out: *mut NaspStr) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let state = registry::mesh(m.id)?;
        // SAFETY: checked non-NULL. The view points into the state, which
        // the registry keeps until nasp_mesh_free.
        unsafe { out.write(NaspStr::of(&state.id)) };
        Ok(())
    })
}

/// Whether the mesh is usable now: a valid certificate, and xDS
/// acknowledged.
///
/// # Ownership
/// Nothing to free.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`, `CLOSED`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_mesh_is_ready(m: NaspMesh, out: *mut bool) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let state = registry::mesh(m.id)?;
        if *state.closed.borrow() {
            return Err(closed());
        }
        let ready = state.mesh().is_ready();
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(ready) };
        Ok(())
    })
}

/// A snapshot of the mesh's metrics in Prometheus text format (what its
/// Prometheus endpoint would serve: `istio_requests_total`…), whether or
/// not that endpoint is on.
///
/// # Ownership
/// On `OK`, `*out` is a new buffer the caller frees with `nasp_buf_free`;
/// it stays valid after the mesh is freed.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_mesh_metrics(m: NaspMesh, out: *mut NaspBuf) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let state = registry::mesh(m.id)?;
        let text = state.mesh().metrics().prometheus_text();
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(new_buf(text.into_bytes())) };
        Ok(())
    })
}

/// Stops the mesh: new calls on it and its child handles return `CLOSED`,
/// calls blocked on it wake with `CLOSED`, its listeners stop accepting,
/// and its servers drain for at most `timeout_ms` (0: the configured drain
/// timeout plus one second).
/// Idempotent: a second call returns `OK`. The handle stays valid (for
/// `nasp_mesh_id` and `nasp_mesh_free`) until freed.
///
/// # Ownership
/// Frees nothing; `nasp_mesh_free` is still needed.
///
/// # Errors
/// `INVALID_HANDLE`, `TIMEOUT` (the drain was cut short; the mesh is
/// closed anyway), `WRONG_THREAD`.
#[unsafe(no_mangle)]
pub extern "C" fn nasp_mesh_shutdown(m: NaspMesh, timeout_ms: u32) -> NaspStatus {
    ffi_call(|| {
        let state = registry::mesh(m.id)?;
        state.shutdown(args::timeout(
            timeout_ms,
            state.drain + Duration::from_secs(1),
        ))
    })
}

/// Shuts the mesh down if that was not done, invalidates every handle of
/// it (responses, requests, connections, listeners: their later free or
/// close returns `INVALID_HANDLE`, which is harmless; calls blocked on
/// them return `CLOSED`), then drops the mesh and its runtime, joining the
/// runtime's threads.
///
/// # Ownership
/// `m`, its id view and its child handles (with their views) are invalid
/// afterwards; buffers (`NaspBuf`) stay valid until their own free.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already freed: a double free is
/// reported, not undefined), `WRONG_THREAD` (nothing was freed).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_mesh_free(m: NaspMesh) -> NaspStatus {
    ffi_call(|| {
        // Checked before anything is removed, so that a refused free
        // leaves the handle usable.
        wrong_thread()?;
        let Object::Mesh(state) = registry::remove(m.id, Kind::Mesh)? else {
            unreachable!("invariant: registry::remove checked the kind")
        };
        drop(registry::remove_children(m.id));
        // A drain cut short is not the caller's error here: freeing
        // proceeds either way.
        let _ = state.shutdown(state.drain + Duration::from_secs(1));
        // The last clone drops the runtime (here, unless another thread is
        // still inside a call, which then returns CLOSED and drops it).
        drop(state);
        Ok(())
    })
}
