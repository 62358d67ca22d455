"""`blens extract` as a Prefect flow: one task plans the run, one task per batch of prompts.

Thin on purpose: every task calls a plain function from ``extract.job``. Tasks receive the model
*name* (each worker process loads and caches its own copy), never the model object, and have caching
off, so Prefect never tries to hash or pickle 500 MB of weights. The ephemeral local Prefect API is
used unless PREFECT_API_URL points at a server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from extract.config import ExtractConfig
from extract.job import BatchResult, RunPlan, plan_run, process_batch
from extract.models import cached_model
from extract.prepare import PreparedPrompt


@dataclass
class ExtractSummary:
    run_id: str
    n_records: int
    n_done_before: int
    n_extracted: int
    n_failed: int
    n_skipped: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.n_extracted / self.seconds if self.seconds else 0.0


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_task(cfg: ExtractConfig, force: bool) -> RunPlan:
    return plan_run(cfg, cached_model(cfg.model, cfg.device), force=force)


@task(name="extract-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def batch_task(cfg: ExtractConfig, run_id: str, prompts: list[PreparedPrompt]) -> BatchResult:
    return process_batch(cfg, run_id, prompts)


@flow(name="blens-extract", log_prints=False, validate_parameters=False)
def extract_flow(cfg: ExtractConfig, force: bool = False,
                 on_batch: Callable[[BatchResult, int], None] | None = None,
                 on_plan: Callable[[RunPlan], None] | None = None) -> ExtractSummary:
    t0 = time.perf_counter()
    plan = plan_task(cfg, force)
    if on_plan:
        on_plan(plan)
    extracted = failed = 0
    for batch in plan.batches:
        res = batch_task(cfg, plan.run_id, batch)
        extracted, failed = extracted + res.n_prompts, failed + res.n_failed
        if on_batch:
            on_batch(res, len(batch))
    return ExtractSummary(run_id=plan.run_id, n_records=plan.n_records, n_done_before=plan.n_skipped_done,
                          n_extracted=extracted, n_failed=failed, n_skipped=len(plan.errors),
                          seconds=time.perf_counter() - t0)
