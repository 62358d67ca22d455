"""Issue 25: a hub name that cannot be loaded offline is one error naming every way out, every embedded model
among them (it named only smollm2-135m). In-process: the hub is an address where nothing listens. And a
checkpoint whose tokenizer cannot pad is one error at load, not a TypeError in the first batch."""

from __future__ import annotations

import pytest


def test_offline_hub_name_names_every_embedded_model(tmp_path, monkeypatch):
    from blens.extract import hub
    from blens.extract.registry import EMBEDDED

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(hub.ModelLoadError) as info:
        hub.check_hub_model("gpt2")
    message = str(info.value)
    assert "\n" not in message and "cannot be reached" in message and "'gpt2'" in message
    assert len(EMBEDDED) >= 2 and {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED)
    for name in EMBEDDED:
        assert name in message, (name, message)


def test_a_tokenizer_that_cannot_pad_is_one_error_at_load(tokenizer):
    from transformers import PreTrainedTokenizerFast

    from blens.extract.models import ModelLoadError, wrap_model
    from builders import GPT2_TOKENIZER, tiny_model

    bare = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))  # no pad token, no EOS token
    with pytest.raises(ModelLoadError, match="'my-model'.*neither a pad token nor an EOS token"):
        wrap_model(tiny_model("llama", len(tokenizer), seed=1), bare, name="my-model")
    assert wrap_model(tiny_model("llama", len(tokenizer), seed=1), tokenizer, name="ok").tokenizer.pad_token_id is not None
