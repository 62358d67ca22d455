"""`blens check`: is every file the catalog lists readable, and is every stored prompt complete? And repair.

Damage this finds: a data file truncated, overwritten with junk or deleted by hand (DuckDB would fail every
query touching it), and results that break the cross-table invariant (``incomplete_sql``): a prompt without
all its tokens, ranks or projections, or rows of any result table whose key has no (or two) ``prompts`` rows,
as a quarantined ``prompts`` file leaves behind (left there, the rerun added them again: doubled counts and
no error). Repair quarantines each bad file (moved to ``<warehouse>/quarantine/`` and ended in the catalog,
so the current snapshot no longer lists it) and deletes the results that lost rows, in one transaction; the
next `blens extract` of the same data recomputes exactly those (it skips only keys that are stored).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .files import META, catalog_files
from .lake import LAKE, RetryPolicy, attach, is_remote, is_warehouse, rollback
from .schema import RESULT_TABLES
from .lake import local_queue


@dataclass
class CheckResult:
    bad_files: list[tuple[str, str, str]] = field(default_factory=list)  # (table, path, why)
    incomplete: list[str] = field(default_factory=list)  # keys whose result rows are incomplete
    quarantined: list[str] = field(default_factory=list)
    removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.incomplete


def _unreadable(path: str) -> str | None:
    if not os.path.exists(path):
        return "missing (deleted by hand?)"
    try:
        pq.read_table(path)  # every page decoded: a truncated or junk file fails here
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"unreadable: {' '.join(str(exc).split())[:200]}"
    return None


# When a stored prompt should have rows in a result table (SQL over the prompts row ``p``). A table not named
# here (every table in ``RESULT_TABLES`` but prompts: new ones too) must have rows for every stored prompt.
# vjp_similarity: results of format 4 on (they also hold the model's answer); older results have none.
EXPECTED_WHEN = {"vectors": "p.vectors <> 'none'", "vjp_similarity": "p.model_answer_id IS NOT NULL"}


def incomplete_sql(tables: list[str]) -> str:
    """The keys that break the cross-table invariant of the result tables ``tables`` (``prompts`` first):

    * every key with rows in any result table has exactly one ``prompts`` row (no orphans, no duplicates);
    * every ``prompts`` key has rows in every other result table where they are expected (EXPECTED_WHEN);
    * the row counts have the prompt's shape: tokens = n_tokens, ranks = layers x matrices, projections =
      tokens x layers x sites (matrices and sites per model and settings as its complete keys show: results of
      another settings id or result format may have other sites and matrices).

    Generic over the tables, so a result table added to the schema is covered without a change here."""
    others = [t for t in tables if t != "prompts"]
    counts = "".join(f", c_{t} AS (SELECT key, count(*) AS n FROM {t} GROUP BY key)" for t in others)
    cols = "".join(f", coalesce(c_{t}.n, 0) AS n_{t}" for t in others)
    joins = "".join(f" LEFT JOIN c_{t} USING (key)" for t in others)
    broken = ["p.n_p <> 1"]
    broken += [f"({EXPECTED_WHEN.get(t, 'true')} AND p.n_{t} = 0)" for t in others]
    if "tokens" in others:
        broken.append("p.n_tokens_rows <> p.n_tokens")
    shape_cols, shape_checks = [], []
    if "gradient_ranks" in others:
        shape_cols.append("max(n_gradient_ranks / n_layers) AS per_layer")
        shape_checks.append("g.n_gradient_ranks <> g.n_layers * s.per_layer")
    if "projections" in others:
        shape_cols.append("max(n_projections / (n_tokens * n_layers)) AS sites")
        shape_checks.append("g.n_projections <> g.n_tokens * g.n_layers * s.sites")
    tok = ", coalesce(c_tokens.n, 0) AS n_tokens_rows" if "tokens" in others else ""
    sql = f"""
WITH p0 AS (SELECT key, any_value(model) AS model, any_value(model_revision) AS model_revision,
                   any_value(n_tokens) AS n_tokens, any_value(vectors) AS vectors, any_value(settings) AS settings,
                   any_value(model_answer_id) AS model_answer_id, count(*) AS n_p
            FROM prompts GROUP BY key){counts},
p AS (SELECT p0.*{cols}{tok} FROM p0{joins}),
got AS (SELECT p.*, m.n_layers FROM p LEFT JOIN (SELECT DISTINCT model, model_revision, n_layers FROM models) m
        USING (model, model_revision))
SELECT key FROM got p WHERE {' OR '.join(broken)}"""
    if shape_checks:
        sql += f"""
UNION SELECT g.key FROM got g JOIN (SELECT model, settings, {', '.join(shape_cols)} FROM got WHERE n_layers > 0
                                    GROUP BY model, settings) s USING (model, settings)
WHERE {' OR '.join(shape_checks)}"""
    for t in others:  # orphans: rows whose key has no prompts row (a quarantined prompts file leaves these)
        sql += f"\nUNION SELECT key FROM c_{t} WHERE key NOT IN (SELECT key FROM prompts)"
    return sql


def _result_tables(con) -> list[str]:
    have = {r[0] for r in con.execute(
        f"SELECT table_name FROM duckdb_tables() WHERE database_name = '{LAKE}'").fetchall()}
    return [t for t in RESULT_TABLES if t in have]


def incomplete_keys(con) -> list[str]:
    tables = _result_tables(con)
    if "prompts" not in tables:
        return []
    return sorted(r[0] for r in con.execute(incomplete_sql(tables)).fetchall())


def check(location: str | os.PathLike, *, repair: bool = False) -> CheckResult:
    if not is_warehouse(location):
        raise FileNotFoundError(f"no warehouse at {str(location)!r}")
    con = attach(location, read_only=not repair)
    res = CheckResult()
    try:
        files = catalog_files(con, location)
        for table, path, fid in files:
            why = _unreadable(path)
            if why:
                res.bad_files.append((table, path, why))
        if repair and res.bad_files:
            with local_queue(location):
                _quarantine(con, location, files, res)
        if res.bad_files and not repair:
            return res  # the completeness query would fail on the bad files: repair first
        res.incomplete = incomplete_keys(con)
        if repair and res.incomplete:
            with local_queue(location):
                res.removed = _remove(con, res.incomplete)
            res.incomplete = incomplete_keys(con)
    finally:
        con.close()
    return res


def _quarantine(con, location, files, res: CheckResult) -> None:
    """End each bad file in the catalog at the current snapshot, then move it aside (never delete data)."""
    bad = {path for _, path, _ in res.bad_files}
    ids = [fid for _, path, fid in files if path in bad]
    con.execute("BEGIN")
    try:
        current = con.execute(f"SELECT max(snapshot_id) FROM {META}.ducklake_snapshot").fetchone()[0]
        con.execute(f"UPDATE {META}.ducklake_data_file SET end_snapshot = ? WHERE data_file_id IN "
                    "(SELECT unnest(?::BIGINT[]))", [current, ids])
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise
    if is_remote(location):
        return
    qdir = Path(location) / "quarantine"
    qdir.mkdir(exist_ok=True)
    for path in sorted(bad):
        if os.path.exists(path):
            shutil.move(path, qdir / Path(path).name)
        res.quarantined.append(path)


def _remove(con, keys: list[str]) -> int:
    """Delete incomplete results from every result table (one transaction), so a rerun recomputes them."""
    import pyarrow as pa

    def once() -> int:
        con.execute("BEGIN")
        try:
            con.register("_bad", pa.table({"key": pa.array(keys, pa.string())}))
            for t in _result_tables(con):
                con.execute(f"DELETE FROM {t} WHERE key IN (SELECT key FROM _bad)")
            con.execute("COMMIT")
            return len(keys)
        except BaseException:
            rollback(con)
            raise
        finally:
            con.unregister("_bad")

    return RetryPolicy().run(once)
