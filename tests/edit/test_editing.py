"""Tests for forward-pass editing (edit/), its flow and CLI: tiny random GPT-2 and Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blens.edit.cases import prepare_case
from blens.edit.editor import EditError, Editor, RestoreError, applied, update_grad_cosine
from blens.edit.job import edit_records, results_table
from blens.edit.metrics import metrics
from blens.edit.spec import EditConfig, EditSpec

from builders import FACTS, assert_same, make_edit_record as make_record, weights_snapshot as snapshot

LAYER = 1


def full_last_logits(lm, ids) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def test_shift_update_value_and_orientation(tiny_lm):
    ed = Editor(tiny_lm)
    case = prepare_case(make_record(0), tiny_lm.tokenizer)
    probe = ed.probe(case, [LAYER])
    # x_n is the FF2 input at the edit prompt's last position, captured independently here
    seen = {}
    h = ed.view.matrix(LAYER, "ff2").register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0][0, -1].clone()))
    full_last_logits(tiny_lm, case.prompt_ids)
    h.remove()
    assert torch.allclose(probe.x_n[LAYER], seen["x"], atol=1e-5)
    eta = 0.37
    spec = EditSpec("shift", LAYER, eta)
    update, eff, converged = ed.update_for(spec, probe)
    assert converged is None  # a fixed step has no search
    e = tiny_lm.view.unembedding[case.target_new_id]
    assert eff == eta and torch.equal(update, eta * torch.outer(probe.x_n[LAYER], e))
    raw = ed.view.matrix(LAYER, "ff2").weight
    before = raw.detach().clone()
    with applied(ed.view, LAYER, update):
        delta = raw.detach() - before
        # GPT-2 Conv1D stores (d_ff, d) = (in, out); Llama nn.Linear stores (d, d_ff) = (out, in)
        expected = update if ed.view.family.weight_is_in_by_out else eta * torch.outer(e, probe.x_n[LAYER])
        assert delta.shape == before.shape
        assert torch.allclose(delta, expected, atol=1e-6)
        # replaying only the upper blocks equals a full forward of the edited model
        replay = ed.replay(probe, LAYER)
        assert torch.allclose(replay[0], full_last_logits(tiny_lm, case.prompt_ids), atol=1e-4)
        for i, seq in enumerate(case.sequences):  # padded rows too
            assert torch.allclose(replay[i], full_last_logits(tiny_lm, seq), atol=1e-4)
    assert torch.equal(raw, before)


def test_sgd_update_is_minus_lr_autograd_gradient(tiny_lm):
    ed = Editor(tiny_lm)
    case = prepare_case(make_record(1), tiny_lm.tokenizer)
    probe = ed.probe(case, [0, LAYER])
    w = ed.view.matrix(LAYER, "ff2").weight
    w.requires_grad_(True)
    try:
        logits = tiny_lm.model(input_ids=torch.tensor([case.prompt_ids]), use_cache=False).logits[0, -1]
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([case.target_new_id]))
        (g,) = torch.autograd.grad(loss, [w])
    finally:
        w.requires_grad_(False)
    g_io = g if ed.view.family.weight_is_in_by_out else g.T
    assert torch.allclose(probe.grad[LAYER], g_io, rtol=1e-4, atol=1e-5)
    lr = 2.5
    update, _, _ = ed.update_for(EditSpec("sgd", LAYER, lr), probe)
    assert torch.equal(update, -lr * probe.grad[LAYER])
    # cosine(shift update, -grad) against a hand computation on the flattened matrices
    e = tiny_lm.view.unembedding[case.target_new_id]
    hand = torch.nn.functional.cosine_similarity(torch.outer(probe.x_n[LAYER], e).flatten().double(),
                                                 -g_io.flatten().double(), dim=0)
    shift_cos = update_grad_cosine(torch.outer(probe.x_n[LAYER], e), g_io)
    assert math.isclose(shift_cos, float(hand), rel_tol=1e-6, abs_tol=1e-9)
    # each method's own update: sgd's is -lr * grad, so its cosine is 1 (issue 23: it was the shift's)
    rows = ed.run_case(case, [EditSpec("sgd", LAYER, lr), EditSpec("shift", LAYER, 0.1)])
    assert rows[0]["update_grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["update_grad_cosine"] == pytest.approx(shift_cos, rel=1e-5)
    assert rows[1]["update_grad_cosine"] < 0.99
    # the cosine depends on the direction only, not on eta
    row_a = ed.run_case(case, [EditSpec("shift", LAYER, 0.1)])[0]
    row_b = ed.run_case(case, [EditSpec("shift", LAYER, 10.0)])[0]
    assert row_a["update_grad_cosine"] == pytest.approx(row_b["update_grad_cosine"])


def test_weights_restored_bit_exactly_even_on_nan_and_exceptions(tiny_lm, monkeypatch):
    ed = Editor(tiny_lm)
    snap = snapshot(tiny_lm.model)
    case = prepare_case(make_record(2), tiny_lm.tokenizer)
    specs = [EditSpec("none"), EditSpec("shift", LAYER, 0.5), EditSpec("sgd", 0, 1.0),
             EditSpec("shift", 2, 1.0, "normalized"), EditSpec("shift", 2, 1.0, "minimal")]
    rows = ed.run_case(case, specs)
    assert [r["error"] for r in rows] == [None] * len(specs)
    assert_same(tiny_lm.model, snap)
    # an update with a NaN: recorded as an error row, model untouched
    monkeypatch.setattr(Editor, "update_for", lambda self, spec, probe: (
        torch.full_like(self.view.weight(spec.layer, "ff2"), float("nan")), 1.0, None))
    rows = ed.run_case(case, [EditSpec("shift", LAYER, 0.5)])
    assert rows[0]["error"] and "finite" in rows[0]["error"] and rows[0]["efficacy"] is None
    assert_same(tiny_lm.model, snap)
    # an update that makes the matrix non-finite, applied directly
    with pytest.raises(EditError):
        with applied(ed.view, LAYER, torch.full_like(ed.view.weight(LAYER, "ff2"), float("inf"))):
            pass
    assert_same(tiny_lm.model, snap)
    # any exception inside the edit
    with pytest.raises(ZeroDivisionError):
        with applied(ed.view, LAYER, torch.ones_like(ed.view.weight(LAYER, "ff2"))):
            1 / 0
    assert_same(tiny_lm.model, snap)


def test_restore_failure_is_loud(tiny_lm):
    ed = Editor(tiny_lm)
    w = ed.view.weight(LAYER, "ff2")
    snap = w.detach().clone()
    orig_copy = torch.Tensor.copy_

    def bad_copy(self, src, *a, **k):  # simulate a restore that does not come back exactly
        out = orig_copy(self, src, *a, **k)
        self[(0,) * self.dim()] += 1.0
        return out

    try:
        torch.Tensor.copy_ = bad_copy
        with pytest.raises(RestoreError):
            with applied(ed.view, LAYER, torch.zeros_like(w)):
                pass
    finally:
        torch.Tensor.copy_ = orig_copy
        with torch.no_grad():
            w.copy_(snap)


def test_metrics_on_constructed_logits(tiny_lm):
    case = prepare_case(make_record(0), tiny_lm.tokenizer)
    V = tiny_lm.view.vocab_size
    new, true, gt = case.target_new_id, case.target_true_id, case.locality_gt_ids[0]
    pre = torch.zeros(3, V)
    pre[2, 7] = 5.0  # locality prompt's argmax before the edit: token 7
    post = torch.zeros(3, V)
    post[0, new], post[0, true] = 4.0, 2.0  # edit prompt: new is argmax, beats true
    post[1, true], post[1, new] = 3.0, 1.0  # rephrase: true wins
    post[2, gt] = 6.0  # locality: the true answer is argmax, but it changed from token 7
    m = metrics(case, post, pre)
    assert m["efficacy"] == 1.0 and m["new_gt_true"] == 1.0
    assert m["generalization"] == 0.0 and m["rephrase_new_gt_true"] == 0.0
    assert m["locality"] == 1.0 and m["locality_unchanged"] == (1.0 if gt == 7 else 0.0)
    p = torch.softmax(post[0].double(), -1)
    assert m["target_new_prob"] == pytest.approx(float(p[new])) and m["target_true_prob"] == pytest.approx(float(p[true]))


def test_huge_eta_makes_the_edit_succeed(tiny_lm):
    snap = snapshot(tiny_lm.model)
    recs = [make_record(c) for c in range(5)]
    last = tiny_lm.view.n_layers - 1
    rows, errors = edit_records(tiny_lm, recs, [EditSpec("none"), EditSpec("shift", last, 1e4),
                                                EditSpec("shift", last, 1.0, "minimal")])
    assert not errors
    by = {(r["method"], r["case_id"]): r for r in rows}
    assert all(by[("shift", c)]["efficacy"] == 1.0 for c in range(5))
    assert all(by[("shift-minimal", c)]["efficacy"] == 1.0 for c in range(5))
    assert all(by[("none", c)]["locality_unchanged"] == 1.0 for c in range(5))
    assert all(0 <= by[("shift-minimal", c)]["_eta"] < math.inf for c in range(5))
    assert_same(tiny_lm.model, snap)
    t = results_table(rows, "r", "tiny")
    assert t.num_rows == 15 and t.column("efficacy").null_count == 0


def test_bad_records_become_error_rows(tiny_lm):
    long = " ".join(["word"] * 80)  # longer than the tiny models' 64 positions
    recs = [make_record(0), make_record(1, prompt=long + " is"), make_record(2, locality_prompts=(long,))]
    snap = snapshot(tiny_lm.model)
    rows, errors = edit_records(tiny_lm, recs, [EditSpec("shift", LAYER, 0.3)])
    assert [r["error"] is None for r in rows] == [True, False, False]
    assert {e.case_id for e in errors} == {1, 2}  # their stage ('edit') is checked end to end in the flow test
    assert {e.field for e in errors} == {"prompt", "locality_prompts"}
    assert_same(tiny_lm.model, snap)


def test_flow_end_to_end_and_summary_view(tiny_model_dir, tmp_path):
    from blens.extract.models import cached_model
    from blens.edit.job import choose_defaults
    from blens.flows.edit_flow import edit_flow
    from blens.store.connect import connect

    facts = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g,
              "rephrase_prompt": p + " the", "locality_prompt": FACTS[(c + 1) % 5][1],
              "locality_ground_truth": FACTS[(c + 1) % 5][4]} for c, p, s, t, g in FACTS]
    facts.append({**facts[0], "case_id": 10,  # too long for the model's context: an edit error
                  "prompt": " ".join(["word"] * 80) + " " + facts[0]["prompt"]})
    facts.append({"case_id": 11, "prompt": "x is", "subject": "x", "ground_truth": "y"})  # no target: load error
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(facts))
    wh = tmp_path / "wh"
    name = str(tiny_model_dir)
    snap = snapshot(cached_model(name, "cpu").model)
    specs = [EditSpec("none"), EditSpec("shift", 2, 0.5), EditSpec("sgd", 2, 1.0)]
    s = edit_flow(EditConfig(model=name, data=str(data), specs=specs, warehouse=str(wh), batch_size=4,
                             fluency_tokens=4))
    assert s.n_records == 6 and s.n_load_errors == 1 and s.n_errors == 1
    assert_same(cached_model(name, "cpu").model, snap)
    con = connect(wh)
    got = con.execute("SELECT method, layer, n, n_errors, kind, efficacy BETWEEN 0 AND 1 FROM edit_summary "
                      "ORDER BY method").fetchall()
    assert got == [("none", None, 5, 1, "edit", True), ("sgd", 2, 5, 1, "edit", True),
                   ("shift", 2, 5, 1, "edit", True)]
    got = con.execute("SELECT method, n_not_converged, fluency >= 0, mean_update_grad_cosine FROM edit_summary "
                      "ORDER BY method").fetchall()
    assert [g[:3] for g in got] == [("none", 0, True), ("sgd", 0, True), ("shift", 0, True)]
    assert got[1][3] == pytest.approx(1.0, abs=1e-5) and got[2][3] < got[1][3] - 1e-4  # each method's own update
    errs = con.execute("SELECT case_id, stage, field FROM errors ORDER BY case_id").fetchall()
    assert errs == [(10, "edit", "prompt"), (11, "load", "target_new")]
    # defaults are chosen per method from one run's rows (what sweep_flow returns)
    from blens.store.reads import edit_summary_rows

    d = choose_defaults(edit_summary_rows(str(wh), s.run_id), min_efficacy=0.0)
    assert set(d) == {"shift", "sgd"} and d["shift"]["layer"] == 2 and d["shift"]["n"] == 5


def test_cli_rejects_bad_layer_up_front(tiny_model_dir, records_file, tmp_path):
    from typer.testing import CliRunner

    from blens.cli import app

    res = CliRunner().invoke(app, ["edit", "--method", "shift", "--step", "fixed", "--layer", "7", "--lr", "0.1", "--model",
                                   str(tiny_model_dir), "--data", str(records_file), "--warehouse",
                                   str(tmp_path / "wh")])
    assert res.exit_code != 0 and "out of range" in res.output
    assert not (tmp_path / "wh").exists()
    res = CliRunner().invoke(app, ["edit", "--method", "shift", "--model", str(tiny_model_dir), "--data",
                                   str(records_file)])
    assert res.exit_code != 0 and "needs --layer and --lr" in res.output


def test_cli_defaults_resolve_to_the_sweep_choice():
    import typer

    from blens.commands.edit import resolve_spec
    from blens.edit.tuned import DEFAULTS

    d = DEFAULTS["smollm2-135m"]
    assert resolve_spec("shift", None, None, None, "smollm2-135m") == EditSpec("shift", *d["shift-minimal"], "minimal")
    assert resolve_spec("shift", "fixed", 24, 0.24, "gpt2") == EditSpec("shift", 24, 0.24, "fixed")  # the paper's eta
    with pytest.raises(typer.Exit):  # --lr never switches the step silently (issue 23)
        resolve_spec("shift", None, 24, 0.24, "gpt2")
    assert resolve_spec("rome", None, None, None, "smollm2-135m") == EditSpec("rome", d["rome"][0], None)
    with pytest.raises(typer.Exit):
        resolve_spec("rome", None, 3, 0.5, "smollm2-135m")
    assert resolve_spec("shift", "fixed", None, None, "smollm2-135m") == EditSpec("shift", *d["shift"])
    assert resolve_spec("sgd", None, None, None, "smollm2-135m") == EditSpec("sgd", *d["sgd"])
    assert resolve_spec("none", None, None, None, "x") == EditSpec("none")


def test_rerun_of_an_edit_says_what_was_done_and_skips_it(tiny_model_dir, records_file, tmp_path):
    """Issue 13: after a kill (or a finished run) the same `blens edit` skips the stored edits and says so."""
    from builders import ROOT, blens_in_process

    args = ["edit", "--method", "shift", "--step", "fixed", "--layer", "1", "--lr", "0.5",
            "--model", str(tiny_model_dir), "--data", str(records_file), "--warehouse", str(tmp_path / "wh")]
    first = blens_in_process(*args, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    second = blens_in_process(*args, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    assert "5 record(s) already in the warehouse (skipped), 0 to go" in second.stderr
