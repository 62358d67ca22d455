"""Issue 21: the columns the paper's figures need, each against a plain computation.

Token roles (ROME's causal-tracing segmentation, Figure 5) on hand-made subjects; the model's own answer
(Figures 19-20) against a plain forward pass; its lens rank against a plain unembedding; the last-position VJP
similarity across layers (Appendix G) against cosines of autograd's VJPs; settings ids on every row.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from blens.extract.identity import result_settings, settings_id
from blens.extract.prepare import ROLES, prepare, roles_for
from blens.extract.records import EditRecord
from blens.extract.tables import extract_batch, layer_cosines

from builders import records


def _offsets(words: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for w in words:
        out.append((pos, pos + len(w)))
        pos += len(w)
    return out


# "The| Eiffel| Tower| is| in" with the subject's character span given by hand
WORDS = ["The", " Eiffel", " Tower", " is", " in"]


@pytest.mark.parametrize("span, special, expected", [
    # several subject tokens in the middle
    ((4, 16), None, ["before_subject", "first_subject", "last_subject", "first_subsequent", "last"]),
    # a one-token subject is last_subject
    ((4, 10), None, ["before_subject", "last_subject", "first_subsequent", "further", "last"]),
    # a subject at position 0
    ((0, 10), None, ["first_subject", "last_subject", "first_subsequent", "further", "last"]),
    # three subject tokens: first, middle, last
    ((0, 16), None, ["first_subject", "middle_subject", "last_subject", "first_subsequent", "last"]),
    # a subject ending at the final token: the final position is always `last`
    ((17, 22), None, ["before_subject", "before_subject", "before_subject", "first_subject", "last"]),
    # a BOS the tokenizer added (a special token with an empty span)
    ((4, 16), [True, False, False, False, False, False],
     ["bos", "before_subject", "first_subject", "last_subject", "first_subsequent", "last"]),
    # no subject: only bos and last are known
    (None, None, [None, None, None, None, "last"]),
])
def test_roles_on_hand_made_subjects(span, special, expected):
    offsets = _offsets(WORDS)
    if special:
        offsets = [(0, 0)] + offsets
    roles = roles_for(offsets, span, special)
    assert list(roles) == expected
    assert all(r is None or r in ROLES for r in roles)


def test_roles_consistent_with_the_subject_span_on_real_tokenization(tokenizer):
    """Every prepared record: the subject roles are exactly the tokens whose text overlaps the subject string,
    in order first..last, and the final token is `last`."""
    for rec in records():
        p = prepare(rec, tokenizer, 64)
        start = rec.prompt.rfind(rec.subject)
        enc = tokenizer(rec.prompt, return_offsets_mapping=True)
        overlap = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < start + len(rec.subject) and e > start]
        subj = [i for i, r in enumerate(p.roles) if r and r.endswith("_subject") and r != "before_subject"]
        assert p.roles[-1] == "last"
        assert subj == [i for i in overlap if i != p.n_tokens - 1]
        assert p.roles[subj[-1]] == "last_subject" or subj[-1] == p.n_tokens - 1
        after = subj[-1] + 1
        if after < p.n_tokens - 1:
            assert p.roles[after] == "first_subsequent"
            assert all(r == "further" for r in p.roles[after + 1:-1])


def test_model_answer_and_its_rank_match_a_plain_forward_pass(tiny_lm):
    """prompts.model_answer_* is the argmax of a plain forward pass at the last position; projections'
    model_answer_rank at the final layer's FF2 VJP equals a plain unembedding rank of that token."""
    tok = tiny_lm.tokenizer
    prepared = [prepare(r, tok, 64) for r in records()]
    tables = extract_batch(tiny_lm, prepared, "r")
    prompts = tables["prompts"].sort_by("case_id")
    view = tiny_lm.view
    for row, p in zip(prompts.to_pylist(), sorted(prepared, key=lambda q: q.record.case_id)):
        with torch.no_grad():
            logits = tiny_lm.model(torch.tensor([p.input_ids])).logits[0, -1]
        answer = int(logits.argmax())
        assert row["model_answer_id"] == answer
        assert row["model_answer_token"] == tok.decode([answer])
        assert row["model_answer_is_true"] == (answer == p.target_true_id)
    # the rank of the answer in one projection row, recomputed: #{j: logit_j > logit_answer}
    proj = tables["projections"]
    one = proj.filter(pc.and_(pc.equal(proj["site"], "ff1_input"), pc.equal(proj["layer"], 1))).to_pylist()[0]
    p = next(q for q in prepared if q.record.case_id == one["case_id"])
    answer = prompts.filter(pc.equal(prompts["case_id"], one["case_id"]))["model_answer_id"][0].as_py()
    from blens.extract.capture import capture

    spans = capture(view, [p], tok.pad_token_id)
    x = spans.inputs[(1, "ff1")][0, one["position"]]
    with torch.no_grad():
        logits = view.logits(view.final_norm(x[None]))[0]
    assert one["model_answer_rank"] == int((logits > logits[answer]).sum())
    assert one["model_answer_in_top_k"] == (answer in one["top_ids"])


def test_vjp_similarity_equals_cosines_of_autograd_vjps(tiny_lm):
    """vjp_similarity's cosines are those of the last position's FF2 VJPs taken by plain autograd (the
    gradient at each c_proj/down_proj output), with exactly 1 on the diagonal."""
    tok = tiny_lm.tokenizer
    p = prepare(records()[0], tok, 64)
    tables = extract_batch(tiny_lm, [p], "r")
    sim = tables["vjp_similarity"]
    view = tiny_lm.view
    outs = {}
    hooks = [view.matrix(layer, "ff2").register_forward_hook(lambda m, a, o, layer=layer: outs.__setitem__(layer, o))
             for layer in range(view.n_layers)]
    try:
        embeds = view.embedding(torch.tensor([p.input_ids])).detach().requires_grad_(True)  # weights are frozen
        logits = tiny_lm.model(inputs_embeds=embeds).logits[0, -1]
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([p.target_new_id]))
        grads = torch.autograd.grad(loss, [outs[layer] for layer in range(view.n_layers)])
    finally:
        for h in hooks:
            h.remove()
    last = torch.stack([g[0, -1].double() for g in grads])
    ref = torch.nn.functional.cosine_similarity(last[:, None], last[None], dim=-1)
    got = sim.filter(pc.equal(sim["site"], "ff2_vjp")).sort_by("layer")
    cos = torch.tensor(got["cosines"].to_pylist(), dtype=torch.float64)
    assert cos.shape == (view.n_layers, view.n_layers)
    assert torch.all(cos.diagonal() == 1.0)
    assert torch.allclose(cos, ref, atol=1e-5)
    assert set(sim["site"].to_pylist()) == {"ff2_vjp", "attn_vjp"}


def test_layer_cosines_of_a_zero_vector_are_null():
    v = torch.randn(2, 3, 8)
    v[1, 2] = 0
    cos = layer_cosines(v)
    assert torch.all(cos[0].diagonal() == 1)
    assert torch.isnan(cos[1, 2]).all() and torch.isnan(cos[1, :, 2]).all()
    assert not torch.isnan(cos[1, :2, :2]).any()


def test_every_result_row_carries_its_settings_id(tiny_lm):
    tok = tiny_lm.tokenizer
    tables = extract_batch(tiny_lm, [prepare(r, tok, 64) for r in records()[:2]], "r", top_k=7, vectors="spanning")
    sid = settings_id(result_settings(7, tiny_lm.view.lens_sites))
    for name in ("prompts", "tokens", "gradient_ranks", "projections", "vectors", "vjp_similarity"):
        assert set(tables[name]["settings"].to_pylist()) == {sid}, name
    assert tables["settings"].to_pylist()[0]["settings"] == sid
    assert '"top_k":7' in tables["settings"]["settings_json"][0].as_py()
    other = settings_id(result_settings(20, tiny_lm.view.lens_sites))
    assert other != sid and len(sid) == 12


def test_legacy_settings_id_is_the_id_identity_gave_those_rows():
    """The schema-4 upgrade labels old rows with the settings their keys were computed with (written out in
    store/migrations.py, which does not import the model side): the same id as identity.settings_id."""
    from blens.store.migrations import legacy_settings

    old = {"top_k": 10, "loss": "nll_first_target_token_last_position", "lens": "final_norm+unembedding",
           "sites": ["ff1_input", "ff2_vjp", "resid_post_vjp"]}
    assert legacy_settings(10, "gemma3")[0] == settings_id(old)
    assert legacy_settings(10, "llama")[0] == settings_id({**old, "sites": ["ff1_input", "ff2_vjp"]})


def test_roles_of_a_record_whose_subject_is_the_whole_prompt_but_the_last_token(tokenizer):
    rec = EditRecord(case_id=1, prompt="Danielle Darrieux speaks", subject="Danielle Darrieux", target_new="English",
                     target_true="French", source="t")
    p = prepare(rec, tokenizer, 64)
    assert p.roles[0] == "first_subject" and p.roles[-1] == "last" and p.roles[-2] == "last_subject"
    assert np.all([r != "before_subject" for r in p.roles])


def test_a_second_top_k_never_mixes_into_the_views(tmp_path, tiny_model_dir):
    """20 records at --top-k 10, then 5 of them at --top-k 20: rank_equals_length has n = 20 and n = 5 in two
    settings rows per (layer, matrix), never n = 25; the bottom-k shares of the two are kept apart too."""
    from builders import COUNTERFACT

    from blens.extract.config import ExtractConfig
    from blens.run.commit import Committer
    from blens.run.extract import extract_items, plan_extract
    from blens.store.connect import connect
    from blens.store.reads import mixed_settings

    data = COUNTERFACT / "counterfact-edit-1k.json"
    if not data.exists():
        pytest.skip(f"CounterFact not found at {data} (../shared is needed)")
    wh = tmp_path / "wh"
    for top_k, limit in ((10, 20), (20, 5)):
        cfg = ExtractConfig(model=str(tiny_model_dir), data=str(data), warehouse=str(wh), limit=limit, top_k=top_k,
                            device="cpu")
        plan = plan_extract(cfg)
        with Committer(cfg.warehouse, plan.run_id) as commit:
            commit.register(plan.registration)
            for batch in plan.batches:
                extract_items(plan.job, batch, commit)
    con = connect(wh)
    ns = con.execute("SELECT settings, list(DISTINCT n) FROM rank_equals_length GROUP BY settings").fetchall()
    assert sorted(tuple(n) for _, n in ns) == [(5,), (20,)]
    by_k = dict(con.execute("SELECT json_extract(settings_json, '$.top_k')::INT, settings FROM settings").fetchall())
    assert set(by_k) == {10, 20} and {s for s, _ in ns} == set(by_k.values())
    # every view has a settings column and keeps the two apart
    for view in ("target_rank_by_layer", "target_rank_by_role", "vjp_norm_by_segment", "vjp_norm_by_role",
                 "vjp_layer_similarity"):
        assert con.execute(f"SELECT count(DISTINCT settings) FROM {view}").fetchone()[0] == 2, view
    k = con.execute("SELECT max(len(top_ids)) FILTER (WHERE settings = ?), max(len(top_ids)) FILTER "
                    "(WHERE settings = ?) FROM projections", [by_k[10], by_k[20]]).fetchone()
    assert k == (10, 20)
    assert [m for m, _ in mixed_settings(con)] == [str(tiny_model_dir)]
    diag = con.execute("SELECT min(mean_cosine), max(mean_cosine) FROM vjp_layer_similarity "
                       "WHERE layer_a = layer_b").fetchone()
    assert diag == (1.0, 1.0)
    roles = {r[0] for r in con.execute("SELECT DISTINCT role FROM vjp_norm_by_role").fetchall()}
    assert "last_subject" in roles and "last" in roles
    sites = {r[0] for r in con.execute("SELECT DISTINCT site FROM vjp_norm_by_role").fetchall()}
    assert sites == {"ff1_input", "ff2_vjp", "attn_vjp"}
    matrices = {r[0] for r in con.execute("SELECT DISTINCT matrix FROM rank_equals_length").fetchall()}
    assert matrices == {"ff1", "ff1_gate", "ff2", "attn_q", "attn_k", "attn_v", "attn_o"}
    con.close()
    # blens sql says so (stderr), and still answers
    from typer.testing import CliRunner

    from blens.cli import app

    r = CliRunner().invoke(app, ["sql", "SELECT count(*) AS n FROM prompts", "--warehouse", str(wh), "--format", "csv"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the note wraps at the terminal width wherever the path ends
    assert "25" in said and "holds results under 2 settings" in said
