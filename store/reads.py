"""The few questions the jobs ask the warehouse (which results exist, how a sweep went), answered here so
the model side never issues SQL."""

from __future__ import annotations

import os

from .lake import sql_str
from .writer import writer_connection

VECTOR_LEVELS = {"none": 0, "spanning": 1, "all": 2}


def _keys_sql(keys: list[str]) -> str:
    """``keys`` as a SQL subquery. A literal, not a registered Arrow table or bound parameters: those make
    pyarrow and DuckDB import pandas (0.4-0.8 s), and the CLI asks these questions on its fast path
    (``blens.run.resume``). 20,000 keys: ~0.3 s as a literal, 0.05 s registered (plus that import)."""
    return f"SELECT unnest([{', '.join(sql_str(k) for k in keys)}]::VARCHAR[])"


def existing_results(warehouse: str | os.PathLike, keys: list[str], table: str = "prompts") -> dict[str, str]:
    """key -> the ``vectors`` setting it was stored with (prompts), for the given keys that exist."""
    if not keys:
        return {}
    con = writer_connection(warehouse)
    col = "vectors" if table == "prompts" else "'none'"
    return dict(con.execute(f"SELECT DISTINCT key, {col} FROM {table} WHERE key IN ({_keys_sql(keys)})").fetchall())


def results_held(warehouse: str | os.PathLike, keys: list[str]) -> dict[str, tuple[str, str, str | None]]:
    """key -> (the ``vectors`` it was stored with, the run that stored it, that run's config JSON), for the given
    keys that exist: what a plan needs to skip done work and to say which other runs did it."""
    if not keys:
        return {}
    con = writer_connection(warehouse)
    return {k: (v, r, c) for k, v, r, c in con.execute(f"""
        SELECT p.key, any_value(p.vectors), any_value(p.run_id), any_value(r.config_json)
        FROM prompts p LEFT JOIN runs r USING (run_id)
        WHERE p.key IN ({_keys_sql(keys)}) GROUP BY p.key""").fetchall()}


def run_registered(warehouse: str | os.PathLike, run_id: str) -> bool:
    """The run's row is in ``runs`` (registered with its model row and rejected records, one transaction)."""
    con = writer_connection(warehouse)
    return con.execute(f"SELECT 1 FROM runs WHERE run_id = {sql_str(run_id)} LIMIT 1").fetchone() is not None


def edit_summary_rows(warehouse: str | os.PathLike, run_id: str) -> list[tuple]:
    """(method, layer, lr, n, efficacy, generalization, locality, locality_unchanged) per edited config."""
    con = writer_connection(warehouse)
    return con.execute("""
        SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged
        FROM edit_summary WHERE run_id = ? AND method <> 'none'""", [run_id]).fetchall()


def runs_holding(warehouse: str | os.PathLike, keys: list[str]) -> list[tuple[str, str, int]]:
    """(run_id, config_json, how many of ``keys``) for each run that stored some of these results."""
    if not keys:
        return []
    con = writer_connection(warehouse)
    return con.execute(f"""
        SELECT p.run_id, any_value(r.config_json), count(*) FROM prompts p LEFT JOIN runs r USING (run_id)
        WHERE p.key IN ({_keys_sql(keys)}) GROUP BY p.run_id ORDER BY p.run_id""").fetchall()


def mixed_settings(con) -> list[tuple[str, list[str]]]:
    """(model, its settings ids) for each model whose results were computed under more than one result setting
    (``con``: any connection with the warehouse attached). The views keep them apart (they group by settings);
    ``blens sql`` says so, because a query over the tables that forgets ``settings`` would mix them."""
    try:
        rows = con.execute("SELECT model, list(DISTINCT settings ORDER BY settings) FROM prompts "
                           "GROUP BY model HAVING count(DISTINCT settings) > 1 ORDER BY model").fetchall()
    except Exception:  # noqa: BLE001 - an older warehouse read without upgrading (no settings column): nothing to say
        return []
    return [(m, list(s)) for m, s in rows]
