"""`blens edit` and `blens sweep` as Prefect flows: one task plans the run, one task per batch of edits.

Thin on purpose: the flow takes one ``EditConfig`` and hands it to the plan task alone
(``blens.run.edit.plan_edit``); the run itself (registration, progress, the summary, a sweep's defaults) is
``blens.run.edit.execute``, and the flow only makes each batch a Prefect task. Tasks get the model from
:func:`blens.extract.models.cached_model` (one copy per worker process), with caching off, so Prefect never
hashes or pickles the weights.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from blens.edit.spec import EditConfig
from blens.extract.records import EditRecord
from blens.lifecycle import prefect as prefect_env
from blens.lifecycle.signals import termination_kept
from blens.run.commit import Committer
from blens.run.edit import EditBatchResult, EditJob, EditPlan, EditSummary, edit_batch, execute, plan_edit

from .schedules import one_after_another

# The ephemeral Prefect API server dies with this process, even on kill -9; SIGTERM ends a run quietly.
prefect_env.prepare_process()

__all__ = ["EditSummary", "edit_flow"]


# termination_kept: a signal that lands in a DuckDB query ends the run (see blens.lifecycle.signals).
@task(name="plan-edit-run", cache_policy=NO_CACHE)
def plan_edit_task(cfg: EditConfig) -> EditPlan:
    with termination_kept():
        return plan_edit(cfg)


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch_task(job: EditJob, records: list[EditRecord], commit: Committer) -> EditBatchResult:
    with termination_kept():
        return edit_batch(job, records, commit)


@flow(name="blens-edit", log_prints=False)
def edit_flow(cfg: EditConfig) -> EditSummary:
    """Apply every spec to every record, one edit at a time; rows land in ``edit_results``. A sweep
    (``cfg.kind == 'sweep'``) then picks the default config per method (``blens.edit.job.choose_defaults``)."""
    t0 = time.perf_counter()
    plan = plan_edit_task(cfg)
    return execute(plan, one_after_another(edit_batch_task), started=t0)
