"""Issue 2, test 5: the Prefect flow really runs (ephemeral API), the views answer, bad records land in
`errors`, and the CLI fails cleanly on a missing data path, an unknown model or an unwritable warehouse."""

from __future__ import annotations

import json
import os

import pytest

from builders import FACTS, ROOT, blens_in_process
from blens.extract.config import ExtractConfig
from blens.store.connect import connect


def bad_and_good_records(path):
    good = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g}
            for c, p, s, t, g in FACTS]
    bad = [
        {"case_id": 100, "prompt": "Missing its target", "subject": "Missing", "ground_truth": "x"},
        {"case_id": 101, "prompt": "An empty target", "subject": "empty", "target_new": "  ", "ground_truth": "x"},
        {"case_id": 102, "prompt": "word " * 200, "subject": "word", "target_new": "long", "ground_truth": "x"},
    ]
    path.write_text(json.dumps(good + bad))
    return path


def test_flow_runs_writes_views_and_errors(tmp_path, tiny_model_dir):
    from blens.flows.extract_flow import extract_flow

    data = bad_and_good_records(tmp_path / "cf.json")
    wh = tmp_path / "wh"
    cfg = ExtractConfig(model=str(tiny_model_dir), data=str(data), warehouse=str(wh), batch_size=2,
                        vectors="spanning")
    summary = extract_flow(cfg)
    assert summary.n_extracted == len(FACTS)
    assert summary.n_skipped == 3

    con = connect(wh)
    assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == len(FACTS)
    errs = {r[0]: r[1] for r in con.execute("SELECT case_id, field FROM errors").fetchall()}
    assert errs == {100: "target_new", 101: "target_new", 102: "prompt"}
    rel = con.execute("SELECT layer, matrix, n, rate FROM rank_equals_length WHERE matrix LIKE 'ff%' "
                      "ORDER BY layer, matrix").fetchall()
    assert [r[:3] for r in rel] == [(l, m, len(FACTS)) for l in range(3) for m in ("ff1", "ff1_gate", "ff2")]
    attn = con.execute("SELECT DISTINCT matrix FROM rank_equals_length WHERE matrix LIKE 'attn%' ORDER BY 1").fetchall()
    assert [m for m, in attn] == ["attn_k", "attn_o", "attn_q", "attn_v"]
    assert all(r[3] == 1.0 for r in rel if r[0] < 2) and all(r[3] == 0.0 for r in rel if r[0] == 2)
    n_tokens = con.execute("SELECT sum(n_tokens) FROM prompts").fetchone()[0]
    assert con.execute("SELECT count(*) FROM projections").fetchone()[0] == n_tokens * 3 * 3  # 3 layers x 3 lens sites
    assert con.execute("SELECT count(*) FROM vectors").fetchone()[0] == n_tokens * 3 * 2
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == n_tokens
    assert con.execute("SELECT count(DISTINCT segment) FROM tokens").fetchone()[0] == 3
    for view in ("target_rank_by_layer", "vjp_norm_by_segment", "runs"):
        assert con.execute(f"SELECT count(*) FROM {view}").fetchone()[0] > 0
    run = con.execute("SELECT model, model_revision, config_json FROM runs").fetchone()
    assert run[0] == str(tiny_model_dir) and json.loads(run[2])["vectors"] == "spanning"

    # Same command again: resume finds everything done and adds no row.
    again = extract_flow(cfg)
    assert again.n_extracted == 0 and again.n_done_before == len(FACTS)
    assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == len(FACTS)
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 3


def blens(*args, cwd=ROOT):
    return blens_in_process(*args, cwd=cwd)


def test_cli_extract_then_sql(tmp_path, tiny_model_dir):
    data = bad_and_good_records(tmp_path / "cf.json")
    wh = tmp_path / "wh"
    r = blens("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh),
              "--batch-size", "4", "--top-k", "5")
    assert r.returncode == 0, r.stderr
    assert "3 record(s) skipped" in r.stderr
    r = blens("sql", "SELECT layer, matrix, rate FROM rank_equals_length ORDER BY layer, matrix", "--warehouse",
              str(wh), "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 * 7 and rows[-1]["rate"] == 0.0  # 3 layers x (3 MLP + 4 attention matrices); last: ff2
    r = blens("sql", "SELECT len(top_ids) AS k FROM projections LIMIT 1", "--warehouse", str(wh), "--format", "csv")
    assert r.stdout.splitlines() == ["k", "5"]
    r = blens("sql", "COPY prompts TO 'x.csv'", "--warehouse", str(wh))
    assert r.returncode != 0 and "read-only" in r.stderr


@pytest.mark.parametrize("case", ["missing-data", "unknown-model", "unwritable-warehouse"])
def test_cli_fails_with_one_clear_line(tmp_path, tiny_model_dir, case):
    data = bad_and_good_records(tmp_path / "cf.json")
    wh = tmp_path / "wh"
    args = {"--model": str(tiny_model_dir), "--data": str(data), "--warehouse": str(wh)}
    if case == "missing-data":
        args["--data"] = str(tmp_path / "nope.json")
    elif case == "unknown-model":
        args["--model"] = "no-such-org/no-such-model-xyz"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        args["--warehouse"] = str(locked / "wh")
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a regular file
            (tmp_path / "afile").write_text("")
            args["--warehouse"] = str(tmp_path / "afile" / "wh")
    r = blens("extract", *[x for kv in args.items() for x in kv])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    expected = {"missing-data": "data path not found", "unknown-model": "cannot load model",
                "unwritable-warehouse": "not writable"}[case]
    assert expected in lines[0]
    assert not (wh / "prompts").exists()


def test_unsupported_architecture_names_supported_families():
    from transformers import BertConfig

    from blens.extract.adapters import UnsupportedModelError, family_for

    with pytest.raises(UnsupportedModelError, match="supported model_types are .*gpt2.*llama"):
        family_for(BertConfig())


def test_fanned_out_keeps_a_window_in_flight_and_yields_the_first_result_before_the_last_submission():
    """A fanned-out run submits batches a window at a time (``flows.schedules.fanned_out``): with one worker
    thread at most 2 * 1 + 2 batches are submitted and not yet handed back, the first result comes back while
    most batches are still unsubmitted (400 batches submitted up front kept the first progress line back 40 s),
    and every batch comes back exactly once. A real flow on Prefect's thread pool stands in for Dask."""
    import threading

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from blens.flows.schedules import fanned_out

    lock = threading.Lock()
    submitted: list[int] = []

    @task
    def work(job, batch, commit):
        return batch

    class CountingTask:  # the schedule only calls .submit: count what it submits
        def submit(self, job, batch, commit):
            with lock:
                submitted.append(batch)
            return work.submit(job, batch, commit)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def fan() -> list[tuple[int, int, int]]:
        seen = []
        for batch, get in fanned_out(CountingTask(), lambda: 1)(None, list(range(20)), None):
            seen.append((batch, get(), len(submitted)))
        return seen

    seen = fan()
    assert sorted(b for b, _, _ in seen) == list(range(20)) and all(b == r for b, r, _ in seen)
    assert seen[0][2] <= 4, "the first result came back after more than one window was submitted"
    assert all(n_submitted - i <= 4 for i, (_, _, n_submitted) in enumerate(seen)), seen
