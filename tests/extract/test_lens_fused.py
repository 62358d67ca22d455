"""The fused CPU lens (extract/lens_fused.py) and its compiled pass (extract/lens_pass.c via extract/native.py):
the pass against torch exactly, the lens against a float64 reference and against the block lens, its
fallbacks, and the per-machine caches (CPU, synthetic, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from blens.extract import lens_fused, native
from blens.extract.lens import LogitLens
from blens.extract.lens_fused import FusedUnembedding, slab_gemm_routine

# test_lens is a sibling module: pytest's default (prepend) import mode puts this folder on sys.path
from test_lens import K, agreement, check_against_naive, make_targets, needs_native, realistic_problem

pytestmark = needs_native


def torch_pass(buf: torch.Tensor, t: torch.Tensor, group: int):
    """What lens_pass computes, in torch: group extremes over the full groups, counts over every token."""
    V, R = buf.shape
    G = V // group
    full = buf[: G * group].reshape(G, group, R)
    counts = (buf.T.unsqueeze(0) > t.unsqueeze(-1)).sum(-1).int()  # (nt, R)
    return full.amax(1), full.amin(1), counts


@pytest.mark.parametrize("nt", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("R", [1, 8, 13, 64])
def test_pass_equals_torch_exactly(nt, R):
    """Every row width (a multiple of eight or not, split across threads or not), target count (1-4 are held
    in registers, 5 goes through memory) and a shorter last group (V = 1,000 = 15 x 64 + 40): the very
    values of torch."""
    g = torch.Generator().manual_seed(R * 10 + nt)
    V, group = 1000, 64
    buf = torch.randn(V, R, generator=g)
    buf[::7] = buf[3:4]  # exact ties with row 3's value
    t = buf[torch.randint(0, V, (nt, R), generator=g), torch.arange(R)].contiguous()  # targets hit real values
    gmax, gmin = torch.empty(V // group, R), torch.empty(V // group, R)
    counts = torch.zeros(nt, R, dtype=torch.int32)
    native.lens_pass(buf, t, gmax, gmin, counts, group)
    emax, emin, ecounts = torch_pass(buf, t, group)
    assert torch.equal(gmax, emax) and torch.equal(gmin, emin) and torch.equal(counts, ecounts)


def test_pass_refuses_what_it_cannot_read():
    buf = torch.randn(128, 16)
    ok = dict(t=torch.zeros(2, 16), gmax=torch.empty(2, 16), gmin=torch.empty(2, 16),
              counts=torch.zeros(2, 16, dtype=torch.int32), group=64)
    with pytest.raises(ValueError, match="contiguous"):
        native.lens_pass(buf.T.contiguous().T, **ok)
    with pytest.raises(ValueError, match="contiguous"):
        native.lens_pass(buf.double(), **ok)
    with pytest.raises(ValueError, match="do not fit"):
        native.lens_pass(buf, **{**ok, "gmax": torch.empty(3, 16)})


@pytest.mark.parametrize("routine", ["torch", "onednn"])
@pytest.mark.parametrize("rows", [7, 64, None])
def test_fused_lens_matches_naive(routine, rows):
    from blens.extract.lens import onednn_available

    if routine == "onednn" and not onednn_available(torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(0)
    d, V, N = 24, 5003, 300  # V % 64 = 11: a shorter last group, always a candidate
    w = torch.randn(V, d, generator=g) * 0.3
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    vectors = torch.randn(N, d, generator=g) * 3
    vectors[5] = 0
    targets = make_targets(N, V, g)
    targets[:5, 0] = V - 1  # a target in the last, shorter group
    lens = LogitLens(norm, w, chunk_rows=rows, gemm=routine)
    assert lens.fused
    check_against_naive(lens, norm, w, vectors, targets)
    assert lens._fused.routine == routine


def test_fused_lens_adds_the_bias_and_takes_any_number_of_targets():
    g = torch.Generator().manual_seed(4)
    d, V, N = 16, 3000, 40
    w, b = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    v = torch.randn(N, d, generator=g)
    logits = v @ w.T + b
    for nt in (1, 3):
        t = torch.randint(0, V, (N, nt), generator=g)
        res = LogitLens(torch.nn.Identity(), w, b).project(v, t, K)
        assert torch.equal(res.top_ids, logits.topk(K, -1).indices)
        assert torch.equal(res.bottom_ids, logits.topk(K, -1, largest=False).indices)
        assert torch.equal(res.target_ranks, (logits.unsqueeze(1) > logits.gather(1, t).unsqueeze(-1)).sum(-1))


def test_fused_lens_agrees_with_the_block_lens_on_a_smollm2_sized_problem():
    """V = 49,152, d = 576 with massive dimensions: the two fp32 lenses differ only through summation order,
    so top-k and bottom-k sets agree and a rank moves only where a near-tie sits at the target."""
    norm, w, v, t = realistic_problem(256, seed=1)
    block = LogitLens(norm, w, gemm="torch", fused=False).project(v, t, K)
    fused = LogitLens(norm, w).project(v, t, K)
    agree = agreement(fused, block)
    assert agree["top_ids"] >= 0.99 and agree["bottom_ids"] >= 0.99
    assert agree["rank0"] >= 0.98 and agree["rank1"] >= 0.98
    assert (fused.target_ranks - block.target_ranks).abs().max().item() <= 5
    torch.testing.assert_close(fused.top_logits, block.top_logits, rtol=1e-5, atol=1e-4)


def test_a_target_is_never_counted_above_itself():
    """The target logit is read from the buffer the pass compares: a rank counts only other tokens, even
    where every logit ties (an all-zero vector)."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(2000, 16, generator=g)
    v = torch.randn(20, 16, generator=g)
    v[0] = 0
    t = torch.randint(0, 2000, (20, 2), generator=g)
    res = LogitLens(torch.nn.Identity(), w).project(v, t, K)
    logits = v @ w.T
    assert res.target_ranks[0].tolist() == [0, 0]
    assert (res.target_ranks < 2000).all() and (res.target_ranks >= 0).all()
    above = logits[1:].unsqueeze(1) > logits[1:].gather(1, t[1:]).unsqueeze(-1)
    assert torch.equal(res.target_ranks[1:], above.sum(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e36])
def test_inputs_the_pass_must_not_take_go_to_the_block_lens(bad):
    """Non-finite vectors, or ones large enough that a logit could overflow, are answered by the block lens
    (the pass's max and min have no NaN rule): the results are the block lens's, whatever they mean."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3000, 16, generator=g)
    v = torch.randn(30, 16, generator=g)
    v[4, 2] = bad
    t = torch.randint(0, 3000, (30, 2), generator=g)
    lens = LogitLens(torch.nn.Identity(), w)
    assert not FusedUnembedding(w, None, routine="torch").safe(v)
    res, ref = lens.project(v, t, K), LogitLens(torch.nn.Identity(), w, fused=False).project(v, t, K)
    for a, b in ((res.top_ids, ref.top_ids), (res.bottom_ids, ref.bottom_ids), (res.target_ranks, ref.target_ranks)):
        assert torch.equal(a, b)
    assert FusedUnembedding(w, None, routine="torch").safe(torch.randn(30, 16, generator=g))


def test_fused_lens_allocates_one_buffer_per_call():
    """The (V, rows) logits buffer is allocated once per call and reused by every block: the flat-memory
    property of the block lens, kept."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    V, d, blocks, rows = 49152, 64, 6, 64
    norm = torch.nn.RMSNorm(d)
    lens = LogitLens(norm, torch.randn(V, d, generator=g), chunk_rows=rows)
    x = torch.randn(blocks * rows, d, generator=g)
    t = torch.randint(0, V, (blocks * rows, 2), generator=g)
    lens.project(x, t, K)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lens.project(x, t, K)
    large = [e.name for e in prof.events() if e.self_cpu_memory_usage >= rows * V * 4 // 8]
    assert len(large) == 1, large


def test_fused_is_the_cpu_default_and_refused_where_it_cannot_run(monkeypatch):
    w = torch.randn(3000, 8)
    assert LogitLens(torch.nn.Identity(), w).fused
    assert not LogitLens(torch.nn.Identity(), w, fused=False).fused
    with pytest.raises(ValueError, match="whole vocabulary"):
        LogitLens(torch.nn.Identity(), w, tile_cols=1000, fused=True)
    monkeypatch.setenv("BLENS_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert native.status() == native.NativeStatus(False, "disabled by BLENS_NATIVE=0")
        assert not LogitLens(torch.nn.Identity(), w).fused  # the torch-only block lens, same answers
        with pytest.raises(ValueError, match="BLENS_NATIVE=0"):
            LogitLens(torch.nn.Identity(), w, fused=True)
        with pytest.raises(RuntimeError, match="not available"):
            native.lens_pass(torch.zeros(64, 8), torch.zeros(1, 8), torch.empty(1, 8), torch.empty(1, 8),
                             torch.zeros(1, 8, dtype=torch.int32), 64)
    finally:
        monkeypatch.delenv("BLENS_NATIVE")
        native._library.cache_clear()
    assert native.status().available


def test_big_vocabularies_take_the_fused_lens_with_fewer_rows_and_build_tiles_only_to_fall_back():
    """Gemma 3's 262,144 tokens: the fused lens by default, with as many vectors per block as the buffer
    budget holds, and the tiled block lens (its packed copies of W) built only for an input the fused lens
    refuses."""
    from blens.extract.lens_fused import FUSED_BUFFER_BYTES, FUSED_ROWS, fused_rows
    from blens.extract.lens_tiles import TILED_MIN_VOCAB

    assert fused_rows(49152) == FUSED_ROWS == 512  # SmolLM2: the (V, 512) buffer is 96 MiB
    assert fused_rows(262144) == 256 and 262144 * 256 * 4 <= FUSED_BUFFER_BYTES  # Gemma 3
    assert fused_rows(10**7) == 64  # never fewer than one group's width
    g = torch.Generator().manual_seed(11)
    V, d, N = TILED_MIN_VOCAB, 8, 40
    # small integers: every logit is exact in fp32 whatever the GEMM's order, so both lenses see the very
    # same values (ties included) and must give the same ranks and the same extreme values
    w, v = (torch.randint(-20, 21, shape, generator=g).float() for shape in ((V, d), (N, d)))
    t = make_targets(N, V, g)
    lens = LogitLens(torch.nn.Identity(), w)
    assert lens.fused
    res = lens.project(v, t, K)
    assert lens._fused.rows == fused_rows(V) == 512 and lens._tiled is None  # no tiles were needed
    block = LogitLens(torch.nn.Identity(), w, fused=False)
    ref = block.project(v, t, K)
    assert block._tiled is not None  # the reference is the tiled block lens Gemma ran before
    logits = v @ w.T
    assert torch.equal(res.target_ranks, ref.target_ranks)
    assert torch.equal(res.target_ranks, (logits.unsqueeze(1) > logits.gather(1, t).unsqueeze(-1)).sum(-1))
    for ids, vals, ref_vals in ((res.top_ids, res.top_logits, ref.top_logits),
                                (res.bottom_ids, res.bottom_logits, ref.bottom_logits)):
        assert torch.equal(vals, ref_vals) and torch.equal(logits.gather(1, ids), vals)
    v[3, 1] = float("nan")
    lens.project(v, t, K)
    assert lens._tiled is not None  # the refused input went to the tiled block lens


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BLENS_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        first = native.status()
        assert first.available and first.detail.startswith(str(tmp_path / "native"))
        built = sorted(p.name for p in (tmp_path / "native").iterdir())
        assert built == [first.detail.rsplit("/", 1)[1]]  # no temporary file left behind
        mtime = (tmp_path / "native" / built[0]).stat().st_mtime_ns
        native._library.cache_clear()
        assert native.status() == first
        assert (tmp_path / "native" / built[0]).stat().st_mtime_ns == mtime  # loaded, not rebuilt
    finally:
        native._library.cache_clear()


def test_slab_gemm_routine_is_measured_once_per_machine(monkeypatch, tmp_path):
    from blens.extract.lens import onednn_available

    if not onednn_available(torch.device("cpu")):
        pytest.skip("only one routine without oneDNN")
    monkeypatch.setenv("BLENS_CACHE", str(tmp_path))
    slab_gemm_routine.cache_clear()
    try:
        routine = slab_gemm_routine()
        assert routine in lens_fused.ROUTINES
        [saved] = (tmp_path / "native").glob("slab-gemm-*.json")
        record = json.loads(saved.read_text())
        assert record["routine"] == routine and set(record["seconds"]) == set(lens_fused.ROUTINES)
        other = next(r for r in lens_fused.ROUTINES if r != routine)
        saved.write_text(json.dumps({**record, "routine": other}))
        slab_gemm_routine.cache_clear()
        assert slab_gemm_routine() == other  # read back, not measured again
    finally:
        slab_gemm_routine.cache_clear()
