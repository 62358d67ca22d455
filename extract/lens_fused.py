"""The CPU fp32 lens with the vocabulary as the GEMM's long side and one fused pass over the logits.

The block lens (``LogitLens._project_fp32``) computes ``h @ W.T`` for 64 vectors at a time: 64 x 49,152 logits
that stay in cache for the passes after the GEMM. At that shape the GEMM runs at ~80 % of the machine's
2048^3 fp32 peak. With the operands the other way round, ``W[slab] @ h.T`` for slabs of 2,048 tokens and
512 vectors, it runs at 93-96 % (MKL on this repo's AMD EPYC; bench/results.md, issue 26), but the logits
then lie vocabulary-major in a (V, 512) buffer, and torch's column-wise reductions over it cost what the
GEMM saves. So the answers come from one pass in C over the buffer (``lens_pass.c`` via
:mod:`~blens.extract.native`): every logit is read once for each group's max and min and for one compare per
target. The top-k and bottom-k are then exact through the group argument of extract/extremes.py (the k
groups with the largest maxima hold the k largest logits; a shorter last group is always a candidate), and
each target logit is read from the same buffer, so a rank counts the very values the GEMM wrote:
rank = #{v : logit_v > logit_target}, as in the block lens.

Numerically it is the fp32 lens: the same products summed by another GEMM kernel, so logits may differ from
the block lens's in the last bits and a rank moves only where another token ties the target within that
(tests/extract/test_lens_fused.py compares both with a float64 reference).

Which GEMM routine runs the slabs (MKL's ``torch.mm`` or oneDNN's linear) depends on the CPU: on this repo's
AMD box MKL reaches 175-178 GFLOP/s against oneDNN's 157-163 in this layout, and on the Intel box of earlier
sessions MKL's sgemm ran at half oneDNN's speed. :func:`slab_gemm_routine` times both once per machine and
keeps the answer beside the compiled pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time

import torch

from . import native
from .extremes import GROUP

# vectors per block: the buffer is V x 512 fp32 (96 MiB for SmolLM2). The whole lens on 6,144 real SmolLM2
# vectors, same sitting: 128 / 256 / 384 / 512 / 768 rows gave 82 / 88 / 89 / 91 / 92 % of the fp32 peak.
FUSED_ROWS = 512
# ... and fewer where that buffer would pass this size: Gemma 3's 262,144 tokens get 256 vectors per block
# (its whole lens, one sitting, bench/bench_gemma.py: 43.0 s at 256 rows, 45.2 s at 128, 55.5 s with the tiles)
FUSED_BUFFER_BYTES = 256 << 20
SLAB_TOKENS = 2048  # tokens per GEMM call: a 2,048 x 512 slab of logits (4 MB) is written while W's slab is hot
ROUTINES = ("torch", "onednn")  # MKL through torch.mm, or oneDNN's linear with h as the packed weight


def fused_rows(vocab_size: int) -> int:
    """Vectors per fused block for a vocabulary: :data:`FUSED_ROWS`, or fewer (a multiple of 64, at least 64)
    where the (V, rows) fp32 buffer would pass :data:`FUSED_BUFFER_BYTES`."""
    fit = FUSED_BUFFER_BYTES // (4 * max(vocab_size, 1)) // 64 * 64
    return max(64, min(FUSED_ROWS, fit))


def _machine_key() -> str:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()}"


def _time_routine(routine: str, w: torch.Tensor, h: torch.Tensor, buf: torch.Tensor) -> float:
    t0 = time.perf_counter()
    slab_logits(routine, w, h, None, buf)
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def slab_gemm_routine() -> str:
    """The faster slab GEMM on this machine, measured once (~0.1 s) and cached as JSON in
    ``$BLENS_CACHE/native/``, keyed by CPU model, torch version, CPU capability and thread count."""
    from .lens import onednn_available

    if not onednn_available(torch.device("cpu")):
        return "torch"
    key = _machine_key()
    path = native._cache_dir() / f"slab-gemm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return json.loads(path.read_text())["routine"]
    except (OSError, ValueError, KeyError):
        pass
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(4 * SLAB_TOKENS, 576, generator=g), torch.randn(FUSED_ROWS, 576, generator=g)
    buf = torch.empty(w.shape[0], FUSED_ROWS)
    times: dict[str, list[float]] = {r: [] for r in ROUTINES}
    for _ in range(4):  # alternated, fastest of each: this host's speed moves from second to second
        for r in ROUTINES:
            times[r].append(_time_routine(r, w, h, buf))
    best = min(ROUTINES, key=lambda r: min(times[r][1:]))  # the first round warms both up
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"routine": best, "machine": key,
                                   "seconds": {r: min(t[1:]) for r, t in times.items()}}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the probe again next time
    return best


def slab_logits(routine: str, w: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor) -> None:
    """buf (V, R) = W @ h.T (+ bias per token), slab by slab of :data:`SLAB_TOKENS` tokens."""
    V = w.shape[0]
    if routine == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(h.contiguous(), None)  # see lens.onednn_available
        for a in range(0, V, SLAB_TOKENS):
            b = min(a + SLAB_TOKENS, V)
            buf[a:b] = torch.ops.mkldnn._linear_pointwise(w[a:b], packed, None, "none", [], "")
            if bias is not None:
                buf[a:b] += bias[a:b, None]
        return
    hT = h.T.contiguous()
    for a in range(0, V, SLAB_TOKENS):
        b = min(a + SLAB_TOKENS, V)
        torch.mm(w[a:b], hT, out=buf[a:b])
        if bias is not None:
            buf[a:b] += bias[a:b, None]


class FusedUnembedding:
    """The unembedding for the fused CPU lens: ``project`` returns what ``LogitLens`` returns, for normed
    vectors. ``routine``: the slab GEMM (default: :func:`slab_gemm_routine`); ``rows``: vectors per block
    (default: :func:`fused_rows` of the vocabulary)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, *, routine: str | None = None,
                 rows: int | None = None):
        if routine is not None and routine not in ROUTINES:
            raise ValueError(f"routine must be one of {ROUTINES}, not {routine!r}")
        self.w, self.bias = w, bias
        self.routine = routine or slab_gemm_routine()
        self.rows = rows or fused_rows(w.shape[0])
        # |logit| <= d * max|h| * max|W| (+ max|bias|): below this bound no partial sum can overflow to inf
        self.w_absmax = float(w.abs().max()) if w.numel() else 0.0
        self.b_absmax = float(bias.abs().max()) if bias is not None and bias.numel() else 0.0

    def safe(self, h: torch.Tensor) -> bool:
        """Whether every logit of ``h`` is finite for sure (finite inputs, no possible overflow): the pass's
        max and min have no NaN rule, so anything else goes to the block lens."""
        if not h.numel():
            return True
        hmax = float(h.abs().max())  # NaN propagates through max and fails the comparison below
        return hmax * self.w_absmax * h.shape[1] + self.b_absmax < 1e37

    def project(self, h: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """(top_ids, top_logits, bottom_ids, bottom_logits, target_ranks) of the normed vectors ``h`` (N, d)."""
        N, nt = h.shape[0], targets.shape[1]
        V = self.w.shape[0]
        G = V // GROUP
        top_i, bot_i = (torch.empty((N, k), dtype=torch.long) for _ in range(2))
        top_v, bot_v = (torch.empty((N, k), dtype=torch.float32) for _ in range(2))
        ranks = torch.empty((N, nt), dtype=torch.long)
        rows = min(self.rows, max(N, 1))
        storage = torch.empty(V * rows, dtype=torch.float32)  # one buffer per call, reused by every block
        extremes = torch.empty((2, G * rows), dtype=torch.float32)
        in_group = torch.arange(GROUP)
        tail = torch.arange(G * GROUP, V)  # the shorter last group: always a candidate
        for s in range(0, N, rows):
            e = min(s + rows, N)
            n = e - s
            buf = storage[: V * n].view(V, n)
            slab_logits(self.routine, self.w, h[s:e], self.bias, buf)
            by_vector = buf.T  # (n, V), a strided view
            t = by_vector.gather(1, targets[s:e]).T.contiguous()  # each target's own logit, from this buffer
            gmax, gmin = extremes[0, : G * n].view(G, n), extremes[1, : G * n].view(G, n)
            counts = torch.zeros((nt, n), dtype=torch.int32)
            native.lens_pass(buf, t, gmax, gmin, counts, GROUP)
            ranks[s:e] = counts.T
            for largest, ext, vals, ids in ((True, gmax, top_v, top_i), (False, gmin, bot_v, bot_i)):
                chosen = torch.topk(ext.T, k, dim=-1, largest=largest, sorted=False).indices  # (n, k) groups
                tokens = (chosen.unsqueeze(-1) * GROUP + in_group).reshape(n, k * GROUP)
                if tail.numel():
                    tokens = torch.cat([tokens, tail.expand(n, -1)], 1)
                v, at = torch.topk(by_vector.gather(1, tokens), k, dim=-1, largest=largest)
                vals[s:e], ids[s:e] = v, tokens.gather(1, at)
        return top_i, top_v, bot_i, bot_v, ranks
