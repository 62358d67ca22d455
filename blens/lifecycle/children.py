"""No child process outlives us: the Linux death signal (``PR_SET_PDEATHSIG``), set between fork and exec.

Why: ``atexit`` never runs when a process is SIGKILLed (the OOM killer, ``kill -9``) nor on a signal's default
action, so a child that a normal exit would have stopped (Prefect's API server, a flow-run process of
`blens serve`) lived on, reparented to init. With the death signal the kernel ends it the moment its parent
dies, however it dies. Used by :mod:`blens.lifecycle.prefect` (the ephemeral API server) and
:mod:`blens.lifecycle.flow_run` (a served flow run binds itself to `blens serve`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

__all__ = ["PR_SET_PDEATHSIG", "parent_death_preexec", "prctl"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, or None where it does not exist (not Linux)."""
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
    fn = prctl()
    if fn is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no locks, no imports
        if own_group:
            os.setpgid(0, 0)
        fn(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
