//! Streaming uploads: `nasp_http_start` sends a request head through the
//! mesh and returns a `NaspRequest` whose body the caller writes in
//! chunks (`nasp_request_write`, with backpressure), then
//! `nasp_request_finish` ends the body and waits for the response head.
//!
//! Invariants: the exchange runs as a task of the mesh's runtime that owns
//! the request and the body's receiving end, never the request's state;
//! the state aborts that task when it is dropped, so freeing an unfinished
//! request resets its stream instead of sending a truncated body as if it
//! were whole; a declared `content_length` is enforced on both sides of
//! the boundary (a write past it and a finish short of it are refused
//! with a message, before hyper would fail the stream).

use std::ffi::c_char;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use nasp::MeshHttpClientExt as _;
use nasp::transport::Body;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::args;
use crate::http::{NaspHeader, NaspResponse, invalid, register_response, request_head, send_error};
use crate::mesh::NaspMesh;
use crate::registry::{self, Closer, Kind, Object};
use crate::status::{FfiError, NaspStatus, Result, ffi_call};

/// A handle to a request whose body is being written; `id == 0` is "no
/// handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspRequest {
    /// The registry id.
    pub id: u64,
}

/// Chunks in flight between `nasp_request_write` and the connection: a
/// write waits while this many are unsent.
const IN_FLIGHT: usize = 4;
/// A write is cut into chunks of at most this size (one HTTP/2 DATA frame
/// or an HTTP/1 chunk each, give or take the transport's own splitting).
const CHUNK: usize = 64 * 1024;

/// The body as the transport sees it: chunks from the channel, the end
/// when the sending side is dropped by `nasp_request_finish`.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    len: Option<u64>,
    /// Set by `nasp_request_finish` before it drops the sender: a channel
    /// that closes without it is an abort, never the body's end.
    finished: Arc<AtomicBool>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|c| match c {
            Some(b) => Some(Ok(Frame::data(b))),
            None if self.finished.load(Ordering::Acquire) => None,
            // The stream is reset (HTTP/2) or the connection closed
            // (HTTP/1) without the body's end: the server never takes a
            // truncated body for a whole one.
            None => Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the request was freed before nasp_request_finish",
            ))),
        })
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

struct Upload {
    /// `None` once finished.
    tx: Option<mpsc::Sender<Bytes>>,
    written: u64,
    /// A write cut short (timeout, close) after some of its bytes went:
    /// the body is no longer what the caller wrote, so the request can
    /// only be reset.
    broken: bool,
}

/// What a request handle owns.
pub(crate) struct RequestState {
    upload: tokio::sync::Mutex<Upload>,
    exchange: std::sync::Mutex<Option<JoinHandle<Result<http::Response<Body>>>>>,
    abort: tokio::task::AbortHandle,
    declared: Option<u64>,
    finished: Arc<AtomicBool>,
    pub(crate) closer: Closer,
}

impl Drop for RequestState {
    fn drop(&mut self) {
        // Unfinished: the stream is reset, never ended as if whole.
        self.abort.abort();
    }
}

/// Starts a request whose body is written in chunks: sends the head
/// through the mesh's client (routes, balancing, mTLS, outbound filters)
/// and returns at once. `content_length >= 0` declares the body's length
/// (sent as `content-length`); a negative one streams it (HTTP/1.1
/// chunked, HTTP/2 frames). `timeout_ms` (0: the call timeout) bounds the
/// whole exchange, from this call until the response head.
///
/// Under a retry policy, a body of known length up to 64 KiB is buffered
/// whole before the head goes (the server sees nothing until
/// `nasp_request_finish`) and may be retried or mirrored as Istio's policy
/// says; a longer or unknown one is sent as it is written, and retried
/// only if it ended within that 64 KiB.
///
/// # Ownership
/// Every input is borrowed for the call (copied). On `OK`, `*out` is a new
/// request the caller ends with `nasp_request_finish` (which consumes it)
/// or aborts with `nasp_request_free`.
///
/// # Errors
/// As `nasp_http_request`'s argument errors: `INVALID_ARGUMENT`,
/// `INVALID_HANDLE`, `CLOSED`. Failures of the exchange itself come from
/// `nasp_request_write` or `nasp_request_finish`.
///
/// # Safety
/// As `nasp_http_request`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments, reason = "the C signature of the design")]
pub unsafe extern "C" fn nasp_http_start(
    m: NaspMesh,
    method: *const c_char,
    url: *const c_char,
    headers: *const NaspHeader,
    n_headers: usize,
    content_length: i64,
    timeout_ms: u32,
    out: *mut NaspRequest,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantees on each pointer.
        let head = unsafe { request_head(method, url, headers, n_headers) }?;
        let declared = u64::try_from(content_length).ok();
        let mesh = registry::mesh(m.id)?;
        if mesh.is_closed() {
            return Err(FfiError::new(NaspStatus::Closed, "the mesh was shut down"));
        }
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let finished = Arc::new(AtomicBool::new(false));
        let req = head.map(|()| {
            Body::new(ChannelBody {
                rx,
                len: declared,
                finished: finished.clone(),
            })
        });
        let url = req.uri().to_string();
        let client = mesh.mesh().http_client();
        let exchange = mesh.spawn(async move {
            match tokio::time::timeout(timeout, client.send(req)).await {
                Ok(r) => r.map_err(|e| send_error(&url, e.as_ref())),
                Err(_) => Err(FfiError::new(
                    NaspStatus::Timeout,
                    format!("request to {url}: no response within {timeout:?}"),
                )),
            }
        });
        let state = RequestState {
            upload: tokio::sync::Mutex::new(Upload {
                tx: Some(tx),
                written: 0,
                broken: false,
            }),
            abort: exchange.abort_handle(),
            exchange: std::sync::Mutex::new(Some(exchange)),
            declared,
            finished,
            closer: Closer::new(),
        };
        let id = registry::insert_child(Kind::Request, Object::Request(Arc::new(state)), m.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspRequest { id }) };
        Ok(())
    })
}

/// Sends `len` bytes of the body (all of them, or an error), waiting at
/// most `timeout_ms` (0: the call timeout) while the connection is slow to
/// take them (backpressure: at most 4 chunks of 64 KiB wait inside).
///
/// # Ownership
/// `buf` is borrowed for the call (copied).
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `buf` with `len > 0`, more bytes than the
/// declared `content_length`), `INVALID_HANDLE` (also after `finish`),
/// `CLOSED` (freed by another thread, or the mesh shut down), `TIMEOUT`,
/// `IO` (the exchange ended early: `nasp_request_finish` gives the
/// response or the error; or an earlier write was cut short). A write cut
/// short by `TIMEOUT` or `CLOSED` may have sent part of `buf`; the request
/// is then broken: later writes and `finish` return `IO`, and only
/// `nasp_request_free` (which resets the stream) is left.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_request_write(
    r: NaspRequest,
    buf: *const u8,
    len: usize,
    timeout_ms: u32,
) -> NaspStatus {
    ffi_call(|| {
        // SAFETY: the caller's guarantee on `buf` and `len`; copied before
        // any await.
        let data = Bytes::copy_from_slice(unsafe { args::bytes(buf, len, "buf") }?);
        let (state, parent) = registry::request(r.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        mesh.run(
            timeout,
            "writing the request body",
            state.closer.guard("request", async {
                let mut up = state.upload.lock().await;
                if up.broken {
                    return Err(broken());
                }
                let after = up.written + data.len() as u64;
                if let Some(declared) = state.declared
                    && after > declared
                {
                    return Err(invalid(format!(
                        "{after} bytes written, more than the content_length {declared}"
                    )));
                }
                let tx = up
                    .tx
                    .clone()
                    .ok_or_else(|| invalid("the request was finished".into()))?;
                let mut rest = data;
                // Cleared when every chunk went; left set if this future is
                // dropped half-way (a timeout, a close).
                up.broken = true;
                while !rest.is_empty() {
                    let chunk = rest.split_to(rest.len().min(CHUNK));
                    let n = chunk.len() as u64;
                    tx.send(chunk).await.map_err(|_| {
                        FfiError::new(
                            NaspStatus::Io,
                            "the exchange ended before the body was sent: \
                             nasp_request_finish gives the response or the error",
                        )
                    })?;
                    up.written += n;
                }
                up.broken = false;
                Ok(())
            }),
        )
    })
}

/// Ends the body and waits at most `timeout_ms` (0: the call timeout) for
/// the response head. Consumes `r`: its handle is invalid afterwards, also
/// when this fails.
///
/// # Ownership
/// On `OK`, `*out` is a new response the caller frees with
/// `nasp_response_free`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`, fewer bytes written than the declared
/// `content_length`: the stream is reset), `INVALID_HANDLE`, `CLOSED`,
/// `TIMEOUT`, `CONNECT`, `HTTP` (as `nasp_http_request`), `WRONG_THREAD`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_request_finish(
    r: NaspRequest,
    timeout_ms: u32,
    out: *mut NaspResponse,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (_, parent) = registry::request(r.id)?;
        let mesh = registry::mesh(parent)?;
        let Object::Request(state) = registry::remove(r.id, Kind::Request)? else {
            unreachable!("invariant: registry::remove checked the kind")
        };
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let exchange = state
            .exchange
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let resp = mesh.run(timeout, "waiting for the response", async {
            let mut up = state.upload.lock().await;
            if up.broken {
                return Err(broken());
            }
            if let Some(declared) = state.declared
                && up.written < declared
            {
                return Err(invalid(format!(
                    "finished after {} of the {declared} bytes of content_length \
                     (the stream is reset)",
                    up.written
                )));
            }
            // The end of the body: marked first, so that the channel's
            // close reads as the end and not as an abort.
            state.finished.store(true, Ordering::Release);
            up.tx = None;
            drop(up);
            let Some(exchange) = exchange else {
                return Err(invalid("the request was already finished".into()));
            };
            exchange.await.map_err(|e| {
                FfiError::new(NaspStatus::Internal, format!("the exchange failed: {e}"))
            })?
        })?;
        let id = register_response(resp, parent)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspResponse { id }) };
        Ok(())
    })
}

fn broken() -> FfiError {
    FfiError::new(
        NaspStatus::Io,
        "an earlier write was cut short (timeout or close) after part of it was sent: \
         the request can only be freed (its stream is reset)",
    )
}

/// Aborts a request that was not finished: the stream is reset, the
/// server never sees the body's end. A write blocked in another thread
/// returns `CLOSED`.
///
/// # Ownership
/// `r` is invalid afterwards.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already finished or freed, or freed
/// with its mesh).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_request_free(r: NaspRequest) -> NaspStatus {
    ffi_call(|| {
        drop(registry::remove(r.id, Kind::Request)?);
        Ok(())
    })
}
