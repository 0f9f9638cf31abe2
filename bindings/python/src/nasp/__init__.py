"""nasp: an Istio sidecar as a library, from Python.

Join a service mesh (workload certificate from the mesh's CA, routes and
endpoints from its xDS server, Istio's telemetry filters) and talk mTLS
HTTP and TCP through it, over nasp's C ABI with ctypes::

    import nasp

    with nasp.Mesh.from_config(open("config.yaml").read()) as mesh:
        with mesh.request("GET", "http://echo.demo:18080/hello") as resp:
            print(resp.status, resp.peer_id, resp.read_all())
        with mesh.connect("echo.demo:19000") as conn:
            conn.sendall(b"ping")
            conn.shutdown_write()
            print(conn.recv(4))

Every object owns one library handle and frees it in ``close()`` (which is
idempotent), on leaving a ``with`` block, or, as a safety net, when it is
garbage-collected. A child (response, upload, connection, listener) keeps
its mesh alive; closing the mesh invalidates its children, and using one
afterwards raises :class:`Closed`.

Blocking calls release the GIL (ctypes does so around every foreign call),
so several Python threads may wait in ``accept``, ``recv`` or ``read`` at
once. Timeouts are in seconds (``float``); ``None`` is the mesh's
configured ``call_timeout_ms`` (default 30 s).

Errors are :class:`NaspError` subclasses, one per status code of the C
ABI, with the library's message; see ``docs/python.md``.
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
import weakref
from ctypes import byref, c_bool, c_char_p, c_size_t, c_uint8, c_uint16
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from . import _ffi
from ._ffi import (
    ABI_VERSION,
    LIBRARY,
    NaspBuf,
    NaspConn,
    NaspHeader,
    NaspListener,
    NaspMesh,
    NaspRequest,
    NaspResponse,
    NaspStr,
    lib,
)

__all__ = [
    "ABI_VERSION",
    "LIBRARY",
    "Mesh",
    "Response",
    "Request",
    "Connection",
    "Listener",
    "NaspError",
    "InvalidArgument",
    "InvalidHandle",
    "ConfigError",
    "NotReady",
    "Closed",
    "Timeout",
    "ConnectError",
    "HttpError",
    "IoError",
    "WrongThread",
    "InternalPanic",
    "InternalError",
    "library_version",
]

#: Bytes a ``read``/``recv`` asks for when not told, and the chunk size
#: iterating a response yields at most.
DEFAULT_CHUNK = 64 * 1024
#: ``Response.read_all``'s default limit.
DEFAULT_MAX_BODY = 64 * 1024 * 1024

Bytes = Union[bytes, bytearray, memoryview]
Text = Union[str, bytes]
Headers = Union[Mapping[Text, Text], Iterable[Tuple[Text, Text]]]


# --- Exceptions -------------------------------------------------------------


class NaspError(Exception):
    """A call into the library failed.

    ``status`` is the ``NaspStatus`` code (``nasp._ffi.CLOSED``...);
    ``message`` is the library's message for it, read with
    ``nasp_last_error`` right after the failed call on the same thread.
    """

    #: The status this class stands for (``None`` on the base class).
    STATUS: Optional[int] = None

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def status_name(self) -> str:
        """The status's name in the header (``"CLOSED"``), or its number."""
        return _ffi.STATUS_NAMES.get(self.status, str(self.status))

    def __str__(self) -> str:
        return f"{self.message} ({self.status_name})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_name}, {self.message!r})"


class InvalidArgument(NaspError, ValueError):
    """``INVALID_ARGUMENT``: a malformed method, URL, header or address,
    invalid UTF-8, an index out of range."""

    STATUS = _ffi.INVALID_ARGUMENT


class InvalidHandle(NaspError):
    """``INVALID_HANDLE``: the handle is unknown or was freed (this wrapper
    normally raises :class:`Closed` before that can happen)."""

    STATUS = _ffi.INVALID_HANDLE


class ConfigError(NaspError, ValueError):
    """``CONFIG``: the configuration was rejected; the message names the
    field."""

    STATUS = _ffi.CONFIG


class NotReady(NaspError):
    """``NOT_READY``: no certificate or first xDS snapshot in
    ``ready_timeout_ms``."""

    STATUS = _ffi.NOT_READY


class Closed(NaspError):
    """``CLOSED``: the mesh was shut down, or the object (or its mesh) was
    closed on the Python side."""

    STATUS = _ffi.CLOSED


class Timeout(NaspError, TimeoutError):
    """``TIMEOUT``: the call's timeout passed."""

    STATUS = _ffi.TIMEOUT


class ConnectError(NaspError, ConnectionError):
    """``CONNECT``: no connection to the destination."""

    STATUS = _ffi.CONNECT


class HttpError(NaspError):
    """``HTTP``: the request failed without a response (no route, the
    handshake refused, a reset). An HTTP error status is not an error."""

    STATUS = _ffi.HTTP


class IoError(NaspError, OSError):
    """``IO``: reading or writing a body or stream failed, or a body was
    larger than allowed."""

    STATUS = _ffi.IO


class WrongThread(NaspError):
    """``WRONG_THREAD``: called from a thread inside a tokio runtime."""

    STATUS = _ffi.WRONG_THREAD


class InternalPanic(NaspError):
    """``PANIC``: a bug inside the library, caught at the boundary."""

    STATUS = _ffi.PANIC


class InternalError(NaspError):
    """``INTERNAL``: any other failure inside the library."""

    STATUS = _ffi.INTERNAL


_ffi.register_exceptions(
    {
        cls.STATUS: cls
        for cls in (
            InvalidArgument,
            InvalidHandle,
            ConfigError,
            NotReady,
            Closed,
            Timeout,
            ConnectError,
            HttpError,
            IoError,
            WrongThread,
            InternalPanic,
            InternalError,
        )
        if cls.STATUS is not None
    },
    NaspError,
)


def library_version() -> str:
    """The loaded library's version and runtimes, e.g.
    ``"0.1.0 wasmtime,wasmi,wasm3"``."""
    return _ffi.version()


# --- Argument conversion ----------------------------------------------------

_U8P = ctypes.POINTER(c_uint8)
_UINT32_MAX = 2**32 - 1


def _ms(timeout: Optional[float]) -> int:
    """Seconds to the ABI's milliseconds: ``None`` is 0 (the library's
    default), anything else must be positive and is rounded up, so a tiny
    timeout never turns into "the default"."""
    if timeout is None:
        return 0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be seconds (a number) or None, not {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")
    ms = math.ceil(timeout * 1000)
    if ms > _UINT32_MAX:
        raise ValueError(f"timeout {timeout!r} s is longer than {_UINT32_MAX} ms")
    return ms


def _cstr(value: Text, what: str) -> bytes:
    """A ``const char *`` argument: UTF-8, no NUL inside."""
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")
    if b"\0" in raw:
        raise InvalidArgument(_ffi.INVALID_ARGUMENT, f"{what} contains a NUL byte")
    return raw


def _raw(value: Text, what: str) -> bytes:
    """A header name or value: UTF-8 for text, bytes as they are."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def _in_bytes(data: Union[Bytes, str], what: str) -> Tuple[Any, int, Any]:
    """A ``const uint8_t *`` + length argument and the object that keeps
    the memory alive for the call. ``bytes`` and writable buffers are
    passed without a copy; ``str`` is UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, bytes):
        if not data:
            return None, 0, None
        return ctypes.cast(c_char_p(data), _U8P), len(data), data
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(
            f"{what} must be bytes-like or str, not {type(data).__name__}"
        ) from None
    if view.nbytes == 0:
        return None, 0, None
    if view.readonly:
        copy = view.tobytes()
        return ctypes.cast(c_char_p(copy), _U8P), len(copy), copy
    arr = (c_uint8 * view.nbytes).from_buffer(view)
    return arr, view.nbytes, (arr, view)


def _headers(headers: Headers) -> Tuple[Any, int, Any]:
    """A ``const NaspHeader *`` + count argument (NULL for none), in the
    given order with repeats, and what keeps its bytes alive."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs = [(_raw(n, "header name"), _raw(v, "header value")) for n, v in items]
    if not pairs:
        return None, 0, None
    arr = (NaspHeader * len(pairs))()
    for h, (name, value) in zip(arr, pairs):
        h.name, h.name_len, h.value, h.value_len = name, len(name), value, len(value)
    return arr, len(pairs), (arr, pairs)


def _check(status: int, what: str) -> None:
    _ffi.check(status, what)


# --- Ownership --------------------------------------------------------------


def _free(free_fn: Callable[[Any], int], handle_type: Type[Any], handle_id: int) -> None:
    """A finalizer: frees one handle, ignoring the status (a handle freed
    with its mesh answers ``INVALID_HANDLE``, which is harmless). Holds
    nothing of the Python object, so it can run when that object is gone."""
    free_fn(handle_type(handle_id))


class _Owned:
    """One library handle: its id (0 once freed), a finalizer that frees
    it exactly once (``close()``, ``with``, or garbage collection), and for
    a child the mesh it came from, kept alive by the reference."""

    _KIND = "object"
    _HANDLE: Type[Any] = NaspMesh
    _FREE = "nasp_mesh_free"

    def __init__(self, handle_id: int, mesh: Optional["Mesh"]) -> None:
        self._handle_id = handle_id
        self._mesh = mesh
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(
            self, _free, getattr(lib, self._FREE), self._HANDLE, handle_id
        )

    def _h(self) -> Any:
        """The handle for a call; :class:`Closed` when this object or its
        mesh was closed on the Python side."""
        handle_id = self._handle_id
        if handle_id == 0:
            raise Closed(_ffi.CLOSED, f"the {self._KIND} is closed")
        if self._mesh is not None and self._mesh._handle_id == 0:
            raise Closed(_ffi.CLOSED, f"the {self._KIND}'s mesh is closed")
        return self._HANDLE(handle_id)

    def _forget(self) -> None:
        """The handle is gone without a free (consumed by the library)."""
        with self._lock:
            self._handle_id = 0
            self._finalizer.detach()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` ran (or the handle was consumed)."""
        return self._handle_id == 0

    def close(self) -> None:
        """Frees the handle. Idempotent: a second call does nothing. A
        child whose mesh was closed first has nothing left to free."""
        with self._lock:
            if self._handle_id == 0:
                return
            self._handle_id = 0
            self._finalizer()

    def __enter__(self: "_T") -> "_T":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle_id == 0 else f"id={self._handle_id:#x}"
        return f"<nasp.{type(self).__name__} {state}>"


_T = TypeVar("_T", bound=_Owned)


# --- Mesh -------------------------------------------------------------------


class Mesh(_Owned):
    """A workload joined to the mesh: its identity, its xDS view, its
    filters and its runtime (threads of its own, joined by ``close()``).

    Create one with :meth:`from_config` or :meth:`from_env`; both block
    until the mesh is ready (a certificate and a first xDS snapshot).
    """

    _KIND = "mesh"
    _HANDLE = NaspMesh
    _FREE = "nasp_mesh_free"

    def __init__(self, handle: NaspMesh) -> None:
        super().__init__(handle.id, None)
        view = NaspStr()
        _check(lib.nasp_mesh_id(handle, byref(view)), "nasp_mesh_id")
        self._id_text = view.to_str()

    @classmethod
    def from_config(cls, config: Union[str, bytes, Mapping[str, Any]]) -> "Mesh":
        """Joins the mesh described by ``config``: YAML or JSON text (the
        schema of ``docs/ffi-design.md`` section 3.4), or a ``dict``
        (sent as JSON). Raises :class:`ConfigError` naming a bad or
        unknown field, :class:`NotReady` when the control plane did not
        answer in ``ready_timeout_ms``."""
        if isinstance(config, Mapping):
            raw = json.dumps(config).encode("utf-8")
        elif isinstance(config, str):
            raw = config.encode("utf-8")
        elif isinstance(config, (bytes, bytearray)):
            raw = bytes(config)
        else:
            raise TypeError(f"config must be text or a dict, not {type(config).__name__}")
        out = NaspMesh()
        _check(lib.nasp_mesh_new(raw, len(raw), byref(out)), "nasp_mesh_new")
        return cls(out)

    @classmethod
    def from_env(cls, **overrides: Any) -> "Mesh":
        """Joins the mesh the environment describes (Istio's VM variables:
        ``DISCOVERY_ADDRESS``, ``CA_ADDR``, ``ROOT_CERT``, ``ISTIO_TOKEN``,
        ``POD_NAMESPACE``, ``SERVICE_ACCOUNT``...), with ``overrides``
        (fields of the config schema, e.g. ``runtime="wasmi"``) on top."""
        out = NaspMesh()
        if overrides:
            raw: Optional[bytes] = json.dumps(overrides).encode("utf-8")
            n = len(raw)
        else:
            raw, n = None, 0
        _check(lib.nasp_mesh_new_from_env(raw, n, byref(out)), "nasp_mesh_new_from_env")
        return cls(out)

    @property
    def id(self) -> str:
        """This workload's SPIFFE id (``spiffe://cluster.local/ns/demo/sa/web``)."""
        return self._id_text

    @property
    def is_ready(self) -> bool:
        """Whether the mesh is usable now (a valid certificate, xDS
        acknowledged); :class:`Closed` after ``shutdown()``."""
        out = c_bool()
        _check(lib.nasp_mesh_is_ready(self._h(), byref(out)), "nasp_mesh_is_ready")
        return bool(out.value)

    def request(
        self,
        method: str,
        url: str,
        headers: Headers = (),
        body: Union[Bytes, str] = b"",
        timeout: Optional[float] = None,
    ) -> "Response":
        """Sends one request through the mesh (routes, balancing, mTLS,
        filters) and returns once the response head arrived; read the body
        from the :class:`Response`. ``url`` names a mesh service
        (``http://echo.demo:18080/x``); ``headers`` are pairs (or a
        mapping) sent in order with repeats; ``body`` is binary-safe.

        An HTTP error status is a response, not an exception; no response
        at all is :class:`ConnectError`, :class:`HttpError` or
        :class:`Timeout`."""
        m = _cstr(method, "method")
        u = _cstr(url, "url")
        harr, hn, _keep_h = _headers(headers)
        bptr, blen, _keep_b = _in_bytes(body, "body")
        out = NaspResponse()
        _check(
            lib.nasp_http_request(
                self._h(), m, u, harr, hn, bptr, blen, _ms(timeout), byref(out)
            ),
            "nasp_http_request",
        )
        return Response(out, self)

    def start_request(
        self,
        method: str,
        url: str,
        headers: Headers = (),
        content_length: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> "Request":
        """Starts a request whose body is written in chunks
        (:meth:`Request.write`, then :meth:`Request.finish` for the
        response). ``content_length`` ``None`` sends the body chunked
        (HTTP/2 frames); such a body is never retried. ``timeout`` bounds
        getting the stream open."""
        m = _cstr(method, "method")
        u = _cstr(url, "url")
        harr, hn, _keep = _headers(headers)
        if content_length is None:
            length = -1
        elif isinstance(content_length, int) and content_length >= 0:
            length = content_length
        else:
            raise ValueError(
                f"content_length must be a non-negative int or None, not {content_length!r}"
            )
        out = NaspRequest()
        _check(
            lib.nasp_http_start(self._h(), m, u, harr, hn, length, _ms(timeout), byref(out)),
            "nasp_http_start",
        )
        return Request(out, self)

    def connect(self, target: str, timeout: Optional[float] = None) -> "Connection":
        """Opens a TCP connection through the mesh to ``target``
        (``"db.demo:5432"``): mTLS with Istio's TCP ALPN, outbound TCP
        filters."""
        t = _cstr(target, "target")
        out = NaspConn()
        _check(lib.nasp_tcp_connect(self._h(), t, _ms(timeout), byref(out)), "nasp_tcp_connect")
        return Connection(out, self)

    def listen(self, addr: str) -> "Listener":
        """Listens on ``addr`` (``"127.0.0.1:0"`` picks a port) as this
        workload: connections are accepted after the mesh's handshake
        (mTLS or not, as xDS or ``inbound_mode`` says) and inbound TCP
        filters."""
        a = _cstr(addr, "addr")
        out = NaspListener()
        _check(lib.nasp_listen(self._h(), a, byref(out)), "nasp_listen")
        return Listener(out, self)

    def metrics_text(self) -> str:
        """The mesh's metrics in Prometheus text format
        (``istio_requests_total``...), whether or not a Prometheus endpoint
        is on."""
        buf = NaspBuf()
        _check(lib.nasp_mesh_metrics(self._h(), byref(buf)), "nasp_mesh_metrics")
        try:
            return _buf_bytes(buf).decode("utf-8", "replace")
        finally:
            lib.nasp_buf_free(buf)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stops the mesh: later calls on it and its children raise
        :class:`Closed`, calls blocked in other threads wake with it, and
        servers drain for at most ``timeout`` (``None``: the configured
        drain timeout plus one second). Idempotent. ``close()`` is still
        needed to free it (and ``close()`` shuts down if this was not
        done)."""
        _check(lib.nasp_mesh_shutdown(self._h(), _ms(timeout)), "nasp_mesh_shutdown")

    def __repr__(self) -> str:
        state = "closed" if self._handle_id == 0 else self._id_text
        return f"<nasp.Mesh {state}>"


def _buf_bytes(buf: NaspBuf) -> bytes:
    ptr = _U8P()
    n = c_size_t()
    _check(lib.nasp_buf_data(buf, byref(ptr), byref(n)), "nasp_buf_data")
    return ctypes.string_at(ptr, n.value) if n.value else b""


# --- HTTP -------------------------------------------------------------------


class Response(_Owned):
    """A response whose head arrived: ``status``, ``headers`` (in wire
    order, repeats kept, names lower-case), ``peer_id`` (the server's
    verified SPIFFE id, ``""`` over plaintext); the body is read with
    :meth:`read`, :meth:`read_all` or by iterating (chunks of bytes).
    ``close()`` discards an unread body."""

    _KIND = "response"
    _HANDLE = NaspResponse
    _FREE = "nasp_response_free"

    def __init__(self, handle: NaspResponse, mesh: Mesh) -> None:
        super().__init__(handle.id, mesh)
        status = c_uint16()
        _check(lib.nasp_response_status(handle, byref(status)), "nasp_response_status")
        count = c_size_t()
        _check(
            lib.nasp_response_header_count(handle, byref(count)), "nasp_response_header_count"
        )
        headers: List[Tuple[str, str]] = []
        name, value = NaspStr(), NaspStr()
        for i in range(count.value):
            _check(
                lib.nasp_response_header_at(handle, i, byref(name), byref(value)),
                "nasp_response_header_at",
            )
            headers.append((name.to_str(), value.to_str()))
        peer = NaspStr()
        _check(lib.nasp_response_peer_id(handle, byref(peer)), "nasp_response_peer_id")
        self.status: int = status.value
        self.headers: List[Tuple[str, str]] = headers
        self.peer_id: str = peer.to_str()

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (any case), or ``None``."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)

    def header_values(self, name: str) -> List[str]:
        """Every value of header ``name`` (any case), in order."""
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def read(self, n: int = -1, timeout: Optional[float] = None) -> bytes:
        """Up to ``n`` body bytes (fewer when less has arrived), ``b""`` at
        the end of the body; ``n < 0`` reads the rest (:meth:`read_all`).
        Waits at most ``timeout`` for data."""
        if n < 0:
            return self.read_all(timeout=timeout)
        if n == 0:
            self._h()
            return b""
        buf = (c_uint8 * n)()
        got = c_size_t()
        _check(
            lib.nasp_response_read(self._h(), buf, n, byref(got), _ms(timeout)),
            "nasp_response_read",
        )
        return ctypes.string_at(buf, got.value)

    def read_all(self, max_bytes: int = DEFAULT_MAX_BODY, timeout: Optional[float] = None) -> bytes:
        """The rest of the body, at most ``max_bytes`` (else :class:`IoError`,
        and what was read is lost), waiting at most ``timeout`` in all."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, not {max_bytes!r}")
        buf = NaspBuf()
        _check(
            lib.nasp_response_read_all(self._h(), max_bytes, _ms(timeout), byref(buf)),
            "nasp_response_read_all",
        )
        try:
            return _buf_bytes(buf)
        finally:
            lib.nasp_buf_free(buf)

    def __iter__(self) -> Iterator[bytes]:
        """The body in chunks of at most ``DEFAULT_CHUNK`` bytes."""
        while True:
            chunk = self.read(DEFAULT_CHUNK)
            if not chunk:
                return
            yield chunk

    def __repr__(self) -> str:
        return f"<nasp.Response {self.status}{' closed' if self.closed else ''}>"


class Request(_Owned):
    """A request whose body is being written: :meth:`write` chunks, then
    :meth:`finish` for the :class:`Response`. ``close()`` before
    ``finish()`` aborts it (the stream is reset)."""

    _KIND = "request"
    _HANDLE = NaspRequest
    _FREE = "nasp_request_free"

    def __init__(self, handle: NaspRequest, mesh: Mesh) -> None:
        super().__init__(handle.id, mesh)

    def write(self, data: Union[Bytes, str], timeout: Optional[float] = None) -> None:
        """Sends all of ``data`` (waiting while the body's channel is full,
        at most ``timeout``)."""
        ptr, n, _keep = _in_bytes(data, "data")
        if n == 0:
            self._h()
            return
        _check(lib.nasp_request_write(self._h(), ptr, n, _ms(timeout)), "nasp_request_write")

    def finish(self, timeout: Optional[float] = None) -> Response:
        """Ends the body and waits for the response head. Consumes the
        request: it is closed afterwards, also when this raises."""
        handle = self._h()
        mesh = self._mesh
        assert mesh is not None, "a request always has its mesh"
        out = NaspResponse()
        status = lib.nasp_request_finish(handle, _ms(timeout), byref(out))
        # The library took the handle whatever the outcome; read the error
        # first, since it is this thread's and nothing may call in between.
        err = None if status == _ffi.OK else _ffi.error(
            status, _ffi.last_error() or "nasp_request_finish failed"
        )
        self._forget()
        if err is not None:
            raise err
        return Response(out, mesh)


# --- TCP --------------------------------------------------------------------


class Connection(_Owned):
    """A TCP connection through the mesh (from :meth:`Mesh.connect` or
    :meth:`Listener.accept`), with socket-like methods. One thread may read
    while another writes."""

    _KIND = "connection"
    _HANDLE = NaspConn
    _FREE = "nasp_conn_close"

    def __init__(self, handle: NaspConn, mesh: Mesh) -> None:
        super().__init__(handle.id, mesh)
        self._peer_id: Optional[str] = None
        self._peer_addr: Optional[str] = None

    def sendall(self, data: Union[Bytes, str], timeout: Optional[float] = None) -> None:
        """Writes all of ``data`` and flushes, within ``timeout``."""
        ptr, n, _keep = _in_bytes(data, "data")
        if n == 0:
            self._h()
            return
        _check(lib.nasp_conn_write(self._h(), ptr, n, _ms(timeout)), "nasp_conn_write")

    def recv(self, n: int = DEFAULT_CHUNK, timeout: Optional[float] = None) -> bytes:
        """Up to ``n`` bytes, ``b""`` at EOF (the peer closed its side);
        waits at most ``timeout``."""
        if n <= 0:
            raise ValueError(f"n must be positive, not {n!r}")
        buf = (c_uint8 * n)()
        got = c_size_t()
        _check(
            lib.nasp_conn_read(self._h(), buf, n, byref(got), _ms(timeout)), "nasp_conn_read"
        )
        return ctypes.string_at(buf, got.value)

    def recv_into(
        self, buffer: Union[bytearray, memoryview], nbytes: int = 0, timeout: Optional[float] = None
    ) -> int:
        """Reads into a writable ``buffer`` (at most ``nbytes``, 0: its
        size) without a copy; returns the count, 0 at EOF."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("recv_into needs a writable buffer")
        size = view.nbytes if nbytes <= 0 else min(nbytes, view.nbytes)
        if size == 0:
            raise ValueError("recv_into needs a non-empty buffer")
        arr = (c_uint8 * size).from_buffer(view)
        got = c_size_t()
        _check(
            lib.nasp_conn_read(self._h(), arr, size, byref(got), _ms(timeout)),
            "nasp_conn_read",
        )
        return got.value

    def shutdown_write(self, timeout: Optional[float] = None) -> None:
        """Half-closes: the peer reads EOF; reading still works."""
        _check(lib.nasp_conn_shutdown_write(self._h(), _ms(timeout)), "nasp_conn_shutdown_write")

    @property
    def peer_id(self) -> str:
        """The peer's verified SPIFFE id (inbound: the caller's; outbound:
        the upstream's), ``""`` when unknown."""
        if self._peer_id is None:
            view = NaspStr()
            _check(lib.nasp_conn_peer_id(self._h(), byref(view)), "nasp_conn_peer_id")
            self._peer_id = view.to_str()
        return self._peer_id

    @property
    def peer_addr(self) -> str:
        """The peer's ``ip:port``, ``""`` when unknown."""
        if self._peer_addr is None:
            view = NaspStr()
            _check(lib.nasp_conn_peer_addr(self._h(), byref(view)), "nasp_conn_peer_addr")
            self._peer_addr = view.to_str()
        return self._peer_addr


class Listener(_Owned):
    """A TCP listener of the mesh (:meth:`Mesh.listen`); :meth:`accept`
    returns connections that passed the handshake and inbound filters."""

    _KIND = "listener"
    _HANDLE = NaspListener
    _FREE = "nasp_listener_close"

    def __init__(self, handle: NaspListener, mesh: Mesh) -> None:
        super().__init__(handle.id, mesh)
        view = NaspStr()
        _check(lib.nasp_listener_local_addr(handle, byref(view)), "nasp_listener_local_addr")
        self._address = view.to_str()

    @property
    def address(self) -> str:
        """The bound ``ip:port``."""
        return self._address

    def accept(self, timeout: Optional[float] = None) -> Connection:
        """The next connection; :class:`Timeout` when none came in
        ``timeout``, :class:`Closed` after ``close()`` or the mesh's
        shutdown."""
        mesh = self._mesh
        assert mesh is not None, "a listener always has its mesh"
        out = NaspConn()
        _check(
            lib.nasp_listener_accept(self._h(), _ms(timeout), byref(out)),
            "nasp_listener_accept",
        )
        return Connection(out, mesh)

    def __repr__(self) -> str:
        return f"<nasp.Listener {self._address}{' closed' if self.closed else ''}>"
