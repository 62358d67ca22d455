"""`blens extract` as a Prefect flow: one task plans the run, one task per batch of prompts.

Thin on purpose: every task calls a plain function from ``blens.extract.job``, and the flow takes one
``ExtractConfig``. Tasks receive the config (each worker process loads and caches its own model by
name), never the model object, and have caching off, so Prefect never tries to hash or pickle 500 MB
of weights. The ephemeral local Prefect API is used unless PREFECT_API_URL points at a server.

Scale-out: with the default task runner batches run one after another in this process (on CUDA the
commit of each batch overlaps the next batch's device work: ``ExtractConfig.overlap``). With
``workers > 1`` (prefect-dask's DaskTaskRunner on a LocalCluster of N worker processes) batch tasks are
``.submit()``ted and fan out; every worker loads the model by name and writes its own batch files
(each commit is its own transaction). A batch that still fails after its retries for a reason of its
own becomes ``errors`` rows (stage "extract") and the run goes on; an environmental failure (disk full,
permissions, I/O) stops the run (``blens.extract.failures``).
"""

from __future__ import annotations

import os
import time
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from blens.errors import UserError
from blens.extract.config import ExtractConfig
from blens.extract.failures import describe, is_record_failure
from blens.extract.job import BatchResult, RunPlan, background_commits, plan_run, process_batch
from blens.extract.models import cached_model
from blens.extract.prepare import PreparedPrompt
from blens.extract.records import RecordError
from blens.extract.resume import ExtractSummary
from blens.store.runs import errors_table
from blens.store.writer import commit_batch

from blens.lifecycle import prefect as prefect_env
from blens.lifecycle.signals import termination_kept

from .progress import emit

# The ephemeral Prefect API server dies with this process, even on kill -9; SIGTERM ends a run quietly.
prefect_env.prepare_process()


# termination_kept: a signal landing in a DuckDB query must end the run, not become a retried failure or be lost.
@task(name="plan-run", cache_policy=NO_CACHE)
def plan_task(cfg: ExtractConfig) -> RunPlan:
    with termination_kept():
        return plan_run(cfg, cached_model(cfg.model, cfg.device))


@task(name="extract-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def batch_task(cfg: ExtractConfig, run_id: str, prompts: list[PreparedPrompt]) -> BatchResult:
    with termination_kept():
        return process_batch(cfg, run_id, prompts)


def _failed_batch(cfg: ExtractConfig, run_id: str, batch: list[PreparedPrompt], exc: BaseException) -> BatchResult:
    """A batch that failed for good (after Prefect's retries): its prompts become error rows."""
    msg = f"batch failed after retries: {describe(exc)}"
    errs = [RecordError(case_id=p.record.case_id, field="batch", message=msg, source=p.record.source) for p in batch]
    commit_batch(cfg.warehouse, {"errors": errors_table(run_id, errs, "extract")}, kind="meta")
    return BatchResult(0, len(batch), 0.0)


def _fans_out() -> bool:
    ctx = FlowRunContext.get()
    return ctx is not None and not isinstance(ctx.task_runner, ThreadPoolTaskRunner)


@flow(name="blens-extract", log_prints=False)
def extract_flow(cfg: ExtractConfig) -> ExtractSummary:
    t0 = time.perf_counter()
    plan = plan_task(cfg)
    emit("plan", plan, plan.n_todo)
    extracted = failed = 0

    def account(batch: list[PreparedPrompt], get: Callable[[], BatchResult]) -> None:
        nonlocal extracted, failed
        try:
            res = get()
        except Exception as exc:  # noqa: BLE001 - retries are spent: the policy decides
            if not is_record_failure(exc):
                raise  # the environment failed (disk full, permissions, I/O): stop the run, record nothing
            res = _failed_batch(cfg, plan.run_id, batch, exc)
        extracted, failed = extracted + res.n_prompts, failed + res.n_failed
        emit("batch", res, len(batch))

    if _fans_out():
        futures = {batch_task.submit(cfg, plan.run_id, batch): batch for batch in plan.batches}
        for fut in as_completed(list(futures)):
            account(futures[fut], fut.result)
    else:
        # On CUDA batch k is committed in a background thread while the device computes batch k+1; leaving
        # the block waits for the last commit and raises the first failed one (blens.extract.job).
        with background_commits(plan.run_id, plan.overlap):
            for batch in plan.batches:
                account(batch, lambda batch=batch: batch_task(cfg, plan.run_id, batch))
    return ExtractSummary(run_id=plan.run_id, n_records=plan.n_records, n_done_before=plan.n_skipped_done,
                          n_extracted=extracted, n_failed=failed, n_skipped=len(plan.errors),
                          seconds=time.perf_counter() - t0)


class WorkersUnavailable(UserError, RuntimeError):
    """--workers > 1 asked for but prefect-dask is not installed; one line for the user."""


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """What the CLI calls: the flow in this process, or on ``cfg.workers`` Dask worker processes (one
    thread each, sharing the CPU cores) via prefect-dask's DaskTaskRunner."""
    prefect_env.ensure_local_api()  # from the main thread, so its server dies with us (see blens.lifecycle.prefect)
    if cfg.workers <= 1:
        return extract_flow(cfg)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise WorkersUnavailable("--workers > 1 needs prefect-dask (pip install 'prefect-dask>=0.3.7,<0.4')") from None
    if cfg.threads is None:
        cfg = cfg.model_copy(update={"threads": max(1, (os.cpu_count() or 1) // cfg.workers)})
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    with prefect_env.api_for_child_processes():  # workers use our API server: none outlives us
        return extract_flow.with_options(task_runner=runner)(cfg)
