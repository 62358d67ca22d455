"""Serving a deployment until told to stop: Prefect's ``Runner`` on an event loop in a thread of its own,
stopped in order from the main thread.

Why not ``prefect.serve()``: in Prefect 3.8 its Runner installs a SIGTERM handler in the main thread that
calls the sync ``Runner.stop()`` from inside the running event loop. The stop coroutine is never awaited,
``sys.exit(0)`` lands wherever the loop happened to be (a screen of tracebacks), and a run in progress was
left "Running" on the server for good, its schedule still active. Here ``Runner.start`` runs outside the
main thread, where it installs no signal handler; the main thread keeps the CLI's own handling
(``blens.lifecycle.guard.run_guarded``), and :meth:`Serving.stop` schedules ``Runner.astop()`` on the
runner's loop: runs in progress are cancelled (state Cancelled on the server, their process killed), the
deployment's schedule is paused (``pause_on_shutdown``), then the thread ends.

Flow runs are processes the Runner starts (``python -m prefect.engine`` with the deployment's entrypoint);
:data:`SERVE_PID_ENV` tells them who served them, so they tie their life to ours
(``blens.lifecycle.flow_run.bind_to_serving_process``): nothing outlives ``blens serve``, even a kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from blens.lifecycle.flow_run import SERVE_PID_ENV

__all__ = ["Serving", "ServeFailed", "end_children"]


class ServeFailed(RuntimeError):
    """The deployment could not be registered or the runner stopped on its own (server gone, bad settings)."""


class Serving:
    """One served deployment. ``start()`` registers it and starts polling; ``wait()`` blocks until the
    runner ends (interruptible: signals reach the main thread); ``stop()`` ends it in order."""

    def __init__(self, deployment: Any) -> None:
        self.deployment = deployment
        self.deployment_id: UUID | None = None
        self._ready = threading.Event()
        # Not Thread.is_alive()/join(): a signal handler raising during join() makes CPython 3.11 mark a
        # running thread stopped (the bpo-45274 cleanup releases the lock the live thread holds).
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._main_task: asyncio.Task | None = None
        self._stop_requested = False
        # A daemon: if a stop overruns its grace, the process may still exit (flow runs die with it).
        self._thread = threading.Thread(target=self._thread_main, name="blens-serve-runner", daemon=True)

    # --- the runner's thread -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except asyncio.CancelledError:
            pass  # stopped before the runner had started
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            self._error = exc
        finally:
            self._ready.set()
            self._finished.set()

    async def _main(self) -> None:
        from prefect.runner import Runner

        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        self._runner = Runner(name=self.deployment.name, pause_on_shutdown=True, webserver=False)
        self.deployment_id = await self._runner.aadd_deployment(self.deployment)
        self._ready.set()
        if not self._stop_requested:  # a stop asked for before this loop existed
            await self._runner.start(webserver=False)

    def _begin_stop(self) -> None:  # on the runner's loop
        runner = self._runner
        if runner is not None and runner.started:
            asyncio.ensure_future(runner.astop())  # cancel runs in progress, then leave start(): pauses schedules
        elif self._main_task is not None:
            self._main_task.cancel()

    # --- the main thread -----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> UUID:
        """Register the deployment and start polling; returns its id. Raises :class:`ServeFailed`."""
        os.environ[SERVE_PID_ENV] = str(os.getpid())  # flow-run processes inherit it (see module docstring)
        self._thread.start()
        while not self._ready.wait(0.5) and timeout > 0:  # short waits: a signal is handled between them
            timeout -= 0.5
        if self._error is not None or self.deployment_id is None:
            raise ServeFailed(_describe(self._error) if self._error else "the Prefect server did not answer in time")
        return self.deployment_id

    def wait(self) -> None:
        """Until the runner ends by itself (it should not); raises :class:`ServeFailed` if it failed."""
        while not self._finished.wait(0.5):
            pass
        if self._error is not None:
            raise ServeFailed(_describe(self._error))
        if not self._stop_requested:
            raise ServeFailed("the Prefect runner stopped by itself")

    def stop(self, timeout: float) -> bool:
        """Stop in order within ``timeout`` seconds; False if the runner is still busy then."""
        self._stop_requested = True
        if self._loop is not None and not self._finished.is_set():
            try:
                self._loop.call_soon_threadsafe(self._begin_stop)
            except RuntimeError:  # the loop closed in the meantime
                pass
        return self._finished.wait(timeout)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def end_children(grace: float = 5.0) -> int:
    """End this process's children (the Runner's flow-run processes) and their groups ourselves: SIGTERM,
    then SIGKILL after ``grace`` s. For a stop without a server, when the Runner cannot cancel runs in
    order (it would report each step to the dead server first). Returns how many there were."""
    kids = _children(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kid in kids:
            with contextlib.suppress(OSError):
                if os.getpgid(kid) == kid:
                    os.killpg(kid, sig)  # the run's own group (bind_to_serving_process): its children too
                else:
                    os.kill(kid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_running(k) for k in kids):
            time.sleep(0.1)
    return len(kids)


def _running(pid: int) -> bool:
    """``pid`` (our child) has not ended; reaps it if it has."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"
