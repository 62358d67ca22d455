"""The extraction job as plain functions: plan a run, process one batch.

Prefect tasks in ``blens.flows.extract_flow`` call exactly these; tests call them without Prefect.

Results are identified by content (``identity.py``): a record whose result is already in the warehouse
is skipped whatever run, file or shard put it there, so rerunning a command resumes it, and a grown
file only costs its new records. Runs are provenance: (model + revision, dataset fingerprint, settings).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from blens.store.reads import existing_results
from blens.store.runs import errors_table, register_run, run_id_for
from blens.store.writer import commit_batch, init_warehouse

from .config import ExtractConfig
from .failures import describe, is_record_failure
from .identity import result_key, result_slot
from .lens import LogitLens
from .models import LoadedModel, cached_model, model_facts
from .batching import batch_limits, token_budget_batches
from .overlap import BackgroundWriter
from .prepare import PreparedPrompt, prepare
from .records import RecordError
from .resume import in_shard, needs_work, overlap_notes
from .sources import load_records
from .tables import build_tables, compute_batch, extract_batch


@dataclass
class RunPlan:
    run_id: str
    model_name: str
    batches: list[list[PreparedPrompt]]
    n_records: int
    n_skipped_done: int
    errors: list[RecordError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should hear before the run starts
    device: str = "cpu"  # where the model runs (``--device auto`` resolved)
    overlap: bool = False  # commit batch k while the device computes batch k+1 (see background_commits)

    @property
    def n_todo(self) -> int:
        return sum(len(b) for b in self.batches)


def _identity(cfg: ExtractConfig, lm: LoadedModel, record) -> tuple[str, str]:
    settings = cfg.result_settings(lm.view.lens_sites)
    return (result_key(lm.name, lm.revision, settings, record),
            result_slot(lm.name, lm.revision, settings, record.case_id))


def plan_run(cfg: ExtractConfig, lm: LoadedModel) -> RunPlan:
    """Load and validate records, tokenize, skip results already in the warehouse, and register the run
    with its rejected records."""
    root = init_warehouse(cfg.warehouse)
    loaded = load_records(cfg.data, limit=cfg.limit)
    run_id = run_id_for(lm.name, lm.revision, loaded.fingerprint, {**cfg.result_settings(lm.view.lens_sites), "vectors": cfg.vectors})
    shard = cfg.shard_index()
    records = [r for r in loaded.records if in_shard(r.case_id, shard)]
    load_errors = [e for e in loaded.errors if e.case_id is None or in_shard(e.case_id, shard)]
    keys = {r.case_id: _identity(cfg, lm, r)[0] for r in records}
    stored = existing_results(root, list(keys.values()))
    todo = [r for r in records if needs_work(cfg, stored, keys[r.case_id])]
    max_tokens = lm.view.max_positions
    prepared: list[PreparedPrompt] = []
    prep_errors: list[RecordError] = []
    for rec in todo:
        p = prepare(rec, lm.tokenizer, max_tokens, cfg.max_prompt_tokens)
        (prep_errors if isinstance(p, RecordError) else prepared).append(p)
    prepared.sort(key=lambda p: (p.n_tokens, p.record.case_id))  # length-sorted: little padding
    batches = token_budget_batches(prepared, *batch_limits(lm, cfg.batch_size, cfg.batch_tokens))
    register_run(root, run_id, model=lm.name, revision=lm.revision, dataset=cfg.data, fingerprint=loaded.fingerprint,
                 config=cfg.model_dump_json(), kind="extract", model_facts=model_facts(lm),
                 errors=[errors_table(run_id, load_errors, "load"),
                         errors_table(run_id, prep_errors, "prepare", [keys[e.case_id] for e in prep_errors])])
    return RunPlan(run_id=run_id, model_name=lm.name, batches=batches, n_records=len(records),
                   n_skipped_done=len(records) - len(todo), errors=load_errors + prep_errors,
                   notes=overlap_notes(cfg, root, run_id, [keys[c] for c in keys.keys() - {r.case_id for r in todo}]),
                   device=str(lm.device),
                   overlap=cfg.overlap if cfg.overlap is not None else lm.device.type == "cuda")


@dataclass
class BatchResult:
    n_prompts: int
    n_failed: int
    seconds: float


def make_lens(lm: LoadedModel) -> LogitLens:
    """The model's logit lens, built once per model: packing the unembedding is not a per-batch expense (it
    copies the whole (V, d) matrix)."""
    if "_lens" not in lm.__dict__:
        lm.__dict__["_lens"] = LogitLens.of(lm.view)
    return lm.__dict__["_lens"]


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


COMMIT_RETRIES, COMMIT_RETRY_DELAY_S = 2, 1.0  # as the batch task's retries in blens.flows.extract_flow

# The background committer of each run in flight in this process (see background_commits).
_COMMITTERS: dict[str, BackgroundWriter] = {}


@contextmanager
def background_commits(run_id: str, enabled: bool) -> Iterator[None]:
    """While open, :func:`process_batch` of ``run_id`` computes on the device and hands the host stage
    (Arrow tables, the warehouse commit) to one background thread, so batch k is committed while the
    device computes batch k+1 (``blens.extract.overlap``, depth 1: at most two batches in host memory).

    Why a context and not a per-batch choice: the run owns the ordering guarantee. Commits run in
    submission order on one thread (error rows too, so a run never commits from two threads); the first
    commit that fails is raised by the next batch or on leaving the context, and nothing after it is
    committed. On leaving, every queued commit is finished, so when the flow returns the warehouse holds
    every batch it reported. Disabled, this is a no-op and batches commit in the caller's thread.
    """
    if not enabled:
        yield
        return
    writer = BackgroundWriter(depth=1, name=f"blens-commit-{run_id[:8]}")
    _COMMITTERS[run_id] = writer
    try:
        with writer:
            yield
    finally:
        _COMMITTERS.pop(run_id, None)


def _commit(cfg: ExtractConfig, run_id: str, make_tables, kind: str, replace: set[str] | None = None) -> None:
    """Commit ``make_tables()`` now, or queue it on the run's background committer when one is open."""
    def job() -> None:
        tables = make_tables()
        commit_batch(cfg.warehouse, tables, kind=kind, replace=replace or set())  # "meta" commits pass None
        del tables
        _release_freed_memory()

    writer = _COMMITTERS.get(run_id)
    if writer is None:
        job()  # a failure here is retried by the batch task (Prefect's retries)
    else:
        writer.submit(lambda: _with_retries(job))  # raises an earlier commit's failure: the run stops there


def _with_retries(job) -> None:
    """A background commit gets the retries a batch task gets from Prefect (a transient I/O error, a lock):
    it runs outside any task, so nothing else would retry it."""
    for attempt in range(COMMIT_RETRIES + 1):
        try:
            return job()
        except Exception:  # noqa: BLE001 - re-raised after the last attempt
            if attempt == COMMIT_RETRIES:
                raise
            time.sleep(COMMIT_RETRY_DELAY_S)


def process_batch(cfg: ExtractConfig, run_id: str, prompts: list[PreparedPrompt], lm: LoadedModel | None = None,
                  lens: LogitLens | None = None) -> BatchResult:
    """Extract one batch and commit it. If the batch fails as a whole, retry prompt by prompt so one
    bad prompt lands in ``errors`` instead of sinking its neighbours.

    Inside :func:`background_commits` only the device stage runs here and the commit is queued; a failure
    while building or committing then stops the run (it is not blamed on a record)."""
    t0 = time.perf_counter()
    lm = lm or cached_model(cfg.model, cfg.device)
    lens = lens or make_lens(lm)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    identity = [_identity(cfg, lm, p.record) for p in prompts]
    settings = cfg.result_settings(lm.view.lens_sites)
    stored = existing_results(cfg.warehouse, [k for k, _ in identity])
    todo = [(p, ident) for p, ident in zip(prompts, identity) if needs_work(cfg, stored, ident[0])]
    if not todo:  # another writer (a racing shard) committed them meanwhile
        return BatchResult(0, 0, time.perf_counter() - t0)
    prompts, identity = [p for p, _ in todo], [i for _, i in todo]
    replace = {k for k, _ in identity if k in stored}
    background = run_id in _COMMITTERS
    try:
        if background:
            host = compute_batch(lm, prompts, top_k=cfg.top_k, vectors=cfg.vectors, lens=lens, identity=identity,
                                 settings=settings)
        else:
            _commit(cfg, run_id, lambda: extract_batch(lm, prompts, run_id, top_k=cfg.top_k, vectors=cfg.vectors,
                                                       lens=lens, identity=identity, settings=settings),
                    "extract", replace)
    except Exception as exc:  # noqa: BLE001 - the policy decides what one record may cost
        if not is_record_failure(exc):
            raise
        if len(prompts) == 1:
            p = prompts[0]
            err = RecordError(case_id=p.record.case_id, field="prompt", message=f"extraction failed: {describe(exc)}",
                              source=p.record.source)
            _commit(cfg, run_id, lambda: {"errors": errors_table(run_id, [err], "extract", [identity[0][0]])}, "meta")
            return BatchResult(0, 1, time.perf_counter() - t0)
    else:
        if background:  # outside the try: an earlier commit's failure is the run's, not this batch's
            _commit(cfg, run_id, lambda: build_tables(lm, host, run_id, top_k=cfg.top_k, vectors=cfg.vectors),
                    "extract", replace)
        return BatchResult(len(prompts), 0, time.perf_counter() - t0)
    done = failed = 0
    for p in prompts:
        r = process_batch(cfg, run_id, [p], lm, lens)
        done, failed = done + r.n_prompts, failed + r.n_failed
    return BatchResult(done, failed, time.perf_counter() - t0)
