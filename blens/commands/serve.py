"""`blens serve`: run incremental extraction on a cron schedule (a Prefect deployment, served here)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from blens.lifecycle.prefect import quiet_prefect
from blens.lifecycle.signals import Interrupted, allow_exit_grace

from . import options
from ._common import err_console, fail

# How long a stop may take: the run in progress reports its end to the server and exits (SIGTERM), then the
# runner records it and pauses the schedule. ~4 s on a 2-core machine at load 4, ~11 s at load 8, 25.8 s once
# at a heavier load (a CI run beside other work); after this long it exits without waiting (the run's process
# still dies with us). run_guarded's exit watchdog, which ends the process hard, is moved past it.
STOP_GRACE_S = 45.0


@options.extraction_options
@options.with_config_options(options.ExtractConfig, {
    "data": dict(metavar="PATH", help="CounterFact records (file/directory) re-read on every run: only records not "
                 "yet in the warehouse are extracted."),
    "limit": {}, "threads": {}})
def serve(
    cron: str = typer.Option("0 * * * *", "--cron", metavar="CRON", help="Cron schedule, e.g. '0 * * * *' (hourly)."),
    name: str = typer.Option("blens-extract-scheduled", "--name", metavar="NAME", help="Deployment name."),
    timezone: Optional[str] = typer.Option(None, "--timezone", metavar="TZ",
                                           help="IANA timezone of the cron (default UTC)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the deployment (name, entrypoint, schedule, "
                                 "parameters) as JSON and exit without serving."),
    **settings,
) -> None:
    """Serve a Prefect deployment that runs incremental extraction on a cron schedule.

    Needs a Prefect server for its scheduler: `prefect server start`, then
    `PREFECT_API_URL=http://127.0.0.1:4200/api blens serve --cron "0 * * * *" --data cf.json`.
    Each run logs to the server (`prefect flow-run logs ID`, the UI) and here. Runs until Ctrl-C or SIGTERM:
    a run in progress is cancelled, the schedule paused, and it exits 0 with one line. A run can also be
    started by hand with `prefect deployment run 'blens-scheduled-extract/blens-extract-scheduled'`.
    """
    data, limit, threads = (settings.pop(k) for k in ("data", "limit", "threads"))
    # Runs log through Prefect's run logger, which is what reaches the server: keep INFO, unlike the other
    # commands (quiet_prefect). The flow-run processes inherit the environment.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    quiet_prefect()
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron)  # validates the expression
    except Exception as exc:  # noqa: BLE001 - pydantic error text is long; one line is enough
        fail(f"--cron {cron!r} is not a valid cron expression ({type(exc).__name__})")

    from blens.extract.config import ExtractConfig
    from blens.flows.serve import build_deployment

    cfg = ExtractConfig(data=str(Path(data).resolve()) if Path(data).exists() else data, limit=limit,
                        threads=threads, **{**settings, "warehouse": str(settings["warehouse"].resolve())})
    dep = build_deployment(cfg, cron=cron, name=name, timezone=timezone)
    if dry_run:
        info = {"name": dep.name, "flow_name": dep.flow_name, "entrypoint": dep.entrypoint,
                "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in dep.schedules],
                "parameters": dep.parameters, "concurrency_limit": dep.concurrency_limit}
        print(json.dumps(info, indent=2))
        return
    serve_until_stopped(dep, cron=cron, timezone=timezone)


def serve_until_stopped(dep, *, cron: str, timezone: str | None) -> None:
    """Register and serve ``dep`` until SIGINT/SIGTERM; then stop in order and exit 0 with one line."""
    from prefect.settings import PREFECT_API_URL

    from blens.flows.serving import ServeFailed, Serving

    api_url = PREFECT_API_URL.value()
    if not api_url:  # the ephemeral API has no scheduler, and nothing else can reach it: nothing would ever run
        fail("blens serve needs a Prefect server: start one with `prefect server start` and set "
             "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")
    full_name = f"{dep.flow_name}/{dep.name}"
    allow_exit_grace(STOP_GRACE_S + 5)
    serving = Serving(dep)
    try:
        serving.start()
        err_console.print(f"serving {full_name} (cron '{cron}', {timezone or 'UTC'}) from {api_url}; run it now with "
                          f"`prefect deployment run '{full_name}'`; Ctrl-C or SIGTERM stops it", highlight=False,
                          soft_wrap=True)
        serving.wait()
    except ServeFailed as exc:
        fail(f"serving {full_name} failed: {exc}", code=1)
    except Interrupted as exc:
        how = signal.Signals(exc.signum).name
        from blens.lifecycle.flow_run import server_reachable

        if not server_reachable(api_url):
            _stop_without_server(full_name, how, api_url)
        stopped = serving.stop(STOP_GRACE_S)
        if not stopped:  # the runner did not finish in time: leave hard (flow runs die with us)
            err_console.print(f"stopped serving {full_name} ({how}) without waiting for the runner "
                              f"after {STOP_GRACE_S:.0f} s", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + exc.signum)
        err_console.print(f"stopped serving {full_name} ({how}): schedule paused, any run in progress cancelled "
                          "(the next run extracts what it left)", highlight=False, soft_wrap=True)


def _stop_without_server(full_name: str, how: str, api_url: str) -> None:
    """The server is gone: the Runner's ordered stop would report each step to it, retrying (47 s, then exit
    143, and the run's process left orphaned). End the run processes here and exit 0 at once: there is
    nothing left to report to (Prefect's exit hooks would only retry the dead server too)."""
    from blens.flows.serving import end_children

    n = end_children(grace=5.0)
    err_console.print(f"stopped serving {full_name} ({how}): the Prefect server at {api_url} is unreachable, so "
                      f"{n} run process(es) were ended here and the schedule could not be paused",
                      highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
