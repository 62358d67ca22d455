"""GPU memory and time of ranks_for_batch on a SmolLM2-shaped batch (256 prompts x 16 tokens), per EIGEN_CHUNK.

    .venv/bin/python bench/rank_memory.py     # needs a CUDA device; the source of bench/device/h200-rank-memory.txt
"""
import time
from types import SimpleNamespace
import torch
from blens.extract import ranks
dev, B, T, L = "cuda", 256, 16, 30
torch.manual_seed(0)
inputs, vjps = {}, {}
for l in range(L):
    x1 = torch.randn(B, T, 576, device=dev); x2 = torch.randn(B, T, 1536, device=dev)
    inputs[(l, "ff1")] = x1; inputs[(l, "ff1_gate")] = x1; inputs[(l, "ff2")] = x2
    for m, d in (("ff1", 1536), ("ff1_gate", 1536), ("ff2", 576)):
        vjps[(l, m)] = torch.randn(B, T, d, device=dev)
sp = SimpleNamespace(inputs=inputs, vjps=vjps)
ref = None
for chunk in (10**9, 8192, 2048, 512):
    ranks.EIGEN_CHUNK = chunk
    for rep in range(2):
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter(); r = ranks.ranks_for_batch(sp, ["ff1", "ff1_gate", "ff2"], L); torch.cuda.synchronize()
        dt = time.perf_counter() - t
    out = torch.stack(list(r.values()))
    ref = out if ref is None else ref
    print(f"EIGEN_CHUNK {chunk}: {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB above the batch, "
          f"{dt * 1000:.0f} ms, same ranks {bool(torch.equal(out, ref))}", flush=True)
for n in (23040, 2048):
    c = torch.randn(n, 16, 16, device=dev, dtype=torch.float64); c = c @ c.mT
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    torch.linalg.eigvalsh(c); torch.cuda.synchronize()
    print(f"eigvalsh of {n} 16x16 float64: {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB extra")
