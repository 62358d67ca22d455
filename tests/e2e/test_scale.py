"""Bulk extraction that survives: kill -9 + resume, concurrent shards, Dask workers, schedules, retries.

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

import pytest

from builders import ROOT
from builders import kill_session
from blens.extract.config import ExtractConfig
from blens.store.connect import connect

N_LAYERS, N_MATRICES, N_SITES = 3, 7, 3  # tiny Llama: MLP ff1, ff1_gate, ff2 + attn_q, _k, _v, _o; lens ff1_input, ff2_vjp, attn_vjp
SUBJECTS = [
    ("Danielle Darrieux", "English", "French"), ("Paris", "Italy", "France"), ("the Eiffel Tower", "Rome", "Paris"),
    ("Toko Yasuda", "piano", "guitar"), ("Madrid", "Sweden", "Spain"), ("Berlin", "Japan", "Germany"),
    ("Lionel Messi", "tennis", "football"), ("the Danube", "Asia", "Europe"), ("Marie Curie", "poetry", "physics"),
    ("Mount Fuji", "Chile", "Japan"), ("the Amazon river", "Africa", "America"), ("Ludwig van Beethoven",
                                                                                  "jazz", "classical"),
    ("Oslo", "Peru", "Norway"), ("Angela Merkel", "Canada", "Germany"),
]
TEMPLATES = ["{} is located in", "The home of {} is in", "People say that {} belongs to the country of"]


def make_records(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        s, t, g = SUBJECTS[i % len(SUBJECTS)]
        out.append({"case_id": i, "prompt": TEMPLATES[i % len(TEMPLATES)].format(s), "subject": s,
                    "target_new": t, "ground_truth": g})
    return out


def write_records(path: Path, recs: list[dict]) -> Path:
    path.write_text(json.dumps(recs))
    return path


def cfg_for(model_dir, data, wh, **kw) -> ExtractConfig:
    base = dict(model=str(model_dir), data=str(data), warehouse=str(wh), batch_size=1, top_k=5,
                lens_dtype="fp32", threads=1)
    return ExtractConfig(**{**base, **kw})


def snapshot(wh) -> dict[str, list]:
    """Sorted view rows without batch-dependent columns (batch_id, committed_at)."""
    con = connect(wh)
    q = {
        "prompts": "SELECT run_id, case_id, prompt, subject, target_new, target_true, n_tokens, round(loss, 5), "
                   "target_new_id, target_true_id FROM prompts ORDER BY ALL",
        "tokens": "SELECT run_id, case_id, position, token_id, token, segment FROM tokens ORDER BY ALL",
        "gradient_ranks": "SELECT run_id, case_id, layer, matrix, rank, n_tokens FROM gradient_ranks ORDER BY ALL",
        "projections": "SELECT run_id, case_id, layer, site, position, segment, round(norm, 4), top_ids, bottom_ids, "
                       "target_new_rank, target_true_rank FROM projections "
                       "ORDER BY run_id, case_id, layer, site, position",
    }
    out = {k: con.execute(v).fetchall() for k, v in q.items()}
    con.close()
    return out


def assert_complete(wh) -> int:
    """Every visible prompt has all its rows (tokens, ranks, projections); no (run, case) twice."""
    con = connect(wh)
    bad = con.execute(f"""
        SELECT p.case_id, p.n_tokens,
               (SELECT count(*) FROM tokens t WHERE t.run_id = p.run_id AND t.case_id = p.case_id) AS nt,
               (SELECT count(*) FROM gradient_ranks g WHERE g.run_id = p.run_id AND g.case_id = p.case_id) AS ng,
               (SELECT count(*) FROM projections x WHERE x.run_id = p.run_id AND x.case_id = p.case_id) AS nx
        FROM prompts p
        WHERE nt != p.n_tokens OR ng != {N_LAYERS * N_MATRICES} OR nx != p.n_tokens * {N_LAYERS * N_SITES}
    """).fetchall()
    assert bad == [], f"incomplete prompts visible: {bad}"
    dup = con.execute("SELECT run_id, case_id, count(*) FROM prompts GROUP BY ALL HAVING count(*) > 1").fetchall()
    assert dup == []
    n = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    con.close()
    return n


@pytest.fixture(scope="module")
def data12(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "cf12.json", make_records(12))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data12):
    """One clean, uninterrupted, single-process run over the 12 records."""
    from blens.flows.extract_flow import extract_flow

    wh = tmp_path_factory.mktemp("ref") / "wh"
    summary = extract_flow(cfg_for(tiny_model_dir, data12, wh))
    assert summary.n_extracted == 12 and summary.n_failed == 0
    assert assert_complete(wh) == 12
    return snapshot(wh)


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


def n_committed(wh: Path) -> int:
    """Prompts visible in the warehouse right now (read-only attach beside a running writer)."""
    if not (wh / "catalog.sqlite").exists():
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


def unlisted_prompt_files(wh: Path) -> list[Path]:
    """Parquet files of the prompts table on disk that no snapshot of the catalog lists."""
    on_disk = sorted((wh / "data" / "main" / "prompts").glob("*.parquet"))
    if not on_disk:
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
            "--top-k", "5", "--lens-dtype", "fp32", "--threads", "1"]

    # 1) killed right after a few batches committed.
    proc = start_cli(*args)
    wait_for(lambda: n_committed(wh) >= 2, proc, what="two committed batches")
    kill9(proc)
    n1 = assert_complete(wh)
    assert 1 <= n1 < 12

    # 2) resumed, then killed mid-commit: the batch's Parquet files written, its transaction not committed.
    proc = start_cli(*args, slow_writes=1.5)
    wait_for(lambda: unlisted_prompt_files(wh), proc, what="a half-committed batch")
    kill9(proc)
    assert unlisted_prompt_files(wh), "the kill should have left an uncommitted batch's files behind"
    n2 = assert_complete(wh)  # ... which no table shows
    assert n1 <= n2 < 12

    # 3) the same command again finishes the job: every prompt exactly once, equal to a clean run.
    r = subprocess.run([sys.executable, "-m", "blens.cli", "extract", *args], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
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
    n = 3
    logs = [open(tmp_path / f"shard{i}.log", "w+") for i in range(n)]
    procs = [start_cli("--model", str(tiny_model_dir), "--data", str(data12), "--warehouse", str(wh),
                       "--batch-size", "1", "--top-k", "5", "--lens-dtype", "fp32", "--threads", "1",
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


def test_shard_is_not_part_of_run_identity(tiny_model_dir, data12):
    a = cfg_for(tiny_model_dir, data12, "wh", shard="0/3", batch_size=7, threads=None, device="cpu")
    b = cfg_for(tiny_model_dir, data12, "wh")
    assert a.result_settings() == b.result_settings()
    assert "shard" not in json.dumps(a.result_settings())


# --- scale-out on Dask ------------------------------------------------------------------------------

def test_dask_two_workers_equal_single_process(tmp_path, tiny_model_dir, data12, reference):
    pytest.importorskip("prefect_dask")
    from blens.flows.extract_flow import run_extract

    wh = tmp_path / "wh"
    summary = run_extract(cfg_for(tiny_model_dir, data12, wh, workers=2))
    assert summary.n_extracted == 12 and summary.n_failed == 0
    assert snapshot(wh) == reference
    con = connect(wh)
    writers = con.execute("SELECT DISTINCT writer FROM commits WHERE kind = 'extract' AND n_keys > 0").fetchall()
    con.close()
    assert len(writers) == 2, f"both Dask worker processes should have written batches: {writers}"


# --- schedules: deployment definition and incremental runs ------------------------------------------

def test_deployment_has_cron_parameters_and_name(tmp_path):
    from blens.flows.serve import DEPLOYMENT_NAME, build_deployment

    cfg = ExtractConfig(data=str(tmp_path / "cf.json"), model="m", warehouse=str(tmp_path / "wh"), batch_size=4)
    dep = build_deployment(cfg, cron="0 * * * *")
    assert dep.name == DEPLOYMENT_NAME and dep.flow_name == "blens-scheduled-extract"
    assert [s.schedule.cron for s in dep.schedules] == ["0 * * * *"]
    params = dep.parameters["cfg"]
    assert {k: params[k] for k in ("data", "model", "warehouse", "batch_size")} == {
        "data": str(tmp_path / "cf.json"), "model": "m", "warehouse": str(tmp_path / "wh"), "batch_size": 4}
    assert dep.entrypoint == "blens.flows.serve.scheduled_extract"  # a module path: works from any directory
    assert dep.concurrency_limit == 1  # a slow tick never overlaps the next one

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "blens.cli", "serve", "--data", "cf.json", "--limit", "7", "--cron", "*/15 * * * *",
           "--dry-run"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["schedules"][0]["cron"] == "*/15 * * * *" and info["parameters"]["cfg"]["data"] == "cf.json"
    assert info["entrypoint"] == "blens.flows.serve.scheduled_extract" and info["parameters"]["cfg"]["limit"] == 7
    r = subprocess.run(cmd[:-3] + ["--cron", "every hour", "--dry-run"], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode != 0 and "not a valid cron expression" in r.stderr


def test_scheduled_run_over_grown_dataset_extracts_only_new_records(tmp_path, tiny_model_dir):
    from blens.flows.serve import scheduled_extract

    data, wh = tmp_path / "cf.json", tmp_path / "wh"
    params = dict(cfg=cfg_for(tiny_model_dir, data, wh, batch_size=2))
    write_records(data, make_records(4))
    first = scheduled_extract(**params)
    assert (first["n_extracted"], first["n_done_before"]) == (4, 0)

    write_records(data, make_records(7))  # the file grew by 3 records
    second = scheduled_extract(**params)
    assert (second["n_extracted"], second["n_done_before"]) == (3, 4)
    # each tick is a run of its own (provenance); what it adds is decided by content, not by the run

    third = scheduled_extract(**params)  # nothing new: nothing extracted
    assert (third["n_extracted"], third["n_done_before"]) == (0, 7)

    recs = make_records(7)
    recs[2]["target_new"] = "Moscow"  # an edited record is re-extracted; its new result supersedes the old
    write_records(data, recs)
    fourth = scheduled_extract(**params)
    assert (fourth["n_extracted"], fourth["n_done_before"]) == (1, 6)
    assert assert_complete(wh) == 7
    con = connect(wh)
    assert con.execute("SELECT target_new FROM prompts WHERE case_id = 2").fetchall() == [("Moscow",)]
    assert con.execute("SELECT count(*) FROM commits WHERE kind = 'extract' AND n_keys > 0").fetchone()[0] == 2 + 2 + 1
    assert con.execute("SELECT count(*) FROM supersessions").fetchone()[0] == 1
    assert con.execute("SELECT count(DISTINCT run_id) FROM prompts").fetchone()[0] == 3  # three ticks added rows
    con.close()


# --- retries and failures ----------------------------------------------------------------------------

def test_transient_batch_failure_is_retried_by_prefect(tmp_path, tiny_model_dir, monkeypatch):
    import blens.extract.job as job
    from blens.flows.extract_flow import extract_flow

    calls = {"n": 0, "failed": 0}
    real = job.commit_batch

    def flaky(root, tables, **kw):
        if kw.get("kind") == "extract":
            calls["n"] += 1
            if calls["n"] == 2:  # the second batch hits a transient I/O error once
                calls["failed"] += 1
                raise OSError(5, "transient I/O error (injected)")
        return real(root, tables, **kw)

    monkeypatch.setattr(job, "commit_batch", flaky)
    data = write_records(tmp_path / "cf.json", make_records(4))
    summary = extract_flow(cfg_for(tiny_model_dir, data, tmp_path / "wh", batch_size=2))
    assert calls["failed"] == 1 and calls["n"] == 3  # 2 batches + 1 retry
    assert (summary.n_extracted, summary.n_failed) == (4, 0)
    assert assert_complete(tmp_path / "wh") == 4
    con = connect(tmp_path / "wh")
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    con.close()


def test_prompt_that_always_fails_lands_in_errors_and_the_run_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    import blens.extract.job as job
    from blens.flows.extract_flow import extract_flow

    real = job.extract_batch

    def poisoned(lm, prompts, run_id, **kw):
        if any(p.record.case_id == 1 for p in prompts):
            raise RuntimeError("CUDA error: an illegal memory access (injected)")
        return real(lm, prompts, run_id, **kw)

    monkeypatch.setattr(job, "extract_batch", poisoned)
    data = write_records(tmp_path / "cf.json", make_records(5))
    summary = extract_flow(cfg_for(tiny_model_dir, data, tmp_path / "wh", batch_size=2))
    assert (summary.n_extracted, summary.n_failed) == (4, 1)
    con = connect(tmp_path / "wh")
    errs = con.execute("SELECT case_id, stage, field, message FROM errors").fetchall()
    assert len(errs) == 1 and errs[0][:3] == (1, "extract", "prompt") and "illegal memory access" in errs[0][3]
    assert sorted(r[0] for r in con.execute("SELECT case_id FROM prompts").fetchall()) == [0, 2, 3, 4]
    con.close()
    assert assert_complete(tmp_path / "wh") == 4


def test_environment_failing_after_all_retries_stops_the_run_and_records_nothing(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """Issue 13: a full disk is not a bad record. Prefect retries the batch; then the run fails, and no
    errors row says the record was skipped (so a rerun after recovery redoes it)."""
    import blens.extract.job as job
    from blens.flows.extract_flow import extract_flow

    real = job.commit_batch
    attempts = {"n": 0}

    def broken_for_case_3(root, tables, **kw):
        prompts = tables.get("prompts")
        if prompts is not None and 3 in prompts.column("case_id").to_pylist():
            attempts["n"] += 1
            raise OSError(28, "No space left on device (injected)")
        return real(root, tables, **kw)

    monkeypatch.setattr(job, "commit_batch", broken_for_case_3)
    data = write_records(tmp_path / "cf.json", make_records(4))
    with pytest.raises(OSError, match="No space left"):
        extract_flow(cfg_for(tiny_model_dir, data, tmp_path / "wh", batch_size=1))
    assert attempts["n"] == 3  # first try + retries=2
    con = connect(tmp_path / "wh")
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    assert 3 not in [r[0] for r in con.execute("SELECT case_id FROM prompts").fetchall()]
    con.close()


# --- memory bounds: batches cut by a token budget -----------------------------------------------------

def _padded_tokens(batch) -> int:
    return len(batch) * max(p.n_tokens for p in batch)


def test_token_budget_batches_bound_every_batch_and_pack_greedily():
    import random
    from types import SimpleNamespace

    from blens.extract.batching import token_budget_batches

    rng = random.Random(0)
    prompts = sorted((SimpleNamespace(n_tokens=rng.choice([3, 4, 5, 6, 9, 14, 25, 60])) for _ in range(300)),
                     key=lambda p: p.n_tokens)
    batches = token_budget_batches(prompts, batch_size=8, batch_tokens=40)
    assert [p for b in batches for p in b] == prompts  # order kept, nothing lost or repeated
    for b in batches:
        assert 1 <= len(b) <= 8
        assert len(b) == 1 or _padded_tokens(b) <= 40, [p.n_tokens for b in batches for p in b]
    assert [len(b) for b in batches if b[0].n_tokens == 60] == [1] * sum(p.n_tokens == 60 for p in prompts)
    for b, nxt in zip(batches, batches[1:]):  # greedy: the next prompt would not have fitted
        assert len(b) == 8 or (len(b) + 1) * max(nxt[0].n_tokens, b[-1].n_tokens) > 40
    # a budget that never binds gives plain chunks of batch_size
    chunks = token_budget_batches(prompts, batch_size=8, batch_tokens=10**6)
    assert [len(b) for b in chunks] == [8] * 37 + [4]


def test_plan_run_cuts_long_prompts_into_smaller_batches(tiny_model_dir, tmp_path):
    """The batches a run executes respect --batch-tokens, so the longest prompts of a big run do not make
    its biggest batch (and its peak memory) larger than a small run's."""
    from blens.extract.job import plan_run
    from blens.extract.models import cached_model

    recs = make_records(40)
    for r in recs[::4]:  # a quarter of the prompts are several times longer
        r["prompt"] = "In the long and well documented history of the region, " * 3 + r["prompt"]
    data = write_records(tmp_path / "cf.json", recs)
    cfg = cfg_for(tiny_model_dir, data, tmp_path / "wh", batch_size=4, batch_tokens=64)
    plan = plan_run(cfg, cached_model(cfg.model, cfg.device))
    assert sum(len(b) for b in plan.batches) == 40
    assert all(len(b) == 1 or _padded_tokens(b) <= 64 for b in plan.batches)
    long = [b for b in plan.batches if b[-1].n_tokens > 32]  # two of them would exceed 64 tokens
    assert len(long) == 10 and all(len(b) == 1 for b in long)
    assert max(p.n_tokens for b in plan.batches for p in b if p.n_tokens <= 32) <= 16
    assert [len(b) for b in plan.batches if b[-1].n_tokens <= 16] == [4] * 7 + [2]  # short ones fill batches


# --- the background committer (on by default on CUDA; forced on here) ---------------------------------

def test_background_commits_give_the_same_warehouse(tmp_path, tiny_model_dir, data12, reference):
    """Issue 16: committing batch k while batch k+1 computes changes no row."""
    from blens.flows.extract_flow import extract_flow

    summary = extract_flow(cfg_for(tiny_model_dir, data12, tmp_path / "wh", overlap=True))
    assert (summary.n_extracted, summary.n_failed) == (12, 0)
    assert assert_complete(tmp_path / "wh") == 12
    assert snapshot(tmp_path / "wh") == reference


def test_failed_background_commit_stops_the_run_and_nothing_after_it_is_committed(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    import blens.extract.job as job
    from blens.flows.extract_flow import extract_flow

    monkeypatch.setattr(job, "COMMIT_RETRY_DELAY_S", 0.0)
    real = job.commit_batch
    calls: list[tuple[int, ...]] = []

    def broken_for_case_3(root, tables, **kw):
        prompts = tables.get("prompts")
        ids = tuple(prompts.column("case_id").to_pylist()) if prompts is not None else ()
        calls.append(ids)
        if 3 in ids:
            raise OSError(28, "No space left on device (injected)")
        return real(root, tables, **kw)

    monkeypatch.setattr(job, "commit_batch", broken_for_case_3)
    data = write_records(tmp_path / "cf.json", make_records(6))
    with pytest.raises(OSError, match="No space left"):
        extract_flow(cfg_for(tiny_model_dir, data, tmp_path / "wh", overlap=True))
    first_bad = calls.index((3,))
    assert calls[first_bad:] == [(3,)] * (job.COMMIT_RETRIES + 1)  # retried, then nothing after it was tried
    con = connect(tmp_path / "wh")
    committed = sorted(r[0] for r in con.execute("SELECT case_id FROM prompts").fetchall())
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    con.close()
    assert committed == sorted(ids[0] for ids in calls[:first_bad])
    assert assert_complete(tmp_path / "wh") == len(committed)

