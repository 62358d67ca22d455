"""Shared CLI plumbing: one clear red line and a non-zero exit for user-facing failures; progress bars."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(f"{option} must be {', '.join(choices[:-1])} or {choices[-1]} (got {value!r})")


def quiet_prefect() -> None:
    """Keep Prefect's logs off the terminal: the progress bar says what they say, and a failure is reported by
    the command in one line (Prefect would add its traceback). PREFECT_LOGGING_LEVEL=INFO shows them again."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry noise
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # busy 2-core boxes


@contextlib.contextmanager
def progress_bar(kind: str, unit: str) -> Iterator[None]:
    """A progress bar over a flow's ``plan``/``batch`` events (see ``blens.flows.progress``); on a
    non-terminal (logs, CI) a plain line per batch instead of a live bar."""
    import logging

    from blens.flows.progress import Event, watching

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


def print_table(title: str, columns: list[str], rows: list[list[str]], *, console: Console | None = None) -> None:
    """A table that never cuts a value: on a terminal, rich columns that fold long values onto further lines;
    elsewhere (a pipe, a file, CI logs) plain aligned text with every value whole."""
    out = console or Console()
    if out.is_terminal:
        from rich.table import Table

        t = Table(title=title, show_edge=False)
        for col in columns:
            t.add_column(col, justify="right", overflow="fold")
        for row in rows:
            t.add_row(*row)
        out.print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    print("\n".join(lines))


def report_errors(n: int, what: str, warehouse, run_id: str | None = None) -> None:
    """After a run: how many records it turned away, and the query that lists them."""
    if n:
        where = f" WHERE run_id = '{run_id}'" if run_id else ""
        err_console.print(f"[yellow]{n} {what}; see them with:[/] blens sql \"SELECT * FROM errors{where}\" "
                          f"--warehouse {warehouse}")
