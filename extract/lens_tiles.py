"""The fp32 logit lens over vocabulary tiles: for unembeddings too large to stay in the CPU's cache.

The plain fp32 lens (``LogitLens._project_fp32``) computes a block of rows against the whole vocabulary,
then runs top-k, bottom-k and the rank counts over that logits block. With Gemma 3's 262,144-token
vocabulary a 64-row block is 67 MB of logits and the unembedding is 671 MB: every block streams the whole
matrix from DRAM for its GEMM, and then every pass over the block's logits goes to DRAM again (measured:
35 % of the machine's fp32 GEMM peak for the whole projection, against 41 % for SmolLM2's 113 MB matrix).

Here the loop runs the other way round: the vocabulary is cut into tiles of ``tile_cols`` tokens (a tile of
the matrix stays in cache), and for each tile every block of rows is projected and its tile of logits (a few
MB) is folded, while still in cache, into each row's running top-k and bottom-k (the k best of the k best so
far and the tile's are the k best overall) and compared with the target logits (the tiles' counts add up).
CPU only: on CUDA the plain lens already takes thousands of rows per block (docs/gpu.md).

The rank needs each target's logit before any tile is seen, so it is computed first, by the same GEMM
routine over just the block's target columns (``subset_gemm``). With oneDNN that gives the very bits the
tiles give (measured on Gemma 3: 100 % of 1,024 target logits identical; a plain dot product matched 7 %,
and moved 3.9 % of Gemma's target ranks by up to 3 places through near-ties), so the ranks equal the plain
lens's. Should a GEMM ever round the subset differently, the target's own tile logit is still never counted
as greater than itself, and the answers differ only through fp32-level near-ties, which tests/extract/test_lens.py
excludes when it checks both paths against a float64 reference.
"""

from __future__ import annotations

from typing import Callable

import torch

from .extremes import grouped_topk

CPU_TILE_COLS = 4096  # a 4k x d fp32 tile (10 MB at d = 640) stays in cache while every row block passes
CPU_TILE_ROWS = 512  # rows per block: 512 x 4096 logits (8 MB) for the top-k and rank passes
TILED_MIN_VOCAB = 131072  # below this the whole unembedding stays cached and the plain lens is as fast
MIN_SUBSET_COLS = 64  # a column subset at least this wide, so the GEMM takes the same kernel as the tiles


def vocab_tiles(vocab_size: int, tile_cols: int = CPU_TILE_COLS) -> list[tuple[int, int]]:
    """[start, end) token ranges covering the vocabulary."""
    return [(c, min(c + tile_cols, vocab_size)) for c in range(0, vocab_size, tile_cols)]


def target_logits(h: torch.Tensor, targets: torch.Tensor, vocab_size: int, bias: torch.Tensor | None,
                  subset_gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: int) -> torch.Tensor:
    """(N, n_targets) fp32 logits of each row's targets, block by block through ``subset_gemm(hb, cols)``
    over the block's target columns (padded to :data:`MIN_SUBSET_COLS`)."""
    tl = torch.empty(targets.shape, dtype=torch.float32)
    for s in range(0, h.shape[0], rows):
        t = targets[s : s + rows]
        cols = torch.unique(t)
        if cols.numel() < MIN_SUBSET_COLS:
            cols = torch.unique(torch.cat([cols, torch.arange(min(MIN_SUBSET_COLS, vocab_size))]))
        tl[s : s + rows] = subset_gemm(h[s : s + rows], cols).gather(1, torch.searchsorted(cols, t))
    if bias is not None:
        tl += bias[targets]
    return tl


def project_tiled(h: torch.Tensor, targets: torch.Tensor, k: int, bias: torch.Tensor | None,
                  tiles: list[tuple[int, int]], tile_gemm: Callable[[int, torch.Tensor], torch.Tensor],
                  subset_gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  rows: int) -> tuple[torch.Tensor, ...]:
    """Top-k, bottom-k and target ranks of the normed vectors ``h`` (N, d) over the vocabulary tiles.

    ``tile_gemm(i, hb)`` returns the fp32 logits (R, tile width) of rows ``hb`` against tile ``i``, and
    ``subset_gemm(hb, cols)`` those against the token ids ``cols`` (bias not included in either). Returns
    (top_ids, top_logits, bottom_ids, bottom_logits, target_ranks) like ``LensResult``.
    """
    N, n_t = h.shape[0], targets.shape[1]
    # The running k best of each row (top: largest first; bottom: smallest first), merged tile by tile.
    best = {True: (torch.full((N, k), -torch.inf), torch.zeros((N, k), dtype=torch.long)),
            False: (torch.full((N, k), torch.inf), torch.zeros((N, k), dtype=torch.long))}
    tl = target_logits(h, targets, tiles[-1][1], bias, subset_gemm, rows)
    counts = torch.zeros((n_t, N), dtype=torch.float32)  # exact: V < 2^24
    partial = torch.empty((N,), dtype=torch.float32)
    scratch = torch.empty((min(rows, N), max(e - s for s, e in tiles)), dtype=torch.float32)
    for i, (c0, c1) in enumerate(tiles):
        for s in range(0, N, rows):
            e = min(s + rows, N)
            logits = tile_gemm(i, h[s:e])
            if bias is not None:
                logits += bias[c0:c1]
            _merge_best(logits, c0, s, best, k)
            sc = scratch[: e - s, : c1 - c0]
            t_in = targets[s:e] - c0
            here = (t_in >= 0) & (t_in < c1 - c0)
            own = logits.gather(1, t_in.clamp(0, c1 - c0 - 1))  # the target's own GEMM logit, where it is here
            for j in range(n_t):
                torch.gt(logits, tl[s:e, j : j + 1], out=sc)
                torch.sum(sc, -1, out=partial[: e - s])
                counts[j, s:e] += partial[: e - s]
                counts[j, s:e] -= (here[:, j] & (own[:, j] > tl[s:e, j])).float()
            del logits
    (top_v, top_i), (bot_v, bot_i) = best[True], best[False]
    return top_i, top_v, bot_i, bot_v, counts.T.long()


def _merge_best(logits: torch.Tensor, c0: int, s: int, best: dict, k: int) -> None:
    """Fold one tile of logits (rows s.., tokens c0..) into the running k best of each row, both ends.

    Only rows whose tile extreme beats their current k-th value can change, and after the first few tiles
    most cannot: a row's max or min (one cheap pass) decides, and ``topk`` runs on the other rows alone
    (measured on a 512 x 4096 tile: amax 0.17 ms, topk 1.8 ms).
    """
    e = s + logits.shape[0]
    for largest in (True, False):
        vals, ids = best[largest]
        extreme = logits.amax(-1) if largest else logits.amin(-1)
        kth = vals[s:e, -1]
        rows = ((extreme > kth) if largest else (extreme < kth)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        sub = logits if rows.numel() == logits.shape[0] else logits.index_select(0, rows)
        v, ix = grouped_topk(sub.contiguous(), min(k, logits.shape[1]), largest=largest)
        g = rows + s
        merged_v, pos = torch.topk(torch.cat([vals[g], v], 1), k, dim=-1, largest=largest)
        ids[g] = torch.cat([ids[g], ix + c0], 1).gather(1, pos)
        vals[g] = merged_v


class TiledUnembedding:
    """The unembedding cut into vocabulary tiles, each pre-packed for oneDNN when ``onednn`` (else plain
    ``h @ W.T``), with the GEMMs :func:`project_tiled` needs. ``rows``: rows per block (default
    :data:`CPU_TILE_ROWS`)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, tile_cols: int, *, onednn: bool,
                 rows: int | None = None):
        self.w, self.bias, self.onednn = w, bias, onednn
        self.tiles = vocab_tiles(w.shape[0], tile_cols)
        self.rows = rows or CPU_TILE_ROWS
        # packed per tile only: with a full packed copy as well, Gemma's 671 MB matrix would be held three times
        self.packed = [_pack(w[a:b].contiguous()) for a, b in self.tiles] if onednn else []

    def tile_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return _linear(h, self.packed[i])
        a, b = self.tiles[i]
        return h @ self.w[a:b].T

    def subset_logits(self, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        w = self.w[cols]
        return _linear(h, _pack(w)) if self.onednn else h @ w.T

    def project(self, h: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        return project_tiled(h, targets, k, self.bias, self.tiles, self.tile_logits, self.subset_logits, self.rows)


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, None)  # see lens.onednn_available for these private ops


def _linear(h: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(h.contiguous(), packed, None, "none", [], "")
