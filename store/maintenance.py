"""Keeping a warehouse small and fast: compaction, expiry of superseded data, and file accounting.

Every step is a DuckLake operation, so it is atomic like a commit: a reader sees the files before or
after a merge, never a mix, and the rows (hence every query's answer) do not change. Expiring snapshots
older than the retention period ends time travel to them and lets their files be deleted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import duckdb

from .lake import LAKE, RetryPolicy, attach, is_warehouse, sql_str
from .lake import local_queue


@dataclass
class CompactResult:
    before: dict[str, int]
    after: dict[str, int]
    seconds: float


def file_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Live data files per table (what a query has to open)."""
    rows = con.execute(f"""
        SELECT t.table_name, count(*) FROM __ducklake_metadata_{LAKE}.ducklake_data_file f
        JOIN __ducklake_metadata_{LAKE}.ducklake_table t USING (table_id)
        WHERE f.end_snapshot IS NULL AND t.end_snapshot IS NULL GROUP BY 1""").fetchall()
    return dict(rows)


def compact(location: str | os.PathLike, *, expire_older_than: str | None = "7 days") -> CompactResult:
    """Merge small files; then, with a retention period, expire older snapshots and delete the files only
    they used, and files no snapshot ever listed (leftovers of writers killed mid-commit) older than it."""
    if not is_warehouse(location):
        raise FileNotFoundError(f"no warehouse at {str(location)!r} (run `blens extract` first)")
    t0 = time.perf_counter()
    con = attach(location, read_only=False)
    policy = RetryPolicy(max_tries=8)
    try:
        before = file_counts(con)
        with local_queue(location):
            # Files carrying deletes (superseded or --force-replaced rows) are never merged: rewrite them first.
            policy.run(lambda: con.execute(f"CALL ducklake_rewrite_data_files({sql_str(LAKE)}, "
                                           "delete_threshold => 0.0)").fetchall())
            policy.run(lambda: con.execute(f"CALL ducklake_merge_adjacent_files({sql_str(LAKE)})").fetchall())
            if expire_older_than is not None:
                policy.run(lambda: con.execute(
                    f"CALL ducklake_expire_snapshots({sql_str(LAKE)}, older_than => now() - "
                    f"INTERVAL {sql_str(expire_older_than)})").fetchall())
                policy.run(lambda: con.execute(
                    f"CALL ducklake_cleanup_old_files({sql_str(LAKE)}, cleanup_all => true)").fetchall())
                # Files no snapshot lists (a writer killed mid-commit), once older than the retention: a live
                # writer's files are unlisted too until it commits, so never "all".
                policy.run(lambda: con.execute(
                    f"CALL ducklake_delete_orphaned_files({sql_str(LAKE)}, older_than => now() - "
                    f"INTERVAL {sql_str(expire_older_than)})").fetchall())
        after = file_counts(con)
    finally:
        con.close()
    return CompactResult(before, after, time.perf_counter() - t0)
