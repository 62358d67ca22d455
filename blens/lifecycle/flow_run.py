"""A flow-run process that `blens serve` started: it dies with `blens serve`, and ends itself when the Prefect
server is gone.

Why: the Runner of `blens serve` starts each run as a child process. Killed hard (kill -9, the OOM killer),
`blens serve` could not stop it, and the run went on alone. And when the server died mid-run, Prefect's clients
in the flow-run process retried their events and logs for good (35-65 % CPU), and its SIGTERM handler reported
the crash to the dead server, so the death signal did not end it either: it lived on, orphaned (parent 1,
1.3 GB). So a served flow run binds itself to its parent (:func:`bind_to_serving_process`, called when
``blens.flows.serve`` is imported), watches the server (:func:`watch_server`; every batch commits on its own,
so ending at any moment loses nothing committed), and after a SIGTERM exits within
:data:`FLOW_RUN_EXIT_GRACE_S` whatever Prefect is still trying to report. Covered by tests/e2e/test_serve.py
(the flow run that loses its server is the module's last test). Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from . import signals
from .children import PR_SET_PDEATHSIG, prctl

__all__ = ["EXIT_SERVER_LOST", "FLOW_RUN_EXIT_GRACE_S", "SERVER_CHECK_INTERVAL_S", "SERVER_LOST_AFTER",
           "SERVE_PID_ENV", "bind_to_serving_process", "exit_after", "server_reachable", "watch_server"]

# Set by `blens serve` (blens.flows.serving) to its own pid; the flow-run processes its Runner starts inherit it.
SERVE_PID_ENV = "BLENS_SERVE_PID"

FLOW_RUN_EXIT_GRACE_S = 15.0
SERVER_CHECK_INTERVAL_S = 5.0
SERVER_LOST_AFTER = 3  # consecutive failed health checks (~15 s): a restart of the server is not a loss
EXIT_SERVER_LOST = 1


def bind_to_serving_process(sig: int = signal.SIGTERM) -> bool:
    """In a flow-run process that ``blens serve`` started: die with it, and leave its process group.

    With ``PR_SET_PDEATHSIG`` the kernel sends ``sig`` (SIGTERM: Prefect's engine reports the run Crashed,
    then exits) when the thread that started it dies. A group of its own keeps a Ctrl-C at the terminal (sent
    to the whole foreground group) away from the run: ``blens serve`` alone receives it and cancels the run in
    order. A no-op (False) in any other process: the variable must name our parent."""
    expected = os.environ.get(SERVE_PID_ENV, "")
    if not expected.isdigit() or os.getppid() != int(expected):
        return False
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    fn = prctl()
    if fn is not None:
        fn(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != int(expected):  # it died before the death signal was armed
        os.kill(os.getpid(), sig)
    signals.termination_hooks.append(lambda signum: exit_after(FLOW_RUN_EXIT_GRACE_S, 128 + signum))
    url = os.environ.get("PREFECT_API_URL", "")
    if url:
        watch_server(url, on_lost=_end_flow_run_without_server)
    return True


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
