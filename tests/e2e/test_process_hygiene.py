"""No process of ours outlives the command that started it (issue 13).

A real `blens extract` subprocess (tiny random Llama, enough records to keep it busy) is started in *our*
process group, like a user's shell would, and then only its own pid is signalled:

- kill -9: nothing can run in the dying process, so Prefect's ephemeral API server (a uvicorn child,
  ~225 MB) used to be reparented to init and live on. Now the kernel kills it (PR_SET_PDEATHSIG).
- SIGTERM / SIGINT: the command exits promptly, non-zero (143 / 130), prints one line and no traceback,
  and leaves no child behind.

Descendants are found through /proc/<pid>/task/*/children, recursively, right before the signal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builders import ROOT
from tiny_runs import extract_writers
from blens.store.connect import connect

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

SUBJECTS = [("Danielle Darrieux", "English", "French"), ("Paris", "Italy", "France"), ("Berlin", "Japan", "Germany"),
            ("Oslo", "Peru", "Norway"), ("Madrid", "Sweden", "Spain")]
PROGRESS = re.compile(r"^\s*extract\b")  # the progress bar's lines (a non-terminal gets one per batch)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):  # gone, or going: ESRCH mid-read
        return found
    for tid in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):  # gone, or going: ESRCH mid-read
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to read its status)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going: ESRCH mid-read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):  # gone, or going: ESRCH mid-read
        return ""


@pytest.fixture
def busy_run(tmp_path, tiny_model_dir):
    """Start `blens extract` on 400 records, one per batch (a minute or more of work), in the test's own process
    group and with SIGINT at its default (as at an interactive shell, whatever the CI runner set). Returns
    start(*extra_args) -> (process, warehouse, descendants known so far); whatever survives is killed by pid."""
    started: list[tuple[subprocess.Popen, set[int]]] = []

    def start(*extra: str, new_session: bool = False):
        proc, wh, seen = _start(tmp_path, tiny_model_dir, extra, new_session)
        started.append((proc, seen))
        return proc, wh, seen

    yield start
    for proc, seen in started:
        for pid in [proc.pid, *seen]:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=60)


class Tee:
    """Reads a pipe in a thread, keeping every line: progress can be watched while the process runs (and a full
    pipe never blocks it)."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def text(self, timeout: float = 30.0) -> str:
        self.thread.join(timeout)
        return "\n".join(self.lines)


def _start(tmp_path, tiny_model_dir, extra, new_session):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([{"case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": t,
                                 "ground_truth": g} for i, (s, t, g) in ((i, SUBJECTS[i % 5]) for i in range(400))]))
    wh = tmp_path / "wh"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blens.cli", "extract", "--model", str(tiny_model_dir), "--data", str(data),
         "--warehouse", str(wh), "--batch-size", "1", "--threads", "1", "--top-k", "3", *extra],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=new_session, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.err = Tee(proc.stderr)  # type: ignore[attr-defined]
    return proc, wh, set()


DONE = re.compile(r"^extract: (\d+)/400 prompts")  # the CLI's progress line per batch on a non-terminal


def wait_until_busy(proc, wh: Path, seen: set[int], timeout: float = 240.0, server: bool = True) -> list[int]:
    """Until at least two batches are done and, with ``server``, the Prefect API server child exists (the flow is
    running)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        kids = descendants(proc.pid)
        seen.update(kids)
        servers = [k for k in kids if "uvicorn" in cmdline(k)]
        done = [int(m.group(1)) for m in map(DONE.match, list(proc.err.lines)) if m]
        if (servers or not server) and done and max(done) >= 2:
            return kids
        if proc.poll() is not None:
            raise AssertionError(f"blens extract ended early (rc={proc.returncode}): {proc.err.text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"blens extract never got busy: {proc.err.text(0)[-3000:]}")


def survivors(pids: list[int], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return [f"{p}: {cmdline(p)[:120]}" for p in left]
        time.sleep(0.1)


def test_kill9_of_the_cli_alone_leaves_no_process_behind(busy_run):
    """kill -9 of a `blens extract --prefect --workers 2`: its ephemeral API server (a uvicorn child, ~225 MB)
    and its two local Dask worker processes all die with it. Every Dask worker process used to start an
    ephemeral API server of its own (from a worker thread), and those servers outlived the killed run too; now
    the workers use the CLI's server. (One run covers the plain flow's case too: the server child is the same;
    without prefect-dask installed it runs in-process.)
    The kill waits until both workers have committed batches: the local cluster fans out (its rows equal a
    single-process run's: the same schedule is checked on a running cluster in test_dask_cluster.py)."""
    workers = 2 if importlib.util.find_spec("prefect_dask") else 1
    proc, wh, seen = busy_run("--workers", str(workers), "--prefect")  # the flow, with its ephemeral API server
    kids = wait_until_busy(proc, wh, seen)
    deadline = time.monotonic() + 240
    while workers > 1 and extract_writers(wh) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "both local Dask workers should write batches"
        time.sleep(0.5)
    kids = descendants(proc.pid) or kids  # freshest view right before the kill
    seen.update(kids)
    servers = [k for k in kids if "uvicorn" in cmdline(k)]
    assert len(servers) == 1, f"expected one Prefect API server among {[cmdline(k)[:80] for k in kids]}"
    os.kill(proc.pid, signal.SIGKILL)  # the CLI process only, not its group: nobody else is signalled
    proc.wait(timeout=30)
    assert survivors(kids, within=10.0) == []


@pytest.mark.parametrize("to", ["pid", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_exit_promptly_in_one_line_with_no_children_left(busy_run, sig, to):
    """"pid": `kill -TERM PID`. "group": what Ctrl-C at a terminal does (the whole foreground process group gets
    SIGINT), or `kill -TERM -PGID` by a supervisor; the CLI then runs in a session of its own, as a shell's job.

    Both run modes meet both signals: "pid" runs the Prefect flow (`--prefect`: Prefect's in-flow SIGTERM handler
    and an API server child to clean up), "group" the plain run a default `blens extract` is (our own handlers)."""
    flow = to == "pid"
    proc, wh, seen = busy_run(*(["--prefect"] if flow else []), new_session=(to == "group"))
    kids = wait_until_busy(proc, wh, seen, server=flow)
    reported = max(int(m.group(1)) for m in map(DONE.match, list(proc.err.lines)) if m)
    t0 = time.monotonic()
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    took = time.monotonic() - t0
    err = proc.err.text()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert took < 30, f"took {took:.1f} s to stop"
    assert "Traceback" not in err and "Crash detected" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {sig.name}"), lines
    assert survivors(kids, within=10.0) == []
    # The run stopped at the signal, not at the exit watchdog 20 s later: a signal that DuckDB swallowed inside a
    # COMMIT let the run go on committing batches (one prompt each) until the watchdog killed it (3 of 4 runs).
    # Committed now: what was reported before the signal, the batch in flight, and one whose line was not read yet.
    con = connect(wh)
    committed = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    con.close()
    assert reported <= committed <= reported + 2, (reported, committed)
