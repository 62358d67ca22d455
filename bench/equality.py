"""What "the same results" means for two extractions of the same prompts, and a check of it.

Two correct fp32 pipelines (CPU oneDNN vs plain torch GEMM, CPU vs CUDA) sum the same products in
different orders, so a logit may differ by ~1e-6 relative. That can only change an answer where two
logits are that close, so the comparison is exact everywhere except at such ties:

* gradient ranks: identical;
* top-k / bottom-k: the id *sets* identical, or else every id of both sets is a valid member under the
  float64 logits within ``rtol`` x the row's largest |logit| of the k-th value (a tie at the boundary);
* target ranks: equal, or else both inside the float64 tie interval
  [#{l > t + tol}, #{l > t - tol}] of the target's logit t.

The float64 logits are recomputed only for rows where the two results differ. Every difference is
counted, and the ones a tie does not explain make the comparison fail.

Used by bench/gpu_check.py and tests/extract/test_gpu_paths.py; needs torch, numpy and pyarrow only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

RTOL = 1e-5


@dataclass
class Verdict:
    rows: int = 0
    top_diff: int = 0  # rows whose top-k id set differs
    top_ties: int = 0  # ... of which explained by a tie at the k-th value
    bottom_diff: int = 0
    bottom_ties: int = 0
    rank_diff: int = 0  # (row, target) pairs whose rank differs
    rank_ties: int = 0
    grad_ranks: int = 0
    grad_rank_diff: int = 0
    max_logit_diff: float = 0.0  # max |top logit difference| over rows with the same top-k order
    max_loss_rel: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return (self.top_diff - self.top_ties) + (self.bottom_diff - self.bottom_ties) + (self.rank_diff - self.rank_ties)

    @property
    def ok(self) -> bool:
        return self.rows > 0 and self.unexplained == 0 and self.grad_rank_diff == 0 and not self.notes

    def summary(self) -> str:
        s = (f"{'PASS' if self.ok else 'FAIL'}: {self.rows} lens rows, top-10 sets {self.top_diff} diff "
             f"({self.top_ties} ties), bottom-10 {self.bottom_diff} ({self.bottom_ties} ties), target ranks "
             f"{self.rank_diff} diff ({self.rank_ties} ties); grad ranks {self.grad_rank_diff}/{self.grad_ranks} diff; "
             f"max abs d logit {self.max_logit_diff:.1e}, max loss rel {self.max_loss_rel:.1e}")
        return s + ("; " + "; ".join(self.notes) if self.notes else "")


def logits64(norm: torch.nn.Module, w: torch.Tensor, bias: torch.Tensor | None, vectors: torch.Tensor) -> torch.Tensor:
    """float64 logits of raw vectors: the final norm in fp32 (as both pipelines apply it), then the GEMM in
    float64, which is within ~1e-15 of the exact dot products."""
    with torch.inference_mode():
        h = norm(vectors.float().cpu()).double()
        out = h @ w.detach().cpu().double().T
        if bias is not None:
            out += bias.detach().cpu().double()
    return out


def compare_lens(ref: dict[str, np.ndarray], other: dict[str, np.ndarray], vectors: torch.Tensor,
                 targets: np.ndarray, norm, w, bias=None, *, rtol: float = RTOL, verdict: Verdict | None = None,
                 chunk: int = 256) -> Verdict:
    """Compare two lens results row by row (arrays top_ids, bottom_ids (N, k), target_ranks (N, t),
    top_logits (N, k)); ``vectors`` (N, d) are the raw lens inputs, ``targets`` (N, t) token ids."""
    v = verdict or Verdict()
    n = ref["top_ids"].shape[0]
    assert other["top_ids"].shape[0] == n, "results of different lengths"
    v.rows += n
    k = ref["top_ids"].shape[1]
    top_a, top_b = np.sort(ref["top_ids"], 1), np.sort(other["top_ids"], 1)
    bot_a, bot_b = np.sort(ref["bottom_ids"], 1), np.sort(other["bottom_ids"], 1)
    top_bad = (top_a != top_b).any(1)
    bot_bad = (bot_a != bot_b).any(1)
    rank_bad = ref["target_ranks"] != other["target_ranks"]
    same_order = (ref["top_ids"] == other["top_ids"]).all(1)
    if same_order.any():
        v.max_logit_diff = max(v.max_logit_diff, float(np.abs(ref["top_logits"][same_order].astype(np.float64)
                                                              - other["top_logits"][same_order]).max()))
    v.top_diff += int(top_bad.sum())
    v.bottom_diff += int(bot_bad.sum())
    v.rank_diff += int(rank_bad.sum())
    suspects = np.flatnonzero(top_bad | bot_bad | rank_bad.any(1))
    for s in range(0, len(suspects), chunk):
        idx = suspects[s : s + chunk]
        lg = logits64(norm, w, bias, vectors[torch.as_tensor(idx)])  # (r, V)
        tol = rtol * lg.abs().amax(1, keepdim=True)
        srt = lg.sort(1, descending=True).values
        V = srt.shape[1]
        kth_top, kth_bot = srt[:, k - 1 : k], srt[:, V - k : V - k + 1]  # k-th largest, k-th smallest
        for j, row in enumerate(idx):
            l = lg[j]
            if top_bad[row]:
                ids = np.concatenate([ref["top_ids"][row], other["top_ids"][row]])
                v.top_ties += bool((l[torch.as_tensor(ids)] >= kth_top[j] - tol[j]).all())
            if bot_bad[row]:
                ids = np.concatenate([ref["bottom_ids"][row], other["bottom_ids"][row]])
                v.bottom_ties += bool((l[torch.as_tensor(ids)] <= kth_bot[j] + tol[j]).all())
            for t in np.flatnonzero(rank_bad[row]):
                tl = l[int(targets[row, t])]
                lo, hi = int((l > tl + tol[j]).sum()), int((l > tl - tol[j]).sum())
                ra, rb = int(ref["target_ranks"][row, t]), int(other["target_ranks"][row, t])
                v.rank_ties += lo <= ra <= hi and lo <= rb <= hi
    return v


# ---- whole extractions (lists of per-batch Arrow tables) ------------------------------------------------


def _concat(batches: list[dict[str, pa.Table]], name: str) -> pa.Table:
    return pa.concat_tables([b[name] for b in batches if name in b])


def _lens_arrays(proj: pa.Table) -> dict[str, np.ndarray]:
    def lists(col: str) -> np.ndarray:
        arr = proj[col].combine_chunks()
        return arr.values.to_numpy(zero_copy_only=False).reshape(len(proj), -1)

    return {"top_ids": lists("top_ids"), "bottom_ids": lists("bottom_ids"), "top_logits": lists("top_logits"),
            "target_ranks": np.stack([proj["target_new_rank"].to_numpy(), proj["target_true_rank"].to_numpy()], 1)}


def compare_runs(ref: list[dict[str, pa.Table]], other: list[dict[str, pa.Table]], norm, w, bias=None, *,
                 rtol: float = RTOL) -> Verdict:
    """Compare two extractions of the same prompts, whatever their batching. ``ref`` must carry the
    ``vectors`` table (``vectors="spanning"``): its ff1_input/ff2_vjp rows are the lens inputs."""
    v = Verdict()
    keys = [("case_id", "ascending"), ("site", "ascending"), ("layer", "ascending"), ("position", "ascending")]
    # the sites whose vectors ``vectors="spanning"`` stores (the lens's other sites, attn_vjp and resid_post_vjp,
    # have no stored input to recompute the reference from)
    stored = pa.array(["ff1_input", "ff2_vjp"])
    pa_ref = _concat(ref, "projections")
    pa_ref = pa_ref.filter(pa.compute.is_in(pa_ref["site"], stored)).sort_by(keys)
    pa_oth = _concat(other, "projections")
    pa_oth = pa_oth.filter(pa.compute.is_in(pa_oth["site"], stored)).sort_by(keys)
    if len(pa_ref) != len(pa_oth) or not all(pa_ref[c].equals(pa_oth[c]) for c in ("case_id", "site", "layer", "position")):
        v.notes.append("projection rows differ")
        return v
    vec = _concat(ref, "vectors")
    vec = vec.filter(pa.compute.is_in(vec["site"], pa.array(["ff1_input", "ff2_vjp"]))).sort_by(keys)
    if len(vec) != len(pa_ref):
        v.notes.append("reference has no lens vectors (vectors='spanning')")
        return v
    vectors = torch.from_numpy(vec["vector"].combine_chunks().values.to_numpy().reshape(len(vec), -1).copy())
    prompts = _concat(ref, "prompts")
    tmap = {c: (a, b) for c, a, b in zip(prompts["case_id"].to_pylist(), prompts["target_new_id"].to_pylist(),
                                          prompts["target_true_id"].to_pylist())}
    targets = np.array([tmap[c] for c in pa_ref["case_id"].to_pylist()], dtype=np.int64)
    compare_lens(_lens_arrays(pa_ref), _lens_arrays(pa_oth), vectors, targets, norm, w, bias, rtol=rtol, verdict=v)

    gkeys = [("case_id", "ascending"), ("layer", "ascending"), ("matrix", "ascending")]
    g_ref = _concat(ref, "gradient_ranks").sort_by(gkeys)
    g_oth = _concat(other, "gradient_ranks").sort_by(gkeys)
    v.grad_ranks = len(g_ref)
    if len(g_ref) != len(g_oth):
        v.notes.append("gradient_ranks rows differ")
    else:
        v.grad_rank_diff = int((g_ref["rank"].to_numpy() != g_oth["rank"].to_numpy()).sum())
    la = prompts.sort_by("case_id")["loss"].to_numpy().astype(np.float64)
    lb = _concat(other, "prompts").sort_by("case_id")["loss"].to_numpy().astype(np.float64)
    v.max_loss_rel = float((np.abs(la - lb) / np.maximum(np.abs(la), 1e-12)).max()) if len(la) else 0.0
    if v.max_loss_rel > 1e-3:
        v.notes.append(f"losses differ by {v.max_loss_rel:.1e} relative")
    return v
