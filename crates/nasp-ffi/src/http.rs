//! HTTP through the mesh: one request (method, URL, headers, body) sent
//! with the mesh's client (routing, balancing, mTLS, outbound filters),
//! and the response handle: status, headers in wire order with repeats,
//! the server's verified identity, and the body read in chunks.
//!
//! Invariants: every input is copied before the call returns; an HTTP
//! error status is a response (`OK`), only the absence of one is an error;
//! a response's body is read through its mesh's runtime, so a response of
//! a closed mesh reads `CLOSED` and one of a freed mesh is unknown.

use std::ffi::{CString, c_char};
use std::sync::Arc;

use bytes::{Buf as _, Bytes};
use http_body_util::BodyExt as _;
use nasp::MeshHttpClientExt as _;
use nasp::transport::{Body, Upstream};

use crate::args;
use crate::buf::{NaspBuf, new_buf};
use crate::mesh::NaspMesh;
use crate::registry::{self, Closer, Kind, Object};
use crate::status::{FfiError, NaspStatus, NaspStr, Result, ffi_call};

/// A handle to a response; `id == 0` is "no handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspResponse {
    /// The registry id.
    pub id: u64,
}

/// One request header: `name_len` bytes at `name`, `value_len` at
/// `value` (no NUL needed). A name may repeat.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NaspHeader {
    /// The name (ASCII, any case).
    pub name: *const c_char,
    /// Its length in bytes.
    pub name_len: usize,
    /// The value (visible ASCII or opaque bytes, no CR, LF or NUL).
    pub value: *const c_char,
    /// Its length in bytes.
    pub value_len: usize,
}

/// What a response handle owns.
pub(crate) struct ResponseState {
    status: u16,
    headers: Vec<(CString, CString)>,
    peer_id: CString,
    body: tokio::sync::Mutex<BodyState>,
    pub(crate) closer: Closer,
}

struct BodyState {
    /// `None` once the end was read (or it failed).
    body: Option<Body>,
    /// The rest of a frame larger than the caller's last buffer.
    pending: Bytes,
    /// Why the body can no longer be read whole: its error, or a
    /// `read_all` cut short with what it had read. Every later read
    /// returns it, so a truncated body never ends with `OK`.
    failed: Option<String>,
}

impl BodyState {
    /// The next data bytes (at most `cap`), empty at the end.
    async fn next(&mut self, cap: usize) -> Result<Bytes> {
        if let Some(why) = &self.failed {
            return Err(FfiError::new(NaspStatus::Io, why.clone()));
        }
        self.next_raw(cap).await
    }

    /// As `next`, whatever `failed` says (`read_all` marks the body failed
    /// while it holds bytes it has not returned yet).
    async fn next_raw(&mut self, cap: usize) -> Result<Bytes> {
        while self.pending.is_empty() {
            let Some(body) = self.body.as_mut() else {
                return Ok(Bytes::new());
            };
            match body.frame().await {
                None => {
                    self.body = None;
                }
                Some(Ok(frame)) => {
                    // Trailers are not in v1 (docs/ffi-design.md): skipped.
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    let why = format!("reading the response body: {e}");
                    self.failed = Some(why.clone());
                    return Err(FfiError::new(NaspStatus::Io, why));
                }
            }
        }
        let n = self.pending.len().min(cap);
        Ok(self.pending.split_to(n))
    }
}

fn no_nul(b: &[u8], what: &str) -> Result<CString> {
    CString::new(b).map_err(|_| FfiError::new(NaspStatus::Internal, format!("{what} has a NUL")))
}

pub(crate) fn invalid(msg: String) -> FfiError {
    FfiError::new(NaspStatus::InvalidArgument, msg)
}

/// Why no response came, as a status: no connection is `CONNECT`, the rest
/// `HTTP`.
pub(crate) fn send_error(url: &str, e: &(dyn std::error::Error + 'static)) -> FfiError {
    let mut chain = format!("{e}");
    let mut connect = false;
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            connect |= matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            );
        }
        source = s.source();
    }
    let status = if connect {
        NaspStatus::Connect
    } else {
        NaspStatus::Http
    };
    FfiError::new(status, format!("request to {url}: {chain}"))
}

/// Sends one request through the mesh and waits for the response head
/// (`timeout_ms`, 0: the configured call timeout). The body is then read
/// with `nasp_response_read` or `nasp_response_read_all`.
///
/// `method` is e.g. `"GET"`; `url` is absolute (`http://echo.demo:8080/x`);
/// `headers` is `n_headers` entries (NULL iff `n_headers == 0`), sent in
/// order with repeats; `body` is `body_len` bytes (NULL iff `body_len ==
/// 0`), binary-safe.
///
/// # Ownership
/// Every input is borrowed for the call (copied). On `OK`, `*out` is a new
/// response the caller frees with `nasp_response_free` (before or after
/// reading its body); freeing the mesh invalidates it too.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`, `method` or `url`, a NULL array with a
/// non-zero count, invalid UTF-8, a malformed method, URL or header: the
/// message says which), `INVALID_HANDLE`, `CLOSED`, `TIMEOUT`, `CONNECT`
/// (no connection to any endpoint), `HTTP` (no response for another
/// reason: no route, handshake refused, reset), `WRONG_THREAD`. An HTTP
/// error status (404, 503) is `OK` with that status.
///
/// # Safety
/// `method` and `url` are NULL or NUL-terminated strings; `headers` points
/// to `n_headers` entries whose pointers are valid for their lengths;
/// `body` to `body_len` bytes; `out` is NULL or valid for a write. All
/// only for the duration of the call.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments, reason = "the C signature of the design")]
pub unsafe extern "C" fn nasp_http_request(
    m: NaspMesh,
    method: *const c_char,
    url: *const c_char,
    headers: *const NaspHeader,
    n_headers: usize,
    body: *const u8,
    body_len: usize,
    timeout_ms: u32,
    out: *mut NaspResponse,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        // SAFETY: the caller's guarantees on each pointer.
        let (req, body) = unsafe {
            (
                request_head(method, url, headers, n_headers)?,
                args::bytes(body, body_len, "body")?,
            )
        };
        let req = req.map(|()| Body::from(Bytes::copy_from_slice(body)));
        let url = req.uri().to_string();
        let mesh_state = registry::mesh(m.id)?;
        let timeout = args::timeout(timeout_ms, mesh_state.call_timeout);
        let client = mesh_state.mesh().http_client();
        let resp = mesh_state.run(timeout, &format!("request to {url}"), async {
            client
                .send(req)
                .await
                .map_err(|e| send_error(&url, e.as_ref()))
        })?;
        let id = register_response(resp, m.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(NaspResponse { id }) };
        Ok(())
    })
}

/// A request's method, URL and headers, checked and copied.
///
/// # Safety
/// As `nasp_http_request`'s for these arguments.
pub(crate) unsafe fn request_head(
    method: *const c_char,
    url: *const c_char,
    headers: *const NaspHeader,
    n_headers: usize,
) -> Result<http::Request<()>> {
    // SAFETY: the caller's guarantees on each pointer.
    let (method, url) = unsafe { (args::cstr(method, "method")?, args::cstr(url, "url")?) };
    if n_headers > 0 && headers.is_null() {
        return Err(invalid(format!("headers is NULL with count {n_headers}")));
    }
    let mut req = http::Request::builder()
        .method(
            http::Method::from_bytes(method.as_bytes())
                .map_err(|e| invalid(format!("method {method:?}: {e}")))?,
        )
        .uri(
            url.parse::<http::Uri>()
                .map_err(|e| invalid(format!("url {url:?}: {e}")))?,
        )
        .body(())
        .map_err(|e| invalid(format!("request: {e}")))?;
    for i in 0..n_headers {
        // SAFETY: `headers` is non-NULL (checked) with `n_headers` entries
        // (the caller's guarantee); `i < n_headers`.
        let h = unsafe { *headers.add(i) };
        // SAFETY: the caller's guarantee on each entry's pointers.
        let (name, value) = unsafe {
            (
                args::bytes(h.name.cast(), h.name_len, &format!("headers[{i}].name"))?,
                args::bytes(h.value.cast(), h.value_len, &format!("headers[{i}].value"))?,
            )
        };
        let name = http::HeaderName::from_bytes(name).map_err(|e| {
            invalid(format!(
                "headers[{i}].name {:?}: {e}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let value = http::HeaderValue::from_bytes(value)
            .map_err(|e| invalid(format!("headers[{i}].value of {name}: {e}")))?;
        req.headers_mut().append(name, value);
    }
    Ok(req)
}

/// Registers `resp` as a response of mesh `parent`; its id.
pub(crate) fn register_response(resp: http::Response<Body>, parent: u64) -> Result<u64> {
    let peer_id = resp
        .extensions()
        .get::<Upstream>()
        .and_then(|u| u.peer_id.as_deref())
        .unwrap_or("");
    let state = ResponseState {
        status: resp.status().as_u16(),
        peer_id: no_nul(peer_id.as_bytes(), "the peer id")?,
        headers: resp
            .headers()
            .iter()
            .map(|(n, v)| {
                Ok((
                    no_nul(n.as_str().as_bytes(), "a header name")?,
                    no_nul(v.as_bytes(), "a header value")?,
                ))
            })
            .collect::<Result<_>>()?,
        body: tokio::sync::Mutex::new(BodyState {
            body: Some(resp.into_body()),
            pending: Bytes::new(),
            failed: None,
        }),
        closer: Closer::new(),
    };
    registry::insert_child(Kind::Response, Object::Response(Arc::new(state)), parent)
}

/// The HTTP status code.
///
/// # Ownership
/// Nothing to free.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_status(r: NaspResponse, out: *mut u16) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::response(r.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(state.status) };
        Ok(())
    })
}

/// How many response headers there are (repeats counted).
///
/// # Ownership
/// Nothing to free.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_header_count(
    r: NaspResponse,
    out: *mut usize,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::response(r.id)?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(state.headers.len()) };
        Ok(())
    })
}

/// The `i`-th response header (in wire order; names lower-case).
///
/// # Ownership
/// `*name` and `*value` are views borrowed from `r`, valid until
/// `nasp_response_free(r)` (or the mesh's free); never freed by the caller.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `name` or `value`, `i` out of range),
/// `INVALID_HANDLE`.
///
/// # Safety
/// `name` and `value` are NULL or valid for a write each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_header_at(
    r: NaspResponse,
    i: usize,
    name: *mut NaspStr,
    value: *mut NaspStr,
) -> NaspStatus {
    ffi_call(|| {
        let (name, value) = (args::out(name, "name")?, args::out(value, "value")?);
        let (state, _) = registry::response(r.id)?;
        let (n, v) = state.headers.get(i).ok_or_else(|| {
            invalid(format!(
                "header index {i} out of range (count {})",
                state.headers.len()
            ))
        })?;
        // SAFETY: checked non-NULL; the views point into the state, which
        // the registry keeps until the response is freed.
        unsafe {
            name.write(NaspStr::of(n));
            value.write(NaspStr::of(v));
        }
        Ok(())
    })
}

/// The server's verified SPIFFE id (mTLS), or an empty view when the hop
/// was plaintext.
///
/// # Ownership
/// `*out` is a view borrowed from `r`, valid until `nasp_response_free(r)`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_peer_id(r: NaspResponse, out: *mut NaspStr) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, _) = registry::response(r.id)?;
        // SAFETY: checked non-NULL; the view points into the state.
        unsafe { out.write(NaspStr::of(&state.peer_id)) };
        Ok(())
    })
}

/// Copies up to `cap` body bytes into `buf` and sets `*n` to how many;
/// `*n == 0` with `OK` is the end of the body. Waits for data at most
/// `timeout_ms` (0: the call timeout). A frame larger than `cap` is kept
/// for the next call.
///
/// # Ownership
/// `buf` is the caller's, written for the call only.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `buf` or `n`, `cap == 0`), `INVALID_HANDLE`
/// (also when its mesh was freed), `CLOSED`, `TIMEOUT`, `IO`,
/// `WRONG_THREAD`.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `n` is NULL or valid
/// for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_read(
    r: NaspResponse,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    timeout_ms: u32,
) -> NaspStatus {
    ffi_call(|| {
        let n = args::out(n, "n")?;
        if buf.is_null() || cap == 0 {
            return Err(invalid(format!("buf is NULL or cap is 0 (cap {cap})")));
        }
        let (state, parent) = registry::response(r.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let chunk = mesh.run(
            timeout,
            "reading the response body",
            state.closer.guard("response", async {
                state.body.lock().await.next(cap).await
            }),
        )?;
        // SAFETY: `buf` is non-NULL with `cap` writable bytes (the caller's
        // guarantee) and `chunk.len() <= cap`; our bytes do not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf, chunk.len());
            n.write(chunk.len());
        }
        Ok(())
    })
}

/// The rest of the body, at most `max` bytes, as one buffer (waiting at
/// most `timeout_ms` in all, 0: the call timeout).
///
/// # Ownership
/// On `OK`, `*out` is a new buffer the caller frees with `nasp_buf_free`.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `out`), `INVALID_HANDLE`, `CLOSED`, `TIMEOUT`,
/// `IO` (also "body larger than max"; what was read is lost, and every
/// later read of the body returns `IO` too, as after a `TIMEOUT` that cut
/// it short), `WRONG_THREAD`.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_response_read_all(
    r: NaspResponse,
    max: usize,
    timeout_ms: u32,
    out: *mut NaspBuf,
) -> NaspStatus {
    ffi_call(|| {
        let out = args::out(out, "out")?;
        let (state, parent) = registry::response(r.id)?;
        let mesh = registry::mesh(parent)?;
        let timeout = args::timeout(timeout_ms, mesh.call_timeout);
        let all = mesh.run(
            timeout,
            "reading the response body",
            state.closer.guard("response", async {
                let mut body = state.body.lock().await;
                if let Some(why) = &body.failed {
                    return Err(FfiError::new(NaspStatus::Io, why.clone()));
                }
                let mut all = Vec::new();
                loop {
                    let mut chunk = body.next_raw(usize::MAX).await?;
                    if chunk.is_empty() {
                        body.failed = None;
                        return Ok(all);
                    }
                    // Bytes are now out of the body: if this call ends without
                    // returning them (too large, a timeout, a close), every
                    // later read says so instead of going on mid-body.
                    body.failed = Some(
                        "an earlier nasp_response_read_all ended early with part of the body"
                            .into(),
                    );
                    if all.len() + chunk.len() > max {
                        return Err(FfiError::new(
                            NaspStatus::Io,
                            format!("the body is larger than max ({max} bytes)"),
                        ));
                    }
                    while chunk.has_remaining() {
                        let c = chunk.chunk();
                        all.extend_from_slice(c);
                        let l = c.len();
                        chunk.advance(l);
                    }
                }
            }),
        )?;
        // SAFETY: checked non-NULL; valid per the caller's guarantee.
        unsafe { out.write(new_buf(all)) };
        Ok(())
    })
}

/// Frees a response; an unread body is discarded.
///
/// # Ownership
/// `r` and its views are invalid afterwards.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already freed, or freed with its mesh:
/// a double free is reported, not undefined).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_response_free(r: NaspResponse) -> NaspStatus {
    ffi_call(|| {
        let object = registry::remove(r.id, Kind::Response)?;
        // The body is dropped inside its runtime when the mesh is still
        // there (a hyper body may wake tasks of it on drop); without one,
        // dropping it outside any runtime is fine too.
        drop(object);
        Ok(())
    })
}
