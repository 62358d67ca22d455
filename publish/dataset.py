"""Publishing the warehouse as a Hugging Face dataset with a real dataset card.

``publish(warehouse, out)`` writes, under ``out``::

    data/<table>/train-00000-of-00001.parquet  one Parquet file per table (zstd)
    README.md                                  the dataset card: YAML header + prose generated from the warehouse

Parquet is the one on-disk form: it is what the Hub serves, what ``datasets``, DuckDB, pandas and Polars read
directly, and what is pushed. (An Arrow ``save_to_disk`` copy beside it doubled the output, 67 MB for 200
prompts, and was never pushed.) The card's ``configs:`` metadata names each table's files, so
``datasets.load_dataset(str(out), "projections", split="train")`` reads a table from the folder as it would from
the Hub, and ``load_dataset("parquet", data_files=...)`` reads the files without the card.

Rows are read through a read-only DuckLake connection pinned at one snapshot (``store.connect``), which shows
only committed, unsuperseded rows. They are streamed: each query is read as Arrow record batches, each batch cast
to the declared types and appended to the Parquet file, and the tables with rows per token or per layer are read
a range of commits at a time (``CHUNK_ROWS``), so no table is ever sorted or held whole: publish's peak memory
stays flat in the warehouse's size (bench/bench_publish_memory.py).

On the Hub a dataset with differently-shaped tables is one *config* per table (a config has one
schema), so the card declares configs ``prompts``, ``tokens``, ... each with a ``train`` split.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from blens.errors import UserError
from blens.store.connect import connect_pinned
from blens.store.lake import sql_str
from blens.store.schema import TABLES

from .card import render_card
from .output import output_dir_problem, replace_directory, stage_dir

REQUIRED_SPLITS = ("prompts", "tokens", "gradient_ranks", "projections")
# Published only when non-empty (a config with no rows cannot be loaded): runs, models and errors always
# have rows in a warehouse that `blens extract` wrote.
OPTIONAL_SPLITS = ("vectors", "vjp_similarity", "settings", "edit_results", "runs", "models", "errors",
                   "supersessions")
SPLITS = REQUIRED_SPLITS + OPTIONAL_SPLITS

ORDER_BY = {
    "prompts": "model, case_id, key",
    "tokens": "batch_id, key, position",  # by commit first: see CHUNK_ROWS
    "gradient_ranks": "batch_id, key, layer, matrix",
    "projections": "batch_id, key, site, layer, position",
    "vectors": "batch_id, key, site, layer, position",
    "vjp_similarity": "batch_id, key, site, layer",
    "settings": "settings",
    "edit_results": "run_id, case_id, method, layer, lr",
    "runs": "created_at, run_id",
    "models": "model, model_revision",
    "errors": "stage, case_id, field, key",
    "supersessions": "superseded_at, slot",
}
INTERNAL_COLUMNS = ("batch_id",)  # commit bookkeeping, not data

# The tables with rows per token or per layer (~10 M projection rows at 20,000 prompts; with spanning vectors
# ~1 MB of vectors per prompt) are never sorted whole: DuckDB holds a sort in memory up to its cap, so publish's
# peak RSS grew with the warehouse. They are read a range of commits (batch_id) at a time, about this many rows per query,
# each range sorted on its own; DuckLake skips the files (and Parquet the row groups) whose batch_id range lies
# outside. Their published order is therefore by commit (batch_id), then key: the same rows in the same order
# whatever the ranges, since ORDER_BY starts with batch_id.
CHUNK_ROWS = {"tokens": 131_072, "gradient_ranks": 131_072, "projections": 32_768, "vectors": 8_192,
              "vjp_similarity": 131_072}

# Rows per Arrow batch read from DuckDB (and per Parquet row group): vectors rows are d floats wide.
BATCH_ROWS = {"vectors": 1024}
DEFAULT_BATCH_ROWS = 16384

PARQUET_NAME = "train-00000-of-00001.parquet"
# DuckDB's memory cap while publishing, a safety net under CHUNK_ROWS: a sort that outgrows it spills to the staging
# directory instead of growing the process (DuckDB's default cap is 80 % of RAM).
PUBLISH_MEMORY_LIMIT = "2GB"

class PublishError(UserError, RuntimeError):
    """Publishing failed for a reason the user can act on; the message is one line."""


@dataclass
class SplitInfo:
    name: str
    features: object  # datasets.Features
    num_rows: int
    num_bytes: int
    files: list[Path] = field(default_factory=list)


@dataclass
class PublishResult:
    out: Path
    splits: dict[str, SplitInfo]
    card: Path
    pushed_to: str | None = None
    snapshot: int | None = None  # the DuckLake snapshot version every table was read at


# ----------------------------------------------------------------------------------------- schema


def _declared_type(table: str, column: str, view_type: pa.DataType) -> pa.DataType:
    schema = TABLES[table]
    if column in schema.names:
        return schema.field(column).type
    return view_type  # a column the views add (none today): keep DuckDB's type


def arrow_schema(con, table: str, *, vector_dtype: str = "float32") -> pa.Schema:
    """The published Arrow schema of a split: the view's columns, with the declared store types."""
    view_schema = con.sql(f"SELECT * FROM {table} LIMIT 0").arrow().schema
    fields = []
    for f in view_schema:
        if f.name in INTERNAL_COLUMNS:
            continue
        t = _declared_type(table, f.name, f.type)
        if pa.types.is_timestamp(t):
            t = pa.timestamp(t.unit, tz="UTC")
        if table == "vectors" and f.name == "vector":
            t = pa.list_(pa.float16() if vector_dtype == "float16" else pa.float32())
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


# ------------------------------------------------------------------------------------------ rows


def count_rows(con, table: str) -> int:
    return int(con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0])


def batch_ranges(counts: list[tuple[str, int]], max_rows: int) -> list[tuple[str, str]]:
    """(first, last) batch_id of consecutive runs of ``counts`` ((batch_id, rows), sorted by batch_id) holding at
    most ``max_rows`` rows each; a batch larger than that is a range of its own."""
    ranges: list[tuple[str, str]] = []
    first = last = None
    rows = 0
    for batch_id, n in counts:
        if first is not None and rows + n > max_rows:
            ranges.append((first, last))
            first, rows = None, 0
        if first is None:
            first = batch_id
        last, rows = batch_id, rows + n
    if first is not None:
        ranges.append((first, last))
    return ranges


def _queries(con, table: str, cols: str) -> Iterable[tuple[str, list]]:
    """The SQL (and parameters) that read ``table`` in ORDER_BY's order: one query, or one per range of commits."""
    order = f"ORDER BY {ORDER_BY[table]}"
    if table not in CHUNK_ROWS:
        yield f"SELECT {cols} FROM {table} {order}", []
        return
    counts = con.execute(f"SELECT batch_id, count(*) FROM {table} GROUP BY batch_id ORDER BY batch_id").fetchall()
    for first, last in batch_ranges(counts, CHUNK_ROWS[table]):
        yield f"SELECT {cols} FROM {table} WHERE batch_id BETWEEN ? AND ? {order}", [first, last]


def stream_batches(con, table: str, schema: pa.Schema) -> Iterable[pa.RecordBatch]:
    """The view's rows, in a stable order, as record batches cast to the published schema."""
    cols = ", ".join(f'"{n}"' for n in schema.names)
    for sql, params in _queries(con, table, cols):
        reader = con.execute(sql, params).fetch_record_batch(BATCH_ROWS.get(table, DEFAULT_BATCH_ROWS))
        for batch in reader:
            if batch.num_rows:
                yield pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]


def _leaf(name: str, t: pa.DataType) -> tuple[str, pa.DataType]:
    """The Parquet leaf column of an Arrow field (a list's values are ``NAME.list.element``) and its type."""
    while pa.types.is_list(t):  # our schemas' only nesting (``store.schema``, ``arrow_schema``)
        name, t = f"{name}.list.element", t.value_type
    return name, t


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary encoding: all but floats and lists of floats.

    A float column almost never repeats a value, so a dictionary for it is built, overflows its page limit and
    is dropped for plain pages, in every row group. Without that wasted attempt, `blens publish` of 240 SmolLM2
    prompts with spanning vectors took 6.4-6.6 s against 9.7-10.5 and wrote 276 MB against 355 (vectors 246
    against 317, projections 28 against 36), the same rows. Strings (keys, sites, token text, in lists too) and
    integers keep their dictionaries. Names are Parquet leaf paths: a bare list name would not reach its values.
    """
    leaves = [_leaf(f.name, f.type) for f in schema]
    return [path for path, t in leaves if not pa.types.is_floating(t)]


def write_split_parquet(con, table: str, schema: pa.Schema, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=dictionary_columns(schema)) as writer:
        for batch in stream_batches(con, table, schema):
            writer.write_batch(batch)
            n += batch.num_rows
    return n


# --------------------------------------------------------------------------------------- publish


# What marks a directory as an earlier `blens publish` output (republished in place): the prompts table, always
# published; dataset_dict.json: an output of a blens that also wrote an Arrow copy.
MARKERS = (f"data/prompts/{PARQUET_NAME}", "dataset_dict.json")


def _prepare_out(out: Path, warehouse) -> None:
    problem = output_dir_problem(out, MARKERS, "blens publish", warehouse)
    if problem:
        raise PublishError(problem)


def publish(warehouse: str | os.PathLike, out: str | os.PathLike, *, vector_dtype: str = "float32",
            repo_id: str | None = None, progress: bool = False) -> PublishResult:
    """Build the local artefact (Parquet per table + card) atomically under ``out``. ``progress`` is accepted
    for callers of earlier versions (the Arrow conversion it showed is gone)."""
    import datasets

    if vector_dtype not in ("float32", "float16"):
        raise PublishError(f"--vector-dtype must be float32 or float16, got {vector_dtype!r}")
    out = Path(out)
    _prepare_out(out, warehouse)
    try:
        con, snapshot = connect_pinned(warehouse)  # every table at one snapshot, named in the card
    except FileNotFoundError as exc:
        raise PublishError(str(exc)) from None
    if count_rows(con, "prompts") == 0:
        raise PublishError(f"warehouse {str(warehouse)!r} has no committed prompts; nothing to publish")

    stage = stage_dir(out)
    try:
        con.execute(f"SET memory_limit = '{PUBLISH_MEMORY_LIMIT}'")
        con.execute(f"SET temp_directory = {sql_str(stage / '.spill')}")
        splits: dict[str, SplitInfo] = {}
        for name in SPLITS:
            if name in OPTIONAL_SPLITS and count_rows(con, name) == 0:
                continue
            schema = arrow_schema(con, name, vector_dtype=vector_dtype)
            features = datasets.Features.from_arrow_schema(schema)
            path = stage / "data" / name / PARQUET_NAME
            n = write_split_parquet(con, name, schema, path)
            meta = pq.ParquetFile(path).metadata
            if meta.num_rows != n:
                raise PublishError(f"{name}: wrote {n} rows but the Parquet file holds {meta.num_rows}")
            # dataset_info's num_bytes: the rows' uncompressed size, as the Hub's viewer counts it
            nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            splits[name] = SplitInfo(name, features, n, int(nbytes), [path])
        shutil.rmtree(stage / ".spill", ignore_errors=True)
        card = render_card(con, splits, repo_id=repo_id, snapshot=snapshot)
        (stage / "README.md").write_text(card, encoding="utf-8")
        replace_directory(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        con.close()
    for s in splits.values():
        s.files = [out / "data" / s.name / PARQUET_NAME]
    return PublishResult(out=out, splits=splits, card=out / "README.md", snapshot=snapshot)


# ------------------------------------------------------------------------------------------ push


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def push(result: PublishResult, repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Upload a published folder: each table as config ``<table>`` (split ``train``, files under
    ``data/<table>/``, the same paths as locally) and the card, in one commit. Checks the token and the Hub first,
    so a missing token or no network fails before anything is written remotely."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:
        raise PublishError("cannot push: HF_HUB_OFFLINE is set (offline mode); the local dataset at "
                           f"{str(result.out)!r} is complete, push it later with network access")
    token = token or get_token()
    if not token:
        raise PublishError("cannot push: no Hugging Face token configured (set HF_TOKEN or run `hf auth login`); "
                           f"the local dataset at {str(result.out)!r} is complete")
    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as exc:  # network down, proxy, bad token: one line, nothing written remotely
        raise PublishError(f"cannot push to {repo_id!r}: the Hugging Face Hub is unreachable or rejected the token "
                           f"[{_one_line(exc)}]") from None
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # the folder as it is, in one commit: the Parquet files under data/<table>/ and the card whose configs
        # name them (the Hub reads the same paths as load_dataset does locally)
        api.upload_folder(folder_path=str(result.out), repo_id=repo_id, repo_type="dataset",
                          allow_patterns=["README.md", *(f"data/{name}/*.parquet" for name in result.splits)],
                          commit_message="blens publish: " + ", ".join(result.splits) + " and the dataset card")
    except PublishError:
        raise
    except Exception as exc:
        raise PublishError(f"push to {repo_id!r} failed: {_one_line(exc)}") from None
    result.pushed_to = repo_id
    return f"https://huggingface.co/datasets/{repo_id}"
