"""Fixtures of the real-process tests: one `prefect server start` per module, shared by every test of the module
that schedules through `blens serve`. Per module, not per session: the server's loops cost CPU for as long as it
lives, and only test_serve.py uses it. A test whose subject is losing the server kills this one
(``prefect_server_process``); the next test that asks for ``prefect_server`` gets a new one."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from prefect_serve import start_prefect_server, stop_prefect_server


@dataclass
class PrefectServer:
    url: str
    proc: subprocess.Popen
    home: Path


@pytest.fixture(scope="module")
def prefect_server_process(tmp_path_factory):
    """The module's `prefect server start` on 127.0.0.1:<free port> with a fresh PREFECT_HOME (a PrefectServer:
    url, process); started again by ``prefect_server`` if a test killed it."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    server = PrefectServer(*start_prefect_server(home), home)
    yield server
    stop_prefect_server(server.proc)


@pytest.fixture
def prefect_server(prefect_server_process) -> str:
    """The module's server's API URL (a new server if the last one was killed)."""
    server = prefect_server_process
    if server.proc.poll() is not None:
        server.url, server.proc = start_prefect_server(server.home)
    return server.url
