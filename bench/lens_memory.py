"""Does one lens call leave glibc's heap bigger than it found it? (Not a test: needs the real model.)

    PYTHONPATH=. python bench/lens_memory.py [--processes 10] [--rows 6400] [--form both]

Each trial is a fresh process (the failure was random per process: it depends on the heap's state
when the lens starts): load the embedded SmolLM2 and its fp32 lens, project ``--rows`` random vectors
(6,400 = 100 blocks of 64 rows, 12.6 MB of logits each), report the rise of peak RSS (VmHWM) over the
RSS before the call and glibc's heap size (mallinfo2 ``arena``) after it. One Python thread keeps
allocating 200 kB buffers meanwhile, as Prefect's event loop and rich's refresh thread do next to
``blens extract``.

``--form`` picks the rank counting of the lens:

- ``current``: ``LogitLens.project`` as shipped: one logits-sized allocation per block (the rank
  comparison goes into one reused scratch, top-k into the call's result tensors);
- ``legacy``: the form it replaced, kept here only to reproduce the problem: per block the results
  are collected in a list and each target's rank is ``torch.sum(logits > t, dtype=int32)``, which
  allocates a 3 MB bool and a 12.6 MB int32 temporary.

Measured on the 2-core dev machine (2026-11-24, ``--processes 10``): legacy, the heap grew by
1.6-2.2 GB in 4 of 10 processes (peak RSS 2.3-2.9 GB instead of 0.7 GB); current, 0 of 10, largest
peak-RSS rise 53 MB (and 0 of 20 in an ad-hoc loop without the allocating thread, where the old
code grew in about a third of the processes). See the README's throughput section.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mb() -> int:
    """glibc's main-heap size (mallinfo2.arena) in MB; -1 off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2().arena >> 20
    except (OSError, AttributeError):
        return -1


def rss_mb() -> tuple[int, int]:
    """(VmRSS, VmHWM) in MB."""
    vals = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) // 1024
    return vals["VmRSS"], vals["VmHWM"]


def allocating_thread() -> None:
    while True:
        bufs = [bytearray(200_000) for _ in range(20)]
        del bufs
        time.sleep(0.002)


def legacy_project(lens, vectors, targets, k: int) -> None:
    """The rank counting LogitLens used before 2026-11-24 (same results, different allocations)."""
    import torch

    parts = []
    with torch.inference_mode():
        for s in range(0, vectors.shape[0], lens.chunk_rows):
            logits = lens._logits(lens.norm(vectors[s : s + lens.chunk_rows].float()))
            tl = logits.gather(1, targets[s : s + lens.chunk_rows])
            ranks = torch.stack([torch.sum(logits > tl[:, j : j + 1], -1, dtype=torch.int32)
                                 for j in range(tl.shape[1])], 1)
            parts.append((logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False), ranks.long()))


def child(form: str, rows: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from blens.extract.lens import lens_for
    from blens.extract.models import cached_model

    threading.Thread(target=allocating_thread, daemon=True).start()
    lens = lens_for(cached_model("smollm2-135m", "cpu"))
    g = torch.Generator().manual_seed(0)
    x, targets = torch.randn(rows, 576, generator=g), torch.randint(0, 49152, (rows, 2), generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    before, heap_before = rss_mb()[0], heap_mb()
    if form == "legacy":
        legacy_project(lens, x, targets, 10)
    else:
        lens.project(x, targets, 10)
    print(json.dumps({"form": form, "rss_before": before, "peak": rss_mb()[1], "heap_before": heap_before,
                      "heap_after": heap_mb()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=10, help="fresh processes per form")
    ap.add_argument("--rows", type=int, default=6400, help="vectors in the one lens call per process")
    ap.add_argument("--form", choices=["current", "legacy", "both"], default="both")
    ap.add_argument("--child", choices=["current", "legacy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.rows)
    for form in (["legacy", "current"] if args.form == "both" else [args.form]):
        grew, worst = 0, 0
        for _ in range(args.processes):
            out = subprocess.run([sys.executable, __file__, "--child", form, "--rows", str(args.rows)],
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rise = r["peak"] - r["rss_before"]
            grew += r["heap_after"] - r["heap_before"] > 200
            worst = max(worst, rise)
            print(f"  {form}: peak RSS {r['peak']} MB (rise {rise} MB), heap {r['heap_before']} -> {r['heap_after']} MB",
                  flush=True)
        print(f"{form}: {args.rows} rows per call, heap grew by > 200 MB in {grew} of {args.processes} processes, "
              f"largest peak-RSS rise {worst} MB", flush=True)


if __name__ == "__main__":
    main()
