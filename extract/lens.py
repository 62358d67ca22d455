"""The logit lens over many vectors at once: final norm, then one unembedding GEMM per chunk.

For each vector we need the top-k and bottom-k tokens with their logits and the rank of two target
tokens (0 = most probable). Per chunk of rows: one GEMM (rows x V), ``topk`` from both ends (a partial
selection, not a sort), and each target's rank as one comparison against that target's logit column:
rank = #{j : logit_j > logit_target}.

``dtype="bf16"`` runs the GEMM in bfloat16 (AMX on Sapphire Rapids, tensor cores on GPUs) and stays
exact: bf16 only *shortlists*. With unit roundoff u = 2^-8, every bf16 logit is within
e = c * ||h|| * ||W_j|| of the fp32 one (c = 4u covers rounding both operands and the bf16 output),
so the true top-k lies among the tokens whose bf16 logit is within 2e of the k-th bf16 logit; those
candidates are rescored in fp32. For target ranks, tokens whose bf16 logit is farther than e from the
exact fp32 target logit are counted directly and only the ambiguous band is rescored in fp32. Rows
whose shortlist overflows fall back to an exact fp32 row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BF16_ERROR_FACTOR = 4 * 2.0**-8


@dataclass
class LensResult:
    top_ids: torch.Tensor  # (N, k) int
    top_logits: torch.Tensor  # (N, k) float32
    bottom_ids: torch.Tensor  # (N, k), least probable first
    bottom_logits: torch.Tensor
    target_ranks: torch.Tensor  # (N, n_targets) int, 0 = most probable


def apply_final_norm(norm: torch.nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return norm(vectors)


def _exact_rows(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, k: int, targets: torch.Tensor) -> LensResult:
    logits = h @ w.T
    if bias is not None:
        logits += bias
    top = logits.topk(k, dim=-1)
    bottom = logits.topk(k, dim=-1, largest=False)
    tl = logits.gather(1, targets)
    ranks = torch.stack([(logits > tl[:, j : j + 1]).sum(-1) for j in range(targets.shape[1])], dim=1)
    return LensResult(top.indices, top.values, bottom.indices, bottom.values, ranks)


def _rescore(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """Exact fp32 logits of rows h (N, d) at columns idx (N, m)."""
    out = torch.einsum("nd,nmd->nm", h, w[idx])
    return out + bias[idx] if bias is not None else out


def _select(h, w, bias, cand: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    exact = _rescore(h, w, bias, cand)
    sel = exact.topk(k, dim=-1, largest=largest)
    return cand.gather(1, sel.indices), sel.values


def _bf16_rows(h, w, w16, w_norm_max, bias, k, targets, shortlist: int) -> LensResult:
    approx = (h.to(torch.bfloat16) @ w16.T).float()
    if bias is not None:
        approx += bias
    err = BF16_ERROR_FACTOR * h.norm(dim=-1, keepdim=True) * w_norm_max  # (N, 1) bound on |approx - exact|
    m = min(shortlist, approx.shape[1])
    top_c = approx.topk(m, dim=-1)
    bot_c = approx.topk(m, dim=-1, largest=False)
    # A shortlist is provably complete if the (m)-th candidate is already 2e below the k-th.
    top_ok = (top_c.values[:, k - 1 : k] - top_c.values[:, -1:] > 2 * err).squeeze(1)
    bot_ok = (bot_c.values[:, -1:] - bot_c.values[:, k - 1 : k] > 2 * err).squeeze(1)
    top_ids, top_vals = _select(h, w, bias, top_c.indices, k, True)
    bot_ids, bot_vals = _select(h, w, bias, bot_c.indices, k, False)

    exact_t = _rescore(h, w, bias, targets)  # (N, n_targets) exact target logits
    ranks = torch.empty_like(targets)
    band_ok = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for j in range(targets.shape[1]):
        t = exact_t[:, j : j + 1]
        sure = (approx > t + err).sum(-1)
        amb = (approx - t).abs() <= err
        rows, cols = amb.nonzero(as_tuple=True)
        greater = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        if rows.numel():
            ex = (h[rows] * w[cols]).sum(-1)
            if bias is not None:
                ex = ex + bias[cols]
            greater.index_add_(0, rows, (ex > t[rows, 0]).long())
        ranks[:, j] = sure + greater
    bad = ~(top_ok & bot_ok & band_ok)
    if bad.any():
        fb = _exact_rows(h[bad], w, bias, k, targets[bad])
        top_ids[bad], top_vals[bad] = fb.top_ids, fb.top_logits
        bot_ids[bad], bot_vals[bad] = fb.bottom_ids, fb.bottom_logits
        ranks[bad] = fb.target_ranks
    return LensResult(top_ids, top_vals, bot_ids, bot_vals, ranks)


class LogitLens:
    """Final norm + unembedding for batches of vectors; holds the weights in the dtypes it needs."""

    def __init__(self, final_norm: torch.nn.Module, unembedding: torch.Tensor, bias: torch.Tensor | None = None,
                 *, dtype: str = "fp32", chunk_rows: int = 1024, shortlist: int = 64):
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"lens dtype must be fp32 or bf16, not {dtype!r}")
        self.norm = final_norm
        self.w = unembedding.detach().float()
        self.bias = None if bias is None else bias.detach().float()
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.shortlist = shortlist
        if dtype == "bf16":
            self.w16 = self.w.to(torch.bfloat16)
            self.w_norm_max = self.w.norm(dim=-1).max()

    def project(self, vectors: torch.Tensor, targets: torch.Tensor, k: int) -> LensResult:
        """vectors (N, d) raw (the final norm is applied here); targets (N, n_targets) token ids."""
        parts = []
        with torch.inference_mode():
            for s in range(0, vectors.shape[0], self.chunk_rows):
                h = self.norm(vectors[s : s + self.chunk_rows].float())
                t = targets[s : s + self.chunk_rows]
                if self.dtype == "fp32":
                    parts.append(_exact_rows(h, self.w, self.bias, k, t))
                else:
                    parts.append(_bf16_rows(h, self.w, self.w16, self.w_norm_max, self.bias, k, t, self.shortlist))
        if not parts:
            e = torch.empty((0, k), dtype=torch.long)
            return LensResult(e, e.float(), e, e.float(), torch.empty((0, targets.shape[1]), dtype=torch.long))
        return LensResult(*(torch.cat([getattr(p, f) for p in parts]) for f in LensResult.__dataclass_fields__))
