"""Printed tables keep every value whole.

Issue 15: `blens sql ... | head` and `blens edit`'s summary showed `r…`, `shif…`."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from blens.commands._tables import fits, print_table

from builders import ROOT, blens_in_process

COLUMNS = ["method", "layer", "efficacy", "nbhd unchanged", "rephr. P(new)>P(true)"]
ROWS = [["shift-minimal", "24", "98.4", "56.0", "40.2"], ["sgd [bold]x[/bold]", "24", "100.0", "26.0", "60.1"]]


def rendered(width: int | None) -> str:
    """What print_table writes: to a terminal of ``width`` columns, or (None) to a pipe."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=width is not None, width=width or 80, color_system=None, emoji=False)
    if width is None:
        import contextlib

        with contextlib.redirect_stdout(buf):
            print_table("title", COLUMNS, ROWS, console=console)
    else:
        print_table("title", COLUMNS, ROWS, console=console)
    return buf.getvalue()


@pytest.mark.parametrize("width", [None, 30, 60, 200])
def test_every_value_whole_and_on_one_line(width):
    text = rendered(width)
    assert "…" not in text
    for row in ROWS:
        for value in row:
            assert any(value in line for line in text.splitlines()), (width, value, text)


def test_layouts():
    assert "┃" in rendered(200), "a wide terminal gets a table"
    narrow = rendered(30)
    assert "-- row 1 of 2" in narrow and "┃" not in narrow, "a narrow one gets one block per row"
    piped = rendered(None).splitlines()
    assert piped[0] == "title"
    assert piped[1].split() == "method layer efficacy nbhd unchanged rephr. P(new)>P(true)".split()
    assert fits(COLUMNS, ROWS, 200) and not fits(COLUMNS, ROWS, 30)


def _blens_sql(warehouse: Path, query: str, tty_columns: int | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    cmd = [sys.executable, "-m", "blens.cli", "sql", query, "--warehouse", str(warehouse)]
    if tty_columns is None:  # piped: in-process; a terminal needs a real process on a pty
        r = blens_in_process(*cmd[3:], env={"COLUMNS": None, "LINES": None}, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return r.stdout
    env.update(COLUMNS=str(tty_columns), TERM="xterm")
    master, slave = pty.openpty()
    try:
        subprocess.run(cmd, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=120, check=True)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("tty_columns", [None, 50, 200])
def test_blens_sql_prints_whole_values(extracted, tty_columns):
    wh = extracted.path  # any warehouse: the query reads none of its tables
    long_value = "shift-" * 30
    out = _blens_sql(wh, f"SELECT 'shift-minimal' AS method, '{long_value}' AS long_value, 42 AS n", tty_columns)
    assert "…" not in out
    assert "shift-minimal" in out and long_value in out, out
