"""The public analysis API: DuckDB view definitions over the warehouse, in ``queries/*.sql``.

``blens.store.connect`` points them at a warehouse. From the plain duckdb CLI (no Python needed)::

    (echo "SET VARIABLE warehouse = 'warehouse';"; cat queries/*.sql; \\
     echo "SELECT * FROM rank_equals_length ORDER BY layer;") | duckdb
"""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent


def view_sql() -> str:
    """All view definitions, in file order (00_base.sql first)."""
    return "\n".join(p.read_text() for p in sorted(SQL_DIR.glob("*.sql")))
