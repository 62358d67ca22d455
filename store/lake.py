"""The warehouse is a DuckLake: a catalog database plus Parquet files (see docs/warehouse.md for why).

A local warehouse is a directory holding ``catalog.sqlite`` (the DuckLake catalog, SQLite in WAL mode:
several writer processes on one machine) and ``data/`` (Parquet files the catalog lists). A shared one
is a PostgreSQL catalog (``postgres:dbname=... host=...``) with its data on shared storage. Every
connection attaches it under the alias ``lake`` and ``USE``\\ s it, so tables and the catalog's views
resolve by their plain names, from our code and from a plain DuckDB session alike.

The extensions come from the pip packages ``duckdb-ext-ducklake``/``-sqlite``/``-postgres`` (built for
DuckDB 1.4.4): they are loaded from that directory, never downloaded, and autoloading is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from blens.errors import UserError

LAKE = "lake"
CATALOG_FILE = "catalog.sqlite"
DATA_DIR = "data"


class WarehouseError(UserError, RuntimeError):
    """The warehouse cannot be used (not writable, not a warehouse, corrupt); one line for the user."""


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith("postgres:")


def extension_dir() -> str | None:
    """Where the duckdb-ext-* wheels put the extensions (<dir>/v1.4.4/linux_amd64/*.duckdb_extension)."""
    env = os.environ.get("BLENS_DUCKDB_EXTENSIONS")
    if env:
        return env
    spec = importlib.util.find_spec("duckdb_ext")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "extensions").is_dir():
            return str(Path(loc) / "extensions")
    return None


def sql_str(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def attach_sql(location: str | os.PathLike, *, read_only: bool = False, data_path: str | None = None,
               snapshot: str | None = None, new: bool | None = None) -> str:
    """The ATTACH statement for a warehouse directory or a ``postgres:...`` catalog.

    ``snapshot``: an integer snapshot version or a timestamp: the whole warehouse as it was then.
    """
    opts = []
    if is_remote(location):
        target = "ducklake:" + str(location)
        data_path = data_path or os.environ.get("BLENS_DATA_PATH")  # where a new shared lake keeps its files
        if data_path:
            opts.append(f"DATA_PATH {sql_str(data_path.rstrip('/') + '/')}")
    else:
        root = Path(location).absolute()
        target = f"ducklake:sqlite:{root / CATALOG_FILE}"
        # The data always sits beside the catalog; the catalog stores file paths relative to it, so a
        # warehouse directory can be moved or copied (OVERRIDE_DATA_PATH: use where it is now).
        opts.append(f"DATA_PATH {sql_str(str(data_path or root / DATA_DIR) + '/')}")
        if not (new if new is not None else not (root / CATALOG_FILE).exists()):
            opts.append("OVERRIDE_DATA_PATH true")
    if snapshot is not None:
        opts.append(f"SNAPSHOT_VERSION {int(snapshot)}" if str(snapshot).isdigit()
                    else f"SNAPSHOT_TIME {sql_str(snapshot)}")
    if read_only:
        opts.append("READ_ONLY")
    return f"ATTACH {sql_str(target)} AS {LAKE}" + (f" ({', '.join(opts)})" if opts else "")


def open_duckdb(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection ready for :func:`load_extensions`.

    When the extensions come from the duckdb-ext-* pip packages (:func:`extension_dir`), DuckDB's own
    signature check is skipped for them: it hashes each 50 MB file on every connection, 0.5 s of the
    0.9 s `blens sql` took. Those files are as trusted as this code (pip installed both into the same
    environment; whoever can replace them can replace blens), and :func:`load_extensions` switches unsigned
    loading off again right after, for good (DuckDB refuses to turn it back on while the database runs).
    Extensions DuckDB downloads itself (no pip packages) keep the signature check."""
    config: dict = {"threads": threads} if threads else {}
    if extension_dir():
        config["allow_unsigned_extensions"] = True
    return duckdb.connect(":memory:", config=config)


def load_extensions(con: duckdb.DuckDBPyConnection, remote: bool) -> None:
    ext = extension_dir()
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    if ext:
        con.execute(f"SET extension_directory = {sql_str(ext)}")
    for name in ("ducklake", "postgres" if remote else "sqlite"):
        try:
            con.execute(f"LOAD {name}")
        except duckdb.Error as exc:
            raise WarehouseError(f"cannot load the DuckDB extension {name!r} (install duckdb-ext-{name} for DuckDB "
                                 f"{duckdb.__version__}): {str(exc).splitlines()[0]}") from None
    con.execute("SET allow_unsigned_extensions = false")  # nothing else loads unsigned (see open_duckdb)


def _create_wal_sqlite(path: Path) -> None:
    """An empty SQLite catalog in WAL mode (kept in the file): readers never block the committing writer."""
    import sqlite3

    c = sqlite3.connect(path)
    try:
        c.execute("PRAGMA journal_mode=WAL")
    finally:
        c.close()


# ------------------------------------------------------------------------------------------- retry

_RETRYABLE = re.compile(r"conflict|Failed to commit|database is locked|busy|could not serialize|deadlock", re.I)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter: sleep U(0, min(cap, base * 2**attempt)) between tries.

    Concurrent writers on one catalog fail some commits ("Failed to commit DuckLake transaction",
    "database is locked", a transaction conflict); retried, they go through. Other errors are not retried.
    """

    max_tries: int = 30
    base_s: float = 0.05
    cap_s: float = 3.0
    log: list = field(default_factory=list)  # (attempt, error text) per failed try

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))

    def run(self, fn):
        for attempt in range(self.max_tries):
            try:
                return fn()
            except duckdb.Error as e:
                if not retryable(e) or attempt == self.max_tries - 1:
                    raise
                self.log.append((attempt, " | ".join(str(e).splitlines())[:400]))
                time.sleep(self.delay(attempt))


def retryable(e: BaseException) -> bool:
    return isinstance(e, duckdb.Error) and bool(_RETRYABLE.search(str(e)))


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


# -------------------------------------------------------------------------------------------- open

def is_warehouse(location: str | os.PathLike) -> bool:
    return is_remote(location) or (Path(location) / CATALOG_FILE).is_file()


def attach(location: str | os.PathLike, *, read_only: bool, snapshot: str | None = None,
           threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the warehouse attached as ``lake`` and in use."""
    new = None
    if not read_only and not is_remote(location):
        root = Path(location)
        root.mkdir(parents=True, exist_ok=True)
        (root / DATA_DIR).mkdir(exist_ok=True)
        new = not (root / CATALOG_FILE).exists()
        if new:
            _create_wal_sqlite(root / CATALOG_FILE)
    con = open_duckdb(threads)
    con.execute("SET enable_progress_bar = false")  # our commands print their own progress
    try:
        load_extensions(con, is_remote(location))
        statement = attach_sql(location, read_only=read_only, snapshot=snapshot, new=new)
        RetryPolicy(max_tries=8).run(lambda: con.execute(statement))
        con.execute(f"USE {LAKE}")
    except duckdb.Error as exc:
        con.close()
        raise WarehouseError(f"cannot open the warehouse {str(location)!r}: {' '.join(str(exc).split())[:300]}") from None
    return con


def init_sql(location: str | os.PathLike, *, read_only: bool = True) -> str:
    """SQL that a plain DuckDB session (CLI ``duckdb -init FILE`` or Python, no project code) runs to attach
    the warehouse and query every table and view; the views live in the catalog, so nothing else is needed.

    It names no path of this checkout (no ``extension_directory`` inside ``.venv``): the extensions come from
    DuckDB's standard directory, where scripts/setup.sh installs the bundled ones, so INSTALL is a no-op and
    LOAD works offline; on a machine without them INSTALL downloads them once."""
    remote = is_remote(location)
    other = "postgres" if remote else "sqlite"
    lines = [f"-- Backward Lens warehouse {location} (DuckLake; DuckDB {duckdb.__version__} with the ducklake "
             "extension).",
             "-- Extensions from DuckDB's standard directory (~/.duckdb/extensions), where scripts/setup.sh puts the "
             "bundled ones.",
             "INSTALL ducklake;", f"INSTALL {other};"]
    lines += ["LOAD ducklake;", f"LOAD {'postgres' if remote else 'sqlite'};",
              attach_sql(location if remote else Path(location).absolute(), read_only=read_only) + ";",
              f"USE {LAKE};", ""]
    return "\n".join(lines)


LOCK_FILE = "commit.lock"  # a local warehouse's writer queue (see local_queue)


def may_precede_a_warehouse(entry: Path) -> bool:
    """Files a new warehouse may find in its directory: a .gitignore or README, and what another writer makes
    while it creates the warehouse (the queue's lock file, the empty data directory, the catalog and its SQLite
    journal files): shards started together race there, and the one that looks in between must not take its
    sibling's half-made warehouse for an unrelated directory."""
    if entry.name in (".gitignore", "README.md", LOCK_FILE) or entry.name.startswith(CATALOG_FILE):
        return True
    return entry.name == DATA_DIR and entry.is_dir() and not any(entry.iterdir())


def check_target(location: str | os.PathLike) -> None:
    """Refuse to turn an unrelated, non-empty directory into a warehouse."""
    if is_remote(location) or is_warehouse(location):
        return
    root = Path(location)
    if root.exists() and not root.is_dir():
        raise WarehouseError(f"warehouse {str(root)!r} exists and is not a directory")
    if root.is_dir() and not all(may_precede_a_warehouse(p) for p in root.iterdir()):
        raise WarehouseError(f"{str(root)!r} is not empty and is not a warehouse (no {root / 'catalog.sqlite'}); "
                             "choose an empty or new directory")


@contextlib.contextmanager
def local_queue(location: str | os.PathLike):
    """An flock around a commit on a local catalog: local writers queue instead of spending retries."""
    if is_remote(location):
        yield
        return
    with open(Path(location) / LOCK_FILE, "a+") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
