"""The process lifecycle's guarantees that need no real process: user errors are known by type, and the
lifecycle modules stay light enough for every command (issue 22, point 3). The signal behaviour itself is
tested on real processes in tests/test_process_hygiene.py, tests/test_query_sandbox.py and tests/test_serve.py."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blens.errors import UserError
from blens.lifecycle.guard import run_guarded

ROOT = Path(__file__).resolve().parents[1]

# Exceptions of ours that are deliberately NOT user errors: a bug or an internal signal between our own parts.
NOT_USER_ERRORS = {
    "blens.api.RecordInvalid",  # the notebook API's per-record error: raised to a caller, never to the CLI guard
    "blens.edit.editor.EditError",  # an edit that could not be applied: an errors row, not the end of a command
    "blens.edit.editor.RestoreError",  # the weights were not restored bit-exactly: a bug, keep the traceback
    "blens.extract.overlap.WriterClosedError",  # the background committer was used after close: a bug
    "blens.extract.records._Invalid",  # internal: a bad record, turned into an errors row where it is raised
    "blens.flows.serving.ServeFailed",  # `blens serve` catches it and says so itself (exit 1)
    "blens.lifecycle.signals.Interrupted",  # a signal, handled by the guard on its own
}
USER_ERRORS = {
    "blens.extract.records.DataSourceError", "blens.extract.registry.ModelLoadError",
    "blens.extract.adapters.UnsupportedModelError", "blens.store.lake.WarehouseError",
    "blens.store.sandbox.QueryRefused", "blens.store.sandbox.QueryLimit", "blens.flows.extract_flow.WorkersUnavailable",
    "blens.publish.dataset.PublishError", "blens.publish.report.ReportError",
}


# The packages with code of ours (pyproject's package-dir maps most of them outside blens/, so walking
# blens.__path__ alone would miss them).
PACKAGES = ("blens", "blens.lifecycle", "blens.extract", "blens.edit", "blens.store", "blens.publish", "blens.flows")


def _our_exception_classes() -> dict[str, type]:
    found = {}
    for package in PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
            if info.ispkg or info.name in ("blens.cli", "blens.flows.serve"):
                continue  # the CLI registers commands; flows.serve binds a served flow-run process to its parent
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                    found[f"{info.name}.{name}"] = obj
    assert len(found) > 10, sorted(found)  # the walk found the packages
    return found


def test_every_exception_of_ours_is_declared_a_user_error_or_not():
    """A new exception class must be sorted here: a user error subclasses UserError (one red line, exit 2),
    anything else keeps its traceback. The guard checks the type, never a list of names."""
    found = _our_exception_classes()
    user = {name for name, cls in found.items() if issubclass(cls, UserError)} - {"blens.errors.UserError"}
    assert user == USER_ERRORS
    undecided = set(found) - user - NOT_USER_ERRORS - {"blens.errors.UserError"}
    assert not undecided, f"declare these user errors (subclass blens.errors.UserError) or not: {sorted(undecided)}"


def test_user_errors_keep_their_historical_base():
    from blens.extract.adapters import UnsupportedModelError
    from blens.store.lake import WarehouseError
    from blens.store.sandbox import QueryRefused

    assert issubclass(UnsupportedModelError, ValueError) and issubclass(QueryRefused, ValueError)
    assert issubclass(WarehouseError, RuntimeError)


def test_the_guard_knows_a_user_error_by_its_type(capsys):
    class NewUserError(UserError):  # defined here: no list anywhere names it
        pass

    def command():
        raise NewUserError("the input is wrong:\n  fix it")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as caught:
        run_guarded(command)
    assert caught.value.code == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == [
        "error: the input is wrong: fix it"]
    assert signal.getsignal(signal.SIGINT) is before  # called in-process, the caller's handlers come back


def test_the_guard_lets_a_bug_through():
    with pytest.raises(KeyError):
        run_guarded(lambda: {}["missing"])


def test_lifecycle_modules_import_nothing_heavy():
    """The guard runs for every command, `blens --help` included, and every domain package imports
    blens.errors: none of them may pull in torch, Prefect, DuckDB or rich at import time."""
    code = ("import sys, json; import blens.errors, blens.lifecycle.guard, blens.lifecycle.signals, "
            "blens.lifecycle.prefect, blens.lifecycle.children, blens.lifecycle.flow_run, blens.lifecycle.ending; "
            "print(json.dumps(sorted(m for m in ('torch', 'prefect', 'duckdb', 'pyarrow', 'rich', 'typer') "
            "if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# A process that ends through end_process: a non-daemon thread still working, a thread pool with a queued task,
# an atexit handler, and output still in stdout's buffer (a pipe: block-buffered).
ENDING = r"""
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from blens.lifecycle.ending import end_process
log = open(sys.argv[1], "a", buffering=1)
atexit.register(lambda: log.write("atexit\n"))
def late():
    time.sleep(0.3)
    log.write("thread\n")
threading.Thread(target=late).start()
pool = ThreadPoolExecutor(1)
pool.submit(time.sleep, 0.2)
pool.submit(lambda: log.write("pool\n"))
sys.stdout.write("still buffered")
end_process(3)
log.write("after\n")
"""


def test_the_process_end_does_what_a_normal_exit_does_before_its_teardown(tmp_path):
    """blens.lifecycle.ending.end_process: non-daemon threads and thread pools finish first, then the atexit
    handlers run, buffered output is written, and the status is the one asked for; nothing after it runs."""
    log = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-c", ENDING, str(log)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "still buffered"
    assert log.read_text().splitlines() == ["pool", "thread", "atexit"]


def test_the_cli_keeps_its_exit_status_and_atexit_handlers_when_it_ends_early(tmp_path):
    """`python -m blens.cli` with torch loaded ends through end_process (blens.cli.main): a model that cannot be
    loaded is still one error line and exit 2, and the atexit handlers ran (here: one that reports torch)."""
    traced = ("import atexit, runpy, sys; sys.argv = ['blens'] + sys.argv[1:]; "
              "atexit.register(lambda: sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules))); "
              "runpy.run_module('blens.cli', run_name='__main__')")
    data = tmp_path / "cf.json"
    data.write_text('[{"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris", '
                    '"target_new": {"str": "Rome"}, "target_true": {"str": "France"}}}]')
    (tmp_path / "no-model").mkdir()
    proc = subprocess.run([sys.executable, "-c", traced, "extract", "--model", str(tmp_path / "no-model"), "--data",
                           str(data), "--warehouse", str(tmp_path / "wh")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "TORCH=True" in proc.stderr  # the model load had imported torch: the early end was taken
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")], proc.stderr
