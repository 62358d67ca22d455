"""Bulk extraction that survives, with real processes: kill -9 + resume, concurrent shards (Dask workers: a
running cluster that loses a worker, equal to a single-process run, in test_dask_cluster.py; a local cluster's two
workers both writing, in test_process_hygiene.py; schedules, retries, token budgets and background commits
in-process: tests/flows/test_run_resilience.py).

Everything runs on the tiny random Llama (`tiny_model_dir`) with one torch thread; runs compared
row for row use batch size 1 like the reference (padding in a bigger batch changes float32 results in
the 7th digit, enough to move a near-tied target rank by one). Subprocesses are real `blens extract` CLIs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from builders import ROOT, blens_in_process, kill_session
from blens.store.connect import connect
from tiny_runs import assert_complete, snapshot

# --- subprocess helpers ---------------------------------------------------------------------------

# A `blens extract` whose every table insert inside a commit is followed by a pause: it widens the window in
# which a batch's Parquet files exist but its transaction has not committed, so a kill -9 can land there.
SLOW_WRITES = """
import sys, time
import blens.store.writer as writer
_insert = writer._insert
def _slow(*args, **kwargs):
    _insert(*args, **kwargs)
    time.sleep({pause})
writer._insert = _slow
from blens.cli import app
sys.argv[0] = "blens"
app()
"""


def start_cli(*args, slow_writes: float | None = None, log=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    entry = ["-m", "blens.cli"] if slow_writes is None else ["-c", SLOW_WRITES.format(pause=slow_writes)]
    # Own session: kill -9 reaches the whole group, including Prefect's ephemeral API server.
    return subprocess.Popen([sys.executable, *entry, "extract", *args], cwd=ROOT, env=env,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            start_new_session=True, text=True)


kill9 = kill_session  # kept under this module's name


def wait_for(pred, proc, timeout=180.0, what=""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}: {proc.stderr and proc.stderr.read()}")
        time.sleep(0.05)
    kill9(proc)
    raise AssertionError(f"timed out waiting for {what}")


def prompt_files(wh: Path) -> int:
    """Parquet files of the prompts table on disk: a cheap first look before opening the catalog (each attach
    costs ~0.1 s of CPU, and these waits poll)."""
    return len(list((wh / "data" / "main" / "prompts").glob("*.parquet")))


def n_committed(wh: Path, at_least: int = 1) -> int:
    """Prompts visible in the warehouse right now (read-only attach beside a running writer); 0 without opening
    the catalog while fewer than ``at_least`` prompt files exist (one per committed batch at batch size 1)."""
    if not (wh / "catalog.sqlite").exists() or prompt_files(wh) < at_least:
        return 0
    try:
        con = connect(wh)
    except Exception:  # noqa: BLE001 - the writer is still creating the lake
        return 0
    try:
        return con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    except Exception:  # noqa: BLE001 - tables not created yet
        return 0
    finally:
        con.close()


def unlisted_prompt_files(wh: Path, more_than: int = 0) -> list[Path]:
    """Parquet files of the prompts table on disk that no snapshot of the catalog lists (not looked for, without
    opening the catalog, while there are no more than ``more_than`` files)."""
    on_disk = sorted((wh / "data" / "main" / "prompts").glob("*.parquet"))
    if len(on_disk) <= more_than:
        return []
    con = connect(wh)
    try:
        listed = {r[0] for r in con.execute("SELECT path FROM __ducklake_metadata_lake.ducklake_data_file").fetchall()}
    finally:
        con.close()
    return [p for p in on_disk if p.name not in listed and str(p) not in listed]


# --- kill -9 and resume ---------------------------------------------------------------------------

def test_kill9_anywhere_then_resume_gives_one_clean_run(tmp_path, tiny_model_dir, data12, reference):
    wh = tmp_path / "wh"
    args = ["--model", str(tiny_model_dir), "--data", str(data12), "--warehouse", str(wh), "--batch-size", "1",
            "--top-k", "5", "--threads", "1"]

    # 1) killed right after a few batches committed.
    proc = start_cli(*args)
    wait_for(lambda: n_committed(wh, at_least=2) >= 2, proc, what="two committed batches")
    kill9(proc)
    n1 = assert_complete(wh)
    assert 1 <= n1 < 12

    # 2) resumed, then killed mid-commit: the batch's Parquet files written, its transaction not committed.
    proc = start_cli(*args, slow_writes=1.5)
    files_before = prompt_files(wh)  # a new batch's files appear first, then (1.5 s per insert later) its commit
    wait_for(lambda: unlisted_prompt_files(wh, more_than=files_before), proc, what="a half-committed batch")
    kill9(proc)
    assert unlisted_prompt_files(wh), "the kill should have left an uncommitted batch's files behind"
    n2 = assert_complete(wh)  # ... which no table shows
    assert n1 <= n2 < 12

    # 3) the same command again finishes the job: every prompt exactly once, equal to a clean run.
    r = blens_in_process("extract", *args, cwd=ROOT)  # (the resume itself needs no process of its own)
    assert r.returncode == 0, r.stderr
    assert f"{n2} record(s) already in the warehouse (skipped), {12 - n2} to go" in r.stderr
    assert assert_complete(wh) == 12
    assert snapshot(wh) == reference
    con = connect(wh)
    assert con.execute("SELECT count(DISTINCT run_id) FROM runs").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    con.close()


# --- concurrent shards ------------------------------------------------------------------------------

def readable_log(text: str, limit: int = 6000) -> str:
    """A failed shard's log without native stack frames, so DuckDB's own assertion line survives the cut."""
    lines = [ln for ln in text.splitlines() if not re.search(r"\(\+0x[0-9a-f]+\)|\[0x[0-9a-f]+\]$", ln)]
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def test_concurrent_shards_equal_one_run(tmp_path, tiny_model_dir, data12, reference):
    wh = tmp_path / "wh"
    n = 2  # two shards at once: the race on one warehouse is the subject, not how many
    logs = [open(tmp_path / f"shard{i}.log", "w+") for i in range(n)]
    procs = [start_cli("--model", str(tiny_model_dir), "--data", str(data12), "--warehouse", str(wh),
                       "--batch-size", "1", "--top-k", "5", "--threads", "1",
                       "--shard", f"{i}/{n}", log=logs[i]) for i in range(n)]
    try:
        rcs = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill9(p)
    for i, (rc, log) in enumerate(zip(rcs, logs)):
        log.seek(0)
        assert rc == 0, f"shard {i}: {readable_log(log.read())}"

    assert assert_complete(wh) == 12
    assert snapshot(wh) == reference
    # Every key once in the table itself (no view de-duplicates), each shard's batches committed.
    con = connect(wh)
    assert con.execute("SELECT count(*), count(DISTINCT key), count(DISTINCT case_id) FROM prompts").fetchone() == (
        12, 12, 12)
    assert con.execute("SELECT count(DISTINCT writer) FROM commits WHERE kind = 'extract' AND n_keys > 0"
                       ).fetchone()[0] == n
    # One run id for all shards: the run row is registered once (the first shard's).
    runs = con.execute("SELECT run_id, config_json FROM runs").fetchall()
    assert len(runs) == 1 and json.loads(runs[0][1])["shard"] in [f"{i}/{n}" for i in range(n)]
    con.close()
