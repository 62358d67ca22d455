"""`blens extract --dask-scheduler ADDRESS` on a Dask cluster somebody else started (issue 26).

A real cluster on loopback, started by the test as an operator following docs/scale.md would: a `prefect server`
for the task states, one `dask scheduler` and two `dask worker` processes from our venv (one thread each). A real
`blens extract` process submits its batches there. One worker is killed with SIGKILL while batches are
running: Dask reschedules its tasks on the other worker, and content keys make a retried batch idempotent, so
every key lands exactly once, and the rows equal those of a single-process run of the same records and batches
(the fan-out schedule is the one `--workers N` uses on a local cluster: only who starts the cluster differs, so
this also stands for the local one; that both local workers write batches is checked in
test_process_hygiene.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import ROOT, blens_in_process
from prefect_serve import free_port, start_prefect_server, stop_prefect_server
from blens.store.connect import connect
from tiny_runs import extract_writers, make_records, snapshot, write_records

N = 48
DONE = re.compile(r"^extract: (\d+)/(\d+) prompts")  # the CLI's progress line per batch on a non-terminal


def _venv_tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    if not tool.exists():
        pytest.skip(f"{tool} is not installed (the 'dask' extra)")
    return str(tool)


@pytest.fixture
def cluster(tmp_path):
    """docs/scale.md's recipe on loopback: a Prefect server, a scheduler and two single-threaded workers, the
    workers with ``PREFECT_API_URL`` (without it each worker starts an ephemeral API of its own); yields
    (address, [worker processes], API URL)."""
    pytest.importorskip("prefect_dask")
    dask = _venv_tool("dask")
    home = tmp_path / "prefect-server"
    home.mkdir()
    api_url, server = start_prefect_server(home)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PREFECT_API_URL=api_url)
    logs = tmp_path / "cluster"
    logs.mkdir()
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"),
                              start_new_session=True)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--no-nanny", "--name", f"w{i}", "--dashboard-address", ":0"],
                                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(logs / f"worker{i}.log", "w"), start_new_session=True))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, procs[1:], api_url
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        stop_prefect_server(server)


def test_an_existing_cluster_that_loses_a_worker_keeps_every_key_once(cluster, tmp_path, tiny_model_dir):
    address, workers, api_url = cluster
    data = write_records(tmp_path / "cf.json", make_records(N))
    wh = tmp_path / "wh"
    args = ["extract", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "2", "--threads", "1",
            "--top-k", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "blens.cli", *args, "--warehouse", str(wh), "--dask-scheduler", address],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=api_url), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(l.rstrip("\n") for l in proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not (any((m := DONE.match(l)) and int(m.group(1)) >= 6 for l in list(lines)) and extract_writers(wh) >= 2):
            assert proc.poll() is None, f"blens extract ended early (rc={proc.returncode}): {lines[-30:]}"
            assert time.monotonic() < deadline, f"never got busy on both workers: {lines[-30:]}"
            time.sleep(0.5)
        # Both workers have committed batches (so the one killed was working), and most batches are still to run:
        # a worker lost mid-run, whose running and held tasks move to the other.
        done_at_kill = max(int(m.group(1)) for m in map(DONE.match, list(lines)) if m)
        os.killpg(workers[0].pid, signal.SIGKILL)
        assert done_at_kill < N, "the run ended before a worker could be lost: nothing was tested"
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    reader.join(10)
    assert proc.returncode == 0, "\n".join(lines[-40:])
    con = connect(wh)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT key), count(DISTINCT case_id) FROM prompts"
                           ).fetchone() == (N, N, N)
        assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
        per_key = con.execute("SELECT max(c) FROM (SELECT count(*) AS c FROM gradient_ranks "
                              "GROUP BY case_id, layer, matrix)").fetchone()[0]
        assert per_key == 1, "a gradient rank row was written twice"
    finally:
        con.close()
    assert extract_writers(wh) == 2, "both workers committed batches (the lost one before it was killed)"

    # The same records and batches in this process (no Dask): the same rows (the run id aside: it hashes the config).
    single = blens_in_process(*args, "--warehouse", str(tmp_path / "single"), cwd=ROOT)
    assert single.returncode == 0, single.stderr
    on_cluster, in_process = snapshot(wh), snapshot(tmp_path / "single")
    assert {t: [r[1:] for r in rows] for t, rows in on_cluster.items()} == \
        {t: [r[1:] for r in rows] for t, rows in in_process.items()}
