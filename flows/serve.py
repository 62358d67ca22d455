"""Scheduled, incremental extraction: a Prefect deployment that runs the extract flow on a cron schedule.

The deployment stores one parameter, the ``ExtractConfig`` (as JSON, with Prefect's schema built from
the model). Results are identified by content, so each tick extracts only what the warehouse lacks: the
new records of a grown file, and edited records (whose new results supersede the old ones). ``blens
serve`` (blens/commands/serve.py) serves the deployment (blens.flows.serving); it needs a Prefect server
whose scheduler creates the runs (``prefect server start`` + ``PREFECT_API_URL``), see docs/scale.md.

A run reports through Prefect's run logger, not a progress bar: nobody watches its terminal, and the run
logger is what sends lines to the server (``prefect flow-run logs ID``, the UI). The entrypoint is a
module path, so a worker or runner finds the flow from any directory where ``blens`` is installed.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blens.extract.config import ExtractConfig

from blens.lifecycle.flow_run import bind_to_serving_process

from .extract_flow import ExtractSummary, run_extract
from blens.run.progress import logged

DEPLOYMENT_NAME = "blens-extract-scheduled"
FLOW_NAME = "blens-scheduled-extract"

# In a flow-run process started by `blens serve`: die with it, and keep its Ctrl-C (see blens.lifecycle.flow_run).
bind_to_serving_process()


def summary_line(summary: ExtractSummary) -> str:
    return (f"run {summary.run_id}: {summary.n_extracted} new prompts extracted, {summary.n_done_before} already "
            f"done, {summary.n_failed} failed, {summary.n_skipped} skipped")


@flow(name=FLOW_NAME)
def scheduled_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract whatever in ``cfg.data`` is not in the warehouse yet (new or edited records)."""
    logger = get_run_logger()
    with logged(logger, "prompts"):
        summary = run_extract(cfg)
    logger.info(summary_line(summary))
    return asdict(summary)


def build_deployment(cfg: ExtractConfig, *, cron: str = "0 * * * *", name: str = DEPLOYMENT_NAME,
                     timezone: str | None = None):
    """The deployment object (not yet registered): cron schedule + the config every run gets."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    schedule = Cron(cron, timezone=timezone) if timezone else Cron(cron)
    params = {"cfg": cfg.model_dump(mode="json")}
    return scheduled_extract.to_deployment(
        name=name, schedules=[schedule], parameters=params, concurrency_limit=1,
        description="Incremental Backward Lens extraction: only records not yet in the warehouse.",
        tags=["blens", "extract"], entrypoint_type=EntrypointType.MODULE_PATH,
    )
