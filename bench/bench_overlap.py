"""What overlapping the host work (Arrow building + a Parquet commit) with the next batch's device work buys.

    PYTHONPATH=. python bench/bench_overlap.py [--shape smollm2-135m/4L] [--prompts 96] [--vectors spanning]

Three measurements over the same batches (random-weight model, random 4-16-token prompts, 512-token
batches, a Parquet commit per batch to a temp dir, ``blens.run.overlap.run_overlapped`` with depth 1):

1. sequential: ``compute_batch`` then ``build_tables`` + commit, batch after batch;
2. overlapped on CPU: the same with the host stage of batch k in the writer thread beside ``compute_batch``
   of batch k+1 (both stages then compete for the same cores);
3. overlapped with a device that frees the CPU: each batch's ``compute_batch`` replaced by a sleep of its
   measured duration divided by ``--speedup`` (what the host thread does while a GPU computes: it waits,
   the GIL released), and the real host stage of that batch's real results. Its sequential twin sleeps
   and then builds. With speedup 1 the device is as fast as this CPU; with 20 it is a GPU 20x faster,
   which makes the host stage a large share of the time.

The ideal overlapped time is sum compute + the last host stage (or the first compute + sum host, if
the host stage is the longer one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_check import IdTokenizer, ParquetSink, build_model, random_prompts, token_budget_batches  # noqa: E402
from blens.extract.lens import LogitLens  # noqa: E402
from blens.extract.models import wrap_model  # noqa: E402
from blens.run.overlap import run_overlapped  # noqa: E402
from blens.extract.tables import build_tables, compute_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m/4L")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--vectors", default="spanning", choices=["none", "spanning", "all"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--speedup", default="1,20", help="device speed-ups to simulate in measurement 3")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, seed=0)
    V = model.lm_head.weight.shape[0]
    lm = wrap_model(model, IdTokenizer(V), name=args.shape)
    lens = LogitLens.of(lm.view)
    batches = token_budget_batches(random_prompts(args.prompts, V, seed=1), 32, 512)
    build_tables(lm, compute_batch(lm, batches[0][:2], lens=lens), "warm")
    vec = args.vectors

    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        def sink(name):
            return ParquetSink(Path(tmp) / name)

        # 1. sequential, with each stage timed
        s = sink("seq")
        t_compute, t_host, hosts = [], [], []
        t0 = time.perf_counter()
        for b in batches:
            a = time.perf_counter()
            h = compute_batch(lm, b, lens=lens, vectors=vec)
            m = time.perf_counter()
            s(build_tables(lm, h, "r", vectors=vec))
            t_compute.append(m - a)
            t_host.append(time.perf_counter() - m)
            hosts.append(h)
        seq = time.perf_counter() - t0

        # 2. overlapped, real compute on the same CPU
        s = sink("ovl")
        t0 = time.perf_counter()
        run_overlapped(batches, lambda b: compute_batch(lm, b, lens=lens, vectors=vec),
                       lambda h: s(build_tables(lm, h, "r", vectors=vec)))
        ovl = time.perf_counter() - t0

        # 3. a device that frees the CPU: sleep for each batch's compute time / speedup, then the real host stage
        sims = []
        for x in (float(v) for v in args.speedup.split(",")):
            s = sink(f"sim-seq-{x}")
            t0 = time.perf_counter()
            for i in range(len(batches)):
                time.sleep(t_compute[i] / x)
                s(build_tables(lm, hosts[i], "r", vectors=vec))
            sim_seq = time.perf_counter() - t0
            s = sink(f"sim-ovl-{x}")
            t0 = time.perf_counter()
            run_overlapped(range(len(batches)), lambda i: (time.sleep(t_compute[i] / x), hosts[i])[1],
                           lambda h: s(build_tables(lm, h, "r", vectors=vec)))
            sims.append((x, sim_seq, time.perf_counter() - t0))

    n = args.prompts
    C, H = sum(t_compute), sum(t_host)
    load = os.getloadavg()[0]
    print(f"bench_overlap: {args.shape}, {n} prompts in {len(batches)} batches, vectors={vec}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, load avg {load:.1f}")
    rows = [
        ("compute_batch (capture, lens, ranks, copy), sum", f"{C:.2f} s"),
        ("build_tables + Parquet commit, sum", f"{H:.2f} s ({100 * H / (C + H):.0f} % of sequential)"),
        ("1. sequential", f"{seq:.2f} s, {n / seq:.2f} prompts/s"),
        ("2. overlapped, compute on the same CPU", f"{ovl:.2f} s, {n / ovl:.2f} prompts/s ({seq / ovl:.2f}x)"),
    ]
    for x, sim_seq, sim_ovl in sims:
        c = C / x
        ideal = c + t_host[-1] if c >= H else t_compute[0] / x + H  # first compute, last host stage never overlap
        rows.append((f"3. device {x:g}x this CPU, frees the CPU: sequential -> overlapped",
                     f"{sim_seq:.2f} s -> {sim_ovl:.2f} s, {n / sim_seq:.2f} -> {n / sim_ovl:.2f} prompts/s "
                     f"({sim_seq / sim_ovl:.2f}x; ideal {ideal:.2f} s)"))
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
