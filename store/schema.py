"""The warehouse schema: every Parquet table, declared once, versioned.

Columns may be added (bump :data:`SCHEMA_VERSION`), never renamed: the DuckDB views in ``queries/``
and the published dataset are the public API built on these names.

Every table carries ``batch_id``, the unit of commit. A batch's files become visible only once its
row in ``_commits`` exists (written last), so a writer killed mid-batch leaves nothing the views show.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

_str = pa.string()
_i16 = pa.int16()
_i32 = pa.int32()
_i64 = pa.int64()
_f32 = pa.float32()
_ts = pa.timestamp("us", tz="UTC")


def _schema(*fields: tuple[str, pa.DataType, bool], doc: str) -> pa.Schema:
    cols = [pa.field(n, t, nullable=nullable) for n, t, nullable in fields]
    cols.append(pa.field("batch_id", _str, nullable=False))
    return pa.schema(cols, metadata={"blens.schema_version": str(SCHEMA_VERSION), "blens.doc": doc})


def _req(name: str, dtype: pa.DataType) -> tuple[str, pa.DataType, bool]:
    return (name, dtype, False)


def _opt(name: str, dtype: pa.DataType) -> tuple[str, pa.DataType, bool]:
    return (name, dtype, True)


TABLES: dict[str, pa.Schema] = {
    "runs": _schema(
        _req("run_id", _str), _req("model", _str), _req("model_revision", _str), _req("dataset", _str),
        _req("dataset_fingerprint", _str), _req("config_json", _str), _req("created_at", _ts),
        _req("code_version", _str), _req("schema_version", _i32), _req("kind", _str),
        doc="One row per run: its identity (model+revision, dataset fingerprint, settings) and provenance.",
    ),
    "prompts": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("model", _str), _req("prompt", _str),
        _req("subject", _str), _req("target_new", _str), _req("target_true", _str),
        _req("target_new_id", _i32), _req("target_true_id", _i32), _req("n_tokens", _i32), _req("loss", _f32),
        doc="One row per extracted prompt; loss = NLL of target_new's first token at the last position.",
    ),
    "tokens": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("position", _i32), _req("token_id", _i32),
        _req("token", _str), _req("segment", _str),
        doc="Prompt tokens with their segment: subject (overlaps the subject string), last, other.",
    ),
    "gradient_ranks": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("layer", _i32), _req("matrix", _str),
        _req("rank", _i32), _req("n_tokens", _i32),
        doc="Exact rank of dL/dW per MLP matrix, from the spanning sets (Lemma 4.1: rank <= n_tokens).",
    ),
    "projections": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("layer", _i32), _req("site", _str),
        _req("position", _i32), _req("segment", _str), _req("norm", _f32),
        _req("top_ids", pa.list_(_i32)), _req("top_tokens", pa.list_(_str)), _req("top_logits", pa.list_(_f32)),
        _req("bottom_ids", pa.list_(_i32)), _req("bottom_tokens", pa.list_(_str)),
        _req("bottom_logits", pa.list_(_f32)), _req("target_new_rank", _i32), _req("target_true_rank", _i32),
        doc="Logit-lens projections of spanning vectors (ff1_input = imprint, ff2_vjp = shift); rank 0 = most probable.",
    ),
    "vectors": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("layer", _i32), _req("site", _str),
        _req("position", _i32), _req("vector", pa.list_(_f32)),
        doc="Raw spanning vectors: dL/dW of a matrix = sum over positions of outer(input, vjp).",
    ),
    "errors": _schema(
        _req("run_id", _str), _opt("case_id", _i64), _req("stage", _str), _req("field", _str),
        _req("message", _str), _req("source", _str),
        doc="Records skipped or failed, with the offending field; a run never stops for one bad record.",
    ),
    "edit_results": _schema(
        _req("run_id", _str), _req("case_id", _i64), _req("model", _str), _req("method", _str),
        _opt("layer", _i32), _opt("lr", _f32),
        _opt("efficacy", _f32), _opt("generalization", _f32), _opt("locality", _f32),
        _opt("locality_unchanged", _f32), _opt("target_new_prob", _f32), _opt("target_true_prob", _f32),
        _opt("new_gt_true", _f32), _opt("rephrase_new_gt_true", _f32),
        _opt("update_grad_cosine", _f32), _opt("update_norm", _f32), _opt("error", _str),
        doc="One row per edit: top-1 efficacy/generalization/locality after editing, ROME-style probability tests.",
    ),
    "_commits": _schema(
        _req("run_id", _str), _req("n_prompts", _i32), _req("created_at", _ts), _req("writer", _str),
        doc="Commit markers: a batch's rows are visible only once its commit row exists.",
    ),
}

PUBLIC_TABLES = [t for t in TABLES if not t.startswith("_")]

def empty_table(name: str) -> pa.Table:
    return TABLES[name].empty_table()


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast a produced table to the declared schema (column order, types); fails loudly on a mismatch."""
    schema = TABLES[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table {name!r} is missing columns {missing}")
    return table.select(schema.names).cast(schema)
