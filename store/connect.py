"""Opening the warehouse for reading: DuckDB with the warehouse attached read-only, tables and the
catalog's views queryable by name.

``sandbox=True`` (what ``blens sql`` uses) also locks the session down after attaching: no access to
files or URLs outside the warehouse's own data directory, no extension install or autoload, and the
configuration locked, so nothing a query says can write, load or reach outside.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from .lake import DATA_DIR, WarehouseError, attach, extension_dir, is_remote, is_warehouse, sql_str


def connect(warehouse: str | os.PathLike, *, snapshot: str | None = None,
            sandbox: bool = False) -> duckdb.DuckDBPyConnection:
    """A read-only connection to ``warehouse`` (optionally as of an earlier snapshot: a version number or a
    timestamp). Raises FileNotFoundError when there is no warehouse there."""
    if not is_warehouse(warehouse):
        raise FileNotFoundError(f"no warehouse at {str(warehouse)!r} (run `blens extract` first)")
    try:
        con = attach(warehouse, read_only=True, snapshot=snapshot)
    except WarehouseError as exc:
        raise WarehouseError(str(exc)) from None
    if sandbox:
        lock_down(con, warehouse)
    return con


def lock_down(con: duckdb.DuckDBPyConnection, warehouse: str | os.PathLike) -> None:
    """Files and URLs outside the warehouse's data become unreachable; settings can no longer change."""
    allowed = [] if is_remote(warehouse) else [str(Path(warehouse).absolute() / DATA_DIR) + "/"]
    ext = extension_dir()
    if allowed:
        # A SQL literal, not a bound parameter: binding a Python list makes DuckDB import pandas and numpy to
        # inspect it (0.4 s, a third of `blens sql`'s start-up).
        con.execute(f"SET allowed_directories = [{', '.join(sql_str(d) for d in allowed)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET allow_community_extensions = false")
    if ext:
        con.execute("SET allow_unsigned_extensions = false")
    con.execute("SET lock_configuration = true")


class QueryRefused(ValueError):
    """A statement that is not a query (blens sql runs queries only)."""


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyConnection:
    """Run the statements of ``sql`` and return the connection holding the last one's result.

    Every statement must be a query as DuckDB's own parser classifies it (SELECT, also FROM-first, WITH,
    VALUES, SHOW, DESCRIBE, SUMMARIZE, PRAGMA functions): that alone rules out COPY, EXPLAIN ANALYZE of a
    COPY, ATTACH, INSTALL/LOAD, SET, CALL and every write. The locked-down session (``lock_down``) is the
    second wall: even a query cannot reach files, URLs or extensions outside the warehouse.
    """
    statements = con.extract_statements(sql)
    for stmt in statements:
        kind = str(stmt.type).rsplit(".", 1)[-1]
        if kind != "SELECT":
            raise QueryRefused(f"read-only: only queries are allowed, not {kind} (blens sql never writes, loads or "
                               "attaches; for anything else use plain DuckDB with `blens init-sql`)")
    result = con
    for stmt in statements:
        result = con.execute(stmt.query)
    return result
