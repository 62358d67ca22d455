"""LogitLens against a naive per-vector computation, and its GEMM routines and vocabulary tiles against each other
(CPU, synthetic, fast)."""

from __future__ import annotations

import pytest
import torch

from blens.extract import native
from blens.extract.lens import LensResult, LogitLens

K = 10
needs_native = pytest.mark.skipif(not native.status().available,
                                  reason=f"no fused lens pass here: {native.status().detail}")


def naive(norm: torch.nn.Module, w: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor, k: int):
    """Each vector normed on its own, logits in float64, a full sort, a count. Returns (top, bottom, ranks,
    gaps) where gaps[i] is the smallest float64 distance that decides row i's answers: near-ties are
    ill-posed in fp32 (two correct fp32 GEMMs with different summation orders may order them
    differently), so callers compare only rows whose gap is clearly above fp32 rounding."""
    with torch.no_grad():
        h = torch.cat([norm(v.unsqueeze(0).float()) for v in vectors]).double()
    logits = h @ w.double().T
    s, order = logits.sort(-1, descending=True)
    tl = logits.gather(1, targets)
    ranks = (logits.unsqueeze(1) > tl.unsqueeze(-1)).sum(-1)
    gap = torch.minimum(s[:, : k + 1].diff().abs().amin(-1), s[:, -k - 1 :].diff().abs().amin(-1))
    d = (logits.unsqueeze(1) - tl.unsqueeze(-1)).abs()
    d.scatter_(2, targets.unsqueeze(-1), float("inf"))
    gap = torch.minimum(gap, d.amin((1, 2)))
    return order[:, :k], order.flip(-1)[:, :k], ranks, gap


def agreement(a: LensResult, b: LensResult) -> dict[str, float]:
    """Fraction of vectors (rows) on which two lens results agree exactly, per output."""
    n = a.top_ids.shape[0]
    assert b.top_ids.shape[0] == n and n > 0
    out = {
        "top_ids": (a.top_ids == b.top_ids).all(-1).double().mean().item(),
        "bottom_ids": (a.bottom_ids == b.bottom_ids).all(-1).double().mean().item(),
    }
    for j in range(a.target_ranks.shape[1]):
        out[f"rank{j}"] = (a.target_ranks[:, j] == b.target_ranks[:, j]).double().mean().item()
    return out


def check_against_naive(lens: LogitLens, norm, w, vectors, targets):
    res = lens.project(vectors, targets, K)
    top, bot, ranks, gaps = naive(norm, w, vectors, targets, K)
    clean = gaps > 1e-5  # rows without fp32-level near-ties
    assert clean.float().mean() > 0.9, "test data has too many near-ties to be meaningful"
    assert torch.equal(res.top_ids[clean], top[clean])
    assert torch.equal(res.bottom_ids[clean], bot[clean])
    assert torch.equal(res.target_ranks[clean].long(), ranks[clean])
    # logits really are the projections, bottom least probable first
    h = norm(vectors.float())
    exp_top = (h @ w.T).gather(1, res.top_ids)
    torch.testing.assert_close(res.top_logits, exp_top, rtol=1e-5, atol=1e-5)
    assert (res.bottom_logits.diff(dim=1) >= 0).all() and (res.top_logits.diff(dim=1) <= 0).all()
    return res


def make_targets(n, V, g):
    return torch.randint(0, V, (n, 2), generator=g)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_native)], ids=["blocks", "fused"])
@pytest.mark.parametrize("chunk_rows", [7, 64])
def test_random_rmsnorm_matches_naive(chunk_rows, fused):
    g = torch.Generator().manual_seed(0)
    d, V, N = 24, 5000, 150
    w = torch.randn(V, d, generator=g) * 0.3
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    vectors = torch.randn(N, d, generator=g) * 3
    vectors[5] = 0  # an all-zero vector (e.g. a vanished VJP)
    lens = LogitLens(norm, w, chunk_rows=chunk_rows, fused=fused)
    check_against_naive(lens, norm, w, vectors, make_targets(N, V, g))


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
@pytest.mark.parametrize("tile_cols", [1024, 333])  # 333: the last tile has 5 tokens, fewer than K
def test_vocabulary_tiles_match_naive(gemm, tile_cols):
    from blens.extract.lens import onednn_available

    if gemm == "onednn" and not onednn_available(torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(1)
    d, V, N = 24, 5000, 150
    w = torch.randn(V, d, generator=g) * 0.3
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    vectors = torch.randn(N, d, generator=g) * 3
    vectors[7] = 0
    lens = LogitLens(norm, w, chunk_rows=64, gemm=gemm, tile_cols=tile_cols)
    assert len(lens.tiled.tiles) == -(-V // tile_cols)
    targets = make_targets(N, V, g)
    targets[:, 1] = lens.tiled.tiles[-1][0]  # a target in the narrow last tile
    check_against_naive(lens, norm, w, vectors, targets)


def test_vocabulary_tiles_add_the_bias_and_are_chosen_for_big_vocabularies():
    g = torch.Generator().manual_seed(2)
    d, V, N = 16, 3000, 64
    w, bias = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    v, t = torch.randn(N, d, generator=g), make_targets(N, V, g)
    plain = LogitLens(torch.nn.Identity(), w, bias, gemm="torch", tile_cols=0, fused=False).project(v, t, K)
    tiled = LogitLens(torch.nn.Identity(), w, bias, gemm="torch", tile_cols=700).project(v, t, K)
    assert agreement(plain, tiled) == {"top_ids": 1.0, "bottom_ids": 1.0, "rank0": 1.0, "rank1": 1.0}
    torch.testing.assert_close(tiled.bottom_logits, plain.bottom_logits)
    from blens.extract.lens_tiles import TILED_MIN_VOCAB

    # the block lens's tiles (built at first use), from TILED_MIN_VOCAB tokens up: Gemma 3 has 262,144
    assert LogitLens(torch.nn.Identity(), torch.randn(TILED_MIN_VOCAB, 4), fused=False).tiled is not None
    assert LogitLens(torch.nn.Identity(), torch.randn(TILED_MIN_VOCAB - 1, 4), fused=False).tiled is None  # SmolLM2


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=5000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.norm.weight.uniform_(0.5, 2.0)
    return m.model.norm, m.lm_head.weight.detach() * 50  # init std 0.02 would make every logit a near-tie


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=5000, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(2)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.uniform_(0.5, 2.0)
        m.transformer.ln_f.bias.uniform_(-0.5, 0.5)
    return m.transformer.ln_f, m.lm_head.weight.detach() * 50


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_native)], ids=["blocks", "fused"])
@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_tiny_model_final_norm_matches_naive(make, fused):
    norm, w = make()
    g = torch.Generator().manual_seed(3)
    N = 120
    vectors = torch.randn(N, w.shape[1], generator=g) * 2
    check_against_naive(LogitLens(norm, w, chunk_rows=32, fused=fused), norm, w, vectors, make_targets(N, w.shape[0], g))


def test_bias_is_added():
    g = torch.Generator().manual_seed(4)
    d, V, N = 16, 3000, 64
    w = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g)
    norm = torch.nn.Identity()
    v = torch.randn(N, d, generator=g)
    t = make_targets(N, V, g)
    ref = LogitLens(norm, w, b).project(v, t, K)
    logits = v @ w.T + b
    assert torch.equal(ref.top_ids, logits.topk(K, -1).indices)


def realistic_problem(n: int, seed: int = 0):
    """SmolLM2-sized lens problem: V = 49152, d = 576, ||W_j|| ~ 3, final-normed vectors with a few
    massive dimensions (as real residual streams have), targets spread from top to bulk."""
    g = torch.Generator().manual_seed(seed)
    V, d = 49152, 576
    w = torch.randn(V, d, generator=g) * 0.13
    norm = torch.nn.RMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) * 1.5 + 0.25)
    v = torch.randn(n, d, generator=g)
    v[:, :3] *= 20  # massive activations: stresses the error model beyond ||h|| ||W|| / sqrt(d)
    with torch.no_grad():
        logits = norm(v) @ w.T
    pick = torch.randint(0, 2000, (n, 2), generator=g)
    pick[:, 1] = torch.randint(0, V, (n,), generator=g)
    t = logits.argsort(-1, descending=True).gather(1, pick)  # target_new near the top, target_true anywhere
    return norm, w, v, t


@pytest.fixture(scope="module")
def realistic():
    norm, w, v, t = realistic_problem(256)
    ref = LogitLens(norm, w, gemm="torch", fused=False).project(v, t, K)  # the block lens, plain h @ W.T
    return norm, w, v, t, ref


def test_onednn_fp32_gemm_agrees_with_plain_matmul(realistic):
    """The default fp32 lens (oneDNN GEMM) sums the same products in another order: top-k identical,
    target ranks move only through near-ties (<= 2 % of vectors here, by at most a couple of places)."""
    norm, w, v, t, ref = realistic
    lens = LogitLens(norm, w, fused=False)
    if lens.gemm != "onednn":
        pytest.skip("oneDNN is not available in this torch build")
    res = lens.project(v, t, K)
    agree = agreement(res, ref)
    assert agree["top_ids"] >= 0.99 and agree["bottom_ids"] >= 0.99
    assert agree["rank0"] >= 0.98 and agree["rank1"] >= 0.98
    assert (res.target_ranks - ref.target_ranks).abs().max().item() <= 5
    assert torch.allclose(res.top_logits, ref.top_logits, rtol=1e-5, atol=1e-4)


def test_agreement_measure_is_per_vector_and_order_sensitive(realistic):
    *_, ref = realistic
    n = ref.top_ids.shape[0]
    assert agreement(ref, ref) == {"top_ids": 1.0, "bottom_ids": 1.0, "rank0": 1.0, "rank1": 1.0}
    bad = LensResult(ref.top_ids.clone(), ref.top_logits, ref.bottom_ids.clone(), ref.bottom_logits,
                     ref.target_ranks.clone())
    bad.top_ids[3, [0, 1]] = bad.top_ids[3, [1, 0]]  # same set, wrong order: a disagreement
    bad.bottom_ids[7, -1] += 1
    bad.target_ranks[11, 1] += 1
    a = agreement(bad, ref)
    assert a["top_ids"] == pytest.approx(1 - 1 / n)
    assert a["bottom_ids"] == pytest.approx(1 - 1 / n)
    assert a["rank0"] == 1.0 and a["rank1"] == pytest.approx(1 - 1 / n)
    # and the bar would catch a lens that is off on 1 % of vectors
    bad.target_ranks[: n // 100 + 1, 0] += 1
    assert agreement(bad, ref)["rank0"] < 0.999


def test_empty_and_tail_blocks():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 16, generator=g)
    norm = torch.nn.Identity()
    lens = LogitLens(norm, w, chunk_rows=64, fused=False)
    e = lens.project(torch.empty(0, 16), torch.empty(0, 2, dtype=torch.long), K)
    assert e.top_ids.shape == (0, K) and e.target_ranks.shape == (0, 2)
    v = torch.randn(67, 16, generator=g)  # one full block + a 3-row tail
    t = make_targets(67, 3000, g)
    r = lens.project(v, t, K)
    ref = LogitLens(norm, w, fused=False).project(v, t, K)
    assert all(x == 1.0 for x in agreement(r, ref).values())


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
def test_fp32_lens_allocates_one_logits_sized_buffer_per_block(gemm):
    """The flat-memory property of the reference lens, checked through the allocations torch reports.

    Per 64-row block the fp32 lens may allocate the block's logits and nothing else of that size; the
    comparison scratch is allocated once per call. The previous form (``(logits > t).sum(dtype=int32)``)
    allocated a bool copy and an int32 copy per target and block, and that churn is what let glibc's
    heap grow by ~20 MB per block in some runs (2 GB for one 6,400-row call on SmolLM2). The vocabulary is
    SmolLM2's size: the top-k's candidates (k x 64 per row, extract/extremes.py) are then 1/77 of a block."""
    from blens.extract.lens import onednn_available
    from torch.profiler import ProfilerActivity, profile

    if gemm == "onednn" and not onednn_available(torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(0)
    V, d, blocks, rows = 49152, 64, 6, 64
    norm = torch.nn.RMSNorm(d)
    lens = LogitLens(norm, torch.randn(V, d, generator=g), chunk_rows=rows, gemm=gemm, fused=False)
    x = torch.randn(blocks * rows, d, generator=g)
    t = torch.randint(0, V, (blocks * rows, 2), generator=g)
    lens.project(x, t, K)  # warm-up: one-time allocations of the GEMM routine are not the point
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        res = lens.project(x, t, K)
    block_bytes = rows * V * 4
    large = [e.name for e in prof.events() if e.self_cpu_memory_usage >= block_bytes // 8]
    assert len(large) == blocks + 1, large  # the logits of each block, plus one scratch for the ranks
    check_against_naive(lens, norm, lens.w, x, t)  # and still the right answers
    assert res.target_ranks.dtype == torch.long


def test_vocabulary_tiles_give_the_plain_onednn_lens_exactly(realistic):
    """The tiled lens takes its target logits from the same oneDNN GEMM over a column subset, which gives the
    tiles' very bits: on a SmolLM2-sized problem every top-k, bottom-k and rank equals the plain lens's (a dot
    product for the target logit instead moved ranks through near-ties)."""
    from blens.extract.lens import onednn_available

    if not onednn_available(torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN linear")
    norm, w, v, t, _ = realistic
    plain = LogitLens(norm, w, gemm="onednn", tile_cols=0, fused=False).project(v, t, K)
    tiled = LogitLens(norm, w, gemm="onednn", tile_cols=4096).project(v, t, K)
    assert agreement(plain, tiled) == {"top_ids": 1.0, "bottom_ids": 1.0, "rank0": 1.0, "rank1": 1.0}
    assert torch.equal(plain.top_logits, tiled.top_logits) and torch.equal(plain.bottom_logits, tiled.bottom_logits)


@pytest.mark.parametrize("clean_up", [False, True])
def test_every_token_decodes_as_the_tokenizer_decodes_it(tokenizer, clean_up):
    """The vocabulary labels (fast path: the Rust backend's batch decode) equal ``tokenizer.decode([i])``;
    with transformers' clean-up of spaces asked for, the (slow) Python path is taken, and is equal too."""
    from blens.extract.vocabulary import decode_each_token

    saved = tokenizer.clean_up_tokenization_spaces
    tokenizer.clean_up_tokenization_spaces = clean_up
    try:
        got = decode_each_token(tokenizer)
        assert got == [tokenizer.decode([i]) for i in range(len(tokenizer))]
    finally:
        tokenizer.clean_up_tokenization_spaces = saved
    assert len(got) == len(tokenizer) and got[13] == "."