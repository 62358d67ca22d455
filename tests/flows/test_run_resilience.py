"""Runs that survive, in-process (Prefect's ephemeral API) on the tiny random Llama: the shard is not part of a
run's identity, scheduled runs over a growing dataset extract only new records, a transient failure is
retried by Prefect, a prompt that always fails becomes an `errors` row, an environment failing after all
retries stops the run and records nothing, token-budget batches bound memory, background commits change no
row and a failed one stops the run (kill -9, concurrent shard processes and Dask: tests/e2e/test_scale.py)."""

from __future__ import annotations

import json

import pytest

from blens.extract.config import ExtractConfig
from builders import blens_in_process
from blens.store.connect import connect
from tiny_runs import assert_complete, cfg_for, make_records, snapshot, write_records


def test_shard_is_not_part_of_run_identity(tiny_model_dir, data12):
    a = cfg_for(tiny_model_dir, data12, "wh", shard="0/3", batch_size=7, threads=None, device="cpu")
    b = cfg_for(tiny_model_dir, data12, "wh")
    assert a.result_settings() == b.result_settings()
    assert "shard" not in json.dumps(a.result_settings())


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

    cmd = ["serve", "--data", "cf.json", "--limit", "7", "--cron", "*/15 * * * *", "--dry-run"]
    r = blens_in_process(*cmd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["schedules"][0]["cron"] == "*/15 * * * *" and info["parameters"]["cfg"]["data"] == "cf.json"
    assert info["entrypoint"] == "blens.flows.serve.scheduled_extract" and info["parameters"]["cfg"]["limit"] == 7
    r = blens_in_process(*cmd[:-3], "--cron", "every hour", "--dry-run", cwd=tmp_path)
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
    import blens.run.commit as job
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
    import blens.run.extract as job
    from blens.flows.extract_flow import extract_flow

    real = job.compute_batch

    def poisoned(lm, prompts, **kw):
        if any(p.record.case_id == 1 for p in prompts):
            raise RuntimeError("CUDA error: an illegal memory access (injected)")
        return real(lm, prompts, **kw)

    monkeypatch.setattr(job, "compute_batch", poisoned)
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
    import blens.run.commit as job
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


def test_plan_cuts_long_prompts_into_smaller_batches(tiny_model_dir, tmp_path):
    """The batches a run executes respect --batch-tokens, so the longest prompts of a big run do not make
    its biggest batch (and its peak memory) larger than a small run's."""
    from blens.run.extract import plan_extract

    recs = make_records(40)
    for r in recs[::4]:  # a quarter of the prompts are several times longer
        r["prompt"] = "In the long and well documented history of the region, " * 3 + r["prompt"]
    data = write_records(tmp_path / "cf.json", recs)
    cfg = cfg_for(tiny_model_dir, data, tmp_path / "wh", batch_size=4, batch_tokens=64)
    batches = [[item.prompt for item in b] for b in plan_extract(cfg).batches]
    assert sum(len(b) for b in batches) == 40
    assert all(len(b) == 1 or _padded_tokens(b) <= 64 for b in batches)
    long = [b for b in batches if b[-1].n_tokens > 32]  # two of them would exceed 64 tokens
    assert len(long) == 10 and all(len(b) == 1 for b in long)
    assert max(p.n_tokens for b in batches for p in b if p.n_tokens <= 32) <= 16
    assert [len(b) for b in batches if b[-1].n_tokens <= 16] == [4] * 7 + [2]  # short ones fill batches


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
    import blens.run.commit as job
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
