"""Issue 23: ROME as a real baseline, fluency (ROME's generation entropy), and failed minimal-step searches
flagged and kept out of edit_summary's means. Tiny random GPT-2 and Llama models."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from blens.edit.cases import prepare_case
from blens.edit.editor import Editor
from blens.edit.fluency import fluency_of, generation_entropy, ngram_entropy
from blens.edit.job import edit_records, results_table
from blens.edit.rome import KeyStatistics, RomeHparams, encode_with_subject, stats_texts
from blens.edit.spec import EditSpec

from builders import FACTS
from builders import assert_same, make_edit_record as make_record, weights_snapshot as snapshot


def rome_stats(lm) -> KeyStatistics:
    texts = [p for _, p, *_ in FACTS] + [f"{s} is a" for _, _, s, _, _ in FACTS] + ["The cat sat on the mat."] * 3
    return KeyStatistics(lm, texts, description="test", disk_cache=False)


# -- fluency ---------------------------------------------------------------------------------------------
def test_generation_entropy_matches_a_hand_computation():
    text = "a b a b c"
    # 2-grams: ab, ba, ab, bc -> {ab: 2, ba: 1, bc: 1}; 3-grams: aba, bab, abc -> 3 distinct, uniform
    h2 = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25))  # 1.5 bits
    h3 = math.log2(3)
    assert ngram_entropy(text, 2) == pytest.approx(h2) and ngram_entropy(text, 3) == pytest.approx(h3)
    assert generation_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)  # ROME's weights, arithmetic mean
    assert generation_entropy("the the the the the") == 0.0  # a degenerate repetition has no entropy
    assert fluency_of([text, "x x x"]) == pytest.approx(generation_entropy(text) / 2)
    assert fluency_of([]) is None


# -- ROME ------------------------------------------------------------------------------------------------
def test_subject_last_token_is_found():
    from builders import gpt2_tokenizer

    tok = gpt2_tokenizer()
    ids, i = encode_with_subject(tok, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    assert tok.decode(ids[: i + 1]).endswith("Darrieux") and not tok.decode(ids[: i]).endswith("Darrieux")


# A random tiny model's FF2 outputs are ~0.05 (init std 0.02) and its logits nearly uniform, so ROME's published
# clamp (4 |v0|) and weight decay (relative to |v0|^2) cannot move them; the mechanics are tested with those two
# relaxed. The subject ends the prompt: in a 3-layer random model little flows from an earlier subject token to the
# last position, which is what ROME relies on in a trained model.
# Fewer steps and context prefixes keep the tests fast.
LOOSE = RomeHparams(v_weight_decay=0.0, clamp_norm_factor=1000.0, v_num_grad_steps=12,
                    context_template_length_params=((4, 2),))


def test_rome_update_is_rank_one_makes_the_target_the_argmax_and_restores(tiny_lm):
    ed = Editor(tiny_lm, rome_stats=rome_stats(tiny_lm), rome_hparams=LOOSE)
    snap = snapshot(tiny_lm.model)
    case = prepare_case(make_record(1, prompt="The city I love most is Paris", subject="Paris"), tiny_lm.tokenizer)
    update = ed.rome_update(case, 1)
    assert update.shape == ed.view.weight(1, "ff2").shape
    sv = torch.linalg.svdvals(update.double())
    assert sv[0] > 0 and sv[1] < 1e-5 * sv[0]  # rank one up to float32 rounding
    assert_same(tiny_lm.model, snap)  # computing v* never touches the weights
    rows = ed.run_case(case, [EditSpec("none"), EditSpec("rome", 1)])
    assert [r["error"] for r in rows] == [None, None]
    rome = rows[1]
    assert rome["method"] == "rome" and rome["lr"] is None and rome["converged"] is None
    assert rome["efficacy"] == 1.0 and rows[0]["efficacy"] == 0.0
    assert -1.0 <= rome["update_grad_cosine"] <= 1.0
    assert_same(tiny_lm.model, snap)


def test_every_method_restores_the_weights_bit_exactly_and_measures_fluency(tiny_lm):
    snap = snapshot(tiny_lm.model)
    specs = [EditSpec("none"), EditSpec("shift", 1, 0.5), EditSpec("shift", 2, 1.25, "minimal"),
             EditSpec("sgd", 1, 1.0), EditSpec("rome", 1)]
    recs = [make_record(0)]
    rows, errors = edit_records(tiny_lm, recs, specs, fluency_tokens=6, rome_stats=rome_stats(tiny_lm),
                                rome_hparams=LOOSE)
    assert not errors
    assert_same(tiny_lm.model, snap)
    assert all(r["fluency"] is not None and r["fluency"] >= 0 for r in rows)
    by = {(r["method"], r["case_id"]): r for r in rows}
    assert by[("sgd", 0)]["update_grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert by[("shift", 0)]["update_grad_cosine"] < 0.99
    t = results_table(rows, "r", "tiny")
    assert t.column("converged").type == pa.bool_() and t.column("fluency").null_count == 0


# -- minimal step that never reaches the target ---------------------------------------------------------
def test_a_failed_minimal_step_search_is_flagged_not_converged(tiny_lm, monkeypatch):
    ed = Editor(tiny_lm)
    case = next(c for c in (prepare_case(make_record(i), tiny_lm.tokenizer) for i in range(5))
                if int(ed.probe(c, [1], grad=False).logits[0].argmax()) != c.target_new_id)
    # an edited model that always answers as before: no step can make target_new the argmax
    monkeypatch.setattr(Editor, "replay", lambda self, probe, layer, rows=None: probe.logits[rows or slice(None)])
    row = ed.run_case(case, [EditSpec("shift", 1, 1.25, "minimal")])[0]
    assert row["error"] is None and row["converged"] is False and row["efficacy"] == 0.0
    monkeypatch.undo()
    row = ed.run_case(case, [EditSpec("shift", 2, 1.25, "minimal")])[0]
    assert row["converged"] is True


def test_edit_summary_keeps_non_converged_edits_out_of_the_means(tmp_path):
    from blens.store.connect import connect
    from blens.store.schema import TABLES
    from blens.store.writer import commit_batch, init_warehouse

    root = init_warehouse(tmp_path / "wh")
    base = {"run_id": "r", "model": "m", "method": "shift-minimal", "layer": 2, "lr": 1.25, "error": None,
            "efficacy": 1.0, "generalization": 0.5, "locality": 0.0, "locality_unchanged": 0.5, "update_norm": 10.0,
            "fluency": 4.0}
    rows = [{**base, "key": f"k{i}", "case_id": i, "converged": True} for i in range(3)]
    rows.append({**base, "key": "k9", "case_id": 9, "converged": False, "efficacy": 0.0, "update_norm": 221364.0,
                 "fluency": 0.1})
    rows.append({**base, "key": "k10", "case_id": 10, "method": "sgd", "lr": 3.0, "converged": None})
    schema = pa.schema([f for f in TABLES["edit_results"] if f.name != "batch_id"])
    commit_batch(root, {"edit_results": pa.Table.from_pylist(rows, schema=schema)}, kind="edit")
    con = connect(root)
    got = con.execute("SELECT method, n, n_not_converged, efficacy, mean_update_norm, fluency, locality_unchanged "
                      "FROM edit_summary ORDER BY method").fetchall()
    con.close()
    assert got[0][:3] == ("sgd", 1, 0)  # NULL converged (no search) counts as an ordinary edit
    method, n, n_nc, eff, norm, flu, unch = got[1]
    assert (method, n, n_nc) == ("shift-minimal", 3, 1)
    assert eff == pytest.approx(1.0) and norm == pytest.approx(10.0) and flu == pytest.approx(4.0)
    assert unch == pytest.approx(0.5)


def test_stats_texts_use_prompts_paraphrases_and_neighbourhood():
    r = make_record(0)
    assert stats_texts([r]) == [r.prompt, *r.rephrase_prompts, *r.locality_prompts]


def test_greedy_continuation_with_the_cache_equals_full_forwards(tiny_lm):
    from blens.edit.fluency import greedy_continuation

    ids = list(prepare_case(make_record(1), tiny_lm.tokenizer).prompt_ids)
    got = greedy_continuation(tiny_lm.model, ids, 5, "cpu")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(5):
            seq.append(int(tiny_lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_greedy_continuations_of_a_padded_batch_equal_each_prompt_alone(tiny_lm):
    """Fluency and ROME's context templates generate for several prompts of different lengths in one
    left-padded batch: each row is what that prompt alone gives (padding masked, positions shifted back)."""
    from blens.edit.fluency import greedy_continuation, greedy_continuations

    prompts = [list(prepare_case(make_record(i), tiny_lm.tokenizer).prompt_ids) for i in range(4)]
    prompts.append(prompts[0][:2])
    assert len({len(p) for p in prompts}) > 1
    together = greedy_continuations(tiny_lm.model, prompts, 6, "cpu")
    assert together == [greedy_continuation(tiny_lm.model, p, 6, "cpu") for p in prompts]
    assert all(len(g) == 6 for g in together)
