"""Shared CLI plumbing: one clear red line and a non-zero exit for user-facing failures; progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# emoji=False: no ":name:" codes in our messages, and replacing them imports rich's 4,000-entry table
# (0.1-0.3 s of a command that otherwise answers in about a second).
err_console = Console(stderr=True, emoji=False)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# --- the top-level guard (blens/cli.py): user errors in one line, signals end a command cleanly ---------------

# Exceptions that mean "the user's input or environment is wrong", never a bug: one red line and exit 2,
# wherever in a command they escape from. Named as (module, class) and only looked up in modules already
# imported (an exception cannot come from a module nobody imported), so the guard imports nothing heavy.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("blens.extract.records", "DataSourceError"),
    ("blens.extract.registry", "ModelLoadError"),
    ("blens.extract.adapters", "UnsupportedModelError"),
    ("blens.store.lake", "WarehouseError"),
    ("blens.store.writer", "WarehouseError"),
    ("blens.store.connect", "QueryRefused"),
    ("blens.store.sandbox", "QueryRefused"),
    ("blens.store.sandbox", "QueryLimit"),
    ("blens.flows.extract_flow", "WorkersUnavailable"),
    ("blens.publish.dataset", "PublishError"),
    ("blens.publish.report", "ReportError"),
)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread. A BaseException on purpose: ``except Exception`` (a
    batch's error policy, a failed-batch handler) must not record an interrupt as a failure and go on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_interrupted: list[int] = []  # the first signal our handler received, if any
_said: list[int] = []  # the interrupted line was printed
_watchdog = threading.Lock()
# How long an interrupted command may take to unwind (Prefect reports the crash, atexit stops its server:
# 3.5-5 s on a loaded 2-core machine) before it is ended hard.
EXIT_GRACE_S = 20.0


def allow_exit_grace(seconds: float) -> None:
    """A command whose orderly stop takes longer (``blens serve`` cancels a run on the server first) raises
    the watchdog's limit before any signal arrives; the watchdog reads it when it starts."""
    global EXIT_GRACE_S
    EXIT_GRACE_S = max(EXIT_GRACE_S, seconds)


def _exit_watchdog(signum: int) -> None:
    """Once a termination signal arrived, the process ends within EXIT_GRACE_S whatever happens: an exception
    raised by a signal handler is swallowed when it lands in a gc callback or ``__del__`` (seen with Dask,
    whose gc callback ate a SIGTERM and the run went on). Children die with us (PR_SET_PDEATHSIG)."""
    if not _watchdog.acquire(blocking=False):
        return

    def run() -> None:
        time.sleep(EXIT_GRACE_S)
        _say_interrupted(signum, exit=False)
        os._exit(128 + signum)

    threading.Thread(target=run, name="blens-exit-watchdog", daemon=True).start()


def _on_termination(signum: int) -> None:
    """Prefect's in-flow SIGTERM handler (see blens.flows.prefect_runtime) got the signal before ours."""
    logging.disable(logging.CRITICAL)
    _exit_watchdog(signum)


def _swallowed_signal(unraisable: Any) -> int | None:
    """The signal number if ``unraisable`` is our Interrupted or Prefect's TerminationSignal, else None."""
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted):
        return exc.signum
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    termination = getattr(prefect_exceptions, "TerminationSignal", None)
    if isinstance(termination, type) and isinstance(exc, termination):
        return exc.signal
    return None


def _unraisable_hook(unraisable: Any) -> None:
    """A signal handler's exception raised inside a gc callback or ``__del__`` is "ignored" by Python (printed,
    then dropped: Dask's gc callback ate a Ctrl-C that way). Print nothing and deliver the signal again a moment
    later, from another thread, when the main thread is out of the callback and raises it for real."""
    signum = _swallowed_signal(unraisable)
    if signum is None:
        _previous_unraisable_hook(unraisable)
        return
    if isinstance(unraisable.exc_value, Interrupted):
        _interrupted.clear()  # it never reached the command: the next delivery is not a second signal

    def again() -> None:
        time.sleep(0.05)
        os.kill(os.getpid(), signum)

    threading.Thread(target=again, name="blens-signal-again", daemon=True).start()


_previous_unraisable_hook = sys.unraisablehook


def _on_signal(signum: int, frame: Any) -> None:
    if _interrupted:  # a second Ctrl-C / SIGTERM while shutting down: stop now (child processes die with us)
        _say_interrupted(_interrupted[0], exit=False)
        os._exit(128 + signum)
    _interrupted.append(signum)
    logging.disable(logging.CRITICAL)  # Prefect would report the interrupted run's crash, with tracebacks
    _exit_watchdog(signum)
    from blens.flows import prefect_runtime  # stdlib imports only (already loaded by run_guarded)

    raise prefect_runtime.termination_raised(Interrupted(signum))  # kept if DuckDB loses it (termination_kept)


def is_user_error(exc: BaseException) -> bool:
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def one_line(text: str) -> str:
    return " ".join(str(text).split())


RESUME_NOTE = "everything committed before it is kept (rerun the same command to resume)"
_interrupt_note: list[str] = []  # what the interrupted line says after "stopped;" (set by the command)


def set_interrupt_note(note: str) -> None:
    """What an interrupt of this command means for the user. The default is the writers' (extract, edit):
    a read-only command (``blens sql``) says so instead of promising a resume."""
    _interrupt_note[:] = [note]


def _say_interrupted(signum: int, exit: bool = True) -> None:
    if not _said:
        _said.append(signum)
        note = _interrupt_note[0] if _interrupt_note else RESUME_NOTE
        err_console.print(f"[bold red]interrupted[/] by {signal.Signals(signum).name}: stopped; {note}",
                          highlight=False, soft_wrap=True)
    if exit:
        sys.exit(128 + signum)


def run_guarded(command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the CLI (``command``) so that nothing a user can cause ends in a traceback:

    - SIGINT (Ctrl-C) and SIGTERM raise :class:`Interrupted` in the main thread; it unwinds the command
      (Prefect marks the run crashed, ``atexit`` stops its API server), prints one line and exits
      128 + signal number (130, 143). A second signal exits at once. A signal the parent set to be ignored
      (``nohup``, a background job of a non-interactive shell) stays ignored.
    - A known user error (:data:`USER_ERRORS`) escaping any command: one red line, exit 2.
    - Anything else is a bug and keeps its traceback.
    """
    from blens.flows import prefect_runtime  # stdlib imports only: cheap for every command

    _interrupted.clear()
    _said.clear()
    _interrupt_note.clear()
    prefect_runtime.forget_terminations()
    if _on_termination not in prefect_runtime.termination_hooks:
        prefect_runtime.termination_hooks.append(_on_termination)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    previous_unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook
    try:
        return command(*args, **kwargs)
    except Interrupted as exc:
        _say_interrupted(exc.signum)
    except Exception as exc:
        if _interrupted:  # raised while unwinding an interrupt (e.g. a crash report that found no server)
            _say_interrupted(_interrupted[0])
        if not is_user_error(exc):
            raise
        err_console.print(f"[bold red]error:[/] {one_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        # Called in-process (tests, notebooks): leave the caller's handlers as they were. After an interrupt
        # ours stay, so that a second signal during the exit (atexit stops Prefect's server) exits at once.
        if not _interrupted:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            sys.unraisablehook = previous_unraisable


def quiet_prefect() -> None:
    """Keep Prefect's logs off the terminal: the progress bar says what they say, and a failure is reported by
    the command in one line (Prefect would add its traceback). PREFECT_LOGGING_LEVEL=INFO shows them again."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry noise
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # busy 2-core boxes


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
