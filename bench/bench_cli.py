"""CLI latency (issue 15): wall time of whole `blens` processes, best of N, as a Markdown table (not a test).

    python bench/bench_cli.py [--blens PATH] [--data FILE] [--repeat 3] [--out bench/results.md]

Measures, each in fresh processes exactly as a user types them:

* ``blens --help``
* ``blens sql "SELECT count(*) FROM prompts"`` on a 20-prompt warehouse
* a no-op rerun: ``blens extract --data FILE --limit 20`` on a warehouse that already holds those 20 results
* a 20-prompt ``blens extract`` into a new warehouse (the run's own "seconds" column is the work; the rest
  of the wall time is start-up: imports, model load, Prefect)
* ``blens extract --model gpt2`` without a network (HF_HUB_OFFLINE unset): the time to the one error line,
  and how many lines it printed

``--blens`` picks the executable, so the same script measures an older checkout (its own venv's ``blens``).
Run it under ``nice -n 19`` on a shared machine; the table records the load average next to the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_out import emit  # noqa: E402

DEFAULT_DATA = "../shared/data/counterfact/counterfact-edit-1k.json"


@dataclass
class Measure:
    name: str
    seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        runs = ", ".join(f"{s:.2f}" for s in self.seconds)
        note = "; ".join(dict.fromkeys(self.notes))
        return f"| {self.name} | {min(self.seconds):.2f} | {runs} | {note} |"


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def expect(proc: subprocess.CompletedProcess, ok: bool, what: str) -> None:
    if (proc.returncode == 0) != ok:
        raise SystemExit(f"{what}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def work_seconds(stdout: str) -> str | None:
    """The run's own "seconds" from the extract summary (plain-text table: a header line, then the values)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-1]):
        cols = re.split(r"\s{2,}", line.strip())
        if "seconds" in cols and "records" in cols:
            values = lines[i + 1].split()
            if len(values) == len(cols):
                return values[cols.index("seconds")]
    return None


def measure(blens: str, data: str, repeat: int, tmp: Path) -> list[Measure]:
    extract = [blens, "extract", "--data", data, "--limit", "20"]
    help_ = Measure("`blens --help`")
    sql = Measure('`blens sql "SELECT count(*) FROM prompts"`')
    noop = Measure("`blens extract` no-op rerun (20 records, all done)")
    fresh = Measure("`blens extract` 20 prompts, new warehouse")
    offline = Measure("`blens extract --model gpt2` offline (HF_HUB_OFFLINE unset)")
    warehouse = tmp / "wh0"
    for i in range(repeat):
        seconds, proc = run(extract + ["--warehouse", str(tmp / f"wh{i}")])
        expect(proc, True, "20-prompt extract")
        fresh.seconds.append(seconds)
        fresh.notes.append(f"work {work_seconds(proc.stdout) or '?'} s")
    for _ in range(repeat):
        seconds, proc = run(extract + ["--warehouse", str(warehouse)])
        expect(proc, True, "no-op rerun")
        noop.seconds.append(seconds)
        done = work_seconds(proc.stdout) is not None and " 20 " in proc.stdout
        noop.notes.append("summary printed" if done else "no summary table")
    for _ in range(repeat):
        seconds, proc = run([blens, "--help"])
        expect(proc, True, "--help")
        help_.seconds.append(seconds)
    for _ in range(repeat):
        seconds, proc = run([blens, "sql", "SELECT count(*) FROM prompts", "--warehouse", str(warehouse)])
        expect(proc, True, "sql")
        sql.seconds.append(seconds)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for i in range(repeat):
        seconds, proc = run([blens, "extract", "--model", "gpt2", "--data", data, "--limit", "20",
                             "--warehouse", str(tmp / f"off{i}")], env=env)
        expect(proc, False, "offline hub name")
        offline.seconds.append(seconds)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        offline.notes.append(f"exit {proc.returncode}, {len(lines)} stderr line(s)")
    return [help_, sql, noop, fresh, offline]


def describe_tree(blens: str) -> str:
    """The checkout a `blens` executable runs: its git commit (dirty or not)."""
    code = subprocess.run([str(Path(blens).parent / "python"), "-I", "-c",
                           "import blens.cli, pathlib; print(pathlib.Path(blens.cli.__file__).resolve().parents[1])"],
                          capture_output=True, text=True).stdout.strip()
    rev = subprocess.run(["git", "-C", code or ".", "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    return f"{code} @ {rev or 'unknown'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blens", default=str(Path(sys.executable).parent / "blens"), help="the blens executable")
    ap.add_argument("--data", default=DEFAULT_DATA, help="CounterFact file (relative to the current directory)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--label", default="", help="a word for the table's heading (e.g. before / after)")
    ap.add_argument("--out", type=Path, help="append the table to this Markdown file")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: no such file (run from the repository root, or pass --data)")
    data = str(Path(args.data).resolve())
    start = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        rows = measure(args.blens, data, args.repeat, Path(tmp))
    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0]) > 2
    lines = [
        f"**{args.label or 'CLI latency'}**: {describe_tree(args.blens)}; {start:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores; load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in load_after)}"
        + (" (**above 2: the machine was busy, times are inflated**)" if busy else ""),
        "",
        f"| command | best of {args.repeat} (s) | each run (s) | notes |",
        "|---|---:|---|---|",
        *(m.row() for m in rows),
        "",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
