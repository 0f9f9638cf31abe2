"""Misuse and failures: each gives its exception with the library's
message and never crashes the process; and the prototype table agrees
with the C header, both ways (the check that would have caught the Go
wrapper's five arguments to a four-argument function)."""

from __future__ import annotations

import ctypes
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from ctypes import POINTER, byref, c_bool, c_char, c_char_p, c_int32, c_int64, c_size_t
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import nasp
from nasp import _ffi


def _yaml_config_with(config_text: str, extra: str) -> str:
    return config_text.rstrip("\n") + "\n" + extra + "\n"


def test_a_shut_down_mesh_raises_closed_and_wakes_a_blocked_accept(
    config_text: str, env: Dict[str, str]
) -> None:
    mesh = nasp.Mesh.from_config(config_text)
    host = env["NASP_TEST_LISTEN"].rsplit(":", 1)[0]
    listener = mesh.listen(f"{host}:0")
    woke: List[BaseException] = []

    def accept() -> None:
        try:
            listener.accept(timeout=60)
        except BaseException as e:
            woke.append(e)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    mesh.shutdown(timeout=5)
    t.join(30)
    assert not t.is_alive(), "a blocked accept did not wake on shutdown"
    assert len(woke) == 1 and isinstance(woke[0], nasp.Closed), woke

    with pytest.raises(nasp.Closed) as e:
        mesh.request("GET", env["NASP_TEST_HTTP_URL"])
    assert e.value.status == _ffi.CLOSED and e.value.message, e.value
    with pytest.raises(nasp.Closed):
        mesh.is_ready
    with pytest.raises(nasp.Closed):
        mesh.connect(env["NASP_TEST_TCP"])
    mesh.shutdown()  # idempotent
    assert mesh.id == env["NASP_TEST_CLIENT_ID"], "the id outlives the shutdown"
    listener.close()
    mesh.close()
    with pytest.raises(nasp.Closed, match="mesh is closed"):
        mesh.request("GET", env["NASP_TEST_HTTP_URL"])
    with pytest.raises(nasp.Closed):
        mesh.metrics_text()


def test_double_close_is_harmless_and_children_die_with_their_mesh(
    config_text: str, env: Dict[str, str]
) -> None:
    with nasp.Mesh.from_config(config_text) as mesh:
        resp = mesh.request("POST", env["NASP_TEST_HTTP_URL"], body=b"unread")
        resp.close()
        resp.close()
        assert resp.closed
        with pytest.raises(nasp.Closed, match="response is closed"):
            resp.read(1)
        with mesh.request("POST", env["NASP_TEST_HTTP_URL"], body=b"x") as r2:
            r2.close()  # and __exit__ closes again
        req = mesh.start_request("POST", env["NASP_TEST_HTTP_URL"])
        req.write(b"aborted")
        req.close()  # aborts the upload
        req.close()
        with pytest.raises(nasp.Closed):
            req.finish()
        orphan = mesh.request("POST", env["NASP_TEST_HTTP_URL"], body=b"orphan")
        mesh.close()
        mesh.close()
    mesh.close()  # and after __exit__
    with pytest.raises(nasp.Closed, match="mesh is closed"):
        orphan.read(1)
    assert orphan.status == 200, "what was read at creation stays"
    orphan.close()  # freed with its mesh: nothing left, no error
    orphan.close()


def test_a_collected_mesh_is_freed_by_its_finalizer(config_text: str) -> None:
    mesh = nasp.Mesh.from_config(config_text)
    finalizer = mesh._finalizer
    assert finalizer.alive
    del mesh
    import gc

    gc.collect()
    assert not finalizer.alive, "the finalizer did not run"


def test_an_unknown_config_field_is_a_config_error_naming_it(config_text: str) -> None:
    with pytest.raises(nasp.ConfigError) as e:
        nasp.Mesh.from_config(_yaml_config_with(config_text, "bogus: 1"))
    assert "bogus" in e.value.message, e.value
    assert e.value.status == _ffi.CONFIG
    assert isinstance(e.value, ValueError)
    # The same as a dict, sent as JSON; and nested.
    with pytest.raises(nasp.ConfigError, match="bogus_field"):
        nasp.Mesh.from_config({"bogus_field": True})
    with pytest.raises(nasp.ConfigError, match="colour"):
        nasp.Mesh.from_config({"workload": {"colour": "blue"}})
    with pytest.raises(nasp.ConfigError):
        nasp.Mesh.from_config("{ not json")
    with pytest.raises(TypeError):
        nasp.Mesh.from_config(42)  # type: ignore[arg-type]


def test_from_env_with_overrides_reports_config_errors() -> None:
    with pytest.raises(nasp.ConfigError, match="bogus"):
        nasp.Mesh.from_env(bogus=1)


def test_accept_times_out(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    host = env["NASP_TEST_LISTEN"].rsplit(":", 1)[0]
    with mesh.listen(f"{host}:0") as listener:
        assert listener.address.startswith(host + ":")
        assert not listener.address.endswith(":0"), "a port was picked"
        started = time.monotonic()
        with pytest.raises(nasp.Timeout) as e:
            listener.accept(timeout=0.2)
        assert time.monotonic() - started >= 0.15
        assert isinstance(e.value, TimeoutError)
        assert e.value.status == _ffi.TIMEOUT and e.value.message
    with pytest.raises(nasp.Closed, match="listener is closed"):
        listener.accept(timeout=1)


def test_malformed_arguments_are_invalid_argument(mesh: nasp.Mesh) -> None:
    with pytest.raises(nasp.InvalidArgument) as e:
        mesh.request("GET", "not a url")
    assert isinstance(e.value, ValueError)
    assert e.value.status == _ffi.INVALID_ARGUMENT and e.value.message
    with pytest.raises(nasp.InvalidArgument):
        mesh.request("BAD METHOD", "http://echo.demo:18080/")
    with pytest.raises(nasp.InvalidArgument):
        mesh.request("GET", "http://echo.demo:18080/", headers=[("bad name", "v")])
    with pytest.raises(nasp.InvalidArgument):
        mesh.request("GET", "http://echo.demo:18080/", headers=[("x-a", "line\r\nbreak")])
    # A NUL cannot cross a C string; refused before the call.
    with pytest.raises(nasp.InvalidArgument, match="NUL"):
        mesh.request("GET", "http://echo.demo:18080/\0")
    with pytest.raises(nasp.InvalidArgument):
        mesh.listen("not an address")
    with pytest.raises(TypeError):
        mesh.request("GET", "http://echo.demo:18080/", body=12)  # type: ignore[arg-type]


def test_timeouts_are_positive_seconds(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    for bad in (0, -1, -0.5, float("nan")):
        with pytest.raises(ValueError):
            mesh.request("GET", env["NASP_TEST_HTTP_URL"], timeout=bad)
    with pytest.raises(ValueError):
        mesh.request("GET", env["NASP_TEST_HTTP_URL"], timeout=10**8)
    with pytest.raises(TypeError):
        mesh.request("GET", env["NASP_TEST_HTTP_URL"], timeout="1")  # type: ignore[arg-type]
    assert nasp._ms(None) == 0 and nasp._ms(0.0001) == 1 and nasp._ms(2.5) == 2500


def test_every_status_has_its_exception() -> None:
    expected = {
        _ffi.INVALID_ARGUMENT: (nasp.InvalidArgument, ValueError),
        _ffi.INVALID_HANDLE: (nasp.InvalidHandle, None),
        _ffi.CONFIG: (nasp.ConfigError, ValueError),
        _ffi.NOT_READY: (nasp.NotReady, None),
        _ffi.CLOSED: (nasp.Closed, None),
        _ffi.TIMEOUT: (nasp.Timeout, TimeoutError),
        _ffi.CONNECT: (nasp.ConnectError, ConnectionError),
        _ffi.HTTP: (nasp.HttpError, None),
        _ffi.IO: (nasp.IoError, OSError),
        _ffi.WRONG_THREAD: (nasp.WrongThread, None),
        _ffi.PANIC: (nasp.InternalPanic, None),
        _ffi.INTERNAL: (nasp.InternalError, None),
    }
    for status, (cls, builtin) in expected.items():
        e = _ffi.error(status, "msg")
        assert type(e) is cls and e.status == status and e.message == "msg"
        assert isinstance(e, nasp.NaspError)
        if builtin is not None:
            assert isinstance(e, builtin)
        assert _ffi.STATUS_NAMES[status] in str(e)
    unknown = _ffi.error(99, "from a newer library")
    assert type(unknown) is nasp.NaspError and unknown.status == 99


def test_a_handle_of_the_wrong_kind_is_refused_by_ctypes() -> None:
    # One Structure type per kind: a response where a mesh goes never
    # reaches the library.
    with pytest.raises(ctypes.ArgumentError):
        _ffi.lib.nasp_mesh_id(_ffi.NaspResponse(1), byref(_ffi.NaspStr()))
    # A made-up mesh id reaches it and is refused there.
    status = _ffi.lib.nasp_mesh_id(_ffi.NaspMesh(12345), byref(_ffi.NaspStr()))
    assert status == _ffi.INVALID_HANDLE
    assert _ffi.lib.nasp_last_error_status() == _ffi.INVALID_HANDLE
    assert _ffi.last_error(), "a message came with it"
    with pytest.raises(AttributeError, match="PROTOTYPES"):
        _ffi.lib.nasp_not_a_function


def _import_with(library: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ, NASP_LIBRARY=library, PYTHONDONTWRITEBYTECODE="1")
    src = str(Path(nasp.__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", "import nasp"],
        env=dict(env, PYTHONPATH=src),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_fails_naming_what_is_wrong_with_the_library(tmp_path: Path) -> None:
    missing = _import_with(str(tmp_path / "libnasp_ffi.so"))
    assert missing.returncode != 0
    assert "ImportError" in missing.stderr and "is not a file" in missing.stderr, missing.stderr
    # Not a library at all.
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    broken = _import_with(str(junk))
    assert broken.returncode != 0 and "cannot load" in broken.stderr, broken.stderr
    # A real shared library without nasp's exports (one of Python's own
    # extension modules): the first function of the table is named.
    other = next(
        (
            f
            for f in (getattr(importlib.import_module(m), "__file__", None) for m in _EXTENSIONS)
            if f and f.endswith(".so")
        ),
        None,
    )
    assert other, f"none of {_EXTENSIONS} is a shared library in this Python"
    wrong = _import_with(other)
    assert wrong.returncode != 0
    first = next(iter(_ffi.PROTOTYPES))
    assert f"has no function {first}" in wrong.stderr, wrong.stderr


def test_the_library_beside_the_package_is_loaded_without_nasp_library(tmp_path: Path) -> None:
    # A copy of the package with nasp/_lib/libnasp_ffi.so (a link to the
    # library under test), imported with NASP_LIBRARY unset.
    pkg = tmp_path / "nasp"
    pkg.mkdir()
    for f in Path(nasp.__file__).resolve().parent.glob("*.py"):
        shutil.copy(f, pkg / f.name)
    (pkg / "_lib").mkdir()
    (pkg / "_lib" / _ffi.LIBRARY_NAME).symlink_to(Path(_ffi.LIBRARY).resolve())
    env = {k: v for k, v in os.environ.items() if k != "NASP_LIBRARY"}
    done = subprocess.run(
        [sys.executable, "-c", "import nasp; print(nasp.LIBRARY)"],
        env=dict(env, PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(pkg.resolve() / "_lib" / _ffi.LIBRARY_NAME)


#: Extension modules that are shared libraries in a usual CPython build.
_EXTENSIONS = ("_ctypes", "_struct", "_json", "math", "select")


# --- The prototype table against the header ---------------------------------


def _header_path() -> Path:
    env = os.environ.get("NASP_TEST_HEADER")
    if env:
        return Path(env)
    # bindings/python/tests/ -> the repository root.
    return Path(__file__).resolve().parents[3] / "crates" / "nasp-ffi" / "include" / "nasp.h"


def _header_text() -> str:
    """The header without comments and preprocessor lines."""
    path = _header_path()
    assert path.is_file(), f"no C header at {path} (set NASP_TEST_HEADER)"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))


def _norm(c_type: str) -> str:
    """One spelling per type: single spaces, stars together and apart from
    the name (``const char *``, ``const uint8_t **``)."""
    t = " ".join(c_type.replace("*", " * ").split())
    return re.sub(r"\*( \*)+", lambda m: m.group(0).replace(" ", ""), t)


def _split_decl(decl: str) -> Tuple[str, str]:
    """``const NaspHeader *headers`` -> (``const NaspHeader *``, ``headers``)."""
    m = re.fullmatch(r"(.*?[\s*])(\w+)", " ".join(decl.split()))
    assert m, f"cannot read the declaration {decl!r}"
    return _norm(m.group(1)), m.group(2)


def header_functions() -> Dict[str, Tuple[str, List[str]]]:
    """Every ``nasp_*`` function the header declares: its return type and
    its parameters' types, in order. cbindgen writes one declaration per
    function, ended by ``;``; a statement starts after the last ``;``,
    ``{`` or ``}``."""
    found: Dict[str, Tuple[str, List[str]]] = {}
    for stmt in re.split(r"[;{}]", _header_text()):
        m = re.fullmatch(r"\s*(.+?)\b(nasp_\w+)\s*\((.*)\)\s*", stmt, flags=re.S)
        if not m:
            continue
        ret, name, params = _norm(m.group(1)), m.group(2), " ".join(m.group(3).split())
        args = [] if params in ("", "void") else [_split_decl(p)[0] for p in params.split(",")]
        assert name not in found, f"{name} declared twice"
        found[name] = (ret, args)
    return found


def header_structs() -> Dict[str, List[Tuple[str, str]]]:
    """Every ``typedef struct { ... } Name;``: its fields' names and types."""
    out: Dict[str, List[Tuple[str, str]]] = {}
    for m in re.finditer(r"typedef struct\s*\{([^}]*)\}\s*(\w+)\s*;", _header_text()):
        fields = []
        for decl in m.group(1).split(";"):
            if decl.strip():
                c_type, field = _split_decl(decl)
                fields.append((field, c_type))
        out[m.group(2)] = fields
    return out


_SCALARS: Dict[str, Any] = {
    "NaspStatus": c_int32,
    "bool": c_bool,
    "uint8_t": c_uint8,
    "uint16_t": c_uint16,
    "uint32_t": c_uint32,
    "uint64_t": c_uint64,
    "int64_t": c_int64,
    "size_t": c_size_t,
    "char": c_char,
}


def ctype_of(c_type: str) -> Any:
    """The ctypes type a C type must have in ``PROTOTYPES``: ``const char *``
    is ``c_char_p`` (a Python ``bytes``); any other ``T *`` is
    ``POINTER(T)`` (``const`` does not change the ctypes type); a ``Nasp*``
    name is the structure of that name in ``nasp._ffi``."""
    t = _norm(c_type)
    if t == "const char *":
        return c_char_p
    if t.endswith("*"):
        return POINTER(ctype_of(t[:-1].strip()))
    base = t[len("const ") :] if t.startswith("const ") else t
    if base in _SCALARS:
        return _SCALARS[base]
    if base.startswith("Nasp") and hasattr(_ffi, base):
        return getattr(_ffi, base)
    raise AssertionError(f"no ctypes mapping for the C type {c_type!r}")


def test_prototypes_match_header() -> None:
    declared = header_functions()
    # The header is the whole ABI: the parser must have found all of it.
    assert {"nasp_mesh_new", "nasp_http_request", "nasp_last_error"} <= set(declared)
    problems: List[str] = []
    for name, (ret, args) in sorted(declared.items()):
        if name not in _ffi.PROTOTYPES:
            problems.append(f"{name}: declared in the header, no prototype")
            continue
        restype, argtypes = _ffi.PROTOTYPES[name]
        if restype is not ctype_of(ret):
            problems.append(f"{name}: returns {ret}, prototype says {restype.__name__}")
        if len(argtypes) != len(args):
            problems.append(
                f"{name}: {len(args)} parameters in the header, {len(argtypes)} in the prototype"
            )
            continue
        for i, (c_type, py) in enumerate(zip(args, argtypes)):
            if py is not ctype_of(c_type):
                problems.append(
                    f"{name}: parameter {i + 1} is {c_type} ({ctype_of(c_type).__name__}),"
                    f" prototype says {py.__name__}"
                )
    for name in sorted(set(_ffi.PROTOTYPES) - set(declared)):
        problems.append(f"{name}: prototype for a function the header does not declare")
    assert not problems, "\n".join(problems)
    # And what was loaded is what the table says.
    for name, (restype, argtypes) in _ffi.PROTOTYPES.items():
        fn = getattr(_ffi.lib, name)
        assert fn.restype is restype and list(fn.argtypes) == argtypes, name


def test_structs_and_constants_match_header() -> None:
    structs = header_structs()
    assert {"NaspMesh", "NaspStr", "NaspHeader", "NaspResponse", "NaspBuf"} <= set(structs)
    problems: List[str] = []
    for name, fields in sorted(structs.items()):
        py = getattr(_ffi, name, None)
        if py is None:
            problems.append(f"{name}: no structure in nasp._ffi")
            continue
        py_fields = list(py._fields_)
        if [f for f, _ in py_fields] != [f for f, _ in fields]:
            problems.append(f"{name}: fields {py_fields} vs the header's {fields}")
            continue
        for (field, c_type), (_, t) in zip(fields, py_fields):
            want = ctype_of(c_type)
            # A view's bytes are read by length: c_void_p rather than
            # c_char_p, which ctypes would read up to a NUL.
            ok = t is want or (want is c_char_p and t is c_void_p and name == "NaspStr")
            if not ok:
                problems.append(f"{name}.{field}: {c_type} in the header, {t.__name__} here")
        if ctypes.sizeof(py) != sum(ctypes.sizeof(ctype_of(c)) for _, c in fields):
            problems.append(f"{name}: size {ctypes.sizeof(py)} differs from its fields'")
    # Every structure a prototype passes (by value or pointer) is the
    # header's.
    for name, (restype, argtypes) in _ffi.PROTOTYPES.items():
        for t in [restype, *argtypes]:
            while hasattr(t, "_type_") and not isinstance(t._type_, str):
                t = t._type_  # POINTER(X) -> X
            if isinstance(t, type) and issubclass(t, ctypes.Structure):
                if t.__name__ not in structs:
                    problems.append(f"{name}: passes {t.__name__}, not in the header")
    assert not problems, "\n".join(problems)

    text = _header_path().read_text(encoding="utf-8")  # with its #defines
    abi = re.search(r"#define NASP_ABI_VERSION (\d+)", text)
    assert abi and int(abi.group(1)) == _ffi.ABI_VERSION == _ffi.lib.nasp_abi_version()
    codes = {n: int(v) for n, v in re.findall(r"NASP_STATUS_(\w+) = (\d+)", text)}
    assert codes == {name: code for code, name in _ffi.STATUS_NAMES.items()}, codes
    for name, code in codes.items():
        assert getattr(_ffi, name) == code, name
