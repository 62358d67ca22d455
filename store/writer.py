"""Writing the warehouse: one DuckLake transaction per batch, over every table, exactly once per key.

A batch (``commit_batch``) is one transaction: its rows in every table become visible together at
COMMIT, or not at all (a writer killed mid-batch leaves at most unreferenced Parquet files, which no
reader sees and ``blens compact`` deletes). Inside it:

1. the batch's result keys already present are skipped (another writer, or an earlier run, made them);
2. a new key whose ``slot`` (same model, settings and case_id) holds another key supersedes it: the old
   key's rows are deleted (still readable by time travel) and the pair logged in ``supersessions``;
3. the new keys' rows are inserted; ``errors`` rows of those keys are deleted (the record succeeded now),
   and the batch's own error rows are added unless the same (key, stage, field) is already there;
4. the single row of ``commit_lock`` is replaced. DuckLake does not treat two concurrent INSERTs as a
   conflict, so an insert-if-absent alone would let two racing writers both add a key; two
   transactions that both replace that row do conflict, so one of them fails, is retried, re-reads
   the keys and skips the winner's. On a local (SQLite) catalog an flock queues the writers first, so
   retries are rare; correctness never depends on it.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from .lake import LAKE, RetryPolicy, WarehouseError, attach, check_target, is_remote, local_queue, rollback
from .migrations import ensure_schema
from .schema import RESULT_TABLES, conform

__all__ = ["WarehouseError", "CommitResult", "commit_batch", "init_warehouse", "writer_connection"]

ANCHORS = {"extract": "prompts", "edit": "edit_results"}  # the table whose keys a batch of that kind adds
_CONNECTIONS: dict[str, duckdb.DuckDBPyConnection] = {}
_OWNER: dict[str, int] = {}  # the thread that attached it; other threads use their own cursors
_CONNECTIONS_LOCK = threading.Lock()
_THREAD = threading.local()


def writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _location_key(location: str | os.PathLike) -> str:
    return str(location) if is_remote(location) else str(Path(location).absolute())


def writer_connection(location: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """This process's read-write connection to a warehouse, created (and the schema ensured) once.

    One DuckDB connection must not run statements from two threads at once (they would share one
    transaction), and the extraction commits from a background thread while its main thread asks which
    keys are stored (``blens.run.commit.Committer``). So each thread gets its own cursor on the
    process's one attached database: same catalog, own transaction.
    """
    loc = _location_key(location)
    with _CONNECTIONS_LOCK:
        con = _CONNECTIONS.get(loc)
        if con is None:
            check_target(location)  # before the queue's lock file is made there
            try:
                if not is_remote(location):
                    Path(location).mkdir(parents=True, exist_ok=True)  # where the queue's lock file lives
                # Queued behind the other local writers' opens and commits: DuckLake 1.4.4 trips internal
                # assertions when one process reads a catalog that another is creating tables in (seen in
                # the concurrent-shards test: "GetValueInternal on a value that is NULL" reading blens_meta,
                # and LoadStatsForSnapshot before). An InternalException invalidates the DuckDB instance, so
                # no retry can recover it; only not racing does. Once the schema exists, commits only add
                # files and snapshots, the path DuckLake's concurrent readers and writers are built for.
                with local_queue(location):
                    check_target(location)  # again, now that no other local writer is half-way through
                    con = attach(location, read_only=False)
                    RetryPolicy(max_tries=8).run(lambda: ensure_schema(con))
            except OSError as exc:
                raise WarehouseError(f"warehouse {str(location)!r} is not writable: {exc.strerror or exc}") from None
            if not _CONNECTIONS:
                atexit.register(close_writers)  # also run by the CLI's fast process end (blens.lifecycle.ending)
            _CONNECTIONS[loc] = con
            _OWNER[loc] = threading.get_ident()
    if _OWNER[loc] == threading.get_ident():
        return con
    cursors = _THREAD.__dict__.setdefault("cursors", {})
    cur = cursors.get(loc)
    if cur is None:
        cur = cursors[loc] = con.cursor()
        cur.execute("SET enable_progress_bar = false")
        cur.execute(f"USE {LAKE}")
    return cur


def close_writers() -> None:
    """Close this process's writer connections: at exit, so that the catalog is closed as by the interpreter's
    teardown, which the CLI's process end skips (blens.lifecycle.ending)."""
    with _CONNECTIONS_LOCK:
        for loc in list(_CONNECTIONS):
            try:
                _CONNECTIONS.pop(loc).close()
            except duckdb.Error:  # closing at exit: nothing left to do about it
                pass
            _OWNER.pop(loc, None)


def init_warehouse(location: str | os.PathLike) -> str | os.PathLike:
    """Create the warehouse (or check it) and its schema; fail with one clear line if it cannot be used."""
    writer_connection(location)
    return location


@dataclass
class CommitResult:
    batch_id: str
    added: list[str]
    skipped: list[str]
    superseded: list[tuple[str, str]]  # (old_key, new_key)
    tries: int


def _insert(con, table: str, t: pa.Table, batch_id: str, where: str = "") -> None:
    t = conform(table, t.append_column("batch_id", pa.array([batch_id] * t.num_rows, pa.string()))
                if "batch_id" not in t.column_names else t)
    con.register("_rows", t)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _rows {where}")  # by name: see store/migrations.py
    finally:
        con.unregister("_rows")


def _commit_once(con, tables: dict[str, pa.Table], kind: str, batch_id: str, tries: int,
                 replace: set[str]) -> CommitResult:
    anchor = ANCHORS.get(kind)
    con.execute("BEGIN")
    try:
        added: list[str] = []
        skipped: list[str] = []
        sup: list[tuple[str, str]] = []
        if anchor and tables.get(anchor) is not None and tables[anchor].num_rows:
            batch = tables[anchor]
            keys = list(dict.fromkeys(batch.column("key").to_pylist()))
            con.register("_batch_keys", pa.table({"key": pa.array(keys, pa.string())}))
            have = {r[0] for r in con.execute(f"SELECT DISTINCT key FROM {anchor} WHERE key IN "
                                              "(SELECT key FROM _batch_keys)").fetchall()}
            renew = sorted(have & replace)
            if renew:  # recomputed on purpose (--force, more vectors): the new rows replace the old ones
                con.register("_renew", pa.table({"key": pa.array(renew, pa.string())}))
                for t in (RESULT_TABLES if anchor == "prompts" else (anchor,)):
                    con.execute(f"DELETE FROM {t} WHERE key IN (SELECT key FROM _renew)")
                con.unregister("_renew")
                have -= replace
            added = [k for k in keys if k not in have]
            skipped = [k for k in keys if k in have]
            con.register("_new", pa.table({"key": pa.array(added, pa.string())}))
            if anchor == "prompts" and added:
                con.register("_slots", batch.select(["key", "slot"]))
                sup = con.execute("SELECT p.key, s.key FROM prompts p JOIN _slots s USING (slot) "
                                  "WHERE s.key IN (SELECT key FROM _new) AND p.key <> s.key").fetchall()
                con.unregister("_slots")
                if sup:
                    con.register("_sup", pa.table({"old_key": [o for o, _ in sup]}))
                    for t in RESULT_TABLES:
                        con.execute(f"DELETE FROM {t} WHERE key IN (SELECT old_key FROM _sup)")
                    con.unregister("_sup")
                    slots = dict(zip(batch.column("key").to_pylist(), batch.column("slot").to_pylist()))
                    now = datetime.now(timezone.utc)
                    _insert(con, "supersessions", pa.table({
                        "slot": pa.array([slots[n] for _, n in sup], pa.string()),
                        "old_key": pa.array([o for o, _ in sup], pa.string()),
                        "new_key": pa.array([n for _, n in sup], pa.string()),
                        "superseded_at": pa.array([now] * len(sup), pa.timestamp("us", tz="UTC"))}), batch_id)
            if added:
                for name in (RESULT_TABLES if anchor == "prompts" else (anchor,)):
                    t = tables.get(name)
                    if t is not None and t.num_rows:
                        _insert(con, name, t, batch_id, "WHERE key IN (SELECT key FROM _new)")
                con.execute("DELETE FROM errors WHERE key IN (SELECT key FROM _new) AND stage <> 'load'")
            con.unregister("_new")
            con.unregister("_batch_keys")
        errs = tables.get("errors")
        if errs is not None and errs.num_rows:
            _insert(con, "errors", errs, batch_id, "WHERE NOT EXISTS (SELECT 1 FROM errors e WHERE e.key = _rows.key "
                    "AND e.stage = _rows.stage AND e.field = _rows.field)")
        for name, ident in (("runs", "run_id"), ("models", "model, model_revision"), ("settings", "settings")):
            t = tables.get(name)
            if t is not None and t.num_rows:
                cols = [c.strip() for c in ident.split(",")]
                match = " AND ".join(f"x.{c} = _rows.{c}" for c in cols)
                _insert(con, name, t, batch_id, f"WHERE NOT EXISTS (SELECT 1 FROM {name} x WHERE {match})")
        con.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, now(), ?)",
                    [writer_id(), kind, len(added), len(skipped), len(sup), tries, batch_id])
        con.execute("DELETE FROM commit_lock")
        con.execute("INSERT INTO commit_lock VALUES (0, ?)", [batch_id])
        con.execute("COMMIT")
        return CommitResult(batch_id, added, skipped, sup, tries)
    except BaseException:
        rollback(con)
        raise


def commit_batch(location: str | os.PathLike, tables: dict[str, pa.Table | None], *, kind: str = "extract",
                 replace: set[str] = frozenset(), policy: RetryPolicy | None = None) -> CommitResult:
    """Commit one batch atomically over all its tables, exactly once per key, retrying lost races.

    ``kind`` 'extract': ``tables['prompts']`` (with key, slot) decides which keys are new; the other
    result tables follow it. 'edit': ``tables['edit_results']`` does. 'meta': runs/models/errors only.
    ``replace``: keys whose stored rows this batch replaces instead of skipping (a deliberate recompute).
    """
    con = writer_connection(location)
    policy = policy or RetryPolicy()
    tables = {k: v for k, v in tables.items() if v is not None}
    batch_id = uuid.uuid4().hex
    with local_queue(location):
        attempt = {"n": 0}

        def once() -> CommitResult:
            attempt["n"] += 1
            return _commit_once(con, tables, kind, batch_id, attempt["n"], set(replace))

        return policy.run(once)
