"""Columns added to the schema after a warehouse was made: added to that warehouse, and its old rows filled.

The schema only grows (``blens.store.schema``): a newer blens opening an older warehouse adds the missing
columns with ``ALTER TABLE ... ADD COLUMN`` and fills them for the rows already there, in one transaction
with the views that use them, so a reader never sees the new views over half-filled columns. Rows are
inserted by name (``blens.store.writer``), so a migrated table, whose new columns sit after ``batch_id``,
takes the same batches as a new one. A column whose old rows cannot be derived would stay NULL there; every
column added so far can be derived.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import duckdb

from .lake import LAKE, sql_str
from .schema import TABLES, sql_type

# DuckDB's memory cap while old rows are filled: the UPDATE then spills to a temporary folder (measured on the
# 20,000-prompt warehouse, 9,858,300 projections rows: 9.4 GB peak RSS uncapped, 3.6 GB capped, 80 vs 84 s).
UPGRADE_MEMORY_LIMIT = "2GB"

# How to fill an added column for the rows written before it existed: SET expressions of an
# ``UPDATE <table> ... FROM prompts AS p WHERE p.key = <table>.key`` (the projection's own list columns
# against its prompt's target ids: exactly what the extraction now stores).
BACKFILL: dict[tuple[str, str], str] = {
    ("projections", "target_new_in_top_k"): "list_contains(projections.top_ids, p.target_new_id)",
    ("projections", "target_new_in_bottom_k"): "list_contains(projections.bottom_ids, p.target_new_id)",
    ("projections", "target_true_in_top_k"): "list_contains(projections.top_ids, p.target_true_id)",
    ("projections", "target_true_in_bottom_k"): "list_contains(projections.bottom_ids, p.target_true_id)",
}


def stored_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    """Top-level column names of each live table, read from DuckLake's own catalog tables (see
    ``writer._ensure_schema`` for why not information_schema)."""
    meta = f"__ducklake_metadata_{LAKE}"
    rows = con.execute(
        f"SELECT t.table_name, c.column_name FROM {meta}.ducklake_table AS t "
        f"JOIN {meta}.ducklake_column AS c ON c.table_id = t.table_id "
        "WHERE t.end_snapshot IS NULL AND c.end_snapshot IS NULL AND c.parent_column IS NULL").fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def missing_columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Declared columns that existing tables lack, by table (tables that do not exist are not listed)."""
    have = stored_columns(con)
    return {t: [f.name for f in schema if f.name not in have[t]]
            for t, schema in TABLES.items() if t in have and any(f.name not in have[t] for f in schema)}


def add_columns(con: duckdb.DuckDBPyConnection, missing: dict[str, list[str]]) -> None:
    """Inside the caller's transaction: add each missing column, then fill the old rows where derivable."""
    for table, columns in missing.items():
        n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        print(f"blens: upgrading warehouse table {table}: adding {', '.join(columns)}"
              + (f" and filling them for {n:,} existing rows" if n else ""), file=sys.stderr, flush=True)
        for column in columns:
            con.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {sql_type(TABLES[table].field(column).type)}')
        sets = [f'"{c}" = {BACKFILL[(table, c)]}' for c in columns if (table, c) in BACKFILL]
        if n and sets:
            with _memory_capped(con):
                con.execute(f"UPDATE {table} SET {', '.join(sets)} FROM prompts AS p WHERE p.key = {table}.key")


@contextlib.contextmanager
def _memory_capped(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """:data:`UPGRADE_MEMORY_LIMIT` for one statement, then the limit as before. The spill goes to DuckDB's own
    temporary directory (the connection's setting; DuckDB cannot switch it once used, and removes its files)."""
    before = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    con.execute(f"SET memory_limit = '{UPGRADE_MEMORY_LIMIT}'")
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = {sql_str(before)}")
