"""Opening the warehouse for reading: an in-memory DuckDB connection with every public view defined.

The view definitions live in ``queries/*.sql`` (the public API); this module only points them at a
warehouse. Nothing is persisted: the views read the committed Parquet files at query time, so a
connection always sees the warehouse as it is now.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from blens.queries import view_sql


def connect(warehouse: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every view defined over ``warehouse``."""
    root = Path(warehouse)
    if not (root / "_commits").is_dir():
        raise FileNotFoundError(f"no warehouse at {str(root)!r} (run `blens extract` first)")
    con = duckdb.connect(":memory:")
    con.execute("SET VARIABLE warehouse = ?", [root.as_posix()])
    con.execute(view_sql())
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The public views (names starting with ``_`` are internal)."""
    rows = con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND view_name NOT LIKE '\\_%' ESCAPE '\\' ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]
