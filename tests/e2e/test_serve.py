"""`blens serve` against a real Prefect server on loopback (issue 15): what a user sees when scheduling.

A `prefect server start` (the same Prefect as ours, a fresh PREFECT_HOME, a free port) serves the whole
module. Then a real `blens serve` subprocess, started in a session of its own from another directory
(the deployment's entrypoint must not depend on it), with the tiny random Llama:

- `prefect deployment ls` works (it failed with 422 when FastAPI >= 0.151 met Prefect 3.8's client) and
  lists the deployment; its entrypoint is a module path;
- a run triggered on the server extracts `--limit` records into the warehouse, and its log lines (progress
  and the summary) are on the server;
- SIGTERM during a second, long run: exit 0 within seconds with one line, the run cancelled on the server
  (not left Running), the schedule paused, no process of the session left;
- Ctrl-C (SIGINT to the whole process group, as a terminal sends it): the same clean exit;
- losing the server mid-run (SIGKILL): the flow run ends by itself and serve then stops cleanly (last: it kills
  the module's server).

And the reason a cancelled run used to go on for 30 s: DuckDB turns a signal's exception into an ordinary
RuntimeError, which Prefect retried (`termination_kept` restores the signal).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefect_serve import (FLOW, api, clean_env, run_logs, run_until_logged, session, start_serve, stop, wait_for_state,
                           write_records)
from blens.lifecycle.flow_run import SERVER_CHECK_INTERVAL_S, SERVER_LOST_AFTER
from blens.commands.serve import STOP_GRACE_S
from blens.store.connect import connect

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

def assert_clean_exit(proc: subprocess.Popen, sig: signal.Signals, t0: float) -> None:
    try:
        proc.wait(timeout=STOP_GRACE_S + 15)  # a hang guard, not a speed target (~4 s at load 4, 26 s seen at ~8)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"blens serve did not stop within {STOP_GRACE_S + 15:.0f} s of {sig.name}")
    print(f"blens serve stopped {time.monotonic() - t0:.1f} s after {sig.name}")
    out = proc.out.text()
    assert proc.returncode == 0, (proc.returncode, out[-3000:])  # 128 + signal if the stop overran its grace
    # Run logs (INFO lines) come before; after the signal exactly one line of ours, no traceback or error.
    said = [x for x in out.splitlines() if x.startswith("stopped serving") or "Traceback" in x or "ERROR" in x
            or "Error" in x or "Warning" in x]
    assert len(said) == 1 and said[0].startswith(f"stopped serving {FLOW}/") and f"({sig.name})" in said[0], out[-3000:]
    deadline = time.monotonic() + 10
    while session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session(proc.pid) == [], "processes left behind"


def test_serve_runs_logs_and_stops_on_sigterm(prefect_server, tmp_path, tiny_model_dir):
    url, name = prefect_server, "test-serve"
    write_records(tmp_path / "cf.json", 5)
    proc = start_serve(url, tmp_path, tiny_model_dir, name, "--limit", "3", "--batch-size", "2")
    try:
        ls = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], capture_output=True, text=True,
                            env=clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "ph"), COLUMNS="200"),
                            timeout=120)
        assert ls.returncode == 0 and f"{FLOW}/{name}" in ls.stdout, ls.stdout + ls.stderr
        dep = api(url, lambda c: c.read_deployment_by_name(f"{FLOW}/{name}"))
        assert dep.entrypoint == "blens.flows.serve.scheduled_extract" and not dep.paused

        run = api(url, lambda c: c.create_flow_run_from_deployment(dep.id))
        run = wait_for_state(url, run.id, lambda s: s.is_final())
        assert run.state.is_completed(), (run.state, proc.out.text(0)[-3000:])
        con = connect(tmp_path / "wh")
        assert con.execute("SELECT case_id FROM prompts ORDER BY case_id").fetchall() == [(0,), (1,), (2,)]  # --limit 3
        con.close()
        deadline = time.monotonic() + 20  # logs reach the server in batches
        logs = run_logs(url, run.id)
        while not any("3 new prompts extracted" in m for m in logs):
            assert time.monotonic() < deadline, logs
            time.sleep(1)
            logs = run_logs(url, run.id)
        assert any(m.startswith("3 prompts to do") for m in logs) and any(m.startswith("3/3 prompts") for m in logs)

        # A long second run (400 records, one per batch), stopped by SIGTERM while it extracts.
        write_records(tmp_path / "cf.json", 400)
        cfg = {**dep.parameters["cfg"], "limit": None, "batch_size": 1}
        long_run = run_until_logged(url, dep, proc, cfg, "2/397 prompts", timeout=90)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert_clean_exit(proc, signal.SIGTERM, t0)
    finally:
        if proc.poll() is None:
            stop(proc)
    long_run = wait_for_state(url, long_run.id, lambda s: not s.is_running(), timeout=10)
    assert long_run.state.type.value in ("CANCELLED", "CRASHED"), long_run.state  # never left Running
    assert api(url, lambda c: c.read_deployment_by_name(f"{FLOW}/{name}")).paused  # no runs pile up unserved


def test_ctrl_c_stops_serve_cleanly(prefect_server, tmp_path, tiny_model_dir):
    write_records(tmp_path / "cf.json", 2)
    proc = start_serve(prefect_server, tmp_path, tiny_model_dir, "test-ctrl-c")
    try:
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert_clean_exit(proc, signal.SIGINT, t0)
    finally:
        if proc.poll() is None:
            stop(proc)


def test_a_sigterm_that_duckdb_turns_into_an_error_still_ends_the_task(monkeypatch):
    """Prefect's in-flow SIGTERM handler (our quiet version) raises TerminationSignal; landing inside a DuckDB
    query it came out as RuntimeError("Query interrupted"), a task failure that Prefect retries."""
    import duckdb
    from prefect.exceptions import TerminationSignal
    from prefect.utilities import engine

    from blens.lifecycle import prefect as prefect_env
    from blens.lifecycle import signals

    monkeypatch.setattr(signals, "termination_hooks", [])  # no CLI exit watchdog in the test process
    monkeypatch.setattr(signals, "_terminating", [])
    assert prefect_env.quiet_sigterm_bridge()
    previous = signal.signal(signal.SIGTERM, engine._prefect_sigterm_handler)
    try:
        con = duckdb.connect()
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(TerminationSignal) as caught:
            with signals.termination_kept():
                con.execute("SELECT count(*) FROM range(100000000000)").fetchall()  # minutes of work
        timer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
        logging.disable(logging.NOTSET)  # the handler silenced logging, as it does in a run
    assert caught.value.signal == signal.SIGTERM
    context = caught.value.__context__
    assert context is None or "interrupted" in str(context).lower(), repr(context)


def test_a_signal_that_duckdb_drops_still_ends_the_task(monkeypatch):
    """Landing in a DuckLake COMMIT, a signal handler's exception was dropped altogether: the task returned
    normally and the run went on until the exit watchdog. The recorded signal ends the task anyway, with the
    exception its handler raised (Prefect's for SIGTERM in a flow, the CLI's own for Ctrl-C)."""
    from prefect.exceptions import TerminationSignal

    from blens.lifecycle import signals
    from blens.lifecycle.signals import Interrupted

    monkeypatch.setattr(signals, "_terminating", [])
    with signals.termination_kept():
        pass  # no signal: a normal return stays one
    for exc in (TerminationSignal(signal=signal.SIGTERM), Interrupted(signal.SIGINT)):
        monkeypatch.setattr(signals, "_terminating", [])
        signals.termination_raised(exc)
        with pytest.raises(type(exc)) as caught:
            with signals.termination_kept():
                done = True  # the body finished: its handler's exception never reached Python
        assert done and caught.value is exc


def test_losing_the_server_ends_the_flow_run_and_serve_stops_cleanly(prefect_server, prefect_server_process, tmp_path,
                                                                    tiny_model_dir):
    """Losing the Prefect server mid-run (issue 24): the flow run's process ends by itself (it used to retry
    events at 35-65 % CPU, and outlive `blens serve` orphaned), and `blens serve` then stops on SIGTERM within
    seconds, exit 0, one line, nothing left behind (it took 47 s and exited 143). The module's server is killed
    with SIGKILL while a scheduled run extracts (last in the module; a later test would get a new server)."""
    url, server = prefect_server, prefect_server_process.proc
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
