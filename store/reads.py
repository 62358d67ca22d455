"""The few questions the jobs ask the warehouse (what is done, how a sweep went), answered through the
views, so the model side never issues SQL."""

from __future__ import annotations

import os

from .connect import connect


def _rows(warehouse: str | os.PathLike, sql: str, params: list) -> list[tuple]:
    con = connect(warehouse)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def done_case_ids(warehouse: str | os.PathLike, run_id: str) -> set[int]:
    """case_ids already committed under this run (resume)."""
    return {r[0] for r in _rows(warehouse, "SELECT case_id FROM prompts WHERE run_id = ?", [run_id])}


def done_records(warehouse: str | os.PathLike, run_id: str) -> dict[int, tuple[str, str, str, str]]:
    """case_id -> (prompt, subject, target_new, target_true) of what is committed under this run."""
    rows = _rows(warehouse, "SELECT case_id, prompt, subject, target_new, target_true FROM prompts WHERE run_id = ?",
                 [run_id])
    return {r[0]: tuple(r[1:]) for r in rows}


def edit_summary_rows(warehouse: str | os.PathLike, run_id: str) -> list[tuple]:
    """(method, layer, lr, n, efficacy, generalization, locality, locality_unchanged) per edited config."""
    return _rows(warehouse, """
        SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged
        FROM edit_summary WHERE run_id = ? AND method <> 'none'""", [run_id])
