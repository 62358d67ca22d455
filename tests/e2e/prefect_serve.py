"""Helpers for the tests that drive `blens serve` against a real `prefect server start` (a helper module,
not a test module; the session's shared server is the ``prefect_server`` fixture in this folder's conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builders import FACTS, ROOT, kill_session

FLOW = "blens-scheduled-extract"
NEVER = "0 0 1 1 *"  # once a year: runs come only from the test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without the Prefect settings conftest set for in-process tests (a quiet log level
    would keep run logs off the server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


# Server loops these tests never need (runs come from the test by hand, never from a schedule or a work pool):
# an idle `prefect server start` spent ~10 % of a core on them, on a 2-core box whose suite is CPU-bound.
# Kept: cancellation clean-up, the event persister and the task run recorder (states, logs, cancellation).
IDLE_SERVICES_OFF = {f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
                     for name in ("SCHEDULER", "LATE_RUNS", "FOREMAN", "REPOSSESSOR", "PAUSE_EXPIRATIONS", "TRIGGERS")}


def start_prefect_server(home: Path, timeout: float = 180) -> tuple[str, subprocess.Popen]:
    """A `prefect server start` on 127.0.0.1:<free port> with PREFECT_HOME=home, in a session of its own;
    returns (API URL, process) once /health answers, or skips saying why (a loaded 2-core machine: 90 s was
    not always enough, hence 180)."""
    import httpx

    port = free_port()
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", **IDLE_SERVICES_OFF),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc)
            pytest.skip(f"`prefect server start` did not answer within {timeout:.0f} s: "
                        f"{(home / 'server.log').read_text()[-500:]}")
        time.sleep(0.5)


def stop_prefect_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's session, SIGKILL it if it has not stopped within 20 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    kill_session(proc)


def api(url: str, fn):
    """Run ``fn(client)`` (a coroutine function) against the server at ``url``."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: url}):
        return asyncio.run(main())


class Lines:
    """A pipe read in a thread, every line kept (a full pipe never blocks the process)."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: [self.lines.append(x.rstrip("\n")) for x in pipe], daemon=True)
        self._thread.start()

    def text(self, timeout: float = 10.0) -> str:
        self._thread.join(timeout)
        return "\n".join(self.lines)


def start_serve(url: str, tmp_path: Path, model_dir, name: str, *extra: str) -> subprocess.Popen:
    """`blens serve` in a session of its own, from tmp_path (not the repository), SIGINT at its default."""
    cmd = [sys.executable, "-m", "blens.cli", "serve", "--data", "cf.json", "--model", str(model_dir), "--warehouse",
           "wh", "--cron", NEVER, "--name", name, "--threads", "1", "--top-k", "3", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "ph")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.out = Lines(proc.stdout)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 90
    while not any(line.startswith(f"serving {FLOW}/{name}") for line in proc.out.lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"blens serve did not start: {proc.out.text()[-3000:]}")
        time.sleep(0.2)
    return proc


def session(sid: int) -> list[str]:
    """Live processes of session ``sid`` (every descendant of `blens serve`: a flow run leaves the process
    group, never the session)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            head, tail = (d / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        state, _ppid, _pgrp, sess = tail.split()[:4]
        if int(sess) == sid and state != "Z":
            found.append(f"{d.name}: {head.split('(', 1)[1]}")
    return found


stop = kill_session  # kept under this module's name


def wait_for_state(url: str, run_id, done, timeout: float = 100.0):
    deadline = time.monotonic() + timeout
    while True:
        run = api(url, lambda c: c.read_flow_run(run_id))
        if done(run.state) or time.monotonic() > deadline:
            return run
        time.sleep(1)


def run_logs(url: str, run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = api(url, lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))
    return [log.message for log in logs]


def write_records(path: Path, n: int) -> None:
    path.write_text(json.dumps([{"case_id": i, "prompt": FACTS[i % 5][1], "subject": FACTS[i % 5][2],
                                 "target_new": FACTS[i % 5][3], "ground_truth": FACTS[i % 5][4]} for i in range(n)]))


def run_until_logged(url: str, dep, proc: subprocess.Popen, cfg: dict, line: str, timeout: float):
    """Trigger a run of deployment ``dep`` with ``cfg`` and wait (at most ``timeout`` s, while `blens serve`
    lives) until a run log line starts with ``line``; then `blens serve` and the run's process are both alive."""
    run = api(url, lambda c: c.create_flow_run_from_deployment(dep.id, parameters={"cfg": cfg}))
    deadline = time.monotonic() + timeout
    while not any(m.startswith(line) for m in run_logs(url, run.id)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.out.text(0)[-3000:]
        time.sleep(1)
    assert len(session(proc.pid)) >= 2  # blens serve and the flow run's process
    return run
