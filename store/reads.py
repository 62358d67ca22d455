"""The few questions the jobs ask the warehouse (which results exist, how a sweep went), answered here so
the model side never issues SQL."""

from __future__ import annotations

import os

import pyarrow as pa

from .writer import writer_connection

VECTOR_LEVELS = {"none": 0, "spanning": 1, "all": 2}


def existing_results(warehouse: str | os.PathLike, keys: list[str], table: str = "prompts") -> dict[str, str]:
    """key -> the ``vectors`` setting it was stored with (prompts), for the given keys that exist."""
    con = writer_connection(warehouse)
    con.register("_ask", pa.table({"key": pa.array(list(keys), pa.string())}))
    try:
        col = "vectors" if table == "prompts" else "'none'"
        return dict(con.execute(f"SELECT DISTINCT key, {col} FROM {table} WHERE key IN (SELECT key FROM _ask)").fetchall())
    finally:
        con.unregister("_ask")


def edit_summary_rows(warehouse: str | os.PathLike, run_id: str) -> list[tuple]:
    """(method, layer, lr, n, efficacy, generalization, locality, locality_unchanged) per edited config."""
    con = writer_connection(warehouse)
    return con.execute("""
        SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged
        FROM edit_summary WHERE run_id = ? AND method <> 'none'""", [run_id]).fetchall()


def runs_holding(warehouse: str | os.PathLike, keys: list[str]) -> list[tuple[str, str, int]]:
    """(run_id, config_json, how many of ``keys``) for each run that stored some of these results."""
    con = writer_connection(warehouse)
    con.register("_ask", pa.table({"key": pa.array(list(keys), pa.string())}))
    try:
        return con.execute("""
            SELECT p.run_id, any_value(r.config_json), count(*) FROM prompts p LEFT JOIN runs r USING (run_id)
            WHERE p.key IN (SELECT key FROM _ask) GROUP BY p.run_id ORDER BY p.run_id""").fetchall()
    finally:
        con.unregister("_ask")
