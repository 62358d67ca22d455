"""The one base class of the errors a user can cause and fix: :class:`UserError`.

Why a base class: the CLI's top-level guard (:func:`blens.lifecycle.guard.run_guarded`) prints any error a user
can act on as one red line and exits 2, and lets everything else (a bug) keep its traceback. It decides by type,
``isinstance(exc, UserError)``, so a new user-facing error only has to subclass this; nothing keeps a list of
names in step. This module imports nothing, so the guard, and every domain package, can import it for free
(no torch, DuckDB or Prefect).

Subclasses keep their historical base as a second base (``class WarehouseError(UserError, RuntimeError)``),
so an ``except RuntimeError`` written before this class existed still catches them.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """The user's input or environment is wrong (a missing file, an unreachable hub, a refused query), never a
    bug. The message is one line meant for the user: it is printed as it is, after ``error:``."""
