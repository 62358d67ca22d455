"""Test helpers shared by every folder (a helper module, not a test module; fixtures live in conftest.py):
paths to ../shared, the CounterFact-like FACTS, tiny random GPT-2 / Llama / Gemma 3 models built from configs,
real warehouses for the product tests (built from a tiny random GPT-2 through the extraction core and the
store, the way `blens extract` builds them), autograd references, and the in-process CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models/gpt2-tokenizer/tokenizer.json"
DATA = SHARED / "data/counterfact/counterfact-edit-1k.json"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"
COUNTERFACT = SHARED / "data" / "counterfact"


FACTS = [
    (0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    (1, "Paris is the capital of", "Paris", "Italy", "France"),
    (2, "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    (3, "Toko Yasuda, the", "Toko Yasuda", "piano", "guitar"),
    (4, "Autonomous University of Madrid, which is located in", "Autonomous University of Madrid", "Sweden", "Spain"),
]

# The records of the session's extracted warehouse (conftest.py: ``extracted``).
SESSION_RECORDS = [{"case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": "Rome",
                    "ground_truth": "Oslo"} for i, s in enumerate(["Paris", "Berlin", "Madrid", "Vienna"])]


def gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    if not GPT2_TOKENIZER.exists():
        pytest.skip(f"GPT-2 tokenizer files not found at {GPT2_TOKENIZER} (../shared is needed)")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|endoftext|>"
    return tok


def tiny_model(family: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=64)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def records():
    from blens.extract.records import EditRecord

    return [EditRecord(case_id=c, prompt=p, subject=s, target_new=t, target_true=g, source=f"test#{c}")
            for c, p, s, t, g in FACTS]


def make_edit_record(c=0, **kw):
    """FACTS[c] as an edit record with one rephrase and one locality prompt (the next fact's)."""
    from blens.extract.records import EditRecord

    _, p, s, t, g = FACTS[c]
    base = dict(case_id=c, prompt=p, subject=s, target_new=t, target_true=g, rephrase_prompts=(p + " the",),
                locality_prompts=(FACTS[(c + 1) % 5][1],), locality_ground_truths=(FACTS[(c + 1) % 5][4],),
                source=f"test#{c}")
    base.update(kw)
    return EditRecord(**base)


def weights_snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap) -> None:
    import torch

    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


SLIDING_WINDOW = 4  # shorter than the fixture prompts, so sliding layers really mask something


def tiny_gemma(vocab_size: int, pad_token_id: int, seed: int = 0):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    return model


# A prompt whose text needs escaping everywhere it is shown (HTML report, Markdown card).
TRICKY = dict(case_id=900001, prompt='The "<b>native</b>" language & tongue of Danielle Darrieux is',
              subject="Danielle Darrieux", target_new="English", target_true="French")
# A prompt with a token that draws nothing unless the report makes it visible: a no-break space (U+00A0).
NBSP = dict(case_id=900002, prompt="The capital of\u00a0France is", subject="France", target_new="Rome",
            target_true="Paris")


def make_warehouse(root: Path, *, edits: bool = False, n: int = 3, run_id: str = "run-tiny", n_layer: int = 4,
                   model_name: str = "tiny-gpt2", extra: tuple[dict, ...] = ()) -> Path:
    """A real warehouse from a tiny random GPT-2: n CounterFact prompts + one tricky prompt (+ ``extra``
    records), vectors on. Called again on the same root with another ``model_name`` and ``run_id``, it adds
    a second model to the warehouse."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from blens.extract.models import wrap_model
    from blens.extract.tables import extract_batch
    from blens.extract.prepare import prepare
    from blens.extract.records import EditRecord
    from blens.extract.sources import load_records
    from blens.store.writer import commit_batch, init_warehouse

    if not TOKENIZER.exists() or not DATA.exists():
        pytest.skip(f"shared test data missing under {SHARED}")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64))
    lm = wrap_model(model, tok, name=model_name)
    res = load_records(DATA, limit=n)
    records = res.records + [EditRecord(**TRICKY, source="test")] + [EditRecord(**r, source="test") for r in extra]
    prompts = [prepare(r, tok, 64) for r in records]
    tables = extract_batch(lm, prompts, run_id, top_k=10, vectors="spanning")
    init_warehouse(root)
    commit_batch(root, tables, kind="extract")
    runs = pa.table({
        "run_id": [run_id], "model": [model_name], "model_revision": ["random-init"], "dataset": [str(DATA)],
        "dataset_fingerprint": [res.fingerprint],
        "config_json": [json.dumps({"top_k": 10, "vectors": "spanning", "limit": n})],
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "code_version": ["test"], "schema_version": pa.array([1], pa.int32()), "kind": ["extract"],
    })
    from blens.extract.models import model_facts
    from blens.store.runs import models_table

    commit_batch(root, {"runs": runs, "models": models_table(model_facts(lm))}, kind="meta")
    if edits:
        add_edits(root, [p.record.case_id for p in prompts], run_id=run_id)
    return root


def add_edits(root: Path, case_ids: list[int], *, run_id: str = "run-tiny") -> None:
    from blens.store.schema import TABLES
    from blens.store.writer import commit_batch

    rows = []
    for i, c in enumerate(case_ids):
        for method, cos in (("ft", 0.95 - 0.1 * i), ("rome", 0.2 + 0.05 * i)):
            rows.append({"key": f"{run_id}-{c}-{method}", "run_id": run_id, "case_id": c, "model": "tiny-gpt2", "method": method, "layer": 2,
                         "lr": 0.01 if method == "ft" else None, "efficacy": 1.0, "generalization": 0.5 + 0.1 * (i % 5),
                         "locality": 0.9, "locality_unchanged": 0.9, "target_new_prob": 0.6,
                         "target_true_prob": 0.1, "new_gt_true": 1.0, "rephrase_new_gt_true": 0.5,
                         "update_grad_cosine": cos, "update_norm": 1.5, "error": None})
    schema = pa.schema([f for f in TABLES["edit_results"] if f.name != "batch_id"])
    commit_batch(root, {"edit_results": pa.Table.from_pylist(rows, schema=schema)}, kind="edit")


def autograd_weight_grads(lm, prompt):
    """Reference: the slow, obvious way. Params require grad, full forward, loss.backward()."""
    import torch

    view = lm.view
    weights = {(l, m): view.matrix(l, m).weight for l in range(view.n_layers) for m in view.matrix_names}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        logits = lm.model(torch.tensor([prompt.input_ids])).logits[0, -1]
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([prompt.target_new_id]))
        grads = torch.autograd.grad(loss, list(weights.values()))
    finally:
        for w in weights.values():
            w.requires_grad_(False)
    # as (d_in, d_out), the orientation of sum_i x_i^T delta_i (a part of a fused matrix: its column block)
    return {k: view.as_in_by_out(g, k[1]) for k, g in zip(weights, grads)}, loss.item()


def assert_spanning_sets_rebuild_gradients(lm, prepared) -> dict:
    """capture() on a right-padded batch rebuilds autograd's dL/dW of every MLP and attention matrix of each prompt alone
    (relative error <= 1e-5); returns prompt index -> autograd's gradients, for further checks."""
    from blens.extract.capture import capture

    spans = capture(lm.view, prepared, lm.tokenizer.pad_token_id)
    refs, n_checked = {}, 0
    for b, p in enumerate(prepared):
        ref, loss = autograd_weight_grads(lm, p)
        refs[b] = ref
        assert spans.loss[b].item() == pytest.approx(loss, rel=1e-5)
        for key, g in ref.items():
            rebuilt = spans.gradient(*key, row=b)
            assert rebuilt.shape == g.shape
            rel = ((rebuilt - g).norm() / g.norm()).item()
            # fp32 rounding: the attention's gradients pass the softmax and reach 1.1e-5 on tiny models; in float64
            # every matrix agrees to 1e-7 (tests/extract/test_gradients.py::test_spanning_sets_are_exact_in_float64)
            tol = 2e-5 if key[1].startswith("attn_") else 1e-5
            assert rel <= tol, f"{lm.name} prompt {b} {key}: relative error {rel:.2e}"
            n_checked += 1
    assert n_checked == len(prepared) * lm.view.n_layers * len(lm.view.matrix_names)
    return {"spans": spans, "refs": refs}


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess's whole session (started with ``start_new_session=True``), so whatever it started
    (Prefect's API server, run processes) goes with it; then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def blens_in_process(*args, env: dict[str, str] | None = None, cwd: Path | str | None = None,
                     input: str | None = None) -> subprocess.CompletedProcess:
    """`blens ARGS` run in this process (Click's CliRunner), answered like ``subprocess.run(..., text=True,
    capture_output=True)``: returncode, stdout, stderr. It goes through the same guard as the `blens` script
    (``blens.cli:app`` is a ``_Blens``, whose ``__call__`` is ``run_guarded``), so a user error is one red
    ``error:`` line and exit 2, and a bug is exit 1 with its traceback on stderr. ``env`` adds variables for
    the call. What a command changes in the process is put back afterwards: the environment (``quiet_prefect``
    sets Prefect variables), the working directory, the signal handlers, the unraisable hook, torch's
    thread count, and the writer connections it opened are closed.

    For the tests where the process is not the subject; signals, kill -9, start-up cost and the real exit of
    a process stay with subprocesses (tests/e2e/)."""
    import signal as _signal
    import sys
    import traceback

    from click.testing import CliRunner

    from blens.cli import app

    class Guarded:  # what CliRunner.invoke calls: ``main`` goes through app.__call__ -> run_guarded
        name = "blens"

        def main(self, args=None, prog_name=None, **extra):
            return app(args=list(args or ()), prog_name=prog_name or "blens", **extra)

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_handlers = {s: _signal.getsignal(s) for s in (_signal.SIGINT, _signal.SIGTERM)}
    saved_hook = sys.unraisablehook
    # The writer keeps one connection per warehouse per process (blens.store.writer._CONNECTIONS, schema
    # checked when it opens): close the ones this command opened, as its process's exit would, so that the
    # next command sees the warehouse as it is then (a test may have changed it underneath).
    writers = getattr(sys.modules.get("blens.store.writer"), "_CONNECTIONS", {})
    had = set(writers)
    torch = sys.modules.get("torch")
    saved_threads = torch.get_num_threads() if torch is not None else None  # `--threads 1` sets torch's
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(Guarded(), [str(a) for a in args], env=env, input=input)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in saved_handlers.items():
            _signal.signal(s, h)
        sys.unraisablehook = saved_hook
        writers = getattr(sys.modules.get("blens.store.writer"), "_CONNECTIONS", {})
        for loc in set(writers) - had:
            writers.pop(loc).close()
        if saved_threads is not None:
            torch.set_num_threads(saved_threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # as Python prints an uncaught exception
    return subprocess.CompletedProcess(["blens", *map(str, args)], result.exit_code, result.stdout, stderr)
