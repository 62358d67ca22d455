"""Shared CLI plumbing: one clear red line and a non-zero exit for user-facing failures."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def quiet_prefect() -> None:
    """Keep Prefect's per-task INFO logs off the terminal: the progress bar says the same, legibly."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry noise
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # busy 2-core boxes


def is_tty() -> bool:
    return sys.stderr.isatty()
