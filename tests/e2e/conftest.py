"""Fixtures of the real-process tests: one `prefect server start` per module, shared by every test of the module
that schedules through `blens serve` (a test that kills its server starts its own: test_serve_server_loss). Per
module, not per session: the server's loops cost CPU for as long as it lives, and only test_serve.py uses it."""

from __future__ import annotations

import pytest

from prefect_serve import start_prefect_server, stop_prefect_server


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A `prefect server start` on 127.0.0.1:<free port>, a fresh PREFECT_HOME; yields its API URL."""
    url, proc = start_prefect_server(tmp_path_factory.mktemp("prefect-server-home"))
    yield url
    stop_prefect_server(proc)
