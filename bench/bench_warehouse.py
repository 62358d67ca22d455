"""The whole shared CounterFact (train + edit, 20,000 records) end to end on the embedded model: extract,
compact, publish, report, with the figures issues 12 and 26 ask for (not a test; about two hours on 2 cores):

    ./.venv/bin/python bench/bench_warehouse.py --data-dir ../shared/data/counterfact --vectors spanning \
        --out bench/results.md

Per step: wall time, prompts/s and the peak RSS of the `blens` process (VmHWM, read by the child itself);
the end-to-end wall time against the fp32 FLOP limit from the GEMM peak measured in the same run (before and
after: this shared host's speed drifts); then the warehouse size per table, its file count before and after
`blens compact`, and the latency of each documented view (best of 3, after compaction). `--files` picks other
files, `--limit` makes a quick rehearsal.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_extract import RUN_CLI, flop_per_token, fp32_peak  # noqa: E402  (RUN_CLI: + child's VmHWM)
from blens.extract.models import load_model  # noqa: E402
from blens.store.connect import connect  # noqa: E402
from report_out import emit  # noqa: E402

VIEWS = ["rank_equals_length", "target_rank_by_layer", "vjp_norm_by_segment", "edit_summary"]
QUERIES = {
    "count(*) FROM prompts": "SELECT count(*) FROM prompts",
    "one prompt's projections": "SELECT * FROM projections WHERE key = (SELECT min(key) FROM prompts)",
}


def blens_child(*args: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of one blens process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"blens {' '.join(args)} failed: {proc.stderr[-3000:]}")
    kb = [float(x.split("=")[1]) for x in proc.stderr.splitlines() if x.startswith("BENCH_MAXRSS_KB=")]
    return wall, (kb[-1] / 1024 if kb else float("nan")), proc.stderr


def table_stats(wh: Path) -> dict[str, tuple[int, int]]:
    con = connect(wh)
    try:
        rows = con.execute("""
            SELECT t.table_name, count(*), sum(f.file_size_bytes)
            FROM __ducklake_metadata_lake.ducklake_data_file f JOIN __ducklake_metadata_lake.ducklake_table t
            USING (table_id) WHERE f.end_snapshot IS NULL AND t.end_snapshot IS NULL GROUP BY 1 ORDER BY 1""").fetchall()
    finally:
        con.close()
    return {name: (int(n), int(size or 0)) for name, n, size in rows}


def view_latency(wh: Path) -> dict[str, float]:
    con = connect(wh)
    out = {}
    try:
        for name, sql in [(v, f"SELECT * FROM {v}") for v in VIEWS] + list(QUERIES.items()):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                con.execute(sql).fetchall()
                best = min(best, time.perf_counter() - t0)
            out[name] = best
    finally:
        con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "counterfact"))
    ap.add_argument("--files", default="counterfact-train.json,counterfact-edit.json")
    ap.add_argument("--limit", type=int, default=None, help="per file (a quick rehearsal)")
    ap.add_argument("--vectors", default="none", choices=["none", "spanning", "all"], help="blens extract --vectors")
    ap.add_argument("--warehouse", default="/tmp/bench-warehouse")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    wh = Path(args.warehouse)
    shutil.rmtree(wh, ignore_errors=True)
    lines = [f"# bench_warehouse ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}, load avg at start {os.getloadavg()[0]:.1f})",
             ""]
    per_token, peak_before = flop_per_token(load_model()), fp32_peak()
    lines += [f"--vectors {args.vectors}; fp32 GEMM peak before the run {peak_before:.0f} GFLOP/s", "",
              "| step | records | wall s | prompts/s | peak RSS MB |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    total_n, total_t = 0, 0.0
    for name in args.files.split(","):
        extra = ["--limit", str(args.limit)] if args.limit else []
        wall, rss, err = blens_child("extract", "--data", str(Path(args.data_dir) / name), "--warehouse", str(wh),
                                     "--vectors", args.vectors, *extra)
        con = connect(wh)
        n = con.execute("SELECT count(*) FROM prompts").fetchone()[0] - total_n
        con.close()
        total_n, total_t = total_n + n, total_t + wall
        lines.append(f"| extract {name} | {n:,} | {wall:.0f} | {n / wall:.2f} | {rss:,.0f} |")
        print(lines[-1], flush=True)
    lines.append(f"| extract, all | {total_n:,} | {total_t:.0f} | {total_n / total_t:.2f} | |")
    print(lines[-1], flush=True)
    extract_t, e2e = total_t, total_t
    before = table_stats(wh)
    wall, rss, _ = blens_child("compact", "--warehouse", str(wh))
    e2e += wall
    after = table_stats(wh)
    lines.append(f"| compact | | {wall:.1f} | | {rss:,.0f} |")
    print(lines[-1], flush=True)
    for command, suffix in (("publish", "-published"), ("report", "-report")):
        out = Path(str(wh) + suffix)
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = blens_child(command, "--warehouse", str(wh), "--out", str(out))
        e2e += wall
        lines.append(f"| {command} | | {wall:.0f} | | {rss:,.0f} |")
        print(lines[-1], flush=True)
    pub = Path(str(wh) + "-published")
    lines.append(f"| **end to end** (extract, compact, publish, report) | {total_n:,} | {e2e:.0f} "
                 f"({e2e / 60:.1f} min) | {total_n / e2e:.2f} | |")
    print(lines[-1], flush=True)
    # The yardstick: the fp32 FLOP limit at the tokens this run actually had, from the peaks around it.
    con = connect(wh)
    tokens = con.execute("SELECT sum(n_tokens) FROM prompts").fetchone()[0]
    con.close()
    peak = max(peak_before, fp32_peak())
    flop = per_token * tokens / max(total_n, 1)
    limit = peak * 1e9 / flop
    lines += ["", f"fp32 GEMM peak (best of before / after): {peak:.0f} GFLOP/s; {tokens / max(total_n, 1):.2f} "
              f"tokens per prompt, {flop:.2e} FLOP per prompt: fp32 FLOP limit {limit:.2f} prompts/s, so the "
              f"extraction alone needs >= {total_n / limit / 60:.0f} min at 100 % of peak; it ran at "
              f"{total_n / extract_t:.2f} prompts/s = {100 * total_n / extract_t / limit:.0f} % of the limit. "
              f"Published dataset: {sum(f.stat().st_size for f in pub.rglob('*') if f.is_file()) / 2**30:.1f} GiB."]
    lines += ["", "| table | files before compaction | files after | size after (MB) |", "|---|---|---|---|"]
    for t in sorted(set(before) | set(after)):
        lines.append(f"| {t} | {before.get(t, (0, 0))[0]} | {after.get(t, (0, 0))[0]} | "
                     f"{after.get(t, (0, 0))[1] / 2**20:,.1f} |")
    lines += ["", "| view / query (after compaction, best of 3) | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in view_latency(wh).items()]
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
