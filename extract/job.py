"""The extraction job as plain functions: plan a run, process one batch, summarise.

Prefect tasks in ``flows/extract_flow.py`` call exactly these; tests call them without Prefect.

A run's identity is (model + revision, dataset fingerprint, extraction settings), so rerunning the
same command on the same warehouse resumes: case_ids already committed under that run are skipped.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from store.schema import SCHEMA_VERSION
from store.writer import commit_batch, init_warehouse

from .config import ExtractConfig, run_id_for
from .lens import LogitLens
from .models import LoadedModel, cached_model
from .pipeline import extract_batch
from .prepare import PreparedPrompt, prepare
from .records import RecordError, load_records


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


def errors_table(run_id: str, errors: list[RecordError], stage: str) -> pa.Table:
    # Explicit types: an empty list would infer type null and break concat with a non-empty table.
    return pa.table({
        "run_id": pa.array([run_id] * len(errors), pa.string()),
        "case_id": pa.array([e.case_id for e in errors], pa.int64()),
        "stage": pa.array([stage] * len(errors), pa.string()),
        "field": pa.array([e.field for e in errors], pa.string()),
        "message": pa.array([e.message for e in errors], pa.string()),
        "source": pa.array([e.source for e in errors], pa.string()),
    })


@dataclass
class RunPlan:
    run_id: str
    model_name: str
    batches: list[list[PreparedPrompt]]
    n_records: int
    n_skipped_done: int
    errors: list[RecordError] = field(default_factory=list)

    @property
    def n_todo(self) -> int:
        return sum(len(b) for b in self.batches)


def in_shard(case_id: int, shard: tuple[int, int]) -> bool:
    i, n = shard
    return case_id % n == i


def done_case_ids(warehouse: str | Path, run_id: str) -> set[int]:
    """case_ids already committed under this run (resume)."""
    from queries import connect

    con = connect(warehouse)
    try:
        rows = con.execute("SELECT case_id FROM prompts WHERE run_id = ?", [run_id]).fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


def done_records(warehouse: str | Path, run_id: str) -> dict[int, tuple[str, str, str, str]]:
    """case_id -> (prompt, subject, target_new, target_true) of what is committed under this run."""
    from queries import connect

    con = connect(warehouse)
    try:
        rows = con.execute("SELECT case_id, prompt, subject, target_new, target_true FROM prompts WHERE run_id = ?",
                           [run_id]).fetchall()
    finally:
        con.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def token_budget_batches(prompts: list[PreparedPrompt], batch_size: int,
                         batch_tokens: int) -> list[list[PreparedPrompt]]:
    """Cut length-sorted prompts into batches of at most ``batch_size`` prompts and ``batch_tokens`` padded
    tokens (prompts x longest prompt); a prompt longer than the budget runs alone.

    Why a token budget and not only a prompt count: a batch's memory (activations kept for the backward
    pass, the captured x_i and delta_i, lens blocks) grows with its padded token count. Runs are sorted by
    length, so with a prompt count alone the longest prompts of a large run (the tail of the length
    distribution, absent from a small run) form its largest batches, and peak RSS grows with the size of the
    run. With the budget, the largest batch, and so the peak, is set by ``batch_tokens`` whatever the run size.
    """
    batches: list[list[PreparedPrompt]] = []
    current: list[PreparedPrompt] = []
    width = 0
    for p in prompts:
        new_width = max(width, p.n_tokens)
        if current and (len(current) >= batch_size or (len(current) + 1) * new_width > batch_tokens):
            batches.append(current)
            current, new_width = [], p.n_tokens
        current.append(p)
        width = new_width
    if current:
        batches.append(current)
    return batches


def plan_run(cfg: ExtractConfig, lm: LoadedModel, *, force: bool = False, incremental: bool = False) -> RunPlan:
    """Load and validate records, tokenize, skip finished ones, and write the run row + load errors.

    ``incremental`` (scheduled runs over a growing file): the run identity uses the dataset *source*
    (``cfg.data``) instead of its content fingerprint, so the grown file keeps its run id; a record is
    skipped when the same case_id with the same prompt/subject/targets is already committed, so only
    new (or edited: latest commit wins) records are extracted.
    """
    root = init_warehouse(cfg.warehouse)
    loaded = load_records(cfg.data, limit=cfg.limit)
    dataset_key = f"incremental:{cfg.data}" if incremental else loaded.fingerprint
    run_id = run_id_for(lm.name, lm.revision, dataset_key, cfg.identity_settings())
    shard = cfg.shard_index()
    records = [r for r in loaded.records if in_shard(r.case_id, shard)]
    load_errors = [e for e in loaded.errors if e.case_id is None or in_shard(e.case_id, shard)]
    if force:
        done = set()
    elif incremental:
        seen = done_records(root, run_id)
        done = {r.case_id for r in records
                if seen.get(r.case_id) == (r.prompt, r.subject, r.target_new, r.target_true)}
    else:
        done = done_case_ids(root, run_id)
    max_tokens = lm.view.max_positions
    prepared: list[PreparedPrompt] = []
    prep_errors: list[RecordError] = []
    for rec in records:
        if rec.case_id in done:
            continue
        p = prepare(rec, lm.tokenizer, max_tokens)
        (prep_errors if isinstance(p, RecordError) else prepared).append(p)
    prepared.sort(key=lambda p: (p.n_tokens, p.record.case_id))  # length-sorted: little padding
    batches = token_budget_batches(prepared, cfg.batch_size, cfg.batch_tokens)

    run_row = pa.table({
        "run_id": [run_id], "model": [lm.name], "model_revision": [lm.revision], "dataset": [str(cfg.data)],
        "dataset_fingerprint": [loaded.fingerprint], "config_json": [cfg.model_dump_json()],
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "code_version": [code_version()], "schema_version": pa.array([SCHEMA_VERSION], pa.int32()),
        "kind": ["extract"],
    })
    commit_batch(root, run_id, {
        "runs": run_row,
        "errors": pa.concat_tables([errors_table(run_id, load_errors, "load"),
                                    errors_table(run_id, prep_errors, "prepare")]),
    })
    return RunPlan(run_id=run_id, model_name=lm.name, batches=batches, n_records=len(records),
                   n_skipped_done=len(done & {r.case_id for r in records}), errors=load_errors + prep_errors)


@dataclass
class BatchResult:
    n_prompts: int
    n_failed: int
    seconds: float


def make_lens(lm: LoadedModel, dtype: str) -> LogitLens:
    """The model's logit lens, built once per (model, dtype): packing the unembedding for oneDNN costs
    ~0.1 s and 113 MB, which is not a per-batch expense."""
    cache = lm.__dict__.setdefault("_lenses", {})
    if dtype not in cache:
        head = lm.model.get_submodule(lm.view.family.unembedding)
        cache[dtype] = LogitLens(lm.view.final_norm, lm.view.unembedding, getattr(head, "bias", None), dtype=dtype)
    return cache[dtype]


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after a batch.

    Batches allocate many mid-sized buffers whose sizes change with prompt length (length-sorted runs
    grow them steadily); glibc keeps such freed chunks in its heap, so without this the RSS of a long run
    creeps up with the number of prompts instead of staying at the size of one batch.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def process_batch(cfg: ExtractConfig, run_id: str, prompts: list[PreparedPrompt], lm: LoadedModel | None = None,
                  lens: LogitLens | None = None) -> BatchResult:
    """Extract one batch and commit it. If the batch fails as a whole, retry prompt by prompt so one
    bad prompt lands in ``errors`` instead of sinking its neighbours."""
    t0 = time.perf_counter()
    lm = lm or cached_model(cfg.model, cfg.device)
    lens = lens or make_lens(lm, cfg.lens_dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        tables = extract_batch(lm, prompts, run_id, top_k=cfg.top_k, vectors=cfg.vectors, lens=lens)
        commit_batch(cfg.warehouse, run_id, tables, n_prompts=len(prompts))
        del tables
        _release_freed_memory()
        return BatchResult(len(prompts), 0, time.perf_counter() - t0)
    except (RuntimeError, ValueError, IndexError) as exc:
        if len(prompts) == 1:
            err = RecordError(case_id=prompts[0].record.case_id, field="prompt",
                              message=f"extraction failed: {type(exc).__name__}: {str(exc)[:300]}",
                              source=prompts[0].record.source)
            commit_batch(cfg.warehouse, run_id, {"errors": errors_table(run_id, [err], "extract")})
            return BatchResult(0, 1, time.perf_counter() - t0)
    done = failed = 0
    for p in prompts:
        r = process_batch(cfg, run_id, [p], lm, lens)
        done, failed = done + r.n_prompts, failed + r.n_failed
    return BatchResult(done, failed, time.perf_counter() - t0)
