"""The public analysis API: DuckDB view definitions over the warehouse's tables, in ``queries/*.sql``.

``blens.store.writer`` stores them in the warehouse's DuckLake catalog (again whenever these files change), so
they work from any DuckDB session that attached the warehouse, with no project code: ``blens init-sql`` prints
the ``LOAD ducklake`` / ``ATTACH`` lines for plain DuckDB (README, "The warehouse and its views").
"""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent


def view_sql() -> str:
    """All view definitions, the files in name order (10_figures.sql, then 20_editing.sql, ...)."""
    return "\n".join(p.read_text() for p in sorted(SQL_DIR.glob("*.sql")))
