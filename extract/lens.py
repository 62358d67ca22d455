"""The logit lens over many vectors at once: final norm, then one unembedding GEMM per block of rows.

For each vector we need the top-k and bottom-k tokens with their logits and the rank of each target
token (rank = #{j : logit_j > logit_target}, 0 = most probable).

fp32 (the reference) is the straightforward computation: ``h @ W.T``, ``topk`` from both ends, one
comparison per target. It is only *organised* for speed, never changed numerically:

* rows are processed in blocks of ``chunk_rows`` (default 64): a 64 x 49152 logit block is 12 MB, so the
  ``topk`` and comparison passes after the GEMM run from cache (about 10x cheaper than at 1024 rows);
  vocabularies too big for that (Gemma 3) are cut into tiles as well (``extract/lens_tiles.py``);
* ranks are counted by comparing into one reused float32 scratch block and summing it (exact below
  2^24), and top-k/bottom-k go straight into the call's result tensors (``out=``): a block allocates its
  logits and nothing else of that size, so glibc's heap does not fragment (``LogitLens._project_fp32``).

bf16 (``dtype="bf16"``) runs the big GEMM in bfloat16 and must still agree with fp32. Two facts from
measuring real SmolLM2 lens vectors shape it:

1. Target ranks are sensitive at the 1e-6 level: tokens whose fp32 logit is within a few ulps of the
   target's are common (the target usually sits inside the bulk of the logit distribution). Computing
   the *same* logits with a different summation order (oneDNN instead of MKL, or a gathered dot
   product) changes ~0.8 % of ranks. So every logit that decides a rank or a top-k membership is
   recomputed with the very same GEMM routine as the reference, as a dense ``h @ W[cols].T`` over a
   column subset. MKL returns bit-identical values for a column subset as long as the block has >= 4
   rows and >= 64 columns (checked at import time of the tests, see tests/test_lens.py), so column
   sets are padded to at least 64.
2. The bf16 error is dominated by operand rounding, not output rounding, and scales with
   s = sqrt(sum_i h_i^2 max_j W_ji^2) (massive activations concentrate h in a few dimensions, so
   ||h|| ||W_j|| / sqrt(d) underestimates it by up to ~14x). Per row we use the margin
   e = c * 2^-9 * s + 2^-8 * (|x| + c * 2^-9 * s) around a value x (operand term + bf16 output
   rounding of a logit of size ~|x|), with c = ``margin`` (default 6, ~10 sigma of the observed error).

Per block: shortlist ``shortlist`` candidates from each end in bf16; a bf16 logit farther than e from a
target's exact logit is counted directly, the ones inside the band [t - e, t + e] are ambiguous. The
union of candidates, band columns and targets is rescored with one dense fp32 GEMM. A row whose
shortlist cannot be proven complete (its exact k-th value is not above the largest possible logit of
a non-candidate) is recomputed exactly in fp32 with the whole block.

Cost, honestly: on SmolLM2 the rank band is ~300-500 tokens per row and target, so the union covers most of
the vocabulary and bf16 is *not* faster than fp32 there (past ``max_band_frac`` a block is computed in fp32:
one extra bf16 GEMM). It pays off when targets sit in a sparse tail, and stays exact: on 4096 real SmolLM2
lens vectors it agreed with fp32 on 100 % of top-k ids, bottom-k ids and both target ranks.

On CUDA (docs/gpu.md) the fp32 lens is the same code with other block sizes: as many rows as a share of the
free GPU memory allows (:func:`lens_block_rows`), cuBLAS ``h @ W.T`` with TF32 off (:func:`fp32_exact`),
results written into device tensors sized for the whole call. Nothing in the block loop reads a value back
to the host (tests/test_gpu_paths.py checks this through the dispatcher), so the results leave the device in
the caller's one copy per batch. The bf16 mode is CPU-only: its rescoring relies on MKL returning
bit-identical values for column subsets, which cuBLAS does not promise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .lens_tiles import CPU_TILE_COLS, TILED_MIN_VOCAB, TiledUnembedding

BF16_UNIT = 2.0**-9  # half an ulp of bfloat16 relative to the value (8-bit significand)
MIN_RESCORE_COLS = 64  # below this MKL may take a kernel whose summation order differs from the full GEMM
MIN_RESCORE_ROWS = 4
CPU_BLOCK_ROWS = 64  # a 64 x V logits block stays in cache for the top-k and rank passes
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


def _ranks(logits: torch.Tensor, tl: torch.Tensor) -> torch.Tensor:
    """#{j: logits_j > tl} per row and target column of tl, as int32 (R, n_targets)."""
    counts = torch.empty((tl.shape[1], logits.shape[0]), dtype=torch.float32, device=logits.device)
    return _count_ranks(logits, tl, torch.empty_like(logits, dtype=torch.float32), counts).T.to(torch.int32)


def _unembed(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference fp32 logits ``h @ W.T (+ bias)`` through torch's default GEMM."""
    logits = h @ w.T
    if bias is not None:
        logits += bias
    return logits


def _exact_rows(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, k: int, targets: torch.Tensor) -> LensResult:
    return _exact_rows_from_logits(_unembed(h, w, bias), k, targets)


def _exact_rows_from_logits(logits: torch.Tensor, k: int, targets: torch.Tensor) -> LensResult:
    top = logits.topk(k, dim=-1)
    bottom = logits.topk(k, dim=-1, largest=False)
    ranks = _ranks(logits, logits.gather(1, targets))
    return LensResult(top.indices, top.values, bottom.indices, bottom.values, ranks.long())


def _dense_rescore(h, w, bias, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 logits of all rows of h at the sorted unique column set ``cols`` (padded to >= 64
    columns so MKL uses the same kernel, hence the same bits, as the full reference GEMM)."""
    V = w.shape[0]
    if cols.numel() < MIN_RESCORE_COLS:
        extra = torch.arange(MIN_RESCORE_COLS, device=cols.device)
        cols = torch.unique(torch.cat([cols, extra[extra < V]]))
    out = h @ w[cols].T
    if bias is not None:
        out += bias[cols]
    return cols, out


def _at(cols: torch.Tensor, exact: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """exact logits (rows, |cols|) looked up at token ids (rows, m)."""
    return exact.gather(1, torch.searchsorted(cols, ids))


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
    """Final norm + unembedding for batches of vectors; holds the weights in the dtypes it needs.

    ``gemm`` picks the fp32 GEMM routine of the fp32 lens. ``"onednn"`` (default on CPU when available)
    runs the unembedding as a oneDNN linear on a pre-packed weight, which on CPUs where MKL's sgemm takes
    a slow path is about twice as fast (bench/bench_extract.py measures both). The logits are the same
    fp32 dot products summed in another order (max |diff| ~1e-5), which moves a target rank only where
    another token ties it within that. ``"torch"`` is plain ``h @ W.T`` (CUDA, or no oneDNN); the bf16
    mode always uses it, because its rescoring relies on MKL's bit-identical column subsets.

    ``chunk_rows`` (rows per block) defaults to 64 on CPU and, for weights on CUDA, to
    :func:`lens_block_rows` of the free memory at each call. ``tile_cols``: vocabulary tile width of the CPU
    fp32 lens (0 = none; default: tiles on CPU from ``TILED_MIN_VOCAB`` tokens up).
    """

    def __init__(self, final_norm: torch.nn.Module, unembedding: torch.Tensor, bias: torch.Tensor | None = None,
                 *, dtype: str = "fp32", chunk_rows: int | None = None, shortlist: int = 32, margin: float = 6.0,
                 max_band_frac: float = 0.25, gemm: str = "auto", tile_cols: int | None = None):
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"lens dtype must be fp32 or bf16, not {dtype!r}")
        if gemm not in ("auto", "onednn", "torch"):
            raise ValueError(f"gemm must be auto, onednn or torch, not {gemm!r}")
        if unembedding.shape[0] >= 2**24:
            raise ValueError("ranks are counted in float32, exact only for vocabularies below 2^24 tokens")
        self.norm = final_norm
        self.w = unembedding.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float()
        if dtype == "bf16" and self.w.device.type != "cpu":
            raise ValueError("the bf16 lens is CPU-only (its exact rescoring relies on MKL's bit-identical column "
                             "subsets); use the fp32 lens on CUDA")
        self.dtype = dtype
        # rows per block: fixed when given; else 64 on CPU and, on CUDA, chosen per call from free memory
        self.chunk_rows = chunk_rows if chunk_rows is not None or self.w.device.type == "cuda" else CPU_BLOCK_ROWS
        self.shortlist = shortlist
        self.margin = margin
        self.max_band_frac = max_band_frac
        self.stats = {"rows": 0, "fallback_rows": 0, "rescored_cols": 0, "dense_blocks": 0}
        if gemm == "auto":
            gemm = "onednn" if dtype == "fp32" and onednn_available(self.w.device) else "torch"
        self.gemm = gemm
        # vocabulary tiles (extract/lens_tiles.py): auto = on CPU for vocabularies too big to stay cached
        on_cpu = self.w.device.type == "cpu"
        if tile_cols is None:
            tile_cols = CPU_TILE_COLS if on_cpu and self.w.shape[0] >= TILED_MIN_VOCAB else 0
        self.tiled = TiledUnembedding(self.w, self.bias, tile_cols, onednn=gemm == "onednn",
                                      rows=chunk_rows) if tile_cols and dtype == "fp32" and on_cpu else None
        if gemm == "onednn" and self.tiled is None:  # (the tiles hold their own packed copies)
            self.w_packed = torch.ops.mkldnn._reorder_linear_weight(self.w, None)
        if dtype == "bf16":
            self.w16 = self.w.to(torch.bfloat16)
            self.b16 = None if self.bias is None else self.bias.to(torch.bfloat16)
            self.col_max_sq = (self.w**2).amax(0)  # (d,) max_j W_ji^2: scale of the operand rounding error

    @classmethod
    def of(cls, view, dtype: str = "fp32") -> "LogitLens":
        """The lens of a :class:`~blens.extract.adapters.ModelView`: its final norm and LM head."""
        return cls(view.final_norm, view.unembedding, view.unembedding_bias, dtype=dtype)

    def block_rows(self, device: torch.device) -> int:
        """Rows per block for a call on ``device``."""
        return self.chunk_rows if self.chunk_rows is not None else lens_block_rows(self.w.shape[0], device)

    def project(self, vectors: torch.Tensor, targets: torch.Tensor, k: int) -> LensResult:
        """vectors (N, d) raw (the final norm is applied here); targets (N, n_targets) token ids.

        The results are on the vectors' device; on CUDA the call queues its work and returns without
        waiting for it (the caller's host copy is the one synchronisation)."""
        if self.dtype == "fp32":
            with fp32_exact():
                return self._project_fp32(vectors, targets, k)
        parts = []
        rows = max(self.block_rows(vectors.device), MIN_RESCORE_ROWS)
        with torch.inference_mode():
            for s in range(0, vectors.shape[0], rows):
                parts.append(self._bf16_rows(self.norm(vectors[s : s + rows].float()), k, targets[s : s + rows]))
        if not parts:
            return _empty_result(0, k, targets.shape[1], vectors.device)
        return LensResult(*(torch.cat([getattr(p, f) for p in parts]) for f in LensResult.__dataclass_fields__))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a block through the GEMM routine this lens was built with."""
        if self.gemm != "onednn":
            return _unembed(h, self.w, self.bias)
        logits = torch.ops.mkldnn._linear_pointwise(h.contiguous(), self.w_packed, None, "none", [], "")
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
        scratch = torch.empty((min(rows, N), self.w.shape[0]), dtype=torch.float32, device=vectors.device)
        with torch.inference_mode():
            for s in range(0, N, rows):
                logits = self._logits(self.norm(vectors[s : s + rows].float()))
                e = s + logits.shape[0]
                torch.topk(logits, k, dim=-1, out=(out.top_logits[s:e], out.top_ids[s:e]))
                torch.topk(logits, k, dim=-1, largest=False, out=(out.bottom_logits[s:e], out.bottom_ids[s:e]))
                _count_ranks(logits, logits.gather(1, targets[s:e]), scratch[: e - s], counts[:, s:e])
                del logits  # before the next block's logits are allocated, so they can reuse its memory
        out.target_ranks = counts.T.long()
        return out

    def _bf16_rows(self, h: torch.Tensor, k: int, targets: torch.Tensor) -> LensResult:
        w, bias = self.w, self.bias
        R, V = h.shape[0], w.shape[0]
        if R < MIN_RESCORE_ROWS:  # a tail block too small for bit-identical dense rescoring
            self.stats["rows"] += R
            self.stats["fallback_rows"] += R
            return _exact_rows(h, w, bias, k, targets)
        approx = h.to(torch.bfloat16) @ self.w16.T  # (R, V) bf16, stays bf16: no full-size fp32 copy
        if self.b16 is not None:
            approx += self.b16
        op_err = self.margin * BF16_UNIT * torch.sqrt((h * h) @ self.col_max_sq).unsqueeze(1)  # (R, 1)

        # Exact target logits first (they define the rank bands).
        tcols, texact = _dense_rescore(h, w, bias, torch.unique(targets))
        tl = _at(tcols, texact, targets)  # (R, n_t) fp32, same bits as the reference
        e_t = op_err + 2 * BF16_UNIT * (tl.abs() + op_err)
        lo, hi = tl - e_t, tl + e_t
        sure = torch.stack([torch.sum(approx > hi[:, j : j + 1], -1, dtype=torch.int32)
                            for j in range(targets.shape[1])], 1)
        # An all-zero row (e.g. a VJP that vanishes) has every logit exactly equal to the bias in any
        # summation order: its band would be the whole vocabulary, so it is handled on its own below.
        zero = (h == 0).all(-1, keepdim=True)
        band_rows, band_cols, band_tgt = [], [], []
        for j in range(targets.shape[1]):
            amb = (approx >= lo[:, j : j + 1]) & (approx <= hi[:, j : j + 1]) & ~zero
            r_, c_ = amb.nonzero(as_tuple=True)
            band_rows.append(r_)
            band_cols.append(c_)
            band_tgt.append(torch.full_like(r_, j))
        br, bc, bt = torch.cat(band_rows), torch.cat(band_cols), torch.cat(band_tgt)
        if bc.numel() > self.max_band_frac * V and torch.unique(bc).numel() > self.max_band_frac * V:
            # The dense rescoring would cost about as much as the reference GEMM itself: do that.
            self.stats["rows"] += R
            self.stats["dense_blocks"] += 1
            return _exact_rows(h, w, bias, k, targets)

        m = min(self.shortlist, V)
        top_c = approx.topk(m, dim=-1)
        bot_c = approx.topk(m, dim=-1, largest=False)
        cols = torch.unique(torch.cat([top_c.indices.reshape(-1), bot_c.indices.reshape(-1), bc, tcols]))
        cols, exact = _dense_rescore(h, w, bias, cols)
        self.stats["rows"] += R
        self.stats["rescored_cols"] += cols.numel()

        ranks = sure.long()
        if br.numel():
            pos = torch.searchsorted(cols, bc)
            greater = exact[br, pos] > tl[br, bt]
            ranks.view(-1).index_add_(0, br * targets.shape[1] + bt, greater.long())

        top_exact = _at(cols, exact, top_c.indices)
        bot_exact = _at(cols, exact, bot_c.indices)
        top_v, top_i = top_exact.topk(k, dim=-1)
        bot_v, bot_i = bot_exact.topk(k, dim=-1, largest=False)
        top_ids, bot_ids = top_c.indices.gather(1, top_i), bot_c.indices.gather(1, bot_i)
        # Completeness: a non-candidate j has bf16 logit <= the m-th candidate's a_m, so its exact logit
        # is at most a_m + e(a_m); the exact k-th must beat that (mirror image for the bottom).
        a_top = top_c.values[:, -1:].float()
        a_bot = bot_c.values[:, -1:].float()
        top_ok = top_v[:, -1:] > a_top + op_err + 2 * BF16_UNIT * (a_top.abs() + op_err)
        bot_ok = bot_v[:, -1:] < a_bot - op_err - 2 * BF16_UNIT * (a_bot.abs() + op_err)
        bad = ~(top_ok & bot_ok).squeeze(1) & ~zero.squeeze(1)
        if m >= V:
            bad[:] = False
        z = zero.squeeze(1)
        if z.any():  # logits are exactly the bias (or 0): the reference's own topk / count on that row
            zl = (torch.zeros(V) if bias is None else bias).expand(int(z.sum()), V)
            zb = _exact_rows_from_logits(zl.contiguous(), k, targets[z])
            top_ids[z], top_v[z], bot_ids[z], bot_v[z], ranks[z] = zb.top_ids, zb.top_logits, zb.bottom_ids, zb.bottom_logits, zb.target_ranks
        if bad.any():
            fb = _exact_rows(h, w, bias, k, targets)  # whole block: the reference's own shape and bits
            self.stats["fallback_rows"] += int(bad.sum())
            top_ids[bad], top_v[bad] = fb.top_ids[bad], fb.top_logits[bad]
            bot_ids[bad], bot_v[bad] = fb.bottom_ids[bad], fb.bottom_logits[bad]
            ranks[bad] = fb.target_ranks[bad]
        return LensResult(top_ids, top_v, bot_ids, bot_v, ranks)


def lens_for(lm) -> LogitLens:
    """A loaded model's logit lens, built once per model: packing the unembedding is not a per-batch expense
    (it copies the whole (V, d) matrix). ``lm``: a :class:`blens.extract.models.LoadedModel`."""
    lens = lm.__dict__.get("_lens")
    if lens is None:
        lens = lm.__dict__["_lens"] = LogitLens.of(lm.view)
    return lens
