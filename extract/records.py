"""CounterFact edit records: one normalised shape, whatever layout or file form they came in.

Every later stage (tokenisation, the edit, the Backward Lens projections) wants the same six facts
about an edit, but CounterFact circulates in two layouts: EasyEdit's flat records
(``prompt``/``ground_truth``/``rephrase_prompt``...) and ROME's original nested records
(``requested_rewrite`` with a ``{}`` subject placeholder). :func:`record_from_dict` detects the layout
per record and returns an :class:`EditRecord` either way, so both give byte-identical records for the
same fact and therefore the same dataset fingerprint.

One bad record must never sink a 10,000-record run, so validation problems become
:class:`RecordError` rows that the warehouse stores next to the good records: anything a record can
carry that a later stage (tokeniser, Arrow, Parquet) would choke on is caught here and named by
field (a case_id outside int64, text with no visible character, a subject absent from its prompt,
NUL, lone surrogates, numbers too long for Python's int parser). Only a problem with the source as a
whole (missing path, truncated ``.json``, an unreadable file in a directory, hub unreachable) raises
:class:`DataSourceError`, and :func:`describe_source` finds those (and an empty source) before any
model is loaded. docs/reliability.md lists the guarantees and their tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

from blens.errors import UserError

__all__ = [
    "DataSourceError",
    "EditRecord",
    "RecordError",
    "fingerprint_records",
    "record_from_dict",
    "record_from_text",
    "subject_span",
]


class DataSourceError(UserError):
    """The whole source is unusable (missing path, unreadable/truncated file, hub unreachable)."""


@dataclass(frozen=True)
class EditRecord:
    """One counterfactual edit, normalised across layouts (frozen: records are dataset identity).

    ``case_id``, ``subject`` and ``target_true`` are None only in the notebook API's records
    (``record_from_dict(..., optional=True)``, :func:`record_from_text`): a prompt and a target are enough
    there. Every loader of the pipeline requires all three."""

    case_id: int | None
    prompt: str  # subject filled in, stripped of trailing whitespace
    subject: str | None
    target_new: str  # stripped
    target_true: str | None  # EasyEdit ground_truth / ROME target_true.str
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_ground_truths: tuple[str, ...] = ()  # same length as locality_prompts
    source: str = ""  # "file.json#17" (record index) for messages


@dataclass(frozen=True)
class RecordError:
    """Why one input record was rejected; stored as a row so a run's losses stay visible."""

    case_id: int | None  # None when case_id itself is missing/invalid
    field: str  # the offending field, e.g. "target_new", "case_id", "json"
    message: str  # one human sentence naming the problem
    source: str  # "file.json#17" or "file.jsonl:23"


class _Invalid(Exception):
    """Internal: one validation failure, turned into a RecordError by record_from_dict."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


_MISSING = object()
_INT_STR = re.compile(r"\s*-?\d+\s*")
# case_id keys every warehouse table as int64: anything outside cannot be stored (an OverflowError in the
# Arrow build used to kill the whole run, good records included).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _BigInt:
    """A JSON integer literal too long to be an int64 (more than 19 digits), kept as its text.

    json.loads converts integer literals with ``int()``, which raises ValueError (not a JSONDecodeError)
    beyond 4,300 digits and would take the whole file down; every literal this long is out of range for
    case_id anyway, so it is not converted at all. Any other field holding one is a type error as usual.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return _short_digits(self.text)


def _parse_int(text: str) -> int | _BigInt:
    return _BigInt(text) if len(text.lstrip("-")) > 19 else int(text)


def _short_digits(text: str) -> str:
    """A long integer literal shortened for a message: head...tail (N digits)."""
    digits = len(text.lstrip("-"))
    return text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({digits} digits)"


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int)


# Characters that draw nothing. Besides whitespace and the categories Cc (controls), Cf (format: zero-width
# space/joiners, bidi marks, soft hyphen, BOM) and Z* (separators), Unicode's other default-ignorable code
# points: combining grapheme joiner, Hangul fillers, Khmer vowel inherents, Mongolian free variation
# selectors, variation selectors, musical-symbol formatting, tags. A target made only of these becomes a
# byte-fragment token; a prompt or subject made only of them names nothing.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_DEFAULT_IGNORABLE = (
    (0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x2060, 0x206F),
    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


def _invisible(ch: str) -> bool:
    if ch.isspace() or unicodedata.category(ch) in _INVISIBLE_CATEGORIES:
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _DEFAULT_IGNORABLE)


def has_visible_text(text: str) -> bool:
    """True if ``text`` has at least one character that draws something (see ``_invisible``)."""
    return any(not _invisible(ch) for ch in text)


def subject_span(prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of the subject in the prompt (last occurrence; case-insensitive fallback).

    The one definition of "the subject occurs in the prompt": validation here rejects a record without
    a span, and ``prepare`` uses the span to mark the subject's tokens.
    """
    start = prompt.rfind(subject)
    if start < 0:
        start = prompt.lower().rfind(subject.lower())
    return None if start < 0 or not subject else (start, start + len(subject))


def _describe(value: Any) -> str:
    """A short type-and-value phrase for messages, safe for any input (repr escapes NUL/surrogates)."""
    if value is None:
        return "null"
    name = "int" if isinstance(value, _BigInt) else type(value).__name__
    return f"{name} {_quote(value)}"


def _quote(value: Any) -> str:
    """repr, cut to 40 characters: messages stay one short line whatever the input."""
    text = repr(value)
    return text[:37] + "..." if len(text) > 40 else text


def _text(value: Any, field: str, label: str) -> str:
    """Check one required string: present, a str, encodable, and not blank."""
    if value is _MISSING or value is None:
        raise _Invalid(field, f"{label} is missing")
    if not isinstance(value, str):
        raise _Invalid(field, f"{label} must be a string, got {_describe(value)}")
    if "\x00" in value:
        raise _Invalid(field, f"{label} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # json.loads turns "\ud800" into a lone surrogate; it would crash tokenisers and Parquet later.
        raise _Invalid(field, f"{label} contains a lone surrogate, which is not valid unicode") from None
    if not value.strip():
        raise _Invalid(field, f"{label} is empty")
    if not has_visible_text(value):
        shown = " ".join(f"U+{ord(ch):04X}" for ch in dict.fromkeys(value))[:60]
        raise _Invalid(field, f"{label} has no visible characters (only {shown})")
    return value


def _text_list(value: Any, field: str, label: str) -> tuple[str, ...]:
    """An optional str-or-list-of-str field (exports differ); missing or null means none."""
    if value is _MISSING or value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, field, label),)
    if not isinstance(value, (list, tuple)):
        raise _Invalid(field, f"{label} must be a string or a list of strings, got {_describe(value)}")
    return tuple(_text(item, field, f"{label}[{i}]") for i, item in enumerate(value))


def _case_id(raw: dict[str, Any], optional: bool = False) -> int | None:
    """case_id as an int; int-valued strings pass (some exports stringify ids), bools do not. ``optional``: a
    missing (or null) case_id is None instead of an error."""
    value = raw.get("case_id", _MISSING)
    if value is _MISSING or value is None:
        if optional:
            return None
        raise _Invalid("case_id", "case_id is missing")
    if isinstance(value, _BigInt):
        number, text = None, value.text
    elif isinstance(value, int) and not isinstance(value, bool):
        number, text = value, None
    elif isinstance(value, str) and _INT_STR.fullmatch(value):
        text = value.strip()
        number = None if len(text.lstrip("-")) > 19 else int(text)  # int() of 4,301+ digits raises
    else:
        raise _Invalid("case_id", f"case_id must be an integer, got {_describe(value)}")
    if number is None or not INT64_MIN <= number <= INT64_MAX:
        shown = _short_digits(text if text is not None else str(number))
        raise _Invalid("case_id", f"case_id {shown} is outside the 64-bit range [-2^63, 2^63-1] that keys "
                                  "the warehouse tables")
    return number


def _rome_target(rewrite: dict[str, Any], key: str, field: str) -> str:
    """ROME stores targets as {"str": ..., "id": ...}; a bare string is accepted too."""
    value = rewrite.get(key, _MISSING)
    if isinstance(value, dict):
        return _text(value.get("str", _MISSING), field, f"requested_rewrite.{key}.str")
    return _text(value, field, f"requested_rewrite.{key}")


def _maybe(value: Any, optional: bool) -> Any:
    """An optional field's value: missing and null are None, anything else is checked as usual."""
    return None if optional and (value is _MISSING or value is None) else value


def _parse(raw: dict[str, Any], source: str, case_id: int | None, optional: bool = False) -> EditRecord:
    """Validate and normalise one record of either layout (raises _Invalid). ``optional``: subject and
    target_true may be missing (None), for the notebook API."""

    def text_or_none(value: Any, field: str, label: str) -> str | None:
        value = _maybe(value, optional)
        return None if value is None else _text(value, field, label)

    rome = "requested_rewrite" in raw
    if rome:
        rewrite = raw["requested_rewrite"]
        if not isinstance(rewrite, dict):
            message = f"requested_rewrite must be a JSON object, got {_describe(rewrite)}"
            raise _Invalid("requested_rewrite", message)
        prompt_label = "requested_rewrite.prompt"
        prompt = _text(rewrite.get("prompt", _MISSING), "prompt", prompt_label)
        subject = text_or_none(rewrite.get("subject", _MISSING), "subject", "requested_rewrite.subject")
        target_new = _rome_target(rewrite, "target_new", "target_new")
        target_true = None if _maybe(rewrite.get("target_true", _MISSING), optional) is None else \
            _rome_target(rewrite, "target_true", "target_true")
        rephrase = _text_list(raw.get("paraphrase_prompts", _MISSING), "rephrase_prompts", "paraphrase_prompts")
        neighbours = raw.get("neighborhood_prompts", _MISSING)
        locality = _text_list(neighbours, "locality_prompts", "neighborhood_prompts")
        # Neighbourhood subjects share the edited fact's true object, so that is their answer.
        locality_truths: tuple[str, ...] = (target_true,) * len(locality) if target_true is not None else ()
    else:
        prompt_label = "prompt"
        prompt = _text(raw.get("prompt", _MISSING), "prompt", prompt_label)
        subject = text_or_none(raw.get("subject", _MISSING), "subject", "subject")
        target_new = _text(raw.get("target_new", _MISSING), "target_new", "target_new")
        target_true = text_or_none(raw.get("ground_truth", _MISSING), "target_true", "ground_truth")
        rephrase = _text_list(raw.get("rephrase_prompt", _MISSING), "rephrase_prompts", "rephrase_prompt")
        locality = _text_list(raw.get("locality_prompt", _MISSING), "locality_prompts", "locality_prompt")
        gt_raw = raw.get("locality_ground_truth", _MISSING)
        if isinstance(gt_raw, str) and len(locality) > 1:
            gt_raw = [gt_raw] * len(locality)  # one answer shared by every locality prompt
        locality_truths = _text_list(gt_raw, "locality_ground_truths", "locality_ground_truth")
        if len(locality_truths) != len(locality):
            lengths = f"({len(locality_truths)} vs {len(locality)})"
            message = f"locality_ground_truth and locality_prompt differ in length {lengths}"
            raise _Invalid("locality_ground_truths", message)

    subject = subject.strip() if subject is not None else None
    if subject is None:
        pass  # no subject given (notebook API): no subject tokens, no subject check
    elif "{}" in prompt:
        prompt = prompt.replace("{}", subject)
    elif subject_span(prompt, subject) is None:
        if rome:
            raise _Invalid("prompt", f"{prompt_label} has no {{}} placeholder and does not contain the subject")
        # Otherwise the record would be extracted with no subject tokens at all: its "subject" segment
        # (Figure 5's VJP norms by segment) would silently be empty.
        raise _Invalid("subject", f"subject {_quote(subject)} does not occur in the prompt "
                                  "(case-insensitive match)")
    return EditRecord(
        case_id=case_id,
        prompt=prompt.rstrip(),
        subject=subject,
        target_new=target_new.strip(),
        target_true=target_true.strip() if target_true is not None else None,
        rephrase_prompts=tuple(p.rstrip() for p in rephrase),
        locality_prompts=tuple(p.rstrip() for p in locality),
        locality_ground_truths=tuple(t.strip() for t in locality_truths),
        source=source,
    )


def record_from_dict(raw: Any, source: str, *, optional: bool = False) -> EditRecord | RecordError:
    """One record of either layout -> an EditRecord, or the first problem found as a RecordError.

    Never raises for bad input: the caller keeps loading and stores the error row. ``optional`` (the
    notebook API only, never a warehouse run): case_id, subject and ground_truth / target_true may be
    missing and are then None; a present value is checked exactly as without it.
    """
    if not isinstance(raw, dict):
        return RecordError(None, "record", f"record must be a JSON object, got {_describe(raw)}", source)
    try:
        case_id = _case_id(raw, optional)
    except _Invalid as exc:
        return RecordError(None, exc.field, exc.message, source)
    try:
        return _parse(raw, source, case_id, optional)
    except _Invalid as exc:
        return RecordError(case_id, exc.field, exc.message, source)


def record_from_text(prompt: Any, target: Any, source: str, *, subject: Any = None, target_true: Any = None,
                     case_id: Any = None) -> EditRecord | RecordError:
    """A notebook's bare prompt and target (plus what else is known) -> an EditRecord, checked by the same rules
    as a dict record's fields (the EasyEdit names: ``target`` is target_new, ``target_true`` ground_truth)."""
    raw = {"prompt": prompt, "target_new": target, "subject": subject, "ground_truth": target_true,
           "case_id": case_id}
    return record_from_dict(raw, source, optional=True)


def fingerprint_records(records: Sequence[EditRecord]) -> str:
    """sha256 of the records' canonical JSON, in order.

    ``source`` is left out so the same records read from a copied or re-encoded file keep their
    identity; ASCII escaping makes the bytes independent of platform encodings.
    """
    payload = [
        [r.case_id, r.prompt, r.subject, r.target_new, r.target_true,
         list(r.rephrase_prompts), list(r.locality_prompts), list(r.locality_ground_truths)]
        for r in records
    ]
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()
