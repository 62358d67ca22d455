"""Tables the commands print, with every value whole (issue 15: `blens sql ... | head` and `blens edit`'s
summary showed ``r…``, ``shif…``).

* stdout is not a terminal (a pipe, a file, CI logs): plain aligned text, nothing cut, no width limit.
* a terminal wide enough for every value on one line: a rich table; only headers wrap.
* a narrower terminal: one block per row, ``column  value`` on each line, so a value is never folded
  into pieces nor cut; a long value simply continues on the next screen line.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

# What a rich table (show_edge=False, padding 1) adds to its columns' content: 2 per column, 1 per rule.
_CELL_PADDING, _RULE = 2, 1
HEADER_FLOOR = 6


def _width(value: str) -> int:
    return max((len(line) for line in value.splitlines()), default=0)


def _total(widths: list[int]) -> int:
    return sum(widths) + _CELL_PADDING * len(widths) + _RULE * max(len(widths) - 1, 0)


def column_widths(columns: list[str], rows: list[list[str]], width: int) -> list[int] | None:
    """Column widths for a terminal ``width`` wide that keep every value on one line, or None if there are none.

    Each header keeps at least :data:`HEADER_FLOOR` characters per line (else "method" reads "metho/d"); the
    room left goes to headers, left to right: first so that no word breaks, then so that each is one line."""
    values = [max([0] + [_width(r[i]) for r in rows]) for i in range(len(columns))]
    longest_word = [max((len(w) for w in c.split()), default=0) for c in columns]
    widths = [max(v, min(HEADER_FLOOR, n), 1) for v, n in zip(values, longest_word)]
    if _total(widths) > width:
        return None
    for target in (longest_word, [len(c) for c in columns]):
        for i, want in enumerate(target):
            widths[i] += max(0, min(want - widths[i], width - _total(widths)))
    return widths


def fits(columns: list[str], rows: list[list[str]], width: int) -> bool:
    return column_widths(columns, rows, width) is not None


def plain_table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def records_layout(title: str, columns: list[str], rows: list[list[str]]) -> str:
    """One block per row: each column's name, then its whole value."""
    name_width = max((len(c) for c in columns), default=0)
    blocks = [title]
    for i, row in enumerate(rows, 1):
        blocks.append(f"-- row {i} of {len(rows)}")
        blocks += [f"{c.rjust(name_width)}  {v}" for c, v in zip(columns, row)]
    return "\n".join(blocks)


def print_table(title: str, columns: list[str], rows: list[list[str]], *, console: Console | None = None) -> None:
    """Print a table that never cuts a value (see the module docstring for the three layouts)."""
    out = console or Console(emoji=False)
    if not out.is_terminal:
        print(plain_table(title, columns, rows))
        return
    widths = column_widths(columns, rows, out.width)
    if widths is None:
        out.print(Text(records_layout(title, columns, rows)), soft_wrap=True)
        return
    from rich.table import Table

    table = Table(title=Text(title), show_edge=False)
    for col, width in zip(columns, widths):  # fixed widths: rich never squeezes a value below its own width
        table.add_column(Text(col), justify="right", overflow="fold", width=width)
    for row in rows:
        table.add_row(*(Text(v) for v in row))  # Text: a value like "[bold]" is data, not rich markup
    out.print(table)
