"""`blens extract` as a Prefect flow: one task plans the run, one task per batch of prompts.

Thin on purpose: the flow takes one ``ExtractConfig`` and hands it to the plan task alone
(``blens.run.extract.plan_extract``); the run itself (registration, progress, the failure policy, the summary) is
``blens.run.extract.execute``, and the flow only says how batches run: as Prefect tasks here, or submitted to
Dask workers. Batch tasks get the plan's values (an ``ExtractJob`` and a batch of keyed items) and the run's
``Committer``, the only writer (``blens.run.commit``). Tasks have caching off, so
Prefect never tries to hash or pickle 500 MB of weights: each worker process loads its model by name. The
ephemeral local Prefect API is used unless PREFECT_API_URL points at a server.

Scale-out: with the default task runner batches run one after another in this process (on CUDA the commit of
each batch overlaps the next batch's device work: ``ExtractConfig.overlap``). With ``workers > 1``
(prefect-dask's DaskTaskRunner on a LocalCluster of N worker processes) batch tasks are ``.submit()``ted and fan
out; every worker loads the model by name and commits its own batches (each commit is its own transaction). A
batch that still fails after its retries for a reason of its own becomes ``errors`` rows (stage "extract") and
the run goes on; an environmental failure (disk full, permissions, I/O) stops the run
(``blens.extract.failures``).
"""

from __future__ import annotations

import os
import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from blens.errors import UserError
from blens.extract.config import ExtractConfig
from blens.lifecycle import prefect as prefect_env
from blens.lifecycle.signals import termination_kept
from blens.run.commit import Committer
from blens.run.extract import (BATCH_RETRIES, RETRY_DELAY_S, BatchResult, ExtractJob, ExtractPlan, Item, execute,
                               extract_items, plan_extract)
from blens.run.resume import ExtractSummary

from .schedules import fanned_out, one_after_another

# The ephemeral Prefect API server dies with this process, even on kill -9; SIGTERM ends a run quietly.
prefect_env.prepare_process()


# termination_kept: a signal landing in a DuckDB query must end the run, not become a retried failure or be lost.
@task(name="plan-run", cache_policy=NO_CACHE)
def plan_task(cfg: ExtractConfig) -> ExtractPlan:
    with termination_kept():
        return plan_extract(cfg)


@task(name="extract-batch", cache_policy=NO_CACHE, retries=BATCH_RETRIES, retry_delay_seconds=RETRY_DELAY_S)
def batch_task(job: ExtractJob, items: list[Item], commit: Committer) -> BatchResult:
    with termination_kept():
        return extract_items(job, items, commit)


def _fans_out() -> bool:
    ctx = FlowRunContext.get()
    return ctx is not None and not isinstance(ctx.task_runner, ThreadPoolTaskRunner)


def _worker_threads() -> int:
    """The running cluster's worker threads (all workers, ours or somebody else's), as its scheduler counts them."""
    client = FlowRunContext.get().task_runner.client  # type: ignore[union-attr] - a DaskTaskRunner (_fans_out)
    return sum(client.nthreads().values())


@flow(name="blens-extract", log_prints=False)
def extract_flow(cfg: ExtractConfig) -> ExtractSummary:
    t0 = time.perf_counter()
    plan = plan_task(cfg)
    fans_out = _fans_out()
    schedule = fanned_out(batch_task, _worker_threads) if fans_out else one_after_another(batch_task)
    return execute(plan, schedule, fans_out=fans_out, started=t0)


class WorkersUnavailable(UserError, RuntimeError):
    """--workers > 1 asked for but prefect-dask is not installed; one line for the user."""


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """What the CLI and ``blens serve`` call: the flow in this process, on ``cfg.workers`` local Dask worker
    processes (one thread each, sharing the CPU cores), or on the workers of a running Dask cluster
    (``cfg.dask_scheduler``), via prefect-dask's DaskTaskRunner."""
    prefect_env.ensure_local_api()  # from the main thread, so its server dies with us (see blens.lifecycle.prefect)
    if not cfg.fans_out():
        return extract_flow(cfg)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise WorkersUnavailable("Dask workers need prefect-dask (pip install 'prefect-dask>=0.3.7,<0.4')") from None
    if cfg.dask_scheduler:  # somebody else's workers: their cwd is not ours, so every path travels absolute
        cfg = for_remote_workers(cfg)
        runner = DaskTaskRunner(address=cfg.dask_scheduler)
    else:
        if cfg.threads is None:
            cfg = cfg.model_copy(update={"threads": max(1, (os.cpu_count() or 1) // cfg.workers)})
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})
    with prefect_env.api_for_child_processes():  # local workers use our API server: none outlives us
        return extract_flow.with_options(task_runner=runner)(cfg)


def for_remote_workers(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with the warehouse, the data and a model directory as absolute paths: a worker of a cluster
    somebody else started resolves a relative path against its own working directory."""
    from pathlib import Path

    def absolute(p: str) -> str:
        return str(Path(p).resolve()) if Path(p).exists() or p == cfg.warehouse else p

    return cfg.model_copy(update={"warehouse": absolute(cfg.warehouse), "data": absolute(cfg.data),
                                  "model": absolute(cfg.model)})
