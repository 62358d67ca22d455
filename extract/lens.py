"""The logit lens over many vectors at once: final norm, then one unembedding GEMM per block of rows.

For each vector we need the top-k and bottom-k tokens with their logits and the rank of each target
token (rank = #{j : logit_j > logit_target}, 0 = most probable).

fp32 (the reference) is the straightforward computation: ``h @ W.T``, ``topk`` from both ends, one
comparison per target. It is only *organised* for speed, never changed numerically.

On CPU the default is the **fused lens** (``extract/lens_fused.py``): ``W[slab] @ h.T`` for 512 vectors at a
time (256 for Gemma 3's vocabulary), the GEMM at 93-96 % of the machine's fp32 peak instead of ~80 %, and one
compiled pass over the logits (``extract/lens_pass.c``) for the group extremes and the rank counts. It needs a C
compiler and AVX2 once per machine (``extract/native.py``); without them, for inputs it must not take
(non-finite, or large enough to overflow), and on CUDA, the **block lens** below runs. Both are the fp32 lens:
the same answers up to fp32 near-ties (tests/extract/test_lens_fused.py). The block lens:

* rows are processed in blocks of ``chunk_rows`` (default 64 on CPU) for the GEMM, and every pass over a
  block's 12 MB of logits after it (group extremes, rank comparisons) runs :data:`PASS_ROWS` (16) rows at a
  time, so the passes after the first read from cache; vocabularies too big for even that (Gemma 3) are cut
  into tiles as well (``extract/lens_tiles.py``; built only when the block lens runs);
* top-k and bottom-k on CPU are the grouped top-k of ``extract/extremes.py``: the max (min) of each group of 64
  tokens picks k candidate groups, and ``topk`` runs on those alone; the same values as ``torch.topk`` over
  the whole row (proved there), 1.3 ms instead of 8.6 ms for both ends of a 64 x 49,152 block;
* ranks are counted by comparing into one reused float32 scratch and summing it (exact below 2^24), and the
  answers go straight into the call's result tensors: a block allocates its logits and nothing else of that
  size, so glibc's heap does not fragment (``LogitLens._project_fp32``).

On CUDA (docs/gpu.md) the fp32 lens is the same code with other block sizes: as many rows as a share of the
free GPU memory allows (:func:`lens_block_rows`), one pass over the whole block and torch's own ``topk``,
cuBLAS ``h @ W.T`` with TF32 off (:func:`fp32_exact`), results written into device tensors sized for the
whole call. Nothing in the block loop reads a value back to the host (tests/test_gpu_paths.py checks this
through the dispatcher), so the results leave the device in the caller's one copy per batch.

There is one dtype, fp32. A bf16 lens (a bfloat16 shortlist rescored in fp32, exact) existed until issue 22:
on this machine's CPU (AMD EPYC, no AMX) it measured 4x slower than the fp32 lens, and on CUDA it was
refused (its rescoring relied on MKL's bit-identical column subsets). It is in git history should an AMX
or GPU measurement ever show a win (bench/results.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from . import native
from .extremes import GROUP, group_extremes, groups_pay, topk_of_groups
from .lens_fused import FusedUnembedding
from .lens_tiles import CPU_TILE_COLS, TILED_MIN_VOCAB, TiledUnembedding

CPU_BLOCK_ROWS = 64  # rows per GEMM on CPU
PASS_ROWS = 16  # CPU: rows per pass over a block's logits (16 x 49,152 fp32 = 3 MB, read from cache by every pass)
DEVICE_BLOCK_ROWS = (256, 8192)  # bounds of a CUDA block; beyond 8192 rows the GEMM is already device-bound
DEVICE_LENS_MEMORY_FRACTION = 0.25  # share of the free GPU memory one lens block may take
LENS_BYTES_PER_LOGIT = 12  # per row and token of a block: fp32 logits, the fp32 rank scratch, top-k workspace


def lens_block_rows(vocab_size: int, device: torch.device | str, free_bytes: int | None = None) -> int:
    """Rows per lens block: 64 on CPU (cache-sized); on CUDA as many as a quarter of the free memory holds.

    A block needs its fp32 logits, the fp32 rank scratch of the same shape and top-k's workspace
    (:data:`LENS_BYTES_PER_LOGIT` bytes per logit, a bound). ``free_bytes`` defaults to
    ``torch.cuda.mem_get_info``; the result is a multiple of 256 within :data:`DEVICE_BLOCK_ROWS`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BLOCK_ROWS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    rows = int(DEVICE_LENS_MEMORY_FRACTION * free_bytes) // (LENS_BYTES_PER_LOGIT * vocab_size)
    lo, hi = DEVICE_BLOCK_ROWS
    return max(lo, min(hi, rows // 256 * 256))


@contextlib.contextmanager
def fp32_exact() -> Iterator[None]:
    """fp32 matmuls in full fp32 inside the block (no TF32 tensor cores on CUDA), whatever the caller set.

    ``torch.set_float32_matmul_precision("high")`` (which some libraries call) lets cuBLAS round fp32
    operands to TF32 (10-bit significand): logits would move by ~1e-3 relative, far beyond the ties that
    different summation orders produce, and target ranks would no longer match the CPU. A host-side flag:
    setting it synchronises nothing.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass
class LensResult:
    top_ids: torch.Tensor  # (N, k) int
    top_logits: torch.Tensor  # (N, k) float32
    bottom_ids: torch.Tensor  # (N, k), least probable first
    bottom_logits: torch.Tensor
    target_ranks: torch.Tensor  # (N, n_targets) int, 0 = most probable


def _empty_result(n: int, k: int, n_targets: int, device: torch.device | str = "cpu") -> LensResult:
    ids = dict(dtype=torch.long, device=device)
    vals = dict(dtype=torch.float32, device=device)
    return LensResult(torch.empty((n, k), **ids), torch.empty((n, k), **vals), torch.empty((n, k), **ids),
                      torch.empty((n, k), **vals), torch.empty((n, n_targets), **ids))


def _count_ranks(logits: torch.Tensor, tl: torch.Tensor, scratch: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """counts[j, r] = #{i: logits[r, i] > tl[r, j]}, for each target column j of tl.

    Each comparison goes into a float32 ``scratch`` of the logits' shape and is summed in float32:
    0/1 values sum exactly to any count below 2^24 (V is ~50k), and unlike ``(logits > t).sum(dtype=...)``
    it allocates nothing. That matters beyond speed (0.42 ms instead of 1.04 ms per 64 x 49152 block):
    the bool-then-cast form allocates a 3 MB and a 12.6 MB temporary per target and block, and those,
    interleaved with small long-lived results, fragmented glibc's heap by ~20 MB per block in some
    runs (a 2 GB peak for one 6,400-row call; reproduced by bench/lens_memory.py).
    """
    for j in range(tl.shape[1]):
        torch.gt(logits, tl[:, j : j + 1], out=scratch)
        torch.sum(scratch, -1, out=counts[j])
    return counts


def _unembed(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference fp32 logits ``h @ W.T (+ bias)`` through torch's default GEMM."""
    logits = h @ w.T
    if bias is not None:
        logits += bias
    return logits


def onednn_available(device: torch.device) -> bool:
    """Whether the pre-packed oneDNN linear can run here.

    It is reached through ``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, private ops
    that back ``torch.compile``'s CPU inductor path: the only public route to a pre-packed fp32 oneDNN GEMM.
    Being private they may vanish in a torch release, so both are probed here and the lens falls back to
    torch's public ``h @ W.T`` (same results up to summation order) when either is missing.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    return (device.type == "cpu" and torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


class LogitLens:
    """Final norm + unembedding for batches of vectors, in fp32.

    ``fused`` (default: on CPU wherever the compiled pass is available, unless ``tile_cols`` asks for tiles)
    runs the fused lens of extract/lens_fused.py; ``gemm`` then picks its slab GEMM (``"auto"``: the faster
    on this machine, measured once). ``fused=False`` is the block lens, the one CUDA runs.

    For the block lens, ``gemm`` picks its fp32 GEMM routine. ``"onednn"`` (default on CPU when available)
    runs the unembedding as a oneDNN linear on a pre-packed weight, which on CPUs where MKL's sgemm takes
    a slow path is about twice as fast (bench/bench_extract.py measures both). The logits are the same
    fp32 dot products summed in another order (max |diff| ~1e-5), which moves a target rank only where
    another token ties it within that. ``"torch"`` is plain ``h @ W.T`` (CUDA, or no oneDNN).

    ``chunk_rows`` (rows per block) defaults to 512 in the fused lens (fewer for big vocabularies:
    ``lens_fused.fused_rows``), 64 in the block lens on CPU and, for weights on CUDA, to :func:`lens_block_rows`
    of the free memory at each call. ``tile_cols``: vocabulary tile width of the CPU block lens (0 = none;
    default: tiles on CPU from ``TILED_MIN_VOCAB`` tokens up, used where the fused lens does not run).
    """

    def __init__(self, final_norm: torch.nn.Module, unembedding: torch.Tensor, bias: torch.Tensor | None = None,
                 *, chunk_rows: int | None = None, gemm: str = "auto", tile_cols: int | None = None,
                 fused: bool | None = None):
        if gemm not in ("auto", "onednn", "torch"):
            raise ValueError(f"gemm must be auto, onednn or torch, not {gemm!r}")
        asked_gemm = gemm
        if unembedding.shape[0] >= 2**24:
            raise ValueError("ranks are counted in float32, exact only for vocabularies below 2^24 tokens")
        self.norm = final_norm
        self.w = unembedding.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float()
        # rows per block: fixed when given; else 64 on CPU and, on CUDA, chosen per call from free memory
        self.chunk_rows = chunk_rows if chunk_rows is not None or self.w.device.type == "cuda" else CPU_BLOCK_ROWS
        if gemm == "auto":
            gemm = "onednn" if onednn_available(self.w.device) else "torch"
        self.gemm = gemm
        # vocabulary tiles (extract/lens_tiles.py) for the block lens: auto = on CPU for vocabularies too big
        # to stay cached; built at their first use (they hold oneDNN-packed copies of W: 671 MB for Gemma 3)
        on_cpu = self.w.device.type == "cpu"
        tiles_asked = bool(tile_cols)
        if tile_cols is None:
            tile_cols = CPU_TILE_COLS if on_cpu and self.w.shape[0] >= TILED_MIN_VOCAB else 0
        self._tile_cols, self._tile_rows = (tile_cols if on_cpu else 0), chunk_rows
        self._tiled: TiledUnembedding | None = None
        # the fused CPU lens (extract/lens_fused.py): by default wherever its compiled pass is available and
        # tiles were not asked for; the block lens (tiled or not) then answers only the inputs it refuses
        fusable = on_cpu and not tiles_asked
        if fused is None:
            fused = fusable and native.status().available
        elif fused and not fusable:
            raise ValueError("the fused lens runs on CPU over the whole vocabulary (not on CUDA, not with tiles)")
        elif fused and not native.status().available:
            raise ValueError(f"the fused lens needs its compiled pass: {native.status().detail}")
        self.fused = fused
        self._fused: FusedUnembedding | None = None  # built at the first call (it may time the GEMM routines)
        self._fused_routine = None if asked_gemm == "auto" else asked_gemm
        self._fused_rows = chunk_rows  # vectors per fused block when given (default: lens_fused.fused_rows)
        # oneDNN's packed copy of W for the block lens: built when that lens first runs (the tiles hold their
        # own packed copies, and with the fused lens the block lens runs only for inputs it refuses)
        self._w_packed: torch.Tensor | None = None

    @property
    def tiled(self) -> TiledUnembedding | None:
        """The block lens's vocabulary tiles, or None where it runs over the whole vocabulary (CUDA, small
        vocabularies, ``tile_cols=0``). Built at first use: a fused lens may never need them."""
        if self._tiled is None and self._tile_cols:
            self._tiled = TiledUnembedding(self.w, self.bias, self._tile_cols, onednn=self.gemm == "onednn",
                                           rows=self._tile_rows)
        return self._tiled

    @classmethod
    def of(cls, view) -> "LogitLens":
        """The lens of a :class:`~blens.extract.adapters.ModelView`: its final norm and LM head."""
        return cls(view.final_norm, view.unembedding, view.unembedding_bias)

    def block_rows(self, device: torch.device) -> int:
        """Rows per block for a call on ``device``."""
        return self.chunk_rows if self.chunk_rows is not None else lens_block_rows(self.w.shape[0], device)

    def project(self, vectors: torch.Tensor, targets: torch.Tensor, k: int) -> LensResult:
        """vectors (N, d) raw (the final norm is applied here); targets (N, n_targets) token ids.

        The results are on the vectors' device; on CUDA the call queues its work and returns without
        waiting for it (the caller's host copy is the one synchronisation)."""
        with fp32_exact():
            if self.fused and vectors.device.type == "cpu" and vectors.shape[0] and groups_pay(self.w.shape[0], k):
                result = self._project_fused(vectors, targets, k)
                if result is not None:
                    return result
            return self._project_fp32(vectors, targets, k)

    def _project_fused(self, vectors: torch.Tensor, targets: torch.Tensor, k: int) -> LensResult | None:
        """The fused CPU lens (extract/lens_fused.py), or None for inputs it must not take (non-finite, or
        large enough that a logit could overflow): the block lens answers those."""
        if self._fused is None:
            self._fused = FusedUnembedding(self.w, self.bias, routine=self._fused_routine, rows=self._fused_rows)
        with torch.no_grad():  # not inference_mode: the results must stay usable by autograd-tracked callers
            h = self.norm(vectors.float()).contiguous()
        if not self._fused.safe(h):
            return None
        return LensResult(*self._fused.project(h, targets, k))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a block through the GEMM routine this lens was built with."""
        if self.gemm != "onednn":
            return _unembed(h, self.w, self.bias)
        if self._w_packed is None:
            self._w_packed = torch.ops.mkldnn._reorder_linear_weight(self.w, None)
        logits = torch.ops.mkldnn._linear_pointwise(h.contiguous(), self._w_packed, None, "none", [], "")
        if self.bias is not None:
            logits += self.bias
        return logits

    def _project_fp32(self, vectors: torch.Tensor, targets: torch.Tensor, k: int) -> LensResult:
        """The reference lens, written so that its memory use per call is fixed and its heap stays flat.

        Results go straight into tensors sized for the whole call (``out=`` slices), the rank comparison
        reuses one scratch block, and each block's logits are released before the next block's are
        allocated. The only allocations left per block are the logits themselves and small
        temporaries, so the freed logits block is what the next one gets back from malloc. (Before
        this, the long-lived per-block results and two large temporaries per target interleaved with
        the logits, and in some runs every block landed on fresh heap: 2 GB for 6,400 rows.)
        """
        N, n_t = vectors.shape[0], targets.shape[1]
        rows = self.block_rows(vectors.device)
        if self.tiled is not None and N:
            with torch.no_grad():  # not inference_mode: the results must stay usable by autograd-tracked callers
                return LensResult(*self.tiled.project(self.norm(vectors.float()), targets, k))
        out = _empty_result(N, k, n_t, vectors.device)
        counts = torch.empty((n_t, N), dtype=torch.float32, device=vectors.device)  # exact: V < 2^24
        V = self.w.shape[0]
        grouped = vectors.device.type == "cpu" and groups_pay(V, k)
        if grouped:  # CPU: each pass runs over a few rows at a time, while they are in cache
            passes = min(PASS_ROWS, rows)
            extremes = torch.empty((2, min(rows, N), V // GROUP), dtype=torch.float32)
        else:  # CUDA (or a k too large for groups): one pass over the whole block, torch's topk
            passes = rows
        scratch = torch.empty((min(passes, N), V), dtype=torch.float32, device=vectors.device)
        with torch.inference_mode():
            for s in range(0, N, rows):
                logits = self._logits(self.norm(vectors[s : s + rows].float()))
                e = s + logits.shape[0]
                tl = logits.gather(1, targets[s:e])
                for p in range(0, e - s, passes):
                    q = min(p + passes, e - s)
                    part = logits[p:q]
                    if grouped:
                        group_extremes(part, largest=True, out=extremes[0, p:q])
                        group_extremes(part, largest=False, out=extremes[1, p:q])
                    _count_ranks(part, tl[p:q], scratch[: q - p], counts[:, s + p : s + q])
                if grouped:
                    out.top_logits[s:e], out.top_ids[s:e] = topk_of_groups(logits, extremes[0, : e - s], k)
                    out.bottom_logits[s:e], out.bottom_ids[s:e] = topk_of_groups(logits, extremes[1, : e - s], k,
                                                                                 largest=False)
                else:
                    torch.topk(logits, k, dim=-1, out=(out.top_logits[s:e], out.top_ids[s:e]))
                    torch.topk(logits, k, dim=-1, largest=False, out=(out.bottom_logits[s:e], out.bottom_ids[s:e]))
                del logits  # before the next block's logits are allocated, so they can reuse its memory
        out.target_ranks = counts.T.long()
        return out


def lens_for(lm) -> LogitLens:
    """A loaded model's logit lens, built once per model: packing the unembedding is not a per-batch expense
    (it copies the whole (V, d) matrix). ``lm``: a :class:`blens.extract.models.LoadedModel`."""
    lens = lm.__dict__.get("_lens")
    if lens is None:
        lens = lm.__dict__["_lens"] = LogitLens.of(lm.view)
    return lens
