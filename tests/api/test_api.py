"""Issue 15: the notebook API (blens.load / Lens.run / run_many) is the pipeline's engine: its frames are the
warehouse's rows for the same records, its vectors rebuild autograd's weight gradients, bad records fail with
the case_id and field, and ``import blens`` stays cheap."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from builders import FACTS, ROOT, records
from builders import tiny_gemma
from builders import autograd_weight_grads

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
                                         device="cpu", vectors="all"))  # run_many keeps every vector too
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
    mlp_names = [m for m in view.matrix_names if not m.startswith("attn_")]  # attention: ranks and attn_vjp only
    sites = {str(Site.FF1_INPUT), str(Site.FF2_INPUT), *(str(Site.of(m, vjp=True)) for m in mlp_names),
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
        assert sorted(res.matrices) == sorted(mlp_names)
        for (layer, matrix), g in mlp(ref).items():
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
    with pytest.raises(ValueError, match=r"record records\[0\]: field 'target_new': target_new is missing"):
        lens.run({"prompt": "no id"})  # case_id, subject and ground_truth are optional here; a target is not
    with pytest.raises(ValueError, match=r"record records\[0\]: field 'case_id': case_id must be an integer"):
        lens.run({"prompt": "Paris is in", "target_new": "Italy", "case_id": "x"})  # given: checked as before
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
    from builders import COUNTERFACT

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
    ranks = res.gradient_ranks[~res.gradient_ranks.matrix.str.startswith("attn_")]  # the MLP's, as in the README
    assert (ranks[ranks.layer < 29]["rank"] == n).mean() > 0.95  # Lemma 4.1, as in the README's table
    q = res.gradient_ranks[(res.gradient_ranks.layer < 29) & (res.gradient_ranks.matrix == "attn_q")]
    assert (q["rank"] <= n - 1).all()  # the first token's query gets no gradient (softmax over one key)
    p = res.projections
    last = p[(p.site == "ff2_vjp") & (p.segment == "last") & p.layer.between(22, 28)]
    assert (last.target_new_rank == 49151).mean() >= 0.5  # the shift: target_new is the least probable token
    assert "mark-new" in res._repr_html_()
    assert [r.record.case_id for r in many] == [r["case_id"] for r in records]
    assert len(many.projections) == sum(r.prepared.n_tokens for r in many) * 30 * len(lens.lm.view.lens_sites)


# ---- issue 25: any text, your own metric ---------------------------------------------------------------------

EIFFEL = "The Eiffel Tower is located in the city of"


def mlp(grads: dict) -> dict:
    """The MLP matrices' gradients (what ``Result.gradient`` rebuilds) of an autograd reference."""
    return {k: g for k, g in grads.items() if k[1] in ("ff1", "ff1_gate", "ff2")}


def metric_autograd(lm, prepared, metric):
    """Reference for a custom metric: params require grad, the model's own forward, metric on the last position's
    logits, autograd.grad. Returns ({(layer, matrix): dL/dW as (d_in, d_out)}, loss)."""
    view = lm.view
    weights = {(l, m): view.matrix(l, m).weight for l in range(view.n_layers) for m in view.matrix_names}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        loss = metric(lm.model(torch.tensor([prepared.input_ids])).logits[0, -1].float())
        grads = torch.autograd.grad(loss, list(weights.values()))
    finally:
        for w in weights.values():
            w.requires_grad_(False)
    return {k: view.as_in_by_out(g, k[1]) for k, g in zip(weights, grads)}, loss.item()


def test_any_text_with_a_target(tiny_lm):
    """A bare prompt and target: projections and gradient ranks, autograd's gradient and loss; what was not given
    (case_id, subject, true answer) is NULL; the numbers equal those of the full record of the same prompt."""
    lens = api_lens(tiny_lm)
    res = lens.run(EIFFEL, target=" Rome")
    n = res.prepared.n_tokens
    assert len(res.projections) == len(tiny_lm.view.lens_sites) * tiny_lm.view.n_layers * n
    assert len(res.gradient_ranks) > 0 and res.gradient_ranks["rank"].between(0, n).all()
    ref, loss = autograd_weight_grads(tiny_lm, res.prepared)
    assert res.loss == pytest.approx(loss, rel=1e-5)
    for (layer, matrix), g in mlp(ref).items():
        assert ((res.gradient(layer, matrix) - g).norm() / g.norm()).item() <= 1e-5, (layer, matrix)
    p = res.prompts.iloc[0]
    assert p.prompt == EIFFEL and p.target_new == "Rome" and pd.isna(p.subject) and pd.isna(p.target_true)
    for frame in (res.prompts, res.tokens, res.gradient_ranks, res.projections):
        assert frame.case_id.isna().all()
    assert res.prompts[["target_true_id", "model_answer_is_true"]].isna().all().all()
    proj = res.projections
    assert proj[["target_true_rank", "target_true_in_top_k", "target_true_in_bottom_k"]].isna().all().all()
    assert proj.target_new_rank.notna().all() and "subject" not in set(proj.segment)
    roles = res.tokens.sort_values("position").role.tolist()
    assert roles[-1] == "last" and res.tokens.role.isna().sum() == n - 1  # GPT-2's tokenizer adds no bos
    assert "Rome" in res._repr_html_() and "case_id=None" in repr(res)
    # issue 25: the prompts row says what was kept (res.vectors holds every site and layer: --vectors all)
    assert res.prompts.vectors.tolist() == ["all"] and len(res.vectors) > 0
    bare = lens.run(EIFFEL, target=" Rome", vectors=False)
    assert bare.prompts.vectors.tolist() == ["none"] and bare.vectors == {} and bare.key == res.key
    # the same prompt as a full record: the same numbers, and the record's own columns filled in
    full = lens.run(easyedit(5, EIFFEL, "Eiffel Tower", "Rome", "Paris"))
    assert full.prompts.case_id.tolist() == [5] and full.projections.target_true_rank.notna().all()
    assert set(full.tokens.role) >= {"first_subject", "last_subject", "last"}
    a, b = (r.projections.sort_values(ORDER["projections"]).reset_index(drop=True) for r in (res, full))
    assert a.norm.tolist() == b.norm.tolist() and a.target_new_rank.tolist() == b.target_new_rank.tolist()
    assert res.gradient_ranks["rank"].tolist() == full.gradient_ranks["rank"].tolist()
    # a dict with only prompt and target_new is the same record as the text
    assert lens.run({"prompt": EIFFEL, "target_new": "Rome"}).key == res.key


@pytest.mark.parametrize("tiny_lm", ["gpt2"], indirect=True)  # plumbing: one family is enough
def test_run_many_strings(tiny_lm):
    from blens.api import RecordInvalid

    lens = api_lens(tiny_lm)
    texts = [EIFFEL, "Paris is the capital of", EIFFEL]
    many = lens.run_many(texts, target=[" Rome", " France", " Rome"], progress=False)
    assert [r.record.prompt for r in many] == texts and many[0] is many[2]
    assert many[1].record.target_new == "France" and many[1].key == lens.run(texts[1], target=" France").key
    assert len(many.prompts) == 2 and many.prompts.case_id.isna().all()
    same = lens.run_many(texts[:2], target=" Rome", progress=False)
    assert [r.record.target_new for r in same] == ["Rome", "Rome"]
    with pytest.raises(ValueError, match="target has 1 entries for 3 text prompt"):
        lens.run_many(texts, target=[" Rome"], progress=False)
    with pytest.raises(RecordInvalid, match=r"record records\[1\]: field 'target_new': target_new is missing"):
        lens.run_many([easyedit(*FACTS[1]), "no target here"], progress=False)
    with pytest.raises(RecordInvalid, match=r"record records\[0\]: field 'subject': subject 'Louvre' does not occur"):
        lens.run(EIFFEL, target=" Rome", subject="Louvre")  # a subject that is given is checked


def test_custom_metric_changes_loss_and_gradients(tiny_lm):
    """metric= on a padded batch of two prompts: each prompt's loss and every MLP gradient equal plain autograd of
    that metric on that prompt alone, and differ from the default NLL's."""
    lens = api_lens(tiny_lm)
    texts = [EIFFEL, "Paris is the capital of the country of"]
    rome, france = (lens._prepare(t, "x", target=w).target_new_id for t, w in zip(texts, [" Rome", " France"]))

    def margin(logits):  # a logit difference, as in TransformerLens tutorials: no softmax at all
        return logits[france] - 2.0 * logits[rome]

    custom = lens.run_many(texts, target=[" Rome", " France"], metric=margin, progress=False)
    default = lens.run_many(texts, target=[" Rome", " France"], progress=False)
    assert len({r.prepared.n_tokens for r in custom}) > 1  # one batch, with padding
    for res, base in zip(custom, default):
        ref, loss = metric_autograd(tiny_lm, res.prepared, margin)
        assert res.loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert res.prompts.loss.iloc[0] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert res.loss != pytest.approx(base.loss, rel=1e-3) and res.key != base.key
        for (layer, matrix), g in mlp(ref).items():
            rebuilt = res.gradient(layer, matrix)
            assert ((rebuilt - g).norm() / g.norm()).item() <= 1e-5, (layer, matrix)
            assert not torch.allclose(rebuilt, base.gradient(layer, matrix), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match=r"metric on records\[0\]: must return a scalar tensor, got \(\d+,\)"):
        lens.run(EIFFEL, target=" Rome", metric=lambda logits: logits * 2)
    with pytest.raises(ValueError, match=r"metric on records\[0\]: its value does not depend on the logits"):
        lens.run(EIFFEL, target=" Rome", metric=lambda logits: torch.tensor(1.0))


def test_result_help_maps_sites_to_transformerlens_and_nnsight():
    import blens

    doc = blens.Result.__doc__
    for name in ("blocks.{l}.ln2.hook_normalized", "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_attn_out",
                 "blocks.{l}.hook_resid_post", "mlp.up_proj.input", "mlp.down_proj.output.grad",
                 "self_attn.o_proj.output.grad", "W_in", "W_gate", "W_out", "W_Q", "W_K", "W_V", "W_O", "c_fc"):
        assert name in doc, name
    assert "run_with_cache" in doc and "nnsight" in doc


def test_threads_from_python_are_capped_at_the_cores_with_one_warning():
    """Issue 25: the CLI refuses --threads above the cores; a config built in Python (blens.load, the flows) is
    capped instead, with one warning line saying so (threads=1000 started 1,000 threads on 2 cores)."""
    import warnings

    from blens.extract.config import usable_cores

    cores = usable_cores()
    with pytest.warns(UserWarning, match=rf"threads=1000 is more than the {cores} usable CPU core\(s\); using {cores}"):
        cfg = ExtractConfig(data="<test>", threads=1000)
    assert cfg.threads == cores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ExtractConfig(data="<test>", threads=1).threads == 1
        assert ExtractConfig(data="<test>").threads is None
        assert ExtractConfig.model_validate(cfg.model_dump()).threads == cores  # Prefect's round trip: no new warning
