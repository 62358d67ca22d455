"""One glibc malloc arena for the whole process (and the processes it starts).

Why: glibc gives threads their own malloc arenas (up to 8 per core). ``blens extract`` runs torch's
OpenMP workers next to Prefect's event loop, heartbeat and rich's refresh threads, while the lens
allocates and frees one 12.6 MB logits block after another. Reproduced in isolation
(bench/arena_memory.py: the lens loop next to one Python thread allocating 200 kB buffers): with
glibc's default arenas one call's peak rose by 4.9 GB and RSS stood at 8.3 GB after 20 calls; with
one arena the largest rise was 27 MB and RSS 0.8 GB. Throughput with the cap: 7.32 prompts/s
marginal (bench/bench_extract.py), against 6.94 before it.

Not the whole story: ``blens extract`` under the cap still showed rare peaks (8.7 GB in one
2,000-prompt run, 4.9 GB in one 400-prompt run with --vectors spanning), cause not yet found; see
the README's throughput section.

An explicit MALLOC_ARENA_MAX in the environment wins. Child processes (Dask workers, shard
subprocesses) inherit the variable, which glibc reads at their start.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas(n: int = 1) -> bool:
    """Cap glibc's arenas at ``n`` unless the environment already chose; True if the cap was applied.

    Takes effect only for arenas created afterwards, so call it before other threads start (the
    ``blens`` and ``extract`` packages call it on import). A no-op off glibc (macOS, musl, Windows).
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "mallopt") or libc.mallopt(M_ARENA_MAX, n) != 1:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(n)
    return True
