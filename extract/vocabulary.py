"""Token labels: the decoded text of every token id (e.g. ' English'), once per tokenizer per process.

The tables label top/bottom-k ids with ``vocabulary(tokenizer).take(ids)``, so no Python loop runs per row.
Decoding the whole vocabulary is paid once per process that extracts, which is why it goes through the
tokenizer's Rust backend where that gives the same strings."""

from __future__ import annotations

import functools

import pyarrow as pa


@functools.lru_cache(maxsize=4)
def _vocab_cached(tokenizer_id: int, tokenizer) -> pa.Array:
    return pa.array(decode_each_token(tokenizer), pa.string())


def decode_each_token(tokenizer) -> list[str]:
    """``tokenizer.decode([i])`` for every id, through the Rust backend's batch decode where that is the same
    thing: a fast tokenizer without transformers' clean-up of spaces (SmolLM2, Gemma 3, GPT-2 here). Python's
    ``batch_decode`` took 1 s for a 50k vocabulary and 5.6 s for Gemma's 262k on a 2-core box, in every
    process that extracts; the backend takes 0.07 s and 0.8 s (tests/extract/test_lens.py pins the equality)."""
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


def vocabulary(tokenizer) -> pa.Array:
    """Decoded text of every token id (e.g. ' English'), used to label ids without Python loops."""
    return _vocab_cached(id(tokenizer), tokenizer)
