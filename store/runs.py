"""Run registration and ``errors`` rows: who produced which rows, and which records were turned away.

A run's identity is (model + revision, dataset fingerprint, result-changing settings): the same command
on the same data always gets the same run id, which is what makes a rerun resume.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Protocol

import pyarrow as pa

from .schema import SCHEMA_VERSION
from .writer import commit_batch


class ErrorLike(Protocol):
    """A rejected record as the model side reports it (``blens.extract.records.RecordError``)."""

    case_id: int | None
    field: str
    message: str
    source: str


def code_version() -> str:
    """git commit of the code that produced the rows (falls back to the package version)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("backward-lens-warehouse")
    except PackageNotFoundError:
        return "unknown"


def error_key(stage: str, error: ErrorLike) -> str:
    """The key of an error that belongs to no result (a record rejected before it had one): its content."""
    blob = json.dumps([stage, error.case_id, error.field, error.message, error.source], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def errors_table(run_id: str, errors: Iterable[ErrorLike], stage: str, keys: Iterable[str] | None = None) -> pa.Table:
    """``errors`` rows for one stage (load, prepare, extract, edit). ``keys``: the result key of each
    error's record where it has one (then a later success of that key clears the error)."""
    errors = list(errors)
    keys = list(keys) if keys is not None else [error_key(stage, e) for e in errors]
    # Explicit types: an empty list would infer type null and break concat with a non-empty table.
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "run_id": pa.array([run_id] * len(errors), pa.string()),
        "case_id": pa.array([e.case_id for e in errors], pa.int64()),
        "stage": pa.array([stage] * len(errors), pa.string()),
        "field": pa.array([e.field for e in errors], pa.string()),
        "message": pa.array([e.message for e in errors], pa.string()),
        "source": pa.array([e.source or "" for e in errors], pa.string()),
    })


def models_table(facts: dict) -> pa.Table:
    """One ``models`` row from a model's facts (name, revision, family, shape, source file and sha256)."""
    return pa.table({
        "model": [facts["name"]], "model_revision": [facts["revision"]], "family": [facts["family"]],
        "n_layers": pa.array([facts["n_layers"]], pa.int32()), "d_model": pa.array([facts["d_model"]], pa.int32()),
        "vocab_size": pa.array([facts["vocab_size"]], pa.int32()),
        "source_file": pa.array([facts.get("source_file")], pa.string()),
        "source_sha256": pa.array([facts.get("source_sha256")], pa.string()),
        "registered_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
    })


def register_run(root: str | Path, run_id: str, *, model: str, revision: str, dataset: str, fingerprint: str,
                 config: dict | str, kind: str, model_facts: dict | None = None,
                 rejected: Iterable[tuple[str, Iterable[ErrorLike], Iterable[str] | None]] = ()) -> None:
    """Commit a run's row, its model's row and the records it rejected before any work, in one transaction.
    ``rejected``: (stage, errors, their result keys or None) per stage (load, prepare)."""
    run_row = pa.table({
        "run_id": [run_id], "model": [model], "model_revision": [revision], "dataset": [str(dataset)],
        "dataset_fingerprint": [fingerprint],
        "config_json": [config if isinstance(config, str) else json.dumps(config, sort_keys=True)],
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "code_version": [code_version()], "schema_version": pa.array([SCHEMA_VERSION], pa.int32()),
        "kind": [kind],
    })
    errors = [t for t in (errors_table(run_id, errs, stage, keys) for stage, errs, keys in rejected) if t.num_rows]
    commit_batch(root, {"runs": run_row, "errors": pa.concat_tables(errors) if errors else None,
                        "models": models_table(model_facts) if model_facts else None}, kind="meta")
