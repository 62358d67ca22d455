"""Markdown that a published card can hold whatever the warehouse says: names of models and files without the
extracting machine's folders, values escaped as literal text, code spans and fences that cannot close early,
tables whose cells cannot split. Shared by the card's sections (card.py, card_stats.py, card_making.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def dataset_name(source: str) -> str:
    """How the card names a data source: a file by its name without folders or suffix (the machine's paths
    mean nothing to a reader), a Hugging Face dataset id as it is."""
    text = str(source)
    if "/" in text or "\\" in text or text.lower().endswith((".json", ".jsonl")):
        name = Path(text).name
        for suffix in (".jsonl", ".json"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        return name
    return text


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}|$~#!<>&])")


def _md_escape(text: object) -> str:
    """A value as literal Markdown text on one line: no HTML (``<script>``), no code span or emphasis from
    backticks or stars, no math from ``$...$`` and no table cell split by ``|``, whatever a file or model
    name holds. Every Markdown punctuation character that could start one is backslash-escaped (CommonMark
    shows the character itself); ``<``, ``>`` and ``&`` too, so raw HTML never reaches a renderer."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


class Raw(str):
    """A table cell this module wrote itself (code spans of schema names): put into the Markdown as it is."""


def _code(value: object) -> str:
    """A code span for an identifier (run id, revision, fingerprint) made of safe characters; anything else
    is escaped text."""
    text = str(value)
    return Raw(f"`{text}`" if re.fullmatch(r"[\w.:+-]+", text) else _md_escape(text))


def _fence(text: str, lang: str = "") -> str:
    """``text`` in a code block whose fence is longer than any backtick run inside it (it cannot close early)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def public_name(name: object) -> str:
    """How a card names a model or file: a local path by its last part (a card is published; the folders
    of the machine that extracted are not part of the data), a hub id or plain name as it is."""
    text = str(name)
    if re.match(r"^(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\)", text) or os.path.exists(text):
        windows = re.match(r"^([A-Za-z]:[/\\\\]|\\\\)", text)
        return re.split(r"[/\\\\]" if windows else "/", text.rstrip("/\\" if windows else "/"))[-1] or text
    return text


def _scrub_paths(value):
    """Settings with every local path replaced by its last part (see :func:`public_name`)."""
    if isinstance(value, dict):
        return {k: _scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_paths(v) for v in value]
    if isinstance(value, str):
        return public_name(value)
    return value


def _md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, Raw) else _md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
