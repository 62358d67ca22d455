"""Editing as pure functions: edit and score records, build ``edit_results`` rows, name each result, and
choose a sweep's defaults from its summary rows.

The run layer (``blens.run.edit``) plans a run with these and commits what they return; nothing here reads or
writes the warehouse.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa

from blens.extract.identity import result_key
from blens.extract.models import LoadedModel
from blens.extract.records import EditRecord, RecordError
from blens.extract.sources import load_records

from .cases import prepare_case
from .editor import Editor
from .metrics import METRIC_COLUMNS
from .rome import ROME_DEFAULTS, KeyStatistics, RomeHparams, stats_texts
from .spec import MATRIX, TRAIN_FILE, EditConfig, EditSpec, check_layer


def edit_records(lm: LoadedModel, records: Sequence[EditRecord], specs: Sequence[EditSpec],
                 progress: Callable[[int], None] | None = None, *, fluency_tokens: int = 0,
                 rome_stats: KeyStatistics | None = None,
                 rome_hparams: RomeHparams = ROME_DEFAULTS) -> tuple[list[dict], list[RecordError]]:
    """Run every spec on every record; returns (result rows, error rows). ``progress(n)`` after each case."""
    editor = Editor(lm, fluency_tokens=fluency_tokens, rome_stats=rome_stats, rome_hparams=rome_hparams)
    for spec in specs:
        check_layer(editor.view, spec.layer)
    max_tokens = editor.view.max_positions
    rows: list[dict] = []
    errors: list[RecordError] = []
    for record in records:
        case = prepare_case(record, lm.tokenizer, max_tokens)
        if isinstance(case, RecordError):
            rows.extend(editor._row(record, spec, error=f"{case.field}: {case.message}") for spec in specs)
            errors.append(case)
        else:
            case_rows = editor.run_case(case, specs)
            rows.extend(case_rows)
            errors.extend(RecordError(record.case_id, f"{r['method']}@{r['layer']}", r["error"], record.source)
                          for r in case_rows if r["error"])
        if progress is not None:
            progress(1)
    return rows, errors


def results_table(rows: Sequence[dict], run_id: str, model: str) -> pa.Table:
    """edit_results rows (without batch_id; commit_batch adds it)."""
    f32 = pa.float32()
    cols = {
        "run_id": pa.array([run_id] * len(rows), pa.string()),
        "case_id": pa.array([r["case_id"] for r in rows], pa.int64()),
        "model": pa.array([model] * len(rows), pa.string()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
        "layer": pa.array([r["layer"] for r in rows], pa.int32()),
        "lr": pa.array([r["lr"] for r in rows], f32),
    }
    def floats(c: str) -> pa.Array:
        vals = [r.get(c) for r in rows]
        return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vals], f32)

    for c in (*METRIC_COLUMNS, "update_grad_cosine", "update_norm"):
        cols[c] = floats(c)
    cols["error"] = pa.array([r["error"] for r in rows], pa.string())
    cols["converged"] = pa.array([r.get("converged") for r in rows], pa.bool_())
    cols["fluency"] = floats("fluency")
    return pa.table(cols)


# v2 (issue 23): each method's own update_grad_cosine, converged, fluency; rows of v1 are not reused.
METRICS_VERSION = "top1_last_position+rome_prob_tests+v2_own_cosine_converged_fluency"


def stats_source(cfg: EditConfig) -> str:
    """The records whose text estimates ROME's C: ``cfg.stats_data``, else the train split beside the
    edited data (never held-out text when it is there), else the edited data itself."""
    if cfg.stats_data:
        return cfg.stats_data
    sibling = Path(cfg.data).parent / TRAIN_FILE
    return str(sibling) if sibling.exists() else cfg.data


def rome_statistics(lm: LoadedModel, source: str, limit: int) -> KeyStatistics:
    """ROME's key statistics for a run: the text of the first ``limit`` records of ``source``
    (:func:`stats_source`)."""
    loaded = load_records(source, limit=limit)
    return KeyStatistics(lm, stats_texts(loaded.records), description=f"{Path(source).name}[:{limit}]")


def spec_identity(spec: EditSpec, cfg: EditConfig | None = None) -> dict:
    """What besides the record changes an edit's row."""
    out = {"edit": spec.as_dict(), "matrix": MATRIX, "metrics": METRICS_VERSION,
           "fluency_tokens": cfg.fluency_tokens if cfg is not None else 0}
    if spec.method == "rome":
        out["rome"] = ROME_DEFAULTS.as_dict()
        if cfg is not None:
            out["rome_stats"] = {"source": Path(stats_source(cfg)).name, "limit": cfg.stats_limit}
    return out


def edit_settings(cfg: EditConfig) -> dict:
    """What changes an editing run's rows (its identity besides model and data)."""
    out = {"kind": cfg.kind, "matrix": MATRIX, "specs": [s.as_dict() for s in cfg.specs],
           "metrics": METRICS_VERSION, "loss": "nll_first_target_token_last_position",
           "fluency_tokens": cfg.fluency_tokens}
    if any(s.method == "rome" for s in cfg.specs):
        out["rome"] = ROME_DEFAULTS.as_dict()
        out["rome_stats"] = {"source": Path(stats_source(cfg)).name, "limit": cfg.stats_limit}
    return out


def edit_key(lm: LoadedModel, record: EditRecord, spec: EditSpec, cfg: EditConfig | None = None) -> str:
    """An edit result's identity: model, record content and the spec (a rerun skips what is stored)."""
    return result_key(lm.name, lm.revision, spec_identity(spec, cfg), record)


def choose_defaults(summary_rows: Sequence[tuple], *, min_efficacy: float = 0.95) -> dict[str, dict]:
    """Per method label, the sweep config to use by default. ``summary_rows``: a sweep's
    (method, layer, lr, n, efficacy, generalization, locality, locality_unchanged) per config (the
    ``edit_summary`` view, ``blens.store.reads.edit_summary_rows``).

    Rule (the efficacy-vs-locality trade-off): among configs whose efficacy >= ``min_efficacy``, the one
    that leaves the most neighbourhood predictions unchanged (locality_unchanged; ties: efficacy, then
    generalization); if no config reaches ``min_efficacy``, the most efficacious one (ties: the same).
    Generalization is not rewarded on its own: an edit that makes the model say the target everywhere
    scores 100% paraphrase and 0% locality.
    """
    best: dict[str, dict] = {}
    for method, layer, lr, n, eff, gen, loc, unch in summary_rows:
        ok = eff >= min_efficacy
        key = (ok, (unch or 0.0) if ok else eff, eff if ok else (unch or 0.0), gen or 0.0)
        cand = {"method": method, "layer": layer, "lr": lr, "n": n, "efficacy": eff, "generalization": gen,
                "locality": loc, "locality_unchanged": unch, "_key": key}
        if method not in best or key > best[method]["_key"]:
            best[method] = cand
    for v in best.values():
        v.pop("_key")
    return best
