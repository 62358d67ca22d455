"""Issue 2, tests 1-2: the captured spanning sets rebuild autograd's weight gradients exactly, ranks
computed from them equal torch.linalg.matrix_rank, and batching changes nothing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from blens.extract.capture import capture
from blens.extract.tables import extract_batch
from blens.extract.lens import LogitLens
from blens.extract.prepare import prepare
from blens.extract.ranks import gradient_ranks, ranks_for_batch

from builders import assert_spanning_sets_rebuild_gradients, autograd_weight_grads
from builders import records


@pytest.fixture
def prepared(tiny_lm):
    return [prepare(r, tiny_lm.tokenizer, 64) for r in records()]


def test_spanning_sets_rebuild_every_mlp_gradient(tiny_lm, prepared):
    assert_spanning_sets_rebuild_gradients(tiny_lm, prepared)


def test_pad_positions_carry_nothing(tiny_lm, prepared):
    spans = capture(tiny_lm.view, prepared, tiny_lm.tokenizer.pad_token_id)
    pad = ~spans.mask
    assert pad.any(), "fixture prompts should have different lengths"
    for t in list(spans.inputs.values()) + list(spans.vjps.values()):
        assert t[pad].abs().max().item() == 0.0


def test_ranks_equal_matrix_rank_of_autograd_gradient(tiny_lm, prepared):
    spans = capture(tiny_lm.view, prepared, tiny_lm.tokenizer.pad_token_id)
    ranks = ranks_for_batch(spans, tiny_lm.view.matrix_names, tiny_lm.view.n_layers)
    last = tiny_lm.view.n_layers - 1
    for b, p in enumerate(prepared):
        ref, _ = autograd_weight_grads(tiny_lm, p)
        for key, g in ref.items():
            assert ranks[key][b].item() == torch.linalg.matrix_rank(g).item(), (tiny_lm.name, b, key)
        assert ranks[(last, "ff2")][b].item() == 1  # only the last position reaches the loss
        assert ranks[(0, "ff1")][b].item() == min(p.n_tokens, 64)


def test_rank_from_core_catches_rank_deficiency():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 40)
    d = torch.randn(1, 6, 30)
    d[0, 3] = 2 * d[0, 1] - d[0, 2]  # one VJP in the span of others: rank 5
    d[0, 5] = 0  # a position that does not reach the loss: rank 4
    assert gradient_ranks(x, d).item() == torch.linalg.matrix_rank(x[0].T @ d[0]).item() == 4


def test_batched_and_single_prompt_extraction_agree(tiny_lm, prepared):
    lens = LogitLens(tiny_lm.view.final_norm, tiny_lm.view.unembedding)
    batched = extract_batch(tiny_lm, prepared, "r", lens=lens, vectors="all")
    singles = [extract_batch(tiny_lm, [p], "r", lens=lens, vectors="all") for p in prepared]
    for name in ("prompts", "tokens", "gradient_ranks", "projections", "vectors", "vjp_similarity"):
        key = [c for c in ("case_id", "site", "layer", "matrix", "position") if c in batched[name].column_names]
        a = batched[name].sort_by([(k, "ascending") for k in key])
        b = pa.concat_tables([s[name] for s in singles]).sort_by([(k, "ascending") for k in key])
        assert a.num_rows == b.num_rows > 0, name
        for col in a.column_names:
            x, y = a[col].to_pylist(), b[col].to_pylist()
            if col in ("loss", "norm", "top_logits", "bottom_logits", "vector", "cosines"):
                flat = lambda col_: [v for r in col_ for v in (r if isinstance(r, list) else [r])]  # noqa: E731
                xt = torch.tensor(flat(x), dtype=torch.float64)
                yt = torch.tensor(flat(y), dtype=torch.float64)
                rel = ((xt - yt).norm() / yt.norm().clamp_min(1e-30)).item()
                assert rel <= 1e-5, (name, col, rel)
            elif col in ("target_new_rank", "target_true_rank", "model_answer_rank"):
                # A random tiny model puts ~50k logits within +-1: a 1e-7 change of GEMM blocking between
                # batch shapes moves a rank by a few places. Real models are checked in test_lens.py.
                diff = (torch.tensor(x) - torch.tensor(y)).abs()
                assert diff.max().item() <= 16 and (diff == 0).float().mean().item() >= 0.9, (name, col)
            elif col in ("top_ids", "bottom_ids", "top_tokens", "bottom_tokens"):
                same = sum(u == v for u, v in zip(x, y)) / len(x)
                assert same >= 0.98, (name, col, same)  # fp32 near-ties may swap between batch shapes
            else:
                assert x == y, (name, col)


def test_vectors_all_rebuild_every_gradient_from_the_table(tiny_lm, prepared):
    """--vectors all stores enough to rebuild every MLP gradient from the warehouse rows alone."""
    tables = extract_batch(tiny_lm, prepared[:1], "r", vectors="all")
    vec = tables["vectors"]
    ref, _ = autograd_weight_grads(tiny_lm, prepared[0])
    for (layer, matrix), g in ref.items():
        if matrix.startswith("attn_"):
            continue  # --vectors all keeps the MLP's spanning sets (the attention's are ranked, not stored)
        in_site = "ff1_input" if matrix.startswith("ff1") else "ff2_input"
        out_site = "ff2_vjp" if matrix == "ff2" else f"{matrix}_vjp"

        def rows(site):
            t = vec.filter(pc.and_(pc.equal(vec["layer"], layer), pc.equal(vec["site"], site)))
            t = t.sort_by("position")
            return torch.tensor(t["vector"].to_pylist())

        rebuilt = rows(in_site).T @ rows(out_site)
        assert ((rebuilt - g).norm() / g.norm()).item() <= 1e-5


def test_spanning_sets_are_exact_in_float64(tiny_lm, prepared):
    """The same rebuild in float64 (only the loss's logits stay fp32): every MLP and attention gradient,
    GPT-2's split c_attn parts included, agrees with autograd to 1e-6 relative, so what the fp32 check allows
    is rounding, not a missing term."""
    import copy

    from blens.extract.models import wrap_model

    lm = wrap_model(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, name=tiny_lm.name)
    lm.model.double()  # after wrapping (wrap_model loads in fp32)
    spans = capture(lm.view, prepared, lm.tokenizer.pad_token_id)
    for b, p in enumerate(prepared[:2]):
        ref, _ = autograd_weight_grads(lm, p)
        assert {m for _, m in ref} >= {"attn_q", "attn_k", "attn_v", "attn_o", "ff1", "ff2"}
        for key, g in ref.items():
            rebuilt = spans.gradient(*key, row=b)
            assert rebuilt.dtype == torch.float64
            assert ((rebuilt - g).norm() / g.norm()).item() <= 1e-6, (lm.name, b, key)


def test_attention_ranks_equal_matrix_rank_and_gpt2_c_attn_is_split(tiny_lm, prepared):
    """attn_q/k/v/o ranks equal torch.linalg.matrix_rank of autograd's gradient; GPT-2's fused c_attn gradient is
    the three parts side by side."""
    view = tiny_lm.view
    spans = capture(view, prepared, tiny_lm.tokenizer.pad_token_id)
    ranks = ranks_for_batch(spans, view.matrix_names, view.n_layers)
    p = prepared[0]
    ref, _ = autograd_weight_grads(tiny_lm, p)
    for layer in range(view.n_layers):
        for m in ("attn_q", "attn_k", "attn_v", "attn_o"):
            assert ranks[(layer, m)][0].item() == torch.linalg.matrix_rank(ref[(layer, m)]).item(), (layer, m)
            assert ranks[(layer, m)][0].item() <= p.n_tokens  # Lemma 4.1
    if view.family.name == "gpt2":
        fused = torch.cat([ref[(1, m)] for m in ("attn_q", "attn_k", "attn_v")], dim=1)
        assert fused.shape == view.matrix(1, "attn_q").weight.shape  # Conv1D: (d_in, 3 d)
        assert torch.equal(view.weight(1, "attn_k"), view.matrix(1, "attn_q").weight[:, fused.shape[1] // 3: 2 * fused.shape[1] // 3])
