"""Issue 15: the notebook API (blens.load / Lens.run / run_many) is the pipeline's engine: its frames are the
warehouse's rows for the same records, its vectors rebuild autograd's weight gradients, bad records fail with
the case_id and field, and ``import blens`` stays cheap."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FACTS, ROOT, records
from test_gemma import tiny_gemma
from test_gradients import autograd_weight_grads

from blens.extract.adapters import Site
from blens.extract.config import ExtractConfig

WAREHOUSE_ONLY = {"batch_id"}  # provenance the warehouse adds: the commit a row came in
PROVENANCE = {"run_id"}  # which run produced a row: "notebook" here
ORDER = {"prompts": ["case_id"], "tokens": ["case_id", "position"], "gradient_ranks": ["case_id", "layer", "matrix"],
         "projections": ["case_id", "site", "layer", "position"]}


def api_lens(lm, **settings):
    from blens.api import Lens

    return Lens(lm, ExtractConfig(model=lm.name, data="<test>", device="cpu", **settings))


def easyedit(case_id, prompt, subject, new, true):
    return {"case_id": case_id, "prompt": prompt, "subject": subject, "target_new": new, "ground_truth": true}


def assert_same_rows(ours, theirs, name):
    """Same columns by name (provenance aside), same rows, values identical (lists element by element)."""
    assert set(theirs.columns) - set(ours.columns) == WAREHOUSE_ONLY, name
    assert set(ours.columns) - set(theirs.columns) == set(), name
    cols = [c for c in ours.columns if c not in PROVENANCE]
    a = ours.sort_values(ORDER[name]).reset_index(drop=True)
    b = theirs.sort_values(ORDER[name]).reset_index(drop=True)
    assert len(a) == len(b) > 0, name
    for c in cols:
        for x, y in zip(a[c], b[c]):
            if isinstance(x, (list, np.ndarray)):
                assert np.array_equal(np.asarray(x), np.asarray(y)), (name, c)
            else:
                assert x == y, (name, c, x, y)
    assert set(a.run_id) == {"notebook"}


def test_import_blens_is_cheap_and_load_is_lazy():
    code = ("import sys, importlib.metadata as md, blens\n"
            "assert 'torch' not in sys.modules and 'blens.api' not in sys.modules, 'import blens pulled in torch'\n"
            "assert blens.__version__ == md.version('backward-lens-warehouse')\n"
            "assert 'torch' not in sys.modules\n"
            "from blens import load\n"
            "import blens.api\n"
            "assert load is blens.api.load and blens.Result is blens.api.Result\n"
            "assert 'load' in dir(blens)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import blens

        blens.nope  # noqa: B018


def test_frames_equal_the_warehouse_rows(tmp_path, tiny_model_dir, records_file):
    """The flow of `blens extract` and run_many on the same records: every table, column by column."""
    import blens
    from blens.flows.extract_flow import extract_flow
    from blens.store.connect import connect

    wh = tmp_path / "wh"
    summary = extract_flow(ExtractConfig(model=str(tiny_model_dir), data=str(records_file), warehouse=str(wh),
                                         device="cpu"))
    assert summary.n_extracted == len(FACTS)
    lens = blens.load(str(tiny_model_dir), device="cpu")
    raw = json.loads(records_file.read_text())
    results = lens.run_many(raw, progress=False)
    assert [r.record.case_id for r in results] == [f[0] for f in FACTS]  # input order
    con = connect(wh)
    for name in ORDER:
        assert_same_rows(getattr(results, name), con.execute(f"SELECT * FROM {name}").df(), name)
    # one result's frames are that record's rows only
    one = results[3]
    stored = con.execute("SELECT * FROM gradient_ranks WHERE case_id = 3").df()
    assert_same_rows(one.gradient_ranks, stored, "gradient_ranks")
    assert one.key == con.execute("SELECT key FROM prompts WHERE case_id = 3").fetchone()[0]
    # run() is a batch of one: the same key and tokens; floats agree to summation order
    alone = lens.run(raw[3])
    assert alone.key == one.key
    assert alone.tokens.token.tolist() == one.tokens.token.tolist()
    a, b = (f.sort_values(ORDER["projections"]).reset_index(drop=True) for f in (alone.projections, one.projections))
    np.testing.assert_allclose(a.norm, b.norm, rtol=1e-4)
    assert (a.target_new_rank - b.target_new_rank).abs().max() <= 2


@pytest.fixture(scope="module")
def tiny_gemma_lm(tokenizer):
    from blens.extract.models import wrap_model

    return wrap_model(tiny_gemma(len(tokenizer), tokenizer.pad_token_id), tokenizer, name="tiny-gemma3")


def test_vectors_rebuild_autograds_gradient(tiny_lm):  # GPT-2 and Llama
    check_vectors(tiny_lm)


def test_gemma_vectors_include_the_residual_vjp(tiny_gemma_lm):
    check_vectors(tiny_gemma_lm)


def check_vectors(lm):
    """Every site at every layer, real positions only, for each prompt of a padded batch; gradient(layer,
    matrix) = autograd's dL/dW; the lens sites' vectors are the ones the projections were taken of (norms)."""
    view = lm.view
    L = view.n_layers
    lens = api_lens(lm)
    results = lens.run_many(records(), progress=False)
    assert len({r.prepared.n_tokens for r in results}) > 1  # one batch with padding
    mlp = [m for m in view.matrix_names if not m.startswith("attn_")]  # the attention's spanning sets are not kept
    sites = {str(Site.FF1_INPUT), str(Site.FF2_INPUT), *(str(Site.of(m, vjp=True)) for m in mlp),
             *(str(s) for s in view.lens_sites)}
    for res in results:
        n = res.prepared.n_tokens
        assert set(res.vectors) == {(s, layer) for s in sites for layer in range(L)}
        if view.family.post_mlp_norm:  # Gemma: the residual-stream VJP is its own vector, not ff2_vjp
            assert not torch.equal(res.vectors[(str(Site.RESID_POST_VJP), 0)], res.vectors[(str(Site.FF2_VJP), 0)])
        for (site, layer), v in res.vectors.items():
            assert v.shape[0] == n and v.dtype == torch.float32, (site, layer)
        proj = res.projections
        for site in view.lens_sites:
            for layer in range(L):
                norms = proj[(proj.site == str(site)) & (proj.layer == layer)].sort_values("position").norm
                np.testing.assert_allclose(res.vectors[(str(site), layer)].norm(dim=-1).numpy(), norms.to_numpy(),
                                           rtol=1e-5, atol=1e-7, err_msg=f"{site} {layer}")
        ref, loss = autograd_weight_grads(lm, res.prepared)
        assert res.loss == pytest.approx(loss, rel=1e-5)
        assert sorted(res.matrices) == sorted(mlp)
        for (layer, matrix), g in ref.items():
            if matrix not in mlp:
                continue
            rebuilt = res.gradient(layer, matrix)
            assert rebuilt.shape == g.shape == view.weight(layer, matrix).shape
            rel = ((rebuilt - g).norm() / g.norm()).item()  # test_gradients' criterion for the capture itself
            assert rel <= 1e-5, f"{lm.name} case {res.record.case_id} layer {layer} {matrix}: error {rel:.2e}"
    res = results[0]
    with pytest.raises(ValueError, match="matrix must be one of"):
        res.gradient(0, "attn")
    with pytest.raises(ValueError, match=f"no spanning set for layer {L}"):
        res.gradient(L, "ff2")
    bare = lens.run(records()[0], vectors=False)
    assert bare.vectors == {} and bare.key == res.key
    with pytest.raises(ValueError, match="vectors=False"):
        bare.gradient(0, "ff2")


def test_bad_records_name_case_and_field(tiny_lm):
    from blens.api import RecordInvalid

    lens = api_lens(tiny_lm)
    good = easyedit(*FACTS[1])
    no_target = {k: v for k, v in easyedit(*FACTS[2]).items() if k != "target_new"}
    with pytest.raises(ValueError, match=r"case_id 2: field 'target_new': .*missing") as info:
        lens.run(no_target)
    assert isinstance(info.value, RecordInvalid) and info.value.error.field == "target_new"
    with pytest.raises(ValueError, match=r"record records\[0\]: field 'case_id'"):
        lens.run({"prompt": "no id"})
    long = easyedit(9, "word " * 100 + "Paris is in", "Paris", "Italy", "France")
    with pytest.raises(ValueError, match=r"case_id 9: field 'prompt': prompt is \d+ tokens, longer than"):
        lens.run(long)
    with pytest.raises(RecordInvalid, match=r"case_id 2: .*\(and 1 more invalid record"):
        lens.run_many([good, no_target, long], progress=False)
    kept = lens.run_many([good, no_target, long, good], progress=False, skip_invalid=True)
    assert [e.case_id for e in kept.errors] == [2, 9]
    assert len(kept) == 2 and kept[0] is kept[1]  # the same record twice is one result, as in the warehouse
    assert len(kept.prompts) == 1 and kept.gradient_ranks.case_id.unique().tolist() == [1]


def test_rome_layout_is_the_same_record(tiny_lm):
    c, prompt, subject, new, true = FACTS[1]
    rome = {"case_id": c, "requested_rewrite": {"prompt": prompt.replace(subject, "{}"), "subject": subject,
                                                 "target_new": {"str": new}, "target_true": {"str": true}}}
    lens = api_lens(tiny_lm)
    a, b = lens.run_many([rome, easyedit(*FACTS[1])], progress=False)
    assert a is b  # same content, same key: computed once


def test_result_renders_as_the_lens_table(tiny_lm):
    """_repr_html_ is the report's table for this prompt: every layer and token, the colour bar, escaped."""
    res = api_lens(tiny_lm).run(easyedit(7, 'The "<b>native</b>" tongue of Danielle Darrieux is',
                                         "Danielle Darrieux", "English", "French"))
    page = res._repr_html_()
    assert page == res.grid_html("ff2_vjp") and 'data-site="ff2_vjp"' in page
    assert "<b>native</b>" not in page and "&lt;b&gt;native&lt;/b&gt;" in page
    assert 'class="cbar-bar"' in page and "linear-gradient" in page
    heads = [int(h) for h in re.findall(r'<th scope="col">(\d+)</th>', page)]
    assert heads == list(range(tiny_lm.view.n_layers))
    assert page.count('<th scope="row"') == res.prepared.n_tokens
    assert 'data-site="ff1_input"' in res.grid_html("ff1_input")
    with pytest.raises(ValueError, match="no projections for site 'ff2_input'"):
        res.grid_html("ff2_input")
    assert "case_id=7" in repr(res) and "tiny-" in repr(api_lens(tiny_lm))


@pytest.fixture(scope="module")
def counterfact():
    from conftest import COUNTERFACT

    path = COUNTERFACT / "counterfact-edit-1k.json"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_the_issue_snippet_runs_as_written(counterfact):
    """The README's snippet on the embedded SmolLM2, verbatim, and the paper's finding in its result."""
    import blens
    from blens.extract.models import ModelLoadError

    record = counterfact[0]
    records = counterfact[:3]
    try:
        lens = blens.load("smollm2-135m")              # any supported name or path; device="cpu" | "cuda"
    except ModelLoadError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")
    res = lens.run(record)                         # a CounterFact record (dict), EasyEdit or ROME layout
    res.projections, res.gradient_ranks            # pandas DataFrames, the same columns as the views
    res.vectors[("ff2_vjp", 24)]                   # tensor (n_tokens, d)
    res.gradient(24, "ff2")                        # dL/dW rebuilt from the spanning set
    many = lens.run_many(records)                  # batched, with a progress bar

    n = res.prepared.n_tokens
    assert res.vectors[("ff2_vjp", 24)].shape == (n, 576)
    assert res.gradient(24, "ff2").shape == (1536, 576)
    ranks = res.gradient_ranks
    mlp = ranks[(ranks.layer < 29) & ranks.matrix.str.startswith("ff")]
    assert (mlp["rank"] == n).mean() > 0.95  # Lemma 4.1, as in the README's table
    q = ranks[(ranks.layer < 29) & (ranks.matrix == "attn_q")]
    assert (q["rank"] <= n - 1).all()  # the first token's query gets no gradient (softmax over one key)
    p = res.projections
    last = p[(p.site == "ff2_vjp") & (p.segment == "last") & p.layer.between(22, 28)]
    assert (last.target_new_rank == 49151).mean() >= 0.5  # the shift: target_new is the least probable token
    assert "mark-new" in res._repr_html_()
    assert [r.record.case_id for r in many] == [r["case_id"] for r in records]
    assert len(many.projections) == sum(r.prepared.n_tokens for r in many) * 30 * 3  # ff1_input, ff2_vjp, attn_vjp
