"""The public analysis API: DuckDB views over the Parquet warehouse, defined in ``queries/*.sql``.

From Python: ``queries.connect("warehouse").sql("SELECT * FROM rank_equals_length")``.
From the plain duckdb CLI (no Python needed)::

    (echo "SET VARIABLE warehouse = 'warehouse';"; cat queries/*.sql; \\
     echo "SELECT * FROM rank_equals_length ORDER BY layer;") | duckdb
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parent


def view_sql() -> str:
    """All view definitions, in file order (00_base.sql first)."""
    return "\n".join(p.read_text() for p in sorted(SQL_DIR.glob("*.sql")))


def connect(warehouse: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every view defined over ``warehouse``.

    Nothing is persisted: the views read the committed Parquet files at query time, so a connection
    always sees the warehouse as it is now.
    """
    root = Path(warehouse)
    if not (root / "_commits").is_dir():
        raise FileNotFoundError(f"no warehouse at {str(root)!r} (run `blens extract` first)")
    con = duckdb.connect(":memory:")
    con.execute("SET VARIABLE warehouse = ?", [root.as_posix()])
    con.execute(view_sql())
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND view_name NOT LIKE '\\_%' ESCAPE '\\' ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]
