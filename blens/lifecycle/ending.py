"""How a `blens` process ends: as Python's own exit does, less the interpreter's teardown.

With torch and transformers imported, CPython's finalisation (freeing thousands of modules' objects, then
libtorch's and oneDNN's static destructors) takes about 0.9 s on this repo's 2-core box, after the command's
work is done: an eighth of a 1-prompt `blens extract` (issue 26's fixed cost; bench/results.md). Nothing blens
writes depends on it. A command commits and closes what it writes before it returns, and what must run at exit
is registered with ``atexit`` (Prefect's API server stop, the warehouse writer's connections, temporary
directories). :func:`end_process` does the rest of a normal exit in Python's order (wait for non-daemon threads,
``atexit`` handlers, flush stdout and stderr), then leaves with ``os._exit``.

Only the process's entry point calls it (``blens.cli.main``: the `blens` script and ``python -m blens.cli``),
and only when torch is loaded, the case it is for; code calling the app in-process (tests through Click's
``CliRunner``) keeps an ordinary return. Imports only the standard library.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

__all__ = ["end_process", "exit_code"]


def exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(x)`` would give: None is 0, an int is itself, anything else is printed and 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def end_process(code: int) -> NoReturn:
    """End the process now with ``code``, after what a normal exit runs before its teardown."""
    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls: thread-pool exits, then joins
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`blens sql ... | head`), a closed stream
            pass
    os._exit(code)
