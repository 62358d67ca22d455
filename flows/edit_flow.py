"""`blens edit` and `blens sweep` as Prefect flows: one task plans the run, one task per batch of edits.

Thin on purpose: every task calls a plain function from ``blens.edit.job`` and the flows take one
``EditConfig``. Tasks get the model from :func:`blens.extract.models.cached_model` (one copy per
worker process), with caching off, so Prefect never hashes or pickles the weights. Each edit inside a
batch is applied to the loaded weights and undone bit-exactly before the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from blens.edit.job import EditBatchResult, EditPlan, choose_defaults, plan_edit_run, process_edit_batch
from blens.edit.spec import EditConfig
from blens.extract.models import cached_model
from blens.extract.records import EditRecord

from blens.lifecycle import prefect as prefect_env
from blens.lifecycle.signals import termination_kept

from .progress import emit

# The ephemeral Prefect API server dies with this process, even on kill -9; SIGTERM ends a run quietly.
prefect_env.prepare_process()


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


# termination_kept: a signal that lands in a DuckDB query ends the run (see blens.lifecycle.signals).
@task(name="plan-edit-run", cache_policy=NO_CACHE)
def plan_edit_task(cfg: EditConfig) -> EditPlan:
    with termination_kept():
        return plan_edit_run(cfg, cached_model(cfg.model, cfg.device))


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch_task(cfg: EditConfig, run_id: str, records: list[EditRecord]) -> EditBatchResult:
    with termination_kept():
        return process_edit_batch(cfg, cached_model(cfg.model, cfg.device), run_id, records)


@flow(name="blens-edit", log_prints=False)
def edit_flow(cfg: EditConfig) -> EditSummary:
    """Apply every spec to every record, one edit at a time; rows land in ``edit_results``. A sweep
    (``cfg.kind == 'sweep'``) then picks the default config per method (see ``choose_defaults``)."""
    t0 = time.perf_counter()
    plan = plan_edit_task(cfg)
    emit("plan", plan, len(plan.records))
    n_rows = n_errors = 0
    for i in range(0, len(plan.records), cfg.batch_size):
        batch = plan.records[i: i + cfg.batch_size]
        res = edit_batch_task(cfg, plan.run_id, batch)
        n_rows, n_errors = n_rows + res.n_rows, n_errors + res.n_errors
        emit("batch", res, len(batch))
    summary = EditSummary(run_id=plan.run_id, n_records=len(plan.records), n_load_errors=plan.n_load_errors,
                          n_rows=n_rows, n_errors=n_errors, seconds=time.perf_counter() - t0)
    if cfg.kind == "sweep":
        summary.defaults = choose_defaults(cfg.warehouse, summary.run_id, min_efficacy=cfg.min_efficacy)
    return summary
