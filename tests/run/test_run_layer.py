"""The run layer (blens.run): plan -> compute -> commit, without Prefect.

What it promises: the model side imports nothing from the store; a plan reads the records once per process and
writes nothing; the Committer is the only writer of a run and the run loop's failure policy sorts a record's
fault from the environment's; a background Committer stays in its process.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FACTS = [
    (0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    (1, "Paris is the capital of", "Paris", "Italy", "France"),
    (2, "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    (3, "Toko Yasuda, the", "Toko Yasuda", "piano", "guitar"),
]


def write_records(path: Path, extra: list[dict] = ()) -> Path:
    rows = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g} for c, p, s, t, g in FACTS]
    path.write_text(json.dumps(rows + list(extra)))
    return path


def imports_of(folder: Path) -> set[str]:
    names = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("folder", ["extract", "edit"])
def test_the_model_side_imports_nothing_from_the_store(folder):
    """Compute is pure: rows go to the warehouse only through blens.run's Committer (issue 22)."""
    found = sorted(m for m in imports_of(ROOT / folder) if m.startswith(("blens.store", "blens.run", "blens.flows")))
    assert found == [], f"{folder}/ imports {found}"


def test_read_source_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    import blens.run.source as source

    calls = []
    real = source.load_records
    monkeypatch.setattr(source, "load_records", lambda data, limit=None: calls.append(data) or real(data, limit=limit))
    data = write_records(tmp_path / "cf.json")
    first = source.read_source(str(data), None)
    assert source.read_source(str(data), None) is first and len(calls) == 1
    assert source.read_source(str(data), 2) is not first and len(calls) == 2  # another limit is another read
    write_records(data, [{"case_id": 9, "prompt": "x is", "subject": "x", "target_new": "y", "ground_truth": "z"}])
    again = source.read_source(str(data), None)
    assert len(calls) == 3 and len(again.records) == len(FACTS) + 1  # a changed file is read again


def test_plan_writes_nothing_and_execute_registers_then_commits(tmp_path, tiny_model_dir):
    from blens.extract.config import ExtractConfig
    from blens.run.extract import execute, plan_extract
    from blens.store.connect import connect

    data = write_records(tmp_path / "cf.json", [{"case_id": 50, "prompt": "No target", "subject": "No"}])
    wh = tmp_path / "wh"
    cfg = ExtractConfig(model=str(tiny_model_dir), data=str(data), warehouse=str(wh), batch_size=2, device="cpu")
    plan = plan_extract(cfg)
    assert plan.n_todo == len(FACTS) and [e.case_id for e in plan.errors] == [50]
    assert all(isinstance(v, (str, int, dict, type(None))) for v in vars(plan.job).values())  # values, no config
    if (wh / "catalog.sqlite").exists():  # the plan may open the warehouse to read keys, but commits no row
        con = connect(wh)
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        con.close()
    summary = execute(plan)
    assert (summary.n_extracted, summary.n_skipped) == (len(FACTS), 1)
    con = connect(wh)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert con.execute("SELECT count(DISTINCT key) FROM prompts").fetchone()[0] == len(FACTS)
    assert con.execute("SELECT case_id, stage FROM errors").fetchall() == [(50, "load")]
    con.close()
    again = plan_extract(cfg)  # every key is held now: nothing left, each counted as done
    assert (again.n_todo, again.n_skipped_done) == (0, len(FACTS))


def test_a_failed_batch_becomes_error_rows_but_a_full_disk_stops_the_run(tmp_path, tiny_model_dir):
    from blens.extract.config import ExtractConfig
    from blens.run.extract import execute, plan_extract
    from blens.store.connect import connect

    cfg = ExtractConfig(model=str(tiny_model_dir), data=str(write_records(tmp_path / "cf.json")),
                        warehouse=str(tmp_path / "wh"), batch_size=2, device="cpu")
    plan = plan_extract(cfg)

    def failing(job, batches, commit):  # what a schedule yields when a task's retries are spent
        for i, batch in enumerate(batches):
            def get(i=i, batch=batch):
                if i == 0:
                    raise RuntimeError("CUDA error: an illegal memory access (injected)")
                from blens.run.extract import extract_items

                return extract_items(job, batch, commit)
            yield batch, get

    summary = execute(plan, failing)
    assert (summary.n_extracted, summary.n_failed) == (2, 2)
    con = connect(tmp_path / "wh")
    errs = con.execute("SELECT stage, field, count(*) FROM errors GROUP BY ALL").fetchall()
    assert errs == [("extract", "batch", 2)]
    con.close()

    plan = plan_extract(cfg)  # the two failed ones are still to do
    assert plan.n_todo == 2

    def disk_full(job, batches, commit):
        for batch in batches:
            yield batch, lambda: (_ for _ in ()).throw(OSError(28, "No space left on device (injected)"))

    with pytest.raises(OSError, match="No space left"):
        execute(plan, disk_full)
    con = connect(tmp_path / "wh")
    assert con.execute("SELECT count(*) FROM errors WHERE field <> 'batch'").fetchone()[0] == 0
    con.close()


def test_a_background_committer_stays_in_its_process(tmp_path):
    from blens.run.commit import Committer

    plain = Committer(str(tmp_path / "wh"), "run-1")
    assert pickle.loads(pickle.dumps(plain)).warehouse == plain.warehouse  # handed to Dask workers
    with Committer(str(tmp_path / "wh"), "run-1", background=True) as busy:
        with pytest.raises(TypeError, match="stays in its process"):
            pickle.dumps(busy)


def test_edit_plan_keys_every_record_and_spec_once(tmp_path, tiny_model_dir):
    from blens.edit.spec import EditConfig, EditSpec
    from blens.run.edit import execute, plan_edit

    rows = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g, "rephrase_prompt": p,
             "locality_prompt": p, "locality_ground_truth": g} for c, p, s, t, g in FACTS]
    (tmp_path / "cf.json").write_text(json.dumps(rows))
    specs = [EditSpec("none"), EditSpec("shift", 2, 0.5)]
    cfg = EditConfig(model=str(tiny_model_dir), data=str(tmp_path / "cf.json"), specs=specs,
                     warehouse=str(tmp_path / "wh"), batch_size=3, fluency_tokens=0, device="cpu")
    plan = plan_edit(cfg)
    assert len(plan.job.keys) == len(FACTS) * 2 and len(set(plan.job.keys.values())) == len(FACTS) * 2
    summary = execute(plan)
    assert (summary.n_records, summary.n_rows) == (len(FACTS), len(FACTS) * 2)
    assert plan_edit(cfg).records == []  # all stored: a rerun has nothing to do


def test_a_plain_run_retries_a_batch_like_the_task_but_never_the_environment(monkeypatch):
    """`blens extract` without Prefect (the default local run) keeps the flow task's retries: a batch that fails
    for a reason of its own is tried BATCH_RETRIES more times; a full disk is raised at once."""
    from blens.run import extract as run_extract

    monkeypatch.setattr(run_extract.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= run_extract.BATCH_RETRIES:
            raise RuntimeError("transient")
        return "done"

    assert run_extract.retried(flaky) == "done" and len(calls) == run_extract.BATCH_RETRIES + 1
    calls.clear()
    with pytest.raises(RuntimeError):
        run_extract.retried(lambda: calls.append(1) or (_ for _ in ()).throw(RuntimeError("always")))
    assert len(calls) == run_extract.BATCH_RETRIES + 1
    calls.clear()
    with pytest.raises(OSError):
        run_extract.retried(lambda: calls.append(1) or (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert len(calls) == 1


def test_prefect_runs_a_job_only_when_asked_or_useful(tmp_path, monkeypatch):
    """--prefect decides when given; otherwise a server the user named (env or the active Prefect profile) or
    Dask workers bring Prefect in, and a plain local run goes without it."""
    from blens.extract.config import ExtractConfig
    from blens.lifecycle.prefect import configured_api_url, wants_prefect

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert configured_api_url() is None and not wants_prefect(None)
    assert wants_prefect(None, fans_out=True) and wants_prefect(True) and not wants_prefect(False)
    (tmp_path / "profiles.toml").write_text('active = "lab"\n[profiles.lab]\nPREFECT_API_URL = "http://lab:4200/api"\n'
                                            '[profiles.other]\n')
    assert configured_api_url() == "http://lab:4200/api" and wants_prefect(None)
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    assert not wants_prefect(None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert wants_prefect(None) and not wants_prefect(False)
    with pytest.raises(ValueError, match="through Prefect"):
        ExtractConfig(data="x.json", workers=2, prefect=False)
    with pytest.raises(ValueError, match="through Prefect"):
        ExtractConfig(data="x.json", dask_scheduler="tcp://127.0.0.1:8786", prefect=False)
    with pytest.raises(ValueError, match="give one"):
        ExtractConfig(data="x.json", dask_scheduler="tcp://127.0.0.1:8786", workers=2)
    assert ExtractConfig(data="x.json", dask_scheduler="tcp://127.0.0.1:8786").fans_out()
