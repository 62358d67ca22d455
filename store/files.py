"""Which files a warehouse's catalog lists, as absolute paths: the data and delete files of every table.

`blens check` reads the live ones (is each readable?), and the query sandbox allows exactly these (see
``blens.store.sandbox``): DuckLake stores most paths relative to the table, the table's relative to its
schema, and the schema's relative to the data path, so the absolute path is joined here, once.
"""

from __future__ import annotations

import os
from pathlib import Path

from .lake import DATA_DIR, LAKE, is_remote

META = f"__ducklake_metadata_{LAKE}"


def data_path(con, location: str | os.PathLike) -> str:
    """Where the data is now (the catalog stores where it was created; see ``lake.attach_sql``)."""
    if is_remote(location):
        return con.execute(f"SELECT value FROM {META}.ducklake_metadata WHERE key = 'data_path'").fetchone()[0]
    return str(Path(location).absolute() / DATA_DIR) + "/"


def catalog_files(con, location: str | os.PathLike, *, live_only: bool = True,
                  deletes: bool = False) -> list[tuple[str, str, int]]:
    """(table, absolute path, file id) of the data files the current snapshot lists (``live_only``) or that
    any snapshot still in the catalog lists; with ``deletes`` also the delete files (id negated)."""
    base_dir = data_path(con, location)
    live = "WHERE f.end_snapshot IS NULL AND t.end_snapshot IS NULL AND s.end_snapshot IS NULL" if live_only else ""
    selects = [f"SELECT t.table_name, f.path, f.path_is_relative, f.data_file_id AS id, s.path, t.path, "
               f"s.path_is_relative, t.path_is_relative FROM {META}.ducklake_data_file f"]
    if deletes:
        selects.append(f"SELECT t.table_name, f.path, f.path_is_relative, -f.delete_file_id, s.path, t.path, "
                       f"s.path_is_relative, t.path_is_relative FROM {META}.ducklake_delete_file f")
    sql = " UNION ALL ".join(
        f"{sel} JOIN {META}.ducklake_table t USING (table_id) JOIN {META}.ducklake_schema s "
        f"ON s.schema_id = t.schema_id {live}" for sel in selects)
    out = []
    for table, path, rel, fid, spath, tpath, srel, trel in con.execute(sql).fetchall():
        full = path
        if rel:
            base = tpath if not trel else os.path.join(spath if not srel else os.path.join(base_dir, spath), tpath)
            full = os.path.join(base, path)
        out.append((table, full, fid))
    return out
