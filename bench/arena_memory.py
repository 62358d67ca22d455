"""Reproduces the peak-RSS jumps that one glibc malloc arena removes (not a test: needs the real model).

    PYTHONPATH=. python bench/arena_memory.py [--calls 30]

Runs the fp32 logit lens of the embedded SmolLM2 on random vectors (3,000-20,000 per call, 64-row
blocks of 12.6 MB logits each) while one Python thread keeps allocating and freeing 200 kB buffers,
as Prefect's event loop and rich's refresh thread do next to ``blens extract``. Each call's peak RSS
(VmHWM, reset through /proc/self/clear_refs) is compared with the RSS before it. Two child
processes, the same inputs:

- MALLOC_ARENA_MAX=0: glibc's default (up to 8 arenas per core);
- MALLOC_ARENA_MAX=1: what ``blens`` and ``extract`` set on import (extract/allocator.py).

Measured on the 2-core dev machine, 20 calls: default arenas, largest rise within one call 4,884 MB and
RSS 8,270 MB after the loop (in separate runs the main heap grew by 1.4-1.6 GB on the very first call);
one arena, largest rise 27 MB and RSS 793 MB after the loop.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> tuple[int, int]:
    """(VmRSS, VmHWM) in MB."""
    vals = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) // 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def allocating_thread() -> None:
    while True:
        bufs = [bytearray(200_000) for _ in range(20)]
        del bufs
        time.sleep(0.002)


def child(calls: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from extract.job import make_lens
    from extract.models import cached_model

    threading.Thread(target=allocating_thread, daemon=True).start()
    lens = make_lens(cached_model("smollm2-135m", "cpu"), "fp32")
    g = torch.Generator().manual_seed(0)
    worst = 0
    for _ in range(calls):
        n = int(torch.randint(3000, 20000, (1,), generator=g))
        x, targets = torch.randn(n, 576, generator=g), torch.randint(0, 49152, (n, 2), generator=g)
        reset_peak()
        before = rss_mb()[0]
        lens.project(x, targets, 10)
        worst = max(worst, rss_mb()[1] - before)
    print(f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}: {calls} lens calls, largest peak-RSS rise "
          f"within one call {worst} MB, RSS after {rss_mb()[0]} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.calls)
    for arenas in ("0", "1"):
        env = dict(os.environ, MALLOC_ARENA_MAX=arenas, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)], env=env, check=True)


if __name__ == "__main__":
    main()
