"""Peak RSS of `blens publish` and `blens report` against the warehouse's size (issue 26: flat memory).

    .venv/bin/python bench/bench_publish_memory.py [--small 40 --large 400 --model smollm2-135m]

Extracts the first N records of counterfact-edit-1k with spanning vectors (``--vectors spanning``: the wide table,
~1 MB per SmolLM2 prompt) into two warehouses, then runs `blens publish` and `blens report` on each in a process of
its own and reads that process's high-water mark (VmHWM). The issue's bar: peak(large) <= 1.25 x peak(small).
Not a test: it takes minutes (the extraction dominates) and its figures depend on the box.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit-1k.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_warehouse import blens_child  # noqa: E402  (one blens process: wall s, its own peak RSS MB, stderr)


def blens(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one `blens ARGS` process."""
    seconds, rss, _ = blens_child(*args)
    return seconds, rss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--large", type=int, default=400)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--keep", help="build the warehouses here (reused when present) instead of a temp folder")
    a = ap.parse_args(argv)
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="blens-pubmem-"))
    load = os.getloadavg()[0]
    rows = []
    for n in (a.small, a.large):
        wh = base / f"wh{n}"
        s, rss = blens("extract", "--model", a.model, "--data", a.data, "--limit", str(n), "--warehouse", str(wh),
                       "--vectors", "spanning")
        print(f"extract {n}: {s:.0f} s, peak {rss:.0f} MB", flush=True)
        ps, prss = blens("publish", "--warehouse", str(wh), "--out", str(base / f"pub{n}"))
        rs, rrss = blens("report", "--warehouse", str(wh), "--out", str(base / f"rep{n}"))
        size = sum(f.stat().st_size for f in wh.rglob("*") if f.is_file()) / 2**20
        rows.append((n, size, ps, prss, rs, rrss))
        print(f"n={n}: warehouse {size:.0f} MB; publish {ps:.0f} s peak {prss:.0f} MB; report {rs:.0f} s peak "
              f"{rrss:.0f} MB", flush=True)
    (n1, _, _, p1, _, r1), (n2, _, _, p2, _, r2) = rows
    print(f"\npublish peak {n2}/{n1} prompts: {p2 / p1:.2f}x; report: {r2 / r1:.2f}x (bar 1.25x); load at start "
          f"{load:.1f}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
