"""Tokens as a reader should see them, in figures and HTML: invisible characters made visible."""

from __future__ import annotations

MAX_TOKEN_CHARS = 10


def _font_charmap() -> set[int]:
    global _CHARMAP
    if _CHARMAP is None:
        from matplotlib import rcParams
        from matplotlib.font_manager import FontProperties, findfont, get_font

        try:
            path = findfont(FontProperties(family=rcParams["font.family"]), fallback_to_default=True)
            _CHARMAP = set(get_font(path).get_charmap())
        except Exception:  # no usable font info: keep ASCII only
            _CHARMAP = set(range(32, 127))
    return _CHARMAP


_CHARMAP: set[int] | None = None

_CONTROL = {"\n": "↵", "\r": "↵", "\t": "⇥"}


def display_token(token: str | None, *, max_chars: int = MAX_TOKEN_CHARS, font_safe: bool = True) -> str:
    """A token as a reader should see it: a leading space as '␣', newlines/tabs as arrows, other control
    characters as '·', glyphs the plot font lacks as '□', and long tokens cut with '..'."""
    if token is None:
        return ""
    text = token
    lead = len(text) - len(text.lstrip(" "))
    text = "␣" * min(lead, 2) + text[lead:]
    out = []
    for ch in text:
        if ch in _CONTROL:
            out.append(_CONTROL[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 or ch in "\u200b\u200c\u200d\ufeff":
            out.append("·")
        elif font_safe and ord(ch) not in _font_charmap():
            out.append("□")
        else:
            out.append(ch)
    text = "".join(out)
    if text == "":
        return "∅"
    if len(text) > max_chars:
        text = text[: max_chars - 2] + ".."
    return text


def _plain(token: str | None, max_chars: int = 40) -> str:
    """Token text for HTML (any glyph the browser has; still visible spaces and cut)."""
    return display_token(token, max_chars=max_chars, font_safe=False)
