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
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "DataSourceError",
    "EditRecord",
    "LoadResult",
    "RecordError",
    "SourceSummary",
    "describe_source",
    "fingerprint_records",
    "load_records",
    "record_from_dict",
    "subject_span",
]


class DataSourceError(Exception):
    """The whole source is unusable (missing path, unreadable/truncated file, hub unreachable)."""


@dataclass(frozen=True)
class EditRecord:
    """One counterfactual edit, normalised across layouts (frozen: records are dataset identity)."""

    case_id: int
    prompt: str  # subject filled in, stripped of trailing whitespace
    subject: str
    target_new: str  # stripped
    target_true: str  # EasyEdit ground_truth / ROME target_true.str
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


@dataclass
class LoadResult:
    """The valid records, the rejected ones, and a content hash that identifies the dataset."""

    records: list[EditRecord]
    errors: list[RecordError]
    fingerprint: str  # sha256 hex of the canonical JSON of the valid records, in order
    source: str  # the path or dataset id given


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
# A Hugging Face dataset id: "name" or "owner/name" (one slash only; anything deeper is a path).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


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


def _case_id(raw: dict[str, Any]) -> int:
    """case_id as an int; int-valued strings pass (some exports stringify ids), bools do not."""
    value = raw.get("case_id", _MISSING)
    if value is _MISSING or value is None:
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


def _parse(raw: dict[str, Any], source: str, case_id: int) -> EditRecord:
    """Validate and normalise one record of either layout (raises _Invalid)."""
    rome = "requested_rewrite" in raw
    if rome:
        rewrite = raw["requested_rewrite"]
        if not isinstance(rewrite, dict):
            message = f"requested_rewrite must be a JSON object, got {_describe(rewrite)}"
            raise _Invalid("requested_rewrite", message)
        prompt_label = "requested_rewrite.prompt"
        prompt = _text(rewrite.get("prompt", _MISSING), "prompt", prompt_label)
        subject = _text(rewrite.get("subject", _MISSING), "subject", "requested_rewrite.subject")
        target_new = _rome_target(rewrite, "target_new", "target_new")
        target_true = _rome_target(rewrite, "target_true", "target_true")
        rephrase = _text_list(raw.get("paraphrase_prompts", _MISSING), "rephrase_prompts", "paraphrase_prompts")
        neighbours = raw.get("neighborhood_prompts", _MISSING)
        locality = _text_list(neighbours, "locality_prompts", "neighborhood_prompts")
        # Neighbourhood subjects share the edited fact's true object, so that is their answer.
        locality_truths: tuple[str, ...] = (target_true,) * len(locality)
    else:
        prompt_label = "prompt"
        prompt = _text(raw.get("prompt", _MISSING), "prompt", prompt_label)
        subject = _text(raw.get("subject", _MISSING), "subject", "subject")
        target_new = _text(raw.get("target_new", _MISSING), "target_new", "target_new")
        target_true = _text(raw.get("ground_truth", _MISSING), "target_true", "ground_truth")
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

    subject = subject.strip()
    if "{}" in prompt:
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
        target_true=target_true.strip(),
        rephrase_prompts=tuple(p.rstrip() for p in rephrase),
        locality_prompts=tuple(p.rstrip() for p in locality),
        locality_ground_truths=tuple(t.strip() for t in locality_truths),
        source=source,
    )


def record_from_dict(raw: Any, source: str) -> EditRecord | RecordError:
    """One record of either layout -> an EditRecord, or the first problem found as a RecordError.

    Never raises for bad input: the caller keeps loading and stores the error row.
    """
    if not isinstance(raw, dict):
        return RecordError(None, "record", f"record must be a JSON object, got {_describe(raw)}", source)
    try:
        case_id = _case_id(raw)
    except _Invalid as exc:
        return RecordError(None, exc.field, exc.message, source)
    try:
        return _parse(raw, source, case_id)
    except _Invalid as exc:
        return RecordError(case_id, exc.field, exc.message, source)


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


# --- sources -------------------------------------------------------------------------------------

_Row = tuple[str, Any]  # (source label, parsed record or a RecordError for an unparsable line)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataSourceError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _json_rows(path: Path, data: bytes | None = None) -> list[_Row]:
    """A .json file: a list of records, or a dict wrapping one under "data"/"records"."""
    try:
        doc = _loads((_read_bytes(path) if data is None else data).decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path} is not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataSourceError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except RecursionError:
        raise DataSourceError(f"{path} nests JSON arrays/objects too deeply to parse") from None
    if isinstance(doc, dict):
        for key in ("data", "records"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
    if not isinstance(doc, list):
        raise DataSourceError(f"{path} holds a {type(doc).__name__}, expected a list of records "
                              f"or an object with a \"data\" or \"records\" list")
    return [(f"{path.name}#{i}", raw) for i, raw in enumerate(doc)]


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """A .jsonl file: one record per line; a bad line is an error row, not the end of the run."""
    return _jsonl_lines(path, _read_bytes(path))


def _jsonl_lines(path: Path, data: bytes) -> Iterator[_Row]:
    for lineno, line in enumerate(data.splitlines(), start=1):
        label = f"{path.name}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield label, RecordError(None, "json", f"line is not UTF-8 text (byte {exc.start})", label)
            continue
        if not text.strip():
            continue
        try:
            yield label, _loads(text)
        except json.JSONDecodeError as exc:
            message = f"line is not valid JSON ({exc.msg} at column {exc.colno})"
            yield label, RecordError(None, "json", message, label)
        except RecursionError:
            yield label, RecordError(None, "json", "line nests JSON arrays/objects too deeply to parse", label)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataSourceError(f"unsupported data file {path}: expected .json, .jsonl or a directory of them")
    return suffix


def _file_rows(path: Path) -> Iterator[_Row]:
    if _check_suffix(path) == ".json":
        return iter(_json_rows(path))
    return _jsonl_rows(path)


def _dir_rows(path: Path) -> Iterator[_Row]:
    """Every .json/.jsonl directly in ``path``, by name.

    Every file is read, and every .json file parsed, before the first row is returned: a broken file
    anywhere in the directory is a DataSourceError naming it *now* (the CLI checks the source before it
    loads a model), not after the records of the files before it were processed.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
    if not files:
        raise DataSourceError(f"no .json or .jsonl files in directory {path}")
    parts: list[Iterable[_Row]] = []
    for file in files:
        data = _read_bytes(file)
        parts.append(_json_rows(file, data) if _check_suffix(file) == ".json" else _jsonl_lines(file, data))
    return (row for part in parts for row in part)


def _looks_like_path(text: str) -> bool:
    """True for strings that can only mean a local file, so a typo never goes to the network.

    ``owner/name`` is also how hub ids look, so a single slash alone does not make a path.
    """
    name = text.split(":", 1)[0]
    return (
        text.lower().endswith((".json", ".jsonl"))
        or text.startswith((".", "~", os.sep, "/"))
        or "\\" in text
        or not _HUB_ID.fullmatch(name)
    )


def _short_reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_network_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)) or "Offline" in name or "Connect" in name:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_rows(dataset_id: str) -> Iterator[_Row]:
    """A Hugging Face dataset id, ``ID`` or ``ID:split`` (default split "train")."""
    name, _, split = dataset_id.partition(":")
    split = split or "train"
    try:
        import datasets  # lazy: slow to import and only needed for hub ids

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure makes the whole source unusable
        what = "could not be reached" if _is_network_error(exc) else "could not provide it"
        raise DataSourceError(
            f"data path not found locally and the Hugging Face hub {what}: {dataset_id} ({_short_reason(exc)})"
        ) from exc
    return ((f"{name}:{split}#{i}", row) for i, row in enumerate(dataset))


def _rows(source: str | os.PathLike[str]) -> Iterator[_Row]:
    """Resolve a source eagerly (so a missing path fails even with limit=0), then stream its rows."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _dir_rows(path)
    if path.exists():
        return _file_rows(path)
    if not isinstance(source, str) or _looks_like_path(text):
        raise DataSourceError(f"data path not found: {text}")
    return _hub_rows(text)


def load_records(source: str | os.PathLike[str], *, limit: int | None = None) -> LoadResult:
    """Load every record from a file, directory or hub dataset id, validating each one.

    ``limit`` keeps the first N valid records and stops scanning there, so a quick run on a huge
    source costs only what it reads; errors met on the way are still reported. A repeated case_id
    keeps its first occurrence (ids key the warehouse tables).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records: list[EditRecord] = []
    errors: list[RecordError] = []
    first_seen: dict[int, str] = {}
    rows = _rows(source)  # resolved even for limit=0, so a bad source still fails loudly
    for label, raw in rows if limit != 0 else iter(()):
        item = raw if isinstance(raw, RecordError) else record_from_dict(raw, label)
        if isinstance(item, RecordError):
            errors.append(item)
        elif item.case_id in first_seen:
            errors.append(RecordError(
                item.case_id, "case_id",
                f"case_id {item.case_id} appears twice (first at {first_seen[item.case_id]})", label,
            ))
        else:
            first_seen[item.case_id] = label
            records.append(item)
            if limit is not None and len(records) >= limit:
                break
    return LoadResult(records, errors, fingerprint_records(records), os.fspath(source))


@dataclass(frozen=True)
class SourceSummary:
    """What a source holds, known before any model is loaded (see :func:`describe_source`)."""

    source: str
    n_records: int  # valid records (at most ``limit``)
    n_errors: int  # rejected records/lines met on the way
    first_errors: tuple[RecordError, ...]  # the first few, for a message

    @property
    def empty(self) -> bool:
        """Nothing to process: no valid record at all."""
        return self.n_records == 0

    @property
    def all_rejected(self) -> bool:
        """Something was there but every record was rejected: almost surely the wrong file or layout."""
        return self.n_records == 0 and self.n_errors > 0

    def message(self) -> str:
        """One line for the CLI, e.g. ``0 records in cf.jsonl (3 lines rejected, first: cf.jsonl:1 json: line
        is not UTF-8 text (byte 0))``."""
        noun = "record" if self.n_records == 1 else "records"
        text = f"{self.n_records} {noun} in {self.source}"
        if self.n_errors:
            first = self.first_errors[0]
            text += (f" ({self.n_errors} rejected, first: {first.source} {first.field}: {first.message})")
        elif self.empty:
            text += " (the source holds no records)"
        return text


def describe_source(source: str | os.PathLike[str], *, limit: int | None = None,
                    n_first: int = 3) -> SourceSummary:
    """Read and validate a whole source without a model: how many valid records, how many rejected.

    Meant for the CLI before it loads a model: raises :class:`DataSourceError` for a source that cannot
    be used at all (missing path, a truncated ``.json`` file, also one file of a directory), and gives
    the numbers to say "0 records in DATA" for an empty or wholly rejected source. It costs one parse
    and validation pass over the records (no tokenizer): ~1 s for the 20,000 CounterFact records.
    With ``limit`` it stops where ``load_records`` would, so the numbers are those of the run.
    """
    loaded = load_records(source, limit=limit)
    return SourceSummary(source=loaded.source, n_records=len(loaded.records), n_errors=len(loaded.errors),
                         first_errors=tuple(loaded.errors[:n_first]))
