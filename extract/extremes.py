"""Exact top-k of long rows (logit-lens rows: one value per vocabulary token) in two cheap passes.

``torch.topk`` over a 64 x 49,152 block of logits costs ~4 ms on this repo's CPU, and the lens needs it twice
(top and bottom) for every block: 27 % of the block's GEMM time (bench/results.md). Most of that is spent
keeping a candidate heap for every element. :func:`grouped_topk` instead cuts each row into groups of
``group`` consecutive tokens, takes each group's max (``amax``, a vectorised pass over the block, ~0.1 ms),
picks the k groups with the largest max, and runs ``topk`` on those k x ``group`` candidates only.

Why it is exact (the values are those of ``torch.topk`` over the whole row, always): let v be the row's k-th
largest value. An element x > v outside the chosen groups would lie in a group whose max is > v, so each of the
k chosen groups would have a max > v as well: k + 1 distinct elements above v, but only k - 1 exist. So every
element above v is a candidate. If an element equal to v is not a candidate, its group's max is >= v, so are
the k chosen groups' maxima, and those are k distinct candidates >= v; else every element equal to v is one.
Either way the k largest candidates are k largest values of the row. (A shorter last group, when ``group``
does not divide the row, is simply always a candidate: more candidates never break the argument.) Which
*indices* are returned among elements that tie exactly at v is, as with ``torch.topk``, unspecified.
"""

from __future__ import annotations

import torch

GROUP = 64  # tokens per group: measured best of 64 / 128 / 256 / 512 on a 64 x 49,152 block (bench/results.md)


def groups_pay(width: int, k: int, group: int = GROUP) -> bool:
    """Whether grouping pays: the k x ``group`` candidates are at most a quarter of the row."""
    return k * group * 4 <= width


def group_extremes(x: torch.Tensor, *, largest: bool, group: int = GROUP, out: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, width // group): each full group's max (or min), a view of contiguous ``x`` reduced in one pass.
    ``out``: where to write it (the lens fills one block's extremes a few rows at a time, from cache)."""
    rows, width = x.shape
    blocks = x.as_strided((rows, width // group, group), (width, group, 1))
    reduce = torch.amax if largest else torch.amin
    return reduce(blocks, -1) if out is None else reduce(blocks, -1, out=out)


def topk_of_groups(x: torch.Tensor, extreme: torch.Tensor, k: int, *, largest: bool = True,
                   group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (smallest) of each row of contiguous ``x``, given its :func:`group_extremes`: ``topk`` over
    the k groups with the largest (smallest) extreme, and over a shorter last group when ``group`` does not
    divide the row (GPT-2: 50,257 = 785 x 64 + 17), which is always a candidate."""
    rows, width = x.shape
    n_full = width // group
    blocks = x.as_strided((rows, n_full, group), (width, group, 1))
    chosen = torch.topk(extreme, k, dim=-1, largest=largest, sorted=False).indices  # (rows, k) groups
    candidates = blocks.gather(1, chosen.unsqueeze(-1).expand(rows, k, group)).reshape(rows, k * group)
    tail = x[:, n_full * group :]
    if tail.shape[1]:
        candidates = torch.cat([candidates, tail], 1)
    values, at = torch.topk(candidates, k, dim=-1, largest=largest)
    in_group = at < k * group
    group_of = chosen.gather(1, torch.where(in_group, at // group, 0))
    ids = torch.where(in_group, group_of * group + at % group, n_full * group + at - k * group)
    return values, ids


def grouped_topk(x: torch.Tensor, k: int, *, largest: bool = True, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest (or smallest) entries of each row of the 2-D ``x``, sorted like
    ``torch.topk(x, k, dim=-1, largest=largest)``: the same values, indices equal up to exact ties.

    Falls back to ``torch.topk`` where the candidates would not be a small share of the row (short rows,
    large k) and on CUDA, whose ``topk`` is already a single fused pass."""
    if x.device.type != "cpu" or not groups_pay(x.shape[1], k, group) or not x.is_contiguous():
        return torch.topk(x, k, dim=-1, largest=largest)
    return topk_of_groups(x, group_extremes(x, largest=largest, group=group), k, largest=largest, group=group)
