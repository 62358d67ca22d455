"""An extraction run: its plan (records, keys, stored results, batches) and its batch step.

Results are identified by content (``blens.extract.identity``): a record whose result is already in the
warehouse is skipped whatever run, file or shard put it there, so rerunning a command resumes it, and a grown
file only costs its new records. Runs are provenance: (model + revision, dataset fingerprint, settings).

The plan is the only place an :class:`~blens.extract.config.ExtractConfig` is read: it becomes an
:class:`ExtractJob` of plain values, and batches of :class:`Item` (a prompt with its key), which is all the
batch step and the commit phase get.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from blens.extract.batching import batch_limits, token_budget_batches
from blens.extract.config import ExtractConfig
from blens.extract.failures import describe, is_record_failure
from blens.extract.identity import result_identity, run_id_for
from blens.extract.lens import LogitLens, lens_for
from blens.extract.models import LoadedModel, cached_model, model_facts
from blens.extract.prepare import PreparedPrompt, prepare
from blens.extract.records import RecordError
from blens.extract.tables import build_tables, compute_batch
from blens.lifecycle.signals import termination_kept
from blens.store.reads import results_held

from .commit import Committer, Registration
from .progress import emit
from .resume import ExtractSummary, what_is_left  # noqa: F401 - ExtractSummary: the run's result
from .source import read_source


@dataclass(frozen=True)
class ExtractJob:
    """What every batch of a run needs, as values (the flow's config stops at the plan)."""

    run_id: str
    model: str  # the name a worker process loads (``cached_model(model, device)``)
    device: str  # as asked ("auto" included): a Dask worker resolves it on its own machine
    warehouse: str
    top_k: int
    vectors: str
    settings: dict  # the result settings, part of every key (``ExtractConfig.result_settings``)
    threads: int | None = None


@dataclass(frozen=True)
class Item:
    """One prompt to extract, with its identity, computed once by the plan."""

    prompt: PreparedPrompt
    key: str
    slot: str
    replace: bool = False  # stored rows of this key are replaced (--force, more vectors than stored)


@dataclass
class ExtractPlan:
    job: ExtractJob
    batches: list[list[Item]]
    registration: Registration
    n_records: int
    n_skipped_done: int
    errors: list[RecordError] = field(default_factory=list)  # rejected on load or when prepared
    notes: list[str] = field(default_factory=list)  # things the user should hear before the run starts
    device: str = "cpu"  # where the model runs (``--device auto`` resolved)
    overlap: bool = False  # commit batch k while the device computes batch k+1

    @property
    def run_id(self) -> str:
        return self.job.run_id

    @property
    def n_todo(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class BatchResult:
    n_prompts: int
    n_failed: int
    seconds: float


def plan_extract(cfg: ExtractConfig, lm: LoadedModel | None = None) -> ExtractPlan:
    """Read the records (once per process: ``source.read_source``), key every one, ask the warehouse once which
    keys it holds, tokenize what is left into length-sorted batches, and decide what registering the run writes.
    Writes nothing: the flow commits the registration through its :class:`Committer`."""
    loaded = read_source(cfg.data, cfg.limit)
    lm = lm or cached_model(cfg.model, cfg.device)
    facts = model_facts(lm)
    records = [r for r in loaded.records if cfg.in_shard(r.case_id)]
    load_errors = [e for e in loaded.errors if e.case_id is None or cfg.in_shard(e.case_id)]
    settings = cfg.result_settings(lm.view.lens_sites)
    run_id = run_id_for(lm.name, lm.revision, loaded.fingerprint, {**settings, "vectors": cfg.vectors})
    identity = {r.case_id: result_identity(lm.name, lm.revision, settings, r) for r in records}
    keys = {c: key for c, (key, _) in identity.items()}
    held = results_held(cfg.warehouse, list(keys.values()))
    todo, notes = what_is_left(cfg, run_id, keys, held)

    prepared: list[PreparedPrompt] = []
    prep_errors: list[RecordError] = []
    for rec in records:
        if rec.case_id in todo:
            p = prepare(rec, lm.tokenizer, lm.view.max_positions, cfg.max_prompt_tokens)
            (prep_errors if isinstance(p, RecordError) else prepared).append(p)
    prepared.sort(key=lambda p: (p.n_tokens, p.record.case_id))  # length-sorted: little padding
    items = {id(p): Item(p, *identity[p.record.case_id], replace=keys[p.record.case_id] in held) for p in prepared}
    batches = [[items[id(p)] for p in batch]
               for batch in token_budget_batches(prepared, *batch_limits(lm, cfg.batch_size, cfg.batch_tokens))]

    job = ExtractJob(run_id=run_id, model=cfg.model, device=cfg.device, warehouse=cfg.warehouse, top_k=cfg.top_k,
                     vectors=cfg.vectors, settings=settings, threads=cfg.threads)
    registration = Registration(
        run_id=run_id, model=lm.name, revision=lm.revision, dataset=cfg.data, fingerprint=loaded.fingerprint,
        config=cfg.model_dump_json(), kind="extract", model_facts=facts,
        rejected=(("load", tuple(load_errors), None),
                  ("prepare", tuple(prep_errors), tuple(keys[e.case_id] for e in prep_errors))))
    return ExtractPlan(job=job, batches=batches, registration=registration, n_records=len(records),
                       n_skipped_done=len(records) - len(todo), errors=load_errors + prep_errors, notes=notes,
                       device=str(lm.device), overlap=cfg.overlap if cfg.overlap is not None else lm.device.type == "cuda")


def extract_items(job: ExtractJob, items: list[Item], commit: Committer, lm: LoadedModel | None = None,
                  lens: LogitLens | None = None) -> BatchResult:
    """Extract one batch and hand its tables to ``commit``. If the batch fails as a whole, retry prompt by prompt
    so one bad prompt lands in ``errors`` instead of sinking its neighbours.

    With a background committer only the device stage runs here and the Arrow building and the commit are
    queued; a failure there then stops the run (it is not blamed on a record). Keys already stored are skipped
    by the commit itself (exactly once per key, ``blens.store.writer``), so a racing writer costs at most a
    recomputation, never a duplicate."""
    t0 = time.perf_counter()
    lm = lm or cached_model(job.model, job.device)
    lens = lens or lens_for(lm)
    if job.threads:
        torch.set_num_threads(job.threads)
    prompts = [i.prompt for i in items]
    try:
        host = compute_batch(lm, prompts, top_k=job.top_k, vectors=job.vectors, lens=lens,
                             identity=[(i.key, i.slot) for i in items], settings=job.settings)
        if not commit.background:  # built here, so that a record's failure while building is still the record's
            tables = build_tables(lm, host, job.run_id, top_k=job.top_k, vectors=job.vectors)
    except Exception as exc:  # noqa: BLE001 - the policy decides what one record may cost
        if not is_record_failure(exc):
            raise
        if len(items) == 1:
            p = prompts[0]
            commit.errors([RecordError(case_id=p.record.case_id, field="prompt", source=p.record.source,
                                       message=f"extraction failed: {describe(exc)}")], "extract", [items[0].key])
            return BatchResult(0, 1, time.perf_counter() - t0)
        done = failed = 0
        for item in items:
            r = extract_items(job, [item], commit, lm, lens)
            done, failed = done + r.n_prompts, failed + r.n_failed
        return BatchResult(done, failed, time.perf_counter() - t0)
    replace = [i.key for i in items if i.replace]
    if commit.background:
        commit.results(lambda: build_tables(lm, host, job.run_id, top_k=job.top_k, vectors=job.vectors),
                       replace=replace)
    else:
        commit.results(lambda: tables, replace=replace)
    return BatchResult(len(items), 0, time.perf_counter() - t0)


# How a run's batches are run: given the job, the batches and the run's committer, yield each batch with a
# callable that returns its result (or raises its failure). The flow supplies Prefect tasks, in this process or
# on Dask workers; :func:`in_process` is the plain one.
Schedule = Callable[[ExtractJob, list[list[Item]], Committer], Iterator[tuple[list[Item], Callable[[], BatchResult]]]]


# A batch that fails as a whole is tried this many more times, this long apart: the flow's Prefect task and the
# plain run (:func:`in_process`) share the numbers.
BATCH_RETRIES = 2
RETRY_DELAY_S = 1.0


def retried(call: Callable[[], BatchResult], retries: int = BATCH_RETRIES, delay: float = RETRY_DELAY_S) -> BatchResult:
    """``call()``, tried again after a failure of the batch's own (what a Prefect task's ``retries`` does); an
    environmental failure (disk full, permissions) is raised at once, since trying again cannot help."""
    for attempt in range(retries + 1):
        try:
            with termination_kept():  # a signal landing in a DuckDB query ends the run, it is not retried
                return call()
        except Exception as exc:  # noqa: BLE001 - the same policy as the run loop's
            if attempt == retries or not is_record_failure(exc):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def in_process(job: ExtractJob, batches: list[list[Item]], commit: Committer
               ) -> Iterator[tuple[list[Item], Callable[[], BatchResult]]]:
    """Every batch in this process, one after another, with the task's retries (no Prefect)."""
    for batch in batches:
        yield batch, lambda batch=batch: retried(lambda: extract_items(job, batch, commit))


def run_in_process(cfg: ExtractConfig) -> ExtractSummary:
    """The whole run in this process without Prefect: plan, every batch in order, commit. What ``blens extract``
    does unless Prefect is asked for (:func:`blens.lifecycle.prefect.wants_prefect`): the same run layer as the
    flow, without the API server's start-up (~10 s of CPU and 225 MB for a process of its own)."""
    t0 = time.perf_counter()
    with termination_kept():
        plan = plan_extract(cfg)
    return execute(plan, in_process, started=t0)


def execute(plan: ExtractPlan, schedule: Schedule = in_process, *, fans_out: bool = False,
            started: float | None = None) -> ExtractSummary:
    """Run a plan: register the run, then every batch as ``schedule`` runs it, reporting progress; the run's
    :class:`Committer` is the only writer, and leaving waits for its last commit (raising the first that failed).

    A batch that failed for good (a task's retries spent) for a reason of its own becomes ``errors`` rows and the
    run goes on; an environmental failure (disk full, permissions, I/O) stops the run and records nothing
    (``blens.extract.failures``). On CUDA (``plan.overlap``) batch k is committed on a background thread while
    the device computes batch k+1; batches that ``fans_out`` to other processes commit there themselves."""
    t0 = time.perf_counter() if started is None else started
    with Committer(plan.job.warehouse, plan.run_id, background=plan.overlap and not fans_out) as commit:
        commit.register(plan.registration)
        emit("plan", plan, plan.n_todo)
        results = []
        for batch, get in schedule(plan.job, plan.batches, commit):
            try:
                results.append(get())
            except Exception as exc:  # noqa: BLE001 - retries are spent: the policy decides
                if not is_record_failure(exc):
                    raise
                msg = f"batch failed after retries: {describe(exc)}"
                commit.errors([RecordError(case_id=i.prompt.record.case_id, field="batch", message=msg,
                                           source=i.prompt.record.source) for i in batch], "extract",
                              [i.key for i in batch])
                results.append(BatchResult(0, len(batch), 0.0))
            emit("batch", results[-1], len(batch))
    return ExtractSummary(run_id=plan.run_id, n_records=plan.n_records, n_done_before=plan.n_skipped_done,
                          n_extracted=sum(r.n_prompts for r in results), n_failed=sum(r.n_failed for r in results),
                          n_skipped=len(plan.errors), seconds=time.perf_counter() - t0)
