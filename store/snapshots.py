"""Which snapshots hold results: what ``blens sql --as-of`` says when the snapshot asked for holds none.

A query at a snapshot before the first commit of results returned 0 rows (or "table prompts does not exist"
at snapshot 0) and nothing else; a version past the newest was DuckLake's bare "No snapshot found". Both
now name the snapshots that do hold results. Read from DuckLake's own catalog views (``ducklake_snapshots``:
which tables each snapshot inserted into), then confirmed with one count at the candidate snapshot.
"""

from __future__ import annotations

import os

import duckdb

LISTING = "`blens sql \"SELECT * FROM ducklake_snapshots('lake')\"` lists every snapshot"


def results_snapshots(con: duckdb.DuckDBPyConnection) -> tuple[int | None, int]:
    """(the first snapshot at which ``prompts`` has rows or None, the newest snapshot); ``con``: a connection
    at the newest snapshot."""
    newest = int(con.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0])
    try:
        (table_id,) = con.execute("SELECT table_id::VARCHAR FROM ducklake_table_info('lake') "
                                  "WHERE table_name = 'prompts'").fetchone()
        candidates = [r[0] for r in con.execute(
            "SELECT snapshot_id FROM ducklake_snapshots('lake') WHERE "
            "list_contains(coalesce(changes['tables_inserted_into'], []), ?) OR "
            "list_contains(coalesce(changes['inlined_insert'], []), ?) ORDER BY snapshot_id",
            [table_id, table_id]).fetchall()]
    except (duckdb.Error, TypeError):  # another DuckLake's change names: ask every snapshot, oldest first
        candidates = list(range(newest + 1))
    for version in candidates:
        try:
            if con.execute(f"SELECT count(*) FROM prompts AT (VERSION => {int(version)})").fetchone()[0]:
                return int(version), newest
        except duckdb.Error:  # the table did not exist yet at that version
            continue
    return None, newest


def holds_results(con: duckdb.DuckDBPyConnection) -> bool:
    """``con``'s snapshot has prompts (False where the table does not exist yet: snapshot 0)."""
    try:
        return con.execute("SELECT EXISTS (SELECT 1 FROM prompts)").fetchone()[0]
    except duckdb.Error:
        return False


def no_results_note(warehouse: str | os.PathLike, asked: str, version: int | None = None) -> str | None:
    """One line for a reader at snapshot ``asked`` (resolved to ``version``; None: no such snapshot) whose tables
    hold no results: which snapshots do. None when the warehouse cannot be read (the query's answer stands)."""
    from .connect import connect

    try:
        con = connect(warehouse)
    except Exception:  # noqa: BLE001 - a hint only: the query's own answer or error stands
        return None
    try:
        first, newest = results_snapshots(con)
    except duckdb.Error:
        return None
    finally:
        con.close()
    asked = str(asked).strip()
    if asked.isdigit() and (version is None or str(version) == asked):
        name = f"snapshot {asked}"
    else:
        name = f"--as-of {asked!r}" + (f" (snapshot {version})" if version is not None else "")
    if version is None:
        return (f"there is no {name}: the newest is {newest}"
                + (f", the first with results {first}" if first is not None else ", and none holds results yet")
                + f"; {LISTING}")
    if first is None:
        return f"{name} holds no results, and no snapshot does yet (run `blens extract`); {LISTING}"
    if version < first:
        return (f"{name} is before the first results (snapshot {first}; the newest is {newest}), so the tables are "
                f"empty (or absent) there; {LISTING}")
    return f"{name} holds no prompts; the first results are at snapshot {first}, the newest is {newest}; {LISTING}"
