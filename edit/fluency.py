"""Fluency of an (edited) model: ROME's generation n-gram entropy ("GE"; Meng et al. 2022, Table 1/4).

An edit that makes the model repeat itself ("English English English ...") can still score well on
top-1 metrics; the n-gram entropy of what it generates catches that. ROME's definition
(``experiments/py/eval_utils_counterfact.py`` in kmeng01/rome)::

    compute_n_gram_entropy(text) = mean_n( w_n * H_n ),  n in (2, 3), w = (2/3, 4/3)
    H_n = -sum_g f_g log2 f_g,  f = relative frequencies of the word n-grams of ``text``
    n_gram_entropy(texts) = arithmetic mean over texts

i.e. (2/3 H_2 + 4/3 H_3) / 2 per text, in bits. What we do differently, and why:

* ROME tokenizes words with ``nltk.word_tokenize``; we use the regex ``\\w+|[^\\w\\s]`` (words and single
  punctuation marks), which agrees with it on ordinary English and needs no NLTK data download.
* ROME samples 100 tokens (top-k) from CounterFact's separate ``generation_prompts`` and scores the whole
  text, prompt included. The EasyEdit layout has no generation prompts, so we continue the edit prompt and
  its paraphrases greedily for ``EditConfig.fluency_tokens`` new tokens (a setting; short so that an edit stays
  cheap on CPU) and score the continuation only. Our numbers are therefore lower than ROME's GPT-2 XL
  values (~620 x 1e-2 bits on 100 tokens) by construction; compare methods with each other and with the
  unedited row of the same table, not with the paper's absolute values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)  # ROME's weights
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the relative frequencies of the word n-grams of ``text``; 0 when it has none."""
    toks = words(text)
    counts = Counter(tuple(toks[i: i + n]) for i in range(len(toks) - n + 1))
    total = sum(counts.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def generation_entropy(text: str) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: the arithmetic mean of 2/3 H_2 and 4/3 H_3."""
    parts = [w * ngram_entropy(text, n) for n, w in zip(NGRAM_ORDERS, NGRAM_WEIGHTS)]
    return sum(parts) / len(parts)


def fluency_of(texts: Sequence[str]) -> float | None:
    """ROME's ``n_gram_entropy(texts, agg="arith")``: the mean of :func:`generation_entropy` over texts."""
    if not texts:
        return None
    return sum(generation_entropy(t) for t in texts) / len(texts)


def greedy_continuation(model: torch.nn.Module, ids: Sequence[int], n_tokens: int, device) -> list[int]:
    """``n_tokens`` greedy next tokens after ``ids``: :func:`greedy_continuations` of one prompt."""
    return greedy_continuations(model, [ids], n_tokens, device)[0]


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_tokens: int,
                         device) -> list[list[int]]:
    """``n_tokens`` greedy next tokens after each prompt, all prompts in one left-padded batch with the
    model's KV cache.

    One batch, not a loop over prompts: a one-token step of a small model on CPU is bound by reading its
    weights (SmolLM2: ~0.5 GB per step), so six prompts together cost about what one costs alone. Written out
    instead of ``model.generate`` so that no generation config of a checkpoint (sampling, temperature, stop
    tokens) can change what is measured; generation does not stop at EOS either, so every text has the same
    number of tokens. Positions are explicit (left padding shifts them; GPT-2 in transformers 5 does not
    infer them from the cache), and padded slots are masked."""
    if n_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # pad id 0: masked, never read
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), device=device)
        mask[row, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    past, nxt = out.cache, out.logits[:, -1].argmax(-1)  # transformers 5: `cache` (was past_key_values)
    gen = [nxt]
    ones = torch.ones(len(prompts), 1, dtype=torch.long, device=device)
    for i in range(n_tokens - 1):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(lengths + i)[:, None], cache=past,
                    use_cache=True)
        past, nxt = out.cache, out.logits[:, -1].argmax(-1)
        gen.append(nxt)
    return torch.stack(gen, dim=1).tolist()


def fluency(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], n_tokens: int, device) -> float | None:
    """Fluency of the model as it is now (edited or not): mean generation entropy of the greedy
    continuations of ``prompts`` (token ids; the edit prompt and its paraphrases)."""
    if n_tokens <= 0 or not prompts:
        return None
    texts = [tokenizer.decode(g) for g in greedy_continuations(model, prompts, n_tokens, device)]
    return fluency_of(texts)
