"""The ctypes layer over nasp's C ABI (``crates/nasp-ffi/include/nasp.h``).

What this module is for: finding and loading ``libnasp_ffi``, checking its
ABI version, declaring the handle and view structures, applying one
prototype table (``PROTOTYPES``) to every exported function, and turning a
``NaspStatus`` into an exception that carries the library's message.

What it must never do: call a function whose prototype is not in
``PROTOTYPES`` (ctypes would guess the argument types, which is how the Go
original's wrapper passed five arguments to a four-argument function), load
a library from the working directory, or read ``nasp_last_error`` anywhere
but right after the failed call on the same thread (the message is kept per
thread by the library, and the next call on that thread replaces it).

``tests/test_errors.py::test_prototypes_match_header`` parses the header
and checks this table against it, both ways.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Type

#: The ``NASP_ABI_VERSION`` this wrapper was written for; the loaded library
#: must report the same from ``nasp_abi_version()``.
ABI_VERSION = 1

#: ``NaspStatus`` is ``int32_t`` on the wire (cbindgen's ``typedef``).
NaspStatus = c_int32

# The status codes, as the header numbers them (stable; new ones appended).
OK = 0
INVALID_ARGUMENT = 1
INVALID_HANDLE = 2
CONFIG = 3
NOT_READY = 4
CLOSED = 5
TIMEOUT = 6
CONNECT = 7
HTTP = 8
IO = 9
WRONG_THREAD = 10
PANIC = 11
INTERNAL = 12

#: Each code's header name, for messages.
STATUS_NAMES: Dict[int, str] = {
    OK: "OK",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    INVALID_HANDLE: "INVALID_HANDLE",
    CONFIG: "CONFIG",
    NOT_READY: "NOT_READY",
    CLOSED: "CLOSED",
    TIMEOUT: "TIMEOUT",
    CONNECT: "CONNECT",
    HTTP: "HTTP",
    IO: "IO",
    WRONG_THREAD: "WRONG_THREAD",
    PANIC: "PANIC",
    INTERNAL: "INTERNAL",
}


# --- Structures -------------------------------------------------------------
#
# A handle is a struct with one 64-bit id, passed by value; each kind has
# its own type so that ctypes rejects a response where a mesh is expected.


class _Handle(Structure):
    _fields_ = [("id", c_uint64)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id:#x})"


class NaspMesh(_Handle):
    """``NaspMesh``: a mesh handle."""


class NaspResponse(_Handle):
    """``NaspResponse``: a response handle."""


class NaspRequest(_Handle):
    """``NaspRequest``: a streaming upload in progress."""


class NaspConn(_Handle):
    """``NaspConn``: a mesh TCP connection."""


class NaspListener(_Handle):
    """``NaspListener``: a mesh TCP listener."""


class NaspBuf(_Handle):
    """``NaspBuf``: an owned byte buffer."""


class NaspStr(Structure):
    """``NaspStr``: a borrowed view (``len`` bytes at ``ptr``).

    ``ptr`` is declared ``c_void_p`` rather than ``c_char_p`` so that ctypes
    does not read it as a NUL-terminated string: the length is the truth.
    """

    _fields_ = [("ptr", c_void_p), ("len", c_size_t)]

    def to_bytes(self) -> bytes:
        """A copy of the viewed bytes (``b""`` for an empty view)."""
        if not self.len or not self.ptr:
            return b""
        return ctypes.string_at(self.ptr, self.len)

    def to_str(self) -> str:
        """The viewed bytes as UTF-8 text (invalid bytes replaced)."""
        return self.to_bytes().decode("utf-8", "replace")


class NaspHeader(Structure):
    """``NaspHeader``: one request header, name and value with lengths."""

    _fields_ = [
        ("name", c_char_p),
        ("name_len", c_size_t),
        ("value", c_char_p),
        ("value_len", c_size_t),
    ]


# --- The prototype table ----------------------------------------------------
#
# One entry per function of the header, in the header's spelling: C
# ``const char *`` is ``c_char_p`` (Python ``bytes``), ``char *`` a writable
# ``POINTER(c_char)``, ``const uint8_t *`` and ``uint8_t *``
# ``POINTER(c_uint8)``, ``T *`` out-pointers ``POINTER(T)``.

_u8p = POINTER(c_uint8)

PROTOTYPES: Dict[str, Tuple[Any, List[Any]]] = {
    # Buffers.
    "nasp_buf_data": (NaspStatus, [NaspBuf, POINTER(_u8p), POINTER(c_size_t)]),
    "nasp_buf_free": (NaspStatus, [NaspBuf]),
    # One-shot HTTP and responses.
    "nasp_http_request": (
        NaspStatus,
        [
            NaspMesh,
            c_char_p,
            c_char_p,
            POINTER(NaspHeader),
            c_size_t,
            _u8p,
            c_size_t,
            c_uint32,
            POINTER(NaspResponse),
        ],
    ),
    "nasp_response_status": (NaspStatus, [NaspResponse, POINTER(c_uint16)]),
    "nasp_response_header_count": (NaspStatus, [NaspResponse, POINTER(c_size_t)]),
    "nasp_response_header_at": (
        NaspStatus,
        [NaspResponse, c_size_t, POINTER(NaspStr), POINTER(NaspStr)],
    ),
    "nasp_response_peer_id": (NaspStatus, [NaspResponse, POINTER(NaspStr)]),
    "nasp_response_read": (
        NaspStatus,
        [NaspResponse, _u8p, c_size_t, POINTER(c_size_t), c_uint32],
    ),
    "nasp_response_read_all": (
        NaspStatus,
        [NaspResponse, c_size_t, c_uint32, POINTER(NaspBuf)],
    ),
    "nasp_response_free": (NaspStatus, [NaspResponse]),
    # Streaming uploads.
    "nasp_http_start": (
        NaspStatus,
        [
            NaspMesh,
            c_char_p,
            c_char_p,
            POINTER(NaspHeader),
            c_size_t,
            c_int64,
            c_uint32,
            POINTER(NaspRequest),
        ],
    ),
    "nasp_request_write": (NaspStatus, [NaspRequest, _u8p, c_size_t, c_uint32]),
    "nasp_request_finish": (
        NaspStatus,
        [NaspRequest, c_uint32, POINTER(NaspResponse)],
    ),
    "nasp_request_free": (NaspStatus, [NaspRequest]),
    # TCP connections.
    "nasp_tcp_connect": (
        NaspStatus,
        [NaspMesh, c_char_p, c_uint32, POINTER(NaspConn)],
    ),
    "nasp_conn_read": (
        NaspStatus,
        [NaspConn, _u8p, c_size_t, POINTER(c_size_t), c_uint32],
    ),
    "nasp_conn_write": (NaspStatus, [NaspConn, _u8p, c_size_t, c_uint32]),
    "nasp_conn_shutdown_write": (NaspStatus, [NaspConn, c_uint32]),
    "nasp_conn_peer_id": (NaspStatus, [NaspConn, POINTER(NaspStr)]),
    "nasp_conn_peer_addr": (NaspStatus, [NaspConn, POINTER(NaspStr)]),
    "nasp_conn_close": (NaspStatus, [NaspConn]),
    # Listeners.
    "nasp_listen": (NaspStatus, [NaspMesh, c_char_p, POINTER(NaspListener)]),
    "nasp_listener_local_addr": (NaspStatus, [NaspListener, POINTER(NaspStr)]),
    "nasp_listener_accept": (
        NaspStatus,
        [NaspListener, c_uint32, POINTER(NaspConn)],
    ),
    "nasp_listener_close": (NaspStatus, [NaspListener]),
    # The mesh.
    "nasp_mesh_new": (NaspStatus, [c_char_p, c_size_t, POINTER(NaspMesh)]),
    "nasp_mesh_new_from_env": (
        NaspStatus,
        [c_char_p, c_size_t, POINTER(NaspMesh)],
    ),
    "nasp_mesh_id": (NaspStatus, [NaspMesh, POINTER(NaspStr)]),
    "nasp_mesh_is_ready": (NaspStatus, [NaspMesh, POINTER(c_bool)]),
    "nasp_mesh_metrics": (NaspStatus, [NaspMesh, POINTER(NaspBuf)]),
    "nasp_mesh_shutdown": (NaspStatus, [NaspMesh, c_uint32]),
    "nasp_mesh_free": (NaspStatus, [NaspMesh]),
    # Versions and errors.
    "nasp_abi_version": (c_uint32, []),
    "nasp_version": (c_char_p, []),
    "nasp_last_error": (c_size_t, [POINTER(c_char), c_size_t]),
    "nasp_last_error_status": (NaspStatus, []),
}


# --- Loading ----------------------------------------------------------------

#: The library's file name on this platform.
LIBRARY_NAME = {
    "darwin": "libnasp_ffi.dylib",
    "win32": "nasp_ffi.dll",
}.get(sys.platform, "libnasp_ffi.so")


def library_path() -> str:
    """Where the library is loaded from, by the rules of
    ``docs/python.md``: ``$NASP_LIBRARY`` (a path, used as it is, never
    falling back), else ``nasp/_lib/<LIBRARY_NAME>`` beside this package,
    else the system search path (``ctypes.util.find_library("nasp_ffi")``).
    Never the working directory.
    """
    env = os.environ.get("NASP_LIBRARY")
    if env:
        if not os.path.isfile(env):
            raise ImportError(f"nasp: NASP_LIBRARY={env!r} is not a file")
        return env
    bundled = Path(__file__).resolve().parent / "_lib" / LIBRARY_NAME
    if bundled.is_file():
        return str(bundled)
    found = ctypes.util.find_library("nasp_ffi")
    if found:
        return found
    raise ImportError(
        f"nasp: no C library found: set NASP_LIBRARY to the path of {LIBRARY_NAME} "
        f"(`cargo build -p nasp-ffi` writes target/debug/{LIBRARY_NAME}), put it in "
        f"{bundled.parent}, or install it where the system linker finds it"
    )


def _load() -> Tuple[ctypes.CDLL, str]:
    path = library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(f"nasp: cannot load {path}: {e}") from e
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise ImportError(
                f"nasp: {path} has no function {name} (the library is older or "
                f"newer than this wrapper; rebuild it with `cargo build -p nasp-ffi`)"
            ) from None
        fn.restype = restype
        fn.argtypes = argtypes
    abi = lib.nasp_abi_version()
    if abi != ABI_VERSION:
        raise ImportError(
            f"nasp: {path} has ABI version {abi}, this wrapper needs {ABI_VERSION}"
        )
    return lib, path


class _Functions:
    """The library's functions, only those of ``PROTOTYPES``: an attribute
    not in the table is an ``AttributeError``, never an unprototyped
    foreign function."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name in PROTOTYPES:
            setattr(self, name, getattr(lib, name))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"nasp: {name} is not in PROTOTYPES")


_cdll, LIBRARY = _load()
#: The prototyped functions (``lib.nasp_mesh_new(...)``).
lib: Any = _Functions(_cdll)


def version() -> str:
    """The loaded library's version string (``"0.1.0 wasmtime,wasmi,wasm3"``)."""
    raw = lib.nasp_version()
    return raw.decode("utf-8", "replace") if raw else ""


def last_error() -> str:
    """This thread's message of its last failed call (``""`` after a
    success). Asks for the length first, as ``snprintf`` callers do."""
    n = lib.nasp_last_error(None, 0)
    if n == 0:
        return ""
    buf = ctypes.create_string_buffer(n + 1)
    lib.nasp_last_error(buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace")


# --- Statuses to exceptions -------------------------------------------------
#
# The exception classes live in the package (``nasp.NaspError`` and its
# subclasses); the package registers them here so this module can raise
# them without importing the package (which imports this module).

_EXCEPTIONS: Dict[int, Type[Exception]] = {}
_BASE: List[Callable[[int, str], Exception]] = []


def register_exceptions(
    by_status: Dict[int, Type[Exception]], base: Callable[[int, str], Exception]
) -> None:
    """Called once by ``nasp/__init__.py``: the class per status and the
    base class for codes this wrapper does not know."""
    _EXCEPTIONS.update(by_status)
    _BASE.append(base)


def error(status: int, message: str) -> Exception:
    """The exception for ``status`` with ``message``."""
    cls = _EXCEPTIONS.get(status)
    if cls is not None:
        return cls(status, message)
    return _BASE[0](status, message)


def check(status: int, what: str) -> None:
    """Raises the exception for a non-OK ``status``, with the library's
    message read now (right after the call, on this thread); ``what``
    names the call for an empty message."""
    if status == OK:
        return
    message = last_error() or f"{what} failed"
    raise error(status, message)
