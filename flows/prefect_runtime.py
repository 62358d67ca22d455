"""Prefect's process lifecycle in our processes: no process of ours outlives the command that started it,
and an interrupted run ends with one line, not Prefect's crash reports.

**The ephemeral API server.** Without ``PREFECT_API_URL``, Prefect 3.8 runs its API in a uvicorn
subprocess (``prefect.server.api.server.SubprocessASGIServer``, ~225 MB), one per process, started by
whichever client needs it first (``get_client``, the events and logs clients: all ask for the same
port-less singleton) and stopped by an ``atexit`` hook. ``atexit`` never runs when the process is
SIGKILLed (OOM killer, ``kill -9``), nor on a signal's default action, so every killed ``blens extract``
left its server running, reparented to init. :func:`arm_ephemeral_server` registers that singleton
before anything starts it, with one change: its child process gets ``PR_SET_PDEATHSIG = SIGKILL``
between fork and exec (:func:`parent_death_preexec`), so the Linux kernel kills it the moment our
process dies, however it dies, and kills only it (our own process group is never signalled). A normal
exit still goes through Prefect's ``atexit`` ``stop()`` (SIGTERM, then SIGKILL after 5 s).

Two facts this relies on: the death signal follows the *thread* that forked the child, so the server
is started with it only from the main thread (which lives as long as the process; sync flows start it
there, and :func:`ensure_local_api` does so explicitly); and SQLite, the ephemeral API's database, is
safe against SIGKILL (atomic commits), so the hard kill costs no consistency.

**SIGTERM during a flow.** Prefect's flow engine swaps in its own SIGTERM handler for the duration of a
run (``prefect.utilities.engine.capture_sigterm``): it raises ``TerminationSignal``, logs the task and
flow crashes at ERROR, restores the previous handler and re-sends the signal. :func:`quiet_sigterm_bridge`
keeps that machinery (the run is still marked Crashed in the API) but switches logging off first, so the
CLI's own handler (``blens.commands._common.run_guarded``) prints the one line. It also remembers the
signal, so that :func:`termination_kept` can restore it where DuckDB turned it into an ordinary error.

Both touch Prefect internals in exactly one place each, check that the names exist first, and are
covered by ``tests/test_process_hygiene.py`` (kill -9 of the CLI alone; SIGTERM and SIGINT).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import types
from typing import Any, Callable, Iterator

__all__ = ["SERVE_PID_ENV", "api_for_child_processes", "exit_after", "server_reachable", "watch_server", "arm_ephemeral_server", "bind_to_serving_process",
           "ensure_local_api", "forget_terminations", "parent_death_preexec", "prepare_process", "quiet_sigterm_bridge", "termination_kept",
           "termination_raised"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def parent_death_preexec(sig: int = signal.SIGKILL, own_group: bool = True) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child receives ``sig`` when the thread that started it
    dies (Linux ``PR_SET_PDEATHSIG``; kept across exec). None where that does not exist.

    If the parent is already gone when the child gets there, nothing would deliver the signal: the child
    exits at once instead. ``own_group`` puts the child in a process group of its own, so that a signal
    sent to our group (Ctrl-C at a terminal reaches the whole foreground group; ``kill -TERM -PGID``) reaches
    only us: we shut down in order, reporting to a server that is still there, and then stop it. Otherwise
    the server died first and Prefect's crash report retried a dead socket for over a minute, then raised.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no locks, no imports
        if own_group:
            os.setpgid(0, 0)
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@contextlib.contextmanager
def _popen_with_preexec(module: types.ModuleType, preexec: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``module``'s ``subprocess.Popen`` calls get ``preexec``; nothing else changes."""
    real = module.subprocess

    class Popen(real.Popen):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("preexec_fn") is None:
                kwargs["preexec_fn"] = preexec
            super().__init__(*args, **kwargs)

    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(real))
    shim.Popen = Popen  # type: ignore[attr-defined]
    module.subprocess = shim
    try:
        yield
    finally:
        module.subprocess = real


def _api_url_set() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def arm_ephemeral_server() -> Any | None:
    """Make sure the ephemeral API server, whenever it starts in this process, dies with the process.

    Returns Prefect's server singleton (not started), or None when there is nothing of ours to start
    (``PREFECT_API_URL`` names a server) or no way to arm it (not Linux; Prefect's internals changed).
    Idempotent and cheap after the first call.
    """
    if _api_url_set():
        return None
    preexec = parent_death_preexec()
    try:
        from prefect.server.api import server as server_module

        server = server_module.SubprocessASGIServer()  # the port-less singleton every Prefect client uses
        start_child = type(server)._run_uvicorn_command
        server_module.subprocess  # noqa: B018 - the module global we route Popen through
    except (ImportError, AttributeError):
        return None
    if preexec is None or getattr(server, "_blens_armed", False):
        return server

    def run_uvicorn_command() -> Any:
        # The death signal follows the forking thread: only the main thread lives as long as the process.
        if threading.current_thread() is not threading.main_thread():
            return start_child(server)
        with _popen_with_preexec(server_module, preexec):
            return start_child(server)

    server._run_uvicorn_command = run_uvicorn_command  # also used for Prefect's restart on a taken port
    server._blens_armed = True
    return server


def ensure_local_api() -> str | None:
    """Start the (armed) ephemeral API server now, from the calling thread, and return its URL; None when
    ``PREFECT_API_URL`` names a server. Call it from the main thread before a flow runs."""
    server = arm_ephemeral_server()
    if server is None:
        return None
    server.start()
    return server.api_url


@contextlib.contextmanager
def api_for_child_processes() -> Iterator[str | None]:
    """Within the block, child processes we start (Dask's worker processes for ``--workers N``) use this
    process's API server, whose life is bound to ours, instead of each starting an ephemeral server of
    its own: a worker dies with its parent (distributed watches a pipe and ``os._exit``s), which runs no
    ``atexit``, and its server, started from a worker thread where no death signal can be set, outlived it.
    Children copy the environment when they start, so it is set only for the block."""
    url = ensure_local_api()
    if url is None:
        yield None
        return
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


# Called with the signal number by Prefect's (wrapped) SIGTERM handler before it raises; the CLI registers
# its exit watchdog here (an exception raised by a signal handler can be swallowed, see _common.py).
termination_hooks: list[Callable[[int], None]] = []
# The exception each termination signal's handler raised in this process, first one first: Prefect's
# TerminationSignal (SIGTERM in a flow, quiet_sigterm_bridge) or a CLI's own (blens.commands._common: SIGINT,
# SIGTERM outside a flow).
_terminating: list[BaseException] = []


def termination_raised(exc: BaseException) -> BaseException:
    """A signal handler records the exception it is about to raise, so :func:`termination_kept` can raise it
    again where DuckDB lost it."""
    _terminating.append(exc)
    return exc


def forget_terminations() -> None:
    """A new command in this process starts with no signal recorded (an earlier command's is not its own)."""
    _terminating.clear()


@contextlib.contextmanager
def termination_kept() -> Iterator[None]:
    """Around a task's work: once a termination signal arrived, the task ends with that signal's exception,
    whatever DuckDB made of it.

    A signal handler's exception raised while DuckDB runs a query does not always reach us as itself:
    DuckDB turns it into ``RuntimeError("Query interrupted")`` (Prefect took that for a failure and retried
    the batch: a served run cancelled by SIGTERM kept extracting until the Runner killed it 30 s later), or,
    landing in a DuckLake COMMIT, drops it altogether: the batch finished and the run went on until the CLI's
    exit watchdog ended it 20 s later (3 of 4 Ctrl-C / SIGTERM tests here). So an ordinary exception, and a
    normal return, after a signal both end the task with the signal's exception: a crash, never retried, and
    the batch's commit, if it completed, is kept."""
    try:
        yield
    except Exception:
        if _terminating:
            raise _terminating[0].with_traceback(None)  # noqa: B904 - the exception it replaces stays as context
        raise
    if _terminating:
        raise _terminating[0].with_traceback(None)


def quiet_sigterm_bridge() -> bool:
    """Have Prefect's in-flow SIGTERM handler switch logging off before it raises ``TerminationSignal``,
    so an interrupted run prints no crash reports (its state is still reported to the API). True if
    installed."""
    try:
        from prefect.exceptions import TerminationSignal
        from prefect.utilities import engine
    except ImportError:
        return False
    original = getattr(engine, "_prefect_sigterm_handler", None)
    if original is None:
        return False
    if getattr(original, "_blens_quiet", False):
        return True

    def handler(sig_num: int, *args: object) -> None:
        exc = termination_raised(TerminationSignal(signal=sig_num))
        logging.disable(logging.CRITICAL)
        for hook in termination_hooks:
            hook(sig_num)
        raise exc

    handler._blens_quiet = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = handler  # read by capture_sigterm() at each call
    return True


# Set by `blens serve` (blens.flows.serving) to its own pid; the flow-run processes its Runner starts inherit it.
SERVE_PID_ENV = "BLENS_SERVE_PID"


def bind_to_serving_process(sig: int = signal.SIGTERM) -> bool:
    """In a flow-run process that ``blens serve`` started: die with it, and leave its process group.

    The Runner starts each run as a child process; killed hard (kill -9, the OOM killer), ``blens serve``
    could not stop it, and the run went on alone. With ``PR_SET_PDEATHSIG`` the kernel sends ``sig``
    (SIGTERM: Prefect's engine reports the run Crashed, then exits) when the thread that started it dies.
    A group of its own keeps a Ctrl-C at the terminal (sent to the whole foreground group) away from the
    run: ``blens serve`` alone receives it and cancels the run in order. A no-op (False) in any other
    process: the variable must name our parent."""
    expected = os.environ.get(SERVE_PID_ENV, "")
    if not expected.isdigit() or os.getppid() != int(expected):
        return False
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != int(expected):  # it died before the death signal was armed
        os.kill(os.getpid(), sig)
    termination_hooks.append(lambda signum: exit_after(FLOW_RUN_EXIT_GRACE_S, 128 + signum))
    url = os.environ.get("PREFECT_API_URL", "")
    if url:
        watch_server(url, on_lost=_end_flow_run_without_server)
    return True


# --- losing the Prefect server ------------------------------------------------------------------------------
#
# When the server of a `blens serve` dies mid-run, Prefect's clients in the flow-run process retry their
# events and logs for good (35-65 % CPU), and its SIGTERM handler reports the crash to the dead server, so
# the death signal `blens serve` arranged did not end it either: it lived on, orphaned (parent 1, 1.3 GB).
# A flow-run process of `blens serve` therefore watches the server and ends itself when it is gone (every
# batch commits on its own, so ending at any moment loses nothing committed), and after a SIGTERM it exits
# within FLOW_RUN_EXIT_GRACE_S whatever Prefect is still trying to report.

FLOW_RUN_EXIT_GRACE_S = 15.0
SERVER_CHECK_INTERVAL_S = 5.0
SERVER_LOST_AFTER = 3  # consecutive failed health checks (~15 s): a restart of the server is not a loss
EXIT_SERVER_LOST = 1


def server_reachable(url: str, timeout: float = 3.0) -> bool:
    """The Prefect API at ``url`` answers its health check (stdlib only: no client, no retries)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            return resp.status == 200
    except Exception:  # noqa: BLE001 - refused, reset, timed out, HTTP error: all "not reachable"
        return False


def watch_server(url: str, *, on_lost: Callable[[str], None], interval: float = SERVER_CHECK_INTERVAL_S,
                 failures: int = SERVER_LOST_AFTER) -> threading.Thread:
    """A daemon thread calling ``on_lost(url)`` once the server failed ``failures`` checks in a row."""

    def run() -> None:
        missed = 0
        while True:
            missed = 0 if server_reachable(url, timeout=min(3.0, interval)) else missed + 1
            if missed >= failures:
                on_lost(url)
                return
            threading.Event().wait(interval)

    thread = threading.Thread(target=run, name="blens-server-watch", daemon=True)
    thread.start()
    return thread


def exit_after(seconds: float, code: int) -> None:
    """End the process with ``code`` in ``seconds`` unless it has ended by then (a daemon timer)."""
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _end_flow_run_without_server(url: str) -> None:
    logging.disable(logging.CRITICAL)  # Prefect's handlers would only retry the dead server
    with contextlib.suppress(Exception):
        sys.stderr.write(f"blens: the Prefect server at {url} has not answered for "
                         f"{SERVER_LOST_AFTER * SERVER_CHECK_INTERVAL_S:.0f} s: ending this flow run (its committed "
                         "batches are kept; the next run extracts the rest)\n")
        sys.stderr.flush()
    os._exit(EXIT_SERVER_LOST)


def prepare_process() -> None:
    """Everything above, for a process about to run flows (called when the flow modules are imported)."""
    arm_ephemeral_server()
    quiet_sigterm_bridge()
