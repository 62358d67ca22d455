"""The CLI's top-level guard: nothing a user can cause ends in a traceback.

``blens/cli.py`` calls the whole app through :func:`run_guarded` (both entry points, the ``blens`` script and
``python -m blens.cli``). User errors are recognised by type, :class:`blens.errors.UserError`: a new one only
has to subclass it. Imports only the standard library and :mod:`blens.errors`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from blens.errors import UserError

from . import signals

__all__ = ["run_guarded"]


def run_guarded(command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the CLI (``command``) so that nothing a user can cause ends in a traceback:

    - SIGINT (Ctrl-C) and SIGTERM raise :class:`~blens.lifecycle.signals.Interrupted` in the main thread; it
      unwinds the command (Prefect marks the run crashed, ``atexit`` stops its API server), prints one line and
      exits 128 + signal number (130, 143). A second signal exits at once. A signal the parent set to be
      ignored (``nohup``, a background job of a non-interactive shell) stays ignored.
    - A :class:`~blens.errors.UserError` escaping any command: one red line, exit 2.
    - Anything else is a bug and keeps its traceback.
    """
    with signals.installed():
        try:
            return command(*args, **kwargs)
        except signals.Interrupted as exc:
            signals.say_interrupted(exc.signum)
        except Exception as exc:
            first = signals.first_signal()
            if first is not None:  # raised while unwinding an interrupt (e.g. a crash report that found no server)
                signals.say_interrupted(first)
            if not isinstance(exc, UserError):
                raise
            from blens.commands._common import err_console, one_line

            err_console.print(f"[bold red]error:[/] {one_line(exc)}", highlight=False, soft_wrap=True)
            sys.exit(2)
