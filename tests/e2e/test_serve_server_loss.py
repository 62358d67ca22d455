"""Losing the Prefect server mid-run (issue 24): the flow run's process ends by itself (it used to retry
events at 35-65 % CPU, and outlive `blens serve` orphaned), and `blens serve` then stops on SIGTERM within
seconds, exit 0, one line, nothing left behind (it took 47 s and exited 143). A real `prefect server start`
of its own, killed with SIGKILL while a scheduled run extracts."""

from __future__ import annotations

import os
import signal
import time

import pytest

from blens.lifecycle.flow_run import SERVER_CHECK_INTERVAL_S, SERVER_LOST_AFTER
from prefect_serve import FLOW, api, run_until_logged, session, start_prefect_server, start_serve, stop, stop_prefect_server, write_records


@pytest.fixture
def doomed_server(tmp_path):
    """A `prefect server start` this test kills; yields (url, process)."""
    home = tmp_path / "server-home"
    home.mkdir()
    url, proc = start_prefect_server(home)
    yield url, proc
    stop_prefect_server(proc)


def test_losing_the_server_ends_the_flow_run_and_serve_stops_cleanly(doomed_server, tmp_path, tiny_model_dir):
    url, server = doomed_server
    name = "test-server-loss"
    write_records(tmp_path / "cf.json", 400)
    proc = start_serve(url, tmp_path, tiny_model_dir, name)
    try:
        dep = api(url, lambda c: c.read_deployment_by_name(f"{FLOW}/{name}"))
        cfg = {**dep.parameters["cfg"], "batch_size": 1}
        run_until_logged(url, dep, proc, cfg, "2/400 prompts", timeout=120)

        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait()
        deadline = time.monotonic() + SERVER_LOST_AFTER * SERVER_CHECK_INTERVAL_S + 30
        while len(session(proc.pid)) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(session(proc.pid)) == 1, f"the flow run outlived its server: {session(proc.pid)}"
        assert proc.poll() is None  # serve itself waits for the server to come back

        t0 = time.monotonic()
        n_before = len(proc.out.lines)  # Prefect's own warnings about the lost server come before the signal
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        out = proc.out.text()
        assert proc.returncode == 0 and took < 20, (proc.returncode, took, out[-3000:])
        assert "has not answered for" in out and "ending this flow run" in out, out[-3000:]  # the run's one line
        after = proc.out.lines[n_before:]
        said = [x for x in after if x.startswith("stopped serving")]
        assert len(said) == 1 and "unreachable" in said[0], out[-3000:]
        assert not any("Traceback" in x or "ERROR" in x for x in after), "\n".join(after)[-3000:]
        assert session(proc.pid) == []
    finally:
        if proc.poll() is None:
            stop(proc)
