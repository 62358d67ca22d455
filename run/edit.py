"""An editing run (``blens edit``, ``blens sweep``): its plan and its batch step.

The plan is the only place an :class:`~blens.edit.spec.EditConfig` is read: records are read once, every
(record, spec) result key is computed once and looked up in the warehouse once, and the config becomes an
:class:`EditJob` of plain values. Each edit inside a batch is applied to the loaded weights and undone
bit-exactly before the next (``blens.edit.editor``); the batch's rows and error rows go to the run's
``Committer`` as one commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa

from blens.edit.job import (choose_defaults, edit_key, edit_records, edit_settings, results_table, rome_statistics,
                            stats_source)
from blens.edit.spec import EditConfig, EditSpec, check_layer
from blens.extract.identity import run_id_for
from blens.extract.models import LoadedModel, cached_model, model_facts
from blens.extract.records import EditRecord
from blens.lifecycle.signals import termination_kept
from blens.store.reads import edit_summary_rows, existing_results

from .commit import Committer, Registration
from .progress import emit
from .source import read_source


@dataclass(frozen=True)
class EditJob:
    """What every batch of an editing run needs, as values."""

    run_id: str
    model: str
    device: str
    warehouse: str
    specs: tuple[EditSpec, ...]
    fluency_tokens: int
    stats_source: str | None  # ROME's key-statistics records (None: no spec is ROME)
    stats_limit: int
    batch_size: int
    kind: str  # edit, sweep
    min_efficacy: float
    keys: dict[tuple[int, str, int, float], str]  # (case_id, method label, layer, lr) -> result key


@dataclass
class EditPlan:
    job: EditJob
    records: list[EditRecord]  # those with at least one spec not yet in the warehouse
    registration: Registration
    n_load_errors: int
    n_skipped_done: int = 0

    @property
    def run_id(self) -> str:
        return self.job.run_id

    def batches(self) -> list[list[EditRecord]]:
        n = self.job.batch_size
        return [self.records[i: i + n] for i in range(0, len(self.records), n)]


@dataclass
class EditBatchResult:
    n_cases: int
    n_rows: int
    n_errors: int
    seconds: float


@dataclass
class EditSummary:
    run_id: str
    n_records: int
    n_load_errors: int
    n_rows: int
    n_errors: int
    seconds: float
    defaults: dict = field(default_factory=dict)  # sweep only: method -> chosen config

    @property
    def rate(self) -> float:
        return self.n_records / self.seconds if self.seconds else 0.0


def plan_edit(cfg: EditConfig, lm: LoadedModel | None = None) -> EditPlan:
    """Read the records, fix the run's identity and every result key, and skip records whose every spec is
    stored. Writes nothing: the flow commits the registration (run row, model row, records rejected on load)."""
    loaded = read_source(cfg.data, cfg.limit)
    lm = lm or cached_model(cfg.model, cfg.device)
    facts = model_facts(lm)
    for spec in cfg.specs:
        check_layer(lm.view, spec.layer)
    settings = edit_settings(cfg)
    keys = {(r.case_id, s.label, s.layer, s.lr): edit_key(lm, r, s, cfg) for r in loaded.records for s in cfg.specs}
    rome_stats = stats_source(cfg) if any(s.method == "rome" for s in cfg.specs) else None
    run_id = run_id_for(lm.name, lm.revision, loaded.fingerprint, settings)

    stored = existing_results(cfg.warehouse, list(keys.values()), table="edit_results")

    todo = [r for r in loaded.records if any(keys[(r.case_id, s.label, s.layer, s.lr)] not in stored
                                             for s in cfg.specs)]
    job = EditJob(run_id=run_id, model=cfg.model, device=cfg.device, warehouse=cfg.warehouse, specs=tuple(cfg.specs),
                  fluency_tokens=cfg.fluency_tokens, stats_source=rome_stats, stats_limit=cfg.stats_limit,
                  batch_size=cfg.batch_size, kind=cfg.kind, min_efficacy=cfg.min_efficacy, keys=keys)
    registration = Registration(run_id=run_id, model=lm.name, revision=lm.revision, dataset=cfg.data,
                                fingerprint=loaded.fingerprint, config={"data": cfg.data, "limit": cfg.limit, **settings},
                                kind=cfg.kind, model_facts=facts, rejected=(("load", tuple(loaded.errors), None),))
    return EditPlan(job=job, records=todo, registration=registration, n_load_errors=len(loaded.errors),
                    n_skipped_done=len(loaded.records) - len(todo))


def edit_batch(job: EditJob, records: list[EditRecord], commit: Committer, lm: LoadedModel | None = None
               ) -> EditBatchResult:
    """Edit and score a batch of records under every spec; their rows and error rows are one commit."""
    t0 = time.perf_counter()
    lm = lm or cached_model(job.model, job.device)
    stats = rome_statistics(lm, job.stats_source, job.stats_limit) if job.stats_source else None
    rows, errors = edit_records(lm, records, job.specs, fluency_tokens=job.fluency_tokens, rome_stats=stats)
    row_keys = [job.keys[(r["case_id"], r["method"], r["layer"], r["lr"])] for r in rows]
    table = results_table(rows, job.run_id, lm.name).add_column(0, "key", pa.array(row_keys, pa.string()))
    errs = commit.error_rows(errors, "edit")
    commit.results(lambda: {"edit_results": table, "errors": errs}, kind="edit")
    return EditBatchResult(n_cases=len(records), n_rows=len(rows), n_errors=len(errors),
                           seconds=time.perf_counter() - t0)


Schedule = Callable[[EditJob, list[list[EditRecord]], Committer],
                    Iterator[tuple[list[EditRecord], Callable[[], EditBatchResult]]]]


def _kept(call: Callable[[], EditBatchResult]) -> EditBatchResult:
    with termination_kept():  # a signal landing in a DuckDB query ends the run (blens.lifecycle.signals)
        return call()


def in_process(job: EditJob, batches: list[list[EditRecord]], commit: Committer
               ) -> Iterator[tuple[list[EditRecord], Callable[[], EditBatchResult]]]:
    """Every batch in this process, one after another (no Prefect)."""
    for batch in batches:
        yield batch, lambda batch=batch: _kept(lambda: edit_batch(job, batch, commit))


def run_in_process(cfg: EditConfig) -> EditSummary:
    """The whole run in this process without Prefect (``blens edit`` / ``sweep`` unless Prefect is asked for,
    :func:`blens.lifecycle.prefect.wants_prefect`): the flow's run layer without the API server's start-up."""
    t0 = time.perf_counter()
    with termination_kept():
        plan = plan_edit(cfg)
    return execute(plan, in_process, started=t0)


def execute(plan: EditPlan, schedule: Schedule = in_process, *, started: float | None = None) -> EditSummary:
    """Run a plan: register the run, then every batch as ``schedule`` runs it, reporting progress, through the
    run's :class:`Committer`. A sweep (``kind == 'sweep'``) then picks the default config per method."""
    t0 = time.perf_counter() if started is None else started
    with Committer(plan.job.warehouse, plan.run_id) as commit:
        commit.register(plan.registration)
        emit("plan", plan, len(plan.records))
        results = []
        for batch, get in schedule(plan.job, plan.batches(), commit):
            results.append(get())
            emit("batch", results[-1], len(batch))
    summary = EditSummary(run_id=plan.run_id, n_records=len(plan.records), n_load_errors=plan.n_load_errors,
                          n_rows=sum(r.n_rows for r in results), n_errors=sum(r.n_errors for r in results),
                          seconds=time.perf_counter() - t0)
    if plan.job.kind == "sweep":
        summary.defaults = sweep_defaults(plan.job)
    return summary


def sweep_defaults(job: EditJob) -> dict[str, dict]:
    """A finished sweep's default config per method (``blens.edit.job.choose_defaults`` over its summary)."""
    return choose_defaults(edit_summary_rows(job.warehouse, job.run_id), min_efficacy=job.min_efficacy)
