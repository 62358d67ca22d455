"""Scheduled, incremental extraction: a Prefect deployment that runs the extract flow on a cron schedule.

The deployment stores one parameter, the ``ExtractConfig`` (as JSON, with Prefect's schema built from
the model). Results are identified by content, so each tick extracts only what the warehouse lacks: the
new records of a grown file, and edited records (whose new results supersede the old ones). ``blens serve`` (blens/commands/serve.py) serves the deployment; it needs a Prefect
server whose scheduler creates the runs (``prefect server start`` + ``PREFECT_API_URL``), see
docs/scale.md.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from blens.extract.config import ExtractConfig

from .extract_flow import run_extract

DEPLOYMENT_NAME = "blens-extract-scheduled"


@flow(name="blens-scheduled-extract", log_prints=True)
def scheduled_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract whatever in ``cfg.data`` is not in the warehouse yet (new or edited records)."""
    summary = run_extract(cfg)
    print(f"run {summary.run_id}: {summary.n_extracted} new prompts extracted, {summary.n_done_before} already "
          f"done, {summary.n_failed} failed, {summary.n_skipped} skipped")
    return asdict(summary)


def build_deployment(cfg: ExtractConfig, *, cron: str = "0 * * * *", name: str = DEPLOYMENT_NAME,
                     timezone: str | None = None):
    """The deployment object (not yet registered): cron schedule + the config every run gets."""
    from prefect.schedules import Cron

    schedule = Cron(cron, timezone=timezone) if timezone else Cron(cron)
    params = {"cfg": cfg.model_dump(mode="json")}
    return scheduled_extract.to_deployment(
        name=name, schedules=[schedule], parameters=params, concurrency_limit=1,
        description="Incremental Backward Lens extraction: only records not yet in the warehouse.",
        tags=["blens", "extract"],
    )


def serve_deployment(deployment) -> None:  # pragma: no cover - long-running; exercised by hand (docs/scale.md)
    from prefect import serve

    serve(deployment)
