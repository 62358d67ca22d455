"""Opening the warehouse for reading: DuckDB with the warehouse attached read-only, tables and the
catalog's views queryable by name.

``sandbox=True`` (what ``blens sql`` uses) also locks the session down after attaching
(``blens.store.sandbox``): only the files the catalog lists are reachable, no extension loads, limits on
time and memory, and the configuration locked, so nothing a query says can write, load or reach outside.
"""

from __future__ import annotations

import os
import re

import duckdb

from .lake import WarehouseError, attach, is_warehouse
from .sandbox import DEFAULT_MEMORY_LIMIT, QueryLimit, QueryRefused, lock_down, run_query  # noqa: F401 (API)

INT64_MAX = 2**63 - 1
_ASCII_DIGITS = re.compile(r"^[0-9]+$")


def parse_snapshot(text: str | int | None) -> str | None:
    """A snapshot as ``attach`` takes it: a version number (ASCII digits, within int64) or a timestamp DuckDB
    parses; anything else is a one-line WarehouseError naming the value (never a traceback)."""
    if text is None:
        return None
    s = str(text).strip()
    if _ASCII_DIGITS.match(s):
        if int(s) > INT64_MAX:
            raise WarehouseError(f"--as-of {s[:40]!r}: no snapshot has a version that large")
        return str(int(s))
    if not s or len(s) > 64 or any(not c.isprintable() for c in s):
        raise WarehouseError(f"--as-of {s[:40]!r} is neither a snapshot version nor a timestamp "
                             "(e.g. 3 or '2026-11-26 12:00:00+00')")
    con = duckdb.connect(":memory:")
    try:
        ok = con.execute("SELECT TRY_CAST(? AS TIMESTAMPTZ) IS NOT NULL", [s]).fetchone()[0]
    finally:
        con.close()
    if not ok:
        raise WarehouseError(f"--as-of {s[:40]!r} is neither a snapshot version nor a timestamp "
                             "(e.g. 3 or '2026-11-26 12:00:00+00')")
    return s


def connect(warehouse: str | os.PathLike, *, snapshot: str | None = None, sandbox: bool = False,
            memory_limit: str = DEFAULT_MEMORY_LIMIT, temp_dir: str | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to ``warehouse`` (optionally as of an earlier snapshot: a version number or a
    timestamp). Raises FileNotFoundError when there is no warehouse there."""
    if not is_warehouse(warehouse):
        raise FileNotFoundError(f"no warehouse at {str(warehouse)!r} (run `blens extract` first)")
    snapshot = parse_snapshot(snapshot)
    try:
        con = attach(warehouse, read_only=True, snapshot=snapshot)
    except WarehouseError as exc:
        raise WarehouseError(str(exc)) from None
    if sandbox:
        try:
            lock_down(con, warehouse, memory_limit=memory_limit, temp_dir=temp_dir)
        except duckdb.Error as exc:
            con.close()
            raise WarehouseError(f"cannot open the warehouse {str(warehouse)!r} for queries: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
    return con


def current_snapshot(con: duckdb.DuckDBPyConnection) -> int:
    """The snapshot version ``con`` reads (the newest one, unless it was attached at an older one)."""
    return int(con.execute("SELECT id FROM ducklake_current_snapshot('lake')").fetchone()[0])


def connect_pinned(warehouse: str | os.PathLike) -> tuple[duckdb.DuckDBPyConnection, int]:
    """A read-only connection that reads every table at one snapshot (the newest when called), and its
    version. Products (``blens publish``, ``blens report``) read through this: without it each query reads
    the snapshot current when it starts, so a publish beside a running extract mixed two snapshots (one
    table held a key the others lacked)."""
    con = connect(warehouse)
    try:
        version = current_snapshot(con)
    finally:
        con.close()
    return connect(warehouse, snapshot=str(version)), version
