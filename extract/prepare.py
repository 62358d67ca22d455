"""From an edit record to model inputs: token ids, target ids, token segments; or a precise error.

Tokenization uses the model's tokenizer defaults (special tokens as the tokenizer adds them: none for
GPT-2 and SmolLM2, a BOS for Llama-2). A target's id is the first token of ``" " + target`` without
special tokens: the token the model must produce right after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import EditRecord, RecordError

SEGMENT_SUBJECT, SEGMENT_LAST, SEGMENT_OTHER = "subject", "last", "other"


@dataclass(frozen=True)
class PreparedPrompt:
    record: EditRecord
    input_ids: tuple[int, ...]
    segments: tuple[str, ...]
    target_new_id: int
    target_true_id: int

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


def subject_span(prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of the subject in the prompt (last occurrence; case-insensitive fallback)."""
    start = prompt.rfind(subject)
    if start < 0:
        start = prompt.lower().rfind(subject.lower())
    return None if start < 0 or not subject else (start, start + len(subject))


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


def target_ids(record: EditRecord, tokenizer) -> tuple[int, int] | RecordError:
    """(target_new id, target_true id), or the error naming the target the tokenizer cannot produce."""
    ids = []
    for field, text in (("target_new", record.target_new), ("target_true", record.target_true)):
        tid = target_id(tokenizer, text)
        if tid is None:
            return RecordError(case_id=record.case_id, field=field,
                               message=f"{field} {text!r} cannot be produced by the tokenizer", source=record.source)
        ids.append(tid)
    return ids[0], ids[1]


def prepare(record: EditRecord, tokenizer, max_tokens: int | None) -> PreparedPrompt | RecordError:
    """Tokenize one record for extraction; every failure names the record and the field."""

    def error(field: str, message: str) -> RecordError:
        return RecordError(case_id=record.case_id, field=field, message=message, source=record.source)

    enc = tokenizer(record.prompt, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        return error("prompt", "prompt tokenizes to no tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        return error("prompt", f"prompt is {len(ids)} tokens, longer than the model's context of {max_tokens}")
    targets = target_ids(record, tokenizer)
    if isinstance(targets, RecordError):
        return targets
    new_id, true_id = targets
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    segs = segments_for(offsets, subject_span(record.prompt, record.subject))
    return PreparedPrompt(record=record, input_ids=tuple(ids), segments=segs,
                          target_new_id=new_id, target_true_id=true_id)
