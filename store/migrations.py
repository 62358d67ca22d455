"""A warehouse's schema, made and kept current: tables and views created on first open (:func:`ensure_schema`),
and columns added to the schema after a warehouse was made added to it, with its old rows filled.

The schema only grows (``blens.store.schema``): a newer blens opening an older warehouse adds the missing
columns with ``ALTER TABLE ... ADD COLUMN`` and fills them for the rows already there, in one transaction
with the views that use them, so a reader never sees the new views over half-filled columns. Rows are
inserted by name (``blens.store.writer``), so a migrated table, whose new columns sit after ``batch_id``,
takes the same batches as a new one. A column whose old rows cannot be derived would stay NULL there; every
column added so far can be derived.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from typing import Iterator

import duckdb
import pyarrow as pa

from blens.queries import view_sql

from .lake import LAKE, rollback, sql_str
from .schema import SCHEMA_VERSION, TABLES, ddl, sql_type

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

# Schema 4's token roles for rows of older results, derived from what they stored: the subject's tokens
# (segment 'subject', which never included the final position), the final position, and a BOS as a special
# token's text at position 0 (e.g. '<bos>'). New extractions compute roles from the tokenizer instead
# (``blens.extract.prepare.roles_for``); the two agree except for a subject that ends at the final token.
_TOKEN_ROLES = """
UPDATE tokens SET role = CASE
    WHEN tokens.position = s.n THEN 'last'
    WHEN tokens.position = 0 AND tokens.segment = 'other' AND regexp_matches(tokens.token, '^<[^<> ]+>$') THEN 'bos'
    WHEN s.f IS NULL THEN NULL
    WHEN tokens.position < s.f THEN 'before_subject'
    WHEN tokens.position = s.l THEN 'last_subject'
    WHEN tokens.position = s.f THEN 'first_subject'
    WHEN tokens.position < s.l THEN 'middle_subject'
    WHEN tokens.position = s.l + 1 THEN 'first_subsequent'
    ELSE 'further' END
FROM (SELECT key, min(position) FILTER (WHERE segment = 'subject') AS f,
             max(position) FILTER (WHERE segment = 'subject') AS l, max(position) AS n
      FROM tokens GROUP BY key) AS s
WHERE s.key = tokens.key"""
_PROJECTION_ROLES = ("UPDATE projections SET role = t.role FROM tokens AS t "
                     "WHERE t.key = projections.key AND t.position = projections.position")


def legacy_settings(top_k: int, family: str | None) -> tuple[str, str]:
    """The id and JSON of the result settings that keyed a result before schema 4, written out as
    ``blens.extract.identity`` built them then (tests/test_settings.py pins the id to identity.settings_id)."""
    sites = ["ff1_input", "ff2_vjp"] + (["resid_post_vjp"] if family == "gemma3" else [])
    settings = {"top_k": top_k, "loss": "nll_first_target_token_last_position", "lens": "final_norm+unembedding",
                "sites": sites}
    text = json.dumps(settings, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12], text


def _legacy_settings(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """(run_id, settings, settings_json) for every run: the result settings its rows were keyed with before
    schema 4 (top_k from the run's config, the family's lens sites then: ff1_input, ff2_vjp, and resid_post_vjp
    behind a post-MLP norm). The same dict gave those rows their keys, so the id names exactly their settings."""
    rows = con.execute("SELECT r.run_id, r.config_json, m.family FROM runs AS r "
                       "LEFT JOIN (SELECT model, model_revision, any_value(family) AS family FROM models GROUP BY ALL) "
                       "AS m ON m.model = r.model AND m.model_revision = r.model_revision").fetchall()
    out = {"run_id": [], "settings": [], "settings_json": []}
    for run_id, config_json, family in rows:
        try:
            top_k = int(json.loads(config_json).get("top_k", 10))
        except (ValueError, TypeError, AttributeError):
            top_k = 10
        sid, text = legacy_settings(top_k, family)
        out["run_id"].append(run_id)
        out["settings"].append(sid)
        out["settings_json"].append(text)
    return pa.table(out, schema=pa.schema([("run_id", pa.string()), ("settings", pa.string()),
                                           ("settings_json", pa.string())]))


def stored_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    """Top-level column names of each live table, read from DuckLake's own catalog tables (see
    ``ensure_schema`` for why not information_schema)."""
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
    """Inside the caller's transaction: add each missing column, then fill the old rows where derivable.

    Tables are upgraded in ``TABLES`` order (tokens before projections: a projection's role is its token's)."""
    legacy = None
    for table, columns in missing.items():
        n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        print(f"blens: upgrading warehouse table {table}: adding {', '.join(columns)}"
              + (f" and filling them for {n:,} existing rows" if n else ""), file=sys.stderr, flush=True)
        for column in columns:
            con.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {sql_type(TABLES[table].field(column).type)}')
        if not n:
            continue
        sets = [f'"{c}" = {BACKFILL[(table, c)]}' for c in columns if (table, c) in BACKFILL]
        with _memory_capped(con):
            if sets:
                con.execute(f"UPDATE {table} SET {', '.join(sets)} FROM prompts AS p WHERE p.key = {table}.key")
            if "settings" in columns:
                if legacy is None:
                    legacy = _legacy_settings(con)
                    con.register("_legacy_settings", legacy)
                    con.execute("INSERT INTO settings SELECT DISTINCT settings, settings_json, 'schema-4-upgrade' "
                                "FROM _legacy_settings AS l WHERE NOT EXISTS "
                                "(SELECT 1 FROM settings AS s WHERE s.settings = l.settings)")
                con.execute(f"UPDATE {table} SET settings = l.settings FROM _legacy_settings AS l "
                            f"WHERE l.run_id = {table}.run_id")
            if table == "tokens" and "role" in columns:
                con.execute(_TOKEN_ROLES)
            if table == "projections" and "role" in columns:
                con.execute(_PROJECTION_ROLES)
    if legacy is not None:
        con.unregister("_legacy_settings")


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


VECTOR_ROW_GROUP_ROWS = 4096  # rows per Parquet row group of the vectors table (see ensure_schema)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Tables and catalog views, created once; views are re-created when their SQL changed; tables made by an
    older blens gain the columns they lack (:func:`add_columns`). One transaction; an ordinary open writes nothing."""
    # Names straight from the catalog's own tables: information_schema / duckdb_tables() also compute each
    # table's storage stats, which, while other processes commit, tripped an internal DuckLake assertion
    # (LoadStatsForSnapshot) in a concurrent-shards test.
    have = {r[0] for r in con.execute(
        f"SELECT table_name FROM __ducklake_metadata_{LAKE}.ducklake_table WHERE end_snapshot IS NULL "
        f"UNION ALL SELECT view_name FROM __ducklake_metadata_{LAKE}.ducklake_view WHERE end_snapshot IS NULL"
    ).fetchall()}
    sql = view_sql()
    meta = dict(con.execute("SELECT name, value FROM blens_meta").fetchall()) if "blens_meta" in have else {}
    missing = [t for t in TABLES if t not in have]
    current = meta.get("views") == sql and meta.get("schema_version") == str(SCHEMA_VERSION)
    if not missing and current and "commit_lock" in have:
        return  # an ordinary open writes no snapshot
    con.execute("BEGIN")
    try:
        for t in missing:
            con.execute(f"CREATE TABLE {t} ({ddl(t)})")
        add_columns(con, missing_columns(con))  # a warehouse made by an older blens (schema only grows)
        if "commit_lock" not in have:
            con.execute("CREATE TABLE commit_lock (id INTEGER, batch_id VARCHAR)")
        if "blens_meta" not in have:
            con.execute("CREATE TABLE blens_meta (name VARCHAR, value VARCHAR)")
        con.execute(sql)
        con.execute("DELETE FROM blens_meta")
        con.execute("INSERT INTO blens_meta VALUES ('views', ?), ('schema_version', ?)", [sql, str(SCHEMA_VERSION)])
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise
    if "commit_lock" not in have:
        # Kept inline in the catalog (no Parquet file, no schema change per commit): replacing its one row
        # is what makes two overlapping commits conflict. Not COMMENT ON (bumps the schema version, and
        # compaction never merges files across schema versions) and not UPDATE (writes a file each time).
        con.execute(f"CALL {LAKE}.set_option('data_inlining_row_limit', 10, table_name => 'commit_lock')")
        con.execute("INSERT INTO commit_lock SELECT 0, 'init' WHERE NOT EXISTS (SELECT 1 FROM commit_lock)")
    if "vectors" in missing:
        # A vectors row is d floats wide (2.3 KB for SmolLM2), so DuckDB's default row group (122,880 rows) would be
        # ~280 MB once `blens compact` merges batch files, and every reader holds a row group per thread while it
        # scans. 4,096 rows is ~10 MB. Set once, on a new warehouse; an older one keeps its files as they are.
        con.execute(f"CALL {LAKE}.set_option('parquet_row_group_size', {VECTOR_ROW_GROUP_ROWS}, "
                    "table_name => 'vectors')")
