"""From an edit record to model inputs: token ids, target ids, token segments; or a precise error.

Tokenization uses the model's tokenizer defaults (special tokens as the tokenizer adds them: none for
GPT-2 and SmolLM2, a BOS for Llama-2). A target's id is the first token of ``" " + target`` without
special tokens: the token the model must produce right after the prompt.

Two length limits, both ``errors`` rows (field "prompt"), never a crash or an OOM kill:

- ``max_tokens``: the model's context (a longer prompt cannot be run at all);
- ``max_prompt_tokens``: a memory bound. Token-budget batching (``--batch-tokens``) bounds a batch of
  many prompts, but a prompt longer than the budget runs alone, and its memory grows with its length:
  measured on SmolLM2-135M (fp32, CPU, one prompt per process, VmHWM over the loaded model's 1.13 GB),
  +579 MB at 257 tokens, +1,057 MB at 513, +2,160 MB at 1,025, +4,510 MB at 2,049: 2.1-2.2 MB per token,
  linear (autograd's saved activations and the captured x_i, delta_i of 90 matrices). A 5,000-token
  prompt needs ~11 GB and used to get the process OOM-killed, on every rerun. The default,
  ``DEFAULT_MAX_PROMPT_TOKENS`` = 1,024 tokens, keeps one prompt's capture within ~2.2 GB on SmolLM2-135M
  (a peak of ~3.3 GB with the model); per-token memory grows with layers x width, so raise or lower it
  per model (``--max-prompt-tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import EditRecord, RecordError, subject_span

# One prompt's capture memory bound, in tokens (see the module docstring for the measured figures).
DEFAULT_MAX_PROMPT_TOKENS = 1024

SEGMENT_SUBJECT, SEGMENT_LAST, SEGMENT_OTHER = "subject", "last", "other"

# Token roles: ROME's causal-tracing segmentation (Meng et al., 2022), which the paper's Figure 5 uses. The
# three coarse ``segment`` values average the first and middle subject pieces in with the last one, which
# hides the paper's finding (the VJP norm peaks at the *last* subject token); roles keep them apart.
ROLES = ("bos", "before_subject", "first_subject", "middle_subject", "last_subject", "first_subsequent",
         "further", "last")

_LONGEST: dict[int, int] = {}


def longest_token(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` covers (its longest vocabulary entry, at least 1 per
    byte for byte-level vocabularies, plus the 2-character margin of a space marker), so a text longer than
    n x this has more than n tokens: an exact bound, checked without tokenizing."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST[key] = max((len(t) for t in vocab), default=64) + 2
    return _LONGEST[key]


@dataclass(frozen=True)
class PreparedPrompt:
    record: EditRecord
    input_ids: tuple[int, ...]
    segments: tuple[str, ...]
    target_new_id: int
    target_true_id: int | None  # None only when the record has no target_true (notebook API)
    roles: tuple[str | None, ...] = ()  # one of ROLES per token (see roles_for); None where no subject is known

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def target_id(tokenizer, target: str) -> int | None:
    """First token of ``" " + target``; None if the tokenizer cannot produce it (nothing, or unknown)."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    # Some tokenizers emit a bare-space token first (SentencePiece "▁"); skip it if the rest is non-empty.
    if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    if not ids:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])


def segments_for(offsets: list[tuple[int, int]], span: tuple[int, int] | None) -> tuple[str, ...]:
    segs = []
    for i, (s, e) in enumerate(offsets):
        if i == len(offsets) - 1:
            segs.append(SEGMENT_LAST)
        elif span is not None and s < span[1] and e > span[0] and e > s:
            segs.append(SEGMENT_SUBJECT)
        else:
            segs.append(SEGMENT_OTHER)
    return tuple(segs)


def roles_for(offsets: list[tuple[int, int]], span: tuple[int, int] | None,
              special: list[bool] | None = None) -> tuple[str | None, ...]:
    """One of :data:`ROLES` per token, from the tokens' character offsets and the subject's character span.

    * ``last``: the final position, always (it wins over every other role, a subject token's included);
    * ``bos``: special tokens the tokenizer put before any text (Gemma's ``<bos>``; SmolLM2 and GPT-2 add none);
    * ``first_subject`` / ``middle_subject`` / ``last_subject``: the tokens overlapping the subject span; a
      one-token subject is ``last_subject``, a two-token one first + last;
    * ``before_subject``: text tokens before the subject;
    * ``first_subsequent``: the token right after the subject's last token; ``further``: the ones after it.

    A subject that ends at the final token keeps ``first_subject`` / ``middle_subject`` for its earlier pieces
    and has no ``last_subject`` (the final position is ``last``). Without a span (no subject given) only
    ``bos`` and ``last`` are known and the other tokens get None.
    """
    n = len(offsets)
    special = special or [False] * n
    subj = [i for i, (s, e) in enumerate(offsets)
            if span is not None and not special[i] and s < span[1] and e > span[0] and e > s]
    roles: list[str | None] = []
    text_seen = False
    for i in range(n):
        text_seen = text_seen or not special[i]
        if i == n - 1:
            roles.append("last")
        elif special[i] and not text_seen:
            roles.append("bos")
        elif not subj:
            roles.append(None)
        elif i < subj[0]:
            roles.append("before_subject")
        elif i <= subj[-1]:
            roles.append("last_subject" if i == subj[-1] else "first_subject" if i == subj[0] else "middle_subject")
        elif i == subj[-1] + 1:
            roles.append("first_subsequent")
        else:
            roles.append("further")
    return tuple(roles)


def target_ids(record: EditRecord, tokenizer) -> tuple[int, int | None] | RecordError:
    """(target_new id, target_true id), or the error naming the target the tokenizer cannot produce. A record
    without target_true (notebook API) has None for its id."""
    ids: list[int | None] = []
    for field, text in (("target_new", record.target_new), ("target_true", record.target_true)):
        if text is None:
            ids.append(None)
            continue
        tid = target_id(tokenizer, text)
        if tid is None:
            return RecordError(case_id=record.case_id, field=field,
                               message=f"{field} {text!r} cannot be produced by the tokenizer", source=record.source)
        ids.append(tid)
    return ids[0], ids[1]


def prepare(record: EditRecord, tokenizer, max_tokens: int | None,
            max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS) -> PreparedPrompt | RecordError:
    """Tokenize one record for extraction; every failure names the record and the field.

    ``max_tokens`` is the model's context; ``max_prompt_tokens`` the per-prompt memory bound (None: no
    bound). A prompt over either is refused here, so it is recorded once instead of being run (and
    OOM-killed) again on every rerun.
    """

    def error(field: str, message: str) -> RecordError:
        return RecordError(case_id=record.case_id, field=field, message=message, source=record.source)

    bound = min((b for b in (max_tokens, max_prompt_tokens) if b is not None), default=None)
    if bound is not None and len(record.prompt) > bound * longest_token(tokenizer):
        # Before tokenizing: a 200 MB prompt aborted the whole process inside the tokenizer (SIGABRT).
        return error("prompt", f"prompt is {len(record.prompt):,} characters, more than {bound} tokens can hold "
                               f"(at most {longest_token(tokenizer)} characters each); refused before tokenizing "
                               "(raise the limit with --max-prompt-tokens)")
    enc = tokenizer(record.prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    if not ids:
        return error("prompt", "prompt tokenizes to no tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        return error("prompt", f"prompt is {len(ids)} tokens, longer than the model's context of {max_tokens}")
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return error("prompt", f"prompt is {len(ids)} tokens, more than the per-prompt memory limit of "
                               f"{max_prompt_tokens} tokens (raise it with --max-prompt-tokens)")
    targets = target_ids(record, tokenizer)
    if isinstance(targets, RecordError):
        return targets
    new_id, true_id = targets
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    # no subject (notebook API): no span, so no 'subject' segment and roles only for bos and last
    span = subject_span(record.prompt, record.subject) if record.subject is not None else None
    special = [bool(m) for m in enc["special_tokens_mask"]] if "special_tokens_mask" in enc else None
    return PreparedPrompt(record=record, input_ids=tuple(ids), segments=segments_for(offsets, span),
                          target_new_id=new_id, target_true_id=true_id, roles=roles_for(offsets, span, special))
