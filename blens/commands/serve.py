"""`blens serve`: run incremental extraction on a cron schedule (a Prefect deployment, served here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from . import options
from ._common import err_console, fail, quiet_prefect


@options.with_extraction_options
def serve(
    data: str = typer.Option(..., "--data", metavar="PATH",
                             help="CounterFact records (file/directory) re-read on every run: "
                             "only records not yet in the warehouse are extracted."),
    cron: str = typer.Option("0 * * * *", "--cron", metavar="CRON", help="Cron schedule, e.g. '0 * * * *' (hourly)."),
    name: str = typer.Option("blens-extract-scheduled", "--name", metavar="NAME", help="Deployment name."),
    timezone: Optional[str] = typer.Option(None, "--timezone", metavar="TZ",
                                           help="IANA timezone of the cron (default UTC)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the deployment (name, schedule, parameters) "
                                 "as JSON and exit without serving."),
    **settings,
) -> None:
    """Serve a Prefect deployment that runs incremental extraction on a cron schedule.

Needs a Prefect server for its scheduler: `prefect server start`, then
    `PREFECT_API_URL=http://127.0.0.1:4200/api blens serve --cron "0 * * * *" --data cf.json`.

    Runs until stopped (Ctrl-C); a run can also be started by hand with
    `prefect deployment run 'blens-scheduled-extract/blens-extract-scheduled'`.
    """
    quiet_prefect()
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron)  # validates the expression
    except Exception as exc:  # noqa: BLE001 - pydantic error text is long; one line is enough
        fail(f"--cron {cron!r} is not a valid cron expression ({type(exc).__name__})")

    from blens.extract.config import ExtractConfig
    from blens.flows.serve import build_deployment, serve_deployment

    cfg = ExtractConfig(data=str(Path(data).resolve()) if Path(data).exists() else data,
                        **{**settings, "warehouse": str(settings["warehouse"].resolve())})
    dep = build_deployment(cfg, cron=cron, name=name, timezone=timezone)
    if dry_run:
        info = {"name": dep.name, "flow_name": dep.flow_name, "entrypoint": dep.entrypoint,
                "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in dep.schedules],
                "parameters": dep.parameters, "concurrency_limit": dep.concurrency_limit}
        print(json.dumps(info, indent=2))
        return
    if not os.environ.get("PREFECT_API_URL"):
        err_console.print("[yellow]warning:[/] PREFECT_API_URL is not set: scheduled runs need a Prefect server "
                          "(`prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)")
    serve_deployment(dep)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
