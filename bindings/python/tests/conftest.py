"""What the tests share: the test environment the Rust runner
(``crates/nasp-ffi/tests/python.rs``) exports from its fixture, and a mesh
joined from it.

The variables (all required: a test that needs them fails, never skips,
when one is missing, so a run without the fixture cannot pass quietly):

- ``NASP_TEST_CONFIG``: the path of a YAML config file
  (``docs/ffi-design.md`` section 3.4) that joins the fixture's control
  plane as ``demo/c-client``.
- ``NASP_TEST_HTTP_URL``: an echo service URL (``http://echo.demo:18080/py``):
  answers with the caller's verified id in ``x-peer``, the count of ``x-a``
  request headers in ``x-a-count``, ``set-cookie: a=1`` and
  ``set-cookie: b=2``, and the request body echoed.
- ``NASP_TEST_TCP``: a TCP echo target (``echo.demo:19000``): echoes bytes
  and answers a half-close with one.
- ``NASP_TEST_LISTEN``: an ``ip:port`` this workload may listen on, which
  the mesh knows as ``NASP_TEST_SELF`` (``c-server.demo:19100``).
- ``NASP_TEST_SERVER_ID``, ``NASP_TEST_CLIENT_ID``: the echo workload's and
  this workload's SPIFFE ids.

``NASP_LIBRARY`` (the ``libnasp_ffi.so`` to load) is read by the package
itself; ``NASP_TEST_HEADER`` (optional) by ``test_errors.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator

import pytest

import nasp

REQUIRED = (
    "NASP_TEST_CONFIG",
    "NASP_TEST_HTTP_URL",
    "NASP_TEST_TCP",
    "NASP_TEST_LISTEN",
    "NASP_TEST_SELF",
    "NASP_TEST_SERVER_ID",
    "NASP_TEST_CLIENT_ID",
)


@pytest.fixture(scope="session")
def env() -> Dict[str, str]:
    """The ``NASP_TEST_*`` variables; fails the test naming the missing ones."""
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        pytest.fail(
            "missing test environment: "
            + ", ".join(missing)
            + " (run through `cargo nextest run -p nasp-ffi --test python`, which "
            "starts the control plane and the echo workload and sets them)",
            pytrace=False,
        )
    config = Path(os.environ["NASP_TEST_CONFIG"])
    if not config.is_file():
        pytest.fail(f"NASP_TEST_CONFIG={config} is not a file", pytrace=False)
    return {name: os.environ[name] for name in REQUIRED}


@pytest.fixture(scope="session")
def config_text(env: Dict[str, str]) -> str:
    """The YAML config that joins the fixture's mesh."""
    return Path(env["NASP_TEST_CONFIG"]).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def mesh(config_text: str) -> Iterator[nasp.Mesh]:
    """One mesh joined for the whole session (joining costs a key pair, a
    CSR and an xDS round trip); tests that close or shut down a mesh make
    their own."""
    with nasp.Mesh.from_config(config_text) as m:
        yield m
