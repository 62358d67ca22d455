"""`blens edit` and `blens sweep` as Prefect flows: one task plans the run, one task per batch of edits.

Thin on purpose: every task calls a plain function from ``extract.editing``. Tasks receive the model
*name* and get the model from :func:`extract.models.cached_model` (one copy per worker process), with
caching off, so Prefect never hashes or pickles the weights. Each edit inside a batch is applied to
the loaded weights and undone bit-exactly before the next (see ``extract.editing.applied``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from extract.editing import (EditBatchResult, EditPlan, EditSpec, choose_defaults, plan_edit_run,
                             process_edit_batch)
from extract.models import cached_model
from extract.records import EditRecord


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


@task(name="plan-edit-run", cache_policy=NO_CACHE)
def plan_edit_task(model: str, device: str, data: str, specs: list[EditSpec], warehouse: str,
                   limit: int | None, kind: str) -> EditPlan:
    return plan_edit_run(cached_model(model, device), data, specs, warehouse, limit=limit, kind=kind)


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch_task(model: str, device: str, run_id: str, records: list[EditRecord], specs: list[EditSpec],
                    warehouse: str) -> EditBatchResult:
    return process_edit_batch(cached_model(model, device), run_id, records, specs, warehouse)


@flow(name="blens-edit", log_prints=False, validate_parameters=False)
def edit_flow(model: str, data: str, specs: Sequence[EditSpec], warehouse: str = "warehouse", *,
              limit: int | None = None, device: str = "cpu", batch_size: int = 16, kind: str = "edit",
              on_plan: Callable[[EditPlan], None] | None = None,
              on_batch: Callable[[EditBatchResult], None] | None = None) -> EditSummary:
    """Apply every spec to every record, one edit at a time; rows land in ``edit_results``."""
    return _run_batches(model, data, specs, warehouse, limit=limit, device=device, batch_size=batch_size,
                        kind=kind, on_plan=on_plan, on_batch=on_batch)


def _run_batches(model, data, specs, warehouse, *, limit, device, batch_size, kind, on_plan, on_batch) -> EditSummary:
    """The body both flows share: a plan task, then one task per batch of edits (called inside a flow)."""
    t0 = time.perf_counter()
    specs = list(specs)
    plan = plan_edit_task(model, device, data, specs, warehouse, limit, kind)
    if on_plan:
        on_plan(plan)
    n_rows = n_errors = 0
    for i in range(0, len(plan.records), batch_size):
        res = edit_batch_task(model, device, plan.run_id, plan.records[i: i + batch_size], specs, warehouse)
        n_rows, n_errors = n_rows + res.n_rows, n_errors + res.n_errors
        if on_batch:
            on_batch(res)
    return EditSummary(run_id=plan.run_id, n_records=len(plan.records), n_load_errors=plan.n_load_errors,
                       n_rows=n_rows, n_errors=n_errors, seconds=time.perf_counter() - t0)


@flow(name="blens-sweep", log_prints=False, validate_parameters=False)
def sweep_flow(model: str, data: str, specs: Sequence[EditSpec], warehouse: str = "warehouse", *,
               limit: int | None = None, device: str = "cpu", batch_size: int = 8, min_efficacy: float = 0.95,
               on_plan: Callable[[EditPlan], None] | None = None,
               on_batch: Callable[[EditBatchResult], None] | None = None) -> EditSummary:
    """The grid on the tuning split, then the chosen default per method (see ``choose_defaults``)."""
    summary = _run_batches(model, data, specs, warehouse, limit=limit, device=device, batch_size=batch_size,
                           kind="sweep", on_plan=on_plan, on_batch=on_batch)
    summary.defaults = choose_defaults(warehouse, summary.run_id, min_efficacy=min_efficacy)
    return summary
