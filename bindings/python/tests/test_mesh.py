"""The package against a real mesh: the fixture's embedded control plane
(CA and xDS) and its echo workload, reached over mTLS through the C ABI."""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterator, List, Optional

import pytest

import nasp


def test_joins_the_mesh_as_the_token_files_identity(
    mesh: nasp.Mesh, env: Dict[str, str]
) -> None:
    assert mesh.id == env["NASP_TEST_CLIENT_ID"]
    assert mesh.is_ready is True
    assert not mesh.closed
    assert env["NASP_TEST_CLIENT_ID"] in repr(mesh)
    # "0.1.0 wasmtime,wasmi,wasm3": a version, then the runtimes.
    version, _, runtimes = nasp.library_version().partition(" ")
    assert version.count(".") == 2 and "wasmi" in runtimes.split(","), nasp.library_version()


def test_mtls_get_sees_both_verified_ids(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    with mesh.request("GET", env["NASP_TEST_HTTP_URL"]) as resp:
        assert resp.status == 200
        # The server's certificate, verified by us; ours, verified by it.
        assert resp.peer_id == env["NASP_TEST_SERVER_ID"]
        assert resp.header("x-peer") == env["NASP_TEST_CLIENT_ID"]
        assert resp.header("X-Peer") == env["NASP_TEST_CLIENT_ID"], "names in any case"
        assert resp.header("x-missing") is None
        assert resp.read_all() == b""
        assert resp.read(10) == b"", "the end of the body stays the end"


def test_post_echoes_a_binary_body_read_in_small_chunks(
    mesh: nasp.Mesh, env: Dict[str, str]
) -> None:
    # Zero bytes inside and at both ends: the Go wrapper's C strings cut
    # bodies at the first one.
    body = b"\0" + bytes(range(256)) * 40 + b"\0\0end\0"
    with mesh.request(
        "POST",
        env["NASP_TEST_HTTP_URL"],
        headers=[("x-a", "1"), ("content-type", "application/octet-stream"), ("x-a", b"2")],
        body=body,
        timeout=30,
    ) as resp:
        assert resp.status == 200
        assert resp.peer_id == env["NASP_TEST_SERVER_ID"]
        assert resp.header("x-peer") == env["NASP_TEST_CLIENT_ID"]
        assert resp.header("x-a-count") == "2", "a repeated request header arrives twice"
        chunks: List[bytes] = []
        while True:
            chunk = resp.read(7, timeout=10)
            if not chunk:
                break
            assert 0 < len(chunk) <= 7
            chunks.append(chunk)
    assert b"".join(chunks) == body
    assert len(chunks) >= len(body) // 7


def test_body_from_a_bytearray_and_a_memoryview(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    raw = bytearray(b"from a bytearray \0 without a copy")
    with mesh.request("PUT", env["NASP_TEST_HTTP_URL"], body=raw) as resp:
        assert resp.read_all() == bytes(raw)
    view = memoryview(b"0123456789")[2:8]
    with mesh.request("PUT", env["NASP_TEST_HTTP_URL"], body=view) as resp:
        assert resp.read_all() == b"234567"
    with mesh.request("PUT", env["NASP_TEST_HTTP_URL"], headers={"x-a": "x"}, body="text é") as resp:
        assert resp.header("x-a-count") == "1"
        assert resp.read_all() == "text é".encode()


def test_repeated_response_headers_are_kept_in_order(
    mesh: nasp.Mesh, env: Dict[str, str]
) -> None:
    with mesh.request("GET", env["NASP_TEST_HTTP_URL"]) as resp:
        cookies = [(n, v) for n, v in resp.headers if n == "set-cookie"]
        assert cookies == [("set-cookie", "a=1"), ("set-cookie", "b=2")], resp.headers
        assert resp.header_values("Set-Cookie") == ["a=1", "b=2"]
        assert all(n == n.lower() for n, _ in resp.headers), resp.headers


def test_iterating_a_response_yields_its_body_in_chunks(
    mesh: nasp.Mesh, env: Dict[str, str]
) -> None:
    body = bytes(i % 251 for i in range(300 * 1024))
    with mesh.request("POST", env["NASP_TEST_HTTP_URL"], body=body) as resp:
        chunks = list(resp)
    assert b"".join(chunks) == body
    assert all(0 < len(c) <= nasp.DEFAULT_CHUNK for c in chunks)
    assert len(chunks) >= len(body) // nasp.DEFAULT_CHUNK


def _pattern(size: int) -> bytes:
    # Not periodic in any power of two, so a lost or repeated chunk shows.
    return bytes((i * 7 + i // 1021) % 256 for i in range(size))


def test_streamed_upload_of_5_mib_is_echoed_back(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    chunk = _pattern(64 * 1024 + 3)
    total = 5 * 1024 * 1024
    sent = bytearray()
    with mesh.start_request(
        "POST", env["NASP_TEST_HTTP_URL"], headers=[("x-a", "streamed")]
    ) as req:
        while len(sent) < total:
            part = chunk[: total - len(sent)]
            req.write(part, timeout=30)
            sent += part
        resp = req.finish(timeout=30)
        assert req.closed, "finish consumes the request"
    with resp:
        assert resp.status == 200
        assert resp.peer_id == env["NASP_TEST_SERVER_ID"]
        assert resp.header("x-peer") == env["NASP_TEST_CLIENT_ID"]
        got = bytearray()
        for part in resp:
            got += part
    assert len(got) == total
    assert got == sent


def test_streamed_upload_with_a_content_length(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    parts = [b"one ", b"\0two\0", b" three"]
    req = mesh.start_request(
        "PUT", env["NASP_TEST_HTTP_URL"], content_length=sum(map(len, parts))
    )
    for p in parts:
        req.write(p)
    req.write(b"")  # nothing to send, and no error
    with req.finish() as resp:
        assert resp.status == 200
        assert resp.read_all() == b"".join(parts)
    req.close()  # already consumed: nothing to do


def test_tcp_echo_through_the_mesh(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    payload = _pattern(200 * 1024) + b"\0"
    with mesh.connect(env["NASP_TEST_TCP"], timeout=30) as conn:
        assert conn.peer_id == env["NASP_TEST_SERVER_ID"]
        conn.sendall(payload, timeout=30)
        conn.shutdown_write(timeout=10)
        got = bytearray()
        while True:
            data = conn.recv(16 * 1024, timeout=30)
            if not data:
                break
            got += data
        assert bytes(got) == payload
        assert conn.recv(10, timeout=5) == b"", "EOF stays EOF"


def test_tcp_recv_into_a_buffer(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    with mesh.connect(env["NASP_TEST_TCP"]) as conn:
        conn.sendall(bytearray(b"into a buffer"))
        buf = bytearray(64)
        got = 0
        while got < len(b"into a buffer"):
            n = conn.recv_into(memoryview(buf)[got:], timeout=10)
            assert n > 0
            got += n
        assert bytes(buf[:got]) == b"into a buffer"


@pytest.fixture(scope="module")
def listener(mesh: nasp.Mesh, env: Dict[str, str]) -> Iterator[nasp.Listener]:
    """This mesh listening as ``c-server.demo`` (``NASP_TEST_SELF``)."""
    with mesh.listen(env["NASP_TEST_LISTEN"]) as ln:
        yield ln


class _Acceptor(threading.Thread):
    """``accept`` in a thread of its own (ctypes releases the GIL, so it
    blocks without stopping the test's thread)."""

    def __init__(self, listener: nasp.Listener, timeout: float) -> None:
        super().__init__(daemon=True)
        self.listener, self.timeout = listener, timeout
        self.conn: Optional[nasp.Connection] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.conn = self.listener.accept(timeout=self.timeout)
        except BaseException as e:  # handed to the test's thread
            self.error = e

    def result(self) -> nasp.Connection:
        self.join(60)
        assert not self.is_alive(), "accept did not return"
        if self.error is not None:
            raise self.error
        assert self.conn is not None
        return self.conn


def test_listen_and_accept_a_connection_from_the_same_mesh(
    mesh: nasp.Mesh, listener: nasp.Listener, env: Dict[str, str]
) -> None:
    assert listener.address == env["NASP_TEST_LISTEN"]
    acceptor = _Acceptor(listener, timeout=30)
    acceptor.start()
    with mesh.connect(env["NASP_TEST_SELF"], timeout=30) as client:
        with acceptor.result() as server:
            # Both ends are this workload, each verified by the other.
            assert server.peer_id == env["NASP_TEST_CLIENT_ID"]
            assert client.peer_id == env["NASP_TEST_CLIENT_ID"]
            assert server.peer_addr.count(":") >= 1, server.peer_addr
            client.sendall(b"ping\0from the client", timeout=10)
            got = b""
            while len(got) < len(b"ping\0from the client"):
                got += server.recv(64, timeout=10)
            assert got == b"ping\0from the client"
            server.sendall(b"pong from the server", timeout=10)
            server.shutdown_write()
            back = b""
            while True:
                data = client.recv(64, timeout=10)
                if not data:
                    break
                back += data
            assert back == b"pong from the server"


def test_a_thread_blocked_in_accept_does_not_block_the_others(
    mesh: nasp.Mesh, listener: nasp.Listener, env: Dict[str, str]
) -> None:
    acceptor = _Acceptor(listener, timeout=60)
    acceptor.start()
    # While the acceptor waits in the library, this thread makes requests
    # from several threads at once.
    results: List[int] = []
    errors: List[BaseException] = []

    def get() -> None:
        try:
            with mesh.request("GET", env["NASP_TEST_HTTP_URL"], timeout=30) as r:
                results.append(r.status)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == [200] * 4
    assert acceptor.is_alive(), "accept returned with no connection"
    with mesh.connect(env["NASP_TEST_SELF"], timeout=30):
        with acceptor.result() as server:
            assert server.peer_id == env["NASP_TEST_CLIENT_ID"]


def test_metrics_text_counts_requests(mesh: nasp.Mesh, env: Dict[str, str]) -> None:
    with mesh.request("GET", env["NASP_TEST_HTTP_URL"]) as resp:
        assert resp.status == 200
        resp.read_all()
    # The stats filter records a request when its stream ends, which may be
    # just after the body was read: poll with a deadline.
    deadline = time.monotonic() + 20
    while True:
        text = mesh.metrics_text()
        lines = [l for l in text.splitlines() if l.startswith("istio_requests_total{")]
        if any('reporter="source"' in l and 'response_code="200"' in l for l in lines):
            break
        assert time.monotonic() < deadline, f"no istio_requests_total for a 200 in:\n{text}"
        time.sleep(0.05)
