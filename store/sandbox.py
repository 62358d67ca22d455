"""The query sandbox of `blens sql`: a read-only session that reaches only the warehouse's own files.

Three walls, each enough for its class, so that one gap does not open the machine:

1. **Statements** (:func:`check_query`): every statement must be a query as DuckDB's own parser classifies
   it, and must serialize (``json_serialize_sql``): then its whole tree is known. Every table function it
   calls, also inside subqueries, lateral joins and the catalog's views it reads, must be on
   :data:`ALLOWED_TABLE_FUNCTIONS`. An allow-list, not a deny-list: DuckDB and its extensions add readers
   (``sqlite_scan`` ignores ``enable_external_access``), maintenance (``ducklake_cleanup_old_files`` deletes
   files even on a read-only attach) and ``query()``-style functions that run SQL text no parser saw; what
   is not listed is refused, whatever a later version adds. A table name that is a path or URL (DuckDB's
   replacement scans read it as a file) is refused too.
2. **Files** (:func:`lock_down`): external access off, and ``allowed_paths`` = exactly the files the
   catalog lists whose real location (symlinks resolved) is inside the warehouse's data folder. No
   directory is allowed, so ``glob`` and a symlink planted in ``data/`` reach nothing; spilling goes to a
   private temporary folder (DuckDB allows its temp directory implicitly, and the default ``.tmp`` is
   relative to wherever the command runs).
3. **Resources**: ``memory_limit`` and ``max_temp_directory_size``, a wall-clock limit (the connection is
   interrupted), and the configuration locked, so no query can raise them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

from blens.errors import UserError

from .files import catalog_files
from .lake import DATA_DIR, extension_dir, is_remote, sql_str
from .query_limits import DEFAULT_MEMORY_LIMIT


class QueryRefused(UserError, ValueError):
    """A statement the sandbox does not run (not a query, or it calls something outside the allow-list)."""


class QueryLimit(UserError, ValueError):
    """A query ran past the sandbox's time or memory limit; the message names the option that raises it."""


# Table functions a query may call: computed rows, the catalog's own read-only descriptions, and DuckLake's
# read-only views of snapshots and changes. Nothing here opens a file by a name the query gives.
ALLOWED_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_functions", "duckdb_keywords",
    "duckdb_schemas", "duckdb_tables", "duckdb_types", "duckdb_views", "duckdb_settings", "duckdb_extensions",
    "pragma_table_info", "pragma_show", "pragma_version", "pragma_platform", "pragma_collations",
    "pg_timezone_names", "icu_calendar_names",
    "ducklake_snapshots", "ducklake_table_info", "ducklake_table_changes", "ducklake_table_insertions",
    "ducklake_table_deletions", "ducklake_current_snapshot", "ducklake_last_committed_snapshot",
    "ducklake_list_files", "ducklake_options",
})
# Scalar functions with an effect outside the query's result (the rest compute values from values).
REFUSED_SCALAR_FUNCTIONS = frozenset({"write_log", "json_execute_serialized_sql", "getenv"})

# A table reference DuckDB would read as a file or URL (replacement scan): a path, a scheme, or a file name.
_PATHLIKE = re.compile(r"[/\\]|://|^~|\.(parquet|csv|tsv|json|jsonl|ndjson|txt|db|sqlite|sqlite3|duckdb|gz|zst|arrow|"
                       r"xlsx|avro)$", re.I)

_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.I)


def check_memory_limit(text: str) -> str:
    """``text`` if DuckDB reads it as a memory size (``512MB``, ``4GiB``), else a one-line QueryRefused."""
    if not _MEMORY.match(text):
        raise QueryRefused(f"--memory-limit {text!r} is not a size such as 512MB or 4GB")
    return text.strip()


# ------------------------------------------------------------------------------------------- wall 1

def _walk(node, found: list[tuple[str, str]]) -> None:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            fn = node.get("function") or {}
            found.append(("table function", str(fn.get("function_name", ""))))
        elif kind == "BASE_TABLE":
            found.append(("table", str(node.get("table_name", ""))))
        elif node.get("class") == "FUNCTION" and "function_name" in node:
            found.append(("function", str(node["function_name"])))
        for value in node.values():
            _walk(value, found)
    elif isinstance(node, list):
        for value in node:
            _walk(value, found)


def _references(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[str, str]] | None:
    """(kind, name) of every table, table function and function ``sql`` mentions; None if it cannot be
    serialized (then its tree is unknown and it is refused)."""
    # A SQL literal, not a bound parameter: binding makes DuckDB import pandas and numpy (1.1 s).
    tree = json.loads(con.execute(f"SELECT json_serialize_sql({sql_str(sql)})").fetchone()[0])
    if tree.get("error"):
        return None
    found: list[tuple[str, str]] = []
    _walk(tree.get("statements", []), found)
    return found


def _view_sql(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """name -> the query of each view in the catalog (a view's body is checked like the query itself)."""
    views = {}
    for name, sql in con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall():
        m = re.match(r"\s*CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(?:\"[^\"]*\"|[\w.]+)\s+AS\s+(.*?);?\s*$", sql or "",
                     re.I | re.S)
        views[name.lower()] = m.group(1) if m else ""
    return views


def check_query(con: duckdb.DuckDBPyConnection, sql: str, views: dict[str, str] | None = None) -> list[str]:
    """The statements of ``sql`` (each one's text), or QueryRefused naming the first thing not allowed."""
    statements = con.extract_statements(sql)
    views = _view_sql(con) if views is None else views
    out = []
    for stmt in statements:
        kind = str(stmt.type).rsplit(".", 1)[-1]
        if kind != "SELECT":
            raise QueryRefused(f"read-only: only queries are allowed, not {kind} (blens sql never writes, loads or "
                               "attaches; maintenance is `blens compact` and `blens check`)")
        _check_tree(con, stmt.query, views, set())
        out.append(stmt.query)
    return out


def _check_tree(con, sql: str, views: dict[str, str], seen: set[str], view: str | None = None) -> None:
    refs = _references(con, sql)
    where = f" (inside the view {view})" if view else ""
    if refs is None:
        if view:
            raise QueryRefused(f"the view {view} cannot be checked by the sandbox; it is not queryable here")
        raise QueryRefused("this statement cannot be checked by the sandbox (PRAGMA, PIVOT and similar shortcuts): "
                           "write it as a SELECT, e.g. SELECT * FROM pragma_table_info('prompts')")
    for kind, name in refs:
        low = name.lower()
        if kind == "table function" and low not in ALLOWED_TABLE_FUNCTIONS:
            raise QueryRefused(f"the table function {name}() is not allowed{where}: blens sql reads only the "
                               "warehouse's tables and views (allowed table functions: range, unnest, duckdb_*() "
                               "descriptions, ducklake_snapshots() and the other read-only ducklake_* views; "
                               "docs/reliability.md lists them)")
        if kind == "function" and low in REFUSED_SCALAR_FUNCTIONS:
            raise QueryRefused(f"the function {name}() is not allowed{where}")
        if kind == "table" and _PATHLIKE.search(name):
            raise QueryRefused(f"{name!r} is a file or URL; blens sql reads only the warehouse's tables and views")
        if kind == "table" and low in views and low not in seen:
            seen.add(low)
            _check_tree(con, views[low], views, seen, view=name)


# ------------------------------------------------------------------------------------------- wall 2

def allowed_files(con: duckdb.DuckDBPyConnection, warehouse: str | os.PathLike) -> list[str]:
    """Every file any snapshot in the catalog lists (time travel reads old ones), as DuckLake will open it,
    if its real location is inside the warehouse's data folder."""
    files = sorted({path for _, path, _ in catalog_files(con, warehouse, live_only=False, deletes=True)})
    if is_remote(warehouse):
        return files
    root = os.path.realpath(Path(warehouse).absolute() / DATA_DIR) + os.sep
    return [p for p in files if os.path.realpath(p).startswith(root)]


def lock_down(con: duckdb.DuckDBPyConnection, warehouse: str | os.PathLike, *, memory_limit: str = DEFAULT_MEMORY_LIMIT,
              temp_dir: str | None = None) -> None:
    """Only the warehouse's listed files stay reachable; limits set; settings can no longer change."""
    files = allowed_files(con, warehouse)
    # SQL literals, not bound parameters: binding a Python list makes DuckDB import pandas and numpy to
    # inspect it (0.4 s, a third of `blens sql`'s start-up).
    con.execute(f"SET allowed_paths = [{', '.join(sql_str(f) for f in files)}]")
    con.execute("SET allowed_directories = []")
    con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
    con.execute(f"SET max_temp_directory_size = {sql_str(memory_limit)}")
    if temp_dir:
        con.execute(f"SET temp_directory = {sql_str(temp_dir)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET allow_community_extensions = false")
    if extension_dir():
        con.execute("SET allow_unsigned_extensions = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive): how a temp folder named
    after its process is told to be a killed run's leftover."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def private_temp_dir() -> Iterator[str]:
    """A temp folder for DuckDB to spill into (``blens-sql-<pid>-*``), removed afterwards; those of killed
    runs (their pid is gone) are removed here, so spill files never pile up in the temp folder."""
    for stale in Path(tempfile.gettempdir()).glob("blens-sql-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"blens-sql-{os.getpid()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- wall 3

@contextmanager
def time_limit(con: duckdb.DuckDBPyConnection, seconds: float, *, _query_error: type = duckdb.Error,
               _limit: type = QueryLimit) -> Iterator[None]:
    """Interrupt ``con`` after ``seconds``; DuckDB's InterruptException becomes a QueryLimit naming --timeout.
    (A signal stops the query through ``blens.lifecycle.signals.interrupting``. ``_query_error`` and ``_limit`` are
    bound at definition: a signal's exception can leave this generator to the interpreter's teardown, after
    module globals are gone.)"""
    fired = threading.Event()
    done = threading.Event()

    def stop() -> None:
        if done.wait(seconds):
            return
        fired.set()
        while not done.is_set():  # again until it ends: an interrupt between two statements reaches neither
            con.interrupt()
            done.wait(0.2)

    watcher = threading.Thread(target=stop, name="blens-sql-timeout", daemon=True)
    watcher.start()
    try:
        yield
    except _query_error:
        if fired.is_set():
            raise _limit(f"the query ran longer than {seconds:g} s and was stopped (raise the limit with "
                         "--timeout SECONDS)") from None
        raise
    finally:
        done.set()


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyConnection:
    """Check every statement of ``sql`` (:func:`check_query`), run them, and return the connection holding
    the last one's result."""
    result = con
    for text in check_query(con, sql):
        result = con.execute(text)
    return result


def memory_error(exc: duckdb.Error, memory_limit: str) -> QueryLimit | None:
    if isinstance(exc, duckdb.OutOfMemoryException) or "Out of Memory" in str(exc):
        return QueryLimit(f"the query needs more than the memory limit of {memory_limit} (raise it with "
                          "--memory-limit, e.g. --memory-limit 8GB)")
    return None


__all__ = ["ALLOWED_TABLE_FUNCTIONS", "QueryLimit", "QueryRefused", "check_query", "lock_down", "run_query",
           "time_limit"]
