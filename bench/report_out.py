"""How every benchmark script ends: print its Markdown, and with ``--out FILE`` append it there too."""

from __future__ import annotations


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write("\n" + text)
