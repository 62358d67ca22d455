"""Writing the warehouse: atomic Parquet files, committed batch by batch.

Layout (``<root>`` is the warehouse directory)::

    <root>/<table>/_empty.parquet                 zero rows, the declared schema (views never hit an empty glob)
    <root>/<table>/run=<run_id>/<batch_id>.parquet one file per table per batch
    <root>/_commits/run=<run_id>/<batch_id>.parquet written last: the batch is now visible

Every file is written to a dot-prefixed ``.tmp`` name in the same directory and renamed into place, so
a reader never sees half a file, and a batch's rows appear only after its commit marker does. Writers
never touch each other's files (batch ids are random), so any number of shards may share a directory.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import TABLES, conform, empty_table


class WarehouseError(RuntimeError):
    """The warehouse directory cannot be used (e.g. not writable); one line for the user."""


def writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def new_batch_id() -> str:
    return uuid.uuid4().hex


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """temp file + fsync + rename: the final name holds a complete file or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def init_warehouse(root: str | os.PathLike) -> Path:
    """Create the directory tree and the schema files; fail with one clear line if not writable."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
        for name in TABLES:
            empty = root / name / "_empty.parquet"
            if not empty.exists() or pq.read_schema(empty) != TABLES[name]:
                write_parquet_atomic(empty_table(name), empty)
    except OSError as exc:
        raise WarehouseError(f"warehouse {str(root)!r} is not writable: {exc.strerror or exc}") from None
    return root


def table_file(root: Path, table: str, run_id: str, batch_id: str) -> Path:
    return root / table / f"run={run_id}" / f"{batch_id}.parquet"


def commit_batch(root: str | os.PathLike, run_id: str, tables: dict[str, pa.Table], *, batch_id: str | None = None,
                 n_prompts: int = 0) -> str:
    """Write one batch of rows (any subset of tables) and then its commit marker. Returns the batch id."""
    root = Path(root)
    batch_id = batch_id or new_batch_id()
    for name, table in tables.items():
        if table is None or table.num_rows == 0:
            continue
        table = table.append_column("batch_id", pa.array([batch_id] * table.num_rows, pa.string())) \
            if "batch_id" not in table.column_names else table
        write_parquet_atomic(conform(name, table), table_file(root, name, run_id, batch_id))
    marker = pa.table({
        "run_id": [run_id], "n_prompts": pa.array([n_prompts], pa.int32()),
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "writer": [writer_id()], "batch_id": [batch_id],
    })
    write_parquet_atomic(conform("_commits", marker), table_file(root, "_commits", run_id, batch_id))
    return batch_id
