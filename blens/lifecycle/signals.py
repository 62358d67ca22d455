"""SIGINT and SIGTERM: how a blens process is interrupted, and why it always ends.

* The handler (:func:`installed`) raises :class:`Interrupted` in the main thread, so the command unwinds
  (Prefect marks the run crashed, ``atexit`` stops its API server); a second signal exits at once.
* Every termination signal's exception is recorded (:func:`termination_raised`), whoever raised it (our handler,
  or Prefect's in-flow SIGTERM handler made quiet by :func:`blens.lifecycle.prefect.quiet_sigterm_bridge`), so
  that :func:`termination_kept` can raise it again where DuckDB turned it into an ordinary error or lost it.
* :func:`interrupting` stops a long C call (a DuckDB query) at the signal, from a thread woken by the C-level
  handler: Python's own handler would wait for the call to end.
* The exit watchdog ends the process within :data:`EXIT_GRACE_S` of the first signal whatever happens, and the
  unraisable hook delivers again a signal whose exception Python dropped (in a gc callback or ``__del__``).

Imports only the standard library (rich, for the one line, inside the function that prints it): the guard
installs this for every command, `blens --help` included. Covered by tests/test_process_hygiene.py, the
SIGINT tests of tests/test_query_sandbox.py and tests/test_serve.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

__all__ = ["EXIT_GRACE_S", "RESUME_NOTE", "Interrupted", "allow_exit_grace", "first_signal", "forget_terminations",
           "installed", "interrupting", "say_interrupted", "set_interrupt_note", "termination_hooks",
           "termination_kept", "termination_raised"]


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread. A BaseException on purpose: ``except Exception`` (a
    batch's error policy, a failed-batch handler) must not record an interrupt as a failure and go on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# --- the record of termination signals ------------------------------------------------------------------------

# Called with the signal number by Prefect's (wrapped) SIGTERM handler before it raises; the CLI registers
# its exit watchdog here (an exception raised by a signal handler can be swallowed, see _unraisable_hook).
termination_hooks: list[Callable[[int], None]] = []
# The exception each termination signal's handler raised in this process, first one first: Prefect's
# TerminationSignal (SIGTERM in a flow, blens.lifecycle.prefect.quiet_sigterm_bridge) or our own Interrupted
# (SIGINT, SIGTERM outside a flow).
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


# --- the exit watchdog ------------------------------------------------------------------------------------------

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
        say_interrupted(signum, exit=False)
        os._exit(128 + signum)

    threading.Thread(target=run, name="blens-exit-watchdog", daemon=True).start()


def _on_termination(signum: int) -> None:
    """Prefect's in-flow SIGTERM handler (see blens.lifecycle.prefect) got the signal before ours."""
    logging.disable(logging.CRITICAL)
    _exit_watchdog(signum)


# --- signals Python dropped -------------------------------------------------------------------------------------

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


# --- the handler and the one line -------------------------------------------------------------------------------

_interrupted: list[int] = []  # the first signal our handler received, if any
_said: list[int] = []  # the interrupted line was printed
RESUME_NOTE = "everything committed before it is kept (rerun the same command to resume)"
_interrupt_note: list[str] = []  # what the interrupted line says after "stopped;" (set by the command)


def first_signal() -> int | None:
    """The first signal our handler received in this command, or None."""
    return _interrupted[0] if _interrupted else None


def set_interrupt_note(note: str) -> None:
    """What an interrupt of this command means for the user. The default is the writers' (extract, edit):
    a read-only command (``blens sql``) says so instead of promising a resume."""
    _interrupt_note[:] = [note]


def say_interrupted(signum: int, exit: bool = True) -> None:
    """Print the one "interrupted by SIG...: stopped; ..." line (once per command); exit 128 + signum."""
    if not _said:
        _said.append(signum)
        from blens.commands._common import err_console  # the CLI's stderr console, under its progress bar

        note = _interrupt_note[0] if _interrupt_note else RESUME_NOTE
        err_console.print(f"[bold red]interrupted[/] by {signal.Signals(signum).name}: stopped; {note}",
                          highlight=False, soft_wrap=True)
    if exit:
        sys.exit(128 + signum)


def _on_signal(signum: int, frame: Any) -> None:
    if _interrupted:  # a second Ctrl-C / SIGTERM while shutting down: stop now (child processes die with us)
        say_interrupted(_interrupted[0], exit=False)
        os._exit(128 + signum)
    _interrupted.append(signum)
    logging.disable(logging.CRITICAL)  # Prefect would report the interrupted run's crash, with tracebacks
    _exit_watchdog(signum)
    raise termination_raised(Interrupted(signum))  # kept if DuckDB loses it (termination_kept)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (a signal the parent
    set to be ignored, ``nohup`` or a background job of a non-interactive shell, stays ignored), Prefect's
    in-flow SIGTERM starts the exit watchdog, and a dropped signal is delivered again. Each block starts with
    no signal recorded. On leaving it the caller's handlers come back (tests, notebooks), unless a signal
    arrived: then ours stay, so that a second signal during the exit (atexit stops Prefect's server) exits
    at once."""
    _interrupted.clear()
    _said.clear()
    _interrupt_note.clear()
    forget_terminations()
    if _on_termination not in termination_hooks:
        termination_hooks.append(_on_termination)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    previous_unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook
    try:
        yield
    finally:
        if not _interrupted:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            sys.unraisablehook = previous_unraisable


# --- signals while the main thread is inside C ---------------------------------------------------------------------

@contextlib.contextmanager
def interrupting(stop: Callable[[], None], set_wakeup_fd: Callable = signal.set_wakeup_fd) -> Iterator[None]:
    """While the block runs, SIGINT or SIGTERM calls ``stop()`` at once from a thread, and again every 0.2 s until
    the block ends (a DuckDB interrupt between two statements reaches neither).

    Python runs a signal's handler in the main thread between bytecodes, so while the main thread sits in one long
    C call (a DuckDB query) the handler, and the :class:`Interrupted` it raises, wait for the call to end: a Ctrl-C
    of a long `blens sql` query waited for the exit watchdog, 20 s. The C-level handler writes the signal's number
    to the wake-up fd (``signal.set_wakeup_fd``) at once; a thread here reads it. A signal our handler recorded
    before the block (DuckDB can run the handler inside an earlier call and keep its exception) counts too.
    Outside the main thread (which alone may set the wake-up fd) it only watches that record.
    ``set_wakeup_fd`` is bound at definition: a signal's exception can leave this generator to the interpreter's
    teardown, after module globals are gone."""
    done = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    receive, send = socket.socketpair() if main else (None, None)
    previous = None
    if send is not None:
        send.setblocking(False)
        previous = set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while not done.is_set() and not _interrupted:
            if receive is None:
                done.wait(0.5)
                continue
            ready, _, _ = select.select([receive], [], [], 0.5)
            if ready and not done.is_set():
                try:
                    got = receive.recv(64)
                except OSError:  # closed: the block ended
                    return
                if signal.SIGINT in got or signal.SIGTERM in got:
                    break
        while not done.is_set():
            stop()
            done.wait(0.2)

    watcher = threading.Thread(target=watch, name="blens-signal-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(1.0)  # out of select before the socket closes
        if send is not None:
            set_wakeup_fd(previous)
            receive.close()
            send.close()
