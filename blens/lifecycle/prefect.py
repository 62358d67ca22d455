"""The Prefect environment of our processes: quiet on the terminal, and no process of Prefect's outlives ours.

**Quiet** (:func:`quiet_prefect`). Every command that runs a flow sets Prefect's environment first: its logs
off the terminal (the progress bar says what they say; a failure is reported by the command in one line), no
telemetry, a long ephemeral-server start-up timeout for busy 2-core machines.

**The ephemeral API server.** Without ``PREFECT_API_URL``, Prefect 3.8 runs its API in a uvicorn
subprocess (``prefect.server.api.server.SubprocessASGIServer``, ~225 MB), one per process, started by
whichever client needs it first (``get_client``, the events and logs clients: all ask for the same
port-less singleton) and stopped by an ``atexit`` hook. ``atexit`` never runs when the process is
SIGKILLed (OOM killer, ``kill -9``), nor on a signal's default action, so every killed ``blens extract``
left its server running, reparented to init. :func:`arm_ephemeral_server` registers that singleton
before anything starts it, with one change: its child process gets ``PR_SET_PDEATHSIG = SIGKILL``
between fork and exec (:func:`blens.lifecycle.children.parent_death_preexec`), so the Linux kernel kills it
the moment our process dies, however it dies, and kills only it (our own process group is never signalled).
A normal exit still goes through Prefect's ``atexit`` ``stop()`` (SIGTERM, then SIGKILL after 5 s).

Two facts this relies on: the death signal follows the *thread* that forked the child, so the server
is started with it only from the main thread (which lives as long as the process; sync flows start it
there, and :func:`ensure_local_api` does so explicitly); and SQLite, the ephemeral API's database, is
safe against SIGKILL (atomic commits), so the hard kill costs no consistency.

**SIGTERM during a flow.** Prefect's flow engine swaps in its own SIGTERM handler for the duration of a
run (``prefect.utilities.engine.capture_sigterm``): it raises ``TerminationSignal``, logs the task and
flow crashes at ERROR, restores the previous handler and re-sends the signal. :func:`quiet_sigterm_bridge`
keeps that machinery (the run is still marked Crashed in the API) but switches logging off first, so the
CLI's own guard (:func:`blens.lifecycle.guard.run_guarded`) prints the one line. It also records the
signal (:func:`blens.lifecycle.signals.termination_raised`), so that ``termination_kept`` can restore it
where DuckDB turned it into an ordinary error.

Both touch Prefect internals in exactly one place each, check that the names exist first, and are
covered by ``tests/test_process_hygiene.py`` (kill -9 of the CLI alone; SIGTERM and SIGINT). This module
imports only the standard library; Prefect is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import types
from typing import Any, Callable, Iterator

from . import signals
from .children import parent_death_preexec

__all__ = ["api_for_child_processes", "arm_ephemeral_server", "configured_api_url", "ensure_local_api", "prepare_process",
           "quiet_prefect", "quiet_sigterm_bridge", "wants_prefect"]


def quiet_prefect() -> None:
    """Keep Prefect's logs off the terminal: the progress bar says what they say, and a failure is reported by
    the command in one line (Prefect would add its traceback). PREFECT_LOGGING_LEVEL=INFO shows them again."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry noise
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # busy 2-core boxes


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


def configured_api_url() -> str | None:
    """The Prefect server a user pointed us at: ``PREFECT_API_URL`` in the environment or in the active profile
    of ``$PREFECT_HOME/profiles.toml`` (``prefect config set PREFECT_API_URL=...``). Read without importing Prefect
    (seconds of imports), so a plain run decides for free."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib
    from pathlib import Path

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def wants_prefect(asked: bool | None, fans_out: bool = False) -> bool:
    """Whether a run goes through its Prefect flow. ``asked`` (``--prefect``, or ``prefect=`` in a config) decides when given;
    otherwise Prefect runs it when it adds something: a server the user named (their UI shows the run) or
    Dask workers (``--workers N`` or ``--dask-scheduler``, through prefect-dask). A plain local run uses the same run layer in this process and
    skips the ephemeral API server: ~10 s of start-up and a 225 MB process for a UI nobody opens."""
    if asked is not None:
        return asked
    return fans_out or configured_api_url() is not None


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
        exc = signals.termination_raised(TerminationSignal(signal=sig_num))
        logging.disable(logging.CRITICAL)
        for hook in signals.termination_hooks:
            hook(sig_num)
        raise exc

    handler._blens_quiet = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = handler  # read by capture_sigterm() at each call
    return True


def prepare_process() -> None:
    """Everything above, for a process about to run flows (called when the flow modules are imported)."""
    arm_ephemeral_server()
    quiet_sigterm_bridge()
