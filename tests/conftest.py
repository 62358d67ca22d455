"""Shared fixtures: tiny random GPT-2 and Llama models built from configs, CounterFact-like records.

Prefect gets its own PREFECT_HOME per test session so the ephemeral API starts from a clean database.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

# One PREFECT_HOME per test process: the suite runs in pytest-xdist workers (scripts/test.sh), and each worker's
# ephemeral Prefect API keeps its SQLite database there; two servers on one database lock each other out. A
# worker inherits the controller's home (its conftest ran first), so a worker always makes its own.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if "PREFECT_HOME" not in os.environ or (_WORKER and os.environ.get("BLENS_TEST_PREFECT_HOME") == os.environ["PREFECT_HOME"]):
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"blens-prefect-{_WORKER or 'main'}-")
    os.environ["BLENS_TEST_PREFECT_HOME"] = os.environ["PREFECT_HOME"]  # ours, so removed at exit (16 MB a run)
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from builders import (COUNTERFACT, FACTS, GPT2_TOKENIZER, ROOT, SESSION_RECORDS, gpt2_tokenizer,  # noqa: E402,F401
                      tiny_model)


if _WORKER:  # N workers share the cores: one worker's torch keeps to its share (oversubscribed GEMMs crawl)
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(min(torch.get_num_threads(), _share))
    # ... and so do the processes it starts (a `blens` CLI without --threads, Dask workers, serve's flow runs):
    # torch takes its default thread count from it. Two workers' children each spinning two OpenMP
    # threads on two cores burn CPU waiting at barriers.
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def pytest_sessionstart(session) -> None:
    """In CI a missing ../shared is a broken checkout, not a reason to skip most of the suite: stop loudly."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not (GPT2_TOKENIZER.exists() and COUNTERFACT.is_dir()):
        pytest.exit(f"CI=true but the shared test files are missing ({GPT2_TOKENIZER}, {COUNTERFACT}): "
                    "CI must run with ../shared beside the clone", returncode=1)


def pytest_collection_modifyitems(config, items) -> None:
    """Everything in tests/e2e/ (real processes) is ``slow``, like the tests that load a real model.

    Then the files go roughly longest first: the more slow tests a file has, the earlier it runs, and files
    without one come last in their usual order. The suite's workers (scripts/test.sh: pytest-xdist, a file per
    worker, in this order) then start the long files first and end together; one process runs the same order."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slow)
    n_slow: dict[Path, int] = {}
    for item in items:
        path = Path(str(item.path))
        n_slow[path] = n_slow.get(path, 0) + bool(item.get_closest_marker("slow"))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-n_slow[Path(str(item.path))], order[id(item)]))


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_lm(request, tokenizer):
    from blens.extract.models import wrap_model

    return wrap_model(tiny_model(request.param, len(tokenizer)), tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved like a hub checkpoint: exercises the normal `--model PATH` loading."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([
        {"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g,
         "rephrase_prompt": p, "locality_prompt": p, "locality_ground_truth": g}
        for c, p, s, t, g in FACTS
    ]))
    return path


# --- one extracted warehouse per session --------------------------------------------------------------------

class Extracted:
    """A warehouse made by `blens extract` from ``SESSION_RECORDS`` on the tiny random Llama: ``path``, the
    records file ``data``, and ``args(wh)``, the extract command that made it pointed at ``wh`` (rerun on a
    copy, it resumes: the same model, records and settings)."""

    def __init__(self, path: Path, data: Path, model_dir: Path) -> None:
        self.path, self.data, self.model_dir = path, data, model_dir

    def args(self, wh: Path) -> list[str]:
        return ["extract", "--model", str(self.model_dir), "--data", str(self.data), "--warehouse", str(wh),
                "--top-k", "5", "--threads", "1", "--batch-size", "2"]


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, tiny_model_dir) -> Extracted:
    """The session's extracted warehouse (4 prompts, 2 batches). Read it, never change it: a test that
    changes a warehouse takes ``extracted_copy``."""
    from builders import blens_in_process

    root = tmp_path_factory.mktemp("extracted")
    data = root / "cf.json"
    data.write_text(json.dumps(SESSION_RECORDS))
    made = Extracted(root / "wh", data, tiny_model_dir)
    r = blens_in_process(*made.args(made.path))
    assert r.returncode == 0, r.stderr[-3000:]
    return made


@pytest.fixture
def extracted_copy(extracted, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the session's extracted warehouse in this test's tmp_path (the catalog finds its data where it
    is now) and the extract command that made it, pointed at the copy."""
    wh = tmp_path / "wh"
    shutil.copytree(extracted.path, wh)
    return wh, extracted.args(wh)


# --- the reference run of tests/flows/test_run_resilience.py and tests/e2e/test_scale.py ----------------------

@pytest.fixture(scope="session")
def data12(tmp_path_factory):
    from tiny_runs import make_records, write_records

    return write_records(tmp_path_factory.mktemp("data") / "cf12.json", make_records(12))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_model_dir, data12):
    """One clean, uninterrupted, single-process run over the 12 records of ``data12`` (tiny_runs.snapshot): the
    plain run layer, no Prefect (the flow gives the same rows, which the flow tests check against this)."""
    from blens.run.extract import run_in_process
    from tiny_runs import assert_complete, cfg_for, snapshot

    wh = tmp_path_factory.mktemp("ref") / "wh"
    summary = run_in_process(cfg_for(tiny_model_dir, data12, wh))
    assert summary.n_extracted == 12 and summary.n_failed == 0
    assert assert_complete(wh) == 12
    return snapshot(wh)


# --- where the suite's CPU goes (opt-in) ---------------------------------------------------------------------
# BLENS_TEST_CPU=FILE appends one line per test: nodeid, wall s, this process's CPU s, reaped children's CPU s.
# The suite is CPU-bound on 2 cores, so CPU, not wall time, says what to make cheaper.
if os.environ.get("BLENS_TEST_CPU"):
    import resource
    import time as _time

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        t0, c0 = _time.perf_counter(), _time.process_time()
        k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        yield
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        kids = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
        with open(os.environ["BLENS_TEST_CPU"], "a") as f:
            f.write(f"{item.nodeid}\t{_time.perf_counter() - t0:.1f}\t{_time.process_time() - c0:.1f}\t{kids:.1f}\n")
