"""Scheduled, incremental extraction: a Prefect deployment that runs ``blens extract`` on a cron schedule.

``extract_flow`` takes an ``ExtractConfig`` and callables, which a deployment cannot store; the flow
here takes plain JSON-able parameters, builds the config and runs the very same flow (as a subflow,
same tasks) in *incremental* mode: the run identity is the dataset source rather than its content
hash, so a file that grew since the last tick keeps its run id and only its new (or edited) records
are extracted. ``blens serve`` (blens/commands/serve.py) serves the deployment; it needs a Prefect
server whose scheduler creates the runs (``prefect server start`` + ``PREFECT_API_URL``), see
docs/scale.md.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from extract.config import ExtractConfig
from extract.models import EMBEDDED_NAME

from .extract_flow import run_extract

DEPLOYMENT_NAME = "blens-extract-scheduled"


@flow(name="blens-scheduled-extract", log_prints=True)
def scheduled_extract(data: str, model: str = EMBEDDED_NAME, warehouse: str = "warehouse", batch_size: int = 32,
                      top_k: int = 10, vectors: str = "none", lens_dtype: str = "fp32", device: str = "cpu",
                      limit: int | None = None, shard: str | None = None, threads: int | None = None,
                      workers: int = 1, batch_tokens: int = 512) -> dict[str, Any]:
    """Extract whatever in ``data`` is not in the warehouse yet (new or edited records)."""
    cfg = ExtractConfig(model=model, data=data, warehouse=warehouse, batch_size=batch_size, top_k=top_k,
                        batch_tokens=batch_tokens, vectors=vectors, lens_dtype=lens_dtype, device=device,
                        limit=limit, shard=shard, threads=threads)
    summary = run_extract(cfg, workers=workers, incremental=True)
    out = asdict(summary)
    print(f"run {summary.run_id}: {summary.n_extracted} new prompts extracted, {summary.n_done_before} already "
          f"done, {summary.n_failed} failed, {summary.n_skipped} skipped")
    return out


def build_deployment(data: str, *, cron: str = "0 * * * *", name: str = DEPLOYMENT_NAME, timezone: str | None = None,
                     **params: Any):
    """The deployment object (not yet registered): cron schedule + default parameters for every run.

    ``params`` are ``scheduled_extract``'s keyword parameters (model, warehouse, batch_size, ...); None
    values are left out so the flow's defaults apply.
    """
    from prefect.schedules import Cron

    parameters = {"data": data, **{k: v for k, v in params.items() if v is not None}}
    schedule = Cron(cron, timezone=timezone) if timezone else Cron(cron)
    return scheduled_extract.to_deployment(
        name=name, schedules=[schedule], parameters=parameters, concurrency_limit=1,
        description="Incremental Backward Lens extraction: only records not yet in the warehouse.",
        tags=["blens", "extract"],
    )


def serve_deployment(deployment) -> None:  # pragma: no cover - long-running; exercised by hand (docs/scale.md)
    from prefect import serve

    serve(deployment)
