"""Issue 25: the dataset card's licence comes from the model's registry entry, never a hard-coded MIT: a Gemma 3
warehouse's card names the Gemma Terms of Use, an embedded SmolLM2's Apache-2.0, any other model's is `other`
with a line to check that model's own licence; no card ships weights."""

from __future__ import annotations

import pytest

from builders import make_warehouse


def test_gemma_card_names_the_gemma_terms_and_no_mit(tmp_path):
    from blens.publish.card import read_card_metadata
    from blens.publish.dataset import publish

    wh = make_warehouse(tmp_path / "warehouse", model_name="gemma3-270m", n=1)
    res = publish(wh, tmp_path / "dataset")
    meta = read_card_metadata(res.card)
    assert meta["license"] == "gemma"
    assert meta["license_name"] == "Gemma Terms of Use" and meta["license_link"] == "https://ai.google.dev/gemma/terms"
    text = res.card.read_text()
    assert "Gemma Terms of Use (https://ai.google.dev/gemma/terms)" in text.split("\n---\n", 1)[1]
    assert "MIT" not in text and "license: mit" not in text.lower()
    weights = [p for p in res.out.rglob("*") if p.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth")]
    assert weights == []


@pytest.mark.parametrize("models, license, says", [
    (["smollm2-135m"], "apache-2.0", "the Apache-2.0 (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"),
    (["gemma3-270m"], "gemma", "the Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
    (["tiny-gpt2"], "other", "check the licence of tiny-gpt2"),
    (["gemma3-270m", "smollm2-135m"], "other", "gemma3-270m: Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
])
def test_license_from_the_registry(models, license, says):
    from blens.extract.registry import EMBEDDED
    from blens.publish.card import model_license

    meta, line = model_license(models)
    assert meta["license"] == license and says in line and "MIT" not in line
    assert "No model weights are included" in line
    assert all(e.license and e.license_name and e.license_url.startswith("https://") for e in EMBEDDED.values())
