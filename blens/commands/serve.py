"""`blens serve`: run incremental extraction on a cron schedule (a Prefect deployment, served here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ._common import err_console, fail, quiet_prefect


def serve(
    data: str = typer.Option(..., "--data", help="CounterFact records (file/directory) re-read on every run: "
                             "only records not yet in the warehouse are extracted."),
    cron: str = typer.Option("0 * * * *", "--cron", help="Cron schedule, e.g. '0 * * * *' (hourly)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model name or local directory (as for extract)."),
    warehouse: Path = typer.Option(Path("warehouse"), "--warehouse", help="Output directory (Parquet + views)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Most prompts per backward pass and per task."),
    batch_tokens: int = typer.Option(512, "--batch-tokens", min=1, help="Most padded tokens per batch (as for extract)."),
    top_k: int = typer.Option(10, "--top-k", min=1, max=1000, help="Tokens kept at each end of every projection."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    vectors: str = typer.Option("none", "--vectors", help="none | spanning | all (as for extract)."),
    lens_dtype: str = typer.Option("fp32", "--lens-dtype", help="fp32 | bf16 (as for extract)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Dask worker processes per run (needs prefect-dask)."),
    name: str = typer.Option("blens-extract-scheduled", "--name", help="Deployment name."),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA timezone of the cron (default UTC)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the deployment (name, schedule, parameters) "
                                 "as JSON and exit without serving."),
) -> None:
    """Serve a Prefect deployment that runs incremental extraction on a cron schedule.

    Needs a Prefect server for its scheduler: `prefect server start`, then
    `PREFECT_API_URL=http://127.0.0.1:4200/api blens serve --cron "0 * * * *" --data cf.json`.
    Runs until stopped (Ctrl-C); a run can also be started by hand with
    `prefect deployment run 'blens-scheduled-extract/blens-extract-scheduled'`.
    """
    quiet_prefect()
    if vectors not in ("none", "spanning", "all"):
        fail(f"--vectors must be none, spanning or all (got {vectors!r})")
    if lens_dtype not in ("fp32", "bf16"):
        fail(f"--lens-dtype must be fp32 or bf16 (got {lens_dtype!r})")
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron)  # validates the expression
    except Exception as exc:  # noqa: BLE001 - pydantic error text is long; one line is enough
        fail(f"--cron {cron!r} is not a valid cron expression ({type(exc).__name__})")

    from flows.serve import build_deployment, serve_deployment

    dep = build_deployment(str(Path(data).resolve()) if Path(data).exists() else data, cron=cron, name=name,
                           timezone=timezone, model=model, warehouse=str(warehouse.resolve()),
                           batch_size=batch_size, batch_tokens=batch_tokens, top_k=top_k, device=device,
                           vectors=vectors, lens_dtype=lens_dtype, workers=workers if workers > 1 else None)
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
