"""grouped_topk (extract/extremes.py) against torch.topk over the whole row: the same values always, and
indices that point at those values, each token once, on rows built to break a careless grouping."""

import pytest
import torch

from blens.extract.extremes import grouped_topk


def _check(x: torch.Tensor, k: int, largest: bool, group: int = 64) -> None:
    values, ids = grouped_topk(x, k, largest=largest, group=group)
    ref_values, _ = torch.topk(x, k, dim=-1, largest=largest)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, ids), values)  # the indices point at those values
    assert all(len(set(r)) == k for r in ids.tolist())  # no token twice


@pytest.mark.parametrize("width", [49152, 50257, 4096, 3000])  # SmolLM2, GPT-2 (a short last group), a Gemma tile, a fallback
@pytest.mark.parametrize("largest", [True, False])
def test_values_equal_torch_topk_on_random_rows(width, largest):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=g)
    for k in (1, 10, 20):
        _check(x, k, largest)


@pytest.mark.parametrize("largest", [True, False])
def test_rows_whose_extremes_crowd_into_one_group_or_the_last_short_one(largest):
    width, sign = 50257, 1 if largest else -1
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    x[0, 128:192] = sign * torch.arange(100.0, 164.0)  # every one of the top-k inside one group
    x[1, -17:] = sign * torch.arange(100.0, 117.0)  # ... inside the shorter last group (50257 = 785 x 64 + 17)
    x[2, ::64] = sign * 50.0  # every group's extreme ties
    x[3] = 0.0  # a zero vector's lens: every logit ties (the last layer's VJPs before the last position)
    for k in (1, 10, 17):
        _check(x, k, largest)
    values, ids = grouped_topk(x, 10, largest=largest)
    assert set(ids[0].tolist()) <= set(range(128, 192)) and set(ids[1].tolist()) <= set(range(width - 17, width))


def test_ties_and_few_distinct_values():
    x = torch.randint(0, 5, (16, 49152), generator=torch.Generator().manual_seed(1)).float()
    for largest in (True, False):
        _check(x, 10, largest)


def test_a_large_k_falls_back_to_the_whole_row():
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(2))
    _check(x, 1000, True)  # 1000 x 64 candidates would exceed the row: plain topk
