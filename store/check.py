"""`blens check`: is every file the catalog lists readable, and is every stored prompt complete? And repair.

Damage this finds: a data file truncated, overwritten with junk or deleted by hand (DuckDB would fail every
query touching it), and results whose rows are incomplete (a prompt without all its tokens, ranks or
projections). Repair quarantines each bad file (moved to ``<warehouse>/quarantine/`` and ended in the catalog,
so the current snapshot no longer lists it) and deletes the results that lost rows, in one transaction; the
next `blens extract` of the same data recomputes exactly those (it skips only keys that are stored).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .lake import DATA_DIR, LAKE, RetryPolicy, attach, is_remote, is_warehouse, rollback
from .schema import RESULT_TABLES
from .writer import _local_queue

META = f"__ducklake_metadata_{LAKE}"


@dataclass
class CheckResult:
    bad_files: list[tuple[str, str, str]] = field(default_factory=list)  # (table, path, why)
    incomplete: list[str] = field(default_factory=list)  # keys whose result rows are incomplete
    quarantined: list[str] = field(default_factory=list)
    removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.incomplete


def _live_files(con, location) -> list[tuple[str, str, int]]:
    """(table, absolute path, data_file_id) of every file the current snapshot lists."""
    if is_remote(location):
        data_path = con.execute(f"SELECT value FROM {META}.ducklake_metadata WHERE key = 'data_path'").fetchone()[0]
    else:  # where the data is now (the catalog stores where it was created; see lake.attach_sql)
        data_path = str(Path(location).absolute() / DATA_DIR) + "/"
    rows = con.execute(f"""
        SELECT t.table_name, f.path, f.path_is_relative, f.data_file_id, s.path AS schema_path, t.path AS table_path,
               s.path_is_relative, t.path_is_relative
        FROM {META}.ducklake_data_file f JOIN {META}.ducklake_table t USING (table_id)
        JOIN {META}.ducklake_schema s ON s.schema_id = t.schema_id
        WHERE f.end_snapshot IS NULL AND t.end_snapshot IS NULL AND s.end_snapshot IS NULL""").fetchall()
    out = []
    for table, path, rel, fid, spath, tpath, srel, trel in rows:
        full = path
        if rel:
            base = tpath if not trel else os.path.join(spath if not srel else os.path.join(data_path, spath), tpath)
            full = os.path.join(base, path)
        out.append((table, full, fid))
    return out


def _unreadable(path: str) -> str | None:
    if not os.path.exists(path):
        return "missing (deleted by hand?)"
    try:
        pq.read_table(path)  # every page decoded: a truncated or junk file fails here
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"unreadable: {' '.join(str(exc).split())[:200]}"
    return None


INCOMPLETE = """
WITH got AS (
    SELECT p.key, p.model, p.n_tokens, m.n_layers,
           (SELECT count(*) FROM tokens t WHERE t.key = p.key) AS n_tok,
           (SELECT count(*) FROM gradient_ranks g WHERE g.key = p.key) AS n_rank,
           (SELECT count(*) FROM projections x WHERE x.key = p.key) AS n_proj
    FROM prompts p LEFT JOIN (SELECT DISTINCT model, model_revision, n_layers FROM models) m
         USING (model, model_revision)),
shape AS (  -- per model: matrices per layer and lens sites per (layer, position), as the complete keys show
    SELECT model, max(n_rank / n_layers) AS per_layer, max(n_proj / (n_tokens * n_layers)) AS sites
    FROM got WHERE n_layers > 0 GROUP BY model)
SELECT key FROM got JOIN shape USING (model)
WHERE n_tok <> n_tokens OR n_rank = 0 OR n_proj = 0
   OR n_rank <> n_layers * per_layer OR n_proj <> n_tokens * n_layers * sites
"""


def check(location: str | os.PathLike, *, repair: bool = False) -> CheckResult:
    if not is_warehouse(location):
        raise FileNotFoundError(f"no warehouse at {str(location)!r}")
    con = attach(location, read_only=not repair)
    res = CheckResult()
    try:
        files = _live_files(con, location)
        for table, path, fid in files:
            why = _unreadable(path)
            if why:
                res.bad_files.append((table, path, why))
        if repair and res.bad_files:
            with _local_queue(location):
                _quarantine(con, location, files, res)
        if res.bad_files and not repair:
            return res  # the completeness query would fail on the bad files: repair first
        res.incomplete = [r[0] for r in con.execute(INCOMPLETE).fetchall()]
        if repair and res.incomplete:
            with _local_queue(location):
                res.removed = _remove(con, res.incomplete)
            res.incomplete = [r[0] for r in con.execute(INCOMPLETE).fetchall()]
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
            for t in RESULT_TABLES:
                con.execute(f"DELETE FROM {t} WHERE key IN (SELECT key FROM _bad)")
            con.execute("COMMIT")
            return len(keys)
        except BaseException:
            rollback(con)
            raise
        finally:
            con.unregister("_bad")

    return RetryPolicy().run(once)
