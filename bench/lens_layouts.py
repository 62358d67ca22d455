"""The lens GEMM in each layout, and the work after it, at SmolLM2's shape (not a test; ~2 minutes on 2 cores).

    PYTHONPATH=. .venv/bin/python bench/lens_layouts.py

1. GFLOP/s of the unembedding GEMM (49,152 x 576, random fp32) against a block of R vectors, every way this
   repo has measured it: oneDNN's pre-packed ``h @ W.T`` (the CPU lens today, R x V logits), MKL's ``h @ W.T``,
   and MKL's ``W[slab] @ h.T`` (V x R: the vocabulary as the long side), beside the 2048^3 peaks of the same run.
2. The work after the GEMM on one fresh 64 x 49,152 block (each timing starts after a new GEMM, so the block is
   as cold as in the lens): ``torch.topk`` from both ends + rank counts over the whole block (the lens before
   issue 26's changes) against the grouped top-k + rank counts 16 rows at a time (``LogitLens._project_fp32``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blens.extract.extremes import group_extremes, grouped_topk, topk_of_groups  # noqa: E402

V, D, K, N_TARGETS = 49152, 576, 10, 3


def best_of(f, reps: int = 5, inner: int = 4) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def linear(packed: torch.Tensor):
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> None:
    torch.manual_seed(0)
    w = torch.randn(V, D) * 0.05
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    sq = 2 * 2048**3 / 1e9
    print(f"2048^3 peak: MKL {sq / best_of(lambda: a @ b):.0f}, oneDNN "
          f"{sq / best_of(lambda: linear(torch.ops.mkldnn._reorder_linear_weight(b, None))(a)):.0f} GFLOP/s")
    lens = linear(torch.ops.mkldnn._reorder_linear_weight(w, None))
    print("R     oneDNN h@W.T   MKL h@W.T   MKL W[slab]@h.T (slab 4096)   GFLOP/s")
    for R in (64, 128, 256, 512):
        h = torch.randn(R, D)
        hT = h.T.contiguous()
        out = torch.empty(4096, R)
        flop = 2 * R * V * D / 1e9

        def slabs():
            for v0 in range(0, V, 4096):
                torch.mm(w[v0 : v0 + 4096], hT, out=out)

        print(f"{R:<5} {flop / best_of(lambda: lens(h)):>12.0f} {flop / best_of(lambda: h @ w.T):>11.0f} "
              f"{flop / best_of(slabs):>29.0f}", flush=True)

    h = torch.randn(64, D)
    targets = torch.randint(0, V, (64, N_TARGETS))
    scratch_full, scratch_16 = torch.empty(64, V), torch.empty(16, V)
    counts = torch.empty(N_TARGETS, 64)
    extremes = torch.empty(2, 64, V // 64)

    def before(logits):
        torch.topk(logits, K), torch.topk(logits, K, largest=False)
        tl = logits.gather(1, targets)
        for j in range(N_TARGETS):
            torch.gt(logits, tl[:, j : j + 1], out=scratch_full)
            torch.sum(scratch_full, -1, out=counts[j])

    def now(logits):
        tl = logits.gather(1, targets)
        for p in range(0, 64, 16):
            part = logits[p : p + 16]
            group_extremes(part, largest=True, out=extremes[0, p : p + 16])
            group_extremes(part, largest=False, out=extremes[1, p : p + 16])
            for j in range(N_TARGETS):
                torch.gt(part, tl[p : p + 16, j : j + 1], out=scratch_16)
                torch.sum(scratch_16, -1, out=counts[j, p : p + 16])
        topk_of_groups(logits, extremes[0], K), topk_of_groups(logits, extremes[1], K, largest=False)

    def after_gemm(f) -> float:
        total = 0.0
        for _ in range(20):
            logits = lens(h)
            t0 = time.perf_counter()
            f(logits)
            total += time.perf_counter() - t0
        return total / 20 * 1e3

    logits = lens(h)
    assert torch.equal(grouped_topk(logits, K)[0], torch.topk(logits, K).values)
    gemm_ms = best_of(lambda: lens(h)) * 1e3
    for name, f in (("torch.topk both ends + ranks over the block", before), ("grouped top-k + 16-row passes", now),
                    ("torch.topk both ends + ranks over the block", before), ("grouped top-k + 16-row passes", now)):
        print(f"after the 64-row GEMM ({gemm_ms:.1f} ms): {name}: {after_gemm(f):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
