"""CLI presentation shared by the commands: the stderr console, one clear red line and a non-zero exit for a
user-facing failure (:func:`fail`), the progress bar over a flow's events, the closing note on skipped records.

The process's lifecycle (signals, the top-level guard, Prefect's environment) lives in :mod:`blens.lifecycle`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# emoji=False: no ":name:" codes in our messages, and replacing them imports rich's 4,000-entry table
# (0.1-0.3 s of a command that otherwise answers in about a second).
err_console = Console(stderr=True, emoji=False)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def progress_bar(kind: str, unit: str) -> Iterator[None]:
    """A progress bar over a flow's ``plan``/``batch`` events (see ``blens.run.progress``); on a
    non-terminal (logs, CI) a plain line per batch instead of a live bar."""
    import logging

    from blens.run.progress import Event, watching

    # A failing run is reported by the command in one line; Prefect's own record of it (a traceback per
    # retry) stays off the terminal whatever PREFECT_LOGGING_LEVEL says.
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    progress = Progress(TextColumn(f"[bold]{kind}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                        TextColumn("{task.fields[rate]:.2f}/s"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=err_console, transient=False)
    state = {"task": None, "n": 0, "t": 0.0, "total": 0}

    def watch(event: Event) -> None:
        if event.kind == "plan":
            state["total"] = event.n
            state["task"] = progress.add_task(kind, total=event.n, rate=0.0)
            for note in getattr(event.payload, "notes", ()):
                err_console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
            done_before = getattr(event.payload, "n_skipped_done", 0)
            if done_before:
                err_console.print(f"{done_before} record(s) already in the warehouse (skipped), {event.n} to go")
            return
        state["n"] += event.n
        state["t"] += event.payload.seconds
        rate = state["n"] / max(state["t"], 1e-9)
        progress.update(state["task"], advance=event.n, rate=rate)
        if not err_console.is_terminal:
            eta = (state["total"] - state["n"]) / rate if rate else 0
            err_console.print(f"{kind}: {state['n']}/{state['total']} {unit}, {rate:.2f}/s, eta {eta:.0f}s",
                              highlight=False)

    with progress, watching(watch):
        yield


def report_errors(n: int, what: str, warehouse, run_id: str | None = None) -> None:
    """After a run: how many records it turned away, and the query that lists them."""
    if n:
        where = f" WHERE run_id = '{run_id}'" if run_id else ""
        err_console.print(f"[yellow]{n} {what}; see them with:[/] blens sql \"SELECT * FROM errors{where}\" "
                          f"--warehouse {warehouse}")
